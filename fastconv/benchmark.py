"""``fastconv bench``: time every backend and algorithm on the DESIGN.md layer suite.

The runner first measures this machine's GEMM peak (``numpy.matmul`` of two
2048 x 2048 matrices in the benchmark dtype, best of several) and memory-copy
bandwidth (``numpy.copyto`` of a 256 MiB array, 64 MiB with ``--quick``;
bytes read + written), then times
every (layer, pass, implementation, algorithm): one untimed warm-up call (JIT
compilation, first touch), then repeated calls, reporting the median.  The
implementations of one (layer, pass) take turns, in three rounds of a third of
the time budget each, and each reports its fastest round's median: a noisy
second on a shared machine then slows one round of every implementation
rather than the whole measurement of one (which flipped speed-ups between
runs).  ``--quick`` times one round.  It prints
one table: milliseconds, GFLOP/s (2*N*K*Ho*Wo*(C/groups)*R*S per pass) and % of
the GEMM peak for convolutions, GB/s and % of the copy bandwidth for pools, and
speed-ups (their time / our time, > 1 means fastconv is faster) against the
reference backend, the numpy backend, PyTorch CPU (``torch.nn.functional``,
same dtype, ``torch.set_num_threads`` = fastconv's threads) and, for the 2-D
correlations, ``scipy.signal.correlate2d`` and ``scipy.ndimage.correlate``.

Before timing, glibc's ``malloc`` is told to keep freed memory for reuse
(:func:`fastconv._bench_suite.keep_freed_memory`): otherwise PyTorch's per-call
outputs are page-faulted in on every call, which made up most of its time on
the large layers and flipped with what ran before.

The reference backend is timed on one image and its time multiplied by N (marked
``~`` in the table, ``"estimated": true`` in the JSON).  ``--quick`` times a batch
of N/4 (at least 1) with fewer repeats; the output says so.  ``--batch N`` times every
layer at batch N instead (``--batch 1``: single-image inference).  The speed-ups of a
fastconv backend use the algorithm each *other* backend picks by default
("auto"); in the table, ``*`` marks the algorithm that "auto" picks.

JSON output (``--json FILE``) follows :data:`JSON_SCHEMA` (JSON Schema draft 7),
checked by :func:`validate`.  In words: an object with

``schema``        "fastconv-bench/1"
``created``       UTC time, ISO 8601
``quick``         bool;  ``batch_divisor``: int (N was divided by it, 1 unless quick)
``settings``      {"dtype", "threads", "backends", "layers", "passes", "baselines",
                  "keep_freed_memory" (bool: glibc malloc set to reuse freed memory, see below),
                  "batch" (int: every layer's batch, from ``--batch``; null: the suite's)}
``versions``      {"fastconv", "python", "numpy", "scipy", "numba", "cython", "torch"} (str or null)
``cpu``           {"model", "machine", "system", "logical_cpus", "usable_cpus",
                  "load_average": [1, 5, 15 min] or null (taken at the start), "blas": [..]}
``peaks``         {"gemm_gflops", "gemm_size", "copy_gbps", "copy_bytes"}
``backends``      {name: {"available": bool, "reason": str|null, "algorithms": [str]}}
``compile_seconds`` {backend: {kernel: seconds}} from backends exposing ``compile_times()``
``results``       [row], one per timed (layer, pass, impl, algorithm):
                  "layer", "kind" (conv|pool|corr2d), "pass", "impl" (backend or baseline name),
                  "algorithm" (str|null), "auto_pick" (bool|null), "shape" (str),
                  "n" (batch of the timed call), "estimated" (bool: timed on n, scaled to N),
                  "ms", "ms_min", "first_ms" (null on error), "runs" (int),
                  "rate" and "rate_unit" ("GFLOP/s" | "GB/s"), "pct_peak",
                  "speedup" {"reference"|"numpy"|"torch"|"scipy.signal"|"scipy.ndimage": float|null},
                  "error" (str|null)
``auto_picks``    [{"backend", "layer", "pass", "auto", "best", "auto_ms", "best_ms", "ratio" (auto / best),
                    "times_ms" {algorithm: ms}, "tuned" (the autotuner's pick with --autotune, else null),
                    "tuned_ratio" (its measured time / best, or null)}]
"""

from __future__ import annotations

import argparse
import datetime as _dt
import functools
import gc
import importlib
import itertools
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import numpy as np

from . import _bench_suite as suite
from . import _config

SCHEMA_ID = "fastconv-bench/1"
_NUM = {"type": "number"}
_NUM_OR_NULL = {"type": ["number", "null"]}
_STR_OR_NULL = {"type": ["string", "null"]}

