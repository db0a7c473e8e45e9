"""The algorithm autotuner (fastconv._autotune): caching, keys, the disk cache, results.

A fake backend with two algorithms that compute the reference result and advance
a fake clock by a fixed cost per call makes the choice deterministic and lets the
tests count every kernel call the tuner makes.
"""

from __future__ import annotations

import json
import types
from collections import Counter

import numpy as np
import pytest

import fastconv
from fastconv import _autotune, _dispatch
from fastconv._args import ConvGeometry
from fastconv.backends.base import Backend
from fastconv.backends.reference import ReferenceBackend

OPS = ("conv2d", "conv2d_backward_input", "conv2d_backward_weight")


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def perf_counter(self) -> float:
        return self.now


class FakeBackend(Backend):
    """Two algorithms giving the reference result; ``cost[algo]`` fake seconds per call."""

    name = "fake"
    algorithms = ("slow", "fast")

    def __init__(self, clock: FakeClock, cost: dict[str, float] | None = None, broken: tuple[str, ...] = ()):
        self.clock, self.cost, self.broken = clock, cost or {"slow": 5.0, "fast": 1.0}, broken
        self.calls: Counter = Counter()
        self.ref = ReferenceBackend()

    def _tick(self, algorithm: str) -> None:
        self.calls[algorithm] += 1
        if algorithm in self.broken:
            raise NotImplementedError(f"{algorithm} cannot do this shape")
        self.clock.now += self.cost[algorithm]

    def conv2d(self, x, weight, bias, g, algorithm):
        self._tick(algorithm)
        return self.ref.conv2d(x, weight, bias, g, "direct")

    def conv2d_backward_input(self, grad_out, weight, g, algorithm):
        self._tick(algorithm)
        return self.ref.conv2d_backward_input(grad_out, weight, g, "direct")

    def conv2d_backward_weight(self, grad_out, x, g, algorithm):
        self._tick(algorithm)
        return self.ref.conv2d_backward_weight(grad_out, x, g, "direct")

    def default_algorithm(self, op, g):
        return "slow"


def geometry(**changes) -> ConvGeometry:
    base = dict(n=2, c=4, h=9, w=8, k=6, r=3, s=3, stride=(1, 1), padding=(1, 1, 1, 1), dilation=(1, 1),
                groups=1, dtype=np.dtype(np.float32))
    base.update(changes)
    return ConvGeometry(**base)


@pytest.fixture(autouse=True)
def fresh_tuner(monkeypatch):
    """Empty cache, memory-only unless a test says otherwise, no env influence, fake clock."""
    monkeypatch.delenv("FASTCONV_AUTOTUNE_CACHE", raising=False)
    monkeypatch.setitem(_autotune._path, "value", None)
    monkeypatch.setitem(_autotune._path, "explicit", False)
    _autotune.clear_cache()
    yield
    _autotune.clear_cache()


@pytest.fixture
def clock(monkeypatch) -> FakeClock:
    c = FakeClock()
    monkeypatch.setattr(_autotune, "time", types.SimpleNamespace(perf_counter=c.perf_counter))
    return c


# --------------------------------------------------------------------------- choice and caching


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("cost, winner", [({"slow": 5.0, "fast": 1.0}, "fast"),
                                          ({"slow": 1.0, "fast": 5.0}, "slow")])
def test_picks_the_fastest(clock, op, cost, winner):
    backend = FakeBackend(clock, cost)
    assert _autotune.choose(backend, op, geometry()) == winner
    entry = _autotune.cache_info()["entries"][_autotune.make_key(backend, op, geometry())]
    assert entry["algorithm"] == winner
    assert set(entry["times_ms"]) == {"slow", "fast"}


def test_miss_then_hit_counts_timing_calls(clock):
    backend = FakeBackend(clock)
    g = geometry()
    assert _autotune.choose(backend, "conv2d", g) == "fast"
    per_algo = 1 + _autotune.REPEATS  # warm-up + timed runs
    assert backend.calls == {"slow": per_algo, "fast": per_algo}
    for _ in range(3):
        assert _autotune.choose(backend, "conv2d", g) == "fast"
    assert backend.calls == {"slow": per_algo, "fast": per_algo}  # no more kernel calls
    info = _autotune.cache_info()
    assert (info["misses"], info["hits"], info["tunings"], info["size"]) == (1, 3, 1, 1)
    assert info["timed_runs"] == 2 * per_algo
    assert info["path"] is None


def test_new_geometry_is_tuned_again(clock):
    backend = FakeBackend(clock)
    _autotune.choose(backend, "conv2d", geometry())
    _autotune.choose(backend, "conv2d", geometry(stride=(2, 2)))
    _autotune.choose(backend, "conv2d_backward_input", geometry())
    assert _autotune.cache_info()["tunings"] == 3


