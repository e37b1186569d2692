"""Loss scaling, the non-finite check and global-norm clipping: the DynamicLossScaler's
schedule (torch's GradScaler rule), steps skipped bit for bit on inf or NaN gradients,
NaN propagation without the check, and clipping against the float64 reference and
torch.nn.utils.clip_grad_norm_.

Loss scales here are powers of two, so scaling and unscaling a gradient is exact (no
16-bit gradient overflows or underflows): a scaled step and an unscaled one give the
same bits. Clipping is compared in float64 with a relative tolerance of 1e-12 (the
norm is a sum of squares in double; the clip coefficient multiplies each gradient once).
"""

from __future__ import annotations

import math

import ml_dtypes
import numpy as np
import pytest

import fusedopt
from cases import FULL_CASES, assert_same_bits, case, in_torch
from fusedopt.amp import DynamicLossScaler

F16 = np.dtype(np.float16)
BF16 = np.dtype(ml_dtypes.bfloat16)
F32 = np.dtype(np.float32)
F64 = np.dtype(np.float64)

# --- the scaler's schedule --------------------------------------------------------------------

# found-inf flags of successive steps, and the (scale, growth tracker) after each update,
# for init_scale=1024, growth_factor=2, backoff_factor=0.5, growth_interval=3
FOUND_INF = [False, False, True, False, False, False, False, True, True, False, False, False]
EXPECTED = [(1024, 1), (1024, 2), (512, 0), (512, 1), (512, 2), (1024, 0), (1024, 1),
            (512, 0), (256, 0), (256, 1), (256, 2), (512, 0)]


def test_schedule_backs_off_grows_and_resets_the_tracker():
    scaler = DynamicLossScaler(init_scale=1024.0, growth_factor=2.0, backoff_factor=0.5,
                               growth_interval=3)
    assert scaler.get_scale() == 1024.0 and scaler.growth_tracker == 0
    got = []
    for found in FOUND_INF:
        scaler.update(found)
        got.append((scaler.get_scale(), scaler.growth_tracker))
    assert got == EXPECTED


def test_an_overflow_restarts_the_growth_count():
    """growth_interval - 1 good steps, one overflow, then growth needs a full interval."""
    scaler = DynamicLossScaler(init_scale=8.0, growth_interval=4)
    for _ in range(3):
        scaler.update(False)
    scaler.update(True)
    assert (scaler.get_scale(), scaler.growth_tracker) == (4.0, 0)
    for _ in range(3):
        scaler.update(False)
    assert scaler.get_scale() == 4.0
    scaler.update(False)
    assert (scaler.get_scale(), scaler.growth_tracker) == (8.0, 0)


def _torch_scales(torch, found_inf, **settings):
    """Scales of torch.amp.GradScaler("cpu") after each update, driven through its own
    scale / step / update cycle on a tiny model whose gradient is set to inf where asked."""
    p = torch.nn.Parameter(torch.ones(3, dtype=torch.float32))
    opt = torch.optim.SGD([p], lr=0.1)
    scaler = torch.amp.GradScaler("cpu", **settings)
    out = []
    for found in found_inf:
        opt.zero_grad()
        scaler.scale((p * p).sum()).backward()
        if found:
            p.grad[1] = float("inf")
        scaler.step(opt)
        scaler.update()
        out.append(scaler.get_scale())
    return out


SETTINGS = [dict(init_scale=1024.0, growth_factor=2.0, backoff_factor=0.5, growth_interval=3),
            dict(init_scale=2.0**16, growth_factor=4.0, backoff_factor=0.125, growth_interval=1),
            dict(init_scale=96.0, growth_factor=1.5, backoff_factor=0.75, growth_interval=2)]


@pytest.mark.parametrize("settings", SETTINGS, ids=["default-like", "fast", "odd-factors"])
def test_schedule_matches_torch_grad_scaler(settings):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(1)
    found_inf = list(rng.random(40) < 0.3)
    scaler = DynamicLossScaler(**settings)
    ours = []
    for found in found_inf:
        scaler.update(bool(found))
        ours.append(scaler.get_scale())
    theirs = _torch_scales(torch, found_inf, **settings)
    # torch keeps the scale in float32; these factors keep it exact for 40 steps
    np.testing.assert_allclose(ours, theirs, rtol=1e-7)