#: JSON Schema (draft 7) of ``fastconv bench --json`` output
JSON_SCHEMA: dict[str, Any] = {
    "$schema": "http://json-schema.org/draft-07/schema#",
    "title": "fastconv bench results",
    "type": "object",
    "required": ["schema", "created", "quick", "batch_divisor", "settings", "versions", "cpu", "peaks",
                 "backends", "compile_seconds", "results", "auto_picks"],
    "properties": {
        "schema": {"type": "string", "enum": [SCHEMA_ID]},
        "created": {"type": "string"},
        "quick": {"type": "boolean"},
        "batch_divisor": {"type": "integer", "minimum": 1},
        "settings": {
            "type": "object",
            "required": ["dtype", "threads", "backends", "layers", "passes", "baselines"],
            "properties": {
                "dtype": {"type": "string", "enum": ["float32", "float64"]},
                "threads": {"type": "integer", "minimum": 1},
                "backends": {"type": "array", "items": {"type": "string"}},
                "layers": {"type": "array", "items": {"type": "string"}},
                "passes": {"type": "array", "items": {"type": "string", "enum": list(suite.ALL_PASSES)}},
                "baselines": {"type": "array", "items": {"type": "string"}},
                "keep_freed_memory": {"type": "boolean"},
                "batch": {"type": ["integer", "null"], "minimum": 1},
            },
        },
        "versions": {
            "type": "object",
            "required": ["fastconv", "python", "numpy", "scipy", "numba", "cython", "torch"],
            "additionalProperties": _STR_OR_NULL,
        },
        "cpu": {
            "type": "object",
            "required": ["model", "machine", "system", "logical_cpus", "usable_cpus", "load_average", "blas"],
            "properties": {
                "model": {"type": "string"},
                "machine": {"type": "string"},
                "system": {"type": "string"},
                "logical_cpus": {"type": ["integer", "null"]},
                "usable_cpus": {"type": ["integer", "null"]},
                "load_average": {"type": ["array", "null"], "items": _NUM},
                "blas": {"type": "array", "items": {"type": "object"}},
            },
        },
        "peaks": {
            "type": "object",
            "required": ["gemm_gflops", "gemm_size", "copy_gbps", "copy_bytes"],
            "properties": {"gemm_gflops": _NUM, "gemm_size": {"type": "integer"}, "copy_gbps": _NUM,
                           "copy_bytes": {"type": "integer"}},
        },
        "backends": {
            "type": "object",
            "additionalProperties": {
                "type": "object",
                "required": ["available", "reason", "algorithms"],
                "properties": {"available": {"type": "boolean"}, "reason": _STR_OR_NULL,
                               "algorithms": {"type": "array", "items": {"type": "string"}}},
            },
        },
        "compile_seconds": {"type": "object", "additionalProperties": {"type": "object",
                                                                       "additionalProperties": _NUM}},
        "results": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["layer", "kind", "pass", "impl", "algorithm", "auto_pick", "shape", "n", "estimated",
                             "ms", "ms_min", "first_ms", "runs", "rate", "rate_unit", "pct_peak", "speedup",
                             "error"],
                "properties": {
                    "layer": {"type": "string", "enum": [c.name for c in suite.CASES]},
                    "kind": {"type": "string", "enum": ["conv", "pool", "corr2d"]},
                    "pass": {"type": "string", "enum": list(suite.ALL_PASSES)},
                    "impl": {"type": "string"},
                    "algorithm": _STR_OR_NULL,
                    "auto_pick": {"type": ["boolean", "null"]},
                    "shape": {"type": "string"},
                    "n": {"type": "integer", "minimum": 1},
                    "estimated": {"type": "boolean"},
                    "ms": _NUM_OR_NULL, "ms_min": _NUM_OR_NULL, "first_ms": _NUM_OR_NULL,
                    "runs": {"type": "integer", "minimum": 0},
                    "rate": _NUM_OR_NULL,
                    "rate_unit": {"type": "string", "enum": ["GFLOP/s", "GB/s"]},
                    "pct_peak": _NUM_OR_NULL,
                    "speedup": {"type": "object", "additionalProperties": _NUM_OR_NULL},
                    "error": _STR_OR_NULL,
                },
            },
        },
        "auto_picks": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["backend", "layer", "pass", "auto", "best", "auto_ms", "best_ms", "ratio", "times_ms",
                             "tuned", "tuned_ratio"],
                "properties": {"backend": {"type": "string"}, "layer": {"type": "string"},
                               "pass": {"type": "string"}, "auto": {"type": "string"}, "best": {"type": "string"},
                               "auto_ms": _NUM, "best_ms": _NUM, "ratio": _NUM,
                               "times_ms": {"type": "object", "additionalProperties": _NUM},
                               "tuned": _STR_OR_NULL, "tuned_ratio": _NUM_OR_NULL},
            },
        },
    },
}

_JSON_TYPES = {"object": dict, "array": list, "string": str, "boolean": bool, "null": type(None)}


