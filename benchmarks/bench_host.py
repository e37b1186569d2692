"""Host cost of a step on small models: the time a step takes when the kernel's work is
negligible, so what is measured is the Python and binding overhead per step and per
tensor.

Two workloads:
  mlp    a 2-layer MLP (4 tensors: 32x64, 64, 64x10, 10), float32: microseconds per step
  tiny   N tensors of 4 elements (default 10000): microseconds per tensor per step

Implementations (each on its own copy of the same data): fusedopt's NumPy class
(`fo.AdamW` on NumPy arrays), fusedopt.torch (default and flat=True) and torch.optim's
fused CPU AdamW. One thread everywhere. Rounds are interleaved (every implementation
once per round, in a shuffled order) and the table shows medians over rounds, and each
median's ratio to torch fused's.

    python benchmarks/bench_host.py [--rounds 21] [--tiny 10000] [--data-ptr] [--json out.json]

`--data-ptr` adds fusedopt.torch rows that read the tensors' addresses through
`Tensor.data_ptr`, the way taken where torch exports no address reader.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time

import numpy as np

import fusedopt as fo


def _mlp_shapes():
    return [(64, 32), (64,), (10, 64), (10,)]


def _tiny_shapes(n):
    return [(4,)] * n


def _numpy_class(shapes, algo):
    rng = np.random.default_rng(0)
    params = [rng.standard_normal(s).astype(np.float32) for s in shapes]
    grads = [rng.standard_normal(s).astype(np.float32) for s in shapes]
    opt = getattr(fo, algo)(params, lr=1e-3)
    return lambda: opt.step(grads)


def _torch(shapes, algo, kind):
    import torch

    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(*s, generator=gen)) for s in shapes]
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen)
    if kind == "torch fused":
        opt = getattr(torch.optim, algo)(params, lr=1e-3, fused=True)
    else:
        import fusedopt.torch as fot

        opt = getattr(fot, algo)(params, lr=1e-3, flat=kind.endswith("flat"))
    return opt.step


def _with_data_ptr(step):
    """`step` with the tensors' addresses read through `Tensor.data_ptr`, as where torch
    exports no address reader (`fusedopt._foreign.tensor_addresses`)."""
    from fusedopt import _foreign

    def run():
        saved, _foreign._ADDRESS_READER = _foreign._ADDRESS_READER, 0
        try:
            step()
        finally:
            _foreign._ADDRESS_READER = saved
    return run


def implementations(shapes, algo, data_ptr=False):
    impls = {"fusedopt (NumPy class)": _numpy_class(shapes, algo)}
    try:
        import torch

        torch.set_num_threads(1)
    except ImportError:
        return impls
    for kind in ("fusedopt.torch", "fusedopt.torch flat", "torch fused"):
        impls[kind] = _torch(shapes, algo, kind)
        if data_ptr and kind != "torch fused":
            impls[f"{kind} (data_ptr)"] = _with_data_ptr(_torch(shapes, algo, kind))
    return impls


def measure(impls, rounds, steps):
    for f in impls.values():  # warm up: state made, plans kept
        for _ in range(3):
            f()
    times = {k: [] for k in impls}
    order = list(impls)
    for _ in range(rounds):
        random.shuffle(order)
        for k in order:
            f = impls[k]
            t0 = time.perf_counter()
            for _ in range(steps):
                f()
            times[k].append((time.perf_counter() - t0) / steps)
    return {k: statistics.median(v) for k, v in times.items()}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--algo", default="AdamW")
    ap.add_argument("--rounds", type=int, default=21)
    ap.add_argument("--tiny", type=int, default=10000, help="tensors of the tiny workload")
    ap.add_argument("--data-ptr", action="store_true",
                    help="add fusedopt.torch rows that read the tensors' addresses through "
                         "Tensor.data_ptr instead of torch's exported reader")
    ap.add_argument("--json", help="write the medians as JSON")
    args = ap.parse_args(argv)
    fo.set_num_threads(1)
    out = {}
    for name, shapes, steps, per in (("mlp", _mlp_shapes(), 200, 1),
                                     ("tiny", _tiny_shapes(args.tiny), 5, args.tiny)):
        medians = measure(implementations(shapes, args.algo, args.data_ptr), args.rounds,
                          steps)
        ref = medians.get("torch fused")
        unit = "us/step" if per == 1 else "us/tensor"
        print(f"\n{name}: {len(shapes)} tensors, {args.algo}, medians of {args.rounds} rounds")
        for k, v in medians.items():
            ratio = f"{ref / v:6.2f}x" if ref else ""
            print(f"  {k:36s} {v * 1e6 / per:10.3f} {unit}  {ratio}")
        out[name] = {k: v * 1e6 / per for k, v in medians.items()}
    print("\nratio: torch fused's median / the row's (above 1: faster than torch fused)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
