"""The public functional API.  Every function is thin: validate (``_args``),
pick a backend (``_dispatch``), call its kernel, restore the caller's layout."""

from __future__ import annotations

from typing import Any, NamedTuple, Sequence, Union

import numpy as np

from . import _args, _dispatch

ArrayLike = Any
IntOrPair = Union[int, tuple[int, int]]


class Conv2dGrads(NamedTuple):
    """Gradients returned by :func:`conv2d_backward` (None where not requested)."""

    input: np.ndarray | None
    weight: np.ndarray | None
    bias: np.ndarray | None


def _unbatch(a: Any, batched: bool) -> Any:
    return a if batched else a[0]


def _empty(shape: tuple[int, ...], dtype: np.dtype, on_device: bool = False) -> Any:
    """Zeros for an empty batch's result; a device array when the inputs were."""
    out = np.zeros(shape, dtype=dtype)
    if on_device:
        from numba import cuda

        return cuda.to_device(out)
    return out


def conv2d(x: ArrayLike, weight: ArrayLike, bias: ArrayLike | None = None, stride: IntOrPair = 1,
           padding: IntOrPair | str = 0, dilation: IntOrPair = 1, groups: int = 1, *,
           backend: str | None = None, algorithm: str | None = None) -> np.ndarray:
    """2-D cross-correlation over an NCHW batch, as ``torch.nn.functional.conv2d``.

    Parameters
    ----------
    x : array_like, shape (N, C, H, W) or (C, H, W)
        Input batch (or one unbatched image).
    weight : array_like, shape (K, C // groups, R, S)
        Filters.
    bias : array_like, shape (K,), optional
        Added to every output position of each output channel.
    stride, dilation : int or (int, int)
        Step between output positions / between kernel taps.
    padding : int, (int, int), "same" or "valid"
        Zeros added on each side.  "same" keeps the size (stride 1 only; even kernels
        get the extra row/column at the bottom/right, as in PyTorch).
    groups : int
        Split channels into independent groups (``groups == C`` is depthwise).
    backend : str, optional
        "reference", "numpy", "cython", "numba", "cuda" or "auto" (default:
        :func:`fastconv.get_backend`).
    algorithm : str, optional
        "direct", "im2col", ... or "auto" (default): the backend picks per shape.

    Returns
    -------
    numpy.ndarray, shape (N, K, Ho, Wo) or (K, Ho, Wo)
        C-contiguous, in the compute dtype (float32 or float64; see the README's dtype rules).
        Device arrays in give device arrays out.
    """
    a = _args.conv2d_args("conv2d", x, weight, bias, stride, padding, dilation, groups)
    xc, w, b = a.arrays
    g = a.geometry
    if g.n == 0:
        return _unbatch(_empty(g.output_shape, g.dtype, a.on_device), a.batched)
    impl, algo = _dispatch.select_conv("conv2d", g, "conv2d", backend, algorithm, on_device=a.on_device)
    return _unbatch(impl.conv2d(xc, w, b, g, algo), a.batched)


def conv2d_backward(grad_out: ArrayLike, x: ArrayLike, weight: ArrayLike, stride: IntOrPair = 1,
                    padding: IntOrPair | str = 0, dilation: IntOrPair = 1, groups: int = 1, *,
                    need_input: bool = True, need_weight: bool = True, need_bias: bool = True,
                    backend: str | None = None, algorithm: str | None = None) -> Conv2dGrads:
    """Gradients of :func:`conv2d` with respect to its input, weight and bias.

    Parameters
    ----------
    grad_out : array_like, shape (N, K, Ho, Wo) or (K, Ho, Wo)
        Gradient of the loss with respect to the conv2d output.
    x, weight, stride, padding, dilation, groups
        As passed to :func:`conv2d`.
    need_input, need_weight, need_bias : bool
        Which gradients to compute; the others are returned as None.
    backend, algorithm : str, optional
        As in :func:`conv2d`.

    Returns
    -------
    Conv2dGrads
        ``(input, weight, bias)`` with the shapes of ``x``, ``weight`` and ``(K,)``.
    """
    a = _args.conv2d_backward_args("conv2d_backward", grad_out, x, weight, stride, padding, dilation, groups)
    gy, xc, w = a.arrays
    g = a.geometry
    if g.n == 0:
        return Conv2dGrads(
            _unbatch(_empty(g.input_shape, g.dtype, a.on_device), a.batched) if need_input else None,
            _empty(g.weight_shape, g.dtype, a.on_device) if need_weight else None,
            _empty((g.k,), g.dtype, a.on_device) if need_bias else None,
        )
    grad_input = grad_weight = grad_bias = None
    if need_input:
        impl, algo = _dispatch.select_conv("conv2d_backward_input", g, "conv2d_backward", backend, algorithm,
                                           on_device=a.on_device)
        grad_input = _unbatch(impl.conv2d_backward_input(gy, w, g, algo), a.batched)
    if need_weight:
        impl, algo = _dispatch.select_conv("conv2d_backward_weight", g, "conv2d_backward", backend, algorithm,
                                           on_device=a.on_device)
        grad_weight = impl.conv2d_backward_weight(gy, xc, g, algo)
    if need_bias:
        impl = _dispatch.resolve(backend, "conv2d_backward", on_device=a.on_device)
        grad_bias = impl.conv2d_backward_bias(gy, g)
    return Conv2dGrads(grad_input, grad_weight, grad_bias)


