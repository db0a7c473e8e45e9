"""A fully convolutional network with a 1x1-convolution head: a class score for every pixel.

    python examples/fcn_1x1.py [--backend auto]

Task: stripe images (see fastconv.data.make_stripes) where every pixel is labelled
0 = background, 1 = part of a horizontal band, 2 = part of a vertical band.  The model
Conv(1,16,3,p1) ReLU Conv(16,16,3,p2,dilation 2) ReLU Conv(16,3,1) keeps the 16x16
resolution; the last layer is a 1x1 convolution, i.e. the same linear classifier
applied at every pixel to that pixel's 16 features.  The loss is the cross-entropy
averaged over all pixels.
"""

import argparse

import numpy as np

from fastconv import nn
from fastconv.data import make_stripes

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--backend", default=None)
parser.add_argument("--epochs", type=int, default=15)
parser.add_argument("--seed", type=int, default=0)
args = parser.parse_args()


rng = np.random.default_rng(args.seed)


def make_split(n):
    seed = int(rng.integers(1 << 31))
    x, y = make_stripes(n, rng=seed)
    clean, _ = make_stripes(n, noise=0.0, rng=seed)  # same seed, same bands, no noise
    labels = np.where(clean[:, 0] == 1.0, (y + 1)[:, None, None], 0)  # (N, 16, 16) in {0, 1, 2}
    return x, labels.astype(np.int64)


x_train, t_train = make_split(400)
x_test, t_test = make_split(200)

model = nn.Sequential(
    nn.Conv2d(1, 16, 3, padding=1, rng=rng), nn.ReLU(),
    nn.Conv2d(16, 16, 3, padding=2, dilation=2, rng=rng), nn.ReLU(),
    nn.Conv2d(16, 3, 1, rng=rng),  # the 1x1 head: per-pixel class scores
    backend=args.backend,
)
print(model)
optimizer = nn.Adam(model.parameters(), lr=0.01)
criterion = nn.CrossEntropyLoss()


def per_pixel(scores):
    """(N, 3, H, W) scores -> (N*H*W, 3) rows for the loss."""
    return scores.transpose(0, 2, 3, 1).reshape(-1, 3)


for epoch in range(1, args.epochs + 1):
    order = rng.permutation(len(x_train))
    for start in range(0, len(x_train), 50):
        idx = order[start:start + 50]
        scores = model.forward(x_train[idx])
        loss = criterion(per_pixel(scores), t_train[idx].reshape(-1))
        grad = criterion.backward().reshape(len(idx), 16, 16, 3).transpose(0, 3, 1, 2)
        optimizer.zero_grad()
        model.backward(np.ascontiguousarray(grad), need_input=False)
        optimizer.step()
    if epoch % 10 == 0 or epoch == 1:
        print(f"epoch {epoch:>3}  loss (last batch) {loss:.4f}")

pred = nn.predict(model, x_test).argmax(axis=1)
acc = np.mean(pred == t_test)
ious = [np.sum((pred == c) & (t_test == c)) / np.sum((pred == c) | (t_test == c)) for c in (0, 1, 2)]
print(f"per-pixel test accuracy {acc:.4f}; IoU background {ious[0]:.3f}, horizontal band {ious[1]:.3f}, "
      f"vertical band {ious[2]:.3f} ({len(x_test)} images of 16x16)")
