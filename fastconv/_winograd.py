"""Winograd minimal filtering F(m x m, 3 x 3): the transforms shared by every backend.

A 3x3 convolution with stride 1 computes an m x m block of outputs from an
a x a input tile (a = m + 2) as

    Y = A^T [ (G w G^T) (.) (B^T d B) ] A                       (.) = elementwise

so each output block costs a*a multiplications per (input, output) channel pair
instead of 9*m*m: 36 instead of 144 for m = 4.  Summed over the input channels,
the elementwise products become a*a independent GEMMs

    M[xi] (K, tiles) = U[xi] (K, C) @ V[xi] (C, tiles),   U = G w G^T,  V = B^T d B.

The backward passes reuse the same pieces:

* input gradient: a forward Winograd convolution of ``grad_out`` with the
  kernel rotated by 180 degrees and its channel axes swapped, padding
  ``dil * 2 - pad``;
* weight gradient: ``dU[xi] = sum over tiles of (A dY A^T)[xi] (K, tiles) @ V[xi]^T``,
  then ``dw = G^T dU G`` (the exact gradient of the forward algorithm).

Dilation d is handled by tiling each residue class of output positions
separately: a tile then covers outputs ``start + d*i`` and reads inputs
``start - pad + d*j``, an ordinary dense 3x3 problem.

The matrices come from the Cook-Toom construction on the points listed in
:data:`POINTS` (plus infinity), computed exactly with fractions; :func:`matrices`
checks the defining identity before returning them.  This module holds the
weight-side transforms in NumPy (the specification the backends' compiled ones
are tested against: they run on every call) and the planning; the per-tile
input and output transforms (B^T and A^T of ``matrices(TILE)``, written out as
formulas) and the GEMMs are the backends' kernels.
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction
from functools import lru_cache

import numpy as np

from ._args import ConvGeometry
from ._buffers import aligned_rows

#: kernel size the transforms are built for
R = 3
#: Cook-Toom interpolation points (infinity is always added) per output tile size m
POINTS: dict[int, tuple[Fraction, ...]] = {
    2: (Fraction(0), Fraction(1), Fraction(-1)),
    4: (Fraction(0), Fraction(1), Fraction(-1), Fraction(2), Fraction(-2)),
}
#: the output tile size of the compiled kernels: F(4x4, 3x3) (F(6x6, 3x3) would exceed the
#: float32 error bar of 1e-5; F(2x2, 3x3) saves 2.25x instead of 4x)
TILE = 4


@dataclass(frozen=True)
class Transforms:
    """The matrices of F(m x m, 3 x 3) in float64: ``at`` (m, a), ``g`` (a, 3), ``bt`` (a, a)."""

    m: int
    at: np.ndarray
    g: np.ndarray
    bt: np.ndarray

    @property
    def a(self) -> int:
        """Input tile size m + 2."""
        return self.m + R - 1

    @property
    def gg(self) -> np.ndarray:
        """kron(G, G) (a*a, 9): maps a flattened 3x3 kernel to its flattened a x a transform."""
        return _kron(self.m)


def _solve_exact(rows: list[list[Fraction]], rhs: list[Fraction]) -> list[Fraction]:
    """The unique solution of an over-determined but consistent linear system (Gauss-Jordan)."""
    n = len(rows[0])
    aug = [list(r) + [b] for r, b in zip(rows, rhs)]
    pivot_row = 0
    for col in range(n):
        pick = next((i for i in range(pivot_row, len(aug)) if aug[i][col] != 0), None)
        if pick is None:
            raise ArithmeticError("Winograd construction: singular system")
        aug[pivot_row], aug[pick] = aug[pick], aug[pivot_row]
        p = aug[pivot_row][col]
        aug[pivot_row] = [v / p for v in aug[pivot_row]]
        for i in range(len(aug)):
            if i != pivot_row and aug[i][col] != 0:
                f = aug[i][col]
                aug[i] = [v - f * u for v, u in zip(aug[i], aug[pivot_row])]
        pivot_row += 1
    if any(v != 0 for row in aug[pivot_row:] for v in row):
        raise ArithmeticError("Winograd construction: inconsistent system")
    return [aug[i][n] for i in range(n)]


@lru_cache(maxsize=None)
def _exact(m: int) -> tuple[tuple[tuple[Fraction, ...], ...], ...]:
    points = POINTS[m]
    a = m + R - 1
    if len(points) != a - 1:
        raise ValueError(f"F({m}, {R}) needs {a - 1} finite points, got {len(points)}")
    at = [[p**i for p in points] + [Fraction(int(i == m - 1))] for i in range(m)]
    g = []
    for j, p in enumerate(points):
        norm = Fraction(1)
        for q_index, q in enumerate(points):
            if q_index != j:
                norm *= p - q
        g.append([p**k / norm for k in range(R)])
    g.append([Fraction(int(k == R - 1)) for k in range(R)])
    # B^T is fixed by the 1-D identity sum_j AT[i][j] G[j][k] BT[j][l] = [l == i + k]
    coeff = [[at[i][j] * g[j][k] for j in range(a)] for i in range(m) for k in range(R)]
    columns = [_solve_exact(coeff, [Fraction(int(l == i + k)) for i in range(m) for k in range(R)])
               for l in range(a)]
    bt = [[columns[l][j] for l in range(a)] for j in range(a)]
    return tuple(map(tuple, at)), tuple(map(tuple, g)), tuple(map(tuple, bt))


@lru_cache(maxsize=None)
def _kron(m: int) -> np.ndarray:
    g = matrices(m).g
    gg = np.kron(g, g)
    gg.flags.writeable = False
    return gg


@lru_cache(maxsize=None)
def matrices(m: int) -> Transforms:
    """The transform matrices of F(m x m, 3 x 3), ``m`` a key of :data:`POINTS`.

    Verified exactly: ``A^T[(G g) * (B^T d)]`` equals the 1-D correlation of ``d``
    with ``g`` as polynomials in the entries (checked on the coefficient identity).
    """
    if m not in POINTS:
        raise ValueError(f"Winograd tile size must be one of {tuple(POINTS)}, got {m}")
    at, g, bt = _exact(m)
    a = m + R - 1
    for i in range(m):
        for k in range(R):
            for l in range(a):
                if sum(at[i][j] * g[j][k] * bt[j][l] for j in range(a)) != int(l == i + k):
                    raise ArithmeticError(f"F({m}, {R}) transforms fail the identity")  # pragma: no cover
    as_array = lambda rows: np.array([[float(v) for v in row] for row in rows])  # noqa: E731
    return Transforms(m, as_array(at), as_array(g), as_array(bt))


def unsupported_geometry(g: ConvGeometry) -> str | None:
    """Why the Winograd transforms do not apply to this geometry (None when they do)."""
    if (g.r, g.s) != (R, R):
        return f"a {R}x{R} kernel (got {g.r}x{g.s})"
    if g.stride != (1, 1):
        return f"stride 1 (got {g.stride})"
    if g.dilation[0] != g.dilation[1]:
        return f"equal dilations (got {g.dilation})"
    return None


@lru_cache(maxsize=256)
def tile_starts(n_out: int, m: int, d: int) -> np.ndarray:
    """First output index of every tile along one axis: residue class by residue class,
    tile ``j`` of residue ``rho`` starts at ``rho + d*m*j`` and covers ``start + d*i``, i < m.
    (Cached: the array is read-only.)"""
    starts = [rho + d * m * j for rho in range(min(d, n_out)) for j in range(-(-((n_out - rho + d - 1) // d) // m))]
    table = np.array(starts, dtype=np.intp)
    table.flags.writeable = False
    return table


def transform_weight(w: np.ndarray, t: Transforms, groups: int, dtype: np.dtype) -> np.ndarray:
    """U = G w G^T for every (out, in) channel pair: (groups, a*a, K/groups, C/groups), C-contiguous.

    One GEMM with kron(G, G) (a*a x 9), computed in float64 and rounded once.  The
    specification of the backends' compiled ``transform_weight``.
    """
    k, cg = w.shape[:2]
    u = t.gg @ w.reshape(k * cg, R * R).T.astype(np.float64)   # (a*a, K*Cg)
    u = u.reshape(t.a * t.a, groups, k // groups, cg)
    return np.ascontiguousarray(u.transpose(1, 0, 2, 3) if groups > 1 else u[None, :, 0], dtype=dtype)


def weight_gradient(du: np.ndarray, t: Transforms, dtype: np.dtype) -> np.ndarray:
    """dw = G^T dU G from dU (groups, a*a, K/groups, C/groups) -> (K, C/groups, 3, 3).

    One GEMM with kron(G, G) in float64, rounded once.  The specification of the backends'
    compiled ``weight_gradient``.
    """
    groups, a2, kg, cg = du.shape
    flat = du.astype(np.float64, copy=False).transpose(1, 0, 2, 3).reshape(a2, groups * kg * cg)
    with np.errstate(invalid="ignore", over="ignore"):  # Inf/NaN input: the backends recompute
        dw = flat.T @ t.gg   # (K*Cg, 9)
    return np.ascontiguousarray(dw.reshape(groups * kg, cg, R, R), dtype=dtype)


#: tiles per SIMD lane group in the kernels; block sizes are multiples of it
LANES = 16
#: tiles per block: measured best or within 5% of the best on layers from 8 to 256 channels
#: (fewer tiles make the a*a GEMMs too short, more spill the blocks out of L2)
BLOCK = 64
#: blocks a pass is cut into at least (where its tiles allow, down to LANES tiles each), whatever
#: the thread count: enough for up to MIN_BLOCKS / 2 threads to get two blocks each, and the same
#: blocks for every thread count, so that results do not depend on it (BLAS rounds a column of a
#: product differently depending on how many columns it has: OpenBLAS's AVX2 edge kernels do)
MIN_BLOCKS = 8
#: elements added to each buffer row stride (one cache line of float32)
STRIDE_PAD = 16


@dataclass(frozen=True)
class Plan:
    """How one Winograd pass runs: transforms, tile tables, block size, threads, buffer sizes.

    ``cin`` / ``cout`` are the per-group channels read / produced by the tiled pass
    (for the input gradient, the layer's K and C).
    """

    t: Transforms
    hs: np.ndarray
    ws: np.ndarray
    d: int
    tb: int
    threads: int
    cin: int
    cout: int

    @property
    def tiles(self) -> int:
        """Tiles per image."""
        return len(self.hs) * len(self.ws)

    @property
    def vstride(self) -> int:
        """Elements between the a*a rows of the transformed-input block: cin*tb, padded so that
        rows do not fall on the same cache sets (a multiple of 4 KiB would)."""
        return self.cin * self.tb + STRIDE_PAD

    @property
    def mstride(self) -> int:
        """As :attr:`vstride`, for the product block (cout*tb)."""
        return self.cout * self.tb + STRIDE_PAD

    def planes(self, dtype: np.dtype, weight: bool = False) -> np.ndarray:
        """Per-thread staging planes, zeroed: room for the input planes of every image that one
        block of ``tb`` consecutive tiles reads, each covering the tiles' a x a patches
        (``max(hs) + d*(a-1) + 1`` rows, likewise columns; the input sits inside at the pass's
        padding), and for the weight gradient (``weight``) as many m x m output-gradient planes
        after them.  The kernels write only the input's own elements, so the zeros around it
        are written once, here."""
        slots = (self.tb + self.tiles - 2) // self.tiles + 1

        def plane(e: int) -> int:
            return (int(self.hs.max()) + self.d * (e - 1) + 1) * (int(self.ws.max()) + self.d * (e - 1) + 1)

        return aligned_rows(self.threads, slots * (plane(self.t.a) + (plane(self.t.m) if weight else 0)), dtype, 0)

    def buffers(self, dtype: np.dtype) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Per-thread (vbuf, mbuf, scratch, lanes) for the kernels, rows 64-byte aligned and not
        initialised (the kernels write every element before they read it)."""
        a2 = self.t.a * self.t.a
        return (aligned_rows(self.threads, a2 * self.vstride, dtype),
                aligned_rows(self.threads, a2 * self.mstride, dtype),
                aligned_rows(self.threads, 36 * (self.tb + LANES), dtype),
                aligned_rows(self.threads, 6 * self.tb, np.intp))


def workspace_bytes(a: int, groups: int, cin: int, cout: int, tb: int, threads: int, itemsize: int,
                    partials: bool) -> int:
    """Scratch memory of one pass: transformed weights (or their per-thread gradients) plus blocks."""
    weights = a * a * groups * cin * cout * itemsize * (threads + 1 if partials else 1)
    return weights + threads * a * a * (cin + cout) * tb * itemsize


def plan(n: int, groups: int, cin: int, cout: int, out_h: int, out_w: int, d: int,
         itemsize: int, threads: int, limit: int, *, partials: bool = False) -> Plan | str:
    """Plan a pass producing (out_h, out_w) planes with :data:`TILE` x :data:`TILE` output tiles,
    or say why it cannot run within ``limit`` bytes of workspace (a string)."""
    m = TILE
    t = matrices(m)
    a = t.a
    hs, ws = tile_starts(out_h, m, d), tile_starts(out_w, m, d)
    total_tiles = n * len(hs) * len(ws)
    # BLOCK tiles, fewer (a multiple of LANES) when that makes fewer than MIN_BLOCKS blocks
    tb = max(LANES, min(BLOCK, -(-total_tiles // MIN_BLOCKS) // LANES * LANES))
    threads = max(1, min(threads, -(-total_tiles // tb)))
    while workspace_bytes(a, groups, cin, cout, tb, threads, itemsize, partials) > limit:
        if tb > LANES:
            tb = max(LANES, tb // 2 // LANES * LANES)
        elif threads > 1:
            threads -= 1
        else:
            need = workspace_bytes(a, groups, cin, cout, LANES, 1, itemsize, partials)
            return (f"{need / 2**20:.1f} MiB of workspace, over the limit of {limit / 2**20:.1f} MiB "
                    "(see fastconv.set_workspace_limit)")
    return Plan(t, hs, ws, d, tb, threads, cin, cout)


def pass_shape(op: str, g: ConvGeometry) -> tuple[int, int, int, int, bool]:
    """(cin, cout, out_h, out_w, partials) of the tiled pass that computes ``op``:
    the input gradient tiles the input plane and reads K channels."""
    if op == "conv2d_backward_input":
        return g.k_per_group, g.c_per_group, g.h, g.w, False
    return g.c_per_group, g.k_per_group, g.out_h, g.out_w, op == "conv2d_backward_weight"


def pass_tiles(op: str, g: ConvGeometry) -> int:
    """Output tiles of the tiled pass that computes ``op``, over the whole batch."""
    _, _, out_h, out_w, _ = pass_shape(op, g)
    return g.n * len(tile_starts(out_h, TILE, g.dilation[0])) * len(tile_starts(out_w, TILE, g.dilation[1]))


def enough_tiles(op: str, g: ConvGeometry, min_tiles: int, wide_channels: int, min_tiles_wide: int) -> bool:
    """Whether the pass of ``op`` has tiles enough for Winograd to beat a blocked direct kernel:
    ``min_tiles`` over the batch, or ``min_tiles_wide`` where the layer has at least
    ``wide_channels`` channels per group in and out (each tile then saves more multiplications
    against the same transforms; below a few dozen tiles every block's GEMMs read all the
    transformed weights for too few tiles)."""
    tiles = pass_tiles(op, g)
    return tiles >= min_tiles or min(g.c_per_group, g.k_per_group) >= wide_channels and tiles >= min_tiles_wide


def transform_work(weights: int) -> int:
    """Multiply-adds of the weight-side transforms (``transform_weight`` / ``weight_gradient``)
    over ``weights`` transformed weights (a*a per channel pair): 162 per pair (3*a*3 + a*a*3 for
    a = 6), 4.5 per transformed weight; what the backends size their thread counts by."""
    return weights * 9 // 2


def weight_gradient_pays(g: ConvGeometry) -> bool:
    """Whether Winograd's weight gradient has tiles enough for its per-worker partial sums: at
    least half as many tiles over the batch as the layer has channels per group (in or out,
    the fewer).  Each worker zeroes, fills and adds 36 x K x C/g partial sums however few
    tiles it transforms (9.4 MB each for 256 channels); im2col has no such cost.  2-core Zen 4,
    2 threads, float32, im2col / Winograd time (Cython; Numba alike): 256 channels on 14x14,
    1-4 images (16-64 tiles) 0.32-0.64, 8 (128) 0.98, 16 (256) 1.58, 32 (512) 1.87; 128 on 28x28,
    1 image (49) 0.70-0.86, 2 (98) 1.47; 64 channels, 196-392 tiles 1.3-1.8 (one noisy 0.81)."""
    return 2 * pass_tiles("conv2d_backward_weight", g) >= min(g.c_per_group, g.k_per_group)


def plan_for(op: str, g: ConvGeometry, threads: int, limit: int) -> Plan | str:
    """:func:`plan` for one op of a layer (a string says why it cannot run)."""
    cin, cout, out_h, out_w, partials = pass_shape(op, g)
    return plan(g.n, g.groups, cin, cout, out_h, out_w, g.dilation[0], g.dtype.itemsize, threads, limit,
                partials=partials)


def unsupported(op: str, g: ConvGeometry, limit: int) -> str | None:
    """Why ``op`` cannot run with Winograd on this layer within ``limit`` bytes (None when it can)."""
    reason = unsupported_geometry(g)
    if reason is None:
        p = plan_for(op, g, 1, limit)
        reason = p if isinstance(p, str) else None
    return reason
