#!/usr/bin/env python3
"""fusedopt.mpi.ZeroRedundancyOptimizer: the sharded step on 2 ranks against one rank
stepping the same total size, with the time split into communication and update.

    mpiexec -n 2 env OMP_NUM_THREADS=1 PYTHONPATH=python \\
        python3 benchmarks/bench_mpi.py [--sizes 1M,16M,64M] [--algo adamw] [--repeats 15]

Both ranks hold the same float32 params (packed views of one buffer, `fo.flat_arrays`),
so the allgather writes in place, and gradients likewise. Rows, timed in interleaved
rounds (each row once per round, in an order shuffled every round, an untimed call
before each timed one; ranks aligned by a barrier before every call):

- `1 rank, 1 thread`: fo.X(params).step(grads) on rank 0 alone, one thread, while rank 1
  sleeps (it polls for rank 0's message every 0.5 ms, so it takes no core);
- `1 rank, 2 threads`: the same with both cores' threads: what one process would do;
- `2 ranks: step`: ZeroRedundancyOptimizer.step on both ranks, one thread each;
- `2 ranks: reduce-scatter`, `2 ranks: allgather`: the step's two collectives alone, on
  buffers of the same sizes;
- `2 ranks: update`: the inner optimizer's step alone on the rank's shard (one fused
  call over n/2 elements; the gradients' division by 2 happens in it).

What the step spends besides those (the check of the gradients, the sync of the param
groups) is the step's time minus their sum. Times are the median over rounds of the
slower rank's time.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import time

import numpy as np
from mpi4py import MPI

import fusedopt as fo
from fusedopt.mpi import ZeroRedundancyOptimizer

CLASSES = {"adam": fo.Adam, "adamw": fo.AdamW, "sgd": fo.SGD, "adagrad": fo.Adagrad}
OPTIONS = {"adam": {"lr": 1e-3}, "adamw": {"lr": 1e-3}, "sgd": {"lr": 1e-2, "momentum": 0.9},
           "adagrad": {"lr": 1e-2}}
BYTES = {"adam": 28, "adamw": 28, "sgd": 20, "adagrad": 20}  # per float32 element


def parse_size(text):
    text = text.strip().upper()
    scale = {"K": 2 ** 10, "M": 2 ** 20, "G": 2 ** 30}.get(text[-1], 1)
    return int(float(text.rstrip("KMG")) * scale)


def shapes_of(n):
    """A model-like list: 4 matrices and their biases, n elements in all."""
    cols = 1024
    rows = max(n // (4 * cols), 1)
    shapes = [(rows, cols), (cols,)] * 4
    rest = n - sum(int(np.prod(s)) for s in shapes)
    if rest > 0:
        shapes.append((rest,))
    return shapes


class Rows:
    """The timed operations of one size, as (label, run) on every rank."""

    def __init__(self, comm, algo, n):
        rank, world = comm.Get_rank(), comm.Get_size()
        self.comm = comm
        cls, options = CLASSES[algo], OPTIONS[algo]
        shapes = shapes_of(n)
        rng = np.random.default_rng(0)
        params = fo.flat_arrays(shapes, np.float32)
        params.buffer[...] = rng.standard_normal(params.buffer.size, dtype=np.float32)
        grads = fo.flat_arrays(shapes, np.float32)
        grads.buffer[...] = rng.standard_normal(grads.buffer.size, dtype=np.float32) * 1e-2
        self.n = params.buffer.size
        # the sharded optimizer, and the pieces of its step on the same sizes
        self.zero = ZeroRedundancyOptimizer(params.views, optimizer_class=cls, comm=comm,
                                            **options)
        counts = [(r + 1) * self.n // world - r * self.n // world for r in range(world)]
        displs = [r * self.n // world for r in range(world)]
        send = grads.buffer.copy()
        shard = np.zeros(counts[rank], np.float32)
        gathered = params.buffer.copy()
        inner = [p for g in self.zero.optim.param_groups for p in g["params"]]
        inner_grads = [np.full_like(p, 1e-3) for p in inner]
        # one rank alone, on copies of its own
        alone_params = params.buffer.copy()
        alone = cls([alone_params], **options) if rank == 0 else None
        alone_grads = [grads.buffer.copy()]
        self.rows = [
            ("1 rank, 1 thread", lambda: self._alone(alone, alone_grads, 1)),
            ("1 rank, 2 threads", lambda: self._alone(alone, alone_grads, world)),
            (f"{world} ranks: step", lambda: self.zero.step(grads.views)),
            (f"{world} ranks: reduce-scatter",
             lambda: comm.Reduce_scatter(send, [shard, MPI.FLOAT], recvcounts=counts,
                                         op=MPI.SUM)),
            (f"{world} ranks: update",
             lambda: self.zero.optim.step(inner_grads, loss_scale=float(world))),
            (f"{world} ranks: allgather",
             lambda: comm.Allgatherv(MPI.IN_PLACE, [gathered, counts, displs, MPI.FLOAT])),
        ]

    def _alone(self, opt, grads, threads):
        """Rank 0 steps alone; the others sleep until it is done."""
        comm = self.comm
        if comm.Get_rank() == 0:
            fo.set_num_threads(threads)
            opt.step(grads)
            fo.set_num_threads(1)
            for r in range(1, comm.Get_size()):
                comm.send(None, dest=r, tag=7)
        else:
            request = comm.irecv(source=0, tag=7)
            while not request.test()[0]:
                time.sleep(0.0005)


def time_rows(comm, rows, repeats):
    """Seconds of each row's timed call in each round: the slower rank's."""
    times = [[] for _ in rows]
    order = random.Random(0)
    for _ in range(repeats):
        todo = list(range(len(rows)))
        order.shuffle(todo)  # every rank draws the same order
        for i in todo:
            run = rows[i][1]
            comm.Barrier()
            run()  # untimed: wakes the threads and the other rank
            comm.Barrier()
            t0 = time.perf_counter()
            run()
            t = time.perf_counter() - t0
            times[i].append(comm.allreduce(t, op=MPI.MAX))
    return [statistics.median(t) for t in times]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1M,16M,64M",
                        help="total elements of the model (K, M, G suffixes)")
    parser.add_argument("--algo", default="adamw", choices=sorted(CLASSES))
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args(argv)
    comm = MPI.COMM_WORLD
    rank, world = comm.Get_rank(), comm.Get_size()
    if world < 2:
        sys.exit("run it with mpiexec -n 2 (or more)")
    fo.set_num_threads(1)
    if rank == 0:
        print(f"fusedopt {fo.__version__} mpi benchmark: {args.algo}, float32, {world} ranks "
              f"on {os.cpu_count()} cores, 1 thread per rank; "
              f"{MPI.Get_library_version().splitlines()[0].strip()}")
        print(f"load average {os.getloadavg()[0]:.2f} (other work on the machine adds noise)\n")
        print(f"{'elements':>9}  {'row':<26} {'ms':>9} {'GB/s':>7}  {'of the step':>11}")
        print("-" * 70)
    start = time.perf_counter()
    for text in args.sizes.split(","):
        bench = Rows(comm, args.algo, parse_size(text))
        medians = time_rows(comm, bench.rows, args.repeats)
        if rank == 0:
            step = medians[2]
            for k, ((label, _), t) in enumerate(zip(bench.rows, medians)):
                gbs = f"{BYTES[args.algo] * bench.n / t / 1e9:7.1f}" if k < 3 else ""
                share = f"{t / step:10.0%}" if k > 2 else ""
                print(f"{text if k == 0 else '':>9}  {label:<26} {t * 1e3:9.3f} {gbs:>7}  "
                      f"{share:>11}")
            rest = step - sum(medians[3:])
            print(f"{'':>9}  {'2 ranks: rest of the step':<26} {rest * 1e3:9.3f} {'':>7}  "
                  f"{rest / step:10.0%}")
        del bench
    if rank == 0:
        print(f"\nGB/s: the update's ideal bytes over the whole model ({BYTES[args.algo]} per "
              "element) / the row's time.\nTimes: medians over rounds of the slower rank's; the "
              "parts are timed alone, so they need not add up to the step.")
        print(f"wall time: {time.perf_counter() - start:.1f} s, load average now "
              f"{os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
