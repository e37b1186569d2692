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

With ``--int8`` it times Adam with 8-bit state instead (uint8 codes of m and v with a
float32 scale per block of 256 elements: 16 bytes per float32 element instead of 28),
on one large tensor and on 1000 small ones (``--workloads``), each row against its own
streaming limit (the stream2 probe on the same buffers in the same layout: params,
gradients, codes and scales read and written, no decoding) and the 8-bit rows against
float32 Adam timed in the same rounds:

    python benchmarks/bench_mixed.py --int8 [--workloads 1x16M,1000x16K]

``--int8 --parts`` shows where an 8-bit step's time goes: the CPU time per element, on
one thread with the buffers in cache (no memory limit), of the float32 update, the
8-bit update, and decoding and encoding a state on their own (the kernels'
dequantize_blockwise and quantize_blockwise), so that the compute cost can be set
against the memory time of the rows above.

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


# --- 8-bit state --------------------------------------------------------------------------------


def parse_workload(text):
    """"1000x16K" -> (1000, 16384)."""
    count, _, size = text.partition("x")
    units = {"K": 1 << 10, "M": 1 << 20}
    return int(count), int(size[:-1]) * units[size[-1]] if size[-1] in units else int(size)


def setup_int8(count, size, pdt, master, int8):
    """Adam over `count` tensors of `size` elements with float32 or 8-bit m and v: (the
    limit's step on the same buffers, the step, bytes moved per step)."""
    from fusedopt import _quant

    rng = np.random.default_rng(0)
    params = [rng.standard_normal(size, dtype=np.float32).astype(pdt) for _ in range(count)]
    grads = [rng.standard_normal(size, dtype=np.float32).astype(pdt) for _ in range(count)]
    sdt = np.uint8 if int8 else np.float32
    m = [np.full(size, 127 if int8 else 0, sdt) for _ in range(count)]
    v = [np.zeros(size, sdt) for _ in range(count)]
    extra = dict(master_params=[p.astype(np.float32) for p in params]) if master else {}
    if int8:
        extra["absmax"] = [[np.zeros(_quant.blocks(size), np.float32) for _ in range(count)]
                           for _ in range(2)]
    prep = _arrays.prepare("limit", params, grads, [m, v], ["m", "v"],
                           extra=(extra["master_params"], "master_params", 1) if master else None,
                           scales=extra.get("absmax"))
    (dtype, ptrs, sizes), = prep.groups
    layout = prep.layouts[0]

    def limit():
        _cpu.step("stream2", dtype, ptrs, sizes, np.array([0.0]), **layout)

    steps = [0]

    def step():
        steps[0] += 1
        fo.functional.adam_(params, grads, m, v, step=steps[0], **ADAM, **extra)

    arrays = params + grads + m + v + extra.get("master_params", []) + \
        [a for lst in extra.get("absmax", []) for a in lst]
    written = params + m + v + extra.get("master_params", []) + \
        [a for lst in extra.get("absmax", []) for a in lst]
    nbytes = sum(a.nbytes for a in arrays) + sum(a.nbytes for a in written)
    limit.keep = (params, grads, m, v, extra, prep)
    return limit, step, nbytes


def rounds(fns, repeats):
    """Seconds of each function in each of `repeats` rounds (after one warm-up round),
    called in turn, each call preceded by an untimed one (the threads of the previous
    call go idle, this call's wake up)."""
    times = [[] for _ in fns]
    for r in range(repeats + 1):
        for f, ts in zip(fns, times):
            f()
            t0 = time.perf_counter()
            f()
            if r:
                ts.append(time.perf_counter() - t0)
    return times


