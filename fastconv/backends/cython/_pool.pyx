# cython: language_level=3
"""Max and average pooling kernels, forward and backward.

Every kernel takes whole (n, c) planes as work units (dynamically scheduled over
OpenMP threads, the GIL released throughout) and writes every element of its
output plane itself, so the adapter allocates outputs with ``numpy.empty``: no
zero-fill pass, and no page faults from freshly zeroed memory.

Long loops, not short rows
    Pooled rows are short (14 columns for a 28-wide image pooled 2x2): per-row
    vector loops spend their time in loop set-up and scalar remainders (branchy
    for max pooling), and GCC unrolls loops with small constant trip counts into
    scalar code.  So the forward kernels lay a band of input rows out such that
    window tap (i, j) of every output sits at a fixed shift from the output's own
    lane, and run each tap as one unit-stride loop over the whole band, three taps
    per pass (:func:`_tap_row`), the running maximum / sum in registers.  Loop
    lengths are multiples of ``_PAD`` lanes, so the vector remainder never runs;
    the spare lanes compute on data that is never copied out.

    * Flat path (:func:`_flat_band`; W a multiple of the column stride, no column
      padding): the band's input rows, read as one run, are split into their
      ``sw`` column phases by a single deinterleaving loop; lane ``r*sh*Wq + ow``
      is output (oh0 + r, ow).  Border windows (padding rows, ceil_mode columns)
      take the bounds-checked :func:`_max_one` / :func:`_avg_one`.
    * Phase planes (:func:`_to_phases`, any geometry): the band is split into
      ``sh * sw`` phase planes (space-to-depth) with -inf (max) or 0 (average)
      padding, lane ``r*Wp + ow`` being output (oh0 + r, ow), so padding needs no
      special case.

    Software prefetches run ``_AHEAD`` bytes ahead of the input rows.
Backward
    Max pooling zeroes each gradient plane and scatter-adds ``gy`` at the indices
    in increasing output order, four at a time; large planes go row by row, each
    input row zeroed just before the first window reaches it, so that the scatter
    works in L1 (:func:`_scatter_by_rows`).  Average pooling runs the phase-plane
    plan in reverse: the scaled gradients are added into zeroed phase planes tap
    by tap (:func:`_add_shifted`), taps in decreasing shift so that every input
    element sums its windows in increasing output order, and the planes are then
    interleaved back into the gradient rows.

Semantics are exactly those of PyTorch's CPU kernels, bit for bit: the taps of a
window are visited in row-major order, which decides ties (first maximum wins) and
NaN (``v > best or v != v``: the last NaN wins); a window whose in-image values are
all -inf reports its first in-image tap; the average divisor follows
count_include_pad, ceil_mode cells never counting; each gradient element sums its
contributions onto 0 in increasing output order.
"""

from cython cimport floating
from cython.parallel cimport prange, threadid
from libc.math cimport INFINITY
from libc.stdint cimport int32_t, int64_t, uint64_t
from libc.string cimport memcpy

import numpy as np

from fastconv._buffers import aligned_rows

from ._loops cimport _rows_per_chunk

cdef extern from *:
    """
    #if defined(__GNUC__)
    #define FASTCONV_PREFETCH(p) __builtin_prefetch((const void *) (p))
    #else
    #define FASTCONV_PREFETCH(p) ((void) (p))
    #endif
    """
    void _prefetch "FASTCONV_PREFETCH"(const void* p) noexcept nogil

cdef enum:
    #: bytes read ahead by software prefetches: with the next rows already on their way the
    #: kernels wait less for memory (3x3/2 max pooling of 112x112 planes: 3.0 -> 2.5 ms)
    _AHEAD = 4096
    #: band loops run over a multiple of this many lanes (a 512-bit vector of floats)
    _PAD = 16
    #: output positions per band (about 16 KiB of float32 scratch per phase plane)
    _BAND = 4096

#: largest tap offset (i*dh*W + j*dw) the max kernels keep in 32 bits
cdef Py_ssize_t _INT32_MAX = 2147483647


cdef inline Py_ssize_t _padded(Py_ssize_t n) noexcept nogil:
    """``n`` rounded up to a multiple of ``_PAD``."""
    return (n + _PAD - 1) // _PAD * _PAD


