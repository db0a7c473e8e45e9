"""The numba backend: ``@njit(parallel=True)`` kernels, direct loops and im2col + BLAS.

Importing this package imports numba but compiles nothing.  Each kernel is compiled
(or loaded from numba's on-disk cache, ``cache=True``) the first time it runs with a
given dtype; :func:`compile_times` reports how long that took per kernel, so a
benchmark can separate compile time from run time.

Algorithms
----------
direct
    Loops over output rows (forward), input rows (backward-input) or filter planes
    (backward-weight) with the padding handled by index ranges, never materialised.
im2col
    Unfold a chunk of the batch into a (C*R*S, nb*Ho*Wo) column matrix (an njit kernel),
    multiply by the weights with numpy's stacked matmul (one BLAS GEMM per image, written
    straight into the output), and scatter back (col2im) for backward-input; 1x1 stride-1
    convs use the input as it is.  The chunk size comes from
    :func:`fastconv._config.batch_chunk`, so the workspace stays within
    :func:`fastconv.set_workspace_limit`; the workspace buffer is reused between calls.
winograd
    F(4x4, 3x3) for 3x3 stride-1 convs with equal dilations (``_winograd.py`` beside this
    file; the maths and the planning are in :mod:`fastconv._winograd`): tiles in blocks of
    64, per-block input / output transforms vectorised over 16 tiles, 36 BLAS GEMMs per
    block, one block per numba worker at a time with SciPy's BLAS pinned to one thread.
    The input gradient is the forward pass on ``grad_out`` with the rotated kernel.  Calls
    whose result is not finite are recomputed with im2col (Winograd smears an Inf/NaN over
    its tile).
"""

from __future__ import annotations

import os
import threading
import time
from types import ModuleType
from typing import Any, Callable, Hashable

# numba's "omp" threading layer runs on libgomp, whose idle threads busy-wait by default and
# then steal the cores from the threads still working (and from BLAS) on a shared or
# oversubscribed machine.  libgomp reads this once, when numba first loads it (the first
# parallel kernel call), and only if the user has not chosen a policy.  The Cython backend
# sets the same default for the same reason.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numba  # noqa: E402
import numpy as np  # noqa: E402

from ... import _config  # noqa: E402
from ..._args import ConvGeometry, PoolGeometry  # noqa: E402
from ..base import Backend, input_grad_kernel  # noqa: E402
from ... import _winograd as wino  # noqa: E402
from . import _kernels  # noqa: E402
from . import _winograd as _wk  # noqa: E402

_lock = threading.Lock()
_compile_seconds: dict[str, float] = {}
_serial_lock = threading.Lock()  # only used with numba's non-threadsafe "workqueue" layer


def compile_times() -> dict[str, float]:
    """Seconds spent compiling (or loading from the cache) each kernel specialisation so far.

    Returns
    -------
    dict
        ``{"kernel[float32]": seconds, ...}`` for every kernel/dtype pair this process
        has run; the time is measured around ``Dispatcher.compile`` and excludes the run.
    """
    return dict(_compile_seconds)


def _readonly(a: np.ndarray) -> np.ndarray:
    view = a.view()
    view.flags.writeable = False
    return view


def _type_key(a: Any) -> Hashable:
    """A cheap stand-in for ``numba.typeof(a)`` (which costs microseconds per array): equal
    keys mean equal numba types, i.e. dtype, ndim, layout, mutability and alignment for
    arrays, the Python type for scalars."""
    if isinstance(a, np.ndarray):
        f = a.flags
        return (a.dtype, a.ndim, f.c_contiguous, f.f_contiguous, f.writeable, f.aligned)
    return type(a)


def _kernel(name: str, n_inputs: int, module: ModuleType = _kernels) -> Callable[..., None]:
    """Return a caller of ``module.<name>`` that compiles it explicitly, and times
    the compilation, the first time each argument-type signature is seen.

    The first ``n_inputs`` arguments are the kernel's input arrays; they are passed as
    read-only views so that writable and read-only caller arrays share one
    specialisation per dtype.  The caller takes an optional keyword ``threads``: the
    numba thread count of the call (default: :func:`fastconv.get_num_threads`), capped at
    ``NUMBA_NUM_THREADS``.
    """
    dispatcher = getattr(module, name)
    seen: set[tuple[Hashable, ...]] = set()  # _type_key signatures known to be compiled

    def call(*args: Any, threads: int | None = None) -> None:
        args = tuple(_readonly(a) for a in args[:n_inputs]) + args[n_inputs:]
        key = tuple(_type_key(a) for a in args)
        if key not in seen:
            sig = tuple(numba.typeof(a) for a in args)
            with _lock:
                if sig not in dispatcher.overloads:
                    start = time.perf_counter()
                    dispatcher.compile(sig)
                    _compile_seconds[f"{name}[{args[0].dtype}]"] = time.perf_counter() - start
                seen.add(key)
        wanted = _config.get_num_threads() if threads is None else threads
        numba.set_num_threads(max(1, min(wanted, numba.config.NUMBA_NUM_THREADS)))
        if _threadsafe():
            dispatcher(*args)
        else:
            with _serial_lock:
                dispatcher(*args)

    call.__name__ = name
    return call


