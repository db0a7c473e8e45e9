"""The numba backend: ``@njit(parallel=True)`` kernels, direct loops and im2col + BLAS.

Importing this package imports numba but compiles nothing.  Each kernel is compiled
(or loaded from numba's on-disk cache, ``cache=True``) the first time it runs with a
given dtype; :func:`compile_times` reports how long that took per kernel, so a
benchmark can separate compile time from run time.

Algorithms
----------
direct
    Loops over output rows (forward), input rows (backward-input) or filter planes
    (backward-weight) with the padding handled by index ranges, never materialised.
im2col
    Unfold a chunk of the batch into a (C*R*S, nb*Ho*Wo) column matrix, multiply by the
    weights with numpy's matmul (BLAS), and scatter back (col2im) for backward-input.
    The chunk size comes from :func:`fastconv._config.batch_chunk`, so the workspace
    stays within :func:`fastconv.set_workspace_limit`.
"""

from __future__ import annotations

import threading
import time
from typing import Any, Callable

import numba
import numpy as np

from ... import _config
from ..._args import ConvGeometry, PoolGeometry
from ..base import Backend
from . import _kernels

_lock = threading.Lock()
_compile_seconds: dict[str, float] = {}
_serial_lock = threading.Lock()  # only used with numba's non-threadsafe "workqueue" layer


def compile_times() -> dict[str, float]:
    """Seconds spent compiling (or loading from the cache) each kernel specialisation so far.

    Returns
    -------
    dict
        ``{"kernel[float32]": seconds, ...}`` for every kernel/dtype pair this process
        has run; the time is measured around ``Dispatcher.compile`` and excludes the run.
    """
    return dict(_compile_seconds)


def _readonly(a: np.ndarray) -> np.ndarray:
    view = a.view()
    view.flags.writeable = False
    return view


def _kernel(name: str, n_inputs: int) -> Callable[..., None]:
    """Return a caller of ``_kernels.<name>`` that compiles it explicitly, and times
    the compilation, the first time each argument-type signature is seen.

    The first ``n_inputs`` arguments are the kernel's input arrays; they are passed as
    read-only views so that writable and read-only caller arrays share one
    specialisation per dtype.
    """
    dispatcher = getattr(_kernels, name)

    def call(*args: Any) -> None:
        args = tuple(_readonly(a) for a in args[:n_inputs]) + args[n_inputs:]
        sig = tuple(numba.typeof(a) for a in args)
        if sig not in dispatcher.overloads:
            with _lock:
                if sig not in dispatcher.overloads:
                    start = time.perf_counter()
                    dispatcher.compile(sig)
                    _compile_seconds[f"{name}[{args[0].dtype}]"] = time.perf_counter() - start
        numba.set_num_threads(max(1, min(_config.get_num_threads(), numba.config.NUMBA_NUM_THREADS)))
        if _threadsafe():
            dispatcher(*args)
        else:
            with _serial_lock:
                dispatcher(*args)

    call.__name__ = name
    return call


def _threadsafe() -> bool:
    """Whether numba's threading layer may run parallel kernels from several threads at once."""
    try:
        return numba.threading_layer() != "workqueue"
    except ValueError:  # no parallel kernel has run yet: be careful
        return False


_conv2d_direct = _kernel("conv2d_direct", 3)
_conv2d_backward_input_direct = _kernel("conv2d_backward_input_direct", 2)
_conv2d_backward_weight_direct = _kernel("conv2d_backward_weight_direct", 2)
_im2col = _kernel("im2col", 1)
_col2im = _kernel("col2im", 1)
_max_pool2d = _kernel("max_pool2d", 1)
_max_pool2d_backward = _kernel("max_pool2d_backward", 2)
_avg_pool2d = _kernel("avg_pool2d", 1)
_avg_pool2d_backward = _kernel("avg_pool2d_backward", 1)


def _conv_params(g: ConvGeometry) -> tuple[int, ...]:
    """The geometry scalars every conv kernel takes: sh, sw, top, left, dh, dw."""
    return (g.stride[0], g.stride[1], g.padding[0], g.padding[2], g.dilation[0], g.dilation[1])


def _chunks(g: ConvGeometry, extra_rows: int):
    """Batch chunks (n0, nb) whose column matrix plus ``extra_rows`` rows of GEMM output fit
    the workspace limit."""
    ll = g.out_h * g.out_w
    per_image = (g.c * g.r * g.s + extra_rows) * ll * np.dtype(g.dtype).itemsize
    step = _config.batch_chunk(per_image, g.n)
    for n0 in range(0, g.n, step):
        yield n0, min(step, g.n - n0)


def _groups(g: ConvGeometry):
    """(column-row slice, filter slice) of every group."""
    crs = g.c_per_group * g.r * g.s
    for grp in range(g.groups):
        yield slice(grp * crs, (grp + 1) * crs), slice(grp * g.k_per_group, (grp + 1) * g.k_per_group)


def _to_rows(a: np.ndarray, n0: int, nb: int) -> np.ndarray:
    """(nb, K, Ho, Wo) batch slice -> (K, nb*Ho*Wo) C-contiguous matrix."""
    n, k = a.shape[:2]
    return np.ascontiguousarray(a[n0:n0 + nb].reshape(nb, k, -1).transpose(1, 0, 2)).reshape(k, -1)


