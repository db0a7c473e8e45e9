"""The pure-NumPy backend: im2col + ``numpy.matmul`` (BLAS), col2im for the backward pass.

Always available (needs nothing beyond NumPy), so it is the fallback of
``backend="auto"``.  Column buffers are built for a chunk of the batch at a time
so that they never exceed :func:`fastconv.get_workspace_limit`.
"""

from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import as_strided

from .. import _config
from .._args import ConvGeometry, PoolGeometry
from .base import Backend


# --------------------------------------------------------------------------- conv helpers


def _padded(x: np.ndarray, g: ConvGeometry) -> np.ndarray:
    top, bottom, left, right = g.padding
    if not any(g.padding):
        return x
    return np.pad(x, ((0, 0), (0, 0), (top, bottom), (left, right)))


def _columns(xp: np.ndarray, g: ConvGeometry) -> np.ndarray:
    """im2col of a padded chunk: (n, groups, C/g * R * S, Ho * Wo), C-contiguous."""
    n = xp.shape[0]
    sn, sc, sh, sw = xp.strides
    (st_h, st_w), (dh, dw) = g.stride, g.dilation
    cg = g.c_per_group
    view = as_strided(
        xp,
        shape=(n, g.groups, cg, g.r, g.s, g.out_h, g.out_w),
        strides=(sn, cg * sc, sc, dh * sh, dw * sw, st_h * sh, st_w * sw),
        writeable=False,
    )
    return view.reshape(n, g.groups, cg * g.r * g.s, g.out_h * g.out_w)


def _col2im(cols: np.ndarray, g: ConvGeometry) -> np.ndarray:
    """Scatter-add columns (n, C, R, S, Ho, Wo) back to an input-shaped gradient."""
    n = cols.shape[0]
    top, bottom, left, right = g.padding
    (sh, sw), (dh, dw) = g.stride, g.dilation
    gxp = np.zeros((n, g.c, g.h + top + bottom, g.w + left + right), dtype=cols.dtype)
    for r in range(g.r):
        for s in range(g.s):
            gxp[:, :, r * dh: r * dh + sh * (g.out_h - 1) + 1: sh,
                s * dw: s * dw + sw * (g.out_w - 1) + 1: sw] += cols[:, :, r, s]
    return gxp[:, :, top: top + g.h, left: left + g.w]


def _chunks(g: ConvGeometry):
    """Batch slices whose column buffer fits in the workspace limit."""
    per_image = g.c * g.r * g.s * g.out_h * g.out_w * g.dtype.itemsize
    step = _config.batch_chunk(per_image, g.n)
    for start in range(0, g.n, step):
        yield slice(start, min(g.n, start + step))


# --------------------------------------------------------------------------- pool helpers


def _pool_windows(x: np.ndarray, p: PoolGeometry, fill: float) -> np.ndarray:
    """Strided view (n, c, Ho, Wo, kh, kw) of ``x`` padded with ``fill`` (far enough
    on the bottom/right for ceil_mode windows)."""
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = p.kernel, p.stride, p.padding, p.dilation
    need_h = (p.out_h - 1) * sh + (kh - 1) * dh + 1
    need_w = (p.out_w - 1) * sw + (kw - 1) * dw + 1
    bottom, right = max(0, need_h - p.h - ph), max(0, need_w - p.w - pw)
    xp = np.pad(x, ((0, 0), (0, 0), (ph, bottom), (pw, right)), constant_values=fill)
    sn, sc, s_h, s_w = xp.strides
    return as_strided(xp, shape=(p.n, p.c, p.out_h, p.out_w, kh, kw),
                      strides=(sn, sc, sh * s_h, sw * s_w, dh * s_h, dw * s_w), writeable=False)


def _tap_index_map(p: PoolGeometry) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per (Ho, Wo, tap): the flat input index, whether it is in range, and PyTorch's
    default index (the first in-range tap) per (Ho, Wo)."""
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = p.kernel, p.stride, p.padding, p.dilation
    rows = np.arange(p.out_h)[:, None] * sh - ph + np.arange(kh)[None, :] * dh  # (Ho, kh)
    cols = np.arange(p.out_w)[:, None] * sw - pw + np.arange(kw)[None, :] * dw  # (Wo, kw)
    flat = rows[:, None, :, None] * p.w + cols[None, :, None, :]  # (Ho, Wo, kh, kw)
    valid = ((rows >= 0) & (rows < p.h))[:, None, :, None] & ((cols >= 0) & (cols < p.w))[None, :, None, :]
    first_row = rows[:, 0] + -(-np.maximum(0, -rows[:, 0]) // dh) * dh
    first_col = cols[:, 0] + -(-np.maximum(0, -cols[:, 0]) // dw) * dw
    default = first_row[:, None] * p.w + first_col[None, :]
    taps = kh * kw
    return flat.reshape(p.out_h, p.out_w, taps), valid.reshape(p.out_h, p.out_w, taps), default


def _avg_divisor(p: PoolGeometry) -> np.ndarray:
    """PyTorch's avg-pool divisor for every output position, shape (Ho, Wo)."""

    def axis(out: int, k: int, s: int, pad: int, size: int) -> tuple[np.ndarray, np.ndarray]:
        start = np.arange(out) * s - pad
        end = np.minimum(start + k, size + pad)
        padded = end - start
        inside = np.minimum(end, size) - np.maximum(start, 0)
        return padded, inside

    ph_, ih_ = axis(p.out_h, p.kernel[0], p.stride[0], p.padding[0], p.h)
    pw_, iw_ = axis(p.out_w, p.kernel[1], p.stride[1], p.padding[1], p.w)
    return np.outer(ph_, pw_) if p.count_include_pad else np.outer(ih_, iw_)


