"""The cuda backend against the reference backend, under numba's CUDA simulator.

NUMBA_ENABLE_CUDASIM must be set before numba.cuda is first imported, and the
main test process has usually imported it already (other backends, the
registry).  So in a normal run this module contributes one test that runs this
same file in a fresh interpreter with NUMBA_ENABLE_CUDASIM=1, where the cases
below are defined and run against the simulated device.  When the cuda backend
is available in-process (simulator enabled from the start, or a real GPU) the
cases run directly as well.

None of this has run on a real GPU: the simulator executes the kernels as
Python threads, which checks indexing, synchronisation structure and results,
not performance or hardware limits.  Shapes are tiny because the simulator is
slow.
"""

from __future__ import annotations

import os
import subprocess
import sys

import numba
import numpy as np
import pytest

import fastconv
from conftest import assert_close

IN_SIMULATOR = bool(numba.config.ENABLE_CUDASIM)


CUDA = fastconv.available_backends()["cuda"]


def _arg_spec(a) -> list:
    """A JSON description of one kernel argument's numba type."""
    if hasattr(a, "dtype") and hasattr(a, "shape") and not np.isscalar(a):
        contiguous = a.is_c_contiguous() if hasattr(a, "is_c_contiguous") else a.flags.c_contiguous
        return ["array", np.dtype(a.dtype).name, len(a.shape), "C" if contiguous else "A"]
    if isinstance(a, (bool, np.bool_)):
        return ["bool"]
    if isinstance(a, int):
        return ["int"]
    if isinstance(a, tuple):
        return ["tuple", len(a)]
    return ["scalar", np.dtype(type(a)).name]


def _numba_type(spec):
    from numba import types

    kind = spec[0]
    if kind == "array":
        return types.Array(numba.from_dtype(np.dtype(spec[1])), spec[2], spec[3])
    if kind == "bool":
        return types.boolean
    if kind == "int":
        return types.int64
    if kind == "tuple":
        return types.UniTuple(types.int64, spec[1])
    return numba.from_dtype(np.dtype(spec[1]))


def _nvvm_available() -> bool:
    """Whether numba can compile for the real CUDA target here (libNVVM found)."""
    try:
        from numba import cuda, types

        cuda.compile_ptx(lambda a: None, (types.float32[:],), cc=(8, 0))
        return True
    except Exception:
        return False


if not IN_SIMULATOR:

    @pytest.fixture(scope="module")
    def simulator_run(tmp_path_factory):
        """Run this module's cases once in a subprocess with NUMBA_ENABLE_CUDASIM=1;
        the subprocess also records the argument types of every kernel launch."""
        root = os.path.dirname(os.path.dirname(os.path.abspath(fastconv.__file__)))
        signatures = tmp_path_factory.mktemp("cuda") / "launches.json"
        env = dict(os.environ, NUMBA_ENABLE_CUDASIM="1", FASTCONV_CUDA_LAUNCH_LOG=str(signatures),
                   PYTHONPATH=os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p))
        proc = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-rxs", "-p", "no:cacheprovider", os.path.abspath(__file__)],
            cwd=os.path.dirname(os.path.abspath(__file__)), env=env, capture_output=True, text=True, timeout=900)
        return proc, signatures

    def test_cuda_backend_under_simulator(simulator_run):
        """This module's cases, run in a subprocess under the CUDA simulator, all pass."""
        proc, _ = simulator_run
        report = proc.stdout[-8000:] + proc.stderr[-2000:]
        assert proc.returncode == 0, report
        assert " passed" in proc.stdout and " failed" not in proc.stdout, report

    def test_launched_kernels_compile_for_a_real_gpu(simulator_run, monkeypatch):
        """Every (kernel, argument types) the simulated cases launched also compiles to
        PTX with the real CUDA target (needs libNVVM, e.g. CUDA_HOME pointing at a CUDA
        toolkit or the nvidia-cuda-nvcc wheel; no GPU needed).  This checks typing and
        lowering under the real target, which the simulator does not do."""
        if not _nvvm_available():
            pytest.skip("libNVVM not found (set CUDA_HOME to a CUDA toolkit): cannot compile to PTX")
        import importlib.util
        import json

        from numba import cuda

        proc, signatures = simulator_run
        assert proc.returncode == 0 and signatures.exists(), proc.stdout[-4000:]
        # the package itself refuses to import without a GPU; its kernel module does not need one
        path = os.path.join(os.path.dirname(os.path.abspath(fastconv.__file__)), "backends", "cuda", "_kernels.py")
        spec = importlib.util.spec_from_file_location("_fastconv_cuda_kernels_ptx", path)
        kernels_module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(kernels_module)
        # device functions are compiled for the current device's compute capability: fake one
        from types import SimpleNamespace

        import numba.cuda.dispatcher

        monkeypatch.setattr(numba.cuda.dispatcher, "get_current_device",
                            lambda: SimpleNamespace(compute_capability=(8, 0)))
        launches = json.loads(signatures.read_text())
        assert len({name for _, name, _ in launches}) >= 12
        for dtype, name, arg_specs in launches:
            kernel = getattr(kernels_module.kernels(dtype), name)
            sig = tuple(_numba_type(a) for a in arg_specs)
            ptx, _ = cuda.compile_ptx(kernel.py_func, sig, cc=(8, 0))
            assert ".entry" in ptx, (dtype, name, sig)

    def test_unavailable_reason_without_gpu():
        """Without a GPU (and without the simulator) the backend is unavailable, with the reason."""
        if CUDA["available"]:
            pytest.skip("a real CUDA GPU is present: the backend is available")
        assert "no CUDA GPU found" in CUDA["reason"] and "NUMBA_ENABLE_CUDASIM=1" in CUDA["reason"]


