"""The EMA of the params folded into the step (``ema=``/``ema_decay=``): the step with
the EMA slot equals the step without it followed by torch.optim.swa_utils' EMA update
(AveragedModel with get_ema_multi_avg_fn), bit for bit; the classes keep the averages
in their state, swap them in for evaluation and carry them in state dicts."""

from __future__ import annotations

import copy

import numpy as np
import pytest

import fusedopt as fo
from fusedopt import functional as F
from cases import FULL_CASES, assert_same_bits, random_arrays, random_states

torch = pytest.importorskip("torch")
fot = pytest.importorskip("fusedopt.torch")
swa = torch.optim.swa_utils

SHAPES = [(1,), (7,), (33, 5), (4097,)]


def torch_ema(emas, params, decay):
    """torch's EMA update of NumPy arrays, in place (the AveragedModel's multi_avg_fn)."""
    swa.get_ema_multi_avg_fn(decay)([torch.from_numpy(e) for e in emas],
                                    [torch.from_numpy(p) for p in params], None)


@pytest.mark.parametrize("case", FULL_CASES, ids=str)
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_functional_step_with_ema_is_step_then_torchs_update(case, dtype, rng):
    params = random_arrays(SHAPES, dtype, rng)
    emas = random_arrays(SHAPES, dtype, rng)
    states = random_states(case, params, rng)
    mine_p, mine_s, mine_e = [p.copy() for p in params], copy.deepcopy(states), \
        [e.copy() for e in emas]
    for t, decay in zip((1, 2, 3, 4), (0.0, 0.999, 0.9, 0.2)):
        grads = random_arrays(SHAPES, dtype, rng)
        args = case._state_args(mine_s)
        case.algo.op(mine_p, grads, *args, ema=mine_e, ema_decay=decay, **case.op_kwargs(t))
        case.run_op(params, grads, states, t)
        if decay == 0.0:  # AveragedModel's first update copies
            emas = [p.copy() for p in params]
        else:
            torch_ema(emas, params, decay)
        for i in range(len(SHAPES)):
            assert_same_bits(mine_p[i], params[i], f"param {i} at step {t}")
            assert_same_bits(mine_e[i], emas[i], f"ema {i} at step {t}")
            for name in states:
                assert_same_bits(mine_s[name][i], states[name][i], f"{name} {i}")


def test_sixteen_bit_params_average_their_rounded_values(rng):
    """bfloat16 params with float32 master weights: the average moves toward the stored
    (rounded) param, in float as torch's bfloat16 lerp, and is rounded to bfloat16."""
    shapes = [(5, 3), (4097,)]
    params = [torch.randn(s, dtype=torch.float32).bfloat16() for s in shapes]
    master = [p.float() for p in params]
    emas = [torch.randn(s).bfloat16() for s in shapes]
    m = [torch.zeros(s) for s in shapes]
    v = [torch.zeros(s) for s in shapes]
    ref = [e.clone() for e in emas]
    for t in (1, 2, 3):
        grads = [torch.randn(s).bfloat16() for s in shapes]
        F.adam_(params, grads, m, v, step=t, lr=0.05, beta1=0.9, beta2=0.99, eps=1e-8,
                master_params=master, ema=emas, ema_decay=0.75)
        torch._foreach_lerp_(ref, params, 1 - 0.75)
        for e, r in zip(emas, ref):
            assert torch.equal(e.view(torch.int16), r.view(torch.int16))


