"""Optimizer step benchmark: fusedopt against NumPy and torch.optim, and against the limit.

    python -m fusedopt.bench                            # the default run, 1-2 minutes
    python -m fusedopt.bench --algos adam,adamw --workloads all --out results/

For every algorithm and workload it measures, in the same run:

- the limit: an in-place streaming kernel with the algorithm's read/write pattern
  (read p, g and K state buffers, write p and the K states) through fusedopt's CPU
  driver; its bandwidth times the algorithm's ideal byte count is the fastest a
  step of that pattern streams on this machine;
- each implementation (fusedopt's functional op and optimizer class, NumPy written
  by hand, fusedopt.torch and torch.optim's for-loop, foreach and fused modes where
  torch is installed, DeepSpeed's CPU optimizers where DeepSpeed is and --impls asks
  for it), each on arrays of its own, first checked against the float64 reference on
  one step (which also warms it up), then timed.

The limit and the implementations are timed interleaved, in rounds that call each of
them (an untimed call, then a timed one) in a shuffled order, so that every row sees
the same drift of the machine's memory bandwidth.

It prints the median time per step, the time per tensor, the bandwidth of the ideal
byte count, the percentage of the limit, and for fusedopt the ratio against the best
competitor (its time divided by fusedopt's: above 1, fusedopt is faster), and writes
the table (text and Markdown), the results as JSON and a plot (PNG, with matplotlib)
into a results folder.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import os
import sys
import time
from pathlib import Path

# The classic family; --algos takes any row of the table of algorithms (a spec's `bench`
# rows, fusedopt/bench/_algos.py), and 'all' every row: they are known once fusedopt is
# imported, which waits until OMP_NUM_THREADS is set (`make_plan`).
ALGOS = ["sgd", "sgd_momentum", "adagrad", "rmsprop", "adadelta", "adam", "adamw"]
WORKLOADS = ["1x16M", "1000x16K", "gpt2", "tiny"]
# The default run, one to two minutes on two cores: one large tensor for every algorithm but
# the near duplicates (AdamW is Adam plus one multiply, SGD without momentum a lighter
# SGD with momentum), and Adam also on many tensors and on tiny ones (the host cost per
# tensor). GPT-2's 124M elements take minutes: --workloads gpt2 (or all) adds them.
DEFAULT_ALGOS = ["sgd_momentum", "adagrad", "rmsprop", "adadelta", "adam"]
DEFAULT_PLAN = [("1x16M", a) for a in DEFAULT_ALGOS] + [("1000x16K", "adam"), ("tiny", "adam")]
# --workloads default with chosen algorithms: these for each, and tiny for Adam
DEFAULT_WORKLOADS = ["1x16M", "1000x16K"]
DEVICE = "cpu"  # a GPU mode would add its implementations and limit (copy bandwidth)
RESULTS_DIR = "fusedopt-bench-results"


def parse_args(argv):
    ap = argparse.ArgumentParser(prog="python -m fusedopt.bench",
                                 description=__doc__.split("\n\n")[0],
                                 epilog="Workloads: 1x16M (one tensor of 16M elements), "
                                        "1000x16K (1000 tensors, the same total), gpt2 (GPT-2 "
                                        "small's 148 tensors, 124M elements), tiny (10000 "
                                        "tensors of 4 elements: the host cost per tensor).")
    ap.add_argument("--algos", default="default",
                    help="comma-separated rows of the table of algorithms (a spec's bench "
                         "rows, e.g. nadam, rprop), 'all' (every row), or 'default' (the "
                         "classic family but sgd and adamw): " + ", ".join(ALGOS))
    ap.add_argument("--workloads", default="default",
                    help="comma-separated workloads, 'all', or 'default' (with the default "
                         "algorithms: 1x16M for each, 1000x16K and tiny for adam; with "
                         "--algos: 1x16M and 1000x16K for each, tiny for adam): "
                         + ", ".join(WORKLOADS))
    ap.add_argument("--impls", default="default",
                    help="comma-separated implementations, 'all' (every one installed), or "
                         "'default' (all but DeepSpeed, whose optimizers take seconds to build)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                    help="cuda: the GPU benchmark, benchmarks/bench_gpu.py of the source tree "
                         "(Adam on 256M elements and GPT-2 small against torch's fused CUDA "
                         "Adam and the device-to-device copy bandwidth)")
    ap.add_argument("--threads", type=int, default=0,
                    help="threads of fusedopt, torch and OpenMP (default: all cores)")
    ap.add_argument("--repeats", type=int, default=0,
                    help="timed steps of each row (default: as many rounds as fit in about "
                         "0.15 s per row, 3 to 15 steps)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the random data")
    ap.add_argument("--out", metavar="DIR",
                    help=f"folder of the results (default: ./{RESULTS_DIR}/<date-time>/)")
    ap.add_argument("--markdown", action="store_true", help="print the table in Markdown")
    ap.add_argument("--json", metavar="PATH",
                    help="write the JSON here instead of <out>/results.json")
    ap.add_argument("--plot", metavar="PATH",
                    help="write the plot here instead of <out>/plot.png")
    ap.add_argument("--no-plot", action="store_true", help="write no plot")
    ap.add_argument("--no-progress", action="store_true", help="show no progress bar or counter")
    args = ap.parse_args(argv)
    if args.workloads not in ("default", "all"):
        _names(ap, "--workloads", args.workloads, WORKLOADS)
    if args.threads < 0 or args.repeats < 0:
        ap.error("--threads and --repeats must not be negative")
    args.error = ap.error
    return args


def make_plan(args, rows):
    """Set args.algos and args.plan, [(workload, algorithm row)], once the rows of the
    table of algorithms (`rows`: their names, in the table's order) are known; an
    unknown name ends the program with the parser's message."""
    known = list(rows)
    if args.algos == "default":
        algos = DEFAULT_ALGOS
    elif args.algos == "all":
        algos = known
    else:
        algos = _names(args, "--algos", args.algos, known)
    if args.workloads == "default" and args.algos == "default":
        plan = list(DEFAULT_PLAN)
    elif args.workloads == "default":
        plan = [(w, a) for w in DEFAULT_WORKLOADS for a in algos]
        plan += [("tiny", "adam")] if "adam" in algos else []
    else:
        chosen = WORKLOADS if args.workloads == "all" else _names(args, "--workloads",
                                                                  args.workloads, WORKLOADS)
        plan = [(w, a) for w in chosen for a in algos]
    args.algos, args.plan = algos, plan
    return args


def _names(ap, option, text, known):
    """The names of a comma-separated option, in the order of `known`; `ap` has error()."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    bad = [n for n in names if n not in known]
    if bad or not names:
        ap.error(f"{option}: unknown {', '.join(bad) or 'empty list'}; "
                 f"choose from {', '.join(known)}")
    return [n for n in known if n in names]


def _has(module):
    return importlib.util.find_spec(module) is not None


def missing_competitors():
    """(name, how to add it) of each competitor that is not installed."""
    missing = []
    if not _has("torch"):
        missing.append(("torch.optim", "pip install torch==2.13.0"))
    if not _has("deepspeed"):
        missing.append(("DeepSpeed's CPU optimizers", "pip install deepspeed, then --impls all"))
    return missing


class Progress:
    """A tqdm bar on a terminal where tqdm is installed, else a "[3/16]" line per group,
    both on stderr; `write` prints a line of the table on stdout without breaking the bar."""

    def __init__(self, total, enabled):
        self.total, self.done, self.bar = total, 0, None
        self.enabled = enabled
        if enabled and _has("tqdm") and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit="group", file=sys.stderr, leave=False,
                            bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}]")

    def start(self, text):
        if self.bar is not None:
            self.bar.set_description(text)
        elif self.enabled:
            print(f"[{self.done + 1}/{self.total}] {text}", file=sys.stderr, flush=True)

    def advance(self):
        self.done += 1
        if self.bar is not None:
            self.bar.update(1)

    def write(self, line):
        if self.bar is not None:
            self.bar.write(line, file=sys.stdout)
        else:
            print(line, flush=True)

    def close(self):
        if self.bar is not None:
            self.bar.close()


def results_folder(args):
    if args.out:
        return Path(args.out)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path(RESULTS_DIR) / stamp


def main(argv: list[str] | None = None) -> int:
    """Run the step benchmark (the command line of ``python -m fusedopt.bench``).

    Parameters
    ----------
    argv : list of str, optional
        The arguments, without the program name; default ``sys.argv[1:]``. ``--help``
        lists them.

    Returns
    -------
    int
        The exit status: 0 when every implementation matched the reference and was
        timed.
    """
    args = parse_args(argv)
    if args.device == "cuda":
        return _gpu(args)
    threads = args.threads or len(os.sched_getaffinity(0))
    os.environ["OMP_NUM_THREADS"] = str(threads)  # before any OpenMP runtime starts

    import fusedopt

    from . import _report
    from ._algos import ALGOS as ALGO_TABLE
    from ._competitors import IMPLEMENTATIONS
    from ._measure import Mismatch, collect, run_group
    from ._workloads import Workload

    make_plan(args, ALGO_TABLE)
    impls = IMPLEMENTATIONS[DEVICE]()
    skipped = []
    if args.impls == "default":
        skipped = [i.key for i in impls if not i.default]
        impls = [i for i in impls if i.default]
    elif args.impls != "all":
        wanted = {n.strip() for n in args.impls.split(",")}
        unknown = wanted - {i.key for i in impls}
        if unknown:
            sys.exit(f"fusedopt.bench: --impls: unknown or unavailable "
                     f"{', '.join(sorted(unknown))}; available: "
                     f"{', '.join(i.key for i in impls)}")
        impls = [i for i in impls if i.key in wanted]
    fusedopt.set_num_threads(threads)
    if any(i.key.startswith(("torch", "deepspeed")) for i in impls):
        import torch

        torch.set_num_threads(threads)

    folder = results_folder(args)
    folder.mkdir(parents=True, exist_ok=True)
    paths = {"table": folder / "table.txt", "markdown": folder / "table.md",
             "json": Path(args.json) if args.json else folder / "results.json"}
    if not args.no_plot:
        if _has("matplotlib"):
            paths["plot"] = Path(args.plot) if args.plot else folder / "plot.png"
        else:
            print("fusedopt.bench: matplotlib is not installed, so no plot "
                  "(pip install matplotlib)", file=sys.stderr)

    info = _report.machine_info(args, threads, impls)
    info["missing"] = [dict(name=n, how=h) for n, h in missing_competitors()]
    info["not_run"] = skipped
    progress = Progress(len(args.plan), not args.no_progress)
    table = _report.Table(args.markdown, progress.write)
    table.header(info)
    start = time.perf_counter()
    results, work = [], None
    try:
        for wname, aname in args.plan:
            progress.start(f"{aname} on {wname}")
            if work is None or work.name != wname:
                work = None
                collect()
                work = Workload(wname, args.dtype, args.seed)
            rows = run_group(work, ALGO_TABLE[aname], impls, args)
            results += rows
            table.rows(rows)
            progress.advance()
    except Mismatch as e:
        progress.close()
        sys.exit(f"fusedopt.bench: aborted: {e}")
    progress.close()
    wall = time.perf_counter() - start
    table.footer(wall, skipped)
    _report.write_table(paths["table"], info, results, wall, skipped, markdown=False)
    _report.write_table(paths["markdown"], info, results, wall, skipped, markdown=True)
    _report.write_json(paths["json"], info, results, wall)
    if "plot" in paths:
        _report.plot(paths["plot"], results, info)
    print()
    print(f"Results in {folder}{os.sep}:")
    for kind, path in paths.items():
        print(f"  {kind:9} {path}")
    return 0


def _gpu(args):
    """--device cuda: benchmarks/bench_gpu.py, importable when run from the source tree."""
    try:
        import bench_gpu
    except ImportError:
        sys.exit("fusedopt.bench: --device cuda runs benchmarks/bench_gpu.py of fusedopt's "
                 "source tree: run `python benchmarks/bench_gpu.py` there")
    gpu_args = ["--repeats", str(args.repeats)] if args.repeats else []
    return bench_gpu.main(gpu_args + (["--json", args.json] if args.json else []))