if CUDA["available"]:
    from numba import cuda

    import fastconv.backends.cuda as cuda_backend

    @pytest.fixture(autouse=True, scope="module")
    def _fast_simulator_threads():
        """The simulator's block manager busy-polls its Python threads: a short GIL
        switch interval makes each syncthreads() far cheaper (about 5x overall)."""
        previous = sys.getswitchinterval()
        sys.setswitchinterval(1e-4)
        yield
        sys.setswitchinterval(previous)

    class _Recorder:
        """Stands in for one kernel: records each launch's argument types, then launches."""

        def __init__(self, dtype, name, kernel, log):
            self.dtype, self.name, self.kernel, self.log = dtype, name, kernel, log

        def __getitem__(self, config):
            def launch(*args):
                entry = [self.dtype, self.name, [_arg_spec(a) for a in args]]
                if entry not in self.log:
                    self.log.append(entry)
                return self.kernel[config](*args)

            return launch

    @pytest.fixture(autouse=True, scope="module")
    def _record_launches():
        """With FASTCONV_CUDA_LAUNCH_LOG set, write every distinct launch signature there
        (the parent process compiles them for the real CUDA target)."""
        path = os.environ.get("FASTCONV_CUDA_LAUNCH_LOG")
        if not path or not IN_SIMULATOR:
            yield
            return
        import json

        from fastconv.backends.cuda import _kernels

        log, saved = [], []
        for dtype in ("float32", "float64"):
            ns = _kernels.kernels(dtype)
            for name, kernel in list(vars(ns).items()):
                saved.append((ns, name, kernel))
                setattr(ns, name, _Recorder(dtype, name, kernel, log))
        yield
        for ns, name, kernel in saved:
            setattr(ns, name, kernel)
        with open(path, "w") as f:
            json.dump(log, f)

    ALGORITHMS = ("direct", "im2col")
    DTYPES = (np.float32, np.float64)

    # (n, c, h, w, k, r, s, stride, padding, dilation, groups)
    CONV_CONFIGS = [
        (2, 2, 5, 5, 3, 3, 3, 1, 1, 1, 1),
        (2, 4, 6, 5, 4, 3, 2, (1, 2), (1, 2), (2, 1), 2),
        (1, 3, 5, 6, 3, 2, 2, 2, 0, 1, 3),  # depthwise, strided, even kernel
        (2, 2, 5, 6, 2, 2, 4, 1, "same", (1, 2), 1),  # "same" with an even, dilated kernel
        (1, 3, 7, 7, 5, 1, 1, 3, 0, 1, 1),  # strided 1x1
        (1, 2, 9, 10, 2, 3, 3, (4, 3), (2, 1), 2, 1),  # stride and dilation sharing a factor (4, 2)
    ]

    def _conv_data(cfg, dtype, seed=0):
        n, c, h, w, k, r, s, stride, padding, dilation, groups = cfg
        rng = np.random.default_rng(seed)
        x = rng.standard_normal((n, c, h, w)).astype(dtype)
        weight = rng.standard_normal((k, c // groups, r, s)).astype(dtype)
        bias = rng.standard_normal(k).astype(dtype)
        kw = dict(stride=stride, padding=padding, dilation=dilation, groups=groups)
        return x, weight, bias, kw

    def _check_conv(x, weight, bias, kw, dtype, algorithm):
        ref = fastconv.conv2d(x, weight, bias, **kw, backend="reference")
        out = fastconv.conv2d(x, weight, bias, **kw, backend="cuda", algorithm=algorithm)
        assert isinstance(out, np.ndarray) and out.dtype == dtype and out.flags.c_contiguous
        assert_close(out, ref, dtype)
        gy = np.random.default_rng(1).standard_normal(ref.shape).astype(dtype)
        want = fastconv.conv2d_backward(gy, x, weight, **kw, backend="reference")
        got = fastconv.conv2d_backward(gy, x, weight, **kw, backend="cuda", algorithm=algorithm)
        for name, g, r in zip(("input", "weight", "bias"), got, want):
            assert isinstance(g, np.ndarray) and g.shape == r.shape and g.dtype == dtype, name
            assert_close(g, r, dtype)

    @pytest.mark.parametrize("algorithm", ALGORITHMS)
    @pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
    @pytest.mark.parametrize("cfg", CONV_CONFIGS, ids=lambda c: "x".join(map(str, c[:7])))
    def test_conv_host_arrays(cfg, dtype, algorithm):
        """Host arrays in, host arrays out: forward and the three gradients."""
        _check_conv(*_conv_data(cfg, dtype), dtype, algorithm)

    @pytest.mark.parametrize("algorithm", ALGORITHMS)
    def test_conv_unbatched_no_bias(algorithm):
        x, weight, _, kw = _conv_data(CONV_CONFIGS[1], np.float32)
        _check_conv(x[0], weight, None, kw, np.float32, algorithm)

    @pytest.mark.parametrize("algorithm", ALGORITHMS)
    def test_grid_stride_and_batch_chunks(algorithm, monkeypatch):
        """One block per launch (everything through the grid-stride loops) and a tiny
        im2col workspace (one image per chunk: backward-weight accumulates)."""
        monkeypatch.setattr(cuda_backend, "MAX_BLOCKS", 1)
        limit = fastconv.get_workspace_limit()
        fastconv.set_workspace_limit(1)
        try:
            x, weight, bias, kw = _conv_data((3, 2, 5, 4, 2, 3, 2, 1, 1, 1, 1), np.float64)
            _check_conv(x, weight, bias, kw, np.float64, algorithm)
        finally:
            fastconv.set_workspace_limit(limit)

    def test_direct_falls_back_when_patch_exceeds_shared_memory(monkeypatch):
        monkeypatch.setattr(cuda_backend, "SHARED_LIMIT", 16)
        x, weight, bias, kw = _conv_data(CONV_CONFIGS[0], np.float32)
        _check_conv(x, weight, bias, kw, np.float32, "direct")

    def test_default_algorithm_is_offered():
        backend = cuda_backend.CudaBackend()
        x, weight, bias, kw = _conv_data(CONV_CONFIGS[2], np.float32)
        ref = fastconv.conv2d(x, weight, bias, **kw, backend="reference")
        assert_close(fastconv.conv2d(x, weight, bias, **kw, backend="cuda"), ref, np.float32)
        from fastconv._args import conv2d_args

        g = conv2d_args("t", x, weight, bias, kw["stride"], kw["padding"], kw["dilation"], kw["groups"]).geometry
        for op in ("conv2d", "conv2d_backward_input", "conv2d_backward_weight"):
            assert backend.default_algorithm(op, g) in backend.algorithms

    # ------------------------------------------------------------------ pools

    # (shape, kernel, stride, padding, dilation, ceil_mode)
    MAX_CONFIGS = [
        ((2, 2, 5, 5), 3, 2, 1, 1, False),
        ((1, 2, 6, 5), 2, 1, 0, 2, True),
        ((2, 1, 5, 7), (3, 2), (2, 1), (1, 0), 1, True),
    ]

    def _pool_input(shape, dtype, seed=0):
        """Small integers (ties), a NaN and a -inf: exercises PyTorch's tie/NaN rules."""
        x = np.random.default_rng(seed).integers(-3, 3, shape).astype(dtype)
        x.flat[3] = np.nan
        x.flat[-2] = -np.inf
        return x

    @pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
    @pytest.mark.parametrize("cfg", MAX_CONFIGS, ids=str)
    def test_max_pool(cfg, dtype):
        shape, kernel, stride, padding, dilation, ceil_mode = cfg
        x = _pool_input(shape, dtype)
        kw = dict(kernel_size=kernel, stride=stride, padding=padding, dilation=dilation, ceil_mode=ceil_mode)
        ref, ref_idx = fastconv.max_pool2d(x, **kw, return_indices=True, backend="reference")
        out, idx = fastconv.max_pool2d(x, **kw, return_indices=True, backend="cuda")
        assert out.dtype == dtype and idx.dtype == np.int64
        np.testing.assert_array_equal(out, ref)  # NaN positions included
        np.testing.assert_array_equal(idx, ref_idx)
        gy = np.random.default_rng(2).standard_normal(ref.shape).astype(dtype)
        want = fastconv.max_pool2d_backward(gy, x, **kw, backend="reference")
        assert_close(fastconv.max_pool2d_backward(gy, x, **kw, backend="cuda"), want, dtype)
        assert_close(fastconv.max_pool2d_backward(gy, x, **kw, indices=ref_idx, backend="cuda"), want, dtype)

    # (shape, kernel, stride, padding, ceil_mode, count_include_pad)
    AVG_CONFIGS = [
        ((2, 2, 5, 5), 3, 2, 1, False, True),
        ((2, 2, 5, 5), 3, 2, 1, True, False),
        ((1, 2, 6, 7), (2, 3), (1, 2), (1, 1), True, True),
    ]

    @pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
    @pytest.mark.parametrize("cfg", AVG_CONFIGS, ids=str)
    def test_avg_pool(cfg, dtype):
        shape, kernel, stride, padding, ceil_mode, cip = cfg
        x = np.random.default_rng(0).standard_normal(shape).astype(dtype)
        kw = dict(kernel_size=kernel, stride=stride, padding=padding, ceil_mode=ceil_mode, count_include_pad=cip)
        ref = fastconv.avg_pool2d(x, **kw, backend="reference")
        out = fastconv.avg_pool2d(x, **kw, backend="cuda")
        assert out.dtype == dtype
        assert_close(out, ref, dtype)
        gy = np.random.default_rng(3).standard_normal(ref.shape).astype(dtype)
        want = fastconv.avg_pool2d_backward(gy, shape, **kw, backend="reference")
        assert_close(fastconv.avg_pool2d_backward(gy, shape, **kw, backend="cuda"), want, dtype)

    # ------------------------------------------------------------------ device arrays

    def _on_device(a) -> bool:
        return not isinstance(a, np.ndarray) and hasattr(a, "copy_to_host")

    def _geometries(x, weight, kw, pool_kw):
        from fastconv._args import conv2d_args, pool_args

        g = conv2d_args("t", x, weight, None, kw["stride"], kw["padding"], kw["dilation"], kw["groups"]).geometry
        p = pool_args("t", np.empty(g.output_shape, x.dtype), pool_kw["kernel_size"], pool_kw.get("stride"),
                      pool_kw.get("padding", 0)).geometry
        return g, p

    @pytest.mark.parametrize("algorithm", ALGORITHMS)
    def test_device_arrays_stay_on_device(algorithm, monkeypatch):
        """Device arrays in give device arrays out, and a chain of calls copies nothing
        between host and device (copies are counted by wrapping the simulator's)."""
        dtype = np.float32
        x, weight, bias, kw = _conv_data(CONV_CONFIGS[1], dtype)
        pool_kw = dict(kernel_size=2, stride=1, padding=1)
        g, p = _geometries(x, weight, kw, pool_kw)
        dx, dw, db = (cuda.to_device(a) for a in (x, weight, bias))
        copies = []
        device_array_type = type(dx)
        to_device = cuda.to_device
        monkeypatch.setattr(cuda, "to_device", lambda *a, **k: copies.append("to_device") or to_device(*a, **k))
        original = device_array_type.copy_to_host
        monkeypatch.setattr(device_array_type, "copy_to_host",
                            lambda self, *a, **k: copies.append("copy_to_host") or original(self, *a, **k))
        backend = cuda_backend.CudaBackend()
        y = backend.conv2d(dx, dw, db, g, algorithm)
        pooled = backend.avg_pool2d(y, p)
        g_pooled = backend.avg_pool2d_backward(pooled, p)
        maxed, idx = backend.max_pool2d(y, p)
        g_x = backend.conv2d_backward_input(g_pooled, dw, g, algorithm)
        g_w = backend.conv2d_backward_weight(g_pooled, dx, g, algorithm)
        g_b = backend.conv2d_backward_bias(g_pooled, g)
        assert copies == []
        g_max = backend.max_pool2d_backward(maxed, idx, p)
        assert copies == ["copy_to_host"]  # only its 4-byte "index out of range" flag
        monkeypatch.undo()
        for a in (y, pooled, g_pooled, maxed, idx, g_x, g_w, g_b, g_max):
            assert _on_device(a)
        ref = fastconv.conv2d(x, weight, bias, **kw, backend="reference")
        assert_close(y.copy_to_host(), ref, dtype)
        ref_pooled = fastconv.avg_pool2d(ref, **pool_kw, backend="reference")
        assert_close(pooled.copy_to_host(), ref_pooled, dtype)
        ref_gp = fastconv.avg_pool2d_backward(ref_pooled, ref.shape, **pool_kw, backend="reference")
        assert_close(g_pooled.copy_to_host(), ref_gp, dtype)
        ref_max, ref_idx = fastconv.max_pool2d(ref, **pool_kw, return_indices=True, backend="reference")
        np.testing.assert_array_equal(idx.copy_to_host(), ref_idx)
        assert_close(g_max.copy_to_host(), fastconv.max_pool2d_backward(ref_max, ref, **pool_kw, backend="reference"),
                     dtype)
        want = fastconv.conv2d_backward(ref_gp, x, weight, **kw, backend="reference")
        for got, r in zip((g_x, g_w, g_b), want):
            assert_close(got.copy_to_host(), r, dtype)

    @pytest.mark.parametrize("algorithm", ALGORITHMS)
    def test_noncontiguous_and_mixed_device_inputs(algorithm):
        """A strided device view is made contiguous on the device; one device argument
        among host ones makes the result a device array."""
        dtype = np.float64
        x, weight, bias, kw = _conv_data(CONV_CONFIGS[0], dtype)
        big = np.zeros(x.shape[:-1] + (2 * x.shape[-1],), dtype)
        big[..., ::2] = x
        view = cuda.to_device(big)[..., ::2]
        assert not view.is_c_contiguous()
        g, _ = _geometries(x, weight, kw, dict(kernel_size=1))
        out = cuda_backend.CudaBackend().conv2d(view, weight, bias, g, algorithm)
        assert _on_device(out)
        assert_close(out.copy_to_host(), fastconv.conv2d(x, weight, bias, **kw, backend="reference"), dtype)

    def test_noncontiguous_device_indices():
        """max_pool2d_backward with int64 indices given as a strided device view."""
        x = _pool_input((2, 2, 5, 5), np.float64)
        kw = dict(kernel_size=3, stride=2, padding=1)
        ref, idx = fastconv.max_pool2d(x, **kw, return_indices=True, backend="reference")
        from fastconv._args import pool_args

        p = pool_args("t", x, 3, 2, 1).geometry
        wide = np.zeros(idx.shape[:-1] + (2 * idx.shape[-1],), np.int64)
        wide[..., ::2] = idx
        view = cuda.to_device(wide)[..., ::2]
        gy = np.random.default_rng(5).standard_normal(ref.shape)
        got = cuda_backend.CudaBackend().max_pool2d_backward(cuda.to_device(gy), view, p)
        assert_close(got.copy_to_host(), fastconv.max_pool2d_backward(gy, x, **kw, backend="reference"), np.float64)

    def test_max_pool_backward_rejects_bad_device_indices():
        _, p = _geometries(np.zeros((1, 1, 4, 4), np.float32), np.zeros((1, 1, 1, 1), np.float32),
                           dict(stride=1, padding=0, dilation=1, groups=1), dict(kernel_size=2))
        gy = cuda.to_device(np.ones(p.output_shape, np.float32))
        bad = cuda.to_device(np.full(p.output_shape, 16, np.int64))
        with pytest.raises(ValueError, match="indices must lie in"):
            cuda_backend.CudaBackend().max_pool2d_backward(gy, bad, p)

    def test_public_api_with_device_arrays():
        """fastconv.conv2d / max_pool2d with device arrays return device arrays."""
        x, weight, bias, kw = _conv_data(CONV_CONFIGS[1], np.float32)
        dx, dw, db = (cuda.to_device(a) for a in (x, weight, bias))
        assert fastconv._args.is_device_array(dx)
        out = fastconv.conv2d(dx, dw, db, **kw, backend="cuda")
        assert _on_device(out)
        assert_close(out.copy_to_host(), fastconv.conv2d(x, weight, bias, **kw, backend="reference"), np.float32)
        unbatched = fastconv.conv2d(cuda.to_device(x[0]), dw, db, **kw, backend="cuda")
        assert _on_device(unbatched) and unbatched.shape == out.shape[1:]
        pooled, idx = fastconv.max_pool2d(out, 2, return_indices=True)
        assert _on_device(pooled) and _on_device(idx)
        empty = fastconv.conv2d(cuda.to_device(x[:0]), dw, db, **kw, backend="cuda")
        assert _on_device(empty) and empty.shape == (0,) + out.shape[1:]

    def test_info_reports_simulator():
        info = fastconv.available_backends()["cuda"]
        assert info["algorithms"] == ALGORITHMS
        assert info["simulator"] == IN_SIMULATOR

    def test_selftest_module_runs():
        """The GPU self-test (meant for a machine with a GPU) runs and passes on tiny cases."""
        from fastconv._bench_suite import ConvCase, PoolCase
        from fastconv.backends.cuda import selftest

        convs = [ConvCase("tiny", 2, 2, 5, 3, 3), ConvCase("tiny-dw", 2, 2, 5, 2, 3, stride=2, groups=2)]
        pools = [PoolCase("tiny-max", "max", 1, 2, 5, 3, 2, pad=1), PoolCase("tiny-avg", "avg", 1, 2, 5, 2, 2)]
        assert selftest.check(convs[1:], pools, dtypes=(np.float32,), verbose=False) == []
        rows = selftest.bench(convs[:1], repeat=1)
        assert rows[0]["case"] == "tiny" and rows[0]["direct"] > 0 and rows[0]["im2col"] > 0

    @pytest.mark.parametrize("trans_a,trans_b,accumulate", [(False, False, False), (True, False, True),
                                                            (False, True, True), (True, True, False)])
    def test_gemm_kernel(trans_a, trans_b, accumulate):
        """The batched GEMM on ragged sizes (partial tiles in every dimension), all transposes."""
        from fastconv.backends.cuda import _kernels

        rng = np.random.default_rng(4)
        z, m, n, k = 2, 11, 13, 9
        a = rng.standard_normal((z, k, m) if trans_a else (z, m, k))
        b = rng.standard_normal((z, n, k) if trans_b else (z, k, n))
        c = rng.standard_normal((z, m, n))
        want = (a.transpose(0, 2, 1) if trans_a else a) @ (b.transpose(0, 2, 1) if trans_b else b)
        if accumulate:
            want += c
        dc = cuda.to_device(c)
        cuda_backend._gemm(_kernels.kernels("float64"), cuda.to_device(a), cuda.to_device(b), dc,
                           trans_a, trans_b, accumulate)
        assert_close(dc.copy_to_host(), want, np.float64)

    def test_index_helpers():
        """The kernels' device index helpers against brute force (called as Python here)."""
        from fastconv.backends.cuda import _kernels

        for i in range(3 * 4 * 5 * 2):
            assert _kernels.unravel4(i, 3, 4, 5) == np.unravel_index(i, (2, 3, 4, 5))
            assert _kernels.unravel3(i, 4, 5) == np.unravel_index(i, (6, 4, 5))
        for q in range(-3, 26):
            for dil in range(1, 5):
                for stride in range(1, 5):
                    for n_out in range(1, 6):
                        for n_taps in range(1, 6):
                            want = [t for t in range(n_taps)
                                    if q - t * dil >= 0 and (q - t * dil) % stride == 0
                                    and (q - t * dil) // stride < n_out]
                            assert list(range(*_kernels.taps_reaching(q, dil, stride, n_out, n_taps))) == want, \
                                (q, dil, stride, n_out, n_taps)

    @pytest.mark.skipif(not IN_SIMULATOR, reason="the simulator's shared arrays only")
    def test_simulator_shared_arrays_are_shared_by_a_blocks_threads(monkeypatch):
        """16 threads asking for one shared array at once all get the same array, even when
        creating it lets the others run (as reading the kernel's source for numba's unlocked
        lookup can: see ``fastconv.backends.cuda._simulator``; the unfixed simulator hands
        out 16 arrays here)."""
        import threading
        import time

        from numba.cuda.simulator import kernelapi

        empty = np.empty

        def slow_empty(*args, **kwargs):
            time.sleep(0.01)  # lets every other thread run
            return empty(*args, **kwargs)

        monkeypatch.setattr(np, "empty", slow_empty)
        shared, start, got = kernelapi.FakeCUDAShared(0), threading.Barrier(16), []

        def thread():
            start.wait()
            got.append(shared.array(8, np.float32))

        threads = [threading.Thread(target=thread) for _ in range(16)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(got) == 16 and all(a is got[0] for a in got)
