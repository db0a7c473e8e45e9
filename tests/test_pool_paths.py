"""The pooling kernels' own code paths, in the Cython and the Numba backends.

The Cython kernels (``fastconv/backends/cython/_pool.pyx``) choose between a flat path (W
a multiple of the column stride, no column padding), a phase-plane path, bands of rows
for large planes, padded vector loops whose spare lanes read past a row, an in-cache
gather for the average-pooling gradient (a row copy where its windows tile the plane without
overlapping) and a scatter for the max-pooling gradient.
The Numba kernels (``fastconv/backends/numba/_kernels.py``) run a flat path
(``pool2d_flat``: bands of input rows deinterleaved once, taps as long vector loops,
border windows one by one) or the general row-by-row kernels; their average-pooling
gradient of windows that do not overlap vertically runs the flat layout in reverse, and
their max-pooling gradient goes by whole planes or, for planes over 16 KiB, output row
by output row (back to the whole plane when an index lies outside its window's rows).

These tests drive every one of those paths in both backends: geometries on both sides
of each choice, planes big enough for several bands, arrays that end exactly at an
unmapped page (so that any read or write past an array would crash), thread counts, and
PyTorch's exact results (bit for bit, as the kernels visit taps and sum gradients in
PyTorch's order).
"""

from __future__ import annotations

import sys
import textwrap

import numpy as np
import pytest

import fastconv
from conftest import guard_allocations, num_threads, python_child
from fastconv._args import PoolGeometry

TOL = {np.float32: 1e-5, np.float64: 1e-12}
BACKENDS = ["cython", "numba"]


@pytest.fixture(params=BACKENDS)
def backend(request):
    info = fastconv.available_backends()[request.param]
    if not info["available"]:
        pytest.skip(f"{request.param} backend unavailable: {info['reason']}")
    return request.param


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    scale = np.linalg.norm(b)
    return float(np.linalg.norm(a - b) / (scale if scale > 0 else 1.0))


def special_input(rng, shape, dtype) -> np.ndarray:
    """Values with many exact ties, NaN, +-inf, and a plane that is -inf everywhere."""
    x = np.round(rng.standard_normal(shape), 1).astype(dtype)
    flat = x.reshape(-1)
    for value, frac in ((np.nan, 0.02), (-np.inf, 0.1), (np.inf, 0.01)):
        flat[rng.random(flat.size) < frac] = value
    x[0, 0] = -np.inf
    return x


# geometries: (kernel, stride, padding, dilation, ceil_mode, H, W) chosen to hit each path
GEOMETRIES = [
    ((2, 2), (2, 2), (0, 0), (1, 1), False, 28, 28),    # flat path, no borders
    ((3, 3), (2, 2), (1, 1), (1, 1), False, 30, 30),    # phase path (left padding), -inf border windows
    ((3, 3), (2, 2), (1, 0), (1, 1), True, 17, 16),     # flat path with top padding and ceil-mode rows
    ((2, 2), (2, 2), (0, 0), (1, 1), True, 15, 15),     # odd sizes: phase path, ceil-mode windows
    ((3, 3), (1, 1), (1, 1), (1, 1), False, 12, 13),    # stride 1
    ((2, 3), (3, 2), (1, 1), (1, 1), True, 11, 14),     # stride 3 rows, mixed kernel
    ((3, 2), (2, 3), (0, 1), (2, 1), False, 13, 12),    # column stride 3, row dilation
    ((2, 2), (1, 1), (1, 1), (2, 2), True, 9, 9),       # dilation in both directions
    ((1, 1), (3, 3), (0, 0), (1, 1), False, 10, 2),     # W smaller than the stride
    ((4, 4), (4, 4), (2, 2), (1, 1), True, 9, 8),       # large padding
    ((3, 3), (2, 2), (1, 1), (1, 1), False, 40, 300),   # several bands (phase path)
    ((2, 2), (2, 2), (0, 0), (1, 1), False, 40, 600),   # several bands (flat path)
    ((3, 3), (2, 2), (0, 0), (1, 1), False, 5, 9000),   # one row per band
]


