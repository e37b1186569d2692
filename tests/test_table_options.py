"""What every algorithm of the table takes besides its own options, checked for each (the
case of the table that uses the most state): the `l1` group option, batched members;
and the edges of torch.optim's semantics that the newer algorithms reproduce (Rprop's
signs and bounds with non-finite gradients, Adamax's NaN-keeping maximum, ASGD's switch
from copying to averaging), against torch.optim itself."""

from __future__ import annotations

import numpy as np
import pytest

from cases import FULL_CASES, assert_same_bits, case
from fusedopt import batched
from fusedopt.transfer import prox_l1_

SHAPES = [(7,), (3, 5), (40,), ()]


def _grads(params, rng):
    return [rng.standard_normal(p.shape) for p in params]


@pytest.mark.parametrize("c", FULL_CASES, ids=str)
def test_l1_is_a_proximal_step_after_the_update(c, rng):
    """A group's l1 soft-thresholds its params by lr * l1 after each update, in the same
    pass: bit for bit the step followed by prox_l1_; a group without l1 is untouched."""
    params = [rng.standard_normal(s) for s in SHAPES]
    ref, plain = [p.copy() for p in params], [p.copy() for p in params]
    lr2, l1 = c.options["lr"] / 2, 2.0

    def groups(ps, **extra):
        return [{"params": ps[:2]}, {"params": ps[2:], "lr": lr2, **extra}]

    opt, ref_opt, plain_opt = c.make(groups(params, l1=l1)), c.make(groups(ref)), \
        c.make(groups(plain))
    for _ in range(4):
        grads = _grads(params, rng)
        opt.step(grads)
        ref_opt.step(grads)
        plain_opt.step(grads)
        prox_l1_(ref[2:], lr2 * l1)
    for i, (a, b) in enumerate(zip(params, ref)):
        assert_same_bits(a, b, f"{c}: params[{i}]")
    for i in range(2):
        assert_same_bits(params[i], plain[i], f"{c}: params[{i}] (no l1)")
    assert any(not np.array_equal(a, b) for a, b in zip(params[2:], plain[2:]))


def _member_options(c, k):
    """Member k's options: the case's, with a learning rate of its own."""
    return {**c.options, "lr": c.options["lr"] * (1.0 + 0.5 * k)}


@pytest.mark.parametrize("c", [c for c in FULL_CASES if c.algo.spec.batchable], ids=str)
def test_batched_members_step_as_separate_optimizers(c, rng):
    """Three members with their own learning rates, one fused call per step: bit for bit
    three separate optimizers, state and per-param scalars included."""
    members = 3
    init = [rng.standard_normal(s) for s in SHAPES[:3]]
    stacked = batched.stack(init, members)
    lrs = [_member_options(c, k)["lr"] for k in range(members)]
    opt = batched.OPTIMIZERS[c.algo.name](stacked, **{**c.options, "lr": lrs})
    singles = [[a.copy() for a in init] for _ in range(members)]
    refs = [c.make(ps, **_member_options(c, k)) for k, ps in enumerate(singles)]
    for _ in range(4):
        grads = [rng.standard_normal(p.shape) for p in stacked]
        opt.step(grads)
        for k, ref in enumerate(refs):
            ref.step([g[k] for g in grads])
    for k, (ps, ref) in enumerate(zip(singles, refs)):
        for j, p in enumerate(ps):
            assert_same_bits(stacked[j][k], p, f"member {k} params[{j}]")
            for name in c.state_names:
                assert_same_bits(opt.state[name][j][k], ref.state[j][name],
                                 f"member {k} {name}[{j}]")
        for name in c.algo.scalars:
            if name != "step":
                assert opt.state[name][k] == ref.state[0][name], f"member {k} {name}"
    assert opt.state.get("step", 4) == 4


# --- edges, against torch.optim ------------------------------------------------------------


@pytest.fixture
def torch64():
    """torch with float64 as its default dtype: its per-param scalars in double, as the
    NumPy classes keep them."""
    torch = pytest.importorskip("torch")
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield torch
    torch.set_default_dtype(before)