def int8_table(workloads, repeats):
    import ml_dtypes

    print(f"Adam with 8-bit m and v (codes + a float32 scale per 256 elements), "
          f"{fo.get_num_threads()} threads, ISA {_cpu.get_isa()}; ms per step (median of "
          f"{repeats} rounds), % of the row's own limit and the speed-up over float32 Adam "
          "(medians of per-round ratios)")
    print(f"{'workload':<10} {'layout':<36} {'B/el':>6} {'limit':>8} {'fusedopt':>9} "
          f"{'% limit':>8} {'vs fp32':>8}")
    for text in workloads:
        count, size = parse_workload(text)
        layouts = [("float32 params, float32 m/v", np.float32, False, False),
                   ("float32 params, 8-bit m/v", np.float32, False, True),
                   ("bf16 params, fp32 master, 8-bit m/v", ml_dtypes.bfloat16, True, True)]
        made = [setup_int8(count, size, pdt, master, int8) for _, pdt, master, int8 in layouts]
        fns = [f for lim, step, _ in made for f in (lim, step)]
        times = rounds(fns, repeats)
        base = times[1]
        for k, ((name, *_), (_, _, nbytes)) in enumerate(zip(layouts, made)):
            lt, st = times[2 * k], times[2 * k + 1]
            pct = statistics.median(a / b for a, b in zip(lt, st))
            speed = statistics.median(a / b for a, b in zip(base, st))
            print(f"{text:<10} {name:<36} {nbytes / (count * size):6.2f} "
                  f"{statistics.median(lt) * 1e3:8.2f} {statistics.median(st) * 1e3:9.2f} "
                  f"{pct:8.0%} {speed:7.2f}x")
        del made, fns


def int8_parts(repeats, n=1 << 16, calls=200):
    """CPU nanoseconds per element on one thread, buffers in cache (n elements), of the
    kernels called directly (no validation, no Python layer)."""
    from fusedopt import _quant
    from fusedopt.algorithms import pack

    fo.set_num_threads(1)
    rng = np.random.default_rng(0)
    x = rng.standard_normal(n, dtype=np.float32)
    codes, scales = _cpu.quantize_blockwise(x, True)
    hyper = pack("adam", dict(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, l2=0.0, shrink=1.0,
                              maximize=0.0))
    parts = {}
    keep = []
    for int8 in (False, True):
        limit, _, _ = setup_int8(1, n, np.float32, False, int8)
        (dtype, ptrs, sizes), = _arrays.prepare("parts", *limit.keep[:2], list(limit.keep[2:4]),
                                                 ["m", "v"], scales=limit.keep[4].get("absmax")).groups
        layout = dict(state_dtype=4, unsigned_states=2) if int8 else {}
        name = "8-bit" if int8 else "float32"
        parts[f"Adam update, {name} m/v"] = \
            lambda ptrs=ptrs, sizes=sizes, layout=layout: _cpu.step(
                "adam", 0, ptrs, sizes, hyper, step=5.0, **layout)
        parts[f"stream2 probe, {name} m/v"] = limit
        keep.append(limit)
    parts["decode one state (dequantize_blockwise)"] = \
        lambda: _cpu.dequantize_blockwise(codes, scales, True)
    parts["encode one state (quantize_blockwise)"] = lambda: _cpu.quantize_blockwise(x, True)
    print(f"CPU time per element, 1 thread, {n} elements in cache, ISA {_cpu.get_isa()}, "
          f"the kernels called directly (median of {repeats} runs of {calls} calls; "
          f"{_quant.BLOCK}-element blocks)")
    for name, f in parts.items():
        f()
        runs = []
        for _ in range(repeats):
            t0 = time.thread_time()
            for _ in range(calls):
                f()
            runs.append((time.thread_time() - t0) / calls / n * 1e9)
        print(f"  {name:<44} {statistics.median(runs):6.3f} ns")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--elements", type=int, default=16 << 20)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--int8", action="store_true", help="Adam with 8-bit state instead")
    ap.add_argument("--workloads", default="1x16M,1000x16K",
                    help="with --int8: tensors x elements, comma-separated")
    ap.add_argument("--parts", action="store_true",
                    help="with --int8: CPU time per element of the step's parts, in cache")
    args = ap.parse_args(argv)
    import ml_dtypes

    bf16 = ml_dtypes.bfloat16
    if args.threads:
        fo.set_num_threads(args.threads)
    if args.int8 and args.parts:
        int8_parts(args.repeats)
        return
    if args.int8:
        int8_table(args.workloads.split(","), args.repeats)
        return
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
