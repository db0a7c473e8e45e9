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
  input-gradient rows, weight-gradient entries, image planes), so there are no races.
* Convolution kernels use ``fastmath={"contract", "reassoc"}``: fused multiply-add and
  reordered sums (vectorised reductions) change only the rounding; no flag assumes
  finite values, so NaN and inf propagate as IEEE says.  Pooling kernels use no
  fastmath at all (max pooling's NaN rule depends on exact comparisons).
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

_CONV = dict(parallel=True, cache=True, nogil=True, fastmath={"contract", "reassoc"})
_POOL = dict(parallel=True, cache=True, nogil=True)
_SERIAL = dict(cache=True, nogil=True)
_SERIAL_MATH = dict(cache=True, nogil=True, fastmath={"contract", "reassoc"})


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


# --------------------------------------------------------------------------- im2col
@njit(**_POOL)
def im2col(x, n0, cols, nr, ns, sh, sw, top, left, dh, dw, ho, wo):
    """Fill cols[(c*R + r)*S + s, j*L + oh*wo + ow] = x[n0 + j, c, ih, iw] (0 in the padding).

    ``cols`` has shape (C*R*S, nb*L) with L = ho*wo: one GEMM then covers nb images.
    One work item per input plane (j, c), which it reads R*S times while it is in cache.
    A pure copy, so no fastmath is needed.
    """
    _, c, h, wd = x.shape
    ll = ho * wo
    nb = cols.shape[1] // ll
    xf, cf = x.reshape(x.size), cols.reshape(cols.size)
    zero = cf.dtype.type(0)
    los, his = _spans(ns, dw, left, sw, wd, wo)
    for t in prange(nb * c):
        j = t // c
        ca = t % c
        p0 = ((n0 + j) * c + ca) * h * wd
        for r in range(nr):
            for s in range(ns):
                lo, hi = los[s], his[s]
                d0 = (((ca * nr + r) * ns + s) * nb + j) * ll
                for oh in range(ho):
                    ih = oh * sh - top + r * dh
                    if ih < 0 or ih >= h:
                        _fill(cf, d0, wo, zero)
                    else:
                        _fill(cf, d0, lo, zero)
                        _copy(cf, d0 + lo, xf, p0 + ih * wd + lo * sw + s * dw - left, sw, hi - lo)
                        _fill(cf, d0 + hi, wo - hi, zero)
                    d0 += wo


@njit(**_CONV)
def col2im(cols, gx, n0, nr, ns, sh, sw, top, left, dh, dw, ho, wo):
    """The adjoint of :func:`im2col`: gx[n0 + j, c] = scatter-add of the column rows of c.

    One work item per image plane (j, c), so no two items write the same pixel.
    """
    _, c, h, wd = gx.shape
    ll = ho * wo
    nb = cols.shape[1] // ll
    cf, xf = cols.reshape(cols.size), gx.reshape(gx.size)
    los, his = _spans(ns, dw, left, sw, wd, wo)
    one = gx.dtype.type(1)
    for t in prange(nb * c):
        j = t // c
        ca = t % c
        p0 = ((n0 + j) * c + ca) * h * wd
        _fill(xf, p0, h * wd, xf.dtype.type(0))
        for r in range(nr):
            for s in range(ns):
                src0 = (((ca * nr + r) * ns + s) * nb + j) * ll
                lo = los[s]
                for oh in range(ho):
                    ih = oh * sh - top + r * dh
                    if ih < 0 or ih >= h:
                        continue
                    _axpy(xf, p0 + ih * wd + lo * sw + s * dw - left, sw, cf, src0 + oh * wo + lo, 1, one,
                          his[s] - lo)


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


@njit(**_POOL)
def max_pool2d_backward(gy, idx, gx):
    """gx[n, c].flat[idx[n, c, o]] += gy[n, c, o]; one work item per (n, c) plane.

    Indices outside the plane are skipped (the API validates them; this only
    guarantees memory safety)."""
    n, c, h, wd = gx.shape
    plane = h * wd
    m = gy.shape[2] * gy.shape[3]
    xf, yf, jf = gx.reshape(gx.size), gy.reshape(gy.size), idx.reshape(idx.size)
    for t in prange(n * c):
        p0 = np.uint64(t * plane)
        _fill(xf, p0, plane, xf.dtype.type(0))
        for o in range(np.uint64(t * m), np.uint64((t + 1) * m)):
            q = jf[o]
            if 0 <= q < plane:
                xf[p0 + np.uint64(q)] += yf[o]


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
                if divisor > 0:
                    v = yf[np.uint64(y0 + oh * wo + ow)] / divisor
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
