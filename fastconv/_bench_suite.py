"""The benchmark layer suite (DESIGN.md) and the callables that time one case.

Shared by the ``fastconv bench`` runner (:mod:`fastconv.benchmark`) and the
pytest-benchmark files in ``bench/``.  A *case* is one layer, pool or 2-D
correlation; a *pass* is "forward", "backward-input", "backward-weight" (convs)
or "backward" (pools).  :func:`make_call` prepares random inputs once and returns
a zero-argument function that runs one pass with one implementation:

* a fastconv backend name ("numba", "numpy", "reference", ...) with an algorithm,
  through the public API (validation included, as users call it);
* "torch" (``torch.nn.functional`` / ``torch.nn.grad`` / the ATen pool backward ops,
  in the compute dtype, no autograd), or "scipy.signal" / "scipy.ndimage" for the
  2-D correlations.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, replace
from typing import Any, Callable

import numpy as np

from ._args import ConvGeometry, PoolGeometry

CONV_PASSES = ("forward", "backward-input", "backward-weight")
POOL_PASSES = ("forward", "backward")
ALL_PASSES = ("forward", "backward-input", "backward-weight", "backward")
#: external implementations compared against, by case kind
BASELINES = {"conv": ("torch",), "pool": ("torch",), "corr2d": ("torch", "scipy.signal", "scipy.ndimage")}


@dataclass(frozen=True)
class ConvCase:
    """One convolution layer of the suite (square kernel, symmetric padding)."""

    name: str
    n: int
    c: int
    hw: int
    k: int
    rs: int
    stride: int = 1
    pad: int = 1
    dil: int = 1
    groups: int = 1
    kind: str = "conv"

    @property
    def passes(self) -> tuple[str, ...]:
        return CONV_PASSES

    def geometry(self, dtype: Any = np.float32) -> ConvGeometry:
        p = self.pad
        return ConvGeometry(self.n, self.c, self.hw, self.hw, self.k, self.rs, self.rs, (self.stride,) * 2,
                            (p, p, p, p), (self.dil,) * 2, self.groups, np.dtype(dtype))

    def with_batch(self, n: int) -> "ConvCase":
        return replace(self, n=n)

    def describe(self) -> str:
        return (f"{self.n}x{self.c}x{self.hw}x{self.hw} * {self.k}x{self.c // self.groups}x{self.rs}x{self.rs}"
                f" s{self.stride} p{self.pad} d{self.dil} g{self.groups}")


@dataclass(frozen=True)
class PoolCase:
    """One pooling layer: ``op`` is "max" or "avg"."""

    name: str
    op: str
    n: int
    c: int
    hw: int
    kernel: int
    stride: int
    pad: int = 0
    kind: str = "pool"

    @property
    def passes(self) -> tuple[str, ...]:
        return POOL_PASSES

    def geometry(self, dtype: Any = np.float32) -> PoolGeometry:
        return PoolGeometry(self.n, self.c, self.hw, self.hw, (self.kernel,) * 2, (self.stride,) * 2,
                            (self.pad,) * 2, (1, 1), False, True, np.dtype(dtype))

    def with_batch(self, n: int) -> "PoolCase":
        return replace(self, n=n)

    def describe(self) -> str:
        return f"{self.op} {self.kernel}x{self.kernel}/{self.stride} pad {self.pad} on {self.n}x{self.c}x{self.hw}x{self.hw}"


@dataclass(frozen=True)
class Corr2dCase:
    """``correlate2d(image, kernel, mode="same")`` of a square image (as conv2d with N=C=K=1)."""

    name: str
    size: int
    ksize: int
    kind: str = "corr2d"
    n: int = 1

    @property
    def passes(self) -> tuple[str, ...]:
        return ("forward",)

    def geometry(self, dtype: Any = np.float32) -> ConvGeometry:
        p = self.ksize // 2
        return ConvGeometry(1, 1, self.size, self.size, 1, self.ksize, self.ksize, (1, 1), (p, p, p, p),
                            (1, 1), 1, np.dtype(dtype))

    def with_batch(self, n: int) -> "Corr2dCase":
        return self

    def describe(self) -> str:
        return f"{self.size}x{self.size} image, {self.ksize}x{self.ksize} kernel, mode='same'"


Case = ConvCase | PoolCase | Corr2dCase

#: the DESIGN.md layer suite, in table order
CONV_CASES = (
    ConvCase("stripe-c1", 400, 1, 16, 8, 3),
    ConvCase("stripe-c2", 400, 8, 8, 16, 3),
    ConvCase("mnist-c1", 64, 1, 28, 32, 3),
    ConvCase("mnist-c2", 64, 32, 14, 64, 3),
    ConvCase("cifar-64", 32, 64, 32, 64, 3),
    ConvCase("vgg-224", 8, 3, 224, 64, 3),
    ConvCase("resnet-stem", 8, 3, 224, 64, 7, stride=2, pad=3),
    ConvCase("pw-1x1", 32, 256, 28, 64, 1, pad=0),
    ConvCase("dw-3x3", 32, 128, 56, 128, 3, groups=128),
    ConvCase("dilated", 16, 64, 56, 64, 3, pad=2, dil=2),
)
POOL_CASES = (
    PoolCase("maxpool-2x2", "max", 64, 32, 28, 2, 2),
    PoolCase("maxpool-3x3s2", "max", 8, 64, 112, 3, 2, pad=1),
    PoolCase("avgpool-2x2", "avg", 64, 32, 28, 2, 2),
)
CORR2D_CASES = (
    Corr2dCase("corr2d-3x3", 1024, 3),
    Corr2dCase("corr2d-7x7", 1024, 7),
)
CASES: tuple[Case, ...] = CONV_CASES + POOL_CASES + CORR2D_CASES
CASES_BY_NAME = {c.name: c for c in CASES}


def conv_op(pass_: str) -> str:
    """The backend op name of a conv pass (what ``default_algorithm`` and the autotuner take)."""
    return {"forward": "conv2d", "backward-input": "conv2d_backward_input",
            "backward-weight": "conv2d_backward_weight"}[pass_]


def work(case: Case, pass_: str, dtype: Any = np.float32) -> tuple[str, float]:
    """("flop", count) for convs: 2*N*K*Ho*Wo*(C/groups)*R*S for every pass; ("byte", count)
    for pools: the bytes the pass must read and write (int64 indices included)."""
    if case.kind in ("conv", "corr2d"):
        return "flop", float(case.geometry(dtype).flops)
    p = case.geometry(dtype)
    item = np.dtype(dtype).itemsize
    n_in, n_out = int(np.prod(p.input_shape)), int(np.prod(p.output_shape))
    index_bytes = 8 * n_out if case.op == "max" else 0
    return "byte", float(item * (n_in + n_out) + index_bytes)


def keep_freed_memory() -> bool:
    """Make glibc's ``malloc`` keep freed memory for reuse in this process; return whether it could.

    By default glibc hands every allocation of more than 128 KiB to ``mmap`` (raising that
    threshold only up to 32 MiB, as large blocks are freed) and returns it to the system on
    ``free``, so that an array allocated per call is page-faulted in, 4 KiB at a time, on
    every call.  PyTorch allocates its outputs that way; NumPy asks for transparent huge
    pages for large arrays and faults far less.  Measured on the development VM, 2 threads:
    ``F.conv2d`` on vgg-224 took 44 ms per call of which 36 ms were page faults (8.8 ms with
    freed memory kept), on resnet-stem 13-15 ms or 5.1 ms depending on what ran before it.
    Timing kernels, not the allocator, both runners call this first (``M_MMAP_THRESHOLD``
    and ``M_TRIM_THRESHOLD`` at 1 GiB; a no-op returning False off glibc).
    """
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # glibc's <malloc.h>
    return bool(mallopt(m_mmap_threshold, 1 << 30)) and bool(mallopt(m_trim_threshold, 1 << 30))


def baseline_available(name: str) -> bool:
    """Whether an external baseline ("torch", "scipy.signal", "scipy.ndimage") can be imported."""
    module = "torch" if name == "torch" else "scipy"
    return importlib.util.find_spec(module) is not None


# --------------------------------------------------------------------------- callables


def _inputs(case: Case, dtype: np.dtype, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)

    def rand(shape):
        return rng.standard_normal(shape, dtype=np.float64).astype(dtype)

    g = case.geometry(dtype)
    if case.kind == "corr2d":
        return {"image": rand((case.size, case.size)), "kernel": rand((case.ksize, case.ksize))}
    arrays = {"x": rand(g.input_shape), "gy": rand(g.output_shape)}
    if case.kind == "conv":
        arrays["w"] = rand(g.weight_shape)
    return arrays


def make_call(case: Case, pass_: str, impl: str, algorithm: str | None = None, dtype: Any = np.float32,
              seed: int = 0) -> Callable[[], Any]:
    """A zero-argument function running ``pass_`` of ``case`` with ``impl`` on fixed
    random inputs (prepared here, outside the timed call).

    Raises ``ValueError`` for a pass the case does not have or an implementation that
    does not cover the case (e.g. scipy for a conv layer).
    """
    dtype = np.dtype(dtype)
    if pass_ not in case.passes:
        raise ValueError(f"{case.name} has no pass {pass_!r}")
    a = _inputs(case, dtype, seed)
    if impl == "torch":
        return _torch_call(case, pass_, a)
    if impl.startswith("scipy."):
        if case.kind != "corr2d":
            raise ValueError(f"{impl} only covers the 2-D correlation cases")
        return _scipy_call(impl, a)
    return _fastconv_call(case, pass_, impl, algorithm, a)


def _fastconv_call(case: Case, pass_: str, backend: str, algorithm: str | None, a: dict) -> Callable[[], Any]:
    import fastconv

    if case.kind == "corr2d":  # what fastconv.correlate2d(mode="same") runs, with a selectable algorithm
        img, ker, p = a["image"][None, None], a["kernel"][None, None], case.ksize // 2
        return lambda: fastconv.conv2d(img, ker, padding=p, backend=backend, algorithm=algorithm)
    if case.kind == "conv":
        x, w, gy = a["x"], a["w"], a["gy"]
        kw = dict(stride=case.stride, padding=case.pad, dilation=case.dil, groups=case.groups,
                  backend=backend, algorithm=algorithm)
        if pass_ == "forward":
            return lambda: fastconv.conv2d(x, w, **kw)
        if pass_ == "backward-input":
            return lambda: fastconv.conv2d_backward(gy, x, w, **kw, need_weight=False, need_bias=False).input
        return lambda: fastconv.conv2d_backward(gy, x, w, **kw, need_input=False, need_bias=False).weight
    x, gy = a["x"], a["gy"]
    kw = dict(kernel_size=case.kernel, stride=case.stride, padding=case.pad, backend=backend)
    if case.op == "max":
        if pass_ == "forward":
            return lambda: fastconv.max_pool2d(x, **kw, return_indices=True)
        _, idx = fastconv.max_pool2d(x, **kw, return_indices=True)
        return lambda: fastconv.max_pool2d_backward(gy, x, **kw, indices=idx)
    if pass_ == "forward":
        return lambda: fastconv.avg_pool2d(x, **kw)
    return lambda: fastconv.avg_pool2d_backward(gy, x.shape, **kw)


def _torch_call(case: Case, pass_: str, a: dict) -> Callable[[], Any]:
    import torch
    import torch.nn.functional as F
    from torch.nn import grad as tgrad

    def no_grad(fn):
        def run():
            with torch.no_grad():
                return fn()
        return run

    t = {k: torch.from_numpy(v) for k, v in a.items()}
    if case.kind == "corr2d":
        img, ker, p = t["image"][None, None], t["kernel"][None, None], case.ksize // 2
        return no_grad(lambda: F.conv2d(img, ker, padding=p))
    if case.kind == "conv":
        x, w, gy = t["x"], t["w"], t["gy"]
        kw = dict(stride=case.stride, padding=case.pad, dilation=case.dil, groups=case.groups)
        if pass_ == "forward":
            return no_grad(lambda: F.conv2d(x, w, None, **kw))
        if pass_ == "backward-input":
            return no_grad(lambda: tgrad.conv2d_input(x.shape, w, gy, **kw))
        return no_grad(lambda: tgrad.conv2d_weight(x, w.shape, gy, **kw))
    x, gy = t["x"], t["gy"]
    k, s, p = [case.kernel] * 2, [case.stride] * 2, [case.pad] * 2
    if case.op == "max":
        if pass_ == "forward":
            return no_grad(lambda: F.max_pool2d(x, k, s, p, return_indices=True))
        _, idx = F.max_pool2d(x, k, s, p, return_indices=True)
        return no_grad(lambda: torch.ops.aten.max_pool2d_with_indices_backward(gy, x, k, s, p, [1, 1], False, idx))
    if pass_ == "forward":
        return no_grad(lambda: F.avg_pool2d(x, k, s, p))
    return no_grad(lambda: torch.ops.aten.avg_pool2d_backward(gy, x, k, s, p, False, True, None))


def _scipy_call(impl: str, a: dict) -> Callable[[], Any]:
    img, ker = a["image"], a["kernel"]
    if impl == "scipy.signal":
        from scipy import signal

        return lambda: signal.correlate2d(img, ker, mode="same")
    if impl == "scipy.ndimage":
        from scipy import ndimage

        return lambda: ndimage.correlate(img, ker, mode="constant", cval=0.0)
    raise ValueError(f"unknown implementation {impl!r}")
