"""Hand-made convolution features before learned ones: fixed Sobel / sharpen filters.

    python examples/sobel_features.py [--backend auto]

The classic motivation for CNNs: convolve each MNIST digit with a few fixed 3x3 filters
(horizontal and vertical Sobel, a sharpen kernel, a Laplacian) using fastconv.conv2d,
apply ReLU, max-pool 2x2, and feed the resulting feature maps to a softmax regression
(one nn.Linear layer trained with Adam).  The same classifier on the raw pixels is the
baseline; both see 784 numbers per digit (4 maps x 14 x 14 after pooling, or 28 x 28).  Runs on the offline MNIST subset unless the full data set is cached.
"""

import argparse

import numpy as np

import fastconv
from fastconv import nn
from fastconv.data import load_mnist

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--backend", default=None)
parser.add_argument("--epochs", type=int, default=15)
parser.add_argument("--seed", type=int, default=0)
args = parser.parse_args()

FILTERS = {
    "sobel-x (vertical edges)": [[-1, 0, 1], [-2, 0, 2], [-1, 0, 1]],
    "sobel-y (horizontal edges)": [[-1, -2, -1], [0, 0, 0], [1, 2, 1]],
    "sharpen": [[0, -1, 0], [-1, 5, -1], [0, -1, 0]],
    "laplacian": [[0, 1, 0], [1, -4, 1], [0, 1, 0]],
}
weight = np.array(list(FILTERS.values()), dtype=np.float32)[:, None]  # (4, 1, 3, 3)


def features(x: np.ndarray) -> np.ndarray:
    """Fixed conv -> ReLU -> 2x2 max-pool -> flatten: (N, 1, 28, 28) -> (N, 4 * 14 * 14)."""
    maps = fastconv.conv2d(x, weight, padding=1, backend=args.backend)
    pooled = fastconv.max_pool2d(np.maximum(maps, 0), 2, backend=args.backend)
    return pooled.reshape(len(x), -1)


def softmax_regression(x_train, y_train, x_test, y_test, name):
    mean, std = x_train.mean(0), x_train.std(0) + 1e-3  # standardise each feature
    x_train, x_test = (x_train - mean) / std, (x_test - mean) / std
    model = nn.Sequential(nn.Linear(x_train.shape[1], 10, rng=args.seed))
    history = nn.fit(model, nn.Adam(model.parameters(), lr=1e-3), x_train, y_train, epochs=args.epochs,
                     batch_size=64, x_test=x_test, y_test=y_test, rng=args.seed, log=None)
    final = history.epochs[-1]
    print(f"  {name:<38} {x_train.shape[1]:>5} features  train acc {final.train_acc:.4f}  "
          f"test acc {final.test_acc:.4f}")
    return final.test_acc


data = load_mnist(download=False, rng=args.seed)
print(f"softmax regression, Adam lr 1e-3, batch 64, {args.epochs} epochs; fixed filters: {', '.join(FILTERS)}")
raw = softmax_regression(data.x_train.reshape(len(data.x_train), -1), data.y_train,
                         data.x_test.reshape(len(data.x_test), -1), data.y_test, "raw pixels")
conv = softmax_regression(features(data.x_train), data.y_train, features(data.x_test), data.y_test,
                          "Sobel/sharpen/Laplacian -> ReLU -> pool")
print(f"fixed convolution features: test accuracy {conv:.4f} vs {raw:.4f} on raw pixels "
      f"({(conv - raw) * 100:+.1f} points)")
