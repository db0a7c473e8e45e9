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
    3x3 stride-1 forward and input-gradient passes run on zero-padded flat planes instead
    (``conv2d_direct3x3``, one (image, group) per work unit), where the nine taps are
    fixed offsets and vectorise as one expression.
im2col
    One parallel kernel per pass (the Cython backend's "threads" design): each numba worker
    takes work units from a shared counter -- chunks of small images, or blocks of output
    rows of one large image, sized so that the column block and its output block stay in
    cache -- unfolds them into its private column buffer and multiplies with ``np.dot``
    (BLAS) on contiguous slices, BLAS pinned to one thread meanwhile
    (:func:`fastconv._config.single_threaded_blas`); the weight gradient goes to per-worker
    float64 partial sums.  No BLAS thread pool ever alternates with numba's threads: when
    it did (parallel copies, then numpy's multi-threaded matmul), the two pools' idle
    threads spun against each other, badly so when PyTorch's libgomp (which busy-waits)
    was loaded first.  1x1 stride-1 unpadded convs multiply the NCHW arrays directly.  See
    :class:`_ThreadPlan` and the kernels in ``_kernels.py``.
winograd
    F(4x4, 3x3) for 3x3 stride-1 convs with equal dilations (``_winograd.py`` beside this
    file; the maths and the planning are in :mod:`fastconv._winograd`): tiles in blocks of
    64, per-block input / output transforms vectorised over 16 tiles, 36 BLAS GEMMs per
    block, one block per numba worker at a time with SciPy's BLAS pinned to one thread.
    The input gradient is the forward pass on ``grad_out`` with the rotated kernel.  Calls
    whose result is not finite are recomputed with im2col (Winograd smears an Inf/NaN over
    its tile).
"""

from __future__ import annotations

import contextlib
import threading
import time
from types import ModuleType
from typing import Any, Callable, Hashable

import numba
import numpy as np

from ... import _config
from ..._args import ConvGeometry, PoolGeometry
from .._winograd_passes import WinogradPasses
from ..base import (SERIAL_WORK, Backend, BlockedLayout, BlockedWeightLayout, blas_is_narrower,
                    blocked_layout, blocked_runs, blocked_weight_gradient, blocked_weight_layout,
                    blocked_weights_shape, flat3x3_buffers, flat3x3_preferred, input_grad_kernel, is_pointwise,
                    small_gemm_rows, sum_partials)
from ... import _winograd as wino
from . import _blocked, _kernels
from . import _winograd as _wk

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


def _type_key(a: Any) -> Hashable:
    """A cheap stand-in for ``numba.typeof(a)`` (which costs microseconds per array): equal
    keys mean equal numba types, i.e. dtype, ndim, layout, mutability and alignment for
    arrays, the Python type for scalars."""
    if isinstance(a, np.ndarray):
        f = a.flags
        return (a.dtype, a.ndim, f.c_contiguous, f.f_contiguous, f.writeable, f.aligned)
    return type(a)


def _kernel(name: str, n_inputs: int, module: ModuleType = _kernels) -> Callable[..., None]:
    """Return a caller of ``module.<name>`` that compiles it explicitly, and times
    the compilation, the first time each argument-type signature is seen.

    The first ``n_inputs`` arguments are the kernel's input arrays; they are passed as
    read-only views so that writable and read-only caller arrays share one
    specialisation per dtype.  The caller takes an optional keyword ``threads``: the
    numba thread count of the call (default: :func:`fastconv.get_num_threads`), capped at
    ``NUMBA_NUM_THREADS``.
    """
    dispatcher = getattr(module, name)
    seen: set[tuple[Hashable, ...]] = set()  # _type_key signatures known to be compiled

    def call(*args: Any, threads: int | None = None) -> None:
        args = tuple(_readonly(a) for a in args[:n_inputs]) + args[n_inputs:]
        key = tuple(_type_key(a) for a in args)
        if key not in seen:
            sig = tuple(numba.typeof(a) for a in args)
            with _lock:
                if sig not in dispatcher.overloads:
                    start = time.perf_counter()
                    dispatcher.compile(sig)
                    _compile_seconds[f"{name}[{args[0].dtype}]"] = time.perf_counter() - start
                seen.add(key)
        wanted = _config.get_num_threads() if threads is None else threads
        numba.set_num_threads(max(1, min(wanted, numba.config.NUMBA_NUM_THREADS)))
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
_conv2d_direct3x3 = _kernel("conv2d_direct3x3", 3)
_conv2d_blocked = _kernel("conv2d_blocked", 3, _blocked)
_blocked_weights = _kernel("blocked_weights", 1, _blocked)
_conv2d_backward_weight_blocked = _kernel("conv2d_backward_weight_blocked", 2, _blocked)
_conv2d_backward_input_direct = _kernel("conv2d_backward_input_direct", 2)
_conv2d_backward_weight_direct = _kernel("conv2d_backward_weight_direct", 2)
_conv2d_backward_bias = _kernel("conv2d_backward_bias", 1)
_conv2d_im2col = _kernel("conv2d_im2col", 3)
_conv2d_backward_input_im2col = _kernel("conv2d_backward_input_im2col", 2)
_conv2d_backward_weight_im2col = _kernel("conv2d_backward_weight_im2col", 2)
_max_pool2d = _kernel("max_pool2d", 1)
_max_pool2d_backward = _kernel("max_pool2d_backward", 2)
_avg_pool2d = _kernel("avg_pool2d", 1)
_avg_pool2d_backward = _kernel("avg_pool2d_backward", 1)
_pool2d_flat = _kernel("pool2d_flat", 1)
_avg_pool2d_backward_flat = _kernel("avg_pool2d_backward_flat", 1)
_winograd_forward = _kernel("winograd_forward", 3, _wk)
_winograd_backward_weight = _kernel("winograd_backward_weight", 2, _wk)
_winograd_transform_weight = _kernel("transform_weight", 1, _wk)
_winograd_weight_gradient = _kernel("weight_gradient", 1, _wk)


def _conv_params(g: ConvGeometry) -> tuple[int, ...]:
    """The geometry scalars every conv kernel takes: sh, sw, top, left, dh, dw."""
    return (g.stride[0], g.stride[1], g.padding[0], g.padding[2], g.dilation[0], g.dilation[1])


_scratch_buffers = threading.local()


def _scratch(slot: str, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """An uninitialised C-contiguous array from a per-thread buffer that is kept between calls.

    Fresh large allocations cost a page fault per 4 KiB page on first touch, as slow as
    the im2col copy itself; reusing the buffers avoids that.  Each thread keeps, per slot,
    the largest buffer it has used (bounded by the workspace limit, see :class:`_ThreadPlan`).
    """
    nbytes = max(1, int(np.prod(shape))) * np.dtype(dtype).itemsize
    buf = getattr(_scratch_buffers, slot, None)
    if buf is None or buf.nbytes < nbytes:
        buf = np.empty(nbytes, dtype=np.uint8)
        setattr(_scratch_buffers, slot, buf)
    return buf[:int(np.prod(shape)) * np.dtype(dtype).itemsize].view(dtype).reshape(shape)


#: a worker's GEMM should have at least this many columns (small images are grouped until it
#: does).  Measured over stripe-c1/c2 and mnist-c1/c2 (1 and 2 threads): 512 is as fast as 1024
#: and 2048 everywhere, and 1.4-1.7x faster on stripe-c2 (8x8 planes), whose 16 x 72 GEMMs
#: then stay within OpenBLAS's small-matrix kernels (:data:`~fastconv.backends.base.SMALL_GEMM`)
_MIN_GEMM_COLUMNS = 512
#: a worker's column block (C*R*S x rows*Wo) of one large image and its output block
#: (K x rows*Wo) together stay under this.  Measured (resnet-stem, vgg-224, 1 and 2 threads):
#: flat from 1 to 4 MiB, 512 KiB up to 10% slower on vgg-224 (64 outputs, 27 column rows:
#: short GEMMs), a whole image per GEMM 10-40% slower
_BLOCK_BYTES = 1 << 21


def _threads(g: ConvGeometry) -> int:
    """The numba thread count for a conv pass of layer ``g`` (1 for small layers)."""
    if g.flops // 2 < SERIAL_WORK:
        return 1
    return max(1, min(_config.get_num_threads(), numba.config.NUMBA_NUM_THREADS))


def _flat3x3(out_h: int, out_w: int, g: ConvGeometry, cin: int) -> tuple[np.ndarray, np.ndarray] | None:
    """The buffers of ``_kernels.conv2d_direct3x3`` (see :func:`fastconv.backends.base.flat3x3_buffers`)."""
    return flat3x3_buffers(out_h, out_w, g, cin, _threads(g), _kernels.FLAT_SEGMENT, _config.get_workspace_limit())


def _blocked_plan(op: str, g: ConvGeometry) -> BlockedLayout | None:
    """How ``_blocked.conv2d_blocked`` runs ``op``, or None when it should not (see
    :func:`fastconv.backends.base.blocked_layout`)."""
    return blocked_layout(op, g, _threads(g), _blocked.VBLOCK, _config.get_workspace_limit(), split=_blocked.KBLOCK)


def _run_blocked(x: np.ndarray, weight: np.ndarray, bias: np.ndarray, out: np.ndarray, lay: BlockedLayout,
                 g: ConvGeometry, pads: tuple[int, int], rotate: bool = False) -> None:
    """``_blocked.conv2d_blocked`` with the layer's ``weight``, rotated for the input gradient
    (``rotate``: see :func:`fastconv.backends.base.blocked_weights_shape`)."""
    wt = np.empty(blocked_weights_shape(g, rotate, _blocked.KBLOCK), g.dtype)
    _blocked_weights(weight, wt, g.groups, rotate, threads=1 if weight.size < SERIAL_WORK else None)
    _conv2d_blocked(x, wt, bias, out, lay.buffer(g.dtype), lay.offsets(g), np.zeros(1, np.int64), lay.plane, g.r,
                    g.s, *lay.stride, *pads, *g.dilation, g.groups, lay.in_place, lay.parts, threads=lay.workers)


def _blocked_weight_layout(g: ConvGeometry) -> BlockedWeightLayout | None:
    """How ``_blocked.conv2d_backward_weight_blocked`` runs, or None when it should not (see
    :func:`fastconv.backends.base.blocked_weight_layout`)."""
    return blocked_weight_layout(g, _threads(g), (_blocked.WJ, _blocked.WQ, _blocked.WV), _config.get_workspace_limit())


def _blocked_weight(grad_out: np.ndarray, x: np.ndarray, g: ConvGeometry) -> np.ndarray | None:
    """The weight gradient from ``_blocked.conv2d_backward_weight_blocked``, or None (see
    :func:`fastconv.backends.base.blocked_weight_gradient`)."""
    def kernel(gw, partial, xs, gs, lay):
        _conv2d_backward_weight_blocked(grad_out, x, gw, partial, xs, gs, lay.offsets,
                                        np.zeros(1, np.int64), lay.chunk, lay.plane, g.r, g.s, *g.stride,
                                        g.padding[0], g.padding[2], *g.dilation, g.groups, threads=lay.workers)

    return blocked_weight_gradient(kernel, _blocked_weight_layout(g), g)


class _ThreadPlan:
    """How an im2col pass spreads over numba workers (the Cython backend's "threads" plan).

    Work units are chunks of ``chunk`` images (small planes: at least
    :data:`_MIN_GEMM_COLUMNS` GEMM columns per unit) or, with one image per chunk, blocks of
    ``rows`` output rows, so that a column block and its output block stay within
    :data:`_BLOCK_BYTES` (in cache), and forward / input-gradient GEMMs within
    :data:`~fastconv.backends.base.SMALL_GEMM` where one row's do
    (:func:`~fastconv.backends.base.small_gemm_rows`).  The forward and weight-gradient passes hand out
    row blocks as units of their own, so a batch smaller than the thread count still keeps
    every worker busy; the input gradient hands out whole chunks (an image's row blocks add
    into overlapping input rows).  ``workers`` is the number of workers: the thread count,
    capped by the units and by the workspace limit (one unit's buffers per worker; at least
    one worker is always allowed).  With one worker, BLAS keeps its own threads.

    Parameters
    ----------
    g : ConvGeometry
        The layer.
    op : str
        "forward", "input" or "weight".
    """

    def __init__(self, g: ConvGeometry, op: str) -> None:
        nt = _threads(g)
        p, rows, item = g.out_h * g.out_w, g.c * g.r * g.s, g.dtype.itemsize
        limit = _config.get_workspace_limit()
        self.pointwise = is_pointwise(g)
        chunk = 1 if self.pointwise else max(1, -(-_MIN_GEMM_COLUMNS // p))
        self.rows = g.out_h
        if chunk == 1 and not self.pointwise:
            fit = _BLOCK_BYTES // ((rows + g.k) * g.out_w * item)
            if op != "weight" and (small := small_gemm_rows(g)) is not None:
                fit = min(fit, small)
            self.rows = max(1, min(g.out_h, fit))
        per_image = -(-g.out_h // self.rows) if op != "input" else 1
        block = 0 if self.pointwise else (rows + g.k) * self.rows * g.out_w * item
        self.workers = _config.batch_chunk(block, min(nt, g.n * per_image))
        chunk = max(1, min(chunk, -(-g.n // self.workers)))
        while chunk > 1 and self.workers * (rows + g.k) * chunk * p * item > limit:
            chunk -= 1
        self.chunk = chunk
        width = 0 if self.pointwise else (chunk * p if chunk > 1 else self.rows * g.out_w)
        self.cols = _scratch("cols", (self.workers, rows * width), g.dtype)
        self.tmps = _scratch("tmps", (self.workers, g.k * width), g.dtype)

    def args(self, g: ConvGeometry) -> tuple[Any, ...]:
        """The kernel arguments after the arrays: buffers, counter, unit shape and geometry."""
        return (self.cols, self.tmps, np.zeros(1, np.int64), self.chunk, self.rows, g.r, g.s,
                *_conv_params(g), g.groups, self.pointwise)

    def blas(self) -> Any:
        """The context to run the kernel in: single-threaded BLAS when several workers call it."""
        return _config.single_threaded_blas() if self.workers > 1 else contextlib.nullcontext()


#: "auto" picks Winograd from this many channels per group, in and out, where the blocked
#: direct kernel does not run, and from WINOGRAD_MIN_CHANNELS_BLOCKED where it does
#: (see default_algorithm)
WINOGRAD_MIN_CHANNELS = 8
WINOGRAD_MIN_CHANNELS_BLOCKED = 16
#: ... and from this many where the BLAS runs narrower vectors than the core offers (NARROW_BLAS)
WINOGRAD_MIN_CHANNELS_NARROW_BLAS = 64
#: ... or from this many input channels per group with at least WINOGRAD_MIN_OUTPUTS outputs
WINOGRAD_MIN_WIDE_INPUTS = 16
WINOGRAD_MIN_OUTPUTS = 4
#: where the blocked kernels run, Winograd also needs a pass of this many output tiles (over the
#: batch; :func:`fastconv._winograd.enough_tiles`) ...
WINOGRAD_MIN_TILES_BLOCKED = 512
#: ... or of WINOGRAD_MIN_TILES_WIDE from WINOGRAD_WIDE_CHANNELS channels per group in and out.
#: 2-core Zen 4, 2 threads, float32, direct / Winograd time (forward, input gradient; weight
#: gradient), with the compiled weight transforms: 16-32 channels, 98-196 tiles 0.61-1.12;
#: 0.50-0.77 (the rule of 96 tiles alone had taken Winograd there); 64-128 channels, 32-196
#: tiles 1.18-2.04; 256 channels, 16 tiles 0.67-0.75, 32 tiles 1.09-1.16, 64 tiles 1.21-1.35.
#: (Measured earlier on a Zen 5 with NumPy's weight transforms, a fixed cost per pass: 256
#: channels, 32 tiles 0.63-0.66, 64 tiles 0.80-0.81; 128 channels, 49 tiles 0.93-1.01.)
WINOGRAD_WIDE_CHANNELS = 64
WINOGRAD_MIN_TILES_WIDE = 32


#: whether ``default_algorithm`` should favour the direct kernels (see
#: :func:`fastconv.backends.base.blas_is_narrower`; None until it first asks: :func:`_narrow_blas`)
NARROW_BLAS: bool | None = None


def _narrow_blas() -> bool:
    """:data:`NARROW_BLAS`, found out on first use from the compile target's registers and the
    core each loaded OpenBLAS runs kernels for."""
    global NARROW_BLAS
    if NARROW_BLAS is None:
        NARROW_BLAS = blas_is_narrower(_blocked.target_registers()[0] == 64, _config.openblas_cores())
    return NARROW_BLAS


#: the ``bias`` argument of :func:`_kernels.conv2d_im2col` for a layer without bias, by dtype
_NO_BIAS = {np.dtype(t): np.empty(0, t) for t in (np.float32, np.float64)}

#: the ``idx`` argument of :func:`_kernels.pool2d_flat` for average pooling (unused)
_NO_INDICES = np.empty((1, 1, 1, 1), np.int64)


def _is_flat_pool(p: PoolGeometry, dilation: tuple[int, int]) -> bool:
    """Whether :func:`_kernels.pool2d_flat` covers the pooling ``p`` (with ``dilation``): W a
    multiple of the column stride, no column padding, windows no wider than the plane and
    no taller than the plane with its top padding, every tap offset within 32 bits."""
    (kh, kw), (_, sw), (dh, dw) = p.kernel, p.stride, dilation
    reach_h, reach_w = (kh - 1) * dh, (kw - 1) * dw
    return (p.padding[1] == 0 and p.w % sw == 0 and p.w > reach_w and p.h + p.padding[0] > reach_h
            and reach_h * p.w + reach_w < 2**31 and p.n * p.c > 0 and p.out_h * p.out_w > 0)


def _pool_workers(p: PoolGeometry) -> int:
    """Workers of a pooling call: one for small calls (see :data:`SERIAL_WORK`), else the
    thread count, capped by the planes."""
    if p.n * p.c * p.out_h * p.out_w * p.kernel[0] * p.kernel[1] < SERIAL_WORK:
        return 1
    return max(1, min(_config.get_num_threads(), numba.config.NUMBA_NUM_THREADS, p.n * p.c))


class NumbaBackend(WinogradPasses, Backend):
    """Numba kernels (see the module docstring)."""

    name = "numba"
    algorithms = ("direct", "im2col", "winograd")

    # ------------------------------------------------------------------ selection
    def default_algorithm(self, op: str, g: ConvGeometry) -> str:
        """Winograd for 3x3 stride-1 layers with at least :data:`WINOGRAD_MIN_CHANNELS_BLOCKED`
        channels per group in and out; else the channel-blocked direct kernel wherever it
        runs (at least 4 outputs per group: the forward pass at any stride, the input gradient
        at stride 1; in two full benchmark runs 1.1-3.2x faster than im2col on forward passes,
        except pw-1x1 at 0.99-1.09x (1.19x on an AVX2 Zen 3, tiles cut to its 16 registers), and
        0.9-1.6x on input gradients; the weight gradient at any
        stride: :func:`fastconv.backends.base.blocked_runs`); else, as before
        they existed,
        Winograd for the 3x3 stride-1 layers it can run with at least
        :data:`WINOGRAD_MIN_CHANNELS` channels per group in and out, or at least
        :data:`WINOGRAD_MIN_WIDE_INPUTS` in and :data:`WINOGRAD_MIN_OUTPUTS` out; else
        im2col + GEMM unless the GEMM would be degenerate: depthwise-like convs (one input
        channel per group, few outputs per group; each GEMM is then a 1-row product) and the
        single-channel ``correlate2d`` path, whose column matrix would be R*S times the image,
        stay direct.  Where the BLAS runs narrower vectors than the core offers (:data:`NARROW_BLAS`),
        Winograd waits for :data:`WINOGRAD_MIN_CHANNELS_NARROW_BLAS` channels where the blocked
        kernel runs, and for a pass of at least :data:`WINOGRAD_MIN_TILES_BLOCKED` tiles, or
        :data:`WINOGRAD_MIN_TILES_WIDE` from :data:`WINOGRAD_WIDE_CHANNELS` channels (small
        batches of small planes stay direct; the blocked kernels share a single image's output
        channels among the threads).  A weight gradient takes Winograd only with tiles enough
        for its partial sums (:func:`fastconv._winograd.weight_gradient_pays`).

        Measured on the 2-core box (float32, 2 threads, all three passes, numba im2col time /
        numba Winograd time): 8 in and out 0.84-1.57 (wins on small planes, e.g. 1.2-1.6 on
        400x8x8x8 and 2.3 on the stripe-c2 layer, 0.85-1.0 on 14x14 and 32x32 planes), 12 in
        and out 1.0-3.0, 16 in and out 1.2-3.3; with 4 outputs 16 inputs give 1.04-1.37, 32
        inputs 2-3, 8 or 12 inputs 0.74-1.17; 4 or 6 inputs lose (0.5-0.99) whatever the
        outputs.  (The Cython backend uses the first of these rules alone.)  One-channel 3x3
        stride-1 layers with few outputs, and their input gradients, run the flat-plane direct
        kernel (:func:`fastconv.backends.base.flat3x3_preferred`); elsewhere im2col beat the row-wise
        direct kernel on every layer of the benchmark suite.
        """
        cin, cout = g.c_per_group, g.k_per_group
        blocked = blocked_runs(op, g, _blocked_plan, _blocked_weight_layout)
        least = WINOGRAD_MIN_CHANNELS_NARROW_BLAS if _narrow_blas() else WINOGRAD_MIN_CHANNELS_BLOCKED
        enough_tiles = not blocked or wino.enough_tiles(op, g, WINOGRAD_MIN_TILES_BLOCKED, WINOGRAD_WIDE_CHANNELS,
                                                        WINOGRAD_MIN_TILES_WIDE)
        wide = min(cin, cout) >= least and enough_tiles or not blocked and (
            min(cin, cout) >= WINOGRAD_MIN_CHANNELS or cin >= WINOGRAD_MIN_WIDE_INPUTS and cout >= WINOGRAD_MIN_OUTPUTS)
        if op == "conv2d_backward_weight":
            wide = wide and wino.weight_gradient_pays(g)
        if wide and self.unsupported("winograd", op, g) is None:
            return "winograd"
        if blocked or cin == 1 and cout <= 4 or flat3x3_preferred(op, g, _threads(g)):
            return "direct"
        return "im2col"

    # ------------------------------------------------------------------ winograd
    def _winograd_threads(self, g: ConvGeometry) -> int:
        return _threads(g)

    def _winograd_forward(self, x: np.ndarray, u: np.ndarray, bias: np.ndarray, out: np.ndarray, p: wino.Plan,
                          pt: int, pl: int) -> bool:
        vb, mb, sc, ln = p.buffers(out.dtype)
        checks = np.zeros(p.threads, out.dtype)
        counter = np.zeros(1, np.int64)
        _winograd_forward(x, u, bias, out, vb, mb, sc, p.planes(out.dtype), ln, checks, counter, p.hs, p.ws, pt, pl,
                          p.d, p.tb, p.vstride, p.mstride, threads=p.threads)
        return not checks.any()

    def _winograd_transform_weight(self, w: np.ndarray, u: np.ndarray, gm: np.ndarray, groups: int,
                                   rotate: bool) -> None:
        serial = wino.transform_work(u.size) < SERIAL_WORK
        _winograd_transform_weight(w, u, gm, groups, rotate, threads=1 if serial else None)

    def _winograd_weight_gradient(self, du: np.ndarray, gw: np.ndarray, gm: np.ndarray) -> None:
        serial = wino.transform_work(du.size) < SERIAL_WORK
        _winograd_weight_gradient(du, gw, gm, threads=1 if serial else None)

    def _winograd_weight_sum(self, grad_out: np.ndarray, x: np.ndarray, p: wino.Plan,
                             g: ConvGeometry) -> np.ndarray:
        vb, mb, sc, ln = p.buffers(g.dtype)
        kg, cg = g.k_per_group, g.c_per_group
        partial = np.zeros((p.threads, g.groups, p.t.a**2, kg, cg), g.dtype)
        prod = np.empty((p.threads, kg * cg), g.dtype)
        counter = np.zeros(1, np.int64)
        _winograd_backward_weight(grad_out, x, partial, prod, vb, mb, sc, p.planes(g.dtype, weight=True), ln, counter,
                                  p.hs, p.ws, g.padding[0], g.padding[2], p.d, p.tb, p.vstride, p.mstride,
                                  threads=p.threads)
        return sum_partials(partial, dtype=np.float64)  # Inf/NaN input: recomputed with im2col

    # ------------------------------------------------------------------ conv
    def conv2d(self, x, weight, bias, g, algorithm):
        if algorithm == "winograd":
            return self.winograd_conv2d(x, weight, bias, g)
        out = np.empty(g.output_shape, dtype=g.dtype)
        b = np.zeros(g.k, dtype=g.dtype) if bias is None else bias
        if algorithm == "direct":
            if (blk := _blocked_plan("conv2d", g)) is not None:
                _run_blocked(x, weight, b, out, blk, g, (g.padding[0], g.padding[2]))
            elif (flat := _flat3x3(g.out_h, g.out_w, g, g.c_per_group)) is not None:
                _conv2d_direct3x3(x, weight, b, out, *flat, np.zeros(1, np.int64), g.padding[0], g.padding[2],
                                  *g.dilation, g.groups, threads=flat[0].shape[0])
            else:
                _conv2d_direct(x, weight, b, out, *_conv_params(g), g.groups)
            return out
        plan = _ThreadPlan(g, "forward")
        with plan.blas():
            _conv2d_im2col(x, weight.reshape(g.k, -1), _NO_BIAS[g.dtype] if bias is None else bias, out,
                           *plan.args(g), threads=plan.workers)
        return out

    def conv2d_backward_input(self, grad_out, weight, g, algorithm):
        if algorithm == "winograd":
            return self.winograd_backward_input(grad_out, weight, g)
        gx = np.empty(g.input_shape, dtype=g.dtype)
        if algorithm == "direct":
            # the input gradient of a stride-1 conv is the forward pass of grad_out with the
            # rotated kernel and padding dil*(R-1) - pad
            pads = (g.dilation[0] * (g.r - 1) - g.padding[0], g.dilation[1] * (g.s - 1) - g.padding[2])
            if (blk := _blocked_plan("conv2d_backward_input", g)) is not None:
                _run_blocked(grad_out, weight, np.zeros(g.c, g.dtype), gx, blk, g, pads, rotate=True)
            elif (flat := _flat3x3(g.h, g.w, g, g.k_per_group)) is not None:
                _conv2d_direct3x3(grad_out, input_grad_kernel(weight, g.groups), np.zeros(g.c, g.dtype), gx, *flat,
                                  np.zeros(1, np.int64), *pads, *g.dilation, g.groups, threads=flat[0].shape[0])
            else:
                _conv2d_backward_input_direct(grad_out, weight, gx, *_conv_params(g), g.groups)
            return gx
        plan = _ThreadPlan(g, "input")
        with plan.blas():
            _conv2d_backward_input_im2col(grad_out, weight.reshape(g.k, -1), gx, *plan.args(g), threads=plan.workers)
        return gx

    def conv2d_backward_weight(self, grad_out, x, g, algorithm):
        if algorithm == "winograd":
            return self.winograd_backward_weight(grad_out, x, g)
        if algorithm == "direct" and (blocked := _blocked_weight(grad_out, x, g)) is not None:
            return blocked
        gw = np.empty(g.weight_shape, dtype=g.dtype)
        if algorithm == "direct":
            _conv2d_backward_weight_direct(grad_out, x, gw, *_conv_params(g), g.groups)
            return gw
        crs = g.c_per_group * g.r * g.s
        plan = _ThreadPlan(g, "weight")
        partial = np.zeros((plan.workers, g.k * crs))  # float64 sums, one row per worker
        prods = _scratch("prods", (plan.workers, g.k_per_group, crs), g.dtype)
        with plan.blas():
            _conv2d_backward_weight_im2col(grad_out, x, partial, prods, *plan.args(g), threads=plan.workers)
        gw[...] = sum_partials(partial).reshape(g.weight_shape)
        return gw

    def conv2d_backward_bias(self, grad_out, g):
        gb = np.empty(g.k, dtype=g.dtype)
        _conv2d_backward_bias(grad_out, gb)
        return gb

    # ------------------------------------------------------------------ pools
    def max_pool2d(self, x, p):
        out = np.empty(p.output_shape, dtype=p.dtype)
        idx = np.empty(p.output_shape, dtype=np.int64)
        if _is_flat_pool(p, p.dilation):
            workers = _pool_workers(p)
            _pool2d_flat(x, out, idx, *p.kernel, *p.stride, p.padding[0], *p.dilation, True, False, workers,
                         np.zeros(1, np.int64), threads=workers)
        else:
            _max_pool2d(x, out, idx, *p.kernel, *p.stride, *p.padding, *p.dilation)
        return out, idx

    def max_pool2d_backward(self, grad_out, indices, p):
        gx = np.empty(p.input_shape, dtype=p.dtype)
        workers = _pool_workers(p)
        _max_pool2d_backward(grad_out, np.ascontiguousarray(indices, dtype=np.int64), gx, p.kernel[0], p.stride[0],
                             p.padding[0], p.dilation[0], workers, np.zeros(1, np.int64), threads=workers)
        return gx

    def avg_pool2d(self, x, p):
        out = np.empty(p.output_shape, dtype=p.dtype)
        if _is_flat_pool(p, (1, 1)):
            workers = _pool_workers(p)
            _pool2d_flat(x, out, _NO_INDICES, *p.kernel, *p.stride, p.padding[0], 1, 1, False, p.count_include_pad,
                         workers, np.zeros(1, np.int64), threads=workers)
        else:
            _avg_pool2d(x, out, *p.kernel, *p.stride, *p.padding, p.count_include_pad)
        return out

    def avg_pool2d_backward(self, grad_out, p):
        gx = np.empty(p.input_shape, dtype=p.dtype)
        if p.kernel[0] <= p.stride[0] and _is_flat_pool(p, (1, 1)):  # windows that do not overlap vertically
            workers = _pool_workers(p)
            _avg_pool2d_backward_flat(grad_out, gx, *p.kernel, *p.stride, p.padding[0], p.count_include_pad, workers,
                                      np.zeros(1, np.int64), threads=workers)
        else:
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
            "narrow_blas": _narrow_blas(),
            "openmp_wait": _config.openmp_wait(),
            "compile_seconds": compile_times(),
        }
