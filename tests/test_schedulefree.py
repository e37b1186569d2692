"""Schedule-free AdamW against the schedulefree package's AdamWScheduleFree.

fusedopt.torch.AdamWScheduleFree is a drop-in for the package's class: a float64 MLP
trained by both from the same start, with train()/eval() switches between runs of
steps, agrees to rtol 1e-9 (both compute in double and differ only in how operations
are grouped); state dicts load both ways. The NumPy class runs the same kernels: it is
checked against the package too, and its train/eval moves (with master weights and
Kahan buffers) against their formulas. The step itself is checked against the float64
reference by the case table.
"""

from __future__ import annotations

import copy
import io

import numpy as np
import pytest

import fusedopt
from cases import assert_same_bits

torch = pytest.importorskip("torch")
schedulefree = pytest.importorskip("schedulefree")
fot = pytest.importorskip("fusedopt.torch")

RTOL, ATOL = 1e-9, 1e-12

OPTIONS = {
    "defaults": dict(),
    "lr-wd": dict(lr=0.01, weight_decay=0.01),
    "warmup": dict(lr=0.02, warmup_steps=8, weight_decay=0.05),
    "r-power": dict(lr=0.01, r=0.5, weight_lr_power=1.0, betas=(0.8, 0.99), eps=1e-6),
}


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads(), fusedopt.get_num_threads()
    torch.set_num_threads(1)
    fusedopt.set_num_threads(1)
    yield
    torch.set_num_threads(before[0])
    fusedopt.set_num_threads(before[1])


def make_data():
    g = torch.Generator().manual_seed(7)
    return (torch.randn(32, 6, generator=g, dtype=torch.float64),
            torch.randn(32, 2, generator=g, dtype=torch.float64))


def make_model():
    torch.manual_seed(3)
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(),
                               torch.nn.Linear(8, 2)).to(torch.float64)


def loss_of(model, data):
    x, y = data
    return ((model(x) - y) ** 2).mean()


def train(model, opt, steps, data, frozen=lambda t: False, start=0):
    losses = []
    for t in range(start, start + steps):
        opt.zero_grad()
        model[2].bias.requires_grad_(not frozen(t))
        loss = loss_of(model, data)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    model[2].bias.requires_grad_(True)
    return losses


def assert_models_close(a, b, what):
    for i, (p, q) in enumerate(zip(a.parameters(), b.parameters())):
        np.testing.assert_allclose(p.detach().numpy(), q.detach().numpy(), rtol=RTOL,
                                   atol=ATOL, err_msg=f"{what}: param {i}")


def assert_states_close(s1, s2, what):
    assert sorted(s1["state"]) == sorted(s2["state"]), what
    for k in s1["state"]:
        a, b = s1["state"][k], s2["state"][k]
        assert sorted(a) == sorted(b), f"{what}: state names of param {k}"
        for name in a:
            np.testing.assert_allclose(a[name].numpy(), b[name].numpy(), rtol=RTOL, atol=ATOL,
                                       err_msg=f"{what}: {name} of param {k}")
    groups1 = [{k: v for k, v in g.items() if k != "params"} for g in s1["param_groups"]]
    groups2 = [{k: v for k, v in g.items() if k != "params"} for g in s2["param_groups"]]
    for g1, g2 in zip(groups1, groups2):
        assert sorted(g1) == sorted(g2), what
        for key in g1:
            if isinstance(g1[key], float):
                assert g1[key] == pytest.approx(g2[key], rel=RTOL), f"{what}: {key}"
            else:
                assert g1[key] == g2[key], f"{what}: {key}"


def both(opts, groups=False):
    """(package model, package optimizer), (fusedopt model, fusedopt optimizer)."""
    def params_of(m):
        if not groups:
            return m.parameters()
        return [{"params": m[0].parameters()},
                {"params": m[2].parameters(), "lr": 0.005, "weight_decay": 0.1}]

    pm, fm = make_model(), make_model()
    return ((pm, schedulefree.AdamWScheduleFree(params_of(pm), **opts)),
            (fm, fot.AdamWScheduleFree(params_of(fm), **opts)))


def run_with_switches(model, opt, data, frozen=lambda t: False):
    """40 steps in runs of 10, with eval() and train() between them; the loss in eval
    mode after each run."""
    evals = []
    for run in range(4):
        opt.train()
        train(model, opt, 10, data, frozen, start=10 * run)
        opt.eval()
        with torch.no_grad():
            evals.append(loss_of(model, data).item())
    return evals


