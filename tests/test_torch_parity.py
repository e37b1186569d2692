"""The optimizer classes against torch.optim (single-tensor path) in float64.

Same options, same data, 60 steps: parameters and every state buffer agree to
rtol 1e-9. The classes keep their per-param scalars (`step`, NAdam's `mu_product`,
ASGD's `eta` and `mu`) as Python floats, torch.optim in its default dtype, so torch
runs here with float64 as its default dtype: double on both sides. Both sides compute in double, so what differs is only the grouping
of operations (torch's lerp for a moving average, say); that rounding stays
many orders of magnitude below the tolerance over 60 steps. atol 1e-12 covers
values that cancel to near zero, whose error is a few ulps of the terms.
State dicts cross over both ways.
"""

from __future__ import annotations

import numpy as np
import pytest

from cases import CASES, case, in_torch, random_arrays

torch = pytest.importorskip("torch")

#: the cases of the algorithms torch.optim has (the others are checked against their
#: references, and schedule-free AdamW against the schedulefree package)
TORCH_CASES = [c for c in CASES if in_torch(c)]

SHAPES = [(5,), (3, 4), (), (0,), (129,)]
STEPS = 60
RTOL, ATOL = 1e-9, 1e-12


@pytest.fixture(autouse=True)
def _float64_scalars():
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(before)


def torch_optimizer(c, tparams, **changes):
    cls = getattr(torch.optim, c.algo.cls.__name__)
    return cls(tparams, foreach=False, **{**c.options, **changes})


def to_torch(arrays):
    return [torch.nn.Parameter(torch.from_numpy(a.copy())) for a in arrays]


def step_both(fopt, fparams, topt, tparams, rng):
    grads = random_arrays([p.shape for p in fparams], np.float64, rng)
    fopt.step(grads)
    for tp, g in zip(tparams, grads):
        tp.grad = torch.from_numpy(g.copy())
    topt.step()


def assert_params_close(fparams, tparams, what):
    for i, (fp, tp) in enumerate(zip(fparams, tparams)):
        np.testing.assert_allclose(fp, tp.detach().numpy(), rtol=RTOL, atol=ATOL,
                                   err_msg=f"{what}: params[{i}]")


def _nonempty(state):
    # torch keeps no entry for a param without state (SGD without momentum)
    return {k: v for k, v in state.items() if v}


def assert_states_close(fsd, tsd, what):
    fstate, tstate = _nonempty(fsd["state"]), _nonempty(tsd["state"])
    assert sorted(fstate) == sorted(tstate), what
    for i in tstate:
        assert sorted(fstate[i]) == sorted(tstate[i]), f"{what}: state names of param {i}"
        for name, tv in tstate[i].items():
            fv = fstate[i][name]
            if name == "step":
                assert isinstance(fv, float), f"{what}: step is {type(fv).__name__}"
                assert fv == float(tv), f"{what}: step of param {i}"
            else:
                np.testing.assert_allclose(fv, tv.numpy(), rtol=RTOL, atol=ATOL,
                                           err_msg=f"{what}: {name} of param {i}")


@pytest.mark.parametrize("c", TORCH_CASES, ids=str)
def test_matches_torch(c, rng):
    fparams = random_arrays(SHAPES, np.float64, rng)
    start = [p.copy() for p in fparams]
    tparams = to_torch(fparams)
    fopt, topt = c.make(fparams), torch_optimizer(c, tparams)
    for t in range(1, STEPS + 1):
        step_both(fopt, fparams, topt, tparams, rng)
        if t in (1, 2, 10, STEPS):
            assert_params_close(fparams, tparams, f"{c} step {t}")
            assert_states_close(fopt.state_dict(), topt.state_dict(), f"{c} step {t}")
    # the comparison means something only if the run moved the params
    assert np.max(np.abs(fparams[4] - start[4])) > 1e-3


