# cython: language_level=3
"""im2col / col2im lowering plus GEMM through a real BLAS (``scipy.linalg.cython_blas``).

A chunk of ``nb`` images is unfolded into one column matrix ``col`` of shape
(C*R*S, nb*P), P = out_h*out_w: row (c, r, s) holds, image after image, the
input pixel that kernel tap (r, s) of channel c multiplies at each output
position.  Rows of one group are contiguous, so each group is ONE GEMM per chunk
(multi-threaded by BLAS itself, called outside any ``prange``):

    forward          out_t[g]  (Kg, nb*P)   = W[g] (Kg, CgRS) @ col[g]
    backward-input   col[g]    (CgRS, nb*P) = W[g].T @ gy_t[g]           then col2im
    backward-weight  gW[g]     (Kg, CgRS)  += gy_t[g] @ col[g].T

where ``out_t`` / ``gy_t`` are (K, nb*P) transposes of the (nb, K, P) NCHW slices.
The copies (im2col, col2im, transposes) run under ``prange`` over independent
(image, channel) planes.  1x1 stride-1 unpadded convolutions need no lowering:
:func:`pointwise_forward` and friends do one GEMM per image straight on the
NCHW arrays.  The caller chooses ``nb`` so that the buffers respect the
workspace limit, and guarantees every GEMM dimension fits a 32-bit int.
"""

from cython cimport floating
from cython.parallel cimport parallel, prange, threadid
from libc.string cimport memcpy

import numpy as np

from ._blas cimport gemm as _gemm
from ._loops cimport fill, tap_ranges


cdef inline void _im2col_plane(const floating* xp, Py_ssize_t H, Py_ssize_t W, floating* col,
                               Py_ssize_t ld, Py_ssize_t R, Py_ssize_t S, Py_ssize_t Ho, Py_ssize_t Wo,
                               Py_ssize_t sh, Py_ssize_t sw, Py_ssize_t pt, Py_ssize_t pl, Py_ssize_t dh,
                               Py_ssize_t dw, const Py_ssize_t* los, const Py_ssize_t* his,
                               Py_ssize_t oh0, Py_ssize_t oh1) noexcept nogil:
    """Unfold output rows oh0 .. oh1-1 of one (H, W) input plane into R*S
    column rows ``col + (r*S + s) * ld``, (oh1 - oh0) * Wo values each (``los`` / ``his``: the
    per-tap column ranges from ``tap_ranges``)."""
    cdef Py_ssize_t r, s, oh, ow, ih, off, lo, hi
    cdef floating* seg
    cdef const floating* xrow
    for r in range(R):
        for s in range(S):
            seg = col + (r * S + s) * ld - oh0 * Wo
            off = s * dw - pl
            lo = los[s]  # lo == hi (and the row all zero) when the tap never lands inside
            hi = his[s]
            for oh in range(oh0, oh1):
                ih = oh * sh - pt + r * dh
                if ih < 0 or ih >= H:
                    fill(seg + oh * Wo, 0, Wo)
                    continue
                xrow = xp + ih * W
                fill(seg + oh * Wo, 0, lo)
                if sw == 1:
                    for ow in range(lo, hi):
                        seg[oh * Wo + ow] = xrow[ow + off]
                else:
                    for ow in range(lo, hi):
                        seg[oh * Wo + ow] = xrow[ow * sw + off]
                fill(seg + oh * Wo + hi, 0, Wo - hi)


cdef inline void _col2im_plane(const floating* col, Py_ssize_t ld, floating* gxp, Py_ssize_t H, Py_ssize_t W,
                               Py_ssize_t R, Py_ssize_t S, Py_ssize_t Ho, Py_ssize_t Wo,
                               Py_ssize_t sh, Py_ssize_t sw, Py_ssize_t pt, Py_ssize_t pl, Py_ssize_t dh,
                               Py_ssize_t dw, const Py_ssize_t* los, const Py_ssize_t* his,
                               Py_ssize_t oh0, Py_ssize_t oh1) noexcept nogil:
    """Add R*S column rows ``col + (r*S + s) * ld`` of output rows oh0 .. oh1-1
    back into one (H, W) plane."""
    cdef Py_ssize_t r, s, oh, ow, ih, off, lo, hi
    cdef const floating* seg
    cdef floating* gxrow
    for r in range(R):
        for s in range(S):
            seg = col + (r * S + s) * ld - oh0 * Wo
            off = s * dw - pl
            lo = los[s]
            hi = his[s]
            if hi <= lo:
                continue
            for oh in range(oh0, oh1):
                ih = oh * sh - pt + r * dh
                if ih < 0 or ih >= H:
                    continue
                gxrow = gxp + ih * W
                if sw == 1:
                    for ow in range(lo, hi):
                        gxrow[ow + off] += seg[oh * Wo + ow]
                else:
                    for ow in range(lo, hi):
                        gxrow[ow * sw + off] += seg[oh * Wo + ow]


