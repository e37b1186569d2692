"""Property-based tests (hypothesis) of every algorithm of the case table, functional ops
and optimizer classes.

Each example draws an algorithm from `cases.ALGORITHMS`, hyperparameters, and a list of
arrays: zero-size, 0-d and 1-element arrays among others, every accepted dtype (float32,
float64, float16, bfloat16; float32 or bfloat16 state for 16-bit params), strided and
read-only gradients, gradients shared between tensors, NaN and inf in gradients and
params; for the functional ops also loss scaling, clipping and skipping. It may then
spoil the call in one way: a refused dtype (integer, complex, big-endian), mismatched
dtypes, shapes or counts, a strided or read-only param or state, memory shared by
arrays a step writes, something that is not an array, a hyperparameter out of range.

The property: a call that was not spoiled matches the float64 reference element by
element (NaN where the reference has NaN, the same infinities, finite values within a
tolerance that follows from the storage and math precisions) and leaves the gradients
as they were; a spoiled call raises the ValueError or TypeError that DESIGN.md section 4
names, with a message, and leaves every array (and an optimizer's state, step counts
and hyperparameters) exactly as it was.

Algorithms come from the case table, so a new row there is fuzzed too: its options get
the domains below when their names are known here, booleans get both values, other
options keep their defaults (add a domain to fuzz them). The refused constructor
options include the case table's rows (`cases.INVALID`). Every front-end generated from
the algorithms' specs is fuzzed: the functional ops and the NumPy classes against the
reference (a class's later steps run on its kept plan, the gradients swapped in), the
batched optimizers and fusedopt.torch (default and flat=True) bit for bit against the
NumPy classes.

Beyond the case table: the row-sparse `sparse_adam_` (rows with repeats, bad rows and
values) against its float64 reference, and the EMA of the params (``ema_decay`` of a
few classes, ``ema=``/``ema_decay=`` of the functional ops) against the steps without
it followed by the float64 EMA update; decays outside [0, 1] refused.

Sizes: the "ci" hypothesis profile (the default, see conftest.py) runs a few hundred
examples, derandomized (the same ones on every run); FUSEDOPT_HYPOTHESIS_PROFILE=long
runs thousands, with fresh random draws each time.
"""

from __future__ import annotations

import math

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, note
from hypothesis import strategies as st

import fusedopt
from cases import ALGORITHMS, INVALID as INVALID_ROWS, NONNEGATIVE_STATES, Case, assert_same_bits
from fusedopt import batched
from fusedopt.algorithms._spec import Spec

try:
    import torch
    import fusedopt.torch as fot
except ImportError:  # the torch front-end's test skips
    torch = fot = None

F16 = np.dtype(np.float16)
BF16 = np.dtype(ml_dtypes.bfloat16)
F32 = np.dtype(np.float32)
F64 = np.dtype(np.float64)
ACCEPTED = [F32, F64, F16, BF16]
REFUSED = [np.dtype(np.int32), np.dtype(np.complex64), np.dtype(">f4"), np.dtype(">f8"),
           np.dtype(np.int64)]
SHAPES = [(), (0,), (1,), (1, 1), (5,), (3, 4), (2, 0, 3), (17,)]

C = 64  # rounding errors of one element's update, in units of the math type's roundoff
UNIT = {F64: 2.0 ** -53}  # unit roundoff of the math: float64, or float32 for the rest
MANTISSA = {F16: 10, BF16: 7}
HALF_SUBNORMAL = {F16: 2.0 ** -25, BF16: 2.0 ** -134}
MAX = {F16: 65504.0, BF16: float(ml_dtypes.finfo(ml_dtypes.bfloat16).max),
       F32: float(np.finfo(np.float32).max), F64: float(np.finfo(np.float64).max)}

# --- hyperparameters -----------------------------------------------------------------------

def _zero_or(low, high):
    """0, or a value in [low, high]. Hyperparameters never come closer to 0: the math of
    float32 and 16-bit params rounds them to float32, where a weight decay of 1e-265 is
    0 (and 0 * inf is NaN where the float64 reference has inf)."""
    return st.one_of(st.just(0.0), st.floats(low, high))


VALID = {
    "lr": _zero_or(1e-4, 1.0),
    "momentum": _zero_or(0.01, 0.99),
    "dampening": _zero_or(1e-6, 1.0),
    "weight_decay": _zero_or(1e-6, 0.5),
    "lr_decay": _zero_or(1e-6, 1.0),
    "initial_accumulator_value": _zero_or(1e-6, 1.0),
    "eps": _zero_or(1e-10, 1e-2),
    # alpha well below 1 keeps centered RMSprop's v - grad_avg^2 clear of cancellation,
    # which float32 (the math of float32 and 16-bit params) would not survive
    "alpha": st.floats(0.5, 0.999),
    "rho": _zero_or(1e-6, 1.0),
    "betas": st.tuples(_zero_or(1e-6, 0.999), _zero_or(1e-6, 0.9999)),
    "momentum_decay": _zero_or(1e-4, 0.05),  # NAdam
    "lambd": _zero_or(1e-6, 1e-2),  # ASGD
    "t0": st.floats(1.0, 1e6),  # ASGD
    "etas": st.tuples(st.floats(0.1, 0.9), st.floats(1.05, 2.0)),  # Rprop
    "step_sizes": st.tuples(st.floats(1e-7, 1e-3), st.floats(1.0, 100.0)),  # Rprop
}
_negative = st.floats(-10.0, -1e-6)
INVALID = {  # what torch.optim refuses, and so do the classes
    "lr": _negative, "momentum": _negative, "weight_decay": _negative, "eps": _negative,
    "lr_decay": _negative, "initial_accumulator_value": _negative, "alpha": _negative,
    "rho": st.one_of(_negative, st.floats(1.001, 10.0)),
    "betas": st.one_of(st.tuples(st.floats(1.0, 2.0), st.floats(0.0, 0.99)),
                       st.tuples(st.floats(0.0, 0.99), st.floats(1.0, 2.0)),
                       st.tuples(_negative, st.floats(0.0, 0.99))),
}
# Names that torch.optim checks in some classes only (ASGD's alpha is unchecked).
INVALID_ONLY_IN = {"alpha": ("RMSprop",)}


def draw_options(data, algo, functional, fixed=None):
    """Valid options for `algo`: domains by name, booleans both ways, else the default;
    the options in `fixed` take the values given there."""
    fixed = fixed or {}
    options = {}
    for name, default in algo.defaults.items():
        if name in fixed:
            value = fixed[name]
        elif name in VALID:
            value = data.draw(VALID[name], label=name)
            if name == "lr" and functional:
                value = data.draw(st.sampled_from([value, -value]), label="lr sign")
        elif isinstance(default, bool):
            value = data.draw(st.booleans(), label=name)
        else:
            value = default
        options[name] = value
    if options.get("nesterov") and "dampening" in options:
        # SGD's Nesterov needs momentum and no dampening (torch's rule)
        options["dampening"] = 0.0
        if not options.get("momentum", 0) > 0:
            options["momentum"] = data.draw(st.floats(0.01, 0.99), label="nesterov momentum")
    return options


