"""fusedopt.torch against torch.optim: the same training run, step by step.

A small MLP in float64 on generated data is trained with torch.optim.X and with
fusedopt.torch.X from the same start. Both compute in double; they differ only in
how operations are grouped, which stays far below rtol 1e-9 over 50 steps. The
tests also cover what a user switching the import relies on: state dicts in both
directions, param groups, zero_grad, LR schedulers, closures, params that have no
gradient in some steps, and torch's errors for bad hyperparameters.
"""

from __future__ import annotations

import copy
import io

import numpy as np
import pytest

torch = pytest.importorskip("torch")
fot = pytest.importorskip("fusedopt.torch")

from cases import CASES as TABLE  # noqa: E402
from cases import INVALID  # noqa: E402

STEPS = 50
RTOL, ATOL = 1e-9, 1e-12

# Options for 50 steps of training: the classic family's chosen here (rates that keep a
# maximizing run from blowing up), every other algorithm's from the cases of the table
# (tests/cases.py) whose algorithm torch.optim has.
OPTIONS = {
    "SGD": [dict(lr=0.05), dict(lr=0.05, momentum=0.9), dict(lr=0.05, momentum=0.9, nesterov=True,
                                                              weight_decay=0.01),
            dict(lr=0.01, momentum=0.5, dampening=0.3, maximize=True)],
    "Adagrad": [dict(), dict(lr=0.05, lr_decay=0.01, weight_decay=0.01,
                             initial_accumulator_value=0.1), dict(maximize=True, eps=1e-6)],
    "RMSprop": [dict(lr=1e-3), dict(lr=1e-3, centered=True), dict(lr=1e-3, momentum=0.9),
                dict(lr=1e-3, centered=True, momentum=0.5, weight_decay=0.01, alpha=0.9),
                dict(lr=1e-3, maximize=True)],
    "Adadelta": [dict(), dict(lr=0.5, rho=0.5, weight_decay=0.01), dict(maximize=True, eps=1e-5)],
    "Adam": [dict(lr=0.01), dict(lr=0.01, amsgrad=True), dict(lr=0.01, weight_decay=0.01,
                                                               betas=(0.8, 0.99)),
             dict(lr=0.01, maximize=True, eps=1e-6)],
    "AdamW": [dict(lr=0.01), dict(lr=0.01, amsgrad=True, weight_decay=0.1),
              dict(lr=0.01, maximize=True)],
}
for _c in TABLE:
    _name = _c.algo.cls.__name__
    if hasattr(torch.optim, _name) and _name not in ("SGD", "Adagrad", "RMSprop", "Adadelta",
                                                      "Adam", "AdamW"):
        OPTIONS.setdefault(_name, []).append(dict(_c.overrides))
CASES = [(name, opts) for name, variants in OPTIONS.items() for opts in variants]


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny tensors: one thread each for torch and fusedopt, so that two thread pools
    do not wait on each other's spinning threads on a small machine."""
    import fusedopt

    before = torch.get_num_threads(), fusedopt.get_num_threads()
    torch.set_num_threads(1)
    fusedopt.set_num_threads(1)
    yield
    torch.set_num_threads(before[0])
    fusedopt.set_num_threads(before[1])


def case_id(c):
    name, opts = c
    return name + "".join(f"-{k}={v}" for k, v in opts.items())


def make_data(dtype=torch.float64):
    g = torch.Generator().manual_seed(7)
    x = torch.randn(32, 6, generator=g, dtype=dtype)
    y = torch.randn(32, 2, generator=g, dtype=dtype)
    return x, y


def make_model(dtype=torch.float64):
    torch.manual_seed(3)
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(),
                               torch.nn.Linear(8, 2)).to(dtype)


def loss_of(model, x, y):
    return ((model(x) - y) ** 2).mean()


