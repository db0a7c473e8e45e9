"""PyTorch as a second oracle for the reference backend (skipped cleanly when PyTorch
is not installed)."""

from __future__ import annotations

import numpy as np
import pytest

import fastconv
from conftest import host_backends

# --------------------------------------------------------------------------- PyTorch as an oracle

torch = pytest.importorskip("torch", reason="PyTorch is an optional second oracle")
F = torch.nn.functional


def _random_conv(rng):
    groups = int(rng.choice([1, 2, 4]))
    c, k = groups * int(rng.integers(1, 3)), groups * int(rng.integers(1, 3))
    r, s = (int(v) for v in rng.integers(1, 5, 2))
    stride, dilation = tuple(int(v) for v in rng.integers(1, 4, 2)), tuple(int(v) for v in rng.integers(1, 3, 2))
    padding = "same" if rng.random() < 0.2 else tuple(int(v) for v in rng.integers(0, 4, 2))
    if padding == "same":
        stride = (1, 1)
    h, w = (int(v) for v in rng.integers(dilation[0] * (r - 1) + 1, 13, 2))
    w = max(w, dilation[1] * (s - 1) + 1)
    return (2, c, h, w), (k, c // groups, r, s), dict(stride=stride, padding=padding, dilation=dilation,
                                                    groups=groups)


@pytest.mark.parametrize("seed", range(25))
def test_conv2d_matches_torch(seed):
    rng = np.random.default_rng(seed)
    xs, ws, params = _random_conv(rng)
    x, w, b = rng.standard_normal(xs), rng.standard_normal(ws), rng.standard_normal(ws[0])
    xt, wt, bt = (torch.tensor(a, requires_grad=True) for a in (x, w, b))
    yt = F.conv2d(xt, wt, bt, **params)
    gy = rng.standard_normal(tuple(yt.shape))
    yt.backward(torch.tensor(gy))
    np.testing.assert_allclose(fastconv.conv2d(x, w, b, **params, backend="reference"), yt.detach().numpy(),
                               rtol=1e-10, atol=1e-10)
    g = fastconv.conv2d_backward(gy, x, w, **params, backend="reference")
    for mine, theirs in ((g.input, xt), (g.weight, wt), (g.bias, bt)):
        np.testing.assert_allclose(mine, theirs.grad.numpy(), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("seed", range(25))
def test_pools_match_torch(seed):
    rng = np.random.default_rng(100 + seed)
    kernel = tuple(int(v) for v in rng.integers(1, 5, 2))
    stride = tuple(int(v) for v in rng.integers(1, 4, 2))
    padding = tuple(int(rng.integers(0, k // 2 + 1)) for k in kernel)
    dilation = tuple(int(v) for v in rng.integers(1, 3, 2))
    ceil_mode = bool(seed % 2)
    x = np.round(rng.standard_normal((2, 3, 11, 9)) * 2)  # ties
    x[0, 0, :4, :4] = -np.inf
    x[1, 2, 5, 3] = np.nan
    x[1, 1, 2, 2:4] = np.nan  # several NaNs in one window: PyTorch returns the last
    out, idx = fastconv.max_pool2d(x, kernel, stride, padding, dilation, ceil_mode, True, backend="reference")
    out_t, idx_t = F.max_pool2d(torch.tensor(x), kernel, stride, padding, dilation, ceil_mode, True)
    np.testing.assert_array_equal(out, out_t.numpy())
    np.testing.assert_array_equal(idx, idx_t.numpy())
    xf = np.nan_to_num(x, nan=0.25, neginf=-7.0)
    for cip in (False, True):
        xt = torch.tensor(xf, requires_grad=True)
        yt = F.avg_pool2d(xt, kernel, stride, padding, ceil_mode, cip)
        gy = rng.standard_normal(tuple(yt.shape))
        yt.backward(torch.tensor(gy))
        np.testing.assert_allclose(fastconv.avg_pool2d(xf, kernel, stride, padding, ceil_mode, cip,
                                                       backend="reference"), yt.detach().numpy(), rtol=1e-12)
        np.testing.assert_allclose(fastconv.avg_pool2d_backward(gy, xf.shape, kernel, stride, padding, ceil_mode,
                                                                cip, backend="reference"),
                                   xt.grad.numpy(), rtol=1e-12, atol=1e-14)
    xt = torch.tensor(xf, requires_grad=True)
    yt = F.max_pool2d(xt, kernel, stride, padding, dilation, ceil_mode)
    gy = rng.standard_normal(tuple(yt.shape))
    yt.backward(torch.tensor(gy))
    np.testing.assert_allclose(fastconv.max_pool2d_backward(gy, xf, kernel, stride, padding, dilation, ceil_mode,
                                                            backend="reference"), xt.grad.numpy(), atol=1e-14)


@pytest.mark.parametrize("backend", ["reference"] + host_backends())
def test_nan_inf_propagation_matches_torch(backend):
    rng = np.random.default_rng(5)
    x = rng.standard_normal((1, 2, 6, 6))
    x[0, 0, 1, 1], x[0, 1, 4, 4], x[0, 1, 0, 5] = np.nan, np.inf, -np.inf
    w = rng.standard_normal((3, 2, 3, 3))
    ours = fastconv.conv2d(x, w, padding=1, backend=backend)
    theirs = F.conv2d(torch.tensor(x), torch.tensor(w), padding=1).numpy()
    np.testing.assert_array_equal(np.isnan(ours), np.isnan(theirs))
    finite = np.isfinite(theirs)
    np.testing.assert_array_equal(np.isfinite(ours), finite)
    np.testing.assert_allclose(ours[finite], theirs[finite], rtol=1e-10)
    out, idx = fastconv.max_pool2d(x, 3, 1, 1, return_indices=True, backend=backend)
    out_t, idx_t = F.max_pool2d(torch.tensor(x), 3, 1, 1, return_indices=True)
    np.testing.assert_array_equal(out, out_t.numpy())
    np.testing.assert_array_equal(idx, idx_t.numpy())
    np.testing.assert_allclose(fastconv.avg_pool2d(x, 2, backend=backend), F.avg_pool2d(torch.tensor(x), 2).numpy(),
                               rtol=1e-12)  # NaN and inf in the same places
