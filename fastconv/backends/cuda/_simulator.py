"""A fix for numba's CUDA simulator, applied when it is on (private).

The simulator (``NUMBA_ENABLE_CUDASIM=1``) runs each thread of a block as a Python thread.
Its ``cuda.shared.array`` (``FakeCUDAShared.array``) finds a block's shared array by the
calling source line and creates it on first use, with no lock between the lookup and the
store.  Reading the kernel's source for that lookup (``traceback.extract_stack``; a cold
``linecache`` on a kernel's first launch reads the file) lets another thread of the block in
between: the two threads then get different "shared" arrays, and the block silently computes
garbage.  Seen in CI (one block of a first weight-gradient launch, every element it owned
wrong) and reproduced 2 times in 20 launches with the line cache cleared before each; with
the lookup under a lock, 0 in 40.
"""

from __future__ import annotations

import sys
import threading
import traceback

import numpy as np


def make_shared_arrays_thread_safe() -> bool:
    """Replace ``FakeCUDAShared.array`` by the same lookup under a lock; False (nothing done)
    when the simulator's internals are not the ones this was written for."""
    try:
        from numba.core import types
        from numba.cuda.simulator import kernelapi
        from numba.np import numpy_support
    except ImportError:
        return False
    shared = getattr(kernelapi, "FakeCUDAShared", None)
    original = getattr(shared, "array", None)
    if original is None or getattr(original, "_fastconv_locked", False):
        return original is not None
    lock = threading.Lock()

    def array(self, shape, dtype):
        allocations = getattr(self, "_allocations", None)
        if shape == 0 or not isinstance(allocations, dict):
            return original(self, shape, dtype)  # dynamic shared memory needs no lookup
        if isinstance(dtype, types.Type):
            dtype = numpy_support.as_dtype(dtype)
        caller = traceback.extract_stack(sys._getframe())[-2][0:2]  # the kernel's line, as the original
        with lock:
            if caller not in allocations:
                allocations[caller] = np.empty(shape, dtype)
            return allocations[caller]

    array._fastconv_locked = True
    shared.array = array
    return True