# --- arrays --------------------------------------------------------------------------------


def strided(a):
    """The same values in a view that is not C-contiguous (every other element)."""
    base = np.zeros(a.shape + (2,), dtype=a.dtype)
    view = base[..., 0]
    view[...] = a
    return view


def read_only(a):
    a = a.copy()
    a.flags.writeable = False
    return a


def state_dtype_of(param_dtype, sixteen_state):
    return sixteen_state if param_dtype.itemsize == 2 else param_dtype


def random_states(names, params64, rng):
    """Valid state buffers: non-negative sums of squares (the specs' positive states,
    `cases.NONNEGATIVE_STATES`); for centered RMSprop a
    grad_avg with grad_avg^2 well below square_avg, as the algorithm keeps them."""
    states = {}
    for name in names:
        states[name] = [rng.uniform(0.05, 1.0, p.shape) if name in NONNEGATIVE_STATES else
                        0.5 * rng.standard_normal(p.shape) for p in params64]
    if "grad_avg" in states and "square_avg" in states:
        states["grad_avg"] = [np.sqrt(v) * rng.uniform(-0.7, 0.7, v.shape)
                              for v in states["square_avg"]]
    return states


def state_names(case):
    """The state lists the case's options use, in the op's order."""
    return tuple(case.algo.active(case.options))


def state_args(case, states):
    """The op's state arguments: the lists of `states`, None for unused slots."""
    used = state_names(case)
    return [states[s] if s in used else None for _, s in case.algo.slots]


class Draw:
    """The arrays of one call: params, grads, states {name: list} as the op takes them."""

    def __init__(self, data, case, n_max=4):
        rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1), label="seed"))
        n = data.draw(st.integers(0, n_max), label="tensors")
        self.shapes = [data.draw(st.sampled_from(SHAPES), label="shape") for _ in range(n)]
        self.dtypes = [data.draw(st.sampled_from(ACCEPTED), label="dtype") for _ in range(n)]
        self.state_dtypes = [state_dtype_of(d, data.draw(st.sampled_from([F32, BF16]),
                                                         label="state dtype"))
                             for d in self.dtypes]
        scale = data.draw(st.sampled_from([1.0, 1e-2, 30.0]), label="scale")
        params64 = [scale * rng.standard_normal(s) for s in self.shapes]
        self.params = [np.asarray(p, dtype=d) for p, d in zip(params64, self.dtypes)]
        self.grads = [np.asarray(scale * rng.standard_normal(s), dtype=d)
                      for s, d in zip(self.shapes, self.dtypes)]
        states64 = random_states(state_names(case), params64, rng)
        self.states = {name: [np.asarray(b, dtype=sd) for b, sd in zip(bufs, self.state_dtypes)]
                       for name, bufs in states64.items()}
        for k in range(n):
            if self.grads[k].size and data.draw(st.booleans(), label="special values"):
                where = rng.integers(0, self.grads[k].size, 2)
                value = data.draw(st.sampled_from([np.nan, np.inf, -np.inf]), label="special")
                target = self.params if data.draw(st.booleans(), label="in param") else self.grads
                target[k].reshape(-1)[where] = value
            kind = data.draw(st.sampled_from(["plain", "plain", "strided", "read-only",
                                              "shared"]), label="grad kind")
            if kind == "strided" and self.grads[k].ndim:
                self.grads[k] = strided(self.grads[k])
            elif kind == "read-only":
                self.grads[k] = read_only(self.grads[k])
            elif kind == "shared":  # the gradient of an earlier tensor of the same kind
                for j in range(k):
                    if (self.shapes[j], self.dtypes[j]) == (self.shapes[k], self.dtypes[k]):
                        self.grads[k] = self.grads[j]
                        break

    def arrays(self):
        out = list(self.params) + list(self.grads)
        for lst in self.states.values():
            if isinstance(lst, list):
                out += lst
        return [a for a in out if isinstance(a, np.ndarray)]


def snapshot(arrays):
    return [(a, a.tobytes()) for a in arrays]


def assert_unchanged(snap, what):
    for k, (a, before) in enumerate(snap):
        assert a.tobytes() == before, f"{what}: array {k} changed"


def spoil(data, d, functional):
    """Spoil the call in one way (or none); returns (description, exception type)."""
    n = len(d.params)
    live = [k for k in range(n) if d.params[k].size > 0]
    wide = [k for k in range(n) if d.params[k].size >= 2]
    names = [name for name, lst in d.states.items()]
    choices = ["none"] * 6
    if n:
        choices += ["refused dtype", "grad dtype", "grad shape", "param read-only",
                    "grad count", "not an array"]
        if names:
            choices += ["state dtype", "state shape", "state read-only", "state count"]
    if wide:
        choices += ["param strided"] + (["state strided"] if names else [])
    if live:
        choices += ["params overlap", "grad is a param"]
        same = [k for k in live if names and d.states[names[0]][k].dtype == d.params[k].dtype]
        if same:
            choices += ["state is a param"]
    what = data.draw(st.sampled_from(choices), label="spoil")
    if what == "none":
        return None, None
    pick = lambda ks: data.draw(st.sampled_from(ks), label="index")  # noqa: E731
    name = data.draw(st.sampled_from(names), label="state") if names else None
    if what == "state is a param":
        name = names[0]
        k = pick([k for k in live if d.states[name][k].dtype == d.params[k].dtype])
    else:
        k = pick(wide if "strided" in what else live if what in (
            "params overlap", "grad is a param") else list(range(n)))
    if what == "refused dtype":
        dt = data.draw(st.sampled_from(REFUSED), label="refused")
        with np.errstate(invalid="ignore"):  # NaN and inf to integers
            d.params[k] = d.params[k].astype(np.float64).astype(dt)
            d.grads[k] = np.asarray(d.grads[k], dtype=np.float64).astype(dt)
            for lst in d.states.values():
                lst[k] = lst[k].astype(np.float64).astype(dt)
        return what, TypeError
    if what == "grad dtype":
        other = [t for t in ACCEPTED + REFUSED if t != d.params[k].dtype]
        d.grads[k] = np.asarray(d.grads[k]).astype(data.draw(st.sampled_from(other)))
        return what, TypeError
    if what == "state dtype":
        wrong = F64 if d.params[k].dtype != F64 else F32
        d.states[name][k] = d.states[name][k].astype(wrong)
        return what, TypeError
    if what in ("grad shape", "state shape"):
        a = d.grads[k] if what == "grad shape" else d.states[name][k]
        shape = a.shape + (1,) if data.draw(st.booleans(), label="same size") else (a.size + 1,)
        new = np.zeros(shape, dtype=a.dtype)
        if what == "grad shape":
            d.grads[k] = new
        else:
            d.states[name][k] = new
        return what, ValueError
    if what == "param read-only":
        d.params[k] = read_only(d.params[k])
        return what, ValueError
    if what == "state read-only":
        d.states[name][k] = read_only(d.states[name][k])
        return what, ValueError
    if what == "param strided":
        d.params[k] = strided(d.params[k])
        return what, ValueError
    if what == "state strided":
        d.states[name][k] = strided(d.states[name][k])
        return what, ValueError
    if what == "grad count":
        d.grads = d.grads[:-1] if data.draw(st.booleans()) else d.grads + [d.grads[-1]]
        return what, ValueError
    if what == "state count":
        d.states[name] = d.states[name][:-1]
        return what, ValueError
    if what == "not an array":
        d.grads[k] = np.asarray(d.grads[k]).tolist()
        return what, TypeError
    if what == "params overlap":  # the same param twice (with its own grad and states)
        d.params.append(d.params[k])
        d.grads.append(d.grads[k].copy())
        for lst in d.states.values():
            lst.append(lst[k].copy())
        return what, ValueError
    if what == "grad is a param":
        d.grads[k] = d.params[k]
        return what, ValueError
    if what == "state is a param":
        d.states[name][k] = d.params[k]
        return what, ValueError
    raise AssertionError(what)


