"""Hardening: crash safety of bad input, thread safety, bounded memory, no leaks."""

from __future__ import annotations

import json
import textwrap
import threading
from pathlib import Path

import numpy as np
import pytest

import fastconv
from conftest import assert_close, backend_algorithms, host_backends, python_child, unsupported

HERE = Path(__file__).parent


@pytest.mark.parametrize("backend", host_backends())
def test_bad_input_matrix_never_crashes_the_interpreter(backend):
    """Every bad-input case, run in a child process: a segfault or abort there shows
    up as a negative return code here instead of killing the test run."""
    code = textwrap.dedent(f"""
        import json, sys
        sys.path.insert(0, {str(HERE)!r})
        from test_bad_input import CASES
        results = {{}}
        for name, call, exc_type, words in CASES:
            try:
                call({backend!r})
                results[name] = "no error"
            except Exception as exc:
                results[name] = type(exc).__name__ if isinstance(exc, exc_type) else repr(exc)
        print(json.dumps(results))
    """)
    proc = python_child(["-c", code], timeout=600)
    assert proc.returncode == 0, f"child exited with {proc.returncode}: {proc.stderr[-2000:]}"
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    wrong = {name: r for name, r in results.items() if r not in ("ValueError", "TypeError")}
    assert not wrong, wrong
    assert len(results) >= 30


@pytest.mark.parametrize("backend,algorithm", backend_algorithms())
def test_many_threads_give_the_serial_results(backend, algorithm):
    rng = np.random.default_rng(0)
    jobs = []
    winograd = algorithm == "winograd"  # runs 3x3 stride-1 layers only
    for i in range(8):
        x = rng.standard_normal((2, 2 + i % 3, 9 + i, 8 + i)).astype(np.float32)
        w = rng.standard_normal((3, x.shape[1], 3 if winograd else 1 + i % 3, 3)).astype(np.float32)
        jobs.append((x, w, dict(stride=1 if winograd else 1 + i % 2, padding=i % 2)))
    serial = [(fastconv.conv2d(x, w, **p, backend=backend, algorithm=algorithm),
               fastconv.max_pool2d(x, 2, return_indices=True, backend=backend),
               fastconv.avg_pool2d(x, 3, 2, 1, backend=backend)) for x, w, p in jobs]
    results: dict[int, list] = {}
    errors = []

    def worker(t: int) -> None:
        try:
            for rep in range(5):
                i = (t + rep) % len(jobs)
                x, w, p = jobs[i]
                got = (fastconv.conv2d(x, w, **p, backend=backend, algorithm=algorithm),
                       fastconv.max_pool2d(x, 2, return_indices=True, backend=backend),
                       fastconv.avg_pool2d(x, 3, 2, 1, backend=backend))
                results.setdefault(i, []).append(got)
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert sum(len(v) for v in results.values()) == 40
    for i, runs in results.items():
        for conv, (mp, mi), ap in runs:
            np.testing.assert_array_equal(conv, serial[i][0])
            np.testing.assert_array_equal(mp, serial[i][1][0])
            np.testing.assert_array_equal(mi, serial[i][1][1])
            np.testing.assert_array_equal(ap, serial[i][2])


_MEMORY_PROBE = textwrap.dedent("""
    import json, resource, sys
    import numpy as np, fastconv
    backend, algorithm = sys.argv[1], sys.argv[2]
    fastconv.set_workspace_limit(8 * 2**20)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((64, 32, 28, 28)).astype(np.float32)      # 6.4 MB
    w = rng.standard_normal((64, 32, 3, 3)).astype(np.float32)
    gy = rng.standard_normal((64, 64, 28, 28)).astype(np.float32)     # 12.8 MB
    small = x[:1, :, :6, :6]
    # warm up every code path on a tiny shape (libraries, JIT compilation)
    fastconv.conv2d(small, w, padding=1, backend=backend, algorithm=algorithm)
    fastconv.conv2d_backward(gy[:1, :, :6, :6], small, w, padding=1, backend=backend, algorithm=algorithm)
    kib = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    before = kib()
    out = fastconv.conv2d(x, w, padding=1, backend=backend, algorithm=algorithm)
    after_forward = kib()
    del out
    g = fastconv.conv2d_backward(gy, x, w, padding=1, backend=backend, algorithm=algorithm)
    after_backward = kib()
    print(json.dumps({"forward_kib": after_forward - before, "backward_kib": after_backward - before}))
""")


