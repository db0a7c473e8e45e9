"""The interface every backend implements.

All arrays handed to a backend are C-contiguous, 4-D (batched), of the compute
dtype (float32 or float64) and have N >= 1; geometry records come from
:mod:`fastconv._args` and are already validated.  Every method returns a new
C-contiguous array of the compute dtype (max-pool indices: int64).
"""

from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple

import numpy as np

from .._args import ConvGeometry, PoolGeometry
from .._buffers import aligned_rows

CONV_OPS = ("conv2d", "conv2d_backward_input", "conv2d_backward_weight")


class Backend:
    """Base adapter.  Subclasses override the kernels they provide."""

    #: registry name
    name: str = ""
    #: conv algorithms this backend offers, the default first
    algorithms: tuple[str, ...] = ("direct",)
    #: whether this backend takes device (GPU) arrays
    device: bool = False

    # ----------------------------------------------------------------- conv
    def conv2d(self, x: np.ndarray, weight: np.ndarray, bias: np.ndarray | None, g: ConvGeometry,
               algorithm: str) -> np.ndarray:
        """Forward convolution: (n, c, h, w) -> (n, k, out_h, out_w)."""
        raise NotImplementedError

    def conv2d_backward_input(self, grad_out: np.ndarray, weight: np.ndarray, g: ConvGeometry,
                              algorithm: str) -> np.ndarray:
        """Gradient with respect to the input: (n, k, out_h, out_w) -> (n, c, h, w)."""
        raise NotImplementedError

    def conv2d_backward_weight(self, grad_out: np.ndarray, x: np.ndarray, g: ConvGeometry,
                               algorithm: str) -> np.ndarray:
        """Gradient with respect to the weight: -> (k, c // groups, r, s)."""
        raise NotImplementedError

    def conv2d_backward_bias(self, grad_out: np.ndarray, g: ConvGeometry) -> np.ndarray:
        """Gradient with respect to the bias: the sum of grad_out over (n, h, w)."""
        return grad_out.sum(axis=(0, 2, 3), dtype=np.float64).astype(g.dtype)

    # ----------------------------------------------------------------- pools
    def max_pool2d(self, x: np.ndarray, p: PoolGeometry) -> tuple[np.ndarray, np.ndarray]:
        """Max pooling: returns (out, indices) with int64 flat indices into each (h, w) plane."""
        raise NotImplementedError

    def max_pool2d_backward(self, grad_out: np.ndarray, indices: np.ndarray, p: PoolGeometry) -> np.ndarray:
        """Scatter-add grad_out to the argmax positions given by indices."""
        raise NotImplementedError

    def avg_pool2d(self, x: np.ndarray, p: PoolGeometry) -> np.ndarray:
        raise NotImplementedError

    def avg_pool2d_backward(self, grad_out: np.ndarray, p: PoolGeometry) -> np.ndarray:
        raise NotImplementedError

    # ----------------------------------------------------------------- selection
    def unsupported(self, algorithm: str, op: str, g: ConvGeometry) -> str | None:
        """Why ``algorithm`` cannot compute ``op`` on this geometry ("needs ..."), None when it can.

        Every algorithm but Winograd runs every valid geometry.
        """
        return None

    def default_algorithm(self, op: str, g: ConvGeometry) -> str:
        """The algorithm ``algorithm="auto"`` uses for this op and shape (a heuristic)."""
        return self.algorithms[0]

    def info(self) -> dict[str, Any]:
        """Extra facts for ``fastconv info`` (versions, threading, build flags)."""
        return {}


#: OpenBLAS (its SkylakeX kernels, which NumPy's and SciPy's wheels run on Zen 4 too) hands
#: GEMMs of at most this many multiply-adds to its small-matrix kernels, which run thin
#: products up to 1.7x faster (one thread, 64x27 @ 27xN: 102 GFLOP/s up to N = 578, 75 above;
#: 27x64 @ 64xN: 105 vs 62): see :func:`small_gemm_rows`
SMALL_GEMM = 1_000_000


