"""Numba kernels of the numba backend (private).

One generic ``@njit`` function per kernel: numba specialises it for float32 and
float64 on first use, and ``cache=True`` stores the machine code next to this
module so a second process loads instead of compiling.  Nothing here compiles at
import time.

Conventions
-----------
* Arrays are C-contiguous; 4-D arrays are NCHW, weights (K, C // groups, R, S).
* Padding is never materialised: for each kernel tap the kernels compute the range
  of output positions whose input position is in range (:func:`_span`).
* Every ``prange`` iterates over work items that write disjoint memory (output rows,
  input-gradient rows, weight-gradient entries, image planes, per-worker buffers), so
  there are no races.
* Direct convolution kernels use ``fastmath={"contract", "reassoc"}``: fused multiply-add
  and reordered sums (vectorised reductions) change only the rounding; no flag assumes
  finite values, so NaN and inf propagate as IEEE says.  The im2col kernels (copies, BLAS
  calls, exact adds) and the pooling kernels use no fastmath at all (max pooling's NaN
  rule depends on exact comparisons).
* The im2col kernels take their shared work counter from ``_winograd._next_block``.
  numba's cache checks only the source file of the cached function, so a change to that
  intrinsic must be followed by touching this file (or clearing ``__pycache__``).
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from ._winograd import _next_block

_CONV = dict(parallel=True, cache=True, nogil=True, fastmath={"contract", "reassoc"})
_POOL = dict(parallel=True, cache=True, nogil=True)
_SERIAL = dict(cache=True, nogil=True)
_SERIAL_MATH = dict(cache=True, nogil=True, fastmath={"contract", "reassoc"})
_IM2COL = dict(parallel=True, cache=True, nogil=True)


@njit(**_SERIAL)
def _spans(ns, dw, left, sw, wd, wo):
    """_span for every kernel column s (offset s*dw - left): arrays lo[s], hi[s], computed once
    per call instead of two integer divisions per tap in the inner loops."""
    lo = np.empty(ns, np.int64)
    hi = np.empty(ns, np.int64)
    for s in range(ns):
        lo[s], hi[s] = _span(s * dw - left, sw, wd, wo)
    return lo, hi


@njit(inline="always", **_SERIAL)
def _span(offset: int, stride: int, size: int, out: int) -> tuple[int, int]:
    """Output positions ``lo <= o < hi`` with ``0 <= o * stride + offset < size``, clamped
    so that ``0 <= lo <= hi <= out`` always holds (a tap that never lands inside the
    image, e.g. a dilated tap of a padded 1-pixel-wide image, gives an empty range at
    ``out``, never a range past the row)."""
    lo = 0 if offset >= 0 else (stride - 1 - offset) // stride
    last = size - 1 - offset
    hi = last // stride + 1 if last >= 0 else 0
    lo = min(lo, out)
    return lo, max(lo, min(hi, out))


# The conv kernels address flat (1-D) views of their C-contiguous arrays with explicit,
# non-negative offsets, and the inner loops below index with unsigned integers: numba
# wraps negative signed indices around (Python semantics), and that per-element branch,
# like creating a view per short row segment, costs more than the arithmetic.  LLVM
# versions the loops on the runtime steps, so step 1 runs as vector code.
@njit(inline="always", **_SERIAL_MATH)
def _axpy(dst, d0, dstep, src, s0, sstep, a, n):
    """dst[d0 + q*dstep] += a * src[s0 + q*sstep] for q < n."""
    d, ds, s, ss = np.uint64(d0), np.uint64(dstep), np.uint64(s0), np.uint64(sstep)
    for q in range(np.uint64(n)):
        dst[d + q * ds] += a * src[s + q * ss]


@njit(inline="always", **_SERIAL_MATH)
def _dot(x, x0, y, y0, ystep, n, zero):
    """sum_q x[x0 + q] * y[y0 + q*ystep] for q < n, in the dtype of ``zero``."""
    a, b, bs = np.uint64(x0), np.uint64(y0), np.uint64(ystep)
    acc = zero
    for q in range(np.uint64(n)):
        acc += x[a + q] * y[b + q * bs]
    return acc


@njit(inline="always", **_SERIAL)
def _copy(dst, d0, src, s0, sstep, n):
    """dst[d0 + q] = src[s0 + q*sstep] for q < n."""
    d, s, ss = np.uint64(d0), np.uint64(s0), np.uint64(sstep)
    for q in range(np.uint64(n)):
        dst[d + q] = src[s + q * ss]


@njit(inline="always", **_SERIAL)
def _fill(dst, d0, n, value):
    """dst[d0:d0 + n] = value."""
    d = np.uint64(d0)
    for q in range(np.uint64(n)):
        dst[d + q] = value


# --------------------------------------------------------------------------- direct conv
@njit(**_CONV)
def conv2d_direct(x, w, bias, out, sh, sw, top, left, dh, dw, groups):
    """out[n, k] = bias[k] + sum_{c, r, s} w[k, c, r, s] * x[n, g*C/G + c, oh*sh - top + r*dh, ...].

    One work item per output row (n, k, oh), so a single large image (N = C = K = 1,
    as in correlate2d) still runs on every thread.
    """
    n, c, h, wd = x.shape
    k, cpg, nr, ns = w.shape
    ho, wo = out.shape[2], out.shape[3]
    kpg = k // groups
    xf, of, wf = x.reshape(x.size), out.reshape(out.size), w.reshape(w.size)
    los, his = _spans(ns, dw, left, sw, wd, wo)
    for t in prange(n * k * ho):
        i = t // (k * ho)
        kk = (t // ho) % k
        oh = t % ho
        o0 = t * wo
        _fill(of, o0, wo, bias[kk])
        c0 = (kk // kpg) * cpg
        for cc in range(cpg):
            for r in range(nr):
                ih = oh * sh - top + r * dh
                if ih < 0 or ih >= h:
                    continue
                x0 = ((i * c + c0 + cc) * h + ih) * wd
                w0 = ((kk * cpg + cc) * nr + r) * ns
                for s in range(ns):
                    lo = los[s]
                    _axpy(of, o0 + lo, 1, xf, x0 + lo * sw + s * dw - left, sw, wf[w0 + s], his[s] - lo)


# --------------------------------------------------------------------------- 3x3, stride 1
# The common 3x3 stride-1 case on flat planes, as in the Cython backend: with the input
# zero-padded to rows of Wp = Wo + 2*dw, output (oh, ow) is flat f = oh*Wp + ow and tap (r, s)
# reads input f + r*dh*Wp + s*dw, a constant offset, so the nine taps are one straight-line
# expression per output that LLVM vectorises with the sum in a register.  The 2*dw extra
# columns per row are computed and dropped; outputs go in L1-sized segments of whole rows.

#: flat outputs accumulated at a time (16 KiB of float32); a worker's stage holds at least
#: this many and at least one padded row
FLAT_SEGMENT = 4096


@njit(inline="always", **_SERIAL)
def _pad_planes(xf, s0, planes, h, wd, pt, pl, hp, wp, plane, dst):
    """dst[p*plane + i*wp + j] = x[s0 + (p*h + i - pt)*wd + j - pl] (0 outside the h x wd
    planes), zeros in the slack after each plane; ``pt`` / ``pl`` may be negative."""
    zero = dst.dtype.type(0)
    lo = min(max(pl, 0), wp)
    hi = max(min(wd + pl, wp), lo)
    for p in range(planes):
        for i in range(hp):
            d0 = p * plane + i * wp
            ih = i - pt
            if ih < 0 or ih >= h:
                _fill(dst, d0, wp, zero)
                continue
            _fill(dst, d0, lo, zero)
            _copy(dst, d0 + lo, xf, s0 + (p * h + ih) * wd + lo - pl, 1, hi - lo)
            _fill(dst, d0 + hi, wp - hi, zero)
        _fill(dst, p * plane + hp * wp, plane - hp * wp, zero)


@njit(inline="always", **_SERIAL_MATH)
def _taps3x3(acc, xp, x0, wf, w0, a, b, n, first, add):
    """acc[f] = add + (or +=) the sum of the nine wf[w0 + r*3 + s] * xp[x0 + f + r*a + s*b], f < n
    (unsigned indices: no wrap-around branch, so the loop vectorises)."""
    w_0, w_1, w_2 = wf[w0], wf[w0 + 1], wf[w0 + 2]
    w_3, w_4, w_5 = wf[w0 + 3], wf[w0 + 4], wf[w0 + 5]
    w_6, w_7, w_8 = wf[w0 + 6], wf[w0 + 7], wf[w0 + 8]
    p0, ua, ub = np.uint64(x0), np.uint64(a), np.uint64(b)
    p1 = p0 + ua
    p2, b2 = p1 + ua, ub + ub
    if first:
        for f in range(np.uint64(n)):
            acc[f] = (add + w_0 * xp[p0 + f] + w_1 * xp[p0 + f + ub] + w_2 * xp[p0 + f + b2]
                      + w_3 * xp[p1 + f] + w_4 * xp[p1 + f + ub] + w_5 * xp[p1 + f + b2]
                      + w_6 * xp[p2 + f] + w_7 * xp[p2 + f + ub] + w_8 * xp[p2 + f + b2])
    else:
        for f in range(np.uint64(n)):
            acc[f] += (w_0 * xp[p0 + f] + w_1 * xp[p0 + f + ub] + w_2 * xp[p0 + f + b2]
                       + w_3 * xp[p1 + f] + w_4 * xp[p1 + f + ub] + w_5 * xp[p1 + f + b2]
                       + w_6 * xp[p2 + f] + w_7 * xp[p2 + f + ub] + w_8 * xp[p2 + f + b2])


@njit(**_CONV)
def conv2d_direct3x3(x, w, bias, out, xpad, stage, counter, pt, pl, dh, dw, groups):
    """3x3 stride-1 convolution on ``xpad.shape[0]`` workers, one (image, group) per work unit
    taken from the shared ``counter``.  Per worker: ``xpad`` holds the group's Cg padded
    planes of (Ho + 2*dh) * (Wo + 2*dw) + 2*dw floats, ``stage`` at least
    max(FLAT_SEGMENT, Wo + 2*dw) accumulators.  ``pt`` / ``pl`` may be negative (the input
    gradient runs this with padding 2*dil - pad and the rotated kernel)."""
    n, c, h, wd = x.shape
    k, cg = w.shape[0], w.shape[1]
    ho, wo = out.shape[2], out.shape[3]
    kg = k // groups
    hp, wp = ho + 2 * dh, wo + 2 * dw
    plane = hp * wp + 2 * dw
    rows = max(1, FLAT_SEGMENT // wp)
    xf, of, wf = x.reshape(x.size), out.reshape(out.size), w.reshape(w.size)
    units = n * groups
    for t in prange(xpad.shape[0]):
        xp, st = xpad[t], stage[t]
        u = _next_block(counter)
        while u < units:
            i, g = u // groups, u % groups
            _pad_planes(xf, (i * c + g * cg) * h * wd, cg, h, wd, pt, pl, hp, wp, plane, xp)
            for kk in range(g * kg, (g + 1) * kg):
                o0 = (i * k + kk) * ho * wo
                for oh0 in range(0, ho, rows):
                    oh1 = min(oh0 + rows, ho)
                    for cc in range(cg):
                        _taps3x3(st, xp, cc * plane + oh0 * wp, wf, (kk * cg + cc) * 9, dh * wp, dw,
                                 (oh1 - oh0) * wp, cc == 0, bias[kk])
                    for oh in range(oh0, oh1):  # keep the wo real columns of every row
                        _copy(of, o0 + oh * wo, st, (oh - oh0) * wp, 1, wo)
            u = _next_block(counter)


@njit(**_CONV)
def conv2d_backward_input_direct(gy, w, gx, sh, sw, top, left, dh, dw, groups):
    """gx[n, c, ih, iw] = sum over the (k, r, s) taps that read input pixel (ih, iw).

    One work item per input-gradient row (n, c, ih): it gathers from the output rows
    oh with oh*sh - top + r*dh == ih and scatters along the row only.
    """
    n, c, h, wd = gx.shape
    k, cpg, nr, ns = w.shape
    ho, wo = gy.shape[2], gy.shape[3]
    kpg = k // groups
    yf, xf, wf = gy.reshape(gy.size), gx.reshape(gx.size), w.reshape(w.size)
    los, his = _spans(ns, dw, left, sw, wd, wo)
    for t in prange(n * c * h):
        i = t // (c * h)
        ca = (t // h) % c
        ih = t % h
        x0 = t * wd
        _fill(xf, x0, wd, xf.dtype.type(0))
        cl = ca % cpg
        k0 = (ca // cpg) * kpg
        for r in range(nr):
            q = ih + top - r * dh
            if q < 0 or q % sh != 0:
                continue
            oh = q // sh
            if oh >= ho:
                continue
            for kk in range(k0, k0 + kpg):
                y0 = ((i * k + kk) * ho + oh) * wo
                w0 = ((kk * cpg + cl) * nr + r) * ns
                for s in range(ns):
                    lo = los[s]
                    _axpy(xf, x0 + lo * sw + s * dw - left, sw, yf, y0 + lo, 1, wf[w0 + s], his[s] - lo)


@njit(**_CONV)
def conv2d_backward_weight_direct(gy, x, gw, sh, sw, top, left, dh, dw, groups):
    """gw[k, c, r, s] = sum_{n, oh, ow} gy[n, k, oh, ow] * x[n, ., oh*sh - top + r*dh, ow*sw - left + s*dw].

    One work item per (k, c) filter plane.  Each row dot product (length out_w) is
    summed in the compute dtype and added to a float64 accumulator, so long sums
    over the batch stay accurate in float32.
    """
    n, c, h, wd = x.shape
    k, cpg, nr, ns = gw.shape
    ho, wo = gy.shape[2], gy.shape[3]
    kpg = k // groups
    zero = gw.dtype.type(0)
    yf, xf = gy.reshape(gy.size), x.reshape(x.size)
    los, his = _spans(ns, dw, left, sw, wd, wo)
    for t in prange(k * cpg):
        kk = t // cpg
        cl = t % cpg
        ca = (kk // kpg) * cpg + cl
        acc = np.zeros((nr, ns), np.float64)
        for i in range(n):
            for oh in range(ho):
                y0 = ((i * k + kk) * ho + oh) * wo
                for r in range(nr):
                    ih = oh * sh - top + r * dh
                    if ih < 0 or ih >= h:
                        continue
                    x0 = ((i * c + ca) * h + ih) * wd
                    for s in range(ns):
                        lo = los[s]
                        acc[r, s] += _dot(yf, y0 + lo, xf, x0 + lo * sw + s * dw - left, sw, his[s] - lo, zero)
        for r in range(nr):
            for s in range(ns):
                gw[kk, cl, r, s] = acc[r, s]


@njit(**_CONV)
def conv2d_backward_bias(gy, gb):
    """gb[k] = sum_{n, oh, ow} gy[n, k, oh, ow], accumulated in float64; one work item per k."""
    n, k = gy.shape[0], gy.shape[1]
    plane = gy.shape[2] * gy.shape[3]
    g3 = gy.reshape(n, k, plane)
    for kk in prange(k):
        total = 0.0
        for i in range(n):
            src = g3[i, kk]
            for o in range(plane):
                total += src[o]
        gb[kk] = total


# --------------------------------------------------------------------------- im2col + GEMM
#
# One parallel region per call.  Each of the ``cols.shape[0]`` workers (one ``prange``
# iteration each) owns one row of every scratch buffer and takes work units from a shared
# counter (``_next_block``: whichever worker is free takes the next unit).  A unit is
# ``nb`` whole images (small planes, grouped so that each GEMM has enough columns) or, with
# ``nb == 1``, a block of ``rb`` output rows of one image (so that the column block stays
# in cache; the adapter's ``_ThreadPlan`` sizes the units).  The unit's GEMMs are ``np.dot`` calls on contiguous 2-D slices, which numba lowers
# to BLAS (SciPy's OpenBLAS); the adapter pins BLAS to one thread while several workers call
# it, so no BLAS thread pool ever competes with numba's threads.
#
# Unit layout: the column matrix of ``m`` images and output rows ``oh0 .. oh1-1`` is
# (C*R*S, m*Q) with Q = (oh1 - oh0) * Wo, row (c, r, s) holding image after image; the
# matching output (gradient) block is gathered / scattered as (K, m*Q) in ``tmps``.  1x1
# stride-1 unpadded ("pointwise") layers need no lowering: each image is its own (C, H*W)
# column matrix and every GEMM reads and writes the NCHW arrays directly.


@njit(inline="always", **_SERIAL)
def _unit(u: int, per_image: int, nb: int, rb: int, n: int, ho: int) -> tuple[int, int, int, int]:
    """(first image, image count, first output row, end output row) of work unit ``u``: chunk
    ``u // per_image`` of ``nb`` images, row block ``u % per_image`` of ``rb`` rows."""
    n0 = (u // per_image) * nb
    oh0 = (u % per_image) * rb
    return n0, min(nb, n - n0), oh0, min(oh0 + rb, ho)


@njit(inline="always", **_SERIAL)
def _unfold(xf: np.ndarray, n0: int, m: int, c: int, h: int, wd: int, cf: np.ndarray, nr: int, ns: int, sh: int,
            sw: int, top: int, left: int, dh: int, dw: int, los: np.ndarray, his: np.ndarray, oh0: int, oh1: int,
            wo: int) -> None:
    """The unit's column matrix: cf[((c*R + r)*S + s)*m*Q + b*Q + (oh - oh0)*wo + ow] =
    x[n0 + b, c, oh*sh - top + r*dh, ow*sw - left + s*dw] (0 in the padding) for b < m and
    oh0 <= oh < oh1, Q = (oh1 - oh0)*wo.  A pure copy."""
    q = (oh1 - oh0) * wo
    ld = m * q
    zero = cf.dtype.type(0)
    for b in range(m):
        for ca in range(c):
            p0 = ((n0 + b) * c + ca) * h * wd
            for r in range(nr):
                for s in range(ns):
                    lo, hi = los[s], his[s]
                    d0 = ((ca * nr + r) * ns + s) * ld + b * q
                    src = p0 + lo * sw + s * dw - left
                    for oh in range(oh0, oh1):
                        ih = oh * sh - top + r * dh
                        if ih < 0 or ih >= h:
                            _fill(cf, d0, wo, zero)
                        else:
                            _fill(cf, d0, lo, zero)
                            _copy(cf, d0 + lo, xf, src + ih * wd, sw, hi - lo)
                            _fill(cf, d0 + hi, wo - hi, zero)
                        d0 += wo


@njit(inline="always", **_SERIAL)
def _fold(cf: np.ndarray, gxf: np.ndarray, n0: int, m: int, c: int, h: int, wd: int, nr: int, ns: int, sh: int,
          sw: int, top: int, left: int, dh: int, dw: int, los: np.ndarray, his: np.ndarray, oh0: int, oh1: int,
          wo: int) -> None:
    """The adjoint of :func:`_unfold` (col2im): add the unit's column matrix into gx, taps
    in (c, r, s) order."""
    q = (oh1 - oh0) * wo
    ld = m * q
    one = gxf.dtype.type(1)
    for b in range(m):
        for ca in range(c):
            p0 = ((n0 + b) * c + ca) * h * wd
            for r in range(nr):
                for s in range(ns):
                    lo, hi = los[s], his[s]
                    if hi <= lo:
                        continue
                    s0 = ((ca * nr + r) * ns + s) * ld + b * q + lo
                    dst = p0 + lo * sw + s * dw - left
                    for oh in range(oh0, oh1):
                        ih = oh * sh - top + r * dh
                        if 0 <= ih < h:
                            _axpy(gxf, dst + ih * wd, sw, cf, s0 + (oh - oh0) * wo, 1, one, hi - lo)


@njit(inline="always", **_SERIAL)
def _zero_rows(gxf: np.ndarray, n0: int, m: int, c: int, h: int, wd: int, r0: int, r1: int) -> None:
    """Zero rows r0 .. r1-1 of every channel plane of images n0 .. n0+m-1."""
    zero = gxf.dtype.type(0)
    for plane in range(n0 * c, (n0 + m) * c):
        _fill(gxf, (plane * h + r0) * wd, (r1 - r0) * wd, zero)


@njit(inline="always", **_SERIAL)
def _gather_rows(yf: np.ndarray, n0: int, m: int, k: int, p: int, o0: int, q: int, tmp: np.ndarray) -> None:
    """tmp[(kk*m + b)*q + i] = y[n0 + b, kk].flat[o0 + i] for i < q: the unit's (K, m*Q) block."""
    for b in range(m):
        for kk in range(k):
            _copy(tmp, (kk * m + b) * q, yf, ((n0 + b) * k + kk) * p + o0, 1, q)


@njit(inline="always", **_SERIAL)
def _scatter_rows(tmp: np.ndarray, of: np.ndarray, n0: int, m: int, k: int, p: int, o0: int, q: int,
                  bias: np.ndarray) -> None:
    """out[n0 + b, kk].flat[o0 + i] = tmp[(kk*m + b)*q + i] + bias[kk]: the inverse of
    :func:`_gather_rows`, plus the bias (none when ``bias`` is empty: adding 0 would turn
    -0 into +0)."""
    for b in range(m):
        for kk in range(k):
            d, s = ((n0 + b) * k + kk) * p + o0, (kk * m + b) * q
            if bias.shape[0] == 0:
                _copy(of, d, tmp, s, 1, q)
            else:
                _add_row(of, d, tmp, s, bias[kk], q)


@njit(inline="always", **_SERIAL)
def _add_row(dst: np.ndarray, d0: int, src: np.ndarray, s0: int, value: float, n: int) -> None:
    """dst[d0 + i] = src[s0 + i] + value for i < n."""
    d, s = np.uint64(d0), np.uint64(s0)
    for i in range(np.uint64(n)):
        dst[d + i] = src[s + i] + value


@njit(inline="always", **_SERIAL)
def _add_bias(of: np.ndarray, o0: int, bias: np.ndarray, p: int) -> None:
    """out.flat[o0 + kk*p + i] += bias[kk] for i < p: the bias of one image (nothing for an
    empty ``bias``)."""
    for kk in range(bias.shape[0]):
        d, bk = np.uint64(o0 + kk * p), bias[kk]
        for i in range(np.uint64(p)):
            of[d + i] += bk


@njit(inline="always", **_SERIAL)
def _forward_gemms(w2: np.ndarray, src: np.ndarray, s0: int, dst: np.ndarray, d0: int, ncols: int,
                   groups: int) -> None:
    """dst[d0:] as (K, ncols) = W (K, Cg*R*S) @ src[s0:] as (C*R*S, ncols), group by group."""
    kg, crsg = w2.shape[0] // groups, w2.shape[1]
    for g in range(groups):
        a, b = s0 + g * crsg * ncols, d0 + g * kg * ncols
        np.dot(w2[g * kg:(g + 1) * kg], src[a:a + crsg * ncols].reshape((crsg, ncols)),
               dst[b:b + kg * ncols].reshape((kg, ncols)))


@njit(inline="always", **_SERIAL)
def _input_gemms(w2: np.ndarray, src: np.ndarray, s0: int, dst: np.ndarray, d0: int, ncols: int,
                 groups: int) -> None:
    """dst[d0:] as (C*R*S, ncols) = W.T @ src[s0:] as (K, ncols), group by group."""
    kg, crsg = w2.shape[0] // groups, w2.shape[1]
    for g in range(groups):
        a, b = s0 + g * kg * ncols, d0 + g * crsg * ncols
        np.dot(w2[g * kg:(g + 1) * kg].T, src[a:a + kg * ncols].reshape((kg, ncols)),
               dst[b:b + crsg * ncols].reshape((crsg, ncols)))


@njit(inline="always", **_SERIAL)
def _weight_gemms(gsrc: np.ndarray, g0: int, csrc: np.ndarray, c0: int, ncols: int, prod: np.ndarray,
                  acc: np.ndarray, groups: int) -> None:
    """acc (K*Cg*R*S, float64) += gsrc[g0:] as (K, ncols) @ (csrc[c0:] as (C*R*S, ncols)).T,
    group by group, through the (Kg, Cg*R*S) scratch ``prod`` (``np.dot`` has no beta)."""
    kg, crsg = prod.shape[0], prod.shape[1]
    pf = prod.reshape(prod.size)
    for g in range(groups):
        a, b = g0 + g * kg * ncols, c0 + g * crsg * ncols
        np.dot(gsrc[a:a + kg * ncols].reshape((kg, ncols)), csrc[b:b + crsg * ncols].reshape((crsg, ncols)).T, prod)
        e0 = np.uint64(g * kg * crsg)
        for i in range(np.uint64(kg * crsg)):
            acc[e0 + i] += pf[i]


@njit(**_IM2COL)
def conv2d_im2col(x: np.ndarray, w2: np.ndarray, bias: np.ndarray, out: np.ndarray, cols: np.ndarray,
                  tmps: np.ndarray, counter: np.ndarray, nb: int, rb: int, nr: int, ns: int, sh: int, sw: int,
                  top: int, left: int, dh: int, dw: int, groups: int, pointwise: bool) -> None:
    """Forward convolution, ``out = conv(x, w) + bias``, by im2col + BLAS on
    ``cols.shape[0]`` workers.

    Parameters
    ----------
    x : ndarray, (N, C, H, W)
        Input.
    w2 : ndarray, (K, Cg*R*S)
        The weights as a matrix.
    bias : ndarray, (K,) or (0,)
        Added to every output of channel k; empty for none.
    out : ndarray, (N, K, Ho, Wo)
        Written in full.
    cols, tmps : ndarray, (workers, >= C*R*S * U), (workers, >= K * U)
        Per-worker column matrix and output block, U = nb*Ho*Wo if nb > 1 else rb*Wo
        (unused, any size, when ``pointwise``).
    counter : ndarray of int64, (1,)
        The shared unit counter, zero on entry.
    nb, rb : int
        Images per unit; with nb == 1, output rows per unit (else rb == Ho).
    nr, ns, sh, sw, top, left, dh, dw, groups : int
        Kernel size, stride, top / left padding, dilation, groups.
    pointwise : bool
        A 1x1 stride-1 unpadded layer (then nb == 1 and rb == Ho).
    """
    n, c, h, wd = x.shape
    k, ho, wo = out.shape[1], out.shape[2], out.shape[3]
    p = ho * wo
    xf, of = x.reshape(x.size), out.reshape(out.size)
    los, his = _spans(ns, dw, left, sw, wd, wo)
    per_image = -(-ho // rb)
    units = -(-n // nb) * per_image
    for t in prange(cols.shape[0]):
        col, tmp = cols[t], tmps[t]
        u = _next_block(counter)
        while u < units:
            n0, m, oh0, oh1 = _unit(u, per_image, nb, rb, n, ho)
            q = (oh1 - oh0) * wo
            if pointwise:
                _forward_gemms(w2, xf, n0 * c * p, of, n0 * k * p, p, groups)
                _add_bias(of, n0 * k * p, bias, p)
            else:
                _unfold(xf, n0, m, c, h, wd, col, nr, ns, sh, sw, top, left, dh, dw, los, his, oh0, oh1, wo)
                _forward_gemms(w2, col, 0, tmp, 0, m * q, groups)
                _scatter_rows(tmp, of, n0, m, k, p, oh0 * wo, q, bias)
            u = _next_block(counter)


@njit(**_IM2COL)
def conv2d_backward_input_im2col(gy: np.ndarray, w2: np.ndarray, gx: np.ndarray, cols: np.ndarray,
                                 tmps: np.ndarray, counter: np.ndarray, nb: int, rb: int, nr: int, ns: int, sh: int,
                                 sw: int, top: int, left: int, dh: int, dw: int, groups: int,
                                 pointwise: bool) -> None:
    """Input gradient by GEMM + col2im on ``cols.shape[0]`` workers; ``gx`` (N, C, H, W) is
    written in full.

    A unit is ``nb`` whole images (the column blocks of one image's row blocks overlap in
    the input rows they add to), processed ``rb`` output rows at a time when nb == 1; each
    input row is zeroed just before the first block that adds to it.  The other arguments
    are those of :func:`conv2d_im2col` (``gy`` in place of ``x``, ``tmps`` holding the
    gathered output-gradient block).
    """
    n, c, h, wd = gx.shape
    k, ho, wo = gy.shape[1], gy.shape[2], gy.shape[3]
    p = ho * wo
    yf, gxf = gy.reshape(gy.size), gx.reshape(gx.size)
    los, his = _spans(ns, dw, left, sw, wd, wo)
    units = -(-n // nb)
    for t in prange(cols.shape[0]):
        col, tmp = cols[t], tmps[t]
        u = _next_block(counter)
        while u < units:
            n0 = u * nb
            m = min(nb, n - n0)
            if pointwise:
                _input_gemms(w2, yf, n0 * k * p, gxf, n0 * c * p, p, groups)
            else:
                zeroed = 0  # input rows [0, zeroed) of the unit's planes are zero or summed into
                for oh0 in range(0, ho, rb):
                    oh1 = min(oh0 + rb, ho)
                    q = (oh1 - oh0) * wo
                    _gather_rows(yf, n0, m, k, p, oh0 * wo, q, tmp)
                    _input_gemms(w2, tmp, 0, col, 0, m * q, groups)
                    reach = min(h, (oh1 - 1) * sh - top + (nr - 1) * dh + 1)  # past the last row it adds to
                    if reach > zeroed:
                        _zero_rows(gxf, n0, m, c, h, wd, zeroed, reach)
                        zeroed = reach
                    _fold(col, gxf, n0, m, c, h, wd, nr, ns, sh, sw, top, left, dh, dw, los, his, oh0, oh1, wo)
                _zero_rows(gxf, n0, m, c, h, wd, zeroed, h)  # rows no window reaches
            u = _next_block(counter)


@njit(**_IM2COL)
def conv2d_backward_weight_im2col(gy: np.ndarray, x: np.ndarray, partial: np.ndarray, prods: np.ndarray,
                                  cols: np.ndarray, tmps: np.ndarray, counter: np.ndarray, nb: int, rb: int, nr: int,
                                  ns: int, sh: int, sw: int, top: int, left: int, dh: int, dw: int, groups: int,
                                  pointwise: bool) -> None:
    """Per-worker weight-gradient partial sums by im2col + BLAS.

    Parameters
    ----------
    partial : ndarray of float64, (workers, K * Cg*R*S)
        Zero on entry; worker t adds the products of its units into ``partial[t]`` (the
        adapter sums over workers).  Each unit's GEMM sums in the compute dtype.
    prods : ndarray, (workers, Kg, Cg*R*S)
        Per-worker scratch for one GEMM's product.
    gy, x, cols, tmps, counter, nb, rb, nr, ns, sh, sw, top, left, dh, dw, groups, pointwise
        As for :func:`conv2d_im2col` (``tmps`` holds the gathered output-gradient block).
    """
    n, c, h, wd = x.shape
    k, ho, wo = gy.shape[1], gy.shape[2], gy.shape[3]
    p = ho * wo
    yf, xf = gy.reshape(gy.size), x.reshape(x.size)
    los, his = _spans(ns, dw, left, sw, wd, wo)
    per_image = -(-ho // rb)
    units = -(-n // nb) * per_image
    for t in prange(cols.shape[0]):
        col, tmp, prod, acc = cols[t], tmps[t], prods[t], partial[t]
        u = _next_block(counter)
        while u < units:
            n0, m, oh0, oh1 = _unit(u, per_image, nb, rb, n, ho)
            q = (oh1 - oh0) * wo
            if pointwise:
                _weight_gemms(yf, n0 * k * p, xf, n0 * c * p, p, prod, acc, groups)
            else:
                _unfold(xf, n0, m, c, h, wd, col, nr, ns, sh, sw, top, left, dh, dw, los, his, oh0, oh1, wo)
                _gather_rows(yf, n0, m, k, p, oh0 * wo, q, tmp)
                _weight_gemms(tmp, 0, col, 0, m * q, prod, acc, groups)
            u = _next_block(counter)


# --------------------------------------------------------------------------- pooling
@njit(**_SERIAL)
def _first_on_grid(start: int, dil: int) -> int:
    """The first position >= 0 of ``start + i*dil`` (``start`` itself when it is >= 0)."""
    return start if start >= 0 else start + ((dil - 1 - start) // dil) * dil


#: pooling loops run over at most this many work items, each a run of output rows sharing
#: one row buffer (allocated once per item); enough for numba's static split over threads
_POOL_ITEMS = 256


@njit(**_SERIAL)
def _pool_items(rows: int) -> tuple[int, int]:
    """(items, rows per item) for a pooling loop over ``rows`` output rows."""
    items = max(1, min(rows, _POOL_ITEMS))
    return items, -(-rows // items)


@njit(inline="always", **_SERIAL)
def _phase_copy(src: np.ndarray, s: int, step: int, buf: np.ndarray, b: int, n: int) -> None:
    """buf[b + i] = src[s + i*step] for i < n (unsigned offsets)."""
    for i in range(n):
        buf[b + i] = src[s + i * step]


@njit(inline="always", **_SERIAL)
def _deinterleave(xf: np.ndarray, x0: int, wd: int, step: int, buf: np.ndarray, length: int) -> None:
    """Split the input row xf[x0 : x0 + wd] into its ``step`` phases: buf[p*length + i] =
    xf[x0 + i*step + p].  Then every pooling tap reads one phase with unit stride.

    LLVM vectorises a strided load as a gather (slow); step 2, the common case, is one loop
    over both phases, which it turns into contiguous loads and permutes."""
    x, u = np.uint64(x0), np.uint64(length)
    if step == 2:
        half = np.uint64(wd // 2)
        for i in range(half):
            buf[i] = xf[x + np.uint64(2) * i]
            buf[u + i] = xf[x + np.uint64(2) * i + np.uint64(1)]
        if wd % 2:
            buf[half] = xf[x + np.uint64(wd - 1)]
    else:
        for p in range(step):
            _phase_copy(xf, x + np.uint64(p), np.uint64(step), buf, np.uint64(p) * u,
                        np.uint64((wd - p + step - 1) // step))


@njit(inline="always", **_SERIAL)
def _phase_start(length: int, step: int, off: int, lo: int) -> int:
    """Where output column ``lo`` of a tap with input offset ``off`` (input column
    lo*step + off) reads in a row deinterleaved by :func:`_deinterleave`; consecutive
    outputs read consecutive elements from there (unsigned)."""
    phase = off % step
    return np.uint64(phase * length + lo + (off - phase) // step)


@njit(inline="always", **_SERIAL)
def _max_tap(src: np.ndarray, s0: int, sstep: int, of: np.ndarray, jf: np.ndarray, o0: int, q0: int, qstep: int,
             n: int) -> None:
    """One window tap for n consecutive outputs: v = src[s0 + r*sstep] is taken into
    (of, jf)[o0 + r] (value, flat index q0 + r*qstep) when ``v > best or v != v``.

    Branch-free (every value loaded, selects instead of jumps), so LLVM vectorises it
    (LLVM versions the loop on a unit ``sstep``)."""
    o, q = np.uint64(o0), np.int64(q0)
    for r in range(np.uint64(n)):
        v = src[s0 + r * sstep]
        best = of[o + r]
        where = jf[o + r]
        take = (v > best) | (v != v)
        of[o + r] = v if take else best
        jf[o + r] = q + np.int64(r) * qstep if take else where


@njit(**_POOL)
def max_pool2d(x: np.ndarray, out: np.ndarray, idx: np.ndarray, kh: int, kw: int, sh: int, sw: int, ph: int, pw: int,
               dh: int, dw: int) -> None:
    """Max pooling with PyTorch's rules: for each output the taps are visited row-major and
    ``v > best or isnan(v)`` takes the tap (first maximum wins ties, NaN propagates, the last
    NaN wins), padding is -inf, and the default index is the first in-range tap on the
    dilation grid.  Indices are int64 flat offsets into each (H, W) plane.

    Work items are runs of output rows (n, c, oh).  Per output row the taps are outermost:
    each in-range input row is split into its ``sw`` phases (:func:`_deinterleave`, for
    strides > 1), then each tap sweeps the contiguous range of output columns whose input
    column is in the image (:func:`_spans`) with unit-stride loads, so the inner loop
    (:func:`_max_tap`) has no bounds tests and vectorises; each output still sees its taps
    in row-major order.  ``v != v`` is the NaN test (pooling never uses fastmath).
    """
    n, c, h, wd = x.shape
    ho, wo = out.shape[2], out.shape[3]
    xf, of, jf = x.reshape(x.size), out.reshape(out.size), idx.reshape(idx.size)
    los, his = _spans(kw, dw, pw, sw, wd, wo)
    first_col = np.empty(wo, np.int64)
    for ow in range(wo):
        first_col[ow] = _first_on_grid(ow * sw - pw, dw)
    lowest = xf.dtype.type(-np.inf)
    rows = n * c * ho
    items, per_item = _pool_items(rows)
    split = sw > 1  # measured faster than strided (gathered) loads even on 14-column rows
    length = -(-wd // sw)
    for item in prange(items):
        buf = np.empty(sw * length if split else 1, xf.dtype)
        for t in range(item * per_item, min(rows, (item + 1) * per_item)):
            oh = t % ho
            p0 = (t // ho) * h * wd
            h0 = oh * sh - ph
            o0 = t * wo
            row0 = _first_on_grid(h0, dh) * wd
            _fill(of, o0, wo, lowest)
            for ow in range(wo):
                jf[np.uint64(o0 + ow)] = row0 + first_col[ow]
            for a in range(kh):
                ih = h0 + a * dh
                if ih < 0 or ih >= h:
                    continue
                x0 = p0 + ih * wd
                if split:
                    _deinterleave(xf, x0, wd, sw, buf, length)
                for b in range(kw):
                    lo, off = los[b], b * dw - pw
                    q0 = ih * wd + lo * sw + off  # flat index of output column lo's tap
                    if split:
                        _max_tap(buf, _phase_start(length, sw, off, lo), np.uint64(1), of, jf, o0 + lo, q0, sw,
                                 his[b] - lo)
                    else:
                        _max_tap(xf, np.uint64(p0 + q0), np.uint64(sw), of, jf, o0 + lo, q0, sw, his[b] - lo)


@njit(inline="always", **_SERIAL)
def _scatter_add(xf: np.ndarray, p0: int, yf: np.ndarray, jf: np.ndarray, o0: int, n: int, lo: int,
                 span: int) -> int:
    """xf[p0 + jf[o]] += yf[o] for o0 <= o < o0 + n in increasing o, skipping the indices
    outside [lo, lo + span) (one unsigned test); returns how many were skipped."""
    skipped = 0
    base, u = np.uint64(p0 + lo), np.uint64(span)
    for o in range(np.uint64(o0), np.uint64(o0 + n)):
        i = np.uint64(jf[o] - lo)
        if i < u:
            xf[base + i] += yf[o]
        else:
            skipped += 1
    return skipped


#: max_pool2d_backward scatters planes larger than this (bytes) output row by output row
_ROWWISE_BYTES = 16384


@njit(inline="always", **_SERIAL)
def _scatter_by_rows(xf: np.ndarray, p0: int, yf: np.ndarray, jf: np.ndarray, o0: int, h: int, wd: int, ho: int,
                     wo: int, kh: int, sh: int, ph: int, dh: int) -> bool:
    """Zero and scatter one plane output row by output row, each input row zeroed just before
    the first window reaches it, so that the scatter finds its rows in L1 rather than L2.
    Returns False (the plane half done) as soon as an index lies outside its window's rows;
    the caller then redoes the plane whole."""
    zero = xf.dtype.type(0)
    done = 0  # input rows [0, done) are zeroed
    for oh in range(ho):
        lo = max(oh * sh - ph, 0)
        hi = min(oh * sh - ph + (kh - 1) * dh + 1, h)
        if hi > done:
            _fill(xf, p0 + done * wd, (hi - done) * wd, zero)
            done = hi
        if _scatter_add(xf, p0, yf, jf, o0 + oh * wo, wo, lo * wd, max(hi - lo, 0) * wd):
            return False
    _fill(xf, p0 + done * wd, (h - done) * wd, zero)
    return True


@njit(**_POOL)
def max_pool2d_backward(gy: np.ndarray, idx: np.ndarray, gx: np.ndarray, kh: int, sh: int, ph: int, dh: int,
                        workers: int, counter: np.ndarray) -> None:
    """gx[n, c].flat[idx[n, c, o]] += gy[n, c, o] onto zero, in increasing o.

    Whole planes per work unit, ``workers`` workers taking chunks of planes from
    ``counter`` (int64, (1,), zero on entry).  Each plane is zeroed while in cache just
    before the scatter; planes over :data:`_ROWWISE_BYTES` go row by row
    (:func:`_scatter_by_rows`; ``kh``, ``sh``, ``ph``, ``dh``: the pooling's kernel height,
    row stride, top padding and row dilation, which give the input rows each output row's
    windows span).  ``gx`` is written in full.  Indices outside the plane are skipped (the
    API validates them; this only guarantees memory safety)."""
    n, c, h, wd = gx.shape
    ho, wo = gy.shape[2], gy.shape[3]
    plane_size, m = h * wd, ho * wo
    planes = n * c
    xf, yf, jf = gx.reshape(gx.size), gy.reshape(gy.size), idx.reshape(idx.size)
    rowwise = plane_size * gx.itemsize > _ROWWISE_BYTES
    per = max(1, planes // (16 * workers))  # planes per unit: about 16 units per worker
    units = -(-planes // per)
    for t in prange(workers):
        u = _next_block(counter)
        while u < units:
            for plane in range(u * per, min(planes, (u + 1) * per)):
                p0, o0 = plane * plane_size, plane * m
                if rowwise and _scatter_by_rows(xf, p0, yf, jf, o0, h, wd, ho, wo, kh, sh, ph, dh):
                    continue
                _fill(xf, p0, plane_size, xf.dtype.type(0))
                _scatter_add(xf, p0, yf, jf, o0, m, 0, plane_size)
            u = _next_block(counter)


@njit(**_SERIAL)
def _avg_bounds(nout, stride, pad, k, size, include_pad):
    """PyTorch's avg-pool windows along one axis: clipped start, stop, and the extent that
    counts in the divisor (the padded extent, cells added by ceil_mode excluded, when
    ``include_pad``; else the clipped one)."""
    start = np.empty(nout, np.int64)
    stop = np.empty(nout, np.int64)
    extent = np.empty(nout, np.int64)
    for o in range(nout):
        a = o * stride - pad
        b = min(a + k, size + pad)
        start[o], stop[o] = max(a, 0), min(b, size)
        extent[o] = b - a if include_pad else stop[o] - start[o]
    return start, stop, extent


#: avg_pool2d deinterleaves strided input rows only for output rows at least this long:
#: on shorter rows the vector loops hardly run and the extra pass costs more than the
#: strided loads (measured: 14 columns 1.6x slower, 56 columns 1.3-1.5x faster)
_SPLIT_MIN_COLUMNS = 32


@njit(inline="always", **_SERIAL)
def _add(dst: np.ndarray, d0: int, src: np.ndarray, s0: int, sstep: int, n: int) -> None:
    """dst[d0 + q] += src[s0 + q*sstep] for q < n (unsigned ``s0`` / ``sstep``; exact IEEE
    adds: no fastmath)."""
    d = np.uint64(d0)
    for q in range(np.uint64(n)):
        dst[d + q] += src[s0 + q * sstep]


@njit(**_POOL)
def avg_pool2d(x: np.ndarray, out: np.ndarray, kh: int, kw: int, sh: int, sw: int, ph: int, pw: int,
               include_pad: bool) -> None:
    """Average pooling with PyTorch's divisor (0 where the divisor is 0).

    Work items are runs of output rows (n, c, oh), organised as in :func:`max_pool2d`
    (taps outermost; strided input rows split into phases when the output rows are long
    enough, :data:`_SPLIT_MIN_COLUMNS`).  The window sum is accumulated in
    the compute dtype, tap by tap in row-major order (PyTorch's CPU order, which also
    accumulates in the compute dtype); the row is then divided by the divisors.
    """
    n, c, h, wd = x.shape
    ho, wo = out.shape[2], out.shape[3]
    xf, of = x.reshape(x.size), out.reshape(out.size)
    ha, hb, hext = _avg_bounds(ho, sh, ph, kh, h, include_pad)
    wa, wb, wext = _avg_bounds(wo, sw, pw, kw, wd, include_pad)
    los, his = _spans(kw, 1, pw, sw, wd, wo)
    zero = of.dtype.type(0)
    rows = n * c * ho
    items, per_item = _pool_items(rows)
    split = sw > 1 and wo >= _SPLIT_MIN_COLUMNS
    length = -(-wd // sw)
    for item in prange(items):
        buf = np.empty(sw * length if split else 1, xf.dtype)
        for t in range(item * per_item, min(rows, (item + 1) * per_item)):
            oh = t % ho
            p0 = (t // ho) * h * wd
            o0 = t * wo
            _fill(of, o0, wo, zero)
            for ih in range(ha[oh], hb[oh]):
                x0 = p0 + ih * wd
                if split:
                    _deinterleave(xf, x0, wd, sw, buf, length)
                for b in range(kw):
                    lo = los[b]
                    if split:
                        _add(of, o0 + lo, buf, _phase_start(length, sw, b - pw, lo), np.uint64(1), his[b] - lo)
                    else:
                        _add(of, o0 + lo, xf, np.uint64(x0 + lo * sw + b - pw), np.uint64(sw), his[b] - lo)
            for ow in range(wo):
                divisor = hext[oh] * wext[ow]
                o = np.uint64(o0 + ow)
                of[o] = of[o] / of.dtype.type(divisor) if divisor > 0 else zero


@njit(**_POOL)
def avg_pool2d_backward(gy, gx, kh, kw, sh, sw, ph, pw, include_pad):
    """The adjoint of :func:`avg_pool2d`.  One work item per input row (n, c, ih): it
    visits the output rows whose windows cover ih and spreads each gy / divisor over
    the window's columns, so the work is proportional to the window area."""
    n, c, h, wd = gx.shape
    ho, wo = gy.shape[2], gy.shape[3]
    yf, xf = gy.reshape(gy.size), gx.reshape(gx.size)
    ha, hb, hext = _avg_bounds(ho, sh, ph, kh, h, include_pad)
    wa, wb, wext = _avg_bounds(wo, sw, pw, kw, wd, include_pad)
    rlo, rhi = _covering(ho, ha, hb, h)  # output rows whose window covers input row i
    for t in prange(n * c * h):
        ih = t % h
        y0 = (t // h) * ho * wo
        x0 = np.uint64(t * wd)
        _fill(xf, x0, wd, xf.dtype.type(0))
        for oh in range(rlo[ih], rhi[ih]):
            for ow in range(wo):
                divisor = hext[oh] * wext[ow]
                if divisor > 0:  # divided in the compute dtype, as PyTorch does
                    v = yf[np.uint64(y0 + oh * wo + ow)] / xf.dtype.type(divisor)
                    for iw in range(np.uint64(wa[ow]), np.uint64(wb[ow])):
                        xf[x0 + iw] += v


@njit(**_SERIAL)
def _covering(nout, start, stop, size):
    """For each input index i: the range [lo, hi) of windows o with start[o] <= i < stop[o]
    (window starts and stops are non-decreasing in o)."""
    lo = np.zeros(size, np.int64)
    hi = np.zeros(size, np.int64)
    o_lo = 0
    o_hi = 0
    for i in range(size):
        while o_lo < nout and stop[o_lo] <= i:
            o_lo += 1
        while o_hi < nout and start[o_hi] <= i:
            o_hi += 1
        lo[i], hi[i] = o_lo, max(o_lo, o_hi)
    return lo, hi


# --------------------------------------------------------------------------- pooling: the flat path
#
# The common geometry -- W a multiple of the column stride and no column padding, e.g.
# 2x2/2 -- takes whole-plane work units and long loops, the design of the Cython kernels
# (``fastconv/backends/cython/_pool.pyx``).  Pooled rows are short (14 outputs for a
# 28-wide plane pooled 2x2), and loops per output row spend their time in set-up and
# remainders.  Instead a band of input rows, read as one flat run, is split into its ``sw``
# column phases by a single deinterleaving loop (phase b holds run[k*sw + b]); window tap
# (i, j) of output (oh0 + r, ow) is then element ``r*sh*Wq + ow`` (the output's lane) of
# phase ``j*dw % sw``, shifted by ``i*dh*Wq + j*dw // sw`` (Wq = W // sw), for every window
# inside the plane.  So each tap is one unit-stride loop over all the lanes of the band,
# three taps per pass with the running maximum (or sum) in registers; the lanes in between
# (rows skipped when sh > 1, columns past the last window) are computed and thrown away.
# Windows that reach into padding rows, or past the right edge (ceil_mode), are computed one
# by one.  Semantics as in the general kernels: taps in row-major order, ``v > best or
# v != v`` takes a tap, the window sum starts from +0 and adds tap by tap.

#: the flat loops run over a multiple of this many lanes (a 512-bit vector of float32)
_PAD = 16
#: output lanes per band (about 16 KiB of float32 per phase)
_BAND = 4096


@njit(inline="always", **_SERIAL)
def _padded(n: int) -> int:
    """``n`` rounded up to a multiple of :data:`_PAD`."""
    return (n + _PAD - 1) // _PAD * _PAD


@njit(inline="always", **_SERIAL)
def _max_pass(q: np.ndarray, s0: int, s1: int, s2: int, f0: np.int32, f1: np.int32, f2: np.int32,
              best: np.ndarray, boff: np.ndarray, n: int, first: bool) -> None:
    """Three taps, ``q[s + l]`` with tap offset ``f`` for (s, f) = (s0, f0), (s1, f1), (s2, f2),
    into the running maxima ``best[l]`` / offsets ``boff[l]`` for l < n, in that order
    (``first``: the window starts at tap s0).  A tap that reads a -inf lane (a spare tap of
    the last pass) never wins, so every pass has three."""
    a, b, c = np.uint64(s0), np.uint64(s1), np.uint64(s2)
    if first:
        for l in range(np.uint64(n)):
            m, o = q[a + l], f0
            v = q[b + l]
            t = (v > m) | (v != v)
            m, o = (v, f1) if t else (m, o)
            v = q[c + l]
            t = (v > m) | (v != v)
            best[l], boff[l] = (v, f2) if t else (m, o)
    else:
        for l in range(np.uint64(n)):
            m, o = best[l], boff[l]
            v = q[a + l]
            t = (v > m) | (v != v)
            m, o = (v, f0) if t else (m, o)
            v = q[b + l]
            t = (v > m) | (v != v)
            m, o = (v, f1) if t else (m, o)
            v = q[c + l]
            t = (v > m) | (v != v)
            best[l], boff[l] = (v, f2) if t else (m, o)


@njit(inline="always", **_SERIAL)
def _sum_pass(q: np.ndarray, s0: int, s1: int, s2: int, acc: np.ndarray, n: int, first: bool) -> None:
    """``acc[l] = ((acc[l] + q[s0 + l]) + q[s1 + l]) + q[s2 + l]`` for l < n, from +0 when
    ``first``.  A spare tap reads a zero lane, and adding +0 changes no sum that started
    from +0."""
    a, b, c = np.uint64(s0), np.uint64(s1), np.uint64(s2)
    zero = acc.dtype.type(0)
    if first:
        for l in range(np.uint64(n)):
            acc[l] = ((zero + q[a + l]) + q[b + l]) + q[c + l]
    else:
        for l in range(np.uint64(n)):
            acc[l] = ((acc[l] + q[a + l]) + q[b + l]) + q[c + l]


@njit(inline="always", **_SERIAL)
def _max_window(xf: np.ndarray, x0: int, h: int, wd: int, hs: int, ws: int, kh: int, kw: int, dh: int,
                dw: int) -> tuple[float, int]:
    """(maximum, flat index) of the window starting at (hs, ws) of the plane at ``x0``, every
    tap bounds-checked: -inf padding, the first in-image tap when nothing beats -inf."""
    best = xf.dtype.type(-np.inf)
    at = _first_on_grid(hs, dh) * wd + _first_on_grid(ws, dw)
    for i in range(kh):
        ih = hs + i * dh
        if 0 <= ih < h:
            for j in range(kw):
                iw = ws + j * dw
                if 0 <= iw < wd:
                    v = xf[np.uint64(x0 + ih * wd + iw)]
                    if v > best or v != v:
                        best, at = v, ih * wd + iw
    return best, at


@njit(**_POOL)
def pool2d_flat(x: np.ndarray, out: np.ndarray, idx: np.ndarray, kh: int, kw: int, sh: int, sw: int, ph: int,
                dh: int, dw: int, is_max: bool, include_pad: bool, workers: int, counter: np.ndarray) -> None:
    """Max (``is_max``) or average pooling by the flat path (see above), whole planes per unit.

    Parameters
    ----------
    x : ndarray, (N, C, H, W)
        Input; W a multiple of ``sw``, and no column padding.
    out : ndarray, (N, C, Ho, Wo)
        Written in full; its shape carries ceil_mode.
    idx : ndarray of int64, (N, C, Ho, Wo)
        Max pooling: written in full with the flat index of each maximum in its (H, W)
        plane.  Unused (any shape) for average pooling.
    kh, kw, sh, sw, ph, dh, dw : int
        Kernel size, stride, top padding (-inf for max, 0 for average; the bottom padding
        is implied by ``out``), dilation (1 for average pooling).  Every tap offset
        ``(kh-1)*dh*W + (kw-1)*dw`` fits in 32 bits.
    is_max : bool
        Max pooling; else average pooling with PyTorch's divisor rule.
    include_pad : bool
        Average pooling: whether padding counts in the divisor.
    workers : int
        Parallel workers, which take chunks of planes from ``counter`` (int64, (1,), zero
        on entry).
    """
    n, c, h, wd = x.shape
    ho, wo = out.shape[2], out.shape[3]
    planes = n * c
    xf, of, jf = x.reshape(x.size), out.reshape(out.size), idx.reshape(idx.size)
    wq = wd // sw
    reach = (kh - 1) * dh
    ra = min((ph + sh - 1) // sh, ho)  # output rows ra <= oh < rb have their windows inside vertically
    rb = max(min(ho, (h - 1 + ph - reach) // sh + 1) if h - 1 + ph >= reach else 0, ra)
    ob = min(wo, (wd - 1 - (kw - 1) * dw) // sw + 1) if wd - 1 >= (kw - 1) * dw else 0  # ... and columns ow < ob
    fband = max(1, min(rb - ra, _BAND // (sh * wq)))
    m = _padded((fband - 1) * sh * wq + ob)
    flen = m + (reach + 1) * wq + (kw - 1) * dw // sw + _PAD  # one phase of a band, with its lanes' reach
    spare = sw * flen  # m lanes of padding after the phases, read by the spare taps
    npass = (kh * kw + 2) // 3
    shift = np.full(3 * npass, spare, np.int64)
    offset = np.zeros(3 * npass, np.int32)
    for i in range(kh):
        for j in range(kw):
            shift[i * kw + j] = (j * dw % sw) * flen + i * dh * wq + j * dw // sw
            offset[i * kw + j] = i * dh * wd + j * dw
    pad = xf.dtype.type(-np.inf) if is_max else xf.dtype.type(0)
    divisor = xf.dtype.type(kh * kw)
    ha, hb, hext = _avg_bounds(ho, sh, ph, kh, h, include_pad)
    wa, wb, wext = _avg_bounds(wo, sw, 0, kw, wd, include_pad)
    per = max(1, planes // (16 * workers))  # planes per unit: about 16 units per worker
    units = -(-planes // per)
    for t in prange(workers):
        q = np.empty(spare + m, xf.dtype)
        _fill(q, spare, m, pad)
        acc = np.empty(m, xf.dtype)
        boff = np.empty(m, np.int32)
        u = _next_block(counter)
        while u < units:
            for plane in range(u * per, min(planes, (u + 1) * per)):
                x0, o0 = plane * h * wd, plane * ho * wo
                for oh0 in range(ra, rb, fband):
                    nb = min(fband, rb - oh0)
                    ih0 = oh0 * sh - ph
                    _deinterleave(xf, x0 + ih0 * wd, min(h - ih0, (nb - 1) * sh + reach + 1) * wd, sw, q, flen)
                    lanes = _padded((nb - 1) * sh * wq + ob)
                    for p in range(0, 3 * npass, 3):
                        if is_max:
                            _max_pass(q, shift[p], shift[p + 1], shift[p + 2], offset[p], offset[p + 1],
                                      offset[p + 2], acc, boff, lanes, p == 0)
                        else:
                            _sum_pass(q, shift[p], shift[p + 1], shift[p + 2], acc, lanes, p == 0)
                    for r in range(nb):
                        lane, d = np.uint64(r * sh * wq), np.uint64(o0 + (oh0 + r) * wo)
                        if is_max:
                            base = (ih0 + r * sh) * wd
                            for ow in range(np.uint64(ob)):
                                of[d + ow] = acc[lane + ow]
                                jf[d + ow] = base + np.int64(ow) * sw + boff[lane + ow]
                        else:
                            for ow in range(np.uint64(ob)):
                                of[d + ow] = acc[lane + ow] / divisor
                for oh in range(ho):
                    first_col = ob if ra <= oh < rb else 0  # the windows not done above
                    for ow in range(first_col, wo):
                        o = np.uint64(o0 + oh * wo + ow)
                        if is_max:
                            of[o], jf[o] = _max_window(xf, x0, h, wd, oh * sh - ph, ow * sw, kh, kw, dh, dw)
                        else:
                            total = xf.dtype.type(0)
                            for ih in range(ha[oh], hb[oh]):
                                for iw in range(wa[ow], wb[ow]):
                                    total += xf[np.uint64(x0 + ih * wd + iw)]
                            div = hext[oh] * wext[ow]
                            of[o] = total / xf.dtype.type(div) if div > 0 else xf.dtype.type(0)
            u = _next_block(counter)


@njit(**_POOL)
def avg_pool2d_backward_flat(gy: np.ndarray, gx: np.ndarray, kh: int, kw: int, sh: int, sw: int, ph: int,
                             include_pad: bool, workers: int, counter: np.ndarray) -> None:
    """The adjoint of average pooling by the flat layout of :func:`pool2d_flat`, for windows
    that do not overlap vertically (``kh <= sh``), so that every input row takes
    contributions from one output row only.

    Per band, the scaled gradients ``gy / (kh*kw)`` of the interior windows are laid out on
    the band's lanes (0 on the spare ones), added into zeroed phase rows tap by tap, taps in
    decreasing shift, so that each input element sums its windows in increasing output order
    (PyTorch's order; adding the spare lanes' zeros changes nothing), and the phases are
    interleaved back into the gradient rows.  Border windows (padding rows, ceil_mode
    columns) are added one by one afterwards.  ``gx`` is written in full.

    Parameters
    ----------
    gy : ndarray, (N, C, Ho, Wo)
        Output gradient.
    gx : ndarray, (N, C, H, W)
        Input gradient; W a multiple of ``sw``, no column padding.
    kh, kw, sh, sw, ph : int
        Kernel size, stride and top padding (``kh <= sh``).
    include_pad : bool
        Whether padding counts in the divisor.
    workers, counter
        As for :func:`pool2d_flat`.
    """
    n, c, h, wd = gx.shape
    ho, wo = gy.shape[2], gy.shape[3]
    planes = n * c
    yf, xf = gy.reshape(gy.size), gx.reshape(gx.size)
    wq = wd // sw
    reach = kh - 1
    ra = min((ph + sh - 1) // sh, ho)
    rb = max(min(ho, (h - 1 + ph - reach) // sh + 1) if h - 1 + ph >= reach else 0, ra)
    ob = min(wo, (wd - kw) // sw + 1) if wd >= kw else 0
    fband = max(1, min(rb - ra, _BAND // (sh * wq)))
    m = _padded((fband - 1) * sh * wq + ob)
    flen = _padded(max(m + reach * wq + (kw - 1) // sw, fband * sh * wq)) + _PAD
    ntaps = kh * kw
    shift = np.empty(ntaps, np.int64)  # in decreasing order: taps (i, j) from the last
    for t in range(ntaps):
        i, j = (ntaps - 1 - t) // kw, (ntaps - 1 - t) % kw
        shift[t] = (j % sw) * flen + i * wq + j // sw
    zero = xf.dtype.type(0)
    divisor = xf.dtype.type(kh * kw)
    ha, hb, hext = _avg_bounds(ho, sh, ph, kh, h, include_pad)
    wa, wb, wext = _avg_bounds(wo, sw, 0, kw, wd, include_pad)
    top = min(h, max(0, ra * sh - ph))  # input rows [top, bottom) are the bands'
    bottom = min(h, max(top, rb * sh - ph))
    per = max(1, planes // (16 * workers))
    units = -(-planes // per)
    for t in prange(workers):
        q = np.empty(sw * flen, xf.dtype)
        v = np.empty(m, xf.dtype)
        u = _next_block(counter)
        while u < units:
            for plane in range(u * per, min(planes, (u + 1) * per)):
                x0, y0 = plane * h * wd, plane * ho * wo
                _fill(xf, x0, top * wd, zero)
                _fill(xf, x0 + bottom * wd, (h - bottom) * wd, zero)
                for oh0 in range(ra, rb, fband):
                    nb = min(fband, rb - oh0)
                    lanes = _padded((nb - 1) * sh * wq + ob)
                    _fill(v, 0, lanes, zero)
                    for r in range(nb):
                        lane, s = np.uint64(r * sh * wq), np.uint64(y0 + (oh0 + r) * wo)
                        for ow in range(np.uint64(ob)):
                            v[lane + ow] = yf[s + ow] / divisor
                    _fill(q, 0, sw * flen, zero)
                    for tap in range(ntaps):
                        d = np.uint64(shift[tap])
                        for l in range(np.uint64(lanes)):
                            q[d + l] += v[l]
                    ih0 = oh0 * sh - ph
                    _interleave(q, flen, sw, xf, x0 + ih0 * wd, min(nb * sh, h - ih0) * wd)
                for oh in range(ho):  # the border windows, after the interior ones of their rows
                    for ow in range(ob if ra <= oh < rb else 0, wo):
                        div = hext[oh] * wext[ow]
                        if div > 0:
                            g = yf[np.uint64(y0 + oh * wo + ow)] / xf.dtype.type(div)
                            for ih in range(ha[oh], hb[oh]):
                                for iw in range(wa[ow], wb[ow]):
                                    xf[np.uint64(x0 + ih * wd + iw)] += g
            u = _next_block(counter)


@njit(inline="always", **_SERIAL)
def _interleave(q: np.ndarray, flen: int, sw: int, xf: np.ndarray, x0: int, count: int) -> None:
    """The inverse of :func:`_deinterleave`: xf[x0 + k*sw + b] = q[b*flen + k] for
    k*sw + b < count (``count`` a multiple of ``sw``)."""
    x, n = np.uint64(x0), np.uint64(count // sw)
    if sw == 2:
        f = np.uint64(flen)
        for k in range(n):
            xf[x + np.uint64(2) * k] = q[k]
            xf[x + np.uint64(2) * k + np.uint64(1)] = q[f + k]
    else:
        for b in range(np.uint64(sw)):
            for k in range(n):
                xf[x + k * np.uint64(sw) + b] = q[b * np.uint64(flen) + k]
