# cython: language_level=3
"""Winograd F(4x4, 3x3) convolution kernels (see ``fastconv/_winograd.py`` for the maths).

The output is cut into 4x4 tiles (``hs`` / ``ws``: the first output row / column of
every tile row / column; a tile covers outputs ``start + d*i``, i < 4).  Tiles
are numbered image by image, row by row, and processed in blocks of ``tb``
tiles (a multiple of ``LANES``), one block per OpenMP work unit, each thread
with private buffers ``vbuf`` (36 rows of ``vstride``: Cg x tb) and ``mbuf``
(36 rows of ``mstride``: Kg x tb) that stay in its L2 cache.  Per block and group:

1. input transform: for each input channel, gather the block's 6x6 input patches
   (zeros outside the image) into a staging buffer, then compute ``B^T d B``
   ``LANES`` tiles at a time, the tiles in the innermost, vectorised dimension;
2. 36 GEMMs through single-threaded BLAS: ``M[xi] = U[xi] @ V[xi]``;
3. output transform ``A^T M A`` per output channel, plus bias, stored into
   the NCHW output (clipped at the bottom/right edges).

The weight gradient replaces step 3 by the transform ``A dY A^T`` of the
output-gradient tiles and accumulates ``dU[xi] += dY~[xi] @ V[xi]^T`` into
per-thread partial sums.  The input gradient is the forward kernel run on
``grad_out`` (done by the adapter).

The 1-D transforms are B^T and A^T of ``_winograd.matrices(4)`` written out as
formulas over local copies of their inputs, so that the C compiler keeps them
in vector registers (generic sparse loops, and strided in-place operands, both
defeated its vectoriser).  The tile sizes are compile-time constants.

Winograd spreads an Inf or NaN over its whole tile, unlike a direct
convolution; the forward kernel therefore reports whether any stored output
is non-finite and the adapter recomputes such (rare) calls another way.
"""

from cython cimport floating
from cython.parallel cimport parallel, prange, threadid

from ._blas cimport gemm

cdef enum:
    LANES = 16  # tiles transformed together (one AVX-512 vector of float32)
    M = 4       # output tile size
    A = 6       # input tile size M + 2


cdef inline void _load(const floating* src, Py_ssize_t stride, floating (*buf)[LANES], const Py_ssize_t n) noexcept nogil:
    """buf[r] = the LANES-vector at src + r*stride, r < n.  Working on a local copy lets the C
    compiler vectorise the transforms: it cannot prove that strided inputs and outputs are
    disjoint and would otherwise fall back to scalar code."""
    cdef Py_ssize_t r, l
    for r in range(n):
        for l in range(LANES):
            buf[r][l] = src[r * stride + l]


cdef inline void _store(const floating (*buf)[LANES], floating* dst, Py_ssize_t stride, const Py_ssize_t n) noexcept nogil:
    """The LANES-vector at dst + r*stride = buf[r], r < n."""
    cdef Py_ssize_t r, l
    for r in range(n):
        for l in range(LANES):
            dst[r * stride + l] = buf[r][l]


cdef inline void _input_1d(const floating* d, Py_ssize_t ds, floating* o, Py_ssize_t os) noexcept nogil:
    """o[r] = sum_i BT[r][i] d[i] for six LANES-vectors (B^T of F(4x4, 3x3), points 0, +-1, +-2)."""
    cdef Py_ssize_t l
    cdef floating x[6][LANES]
    cdef floating y[6][LANES]
    cdef floating two = 2, four = 4, five = 5  # typed: a bare literal would make C compute in double
    _load(d, ds, x, 6)
    for l in range(LANES):
        y[0][l] = four * x[0][l] - five * x[2][l] + x[4][l]
        y[1][l] = x[3][l] + x[4][l] - four * (x[1][l] + x[2][l])
        y[2][l] = four * (x[1][l] - x[2][l]) - x[3][l] + x[4][l]
        y[3][l] = two * (x[3][l] - x[1][l]) - x[2][l] + x[4][l]
        y[4][l] = two * (x[1][l] - x[3][l]) - x[2][l] + x[4][l]
        y[5][l] = four * x[1][l] - five * x[3][l] + x[5][l]
    _store(y, o, os, 6)


