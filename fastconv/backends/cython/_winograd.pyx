# cython: language_level=3
"""Winograd F(4x4, 3x3) convolution kernels (see ``fastconv/_winograd.py`` for the maths).

The output is cut into 4x4 tiles (``hs`` / ``ws``: the first output row / column of
every tile row / column; a tile covers outputs ``start + d*i``, i < 4).  Tiles
are numbered image by image, row by row, and processed in blocks of ``tb``
tiles (a multiple of ``LANES``), one block per OpenMP work unit, each thread
with private buffers ``vbuf`` (36 rows of ``vstride``: Cg x tb) and ``mbuf``
(36 rows of ``mstride``: Kg x tb) that stay in its L2 cache.  Per block and group:

1. input transform: for each input channel, copy the rows of the block's images
   into zero-bordered planes (``planes``: the zeros are written once per call), so
   that every 6x6 patch is gathered without bounds tests, then compute ``B^T d B``
   ``LANES`` tiles at a time, the tiles in the innermost, vectorised dimension;
2. 36 GEMMs through single-threaded BLAS: ``M[xi] = U[xi] @ V[xi]``;
3. output transform ``A^T M A`` per output channel, plus bias, then each group of
   LANES tiles transposed with vector shuffles and stored into the NCHW output row
   by row from registers (clipped at the bottom/right edges; ``_stage.h``).
   (Against gathering patches with per-tile edge tests and storing one scalar per
   output: 6-16% faster on mnist-c2, cifar-64 and the dilated layer, 2 threads.)

The weight gradient replaces step 3 by the transform ``A dY A^T`` of the
output-gradient tiles (staged in zero-bordered planes as the input) and
accumulates ``dU[xi] += dY~[xi] @ V[xi]^T`` into per-thread partial sums.  The input gradient is the forward kernel run on
``grad_out`` (done by the adapter).

The 1-D transforms are B^T and A^T of ``_winograd.matrices(4)`` written out as
formulas over local copies of their inputs, so that the C compiler keeps them
in vector registers (generic sparse loops, and strided in-place operands, both
defeated its vectoriser).  The tile sizes are compile-time constants.

Winograd spreads an Inf or NaN over its whole tile, unlike a direct
convolution; the forward kernel therefore reports whether any output of its
tiles is non-finite (those a tile computes past the bottom or right edge
included: the test is one vector pass per lane group) and the adapter
recomputes such (rare) calls another way.
"""

from cython cimport floating
from cython.parallel cimport parallel, prange, threadid

import numpy as np

cdef extern from "_stage.h" nogil:
    enum:
        OUT_LANES "FC_OUT_LANES"  # the lanes and tile size fc_tiles_out_* is written for
        OUT_M "FC_OUT_M"
    void fc_copy(void* dst, const void* src, size_t nbytes)  # a short copy without a call
    # one lane group's tiles into the output
    void fc_tiles_out_f(const float* blk, Py_ssize_t tb, float* out, const Py_ssize_t* offs, const Py_ssize_t* rows,
                        const Py_ssize_t* cols, int n, Py_ssize_t ld, Py_ssize_t step)
    void fc_tiles_out_d(const double* blk, Py_ssize_t tb, double* out, const Py_ssize_t* offs,
                        const Py_ssize_t* rows, const Py_ssize_t* cols, int n, Py_ssize_t ld, Py_ssize_t step)

from ._blas cimport gemm

cdef enum:
    LANES = 16  # tiles transformed together (one AVX-512 vector of float32)
    M = 4       # output tile size
    A = 6       # input tile size M + 2

assert LANES == OUT_LANES and M == OUT_M, "_stage.h's fc_tiles_out_* is written for 16 lanes of 4 x 4 tiles"


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