def test_keys_separate_everything_that_matters():
    backend = FakeBackend(FakeClock())
    g = geometry()
    variants = [
        geometry(stride=(2, 1)), geometry(stride=(1, 2)), geometry(dtype=np.dtype(np.float64)),
        geometry(padding=(0, 0, 0, 0)), geometry(padding=(1, 2, 1, 1)), geometry(dilation=(2, 2)),
        geometry(groups=2, k=6), geometry(n=3), geometry(c=8), geometry(h=10), geometry(w=9),
        geometry(k=7), geometry(r=5), geometry(s=1),
    ]
    keys = {_autotune.make_key(backend, "conv2d", v) for v in variants}
    keys |= {_autotune.make_key(backend, op, g) for op in OPS}
    assert len(keys) == len(variants) + len(OPS)
    other = FakeBackend(FakeClock())
    other.name = "fake2"
    assert _autotune.make_key(other, "conv2d", g) != _autotune.make_key(backend, "conv2d", g)
    before = fastconv.get_num_threads()
    try:
        fastconv.set_num_threads(before + 1)
        threaded = _autotune.make_key(backend, "conv2d", g)
    finally:
        fastconv.set_num_threads(before)
    assert threaded != _autotune.make_key(backend, "conv2d", g)
    assert _autotune.make_key(backend, "conv2d", g) == _autotune.make_key(backend, "conv2d", geometry())


def test_failing_algorithms_are_skipped(clock):
    backend = FakeBackend(clock, broken=("fast",))
    assert _autotune.choose(backend, "conv2d", geometry()) == "slow"
    everything_broken = FakeBackend(clock, broken=("slow", "fast"))
    everything_broken.name = "broken"
    assert _autotune.choose(everything_broken, "conv2d", geometry()) == "slow"  # its default_algorithm


def test_tuning_batch_is_bounded(clock, monkeypatch):
    seen = []
    backend = FakeBackend(clock)
    original = backend.conv2d

    def recording(x, weight, bias, g, algorithm):
        seen.append(x.shape[0])
        return original(x, weight, bias, g, algorithm)

    backend.conv2d = recording
    monkeypatch.setattr(fastconv._config, "get_workspace_limit", lambda: 1)
    _autotune.choose(backend, "conv2d", geometry(n=50))
    assert set(seen) == {min(50, fastconv.get_num_threads())}


# --------------------------------------------------------------------------- disk cache


def test_disk_cache_round_trip(clock, tmp_path):
    path = tmp_path / "sub" / "autotune.json"
    _autotune.set_cache_path(path)
    backend = FakeBackend(clock)
    assert _autotune.choose(backend, "conv2d", geometry()) == "fast"
    doc = json.loads(path.read_text())
    key = _autotune.make_key(backend, "conv2d", geometry())
    assert doc["format"] == _autotune.FORMAT and doc["entries"][key]["algorithm"] == "fast"

    _autotune.clear_cache()  # a new process: memory empty, file present
    fresh = FakeBackend(clock)
    assert _autotune.choose(fresh, "conv2d", geometry()) == "fast"
    assert sum(fresh.calls.values()) == 0
    info = _autotune.cache_info()
    assert (info["disk_hits"], info["tunings"], info["path"]) == (1, 0, str(path))


@pytest.mark.parametrize("content", ["{not json", "", "[1, 2]", '{"format": 999, "entries": {}}',
                                     '{"format": 1, "entries": []}', "\x00\xff garbage"])
def test_corrupt_cache_file_is_ignored_and_rewritten(clock, tmp_path, content):
    path = tmp_path / "autotune.json"
    path.write_text(content, encoding="latin-1")
    _autotune.set_cache_path(path)
    backend = FakeBackend(clock)
    assert _autotune.choose(backend, "conv2d", geometry()) == "fast"
    assert _autotune.cache_info()["tunings"] == 1
    doc = json.loads(path.read_text())
    assert doc["entries"][_autotune.make_key(backend, "conv2d", geometry())]["algorithm"] == "fast"


def test_writes_merge_with_other_writers(clock, tmp_path):
    path = tmp_path / "autotune.json"
    _autotune.set_cache_path(path)
    backend = FakeBackend(clock)
    _autotune.choose(backend, "conv2d", geometry())
    # another process adds an entry meanwhile
    doc = json.loads(path.read_text())
    doc["entries"]["other|key"] = {"algorithm": "slow", "times_ms": {}}
    path.write_text(json.dumps(doc))
    _autotune.choose(backend, "conv2d", geometry(stride=(2, 2)))
    entries = json.loads(path.read_text())["entries"]
    assert "other|key" in entries and len(entries) == 3
    assert not [p for p in tmp_path.iterdir() if p.name != "autotune.json"]  # no temporary files left


