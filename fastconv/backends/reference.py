"""The reference backend: the ground truth every other backend is tested against.

Written for obviousness, not speed.  Everything is computed in float64 and cast
to the compute dtype at the end.  A convolution is literally "for every kernel
tap (r, s): shift the padded input and multiply-accumulate"; pooling walks every
output position and every window tap in row-major order, exactly the order in
which PyTorch's CPU kernels visit them (which decides ties and NaN handling).
"""

from __future__ import annotations

import numpy as np

from .._args import ConvGeometry, PoolGeometry
from .base import Backend


def _pad(x: np.ndarray, g: ConvGeometry) -> np.ndarray:
    top, bottom, left, right = g.padding
    return np.pad(x.astype(np.float64), ((0, 0), (0, 0), (top, bottom), (left, right)))


def _tap(g: ConvGeometry, r: int, s: int) -> tuple[slice, slice]:
    """Rows and columns of the padded input that kernel tap (r, s) multiplies."""
    (sh, sw), (dh, dw) = g.stride, g.dilation
    rows = slice(r * dh, r * dh + sh * (g.out_h - 1) + 1, sh)
    cols = slice(s * dw, s * dw + sw * (g.out_w - 1) + 1, sw)
    return rows, cols


def _group_slices(g: ConvGeometry):
    for grp in range(g.groups):
        yield (slice(grp * g.c_per_group, (grp + 1) * g.c_per_group),
               slice(grp * g.k_per_group, (grp + 1) * g.k_per_group))


class ReferenceBackend(Backend):
    name = "reference"
    algorithms = ("direct",)

    def conv2d(self, x, weight, bias, g, algorithm):
        xp, w = _pad(x, g), weight.astype(np.float64)
        out = np.zeros(g.output_shape)
        for cs, ks in _group_slices(g):
            for r in range(g.r):
                for s in range(g.s):
                    rows, cols = _tap(g, r, s)
                    out[:, ks] += np.einsum("nchw,kc->nkhw", xp[:, cs, rows, cols], w[ks, :, r, s])
        if bias is not None:
            out += bias.astype(np.float64)[None, :, None, None]
        return out.astype(g.dtype)

    def conv2d_backward_input(self, grad_out, weight, g, algorithm):
        top, _, left, _ = g.padding
        gy, w = grad_out.astype(np.float64), weight.astype(np.float64)
        gxp = np.zeros((g.n, g.c, g.h + g.padding[0] + g.padding[1], g.w + g.padding[2] + g.padding[3]))
        for cs, ks in _group_slices(g):
            for r in range(g.r):
                for s in range(g.s):
                    rows, cols = _tap(g, r, s)
                    gxp[:, cs, rows, cols] += np.einsum("nkhw,kc->nchw", gy[:, ks], w[ks, :, r, s])
        return np.ascontiguousarray(gxp[:, :, top:top + g.h, left:left + g.w]).astype(g.dtype)

    def conv2d_backward_weight(self, grad_out, x, g, algorithm):
        xp, gy = _pad(x, g), grad_out.astype(np.float64)
        gw = np.zeros(g.weight_shape)
        for cs, ks in _group_slices(g):
            for r in range(g.r):
                for s in range(g.s):
                    rows, cols = _tap(g, r, s)
                    gw[ks, :, r, s] = np.einsum("nkhw,nchw->kc", gy[:, ks], xp[:, cs, rows, cols])
        return gw.astype(g.dtype)

    # ----------------------------------------------------------------- pools
    @staticmethod
    def _window(p: PoolGeometry, oh: int, ow: int):
        """In-range input rows/cols of one max-pool window, and PyTorch's default index."""
        (kh, kw), (sh, sw), (ph, pw), (dh, dw) = p.kernel, p.stride, p.padding, p.dilation
        rows = [oh * sh - ph + i * dh for i in range(kh)]
        cols = [ow * sw - pw + j * dw for j in range(kw)]
        h0 = rows[0] + -(-max(0, -rows[0]) // dh) * dh  # first row >= 0 on the dilation grid
        w0 = cols[0] + -(-max(0, -cols[0]) // dw) * dw
        return [i for i in rows if 0 <= i < p.h], [j for j in cols if 0 <= j < p.w], h0 * p.w + w0

    def max_pool2d(self, x, p):
        out = np.empty(p.output_shape)
        idx = np.empty(p.output_shape, dtype=np.int64)
        x = x.astype(np.float64)
        for oh in range(p.out_h):
            for ow in range(p.out_w):
                rows, cols, first = self._window(p, oh, ow)
                best = np.full((p.n, p.c), -np.inf)
                where = np.full((p.n, p.c), first, dtype=np.int64)
                for i in rows:
                    for j in cols:
                        v = x[:, :, i, j]
                        take = (v > best) | np.isnan(v)
                        best = np.where(take, v, best)
                        where = np.where(take, i * p.w + j, where)
                out[:, :, oh, ow], idx[:, :, oh, ow] = best, where
        return out.astype(p.dtype), idx

    def max_pool2d_backward(self, grad_out, indices, p):
        gx = np.zeros((p.n, p.c, p.h * p.w))
        gy = grad_out.astype(np.float64).reshape(p.n, p.c, -1)
        flat = indices.reshape(p.n, p.c, -1)
        for n in range(p.n):
            for c in range(p.c):
                np.add.at(gx[n, c], flat[n, c], gy[n, c])
        return gx.reshape(p.input_shape).astype(p.dtype)

    @staticmethod
    def _avg_window(p: PoolGeometry, oh: int, ow: int):
        """PyTorch's avg-pool window: (row slice, col slice, divisor)."""
        (kh, kw), (sh, sw), (ph, pw) = p.kernel, p.stride, p.padding
        h0, w0 = oh * sh - ph, ow * sw - pw
        h1, w1 = min(h0 + kh, p.h + ph), min(w0 + kw, p.w + pw)
        padded_area = (h1 - h0) * (w1 - w0)
        h0, w0, h1, w1 = max(h0, 0), max(w0, 0), min(h1, p.h), min(w1, p.w)
        divisor = padded_area if p.count_include_pad else (h1 - h0) * (w1 - w0)
        return slice(h0, max(h0, h1)), slice(w0, max(w0, w1)), divisor

    def avg_pool2d(self, x, p):
        x = x.astype(np.float64)
        out = np.zeros(p.output_shape)
        for oh in range(p.out_h):
            for ow in range(p.out_w):
                rows, cols, divisor = self._avg_window(p, oh, ow)
                if divisor > 0:
                    out[:, :, oh, ow] = x[:, :, rows, cols].sum(axis=(2, 3)) / divisor
        return out.astype(p.dtype)

    def avg_pool2d_backward(self, grad_out, p):
        gy = grad_out.astype(np.float64)
        gx = np.zeros(p.input_shape)
        for oh in range(p.out_h):
            for ow in range(p.out_w):
                rows, cols, divisor = self._avg_window(p, oh, ow)
                if divisor > 0:
                    gx[:, :, rows, cols] += (gy[:, :, oh, ow] / divisor)[:, :, None, None]
        return gx.astype(p.dtype)
