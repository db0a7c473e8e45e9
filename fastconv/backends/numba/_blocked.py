"""The channel-blocked direct convolution of the numba backend (private).

The same algorithms as the Cython kernels (``fastconv/backends/cython/_direct.pyx``,
"channel-blocked"): each (image, group)'s input is unfolded along the kernel's columns only
and split into the vertical stride's row phases, ``xs[((c*S + s)*sh + p)*plane + q*Wo + o]``
= padded input (q*sh + p, o*sw + s*dw), so that output flat f = oh*Wo + ow reads tap (c, r, s)
at a constant offset (``fastconv.backends.base.blocked_offsets``).  A register tile of
``KBLOCK`` output channels by ``VBLOCK`` flat outputs accumulates over every tap and is stored
straight into the output; the weight gradient's tile holds ``WJ`` channels by ``WQ`` taps of
``WV`` partial sums.

LLVM's vectoriser does not keep a tile of 8 x 16 sums in registers when it is written as
loops over a stack array, so each tile is one intrinsic (:func:`_tile`, :func:`_wtile`) that
emits the vector code itself: ``<PART x T>`` accumulators, per tap one vector load of the
input, broadcast weights and ``llvm.fmuladd``.  The accumulators must fit the target's
vector registers (:func:`target_registers`): with AVX-512's 32 a tile is one panel of 16
(8 channels by 2 vectors), with 16 registers (AVX2, SSE) it runs as panels of fewer channels
that each pass over the taps, and the weight-gradient tile over its channels in chunks.  The
intrinsics read and write through raw pointers, so the kernels check, once per call, that
every access they will make is inside their arrays.
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from ._kernels import _copy, _fill
from ._winograd import _next_block

#: output channels and flat outputs of one register tile
KBLOCK = 8
VBLOCK = 16
#: lanes per LLVM vector: a tile row is VBLOCK // PART vectors (ymm for float32; 16 ymm
#: accumulators ran 1.4x faster than 8 zmm ones on the stripe-c2 layer, Zen 4; on the 2-core
#: Xeon, two 512-bit FMA units per core, PART = 16 ran the forward passes of resnet-stem 1.34x,
#: vgg-224 1.12x and mnist-c2 1.25x faster (two threads).  Not switched: the choice would need
#: to know the core, and the weight-gradient tile's WV = 8 lanes are one PART-wide vector too)
PART = 8
#: output channels, taps and partial sums (lanes) per (channel, tap) pair of one
#: weight-gradient tile: 24 accumulators, fed by 4 + 6 vector loads (as the Cython tile)
WJ = 4
WQ = 6
WV = 8

#: see ``_blocked_unit``: in-place planes from which tiles go one by one, and the input per
#: panel of tiles of an unfolded plane
COLUMNS_OUTER_BYTES = 1 << 19
PANEL_BYTES = 1 << 19


def target_registers() -> tuple[int, int]:
    """(bytes per vector register, registers the accumulators of one tile may take) of the CPU
    numba compiles for: the host, or ``NUMBA_CPU_NAME`` / ``NUMBA_CPU_FEATURES`` where set.

    Sixteen ymm accumulators on an AVX2 core (16 registers, a Zen 3) left no room for the
    inputs and the broadcast weight, and the weight-gradient tile's 24 none at all: LLVM
    spilled them to the stack in the inner loops.  Measured there, one thread, float32: the
    blocked forward passes of mnist-c2 and pw-1x1 went from 41 to 71-80 GFLOP/s (of a measured
    sgemm peak of 92) with two panels of 4 channels, the weight gradients of mnist-c2, pw-1x1
    and resnet-stem from 29-33 to 48-69 with chunks of 2 channels that load one tap's input at
    a time (loaded all at once, as before, the chunks alone gave 32).
    """
    from numba.core import config

    if config.CPU_NAME in (None, "host"):
        import llvmlite.binding as ll

        have = {name for name, on in ll.get_host_cpu_features().items() if on}
    else:  # a named CPU: only the features listed with it count (fewer registers than the name
        # may imply costs speed, never correctness: "generic" with none listed is SSE2)
        have = {f[1:] for f in (config.CPU_FEATURES or "").split(",") if f.startswith("+")}
    if "avx512f" in have:
        return 64, 24
    return (32 if "avx" in have else 16), 12


def _panel(width: int, per_item: int, budget: int) -> int:
    """The largest divisor of ``width`` whose items, ``per_item`` registers each, fit ``budget``
    registers (at least 1)."""
    return max(d for d in range(1, width + 1) if width % d == 0 and (d * per_item <= budget or d == 1))


def _fitting(width: int, vectors: int, itemsize: int) -> int:
    """:func:`_panel` for items of ``vectors`` ``<PART x T>`` accumulators of ``itemsize``-byte
    elements on the compile target (a vector wider than its registers takes several)."""
    reg_bytes, budget = target_registers()
    return _panel(width, vectors * max(1, PART * itemsize // reg_bytes), budget)


_PAR = dict(parallel=True, cache=True, nogil=True)
_SER = dict(cache=True, nogil=True)
_INL = dict(inline="always", cache=True, nogil=True)


def _codegen_tools(context, builder, dtype):
    """(vector type, element alignment, constant(), splat(), vector_at(), fmuladd) for emitting
    ``<PART x dtype>`` code in an intrinsic."""
    elty = context.get_data_type(dtype)
    vty = ir.VectorType(elty, PART)
    align = context.get_abi_sizeof(elty)
    i64 = ir.IntType(64)

    def const(value):
        return ir.Constant(i64, value)

    def splat(scalar):
        one = builder.insert_element(ir.Constant(vty, ir.Undefined), scalar, ir.Constant(ir.IntType(32), 0))
        return builder.shuffle_vector(one, ir.Constant(vty, ir.Undefined),
                                      ir.Constant(ir.VectorType(ir.IntType(32), PART), [0] * PART))

    def vector_at(base, offset):
        return builder.bitcast(builder.gep(base, [offset]), vty.as_pointer())

    # llvmlite's declare_intrinsic does not name vector types
    fmuladd = cgutils.get_or_insert_function(builder.module, ir.FunctionType(vty, [vty] * 3),
                                             f"llvm.fmuladd.v{PART}f{8 * align}")
    return vty, align, const, splat, vector_at, fmuladd


def _data(context, builder, arytype, value):
    """The data pointer of a numba array argument."""
    return context.make_array(arytype)(context, builder, value).data


@intrinsic
def _tile(typingctx, xs, x0, wt, w0, offs, taps, b, out, o0, ldo, nk):
    """out[o0 + j*ldo + v] = b[j] + sum_t wt[w0 + t*KBLOCK + j] * xs[x0 + offs[t] + v] for
    v < VBLOCK, j < nk (b has KBLOCK entries).  Unchecked: the caller guarantees the ranges."""
    if not all(isinstance(a, types.Array) for a in (xs, wt, b, out, offs)) or offs.dtype != types.int64:
        return None
    if len({a.dtype for a in (xs, wt, b, out)}) != 1:
        return None

    def codegen(context, builder, sig, args):
        xs_, x0_, wt_, w0_, offs_, taps_, b_, out_, o0_, ldo_, nk_ = args
        vty, align, const, splat, vector_at, fmuladd = _codegen_tools(context, builder, sig.args[0].dtype)
        parts = range(0, VBLOCK, PART)
        xp = builder.gep(_data(context, builder, sig.args[0], xs_), [x0_])
        wp = builder.gep(_data(context, builder, sig.args[2], wt_), [w0_])
        offp, bp = _data(context, builder, sig.args[4], offs_), _data(context, builder, sig.args[6], b_)
        op = builder.gep(_data(context, builder, sig.args[7], out_), [o0_])
        width = _fitting(KBLOCK, len(parts), align)
        for j0 in range(0, KBLOCK, width):  # panels of channels whose sums fit the registers
            channels = range(j0, j0 + width)
            acc = {j: [cgutils.alloca_once(builder, vty) for _ in parts] for j in channels}
            for j in channels:
                bj = splat(builder.load(builder.gep(bp, [const(j)])))
                for a in acc[j]:
                    builder.store(bj, a)
            with cgutils.for_range(builder, taps_) as loop:
                t = loop.index
                x0 = builder.load(builder.gep(offp, [t]))
                xv = [builder.load(vector_at(xp, builder.add(x0, const(p))), align=align) for p in parts]
                wrow = builder.gep(wp, [builder.mul(t, const(KBLOCK))])
                for j in channels:
                    w = splat(builder.load(builder.gep(wrow, [const(j)])))
                    for a, x in zip(acc[j], xv):
                        builder.store(builder.call(fmuladd, [x, w, builder.load(a)]), a)
            for j in channels:
                with builder.if_then(builder.icmp_signed("<", const(j), nk_)):
                    row = builder.mul(const(j), ldo_)
                    for a, p in zip(acc[j], parts):
                        builder.store(builder.load(a), vector_at(op, builder.add(row, const(p))), align=align)
        return context.get_dummy_value()

    return types.none(xs, types.int64, wt, types.int64, offs, types.int64, b, out, types.int64, types.int64,
                      types.int64), codegen


@intrinsic
def _wtile(typingctx, xs, x0, xstride, offs, o0, g, g0, gstride, ldg, tiles, nimg, acc, a0):
    """acc[a0 + (j*WQ + q)*WV + v] += sum over images i < nimg and flat outputs f < tiles*WV,
    f = v mod WV, of g[g0 + i*gstride + j*ldg + f] * xs[x0 + i*xstride + offs[o0 + q] + f], for
    j < WJ, q < WQ.  Unchecked: the caller guarantees the ranges."""
    if not all(isinstance(a, types.Array) for a in (xs, offs, g, acc)) or offs.dtype != types.int64:
        return None
    if len({a.dtype for a in (xs, g, acc)}) != 1:
        return None

    def codegen(context, builder, sig, args):
        xs_, x0_, xstride_, offs_, o0_, g_, g0_, gstride_, ldg_, tiles_, nimg_, acc_, a0_ = args
        vty, align, const, splat, vector_at, fmuladd = _codegen_tools(context, builder, sig.args[0].dtype)
        parts = range(0, WV, PART)
        xp = builder.gep(_data(context, builder, sig.args[0], xs_), [x0_])
        offp = builder.gep(_data(context, builder, sig.args[3], offs_), [o0_])
        gp = builder.gep(_data(context, builder, sig.args[5], g_), [g0_])
        ap = builder.gep(_data(context, builder, sig.args[11], acc_), [a0_])
        offs = [builder.load(builder.gep(offp, [const(q)])) for q in range(WQ)]
        width = _fitting(WJ, WQ * len(parts), align)
        for j0 in range(0, WJ, width):  # chunks of channels whose sums fit the registers
            channels = range(j0, j0 + width)
            slots = {j: [[cgutils.alloca_once(builder, vty) for _ in parts] for _ in range(WQ)] for j in channels}
            for j in channels:
                for q in range(WQ):
                    for slot, p in zip(slots[j][q], parts):
                        builder.store(builder.load(vector_at(ap, const((j * WQ + q) * WV + p)), align=align), slot)
            with cgutils.for_range(builder, nimg_) as images:
                xi = builder.mul(images.index, xstride_)
                gi = builder.mul(images.index, gstride_)
                with cgutils.for_range(builder, tiles_) as loop:
                    f = builder.mul(loop.index, const(WV))
                    gv = {j: [builder.load(vector_at(gp, builder.add(builder.add(gi, builder.add(
                        builder.mul(const(j), ldg_), f)), const(p))), align=align) for p in parts] for j in channels}
                    for q in range(WQ):  # one tap's input at a time: live are the sums, gv and one x
                        xv = [builder.load(vector_at(xp, builder.add(builder.add(xi, offs[q]), builder.add(f, const(p)))),
                                           align=align) for p in parts]
                        for j in channels:
                            for slot, x, y in zip(slots[j][q], xv, gv[j]):
                                builder.store(builder.call(fmuladd, [y, x, builder.load(slot)]), slot)
            for j in channels:
                for q in range(WQ):
                    for slot, p in zip(slots[j][q], parts):
                        builder.store(builder.load(slot), vector_at(ap, const((j * WQ + q) * WV + p)), align=align)
        return context.get_dummy_value()

    i64 = types.int64
    return types.none(xs, i64, i64, offs, i64, g, i64, i64, i64, i64, i64, acc, i64), codegen


@njit(inline="always", **_SER)
def _first(offset, stride):
    """Smallest o >= 0 with o*stride + offset >= 0."""
    return 0 if offset >= 0 else (stride - 1 - offset) // stride


@njit(inline="always", **_SER)
def _end(offset, stride, size, n_out):
    """One past the largest o < n_out with o*stride + offset < size (0 if none)."""
    last = size - 1 - offset
    return min(last // stride + 1, n_out) if last >= 0 else 0


@njit(inline="always", **_SER)
def _fill_column(dst, d0, step, n, value):
    """dst[d0 + q*step] = value for q < n."""
    for q in range(n):
        dst[np.uint64(d0 + q * step)] = value


@njit(**_INL)
def _unfold_columns(xf, s0, planes, h, wd, ns, sh, sw, dw, pt, pl, hq, wo, plane, dst, borders):
    """dst[((c*ns + s)*sh + p)*plane + q*wo + o] = x[s0 + (c*h + q*sh + p - pt)*wd + o*sw + s*dw - pl]
    (0 outside the h x wd planes) for q < hq, zeros in the slack after each plane; ``pt`` /
    ``pl`` may be negative.  With stride 1 and wd == wo a plane's valid rows are one flat
    copy, the wrapped-in columns zeroed after.  The rows wholly in the padding, and the slack,
    are the same zeros for every image: written only with ``borders`` (a buffer's first image
    of a call).  The ranges depend on the tap column and row phase only, so the channel loop
    is innermost."""
    zero = dst.dtype.type(0)
    for s in range(ns):
        off = s * dw - pl
        lo = min(_first(off, sw), wo)
        hi = max(_end(off, sw, wd, wo), lo)
        for p in range(sh):
            q0 = min(_first(p - pt, sh), hq)
            q1 = max(_end(p - pt, sh, h, hq), q0)
            flat = sh == 1 and sw == 1 and wd == wo and hi > lo and q1 > q0
            for c in range(planes):
                base = ((c * ns + s) * sh + p) * plane
                if borders:
                    _fill(dst, base, q0 * wo, zero)
                    _fill(dst, base + q1 * wo, plane - q1 * wo, zero)
                src = s0 + (c * h + q0 * sh + p - pt) * wd + off  # row q0, shifted by the tap
                if flat:
                    _copy(dst, base + q0 * wo + lo, xf, src + lo, 1, (q1 - q0 - 1) * wo + hi - lo)
                    for o in range(lo):  # column by column: a few strided stores, no vector loops
                        _fill_column(dst, base + q0 * wo + o, wo, q1 - q0, zero)
                    for o in range(hi, wo):
                        _fill_column(dst, base + q0 * wo + o, wo, q1 - q0, zero)
                else:
                    for q in range(q0, q1):
                        _fill(dst, base + q * wo, lo, zero)
                        _copy(dst, base + q * wo + lo, xf, src + (q - q0) * sh * wd + lo * sw, sw, hi - lo)
                        _fill(dst, base + q * wo + hi, wo - hi, zero)


@njit(**_INL)
def _unfold(xf, s0, planes, h, wd, ns, sh, sw, dw, pt, pl, hq, wo, plane, dst, borders):
    """:func:`_unfold_columns`, inlined with the strides as constants when they are 1 (the
    common case, where LLVM then drops the row-phase and strided loops: 2.7x faster)."""
    if sh == 1 and sw == 1:
        _unfold_columns(xf, s0, planes, h, wd, ns, 1, 1, dw, pt, pl, hq, wo, plane, dst, borders)
    else:
        _unfold_columns(xf, s0, planes, h, wd, ns, sh, sw, dw, pt, pl, hq, wo, plane, dst, borders)


@njit(**_SER)
def _blocked_unit(xf, x0, wf, w0, offs, taps, in_place, bpad, of, o0, xw, stage, cg, h, wd, kg, ho, wo, nr, ns, sh,
                  sw, dh, dw, pt, pl, plane, borders, kb0, kb1):
    """One (image, group), or its blocks ``kb0 <= kb < kb1`` of KBLOCK output channels: outputs of
    (flat) ``of[o0:]``, Kg planes, from the Cg input planes at
    ``xf[x0:]``, the group's weights at ``wf[w0:]`` and biases at ``bpad[0:]`` (see above).
    ``in_place`` (1x1, stride 1, no padding): the tiles read ``xf`` at ``offs[:taps]``, and
    ``xw`` holds only the last, partial tile's columns, read at ``offs[taps:]``.  A function
    of its own: inside the ``prange`` body the same code ran 1.3x slower.  ``borders``: the
    first unit on ``xw`` (see :func:`_unfold_columns`)."""
    f = ho * wo
    full = f - f % VBLOCK
    src, s0 = xf, x0
    if not in_place:
        _unfold(xf, x0, cg, h, wd, ns, sh, sw, dw, pt, pl, ho + (nr - 1) * dh // sh, wo, plane, xw, borders)
        src, s0 = xw, 0
    elif full < f:
        for c in range(cg):
            _copy(xw, c * VBLOCK, xf, x0 + c * plane + full, 1, f - full)
            _fill(xw, c * VBLOCK + f - full, VBLOCK - (f - full), xw.dtype.type(0))
    # the tiles in panels that every channel block sweeps in turn (see the Cython kernel):
    # unfolded, of PANEL_BYTES of input; read in place, single tiles over half of L2, else all
    tiles = full // VBLOCK
    if in_place:
        panel = 1 if taps * f * xw.itemsize > COLUMNS_OUTER_BYTES else max(tiles, 1)
    else:
        panel = max(1, min(tiles, PANEL_BYTES // (taps * VBLOCK * xw.itemsize)))
    for p in range(-(-tiles // panel)):
        for kb in range(kb0, kb1):
            for i in range(p * panel, min(p * panel + panel, tiles)):
                _tile(src, s0 + i * VBLOCK, wf, w0 + kb * taps * KBLOCK, offs, taps, bpad[kb * KBLOCK:], of,
                      o0 + kb * KBLOCK * f + i * VBLOCK, f, min(KBLOCK, kg - kb * KBLOCK))
    if full < f:  # the last, partial tile goes through the stage
        for kb in range(kb0, kb1):
            nk = min(KBLOCK, kg - kb * KBLOCK)
            if in_place:
                _tile(xw, 0, wf, w0 + kb * taps * KBLOCK, offs[taps:], taps, bpad[kb * KBLOCK:], stage, 0, VBLOCK, nk)
            else:
                _tile(xw, full, wf, w0 + kb * taps * KBLOCK, offs, taps, bpad[kb * KBLOCK:], stage, 0, VBLOCK, nk)
            for j in range(nk):
                _copy(of, o0 + kb * KBLOCK * f + j * f + full, stage, j * VBLOCK, 1, f - full)


@njit(**_PAR)
def blocked_weights(w, wt, groups, rotate):
    """The weights of a blocked pass in the order its tiles read them, as the Cython kernel of
    that name: ``wt[g, kb*T + t, j]`` is the weight of the pass's output channel kb*KBLOCK + j of
    group g at tap t = (i*R + r)*S + s, zero past the group's channels; the pass's weight is
    ``w`` or, with ``rotate``, the input gradient's, w[g*K/g + i, o, R-1-r, S-1-s]
    (``fastconv.backends.base.blocked_weights_shape``)."""
    k, cg, nr, ns = w.shape
    kg, rs_n = k // groups, nr * ns
    cin, cout = (kg, cg) if rotate else (cg, kg)
    taps = cin * rs_n
    blocks = wt.shape[1] // taps
    if wt.shape[0] != groups or wt.shape[1] != blocks * taps or blocks * KBLOCK < cout or wt.shape[2] != KBLOCK:
        raise ValueError("blocked_weights: wt has the wrong shape for the weight")
    src = w.reshape(w.size)
    for unit in prange(groups * blocks):
        g, kb = unit // blocks, unit % blocks
        dst = wt[g]
        for t in range(taps):
            i, rs = t // rs_n, t % rs_n
            for j in range(KBLOCK):
                o = kb * KBLOCK + j
                if o >= cout:
                    dst[kb * taps + t, j] = 0
                elif rotate:
                    dst[kb * taps + t, j] = src[((g * kg + i) * cg + o) * rs_n + rs_n - 1 - rs]
                else:
                    dst[kb * taps + t, j] = src[(g * kg + o) * taps + t]


@njit(**_PAR)
def conv2d_blocked(x, wt, bias, out, xs, offs, counter, plane, nr, ns, sh, sw, pt, pl, dh, dw, groups, in_place,
                   parts):
    """Convolution with channel-blocked register tiles on ``xs.shape[0]`` workers, ``parts`` work
    units per (image, group), taken from the shared ``counter``, which share its blocks of KBLOCK
    output channels (each unfolding the input itself: ``parts`` > 1 keeps every worker busy on
    fewer images).

    ``wt[g, kb*T + t, j]`` is weight (g*Kg + kb*KBLOCK + j, c, r, s) for tap t = (c*R + r)*S + s,
    zero past Kg (:func:`blocked_weights`); ``offs[t]`` is where tap t reads
    a worker's row of ``xs``, which holds Cg*S*sh unfolded planes of ``plane`` elements
    (``fastconv.backends.base.blocked_layout`` and ``blocked_offsets``).  ``pt`` / ``pl`` may
    be negative (the input gradient runs this with padding dil*(R-1) - pad).  ``in_place``
    (1x1, stride 1, no padding): the tiles read ``x``'s planes (``plane`` = H*W) at
    ``offs[:T]``, the staged last tile at ``offs[T:]`` = c * VBLOCK.
    """
    n, c, h, wd = x.shape
    k, ho, wo = out.shape[1], out.shape[2], out.shape[3]
    cg, kg = c // groups, k // groups
    f = ho * wo
    taps, full, blocks = offs.size // 2 if in_place else offs.size, f - f % VBLOCK, -(-kg // KBLOCK)
    # every access of _tile stays inside its arrays: reads of the full tiles inside the group's
    # input (in place) or the unfolded buffer, of the last tile inside the stage or the last
    # plane's slack, weights of every block, outputs of the valid channels (partial tiles go
    # through the stage)
    size = cg * h * wd if in_place else cg * ns * sh * plane
    body = offs[:taps]
    ok = (taps == cg * nr * ns and body.min() >= 0 and body.max() + full <= size and wt.shape[1] == blocks * taps
          and wt.shape[2] == KBLOCK)
    if in_place:
        ok = ok and nr == ns == 1 and plane == h * wd and f == plane and offs[taps:].min() >= 0 and (
            offs[taps:].max() + VBLOCK <= xs.shape[1])
    else:
        ok = ok and body.max() + -(-f // VBLOCK) * VBLOCK <= size and size <= xs.shape[1]
    if not ok or parts < 1:
        raise ValueError("conv2d_blocked: buffers too small for the geometry, or parts < 1")
    bpad = np.zeros(k + KBLOCK, out.dtype)
    bpad[:k] = bias
    xf, of, wf = x.reshape(x.size), out.reshape(out.size), wt.reshape(wt.size)
    units = n * groups * parts
    for worker in prange(xs.shape[0]):
        xw = xs[worker]
        stage = np.empty(KBLOCK * VBLOCK, out.dtype)
        borders = True
        u = _next_block(counter)
        while u < units:
            i, g, part = u // parts // groups, u // parts % groups, u % parts
            kb0, kb1 = part * blocks // parts, (part + 1) * blocks // parts
            if kb1 > kb0:
                _blocked_unit(xf, (i * c + g * cg) * h * wd, wf, g * blocks * taps * KBLOCK, offs, taps, in_place,
                              bpad[g * kg:], of, (i * k + g * kg) * f, xw, stage, cg, h, wd, kg, ho, wo, nr, ns, sh,
                              sw, dh, dw, pt, pl, plane, borders, kb0, kb1)
                borders = False
            u = _next_block(counter)


@njit(**_SER)
def _weight_unit(xf, yf, xw, gw, part, offs, n0, nimg, g, c, h, wd, k, groups, ho, wo, nr, ns, sh, sw, pt, pl, dh, dw,
                 plane, ready):
    """One (chunk of ``nimg`` images from ``n0``, group ``g``) of the weight gradient: unfold the
    images into ``xw`` (its first ``ready`` image slots hold their zero borders already), read
    each block's output gradients in place (a full block of whole tiles) or staged in ``gw``, add
    the tiles into ``part``.  A function of its
    own, as :func:`_blocked_unit`: a smaller ``prange`` body also compiles faster."""
    cg, kg, f = c // groups, k // groups, ho * wo
    tiles = -(-f // WV)
    ldg, xstride = tiles * WV, cg * ns * sh * plane
    blocks, tap_blocks = -(-kg // WJ), offs.size // WQ
    zero = gw.dtype.type(0)
    for i in range(nimg):
        _unfold(xf, ((n0 + i) * c + g * cg) * h * wd, cg, h, wd, ns, sh, sw, dw, pt, pl, ho + (nr - 1) * dh // sh, wo,
                plane, xw[i * xstride:], i >= ready)
    for kb in range(blocks):
        if f % WV == 0 and (kb + 1) * WJ <= kg:  # a full block of channels and no spare lanes: read gy in place
            rows, r0, image, row = yf, (n0 * k + g * kg + kb * WJ) * f, k * f, f
        else:  # the block's rows copied into the zero-padded stage
            for i in range(nimg):
                for j in range(WJ):
                    d0 = (i * WJ + j) * ldg
                    if kb * WJ + j < kg:
                        _copy(gw, d0, yf, ((n0 + i) * k + g * kg + kb * WJ + j) * f, 1, f)
                        _fill(gw, d0 + f, ldg - f, zero)
                    else:
                        _fill(gw, d0, ldg, zero)
            rows, r0, image, row = gw, 0, WJ * ldg, ldg
        for tb in range(tap_blocks):
            _wtile(xw, 0, xstride, offs, tb * WQ, rows, r0, image, row, tiles, nimg, part,
                   ((g * blocks + kb) * tap_blocks + tb) * (WJ * WQ * WV))


@njit(**_PAR)
def conv2d_backward_weight_blocked(gy, x, gw, partial, xs, gs, offs, counter, chunk, plane, nr, ns, sh, sw, pt, pl,
                                   dh, dw, groups):
    """Weight gradient with channel-blocked register tiles on ``xs.shape[0]`` workers, one (chunk
    of ``chunk`` images, group) per work unit taken from the shared ``counter``; the algorithm of
    the Cython kernel (``_direct.pyx``, "The weight gradient in the same layout").

    Per worker: ``xs`` holds ``chunk`` unfolded inputs of Cg*S*sh planes of ``plane`` elements,
    ``gs`` ``chunk`` * WJ zero-padded output-gradient rows of ceil(Ho*Wo / WV) * WV,
    ``partial`` the sums ``[g, kb, tb, j, q, v]`` for tap blocks tb of ``offs`` (a multiple of WQ
    taps; ``fastconv.backends.base.blocked_weight_layout``).  ``partial`` must be zero on entry.
    The result goes to ``gw``, the (K, Cg*R*S) weight gradient: the float64 sum over workers
    and lanes of each (channel, tap)'s partial sums (as the Cython kernel).
    """
    n, c, h, wd = x.shape
    k, ho, wo = gy.shape[1], gy.shape[2], gy.shape[3]
    cg, kg = c // groups, k // groups
    f = ho * wo
    tiles = -(-f // WV)
    ldg, xstride = tiles * WV, cg * ns * sh * plane
    blocks, tap_blocks = -(-kg // WJ), offs.size // WQ
    # every access of _wtile stays inside its arrays (gy's too, read in place: n images)
    if (gy.shape[0] != n or offs.size % WQ or offs.min() < 0 or offs.max() + ldg > xstride or chunk * xstride > xs.shape[1]
            or chunk * WJ * ldg > gs.shape[1] or partial.shape[1] != groups * blocks * tap_blocks * WJ * WQ * WV
            or gw.shape[0] != k or gw.shape[1] > tap_blocks * WQ):
        raise ValueError("conv2d_backward_weight_blocked: buffers or output gradient do not fit the geometry")
    xf, yf = x.reshape(x.size), gy.reshape(gy.size)
    units = -(-n // chunk) * groups
    for worker in prange(xs.shape[0]):
        xw, stage, part = xs[worker], gs[worker], partial[worker]
        ready = 0  # image slots of xw that hold their zero borders
        u = _next_block(counter)
        while u < units:
            n0, g = u // groups * chunk, u % groups
            nimg = min(chunk, n - n0)
            _weight_unit(xf, yf, xw, stage, part, offs, n0, nimg, g, c, h, wd, k, groups, ho, wo, nr, ns, sh, sw, pt, pl,
                         dh, dw, plane, ready)
            ready = max(ready, nimg)
            u = _next_block(counter)
    taps = gw.shape[1]
    for e in prange(k * taps):  # a second parallel loop: every partial is complete
        wk, wt = e // taps % kg, e % taps
        src = ((((e // taps // kg * blocks + wk // WJ) * tap_blocks + wt // WQ) * WJ + wk % WJ) * WQ + wt % WQ) * WV
        total = 0.0
        for worker in range(partial.shape[0]):
            for v in range(WV):
                total += partial[worker, src + v]
        gw[e // taps, wt] = total
