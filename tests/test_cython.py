"""Tests specific to the Cython backend: random configs against the reference,
workspace chunking, thread counts, concurrent calls, pooling edge cases."""

from __future__ import annotations

import threading

import numpy as np
import pytest

import fastconv
from fastconv import _config
from fastconv.backends.base import CONV_OPS

from conftest import num_threads

pytestmark = pytest.mark.skipif(not fastconv.available_backends()["cython"]["available"],
                                reason="Cython extensions not built")

ALGORITHMS = ("direct", "im2col")
#: im2col runs either one multi-threaded GEMM per batch chunk or per-thread images with 1-thread GEMMs
MODES = ("threads", "batched")
TOL = {np.float32: 1e-5, np.float64: 1e-12}


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    scale = np.linalg.norm(b)
    return float(np.linalg.norm(a - b) / (scale if scale > 0 else 1.0))


def random_conv(seed: int):
    """A random, valid conv config: stride 1-3, padding 0-3 or "same", dilation 1-3, groups.

    Images may be smaller than the dilated kernel when the padding makes up for it,
    so some taps never touch the image.
    """
    rng = np.random.default_rng(seed)
    while True:
        config = _draw_conv(rng, seed)
        x, wt, _, kw = config
        try:
            fastconv.conv2d(x, wt, **kw, backend="reference")
        except ValueError:
            continue
        return config


def _draw_conv(rng, seed: int):
    groups = int(rng.choice([1, 1, 2, 3]))
    cg, kg = int(rng.integers(1, 4)), int(rng.integers(1, 4))
    if seed % 7 == 0:  # depthwise
        groups, cg, kg = int(rng.integers(2, 6)), 1, 1
    r, s = int(rng.integers(1, 5)), int(rng.integers(1, 5))
    dil = (int(rng.integers(1, 4)), int(rng.integers(1, 4)))
    if seed % 5 == 0:
        stride, padding = (1, 1), "same"
    else:
        stride = (int(rng.integers(1, 4)), int(rng.integers(1, 4)))
        padding = (int(rng.integers(0, 4)), int(rng.integers(0, 4)))
        if seed % 3 == 0:
            padding = "valid"
    h, w = int(rng.integers(1, 14)), int(rng.integers(1, 14))
    n = int(rng.integers(1, 4))
    dtype = np.float32 if seed % 2 else np.float64
    x = rng.standard_normal((n, groups * cg, h, w)).astype(dtype)
    wt = rng.standard_normal((groups * kg, cg, r, s)).astype(dtype)
    b = rng.standard_normal(groups * kg).astype(dtype)
    kw = dict(stride=stride, padding=padding, dilation=dil, groups=groups)
    return x, wt, b, kw


@pytest.fixture(autouse=True)
def always_parallel(monkeypatch):
    """Tiny test shapes would run single-threaded; force the OpenMP paths."""
    monkeypatch.setattr("fastconv.backends.cython.SERIAL_WORK", 0)


@pytest.fixture(params=[("direct", "auto"), ("im2col", "threads"), ("im2col", "batched")],
                ids=["direct", "im2col-threads", "im2col-batched"])
def algorithm(request, monkeypatch):
    """An algorithm name; for im2col, with each threading mode forced in turn."""
    from fastconv.backends.cython import CythonBackend

    name, mode = request.param
    monkeypatch.setattr(CythonBackend, "im2col_mode", mode)
    return name


@pytest.mark.parametrize("seed", range(40))
def test_conv_random_configs(seed, algorithm):
    x, w, b, kw = random_conv(seed)
    out = fastconv.conv2d(x, w, b, **kw, backend="cython", algorithm=algorithm)
    ref = fastconv.conv2d(x, w, b, **kw, backend="reference")
    assert out.dtype == x.dtype and out.shape == ref.shape and out.flags.c_contiguous
    assert rel_err(out, ref) <= TOL[x.dtype.type]

    gy = np.random.default_rng(seed + 1000).standard_normal(ref.shape).astype(x.dtype)
    got = fastconv.conv2d_backward(gy, x, w, **kw, backend="cython", algorithm=algorithm)
    want = fastconv.conv2d_backward(gy, x, w, **kw, backend="reference")
    for name in ("input", "weight", "bias"):
        a, e = getattr(got, name), getattr(want, name)
        assert a.dtype == x.dtype and a.shape == e.shape, name
        assert rel_err(a, e) <= TOL[x.dtype.type], name


