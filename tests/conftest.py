"""Shared test helpers: tolerances, backend/algorithm enumeration, random configurations."""

from __future__ import annotations

import contextlib

import numpy as np
import pytest

import fastconv

#: norm-wise relative error bars ||out - ref|| / ||ref||
TOLERANCE = {np.dtype(np.float32): 1e-5, np.dtype(np.float64): 1e-12}


def rel_err(out: np.ndarray, ref: np.ndarray) -> float:
    out, ref = np.asarray(out, dtype=np.float64), np.asarray(ref, dtype=np.float64)
    assert out.shape == ref.shape, (out.shape, ref.shape)
    denom = np.linalg.norm(ref)
    return float(np.linalg.norm(out - ref) / denom) if denom > 0 else float(np.linalg.norm(out))


def assert_close(out, ref, dtype) -> None:
    err = rel_err(out, ref)
    assert err <= TOLERANCE[np.dtype(dtype)], f"relative error {err:.3g} > {TOLERANCE[np.dtype(dtype)]:g}"


def host_backends() -> list[str]:
    """Every available host backend except the reference (which is the oracle)."""
    info = fastconv.available_backends()
    return [name for name, i in info.items() if i["available"] and name not in ("reference", "cuda")]


def backend_algorithms() -> list[tuple[str, str]]:
    info = fastconv.available_backends()
    return [(name, algo) for name in host_backends() for algo in info[name]["algorithms"]]


def unsupported(backend: str, algorithm: str, op: str, x_shape, w_shape, stride=1, padding=0, dilation=1,
                groups=1, dtype=np.float64) -> str | None:
    """Why ``algorithm`` of ``backend`` cannot run ``op`` on this layer (None when it can):
    the backend's own answer, as the dispatcher asks it (Winograd runs only 3x3 stride-1)."""
    from fastconv import _args, _dispatch

    x_shape = tuple(x_shape) if len(x_shape) == 4 else (1, *x_shape)
    g = _args._conv_geometry("test", x_shape, tuple(w_shape), stride, padding, dilation, groups, np.dtype(dtype))
    return _dispatch._load(backend).unsupported(algorithm, op, g)


def layout(a: np.ndarray, kind: str) -> np.ndarray:
    """The same values in another memory layout."""
    if kind == "c":
        return a
    if kind == "fortran":
        return np.asfortranarray(a)
    if kind == "strided":  # a non-contiguous view: every other element of a larger array
        big = np.zeros(a.shape[:-1] + (2 * a.shape[-1],), dtype=a.dtype)
        big[..., ::2] = a
        return big[..., ::2]
    if kind == "reversed":  # negative strides
        return np.ascontiguousarray(a[..., ::-1])[..., ::-1]
    if kind == "readonly":
        b = a.copy()
        b.flags.writeable = False
        return b
    raise ValueError(kind)


LAYOUTS = ("c", "fortran", "strided", "reversed", "readonly")


@pytest.fixture(params=[np.float32, np.float64], ids=["f32", "f64"])
def dtype(request):
    return np.dtype(request.param)


@contextlib.contextmanager
def num_threads(n: int):
    """Run the block with ``fastconv.set_num_threads(n)``, restoring the previous count."""
    before = fastconv.get_num_threads()
    fastconv.set_num_threads(n)
    try:
        yield
    finally:
        fastconv.set_num_threads(before)


def python_child(args: list[str], **kwargs):
    """Run ``python *args`` in a child process that imports the same fastconv as this
    process (an installed one, or the source tree in a development checkout)."""
    import subprocess
    import sys
    from pathlib import Path

    package_parent = str(Path(fastconv.__file__).resolve().parents[1])
    kwargs.setdefault("capture_output", True)
    kwargs.setdefault("text", True)
    return subprocess.run([sys.executable, *args], cwd=package_parent, **kwargs)


class GuardedNumpy:
    """NumPy, except that ``empty`` and ``zeros`` return arrays with ``MARGIN`` guard elements
    of a known byte pattern on both sides: any write past an output or a workspace the
    backend allocates changes them."""

    MARGIN = 64
    PATTERN = 0xA5

    def __init__(self):
        self.buffers = []

    def __getattr__(self, name):
        return getattr(np, name)

    def _guarded(self, shape, dtype=float, fill=None):
        dtype = np.dtype(dtype)
        size = int(np.prod(shape))
        buf = np.empty(size + 2 * self.MARGIN, dtype)
        buf.view(np.uint8)[:] = self.PATTERN
        self.buffers.append(buf)
        a = buf[self.MARGIN:self.MARGIN + size].reshape(shape)
        if fill is not None:
            a[...] = fill
        return a

    def empty(self, shape, dtype=float):
        return self._guarded(shape, dtype)

    def zeros(self, shape, dtype=float):
        return self._guarded(shape, dtype, 0)

    def untouched(self) -> bool:
        m = self.MARGIN
        return all((b[:m].view(np.uint8) == self.PATTERN).all() and (b[-m:].view(np.uint8) == self.PATTERN).all()
                   for b in self.buffers)


def guard_allocations(monkeypatch, backend: str) -> GuardedNumpy:
    """Make ``backend``'s adapter (and the Winograd code it shares) allocate every output and
    workspace through a :class:`GuardedNumpy`; check ``.untouched()`` after the calls."""
    import importlib

    guarded = GuardedNumpy()
    for module in (f"fastconv.backends.{backend}", "fastconv.backends.base", "fastconv.backends._winograd_passes",
                   "fastconv._winograd"):
        monkeypatch.setattr(importlib.import_module(module), "np", guarded)
    return guarded
