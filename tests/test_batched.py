"""fusedopt.batched: K members with their own hyperparameters in one fused call, bit for bit
the same as K separate optimizers; search helpers; ensembles; state dicts; bad input."""

from __future__ import annotations

import numpy as np
import pytest

import fusedopt as fo
from fusedopt import _backend, batched
from fusedopt.batched import BatchedAdam, BatchedAdamW, BatchedSGD
from fusedopt.transfer import prox_l1_

SHAPES = [(4, 3), (3,), (2, 2, 2)]


def _init(rng, dtype=np.float64):
    return [rng.standard_normal(s).astype(dtype) for s in SHAPES]


def _run_both(rng, make_batched, make_single, members, steps=4, dtype=np.float64):
    init = _init(rng, dtype)
    stacked = batched.stack(init, members)
    opt = make_batched(stacked)
    singles = [[a.copy() for a in init] for _ in range(members)]
    refs = [make_single(ps, opt.param_groups[k]) for k, ps in enumerate(singles)]
    for _ in range(steps):
        grads = [rng.standard_normal(p.shape).astype(dtype) for p in stacked]
        opt.step(grads)
        for k, ref in enumerate(refs):
            ref.step([g[k] for g in grads])
    return opt, stacked, singles, refs


def _assert_members_equal(stacked, singles):
    for k, ps in enumerate(singles):
        for j, p in enumerate(ps):
            np.testing.assert_array_equal(stacked[j][k], p, err_msg=f"member {k} param {j}")


def _sgd_single(ps, g):
    return fo.SGD(ps, lr=g["lr"], momentum=g["momentum"], dampening=g["dampening"],
                  weight_decay=g["weight_decay"], nesterov=g["nesterov"], maximize=g["maximize"])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_sgd_members_match_separate_optimizers(rng, dtype):
    hyper = dict(lr=[0.1, 0.05, 0.01, 0.2, 0.02], momentum=[0.0, 0.9, 0.5, 0.9, 0.0],
                 dampening=[0.5, 0.0, 0.1, 0.0, 0.0], nesterov=[False, True, False, True, False],
                 weight_decay=[0.0, 1e-2, 0.0, 0.1, 0.0], maximize=[False, False, True, False,
                                                                     False])
    opt, stacked, singles, refs = _run_both(rng, lambda p: BatchedSGD(p, **hyper), _sgd_single,
                                            5, dtype=dtype)
    _assert_members_equal(stacked, singles)
    for k, ref in enumerate(refs):
        if hyper["momentum"][k]:
            for j in range(len(SHAPES)):
                np.testing.assert_array_equal(opt.state["momentum_buffer"][j][k],
                                              ref.state[j]["momentum_buffer"])


def test_plain_sgd_members_use_the_plain_kernel(rng):
    opt, stacked, singles, _ = _run_both(rng, lambda p: BatchedSGD(p, lr=[0.1, 0.3, 0.0]),
                                         _sgd_single, 3)
    _assert_members_equal(stacked, singles)
    assert "momentum_buffer" not in opt.state


def _adam_single(ps, g):
    cls = fo.AdamW if g["decoupled_weight_decay"] else fo.Adam
    return cls(ps, lr=g["lr"], betas=g["betas"], eps=g["eps"], weight_decay=g["weight_decay"],
               amsgrad=g["amsgrad"], maximize=g["maximize"])


@pytest.mark.parametrize("amsgrad", [False, True])
def test_adam_and_adamw_members_match_separate_optimizers(rng, amsgrad):
    hyper = dict(lr=[1e-3, 1e-2, 3e-2, 1e-1], betas=[(0.9, 0.999), (0.8, 0.99), (0.5, 0.9),
                                                     (0.95, 0.9999)],
                 eps=[1e-8, 1e-6, 1e-8, 1e-3], weight_decay=[0.0, 0.1, 1e-2, 0.5],
                 decoupled_weight_decay=[False, True, False, True],
                 maximize=[False, False, True, False])
    opt, stacked, singles, refs = _run_both(
        rng, lambda p: BatchedAdam(p, amsgrad=amsgrad, **hyper), _adam_single, 4)
    _assert_members_equal(stacked, singles)
    assert opt.state["step"] == refs[0].state[0]["step"] == 4


