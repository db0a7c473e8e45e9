"""The cuda backend: numba.cuda kernels behind the common Backend interface.

Importing this module raises (and the registry then reports the backend as
unavailable, with the reason) when numba.cuda cannot run: no CUDA driver or GPU.
``NUMBA_ENABLE_CUDASIM=1`` (set before numba.cuda is first imported) runs the
same kernels in numba's CUDA simulator, which is how the test suite checks them.

Arrays: device arrays in (numba device arrays, or anything exposing
``__cuda_array_interface__``, taken zero-copy) give device arrays out; host NumPy
arrays are copied to the device and the results copied back.  When any argument
is on the device the result stays on the device.  Non-contiguous device inputs
are made C-contiguous by a device-side copy; nothing goes through the host
between chained calls (except a 4-byte error flag read by max_pool2d_backward).

Algorithms: "direct" (output-stationary kernel, input tile + filters in shared
memory; gather kernels for the gradients) and "im2col" (im2col/col2im kernels
plus a tiled shared-memory GEMM, batch processed in chunks bounded by
:func:`fastconv.set_workspace_limit`).
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np

try:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a deprecation notice must not stop the import
        from numba import cuda
except Exception as exc:  # pragma: no cover - numba is a hard dependency
    raise ImportError(f"numba.cuda cannot be imported: {exc}") from exc

if not cuda.is_available():
    raise RuntimeError("no CUDA GPU found (set NUMBA_ENABLE_CUDASIM=1 to use the simulator)")

from ... import _config  # noqa: E402
from ..._args import ConvGeometry, PoolGeometry  # noqa: E402
from ..base import Backend  # noqa: E402
from . import _kernels as K  # noqa: E402

#: most blocks one launch uses; grid-stride loops cover any remaining work
MAX_BLOCKS = 4 if K.SIMULATOR else 65535
#: dynamic shared memory the direct conv kernel may request per block (bytes)
SHARED_LIMIT = 48 * 1024


# --------------------------------------------------------------------------- arrays


def _is_device(a: Any) -> bool:
    return a is not None and not isinstance(a, np.ndarray)


def _to_device(a: Any) -> Any:
    """A device array for ``a``: host arrays are copied in, device arrays taken zero-copy;
    4-D device arrays that are not C-contiguous are copied into a contiguous one."""
    if a is None:
        return None
    if isinstance(a, np.ndarray):
        return cuda.to_device(np.ascontiguousarray(a))
    if not getattr(a, "__cuda_ndarray__", False):  # CuPy, PyTorch, ...: wrap without a copy
        if not hasattr(cuda, "as_cuda_array"):  # pragma: no cover - the simulator lacks it
            raise TypeError(f"cuda backend: cannot use {type(a).__name__} arrays under the simulator")
        a = cuda.as_cuda_array(a)
    if a.ndim == 4 and not a.is_c_contiguous():
        dense = cuda.device_array(tuple(a.shape), dtype=a.dtype)
        _launch_1d(K.kernels("float32").copy4d, dense.size, a, dense)  # generic: any dtype
        a = dense
    return a


def _launch_1d(kernel, work: int, *args: Any) -> None:
    kernel[K.blocks_for(work, K.THREADS, MAX_BLOCKS), K.THREADS](*args)


def _zeros(shape: tuple[int, ...], dtype: np.dtype) -> Any:
    """A zero-filled device array (filled by a kernel: nothing is copied from the host)."""
    out = cuda.device_array(shape, dtype=dtype)
    _launch_1d(K.kernels("float32").fill, out.size, out.reshape(out.size), dtype.type(0))  # generic
    return out


class _Io:
    """Moves one call's arguments to the device and its results back where they came from."""

    def __init__(self, *arrays: Any) -> None:
        self.to_host = not any(_is_device(a) for a in arrays)
        self.arrays = [_to_device(a) for a in arrays]

    def result(self, out: Any) -> Any:
        return out.copy_to_host() if self.to_host else out


# --------------------------------------------------------------------------- backend