# --- tolerances ----------------------------------------------------------------------------


def half_ulp(x, dtype):
    if dtype not in MANTISSA:
        return 0.0
    return np.maximum(np.abs(x) * 2.0 ** -(MANTISSA[dtype] + 1), HALF_SUBNORMAL[dtype])


def assert_close(actual, ref, store, math_dtype, scale, what):
    """`actual` (stored in dtype `store`) against the float64 `ref`: NaN where the
    reference is NaN, equal infinities (or an overflow of the storage format), and
    finite values within half a unit of the storage plus C roundoffs of the math type
    times `scale`, a bound of the magnitudes the update handled."""
    a = np.asarray(actual, dtype=F64)
    r = np.asarray(ref, dtype=F64)
    assert a.shape == r.shape, f"{what}: shape {a.shape} != {r.shape}"
    nan_a, nan_r = np.isnan(a), np.isnan(r)
    bad = nan_a != nan_r
    inf_r = np.isinf(r)
    bad |= inf_r & (a != r)
    over = np.isinf(a) & ~inf_r & ~nan_r
    bad |= over & ~(np.abs(r) >= MAX[store] * (1 - 2.0 ** -12))
    fin = ~nan_r & ~inf_r & ~over
    unit = UNIT.get(math_dtype, 2.0 ** -24)
    with np.errstate(all="ignore"):
        tol = half_ulp(r, store) + C * unit * np.nan_to_num(scale, nan=0.0, posinf=np.inf)
        bad |= fin & ~(np.abs(a - r) <= tol)
    if bad.any():
        i = int(np.flatnonzero(bad.ravel())[0])
        raise AssertionError(
            f"{what}: {int(bad.sum())} of {bad.size} elements off; first at flat index {i}: "
            f"{a.ravel()[i]!r} vs reference {r.ravel()[i]!r} (tolerance "
            f"{np.broadcast_to(tol, a.shape).ravel()[i]:.3g})")


def f64(a):
    return np.asarray(a, dtype=F64)


def mag(x):
    """|x| as a magnitude for a tolerance: NaN (from inf - inf, 0 * inf) counts as 0."""
    return np.nan_to_num(np.abs(f64(x)), nan=0.0, posinf=np.inf)


def check_tensor(case, p_old, g_eff, states_old, p_new, states_new, t, what):
    """One tensor's step against the reference from the same (float64) inputs."""
    opts = case.options
    lr = abs(opts.get("lr", 0.0))
    wd = abs(opts.get("weight_decay", 0.0))
    with np.errstate(all="ignore"):  # NaN and inf go through the reference too
        ref_p, ref_s = case.run_reference([f64(p_old)], [g_eff],
                                          {n: [f64(s)] for n, s in states_old.items()}, t)
        gmag = mag(g_eff) + (wd * mag(p_old) if wd else 0.0)
        smag = sum((mag(s) + mag(ref_s[n][0]) for n, s in states_old.items()),
                   np.zeros_like(gmag))
        pscale = mag(p_old) + mag(ref_p[0] - f64(p_old)) + \
            (lr * (gmag + smag) if lr else 0.0)
        math_dtype = p_new.dtype
        assert_close(p_new, ref_p[0], p_new.dtype, math_dtype, pscale, f"{what} param")
        for n, r in ref_s.items():
            sscale = mag(states_old[n]) + mag(r[0]) + gmag + gmag * gmag
            assert_close(states_new[n], r[0], states_new[n].dtype, math_dtype, sscale,
                         f"{what} {n}")


# --- functional ops ------------------------------------------------------------------------


def draw_checks(data):
    """Loss scaling, clipping and skipping (valid), or one invalid value of them."""
    checks = {}
    if data.draw(st.booleans(), label="loss scale"):
        checks["loss_scale"] = data.draw(st.sampled_from([0.5, 8.0, 1024.0, 3.0]))
    if data.draw(st.booleans(), label="clip"):
        checks["max_grad_norm"] = data.draw(st.floats(1e-3, 10.0))
    if data.draw(st.booleans(), label="skip"):
        checks["skip_nonfinite"] = True
    return checks


