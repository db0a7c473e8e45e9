"""Shape arithmetic helpers: output sizes, receptive fields, parameter counts."""

from __future__ import annotations

import numbers
from typing import Any, Sequence

from . import _args


def conv_output_size(size: int, kernel_size: int, stride: int = 1, padding: int | str = 0, dilation: int = 1,
                     ceil_mode: bool = False) -> int:
    """Output length of a convolution or pooling along one dimension (PyTorch's rule).

    Parameters
    ----------
    size, kernel_size, stride, dilation : int
    padding : int or "same" / "valid"
        Added on both sides (``"same"`` requires ``stride == 1``).
    ceil_mode : bool
        Round up as pooling with ``ceil_mode=True`` does (the last window must start
        inside the input or its left padding).

    Returns
    -------
    int
        The output length; ``ValueError`` if the kernel does not fit.
    """
    func = "conv_output_size"
    size = _args.positive_int(size, func, "size")
    kernel = _args.positive_int(kernel_size, func, "kernel_size")
    stride = _args.positive_int(stride, func, "stride")
    dilation = _args.positive_int(dilation, func, "dilation")
    if isinstance(padding, str):
        if _args.choice(padding, ("same", "valid"), func, "padding") == "valid":
            padding = 0
        elif stride != 1:
            raise ValueError(f"{func}(): padding='same' needs stride 1, got stride={stride}")
        else:
            return size
    padding = _args.pair(padding, func, "padding", minimum=0)[0]
    out = _args._out_size(size, kernel, stride, padding, padding, dilation, _args.flag(ceil_mode, func, "ceil_mode"))
    if out < 1:
        raise ValueError(f"{func}(): kernel_size={kernel} with dilation={dilation} does not fit in size={size} "
                         f"with padding={padding}")
    return out


def receptive_field(layers: Sequence[Any]) -> list[tuple[Any, Any]]:
    """Receptive field size and jump (input pixels between neighbouring outputs) after each layer.

    Parameters
    ----------
    layers : sequence
        Each layer is ``(kernel_size, stride)`` or ``(kernel_size, stride, dilation)``
        with ints or (h, w) pairs, or an object with ``kernel_size`` / ``stride`` (and
        optionally ``dilation``) attributes such as :class:`fastconv.nn.Conv2d`.

    Returns
    -------
    list of (size, jump)
        After layer ``l``: ``size_l = size_{l-1} + (dilation*(k-1)) * jump_{l-1}`` and
        ``jump_l = jump_{l-1} * stride``, starting from (1, 1).  Ints when every layer
        was given with ints, otherwise (h, w) pairs.
    """
    func = "receptive_field"
    if isinstance(layers, (str, bytes)) or not isinstance(layers, Sequence):
        raise TypeError(f"{func}(): layers must be a sequence of (kernel_size, stride[, dilation]), got {layers!r}")
    size, jump = (1, 1), (1, 1)
    all_ints = True
    result = []
    for i, layer in enumerate(layers):
        if hasattr(layer, "kernel_size"):
            spec = (layer.kernel_size, getattr(layer, "stride", 1) or layer.kernel_size,
                    getattr(layer, "dilation", 1))
        elif isinstance(layer, (tuple, list)) and len(layer) in (2, 3):
            spec = tuple(layer) + ((1,) if len(layer) == 2 else ())
        else:
            raise TypeError(f"{func}(): layers[{i}] must be (kernel_size, stride[, dilation]), got {layer!r}")
        all_ints &= all(isinstance(v, numbers.Integral) for v in spec)
        k = _args.pair(spec[0], func, f"layers[{i}] kernel_size", minimum=1)
        s = _args.pair(spec[1], func, f"layers[{i}] stride", minimum=1)
        d = _args.pair(spec[2], func, f"layers[{i}] dilation", minimum=1)
        size = tuple(size[a] + d[a] * (k[a] - 1) * jump[a] for a in range(2))
        jump = tuple(jump[a] * s[a] for a in range(2))
        result.append((size, jump))
    if all_ints:
        return [(sz[0], jp[0]) for sz, jp in result]
    return result


def conv_params(in_channels: int, out_channels: int, kernel_size: int | tuple[int, int], bias: bool = True,
                groups: int = 1) -> int:
    """Number of learnable parameters of a Conv2d layer:
    ``out * (in / groups) * kh * kw (+ out for the bias)``."""
    func = "conv_params"
    c = _args.positive_int(in_channels, func, "in_channels")
    k = _args.positive_int(out_channels, func, "out_channels")
    kh, kw = _args.pair(kernel_size, func, "kernel_size", minimum=1)
    groups = _args.positive_int(groups, func, "groups")
    if c % groups or k % groups:
        raise ValueError(f"{func}(): groups={groups} must divide in_channels={c} and out_channels={k}")
    return k * (c // groups) * kh * kw + (k if bias else 0)
