"""Winograd F(4x4, 3x3) kernels of the numba backend (private; maths in ``fastconv/_winograd.py``).

The same design as the Cython kernels (``fastconv/backends/cython/_winograd.pyx``), including
the zero-bordered planes that each block's image rows are staged in, so that patches are
gathered without bounds tests; except that the Cython kernel stores its output tiles through
vector shuffles (``_stage.h``) and this one element by element.  The
output is cut into tiles (``hs`` / ``ws``: the first output row / column of every tile row /
column; a tile covers outputs ``start + d*i``, i < 4), numbered image by image, row by row,
and processed in blocks of at most ``tb`` tiles.  Each of the ``vbuf.shape[0]`` workers
(one ``prange`` iteration each) owns one row of every buffer and takes blocks from a shared
counter (:func:`_next_block`), so the work spreads dynamically over the threads.  Per block
and group:

1. input transform: for each input channel, copy the block's image rows into zero-bordered
   planes, gather the 6 x 6 patches of the block's tiles from there and compute ``B^T d B``
   16 tiles (``LANES``) at a time;
2. 36 GEMMs ``M[xi] = U[xi] @ V[xi]`` through ``np.dot`` on contiguous 2-D slices, which
   numba lowers to a BLAS call (the adapter pins BLAS to one thread while several workers
   call it);
3. output transform ``A^T M A`` per output channel, plus bias, stored into the NCHW output
   (clipped at the bottom / right edges).

The weight gradient replaces step 3 by the transform ``A dY A^T`` of the output-gradient
tiles and accumulates ``dU[xi] += dY~[xi] @ V[xi]^T`` into per-worker partial sums (a GEMM
into a scratch matrix, then an add: ``np.dot`` has no ``beta``).  The input gradient is the
forward kernel run on ``grad_out`` (done by the adapter).

Block layout: a block of ``nb`` tiles is stored with the row stride ``bs`` = ``nb`` rounded
up to ``LANES`` (``tb`` for every block but the last), so each GEMM operand is one
contiguous (channels, bs) matrix; the ``bs - nb`` spare tiles are zero in the transformed
input and never stored.

Vectorisation (checked in the generated assembly: AVX-512 on the Zen 4 development box):
the 1-D transforms copy their six (or four) 16-lane vectors into stack arrays
(:func:`_local`) before computing, as the Cython kernels do, because LLVM cannot prove that
strided loads and stores through the same or different NumPy buffers do not overlap and
would otherwise emit scalar code; the 16-lane loops have constant trip counts and are fully
vectorised.  Indices are unsigned (``np.uint64``) wherever they address a buffer, which
removes numba's negative-index wrap-around selects.

Winograd spreads an Inf or NaN over its whole tile, unlike a direct convolution; the
forward kernel therefore reports whether any stored output is non-finite (``checks``) and
the adapter recomputes such (rare) calls with im2col.

``fastmath={"contract"}`` only (fused multiply-add): no flag that assumes finite values,
so the finiteness check ``v - v`` is kept, and no reassociation.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic
from numba.np.arrayobj import populate_array

#: tiles transformed together: one AVX-512 vector of float32
LANES = 16
#: output / input tile sizes of F(4x4, 3x3)
M = 4
A = 6

#: stack-array sizes (numba needs them as module constants, not expressions): 6 or 4
#: LANES-vectors, the 6 x 6 and 4 x 6 intermediate tiles, the 16 output-tile sums
_V6 = A * LANES
_V4 = M * LANES
_T66 = A * A * LANES
_T46 = M * A * LANES
_SUMS = M * M

_PAR = dict(parallel=True, cache=True, nogil=True, fastmath={"contract"})
_SER = dict(cache=True, nogil=True, fastmath={"contract"})
_INL = dict(inline="always", cache=True, nogil=True, fastmath={"contract"})
U = np.uint64


@intrinsic
def _local(typingctx, like, size):
    """A 1-D array of ``size`` (a literal int) elements of ``like``'s dtype on the stack.

    The storage is an ``alloca`` in the entry block of the function it ends up in, so a
    call inside a loop costs nothing; LLVM knows that it overlaps no other buffer, which is
    what lets the transforms vectorise.  Uninitialised; valid until the function returns.
    """
    if not isinstance(size, types.IntegerLiteral):
        return None
    arrty = types.Array(like.dtype, 1, "C")
    n = size.literal_value

    def codegen(context, builder, sig, args):
        elty = context.get_data_type(like.dtype)
        ptr = cgutils.alloca_once(builder, elty, size=n)
        ary = context.make_array(arrty)(context, builder)
        itemsize = context.get_constant(types.intp, context.get_abi_sizeof(elty))
        populate_array(ary, data=ptr, shape=[context.get_constant(types.intp, n)], strides=[itemsize],
                       itemsize=itemsize, meminfo=None)
        return ary._getvalue()

    return arrty(like, size), codegen


@intrinsic
def _next_block(typingctx, counter):
    """Atomically ``counter[0] += 1`` and return the old value (int64 ``counter``).

    The workers' shared block counter: whichever worker is free takes the next block
    (OpenMP's ``schedule(dynamic)``), so a core slowed down by another process does not
    hold up the rest."""
    if not (isinstance(counter, types.Array) and counter.dtype == types.int64):
        return None

    def codegen(context, builder, sig, args):
        ary = context.make_array(sig.args[0])(context, builder, args[0])
        one = context.get_constant(types.int64, 1)
        return builder.atomic_rmw("add", ary.data, one, "monotonic")

    return types.int64(counter), codegen


# --------------------------------------------------------------------------- 16-lane transforms
@njit(**_INL)
def _load(src: np.ndarray, s0: int, ss: int, buf: np.ndarray, n: int) -> None:
    """buf[r*LANES + l] = src[s0 + r*ss + l] for r < n, l < LANES (unsigned offsets)."""
    for r in range(n):
        b = s0 + U(r) * ss
        for l in range(LANES):
            buf[r * LANES + l] = src[b + U(l)]


@njit(**_INL)
def _store(buf: np.ndarray, dst: np.ndarray, d0: int, ds: int, n: int) -> None:
    """dst[d0 + r*ds + l] = buf[r*LANES + l] for r < n, l < LANES (unsigned offsets)."""
    for r in range(n):
        b = d0 + U(r) * ds
        for l in range(LANES):
            dst[b + U(l)] = buf[r * LANES + l]


@njit(**_INL)
def _input_1d(src: np.ndarray, s0: int, ss: int, dst: np.ndarray, d0: int, ds: int) -> None:
    """dst row r = sum_i BT[r][i] * src row i for six LANES-vectors (rows ``ss`` / ``ds`` apart):
    B^T of F(4x4, 3x3) on the points 0, +-1, +-2."""
    x = _local(src, _V6)
    y = _local(src, _V6)
    _load(src, s0, ss, x, 6)
    two, four, five = src.dtype.type(2), src.dtype.type(4), src.dtype.type(5)
    for l in range(LANES):
        x0, x1, x2 = x[l], x[LANES + l], x[2 * LANES + l]
        x3, x4, x5 = x[3 * LANES + l], x[4 * LANES + l], x[5 * LANES + l]
        y[l] = four * x0 - five * x2 + x4
        y[LANES + l] = x3 + x4 - four * (x1 + x2)
        y[2 * LANES + l] = four * (x1 - x2) - x3 + x4
        y[3 * LANES + l] = two * (x3 - x1) - x2 + x4
        y[4 * LANES + l] = two * (x1 - x3) - x2 + x4
        y[5 * LANES + l] = four * x1 - five * x3 + x5
    _store(y, dst, d0, ds, 6)


@njit(**_INL)
def _output_1d(src: np.ndarray, s0: int, ss: int, dst: np.ndarray, d0: int, ds: int) -> None:
    """dst row i = sum_r AT[i][r] * src row r for six LANES-vectors in, four out (A^T)."""
    x = _local(src, _V6)
    y = _local(src, _V4)
    _load(src, s0, ss, x, 6)
    two, four, eight = src.dtype.type(2), src.dtype.type(4), src.dtype.type(8)
    for l in range(LANES):
        x0, x1, x2 = x[l], x[LANES + l], x[2 * LANES + l]
        x3, x4, x5 = x[3 * LANES + l], x[4 * LANES + l], x[5 * LANES + l]
        sp, sm, dp, dm = x1 + x2, x1 - x2, x3 + x4, x3 - x4
        y[l] = x0 + sp + dp
        y[LANES + l] = sm + two * dm
        y[2 * LANES + l] = sp + four * dp
        y[3 * LANES + l] = sm + eight * dm + x5
    _store(y, dst, d0, ds, 4)


@njit(**_INL)
def _grad_1d(src: np.ndarray, s0: int, ss: int, dst: np.ndarray, d0: int, ds: int) -> None:
    """dst row r = sum_i AT[i][r] * src row i for four LANES-vectors in, six out (A = AT^T,
    the weight gradient's transform of the output-gradient tiles)."""
    x = _local(src, _V4)
    y = _local(src, _V6)
    _load(src, s0, ss, x, 4)
    two, four, eight = src.dtype.type(2), src.dtype.type(4), src.dtype.type(8)
    for l in range(LANES):
        x0, x1, x2, x3 = x[l], x[LANES + l], x[2 * LANES + l], x[3 * LANES + l]
        ep, em = x0 + x2, x1 + x3
        fp, fm = x0 + four * x2, two * x1 + eight * x3
        y[l] = x0
        y[LANES + l] = ep + em
        y[2 * LANES + l] = ep - em
        y[3 * LANES + l] = fp + fm
        y[4 * LANES + l] = fp - fm
        y[5 * LANES + l] = x3
    _store(y, dst, d0, ds, 6)


# --------------------------------------------------------------------------- block helpers
@njit(**_SER)
def _lane_info(t0: int, nb: int, tw: int, per_image: int, hs: np.ndarray, ws: np.ndarray, n0: int, out_image: int,
               d: int, ho: int, wo: int, ln: np.ndarray, tb: int) -> None:
    """For tiles t0 .. t0+nb-1, in ``ln`` rows of ``tb`` entries: 0 image slot (image - ``n0``, the
    block's first), 1 output image offset, 2 / 3 first output row / column, 4 / 5 output rows /
    columns inside ho x wo."""
    for q in range(nb):
        t = t0 + q
        n = t // per_image
        rem = t - n * per_image
        h0, w0 = hs[rem // tw], ws[rem % tw]
        ln[q] = n - n0
        ln[tb + q] = n * out_image
        ln[2 * tb + q] = h0
        ln[3 * tb + q] = w0
        ln[4 * tb + q] = min(M, (ho - 1 - h0) // d + 1)
        ln[5 * tb + q] = min(M, (wo - 1 - w0) // d + 1)


@njit(**_SER)
def _block(t0: int, nb: int, tw: int, per_image: int, hs: np.ndarray) -> tuple[int, int, int, int, int, int]:
    """The images that tiles t0 .. t0+nb-1 read: (first image, count, lowest / highest start of
    its tile rows in the first image, the same in the last); ``hs`` need not be increasing
    (dilated tilings interleave).  As the Cython kernel's ``_block``."""
    tl = t0 + nb - 1
    n0 = t0 // per_image
    nimg = tl // per_image - n0 + 1
    r0, r1 = t0 % per_image // tw, tl % per_image // tw
    lo0 = hi0 = hs[r0]
    for r in range(r0, r1 + 1 if nimg == 1 else per_image // tw):
        lo0, hi0 = min(lo0, hs[r]), max(hi0, hs[r])
    lo1 = hi1 = hs[0]
    for r in range(r1 + 1):
        lo1, hi1 = min(lo1, hs[r]), max(hi1, hs[r])
    return n0, nimg, lo0, hi0, lo1, hi1


@njit(**_INL)
def _stage(src: np.ndarray, s0: int, image: int, blk: tuple, h: int, w: int, pt: int, pl: int, d: int, e: int,
           hb: int, wb: int, dst: np.ndarray) -> None:
    """dst[s*hb*wb + (i + pt)*wb + j + pl] = src[s0 + (n0 + s)*image + i*w + j], s < the block's image
    count, for the input rows i and columns j inside the hb x wb plane that the block's e x e
    patches may read; nothing else is written (the zeros around the input are written once
    per call, ``Plan.planes``).  As the Cython kernel's ``_stage``."""
    n0, nimg, lo0, hi0, lo1, hi1 = blk
    j0, j1 = max(0, -pl), min(w, wb - pl)
    if j1 <= j0:
        return
    for sl in range(nimg):
        lo = lo0 if sl == 0 else (lo1 if sl == nimg - 1 else 0)
        hi = hi0 if sl == 0 else (hi1 if sl == nimg - 1 else hb)
        for i in range(max(lo, pt) - pt, min(hi + d * (e - 1) + 1, hb, pt + h) - pt):
            a = U(s0 + (n0 + sl) * image + i * w)
            b = U(sl * hb * wb + (i + pt) * wb + pl)
            for j in range(j0, j1):  # (as a slice assignment the whole pass ran 1.1-1.2x slower)
                dst[b + U(j)] = src[a + U(j)]


@njit(**_INL)
def _gather(planes: np.ndarray, hb: int, wb: int, ln: np.ndarray, tb: int, nb: int, bs: int, d: int,
            patch: np.ndarray, e: int) -> None:
    """patch[(i*e + j)*bs + q] = planes[slot*hb*wb + (h0 + d*i)*wb + w0 + d*j] for the tiles q < nb
    (slot, h0, w0 from ``ln`` rows 0, 2 and 3; planes staged by :func:`_stage`), zero for
    nb <= q < bs.  Every patch lies inside its staged plane: no tests."""
    zero = patch.dtype.type(0)
    ubs = U(bs)
    for q in range(nb):
        base = U(ln[q] * hb * wb + ln[2 * tb + q] * wb + ln[3 * tb + q])
        for i in range(e):
            dst = U(i * e * bs + q)
            r = base + U(i * d * wb)
            for j in range(e):
                patch[dst + U(j) * ubs] = planes[r + U(j * d)]
    for i in range(e * e):
        for q in range(nb, bs):
            patch[U(i * bs + q)] = zero


@njit(**_SER)
def _scatter(out: np.ndarray, plane: int, ln: np.ndarray, nb: int, tb: int, bs: int, d: int, wo: int, blk: np.ndarray,
             add: float) -> float:
    """out[plane + ln[1, q] + (h0 + d*i)*wo + w0 + d*j] = blk[(i*4 + j)*bs + q] + add for the
    i < ln[4, q], j < ln[5, q] of each tile q < nb.

    Returns the sum of ``v - v`` over the stored values (0 when all are finite, NaN
    otherwise), accumulated in 16 independent partial sums."""
    acc = _local(blk, _SUMS)
    for i in range(M * M):
        acc[i] = 0
    ubs, uwo, ud = U(bs), U(wo), U(d)
    for q in range(nb):
        o = U(plane + ln[tb + q] + ln[2 * tb + q] * wo + ln[3 * tb + q])
        ni, nj = ln[4 * tb + q], ln[5 * tb + q]
        if ni == M and nj == M:  # constant trip counts: unrolled
            for i in range(M):
                for j in range(M):
                    v = blk[U(i * M + j) * ubs + U(q)] + add
                    out[o + (U(i) * uwo + U(j)) * ud] = v
                    acc[i * M + j] += v - v
        else:
            for i in range(ni):
                for j in range(nj):
                    v = blk[U(i * M + j) * ubs + U(q)] + add
                    out[o + (U(i) * uwo + U(j)) * ud] = v
                    acc[i * M + j] += v - v
    check = blk.dtype.type(0)
    for i in range(M * M):
        check += acc[i]
    return check


@njit(**_SER)
def _input_transform(xf: np.ndarray, plane: int, image: int, cg: int, h: int, w: int, ln: np.ndarray, blk: tuple,
                     nb: int, tb: int, bs: int, pt: int, pl: int, d: int, planes: np.ndarray, hb: int, wb: int,
                     stage: np.ndarray, vb: np.ndarray, vstride: int) -> None:
    """vb[xi*vstride + c*bs + q] = (B^T d B)[xi] of tile q's 6 x 6 patch of channel c < cg, the
    channel planes starting at ``plane`` (``image`` apart).  Per channel the block's images are
    staged in ``planes`` (hb x wb each) and its patches gathered into ``stage`` (36 rows of bs)
    before they are transformed."""
    ubs, uvs = U(bs), U(vstride)
    for c in range(cg):
        _stage(xf, plane + c * h * w, image, blk, h, w, pt, pl, d, A, hb, wb, planes)
        _gather(planes, hb, wb, ln, tb, nb, bs, d, stage, A)
        for q0 in range(0, bs, LANES):
            tmp = _local(stage, _T66)  # tmp[r, j] at (r*6 + j) * LANES
            for j in range(A):  # columns: tmp[r, j] = sum_i BT[r, i] d[i, j]
                _input_1d(stage, U(j * bs + q0), U(A) * ubs, tmp, U(j * LANES), U(A * LANES))
            for r in range(A):  # rows: V[r, s] = sum_j BT[s, j] tmp[r, j]
                _input_1d(tmp, U(r * A * LANES), U(LANES), vb, U(r * A) * uvs + U(c * bs + q0), uvs)


@njit(**_SER)
def _forward_block(xf: np.ndarray, u: np.ndarray, bias: np.ndarray, of: np.ndarray, vb: np.ndarray, mb: np.ndarray,
                   sc: np.ndarray, planes: np.ndarray, ln: np.ndarray, blk: tuple, nb: int, tb: int, pt: int, pl: int,
                   d: int, vstride: int, mstride: int, h: int, w: int, ho: int, wo: int, hb: int, wb: int) -> float:
    """Forward pass of the ``nb`` tiles described by ``ln`` (all groups); returns the finiteness
    check of :func:`_scatter` (0 when every output is finite)."""
    groups, kg, cg = u.shape[0], u.shape[2], u.shape[3]
    bs = (nb + LANES - 1) // LANES * LANES
    ubs, ums = U(bs), U(mstride)
    check = of.dtype.type(0)
    for g in range(groups):
        _input_transform(xf, g * cg * h * w, groups * cg * h * w, cg, h, w, ln, blk, nb, tb, bs, pt, pl, d, planes,
                         hb, wb, sc, vb, vstride)
        for xi in range(A * A):
            v0, m0 = xi * vstride, xi * mstride
            np.dot(u[g, xi], vb[v0:v0 + cg * bs].reshape((cg, bs)), mb[m0:m0 + kg * bs].reshape((kg, bs)))
        for k in range(kg):
            for q0 in range(0, bs, LANES):
                tmp = _local(mb, _T46)  # tmp[i, s] at (i*6 + s) * LANES
                for s in range(A):  # columns: tmp[i, s] = sum_r AT[i, r] M[r, s]
                    _output_1d(mb, U(s) * ums + U(k * bs + q0), U(A) * ums, tmp, U(s * LANES), U(A * LANES))
                for i in range(M):  # rows: Y[i, j] = sum_s AT[j, s] tmp[i, s]
                    _output_1d(tmp, U(i * A * LANES), U(LANES), sc, U(i * M) * ubs + U(q0), ubs)
            kk = g * kg + k
            check += _scatter(of, kk * ho * wo, ln, nb, tb, bs, d, wo, sc, bias[kk])
    return check


@njit(**_SER)
def _weight_block(gyf: np.ndarray, xf: np.ndarray, du: np.ndarray, dtmp: np.ndarray, vb: np.ndarray, mb: np.ndarray,
                  sc: np.ndarray, xplanes: np.ndarray, gplanes: np.ndarray, ln: np.ndarray, blk: tuple, nb: int,
                  tb: int, pt: int, pl: int, d: int, vstride: int, mstride: int, h: int, w: int, ho: int, wo: int,
                  hb: int, wb: int) -> None:
    """du (groups, 36, kg, cg) += the weight-gradient products of the ``nb`` tiles described
    by ``ln``; ``dtmp`` is kg*cg of scratch; input planes staged in ``xplanes`` (hb x wb),
    output-gradient planes in ``gplanes`` ((hb - 2d) x (wb - 2d))."""
    groups, kg, cg = du.shape[0], du.shape[2], du.shape[3]
    bs = (nb + LANES - 1) // LANES * LANES
    ubs, ums = U(bs), U(mstride)
    prod = dtmp[:kg * cg].reshape((kg, cg))
    for g in range(groups):
        _input_transform(xf, g * cg * h * w, groups * cg * h * w, cg, h, w, ln, blk, nb, tb, bs, pt, pl, d, xplanes,
                         hb, wb, sc, vb, vstride)
        for k in range(kg):
            _stage(gyf, (g * kg + k) * ho * wo, groups * kg * ho * wo, blk, ho, wo, 0, 0, d, M, hb - 2 * d, wb - 2 * d,
                   gplanes)
            _gather(gplanes, hb - 2 * d, wb - 2 * d, ln, tb, nb, bs, d, sc, M)
            for q0 in range(0, bs, LANES):
                tmp = _local(sc, _T46)  # tmp[r, j] at (r*4 + j) * LANES
                for j in range(M):  # columns: tmp[r, j] = sum_i A[r, i] dY[i, j]
                    _grad_1d(sc, U(j * bs + q0), U(M) * ubs, tmp, U(j * LANES), U(M * LANES))
                for r in range(A):  # rows: dY~[r, s] = sum_j A[s, j] tmp[r, j]
                    _grad_1d(tmp, U(r * M * LANES), U(LANES), mb, U(r * A) * ums + U(k * bs + q0), ums)
        for xi in range(A * A):
            v0, m0 = xi * vstride, xi * mstride
            np.dot(mb[m0:m0 + kg * bs].reshape((kg, bs)), vb[v0:v0 + cg * bs].reshape((cg, bs)).T, prod)
            acc = du[g, xi]
            for k in range(kg):
                for c in range(cg):
                    acc[k, c] += prod[k, c]


# --------------------------------------------------------------------------- entry points
@njit(**_PAR)
def winograd_forward(x: np.ndarray, u: np.ndarray, bias: np.ndarray, out: np.ndarray, vbuf: np.ndarray,
                     mbuf: np.ndarray, scratch: np.ndarray, planes: np.ndarray, lanes: np.ndarray, checks: np.ndarray,
                     counter: np.ndarray, hs: np.ndarray, ws: np.ndarray, pt: int, pl: int, d: int, tb: int,
                     vstride: int, mstride: int) -> None:
    """``out = conv(x, w) + bias`` for a 3x3 stride-1 layer, from ``u`` = G w G^T.

    Runs ``vbuf.shape[0]`` workers (one ``prange`` iteration each) that take blocks of
    ``tb`` tiles from ``counter``.  Single-threaded BLAS is the caller's job when more than
    one numba thread runs.

    Parameters
    ----------
    x : ndarray, (N, C, H, W)
        Input, C-contiguous.
    u : ndarray, (groups, 36, Kg, Cg)
        Transformed weights (``fastconv._winograd.transform_weight``).
    bias : ndarray, (K,)
        Added to every output of channel k.
    out : ndarray, (N, K, Ho, Wo)
        Output, overwritten.
    vbuf, mbuf : ndarray, (workers, >= 36 * vstride), (workers, >= 36 * mstride)
        Per-worker transformed-input and product blocks (``Plan.buffers``).
    scratch : ndarray, (workers, >= 36 * tb)
        Per-worker staging for the gathered patches and the output tiles.
    planes : ndarray, (workers, ...)
        Per-worker zero-bordered input planes (``Plan.planes``), zero on entry.
    lanes : ndarray of intp, (workers, 6 * tb)
        Per-worker tile descriptions (:func:`_lane_info`).
    checks : ndarray, (workers,)
        Receives each worker's finiteness check: 0 when every output it stored is finite.
    counter : ndarray of int64, (1,)
        The shared block counter, zero on entry.
    hs, ws : ndarray of intp
        First output row / column of every tile row / column (``tile_starts``).
    pt, pl : int
        Top / left padding; negative in the input-gradient use (``2*d - pad``).
    d : int
        Dilation (both axes).
    tb : int
        Tiles per block, a multiple of :data:`LANES`.
    vstride, mstride : int
        Elements between the 36 rows of the blocks in ``vbuf`` / ``mbuf``
        (>= Cg*tb / Kg*tb).
    """
    n, c, h, w = x.shape
    k, ho, wo = out.shape[1], out.shape[2], out.shape[3]
    tw = ws.shape[0]
    per_image = hs.shape[0] * tw
    total = n * per_image
    blocks = (total + tb - 1) // tb
    hb, wb = hs.max() + d * (A - 1) + 1, ws.max() + d * (A - 1) + 1
    if planes.shape[0] < vbuf.shape[0] or planes.shape[1] < ((tb + per_image - 2) // per_image + 1) * hb * wb:
        raise ValueError("winograd_forward: planes too small for the tiling")
    xf, of = x.reshape(x.size), out.reshape(out.size)
    for t in prange(vbuf.shape[0]):
        vb, mb, sc, pb, ln = vbuf[t], mbuf[t], scratch[t], planes[t], lanes[t]
        check = of.dtype.type(0)
        b = _next_block(counter)
        while b < blocks:
            nb = min(tb, total - b * tb)
            blk = _block(b * tb, nb, tw, per_image, hs)
            _lane_info(b * tb, nb, tw, per_image, hs, ws, blk[0], k * ho * wo, d, ho, wo, ln, tb)
            check += _forward_block(xf, u, bias, of, vb, mb, sc, pb, ln, blk, nb, tb, pt, pl, d, vstride, mstride,
                                    h, w, ho, wo, hb, wb)
            b = _next_block(counter)
        checks[t] = check


@njit(**_PAR)
def winograd_backward_weight(gy: np.ndarray, x: np.ndarray, partial: np.ndarray, dtmp: np.ndarray, vbuf: np.ndarray,
                             mbuf: np.ndarray, scratch: np.ndarray, planes: np.ndarray, lanes: np.ndarray,
                             counter: np.ndarray, hs: np.ndarray, ws: np.ndarray, pt: int, pl: int, d: int, tb: int,
                             vstride: int, mstride: int) -> None:
    """Per-worker partial sums of dU = sum over tiles of (A^T dY A)~ @ (B^T d B)^T.

    Their sum over workers is the gradient in the Winograd domain; the adapter turns it
    into dw with ``fastconv._winograd.weight_gradient``.

    Parameters
    ----------
    gy : ndarray, (N, K, Ho, Wo)
        Output gradient.
    x : ndarray, (N, C, H, W)
        Layer input.
    partial : ndarray, (workers, groups, 36, Kg, Cg)
        Zero on entry; receives each worker's sum.
    dtmp : ndarray, (workers, >= Kg * Cg)
        Per-worker scratch for one GEMM's product before it is added to ``partial``.
    vbuf, mbuf, scratch, lanes, counter, hs, ws, tb, vstride, mstride
        As for :func:`winograd_forward` (``mbuf`` holds the transformed output-gradient tiles).
    planes : ndarray, (workers, ...)
        Per-worker zero-bordered input planes, then output-gradient planes
        (``Plan.planes(weight=True)``), zero on entry.
    pt, pl : int
        The layer's top / left padding.
    d : int
        Dilation (both axes).
    """
    n, c, h, w = x.shape
    k, ho, wo = gy.shape[1], gy.shape[2], gy.shape[3]
    tw = ws.shape[0]
    per_image = hs.shape[0] * tw
    total = n * per_image
    blocks = (total + tb - 1) // tb
    hb, wb = hs.max() + d * (A - 1) + 1, ws.max() + d * (A - 1) + 1
    slots = (tb + per_image - 2) // per_image + 1
    if planes.shape[0] < vbuf.shape[0] or planes.shape[1] < slots * (hb * wb + (hb - 2 * d) * (wb - 2 * d)):
        raise ValueError("winograd_backward_weight: planes too small for the tiling")
    xf, gyf = x.reshape(x.size), gy.reshape(gy.size)
    for t in prange(vbuf.shape[0]):
        vb, mb, sc, ln = vbuf[t], mbuf[t], scratch[t], lanes[t]
        xp, gp = planes[t, :slots * hb * wb], planes[t, slots * hb * wb:]
        b = _next_block(counter)
        while b < blocks:
            nb = min(tb, total - b * tb)
            blk = _block(b * tb, nb, tw, per_image, hs)
            _lane_info(b * tb, nb, tw, per_image, hs, ws, blk[0], k * ho * wo, d, ho, wo, ln, tb)
            _weight_block(gyf, xf, partial[t], dtmp[t], vb, mb, sc, xp, gp, ln, blk, nb, tb, pt, pl, d, vstride,
                          mstride, h, w, ho, wo, hb, wb)
            b = _next_block(counter)


# --------------------------------------------------------------------------- weight transforms
#
# The weight-side transforms of ``fastconv/_winograd.py`` (the specification), compiled as the
# Cython kernels of the same names: one output channel (row) per iteration, its 3x3 kernels
# gathered into a (9, cin) stage, the 1-D transforms over the channels innermost, in float64
# and rounded once (as one NumPy GEMM with kron(G, G) they took 4.5 ms of a 17 ms forward pass
# of 8 images of 256 channels on 14x14).

@njit(**_PAR)
def transform_weight(w, u, gm, groups, rotate):
    """U = G w G^T for every channel pair of a pass: ``u[g, p*a + q, o, i]`` for the pass's output
    channel o and input channel i of group g, with the layer's 3x3 weight ``w`` or, with
    ``rotate``, the input gradient's, w[g*K/g + i, o, 2-r, 2-s]; ``gm`` is G (a, 3)."""
    k, cg = w.shape[0], w.shape[1]
    kg, a = k // groups, gm.shape[0]
    cin, cout = (kg, cg) if rotate else (cg, kg)
    if (w.shape[2] != 3 or w.shape[3] != 3 or gm.shape[1] != 3 or u.shape[0] != groups or u.shape[1] != a * a
            or u.shape[2] != cout or u.shape[3] != cin):
        raise ValueError("transform_weight: u has the wrong shape for the weight")
    src = w.reshape(w.size)
    for row in prange(groups * cout):
        g, o = row // cout, row % cout
        stage = np.empty((9, cin))
        for i in range(cin):
            for rs in range(9):
                if rotate:
                    stage[rs, i] = src[((g * kg + i) * cg + o) * 9 + 8 - rs]
                else:
                    stage[rs, i] = src[((g * kg + o) * cg + i) * 9 + rs]
        gw = np.empty((a, 3, cin))
        for p in range(a):  # (G w)[p, s] = sum_r G[p, r] w[r, s]
            g0, g1, g2 = gm[p, 0], gm[p, 1], gm[p, 2]
            for s in range(3):
                for i in range(cin):
                    gw[p, s, i] = g0 * stage[s, i] + g1 * stage[3 + s, i] + g2 * stage[6 + s, i]
        for p in range(a):  # U[p, q] = sum_s (G w)[p, s] G[q, s]
            for q in range(a):
                g0, g1, g2 = gm[q, 0], gm[q, 1], gm[q, 2]
                dst = u[g, p * a + q, o]
                for i in range(cin):
                    dst[i] = g0 * gw[p, 0, i] + g1 * gw[p, 1, i] + g2 * gw[p, 2, i]


@njit(**_PAR)
def weight_gradient(du, gw, gm):
    """dw = G^T dU G for every channel pair, rounded once: ``gw[g*K/g + k, c, r, s]`` = sum over
    p, q of G[p, r] G[q, s] du[g, p*a + q, k, c], from dU (groups, a*a, K/g, C/g) in float64."""
    groups, a2, kg, cg = du.shape
    a = gm.shape[0]
    if a2 != a * a or gm.shape[1] != 3 or gw.shape[0] != groups * kg or gw.shape[1] != cg or gw.shape[2] != 3 or (
            gw.shape[3] != 3):
        raise ValueError("weight_gradient: gw has the wrong shape for dU")
    for row in prange(groups * kg):
        g, k = row // kg, row % kg
        t = np.zeros((3, a, cg))
        for r in range(3):  # (G^T dU)[r, q] = sum_p G[p, r] dU[p, q]
            for q in range(a):
                for p in range(a):
                    gp = gm[p, r]
                    src = du[g, p * a + q, k]
                    for c in range(cg):
                        t[r, q, c] += gp * src[c]
        dw = np.zeros((3, 3, cg))
        for r in range(3):  # dw[r, s] = sum_q (G^T dU)[r, q] G[q, s]
            for s in range(3):
                for q in range(a):
                    gq = gm[q, s]
                    for c in range(cg):
                        dw[r, s, c] += gq * t[r, q, c]
        for c in range(cg):
            for r in range(3):
                for s in range(3):
                    gw[row, c, r, s] = dw[r, s, c]
