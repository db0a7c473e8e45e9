"""The reference backend itself: its gradients are the numerical gradients.
(PyTorch as a second oracle: tests/test_torch_oracle.py.)"""

from __future__ import annotations

import numpy as np
import pytest

import fastconv

CONV_CASES = [
    dict(shape=(2, 4, 7, 6), weight=(6, 2, 3, 2), stride=(2, 1), padding=(1, 2), dilation=(1, 2), groups=2),
    dict(shape=(1, 3, 6, 6), weight=(3, 1, 2, 2), stride=1, padding="same", dilation=2, groups=3),
    dict(shape=(2, 2, 5, 5), weight=(3, 2, 3, 3), stride=3, padding=0, dilation=1, groups=1),
]


def _numeric_grad(f, a: np.ndarray, eps: float = 1e-6) -> np.ndarray:
    grad = np.zeros_like(a)
    for i in np.ndindex(a.shape):
        old = a[i]
        a[i] = old + eps
        up = f()
        a[i] = old - eps
        down = f()
        a[i] = old
        grad[i] = (up - down) / (2 * eps)
    return grad


@pytest.mark.parametrize("case", CONV_CASES)
def test_reference_conv_gradients_are_numerical_gradients(case):
    rng = np.random.default_rng(0)
    x = rng.standard_normal(case["shape"])
    w = rng.standard_normal(case["weight"])
    b = rng.standard_normal(case["weight"][0])
    params = {k: case[k] for k in ("stride", "padding", "dilation", "groups")}
    out = fastconv.conv2d(x, w, b, **params, backend="reference")
    probe = rng.standard_normal(out.shape)  # loss = sum(probe * conv(x))

    def loss():
        return float((probe * fastconv.conv2d(x, w, b, **params, backend="reference")).sum())

    grads = fastconv.conv2d_backward(probe, x, w, **params, backend="reference")
    np.testing.assert_allclose(grads.input, _numeric_grad(loss, x), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(grads.weight, _numeric_grad(loss, w), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(grads.bias, _numeric_grad(loss, b), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("ceil_mode", [False, True])
@pytest.mark.parametrize("count_include_pad", [False, True])
def test_reference_pool_gradients_are_numerical_gradients(ceil_mode, count_include_pad):
    rng = np.random.default_rng(1)
    x = rng.permutation(2 * 2 * 7 * 7).reshape(2, 2, 7, 7) / 10.0  # distinct values: max is differentiable
    params = dict(kernel_size=3, stride=2, padding=1, ceil_mode=ceil_mode)
    probe = rng.standard_normal(fastconv.max_pool2d(x, **params, backend="reference").shape)

    def max_loss():
        return float((probe * fastconv.max_pool2d(x, **params, backend="reference")).sum())

    def avg_loss():
        return float((probe * fastconv.avg_pool2d(x, **params, count_include_pad=count_include_pad,
                                                  backend="reference")).sum())

    np.testing.assert_allclose(fastconv.max_pool2d_backward(probe, x, **params, backend="reference"),
                               _numeric_grad(max_loss, x, 1e-4), atol=1e-7)
    np.testing.assert_allclose(
        fastconv.avg_pool2d_backward(probe, x.shape, **params, count_include_pad=count_include_pad,
                                     backend="reference"),
        _numeric_grad(avg_loss, x), atol=1e-7)