@pytest.mark.parametrize("algorithm", ["direct", "im2col"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_kernels_on_large_planes(dtype, algorithm, monkeypatch):
    """Planes larger than the small grids draw: long rows, dilation, asymmetric and large
    padding, groups, more work units than threads; for im2col, column blocks of a few output
    rows (the block size is shrunk so that every plane takes several, the last one partial)."""
    monkeypatch.setattr("fastconv.backends.cython._COLUMN_BLOCK_BYTES", 16000)  # 2-3 rows
    rng = np.random.default_rng(7)
    for (n, c, h, w, k, r, s, pad, dil, groups) in [(3, 2, 60, 70, 4, 3, 3, (1, 2), (2, 1), 1),
                                                    (2, 4, 45, 50, 4, 5, 2, (4, 0), (1, 3), 2),
                                                    (4, 3, 9, 80, 3, 1, 7, (0, 5), 1, 3),
                                                    # 3x3 stride 1: the flat-plane kernel, several row
                                                    # segments, padding beyond the reach (the input
                                                    # gradient crops), dilation, groups
                                                    (2, 3, 70, 90, 6, 3, 3, (3, 5), (1, 2), 3),
                                                    (3, 1, 64, 64, 4, 3, 3, 1, 1, 1)]:
        x = rng.standard_normal((n, c, h, w)).astype(dtype)
        wt = rng.standard_normal((k, c // groups, r, s)).astype(dtype)
        b = rng.standard_normal(k).astype(dtype)
        kw = dict(padding=pad, dilation=dil, groups=groups)
        out = fastconv.conv2d(x, wt, b, **kw, backend="cython", algorithm=algorithm)
        ref = fastconv.conv2d(x, wt, b, **kw, backend="reference")
        assert rel_err(out, ref) <= TOL[dtype]
        gy = rng.standard_normal(ref.shape).astype(dtype)
        got = fastconv.conv2d_backward(gy, x, wt, **kw, backend="cython", algorithm=algorithm)
        want = fastconv.conv2d_backward(gy, x, wt, **kw, backend="reference")
        for name in ("input", "weight", "bias"):
            assert rel_err(getattr(got, name), getattr(want, name)) <= TOL[dtype], name


def test_pointwise_and_large_reduction(algorithm):
    """1x1 (no-lowering GEMM path) and a GEMM-sized 3x3 layer, fp32."""
    rng = np.random.default_rng(1)
    layers = [(3, 16, 7, 8, 1, 0, 1), (1, 8, 5, 4, 1, 0, 2), (2, 12, 5, 6, 1, 0, 3), (2, 32, 9, 16, 3, 1, 1)]
    for (n, c, h, k, r, pad, groups) in layers:
        x = rng.standard_normal((n, c, h, h)).astype(np.float32)
        w = rng.standard_normal((k, c // groups, r, r)).astype(np.float32)
        kw = dict(padding=pad, groups=groups)
        out = fastconv.conv2d(x, w, **kw, backend="cython", algorithm=algorithm)
        assert rel_err(out, fastconv.conv2d(x, w, **kw, backend="reference")) <= 1e-5
        gy = rng.standard_normal(out.shape).astype(np.float32)
        got = fastconv.conv2d_backward(gy, x, w, **kw, backend="cython", algorithm=algorithm)
        want = fastconv.conv2d_backward(gy, x, w, **kw, backend="reference")
        assert rel_err(got.input, want.input) <= 1e-5
        assert rel_err(got.weight, want.weight) <= 1e-5


@pytest.fixture
def restore_config():
    limit, threads = _config.get_workspace_limit(), _config.get_num_threads()
    yield
    _config.set_workspace_limit(limit)
    _config.set_num_threads(threads)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("limit", [1, 3000, 10**6])
def test_im2col_workspace_chunks(limit, mode, restore_config, monkeypatch):
    """Tiny limits force one image (or a few, with an uneven last chunk) per chunk."""
    rng = np.random.default_rng(7)
    x = rng.standard_normal((7, 4, 9, 8))
    w = rng.standard_normal((6, 2, 3, 2))
    kw = dict(stride=(2, 1), padding=(1, 2), dilation=(1, 2), groups=2)
    ref = fastconv.conv2d(x, w, **kw, backend="reference")
    gy = rng.standard_normal(ref.shape)
    want = fastconv.conv2d_backward(gy, x, w, **kw, need_bias=False, backend="reference")
    from fastconv.backends.cython import CythonBackend

    monkeypatch.setattr(CythonBackend, "im2col_mode", mode)
    fastconv.set_workspace_limit(limit)
    out = fastconv.conv2d(x, w, **kw, backend="cython", algorithm="im2col")
    got = fastconv.conv2d_backward(gy, x, w, **kw, need_bias=False, backend="cython", algorithm="im2col")
    assert rel_err(out, ref) <= 1e-12
    assert rel_err(got.input, want.input) <= 1e-12
    assert rel_err(got.weight, want.weight) <= 1e-12


def test_workspace_size_respects_limit(restore_config):
    from fastconv._args import ConvGeometry
    from fastconv.backends.cython import _ThreadBuffers, _Workspace

    g = ConvGeometry(32, 16, 20, 20, 8, 3, 3, (1, 1), (1, 1, 1, 1), (1, 1), 1, np.dtype(np.float32))
    fastconv.set_workspace_limit(1_000_000)
    ws = _Workspace(g)
    assert (ws.col.nbytes + ws.tmp.nbytes) <= 1_000_000
    assert 1 <= ws.chunk < g.n
    fastconv.set_workspace_limit(600_000)  # room for one image's columns (230 kB) per thread, at most 2
    buf = _ThreadBuffers(g, 4)
    assert (buf.threads, buf.chunk) == (2, 1) and buf.cols.nbytes + buf.tmps.nbytes <= 600_000
    fastconv.set_workspace_limit(2_000_000)  # 2 threads x 3 images x (col 230 kB + tmp 12.8 kB)
    buf = _ThreadBuffers(g, 2)
    assert (buf.threads, buf.chunk) == (2, 3) and buf.cols.nbytes + buf.tmps.nbytes <= 2_000_000
    fastconv.set_workspace_limit(1)  # a single image is still processed
    buf = _ThreadBuffers(g, 4)
    assert (buf.threads, buf.chunk) == (1, 1)


def test_blas_thread_count_restored(algorithm, restore_config):
    """Per-image im2col pins BLAS to one thread only while it runs."""
    threadpoolctl = pytest.importorskip("threadpoolctl")
    fastconv.set_num_threads(2)
    before = [lib["num_threads"] for lib in threadpoolctl.threadpool_info()]
    x, w = np.ones((4, 3, 6, 6)), np.ones((2, 3, 3, 3))
    fastconv.conv2d(x, w, backend="cython", algorithm=algorithm)
    fastconv.conv2d_backward(np.ones((4, 2, 4, 4)), x, w, backend="cython", algorithm=algorithm)
    assert [lib["num_threads"] for lib in threadpoolctl.threadpool_info()] == before


def test_thread_counts_agree(algorithm, restore_config):
    rng = np.random.default_rng(3)
    x = rng.standard_normal((5, 6, 24, 22))
    w = rng.standard_normal((4, 3, 3, 3))
    results = []
    for threads in (1, 2, 3):
        fastconv.set_num_threads(threads)
        out = fastconv.conv2d(x, w, padding=1, groups=2, backend="cython", algorithm=algorithm)
        g = fastconv.conv2d_backward(out, x, w, padding=1, groups=2, backend="cython", algorithm=algorithm)
        results.append((out, g.input, g.weight, g.bias))
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert rel_err(a, b) <= 1e-13


def test_concurrent_calls_from_python_threads():
    """Kernels release the GIL and keep no shared state: parallel callers get correct answers."""
    rng = np.random.default_rng(5)
    cases = [(rng.standard_normal((2, 4, 16, 16)).astype(np.float32),
              rng.standard_normal((8, 4, 3, 3)).astype(np.float32)) for _ in range(4)]
    refs = [fastconv.conv2d(x, w, padding=1, backend="reference") for x, w in cases]
    errors: list[float] = []

    def work(i: int) -> None:
        for _ in range(10):
            for algorithm in ALGORITHMS:
                out = fastconv.conv2d(cases[i][0], cases[i][1], padding=1, backend="cython", algorithm=algorithm)
                errors.append(rel_err(out, refs[i]))
            pooled, idx = fastconv.max_pool2d(cases[i][0], 2, return_indices=True, backend="cython")
            want, widx = fastconv.max_pool2d(cases[i][0], 2, return_indices=True, backend="reference")
            errors.append(0.0 if np.array_equal(idx, widx) and np.array_equal(pooled, want) else 1.0)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(errors) == 4 * 10 * 3 and max(errors) <= 1e-5


def test_correlate2d_matches_scipy():
    signal = pytest.importorskip("scipy.signal")
    rng = np.random.default_rng(11)
    image = rng.standard_normal((61, 47))
    for kshape in [(3, 3), (4, 2), (7, 7)]:
        kernel = rng.standard_normal(kshape)
        for mode in ("full", "same", "valid"):
            got = fastconv.correlate2d(image, kernel, mode=mode, backend="cython")
            want = signal.correlate2d(image, kernel, mode=mode)
            assert got.shape == want.shape
            assert rel_err(got, want) <= 1e-12


# --------------------------------------------------------------------------- pooling


def pool_input(rng, shape, dtype, special: bool):
    x = rng.standard_normal(shape).astype(dtype)
    x = np.round(x, 1)  # many exact ties
    if special:
        flat = x.reshape(-1)
        for value, frac in ((np.nan, 0.03), (-np.inf, 0.1), (np.inf, 0.02)):
            flat[rng.random(flat.size) < frac] = value
        x[0, 0] = -np.inf  # a plane whose windows all see only -inf
    return x


@pytest.mark.parametrize("seed", range(24))
def test_max_pool_random(seed):
    rng = np.random.default_rng(seed)
    kh, kw = int(rng.integers(1, 5)), int(rng.integers(1, 5))
    dh, dw = int(rng.integers(1, 3)), int(rng.integers(1, 3))
    ph, pw = int(rng.integers(0, (dh * (kh - 1) + 1) // 2 + 1)), int(rng.integers(0, (dw * (kw - 1) + 1) // 2 + 1))
    ph, pw = min(ph, kh // 2), min(pw, kw // 2)
    stride = (int(rng.integers(1, 4)), int(rng.integers(1, 4)))
    ceil_mode = bool(seed % 2)
    dtype = np.float32 if seed % 3 else np.float64
    h = int(rng.integers(dh * (kh - 1) + 1, 15))
    w = int(rng.integers(dw * (kw - 1) + 1, 15))
    x = pool_input(rng, (2, 3, h, w), dtype, special=seed % 4 == 0)
    kw_ = dict(kernel_size=(kh, kw), stride=stride, padding=(ph, pw), dilation=(dh, dw), ceil_mode=ceil_mode)
    out, idx = fastconv.max_pool2d(x, **kw_, return_indices=True, backend="cython")
    ref, ridx = fastconv.max_pool2d(x, **kw_, return_indices=True, backend="reference")
    assert out.dtype == dtype and idx.dtype == np.int64
    np.testing.assert_array_equal(idx, ridx)
    np.testing.assert_array_equal(out, ref)  # NaN positions equal too
    gy = rng.standard_normal(out.shape).astype(dtype)
    gx = fastconv.max_pool2d_backward(gy, x, **kw_, indices=idx, backend="cython")
    gref = fastconv.max_pool2d_backward(gy, x, **kw_, indices=ridx, backend="reference")
    assert rel_err(gx, gref) <= TOL[dtype]


@pytest.mark.parametrize("seed", range(24))
def test_avg_pool_random(seed):
    rng = np.random.default_rng(100 + seed)
    kh, kw = int(rng.integers(1, 5)), int(rng.integers(1, 5))
    ph, pw = int(rng.integers(0, kh // 2 + 1)), int(rng.integers(0, kw // 2 + 1))
    stride = (int(rng.integers(1, 4)), int(rng.integers(1, 4)))
    dtype = np.float32 if seed % 3 else np.float64
    h, w = int(rng.integers(kh, 15)), int(rng.integers(kw, 15))
    x = rng.standard_normal((2, 3, h, w)).astype(dtype)
    kw_ = dict(kernel_size=(kh, kw), stride=stride, padding=(ph, pw), ceil_mode=bool(seed % 2),
               count_include_pad=bool(seed % 4 < 2))
    out = fastconv.avg_pool2d(x, **kw_, backend="cython")
    ref = fastconv.avg_pool2d(x, **kw_, backend="reference")
    assert out.dtype == dtype and rel_err(out, ref) <= TOL[dtype]
    gy = rng.standard_normal(out.shape).astype(dtype)
    gx = fastconv.avg_pool2d_backward(gy, x.shape, **kw_, backend="cython")
    gref = fastconv.avg_pool2d_backward(gy, x.shape, **kw_, backend="reference")
    assert rel_err(gx, gref) <= TOL[dtype]


def test_blas_is_narrower():
    """Narrower only with AVX-512 tiles and every OpenBLAS core known and without AVX-512."""
    from fastconv.backends.base import blas_is_narrower

    assert blas_is_narrower(True, ["Haswell"]) and blas_is_narrower(True, ["Haswell", "Zen"])
    assert not blas_is_narrower(False, ["Haswell"])
    for cores in (["SkylakeX"], ["Haswell", "SKYLAKEX"], ["cooperlake"], ["SapphireRapids"], [], [""], ["", ""]):
        assert not blas_is_narrower(True, cores), cores


def test_algorithm_choice_with_narrow_blas(monkeypatch):
    """Where the BLAS runs narrower vectors than the tiles, Winograd from 128 channels (not
    16) and pointwise weight gradients on im2col from 65536 weights (not 8192)."""
    import fastconv.backends.cython as cy
    from fastconv._args import ConvGeometry

    be, f32 = cy.CythonBackend(), np.dtype(np.float32)

    def conv(c, k, hw=16, rs=3, n=32):  # 32 images of 16x16 or 14x14: 512 tiles of 4x4
        return ConvGeometry(n, c, hw, hw, k, rs, rs, (1, 1), (rs // 2,) * 4, (1, 1), 1, f32)

    for narrow, expect in ((False, ["winograd"] * 3), (True, ["direct"] * 3)):
        monkeypatch.setattr(cy, "NARROW_BLAS", narrow)
        assert [be.default_algorithm(op, conv(64, 64)) for op in CONV_OPS] == expect
        assert [be.default_algorithm(op, conv(32, 64, 14)) for op in CONV_OPS] == expect
        assert [be.default_algorithm(op, conv(128, 128)) for op in CONV_OPS] == ["winograd"] * 3
        pointwise = be.default_algorithm("conv2d_backward_weight", conv(256, 64, 28, 1))
        assert pointwise == ("direct" if narrow else "im2col")
        assert be.default_algorithm("conv2d_backward_weight", conv(256, 256, 14, 1)) == "im2col"
        assert be.default_algorithm("conv2d_backward_weight", conv(64, 64, 16, 1)) == "direct"
        # fewer tiles than WINOGRAD_MIN_TILES_BLOCKED stay on the blocked kernels (31 images: 496),
        # but from WINOGRAD_WIDE_CHANNELS channels WINOGRAD_MIN_TILES_WIDE are enough (3 images: 48),
        # except for the weight gradient, which needs half as many tiles as channels (4 images: 64)
        assert [be.default_algorithm(op, conv(32, 32, n=31)) for op in CONV_OPS] == ["direct"] * 3
        assert [be.default_algorithm(op, conv(128, 128, n=3)) for op in CONV_OPS] == ["winograd"] * 2 + ["direct"]
        assert [be.default_algorithm(op, conv(128, 128, n=4)) for op in CONV_OPS] == ["winograd"] * 3
        assert [be.default_algorithm(op, conv(128, 128, n=2)) for op in CONV_OPS] == ["direct"] * 3
        one_image = conv(256, 256, 14, n=1)  # (its weight gradient has no blocked kernel: its partial sums
        assert [be.default_algorithm(op, one_image) for op in CONV_OPS[:2]] == ["direct"] * 2  # are too large)


def test_info_and_algorithm_choice(monkeypatch):
    """The rules of ``default_algorithm`` where the BLAS has the tiles' vector width (see
    test_algorithm_choice_with_narrow_blas for the other case)."""
    import fastconv.backends.cython as cy
    from fastconv._args import ConvGeometry
    from fastconv.backends.cython import CythonBackend

    monkeypatch.setattr(cy, "NARROW_BLAS", False)
    be = CythonBackend()
    assert set(be.info()) >= {"openmp", "blas"}
    f32 = np.dtype(np.float32)
    depthwise = ConvGeometry(8, 32, 16, 16, 32, 3, 3, (1, 1), (1, 1, 1, 1), (1, 1), 32, f32)
    wide = ConvGeometry(32, 64, 16, 16, 64, 3, 3, (1, 1), (1, 1, 1, 1), (1, 1), 1, f32)  # 512 tiles
    signal = ConvGeometry(1, 1, 1024, 1024, 1, 3, 3, (1, 1), (1, 1, 1, 1), (1, 1), 1, f32)
    few_channels = ConvGeometry(8, 3, 32, 32, 64, 3, 3, (1, 1), (1, 1, 1, 1), (1, 1), 1, f32)
    strided = ConvGeometry(8, 64, 16, 16, 64, 3, 3, (2, 2), (1, 1, 1, 1), (1, 1), 1, f32)
    for op in ("conv2d", "conv2d_backward_input", "conv2d_backward_weight"):
        assert be.default_algorithm(op, depthwise) == "direct"
        assert be.default_algorithm(op, signal) == "direct"
        assert be.default_algorithm(op, wide) == "winograd"
    # strided: the blocked direct kernels forward and for the weight gradient (any stride),
    # im2col for the input gradient (stride 1 only)
    assert [be.default_algorithm(op, strided) for op in CONV_OPS] == ["direct", "im2col", "direct"]
    # 3 -> 64 channels: the blocked direct kernels; the input gradient's pass has 3 outputs
    assert [be.default_algorithm(op, few_channels) for op in CONV_OPS] == ["direct", "im2col", "direct"]
    # the weight gradient: the blocked kernel also for 1x1 layers with few weights and for one
    # input channel to many outputs; im2col (a GEMM per image) for 1x1 layers with many weights
    pointwise = ConvGeometry(8, 64, 16, 16, 64, 1, 1, (1, 1), (0, 0, 0, 0), (1, 1), 1, f32)
    pointwise_wide = ConvGeometry(8, 256, 16, 16, 64, 1, 1, (1, 1), (0, 0, 0, 0), (1, 1), 1, f32)
    one_to_many = ConvGeometry(64, 1, 28, 28, 32, 3, 3, (1, 1), (1, 1, 1, 1), (1, 1), 1, f32)
    assert be.default_algorithm("conv2d_backward_weight", pointwise) == "direct"
    assert be.default_algorithm("conv2d_backward_weight", pointwise_wide) == "im2col"
    assert be.default_algorithm("conv2d", pointwise_wide) == "direct"
    assert be.default_algorithm("conv2d_backward_weight", one_to_many) == "direct"
    # 4 -> 8 channels: the blocked kernels for all three passes
    four = ConvGeometry(400, 4, 8, 8, 8, 3, 3, (1, 1), (1, 1, 1, 1), (1, 1), 1, f32)
    with num_threads(2):
        assert [be.default_algorithm(op, four) for op in CONV_OPS] == ["direct"] * 3
    # 8 -> 16 channels: blocked where it runs (all three passes), else Winograd; a single image
    # on 2 threads: the blocked forward kernel shares its output channels out (forward pass and
    # input gradient), the weight gradient's does not run on fewer images than threads
    eight = ConvGeometry(400, 8, 8, 8, 16, 3, 3, (1, 1), (1, 1, 1, 1), (1, 1), 1, f32)
    one_image = ConvGeometry(1, 8, 64, 64, 16, 3, 3, (1, 1), (1, 1, 1, 1), (1, 1), 1, f32)
    with num_threads(2):
        assert [be.default_algorithm(op, eight) for op in CONV_OPS] == ["direct"] * 3
        assert [be.default_algorithm(op, one_image) for op in CONV_OPS] == ["direct", "direct", "winograd"]
    first_layer = ConvGeometry(400, 1, 16, 16, 8, 3, 3, (1, 1), (1, 1, 1, 1), (1, 1), 1, f32)
    assert be.default_algorithm("conv2d", first_layer) == "direct"
    assert be.default_algorithm("conv2d_backward_input", first_layer) == "direct"
    assert be.default_algorithm("conv2d_backward_weight", first_layer) == "direct"  # blocked, 8 outputs
