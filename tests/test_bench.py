"""``fastconv bench`` and the benchmark layer suite (never asserts speed, only structure)."""

from __future__ import annotations

import json
import subprocess
import sys
import types

import numpy as np
import pytest

from fastconv import _bench_suite as suite
from fastconv import benchmark, cli


@pytest.fixture(autouse=True)
def _process_malloc_left_alone(monkeypatch):
    """The runs below would set this test process's malloc to keep freed memory for good
    (``keep_freed_memory`` is process-wide); its effect is tested in a subprocess instead."""
    monkeypatch.setattr(suite, "keep_freed_memory", lambda: False)


_MALLINFO = """
import ctypes, sys
from fastconv._bench_suite import keep_freed_memory
libc = ctypes.CDLL("libc.so.6")
fields = "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()
class Info(ctypes.Structure):
    _fields_ = [(f, ctypes.c_size_t) for f in fields]
try:
    libc.mallinfo2.restype = Info
except AttributeError:
    sys.exit(3)  # glibc before 2.33
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes = [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
def mapped_by_64_mib():  # bytes of malloc's mmap-ed blocks that one 64 MiB allocation adds
    before = libc.mallinfo2().hblkhd
    block = libc.malloc(64 << 20)
    grew = libc.mallinfo2().hblkhd - before
    libc.free(block)
    return grew
default = mapped_by_64_mib()
kept = keep_freed_memory()
print(default, kept, mapped_by_64_mib())
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_keep_freed_memory_serves_large_blocks_from_the_heap():
    """By default a 64 MiB block is mmap-ed (and unmapped on free: page faults on every
    allocation); after keep_freed_memory it comes from the heap, which keeps it on free."""
    proc = subprocess.run([sys.executable, "-c", _MALLINFO], capture_output=True, text=True, timeout=120)
    if proc.returncode == 3 or "libc.so.6" in proc.stderr:
        pytest.skip("not glibc >= 2.33 (no mallinfo2)")
    assert proc.returncode == 0, proc.stderr
    default, kept, after = proc.stdout.split()
    assert int(default) >= 64 << 20 and kept == "True" and int(after) == 0

# --------------------------------------------------------------------------- the suite


def test_suite_is_the_design_table():
    names = [c.name for c in suite.CASES]
    assert names == ["stripe-c1", "stripe-c2", "mnist-c1", "mnist-c2", "cifar-64", "vgg-224", "resnet-stem",
                     "pw-1x1", "dw-3x3", "dilated", "maxpool-2x2", "maxpool-3x3s2", "avgpool-2x2",
                     "corr2d-3x3", "corr2d-7x7"]
    stem = suite.CASES_BY_NAME["resnet-stem"].geometry()
    assert stem.output_shape == (8, 64, 112, 112)
    # 2*N*K*Ho*Wo*(C/groups)*R*S written out by hand
    assert suite.work(suite.CASES_BY_NAME["vgg-224"], "forward") == ("flop", 2 * 8 * 64 * 224 * 224 * 3 * 3 * 3)
    assert suite.work(suite.CASES_BY_NAME["dw-3x3"], "backward-weight") == ("flop", 2 * 32 * 128 * 56 * 56 * 1 * 9)
    assert suite.work(suite.CASES_BY_NAME["dilated"], "forward")[1] == 2 * 16 * 64 * 56 * 56 * 64 * 9
    # max 3x3/2 pad 1 on 8x64x112x112: float32 in + out, int64 indices
    unit, nbytes = suite.work(suite.CASES_BY_NAME["maxpool-3x3s2"], "forward")
    assert (unit, nbytes) == ("byte", 4 * 8 * 64 * 112 * 112 + (4 + 8) * 8 * 64 * 56 * 56)


def test_make_call_rejects_what_a_case_does_not_have():
    with pytest.raises(ValueError):
        suite.make_call(suite.CASES_BY_NAME["maxpool-2x2"], "backward-input", "numpy")
    with pytest.raises(ValueError):
        suite.make_call(suite.CASES_BY_NAME["stripe-c1"], "forward", "scipy.signal")


@pytest.mark.parametrize("case", suite.CASES, ids=lambda c: c.name)
def test_every_implementation_computes_the_same_thing(case):
    """The timed callables must do the same work: compare them on a batch of one."""
    torch = pytest.importorskip("torch")
    torch.set_num_threads(1)
    small = case.with_batch(1)
    impls = ["numpy", "torch"] + (["scipy.signal", "scipy.ndimage"] if case.kind == "corr2d" else [])
    for pass_ in case.passes:
        outs = {}
        for impl in impls:
            out = suite.make_call(small, pass_, impl)()
            out = out[0] if isinstance(out, tuple) else out  # max-pool forward: (values, indices)
            outs[impl] = np.asarray(out, dtype=np.float64).ravel()
        ref = outs.pop("numpy")
        for impl, out in outs.items():
            assert out.shape == ref.shape, (case.name, pass_, impl)
            assert np.linalg.norm(out - ref) <= 1e-5 * np.linalg.norm(ref), (case.name, pass_, impl)


# --------------------------------------------------------------------------- measuring and summaries


def test_measure_run_counts():
    calls = []
    fn = lambda: calls.append(1)  # noqa: E731
    t = benchmark.measure(fn, benchmark.Effort(warmup=2, min_runs=3, max_runs=9, budget=0.0))
    assert (t.runs, len(calls)) == (3, 5) and t.first is not None and t.minimum <= t.median
    calls.clear()
    t = benchmark.measure(fn, benchmark.Effort(warmup=0, min_runs=1, max_runs=7, budget=1e9))
    assert (t.runs, len(calls), t.first) == (7, 7, None)


def test_measure_rounds_take_turns_and_keep_the_fastest_round(monkeypatch):
    """Implementations alternate round by round; one slowed in a single round (a noisy moment)
    reports its other rounds; one with fewer rounds is built fewer times; a failure is returned
    in its place and does not stop the others.  (A fake clock: each call "takes" its delay.)"""
    now = [0.0]
    monkeypatch.setattr(benchmark, "time", types.SimpleNamespace(perf_counter=lambda: now[0]))
    order = []

    def maker(name, delays):
        def make():
            order.append(name)
            delay = delays[min(order.count(name), len(delays)) - 1]
            return lambda: now.__setitem__(0, now[0] + delay)
        return make

    def broken():
        order.append("broken")
        raise RuntimeError("no such kernel")

    full = benchmark.Effort(warmup=1, min_runs=2, max_runs=2, budget=0.0, rounds=3)
    once = benchmark.Effort(warmup=0, min_runs=1, max_runs=1, budget=0.0, rounds=1)
    slow_then_fast, steady, single, failed = benchmark.measure_rounds(
        [maker("a", [20.0, 1.0, 1.0]), maker("b", [3.0]), maker("c", [2.0]), broken], [full, full, once, full])
    assert order == ["a", "b", "c", "broken", "a", "b", "a", "b"]
    assert (slow_then_fast.median, slow_then_fast.minimum, slow_then_fast.runs, slow_then_fast.first) == (1, 1, 6, 20)
    assert (steady.median, steady.runs) == (3, 6)
    assert (single.median, single.runs, single.first) == (2, 1, None)
    assert isinstance(failed, RuntimeError)


def _row(impl, algo, auto, ms, layer="cifar-64", pass_="forward"):
    return {"layer": layer, "kind": "conv", "pass": pass_, "impl": impl, "algorithm": algo, "auto_pick": auto,
            "ms": ms, "speedup": {}, "estimated": False, "error": None}


def test_speedups_and_auto_picks():
    rows = [_row("cython", "direct", False, 2.0), _row("cython", "im2col", True, 4.0),
            _row("numpy", "im2col", True, 8.0), _row("torch", None, None, 1.0), _row("reference", None, None, 400.0)]
    benchmark.add_speedups(rows, ["reference", "numpy", "torch"])
    direct, im2col, numpy_row = rows[0]["speedup"], rows[1]["speedup"], rows[2]["speedup"]
    assert direct == {"reference": 200.0, "numpy": 4.0, "torch": 0.5}
    assert im2col == {"reference": 100.0, "numpy": 2.0, "torch": 0.25}
    assert numpy_row == {"reference": 50.0, "torch": 0.125}
    assert rows[3]["speedup"] == {} and rows[4]["speedup"] == {}
    picks = benchmark.auto_picks(rows)
    assert picks == [{"backend": "cython", "layer": "cifar-64", "pass": "forward", "auto": "im2col",
                      "best": "direct", "auto_ms": 4.0, "best_ms": 2.0, "ratio": 2.0,
                      "times_ms": {"direct": 2.0, "im2col": 4.0}, "tuned": None, "tuned_ratio": None}]


def test_validator_reports_violations():
    schema = benchmark.JSON_SCHEMA
    assert benchmark.validate({}, schema)  # everything missing
    assert any("quick" in e for e in benchmark.validate({"quick": "yes"}, schema))
    row_schema = schema["properties"]["results"]["items"]
    assert any("kind" in e for e in benchmark.validate({"kind": "fft"}, row_schema))
    assert any("n" in e for e in benchmark.validate({"n": 0}, row_schema))
    assert any("ms" in e for e in benchmark.validate({"ms": True}, row_schema))


def test_schema_is_valid_json_schema():
    jsonschema = pytest.importorskip("jsonschema")
    jsonschema.Draft7Validator.check_schema(benchmark.JSON_SCHEMA)


# --------------------------------------------------------------------------- the command


def test_quick_bench_end_to_end(tmp_path, capsys):
    out_json, out_png = tmp_path / "bench.json", tmp_path / "bench.png"
    rc = cli.main(["bench", "--quick", "--layers", "stripe-c1,maxpool-2x2", "--backends", "numpy,reference",
                   "--json", str(out_json), "--plot", str(out_png)])
    text = capsys.readouterr().out
    assert rc == 0, text
    assert "QUICK" in text and "sgemm peak" in text and "x ref" in text and "stripe-c1" in text
    doc = json.loads(out_json.read_text())
    assert benchmark.validate(doc) == []
    try:
        import jsonschema
    except ImportError:
        pass
    else:
        jsonschema.validate(doc, benchmark.JSON_SCHEMA)
    assert doc["quick"] is True and doc["batch_divisor"] == 4
    assert doc["peaks"]["gemm_gflops"] > 0 and doc["peaks"]["copy_gbps"] > 0
    rows = {(r["layer"], r["pass"], r["impl"]): r for r in doc["results"]}
    for pass_ in suite.CONV_PASSES:
        numpy_row, ref_row = rows[("stripe-c1", pass_, "numpy")], rows[("stripe-c1", pass_, "reference")]
        assert numpy_row["error"] is None and numpy_row["ms"] > 0 and numpy_row["n"] == 100
        assert ref_row["estimated"] is True and ref_row["n"] == 1
        assert numpy_row["speedup"]["reference"] == pytest.approx(ref_row["ms"] / numpy_row["ms"])
        assert numpy_row["rate_unit"] == "GFLOP/s"
    for pass_ in suite.POOL_PASSES:
        assert rows[("maxpool-2x2", pass_, "numpy")]["rate_unit"] == "GB/s"
    if "torch" in doc["settings"]["baselines"]:
        assert rows[("stripe-c1", "forward", "torch")]["ms"] > 0
        assert out_png.stat().st_size > 0


def test_bench_at_a_batch_of_choice(tmp_path, capsys):
    """``--batch N`` times every layer at batch N (here with ``--quick``, which then only cuts
    the repeats) and records it; a non-positive batch is refused."""
    out_json = tmp_path / "bench.json"
    rc = cli.main(["bench", "--quick", "--batch", "3", "--layers", "stripe-c2,maxpool-2x2", "--passes", "forward",
                   "--backends", "numpy", "--no-compare", "--json", str(out_json)])
    text = capsys.readouterr().out
    assert rc == 0, text
    assert "BATCH 3 for every layer" in text and "batch N=3" in text
    doc = json.loads(out_json.read_text())
    assert benchmark.validate(doc) == [] and doc["settings"]["batch"] == 3 and doc["batch_divisor"] == 1
    assert {(r["layer"], r["n"]) for r in doc["results"]} == {("stripe-c2", 3), ("maxpool-2x2", 3)}
    assert benchmark.validate({**doc, "settings": {**doc["settings"], "batch": 0}}) != []
    with pytest.raises(SystemExit):
        cli.main(["bench", "--batch", "0"])
    assert "must be a positive integer" in capsys.readouterr().err


def test_quick_bench_with_autotune(tmp_path, capsys):
    import fastconv

    multi = [n for n, i in fastconv.available_backends().items()
             if i["available"] and len(i["algorithms"]) > 1 and n != "cuda"]
    if not multi:
        pytest.skip("no available backend has more than one algorithm")
    out_json = tmp_path / "bench.json"
    rc = cli.main(["bench", "--quick", "--layers", "stripe-c2", "--passes", "forward,backward-weight",
                   "--backends", multi[0], "--no-compare", "--autotune", "--json", str(out_json)])
    text = capsys.readouterr().out
    assert rc == 0, text
    doc = json.loads(out_json.read_text())
    assert benchmark.validate(doc) == [] and doc["settings"]["baselines"] == []
    picks = doc["auto_picks"]
    assert {(p["layer"], p["pass"]) for p in picks} == {("stripe-c2", "forward"), ("stripe-c2", "backward-weight")}
    for p in picks:
        assert p["tuned"] in p["times_ms"] and p["auto"] in p["times_ms"]
        assert p["tuned_ratio"] == pytest.approx(p["times_ms"][p["tuned"]] / p["best_ms"])
        assert p["ratio"] >= 1.0 and p["tuned_ratio"] >= 1.0
    assert "autotune within 10% of the best" in text


def test_bench_rejects_unknown_names():
    with pytest.raises(SystemExit):
        cli.main(["bench", "--layers", "no-such-layer"])
    with pytest.raises(SystemExit):
        cli.main(["bench", "--backends", "nope"])


def test_deep_layers_script_interleaves_the_implementations():
    """bench/deep_layers.py: ``compare`` times every implementation on one pass, in turns, and
    returns a median per implementation (here without PyTorch: two fastconv backends)."""
    import importlib.util
    from pathlib import Path

    import fastconv

    path = Path(__file__).resolve().parent.parent / "bench" / "deep_layers.py"
    spec = importlib.util.spec_from_file_location("deep_layers", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    impls = [b for b in ("numpy", "cython", "numba") if fastconv.available_backends()[b]["available"]][:2]
    case = suite.ConvCase("t", 1, 8, 8, 8, 3)
    for pass_ in suite.CONV_PASSES:
        medians = module.compare(case, pass_, impls, seconds=0.01)
        assert set(medians) == set(impls) and all(0 < m < 1 for m in medians.values())
    assert [c for c, _ in module.STAGES] == [64, 128, 256, 512]