def test_ema_needs_its_decay_and_no_kahan_buffers(rng):
    p, g = [np.ones(3)], [np.ones(3)]
    e = [np.zeros(3)]
    kw = dict(lr=0.1, momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False,
              maximize=False, first_step=False)
    with pytest.raises(ValueError, match="ema needs ema_decay"):
        F.sgd_(p, g, ema=e, **kw)
    with pytest.raises(ValueError, match=r"Invalid decay value 1.5"):
        F.sgd_(p, g, ema=e, ema_decay=1.5, **kw)
    with pytest.raises(ValueError, match="without the ema arrays"):
        F.sgd_(p, g, ema_decay=0.5, **kw)
    with pytest.raises(ValueError, match=r"ema\[0\] has shape \(4,\), params\[0\] has \(3,\)"):
        F.sgd_(p, g, ema=[np.zeros(4)], ema_decay=0.5, **kw)
    with pytest.raises(TypeError, match=r"ema\[0\] has dtype float32, params\[0\] has float64"):
        F.sgd_(p, g, ema=[np.zeros(3, np.float32)], ema_decay=0.5, **kw)
    with pytest.raises(ValueError, match=r"params\[0\] and ema\[0\] share memory"):
        F.sgd_(p, g, ema=p, ema_decay=0.5, **kw)
    with pytest.raises(ValueError, match="not C-contiguous"):
        F.sgd_(p, g, ema=[np.zeros(6)[::2]], ema_decay=0.5, **kw)
    half = [np.ones(3, np.float16)]
    with pytest.raises(ValueError, match="kahan_buffers"):
        F.sgd_(half, half, ema=[np.zeros(3, np.float16)], ema_decay=0.5,
               kahan_buffers=[np.zeros(3, np.float16)], **kw)
    # next to master weights (the EMA list after theirs): each list gets its own rule
    master = [np.ones(3, np.float32)]
    with pytest.raises(TypeError, match=r"ema\[0\] has dtype float32, params\[0\] has float16"):
        F.sgd_(half, half, ema=[np.zeros(3, np.float32)], ema_decay=0.5, master_params=master,
               **kw)
    with pytest.raises(TypeError, match=r"master_params\[0\] has dtype float16, master "
                                        "weights are float32"):
        F.sgd_(half, half, ema=[np.zeros(3, np.float16)], ema_decay=0.5,
               master_params=[np.ones(3, np.float16)], **kw)
    with pytest.raises(TypeError, match="master_params are for float16 and bfloat16 params"):
        F.sgd_(p, g, ema=e, ema_decay=0.5, master_params=[np.ones(3, np.float32)], **kw)
    np.testing.assert_array_equal(p[0], 1.0)
    np.testing.assert_array_equal(e[0], 0.0)
    np.testing.assert_array_equal(half[0], 1.0)


# --- the NumPy classes -----------------------------------------------------------------------


def _grads(rng, params, skip=()):
    return [None if i in skip else rng.standard_normal(p.shape) for i, p in enumerate(params)]


@pytest.mark.parametrize("name,opts", [("Adam", dict(lr=0.01)), ("SGD", dict(lr=0.05)),
                                       ("SGD", dict(lr=0.05, momentum=0.9)),
                                       ("Adagrad", dict(lr=0.1))])
def test_class_with_ema_is_step_then_averaged_model(name, opts, rng):
    """Against the class without averages followed by AveragedModel's update: the first
    step copies, later steps move every average (also of params without a gradient in
    that step); a param that had no state yet joins with its own value."""
    shapes = [(4, 3), (3,), (5,)]
    start = random_arrays(shapes, np.float64, rng)
    mine = [p.copy() for p in start]
    plain = [p.copy() for p in start]
    opt = getattr(fo, name)(mine, ema_decay=0.9, **opts)
    ref = getattr(fo, name)(plain, **opts)
    averaged = None
    skips = [{2}, set(), {1}, {0, 1}, set()]  # param 2 first steps at the second step
    for skip in skips:
        seed = int(rng.integers(1 << 30))
        opt.step(_grads(np.random.default_rng(seed), mine, skip))
        ref.step(_grads(np.random.default_rng(seed), plain, skip))
        if averaged is None:
            averaged = [p.copy() for p in plain]  # the first update copies every param
        else:
            torch_ema(averaged, plain, 0.9)
        for i, p in enumerate(mine):
            assert_same_bits(p, plain[i], f"param {i}")
            state = opt.state.get(i)
            ema = state["ema"] if state else p  # no state yet: its own average
            assert_same_bits(ema, averaged[i], f"ema {i}")


