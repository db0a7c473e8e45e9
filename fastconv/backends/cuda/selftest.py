"""Self-test and forward-conv benchmark of the cuda backend, for a machine with a GPU.

    python -m fastconv.backends.cuda.selftest            # correctness vs reference, then timings
    python -m fastconv.backends.cuda.selftest --no-bench

UNTESTED ON HARDWARE: written without access to a GPU; only exercised under
numba's CUDA simulator (tiny shapes, where timings mean nothing).

Correctness: every conv layer of the DESIGN.md suite (batch cut to 2), every pass
(forward, backward-input, backward-weight, bias) and both algorithms, plus the
suite's pools, in float32 and float64, against the reference backend on the
host.  Timing: forward conv of the full suite on device arrays (median of
``--repeat`` runs after a warm-up, synchronised), and PyTorch's cuDNN conv2d
when torch with CUDA is installed.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from typing import Any, Iterable

import numpy as np
from numba import cuda

from ... import _bench_suite
from ..reference import ReferenceBackend
from . import CudaBackend

TOLERANCE = {np.dtype(np.float32): 1e-5, np.dtype(np.float64): 1e-12}


def _rel_err(out: Any, ref: np.ndarray) -> float:
    out = out.copy_to_host() if hasattr(out, "copy_to_host") else np.asarray(out)
    out, ref = out.astype(np.float64), ref.astype(np.float64)
    denom = np.linalg.norm(ref)
    return float(np.linalg.norm(out - ref) / denom) if denom else float(np.linalg.norm(out))


def check(conv_cases: Iterable = _bench_suite.CONV_CASES, pool_cases: Iterable = _bench_suite.POOL_CASES,
          dtypes: Iterable = (np.float32, np.float64), batch: int = 2, verbose: bool = True) -> list[str]:
    """Compare every op with the reference backend; returns the failures (empty: all passed)."""
    gpu, ref = CudaBackend(), ReferenceBackend()
    rng = np.random.default_rng(0)
    failures = []

    def report(label: str, err: float, dtype) -> None:
        ok = err <= TOLERANCE[np.dtype(dtype)]
        if not ok:
            failures.append(f"{label}: relative error {err:.3g}")
        if verbose:
            print(f"  {'ok  ' if ok else 'FAIL'} {label}: {err:.2e}")

    for dtype in map(np.dtype, dtypes):
        for case in conv_cases:
            g = case.with_batch(min(batch, case.n)).geometry(dtype)
            x = rng.standard_normal(g.input_shape).astype(dtype)
            w = rng.standard_normal(g.weight_shape).astype(dtype)
            b = rng.standard_normal(g.k).astype(dtype)
            gy = rng.standard_normal(g.output_shape).astype(dtype)
            dx, dw, db, dgy = (cuda.to_device(a) for a in (x, w, b, gy))
            want = (ref.conv2d(x, w, b, g, "direct"), ref.conv2d_backward_input(gy, w, g, "direct"),
                    ref.conv2d_backward_weight(gy, x, g, "direct"), ref.conv2d_backward_bias(gy, g))
            for algo in gpu.algorithms:
                got = (gpu.conv2d(dx, dw, db, g, algo), gpu.conv2d_backward_input(dgy, dw, g, algo),
                       gpu.conv2d_backward_weight(dgy, dx, g, algo), gpu.conv2d_backward_bias(dgy, g))
                for pass_, o, r in zip(("forward", "backward-input", "backward-weight", "bias"), got, want):
                    report(f"{dtype.name} {case.name} {algo} {pass_}", _rel_err(o, r), dtype)
        for case in pool_cases:
            p = case.with_batch(min(batch, case.n)).geometry(dtype)
            x = rng.standard_normal(p.input_shape).astype(dtype)
            gy = rng.standard_normal(p.output_shape).astype(dtype)
            dx, dgy = cuda.to_device(x), cuda.to_device(gy)
            if case.op == "max":
                (out, idx), (r_out, r_idx) = gpu.max_pool2d(dx, p), ref.max_pool2d(x, p)
                report(f"{dtype.name} {case.name} forward", _rel_err(out, r_out), dtype)
                if not np.array_equal(idx.copy_to_host(), r_idx):
                    failures.append(f"{dtype.name} {case.name}: indices differ")
                report(f"{dtype.name} {case.name} backward",
                       _rel_err(gpu.max_pool2d_backward(dgy, idx, p), ref.max_pool2d_backward(gy, r_idx, p)), dtype)
            else:
                report(f"{dtype.name} {case.name} forward", _rel_err(gpu.avg_pool2d(dx, p), ref.avg_pool2d(x, p)),
                       dtype)
                report(f"{dtype.name} {case.name} backward",
                       _rel_err(gpu.avg_pool2d_backward(dgy, p), ref.avg_pool2d_backward(gy, p)), dtype)
    return failures


def _median_ms(fn, sync, repeat: int) -> float:
    fn()
    sync()  # warm-up (JIT compilation, cuDNN autotuning)
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def bench(conv_cases: Iterable = _bench_suite.CONV_CASES, repeat: int = 10) -> list[dict]:
    """Forward conv timings (float32, device arrays) per algorithm, and torch cuDNN if available."""
    gpu = CudaBackend()
    try:
        import torch

        have_torch = torch.cuda.is_available()
    except ImportError:
        have_torch = False
    rows = []
    rng = np.random.default_rng(0)
    for case in conv_cases:
        g = case.geometry(np.float32)
        x = rng.standard_normal(g.input_shape).astype(np.float32)
        w = rng.standard_normal(g.weight_shape).astype(np.float32)
        dx, dw = cuda.to_device(x), cuda.to_device(w)
        row = {"case": case.name, "gflop": g.flops / 1e9}
        for algo in gpu.algorithms:
            row[algo] = _median_ms(lambda: gpu.conv2d(dx, dw, None, g, algo), cuda.synchronize, repeat)
        if have_torch:
            tx, tw = torch.from_numpy(x).cuda(), torch.from_numpy(w).cuda()
            torch.backends.cudnn.benchmark = True
            row["cudnn"] = _median_ms(
                lambda: torch.nn.functional.conv2d(tx, tw, None, case.stride, case.pad, case.dil, case.groups),
                torch.cuda.synchronize, repeat)
        rows.append(row)
        cells = "  ".join(f"{k} {row[k]:8.3f} ms ({row['gflop'] / row[k] * 1e3:7.1f} GFLOP/s)"
                          for k in ("direct", "im2col", "cudnn") if k in row)
        print(f"{case.name:12s} {cells}")
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--no-bench", action="store_true", help="correctness checks only")
    parser.add_argument("--repeat", type=int, default=10, help="timed runs per case (median)")
    args = parser.parse_args(argv)
    print(f"cuda backend selftest on {CudaBackend().info()}")
    failures = check()
    print(f"{len(failures)} failures" + "".join(f"\n  {f}" for f in failures))
    if not args.no_bench:
        bench(repeat=args.repeat)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
