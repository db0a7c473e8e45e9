"""The Cython backend: compiled, GIL-free, OpenMP-parallel kernels.

Kernels live in three extension modules built by ``setup.py``:

* ``_direct``  direct convolution (forward, backward-input, backward-weight, bias gradient),
* ``_im2col``  im2col / col2im + GEMM through ``scipy.linalg.cython_blas``,
* ``_pool``    max and average pooling, forward and backward.

This adapter only allocates outputs and workspaces, splits the batch into
chunks that respect :func:`fastconv._config.get_workspace_limit`, and passes the
validated geometry on.  Importing it fails (and the registry reports the
backend unavailable) when the extensions have not been compiled.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ... import _config
from ..._args import ConvGeometry, PoolGeometry
from ..base import Backend
from . import _direct, _im2col, _pool

#: BLAS takes 32-bit ints: larger GEMM dimensions fall back to the direct kernels
_INT32_MAX = 2**31 - 1


def _conv_args(g: ConvGeometry) -> tuple[int, ...]:
    """(sh, sw, pad_top, pad_left, dh, dw, groups): what every conv kernel takes after its arrays."""
    return (*g.stride, g.padding[0], g.padding[2], *g.dilation, g.groups)


def _is_pointwise(g: ConvGeometry) -> bool:
    """1x1, stride 1, unpadded: the input already is the column matrix."""
    return g.r == g.s == 1 and g.stride == (1, 1) and not any(g.padding)


class _Workspace:
    """Column buffer (C*R*S, nb*P) and transpose buffer (K, nb*P) for chunks of nb images."""

    def __init__(self, g: ConvGeometry) -> None:
        p = g.out_h * g.out_w
        rows = g.c * g.r * g.s
        per_image = (rows + g.k) * p * g.dtype.itemsize
        self.chunk = _config.batch_chunk(per_image, g.n)
        self.col = np.empty(rows * self.chunk * p, g.dtype)
        self.tmp = np.empty(g.k * self.chunk * p, g.dtype)
        self.fits_int32 = max(self.chunk * p, rows, g.k) <= _INT32_MAX

    def chunks(self, n: int):
        """(first image, image count) of every chunk."""
        for n0 in range(0, n, self.chunk):
            yield n0, min(self.chunk, n - n0)


class CythonBackend(Backend):
    """Direct and im2col+BLAS convolutions, and pooling, compiled with Cython."""

    name = "cython"
    algorithms = ("direct", "im2col")

    # ----------------------------------------------------------------- conv
    def conv2d(self, x, weight, bias, g, algorithm):
        out = np.empty(g.output_shape, g.dtype)
        b = np.zeros(g.k, g.dtype) if bias is None else bias
        nt = _config.get_num_threads()
        if algorithm == "im2col" and _is_pointwise(g) and g.c <= _INT32_MAX and g.h * g.w <= _INT32_MAX:
            _im2col.pointwise_forward(x, weight.reshape(g.k, -1), b, out, g.groups)
            return out
        if algorithm == "im2col":
            ws = _Workspace(g)
            if ws.fits_int32:
                for n0, nb in ws.chunks(g.n):
                    _im2col.forward(x, weight.reshape(g.k, -1), b, out, ws.col, ws.tmp, n0, nb, g.r, g.s,
                                    *_conv_args(g), nt)
                return out
        _direct.forward(x, weight, b, out, *_conv_args(g), nt)
        return out

    def conv2d_backward_input(self, grad_out, weight, g, algorithm):
        gx = np.zeros(g.input_shape, g.dtype)
        nt = _config.get_num_threads()
        if algorithm == "im2col" and _is_pointwise(g) and g.c <= _INT32_MAX and g.h * g.w <= _INT32_MAX:
            _im2col.pointwise_backward_input(grad_out, weight.reshape(g.k, -1), gx, g.groups)
            return gx
        if algorithm == "im2col":
            ws = _Workspace(g)
            if ws.fits_int32:
                for n0, nb in ws.chunks(g.n):
                    _im2col.backward_input(grad_out, weight.reshape(g.k, -1), gx, ws.col, ws.tmp, n0, nb,
                                           g.r, g.s, *_conv_args(g), nt)
                return gx
        _direct.backward_input(grad_out, weight, gx, *_conv_args(g), nt)
        return gx

    def conv2d_backward_weight(self, grad_out, x, g, algorithm):
        gw = np.zeros(g.weight_shape, g.dtype)
        nt = _config.get_num_threads()
        if algorithm == "im2col" and _is_pointwise(g) and g.c <= _INT32_MAX and g.h * g.w <= _INT32_MAX:
            _im2col.pointwise_backward_weight(grad_out, x, gw.reshape(g.k, -1), g.groups)
            return gw
        if algorithm == "im2col":
            ws = _Workspace(g)
            if ws.fits_int32:
                for n0, nb in ws.chunks(g.n):
                    _im2col.backward_weight(grad_out, x, gw.reshape(g.k, -1), ws.col, ws.tmp, n0, nb,
                                            g.r, g.s, *_conv_args(g), nt)
                return gw
        _direct.backward_weight(grad_out, x, gw, *_conv_args(g), nt)
        return gw

    def conv2d_backward_bias(self, grad_out, g):
        gb = np.empty(g.k, g.dtype)
        _direct.bias_grad(grad_out, gb, _config.get_num_threads())
        return gb

    # ----------------------------------------------------------------- pools
    def max_pool2d(self, x, p):
        out = np.empty(p.output_shape, p.dtype)
        idx = np.empty(p.output_shape, np.int64)
        _pool.max_forward(x, out, idx, *p.kernel, *p.stride, *p.padding, *p.dilation,
                          _config.get_num_threads())
        return out, idx

    def max_pool2d_backward(self, grad_out, indices, p):
        gx = np.zeros(p.input_shape, p.dtype)
        _pool.max_backward(grad_out, np.ascontiguousarray(indices, np.int64), gx, _config.get_num_threads())
        return gx

    def avg_pool2d(self, x, p):
        out = np.empty(p.output_shape, p.dtype)
        _pool.avg_forward(x, out, *p.kernel, *p.stride, *p.padding, p.count_include_pad,
                          _config.get_num_threads())
        return out

    def avg_pool2d_backward(self, grad_out, p):
        gx = np.zeros(p.input_shape, p.dtype)
        _pool.avg_backward(grad_out, gx, *p.kernel, *p.stride, *p.padding, p.count_include_pad,
                           _config.get_num_threads())
        return gx

    # ----------------------------------------------------------------- selection
    def default_algorithm(self, op: str, g: ConvGeometry) -> str:
        """im2col + GEMM when the reduction C/groups*R*S is long enough to feed a GEMM;
        direct for depthwise convs and few-channel first layers (and single images)."""
        if g.c_per_group * g.r * g.s >= 32 and g.k_per_group >= 8:
            return "im2col"
        return "direct"

    def info(self) -> dict[str, Any]:
        return {"openmp": bool(_direct.OPENMP), "blas": "scipy.linalg.cython_blas",
                "threads": _config.get_num_threads()}
