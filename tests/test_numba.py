"""Tests specific to the numba backend: correctness against the reference on many
random configurations, lazy compilation, the on-disk cache, threads and workspace.

Every kernel is compiled once per dtype for the whole session (numba keeps the
specialisations), so the grids below reuse them across many configurations.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("numba")

import fastconv as fc  # noqa: E402
from conftest import num_threads  # noqa: E402

#: the directory holding the fastconv this process imported (installed, or the source tree)
PACKAGE_PARENT = Path(fc.__file__).resolve().parents[1]
DTYPES = [np.float32, np.float64]
TOL = {np.float32: 1e-5, np.float64: 1e-12}


def _nb():
    from fastconv.backends import numba as nbmod

    return nbmod


def rel_err(a: np.ndarray, ref: np.ndarray) -> float:
    ref = np.asarray(ref, dtype=np.float64)
    diff = np.linalg.norm((np.asarray(a, dtype=np.float64) - ref).ravel())
    scale = np.linalg.norm(ref.ravel())
    return diff / scale if scale > 0 else diff


def _conv_configs(rng: np.random.Generator, count: int):
    """Random conv configurations: strides 1-3, padding 0-3 / "same" / "valid",
    dilation 1-3, groups (incl. depthwise), even and odd kernels."""
    for trial in range(count):
        kind = trial % 4
        groups = 1 if kind == 0 else int(rng.integers(2, 4))
        cpg, kpg = int(rng.integers(1, 4)), int(rng.integers(1, 4))
        if kind == 3:  # depthwise
            groups, cpg, kpg = int(rng.integers(2, 6)), 1, 1
        r, s = int(rng.integers(1, 6)), int(rng.integers(1, 6))
        dil = (int(rng.integers(1, 4)), int(rng.integers(1, 4)))
        if trial % 7 == 0:
            stride, pad = (1, 1), "same"
        elif trial % 7 == 1:
            stride, pad = (int(rng.integers(1, 4)), int(rng.integers(1, 4))), "valid"
        else:
            stride = (int(rng.integers(1, 4)), int(rng.integers(1, 4)))
            pad = (int(rng.integers(0, 4)), int(rng.integers(0, 4)))
        h = int(rng.integers(dil[0] * (r - 1) + 1, 16))
        w = int(rng.integers(dil[1] * (s - 1) + 1, 16))
        yield dict(n=int(rng.integers(1, 4)), c=cpg * groups, k=kpg * groups, h=h, w=w, r=r, s=s,
                   stride=stride, padding=pad, dilation=dil, groups=groups)


@pytest.mark.parametrize("algorithm", ["direct", "im2col"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_conv_matches_reference(dtype, algorithm):
    rng = np.random.default_rng(1234)
    for cfg in _conv_configs(rng, 40):
        x = rng.standard_normal((cfg["n"], cfg["c"], cfg["h"], cfg["w"])).astype(dtype)
        w = rng.standard_normal((cfg["k"], cfg["c"] // cfg["groups"], cfg["r"], cfg["s"])).astype(dtype)
        b = rng.standard_normal(cfg["k"]).astype(dtype)
        args = (cfg["stride"], cfg["padding"], cfg["dilation"], cfg["groups"])
        ref = fc.conv2d(x, w, b, *args, backend="reference")
        out = fc.conv2d(x, w, b, *args, backend="numba", algorithm=algorithm)
        assert out.dtype == dtype and out.flags.c_contiguous and out.shape == ref.shape
        assert rel_err(out, ref) <= TOL[dtype], cfg
        gy = rng.standard_normal(ref.shape).astype(dtype)
        rg = fc.conv2d_backward(gy, x, w, *args, backend="reference")
        ng = fc.conv2d_backward(gy, x, w, *args, backend="numba", algorithm=algorithm)
        for name in ("input", "weight", "bias"):
            got, want = getattr(ng, name), getattr(rg, name)
            assert got.dtype == dtype and got.shape == want.shape and got.flags.c_contiguous
            assert rel_err(got, want) <= TOL[dtype], (name, cfg)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("threads", [1, 2])
def test_flat_3x3_kernel(dtype, threads):
    """The flat-plane 3x3 stride-1 direct kernel (forward, and the input gradient through the
    rotated kernel): planes of several segments, padding beyond the kernel's reach (the input
    gradient then crops), dilation, groups, more work units than workers."""
    rng = np.random.default_rng(11)
    for (n, c, h, w, k, pad, dil, groups) in [(3, 1, 64, 80, 4, 1, 1, 1), (2, 3, 70, 90, 6, (3, 5), (1, 2), 3),
                                               (5, 2, 9, 7, 4, (0, 2), (2, 1), 2), (1, 1, 5, 200, 8, 0, 1, 1)]:
        x = rng.standard_normal((n, c, h, w)).astype(dtype)
        wt = rng.standard_normal((k, c // groups, 3, 3)).astype(dtype)
        b = rng.standard_normal(k).astype(dtype)
        kw = dict(padding=pad, dilation=dil, groups=groups)
        with num_threads(threads):
            out = fc.conv2d(x, wt, b, **kw, backend="numba", algorithm="direct")
            gy = rng.standard_normal(out.shape).astype(dtype)
            gx = fc.conv2d_backward(gy, x, wt, **kw, backend="numba", algorithm="direct", need_weight=False,
                                    need_bias=False).input
        assert rel_err(out, fc.conv2d(x, wt, b, **kw, backend="reference")) <= TOL[dtype]
        assert rel_err(gx, fc.conv2d_backward(gy, x, wt, **kw, backend="reference").input) <= TOL[dtype]


@pytest.mark.parametrize("algorithm", ["direct", "im2col"])
def test_taps_that_never_touch_the_image(algorithm):
    """Images narrower than the dilated kernel with padding: some taps land only in the
    padding (their column range is empty); nothing may be written past a row."""
    rng = np.random.default_rng(9)
    for shape, kernel, pad, dil in [((3, 2, 9, 1), (3, 3), "same", (3, 3)),
                                    ((2, 3, 1, 7), (3, 2), (3, 4), (2, 3)),
                                    ((2, 2, 2, 2), (4, 4), 5, 2)]:
        x = rng.standard_normal(shape)
        w = rng.standard_normal((4, shape[1]) + kernel)
        ref = fc.conv2d(x, w, padding=pad, dilation=dil, backend="reference")
        got = fc.conv2d(x, w, padding=pad, dilation=dil, backend="numba", algorithm=algorithm)
        assert rel_err(got, ref) <= 1e-12
        gy = rng.standard_normal(ref.shape)
        rg = fc.conv2d_backward(gy, x, w, padding=pad, dilation=dil, backend="reference")
        ng = fc.conv2d_backward(gy, x, w, padding=pad, dilation=dil, backend="numba", algorithm=algorithm)
        assert rel_err(ng.input, rg.input) <= 1e-12
        assert rel_err(ng.weight, rg.weight) <= 1e-12


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", ["pointwise", "pointwise-groups", "large-plane", "large-plane-groups"])
def test_im2col_special_paths(dtype, case):
    """im2col paths: 1x1 stride-1 unpadded convs skip the unfolding (GEMMs on the NCHW arrays),
    and output planes of >= 1024 pixels are lowered one image per work unit."""
    rng = np.random.default_rng(21)
    n, c, k, groups = 3, 4, 6, 2 if case.endswith("groups") else 1
    if case.startswith("pointwise"):
        x, w, args = rng.standard_normal((n, c, 9, 7)), rng.standard_normal((k, c // groups, 1, 1)), (1, 0, 1)
    else:
        x, w, args = rng.standard_normal((n, c, 47, 52)), rng.standard_normal((k, c // groups, 3, 2)), (1, 1, 1)
    x, w, b = x.astype(dtype), w.astype(dtype), rng.standard_normal(k).astype(dtype)
    ref = fc.conv2d(x, w, b, *args, groups, backend="reference")
    got = fc.conv2d(x, w, b, *args, groups, backend="numba", algorithm="im2col")
    assert rel_err(got, ref) <= TOL[dtype]
    gy = rng.standard_normal(ref.shape).astype(dtype)
    rg = fc.conv2d_backward(gy, x, w, *args, groups, backend="reference")
    ng = fc.conv2d_backward(gy, x, w, *args, groups, backend="numba", algorithm="im2col")
    for name in ("input", "weight", "bias"):
        assert rel_err(getattr(ng, name), getattr(rg, name)) <= TOL[dtype], name


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [1, 3])
def test_im2col_row_blocks(dtype, n, monkeypatch):
    """Large planes lowered a few output rows at a time (a small block budget forces many
    blocks, the last one shorter): strides that skip input rows (which the input gradient
    must still zero), padding, dilation, groups; a single image (forward and weight gradient
    then spread its row blocks over the workers, the input gradient runs on one worker)."""
    nbmod = _nb()
    rng = np.random.default_rng(22)
    for c, k, groups, shape, kernel, stride, pad, dil in [
            (2, 4, 1, (100, 70), (2, 2), (3, 2), (0, 1), (1, 1)),
            (4, 6, 2, (45, 48), (3, 2), (2, 1), (2, 1), (2, 1)),
            (3, 5, 1, (37, 40), (5, 5), (1, 1), (2, 2), (1, 1))]:
        x = rng.standard_normal((n, c) + shape).astype(dtype)
        w = rng.standard_normal((k, c // groups) + kernel).astype(dtype)
        b = rng.standard_normal(k).astype(dtype)
        args = dict(stride=stride, padding=pad, dilation=dil, groups=groups)
        g = nbmod.ConvGeometry(n, c, *shape, k, *kernel, stride, (pad[0], pad[0], pad[1], pad[1]), dil, groups,
                               np.dtype(dtype))
        # a block budget of 4 output rows (the output heights are not multiples of 4)
        monkeypatch.setattr(nbmod, "_BLOCK_BYTES", 4 * (c * kernel[0] * kernel[1] + k) * g.out_w * x.itemsize)
        plan = nbmod._ThreadPlan(g, "forward")
        assert plan.chunk == 1 and plan.rows == 4 and g.out_h % 4
        ref = fc.conv2d(x, w, b, **args, backend="reference")
        got = fc.conv2d(x, w, b, **args, backend="numba", algorithm="im2col")
        assert rel_err(got, ref) <= TOL[dtype]
        gy = rng.standard_normal(ref.shape).astype(dtype)
        rg = fc.conv2d_backward(gy, x, w, **args, backend="reference")
        ng = fc.conv2d_backward(gy, x, w, **args, backend="numba", algorithm="im2col")
        for name in ("input", "weight", "bias"):
            assert rel_err(getattr(ng, name), getattr(rg, name)) <= TOL[dtype], name


@pytest.mark.parametrize("dtype", DTYPES)
def test_large_single_image_correlate(dtype):
    """The C = K = 1 path used by correlate2d/convolve2d, against scipy."""
    signal = pytest.importorskip("scipy.signal")
    rng = np.random.default_rng(5)
    img = rng.standard_normal((300, 257)).astype(dtype)
    for shape in [(3, 3), (7, 4)]:
        ker = rng.standard_normal(shape).astype(dtype)
        for mode in ("full", "same", "valid"):
            want = signal.correlate2d(img.astype(np.float64), ker.astype(np.float64), mode=mode)
            got = fc.correlate2d(img, ker, mode=mode, backend="numba")
            assert got.shape == want.shape
            assert rel_err(got, want) <= TOL[dtype]
            got = fc.convolve2d(img, ker, mode=mode, backend="numba")
            want = signal.convolve2d(img.astype(np.float64), ker.astype(np.float64), mode=mode)
            assert rel_err(got, want) <= TOL[dtype]


def _pool_configs(rng: np.random.Generator, count: int):
    for _ in range(count):
        k = (int(rng.integers(1, 5)), int(rng.integers(1, 5)))
        yield dict(kernel_size=k,
                   stride=(int(rng.integers(1, 4)), int(rng.integers(1, 4))),
                   padding=(int(rng.integers(0, k[0] // 2 + 1)), int(rng.integers(0, k[1] // 2 + 1))),
                   dilation=(int(rng.integers(1, 3)), int(rng.integers(1, 3))),
                   ceil_mode=bool(rng.integers(0, 2)))


@pytest.mark.parametrize("dtype", DTYPES)
def test_max_pool_matches_reference_exactly(dtype):
    """Values and int64 indices identical to the reference, with NaN, -inf and ties."""
    rng = np.random.default_rng(7)
    checked = 0
    for cfg in _pool_configs(rng, 80):
        x = rng.standard_normal((2, 3, int(rng.integers(4, 13)), int(rng.integers(4, 13)))).astype(dtype)
        x[rng.random(x.shape) < 0.05] = np.nan
        x[rng.random(x.shape) < 0.05] = -np.inf
        x[rng.random(x.shape) < 0.15] = 1.0  # ties
        zeros = rng.random(x.shape) < 0.1  # signed zeros tie too
        x[zeros] = np.where(rng.random(int(zeros.sum())) < 0.5, 0.0, -0.0)
        if rng.random() < 0.2:
            x[0, 0] = -np.inf  # whole plane -inf: default index rules
        try:
            ro, ri = fc.max_pool2d(x, return_indices=True, backend="reference", **cfg)
        except ValueError:  # output would be empty for this random size
            continue
        no, ni = fc.max_pool2d(x, return_indices=True, backend="numba", **cfg)
        assert no.dtype == dtype and ni.dtype == np.int64
        np.testing.assert_array_equal(no, ro)  # NaN positions must agree too
        np.testing.assert_array_equal(np.signbit(no), np.signbit(ro))  # -0.0 vs 0.0: the first tap's
        np.testing.assert_array_equal(ni, ri)
        gy = rng.standard_normal(ro.shape).astype(dtype)
        want = fc.max_pool2d_backward(gy, x, indices=ri, backend="reference", **cfg)
        got = fc.max_pool2d_backward(gy, x, indices=ri, backend="numba", **cfg)
        assert rel_err(got, want) <= TOL[dtype]
        checked += 1
    assert checked > 40


@pytest.mark.parametrize("dtype", DTYPES)
def test_avg_pool_matches_reference(dtype):
    rng = np.random.default_rng(11)
    checked = 0
    for cfg in _pool_configs(rng, 80):
        cfg.pop("dilation")
        cfg["count_include_pad"] = bool(rng.integers(0, 2))
        x = rng.standard_normal((2, 3, int(rng.integers(4, 13)), int(rng.integers(4, 13)))).astype(dtype)
        try:
            want = fc.avg_pool2d(x, backend="reference", **cfg)
        except ValueError:
            continue
        got = fc.avg_pool2d(x, backend="numba", **cfg)
        assert got.dtype == dtype and rel_err(got, want) <= TOL[dtype], cfg
        gy = rng.standard_normal(want.shape).astype(dtype)
        want = fc.avg_pool2d_backward(gy, x.shape, backend="reference", **cfg)
        got = fc.avg_pool2d_backward(gy, x.shape, backend="numba", **cfg)
        assert rel_err(got, want) <= TOL[dtype], cfg
        checked += 1
    assert checked > 40


@pytest.mark.parametrize("dtype", DTYPES)
def test_pools_on_long_rows(dtype):
    """Rows of 32 and more outputs: avg_pool2d then deinterleaves strided input rows too (the
    random grids above only draw short rows); strides 2 (the special-cased split) and 3, odd
    widths, padding, ceil_mode, both divisor rules; max pooling with NaN and ties."""
    rng = np.random.default_rng(17)
    for kernel, stride, pad, width, ceil in [(3, 2, 1, 113, False), (2, 2, 0, 70, True), (4, 3, 2, 101, True),
                                             (3, 3, 0, 99, False), (5, 2, 2, 68, False)]:
        x = rng.standard_normal((2, 3, 9, width)).astype(dtype)
        cfg = dict(kernel_size=kernel, stride=stride, padding=pad, ceil_mode=ceil)
        for cip in (True, False):
            want = fc.avg_pool2d(x, count_include_pad=cip, backend="reference", **cfg)
            assert want.shape[-1] >= 32
            got = fc.avg_pool2d(x, count_include_pad=cip, backend="numba", **cfg)
            assert rel_err(got, want) <= TOL[dtype], (cfg, cip)
        xm = x.copy()
        xm[rng.random(x.shape) < 0.03] = np.nan
        xm[rng.random(x.shape) < 0.1] = 0.5
        ro, ri = fc.max_pool2d(xm, return_indices=True, backend="reference", **cfg)
        no, ni = fc.max_pool2d(xm, return_indices=True, backend="numba", **cfg)
        np.testing.assert_array_equal(no, ro)
        np.testing.assert_array_equal(ni, ri)


def test_read_only_inputs_share_one_specialisation():
    x = np.random.default_rng(0).standard_normal((1, 2, 9, 9))
    fc.max_pool2d(x, 2, backend="numba")
    before = len(_nb()._kernels.max_pool2d.overloads)
    x.flags.writeable = False
    out = fc.max_pool2d(x, 2, backend="numba")
    assert len(_nb()._kernels.max_pool2d.overloads) == before
    np.testing.assert_array_equal(out, fc.max_pool2d(x, 2, backend="reference"))


@pytest.mark.parametrize("algorithm", ["direct", "im2col"])
def test_thread_count_does_not_change_results(algorithm):
    """Work items write disjoint memory and sum sequentially: 1 and 2 threads agree bitwise."""
    import numba

    rng = np.random.default_rng(3)
    x = rng.standard_normal((3, 4, 20, 18)).astype(np.float32)
    w = rng.standard_normal((6, 4, 3, 3)).astype(np.float32)
    before = fc.get_num_threads()
    try:
        fc.set_num_threads(1)
        one = fc.conv2d(x, w, padding=1, backend="numba", algorithm=algorithm)
        assert numba.get_num_threads() == 1
        fc.set_num_threads(2)
        two = fc.conv2d(x, w, padding=1, backend="numba", algorithm=algorithm)
        assert numba.get_num_threads() == min(2, numba.config.NUMBA_NUM_THREADS)
    finally:
        fc.set_num_threads(before)
    if algorithm == "direct":
        np.testing.assert_array_equal(one, two)
    else:  # BLAS may block differently with a different thread count
        assert rel_err(one, two) <= 1e-6


def test_concurrent_calls_from_python_threads():
    rng = np.random.default_rng(4)
    xs = [rng.standard_normal((2, 3, 17, 15)) for _ in range(6)]
    w = rng.standard_normal((4, 3, 3, 3))
    want = [fc.conv2d(x, w, padding=1, backend="reference") for x in xs]
    got = [None] * len(xs)

    def work(i):
        got[i] = fc.conv2d(xs[i], w, padding=1, backend="numba", algorithm=("direct", "im2col")[i % 2])

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(xs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for a, b in zip(got, want):
        assert rel_err(a, b) <= 1e-12


def test_small_workspace_chunks_the_batch(monkeypatch):
    """With a tiny workspace limit, im2col processes one image at a time; same results."""
    from fastconv import _config

    nbmod = _nb()
    chunks = []
    real = _config.batch_chunk
    monkeypatch.setattr(_config, "batch_chunk", lambda b, n: chunks.append(real(b, n)) or chunks[-1])
    rng = np.random.default_rng(8)
    x = rng.standard_normal((5, 4, 11, 10))
    w = rng.standard_normal((6, 2, 3, 3))
    before = _config.get_workspace_limit()
    try:
        _config.set_workspace_limit(1)
        out = fc.conv2d(x, w, stride=2, padding=1, groups=2, backend="numba", algorithm="im2col")
        gy = rng.standard_normal(out.shape)
        grads = fc.conv2d_backward(gy, x, w, stride=2, padding=1, groups=2, backend="numba", algorithm="im2col")
    finally:
        _config.set_workspace_limit(before)
    assert chunks and all(c == 1 for c in chunks)
    assert nbmod.NumbaBackend.algorithms == ("direct", "im2col", "winograd")
    ref = fc.conv2d_backward(gy, x, w, stride=2, padding=1, groups=2, backend="reference")
    assert rel_err(out, fc.conv2d(x, w, stride=2, padding=1, groups=2, backend="reference")) <= 1e-12
    assert rel_err(grads.input, ref.input) <= 1e-12
    assert rel_err(grads.weight, ref.weight) <= 1e-12


def test_info_reports_version_threading_and_compile_times():
    fc.max_pool2d(np.ones((1, 1, 4, 4)), 2, backend="numba")
    info = fc.available_backends()["numba"]
    assert info["available"]
    import numba

    assert info["numba_version"] == numba.__version__
    assert "threading_layer" in info
    assert "pool2d_flat[float64]" in info["compile_seconds"]  # 2x2/2 takes the flat path
    assert all(v >= 0 for v in _nb().compile_times().values())


def _run(code: str, env: dict[str, str]) -> dict:
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=PACKAGE_PARENT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(PACKAGE_PARENT) + os.pathsep + env.get("PYTHONPATH", "")
    env.update(extra)
    return env


def test_import_compiles_nothing():
    result = _run("""
        import json, sys
        import fastconv
        loaded_early = "numba" in sys.modules
        import fastconv.backends.numba as nb
        kernels = [getattr(m, k) for m in (nb._kernels, nb._wk) for k in dir(m)
                   if hasattr(getattr(m, k), "overloads")]
        names = [k.py_func.__name__ for k in kernels]
        print(json.dumps({"early": loaded_early, "kernels": len(kernels), "names": names,
                          "compiled": sum(len(k.overloads) for k in kernels), "times": nb.compile_times()}))
    """, _env())
    assert not result["early"], "import fastconv must not import numba"
    assert result["kernels"] >= 12
    assert {"winograd_forward", "winograd_backward_weight", "max_pool2d", "avg_pool2d", "pool2d_flat",
            "conv2d_im2col", "conv2d_backward_input_im2col", "conv2d_backward_weight_im2col"} <= set(result["names"])
    assert result["compiled"] == 0 and result["times"] == {}


def test_second_process_loads_from_cache(tmp_path):
    """Run the same calls in two processes sharing NUMBA_CACHE_DIR: the second one loads
    the kernels from the cache (cache hits, no misses) and spends less time than the first."""
    code = """
        import json
        import numpy as np
        import fastconv as fc
        import fastconv.backends.numba as nb
        x = np.ones((1, 2, 8, 8), np.float32)
        fc.max_pool2d(x, 2, backend="numba")  # the flat path
        fc.conv2d(x, np.ones((3, 2, 3, 3), np.float32), backend="numba", algorithm="direct")  # flat 3x3
        fc.conv2d(x, np.ones((3, 2, 3, 3), np.float32), backend="numba", algorithm="winograd")
        stats = [nb._kernels.pool2d_flat.stats, nb._kernels.conv2d_direct3x3.stats, nb._wk.winograd_forward.stats,
                 nb._wk.transform_weight.stats]
        print(json.dumps({"times": nb.compile_times(),
                          "hits": sum(sum(s.cache_hits.values()) for s in stats),
                          "misses": sum(sum(s.cache_misses.values()) for s in stats)}))
    """
    env = _env(NUMBA_CACHE_DIR=str(tmp_path))
    first, second = _run(code, env), _run(code, env)
    assert first["misses"] == 4 and first["hits"] == 0
    assert second["hits"] == 4 and second["misses"] == 0
    assert (set(first["times"]) == set(second["times"])
            == {"pool2d_flat[float32]", "conv2d_direct3x3[float32]", "winograd_forward[float32]",
                "transform_weight[float32]"})
    assert sum(second["times"].values()) < sum(first["times"].values())


def test_register_tiles_fit_the_target(monkeypatch):
    """The blocked kernels' accumulators are cut to the compile target's vector registers:
    one 8-channel panel with AVX-512's 32 registers, 4-channel panels with AVX2's 16 ymm,
    2-channel panels on baseline SSE2 (16 xmm; a float32 row of 16 is then 4 vectors)."""
    from numba.core import config

    from fastconv.backends.numba import _blocked as bl

    cases = {"skylake-avx512": ("+avx512f,+avx2,+avx", (64, 24)), "haswell": ("+avx2,+avx,+fma", (32, 12)),
             "generic": ("", (16, 12))}
    for cpu, (features, expected) in cases.items():
        monkeypatch.setattr(config, "CPU_NAME", cpu)
        monkeypatch.setattr(config, "CPU_FEATURES", features)
        assert bl.target_registers() == expected, cpu
    # (width, registers per item, budget) -> the largest divisor of width that fits
    assert bl._panel(bl.KBLOCK, 2, 24) == 8     # AVX-512 float32 and float64: 16 accumulators
    assert bl._panel(bl.KBLOCK, 2, 12) == 4     # AVX2 float32: two panels of 4 channels
    assert bl._panel(bl.KBLOCK, 4, 12) == 2     # AVX2 float64, SSE2 float32
    assert bl._panel(bl.WJ, bl.WQ, 12) == 2     # the weight tile on AVX2, float32
    assert bl._panel(bl.WJ, 2 * bl.WQ, 12) == 1  # ... float64: one channel of 6 taps
    assert bl._panel(bl.WJ, bl.WQ, 24) == 4


def test_generic_target_matches_reference(tmp_path):
    """The narrowest register panels (NUMBA_CPU_NAME=generic: SSE2, 2-channel forward panels,
    1-channel weight-gradient chunks for float64) against the reference: a fresh process
    computes with them, this one checks."""
    kw = dict(stride=(1, 2), padding=(1, 0), groups=2)
    rng = np.random.default_rng(3)
    cases = {}
    for dtype in DTYPES:
        x = rng.standard_normal((3, 6, 11, 9)).astype(dtype)
        w = rng.standard_normal((10, 3, 3, 2)).astype(dtype)
        gy = rng.standard_normal(fc.conv2d(x, w, **kw, backend="reference").shape).astype(dtype)
        cases[np.dtype(dtype).name] = (x, w, gy)
    np.savez(tmp_path / "in.npz", **{f"{name}_{k}": a for name, arrs in cases.items() for k, a in zip("xwg", arrs)})
    result = _run(f"""
        import json
        import numpy as np
        import fastconv as fc
        from fastconv.backends.numba import _blocked
        inp, out = np.load({str(tmp_path / "in.npz")!r}), {{}}
        for name in {list(cases)!r}:
            x, w, gy = (inp[f"{{name}}_{{k}}"] for k in "xwg")
            out[name + "_y"] = fc.conv2d(x, w, **{kw!r}, backend="numba", algorithm="direct")
            out[name + "_gw"] = fc.conv2d_backward(gy, x, w, **{kw!r}, backend="numba", algorithm="direct",
                                                   need_input=False).weight
        np.savez({str(tmp_path / "out.npz")!r}, **out)
        print(json.dumps({{"registers": _blocked.target_registers()}}))
    """, _env(NUMBA_CPU_NAME="generic", NUMBA_CACHE_DIR=str(tmp_path)))
    assert result["registers"] == [16, 12]
    got = np.load(tmp_path / "out.npz")
    for dtype in DTYPES:
        name = np.dtype(dtype).name
        x, w, gy = cases[name]
        ref = fc.conv2d_backward(gy, x, w, **kw, backend="reference", need_input=False)
        assert rel_err(got[name + "_y"], fc.conv2d(x, w, **kw, backend="reference")) <= TOL[dtype]
        assert rel_err(got[name + "_gw"], ref.weight) <= TOL[dtype]


def test_algorithm_choice_with_narrow_blas(monkeypatch):
    """Where the BLAS runs narrower vectors than the core offers, Winograd from 64 channels
    where the blocked kernel runs (not 16); elsewhere from 16."""
    import fastconv.backends.numba as nbmod
    from fastconv._args import ConvGeometry
    from fastconv.backends.base import CONV_OPS

    be, f32 = nbmod.NumbaBackend(), np.dtype(np.float32)

    def conv(c, k, hw=14):  # 32 images: at least 512 tiles of 4x4
        return ConvGeometry(32, c, hw, hw, k, 3, 3, (1, 1), (1, 1, 1, 1), (1, 1), 1, f32)

    for narrow, expect in ((False, ["winograd"] * 3), (True, ["direct"] * 3)):
        monkeypatch.setattr(nbmod, "NARROW_BLAS", narrow)
        assert [be.default_algorithm(op, conv(16, 16, 28)) for op in CONV_OPS] == expect
        assert [be.default_algorithm(op, conv(32, 64)) for op in CONV_OPS] == expect
        assert [be.default_algorithm(op, conv(64, 64, 32)) for op in CONV_OPS] == ["winograd"] * 3
        assert be.info()["narrow_blas"] is narrow


@pytest.mark.parametrize("narrow", [False, True])
def test_small_batches_of_small_planes_stay_direct(narrow, monkeypatch):
    """Where the blocked kernel runs, Winograd also needs WINOGRAD_MIN_TILES_BLOCKED output
    tiles over the batch, or WINOGRAD_MIN_TILES_WIDE from WINOGRAD_WIDE_CHANNELS channels: one
    image of 256 channels on 14x14 (16 tiles) stays direct, two (32 tiles) run Winograd, and
    so do four images of 16 channels on 28x28 (196 tiles) only without the wide rule."""
    import fastconv.backends.numba as nbmod
    from fastconv._args import ConvGeometry
    from fastconv.backends.base import CONV_OPS

    monkeypatch.setattr(nbmod, "NARROW_BLAS", narrow)
    be, f32 = nbmod.NumbaBackend(), np.dtype(np.float32)

    def conv(n, c=256, hw=14):
        return ConvGeometry(n, c, hw, hw, c, 3, 3, (1, 1), (1, 1, 1, 1), (1, 1), 1, f32)

    with num_threads(2):
        assert [be.default_algorithm(op, conv(1)) for op in CONV_OPS[:2]] == ["direct"] * 2
        assert [be.default_algorithm(op, conv(2)) for op in CONV_OPS[:2]] == ["winograd"] * 2
        assert [be.default_algorithm(op, conv(8)) for op in CONV_OPS[:2]] == ["winograd"] * 2
        assert [be.default_algorithm(op, conv(4, 16, 28)) for op in CONV_OPS[:2]] == ["direct"] * 2
