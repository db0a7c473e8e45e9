"""The numba pooling kernels' own code paths.

``fastconv/backends/numba/_kernels.py`` runs max and average pooling through a flat path
(``pool2d_flat``: W a multiple of the column stride, no column padding; bands of input
rows deinterleaved once, taps as long vector loops, border windows one by one) or the
general row-by-row kernels; the average-pooling gradient of windows that do not overlap
vertically runs the flat layout in reverse (``avg_pool2d_backward_flat``), and the
max-pooling gradient goes by whole planes or, for planes over 16 KiB, output row by output
row (falling back to the whole plane when an index lies outside its window's rows).

The geometries, inputs and the guard-page script are those of the Cython pooling tests
(``test_cython_pool.py``), which are chosen to drive the same distinctions; here they run
on the numba backend.
"""

from __future__ import annotations

import sys

import numpy as np
import pytest

pytest.importorskip("numba")

import fastconv  # noqa: E402
from fastconv._args import PoolGeometry  # noqa: E402
from conftest import python_child  # noqa: E402
from test_cython_pool import GEOMETRIES, GUARD_SCRIPT, TOL, _kw, _num_threads, rel_err, special_input  # noqa: E402


#: geometries for the flat average-pooling gradient's border windows (windows that do not
#: overlap vertically): top padding with overlapping columns and ceil_mode; rows between windows
FLAT_BACKWARD = [
    ((2, 3), (2, 2), (1, 0), (1, 1), True, 17, 12),
    ((1, 3), (3, 2), (0, 0), (1, 1), True, 21, 24),
]


def _nb():
    from fastconv.backends import numba as nbmod

    return nbmod


def _geometry(g, dtype=np.float64) -> PoolGeometry:
    kernel, stride, padding, dilation, ceil_mode, h, w = g
    return PoolGeometry(2, 3, h, w, kernel, stride, padding, dilation, ceil_mode, True, np.dtype(dtype))


def test_geometries_cover_every_path():
    flat = [_nb()._is_flat_pool(_geometry(g), g[3]) for g in GEOMETRIES]
    assert any(flat) and not all(flat)
    assert flat[0] and flat[2] and flat[11] and flat[12]  # no borders; top padding + ceil rows; bands
    # the flat average-pooling gradient (windows that do not overlap vertically), with and without borders
    flat_back = [f and g[3] == (1, 1) and g[0][0] <= g[1][0] for f, g in zip(flat, GEOMETRIES)]
    assert flat_back[0] and flat_back[11] and not flat_back[2]
    assert all(_nb()._is_flat_pool(_geometry(g), g[3]) and g[0][0] <= g[1][0] for g in FLAT_BACKWARD)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("g", GEOMETRIES, ids=[f"g{i}" for i in range(len(GEOMETRIES))])
def test_max_pool_paths_match_reference(g, dtype):
    rng = np.random.default_rng(len(g) + g[5] * 7 + g[6])
    x = special_input(rng, (2, 3, g[5], g[6]), dtype)
    out, idx = fastconv.max_pool2d(x, **_kw(g), return_indices=True, backend="numba")
    ref, ridx = fastconv.max_pool2d(x, **_kw(g), return_indices=True, backend="reference")
    np.testing.assert_array_equal(idx, ridx)
    np.testing.assert_array_equal(out, ref)
    gy = rng.standard_normal(out.shape).astype(dtype)
    gx = fastconv.max_pool2d_backward(gy, x, **_kw(g), indices=idx, backend="numba")
    gref = fastconv.max_pool2d_backward(gy, x, **_kw(g), indices=ridx, backend="reference")
    assert rel_err(gx, gref) <= TOL[dtype]


@pytest.mark.parametrize("count_include_pad", [True, False])
@pytest.mark.parametrize("g", [g for g in GEOMETRIES if g[3] == (1, 1)] + FLAT_BACKWARD,
                         ids=lambda g: f"k{g[0]}s{g[1]}p{g[2]}c{int(g[4])}")
def test_avg_pool_paths_match_reference(g, count_include_pad):
    rng = np.random.default_rng(g[5] + g[6])
    x = rng.standard_normal((2, 3, g[5], g[6]))
    kw = dict(_kw(g), count_include_pad=count_include_pad)
    del kw["dilation"]
    out = fastconv.avg_pool2d(x, **kw, backend="numba")
    assert rel_err(out, fastconv.avg_pool2d(x, **kw, backend="reference")) <= 1e-12
    gy = rng.standard_normal(out.shape)
    gx = fastconv.avg_pool2d_backward(gy, x.shape, **kw, backend="numba")
    assert rel_err(gx, fastconv.avg_pool2d_backward(gy, x.shape, **kw, backend="reference")) <= 1e-12


