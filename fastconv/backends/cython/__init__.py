"""The Cython backend: compiled, GIL-free, OpenMP-parallel kernels.

Kernels live in three extension modules built by ``setup.py``:

* ``_direct``  direct convolution (forward, backward-input, backward-weight, bias gradient),
* ``_im2col``  im2col / col2im + GEMM through ``scipy.linalg.cython_blas``,
* ``_winograd`` Winograd F(m x m, 3 x 3) for 3x3 stride-1 convolutions (transforms +
  per-thread GEMMs; the maths is in ``fastconv/_winograd.py``),
* ``_pool``    max and average pooling, forward and backward.

This adapter only allocates outputs and workspaces, splits the batch into
chunks that respect :func:`fastconv._config.get_workspace_limit`, and passes the
validated geometry on.  Importing it fails (and the registry reports the
backend unavailable) when the extensions have not been compiled.
"""

from __future__ import annotations

import contextlib
from typing import Any

import numpy as np

from ... import _config
from ..._args import ConvGeometry
from ..._buffers import aligned_rows
from .._winograd_passes import WinogradPasses
from ..base import (SERIAL_WORK, Backend, BlockedLayout, BlockedWeightLayout, blas_is_narrower,
                    blocked_layout, blocked_runs, blocked_weight_gradient, blocked_weight_layout,
                    blocked_weights_shape, flat3x3_buffers, flat3x3_preferred, input_grad_kernel, is_pointwise,
                    small_gemm_rows, sum_partials)
from ... import _winograd as wino
from . import _direct, _im2col, _pool, _winograd

import scipy.linalg  # noqa: F401  (loads the BLAS behind cython_blas, so the thread limit reaches it)

_config.apply_blas_limit()

#: BLAS takes 32-bit ints: larger GEMM dimensions fall back to the direct kernels
_INT32_MAX = 2**31 - 1


def _threads(work: int) -> int:
    """The OpenMP thread count for a kernel doing about ``work`` elementary operations."""
    return 1 if work < SERIAL_WORK else _config.get_num_threads()


def _conv_args(g: ConvGeometry) -> tuple[int, ...]:
    """(sh, sw, pad_top, pad_left, dh, dw, groups): what every conv kernel takes after its arrays."""
    return (*g.stride, g.padding[0], g.padding[2], *g.dilation, g.groups)


@contextlib.contextmanager
def _blas_for(nt: int, n: int):
    """Yield the OpenMP thread count for a loop over ``n`` images that each call GEMM:
    ``nt`` with BLAS pinned to one thread when there are enough images, else 1 (BLAS threads)."""
    if nt > 1 and n >= nt:
        with _config.single_threaded_blas():
            yield nt
    else:
        yield 1


#: "auto" picks Winograd from this many channels per group, in and out, where the blocked
#: direct kernel does not run, and from WINOGRAD_MIN_CHANNELS_BLOCKED where it does
#: (see default_algorithm)
WINOGRAD_MIN_CHANNELS = 8
WINOGRAD_MIN_CHANNELS_BLOCKED = 16
#: ... and from this many where the BLAS runs narrower vectors than the tiles (NARROW_BLAS)
WINOGRAD_MIN_CHANNELS_NARROW_BLAS = 128
#: ... and, where the blocked direct kernel runs, only for passes of at least this many tiles
#: (:func:`fastconv._winograd.enough_tiles`) ...
WINOGRAD_MIN_TILES_BLOCKED = 512
#: ... or of WINOGRAD_MIN_TILES_WIDE from WINOGRAD_WIDE_CHANNELS channels per group in and out.
#: 2-core Zen 4, 2 threads, float32, direct / Winograd time (forward, input gradient, weight
#: gradient), with the compiled weight transforms: 16-32 channels, 64-196 tiles 0.54-1.06;
#: 64-128 channels, 49-392 tiles 1.07-2.0 (1x128x28: 1.25, 1.52, 7.3); 256 channels, 16 tiles
#: (one 14x14 image) 0.47-0.59, 32 tiles 0.93-1.12, 64 tiles 1.03-1.04 (forward and input);
#: with OpenBLAS pinned to Haswell kernels (the narrow-BLAS rule: from 128 channels) 128
#: channels, 49 tiles 1.07-9.7.  (The rule of 512 tiles alone came from a Zen 5 where the
#: weight transforms were still NumPy's, a fixed cost of about 1 ms per 128-channel pass: one
#: image of 128 channels on 28x28 measured 0.19 there.)
WINOGRAD_WIDE_CHANNELS = 64
WINOGRAD_MIN_TILES_WIDE = 48
#: where it does, pointwise weight gradients run im2col from this many weights per group (not
#: :data:`fastconv.backends.base.POINTWISE_GEMM_WEIGHTS`)
POINTWISE_GEMM_WEIGHTS_NARROW_BLAS = 65536