def test_state_dict_round_trip():
    a = DynamicLossScaler(init_scale=1024.0, growth_interval=3)
    for found in FOUND_INF[:5]:
        a.update(found)
    state = a.state_dict()
    b = DynamicLossScaler(init_scale=1.0, growth_factor=3.0, backoff_factor=0.25,
                          growth_interval=7)
    b.load_state_dict(state)
    assert b.state_dict() == state
    assert (b.get_scale(), b.growth_tracker, b.growth_factor, b.backoff_factor,
            b.growth_interval) == (512.0, 2, 2.0, 0.5, 3)
    for found in FOUND_INF[5:]:
        a.update(found)
        b.update(found)
        assert (a.get_scale(), a.growth_tracker) == (b.get_scale(), b.growth_tracker)
    state["scale"] = 123.0
    assert b.get_scale() != 123.0  # the state dict is a copy, not a view


@pytest.mark.parametrize("kwargs", [
    dict(init_scale=0.0), dict(init_scale=-1.0), dict(init_scale=float("inf")),
    dict(init_scale=float("nan")), dict(growth_factor=1.0), dict(growth_factor=0.5),
    dict(backoff_factor=0.0), dict(backoff_factor=1.0), dict(backoff_factor=1.5),
    dict(growth_interval=0), dict(growth_interval=-3), dict(growth_interval=2.5),
], ids=lambda k: "-".join(f"{a}={b}" for a, b in k.items()))
def test_constructor_validation(kwargs):
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        DynamicLossScaler(**kwargs)


def test_disabled_scaler_scales_by_one():
    scaler = DynamicLossScaler(init_scale=1024.0, enabled=False)
    assert scaler.get_scale() == 1.0 and scaler.scale(3.5) == 3.5
    p = np.ones(4, dtype=F32)
    opt = fusedopt.SGD([p], lr=0.5)
    info = scaler.step(opt, [np.full(4, 2.0, dtype=F32)])
    assert info == (False, 4.0)
    assert (p == 0.0).all() and scaler.scale_value == 1024.0


def test_scaler_drives_a_16bit_optimizer(rng):
    """A float16 model with float32 master weights under the scaler: a step whose scaled
    gradients overflowed is skipped bit for bit and the scale backs off; every other
    step gives the very bits of an optimizer fed the unscaled gradients directly."""
    shapes = [(33,), (4, 9)]
    params = [np.asarray(rng.standard_normal(s), dtype=F16) for s in shapes]
    twin = [p.copy() for p in params]
    precision = fusedopt.Precision(master_weights=True)
    opt = fusedopt.Adam(params, lr=0.01, precision=precision)
    ref = fusedopt.Adam(twin, lr=0.01, precision=precision)
    scaler = DynamicLossScaler(init_scale=2.0**8, growth_interval=2)
    assert scaler.scale(1.5) == 1.5 * 2.0**8
    overflow = [False, True, False, False, False, True, False]
    for step, bad in enumerate(overflow):
        g = [np.asarray(0.1 * rng.standard_normal(s), dtype=F16) for s in shapes]
        scale = scaler.get_scale()
        scaled = [np.asarray(x.astype(F64) * scale, dtype=F16) for x in g]
        if bad:
            scaled[step % 2].flat[3] = np.inf  # what an overflowing backward pass leaves
        before = [p.copy() for p in params]
        info = scaler.step(opt, scaled)
        assert info.skipped == bad
        if bad:
            assert math.isinf(info.grad_norm)
            for a, b in zip(params, before):
                assert_same_bits(a, b, f"step {step}: skipped")
        else:
            norm = math.sqrt(sum(float(np.sum(x.astype(F64) ** 2)) for x in g))
            assert info.grad_norm == pytest.approx(norm, rel=1e-12)
            ref.step(g)
        for a, b in zip(params, twin):
            assert_same_bits(a, b, f"step {step}: param")
        for i in opt.state:
            assert_same_bits(opt.state[i]["master_param"], ref.state[i]["master_param"],
                             f"step {step}: master {i}")
    # 256, back off to 128, grow to 256 after two good steps, back off to 128
    assert scaler.get_scale() == 128.0


def test_scaler_step_passes_clipping_through(rng):
    """scaler.step(opt, grads, max_grad_norm=...) is one checked, clipped step at the
    current scale: the same bits as the optimizer's own step with those options."""
    params = [rng.standard_normal(12)]
    twin = [params[0].copy()]
    scaler = DynamicLossScaler(init_scale=64.0)
    grads = [64.0 * 5.0 * rng.standard_normal(12)]
    info = scaler.step(fusedopt.Adam(params, lr=0.1), grads, max_grad_norm=0.5)
    expect = fusedopt.Adam(twin, lr=0.1).step(grads, loss_scale=64.0, max_grad_norm=0.5,
                                              skip_nonfinite=True)
    assert info == expect and not info.skipped and info.grad_norm > 0.5
    assert_same_bits(params[0], twin[0], "param")
    assert scaler.growth_tracker == 1