cdef struct Block:
    # the images a block of consecutive tiles reads
    Py_ssize_t n0      # its first image
    Py_ssize_t nimg    # how many images
    Py_ssize_t lo0     # lowest / highest start of its tile rows in the first image ...
    Py_ssize_t hi0
    Py_ssize_t lo1     # ... and in the last (the images between have every tile row)
    Py_ssize_t hi1


cdef inline void _stage(const floating* src, Py_ssize_t image, const Block* blk, Py_ssize_t H, Py_ssize_t W,
                        Py_ssize_t pt, Py_ssize_t pl, Py_ssize_t d, const Py_ssize_t e, Py_ssize_t Hb,
                        Py_ssize_t Wb, floating* dst) noexcept nogil:
    """dst[s*Hb*Wb + (i + pt)*Wb + j + pl] = src[(blk.n0 + s)*image + i*W + j], s < blk.nimg, for the
    input rows i and columns j that land inside the Hb x Wb plane and that the block's e x e
    patches may read (plane rows from the lowest tile-row start to the highest + d*(e-1)).  ``pt``
    / ``pl`` may be negative (cropping).  Nothing else is written: the zeros around the input
    are the caller's, written once per call."""
    cdef Py_ssize_t sl, lo, hi, i, j0 = max(0, -pl), j1 = min(W, Wb - pl)
    cdef const floating* row
    if j1 <= j0:
        return
    for sl in range(blk.nimg):
        lo = blk.lo0 if sl == 0 else (blk.lo1 if sl == blk.nimg - 1 else 0)
        hi = blk.hi0 if sl == 0 else (blk.hi1 if sl == blk.nimg - 1 else Hb)
        for i in range(max(lo, pt) - pt, min(hi + d * (e - 1) + 1, Hb, pt + H) - pt):
            row = src + (blk.n0 + sl) * image + i * W
            fc_copy(dst + sl * Hb * Wb + (i + pt) * Wb + pl + j0, row + j0, (j1 - j0) * sizeof(floating))


