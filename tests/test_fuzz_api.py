"""Fuzzing the public API's argument handling with hypothesis on raw argument tuples.

Any combination of arguments must either work (and then agree with the reference
backend) or raise ``ValueError`` / ``TypeError``: never another exception, never a
crash.  In the test suite this runs a bounded number of examples; for a long run::

    python tests/test_fuzz_api.py --minutes 5
"""

from __future__ import annotations

import os
import sys
import time

import numpy as np
import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import fastconv  # noqa: E402

FUZZ_EXAMPLES = int(os.environ.get("FASTCONV_FUZZ_EXAMPLES", "150"))

scalars = st.one_of(
    st.integers(-3, 6), st.floats(allow_nan=True, allow_infinity=True), st.booleans(), st.none(),
    st.text(max_size=5), st.sampled_from(["same", "valid", "full", ""]),
    st.tuples(st.integers(-2, 5), st.integers(-2, 5)), st.tuples(st.integers(0, 3)),
    st.tuples(st.integers(0, 3), st.integers(0, 3), st.integers(0, 3)), st.lists(st.integers(0, 3), max_size=3),
    st.just(np.int64(2)), st.just(np.float32(1.0)),
)
dtypes = st.sampled_from([np.float32, np.float64, np.float16, np.int32, np.uint8, np.bool_, np.complex64, object,
                          np.longdouble])


@st.composite
def arrays(draw, max_dims=5):
    ndim = draw(st.integers(0, max_dims))
    shape = tuple(draw(st.integers(0, 6)) for _ in range(ndim))
    dtype = draw(dtypes)
    a = np.ones(shape, dtype=dtype) if dtype is not object else np.empty(shape, dtype=object)
    if draw(st.booleans()) and a.ndim and a.size and dtype not in (object,):
        a = a[..., ::-1]
    return a


@st.composite
def conv_calls(draw):
    return dict(x=draw(arrays()), weight=draw(arrays()), bias=draw(st.one_of(st.none(), arrays(2))),
                stride=draw(scalars), padding=draw(scalars), dilation=draw(scalars), groups=draw(scalars))


def _backends():
    return [n for n, i in fastconv.available_backends().items() if i["available"] and n != "cuda"]


def _call_ok(fn, *args, **kwargs):
    """Run fn; the only acceptable failures are ValueError and TypeError."""
    try:
        return fn(*args, **kwargs), None
    except (ValueError, TypeError) as exc:
        return None, exc


def check_conv(call, backend):
    out, exc = _call_ok(fastconv.conv2d, call["x"], call["weight"], call["bias"], call["stride"], call["padding"],
                        call["dilation"], call["groups"], backend=backend)
    if exc is None and backend != "reference":
        ref = fastconv.conv2d(call["x"], call["weight"], call["bias"], call["stride"], call["padding"],
                              call["dilation"], call["groups"], backend="reference")
        np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-4)


def check_pool(x, kernel, stride, padding, dilation, ceil_mode, backend):
    out, exc = _call_ok(fastconv.max_pool2d, x, kernel, stride, padding, dilation, ceil_mode, backend=backend)
    if exc is None and backend != "reference":
        ref = fastconv.max_pool2d(x, kernel, stride, padding, dilation, ceil_mode, backend="reference")
        np.testing.assert_array_equal(out, ref)
    _call_ok(fastconv.avg_pool2d, x, kernel, stride, padding, ceil_mode, backend=backend)
    _call_ok(fastconv.avg_pool2d_backward, x, x.shape, kernel, stride, padding, ceil_mode, backend=backend)


FUZZ_SETTINGS = settings(max_examples=FUZZ_EXAMPLES, deadline=None, derandomize=True,
                         suppress_health_check=list(HealthCheck))


@pytest.mark.parametrize("backend", _backends())
@FUZZ_SETTINGS
@given(call=conv_calls())
def test_fuzz_conv2d_arguments(backend, call):
    check_conv(call, backend)


@pytest.mark.parametrize("backend", _backends())
@FUZZ_SETTINGS
@given(x=arrays(), kernel=scalars, stride=scalars, padding=scalars, dilation=scalars,
       ceil_mode=st.one_of(st.booleans(), scalars))
def test_fuzz_pool_arguments(backend, x, kernel, stride, padding, dilation, ceil_mode):
    check_pool(x, kernel, stride, padding, dilation, ceil_mode, backend)


@FUZZ_SETTINGS
@given(a=arrays(3), b=arrays(3), mode=scalars, boundary=st.one_of(scalars, st.sampled_from(["fill", "wrap", "symm"])),
       fillvalue=scalars)
def test_fuzz_signal2d_arguments(a, b, mode, boundary, fillvalue):
    _call_ok(fastconv.correlate2d, a, b, mode, boundary, fillvalue)
    _call_ok(fastconv.convolve2d, a, b, mode, boundary, fillvalue)


def main(argv: list[str]) -> int:  # pragma: no cover - the long local run
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=3.0)
    args = parser.parse_args(argv)
    batch = settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    counts = {"conv": 0, "pool": 0, "signal": 0}

    @batch
    @given(call=conv_calls(), backend=st.sampled_from(_backends()))
    def conv(call, backend):
        counts["conv"] += 1
        check_conv(call, backend)

    @batch
    @given(x=arrays(), kernel=scalars, stride=scalars, padding=scalars, dilation=scalars, ceil=st.booleans(),
           backend=st.sampled_from(_backends()))
    def pool(x, kernel, stride, padding, dilation, ceil, backend):
        counts["pool"] += 1
        check_pool(x, kernel, stride, padding, dilation, ceil, backend)

    @batch
    @given(a=arrays(3), b=arrays(3), mode=scalars, boundary=scalars, fillvalue=scalars)
    def signal(a, b, mode, boundary, fillvalue):
        counts["signal"] += 1
        _call_ok(fastconv.correlate2d, a, b, mode, boundary, fillvalue)
        _call_ok(fastconv.convolve2d, a, b, mode, boundary, fillvalue)

    deadline = time.monotonic() + 60 * args.minutes
    rounds = 0
    while time.monotonic() < deadline:  # fresh random batches until the time is up
        for fn in (conv, pool, signal):
            fn()
        rounds += 1
    print(f"fuzzed for {args.minutes} min ({rounds} rounds) over backends {_backends()}: {counts} calls; "
          "no crash, no unexpected exception")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main(sys.argv[1:]))
