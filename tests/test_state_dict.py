"""State dicts: torch's layout, independent copies, exact resumption, loud mismatches."""

from __future__ import annotations

import numpy as np
import pytest

from cases import CASES, FULL_CASES, assert_same_bits, case, random_arrays

SHAPES = [(6,), (2, 3), (), (0,), (1000,)]
DTYPES = pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])


def two_groups(params, c, **override):
    """Params split into two groups, the second with its own learning rate."""
    return [{"params": params[:2]}, {"params": params[2:], "lr": c.options["lr"] * 0.5, **override}]


def assert_same_state(a, b, what):
    assert sorted(a) == sorted(b), what
    for i in a:
        assert sorted(a[i]) == sorted(b[i]), f"{what}: state names of param {i}"
        for name, v in a[i].items():
            if isinstance(v, np.ndarray):
                assert_same_bits(v, b[i][name], f"{what}: {name} of param {i}")
            else:
                assert v == b[i][name], f"{what}: {name} of param {i}"


def hyperparameters(opt):
    return [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]


@DTYPES
@pytest.mark.parametrize("c", CASES, ids=str)
def test_resume_is_bit_identical(c, dtype, rng):
    """Stop after 3 steps, load the state dict into a new optimizer over copies of the
    params, go on for 4 steps: bit for bit the uninterrupted run."""
    params = random_arrays(SHAPES, dtype, rng)
    grads = [random_arrays(SHAPES, dtype, rng) for _ in range(7)]
    opt = c.make(two_groups(params, c))
    for g in grads[:3]:
        opt.step(g)
    sd = opt.state_dict()

    resumed_params = [p.copy() for p in params]
    # other hyperparameters than the saved ones: loading must restore them
    resumed = c.make(two_groups(resumed_params, c, lr=c.options["lr"] * 3),
                     lr=c.options["lr"] * 7)
    resumed.load_state_dict(sd)
    assert hyperparameters(resumed) == hyperparameters(opt)

    for g in grads[3:]:
        opt.step(g)
        resumed.step(g)
    for i, (a, b) in enumerate(zip(resumed_params, params)):
        assert_same_bits(a, b, f"params[{i}]")
    assert_same_state(resumed.state, opt.state, "state")


@pytest.mark.parametrize("c", FULL_CASES, ids=str)
def test_layout_is_torchs(c, rng):
    params = random_arrays(SHAPES, np.float64, rng)
    opt = c.make(two_groups(params, c))
    opt.step(random_arrays(SHAPES, np.float64, rng))
    opt.step(random_arrays(SHAPES, np.float64, rng))
    sd = opt.state_dict()
    assert set(sd) == {"state", "param_groups"}
    assert [g["params"] for g in sd["param_groups"]] == [[0, 1], [2, 3, 4]]
    assert sd["param_groups"][1]["lr"] == c.options["lr"] * 0.5
    for key, value in c.options.items():
        assert sd["param_groups"][0][key] == value, key
    assert sorted(sd["state"]) == [0, 1, 2, 3, 4]
    expected_names = set(c.state_names) | set(c.algo.scalars)
    for i, p in enumerate(params):
        s = sd["state"][i]
        assert set(s) == expected_names, i
        for name in c.state_names:
            assert isinstance(s[name], np.ndarray)
            assert s[name].shape == p.shape and s[name].dtype == p.dtype
            assert not np.shares_memory(s[name], opt.state[i][name])
        if c.algo.has_step:
            assert type(s["step"]) is float and s["step"] == 2.0


@pytest.mark.parametrize("c", FULL_CASES, ids=str)
def test_state_dict_is_a_copy(c, rng, snapshot):
    params = random_arrays(SHAPES, np.float64, rng)
    opt = c.make(params)
    opt.step(random_arrays(SHAPES, np.float64, rng))
    sd = opt.state_dict()
    live = snapshot(opt.state)
    # writing into the dict does not reach the optimizer ...
    for s in sd["state"].values():
        for v in s.values():
            if isinstance(v, np.ndarray):
                v[...] = 123.0
    live.assert_unchanged()
    # ... and a step does not reach the dict
    sd = opt.state_dict()
    saved = snapshot(sd["state"])
    opt.step(random_arrays(SHAPES, np.float64, rng))
    saved.assert_unchanged()


