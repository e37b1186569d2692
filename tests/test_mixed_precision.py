"""16-bit parameters against the float64 reference: every storage layout (float16 and
bfloat16 params; float32 or bfloat16 states; no extra buffer, float32 master weights or
Kahan compensation buffers), for every algorithm of the case table, functional ops and
optimizer classes; compensated summation over many small steps; and the bad inputs of
the mixed-precision options.

Tolerances follow from the formats. The math of a 16-bit param runs in float32, whose
unit roundoff is u = 2^-24; a chain of k float32 operations is off by at most about
k·u times the largest magnitude it handles. Writing a float32 value back to a 16-bit
format rounds it to nearest even, an error of at most half a unit in the last place:
2^-11·|x| for float16 (10 stored mantissa bits) and 2^-8·|x| for bfloat16 (7 bits), or
half the subnormal spacing (2^-25 for float16) near zero. So after one step

    |param - reference| <= half_ulp16(reference) + C·u·(|p_old| + |update|)

where C = 32 covers the few dozen float32 operations of the longest rule with room to
spare. A float32 state only carries the float32 error; a bfloat16 state adds its own
rounding, 2^-8 relative. The rounded states feed the next step, so each step is
compared with the reference computed from the fused inputs of that step (upcast to
float64), and errors cannot compound. With master weights the master copy is updated
in float32 (float32 tolerance) and the param is the master rounded to nearest even,
bit for bit.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest

import fusedopt
from cases import CASES, FULL_CASES, assert_same_bits, case, data_ptr, random_states

F16 = np.dtype(np.float16)
BF16 = np.dtype(ml_dtypes.bfloat16)
F32 = np.dtype(np.float32)
F64 = np.dtype(np.float64)

U32 = 2.0 ** -24  # unit roundoff of float32, the math type of 16-bit params
C = 32  # float32 operations of one element's update, with room to spare
MANTISSA = {F16: 10, BF16: 7}
HALF_SUBNORMAL = {F16: 2.0 ** -25, BF16: 2.0 ** -134}

SHAPES = [(1,), (7,), (4, 33), (513,), ()]
STEPS = 3
# The step counts of the functional ops' steps (each checked on its own inputs): the
# last one a later step, so that rules whose math changes with t (RAdam's
# rectification, from t = 6) run both ways.
STEP_COUNTS = (1, 2, 7)
EXTRAS = ["none", "master", "kahan"]


def half_ulp(x, dtype):
    """Largest error of rounding a value of magnitude |x| to nearest in a 16-bit format:
    half its spacing there, 2^-(m+1)·|x| for m stored mantissa bits (an upper bound
    over the binade), never below half the smallest subnormal."""
    if dtype not in MANTISSA:  # float32 or float64 storage: no 16-bit rounding
        return np.zeros_like(np.asarray(x, dtype=F64))
    return np.maximum(np.abs(x) * 2.0 ** -(MANTISSA[dtype] + 1), HALF_SUBNORMAL[dtype])


def math_error(*magnitudes):
    """Bound on the float32 math error of an update whose terms are at most these."""
    return C * U32 * sum(np.abs(np.asarray(m, dtype=F64)) for m in magnitudes)


def f64(arrays):
    return [np.asarray(a, dtype=F64) for a in arrays]


def assert_within(actual, expected, tol, what):
    actual, expected = np.asarray(actual, dtype=F64), np.asarray(expected, dtype=F64)
    err = np.abs(actual - expected)
    bad = ~(err <= tol)
    if bad.any():
        i = int(np.flatnonzero(bad.ravel())[0])
        raise AssertionError(
            f"{what}: {int(bad.sum())} of {bad.size} elements off; first at flat index {i}: "
            f"{actual.ravel()[i]!r} vs reference {expected.ravel()[i]!r}, error "
            f"{err.ravel()[i]:.3g} > tolerance {np.broadcast_to(tol, err.shape).ravel()[i]:.3g}")


def random_step_inputs(case_, dtype, state_dtype, rng, shapes=SHAPES):
    """16-bit params and grads, and valid states in `state_dtype` (none overflowing)."""
    params64 = [rng.standard_normal(s) for s in shapes]
    params = [np.asarray(p, dtype=dtype) for p in params64]
    states = {name: [np.asarray(b, dtype=state_dtype) for b in bufs]
              for name, bufs in random_states(case_, params64, rng).items()}
    return params, states


def random_grads(params, rng):
    return [np.asarray(rng.standard_normal(p.shape), dtype=p.dtype) for p in params]


def state_args(case_, states):
    return [states[s] if s in case_.state_names else None for _, s in case_.algo.slots]


def check_step(case_, dtype, state_dtype, extra, before, grads, after, t, what):
    """Compare one fused step of one list of params with the float64 reference computed
    from the same inputs. `before` and `after` are dicts with "params", "states"
    ({name: list}) and, per layout, "master" or "kahan" lists."""
    p_old = f64(before["params"])
    start = f64(before["master"]) if extra == "master" else p_old
    states_old = {k: f64(v) for k, v in before["states"].items()}
    ref_p, ref_s = case_.run_reference(start, f64(grads), states_old, t)
    for i, (p_new, r) in enumerate(zip(after["params"], ref_p)):
        where = f"{what} param {i}"
        update = r - start[i]
        if extra == "master":
            master = after["master"][i]
            assert master.dtype == F32
            assert_within(master, r, math_error(start[i], update), where + " master")
            assert_same_bits(p_new, master.astype(dtype), where + " = master rounded")
        elif extra == "kahan":
            c_old = f64(before["kahan"])[i]
            c_new = np.asarray(after["kahan"][i], dtype=F64)
            err = math_error(start[i], update, c_old)
            # the param is the exact update plus the carried compensation, rounded ...
            assert_within(p_new, r + c_old, half_ulp(r + c_old, dtype) + err, where)
            # ... and the new compensation holds what that rounding dropped (itself
            # rounded to 16 bits), so param + compensation follows the exact update
            assert_within(np.asarray(p_new, dtype=F64) + c_new, r + c_old,
                          half_ulp(c_new, dtype) + err, where + " + compensation")
            assert_within(c_new, 0.0, half_ulp(p_new, dtype) * (1 + 2.0 ** -7) + err,
                          where + " compensation size")
        else:
            assert_within(p_new, r, half_ulp(r, dtype) + math_error(start[i], update), where)
    for name, refs in ref_s.items():
        for i, (s_new, r) in enumerate(zip(after["states"][name], refs)):
            s_old = states_old[name][i]
            tol = half_ulp(r, state_dtype) + math_error(s_old, r, grads[i], start[i])
            assert_within(s_new, r, tol, f"{what} {name} {i}")


def copies(d):
    return {k: ([a.copy() for a in v] if isinstance(v, list) else
                {n: [a.copy() for a in lst] for n, lst in v.items()}) for k, v in d.items()}


# --- functional ops -----------------------------------------------------------------------


@pytest.mark.parametrize("extra", EXTRAS)
@pytest.mark.parametrize("state_dtype", [F32, BF16], ids=["f32-states", "bf16-states"])
@pytest.mark.parametrize("dtype", [F16, BF16], ids=["f16", "bf16"])
@pytest.mark.parametrize("case_", CASES, ids=str)
def test_functional_matches_reference(case_, dtype, state_dtype, extra, rng):
    params, states = random_step_inputs(case_, dtype, state_dtype, rng)
    live = {"params": params, "states": states}
    kwargs = {}
    if extra == "master":
        # a master copy that the 16-bit params do not represent exactly
        live["master"] = [np.array(np.asarray(p, dtype=F32) + np.float32(1e-3) * np.asarray(
            rng.standard_normal(p.shape), dtype=F32)) for p in params]
        kwargs["master_params"] = live["master"]
    elif extra == "kahan":
        live["kahan"] = [np.zeros_like(p) for p in params]
        kwargs["kahan_buffers"] = live["kahan"]
    ptrs = [data_ptr(a) for a in params]
    for t in STEP_COUNTS:
        grads = random_grads(params, rng)
        before = copies(live)
        out = case_.algo.op(params, grads, *state_args(case_, states), **case_.op_kwargs(t),
                            **kwargs)
        assert out is None
        check_step(case_, dtype, state_dtype, extra, before, grads, live, t, f"step {t}")
    assert [data_ptr(a) for a in params] == ptrs
    assert all(p.dtype == dtype for p in params)
    assert all(s.dtype == state_dtype for lst in states.values() for s in lst)


def test_one_call_mixes_param_dtypes(rng):
    """float16, bfloat16, float32 and float64 params in one call: each against its own
    reference, in its own precision."""
    case_ = case("adam", lr=0.01, amsgrad=True)
    dtypes = [F16, BF16, F32, F64, BF16, F16]
    params = [np.asarray(rng.standard_normal(50 + k), dtype=d) for k, d in enumerate(dtypes)]
    states64 = random_states(case_, f64(params), rng)
    states = {n: [np.asarray(b, dtype=F32 if p.dtype in MANTISSA else p.dtype)
                  for b, p in zip(bufs, params)] for n, bufs in states64.items()}
    grads = random_grads(params, rng)
    before = copies({"params": params, "states": states})
    case_.algo.op(params, grads, *state_args(case_, states), **case_.op_kwargs(1))
    ref_p, ref_s = case_.run_reference(f64(before["params"]), f64(grads),
                                       {k: f64(v) for k, v in before["states"].items()}, 1)
    for i, (p, d) in enumerate(zip(params, dtypes)):
        if d in MANTISSA:
            tol = half_ulp(ref_p[i], d) + math_error(before["params"][i], ref_p[i])
        else:
            unit = U32 if d == F32 else 2.0 ** -53
            tol = C * unit * (np.abs(ref_p[i]) + 1)
        assert_within(p, ref_p[i], tol, f"param {i} ({d})")
        assert p.dtype == d
        for name in ref_s:
            assert states[name][i].dtype == (F32 if d in MANTISSA else d)


# --- optimizer classes ---------------------------------------------------------------------

CLASS_CASES = FULL_CASES + [case("sgd", lr=0.05), case("rmsprop", centered=True),
                            case("rmsprop", momentum=0.9)]


def class_precision(state_dtype, extra):
    return fusedopt.Precision(state_dtype=state_dtype, master_weights=extra == "master",
                              kahan=extra == "kahan")


def run_class_steps(case_, params, precision, rng, steps=STEPS):
    """Step an optimizer over `params` and check every step of every param against the
    reference from the state the optimizer held before it."""
    opt = case_.make(params, precision=precision)
    for t in range(1, steps + 1):
        grads = random_grads(params, rng)
        before = [(p.copy(), class_state_before(opt, case_, i, p)) for i, p in enumerate(params)]
        assert opt.step(grads) is None
        for i, (p, (p_old, old)) in enumerate(zip(params, before)):
            st = opt.state[i]
            sixteen = p.dtype in MANTISSA
            xname = precision.extra_name(p.dtype)
            layout = {"master_param": "master", "kahan_comp": "kahan"}.get(xname, "none")
            state_dtype = precision.state_dtype_for(p.dtype)
            if case_.algo.has_step:
                assert st["step"] == float(t)
            assert set(st) - set(case_.algo.scalars) == \
                set(case_.state_names) | ({xname} if xname else set())
            for n in case_.state_names:
                assert st[n].dtype == (state_dtype if sixteen else p.dtype)
            if xname:
                assert st[xname].dtype == (F32 if layout == "master" else p.dtype)

            def view(s, prm):
                out = {"params": [prm], "states": {n: [s[n]] for n in case_.state_names}}
                if xname:
                    out[layout] = [s[xname]]
                return out

            check_step(case_, p.dtype, state_dtype, layout, view(old, p_old), [grads[i]],
                       view(st, p), t, f"step {t} param {i}")
    return opt


@pytest.mark.parametrize("extra", EXTRAS)
@pytest.mark.parametrize("state_dtype", [F32, BF16], ids=["f32-states", "bf16-states"])
@pytest.mark.parametrize("dtype", [F16, BF16], ids=["f16", "bf16"])
@pytest.mark.parametrize("case_", CLASS_CASES, ids=str)
def test_class_matches_reference(case_, dtype, state_dtype, extra, rng):
    """The classes under a Precision policy: state created in the policy's dtypes, and
    every step against the reference from the state the optimizer held."""
    params = [np.asarray(rng.standard_normal(s), dtype=dtype) for s in [(9,), (3, 70), ()]]
    run_class_steps(case_, params, class_precision(state_dtype, extra), rng)


@pytest.mark.parametrize("float32_first", [False, True], ids=["16bit-first", "f32-first"])
@pytest.mark.parametrize("extra", EXTRAS)
def test_class_group_mixing_16bit_and_float32_params(extra, float32_first, rng):
    """One param group holding float32 and 16-bit params (float32 norms next to 16-bit
    weights, say): the policy applies to the 16-bit params only; the float32 param keeps
    float32 state and no extra buffer, and every param follows its reference."""
    case_ = case("sgd", lr=0.05, momentum=0.9)
    params = [np.asarray(rng.standard_normal(30), dtype=F16),
              np.asarray(rng.standard_normal(20), dtype=BF16)]
    p32 = np.asarray(rng.standard_normal(40), dtype=F32)
    params = [p32] + params if float32_first else params + [p32]
    run_class_steps(case_, params, class_precision(BF16, extra), rng)


def class_state_before(opt, case_, i, p):
    """A copy of param i's state before a step, or the state the step will create:
    zeros (Adagrad's initial value) in the policy's dtype, the master a float32 copy of
    the param, the compensation zeros."""
    st = opt.state.get(i)
    if st is not None:
        return {k: (v.copy() if isinstance(v, np.ndarray) else v) for k, v in st.items()}
    # made in the state's dtype (an initial value such as Rprop's lr rounds there; a
    # buffer like its param, schedule-free's z, is the param's value rounded there)
    dtype = opt.precision.state_dtype_for(p.dtype)
    st = {n: (case_.initial_state(p, n).astype(dtype)
              if case_.algo.spec.state(n).like_param else
              case_.initial_state(np.zeros(p.shape, dtype), n))
          for n in case_.state_names}
    xname = opt.precision.extra_name(p.dtype)
    if xname == "master_param":
        st[xname] = p.astype(F32)
    elif xname == "kahan_comp":
        st[xname] = np.zeros_like(p)
    return st
# --- compensated summation -------------------------------------------------------------------


@pytest.mark.parametrize("dtype,min_gain", [(BF16, 100.0), (F16, 1000.0)], ids=["bf16", "f16"])
def test_kahan_tracks_float64_trajectory_over_many_tiny_steps(dtype, min_gain, rng):
    """500 SGD steps whose updates (about 3e-5) lie far below half an ulp of the params
    (2^-10 to 2^-8 for bfloat16, 2^-13 to 2^-11 for float16, for |p| in [0.25, 2)).
    Rounding each step to nearest loses almost all of the movement; with Kahan buffers
    the param plus its compensation follows the float64 trajectory. Measured rms errors
    (the params move by 1.5e-2 rms): bfloat16 plain 1.5e-2, Kahan 6.1e-5, about 250
    times smaller; float16 plain 1.5e-2, Kahan 1.3e-6, about 10^4 times smaller; float32
    master weights reach about 6e-7 for both. The compensation is stored in the param's
    format, so its own rounding limits bfloat16 more."""
    n, steps, lr = 4096, 500, 1e-4
    start = np.asarray(rng.uniform(0.25, 2.0, n) * rng.choice([-1.0, 1.0], n), dtype=dtype)
    plain, comp = start.copy(), start.copy()
    opt_plain = fusedopt.SGD([plain], lr=lr)
    opt_kahan = fusedopt.SGD([comp], lr=lr, precision=fusedopt.Precision(kahan=True))
    exact = start.astype(F64)
    for _ in range(steps):
        g = np.asarray(0.3 + 0.5 * rng.standard_normal(n), dtype=dtype)
        opt_plain.step([g])
        opt_kahan.step([g])
        exact -= lr * g.astype(F64)
    c = opt_kahan.state[0]["kahan_comp"]
    assert c.dtype == dtype

    def rms(x):
        return float(np.sqrt(np.mean(np.square(x))))

    moved = rms(exact - start.astype(F64))
    err_plain = rms(plain.astype(F64) - exact)
    err_kahan = rms(comp.astype(F64) + c.astype(F64) - exact)
    assert err_plain > 0.5 * moved  # round to nearest keeps less than half the movement
    assert err_kahan * min_gain < err_plain, (err_kahan, err_plain)
    # the compensation holds only what rounding the param dropped: under half an ulp
    # (its own rounding to 16 bits may add 2^-(m+1) of that)
    assert_within(c, 0.0, half_ulp(comp, dtype) * (1 + 2.0 ** -7), "compensation")


# --- bad input -------------------------------------------------------------------------------


def _adam_arrays(dtype, state_dtype, n=2):
    rng = np.random.default_rng(5)
    params = [np.asarray(rng.standard_normal(5 + k), dtype=dtype) for k in range(n)]
    grads = [np.asarray(rng.standard_normal(p.shape), dtype=dtype) for p in params]
    m = [np.zeros(p.shape, dtype=state_dtype) for p in params]
    v = [np.full(p.shape, 0.5, dtype=state_dtype) for p in params]
    return params, grads, m, v


ADAM = dict(step=1, lr=0.01, beta1=0.9, beta2=0.999, eps=1e-8)

BAD_FUNCTIONAL = {
    "master with float32 params": (
        F32, F32, lambda p: dict(master_params=[np.zeros(x.shape, F32) for x in p]),
        TypeError, "master_params are for float16 and bfloat16 params"),
    "master with float64 params": (
        F64, F64, lambda p: dict(master_params=[np.zeros(x.shape, F32) for x in p]),
        TypeError, "float16 and bfloat16"),
    "kahan with float32 params": (
        F32, F32, lambda p: dict(kahan_buffers=[np.zeros_like(x) for x in p]),
        TypeError, "float16 and bfloat16"),
    "float16 states of float16 params": (
        F16, F16, lambda p: {}, TypeError, "float32 or bfloat16"),
    "float16 states of bfloat16 params": (
        BF16, F16, lambda p: {}, TypeError, "float32 or bfloat16"),
    "float64 states of float16 params": (
        F16, F64, lambda p: {}, TypeError, "float32 or bfloat16"),
    "float16 master weights": (
        F16, F32, lambda p: dict(master_params=[np.zeros(x.shape, F16) for x in p]),
        TypeError, "master weights are float32"),
    "bfloat16 master weights": (
        BF16, F32, lambda p: dict(master_params=[np.zeros(x.shape, BF16) for x in p]),
        TypeError, "master weights are float32"),
    "float32 Kahan buffers of float16 params": (
        F16, F32, lambda p: dict(kahan_buffers=[np.zeros(x.shape, F32) for x in p]),
        TypeError, "kahan_buffers"),
    "master of the wrong shape": (
        BF16, F32, lambda p: dict(master_params=[np.zeros(x.size + 1, F32) for x in p]),
        ValueError, "shape"),
    "too few master weights": (
        F16, F32, lambda p: dict(master_params=[np.zeros(p[0].shape, F32)]),
        ValueError, "master_params"),
    "master and Kahan together": (
        F16, F32, lambda p: dict(master_params=[np.zeros(x.shape, F32) for x in p],
                                 kahan_buffers=[np.zeros_like(x) for x in p]),
        ValueError, "alternatives"),
    "loss_scale 0": (F16, F32, lambda p: dict(loss_scale=0.0), ValueError, "loss_scale"),
    "negative loss_scale": (BF16, F32, lambda p: dict(loss_scale=-2.0), ValueError, "loss_scale"),
    "NaN loss_scale": (F32, F32, lambda p: dict(loss_scale=float("nan")), ValueError,
                       "loss_scale"),
    "infinite loss_scale": (F16, F32, lambda p: dict(loss_scale=float("inf")), ValueError,
                            "loss_scale"),
    "max_grad_norm 0": (F16, F32, lambda p: dict(max_grad_norm=0.0), ValueError,
                        "max_grad_norm"),
    "negative max_grad_norm": (F32, F32, lambda p: dict(max_grad_norm=-1.0), ValueError,
                               "max_grad_norm"),
    "unknown option": (F16, F32, lambda p: dict(master_weights=True), TypeError,
                       "unexpected keyword"),
}


@pytest.mark.parametrize("name", list(BAD_FUNCTIONAL))
def test_bad_functional_input_changes_nothing(name, snapshot):
    dtype, state_dtype, options, exc, match = BAD_FUNCTIONAL[name]
    params, grads, m, v = _adam_arrays(dtype, state_dtype)
    extra = options(params)
    snap = snapshot(params, grads, m, v, extra)
    with pytest.raises(exc, match=match):
        fusedopt.functional.adam_(params, grads, m, v, **ADAM, **extra)
    snap.assert_unchanged()


def test_mixed_state_dtypes_in_one_call_refused(snapshot):
    """The states of one call share one dtype: float32 exp_avgs with bfloat16
    exp_avg_sqs is refused, not cast."""
    params, grads, m, _ = _adam_arrays(BF16, F32)
    v = [np.full(p.shape, 0.5, dtype=BF16) for p in params]
    snap = snapshot(params, grads, m, v)
    with pytest.raises(TypeError, match="exp_avg_sqs"):
        fusedopt.functional.adam_(params, grads, m, v, **ADAM)
    snap.assert_unchanged()


@pytest.mark.parametrize("kwargs,match", [
    (dict(master_weights=True, kahan=True), "alternatives"),
    (dict(state_dtype=np.float16), "float32 or bfloat16"),
    (dict(state_dtype=np.float64), "float32 or bfloat16"),
])
def test_bad_precision_policy(kwargs, match):
    with pytest.raises(ValueError, match=match):
        fusedopt.Precision(**kwargs)


@pytest.mark.parametrize("kwargs,match", [
    (dict(loss_scale=0.0), "loss_scale"),
    (dict(loss_scale=-1.0), "loss_scale"),
    (dict(loss_scale=float("inf")), "loss_scale"),
    (dict(max_grad_norm=0.0), "max_grad_norm"),
])
@pytest.mark.parametrize("extra", EXTRAS)
def test_bad_step_options_change_nothing(extra, kwargs, match, snapshot, rng):
    """A refused step of a class creates no state, counts no step and writes nothing,
    also after earlier steps have created state."""
    params = [np.asarray(rng.standard_normal(s), dtype=d)
              for s, d in [((6,), F16), ((3, 4), BF16)]]
    opt = fusedopt.Adam(params, lr=0.01, precision=class_precision(BF16, extra))
    grads = random_grads(params, rng)
    with pytest.raises(ValueError, match=match):
        opt.step(grads, **kwargs)
    assert opt.state == {} and opt.steps_taken == 0
    opt.step(grads)
    snap = snapshot(params, opt.state)
    steps = [s["step"] for s in opt.state.values()]
    with pytest.raises(ValueError, match=match):
        opt.step(grads, **kwargs)
    snap.assert_unchanged()
    assert [s["step"] for s in opt.state.values()] == steps and opt.steps_taken == 1


@pytest.mark.parametrize("extra", ["master", "kahan"])
def test_precision_state_dict_round_trip(extra, rng):
    """The master copy and the compensation are state: saved, loaded, and the run goes
    on bit for bit as if never interrupted; a master of another dtype is refused."""
    make = lambda ps: fusedopt.AdamW(ps, lr=0.01, precision=class_precision(F32, extra))
    params = [np.asarray(rng.standard_normal(s), dtype=BF16) for s in [(8,), (2, 5)]]
    grads = [random_grads(params, rng) for _ in range(4)]
    opt = make(params)
    for g in grads[:2]:
        opt.step(g)
    saved, saved_params = opt.state_dict(), [p.copy() for p in params]
    for g in grads[2:]:
        opt.step(g)
    copies_ = [p.copy() for p in saved_params]
    other = make(copies_)
    other.load_state_dict(saved)
    for g in grads[2:]:
        other.step(g)
    for a, b in zip(copies_, params):
        assert_same_bits(a, b, "param after reload")
    xname = "master_param" if extra == "master" else "kahan_comp"
    for i in range(len(params)):
        assert_same_bits(other.state[i][xname], opt.state[i][xname], xname)
    wrong = other.state_dict()
    wrong["state"][0][xname] = wrong["state"][0][xname].astype(F64)
    before = other.state_dict()
    with pytest.raises(ValueError, match=xname):
        other.load_state_dict(wrong)
    for i in range(len(params)):
        assert_same_bits(other.state[i][xname], before["state"][i][xname], "kept state")
