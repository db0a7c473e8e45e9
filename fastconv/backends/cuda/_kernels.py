"""numba.cuda kernels of the cuda backend (private).

One generic set of kernels is compiled per compute dtype by :func:`kernels`; the
dtype enters only through closure constants (the scalar type used for
accumulators and for shared/local scratch arrays), so float32 and float64 share
one source.  Every kernel walks its work with a grid-stride loop, so any problem
size is covered completely whatever grid the launcher picks (the launcher caps
the grid; see ``fastconv.backends.cuda``).  All index arithmetic is int64.

Layouts (all C-contiguous unless said otherwise):

* x (n, c, h, w), weight (k, c/groups, r, s), out (n, k, out_h, out_w);
* im2col columns ``cols[(c*R + r)*S + s, img*P + oh*Wo + ow]`` with P = Ho*Wo,
  which viewed as (groups, c/groups*R*S, nb*P) is one GEMM operand per group;
* ``geo`` is the tuple (C, H, W, K, R, S, sh, sw, pt, pl, dh, dw, G, Ho, Wo) and
  ``pool`` the tuple (kh, kw, sh, sw, ph, pw, dh, dw).

Index arithmetic shared by several kernels lives in the module-level device
functions below (flat-index unravelling, the taps that reach an input pixel).
"""

from __future__ import annotations

import functools
import math
from types import SimpleNamespace

import numba
import numpy as np
from numba import cuda

#: True when running under NUMBA_ENABLE_CUDASIM=1 (python per thread: keep blocks small)
SIMULATOR = bool(numba.config.ENABLE_CUDASIM)
if SIMULATOR:  # its shared arrays race between a block's threads without this (see _simulator)
    from ._simulator import make_shared_arrays_thread_safe

    make_shared_arrays_thread_safe()

#: GEMM thread block edge and step along the reduced axis
TILE = 4 if SIMULATOR else 16
#: GEMM register tile: each thread computes REG x REG outputs, a block (TILE*REG)^2
REG = 2 if SIMULATOR else 4
#: output channels each thread of the direct conv kernel accumulates in registers
KB = 2 if SIMULATOR else 4
#: threads per block of 1-D kernels and of the block reductions (a power of two)
THREADS = 16 if SIMULATOR else 256
#: thread block of the direct conv kernel: (width, height) of its output tile
DIRECT_BLOCK = (4, 4) if SIMULATOR else (16, 16)


# ---------------------------------------------------------------- index helpers
# Device functions shared by the kernels (dtype-independent, so defined once).
# Integer min/max are written out: the builtins fail to type in numba 0.68's
# built-in CUDA target ("Signature mismatch: 2 argument types given").


@cuda.jit(device=True)
def imin(a, b):
    return a if a < b else b


@cuda.jit(device=True)
def imax(a, b):
    return a if a > b else b


@cuda.jit(device=True)
def split(i, n):
    """``(i // n, i % n)`` for a non-negative ``i``."""
    q = i // n
    return q, i - q * n


@cuda.jit(device=True)
def unravel3(i, n2, n3):
    """Indices ``(a, b, c)`` of flat index ``i`` in a C-ordered (., n2, n3) array."""
    ab, c = split(i, n3)
    a, b = split(ab, n2)
    return a, b, c


@cuda.jit(device=True)
def unravel4(i, n1, n2, n3):
    """Indices ``(a, b, c, d)`` of flat index ``i`` in a C-ordered (., n1, n2, n3) array."""
    abc, d = split(i, n3)
    a, b, c = unravel3(abc, n1, n2)
    return a, b, c, d