def test_swap_ema_and_averaged_context(rng):
    params = random_arrays([(3, 2), (4,)], np.float64, rng)
    opt = fo.Adam(params, lr=0.1, ema_decay=0.5)
    for _ in range(3):
        opt.step(_grads(rng, params))
    weights = [p.copy() for p in params]
    averages = [opt.state[i]["ema"].copy() for i in range(2)]
    assert not np.array_equal(weights[0], averages[0])
    with opt.averaged():
        for p, a in zip(params, averages):
            assert_same_bits(p, a, "inside")
        with pytest.raises(RuntimeError, match="swapped"):
            opt.step(_grads(rng, params))
    for p, w in zip(params, weights):
        assert_same_bits(p, w, "after")
    opt.swap_ema()
    assert_same_bits(params[1], averages[1], "swapped")
    opt.swap_ema()
    assert_same_bits(params[1], weights[1], "swapped back")


def test_class_state_dict_carries_the_averages(rng):
    start = random_arrays([(3, 2), (4,)], np.float64, rng)
    runs = []
    for reload in (False, True):
        params = [p.copy() for p in start]
        opt = fo.AdamW(params, lr=0.1, ema_decay=0.8)
        r = np.random.default_rng(5)
        opt.step(_grads(r, params))
        opt.step(_grads(r, params))
        if reload:
            sd = opt.state_dict()
            assert all("ema" in s for s in sd["state"].values())
            opt = fo.AdamW(params, lr=0.1, ema_decay=0.8)
            opt.load_state_dict(sd)
        opt.step(_grads(r, params))
        runs.append([opt.state[i]["ema"].copy() for i in range(2)] + params)
    for a, b in zip(*runs):
        assert_same_bits(a, b, "after reload")
    bad = fo.AdamW([p.copy() for p in start], lr=0.1).state_dict()
    bad["state"] = {0: dict(sd["state"][0], ema=np.zeros(5))}
    with pytest.raises(ValueError, match="ema of param 0 has shape"):
        fo.AdamW([p.copy() for p in start], lr=0.1).load_state_dict(bad)


def test_invalid_ema_decay_is_torchs_message():
    with pytest.raises(ValueError) as theirs:
        swa.get_ema_multi_avg_fn(-0.1)
    with pytest.raises(ValueError) as mine:
        fo.SGD([np.zeros(2)], ema_decay=-0.1)
    assert str(mine.value) == str(theirs.value)
    with pytest.raises(ValueError) as mine:
        fot.Adam([torch.zeros(2, requires_grad=True)], ema_decay=-0.1)
    assert str(mine.value) == str(theirs.value)


# --- fusedopt.torch ----------------------------------------------------------------------


def make_model():
    torch.manual_seed(3)
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(),
                               torch.nn.Linear(8, 2)).double()


def train(model, opt, steps, averaged=None, freeze_every=3):
    """Steps of an MLP; every `freeze_every`-th step the first layer gets no gradient."""
    g = torch.Generator().manual_seed(7)
    x = torch.randn(32, 6, generator=g, dtype=torch.float64)
    y = torch.randn(32, 2, generator=g, dtype=torch.float64)
    for k in range(steps):
        opt.zero_grad()
        ((model(x) - y) ** 2).mean().backward()
        if k % freeze_every == 1:
            model[0].weight.grad = None
            model[0].bias.grad = None
        opt.step()
        if averaged is not None:
            averaged.update_parameters(model)


@pytest.mark.parametrize("name,opts", [("Adam", dict(lr=0.01)),
                                       ("SGD", dict(lr=0.05, momentum=0.9)),
                                       ("RMSprop", dict(lr=1e-3, centered=True))])