#: a thread's GEMM should have at least this many columns (images are grouped until it does)
_MIN_GEMM_COLUMNS = 1024
#: a thread's column block (C*R*S x rows*Wo) of one large image stays under this (half of L2)
_COLUMN_BLOCK_BYTES = 1 << 19


class _ThreadBuffers:
    """Private buffers for ``threads`` OpenMP threads that each take chunks of ``chunk`` images:
    ``cols`` (threads, C*R*S * chunk*P) and ``tmps`` (threads, K * chunk*P).  With one image per
    chunk, its output rows are lowered ``rows`` at a time, so that a column block stays within
    :data:`_COLUMN_BLOCK_BYTES` (L2); for the input gradient (``op="input"``) also within
    OpenBLAS's small-matrix GEMMs (:func:`~fastconv.backends.base.small_gemm_rows`), and
    ``tmps`` then holds a block's K output-gradient rows too, gathered for its GEMM (otherwise
    it is only needed when chunk > 1).  Everything together stays within the workspace
    limit, except that one block of rows per thread (and at least one thread) is always allowed."""

    def __init__(self, g: ConvGeometry, nt: int, op: str = "forward") -> None:
        p, rows = g.out_h * g.out_w, g.c * g.r * g.s
        limit = _config.get_workspace_limit()
        itemsize = g.dtype.itemsize
        chunk = max(1, -(-_MIN_GEMM_COLUMNS // p))
        self.rows = g.out_h
        gather = op == "input"  # tmps holds a chunk's or row block's output gradients
        if chunk == 1:  # large images: blocks of output rows
            self.rows = max(1, min(g.out_h, _COLUMN_BLOCK_BYTES // (rows * g.out_w * itemsize)))
            if gather and (small := small_gemm_rows(g)) is not None:
                self.rows = max(1, min(self.rows, small))
        block = (rows + (g.k if gather else 0)) * self.rows * g.out_w * itemsize
        self.threads = _config.batch_chunk(block, min(nt, g.n))
        chunk = max(1, min(chunk, -(-g.n // self.threads)))
        while chunk > 1 and self.threads * (rows + g.k) * chunk * p * itemsize > limit:
            chunk -= 1
        self.chunk = chunk
        width = chunk * p if chunk > 1 else self.rows * g.out_w  # GEMM columns of a chunk or row block
        self.cols = aligned_rows(self.threads, rows * width, g.dtype)
        self.tmps = aligned_rows(self.threads, g.k * width if chunk > 1 or gather else 1, g.dtype)


class _Workspace:
    """Column buffer (C*R*S, nb*P) and transpose buffer (K, nb*P) for chunks of nb images."""

    def __init__(self, g: ConvGeometry) -> None:
        p = g.out_h * g.out_w
        rows = g.c * g.r * g.s
        self.chunk = min(_config.batch_chunk((rows + g.k) * p * g.dtype.itemsize, g.n), _INT32_MAX // p)
        self.col = np.empty(rows * self.chunk * p, g.dtype)
        self.tmp = np.empty(g.k * self.chunk * p, g.dtype)

    def chunks(self, n: int):
        """(first image, image count) of every chunk."""
        for n0 in range(0, n, self.chunk):
            yield n0, min(self.chunk, n - n0)


def _flat3x3(out_h: int, out_w: int, g: ConvGeometry, cin: int, nt: int) -> tuple[np.ndarray, np.ndarray] | None:
    """The buffers of ``_direct.forward3x3`` (see :func:`fastconv.backends.base.flat3x3_buffers`)."""
    return flat3x3_buffers(out_h, out_w, g, cin, nt, _direct.FLAT_SEGMENT, _config.get_workspace_limit())


def _blocked_plan(op: str, g: ConvGeometry) -> BlockedLayout | None:
    """How ``_direct.forward_blocked`` runs ``op``, or None when it should not (see
    :func:`fastconv.backends.base.blocked_layout`)."""
    return blocked_layout(op, g, _threads(g.flops // 2), _direct.BLOCKED_TILE[1], _config.get_workspace_limit(),
                          split=_direct.BLOCKED_TILE[0])


def _run_blocked(x: np.ndarray, weight: np.ndarray, bias: np.ndarray, out: np.ndarray, lay: BlockedLayout,
                 g: ConvGeometry, pads: tuple[int, int], rotate: bool = False) -> None:
    """``_direct.forward_blocked`` with the layer's ``weight``, rotated for the input gradient
    (``rotate``: see :func:`fastconv.backends.base.blocked_weights_shape`)."""
    wt = np.empty(blocked_weights_shape(g, rotate, _direct.BLOCKED_TILE[0]), g.dtype)
    _direct.blocked_weights(weight, wt, g.groups, rotate, _threads(weight.size))
    _direct.forward_blocked(x, wt, bias, out, lay.buffer(g.dtype), lay.offsets(g), lay.plane, g.r, g.s,
                            *lay.stride, *pads, *g.dilation, g.groups, lay.in_place, lay.parts)


#: float32 weight gradients with more flat outputs per plane than this (and a multiple of the
#: wide tile's lanes) run ``_direct.backward_weight_blocked``'s wide tile, where the build has
#: one (see ``_tile.h``: on a 2-core Xeon, vgg-224's 224x224 planes 1.05-1.3x faster,
#: resnet-stem's 112x112 1.4x on one thread; 28x28 and smaller planes 5-11% slower) ...
WIDE_WEIGHT_MIN_OUTPUTS = 2048


def wide_tile_on_every_plane(cpu_name: str) -> bool:
    """Whether the wide float32 weight-gradient tile should run on planes of every size on the
    CPU that LLVM names ``cpu_name``: AMD Zen 5 and later (``znver5``, ...).  On a 2-core Zen 5
    it beat the 8-lane tile in 20 of 21 alternating rounds over seven layers, small planes
    included (mnist-c2's 14x14, not a multiple of its lanes: 142 -> 167-176 GFLOP/s; cifar-64
    1.5x; stripe-c1 and mnist-c1 1.2-1.5x); on the Xeon above it lost on small planes."""
    family = cpu_name.removeprefix("znver")
    return family != cpu_name and family.isdigit() and int(family) >= 5


def _host_cpu_name() -> str:
    """The host CPU as LLVM names it (llvmlite comes with numba), or "" where that fails."""
    try:
        from llvmlite import binding
        return binding.get_host_cpu_name()
    except Exception:  # pragma: no cover - llvmlite missing or broken
        return ""


#: ... and on every plane on the CPUs of :func:`wide_tile_on_every_plane` (None until the first
#: weight gradient asks: :func:`_wide_weight_every_plane`)
WIDE_WEIGHT_EVERY_PLANE: bool | None = None


def _wide_weight_every_plane() -> bool:
    """:data:`WIDE_WEIGHT_EVERY_PLANE`, found out on first use (llvmlite's import takes ~30 ms)."""
    global WIDE_WEIGHT_EVERY_PLANE
    if WIDE_WEIGHT_EVERY_PLANE is None:
        WIDE_WEIGHT_EVERY_PLANE = wide_tile_on_every_plane(_host_cpu_name())
    return WIDE_WEIGHT_EVERY_PLANE


def _weight_tile(g: ConvGeometry) -> tuple[int, int, int]:
    """(channels, taps, lanes) of the weight-gradient tile ``_direct.backward_weight_blocked`` runs for ``g``."""
    wj, wq, lanes = _direct.BLOCKED_WEIGHT_TILE
    wide, outputs = _direct.BLOCKED_WEIGHT_WIDE_LANES, g.out_h * g.out_w
    if wide and g.dtype == np.float32 and (
            _wide_weight_every_plane() or outputs > WIDE_WEIGHT_MIN_OUTPUTS and outputs % wide == 0):
        lanes = wide
    return wj, wq, lanes


#: tile steps per call of the blocked weight gradient's register tiles: planes with fewer go in
#: chunks of several images (``fastconv.backends.base.BLOCKED_CHUNK_CACHE_BYTES``), so that
#: the tiles' loads and stores of their 24 accumulators weigh less
WEIGHT_TILE_MIN_STEPS = 32


def _blocked_weight_layout(g: ConvGeometry) -> BlockedWeightLayout | None:
    """How ``_direct.backward_weight_blocked`` runs, or None when it should not (see
    :func:`fastconv.backends.base.blocked_weight_layout`)."""
    return blocked_weight_layout(g, _threads(g.flops // 2), _weight_tile(g), _config.get_workspace_limit(),
                                 _direct.BLOCKED_WEIGHT_TILE[2], WEIGHT_TILE_MIN_STEPS)


def _blocked_weight(grad_out: np.ndarray, x: np.ndarray, g: ConvGeometry) -> np.ndarray | None:
    """The weight gradient from ``_direct.backward_weight_blocked``, or None (see
    :func:`fastconv.backends.base.blocked_weight_gradient`)."""
    def kernel(gw, partial, xs, gs, lay):
        _direct.backward_weight_blocked(grad_out, x, gw, partial, xs, gs, lay.offsets, lay.chunk, lay.plane, g.r,
                                        g.s, *g.stride, g.padding[0], g.padding[2], *g.dilation, g.groups,
                                        _weight_tile(g)[2])

    return blocked_weight_gradient(kernel, _blocked_weight_layout(g), g)


#: whether ``default_algorithm`` should favour the direct kernels (see
#: :func:`fastconv.backends.base.blas_is_narrower`; None until it first asks: :func:`_narrow_blas`)
NARROW_BLAS: bool | None = None


def _narrow_blas() -> bool:
    """:data:`NARROW_BLAS`, found out on first use from the core each loaded OpenBLAS runs
    kernels for (none known where threadpoolctl cannot tell: the usual rules then hold)."""
    global NARROW_BLAS
    if NARROW_BLAS is None:
        NARROW_BLAS = blas_is_narrower(bool(_direct.BLOCKED_WEIGHT_WIDE_LANES), _config.openblas_cores())
    return NARROW_BLAS


class CythonBackend(WinogradPasses, Backend):
    """Direct and im2col+BLAS convolutions, and pooling, compiled with Cython."""

    name = "cython"
    algorithms = ("direct", "im2col", "winograd")
    #: how im2col spreads work over threads: "auto", "threads" (OpenMP threads each take
    #: chunks of images and run single-threaded GEMMs) or "batched" (one multi-threaded GEMM
    #: per chunk, with the copies single-threaded so that BLAS's spinning workers never compete
    #: with OpenMP's).  Measured on the 2-core box, "threads" wins whenever there are at least
    #: as many images as threads; "auto" uses "batched" only for smaller batches.
    im2col_mode = "auto"

    def _plan(self, g: ConvGeometry, algorithm: str, nt: int) -> str:
        """Which kernel family runs: "direct", "pointwise", "threads" or "batched"."""
        p, rows = g.out_h * g.out_w, g.c * g.r * g.s
        if algorithm != "im2col" or max(p, rows, g.k, g.c * g.h * g.w) > _INT32_MAX:
            return "direct"  # BLAS takes 32-bit ints; absurdly large planes stay direct
        if is_pointwise(g):
            return "pointwise"
        if self.im2col_mode != "auto":
            return self.im2col_mode
        return "threads" if nt == 1 or g.n >= nt else "batched"

    # ----------------------------------------------------------------- winograd
    def _winograd_threads(self, g):
        return _threads(g.flops // 2)

    def _winograd_forward(self, x, u, bias, out, p, pt, pl):
        vb, mb, sc, ln = p.buffers(out.dtype)
        checks = np.zeros(p.threads, out.dtype)
        _winograd.forward(x, u, bias, out, vb, mb, sc, p.planes(out.dtype), ln, checks, p.hs, p.ws, pt, pl, p.d, p.tb,
                          p.vstride, p.mstride)
        return not checks.any()

    def _winograd_transform_weight(self, w, u, gm, groups, rotate):
        _winograd.transform_weight(w, u, gm, groups, rotate, _threads(wino.transform_work(u.size)))

    def _winograd_weight_gradient(self, du, gw, gm):
        _winograd.weight_gradient(du, gw, gm, _threads(wino.transform_work(du.size)))

    def _winograd_weight_sum(self, grad_out, x, p, g):
        vb, mb, sc, ln = p.buffers(g.dtype)
        partial = np.zeros((p.threads, g.groups, p.t.a**2, g.k_per_group, g.c_per_group), g.dtype)
        _winograd.backward_weight(grad_out, x, partial, vb, mb, sc, p.planes(g.dtype, weight=True), ln, p.hs, p.ws,
                                  g.padding[0], g.padding[2], p.d, p.tb, p.vstride, p.mstride)
        return sum_partials(partial, dtype=np.float64)

    # ----------------------------------------------------------------- conv
    def conv2d(self, x, weight, bias, g, algorithm):
        if algorithm == "winograd":
            return self.winograd_conv2d(x, weight, bias, g)
        b = np.zeros(g.k, g.dtype) if bias is None else bias
        out = np.empty(g.output_shape, g.dtype)
        nt = _threads(g.flops // 2)
        w2 = weight.reshape(g.k, -1)
        plan = self._plan(g, algorithm, nt)
        if plan == "pointwise":
            with _blas_for(nt, g.n) as threads:
                _im2col.pointwise_forward(x, w2, b, out, g.groups, threads)
        elif plan == "threads":
            buf = _ThreadBuffers(g, nt)
            with _config.single_threaded_blas():
                _im2col.forward_threads(x, w2, b, out, buf.cols, buf.tmps, buf.chunk, buf.rows, g.r, g.s,
                                        *_conv_args(g))
        elif plan == "batched":
            ws = _Workspace(g)
            for n0, nb in ws.chunks(g.n):
                _im2col.forward(x, w2, b, out, ws.col, ws.tmp, n0, nb, g.r, g.s, *_conv_args(g), 1)
        elif (blk := _blocked_plan("conv2d", g)) is not None:
            _run_blocked(x, weight, b, out, blk, g, (g.padding[0], g.padding[2]))
        elif (flat := _flat3x3(g.out_h, g.out_w, g, g.c_per_group, nt)) is not None:
            _direct.forward3x3(x, weight, b, out, *flat, g.padding[0], g.padding[2], *g.dilation, g.groups)
        else:
            _direct.forward(x, weight, b, out, *_conv_args(g), nt)
        return out

    def conv2d_backward_input(self, grad_out, weight, g, algorithm):
        if algorithm == "winograd":
            return self.winograd_backward_input(grad_out, weight, g)
        nt = _threads(g.flops // 2)
        w2 = weight.reshape(g.k, -1)
        plan = self._plan(g, algorithm, nt)
        blk = _blocked_plan("conv2d_backward_input", g) if plan == "direct" else None
        flat = _flat3x3(g.h, g.w, g, g.k_per_group, nt) if plan == "direct" and blk is None else None
        # the blocked and flat kernels write every element; the others add into gx
        gx = (np.empty if blk is not None or flat is not None else np.zeros)(g.input_shape, g.dtype)
        # the input gradient of a stride-1 conv is the forward pass of grad_out with the
        # rotated kernel and padding dil*(R-1) - pad
        pads = (g.dilation[0] * (g.r - 1) - g.padding[0], g.dilation[1] * (g.s - 1) - g.padding[2])
        if plan == "pointwise":
            with _blas_for(nt, g.n) as threads:
                _im2col.pointwise_backward_input(grad_out, w2, gx, g.groups, threads)
        elif plan == "threads":
            buf = _ThreadBuffers(g, nt, "input")
            with _config.single_threaded_blas():
                _im2col.backward_input_threads(grad_out, w2, gx, buf.cols, buf.tmps, buf.chunk, buf.rows, g.r, g.s,
                                               *_conv_args(g))
        elif plan == "batched":
            ws = _Workspace(g)
            for n0, nb in ws.chunks(g.n):
                _im2col.backward_input(grad_out, w2, gx, ws.col, ws.tmp, n0, nb, g.r, g.s, *_conv_args(g), 1)
        elif blk is not None:
            _run_blocked(grad_out, weight, np.zeros(g.c, g.dtype), gx, blk, g, pads, rotate=True)
        elif flat is not None:
            _direct.forward3x3(grad_out, input_grad_kernel(weight, g.groups), np.zeros(g.c, g.dtype), gx, *flat,
                               *pads, *g.dilation, g.groups)
        else:
            _direct.backward_input(grad_out, weight, gx, *_conv_args(g), nt)
        return gx

    def conv2d_backward_weight(self, grad_out, x, g, algorithm):
        if algorithm == "winograd":
            return self.winograd_backward_weight(grad_out, x, g)
        if algorithm == "direct" and (gw := _blocked_weight(grad_out, x, g)) is not None:
            return gw
        gw = np.zeros(g.weight_shape, g.dtype)
        nt = _threads(g.flops // 2)
        gw2 = gw.reshape(g.k, -1)
        plan = self._plan(g, algorithm, nt)
        if plan == "pointwise":
            with _blas_for(nt, g.n) as threads:
                partial = np.zeros((threads,) + gw2.shape, g.dtype)
                _im2col.pointwise_backward_weight(grad_out, x, partial, g.groups)
            sum_partials(partial, out=gw2)
        elif plan == "threads":
            buf = _ThreadBuffers(g, nt)
            partial = np.zeros((buf.threads,) + gw2.shape, g.dtype)
            with _config.single_threaded_blas():
                _im2col.backward_weight_threads(grad_out, x, partial, buf.cols, buf.tmps, buf.chunk, buf.rows, g.r,
                                                g.s, *_conv_args(g))
            sum_partials(partial, out=gw2)
        elif plan == "batched":
            ws = _Workspace(g)
            for n0, nb in ws.chunks(g.n):
                _im2col.backward_weight(grad_out, x, gw2, ws.col, ws.tmp, n0, nb, g.r, g.s, *_conv_args(g), 1)
        else:
            _direct.backward_weight(grad_out, x, gw, *_conv_args(g), nt)
        return gw

    def conv2d_backward_bias(self, grad_out, g):
        gb = np.empty(g.k, g.dtype)
        _direct.bias_grad(grad_out, gb, _threads(grad_out.size))
        return gb

    # ----------------------------------------------------------------- pools
    def max_pool2d(self, x, p):
        out = np.empty(p.output_shape, p.dtype)
        idx = np.empty(p.output_shape, np.int64)
        _pool.max_forward(x, out, idx, *p.kernel, *p.stride, *p.padding, *p.dilation,
                          _threads(out.size * p.kernel[0] * p.kernel[1]))
        return out, idx

    def max_pool2d_backward(self, grad_out, indices, p):
        gx = np.empty(p.input_shape, p.dtype)  # the kernel writes every element
        _pool.max_backward(grad_out, np.ascontiguousarray(indices, np.int64), gx, p.kernel[0], p.stride[0],
                           p.padding[0], p.dilation[0], _threads(gx.size))
        return gx

    def avg_pool2d(self, x, p):
        out = np.empty(p.output_shape, p.dtype)
        _pool.avg_forward(x, out, *p.kernel, *p.stride, *p.padding, p.count_include_pad,
                          _threads(out.size * p.kernel[0] * p.kernel[1]))
        return out

    def avg_pool2d_backward(self, grad_out, p):
        gx = np.empty(p.input_shape, p.dtype)  # the kernel writes every element
        _pool.avg_backward(grad_out, gx, *p.kernel, *p.stride, *p.padding, p.count_include_pad,
                           _threads(grad_out.size * p.kernel[0] * p.kernel[1]))
        return gx

    # ----------------------------------------------------------------- selection
    def default_algorithm(self, op: str, g: ConvGeometry) -> str:
        """Winograd for 3x3 stride-1 layers with at least 16 channels per group in and out;
        the channel-blocked direct kernels wherever they run (at least 4 outputs per group: the
        forward pass at any stride, the input gradient at stride 1, the weight gradient at any
        stride: :func:`fastconv.backends.base.blocked_runs`); Winograd from 8
        channels in and out where they do not; else im2col + GEMM unless the GEMM would be
        degenerate.

        Measured on the 2-core box (float32, 2 threads, two full benchmark runs): the blocked
        kernel runs dense layers at 65-95% of the sgemm peak and beat im2col on every forward
        pass of the suite it runs on (1.15-3.6x; the 7x7/2 stem 1.3-1.4x) and on the input
        gradients (1.3-1.7x), and Winograd on the 8-channel stripe-c2 layer (about 2x forward,
        1.5-2x input gradient).  Winograd F(4x4, 3x3) stays ahead
        from 16 channels (mnist-c2 1.05-1.1x, cifar-64 1.8x) and, where no blocked kernel
        runs, beats im2col from 8 channels (1.0-1.5x at 8) and loses below (0.2-0.8x with 1 to
        4 input channels).  Depthwise convs (C/groups = 1: each GEMM is a 1-row product) and
        single-channel, single-output convs (the ``correlate2d`` path, whose column matrix
        would be R*S times the image) stay direct, as do one-channel 3x3 stride-1 layers with
        up to 8 outputs and their input gradients (the flat-plane kernel:
        :func:`fastconv.backends.base.flat3x3_preferred`).  Where the BLAS runs narrower vectors than the
        tiles (:data:`NARROW_BLAS`), Winograd waits for :data:`WINOGRAD_MIN_CHANNELS_NARROW_BLAS`
        channels and pointwise weight gradients for :data:`POINTWISE_GEMM_WEIGHTS_NARROW_BLAS`
        weights.  Where the blocked kernels run, Winograd also needs a pass of at least
        :data:`WINOGRAD_MIN_TILES_BLOCKED` tiles, or :data:`WINOGRAD_MIN_TILES_WIDE` from
        :data:`WINOGRAD_WIDE_CHANNELS` channels (small batches of small planes stay direct),
        and they run a single image on every thread, sharing its output channels out.  A
        weight gradient takes Winograd only with tiles enough for its partial sums
        (:func:`fastconv._winograd.weight_gradient_pays`).
        """
        width, narrow = min(g.c_per_group, g.k_per_group), _narrow_blas()
        blocked = blocked_runs(op, g, _blocked_plan, _blocked_weight_layout,
                               POINTWISE_GEMM_WEIGHTS_NARROW_BLAS if narrow else None)
        wide = WINOGRAD_MIN_CHANNELS_NARROW_BLAS if narrow else WINOGRAD_MIN_CHANNELS_BLOCKED
        if blocked:
            winograd = width >= wide and wino.enough_tiles(op, g, WINOGRAD_MIN_TILES_BLOCKED, WINOGRAD_WIDE_CHANNELS,
                                                           WINOGRAD_MIN_TILES_WIDE)
        else:
            winograd = width >= WINOGRAD_MIN_CHANNELS
        if op == "conv2d_backward_weight":
            winograd = winograd and wino.weight_gradient_pays(g)
        if winograd and self.unsupported("winograd", op, g) is None:
            return "winograd"
        if blocked or g.c_per_group == 1 and g.k_per_group <= 4 or flat3x3_preferred(op, g, _threads(g.flops // 2)):
            return "direct"
        return "im2col"

    def info(self) -> dict[str, Any]:
        return {"openmp": bool(_direct.OPENMP), "blas": "scipy.linalg.cython_blas", "narrow_blas": _narrow_blas(),
                "wide_weight_tile_every_plane": _wide_weight_every_plane(),
                "threads": _config.get_num_threads(), "openmp_wait": _config.openmp_wait()}