def train(model, opt, steps, data, scheduler=None):
    x, y = data
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = loss_of(model, x, y)
        loss.backward()
        opt.step()
        if scheduler is not None:
            scheduler.step()
        losses.append(loss.item())
    return losses


def assert_close(a, b, what):
    np.testing.assert_allclose(a.detach().numpy(), b.detach().numpy(), rtol=RTOL, atol=ATOL,
                               err_msg=what)


def assert_models_close(m1, m2, what):
    for i, (a, b) in enumerate(zip(m1.parameters(), m2.parameters())):
        assert_close(a, b, f"{what}: param {i}")


def assert_states_close(s1, s2, what, dtypes=True):
    assert sorted(s1["state"]) == sorted(s2["state"]), what
    for k in s1["state"]:
        a, b = s1["state"][k], s2["state"][k]
        assert sorted(a) == sorted(b), f"{what}: state names of param {k}"
        for name in a:
            if a[name] is None or b[name] is None:
                assert a[name] is None and b[name] is None, f"{what}: {name} of param {k}"
                continue
            if dtypes:
                assert a[name].dtype == b[name].dtype, f"{what}: dtype of {name} of param {k}"
            assert a[name].shape == b[name].shape, f"{what}: shape of {name} of param {k}"
            assert_close(a[name], b[name], f"{what}: {name} of param {k}")
    g1 = [{k: v for k, v in g.items()} for g in s1["param_groups"]]
    g2 = [{k: v for k, v in g.items()} for g in s2["param_groups"]]
    assert g1 == g2, what


def both(name, opts, params_of=lambda m: m.parameters()):
    """(torch model, torch optimizer), (fusedopt model, fusedopt optimizer) from one start."""
    tm, fm = make_model(), make_model()
    topt = getattr(torch.optim, name)(params_of(tm), **opts)
    fopt = getattr(fot, name)(params_of(fm), **opts)
    return (tm, topt), (fm, fopt)


@pytest.mark.parametrize("c", CASES, ids=case_id)
def test_training_matches_torch(c):
    name, opts = c
    data = make_data()
    (tm, topt), (fm, fopt) = both(name, opts)
    start = [p.detach().clone() for p in fm.parameters()]
    tl = train(tm, topt, STEPS, data)
    fl = train(fm, fopt, STEPS, data)
    np.testing.assert_allclose(fl, tl, rtol=RTOL, atol=ATOL)
    assert_models_close(fm, tm, name)
    assert_states_close(fopt.state_dict(), topt.state_dict(), name)
    moved = max((p.detach() - s).abs().max().item() for p, s in zip(fm.parameters(), start))
    assert moved > 1e-4  # the comparison means something only if training moved the params


@pytest.mark.parametrize("c", CASES, ids=case_id)
@pytest.mark.parametrize("direction", ["torch_to_fusedopt", "fusedopt_to_torch"])
def test_state_dict_crosses_over(c, direction):
    """Train 20 steps with one, load its state dict into the other, train 20 more on
    both: the same as the first library resuming from its own state dict (a twin),
    dtypes included, and the same values as an uninterrupted run. (torch's
    load_state_dict gives per-param scalars other than `step`, such as NAdam's
    mu_product, the param's dtype; a resumed run keeps them in that dtype.)"""
    name, opts = c
    data = make_data()
    (tm, topt), (fm, fopt) = both(name, opts)
    first, second = (tm, topt), (fm, fopt)
    if direction == "fusedopt_to_torch":
        first, second = second, first
    twin_model = make_model()
    twin = (twin_model, type(first[1])(twin_model.parameters(), **opts))
    train(*first, 20, data)
    for model, opt in (second, twin):
        model.load_state_dict(first[0].state_dict())
        # a copy, as torch.load gives: loading keeps tensors that already match the params
        opt.load_state_dict(copy.deepcopy(first[1].state_dict()))
    assert_states_close(second[1].state_dict(), twin[1].state_dict(), "after load")
    assert_states_close(second[1].state_dict(), first[1].state_dict(), "after load",
                        dtypes=False)
    for run in (first, second, twin):
        train(*run, 20, data)
    assert_models_close(second[0], twin[0], direction)
    assert_states_close(second[1].state_dict(), twin[1].state_dict(), direction)
    assert_models_close(second[0], first[0], direction + ", against the uninterrupted run")
    assert_states_close(second[1].state_dict(), first[1].state_dict(),
                        direction + ", against the uninterrupted run", dtypes=False)


