"""Backend registry and selection.

Backends are listed in one table (name -> "module:Class") and imported on first
use, so ``import fastconv`` never compiles or imports a heavy dependency, and a
backend that cannot load is reported as unavailable with its reason instead of
raising at import time.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import threading
from typing import Any

from . import _args, _config
from .backends.base import Backend

#: name -> "module:Class", in "auto" preference order for host arrays
REGISTRY: dict[str, str] = {
    "cython": "fastconv.backends.cython:CythonBackend",
    "numba": "fastconv.backends.numba:NumbaBackend",
    "numpy": "fastconv.backends.numpy:NumpyBackend",
    "reference": "fastconv.backends.reference:ReferenceBackend",
    "cuda": "fastconv.backends.cuda:CudaBackend",
}
#: what "auto" tries for host arrays, in order
AUTO_ORDER = ("cython", "numba", "numpy")
BACKEND_NAMES = tuple(REGISTRY) + ("auto",)

_loaded: dict[str, Backend] = {}
_failed: dict[str, str] = {}
_load_lock = threading.Lock()
_default = {"name": None}  # set by use_backend(); None -> FASTCONV_BACKEND or "auto"


def _load(name: str) -> Backend | None:
    """Import and instantiate a backend once; remember why it failed if it does."""
    if name in _loaded:
        return _loaded[name]
    if name in _failed:
        return None
    with _load_lock:
        if name in _loaded or name in _failed:
            return _loaded.get(name)
        module_name, _, cls_name = REGISTRY[name].partition(":")
        try:
            backend = getattr(importlib.import_module(module_name), cls_name)()
        except Exception as exc:  # any failure means "unavailable", with the reason
            _failed[name] = f"{type(exc).__name__}: {exc}"
            return None
        _loaded[name] = backend
        return backend


def available_backends() -> dict[str, dict[str, Any]]:
    """Every registered backend: ``{name: {"available": bool, "reason": str | None,
    "algorithms": tuple, ...}}``.  Loading a backend here may take a moment (imports)."""
    result = {}
    for name in REGISTRY:
        backend = _load(name)
        if backend is None:
            result[name] = {"available": False, "reason": _failed[name], "algorithms": ()}
        else:
            result[name] = {"available": True, "reason": None, "algorithms": backend.algorithms,
                            **backend.info()}
    return result


def _configured_name() -> str:
    if _default["name"] is not None:
        return _default["name"]
    env = os.environ.get("FASTCONV_BACKEND", "").strip()
    if env:
        return _args.choice(env, BACKEND_NAMES, "FASTCONV_BACKEND", "value")
    return "auto"


def get_backend() -> str:
    """The default backend name ("auto" unless :func:`use_backend` or FASTCONV_BACKEND set one)."""
    return _configured_name()


class _BackendSetting(contextlib.AbstractContextManager):
    """Returned by :func:`use_backend`: already applied; restores the old value on ``__exit__``."""

    def __init__(self, previous: str | None) -> None:
        self._previous = previous

    def __exit__(self, *exc: object) -> None:
        _default["name"] = self._previous


def use_backend(name: str) -> _BackendSetting:
    """Set the default backend.  Works as a plain setter and as a context manager::

        fastconv.use_backend("numba")           # from now on
        with fastconv.use_backend("numpy"):     # only inside the block
            ...

    Raises ``ValueError`` for an unknown name and ``RuntimeError`` when the backend
    is unavailable (the message gives the reason).
    """
    name = _args.choice(name, BACKEND_NAMES, "use_backend", "name")
    if name != "auto":
        resolve(name, "use_backend")
    previous = _default["name"]
    _default["name"] = name
    return _BackendSetting(previous)


def resolve(name: str | None, func: str, *, on_device: bool = False) -> Backend:
    """The backend object for ``name`` (None -> the configured default)."""
    if name is None:
        name = _configured_name()
    name = _args.choice(name, BACKEND_NAMES, func, "backend")
    if name == "auto":
        for candidate in ("cuda",) if on_device else AUTO_ORDER:
            backend = _load(candidate)
            if backend is not None:
                return backend
        raise RuntimeError(f"{func}(): no backend available for "
                           f"{'device' if on_device else 'host'} arrays: {_failed}")
    backend = _load(name)
    if backend is None:
        raise RuntimeError(f"{func}(): backend {name!r} is unavailable: {_failed[name]}")
    if on_device and not backend.device:
        raise TypeError(f"{func}(): got GPU device arrays but backend {name!r} works on host arrays; "
                        "use backend='cuda' or copy the arrays to the host")
    return backend


def select_conv(op: str, g: _args.ConvGeometry, func: str, backend: str | None, algorithm: str | None,
                *, on_device: bool = False) -> tuple[Backend, str]:
    """Pick the backend and conv algorithm for one call."""
    impl = resolve(backend, func, on_device=on_device)
    if algorithm is None or algorithm == "auto":
        if _config.get_autotune() and len(impl.algorithms) > 1:
            from . import _autotune

            return impl, _autotune.choose(impl, op, g)
        return impl, impl.default_algorithm(op, g)
    if not isinstance(algorithm, str):
        raise TypeError(f"{func}(): algorithm must be a string, got {algorithm!r}")
    if algorithm not in impl.algorithms:
        raise ValueError(f"{func}(): backend {impl.name!r} has no algorithm {algorithm!r}; "
                         f"choose from {list(impl.algorithms) + ['auto']}")
    reason = impl.unsupported(algorithm, op, g)
    if reason is not None:
        raise ValueError(f"{func}(): algorithm {algorithm!r} needs {reason}; input {g.input_shape}, "
                         f"weight {g.weight_shape}, stride {g.stride}, dilation {g.dilation} "
                         "(algorithm='auto' picks one that runs)")
    return impl, algorithm


