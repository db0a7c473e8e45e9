# cython: language_level=3
"""Max and average pooling kernels, forward and backward.

Forward kernels take one output row (plane, oh) per work unit and visit the
window taps in row-major order; for each tap they sweep the contiguous range of
output columns whose input column is inside the image (``_loops.pxd``).  Per
output element the taps are therefore seen in exactly PyTorch's order, which
decides ties (first maximum wins) and NaN propagation (``v > best or v != v``:
the last NaN wins).  Backward kernels take one (n, c) plane per work unit, so
the scatter-adds need no atomics.  The GIL is released throughout.
"""

from cython cimport floating
from cython.parallel cimport parallel, prange
from libc.math cimport INFINITY
from libc.stdint cimport int64_t
from libc.stdlib cimport free, malloc

import numpy as np

from ._loops cimport _rows_per_chunk, axpy_scatter, tap_ranges


cdef inline Py_ssize_t _first_on_grid(Py_ssize_t start, Py_ssize_t dil) noexcept nogil:
    """The first position >= 0 of ``start + i * dil`` (``start`` itself when >= 0)."""
    if start >= 0:
        return start
    return start + ((-start + dil - 1) // dil) * dil


cdef inline void _max_update(floating* best, int64_t* where, const floating* xrow, Py_ssize_t lo,
                             Py_ssize_t hi, Py_ssize_t sw, Py_ssize_t off, Py_ssize_t rowbase) noexcept nogil:
    """One window tap for output columns lo .. hi-1: take ``v`` if ``v > best or v != v``.

    Written branch-free (selects, not jumps) so the compiler can vectorise it.
    """
    cdef Py_ssize_t o, iw
    cdef floating v, b
    cdef bint take
    if sw == 1:
        for o in range(lo, hi):
            v = xrow[o + off]
            b = best[o]
            take = (v > b) | (v != v)
            best[o] = v if take else b
            where[o] = (rowbase + o + off) if take else where[o]
    else:
        for o in range(lo, hi):
            iw = o * sw + off
            v = xrow[iw]
            b = best[o]
            take = (v > b) | (v != v)
            best[o] = v if take else b
            where[o] = (rowbase + iw) if take else where[o]


def max_forward(const floating[:, :, :, ::1] x, floating[:, :, :, ::1] out, int64_t[:, :, :, ::1] idx,
                Py_ssize_t kh, Py_ssize_t kw, Py_ssize_t sh, Py_ssize_t sw, Py_ssize_t ph, Py_ssize_t pw,
                Py_ssize_t dh, Py_ssize_t dw, int nt):
    """Max pooling with PyTorch's int64 flat indices into each (H, W) plane."""
    cdef Py_ssize_t N = x.shape[0], C = x.shape[1], H = x.shape[2], W = x.shape[3]
    cdef Py_ssize_t Ho = out.shape[2], Wo = out.shape[3]
    cdef Py_ssize_t t, n, c, oh, ow, i, j, ih, hstart, h0
    cdef floating* orow
    cdef int64_t* irow
    cdef Py_ssize_t[::1] ranges = np.empty(2 * kw + Wo, np.intp)
    cdef Py_ssize_t* lo = &ranges[0]
    cdef Py_ssize_t* hi = &ranges[kw]
    cdef Py_ssize_t* w0 = &ranges[2 * kw]  # first in-range column of each window
    tap_ranges(lo, hi, kw, dw, pw, sw, W, Wo)
    for ow in range(Wo):
        w0[ow] = _first_on_grid(ow * sw - pw, dw)
    with nogil:
        for t in prange(N * C * Ho, num_threads=nt, schedule="dynamic", chunksize=_rows_per_chunk(N * C * Ho, nt)):
            oh = t % Ho
            c = (t // Ho) % C
            n = t // (Ho * C)
            orow = &out[n, c, oh, 0]
            irow = &idx[n, c, oh, 0]
            hstart = oh * sh - ph
            h0 = _first_on_grid(hstart, dh)
            for ow in range(Wo):
                orow[ow] = -INFINITY
                irow[ow] = h0 * W + w0[ow]
            for i in range(kh):
                ih = hstart + i * dh
                if ih < 0 or ih >= H:
                    continue
                for j in range(kw):
                    _max_update(orow, irow, &x[n, c, ih, 0], lo[j], hi[j], sw, j * dw - pw, ih * W)


def max_backward(const floating[:, :, :, ::1] gy, const int64_t[:, :, :, ::1] idx,
                 floating[:, :, :, ::1] gx, int nt):
    """gx[n, c].flat[idx[n, c, o]] += gy[n, c, o]; ``gx`` must be zero on entry.

    Indices outside the plane are skipped (the public API rejects them earlier).
    """
    cdef Py_ssize_t N = gx.shape[0], C = gx.shape[1], HW = gx.shape[2] * gx.shape[3]
    cdef Py_ssize_t P = gy.shape[2] * gy.shape[3]
    cdef Py_ssize_t t, o
    cdef int64_t i
    cdef floating* plane
    cdef const floating* g
    cdef const int64_t* ind
    with nogil:
        for t in prange(N * C, num_threads=nt, schedule="dynamic"):
            plane = &gx[t // C, t % C, 0, 0]
            g = &gy[t // C, t % C, 0, 0]
            ind = &idx[t // C, t % C, 0, 0]
            for o in range(P):
                i = ind[o]
                if 0 <= i < HW:
                    plane[i] += g[o]


cdef inline Py_ssize_t _avg_divisor(Py_ssize_t oh, Py_ssize_t ow, Py_ssize_t H, Py_ssize_t W,
                                    Py_ssize_t kh, Py_ssize_t kw, Py_ssize_t sh, Py_ssize_t sw,
                                    Py_ssize_t ph, Py_ssize_t pw, bint count_include_pad) noexcept nogil:
    """PyTorch's avg-pool divisor for output (oh, ow)."""
    cdef Py_ssize_t h0 = oh * sh - ph, w0 = ow * sw - pw
    cdef Py_ssize_t h1 = min(h0 + kh, H + ph), w1 = min(w0 + kw, W + pw)
    if count_include_pad:
        return (h1 - h0) * (w1 - w0)
    h0, w0, h1, w1 = max(h0, 0), max(w0, 0), min(h1, H), min(w1, W)
    return max(h1 - h0, 0) * max(w1 - w0, 0)


def avg_forward(const floating[:, :, :, ::1] x, floating[:, :, :, ::1] out,
                Py_ssize_t kh, Py_ssize_t kw, Py_ssize_t sh, Py_ssize_t sw, Py_ssize_t ph, Py_ssize_t pw,
                bint count_include_pad, int nt):
    """Average pooling with PyTorch's divisor rule (0 where the divisor is 0)."""
    cdef Py_ssize_t N = x.shape[0], C = x.shape[1], H = x.shape[2], W = x.shape[3]
    cdef Py_ssize_t Ho = out.shape[2], Wo = out.shape[3]
    cdef Py_ssize_t t, n, c, oh, ow, ih, j, off, div, hstart
    cdef floating* orow
    cdef const floating* xrow
    cdef Py_ssize_t[::1] ranges = np.empty(2 * kw, np.intp)
    cdef Py_ssize_t* lo = &ranges[0]
    cdef Py_ssize_t* hi = &ranges[kw]
    tap_ranges(lo, hi, kw, 1, pw, sw, W, Wo)
    with nogil:
        for t in prange(N * C * Ho, num_threads=nt, schedule="dynamic", chunksize=_rows_per_chunk(N * C * Ho, nt)):
            oh = t % Ho
            c = (t // Ho) % C
            n = t // (Ho * C)
            orow = &out[n, c, oh, 0]
            for ow in range(Wo):
                orow[ow] = 0
            hstart = oh * sh - ph
            for ih in range(max(hstart, 0), min(hstart + kh, H)):
                xrow = &x[n, c, ih, 0]
                for j in range(kw):
                    off = j - pw
                    for ow in range(lo[j], hi[j]):
                        orow[ow] += xrow[ow * sw + off]
            for ow in range(Wo):
                div = _avg_divisor(oh, ow, H, W, kh, kw, sh, sw, ph, pw, count_include_pad)
                orow[ow] = orow[ow] / div if div > 0 else 0


def avg_backward(const floating[:, :, :, ::1] gy, floating[:, :, :, ::1] gx,
                 Py_ssize_t kh, Py_ssize_t kw, Py_ssize_t sh, Py_ssize_t sw, Py_ssize_t ph, Py_ssize_t pw,
                 bint count_include_pad, int nt):
    """Spread gy[n, c, oh, ow] / divisor over its window; ``gx`` must be zero on entry."""
    cdef Py_ssize_t N = gx.shape[0], C = gx.shape[1], H = gx.shape[2], W = gx.shape[3]
    cdef Py_ssize_t Ho = gy.shape[2], Wo = gy.shape[3]
    cdef Py_ssize_t t, n, c, oh, ow, ih, j, div, hstart
    cdef floating* scaled = NULL
    cdef const floating* gyrow
    cdef Py_ssize_t[::1] ranges = np.empty(2 * kw, np.intp)
    cdef Py_ssize_t* lo = &ranges[0]
    cdef Py_ssize_t* hi = &ranges[kw]
    tap_ranges(lo, hi, kw, 1, pw, sw, W, Wo)
    with nogil, parallel(num_threads=nt):
        scaled = <floating*> malloc(Wo * sizeof(floating))
        for t in prange(N * C, schedule="dynamic"):
            if scaled == NULL:
                with gil:
                    raise MemoryError("avg_pool2d_backward: cannot allocate a row buffer")
            n = t // C
            c = t % C
            for oh in range(Ho):
                gyrow = &gy[n, c, oh, 0]
                for ow in range(Wo):
                    div = _avg_divisor(oh, ow, H, W, kh, kw, sh, sw, ph, pw, count_include_pad)
                    scaled[ow] = gyrow[ow] / div if div > 0 else 0
                hstart = oh * sh - ph
                for ih in range(max(hstart, 0), min(hstart + kh, H)):
                    for j in range(kw):
                        if hi[j] > lo[j]:
                            axpy_scatter(&gx[n, c, ih, lo[j] * sw + j - pw], sw, scaled + lo[j], 1, hi[j] - lo[j])
        free(scaled)
