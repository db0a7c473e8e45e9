"""The two reference networks of the design document."""

from __future__ import annotations

import numpy as np

from .layers import Conv2d, Dropout, Flatten, GlobalAvgPool2d, Linear, MaxPool2d, ReLU
from .module import Sequential, as_generator


def stripes_net(*, rng: np.random.Generator | int | None = 0, backend: str | None = None) -> Sequential:
    """Conv(1,8,3,p1) ReLU MaxPool2 Conv(8,16,3,p1) ReLU GlobalAvgPool Linear(16,2)."""
    rng = as_generator(rng)
    return Sequential(
        Conv2d(1, 8, 3, padding=1, rng=rng), ReLU(), MaxPool2d(2),
        Conv2d(8, 16, 3, padding=1, rng=rng), ReLU(), GlobalAvgPool2d(),
        Linear(16, 2, rng=rng),
        backend=backend,
    )


def simple_cnn(num_classes: int = 10, *, rng: np.random.Generator | int | None = 0,
               backend: str | None = None) -> Sequential:
    """"SimpleCNN" for 28x28 images: Conv(1,32,3,p1) ReLU MaxPool2 Conv(32,64,3,p1) ReLU MaxPool2
    Flatten Linear(3136,128) ReLU Dropout(0.25) Linear(128, num_classes)."""
    rng = as_generator(rng)
    return Sequential(
        Conv2d(1, 32, 3, padding=1, rng=rng), ReLU(), MaxPool2d(2),
        Conv2d(32, 64, 3, padding=1, rng=rng), ReLU(), MaxPool2d(2),
        Flatten(), Linear(64 * 7 * 7, 128, rng=rng), ReLU(), Dropout(0.25, rng=rng.spawn(1)[0]),
        Linear(128, num_classes, rng=rng),
        backend=backend,
    )
