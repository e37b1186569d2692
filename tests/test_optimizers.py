"""The optimizer classes: defaults, validation, param groups, state, and agreement with
the functional ops they are built on."""

from __future__ import annotations

import numpy as np
import pytest

import fusedopt
from cases import (ALGORITHMS, CASES, FULL_CASES, INVALID, assert_same_bits, case, data_ptr,
                   random_arrays, required_options)

SHAPES = [(10,), (4, 3), (), (0,), (2000,)]


# torch.optim's execution flags, which only fusedopt.torch takes
TORCH_FLAGS = {"foreach", "fused", "capturable", "differentiable"}


@pytest.mark.parametrize("name", sorted(ALGORITHMS))
def test_defaults_are_the_specs(name):
    algo = ALGORITHMS[name]
    required = required_options(algo.spec)
    opt = algo.cls([np.zeros(3)], **required)
    group = opt.param_groups[0]
    expected = {**algo.spec.group_defaults(), **required}
    assert {k: v for k, v in group.items() if k != "params"} == expected
    assert opt.defaults == expected


@pytest.mark.parametrize("name", sorted(ALGORITHMS))
def test_defaults_are_torchs(name):
    """The spec's defaults against torch.optim's own (where torch has the algorithm)."""
    torch = pytest.importorskip("torch")
    algo = ALGORITHMS[name]
    cls = getattr(torch.optim, algo.cls.__name__, None)
    if cls is None:
        pytest.skip(f"torch.optim has no {algo.cls.__name__}")
    theirs = cls([torch.zeros(3, requires_grad=True)]).defaults
    theirs = {k: v for k, v in theirs.items() if k not in TORCH_FLAGS}
    assert algo.spec.group_defaults() == theirs


@pytest.mark.parametrize("cls,kwargs", INVALID,
                         ids=[f"{c}-{'-'.join(map(str, k))}" for c, k in INVALID])
def test_invalid_hyperparameters_refused_at_construction(cls, kwargs):
    with pytest.raises(ValueError):
        getattr(fusedopt, cls)([np.zeros(3)], **kwargs)


# The edges of each valid range are valid, as in torch.
VALID_EDGES = [
    ("SGD", dict(lr=0.0, momentum=0.0, weight_decay=0.0)),
    ("SGD", dict(momentum=0.9, nesterov=True)),
    ("Adagrad", dict(lr=0.0, lr_decay=0.0, eps=0.0, initial_accumulator_value=0.0)),
    ("RMSprop", dict(lr=0.0, alpha=0.0, eps=0.0, momentum=0.0)),
    ("Adadelta", dict(rho=0.0)),
    ("Adadelta", dict(rho=1.0, eps=0.0)),
    ("Adam", dict(lr=0.0, betas=(0.0, 0.0), eps=0.0)),
    ("AdamW", dict(betas=(0.0, 0.0), weight_decay=0.0)),
]


@pytest.mark.parametrize("cls,kwargs", VALID_EDGES,
                         ids=[f"{c}-{'-'.join(map(str, k))}" for c, k in VALID_EDGES])
def test_valid_edges_accepted(cls, kwargs):
    opt = getattr(fusedopt, cls)([np.zeros(3)], **kwargs)
    for key, value in kwargs.items():
        assert opt.param_groups[0][key] == value


@pytest.mark.parametrize("name", sorted(ALGORITHMS))
def test_params_must_be_a_list(name):
    cls = ALGORITHMS[name].cls
    required = required_options(ALGORITHMS[name].spec)
    with pytest.raises(TypeError, match="params must be a list"):
        cls(np.zeros(3), **required)
    with pytest.raises(ValueError):
        cls([], **required)
    p = np.zeros(3)
    with pytest.raises(ValueError):
        cls([{"params": [p]}, {"params": [p]}], **required)


def test_a_required_argument_must_be_given():
    """LARS has no default learning rate (optax.lars's learning_rate is required)."""
    with pytest.raises(TypeError, match="lr"):
        fusedopt.LARS([np.zeros(3)])
    assert fusedopt.LARS([np.zeros(3)], 0.5).param_groups[0]["lr"] == 0.5