@pytest.mark.parametrize("c", FULL_CASES, ids=str)
def test_one_state_dict_loads_into_two_independent_optimizers(c, rng, snapshot):
    params = random_arrays(SHAPES, np.float64, rng)
    opt = c.make(params)
    for _ in range(2):
        opt.step(random_arrays(SHAPES, np.float64, rng))
    sd = opt.state_dict()
    saved = snapshot(sd["state"])
    pa, pb = [p.copy() for p in params], [p.copy() for p in params]
    a, b = c.make(pa), c.make(pb)
    a.load_state_dict(sd)
    b.load_state_dict(sd)
    grads = [random_arrays(SHAPES, np.float64, rng) for _ in range(3)]
    for g in grads:
        a.step(g)
    for g in grads:
        b.step(g)
    for g in grads:
        opt.step(g)
    saved.assert_unchanged()
    for i in range(len(params)):
        assert_same_bits(pa[i], params[i], f"first copy, params[{i}]")
        assert_same_bits(pb[i], params[i], f"second copy, params[{i}]")


def _wrong_param_count(sd, c):
    sd["param_groups"][0]["params"] = sd["param_groups"][0]["params"][:-1]
    sd["state"].pop(len(SHAPES) - 1, None)


def _wrong_group_count(sd, c):
    g = sd["param_groups"][0]
    sd["param_groups"] = [dict(g, params=g["params"][:2]), dict(g, params=g["params"][2:])]


def _wrong_shape(sd, c):
    name = c.state_names[-1]
    sd["state"][len(SHAPES) - 1][name] = np.zeros(999)


def _wrong_dtype(sd, c):
    name = c.state_names[-1]
    last = sd["state"][len(SHAPES) - 1]
    last[name] = last[name].astype(np.float32)


@pytest.mark.parametrize("mismatch", [_wrong_param_count, _wrong_group_count, _wrong_shape,
                                      _wrong_dtype], ids=lambda f: f.__name__[1:])
@pytest.mark.parametrize("c", FULL_CASES, ids=str)
def test_mismatched_state_dict_is_refused(c, mismatch, rng, snapshot):
    """ValueError, and the optimizer goes on exactly as if nothing had been loaded."""
    params = random_arrays(SHAPES, np.float64, rng)
    twin_params = [p.copy() for p in params]
    opt, twin = c.make(params), c.make(twin_params)
    donor = c.make(random_arrays(SHAPES, np.float64, rng), lr=0.5 * c.options["lr"])
    for _ in range(2):
        g = random_arrays(SHAPES, np.float64, rng)
        opt.step(g)
        twin.step(g)
        donor.step(random_arrays(SHAPES, np.float64, rng))
    sd = donor.state_dict()
    mismatch(sd, c)
    state_before = snapshot(opt.state, params)
    steps_before = {i: s.get("step") for i, s in opt.state.items()}
    hyper_before = hyperparameters(opt)

    with pytest.raises(ValueError):
        opt.load_state_dict(sd)

    state_before.assert_unchanged()
    assert {i: s.get("step") for i, s in opt.state.items()} == steps_before
    assert hyperparameters(opt) == hyper_before
    g = random_arrays(SHAPES, np.float64, rng)
    opt.step(g)
    twin.step(g)
    for i in range(len(params)):
        assert_same_bits(params[i], twin_params[i], f"params[{i}]")
    assert_same_state(opt.state, twin.state, "state")


def test_hyperparameters_restored(rng):
    c = case("adam", lr=0.01, betas=(0.5, 0.9), eps=1e-6, weight_decay=0.1, amsgrad=True,
             maximize=True)
    params = random_arrays(SHAPES, np.float64, rng)
    opt = c.make(params)
    opt.step(random_arrays(SHAPES, np.float64, rng))
    fresh_params = [p.copy() for p in params]
    fresh = case("adam", amsgrad=True).make(fresh_params)
    assert fresh.param_groups[0]["lr"] == 1e-3
    fresh.load_state_dict(opt.state_dict())
    for key, value in c.options.items():
        assert fresh.param_groups[0][key] == value, key
    # the params stay the optimizer's own arrays
    assert all(a is b for a, b in zip(fresh.param_groups[0]["params"], fresh_params))
