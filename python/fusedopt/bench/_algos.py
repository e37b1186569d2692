"""The algorithms of the step benchmark, derived from the table of algorithms.

Every spec of `fusedopt.algorithms` gives one or more rows (its `bench` options, or
one row with the defaults). For each this module says how many state buffers it keeps,
what torch.optim and fusedopt call them, and how to run one step: the fusedopt
functional op, the float64 reference, the arguments of the optimizer classes
(torch.optim's and fusedopt's take the same), and for the classic family NumPy written
by hand, one tensor at a time, as a user would.

State lists are always in the functional op's order, and `t` is the step count after
the update (1 on the first step), as the functional ops take it.
"""

from __future__ import annotations

import math

import numpy as np

from fusedopt import _cpu
from fusedopt import functional as F
from fusedopt import reference as R
from fusedopt.algorithms import SPECS


class Algo:
    """One benchmark row: an algorithm with one fixed set of options."""

    def __init__(self, name, spec, kwargs, numpy=None):
        self.name, self.spec, self.kwargs = name, spec, dict(kwargs)
        options = {**spec.group_defaults(), **self.kwargs}
        self.options = options
        self.states = tuple(spec.active(spec.to_op(options)))  # torch.optim's names
        self.cls = spec.title  # class name in torch.optim and in fusedopt
        self.op = spec.op_name  # fusedopt functional op
        self._numpy = numpy
        # a two-pass kernel (LAMB, LARS) first reads `first_pass` arrays per tensor to sum
        # its per-tensor norms; its limit is the streaming probe with both passes
        kernel = spec.kernel(spec.to_op(options))
        self.first_pass = _cpu.first_pass_slots(kernel)
        self.stream_kernel = f"stream{self.nstates}" + \
            (f"_reduce{self.first_pass}" if self.first_pass else "")
        self.modes = spec.mode_state is not None  # train() before stepping

    @property
    def nstates(self):
        return len(self.states)

    def initial_values(self):
        """The value each state buffer starts from, as the classes make it (0 for most;
        Rprop's step sizes start at lr)."""
        return [float(self.spec.init_value(name, self.options)) for name in self.states]

    def initial_states(self, params):
        """Fresh state lists for `params`, as the classes make them: zeros, the spec's
        initial value, or copies of the params (schedule-free's z)."""
        out = []
        for name in self.states:
            if self.spec.state(name).like_param:
                out.append([p.copy() for p in params])
                continue
            value = self.spec.init_value(name, self.options)
            bufs = [np.zeros_like(p) for p in params]
            if value:
                for b in bufs:
                    b[...] = value
            out.append(bufs)
        return out

    def op_kwargs(self, t):
        """The functional op's keywords of step t (the spec's per-param scalars and
        per-group bookkeeping advanced t times)."""
        spec = self.spec
        group = dict(self.options)
        kw = spec.to_op(group)
        scalars, extra, group_extra = spec.init_scalars(group), {}, {}
        for _ in range(t):
            extra, scalars = spec.advance(kw, scalars)
            group_extra, after = spec.advance_group(kw, group)
            group = {**group, **after}
        kw.update(group_extra)
        kw.update(extra)
        if spec.fresh_keyword is not None:
            kw[spec.fresh_keyword] = t == 1
        return kw

    def _args(self, states):
        by_name = dict(zip(self.states, states))
        return [by_name.get(s.name) for s in self.spec.states]

    def functional(self, params, grads, states, t):
        getattr(F, self.op)(params, grads, *self._args(states), **self.op_kwargs(t))

    def reference(self, params, grads, states, t):
        """New float64 arrays (params, *states) after one step."""
        return getattr(R, self.spec.name)(params, grads, *self._args(states),
                                          **self.op_kwargs(t))

    @property
    def has_numpy(self):
        return self._numpy is not None

    def numpy(self, params, grads, states, t):
        """The step as a user would write it: NumPy expressions, one tensor at a time."""
        self._numpy(self.op_kwargs(t), params, grads, states, t)


# --- NumPy written by hand, for the classic family -------------------------------------------


def _sgd(k, params, grads, states, t):
    for p, g in zip(params, grads):
        p -= k["lr"] * g


def _sgd_momentum(k, params, grads, states, t):
    for p, g, b in zip(params, grads, states[0]):
        if t == 1:
            b[...] = g
        else:
            b *= k["momentum"]
            b += g
        p -= k["lr"] * b


def _adagrad(k, params, grads, states, t):
    for p, g, s in zip(params, grads, states[0]):
        s += g * g
        p -= k["lr"] * g / (np.sqrt(s) + k["eps"])


def _rmsprop(k, params, grads, states, t):
    alpha = k["alpha"]
    for p, g, v in zip(params, grads, states[0]):
        v *= alpha
        v += (1 - alpha) * g * g
        p -= k["lr"] * g / (np.sqrt(v) + k["eps"])


def _adadelta(k, params, grads, states, t):
    rho, eps = k["rho"], k["eps"]
    for p, g, v, u in zip(params, grads, states[0], states[1]):
        v *= rho
        v += (1 - rho) * g * g
        delta = np.sqrt(u + eps) / np.sqrt(v + eps) * g
        u *= rho
        u += (1 - rho) * delta * delta
        p -= k["lr"] * delta


def _adam(k, params, grads, states, t):
    lr, b1, b2, eps, wd = k["lr"], k["beta1"], k["beta2"], k["eps"], k["weight_decay"]
    step_size = lr / (1 - b1**t)
    bc2_sqrt = math.sqrt(1 - b2**t)
    for p, g, m, v in zip(params, grads, states[0], states[1]):
        if k["decoupled_weight_decay"]:
            p *= 1 - lr * wd
        elif wd:
            g = g + wd * p
        m *= b1
        m += (1 - b1) * g
        v *= b2
        v += (1 - b2) * g * g
        p -= step_size * m / (np.sqrt(v) / bc2_sqrt + eps)


NUMPY = {"sgd": _sgd, "sgd_momentum": _sgd_momentum, "adagrad": _adagrad, "rmsprop": _rmsprop,
         "adadelta": _adadelta, "adam": _adam, "adamw": _adam}


def _rows():
    rows = {}
    for spec in SPECS.values():
        for name, kwargs in (spec.bench if spec.bench is not None else {spec.name: {}}).items():
            rows[name] = Algo(name, spec, kwargs, NUMPY.get(name))
    return rows


ALGOS = _rows()
