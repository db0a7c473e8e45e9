"""Winograd F(4x4, 3x3): the transforms, and every backend offering it, against the reference.

The generic grids (test_backends, test_properties) mostly draw layers Winograd cannot run;
this module draws 3x3 stride-1 layers only: dilation (the residue-class tiling), every
padding including "same", "valid" and padding beyond the kernel (negative padding in the
input-gradient pass), groups, planes smaller than a tile, odd sizes, many channels,
non-contiguous inputs, both dtypes, forced multi-threading.
"""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest

import fastconv
from fastconv import _args, _config, _dispatch
from fastconv import _winograd as wino
from conftest import TOLERANCE, layout, num_threads, rel_err

WINOGRAD_BACKENDS = [name for name, info in fastconv.available_backends().items()
                     if info["available"] and "winograd" in info["algorithms"]]
pytestmark = pytest.mark.skipif(not WINOGRAD_BACKENDS, reason="no backend with Winograd built")


@pytest.fixture(autouse=True)
def always_parallel(monkeypatch):
    """Tiny test shapes would run on one thread; force the multi-threaded paths of the Cython
    (OpenMP) and numba (prange workers) backends."""
    monkeypatch.setattr("fastconv.backends.cython.SERIAL_WORK", 0, raising=False)
    if "numba" in WINOGRAD_BACKENDS:
        monkeypatch.setattr("fastconv.backends.numba.SERIAL_WORK", 0)


# --------------------------------------------------------------------------- the transforms

@pytest.mark.parametrize("m", sorted(wino.POINTS))
def test_transforms_compute_the_correlation(m):
    """A^T [(G g G^T) * (B^T d B)] A equals the 3x3 correlation of an (m+2)^2 tile, in float64."""
    t = wino.matrices(m)
    rng = np.random.default_rng(m)
    for _ in range(5):
        d = rng.standard_normal((t.a, t.a))
        g = rng.standard_normal((3, 3))
        y = t.at @ ((t.g @ g @ t.g.T) * (t.bt @ d @ t.bt.T)) @ t.at.T
        direct = np.array([[np.sum(d[i:i + 3, j:j + 3] * g) for j in range(m)] for i in range(m)])
        np.testing.assert_allclose(y, direct, rtol=0, atol=1e-12)


def test_f4_matrices_are_the_published_ones():
    """The construction reproduces Lavin & Gray's F(4x4, 3x3) matrices (points 0, +-1, +-2)."""
    t = wino.matrices(4)
    np.testing.assert_array_equal(t.bt, [[4, 0, -5, 0, 1, 0], [0, -4, -4, 1, 1, 0], [0, 4, -4, -1, 1, 0],
                                         [0, -2, -1, 2, 1, 0], [0, 2, -1, -2, 1, 0], [0, 4, 0, -5, 0, 1]])
    np.testing.assert_array_equal(t.at, [[1, 1, 1, 1, 1, 0], [0, 1, -1, 2, -2, 0], [0, 1, 1, 4, 4, 0],
                                         [0, 1, -1, 8, -8, 1]])
    assert t.g[0, 0] == 0.25 and t.g[3].tolist() == [1 / 24, 1 / 12, 1 / 6]


def test_exact_solver_rejects_inconsistent_systems():
    with pytest.raises(ArithmeticError):
        wino._solve_exact([[Fraction(1)], [Fraction(1)]], [Fraction(1), Fraction(2)])
    with pytest.raises(ValueError, match="tile size"):
        wino.matrices(3)


