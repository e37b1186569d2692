#!/usr/bin/env python3
"""Train a small NumPy MLP on scikit-learn's digits with every fusedopt optimizer.

    python examples/digits_demo.py --plot digits_loss.png
    python examples/digits_demo.py --epochs 60 --optimizers adam,lbfgs --ensemble 0

The model is a one-hidden-layer perceptron (64 -> 64 -> 10, tanh, softmax cross-entropy)
written in NumPy; the data set is the 8x8 digits bundled with scikit-learn (1797 images,
no download), split 80/20 into training and test sets. Every optimizer starts from the
same initial weights:

- mini-batch SGD, SGD with momentum, AdaGrad, RMSprop, AdaDelta and Adam take one step per
  mini-batch (`--batch-size`, default 32) for `--epochs` passes over the training set;
- L-BFGS (strong Wolfe line search) takes full-batch steps until it has evaluated the
  loss on the whole training set as many times as the others passed over it.

Then an ensemble of `--ensemble` MLPs (default 5, from different initial weights) is
trained with Adam, all members in one fused batched step, and its averaged prediction
is scored. The script prints a table of final training losses and test accuracies and,
with `--plot PATH`, writes the loss curves (training loss against passes over the data).
Needs scikit-learn; matplotlib for `--plot`; shows a tqdm progress bar when tqdm is
installed, a plain text bar otherwise.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

try:
    import fusedopt as fo
except ImportError:  # run from a source checkout without installing
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "python"))
    import fusedopt as fo

from fusedopt import batched
from fusedopt.lbfgs import LBFGS

OPTIMIZERS = {
    # name: (label, factory(params) -> optimizer)
    "sgd": ("SGD", lambda ps: fo.SGD(ps, lr=0.1)),
    "momentum": ("SGD + momentum", lambda ps: fo.SGD(ps, lr=0.05, momentum=0.9)),
    "adagrad": ("AdaGrad", lambda ps: fo.Adagrad(ps, lr=0.05)),
    "rmsprop": ("RMSprop", lambda ps: fo.RMSprop(ps, lr=1e-3)),
    "adadelta": ("AdaDelta", lambda ps: fo.Adadelta(ps, lr=1.0)),
    "adam": ("Adam", lambda ps: fo.Adam(ps, lr=2e-3)),
    "lbfgs": ("L-BFGS", lambda ps: LBFGS(ps, lr=1.0, max_iter=4, history_size=20,
                                         line_search_fn="strong_wolfe")),
}


# --- data and model ---------------------------------------------------------------------------

def load_data(seed=0):
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float64)
    y = digits.target.astype(np.int64)
    order = np.random.default_rng(seed).permutation(len(y))
    cut = int(0.8 * len(y))
    train, test = order[:cut], order[cut:]
    return x[train], y[train], x[test], y[test]


def init_params(sizes, rng):
    """Weights ~ N(0, 1/fan_in), zero biases: [W1, b1, W2, b2]."""
    params = []
    for fan_in, fan_out in zip(sizes[:-1], sizes[1:]):
        params.append(rng.standard_normal((fan_in, fan_out)) / np.sqrt(fan_in))
        params.append(np.zeros(fan_out))
    return params


def forward(params, x):
    """Logits and hidden activations. Works for one model ([W1, b1, W2, b2]) and for K
    stacked models (W1 of shape (K, 64, H), ...), with leading member axes."""
    w1, b1, w2, b2 = params
    h = np.tanh(x @ w1 + b1[..., None, :])
    return h @ w2 + b2[..., None, :], h


def softmax(logits):
    z = logits - logits.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def loss_and_grads(params, x, y):
    """Mean softmax cross-entropy and its gradients (for one model or K stacked models:
    then the loss has one value per member)."""
    logits, h = forward(params, x)
    p = softmax(logits)
    n = len(y)
    rows = np.arange(n)
    loss = -np.log(p[..., rows, y] + 1e-300).mean(axis=-1)
    d = p
    d[..., rows, y] -= 1.0
    d /= n
    w2 = params[2]
    dh = (d @ np.swapaxes(w2, -1, -2)) * (1.0 - h * h)
    xt = x.T
    grads = [xt @ dh, dh.sum(axis=-2), np.swapaxes(h, -1, -2) @ d, d.sum(axis=-2)]
    return loss, grads


def accuracy(params, x, y):
    return float((forward(params, x)[0].argmax(axis=-1) == y).mean())


def ensemble_predict(stacked, x):
    """The ensemble's prediction: the members' class probabilities, averaged."""
    return softmax(forward(stacked, x)[0]).mean(axis=0)


# --- progress ---------------------------------------------------------------------------------

class TextBar:
    """A minimal progress bar on stderr, for machines without tqdm."""

    def __init__(self, total, width=30, disable=False):
        self.total, self.n, self.width, self.disable = total, 0, width, disable
        self.text = ""

    def set_postfix_str(self, text):
        self.text = text

    def update(self, k=1):
        self.n += k
        if self.disable:
            return
        done = int(self.width * self.n / max(self.total, 1))
        sys.stderr.write(f"\r[{'#' * done}{'.' * (self.width - done)}] {self.n}/{self.total} "
                         f"{self.text:<40}")
        sys.stderr.flush()

    def close(self):
        if not self.disable:
            sys.stderr.write("\n")


def progress_bar(total, disable=False):
    try:
        from tqdm import tqdm
    except ImportError:
        return TextBar(total, disable=disable)
    return tqdm(total=total, disable=disable, unit="epoch", leave=False)


# --- training ---------------------------------------------------------------------------------

def train_first_order(make, params, data, epochs, batch_size, rng, bar, label):
    x, y = data[0], data[1]
    opt = make(params)
    curve = [float(loss_and_grads(params, x, y)[0])]
    for _ in range(epochs):
        order = rng.permutation(len(y))
        for start in range(0, len(y), batch_size):
            idx = order[start:start + batch_size]
            _, grads = loss_and_grads(params, x[idx], y[idx])
            opt.step(grads)
        curve.append(float(loss_and_grads(params, x, y)[0]))
        bar.set_postfix_str(f"{label}: loss {curve[-1]:.4f}")
        bar.update()
    return np.arange(epochs + 1, dtype=float), np.array(curve)


def train_lbfgs(make, params, data, epochs, bar, label):
    x, y = data[0], data[1]
    opt = make(params)
    evals, curve = [0.0], [float(loss_and_grads(params, x, y)[0])]

    def closure():
        return loss_and_grads(params, x, y)

    shown = 0
    while opt.state.get(0, {}).get("func_evals", 0) < epochs:
        before = opt.state.get(0, {}).get("func_evals", 0)
        opt.step(closure)
        after = opt.state[0]["func_evals"]
        if after == before + 1 and opt.state[0]["n_iter"] == 0:
            break  # converged: the gradient is below tolerance
        evals.append(float(after))
        curve.append(float(loss_and_grads(params, x, y)[0]))
        advance = min(int(after), epochs) - shown
        if advance > 0:
            bar.set_postfix_str(f"{label}: loss {curve[-1]:.4f}")
            bar.update(advance)
            shown += advance
    if shown < epochs:
        bar.update(epochs - shown)
    return np.array(evals), np.array(curve)


def train_ensemble(members, sizes, data, epochs, batch_size, seed, bar):
    """K MLPs from different initial weights, stepped together by one batched Adam."""
    x, y = data[0], data[1]
    rngs = [np.random.default_rng(seed + 1000 + k) for k in range(members)]
    inits = [init_params(sizes, r) for r in rngs]
    stacked = [np.stack([init[j] for init in inits]) for j in range(len(inits[0]))]
    opt = batched.BatchedAdam(stacked, lr=2e-3)
    rng = np.random.default_rng(seed + 1)
    for _ in range(epochs):
        order = rng.permutation(len(y))
        for start in range(0, len(y), batch_size):
            idx = order[start:start + batch_size]
            _, grads = loss_and_grads(stacked, x[idx], y[idx])
            opt.step(grads)  # all members, one fused call
        bar.set_postfix_str(f"ensemble of {members}")
        bar.update()
    return stacked


def run(args):
    """Train every optimizer; returns {name: result dict} (and "ensemble")."""
    if args.threads:
        fo.set_num_threads(args.threads)
    data = load_data(args.seed)
    x_train, y_train, x_test, y_test = data
    sizes = [x_train.shape[1], args.hidden, 10]
    init = init_params(sizes, np.random.default_rng(args.seed))
    names = [n.strip() for n in args.optimizers.split(",") if n.strip()]
    unknown = [n for n in names if n not in OPTIMIZERS]
    if unknown:
        raise SystemExit(f"unknown optimizers {unknown}; choose from {', '.join(OPTIMIZERS)}")
    total = args.epochs * (len(names) + (1 if args.ensemble else 0))
    bar = progress_bar(total, disable=args.no_progress)
    results = {}
    try:
        for name in names:
            label, make = OPTIMIZERS[name]
            params = [p.copy() for p in init]
            t0 = time.perf_counter()
            if name == "lbfgs":
                xs, curve = train_lbfgs(make, params, data, args.epochs, bar, label)
            else:
                xs, curve = train_first_order(make, params, data, args.epochs, args.batch_size,
                                              np.random.default_rng(args.seed + 1), bar, label)
            results[name] = dict(label=label, passes=xs, loss=curve,
                                 seconds=time.perf_counter() - t0,
                                 train_acc=accuracy(params, x_train, y_train),
                                 test_acc=accuracy(params, x_test, y_test))
        if args.ensemble:
            t0 = time.perf_counter()
            stacked = train_ensemble(args.ensemble, sizes, data, args.epochs, args.batch_size,
                                     args.seed, bar)
            probs = ensemble_predict(stacked, x_test)
            members = forward(stacked, x_test)[0].argmax(axis=-1) == y_test
            results["ensemble"] = dict(
                label=f"Adam ensemble of {args.ensemble} (batched)", members=args.ensemble,
                seconds=time.perf_counter() - t0,
                loss=np.array([float(loss_and_grads(stacked, x_train, y_train)[0].mean())]),
                member_test_acc=float(members.mean()),
                test_acc=float((probs.argmax(axis=-1) == y_test).mean()))
    finally:
        bar.close()
    return results


def table(results):
    lines = ["| optimizer | final train loss | test accuracy | seconds |", "|---|---|---|---|"]
    for r in results.values():
        extra = f" (members: {r['member_test_acc']:.1%})" if "member_test_acc" in r else ""
        lines.append(f"| {r['label']} | {r['loss'][-1]:.4f} | {r['test_acc']:.1%}{extra} | "
                     f"{r['seconds']:.1f} |")
    return "\n".join(lines)


def plot(results, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in results.values():
        if "passes" in r:
            ax.plot(r["passes"], r["loss"], label=r["label"], marker="." if len(r["loss"]) < 40
                    else None)
    ax.set_yscale("log")
    ax.set_xlabel("passes over the training set (L-BFGS: full-batch loss evaluations)")
    ax.set_ylabel("training loss (cross-entropy)")
    ax.set_title("MLP 64-64-10 on scikit-learn digits, fusedopt optimizers")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=30, help="passes over the training set (30)")
    ap.add_argument("--batch-size", type=int, default=32, help="mini-batch size (32)")
    ap.add_argument("--hidden", type=int, default=64, help="hidden units (64)")
    ap.add_argument("--optimizers", default=",".join(OPTIMIZERS),
                    help="comma-separated, from: " + ", ".join(OPTIMIZERS))
    ap.add_argument("--ensemble", type=int, default=5,
                    help="members of the batched Adam ensemble (5; 0 to skip)")
    ap.add_argument("--plot", metavar="PATH", help="write the loss curves to PATH (matplotlib)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0, help="fusedopt threads (default: all)")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    return ap.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    results = run(args)
    print(table(results))
    if args.plot:
        plot(results, args.plot)
        print(f"loss curves written to {args.plot}")
    return results


if __name__ == "__main__":
    main()