def test_torch_class_with_ema_is_step_then_averaged_model(name, opts):
    mine, plain = make_model(), make_model()
    opt = getattr(fot, name)(mine.parameters(), ema_decay=0.95, **opts)
    ref = getattr(fot, name)(plain.parameters(), **opts)
    averaged = swa.AveragedModel(plain, multi_avg_fn=swa.get_ema_multi_avg_fn(0.95))
    train(mine, opt, 12)
    train(plain, ref, 12, averaged)
    for p, q, a in zip(mine.parameters(), plain.parameters(), averaged.module.parameters()):
        assert torch.equal(p, q)
        assert torch.equal(opt.state[p]["ema"], a.detach())
        assert not torch.equal(a, q)  # the averages differ from the params
    # and against torch.optim with the same AveragedModel: the same within rounding
    theirs = make_model()
    topt = getattr(torch.optim, name)(theirs.parameters(), **opts)
    tavg = swa.AveragedModel(theirs, multi_avg_fn=swa.get_ema_multi_avg_fn(0.95))
    train(theirs, topt, 12, tavg)
    for p, a in zip(mine.parameters(), tavg.module.parameters()):
        np.testing.assert_allclose(opt.state[p]["ema"].numpy(), a.detach().numpy(),
                                   rtol=1e-9, atol=1e-12)


def test_torch_swap_state_dict_and_torch_optim_loading():
    model = make_model()
    opt = fot.Adam(model.parameters(), lr=0.01, ema_decay=0.9)
    train(model, opt, 5)
    weights = [p.detach().clone() for p in model.parameters()]
    averages = [opt.state[p]["ema"].clone() for p in model.parameters()]
    with opt.averaged():
        for p, a, w in zip(model.parameters(), averages, weights):
            assert torch.equal(p.detach(), a) and not torch.equal(a, w)
        with pytest.raises(RuntimeError, match="swapped"):
            opt.step()
    for p, w, a in zip(model.parameters(), weights, averages):
        assert torch.equal(p.detach(), w)
        assert torch.equal(opt.state[p]["ema"], a)
    sd = copy.deepcopy(opt.state_dict())
    assert all("ema" in s for s in sd["state"].values())
    # a fresh fusedopt optimizer continues with the averages; torch.optim ignores them
    other_model = make_model()
    other_model.load_state_dict(model.state_dict())
    other = fot.Adam(other_model.parameters(), lr=0.01, ema_decay=0.9)
    other.load_state_dict(copy.deepcopy(sd))
    train(model, opt, 3)
    train(other_model, other, 3)
    for p, q in zip(model.parameters(), other_model.parameters()):
        assert torch.equal(p, q)
        assert torch.equal(opt.state[p]["ema"], other.state[q]["ema"])
    tmodel = make_model()
    topt = torch.optim.Adam(tmodel.parameters(), lr=0.01)
    topt.load_state_dict(copy.deepcopy(sd))
    train(tmodel, topt, 1)


def test_an_average_replaced_by_assignment_is_the_one_moved(rng):
    """The plan a class keeps between steps holds the averages' addresses: an average
    replaced in the state (NumPy class, fusedopt.torch) is the one the next step moves."""
    params = random_arrays([(3, 2), (4,)], np.float64, rng)
    opt = fo.Adam(params, lr=0.1, ema_decay=0.5)
    for _ in range(3):
        opt.step(_grads(rng, params))
    new = np.full((4,), 2.0)
    old = opt.state[1]["ema"]
    kept = old.copy()
    opt.state[1]["ema"] = new
    opt.step(_grads(rng, params))
    expected = np.full((4,), 2.0)
    torch_ema([expected], [params[1]], 0.5)
    assert_same_bits(new, expected, "the new average moved")
    assert_same_bits(old, kept, "the old one did not")

    model = make_model()
    topt = fot.Adam(model.parameters(), lr=0.01, ema_decay=0.5)
    train(model, topt, 3, freeze_every=1000)
    p = model[2].bias
    replaced = torch.full_like(p, 2.0)
    old = topt.state[p]["ema"]
    kept = old.clone()
    topt.state[p]["ema"] = replaced
    train(model, topt, 1, freeze_every=1000)
    expected = torch.full_like(p, 2.0)
    swa.get_ema_multi_avg_fn(0.5)([expected], [p.detach()], None)
    assert torch.equal(replaced, expected)
    assert torch.equal(old, kept)