@given(st.data())
def test_functional_ops(data):
    algo = data.draw(st.sampled_from(list(ALGORITHMS.values())), label="algorithm")
    case = Case(algo, draw_options(data, algo, functional=True))
    d = Draw(data, case)
    checks = draw_checks(data)
    with np.errstate(invalid="ignore", over="ignore"):  # NaN and inf cast to other dtypes
        spoiled, error = spoil(data, d, functional=True)
    if spoiled is None and data.draw(st.integers(0, 9), label="bad check") == 0:
        bad = data.draw(st.sampled_from([("loss_scale", 0.0), ("loss_scale", -2.0),
                                         ("loss_scale", math.inf), ("max_grad_norm", 0.0),
                                         ("max_grad_norm", -1.0)]))
        checks[bad[0]] = bad[1]
        spoiled, error = f"{bad[0]}={bad[1]}", ValueError
    t = data.draw(st.integers(1, 5), label="step")
    note(f"{case}, checks {checks}, spoiled: {spoiled}, shapes {d.shapes}, dtypes {d.dtypes}")
    before = [np.array(a, copy=True) for a in d.params]
    states_before = {n: [np.array(a, copy=True) for a in lst] for n, lst in d.states.items()}
    snap = snapshot(d.arrays())

    def call():
        if not checks:
            return case.run_op(d.params, d.grads, d.states, t)
        return case.algo.op(d.params, d.grads, *state_args(case, d.states),
                            **case.op_kwargs(t), **checks)

    if spoiled is not None:
        with pytest.raises(error) as info:
            call()
        assert str(info.value), "an error without a message"
        assert_unchanged(snap, f"after refusing '{spoiled}'")
        return

    grads_snap = snapshot(d.grads)
    out = call()
    assert_unchanged(grads_snap, "the gradients of a step")
    # the gradients the reference sees: unscaled and clipped as the host computes it
    inv = 1.0 / checks["loss_scale"] if "loss_scale" in checks else 1.0
    with np.errstate(all="ignore"):
        g64 = [f64(g) for g in d.grads]
        sumsq = sum(float(np.sum(g * g)) for g in g64)
        finite = all(bool(np.isfinite(g).all()) for g in g64)
        norm = math.sqrt(sumsq) * inv
        coef = inv
        if "max_grad_norm" in checks:
            clip = checks["max_grad_norm"] / (norm + 1e-6)
            coef *= clip if not clip >= 1.0 else 1.0
    skip = checks.get("skip_nonfinite", False) and not finite
    if "max_grad_norm" in checks or "skip_nonfinite" in checks:
        assert out.skipped == skip
        assert out.grad_norm == pytest.approx(norm, rel=1e-9, nan_ok=True)
    else:
        assert out is None
    if skip:
        assert_unchanged(snap, "a skipped step")
        return
    for k in range(len(d.params)):
        with np.errstate(all="ignore"):
            g_eff = g64[k] * coef
        check_tensor(case, before[k], g_eff, {n: lst[k] for n, lst in states_before.items()
                                              if n in state_names(case)},
                     d.params[k], {n: lst[k] for n, lst in d.states.items()}, t,
                     f"{case} tensor {k} {d.dtypes[k]} {d.shapes[k]}")


# --- optimizer classes ---------------------------------------------------------------------


def state_dict_bytes(opt):
    """Everything of an optimizer's state dict, arrays as bytes."""
    def walk(v):
        if isinstance(v, dict):
            return {k: walk(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return type(v)(walk(x) for x in v)
        if isinstance(v, np.ndarray):
            return (v.dtype.str, v.shape, v.tobytes())
        return v
    return walk(opt.state_dict())


@given(st.data())
def test_optimizer_classes(data):
    algo = data.draw(st.sampled_from(list(ALGORITHMS.values())), label="algorithm")
    options = draw_options(data, algo, functional=False)
    valid = Case(algo, dict(options))  # the arrays are drawn for valid options
    bad_option = None
    rows = [kw for name, kw in INVALID_ROWS if name == algo.cls.__name__]
    if rows and data.draw(st.integers(0, 9), label="bad option from the table") == 0:
        row = data.draw(st.sampled_from(rows), label="table row")
        options, bad_option = {**algo.defaults, **row}, f"table row {row}"
    elif data.draw(st.integers(0, 4), label="bad option") == 0:
        known = [k for k in options if k in INVALID and
                 algo.cls.__name__ in INVALID_ONLY_IN.get(k, (algo.cls.__name__,))]
        if "dampening" in options and "nesterov" in options:  # SGD's rule
            known.append("nesterov")
        if known:
            bad_option = data.draw(st.sampled_from(known), label="bad option name")
            if bad_option == "nesterov":
                options.update(nesterov=True, dampening=0.5,
                               momentum=data.draw(st.sampled_from([0.0, 0.9])))
            elif data.draw(st.booleans(), label="not a number"):
                options[bad_option] = "0.1"
            else:
                options[bad_option] = data.draw(INVALID[bad_option])
    case = Case(algo, options)
    d = Draw(data, valid, n_max=4)
    params = d.params
    if len(params) >= 2 and len({p.dtype for p in params}) == 1 and \
            data.draw(st.booleans(), label="views of one buffer"):
        packed = fusedopt.flat_arrays([p.shape for p in params], params[0].dtype)
        for view, p in zip(packed.views, params):
            view[...] = p
        params = d.params = list(packed.views)  # adjacent, never overlapping
    state16 = data.draw(st.sampled_from([None, BF16]), label="state dtype of 16-bit params")
    precision = fusedopt.Precision(state_dtype=state16)
    two_groups = len(params) >= 2 and data.draw(st.booleans(), label="two groups")
    lr2 = data.draw(VALID["lr"], label="lr of group 2") if two_groups else None

    # a param the steps cannot take: refused at the first step
    flaw, flaw_error = None, None
    live = [k for k, p in enumerate(params) if p.size]
    if params and data.draw(st.integers(0, 5), label="param flaw") == 0:
        flaw = data.draw(st.sampled_from(["read-only", "strided", "refused dtype"] +
                                         (["overlap"] if live else [])), label="flaw")
        k = data.draw(st.sampled_from(live if flaw == "overlap" else range(len(params))))
        if flaw == "read-only":
            params[k], flaw_error = read_only(params[k]), ValueError
        elif flaw == "strided" and params[k].size >= 2:
            params[k], flaw_error = strided(params[k]), ValueError
        elif flaw == "refused dtype":
            dt = data.draw(st.sampled_from(REFUSED), label="refused")
            with np.errstate(invalid="ignore"):
                params[k], flaw_error = params[k].astype(np.float64).astype(dt), TypeError
        elif flaw == "overlap":  # a second view of the same memory
            params.append(params[k][...])
            flaw_error = ValueError
        else:
            flaw = None
    note(f"{case}, bad option {bad_option}, shapes {[p.shape for p in params]}, dtypes "
         f"{[p.dtype for p in params]}, state16 {state16}, groups {1 + two_groups}, "
         f"flaw {flaw}")

    def groups(ps):
        if not two_groups:
            return ps
        return [{"params": ps[:1]}, {"params": ps[1:], "lr": lr2}]

    if bad_option is not None:
        snap = snapshot(params)
        with pytest.raises(ValueError) as info:
            case.make(groups(params), precision=precision)
        assert str(info.value)
        assert_unchanged(snap, "a refused construction")
        return
    if not params:
        with pytest.raises(ValueError, match="empty parameter list"):
            case.make(params, precision=precision)
        return
    if flaw == "overlap" and two_groups and k == 0:  # a view of group 1's param in group 2
        snap = snapshot(params)
        with pytest.raises(ValueError, match="shares memory"):
            case.make(groups(params), precision=precision)
        assert_unchanged(snap, "a refused construction")
        return
    opt = case.make(groups(params), precision=precision)
    cases = [case] if not two_groups else [case, Case(algo, {**options, "lr": lr2})]
    case_of = [cases[0]] + [cases[-1]] * (len(params) - 1)
    counts = [0] * len(params)  # steps each param has taken
    steps_taken = 0  # steps of the optimizer: per-group bookkeeping (schedule-free) counts them
    per_group = type(algo.spec).advance_group is not Spec.advance_group
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1), label="grad seed"))
    for step in range(data.draw(st.integers(1, 3), label="steps")):
        grads = [None if data.draw(st.integers(0, 5), label="no grad") == 0 else
                 np.asarray(rng.standard_normal(p.shape), dtype=p.dtype) for p in params]
        if flaw is not None:  # every param must take a step for the flaw to show
            grads = [np.asarray(rng.standard_normal(p.shape), dtype=p.dtype) for p in params]
        for k, g in enumerate(grads):
            if g is not None and g.size and g.dtype in ACCEPTED and \
                    data.draw(st.integers(0, 5), label="nan") == 0:
                g.reshape(-1)[0] = data.draw(st.sampled_from([np.nan, np.inf, -np.inf]))
            if g is not None and g.ndim and data.draw(st.integers(0, 5), label="strided") == 0:
                grads[k] = strided(g)
        spoiled, error = (f"param {flaw}", flaw_error) if flaw else (None, None)
        what = data.draw(st.sampled_from(["none"] * 8 + ["shape", "dtype", "count", "list"]),
                         label="spoil grads")
        live = [k for k, g in enumerate(grads) if g is not None]
        if spoiled is None and what != "none" and live:
            k = data.draw(st.sampled_from(live), label="spoiled index")
            if what == "shape":
                grads[k] = np.zeros(grads[k].shape + (2,), grads[k].dtype)
                spoiled, error = what, ValueError
            elif what == "dtype":
                other = [t for t in ACCEPTED + REFUSED if t != params[k].dtype]
                grads[k] = np.zeros(grads[k].shape, data.draw(st.sampled_from(other)))
                spoiled, error = what, TypeError
            elif what == "count":
                grads = grads[:-1]
                spoiled, error = what, ValueError
            else:
                grads[k] = np.asarray(grads[k]).tolist()
                spoiled, error = what, TypeError
        before_sd = state_dict_bytes(opt)
        before_steps = opt.steps_taken
        snap = snapshot(list(params) + [g for g in grads if isinstance(g, np.ndarray)])
        states_before = {k: {n: np.array(v, copy=True) for n, v in s.items()
                             if isinstance(v, np.ndarray)} for k, s in opt.state.items()}
        if spoiled is not None:
            with pytest.raises(error) as info:
                opt.step(grads)
            assert str(info.value)
            assert_unchanged(snap, f"a refused step ({spoiled})")
            assert state_dict_bytes(opt) == before_sd and opt.steps_taken == before_steps
            if flaw:
                return
            continue
        opt.step(grads)
        steps_taken += 1
        for k, (p, g) in enumerate(zip(params, grads)):
            if g is None:
                assert p.tobytes() == snap[k][1]
                continue
            counts[k] += 1
            c = case_of[k]
            names = state_names(c)
            p_old = np.frombuffer(snap[k][1], p.dtype).reshape(p.shape)
            # state the class creates at the param's first step starts as the spec says
            # (zeros, Rprop's step sizes at lr, schedule-free's z as the param), in the
            # state's dtype
            st_old = states_before.get(k) or {
                n: c.initial_state(np.asarray(p_old, opt.state[k][n].dtype), n)
                for n in names}
            check_tensor(c, p_old, f64(g), {n: st_old[n] for n in names}, p,
                         {n: opt.state[k][n] for n in names},
                         steps_taken if per_group else counts[k],
                         f"{c} step {step} param {k} {p.dtype} {p.shape}")
            if algo.has_step:
                assert opt.state[k]["step"] == float(counts[k])