def test_cache_path_from_environment(monkeypatch, tmp_path):
    assert _autotune.get_cache_path() is None
    monkeypatch.setenv("FASTCONV_AUTOTUNE_CACHE", str(tmp_path / "x.json"))
    assert _autotune.get_cache_path() == tmp_path / "x.json"
    monkeypatch.setenv("FASTCONV_AUTOTUNE_CACHE", "1")
    monkeypatch.setenv("FASTCONV_CACHE_DIR", str(tmp_path / "cache"))
    assert _autotune.get_cache_path() == tmp_path / "cache" / "autotune.json"
    monkeypatch.setenv("FASTCONV_AUTOTUNE_CACHE", "0")
    assert _autotune.get_cache_path() is None
    _autotune.set_cache_path(True)  # explicit setting wins over the environment
    assert _autotune.get_cache_path() == tmp_path / "cache" / "autotune.json"
    _autotune.set_cache_path(None)
    assert _autotune.get_cache_path() is None
    with pytest.raises(TypeError):
        _autotune.set_cache_path(3)


def test_unwritable_cache_dir_does_not_break_choose(clock, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    _autotune.set_cache_path(blocker / "autotune.json")
    assert _autotune.choose(FakeBackend(clock), "conv2d", geometry()) == "fast"


# --------------------------------------------------------------------------- through the public API


@pytest.fixture
def autotune_on():
    fastconv.set_autotune(True)
    yield
    fastconv.set_autotune(False)


def _reference_case(seed: int = 0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((2, 4, 9, 8)).astype(np.float32)
    w = rng.standard_normal((6, 2, 3, 2)).astype(np.float32)
    kwargs = dict(stride=(2, 1), padding=1, dilation=(1, 2), groups=2)
    y = fastconv.conv2d(x, w, **kwargs, backend="reference")
    gy = rng.standard_normal(y.shape).astype(np.float32)
    grads = fastconv.conv2d_backward(gy, x, w, **kwargs, need_bias=False, backend="reference")
    return x, w, gy, kwargs, y, grads


def _relerr(a, b) -> float:
    return float(np.linalg.norm(a.astype(np.float64) - b) / np.linalg.norm(b))


def test_public_api_uses_the_tuned_choice(clock, monkeypatch, autotune_on):
    x, w, gy, kwargs, y, grads = _reference_case()  # computed before the fake is patched in
    backend = FakeBackend(clock)
    monkeypatch.setattr(_dispatch, "resolve", lambda name, func, on_device=False: backend)
    out = fastconv.conv2d(x, w, **kwargs)
    got = fastconv.conv2d_backward(gy, x, w, **kwargs, need_bias=False)
    assert _relerr(out, y) <= 1e-5
    assert _relerr(got.input, grads.input) <= 1e-5 and _relerr(got.weight, grads.weight) <= 1e-5
    assert _autotune.cache_info()["tunings"] == 3
    backend.calls.clear()
    fastconv.conv2d(x, w, **kwargs)  # cached: exactly one call, with the winner
    assert backend.calls == {"fast": 1}


def test_autotune_off_uses_the_heuristic(clock, monkeypatch):
    x, w, _, kwargs, *_ = _reference_case()
    backend = FakeBackend(clock)
    monkeypatch.setattr(_dispatch, "resolve", lambda name, func, on_device=False: backend)
    fastconv.conv2d(x, w, **kwargs)
    assert backend.calls == {"slow": 1} and _autotune.cache_info()["misses"] == 0


def _multi_algorithm_backends() -> list[str]:
    return [name for name, info in fastconv.available_backends().items()
            if info["available"] and len(info["algorithms"]) > 1 and not _dispatch._load(name).device]


@pytest.mark.parametrize("name", _multi_algorithm_backends() or [pytest.param("none", marks=pytest.mark.skip(
    reason="no available backend has more than one algorithm yet"))])
def test_real_backend_tuned_result_matches_reference(name, autotune_on):
    x, w, gy, kwargs, y, grads = _reference_case(1)
    out = fastconv.conv2d(x, w, **kwargs, backend=name)
    got = fastconv.conv2d_backward(gy, x, w, **kwargs, need_bias=False, backend=name)
    assert _relerr(out, y) <= 1e-5
    assert _relerr(got.input, grads.input) <= 1e-5 and _relerr(got.weight, grads.weight) <= 1e-5
    info = _autotune.cache_info()
    assert info["tunings"] == 3
    chosen = {v["algorithm"] for v in info["entries"].values()}
    assert chosen <= set(_dispatch._load(name).algorithms)
