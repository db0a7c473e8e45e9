"""The public API's contract: dtype rules, backend selection, shape helpers, and
scipy.signal compatibility of correlate2d / convolve2d."""

from __future__ import annotations

import os

import numpy as np
import pytest
import scipy.signal

import fastconv
from conftest import assert_close, host_backends, python_child

# --------------------------------------------------------------------------- dtypes


@pytest.mark.parametrize("x_dtype,w_dtype,expected", [
    (np.float32, np.float32, np.float32),
    (np.float64, np.float32, np.float64),
    (np.float16, np.float16, np.float32),
    (np.float16, np.float32, np.float32),
    (np.int32, np.float32, np.float64),
    (np.int8, np.int64, np.float64),
    (np.uint8, np.float32, np.float32),
])
def test_dtype_promotion(x_dtype, w_dtype, expected):
    x = np.arange(2 * 2 * 5 * 5).reshape(2, 2, 5, 5).astype(x_dtype)
    w = np.ones((3, 2, 3, 3), dtype=w_dtype)
    assert np.dtype(expected) == np.result_type(x_dtype, w_dtype, np.float32)
    out = fastconv.conv2d(x, w)
    assert out.dtype == expected
    ref = fastconv.conv2d(x.astype(np.float64), w.astype(np.float64), backend="reference")
    np.testing.assert_allclose(out, ref, rtol=1e-5 if expected == np.float32 else 1e-12)
    assert fastconv.max_pool2d(x, 2).dtype == np.result_type(x_dtype, np.float32)


def test_lists_are_accepted_and_output_is_c_contiguous():
    out = fastconv.conv2d([[[[1.0, 2.0], [3.0, 4.0]]]], [[[[1.0]]]])
    assert out.dtype == np.float64 and out.flags.c_contiguous
    np.testing.assert_array_equal(out, [[[[1.0, 2.0], [3.0, 4.0]]]])


# --------------------------------------------------------------------------- backend selection


def test_available_backends_reports_every_backend():
    info = fastconv.available_backends()
    assert set(info) >= {"reference", "numpy", "cython", "numba", "cuda"}
    assert info["reference"]["available"] and info["numpy"]["available"]
    for name, entry in info.items():
        assert entry["available"] or entry["reason"], name


def test_use_backend_setter_and_context_manager():
    assert fastconv.get_backend() == "auto"
    with fastconv.use_backend("reference"):
        assert fastconv.get_backend() == "reference"
        with fastconv.use_backend("numpy"):
            assert fastconv.get_backend() == "numpy"
        assert fastconv.get_backend() == "reference"
    assert fastconv.get_backend() == "auto"
    fastconv.use_backend("numpy")
    try:
        assert fastconv.get_backend() == "numpy"
    finally:
        fastconv.use_backend("auto")
    with pytest.raises(ValueError, match="use_backend"):
        fastconv.use_backend("tensorflow")


def test_environment_variable_sets_default_and_argument_wins():
    code = ("import fastconv, numpy as np; print(fastconv.get_backend()); "
            "from fastconv import _dispatch; print(_dispatch.resolve(None, 'x').name, "
            "_dispatch.resolve('reference', 'x').name)")
    env = dict(os.environ, FASTCONV_BACKEND="numpy")
    out = python_child(["-c", code], env=env, check=True)
    assert out.stdout.split() == ["numpy", "numpy", "reference"]
    env["FASTCONV_BACKEND"] = "bogus"
    bad = python_child(["-c", "import fastconv, numpy as np; fastconv.conv2d(np.ones((1,1,3,3)), np.ones((1,1,1,1)))"],
                       env=env)
    assert bad.returncode != 0 and "FASTCONV_BACKEND" in bad.stderr


def test_import_is_light():
    code = "import sys, fastconv; print('numba' in sys.modules, 'scipy' in sys.modules)"
    out = python_child(["-c", code], check=True)
    assert out.stdout.split() == ["False", "False"]


def test_unknown_algorithm_is_a_clear_error():
    with pytest.raises(ValueError, match="algorithm"):
        fastconv.conv2d(np.ones((1, 1, 4, 4)), np.ones((1, 1, 3, 3)), backend="numpy", algorithm="fft")


