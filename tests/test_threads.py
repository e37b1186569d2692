"""Steps from several Python threads. The kernels release the GIL, so steps of
independent optimizers run at the same time: each must give the bits it gives alone.
One optimizer stepped from two threads at once serializes its steps (a lock around
`step`): the result is that of the same steps taken one after the other."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

import fusedopt
from cases import FULL_CASES, assert_same_bits, random_arrays
from fusedopt import batched

SHAPES = [(100_000,), (300, 200), (7,), ()]
STEPS = 12
TIMEOUT = 120  # seconds a thread may take before the test calls it hung


def run_threads(targets):
    """Start every target at once (a barrier), join them all; re-raise the first error."""
    barrier = threading.Barrier(len(targets))
    errors = []

    def wrap(fn):
        def body():
            try:
                barrier.wait(TIMEOUT)
                fn()
            except BaseException as e:  # noqa: BLE001 - reported below
                errors.append(e)
        return body

    threads = [threading.Thread(target=wrap(fn), daemon=True) for fn in targets]
    for t in threads:
        t.start()
    for t in threads:
        t.join(TIMEOUT)
        assert not t.is_alive(), "a stepping thread hung"
    if errors:
        raise errors[0]


def workload(c, seed, dtype=np.float32):
    rng = np.random.default_rng(seed)
    params = random_arrays(SHAPES, dtype, rng)
    grads = [random_arrays(SHAPES, dtype, rng) for _ in range(STEPS)]
    return params, grads


#: the optimizers beyond the case table: name -> (make(params), param shapes, gradients:
#: "dense", "rows" (row-sparse pairs with repeats) or "closure" (LBFGS)
BEYOND = {
    "SparseAdam": (lambda ps: fusedopt.SparseAdam(ps, lr=0.01), [(50_000, 8), (300,)], "rows"),
    "SparseAdam, ema": (lambda ps: fusedopt.SparseAdam(ps, lr=0.01, ema_decay=0.9),
                        [(50_000, 8), (300,)], "rows"),
    "Muon": (lambda ps: fusedopt.Muon(ps, lr=0.02), [(96, 64), (32, 32), (32, 32)], "dense"),
    "Muon, ema": (lambda ps: fusedopt.Muon(ps, lr=0.02, ema_decay=0.9), [(96, 64), (32, 32)],
                  "dense"),
    "Adafactor": (lambda ps: fusedopt.Adafactor(ps, lr=0.05), SHAPES, "dense"),
    "Adam, ema": (lambda ps: fusedopt.Adam(ps, lr=0.01, ema_decay=0.99), SHAPES, "dense"),
    "SGD, ema": (lambda ps: fusedopt.SGD(ps, lr=0.01, momentum=0.9, ema_decay=0.5), SHAPES,
                 "dense"),
    "torch LBFGS": (lambda ps: _torch().LBFGS(ps, lr=0.5, max_iter=4, history_size=5,
                                              line_search_fn="strong_wolfe"),
                    [(3000,), (40, 25)], "closure"),
}


def _torch():
    pytest.importorskip("torch")
    import fusedopt.torch as fot
    return fot


class Beyond:
    """One optimizer of BEYOND over its own params and gradients: `run` takes every step
    of a fresh one, `start` makes a fresh one, `step` takes step k, `result` gives its
    params and state arrays."""

    def __init__(self, name, seed):
        self.name = name
        self.make, self.shapes, self.kind = BEYOND[name]
        rng = np.random.default_rng(seed)
        self.values = random_arrays(self.shapes, np.float64 if self.kind == "closure" else
                                    np.float32, rng)
        if self.kind == "rows":  # rows with repeats, from the first half of each table
            self.grads = [[(rng.integers(0, s[0] // 2, s[0] // 4),
                            np.asarray(rng.standard_normal((s[0] // 4, *s[1:])), np.float32))
                           for s in self.shapes] for _ in range(STEPS)]
        elif self.kind == "dense":
            self.grads = [random_arrays(self.shapes, np.float32, rng) for _ in range(STEPS)]
        else:
            self.closure_for = _quadratic(rng, self.shapes, hessian=False)

    def start(self):
        if self.kind == "closure":
            import torch
            params = [torch.tensor(v, requires_grad=True) for v in self.values]
        else:
            params = [v.copy() for v in self.values]
        return self.make(params), params

    def run(self, steps=STEPS):
        opt, params = self.start()
        for k in range(steps):
            self.step(opt, params, k)
        return opt, params

    def step(self, opt, params, k):
        if self.kind != "closure":
            return opt.step(self.grads[k])
        import torch
        evaluate = self.closure_for([p.detach().numpy() for p in params])

        def closure():
            loss, grads = evaluate()
            for p, g in zip(params, grads):
                p.grad = torch.from_numpy(np.asarray(g))
            return loss
        return opt.step(closure)

    def result(self, opt, params):
        if self.kind == "closure":
            state = opt.state[params[0]]
            return [p.detach().numpy() for p in params] + \
                [np.asarray([state["n_iter"], state["func_evals"]])] + \
                [d.numpy() for d in state["old_dirs"]]
        return list(params) + [v for i in sorted(opt.state) for _, v in
                               sorted(opt.state[i].items()) if isinstance(v, np.ndarray)] + \
            [np.asarray(opt.steps_taken)]


@pytest.mark.parametrize("threads", [1, 2])
def test_independent_optimizers_in_threads_match_serial_runs(threads):
    """Every algorithm's optimizer (its own params) in a thread of its own, all at once,
    with the kernels' OpenMP threads set to 1 or 2: bit for bit the serial runs."""
    fusedopt.set_num_threads(threads)
    jobs = [(c, *workload(c, seed)) for seed, c in enumerate(FULL_CASES)]
    serial = []
    for c, params, grads in jobs:
        ps = [p.copy() for p in params]
        opt = c.make(ps)
        for g in grads:
            opt.step(g)
        serial.append((ps, opt.state_dict()))

    runs = [(c.make(params), grads, params) for c, params, grads in jobs]
    beyond = [Beyond(name, 50 + seed) for seed, name in enumerate(BEYOND)]
    beyond_serial = [b.result(*b.run()) for b in beyond]
    beyond_runs = [b.start() for b in beyond]

    def stepper(opt, grads):
        def go():
            for g in grads:
                opt.step(g)
        return go

    def beyond_stepper(b, opt, params):
        def go():
            for k in range(STEPS):
                b.step(opt, params, k)
        return go

    run_threads([stepper(opt, grads) for opt, grads, _ in runs] +
                [beyond_stepper(b, *r) for b, r in zip(beyond, beyond_runs)])
    for b, r, want in zip(beyond, beyond_runs, beyond_serial):
        for k, (a, w) in enumerate(zip(b.result(*r), want)):
            assert_same_bits(a, w, f"{b.name}: array {k} of its params and state")
    for (c, _, _), (opt, _, params), (want_p, want_sd) in zip(jobs, runs, serial):
        for i, (a, b) in enumerate(zip(params, want_p)):
            assert_same_bits(a, b, f"{c}: params[{i}]")
        got = opt.state_dict()["state"]
        for i, st in want_sd["state"].items():
            for name, v in st.items():
                if isinstance(v, np.ndarray):
                    assert_same_bits(got[i][name], v, f"{c}: {name} of param {i}")
                else:
                    assert got[i][name] == v