@pytest.mark.parametrize("name", list(OPTIONS))
def test_state_dict_survives_torch_save(name):
    """A fusedopt state dict written with torch.save loads into torch.optim, which goes
    on as fusedopt resuming from the same file."""
    opts = OPTIONS[name][1]
    data = make_data()
    (tm, topt), (fm, fopt) = both(name, opts)
    train(fm, fopt, 5, data)
    buf = io.BytesIO()
    torch.save(fopt.state_dict(), buf)
    tm.load_state_dict(fm.state_dict())
    for opt in (topt, fopt):
        buf.seek(0)
        opt.load_state_dict(torch.load(buf))
    train(fm, fopt, 5, data)
    train(tm, topt, 5, data)
    assert_models_close(fm, tm, name)


def test_state_layout_is_torchs():
    data = make_data()
    (tm, topt), (fm, fopt) = both("Adam", dict(lr=0.01, amsgrad=True))
    train(tm, topt, 3, data)
    train(fm, fopt, 3, data)
    for p in fm.parameters():
        state = fopt.state[p]
        assert sorted(state) == ["exp_avg", "exp_avg_sq", "max_exp_avg_sq", "step"]
        step = state["step"]
        assert isinstance(step, torch.Tensor) and step.dim() == 0
        assert step.dtype == torch.float32 and step.item() == 3.0
        assert state["exp_avg"].dtype == p.dtype and state["exp_avg"].device == p.device
    assert fopt.param_groups[0].keys() == topt.param_groups[0].keys()


def test_step_dtype_follows_default_dtype():
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        data = make_data()
        (tm, topt), (fm, fopt) = both("Adam", {})
        train(tm, topt, 2, data)
        train(fm, fopt, 2, data)
    finally:
        torch.set_default_dtype(before)
    p = next(fm.parameters())
    assert fopt.state[p]["step"].dtype == topt.state[next(tm.parameters())]["step"].dtype
    assert fopt.state[p]["step"].dtype == torch.float64


def test_load_casts_state_to_param_dtype():
    """torch's rule: loaded state takes the param's dtype and device."""
    data32 = make_data(torch.float32)
    m32 = make_model(torch.float32)
    opt32 = fot.Adam(m32.parameters(), lr=0.01)
    train(m32, opt32, 3, data32)
    m64 = make_model()
    opt64 = fot.Adam(m64.parameters(), lr=0.01)
    opt64.load_state_dict(opt32.state_dict())
    for p in m64.parameters():
        assert opt64.state[p]["exp_avg"].dtype == torch.float64
        assert opt64.state[p]["step"].item() == 3.0
    train(m64, opt64, 3, make_data())
    assert all(opt64.state[p]["step"].item() == 6.0 for p in m64.parameters())


def test_param_groups_with_different_lr():
    def groups(m):
        return [{"params": m[0].parameters()},
                {"params": m[2].parameters(), "lr": 0.001, "weight_decay": 0.1}]

    data = make_data()
    (tm, topt), (fm, fopt) = both("Adam", dict(lr=0.02), params_of=groups)
    tl = train(tm, topt, STEPS, data)
    fl = train(fm, fopt, STEPS, data)
    np.testing.assert_allclose(fl, tl, rtol=RTOL, atol=ATOL)
    assert_models_close(fm, tm, "groups")
    assert_states_close(fopt.state_dict(), topt.state_dict(), "groups")
    assert [g["lr"] for g in fopt.param_groups] == [0.02, 0.001]