cdef inline void _gather(const floating* planes, Py_ssize_t Hb, Py_ssize_t Wb, const Py_ssize_t* lanes,
                         Py_ssize_t tb, Py_ssize_t nb, Py_ssize_t d, floating* patch, const Py_ssize_t e) noexcept nogil:
    """patch[(i*e + j) * tb + q] = planes[slot*Hb*Wb + (row0 + d*i)*Wb + col0 + d*j] for the tiles q < nb
    (slot, row0 and col0 from ``lanes`` rows 0, 2 and 3; planes staged by ``_stage``), zero for
    nb <= q < round_up(nb, LANES).  Every patch lies inside its staged plane: no tests."""
    cdef Py_ssize_t q, q0, lg, i, j, off, full = nb - nb % LANES
    cdef Py_ssize_t base[LANES]
    cdef const floating* src
    cdef floating* dst
    for lg in range(full // LANES):  # whole lane groups: one element of LANES patches at a time
        q0 = lg * LANES
        for q in range(LANES):
            base[q] = lanes[q0 + q] * Hb * Wb + lanes[2 * tb + q0 + q] * Wb + lanes[3 * tb + q0 + q]
        for i in range(e):
            for j in range(e):
                off = (i * Wb + j) * d
                dst = patch + (i * e + j) * tb + q0
                for q in range(LANES):
                    dst[q] = planes[base[q] + off]
    for q in range(full, nb):
        src = planes + lanes[q] * Hb * Wb + lanes[2 * tb + q] * Wb + lanes[3 * tb + q]
        dst = patch + q
        for i in range(e):
            for j in range(e):
                dst[(i * e + j) * tb] = src[(i * Wb + j) * d]
    for q in range(nb, (nb + LANES - 1) // LANES * LANES):
        for i in range(e * e):
            patch[i * tb + q] = 0


cdef inline void _scatter(floating* plane, const Py_ssize_t* lanes, Py_ssize_t nb, Py_ssize_t tb,
                          Py_ssize_t d, Py_ssize_t Wo, const floating* blk) noexcept nogil:
    """plane[offset + (i*Wo + j) * d] = blk[(i*M + j) * tb + q] for the i < rows, j < cols of each
    tile q < nb (``lanes`` rows 1, 4 and 5, see ``_lane_info``), a group of LANES tiles at a time."""
    cdef Py_ssize_t lg, q0
    for lg in range((nb + LANES - 1) // LANES):  # lane groups
        q0 = lg * LANES
        if floating is float:
            fc_tiles_out_f(blk + q0, tb, plane, lanes + tb + q0, lanes + 4 * tb + q0, lanes + 5 * tb + q0,
                           <int> min(<Py_ssize_t> LANES, nb - q0), Wo * d, d)
        else:
            fc_tiles_out_d(blk + q0, tb, plane, lanes + tb + q0, lanes + 4 * tb + q0, lanes + 5 * tb + q0,
                           <int> min(<Py_ssize_t> LANES, nb - q0), Wo * d, d)


cdef inline void _add_bias(floating* blk, Py_ssize_t tb, floating add, Py_ssize_t n, floating* acc) noexcept nogil:
    """blk[r * tb + l] += add for the M*M rows r and LANES tiles l of one lane group; acc[l] += the
    sum of ``v - v`` over the new values of its first ``n`` tiles (stays 0 while they are finite,
    else NaN; the lanes past them hold whatever the GEMM left there)."""
    cdef Py_ssize_t r, l
    cdef floating v
    for r in range(M * M):
        for l in range(LANES):
            v = blk[r * tb + l] + add
            blk[r * tb + l] = v
            acc[l] += v - v if l < n else 0


cdef Py_ssize_t _reach(const Py_ssize_t[::1] starts, Py_ssize_t d, Py_ssize_t e) noexcept nogil:
    """Rows (or columns) of a staged plane: one past the last of the e x e patches, max(starts) + d*(e-1) + 1."""
    cdef Py_ssize_t i, top = 0
    for i in range(starts.shape[0]):
        top = max(top, starts[i])
    return top + d * (e - 1) + 1


cdef inline Block _block(Py_ssize_t t0, Py_ssize_t nb, Py_ssize_t TW, Py_ssize_t tiles_per_image,
                         const Py_ssize_t* hs) noexcept nogil:
    """The images that tiles t0 .. t0+nb-1 read, and the tile rows they reach in the first and
    the last (``hs`` need not be increasing: dilated tilings interleave)."""
    cdef Block blk
    cdef Py_ssize_t tl = t0 + nb - 1, TH = tiles_per_image // TW, r0 = t0 % tiles_per_image // TW
    cdef Py_ssize_t r1 = tl % tiles_per_image // TW, r
    blk.n0 = t0 // tiles_per_image
    blk.nimg = tl // tiles_per_image - blk.n0 + 1
    blk.lo0 = blk.hi0 = hs[r0]
    for r in range(r0, r1 + 1 if blk.nimg == 1 else TH):
        blk.lo0 = min(blk.lo0, hs[r])
        blk.hi0 = max(blk.hi0, hs[r])
    blk.lo1 = blk.hi1 = hs[0]
    for r in range(r1 + 1):
        blk.lo1 = min(blk.lo1, hs[r])
        blk.hi1 = max(blk.hi1, hs[r])
    return blk


cdef inline void _lane_info(Py_ssize_t t0, Py_ssize_t nb, Py_ssize_t TW, Py_ssize_t tiles_per_image,
                            const Py_ssize_t* hs, const Py_ssize_t* ws, Py_ssize_t out_image,
                            Py_ssize_t m, Py_ssize_t d, Py_ssize_t Ho, Py_ssize_t Wo, Py_ssize_t* lanes,
                            Py_ssize_t tb, Py_ssize_t n0) noexcept nogil:
    """For tiles t0 .. t0+nb-1, in ``lanes`` rows of ``tb`` entries: 0 image slot (image - ``n0``,
    the block's first), 1 offset of the first output in an output channel's planes, 2 / 3 first
    output row / column, 4 / 5 output rows / columns inside Ho x Wo."""
    cdef Py_ssize_t q, t, n, rem, lo
    for q in range(nb):
        t = t0 + q
        n = t // tiles_per_image
        rem = t - n * tiles_per_image
        lanes[q] = n - n0
        lanes[2 * tb + q] = hs[rem // TW]
        lanes[3 * tb + q] = ws[rem % TW]
        lanes[tb + q] = n * out_image + lanes[2 * tb + q] * Wo + lanes[3 * tb + q]
        _in_range(lanes[2 * tb + q], d, m, Ho, &lo, &lanes[4 * tb + q])
        _in_range(lanes[3 * tb + q], d, m, Wo, &lo, &lanes[5 * tb + q])


cdef inline void _input_transform(const floating* xg, Py_ssize_t C, Py_ssize_t Cg, Py_ssize_t H, Py_ssize_t W,
                                  const Py_ssize_t* lanes, const Block* blk, Py_ssize_t nb, Py_ssize_t tb,
                                  Py_ssize_t pt, Py_ssize_t pl, Py_ssize_t d, floating* planes, Py_ssize_t Hb,
                                  Py_ssize_t Wb, floating* stage, floating* tmp, floating* vb,
                                  Py_ssize_t vstride) noexcept nogil:
    """vb[xi * vstride + c * tb + q] = (B^T d B)[xi] of tile q's 6 x 6 input patch in channel c
    (of the group at ``xg``; C channels per image).  Per channel the block's images are staged in
    ``planes`` (Hb x Wb each, zero around the input) and its patches gathered from there into
    ``stage`` (36 rows of tb) before they are transformed."""
    cdef Py_ssize_t c, lg, q0, j, r
    for c in range(Cg):
        _stage(xg + c * H * W, C * H * W, blk, H, W, pt, pl, d, A, Hb, Wb, planes)
        _gather(planes, Hb, Wb, lanes, tb, nb, d, stage, A)
        for lg in range((nb + LANES - 1) // LANES):  # lane groups
            q0 = lg * LANES
            for j in range(A):  # columns: tmp[r, j] = sum_i BT[r, i] d[i, j]
                _input_1d(stage + j * tb + q0, A * tb, tmp + j * LANES, A * LANES)
            for r in range(A):  # rows: V[r, s] = sum_j BT[s, j] tmp[r, j]
                _input_1d(tmp + r * A * LANES, LANES, vb + r * A * vstride + c * tb + q0, vstride)


cdef inline floating _forward_block(const floating[:, :, :, ::1] x, const floating[:, :, :, ::1] u,
                                    const floating[::1] bias, floating[:, :, :, ::1] out, floating* vb,
                                    floating* mb, floating* sc, floating* planes, Py_ssize_t Hb, Py_ssize_t Wb,
                                    Py_ssize_t* ln, const Block* blk, Py_ssize_t nb, Py_ssize_t tb, Py_ssize_t pt,
                                    Py_ssize_t pl, Py_ssize_t d, Py_ssize_t vstride, Py_ssize_t mstride) noexcept nogil:
    """Forward pass of the ``nb`` tiles described by ``ln`` (all groups); returns the finiteness
    check of ``_add_bias`` (0 when every output of the tiles is finite, those clipped at the
    bottom and right edges included)."""
    cdef Py_ssize_t C = x.shape[1], H = x.shape[2], W = x.shape[3], Wo = out.shape[3]
    cdef Py_ssize_t groups = u.shape[0], Kg = u.shape[2], Cg = u.shape[3]
    cdef Py_ssize_t g, xi, k, kk, lg, q0, s, i
    cdef floating* tmp = sc + A * A * tb
    cdef floating check = 0
    cdef floating acc[LANES]
    for i in range(LANES):
        acc[i] = 0
    for g in range(groups):
        _input_transform(&x[0, g * Cg, 0, 0], C, Cg, H, W, ln, blk, nb, tb, pt, pl, d, planes, Hb, Wb, sc, tmp, vb,
                         vstride)
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
                _add_bias(sc + q0, tb, bias[kk], nb - q0, acc)
            _scatter(&out[0, kk, 0, 0], ln, nb, tb, d, Wo, sc)
    for i in range(LANES):
        check += acc[i]
    return check


cdef inline void _weight_block(const floating[:, :, :, ::1] gy, const floating[:, :, :, ::1] x, floating* du,
                               floating* vb, floating* mb, floating* sc, floating* xplanes, Py_ssize_t Hb,
                               Py_ssize_t Wb, floating* gplanes, Py_ssize_t Hg, Py_ssize_t Wg, Py_ssize_t* ln,
                               const Block* blk, Py_ssize_t nb, Py_ssize_t tb, Py_ssize_t pt, Py_ssize_t pl,
                               Py_ssize_t d, Py_ssize_t groups, Py_ssize_t vstride, Py_ssize_t mstride) noexcept nogil:
    """du (groups, 36, Kg, Cg) += the weight-gradient products of the ``nb`` tiles described by ``ln``
    (input planes staged in ``xplanes``, Hb x Wb, output-gradient planes in ``gplanes``, Hg x Wg)."""
    cdef Py_ssize_t C = x.shape[1], K = gy.shape[1]
    cdef Py_ssize_t H = x.shape[2], W = x.shape[3], Ho = gy.shape[2], Wo = gy.shape[3]
    cdef Py_ssize_t Cg = x.shape[1] // groups, Kg = gy.shape[1] // groups
    cdef Py_ssize_t g, xi, k, lg, q0, j, r
    cdef floating* tmp = sc + A * A * tb
    for g in range(groups):
        _input_transform(&x[0, g * Cg, 0, 0], C, Cg, H, W, ln, blk, nb, tb, pt, pl, d, xplanes, Hb, Wb, sc, tmp, vb,
                         vstride)
        for k in range(Kg):
            _stage(&gy[0, g * Kg + k, 0, 0], K * Ho * Wo, blk, Ho, Wo, 0, 0, d, M, Hg, Wg, gplanes)
            _gather(gplanes, Hg, Wg, ln, tb, nb, d, sc, M)
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
            floating[:, ::1] planes, Py_ssize_t[:, ::1] lanes, floating[::1] checks, const Py_ssize_t[::1] hs,
            const Py_ssize_t[::1] ws, Py_ssize_t pt, Py_ssize_t pl, Py_ssize_t d, Py_ssize_t tb, Py_ssize_t vstride,
            Py_ssize_t mstride):
    """out = conv(x, w) + bias with ``u`` = G w G^T as (groups, 36, Kg, Cg), on ``vbuf.shape[0]`` threads.

    Buffers per thread: ``vbuf`` 36 rows of ``vstride`` >= Cg*tb, ``mbuf`` 36 rows of
    ``mstride`` >= Kg*tb, ``scratch`` 36*(tb + LANES) floats, ``planes`` zeroed staging planes
    (``fastconv._winograd.Plan.planes``), ``lanes`` 6*tb; ``checks[tid]``
    (zero on entry) receives the thread's finiteness check (stays 0 when every output is
    finite).  ``pt`` / ``pl`` may be negative (the input-gradient use).  Single-threaded BLAS
    is the caller's job when more than one thread runs.
    """
    cdef Py_ssize_t N = x.shape[0], C = x.shape[1], H = x.shape[2], W = x.shape[3]
    cdef Py_ssize_t K = out.shape[1], Ho = out.shape[2], Wo = out.shape[3]
    cdef Py_ssize_t TW = ws.shape[0], per_image = hs.shape[0] * ws.shape[0], T = N * per_image
    cdef Py_ssize_t Hb = _reach(hs, d, A), Wb = _reach(ws, d, A), slots = (tb + per_image - 2) // per_image + 1
    cdef Py_ssize_t b, nb
    cdef Block blk
    cdef int nt = <int> vbuf.shape[0], tid
    cdef Py_ssize_t* ln
    if planes.shape[0] < nt or planes.shape[1] < slots * Hb * Wb:
        raise ValueError(f"winograd forward: planes {planes.shape} too small for {nt} x {slots} planes of {Hb}x{Wb}")
    with nogil, parallel(num_threads=nt):
        tid = threadid()
        ln = &lanes[tid, 0]
        for b in prange((T + tb - 1) // tb, schedule="dynamic"):
            nb = min(tb, T - b * tb)
            blk = _block(b * tb, nb, TW, per_image, &hs[0])
            _lane_info(b * tb, nb, TW, per_image, &hs[0], &ws[0], K * Ho * Wo, M, d, Ho, Wo, ln, tb, blk.n0)
            checks[tid] += _forward_block(x, u, bias, out, &vbuf[tid, 0], &mbuf[tid, 0], &scratch[tid, 0],
                                          &planes[tid, 0], Hb, Wb, ln, &blk, nb, tb, pt, pl, d, vstride, mstride)


def backward_weight(const floating[:, :, :, ::1] gy, const floating[:, :, :, ::1] x,
                    floating[:, :, :, :, ::1] partial, floating[:, ::1] vbuf, floating[:, ::1] mbuf,
                    floating[:, ::1] scratch, floating[:, ::1] planes, Py_ssize_t[:, ::1] lanes, const Py_ssize_t[::1] hs,
                    const Py_ssize_t[::1] ws, Py_ssize_t pt, Py_ssize_t pl, Py_ssize_t d, Py_ssize_t tb,
                    Py_ssize_t vstride, Py_ssize_t mstride):
    """partial[tid] (groups, 36, Kg, Cg) += sum over the thread's tiles of (A dY A^T) @ (B^T d B)^T.

    ``partial`` must be zero on entry; its sum over threads is dU (see ``_winograd.weight_gradient``).
    ``planes``: zeroed staging planes for the input, then for the output gradient
    (``fastconv._winograd.Plan.planes``).
    """
    cdef Py_ssize_t N = x.shape[0], C = x.shape[1], H = x.shape[2], W = x.shape[3]
    cdef Py_ssize_t K = gy.shape[1], Ho = gy.shape[2], Wo = gy.shape[3], groups = partial.shape[1]
    cdef Py_ssize_t TW = ws.shape[0], per_image = hs.shape[0] * ws.shape[0], T = N * per_image
    cdef Py_ssize_t Hb = _reach(hs, d, A), Wb = _reach(ws, d, A)
    cdef Py_ssize_t Hg = Hb - 2 * d, Wg = Wb - 2 * d, slots = (tb + per_image - 2) // per_image + 1
    cdef Py_ssize_t b, nb
    cdef Block blk
    cdef int nt = <int> vbuf.shape[0], tid
    cdef Py_ssize_t* ln
    if planes.shape[0] < nt or planes.shape[1] < slots * (Hb * Wb + Hg * Wg):
        raise ValueError(f"winograd backward_weight: planes {planes.shape} too small for {nt} x {slots} planes of "
                         f"{Hb}x{Wb} and {Hg}x{Wg}")
    with nogil, parallel(num_threads=nt):
        tid = threadid()
        ln = &lanes[tid, 0]
        for b in prange((T + tb - 1) // tb, schedule="dynamic"):
            nb = min(tb, T - b * tb)
            blk = _block(b * tb, nb, TW, per_image, &hs[0])
            _lane_info(b * tb, nb, TW, per_image, &hs[0], &ws[0], K * Ho * Wo, M, d, Ho, Wo, ln, tb, blk.n0)
            _weight_block(gy, x, &partial[tid, 0, 0, 0, 0], &vbuf[tid, 0], &mbuf[tid, 0], &scratch[tid, 0],
                          &planes[tid, 0], Hb, Wb, &planes[tid, slots * Hb * Wb], Hg, Wg, ln, &blk, nb, tb, pt, pl,
                          d, groups, vstride, mstride)


# --------------------------------------------------------------------------- weight transforms
#
# The weight-side transforms of ``fastconv/_winograd.py`` (``transform_weight`` and
# ``weight_gradient``, the specification) for every channel pair of a layer, in float64 and
# rounded once, one output channel (row) per work unit: the 3x3 kernels of a row are gathered
# into a (9, cin) stage and the two 1-D transforms run over the channels in the innermost,
# vectorised loop.  As one NumPy GEMM with kron(G, G) in float64 they took 4.5 ms of a 17 ms
# forward pass of 8 images of 256 channels on 14x14, and 0.1-0.3 ms of mnist-c2's and
# cifar-64's (7% and 4% of the pass).

cdef inline void _load_g(const double[:, ::1] gm, double* G) noexcept:
    """G[p*3 + r] = gm[p, r] (G, A x 3), before the threads start: they read it as a C array, as
    G[p][r] from a memoryview in the innermost loops kept GCC from vectorising over the channels
    (mnist-c2's dU -> dw took 111 us on one thread that way, 54 us this way; NumPy 64 us)."""
    cdef Py_ssize_t p, r
    for p in range(A):
        for r in range(3):
            G[p * 3 + r] = gm[p, r]


def transform_weight(const floating[:, :, :, ::1] w, floating[:, :, :, ::1] u, const double[:, ::1] gm,
                     Py_ssize_t groups, bint rotate, int nt):
    """U = G w G^T for every channel pair of a pass: ``u[g, p*A + q, o, i]`` for the pass's output
    channel o and input channel i of group g.

    The pass's weight is ``w`` (K, C/g, 3, 3), or with ``rotate`` the input gradient's,
    w[g*K/g + i, o, 2-r, 2-s] (``fastconv.backends.base.input_grad_kernel``); ``gm`` is G (A, 3).
    """
    cdef Py_ssize_t K = w.shape[0], Cg = w.shape[1], Kg = K // groups
    cdef Py_ssize_t cin = Kg if rotate else Cg, cout = Cg if rotate else Kg
    if w.shape[2] != 3 or w.shape[3] != 3 or gm.shape[0] != A or gm.shape[1] != 3 or tuple(u.shape)[:4] != (
            groups, A * A, cout, cin):
        raise ValueError(f"transform_weight: u has shape {tuple(u.shape)[:4]}, expected ({groups}, {A * A}, "
                         f"{cout}, {cin}) for a 3x3 weight of shape {tuple(w.shape)[:4]} and G of "
                         f"{tuple(gm.shape)[:2]} ({A} x 3)")
    cdef const floating* src = &w[0, 0, 0, 0]
    cdef double[:, ::1] stages = np.empty((nt, (9 + 3 * A) * cin))  # per thread: the row's kernels
    cdef double* stage                                               # (9, cin), then G w (A*3, cin)
    cdef double* gw
    cdef floating* dst
    cdef Py_ssize_t row, g, o, i, rs, p, q, r, c
    cdef double g0, g1, g2
    cdef double G[A * 3]
    _load_g(gm, G)
    with nogil, parallel(num_threads=nt):
        stage = &stages[threadid(), 0]
        for row in prange(groups * cout, schedule="static"):
            g = row // cout
            o = row % cout
            for i in range(cin):
                for rs in range(9):
                    if rotate:
                        stage[rs * cin + i] = src[((g * Kg + i) * Cg + o) * 9 + 8 - rs]
                    else:
                        stage[rs * cin + i] = src[((g * Kg + o) * Cg + i) * 9 + rs]
            gw = stage + 9 * cin
            for p in range(A):  # (G w)[p, s] = sum_r G[p, r] w[r, s]
                g0, g1, g2 = G[p * 3], G[p * 3 + 1], G[p * 3 + 2]
                for c in range(3):
                    for i in range(cin):
                        gw[(p * 3 + c) * cin + i] = (g0 * stage[c * cin + i] + g1 * stage[(3 + c) * cin + i]
                                                     + g2 * stage[(6 + c) * cin + i])
            for p in range(A):  # U[p, q] = sum_s (G w)[p, s] G[q, s]
                for q in range(A):
                    g0, g1, g2 = G[q * 3], G[q * 3 + 1], G[q * 3 + 2]
                    dst = &u[g, p * A + q, o, 0]
                    for i in range(cin):
                        dst[i] = <floating> (g0 * gw[(p * 3) * cin + i] + g1 * gw[(p * 3 + 1) * cin + i]
                                             + g2 * gw[(p * 3 + 2) * cin + i])


def weight_gradient(const double[:, :, :, ::1] du, floating[:, :, :, ::1] gw, const double[:, ::1] gm, int nt):
    """dw = G^T dU G for every channel pair, rounded once: ``gw[g*K/g + k, c, r, s]`` = sum over p, q
    of G[p, r] G[q, s] du[g, p*A + q, k, c], from dU (groups, A*A, K/g, C/g) in float64, G (A, 3)."""
    cdef Py_ssize_t groups = du.shape[0], Kg = du.shape[2], Cg = du.shape[3], ld = Kg * Cg
    if gm.shape[0] != A or gm.shape[1] != 3 or du.shape[1] != A * A or tuple(gw.shape)[:4] != (groups * Kg, Cg, 3, 3):
        raise ValueError(f"weight_gradient: gw has shape {tuple(gw.shape)[:4]}, expected ({groups * Kg}, {Cg}, 3, 3) "
                         f"for dU of shape {tuple(du.shape)[:4]} and G of {tuple(gm.shape)[:2]} ({A} x 3)")
    cdef double[:, ::1] stages = np.empty((nt, (3 * A + 9) * Cg))  # per thread: G^T dU (3*A, Cg),
    cdef double* stage                                              # then G^T dU G (9, Cg)
    cdef const double* src
    cdef double* t
    cdef floating* dst
    cdef Py_ssize_t row, g, k, c, p, q, r, s
    cdef double acc
    cdef double G[A * 3]
    _load_g(gm, G)
    with nogil, parallel(num_threads=nt):
        stage = &stages[threadid(), 0]
        for row in prange(groups * Kg, schedule="static"):
            g = row // Kg
            k = row % Kg
            src = &du[g, 0, k, 0]  # dU[p, q] at src + (p*A + q)*ld
            for r in range(3):  # (G^T dU)[r, q] = sum_p G[p, r] dU[p, q], the channels innermost
                for q in range(A):
                    t = stage + (r * A + q) * Cg
                    for c in range(Cg):
                        acc = 0
                        for p in range(A):
                            acc = acc + G[p * 3 + r] * src[(p * A + q) * ld + c]
                        t[c] = acc
            t = stage + 3 * A * Cg
            for r in range(3):  # dw[r, s] = sum_q (G^T dU)[r, q] G[q, s]
                for s in range(3):
                    for c in range(Cg):
                        acc = 0
                        for q in range(A):
                            acc = acc + G[q * 3 + s] * stage[(r * A + q) * Cg + c]
                        t[(r * 3 + s) * Cg + c] = acc
            dst = &gw[row, 0, 0, 0]
            for c in range(Cg):
                for r in range(9):
                    dst[c * 9 + r] = <floating> t[r * Cg + c]
