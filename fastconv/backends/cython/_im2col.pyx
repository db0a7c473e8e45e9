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
from cython.parallel cimport prange
from scipy.linalg.cython_blas cimport dgemm, sgemm

from ._loops cimport end_in, fill, first_in


cdef void _gemm(bint ta, bint tb, Py_ssize_t m, Py_ssize_t n, Py_ssize_t k, floating alpha,
                const floating* a, Py_ssize_t lda, const floating* b, Py_ssize_t ldb, floating beta,
                floating* c, Py_ssize_t ldc) noexcept nogil:
    """Row-major ``C (m, n) = alpha * op(A) @ op(B) + beta * C`` via the column-major BLAS."""
    cdef char* transa = b"T" if tb else b"N"
    cdef char* transb = b"T" if ta else b"N"
    cdef int m_ = <int> n, n_ = <int> m, k_ = <int> k
    cdef int lda_ = <int> ldb, ldb_ = <int> lda, ldc_ = <int> ldc
    if floating is float:
        sgemm(transa, transb, &m_, &n_, &k_, &alpha, <float*> b, &lda_, <float*> a, &ldb_, &beta, c, &ldc_)
    else:
        dgemm(transa, transb, &m_, &n_, &k_, &alpha, <double*> b, &lda_, <double*> a, &ldb_, &beta, c, &ldc_)


cdef void _im2col(const floating[:, :, :, ::1] x, Py_ssize_t n0, Py_ssize_t nb, floating* col,
                  Py_ssize_t R, Py_ssize_t S, Py_ssize_t Ho, Py_ssize_t Wo, Py_ssize_t sh, Py_ssize_t sw,
                  Py_ssize_t pt, Py_ssize_t pl, Py_ssize_t dh, Py_ssize_t dw, int nt) noexcept nogil:
    """Fill ``col`` (C*R*S, nb*P) from images n0 .. n0+nb-1."""
    cdef Py_ssize_t C = x.shape[1], H = x.shape[2], W = x.shape[3], P = Ho * Wo
    cdef Py_ssize_t t, b, c, r, s, oh, ow, ih, off, lo, hi
    cdef floating* seg
    cdef const floating* xrow
    for t in prange(nb * C, num_threads=nt, schedule="static"):
        b = t // C
        c = t % C
        for r in range(R):
            for s in range(S):
                seg = col + ((c * R + r) * S + s) * nb * P + b * P
                off = s * dw - pl
                lo = first_in(off, sw)
                hi = end_in(off, sw, W, Wo)
                if hi <= lo:  # this tap never lands inside the image: all-zero row
                    lo = 0
                    hi = 0
                for oh in range(Ho):
                    ih = oh * sh - pt + r * dh
                    if ih < 0 or ih >= H:
                        fill(seg + oh * Wo, 0, Wo)
                        continue
                    xrow = &x[n0 + b, c, ih, 0]
                    fill(seg + oh * Wo, 0, lo)
                    if sw == 1:
                        for ow in range(lo, hi):
                            seg[oh * Wo + ow] = xrow[ow + off]
                    else:
                        for ow in range(lo, hi):
                            seg[oh * Wo + ow] = xrow[ow * sw + off]
                    fill(seg + oh * Wo + hi, 0, Wo - hi)


cdef void _col2im(const floating* col, floating[:, :, :, ::1] gx, Py_ssize_t n0, Py_ssize_t nb,
                  Py_ssize_t R, Py_ssize_t S, Py_ssize_t Ho, Py_ssize_t Wo, Py_ssize_t sh, Py_ssize_t sw,
                  Py_ssize_t pt, Py_ssize_t pl, Py_ssize_t dh, Py_ssize_t dw, int nt) noexcept nogil:
    """Add ``col`` (C*R*S, nb*P) back into images n0 .. n0+nb-1 of ``gx`` (one plane per unit)."""
    cdef Py_ssize_t C = gx.shape[1], H = gx.shape[2], W = gx.shape[3], P = Ho * Wo
    cdef Py_ssize_t t, b, c, r, s, oh, ow, ih, off, lo, hi
    cdef const floating* seg
    cdef floating* gxrow
    for t in prange(nb * C, num_threads=nt, schedule="static"):
        b = t // C
        c = t % C
        for r in range(R):
            for s in range(S):
                seg = col + ((c * R + r) * S + s) * nb * P + b * P
                off = s * dw - pl
                lo = first_in(off, sw)
                hi = end_in(off, sw, W, Wo)
                if hi <= lo:
                    continue
                for oh in range(Ho):
                    ih = oh * sh - pt + r * dh
                    if ih < 0 or ih >= H:
                        continue
                    gxrow = &gx[n0 + b, c, ih, 0]
                    if sw == 1:
                        for ow in range(lo, hi):
                            gxrow[ow + off] += seg[oh * Wo + ow]
                    else:
                        for ow in range(lo, hi):
                            gxrow[ow * sw + off] += seg[oh * Wo + ow]


cdef void _to_kmajor(const floating[:, :, :, ::1] a, Py_ssize_t n0, Py_ssize_t nb, floating* t_,
                     int nt) noexcept nogil:
    """t_ (K, nb*P) <- a[n0:n0+nb] (nb, K, P)."""
    cdef Py_ssize_t K = a.shape[1], P = a.shape[2] * a.shape[3]
    cdef Py_ssize_t u, b, k, p
    cdef const floating* src
    for u in prange(nb * K, num_threads=nt, schedule="static"):
        b = u // K
        k = u % K
        src = &a[n0 + b, k, 0, 0]
        for p in range(P):
            t_[(k * nb + b) * P + p] = src[p]