# --- skipping steps with inf or NaN gradients ------------------------------------------------

LAYOUTS = ["float32", "16bit", "master", "kahan"]


def _two_groups(case_, layout, rng):
    """Params in two groups (the second with its own lr): float32 ones, or float16 in
    the first group and bfloat16 in the second under the layout's precision policy."""
    if layout == "float32":
        dtypes, precision = (F32, F32), None
    else:
        dtypes = (F16, BF16)
        precision = fusedopt.Precision(state_dtype=BF16 if layout == "16bit" else None,
                                       master_weights=layout == "master",
                                       kahan=layout == "kahan")
    shapes = [[(7,), (3, 5)], [(20,), ()]]
    groups = [[np.asarray(rng.standard_normal(s), dtype=d) for s in ss]
              for ss, d in zip(shapes, dtypes)]
    lr = case_.options["lr"]
    return [{"params": groups[0]}, {"params": groups[1], "lr": lr / 2}], precision


def _make(case_, groups, precision):
    return case_.make([dict(g, params=list(g["params"])) for g in groups], precision=precision)


def _grads(params, rng):
    return [np.asarray(rng.standard_normal(p.shape), dtype=p.dtype) for p in params]


@pytest.mark.parametrize("bad", [np.inf, -np.inf, np.nan], ids=["inf", "-inf", "nan"])
@pytest.mark.parametrize("where", [0, 3], ids=["first-group", "second-group"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("case_", FULL_CASES, ids=str)
def test_skip_nonfinite_changes_nothing(case_, layout, where, bad, rng, snapshot):
    groups, precision = _two_groups(case_, layout, rng)
    params = [p for g in groups for p in g["params"]]
    twin_params = [p.copy() for p in params]
    twin_groups = [{**groups[0], "params": twin_params[:2]},
                   {**groups[1], "params": twin_params[2:]}]
    opt = _make(case_, groups, precision)
    twin = _make(case_, twin_groups, precision)
    initial = {i: dict(s) for i, s in opt.state.items()}  # Adagrad creates its state at once

    # a skipped first step creates no state
    grads = _grads(params, rng)
    grads[where].flat[-1] = bad
    snap = snapshot(params, opt.state)
    info = opt.step(grads, skip_nonfinite=True)
    assert isinstance(info, fusedopt.StepInfo)
    assert info.skipped and not math.isfinite(info.grad_norm)
    snap.assert_unchanged()
    assert opt.state.keys() == initial.keys() and opt.steps_taken == 0
    for i, s in opt.state.items():
        assert s.keys() == initial[i].keys() and s.get("step") == initial[i].get("step")

    for t in range(2):
        good = _grads(params, rng)
        info = opt.step(good, skip_nonfinite=True)
        assert not info.skipped and math.isfinite(info.grad_norm)
        twin.step(good)
        # a skipped step in between: params, every state, step counts stay as they are
        grads = [g.copy() for g in _grads(params, rng)]
        grads[where].flat[0] = bad
        snap = snapshot(params, opt.state)
        steps = {i: s.get("step") for i, s in opt.state.items()}
        keys = {i: set(s) for i, s in opt.state.items()}
        info = opt.step(grads, skip_nonfinite=True)
        assert info.skipped and not math.isfinite(info.grad_norm)
        snap.assert_unchanged()
        assert {i: s.get("step") for i, s in opt.state.items()} == steps
        assert {i: set(s) for i, s in opt.state.items()} == keys
        assert opt.steps_taken == t + 1
    # and the run goes on exactly as one that never saw the skipped steps
    good = _grads(params, rng)
    opt.step(good, skip_nonfinite=True)
    twin.step(good)
    for k, (a, b) in enumerate(zip(params, twin_params)):
        assert_same_bits(a, b, f"param {k}")
    for i in opt.state:
        for name, value in opt.state[i].items():
            if isinstance(value, np.ndarray):
                assert_same_bits(value, twin.state[i][name], f"state {i} {name}")
            else:
                assert value == twin.state[i][name]


@pytest.mark.parametrize("dtype,extra", [(F32, None), (F16, "master"), (BF16, "kahan")])
def test_functional_skip_nonfinite(dtype, extra, rng, snapshot):
    c = case("adam", lr=0.01, amsgrad=True)
    params = [np.asarray(rng.standard_normal(n), dtype=dtype) for n in (10, 1, 300)]
    states = [[np.full(p.shape, 0.1, dtype=F32) for p in params] for _ in range(3)]
    kwargs = {}
    if extra == "master":
        kwargs["master_params"] = [p.astype(F32) for p in params]
    elif extra == "kahan":
        kwargs["kahan_buffers"] = [np.zeros_like(p) for p in params]
    grads = _grads(params, rng)
    clean = [g.copy() for g in grads]
    grads[2][17] = np.nan
    snap = snapshot(params, states, kwargs)
    info = c.algo.op(params, grads, *states, **c.op_kwargs(1), skip_nonfinite=True, **kwargs)
    assert info.skipped and not math.isfinite(info.grad_norm)
    snap.assert_unchanged()
    # finite gradients: the same bits as a call without the check, and their norm
    copies = ([p.copy() for p in params], [[s.copy() for s in lst] for lst in states],
              {k: [a.copy() for a in v] for k, v in kwargs.items()})
    info = c.algo.op(params, clean, *states, **c.op_kwargs(1), skip_nonfinite=True, **kwargs)
    norm = math.sqrt(sum(float(np.sum(g.astype(F64) ** 2)) for g in clean))
    assert info == (False, pytest.approx(norm, rel=1e-12))
    assert c.algo.op(copies[0], clean, *copies[1], **c.op_kwargs(1), **copies[2]) is None
    for a, b in zip(params + sum(states, []), copies[0] + sum(copies[1], [])):
        assert_same_bits(a, b, "checked vs unchecked")


@pytest.mark.parametrize("case_", FULL_CASES, ids=str)
def test_without_skip_nan_propagates_as_the_math_says(case_, rng):
    """No check asked for: the step runs, elements with a NaN gradient turn NaN (the
    param, or a state where the rule holds the param still: Rprop's previous gradient)
    and the others follow the reference (float64 params, so the comparison is tight).
    With a per-tensor trust ratio (LAMB, LARS) the NaN reaches the norm, so the whole
    tensor."""
    params = [rng.standard_normal(n) for n in (8, 50)]
    states = {n: [np.asarray(case_.initial_state(p, n)) + 0.1 for p in params]
              for n in case_.state_names}
    grads = _grads(params, rng)
    grads[1][[3, 40]] = np.nan
    expect_p, expect_s = case_.run_reference(params, grads, states, 2)
    assert case_.run_op(params, grads, states, 2) is None
    for a, b in zip(params, expect_p):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-14, equal_nan=True)
    reached = np.isnan(params[1][[3, 40]])
    for bufs in states.values():
        reached |= np.isnan(bufs[1][[3, 40]])
    assert reached.all() and not np.isnan(params[0]).any()
    if case_.algo.spec.reductions(case_.op_kwargs(2)):
        assert np.isnan(params[1]).all()
    else:
        assert np.isfinite(np.delete(params[1], [3, 40])).all()
    for name, refs in expect_s.items():
        for a, b in zip(states[name], refs):
            np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-14, equal_nan=True)


