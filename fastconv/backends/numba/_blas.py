"""Pinning the BLAS behind numba's ``np.dot`` to one thread (private).

Inside ``@njit`` code, ``np.dot`` calls the BLAS that ``scipy.linalg.cython_blas`` exports
(SciPy's own OpenBLAS, a different library from NumPy's).  When several numba threads
each run GEMMs, that library must not start threads of its own: two 2-thread GEMMs on a
2-core machine oversubscribe it, and OpenBLAS serialises concurrent multi-threaded calls.
"""

from __future__ import annotations

import threading
from typing import Any


class SingleThreadedBlas:
    """Context manager pinning SciPy's BLAS to one thread, re-entrant across Python threads.

    The first entry saves the library's thread count and sets 1; the last exit restores
    it.  A no-op when threadpoolctl cannot find the library.  (The same policy as the
    Cython backend's ``_SingleThreadedBlas``, which pins the same library.)
    """

    _lock = threading.Lock()
    _depth = 0
    _saved = 1
    _controller: Any = None
    _searched = False

    @classmethod
    def _find(cls) -> Any:
        """The threadpoolctl controller of SciPy's BLAS (None when there is none)."""
        with cls._lock:
            if not cls._searched:
                cls._searched = True
                try:
                    import scipy.linalg.cython_blas  # noqa: F401  (loads the library)
                    from threadpoolctl import ThreadpoolController

                    libs = ThreadpoolController().select(user_api="blas").lib_controllers
                    scipy_libs = [c for c in libs if "scipy" in c.filepath and "numpy" not in c.filepath]
                    cls._controller = scipy_libs[0] if scipy_libs else None
                except Exception:  # pragma: no cover - threadpoolctl missing or unusual BLAS
                    cls._controller = None
        return cls._controller

    def __enter__(self) -> None:
        ctl = self._find()
        if ctl is None:
            return
        with self._lock:
            if type(self)._depth == 0:
                type(self)._saved = ctl.num_threads
                ctl.set_num_threads(1)
            type(self)._depth += 1

    def __exit__(self, *exc: object) -> None:
        ctl = self._find()
        if ctl is None:
            return
        with self._lock:
            type(self)._depth -= 1
            if type(self)._depth == 0:
                ctl.set_num_threads(type(self)._saved)
