#!/usr/bin/env python3
"""Optimizer step benchmark: fusedopt against NumPy and PyTorch, and against the limit.

    python benchmarks/bench_step.py                      # default sizes, 1.5 minutes
    python benchmarks/bench_step.py --algos adam,adamw --workloads all --json out.json

For every algorithm and workload it measures, in the same run:

- the limit: an in-place streaming kernel with the algorithm's read/write pattern
  (read p, g and K state buffers, write p and the K states) through fusedopt's CPU
  driver; its bandwidth times the algorithm's ideal byte count is the fastest a
  step can be;
- each implementation (fusedopt's functional op and optimizer class, NumPy written
  by hand, torch.optim's for-loop, foreach and fused modes where torch is
  installed, DeepSpeed's CPU optimizers where DeepSpeed is), each on arrays of its
  own, first checked against the float64 reference on one step (which also warms
  it up), then timed.

The limit and the implementations are timed interleaved, in rounds that call each of
them (an untimed call, then a timed one) in a shuffled order, so that every row sees
the same drift of the machine's memory bandwidth.

It prints the median time per step, the time per tensor, the bandwidth of the ideal
byte count, the percentage of the limit, and for fusedopt the ratio against the best
competitor (its time divided by fusedopt's: above 1, fusedopt is faster).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

# The rows of the specs' `bench` options (benchmarks/_algos.py; not imported here, since
# fusedopt must not start OpenMP before OMP_NUM_THREADS is set). The default run takes
# the classic family.
ALGOS = ["sgd", "sgd_momentum", "adagrad", "rmsprop", "adadelta", "adam", "adamw", "lion",
         "lamb", "lars", "adamw_schedulefree"]
DEFAULT_ALGOS = ALGOS[:7]
WORKLOADS = ["1x16M", "1000x16K", "gpt2", "tiny"]
# The default run: the two 16M-element workloads for every algorithm, and the large
# model and the host-overhead workload for Adam only.
DEFAULT_WORKLOADS = ["1x16M", "1000x16K"]
ADAM_ONLY = ["gpt2", "tiny"]
DEVICE = "cpu"  # a GPU mode would add its implementations and limit (copy bandwidth)


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--algos", default=",".join(DEFAULT_ALGOS),
                    help="comma-separated algorithms, or 'all' (default: the classic family, "
                         + ", ".join(DEFAULT_ALGOS) + "): " + ", ".join(ALGOS))
    ap.add_argument("--workloads", default="default",
                    help="comma-separated workloads, 'all', or 'default' (1x16M and 1000x16K "
                         "for every algorithm, gpt2 and tiny for adam): " + ", ".join(WORKLOADS))
    ap.add_argument("--impls", default="default",
                    help="comma-separated implementations, 'all' (every one installed), or "
                         "'default' (all but DeepSpeed, whose optimizers take seconds to build)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                    help="cuda: the GPU benchmark (benchmarks/bench_gpu.py: Adam on 256M "
                         "elements and GPT-2 small against torch's fused CUDA Adam and the "
                         "device-to-device copy bandwidth)")
    ap.add_argument("--threads", type=int, default=0,
                    help="threads of fusedopt, torch and OpenMP (default: all cores)")
    ap.add_argument("--repeats", type=int, default=0,
                    help="timed steps of each row (default: as many rounds as fit in about "
                         "0.15 s per row, 3 to 15 steps)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the random data")
    ap.add_argument("--markdown", action="store_true", help="print the table in Markdown")
    ap.add_argument("--json", metavar="PATH", help="write results and machine details as JSON")
    ap.add_argument("--plot", metavar="PATH", help="write a PNG of %% of the limit (matplotlib)")
    args = ap.parse_args(argv)
    args.algos = ALGOS if args.algos == "all" else _names(ap, "--algos", args.algos, ALGOS)
    if args.workloads == "default":
        args.plan = [(w, a) for w in DEFAULT_WORKLOADS for a in args.algos]
        args.plan += [(w, "adam") for w in ADAM_ONLY if "adam" in args.algos]
    else:
        chosen = WORKLOADS if args.workloads == "all" else _names(ap, "--workloads",
                                                                  args.workloads, WORKLOADS)
        args.plan = [(w, a) for w in chosen for a in args.algos]
    if args.threads < 0 or args.repeats < 0:
        ap.error("--threads and --repeats must not be negative")
    return args


def _names(ap, option, text, known):
    names = [n.strip() for n in text.split(",") if n.strip()]
    bad = [n for n in names if n not in known]
    if bad or not names:
        ap.error(f"{option}: unknown {', '.join(bad) or 'empty list'}; "
                 f"choose from {', '.join(known)}")
    return [n for n in known if n in names]


def main(argv=None):
    args = parse_args(argv)
    if args.device == "cuda":
        import bench_gpu

        gpu_args = ["--repeats", str(args.repeats)] if args.repeats else []
        return bench_gpu.main(gpu_args + (["--json", args.json] if args.json else []))
    threads = args.threads or len(os.sched_getaffinity(0))
    os.environ["OMP_NUM_THREADS"] = str(threads)  # before any OpenMP runtime starts

    try:
        import fusedopt
    except ImportError as e:
        sys.exit(f"bench_step: cannot import fusedopt ({e}); install it with "
                 "`pip install .[bench]`, or build it and set PYTHONPATH=python")
    import _report
    from _algos import ALGOS as ALGO_TABLE
    from _competitors import IMPLEMENTATIONS
    from _measure import Mismatch, collect, run_group
    from _workloads import Workload

    impls = IMPLEMENTATIONS[DEVICE]()
    skipped = []
    if args.impls == "default":
        skipped = [i.key for i in impls if not i.default]
        impls = [i for i in impls if i.default]
    elif args.impls != "all":
        wanted = {n.strip() for n in args.impls.split(",")}
        unknown = wanted - {i.key for i in impls}
        if unknown:
            sys.exit(f"bench_step: --impls: unknown or unavailable {', '.join(sorted(unknown))}; "
                     f"available: {', '.join(i.key for i in impls)}")
        impls = [i for i in impls if i.key in wanted]
    fusedopt.set_num_threads(threads)
    if any(i.key.startswith(("torch", "deepspeed")) for i in impls):
        import torch

        torch.set_num_threads(threads)

    info = _report.machine_info(args, threads, impls)
    out = _report.Table(args.markdown)
    out.header(info)
    start = time.perf_counter()
    results, work = [], None
    try:
        for wname, aname in args.plan:
            if work is None or work.name != wname:
                work = None
                collect()
                work = Workload(wname, args.dtype, args.seed)
            rows = run_group(work, ALGO_TABLE[aname], impls, args)
            results += rows
            out.rows(rows)
    except Mismatch as e:
        sys.exit(f"bench_step: aborted: {e}")
    wall = time.perf_counter() - start
    out.footer(wall, skipped)
    if args.json:
        _report.write_json(args.json, info, results, wall)
    if args.plot:
        _report.plot(args.plot, results, info)


if __name__ == "__main__":
    main()
