"""Convolution layers: forward, backward-input and backward-weight."""

import pytest

from fastconv import _bench_suite as suite

KIND = "conv"


@pytest.mark.parametrize("pass_", suite.CONV_PASSES)
@pytest.mark.parametrize("case", suite.CONV_CASES, ids=lambda c: c.name)
def test_conv(run_case, case, pass_, impl):
    run_case(case, pass_, impl)