cdef inline void _output_1d(const floating* m, Py_ssize_t ms, floating* o, Py_ssize_t os) noexcept nogil:
    """o[i] = sum_r AT[i][r] m[r] for six LANES-vectors in, four out (A^T of F(4x4, 3x3))."""
    cdef Py_ssize_t l
    cdef floating x[6][LANES]
    cdef floating y[4][LANES]
    cdef floating sp, sm, dp, dm
    cdef floating two = 2, four = 4, eight = 8
    _load(m, ms, x, 6)
    for l in range(LANES):
        sp = x[1][l] + x[2][l]
        sm = x[1][l] - x[2][l]
        dp = x[3][l] + x[4][l]
        dm = x[3][l] - x[4][l]
        y[0][l] = x[0][l] + sp + dp
        y[1][l] = sm + two * dm
        y[2][l] = sp + four * dp
        y[3][l] = sm + eight * dm + x[5][l]
    _store(y, o, os, 4)


cdef inline void _grad_1d(const floating* g, Py_ssize_t gs, floating* o, Py_ssize_t os) noexcept nogil:
    """o[r] = sum_i AT[i][r] g[i] for four LANES-vectors in, six out (A = AT^T, the weight gradient)."""
    cdef Py_ssize_t l
    cdef floating x[4][LANES]
    cdef floating y[6][LANES]
    cdef floating ep, em, fp, fm
    cdef floating two = 2, four = 4, eight = 8
    _load(g, gs, x, 4)
    for l in range(LANES):
        ep = x[0][l] + x[2][l]
        em = x[1][l] + x[3][l]
        fp = x[0][l] + four * x[2][l]
        fm = two * x[1][l] + eight * x[3][l]
        y[0][l] = x[0][l]
        y[1][l] = ep + em
        y[2][l] = ep - em
        y[3][l] = fp + fm
        y[4][l] = fp - fm
        y[5][l] = x[3][l]
    _store(y, o, os, 6)


cdef inline void _in_range(Py_ssize_t start, Py_ssize_t d, Py_ssize_t e, Py_ssize_t size, Py_ssize_t* lo,
                           Py_ssize_t* hi) noexcept nogil:
    """[lo, hi): the i < e with 0 <= start + d*i < size."""
    lo[0] = 0
    while lo[0] < e and start + d * lo[0] < 0:
        lo[0] += 1
    hi[0] = lo[0]
    while hi[0] < e and start + d * hi[0] < size:
        hi[0] += 1


