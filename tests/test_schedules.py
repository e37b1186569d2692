"""fusedopt.schedules: torch.optim.lr_scheduler's values over many steps, with every kind
of optimizer, and their state dicts."""

from __future__ import annotations

import numpy as np
import pytest

import fusedopt as fo
from fusedopt import schedules as S
from fusedopt.batched import BatchedAdam
from fusedopt.lbfgs import LBFGS
from fusedopt.newton import Newton

LRS = (0.1, 0.03)


def _ours(kind="sgd"):
    groups = [{"params": [np.zeros(3)], "lr": LRS[0]}, {"params": [np.zeros(2)], "lr": LRS[1]}]
    if kind == "adam":
        return fo.Adam(groups, betas=(0.9, 0.99))
    return fo.SGD(groups, momentum=0.9)


def _theirs(torch, kind="sgd"):
    groups = [{"params": [torch.zeros(3, requires_grad=True)], "lr": LRS[0]},
              {"params": [torch.zeros(2, requires_grad=True)], "lr": LRS[1]}]
    if kind == "adam":
        return torch.optim.Adam(groups, betas=(0.9, 0.99))
    return torch.optim.SGD(groups, momentum=0.9)


def _compare(ours, theirs, topt, steps, momentum_key=None):
    for _ in range(steps + 1):
        np.testing.assert_allclose(ours.get_last_lr(), theirs.get_last_lr(), rtol=1e-11,
                                   atol=1e-16)
        np.testing.assert_allclose([g["lr"] for g in ours.optimizer.param_groups],
                                   ours.get_last_lr(), rtol=0)
        if momentum_key == "momentum":
            np.testing.assert_allclose([g["momentum"] for g in ours.optimizer.param_groups],
                                       [g["momentum"] for g in topt.param_groups], rtol=1e-12)
        elif momentum_key == "betas":
            np.testing.assert_allclose([g["betas"] for g in ours.optimizer.param_groups],
                                       [g["betas"] for g in topt.param_groups], rtol=1e-12)
        if _ == steps:
            break
        topt.step()  # (no gradients: a no-op that keeps torch's order check quiet)
        theirs.step()
        ours.step()


