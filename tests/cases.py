"""The table of optimizer cases shared by the tests (in the spirit of PyTorch's OptimizerInfo).

An `Algorithm` ties together the in-place functional op, the float64 reference,
the optimizer class, the state buffers (torch's names, in the order the op
takes them) and the class defaults; all of it but the reference derives from the
algorithm's spec (`fusedopt.algorithms`). A `Case` is an algorithm with one setting
of its options; `CASES` holds a grid that turns every option on at least once,
alone and combined with others: an algorithm's rows there are what a new algorithm
adds to the tests.

Options are written with the class constructor's names (``betas``, not
``beta1``); `Case.op_kwargs(t)` translates them into the functional op's
keywords for step t (1 on the first step).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np

import fusedopt
from fusedopt import functional as F
from fusedopt import reference as R
from fusedopt.algorithms import REQUIRED, SPECS


@dataclass(frozen=True)
class Algorithm:
    """One algorithm of the table, as the tests use it (derived from its spec)."""

    name: str
    cls: type
    op: Callable
    ref: Callable
    #: (functional argument, state name) of every state list the op takes, in its order
    slots: tuple
    #: constructor defaults, torch.optim's
    defaults: dict
    #: whether the class keeps a `step` counter in its state
    has_step: bool
    #: options -> names of the state buffers these options use
    active: Callable
    #: (options, t) -> keyword arguments of the functional op
    kwargs: Callable
    spec: object = None
    #: the per-param scalars the class keeps in its state (`step`, NAdam's mu_product...)
    scalars: tuple = ()

    def arg_name(self, state_name):
        return dict((s, a) for a, s in self.slots)[state_name]


def op_kwargs(spec, options, t):
    """The functional op's keywords of step t (1 on the first step) for constructor
    options: the spec's translation, its per-param scalars and its per-group
    bookkeeping advanced t times from a fresh state."""
    group = {**spec.group_extras, **options}
    kw = spec.to_op(group)
    scalars = spec.init_scalars(group)
    extra, group_extra = {}, {}
    for _ in range(t):
        extra, scalars = spec.advance(kw, scalars)
        group_extra, after = spec.advance_group(kw, group)
        group = {**group, **after}
    kw.update(group_extra)
    kw.update(extra)
    if spec.fresh_keyword is not None:
        kw[spec.fresh_keyword] = t == 1
    return kw


#: values of the constructor arguments that have no default (LARS's lr), where a test
#: builds an optimizer with the defaults
REQUIRED_VALUES = {"lr": 0.1}


def required_options(spec):
    """Values for the constructor arguments of a spec that have no default."""
    return {o.name: REQUIRED_VALUES[o.name] for o in spec.options
            if not o.torch_only and o.default is REQUIRED}


def _algorithm(spec):
    return Algorithm(
        spec.name, getattr(fusedopt, spec.title), getattr(F, spec.op_name),
        getattr(R, spec.name), slots=tuple((s.arg, s.name) for s in spec.states),
        defaults={**spec.defaults(), **required_options(spec)},
        has_step="step" in spec.scalars,
        active=lambda o: spec.active(spec.to_op({**spec.group_extras, **o})),
        kwargs=lambda o, t: op_kwargs(spec, o, t), spec=spec, scalars=tuple(spec.scalars))


# the elementwise algorithms over dense gradients (not SparseAdam's rows, nor the specs
# that build plans of their own: Muon, Adafactor)
ALGORITHMS = {name: _algorithm(spec) for name, spec in SPECS.items()
              if spec.gradient == "dense" and not spec.composite}

# State buffers whose values are never negative (sums and averages of squares).
NONNEGATIVE_STATES = {s.name for spec in SPECS.values() for s in spec.states if s.positive}


#: (class name, constructor options) that torch.optim refuses with a ValueError; the
#: NumPy classes refuse them too, and fusedopt.torch with torch's very message.
INVALID = [
    ("SGD", dict(lr=-0.1)),
    ("SGD", dict(momentum=-0.5)),
    ("SGD", dict(weight_decay=-1e-4)),
    ("SGD", dict(nesterov=True)),
    ("SGD", dict(nesterov=True, momentum=0.9, dampening=0.1)),
    ("Adagrad", dict(lr=-0.1)),
    ("Adagrad", dict(lr_decay=-0.1)),
    ("Adagrad", dict(weight_decay=-0.1)),
    ("Adagrad", dict(initial_accumulator_value=-0.1)),
    ("Adagrad", dict(eps=-1e-10)),
    ("RMSprop", dict(lr=-0.1)),
    ("RMSprop", dict(eps=-1e-8)),
    ("RMSprop", dict(momentum=-0.1)),
    ("RMSprop", dict(weight_decay=-0.1)),
    ("RMSprop", dict(alpha=-0.1)),
    ("Adadelta", dict(lr=-0.1)),
    ("Adadelta", dict(rho=-0.1)),
    ("Adadelta", dict(rho=1.1)),
    ("Adadelta", dict(eps=-1e-6)),
    ("Adadelta", dict(weight_decay=-0.1)),
    ("Adam", dict(lr=-0.1)),
    ("Adam", dict(eps=-1e-8)),
    ("Adam", dict(betas=(1.0, 0.999))),
    ("Adam", dict(betas=(-0.1, 0.999))),
    ("Adam", dict(betas=(0.9, 1.0))),
    ("Adam", dict(betas=(0.9, -0.5))),
    ("Adam", dict(weight_decay=-0.1)),
    ("AdamW", dict(lr=-0.1)),
    ("AdamW", dict(eps=-1e-8)),
    ("AdamW", dict(betas=(1.0, 0.999))),
    ("AdamW", dict(betas=(0.9, 1.0))),
    ("AdamW", dict(weight_decay=-0.1)),
    ("NAdam", dict(lr=-0.1)),
    ("NAdam", dict(eps=-1e-8)),
    ("NAdam", dict(betas=(1.0, 0.999))),
    ("NAdam", dict(betas=(0.9, -0.1))),
    ("NAdam", dict(weight_decay=-0.1)),
    ("NAdam", dict(momentum_decay=-0.1)),
    ("RAdam", dict(lr=-0.1)),
    ("RAdam", dict(eps=-1e-8)),
    ("RAdam", dict(betas=(1.0, 0.999))),
    ("RAdam", dict(betas=(0.9, 1.0))),
    ("RAdam", dict(weight_decay=-0.1)),
    ("Adamax", dict(lr=-0.1)),
    ("Adamax", dict(eps=-1e-8)),
    ("Adamax", dict(betas=(1.0, 0.999))),
    ("Adamax", dict(betas=(0.9, -0.1))),
    ("Adamax", dict(weight_decay=-0.1)),
    ("ASGD", dict(lr=-0.1)),
    ("ASGD", dict(weight_decay=-0.1)),
    ("Rprop", dict(lr=-0.1)),
    ("Rprop", dict(etas=(0.0, 1.2))),
    ("Rprop", dict(etas=(1.0, 1.2))),
    ("Rprop", dict(etas=(0.5, 1.0))),
    ("Rprop", dict(etas=(1.2, 0.5))),
    ("Lion", dict(lr=-0.1)),
    ("Lion", dict(betas=(1.0, 0.99))),
    ("Lion", dict(betas=(0.9, -0.5))),
    ("Lion", dict(weight_decay=-0.1)),
    ("LAMB", dict(lr=-0.1)),
    ("LAMB", dict(eps=-1e-6)),
    ("LAMB", dict(betas=(0.9, 1.0))),
    ("LAMB", dict(weight_decay=-0.1)),
    ("LARS", dict(lr=-0.1)),
    ("LARS", dict(lr=0.1, momentum=-0.9)),
    ("LARS", dict(lr=0.1, weight_decay=-0.1)),
    ("LARS", dict(lr=0.1, trust_coefficient=-0.001)),
    ("LARS", dict(lr=0.1, eps=-1.0)),
    ("AdamWScheduleFree", dict(lr=-0.1)),
    ("AdamWScheduleFree", dict(betas=(1.0, 0.999))),
    ("AdamWScheduleFree", dict(eps=-1e-8)),
    ("AdamWScheduleFree", dict(weight_decay=-0.1)),
    ("AdamWScheduleFree", dict(warmup_steps=-1)),
    ("AdamWScheduleFree", dict(warmup_steps=2.5)),
    ("AdamWScheduleFree", dict(r=-1.0)),
    ("AdamWScheduleFree", dict(weight_lr_power=-2.0)),
]


@dataclass(frozen=True)
class Case:
    algo: Algorithm
    #: constructor keyword arguments that differ from the defaults
    overrides: dict = field(default_factory=dict)

    @property
    def options(self):
        """Every constructor option, defaults filled in."""
        return {**self.algo.defaults, **self.overrides}

    @property
    def id(self):
        parts = [self.algo.name]
        for k, v in self.overrides.items():
            if v is True:
                parts.append(k)
            elif isinstance(v, tuple):
                parts.append(f"{k}={','.join(map(str, v))}")
            else:
                parts.append(f"{k}={v}")
        return "-".join(parts)

    def __str__(self):
        return self.id

    @property
    def state_names(self):
        """State buffers these options use, in the op's argument order (no `step`)."""
        return self.algo.active(self.options)

    def op_kwargs(self, t):
        return self.algo.kwargs(self.options, t)

    def make(self, params, **changes):
        """The optimizer class over `params` with these options, ready to step (in train
        mode, for the algorithms with train and eval modes)."""
        opt = self.algo.cls(params, **{**self.options, **changes})
        if self.algo.spec.mode_state is not None:
            opt.train()
        return opt

    def initial_state(self, param, name):
        """A buffer as the class creates it: zeros, the spec's initial value, or a copy
        of the param."""
        if self.algo.spec.state(name).like_param:
            return np.array(param, copy=True)
        out = np.zeros_like(param)
        out[...] = self.algo.spec.init_value(name, self.options)
        return out

    def _state_args(self, states):
        return [states[s] if s in self.state_names else None for _, s in self.algo.slots]

    def run_op(self, params, grads, states, t):
        """The functional op, in place. `states` maps state names to lists of arrays."""
        return self.algo.op(params, grads, *self._state_args(states), **self.op_kwargs(t))

    def run_reference(self, params, grads, states, t):
        """The reference: (params, {state name: list}) as new float64 arrays."""
        out = self.algo.ref(params, grads, *self._state_args(states), **self.op_kwargs(t))
        assert len(out) == 1 + len(self.state_names)
        return out[0], dict(zip(self.state_names, out[1:]))


