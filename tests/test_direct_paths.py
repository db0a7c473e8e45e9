"""The channel-blocked direct kernels of the compiled backends against the reference.

``algorithm="direct"`` runs them for layers with at least ``BLOCKED_MIN_OUTPUTS`` outputs per
group: the forward pass and the weight gradient at any stride, the input gradient (the forward
pass of grad_out with the rotated kernel) at stride 1.  The random grid of the other tests
draws few channels; here every draw reaches the blocked kernels, and a spy on them makes sure
they ran.
"""

from __future__ import annotations

import importlib

import numpy as np
import pytest

import fastconv
from fastconv import _args
from fastconv._args import ConvGeometry
from fastconv.backends.base import BLOCKED_MIN_OUTPUTS

from conftest import assert_close, guard_allocations, num_threads

#: backend -> (module, forward kernel, weight-gradient kernel) of its blocked kernels
KERNELS = {"cython": ("fastconv.backends.cython._direct", "forward_blocked", "backward_weight_blocked"),
           "numba": ("fastconv.backends.numba", "_conv2d_blocked", "_conv2d_backward_weight_blocked")}
BACKENDS = [b for b in KERNELS if fastconv.available_backends()[b]["available"]]


def spy(monkeypatch, backend: str, weight: bool = False) -> list:
    """Record every call of ``backend``'s blocked forward (or weight-gradient) kernel (the
    adapter looks it up per call)."""
    module, forward, backward = KERNELS[backend]
    name = backward if weight else forward
    module = importlib.import_module(module)
    real, calls = getattr(module, name), []

    def recording(*args, **kwargs):
        calls.append(args[0].shape)
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, recording)
    return calls


