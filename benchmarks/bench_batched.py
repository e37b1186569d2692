#!/usr/bin/env python3
"""Batched optimizer benchmark: K members in one fused call against K optimizer calls.

    python benchmarks/bench_batched.py                        # K = 16, three small models
    python benchmarks/bench_batched.py --members 4,16,64 --models mlp --markdown

For each algorithm, model and member count it builds K copies of the model's parameter
list and compares, in the same run:

- separate: K `fusedopt` optimizers (`SGD`, `Adam`, `AdamW`), each on its own arrays,
  stepped one after the other, which is what a search or an ensemble does without
  `fusedopt.batched`;
- batched: one `fusedopt.batched` optimizer over the K stacked copies, every member
  with its own learning rate (and betas / momentum), stepped in one call.

Both are first checked to give the same parameters (bit for bit) after two steps. It
prints the median time per step of all K members, and the speedup (separate / batched).
The batched call may be large enough for the CPU driver to use several threads where
each separate call uses one; `--threads 1` compares the host overhead alone (and avoids
waiting for a second thread on a machine whose cores are busy with other work).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "python"))

import fusedopt as fo  # noqa: E402
from fusedopt import batched  # noqa: E402
from fusedopt.bench._measure import median_time  # noqa: E402

# Parameter shapes of small models.
MODELS = {
    "logreg": [(64, 10), (10,)],                                 # 650 elements
    "mlp": [(64, 32), (32,), (32, 10), (10,)],                   # 2410
    "mlp3": [(64, 128), (128,), (128, 64), (64,), (64, 10), (10,)],  # 17226
}
ALGOS = ["sgd_momentum", "adam", "adamw"]


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--members", default="16", help="comma-separated member counts (default 16)")
    ap.add_argument("--models", default=",".join(MODELS),
                    help="comma-separated models: " + ", ".join(MODELS))
    ap.add_argument("--algos", default=",".join(ALGOS), help="comma-separated: " + ", ".join(ALGOS))
    ap.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    ap.add_argument("--threads", type=int, default=0, help="fusedopt threads (default: all)")
    ap.add_argument("--repeats", type=int, default=200, help="timed steps per measurement")
    ap.add_argument("--markdown", action="store_true", help="print a Markdown table")
    return ap.parse_args(argv)


def settings(algo, k):
    """Per-member hyperparameters: K different learning rates, and more."""
    lrs = list(np.logspace(-4, -1, k))
    if algo == "sgd_momentum":
        return dict(lr=lrs, momentum=list(np.linspace(0.5, 0.95, k)))
    return dict(lr=lrs, betas=[(0.9, b) for b in np.linspace(0.99, 0.999, k)])


def separate_optimizers(algo, members_params, hyper):
    out = []
    for k, params in enumerate(members_params):
        if algo == "sgd_momentum":
            out.append(fo.SGD(params, lr=hyper["lr"][k], momentum=hyper["momentum"][k]))
        else:
            cls = fo.Adam if algo == "adam" else fo.AdamW
            out.append(cls(params, lr=hyper["lr"][k], betas=hyper["betas"][k]))
    return out


def batched_optimizer(algo, stacked, hyper):
    cls = {"sgd_momentum": batched.BatchedSGD, "adam": batched.BatchedAdam,
           "adamw": batched.BatchedAdamW}[algo]
    return cls(stacked, **hyper)


def run_case(algo, model, k, dtype, repeats, rng):
    shapes = MODELS[model]
    init = [rng.standard_normal(s).astype(dtype) for s in shapes]
    hyper = settings(algo, k)
    members = [[a.copy() for a in init] for _ in range(k)]
    stacked = batched.stack(init, k)
    separate = separate_optimizers(algo, members, hyper)
    together = batched_optimizer(algo, stacked, hyper)
    grads = [[rng.standard_normal(s).astype(dtype) for s in shapes] for _ in range(k)]
    stacked_grads = [np.stack([grads[m][j] for m in range(k)]) for j in range(len(shapes))]

    # correctness: the same parameters after two steps, bit for bit
    for _ in range(2):
        for opt, g in zip(separate, grads):
            opt.step(g)
        together.step(stacked_grads)
    for m in range(k):
        for j in range(len(shapes)):
            if not np.array_equal(members[m][j], stacked[j][m]):
                raise SystemExit(f"{algo}/{model}: member {m} param {j} differs")

    def step_separate():
        for opt, g in zip(separate, grads):
            opt.step(g)

    def step_batched():
        together.step(stacked_grads)

    t_sep = median_time(step_separate, repeats, warmup=10)
    t_bat = median_time(step_batched, repeats, warmup=10)
    elements = sum(int(np.prod(s)) for s in shapes)
    return dict(algo=algo, model=model, members=k, elements=elements,
                separate_us=t_sep * 1e6, batched_us=t_bat * 1e6, speedup=t_sep / t_bat)


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        fo.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    rows = []
    for algo in args.algos.split(","):
        for model in args.models.split(","):
            for k in (int(x) for x in args.members.split(",")):
                rows.append(run_case(algo, model, k, np.dtype(args.dtype), args.repeats, rng))
    head = ["algorithm", "model", "elements/member", "K", "separate µs", "batched µs", "speedup"]
    lines = [[r["algo"], r["model"], str(r["elements"]), str(r["members"]),
              f"{r['separate_us']:.1f}", f"{r['batched_us']:.1f}", f"{r['speedup']:.1f}x"]
             for r in rows]
    print(f"fusedopt batched step, {args.dtype}, {fo.get_num_threads()} threads, "
          f"median of {args.repeats} steps (time for all K members)")
    if args.markdown:
        print("| " + " | ".join(head) + " |")
        print("|" + "---|" * len(head))
        for line in lines:
            print("| " + " | ".join(line) + " |")
    else:
        widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(head)]
        print("  ".join(h.rjust(w) for h, w in zip(head, widths)))
        for line in lines:
            print("  ".join(c.rjust(w) for c, w in zip(line, widths)))
    return rows


if __name__ == "__main__":
    main()