def run_functional(c, params, grads_per_step):
    """What an optimizer with these options does, written with the functional op."""
    states = {n: [c.initial_state(p, n) for p in params] for n in c.state_names}
    for t, grads in enumerate(grads_per_step, start=1):
        c.run_op(params, grads, states, t)
    return states


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("c", CASES, ids=str)
def test_class_step_equals_functional_op(c, dtype, rng):
    params = random_arrays(SHAPES, dtype, rng)
    grads = [random_arrays(SHAPES, dtype, rng) for _ in range(4)]
    fparams = [p.copy() for p in params]
    ptrs = [data_ptr(p) for p in params]
    opt = c.make(params)
    for g in grads:
        assert opt.step(g) is None
    states = run_functional(c, fparams, grads)
    assert [data_ptr(p) for p in params] == ptrs
    assert all(a is b for a, b in zip(opt.param_groups[0]["params"], params))
    for i in range(len(params)):
        assert_same_bits(params[i], fparams[i], f"{c}: params[{i}]")
        for name in c.state_names:
            assert_same_bits(opt.state[i][name], states[name][i], f"{c}: {name}[{i}]")
        if c.algo.has_step:
            assert opt.state[i]["step"] == 4.0


@pytest.mark.parametrize("c", FULL_CASES, ids=str)
def test_param_groups_with_overrides(c, rng):
    params = random_arrays(SHAPES, np.float64, rng)
    overrides = {"lr": c.options["lr"] * 0.25, "weight_decay": 0.05}
    if "betas" in c.options:
        overrides["betas"] = (0.6, 0.95)
    if "momentum" in c.options:
        overrides["momentum"] = 0.5
    opt = c.make([{"params": params[:2]}, {"params": params[2:], **overrides}])

    assert len(opt.param_groups) == 2
    assert all(a is b for a, b in zip(opt.param_groups[0]["params"], params[:2]))
    assert all(a is b for a, b in zip(opt.param_groups[1]["params"], params[2:]))
    for key, value in c.options.items():
        assert opt.param_groups[0][key] == value, key
        assert opt.param_groups[1][key] == overrides.get(key, value), key

    grads = [random_arrays(SHAPES, np.float64, rng) for _ in range(3)]
    first = [p.copy() for p in params[:2]]
    second = [p.copy() for p in params[2:]]
    for g in grads:
        opt.step(g)
    states0 = run_functional(c, first, [g[:2] for g in grads])
    c1 = case(c.algo.name, **{**c.overrides, **overrides})
    states1 = run_functional(c1, second, [g[2:] for g in grads])
    for i, (p, q) in enumerate(zip(params, first + second)):
        assert_same_bits(p, q, f"params[{i}]")
    for name in c.state_names:
        for i, b in enumerate(states0[name] + states1[name]):
            assert_same_bits(opt.state[i][name], b, f"{name}[{i}]")


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
def test_sgd_without_momentum_is_gradient_descent(dtype, rng):
    params = random_arrays(SHAPES, dtype, rng)
    expected = [p.copy() for p in params]
    opt = fusedopt.SGD(params, lr=0.1)
    for _ in range(3):
        grads = random_arrays(SHAPES, dtype, rng)
        opt.step(grads)
        expected = [p - dtype(0.1) * g for p, g in zip(expected, grads)]
        for i, (p, e) in enumerate(zip(params, expected)):
            # p - lr * g, rounded the same way: bit for bit
            assert_same_bits(p, e.astype(dtype), f"params[{i}]")
    # plain gradient descent keeps no state
    assert all(not s for s in opt.state.values())


@pytest.mark.parametrize("c", FULL_CASES, ids=str)
def test_state_is_created_like_torchs(c, rng):
    params = random_arrays(SHAPES, np.float32, rng)
    opt = c.make(params)
    if c.algo.name == "adagrad":
        # torch creates Adagrad's sums at construction, filled with the initial value
        assert sorted(opt.state) == list(range(len(params)))
        for i, p in enumerate(params):
            assert opt.state[i]["step"] == 0.0
            assert_same_bits(opt.state[i]["sum"],
                             np.full(p.shape, c.options["initial_accumulator_value"], p.dtype),
                             f"sum[{i}]")
    else:
        assert not opt.state
    opt.step(random_arrays(SHAPES, np.float32, rng))
    assert sorted(opt.state) == list(range(len(params)))
    names = set(c.state_names) | set(c.algo.scalars)
    for i, p in enumerate(params):
        assert set(opt.state[i]) == names
        for name in c.state_names:
            b = opt.state[i][name]
            assert isinstance(b, np.ndarray) and b.shape == p.shape and b.dtype == p.dtype
            assert b.flags.c_contiguous and b.flags.writeable
        if c.algo.has_step:
            assert type(opt.state[i]["step"]) is float and opt.state[i]["step"] == 1.0