def test_functional_ops_in_threads_match_serial_calls():
    """The functional ops hold no state of their own: calls on disjoint arrays from
    several threads give each call's own bits."""
    jobs = []
    for seed, c in enumerate(FULL_CASES):
        params, grads = workload(c, 100 + seed)
        rng = np.random.default_rng(seed)
        states = {n: [np.asarray(np.abs(rng.standard_normal(p.shape)), p.dtype) for p in params]
                  for n in c.state_names}
        jobs.append((c, params, grads, states))
    copies = [(c, [p.copy() for p in ps], gs, {n: [a.copy() for a in v] for n, v in st.items()})
              for c, ps, gs, st in jobs]
    for c, ps, gs, st in copies:
        for t, g in enumerate(gs, 1):
            c.run_op(ps, g, st, t)

    def caller(c, ps, gs, st):
        def go():
            for t, g in enumerate(gs, 1):
                c.run_op(ps, g, st, t)
        return go

    run_threads([caller(*job) for job in jobs])
    for (c, ps, _, st), (_, want_ps, _, want_st) in zip(jobs, copies):
        for a, b in zip(ps, want_ps):
            assert_same_bits(a, b, f"{c}: param")
        for n in st:
            for a, b in zip(st[n], want_st[n]):
                assert_same_bits(a, b, f"{c}: {n}")