def test_without_skip_a_class_step_with_loss_scale_propagates_nan(rng):
    params = [np.asarray(rng.standard_normal(6), dtype=F16)]
    opt = fusedopt.Adam(params, lr=0.01, precision=fusedopt.Precision(master_weights=True))
    g = np.asarray(rng.standard_normal(6), dtype=F16)
    g[2] = np.nan
    assert opt.step([g], loss_scale=4.0) is None
    assert np.isnan(params[0][2]) and np.isnan(opt.state[0]["master_param"][2])
    assert np.isfinite(np.delete(params[0], 2)).all() and opt.state[0]["step"] == 1.0


# --- clipping ------------------------------------------------------------------------------------


def _clip_reference(case_, groups_params, grads, states, t, max_norm, loss_scale=1.0):
    """Reference step of each group with the unscaled gradients times torch's clip
    coefficient; returns (params, states, norm)."""
    unscaled = [g.astype(F64) / loss_scale for g in grads]
    norm = math.sqrt(sum(float(np.sum(g * g)) for g in unscaled))
    coef = min(1.0, max_norm / (norm + 1e-6))
    out_p, out_s, k = [], {n: [] for n in case_.state_names}, 0
    for lr, ps in groups_params:
        n = len(ps)
        c = case(case_.algo.name, **{**case_.overrides, "lr": lr})
        p, s = c.run_reference(ps, [g * coef for g in unscaled[k:k + n]],
                               {name: lst[k:k + n] for name, lst in states.items()}, t)
        out_p += p
        for name in s:
            out_s[name] += s[name]
        k += n
    return out_p, out_s, norm