class CudaBackend(Backend):
    """numba.cuda kernels; runs under the CUDA simulator when NUMBA_ENABLE_CUDASIM=1."""

    name = "cuda"
    algorithms = ("direct", "im2col")
    device = True

    # ------------------------------------------------------------ forward
    def conv2d(self, x, weight, bias, g: ConvGeometry, algorithm: str):
        io = _Io(x, weight, bias)
        x, weight, bias = io.arrays
        kern = K.kernels(g.dtype.name)
        out = cuda.device_array(g.output_shape, dtype=g.dtype)
        has_bias = bias is not None
        if not has_bias:
            bias = cuda.device_array(1, dtype=g.dtype)
        tile = _direct_tile(g) if algorithm == "direct" else None
        if tile is not None:
            (tw, th), patch_h, patch_w, shared = tile
            kblocks = -(-g.k_per_group // K.KB)
            items = g.n * g.groups * kblocks * -(-g.out_h // th) * -(-g.out_w // tw)
            grid = min(items, MAX_BLOCKS)
            kern.conv_direct[grid, (tw, th), 0, shared](
                x, weight, bias, out, has_bias, K.geometry_tuple(g), patch_h, patch_w, items)
            return io.result(out)
        # im2col (also the fallback when a huge kernel's patch does not fit in shared memory)
        geo = K.geometry_tuple(g)
        for i0, m, cols, tmp in _im2col_chunks(g):
            _launch_1d(kern.im2col, cols.size, x[i0:i0 + m], cols, geo)
            _gemm(kern, _per_group(weight, g), _per_group(cols, g), _per_group(tmp, g), False, False, False)
            _launch_1d(kern.swap01, tmp.size, tmp, out[i0:i0 + m].reshape(m, g.k, -1), bias, has_bias)
        return io.result(out)

    # ------------------------------------------------------------ gradients
    def conv2d_backward_input(self, grad_out, weight, g: ConvGeometry, algorithm: str):
        io = _Io(grad_out, weight)
        gy, weight = io.arrays
        kern = K.kernels(g.dtype.name)
        geo = K.geometry_tuple(g)
        gx = cuda.device_array(g.input_shape, dtype=g.dtype)
        if algorithm == "direct":
            _launch_1d(kern.conv_backward_input_direct, gx.size, gy, weight, gx, geo)
            return io.result(gx)
        for i0, m, cols, gyt in _im2col_chunks(g):
            _channel_major(kern, gy[i0:i0 + m], gyt)
            _gemm(kern, _per_group(weight, g), _per_group(gyt, g), _per_group(cols, g), True, False, False)
            _launch_1d(kern.col2im, gx[i0:i0 + m].size, cols, gx[i0:i0 + m], geo)
        return io.result(gx)

    def conv2d_backward_weight(self, grad_out, x, g: ConvGeometry, algorithm: str):
        io = _Io(grad_out, x)
        gy, x = io.arrays
        kern = K.kernels(g.dtype.name)
        geo = K.geometry_tuple(g)
        gw = cuda.device_array(g.weight_shape, dtype=g.dtype)
        if algorithm == "direct":
            grid = min(gw.size, MAX_BLOCKS)
            kern.conv_backward_weight_direct[grid, K.THREADS](gy, x, gw, geo, g.n)
            return io.result(gw)
        for i0, m, cols, gyt in _im2col_chunks(g):
            _launch_1d(kern.im2col, cols.size, x[i0:i0 + m], cols, geo)
            _channel_major(kern, gy[i0:i0 + m], gyt)
            _gemm(kern, _per_group(gyt, g), _per_group(cols, g), _per_group(gw, g), False, True, i0 > 0)
        return io.result(gw)

    def conv2d_backward_bias(self, grad_out, g: ConvGeometry):
        io = _Io(grad_out)
        (gy,) = io.arrays
        gb = cuda.device_array(g.k, dtype=g.dtype)
        K.kernels(g.dtype.name).channel_sum[min(g.k, MAX_BLOCKS), K.THREADS](gy, gb)
        return io.result(gb)

    # ------------------------------------------------------------ pools
    def max_pool2d(self, x, p: PoolGeometry):
        io = _Io(x)
        (x,) = io.arrays
        out = cuda.device_array(p.output_shape, dtype=p.dtype)
        idx = cuda.device_array(p.output_shape, dtype=np.int64)
        _launch_1d(K.kernels(p.dtype.name).max_pool, out.size, x, out, idx, K.pool_tuple(p))
        return io.result(out), io.result(idx)

    def max_pool2d_backward(self, grad_out, indices, p: PoolGeometry):
        io = _Io(grad_out, indices)
        gy, idx = io.arrays
        gx = _zeros(p.input_shape, p.dtype)
        bad = _zeros((1,), np.dtype(np.int32))
        _launch_1d(K.kernels(p.dtype.name).max_pool_backward, gy.size, gy, idx, gx.reshape(gx.size),
                   p.h * p.w, bad)
        if bad.copy_to_host()[0]:
            raise ValueError(f"max_pool2d_backward(): indices must lie in [0, {p.h * p.w}) for input planes "
                             f"of {p.h} x {p.w}; the device indices array holds values outside that range")
        return io.result(gx)

    def avg_pool2d(self, x, p: PoolGeometry):
        io = _Io(x)
        (x,) = io.arrays
        out = cuda.device_array(p.output_shape, dtype=p.dtype)
        _launch_1d(K.kernels(p.dtype.name).avg_pool, out.size, x, out, K.pool_tuple(p), p.count_include_pad)
        return io.result(out)

    def avg_pool2d_backward(self, grad_out, p: PoolGeometry):
        io = _Io(grad_out)
        (gy,) = io.arrays
        gx = cuda.device_array(p.input_shape, dtype=p.dtype)
        _launch_1d(K.kernels(p.dtype.name).avg_pool_backward, gx.size, gy, gx, K.pool_tuple(p),
                   p.count_include_pad)
        return io.result(gx)

    # ------------------------------------------------------------ selection
    def default_algorithm(self, op: str, g: ConvGeometry) -> str:
        """Untuned heuristic (never timed on a GPU): the direct kernels for grouped /
        depthwise convs and for forward passes whose tile fits in shared memory,
        im2col + GEMM otherwise."""
        if g.groups > 1 and g.c_per_group * g.k_per_group <= 16:
            return "direct"
        if op == "conv2d" and _direct_tile(g) is not None:
            return "direct"
        return "im2col"

    def info(self) -> dict[str, Any]:
        try:
            device = cuda.get_current_device().name
            device = device.decode() if isinstance(device, bytes) else str(device)
        except Exception as exc:  # pragma: no cover - reported, not fatal
            device = f"unknown ({exc})"
        return {"device": device, "simulator": K.SIMULATOR,
                "numba_cuda": getattr(cuda, "implementation", "unknown")}


# --------------------------------------------------------------------------- launch helpers


def _direct_tile(g: ConvGeometry):
    """Block shape, input patch and shared bytes of the direct kernel, shrinking the
    output tile until the patch fits in shared memory; None when even a 1 x 1 tile
    does not fit (huge dilated kernels), in which case im2col is used."""
    tw, th = K.DIRECT_BLOCK
    while True:
        patch_h = (th - 1) * g.stride[0] + (g.r - 1) * g.dilation[0] + 1
        patch_w = (tw - 1) * g.stride[1] + (g.s - 1) * g.dilation[1] + 1
        shared = (patch_h * patch_w + K.KB * g.r * g.s) * g.dtype.itemsize
        if shared <= SHARED_LIMIT:
            return (tw, th), patch_h, patch_w, shared
        if tw == th == 1:
            return None
        tw, th = max(1, tw // 2), max(1, th // 2)


def _im2col_chunks(g: ConvGeometry):
    """The batch chunks of the im2col algorithm, sized by :func:`fastconv._config.batch_chunk`.

    Yields ``(i0, m, cols, tmp)`` for each chunk of ``m`` images starting at ``i0``:
    ``cols`` a (C*R*S, m*P) column buffer and ``tmp`` a (K, m, P) buffer (P = out_h*out_w),
    both views of two workspaces allocated once for the whole batch.
    """
    p, crs = g.out_h * g.out_w, g.c * g.r * g.s
    nb = _config.batch_chunk((crs + g.k) * p * g.dtype.itemsize, g.n)
    cols_buf = cuda.device_array(crs * nb * p, dtype=g.dtype)
    tmp_buf = cuda.device_array(g.k * nb * p, dtype=g.dtype)
    for i0 in range(0, g.n, nb):
        m = min(nb, g.n - i0)
        yield i0, m, cols_buf[:crs * m * p].reshape(crs, m * p), tmp_buf[:g.k * m * p].reshape(g.k, m, p)


def _per_group(a, g: ConvGeometry):
    """``a`` viewed as (groups, rows per group, rest) along its first axis: one GEMM operand per group."""
    return a.reshape(g.groups, a.shape[0] // g.groups, -1)


def _channel_major(kern, gy, gyt) -> None:
    """gyt (K, m, P) = grad_out chunk gy (m, K, Ho, Wo) with its first two axes swapped."""
    m, k = gy.shape[0], gy.shape[1]
    _launch_1d(kern.swap01, gyt.size, gy.reshape(m, k, -1), gyt, gyt.reshape(-1), False)


def _gemm(kern, a, b, c, trans_a: bool, trans_b: bool, accumulate: bool) -> None:
    z, m, n = (int(d) for d in c.shape)
    t, edge = K.TILE, K.TILE * K.REG
    grid = (min(-(-n // edge), MAX_BLOCKS), min(-(-m // edge), MAX_BLOCKS), min(z, MAX_BLOCKS))
    kern.gemm[grid, (t, t)](a, b, c, trans_a, trans_b, accumulate)