# --- batched optimizers --------------------------------------------------------------------


def assert_same_values(actual, expected, what):
    """The same bits, except that a NaN equals any NaN: IEEE 754 leaves the sign and
    payload of a NaN result unspecified, and the compiled kernels may give either sign
    (e.g. plain SGD with maximize negates a NaN gradient in one loop of the kernel and
    not in the other, and which loop takes an element depends on the array's address)."""
    a, b = np.asarray(actual), np.asarray(expected)
    assert a.dtype == b.dtype and a.shape == b.shape, f"{what}: {a.dtype}{a.shape} vs " \
        f"{b.dtype}{b.shape}"
    both = np.isnan(a) & np.isnan(b)
    if both.any():
        a, b = np.where(both, 0, a), np.where(both, 0, b)
    assert a.tobytes() == b.tobytes(), f"{what}: {actual!r} vs {expected!r}"


def random_grad(data, rng, shape, dtype, what):
    """A gradient of `shape`, with inf or NaN at times."""
    g = np.asarray(rng.standard_normal(shape), dtype=dtype)
    if g.size and data.draw(st.integers(0, 5), label=f"{what} special") == 0:
        g.reshape(-1)[0] = data.draw(st.sampled_from([np.nan, np.inf, -np.inf]))
    return g


@given(st.data())
def test_batched_optimizers(data):
    """Every algorithm's batched optimizer (`fusedopt.batched.OPTIMIZERS`, from the
    specs): K members with hyperparameters of their own take, bit for bit, the steps of
    K separate optimizers of the class; a None gradient leaves its param alone for
    every member; bad gradients raise and change nothing."""
    algo = data.draw(st.sampled_from([a for a in ALGORITHMS.values()
                                      if a.name in batched.OPTIMIZERS]), label="algorithm")
    cls = batched.OPTIMIZERS[algo.name]
    k = data.draw(st.integers(1, 3), label="members")
    first = draw_options(data, algo, functional=False)
    # booleans, and what the spec makes one value for all members, are shared
    shared = {n: v for n, v in first.items() if isinstance(v, bool) or
              n in cls.spec.batch_shared}
    members = [first] + [draw_options(data, algo, functional=False, fixed=shared)
                         for _ in range(k - 1)]
    kwargs = {n: (v if n in shared else [m[n] for m in members]) for n, v in first.items()}
    dtype = data.draw(st.sampled_from([F32, F64]), label="dtype")
    n = data.draw(st.integers(1, 3), label="params")
    shapes = [data.draw(st.sampled_from(SHAPES), label="shape") for _ in range(n)]
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1), label="seed"))
    stacked = [np.asarray(rng.standard_normal((k, *s)), dtype=dtype) for s in shapes]
    note(f"{cls.__name__}({kwargs}), shapes {shapes}, {dtype}")
    singles = [[np.array(p[m], copy=True) for p in stacked] for m in range(k)]
    opt = cls(stacked, **kwargs)
    refs = [Case(algo, members[m]).make(ps) for m, ps in enumerate(singles)]
    steps = data.draw(st.integers(1, 3), label="steps")
    for t in range(steps):
        grads = [random_grad(data, rng, p.shape, dtype, f"grads[{j}]")
                 for j, p in enumerate(stacked)]
        for j, g in enumerate(grads):
            if g.ndim and data.draw(st.integers(0, 4), label="strided") == 0:
                grads[j] = strided(g)
        if t == steps - 1:  # the step count is the optimizer's: None only at the end
            grads = [None if data.draw(st.integers(0, 3), label="no grad") == 0 else g
                     for g in grads]
        what = data.draw(st.sampled_from(["none"] * 6 + ["shape", "dtype", "count", "list"]),
                         label="spoil")
        live = [j for j, g in enumerate(grads) if g is not None]
        if what != "none" and live:
            bad = list(grads)
            j = data.draw(st.sampled_from(live), label="spoiled index")
            error = ValueError
            if what == "shape":
                bad[j] = np.zeros(grads[j].shape + (2,), dtype)
            elif what == "dtype":
                bad[j] = np.zeros(grads[j].shape, data.draw(
                    st.sampled_from([t for t in ACCEPTED + REFUSED if t != dtype])))
                error = TypeError
            elif what == "count":
                bad = bad[:-1]
            else:
                bad, error = {"grads": bad}, TypeError  # not a list
            before_sd = state_dict_bytes(opt)
            snap = snapshot(stacked)
            with pytest.raises(error) as info:
                opt.step(bad)
            assert str(info.value)
            assert_unchanged(snap, f"a refused step ({what})")
            assert state_dict_bytes(opt) == before_sd
        stepped = snapshot(stacked)
        opt.step(grads)
        for m, ref in enumerate(refs):
            ref.step([None if g is None else np.array(g[m]) for g in grads])
        for j, p in enumerate(stacked):
            if grads[j] is None:
                assert p.tobytes() == stepped[j][1], f"params[{j}] moved without a gradient"
            for m in range(k):
                assert_same_values(p[m], singles[m][j], f"step {t}: params[{j}] of member {m}")