def test_weight_transforms_round_trip():
    """weight_gradient is the adjoint of transform_weight: <T(w), dU> == <w, T^*(dU)>."""
    rng = np.random.default_rng(0)
    t = wino.matrices(4)
    for groups, k, cg in [(1, 5, 3), (2, 4, 3), (3, 3, 1)]:
        w = rng.standard_normal((k, cg, 3, 3))
        du = rng.standard_normal((groups, 36, k // groups, cg))
        u = wino.transform_weight(w, t, groups, np.float64)
        assert u.shape == (groups, 36, k // groups, cg) and u.flags.c_contiguous
        lhs = np.sum(u * du)
        rhs = np.sum(w * wino.weight_gradient(du, t, np.float64))
        assert abs(lhs - rhs) <= 1e-10 * max(1.0, abs(lhs))


@pytest.mark.parametrize("n_out,d", [(1, 1), (4, 1), (5, 1), (14, 1), (10, 2), (7, 3), (2, 3)])
def test_tile_starts_cover_every_output_once(n_out, d):
    starts = wino.tile_starts(n_out, wino.TILE, d)
    covered = sorted(s + d * i for s in starts for i in range(wino.TILE) if s + d * i < n_out)
    assert covered == list(range(n_out))


# --------------------------------------------------------------------------- kernels vs the reference

def _winograd_layers(count: int, seed: int) -> list[tuple]:
    """(n, c, h, w, k, padding, dilation, groups) of random 3x3 stride-1 layers."""
    rng = np.random.default_rng(seed)
    layers = []
    while len(layers) < count:
        groups = int(rng.choice([1, 1, 1, 2, 3]))
        c, k = groups * int(rng.integers(1, 7)), groups * int(rng.integers(1, 7))
        d = int(rng.choice([1, 1, 1, 2, 3]))
        padding = [int(rng.integers(0, 5)), (int(rng.integers(0, 4)), int(rng.integers(0, 4))), "same",
                   "valid"][int(rng.integers(0, 4))]
        h, w = (int(v) for v in rng.integers(1, 23, 2))
        n = int(rng.integers(1, 4))
        try:
            _args._conv_geometry("t", (n, c, h, w), (k, c // groups, 3, 3), 1, padding, d, groups,
                                 np.dtype(np.float64))
        except ValueError:
            continue
        layers.append((n, c, h, w, k, padding, d, groups))
    return layers


LAYERS = [
    (2, 8, 32, 32, 16, 1, 1, 1),     # the common case, many full tiles
    (3, 4, 14, 14, 6, 1, 1, 1),      # 14 = 3.5 tiles: clipped edge tiles
    (1, 2, 1, 1, 3, 1, 1, 1),        # a plane smaller than a tile
    (2, 3, 5, 7, 2, 0, 1, 1),        # valid, odd sizes
    (2, 6, 9, 11, 4, 4, 1, 2),       # padding 4 > 2: negative padding in the input gradient
    (2, 4, 12, 10, 4, 2, 2, 1),      # dilation 2, "same"-like padding
    (1, 6, 13, 17, 6, 3, 3, 3),      # dilation 3, groups
    (2, 6, 8, 8, 6, 1, 1, 6),        # depthwise (runs, though auto never picks it)
    (70, 3, 6, 6, 5, 1, 1, 1),       # more tiles than one block, partial last block
] + _winograd_layers(30, seed=7)


@pytest.fixture
def no_fallback(monkeypatch):
    """Fail when a tiled forward pass reports a non-finite result: with finite inputs Winograd
    must not quietly hand the call to im2col (its results would pass the tests below too)."""
    from fastconv import _dispatch

    for name in WINOGRAD_BACKENDS:
        cls = type(_dispatch._load(name))
        run = cls._winograd_forward

        def checked(self, *args, _run=run):
            assert _run(self, *args), "the Winograd forward pass fell back on finite inputs"
            return True

        monkeypatch.setattr(cls, "_winograd_forward", checked)


@pytest.mark.parametrize("backend", WINOGRAD_BACKENDS)
@pytest.mark.parametrize("index", range(len(LAYERS)))
def test_winograd_matches_reference(backend, index, dtype, no_fallback):
    n, c, h, w, k, padding, d, groups = LAYERS[index]
    rng = np.random.default_rng(100 + index)
    x = rng.standard_normal((n, c, h, w)).astype(dtype)
    weight = rng.standard_normal((k, c // groups, 3, 3)).astype(dtype)
    bias = rng.standard_normal(k).astype(dtype)
    p = dict(padding=padding, dilation=d, groups=groups)
    ref = fastconv.conv2d(x, weight, bias, **p, backend="reference")
    out = fastconv.conv2d(layout(x, ("c", "fortran", "strided", "reversed")[index % 4]), weight, bias, **p,
                          backend=backend, algorithm="winograd")
    assert out.dtype == dtype and out.flags.c_contiguous and out.shape == ref.shape
    assert rel_err(out, ref) <= TOLERANCE[dtype]
    gy = rng.standard_normal(ref.shape).astype(dtype)
    want = fastconv.conv2d_backward(gy, x, weight, **p, backend="reference")
    got = fastconv.conv2d_backward(layout(gy, ("c", "strided")[index % 2]), x, weight, **p, backend=backend,
                                   algorithm="winograd")
    for name in ("input", "weight", "bias"):
        assert getattr(got, name).dtype == dtype
        assert rel_err(getattr(got, name), getattr(want, name)) <= TOLERANCE[dtype], name


@pytest.mark.parametrize("backend", WINOGRAD_BACKENDS)
@pytest.mark.parametrize("shape", [(4, 64, 16, 16, 64), (2, 512, 8, 8, 8), (1, 8, 40, 72, 512)])
def test_winograd_float32_error_bar_on_wide_layers(backend, shape):
    """Many channels (long sums inside the GEMMs) and wide planes stay within 1e-5 in float32."""
    n, c, h, w, k = shape
    rng = np.random.default_rng(c)
    x = rng.standard_normal((n, c, h, w)).astype(np.float32)
    weight = (rng.standard_normal((k, c, 3, 3)) / np.sqrt(9 * c)).astype(np.float32)
    ref = fastconv.conv2d(x, weight, padding=1, backend="reference")
    assert rel_err(fastconv.conv2d(x, weight, padding=1, backend=backend, algorithm="winograd"), ref) <= 1e-5
    gy = rng.standard_normal(ref.shape).astype(np.float32)
    want = fastconv.conv2d_backward(gy, x, weight, padding=1, backend="reference")
    got = fastconv.conv2d_backward(gy, x, weight, padding=1, backend=backend, algorithm="winograd")
    assert rel_err(got.input, want.input) <= 1e-5
    assert rel_err(got.weight, want.weight) <= 1e-5


@pytest.mark.parametrize("backend", WINOGRAD_BACKENDS)
def test_forward_does_not_depend_on_the_thread_count(backend):
    """The blocks do not depend on the thread count, and each is computed the same way whichever
    thread takes it: bit-identical results.  (150 tiles: blocks of 16, whose GEMMs an AVX2
    OpenBLAS rounds differently from those of blocks of 32 or 64.)"""
    rng = np.random.default_rng(3)
    x = rng.standard_normal((6, 16, 20, 20)).astype(np.float32)
    w = rng.standard_normal((16, 16, 3, 3)).astype(np.float32)
    old = _config.get_num_threads()
    try:
        results = []
        for threads in (1, 2, 3):
            fastconv.set_num_threads(threads)
            results.append(fastconv.conv2d(x, w, padding=1, backend=backend, algorithm="winograd"))
    finally:
        fastconv.set_num_threads(old)
    for r in results[1:]:
        np.testing.assert_array_equal(r, results[0])


# --------------------------------------------------------------------------- Inf / NaN

@pytest.mark.parametrize("backend", WINOGRAD_BACKENDS)
@pytest.mark.parametrize("special", [np.inf, -np.inf, np.nan])
def test_non_finite_values_keep_direct_semantics(backend, special):
    """Winograd would smear one Inf/NaN over its whole 4x4 tile (often as NaN); the result must
    instead equal im2col's, value for value (NaN where im2col has NaN, Inf where it has Inf)."""
    rng = np.random.default_rng(5)
    x = rng.standard_normal((2, 8, 12, 12)).astype(np.float32)
    w = rng.standard_normal((8, 8, 3, 3)).astype(np.float32)
    x[1, 3, 5, 6] = special
    want = fastconv.conv2d(x, w, padding=1, backend=backend, algorithm="im2col")
    got = fastconv.conv2d(x, w, padding=1, backend=backend, algorithm="winograd")
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    np.testing.assert_array_equal(np.isinf(got), np.isinf(want))
    finite = np.isfinite(want)
    assert rel_err(got[finite], want[finite]) <= 1e-5
    gy = rng.standard_normal(want.shape).astype(np.float32)
    gy[0, 2, 3, 3] = special
    for name in ("input", "weight"):
        a = getattr(fastconv.conv2d_backward(gy, x, w, padding=1, backend=backend, algorithm="winograd"), name)
        b = getattr(fastconv.conv2d_backward(gy, x, w, padding=1, backend=backend, algorithm="im2col"), name)
        np.testing.assert_array_equal(np.isnan(a), np.isnan(b))
        np.testing.assert_array_equal(np.isinf(a), np.isinf(b))


# --------------------------------------------------------------------------- selection and errors

@pytest.mark.parametrize("backend", WINOGRAD_BACKENDS)
@pytest.mark.parametrize("bad,reason", [(dict(w=(4, 4, 5, 5)), "a 3x3 kernel"), (dict(stride=2), "stride 1"),
                                        (dict(dilation=(1, 2)), "equal dilations")])
def test_unsupported_layers_raise_a_clear_error(backend, bad, reason):
    x = np.zeros((1, 4, 10, 10))
    w = np.zeros(bad.get("w", (4, 4, 3, 3)))
    p = {key: v for key, v in bad.items() if key != "w"}
    for call in (lambda: fastconv.conv2d(x, w, **p, backend=backend, algorithm="winograd"),
                 lambda: fastconv.conv2d_backward(np.zeros(fastconv.conv2d(x, w, **p).shape), x, w, **p,
                                                  backend=backend, algorithm="winograd")):
        with pytest.raises(ValueError, match=f"algorithm 'winograd' needs {reason}") as info:
            call()
        assert "(1, 4, 10, 10)" in str(info.value) and str(w.shape) in str(info.value)


@pytest.mark.parametrize("backend", WINOGRAD_BACKENDS)
def test_workspace_limit(backend):
    """Below the Winograd workspace, "auto" moves to another algorithm and an explicit request
    says how much memory it needs."""
    x = np.ones((32, 128, 16, 16), np.float32)  # 128 channels, 512 tiles: Winograd's by default on every machine
    w = np.ones((128, 128, 3, 3), np.float32) / 100
    g = _args.conv2d_args("t", x, w, None, 1, 1, 1, 1).geometry
    impl = _dispatch._load(backend)
    old = _config.get_workspace_limit()
    try:
        fastconv.set_workspace_limit(2**16)
        assert impl.unsupported("winograd", "conv2d", g) is not None
        assert impl.default_algorithm("conv2d", g) != "winograd"
        with pytest.raises(ValueError, match="MiB of workspace, over the limit"):
            fastconv.conv2d(x, w, padding=1, backend=backend, algorithm="winograd")
        ref = fastconv.conv2d(x, w, padding=1, backend="reference")
        assert rel_err(fastconv.conv2d(x, w, padding=1, backend=backend), ref) <= 1e-5
    finally:
        fastconv.set_workspace_limit(old)
    assert impl.default_algorithm("conv2d", g) == "winograd"


def test_plan_blocks_ignore_the_thread_count_and_shrink_to_fit():
    roomy = wino.plan(8, 1, 64, 64, 32, 32, 1, 4, 2, 2**30)
    assert roomy.tb == wino.BLOCK and roomy.threads == 2
    need = wino.workspace_bytes(6, 1, 64, 64, wino.LANES, 1, 4, False)
    tight = wino.plan(8, 1, 64, 64, 32, 32, 1, 4, 2, need)
    assert tight.tb == wino.LANES and tight.threads == 1
    assert isinstance(wino.plan(8, 1, 64, 64, 32, 32, 1, 4, 2, need - 1), str)
    small = [wino.plan(6, 1, 16, 16, 20, 20, 1, 4, t, 2**30) for t in (1, 2, 3, 8)]  # 150 tiles
    assert {p.tb for p in small} == {wino.LANES} and [p.threads for p in small] == [1, 2, 3, 8]
    few = wino.plan(1, 1, 8, 8, 4, 4, 1, 4, 2, 2**30)   # one tile: one thread, one minimal block
    assert few.tb == wino.LANES and few.threads == 1


#: backend -> (its Winograd weight transforms, called as kernel(..., threads)) where compiled
def _compiled_transforms(backend: str):
    if backend == "cython":
        from fastconv.backends.cython import _winograd as k

        return (lambda w, u, gm, groups, rotate: k.transform_weight(w, u, gm, groups, rotate, 2),
                lambda du, gw, gm: k.weight_gradient(du, gw, gm, 2))
    from fastconv.backends import numba as nb

    return (lambda w, u, gm, groups, rotate: nb._winograd_transform_weight(w, u, gm, groups, rotate, threads=2),
            lambda du, gw, gm: nb._winograd_weight_gradient(du, gw, gm, threads=2))


@pytest.mark.parametrize("backend", WINOGRAD_BACKENDS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("groups, kg, cg", [(1, 16, 8), (1, 5, 3), (2, 4, 7), (6, 1, 1), (3, 9, 2)])
def test_compiled_weight_transforms_match_the_specification(backend, dtype, groups, kg, cg):
    """The backends' compiled U = G w G^T (of the layer's weight and of the input gradient's
    rotated one) and dw = G^T dU G equal the NumPy specification in ``fastconv._winograd`` up to
    the rounding of a different summation order (both sum in float64 and round once)."""
    from fastconv.backends.base import input_grad_kernel

    transform, gradient = _compiled_transforms(backend)
    t, rng = wino.matrices(wino.TILE), np.random.default_rng(groups * kg * cg)
    w = rng.standard_normal((groups * kg, cg, 3, 3)).astype(dtype)
    bar = 1e-6 if dtype == np.float32 else 1e-14
    for rotate, spec_w in ((False, w), (True, input_grad_kernel(w, groups))):
        spec = wino.transform_weight(spec_w, t, groups, dtype)
        u = np.full_like(spec, np.nan)
        transform(w, u, t.g, groups, rotate)
        assert rel_err(u, spec) <= bar, rotate
    du = rng.standard_normal((groups, t.a**2, kg, cg))
    spec = wino.weight_gradient(du, t, dtype)
    gw = np.full_like(spec, np.nan)
    gradient(du, gw, t.g)
    assert rel_err(gw, spec) <= bar
    with pytest.raises(ValueError, match="transform_weight"):
        transform(w, np.empty((groups, t.a**2, cg, kg + 1), dtype), t.g, groups, False)
    with pytest.raises(ValueError, match="weight_gradient"):
        gradient(du, np.empty((groups * kg, cg, 3, 2), dtype), t.g)


@pytest.mark.parametrize("backend", WINOGRAD_BACKENDS)
def test_weight_gradient_takes_winograd_only_with_tiles_enough(backend):
    """``auto`` leaves weight gradients with fewer tiles than half their channels to im2col
    (Winograd's per-worker partial sums of 36 x K x C would dominate): one or four images of 256
    channels on 14x14 (16 or 64 tiles), one of 128 on 28x28 (49); 32 images of 256 (512 tiles)
    and two of 128 (98) take Winograd."""
    be = _dispatch._load(backend)

    def weight_grad(n, c, hw):
        g = _args._conv_geometry("t", (n, c, hw, hw), (c, c, 3, 3), 1, 1, 1, 1, np.dtype(np.float32))
        return be.default_algorithm("conv2d_backward_weight", g)

    with num_threads(2):
        assert [weight_grad(1, 256, 14), weight_grad(4, 256, 14), weight_grad(1, 128, 28)] == ["im2col"] * 3
        assert wino.weight_gradient_pays(_args._conv_geometry("t", (2, 128, 28, 28), (128, 128, 3, 3), 1, 1, 1, 1,
                                                              np.dtype(np.float32)))
        assert weight_grad(32, 256, 14) == "winograd"