@pytest.mark.parametrize("g", GEOMETRIES[:10] + FLAT_BACKWARD, ids=[f"g{i}" for i in range(10 + len(FLAT_BACKWARD))])
def test_bitwise_equal_to_torch(g):
    """Same tap order, same tie/NaN rule, same summation order as PyTorch's CPU kernels."""
    torch = pytest.importorskip("torch")
    import torch.nn.functional as F

    rng = np.random.default_rng(g[5] * 31 + g[6])
    x = special_input(rng, (2, 3, g[5], g[6]), np.float32)
    kernel, stride, padding, dilation, ceil_mode = g[:5]
    out, idx = fastconv.max_pool2d(x, **_kw(g), return_indices=True, backend="numba")
    tout, tidx = F.max_pool2d(torch.from_numpy(x), kernel, stride, padding, dilation, ceil_mode, True)
    np.testing.assert_array_equal(out, tout.numpy())
    np.testing.assert_array_equal(idx, tidx.numpy())
    gy = rng.standard_normal(out.shape).astype(np.float32)
    gx = fastconv.max_pool2d_backward(gy, x, **_kw(g), indices=idx, backend="numba")
    tgx = torch.ops.aten.max_pool2d_with_indices_backward(torch.from_numpy(gy), torch.from_numpy(x), kernel, stride,
                                                          padding, dilation, ceil_mode, tidx)
    np.testing.assert_array_equal(gx, tgx.numpy())
    if dilation != (1, 1):
        return
    xf = np.nan_to_num(x, nan=0.5, posinf=3.0, neginf=-3.0)
    xf[0, 1, :2] = -0.0  # windows of negative zeros: the sum starts from +0
    for cip in (True, False):
        kw = dict(kernel_size=kernel, stride=stride, padding=padding, ceil_mode=ceil_mode, count_include_pad=cip)
        out = fastconv.avg_pool2d(xf, **kw, backend="numba")
        want = F.avg_pool2d(torch.from_numpy(xf), kernel, stride, padding, ceil_mode, cip).numpy()
        np.testing.assert_array_equal(out, want)
        np.testing.assert_array_equal(np.signbit(out), np.signbit(want))
        gy = rng.standard_normal(out.shape).astype(np.float32)
        gx = fastconv.avg_pool2d_backward(gy, xf.shape, **kw, backend="numba")
        tgx = torch.ops.aten.avg_pool2d_backward(torch.from_numpy(gy), torch.from_numpy(xf), kernel, stride,
                                                 padding, ceil_mode, cip, None)
        np.testing.assert_array_equal(gx, tgx.numpy())


def test_results_do_not_depend_on_threads():
    rng = np.random.default_rng(3)
    results = []
    for shape, k, s, p in [((4, 8, 36, 44), 3, 2, 1), ((4, 8, 36, 44), 2, 2, 0), ((4, 8, 80, 90), 3, 2, (1, 0))]:
        x = special_input(rng, shape, np.float32)
        for nt in (1, 2, 3):
            with _num_threads(nt):
                out, idx = fastconv.max_pool2d(x, k, s, p, return_indices=True, backend="numba")
                gy = np.random.default_rng(0).standard_normal(out.shape).astype(np.float32)
                results.append((out, idx, fastconv.max_pool2d_backward(gy, x, k, s, p, indices=idx, backend="numba"),
                                fastconv.avg_pool2d(np.nan_to_num(x), k, s, p, backend="numba")))
    for first in range(0, len(results), 3):
        for other in results[first + 1:first + 3]:
            for a, b in zip(results[first], other):
                np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("h, w", [(10, 12), (70, 72)])  # whole planes; large planes row by row
def test_max_backward_any_indices(h, w):
    """Indices that no window produced (duplicates, other windows' elements) scatter-add."""
    rng = np.random.default_rng(4)
    x = rng.standard_normal((2, 3, h, w))
    gy = rng.standard_normal((2, 3, h // 2, w // 2))
    idx = rng.integers(0, h * w, gy.shape)
    idx[0, 0] = 7  # one element receives a whole plane
    fwd = fastconv.max_pool2d(x, 2, return_indices=True, backend="numba")[1]
    idx[1, 1], idx[1, 2, -1, -1] = fwd[1, 1], fwd[1, 2, 0, 0]  # a plane of genuine indices but the last
    gx = fastconv.max_pool2d_backward(gy, x, 2, indices=idx, backend="numba")
    ref = fastconv.max_pool2d_backward(gy, x, 2, indices=idx, backend="reference")
    assert rel_err(gx, ref) <= 1e-12


@pytest.mark.parametrize("h, w", [(10, 12), (70, 72)])
def test_max_backward_kernel_skips_indices_outside_the_plane(h, w):
    """The public API rejects them; the kernel itself skips them."""
    nbmod = _nb()
    rng = np.random.default_rng(5)
    gy = rng.standard_normal((1, 2, h // 2, w // 2))
    idx = fastconv.max_pool2d(rng.standard_normal((1, 2, h, w)), 2, return_indices=True, backend="numba")[1]
    idx[0, 0, 1, 1], idx[0, 1, -1, -1] = -1, h * w
    gx = np.full((1, 2, h, w), np.nan)
    nbmod._max_pool2d_backward(gy, idx, gx, 2, 2, 0, 1, 2, np.zeros(1, np.int64), threads=2)
    want = np.zeros((1, 2, h * w))
    for c in range(2):
        for o, i in enumerate(idx[0, c].ravel()):
            if 0 <= i < h * w:
                want[0, c, i] += gy[0, c].ravel()[o]
    np.testing.assert_array_equal(gx.reshape(1, 2, -1), want)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="needs mmap/mprotect")
def test_no_access_past_the_arrays():
    """With every input ending at an unmapped page, any read past it would kill the process
    (the flat path reads whole bands of rows, the last one ending at the array's end)."""
    script = GUARD_SCRIPT.replace('backend="cython"', 'backend="numba"')
    assert 'backend="cython"' not in script
    r = python_child(["-c", script], timeout=600)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), (r.returncode, r.stdout[-2000:], r.stderr[-4000:])