def _threadsafe() -> bool:
    """Whether numba's threading layer may run parallel kernels from several threads at once."""
    try:
        return numba.threading_layer() != "workqueue"
    except ValueError:  # no parallel kernel has run yet: be careful
        return False


_conv2d_direct = _kernel("conv2d_direct", 3)
_conv2d_backward_input_direct = _kernel("conv2d_backward_input_direct", 2)
_conv2d_backward_weight_direct = _kernel("conv2d_backward_weight_direct", 2)
_conv2d_backward_bias = _kernel("conv2d_backward_bias", 1)
_im2col = _kernel("im2col", 1)
_col2im = _kernel("col2im", 1)
_max_pool2d = _kernel("max_pool2d", 1)
_max_pool2d_backward = _kernel("max_pool2d_backward", 2)
_avg_pool2d = _kernel("avg_pool2d", 1)
_avg_pool2d_backward = _kernel("avg_pool2d_backward", 1)
_winograd_forward = _kernel("winograd_forward", 3, _wk)
_winograd_backward_weight = _kernel("winograd_backward_weight", 2, _wk)


def _conv_params(g: ConvGeometry) -> tuple[int, ...]:
    """The geometry scalars every conv kernel takes: sh, sw, top, left, dh, dw."""
    return (g.stride[0], g.stride[1], g.padding[0], g.padding[2], g.dilation[0], g.dilation[1])


#: output planes at least this large are processed one image at a time: each GEMM is
#: big enough on its own, and the workspace stays one image's columns
_LARGE_PLANE = 2048


def _chunks(g: ConvGeometry, extra_per_image: int = 0):
    """Batch chunks (n0, nb): one image at a time for large output planes, otherwise as
    many images as the workspace limit allows for the column matrix (plus
    ``extra_per_image`` more elements of scratch per image)."""
    ll = g.out_h * g.out_w
    if ll >= _LARGE_PLANE:
        step = 1
    else:
        step = _config.batch_chunk((g.c * g.r * g.s * ll + extra_per_image) * np.dtype(g.dtype).itemsize, g.n)
    for n0 in range(0, g.n, step):
        yield n0, min(step, g.n - n0)


def _groups(g: ConvGeometry):
    """(column-row slice, filter slice) of every group."""
    rows = g.c_per_group * g.r * g.s
    for grp in range(g.groups):
        yield slice(grp * rows, (grp + 1) * rows), slice(grp * g.k_per_group, (grp + 1) * g.k_per_group)


def _is_pointwise(g: ConvGeometry) -> bool:
    """1x1, stride 1, unpadded: every input image already is its (C, H*W) column matrix."""
    return g.r == g.s == 1 and g.stride == (1, 1) and not any(g.padding)


_scratch_buffers = threading.local()