def validate(instance: Any, schema: dict[str, Any] = JSON_SCHEMA, where: str = "$") -> list[str]:
    """Check ``instance`` against the subset of JSON Schema that :data:`JSON_SCHEMA` uses
    (type, enum, required, properties, additionalProperties, items, minimum).

    Returns
    -------
    list of str
        One message per violation (empty when the instance is valid).
    """
    errors: list[str] = []
    types = schema.get("type")
    if types is not None:
        types = [types] if isinstance(types, str) else types
        if not any(_is_type(instance, t) for t in types):
            return [f"{where}: expected {' or '.join(types)}, got {type(instance).__name__}"]
    if "enum" in schema and instance not in schema["enum"]:
        errors.append(f"{where}: {instance!r} is not one of {schema['enum']}")
    if "minimum" in schema and isinstance(instance, (int, float)) and instance < schema["minimum"]:
        errors.append(f"{where}: {instance} < minimum {schema['minimum']}")
    if isinstance(instance, dict):
        errors += [f"{where}: missing {key!r}" for key in schema.get("required", ()) if key not in instance]
        props = schema.get("properties", {})
        extra = schema.get("additionalProperties", True)
        for key, value in instance.items():
            if key in props:
                errors += validate(value, props[key], f"{where}.{key}")
            elif extra is False:
                errors.append(f"{where}: unexpected key {key!r}")
            elif isinstance(extra, dict):
                errors += validate(value, extra, f"{where}.{key}")
    if isinstance(instance, list) and "items" in schema:
        for i, item in enumerate(instance):
            errors += validate(item, schema["items"], f"{where}[{i}]")
    return errors


def _is_type(value: Any, name: str) -> bool:
    if name == "integer":
        return isinstance(value, int) and not isinstance(value, bool)
    if name == "number":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, _JSON_TYPES[name])


# --------------------------------------------------------------------------- measuring


@dataclass(frozen=True)
class Timing:
    """Seconds: median and minimum of the timed runs, and the untimed first call (None when skipped)."""

    median: float
    minimum: float
    runs: int
    first: float | None


@dataclass(frozen=True)
class Effort:
    """How hard to time one row: warm-up calls, run count bounds and a time budget (seconds),
    per round of ``rounds`` (see :func:`measure_rounds`)."""

    warmup: int
    min_runs: int
    max_runs: int
    budget: float
    rounds: int = 1


FULL = Effort(warmup=1, min_runs=3, max_runs=10, budget=1.0 / 3, rounds=3)
QUICK = Effort(warmup=1, min_runs=2, max_runs=4, budget=0.1)
REFERENCE_FULL = Effort(warmup=0, min_runs=2, max_runs=3, budget=1.0)
REFERENCE_QUICK = Effort(warmup=0, min_runs=1, max_runs=1, budget=0.0)


def measure(fn: Callable[[], Any], effort: Effort) -> Timing:
    """Time ``fn``: ``effort.warmup`` untimed calls, then at least ``min_runs`` and at most
    ``max_runs`` timed calls, stopping once ``budget`` seconds of timed calls are spent."""
    first = None
    for i in range(effort.warmup):
        t0 = time.perf_counter()
        fn()
        if i == 0:
            first = time.perf_counter() - t0
    gc.collect()
    times: list[float] = []
    while len(times) < effort.min_runs or (len(times) < effort.max_runs and sum(times) < effort.budget):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return Timing(statistics.median(times), min(times), len(times), first)


def measure_rounds(makers: list[Callable[[], Callable[[], Any]]],
                   efforts: list[Effort]) -> list[Timing | Exception]:
    """Time several implementations of one task in turns: ``max(rounds)`` rounds, in each of which
    every implementation still due (``efforts[i].rounds``) builds its call (``makers[i]()``, so
    that no more than one holds its inputs at a time) and is timed by :func:`measure`.  Each
    gets the median of its fastest round, its fastest run, all its runs and its first round's
    warm-up time; or the exception that building or calling it raised (it is then dropped)."""
    rounds: list[list[Timing]] = [[] for _ in makers]
    failed: dict[int, Exception] = {}
    for r in range(max(e.rounds for e in efforts)):
        for i, (make, effort) in enumerate(zip(makers, efforts)):
            if i in failed or r >= effort.rounds:
                continue
            try:
                rounds[i].append(measure(make(), effort))
            except Exception as exc:  # reported by the caller, the others go on
                failed[i] = exc
    return [failed[i] if i in failed else
            Timing(min(t.median for t in ts), min(t.minimum for t in ts), sum(t.runs for t in ts), ts[0].first)
            for i, ts in enumerate(rounds)]


