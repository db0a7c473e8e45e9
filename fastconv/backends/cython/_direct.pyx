# cython: language_level=3
"""Direct convolution kernels (no workspace): forward, backward-input, backward-weight.

Each kernel splits its work into independent units handed to OpenMP (``prange``)
and, inside a unit, walks output rows; for every kernel tap it runs one
contiguous, bounds-test-free loop over the valid output columns (see
``_loops.pxd``), which the C compiler vectorises for stride 1.  The GIL is
released throughout.  Shapes are trusted: they come from a validated
``ConvGeometry``.
"""

from cython cimport floating
from cython.parallel cimport parallel, prange, threadid
from libc.stdlib cimport free, malloc
from libc.string cimport memcpy

import numpy as np

from ._loops cimport _rows_per_chunk, axpy, axpy_scatter, end_in, fill, first_in, mul_acc, tap_ranges


def forward(const floating[:, :, :, ::1] x, const floating[:, :, :, ::1] w,
            const floating[::1] bias, floating[:, :, :, ::1] out,
            Py_ssize_t sh, Py_ssize_t sw, Py_ssize_t pt, Py_ssize_t pl,
            Py_ssize_t dh, Py_ssize_t dw, Py_ssize_t groups, int nt):
    """out[n, k] = bias[k] + sum_{c, r, s} w[k, c, r, s] * x[n, g*Cg + c, shifted].

    One work unit per output row (n, k, oh), so a single large image (the
    ``correlate2d`` path, N = C = K = 1) still uses every thread.
    """
    cdef Py_ssize_t N = x.shape[0], H = x.shape[2], W = x.shape[3]
    cdef Py_ssize_t K = w.shape[0], Cg = w.shape[1], R = w.shape[2], S = w.shape[3]
    cdef Py_ssize_t Ho = out.shape[2], Wo = out.shape[3], Kg = K // groups
    cdef Py_ssize_t t, n, k, oh, c, ci, r, s, ih, off
    cdef floating* orow
    cdef const floating* xrow
    cdef Py_ssize_t[::1] ranges = np.empty(2 * S, np.intp)
    cdef Py_ssize_t* lo = &ranges[0]
    cdef Py_ssize_t* hi = &ranges[S]
    tap_ranges(lo, hi, S, dw, pl, sw, W, Wo)
    with nogil:
        for t in prange(N * K * Ho, num_threads=nt, schedule="dynamic", chunksize=_rows_per_chunk(N * K * Ho, nt)):
            oh = t % Ho
            k = (t // Ho) % K
            n = t // (Ho * K)
            orow = &out[n, k, oh, 0]
            fill(orow, bias[k], Wo)
            for c in range(Cg):
                ci = (k // Kg) * Cg + c
                for r in range(R):
                    ih = oh * sh - pt + r * dh
                    if ih < 0 or ih >= H:
                        continue
                    xrow = &x[n, ci, ih, 0]
                    for s in range(S):
                        if hi[s] > lo[s]:
                            axpy(orow + lo[s], xrow + lo[s] * sw + s * dw - pl, w[k, c, r, s], hi[s] - lo[s], sw)


def backward_input(const floating[:, :, :, ::1] gy, const floating[:, :, :, ::1] w,
                   floating[:, :, :, ::1] gx,
                   Py_ssize_t sh, Py_ssize_t sw, Py_ssize_t pt, Py_ssize_t pl,
                   Py_ssize_t dh, Py_ssize_t dw, Py_ssize_t groups, int nt):
    """gx[n, ci] = sum_{k in group, r, s} w[k, c, r, s] * gy[n, k] scattered back.

    One work unit per input plane (n, ci): each thread owns the planes it
    writes, so the scatter needs no atomics.  ``gx`` must be zero on entry.
    """
    cdef Py_ssize_t N = gx.shape[0], C = gx.shape[1], H = gx.shape[2], W = gx.shape[3]
    cdef Py_ssize_t K = w.shape[0], Cg = w.shape[1], R = w.shape[2], S = w.shape[3]
    cdef Py_ssize_t Ho = gy.shape[2], Wo = gy.shape[3], Kg = K // groups
    cdef Py_ssize_t t, n, k, kk, oh, c, ci, r, s, ih
    cdef floating* gxrow
    cdef const floating* gyrow
    cdef Py_ssize_t[::1] ranges = np.empty(2 * S, np.intp)
    cdef Py_ssize_t* lo = &ranges[0]
    cdef Py_ssize_t* hi = &ranges[S]
    tap_ranges(lo, hi, S, dw, pl, sw, W, Wo)
    with nogil:
        for t in prange(N * C, num_threads=nt, schedule="dynamic"):
            n = t // C
            ci = t % C
            c = ci % Cg
            for kk in range(Kg):
                k = (ci // Cg) * Kg + kk
                for oh in range(Ho):
                    gyrow = &gy[n, k, oh, 0]
                    for r in range(R):
                        ih = oh * sh - pt + r * dh
                        if ih < 0 or ih >= H:
                            continue
                        gxrow = &gx[n, ci, ih, 0]
                        for s in range(S):
                            if hi[s] > lo[s]:
                                axpy_scatter(gxrow + lo[s] * sw + s * dw - pl, sw, gyrow + lo[s], w[k, c, r, s],
                                             hi[s] - lo[s])


def backward_weight(const floating[:, :, :, ::1] gy, const floating[:, :, :, ::1] x,
                    floating[:, :, :, ::1] gw,
                    Py_ssize_t sh, Py_ssize_t sw, Py_ssize_t pt, Py_ssize_t pl,
                    Py_ssize_t dh, Py_ssize_t dw, Py_ssize_t groups, int nt):
    """gw[k, c, r, s] = sum_{n, oh, ow} gy[n, k, oh, ow] * x[n, g*Cg + c, shifted].

    One work unit per weight plane (k, c).  Each thread accumulates elementwise
    into a private (R*S, Wo) buffer (a vectorisable loop, unlike a dot
    product) and reduces it once at the end.
    """
    cdef Py_ssize_t N = x.shape[0], H = x.shape[2], W = x.shape[3]
    cdef Py_ssize_t K = gw.shape[0], Cg = gw.shape[1], R = gw.shape[2], S = gw.shape[3]
    cdef Py_ssize_t Ho = gy.shape[2], Wo = gy.shape[3], Kg = K // groups
    cdef Py_ssize_t t, n, k, oh, c, ci, r, s, ih, i
    cdef floating* acc = NULL
    cdef floating total
    cdef const floating* xrow
    cdef const floating* gyrow
    cdef Py_ssize_t[::1] ranges = np.empty(2 * S, np.intp)
    cdef Py_ssize_t* lo = &ranges[0]
    cdef Py_ssize_t* hi = &ranges[S]
    tap_ranges(lo, hi, S, dw, pl, sw, W, Wo)
    with nogil, parallel(num_threads=nt):
        acc = <floating*> malloc(R * S * Wo * sizeof(floating))
        for t in prange(K * Cg, schedule="dynamic"):
            if acc == NULL:
                with gil:
                    raise MemoryError("conv2d_backward_weight: cannot allocate the accumulation buffer")
            k = t // Cg
            c = t % Cg
            ci = (k // Kg) * Cg + c
            fill(acc, 0, R * S * Wo)
            for n in range(N):
                for oh in range(Ho):
                    gyrow = &gy[n, k, oh, 0]
                    for r in range(R):
                        ih = oh * sh - pt + r * dh
                        if ih < 0 or ih >= H:
                            continue
                        xrow = &x[n, ci, ih, 0]
                        for s in range(S):
                            if hi[s] > lo[s]:
                                mul_acc(acc + (r * S + s) * Wo + lo[s], gyrow + lo[s], xrow + lo[s] * sw + s * dw - pl,
                                        hi[s] - lo[s], sw)
            for r in range(R):
                for s in range(S):
                    total = 0
                    for i in range(Wo):
                        total = total + acc[(r * S + s) * Wo + i]
                    gw[k, c, r, s] = total
        free(acc)


cdef inline double _plane_sum(const floating* src, Py_ssize_t P) noexcept nogil:
    """Sum of ``src[:P]`` in float64 with sixteen independent partial sums (vectorisable)."""
    cdef double acc[16]
    cdef double total = 0
    cdef Py_ssize_t p, j, body = P - P % 16
    for j in range(16):
        acc[j] = 0
    for p in range(0, body, 16):
        for j in range(16):
            acc[j] += src[p + j]
    for p in range(body, P):
        total += src[p]
    for j in range(16):
        total += acc[j]
    return total


def bias_grad(const floating[:, :, :, ::1] gy, floating[::1] gb, int nt):
    """gb[k] = sum over (n, oh, ow) of gy[n, k], accumulated in float64 (one unit per channel)."""
    cdef Py_ssize_t N = gy.shape[0], K = gy.shape[1], P = gy.shape[2] * gy.shape[3]
    cdef Py_ssize_t k, n
    cdef double total
    with nogil:
        for k in prange(K, num_threads=nt, schedule="dynamic"):
            total = 0
            for n in range(N):
                total = total + _plane_sum(&gy[n, k, 0, 0], P)
            gb[k] = <floating> total


# --------------------------------------------------------------------------- 3x3, stride 1
#
# The common 3x3 stride-1 case on flat planes.  With the input zero-padded and laid out
# with the output's row length plus the kernel's reach, Wp = Wo + 2*dw, output (oh, ow)
# is flat f = oh*Wp + ow and tap (r, s) reads input flat f + r*dh*Wp + s*dw: a constant
# offset.  The nine taps are then one straight-line expression per output, which the C
# compiler vectorises with the sum in a register (nine loads and nine FMAs per vector, one
# store per input channel), instead of one pass over the outputs per tap.  The 2*dw extra
# columns per row are computed and dropped.  Outputs go in L1-sized segments of whole rows.
# (The weight gradient in the same layout lost to im2col: its nine running sums per (k, c)
# pair stay in memory.)

cdef enum:
    SEGMENT = 4096  # flat outputs per segment (16 KiB of float32)


cdef extern from "_stage.h" nogil:
    void fc_copy(void* dst, const void* src, size_t nbytes)  # a short copy without a call


cdef inline void _pad_planes(const floating* src, Py_ssize_t planes, Py_ssize_t H, Py_ssize_t W,
                             Py_ssize_t pt, Py_ssize_t pl, Py_ssize_t Hp, Py_ssize_t Wp, Py_ssize_t plane,
                             floating* dst) noexcept nogil:
    """dst[p*plane + i*Wp + j] = src[p, i - pt, j - pl] (0 outside the H x W input), zeros in the
    ``plane - Hp*Wp`` slack after each plane.  ``pt`` / ``pl`` may be negative (cropping)."""
    cdef Py_ssize_t p, i, j, ih, lo, hi
    cdef const floating* row
    cdef floating* out
    lo = min(max(pl, 0), Wp)            # first padded column inside the input
    hi = max(min(W + pl, Wp), lo)       # one past the last
    for p in range(planes):
        for i in range(Hp):
            out = dst + p * plane + i * Wp
            ih = i - pt
            if ih < 0 or ih >= H:
                fill(out, 0, Wp)
                continue
            row = src + (p * H + ih) * W
            fill(out, 0, lo)
            fc_copy(out + lo, row + lo - pl, (hi - lo) * sizeof(floating))
            fill(out + hi, 0, Wp - hi)
        fill(dst + p * plane + Hp * Wp, 0, plane - Hp * Wp)


cdef inline void _taps3x3(floating* acc, const floating* xp, const floating* wk, Py_ssize_t a, Py_ssize_t b,
                          Py_ssize_t n, bint first, floating add) noexcept nogil:
    """acc[f] = add + (or +=) the sum of the nine ``wk[r*3 + s] * xp[f + r*a + s*b]``, f < n."""
    cdef Py_ssize_t f
    cdef floating w0 = wk[0], w1 = wk[1], w2 = wk[2], w3 = wk[3], w4 = wk[4]
    cdef floating w5 = wk[5], w6 = wk[6], w7 = wk[7], w8 = wk[8]
    cdef const floating* x0 = xp
    cdef const floating* x1 = xp + a
    cdef const floating* x2 = xp + 2 * a
    if first:
        for f in range(n):
            acc[f] = (add + w0 * x0[f] + w1 * x0[f + b] + w2 * x0[f + 2 * b] + w3 * x1[f] + w4 * x1[f + b]
                      + w5 * x1[f + 2 * b] + w6 * x2[f] + w7 * x2[f + b] + w8 * x2[f + 2 * b])
    else:
        for f in range(n):
            acc[f] += (w0 * x0[f] + w1 * x0[f + b] + w2 * x0[f + 2 * b] + w3 * x1[f] + w4 * x1[f + b]
                       + w5 * x1[f + 2 * b] + w6 * x2[f] + w7 * x2[f + b] + w8 * x2[f + 2 * b])


def forward3x3(const floating[:, :, :, ::1] x, const floating[:, :, :, ::1] w, const floating[::1] bias,
               floating[:, :, :, ::1] out, floating[:, ::1] xpad, floating[:, ::1] stage,
               Py_ssize_t pt, Py_ssize_t pl, Py_ssize_t dh, Py_ssize_t dw, Py_ssize_t groups):
    """3x3 stride-1 convolution on ``xpad.shape[0]`` threads, one (image, group) per work unit.

    Per thread: ``xpad`` holds the group's Cg padded planes (sizes: ``fastconv.backends.base.flat3x3_buffers``),
    ``stage`` at least max(SEGMENT, Wp) accumulators.  ``pt`` / ``pl`` may be negative (the
    input gradient runs this with padding 2*dil - pad).
    """
    cdef Py_ssize_t N = x.shape[0], H = x.shape[2], W = x.shape[3]
    cdef Py_ssize_t K = w.shape[0], Cg = w.shape[1], Ho = out.shape[2], Wo = out.shape[3], Kg = K // groups
    cdef Py_ssize_t Hp = Ho + 2 * dh, Wp = Wo + 2 * dw, plane = Hp * Wp + 2 * dw
    cdef Py_ssize_t rows = max(1, SEGMENT // Wp), t, n, g, k, c, blk, oh0, oh1, oh
    cdef int nt = <int> xpad.shape[0], tid
    cdef floating* xp
    cdef floating* st
    cdef floating* orow
    with nogil, parallel(num_threads=nt):
        tid = threadid()
        xp = &xpad[tid, 0]
        st = &stage[tid, 0]
        for t in prange(N * groups, schedule="dynamic"):
            n = t // groups
            g = t % groups
            _pad_planes(&x[n, g * Cg, 0, 0], Cg, H, W, pt, pl, Hp, Wp, plane, xp)
            for k in range(g * Kg, (g + 1) * Kg):
                orow = &out[n, k, 0, 0]
                for blk in range((Ho + rows - 1) // rows):
                    oh0 = blk * rows
                    oh1 = min(oh0 + rows, Ho)
                    for c in range(Cg):
                        _taps3x3(st, xp + c * plane + oh0 * Wp, &w[k, c, 0, 0], dh * Wp, dw, (oh1 - oh0) * Wp,
                                 c == 0, bias[k])
                    for oh in range(oh0, oh1):  # keep the Wo real columns of every row
                        fc_copy(orow + oh * Wo, st + (oh - oh0) * Wp, Wo * sizeof(floating))


# --------------------------------------------------------------------------- channel-blocked
#
# Layers with many output channels on small planes (8x8 .. 28x28) and first layers.  Each
# image's padded input is unfolded along the kernel's columns only, and split into row phases
# for a vertical stride: ``xs[((c*S + s)*sh + p)*plane + q*Wo + o]`` = padded input
# (q*sh + p, o*sw + s*dw).  Output (oh, ow) is flat f = oh*Wo + ow of a plane, and tap
# (c, r, s) then reads xs at the constant offset ((c*S + s)*sh + (r*dh) % sh)*plane +
# ((r*dh) // sh)*Wo (``fastconv.backends.base.blocked_offsets``): no wasted columns, an S-fold
# copy instead of im2col's R*S-fold one.  A register tile of KBLOCK output channels by
# VBLOCK flat outputs accumulates over every tap (one vector load of the input and KBLOCK
# broadcast weights feed KBLOCK vector FMAs), then goes straight to the output.

cdef enum:
    COLUMNS_OUTER_BYTES = 1 << 19  # in-place planes from which runs go one by one: see _blocked_unit
    PANEL_BYTES = 1 << 19  # input per panel of column runs: see _blocked_unit

cdef extern from "_tile.h" nogil:
    enum:
        KBLOCK "FC_KBLOCK"  # output channels per register tile
        VBLOCK "FC_VBLOCK"  # flat outputs per register tile
    # FC_TGROUP tiles at most side by side (``count``)
    void fc_tiles_f(const float* xs, const float* wt, const Py_ssize_t* offs, Py_ssize_t taps, const float* b,
                    float* out, Py_ssize_t ldo, Py_ssize_t nk, Py_ssize_t count)
    void fc_tiles_d(const double* xs, const double* wt, const Py_ssize_t* offs, Py_ssize_t taps, const double* b,
                    double* out, Py_ssize_t ldo, Py_ssize_t nk, Py_ssize_t count)
    enum:
        TGROUP "FC_TGROUP"  # register tiles side by side (_blocked_unit)
    enum:
        WJ "FC_WJ"  # output channels per weight-gradient tile
        WQ "FC_WQ"  # taps per weight-gradient tile
        WV "FC_WV"  # partial sums (lanes) per (channel, tap) pair of a weight-gradient tile ...
        WV_WIDE "FC_WV_WIDE"  # ... of the wide float tile
        WIDE_OK "FC_WIDE_OK"  # whether the wide tile runs in one register per vector (AVX-512)
    void fc_wtile_f(const float* xs, Py_ssize_t xstride, const Py_ssize_t* offs, const float* g, Py_ssize_t gstride,
                    Py_ssize_t ldg, Py_ssize_t steps, Py_ssize_t nimg, float* acc)
    void fc_wtile_wide_f(const float* xs, Py_ssize_t xstride, const Py_ssize_t* offs, const float* g,
                         Py_ssize_t gstride, Py_ssize_t ldg, Py_ssize_t steps, Py_ssize_t nimg, float* acc)
    void fc_wtile_d(const double* xs, Py_ssize_t xstride, const Py_ssize_t* offs, const double* g,
                    Py_ssize_t gstride, Py_ssize_t ldg, Py_ssize_t steps, Py_ssize_t nimg, double* acc)


cdef inline void _unfold_columns(const floating* src, Py_ssize_t C, Py_ssize_t H, Py_ssize_t W, Py_ssize_t S,
                                 Py_ssize_t sh, Py_ssize_t sw, Py_ssize_t dw, Py_ssize_t pt, Py_ssize_t pl,
                                 Py_ssize_t Hq, Py_ssize_t Wo, Py_ssize_t plane, floating* dst,
                                 bint borders) noexcept nogil:
    """dst[((c*S + s)*sh + p)*plane + q*Wo + o] = src[c, q*sh + p - pt, o*sw + s*dw - pl] (0 outside the
    H x W input) for q < Hq, zeros in the ``plane - Hq*Wo`` slack after each plane.  ``pt`` /
    ``pl`` may be negative.

    The rows of a plane that lie wholly in the padding, and the slack, are the same zeros for
    every image: they are written only with ``borders`` (a buffer's first image of a call).

    With stride 1 and W == Wo ("same"-style padding) source and destination rows have the
    same pitch, so a plane's valid rows are one flat copy at a constant offset; the few
    columns it wraps in from the neighbouring rows are zeroed after.  Otherwise row by row.
    """
    cdef Py_ssize_t c, s, p, q, o, off, lo, hi, q0, q1
    cdef bint flat
    cdef const floating* row
    cdef const floating* srow
    cdef floating* base
    for s in range(S):  # the ranges depend on the tap column and row phase only: no divisions per channel
        off = s * dw - pl
        lo = min(first_in(off, sw), Wo)
        hi = max(end_in(off, sw, W, Wo), lo)
        for p in range(sh):
            q0 = min(first_in(p - pt, sh), Hq)         # rows q with 0 <= q*sh + p - pt < H
            q1 = max(end_in(p - pt, sh, H, Hq), q0)
            flat = sh == 1 and sw == 1 and W == Wo and hi > lo
            for c in range(C):
                base = dst + ((c * S + s) * sh + p) * plane
                if borders:
                    fill(base, 0, q0 * Wo)
                    fill(base + q1 * Wo, 0, plane - q1 * Wo)
                if q1 > q0:
                    row = src + (c * H + q0 * sh + p - pt) * W + off  # row q0, shifted by the tap
                    if flat:
                        memcpy(base + q0 * Wo + lo, row + lo, ((q1 - q0 - 1) * Wo + hi - lo) * sizeof(floating))
                        for o in range(lo):  # column by column: a few strided stores (per row, GCC
                            for q in range(q0, q1):  # would call memset for each one or two zeros)
                                base[q * Wo + o] = 0
                        for o in range(hi, Wo):
                            for q in range(q0, q1):
                                base[q * Wo + o] = 0
                    else:
                        for q in range(q0, q1):
                            fill(base + q * Wo, 0, lo)
                            srow = row + (q - q0) * sh * W
                            if sw == 2:  # a constant stride, which the C compiler vectorises (stems)
                                for o in range(lo, hi):
                                    base[q * Wo + o] = srow[2 * o]
                            else:
                                for o in range(lo, hi):
                                    base[q * Wo + o] = srow[o * sw]
                            fill(base + q * Wo + hi, 0, Wo - hi)


cdef inline void _tile(const floating* xs, const floating* wt, const Py_ssize_t* offs, Py_ssize_t T,
                       const floating* b, floating* out, Py_ssize_t ldo, Py_ssize_t nk, Py_ssize_t count=1) noexcept nogil:
    """out[j*ldo + v] = b[j] + sum over taps t of wt[t*KBLOCK + j] * xs[offs[t] + v], j < nk,
    v < count*VBLOCK (``count`` tiles side by side, at most 3)."""
    if floating is float:
        fc_tiles_f(xs, wt, offs, T, b, out, ldo, nk, count)
    else:
        fc_tiles_d(xs, wt, offs, T, b, out, ldo, nk, count)


cdef void _blocked_unit(const floating* x, const floating* wt, const floating* bias, floating* out,
                        const Py_ssize_t* offs, Py_ssize_t T, floating* xs, bint in_place, Py_ssize_t Cg,
                        Py_ssize_t H, Py_ssize_t W, Py_ssize_t Kg, Py_ssize_t Ho, Py_ssize_t Wo, Py_ssize_t R,
                        Py_ssize_t S, Py_ssize_t sh, Py_ssize_t sw, Py_ssize_t dh, Py_ssize_t dw, Py_ssize_t pt,
                        Py_ssize_t pl, Py_ssize_t plane, bint borders, Py_ssize_t kb0,
                        Py_ssize_t kb1) noexcept nogil:
    """One (image, group), or its share of the output channels: out[k, f] for KBLOCK*kb0 <= k <
    min(KBLOCK*kb1, Kg), f < Ho*Wo, from x[c] for c < Cg (see above); ``borders``: the first
    unit on this buffer (see ``_unfold_columns``).
    ``in_place`` (1x1, stride 1, no padding): the tiles read ``x`` itself, and ``xs`` holds
    only the last, partial tile's columns of every channel, VBLOCK apart."""
    cdef floating acc[KBLOCK * VBLOCK]
    cdef Py_ssize_t F = Ho * Wo, full = F - F % VBLOCK, kb, k0, nk, i, j, f0, c
    cdef const floating* src = x
    if not in_place:
        _unfold_columns(x, Cg, H, W, S, sh, sw, dw, pt, pl, Ho + (R - 1) * dh // sh, Wo, plane, xs, borders)
        src = xs
    elif full < F:
        for c in range(Cg):
            memcpy(xs + c * VBLOCK, x + c * plane + full, (F - full) * sizeof(floating))
            fill(xs + c * VBLOCK + F - full, 0, VBLOCK - (F - full))
    # The column runs (TGROUP tiles) go in panels: every channel block sweeps one panel before
    # the next panel starts, so that the panel's input, T * TGROUP * VBLOCK elements per run,
    # stays in L2 for all the blocks and each block's weights in L1 for the whole panel.
    # Unfolded input: panels of PANEL_BYTES (2-core Xeon, 2 MiB L2, against the earlier rule
    # of single runs (panel 1) from 1 MiB of unfolded input and at least 64 taps, whole planes
    # below: resnet-stem forward 1.40x faster on one thread and 1.24-1.28x on two, vgg-224
    # 1.05-1.08x, the dilated layer's direct pass, cifar-64, mnist-c1/c2 and stripe-c2 within
    # 3%; 256 KiB and 1 MiB panels 0-4% slower; single runs 1.25x slower on the stem, and 64-run
    # panels of the dilated layer's 576 taps (7 MiB) 1.6x slower).  Read in place (1x1): single
    # runs where the planes the tiles read outgrow half of a 1 MiB L2 (pw-1x1 forward, 800 KiB
    # per image: 1.4x faster; 4- and 16-run panels measured 2% and 8% slower), whole planes
    # below.
    cdef Py_ssize_t item = sizeof(floating)
    # Runs take at most TGROUP tiles, as evenly as the plane allows (an 8x8 plane's four tiles go
    # 2 + 2, not 3 + 1, whose single tile keeps only KBLOCK accumulators over the FMA latency:
    # stripe-c2 forward 1.06-1.07x, 256 images of 64 channels 8x8 1.03-1.07x; 2-core Zen 5,
    # in-process A/B, 41 alternating rounds; planes of 14x14 to 32x32 within 2%).
    cdef Py_ssize_t tiles = full // VBLOCK, runs = (tiles + TGROUP - 1) // TGROUP
    cdef Py_ssize_t panel, p, p0
    if in_place:
        panel = 1 if T * F * item > COLUMNS_OUTER_BYTES else max(runs, 1)
    else:
        panel = max(1, min(runs, PANEL_BYTES // (T * TGROUP * VBLOCK * item)))
    for p in range((runs + panel - 1) // panel):
        p0 = p * panel
        for kb in range(kb0, kb1):
            k0 = kb * KBLOCK
            for i in range(p0, min(p0 + panel, runs)):
                f0 = i * tiles // runs * VBLOCK
                _tile(src + f0, wt + kb * T * KBLOCK, offs, T, bias + k0, out + k0 * F + f0, F,
                      min(<Py_ssize_t> KBLOCK, Kg - k0), (i + 1) * tiles // runs - i * tiles // runs)
    if full < F:  # the last, partial tile goes through a buffer
        for kb in range(kb0, kb1):
            k0 = kb * KBLOCK
            nk = min(<Py_ssize_t> KBLOCK, Kg - k0)
            if in_place:
                _tile(xs, wt + kb * T * KBLOCK, offs + T, T, bias + k0, acc, VBLOCK, nk)
            else:
                _tile(src + full, wt + kb * T * KBLOCK, offs, T, bias + k0, acc, VBLOCK, nk)
            for j in range(nk):
                memcpy(out + (k0 + j) * F + full, acc + j * VBLOCK, (F - full) * sizeof(floating))


def blocked_weights(const floating[:, :, :, ::1] w, floating[:, :, ::1] wt, Py_ssize_t groups, bint rotate,
                    int nt):
    """The weights of a blocked pass in the order its tiles read them: ``wt[g, kb*T + t, j]`` is
    the weight of the pass's output channel o = kb*KBLOCK + j of group g at tap t = (i*R + r)*S + s
    (i: the pass's input channel), zero for o past the group's channels (the last, partial block).

    The pass's weight is ``w`` (K, C/g, R, S) itself, or with ``rotate`` the input gradient's,
    ``fastconv.backends.base.input_grad_kernel(w, groups)``: w[g*K/g + i, o, R-1-r, S-1-s]
    (shape: ``fastconv.backends.base.blocked_weights_shape``).  One compiled pass: in NumPy
    (pad, transpose, copy) it took 0.45 ms of a 2.4 ms forward pass of one image of 256
    channels on 14x14, and the input gradient's rotation another 0.35 ms.
    """
    cdef Py_ssize_t K = w.shape[0], Cg = w.shape[1], R = w.shape[2], S = w.shape[3], Kg = K // groups
    cdef Py_ssize_t RS = R * S, cin = Kg if rotate else Cg, cout = Cg if rotate else Kg, T = cin * RS
    cdef Py_ssize_t blocks = wt.shape[1] // T, unit, g, kb, t, i, rs, j, o
    if wt.shape[0] != groups or wt.shape[1] != blocks * T or blocks * KBLOCK < cout or wt.shape[2] != KBLOCK:
        raise ValueError(f"blocked_weights: wt has shape {tuple(wt.shape)[:3]}, expected ({groups}, "
                         f"{-(-cout // KBLOCK)} * {T}, {KBLOCK})")
    cdef const floating* src = &w[0, 0, 0, 0]
    cdef floating* dst
    with nogil:
        for unit in prange(groups * blocks, num_threads=nt, schedule="static"):
            g = unit // blocks
            kb = unit % blocks
            dst = &wt[g, kb * T, 0]
            for i in range(cin):
                for rs in range(RS):
                    t = i * RS + rs
                    for j in range(KBLOCK):
                        o = kb * KBLOCK + j
                        if o >= cout:
                            dst[t * KBLOCK + j] = 0
                        elif rotate:
                            dst[t * KBLOCK + j] = src[((g * Kg + i) * Cg + o) * RS + RS - 1 - rs]
                        else:
                            dst[t * KBLOCK + j] = src[(g * Kg + o) * T + t]


def forward_blocked(const floating[:, :, :, ::1] x, const floating[:, :, ::1] wt, const floating[::1] bias,
                    floating[:, :, :, ::1] out, floating[:, ::1] xs, const Py_ssize_t[::1] offs, Py_ssize_t plane,
                    Py_ssize_t R, Py_ssize_t S, Py_ssize_t sh, Py_ssize_t sw, Py_ssize_t pt, Py_ssize_t pl,
                    Py_ssize_t dh, Py_ssize_t dw, Py_ssize_t groups, bint in_place, Py_ssize_t parts=1):
    """Convolution with channel-blocked register tiles on ``xs.shape[0]`` threads, ``parts``
    work units per (image, group), which share its blocks of KBLOCK output channels (each
    unfolding the input itself: ``parts`` > 1 keeps every thread busy on fewer images).

    ``wt[g, kb*T + t, j]`` is weight (g*Kg + kb*KBLOCK + j, c, r, s) for tap t = (c*R + r)*S + s
    (zero past Kg: ``blocked_weights``); ``offs[t]`` is where tap t reads
    ``xs``, which holds a thread's unfolded input, Cg*S*sh planes of ``plane`` elements
    (``fastconv.backends.base.blocked_layout`` and ``blocked_offsets``).  ``pt`` / ``pl`` may be
    negative (the input gradient runs this with padding dil*(R-1) - pad).  ``in_place`` (1x1,
    stride 1, no padding): the tiles read ``x``'s planes (``plane`` = H*W) at ``offs[:T]``,
    the staged last tile at ``offs[T:]`` = c * VBLOCK.
    """
    cdef Py_ssize_t N = x.shape[0], H = x.shape[2], W = x.shape[3], Cg = x.shape[1] // groups
    cdef Py_ssize_t K = out.shape[1], Ho = out.shape[2], Wo = out.shape[3], Kg = K // groups
    cdef Py_ssize_t T = offs.shape[0] // 2 if in_place else offs.shape[0], t, n, g, part
    cdef Py_ssize_t blocks = (Kg + KBLOCK - 1) // KBLOCK, kb0, kb1
    if parts < 1:
        raise ValueError(f"forward_blocked: parts must be at least 1, got {parts}")
    cdef int nt = <int> xs.shape[0], tid
    cdef floating* xsp
    bias_pad = np.zeros(K + KBLOCK, np.asarray(bias).dtype)
    bias_pad[:K] = bias
    cdef const floating[::1] bp = bias_pad
    cdef int[::1] used = np.zeros(nt, np.intc)  # whether thread tid's buffer holds its zero borders
    with nogil, parallel(num_threads=nt):
        tid = threadid()
        xsp = &xs[tid, 0]
        for t in prange(N * groups * parts, schedule="dynamic"):
            part = t % parts
            n = t // parts // groups
            g = t // parts % groups
            kb0 = part * blocks // parts
            kb1 = (part + 1) * blocks // parts
            if kb1 > kb0:
                _blocked_unit(&x[n, g * Cg, 0, 0], &wt[g, 0, 0], &bp[g * Kg], &out[n, g * Kg, 0, 0], &offs[0], T,
                              xsp, in_place, Cg, H, W, Kg, Ho, Wo, R, S, sh, sw, dh, dw, pt, pl, plane,
                              not used[tid], kb0, kb1)
                used[tid] = 1


# The weight gradient in the same layout: gw[k, t] = sum over images and flat outputs f of
# gy[n, k, f] * xs_n[offs[t] + f].  A tile holds WJ x WQ (channel, tap) pairs as ``lanes`` partial
# sums each and runs over a chunk of images; each thread adds its tiles into its own row of
# ``partial``, WV lanes per pair (the wide tile folds its lanes into those: see ``_tile.h``);
# once every unit is done, the threads sum those rows and the lanes in float64 straight into
# ``gw`` (summed in NumPy, as before, this serial step took 0.6 ms of a 3.6 ms mnist-c2 weight
# gradient on 2 threads).
# The tiles read the output gradients in place where the planes are whole tiles (Ho*Wo a
# multiple of the lanes) and the block of channels is full.  Elsewhere the rows are copied into a
# zero-padded stage first, so the spare lanes of a plane's last tile and of a partial block of
# channels add nothing (unless the input there is Inf or NaN: the adapter then recomputes with
# the row-wise kernel above).  Staging every block, as before, took 28% of a one-input-channel
# layer's time in memcpy (mnist-c1: 0.65 ms; 0.33 ms in place) and was 5-10% slower on
# stripe-c2 and vgg-224; on cifar-64 the two measured alike.
# Planes read in place go in segments of SEG_OUTPUTS outputs, every block of channels passing
# over one segment before the next, so that the segment's rows of every tap stay in L2 for the
# next block, where whole planes of the large layers came from L3 for every block.  The best
# length depends on the core: on a 2-core Xeon (48 KiB L1, 2 MiB L2) 1024 outputs were best
# (whole planes: vgg-224 9.5 -> 7.7 ms, resnet-stem 9.2 -> 8.5-9.2; 512 measured alike); on a
# 2-core Zen 4 (32 KiB L1, 1 MiB L2) 1024 was the slowest of 1024, 2048 and 4096, and 2048 is
# 1.07-1.15x faster than 1024 there (two threads: resnet-stem 13.6-14.9 -> 12.5-13.8 ms, vgg-224
# 12.1-12.6 -> 10.6-11.6; one thread alike), apparently from the longer runs per tile call;
# 2048 was not measured on the Xeon.  The small planes are one segment.

cdef enum:
    SEG_OUTPUTS = 2048  # flat outputs per segment of a plane read in place (see above)

cdef inline void _wtile(const floating* xs, Py_ssize_t xstride, const Py_ssize_t* offs, const floating* g,
                        Py_ssize_t gstride, Py_ssize_t ldg, Py_ssize_t steps, Py_ssize_t nimg,
                        floating* acc, bint wide) noexcept nogil:
    # the tiles need steps >= 1 and nimg >= 1 (``_tile.h``): every call below has both
    if floating is float:
        if wide:
            fc_wtile_wide_f(xs, xstride, offs, g, gstride, ldg, steps, nimg, acc)
        else:
            fc_wtile_f(xs, xstride, offs, g, gstride, ldg, steps, nimg, acc)
    else:
        fc_wtile_d(xs, xstride, offs, g, gstride, ldg, steps, nimg, acc)


cdef inline void _stage_rows(const floating* gy, Py_ssize_t gimage, Py_ssize_t nimg, Py_ssize_t nk, Py_ssize_t F,
                             Py_ssize_t ldg, floating* dst) noexcept nogil:
    """dst[(i*WJ + j)*ldg + f] = gy[i*gimage + j*F + f] for i < nimg, j < nk, f < F; zero for
    F <= f < ldg and for the rows nk <= j < WJ."""
    cdef Py_ssize_t i, j
    cdef floating* row
    for i in range(nimg):
        for j in range(WJ):
            row = dst + (i * WJ + j) * ldg
            if j < nk:
                fc_copy(row, gy + i * gimage + j * F, F * sizeof(floating))
                fill(row + F, 0, ldg - F)
            else:
                fill(row, 0, ldg)


def backward_weight_blocked(const floating[:, :, :, ::1] gy, const floating[:, :, :, ::1] x,
                            floating[:, ::1] gw, floating[:, ::1] partial, floating[:, ::1] xs, floating[:, ::1] gs,
                            const Py_ssize_t[::1] offs, Py_ssize_t chunk, Py_ssize_t plane, Py_ssize_t R,
                            Py_ssize_t S, Py_ssize_t sh, Py_ssize_t sw, Py_ssize_t pt, Py_ssize_t pl, Py_ssize_t dh,
                            Py_ssize_t dw, Py_ssize_t groups, Py_ssize_t lanes):
    """Weight gradient with channel-blocked register tiles on ``xs.shape[0]`` threads, one (chunk
    of ``chunk`` images, group) per work unit (see above).

    ``lanes``: the tile's partial sums per (channel, tap) pair, WV, or WV_WIDE for float32 (the
    wide tile).  Per thread: ``xs`` holds ``chunk`` unfolded inputs of Cg*S*sh planes of ``plane``
    elements, ``gs`` ``chunk`` * WJ staged output-gradient rows of ceil(Ho*Wo / lanes) * lanes,
    ``partial`` the sums ``[g, kb, tb, j, q, v]``, v < WV whatever ``lanes`` is, for tap blocks tb
    of ``offs`` (a multiple of WQ taps; ``fastconv.backends.base.blocked_weight_layout``).
    ``partial`` must be zero on entry.
    """
    cdef Py_ssize_t N = x.shape[0], H = x.shape[2], W = x.shape[3], Cg = x.shape[1] // groups
    cdef Py_ssize_t K = gy.shape[1], Ho = gy.shape[2], Wo = gy.shape[3], Kg = K // groups
    if lanes != WV and not (lanes == WV_WIDE and floating is float):
        raise ValueError(f"backward_weight_blocked: lanes must be {WV} (or {WV_WIDE} for float32), got {lanes}")
    cdef bint wide = lanes == WV_WIDE
    cdef Py_ssize_t F = Ho * Wo, steps = (F + lanes - 1) // lanes, ldg = steps * lanes
    cdef Py_ssize_t xstride = Cg * S * sh * plane, blocks = (Kg + WJ - 1) // WJ, taps = offs.shape[0] // WQ
    cdef Py_ssize_t units = (N + chunk - 1) // chunk * groups, t, n0, g, nimg, i, kb, tb
    cdef Py_ssize_t T = gw.shape[1], e, wk, wt, src, worker, v
    cdef double total
    cdef int nt = <int> xs.shape[0], tid
    cdef floating* xsp
    cdef floating* gsp
    cdef floating* part
    cdef const floating* grows  # a block's output-gradient rows as its tiles read them ...
    cdef Py_ssize_t gimage, grow  # ... their image and row strides
    cdef Py_ssize_t[::1] used = np.zeros(nt, np.intp)  # image slots of thread tid's buffer with their zero borders
    cdef bint in_place = F % lanes == 0  # no spare lanes to zero
    cdef Py_ssize_t seg = SEG_OUTPUTS // lanes if in_place else steps, si, s0  # tile steps per segment (staged: whole planes)
    with nogil, parallel(num_threads=nt):
        tid = threadid()
        xsp = &xs[tid, 0]
        gsp = &gs[tid, 0]
        part = &partial[tid, 0]
        for t in prange(units, schedule="dynamic"):
            n0 = t // groups * chunk
            g = t % groups
            nimg = min(chunk, N - n0)
            for i in range(nimg):
                _unfold_columns(&x[n0 + i, g * Cg, 0, 0], Cg, H, W, S, sh, sw, dw, pt, pl, Ho + (R - 1) * dh // sh, Wo,
                                plane, xsp + i * xstride, i >= used[tid])
            used[tid] = max(used[tid], nimg)
            if in_place and Kg % WJ:  # the partial last block's rows, staged once for every segment
                _stage_rows(&gy[n0, g * Kg + (blocks - 1) * WJ, 0, 0], K * F, nimg, Kg % WJ, F, ldg, gsp)
            for si in range((steps + seg - 1) // seg):
                s0 = si * seg
                for kb in range(blocks):
                    if in_place and (kb + 1) * WJ <= Kg:  # a full block of channels: the tiles read gy in place
                        grows = &gy[n0, g * Kg + kb * WJ, 0, 0]
                        gimage = K * F
                        grow = F
                    else:  # the block's rows in the zero-padded stage
                        if not in_place:
                            _stage_rows(&gy[n0, g * Kg + kb * WJ, 0, 0], K * F, nimg, min(<Py_ssize_t> WJ, Kg - kb * WJ),
                                        F, ldg, gsp)
                        grows = gsp
                        gimage = WJ * ldg
                        grow = ldg
                    for tb in range(taps):
                        _wtile(xsp + s0 * lanes, xstride, &offs[tb * WQ], grows + s0 * lanes, gimage, grow,
                               min(seg, steps - s0), nimg, part + ((g * blocks + kb) * taps + tb) * (WJ * WQ * WV),
                               wide)
        for e in prange(K * T, schedule="static"):  # after the implied barrier: every partial is complete
            wk = e // T % Kg
            wt = e % T
            src = ((((e // T // Kg * blocks + wk // WJ) * taps + wt // WQ) * WJ + wk % WJ) * WQ + wt % WQ) * WV
            total = 0
            for worker in range(partial.shape[0]):
                for v in range(WV):
                    total = total + partial[worker, src + v]
            gw[e // T, wt] = <floating> total


#: (output channels, taps, partial sums per pair) of one ``backward_weight_blocked`` register tile
BLOCKED_WEIGHT_TILE = (WJ, WQ, WV)
#: the partial sums per pair of its wide float32 tile, where that runs in one register per
#: vector (AVX-512 builds), else None
BLOCKED_WEIGHT_WIDE_LANES = WV_WIDE if WIDE_OK else None


#: (output channels, flat outputs) of one ``forward_blocked`` register tile
BLOCKED_TILE = (KBLOCK, VBLOCK)


#: flat outputs ``forward3x3`` accumulates at a time (its per-thread ``stage`` holds at least
#: this many, and at least one padded row)
FLAT_SEGMENT = SEGMENT


#: whether this module was compiled with OpenMP (``prange`` runs serially without it)
OPENMP = FASTCONV_OPENMP
