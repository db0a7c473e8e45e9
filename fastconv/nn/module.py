"""The building blocks every layer shares: :class:`Parameter`, :class:`Module`, :class:`Sequential`.

There is no autograd.  A module's ``forward(x)`` caches what its backward pass
needs; ``backward(grad_out)`` returns the gradient with respect to ``x`` and *adds*
the gradients of its parameters into ``Parameter.grad`` (call ``zero_grad()``
between steps, or let the optimiser do it).
"""

from __future__ import annotations

import os
from typing import Any, Iterator

import numpy as np


class Parameter:
    """A trainable array and the gradient accumulated for it.

    Parameters
    ----------
    data : numpy.ndarray
        The values (owned by the parameter; updated in place by optimisers).
    """

    __slots__ = ("data", "grad")

    def __init__(self, data: np.ndarray) -> None:
        self.data = np.ascontiguousarray(data)
        self.grad = np.zeros_like(self.data)

    @property
    def shape(self) -> tuple[int, ...]:
        return self.data.shape

    def __repr__(self) -> str:
        return f"Parameter(shape={self.data.shape}, dtype={self.data.dtype})"


def as_generator(rng: np.random.Generator | int | None) -> np.random.Generator:
    """A NumPy Generator from a seed, a Generator (used as is) or None (fresh entropy)."""
    return rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)


class Module:
    """Base class of layers and containers.

    Attributes
    ----------
    training : bool
        True in training mode (Dropout drops, BatchNorm uses batch statistics).
    backend : str or None
        The fastconv backend this module's kernels run on (None: fastconv's default,
        normally "auto").  Set it for a whole model with :meth:`set_backend`.
    """

    def __init__(self) -> None:
        self.training = True
        self.backend: str | None = None

    # ------------------------------------------------------------------ computation
    def forward(self, x: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def backward(self, grad_out: np.ndarray, *, need_input: bool = True) -> np.ndarray | None:
        """Gradient of the loss with respect to the last ``forward`` input.

        Parameter gradients are added into ``Parameter.grad``.  With
        ``need_input=False`` a layer may skip the input gradient and return None
        (the first layer of a network never needs it).
        """
        raise NotImplementedError

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return self.forward(x)

    # ------------------------------------------------------------------ structure
    def children(self) -> Iterator[tuple[str, "Module"]]:
        """Direct sub-modules as ``(name, module)``."""
        return iter(())

    def modules(self) -> Iterator["Module"]:
        """This module and every sub-module, depth first."""
        yield self
        for _, child in self.children():
            yield from child.modules()

    def _own_parameters(self) -> Iterator[tuple[str, Parameter]]:
        for name, value in vars(self).items():
            if isinstance(value, Parameter):
                yield name, value

    def _own_buffers(self) -> Iterator[tuple[str, np.ndarray]]:
        """Non-trainable state saved with the weights (BatchNorm running statistics)."""
        return iter(())

    def named_parameters(self, prefix: str = "") -> Iterator[tuple[str, Parameter]]:
        """``("0.weight", Parameter)``, ... in PyTorch's naming."""
        for name, p in self._own_parameters():
            yield prefix + name, p
        for name, child in self.children():
            yield from child.named_parameters(f"{prefix}{name}.")

    def parameters(self) -> list[Parameter]:
        return [p for _, p in self.named_parameters()]

    def named_buffers(self, prefix: str = "") -> Iterator[tuple[str, np.ndarray]]:
        for name, b in self._own_buffers():
            yield prefix + name, b
        for name, child in self.children():
            yield from child.named_buffers(f"{prefix}{name}.")

    def num_parameters(self) -> int:
        return sum(p.data.size for p in self.parameters())

    def zero_grad(self) -> None:
        for p in self.parameters():
            p.grad.fill(0)

    # ------------------------------------------------------------------ modes and settings
    def train(self, mode: bool = True) -> "Module":
        for m in self.modules():
            m.training = bool(mode)
        return self

    def eval(self) -> "Module":
        return self.train(False)

    def set_backend(self, backend: str | None) -> "Module":
        """Run every kernel of this module and its sub-modules on ``backend``."""
        for m in self.modules():
            m.backend = backend
        return self

    def astype(self, dtype: Any) -> "Module":
        """Cast every parameter and buffer to ``dtype`` in place (gradients are reset)."""
        dtype = np.dtype(dtype)
        for p in self.parameters():
            p.data = p.data.astype(dtype)
            p.grad = np.zeros_like(p.data)
        for m in self.modules():
            m._cast_buffers(dtype)
        return self

    def _cast_buffers(self, dtype: np.dtype) -> None:
        pass

    # ------------------------------------------------------------------ persistence
    def state_dict(self) -> dict[str, np.ndarray]:
        """Copies of every parameter and buffer, keyed by dotted name."""
        state = {name: p.data.copy() for name, p in self.named_parameters()}
        state.update((name, b.copy()) for name, b in self.named_buffers())
        return state

    def load_state_dict(self, state: dict[str, np.ndarray], strict: bool = True) -> None:
        """Copy values from ``state`` into this module (shapes must match exactly).

        Raises
        ------
        KeyError
            With ``strict``, when keys are missing or unexpected (both are listed).
        ValueError
            When an array's shape differs from the module's.
        """
        targets: dict[str, np.ndarray] = {name: p.data for name, p in self.named_parameters()}
        targets.update(self.named_buffers())
        missing = sorted(set(targets) - set(state))
        unexpected = sorted(set(state) - set(targets))
        if strict and (missing or unexpected):
            raise KeyError(f"load_state_dict(): missing keys {missing}, unexpected keys {unexpected}")
        for name, target in targets.items():
            if name not in state:
                continue
            value = np.asarray(state[name])
            if value.shape != target.shape:
                raise ValueError(f"load_state_dict(): {name!r} has shape {value.shape} in the saved state "
                                 f"but {target.shape} in the model")
            target[...] = value  # in place: keeps the dtype and every reference to the array

    def save(self, path: str | os.PathLike) -> None:
        """Save :meth:`state_dict` to an ``.npz`` file."""
        np.savez(path, **self.state_dict())

    def load(self, path: str | os.PathLike, strict: bool = True) -> "Module":
        """Load weights saved by :meth:`save` (see :meth:`load_state_dict` for the checks)."""
        with np.load(path, allow_pickle=False) as data:
            try:
                self.load_state_dict({k: data[k] for k in data.files}, strict=strict)
            except (KeyError, ValueError) as exc:
                raise type(exc)(f"{os.fspath(path)}: {exc.args[0]}") from None
        return self

    # ------------------------------------------------------------------ display
    def extra_repr(self) -> str:
        return ""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.extra_repr()})"