def gemm_peak(dtype: Any = np.float32, size: int = 2048, repeats: int = 5) -> float:
    """GFLOP/s of ``numpy.matmul`` on two ``size`` x ``size`` matrices (best of ``repeats``)."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((size, size)).astype(dtype)
    b = rng.standard_normal((size, size)).astype(dtype)
    out = np.empty((size, size), dtype=dtype)
    np.matmul(a, b, out=out)
    best = min(_timed(lambda: np.matmul(a, b, out=out)) for _ in range(repeats))
    return 2.0 * size**3 / best / 1e9


def copy_bandwidth(nbytes: int = 256 * 2**20, repeats: int = 5) -> float:
    """GB/s of ``numpy.copyto`` between two arrays of ``nbytes`` (bytes read + written, best of ``repeats``)."""
    src = np.ones(nbytes // 4, dtype=np.float32)
    dst = np.zeros_like(src)
    np.copyto(dst, src)
    best = min(_timed(lambda: np.copyto(dst, src)) for _ in range(repeats))
    return 2.0 * src.nbytes / best / 1e9


def _timed(fn: Callable[[], Any]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


# --------------------------------------------------------------------------- machine facts


def _version(module: str) -> str | None:
    try:
        return str(importlib.import_module(module).__version__)
    except Exception:
        return None


def versions() -> dict[str, str | None]:
    import fastconv

    return {"fastconv": fastconv.__version__, "python": platform.python_version(), "numpy": np.__version__,
            "scipy": _version("scipy"), "numba": _version("numba"), "cython": _version("Cython"),
            "torch": _version("torch")}


def cpu_info() -> dict[str, Any]:
    model = platform.processor() or ""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        usable = None
    blas = [{k: v for k, v in lib.items() if k in ("internal_api", "version", "num_threads", "architecture")}
            for lib in _config.blas_libraries()]
    try:
        load = [round(v, 2) for v in os.getloadavg()]
    except (AttributeError, OSError):  # pragma: no cover - not Unix
        load = None
    return {"model": model or "unknown", "machine": platform.machine(), "system": platform.system(),
            "logical_cpus": os.cpu_count(), "usable_cpus": usable, "load_average": load, "blas": blas}


def compile_seconds(backends: Iterable[str]) -> dict[str, dict[str, float]]:
    """``{backend: {kernel: seconds}}`` for loaded backends whose package has ``compile_times()``."""
    from ._dispatch import REGISTRY

    result = {}
    for name in backends:
        module = sys.modules.get(REGISTRY.get(name, ":").partition(":")[0])
        fn = getattr(module, "compile_times", None)
        if callable(fn):
            try:
                result[name] = {str(k): float(v) for k, v in dict(fn()).items()}
            except Exception:
                pass
    return result


# --------------------------------------------------------------------------- planning and running


@dataclass(frozen=True)
class Job:
    """One row to time.  ``case`` has the batch that is timed; times are scaled by
    ``reported_n / case.n`` to the batch being reported (only the reference differs)."""

    case: suite.Case
    pass_: str
    impl: str
    algorithm: str | None
    auto_pick: bool | None
    reported_n: int
    effort: Effort

    @property
    def scale(self) -> float:
        return self.reported_n / self.case.n


def sized(case: suite.Case, divisor: int, batch: int | None = None) -> suite.Case:
    """``case`` at the batch it is timed with: ``batch`` where given, else N / ``divisor`` (at least 1)."""
    return case.with_batch(batch if batch is not None else max(1, case.n // divisor))


def plan(cases: Iterable[suite.Case], passes: Iterable[str], backends: dict[str, Any], baselines: Iterable[str],
         dtype: np.dtype, divisor: int, quick: bool, batch: int | None = None) -> list[Job]:
    """Every (case, pass, implementation, algorithm) to time, in table order (batches: :func:`sized`)."""
    jobs = []
    passes = tuple(passes)
    for case in cases:
        case = sized(case, divisor, batch)
        for pass_ in case.passes:
            if pass_ not in passes:
                continue
            for name, backend in backends.items():
                if name == "reference":
                    small = case.with_batch(1)
                    jobs.append(Job(small, pass_, name, None, None, case.n,
                                    REFERENCE_QUICK if quick else REFERENCE_FULL))
                    continue
                if case.kind == "pool":
                    jobs.append(Job(case, pass_, name, None, None, case.n, QUICK if quick else FULL))
                    continue
                g = case.geometry(dtype)
                op = suite.conv_op(pass_)
                auto = backend.default_algorithm(op, g)
                for algo in backend.algorithms:
                    if backend.unsupported(algo, op, g) is None:  # e.g. Winograd runs only 3x3 stride 1
                        jobs.append(Job(case, pass_, name, algo, algo == auto, case.n, QUICK if quick else FULL))
            for base in baselines:
                if base in suite.BASELINES[case.kind]:
                    jobs.append(Job(case, pass_, base, None, None, case.n, QUICK if quick else FULL))
    return jobs


def _rows(jobs: list[Job], dtype: np.dtype, peaks: dict[str, float]) -> list[dict[str, Any]]:
    """Time ``jobs``, each (layer, pass)'s implementations in turns (:func:`measure_rounds`); their
    JSON rows, in order."""
    rows = []
    groups = [list(group) for _, group in itertools.groupby(jobs, key=lambda j: (j.case.name, j.pass_))]
    for group in _progress(groups):
        makers = [functools.partial(suite.make_call, j.case, j.pass_, j.impl, j.algorithm, dtype) for j in group]
        timings = measure_rounds(makers, [j.effort for j in group])
        rows += [_row(job, timing, dtype, peaks) for job, timing in zip(group, timings)]
    return rows


def _row(job: Job, timing: Timing | Exception, dtype: np.dtype, peaks: dict[str, float]) -> dict[str, Any]:
    """The JSON row of one timed job (see the module docstring), ``error`` set if it raised."""
    reported = job.case.with_batch(job.reported_n)
    unit, amount = suite.work(reported, job.pass_, dtype)
    row: dict[str, Any] = {
        "layer": job.case.name, "kind": job.case.kind, "pass": job.pass_, "impl": job.impl,
        "algorithm": job.algorithm, "auto_pick": job.auto_pick, "shape": reported.describe(),
        "n": job.case.n, "estimated": job.scale != 1.0, "ms": None, "ms_min": None, "first_ms": None, "runs": 0,
        "rate": None, "rate_unit": "GFLOP/s" if unit == "flop" else "GB/s", "pct_peak": None, "speedup": {},
        "error": None,
    }
    if isinstance(timing, Exception):  # report, keep going
        row["error"] = f"{type(timing).__name__}: {timing}"[:300]
        return row
    seconds = timing.median * job.scale
    rate = amount / seconds / 1e9
    peak = peaks["gemm_gflops"] if unit == "flop" else peaks["copy_gbps"]
    row.update(ms=seconds * 1e3, ms_min=timing.minimum * job.scale * 1e3, runs=timing.runs,
               first_ms=None if timing.first is None else timing.first * 1e3,
               rate=rate, pct_peak=100.0 * rate / peak)
    return row


def add_speedups(rows: list[dict[str, Any]], compare: Iterable[str]) -> None:
    """Fill each fastconv row's ``speedup``: baseline time / row time, where the baseline of a
    fastconv backend is its "auto" algorithm (or its only row)."""
    compare = tuple(compare)
    baseline_ms: dict[tuple[str, str, str], float] = {}
    for r in rows:
        if r["ms"] is not None and r["auto_pick"] in (True, None):
            baseline_ms[(r["layer"], r["pass"], r["impl"])] = r["ms"]
    for r in rows:
        if r["impl"] in suite.BASELINES["corr2d"] or r["impl"] == "reference":
            continue
        for base in compare:
            if base == r["impl"] or (base.startswith("scipy") and r["kind"] != "corr2d"):
                continue
            other = baseline_ms.get((r["layer"], r["pass"], base))
            r["speedup"][base] = None if other is None or r["ms"] is None else other / r["ms"]


def auto_picks(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """For every backend with several algorithms: the "auto" pick vs the fastest measured one."""
    groups: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for r in rows:
        if r["auto_pick"] is not None and r["ms"] is not None:
            groups.setdefault((r["impl"], r["layer"], r["pass"]), []).append(r)
    picks = []
    for (impl, layer, pass_), rs in groups.items():
        auto = [r for r in rs if r["auto_pick"]]
        if len(rs) < 2 or not auto:
            continue
        best = min(rs, key=lambda r: r["ms"])
        picks.append({"backend": impl, "layer": layer, "pass": pass_, "auto": auto[0]["algorithm"],
                      "best": best["algorithm"], "auto_ms": auto[0]["ms"], "best_ms": best["ms"],
                      "ratio": auto[0]["ms"] / best["ms"], "times_ms": {r["algorithm"]: r["ms"] for r in rs},
                      "tuned": None, "tuned_ratio": None})
    return picks


def add_tuned_picks(picks: list[dict[str, Any]], backends: dict[str, Any], dtype: np.dtype, divisor: int,
                    batch: int | None = None) -> None:
    """Fill ``tuned``: what :func:`fastconv._autotune.choose` picks for each entry of
    :func:`auto_picks` (it times the candidates itself, on a workspace-bounded batch), and
    ``tuned_ratio``: the benchmark's time of that algorithm / the best time."""
    from . import _autotune

    for p in _progress(picks, "autotune"):
        case = suite.CASES_BY_NAME[p["layer"]]
        g = sized(case, divisor, batch).geometry(dtype)
        p["tuned"] = _autotune.choose(backends[p["backend"]], suite.conv_op(p["pass"]), g)
        p["tuned_ratio"] = p["times_ms"][p["tuned"]] / p["best_ms"]