def _both(torch, c, params):
    ours = [p.copy() for p in params]
    theirs = [torch.nn.Parameter(torch.from_numpy(p.copy())) for p in params]
    opt = c.make(ours)
    topt = getattr(torch.optim, c.algo.cls.__name__)(theirs, foreach=False, **c.options)
    return ours, opt, theirs, topt


def _step_both(torch, ours, opt, theirs, topt, grads):
    opt.step([g.copy() for g in grads])
    for tp, g in zip(theirs, grads):
        tp.grad = torch.from_numpy(g.copy())
    topt.step()


def _assert_same_as_torch(c, ours, opt, theirs, topt, what, exact=False):
    """Equal to torch's params and state, NaNs in the same places: bit for bit, or up to
    the rounding of a differently grouped operation (torch's lerp, its fused multiply-add
    in add_ with alpha)."""
    def same(a, b, where):
        if exact:
            np.testing.assert_array_equal(a, b, err_msg=where)
        else:
            np.testing.assert_allclose(a, b, rtol=1e-14, atol=0, equal_nan=True, err_msg=where)

    for i, (a, tp) in enumerate(zip(ours, theirs)):
        same(a, tp.detach().numpy(), f"{what}: params[{i}]")
        for name in c.state_names:
            same(opt.state[i][name], topt.state[tp][name].numpy(), f"{what}: {name}[{i}]")


@pytest.mark.parametrize("c", [case("rprop", lr=0.01), case("rprop", lr=0.5, step_sizes=(0.01, 0.2)),
                               case("rprop", lr=0.05, step_sizes=(0.3, 0.1), maximize=True)],
                         ids=str)
def test_rprop_signs_and_bounds_like_torch(torch64, c, rng):
    """Sign flips (no move, 0 kept), zeros, NaN and infinite gradients (torch.sign gives
    a NaN the sign 0: the param and its step size stay), step sizes clamped every step
    (an lr above the bound, bounds in the wrong order): the same bits as torch.optim."""
    params = [rng.standard_normal(12)]
    ours, opt, theirs, topt = _both(torch64, c, params)
    signs = [1, -1, 1, 1, 0, -1, -1, 0, 1, -1, 1, 1]
    for t in range(6):
        g = np.array(signs, dtype=np.float64) * rng.uniform(0.5, 2.0, 12)
        g[t] = (np.nan, np.inf, -np.inf, 0.0, np.nan, 1e-300)[t]
        g[6 + t] = -g[6 + t] if t % 2 else g[6 + t]
        _step_both(torch64, ours, opt, theirs, topt, [g])
        _assert_same_as_torch(c, ours, opt, theirs, topt, f"{c} step {t + 1}", exact=True)
        if t == 0:  # the NaN gradient is kept as prev; the param did not move
            assert np.isnan(opt.state[0]["prev"][0]) and np.isfinite(ours[0]).all()


def test_adamax_keeps_nan_in_the_infinity_norm_like_torch(torch64, rng):
    """A NaN gradient makes exp_inf NaN, and max(beta2 * NaN, |g| + eps) stays NaN on
    later steps with finite gradients (torch.maximum), as torch.optim."""
    c = case("adamax", lr=0.01)
    params = [rng.standard_normal(5)]
    ours, opt, theirs, topt = _both(torch64, c, params)
    for t in range(3):
        g = rng.standard_normal(5)
        if t == 0:
            g[2] = np.nan
        _step_both(torch64, ours, opt, theirs, topt, [g])
        _assert_same_as_torch(c, ours, opt, theirs, topt, f"step {t + 1}")
    assert np.isnan(opt.state[0]["exp_inf"][2]) and np.isfinite(opt.state[0]["exp_inf"][3])


