#!/usr/bin/env python3
"""The EMA slot, SparseAdam and Adafactor against what torch does (CPU).

    python benchmarks/bench_more.py                 # all three
    python benchmarks/bench_more.py --only ema --repeats 15

ema        Adam on one 16M-element tensor and on 1000 x 16K, float32: the step with the
           EMA slot (fusedopt: 36 bytes per element), the step then fusedopt's EMA rule
           (a second pass: 28 + 12 = 40), the step then torch's EMA update
           (torch.optim.swa_utils' get_ema_multi_avg_fn, as AveragedModel runs it after
           a step), and the step alone; GB/s counts each row's ideal bytes.
sparse     SparseAdam on an embedding table of 200K x 128 float32 rows, a batch of 4096
           indices (repeats included) per step: fusedopt.torch.SparseAdam against
           torch.optim.SparseAdam, and dense Adam (fusedopt.torch) over the whole table.
adafactor  Adafactor on GPT-2 small's block matrices and vectors (2 blocks): fusedopt.torch
           against torch.optim.Adafactor (its default for-loop, and foreach=True); GB/s
           counts 24 bytes per element of a matrix and 32 of a vector.

Every pair is checked (the same results within rounding) before it is timed; times are
medians over interleaved rounds, ratios taken within the run.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import numpy as np
import torch

import fusedopt as fo
import fusedopt.torch as fot
from fusedopt import _ema
from fusedopt import functional as F

M = 1 << 20
K = 1 << 10


def timed(steps, repeats):
    """Median seconds of each step, the steps interleaved round by round (one untimed call
    before each timed one)."""
    times = {name: [] for name in steps}
    for _ in range(repeats):
        for name, fn in steps.items():
            fn()
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) for name, t in times.items()}


def report(title, med, nbytes, base):
    print(f"\n{title}")
    print(f"{'implementation':52s} {'ms':>9s} {'GB/s':>7s} {'vs ' + base:>12s}")
    for name, t in med.items():
        gbs = f"{nbytes[name] / t / 1e9:7.1f}" if nbytes.get(name) else "      -"
        print(f"{name:52s} {1e3 * t:9.2f} {gbs} {med[base] / t:11.2f}x")


# --- EMA ---------------------------------------------------------------------------------------

def bench_ema(repeats):
    for shapes_name, shapes in (("1x16M", [(16 * M,)]), ("1000x16K", [(16 * K,)] * 1000)):
        rng = np.random.default_rng(0)
        numel = sum(s[0] for s in shapes)
        p0 = [rng.standard_normal(s).astype(np.float32) for s in shapes]
        g = [rng.standard_normal(s).astype(np.float32) * 1e-3 for s in shapes]
        kw = dict(step=2, lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8)

        def setup():
            return ([p.copy() for p in p0], [np.zeros_like(p) for p in p0],
                    [np.zeros_like(p) for p in p0], [p.copy() for p in p0])

        fused, twopass, torchema, plain = setup(), setup(), setup(), setup()
        t_ema = [torch.from_numpy(e) for e in torchema[3]]
        t_par = [torch.from_numpy(p) for p in torchema[0]]
        ema_fn = torch.optim.swa_utils.get_ema_multi_avg_fn(0.999)
        steps = {
            "Adam + EMA slot (one pass)": lambda: F.adam_(
                fused[0], g, fused[1], fused[2], **kw, ema=fused[3], ema_decay=0.999),
            "Adam, then fusedopt's EMA rule (two passes)": lambda: (
                F.adam_(twopass[0], g, twopass[1], twopass[2], **kw),
                _ema.plan(twopass[3], twopass[0], 0.999).run()),
            "Adam, then torch's EMA update (AveragedModel)": lambda: (
                F.adam_(torchema[0], g, torchema[1], torchema[2], **kw),
                ema_fn(t_ema, t_par, None)),
            "Adam alone": lambda: F.adam_(plain[0], g, plain[1], plain[2], **kw),
        }
        for fn in steps.values():  # the check: the same params and averages everywhere
            fn()
        for a, b in zip(fused[3] + fused[0], torchema[3] + torchema[0]):
            if not np.array_equal(a, b):
                raise SystemExit("EMA: the fused step differs from step + torch's update")
        med = timed(steps, repeats)
        nbytes = {"Adam + EMA slot (one pass)": 36 * numel,
                  "Adam, then fusedopt's EMA rule (two passes)": 40 * numel,
                  "Adam, then torch's EMA update (AveragedModel)": 40 * numel,
                  "Adam alone": 28 * numel}
        report(f"EMA with Adam, {shapes_name} float32, threads {fo.get_num_threads()}", med,
               nbytes, "Adam, then torch's EMA update (AveragedModel)")


# --- SparseAdam ----------------------------------------------------------------------------------

def bench_sparse(repeats):
    rows, dim, batch = 200_000, 128, 4096
    torch.manual_seed(0)
    emb = [torch.nn.Embedding(rows, dim, sparse=True) for _ in range(2)]
    emb[1].load_state_dict(emb[0].state_dict())
    dense = torch.nn.Embedding(rows, dim)
    dense.load_state_dict(emb[0].state_dict())
    opts = {"fusedopt.torch.SparseAdam": fot.SparseAdam(emb[0].parameters(), lr=1e-3),
            "torch.optim.SparseAdam": torch.optim.SparseAdam(emb[1].parameters(), lr=1e-3),
            "fusedopt.torch.Adam, dense (whole table)": fot.Adam(dense.parameters(), lr=1e-3)}
    g = torch.Generator().manual_seed(1)
    idx = torch.randint(0, rows, (batch,), generator=g)
    models = [emb[0], emb[1], dense]
    for m in models:
        m.zero_grad()
        m(idx).sum().backward()
    steps = {name: opt.step for name, opt in opts.items()}
    for fn in list(steps.values())[:2]:
        fn()
    if not torch.allclose(emb[0].weight, emb[1].weight, rtol=1e-5, atol=1e-7):
        raise SystemExit("SparseAdam: fusedopt and torch differ")
    med = timed(steps, repeats)
    touched = int(torch.unique(idx).numel())
    nbytes = {"fusedopt.torch.SparseAdam": 28 * touched * dim,
              "torch.optim.SparseAdam": 28 * touched * dim,
              "fusedopt.torch.Adam, dense (whole table)": 28 * rows * dim}
    report(f"SparseAdam, {rows} x {dim} float32 table, {batch} indices ({touched} rows), "
           f"threads {torch.get_num_threads()}", med, nbytes, "torch.optim.SparseAdam")


# --- Adafactor ------------------------------------------------------------------------------------

def bench_adafactor(repeats, layers=2):
    d = 768
    shapes = []
    for _ in range(layers):
        shapes += [(d,), (d,), (d, 3 * d), (3 * d,), (d, d), (d,), (d,), (d,), (d, 4 * d),
                   (4 * d,), (4 * d, d), (d,)]
    torch.manual_seed(0)
    base = [torch.randn(s) * 0.02 for s in shapes]
    grads = [torch.randn(s) for s in shapes]

    def params():
        ps = [torch.nn.Parameter(b.clone()) for b in base]
        for p, gr in zip(ps, grads):
            p.grad = gr.clone()
        return ps

    sets = {"fusedopt.torch.Adafactor": (fot.Adafactor, {}),
            "torch.optim.Adafactor (for-loop)": (torch.optim.Adafactor, {}),
            "torch.optim.Adafactor (foreach=True)": (torch.optim.Adafactor,
                                                     {"foreach": True})}
    opts, ps_of = {}, {}
    for name, (cls, extra) in sets.items():
        ps_of[name] = params()
        opts[name] = cls(ps_of[name], lr=1e-2, **extra)
    steps = {name: opt.step for name, opt in opts.items()}
    for fn in steps.values():
        fn()
    ref = ps_of["torch.optim.Adafactor (for-loop)"]
    for p, q in zip(ps_of["fusedopt.torch.Adafactor"], ref):
        if not torch.allclose(p, q, rtol=1e-4, atol=1e-6):
            raise SystemExit("Adafactor: fusedopt and torch differ")
    med = timed(steps, repeats)
    mat = sum(a * b for s in shapes if len(s) == 2 for a, b in [s])
    vec = sum(s[0] for s in shapes if len(s) == 1)
    nbytes = {name: 24 * mat + 32 * vec for name in steps}
    report(f"Adafactor, GPT-2 small ({layers} blocks: {mat / 1e6:.1f}M matrix and "
           f"{vec / 1e3:.0f}K vector elements) float32, threads {torch.get_num_threads()}",
           med, {"fusedopt.torch.Adafactor": nbytes["fusedopt.torch.Adafactor"]},
           "torch.optim.Adafactor (for-loop)")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", choices=["ema", "sparse", "adafactor"])
    ap.add_argument("--repeats", type=int, default=9)
    args = ap.parse_args()
    if args.only in (None, "ema"):
        bench_ema(args.repeats)
    if args.only in (None, "sparse"):
        bench_sparse(args.repeats)
    if args.only in (None, "adafactor"):
        bench_adafactor(args.repeats)


if __name__ == "__main__":
    main()
