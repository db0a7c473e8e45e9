"""Layers with a hand-written backward pass, built on the fastconv functional API.

Every layer caches in ``forward`` exactly what ``backward`` needs.  Convolutions and
pools call :mod:`fastconv.functional` with the layer's ``backend`` so any backend can
train.  Initialisation follows PyTorch's defaults: weights and biases drawn from
U(-1/sqrt(fan_in), 1/sqrt(fan_in)) (``kaiming_uniform_(a=sqrt(5))``).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .. import functional as F
from .module import Module, Parameter, as_generator

IntOrPair = Any  # int or (int, int), validated by fastconv itself


def default_init(shape: tuple[int, ...], fan_in: int, rng: np.random.Generator, dtype: Any) -> np.ndarray:
    """PyTorch's default init for conv/linear weights and biases: U(-b, b), b = 1/sqrt(fan_in).

    (``kaiming_uniform_(a=sqrt(5))`` gives gain sqrt(1/3), so b = gain * sqrt(3 / fan_in).)
    """
    bound = 1.0 / np.sqrt(fan_in) if fan_in > 0 else 0.0
    return rng.uniform(-bound, bound, size=shape).astype(dtype)


class Conv2d(Module):
    """2-D convolution layer (cross-correlation, NCHW), as ``torch.nn.Conv2d``.

    Parameters
    ----------
    in_channels, out_channels : int
    kernel_size, stride, padding, dilation, groups
        As in :func:`fastconv.conv2d` (padding may be "same" or "valid").
    bias : bool
    rng : numpy.random.Generator or int, optional
        Source of the initial weights.
    dtype : numpy dtype, default float32
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: IntOrPair, stride: IntOrPair = 1,
                 padding: IntOrPair | str = 0, dilation: IntOrPair = 1, groups: int = 1, bias: bool = True, *,
                 rng: np.random.Generator | int | None = None, dtype: Any = np.float32) -> None:
        super().__init__()
        if in_channels % groups or out_channels % groups:
            raise ValueError(f"Conv2d(): in_channels ({in_channels}) and out_channels ({out_channels}) "
                             f"must be divisible by groups ({groups})")
        kh, kw = (kernel_size, kernel_size) if np.isscalar(kernel_size) else tuple(kernel_size)
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.stride, self.padding = (kh, kw), stride, padding
        self.dilation, self.groups = dilation, groups
        rng = as_generator(rng)
        fan_in = in_channels // groups * kh * kw
        self.weight = Parameter(default_init((out_channels, in_channels // groups, kh, kw), fan_in, rng, dtype))
        self.bias = Parameter(default_init((out_channels,), fan_in, rng, dtype)) if bias else None
        self._x: np.ndarray | None = None

    def forward(self, x: np.ndarray) -> np.ndarray:
        self._x = x
        return F.conv2d(x, self.weight.data, None if self.bias is None else self.bias.data, self.stride,
                        self.padding, self.dilation, self.groups, backend=self.backend)

    def backward(self, grad_out: np.ndarray, *, need_input: bool = True) -> np.ndarray | None:
        grads = F.conv2d_backward(grad_out, self._x, self.weight.data, self.stride, self.padding, self.dilation,
                                  self.groups, need_input=need_input, need_bias=self.bias is not None,
                                  backend=self.backend)
        self.weight.grad += grads.weight
        if self.bias is not None:
            self.bias.grad += grads.bias
        return grads.input

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding!r}" + (f", dilation={self.dilation}" if self.dilation != 1 else "")
                + (f", groups={self.groups}" if self.groups != 1 else "") + (", bias=False" if self.bias is None else ""))


class Linear(Module):
    """Fully connected layer ``y = x @ W.T + b``, as ``torch.nn.Linear``.

    Parameters
    ----------
    in_features, out_features : int
    bias : bool
    rng : numpy.random.Generator or int, optional
    dtype : numpy dtype, default float32
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *,
                 rng: np.random.Generator | int | None = None, dtype: Any = np.float32) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        rng = as_generator(rng)
        self.weight = Parameter(default_init((out_features, in_features), in_features, rng, dtype))
        self.bias = Parameter(default_init((out_features,), in_features, rng, dtype)) if bias else None
        self._x: np.ndarray | None = None

    def forward(self, x: np.ndarray) -> np.ndarray:
        if x.ndim != 2 or x.shape[1] != self.in_features:
            raise ValueError(f"Linear.forward(): expected input of shape (N, {self.in_features}), got {x.shape}")
        self._x = x
        y = x @ self.weight.data.T
        if self.bias is not None:
            y += self.bias.data
        return y

    def backward(self, grad_out: np.ndarray, *, need_input: bool = True) -> np.ndarray | None:
        self.weight.grad += grad_out.T @ self._x
        if self.bias is not None:
            self.bias.grad += grad_out.sum(axis=0)
        return grad_out @ self.weight.data if need_input else None

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}" + (", bias=False" if self.bias is None else "")


class ReLU(Module):
    """``max(x, 0)``; the gradient passes where the output is positive."""

    def forward(self, x: np.ndarray) -> np.ndarray:
        # the 0/1 mask, kept for backward: a product with it is several times faster than
        # np.where, and computing it here (one cheap pass) halves the backward pass
        self._mask = np.greater(x, 0)
        return np.maximum(x, 0)

    def backward(self, grad_out: np.ndarray, *, need_input: bool = True) -> np.ndarray | None:
        if not need_input:
            return None
        return grad_out * self._mask


class MaxPool2d(Module):
    """Max pooling, as ``torch.nn.MaxPool2d`` (the backward pass reuses the forward indices)."""

    def __init__(self, kernel_size: IntOrPair, stride: IntOrPair | None = None, padding: IntOrPair = 0,
                 dilation: IntOrPair = 1, ceil_mode: bool = False) -> None:
        super().__init__()
        self.kernel_size, self.stride, self.padding = kernel_size, stride, padding
        self.dilation, self.ceil_mode = dilation, ceil_mode

    def forward(self, x: np.ndarray) -> np.ndarray:
        out, self._indices = F.max_pool2d(x, self.kernel_size, self.stride, self.padding, self.dilation,
                                          self.ceil_mode, return_indices=True, backend=self.backend)
        self._x = x
        return out

    def backward(self, grad_out: np.ndarray, *, need_input: bool = True) -> np.ndarray | None:
        if not need_input:
            return None
        return F.max_pool2d_backward(grad_out, self._x, self.kernel_size, self.stride, self.padding, self.dilation,
                                     self.ceil_mode, indices=self._indices, backend=self.backend)

    def extra_repr(self) -> str:
        return f"kernel_size={self.kernel_size}, stride={self.stride}, padding={self.padding}"


class AvgPool2d(Module):
    """Average pooling, as ``torch.nn.AvgPool2d``."""

    def __init__(self, kernel_size: IntOrPair, stride: IntOrPair | None = None, padding: IntOrPair = 0,
                 ceil_mode: bool = False, count_include_pad: bool = True) -> None:
        super().__init__()
        self.kernel_size, self.stride, self.padding = kernel_size, stride, padding
        self.ceil_mode, self.count_include_pad = ceil_mode, count_include_pad

    def forward(self, x: np.ndarray) -> np.ndarray:
        self._shape = x.shape
        return F.avg_pool2d(x, self.kernel_size, self.stride, self.padding, self.ceil_mode, self.count_include_pad,
                            backend=self.backend)

    def backward(self, grad_out: np.ndarray, *, need_input: bool = True) -> np.ndarray | None:
        if not need_input:
            return None
        return F.avg_pool2d_backward(grad_out, self._shape, self.kernel_size, self.stride, self.padding,
                                     self.ceil_mode, self.count_include_pad, backend=self.backend)

    def extra_repr(self) -> str:
        return f"kernel_size={self.kernel_size}, stride={self.stride}, padding={self.padding}"


class GlobalAvgPool2d(Module):
    """Mean over each feature map: (N, C, H, W) -> (N, C) (``AdaptiveAvgPool2d(1)`` + flatten)."""

    def forward(self, x: np.ndarray) -> np.ndarray:
        self._shape = x.shape
        return x.mean(axis=(2, 3), dtype=x.dtype)

    def backward(self, grad_out: np.ndarray, *, need_input: bool = True) -> np.ndarray | None:
        if not need_input:
            return None
        n, c, h, w = self._shape
        scale = grad_out.dtype.type(1.0 / (h * w))
        return np.ascontiguousarray(np.broadcast_to((grad_out * scale)[:, :, None, None], self._shape))


class Flatten(Module):
    """(N, ...) -> (N, prod(...))."""

    def forward(self, x: np.ndarray) -> np.ndarray:
        self._shape = x.shape
        return x.reshape(x.shape[0], -1)

    def backward(self, grad_out: np.ndarray, *, need_input: bool = True) -> np.ndarray | None:
        return grad_out.reshape(self._shape) if need_input else None


class Dropout(Module):
    """Inverted dropout: in training, zero each value with probability ``p`` and scale the rest by 1/(1-p).

    Parameters
    ----------
    p : float in [0, 1)
    rng : numpy.random.Generator or int, optional
        Source of the masks (``self.rng``).
    """

    def __init__(self, p: float = 0.5, *, rng: np.random.Generator | int | None = None) -> None:
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"Dropout(): p must be in [0, 1), got {p}")
        self.p = float(p)
        self.rng = as_generator(rng)
        self._mask: np.ndarray | None = None

    def forward(self, x: np.ndarray) -> np.ndarray:
        if not self.training or self.p == 0.0:
            self._mask = None
            return x
        keep = self.rng.random(x.shape, dtype=np.float64 if x.dtype == np.float64 else np.float32) >= self.p
        self._mask = keep.astype(x.dtype) * x.dtype.type(1.0 / (1.0 - self.p))
        return x * self._mask

    def backward(self, grad_out: np.ndarray, *, need_input: bool = True) -> np.ndarray | None:
        if not need_input:
            return None
        return grad_out if self._mask is None else grad_out * self._mask

    def extra_repr(self) -> str:
        return f"p={self.p}"


class BatchNorm2d(Module):
    """Batch normalisation over (N, H, W) per channel, as ``torch.nn.BatchNorm2d``.

    Training normalises with the batch mean and biased variance and updates the running
    statistics with ``momentum`` (running variance uses the unbiased estimate, as PyTorch);
    evaluation uses the running statistics.
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float = 0.1, affine: bool = True, *,
                 dtype: Any = np.float32) -> None:
        super().__init__()
        self.num_features, self.eps, self.momentum = num_features, eps, momentum
        self.weight = Parameter(np.ones(num_features, dtype=dtype)) if affine else None
        self.bias = Parameter(np.zeros(num_features, dtype=dtype)) if affine else None
        self.running_mean = np.zeros(num_features, dtype=dtype)
        self.running_var = np.ones(num_features, dtype=dtype)

    def _own_buffers(self):
        yield "running_mean", self.running_mean
        yield "running_var", self.running_var

    def _cast_buffers(self, dtype: np.dtype) -> None:
        self.running_mean = self.running_mean.astype(dtype)
        self.running_var = self.running_var.astype(dtype)

    def forward(self, x: np.ndarray) -> np.ndarray:
        if x.ndim != 4 or x.shape[1] != self.num_features:
            raise ValueError(f"BatchNorm2d.forward(): expected (N, {self.num_features}, H, W), got {x.shape}")
        if self.training:
            mean = x.mean(axis=(0, 2, 3))
            var = x.var(axis=(0, 2, 3))
            m = x.size // self.num_features
            self.running_mean *= 1 - self.momentum
            self.running_mean += self.momentum * mean
            self.running_var *= 1 - self.momentum
            self.running_var += self.momentum * var * (m / max(m - 1, 1))
        else:
            mean, var = self.running_mean, self.running_var
        self._inv_std = (1.0 / np.sqrt(var + self.eps)).astype(x.dtype)
        self._xhat = (x - mean.astype(x.dtype)[None, :, None, None]) * self._inv_std[None, :, None, None]
        if self.weight is None:
            return self._xhat
        return self._xhat * self.weight.data[None, :, None, None] + self.bias.data[None, :, None, None]

    def backward(self, grad_out: np.ndarray, *, need_input: bool = True) -> np.ndarray | None:
        axes = (0, 2, 3)
        if self.weight is not None:
            self.weight.grad += (grad_out * self._xhat).sum(axis=axes)
            self.bias.grad += grad_out.sum(axis=axes)
            g = grad_out * self.weight.data[None, :, None, None]
        else:
            g = grad_out
        if not need_input:
            return None
        scale = self._inv_std[None, :, None, None]
        if not self.training:
            return g * scale
        mean_g = g.mean(axis=axes, keepdims=True)
        mean_gx = (g * self._xhat).mean(axis=axes, keepdims=True)
        return (g - mean_g - self._xhat * mean_gx) * scale

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}, momentum={self.momentum}"