@pytest.mark.parametrize("name", list(OPTIONS))
def test_training_matches_the_package(name):
    data = make_data()
    (pm, popt), (fm, fopt) = both(OPTIONS[name])
    start = [p.detach().clone() for p in fm.parameters()]
    theirs = run_with_switches(pm, popt, data)
    mine = run_with_switches(fm, fopt, data)
    np.testing.assert_allclose(mine, theirs, rtol=RTOL)
    assert_models_close(fm, pm, f"{name} (eval mode)")
    assert_states_close(fopt.state_dict(), popt.state_dict(), name)
    popt.train()
    fopt.train()
    assert_models_close(fm, pm, f"{name} (train mode)")
    moved = max((p.detach() - s).abs().max().item() for p, s in zip(fm.parameters(), start))
    assert moved > 1e-3  # the comparison means something only if training moved the params


def test_param_groups_and_params_without_gradients_match_the_package():
    """Two groups with their own lr and weight decay; one param without a gradient every
    third step (its state waits, the group's counters go on, as in the package)."""
    data = make_data()
    (pm, popt), (fm, fopt) = both(dict(lr=0.01, warmup_steps=3), groups=True)
    frozen = lambda t: t % 3 == 1  # noqa: E731
    run_with_switches(pm, popt, data, frozen)
    run_with_switches(fm, fopt, data, frozen)
    assert_models_close(fm, pm, "groups")
    assert_states_close(fopt.state_dict(), popt.state_dict(), "groups")
    assert [g["k"] for g in fopt.param_groups] == [40, 40]


@pytest.mark.parametrize("direction", ["package_to_fusedopt", "fusedopt_to_package"])
def test_state_dict_crosses_over(direction):
    """15 steps with one, eval(), save (torch.save), load into the other, train() both,
    15 more steps on both: the same as the uninterrupted run."""
    data = make_data()
    (pm, popt), (fm, fopt) = both(dict(lr=0.01, warmup_steps=5, weight_decay=0.01))
    first, second = ((pm, popt), (fm, fopt))
    if direction == "fusedopt_to_package":
        first, second = second, first
    first[1].train()
    train(*first, 15, data)
    first[1].eval()
    second[0].load_state_dict(first[0].state_dict())
    buf = io.BytesIO()
    torch.save(first[1].state_dict(), buf)
    buf.seek(0)
    second[1].load_state_dict(torch.load(buf))
    assert_states_close(second[1].state_dict(), first[1].state_dict(), "after load")
    for _, opt in (first, second):
        opt.train()
    train(*first, 15, data, start=15)
    train(*second, 15, data, start=15)
    for _, opt in (first, second):
        opt.eval()
    assert_models_close(second[0], first[0], direction)
    assert_states_close(second[1].state_dict(), first[1].state_dict(), direction)


def test_a_step_in_eval_mode_is_refused_and_changes_nothing():
    data = make_data()
    (pm, popt), (fm, fopt) = both({})
    for model, opt in ((pm, popt), (fm, fopt)):
        loss_of(model, data).backward()
    before = [p.detach().clone() for p in fm.parameters()]
    with pytest.raises(Exception) as theirs:
        popt.step()
    with pytest.raises(RuntimeError) as mine:
        fopt.step()
    assert str(mine.value) == str(theirs.value)
    assert all(torch.equal(a, b) for a, b in zip(before, fm.parameters()))
    assert len(fopt.state) == 0 and fopt.param_groups[0]["k"] == 0
    params = [np.ones(3)]
    opt = fusedopt.AdamWScheduleFree(params)
    with pytest.raises(RuntimeError, match="not in train mode"):
        opt.step([np.ones(3)])
    assert opt.state == {} and opt.param_groups[0]["k"] == 0
    assert_same_bits(params[0], np.ones(3), "param")


def test_train_and_eval_twice_change_nothing_more():
    """Switching to the mode the optimizer is in is a no-op (the package's flag)."""
    data = make_data()
    _, (fm, fopt) = both(dict(lr=0.01))
    fopt.train()
    train(fm, fopt, 5, data)
    fopt.eval()
    x = [p.detach().clone() for p in fm.parameters()]
    fopt.eval()
    assert all(torch.equal(a, b) for a, b in zip(x, fm.parameters()))
    fopt.train()
    fopt.train()
    fopt.eval()
    for a, b in zip(x, fm.parameters()):
        np.testing.assert_allclose(a.numpy(), b.detach().numpy(), rtol=1e-14, atol=1e-15)


def test_zero_learning_rate_gives_the_packages_zero_weight():
    """lr 0: every weight of the average is 0 and the package's ckp1 falls back to 0 (a
    ZeroDivisionError it catches); nothing moves."""
    data = make_data()
    (pm, popt), (fm, fopt) = both(dict(lr=0.0))
    run_with_switches(pm, popt, data)
    run_with_switches(fm, fopt, data)
    assert_models_close(fm, pm, "lr 0")
    assert fopt.param_groups[0]["weight_sum"] == 0.0


