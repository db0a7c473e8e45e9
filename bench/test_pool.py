"""Pooling layers: forward and backward."""

import pytest

from fastconv import _bench_suite as suite

KIND = "pool"


@pytest.mark.parametrize("pass_", suite.POOL_PASSES)
@pytest.mark.parametrize("case", suite.POOL_CASES, ids=lambda c: c.name)
def test_pool(run_case, case, pass_, impl):
    run_case(case, pass_, impl)
