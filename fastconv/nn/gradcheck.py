"""Check a module's hand-written backward pass against central finite differences (float64)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .module import Module, as_generator


@dataclass
class GradcheckResult:
    """Per-tensor comparison of analytic and numerical gradients.

    Attributes
    ----------
    errors : dict
        ``name -> max |analytic - numeric| / (atol + rtol * |numeric|)`` over the checked
        elements ("input" for the input gradient, dotted names for parameters); a value
        above 1 fails.
    checked : dict
        ``name -> number of elements compared``.
    """

    errors: dict[str, float] = field(default_factory=dict)
    checked: dict[str, int] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return all(e <= 1.0 for e in self.errors.values())

    def __str__(self) -> str:
        rows = [f"  {name:<24} {self.checked[name]:>5} elements  worst error ratio {err:.3g}"
                for name, err in self.errors.items()]
        return ("gradcheck passed" if self.ok else "gradcheck FAILED") + "\n" + "\n".join(rows)


def _rng_states(module: Module) -> list[tuple[Module, dict]]:
    return [(m, m.rng.bit_generator.state) for m in module.modules()
            if isinstance(getattr(m, "rng", None), np.random.Generator)]


def gradcheck(module: Module, x: np.ndarray, *, eps: float = 1e-6, rtol: float = 1e-5, atol: float = 1e-7,
              max_elements: int = 64, check_input: bool = True, rng: np.random.Generator | int | None = 0
              ) -> GradcheckResult:
    """Compare ``module.backward`` with central differences of ``sum(forward(x) * R)``.

    The module must hold float64 parameters (``module.astype(np.float64)``) and ``x``
    must be float64.  R is a fixed random projection, so every output contributes.
    Stochastic layers (anything with a NumPy Generator in ``.rng``, e.g. Dropout) replay
    the same random draws in every forward pass.

    Parameters
    ----------
    module : Module
    x : numpy.ndarray of float64
    eps : float
        Finite-difference step.
    rtol, atol : float
        Tolerance: ``|analytic - numeric| <= atol + rtol * |numeric|``.
    max_elements : int
        At most this many randomly chosen elements of each tensor are perturbed.
    check_input : bool
        Also check the gradient with respect to ``x``.
    rng : Generator or int
        Chooses R and the checked elements.

    Returns
    -------
    GradcheckResult
    """
    x = np.array(x, dtype=np.float64)
    params = list(module.named_parameters())
    for name, p in params:
        if p.data.dtype != np.float64:
            raise TypeError(f"gradcheck(): parameter {name!r} is {p.data.dtype}; call module.astype(np.float64) first")
    rng = as_generator(rng)
    states = _rng_states(module)

    def loss() -> float:
        for m, state in states:
            m.rng.bit_generator.state = state
        return float(np.sum(module.forward(x) * proj))

    for m, state in states:
        m.rng.bit_generator.state = state
    out = module.forward(x)
    proj = rng.standard_normal(out.shape)
    module.zero_grad()
    grad_x = module.backward(proj.copy())
    analytic = {name: p.grad.copy() for name, p in params}
    targets = [(name, p.data, analytic[name]) for name, p in params]
    if check_input:
        targets.insert(0, ("input", x, grad_x))

    result = GradcheckResult()
    for name, array, grad in targets:
        flat = array.reshape(-1)  # a view: perturbing it perturbs the tensor the module reads
        picks = rng.choice(flat.size, size=min(max_elements, flat.size), replace=False)
        worst = 0.0
        for i in picks:
            saved = flat[i]
            flat[i] = saved + eps
            plus = loss()
            flat[i] = saved - eps
            minus = loss()
            flat[i] = saved
            numeric = (plus - minus) / (2 * eps)
            worst = max(worst, abs(grad.reshape(-1)[i] - numeric) / (atol + rtol * abs(numeric)))
        result.errors[name], result.checked[name] = worst, len(picks)
    return result