def small_gemm_rows(g: ConvGeometry) -> int | None:
    """Output rows of one image whose im2col GEMM (Kg x Cg*R*S by rows*Wo) stays within
    :data:`SMALL_GEMM` multiply-adds, or None where one row's GEMM is already larger.

    The im2col passes that lower a large image a block of rows at a time cap their blocks at
    this where it helps.  Numba, forward and input gradient: vgg-224 (2 rows of 224) input
    gradient 1.25x, forward 1.08x faster; the weight gradient's GEMM gained nothing (0.9x).
    Cython, input gradient only (its rows also gathered out of their planes, which lie a
    multiple of 4 KiB apart there): vgg-224 20.6-23.0 -> 14.9-21.2 ms on two threads; its
    forward pass measured 1.07x slower with the cap (one thread)."""
    per_row = g.k_per_group * g.c_per_group * g.r * g.s * g.out_w
    return SMALL_GEMM // per_row if per_row <= SMALL_GEMM else None


#: below this many multiply-adds (or pooled taps) a compiled kernel runs on one thread:
#: starting and joining a team of threads costs more than it saves
SERIAL_WORK = 1 << 17


def sum_partials(partial: np.ndarray, out: np.ndarray | None = None, dtype: Any = None) -> np.ndarray:
    """The sum over axis 0 of per-thread partial sums.  Partials of +Inf and -Inf give NaN, as
    IEEE arithmetic says; NumPy's warning about it is silenced, as PyTorch gives none."""
    with np.errstate(invalid="ignore", over="ignore"):
        return np.sum(partial, axis=0, out=out, dtype=dtype)


def input_grad_kernel(w: np.ndarray, groups: int) -> np.ndarray:
    """The kernel that turns the input gradient of a stride-1 convolution into a forward one:
    ``w`` rotated by 180 degrees with its channel axes swapped per group, (K, C/g, R, S) ->
    (C, K/g, R, S).  With padding ``dil*(R-1) - pad`` per side, ``conv2d(grad_out, this)`` is
    the input gradient."""
    k, cg, r, s = w.shape
    kg = k // groups
    rot = w[:, :, ::-1, ::-1].reshape(groups, kg, cg, r, s).transpose(0, 2, 1, 3, 4)
    return np.ascontiguousarray(rot.reshape(groups * cg, kg, r, s))


def flat3x3_buffers(out_h: int, out_w: int, g: ConvGeometry, cin: int, nt: int, segment: int,
                    limit: int) -> tuple[np.ndarray, np.ndarray] | None:
    """Per-worker (xpad, stage) buffers of a flat-plane 3x3 stride-1 kernel producing
    ``out_h`` x ``out_w`` planes from ``cin`` channels per group, or None when that kernel
    should not run: not 3x3 stride 1, fewer (image, group) work units than threads (the
    row-parallel kernels split finer), or buffers over ``limit`` bytes.

    A padded plane has rows of ``out_w + 2*dw`` floats, ``out_h + 2*dh`` of them, and ``2*dw``
    floats of slack that the last row's extra columns read; ``stage`` holds ``segment`` flat
    outputs, and at least one padded row.
    """
    if (g.r, g.s) != (3, 3) or g.stride != (1, 1) or (g.n * g.groups < nt and nt > 1):
        return None
    dh, dw = g.dilation
    wp = out_w + 2 * dw
    plane = (out_h + 2 * dh) * wp + 2 * dw
    stage = max(segment, wp)
    threads = min(nt, g.n * g.groups)
    if threads * (cin * plane + stage) * g.dtype.itemsize > limit:
        return None
    return aligned_rows(threads, cin * plane, g.dtype), aligned_rows(threads, stage, g.dtype)


#: a channel-blocked direct kernel runs only for at least this many outputs per group (its
#: register tile spans 8 output channels: below 4 most of it would be wasted)
BLOCKED_MIN_OUTPUTS = 4