@pytest.mark.parametrize("loss_scale", [None, 2.0**12], ids=["unscaled", "loss-scale"])
@pytest.mark.parametrize("max_norm", [0.5, 1e3], ids=["clipped", "below-max"])
@pytest.mark.parametrize("case_", FULL_CASES, ids=str)
def test_clipping_matches_reference(case_, max_norm, loss_scale, rng):
    """Global norm over all tensors of both groups (float64 params), three steps; with a
    loss scale the gradients come scaled and the norm reported is the unscaled one."""
    params = [rng.standard_normal(s) for s in [(9,), (4, 6), (30,), ()]]
    lrs = [case_.options["lr"], case_.options["lr"] / 3]
    opt = case_.make([{"params": params[:2]}, {"params": params[2:], "lr": lrs[1]}])
    # the case of each param's group (a fresh buffer may start at lr: Rprop's step sizes)
    cases = [case(case_.algo.name, **{**case_.overrides, "lr": lrs[i >= 2]})
             for i in range(len(params))]
    for t in range(1, 4):
        grads = [np.asarray(rng.standard_normal(p.shape)) for p in params]
        states = {n: [opt.state[i][n].copy() if i in opt.state else
                      cases[i].initial_state(p, n) for i, p in enumerate(params)]
                  for n in case_.state_names}
        scale = loss_scale or 1.0
        scaled = [np.asarray(g * scale) for g in grads]
        expect_p, expect_s, norm = _clip_reference(
            case_, [(lrs[0], params[:2]), (lrs[1], params[2:])], scaled, states, t, max_norm,
            scale)
        info = opt.step(scaled, max_grad_norm=max_norm, loss_scale=loss_scale)
        assert info == (False, pytest.approx(norm, rel=1e-12))
        for a, b in zip(params, expect_p):
            np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-15)
        for name in case_.state_names:
            for i, b in enumerate(expect_s[name]):
                np.testing.assert_allclose(opt.state[i][name], b, rtol=1e-12, atol=1e-15)


def test_clipping_functional_returns_norm(rng):
    params = [rng.standard_normal(n) for n in (5, 6)]
    grads = [10 * rng.standard_normal(n) for n in (5, 6)]
    norm = math.sqrt(sum(float(g @ g) for g in grads))
    coef = 1.0 / (norm + 1e-6)
    expect = [p - 0.1 * coef * g for p, g in zip(params, grads)]
    info = fusedopt.functional.sgd_(params, grads, lr=0.1, max_grad_norm=1.0)
    assert info == (False, pytest.approx(norm, rel=1e-12))
    for a, b in zip(params, expect):
        np.testing.assert_allclose(a, b, rtol=1e-13)


def test_clipping_16bit_grads_with_loss_scale(rng):
    """float16 and bfloat16 gradients (two groups), scaled by 2^10: the norm is taken in
    double over the 16-bit values of both groups and unscaled; the master weights follow
    the clipped reference to float32 accuracy and the params are the masters rounded."""
    params = [np.asarray(rng.standard_normal(40), dtype=F16),
              np.asarray(rng.standard_normal(7), dtype=BF16)]
    opt = fusedopt.SGD([{"params": params[:1]}, {"params": params[1:], "lr": 0.05}], lr=0.1,
                       momentum=0.9, precision=fusedopt.Precision(master_weights=True))
    grads = [np.asarray(rng.standard_normal(p.shape), dtype=p.dtype) for p in params]
    scaled = [np.asarray(g.astype(F64) * 2.0**10, dtype=g.dtype) for g in grads]
    masters = [p.astype(F64) for p in params]
    info = opt.step(scaled, loss_scale=2.0**10, max_grad_norm=1.0)
    norm = math.sqrt(sum(float(np.sum(g.astype(F64) ** 2)) for g in grads))
    assert info == (False, pytest.approx(norm, rel=1e-12))
    coef = 1.0 / (norm + 1e-6)
    for i, (m, g, lr) in enumerate(zip(masters, grads, (0.1, 0.05))):
        expect = m - lr * coef * g.astype(F64)
        np.testing.assert_allclose(opt.state[i]["master_param"], expect, rtol=0,
                                   atol=32 * 2.0**-24 * (np.abs(m).max() + 1))
        assert_same_bits(params[i], opt.state[i]["master_param"].astype(params[i].dtype),
                         "param")