def draw(seed: int):
    """A random conv with 4-20 outputs and 4-9 inputs per group (so both the forward pass and
    the input gradient qualify), kernels 1-5 x 1-5, strides 1-3 (every other draw stride 1),
    dilation, every kind of padding ("same" with even kernels is asymmetric), planes down to
    one pixel."""
    rng = np.random.default_rng(seed)
    while True:
        groups = int(rng.choice([1, 1, 2, 3]))
        cg, kg = int(rng.integers(BLOCKED_MIN_OUTPUTS, 10)), int(rng.integers(BLOCKED_MIN_OUTPUTS, 21))
        r, s = int(rng.integers(1, 6)), int(rng.integers(1, 6))
        dil = (int(rng.integers(1, 3)), int(rng.integers(1, 3)))
        padding = ["same", "valid", (int(rng.integers(0, 4)), int(rng.integers(0, 4)))][seed % 3]
        stride = (1, 1) if seed % 2 or padding == "same" else (int(rng.integers(1, 4)), int(rng.integers(1, 4)))
        n, h, w = int(rng.integers(2, 5)), int(rng.integers(1, 21)), int(rng.integers(1, 21))
        dtype = np.float32 if seed % 2 else np.float64
        x = rng.standard_normal((n, groups * cg, h, w)).astype(dtype)
        weight = rng.standard_normal((groups * kg, cg, r, s)).astype(dtype)
        bias = rng.standard_normal(groups * kg).astype(dtype)
        kw = dict(stride=stride, padding=padding, dilation=dil, groups=groups)
        try:
            out = fastconv.conv2d(x, weight, bias, **kw, backend="reference")
        except ValueError:  # kernel larger than the padded image
            continue
        return x, weight, bias, kw, out, rng.standard_normal(out.shape).astype(dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("seed", range(24))
def test_blocked_kernel_matches_reference(backend, threads, seed, monkeypatch):
    monkeypatch.setattr(f"fastconv.backends.{backend}.SERIAL_WORK", 0)  # tiny shapes still use the threads
    calls = spy(monkeypatch, backend)
    x, weight, bias, kw, out, gy = draw(seed)
    with num_threads(threads):
        got = fastconv.conv2d(x, weight, bias, **kw, backend=backend, algorithm="direct")
        gx = fastconv.conv2d_backward(gy, x, weight, **kw, backend=backend, algorithm="direct",
                                      need_weight=False, need_bias=False).input
    assert len(calls) == (2 if kw["stride"] == (1, 1) else 1), "the blocked kernel did not run"
    assert_close(got, out, x.dtype)
    assert_close(gx, fastconv.conv2d_backward(gy, x, weight, **kw, backend="reference").input, x.dtype)


@pytest.mark.parametrize("backend", BACKENDS)
def test_blocked_kernel_writes_nothing_past_its_arrays(backend, monkeypatch):
    """Guard elements around the outputs and the unfolded-input buffers stay untouched: the
    last register tile of a plane is partial, and its spare lanes must not be stored."""
    monkeypatch.setattr(f"fastconv.backends.{backend}.SERIAL_WORK", 0)
    calls = spy(monkeypatch, backend)
    guarded = guard_allocations(monkeypatch, backend)
    for seed in range(12):
        x, weight, bias, kw, out, gy = draw(seed)
        with num_threads(2):
            got = fastconv.conv2d(x, weight, bias, **kw, backend=backend, algorithm="direct")
            gx = fastconv.conv2d_backward(gy, x, weight, **kw, backend=backend, algorithm="direct",
                                          need_weight=False, need_bias=False).input
        assert_close(got, out, x.dtype)
        assert_close(gx, fastconv.conv2d_backward(gy, x, weight, **kw, backend="reference").input, x.dtype)
    assert len(calls) >= 18 and guarded.buffers and guarded.untouched()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("threads", [2, 3])
@pytest.mark.parametrize("seed", range(12))
def test_blocked_kernel_shares_an_image_among_threads(backend, threads, seed, monkeypatch):
    """Fewer (image, group) pairs than threads: the kernel shares each pair's blocks of 8 output
    channels among up to that many work units per pair, each unfolding the input into its own
    worker's buffer; guard elements stay untouched."""
    monkeypatch.setattr(f"fastconv.backends.{backend}.SERIAL_WORK", 0)
    module, name, _ = KERNELS[backend]
    module = importlib.import_module(module)
    real, parts = getattr(module, name), []

    def recording(*args, **kwargs):  # (x, weights, bias, out, ..., groups, in_place, parts) in both backends
        pairs, kg = args[0].shape[0] * args[-3], args[3].shape[1] // args[-3]
        parts.append((pairs, -(-kg // 8), args[-1]))  # ..., blocks, parts
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, recording)
    guarded = guard_allocations(monkeypatch, backend)
    x, weight, bias, kw, _, gy = draw(seed)
    x, gy = np.ascontiguousarray(x[:1]), np.ascontiguousarray(gy[:1])  # one image: ``groups`` pairs
    out = fastconv.conv2d(x, weight, bias, **kw, backend="reference")
    with num_threads(threads):
        got = fastconv.conv2d(x, weight, bias, **kw, backend=backend, algorithm="direct")
        gx = fastconv.conv2d_backward(gy, x, weight, **kw, backend=backend, algorithm="direct",
                                      need_weight=False, need_bias=False).input
    assert_close(got, out, x.dtype)
    assert_close(gx, fastconv.conv2d_backward(gy, x, weight, **kw, backend="reference").input, x.dtype)
    assert len(parts) == (2 if kw["stride"] == (1, 1) else 1), "the blocked kernel did not run"
    if backend == "numba":  # numba runs at most NUMBA_NUM_THREADS workers
        import numba

        threads = min(threads, numba.config.NUMBA_NUM_THREADS)
    assert all(p == (min(-(-threads // pairs), blocks) if pairs < threads else 1) for pairs, blocks, p in parts), parts
    pairs, blocks, p = parts[0]  # the forward pass
    assert p > 1 or pairs >= threads or blocks == 1, parts
    assert guarded.untouched()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("tiles", range(1, 11))
@pytest.mark.parametrize("rest", [0, 5])
def test_blocked_kernel_splits_every_tile_count(backend, tiles, rest, monkeypatch):
    """One-row planes of ``tiles`` whole register tiles of 16 outputs (plus ``rest``): the
    Cython kernel deals a plane's tiles into runs of at most three as evenly as it can (four
    go 2 + 2), every split must cover each output once."""
    calls = spy(monkeypatch, backend)
    rng = np.random.default_rng(tiles)
    x = rng.standard_normal((2, 5, 1, 16 * tiles + rest)).astype(np.float32)
    weight = rng.standard_normal((11, 5, 1, 3)).astype(np.float32)
    kw = dict(padding=(0, 1))
    out = fastconv.conv2d(x, weight, **kw, backend=backend, algorithm="direct")
    assert calls, "the blocked kernel did not run"
    assert_close(out, fastconv.conv2d(x, weight, **kw, backend="reference"), np.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_blocked_kernel_on_large_planes(backend):
    """Planes of many register tiles, with rows wider and narrower than the output (padding
    beyond the kernel's reach, "valid"), a one-row plane, strided layers."""
    rng = np.random.default_rng(3)
    for (n, c, h, w, k, r, s, stride, pad, dil) in [(2, 5, 60, 70, 12, 3, 3, 1, 1, 1),
                                                    (2, 4, 33, 47, 9, 5, 3, 1, (4, 0), (1, 2)),
                                                    (3, 6, 30, 41, 8, 3, 5, 1, 0, 1),
                                                    (2, 4, 1, 300, 16, 1, 7, 1, (0, 3), 1),
                                                    (2, 3, 61, 58, 16, 7, 7, 2, 3, 1),  # a ResNet stem
                                                    (2, 3, 40, 45, 8, 4, 5, (3, 2), (2, 1), (2, 1))]:
        x = rng.standard_normal((n, c, h, w)).astype(np.float32)
        weight = rng.standard_normal((k, c, r, s)).astype(np.float32)
        kw = dict(stride=stride, padding=pad, dilation=dil)
        out = fastconv.conv2d(x, weight, **kw, backend=backend, algorithm="direct")
        assert_close(out, fastconv.conv2d(x, weight, **kw, backend="reference"), np.float32)
        gy = rng.standard_normal(out.shape).astype(np.float32)
        gx = fastconv.conv2d_backward(gy, x, weight, **kw, backend=backend, algorithm="direct",
                                      need_weight=False, need_bias=False).input
        assert_close(gx, fastconv.conv2d_backward(gy, x, weight, **kw, backend="reference").input, np.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_blocked_kernel_in_panels(backend, monkeypatch):
    """Unfolded planes whose tiles span several panels (512 KiB of the input the tiles read;
    the channel blocks sweep each panel in turn), ending in a partial panel: a stem-like layer
    with a partial block of channels and a partial last tile, and a dilated float64 one; guard
    elements around the outputs and the unfolded-input buffers."""
    monkeypatch.setattr(f"fastconv.backends.{backend}.SERIAL_WORK", 0)
    calls = spy(monkeypatch, backend)
    guarded = guard_allocations(monkeypatch, backend)
    rng = np.random.default_rng(21)
    for (n, c, h, k, r, stride, pad, dil, dtype) in [(2, 3, 181, 20, 7, 2, 3, 1, np.float32),
                                                      (2, 8, 70, 9, 5, 1, 4, 2, np.float64)]:
        x = rng.standard_normal((n, c, h, h + 3)).astype(dtype)
        weight = rng.standard_normal((k, c, r, r)).astype(dtype)
        bias = rng.standard_normal(k).astype(dtype)
        kw = dict(stride=stride, padding=pad, dilation=dil)
        ho = (h + 2 * pad - dil * (r - 1) - 1) // stride + 1
        wo = (h + 3 + 2 * pad - dil * (r - 1) - 1) // stride + 1
        run = c * r * r * 3 * 16 * np.dtype(dtype).itemsize  # input bytes of 3 tiles of 16 outputs (Cython)
        panel = 2**19 // run * 3 * 16  # outputs per panel (Numba's, of single tiles: about as many)
        assert ho * wo > 4 * panel and (ho * wo // 16) % (panel // 16), (ho, wo, panel)
        with num_threads(2):
            out = fastconv.conv2d(x, weight, bias, **kw, backend=backend, algorithm="direct")
        assert_close(out, fastconv.conv2d(x, weight, bias, **kw, backend="reference"), dtype)
    assert len(calls) == 2 and guarded.buffers and guarded.untouched()


def followed_by_nan(a: np.ndarray) -> np.ndarray:
    """``a`` copied into the front of a buffer whose next image is all NaN: a kernel that reads
    past the end of the returned (contiguous) view puts NaN into its result."""
    buf = np.full((a.shape[0] + 1,) + a.shape[1:], np.nan, a.dtype)
    buf[:-1] = a
    return buf[:-1]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("threads", [1, 2])
def test_blocked_kernel_reads_pointwise_layers_in_place(backend, threads, monkeypatch):
    """1x1 stride-1 unpadded layers: the blocked kernel reads the input planes (the output
    gradient's, for the input gradient) in place and stages only the columns of a plane's last,
    partial tile.  Planes with and without a partial tile, a one-pixel plane, groups, float64,
    and one layer large enough that column blocks go outer.  The inputs are followed in memory
    by NaNs, so a read past their end shows; guard elements around the outputs and the stage."""
    monkeypatch.setattr(f"fastconv.backends.{backend}.SERIAL_WORK", 0)
    calls = spy(monkeypatch, backend)
    guarded = guard_allocations(monkeypatch, backend)
    rng = np.random.default_rng(11)
    cases = [(3, 8, 5, 7, 12, 1, np.float32), (2, 12, 4, 8, 8, 2, np.float64), (2, 6, 1, 1, 4, 1, np.float32),
             (2, 160, 30, 30, 8, 1, np.float32)]
    for n, c, h, w, k, groups, dtype in cases:
        x = followed_by_nan(rng.standard_normal((n, c, h, w)).astype(dtype))
        weight = rng.standard_normal((k, c // groups, 1, 1)).astype(dtype)
        bias = rng.standard_normal(k).astype(dtype)
        gy = followed_by_nan(rng.standard_normal((n, k, h, w)).astype(dtype))
        with num_threads(threads):
            out = fastconv.conv2d(x, weight, bias, groups=groups, backend=backend, algorithm="direct")
            gx = fastconv.conv2d_backward(gy, x, weight, groups=groups, backend=backend, algorithm="direct",
                                          need_weight=False, need_bias=False).input
        assert_close(out, fastconv.conv2d(x, weight, bias, groups=groups, backend="reference"), dtype)
        assert_close(gx, fastconv.conv2d_backward(gy, x, weight, groups=groups, backend="reference").input, dtype)
    assert len(calls) == 2 * len(cases) and guarded.buffers and guarded.untouched()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("seed", range(24))
def test_blocked_weight_gradient_matches_reference(backend, threads, seed, monkeypatch):
    monkeypatch.setattr(f"fastconv.backends.{backend}.SERIAL_WORK", 0)
    calls = spy(monkeypatch, backend, weight=True)
    x, weight, bias, kw, out, gy = draw(seed)
    with num_threads(threads):
        gw = fastconv.conv2d_backward(gy, x, weight, **kw, backend=backend, algorithm="direct", need_input=False,
                                      need_bias=False).weight
    assert len(calls) == 1, "the blocked kernel did not run"
    assert_close(gw, fastconv.conv2d_backward(gy, x, weight, **kw, backend="reference").weight, x.dtype)


@pytest.mark.parametrize("backend", BACKENDS)
def test_blocked_weight_gradient_buffers_and_chunks(backend, monkeypatch):
    """Guard elements around the stage, the unfolded inputs and the partial sums stay untouched,
    with chunks of several images (the last one partial) and of one."""
    monkeypatch.setattr(f"fastconv.backends.{backend}.SERIAL_WORK", 0)
    calls = spy(monkeypatch, backend, weight=True)
    guarded = guard_allocations(monkeypatch, backend)
    rng, chunks = np.random.default_rng(5), []
    for (n, c, h, w, k, r, s, stride, pad) in [(11, 3, 7, 5, 6, 3, 3, 1, 1), (3, 4, 20, 23, 9, 5, 3, (2, 1), 2),
                                               (2, 2, 9, 9, 4, 3, 3, 1, 0)]:
        x = rng.standard_normal((n, c, h, w)).astype(np.float32)
        weight = rng.standard_normal((k, c, r, s)).astype(np.float32)
        kw = dict(stride=stride, padding=pad)
        gy = rng.standard_normal(fastconv.conv2d(x, weight, **kw).shape).astype(np.float32)
        with num_threads(2):
            gw = fastconv.conv2d_backward(gy, x, weight, **kw, backend=backend, algorithm="direct",
                                          need_input=False, need_bias=False).weight
            geometry = _args.conv2d_args("t", x, weight, None, stride, pad, 1, 1).geometry
            chunks.append(importlib.import_module(f"fastconv.backends.{backend}")._blocked_weight_layout(geometry).chunk)
        assert_close(gw, fastconv.conv2d_backward(gy, x, weight, **kw, backend="reference").weight, np.float32)
    assert len(calls) == 3 and guarded.buffers and guarded.untouched()
    assert chunks[0] > 1 and 11 % chunks[0] and chunks[2] == 1, chunks


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("threads", [1, 2])
def test_blocked_weight_gradient_reads_whole_tile_planes_in_place(backend, threads, monkeypatch):
    """Output-gradient planes of whole tiles (Ho*Wo a multiple of the tile's lanes) are read in
    place by the full blocks of channels and staged only for a partial last block: one input
    channel (mnist-c1's shape, small), a partial block, groups, stride 2, float64, chunks of
    several images, planes of several segments.  The output gradients are followed in memory by NaNs, so a read past their
    end shows; guard elements around the stage, the unfolded inputs and the partial sums."""
    monkeypatch.setattr(f"fastconv.backends.{backend}.SERIAL_WORK", 0)
    calls = spy(monkeypatch, backend, weight=True)
    guarded = guard_allocations(monkeypatch, backend)
    rng = np.random.default_rng(12)
    cases = [(6, 1, 8, 8, 32, 1, 1, np.float32), (5, 3, 8, 8, 6, 1, 1, np.float32),
             (9, 8, 4, 8, 8, 1, 2, np.float64), (4, 2, 16, 16, 9, 2, 1, np.float32),
             # planes of more than one segment (the Cython kernel's 2048 outputs), the last partial
             (2, 3, 48, 48, 6, 1, 1, np.float32), (3, 2, 40, 72, 8, 1, 1, np.float64)]
    for n, c, h, w, k, stride, groups, dtype in cases:
        x = rng.standard_normal((n, c, h, w)).astype(dtype)
        weight = rng.standard_normal((k, c // groups, 3, 3)).astype(dtype)
        kw = dict(stride=stride, padding=1, groups=groups)
        gy = followed_by_nan(rng.standard_normal(fastconv.conv2d(x, weight, **kw).shape).astype(dtype))
        assert gy.shape[2] * gy.shape[3] % 8 == 0
        with num_threads(threads):
            gw = fastconv.conv2d_backward(gy, x, weight, **kw, backend=backend, algorithm="direct",
                                          need_input=False, need_bias=False).weight
        assert_close(gw, fastconv.conv2d_backward(gy, x, weight, **kw, backend="reference").weight, dtype)
    assert len(calls) == len(cases) and guarded.buffers and guarded.untouched()


def _wide_lanes() -> int | None:
    if "cython" not in BACKENDS:
        return None
    return importlib.import_module("fastconv.backends.cython._direct").BLOCKED_WEIGHT_WIDE_LANES


@pytest.mark.skipif("cython" not in BACKENDS, reason="the Cython backend is not built")
@pytest.mark.parametrize("every_plane", [False, True])
@pytest.mark.parametrize("threads", [1, 2])
def test_wide_weight_gradient_tile(threads, every_plane, monkeypatch):
    """The Cython kernel's wide float32 tile (16 lanes): on every plane of whole wide tiles (the
    size rule lowered to 0) or on every plane at all (the Zen 5 rule): one segment or several
    with a partial last one, a partial block of channels, groups, stride 2, a one-input-channel
    layer, and with ``every_plane`` output planes that end in a partial tile (7x7, 14x14, 3x5
    at stride 2, 1x1, 30x13);
    guard elements around the stage, the unfolded inputs and the partial sums, output gradients
    followed by NaNs.  Builds without AVX-512 do not pick the tile, but have it, as lane groups of
    several vectors folded into the kept sums: it runs there too."""
    import fastconv.backends.cython as cy

    wide = _wide_lanes() or 16
    monkeypatch.setattr(cy._direct, "BLOCKED_WEIGHT_WIDE_LANES", wide)
    monkeypatch.setattr(cy, "SERIAL_WORK", 0)
    monkeypatch.setattr(cy, "WIDE_WEIGHT_MIN_OUTPUTS", 0)
    monkeypatch.setattr(cy, "WIDE_WEIGHT_EVERY_PLANE", every_plane)
    real, lanes = cy._direct.backward_weight_blocked, []
    monkeypatch.setattr(cy._direct, "backward_weight_blocked", lambda *a: lanes.append(a[-1]) or real(*a))
    guarded = guard_allocations(monkeypatch, "cython")
    rng = np.random.default_rng(31)
    cases = [(3, 1, 8, 8, 32, 1, 1), (5, 3, 8, 8, 6, 1, 1), (4, 2, 16, 16, 9, 2, 1), (2, 4, 48, 48, 10, 1, 2),
             (2, 3, 64, 40, 10, 1, 1)]
    if every_plane:
        cases += [(3, 5, 7, 7, 8, 1, 1), (2, 6, 14, 14, 12, 1, 3), (4, 2, 5, 9, 7, 2, 1), (3, 4, 1, 1, 8, 1, 1),
                  (2, 3, 30, 13, 9, 1, 1)]
    for n, c, h, w, k, stride, groups in cases:
        x = rng.standard_normal((n, c, h, w)).astype(np.float32)
        weight = rng.standard_normal((k, c // groups, 3, 3)).astype(np.float32)
        kw = dict(stride=stride, padding=1, groups=groups)
        gy = followed_by_nan(rng.standard_normal(fastconv.conv2d(x, weight, **kw).shape).astype(np.float32))
        with num_threads(threads):
            gw = fastconv.conv2d_backward(gy, x, weight, **kw, backend="cython", algorithm="direct",
                                          need_input=False, need_bias=False).weight
        assert_close(gw, fastconv.conv2d_backward(gy, x, weight, **kw, backend="reference").weight, np.float32)
    assert lanes == [wide] * len(cases) and guarded.buffers and guarded.untouched()


@pytest.mark.skipif("cython" not in BACKENDS, reason="the Cython backend is not built")
def test_wide_weight_tile_rule(monkeypatch):
    """Which lanes each plane gets: the 8-lane tile on small planes and on planes that are no
    multiple of the wide lanes, unless the host is one of the every-plane CPUs; float64 never
    wide; the CPU names that rule covers."""
    import fastconv.backends.cython as cy

    assert [cy.wide_tile_on_every_plane(name) for name in ("znver5", "znver6", "znver12")] == [True] * 3
    assert not any(cy.wide_tile_on_every_plane(name) for name in
                   ("znver4", "znver3", "znver", "znverx", "skylake-avx512", "sapphirerapids", "generic", ""))
    wide, narrow = _wide_lanes(), cy._direct.BLOCKED_WEIGHT_TILE[2]
    f32, f64 = np.dtype(np.float32), np.dtype(np.float64)

    def lanes(hw, dtype=f32):
        return cy._weight_tile(ConvGeometry(2, 4, hw, hw, 8, 3, 3, (1, 1), (1, 1, 1, 1), (1, 1), 1, dtype))[2]

    monkeypatch.setattr(cy, "WIDE_WEIGHT_EVERY_PLANE", False)
    assert [lanes(14), lanes(48), lanes(47), lanes(64, f64)] == [narrow, wide or narrow, narrow, narrow]
    monkeypatch.setattr(cy, "WIDE_WEIGHT_EVERY_PLANE", True)
    assert [lanes(14), lanes(48), lanes(47), lanes(64, f64)] == [wide or narrow] * 3 + [narrow]


@pytest.mark.skipif("cython" not in BACKENDS, reason="the Cython backend is not built")
def test_weight_gradient_chunks_fill_the_tile_steps():
    """The Cython weight gradient takes small planes in chunks of images that give its tiles at
    least WEIGHT_TILE_MIN_STEPS steps per call, within BLOCKED_CHUNK_CACHE_BYTES of buffers and
    at most a quarter of each worker's images; planes with enough steps go one by one."""
    import fastconv.backends.cython as cy
    from fastconv.backends.base import BLOCKED_CHUNK_CACHE_BYTES

    for n, c, hw, k, dtype in [(64, 32, 14, 64, np.float32), (400, 8, 8, 16, np.float32), (64, 64, 7, 128, np.float64),
                               (64, 128, 7, 128, np.float32), (5, 8, 8, 16, np.float32), (64, 8, 28, 16, np.float32)]:
        g = ConvGeometry(n, c, hw, hw, k, 3, 3, (1, 1), (1, 1, 1, 1), (1, 1), 1, np.dtype(dtype))
        lay, lanes = cy._blocked_weight_layout(g), cy._weight_tile(g)[2]
        steps = -(-hw * hw // lanes)
        within = (lay.xs + lay.gs) * g.dtype.itemsize <= BLOCKED_CHUNK_CACHE_BYTES
        quarter = -(-n // (4 * lay.workers))
        assert 1 <= lay.chunk <= quarter, (g, lay.chunk)
        if steps >= cy.WEIGHT_TILE_MIN_STEPS:
            assert lay.chunk == 1, (g, lay.chunk)
        else:
            assert within or lay.chunk == 1, (g, lay.chunk)
            assert lay.chunk * steps >= cy.WEIGHT_TILE_MIN_STEPS or lay.chunk == quarter or not (
                (lay.xs + lay.gs) // lay.chunk * (lay.chunk + 1) * g.dtype.itemsize <= BLOCKED_CHUNK_CACHE_BYTES), (g, lay.chunk)


@pytest.mark.parametrize("backend", BACKENDS)
def test_blocked_weight_gradient_with_inf_input(backend, monkeypatch):
    """An Inf that the spare lanes of a plane's last tile read (7x7 outputs: the tile of tap row
    0 runs into input row 8) spoils weight entries it does not belong to; the adapter sees the
    non-finite sum and recomputes, so the NaN / Inf pattern is the reference's."""
    calls = spy(monkeypatch, backend, weight=True)
    rng = np.random.default_rng(9)
    x = rng.standard_normal((2, 4, 9, 9)).astype(np.float32)
    x[0, 1, 8, 3] = np.inf
    weight = rng.standard_normal((8, 4, 3, 3)).astype(np.float32)
    gy = rng.standard_normal((2, 8, 7, 7)).astype(np.float32)
    gw = fastconv.conv2d_backward(gy, x, weight, backend=backend, algorithm="direct", need_input=False,
                                  need_bias=False).weight
    want = fastconv.conv2d_backward(gy, x, weight, backend="reference").weight
    assert len(calls) == 1
    assert np.array_equal(np.isfinite(gw), np.isfinite(want)) and np.isfinite(want[:, :, 0]).all()
    finite = np.isfinite(want)
    assert_close(gw[finite], want[finite], np.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_one_channel_input_gradients_take_the_flat_kernel(backend):
    """``auto`` runs the input gradient of a one-channel 3x3 layer on the flat-plane direct
    kernel whatever its outputs (it sums them into one plane), when there is an image per
    thread; a single image large enough for two threads (the kernel would not run) goes to
    im2col, a smaller one runs the kernel on one thread."""
    from fastconv import _dispatch

    be = _dispatch._load(backend)
    f32 = np.dtype(np.float32)
    with num_threads(2):
        for k in (8, 32, 64):
            batch = ConvGeometry(64, 1, 28, 28, k, 3, 3, (1, 1), (1, 1, 1, 1), (1, 1), 1, f32)
            one = ConvGeometry(1, 1, 28, 28, k, 3, 3, (1, 1), (1, 1, 1, 1), (1, 1), 1, f32)
            assert be.default_algorithm("conv2d_backward_input", batch) == "direct", k
            assert be.default_algorithm("conv2d_backward_input", one) == ("direct" if k == 8 else "im2col"), k


def _blocked_weights_spec(w: np.ndarray, groups: int, kblock: int) -> np.ndarray:
    """The specification of the blocked kernels' weight order, in NumPy: ``w`` (K, C/g, R, S) as
    (groups, blocks * T, kblock), entry [g, b*T + t, j] the weight of output channel
    g*K/g + b*kblock + j at tap t = (c*R + r)*S + s, zero past the group's last channel."""
    k, cg, r, s = w.shape
    kg, taps = k // groups, cg * r * s
    blocks = -(-kg // kblock)
    padded = np.zeros((groups, blocks * kblock, taps), w.dtype)
    padded[:, :kg] = w.reshape(groups, kg, taps)
    return padded.reshape(groups, blocks, kblock, taps).transpose(0, 1, 3, 2).reshape(groups, blocks * taps, kblock)


#: backend -> (module, compiled weight reorder, its output channels per block) of its blocked kernels
REORDER = {"cython": ("fastconv.backends.cython._direct", "blocked_weights", lambda m: m.BLOCKED_TILE[0]),
           "numba": ("fastconv.backends.numba", "_blocked_weights", lambda m: m._blocked.KBLOCK)}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("rotate", [False, True])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("k, cg, r, s, groups", [(16, 8, 3, 3, 1), (13, 5, 3, 2, 1), (12, 3, 1, 1, 2),
                                                  (24, 1, 7, 7, 3), (9, 9, 5, 1, 9), (3, 17, 2, 4, 1)])
def test_compiled_blocked_weights_match_the_specification(backend, rotate, dtype, k, cg, r, s, groups):
    """The compiled reorder (one pass, parallel) equals the NumPy specification, of the layer's
    weight and of the input gradient's rotated one, partial blocks of channels zero-padded."""
    from fastconv.backends.base import blocked_weights_shape, input_grad_kernel

    module, name, kblock = REORDER[backend]
    module = importlib.import_module(module)
    kernel, kblock = getattr(module, name), kblock(module)
    w = np.random.default_rng(k * cg).standard_normal((k, cg, r, s)).astype(dtype)
    g = ConvGeometry(1, cg * groups, 8, 8, k, r, s, (1, 1), (0, 0, 0, 0), (1, 1), groups, np.dtype(dtype))
    spec = _blocked_weights_spec(input_grad_kernel(w, groups) if rotate else w, groups, kblock)
    wt = np.full(blocked_weights_shape(g, rotate, kblock), np.nan, dtype)
    kernel(w, wt, groups, rotate, *([2] if backend == "cython" else []))
    np.testing.assert_array_equal(wt, spec)


@pytest.mark.parametrize("backend", BACKENDS)
def test_compiled_blocked_weights_reject_a_wrong_buffer(backend):
    module, name, _ = REORDER[backend]
    kernel = getattr(importlib.import_module(module), name)
    w = np.ones((16, 4, 3, 3), np.float32)
    with pytest.raises(ValueError, match="blocked_weights"):
        kernel(w, np.empty((1, 36, 8), np.float32), 1, False, *([1] if backend == "cython" else []))
