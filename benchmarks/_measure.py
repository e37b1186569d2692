"""Measuring one (workload, algorithm) group of the step benchmark: the limit, the
check against the reference, and the timing of every implementation."""

from __future__ import annotations

import gc
import statistics
import time

import numpy as np

from fusedopt import _arrays, _cpu

BUDGET_S = 0.25  # timing budget of one measurement when --repeats is not given
MAX_REPEATS = 20


def time_steps(step, repeats, slow):
    """Seconds of each timed call: `repeats` of them, or as many as fit the budget."""
    if repeats:
        lo, hi = repeats, repeats
    else:
        lo, hi = (3 if slow else 5), MAX_REPEATS
    times, start = [], time.perf_counter()
    while len(times) < hi:
        t0 = time.perf_counter()
        step()
        t1 = time.perf_counter()
        times.append(t1 - t0)
        if len(times) >= lo and t1 - start >= BUDGET_S:
            break
    return times


def median_time(fn, repeats, warmup=1):
    """Median seconds of `repeats` calls of `fn`, after `warmup` untimed ones."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def collect():
    """Free what the last implementation left, then freeze the survivors (modules, the
    workload) so that the next collection does not walk them again."""
    gc.collect()
    gc.freeze()


class Mismatch(Exception):
    pass


def expected(algo, work):
    """The float64 reference on the sampled elements after one step from zero state,
    and the initial values (to scale the tolerance by the size of the update)."""
    p = [work.params[i].ravel()[idx].astype(np.float64) for i, idx in work.picks]
    g = [work.grads[i].ravel()[idx].astype(np.float64) for i, idx in work.picks]
    s = [[np.zeros(len(idx)) for _, idx in work.picks] for _ in range(algo.nstates)]
    out = algo.reference(p, g, s, 1)
    return [list(x) for x in out], [p] + s


def check(label, algo, work, runner, want, init):
    params, states = runner.arrays()
    names = ["params"] + list(algo.states)
    eps = np.finfo(work.dtype).eps
    rel_update = 1e-3 if work.dtype == np.float32 else 1e-9
    for slot, (got_list, want_list, init_list) in enumerate(zip([params] + states, want, init)):
        for (i, idx), ref, ini in zip(work.picks, want_list, init_list):
            got = np.asarray(got_list[i]).ravel()[idx].astype(np.float64)
            tol = 16 * eps * np.abs(ref) + rel_update * max(np.max(np.abs(ref - ini)), 1e-30)
            bad = np.flatnonzero(~(np.abs(got - ref) <= tol))
            if bad.size:
                k = int(bad[0])
                raise Mismatch(
                    f"{label} does not match the float64 reference for {algo.name} on "
                    f"{work.name} ({work.dtype.name}) after one step: {names[slot]}[{i}] "
                    f"element {int(idx[k])} is {float(got[k])!r}, the reference {float(ref[k])!r} "
                    f"(tolerance {tol[k]:.3g}); {bad.size} of {idx.size} sampled elements differ")


def measure_limit(work, nstates, repeats):
    """Timed calls of the in-place streaming kernel with `nstates` state buffers, on arrays
    of its own."""
    params = [p.copy() for p in work.params]
    grads = [g.copy() for g in work.grads]
    states = [[np.zeros_like(p) for p in params] for _ in range(nstates)]
    kernel = f"stream{nstates}"
    prep = _arrays.prepare(kernel, params, grads, states, [f"s{k}" for k in range(nstates)])
    hyper = np.array([0.0])

    def step():
        for dtype, ptrs, sizes in prep.groups:
            _cpu.step(kernel, dtype, ptrs, sizes, hyper)

    step()
    step()
    return time_steps(step, repeats, slow=False)


def run_group(work, algo, impls, args):
    """Limit and every implementation for one (workload, algorithm): rows of results."""
    nbytes = work.bytes_per_step(algo.nstates)

    def row(key, label, kind, seconds, times=()):
        return dict(workload=work.name, algo=algo.name, impl=label, key=key, kind=kind,
                    ms=seconds * 1e3, us_per_tensor=seconds * 1e6 / work.ntensors,
                    gbps=nbytes / seconds / 1e9, repeats=len(times),
                    times_ms=[t * 1e3 for t in times],
                    bytes=nbytes, elements=work.numel, tensors=work.ntensors)

    # The limit is measured before and after the implementations, and the faster of the
    # two counts: a burst of other work on the machine then lowers it less often.
    limit_times = measure_limit(work, algo.nstates, args.repeats)
    rows = []
    want, init = expected(algo, work)
    for impl in impls:
        if not impl.supports(algo, work.dtype):
            continue
        label = impl.label(algo)
        runner = impl.build(algo, work)
        t0 = time.perf_counter()
        runner.step()  # creates the state where the implementation does so lazily
        first = time.perf_counter() - t0
        check(label, algo, work, runner, want, init)
        times = time_steps(runner.step, args.repeats, slow=first > 0.1)
        rows.append(row(impl.key, label, "fusedopt" if impl.fusedopt else "competitor",
                        statistics.median(times), times))
        del runner
        collect()
    limit_times = min(limit_times, measure_limit(work, algo.nstates, args.repeats),
                      key=statistics.median)
    rows.insert(0, row("limit", f"limit (stream{algo.nstates})", "limit",
                       statistics.median(limit_times), limit_times))
    limit = rows[0]["ms"]
    competitors = [r for r in rows if r["kind"] == "competitor"]
    best = min(competitors, key=lambda r: r["ms"]) if competitors else None
    for r in rows:
        r["pct_limit"] = 100.0 * limit / r["ms"]
        r["best_competitor"] = r is best
        r["vs_best"] = best["ms"] / r["ms"] if best and r["kind"] == "fusedopt" else None
    return rows