cdef void _im2col(const floating[:, :, :, ::1] x, Py_ssize_t n0, Py_ssize_t nb, floating* col,
                  Py_ssize_t R, Py_ssize_t S, Py_ssize_t Ho, Py_ssize_t Wo, Py_ssize_t sh, Py_ssize_t sw,
                  Py_ssize_t pt, Py_ssize_t pl, Py_ssize_t dh, Py_ssize_t dw, const Py_ssize_t* los,
                  const Py_ssize_t* his, int nt) noexcept nogil:
    """Fill ``col`` (C*R*S, nb*P) from images n0 .. n0+nb-1, one (image, channel) plane per unit."""
    cdef Py_ssize_t C = x.shape[1], P = Ho * Wo, t
    for t in prange(nb * C, num_threads=nt, schedule="dynamic"):
        _im2col_plane(&x[n0 + t // C, t % C, 0, 0], x.shape[2], x.shape[3],
                      col + (t % C) * R * S * nb * P + (t // C) * P, nb * P,
                      R, S, Ho, Wo, sh, sw, pt, pl, dh, dw, los, his, 0, Ho)


cdef void _col2im(const floating* col, floating[:, :, :, ::1] gx, Py_ssize_t n0, Py_ssize_t nb,
                  Py_ssize_t R, Py_ssize_t S, Py_ssize_t Ho, Py_ssize_t Wo, Py_ssize_t sh, Py_ssize_t sw,
                  Py_ssize_t pt, Py_ssize_t pl, Py_ssize_t dh, Py_ssize_t dw, const Py_ssize_t* los,
                  const Py_ssize_t* his, int nt) noexcept nogil:
    """Add ``col`` (C*R*S, nb*P) back into images n0 .. n0+nb-1 of ``gx`` (one plane per unit)."""
    cdef Py_ssize_t C = gx.shape[1], P = Ho * Wo, t
    for t in prange(nb * C, num_threads=nt, schedule="dynamic"):
        _col2im_plane(col + (t % C) * R * S * nb * P + (t // C) * P, nb * P,
                      &gx[n0 + t // C, t % C, 0, 0], gx.shape[2], gx.shape[3],
                      R, S, Ho, Wo, sh, sw, pt, pl, dh, dw, los, his, 0, Ho)


cdef void _to_kmajor(const floating[:, :, :, ::1] a, Py_ssize_t n0, Py_ssize_t nb, floating* t_,
                     int nt) noexcept nogil:
    """t_ (K, nb*P) <- a[n0:n0+nb] (nb, K, P)."""
    cdef Py_ssize_t K = a.shape[1], P = a.shape[2] * a.shape[3]
    cdef Py_ssize_t u, b, k, p
    cdef const floating* src
    for u in prange(nb * K, num_threads=nt, schedule="dynamic"):
        b = u // K
        k = u % K
        src = &a[n0 + b, k, 0, 0]
        for p in range(P):
            t_[(k * nb + b) * P + p] = src[p]


cdef Py_ssize_t[::1] _tap_ranges(Py_ssize_t S, Py_ssize_t dw, Py_ssize_t pl, Py_ssize_t sw, Py_ssize_t W,
                                 Py_ssize_t Wo):
    """(lo[0..S), hi[0..S)) of ``tap_ranges`` in one array."""
    cdef Py_ssize_t[::1] ranges = np.empty(2 * S, np.intp)
    tap_ranges(&ranges[0], &ranges[S], S, dw, pl, sw, W, Wo)
    return ranges


def forward(const floating[:, :, :, ::1] x, const floating[:, ::1] w2, const floating[::1] bias,
            floating[:, :, :, ::1] out, floating[::1] col, floating[::1] tmp, Py_ssize_t n0, Py_ssize_t nb,
            Py_ssize_t R, Py_ssize_t S, Py_ssize_t sh, Py_ssize_t sw, Py_ssize_t pt, Py_ssize_t pl,
            Py_ssize_t dh, Py_ssize_t dw, Py_ssize_t groups, int nt):
    """Forward convolution of images n0 .. n0+nb-1; ``w2`` is the weight as (K, Cg*R*S)."""
    cdef Py_ssize_t K = out.shape[1], Ho = out.shape[2], Wo = out.shape[3], P = Ho * Wo
    cdef Py_ssize_t Kg = K // groups, CRSg = w2.shape[1], g, u, b, k, p
    cdef floating* dst
    cdef floating bk
    cdef Py_ssize_t[::1] ranges = _tap_ranges(S, dw, pl, sw, x.shape[3], out.shape[3])
    cdef const Py_ssize_t* los = &ranges[0]
    cdef const Py_ssize_t* his = &ranges[S]
    with nogil:
        _im2col(x, n0, nb, &col[0], R, S, Ho, Wo, sh, sw, pt, pl, dh, dw, los, his, nt)
        for g in range(groups):
            _gemm(False, False, Kg, nb * P, CRSg, <floating> 1, &w2[g * Kg, 0], CRSg,
                  &col[g * CRSg * nb * P], nb * P, <floating> 0, &tmp[g * Kg * nb * P], nb * P)
        for u in prange(nb * K, num_threads=nt, schedule="dynamic"):
            b = u // K
            k = u % K
            dst = &out[n0 + b, k, 0, 0]
            bk = bias[k]
            for p in range(P):
                dst[p] = tmp[(k * nb + b) * P + p] + bk


def backward_input(const floating[:, :, :, ::1] gy, const floating[:, ::1] w2, floating[:, :, :, ::1] gx,
                   floating[::1] col, floating[::1] tmp, Py_ssize_t n0, Py_ssize_t nb,
                   Py_ssize_t R, Py_ssize_t S, Py_ssize_t sh, Py_ssize_t sw, Py_ssize_t pt, Py_ssize_t pl,
                   Py_ssize_t dh, Py_ssize_t dw, Py_ssize_t groups, int nt):
    """Input gradient of images n0 .. n0+nb-1 (``gx`` zero there on entry)."""
    cdef Py_ssize_t K = gy.shape[1], Ho = gy.shape[2], Wo = gy.shape[3], P = Ho * Wo
    cdef Py_ssize_t Kg = K // groups, CRSg = w2.shape[1], g
    cdef Py_ssize_t[::1] ranges = _tap_ranges(S, dw, pl, sw, gx.shape[3], gy.shape[3])
    cdef const Py_ssize_t* los = &ranges[0]
    cdef const Py_ssize_t* his = &ranges[S]
    with nogil:
        _to_kmajor(gy, n0, nb, &tmp[0], nt)
        for g in range(groups):
            _gemm(True, False, CRSg, nb * P, Kg, <floating> 1, &w2[g * Kg, 0], CRSg,
                  &tmp[g * Kg * nb * P], nb * P, <floating> 0, &col[g * CRSg * nb * P], nb * P)
        _col2im(&col[0], gx, n0, nb, R, S, Ho, Wo, sh, sw, pt, pl, dh, dw, los, his, nt)


def backward_weight(const floating[:, :, :, ::1] gy, const floating[:, :, :, ::1] x, floating[:, ::1] gw2,
                    floating[::1] col, floating[::1] tmp, Py_ssize_t n0, Py_ssize_t nb,
                    Py_ssize_t R, Py_ssize_t S, Py_ssize_t sh, Py_ssize_t sw, Py_ssize_t pt, Py_ssize_t pl,
                    Py_ssize_t dh, Py_ssize_t dw, Py_ssize_t groups, int nt):
    """Add the weight gradient of images n0 .. n0+nb-1 into ``gw2`` (K, Cg*R*S)."""
    cdef Py_ssize_t K = gy.shape[1], Ho = gy.shape[2], Wo = gy.shape[3], P = Ho * Wo
    cdef Py_ssize_t Kg = K // groups, CRSg = gw2.shape[1], g
    cdef Py_ssize_t[::1] ranges = _tap_ranges(S, dw, pl, sw, x.shape[3], gy.shape[3])
    cdef const Py_ssize_t* los = &ranges[0]
    cdef const Py_ssize_t* his = &ranges[S]
    with nogil:
        _im2col(x, n0, nb, &col[0], R, S, Ho, Wo, sh, sw, pt, pl, dh, dw, los, his, nt)
        _to_kmajor(gy, n0, nb, &tmp[0], nt)
        for g in range(groups):
            _gemm(False, True, Kg, CRSg, nb * P, <floating> 1, &tmp[g * Kg * nb * P], nb * P,
                  &col[g * CRSg * nb * P], nb * P, <floating> 1, &gw2[g * Kg, 0], CRSg)


def pointwise_forward(const floating[:, :, :, ::1] x, const floating[:, ::1] w2, const floating[::1] bias,
                      floating[:, :, :, ::1] out, Py_ssize_t groups, int nt):
    """1x1, stride 1, no padding: out[n, g] = W[g] @ x[n, g], one GEMM per image and group.

    Images are spread over ``nt`` OpenMP threads (the caller pins BLAS to one
    thread when ``nt > 1``).
    """
    cdef Py_ssize_t N = x.shape[0], K = out.shape[1], P = x.shape[2] * x.shape[3]
    cdef Py_ssize_t Kg = K // groups, Cg = w2.shape[1], n, g, k
    with nogil:
        for n in prange(N, num_threads=nt, schedule="dynamic"):
            for k in range(K):
                fill(&out[n, k, 0, 0], bias[k], P)
            for g in range(groups):
                _gemm(False, False, Kg, P, Cg, <floating> 1, &w2[g * Kg, 0], Cg, &x[n, g * Cg, 0, 0], P,
                      <floating> 1, &out[n, g * Kg, 0, 0], P)


def pointwise_backward_input(const floating[:, :, :, ::1] gy, const floating[:, ::1] w2,
                             floating[:, :, :, ::1] gx, Py_ssize_t groups, int nt):
    """1x1, stride 1, no padding: gx[n, g] = W[g].T @ gy[n, g]."""
    cdef Py_ssize_t N = gy.shape[0], K = gy.shape[1], P = gy.shape[2] * gy.shape[3]
    cdef Py_ssize_t Kg = K // groups, Cg = w2.shape[1], n, g
    with nogil:
        for n in prange(N, num_threads=nt, schedule="dynamic"):
            for g in range(groups):
                _gemm(True, False, Cg, P, Kg, <floating> 1, &w2[g * Kg, 0], Cg, &gy[n, g * Kg, 0, 0], P,
                      <floating> 0, &gx[n, g * Cg, 0, 0], P)


def pointwise_backward_weight(const floating[:, :, :, ::1] gy, const floating[:, :, :, ::1] x,
                              floating[:, :, ::1] partial, Py_ssize_t groups):
    """1x1, stride 1, no padding: partial[tid, g] += gy[n, g] @ x[n, g].T over the images of
    thread ``tid`` (``partial.shape[0]`` threads; zero on entry)."""
    cdef Py_ssize_t N = gy.shape[0], K = gy.shape[1], P = gy.shape[2] * gy.shape[3]
    cdef Py_ssize_t Kg = K // groups, Cg = partial.shape[2], n, g
    cdef floating* gw = NULL
    cdef int nt = <int> partial.shape[0]
    with nogil, parallel(num_threads=nt):
        gw = &partial[threadid(), 0, 0]
        for n in prange(N, schedule="dynamic"):
            for g in range(groups):
                _gemm(False, True, Kg, Cg, P, <floating> 1, &gy[n, g * Kg, 0, 0], P, &x[n, g * Cg, 0, 0], P,
                      <floating> 1, gw + g * Kg * Cg, Cg)


# --------------------------------------------------------------------------- chunks per thread
#
# The alternative to one big multi-threaded GEMM per chunk: each OpenMP thread
# takes whole chunks of ``nb`` images, unfolds them into its private column
# buffer ``cols[tid]`` (C*R*S, nb*P) and calls a single-threaded GEMM (the
# caller pins BLAS to one thread meanwhile), so no BLAS thread pool competes
# with OpenMP's.  Small images get several per chunk (one bigger GEMM instead
# of many tiny ones); with nb == 1 the GEMM reads and writes NCHW directly and
# no transposes are needed.  The weight gradient goes to per-thread partial sums.


cdef inline void _unfold_chunk(const floating[:, :, :, ::1] x, Py_ssize_t n0, Py_ssize_t m, floating* col,
                               Py_ssize_t R, Py_ssize_t S, Py_ssize_t Ho, Py_ssize_t Wo, Py_ssize_t sh,
                               Py_ssize_t sw, Py_ssize_t pt, Py_ssize_t pl, Py_ssize_t dh, Py_ssize_t dw,
                               const Py_ssize_t* los, const Py_ssize_t* his, Py_ssize_t oh0,
                               Py_ssize_t oh1) noexcept nogil:
    """Serial im2col of output rows oh0 .. oh1-1 of images n0 .. n0+m-1 into ``col``
    (C*R*S, m*Q), Q = (oh1 - oh0) * Wo (all rows whenever m > 1)."""
    cdef Py_ssize_t b, c, Q = (oh1 - oh0) * Wo
    for b in range(m):
        for c in range(x.shape[1]):
            _im2col_plane(&x[n0 + b, c, 0, 0], x.shape[2], x.shape[3], col + c * R * S * m * Q + b * Q, m * Q,
                          R, S, Ho, Wo, sh, sw, pt, pl, dh, dw, los, his, oh0, oh1)


cdef inline void _gather_kmajor(const floating[:, :, :, ::1] a, Py_ssize_t n0, Py_ssize_t m, Py_ssize_t f0,
                                Py_ssize_t q, floating* t_) noexcept nogil:
    """Serial t_ (K, m*q) <- a[n0:n0+m, :, f0:f0+q] (flat outputs f0 .. f0+q-1 of every plane of
    m images): GEMM operand rows q apart, where in place they lie a whole plane apart (vgg-224:
    200,704 bytes, a multiple of 4 KiB, so that every row falls in the same cache sets)."""
    cdef Py_ssize_t b, k
    for b in range(m):
        for k in range(a.shape[1]):
            memcpy(t_ + (k * m + b) * q, &a[n0 + b, k, 0, 0] + f0, q * sizeof(floating))


def forward_threads(const floating[:, :, :, ::1] x, const floating[:, ::1] w2, const floating[::1] bias,
                    floating[:, :, :, ::1] out, floating[:, ::1] cols, floating[:, ::1] tmps, Py_ssize_t nb,
                    Py_ssize_t rb, Py_ssize_t R, Py_ssize_t S, Py_ssize_t sh, Py_ssize_t sw, Py_ssize_t pt,
                    Py_ssize_t pl, Py_ssize_t dh, Py_ssize_t dw, Py_ssize_t groups):
    """Forward convolution on ``cols.shape[0]`` threads, chunks of ``nb`` images per thread.

    With one image per chunk, its output rows are lowered ``rb`` at a time (column blocks
    of (C*R*S, rb*Wo) that stay in L2) and multiplied straight into the NCHW output.
    """
    cdef Py_ssize_t N = x.shape[0], K = out.shape[1], Ho = out.shape[2], Wo = out.shape[3], P = Ho * Wo
    cdef Py_ssize_t Kg = K // groups, CRSg = w2.shape[1], ch, n0, m, b, k, g, p, blk, oh0, oh1, Q
    cdef floating* col = NULL
    cdef floating* tmp = NULL
    cdef floating* dst
    cdef floating bk
    cdef int nt = <int> cols.shape[0]
    cdef Py_ssize_t[::1] ranges = _tap_ranges(S, dw, pl, sw, x.shape[3], Wo)
    cdef const Py_ssize_t* los = &ranges[0]
    cdef const Py_ssize_t* his = &ranges[S]
    with nogil, parallel(num_threads=nt):
        col = &cols[threadid(), 0]
        tmp = &tmps[threadid(), 0]
        for ch in prange((N + nb - 1) // nb, schedule="dynamic"):
            n0 = ch * nb
            m = min(nb, N - n0)
            if m == 1:  # straight into NCHW, a block of rows at a time
                for k in range(K):
                    fill(&out[n0, k, 0, 0], bias[k], P)
                for blk in range((Ho + rb - 1) // rb):
                    oh0 = blk * rb
                    oh1 = min(oh0 + rb, Ho)
                    Q = (oh1 - oh0) * Wo
                    _unfold_chunk(x, n0, 1, col, R, S, Ho, Wo, sh, sw, pt, pl, dh, dw, los, his, oh0, oh1)
                    for g in range(groups):
                        _gemm(False, False, Kg, Q, CRSg, <floating> 1, &w2[g * Kg, 0], CRSg, col + g * CRSg * Q, Q,
                              <floating> 1, &out[n0, g * Kg, oh0, 0], P)
            else:
                _unfold_chunk(x, n0, m, col, R, S, Ho, Wo, sh, sw, pt, pl, dh, dw, los, his, 0, Ho)
                for g in range(groups):
                    _gemm(False, False, Kg, m * P, CRSg, <floating> 1, &w2[g * Kg, 0], CRSg,
                          col + g * CRSg * m * P, m * P, <floating> 0, tmp + g * Kg * m * P, m * P)
                for b in range(m):
                    for k in range(K):
                        dst = &out[n0 + b, k, 0, 0]
                        bk = bias[k]
                        for p in range(P):
                            dst[p] = tmp[(k * m + b) * P + p] + bk


def backward_input_threads(const floating[:, :, :, ::1] gy, const floating[:, ::1] w2,
                           floating[:, :, :, ::1] gx, floating[:, ::1] cols, floating[:, ::1] tmps,
                           Py_ssize_t nb, Py_ssize_t rb, Py_ssize_t R, Py_ssize_t S, Py_ssize_t sh, Py_ssize_t sw,
                           Py_ssize_t pt, Py_ssize_t pl, Py_ssize_t dh, Py_ssize_t dw, Py_ssize_t groups):
    """Input gradient (``gx`` zero on entry), chunks of ``nb`` images per thread; one image per
    chunk goes ``rb`` output rows at a time (as in ``forward_threads``), the block's rows of
    every output-gradient plane gathered into ``tmps`` (K * rb * Wo per thread) for its GEMM."""
    cdef Py_ssize_t N = gy.shape[0], C = gx.shape[1], K = gy.shape[1], Ho = gy.shape[2], Wo = gy.shape[3]
    cdef Py_ssize_t P = Ho * Wo, Kg = K // groups, CRSg = w2.shape[1], ch, n0, m, b, c, g, blk, oh0, oh1, Q
    cdef floating* col = NULL
    cdef floating* tmp = NULL
    cdef int nt = <int> cols.shape[0]
    cdef Py_ssize_t[::1] ranges = _tap_ranges(S, dw, pl, sw, gx.shape[3], Wo)
    cdef const Py_ssize_t* los = &ranges[0]
    cdef const Py_ssize_t* his = &ranges[S]
    cdef Py_ssize_t width = nb * P if nb > 1 else min(rb, Ho) * Wo  # GEMM columns of a chunk / row block
    if cols.shape[1] < C * R * S * width or tmps.shape[1] < K * width:
        raise ValueError(f"backward_input_threads: buffers of {cols.shape[1]} and {tmps.shape[1]} elements per thread "
                         f"are too small for {width} GEMM columns of {C * R * S} and {K} rows")
    with nogil, parallel(num_threads=nt):
        col = &cols[threadid(), 0]
        tmp = &tmps[threadid(), 0]
        for ch in prange((N + nb - 1) // nb, schedule="dynamic"):
            n0 = ch * nb
            m = min(nb, N - n0)
            if m == 1:
                for blk in range((Ho + rb - 1) // rb):
                    oh0 = blk * rb
                    oh1 = min(oh0 + rb, Ho)
                    Q = (oh1 - oh0) * Wo
                    _gather_kmajor(gy, n0, 1, oh0 * Wo, Q, tmp)
                    for g in range(groups):
                        _gemm(True, False, CRSg, Q, Kg, <floating> 1, &w2[g * Kg, 0], CRSg, tmp + g * Kg * Q,
                              Q, <floating> 0, col + g * CRSg * Q, Q)
                    for c in range(C):
                        _col2im_plane(col + c * R * S * Q, Q, &gx[n0, c, 0, 0], gx.shape[2], gx.shape[3],
                                      R, S, Ho, Wo, sh, sw, pt, pl, dh, dw, los, his, oh0, oh1)
            else:
                _gather_kmajor(gy, n0, m, 0, P, tmp)
                for g in range(groups):
                    _gemm(True, False, CRSg, m * P, Kg, <floating> 1, &w2[g * Kg, 0], CRSg, tmp + g * Kg * m * P,
                          m * P, <floating> 0, col + g * CRSg * m * P, m * P)
                for b in range(m):
                    for c in range(C):
                        _col2im_plane(col + c * R * S * m * P + b * P, m * P, &gx[n0 + b, c, 0, 0], gx.shape[2],
                                      gx.shape[3], R, S, Ho, Wo, sh, sw, pt, pl, dh, dw, los, his, 0, Ho)


def backward_weight_threads(const floating[:, :, :, ::1] gy, const floating[:, :, :, ::1] x,
                            floating[:, :, ::1] partial, floating[:, ::1] cols, floating[:, ::1] tmps,
                            Py_ssize_t nb, Py_ssize_t rb, Py_ssize_t R, Py_ssize_t S, Py_ssize_t sh, Py_ssize_t sw,
                            Py_ssize_t pt, Py_ssize_t pl, Py_ssize_t dh, Py_ssize_t dw, Py_ssize_t groups):
    """Per-thread weight-gradient partial sums ``partial[tid]`` (K, Cg*R*S), zero on entry; one
    image per chunk goes ``rb`` output rows at a time (as in ``forward_threads``)."""
    cdef Py_ssize_t N = gy.shape[0], K = gy.shape[1], Ho = gy.shape[2], Wo = gy.shape[3], P = Ho * Wo
    cdef Py_ssize_t Kg = K // groups, CRSg = partial.shape[2], ch, n0, m, g, blk, oh0, oh1, Q
    cdef floating* col = NULL
    cdef floating* tmp = NULL
    cdef floating* gw = NULL
    cdef int nt = <int> cols.shape[0]
    cdef Py_ssize_t[::1] ranges = _tap_ranges(S, dw, pl, sw, x.shape[3], Wo)
    cdef const Py_ssize_t* los = &ranges[0]
    cdef const Py_ssize_t* his = &ranges[S]
    with nogil, parallel(num_threads=nt):
        col = &cols[threadid(), 0]
        tmp = &tmps[threadid(), 0]
        gw = &partial[threadid(), 0, 0]
        for ch in prange((N + nb - 1) // nb, schedule="dynamic"):
            n0 = ch * nb
            m = min(nb, N - n0)
            if m == 1:
                for blk in range((Ho + rb - 1) // rb):
                    oh0 = blk * rb
                    oh1 = min(oh0 + rb, Ho)
                    Q = (oh1 - oh0) * Wo
                    _unfold_chunk(x, n0, 1, col, R, S, Ho, Wo, sh, sw, pt, pl, dh, dw, los, his, oh0, oh1)
                    for g in range(groups):
                        _gemm(False, True, Kg, CRSg, Q, <floating> 1, &gy[n0, g * Kg, oh0, 0], P,
                              col + g * CRSg * Q, Q, <floating> 1, gw + g * Kg * CRSg, CRSg)
            else:
                _unfold_chunk(x, n0, m, col, R, S, Ho, Wo, sh, sw, pt, pl, dh, dw, los, his, 0, Ho)
                _gather_kmajor(gy, n0, m, 0, P, tmp)
                for g in range(groups):
                    _gemm(False, True, Kg, CRSg, m * P, <floating> 1, tmp + g * Kg * m * P, m * P,
                          col + g * CRSg * m * P, m * P, <floating> 1, gw + g * Kg * CRSg, CRSg)
