"""PNG figures of a training run, drawn with matplotlib's Agg canvas (no display, no pyplot state)."""

from __future__ import annotations

import os
from typing import Sequence

import numpy as np

from .module import Module, Sequential
from .trainer import History


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def plot_history(history: History, path: str | os.PathLike, title: str = "") -> None:
    """Loss and accuracy per epoch (train: running average over the epoch; test: after it)."""
    fig = _figure(10, 4)
    ax_loss, ax_acc = fig.subplots(1, 2)
    epochs = history.column("epoch")
    ax_loss.plot(epochs, history.column("train_loss"), label="train (running)")
    ax_acc.plot(epochs, history.column("train_acc"), label="train (running)")
    if any(v is not None for v in history.column("test_acc")):
        ax_loss.plot(epochs, history.column("test_loss"), label="test")
        ax_acc.plot(epochs, history.column("test_acc"), label="test")
    ax_loss.set(xlabel="epoch", ylabel="cross-entropy loss", title="loss")
    if min(history.column("train_loss")) > 0:
        ax_loss.set_yscale("log")
    ax_acc.set(xlabel="epoch", ylabel="accuracy", title="accuracy", ylim=(0, 1.02))
    from matplotlib.ticker import MaxNLocator

    for ax in (ax_loss, ax_acc):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend()
    if title:
        fig.suptitle(title)
    fig.savefig(path)


def plot_filters(weight: np.ndarray, path: str | os.PathLike, title: str = "first-layer filters") -> None:
    """Each filter of a conv weight (K, C, R, S) as an image (channel 0; blue < 0 < red)."""
    w = np.asarray(weight)[:, 0]
    k = len(w)
    cols = min(k, 8)
    rows = -(-k // cols)
    fig = _figure(1.3 * cols + 1, 1.3 * rows + 0.6)
    axes = np.atleast_1d(fig.subplots(rows, cols)).ravel()
    vmax = float(np.abs(w).max()) or 1.0
    for i, ax in enumerate(axes):
        ax.set_xticks([])
        ax.set_yticks([])
        if i < k:
            im = ax.imshow(w[i], cmap="RdBu_r", vmin=-vmax, vmax=vmax)
            ax.set_title(f"{i}", fontsize=8)
        else:
            ax.axis("off")
    fig.colorbar(im, ax=axes.tolist(), shrink=0.8)
    fig.suptitle(title)
    fig.savefig(path)


def plot_feature_maps(model: Sequential, image: np.ndarray, path: str | os.PathLike, *, label: int | None = None,
                      class_names: Sequence[str] | None = None, max_channels: int = 8) -> None:
    """One image and the activations it produces after every ReLU with a 4-D output
    (up to ``max_channels`` channels per layer), plus the predicted class."""
    was_training = model.training
    model.eval()
    try:
        outputs = model.forward_all(np.asarray(image)[None])
    finally:
        model.train(was_training)
    maps = [(f"layer {i}\n{type(model[i - 1]).__name__}+ReLU", out[0])
            for i, (layer, out) in enumerate(zip(model, outputs))
            if i > 0 and out.ndim == 4 and type(layer).__name__ == "ReLU"]
    probs = np.exp(outputs[-1][0] - outputs[-1][0].max())
    probs /= probs.sum()
    names = list(class_names) if class_names is not None else [str(c) for c in range(len(probs))]
    cols = max_channels
    fig = _figure(1.3 * cols + 1, 1.5 * (len(maps) + 1) + 0.4)
    axes = np.atleast_2d(fig.subplots(len(maps) + 1, cols))
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_frame_on(False)
    axes[0, 0].imshow(np.asarray(image)[0], cmap="gray")
    axes[0, 0].set_ylabel("input", fontsize=9)
    truth = "" if label is None else f"true class: {names[label]},  "
    fig.suptitle(f"{truth}predicted: {names[int(probs.argmax())]} (p = {probs.max():.3f})", fontsize=11)
    for row, (name, fmap) in enumerate(maps, start=1):
        axes[row, 0].set_ylabel(name, fontsize=9)
        for c in range(min(cols, len(fmap))):
            axes[row, c].imshow(fmap[c], cmap="viridis")
            axes[row, c].set_title(f"channel {c}", fontsize=7)
    fig.savefig(path)


def plot_confusion(cm: np.ndarray, path: str | os.PathLike, class_names: Sequence[str] | None = None,
                   title: str = "confusion matrix (test set)") -> None:
    """Counts of (true class, predicted class), annotated."""
    cm = np.asarray(cm)
    n = len(cm)
    names = list(class_names) if class_names is not None else [str(i) for i in range(n)]
    size = 2.5 + 0.45 * n
    fig = _figure(size + 1, size)
    ax = fig.subplots()
    im = ax.imshow(cm, cmap="Blues")
    ax.set(xticks=range(n), yticks=range(n), xticklabels=names, yticklabels=names, xlabel="predicted",
           ylabel="true", title=f"{title}\naccuracy {np.trace(cm) / max(cm.sum(), 1):.4f}")
    threshold = cm.max() / 2
    for i in range(n):
        for j in range(n):
            ax.text(j, i, str(cm[i, j]), ha="center", va="center", fontsize=8,
                    color="white" if cm[i, j] > threshold else "black")
    fig.colorbar(im, ax=ax, shrink=0.8)
    fig.savefig(path)


def first_conv(model: Module):
    """The first Conv2d of a model (None when it has none)."""
    from .layers import Conv2d

    return next((m for m in model.modules() if isinstance(m, Conv2d)), None)