def test_a_copy_keeps_the_ema_settings():
    model = make_model()
    opt = fot.AdamW(model.parameters(), lr=0.01, ema_decay=0.9)
    train(model, opt, 2)
    clone = copy.deepcopy(opt)
    assert clone.ema_decay == 0.9
    clone_model = copy.deepcopy(model)
    clone = fot.AdamW(clone_model.parameters(), lr=0.01, ema_decay=0.9)
    clone.load_state_dict(copy.deepcopy(opt.state_dict()))
    fo_copy = copy.deepcopy(fo.Adam([np.zeros(3)], ema_decay=0.7))
    assert fo_copy.ema_decay == 0.7


# --- no EMA slot next to 8-bit state ---------------------------------------------------------


def test_ema_is_refused_with_8bit_state(rng):
    """The 8-bit kernels have no EMA slot: every layer refuses the combination with a
    clear error and leaves the arrays as they were."""
    from fusedopt import _arrays, _cpu

    n = 300
    p, g = [np.ones(n, np.float32)], [np.full(n, 0.5, np.float32)]
    e = [np.zeros(n, np.float32)]
    m, v = [np.zeros(n, np.uint8)], [np.zeros(n, np.uint8)]
    scales = [[np.zeros(2, np.float32)], [np.zeros(2, np.float32)]]
    kw = dict(step=1, lr=0.1, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0,
              amsgrad=False, maximize=False)
    with pytest.raises(ValueError, match=r"ema and 8-bit state \(absmax\) do not go together"):
        F.adam_(p, g, m, v, ema=e, ema_decay=0.5, absmax=scales, **kw)
    with pytest.raises(ValueError, match=r"no EMA of the params with 8-bit state"):
        _arrays.prepare("adam_", p, g, [m, v], ["exp_avgs", "exp_avg_sqs"], ema=(e, "ema"),
                        scales=scales)
    ptrs = np.array([a[0].ctypes.data for a in (p, g, m, v, e, *scales)], np.uint64)
    with pytest.raises(ValueError, match="adam: no EMA slot with 8-bit state"):
        _cpu.step("adam", 0, ptrs, np.array([n], np.int64), np.zeros(_cpu.hyper_size("adam")),
                  state_dtype=4, extra=4, ema_decay=0.5)
    np.testing.assert_array_equal(p[0], 1.0)
    np.testing.assert_array_equal(e[0], 0.0)
    assert not m[0].any() and not v[0].any() and not scales[0][0].any()
    with pytest.raises(ValueError, match=r"ema_decay does not go with 8-bit state"):
        fo.Adam([np.ones(5000, np.float32)], lr=0.1, ema_decay=0.9,
                precision=fo.Precision(state_dtype="int8"))


def test_torch_ema_is_refused_with_8bit_state():
    torch = pytest.importorskip("torch")
    import fusedopt.torch as fot

    model = torch.nn.Linear(100, 50)
    with pytest.raises(ValueError, match=r"Adam\(optim_bits=8\): ema_decay does not go with "
                                         "8-bit state"):
        fot.Adam(model.parameters(), lr=0.1, ema_decay=0.9, optim_bits=8)
    fot.Adam(model.parameters(), lr=0.1, ema_decay=0.9)  # either one alone is fine
    fot.Adam(model.parameters(), lr=0.1, optim_bits=8)