class Sequential(Module):
    """Layers applied one after the other; ``backward`` runs them in reverse.

    A ``ReLU`` directly followed by a ``MaxPool2d`` is run as the pool first, then the ReLU:
    the two commute (both are monotone and propagate NaN, and the pool's -inf padding never
    wins over a ReLU output), outputs and gradients are bit-identical (a window whose maximum
    is <= 0 gets a zero gradient either way), and the ReLU touches 1/stride^2 of the values.
    :meth:`forward_all` keeps the written order.

    Parameters
    ----------
    *layers : Module
    backend : str, optional
        Backend for every layer (see :meth:`Module.set_backend`).
    """

    def __init__(self, *layers: Module, backend: str | None = None) -> None:
        super().__init__()
        self.layers = list(layers)
        self.set_backend(backend)

    def children(self) -> Iterator[tuple[str, Module]]:
        return ((str(i), layer) for i, layer in enumerate(self.layers))

    def _run_order(self) -> list[Module]:
        """The layers in the order they run: each ReLU directly before a MaxPool2d after it."""
        from .layers import MaxPool2d, ReLU

        order = list(self.layers)
        i = 0
        while i < len(order) - 1:
            if type(order[i]) is ReLU and type(order[i + 1]) is MaxPool2d:
                order[i], order[i + 1] = order[i + 1], order[i]
                i += 2
            else:
                i += 1
        return order

    def forward(self, x: np.ndarray) -> np.ndarray:
        self._last_order = self._run_order()
        for layer in self._last_order:
            x = layer.forward(x)
        return x

    def forward_all(self, x: np.ndarray) -> list[np.ndarray]:
        """The output of every layer, in the written order (for feature-map plots)."""
        self._last_order = list(self.layers)
        outputs = []
        for layer in self._last_order:
            x = layer.forward(x)
            outputs.append(x)
        return outputs

    def backward(self, grad_out: np.ndarray, *, need_input: bool = True) -> np.ndarray | None:
        """Backward through the layers in the reverse of the order the last forward pass ran."""
        order = getattr(self, "_last_order", None) or self._run_order()
        for layer in order[:0:-1]:
            grad_out = layer.backward(grad_out)
        return order[0].backward(grad_out, need_input=need_input) if order else grad_out

    def __getitem__(self, i: int) -> Module:
        return self.layers[i]

    def __len__(self) -> int:
        return len(self.layers)

    def __iter__(self) -> Iterator[Module]:
        return iter(self.layers)

    def __repr__(self) -> str:
        body = "".join(f"\n  ({i}): {layer!r}" for i, layer in enumerate(self.layers))
        return f"Sequential({body}\n)"

