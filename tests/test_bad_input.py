"""Bad input: every case raises the right exception type, and the message names the
function and the offending argument.  Run against every available backend."""

from __future__ import annotations

import numpy as np
import pytest

import fastconv
from conftest import host_backends

X = np.ones((2, 4, 8, 8))
W = np.ones((6, 4, 3, 3))

# (id, callable taking backend, exception type, words the message must contain)
CASES = [
    ("x-2d", lambda b: fastconv.conv2d(np.ones((8, 8)), W, backend=b), ValueError, ["conv2d", "input", "(8, 8)"]),
    ("x-5d", lambda b: fastconv.conv2d(np.ones((1, 2, 4, 8, 8)), W, backend=b), ValueError, ["conv2d", "input"]),
    ("w-3d", lambda b: fastconv.conv2d(X, np.ones((6, 4, 3)), backend=b), ValueError, ["conv2d", "weight", "(6, 4, 3)"]),
    ("channel-mismatch", lambda b: fastconv.conv2d(X, np.ones((6, 3, 3, 3)), backend=b), ValueError,
     ["conv2d", "channels", "(2, 4, 8, 8)", "(6, 3, 3, 3)"]),
    ("groups-not-dividing-c", lambda b: fastconv.conv2d(X, np.ones((6, 4, 3, 3)), groups=3, backend=b), ValueError,
     ["conv2d", "groups=3"]),
    ("groups-not-dividing-k", lambda b: fastconv.conv2d(X, np.ones((5, 2, 3, 3)), groups=2, backend=b), ValueError,
     ["conv2d", "groups=2", "(5"]),
    ("groups-zero", lambda b: fastconv.conv2d(X, W, groups=0, backend=b), ValueError, ["conv2d", "groups"]),
    ("groups-float", lambda b: fastconv.conv2d(X, W, groups=1.0, backend=b), TypeError, ["conv2d", "groups"]),
    ("kernel-too-large", lambda b: fastconv.conv2d(X, np.ones((6, 4, 9, 9)), backend=b), ValueError,
     ["conv2d", "kernel", "padded"]),
    ("dilated-kernel-too-large", lambda b: fastconv.conv2d(X, W, dilation=4, backend=b), ValueError,
     ["conv2d", "dilation"]),
    ("stride-zero", lambda b: fastconv.conv2d(X, W, stride=0, backend=b), ValueError, ["conv2d", "stride"]),
    ("stride-negative", lambda b: fastconv.conv2d(X, W, stride=(1, -1), backend=b), ValueError, ["conv2d", "stride"]),
    ("stride-float", lambda b: fastconv.conv2d(X, W, stride=1.5, backend=b), TypeError, ["conv2d", "stride"]),
    ("stride-triple", lambda b: fastconv.conv2d(X, W, stride=(1, 1, 1), backend=b), ValueError, ["conv2d", "stride"]),
    ("padding-negative", lambda b: fastconv.conv2d(X, W, padding=-1, backend=b), ValueError, ["conv2d", "padding"]),
    ("padding-bad-string", lambda b: fastconv.conv2d(X, W, padding="full", backend=b), ValueError,
     ["conv2d", "padding", "full"]),
    ("padding-same-strided", lambda b: fastconv.conv2d(X, W, padding="same", stride=2, backend=b), ValueError,
     ["conv2d", "same", "stride"]),
    ("dilation-zero", lambda b: fastconv.conv2d(X, W, dilation=0, backend=b), ValueError, ["conv2d", "dilation"]),
    ("dilation-bool", lambda b: fastconv.conv2d(X, W, dilation=True, backend=b), TypeError, ["conv2d", "dilation"]),
    ("complex-input", lambda b: fastconv.conv2d(X.astype(complex), W, backend=b), TypeError,
     ["conv2d", "input", "complex"]),
    ("object-weight", lambda b: fastconv.conv2d(X, W.astype(object), backend=b), TypeError,
     ["conv2d", "weight", "object"]),
    ("bool-input", lambda b: fastconv.conv2d(X.astype(bool), W, backend=b), TypeError, ["conv2d", "input", "bool"]),
    ("string-input", lambda b: fastconv.conv2d("abc", W, backend=b), TypeError, ["conv2d", "input"]),
    ("longdouble", lambda b: fastconv.conv2d(X.astype(np.longdouble), W, backend=b), TypeError,
     ["conv2d", "float"]),
    ("bias-wrong-length", lambda b: fastconv.conv2d(X, W, np.ones(5), backend=b), ValueError,
     ["conv2d", "bias", "(5,)", "(6,)"]),
    ("bias-2d", lambda b: fastconv.conv2d(X, W, np.ones((6, 1)), backend=b), ValueError, ["conv2d", "bias"]),
    ("zero-size-weight", lambda b: fastconv.conv2d(X, np.ones((0, 4, 3, 3)), backend=b), ValueError,
     ["conv2d", "weight", "zero"]),
    ("zero-spatial-input", lambda b: fastconv.conv2d(np.ones((2, 4, 0, 8)), W, backend=b), ValueError,
     ["conv2d", "input", "zero"]),
    ("unknown-backend", lambda b: fastconv.conv2d(X, W, backend="tpu"), ValueError, ["conv2d", "backend", "tpu"]),
    ("unknown-algorithm", lambda b: fastconv.conv2d(X, W, backend=b, algorithm="magic"), ValueError,
     ["conv2d", "algorithm", "magic"]),
    ("grad-out-wrong-shape", lambda b: fastconv.conv2d_backward(np.ones((2, 6, 5, 5)), X, W, backend=b), ValueError,
     ["conv2d_backward", "grad_out", "(2, 6, 6, 6)", "(2, 6, 5, 5)"]),
    ("backward-complex", lambda b: fastconv.conv2d_backward(np.ones((2, 6, 6, 6), complex), X, W, backend=b),
     TypeError, ["conv2d_backward", "grad_out"]),
    ("pool-padding-too-big", lambda b: fastconv.max_pool2d(X, 2, padding=2, backend=b), ValueError,
     ["max_pool2d", "padding", "half"]),
    ("pool-kernel-zero", lambda b: fastconv.max_pool2d(X, 0, backend=b), ValueError, ["max_pool2d", "kernel_size"]),
    ("pool-kernel-too-big", lambda b: fastconv.max_pool2d(X, 9, backend=b), ValueError, ["max_pool2d", "output"]),
    ("pool-stride-float", lambda b: fastconv.avg_pool2d(X, 2, stride=2.0, backend=b), TypeError,
     ["avg_pool2d", "stride"]),
    ("pool-2d-input", lambda b: fastconv.avg_pool2d(np.ones((8, 8)), 2, backend=b), ValueError,
     ["avg_pool2d", "input"]),
    ("pool-ceil-not-bool", lambda b: fastconv.max_pool2d(X, 2, ceil_mode="yes", backend=b), TypeError,
     ["max_pool2d", "ceil_mode"]),
    ("pool-complex", lambda b: fastconv.max_pool2d(X.astype(np.complex64), 2, backend=b), TypeError,
     ["max_pool2d", "input"]),
    ("maxpool-backward-grad-shape", lambda b: fastconv.max_pool2d_backward(np.ones((2, 4, 3, 3)), X, 2, backend=b),
     ValueError, ["max_pool2d_backward", "grad_out", "(2, 4, 4, 4)"]),
    ("maxpool-backward-indices-out-of-range",
     lambda b: fastconv.max_pool2d_backward(np.ones((2, 4, 4, 4)), X, 2, indices=np.full((2, 4, 4, 4), 64),
                                            backend=b), ValueError, ["max_pool2d_backward", "indices", "64"]),
    ("maxpool-backward-indices-negative",
     lambda b: fastconv.max_pool2d_backward(np.ones((2, 4, 4, 4)), X, 2, indices=np.full((2, 4, 4, 4), -3),
                                            backend=b), ValueError, ["max_pool2d_backward", "indices", "-3"]),
    ("maxpool-backward-indices-float",
     lambda b: fastconv.max_pool2d_backward(np.ones((2, 4, 4, 4)), X, 2, indices=np.zeros((2, 4, 4, 4)), backend=b),
     TypeError, ["max_pool2d_backward", "indices"]),
    ("avgpool-backward-bad-shape", lambda b: fastconv.avg_pool2d_backward(np.ones((2, 4, 4, 4)), (2, 4, 8), 2,
                                                                          backend=b),
     ValueError, ["avg_pool2d_backward", "grad_out"]),
    ("avgpool-backward-shape-type", lambda b: fastconv.avg_pool2d_backward(np.ones((2, 4, 4, 4)), 8, 2, backend=b),
     TypeError, ["avg_pool2d_backward", "input_shape"]),
    ("correlate-3d", lambda b: fastconv.correlate2d(np.ones((3, 3, 3)), np.ones((2, 2)), backend=b), ValueError,
     ["correlate2d", "in1"]),
    ("correlate-bad-mode", lambda b: fastconv.correlate2d(np.ones((3, 3)), np.ones((2, 2)), mode="big", backend=b),
     ValueError, ["correlate2d", "mode"]),
    ("convolve-bad-boundary",
     lambda b: fastconv.convolve2d(np.ones((3, 3)), np.ones((2, 2)), boundary="mirror", backend=b), ValueError,
     ["convolve2d", "boundary"]),
    ("convolve-valid-mismatch",
     lambda b: fastconv.convolve2d(np.ones((3, 6)), np.ones((6, 3)), mode="valid", backend=b), ValueError,
     ["convolve2d", "valid"]),
    ("correlate-complex", lambda b: fastconv.correlate2d(np.ones((3, 3), complex), np.ones((2, 2)), backend=b),
     TypeError, ["correlate2d", "in1"]),
    ("correlate-empty", lambda b: fastconv.correlate2d(np.ones((0, 3)), np.ones((2, 2)), backend=b), ValueError,
     ["correlate2d", "in1"]),
]


@pytest.mark.parametrize("backend", host_backends())
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_raises_clear_error(case, backend):
    _, call, exc_type, words = case
    with pytest.raises(exc_type) as info:
        call(backend)
    message = str(info.value)
    for word in words:
        assert word in message, f"{word!r} not in {message!r}"


def test_case_count():
    assert len(CASES) >= 30


def test_helpers_reject_bad_input():
    with pytest.raises(TypeError, match="conv_output_size"):
        fastconv.conv_output_size(10.0, 3)
    with pytest.raises(ValueError, match="conv_params"):
        fastconv.conv_params(0, 3, 3)
    with pytest.raises(TypeError, match="set_autotune"):
        fastconv.set_autotune("yes")