def test_add_param_group_later():
    data = make_data()
    tm, fm = make_model(), make_model()
    topt = torch.optim.SGD(tm[0].parameters(), lr=0.05, momentum=0.9)
    fopt = fot.SGD(fm[0].parameters(), lr=0.05, momentum=0.9)
    train(tm, topt, 5, data)
    train(fm, fopt, 5, data)
    topt.add_param_group({"params": tm[2].parameters(), "lr": 0.01})
    fopt.add_param_group({"params": fm[2].parameters(), "lr": 0.01})
    train(tm, topt, 10, data)
    train(fm, fopt, 10, data)
    assert_models_close(fm, tm, "added group")
    assert_states_close(fopt.state_dict(), topt.state_dict(), "added group")


@pytest.mark.parametrize("c", [("Adam", dict(lr=0.01)), ("SGD", dict(lr=0.05, momentum=0.9)),
                               ("Adagrad", dict(lr_decay=0.1)), ("RMSprop", dict(centered=True))],
                         ids=case_id)
def test_params_without_grad_in_some_steps(c):
    """A layer frozen for a while: its params skip steps (no state, no count), so the
    params of one group reach different step counts, and SGD makes some momentum
    buffers while others exist."""
    name, opts = c
    x, y = make_data()
    (tm, topt), (fm, fopt) = both(name, opts)
    for t in range(30):
        for model, opt in ((tm, topt), (fm, fopt)):
            opt.zero_grad()
            model[2].bias.requires_grad_(t >= 10)
            model[0].weight.requires_grad_(t % 3 != 0)
            loss_of(model, x, y).backward()
            opt.step()
    assert_models_close(fm, tm, name)
    assert_states_close(fopt.state_dict(), topt.state_dict(), name)


def test_zero_grad():
    x, y = make_data()
    fm = make_model()
    opt = fot.Adam(fm.parameters())
    loss_of(fm, x, y).backward()
    opt.zero_grad(set_to_none=False)
    assert all(p.grad is not None and not p.grad.any() for p in fm.parameters())
    opt.zero_grad()
    assert all(p.grad is None for p in fm.parameters())
    before = [p.detach().clone() for p in fm.parameters()]
    assert opt.step() is None  # no gradients: nothing to do, no state made
    assert all(torch.equal(a, b) for a, b in zip(before, fm.parameters()))
    assert len(opt.state) == 0


@pytest.mark.parametrize("sched", ["StepLR", "CosineAnnealingLR"])
def test_lr_scheduler(sched):
    make = {"StepLR": lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=7, gamma=0.5),
            "CosineAnnealingLR": lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, 20)}[sched]
    data = make_data()
    (tm, topt), (fm, fopt) = both("Adam", dict(lr=0.05))
    ts, fs = make(topt), make(fopt)
    tlrs, flrs = [], []
    for _ in range(30):
        train(tm, topt, 1, data, ts)
        train(fm, fopt, 1, data, fs)
        tlrs.append(ts.get_last_lr())
        flrs.append(fs.get_last_lr())
    assert flrs == tlrs
    assert len({lr[0] for lr in flrs}) > 3
    assert_models_close(fm, tm, sched)


def test_step_with_closure_returns_loss():
    x, y = make_data()
    fm = make_model()
    opt = fot.SGD(fm.parameters(), lr=0.1)
    calls = []

    def closure():
        opt.zero_grad()
        loss = loss_of(fm, x, y)
        assert torch.is_grad_enabled()
        loss.backward()
        calls.append(loss.item())
        return loss

    with torch.no_grad():
        loss = opt.step(closure)
    assert isinstance(loss, torch.Tensor) and loss.item() == calls[0]
    assert opt.step(closure).item() < calls[0]


