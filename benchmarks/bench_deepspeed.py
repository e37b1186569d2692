#!/usr/bin/env python3
"""fusedopt.torch against DeepSpeedCPUAdam on the flat partitions of ZeRO-Offload.

    DS_ACCELERATOR=cpu PYTHONPATH=python python3 benchmarks/bench_deepspeed.py \\
        [--sizes 1M,16M,62M] [--algo adamw] [--threads 2] [--repeats 15]

With `offload_optimizer: cpu`, DeepSpeed's ZeRO steps one flat float32 partition per
rank on the CPU (a model's elements / ranks, e.g. 62M for GPT-2 small over 2 ranks).
This times that step, each implementation on a partition of its own (param, .grad,
state), all from the same values:

- fusedopt.torch.AdamW (or Adam, Adagrad): the client optimizer DeepSpeed calls when
  the config sets "zero_force_ds_cpu_optimizer": false;
- DeepSpeedCPUAdam (adamw_mode for AdamW) or DeepSpeedCPUAdagrad: what DeepSpeed uses
  by default (its C++ op, built on first use with the host compiler: minutes);
- torch.optim.X(fused=True), for reference;
- the limit: an in-place streaming kernel with the algorithm's reads and writes
  (28 bytes per element for Adam, 20 for Adagrad) on fusedopt's buffers.

Before timing, three steps of each are compared with fusedopt's (float32 rounding).
Steps are timed in interleaved rounds (an untimed call, then a timed one, in an order
shuffled each round; see _measure.time_rounds); times are medians, and `vs fusedopt`
is the median over rounds of the row's time / fusedopt's time (above 1: fusedopt is
faster).
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _measure  # noqa: E402
from _report import _cpu_model  # noqa: E402

BYTES = {"adam": 28, "adamw": 28, "adagrad": 20}
STREAM = {"adam": "stream2", "adamw": "stream2", "adagrad": "stream1"}
OPTIONS = {"adam": {"lr": 1e-3, "weight_decay": 0.0}, "adamw": {"lr": 1e-3, "weight_decay": 1e-2},
           "adagrad": {"lr": 1e-2}}


def parse_size(text):
    text = text.strip().upper()
    scale = {"K": 2 ** 10, "M": 2 ** 20, "G": 2 ** 30}.get(text[-1], 1)
    return int(float(text.rstrip("KMG")) * scale)


def partition(n, seed=0):
    """A flat float32 partition with its gradient, as ZeRO-Offload hands it over."""
    import torch

    g = torch.Generator().manual_seed(seed)
    p = torch.nn.Parameter(torch.randn(n, generator=g))
    p.grad = torch.randn(n, generator=g) * 1e-2
    return p


def optimizers(algo, n):
    """label -> (param, optimizer) for each implementation, on partitions of their own."""
    import torch

    import fusedopt.torch as fot

    name = {"adam": "Adam", "adamw": "AdamW", "adagrad": "Adagrad"}[algo]
    out = {}
    p = partition(n)
    out[f"fusedopt.torch.{name}"] = (p, getattr(fot, name)([p], **OPTIONS[algo]))
    p = partition(n)
    if algo == "adagrad":
        from deepspeed.ops.adagrad import DeepSpeedCPUAdagrad

        out["DeepSpeedCPUAdagrad"] = (p, DeepSpeedCPUAdagrad([p], **OPTIONS[algo]))
    else:
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        out["DeepSpeedCPUAdam"] = (p, DeepSpeedCPUAdam([p], adamw_mode=algo == "adamw",
                                                       **OPTIONS[algo]))
    p = partition(n)
    out[f"torch.optim.{name} fused"] = (p, getattr(torch.optim, name)([p], fused=True,
                                                                       **OPTIONS[algo]))
    return out


def check(opts):
    """Three steps of every implementation agree with fusedopt's to float32 rounding."""
    (label0, (p0, _)), *others = opts.items()
    for _, (_, opt) in opts.items():
        for _ in range(3):
            opt.step()
    for label, (p, _) in others:
        if not np.allclose(p.detach().numpy(), p0.detach().numpy(), rtol=1e-5, atol=1e-7):
            worst = np.max(np.abs(p.detach().numpy() - p0.detach().numpy()))
            raise SystemExit(f"{label} differs from {label0} after 3 steps (max |diff| {worst})")


def limit_step(algo, p, opt):
    """The streaming kernel on the buffers of fusedopt's step."""
    from fusedopt import _arrays, _cpu

    names = ["sum"] if algo == "adagrad" else ["exp_avg", "exp_avg_sq"]
    state = opt.state[p]
    prep = _arrays.prepare("limit", [p.detach().numpy()], [p.grad.numpy()],
                           [[state[k].numpy()] for k in names], names)
    (dtype, ptrs, sizes), = prep.groups
    layout = prep.layouts[0]
    hyper = np.array([0.0])
    kernel = STREAM[algo]

    def step():
        _cpu.step(kernel, dtype, ptrs, sizes, hyper, **layout)

    step.keep = prep
    return step


def run(algo, n, repeats):
    opts = optimizers(algo, n)
    check(opts)
    labels = list(opts)
    p0, opt0 = opts[labels[0]]
    steps = [limit_step(algo, p0, opt0)] + [opt.step for _, opt in opts.values()]
    _measure.collect()
    times = _measure.time_rounds(steps, repeats)
    rows = []
    for label, t in zip(["limit (" + STREAM[algo] + ")"] + labels, times):
        median = statistics.median(x for x in t if x is not None)
        rows.append((label, median, _measure.paired_ratio(t, times[1]),
                     _measure.paired_ratio(times[0], t)))
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1M,16M,62M",
                        help="partition sizes in elements (K, M, G suffixes)")
    parser.add_argument("--algo", default="adamw", choices=sorted(BYTES))
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args(argv)
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    import torch

    import fusedopt

    torch.set_num_threads(args.threads)
    fusedopt.set_num_threads(args.threads)
    import deepspeed

    date = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    print(f"fusedopt {fusedopt.__version__} vs DeepSpeed {deepspeed.__version__} on "
          f"ZeRO-Offload partitions: {args.algo}, float32, {args.threads} threads, "
          f"ISA {fusedopt._cpu.get_isa()}")
    print(f"{_cpu_model()}, {os.cpu_count()} cores; torch {torch.__version__}; {date}, "
          f"load average {os.getloadavg()[0]:.2f} (other work on the machine adds noise)")
    print()
    print(f"{'partition':>10}  {'implementation':<28} {'ms/step':>9} {'GB/s':>7} "
          f"{'% limit':>8} {'vs fusedopt':>12}")
    print("-" * 80)
    start = time.perf_counter()
    for text in args.sizes.split(","):
        n = parse_size(text)
        for k, (label, t, vs, frac) in enumerate(run(args.algo, n, args.repeats)):
            gbs = BYTES[args.algo] * n / t / 1e9
            print(f"{text if k == 0 else '':>10}  {label:<28} {t * 1e3:9.3f} {gbs:7.1f} "
                  f"{frac * 100:8.1f} {'' if k < 2 else f'{vs:11.2f}x':>12}")
    print()
    print("% limit: the median over rounds of the streaming kernel's time on fusedopt's buffers "
          "/ the row's time.\nvs fusedopt: the median over rounds of the row's time / "
          "fusedopt's (above 1: fusedopt is faster).")
    print(f"wall time: {time.perf_counter() - start:.1f} s, load average now "
          f"{os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