def test_threads_and_workspace_settings_roundtrip():
    before = fastconv.get_num_threads()
    fastconv.set_num_threads(1)
    assert fastconv.get_num_threads() == 1
    fastconv.set_num_threads(before)
    with pytest.raises(ValueError, match="set_num_threads"):
        fastconv.set_num_threads(0)
    limit = fastconv.get_workspace_limit()
    fastconv.set_workspace_limit(1024)  # forces one image per chunk
    try:
        x, w = np.random.default_rng(0).standard_normal((5, 3, 9, 9)), np.ones((4, 3, 3, 3))
        for backend in host_backends():
            assert_close(fastconv.conv2d(x, w, backend=backend), fastconv.conv2d(x, w, backend="reference"),
                         np.float64)
    finally:
        fastconv.set_workspace_limit(limit)


# --------------------------------------------------------------------------- shape helpers


@pytest.mark.parametrize("size,k,s,p,d,ceil", [(28, 3, 1, 1, 1, False), (224, 7, 2, 3, 1, False),
                                                (9, 2, 2, 0, 1, True), (10, 3, 2, 1, 2, True),
                                                (5, 5, 1, 0, 1, False), (11, 3, 3, 1, 1, True)])
def test_conv_output_size_matches_real_outputs(size, k, s, p, d, ceil):
    x = np.zeros((1, 1, size, size))
    if ceil or p <= k // 2:
        expected = fastconv.max_pool2d(x, k, s, p, d, ceil, backend="reference").shape[-1]
    else:
        expected = fastconv.conv2d(x, np.zeros((1, 1, k, k)), None, s, p, d, backend="reference").shape[-1]
    assert fastconv.conv_output_size(size, k, s, p, d, ceil) == expected
    if not ceil:
        conv = fastconv.conv2d(x, np.zeros((1, 1, k, k)), None, s, p, d, backend="reference")
        assert fastconv.conv_output_size(size, k, s, p, d) == conv.shape[-1]
    assert fastconv.conv_output_size(17, 4, padding="same") == 17
    with pytest.raises(ValueError, match="conv_output_size"):
        fastconv.conv_output_size(3, 5)


def test_receptive_field_with_strides():
    # conv3 -> pool2/2 -> conv3 -> conv3 stride 2 -> dilated conv3
    layers = [(3, 1), (2, 2), (3, 1), (3, 2), (3, 1, 2)]
    assert fastconv.receptive_field(layers) == [(3, 1), (4, 2), (8, 2), (12, 4), (28, 4)]
    assert fastconv.receptive_field([((3, 5), (1, 2))]) == [((3, 5), (1, 2))]
    with pytest.raises(TypeError, match="receptive_field"):
        fastconv.receptive_field([3])


def test_receptive_field_is_what_the_gradient_touches():
    # the exact receptive field: the input pixels that influence one output of a conv stack
    layers = [(3, 1), (2, 2), (3, 2)]
    x = np.zeros((1, 1, 32, 32))
    y1 = fastconv.conv2d(x, np.ones((1, 1, 3, 3)))
    y2 = fastconv.max_pool2d(y1, 2)
    y3 = fastconv.conv2d(y2, np.ones((1, 1, 3, 3)), stride=2)
    g3 = np.zeros_like(y3)
    g3[0, 0, 2, 2] = 1
    g2 = fastconv.conv2d_backward(g3, y2, np.ones((1, 1, 3, 3)), stride=2).input
    g1 = fastconv.avg_pool2d_backward(g2, y1.shape, 2)  # avg spreads to the whole window
    g0 = fastconv.conv2d_backward(g1, x, np.ones((1, 1, 3, 3))).input
    rows = np.flatnonzero(g0[0, 0].any(axis=1))
    assert rows.size == fastconv.receptive_field(layers)[-1][0]
    assert fastconv.receptive_field(layers)[-1][1] == 4


def test_conv_params():
    assert fastconv.conv_params(1, 32, 3) == 32 * 9 + 32
    assert fastconv.conv_params(32, 64, (3, 3), bias=False) == 64 * 32 * 9
    assert fastconv.conv_params(128, 128, 3, groups=128) == 128 * 9 + 128
    with pytest.raises(ValueError, match="groups"):
        fastconv.conv_params(3, 4, 3, groups=2)