def _torch_optimizer(torch, case_, tparams_groups):
    cls = getattr(torch.optim, case_.algo.cls.__name__)
    return cls(tparams_groups, **case_.options, foreach=False)


@pytest.mark.parametrize("loss_scale", [None, 2.0**8], ids=["unscaled", "loss-scale"])
@pytest.mark.parametrize("case_", [c for c in FULL_CASES if in_torch(c)], ids=str)
def test_clipping_matches_torch(case_, loss_scale, rng):
    """torch.nn.utils.clip_grad_norm_ over all params, then the torch.optim step, in
    float64, against one fused step with max_grad_norm (and the loss scale). torch runs
    with float64 as its default dtype, the dtype of its per-param scalars (NAdam's
    mu_product, ...), which the classes keep in double."""
    torch = pytest.importorskip("torch")
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        _clip_and_step_like_torch(torch, case_, loss_scale, rng)
    finally:
        torch.set_default_dtype(before)


def _clip_and_step_like_torch(torch, case_, loss_scale, rng):
    params = [rng.standard_normal(s) for s in [(9,), (4, 6), (30,)]]
    lr2 = case_.options["lr"] / 2
    tparams = [torch.tensor(p, requires_grad=True) for p in params]
    topt = _torch_optimizer(torch, case_, [{"params": tparams[:2]},
                                           {"params": tparams[2:], "lr": lr2}])
    opt = case_.make([{"params": params[:2]}, {"params": params[2:], "lr": lr2}])
    scale = loss_scale or 1.0
    for t in range(3):
        grads = [rng.standard_normal(p.shape) * (3.0 if t != 1 else 0.01) for p in params]
        for tp, g in zip(tparams, grads):
            tp.grad = torch.tensor(g)
        tnorm = float(torch.nn.utils.clip_grad_norm_(tparams, max_norm=1.0))
        topt.step()
        info = opt.step([g * scale for g in grads], max_grad_norm=1.0, loss_scale=loss_scale)
        assert info == (False, pytest.approx(tnorm, rel=1e-12))
        for p, tp in zip(params, tparams):
            np.testing.assert_allclose(p, tp.detach().numpy(), rtol=1e-11, atol=1e-14)


def test_clipping_with_a_nonfinite_norm_follows_torch(rng):
    """Without skip_nonfinite, clipping with an infinite gradient norm uses torch's
    coefficient min(1, max_norm / (inf + 1e-6)) = 0: finite gradients become 0 and the
    inf one NaN, so params with finite gradients keep their values and the one with
    the inf gradient turns NaN (as torch.nn.utils.clip_grad_norm_ + torch.optim.SGD)."""
    params = [rng.standard_normal(5), rng.standard_normal(4)]
    grads = [rng.standard_normal(5), rng.standard_normal(4)]
    grads[1][2] = np.inf
    expect = [p.copy() for p in params]
    expect[1][2] = np.nan
    torch = None
    try:
        import torch
    except ImportError:
        pass
    if torch is not None:
        tparams = [torch.tensor(p, requires_grad=True) for p in params]
        for tp, g in zip(tparams, grads):
            tp.grad = torch.tensor(g)
        torch.nn.utils.clip_grad_norm_(tparams, max_norm=1.0)
        torch.optim.SGD(tparams, lr=0.1).step()
        for e, tp in zip(expect, tparams):
            np.testing.assert_array_equal(tp.detach().numpy(), e)
    info = fusedopt.SGD(params, lr=0.1).step(grads, max_grad_norm=1.0)
    assert info.skipped is False and math.isinf(info.grad_norm)
    for p, e in zip(params, expect):
        np.testing.assert_array_equal(p, e)


def test_finite_gradients_whose_squares_overflow_are_not_skipped():
    """skip_nonfinite skips only a step with an inf or NaN gradient. float64 gradients
    of 1e160 are finite, though their squares overflow double."""
    params = [np.zeros(3)]
    grads = [np.array([1e160, -1e160, 0.0])]
    info = fusedopt.SGD(params, lr=1e-170).step(grads, skip_nonfinite=True)
    assert not info.skipped
    np.testing.assert_allclose(params[0], [-1e-10, 1e-10, 0.0], rtol=1e-12)