CASES = {
    "step": (lambda o: S.StepLR(o, step_size=7, gamma=0.5),
             lambda t, o: t.optim.lr_scheduler.StepLR(o, step_size=7, gamma=0.5)),
    "exponential": (lambda o: S.ExponentialLR(o, gamma=0.97),
                    lambda t, o: t.optim.lr_scheduler.ExponentialLR(o, gamma=0.97)),
    "cosine": (lambda o: S.CosineAnnealingLR(o, T_max=50, eta_min=1e-3),
               lambda t, o: t.optim.lr_scheduler.CosineAnnealingLR(o, T_max=50, eta_min=1e-3)),
    "warmup_cosine": (
        lambda o: S.WarmupCosineLR(o, warmup_steps=10, total_steps=120, start_factor=0.1,
                                   eta_min=1e-4),
        lambda t, o: t.optim.lr_scheduler.SequentialLR(o, [
            t.optim.lr_scheduler.LinearLR(o, start_factor=0.1, total_iters=10),
            t.optim.lr_scheduler.CosineAnnealingLR(o, T_max=110, eta_min=1e-4)],
            milestones=[10])),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_matches_torch(name):
    torch = pytest.importorskip("torch")
    make_ours, make_theirs = CASES[name]
    topt = _theirs(torch)
    ours, theirs = make_ours(_ours()), make_theirs(torch, topt)
    steps = 120 if name == "warmup_cosine" else 200  # cosine: past T_max, as torch goes on
    _compare(ours, theirs, topt, steps)


@pytest.mark.parametrize("kind", ["sgd", "adam"])
@pytest.mark.parametrize("kwargs", [
    dict(),
    dict(anneal_strategy="linear", pct_start=0.25),
    dict(three_phase=True, div_factor=10.0, final_div_factor=100.0),
])
def test_one_cycle_matches_torch_with_momentum(kind, kwargs):
    torch = pytest.importorskip("torch")
    topt = _theirs(torch, kind)
    ours = S.OneCycleLR(_ours(kind), max_lr=[1.0, 0.5], total_steps=100, **kwargs)
    theirs = torch.optim.lr_scheduler.OneCycleLR(topt, max_lr=[1.0, 0.5], total_steps=100,
                                                 **kwargs)
    _compare(ours, theirs, topt, 100, "betas" if kind == "adam" else "momentum")
    with pytest.raises(ValueError, match="total steps"):
        ours.step()


@pytest.mark.parametrize("kwargs", [
    dict(patience=3, factor=0.5),
    dict(mode="max", threshold_mode="abs", threshold=0.05, patience=2, cooldown=3,
         min_lr=[0.01, 0.02]),
])
def test_reduce_on_plateau_matches_torch(kwargs):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(3)
    metrics = np.concatenate([np.linspace(1.0, 0.5, 20), 0.5 + 0.01 * rng.random(60),
                              np.linspace(0.5, 0.2, 10), 0.2 + 0.01 * rng.random(60)])
    topt = _theirs(torch)
    ours = S.ReduceLROnPlateau(_ours(), **kwargs)
    theirs = torch.optim.lr_scheduler.ReduceLROnPlateau(topt, **kwargs)
    for m in metrics:
        topt.step()
        ours.step(m)
        theirs.step(m)
        np.testing.assert_allclose(ours.get_last_lr(), theirs.get_last_lr(), rtol=1e-12)
    assert ours.get_last_lr() != list(LRS)  # it did reduce


def _closed_forms():
    """Values by the formulas, for machines without torch."""
    return {
        "step": lambda b, t: b * 0.5 ** (t // 7),
        "exponential": lambda b, t: b * 0.97**t,
        "cosine": lambda b, t: 1e-3 + (b - 1e-3) * (1 + np.cos(np.pi * t / 50)) / 2,
        "warmup_cosine": lambda b, t: b * (0.1 + 0.9 * t / 10) if t < 10 else
        1e-4 + (b - 1e-4) * (1 + np.cos(np.pi * min(t - 10, 110) / 110)) / 2,
    }


@pytest.mark.parametrize("name", sorted(CASES))
def test_closed_forms(name):
    sched = CASES[name][0](_ours())
    formula = _closed_forms()[name]
    for t in range(150):
        np.testing.assert_allclose(sched.get_last_lr(), [formula(b, t) for b in LRS],
                                   rtol=1e-12)
        sched.step()


def test_warmup_cosine_stays_at_eta_min_after_total_steps():
    sched = S.WarmupCosineLR(_ours(), warmup_steps=2, total_steps=10, eta_min=0.001)
    for _ in range(30):
        sched.step()
    assert sched.get_last_lr() == pytest.approx([0.001, 0.001])


def _quadratic_closure(p, newton=False):
    def closure():
        g = 2.0 * (p - 3.0)
        if newton:
            return float(((p - 3.0) ** 2).sum()), [g], 2.0 * np.eye(p.size)
        return float(((p - 3.0) ** 2).sum()), [g]
    return closure


def test_every_optimizer_follows_the_schedule():
    """The schedule sets the rate; the optimizers read it at their next step."""
    p = np.zeros(2)
    for opt in (fo.SGD([p], lr=0.1), fo.Adagrad([np.zeros(2)]), fo.RMSprop([np.zeros(2)]),
                fo.Adadelta([np.zeros(2)]), fo.AdamW([np.zeros(2)]),
                LBFGS([np.zeros(2)]), Newton([np.zeros(2)])):
        sched = S.StepLR(opt, step_size=1, gamma=0.5)
        base = opt.param_groups[0]["lr"]
        sched.step()
        assert opt.param_groups[0]["lr"] == base / 2
    # a rate of 0 stops the first-order optimizers, and scales L-BFGS's and Newton's steps
    sgd = fo.SGD([p], lr=0.1)
    S.ExponentialLR(sgd, gamma=0.0).step()
    sgd.step([np.ones(2)])
    np.testing.assert_array_equal(p, 0.0)
    q = np.zeros(2)
    newton = Newton([q])
    S.StepLR(newton, step_size=1, gamma=0.5).step()
    newton.step(_quadratic_closure(q, newton=True))
    np.testing.assert_allclose(q, 1.5)  # half of the Newton step to 3
    r = np.zeros(2)
    lbfgs = LBFGS([r], max_iter=1)
    S.StepLR(lbfgs, step_size=1, gamma=0.0).step()
    lbfgs.step(_quadratic_closure(r))
    np.testing.assert_array_equal(r, 0.0)


def test_batched_members_follow_their_own_base_rates():
    params = [np.zeros((3, 4))]
    opt = BatchedAdam(params, lr=[0.1, 0.01, 0.001])
    sched = S.CosineAnnealingLR(opt, T_max=10)
    for _ in range(5):
        opt.step([np.ones((3, 4))])
        sched.step()
    np.testing.assert_allclose(sched.get_last_lr(), np.array([0.1, 0.01, 0.001]) * 0.5)
    np.testing.assert_allclose([g["lr"] for g in opt.param_groups], sched.get_last_lr())


def test_state_dict_resumes():
    opt = _ours()
    sched = S.OneCycleLR(opt, max_lr=1.0, total_steps=50)
    for _ in range(20):
        sched.step()
    saved, lrs = sched.state_dict(), sched.get_last_lr()
    assert "optimizer" not in saved
    expected = []
    for _ in range(10):
        sched.step()
        expected.append(sched.get_last_lr())
    resumed = S.OneCycleLR(opt, max_lr=1.0, total_steps=50)
    resumed.load_state_dict(saved)
    assert resumed.get_last_lr() == lrs
    for want in expected:
        resumed.step()
        assert resumed.get_last_lr() == want


def test_resume_needs_initial_lr():
    with pytest.raises(KeyError, match="initial_lr"):
        S.StepLR(fo.SGD([np.zeros(2)], lr=0.1), step_size=2, last_epoch=5)
    opt = fo.SGD([np.zeros(2)], lr=0.1)
    opt.param_groups[0]["initial_lr"] = 0.4
    sched = S.StepLR(opt, step_size=2, gamma=0.5, last_epoch=5)
    assert sched.get_last_lr() == [0.4 * 0.5**3]


@pytest.mark.parametrize("make,match", [
    (lambda o: S.StepLR(o, step_size=0), "step_size"),
    (lambda o: S.CosineAnnealingLR(o, T_max=0), "T_max"),
    (lambda o: S.WarmupCosineLR(o, warmup_steps=10, total_steps=10), "exceed"),
    (lambda o: S.WarmupCosineLR(o, warmup_steps=1, total_steps=10, start_factor=2.0),
     "start_factor"),
    (lambda o: S.OneCycleLR(o, max_lr=1.0), "total_steps"),
    (lambda o: S.OneCycleLR(o, max_lr=1.0, total_steps=10, pct_start=1.5), "pct_start"),
    (lambda o: S.OneCycleLR(o, max_lr=1.0, total_steps=10, anneal_strategy="exp"),
     "anneal_strategy"),
    (lambda o: S.OneCycleLR(o, max_lr=[1.0], total_steps=10), "max_lr"),
    (lambda o: S.ReduceLROnPlateau(o, factor=1.0), "Factor"),
    (lambda o: S.ReduceLROnPlateau(o, mode="up"), "mode"),
])
def test_invalid_arguments(make, match):
    with pytest.raises(ValueError, match=match):
        make(_ours())


def test_one_cycle_needs_a_momentum():
    with pytest.raises(ValueError, match="momentum"):
        S.OneCycleLR(fo.Adagrad([np.zeros(2)]), max_lr=1.0, total_steps=10)
    sched = S.OneCycleLR(fo.Adagrad([np.zeros(2)]), max_lr=1.0, total_steps=10,
                         cycle_momentum=False)
    assert sched.get_last_lr() == pytest.approx([1.0 / 25.0])
