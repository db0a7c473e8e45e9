"""Deep 3x3 layers at small batches (ResNet's later stages: 64 channels on 56x56 down to 512 on
7x7), which the DESIGN.md suite does not cover: fastconv's ``algorithm="auto"`` against PyTorch
CPU, every pass, the calls taking turns one by one (so that the VM's drift hits both alike).

    python bench/deep_layers.py [--batches 1,8] [--backends cython,numba] [--seconds 1.5]

Prints, per layer and pass, the median milliseconds of each and PyTorch's time / fastconv's
(> 1: fastconv is faster).  Needs PyTorch.
"""

from __future__ import annotations

import argparse
import statistics
import time

import fastconv
from fastconv import _bench_suite as suite

#: (channels in and out, plane side): a 3x3 "same" layer of each ResNet stage
STAGES = ((64, 56), (128, 28), (256, 14), (512, 7))


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def compare(case: suite.ConvCase, pass_: str, impls: list[str], seconds: float) -> dict[str, float]:
    """Median seconds of every implementation of ``impls`` ("torch" or a backend name, run with
    ``algorithm="auto"``) on one pass, the calls interleaved (the order reversed every round)."""
    calls = {impl: suite.make_call(case, pass_, impl) for impl in impls}
    for fn in calls.values():
        fn()  # warm-up (and JIT compilation)
    rounds = max(5, min(200, int(seconds / max(_timed(calls[impls[0]]), 1e-6))))
    times: dict[str, list[float]] = {impl: [] for impl in impls}
    for r in range(rounds):
        for impl in (impls if r % 2 else impls[::-1]):
            times[impl].append(_timed(calls[impl]))
    return {impl: statistics.median(t) for impl, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", default="1,8", help="comma-separated batch sizes")
    parser.add_argument("--backends", default="cython,numba", help="comma-separated fastconv backends")
    parser.add_argument("--seconds", type=float, default=1.5, help="time per layer and pass")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(fastconv.get_num_threads())
    suite.keep_freed_memory()
    backends = [b for b in args.backends.split(",") if fastconv.available_backends()[b]["available"]]
    impls = ["torch", *backends]
    print(f"fastconv {fastconv.__version__}, PyTorch {torch.__version__}, {fastconv.get_num_threads()} threads, "
          "float32, 3x3 'same', algorithm='auto'; ms (median), then PyTorch's time / fastconv's")
    for n in (int(b) for b in args.batches.split(",")):
        for c, hw in STAGES:
            case = suite.ConvCase(f"{n}x{c}x{hw}", n, c, hw, c, 3)
            for pass_ in suite.CONV_PASSES:
                m = compare(case, pass_, impls, args.seconds)
                cells = "  ".join(f"{impl} {m[impl] * 1e3:7.3f}" for impl in impls)
                ratios = "  ".join(f"{b} {m['torch'] / m[b]:.2f}x" for b in backends)
                print(f"{case.name:10s} {pass_:15s} {cells}   {ratios}", flush=True)


if __name__ == "__main__":
    main()