@pytest.mark.parametrize("t0", [3.0, 0.0, 1e6])
def test_asgd_copies_then_averages_like_torch(torch64, t0, rng):
    """ax is the param itself while mu is exactly 1 (a copy: an ax made NaN after the
    first step recovers on the second, where mu is 1 for every t0 here) and a running
    average from then on (mu = 1 / (t - t0) after step t), as torch.optim; the per-param
    eta and mu too."""
    c = case("asgd", lr=0.05, lambd=0.05, t0=t0)
    params = [rng.standard_normal(9), rng.standard_normal(())]
    ours, opt, theirs, topt = _both(torch64, c, params)
    for t in range(8):
        if t == 1:
            for i, tp in enumerate(theirs):
                opt.state[i]["ax"][...] = np.nan
                topt.state[tp]["ax"].fill_(float("nan"))
        _step_both(torch64, ours, opt, theirs, topt, _grads(params, rng))
        _assert_same_as_torch(c, ours, opt, theirs, topt, f"t0={t0} step {t + 1}")
        for i, tp in enumerate(theirs):
            for name in ("eta", "mu"):
                assert opt.state[i][name] == topt.state[tp][name].item(), name
    assert np.isfinite(opt.state[0]["ax"]).all()
    averaging = not np.array_equal(opt.state[0]["ax"], ours[0])
    assert averaging == (t0 < 6)


# --- the functional ops' own refusals ----------------------------------------------------


def _arrays(rng, nstates):
    params = [rng.standard_normal(5)]
    return params, [rng.standard_normal(5)], [[rng.uniform(0.1, 1.0, 5)] for _ in range(nstates)]


NADAM = dict(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8)


@pytest.mark.parametrize("op, nstates, kwargs, exc, match", [
    ("rprop_", 2, dict(etaminus=0.5, etaplus=1.2, step_size_min=1e-6, step_size_max=50.0,
                       l1=0.1), ValueError, "l1 needs lr"),
    ("nadam_", 2, dict(step=1, mu_product=1.0, **NADAM), ValueError, r"mu_product .* \[0, 1\)"),
    ("nadam_", 2, dict(step=1, mu_product=-0.5, **NADAM), ValueError, "mu_product"),
    ("nadam_", 2, dict(step=np.ones(1), mu_product=0.45, **NADAM), TypeError,
     "step must be a number"),
    ("nadam_", 2, dict(step=0, mu_product=0.45, **NADAM), ValueError, "step must be >= 1"),
    ("asgd_", 1, dict(step=np.ones(1), lr=0.01), TypeError, "step must be a number"),
], ids=["rprop-l1-without-lr", "nadam-product-1", "nadam-product-negative",
        "nadam-step-array", "nadam-step-0", "asgd-step-array"])
def test_functional_refusals_change_nothing(op, nstates, kwargs, exc, match, rng, snapshot):
    from fusedopt import functional as F
    params, grads, states = _arrays(rng, nstates)
    snap = snapshot(params, grads, states)
    with pytest.raises(exc, match=match):
        getattr(F, op)(params, grads, *states, **kwargs)
    snap.assert_unchanged()


def test_functional_ops_compute_asgd_rates_and_rprop_l1(rng):
    """asgd_ without eta and mu computes torch's values for the step in double; rprop_
    with lr and l1 takes the proximal step of lr * l1."""
    from fusedopt import functional as F
    from fusedopt import reference as R
    params, grads, (axs,) = _arrays(rng, 1)
    kw = dict(step=9, lr=0.05, lambd=0.1, alpha=0.5, t0=3.0)
    expect = R.asgd(params, grads, axs, **kw, eta=0.05 / (1 + 0.1 * 0.05 * 8) ** 0.5,
                    mu=1 / 5)
    F.asgd_(params, grads, axs, **kw)
    np.testing.assert_allclose(params[0], expect[0][0], rtol=1e-14)
    np.testing.assert_allclose(axs[0], expect[1][0], rtol=1e-14)
    params, grads, states = _arrays(rng, 2)
    kw = dict(etaminus=0.5, etaplus=1.2, step_size_min=1e-6, step_size_max=50.0)
    expect = R.rprop(params, grads, *states, **kw)[0]
    prox_l1_(expect, 0.5 * 0.4)
    F.rprop_(params, grads, *states, **kw, lr=0.5, l1=0.4)
    assert_same_bits(params[0], expect[0], "rprop_ with l1")
