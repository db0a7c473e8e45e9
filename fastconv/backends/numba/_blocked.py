"""The channel-blocked stride-1 direct convolution of the numba backend (private).

The same algorithm as the Cython kernel (``fastconv/backends/cython/_direct.pyx``,
"channel-blocked"): each (image, group)'s input is unfolded along the kernel's columns
only, ``xs[(c*S + s)*plane + i*Wo + o]`` = padded input (i, o + s*dw), so that output flat
f = oh*Wo + ow reads tap (c, r, s) at the constant offset (c*S + s)*plane + r*dh*Wo.  A
register tile of ``KBLOCK`` output channels by ``VBLOCK`` flat outputs accumulates over every
tap and is stored straight into the output.

LLVM's vectoriser does not keep a tile of 8 x 16 sums in registers when it is written as
loops over a stack array, so the tile is one intrinsic (:func:`_tile`) that emits the
vector code itself: eight ``<VBLOCK x T>`` accumulators, per tap one vector load of the
input, eight broadcast weights and eight ``llvm.fmuladd``.  LLVM splits the vectors into
the target's registers.  The intrinsic reads and writes through raw pointers, so the
caller checks, once per call, that every access it will make is inside its arrays.
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
#: accumulators ran 1.4x faster than 8 zmm ones on the stripe-c2 layer, Zen 4)
PART = 8

_PAR = dict(parallel=True, cache=True, nogil=True)
_SER = dict(cache=True, nogil=True)
_INL = dict(inline="always", cache=True, nogil=True)


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
        elty = context.get_data_type(sig.args[0].dtype)
        vty = ir.VectorType(elty, PART)
        align = context.get_abi_sizeof(elty)
        i64 = ir.IntType(64)
        parts = range(0, VBLOCK, PART)

        def const(value):
            return ir.Constant(i64, value)

        def data(index, value):
            return context.make_array(sig.args[index])(context, builder, value).data

        def splat(scalar):
            one = builder.insert_element(ir.Constant(vty, ir.Undefined), scalar, ir.Constant(ir.IntType(32), 0))
            return builder.shuffle_vector(one, ir.Constant(vty, ir.Undefined),
                                          ir.Constant(ir.VectorType(ir.IntType(32), PART), [0] * PART))

        def vector_at(base, offset):
            return builder.bitcast(builder.gep(base, [offset]), vty.as_pointer())

        xp = builder.gep(data(0, xs_), [x0_])
        wp = builder.gep(data(2, wt_), [w0_])
        offp, bp = data(4, offs_), data(6, b_)
        op = builder.gep(data(7, out_), [o0_])
        # llvmlite's declare_intrinsic does not name vector types
        fmuladd = cgutils.get_or_insert_function(builder.module, ir.FunctionType(vty, [vty] * 3),
                                                 f"llvm.fmuladd.v{PART}f{8 * align}")
        acc = [[cgutils.alloca_once(builder, vty) for _ in parts] for _ in range(KBLOCK)]
        for j in range(KBLOCK):
            bj = splat(builder.load(builder.gep(bp, [const(j)])))
            for a in acc[j]:
                builder.store(bj, a)
        with cgutils.for_range(builder, taps_) as loop:
            t = loop.index
            x0 = builder.load(builder.gep(offp, [t]))
            xv = [builder.load(vector_at(xp, builder.add(x0, const(p))), align=align) for p in parts]
            wrow = builder.gep(wp, [builder.mul(t, const(KBLOCK))])
            for j in range(KBLOCK):
                w = splat(builder.load(builder.gep(wrow, [const(j)])))
                for a, x in zip(acc[j], xv):
                    builder.store(builder.call(fmuladd, [x, w, builder.load(a)]), a)
        for j in range(KBLOCK):
            with builder.if_then(builder.icmp_signed("<", const(j), nk_)):
                row = builder.mul(const(j), ldo_)
                for a, p in zip(acc[j], parts):
                    builder.store(builder.load(a), vector_at(op, builder.add(row, const(p))), align=align)
        return context.get_dummy_value()

    return types.none(xs, types.int64, wt, types.int64, offs, types.int64, b, out, types.int64, types.int64,
                      types.int64), codegen


@njit(**_INL)
def _unfold_columns(xf, s0, planes, h, wd, ns, dw, pt, pl, hp, wo, plane, dst, d0):
    """dst[d0 + (c*ns + s)*plane + i*wo + o] = x[s0 + (c*h + i - pt)*wd + o + s*dw - pl] (0 outside
    the h x wd planes), zeros in the slack after each plane; ``pt`` / ``pl`` may be negative.
    With wd == wo a plane's valid rows are one flat copy, the wrapped-in columns zeroed after."""
    zero = dst.dtype.type(0)
    i0 = min(max(pt, 0), hp)
    i1 = max(min(h + pt, hp), i0)
    for c in range(planes):
        for s in range(ns):
            base = d0 + (c * ns + s) * plane
            off = s * dw - pl
            lo = min(max(-off, 0), wo)
            hi = max(min(wd - off, wo), lo)
            _fill(dst, base, i0 * wo, zero)
            src = s0 + (c * h + i0 - pt) * wd + off  # row i0 of the plane, shifted by the tap
            if wd == wo and hi > lo and i1 > i0:
                _copy(dst, base + i0 * wo + lo, xf, src + lo, 1, (i1 - i0 - 1) * wo + hi - lo)
                if lo > 0 or hi < wo:
                    for i in range(i0, i1):
                        _fill(dst, base + i * wo, lo, zero)
                        _fill(dst, base + i * wo + hi, wo - hi, zero)
            else:
                for i in range(i0, i1):
                    _fill(dst, base + i * wo, lo, zero)
                    _copy(dst, base + i * wo + lo, xf, src + (i - i0) * wd + lo, 1, hi - lo)
                    _fill(dst, base + i * wo + hi, wo - hi, zero)
            _fill(dst, base + i1 * wo, plane - i1 * wo, zero)


