"""2-D correlation of a 1024 x 1024 image (fastconv vs scipy.signal, scipy.ndimage, PyTorch)."""

import pytest

from fastconv import _bench_suite as suite

KIND = "corr2d"


@pytest.mark.parametrize("case", suite.CORR2D_CASES, ids=lambda c: c.name)
def test_correlate2d(run_case, case, impl):
    run_case(case, "forward", impl)
