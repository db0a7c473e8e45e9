"""Property-based tests (hypothesis): random valid configurations for every op and
every available backend/algorithm, forward and backward, against the reference.

Profiles (HYPOTHESIS_PROFILE): "ci" (default, a few hundred examples over the whole
module) and "long" (thousands, for local runs).
"""

from __future__ import annotations

import os

import numpy as np
import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import fastconv  # noqa: E402
from conftest import LAYOUTS, TOLERANCE, backend_algorithms, host_backends, layout, rel_err, unsupported  # noqa: E402

settings.register_profile("ci", max_examples=40, deadline=None, derandomize=True,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("long", max_examples=1500, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

pairs = st.tuples(st.integers(1, 3), st.integers(1, 3))


@st.composite
def conv_configs(draw):
    groups = draw(st.sampled_from([1, 1, 2, 3]))
    c = groups * draw(st.integers(1, 3))
    k = groups * draw(st.integers(1, 3))
    r, s = draw(st.integers(1, 5)), draw(st.integers(1, 5))
    dilation = draw(pairs)
    padding = draw(st.one_of(st.integers(0, 3), st.tuples(st.integers(0, 3), st.integers(0, 3)),
                             st.sampled_from(["same", "valid"])))
    stride = 1 if padding == "same" else draw(pairs)
    pad_h = 0 if isinstance(padding, str) else (padding if isinstance(padding, int) else padding[0])
    pad_w = 0 if isinstance(padding, str) else (padding if isinstance(padding, int) else padding[1])
    min_h = max(1, dilation[0] * (r - 1) + 1 - 2 * pad_h)
    min_w = max(1, dilation[1] * (s - 1) + 1 - 2 * pad_w)
    h, w = draw(st.integers(min_h, max(min_h, 12))), draw(st.integers(min_w, max(min_w, 12)))
    n = draw(st.integers(1, 3))
    dtype = draw(st.sampled_from([np.float32, np.float64]))
    kind = draw(st.sampled_from(LAYOUTS))
    seed = draw(st.integers(0, 2**16))
    return dict(n=n, c=c, h=h, w=w, k=k, r=r, s=s, stride=stride, padding=padding, dilation=dilation,
                groups=groups, dtype=np.dtype(dtype), layout=kind, seed=seed)


def _check(out, ref, dtype):
    err = rel_err(out, ref)
    assert err <= TOLERANCE[dtype], f"relative error {err:.3g}"


@pytest.mark.parametrize("backend,algorithm", backend_algorithms())
@given(cfg=conv_configs())
def test_conv2d_property(backend, algorithm, cfg):
    rng = np.random.default_rng(cfg["seed"])
    dt = cfg["dtype"]
    x = rng.standard_normal((cfg["n"], cfg["c"], cfg["h"], cfg["w"])).astype(dt)
    w = rng.standard_normal((cfg["k"], cfg["c"] // cfg["groups"], cfg["r"], cfg["s"])).astype(dt)
    b = rng.standard_normal(cfg["k"]).astype(dt)
    p = dict(stride=cfg["stride"], padding=cfg["padding"], dilation=cfg["dilation"], groups=cfg["groups"])
    if unsupported(backend, algorithm, "conv2d", x.shape, w.shape, **p):
        with pytest.raises(ValueError, match=f"algorithm '{algorithm}' needs"):
            fastconv.conv2d(x, w, b, **p, backend=backend, algorithm=algorithm)
        return  # tests/test_winograd.py draws the layers Winograd runs
    ref = fastconv.conv2d(x, w, b, **p, backend="reference")
    _check(fastconv.conv2d(layout(x, cfg["layout"]), layout(w, cfg["layout"]), b, **p, backend=backend,
                           algorithm=algorithm), ref, dt)
    gy = rng.standard_normal(ref.shape).astype(dt)
    want = fastconv.conv2d_backward(gy, x, w, **p, backend="reference")
    got = fastconv.conv2d_backward(layout(gy, cfg["layout"]), x, w, **p, backend=backend, algorithm=algorithm)
    for a, b_ in zip(got, want):
        _check(a, b_, dt)


@st.composite
def pool_configs(draw):
    kernel = (draw(st.integers(1, 4)), draw(st.integers(1, 4)))
    padding = (draw(st.integers(0, kernel[0] // 2)), draw(st.integers(0, kernel[1] // 2)))
    stride = draw(st.one_of(st.none(), pairs))
    dilation = draw(pairs)
    ceil_mode = draw(st.booleans())
    h = draw(st.integers(dilation[0] * (kernel[0] - 1) + 1, 12))
    w = draw(st.integers(dilation[1] * (kernel[1] - 1) + 1, 12))
    dtype = np.dtype(draw(st.sampled_from([np.float32, np.float64])))
    specials = draw(st.booleans())
    return dict(shape=(draw(st.integers(1, 3)), draw(st.integers(1, 3)), h, w), kernel=kernel, stride=stride,
                padding=padding, dilation=dilation, ceil_mode=ceil_mode, dtype=dtype,
                layout=draw(st.sampled_from(LAYOUTS)), specials=specials, seed=draw(st.integers(0, 2**16)))


@pytest.mark.parametrize("backend", host_backends())
@given(cfg=pool_configs())
def test_pools_property(backend, cfg):
    rng = np.random.default_rng(cfg["seed"])
    dt = cfg["dtype"]
    x = np.round(rng.standard_normal(cfg["shape"]) * 2).astype(dt)  # ties on purpose
    if cfg["specials"]:
        x.flat[rng.integers(0, x.size, 3)] = [np.nan, np.inf, -np.inf]
    p = dict(kernel_size=cfg["kernel"], stride=cfg["stride"], padding=cfg["padding"], ceil_mode=cfg["ceil_mode"])
    ref, ref_idx = fastconv.max_pool2d(x, **p, dilation=cfg["dilation"], return_indices=True, backend="reference")
    out, idx = fastconv.max_pool2d(layout(x, cfg["layout"]), **p, dilation=cfg["dilation"], return_indices=True,
                                   backend=backend)
    np.testing.assert_array_equal(out, ref)
    np.testing.assert_array_equal(idx, ref_idx)
    gy = rng.standard_normal(out.shape).astype(dt)
    _check(fastconv.max_pool2d_backward(gy, x, **p, dilation=cfg["dilation"], indices=idx, backend=backend),
           fastconv.max_pool2d_backward(gy, x, **p, dilation=cfg["dilation"], backend="reference"), dt)
    xf = np.nan_to_num(x, nan=0.5, posinf=3.0, neginf=-3.0)
    for cip in (True, False):
        ref = fastconv.avg_pool2d(xf, **p, count_include_pad=cip, backend="reference")
        _check(fastconv.avg_pool2d(layout(xf, cfg["layout"]), **p, count_include_pad=cip, backend=backend), ref, dt)
        gy = rng.standard_normal(ref.shape).astype(dt)
        _check(fastconv.avg_pool2d_backward(gy, xf.shape, **p, count_include_pad=cip, backend=backend),
               fastconv.avg_pool2d_backward(gy, xf.shape, **p, count_include_pad=cip, backend="reference"), dt)