class NumpyBackend(Backend):
    name = "numpy"
    algorithms = ("im2col",)

    def conv2d(self, x, weight, bias, g, algorithm):
        out = np.empty(g.output_shape, dtype=g.dtype)
        w = weight.reshape(g.groups, g.k_per_group, -1)
        for chunk in _chunks(g):
            cols = _columns(_padded(x[chunk], g), g)
            out[chunk] = np.matmul(w, cols).reshape(-1, g.k, g.out_h, g.out_w)
        if bias is not None:
            out += bias[None, :, None, None]
        return out

    def conv2d_backward_input(self, grad_out, weight, g, algorithm):
        gx = np.empty(g.input_shape, dtype=g.dtype)
        wt = weight.reshape(g.groups, g.k_per_group, -1).transpose(0, 2, 1)
        for chunk in _chunks(g):
            gy = grad_out[chunk].reshape(-1, g.groups, g.k_per_group, g.out_h * g.out_w)
            cols = np.matmul(wt, gy).reshape(-1, g.c, g.r, g.s, g.out_h, g.out_w)
            gx[chunk] = _col2im(cols, g)
        return gx

    def conv2d_backward_weight(self, grad_out, x, g, algorithm):
        gw = np.zeros((g.groups, g.k_per_group, g.c_per_group * g.r * g.s), dtype=g.dtype)
        for chunk in _chunks(g):
            cols = _columns(_padded(x[chunk], g), g)
            gy = grad_out[chunk].reshape(-1, g.groups, g.k_per_group, g.out_h * g.out_w)
            gw += np.matmul(gy, cols.transpose(0, 1, 3, 2)).sum(axis=0)
        return gw.reshape(g.weight_shape)

    def max_pool2d(self, x, p):
        windows = _pool_windows(x, p, -np.inf).reshape(p.n, p.c, p.out_h, p.out_w, -1)
        flat, valid, default = _tap_index_map(p)
        values = np.where(valid, windows, -np.inf)
        nan = np.isnan(values)
        has_nan = nan.any(axis=-1)
        taps = values.shape[-1]
        tap = np.where(has_nan, taps - 1 - np.argmax(nan[..., ::-1], axis=-1), np.argmax(values, axis=-1))
        out = np.take_along_axis(values, tap[..., None], axis=-1)[..., 0]
        idx = np.take_along_axis(np.broadcast_to(flat, values.shape), tap[..., None], axis=-1)[..., 0]
        idx = np.where((out == -np.inf) & ~has_nan, default, idx)
        return np.ascontiguousarray(out, dtype=p.dtype), np.ascontiguousarray(idx, dtype=np.int64)

    def max_pool2d_backward(self, grad_out, indices, p):
        plane = p.h * p.w
        gx = np.zeros(p.n * p.c * plane, dtype=p.dtype)
        offsets = (np.arange(p.n * p.c, dtype=np.int64) * plane)[:, None]
        flat = (indices.reshape(p.n * p.c, -1) + offsets).ravel()
        gx += np.bincount(flat, weights=grad_out.ravel(), minlength=gx.size).astype(p.dtype)
        return gx.reshape(p.input_shape)

    def avg_pool2d(self, x, p):
        sums = _pool_windows(x, p, 0.0).sum(axis=(-2, -1))
        divisor = _avg_divisor(p)
        with np.errstate(invalid="ignore", divide="ignore"):
            out = np.where(divisor > 0, sums / np.maximum(divisor, 1), 0.0)
        return np.ascontiguousarray(out, dtype=p.dtype)

    def avg_pool2d_backward(self, grad_out, p):
        (kh, kw), (sh, sw), (ph, pw) = p.kernel, p.stride, p.padding
        divisor = _avg_divisor(p)
        share = np.where(divisor > 0, grad_out / np.maximum(divisor, 1), 0.0).astype(p.dtype)
        need_h, need_w = (p.out_h - 1) * sh + kh, (p.out_w - 1) * sw + kw
        gxp = np.zeros((p.n, p.c, max(need_h, p.h + ph), max(need_w, p.w + pw)), dtype=p.dtype)
        for i in range(kh):
            for j in range(kw):
                gxp[:, :, i: i + sh * (p.out_h - 1) + 1: sh, j: j + sw * (p.out_w - 1) + 1: sw] += share
        return np.ascontiguousarray(gxp[:, :, ph: ph + p.h, pw: pw + p.w])
