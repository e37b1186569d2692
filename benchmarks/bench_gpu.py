#!/usr/bin/env python3
"""GPU step benchmark: fusedopt's CUDA kernels against torch's fused optimizers.

    python benchmarks/bench_gpu.py                      # Adam, 256M elements and GPT-2 small
    python benchmarks/bench_gpu.py --algos adam,adamw,sgd_momentum --json gpu.json
    python benchmarks/bench_gpu.py --mixed              # Adam in the 16-bit layouts

The limit is the device-to-device copy bandwidth measured in the same run (bytes read
plus bytes written of a large cupy copy); an optimizer step's floor is its ideal byte
count over that bandwidth. Each implementation is checked against the float64 NumPy
reference on one step (a sample of tensors, copied to the host) before it is timed with
CUDA events; the median of the repeats is reported, with the percentage of the limit
and the ratio of torch's time to fusedopt's. The host overhead of a step over GPT-2's
148 tensors is timed separately (wall clock per call, GPU work excluded by using tiny
tensors of the same count).

`--mixed` times Adam on one 256M-element tensor of torch CUDA tensors in each storage
layout (float32; bfloat16 params with float32 master weights and m, v, plain, with the
fused gradient checks that stay on the device, and with stochastic rounding; bfloat16
params and state; float16 params with master weights), each against its own byte count
over the copy bandwidth, and torch's fused Adam where torch has the layout (float32;
bfloat16 params and state).

Needs CuPy and a CUDA build of fusedopt; torch (CUDA) is optional, except for --mixed.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np

import fusedopt as fo
from fusedopt.bench._workloads import gpt2_small_shapes as gpt2_shapes

# algorithm -> (number of state buffers, functional op, torch class, kwargs)
ALGOS = {
    "adam": (2, "adam", "Adam", dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8)),
    "adamw": (2, "adamw", "AdamW", dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8,
                                        weight_decay=1e-2)),
    "sgd_momentum": (1, "sgd", "SGD", dict(lr=1e-2, momentum=0.9)),
    "adagrad": (1, "adagrad", "Adagrad", dict(lr=1e-2)),
}


def workload(name):
    if name == "256M":
        return [(256 << 20,)]
    if name == "gpt2":
        return gpt2_shapes()
    raise SystemExit(f"unknown workload {name!r} (256M, gpt2)")


def events_median(fn, repeats):
    import cupy

    fn()  # warm-up
    cupy.cuda.get_current_stream().synchronize()
    times = []
    for _ in range(repeats):
        start, stop = cupy.cuda.Event(), cupy.cuda.Event()
        start.record()
        fn()
        stop.record()
        stop.synchronize()
        times.append(cupy.cuda.get_elapsed_time(start, stop) / 1e3)
    return statistics.median(times)


def copy_bandwidth(repeats):
    """Bytes read plus written per second by a 1 GiB device-to-device copy."""
    import cupy

    src = cupy.random.random_sample(1 << 27, dtype=np.float64)
    dst = cupy.empty_like(src)
    t = events_median(lambda: cupy.copyto(dst, src), repeats)
    return 2 * src.nbytes / t


def fusedopt_step(algo, params, grads, states, step):
    nstates, op, _, kw = ALGOS[algo]
    fn = getattr(fo.functional, op + "_")
    if op in ("adam", "adamw"):
        fn(params, grads, *states, step=step, lr=kw["lr"], beta1=kw["betas"][0],
           beta2=kw["betas"][1], eps=kw["eps"], weight_decay=kw.get("weight_decay", 0.0))
    elif op == "sgd":
        fn(params, grads, *states, lr=kw["lr"], momentum=kw["momentum"], first_step=step == 1)
    else:
        fn(params, grads, *states, step=step, lr=kw["lr"])


def reference_step(algo, params, grads, states, step):
    _, op, _, kw = ALGOS[algo]
    ref = getattr(fo.reference, op)
    if op in ("adam", "adamw"):
        return ref(params, grads, *states, step=step, lr=kw["lr"], beta1=kw["betas"][0],
                   beta2=kw["betas"][1], eps=kw["eps"], weight_decay=kw.get("weight_decay", 0.0))
    if op == "sgd":
        return ref(params, grads, *states, lr=kw["lr"], momentum=kw["momentum"],
                   first_step=step == 1)
    return ref(params, grads, *states, step=step, lr=kw["lr"])


def run_fusedopt(algo, shapes, repeats):
    import cupy

    nstates = ALGOS[algo][0]
    rng = cupy.random.default_rng(0)
    params = [rng.standard_normal(s, dtype=np.float32) for s in shapes]
    grads = [rng.standard_normal(s, dtype=np.float32) for s in shapes]
    states = [[cupy.zeros(s, np.float32) for s in shapes] for _ in range(nstates)]
    # correctness first: one step on a sample of tensors against the float64 reference
    sample = list(range(min(4, len(shapes))))
    host = [[x[i].get() for i in sample] for x in (params, grads, *states)]
    fusedopt_step(algo, params, grads, states, 1)
    expect = reference_step(algo, host[0], host[1], host[2:], 1)
    for got, want in zip([params[i].get() for i in sample], expect[0]):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    step = [1]

    def one():
        step[0] += 1
        fusedopt_step(algo, params, grads, states, step[0])

    return events_median(one, repeats)


def run_torch(algo, shapes, repeats):
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    _, _, cls, kw = ALGOS[algo]
    gen = torch.Generator(device="cuda").manual_seed(0)
    params = [torch.randn(s, device="cuda", generator=gen, requires_grad=True) for s in shapes]
    for p in params:
        p.grad = torch.randn(p.shape, device="cuda", generator=gen)
    try:
        opt = getattr(torch.optim, cls)(params, fused=True, **kw)
    except (TypeError, RuntimeError):
        return None
    start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    opt.step()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start.record()
        opt.step()
        stop.record()
        stop.synchronize()
        times.append(start.elapsed_time(stop) / 1e3)
    return statistics.median(times)


def host_overhead(algo, count, repeats):
    """Wall-clock microseconds of one fusedopt call over `count` tiny tensors."""
    import cupy

    nstates = ALGOS[algo][0]
    params = [cupy.zeros(4, np.float32) for _ in range(count)]
    grads = [cupy.zeros(4, np.float32) for _ in range(count)]
    states = [[cupy.zeros(4, np.float32) for _ in range(count)] for _ in range(nstates)]
    fusedopt_step(algo, params, grads, states, 1)
    cupy.cuda.get_current_stream().synchronize()
    times = []
    for i in range(repeats):
        t = time.perf_counter()
        fusedopt_step(algo, params, grads, states, i + 2)
        times.append(time.perf_counter() - t)
    cupy.cuda.get_current_stream().synchronize()
    return statistics.median(times) * 1e6


ADAM = dict(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8)
CHECKS = dict(loss_scale=1024.0, skip_nonfinite=True, max_grad_norm=1.0)
ROUNDING = dict(stochastic_rounding=True, seed=1)
# (name, param dtype, state dtype, float32 master weights)
MIXED = (("float32 params, float32 state", "float32", "float32", False),
         ("bf16 params, fp32 master, fp32 m/v", "bfloat16", "float32", True),
         ("bf16 params, bf16 m/v, no master", "bfloat16", "bfloat16", False),
         ("fp16 params, fp32 master, fp32 m/v", "float16", "float32", True))


def torch_events_median(fn, repeats):
    import torch

    fn()
    torch.cuda.synchronize()
    start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(repeats):
        start.record()
        fn()
        stop.record()
        stop.synchronize()
        times.append(start.elapsed_time(stop) / 1e3)
    return statistics.median(times)


def run_mixed(n, repeats, bw):
    """Adam in the 16-bit layouts (see the module's docstring); prints one row each."""
    import torch

    if not torch.cuda.is_available():
        raise SystemExit("--mixed needs torch with CUDA (bfloat16 tensors)")
    print(f"Adam, {n} elements; ms per step (median of {repeats})")
    print(f"{'layout':<44} {'B/el':>5} {'limit':>8} {'fusedopt':>9} {'% limit':>8} "
          f"{'torch fused':>11} {'% limit':>8}")
    for layout in MIXED:
        mixed_layout(torch, n, repeats, bw, *layout)
        torch.cuda.empty_cache()


def mixed_layout(torch, n, repeats, bw, name, pname, sname, master):
    pdt, sdt = getattr(torch, pname), getattr(torch, sname)
    gen = torch.Generator(device="cuda").manual_seed(0)
    p32 = torch.randn(n, device="cuda", generator=gen)
    params = [p32.to(pdt)]
    grads = [torch.randn(n, device="cuda", generator=gen).to(pdt)]
    m, v = [torch.zeros(n, device="cuda", dtype=sdt)], [torch.zeros(n, device="cuda", dtype=sdt)]
    extra = {"master_params": [p32.clone()]} if master else {}
    psize, ssize = params[0].element_size(), m[0].element_size()
    per_element = 2 * psize + 2 * ssize + psize + 2 * ssize + (8 if master else 0)
    limit = n * per_element / bw
    # correctness first: one step against the float64 reference on a sample
    k = 4096
    p0, g0 = p32[:k].double().cpu().numpy(), grads[0][:k].double().cpu().numpy()
    if not master:
        p0 = params[0][:k].double().cpu().numpy()
    want = fo.reference.adam([p0], [g0], [np.zeros(k)], [np.zeros(k)], step=1, **ADAM)[0][0]
    fo.functional.adam_(params, grads, m, v, step=1, **ADAM, **extra)
    got = (extra["master_params"][0] if master else params[0])[:k].double().cpu().numpy()
    np.testing.assert_allclose(got, want, rtol=1e-5 if master or psize == 4 else 2**-7,
                               atol=1e-6)
    variants = [(name, {})]
    if master:
        variants += [("  + loss scale, inf/NaN check, clipping", CHECKS),
                     ("  + stochastic rounding", ROUNDING)]
    for label, options in variants:
        count = [1]

        def one(options=options):
            count[0] += 1
            fo.functional.adam_(params, grads, m, v, step=count[0], **ADAM, **extra,
                                **options)

        t = torch_events_median(one, repeats)
        tt = ""
        if label == name and not master:  # torch keeps state in the param's dtype
            weights = [params[0].clone().requires_grad_()]
            weights[0].grad = grads[0].clone()
            opt = torch.optim.Adam(weights, lr=ADAM["lr"], betas=(ADAM["beta1"],
                                   ADAM["beta2"]), eps=ADAM["eps"], fused=True)
            t_torch = torch_events_median(opt.step, repeats)
            tt = f"{t_torch * 1e3:11.3f} {limit / t_torch:8.0%}"
            del opt, weights
        print(f"{label:<44} {per_element:5d} {limit * 1e3:8.3f} {t * 1e3:9.3f} "
              f"{limit / t:8.0%} {tt}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--algos", default="adam")
    ap.add_argument("--workloads", default="256M,gpt2")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--json", metavar="PATH")
    ap.add_argument("--mixed", action="store_true", help="Adam in the 16-bit layouts")
    ap.add_argument("--elements", type=int, default=256 << 20, help="for --mixed")
    args = ap.parse_args(argv)
    try:
        import cupy
    except ImportError:
        raise SystemExit("the GPU benchmark needs CuPy")
    if not fo.cuda_available():
        raise SystemExit("no CUDA device, or fusedopt was built without its CUDA module")
    bw = copy_bandwidth(args.repeats)
    dev = cupy.cuda.runtime.getDeviceProperties(0)["name"].decode()
    print(f"device: {dev}; device-to-device copy: {bw / 1e12:.2f} TB/s (read + write)")
    if args.mixed:
        run_mixed(args.elements, args.repeats, bw)
        return
    rows = []
    print(f"{'algorithm':<13} {'workload':<9} {'fusedopt ms':>11} {'% limit':>8} "
          f"{'torch fused ms':>14} {'% limit':>8} {'torch/fusedopt':>14}")
    for algo in args.algos.split(","):
        nstates = ALGOS[algo][0]
        for name in args.workloads.split(","):
            shapes = workload(name)
            n = sum(int(np.prod(s)) for s in shapes)
            limit = n * 4 * ((2 + nstates) + (1 + nstates)) / bw
            t_fo = run_fusedopt(algo, shapes, args.repeats)
            cupy.get_default_memory_pool().free_all_blocks()
            t_torch = run_torch(algo, shapes, args.repeats)
            row = dict(algo=algo, workload=name, elements=n, limit_s=limit, fusedopt_s=t_fo,
                       torch_fused_s=t_torch)
            rows.append(row)
            tt = f"{t_torch * 1e3:14.3f} {limit / t_torch:8.0%} {t_torch / t_fo:14.2f}" \
                if t_torch else f"{'n/a':>14} {'':>8} {'':>14}"
            print(f"{algo:<13} {name:<9} {t_fo * 1e3:11.3f} {limit / t_fo:8.0%} {tt}")
        us = host_overhead(algo, len(gpt2_shapes()), args.repeats)
        print(f"{algo:<13} host overhead of one step over {len(gpt2_shapes())} tensors: "
              f"{us:.1f} us")
        rows.append(dict(algo=algo, workload="host", tensors=len(gpt2_shapes()), host_us=us))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(device=dev, copy_bandwidth=bw, results=rows), f, indent=1)


if __name__ == "__main__":
    main()
