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
    """Output positions ``lo <= o < hi`` (within ``[0, out)``) with
    ``0 <= o * stride + offset < size``."""
    lo = 0 if offset >= 0 else (stride - 1 - offset) // stride
    last = size - 1 - offset
    hi = last // stride + 1 if last >= 0 else 0
    hi = min(hi, out)
    return lo, max(lo, hi)


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
@njit(**_POOL)
def max_pool2d(x, out, idx, kh, kw, sh, sw, ph, pw, dh, dw):
    """Max pooling with PyTorch's rules: taps visited row-major, ``v > best or isnan(v)``
    takes the tap (first maximum wins ties, NaN propagates, the last NaN wins), padding
    is -inf, and the default index is the first in-range tap on the dilation grid."""
    n, c, h, wd = x.shape
    ho, wo = out.shape[2], out.shape[3]
    for t in prange(n * c * ho):
        i = t // (c * ho)
        ca = (t // ho) % c
        oh = t % ho
        plane = x[i, ca]
        h0 = oh * sh - ph
        hf = h0 if h0 >= 0 else h0 + ((dh - 1 - h0) // dh) * dh
        for ow in range(wo):
            w0 = ow * sw - pw
            wf = w0 if w0 >= 0 else w0 + ((dw - 1 - w0) // dw) * dw
            best = -np.inf
            where = hf * wd + wf
            for a in range(kh):
                ih = h0 + a * dh
                if ih < 0 or ih >= h:
                    continue
                for b in range(kw):
                    iw = w0 + b * dw
                    if iw < 0 or iw >= wd:
                        continue
                    v = plane[ih, iw]
                    if v > best or np.isnan(v):
                        best = v
                        where = ih * wd + iw
            out[i, ca, oh, ow] = best
            idx[i, ca, oh, ow] = where


@njit(**_POOL)
def max_pool2d_backward(gy, idx, gx):
    """gx[n, c].flat[idx[n, c, o]] += gy[n, c, o]; one work item per (n, c) plane.

    Indices outside the plane are skipped (the API validates them; this only
    guarantees memory safety)."""
    n, c, h, wd = gx.shape
    plane = h * wd
    g2 = gx.reshape(n * c, plane)
    y2 = gy.reshape(n * c, gy.shape[2] * gy.shape[3])
    i2 = idx.reshape(n * c, gy.shape[2] * gy.shape[3])
    for t in prange(n * c):
        dst = g2[t]
        dst[:] = 0
        src = y2[t]
        ind = i2[t]
        for o in range(src.shape[0]):
            q = ind[o]
            if 0 <= q < plane:
                dst[q] += src[o]


@njit(inline="always", **_SERIAL)
def _avg_window(o, stride, pad, k, size, include_pad):
    """PyTorch's avg-pool window along one axis: (start, stop, extent counted in the divisor)."""
    a = o * stride - pad
    b = min(a + k, size + pad)
    extent = b - a
    a, b = max(a, 0), min(b, size)
    return a, b, extent if include_pad else b - a


@njit(**_POOL)
def avg_pool2d(x, out, kh, kw, sh, sw, ph, pw, include_pad):
    """Average pooling with PyTorch's divisor (cells added by ceil_mode never count);
    the window sum is accumulated in float64."""
    n, c, h, wd = x.shape
    ho, wo = out.shape[2], out.shape[3]
    for t in prange(n * c * ho):
        i = t // (c * ho)
        ca = (t // ho) % c
        oh = t % ho
        plane = x[i, ca]
        ha, hb, hext = _avg_window(oh, sh, ph, kh, h, include_pad)
        for ow in range(wo):
            wa, wb, wext = _avg_window(ow, sw, pw, kw, wd, include_pad)
            divisor = hext * wext
            total = 0.0
            if divisor > 0:
                for ih in range(ha, hb):
                    for iw in range(wa, wb):
                        total += plane[ih, iw]
                total /= divisor
            out[i, ca, oh, ow] = total


@njit(**_POOL)
def avg_pool2d_backward(gy, gx, kh, kw, sh, sw, ph, pw, include_pad):
    """The adjoint of :func:`avg_pool2d`, gathered per input row (n, c, ih): every
    window covering a pixel contributes gy / divisor (summed in float64)."""
    n, c, h, wd = gx.shape
    ho, wo = gy.shape[2], gy.shape[3]
    for t in prange(n * c * h):
        i = t // (c * h)
        ca = (t // h) % c
        ih = t % h
        row = gx[i, ca, ih]
        # windows start at o*s - p and cover k cells: o in [ceil((ih + p - k + 1) / s), (ih + p) // s]
        oh_lo = max(0, (ih + ph - kh + sh) // sh)
        oh_hi = min(ho, (ih + ph) // sh + 1)
        for iw in range(wd):
            ow_lo = max(0, (iw + pw - kw + sw) // sw)
            ow_hi = min(wo, (iw + pw) // sw + 1)
            total = 0.0
            for oh in range(oh_lo, oh_hi):
                _, _, hext = _avg_window(oh, sh, ph, kh, h, include_pad)
                for ow in range(ow_lo, ow_hi):
                    _, _, wext = _avg_window(ow, sw, pw, kw, wd, include_pad)
                    divisor = hext * wext
                    if divisor > 0:
                        total += gy[i, ca, oh, ow] / divisor
            row[iw] = total