def case(name, **overrides):
    return Case(ALGORITHMS[name], overrides)


# Learning rates are larger than the defaults where that makes each update stand
# well clear of rounding, so that a wrong update cannot hide under the tolerance.
CASES = [
    case("sgd", lr=0.05),
    case("sgd", lr=0.05, maximize=True),
    case("sgd", lr=0.05, weight_decay=0.1),
    case("sgd", lr=0.05, momentum=0.9),
    case("sgd", lr=0.05, momentum=0.9, dampening=0.3),
    case("sgd", lr=0.05, momentum=0.9, nesterov=True),
    case("sgd", lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.1, maximize=True),
    case("sgd", lr=0.05, momentum=0.5, dampening=0.5, weight_decay=0.01, maximize=True),
    case("adagrad", lr=0.1),
    case("adagrad", lr=0.1, lr_decay=0.05),
    case("adagrad", lr=0.1, weight_decay=0.1),
    case("adagrad", lr=0.1, initial_accumulator_value=0.3),
    case("adagrad", lr=0.1, lr_decay=0.01, weight_decay=0.05, initial_accumulator_value=0.1,
         eps=1e-6, maximize=True),
    case("rmsprop"),
    case("rmsprop", maximize=True),
    case("rmsprop", weight_decay=0.1),
    case("rmsprop", momentum=0.9),
    case("rmsprop", centered=True),
    case("rmsprop", centered=True, momentum=0.9),
    case("rmsprop", alpha=0.9, eps=1e-4, weight_decay=0.05, momentum=0.5, centered=True,
         maximize=True),
    case("adadelta"),
    case("adadelta", maximize=True),
    case("adadelta", weight_decay=0.1),
    case("adadelta", lr=0.3, rho=0.5, eps=1e-3, weight_decay=0.05, maximize=True),
    case("adam", lr=0.01),
    case("adam", lr=0.01, maximize=True),
    case("adam", lr=0.01, weight_decay=0.1),
    case("adam", lr=0.01, amsgrad=True),
    case("adam", lr=0.01, betas=(0.8, 0.99), eps=1e-6),
    case("adam", lr=0.01, betas=(0.5, 0.9), weight_decay=0.1, amsgrad=True, maximize=True),
    case("adamw", lr=0.01),
    case("adamw", lr=0.01, weight_decay=0.1),
    case("adamw", lr=0.01, weight_decay=0.0),
    case("adamw", lr=0.01, amsgrad=True),
    case("adamw", lr=0.01, betas=(0.5, 0.9), weight_decay=0.1, amsgrad=True, maximize=True),
    case("nadam", lr=0.01),
    case("nadam", lr=0.01, maximize=True),
    case("nadam", lr=0.01, weight_decay=0.05),
    case("nadam", lr=0.01, weight_decay=0.1, decoupled_weight_decay=True),
    case("nadam", lr=0.01, momentum_decay=0.05),
    case("nadam", lr=0.01, betas=(0.5, 0.9), eps=1e-6, momentum_decay=0.01, weight_decay=0.05,
         decoupled_weight_decay=True, maximize=True),
    case("radam", lr=0.01),
    case("radam", lr=0.01, maximize=True),
    case("radam", lr=0.01, weight_decay=0.05),
    case("radam", lr=0.01, weight_decay=0.1, decoupled_weight_decay=True),
    case("radam", lr=0.01, betas=(0.8, 0.9), eps=1e-6),
    case("radam", lr=0.01, betas=(0.5, 0.8), eps=1e-6, weight_decay=0.05,
         decoupled_weight_decay=True, maximize=True),
    case("adamax", lr=0.01),
    case("adamax", lr=0.01, maximize=True),
    case("adamax", lr=0.01, weight_decay=0.05),
    case("adamax", lr=0.01, betas=(0.8, 0.99), eps=1e-3),
    case("adamax", lr=0.01, betas=(0.5, 0.9), eps=1e-6, weight_decay=0.05, maximize=True),
    case("asgd", lr=0.05),
    case("asgd", lr=0.01, maximize=True),
    case("asgd", lr=0.05, weight_decay=0.1),
    case("asgd", lr=0.05, lambd=0.1, alpha=0.5),
    case("asgd", lr=0.05, t0=2.0),
    case("asgd", lr=0.01, lambd=0.01, alpha=0.9, t0=0.0, weight_decay=0.05, maximize=True),
    case("rprop", lr=0.01),
    case("rprop", lr=0.01, maximize=True),
    case("rprop", lr=0.05, etas=(0.3, 1.5)),
    case("rprop", lr=0.5, step_sizes=(0.01, 0.2)),
    case("rprop", lr=0.02, etas=(0.4, 1.1), step_sizes=(0.005, 0.1), maximize=True),
    case("lion", lr=0.01),
    case("lion", lr=0.01, maximize=True),
    case("lion", lr=0.01, weight_decay=0.1),
    case("lion", lr=0.01, betas=(0.5, 0.9), weight_decay=0.5, maximize=True),
    case("lamb", lr=0.01),
    case("lamb", lr=0.01, weight_decay=0.1),
    case("lamb", lr=0.01, betas=(0.8, 0.99), eps=1e-3),
    case("lamb", lr=0.01, betas=(0.5, 0.9), eps=1e-4, weight_decay=0.05),
    case("lars", lr=1.0),
    case("lars", lr=1.0, trust_coefficient=0.01, momentum=0.0),
    case("lars", lr=1.0, trust_coefficient=0.01, weight_decay=0.1, nesterov=True),
    case("lars", lr=0.5, trust_coefficient=0.05, eps=1e-3, weight_decay=0.01, momentum=0.5),
    case("adamw_schedulefree", lr=0.01),
    case("adamw_schedulefree", lr=0.01, weight_decay=0.1),
    case("adamw_schedulefree", lr=0.01, warmup_steps=3),
    case("adamw_schedulefree", lr=0.01, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.05,
         warmup_steps=2, r=0.5, weight_lr_power=1.0),
]



