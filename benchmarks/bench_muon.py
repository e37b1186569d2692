#!/usr/bin/env python3
"""Muon: ms per step against torch.optim.Muon, on GPT-2 small's hidden 2-D weights.

    python benchmarks/bench_muon.py                        # CPU, 2 transformer blocks
    python benchmarks/bench_muon.py --layers 12 --device cuda --repeats 20

The workload is the 2-D weights of GPT-2 small's transformer blocks (per block:
attn.c_attn 768 x 2304, attn.c_proj 768 x 768, mlp.c_fc 768 x 3072, mlp.c_proj
3072 x 768; `--layers` blocks; the embeddings are not Muon's and left out), float32
params and gradients. Rows:

- torch.optim.Muon: one Newton-Schulz iteration per matrix, in bfloat16 (torch's code);
- fusedopt.torch.Muon: the same iteration batched over the matrices of one shape (one
  torch.bmm / baddbmm per operation), in bfloat16, with the momentum and the update as
  fused passes; and with ``ns_dtype="float32"``;
- fusedopt.Muon on NumPy arrays (CPU only): the batched iteration through np.matmul,
  float32, and bfloat16 emulated (float32 products rounded to bfloat16).

Each implementation's first step is checked against torch.optim.Muon's (same update
directions within bfloat16's tolerance, or float32 against float64 for the float32
rows) before it is timed; the median of the repeats is reported, with the ratio of
torch's median to it.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

import fusedopt as fo
import fusedopt.torch as fot
from fusedopt import reference as R
from fusedopt.algorithms.muon import adjusted_lr

D = 768
LR, WD = 0.02, 0.1


def gpt2_block_shapes(layers):
    return [(D, 3 * D), (D, D), (D, 4 * D), (4 * D, D)] * layers


def directions(before, after, shapes):
    return [(b.astype(np.float64) * (1 - LR * WD) - a.astype(np.float64)) /
            adjusted_lr(LR, None, s) for b, a, s in zip(before, after, shapes)]


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=0, help="CPU threads (0: as configured)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
        fo.set_num_threads(args.threads)
    shapes = gpt2_block_shapes(args.layers)
    rng = np.random.default_rng(0)
    start = [rng.standard_normal(s).astype(np.float32) * 0.02 for s in shapes]
    grads = [rng.standard_normal(s).astype(np.float32) for s in shapes]
    dev = torch.device(args.device)

    def torch_params():
        ps = [torch.nn.Parameter(torch.from_numpy(p.copy()).to(dev)) for p in start]
        for p, g in zip(ps, grads):
            p.grad = torch.from_numpy(g).to(dev)
        return ps

    rows = {}
    tp = torch_params()
    rows["torch.optim.Muon (bfloat16)"] = (torch.optim.Muon(tp, lr=LR, weight_decay=WD), tp,
                                           "bfloat16")
    for ns in ("bfloat16", "float32"):
        ps = torch_params()
        rows[f"fusedopt.torch.Muon ({ns})"] = (fot.Muon(ps, lr=LR, weight_decay=WD,
                                                        ns_dtype=ns), ps, ns)
    if args.device == "cpu":
        for ns in ("float32", "bfloat16"):
            ps = [p.copy() for p in start]
            rows[f"fusedopt.Muon, NumPy ({ns})"] = (fo.Muon(ps, lr=LR, weight_decay=WD,
                                                            ns_dtype=ns), ps, ns)

    def host(ps):
        return [p.detach().cpu().numpy().copy() if isinstance(p, torch.Tensor) else p.copy()
                for p in ps]

    def step(name):
        opt, ps, _ = rows[name]
        if isinstance(ps[0], np.ndarray):
            opt.step(grads)
        else:
            opt.step()
        sync(args.device)

    # the check: the first step's directions against torch's (bfloat16) or float64's
    want_bf16, want_f64 = None, None
    for name, (opt, ps, ns) in rows.items():
        before = host(ps)
        step(name)
        got = directions(before, host(ps), shapes)
        if want_bf16 is None:
            want_bf16 = got
            ref_p, _ = R.muon([p.astype(np.float64) for p in start], grads,
                              [np.zeros(s) for s in shapes], lr=LR, weight_decay=WD)
            want_f64 = directions(start, ref_p, shapes)
        want, tol = (want_f64, 1e-3) if ns == "float32" else (want_bf16, 3e-2)
        err = max(float(np.abs(a - b).max() / np.abs(b).max()) for a, b in zip(got, want))
        status = "ok" if err <= tol else "MISMATCH"
        print(f"check {name}: max relative difference {err:.2e} ({status})")
        if status != "ok":
            raise SystemExit(1)

    times = {name: [] for name in rows}
    for _ in range(args.repeats):
        for name in rows:
            t0 = time.perf_counter()
            step(name)
            times[name].append(time.perf_counter() - t0)
    base = statistics.median(times["torch.optim.Muon (bfloat16)"])
    numel = sum(a * b for a, b in shapes)
    print(f"\nMuon step, {len(shapes)} matrices of GPT-2 small ({args.layers} blocks, "
          f"{numel / 1e6:.1f}M elements), {args.device}, threads {torch.get_num_threads()}, "
          f"median of {args.repeats}")
    print(f"{'implementation':36s} {'ms/step':>10s} {'vs torch':>9s}")
    for name in rows:
        med = statistics.median(times[name])
        print(f"{name:36s} {1e3 * med:10.1f} {base / med:8.2f}x")


if __name__ == "__main__":
    main()