def test_adamw_defaults_and_shared_values(rng):
    opt, stacked, singles, _ = _run_both(rng, lambda p: BatchedAdamW(p, lr=[1e-2, 1e-3]),
                                         _adam_single, 2)
    _assert_members_equal(stacked, singles)
    g = opt.param_groups[1]
    assert g["weight_decay"] == 1e-2 and g["decoupled_weight_decay"] and g["betas"] == (0.9, 0.999)


def test_one_fused_call_per_step(rng, monkeypatch):
    calls = []
    real = _backend._cpu

    class Counting:
        def __getattr__(self, name):
            return getattr(real, name)

        def step(self, kernel, dtype, ptrs, sizes, hyper, *args, **kw):
            calls.append((kernel, len(sizes), len(hyper)))
            return real.step(kernel, dtype, ptrs, sizes, hyper, *args, **kw)

    monkeypatch.setattr(_backend, "_cpu", Counting())
    members = 16
    opt = BatchedAdam(batched.stack(_init(rng), members), lr=list(np.logspace(-3, -1, members)))
    for _ in range(3):
        opt.step([rng.standard_normal(p.shape) for p in opt.params])
    n = members * len(SHAPES)
    assert calls == [("adam", n, n * fo._cpu.hyper_size("adam"))] * 3
    assert fo._cpu.hyper_size("adam") == sum(map(len, fo.algorithms.hyper_fields("adam")))


def test_one_call_per_member_where_kernels_take_one_row(rng, monkeypatch):
    """The path of arrays whose kernels take one hyperparameter row per call (CUDA):
    one call per member, the same results."""
    hyper = dict(lr=[1e-3, 1e-2, 1e-1], betas=[(0.9, 0.999), (0.8, 0.99), (0.5, 0.9)])
    init = _init(rng)
    runs = []
    for per_member in (False, True):
        if per_member:
            monkeypatch.setattr(BatchedAdam, "_one_call", staticmethod(lambda a: False))
        stacked = batched.stack(init, 3)
        opt = BatchedAdam(stacked, **hyper)
        for t in range(3):
            opt.step([np.full_like(p, 0.1 * (t + 1)) for p in stacked])
        runs.append(stacked)
    for a, b in zip(*runs):
        np.testing.assert_array_equal(a, b)


def test_none_gradient_skips_the_param_for_every_member(rng):
    stacked = batched.stack(_init(rng), 3)
    before = [p.copy() for p in stacked]
    opt = BatchedSGD(stacked, lr=0.1, momentum=0.9)
    opt.step([np.ones_like(stacked[0]), None, np.ones_like(stacked[2])])
    np.testing.assert_array_equal(stacked[1], before[1])
    assert not np.array_equal(stacked[0], before[0])
    opt.step([None, None, None])
    opt.step([np.ones_like(p) for p in stacked])  # param 1 joins later: its buffer is fresh
    np.testing.assert_allclose(stacked[1], before[1] - 0.1)


def test_momentum_switched_on_later_starts_fresh_buffers(rng):
    init = _init(rng)
    stacked = batched.stack(init, 2)
    opt = BatchedSGD(stacked, lr=0.1)
    ref = [fo.SGD([a.copy() for a in init], lr=0.1) for _ in range(2)]
    refs = [r.param_groups[0]["params"] for r in ref]
    grads = [np.ones_like(p) for p in stacked]
    opt.step(grads)
    for r in ref:
        r.step([g[0] for g in grads])
    opt.param_groups[1]["momentum"] = 0.9  # as a schedule (e.g. one-cycle) would
    fresh = fo.SGD(refs[1], lr=0.1, momentum=0.9)
    for _ in range(3):
        opt.step(grads)
        ref[0].step([g[0] for g in grads])
        fresh.step([g[1] for g in grads])
    _assert_members_equal(stacked, refs)