# --------------------------------------------------------------------------- output


def _fmt(value: float | None, spec: str, prefix: str = "") -> str:
    return "" if value is None else prefix + format(value, spec)


def _speed(value: float | None, estimated: bool = False) -> str:
    if value is None:
        return ""
    digits = ".2f" if value < 10 else ".1f" if value < 100 else ".0f"
    return ("~" if estimated else "") + format(value, digits) + "x"


def format_table(rows: list[dict[str, Any]], compare: Iterable[str]) -> str:
    """The human-readable table, one block per layer."""
    compare = tuple(compare)
    estimated_ref = {(r["layer"], r["pass"]) for r in rows if r["impl"] == "reference" and r["estimated"]}
    labels = {"reference": "x ref", "numpy": "x numpy", "torch": "x torch", "scipy.signal": "x sp.sig",
              "scipy.ndimage": "x sp.ndi"}
    head = ["pass", "impl", "algo", "ms", "rate", "%peak"] + [labels.get(c, "x " + c) for c in compare]
    lines: list[list[str]] = []
    blocks: list[tuple[str, list[list[str]]]] = []
    layer = None
    for r in rows:
        if r["layer"] != layer:
            layer = r["layer"]
            lines = []
            blocks.append((f"{layer}: {r['shape']}", lines))
        algo = "" if r["algorithm"] is None else r["algorithm"] + ("*" if r["auto_pick"] else "")
        if r["error"] is not None:
            lines.append([r["pass"], r["impl"], algo, "error: " + r["error"][:60]] + [""] * (len(head) - 4))
            continue
        impl = r["impl"] + (f" (n={r['n']})~" if r["estimated"] else "")
        cells = [r["pass"], impl, algo, _fmt(r["ms"], ".3f" if r["ms"] < 10 else ".1f"),
                 _fmt(r["rate"], ".1f") + " " + r["rate_unit"].replace("GFLOP/s", "GF/s"),
                 _fmt(r["pct_peak"], ".1f")]
        for c in compare:
            cells.append(_speed(r["speedup"].get(c), c == "reference" and (r["layer"], r["pass"]) in estimated_ref))
        lines.append(cells)
    widths = [len(h) for h in head]
    for _, ls in blocks:
        for cells in ls:
            if not cells[3].startswith("error"):
                widths = [max(w, len(c)) for w, c in zip(widths, cells)]
    right = {3, 4, 5} | set(range(6, len(head)))

    def line(cells: list[str]) -> str:
        if cells[3].startswith("error"):
            return "  ".join(c.ljust(w) for c, w in zip(cells[:3], widths)) + "  " + cells[3]
        return "  ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    out = [line(head), "  ".join("-" * w for w in widths)]
    for title, ls in blocks:
        out.append(f"[{title}]")
        out += [line(cells) for cells in ls]
    return "\n".join(out)