def _scratch(slot: str, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """An uninitialised C-contiguous array from a per-thread buffer that is kept between calls.

    Fresh large allocations cost a page fault per 4 KiB page on first touch, which is as
    slow as the im2col copy itself; reusing the buffers avoids that.  Each request is at
    most one workspace (a chunk's column matrix, or backward-weight's per-image partial
    sums), so each thread keeps at most the largest workspace it has used (the workspace
    limit, or one image's share when that is larger) per slot.
    """
    nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
    buf = getattr(_scratch_buffers, slot, None)
    if buf is None or buf.nbytes < nbytes:
        buf = np.empty(nbytes, dtype=np.uint8)
        setattr(_scratch_buffers, slot, buf)
    return buf[:nbytes].view(dtype).reshape(shape)


def _workspace_columns(g: ConvGeometry, nb: int) -> tuple[np.ndarray, np.ndarray]:
    """The workspace for nb images: the (C*R*S, nb*Ho*Wo) column matrix that
    :func:`_kernels.im2col` writes, and its (nb, C*R*S, Ho*Wo) view, whose per-image slices
    are strided matrices that BLAS reads and writes in place (numpy's stacked matmul)."""
    ll = g.out_h * g.out_w
    cols = _scratch("cols", (g.c * g.r * g.s, nb * ll), g.dtype)
    return cols, cols.reshape(-1, nb, ll).transpose(1, 0, 2)


def _columns(x: np.ndarray, g: ConvGeometry, n0: int, nb: int) -> np.ndarray:
    """im2col of images n0 .. n0+nb-1 as (nb, C*R*S, Ho*Wo) (a view of x for 1x1 convs)."""
    if _is_pointwise(g):
        return x.reshape(g.n, g.c, -1)[n0:n0 + nb]
    cols, cols3 = _workspace_columns(g, nb)
    _im2col(x, n0, cols, g.r, g.s, *_conv_params(g), g.out_h, g.out_w)
    return cols3


#: "auto" picks Winograd from this many channels per group, in and out (see default_algorithm)
WINOGRAD_MIN_CHANNELS = 8
#: ... or from this many input channels per group with at least WINOGRAD_MIN_OUTPUTS outputs
WINOGRAD_MIN_WIDE_INPUTS = 16
WINOGRAD_MIN_OUTPUTS = 4

#: below this many multiply-adds a Winograd call runs on one thread: starting the
#: workers and pinning BLAS costs more than it saves
_SERIAL_WORK = 1 << 17


def _winograd_threads(g: ConvGeometry) -> int:
    """Worker count for a Winograd pass of layer ``g`` (before the plan caps it by tiles)."""
    if g.flops // 2 < _SERIAL_WORK:
        return 1
    return max(1, min(_config.get_num_threads(), numba.config.NUMBA_NUM_THREADS))


def _winograd_plan(op: str, g: ConvGeometry) -> wino.Plan:
    """The :class:`fastconv._winograd.Plan` of one pass (the dispatcher has checked it fits)."""
    p = wino.plan_for(op, g, _winograd_threads(g), _config.get_workspace_limit())
    if isinstance(p, str):  # only a direct caller of the backend gets here
        raise ValueError(f"{op}(): algorithm 'winograd' needs {p}")
    return p





class NumbaBackend(Backend):
    """Numba kernels (see the module docstring)."""

    name = "numba"
    algorithms = ("direct", "im2col", "winograd")

    # ------------------------------------------------------------------ selection
    def unsupported(self, algorithm: str, op: str, g: ConvGeometry) -> str | None:
        """Winograd's limits (3x3, stride 1, equal dilations, workspace); None otherwise."""
        if algorithm == "winograd":
            return wino.unsupported(op, g, _config.get_workspace_limit())
        return None

    def default_algorithm(self, op: str, g: ConvGeometry) -> str:
        """Winograd for the 3x3 stride-1 layers it can run with at least
        :data:`WINOGRAD_MIN_CHANNELS` channels per group in and out, or at least
        :data:`WINOGRAD_MIN_WIDE_INPUTS` in and :data:`WINOGRAD_MIN_OUTPUTS` out; else
        im2col + GEMM unless the GEMM would be degenerate: depthwise-like convs (one input
        channel per group, few outputs per group; each GEMM is then a 1-row product) and the
        single-channel ``correlate2d`` path, whose column matrix would be R*S times the image,
        stay direct.

        Measured on the 2-core box (float32, 2 threads, all three passes, numba im2col time /
        numba Winograd time): 8 in and out 0.84-1.57 (wins on small planes, e.g. 1.2-1.6 on
        400x8x8x8 and 2.3 on the stripe-c2 layer, 0.85-1.0 on 14x14 and 32x32 planes), 12 in
        and out 1.0-3.0, 16 in and out 1.2-3.3; with 4 outputs 16 inputs give 1.04-1.37, 32
        inputs 2-3, 8 or 12 inputs 0.74-1.17; 4 or 6 inputs lose (0.5-0.99) whatever the
        outputs.  (The Cython backend uses the first rule alone.)  im2col beat direct on every
        other layer of the benchmark suite, C = 1 or 3 first layers included.
        """
        cin, cout = g.c_per_group, g.k_per_group
        wide = min(cin, cout) >= WINOGRAD_MIN_CHANNELS or (cin >= WINOGRAD_MIN_WIDE_INPUTS
                                                          and cout >= WINOGRAD_MIN_OUTPUTS)
        if wide and self.unsupported("winograd", op, g) is None:
            return "winograd"
        if cin == 1 and cout <= 4:
            return "direct"
        return "im2col"

    # ------------------------------------------------------------------ winograd
    @staticmethod
    def _winograd_forward(x: np.ndarray, u: np.ndarray, bias: np.ndarray, out: np.ndarray, p: wino.Plan,
                          pt: int, pl: int) -> bool:
        """The tiled forward pass into ``out`` (also the input gradient, with the rotated
        kernel and padding ``2*d - pad``).

        Parameters
        ----------
        x : ndarray
            The pass's input (the layer input, or ``grad_out`` for the input gradient).
        u : ndarray, (groups, 36, cout, cin)
            Transformed weights.
        bias : ndarray
            One value per output channel.
        out : ndarray
            Written in full.
        p : fastconv._winograd.Plan
            Tiles, block size, worker count and buffer strides.
        pt, pl : int
            Top / left padding of the pass (negative allowed).

        Returns
        -------
        bool
            Whether every output is finite (otherwise the caller recomputes with im2col).
        """
        vb, mb, sc, ln = p.buffers(out.dtype)
        checks = np.zeros(p.threads, out.dtype)
        counter = np.zeros(1, np.int64)
        _winograd_forward(x, u, bias, out, vb, mb, sc, ln, checks, counter, p.hs, p.ws, pt, pl, p.d, p.tb,
                          p.vstride, p.mstride, threads=p.threads)
        return not checks.any()

    def _winograd_conv2d(self, x: np.ndarray, weight: np.ndarray, bias: np.ndarray | None,
                         g: ConvGeometry) -> np.ndarray:
        p = _winograd_plan("conv2d", g)
        out = np.empty(g.output_shape, g.dtype)
        u = wino.transform_weight(weight, p.t, g.groups, g.dtype)
        b = np.zeros(g.k, g.dtype) if bias is None else bias
        if self._winograd_forward(x, u, b, out, p, g.padding[0], g.padding[2]):
            return out
        return self.conv2d(x, weight, bias, g, "im2col")  # Inf/NaN: keep the direct semantics

    def _winograd_backward_input(self, grad_out: np.ndarray, weight: np.ndarray, g: ConvGeometry) -> np.ndarray:
        p = _winograd_plan("conv2d_backward_input", g)
        gx = np.empty(g.input_shape, g.dtype)
        u = wino.transform_weight(input_grad_kernel(weight, g.groups), p.t, g.groups, g.dtype)
        reach = 2 * g.dilation[0]
        if self._winograd_forward(grad_out, u, np.zeros(g.c, g.dtype), gx, p, reach - g.padding[0],
                                  reach - g.padding[2]):
            return gx
        return self.conv2d_backward_input(grad_out, weight, g, "im2col")

    def _winograd_backward_weight(self, grad_out: np.ndarray, x: np.ndarray, g: ConvGeometry) -> np.ndarray:
        p = _winograd_plan("conv2d_backward_weight", g)
        vb, mb, sc, ln = p.buffers(g.dtype)
        kg, cg = g.k_per_group, g.c_per_group
        partial = np.zeros((p.threads, g.groups, p.t.a**2, kg, cg), g.dtype)
        prod = np.empty((p.threads, kg * cg), g.dtype)
        counter = np.zeros(1, np.int64)
        _winograd_backward_weight(grad_out, x, partial, prod, vb, mb, sc, ln, counter, p.hs, p.ws, g.padding[0],
                                  g.padding[2], p.d, p.tb, p.vstride, p.mstride, threads=p.threads)
        with np.errstate(invalid="ignore", over="ignore"):  # Inf/NaN input: recomputed below
            du = partial.sum(axis=0, dtype=np.float64)
        gw = wino.weight_gradient(du, p.t, g.dtype)
        if np.isfinite(gw).all():
            return gw
        return self.conv2d_backward_weight(grad_out, x, g, "im2col")

    # ------------------------------------------------------------------ conv
    def conv2d(self, x, weight, bias, g, algorithm):
        if algorithm == "winograd":  # BLAS stays single-threaded for the whole call (see _config)
            with _config.single_threaded_blas():
                return self._winograd_conv2d(x, weight, bias, g)
        out = np.empty(g.output_shape, dtype=g.dtype)
        b = np.zeros(g.k, dtype=g.dtype) if bias is None else bias
        if algorithm == "direct":
            _conv2d_direct(x, weight, b, out, *_conv_params(g), g.groups)
            return out
        wmat = weight.reshape(g.k, -1)
        out3 = out.reshape(g.n, g.k, -1)
        for n0, nb in _chunks(g):
            cols3 = _columns(x, g, n0, nb)
            for cs, ks in _groups(g):
                np.matmul(wmat[ks], cols3[:, cs], out=out3[n0:n0 + nb, ks])
        if bias is not None:
            out += bias[None, :, None, None]
        return out

    def conv2d_backward_input(self, grad_out, weight, g, algorithm):
        if algorithm == "winograd":  # BLAS stays single-threaded for the whole call (see _config)
            with _config.single_threaded_blas():
                return self._winograd_backward_input(grad_out, weight, g)
        gx = np.empty(g.input_shape, dtype=g.dtype)
        if algorithm == "direct":
            _conv2d_backward_input_direct(grad_out, weight, gx, *_conv_params(g), g.groups)
            return gx
        wmat = weight.reshape(g.k, -1)
        gy3 = grad_out.reshape(g.n, g.k, -1)
        pointwise = _is_pointwise(g)
        for n0, nb in _chunks(g):
            # the column gradients: straight into gx for 1x1 convs, else into the workspace
            if pointwise:
                cols, cols3 = None, gx.reshape(g.n, g.c, -1)[n0:n0 + nb]
            else:
                cols, cols3 = _workspace_columns(g, nb)
            for cs, ks in _groups(g):
                np.matmul(wmat[ks].T, gy3[n0:n0 + nb, ks], out=cols3[:, cs])
            if cols is not None:
                _col2im(cols, gx, n0, g.r, g.s, *_conv_params(g), g.out_h, g.out_w)
        return gx

    def conv2d_backward_weight(self, grad_out, x, g, algorithm):
        if algorithm == "winograd":  # BLAS stays single-threaded for the whole call (see _config)
            with _config.single_threaded_blas():
                return self._winograd_backward_weight(grad_out, x, g)
        gw = np.empty(g.weight_shape, dtype=g.dtype)
        if algorithm == "direct":
            _conv2d_backward_weight_direct(grad_out, x, gw, *_conv_params(g), g.groups)
            return gw
        crs = g.c_per_group * g.r * g.s
        gy3 = grad_out.reshape(g.n, g.k, -1)
        acc = np.zeros((g.groups, crs, g.k_per_group))  # float64 sum over the batch, transposed
        for n0, nb in _chunks(g, extra_per_image=crs * g.k):
            cols3 = _columns(x, g, n0, nb)
            # one small GEMM per image (cols_n @ gy_n.T), summed over the chunk in float64: a
            # single GEMM over the whole chunk would be a thin product with a very long
            # inner dimension, which BLAS runs several times slower
            part = _scratch("part", (nb, crs, g.k_per_group), g.dtype)
            for grp, (cs, ks) in enumerate(_groups(g)):
                np.matmul(cols3[:, cs], gy3[n0:n0 + nb, ks].transpose(0, 2, 1), out=part)
                with np.errstate(invalid="ignore", over="ignore"):  # +Inf and -Inf images: NaN, no warning
                    acc[grp] += part.sum(axis=0, dtype=np.float64)
        gw[...] = acc.transpose(0, 2, 1).reshape(g.weight_shape)
        return gw

    def conv2d_backward_bias(self, grad_out, g):
        gb = np.empty(g.k, dtype=g.dtype)
        _conv2d_backward_bias(grad_out, gb)
        return gb

    # ------------------------------------------------------------------ pools
    def max_pool2d(self, x, p):
        out = np.empty(p.output_shape, dtype=p.dtype)
        idx = np.empty(p.output_shape, dtype=np.int64)
        _max_pool2d(x, out, idx, *p.kernel, *p.stride, *p.padding, *p.dilation)
        return out, idx

    def max_pool2d_backward(self, grad_out, indices, p):
        gx = np.empty(p.input_shape, dtype=p.dtype)
        _max_pool2d_backward(grad_out, np.ascontiguousarray(indices, dtype=np.int64), gx)
        return gx

    def avg_pool2d(self, x, p):
        out = np.empty(p.output_shape, dtype=p.dtype)
        _avg_pool2d(x, out, *p.kernel, *p.stride, *p.padding, p.count_include_pad)
        return out

    def avg_pool2d_backward(self, grad_out, p):
        gx = np.empty(p.input_shape, dtype=p.dtype)
        _avg_pool2d_backward(grad_out, gx, *p.kernel, *p.stride, *p.padding, p.count_include_pad)
        return gx

    # ------------------------------------------------------------------ info
    def info(self) -> dict[str, Any]:
        try:
            layer = numba.threading_layer()
        except ValueError:
            layer = f"not chosen yet (configured: {numba.config.THREADING_LAYER})"
        return {
            "numba_version": numba.__version__,
            "threading_layer": layer,
            "max_threads": numba.config.NUMBA_NUM_THREADS,
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
            "compile_seconds": compile_times(),
        }