def _kw(g):
    kernel, stride, padding, dilation, ceil_mode, _, _ = g
    return dict(kernel_size=kernel, stride=stride, padding=padding, dilation=dilation, ceil_mode=ceil_mode)


#: geometries for the flat average-pooling gradient's border windows (windows that do not
#: overlap vertically): top padding with overlapping columns and ceil_mode; rows between windows
FLAT_BACKWARD = [
    ((2, 3), (2, 2), (1, 0), (1, 1), True, 17, 12),
    ((1, 3), (3, 2), (0, 0), (1, 1), True, 21, 24),
]


#: geometries for the Cython average-pooling gradient of windows that tile the plane without
#: overlapping (no padding, kernel <= stride): gaps between the windows in both directions, a
#: last window row past the input's end, spare rows and columns after the last window
TILED_BACKWARD = [
    ((2, 1), (3, 2), (0, 0), (1, 1), False, 17, 13),
    ((2, 2), (3, 3), (0, 0), (1, 1), False, 22, 16),
]


def _geometry(g, dtype=np.float64) -> PoolGeometry:
    kernel, stride, padding, dilation, ceil_mode, h, w = g
    return PoolGeometry(2, 3, h, w, kernel, stride, padding, dilation, ceil_mode, True, np.dtype(dtype))


def test_geometries_cover_every_numba_path():
    pytest.importorskip("numba")
    from fastconv.backends import numba as nbmod

    flat = [nbmod._is_flat_pool(_geometry(g), g[3]) for g in GEOMETRIES]
    assert any(flat) and not all(flat)
    assert flat[0] and flat[2] and flat[11] and flat[12]  # no borders; top padding + ceil rows; bands
    # the flat average-pooling gradient (windows that do not overlap vertically), with and without borders
    flat_back = [f and g[3] == (1, 1) and g[0][0] <= g[1][0] for f, g in zip(flat, GEOMETRIES)]
    assert flat_back[0] and flat_back[11] and not flat_back[2]
    assert all(nbmod._is_flat_pool(_geometry(g), g[3]) and g[0][0] <= g[1][0] for g in FLAT_BACKWARD)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("g", GEOMETRIES, ids=[f"g{i}" for i in range(len(GEOMETRIES))])
def test_max_pool_paths_match_reference(g, dtype, backend):
    rng = np.random.default_rng(len(g) + g[5] * 7 + g[6])
    x = special_input(rng, (2, 3, g[5], g[6]), dtype)
    out, idx = fastconv.max_pool2d(x, **_kw(g), return_indices=True, backend=backend)
    ref, ridx = fastconv.max_pool2d(x, **_kw(g), return_indices=True, backend="reference")
    np.testing.assert_array_equal(idx, ridx)
    np.testing.assert_array_equal(out, ref)
    gy = rng.standard_normal(out.shape).astype(dtype)
    gx = fastconv.max_pool2d_backward(gy, x, **_kw(g), indices=idx, backend=backend)
    gref = fastconv.max_pool2d_backward(gy, x, **_kw(g), indices=ridx, backend="reference")
    assert rel_err(gx, gref) <= TOL[dtype]


@pytest.mark.parametrize("count_include_pad", [True, False])
@pytest.mark.parametrize("g", [g for g in GEOMETRIES if g[3] == (1, 1)] + FLAT_BACKWARD + TILED_BACKWARD,
                         ids=lambda g: f"k{g[0]}s{g[1]}p{g[2]}c{int(g[4])}")
def test_avg_pool_paths_match_reference(g, count_include_pad, backend):
    rng = np.random.default_rng(g[5] + g[6])
    x = rng.standard_normal((2, 3, g[5], g[6]))
    kw = dict(_kw(g), count_include_pad=count_include_pad)
    del kw["dilation"]
    out = fastconv.avg_pool2d(x, **kw, backend=backend)
    assert rel_err(out, fastconv.avg_pool2d(x, **kw, backend="reference")) <= 1e-12
    gy = rng.standard_normal(out.shape)
    gx = fastconv.avg_pool2d_backward(gy, x.shape, **kw, backend=backend)
    assert rel_err(gx, fastconv.avg_pool2d_backward(gy, x.shape, **kw, backend="reference")) <= 1e-12


