"""Argument normalisation and validation: the ONLY place fastconv checks input.

Every public function hands its raw arguments to one ``*_args`` function here and
gets back arrays that are C-contiguous in the compute dtype plus a frozen geometry
record (:class:`ConvGeometry` or :class:`PoolGeometry`).  Backends trust those
records and never re-validate.  Errors are ``TypeError`` for wrong types and
``ValueError`` for wrong values, and every message names the public function,
the argument and the offending shape or value.
"""

from __future__ import annotations

import functools
import numbers
from dataclasses import dataclass
from typing import Any, NamedTuple, Sequence

import numpy as np

Pair = tuple[int, int]

COMPUTE_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


# --------------------------------------------------------------------------- scalars


def _int(value: Any, func: str, name: str) -> int:
    """An exact Python int from an int-like (bool, float and str rejected)."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{func}(): {name} must be an int or a pair of ints, got {value!r}")
    return int(value)


def pair(value: Any, func: str, name: str, *, minimum: int) -> Pair:
    """Normalise an int or (h, w) pair of ints and check both are >= ``minimum``."""
    if type(value) is int and value >= minimum:  # the common cases first (each call costs about a
        return value, value                     # microsecond through the ABC checks below)
    if type(value) is tuple and len(value) == 2 and type(value[0]) is int and type(value[1]) is int \
            and min(value) >= minimum:
        return value
    if isinstance(value, (str, bytes)) or not isinstance(value, (numbers.Integral, Sequence, np.ndarray)):
        raise TypeError(f"{func}(): {name} must be an int or a pair of ints, got {value!r}")
    if isinstance(value, numbers.Integral):
        h = w = _int(value, func, name)
    else:
        items = list(np.asarray(value, dtype=object).ravel()) if isinstance(value, np.ndarray) else list(value)
        if len(items) != 2:
            raise ValueError(f"{func}(): {name} must be an int or a pair of ints, got {value!r}")
        h, w = (_int(v, func, name) for v in items)
    if h < minimum or w < minimum:
        raise ValueError(f"{func}(): {name} must be >= {minimum}, got {value!r}")
    return h, w


def positive_int(value: Any, func: str, name: str) -> int:
    v = _int(value, func, name)
    if v < 1:
        raise ValueError(f"{func}(): {name} must be a positive int, got {value!r}")
    return v


def flag(value: Any, func: str, name: str) -> bool:
    """A Python bool from a bool or NumPy bool (ints and strings rejected)."""
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{func}(): {name} must be a bool, got {value!r}")
    return bool(value)


def choice(value: Any, options: Sequence[str], func: str, name: str) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{func}(): {name} must be one of {list(options)}, got {value!r}")
    if value not in options:
        raise ValueError(f"{func}(): {name} must be one of {list(options)}, got {value!r}")
    return value


# --------------------------------------------------------------------------- arrays


def is_device_array(a: Any) -> bool:
    """True for GPU arrays (numba device arrays, CuPy, ...): anything exposing
    ``__cuda_array_interface__`` (or, in numba's CUDA simulator, ``__cuda_ndarray__``)
    that is not a NumPy array."""
    if isinstance(a, np.ndarray):
        return False
    return hasattr(a, "__cuda_array_interface__") or bool(getattr(a, "__cuda_ndarray__", False))


def _dtype_of(a: Any, func: str, name: str) -> np.dtype:
    dtype = np.dtype(a.dtype)
    if dtype.kind == "b" or dtype.kind not in "iuf":
        raise TypeError(
            f"{func}(): {name} has unsupported dtype {dtype}; use a real float or integer dtype"
        )
    return dtype


def _host(a: Any, func: str, name: str) -> Any:
    if is_device_array(a):
        return a
    if isinstance(a, np.ndarray):
        arr = a
    else:
        try:
            arr = np.asarray(a)
        except (ValueError, TypeError) as exc:
            raise TypeError(f"{func}(): {name} is not array-like ({exc})") from None
    if arr.dtype == object or arr.dtype.kind in "SUVMm":
        raise TypeError(f"{func}(): {name} has unsupported dtype {arr.dtype}; use a real float or integer dtype")
    return arr


def compute_dtype(func: str, **arrays: Any) -> np.dtype:
    """The dtype fastconv computes in: ``result_type(*arrays, float32)``, which must
    be float32 or float64 (integers promote to float64, float16 to float32)."""
    dtypes = [_dtype_of(a, func, name) for name, a in arrays.items() if a is not None]
    if all(d == dtypes[0] for d in dtypes) and dtypes[0] in COMPUTE_DTYPES:
        return dtypes[0]  # one float dtype throughout: what result_type would give, 2 us sooner
    dtype = np.result_type(*dtypes, np.float32)
    if dtype not in COMPUTE_DTYPES:
        names = ", ".join(f"{n}: {np.dtype(a.dtype)}" for n, a in arrays.items() if a is not None)
        raise TypeError(f"{func}(): unsupported dtype combination ({names}) -> {dtype}; "
                        "fastconv computes in float32 or float64")
    return np.dtype(dtype)


def as_compute(a: Any, dtype: np.dtype) -> Any:
    """A C-contiguous array of ``dtype`` (a copy only when needed; never the caller's
    array when it would be written to).  Device arrays are passed through as they are."""
    if is_device_array(a):
        return a
    return np.ascontiguousarray(a, dtype=dtype)


def _check_device_dtype(arrays: dict[str, Any], dtype: np.dtype, func: str) -> None:
    for name, a in arrays.items():
        if a is not None and is_device_array(a) and np.dtype(a.dtype) != dtype:
            raise TypeError(f"{func}(): device array {name} has dtype {np.dtype(a.dtype)}; "
                            f"device arrays must already be {dtype} (no conversion on the GPU)")


def _shape(a: Any) -> tuple[int, ...]:
    if type(a) is np.ndarray:
        return a.shape  # already a tuple of ints
    return tuple(int(d) for d in a.shape)


# --------------------------------------------------------------------------- geometry


def _out_size(size: int, kernel: int, stride: int, pad_lo: int, pad_hi: int, dilation: int, ceil_mode: bool) -> int:
    """PyTorch's output size rule (``pooling_output_shape`` when ``ceil_mode``)."""
    span = size + pad_lo + pad_hi - dilation * (kernel - 1) - 1
    if span < 0:
        return 0
    out = (span + (stride - 1 if ceil_mode else 0)) // stride + 1
    if ceil_mode and (out - 1) * stride >= size + pad_lo:
        out -= 1
    return out


@dataclass(frozen=True)
class ConvGeometry:
    """Everything a backend needs to know about one convolution (validated).

    Shapes: input (n, c, h, w), weight (k, c // groups, r, s), output (n, k, out_h, out_w).
    ``padding`` is (top, bottom, left, right) after resolving "same"/"valid".
    """

    n: int
    c: int
    h: int
    w: int
    k: int
    r: int
    s: int
    stride: Pair
    padding: tuple[int, int, int, int]
    dilation: Pair
    groups: int
    dtype: np.dtype

    @functools.cached_property  # (the kernels' planning asks for these many times per call)
    def out_h(self) -> int:
        return _out_size(self.h, self.r, self.stride[0], self.padding[0], self.padding[1], self.dilation[0], False)

    @functools.cached_property
    def out_w(self) -> int:
        return _out_size(self.w, self.s, self.stride[1], self.padding[2], self.padding[3], self.dilation[1], False)

    @property
    def input_shape(self) -> tuple[int, int, int, int]:
        return (self.n, self.c, self.h, self.w)

    @property
    def weight_shape(self) -> tuple[int, int, int, int]:
        return (self.k, self.c // self.groups, self.r, self.s)

    @property
    def output_shape(self) -> tuple[int, int, int, int]:
        return (self.n, self.k, self.out_h, self.out_w)

    @property
    def c_per_group(self) -> int:
        return self.c // self.groups

    @property
    def k_per_group(self) -> int:
        return self.k // self.groups

    @property
    def flops(self) -> int:
        """2 * N * K * Ho * Wo * (C / groups) * R * S: the work of one pass."""
        return 2 * self.n * self.k * self.out_h * self.out_w * self.c_per_group * self.r * self.s

    def with_batch(self, n: int) -> "ConvGeometry":
        from dataclasses import replace

        return replace(self, n=n)


@dataclass(frozen=True)
class PoolGeometry:
    """Everything a backend needs for one pooling call (validated).

    ``padding`` is symmetric (ph, pw) as in PyTorch; windows may run past the
    bottom/right edge when ``ceil_mode`` is set.
    """

    n: int
    c: int
    h: int
    w: int
    kernel: Pair
    stride: Pair
    padding: Pair
    dilation: Pair
    ceil_mode: bool
    count_include_pad: bool
    dtype: np.dtype

    @property
    def out_h(self) -> int:
        return _out_size(self.h, self.kernel[0], self.stride[0], self.padding[0], self.padding[0],
                         self.dilation[0], self.ceil_mode)

    @property
    def out_w(self) -> int:
        return _out_size(self.w, self.kernel[1], self.stride[1], self.padding[1], self.padding[1],
                         self.dilation[1], self.ceil_mode)

    @property
    def input_shape(self) -> tuple[int, int, int, int]:
        return (self.n, self.c, self.h, self.w)

    @property
    def output_shape(self) -> tuple[int, int, int, int]:
        return (self.n, self.c, self.out_h, self.out_w)


class Prepared(NamedTuple):
    """Validated arrays plus geometry; ``batched`` is False for 3-D (C, H, W) input."""

    arrays: tuple[Any, ...]
    geometry: Any
    batched: bool
    on_device: bool


def _batched(a: Any, func: str, name: str) -> tuple[Any, bool]:
    shape = _shape(a)
    if len(shape) == 4:
        return a, True
    if len(shape) == 3:
        try:
            return a.reshape((1,) + shape), False
        except (NotImplementedError, TypeError, ValueError):  # a non-contiguous device array
            raise ValueError(f"{func}(): unbatched device array {name} of shape {shape} is not contiguous; "
                             "make it contiguous or pass a 4-D batch") from None
    raise ValueError(f"{func}(): {name} must be 4-D (N, C, H, W) or 3-D (C, H, W), got shape {shape}")


def _conv_padding(padding: Any, func: str, r: int, s: int, stride: Pair, dilation: Pair) -> tuple[int, int, int, int]:
    if isinstance(padding, str):
        mode = choice(padding, ("same", "valid"), func, "padding")
        if mode == "valid":
            return (0, 0, 0, 0)
        if stride != (1, 1):
            raise ValueError(f"{func}(): padding='same' is not supported for strided convolutions, got stride={stride}")
        total_h, total_w = dilation[0] * (r - 1), dilation[1] * (s - 1)
        return (total_h // 2, total_h - total_h // 2, total_w // 2, total_w - total_w // 2)
    ph, pw = pair(padding, func, "padding", minimum=0)
    return (ph, ph, pw, pw)


def _conv_geometry(func: str, x_shape, w_shape, stride, padding, dilation, groups, dtype, x_name="input") -> ConvGeometry:
    n, c, h, w = x_shape
    if len(w_shape) != 4:
        raise ValueError(f"{func}(): weight must be 4-D (K, C // groups, R, S), got shape {tuple(w_shape)}")
    k, cg, r, s = w_shape
    stride = pair(stride, func, "stride", minimum=1)
    dilation = pair(dilation, func, "dilation", minimum=1)
    groups = positive_int(groups, func, "groups")
    if min(k, cg, r, s) == 0:
        raise ValueError(f"{func}(): weight has a zero-size dimension, shape {tuple(w_shape)}")
    if c % groups or k % groups:
        raise ValueError(f"{func}(): groups={groups} must divide both input channels ({c}) "
                         f"and output channels ({k}); {x_name} shape {tuple(x_shape)}, weight shape {tuple(w_shape)}")
    if cg * groups != c:
        raise ValueError(f"{func}(): weight expects {cg * groups} input channels (shape {tuple(w_shape)}, groups={groups}) "
                         f"but {x_name} has {c} channels (shape {tuple(x_shape)})")
    if h == 0 or w == 0:
        raise ValueError(f"{func}(): {x_name} has zero spatial size, shape {tuple(x_shape)}")
    pad = _conv_padding(padding, func, r, s, stride, dilation)
    g = ConvGeometry(n, c, h, w, k, r, s, stride, pad, dilation, groups, dtype)
    eff_r, eff_s = dilation[0] * (r - 1) + 1, dilation[1] * (s - 1) + 1
    hp, wp = h + pad[0] + pad[1], w + pad[2] + pad[3]
    if eff_r > hp or eff_s > wp:
        raise ValueError(f"{func}(): kernel ({eff_r} x {eff_s} with dilation {dilation}) is larger than the padded "
                         f"{x_name} ({hp} x {wp}); {x_name} shape {tuple(x_shape)}, weight shape {tuple(w_shape)}")
    return g


def conv2d_args(func: str, x, weight, bias, stride, padding, dilation, groups) -> Prepared:
    """Validate conv2d arguments. Returns arrays (x, weight, bias-or-None)."""
    x, weight = _host(x, func, "input"), _host(weight, func, "weight")
    bias = None if bias is None else _host(bias, func, "bias")
    dtype = compute_dtype(func, input=x, weight=weight, bias=bias)
    _check_device_dtype({"input": x, "weight": weight, "bias": bias}, dtype, func)
    x4, batched = _batched(x, func, "input")
    g = _conv_geometry(func, _shape(x4), _shape(weight), stride, padding, dilation, groups, dtype)
    if bias is not None and _shape(bias) != (g.k,):
        raise ValueError(f"{func}(): bias must have shape ({g.k},) to match weight shape {g.weight_shape}, "
                         f"got {_shape(bias)}")
    arrays = (as_compute(x4, dtype), as_compute(weight, dtype), None if bias is None else as_compute(bias, dtype))
    on_device = any(is_device_array(a) for a in arrays if a is not None)
    return Prepared(arrays, g, batched, on_device)


def conv2d_backward_args(func: str, grad_out, x, weight, stride, padding, dilation, groups) -> Prepared:
    """Validate conv2d_backward arguments. Returns arrays (grad_out, x, weight)."""
    grad_out, x, weight = (_host(grad_out, func, "grad_out"), _host(x, func, "input"), _host(weight, func, "weight"))
    dtype = compute_dtype(func, grad_out=grad_out, input=x, weight=weight)
    _check_device_dtype({"grad_out": grad_out, "input": x, "weight": weight}, dtype, func)
    x4, batched = _batched(x, func, "input")
    g = _conv_geometry(func, _shape(x4), _shape(weight), stride, padding, dilation, groups, dtype)
    expected = g.output_shape if batched else g.output_shape[1:]
    if _shape(grad_out) != expected:
        raise ValueError(f"{func}(): grad_out must have the output shape {expected} (input shape {_shape(x)}, "
                         f"weight shape {g.weight_shape}), got {_shape(grad_out)}")
    go4 = grad_out if batched else _batched(grad_out, func, "grad_out")[0]
    arrays = (as_compute(go4, dtype), as_compute(x4, dtype), as_compute(weight, dtype))
    return Prepared(arrays, g, batched, any(is_device_array(a) for a in arrays))


def _pool_geometry(func: str, shape, kernel_size, stride, padding, dilation, ceil_mode, count_include_pad, dtype,
                   x_name="input") -> PoolGeometry:
    n, c, h, w = shape
    kernel = pair(kernel_size, func, "kernel_size", minimum=1)
    stride = kernel if stride is None or (isinstance(stride, (list, tuple)) and len(stride) == 0) \
        else pair(stride, func, "stride", minimum=1)
    padding = pair(padding, func, "padding", minimum=0)
    dilation = pair(dilation, func, "dilation", minimum=1)
    ceil_mode = flag(ceil_mode, func, "ceil_mode")
    count_include_pad = flag(count_include_pad, func, "count_include_pad")
    if padding[0] > kernel[0] // 2 or padding[1] > kernel[1] // 2:
        raise ValueError(f"{func}(): padding {padding} must be at most half of kernel_size {kernel}")
    if h == 0 or w == 0:
        raise ValueError(f"{func}(): {x_name} has zero spatial size, shape {tuple(shape)}")
    g = PoolGeometry(n, c, h, w, kernel, stride, padding, dilation, ceil_mode, count_include_pad, dtype)
    if g.out_h < 1 or g.out_w < 1:
        raise ValueError(f"{func}(): output size would be {g.out_h} x {g.out_w} for {x_name} shape {tuple(shape)} "
                         f"with kernel_size={kernel}, stride={stride}, padding={padding}, dilation={dilation}")
    return g


def pool_args(func: str, x, kernel_size, stride, padding, dilation=1, ceil_mode=False,
              count_include_pad=True) -> Prepared:
    """Validate max_pool2d / avg_pool2d arguments. Returns arrays (x,)."""
    x = _host(x, func, "input")
    dtype = compute_dtype(func, input=x)
    _check_device_dtype({"input": x}, dtype, func)
    x4, batched = _batched(x, func, "input")
    g = _pool_geometry(func, _shape(x4), kernel_size, stride, padding, dilation, ceil_mode, count_include_pad, dtype)
    arrays = (as_compute(x4, dtype),)
    return Prepared(arrays, g, batched, is_device_array(arrays[0]))


def _grad_out4(func: str, grad_out, g: PoolGeometry, batched: bool, input_desc: str):
    expected = g.output_shape if batched else g.output_shape[1:]
    if _shape(grad_out) != expected:
        raise ValueError(f"{func}(): grad_out must have the pooled shape {expected} ({input_desc}), "
                         f"got {_shape(grad_out)}")
    return grad_out if batched else _batched(grad_out, func, "grad_out")[0]


def max_pool2d_backward_args(func: str, grad_out, x, kernel_size, stride, padding, dilation, ceil_mode,
                             indices) -> Prepared:
    """Validate max_pool2d_backward. Returns arrays (grad_out, x, indices-or-None)."""
    grad_out, x = _host(grad_out, func, "grad_out"), _host(x, func, "input")
    dtype = compute_dtype(func, grad_out=grad_out, input=x)
    _check_device_dtype({"grad_out": grad_out, "input": x}, dtype, func)
    x4, batched = _batched(x, func, "input")
    g = _pool_geometry(func, _shape(x4), kernel_size, stride, padding, dilation, ceil_mode, True, dtype)
    go4 = _grad_out4(func, grad_out, g, batched, f"input shape {_shape(x)}")
    idx4 = None
    if indices is not None:
        indices = _host(indices, func, "indices")
        if np.dtype(indices.dtype).kind not in "iu":
            raise TypeError(f"{func}(): indices must be an integer array, got dtype {indices.dtype}")
        if _shape(indices) != _shape(grad_out):
            raise ValueError(f"{func}(): indices must have the shape of grad_out {_shape(grad_out)}, "
                             f"got {_shape(indices)}")
        idx4 = indices if batched else _batched(indices, func, "indices")[0]
        if not is_device_array(idx4):
            idx4 = np.ascontiguousarray(idx4, dtype=np.int64)
            # one pass: as unsigned, negative indices are huge, so max < H*W checks both bounds
            if idx4.size and idx4.view(np.uint64).max() >= g.h * g.w:
                raise ValueError(f"{func}(): indices must lie in [0, {g.h * g.w}) for input planes of "
                                 f"{g.h} x {g.w}, got values in [{idx4.min()}, {idx4.max()}]")
    arrays = (as_compute(go4, dtype), as_compute(x4, dtype), idx4)
    return Prepared(arrays, g, batched, any(is_device_array(a) for a in arrays if a is not None))


def avg_pool2d_backward_args(func: str, grad_out, input_shape, kernel_size, stride, padding, ceil_mode,
                             count_include_pad) -> Prepared:
    """Validate avg_pool2d_backward. Returns arrays (grad_out,)."""
    grad_out = _host(grad_out, func, "grad_out")
    dtype = compute_dtype(func, grad_out=grad_out)
    _check_device_dtype({"grad_out": grad_out}, dtype, func)
    if isinstance(input_shape, (str, bytes)) or not isinstance(input_shape, (Sequence, np.ndarray)):
        raise TypeError(f"{func}(): input_shape must be a sequence of ints, got {input_shape!r}")
    shape = tuple(_int(d, func, "input_shape") for d in input_shape)
    if len(shape) not in (3, 4) or min(shape) < 0:
        raise ValueError(f"{func}(): input_shape must be (N, C, H, W) or (C, H, W) with non-negative sizes, "
                         f"got {shape}")
    batched = len(shape) == 4
    shape4 = shape if batched else (1,) + shape
    g = _pool_geometry(func, shape4, kernel_size, stride, padding, 1, ceil_mode, count_include_pad, dtype,
                       x_name="input_shape")
    go4 = _grad_out4(func, grad_out, g, batched, f"input_shape {shape}")
    arrays = (as_compute(go4, dtype),)
    return Prepared(arrays, g, batched, is_device_array(arrays[0]))


# --------------------------------------------------------------------------- scipy-style 2-D


SCIPY_MODES = ("full", "same", "valid")
SCIPY_BOUNDARIES = ("fill", "wrap", "symm")
_BOUNDARY_ALIASES = {"fill": "fill", "pad": "fill", "wrap": "wrap", "circular": "wrap",
                     "symm": "symm", "symmetric": "symm"}


class Signal2dArgs(NamedTuple):
    in1: np.ndarray
    in2: np.ndarray
    mode: str
    boundary: str
    fillvalue: float
    out_dtype: np.dtype


def signal2d_args(func: str, in1, in2, mode, boundary, fillvalue) -> Signal2dArgs:
    """Validate correlate2d / convolve2d arguments with scipy.signal's rules."""
    in1, in2 = _host(in1, func, "in1"), _host(in2, func, "in2")
    for name, a in (("in1", in1), ("in2", in2)):
        if is_device_array(a):
            raise TypeError(f"{func}(): {name} is a device array; {func} works on host arrays")
        _dtype_of(a, func, name)
        if a.ndim != 2:
            raise ValueError(f"{func}(): {name} must be 2-D, got shape {a.shape}")
        if a.size == 0:
            raise ValueError(f"{func}(): {name} must not be empty, got shape {a.shape}")
    mode = choice(mode, SCIPY_MODES, func, "mode")
    if not isinstance(boundary, str):
        raise TypeError(f"{func}(): boundary must be one of {list(_BOUNDARY_ALIASES)}, got {boundary!r}")
    if boundary not in _BOUNDARY_ALIASES:
        raise ValueError(f"{func}(): boundary must be one of {list(_BOUNDARY_ALIASES)}, got {boundary!r}")
    if isinstance(fillvalue, (bool, np.bool_)) or not isinstance(fillvalue, numbers.Real) \
            and not (isinstance(fillvalue, np.ndarray) and fillvalue.size == 1):
        raise TypeError(f"{func}(): fillvalue must be a real scalar, got {fillvalue!r}")
    if mode == "valid" and not (all(a >= b for a, b in zip(in1.shape, in2.shape))
                                or all(b >= a for a, b in zip(in1.shape, in2.shape))):
        raise ValueError(f"{func}(): for mode='valid' one input must be at least as large as the other in "
                         f"every dimension, got in1 {in1.shape} and in2 {in2.shape}")
    out_dtype = np.result_type(in1, in2)
    return Signal2dArgs(in1, in2, mode, _BOUNDARY_ALIASES[boundary], float(np.asarray(fillvalue).ravel()[0]),
                        out_dtype)