def max_pool2d(x: ArrayLike, kernel_size: IntOrPair, stride: IntOrPair | None = None, padding: IntOrPair = 0,
               dilation: IntOrPair = 1, ceil_mode: bool = False, return_indices: bool = False, *,
               backend: str | None = None) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """2-D max pooling, as ``torch.nn.functional.max_pool2d``.

    Padding counts as -inf; NaN propagates (a window holding NaN gives NaN).

    Parameters
    ----------
    x : array_like, shape (N, C, H, W) or (C, H, W)
    kernel_size, stride, padding, dilation : int or (int, int)
        ``stride`` defaults to ``kernel_size``; ``padding`` must be at most half the kernel.
    ceil_mode : bool
        Round the output size up (windows may then run past the bottom/right edge).
    return_indices : bool
        Also return the int64 flat index of each maximum in its (H, W) input plane.
    backend : str, optional
        As in :func:`conv2d`.

    Returns
    -------
    out : numpy.ndarray, shape (N, C, Ho, Wo) or (C, Ho, Wo)
    indices : numpy.ndarray of int64, only when ``return_indices``
    """
    return_indices = _args.flag(return_indices, "max_pool2d", "return_indices")
    a = _args.pool_args("max_pool2d", x, kernel_size, stride, padding, dilation, ceil_mode)
    p = a.geometry
    if p.n == 0:
        out, idx = _empty(p.output_shape, p.dtype, a.on_device), _empty(p.output_shape, np.int64, a.on_device)
    else:
        impl = _dispatch.resolve(backend, "max_pool2d", on_device=a.on_device)
        out, idx = impl.max_pool2d(a.arrays[0], p)
    out, idx = _unbatch(out, a.batched), _unbatch(idx, a.batched)
    return (out, idx) if return_indices else out


def max_pool2d_backward(grad_out: ArrayLike, x: ArrayLike, kernel_size: IntOrPair, stride: IntOrPair | None = None,
                        padding: IntOrPair = 0, dilation: IntOrPair = 1, ceil_mode: bool = False, *,
                        indices: ArrayLike | None = None, backend: str | None = None) -> np.ndarray:
    """Gradient of :func:`max_pool2d` with respect to its input.

    Parameters
    ----------
    grad_out : array_like, the shape of the pooled output
    x, kernel_size, stride, padding, dilation, ceil_mode
        As passed to :func:`max_pool2d`.
    indices : array_like of int, optional
        The indices :func:`max_pool2d` returned; recomputed from ``x`` when omitted.
    backend : str, optional

    Returns
    -------
    numpy.ndarray, the shape of ``x``
        Each grad_out value added at the position of its window's maximum.
    """
    a = _args.max_pool2d_backward_args("max_pool2d_backward", grad_out, x, kernel_size, stride, padding,
                                       dilation, ceil_mode, indices)
    gy, xc, idx = a.arrays
    p = a.geometry
    if p.n == 0:
        return _unbatch(_empty(p.input_shape, p.dtype, a.on_device), a.batched)
    impl = _dispatch.resolve(backend, "max_pool2d_backward", on_device=a.on_device)
    if idx is None:
        _, idx = impl.max_pool2d(xc, p)
    return _unbatch(impl.max_pool2d_backward(gy, idx, p), a.batched)


def avg_pool2d(x: ArrayLike, kernel_size: IntOrPair, stride: IntOrPair | None = None, padding: IntOrPair = 0,
               ceil_mode: bool = False, count_include_pad: bool = True, *, backend: str | None = None) -> np.ndarray:
    """2-D average pooling, as ``torch.nn.functional.avg_pool2d``.

    Parameters
    ----------
    x : array_like, shape (N, C, H, W) or (C, H, W)
    kernel_size, stride, padding : int or (int, int)
        ``stride`` defaults to ``kernel_size``; ``padding`` must be at most half the kernel.
    ceil_mode : bool
        Round the output size up; cells added by ceil_mode never count in the divisor.
    count_include_pad : bool
        Whether zero padding counts in the divisor.
    backend : str, optional

    Returns
    -------
    numpy.ndarray, shape (N, C, Ho, Wo) or (C, Ho, Wo)
    """
    a = _args.pool_args("avg_pool2d", x, kernel_size, stride, padding, 1, ceil_mode, count_include_pad)
    p = a.geometry
    if p.n == 0:
        return _unbatch(_empty(p.output_shape, p.dtype, a.on_device), a.batched)
    impl = _dispatch.resolve(backend, "avg_pool2d", on_device=a.on_device)
    return _unbatch(impl.avg_pool2d(a.arrays[0], p), a.batched)