def _assert_same_run(opt, params, serial_opt, serial_params, what):
    for i, (a, b) in enumerate(zip(params, serial_params)):
        assert_same_bits(a, b, f"{what}: params[{i}]")
    got, want = opt.state_dict()["state"], serial_opt.state_dict()["state"]
    assert sorted(got) == sorted(want)
    for i in want:
        for name, v in want[i].items():
            if isinstance(v, np.ndarray):
                assert_same_bits(got[i][name], v, f"{what}: {name} of param {i}")
            else:
                assert got[i][name] == v, f"{what}: {name} of param {i}"


@pytest.mark.parametrize("c", FULL_CASES, ids=str)
def test_one_optimizer_stepped_from_two_threads_serializes(c):
    """Two threads each take N steps of one optimizer, with the same gradients every
    step: whatever the order, the result is that of 2N steps one after the other, bit
    for bit, and 2N steps are counted. Without the lock the two threads' kernels run
    over the same arrays at once and both steps use the same step count."""
    params, grads = workload(c, 7)
    g = grads[0]
    serial_params = [p.copy() for p in params]
    serial = c.make(serial_params)
    for _ in range(2 * STEPS):
        serial.step(g)

    opt = c.make(params)

    def stepper():
        for _ in range(STEPS):
            opt.step(g)

    run_threads([stepper, stepper])
    assert opt.steps_taken == 2 * STEPS
    if c.algo.has_step:
        assert {s["step"] for s in opt.state.values()} == {float(2 * STEPS)}
    _assert_same_run(opt, params, serial, serial_params, str(c))


@pytest.mark.parametrize("name", list(BEYOND))
def test_beyond_the_table_stepped_from_two_threads_serializes(name):
    """SparseAdam (row-sparse gradients), Muon, Adafactor, optimizers keeping the EMA of
    their params and fusedopt.torch.LBFGS (closures, line searches, a history), each
    stepped N times from each of two threads with the same gradients (closure): the
    params, state and counters of 2N serial steps, bit for bit."""
    b = Beyond(name, 17)
    if b.kind != "closure":  # the same gradient every step, as the threads take it
        b.grads = [b.grads[0]] * (2 * STEPS)
    want = b.result(*b.run(2 * STEPS))
    opt, params = b.start()
    if b.kind == "closure":
        evaluate = b.closure_for([p.detach().numpy() for p in params])

        def closure():
            time.sleep(1e-4)  # lets the other thread run, as a model's forward pass does
            loss, grads = evaluate()
            for p, g in zip(params, grads):
                p.grad = torch_from_numpy(np.asarray(g))
            return loss

        def stepper():
            for _ in range(STEPS):
                opt.step(closure)
    else:
        def stepper():
            for _ in range(STEPS):
                opt.step(b.grads[0])

    run_threads([stepper, stepper])
    for k, (a, w) in enumerate(zip(b.result(opt, params), want)):
        assert_same_bits(a, w, f"{name}: array {k} of its params and state")


def torch_from_numpy(a):
    import torch
    return torch.from_numpy(a)


