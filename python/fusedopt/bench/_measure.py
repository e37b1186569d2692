"""Measuring one (workload, algorithm) group of the step benchmark: the limit, the
check against the reference, and the timing of every implementation.

The memory bandwidth of a shared machine drifts by tens of percent over seconds, and
where a large step's buffers lie moves a streaming kernel's speed by as much. So every
implementation's runner comes with the streaming limit's step on the runner's own
buffers, and all of them (and the limit on buffers of its own, the table's limit row)
are timed interleaved, in rounds that call each twice, the second call timed, in an
order shuffled every round; the untimed call lets the OpenMP threads of the previous
step, which spin a while after their work, go idle, and wakes this step's own. A row's
% of the limit is the median over rounds of its own limit's time over its time.
Where the runners of all implementations would take more than 40 % of the free memory
(GPT-2's parameter list), they are timed in batches, each with the limit, which then
also relates rows of different batches.
"""

from __future__ import annotations

import gc
import random
import statistics
import time

import numpy as np

from fusedopt import _arrays, _cpu

BUDGET_S = 0.15  # timing budget per row of a group when --repeats is not given
MAX_REPEATS = 15
SLOW_S = 0.1  # a step whose first timed call takes longer is timed the fewest times


def time_rounds(steps, repeats):
    """Seconds of each step's timed call in each round, None where a step sat a round
    out: `repeats` calls of every step, or else 3 of a slow step and at least 5 of the
    others, which go on, to at most MAX_REPEATS, until their calls have taken BUDGET_S
    per step (the slow steps' calls do not count against that budget)."""
    times = [[] for _ in steps]
    order = random.Random(0)
    budget, spent = BUDGET_S * len(steps), 0.0
    while True:
        over = spent >= budget
        todo = [i for i, t in enumerate(times) if timed(t) < calls_wanted(t, repeats, over)]
        if not todo:
            return times
        for t in times:
            t.append(None)
        order.shuffle(todo)  # so that no step always follows the same one
        for i in todo:
            slow = is_slow(times[i])
            t0 = time.perf_counter()
            if not slow:
                # an untimed call first: the thread pool of the step before may still be
                # spinning on the cores, and this step's own may have gone to sleep
                steps[i]()
            t1 = time.perf_counter()
            steps[i]()
            t2 = time.perf_counter()
            times[i][-1] = t2 - t1
            spent += 0.0 if slow else t2 - t0


def timed(times):
    return sum(t is not None for t in times)


def is_slow(times):
    first = next((t for t in times if t is not None), None)
    return first is not None and first > SLOW_S


def calls_wanted(times, repeats, spent):
    """How many calls of a step to time, given the seconds of those timed so far."""
    if repeats:
        return repeats
    if is_slow(times):
        return 3
    return 5 if spent else MAX_REPEATS


def paired_ratio(num, den):
    """The median over rounds of num's time / den's time, from the rounds where both
    were timed (the same conditions for both); the ratio of medians where none was."""
    pairs = [a / b for a, b in zip(num, den) if a is not None and b is not None]
    if pairs:
        return statistics.median(pairs)
    return statistics.median(t for t in num if t is not None) / \
        statistics.median(t for t in den if t is not None)


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
    """Free what is garbage, then freeze the survivors (modules, the workload, the runners
    about to be timed) so that later collections do not walk them again."""
    gc.collect()
    gc.freeze()


class Mismatch(Exception):
    pass


def expected(algo, work):
    """The float64 reference on the sampled elements after one step from a fresh state,
    and the initial values (to scale the tolerance by the size of the update)."""
    if algo.first_pass:
        # per-tensor norms: the reference needs whole tensors (the sampled ones)
        p = [work.params[i].astype(np.float64).ravel() for i, _ in work.picks]
        g = [work.grads[i].astype(np.float64).ravel() for i, _ in work.picks]
    else:
        p = [work.params[i].ravel()[idx].astype(np.float64) for i, idx in work.picks]
        g = [work.grads[i].ravel()[idx].astype(np.float64) for i, idx in work.picks]
    s = algo.initial_states(p)
    out = algo.reference(p, g, s, 1)
    if algo.first_pass:
        out = [[x[idx] for x, (_, idx) in zip(lst, work.picks)] for lst in out]
        p = [x[idx] for x, (_, idx) in zip(p, work.picks)]
        s = [[x[idx] for x, (_, idx) in zip(lst, work.picks)] for lst in s]
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