def test_sgd_member_without_momentum_keeps_an_infinity_as_alone(rng):
    """A member without momentum beside one with momentum runs SGD's plain step: an
    infinite gradient gives an infinite param there, as in a separate SGD (inside the
    momentum kernel, 0 * inf in the buffer would make it NaN on the next step)."""
    init = [np.zeros(3)]
    stacked = batched.stack(init, 2)
    opt = BatchedSGD(stacked, lr=0.1, momentum=[0.9, 0.0])
    singles = [[a.copy() for a in init] for _ in range(2)]
    refs = [fo.SGD(singles[0], lr=0.1, momentum=0.9), fo.SGD(singles[1], lr=0.1)]
    for g in ([np.inf, 1.0, 2.0], [1.0, 1.0, 1.0], [0.5, -1.0, 2.0]):
        grads = [np.array([g, g])]
        opt.step(grads)
        for k, ref in enumerate(refs):
            ref.step([grads[0][k]])
    assert stacked[0][1, 0] == -np.inf
    _assert_members_equal(stacked, singles)


@pytest.mark.parametrize("centered", [False, True])
def test_rmsprop_members_with_and_without_momentum_match_separate_optimizers(rng, centered):
    """Members without momentum run RMSprop's plain kernel, as a single optimizer does
    (the momentum kernel with momentum 0 rounds lr * (g / d), the plain one
    (lr * g) / d), also after a member's momentum is switched off."""
    hyper = dict(lr=[0.05, 0.01, 0.2], momentum=[0.0, 0.9, 0.0], alpha=[0.5, 0.9, 0.99],
                 centered=centered)

    def single(ps, g):
        return fo.RMSprop(ps, lr=g["lr"], momentum=g["momentum"], alpha=g["alpha"],
                          centered=g["centered"], eps=g["eps"])

    opt, stacked, singles, refs = _run_both(rng, lambda p: batched.BatchedRMSprop(p, **hyper),
                                            single, 3, dtype=np.float32)
    _assert_members_equal(stacked, singles)
    opt.param_groups[1]["momentum"] = 0.0
    refs[1].param_groups[0]["momentum"] = 0.0
    for _ in range(3):
        grads = [rng.standard_normal(p.shape).astype(np.float32) for p in stacked]
        opt.step(grads)
        for k, ref in enumerate(refs):
            ref.step([g[k] for g in grads])
    _assert_members_equal(stacked, singles)


def test_per_member_l1_is_a_proximal_step(rng):
    init = _init(rng)
    stacked = batched.stack(init, 3)
    l1, lr = [0.0, 0.5, 2.0], [0.1, 0.1, 0.05]
    opt = BatchedSGD(stacked, lr=lr, l1=l1)
    singles = [[a.copy() for a in init] for _ in range(3)]
    refs = [fo.SGD(ps, lr=lr[k]) for k, ps in enumerate(singles)]
    for _ in range(3):
        grads = [rng.standard_normal(p.shape) for p in stacked]
        opt.step(grads)
        for k, (ref, ps) in enumerate(zip(refs, singles)):
            ref.step([g[k] for g in grads])
            prox_l1_(ps, lr[k] * l1[k])
    _assert_members_equal(stacked, singles)
    assert (stacked[0][2] == 0).sum() > (stacked[0][0] == 0).sum()


def test_one_dimensional_stacks(rng):
    """A param that is one number per member: the member slices are 0-d arrays."""
    stacked = [np.zeros(4)]
    opt = BatchedSGD(stacked, lr=[0.1, 0.2, 0.3, 0.4])
    opt.step([np.ones(4)])
    np.testing.assert_allclose(stacked[0], [-0.1, -0.2, -0.3, -0.4])
    assert opt.param_groups[2]["params"][0].shape == ()


def test_state_dict_round_trip(rng):
    init = _init(rng)
    runs = []
    for reload in (False, True):
        stacked = batched.stack(init, 3)
        opt = BatchedAdam(stacked, lr=[1e-2, 1e-3, 1e-1], weight_decay=[0, 0.1, 0])
        grads = [np.full_like(p, 0.5) for p in stacked]
        opt.step(grads)
        if reload:
            sd = opt.state_dict()
            opt.state["exp_avg"][0][...] = np.nan  # the saved copy is independent
            opt = BatchedAdam(stacked)
            opt.load_state_dict(sd)
            assert [g["lr"] for g in opt.param_groups] == [1e-2, 1e-3, 1e-1]
        opt.step(grads)
        runs.append([p.copy() for p in stacked])
    for a, b in zip(*runs):
        np.testing.assert_array_equal(a, b)