def test_batched_optimizer_stepped_from_two_threads_serializes():
    rng = np.random.default_rng(3)
    params = [p + np.asarray(rng.standard_normal(p.shape), np.float32)
              for p in batched.stack(random_arrays([(50_000,), (30, 20)], np.float32, rng), 4)]
    g = [np.asarray(rng.standard_normal(p.shape), np.float32) for p in params]
    make = lambda ps: batched.BatchedAdam(ps, lr=[0.1, 0.01, 0.001, 0.05])  # noqa: E731
    serial_params = [p.copy() for p in params]
    serial = make(serial_params)
    for _ in range(2 * STEPS):
        serial.step(g)
    opt = make(params)

    def stepper():
        for _ in range(STEPS):
            opt.step(g)

    run_threads([stepper, stepper])
    assert opt.state["step"] == 2 * STEPS
    for i, (a, b) in enumerate(zip(params, serial_params)):
        assert_same_bits(a, b, f"params[{i}]")


def _quadratic(rng, shapes, hessian):
    """A closure maker for LBFGS and Newton: 0.5 * sum(a x^2) + b.x + 0.1 * sum(x^4)."""
    a = [rng.uniform(0.5, 3.0, s) for s in shapes]
    b = [rng.standard_normal(s) for s in shapes]

    def closure_for(ps):
        def closure():
            time.sleep(1e-4)  # lets the other thread run, as a model's forward pass does
            loss = sum(float(np.sum(0.5 * ai * p * p + bi * p + 0.1 * p ** 4))
                       for ai, bi, p in zip(a, b, ps))
            grads = [ai * p + bi + 0.4 * p ** 3 for ai, bi, p in zip(a, b, ps)]
            if hessian:
                diag = np.concatenate([(ai + 1.2 * p * p).ravel() for ai, p in zip(a, ps)])
                return loss, grads, np.diag(diag)
            return loss, grads
        return closure
    return closure_for


@pytest.mark.parametrize("name", ["LBFGS", "Newton"])
def test_second_order_optimizer_stepped_from_two_threads_serializes(name):
    """LBFGS and Newton (closures, line searches, a history) stepped from two threads:
    the steps of 2N serial calls, bit for bit, and their counters."""
    rng = np.random.default_rng(11)
    shapes = [(3000,), (40, 25)] if name == "LBFGS" else [(30,), (4, 5)]
    values = random_arrays(shapes, np.float64, rng)
    closure_for = _quadratic(rng, shapes, hessian=name == "Newton")
    kwargs = dict(lr=0.5, max_iter=4, history_size=5, line_search_fn="strong_wolfe") \
        if name == "LBFGS" else dict(lr=1.0, max_iter=3, damping=0.1)
    cls = getattr(fusedopt, name)
    serial_params = [v.copy() for v in values]
    serial = cls(serial_params, **kwargs)
    for _ in range(2 * STEPS):
        serial.step(closure_for(serial_params))
    params = [v.copy() for v in values]
    opt = cls(params, **kwargs)
    closure = closure_for(params)

    def stepper():
        for _ in range(STEPS):
            opt.step(closure)

    run_threads([stepper, stepper])
    for i, (a, b) in enumerate(zip(params, serial_params)):
        assert_same_bits(a, b, f"{name}: params[{i}]")
    for key in ("n_iter", "func_evals"):
        assert opt.state[0][key] == serial.state[0][key], key


@pytest.mark.parametrize("name, kwargs", [("Adam", dict(lr=0.01, amsgrad=True)),
                                          ("SGD", dict(lr=0.1, momentum=0.9)),
                                          ("RMSprop", dict(centered=True, momentum=0.5)),
                                          ("Adam", dict(lr=0.01, ema_decay=0.9)),
                                          ("Adafactor", dict(lr=0.05, ema_decay=0.5)),
                                          ("Muon", dict(lr=0.02)),
                                          ("SparseAdam", dict(lr=0.01, ema_decay=0.9))])
