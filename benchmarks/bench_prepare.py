"""Host cost of validating one call: `_arrays.prepare` (describe every array, check them
all in C++, lay out the pointer tables) for Adam over N NumPy tensors, with float32 and
with 8-bit state (uint8 codes and float32 block scales: two more lists of arrays), and
the gradients exchanged in a kept call (`Prepared.with_grads`, what the optimizer
classes do from their second step on).

Times are CPU time of this process (`time.process_time`), so that a loaded machine
deschedules without inflating them; the table shows the median over rounds, per call
and per array. The tables are checked against the arrays' addresses before timing.

    python benchmarks/bench_prepare.py [--tensors 1000] [--size 16384] [--rounds 9]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

from fusedopt import _arrays, _quant


def lists(n, size, int8):
    """params, grads, state lists, scale lists (None for float32 state)."""
    p = [np.zeros(size, np.float32) for _ in range(n)]
    g = [np.zeros(size, np.float32) for _ in range(n)]
    sdt = np.uint8 if int8 else np.float32
    states = [[np.zeros(size, sdt) for _ in range(n)] for _ in range(2)]
    scales = [[np.zeros(_quant.blocks(size), np.float32) for _ in range(n)]
              for _ in range(2)] if int8 else None
    return p, g, states, scales


def check(prep, p, g, states, scales):
    """The one table holds every array's address, slot by slot."""
    (_, ptrs, sizes), = prep.groups
    slots = [p, g, *states, *(scales or [])]
    want = np.array([a.__array_interface__["data"][0] for lst in slots for a in lst],
                    np.uint64)
    assert np.array_equal(ptrs, want) and np.array_equal(sizes, [a.size for a in p])


def cpu_ms(f, calls, rounds):
    f()
    times = []
    for _ in range(rounds):
        t0 = time.process_time()
        for _ in range(calls):
            f()
        times.append((time.process_time() - t0) / calls * 1e3)
    return statistics.median(times)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tensors", type=int, default=1000)
    ap.add_argument("--size", type=int, default=16384, help="elements per tensor")
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--calls", type=int, default=100, help="calls per round")
    args = ap.parse_args(argv)
    names = ["exp_avgs", "exp_avg_sqs"]
    print(f"Adam over {args.tensors} tensors of {args.size} elements: CPU ms per call "
          f"(median of {args.rounds} rounds of {args.calls} calls)")
    print(f"{'state':10s} {'arrays':>7s} {'prepare':>9s} {'us/array':>9s} {'with_grads':>11s}")
    for int8 in (False, True):
        p, g, states, scales = lists(args.tensors, args.size, int8)
        prep = _arrays.prepare("adam_", p, g, states, names, scales=scales)
        check(prep, p, g, states, scales)
        full = cpu_ms(lambda: _arrays.prepare("adam_", p, g, states, names, scales=scales),
                      args.calls, args.rounds)
        kept = cpu_ms(lambda: prep.with_grads(g), args.calls, args.rounds)
        count = args.tensors * (2 + len(states) + len(scales or []))
        print(f"{'8-bit' if int8 else 'float32':10s} {count:7d} {full:9.3f} "
              f"{full * 1e3 / count:9.3f} {kept:11.3f}")


if __name__ == "__main__":
    main()