def format_best(rows: list[dict[str, Any]]) -> str:
    """One line per (layer, pass): the fastest fastconv implementation and its speed-ups."""
    best: dict[tuple[str, str], dict[str, Any]] = {}
    for r in rows:
        if r["ms"] is None or r["impl"] == "reference" or r["impl"] in suite.BASELINES["corr2d"]:
            continue
        key = (r["layer"], r["pass"])
        if key not in best or r["ms"] < best[key]["ms"]:
            best[key] = r
    estimated_ref = {(r["layer"], r["pass"]) for r in rows if r["impl"] == "reference" and r["estimated"]}
    out = ["fastest fastconv implementation per layer and pass (~: vs the scaled N=1 reference time):"]
    for (layer, pass_), r in best.items():
        impl = r["impl"] + ("" if r["algorithm"] is None else f"/{r['algorithm']}")
        speed = "  ".join(f"x {k} {_speed(v, k == 'reference' and (layer, pass_) in estimated_ref).rstrip('x')}"
                          for k, v in r["speedup"].items() if v is not None)
        out.append(f"  {layer:<14} {pass_:<16} {impl:<14} {r['ms']:9.3f} ms  {speed}")
    return "\n".join(out)


def format_summary(picks: list[dict[str, Any]], compiled: dict[str, dict[str, float]], tuned: bool) -> str:
    """The "auto" (and autotune) picks vs the best measured algorithm, and JIT compile times."""
    out = []
    if picks:
        out.append("\n\"auto\" algorithm vs the fastest measured one (ratio = auto time / best time):")
        for p in picks:
            tune = "" if p["tuned"] is None else f"   autotune={p['tuned']:<8} ratio {p['tuned_ratio']:.2f}"
            flag = "" if p["auto"] == p["best"] else f"   best: {p['best']}"
            out.append(f"  {p['backend']:<8} {p['layer']:<12} {p['pass']:<16} auto={p['auto']:<8} "
                       f"ratio {p['ratio']:.2f}{tune}{flag}")
        out.append(f"  \"auto\" within 10% of the best: {sum(p['ratio'] <= 1.10 for p in picks)}/{len(picks)}")
        if tuned:
            out.append(f"  autotune within 10% of the best: {sum(p['tuned_ratio'] <= 1.10 for p in picks)}/{len(picks)}")
    for name, times in compiled.items():
        if times:
            out.append(f"\n{name} JIT compile time: {sum(times.values()):.2f} s total over {len(times)} kernels "
                       "(excluded from the timings: it happens in the warm-up call)")
            out += [f"  {kernel:<48} {sec:.2f} s" for kernel, sec in sorted(times.items(), key=lambda kv: -kv[1])[:8]]
    return "\n".join(out)