@cuda.jit(device=True)
def taps_reaching(q, dil, stride, n_out, n_taps):
    """The taps of one axis that read input offset ``q`` (input index + leading padding).

    Tap ``t`` of output ``o`` reads offset ``o*stride + t*dil``, so ``t`` reaches ``q``
    when ``q - t*dil`` is ``o*stride`` for some ``0 <= o < n_out``.  Those taps are
    ``range(first, stop, step)`` (``first >= stop`` when there are none), increasing,
    and each one's output is ``(q - t*dil) // stride``.
    """
    lo = -(((n_out - 1) * stride - q) // dil)  # ceil((q - (n_out-1)*stride) / dil): o < n_out
    first = imax(lo, 0)
    stop = imin(n_taps, q // dil + 1)  # o >= 0
    a, b = stride, dil  # step = stride / gcd(stride, dil): the spacing of taps on the stride grid
    while b > 0:
        a, b = b, a % b
    step = stride // a
    k = 0
    while k < step and first < stop and (q - first * dil) % stride != 0:
        first += 1
        k += 1
    if k == step:  # no tap of this residue class lands on the grid
        first = stop
    return first, stop, step


def geometry_tuple(g) -> tuple[int, ...]:
    """The ``geo`` tuple every conv kernel takes, from a ConvGeometry."""
    top, _, left, _ = g.padding
    return (g.c, g.h, g.w, g.k, g.r, g.s, g.stride[0], g.stride[1], top, left,
            g.dilation[0], g.dilation[1], g.groups, g.out_h, g.out_w)


def pool_tuple(p) -> tuple[int, ...]:
    """The ``pool`` tuple every pool kernel takes, from a PoolGeometry:
    (kh, kw, sh, sw, ph, pw, dh, dw)."""
    return (*p.kernel, *p.stride, *p.padding, *p.dilation)


@functools.lru_cache(maxsize=None)
def kernels(dtype_name: str) -> SimpleNamespace:
    """Compile (lazily, on first launch) the kernel set for one compute dtype.

    Parameters
    ----------
    dtype_name : {"float32", "float64"}

    Returns
    -------
    types.SimpleNamespace
        The numba.cuda kernels, by name.
    """
    ftype = np.dtype(dtype_name).type  # cast/constructor usable inside kernels
    nbtype = numba.from_dtype(np.dtype(dtype_name))
    neg_inf = ftype(-np.inf)
    tile, reg, kb, threads = TILE, REG, KB, THREADS
    block_edge = TILE * REG  # GEMM block tile edge (a compile-time constant for shared arrays)

    # ------------------------------------------------------------ helpers
    @cuda.jit(device=True)
    def block_sum(sm, value):
        """Sum ``value`` over the (1-D, power-of-two sized) block; every thread gets it."""
        t = cuda.threadIdx.x
        sm[t] = value
        cuda.syncthreads()
        step = cuda.blockDim.x // 2
        while step > 0:
            if t < step:
                sm[t] += sm[t + step]
            cuda.syncthreads()
            step //= 2
        total = sm[0]
        cuda.syncthreads()  # sm may be reused right after
        return total

    @cuda.jit
    def copy4d(src, dst):
        """dst[...] = src[...] for a strided 4-D src and a C-contiguous dst."""
        i = cuda.grid(1)
        while i < dst.size:
            n, c, h, w = unravel4(i, dst.shape[1], dst.shape[2], dst.shape[3])
            dst[n, c, h, w] = src[n, c, h, w]
            i += cuda.gridsize(1)

    @cuda.jit
    def fill(flat, value):
        i = cuda.grid(1)
        while i < flat.size:
            flat[i] = value
            i += cuda.gridsize(1)

    # ------------------------------------------------------------ direct conv
    @cuda.jit
    def conv_direct(x, w, bias, out, has_bias, geo, patch_h, patch_w, items):
        """Output-stationary direct convolution.

        A block owns a tile of (blockDim.y x blockDim.x) output pixels of one image
        and ``kb`` output channels of one group; per input channel it stages the
        input patch under the tile and the ``kb`` filters' taps in shared memory
        (dynamic: patch_h*patch_w + kb*R*S elements), then each thread
        multiply-accumulates its pixel's ``kb`` outputs in registers.
        """
        C, H, W, K, R, S, sh, sw, pt, pl, dh, dw, G, Ho, Wo = geo
        cg_n, kg_n = C // G, K // G
        sm = cuda.shared.array(0, nbtype)
        acc = cuda.local.array(kb, nbtype)
        npatch = patch_h * patch_w
        ntaps = R * S
        th, tw = cuda.blockDim.y, cuda.blockDim.x
        ty, tx = cuda.threadIdx.y, cuda.threadIdx.x
        t, nthreads = ty * tw + tx, th * tw
        tiles_x = (Wo + tw - 1) // tw
        tiles_y = (Ho + th - 1) // th
        kblocks = (kg_n + kb - 1) // kb
        item = cuda.blockIdx.x
        while item < items:
            image_group, kblk, tile_y, tile_x = unravel4(item, kblocks, tiles_y, tiles_x)
            n, grp = split(image_group, G)
            oh = tile_y * th + ty
            ow = tile_x * tw + tx
            k0 = grp * kg_n + kblk * kb
            ih0 = tile_y * th * sh - pt
            iw0 = tile_x * tw * sw - pl
            for j in range(kb):
                acc[j] = ftype(0)
            for cg in range(cg_n):
                c = grp * cg_n + cg
                cuda.syncthreads()  # the previous channel's scratch is no longer read
                i = t
                while i < npatch:
                    py = i // patch_w
                    ih = ih0 + py
                    iw = iw0 + i - py * patch_w
                    v = ftype(0)
                    if ih >= 0 and ih < H and iw >= 0 and iw < W:
                        v = x[n, c, ih, iw]
                    sm[i] = v
                    i += nthreads
                i = t
                while i < kb * ntaps:
                    j = i // ntaps
                    tap = i - j * ntaps
                    r = tap // S
                    v = ftype(0)
                    if kblk * kb + j < kg_n:
                        v = w[k0 + j, cg, r, tap - r * S]
                    sm[npatch + i] = v
                    i += nthreads
                cuda.syncthreads()
                if oh < Ho and ow < Wo:
                    for r in range(R):
                        row = (ty * sh + r * dh) * patch_w + tx * sw
                        for s in range(S):
                            v = sm[row + s * dw]
                            for j in range(kb):
                                acc[j] += v * sm[npatch + j * ntaps + r * S + s]
            if oh < Ho and ow < Wo:
                for j in range(kb):
                    if kblk * kb + j < kg_n:
                        v = acc[j]
                        if has_bias:
                            v += bias[k0 + j]
                        out[n, k0 + j, oh, ow] = v
            item += cuda.gridDim.x

    @cuda.jit
    def conv_backward_input_direct(grad_out, w, grad_x, geo):
        """grad_x[n, c, h, w]: gather every (k, oh, ow, r, s) whose tap lands on (h, w)."""
        C, H, W, K, R, S, sh, sw, pt, pl, dh, dw, G, Ho, Wo = geo
        cg_n, kg_n = C // G, K // G
        i = cuda.grid(1)
        while i < grad_x.size:
            n, c, ih, iw = unravel4(i, C, H, W)
            grp, cg = split(c, cg_n)
            qh, qw = ih + pt, iw + pl
            r0, r1, rstep = taps_reaching(qh, dh, sh, Ho, R)
            s0, s1, sstep = taps_reaching(qw, dw, sw, Wo, S)
            acc = ftype(0)
            for r in range(r0, r1, rstep):
                oh = (qh - r * dh) // sh
                for s in range(s0, s1, sstep):
                    ow = (qw - s * dw) // sw
                    for kk in range(kg_n):
                        k = grp * kg_n + kk
                        acc += grad_out[n, k, oh, ow] * w[k, cg, r, s]
            grad_x[n, c, ih, iw] = acc
            i += cuda.gridsize(1)

    @cuda.jit
    def conv_backward_weight_direct(grad_out, x, grad_w, geo, n_images):
        """One block per weight element (k, cg, r, s): a block reduction over (n, oh, ow)."""
        C, H, W, K, R, S, sh, sw, pt, pl, dh, dw, G, Ho, Wo = geo
        cg_n, kg_n = C // G, K // G
        sm = cuda.shared.array(threads, nbtype)
        total = n_images * Ho * Wo
        e = cuda.blockIdx.x
        while e < grad_w.size:
            k, cg, r, s = unravel4(e, cg_n, R, S)
            c = (k // kg_n) * cg_n + cg
            acc = ftype(0)
            i = cuda.threadIdx.x
            while i < total:
                n, oh, ow = unravel3(i, Ho, Wo)
                ih = oh * sh - pt + r * dh
                iw = ow * sw - pl + s * dw
                if ih >= 0 and ih < H and iw >= 0 and iw < W:
                    acc += grad_out[n, k, oh, ow] * x[n, c, ih, iw]
                i += cuda.blockDim.x
            acc = block_sum(sm, acc)
            if cuda.threadIdx.x == 0:
                grad_w[k, cg, r, s] = acc
            e += cuda.gridDim.x

    @cuda.jit
    def channel_sum(grad_out, grad_b):
        """grad_b[k] = sum of grad_out[:, k] (one block per channel, a block reduction)."""
        n_img, k_n, hh, ww = grad_out.shape
        sm = cuda.shared.array(threads, nbtype)
        plane = hh * ww
        k = cuda.blockIdx.x
        while k < k_n:
            acc = ftype(0)
            i = cuda.threadIdx.x
            while i < n_img * plane:
                n, oh, ow = unravel3(i, hh, ww)
                acc += grad_out[n, k, oh, ow]
                i += cuda.blockDim.x
            acc = block_sum(sm, acc)
            if cuda.threadIdx.x == 0:
                grad_b[k] = acc
            k += cuda.gridDim.x

    # ------------------------------------------------------------ im2col + GEMM
    @cuda.jit
    def im2col(x, cols, geo):
        """cols[(c*R + r)*S + s, img*P + p] = padded x[img, c, oh*sh + r*dh, ow*sw + s*dw]."""
        C, H, W, K, R, S, sh, sw, pt, pl, dh, dw, G, Ho, Wo = geo
        q_n = cols.shape[1]
        i = cuda.grid(1)
        while i < cols.size:
            row, q = split(i, q_n)
            c, r, s = unravel3(row, R, S)
            img, oh, ow = unravel3(q, Ho, Wo)
            ih = oh * sh - pt + r * dh
            iw = ow * sw - pl + s * dw
            v = ftype(0)
            if ih >= 0 and ih < H and iw >= 0 and iw < W:
                v = x[img, c, ih, iw]
            cols[row, q] = v
            i += cuda.gridsize(1)

    @cuda.jit
    def col2im(cols, grad_x, geo):
        """grad_x[img, c, h, w] = sum of the column entries im2col would copy from (h, w)."""
        C, H, W, K, R, S, sh, sw, pt, pl, dh, dw, G, Ho, Wo = geo
        P = Ho * Wo
        i = cuda.grid(1)
        while i < grad_x.size:
            img, c, ih, iw = unravel4(i, C, H, W)
            qh, qw = ih + pt, iw + pl
            r0, r1, rstep = taps_reaching(qh, dh, sh, Ho, R)
            s0, s1, sstep = taps_reaching(qw, dw, sw, Wo, S)
            acc = ftype(0)
            for r in range(r0, r1, rstep):
                oh = (qh - r * dh) // sh
                for s in range(s0, s1, sstep):
                    ow = (qw - s * dw) // sw
                    acc += cols[(c * R + r) * S + s, img * P + oh * Wo + ow]
            grad_x[img, c, ih, iw] = acc
            i += cuda.gridsize(1)

    @cuda.jit(device=True)
    def stage(slab, src, z, k_major, e, i0, i_n, k0, kd):
        """Element ``e`` of one GEMM shared slab: ``slab[kk, ii]`` = operand entry
        (i0 + ii, k0 + kk), zero outside the operand.  The operand is ``src[z]``,
        stored (Kd, I) when ``k_major`` else (I, Kd); consecutive ``e`` walk its
        contiguous axis (coalesced loads)."""
        if k_major:  # src[z, k, i]: i contiguous
            kk, ii = split(e, block_edge)
        else:  # src[z, i, k]: k contiguous
            ii, kk = split(e, tile)
        i, k = i0 + ii, k0 + kk
        v = ftype(0)
        if i < i_n and k < kd:
            v = src[z, k, i] if k_major else src[z, i, k]
        slab[kk, ii] = v

    @cuda.jit
    def gemm(a, b, c, trans_a, trans_b, accumulate):
        """Batched tiled GEMM: c[z] (+)= op(a[z]) @ op(b[z]) with op = transpose when asked.

        a is (Z, M, Kd) or, with trans_a, (Z, Kd, M); b is (Z, Kd, N) or, with
        trans_b, (Z, N, Kd); c is (Z, M, N).  A TILE x TILE thread block computes a
        (TILE*REG) x (TILE*REG) block of c: per step of TILE along Kd it stages one
        slab of each operand in shared memory (loads walk each operand's contiguous
        axis), then every thread accumulates a REG x REG register tile whose rows
        and columns are TILE apart (conflict-free shared reads).
        """
        bm = block_edge
        sa = cuda.shared.array((tile, block_edge), nbtype)
        sb = cuda.shared.array((tile, block_edge), nbtype)
        acc = cuda.local.array((reg, reg), nbtype)
        ra = cuda.local.array(reg, nbtype)
        rb = cuda.local.array(reg, nbtype)
        z_n, m_n, n_n = c.shape
        kd = a.shape[1] if trans_a else a.shape[2]
        ty, tx = cuda.threadIdx.y, cuda.threadIdx.x
        t = ty * tile + tx
        slab = tile * bm
        z = cuda.blockIdx.z
        while z < z_n:
            by = cuda.blockIdx.y
            while by * bm < m_n:
                bx = cuda.blockIdx.x
                while bx * bm < n_n:
                    row0 = by * bm
                    col0 = bx * bm
                    for i in range(reg):
                        for j in range(reg):
                            acc[i, j] = ftype(0)
                    for k0 in range(0, kd, tile):
                        e = t
                        while e < slab:
                            stage(sa, a, z, trans_a, e, row0, m_n, k0, kd)  # op(a) rows
                            stage(sb, b, z, not trans_b, e, col0, n_n, k0, kd)  # op(b) columns
                            e += tile * tile
                        cuda.syncthreads()
                        for kk in range(tile):
                            for i in range(reg):
                                ra[i] = sa[kk, ty + i * tile]
                                rb[i] = sb[kk, tx + i * tile]
                            for i in range(reg):
                                for j in range(reg):
                                    acc[i, j] += ra[i] * rb[j]
                        cuda.syncthreads()
                    for i in range(reg):
                        r = row0 + ty + i * tile
                        if r < m_n:
                            for j in range(reg):
                                col = col0 + tx + j * tile
                                if col < n_n:
                                    v = acc[i, j]
                                    if accumulate:
                                        v += c[z, r, col]
                                    c[z, r, col] = v
                    bx += cuda.gridDim.x
                by += cuda.gridDim.y
            z += cuda.gridDim.z

    @cuda.jit
    def swap01(src, dst, bias, has_bias):
        """dst[i, j, p] = src[j, i, p] (+ bias[j]): (n, k, P) <-> (k, n, P) reorders."""
        j_n, p_n = dst.shape[1], dst.shape[2]
        i = cuda.grid(1)
        while i < dst.size:
            a, b, p = unravel3(i, j_n, p_n)
            v = src[b, a, p]
            if has_bias:
                v += bias[b]
            dst[a, b, p] = v
            i += cuda.gridsize(1)

    # ------------------------------------------------------------ pools
    @cuda.jit
    def max_pool(x, out, indices, pool):
        """PyTorch's max pool: taps row-major, ``v > best or isnan(v)``, padding is -inf."""
        kh, kw, sh, sw, ph, pw, dh, dw = pool
        c_n, H, W = x.shape[1], x.shape[2], x.shape[3]
        ho_n, wo_n = out.shape[2], out.shape[3]
        i = cuda.grid(1)
        while i < out.size:
            n, c, oh, ow = unravel4(i, c_n, ho_n, wo_n)
            h0 = oh * sh - ph
            w0 = ow * sw - pw
            hf = h0 if h0 >= 0 else h0 + ((-h0 + dh - 1) // dh) * dh  # first row >= 0 on the grid
            wf = w0 if w0 >= 0 else w0 + ((-w0 + dw - 1) // dw) * dw
            best = neg_inf
            where = hf * W + wf
            for a in range(kh):
                ih = h0 + a * dh
                if ih < 0 or ih >= H:
                    continue
                for b in range(kw):
                    iw = w0 + b * dw
                    if iw < 0 or iw >= W:
                        continue
                    v = x[n, c, ih, iw]
                    if v > best or v != v:
                        best = v
                        where = ih * W + iw
            out[n, c, oh, ow] = best
            indices[n, c, oh, ow] = where
            i += cuda.gridsize(1)

    @cuda.jit
    def max_pool_backward(grad_out, indices, grad_x_flat, plane, bad):
        """Scatter-add grad_out to its argmax (atomic: windows may share a maximum).
        An index outside [0, plane) is skipped and flagged in ``bad[0]``."""
        c_n, ho_n, wo_n = grad_out.shape[1], grad_out.shape[2], grad_out.shape[3]
        i = cuda.grid(1)
        while i < grad_out.size:
            n, c, oh, ow = unravel4(i, c_n, ho_n, wo_n)
            where = indices[n, c, oh, ow]
            if where >= 0 and where < plane:
                cuda.atomic.add(grad_x_flat, (n * c_n + c) * plane + where, grad_out[n, c, oh, ow])
            else:
                bad[0] = 1
            i += cuda.gridsize(1)

    @cuda.jit(device=True)
    def avg_divisor(h0, w0, kh, kw, H, W, ph, pw, count_include_pad):
        """PyTorch's avg-pool divisor for the window starting at (h0, w0)."""
        h1 = imin(h0 + kh, H + ph)
        w1 = imin(w0 + kw, W + pw)
        if count_include_pad:
            return (h1 - h0) * (w1 - w0)
        return (imin(h1, H) - imax(h0, 0)) * (imin(w1, W) - imax(w0, 0))

    @cuda.jit
    def avg_pool(x, out, pool, count_include_pad):
        kh, kw, sh, sw, ph, pw, _, _ = pool
        c_n, H, W = x.shape[1], x.shape[2], x.shape[3]
        ho_n, wo_n = out.shape[2], out.shape[3]
        i = cuda.grid(1)
        while i < out.size:
            n, c, oh, ow = unravel4(i, c_n, ho_n, wo_n)
            h0 = oh * sh - ph
            w0 = ow * sw - pw
            div = avg_divisor(h0, w0, kh, kw, H, W, ph, pw, count_include_pad)
            acc = ftype(0)
            for ih in range(imax(h0, 0), imin(h0 + kh, H)):
                for iw in range(imax(w0, 0), imin(w0 + kw, W)):
                    acc += x[n, c, ih, iw]
            out[n, c, oh, ow] = acc / ftype(div) if div > 0 else ftype(0)
            i += cuda.gridsize(1)

    @cuda.jit
    def avg_pool_backward(grad_out, grad_x, pool, count_include_pad):
        """grad_x[n, c, h, w]: gather grad_out / divisor over the windows holding (h, w)."""
        kh, kw, sh, sw, ph, pw, _, _ = pool
        c_n, H, W = grad_x.shape[1], grad_x.shape[2], grad_x.shape[3]
        ho_n, wo_n = grad_out.shape[2], grad_out.shape[3]
        i = cuda.grid(1)
        while i < grad_x.size:
            n, c, ih, iw = unravel4(i, c_n, H, W)
            # windows oh with oh*sh - ph <= ih < oh*sh - ph + kh
            oh_lo = imax(0, (ih + ph - kh + sh) // sh)
            oh_hi = imin(ho_n - 1, (ih + ph) // sh)
            ow_lo = imax(0, (iw + pw - kw + sw) // sw)
            ow_hi = imin(wo_n - 1, (iw + pw) // sw)
            acc = ftype(0)
            for oh in range(oh_lo, oh_hi + 1):
                for ow in range(ow_lo, ow_hi + 1):
                    div = avg_divisor(oh * sh - ph, ow * sw - pw, kh, kw, H, W, ph, pw, count_include_pad)
                    if div > 0:
                        acc += grad_out[n, c, oh, ow] / ftype(div)
            grad_x[n, c, ih, iw] = acc
            i += cuda.gridsize(1)

    return SimpleNamespace(
        copy4d=copy4d, fill=fill, conv_direct=conv_direct,
        conv_backward_input_direct=conv_backward_input_direct,
        conv_backward_weight_direct=conv_backward_weight_direct, channel_sum=channel_sum,
        im2col=im2col, col2im=col2im, gemm=gemm, swap01=swap01,
        max_pool=max_pool, max_pool_backward=max_pool_backward,
        avg_pool=avg_pool, avg_pool_backward=avg_pool_backward,
    )


def blocks_for(work: int, per_block: int, cap: int) -> int:
    """Blocks covering ``work`` items at ``per_block`` each, at most ``cap`` (grid-stride covers the rest)."""
    return max(1, min(cap, math.ceil(work / per_block)))