class NumbaBackend(Backend):
    """Numba kernels (see the module docstring)."""

    name = "numba"
    algorithms = ("direct", "im2col")

    # ------------------------------------------------------------------ selection
    def default_algorithm(self, op: str, g: ConvGeometry) -> str:
        """im2col when the GEMM is big enough to pay for the unfolding, direct otherwise
        (few input channels per group, depthwise, single 2-D images)."""
        if g.c_per_group * g.r * g.s >= 32 and g.k_per_group >= 8:
            return "im2col"
        return "direct"

    # ------------------------------------------------------------------ conv
    def conv2d(self, x, weight, bias, g, algorithm):
        out = np.empty(g.output_shape, dtype=g.dtype)
        b = np.zeros(g.k, dtype=g.dtype) if bias is None else bias
        if algorithm == "direct":
            _conv2d_direct(x, weight, b, out, *_conv_params(g), g.groups)
            return out
        ll = g.out_h * g.out_w
        wmat = weight.reshape(g.k, -1)
        for n0, nb in _chunks(g, g.k):
            cols = np.empty((g.c * g.r * g.s, nb * ll), dtype=g.dtype)
            _im2col(x, n0, cols, g.r, g.s, *_conv_params(g), g.out_h, g.out_w)
            res = np.empty((g.k, nb * ll), dtype=g.dtype)
            for cs, ks in _groups(g):
                np.matmul(wmat[ks], cols[cs], out=res[ks])
            out[n0:n0 + nb] = res.reshape(g.k, nb, g.out_h, g.out_w).transpose(1, 0, 2, 3)
        if bias is not None:
            out += bias[None, :, None, None]
        return out

    def conv2d_backward_input(self, grad_out, weight, g, algorithm):
        gx = np.empty(g.input_shape, dtype=g.dtype)
        if algorithm == "direct":
            _conv2d_backward_input_direct(grad_out, weight, gx, *_conv_params(g), g.groups)
            return gx
        ll = g.out_h * g.out_w
        wmat = weight.reshape(g.k, -1)
        for n0, nb in _chunks(g, g.k):
            gy = _to_rows(grad_out, n0, nb)
            cols = np.empty((g.c * g.r * g.s, nb * ll), dtype=g.dtype)
            for cs, ks in _groups(g):
                np.matmul(wmat[ks].T, gy[ks], out=cols[cs])
            _col2im(cols, gx, n0, g.r, g.s, *_conv_params(g), g.out_h, g.out_w)
        return gx

    def conv2d_backward_weight(self, grad_out, x, g, algorithm):
        gw = np.empty(g.weight_shape, dtype=g.dtype)
        if algorithm == "direct":
            _conv2d_backward_weight_direct(grad_out, x, gw, *_conv_params(g), g.groups)
            return gw
        ll = g.out_h * g.out_w
        acc = np.zeros((g.k, g.c_per_group * g.r * g.s))  # float64 sum over chunks
        part = np.empty(acc.shape, dtype=g.dtype)
        for n0, nb in _chunks(g, g.k):
            gy = _to_rows(grad_out, n0, nb)
            cols = np.empty((g.c * g.r * g.s, nb * ll), dtype=g.dtype)
            _im2col(x, n0, cols, g.r, g.s, *_conv_params(g), g.out_h, g.out_w)
            for cs, ks in _groups(g):
                np.matmul(gy[ks], cols[cs].T, out=part[ks])
            acc += part
        gw[...] = acc.reshape(g.weight_shape)
        return gw

    # ------------------------------------------------------------------ pools
    def max_pool2d(self, x, p):
        out = np.empty(p.output_shape, dtype=p.dtype)
        idx = np.empty(p.output_shape, dtype=np.int64)
        _max_pool2d(x, out, idx, *p.kernel, *p.stride, *p.padding, *p.dilation)
        return out, idx

    def max_pool2d_backward(self, grad_out, indices, p):
        gx = np.empty(p.input_shape, dtype=p.dtype)
        _max_pool2d_backward(grad_out, np.ascontiguousarray(indices, dtype=np.int64), gx)
        return gx

    def avg_pool2d(self, x, p):
        out = np.empty(p.output_shape, dtype=p.dtype)
        _avg_pool2d(x, out, *p.kernel, *p.stride, *p.padding, p.count_include_pad)
        return out

    def avg_pool2d_backward(self, grad_out, p):
        gx = np.empty(p.input_shape, dtype=p.dtype)
        _avg_pool2d_backward(grad_out, gx, *p.kernel, *p.stride, *p.padding, p.count_include_pad)
        return gx

    # ------------------------------------------------------------------ info
    def info(self) -> dict[str, Any]:
        try:
            layer = numba.threading_layer()
        except ValueError:
            layer = f"not chosen yet (configured: {numba.config.THREADING_LAYER})"
        return {
            "numba_version": numba.__version__,
            "threading_layer": layer,
            "max_threads": numba.config.NUMBA_NUM_THREADS,
            "compile_seconds": compile_times(),
        }
