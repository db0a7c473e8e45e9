"""Train the reference CNN on the stripe task with fastconv.nn (a few seconds).

    python examples/train_stripes.py [--backend numpy] [--out runs/stripes-example]

Class 0 images hold a horizontal bright band, class 1 a vertical one; the network is
Conv(1,8,3,p1) ReLU MaxPool2 Conv(8,16,3,p1) ReLU GlobalAvgPool Linear(16,2), trained
with Adam (lr 0.01) for 60 full-batch epochs on 400 images, as in the design document.
"""

import argparse
from pathlib import Path

import numpy as np

from fastconv import nn
from fastconv.data import stripes_dataset
from fastconv.nn import plots

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--backend", default=None, help="fastconv backend (default: auto)")
parser.add_argument("--epochs", type=int, default=60)
parser.add_argument("--seed", type=int, default=0)
parser.add_argument("--out", default=None, help="also save weights and plots here")
args = parser.parse_args()

x_train, y_train, x_test, y_test = stripes_dataset(400, 200, rng=args.seed)
rng = np.random.default_rng(args.seed)
model = nn.stripes_net(rng=rng, backend=args.backend)
print(model)
optimizer = nn.Adam(model.parameters(), lr=0.01)
history = nn.fit(model, optimizer, x_train, y_train, epochs=args.epochs, batch_size=len(x_train),
                 x_test=x_test, y_test=y_test, rng=rng,
                 log=lambda line: print(line) if line.split()[1].split("/")[0] in {"1", "10", "20", "40", "60"}
                 else None)
loss, acc = nn.evaluate(model, x_test, y_test)
print(f"stripes: test accuracy {acc:.4f} (loss {loss:.3g}) on {len(x_test)} images after {args.epochs} epochs")

if args.out:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model.save(out / "weights.npz")
    plots.plot_history(history, out / "curves.png", title="stripes")
    plots.plot_filters(model[0].weight.data, out / "filters.png")
    plots.plot_feature_maps(model, x_test[0], out / "feature_maps.png", label=int(y_test[0]),
                            class_names=["horizontal", "vertical"])
    print(f"wrote weights and plots to {out}")
