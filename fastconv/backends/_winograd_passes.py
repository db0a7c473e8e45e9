"""The three Winograd passes of a backend, around its two tiled kernels.

The Cython and Numba backends each compile two Winograd kernels: a tiled forward pass
(which is also the input gradient, run on ``grad_out`` with the rotated kernel) and a
weight-gradient pass that sums transformed products per worker.  Everything around them
is the same for both and lives here: the plan (tiles, blocks, workers, workspace), the
weight transforms' buffers (the transforms are compiled too; :mod:`fastconv._winograd` holds
their NumPy specification), BLAS held at one thread for the whole call
(see :func:`fastconv._config.single_threaded_blas`), and the fallback to im2col when a
result is not finite (a tile transform mixes Inf and NaN differently from a direct sum).
"""

from __future__ import annotations

import numpy as np

from .. import _config
from .. import _winograd as wino
from .._args import ConvGeometry
from .base import pass_channels


class WinogradPasses:
    """Mixin giving a :class:`~fastconv.backends.base.Backend` the ``"winograd"`` algorithm.

    A subclass provides :meth:`_winograd_threads`, :meth:`_winograd_forward` and
    :meth:`_winograd_weight_sum`, and sends ``algorithm="winograd"`` calls of its three
    conv methods to :meth:`winograd_conv2d`, :meth:`winograd_backward_input` and
    :meth:`winograd_backward_weight`.
    """

    # ------------------------------------------------------------ kernels (subclass)
    def _winograd_threads(self, g: ConvGeometry) -> int:
        """How many workers the passes of layer ``g`` use."""
        raise NotImplementedError

    def _winograd_forward(self, x: np.ndarray, u: np.ndarray, bias: np.ndarray, out: np.ndarray,
                          p: wino.Plan, pt: int, pl: int) -> bool:
        """The tiled forward pass, written into ``out`` in full.

        Parameters
        ----------
        x : ndarray
            The pass's input (the layer input, or ``grad_out`` for the input gradient).
        u : ndarray, (groups, a*a, cout, cin)
            Transformed weights.
        bias : ndarray
            One value per output channel.
        out : ndarray
            The output (or the input gradient).
        p : fastconv._winograd.Plan
            Tiles, block size, worker count and buffer strides.
        pt, pl : int
            Top / left padding of the pass (negative allowed).

        Returns
        -------
        bool
            Whether every output is finite.
        """
        raise NotImplementedError

    def _winograd_weight_sum(self, grad_out: np.ndarray, x: np.ndarray, p: wino.Plan,
                             g: ConvGeometry) -> np.ndarray:
        """The transformed weight gradient, summed over the batch and all workers in float64:
        shape (groups, a*a, K/groups, C/groups)."""
        raise NotImplementedError

    def _winograd_transform_weight(self, w: np.ndarray, u: np.ndarray, gm: np.ndarray, groups: int,
                                   rotate: bool) -> None:
        """``u`` (groups, a*a, cout, cin) = G w G^T for the pass's weight: the layer's ``w``, or with
        ``rotate`` the input gradient's (:func:`fastconv._winograd.transform_weight` of
        :func:`~fastconv.backends.base.input_grad_kernel`); ``gm`` is G (a, 3)."""
        raise NotImplementedError

    def _winograd_weight_gradient(self, du: np.ndarray, gw: np.ndarray, gm: np.ndarray) -> None:
        """``gw`` (K, C/groups, 3, 3) = G^T dU G from ``du`` (groups, a*a, K/groups, C/groups) in
        float64 (:func:`fastconv._winograd.weight_gradient`)."""
        raise NotImplementedError

    # ------------------------------------------------------------------- shared
    def unsupported(self, algorithm: str, op: str, g: ConvGeometry) -> str | None:
        """Winograd's limits (3x3, stride 1, equal dilations, workspace); None otherwise."""
        if algorithm == "winograd":
            return wino.unsupported(op, g, _config.get_workspace_limit())
        return None

    def _winograd_plan(self, op: str, g: ConvGeometry) -> wino.Plan:
        p = wino.plan_for(op, g, self._winograd_threads(g), _config.get_workspace_limit())
        if isinstance(p, str):  # the dispatcher has checked; only a direct caller gets here
            raise ValueError(f"{op}(): algorithm 'winograd' needs {p}")
        return p

    def _winograd_weights(self, weight: np.ndarray, p: wino.Plan, g: ConvGeometry, rotate: bool) -> np.ndarray:
        """The transformed weights of a pass (see :meth:`_winograd_transform_weight`)."""
        cin, cout = pass_channels(g, rotate)
        u = np.empty((g.groups, p.t.a * p.t.a, cout, cin), g.dtype)
        self._winograd_transform_weight(weight, u, p.t.g, g.groups, rotate)
        return u

    def winograd_conv2d(self, x: np.ndarray, weight: np.ndarray, bias: np.ndarray | None,
                        g: ConvGeometry) -> np.ndarray:
        """Forward convolution by Winograd (im2col when a result is not finite)."""
        with _config.single_threaded_blas():
            p = self._winograd_plan("conv2d", g)
            out = np.empty(g.output_shape, g.dtype)
            u = self._winograd_weights(weight, p, g, rotate=False)
            b = np.zeros(g.k, g.dtype) if bias is None else bias
            if self._winograd_forward(x, u, b, out, p, g.padding[0], g.padding[2]):
                return out
        return self.conv2d(x, weight, bias, g, "im2col")  # Inf/NaN: keep the direct semantics

    def winograd_backward_input(self, grad_out: np.ndarray, weight: np.ndarray, g: ConvGeometry) -> np.ndarray:
        """Input gradient by Winograd: the forward pass of ``grad_out`` with the rotated kernel."""
        with _config.single_threaded_blas():
            p = self._winograd_plan("conv2d_backward_input", g)
            gx = np.empty(g.input_shape, g.dtype)
            u = self._winograd_weights(weight, p, g, rotate=True)
            reach = 2 * g.dilation[0]
            if self._winograd_forward(grad_out, u, np.zeros(g.c, g.dtype), gx, p, reach - g.padding[0],
                                      reach - g.padding[2]):
                return gx
        return self.conv2d_backward_input(grad_out, weight, g, "im2col")

    def winograd_backward_weight(self, grad_out: np.ndarray, x: np.ndarray, g: ConvGeometry) -> np.ndarray:
        """Weight gradient by Winograd (im2col when a result is not finite)."""
        with _config.single_threaded_blas():
            p = self._winograd_plan("conv2d_backward_weight", g)
            gw = np.empty(g.weight_shape, g.dtype)
            self._winograd_weight_gradient(self._winograd_weight_sum(grad_out, x, p, g), gw, p.t.g)
            if np.isfinite(gw).all():
                return gw
        return self.conv2d_backward_weight(grad_out, x, g, "im2col")
