"""Process-wide settings: thread count, im2col workspace limit, autotuning."""

from __future__ import annotations

import os
import threading
from typing import Any

from . import _args

_lock = threading.Lock()

#: libgomp spins of an idle OpenMP worker before it sleeps (``GOMP_SPINCOUNT``) that fastconv
#: sets where the user has chosen no wait policy: see :func:`default_openmp_wait`
OPENMP_SPINCOUNT = "3000"


def default_openmp_wait() -> None:
    """Let idle OpenMP workers spin briefly (``GOMP_SPINCOUNT=3000``, 50-100 us on the 2-core
    Zen 5 VM) before they sleep, unless ``OMP_WAIT_POLICY`` or ``GOMP_SPINCOUNT`` is set.

    libgomp reads the variables once, when it is loaded (by the first compiled backend), so
    ``fastconv/__init__.py`` calls this before anything else.  Its own default spins 300,000
    times (milliseconds), which on a shared machine steals the cores from the threads still
    working: with 8 busy processes on the 2 cores a 2-thread stripe-c2 forward call took 8-16
    ms, 0.85 ms with passive workers.  Passive workers (``OMP_WAIT_POLICY=PASSIVE``, fastconv's
    earlier default) sleep at once, and on the VM each parallel call then waited 60-100 us for
    a sleeping worker to wake, whatever its size: the second core gained stripe-c2's forward
    pass nothing (0.40-0.44 ms on 2 threads, 0.41-0.42 on one).  With the short spin, calls
    that follow within the spin find their workers awake (a parallel region: 2 us, against
    60-100 passive).  Measured on the VM, 2 threads, medians of 3-second loops: stripe-c2
    forward 0.22 ms against 0.32-0.37 passive, mnist-c2 1.31 against 1.41-1.59; the same with 8
    busy processes (0.74-1.05 against 0.68-0.78 ms and 8.0-8.8 against 8.0-11.4); the worst
    case is a machine loaded exactly to its cores (2 busy processes on 2): stripe-c2 0.73 ms
    against 0.46, mnist-c2 3.0 against 2.7.
    """
    if "OMP_WAIT_POLICY" not in os.environ and "GOMP_SPINCOUNT" not in os.environ:
        os.environ["GOMP_SPINCOUNT"] = OPENMP_SPINCOUNT