def test_update_is_in_place_and_visible_to_autograd():
    x, y = make_data()
    fm = make_model()
    opt = fot.Adam(fm.parameters(), lr=0.01)
    ptrs = [p.data_ptr() for p in fm.parameters()]
    versions = [p._version for p in fm.parameters()]
    train(fm, opt, 2, (x, y))
    assert [p.data_ptr() for p in fm.parameters()] == ptrs
    assert all(p._version > v for p, v in zip(fm.parameters(), versions))
    assert all(p.requires_grad and p.is_leaf for p in fm.parameters())


@pytest.mark.parametrize("name, kwargs", [(c, k) for c, k in INVALID
                                          if hasattr(torch.optim, c)],
                         ids=lambda v: v if isinstance(v, str) else "-".join(map(str, v)))
def test_bad_hyperparameters_like_torch(name, kwargs):
    """torch.optim's refusal, word for word."""
    params = [torch.nn.Parameter(torch.zeros(3))]
    with pytest.raises(ValueError) as theirs:
        getattr(torch.optim, name)(params, **kwargs)
    with pytest.raises(ValueError) as ours:
        getattr(fot, name)(params, **kwargs)
    assert str(ours.value) == str(theirs.value)


def test_unsupported_options_are_refused():
    params = [torch.nn.Parameter(torch.zeros(3))]
    with pytest.raises(ValueError, match="capturable"):
        fot.Adam(params, capturable=True)
    with pytest.raises(ValueError, match="differentiable"):
        fot.SGD(params, differentiable=True)
    with pytest.raises(ValueError, match="empty parameter list"):
        fot.Adam([])
    with pytest.raises(ValueError, match="more than one parameter group"):
        fot.Adam([{"params": params}, {"params": params}])


def test_bad_params_raise_and_write_nothing():
    p_ok = torch.nn.Parameter(torch.ones(4, dtype=torch.float64))
    p_t = torch.nn.Parameter(torch.ones(3, 5, dtype=torch.float64).t())  # not contiguous
    opt = fot.Adam([{"params": [p_ok]}, {"params": [p_t]}], lr=0.1)
    p_ok.grad = torch.ones_like(p_ok)
    p_t.grad = torch.ones_like(p_t)
    with pytest.raises(ValueError, match="not C-contiguous"):
        opt.step()
    assert torch.equal(p_ok.detach(), torch.ones(4, dtype=torch.float64))  # group 0 untouched

    cx = torch.nn.Parameter(torch.ones(4, dtype=torch.complex64))
    cx.grad = torch.ones_like(cx)
    with pytest.raises(TypeError, match="complex64"):
        fot.SGD([cx], lr=0.1).step()
    assert torch.equal(cx.detach(), torch.ones(4, dtype=torch.complex64))


def test_float32_model_close_to_torch():
    data = make_data(torch.float32)
    tm, fm = make_model(torch.float32), make_model(torch.float32)
    topt = torch.optim.AdamW(tm.parameters(), lr=0.01)
    fopt = fot.AdamW(fm.parameters(), lr=0.01)
    train(tm, topt, 20, data)
    train(fm, fopt, 20, data)
    for a, b in zip(fm.parameters(), tm.parameters()):
        np.testing.assert_allclose(a.detach().numpy(), b.detach().numpy(), rtol=1e-4, atol=1e-6)


def test_deepcopy_and_repr():
    fm = make_model()
    opt = fot.RMSprop(fm.parameters(), lr=0.01, momentum=0.5)
    train(fm, opt, 2, make_data())
    clone = copy.deepcopy(opt)
    assert "RMSprop" in repr(opt) and "momentum: 0.5" in repr(opt)
    assert clone.state_dict()["param_groups"] == opt.state_dict()["param_groups"]


# fusedopt.torch's own keyword-only arguments, after torch's (ns_dtype: Muon's
# Newton-Schulz iterations in float32 instead of bfloat16)
FUSEDOPT_ONLY = ("ns_dtype", "flat", "ema_decay", "optim_bits", "min_8bit_size")