@pytest.mark.parametrize("g", GEOMETRIES[:10] + FLAT_BACKWARD + TILED_BACKWARD,
                         ids=[f"g{i}" for i in range(10 + len(FLAT_BACKWARD) + len(TILED_BACKWARD))])
def test_bitwise_equal_to_torch(g, backend):
    """Same tap order, same tie/NaN rule, same summation order as PyTorch's CPU kernels."""
    torch = pytest.importorskip("torch")
    import torch.nn.functional as F

    rng = np.random.default_rng(g[5] * 31 + g[6])
    x = special_input(rng, (2, 3, g[5], g[6]), np.float32)
    kernel, stride, padding, dilation, ceil_mode = g[:5]
    out, idx = fastconv.max_pool2d(x, **_kw(g), return_indices=True, backend=backend)
    tout, tidx = F.max_pool2d(torch.from_numpy(x), kernel, stride, padding, dilation, ceil_mode, True)
    np.testing.assert_array_equal(out, tout.numpy())
    np.testing.assert_array_equal(idx, tidx.numpy())
    gy = rng.standard_normal(out.shape).astype(np.float32)
    gx = fastconv.max_pool2d_backward(gy, x, **_kw(g), indices=idx, backend=backend)
    tgx = torch.ops.aten.max_pool2d_with_indices_backward(torch.from_numpy(gy), torch.from_numpy(x), kernel, stride,
                                                          padding, dilation, ceil_mode, tidx)
    np.testing.assert_array_equal(gx, tgx.numpy())
    if dilation != (1, 1):
        return
    xf = np.nan_to_num(x, nan=0.5, posinf=3.0, neginf=-3.0)
    xf[0, 1, :2] = -0.0  # windows of negative zeros: the sum starts from +0
    for cip in (True, False):
        kw = dict(kernel_size=kernel, stride=stride, padding=padding, ceil_mode=ceil_mode, count_include_pad=cip)
        out = fastconv.avg_pool2d(xf, **kw, backend=backend)
        want = F.avg_pool2d(torch.from_numpy(xf), kernel, stride, padding, ceil_mode, cip).numpy()
        np.testing.assert_array_equal(out, want)
        np.testing.assert_array_equal(np.signbit(out), np.signbit(want))
        gy = rng.standard_normal(out.shape).astype(np.float32)
        gx = fastconv.avg_pool2d_backward(gy, xf.shape, **kw, backend=backend)
        tgx = torch.ops.aten.avg_pool2d_backward(torch.from_numpy(gy), torch.from_numpy(xf), kernel, stride,
                                                 padding, ceil_mode, cip, None)
        np.testing.assert_array_equal(gx, tgx.numpy())


def test_results_do_not_depend_on_threads(backend):
    rng = np.random.default_rng(3)
    for shape, k, s, p in [((4, 8, 36, 44), 3, 2, 1), ((4, 8, 36, 44), 2, 2, 0), ((4, 8, 80, 90), 3, 2, (1, 0))]:
        x = special_input(rng, shape, np.float32)
        results = []
        for nt in (1, 2, 3):
            with num_threads(nt):
                out, idx = fastconv.max_pool2d(x, k, s, p, return_indices=True, backend=backend)
                gy = np.random.default_rng(0).standard_normal(out.shape).astype(np.float32)
                results.append((out, idx, fastconv.max_pool2d_backward(gy, x, k, s, p, indices=idx, backend=backend),
                                fastconv.avg_pool2d(np.nan_to_num(x), k, s, p, backend=backend),
                                fastconv.avg_pool2d_backward(gy, x.shape, k, s, p, backend=backend)))
        for other in results[1:]:
            for a, b in zip(results[0], other):
                np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("h, w", [(10, 12), (70, 72)])  # whole planes; large planes row by row
