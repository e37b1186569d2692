#!/usr/bin/env python3
"""Mixed-precision step benchmark: 16-bit params through fusedopt's fused layouts.

    python benchmarks/bench_mixed.py [--elements 16777216] [--threads 2]

For Adam on one large tensor it times, each against the streaming limit with the same
storage layout (the stream2 probe reads and writes exactly the same buffers):
- float32 params and state (the reference point);
- bfloat16 params and grads with float32 master weights and float32 m, v (30 bytes per
  element: read p, g (2+2), master, m, v (4+4+4); write p (2), master, m, v (4+4+4));
- the same with stochastic rounding;
- bfloat16 params with bfloat16 m, v and no master copy;
and the cost of the fused gradient checks: a step with loss scaling, the non-finite
check and global-norm clipping against a plain step (one extra read of the gradients:
2 bytes per element for bfloat16, so about 7 % of the step's bytes).
Needs ml_dtypes. Medians of repeats.
"""

from __future__ import annotations

import argparse

import numpy as np

import fusedopt as fo
from fusedopt import _arrays, _cpu
from _measure import median_time

ADAM = dict(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8)




def case(name, n, pdt, sdt, master, repeats, **options):
    rng = np.random.default_rng(0)
    p = rng.standard_normal(n, dtype=np.float32)
    params, grads = [p.astype(pdt)], [rng.standard_normal(n, dtype=np.float32).astype(pdt)]
    m, v = [np.zeros(n, sdt)], [np.zeros(n, sdt)]
    extra = dict(master_params=[p.copy()]) if master else {}
    prep = _arrays.prepare("limit", params, grads, [m, v], ["m", "v"],
                           extra=(extra["master_params"], "master_params", 1) if master else None)
    (dtype, ptrs, sizes), = prep.groups
    layout = prep.layouts[0]
    limit = median_time(lambda: _cpu.step("stream2", dtype, ptrs, sizes, np.array([0.0]),
                                          **layout), repeats)
    count = [0]

    def step():
        count[0] += 1
        fo.functional.adam_(params, grads, m, v, step=count[0], **ADAM, **extra, **options)

    t = median_time(step, repeats)
    nbytes = sum(a.nbytes for a in (params[0], grads[0], m[0], v[0])) + \
        sum(a.nbytes for a in (params[0], m[0], v[0]))
    if master:
        nbytes += 2 * extra["master_params"][0].nbytes
    print(f"{name:<44} {nbytes / n:5.0f} {limit * 1e3:9.2f} {t * 1e3:9.2f} {limit / t:8.0%}")
    return t


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
    plain = case("bf16 params, fp32 master, fp32 m/v", n, bf16, np.float32, True, args.repeats)
    case("  + stochastic rounding", n, bf16, np.float32, True, args.repeats,
         stochastic_rounding=True, seed=1)
    checked = case("  + loss scale, inf/NaN check, clipping", n, bf16, np.float32, True,
                   args.repeats, loss_scale=1024.0, skip_nonfinite=True, max_grad_norm=1.0)
    case("bf16 params, bf16 m/v, no master", n, bf16, bf16, False, args.repeats)
    print(f"cost of the fused gradient checks: {checked / plain - 1:+.0%} of the step "
          f"(one extra read of the bf16 gradients is {2 / 30:.0%} of its bytes)")


if __name__ == "__main__":
    main()