def blocked_plane(out_h: int, out_w: int, r: int, dh: int, sh: int, tile: int) -> int:
    """Elements per unfolded plane of a channel-blocked direct kernel: ``out_h + (r-1)*dh // sh``
    rows (of one row phase) of ``out_w``, plus the slack that the last, partial tile of ``tile``
    flat outputs reads past the ``out_h * out_w`` outputs."""
    return (out_h + (r - 1) * dh // sh) * out_w + (-(out_h * out_w)) % tile


class BlockedLayout(NamedTuple):
    """How a channel-blocked direct kernel runs one pass (see :func:`blocked_layout`)."""

    workers: int
    width: int  #: elements of a worker's unfolded-input buffer
    plane: int  #: elements per unfolded plane
    cin: int  #: input channels per group of the pass
    out_w: int  #: output width of the pass
    stride: tuple[int, int]  #: stride of the pass
    #: 1x1, stride 1, no padding: the kernel reads the input planes in place (``plane`` is
    #: then H*W) and the buffer only stages the last, partial tile's columns (cin * tile)
    in_place: bool = False
    #: work units per (image, group), each with a share of the output channels' register-tile
    #: blocks: more than one where there are fewer (image, group) pairs than threads
    parts: int = 1

    def buffer(self, dtype: Any) -> np.ndarray:
        """The workers' unfolded-input buffers, uninitialised."""
        return aligned_rows(self.workers, self.width, dtype)

    def offsets(self, g: ConvGeometry) -> np.ndarray:
        """Where each tap reads the unfolded input (:func:`blocked_offsets`); in place, where it
        reads the input's planes, then where it reads the staged last tile (c * tile)."""
        offsets = blocked_offsets(self.cin, g, self.stride[0], self.out_w, self.plane)
        if self.in_place:
            offsets = np.concatenate([offsets, np.arange(self.cin, dtype=np.intp) * (self.width // self.cin)])
        return offsets


# cached: asked twice per "auto" call (to choose, then to run), 4 us each; so the module's
# constants (BLOCKED_MIN_OUTPUTS, BLOCKED_CHUNK_BYTES) count as read once per geometry
@functools.lru_cache(maxsize=256)
def blocked_layout(op: str, g: ConvGeometry, nt: int, tile: int, limit: int,
                   split: int | None = None) -> BlockedLayout | None:
    """How a channel-blocked direct kernel runs ``op`` ("conv2d", any stride, or
    "conv2d_backward_input", stride 1: the forward pass of grad_out with the rotated kernel),
    or None when it should not run: another op, fewer than :data:`BLOCKED_MIN_OUTPUTS` outputs
    per group, buffers over ``limit`` bytes, or fewer (image, group) pairs than threads where
    the kernel cannot ``split`` them.

    ``split``: the output channels per register-tile block, where the kernel can share an
    (image, group)'s blocks among ``parts`` work units (each unfolding the unit's input
    itself), so that a single image still uses every thread; None where it cannot (the
    row-parallel kernels then split finer).

    A worker's buffer holds its unit's input unfolded along the kernel's columns and split
    into the vertical stride's row phases: C/g * S * sh planes of ``plane`` elements
    (:func:`blocked_plane`); 1x1 stride-1 unpadded passes read their input in place."""
    if op == "conv2d":
        (out_h, out_w), cin, cout, stride = (g.out_h, g.out_w), g.c_per_group, g.k_per_group, g.stride
    elif op == "conv2d_backward_input" and g.stride == (1, 1):
        (out_h, out_w), cin, cout, stride = (g.h, g.w), g.k_per_group, g.c_per_group, (1, 1)
    else:
        return None
    units = g.n * g.groups
    if cout < BLOCKED_MIN_OUTPUTS or (units < nt and split is None):
        return None
    parts = min(-(-nt // units), -(-cout // split)) if units < nt else 1  # split: not None here
    workers = min(nt, units * parts)
    if g.r == g.s == 1 and g.stride == (1, 1) and not any(g.padding):
        return BlockedLayout(workers, cin * tile, out_h * out_w, cin, out_w, stride, in_place=True, parts=parts)
    plane = blocked_plane(out_h, out_w, g.r, g.dilation[0], stride[0], tile)
    width = cin * g.s * stride[0] * plane
    if workers * width * g.dtype.itemsize > limit:
        return None
    return BlockedLayout(workers, width, plane, cin, out_w, stride, parts=parts)


def blocked_offsets(cin: int, g: ConvGeometry, sh: int, out_w: int, plane: int) -> np.ndarray:
    """Where tap t = (c*R + r)*S + s of a channel-blocked kernel reads its unfolded input, for
    ``cin`` channels per group and vertical stride ``sh``: ((c*S + s)*sh + (r*dh) % sh)*plane +
    ((r*dh) // sh)*out_w (row phase (r*dh) % sh, shifted by whole phase rows).  int64 (intp).

    Cached (building them cost about as much as a small layer's kernel takes in a tenth of
    its time): the kernels only read them, and so must every caller."""
    return _offsets(cin, g.r, g.s, g.dilation[0], sh, out_w, plane)


@functools.lru_cache(maxsize=256)
def _offsets(cin: int, kh: int, kw: int, dh: int, sh: int, out_w: int, plane: int) -> np.ndarray:
    c, r, s = np.meshgrid(np.arange(cin), np.arange(kh), np.arange(kw), indexing="ij")
    rows = r * dh
    return np.ascontiguousarray((((c * kw + s) * sh + rows % sh) * plane + rows // sh * out_w).reshape(-1),
                                dtype=np.intp)


def blocked_runs(op: str, g: ConvGeometry, plan: Callable[[str, ConvGeometry], BlockedLayout | None],
                 weight_layout: Callable[[ConvGeometry], "BlockedWeightLayout | None"],
                 pointwise_gemm_weights: int | None = None) -> bool:
    """Whether ``algorithm="auto"`` may run ``op`` with a backend's channel-blocked kernel: it
    runs there (``plan`` / ``weight_layout``: the backend's :func:`blocked_layout` /
    :func:`blocked_weight_layout`).

    For the weight gradient it beat im2col on every layer of the benchmark suite (2-core box,
    2 threads): vgg-224 1.5-1.6x, the resnet stem 1.3-1.5x, stripe-c1 1.3-1.4x, stripe-c2 about
    3x, cifar-64 1.4x (where Winograd is faster still) and, since its tiles read whole-tile
    output-gradient planes in place, the one-channel mnist-c1 1.4-1.6x (before, a copy of
    every plane made it 1.0-1.4x slower than im2col there); pw-1x1 1.2x there too, but on the
    later Zen 4 and Xeon boxes im2col ran it 1.1-1.2x faster: pointwise layers with many
    weights (``pointwise_gemm_weights`` per group, default :data:`POINTWISE_GEMM_WEIGHTS`),
    whose weight gradient is one GEMM per image, are left to im2col."""
    if op == "conv2d_backward_weight":
        return weight_layout(g) is not None and not (
            is_pointwise(g) and g.k_per_group * g.c_per_group >= (pointwise_gemm_weights or POINTWISE_GEMM_WEIGHTS))
    return plan(op, g) is not None


def is_pointwise(g: ConvGeometry) -> bool:
    """1x1, stride 1, unpadded: every input image already is its (C, H*W) column matrix."""
    return g.r == g.s == 1 and g.stride == (1, 1) and not any(g.padding)


#: from this many weights per group (K/g * C/g) a pointwise layer's weight gradient runs
#: im2col (one GEMM per image) by default rather than the blocked kernel.  Measured (2-core
#: Xeon, two threads, float32, blocked / im2col time; Cython, then Numba): 64 -> 64 channels
#: on 56x56 0.96-0.99, 1.03-0.91; 128 -> 32 on 28x28 0.88-0.97, 0.88-0.94; 64 -> 256 on 56x56
#: 1.07-1.10, 0.97-1.03; pw-1x1 (256 -> 64, 28x28) 1.11-1.20, 1.10-1.17; 512 -> 512 on
#: 14x14 2.0, 1.6; on the Zen 4, im2col was also the faster of the two on pw-1x1
POINTWISE_GEMM_WEIGHTS = 8192


#: the weight gradient's blocked kernel takes images in chunks whose unfolded input and
#: output gradients fit in about this many bytes (L1), so that its register tiles run over
#: several small planes before they are added into the thread's partial sums (measured:
#: 8x8 planes 1.45x faster in chunks of 4 than one by one; larger chunks, out of L1, slower)
BLOCKED_CHUNK_BYTES = 1 << 15
#: ... or, where the backend asks for ``min_steps`` tile steps per call (the Cython kernel),
#: chunks of enough images for those steps whose buffers stay within this many bytes (half of
#: a 1 MiB L2).  2-core Zen 5, 2 threads, float32, in-process alternation, time with one
#: image per chunk / with n: 8x8 planes 1.12-1.34 (n = 2-8), 7x7 planes of 64-128 channels
#: 1.25-1.44 (n = 2-8; 1.06 at n = 16, 1.9 MiB), 4x4 planes 1.32-1.40 (n = 4-8), mnist-c2
#: (13 steps) 1.06-1.10 (n = 2-4; 0.88 at n = 8, 700 KiB), 16 channels on 14x14 1.09-1.12 (n
#: = 2-4), 28x28 planes (49 steps) 0.86-0.93 (n = 2-4).  The Numba kernel gained 0-10%.
BLOCKED_CHUNK_CACHE_BYTES = 1 << 19


class BlockedWeightLayout(NamedTuple):
    """How a channel-blocked weight-gradient kernel runs (see :func:`blocked_weight_layout`)."""

    workers: int
    chunk: int  #: images per work unit
    plane: int  #: elements per unfolded plane
    offsets: np.ndarray  #: tap offsets, padded with zeros to a multiple of the tile's taps
    xs: int  #: elements of a worker's unfolded inputs (``chunk`` images)
    gs: int  #: elements of a worker's output-gradient stage
    partial: int  #: elements of a worker's partial sums


@functools.lru_cache(maxsize=256)  # as blocked_layout; its offsets array is shared: never written
def blocked_weight_layout(g: ConvGeometry, nt: int, tile: tuple[int, int, int], limit: int,
                          kept_lanes: int | None = None, min_steps: int | None = None) -> BlockedWeightLayout | None:
    """The layout of a channel-blocked weight-gradient kernel whose register ``tile`` = (wj, wq,
    lanes) holds ``wj`` output channels by ``wq`` taps of ``lanes`` partial sums each, and keeps
    ``kept_lanes`` of them per pair in its partial sums (default ``lanes``), with chunks of
    images for at least ``min_steps`` tile steps per call where given (see
    :data:`BLOCKED_CHUNK_CACHE_BYTES`), else as many as fit :data:`BLOCKED_CHUNK_BYTES`; or None when it
    should not run: fewer than :data:`BLOCKED_MIN_OUTPUTS` outputs per group, fewer (image, group) units
    than threads, or buffers over ``limit`` bytes.  The input is unfolded as for the forward
    pass (:func:`blocked_layout`)."""
    if g.k_per_group < BLOCKED_MIN_OUTPUTS or (g.n * g.groups < nt and nt > 1):
        return None
    (wj, wq, lanes), sh, item = tile, g.stride[0], g.dtype.itemsize
    plane = blocked_plane(g.out_h, g.out_w, g.r, g.dilation[0], sh, lanes)
    workers, image = min(nt, g.n * g.groups), g.c_per_group * g.s * sh * plane
    steps = -(-g.out_h * g.out_w // lanes)
    rows = steps * lanes
    per_image = (image + wj * rows) * item
    if min_steps is None:
        chunk = BLOCKED_CHUNK_BYTES // per_image
    else:
        chunk = min(-(-min_steps // steps), BLOCKED_CHUNK_CACHE_BYTES // per_image)
    chunk = max(1, min(chunk, -(-g.n // (4 * workers))))
    offsets = blocked_offsets(g.c_per_group, g, sh, g.out_w, plane)
    offsets = np.concatenate([offsets, np.zeros(-offsets.size % wq, np.intp)])
    partial = g.groups * -(-g.k_per_group // wj) * wj * offsets.size * (kept_lanes or lanes)
    layout = BlockedWeightLayout(workers, chunk, plane, offsets, chunk * image, chunk * wj * rows, partial)
    if workers * (layout.xs + layout.gs + partial) * item > limit:
        return None
    return layout


def blocked_weight_gradient(kernel: Callable[..., None], layout: BlockedWeightLayout | None,
                            g: ConvGeometry) -> np.ndarray | None:
    """The weight gradient from a backend's channel-blocked kernel, called as ``kernel(gw,
    partial, xs, gs, layout)`` with the (K, C/g*R*S) result to fill, the zeroed partial sums
    and the buffers of ``layout`` (:func:`blocked_weight_layout`);
    None when there is no layout (the kernel should not run) or the result is not finite:
    the spare lanes of a plane's last tile multiply zeros with whatever input lies there, so an
    Inf or NaN input can spoil a finite gradient, and the caller recomputes (with the row-wise
    direct kernel)."""
    if layout is None:
        return None
    gw = np.empty(g.weight_shape, g.dtype)
    kernel(gw.reshape(g.k, -1), np.zeros((layout.workers, layout.partial), g.dtype),
           aligned_rows(layout.workers, layout.xs, g.dtype), aligned_rows(layout.workers, layout.gs, g.dtype), layout)
    return gw if np.isfinite(gw).all() else None


def pass_channels(g: ConvGeometry, rotate: bool) -> tuple[int, int]:
    """(input, output) channels per group of a forward pass with the layer's weight, or with
    ``rotate`` of the input gradient's (:func:`input_grad_kernel`): (C/g, K/g) or (K/g, C/g)."""
    return (g.k_per_group, g.c_per_group) if rotate else (g.c_per_group, g.k_per_group)


def blocked_weights_shape(g: ConvGeometry, rotate: bool, kblock: int) -> tuple[int, int, int]:
    """The shape of a channel-blocked pass's weights in the order its tiles read them,
    (groups, blocks * T, kblock): blocks of ``kblock`` of the pass's output channels per group
    and T = cin * R * S taps, for the layer's weight or, with ``rotate``, the input gradient's
    (:func:`input_grad_kernel`: cin = K/g, cout = C/g).  Entry ``[g, b*T + t, j]`` is the weight of
    output channel ``b*kblock + j`` of group g at tap t = (i*R + r)*S + s, zero past the group's
    last channel; the backends' compiled ``blocked_weights`` fill it."""
    cin, cout = pass_channels(g, rotate)
    return g.groups, -(-cout // kblock) * cin * g.r * g.s, kblock


#: OpenBLAS's cores with AVX-512 kernels, as threadpoolctl names them (lowercased)
AVX512_OPENBLAS_CORES = frozenset({"skylakex", "cooperlake", "sapphirerapids"})


def blas_is_narrower(avx512_cpu: bool, openblas_cores: list[str]) -> bool:
    """Whether the BLAS that im2col and Winograd call runs narrower vectors than the core
    offers the direct kernels: an AVX-512 target (``avx512_cpu``) and OpenBLAS running
    another core's kernels (every core of ``openblas_cores`` known and none with AVX-512).
    That is OpenBLAS pinned to an older core (``OPENBLAS_CORETYPE=Haswell``, as on one 2-core
    Zen 5 VM) or one that does not know the CPU.  Measured there (2 threads, float32, direct /
    Winograd time, in-process alternation), Cython: 16 -> 32 channels on 28x28 planes
    0.44-0.65, mnist-c2 0.6-0.9, cifar-64 0.82-0.96, 64 channels on 56x56 0.95, 128 on 16x16
    1.03-1.33, 256 on 7x7 0.63 (forward and input gradient; the dilated layer's weight
    gradient 1.21, its other passes 0.88-0.96); with the pin lifted (OpenBLAS picked SkylakeX)
    Winograd won from 64 channels as on other machines (cifar-64 direct / Winograd 1.2-1.5; 32
    channels 0.73-1.09).  Pointwise weight gradients there, direct / im2col time: 4096 to
    32768 weights 0.69-0.80, 65536 0.97-1.54, 512 -> 512 channels 2.2.  Numba: 16 channels on
    28x28 0.64-0.73, 32 on 28x28 0.89-1.02, mnist-c2 0.81-0.88, cifar-64 1.33-1.52, 128 on
    16x16 1.50-1.75; with the pin lifted 16 channels 0.88-0.93, 32 0.89-1.33, mnist-c2
    0.95-1.17, cifar-64 1.7-2.3."""
    known = [core.lower() for core in openblas_cores if core]
    return avx512_cpu and bool(known) and not any(core in AVX512_OPENBLAS_CORES for core in known)


#: up to this many outputs per group, a one-channel 3x3 stride-1 layer's forward pass runs
#: the flat-plane direct kernel faster than im2col (im2col wins from 16 outputs)
FLAT3X3_MAX_OUTPUTS = 8


def flat3x3_preferred(op: str, g: ConvGeometry, threads: int) -> bool:
    """Whether ``algorithm="auto"`` should run ``op`` with the flat-plane 3x3 direct kernel:
    one input channel per group, 3x3 stride 1, at least ``threads`` (image, group) work units
    (with fewer the kernel does not run: :func:`flat3x3_buffers`), and either the forward
    pass with at most :data:`FLAT3X3_MAX_OUTPUTS` outputs per group or the input gradient,
    which sums every output channel into the group's one plane; not the weight gradient
    (whose nine running sums per channel pair lost to im2col).  Measured on the stripe-c1
    layer, one thread: 0.54 vs 0.68 ms forward (Cython), 0.31 vs 0.44 ms (Numba).  Input
    gradients, 2 threads, 8-400 images of 16x16 to 128x128 planes with 8-64 outputs: im2col
    time / direct time 1.23-1.76 (Cython), 1.23-2.09 (Numba); one image (the row-wise
    fallback): 0.35 (Cython), 1.09 (Numba)."""
    if op == "conv2d_backward_weight" or g.c_per_group != 1 or (g.r, g.s) != (3, 3) or g.stride != (1, 1):
        return False
    if g.n * g.groups < threads:
        return False
    return op == "conv2d_backward_input" or g.k_per_group <= FLAT3X3_MAX_OUTPUTS
