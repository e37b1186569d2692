#!/usr/bin/env python3
"""fusedopt's Adam and torch's fused Adam on the very same buffers.

    python benchmarks/bench_same_memory.py [--threads 1,2] [--elements 16777216]
    python benchmarks/bench_same_memory.py --flat [--tensors 1000] [--size 16384] [--rounds 41]

Where the buffers of a large step lie in memory moves a streaming kernel's speed on
some machines by up to 2x (seen on the 2-core KVM guests the project is measured on),
so the step benchmark, which gives each implementation buffers of its own, can favour
whichever implementation drew the luckier placement. Here both optimizers update the
same params and states (torch's tensors share the NumPy arrays' memory), under three
placements: NumPy's own allocation, page-aligned anonymous mappings, and torch's
allocator. The streaming limit is measured on the same buffers. Medians of repeats.

`--flat`: a `fusedopt.torch` optimizer with ``flat=True`` over `--tensors` params of
`--size` elements (the step benchmark's 1000x16K by default) against the functional op on that optimizer's own flat buffers
(params, gradients, states), for SGD with momentum, Adagrad and Adam, in alternated
rounds: what the flat mode costs over one call of the op on the same memory.
"""

from __future__ import annotations

import argparse
import mmap
import statistics
import time

import numpy as np

import fusedopt as fo
from fusedopt import _arrays, _cpu
from fusedopt.bench._measure import median_time

ADAM = dict(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8)




def placements(n, torch):
    yield "numpy", [np.empty(n, np.float32) for _ in range(4)]
    maps = [mmap.mmap(-1, n * 4) for _ in range(4)]
    yield "mmap", [np.frombuffer(m, np.float32) for m in maps]
    if torch is not None:
        yield "torch", [torch.empty(n).numpy() for _ in range(4)]


# (fusedopt.torch class, its keywords, the functional op and how its state lists are
# named in the optimizer's state)
FLAT_CASES = [
    ("SGD", dict(lr=1e-3, momentum=0.9), "sgd_", ["momentum_buffer"], {"momentum": 0.9}),
    ("Adagrad", dict(lr=1e-3), "adagrad_", ["sum"], {}),
    ("Adam", dict(lr=1e-3), "adam_", ["exp_avg", "exp_avg_sq"],
     {"beta1": 0.9, "beta2": 0.999, "eps": 1e-8}),
]


def flat_against_op(torch, tensors, size, rounds):
    """Print, per algorithm, the flat step's and the op's medians on the same buffers."""
    import fusedopt.torch as fot

    print(f"fusedopt.torch flat=True against the functional op on its buffers: {tensors} "
          f"tensors of {size} float32, {fo.get_num_threads()} threads, ISA {_cpu.get_isa()}; "
          "ms per step (median of alternated rounds)")
    print(f"{'algorithm':>9} {'flat step':>9} {'op':>8} {'op/flat':>8}")
    for name, kw, op_name, states, op_kw in FLAT_CASES:
        gen = torch.Generator().manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(size, generator=gen)) for _ in range(tensors)]
        for p in params:
            p.grad = torch.randn(size, generator=gen) * 0.01
        opt = getattr(fot, name)(params, flat=True, **kw)
        opt.step()  # the states' flat buffers made
        bucket, = opt._fo_buckets[0]
        p, g = bucket.data.numpy(), bucket.grad.numpy()
        lists = [[bucket.states[s].numpy()] for s in states]
        op = getattr(fo.functional, op_name)
        count = [1]

        def one_op():
            count[0] += 1
            extra = {"step": count[0]} if name != "SGD" else {}
            op([p], [g], *lists, lr=kw["lr"], **op_kw, **extra)

        impls = {"flat": opt.step, "op": one_op}
        times = {k: [] for k in impls}
        for r in range(rounds):
            for k in (("flat", "op") if r % 2 else ("op", "flat")):
                t0 = time.perf_counter()
                impls[k]()
                times[k].append(time.perf_counter() - t0)
        flat, one = (statistics.median(times[k]) for k in ("flat", "op"))
        print(f"{name:>9} {flat * 1e3:9.2f} {one * 1e3:8.2f} {one / flat:8.3f}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--elements", type=int, default=16 << 20)
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--flat", action="store_true",
                    help="fusedopt.torch flat=True against the op on the same buffers")
    ap.add_argument("--tensors", type=int, default=1000, help="params of the --flat model")
    ap.add_argument("--size", type=int, default=16384, help="elements of each --flat param")
    ap.add_argument("--rounds", type=int, default=41, help="alternated rounds of --flat")
    args = ap.parse_args(argv)
    try:
        import torch
    except ImportError:
        torch = None
    n = args.elements
    if args.flat:
        if torch is None:
            raise SystemExit("--flat needs torch")
        for threads in (int(t) for t in args.threads.split(",")):
            fo.set_num_threads(threads)
            torch.set_num_threads(threads)
            flat_against_op(torch, args.tensors, args.size, args.rounds)
        return
    print(f"Adam, float32, {n} elements, ISA {_cpu.get_isa()}; ms per step (median)")
    print(f"{'threads':>7} {'placement':>9} {'limit':>8} {'fusedopt':>9} {'% limit':>8} "
          f"{'torch fused':>11} {'torch/fusedopt':>14}")
    for threads in (int(t) for t in args.threads.split(",")):
        fo.set_num_threads(threads)
        if torch is not None:
            torch.set_num_threads(threads)
        for name, (p, g, m, v) in placements(n, torch):
            rng = np.random.default_rng(0)
            for x in (p, g):
                x[:] = rng.standard_normal(n, dtype=np.float32)
            m[:] = 0.0
            v[:] = 0.0
            prep = _arrays.prepare("limit", [p], [g], [[m], [v]], ["m", "v"])
            (dtype, ptrs, sizes), = prep.groups
            limit = median_time(lambda: _cpu.step("stream2", dtype, ptrs, sizes,
                                                  np.array([0.0])), args.repeats)
            count = [0]

            def fused():
                count[0] += 1
                fo.functional.adam_([p], [g], [m], [v], step=count[0], **ADAM)

            t_fo = median_time(fused, args.repeats)
            row = f"{threads:>7} {name:>9} {limit * 1e3:8.2f} {t_fo * 1e3:9.2f} {limit / t_fo:8.0%}"
            if torch is not None:
                tp = torch.from_numpy(p).requires_grad_()
                tp.grad = torch.from_numpy(g)
                opt = torch.optim.Adam([tp], lr=ADAM["lr"], fused=True)
                opt.step()  # creates its state; then it is pointed at the shared buffers
                opt.state[tp]["exp_avg"] = torch.from_numpy(m)
                opt.state[tp]["exp_avg_sq"] = torch.from_numpy(v)
                t_torch = median_time(opt.step, args.repeats)
                row += f" {t_torch * 1e3:11.2f} {t_torch / t_fo:14.2f}"
            print(row)


if __name__ == "__main__":
    main()