def in_torch(c):
    """Whether torch.optim has the algorithm of a case (the tests against torch.optim take
    only those). Without torch every case is kept: those tests then skip, saying why."""
    try:
        import torch
    except ImportError:
        return True
    return hasattr(torch.optim, c.algo.cls.__name__)


def _fullest(name):
    """The first case of an algorithm that uses the most state lists of its op."""
    mine = [c for c in CASES if c.algo.name == name]
    return max(mine, key=lambda c: len(c.state_names))


#: one case per algorithm that uses every state list of its op (as far as CASES does)
FULL_CASES = [_fullest(name) for name in ALGORITHMS]


def random_states(case_, params, rng):
    """Random, valid state buffers for `params` (not zeros, so that every term of the
    update matters): non-negative where the algorithm keeps squares, and for centered
    RMSprop a grad_avg with grad_avg**2 < square_avg, as the algorithm keeps it."""
    states = {}
    for name in case_.state_names:
        bufs = []
        for p in params:
            if name in NONNEGATIVE_STATES:
                b = rng.uniform(0.05, 1.0, p.shape)
            else:
                b = 0.5 * rng.standard_normal(p.shape)
            bufs.append(np.asarray(b, dtype=p.dtype))
        states[name] = bufs
    if "grad_avg" in states:
        states["grad_avg"] = [
            np.asarray(np.sqrt(v) * rng.uniform(-0.7, 0.7, v.shape), dtype=v.dtype)
            for v in states["square_avg"]]
    return states


def random_arrays(shapes, dtype, rng):
    return [np.asarray(rng.standard_normal(s), dtype=dtype) for s in shapes]


def data_ptr(a):
    return a.__array_interface__["data"][0]


def assert_same_bits(actual, expected, what=""):
    """Bit-for-bit equality of two arrays (NaNs and signed zeros included)."""
    actual, expected = np.asarray(actual), np.asarray(expected)
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype} != {expected.dtype}"
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    width = actual.dtype.itemsize
    a = np.ascontiguousarray(actual).reshape(-1).view(np.uint8).reshape(-1, width)
    b = np.ascontiguousarray(expected).reshape(-1).view(np.uint8).reshape(-1, width)
    diff = np.flatnonzero((a != b).any(axis=1))
    if diff.size:
        i = int(diff[0])
        raise AssertionError(
            f"{what}: {diff.size} of {a.size} elements differ; first at flat index {i}: "
            f"{actual.reshape(-1)[i]!r} != {expected.reshape(-1)[i]!r}")
