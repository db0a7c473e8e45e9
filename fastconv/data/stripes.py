"""The stripe task: is the bright 2-pixel band in a noisy image horizontal (class 0) or vertical (class 1)?"""

from __future__ import annotations

import numpy as np

from ..nn.module import as_generator


def make_stripes(n: int, size: int = 16, *, noise: float = 0.12, rng: np.random.Generator | int | None = 0,
                 dtype=np.float32) -> tuple[np.ndarray, np.ndarray]:
    """Generate ``n`` stripe images.

    Each image is ``size x size`` zeros with one band 2 pixels wide set to 1.0, at a
    position drawn from ``rng.integers(3, size - 3)``: rows for class 0 (horizontal),
    columns for class 1 (vertical).  Gaussian noise with std ``noise`` is added and the
    result clipped to [0, 1].  Labels are drawn uniformly from {0, 1}.

    Returns
    -------
    x : numpy.ndarray, shape (n, 1, size, size)
    y : numpy.ndarray of int64, shape (n,)
    """
    if size < 8:
        raise ValueError(f"make_stripes(): size must be at least 8, got {size}")
    rng = as_generator(rng)
    y = rng.integers(0, 2, size=n)
    pos = rng.integers(3, size - 3, size=n)
    x = np.zeros((n, 1, size, size))
    for i in range(n):
        if y[i] == 0:
            x[i, 0, pos[i]:pos[i] + 2, :] = 1.0
        else:
            x[i, 0, :, pos[i]:pos[i] + 2] = 1.0
    x += rng.normal(0.0, noise, size=x.shape)
    np.clip(x, 0.0, 1.0, out=x)
    return x.astype(dtype), y.astype(np.int64)


def stripes_dataset(n_train: int = 400, n_test: int = 200, size: int = 16, *,
                    rng: np.random.Generator | int | None = 0):
    """``(x_train, y_train, x_test, y_test)`` drawn from one seeded generator."""
    rng = as_generator(rng)
    x_train, y_train = make_stripes(n_train, size, rng=rng)
    x_test, y_test = make_stripes(n_test, size, rng=rng)
    return x_train, y_train, x_test, y_test