def test_load_state_dict_refuses_mismatches(rng):
    stacked = batched.stack(_init(rng), 3)
    opt = BatchedAdam(stacked)
    opt.step([np.ones_like(p) for p in stacked])
    sd = opt.state_dict()
    with pytest.raises(ValueError, match="3 members"):
        BatchedAdam(batched.stack(_init(rng), 2)).load_state_dict(sd)
    other = BatchedAdam(batched.stack(_init(rng, np.float32), 3))
    with pytest.raises(ValueError, match="dtype"):
        other.load_state_dict(sd)
    assert other.state == {}
    bad = opt.state_dict()
    bad["param_groups"][1]["lr"] = -1.0
    with pytest.raises(ValueError, match="member 1"):
        opt.load_state_dict(bad)
    assert opt.param_groups[1]["lr"] == 1e-3


@pytest.mark.parametrize("make,exc,match", [
    (lambda p: BatchedSGD(p, lr=[0.1, -0.1, 0.1]), ValueError,
     r"learning rate: -0.1 \(member 1\)"),
    (lambda p: BatchedSGD(p, lr=[0.1, 0.1]), ValueError, "2 values for 3 members"),
    (lambda p: BatchedSGD(p, nesterov=True), ValueError, "Nesterov"),
    (lambda p: BatchedAdam(p, betas=[(0.9, 0.99), (1.0, 0.99), (0.9, 0.9)]), ValueError,
     "beta parameter at index 0: 1.0 \\(member 1\\)"),
    (lambda p: BatchedAdam(p, amsgrad=[True, False, True]), ValueError, "one value"),
    (lambda p: BatchedAdam(p, momentum=0.9), TypeError, "unknown"),
    (lambda p: BatchedSGD(p[:1] + [np.zeros((2, 3))]), ValueError, "stacks 2 members"),
    (lambda p: BatchedSGD([p[0], p[1].astype(np.float32)]), TypeError, "share one dtype"),
    (lambda p: BatchedSGD(p[0]), TypeError, "list of stacked arrays"),
    (lambda p: BatchedSGD([np.zeros(())]), ValueError, "0-d"),
])
def test_invalid_construction(rng, make, exc, match):
    with pytest.raises(exc, match=match):
        make(batched.stack(_init(rng), 3))


def test_bad_grads_change_nothing(rng, snapshot):
    stacked = batched.stack(_init(rng), 3)
    opt = BatchedAdam(stacked)
    snap = snapshot(stacked)
    with pytest.raises(ValueError, match="2 grads for 3 params"):
        opt.step([np.ones_like(stacked[0])] * 2)
    with pytest.raises(ValueError, match=r"grads\[1\] has shape"):
        opt.step([np.ones_like(stacked[0]), np.ones((2, 3)), np.ones_like(stacked[2])])
    with pytest.raises(TypeError, match="dtype"):
        opt.step([np.ones_like(p, dtype=np.float32) for p in stacked])
    snap.assert_unchanged()
    assert opt.state == {}


# --- search ---------------------------------------------------------------------------------

def _regression(rng, n=64, d=5):
    x = rng.standard_normal((n, d))
    w_true = rng.standard_normal(d)
    y = x @ w_true + 0.01 * rng.standard_normal(n)
    return x, y, w_true


def _model(x, y):
    """Linear least squares for K members at once; stacked params [W (K, d)]."""
    def init(k):
        return [np.zeros((k, x.shape[1]))]

    def loss_and_grads(params, t):
        r = params[0] @ x.T - y  # (K, n)
        return (r**2).mean(axis=1), [2.0 * r @ x / len(y)]

    def score(params):
        return ((params[0] @ x.T - y) ** 2).mean(axis=1)

    return init, loss_and_grads, score


def test_grid_and_sample():
    settings = batched.grid(lr=[0.1, 0.01], momentum=[0.0, 0.9])
    assert settings == [dict(lr=0.1, momentum=0.0), dict(lr=0.1, momentum=0.9),
                        dict(lr=0.01, momentum=0.0), dict(lr=0.01, momentum=0.9)]
    drawn = batched.sample(50, seed=1, lr=batched.loguniform(1e-4, 1e-1),
                           momentum=batched.uniform(0.5, 0.99), nesterov=batched.choice((0, 1)),
                           weight_decay=0.0)
    assert len(drawn) == 50 and all(1e-4 <= s["lr"] <= 1e-1 for s in drawn)
    assert {s["nesterov"] for s in drawn} == {0, 1} and {s["weight_decay"] for s in drawn} == {0}
    assert drawn == batched.sample(50, seed=1, lr=batched.loguniform(1e-4, 1e-1),
                                   momentum=batched.uniform(0.5, 0.99),
                                   nesterov=batched.choice((0, 1)), weight_decay=0.0)


