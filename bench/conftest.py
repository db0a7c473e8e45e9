"""pytest-benchmark suite over the DESIGN.md layer suite (``pytest bench/ --benchmark-only``).

Every available fastconv backend and algorithm, plus PyTorch and SciPy when installed,
is timed on every layer and pass; each (layer, pass) is one benchmark group, so the
report compares implementations side by side.  The reference backend is left out:
it would take minutes on the real sizes (``fastconv bench`` estimates it on N=1).

Options: ``--bench-divisor K`` divides every batch N by K (e.g. 4 for a quick run);
``--bench-backends a,b`` limits the fastconv backends.  These files live outside
``tests/`` so ``python -m pytest tests`` never collects them.
"""

from __future__ import annotations

import pytest

import fastconv
from fastconv import _bench_suite as suite
from fastconv import _dispatch


def pytest_configure(config):
    suite.keep_freed_memory()  # time the kernels, not page faults of per-call outputs (see there)


def pytest_addoption(parser):
    group = parser.getgroup("fastconv bench")
    group.addoption("--bench-divisor", type=int, default=1, help="divide every batch N by this (default 1)")
    group.addoption("--bench-backends", default=None, help="comma-separated fastconv backends (default: all)")


def _implementations(config, kind: str) -> list[str]:
    """"backend:algorithm" for every available host backend and algorithm (one entry per
    backend for pools), then the external baselines that cover ``kind``."""
    wanted = config.getoption("--bench-backends")
    wanted = None if wanted is None else {w.strip() for w in wanted.split(",")}
    impls = []
    for name, info in fastconv.available_backends().items():
        if not info["available"] or name == "reference" or (wanted is not None and name not in wanted):
            continue
        if _dispatch._load(name).device:
            continue
        impls += [name] if kind == "pool" else [f"{name}:{algo}" for algo in info["algorithms"]]
    impls += [b for b in suite.BASELINES[kind] if suite.baseline_available(b)]
    return impls


def pytest_generate_tests(metafunc):
    if "impl" in metafunc.fixturenames:
        metafunc.parametrize("impl", _implementations(metafunc.config, metafunc.module.KIND))


@pytest.fixture
def run_case(benchmark, request):
    """``run_case(case, pass_, impl)``: time one pass of one case in the group "<layer> <pass>"."""
    divisor = max(1, request.config.getoption("--bench-divisor"))
    try:
        import torch

        torch.set_num_threads(fastconv.get_num_threads())
    except ImportError:
        pass

    def run(case: suite.Case, pass_: str, impl: str) -> None:
        case = case.with_batch(max(1, case.n // divisor))
        name, _, algo = impl.partition(":")
        fn = suite.make_call(case, pass_, name, algo or None)
        benchmark.group = f"{case.name} {pass_} ({case.describe()})"
        benchmark.extra_info.update(layer=case.name, pass_=pass_, impl=name, algorithm=algo or None)
        unit, amount = suite.work(case, pass_)
        benchmark.extra_info[unit + "s"] = amount
        fn()  # warm-up: JIT compilation happens outside the timed rounds
        benchmark(fn)

    return run
