"""Cross-entropy loss on raw class scores, with a numerically stable log-softmax."""

from __future__ import annotations

import numpy as np


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """``log(softmax(logits))`` along the last axis, computed as ``z - max - log(sum(exp(z - max)))``
    so that no exponential overflows."""
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def softmax(logits: np.ndarray) -> np.ndarray:
    """Class probabilities along the last axis (stable)."""
    return np.exp(log_softmax(logits))


class CrossEntropyLoss:
    """Mean negative log-likelihood of integer targets under ``softmax(logits)``, as
    ``torch.nn.CrossEntropyLoss()`` (reduction "mean").

    ``loss = criterion(logits, targets)`` computes and caches; ``criterion.backward()``
    returns d loss / d logits = (softmax - one_hot) / N.
    """

    def __call__(self, logits: np.ndarray, targets: np.ndarray) -> float:
        return self.forward(logits, targets)

    def forward(self, logits: np.ndarray, targets: np.ndarray) -> float:
        logits = np.asarray(logits)
        targets = np.asarray(targets)
        if logits.ndim != 2 or targets.shape != (logits.shape[0],):
            raise ValueError(f"CrossEntropyLoss(): expected logits (N, classes) and targets (N,), "
                             f"got {logits.shape} and {targets.shape}")
        if targets.dtype.kind not in "iu":
            raise TypeError(f"CrossEntropyLoss(): targets must be integer class indices, got {targets.dtype}")
        if targets.size and (targets.min() < 0 or targets.max() >= logits.shape[1]):
            raise ValueError(f"CrossEntropyLoss(): targets must lie in [0, {logits.shape[1]}), "
                             f"got values in [{targets.min()}, {targets.max()}]")
        logp = log_softmax(logits)
        rows = np.arange(len(targets))
        self._logp, self._targets = logp, targets
        return float(-logp[rows, targets].mean(dtype=np.float64))

    def backward(self) -> np.ndarray:
        """Gradient of the last loss with respect to the logits."""
        grad = np.exp(self._logp)
        grad[np.arange(len(self._targets)), self._targets] -= 1
        grad /= len(self._targets)
        return grad