def test_grid_search_picks_the_best_setting(rng):
    x, y, w_true = _regression(rng)
    init, loss_and_grads, score = _model(x, y)
    result = batched.grid_search(dict(lr=[1e-4, 1e-2, 0.1, 5.0], momentum=[0.0, 0.9]),
                                 init, loss_and_grads, score, steps=100, optimizer="sgd")
    assert len(result.scores) == 8 and result.losses.shape == (100, 8)
    assert (result.scores[6:] > 1e10).all() and result.best_index < 6  # lr = 5 diverges
    assert result.best in (dict(lr=0.1, momentum=0.9), dict(lr=0.1, momentum=0.0))
    assert result.best_score < 1e-3
    np.testing.assert_allclose(result.params[0][result.best_index], w_true, atol=0.05)


def test_random_search_with_adamw(rng):
    x, y, _ = _regression(rng)
    init, loss_and_grads, score = _model(x, y)
    result = batched.random_search(dict(lr=batched.loguniform(1e-4, 0.3),
                                        betas=batched.choice(((0.9, 0.999), (0.5, 0.9)))),
                                   12, init, loss_and_grads, score, steps=150, seed=0,
                                   optimizer="adamw", weight_decay=0.0)
    assert result.best["lr"] == max(s["lr"] for s in result.settings) or result.best_score < 1e-3
    assert result.best_score == result.scores.min()


def test_scores_that_are_not_finite_rank_last():
    def run(mode, scores):
        return batched.search([dict(lr=v) for v in (0.1, 0.2, 0.3)],
                              lambda k: [np.zeros((k, 2))],
                              lambda p, t: (np.zeros(3), [np.ones_like(p[0])]),
                              lambda p: np.array(scores), steps=1, mode=mode)
    assert run("min", [np.nan, 2.0, 1.0]).best_index == 2
    assert run("max", [np.inf, 2.0, 1.0]).best_index == 1
    assert run("max", [np.nan, np.nan, -1.0]).best_index == 2


def test_search_needs_consistent_settings(rng):
    init, loss_and_grads, score = _model(*_regression(rng)[:2])
    with pytest.raises(ValueError, match="differ in their keys"):
        batched.search([dict(lr=0.1), dict(momentum=0.9)], init, loss_and_grads, score, steps=1)
    with pytest.raises(ValueError, match="no settings"):
        batched.search([], init, loss_and_grads, score, steps=1)


def test_ensemble_members_share_hyperparameters_and_average(rng):
    """An ensemble: K members from different initializations, one batched optimizer."""
    x, y, w_true = _regression(rng)
    members = 8
    stacked = [rng.standard_normal((members, x.shape[1]))]
    opt = BatchedAdam(stacked, lr=0.05)
    for _ in range(300):
        r = stacked[0] @ x.T - y
        opt.step([2.0 * r @ x / len(y)])
    predictions = stacked[0] @ x.T  # (K, n)
    mean = predictions.mean(axis=0)
    assert np.abs(mean - x @ w_true).max() < 0.05
    assert np.ptp(stacked[0], axis=0).max() < 0.05  # the members agree


def test_bayesian_search_with_optuna(rng):
    optuna = pytest.importorskip("optuna")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    x, y, _ = _regression(rng)
    init, loss_and_grads, score = _model(x, y)

    def evaluate(settings):
        return batched.search(settings, init, loss_and_grads, score, steps=50,
                              optimizer="sgd").scores

    study = optuna.create_study(sampler=optuna.samplers.TPESampler(seed=0))
    batched.bayesian_search(lambda t: {"lr": t.suggest_float("lr", 1e-4, 10.0, log=True)},
                            evaluate, members=8, rounds=3, study=study)
    assert len(study.trials) == 24
    assert study.best_value < 1e-3
    assert 1e-2 < study.best_params["lr"] < 1.0