# --- fusedopt.torch ------------------------------------------------------------------------


def _torch_grad(data, p, g, what):
    """Set p.grad to the values of `g` in one of the ways a training loop does."""
    how = data.draw(st.sampled_from(["new", "new", "in place", "strided"]), label=what)
    value = torch.from_numpy(np.array(g, copy=True))
    if how == "in place" and p.grad is not None:
        p.grad.copy_(value)
    elif how == "strided":
        base = torch.zeros(tuple(g.shape) + (2,), dtype=value.dtype)
        base[..., 0] = value
        p.grad = base[..., 0]  # not contiguous where it has more than one element
    else:
        p.grad = value


@pytest.mark.skipif(torch is None, reason="torch is not installed")
@given(st.data())
def test_torch_classes(data):
    """fusedopt.torch's class of every algorithm (from the specs), default and flat=True,
    one or two groups, gradients replaced, zeroed, updated in place, not contiguous or
    None between steps, inf and NaN among them: bit for bit the NumPy class's params,
    states and step counts (which test_optimizer_classes checks against the reference),
    with the NumPy classes' double scalars; the case table's refused options raise
    ValueError in both."""
    algo = data.draw(st.sampled_from(list(ALGORITHMS.values())), label="algorithm")
    name = algo.cls.__name__
    tcls = getattr(fot, name)
    flat = data.draw(st.booleans(), label="flat")
    rows = [kw for cls_name, kw in INVALID_ROWS if cls_name == name]
    if rows and data.draw(st.integers(0, 9), label="bad option") == 0:
        row = data.draw(st.sampled_from(rows), label="table row")
        p = torch.nn.Parameter(torch.zeros(3))
        with pytest.raises(ValueError):
            tcls([p], **row, flat=flat)
        with pytest.raises(ValueError):
            algo.cls([np.zeros(3, np.float32)], **row)
        return
    options = draw_options(data, algo, functional=False)
    n = data.draw(st.integers(1, 4), label="params")
    shapes = [data.draw(st.sampled_from(SHAPES), label="shape") for _ in range(n)]
    dtypes = [data.draw(st.sampled_from([F32, F64]), label="dtype") for _ in range(n)]
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1), label="seed"))
    arrays = [np.asarray(rng.standard_normal(s), dtype=d) for s, d in zip(shapes, dtypes)]
    two = n >= 2 and data.draw(st.booleans(), label="two groups")
    lr2 = data.draw(VALID["lr"], label="lr of group 2") if two else None
    note(f"{name}({options}, flat={flat}), shapes {shapes}, dtypes {dtypes}, lr2 {lr2}")
    # torch.optim, and so fusedopt.torch, keeps per-param scalars other than the step
    # count (NAdam's mu_product, ASGD's eta and mu) in float32 unless the default dtype
    # is float64; the NumPy classes keep them in double
    if any(name != "step" for name in algo.spec.scalars):
        before = torch.get_default_dtype()
        torch.set_default_dtype(torch.float64)
        try:
            _torch_run(data, algo, tcls, options, flat, shapes, dtypes, arrays, two, lr2, rng)
        finally:
            torch.set_default_dtype(before)
    else:
        _torch_run(data, algo, tcls, options, flat, shapes, dtypes, arrays, two, lr2, rng)


def _torch_run(data, algo, tcls, options, flat, shapes, dtypes, arrays, two, lr2, rng):
    """Steps of fusedopt.torch's `tcls` and of the NumPy class side by side."""
    def groups(ps):
        return [{"params": ps[:1]}, {"params": ps[1:], "lr": lr2}] if two else ps

    tparams = [torch.nn.Parameter(torch.from_numpy(a.copy())) for a in arrays]
    nparams = [a.copy() for a in arrays]
    topt = tcls(groups(tparams), **options, flat=flat)
    nopt = Case(algo, options).make(groups(nparams))
    if algo.spec.mode_state is not None:  # schedule-free: steps in train mode
        topt.train()
    for t in range(data.draw(st.integers(1, 3), label="steps")):
        if data.draw(st.booleans(), label="zero_grad"):
            topt.zero_grad(set_to_none=data.draw(st.booleans(), label="set_to_none"))
        grads = [None if data.draw(st.integers(0, 5), label="no grad") == 0 else
                 random_grad(data, rng, s, d, "grad") for s, d in zip(shapes, dtypes)]
        for j, (p, g) in enumerate(zip(tparams, grads)):
            if g is None:
                p.grad = None
            else:
                _torch_grad(data, p, g, f"grads[{j}]")
        topt.step()
        nopt.step(grads)
        for j, (tp, np_) in enumerate(zip(tparams, nparams)):
            assert_same_values(tp.detach().numpy(), np_, f"step {t}: params[{j}]")
            mine, theirs = topt.state.get(tp, {}), nopt.state.get(j, {})
            for key, v in theirs.items():
                w = mine[key]
                if isinstance(v, np.ndarray) and v.shape == np_.shape:
                    assert_same_values(w.detach().numpy(), v, f"step {t}: {key} of params[{j}]")
                else:
                    assert float(w) == float(v), f"step {t}: {key} of params[{j}]"
            assert set(mine) == set(theirs), f"step {t}: state of params[{j}]"