# --- the NumPy class ----------------------------------------------------------------------


def test_numpy_class_matches_the_package():
    """fusedopt.AdamWScheduleFree on NumPy arrays, with the gradients of the package's
    run, including train/eval switches and a state dict that loads into the package."""
    data = make_data()
    pm = make_model()
    popt = schedulefree.AdamWScheduleFree(pm.parameters(), lr=0.01, warmup_steps=4,
                                          weight_decay=0.01)
    params = [p.detach().numpy().copy() for p in pm.parameters()]
    opt = fusedopt.AdamWScheduleFree(params, lr=0.01, warmup_steps=4, weight_decay=0.01)
    for run in range(3):
        popt.train()
        opt.train()
        for _ in range(7):
            popt.zero_grad()
            loss_of(pm, data).backward()
            grads = [p.grad.numpy().copy() for p in pm.parameters()]
            popt.step()
            opt.step(grads)
        popt.eval()
        opt.eval()
        for i, (a, b) in enumerate(zip(params, pm.parameters())):
            np.testing.assert_allclose(a, b.detach().numpy(), rtol=RTOL, atol=ATOL,
                                       err_msg=f"run {run}: param {i}")
    sd = opt.state_dict()
    for key in ("k", "weight_sum", "lr_max", "scheduled_lr", "train_mode"):
        assert sd["param_groups"][0][key] == pytest.approx(popt.param_groups[0][key])
    # into the package: torch tensors for the arrays, its foreach flag
    other = schedulefree.AdamWScheduleFree(make_model().parameters())
    state = {i: {k: torch.from_numpy(v.copy()) for k, v in s.items()}
             for i, s in sd["state"].items()}
    other.load_state_dict({"state": state,
                           "param_groups": [dict(g, foreach=True) for g in sd["param_groups"]]})
    assert_states_close(other.state_dict(), popt.state_dict(), "numpy state dict in the package")


@pytest.mark.parametrize("extra", ["none", "master", "kahan"])
def test_numpy_train_eval_moves(extra, rng):
    """eval() takes y to x = y + (1 - 1/beta1)(z - y), train() x back to y = x + (1 -
    beta1)(z - x): for float64 params exactly that; for bfloat16 params
    with master weights the master moves and the param is it rounded; with Kahan
    buffers the param plus its compensation moves."""
    ml_dtypes = pytest.importorskip("ml_dtypes")
    sixteen = extra != "none"
    dtype = ml_dtypes.bfloat16 if sixteen else np.float64
    params = [np.asarray(rng.standard_normal(s), dtype) for s in [(50,), (3, 4)]]
    precision = fusedopt.Precision(master_weights=extra == "master", kahan=extra == "kahan")
    opt = fusedopt.AdamWScheduleFree(params, lr=0.05, betas=(0.8, 0.999), precision=precision)
    opt.train()
    for _ in range(3):
        opt.step([np.asarray(rng.standard_normal(p.shape), dtype) for p in params])
    for weight, switch in ((1 - 1 / 0.8, opt.eval), (1 - 0.8, opt.train)):
        before = copy.deepcopy(opt.state)
        start = [p.astype(np.float64) for p in params]
        switch()
        for i, p in enumerate(params):
            z = before[i]["z"].astype(np.float64)
            if extra == "master":
                m = before[i]["master_param"].astype(np.float64)
                want = m + weight * (z - m)
                np.testing.assert_allclose(opt.state[i]["master_param"], want, rtol=1e-6,
                                           atol=1e-7)
                assert_same_bits(p, opt.state[i]["master_param"].astype(dtype), "param")
            elif extra == "kahan":
                x = start[i] + before[i]["kahan_comp"].astype(np.float64)
                want = x + weight * (z - x)
                total = p.astype(np.float64) + opt.state[i]["kahan_comp"].astype(np.float64)
                np.testing.assert_allclose(total, want, rtol=1e-4, atol=1e-5)
            else:  # torch.lerp's formula for |w| < 0.5, without its fused multiply-add
                assert_same_bits(p, start[i] + weight * (z - start[i]), "param")
            assert_same_bits(opt.state[i]["z"], before[i]["z"], "z")  # z stays


def test_numpy_params_without_state_stay_put_and_counters_advance(rng):
    """A param without state is not moved by train/eval; a group whose params get no
    gradient still advances k, as the package does."""
    params = [rng.standard_normal(4), rng.standard_normal(4)]
    opt = fusedopt.AdamWScheduleFree([{"params": params[:1]}, {"params": params[1:]}])
    opt.train()
    opt.step([rng.standard_normal(4), None])
    assert [g["k"] for g in opt.param_groups] == [1, 1]
    assert 1 not in opt.state
    held = params[1].copy()
    opt.eval()
    assert_same_bits(params[1], held, "a param without state")
