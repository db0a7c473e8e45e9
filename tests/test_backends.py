"""Every op of every available backend and algorithm against the reference backend.

Configurations: a hand-written grid of corner cases plus seeded random ones
(stride 1-3, padding 0-3 / "same" / "valid", dilation 1-3, groups incl. depthwise,
even and odd kernels, unbatched input, several memory layouts), float32 and float64,
forward and backward.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest

import fastconv
from conftest import LAYOUTS, assert_close, backend_algorithms, guard_allocations, host_backends, layout, unsupported

# (n, c, h, w, k, r, s, stride, padding, dilation, groups)
GRID = [
    (2, 3, 8, 8, 4, 3, 3, 1, 1, 1, 1),
    (1, 1, 16, 16, 8, 3, 3, 1, "same", 1, 1),
    (2, 4, 9, 7, 6, 2, 2, 1, "same", 1, 2),          # even kernel: extra pad bottom/right
    (2, 4, 10, 11, 4, 4, 3, 1, "same", 2, 4),        # depthwise, dilated, "same"
    (3, 2, 7, 9, 3, 3, 2, 2, 0, 1, 1),
    (2, 6, 12, 12, 6, 3, 3, 1, 1, 1, 6),             # depthwise
    (2, 6, 12, 12, 12, 3, 3, 2, 1, 1, 6),            # depthwise multiplier 2
    (2, 8, 6, 6, 4, 1, 1, 1, 0, 1, 1),               # 1x1
    (2, 8, 6, 6, 4, 1, 1, 2, 0, 1, 2),               # strided grouped 1x1
    (1, 3, 15, 13, 5, 7, 7, 2, 3, 1, 1),             # stem-like
    (2, 4, 11, 11, 4, 3, 3, 1, 2, 2, 1),             # dilated
    (2, 3, 5, 5, 2, 5, 5, 1, "valid", 1, 1),         # kernel == input
    (1, 2, 4, 9, 3, 1, 4, 3, (0, 2), (1, 3), 1),     # asymmetric everything
    (2, 2, 6, 6, 2, 3, 3, (3, 1), (3, 0), (1, 2), 2),
]


def _random_configs(count: int, seed: int) -> list[tuple]:
    rng = np.random.default_rng(seed)
    configs = []
    while len(configs) < count:
        groups = int(rng.choice([1, 1, 2, 3]))
        c = groups * int(rng.integers(1, 4))
        k = groups * int(rng.integers(1, 4))
        r, s = (int(v) for v in rng.integers(1, 6, 2))
        stride = tuple(int(v) for v in rng.integers(1, 4, 2))
        dilation = tuple(int(v) for v in rng.integers(1, 4, 2))
        padding = rng.choice(["int", "pair", "same", "valid"], p=[0.3, 0.4, 0.2, 0.1])
        if padding == "same":
            stride = 1
        padding = {"int": int(rng.integers(0, 4)), "pair": tuple(int(v) for v in rng.integers(0, 4, 2)),
                   "same": "same", "valid": "valid"}[padding]
        h, w = (int(v) for v in rng.integers(1, 14, 2))
        n = int(rng.integers(1, 4))
        try:  # keep only valid configurations
            fastconv.conv2d(np.zeros((n, c, h, w)), np.zeros((k, c // groups, r, s)), None, stride, padding,
                            dilation, groups, backend="numpy")
        except ValueError:
            continue
        configs.append((n, c, h, w, k, r, s, stride, padding, dilation, groups))
    return configs


CONFIGS = GRID + _random_configs(30, seed=1234)


@functools.lru_cache(maxsize=None)
def _conv_case(index: int, dtype: str):
    n, c, h, w, k, r, s, stride, padding, dilation, groups = CONFIGS[index]
    rng = np.random.default_rng(index)
    x = rng.standard_normal((n, c, h, w)).astype(dtype)
    weight = rng.standard_normal((k, c // groups, r, s)).astype(dtype)
    bias = rng.standard_normal(k).astype(dtype)
    params = dict(stride=stride, padding=padding, dilation=dilation, groups=groups)
    out = fastconv.conv2d(x, weight, bias, **params, backend="reference")
    grad_out = rng.standard_normal(out.shape).astype(dtype)
    grads = fastconv.conv2d_backward(grad_out, x, weight, **params, backend="reference")
    return x, weight, bias, params, out, grad_out, grads


BACKEND_ALGOS = backend_algorithms()


@pytest.mark.parametrize("backend,algorithm", BACKEND_ALGOS)
@pytest.mark.parametrize("index", range(len(CONFIGS)))
def test_conv2d_forward_backward(backend, algorithm, index, dtype):
    x, weight, bias, params, out, grad_out, grads = _conv_case(index, dtype.name)
    kw = dict(params, backend=backend, algorithm=algorithm)
    if unsupported(backend, algorithm, "conv2d", x.shape, weight.shape, **params):
        # an algorithm that cannot run this layer says so (Winograd: 3x3 stride 1 only)
        with pytest.raises(ValueError, match=f"conv2d\\(\\): algorithm '{algorithm}' needs"):
            fastconv.conv2d(x, weight, bias, **kw)
        with pytest.raises(ValueError, match=f"conv2d_backward\\(\\): algorithm '{algorithm}' needs"):
            fastconv.conv2d_backward(grad_out, x, weight, **kw)
        return
    got = fastconv.conv2d(layout(x, ("c", "fortran", "strided")[index % 3]), weight, bias, **kw)
    assert got.dtype == dtype and got.flags.c_contiguous
    assert_close(got, out, dtype)
    g = fastconv.conv2d_backward(grad_out, x, layout(weight, ("c", "reversed")[index % 2]), **kw)
    for name in ("input", "weight", "bias"):
        assert getattr(g, name).dtype == dtype
        assert_close(getattr(g, name), getattr(grads, name), dtype)


@pytest.mark.parametrize("backend,algorithm", [(b, a) for b, a in BACKEND_ALGOS if b in ("cython", "numba")])
def test_conv2d_writes_nothing_past_its_arrays(backend, algorithm, monkeypatch):
    """Guard elements around every output and workspace the adapter allocates stay untouched
    (vector loops with spare lanes, row blocks and tiles must stay inside their arrays)."""
    guarded = guard_allocations(monkeypatch, backend)
    for index in range(len(CONFIGS)):
        x, weight, bias, params, out, grad_out, grads = _conv_case(index, "float32")
        if unsupported(backend, algorithm, "conv2d", x.shape, weight.shape, **params):
            continue
        kw = dict(params, backend=backend, algorithm=algorithm)
        assert_close(fastconv.conv2d(x, weight, bias, **kw), out, np.float32)
        g = fastconv.conv2d_backward(grad_out, x, weight, **kw)
        for name in ("input", "weight", "bias"):
            assert_close(getattr(g, name), getattr(grads, name), np.float32)
    assert guarded.buffers and guarded.untouched()


@pytest.mark.parametrize("backend,algorithm", BACKEND_ALGOS)
@pytest.mark.parametrize("kind", LAYOUTS)
def test_conv2d_layouts_and_unbatched(backend, algorithm, kind, dtype):
    x, weight, bias, params, out, grad_out, grads = _conv_case(0, dtype.name)
    before = x.copy()
    xs = layout(x[0], kind)
    got = fastconv.conv2d(xs, layout(weight, kind), layout(bias, kind), **params, backend=backend,
                          algorithm=algorithm)
    assert got.shape == out.shape[1:]
    assert_close(got, out[0], dtype)
    g = fastconv.conv2d_backward(layout(grad_out[0], kind), xs, weight, **params, backend=backend,
                                 algorithm=algorithm)
    ref = fastconv.conv2d_backward(grad_out[:1], x[:1], weight, **params, backend="reference")
    assert g.input.shape == x.shape[1:]
    assert_close(g.input, ref.input[0], dtype)
    assert_close(g.weight, ref.weight, dtype)
    np.testing.assert_array_equal(x, before)  # inputs are never modified


@pytest.mark.parametrize("backend,algorithm", BACKEND_ALGOS)
def test_conv2d_need_flags_and_empty_batch(backend, algorithm):
    x, weight, bias, params, out, grad_out, grads = _conv_case(0, "float64")
    g = fastconv.conv2d_backward(grad_out, x, weight, **params, need_input=False, need_bias=False,
                                 backend=backend, algorithm=algorithm)
    assert g.input is None and g.bias is None and g.weight.shape == weight.shape
    empty = fastconv.conv2d(x[:0], weight, bias, **params, backend=backend, algorithm=algorithm)
    assert empty.shape == (0,) + out.shape[1:]
    g0 = fastconv.conv2d_backward(grad_out[:0], x[:0], weight, **params, backend=backend, algorithm=algorithm)
    assert g0.input.shape == x[:0].shape and not g0.weight.any() and not g0.bias.any()


# --------------------------------------------------------------------------- pools

# (n, c, h, w, kernel, stride, padding, dilation, ceil_mode)
POOL_GRID = [
    (2, 3, 8, 8, 2, None, 0, 1, False),
    (2, 3, 9, 9, 2, None, 0, 1, True),
    (1, 4, 11, 11, 3, 2, 1, 1, False),
    (1, 4, 11, 11, 3, 2, 1, 1, True),
    (2, 2, 10, 7, (3, 2), (2, 1), (1, 1), (2, 1), True),
    (2, 2, 7, 10, 4, 3, 2, 2, True),
    (1, 1, 5, 5, 5, 1, 0, 1, False),
    (3, 2, 6, 9, (1, 3), (1, 2), (0, 1), 1, False),
]


def _random_pools(count: int, seed: int) -> list[tuple]:
    rng = np.random.default_rng(seed)
    configs = []
    while len(configs) < count:
        kernel = tuple(int(v) for v in rng.integers(1, 5, 2))
        stride = tuple(int(v) for v in rng.integers(1, 4, 2))
        padding = tuple(int(rng.integers(0, k // 2 + 1)) for k in kernel)
        dilation = tuple(int(v) for v in rng.integers(1, 3, 2))
        h, w = (int(v) for v in rng.integers(1, 13, 2))
        ceil_mode = bool(rng.integers(2))
        try:
            fastconv.max_pool2d(np.zeros((1, 1, h, w)), kernel, stride, padding, dilation, ceil_mode,
                                backend="numpy")
        except ValueError:
            continue
        configs.append((int(rng.integers(1, 3)), int(rng.integers(1, 4)), h, w, kernel, stride, padding,
                        dilation, ceil_mode))
    return configs


POOLS = POOL_GRID + _random_pools(24, seed=99)


def _pool_input(index: int, dtype) -> tuple[np.ndarray, dict, int]:
    n, c, h, w, kernel, stride, padding, dilation, ceil_mode = POOLS[index]
    rng = np.random.default_rng(1000 + index)
    x = rng.standard_normal((n, c, h, w)).astype(dtype)
    if index % 3 == 0:  # ties, -inf and NaN handling
        x = np.round(x).astype(dtype)
        x[0, 0, : h // 2, : w // 2] = -np.inf
        x[-1, -1, h // 2, w // 2] = np.nan
    return x, dict(kernel_size=kernel, stride=stride, padding=padding, ceil_mode=ceil_mode), dilation


@pytest.mark.parametrize("backend", host_backends())
@pytest.mark.parametrize("index", range(len(POOLS)))
def test_max_pool2d(backend, index, dtype):
    x, params, dilation = _pool_input(index, dtype)
    ref, ref_idx = fastconv.max_pool2d(x, **params, dilation=dilation, return_indices=True, backend="reference")
    out, idx = fastconv.max_pool2d(layout(x, LAYOUTS[index % 5]), **params, dilation=dilation,
                                   return_indices=True, backend=backend)
    assert out.dtype == dtype and idx.dtype == np.int64
    np.testing.assert_array_equal(out, ref)  # exact: max pooling does no arithmetic
    np.testing.assert_array_equal(idx, ref_idx)
    grad_out = np.random.default_rng(index).standard_normal(out.shape).astype(dtype)
    want = fastconv.max_pool2d_backward(grad_out, x, **params, dilation=dilation, backend="reference")
    got = fastconv.max_pool2d_backward(grad_out, x, **params, dilation=dilation, backend=backend)
    got_idx = fastconv.max_pool2d_backward(grad_out, x, **params, dilation=dilation, indices=idx, backend=backend)
    assert_close(got, want, dtype)
    assert_close(got_idx, want, dtype)


@pytest.mark.parametrize("backend", host_backends())
@pytest.mark.parametrize("count_include_pad", [True, False])
@pytest.mark.parametrize("index", range(len(POOLS)))
def test_avg_pool2d(backend, index, count_include_pad, dtype):
    x, params, _ = _pool_input(index, dtype)
    x = np.nan_to_num(x, nan=0.5, neginf=-3.0)
    ref = fastconv.avg_pool2d(x, **params, count_include_pad=count_include_pad, backend="reference")
    out = fastconv.avg_pool2d(layout(x, LAYOUTS[index % 5]), **params, count_include_pad=count_include_pad,
                              backend=backend)
    assert_close(out, ref, dtype)
    grad_out = np.random.default_rng(index).standard_normal(out.shape).astype(dtype)
    want = fastconv.avg_pool2d_backward(grad_out, x.shape, **params, count_include_pad=count_include_pad,
                                        backend="reference")
    got = fastconv.avg_pool2d_backward(grad_out, x.shape, **params, count_include_pad=count_include_pad,
                                       backend=backend)
    assert_close(got, want, dtype)


@pytest.mark.parametrize("backend", host_backends())
def test_pools_unbatched_and_empty(backend):
    x = np.random.default_rng(0).standard_normal((3, 9, 9))
    out, idx = fastconv.max_pool2d(x, 3, 2, 1, return_indices=True, backend=backend)
    ref, ref_idx = fastconv.max_pool2d(x[None], 3, 2, 1, return_indices=True, backend="reference")
    np.testing.assert_array_equal(out, ref[0])
    np.testing.assert_array_equal(idx, ref_idx[0])
    assert_close(fastconv.avg_pool2d(x, 2, backend=backend), fastconv.avg_pool2d(x[None], 2, backend="reference")[0],
                 np.float64)
    assert fastconv.max_pool2d(np.zeros((0, 3, 8, 8)), 2, backend=backend).shape == (0, 3, 4, 4)
    assert fastconv.avg_pool2d_backward(np.zeros((0, 3, 4, 4)), (0, 3, 8, 8), 2, backend=backend).shape == (0, 3, 8, 8)