def test_max_backward_any_indices(h, w, backend):
    """Indices that no window produced (duplicates, other windows' elements) scatter-add."""
    rng = np.random.default_rng(4)
    x = rng.standard_normal((2, 3, h, w))
    gy = rng.standard_normal((2, 3, h // 2, w // 2))
    idx = rng.integers(0, h * w, gy.shape)
    idx[0, 0] = 7  # one element receives a whole plane
    fwd = fastconv.max_pool2d(x, 2, return_indices=True, backend=backend)[1]
    idx[1, 1], idx[1, 2, -1, -1] = fwd[1, 1], fwd[1, 2, 0, 0]  # a plane of genuine indices but the last
    gx = fastconv.max_pool2d_backward(gy, x, 2, indices=idx, backend=backend)
    ref = fastconv.max_pool2d_backward(gy, x, 2, indices=idx, backend="reference")
    assert rel_err(gx, ref) <= 1e-12


#: rows narrower than a window, windows wider than the padded row, one-row planes
NARROW = [
    ((4, 3), (2, 3), (1, 1), (1, 1), True, 8, 1),
    ((3, 3), (3, 3), (1, 1), (1, 1), True, 5, 2),
    ((2, 4), (1, 4), (1, 2), (1, 1), False, 1, 3),
    ((3, 2), (2, 2), (1, 1), (1, 1), True, 2, 1),
]


@pytest.mark.parametrize("g", GEOMETRIES + FLAT_BACKWARD + NARROW,
                         ids=[f"g{i}" for i in range(len(GEOMETRIES) + len(FLAT_BACKWARD) + len(NARROW))])
def test_no_writes_past_the_outputs(g, backend, monkeypatch):
    """Every output and workspace the backend allocates is followed and preceded by guard
    elements; no pass may change them (spare vector lanes stay inside the arrays)."""
    guarded = guard_allocations(monkeypatch, backend)
    rng = np.random.default_rng(g[5] * 13 + g[6])
    for dtype in (np.float32, np.float64):
        x = rng.standard_normal((2, 3, g[5], g[6])).astype(dtype)
        out, idx = fastconv.max_pool2d(x, **_kw(g), return_indices=True, backend=backend)
        ref, ridx = fastconv.max_pool2d(x, **_kw(g), return_indices=True, backend="reference")
        np.testing.assert_array_equal(out, ref)
        gy = rng.standard_normal(out.shape).astype(dtype)
        gx = fastconv.max_pool2d_backward(gy, x, **_kw(g), indices=idx, backend=backend)
        assert rel_err(gx, fastconv.max_pool2d_backward(gy, x, **_kw(g), indices=ridx, backend="reference")) <= TOL[dtype]
        if g[3] == (1, 1):
            kw = dict(_kw(g), count_include_pad=True)
            del kw["dilation"]
            a = fastconv.avg_pool2d(x, **kw, backend=backend)
            assert rel_err(a, fastconv.avg_pool2d(x, **kw, backend="reference")) <= TOL[dtype]
            ga = fastconv.avg_pool2d_backward(gy, x.shape, **kw, backend=backend)
            assert rel_err(ga, fastconv.avg_pool2d_backward(gy, x.shape, **kw, backend="reference")) <= TOL[dtype]
    assert guarded.buffers and guarded.untouched()


def _max_backward_kernel(backend: str):
    """The backend's max-pooling gradient kernel, called as ``(gy, idx, gx)`` for 2x2/2 pooling."""
    if backend == "cython":
        from fastconv.backends.cython import _pool

        return lambda gy, idx, gx: _pool.max_backward(gy, idx, gx, 2, 2, 0, 1, 2)
    from fastconv.backends import numba as nbmod

    return lambda gy, idx, gx: nbmod._max_pool2d_backward(gy, idx, gx, 2, 2, 0, 1, 2, np.zeros(1, np.int64),
                                                          threads=2)


@pytest.mark.parametrize("h, w", [(10, 12), (70, 72)])
def test_max_backward_kernel_skips_indices_outside_the_plane(h, w, backend):
    """The public API rejects them; the kernel itself skips them."""
    rng = np.random.default_rng(5)
    gy = rng.standard_normal((1, 2, h // 2, w // 2))
    idx = fastconv.max_pool2d(rng.standard_normal((1, 2, h, w)), 2, return_indices=True, backend=backend)[1]
    idx[0, 0, 1, 1], idx[0, 1, -1, -1] = -1, h * w
    gx = np.full((1, 2, h, w), np.nan)
    _max_backward_kernel(backend)(gy, idx, gx)
    want = np.zeros((1, 2, h * w))
    for c in range(2):
        for o, i in enumerate(idx[0, c].ravel()):
            if 0 <= i < h * w:
                want[0, c, i] += gy[0, c].ravel()[o]
    np.testing.assert_array_equal(gx.reshape(1, 2, -1), want)


GUARD_SCRIPT = textwrap.dedent("""
    import ctypes, mmap, sys
    import numpy as np
    import fastconv
    BACKEND = sys.argv[1]

    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    PAGE = mmap.PAGESIZE
    keep = []

    def guarded(shape, dtype, fill):
        # an array whose last byte is followed by an unmapped (PROT_NONE) page
        dtype = np.dtype(dtype)
        nbytes = int(np.prod(shape)) * dtype.itemsize
        pages = -(-nbytes // PAGE) + 1
        base = libc.mmap(None, pages * PAGE, 3, 0x22, -1, 0)  # PROT_READ|WRITE, MAP_PRIVATE|ANONYMOUS
        assert base not in (None, ctypes.c_void_p(-1).value)
        assert libc.mprotect(base + (pages - 1) * PAGE, PAGE, 0) == 0
        start = base + (pages - 1) * PAGE - nbytes
        buf = (ctypes.c_char * nbytes).from_address(start)
        keep.append(buf)
        a = np.frombuffer(buf, dtype=dtype).reshape(shape)
        a[...] = fill(shape).astype(dtype)
        return a

    rng = np.random.default_rng(0)
    for dtype in (np.float32, np.float64):
        for (k, s, p, ceil, h, w) in [(2, 2, 0, False, 28, 28), (3, 2, 1, False, 30, 30), (3, 2, 0, True, 17, 16),
                                      (2, 2, 0, True, 15, 15), (3, 1, 1, False, 12, 13), (2, 3, 1, True, 11, 14)]:
            x = guarded((2, 3, h, w), dtype, rng.standard_normal)
            out, idx = fastconv.max_pool2d(x, k, s, p, ceil_mode=ceil, return_indices=True, backend=BACKEND)
            ref, ridx = fastconv.max_pool2d(x, k, s, p, ceil_mode=ceil, return_indices=True, backend="reference")
            assert np.array_equal(out, ref) and np.array_equal(idx, ridx)
            gy = guarded(out.shape, dtype, rng.standard_normal)
            gidx = guarded(out.shape, np.int64, lambda shape: idx)
            fastconv.max_pool2d_backward(gy, x, k, s, p, ceil_mode=ceil, indices=gidx, backend=BACKEND)
            a = fastconv.avg_pool2d(x, k, s, p, ceil_mode=ceil, backend=BACKEND)
            r = fastconv.avg_pool2d(x, k, s, p, ceil_mode=ceil, backend="reference")
            assert np.linalg.norm(a - r) <= 1e-5 * np.linalg.norm(r)
            fastconv.avg_pool2d_backward(gy, x.shape, k, s, p, ceil_mode=ceil, backend=BACKEND)
    print("ok")
""")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="needs mmap/mprotect")
def test_no_access_past_the_arrays(backend):
    """Padded loops read past a row only while they stay inside the array (the flat paths
    read whole bands of rows, the last one ending at the array's end): with every input
    ending at an unmapped page, any read past it would kill the process."""
    r = python_child(["-c", GUARD_SCRIPT, backend], timeout=600)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), (r.returncode, r.stdout[-2000:], r.stderr[-4000:])
