"""Winograd F(4x4, 3x3) kernels of the numba backend (private; maths in ``fastconv/_winograd.py``).

The same design as the Cython kernels (``fastconv/backends/cython/_winograd.pyx``), except
that those stage each block's image rows in zero-bordered planes before gathering patches and
store output tiles through vector shuffles (6-22% faster there; not ported yet).  The
output is cut into tiles (``hs`` / ``ws``: the first output row / column of every tile row /
column; a tile covers outputs ``start + d*i``, i < 4), numbered image by image, row by row,
and processed in blocks of at most ``tb`` tiles.  Each of the ``vbuf.shape[0]`` workers
(one ``prange`` iteration each) owns one row of every buffer and takes blocks from a shared
counter (:func:`_next_block`), so the work spreads dynamically over the threads.  Per block
and group:

1. input transform: for each input channel, gather the 6 x 6 patches of the block's tiles
   (zeros outside the image) and compute ``B^T d B`` 16 tiles (``LANES``) at a time;
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
def _lane_info(t0: int, nb: int, tw: int, per_image: int, hs: np.ndarray, ws: np.ndarray, in_image: int, out_image: int,
               d: int, ho: int, wo: int, ln: np.ndarray, tb: int) -> None:
    """For tiles t0 .. t0+nb-1, in ``ln`` rows of ``tb`` entries: 0 input image offset, 1 output
    image offset, 2 / 3 first output row / column, 4 / 5 output rows / columns inside ho x wo."""
    for q in range(nb):
        t = t0 + q
        n = t // per_image
        rem = t - n * per_image
        h0, w0 = hs[rem // tw], ws[rem % tw]
        ln[q] = n * in_image
        ln[tb + q] = n * out_image
        ln[2 * tb + q] = h0
        ln[3 * tb + q] = w0
        ln[4 * tb + q] = min(M, (ho - 1 - h0) // d + 1)
        ln[5 * tb + q] = min(M, (wo - 1 - w0) // d + 1)


@njit(**_INL)
def _gather(src: np.ndarray, plane: int, row: int, ln: np.ndarray, tb: int, off_h: int, off_w: int, nb: int, bs: int,
            d: int, h: int, w: int, patch: np.ndarray, e: int) -> None:
    """patch[(i*e + j)*bs + q] = src[plane + ln[row, q] + (h0 + d*i)*w + w0 + d*j] with
    h0 / w0 = tile q's first output row / column (``ln`` rows 2 / 3) + ``off_h`` / ``off_w``,
    zero outside the h x w plane, for the tiles q < nb; zero for nb <= q < bs.

    Rows outside the plane are zero-filled whole; only tiles that overlap the left or right
    edge test columns one by one."""
    zero = patch.dtype.type(0)
    ubs = U(bs)
    for q in range(nb):
        h0 = ln[2 * tb + q] + off_h
        w0 = ln[3 * tb + q] + off_w
        base = plane + ln[row * tb + q]
        inside = w0 >= 0 and w0 + d * (e - 1) < w
        for i in range(e):
            dst = U(i * e * bs + q)
            ih = h0 + d * i
            if ih < 0 or ih >= h:
                for j in range(e):
                    patch[dst + U(j) * ubs] = zero
            elif inside:
                r = U(base + ih * w + w0)
                for j in range(e):
                    patch[dst + U(j) * ubs] = src[r + U(j * d)]
            else:
                r0 = base + ih * w
                for j in range(e):
                    iw = w0 + d * j
                    patch[dst + U(j) * ubs] = src[U(r0 + iw)] if 0 <= iw < w else zero
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
def _input_transform(xf: np.ndarray, plane: int, cg: int, h: int, w: int, ln: np.ndarray, nb: int, tb: int, bs: int,
                     pt: int, pl: int, d: int, stage: np.ndarray, vb: np.ndarray, vstride: int) -> None:
    """vb[xi*vstride + c*bs + q] = (B^T d B)[xi] of tile q's 6 x 6 patch of channel c < cg, the
    channel planes starting at ``plane`` (+ the image offsets, ``ln`` row 0).  The patches of
    a channel are gathered into ``stage`` (36 rows of bs) before they are transformed."""
    ubs, uvs = U(bs), U(vstride)
    for c in range(cg):
        _gather(xf, plane + c * h * w, 0, ln, tb, -pt, -pl, nb, bs, d, h, w, stage, A)
        for q0 in range(0, bs, LANES):
            tmp = _local(stage, _T66)  # tmp[r, j] at (r*6 + j) * LANES
            for j in range(A):  # columns: tmp[r, j] = sum_i BT[r, i] d[i, j]
                _input_1d(stage, U(j * bs + q0), U(A) * ubs, tmp, U(j * LANES), U(A * LANES))
            for r in range(A):  # rows: V[r, s] = sum_j BT[s, j] tmp[r, j]
                _input_1d(tmp, U(r * A * LANES), U(LANES), vb, U(r * A) * uvs + U(c * bs + q0), uvs)


@njit(**_SER)
def _forward_block(xf: np.ndarray, u: np.ndarray, bias: np.ndarray, of: np.ndarray, vb: np.ndarray, mb: np.ndarray,
                   sc: np.ndarray, ln: np.ndarray, nb: int, tb: int, pt: int, pl: int, d: int, vstride: int, mstride: int,
                   h: int, w: int, ho: int, wo: int) -> float:
    """Forward pass of the ``nb`` tiles described by ``ln`` (all groups); returns the finiteness
    check of :func:`_scatter` (0 when every output is finite)."""
    groups, kg, cg = u.shape[0], u.shape[2], u.shape[3]
    bs = (nb + LANES - 1) // LANES * LANES
    ubs, ums = U(bs), U(mstride)
    check = of.dtype.type(0)
    for g in range(groups):
        _input_transform(xf, g * cg * h * w, cg, h, w, ln, nb, tb, bs, pt, pl, d, sc, vb, vstride)
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
                  sc: np.ndarray, ln: np.ndarray, nb: int, tb: int, pt: int, pl: int, d: int, vstride: int, mstride: int,
                  h: int, w: int, ho: int, wo: int) -> None:
    """du (groups, 36, kg, cg) += the weight-gradient products of the ``nb`` tiles described
    by ``ln``; ``dtmp`` is kg*cg of scratch."""
    groups, kg, cg = du.shape[0], du.shape[2], du.shape[3]
    bs = (nb + LANES - 1) // LANES * LANES
    ubs, ums = U(bs), U(mstride)
    prod = dtmp[:kg * cg].reshape((kg, cg))
    for g in range(groups):
        _input_transform(xf, g * cg * h * w, cg, h, w, ln, nb, tb, bs, pt, pl, d, sc, vb, vstride)
        for k in range(kg):
            _gather(gyf, (g * kg + k) * ho * wo, 1, ln, tb, 0, 0, nb, bs, d, ho, wo, sc, M)
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
                     mbuf: np.ndarray, scratch: np.ndarray, lanes: np.ndarray, checks: np.ndarray, counter: np.ndarray,
                     hs: np.ndarray, ws: np.ndarray, pt: int, pl: int, d: int, tb: int, vstride: int,
                     mstride: int) -> None:
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
    xf, of = x.reshape(x.size), out.reshape(out.size)
    for t in prange(vbuf.shape[0]):
        vb, mb, sc, ln = vbuf[t], mbuf[t], scratch[t], lanes[t]
        check = of.dtype.type(0)
        blk = _next_block(counter)
        while blk < blocks:
            nb = min(tb, total - blk * tb)
            _lane_info(blk * tb, nb, tw, per_image, hs, ws, c * h * w, k * ho * wo, d, ho, wo, ln, tb)
            check += _forward_block(xf, u, bias, of, vb, mb, sc, ln, nb, tb, pt, pl, d, vstride, mstride, h, w,
                                    ho, wo)
            blk = _next_block(counter)
        checks[t] = check


@njit(**_PAR)
def winograd_backward_weight(gy: np.ndarray, x: np.ndarray, partial: np.ndarray, dtmp: np.ndarray, vbuf: np.ndarray,
                             mbuf: np.ndarray, scratch: np.ndarray, lanes: np.ndarray, counter: np.ndarray,
                             hs: np.ndarray, ws: np.ndarray, pt: int, pl: int, d: int, tb: int, vstride: int,
                             mstride: int) -> None:
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
    xf, gyf = x.reshape(x.size), gy.reshape(gy.size)
    for t in prange(vbuf.shape[0]):
        vb, mb, sc, ln = vbuf[t], mbuf[t], scratch[t], lanes[t]
        blk = _next_block(counter)
        while blk < blocks:
            nb = min(tb, total - blk * tb)
            _lane_info(blk * tb, nb, tw, per_image, hs, ws, c * h * w, k * ho * wo, d, ho, wo, ln, tb)
            _weight_block(gyf, xf, partial[t], dtmp[t], vb, mb, sc, ln, nb, tb, pt, pl, d, vstride, mstride,
                          h, w, ho, wo)
            blk = _next_block(counter)
