"""The opt-in convolution algorithm autotuner (``fastconv.set_autotune(True)``).

When autotuning is on and a backend offers more than one algorithm,
``algorithm="auto"`` calls :func:`choose`.  The first call for a given key --
(backend, op, dtype, shapes, stride, padding, dilation, groups, threads) -- times
every candidate algorithm on random inputs of that geometry and remembers the
fastest; later calls with the same key return the cached winner at once, like
``torch.backends.cudnn.benchmark``.

The cache lives in memory.  It is also kept on disk, as JSON, when a cache file
is configured: :func:`set_cache_path`, or the environment variable
``FASTCONV_AUTOTUNE_CACHE`` (``1``/``on``: the default path
:func:`default_cache_path`, i.e. ``$FASTCONV_CACHE_DIR/autotune.json`` or
``~/.cache/fastconv/autotune.json``; any other value: that file).  Writes merge
with what other processes wrote meanwhile and replace the file atomically
(temporary file + ``os.replace``), so concurrent writers never leave a torn file;
an unreadable or corrupt file is ignored and rewritten.

Timing runs on a batch bounded by the workspace limit (at least as many images as
threads), so tuning a huge call never allocates a huge input.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from . import _config
from ._args import ConvGeometry
from .backends.base import Backend

#: version of the on-disk format; files with another version are ignored (and rewritten)
FORMAT = 1
#: timed runs per candidate (after one untimed warm-up run); the minimum counts
REPEATS = 3

_lock = threading.RLock()  # guards the cache and the counters; held while tuning (timings must not overlap)
_cache: dict[str, dict[str, Any]] = {}
_stats = {"hits": 0, "misses": 0, "disk_hits": 0, "tunings": 0, "timed_runs": 0}
_path: dict[str, Any] = {"value": None, "explicit": False}


# --------------------------------------------------------------------------- configuration


def default_cache_path() -> Path:
    """``$FASTCONV_CACHE_DIR/autotune.json``, else ``$XDG_CACHE_HOME/fastconv/autotune.json``,
    else ``~/.cache/fastconv/autotune.json``."""
    base = os.environ.get("FASTCONV_CACHE_DIR", "").strip()
    if base:
        return Path(base).expanduser() / "autotune.json"
    xdg = os.environ.get("XDG_CACHE_HOME", "").strip()
    root = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return root / "fastconv" / "autotune.json"


def set_cache_path(path: str | os.PathLike | bool | None) -> None:
    """Keep the autotune cache on disk.

    Parameters
    ----------
    path : str, path-like, bool or None
        A JSON file; ``True`` for :func:`default_cache_path`; ``None`` or ``False``
        for memory only.  Overrides ``FASTCONV_AUTOTUNE_CACHE``.
    """
    if path is True:
        value: Path | None = default_cache_path()
    elif path is None or path is False:
        value = None
    elif isinstance(path, (str, os.PathLike)):
        value = Path(path).expanduser()
    else:
        raise TypeError(f"set_cache_path(): path must be a path, a bool or None, got {path!r}")
    with _lock:
        _path["value"], _path["explicit"] = value, True


def get_cache_path() -> Path | None:
    """The cache file in use, or None when the cache is memory-only."""
    with _lock:
        if _path["explicit"]:
            return _path["value"]
    env = os.environ.get("FASTCONV_AUTOTUNE_CACHE", "").strip()
    if env.lower() in ("", "0", "off", "false", "no"):
        return None
    if env.lower() in ("1", "on", "true", "yes"):
        return default_cache_path()
    return Path(env).expanduser()


def cache_info() -> dict[str, Any]:
    """Counters and contents of the in-memory cache (a copy).

    Returns
    -------
    dict
        ``hits`` (answered from memory), ``misses`` (not in memory), ``disk_hits``
        (misses answered from the cache file), ``tunings`` (keys timed),
        ``timed_runs`` (kernel calls made while timing), ``size``, ``path`` (the
        cache file or None) and ``entries`` (key -> {"algorithm", "times_ms"}).
    """
    with _lock:
        path = get_cache_path()
        return {**_stats, "size": len(_cache), "path": None if path is None else str(path),
                "entries": {k: dict(v) for k, v in _cache.items()}}


def clear_cache() -> None:
    """Forget the in-memory cache and reset the counters (the cache file is left alone)."""
    with _lock:
        _cache.clear()
        for k in _stats:
            _stats[k] = 0


# --------------------------------------------------------------------------- keys


def make_key(backend: Backend, op: str, g: ConvGeometry) -> str:
    """The cache key: everything that can change which algorithm is fastest."""
    top, bottom, left, right = g.padding
    return (f"{backend.name}|{op}|{np.dtype(g.dtype).name}|x{g.n}x{g.c}x{g.h}x{g.w}"
            f"|w{g.k}x{g.c_per_group}x{g.r}x{g.s}|s{g.stride[0]}x{g.stride[1]}"
            f"|p{top},{bottom},{left},{right}|d{g.dilation[0]}x{g.dilation[1]}|g{g.groups}"
            f"|t{_config.get_num_threads()}")


# --------------------------------------------------------------------------- disk


def _read(path: Path) -> dict[str, dict[str, Any]]:
    """Entries of a cache file; {} when it is missing, unreadable, corrupt or of another format."""
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError):
        return {}
    if not isinstance(doc, dict) or doc.get("format") != FORMAT or not isinstance(doc.get("entries"), dict):
        return {}
    return {k: v for k, v in doc["entries"].items()
            if isinstance(k, str) and isinstance(v, dict) and isinstance(v.get("algorithm"), str)}


def _write(path: Path, entries: dict[str, dict[str, Any]]) -> None:
    """Merge ``entries`` into the file (re-read just before writing) and replace it atomically."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        merged = {**_read(path), **entries}
        fd, tmp = tempfile.mkstemp(prefix=".autotune-", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump({"format": FORMAT, "entries": merged}, f, indent=1, sort_keys=True)
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
    except OSError:  # a read-only or full cache dir must never break a convolution
        pass


# --------------------------------------------------------------------------- timing


def _tuning_batch(g: ConvGeometry) -> int:
    """Images to time on: what fits input + output in the workspace limit, at least
    one per thread, at most the real batch."""
    itemsize = np.dtype(g.dtype).itemsize
    per_image = itemsize * (g.c * g.h * g.w + g.k * g.out_h * g.out_w)
    return min(g.n, max(_config.get_num_threads(), _config.get_workspace_limit() // max(1, per_image)))


def _runner(backend: Backend, op: str, g: ConvGeometry) -> Callable[[str], Any]:
    """A function running ``op`` with one algorithm on fixed random inputs of geometry ``g``."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal(g.input_shape, dtype=np.float64).astype(g.dtype)
    w = rng.standard_normal(g.weight_shape, dtype=np.float64).astype(g.dtype)
    gy = rng.standard_normal(g.output_shape, dtype=np.float64).astype(g.dtype)
    if op == "conv2d":
        return lambda algo: backend.conv2d(x, w, None, g, algo)
    if op == "conv2d_backward_input":
        return lambda algo: backend.conv2d_backward_input(gy, w, g, algo)
    if op == "conv2d_backward_weight":
        return lambda algo: backend.conv2d_backward_weight(gy, x, g, algo)
    raise ValueError(f"autotune: unknown op {op!r}")


def time_candidates(backend: Backend, op: str, g: ConvGeometry, repeats: int = REPEATS) -> dict[str, float]:
    """Seconds per call (best of ``repeats`` after a warm-up) of every algorithm of
    ``backend`` that runs on this geometry; algorithms that raise are left out."""
    tuning = g.with_batch(_tuning_batch(g))
    run = _runner(backend, op, tuning)
    times: dict[str, float] = {}
    for algo in backend.algorithms:
        if backend.unsupported(algo, op, g) is not None or backend.unsupported(algo, op, tuning) is not None:
            continue
        best = float("inf")
        try:
            for i in range(repeats + 1):  # run 0 is the warm-up (JIT compilation, first touch)
                t0 = time.perf_counter()
                run(algo)
                elapsed = time.perf_counter() - t0
                with _lock:
                    _stats["timed_runs"] += 1
                if i:
                    best = min(best, elapsed)
        except Exception:  # an algorithm that cannot handle this shape is simply not a candidate
            continue
        times[algo] = best
    return times


# --------------------------------------------------------------------------- entry point


def choose(backend: Backend, op: str, g: ConvGeometry) -> str:
    """The fastest algorithm of ``backend`` for ``op`` on geometry ``g`` (cached).

    Called by :func:`fastconv._dispatch.select_conv` when autotuning is on.  Falls
    back to ``backend.default_algorithm(op, g)`` when no candidate could be timed.
    """
    key = make_key(backend, op, g)
    with _lock:
        entry = _cache.get(key)
        if entry is not None and entry["algorithm"] in backend.algorithms:
            _stats["hits"] += 1
            return entry["algorithm"]
        _stats["misses"] += 1
        path = get_cache_path()
        if path is not None:
            entry = _read(path).get(key)
            if entry is not None and entry["algorithm"] in backend.algorithms:
                _stats["disk_hits"] += 1
                _cache[key] = entry
                return entry["algorithm"]
        # tune while holding the lock: concurrent timings would disturb each other
        times = time_candidates(backend, op, g)
        _stats["tunings"] += 1
        if not times:
            return backend.default_algorithm(op, g)
        entry = {"algorithm": min(times, key=times.__getitem__),
                 "times_ms": {a: round(t * 1e3, 4) for a, t in times.items()}}
        _cache[key] = entry
        if path is not None:
            _write(path, {key: entry})
        return entry["algorithm"]