def openmp_wait() -> str:
    """How idle OpenMP workers wait, as the environment tells libgomp: e.g.
    ``"GOMP_SPINCOUNT=3000"`` or ``"OMP_WAIT_POLICY=PASSIVE"`` (a libgomp loaded before
    fastconv, PyTorch's say, read the environment as it was then)."""
    chosen = [f"{name}={os.environ[name]}" for name in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT") if name in os.environ]
    return ", ".join(chosen) or "libgomp's default"


def _default_threads() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


_state = {
    "threads": _default_threads(),
    "threads_set": False,
    "workspace_bytes": 32 * 2**20,
    "autotune": False,
}
_blas_limiter = None


def set_num_threads(n: int) -> None:
    """Set how many threads fastconv's kernels (and the BLAS they call) may use.

    Parameters
    ----------
    n : int
        A positive thread count.  The default is the number of CPUs this process
        may run on.
    """
    n = _args.positive_int(n, "set_num_threads", "n")
    with _lock:
        _state["threads"] = n
        _state["threads_set"] = True
    apply_blas_limit()


def apply_blas_limit() -> None:
    """Limit every BLAS loaded so far to :func:`get_num_threads` threads.

    Called by :func:`set_num_threads`, and again by a backend that loads another BLAS
    later (the Cython backend loads SciPy's), so that library obeys the setting too.
    Does nothing until :func:`set_num_threads` has been called.
    """
    global _blas_limiter
    if not _state["threads_set"]:
        return
    with _lock:
        try:
            from threadpoolctl import ThreadpoolController

            _blas_limiter = ThreadpoolController().limit(limits=int(_state["threads"]), user_api="blas")
        except Exception:  # pragma: no cover - threadpoolctl missing or no BLAS found
            _blas_limiter = None


def get_num_threads() -> int:
    """The thread count fastconv's kernels use (see :func:`set_num_threads`)."""
    return int(_state["threads"])


def set_workspace_limit(nbytes: int) -> None:
    """Bound the scratch memory (im2col column buffers) of one call, in bytes.

    The batch is processed in chunks so that the column buffer never exceeds this
    limit; a single image whose columns are larger is still processed (alone).
    The default is 32 MiB.
    """
    _state["workspace_bytes"] = _args.positive_int(nbytes, "set_workspace_limit", "nbytes")


def get_workspace_limit() -> int:
    """The im2col workspace limit in bytes (see :func:`set_workspace_limit`)."""
    return int(_state["workspace_bytes"])


def batch_chunk(bytes_per_image: int, n: int) -> int:
    """How many images fit in the workspace limit at once (at least 1, at most n)."""
    return max(1, min(n, get_workspace_limit() // max(1, bytes_per_image)))


def set_autotune(enabled: bool) -> None:
    """Turn the algorithm autotuner on or off (like ``torch.backends.cudnn.benchmark``)."""
    _state["autotune"] = _args.flag(enabled, "set_autotune", "enabled")


def get_autotune() -> bool:
    """Whether ``algorithm="auto"`` times the candidates (see :func:`set_autotune`)."""
    return bool(_state["autotune"])


def blas_libraries() -> list[dict[str, Any]]:
    """threadpoolctl's description of every BLAS loaded in the process ("internal_api",
    "version", "num_threads", "architecture", "filepath", ...); empty where threadpoolctl
    cannot inspect them."""
    try:
        from threadpoolctl import threadpool_info

        return [lib for lib in threadpool_info() if lib.get("user_api") == "blas"]
    except Exception:  # pragma: no cover - threadpoolctl missing or failing on an unusual library
        return []


def openblas_cores() -> list[str]:
    """The core each loaded OpenBLAS runs kernels for, as threadpoolctl names it ("Haswell",
    "SkylakeX", ...; "" where it does not say)."""
    return [str(lib.get("architecture") or "") for lib in blas_libraries() if lib.get("internal_api") == "openblas"]


class single_threaded_blas:
    """Context manager: every BLAS library loaded in the process (NumPy's and SciPy's
    OpenBLAS) runs on one thread inside it.  Re-entrant and shared across Python threads:
    the first entry saves each library's thread count, the last exit restores it.

    The compiled backends hold it while their OpenMP threads each call GEMMs (a BLAS
    thread pool would oversubscribe the cores), and around whole Winograd calls, whose
    small weight-transform GEMMs would otherwise wake BLAS worker threads that then spin
    against the kernel's own threads (measured: 2-3x slower when OpenMP waits actively,
    e.g. with PyTorch's libgomp loaded first).  A no-op when threadpoolctl finds no BLAS.
    """

    _lock = threading.Lock()
    _depth = 0
    _saved: list[tuple[Any, int]] = []
    _controllers: list[Any] | None = None

    @classmethod
    def _find(cls) -> list[Any]:
        if cls._controllers is None:
            try:
                import scipy.linalg.cython_blas  # noqa: F401  (loads SciPy's BLAS, which the kernels call)
                from threadpoolctl import ThreadpoolController

                cls._controllers = list(ThreadpoolController().select(user_api="blas").lib_controllers)
            except Exception:  # pragma: no cover - threadpoolctl missing or unusual BLAS
                cls._controllers = []
        return cls._controllers

    def __enter__(self) -> None:
        with self._lock:
            if type(self)._depth == 0:
                type(self)._saved = [(c, c.num_threads) for c in self._find()]
                for c, _ in type(self)._saved:
                    c.set_num_threads(1)
            type(self)._depth += 1

    def __exit__(self, *exc: object) -> None:
        with self._lock:
            type(self)._depth -= 1
            if type(self)._depth == 0:
                for c, n in type(self)._saved:
                    c.set_num_threads(n)