@pytest.mark.parametrize("c", TORCH_CASES, ids=str)
def test_hyperparameters_match_torch(c):
    fopt = c.make([np.zeros(3)])
    topt = torch_optimizer(c, to_torch([np.zeros(3)]))
    fgroup, tgroup = fopt.param_groups[0], topt.param_groups[0]
    for key, value in fgroup.items():
        if key != "params":
            assert key in tgroup, f"{c}: torch has no hyperparameter {key!r}"
            assert tgroup[key] == value, f"{c}: {key}"
    for key in c.algo.defaults:
        assert key in fgroup


def test_param_groups_match_torch(rng):
    c = case("adam", lr=0.01, amsgrad=True)
    fparams = random_arrays(SHAPES, np.float64, rng)
    tparams = to_torch(fparams)
    fopt = c.make([{"params": fparams[:2]},
                   {"params": fparams[2:], "lr": 0.05, "betas": (0.5, 0.9), "weight_decay": 0.1}])
    topt = torch_optimizer(c, [{"params": tparams[:2]},
                               {"params": tparams[2:], "lr": 0.05, "betas": (0.5, 0.9),
                                "weight_decay": 0.1}])
    for _ in range(10):
        step_both(fopt, fparams, topt, tparams, rng)
    assert_params_close(fparams, tparams, "param groups")
    assert_states_close(fopt.state_dict(), topt.state_dict(), "param groups")


def fusedopt_sd_to_torch(sd):
    state = {}
    for i, s in sd["state"].items():
        state[i] = {k: torch.from_numpy(v.copy()) if isinstance(v, np.ndarray)
                    else torch.tensor(float(v), dtype=torch.float64) for k, v in s.items()}
    return {"state": state, "param_groups": sd["param_groups"]}


def torch_sd_to_fusedopt(sd):
    state = {}
    for i, s in sd["state"].items():
        state[i] = {k: float(v) if k == "step" else v.detach().numpy().copy()
                    for k, v in s.items()}
    return {"state": state, "param_groups": sd["param_groups"]}


@pytest.mark.parametrize("direction", ["fusedopt_to_torch", "torch_to_fusedopt"])
@pytest.mark.parametrize("c", TORCH_CASES, ids=str)
def test_state_dict_crosses_over(c, direction, rng):
    """Run 5 steps on one library, move its state dict to the other, run 10 more on both
    and compare with an uninterrupted run of the first."""
    start = random_arrays(SHAPES, np.float64, rng)
    grads = [random_arrays(SHAPES, np.float64, rng) for _ in range(15)]
    fparams = [p.copy() for p in start]
    tparams = to_torch(start)
    fopt, topt = c.make(fparams), torch_optimizer(c, tparams)

    def torch_step(g):
        for tp, gi in zip(tparams, g):
            tp.grad = torch.from_numpy(gi.copy())
        topt.step()

    for g in grads[:5]:
        fopt.step(g) if direction == "fusedopt_to_torch" else torch_step(g)
    if direction == "fusedopt_to_torch":
        with torch.no_grad():
            for tp, fp in zip(tparams, fparams):
                tp.copy_(torch.from_numpy(fp))
        topt.load_state_dict(fusedopt_sd_to_torch(fopt.state_dict()))
    else:
        for tp, fp in zip(tparams, fparams):
            fp[...] = tp.detach().numpy()
        fopt.load_state_dict(torch_sd_to_fusedopt(topt.state_dict()))
    for g in grads[5:]:
        fopt.step(g)
        torch_step(g)
    assert_params_close(fparams, tparams, f"{c} {direction}")
    assert_states_close(fopt.state_dict(), topt.state_dict(), f"{c} {direction}")

    # and both agree with a run that was never interrupted
    ref = [p.copy() for p in start]
    ropt = c.make(ref)
    for g in grads:
        ropt.step(g)
    for i, (a, b) in enumerate(zip(fparams, ref)):
        np.testing.assert_allclose(a, b, rtol=RTOL, atol=ATOL, err_msg=f"params[{i}]")
