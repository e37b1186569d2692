#!/usr/bin/env python3
"""Mixed-precision step benchmark: 16-bit params through fusedopt's fused layouts.

    python benchmarks/bench_mixed.py [--elements 16777216] [--threads 2]

For Adam on one large tensor it times, each against the streaming limit with the same
storage layout (the stream2 probe reads and writes exactly the same buffers):
- float32 params and state (the reference point);
- bfloat16 params and grads with float32 master weights and float32 m, v (30 bytes per
  element: read p, g (2+2), master, m, v (4+4+4); write p (2), master, m, v (4+4+4)),
  then on the same buffers with the fused gradient checks (loss scaling, the non-finite
  check, global-norm clipping: one extra read of the gradients, 2 bytes per element,
  about 7 % of the step's bytes) and with stochastic rounding;
- bfloat16 params with bfloat16 m, v and no master copy;
- float16 params with float32 master weights, likewise with checks and rounding.
Each row's step and its limit are timed in alternation.
Needs ml_dtypes. Medians of repeats.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

import fusedopt as fo
from fusedopt import _arrays, _cpu

ADAM = dict(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8)


def setup(n, pdt, sdt, master):
    rng = np.random.default_rng(0)
    p = rng.standard_normal(n, dtype=np.float32)
    params, grads = [p.astype(pdt)], [rng.standard_normal(n, dtype=np.float32).astype(pdt)]
    m, v = [np.zeros(n, sdt)], [np.zeros(n, sdt)]
    extra = dict(master_params=[p.copy()]) if master else {}
    prep = _arrays.prepare("limit", params, grads, [m, v], ["m", "v"],
                           extra=(extra["master_params"], "master_params", 1) if master else None)
    (dtype, ptrs, sizes), = prep.groups
    layout = prep.layouts[0]

    def limit():
        _cpu.step("stream2", dtype, ptrs, sizes, np.array([0.0]), **layout)

    count = [0]

    def step(**options):
        count[0] += 1
        fo.functional.adam_(params, grads, m, v, step=count[0], **ADAM, **extra, **options)

    nbytes = sum(a.nbytes for a in (params[0], grads[0], m[0], v[0])) + \
        sum(a.nbytes for a in (params[0], m[0], v[0]))
    if master:
        nbytes += 2 * extra["master_params"][0].nbytes
    return limit, step, nbytes


def interleaved(fns, repeats):
    """Median seconds of each function, called in turn `repeats` times after one warm-up
    round: slow drifts of the machine's bandwidth reach all of them alike."""
    times = [[] for _ in fns]
    for r in range(repeats + 1):
        for f, ts in zip(fns, times):
            t0 = time.perf_counter()
            f()
            if r:
                ts.append(time.perf_counter() - t0)
    return [statistics.median(ts) for ts in times]


def line(name, n, nbytes, limit, t):
    print(f"{name:<44} {nbytes / n:5.0f} {limit * 1e3:9.2f} {t * 1e3:9.2f} {limit / t:8.0%}")


def case(name, n, pdt, sdt, master, repeats):
    limit, step, nbytes = setup(n, pdt, sdt, master)
    lt, t = interleaved([limit, step], repeats)
    line(name, n, nbytes, lt, t)


CHECKS = dict(loss_scale=1024.0, skip_nonfinite=True, max_grad_norm=1.0)
ROUNDING = dict(stochastic_rounding=True, seed=1)


def with_master(name, n, pdt, repeats):
    """16-bit params with float32 master weights and m, v: the plain step, the step with
    the fused gradient checks and the step with stochastic rounding, on the same buffers.
    Returns the checks' cost as a fraction of the plain step."""
    limit, step, nbytes = setup(n, pdt, np.float32, True)
    lt, plain, checked, rounded = interleaved(
        [limit, step, lambda: step(**CHECKS), lambda: step(**ROUNDING)], repeats)
    line(name, n, nbytes, lt, plain)
    line("  + loss scale, inf/NaN check, clipping", n, nbytes, lt, checked)
    line("  + stochastic rounding", n, nbytes, lt, rounded)
    return checked / plain - 1


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--elements", type=int, default=16 << 20)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--repeats", type=int, default=9)
    args = ap.parse_args(argv)
    import ml_dtypes

    bf16 = ml_dtypes.bfloat16
    if args.threads:
        fo.set_num_threads(args.threads)
    n = args.elements
    print(f"Adam, {n} elements, {fo.get_num_threads()} threads, ISA {_cpu.get_isa()}; "
          "ms per step (median)")
    print(f"{'layout':<44} {'B/el':>5} {'limit':>9} {'fusedopt':>9} {'% limit':>8}")
    case("float32 params, float32 state", n, np.float32, np.float32, False, args.repeats)
    cost = with_master("bf16 params, fp32 master, fp32 m/v", n, bf16, args.repeats)
    case("bf16 params, bf16 m/v, no master", n, bf16, bf16, False, args.repeats)
    cost16 = with_master("fp16 params, fp32 master, fp32 m/v", n, np.float16, args.repeats)
    print(f"cost of the fused gradient checks: bf16 {cost:+.0%}, fp16 {cost16:+.0%} of the "
          f"step (one extra read of the 16-bit gradients is {2 / 30:.0%} of its bytes)")


if __name__ == "__main__":
    main()