def test_torch_optimizer_stepped_from_two_threads_serializes(name, kwargs):
    torch = pytest.importorskip("torch")
    import fusedopt.torch as fot

    rng = np.random.default_rng(5)
    shapes = {"Muon": [(96, 64), (32, 32)], "SparseAdam": [(50_000, 8), (300,)]}.get(
        name, SHAPES)
    values = random_arrays(shapes, np.float32, rng)
    grads = random_arrays(shapes, np.float32, rng)
    if name == "SparseAdam":  # rows with repeats
        rows = [torch.from_numpy(rng.integers(0, s[0] // 2, s[0] // 4)) for s in shapes]
        grads = [torch.sparse_coo_tensor(r[None], torch.randn(len(r), *s[1:]), s,
                                         check_invariants=True)
                 for r, s in zip(rows, shapes)]

    def make():
        ps = [torch.tensor(v, requires_grad=True) for v in values]
        for p, g in zip(ps, grads):
            p.grad = g.clone() if isinstance(g, torch.Tensor) else torch.tensor(g)
        return ps, getattr(fot, name)(ps, **kwargs)

    serial_params, serial = make()
    for _ in range(2 * STEPS):
        serial.step()
    params, opt = make()

    def stepper():
        for _ in range(STEPS):
            opt.step()

    run_threads([stepper, stepper])
    for i, (a, b) in enumerate(zip(params, serial_params)):
        assert_same_bits(a.detach().numpy(), b.detach().numpy(), f"params[{i}]")
    for a, b in zip(params, serial_params):
        assert sorted(opt.state[a]) == sorted(serial.state[b])
        for key, v in serial.state[b].items():
            if isinstance(v, torch.Tensor):
                assert_same_bits(opt.state[a][key].numpy(), v.numpy(), key)
            else:
                assert opt.state[a][key] == v, key
    if name not in ("SGD", "Muon"):
        assert all(float(opt.state[p]["step"]) == 2 * STEPS for p in params)


def test_the_lock_is_not_state():
    """Copies and pickles of an optimizer work and get a lock of their own (the classes
    of fusedopt, fusedopt.batched and fusedopt.torch)."""
    import copy
    import pickle

    params = [np.ones(3, np.float32)]
    opt = fusedopt.Adam(params)
    opt.step([np.ones(3, np.float32)])
    for clone in (copy.deepcopy(opt), pickle.loads(pickle.dumps(opt))):
        assert isinstance(clone._lock, type(opt._lock)) and clone._lock is not opt._lock
        clone.step([np.ones(3, np.float32)])
        assert clone.steps_taken == 2 and opt.steps_taken == 1
    assert "_lock" not in repr(opt.state_dict())
    b = batched.BatchedSGD(batched.stack(params, 2), lr=0.1)
    clone = copy.deepcopy(b)
    assert isinstance(clone._lock, type(b._lock)) and clone._lock is not b._lock
    lbfgs = fusedopt.LBFGS([np.ones(3)])
    assert copy.deepcopy(lbfgs)._lock is not lbfgs._lock
    torch = pytest.importorskip("torch")
    import fusedopt.torch as fot

    w = torch.nn.Parameter(torch.ones(3))
    topt = fot.Adam([w])
    tclone = copy.deepcopy(topt)
    assert isinstance(tclone._fo_lock, type(topt._fo_lock))
    assert tclone._fo_lock is not topt._fo_lock
    lbfgs = fot.LBFGS([w])
    for clone in (copy.deepcopy(lbfgs), pickle.loads(pickle.dumps(lbfgs))):
        assert isinstance(clone._fo_lock, type(lbfgs._fo_lock))
        assert clone._fo_lock is not lbfgs._fo_lock
        x = clone.param_groups[0]["params"][0]

        def closure():
            clone.zero_grad()
            loss = (x * x).sum()
            loss.backward()
            return loss
        clone.step(closure)  # a copy steps its own params
        assert clone.state[x]["n_iter"] > 0 and not lbfgs.state