def avg_pool2d_backward(grad_out: ArrayLike, input_shape: Sequence[int], kernel_size: IntOrPair,
                        stride: IntOrPair | None = None, padding: IntOrPair = 0, ceil_mode: bool = False,
                        count_include_pad: bool = True, *, backend: str | None = None) -> np.ndarray:
    """Gradient of :func:`avg_pool2d` with respect to its input.

    Parameters
    ----------
    grad_out : array_like, the shape of the pooled output
    input_shape : sequence of int
        The shape of the pooled input, (N, C, H, W) or (C, H, W).
    kernel_size, stride, padding, ceil_mode, count_include_pad
        As passed to :func:`avg_pool2d`.
    backend : str, optional

    Returns
    -------
    numpy.ndarray of shape ``input_shape``
    """
    a = _args.avg_pool2d_backward_args("avg_pool2d_backward", grad_out, input_shape, kernel_size, stride,
                                       padding, ceil_mode, count_include_pad)
    p = a.geometry
    if p.n == 0:
        return _unbatch(_empty(p.input_shape, p.dtype, a.on_device), a.batched)
    impl = _dispatch.resolve(backend, "avg_pool2d_backward", on_device=a.on_device)
    return _unbatch(impl.avg_pool2d_backward(a.arrays[0], p), a.batched)


# --------------------------------------------------------------------------- scipy.signal-style


def _signal2d(func: str, in1, in2, mode, boundary, fillvalue, backend, flip: bool) -> np.ndarray:
    s = _args.signal2d_args(func, in1, in2, mode, boundary, fillvalue)
    image, kernel = s.in1, s.in2
    swapped = s.mode == "valid" and any(b > a for a, b in zip(image.shape, kernel.shape))
    if swapped:
        image, kernel = kernel, image
    if flip:
        kernel = kernel[::-1, ::-1]
    compute = np.result_type(image, kernel, np.float32)
    kh, kw = kernel.shape
    if s.mode == "valid":
        pads = (0, 0, 0, 0)
    elif s.mode == "full":
        pads = (kh - 1, kh - 1, kw - 1, kw - 1)
    else:  # "same": centred on the full output, as scipy.signal does
        top, left = (kh // 2, kw // 2) if flip else ((kh - 1) // 2, (kw - 1) // 2)
        pads = (top, kh - 1 - top, left, kw - 1 - left)
    if s.boundary == "fill" and s.fillvalue == 0.0:
        padding: Any = ((pads[0], pads[2]) if pads[0] == pads[1] and pads[2] == pads[3] else None)
        if padding is None:
            image = np.pad(image, ((pads[0], pads[1]), (pads[2], pads[3])))
            padding = 0
    else:
        np_mode = {"fill": "constant", "wrap": "wrap", "symm": "symmetric"}[s.boundary]
        extra = {"constant_values": s.fillvalue} if s.boundary == "fill" else {}
        image = np.pad(image.astype(compute), ((pads[0], pads[1]), (pads[2], pads[3])), mode=np_mode, **extra)
        padding = 0
    out = conv2d(image[None, None], kernel[None, None], padding=padding, backend=backend)[0, 0]
    if swapped and not flip:
        out = out[::-1, ::-1]
    if s.out_dtype.kind in "iu":
        out = np.rint(out)
    return np.ascontiguousarray(out, dtype=s.out_dtype)


def correlate2d(in1: ArrayLike, in2: ArrayLike, mode: str = "full", boundary: str = "fill",
                fillvalue: float = 0, *, backend: str | None = None) -> np.ndarray:
    """Cross-correlate two 2-D arrays; same results and dtype rules as ``scipy.signal.correlate2d``.

    Parameters
    ----------
    in1, in2 : array_like, 2-D
        The image and the kernel (swapped, as scipy does, when ``mode="valid"`` and
        ``in2`` is the larger).
    mode : {"full", "valid", "same"}
    boundary : {"fill", "wrap", "symm"}
        How the image is extended beyond its edges.
    fillvalue : scalar
        The value of the "fill" boundary.
    backend : str, optional
        The fastconv backend doing the work.

    Returns
    -------
    numpy.ndarray
        dtype ``numpy.result_type(in1, in2)`` (integer inputs give integer output).
    """
    return _signal2d("correlate2d", in1, in2, mode, boundary, fillvalue, backend, flip=False)


def convolve2d(in1: ArrayLike, in2: ArrayLike, mode: str = "full", boundary: str = "fill",
               fillvalue: float = 0, *, backend: str | None = None) -> np.ndarray:
    """Convolve two 2-D arrays; same results and dtype rules as ``scipy.signal.convolve2d``.

    Parameters and return value as in :func:`correlate2d`; the kernel is flipped.
    """
    return _signal2d("convolve2d", in1, in2, mode, boundary, fillvalue, backend, flip=True)
