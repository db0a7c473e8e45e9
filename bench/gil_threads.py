"""Do the compiled kernels release the GIL?  Time the same work done by one Python
thread and split over two Python threads, with fastconv's own threading set to one
thread per call.  A speed-up near 2x on two cores means the kernels run without the GIL.

    python bench/gil_threads.py [--calls 40]
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time

import numpy as np

import fastconv


def _work(backend: str, algorithm: str | None, calls: int, x: np.ndarray, w: np.ndarray) -> None:
    for _ in range(calls):
        fastconv.conv2d(x, w, padding=1, backend=backend, algorithm=algorithm)
        fastconv.max_pool2d(x, 2, backend=backend)


def measure(backend: str, algorithm: str | None, calls: int, repeats: int = 3) -> tuple[float, float]:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((16, 16, 32, 32)).astype(np.float32)
    w = rng.standard_normal((16, 16, 3, 3)).astype(np.float32)
    _work(backend, algorithm, 2, x, w)  # warm-up (and JIT compilation)
    serial, parallel = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        _work(backend, algorithm, calls, x, w)
        serial.append(time.perf_counter() - start)
        threads = [threading.Thread(target=_work, args=(backend, algorithm, calls // 2, x, w)) for _ in range(2)]
        start = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        parallel.append(time.perf_counter() - start)
    return statistics.median(serial), statistics.median(parallel)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=40)
    args = parser.parse_args()
    previous = fastconv.get_num_threads()
    fastconv.set_num_threads(1)
    try:
        print(f"{'backend':<10} {'algorithm':<9} {'1 thread s':>10} {'2 threads s':>11} {'speed-up':>8}")
        for name, info in fastconv.available_backends().items():
            if not info["available"] or name in ("reference", "cuda"):
                continue
            for algorithm in info["algorithms"]:
                one, two = measure(name, algorithm, args.calls)
                print(f"{name:<10} {algorithm:<9} {one:>10.3f} {two:>11.3f} {one / two:>7.2f}x")
    finally:
        fastconv.set_num_threads(previous)


if __name__ == "__main__":
    main()