# --- row-sparse gradients (SparseAdam) -----------------------------------------------------

ROW_TAILS = [(), (2,), (1, 3)]  # a param's shape after its first (row) dimension
SPARSE_SPOILS = ["row out of range", "negative row", "float rows", "2-D rows",
                 "values: one row more", "values: other tail", "values: other dtype",
                 "state: other shape", "state: other dtype", "fewer values", "values not an array",
                 "rows not an array"]


@given(st.data())
def test_functional_sparse_adam(data):
    """`sparse_adam_` on random rows with repeats, NaN among the values: the float64
    reference (`fusedopt.reference.sparse_adam`) element by element, the untouched rows
    (and their moments) bit for bit, the rows and values unchanged; or one spoiled
    argument, refused with ValueError or TypeError and every array unchanged. The values
    are multiples of 2**-10 below 8 in magnitude, so float32 sums the repeats exactly, as
    the float64 reference does: the tolerance is that of the elementwise update."""
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1), label="seed"))
    n = data.draw(st.integers(1, 3), label="tensors")
    dtype = data.draw(st.sampled_from([F32, F64]), label="dtype")
    shapes = [(data.draw(st.integers(1, 6), label="rows"),
               *data.draw(st.sampled_from(ROW_TAILS), label="tail")) for _ in range(n)]
    params = [np.asarray(rng.standard_normal(s), dtype=dtype) for s in shapes]
    m = [np.asarray(0.5 * rng.standard_normal(s), dtype=dtype) for s in shapes]
    v = [np.asarray(rng.uniform(0.05, 1.0, s), dtype=dtype) for s in shapes]
    rows, values = [], []
    for s in shapes:
        count = data.draw(st.integers(0, 8), label="count")
        rows.append(rng.integers(0, s[0], count).astype(
            data.draw(st.sampled_from([np.int64, np.int32, np.uint8]), label="row dtype")))
        vals = np.round(rng.uniform(-8, 8, (count, *s[1:])) * 1024) / 1024
        if vals.size and data.draw(st.booleans(), label="NaN"):
            vals.reshape(-1)[rng.integers(0, vals.size)] = np.nan
        values.append(np.asarray(vals, dtype=dtype))
    kw = dict(lr=data.draw(_zero_or(1e-4, 1.0), label="lr"),
              beta1=data.draw(_zero_or(1e-6, 0.999), label="beta1"),
              beta2=data.draw(_zero_or(1e-6, 0.9999), label="beta2"),
              eps=data.draw(_zero_or(1e-10, 1e-2), label="eps"),
              maximize=data.draw(st.booleans(), label="maximize"))
    t = data.draw(st.integers(1, 5), label="step")
    spoiled = data.draw(st.one_of(st.none(), st.sampled_from(SPARSE_SPOILS)), label="spoil")
    k = data.draw(st.integers(0, n - 1), label="spoiled tensor")
    error = ValueError
    if spoiled == "row out of range":
        rows[k] = np.append(rows[k], shapes[k][0])
        values[k] = np.concatenate([values[k], np.ones((1, *shapes[k][1:]), dtype)])
    elif spoiled == "negative row":
        rows[k] = np.append(rows[k], -1)
        values[k] = np.concatenate([values[k], np.ones((1, *shapes[k][1:]), dtype)])
    elif spoiled == "float rows":
        rows[k], error = rows[k].astype(np.float64), TypeError
    elif spoiled == "2-D rows":
        rows[k], error = rows[k][:, None], TypeError
    elif spoiled == "values: one row more":
        values[k] = np.concatenate([values[k], np.ones((1, *shapes[k][1:]), dtype)])
    elif spoiled == "values: other tail":
        values[k] = np.ones((len(rows[k]), *shapes[k][1:], 2), dtype)
    elif spoiled == "values: other dtype":
        values[k], error = values[k].astype(F64 if dtype == F32 else F32), TypeError
    elif spoiled == "state: other shape":
        m[k] = np.zeros((shapes[k][0] + 1, *shapes[k][1:]), dtype)
    elif spoiled == "state: other dtype":
        v[k], error = v[k].astype(F64 if dtype == F32 else F32), TypeError
    elif spoiled == "fewer values":
        values = values[:-1]
    elif spoiled == "values not an array":
        values[k], error = values[k].tolist(), TypeError
    elif spoiled == "rows not an array":
        rows[k], error = rows[k].tolist(), TypeError
    note(f"shapes {shapes}, dtype {dtype}, rows {rows}, {kw}, step {t}, spoiled: {spoiled}")
    before = [[np.array(a, copy=True) for a in x] for x in (params, m, v)]
    snap = snapshot([a for a in params + m + v + rows + values if isinstance(a, np.ndarray)])

    def call():
        return fusedopt.functional.sparse_adam_(params, rows, values, m, v, step=t, **kw)

    if spoiled is not None:
        with pytest.raises(error) as info:
            call()
        assert str(info.value), "an error without a message"
        assert_unchanged(snap, f"after refusing '{spoiled}'")
        return
    inputs = snapshot(rows + values)
    assert call() is None
    assert_unchanged(inputs, "the rows and values of a step")
    with np.errstate(all="ignore"):
        ref = fusedopt.reference.sparse_adam(*[[f64(a) for a in x] for x in before[:1]], rows,
                                             values, *[[f64(a) for a in x] for x in before[1:]],
                                             step=t, **kw)
        bias = kw["lr"] * math.sqrt(1.0 - kw["beta2"] ** t) / (1.0 - kw["beta1"] ** t)
        for j in range(n):
            g = np.zeros(shapes[j])
            np.add.at(g, rows[j].astype(np.int64), np.abs(f64(values[j])))
            p0, m0, v0 = (f64(x[j]) for x in before)
            rp, rm, rv = (r[j] for r in ref)
            # the update's rounding: its own size, and the first moment's (|m0| + |g|)
            # over the denominator, to which a cancelling moment leaves no size of its own
            pscale = mag(p0) + mag(rp - p0) + bias * (mag(m0) + g) / (np.sqrt(mag(rv)) +
                                                                    kw["eps"])
            what = f"tensor {j} {dtype} {shapes[j]}"
            assert_close(params[j], rp, dtype, dtype, pscale, f"{what} param")
            assert_close(m[j], rm, dtype, dtype, mag(m0) + g, f"{what} exp_avg")
            assert_close(v[j], rv, dtype, dtype, mag(v0) + g * g, f"{what} exp_avg_sq")
            untouched = np.setdiff1d(np.arange(shapes[j][0]), rows[j])
            for new, old, name in zip((params[j], m[j], v[j]), (p0, m0, v0),
                                      ("param", "exp_avg", "exp_avg_sq")):
                assert new[untouched].tobytes() == np.asarray(old[untouched], dtype).tobytes(), \
                    f"{what}: untouched rows of {name} changed"


