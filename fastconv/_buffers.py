"""Per-thread scratch buffers that share no cache line.

Threads that write neighbouring bytes of one array fight over the cache lines between them
(false sharing).  The tiled average-pooling gradient's two 42-float row buffers, adjacent in
one (2, 42) array, took 1.06 ms on two threads against 0.41 ms on one (2-core Xeon,
64x32x28x28, 2x2/2); in rows of their own cache lines, 0.33 ms.  The compiled kernels'
per-thread scratch rows come from here: each starts on a 64-byte boundary and is padded to a
whole number of cache lines.  (The per-thread partial sums of the weight gradients stay plain
arrays: they are written once per unit of work, and are large wherever they are written
often.)
"""

from __future__ import annotations

from typing import Any

import numpy as np

#: bytes per cache line (x86-64, and the 64-byte alignment AVX-512 loads want)
LINE = 64


def aligned_rows(rows: int, cols: int, dtype: Any, fill: float | None = None, align: int = LINE) -> np.ndarray:
    """A C-contiguous array of ``rows`` rows of at least ``cols`` elements (rounded up to a
    multiple of ``align`` bytes) whose rows all start on ``align``-byte boundaries.

    NumPy's own buffers are only 16-byte aligned: a vector of 16 float32 would straddle two
    cache lines on most accesses, and two threads' rows would share the lines between them.

    Parameters
    ----------
    rows, cols : int
        Rows (threads) and the elements each needs.
    dtype : numpy dtype
    fill : float, optional
        Value of every element; None leaves them uninitialised.
    align : int
        Bytes (a multiple of the item size).
    """
    dtype = np.dtype(dtype)
    per_row = -(-max(cols, 1) * dtype.itemsize // align) * align // dtype.itemsize
    raw = np.empty(rows * per_row * dtype.itemsize + align, np.uint8)
    start = -raw.ctypes.data % align
    out = raw[start:start + rows * per_row * dtype.itemsize].view(dtype).reshape(rows, per_row)
    if fill is not None:
        out.fill(fill)
    return out