def plot(rows: list[dict[str, Any]], path: str) -> None:
    """Bar chart of the speed-up vs PyTorch of each backend's "auto" pick, per layer, one panel per pass."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in rows if r["speedup"].get("torch") is not None and r["auto_pick"] in (True, None)]
    passes = [p for p in suite.ALL_PASSES if any(r["pass"] == p for r in rows)]
    if not passes:
        raise ValueError("nothing to plot: no fastconv row has a PyTorch comparison")
    impls = sorted({r["impl"] for r in rows})
    fig, axes = plt.subplots(len(passes), 1, figsize=(12, 3.2 * len(passes)), squeeze=False)
    for ax, pass_ in zip(axes[:, 0], passes):
        layers = list(dict.fromkeys(r["layer"] for r in rows if r["pass"] == pass_))
        width = 0.8 / max(1, len(impls))
        for j, impl in enumerate(impls):
            values = {r["layer"]: r["speedup"]["torch"] for r in rows if r["pass"] == pass_ and r["impl"] == impl}
            xs = [i + (j - (len(impls) - 1) / 2) * width for i, l in enumerate(layers) if l in values]
            ax.bar(xs, [values[l] for l in layers if l in values], width, label=impl)
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_yscale("log")
        ax.set_xticks(range(len(layers)), layers, rotation=30, ha="right", fontsize=8)
        ax.set_ylabel("speed-up vs PyTorch")
        ax.set_title(pass_)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------- command line


def _names(text: str | None, known: Iterable[str], what: str) -> list[str] | None:
    if text is None:
        return None
    names = [t.strip() for t in text.split(",") if t.strip()]
    bad = [n for n in names if n not in known]
    if bad:
        raise SystemExit(f"fastconv bench: unknown {what} {', '.join(bad)}; choose from {', '.join(known)}")
    return names


def add_arguments(parser: argparse.ArgumentParser) -> None:
    groups = "conv, pool, corr2d"
    parser.add_argument("--backends", help="comma-separated fastconv backends (default: every available one)")
    parser.add_argument("--layers", help=f"comma-separated layer names or groups ({groups}); default: all")
    parser.add_argument("--passes", help="comma-separated passes: " + ", ".join(suite.ALL_PASSES))
    parser.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    parser.add_argument("--threads", type=_positive, help="thread count for fastconv, BLAS and PyTorch")
    parser.add_argument("--quick", action="store_true", help="batch N/4 and few repeats (about a minute)")
    parser.add_argument("--batch", type=_positive, metavar="N",
                        help="time every layer at batch N instead of the suite's (1: single-image inference)")
    parser.add_argument("--no-compare", action="store_true", help="skip PyTorch and SciPy")
    parser.add_argument("--autotune", action="store_true",
                        help="also report what the autotuner (fastconv.set_autotune) picks per layer")
    parser.add_argument("--json", metavar="FILE", help="write machine-readable results (see fastconv.benchmark)")
    parser.add_argument("--plot", metavar="FILE", help="bar chart of the speed-up vs PyTorch (PNG)")


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _select_cases(layers: list[str] | None) -> list[suite.Case]:
    if layers is None:
        return list(suite.CASES)
    chosen = []
    for name in layers:
        chosen += [c for c in suite.CASES if c.kind == name] if name in ("conv", "pool", "corr2d") \
            else [suite.CASES_BY_NAME[name]]
    return list(dict.fromkeys(chosen))


def run(args: argparse.Namespace) -> int:
    """Run the benchmark described by ``args`` (see :func:`add_arguments`); print the table."""
    if not args.no_compare and suite.baseline_available("torch"):
        # PyTorch first, as a user who has it would: its libgomp then serves fastconv's kernels
        # too, and reads the environment as importing fastconv left it (``fastconv._config.
        # default_openmp_wait``: a short spin, unless the user chose a wait policy), so both run
        # with the same idle workers.
        import torch  # noqa: F401
    import fastconv
    from . import _dispatch

    started = time.perf_counter()
    kept = suite.keep_freed_memory()
    available = fastconv.available_backends()
    usable = [n for n, i in available.items() if i["available"]]
    names = _names(args.backends, list(_dispatch.REGISTRY), "backend") or usable
    missing = [n for n in names if n not in usable]
    if missing:
        print("fastconv bench: skipping unavailable backends: "
              + "; ".join(f"{n} ({available[n]['reason']})" for n in missing), file=sys.stderr)
    backends = {n: _dispatch._load(n) for n in names if n in usable}
    if not backends:
        print("fastconv bench: no backend to time", file=sys.stderr)
        return 2
    cases = _select_cases(_names(args.layers, [c.name for c in suite.CASES] + ["conv", "pool", "corr2d"], "layer"))
    passes = _names(args.passes, suite.ALL_PASSES, "pass") or list(suite.ALL_PASSES)
    dtype = np.dtype(args.dtype)
    if args.threads is not None:
        fastconv.set_num_threads(args.threads)
    threads = fastconv.get_num_threads()
    baselines = [] if args.no_compare else [b for b in ("torch", "scipy.signal", "scipy.ndimage")
                                            if suite.baseline_available(b)]
    if "torch" in baselines:
        import torch

        torch.set_num_threads(threads)
    divisor = 4 if args.quick and args.batch is None else 1

    print(f"fastconv bench  fastconv {fastconv.__version__}  numpy {np.__version__}  dtype {dtype}  "
          f"threads {threads}" + (f"  BATCH {args.batch} for every layer" if args.batch is not None else "")
          + ("  QUICK: few repeats" + ("" if args.batch is not None else ", batch N/4") if args.quick else ""))
    cpu = cpu_info()
    print(f"cpu: {cpu['model']} ({cpu['usable_cpus']} usable of {cpu['logical_cpus']} logical CPUs)")
    print("malloc: freed memory kept for reuse (no page faults on per-call outputs)" if kept else
          "malloc: not glibc, left as it is (large per-call outputs may be page-faulted in on every call)")
    print(f"openmp: {_config.openmp_wait()} (how idle workers wait; libgomp read it when it loaded)")
    if cpu["load_average"] and cpu["load_average"][0] > 0.5 * (cpu["usable_cpus"] or 1):
        print(f"WARNING: load average {cpu['load_average'][0]:.1f} on {cpu['usable_cpus']} CPUs: other work is "
              "running, timings will be noisy")
    peaks = {"gemm_size": 2048, "copy_bytes": (64 if args.quick else 256) * 2**20}
    peaks["gemm_gflops"] = gemm_peak(dtype, peaks["gemm_size"], repeats=3 if args.quick else 5)
    peaks["copy_gbps"] = copy_bandwidth(peaks["copy_bytes"], repeats=3 if args.quick else 5)
    gemm = "sgemm" if dtype == np.float32 else "dgemm"
    print(f"machine: {gemm} peak {peaks['gemm_gflops']:.1f} GFLOP/s (numpy.matmul {peaks['gemm_size']}^2), "
          f"copy bandwidth {peaks['copy_gbps']:.1f} GB/s (numpy.copyto, read + write)")

    jobs = plan(cases, passes, backends, baselines, dtype, divisor, args.quick, args.batch)
    rows = _rows(jobs, dtype, peaks)
    compare = [n for n in ("reference", "numpy") if n in backends] + baselines
    add_speedups(rows, compare)
    picks = auto_picks(rows)
    if args.autotune:
        add_tuned_picks(picks, backends, dtype, divisor, args.batch)
    compiled = compile_seconds(backends)

    print()
    print(format_table(rows, compare))
    print()
    notes = [("ms = median of the timed runs after one warm-up call" if args.quick else
              "ms = median of the fastest of 3 rounds (a layer's implementations take turns), each after a "
              "warm-up call") + "; rate = GFLOP/s (2*N*K*Ho*Wo*(C/groups)*R*S) "
             f"or GB/s; %peak = of the {gemm} peak or of the copy bandwidth",
             "x name = that implementation's time / this row's time (> 1: this row is faster); "
             "* = the algorithm \"auto\" picks"]
    if "reference" in backends:
        notes.append("reference (n=1)~ : timed on one image, scaled by N (speed-ups vs it marked ~)")
    if args.batch is not None:
        notes.append(f"--batch: every layer at batch N={args.batch}, not the suite's")
    if args.quick:
        notes.append("--quick: few repeats; numbers are rougher"
                     + ("" if args.batch is not None else "; every batch N is N/4 (at least 1)"))
    print("\n".join("note: " + n for n in notes))
    print()
    print(format_best(rows))
    print(format_summary(picks, compiled, args.autotune))
    print(f"\ntotal wall time {time.perf_counter() - started:.1f} s")

    doc = {
        "schema": SCHEMA_ID,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "quick": bool(args.quick), "batch_divisor": divisor,
        "settings": {"dtype": dtype.name, "threads": threads, "backends": list(backends),
                     "layers": [c.name for c in cases], "passes": passes, "baselines": baselines,
                     "keep_freed_memory": kept, "batch": args.batch},
        "versions": versions(), "cpu": cpu, "peaks": peaks,
        "backends": {n: {"available": i["available"], "reason": i["reason"], "algorithms": list(i["algorithms"])}
                     for n, i in available.items()},
        "compile_seconds": compiled, "results": rows, "auto_picks": picks,
    }
    errors = validate(doc)
    if errors:  # a bug in this module, never the user's fault: say so loudly
        print("fastconv bench: internal error, JSON output does not match its schema:\n  " + "\n  ".join(errors[:10]),
              file=sys.stderr)
        return 3
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(doc, f, indent=1)
        print(f"wrote {args.json}")
    if args.plot:
        try:
            plot(rows, args.plot)
            print(f"wrote {args.plot}")
        except ValueError as exc:
            print(f"fastconv bench: no plot: {exc}", file=sys.stderr)
    return 1 if any(r["error"] for r in rows) else 0


def _progress(items: list[Any], desc: str = "bench"):
    """Iterate ``items`` (lists of jobs of one layer and pass, or auto picks) with a tqdm bar on
    stderr (plain iteration without tqdm)."""
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover - tqdm is a dependency
        yield from items
        return
    with tqdm(items, desc=desc, file=sys.stderr, unit="case", leave=False, dynamic_ncols=True) as bar:
        for item in bar:
            if isinstance(item, list):
                bar.set_postfix_str(f"{item[0].case.name} {item[0].pass_}: {len(item)} implementations")
            else:
                bar.set_postfix_str(f"{item['layer']} {item['pass']} {item['backend']}")
            yield item