# --- the EMA of the params (ema_decay) -----------------------------------------------------

EMA_CLASSES = {  # name -> (make(params, **kw), param shapes it takes)
    "Adam": (lambda ps, **kw: fusedopt.Adam(ps, lr=0.01, **kw), SHAPES),
    "SGD": (lambda ps, **kw: fusedopt.SGD(ps, lr=0.05, momentum=0.9, **kw), SHAPES),
    "Adafactor": (lambda ps, **kw: fusedopt.Adafactor(ps, lr=0.05, **kw),
                  [(), (1,), (5,), (3, 4), (2, 1, 3)]),
}


def _lerp64(a, b, w):
    """torch.lerp's formula in float64 (a + w (b - a), or b - (b - a)(1 - w))."""
    return a + w * (b - a) if abs(w) < 0.5 else b - (b - a) * (1.0 - w)


@given(st.data())
def test_ema_decay(data):
    """A class with ``ema_decay`` in [0, 1] takes the steps of the class without it (bit
    for bit: the same params and state) and its averages follow the reference EMA
    (AveragedModel's: the first step copies, later steps move every average, of params
    without a gradient in that step too) within the storage's half unit and the math's
    rounding; a decay outside [0, 1] (or NaN, inf, a bool) is refused with ValueError
    and changes no param."""
    name = data.draw(st.sampled_from(sorted(EMA_CLASSES)), label="class")
    make, domain = EMA_CLASSES[name]
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1), label="seed"))
    n = data.draw(st.integers(1, 3), label="tensors")
    shapes = [data.draw(st.sampled_from(domain), label="shape") for _ in range(n)]
    dtype = data.draw(st.sampled_from([F32, F64, BF16]), label="dtype")
    decay = data.draw(st.one_of(st.floats(0.0, 1.0), st.sampled_from([0.0, 1.0, 0.5]),
                                st.floats(-5.0, -1e-9), st.floats(1.0 + 1e-9, 5.0),
                                st.sampled_from([math.nan, math.inf, -math.inf, True])),
                      label="decay")
    params = [np.asarray(rng.standard_normal(s), dtype=dtype) for s in shapes]
    plain = [p.copy() for p in params]
    note(f"{name}, shapes {shapes}, {dtype}, decay {decay!r}")
    valid = not isinstance(decay, bool) and 0.0 <= decay <= 1.0
    if not valid:
        snap = snapshot(params)
        with pytest.raises(ValueError, match="Invalid decay value"):
            make(params, ema_decay=decay)
        assert_unchanged(snap, "params after a refused ema_decay")
        return
    opt, ref = make(params, ema_decay=decay), make(plain)
    averages = None
    for step in range(data.draw(st.integers(1, 3), label="steps")):
        grads = [None if data.draw(st.integers(0, 4), label="no grad") == 0 else
                 np.asarray(rng.standard_normal(s), dtype=dtype) for s in shapes]
        opt.step(grads)
        ref.step(grads)
        if averages is None:  # the first update copies every param
            averages = [np.array(p, dtype=F64) for p in plain]
        else:
            averages = [np.asarray(_lerp64(a, f64(p), 1.0 - decay), dtype=dtype)
                        for a, p in zip(averages, plain)]
        for i in range(n):
            assert_same_bits(params[i], plain[i], f"{name} param {i} at step {step}")
            state = opt.state.get(i)
            ema = state["ema"] if state else params[i]  # no state yet: its own average
            assert ema.dtype == dtype
            assert_close(ema, averages[i], dtype, dtype if dtype == F64 else F32,
                         mag(averages[i]) + mag(plain[i]), f"{name} ema {i} at step {step}")
            averages[i] = np.array(ema, dtype=F64)  # the next step starts from the stored one
        for i, st_ in ref.state.items():
            for key, value in st_.items():
                if isinstance(value, np.ndarray):
                    assert_same_bits(opt.state[i][key], value, f"{name} {key} of param {i}")


@given(st.data())
def test_functional_ema_keywords(data):
    """``ema=`` / ``ema_decay=`` of the functional ops (algorithms of the case table):
    with a decay in [0, 1] the params and state are those of the op without them, bit
    for bit, and each average is the float64 lerp of its old value toward the new param
    by 1 - decay, within the storage's half unit and the math's rounding; a decay
    outside [0, 1], or averages without a decay, raise ValueError and change no array."""
    from cases import random_states as case_states
    algo = data.draw(st.sampled_from(list(ALGORITHMS.values())), label="algorithm")
    case = Case(algo, draw_options(data, algo, functional=True))
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1), label="seed"))
    n = data.draw(st.integers(1, 3), label="tensors")
    shapes = [data.draw(st.sampled_from(SHAPES), label="shape") for _ in range(n)]
    dtype = data.draw(st.sampled_from([F32, F64]), label="dtype")
    params = [np.asarray(rng.standard_normal(s), dtype=dtype) for s in shapes]
    grads = [np.asarray(rng.standard_normal(s), dtype=dtype) for s in shapes]
    emas = [np.asarray(rng.standard_normal(s), dtype=dtype) for s in shapes]
    states = case_states(case, params, rng)
    plain_p = [p.copy() for p in params]
    plain_s = {k: [a.copy() for a in v] for k, v in states.items()}
    decay = data.draw(st.one_of(st.floats(0.0, 1.0), st.floats(-5.0, -1e-9),
                                st.floats(1.0 + 1e-9, 5.0), st.none(),
                                st.sampled_from([math.nan, math.inf])), label="decay")
    t = data.draw(st.integers(1, 5), label="step")
    note(f"{case}, shapes {shapes}, {dtype}, decay {decay!r}, step {t}")
    args = case._state_args(states)
    kw = dict(case.op_kwargs(t), ema=emas)
    if decay is not None:
        kw["ema_decay"] = decay
    if decay is None or not 0.0 <= decay <= 1.0:
        snap = snapshot(params + grads + emas + [a for v in states.values() for a in v])
        with pytest.raises(ValueError, match="ema needs ema_decay|Invalid decay value"):
            case.algo.op(params, grads, *args, **kw)
        assert_unchanged(snap, f"after refusing ema_decay={decay!r}")
        return
    before = [np.array(e, dtype=F64) for e in emas]  # (a copy, also of float64 ones)
    with np.errstate(all="ignore"):
        case.algo.op(params, grads, *args, **kw)
        case.run_op(plain_p, grads, plain_s, t)
    for i in range(n):
        assert_same_bits(params[i], plain_p[i], f"{case} param {i}")
        for name in states:
            assert_same_bits(states[name][i], plain_s[name][i], f"{case} {name} {i}")
        with np.errstate(all="ignore"):
            want = _lerp64(before[i], f64(plain_p[i]), 1.0 - decay)
        assert_close(emas[i], want, dtype, dtype, mag(before[i]) + mag(plain_p[i]),
                     f"{case} ema {i}")