def stream_step(params, grads, states, kernel=None):
    """The streaming limit's step on these very arrays, warmed up: the in-place kernel
    that reads params, grads and the states and writes params and states, adding zero
    (`kernel`: a probe with a first pass too, for the two-pass algorithms)."""
    kernel = kernel or f"stream{len(states)}"
    prep = _arrays.prepare(kernel, params, grads, states, [f"s{k}" for k in range(len(states))])
    hyper = np.zeros(_cpu.hyper_size(kernel))  # scale 0, and a probe's per-tensor field

    def step():
        for dtype, ptrs, sizes in prep.groups:
            _cpu.step(kernel, dtype, ptrs, sizes, hyper)

    step.arrays = params, grads, states  # prep holds bare pointers into them
    step()
    step()
    return step


def limit_step(work, algo):
    """The limit's step on arrays of its own, with the algorithm's memory pattern."""
    params = [p.copy() for p in work.params]
    grads = [g.copy() for g in work.grads]
    return stream_step(params, grads,
                       [[np.zeros_like(p) for p in params] for _ in range(algo.nstates)],
                       algo.stream_kernel)


def checked_step(impl, algo, work, want, init):
    """The step of a runner of `impl`, checked after its first call, and the streaming
    limit's step on the runner's own buffers."""
    runner = impl.build(algo, work)
    runner.step()  # creates the state where the implementation does so lazily
    check(impl.label(algo), algo, work, runner, want, init)
    params, states = runner.arrays()
    return runner.step, stream_step(params, runner.gradients(), states, algo.stream_kernel)


def batches(impls, work, algo):
    """The implementations in groups whose runners (params, grads and states of each) fit
    together in 40 % of the available memory: one group but on the largest
    workloads (GPT-2's 124M elements: about 2 GB per runner), where holding every runner
    at once also made the run slower (GPT-2 Adam: 50 s against 30 s in batches)."""
    per_runner = work.numel * work.dtype.itemsize * (2 + algo.nstates)
    size = max(1, int(min(len(impls), 0.4 * available_memory() / per_runner)))
    return [impls[i:i + size] for i in range(0, len(impls), size)] or [[]]


def available_memory():
    """Bytes of memory available (MemAvailable), or infinity where that is not known."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return float("inf")


def run_group(work, algo, impls, args):
    """Limit and every implementation for one (workload, algorithm): rows of results."""
    nbytes = work.bytes_per_step(algo.nstates, algo.first_pass)

    def row(key, label, kind, seconds, times=()):
        return dict(workload=work.name, algo=algo.name, impl=label, key=key, kind=kind,
                    ms=seconds * 1e3, us_per_tensor=seconds * 1e6 / work.ntensors,
                    gbps=nbytes / seconds / 1e9, repeats=len(times),
                    times_ms=[t * 1e3 for t in times],
                    bytes=nbytes, elements=work.numel, tensors=work.ntensors)

    impls = [i for i in impls if i.supports(algo, work.dtype)]
    want, init = expected(algo, work)
    stream = limit_step(work, algo)
    limit_times, rows, rounds = [], [], {}
    for number, batch in enumerate(batches(impls, work, algo)):
        steps = [stream]
        for impl in batch:
            steps += checked_step(impl, algo, work, want, init)
        collect()
        times = time_rounds(steps, args.repeats)
        del steps
        gc.unfreeze()  # collect() froze the runners: let it free any cycle among them
        collect()
        limit_times += [t for t in times[0] if t is not None]
        for k, impl in enumerate(batch):
            mine, own_limit = times[1 + 2 * k], times[2 + 2 * k]
            rows.append(row(impl.key, impl.label(algo),
                            "fusedopt" if impl.fusedopt else "competitor",
                            statistics.median(x for x in mine if x is not None),
                            [x for x in mine if x is not None]))
            rows[-1]["own_limit_ms"] = 1e3 * statistics.median(
                x for x in own_limit if x is not None)
            rounds[id(rows[-1])] = (mine, own_limit, number, times[0])
    rows.insert(0, row("limit", f"limit ({algo.stream_kernel})", "limit",
                       statistics.median(limit_times), limit_times))
    competitors = [r for r in rows if r["kind"] == "competitor"]
    best = min(competitors, key=lambda r: r["ms"]) if competitors else None
    for r in rows:
        # % limit: against the streaming kernel on the row's own buffers, from rounds timed
        # together (where a large step's buffers lie moves its speed by up to 40 % on some
        # machines; the same buffers and the same moments cancel both out)
        mine, own_limit, number, limit = rounds.get(id(r), (None, None, None, None))
        r["pct_limit"] = 100.0 if mine is None else 100.0 * paired_ratio(own_limit, mine)
        r["best_competitor"] = r is best
        r["vs_best"] = None
        if best and r["kind"] == "fusedopt":
            theirs, _, their_number, their_limit = rounds[id(best)]
            # timed in different batches: each against the limit of its own batch
            r["vs_best"] = paired_ratio(theirs, mine) if their_number == number else \
                paired_ratio(theirs, their_limit) / paired_ratio(mine, limit)
    return rows