cdef inline Py_ssize_t _first_on_grid(Py_ssize_t start, Py_ssize_t dil) noexcept nogil:
    """The first position >= 0 of ``start + i * dil`` (``start`` itself when >= 0)."""
    if start >= 0:
        return start
    return start + ((-start + dil - 1) // dil) * dil


cdef inline Py_ssize_t _avg_divisor(Py_ssize_t oh, Py_ssize_t ow, Py_ssize_t H, Py_ssize_t W,
                                    Py_ssize_t kh, Py_ssize_t kw, Py_ssize_t sh, Py_ssize_t sw,
                                    Py_ssize_t ph, Py_ssize_t pw, bint count_include_pad) noexcept nogil:
    """PyTorch's avg-pool divisor for output (oh, ow): a row factor times a column factor."""
    cdef Py_ssize_t h0 = oh * sh - ph, w0 = ow * sw - pw
    cdef Py_ssize_t h1 = min(h0 + kh, H + ph), w1 = min(w0 + kw, W + pw)
    if count_include_pad:
        return (h1 - h0) * (w1 - w0)
    h0, w0, h1, w1 = max(h0, 0), max(w0, 0), min(h1, H), min(w1, W)
    return max(h1 - h0, 0) * max(w1 - w0, 0)


def _divisor_factors(Py_ssize_t H, Py_ssize_t W, Py_ssize_t Ho, Py_ssize_t Wo, Py_ssize_t kh, Py_ssize_t kw,
                     Py_ssize_t sh, Py_ssize_t sw, Py_ssize_t ph, Py_ssize_t pw, bint count_include_pad, dtype):
    """(row factors (Ho,), column factors (Wo + _PAD,), the spare ones 1) of :func:`_avg_divisor`,
    as floats of ``dtype``."""
    rows = np.array([_avg_divisor(oh, 0, H, 1, kh, 1, sh, 1, ph, 0, count_include_pad) for oh in range(Ho)], dtype)
    cols = np.ones(Wo + _PAD, dtype)  # spare entries for the padded loops over columns
    cols[:Wo] = [_avg_divisor(0, ow, 1, W, 1, kw, 1, sw, 0, pw, count_include_pad) for ow in range(Wo)]
    return rows, cols


# --------------------------------------------------------------------------- phase planes


cdef struct _Plan:
    # the pooling geometry
    Py_ssize_t H, W, Ho, Wo, kh, kw, sh, sw, ph, pw, dh, dw
    # phase planes: row length, the largest tap shifts (in phase rows / columns), output rows
    # per band, and the distance between two phase planes of the scratch
    Py_ssize_t Wp, si_max, sj_max, band, stride
    # phase columns qa <= q < qb have all their sw phases inside the input row
    Py_ssize_t qa, qb
    # the flat path (W a multiple of sw): interior output rows ra <= oh < rb and columns
    # oa <= ow < ob (windows inside the image), W // sw, output rows per band, scratch lengths
    bint flat
    Py_ssize_t ra, rb, oa, ob, Wq, fband, flen, alen


cdef _Plan _plan(Py_ssize_t H, Py_ssize_t W, Py_ssize_t Ho, Py_ssize_t Wo, Py_ssize_t kh, Py_ssize_t kw,
                 Py_ssize_t sh, Py_ssize_t sw, Py_ssize_t ph, Py_ssize_t pw, Py_ssize_t dh, Py_ssize_t dw):
    """The phase-plane layout for this geometry (see the module docstring)."""
    cdef _Plan g
    g.H, g.W, g.Ho, g.Wo, g.kh, g.kw, g.sh, g.sw, g.ph, g.pw, g.dh, g.dw = H, W, Ho, Wo, kh, kw, sh, sw, ph, pw, dh, dw
    g.si_max = (kh - 1) * dh // sh
    g.sj_max = (kw - 1) * dw // sw
    g.Wp = Wo + g.sj_max
    g.band = max(1, min(Ho, _BAND // g.Wp))
    # a band's phase rows, plus room for the spare lanes of the last row (shift sj_max, or a
    # padded row copy, + _PAD)
    g.stride = (g.band + g.si_max + 1) * g.Wp + 2 * _PAD
    g.qa = min((pw + sw - 1) // sw, g.Wp)
    g.qb = max(min(g.Wp, (W + pw) // sw), g.qa)
    g.ra = min((ph + sh - 1) // sh, Ho)
    g.rb = max(min(Ho, (H - 1 + ph - (kh - 1) * dh) // sh + 1) if H - 1 + ph >= (kh - 1) * dh else 0, g.ra)
    g.oa = min((pw + sw - 1) // sw, Wo)
    g.ob = max(min(Wo, (W - 1 + pw - (kw - 1) * dw) // sw + 1) if W - 1 + pw >= (kw - 1) * dw else 0, g.oa)
    g.Wq = W // sw
    # (left padding would make the flat run wrap rows into each other's padding columns)
    g.flat = W % sw == 0 and pw == 0 and g.rb > g.ra and g.ob > g.oa
    g.fband = g.alen = g.flen = 0
    if g.flat:  # (W a multiple of sw, so Wq >= 1)
        g.fband = max(1, min(g.rb - g.ra, _BAND // (sh * g.Wq)))
        g.alen = _padded((g.fband - 1) * sh * g.Wq + Wo)
        g.flen = g.alen + ((kh - 1) * dh + 1) * g.Wq + g.sj_max + 2 * _PAD
    return g


cdef inline void _prefetch_run(const void* p, Py_ssize_t nbytes) noexcept nogil:
    """Prefetch ``nbytes`` from ``p`` (a hint: never faults, even past the array)."""
    cdef Py_ssize_t b
    for b in range(0, nbytes, 64):
        _prefetch(<const char*> p + b)


cdef inline void _fill(floating* y, floating v, Py_ssize_t n) noexcept nogil:
    cdef Py_ssize_t i
    for i in range(n):
        y[i] = v


cdef inline void _row_to_phases(const floating* row, floating* dst, const _Plan* g, Py_ssize_t run,
                                floating pad) noexcept nogil:
    """``dst[b*stride + q] = row[q*sw + b - pw]`` for ``q < Wp``, ``b < sw`` (``pad`` outside
    the row): one input row split into its ``sw`` column phases.

    Columns ``qa <= q < qb`` (all phases inside the row) are copied by a loop of ``run``
    iterations: ``qb - qa``, or that rounded up to a multiple of ``_PAD`` when the caller
    knows the reads stay inside the array, the spare iterations writing into the following
    phase rows (written later) or the plane's margin.
    """
    cdef Py_ssize_t q, b, c, sw = g.sw, stride = g.stride, qa = g.qa
    cdef const floating* src = row + qa * sw - g.pw
    cdef floating* d0 = dst + qa
    cdef floating* d1 = dst + stride + qa
    if sw == 1:
        for q in range(run):
            d0[q] = src[q]
    elif sw == 2:
        for q in range(run):
            d0[q] = src[2 * q]
            d1[q] = src[2 * q + 1]
    else:
        for b in range(sw):
            for q in range(run):
                dst[b * stride + qa + q] = src[q * sw + b]
    for q in range(qa):
        for b in range(sw):
            c = q * sw + b - g.pw
            dst[b * stride + q] = row[c] if 0 <= c < g.W else pad
    for q in range(g.qb, g.Wp):
        for b in range(sw):
            c = q * sw + b - g.pw
            dst[b * stride + q] = row[c] if 0 <= c < g.W else pad


cdef inline void _phases_to_row(const floating* src, floating* row, const _Plan* g, Py_ssize_t run) noexcept nogil:
    """The inverse of :func:`_row_to_phases`: ``row[q*sw + b - pw] = src[b*stride + q]``, and
    0 for the columns past phase column ``Wp`` (which no window covers); ``run`` as there,
    the spare iterations writing into the following rows of the plane (written later)."""
    cdef Py_ssize_t q, b, iw, sw = g.sw, stride = g.stride, qa = g.qa, pw = g.pw
    cdef floating* dst = row + qa * sw - pw
    cdef const floating* s0 = src + qa
    cdef const floating* s1 = src + stride + qa
    cdef floating zero = 0
    if sw == 1:
        for q in range(run):
            dst[q] = s0[q]
    elif sw == 2:
        for q in range(run):
            dst[2 * q] = s0[q]
            dst[2 * q + 1] = s1[q]
    else:
        for b in range(sw):
            for q in range(run):
                dst[q * sw + b] = src[b * stride + qa + q]
    for iw in range(min(max(qa * sw - pw, 0), g.W)):  # qa*sw - pw exceeds W on rows narrower than a window
        q = (iw + pw) // sw
        row[iw] = src[(iw + pw - q * sw) * stride + q] if q < g.Wp else zero
    for iw in range(max(g.qb * sw - pw, 0), g.W):
        q = (iw + pw) // sw
        row[iw] = src[(iw + pw - q * sw) * stride + q] if q < g.Wp else zero


cdef void _to_phases(const floating* xp, floating* P, const _Plan* g, Py_ssize_t p0, Py_ssize_t rows,
                     Py_ssize_t room, floating pad) noexcept nogil:
    """Phase rows ``p0 .. p0+rows-1`` of the plane ``xp`` into the scratch ``P``: phase (a, b)
    at ``P + (a*sw + b)*stride``, row ``p - p0``, holds input row ``p*sh + a - ph``; ``room``
    is how many elements of the input array follow ``xp``."""
    cdef Py_ssize_t r, a, b, ih, n = g.qb - g.qa, n_pad = _padded(g.qb - g.qa)
    cdef floating* dst
    for r in range(rows):
        for a in range(g.sh):
            ih = (p0 + r) * g.sh + a - g.ph
            dst = P + a * g.sw * g.stride + r * g.Wp
            if 0 <= ih < g.H:
                _prefetch_run(xp + ih * g.W + _AHEAD // sizeof(floating), g.W * sizeof(floating))
                _row_to_phases(xp + ih * g.W, dst, g,
                               n_pad if ih * g.W + (g.qa + n_pad) * g.sw - g.pw <= room else n, pad)
            else:
                for b in range(g.sw):
                    _fill(dst + b * g.stride, pad, g.Wp)


# --------------------------------------------------------------------------- forward


cdef inline void _max_taps3(const floating* x0, const floating* x1, const floating* x2, int32_t f0, int32_t f1,
                            int32_t f2, floating* best, int32_t* boff, Py_ssize_t n, bint first,
                            const int K) noexcept nogil:
    """Up to three consecutive taps (``K`` of them; values ``x0[o]``, ``x1[o]``, ``x2[o]``,
    offsets ``f0``..``f2``) in one pass, the running maximum kept in registers: one load and
    store of ``best`` / ``boff`` per K taps instead of per tap."""
    cdef Py_ssize_t o
    cdef floating v, b
    cdef int32_t bo
    cdef bint take
    # Two loops on purpose: with ``if first`` inside one loop, gcc 12 neither unswitched nor
    # vectorised it (max pooling 5-8x slower, measured).
    if first:
        for o in range(n):
            b = x0[o]
            bo = f0
            if K > 1:
                v = x1[o]
                take = (v > b) | (v != v)
                b = v if take else b
                bo = f1 if take else bo
            if K > 2:
                v = x2[o]
                take = (v > b) | (v != v)
                b = v if take else b
                bo = f2 if take else bo
            best[o] = b
            boff[o] = bo
        return
    for o in range(n):
        b = best[o]
        bo = boff[o]
        v = x0[o]
        take = (v > b) | (v != v)
        b = v if take else b
        bo = f0 if take else bo
        if K > 1:
            v = x1[o]
            take = (v > b) | (v != v)
            b = v if take else b
            bo = f1 if take else bo
        if K > 2:
            v = x2[o]
            take = (v > b) | (v != v)
            b = v if take else b
            bo = f2 if take else bo
        best[o] = b
        boff[o] = bo


cdef inline void _sum_taps3(const floating* x0, const floating* x1, const floating* x2, floating* acc, Py_ssize_t n,
                            bint first, const int K) noexcept nogil:
    """Up to three consecutive taps added in order in one pass (as :func:`_max_taps3`)."""
    cdef Py_ssize_t o
    cdef floating a, zero = 0
    for o in range(n):
        a = zero if first else acc[o]
        a = a + x0[o]
        if K > 1:
            a = a + x1[o]
        if K > 2:
            a = a + x2[o]
        acc[o] = a


cdef inline void _tap_row(const floating* base, Py_ssize_t colstride, Py_ssize_t i, const _Plan* g, floating* acc,
                          int32_t* boff, Py_ssize_t n, bint first, bint is_max) noexcept nogil:
    """All taps (i, 0 .. kw-1) of window row ``i``, three at a time: tap j reads
    ``base + (j*dw % sw) * colstride + j*dw // sw``."""
    cdef Py_ssize_t j, k, c0, c1, c2
    cdef int32_t f = <int32_t> (i * g.dh * g.W)
    for j in range(0, g.kw, 3):
        k = min(3, g.kw - j)
        c0 = j * g.dw
        c1 = c0 + g.dw if k > 1 else c0
        c2 = c1 + g.dw if k > 2 else c1
        if is_max:
            if k == 3:
                _max_taps3(base + c0 % g.sw * colstride + c0 // g.sw, base + c1 % g.sw * colstride + c1 // g.sw,
                           base + c2 % g.sw * colstride + c2 // g.sw, f + <int32_t> c0, f + <int32_t> c1,
                           f + <int32_t> c2, acc, boff, n, first, 3)
            elif k == 2:
                _max_taps3(base + c0 % g.sw * colstride + c0 // g.sw, base + c1 % g.sw * colstride + c1 // g.sw,
                           NULL, f + <int32_t> c0, f + <int32_t> c1, 0, acc, boff, n, first, 2)
            else:
                _max_taps3(base + c0 % g.sw * colstride + c0 // g.sw, NULL, NULL, f + <int32_t> c0, 0, 0, acc, boff,
                           n, first, 1)
        else:
            if k == 3:
                _sum_taps3(base + c0 % g.sw * colstride + c0 // g.sw, base + c1 % g.sw * colstride + c1 // g.sw,
                           base + c2 % g.sw * colstride + c2 // g.sw, acc, n, first, 3)
            elif k == 2:
                _sum_taps3(base + c0 % g.sw * colstride + c0 // g.sw, base + c1 % g.sw * colstride + c1 // g.sw,
                           NULL, acc, n, first, 2)
            else:
                _sum_taps3(base + c0 % g.sw * colstride + c0 // g.sw, NULL, NULL, acc, n, first, 1)
        first = False


cdef inline void _copy_max(floating* orow, int64_t* irow, const floating* best, const int32_t* boff, Py_ssize_t n,
                           int64_t base, int64_t step) noexcept nogil:
    """``orow[o] = best[o]``, ``irow[o] = base + o*step + boff[o]`` for ``o < n`` (the index
    as an induction, not a multiply: 64-bit vector multiplies are slow)."""
    cdef Py_ssize_t o
    cdef int64_t pos = base
    for o in range(n):
        orow[o] = best[o]
        irow[o] = pos + boff[o]
        pos += step


cdef inline void _lane_indices(int64_t* lidx, const int32_t* boff, Py_ssize_t n, int64_t start,
                               int64_t step) noexcept nogil:
    """``lidx[l] = start + l*step + boff[l]``: the flat index of each lane's maximum."""
    cdef Py_ssize_t l
    cdef int64_t pos = start
    for l in range(n):
        lidx[l] = pos + boff[l]
        pos += step


cdef inline void _divide(floating* acc, Py_ssize_t n, floating d) noexcept nogil:
    cdef Py_ssize_t l
    for l in range(n):
        acc[l] = acc[l] / d


cdef inline void _max_one(const floating* xp, Py_ssize_t H, Py_ssize_t W, Py_ssize_t hstart, Py_ssize_t wstart,
                          Py_ssize_t kh, Py_ssize_t kw, Py_ssize_t dh, Py_ssize_t dw, floating* out,
                          int64_t* where) noexcept nogil:
    """One window at (hstart, wstart), every tap bounds-checked (for tap offsets too large
    for 32 bits): -inf padding, and the first in-image tap when nothing beats -inf."""
    cdef Py_ssize_t i, j, ih, iw
    cdef floating v, best = -INFINITY
    cdef int64_t at = _first_on_grid(hstart, dh) * W + _first_on_grid(wstart, dw)
    for i in range(kh):
        ih = hstart + i * dh
        if ih < 0 or ih >= H:
            continue
        for j in range(kw):
            iw = wstart + j * dw
            if iw < 0 or iw >= W:
                continue
            v = xp[ih * W + iw]
            if v > best or v != v:
                best = v
                at = ih * W + iw
    out[0] = best
    where[0] = at


cdef inline floating _avg_one(const floating* xp, const _Plan* g, Py_ssize_t oh, Py_ssize_t ow,
                              const floating* rdiv, const floating* cdiv) noexcept nogil:
    """One window's average, every tap bounds-checked (0 where the divisor is 0)."""
    cdef Py_ssize_t hs = oh * g.sh - g.ph, ws = ow * g.sw - g.pw, ih, iw
    cdef floating d = rdiv[oh] * cdiv[ow], s = 0
    if d <= 0:
        return 0
    for ih in range(max(hs, 0), min(hs + g.kh, g.H)):
        for iw in range(max(ws, 0), min(ws + g.kw, g.W)):
            s = s + xp[ih * g.W + iw]
    return s / d


cdef void _flat_band(const floating* xp, Py_ssize_t room, floating* op, int64_t* ip, floating* Q, floating* acc,
                     int32_t* boff, int64_t* lidx, const _Plan* g, Py_ssize_t oh0, Py_ssize_t nb, bint is_max,
                     const floating* rdiv, const floating* cdiv) noexcept nogil:
    """Output rows ``oh0 .. oh0+nb-1`` (windows inside the image vertically) when W is a
    multiple of sw, the common case.

    The band's input rows, read as one flat run from ``(oh0*sh - ph)*W - pw``, are split into
    ``sw`` column phases ``Q_b[k] = run[k*sw + b]`` (one long loop, not one per row).  Output
    (oh0 + r, ow) then has its tap (i, j) at ``Q_b[r*sh*Wq + ow + i*dh*Wq + j*dw // sw]``
    (``b = j*dw % sw``, ``Wq = W // sw``): a fixed shift of the lane ``r*sh*Wq + ow``, right for
    every window inside the image horizontally; the other lanes (border columns, and the
    rows in between when sh > 1) are computed and thrown away, the border windows taking
    :func:`_max_one` / :func:`_avg_one`.
    """
    cdef Py_ssize_t sw = g.sw, Wq = g.Wq, W = g.W, Wo = g.Wo, b, i, j, k, r, oh, ow, L, n
    cdef Py_ssize_t start = (oh0 * g.sh - g.ph) * W - g.pw  # offset of Q's lane 0 in the plane
    cdef Py_ssize_t m = _padded((nb - 1) * g.sh * Wq + Wo), K = m + (g.kh - 1) * g.dh * Wq + g.sj_max
    cdef Py_ssize_t k0 = (g.pw + sw - 1) // sw, kend = k0 + _padded(K - k0), qs = g.flen
    cdef const floating* run = xp + start
    cdef floating pad = -INFINITY if is_max else 0
    cdef floating* q0 = Q
    cdef floating* q1 = Q + qs
    cdef bint first
    _prefetch_run(run + kend * sw, _AHEAD)  # what follows the band: the next band or plane
    for b in range(sw):
        _fill(Q + b * qs, pad, k0)  # lanes left of the plane: only border windows read them
    if start + kend * sw <= room:
        if sw == 1:
            for k in range(k0, kend):
                q0[k] = run[k]
        elif sw == 2:
            for k in range(k0, kend):
                q0[k] = run[2 * k]
                q1[k] = run[2 * k + 1]
        else:
            for b in range(sw):
                for k in range(k0, kend):
                    Q[b * qs + k] = run[k * sw + b]
    else:  # the array ends within the padded run: stop there
        for b in range(sw):
            for k in range(k0, kend):
                Q[b * qs + k] = run[k * sw + b] if start + k * sw + b < room else pad
    for i in range(g.kh):
        _tap_row(Q + i * g.dh * Wq, qs, i, g, acc, boff, m, i == 0, is_max)
    # finish every lane in one long loop: lane l is the window at flat input offset start + l*sw
    # (int64 index) or an interior window (divisor kh*kw); then each row is two or one memcpy
    if is_max:
        _lane_indices(lidx, boff, m, start, sw)
    else:
        _divide(acc, m, <floating> (g.kh * g.kw))
    n = g.ob - g.oa
    for r in range(nb):
        oh = oh0 + r
        L = r * g.sh * Wq + g.oa
        memcpy(op + oh * Wo + g.oa, acc + L, n * sizeof(floating))
        if is_max:
            memcpy(ip + oh * Wo + g.oa, lidx + L, n * sizeof(int64_t))
            for ow in range(g.oa):
                _max_one(xp, g.H, W, oh * g.sh - g.ph, ow * sw - g.pw, g.kh, g.kw, g.dh, g.dw, op + oh * Wo + ow,
                         ip + oh * Wo + ow)
            for ow in range(g.ob, Wo):
                _max_one(xp, g.H, W, oh * g.sh - g.ph, ow * sw - g.pw, g.kh, g.kw, g.dh, g.dw, op + oh * Wo + ow,
                         ip + oh * Wo + ow)
        else:
            for ow in range(g.oa):
                op[oh * Wo + ow] = _avg_one(xp, g, oh, ow, rdiv, cdiv)
            for ow in range(g.ob, Wo):
                op[oh * Wo + ow] = _avg_one(xp, g, oh, ow, rdiv, cdiv)


cdef void _pool_plane(const floating* xp, Py_ssize_t room, floating* op, int64_t* ip, floating* P, floating* acc,
                      int32_t* boff, int64_t* lidx, const _Plan* g, bint is_max, const floating* rdiv,
                      const floating* cdiv) noexcept nogil:
    """Max (``is_max``; values ``op`` and indices ``ip``) or average (``op``, divisors
    ``rdiv[oh] * cdiv[ow]``) pooling of one (H, W) plane, band by band through the phase
    planes ``P``; ``acc`` / ``boff`` are the band's running maxima or sums / tap offsets;
    ``room`` is how many elements of the input array follow ``xp``."""
    cdef Py_ssize_t oh0, nb, m, i, j, r, oh, ow, hstart, wstart, h0
    cdef Py_ssize_t Wp = g.Wp, Wo = g.Wo, W = g.W
    cdef bint first
    cdef floating d, ninf = -INFINITY
    cdef floating* orow
    cdef int64_t* irow
    cdef const floating* arow
    cdef const int32_t* brow
    cdef int64_t base
    if g.flat:
        oh0 = g.ra
        while oh0 < g.rb:  # bands of g.fband output rows
            _flat_band(xp, room, op, ip, P, acc, boff, lidx, g, oh0, min(g.fband, g.rb - oh0), is_max, rdiv, cdiv)
            oh0 += g.fband
        for oh in range(g.Ho):  # the border rows
            if g.ra <= oh < g.rb:
                continue
            for ow in range(Wo):
                if is_max:
                    _max_one(xp, g.H, W, oh * g.sh - g.ph, ow * g.sw - g.pw, g.kh, g.kw, g.dh, g.dw,
                             op + oh * Wo + ow, ip + oh * Wo + ow)
                else:
                    op[oh * Wo + ow] = _avg_one(xp, g, oh, ow, rdiv, cdiv)
        return
    for oh0 in range(0, g.Ho, 1):  # bands of g.band output rows
        if oh0 % g.band:
            continue
        nb = min(g.band, g.Ho - oh0)
        _to_phases(xp, P, g, oh0, nb + g.si_max, room, ninf if is_max else 0)
        m = _padded(nb * Wp)
        for i in range(g.kh):
            _tap_row(P + i * g.dh % g.sh * g.sw * g.stride + (i * g.dh // g.sh) * Wp, g.stride, i, g, acc, boff, m,
                     i == 0, is_max)
        for r in range(nb):
            oh = oh0 + r
            orow = op + oh * Wo
            arow = acc + r * Wp
            if not is_max:
                for ow in range(Wo):
                    d = rdiv[oh] * cdiv[ow]
                    orow[ow] = arow[ow] / d if d > 0 else 0
                continue
            irow = ip + oh * Wo
            brow = boff + r * Wp
            hstart = oh * g.sh - g.ph
            base = hstart * W - g.pw
            _copy_max(orow, irow, arow, brow, Wo, base, g.sw)
            # windows whose first tap is padding: if no in-image value beat -inf, PyTorch
            # reports the first in-image tap, not the padding tap the sweep started from
            h0 = _first_on_grid(hstart, g.dh)
            for ow in range(Wo):
                wstart = ow * g.sw - g.pw
                if hstart >= 0 and wstart >= 0:
                    break
                if arow[ow] == ninf:
                    irow[ow] = h0 * W + _first_on_grid(wstart, g.dw)


def max_forward(const floating[:, :, :, ::1] x, floating[:, :, :, ::1] out, int64_t[:, :, :, ::1] idx,
                Py_ssize_t kh, Py_ssize_t kw, Py_ssize_t sh, Py_ssize_t sw, Py_ssize_t ph, Py_ssize_t pw,
                Py_ssize_t dh, Py_ssize_t dw, int nt):
    """Max pooling with PyTorch's int64 flat indices into each (H, W) plane.

    Parameters
    ----------
    x : float32 or float64 array, shape (N, C, H, W), C-contiguous
    out : array of x's dtype, shape (N, C, Ho, Wo)
        Overwritten with the window maxima (every element is written).
    idx : int64 array, shape (N, C, Ho, Wo)
        Overwritten with the flat index ``ih * W + iw`` of each maximum in its plane.
    kh, kw, sh, sw, ph, pw, dh, dw : int
        Kernel size, stride, padding (-inf) and dilation, as validated by the caller
        (padding at most half the kernel); ``out``'s shape carries ceil_mode.
    nt : int
        OpenMP threads.
    """
    cdef Py_ssize_t N = x.shape[0], C = x.shape[1], H = x.shape[2], W = x.shape[3]
    cdef Py_ssize_t Ho = out.shape[2], Wo = out.shape[3], planes = N * C
    cdef Py_ssize_t t, oh, ow
    if planes == 0:
        return
    cdef _Plan g = _plan(H, W, Ho, Wo, kh, kw, sh, sw, ph, pw, dh, dw)
    cdef floating* op
    cdef int64_t* ip
    if (kh - 1) * dh * W + (kw - 1) * dw > _INT32_MAX:  # tap offsets too large for the int32 scratch
        with nogil:
            for t in prange(planes, num_threads=nt, schedule="dynamic", chunksize=_rows_per_chunk(planes, nt)):
                op = &out[t // C, t % C, 0, 0]
                ip = &idx[t // C, t % C, 0, 0]
                for oh in range(Ho):
                    for ow in range(Wo):
                        _max_one(&x[t // C, t % C, 0, 0], H, W, oh * sh - ph, ow * sw - pw, kh, kw, dh, dw,
                                 op + oh * Wo + ow, ip + oh * Wo + ow)
        return
    # per thread: the phase planes (-inf everywhere a band does not write), the running maxima
    cdef Py_ssize_t planes_len = max(sh * sw * g.stride, sw * g.flen), m = max(_padded(g.band * g.Wp), g.alen)
    cdef floating[:, ::1] scratch = aligned_rows(max(nt, 1), planes_len + m, np.asarray(out).dtype, -np.inf)
    cdef int32_t[:, ::1] boff = aligned_rows(max(nt, 1), m, np.int32)
    cdef int64_t[:, ::1] lidx = aligned_rows(max(nt, 1), max(g.alen, 1), np.int64)
    with nogil:
        for t in prange(planes, num_threads=nt, schedule="dynamic", chunksize=_rows_per_chunk(planes, nt)):
            _pool_plane(&x[t // C, t % C, 0, 0], (planes - t) * H * W, &out[t // C, t % C, 0, 0],
                        &idx[t // C, t % C, 0, 0], &scratch[threadid(), 0], &scratch[threadid(), planes_len], &boff[threadid(), 0],
                        &lidx[threadid(), 0], &g, True, NULL, NULL)


def avg_forward(const floating[:, :, :, ::1] x, floating[:, :, :, ::1] out,
                Py_ssize_t kh, Py_ssize_t kw, Py_ssize_t sh, Py_ssize_t sw, Py_ssize_t ph, Py_ssize_t pw,
                bint count_include_pad, int nt):
    """Average pooling with PyTorch's divisor rule (0 where the divisor is 0).

    Parameters
    ----------
    x : float32 or float64 array, shape (N, C, H, W), C-contiguous
    out : array of x's dtype, shape (N, C, Ho, Wo)
        Overwritten (every element is written); its shape carries ceil_mode.
    kh, kw, sh, sw, ph, pw : int
        Kernel size, stride and (zero) padding.
    count_include_pad : bool
        Whether padding counts in the divisor (cells added by ceil_mode never do).
    nt : int
        OpenMP threads.
    """
    cdef Py_ssize_t N = x.shape[0], C = x.shape[1], H = x.shape[2], W = x.shape[3]
    cdef Py_ssize_t Ho = out.shape[2], Wo = out.shape[3], planes = N * C
    cdef Py_ssize_t t
    if planes == 0:
        return
    dtype = np.asarray(out).dtype
    rows, cols = _divisor_factors(H, W, Ho, Wo, kh, kw, sh, sw, ph, pw, count_include_pad, dtype)
    cdef const floating[::1] rdiv = rows
    cdef const floating[::1] cdiv = cols
    cdef _Plan g = _plan(H, W, Ho, Wo, kh, kw, sh, sw, ph, pw, 1, 1)
    cdef Py_ssize_t planes_len = max(sh * sw * g.stride, sw * g.flen), m = max(_padded(g.band * g.Wp), g.alen)
    cdef floating[:, ::1] scratch = aligned_rows(max(nt, 1), planes_len + m, dtype, 0)
    with nogil:
        for t in prange(planes, num_threads=nt, schedule="dynamic", chunksize=_rows_per_chunk(planes, nt)):
            _pool_plane(&x[t // C, t % C, 0, 0], (planes - t) * H * W, &out[t // C, t % C, 0, 0], NULL,
                        &scratch[threadid(), 0],
                        &scratch[threadid(), planes_len], NULL, NULL, &g, False, &rdiv[0], &cdiv[0])


# --------------------------------------------------------------------------- backward


#: see max_backward
_zero = 0.0


cdef inline Py_ssize_t _scatter_add(floating* plane, const floating* g, const int64_t* ind, Py_ssize_t n,
                                    Py_ssize_t lo, Py_ssize_t span) noexcept nogil:
    """``plane[ind[o]] += g[o]`` for ``o < n`` in increasing ``o``, skipping the indices outside
    ``[lo, lo + span)``; returns how many were skipped.  Four at a time, with one range test
    when all four are inside."""
    cdef Py_ssize_t o = 0, skipped = 0
    cdef uint64_t i0, i1, i2, i3, u = <uint64_t> span
    while o + 4 <= n:
        i0, i1, i2, i3 = ind[o] - lo, ind[o + 1] - lo, ind[o + 2] - lo, ind[o + 3] - lo
        if i0 < u and i1 < u and i2 < u and i3 < u:
            plane[lo + i0] += g[o]
            plane[lo + i1] += g[o + 1]
            plane[lo + i2] += g[o + 2]
            plane[lo + i3] += g[o + 3]
        else:
            skipped += (i0 >= u) + (i1 >= u) + (i2 >= u) + (i3 >= u)
            if i0 < u:
                plane[lo + i0] += g[o]
            if i1 < u:
                plane[lo + i1] += g[o + 1]
            if i2 < u:
                plane[lo + i2] += g[o + 2]
            if i3 < u:
                plane[lo + i3] += g[o + 3]
        o += 4
    while o < n:
        i0 = ind[o] - lo
        if i0 < u:
            plane[lo + i0] += g[o]
        else:
            skipped += 1
        o += 1
    return skipped


cdef bint _scatter_by_rows(floating* plane, const floating* g, const int64_t* ind, Py_ssize_t H, Py_ssize_t W,
                           Py_ssize_t Ho, Py_ssize_t Wo, Py_ssize_t kh, Py_ssize_t sh, Py_ssize_t ph, Py_ssize_t dh,
                           floating zero) noexcept nogil:
    """Zero and scatter one plane output row by output row, zeroing each input row just before
    the first window reaches it, so that the scatter finds its rows in L1 rather than in L2.
    Returns False (leaving the plane half-done) as soon as an index lies outside its window's
    rows; the caller then redoes the plane whole."""
    cdef Py_ssize_t oh, lo, hi, done = 0  # rows 0 .. done-1 are zeroed
    for oh in range(Ho):
        lo = max(oh * sh - ph, 0)
        hi = min(oh * sh - ph + (kh - 1) * dh + 1, H)
        if hi > done:
            _fill(plane + done * W, zero, (hi - done) * W)
            done = hi
        _prefetch_run(ind + (oh + 1) * Wo + _AHEAD // 8, Wo * 8)
        _prefetch_run(g + (oh + 1) * Wo + _AHEAD // 8, Wo * sizeof(floating))
        if _scatter_add(plane, g + oh * Wo, ind + oh * Wo, Wo, lo * W, (hi - lo) * W):
            return False
    _fill(plane + done * W, zero, (H - done) * W)
    return True


def max_backward(const floating[:, :, :, ::1] gy, const int64_t[:, :, :, ::1] idx,
                 floating[:, :, :, ::1] gx, Py_ssize_t kh, Py_ssize_t sh, Py_ssize_t ph, Py_ssize_t dh, int nt):
    """``gx[n, c].flat[idx[n, c, o]] += gy[n, c, o]`` onto zero, in increasing ``o``.

    Parameters
    ----------
    gy : float array, shape (N, C, Ho, Wo)
    idx : int64 array, shape (N, C, Ho, Wo)
        Flat indices into each (H, W) plane; indices outside the plane are skipped (the
        public API rejects them earlier).
    gx : float array, shape (N, C, H, W)
        Overwritten (every element is written): each plane is zeroed while in cache, then
        scattered into; planes over 16 KiB row by row (see :func:`_scatter_by_rows`).
    kh, sh, ph, dh : int
        The pooling's kernel height, row stride, top padding and row dilation: which input
        rows each output row's windows span.
    nt : int
        OpenMP threads.
    """
    cdef Py_ssize_t N = gx.shape[0], C = gx.shape[1], H = gx.shape[2], W = gx.shape[3], HW = H * W
    cdef Py_ssize_t Ho = gy.shape[2], Wo = gy.shape[3], P = Ho * Wo, planes = N * C
    cdef Py_ssize_t t, o
    cdef int64_t i
    cdef floating* plane
    cdef const floating* g
    cdef const int64_t* ind
    # 0, but not a compile-time constant: GCC would turn the zeroing loop into a memset call,
    # which costs more than the loop on a plane of a few KiB (rep stosb start-up)
    cdef floating zero = _zero
    if planes == 0:
        return
    with nogil:
        for t in prange(planes, num_threads=nt, schedule="dynamic", chunksize=_rows_per_chunk(planes, nt)):
            plane = &gx[t // C, t % C, 0, 0]
            g = &gy[t // C, t % C, 0, 0]
            ind = &idx[t // C, t % C, 0, 0]
            if HW * sizeof(floating) > 16384 and _scatter_by_rows(plane, g, ind, H, W, Ho, Wo, kh, sh, ph, dh, zero):
                continue
            _fill(plane, zero, HW)
            _scatter_add(plane, g, ind, P, 0, HW)


cdef inline void _add_shifted(floating* acc, const floating* x, Py_ssize_t n) noexcept nogil:
    """``acc[e] += x[e]`` for ``e < n``."""
    cdef Py_ssize_t e
    for e in range(n):
        acc[e] = acc[e] + x[e]


cdef void _avg_back_plane(const floating* gyp, floating* gxp, floating* S, floating* G, const _Plan* g,
                          const floating* rdiv, const floating* cdiv) noexcept nogil:
    """Average-pooling gradient of one plane, band by band of phase rows: ``S`` (a margin of
    ``Wp`` zeros, then rows of ``Wp``) takes the scaled gradients of the output rows that
    reach the band, ``G`` the band's phase planes (``g.stride`` apart)."""
    cdef Py_ssize_t Wp = g.Wp, Wo = g.Wo, rows_total = (g.H + g.ph + g.sh - 1) // g.sh
    cdef Py_ssize_t p0, nb, k, oh, ow, m, i, j, a, b, r, ih, n_pad = _padded(g.qb - g.qa)
    cdef floating d, zero = 0
    cdef floating* srow
    for p0 in range(0, rows_total, 1):  # bands of g.band phase rows
        if p0 % g.band:
            continue
        nb = min(g.band, rows_total - p0)
        for k in range(nb + g.si_max):  # output row p0 - si_max + k
            oh = p0 - g.si_max + k
            srow = S + Wp + k * Wp
            if 0 <= oh < g.Ho:
                for ow in range(Wo):
                    d = rdiv[oh] * cdiv[ow]
                    srow[ow] = gyp[oh * Wo + ow] / d if d > 0 else zero
                _fill(srow + Wo, zero, Wp - Wo)
            else:
                _fill(srow, zero, Wp)
        m = _padded(nb * Wp)
        for a in range(g.sh * g.sw):
            _fill(G + a * g.stride, zero, m)
        # taps in decreasing shift (i, then j, decreasing): each element's windows in increasing order
        for i in range(g.kh - 1, -1, -1):
            for j in range(g.kw - 1, -1, -1):
                _add_shifted(G + (i % g.sh * g.sw + j % g.sw) * g.stride,
                             S + Wp + (g.si_max - i // g.sh) * Wp - j // g.sw, m)
        for r in range(nb):
            for a in range(g.sh):
                ih = (p0 + r) * g.sh + a - g.ph
                if 0 <= ih < g.H:
                    _phases_to_row(G + a * g.sw * g.stride + r * Wp, gxp + ih * g.W, g, n_pad
                                   if ih * g.W + (g.qa + n_pad) * g.sw - g.pw <= g.H * g.W else g.qb - g.qa)


cdef void _avg_back_tiled(const floating* gyp, floating* gxp, floating* srow, Py_ssize_t H, Py_ssize_t W,
                          Py_ssize_t Ho, Py_ssize_t Wo, Py_ssize_t kh, Py_ssize_t kw, Py_ssize_t sh,
                          Py_ssize_t sw) noexcept nogil:
    """Average-pooling gradient of one plane whose windows do not overlap and lie inside it (no
    padding, kh <= sh, kw <= sw, see ``avg_backward``): every element takes at most one window's
    share gy / (kh*kw).  Each output row's shares (``srow[:Wo]``) are spread once into
    ``srow[Wo:]`` (max(W, Wo*sw) elements, zeros between the windows) and copied to the kh input
    rows they cover; the rest is zero."""
    cdef Py_ssize_t oh, ow, a, b, ih, wx = Wo * sw
    cdef floating d = <floating> (kh * kw), zero = 0
    cdef floating* row = srow + Wo
    cdef const floating* g
    if wx < W:
        _fill(row + wx, zero, W - wx)
    for oh in range(Ho):
        g = gyp + oh * Wo
        for ow in range(Wo):  # a vector division
            srow[ow] = g[ow] / d
        if kw == 2 and sw == 2:  # the common 2x2/2 (GCC interleaves it with vector shuffles)
            for ow in range(Wo):
                row[2 * ow] = srow[ow]
                row[2 * ow + 1] = srow[ow]
        else:
            for ow in range(Wo):
                for b in range(sw):
                    row[ow * sw + b] = srow[ow] if b < kw else zero
        for a in range(sh):
            ih = oh * sh + a
            if ih >= H:
                break
            if a < kh:
                memcpy(gxp + ih * W, row, W * sizeof(floating))
            else:
                _fill(gxp + ih * W, zero, W)
    if Ho * sh < H:
        _fill(gxp + Ho * sh * W, zero, (H - Ho * sh) * W)


def avg_backward(const floating[:, :, :, ::1] gy, floating[:, :, :, ::1] gx,
                 Py_ssize_t kh, Py_ssize_t kw, Py_ssize_t sh, Py_ssize_t sw, Py_ssize_t ph, Py_ssize_t pw,
                 bint count_include_pad, int nt):
    """Spread ``gy[n, c, oh, ow] / divisor`` over its window; every element of ``gx`` is
    written once, the sum of its windows' shares in increasing output order.

    Parameters
    ----------
    gy : float array, shape (N, C, Ho, Wo)
    gx : float array, shape (N, C, H, W)
        Overwritten (every element is written).
    kh, kw, sh, sw, ph, pw, count_include_pad, nt
        As in :func:`avg_forward`.
    """
    cdef Py_ssize_t N = gx.shape[0], C = gx.shape[1], H = gx.shape[2], W = gx.shape[3]
    cdef Py_ssize_t Ho = gy.shape[2], Wo = gy.shape[3], planes = N * C
    cdef Py_ssize_t t
    if planes == 0:
        return
    dtype = np.asarray(gx).dtype
    # windows that tile the plane without overlapping: a copy per input row (64x32x28x28, 2x2/2:
    # one thread 2.03 -> 0.58 ms, two 0.88-1.0 -> 0.54; the band kernel below, for overlapping
    # windows, had taken 2.4x numba's time on them)
    cdef floating[:, ::1] rows_
    if (ph == 0 and pw == 0 and kh <= sh and kw <= sw and Ho > 0 and Wo > 0 and (Ho - 1) * sh + kh <= H
            and (Wo - 1) * sw + kw <= W):
        rows_ = aligned_rows(max(nt, 1), Wo + max(W, Wo * sw), dtype)
        with nogil:
            for t in prange(planes, num_threads=nt, schedule="static"):
                _avg_back_tiled(&gy[t // C, t % C, 0, 0], &gx[t // C, t % C, 0, 0], &rows_[threadid(), 0], H, W,
                                Ho, Wo, kh, kw, sh, sw)
        return
    rows, cols = _divisor_factors(H, W, Ho, Wo, kh, kw, sh, sw, ph, pw, count_include_pad, dtype)
    cdef const floating[::1] rdiv = rows
    cdef const floating[::1] cdiv = cols
    cdef _Plan g = _plan(H, W, Ho, Wo, kh, kw, sh, sw, ph, pw, 1, 1)
    # per thread: S (margin, band + si_max rows, spare lanes), then the phase planes
    cdef Py_ssize_t s_len = (g.band + g.si_max + 2) * g.Wp + _PAD
    cdef floating[:, ::1] scratch = aligned_rows(max(nt, 1), s_len + sh * sw * g.stride, dtype, 0)
    with nogil:
        for t in prange(planes, num_threads=nt, schedule="dynamic", chunksize=_rows_per_chunk(planes, nt)):
            _avg_back_plane(&gy[t // C, t % C, 0, 0], &gx[t // C, t % C, 0, 0], &scratch[threadid(), 0],
                            &scratch[threadid(), s_len], &g, &rdiv[0], &cdiv[0])