def forward(const floating[:, :, :, ::1] x, const floating[:, ::1] w2, const floating[::1] bias,
            floating[:, :, :, ::1] out, floating[::1] col, floating[::1] tmp, Py_ssize_t n0, Py_ssize_t nb,
            Py_ssize_t R, Py_ssize_t S, Py_ssize_t sh, Py_ssize_t sw, Py_ssize_t pt, Py_ssize_t pl,
            Py_ssize_t dh, Py_ssize_t dw, Py_ssize_t groups, int nt):
    """Forward convolution of images n0 .. n0+nb-1; ``w2`` is the weight as (K, Cg*R*S)."""
    cdef Py_ssize_t K = out.shape[1], Ho = out.shape[2], Wo = out.shape[3], P = Ho * Wo
    cdef Py_ssize_t Kg = K // groups, CRSg = w2.shape[1], g, u, b, k, p
    cdef floating* dst
    cdef floating bk
    with nogil:
        _im2col(x, n0, nb, &col[0], R, S, Ho, Wo, sh, sw, pt, pl, dh, dw, nt)
        for g in range(groups):
            _gemm(False, False, Kg, nb * P, CRSg, <floating> 1, &w2[g * Kg, 0], CRSg,
                  &col[g * CRSg * nb * P], nb * P, <floating> 0, &tmp[g * Kg * nb * P], nb * P)
        for u in prange(nb * K, num_threads=nt, schedule="static"):
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
    with nogil:
        _to_kmajor(gy, n0, nb, &tmp[0], nt)
        for g in range(groups):
            _gemm(True, False, CRSg, nb * P, Kg, <floating> 1, &w2[g * Kg, 0], CRSg,
                  &tmp[g * Kg * nb * P], nb * P, <floating> 0, &col[g * CRSg * nb * P], nb * P)
        _col2im(&col[0], gx, n0, nb, R, S, Ho, Wo, sh, sw, pt, pl, dh, dw, nt)


def backward_weight(const floating[:, :, :, ::1] gy, const floating[:, :, :, ::1] x, floating[:, ::1] gw2,
                    floating[::1] col, floating[::1] tmp, Py_ssize_t n0, Py_ssize_t nb,
                    Py_ssize_t R, Py_ssize_t S, Py_ssize_t sh, Py_ssize_t sw, Py_ssize_t pt, Py_ssize_t pl,
                    Py_ssize_t dh, Py_ssize_t dw, Py_ssize_t groups, int nt):
    """Add the weight gradient of images n0 .. n0+nb-1 into ``gw2`` (K, Cg*R*S)."""
    cdef Py_ssize_t K = gy.shape[1], Ho = gy.shape[2], Wo = gy.shape[3], P = Ho * Wo
    cdef Py_ssize_t Kg = K // groups, CRSg = gw2.shape[1], g
    with nogil:
        _im2col(x, n0, nb, &col[0], R, S, Ho, Wo, sh, sw, pt, pl, dh, dw, nt)
        _to_kmajor(gy, n0, nb, &tmp[0], nt)
        for g in range(groups):
            _gemm(False, True, Kg, CRSg, nb * P, <floating> 1, &tmp[g * Kg * nb * P], nb * P,
                  &col[g * CRSg * nb * P], nb * P, <floating> 1, &gw2[g * Kg, 0], CRSg)


def pointwise_forward(const floating[:, :, :, ::1] x, const floating[:, ::1] w2, const floating[::1] bias,
                      floating[:, :, :, ::1] out, Py_ssize_t groups):
    """1x1, stride 1, no padding: out[n, g] = W[g] @ x[n, g] (one GEMM per image and group)."""
    cdef Py_ssize_t N = x.shape[0], K = out.shape[1], P = x.shape[2] * x.shape[3]
    cdef Py_ssize_t Kg = K // groups, Cg = w2.shape[1], n, g, k, p
    cdef floating* dst
    with nogil:
        for n in range(N):
            for k in range(K):
                fill(&out[n, k, 0, 0], bias[k], P)
            for g in range(groups):
                _gemm(False, False, Kg, P, Cg, <floating> 1, &w2[g * Kg, 0], Cg, &x[n, g * Cg, 0, 0], P,
                      <floating> 1, &out[n, g * Kg, 0, 0], P)


def pointwise_backward_input(const floating[:, :, :, ::1] gy, const floating[:, ::1] w2,
                             floating[:, :, :, ::1] gx, Py_ssize_t groups):
    """1x1, stride 1, no padding: gx[n, g] = W[g].T @ gy[n, g]."""
    cdef Py_ssize_t N = gy.shape[0], K = gy.shape[1], P = gy.shape[2] * gy.shape[3]
    cdef Py_ssize_t Kg = K // groups, Cg = w2.shape[1], n, g
    with nogil:
        for n in range(N):
            for g in range(groups):
                _gemm(True, False, Cg, P, Kg, <floating> 1, &w2[g * Kg, 0], Cg, &gy[n, g * Kg, 0, 0], P,
                      <floating> 0, &gx[n, g * Cg, 0, 0], P)


def pointwise_backward_weight(const floating[:, :, :, ::1] gy, const floating[:, :, :, ::1] x,
                              floating[:, ::1] gw2, Py_ssize_t groups):
    """1x1, stride 1, no padding: gW[g] = sum_n gy[n, g] @ x[n, g].T (``gw2`` zero on entry)."""
    cdef Py_ssize_t N = gy.shape[0], K = gy.shape[1], P = gy.shape[2] * gy.shape[3]
    cdef Py_ssize_t Kg = K // groups, Cg = gw2.shape[1], n, g
    with nogil:
        for n in range(N):
            for g in range(groups):
                _gemm(False, True, Kg, Cg, P, <floating> 1, &gy[n, g * Kg, 0, 0], P, &x[n, g * Cg, 0, 0], P,
                      <floating> 1, &gw2[g * Kg, 0], Cg)