cdef inline void _gather(const floating* plane, const Py_ssize_t* base, const Py_ssize_t* lanes, Py_ssize_t tb,
                         Py_ssize_t off_h, Py_ssize_t off_w, Py_ssize_t nb, Py_ssize_t d, Py_ssize_t H,
                         Py_ssize_t W, floating* patch, const Py_ssize_t e) noexcept nogil:
    """patch[(i*e + j) * tb + q] = plane[base[q] + (row0 + off_h + d*i) * W + col0 + off_w + d*j] (0
    outside the H x W plane; row0 / col0 of tile q from ``lanes`` rows 2 / 3) for the tiles q < nb,
    zero for nb <= q < round_up(nb, LANES).

    Rows outside the plane are zero-filled whole; only tiles that overlap the left or right
    edge test columns one by one.  (Runs of tiles along a row are too short on the small
    planes of typical layers, 2 to 8 tiles, for row-wise vector code to pay off.)
    """
    cdef Py_ssize_t q, i, j, h0, w0, ih, jlo, jhi
    cdef Py_ssize_t col[A]
    cdef bint keep[A]
    cdef floating v
    cdef const floating* row
    cdef floating* dst
    for q in range(nb):
        h0 = lanes[2 * tb + q] + off_h
        w0 = lanes[3 * tb + q] + off_w
        dst = patch + q
        if w0 >= 0 and w0 + d * (e - 1) < W:
            for i in range(e):
                ih = h0 + d * i
                if 0 <= ih < H:
                    row = plane + base[q] + ih * W + w0
                    for j in range(e):
                        dst[(i * e + j) * tb] = row[j * d]
                else:
                    for j in range(e):
                        dst[(i * e + j) * tb] = 0
        else:  # crosses the left or right edge: clamped (in-bounds) loads, then a select
            _in_range(w0, d, e, W, &jlo, &jhi)
            for j in range(e):
                col[j] = w0 + d * min(max(j, jlo), jhi - 1) if jhi > jlo else 0
                keep[j] = jlo <= j < jhi
            for i in range(e):
                ih = h0 + d * i
                if 0 <= ih < H:
                    row = plane + base[q] + ih * W
                    for j in range(e):
                        v = row[col[j]]
                        dst[(i * e + j) * tb] = v if keep[j] else 0
                else:
                    for j in range(e):
                        dst[(i * e + j) * tb] = 0
    for q in range(nb, (nb + LANES - 1) // LANES * LANES):
        for i in range(e * e):
            patch[i * tb + q] = 0


cdef inline floating _scatter(floating* plane, const Py_ssize_t* lanes, Py_ssize_t nb, Py_ssize_t tb,
                              Py_ssize_t d, Py_ssize_t Wo, const floating* blk, floating add) noexcept nogil:
    """plane[base + (row0 + d*i) * Wo + col0 + d*j] = blk[(i*M + j) * tb + q] + add for the i < rows,
    j < cols of each tile q < nb (``lanes`` rows 1 to 5, see ``_lane_info``).

    Returns the sum of ``v - v`` over the stored values (0 when all are finite, NaN
    otherwise), accumulated in 16 independent partial sums.
    """
    cdef Py_ssize_t q, i, j, ni, nj
    cdef floating* o
    cdef floating v, check = 0
    cdef floating acc[M * M]
    for i in range(M * M):
        acc[i] = 0
    for q in range(nb):
        o = plane + lanes[tb + q] + lanes[2 * tb + q] * Wo + lanes[3 * tb + q]
        ni = lanes[4 * tb + q]
        nj = lanes[5 * tb + q]
        if ni == M and nj == M:
            for i in range(M):
                for j in range(M):
                    v = blk[(i * M + j) * tb + q] + add
                    o[(i * Wo + j) * d] = v
                    acc[i * M + j] += v - v
        else:
            for i in range(ni):
                for j in range(nj):
                    v = blk[(i * M + j) * tb + q] + add
                    o[(i * Wo + j) * d] = v
                    acc[i * M + j] += v - v
    for i in range(M * M):
        check += acc[i]
    return check


cdef inline void _lane_info(Py_ssize_t t0, Py_ssize_t nb, Py_ssize_t TW, Py_ssize_t tiles_per_image,
                            const Py_ssize_t* hs, const Py_ssize_t* ws, Py_ssize_t in_image, Py_ssize_t out_image,
                            Py_ssize_t m, Py_ssize_t d, Py_ssize_t Ho, Py_ssize_t Wo, Py_ssize_t* lanes,
                            Py_ssize_t tb) noexcept nogil:
    """For tiles t0 .. t0+nb-1, in ``lanes`` rows of ``tb`` entries: 0 input image offset, 1 output
    image offset, 2 / 3 first output row / column, 4 / 5 output rows / columns inside Ho x Wo."""
    cdef Py_ssize_t q, t, n, rem, lo
    for q in range(nb):
        t = t0 + q
        n = t // tiles_per_image
        rem = t - n * tiles_per_image
        lanes[q] = n * in_image
        lanes[tb + q] = n * out_image
        lanes[2 * tb + q] = hs[rem // TW]
        lanes[3 * tb + q] = ws[rem % TW]
        _in_range(lanes[2 * tb + q], d, m, Ho, &lo, &lanes[4 * tb + q])
        _in_range(lanes[3 * tb + q], d, m, Wo, &lo, &lanes[5 * tb + q])


cdef inline void _input_transform(const floating* xg, Py_ssize_t Cg, Py_ssize_t H, Py_ssize_t W,
                                  const Py_ssize_t* lanes, Py_ssize_t nb, Py_ssize_t tb, Py_ssize_t pt,
                                  Py_ssize_t pl, Py_ssize_t d, floating* stage, floating* tmp, floating* vb,
                                  Py_ssize_t vstride) noexcept nogil:
    """vb[xi * vstride + c * tb + q] = (B^T d B)[xi] of tile q's 6 x 6 input patch in channel c.
    The block's patches are gathered into ``stage`` (36 rows of tb) before they are transformed."""
    cdef Py_ssize_t c, lg, q0, j, r
    for c in range(Cg):
        _gather(xg + c * H * W, lanes, lanes, tb, -pt, -pl, nb, d, H, W, stage, A)
        for lg in range((nb + LANES - 1) // LANES):  # lane groups
            q0 = lg * LANES
            for j in range(A):  # columns: tmp[r, j] = sum_i BT[r, i] d[i, j]
                _input_1d(stage + j * tb + q0, A * tb, tmp + j * LANES, A * LANES)
            for r in range(A):  # rows: V[r, s] = sum_j BT[s, j] tmp[r, j]
                _input_1d(tmp + r * A * LANES, LANES, vb + r * A * vstride + c * tb + q0, vstride)


cdef inline floating _forward_block(const floating[:, :, :, ::1] x, const floating[:, :, :, ::1] u,
                                    const floating[::1] bias, floating[:, :, :, ::1] out, floating* vb,
                                    floating* mb, floating* sc, Py_ssize_t* ln, Py_ssize_t nb, Py_ssize_t tb,
                                    Py_ssize_t pt, Py_ssize_t pl, Py_ssize_t d, Py_ssize_t vstride,
                                    Py_ssize_t mstride) noexcept nogil:
    """Forward pass of the ``nb`` tiles described by ``ln`` (all groups); returns the finiteness
    check of ``_scatter`` (0 when every output is finite)."""
    cdef Py_ssize_t H = x.shape[2], W = x.shape[3], Wo = out.shape[3]
    cdef Py_ssize_t groups = u.shape[0], Kg = u.shape[2], Cg = u.shape[3]
    cdef Py_ssize_t g, xi, k, kk, lg, q0, s, i
    cdef floating* tmp = sc + A * A * tb
    cdef floating check = 0
    for g in range(groups):
        _input_transform(&x[0, g * Cg, 0, 0], Cg, H, W, ln, nb, tb, pt, pl, d, sc, tmp, vb, vstride)
        for xi in range(A * A):
            gemm(False, False, Kg, nb, Cg, <floating> 1, &u[g, xi, 0, 0], Cg, vb + xi * vstride, tb,
                 <floating> 0, mb + xi * mstride, tb)
        for k in range(Kg):
            kk = g * Kg + k
            for lg in range((nb + LANES - 1) // LANES):  # lane groups
                q0 = lg * LANES
                for s in range(A):  # columns: tmp[i, s] = sum_r AT[i, r] M[r, s]
                    _output_1d(mb + s * mstride + k * tb + q0, A * mstride, tmp + s * LANES, A * LANES)
                for i in range(M):  # rows: Y[i, j] = sum_s AT[j, s] tmp[i, s]
                    _output_1d(tmp + i * A * LANES, LANES, sc + i * M * tb + q0, tb)
            check += _scatter(&out[0, kk, 0, 0], ln, nb, tb, d, Wo, sc, bias[kk])
    return check


cdef inline void _weight_block(const floating[:, :, :, ::1] gy, const floating[:, :, :, ::1] x, floating* du,
                               floating* vb, floating* mb, floating* sc, Py_ssize_t* ln, Py_ssize_t nb,
                               Py_ssize_t tb, Py_ssize_t pt, Py_ssize_t pl, Py_ssize_t d, Py_ssize_t groups,
                               Py_ssize_t vstride, Py_ssize_t mstride) noexcept nogil:
    """du (groups, 36, Kg, Cg) += the weight-gradient products of the ``nb`` tiles described by ``ln``."""
    cdef Py_ssize_t H = x.shape[2], W = x.shape[3], Ho = gy.shape[2], Wo = gy.shape[3]
    cdef Py_ssize_t Cg = x.shape[1] // groups, Kg = gy.shape[1] // groups
    cdef Py_ssize_t g, xi, k, lg, q0, j, r
    cdef floating* tmp = sc + A * A * tb
    for g in range(groups):
        _input_transform(&x[0, g * Cg, 0, 0], Cg, H, W, ln, nb, tb, pt, pl, d, sc, tmp, vb, vstride)
        for k in range(Kg):
            _gather(&gy[0, g * Kg + k, 0, 0], ln + tb, ln, tb, 0, 0, nb, d, Ho, Wo, sc, M)
            for lg in range((nb + LANES - 1) // LANES):  # lane groups
                q0 = lg * LANES
                for j in range(M):  # columns: tmp[r, j] = sum_i A[r, i] dY[i, j]
                    _grad_1d(sc + j * tb + q0, M * tb, tmp + j * LANES, M * LANES)
                for r in range(A):  # rows: dY~[r, s] = sum_j A[s, j] tmp[r, j]
                    _grad_1d(tmp + r * M * LANES, LANES, mb + r * A * mstride + k * tb + q0, mstride)
        for xi in range(A * A):
            gemm(False, True, Kg, Cg, nb, <floating> 1, mb + xi * mstride, tb, vb + xi * vstride, tb,
                 <floating> 1, du + (g * A * A + xi) * Kg * Cg, Cg)


def forward(const floating[:, :, :, ::1] x, const floating[:, :, :, ::1] u, const floating[::1] bias,
            floating[:, :, :, ::1] out, floating[:, ::1] vbuf, floating[:, ::1] mbuf, floating[:, ::1] scratch,
            Py_ssize_t[:, ::1] lanes, floating[::1] checks, const Py_ssize_t[::1] hs, const Py_ssize_t[::1] ws,
            Py_ssize_t pt, Py_ssize_t pl, Py_ssize_t d, Py_ssize_t tb, Py_ssize_t vstride, Py_ssize_t mstride):
    """out = conv(x, w) + bias with ``u`` = G w G^T as (groups, 36, Kg, Cg), on ``vbuf.shape[0]`` threads.

    Buffers per thread: ``vbuf`` 36 rows of ``vstride`` >= Cg*tb, ``mbuf`` 36 rows of
    ``mstride`` >= Kg*tb, ``scratch`` 36*(tb + LANES) floats, ``lanes`` 6*tb; ``checks[tid]``
    (zero on entry) receives the thread's finiteness check (stays 0 when every output is
    finite).  ``pt`` / ``pl`` may be negative (the input-gradient use).  Single-threaded BLAS
    is the caller's job when more than one thread runs.
    """
    cdef Py_ssize_t N = x.shape[0], C = x.shape[1], H = x.shape[2], W = x.shape[3]
    cdef Py_ssize_t K = out.shape[1], Ho = out.shape[2], Wo = out.shape[3]
    cdef Py_ssize_t TW = ws.shape[0], per_image = hs.shape[0] * ws.shape[0], T = N * per_image
    cdef Py_ssize_t blk, nb
    cdef int nt = <int> vbuf.shape[0], tid
    cdef Py_ssize_t* ln
    with nogil, parallel(num_threads=nt):
        tid = threadid()
        ln = &lanes[tid, 0]
        for blk in prange((T + tb - 1) // tb, schedule="dynamic"):
            nb = min(tb, T - blk * tb)
            _lane_info(blk * tb, nb, TW, per_image, &hs[0], &ws[0], C * H * W, K * Ho * Wo, M, d, Ho, Wo, ln, tb)
            checks[tid] += _forward_block(x, u, bias, out, &vbuf[tid, 0], &mbuf[tid, 0], &scratch[tid, 0], ln,
                                          nb, tb, pt, pl, d, vstride, mstride)


def backward_weight(const floating[:, :, :, ::1] gy, const floating[:, :, :, ::1] x,
                    floating[:, :, :, :, ::1] partial, floating[:, ::1] vbuf, floating[:, ::1] mbuf,
                    floating[:, ::1] scratch, Py_ssize_t[:, ::1] lanes, const Py_ssize_t[::1] hs,
                    const Py_ssize_t[::1] ws, Py_ssize_t pt, Py_ssize_t pl, Py_ssize_t d, Py_ssize_t tb,
                    Py_ssize_t vstride, Py_ssize_t mstride):
    """partial[tid] (groups, 36, Kg, Cg) += sum over the thread's tiles of (A dY A^T) @ (B^T d B)^T.

    ``partial`` must be zero on entry; its sum over threads is dU (see ``_winograd.weight_gradient``).
    """
    cdef Py_ssize_t N = x.shape[0], C = x.shape[1], H = x.shape[2], W = x.shape[3]
    cdef Py_ssize_t K = gy.shape[1], Ho = gy.shape[2], Wo = gy.shape[3], groups = partial.shape[1]
    cdef Py_ssize_t TW = ws.shape[0], per_image = hs.shape[0] * ws.shape[0], T = N * per_image
    cdef Py_ssize_t blk, nb
    cdef int nt = <int> vbuf.shape[0], tid
    cdef Py_ssize_t* ln
    with nogil, parallel(num_threads=nt):
        tid = threadid()
        ln = &lanes[tid, 0]
        for blk in prange((T + tb - 1) // tb, schedule="dynamic"):
            nb = min(tb, T - blk * tb)
            _lane_info(blk * tb, nb, TW, per_image, &hs[0], &ws[0], C * H * W, K * Ho * Wo, M, d, Ho, Wo, ln, tb)
            _weight_block(gy, x, &partial[tid, 0, 0, 0, 0], &vbuf[tid, 0], &mbuf[tid, 0], &scratch[tid, 0], ln,
                          nb, tb, pt, pl, d, groups, vstride, mstride)