@pytest.mark.parametrize("backend,algorithm", backend_algorithms())
def test_peak_memory_stays_within_output_plus_workspace(backend, algorithm):
    """Peak RSS growth of a large conv: output + 8 MiB workspace + a small constant.
    Columns of this layer without chunking would be 64*288*784*4 B = 58 MiB."""
    proc = python_child(["-c", _MEMORY_PROBE, backend, algorithm], timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    grown = json.loads(proc.stdout.strip().splitlines()[-1])
    output_kib = 64 * 64 * 28 * 28 * 4 // 1024
    input_kib = 64 * 32 * 28 * 28 * 4 // 1024
    workspace_kib = 8 * 1024
    slack_kib = 12 * 1024
    assert grown["forward_kib"] <= output_kib + workspace_kib + slack_kib, grown
    # backward returns an input-sized gradient (+ the small weight gradient)
    assert grown["backward_kib"] <= max(output_kib, input_kib) + workspace_kib + slack_kib, grown


def _rss_kib() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4


@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="needs /proc")
@pytest.mark.parametrize("backend", host_backends())
def test_no_memory_growth_over_1000_calls(backend):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 3, 12, 12)).astype(np.float32)
    w = rng.standard_normal((4, 3, 3, 3)).astype(np.float32)
    algorithms = fastconv.available_backends()[backend]["algorithms"]

    def step():
        for algorithm in algorithms:
            y = fastconv.conv2d(x, w, padding=1, backend=backend, algorithm=algorithm)
            fastconv.conv2d_backward(y, x, w, padding=1, backend=backend, algorithm=algorithm)
        p, i = fastconv.max_pool2d(y, 2, return_indices=True, backend=backend)
        fastconv.max_pool2d_backward(p, y, 2, indices=i, backend=backend)
        fastconv.avg_pool2d_backward(fastconv.avg_pool2d(y, 2, backend=backend), y.shape, 2, backend=backend)

    for _ in range(100):  # warm up allocator pools and caches
        step()
    before = _rss_kib()
    for _ in range(1000):
        step()
    grown = _rss_kib() - before
    assert grown < 4 * 1024, f"RSS grew by {grown} KiB over 1000 calls"


#: (backend, algorithm, kernel size) for the long-sum test: every pair, 1x1 and 3x3 where it runs
LONG_SUMS = [(b, a, size) for b, a in backend_algorithms() for size in (1, 3)
             if not unsupported(b, a, "conv2d", (1, 4096, 6, 6), (2, 4096, size, size), padding=size // 2)]


@pytest.mark.parametrize("backend,algorithm,size", LONG_SUMS)
def test_float32_accuracy_on_long_sums(backend, algorithm, size):
    """A 1x1 and a 3x3 conv over 4096 channels: float32 results stay within the float32 error
    bar of the float64 reference (documents the accumulation quality of each kernel)."""
    rng = np.random.default_rng(2)
    x = (rng.standard_normal((1, 4096, 6, 6)) + 3.0).astype(np.float32)  # a large mean: ill-conditioned
    w = (rng.standard_normal((2, 4096, size, size)) + 1.0).astype(np.float32)
    out = fastconv.conv2d(x, w, padding=size // 2, backend=backend, algorithm=algorithm)
    assert_close(out, fastconv.conv2d(x, w, padding=size // 2, backend="reference"), np.float32)
    gy = (rng.standard_normal(out.shape) + 2.0).astype(np.float32)
    got = fastconv.conv2d_backward(gy, x, w, padding=size // 2, backend=backend, algorithm=algorithm)
    want = fastconv.conv2d_backward(gy, x, w, padding=size // 2, backend="reference")
    assert_close(got.input, want.input, np.float32)
    assert_close(got.weight, want.weight, np.float32)


def _blas_threads() -> dict[str, int]:
    from threadpoolctl import threadpool_info

    return {i["filepath"]: i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"}


def test_single_threaded_blas_pins_every_blas_and_restores():
    import scipy.linalg.cython_blas  # noqa: F401  (both NumPy's and SciPy's BLAS loaded)

    fastconv.set_num_threads(2)
    before = _blas_threads()
    assert len(before) >= 1
    with fastconv.single_threaded_blas():
        with fastconv.single_threaded_blas():  # re-entrant
            assert set(_blas_threads().values()) == {1}
        assert set(_blas_threads().values()) == {1}
    assert _blas_threads() == before
    with pytest.raises(RuntimeError):  # restored on errors too
        with fastconv.single_threaded_blas():
            raise RuntimeError
    assert _blas_threads() == before


def test_fit_and_predict_run_with_single_threaded_blas(monkeypatch):
    from fastconv import nn

    seen = []
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 2))
    original = model.forward

    def spy(x):
        seen.append(set(_blas_threads().values()))
        return original(x)

    monkeypatch.setattr(model, "forward", spy)
    x = np.random.default_rng(0).random((8, 1, 4, 4)).astype(np.float32)
    y = np.arange(8) % 2
    nn.fit(model, nn.SGD(model.parameters(), lr=0.1), x, y, epochs=1, batch_size=4, log=None)
    nn.predict(model, x)
    assert seen and all(s == {1} for s in seen)