# --------------------------------------------------------------------------- scipy.signal


SIGNAL_SHAPES = [((9, 11), (3, 3)), ((8, 8), (2, 4)), ((6, 7), (5, 2)), ((5, 5), (7, 9)), ((4, 6), (4, 6)),
                 ((1, 9), (1, 3)), ((10, 3), (4, 1))]


@pytest.mark.parametrize("func", ["correlate2d", "convolve2d"])
@pytest.mark.parametrize("mode", ["full", "same", "valid"])
@pytest.mark.parametrize("boundary", ["fill", "wrap", "symm"])
@pytest.mark.parametrize("shapes", SIGNAL_SHAPES)
def test_signal2d_matches_scipy(func, mode, boundary, shapes):
    rng = np.random.default_rng(len(shapes[0]) * 7 + shapes[1][1])
    a, b = rng.standard_normal(shapes[0]), rng.standard_normal(shapes[1])
    try:
        want = getattr(scipy.signal, func)(a, b, mode=mode, boundary=boundary, fillvalue=1.5)
    except ValueError:
        with pytest.raises(ValueError, match=func):
            getattr(fastconv, func)(a, b, mode=mode, boundary=boundary, fillvalue=1.5)
        return
    got = getattr(fastconv, func)(a, b, mode=mode, boundary=boundary, fillvalue=1.5)
    assert got.dtype == want.dtype and got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", host_backends() + ["reference"])
@pytest.mark.parametrize("dtypes", [(np.float32, np.float32), (np.float64, np.float32), (np.int32, np.int32),
                                    (np.uint8, np.int16)])
def test_signal2d_dtypes_match_scipy(backend, dtypes):
    rng = np.random.default_rng(3)
    a = (rng.standard_normal((12, 10)) * 10).astype(dtypes[0])
    b = (rng.standard_normal((3, 4)) * 3).astype(dtypes[1])
    for mode in ("full", "same", "valid"):
        want = scipy.signal.correlate2d(a, b, mode=mode)
        got = fastconv.correlate2d(a, b, mode=mode, backend=backend)
        assert got.dtype == want.dtype
        np.testing.assert_allclose(got, want, rtol=2e-6 if want.dtype == np.float32 else 1e-12, atol=1e-4)
        np.testing.assert_allclose(fastconv.convolve2d(a, b, mode=mode, backend=backend),
                                   scipy.signal.convolve2d(a, b, mode=mode), rtol=2e-6, atol=1e-4)


def test_required_backends_are_available():
    """CI sets FASTCONV_REQUIRE_BACKENDS so that a build that silently lost a compiled
    backend fails here instead of skipping that backend's tests."""
    required = [name for name in os.environ.get("FASTCONV_REQUIRE_BACKENDS", "").split(",") if name]
    info = fastconv.available_backends()
    for name in required:
        assert info[name]["available"], f"backend {name!r} unavailable: {info[name]['reason']}"


def test_set_num_threads_reaches_blas_loaded_later():
    pytest.importorskip("threadpoolctl")
    code = ("import fastconv, numpy as np\n"
            "fastconv.set_num_threads(1)\n"
            "fastconv.available_backends()  # loads every backend, and the BLAS each brings\n"
            "from threadpoolctl import threadpool_info\n"
            "print(sorted({i['num_threads'] for i in threadpool_info() if i['user_api'] == 'blas'}))")
    out = python_child(["-c", code], check=True)
    assert out.stdout.strip().splitlines()[-1] == "[1]"


@pytest.mark.parametrize("preset, expected", [
    ({}, "GOMP_SPINCOUNT=3000"),
    ({"OMP_WAIT_POLICY": "PASSIVE"}, "OMP_WAIT_POLICY=PASSIVE"),
    ({"GOMP_SPINCOUNT": "7"}, "GOMP_SPINCOUNT=7"),
])
def test_openmp_wait_default_leaves_a_users_choice(preset, expected):
    """Importing fastconv sets a short OpenMP spin (before any backend loads libgomp, which
    reads the environment once) only where the user chose no wait policy."""
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")} | preset
    code = "import fastconv\nprint(fastconv._config.openmp_wait())\n"
    out = python_child(["-c", code], check=True, env=env)
    assert out.stdout.strip().splitlines()[-1] == expected
