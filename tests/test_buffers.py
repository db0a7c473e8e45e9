"""Per-thread buffers: every row on cache lines of its own."""

import numpy as np
import pytest

from fastconv._buffers import LINE, aligned_rows


def _lines(a: np.ndarray) -> set[int]:
    """The cache lines (64-byte blocks of addresses) that ``a``'s bytes touch."""
    start = a.ctypes.data
    return set(range(start // LINE, (start + a.nbytes - 1) // LINE + 1))


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.int32, np.int64])
@pytest.mark.parametrize("cols", [1, 15, 16, 17, 42, 1000])
def test_aligned_rows_share_no_line(cols, dtype):
    a = aligned_rows(3, cols, dtype)
    assert a.flags.c_contiguous and a.dtype == dtype and a.shape[0] == 3 and a.shape[1] >= cols
    assert all(a[i].ctypes.data % LINE == 0 for i in range(3))
    assert not _lines(a[0]) & _lines(a[1]) and not _lines(a[1]) & _lines(a[2])


def test_aligned_rows_fill():
    assert (aligned_rows(2, 5, np.float32, -np.inf) == -np.inf).all()
    assert (aligned_rows(2, 5, np.float64, 0) == 0).all()