@njit(**_SER)
def _blocked_unit(xf, x0, wf, w0, offs, bpad, of, o0, xw, stage, bb, cg, h, wd, kg, ho, wo, nr, ns, dh, dw, pt, pl,
                  plane):
    """One (image, group): outputs of (flat) ``of[o0:]``, Kg planes, from the Cg input planes at
    ``xf[x0:]``, the group's weights at ``wf[w0:]`` and biases at ``bpad[0:]`` (see above).
    A function of its own: inside the ``prange`` body the same code ran 1.3x slower."""
    taps, f = cg * nr * ns, ho * wo
    _unfold_columns(xf, x0, cg, h, wd, ns, dw, pt, pl, ho + (nr - 1) * dh, wo, plane, xw, 0)
    for kb in range(-(-kg // KBLOCK)):
        nk = min(KBLOCK, kg - kb * KBLOCK)
        for j in range(KBLOCK):
            bb[j] = bpad[kb * KBLOCK + j] if j < nk else 0
        wk, ok = w0 + kb * taps * KBLOCK, o0 + kb * KBLOCK * f
        for f0 in range(0, f, VBLOCK):
            if f0 + VBLOCK <= f:
                _tile(xw, f0, wf, wk, offs, taps, bb, of, ok + f0, f, nk)
            else:  # the last, partial tile goes through the stage
                _tile(xw, f0, wf, wk, offs, taps, bb, stage, 0, VBLOCK, nk)
                for j in range(nk):
                    _copy(of, ok + j * f + f0, stage, j * VBLOCK, 1, f - f0)


@njit(**_PAR)
def conv2d_blocked(x, wt, bias, out, xs, counter, plane, nr, ns, pt, pl, dh, dw, groups):
    """Stride-1 convolution with channel-blocked register tiles on ``xs.shape[0]`` workers, one
    (image, group) per work unit taken from the shared ``counter``.

    ``wt[g, kb*T + t, j]`` is weight (g*Kg + kb*KBLOCK + j, c, r, s) for tap t = (c*R + r)*S + s,
    zero past Kg (``fastconv.backends.base.blocked_weights``); a worker's row of ``xs`` holds
    Cg*S unfolded planes of ``plane`` elements (``fastconv.backends.base.blocked_buffers``).
    ``pt`` / ``pl`` may be negative (the input gradient runs this with padding dil*(R-1) - pad).
    """
    n, c, h, wd = x.shape
    k, ho, wo = out.shape[1], out.shape[2], out.shape[3]
    cg, kg = c // groups, k // groups
    taps, f = cg * nr * ns, ho * wo
    tiles, blocks = -(-f // VBLOCK), -(-kg // KBLOCK)
    offs = np.empty(taps, np.int64)
    for cc in range(cg):
        for r in range(nr):
            for s in range(ns):
                offs[(cc * nr + r) * ns + s] = (cc * ns + s) * plane + r * dh * wo
    # every access of _tile stays inside its arrays: the last tile's reads inside a plane's
    # slack, weights of every block, outputs of the valid channels (partial tiles go via stage)
    if (taps and (offs[taps - 1] + tiles * VBLOCK > cg * ns * plane or cg * ns * plane > xs.shape[1]
                  or wt.shape[1] != blocks * taps or wt.shape[2] != KBLOCK)):
        raise ValueError("conv2d_blocked: buffers too small for the geometry")
    bpad = np.zeros(k + KBLOCK, out.dtype)
    bpad[:k] = bias
    xf, of, wf = x.reshape(x.size), out.reshape(out.size), wt.reshape(wt.size)
    units = n * groups
    for worker in prange(xs.shape[0]):
        xw = xs[worker]
        stage = np.empty(KBLOCK * VBLOCK, out.dtype)
        bb = np.empty(KBLOCK, out.dtype)
        u = _next_block(counter)
        while u < units:
            i, g = u // groups, u % groups
            _blocked_unit(xf, (i * c + g * cg) * h * wd, wf, g * blocks * taps * KBLOCK, offs, bpad[g * kg:], of,
                          (i * k + g * kg) * f, xw, stage, bb, cg, h, wd, kg, ho, wo, nr, ns, dh, dw, pt, pl, plane)
            u = _next_block(counter)