@pytest.mark.parametrize("name", [n for n in fot.__all__ if hasattr(torch.optim, n)])
def test_constructor_signature_is_torchs(name):
    """Same argument names, order, kinds and defaults: switching the import is enough
    (fusedopt's own keyword-only arguments, ``flat``, ``ema_decay`` and Muon's
    ``ns_dtype``, come after torch's)."""
    import inspect

    def shape(cls):
        return [(p.name, p.kind, p.default) for p in
                inspect.signature(cls.__init__).parameters.values()]

    ours = shape(getattr(fot, name))
    extra = [p for p in ours if p[0] in FUSEDOPT_ONLY]
    assert all(p[1] is inspect.Parameter.KEYWORD_ONLY for p in extra)
    assert ours[len(ours) - len(extra):] == extra
    assert ours[:len(ours) - len(extra)] == shape(getattr(torch.optim, name))


@pytest.mark.parametrize("name", ["Adagrad", "Adam", "SGD"])
def test_a_state_dict_replaced_whole_is_used(name):
    """Replacing a param's whole state dict (what ZeroRedundancyOptimizer.load_state_dict
    does with the local optimizer) takes effect at the next step, as in torch.optim, even
    when the state existed before (Adagrad makes it at construction)."""
    options = dict(OPTIONS[name][1])
    data = make_data()
    source = make_model()
    source_opt = torch.optim.__dict__[name](source.parameters(), **options)
    train(source, source_opt, 5, data)
    runs = []
    for module in (torch.optim, fot):
        model = make_model()
        opt = module.__dict__[name](model.parameters(), **options)
        train(model, opt, 2, data)
        model.load_state_dict(source.state_dict())
        for p, q in zip(model.parameters(), source.parameters()):
            opt.state[p] = copy.deepcopy(source_opt.state[q])
        runs.append(train(model, opt, 5, data))
    np.testing.assert_allclose(runs[1], runs[0], rtol=RTOL, atol=ATOL)


def test_step_hooks_and_profiler_range_as_torchs():
    """Step pre- and post-hooks (the optimizer's and the global ones) run in torch's order,
    a pre-hook may replace the arguments, and a profiler sees the step's range under
    torch's name."""
    from torch.optim.optimizer import (register_optimizer_step_post_hook,
                                       register_optimizer_step_pre_hook)

    def run(module):
        events = []
        model = make_model()
        opt = module.AdamW(model.parameters(), lr=0.01)
        x, y = make_data()

        def closure():
            events.append("closure")
            opt.zero_grad()
            loss = loss_of(model, x, y)
            loss.backward()
            return loss.detach()

        def pre(o, args, kwargs):
            events.append(("pre", type(o).__name__, len(args), sorted(kwargs)))
            return (o,), {"closure": closure}  # the step runs with the closure given here

        handles = [
            register_optimizer_step_pre_hook(lambda o, a, k: events.append("global pre")),
            register_optimizer_step_post_hook(lambda o, a, k: events.append("global post")),
            opt.register_step_pre_hook(pre),
            opt.register_step_post_hook(
                lambda o, a, k: events.append(("post", sorted(k)))),
        ]
        try:
            losses = [float(opt.step()) for _ in range(3)]
        finally:
            for h in handles:
                h.remove()
        losses.append(float(opt.step(closure)))  # hooks removed: the plain path
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            opt.step(closure)
        names = {e.key for e in prof.key_averages()}
        assert f"Optimizer.step#{type(opt).__name__}.step" in names
        return events, losses, [p.detach().clone() for p in model.parameters()]

    theirs, ours = run(torch.optim), run(fot)
    assert ours[0] == theirs[0]
    assert ours[0].count("closure") == 5 and ours[0][0] == "global pre"
    np.testing.assert_allclose(ours[1], theirs[1], rtol=RTOL, atol=ATOL)
    for a, b in zip(ours[2], theirs[2]):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=RTOL, atol=ATOL)
