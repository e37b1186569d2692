"""The steady-state replay of the optimizer classes (`Optimizer._replay_step`,
`fusedopt.torch`'s `_fo_replay_step`): a step whose groups, hyperparameters, params and
state are the last step's runs only what changes between steps. Whatever changes
between two steps must be seen: each case below changes one thing between steps and
checks that the run equals, bit for bit (params, state, errors), the same run with the
replay turned off, which plans every step from scratch; and that the replay did run."""

from __future__ import annotations

import copy
from collections import defaultdict

import numpy as np
import pytest

import fusedopt as fo
from fusedopt.optimizer import Optimizer

SHAPES = [(6, 5), (5,), (3, 6), (3,)]
STEPS = 6
CHANGE_AT = 3


def _grads(rng, shapes):
    return [rng.standard_normal(s) for s in shapes]


# --- NumPy classes -------------------------------------------------------------------------------


def _np_change(name, opt, params, grads, rng):
    """Change one thing between steps; returns the grads of the next step."""
    group = opt.param_groups[0]
    if name == "lr":
        group["lr"] = 0.05
    elif name == "betas":
        group["betas"] = (0.5, 0.9)
    elif name == "betas list changed in place":
        betas = group["betas"]
        betas[0] = 0.5
    elif name == "param replaced in the list":
        group["params"][1] = params[1].copy()
    elif name == "param reshaped in place":
        group["params"][0].shape = (5, 6)
    elif name == "state array replaced":
        opt.state[0]["exp_avg"] = opt.state[0]["exp_avg"] + 1.0
    elif name == "state dict replaced":
        opt.state[2] = copy.deepcopy(opt.state[2])
    elif name == "state scalar changed":
        opt.state[1]["step"] = 10.0
    elif name == "state entry deleted and set again":
        value = opt.state[0].pop("exp_avg_sq")
        opt.state[0]["exp_avg_sq"] = value * 3
    elif name == "state entries updated":
        opt.state[1].update(exp_avg=opt.state[1]["exp_avg"] * 2)
    elif name == "state assigned whole":
        state = {k: dict(v) for k, v in opt.state.items()}
        state[3]["exp_avg_sq"] = state[3]["exp_avg_sq"] * 2
        opt.state = state
    elif name == "state dict replaced, then its entry":
        opt.state[2] = dict(opt.state[2])
        opt.state[2]["exp_avg"] = opt.state[2]["exp_avg"] - 1.0
    elif name == "a gradient is None":
        grads = list(grads)
        grads[2] = None
    elif name == "a gradient has the wrong shape":
        grads = list(grads)
        grads[3] = np.ones(7)
    elif name == "group added":
        opt.add_param_group({"params": [np.ones(4)], "lr": 0.2})
        grads = list(grads) + [np.full(4, 0.5)]
    elif name == "state loaded":
        other = fo.Adam([p.copy() for p in params], lr=0.01)
        other.step([g * 2 for g in grads])
        opt.load_state_dict(other.state_dict())
    elif name == "params group key added":
        group["weight_decay"] = 0.1
    elif name == "nothing":
        pass
    else:
        raise AssertionError(name)
    return grads


NP_CHANGES = ["nothing", "lr", "betas", "betas list changed in place",
              "param replaced in the list", "param reshaped in place", "state array replaced",
              "state dict replaced", "state scalar changed",
              "state entry deleted and set again", "state entries updated",
              "state assigned whole", "state dict replaced, then its entry", "a gradient is None",
              "a gradient has the wrong shape", "group added", "state loaded",
              "params group key added"]


def _np_run(change, replay, monkeypatch):
    rng = np.random.default_rng(7)
    params = [rng.standard_normal(s) for s in SHAPES]
    opt = fo.Adam(params, lr=0.01)
    if "list" in change:  # a mutable hyperparameter: nothing to compare, no replay
        opt.param_groups[0]["betas"] = [0.9, 0.999]
    replayed = []
    real = Optimizer._replay_step

    def counted(self, grads):
        done = replay and real(self, grads)
        replayed.append(done)
        return done

    monkeypatch.setattr(Optimizer, "_replay_step", counted)
    outcome = []
    for step in range(STEPS):
        grads = _grads(rng, SHAPES)
        if step == CHANGE_AT:
            grads = _np_change(change, opt, params, grads, rng)
        try:
            opt.step(grads)
            outcome.append(None)
        except (ValueError, TypeError) as e:
            outcome.append(str(e))
    arrays = [p.copy() for g in opt.param_groups for p in g["params"]]
    state = {i: {k: np.array(v, copy=True) for k, v in st.items()}
             for i, st in opt.state.items()}
    return arrays, state, outcome, replayed


def _assert_same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.parametrize("change", NP_CHANGES)
def test_numpy_class_replay_sees_every_change(change, monkeypatch):
    p1, s1, out1, used = _np_run(change, True, monkeypatch)
    p0, s0, out0, _ = _np_run(change, False, monkeypatch)
    assert out1 == out0
    _assert_same(p1, p0)
    assert s1.keys() == s0.keys()
    for i in s0:
        assert s1[i].keys() == s0[i].keys()
        _assert_same(list(s1[i].values()), list(s0[i].values()))
    # the replay ran in the steady steps before the change (never with a list among the
    # hyperparameters, which could change in place unseen)
    assert any(used[:CHANGE_AT]) == ("list" not in change), used


def test_numpy_class_replay_equals_the_reference():
    """Over steady steps (every one after the first replayed) the class still equals the
    float64 reference."""
    from fusedopt import reference

    rng = np.random.default_rng(3)
    params = [rng.standard_normal(s) for s in SHAPES]
    ref = [p.copy() for p in params]
    states = [[np.zeros_like(p) for p in params] for _ in range(2)]
    opt = fo.AdamW(params, lr=0.02, weight_decay=0.1)
    for t in range(1, 9):
        grads = _grads(rng, SHAPES)
        opt.step(grads)
        ref, *states = reference.adamw(ref, grads, *states, step=t, lr=0.02, beta1=0.9,
                                       beta2=0.999, eps=1e-8, weight_decay=0.1)
        assert (opt._replay is not None) == (t > 1)  # (the first step makes the state)
    for a, b in zip(params, ref):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-15)


def test_numpy_state_saves_as_plain_dicts_and_a_copy_replays():
    """The NumPy classes' state counts its writes (`_engine.StateDict`), but pickles and
    copies as plain dicts; a copy of the optimizer tracks its own state and replays its
    steps, which equal the original's."""
    import pickle

    rng = np.random.default_rng(5)
    params = [rng.standard_normal(s) for s in SHAPES]
    opt = fo.Adam(params, lr=0.01)
    opt.step(_grads(rng, SHAPES))
    saved = pickle.loads(pickle.dumps(opt.state))
    assert type(saved) is dict and all(type(st) is dict for st in saved.values())
    assert all(type(st) is dict for st in copy.deepcopy(opt.state_dict())["state"].values())
    clone = copy.deepcopy(opt)
    assert all(type(st).__name__ == "StateDict" for st in clone.state.values())
    for _ in range(4):
        grads = _grads(rng, SHAPES)
        opt.step(grads)
        clone.step(grads)
    assert clone._replay is not None and opt._replay is not None
    mine = [p for g in clone.param_groups for p in g["params"]]
    _assert_same(mine, params)
    for i in opt.state:
        assert clone.state[i]["step"] == opt.state[i]["step"] == 5
        _assert_same([clone.state[i]["exp_avg"]], [opt.state[i]["exp_avg"]])


def test_step_counts_are_set_through_the_dicts_own_slot():
    """The classes set the step counts with `_cpu.set_entries`, which writes through
    dict's own slot (a StateDict does not count it) and refuses a list with a non-dict
    before writing anything."""
    from fusedopt import _cpu, _engine

    log = [0]
    dicts = [_engine.StateDict({"step": 1}, log), {"step": 1}]
    _cpu.set_entries(dicts, "step", 2.0)
    assert [d["step"] for d in dicts] == [2.0, 2.0] and log == [0]
    dicts[0]["step"] = 3.0
    assert log == [1]
    with pytest.raises(TypeError, match="non-dict"):
        _cpu.set_entries([dicts[1], 5], "step", 9.0)
    assert dicts[1]["step"] == 2.0


def test_packed_hyperparameters_are_kept_by_their_bits():
    """`pack` hands back a recent call's array for the same values, read-only, and tells
    -0.0 from 0.0 (equal as numbers; either may give a signed zero a different sign)."""
    from fusedopt.algorithms import pack

    values = dict(lr=0.1, beta1=0.9, beta2=0.99, eps=1e-8, l2=0.0, shrink=1.0, maximize=False)
    a = pack("adam", dict(values))
    assert pack("adam", dict(values)) is a
    assert not a.flags.writeable
    b = pack("adam", dict(values, l2=-0.0))
    assert b is not a and np.signbit(b[4]) and not np.signbit(a[4])
    c = pack("adam", dict(values, lr=0.2))
    assert c[0] == 0.2 and a[0] == 0.1
    with pytest.raises(KeyError):
        pack("adam", dict(values, lr2=1.0))


# --- fusedopt.torch --------------------------------------------------------------------------


torch = pytest.importorskip("torch")
fot = pytest.importorskip("fusedopt.torch")


def _torch_change(name, opt, params, rng):
    group = opt.param_groups[0]
    if name == "lr":
        group["lr"] = 0.05
    elif name == "betas":
        group["betas"] = (0.5, 0.9)
    elif name == "a param's data replaced":
        with torch.no_grad():
            params[1].data = params[1].data.clone()
    elif name == "a gradient replaced":
        params[0].grad = torch.ones_like(params[0])
    elif name == "a gradient is None":
        params[2].grad = None
    elif name == "a state tensor replaced":
        st = opt.state[params[0]]
        st["exp_avg"] = st["exp_avg"] + 1.0
    elif name == "state loaded":
        other = fot.Adam([torch.nn.Parameter(p.detach().clone()) for p in params], lr=0.01)
        for p in other.param_groups[0]["params"]:
            p.grad = torch.ones_like(p)
        other.step()
        opt.load_state_dict(other.state_dict())
    elif name == "step scalar changed in place":
        opt.state[params[3]]["step"].fill_(10.0)
    elif name == "group added":
        extra = torch.nn.Parameter(torch.ones(4, dtype=torch.float64))
        extra.grad = torch.full((4,), 0.5, dtype=torch.float64)
        opt.add_param_group({"params": [extra], "lr": 0.2})
    elif name == "moved to float32":
        with torch.no_grad():
            for p in params:
                p.data = p.data.float()
                p.grad = p.grad.float()
    elif name == "nothing":
        pass
    else:
        raise AssertionError(name)


TORCH_CHANGES = ["nothing", "lr", "betas", "a param's data replaced", "a gradient replaced",
                 "a gradient is None", "a state tensor replaced", "state loaded",
                 "step scalar changed in place", "group added", "moved to float32"]


def _torch_run(change, flat, replay, monkeypatch):
    rng = np.random.default_rng(11)
    params = [torch.nn.Parameter(torch.from_numpy(rng.standard_normal(s))) for s in SHAPES]
    opt = fot.Adam(params, lr=0.01, flat=flat)
    cls = type(opt)
    real = cls._fo_replay_step
    replayed = []

    def counted(self):
        done = replay and real(self)
        replayed.append(done)
        return done

    monkeypatch.setattr(cls, "_fo_replay_step", counted)
    outcome = []
    for step in range(STEPS):
        grads = _grads(rng, SHAPES)
        for p, g in zip(params, grads):
            if p.grad is None:
                p.grad = torch.from_numpy(g)
            else:
                with torch.no_grad():
                    p.grad.copy_(torch.from_numpy(g))
        if step == CHANGE_AT:
            _torch_change(change, opt, params, rng)
        try:
            opt.step()
            outcome.append(None)
        except (ValueError, TypeError, RuntimeError) as e:
            outcome.append(str(e))
    arrays = [p.detach().clone() for g in opt.param_groups for p in g["params"]]
    state = [{k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in st.items()}
             for st in opt.state.values()]
    return arrays, state, outcome, replayed


@pytest.fixture(params=["reader", "data_ptr"])
def addresses(request, monkeypatch):
    """Both ways the torch tensors' addresses are read (`_foreign.tensor_addresses`): in
    C++ through the reader torch exports, and through `Tensor.data_ptr`."""
    from fusedopt import _foreign

    if request.param == "reader":
        if not (_foreign._ADDRESS_READER or _foreign._probe_address_reader()):
            pytest.skip("this torch exports no address reader (data_ptr is used)")
    else:
        monkeypatch.setattr(_foreign, "_ADDRESS_READER", 0)
    return request.param


def test_tensor_addresses_are_data_ptr(addresses):
    from fusedopt import _cpu, _foreign

    base = torch.arange(24, dtype=torch.float64)
    tensors = [base, base[7:], base.view(4, 6)[:, 1:], base.view(4, 6).t(),
               torch.nn.Parameter(torch.ones(3, 2)), torch.zeros(0),
               torch.ones(5, dtype=torch.bfloat16)]
    for seq in (tensors, tuple(tensors)):
        got = _foreign.tensor_addresses(seq)
        assert got.dtype == np.uint64
        assert got.tolist() == [t.data_ptr() for t in tensors]
    with pytest.raises(TypeError):  # (not a tensor: the reader's error is caught in C++)
        _foreign.tensor_addresses([base, 1.0])
    if addresses == "reader":
        reader = _foreign._ADDRESS_READER
        assert _cpu.tensor_addresses(reader, [base, None]) is None
        assert _cpu.tensor_addresses(reader, [base, 1.0]) is None


@pytest.mark.parametrize("flat", [False, True], ids=["default", "flat"])
@pytest.mark.parametrize("change", TORCH_CHANGES)
def test_torch_replay_sees_every_change(change, flat, monkeypatch, addresses):
    p1, s1, out1, used = _torch_run(change, flat, True, monkeypatch)
    p0, s0, out0, _ = _torch_run(change, flat, False, monkeypatch)
    assert out1 == out0
    assert len(p1) == len(p0)
    for a, b in zip(p1, p0):
        assert a.dtype == b.dtype and torch.equal(a, b)
    assert len(s1) == len(s0)
    for a, b in zip(s1, s0):
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(torch.as_tensor(a[k]), torch.as_tensor(b[k])), k
    assert any(used[:CHANGE_AT]), used


def _twin_params(rng):
    """Two lists of params with the same random values: fusedopt's and torch.optim's."""
    init = [rng.standard_normal(s) for s in SHAPES]
    return ([torch.nn.Parameter(torch.from_numpy(x.copy())) for x in init],
            [torch.nn.Parameter(torch.from_numpy(x.copy())) for x in init])


def _same_grads(rng, mine, theirs):
    """Give both lists new gradients, equal, each param its own tensor."""
    for p, q, g in zip(mine, theirs, _grads(rng, SHAPES)):
        p.grad = torch.from_numpy(g.copy())
        q.grad = torch.from_numpy(g.copy())


@pytest.mark.parametrize("flat", [False, True], ids=["default", "flat"])
def test_torch_replay_equals_torch_optim(flat):
    """Replayed steps equal torch.optim.AdamW (float64, to rounding) over 10 steps, with
    the learning rate changed by a scheduler every few steps."""
    rng = np.random.default_rng(5)
    mine, theirs = _twin_params(rng)
    a = fot.AdamW(mine, lr=0.02, weight_decay=0.1, flat=flat)
    b = torch.optim.AdamW(theirs, lr=0.02, weight_decay=0.1, foreach=False)
    sa = torch.optim.lr_scheduler.StepLR(a, step_size=3, gamma=0.5)
    sb = torch.optim.lr_scheduler.StepLR(b, step_size=3, gamma=0.5)
    replayed = 0
    for _ in range(10):
        _same_grads(rng, mine, theirs)
        replayed += a._fo_replay is not None
        a.step()
        b.step()
        sa.step()
        sb.step()
    assert replayed >= 5
    for p, q in zip(mine, theirs):
        np.testing.assert_allclose(p.detach().numpy(), q.detach().numpy(), rtol=1e-12,
                                   atol=1e-15)


def test_torch_param_data_replaced_between_steps_is_updated(addresses):
    """A param whose `.data` is replaced (by a copy elsewhere in memory) between steps is
    updated where it now lives, as torch.optim.Adam updates it: the kept plans hold the
    old address, and reading the params' addresses each step is what tells."""
    rng = np.random.default_rng(4)
    mine, theirs = _twin_params(rng)
    a = fot.Adam(mine, lr=0.05)
    b = torch.optim.Adam(theirs, lr=0.05, foreach=False)
    for t in range(6):
        _same_grads(rng, mine, theirs)
        if t in (2, 4):
            with torch.no_grad():
                for params in (mine, theirs):
                    params[1].data = params[1].data.clone()
                    big = torch.cat([torch.zeros(3, dtype=torch.float64),
                                     params[2].data.flatten()])
                    params[2].data = big[3:].view(params[2].shape)  # (a view at an offset)
        a.step()
        b.step()
    for p, q in zip(mine, theirs):
        np.testing.assert_allclose(p.detach().numpy(), q.detach().numpy(), rtol=1e-12,
                                   atol=1e-15)


@pytest.mark.parametrize("flat", [False, True], ids=["default", "flat"])
@pytest.mark.parametrize("what", ["exp_avg replaced", "step replaced", "state dict replaced",
                                  "exp_avg_sq deleted and set again", "state assigned whole",
                                  "a param's state deleted", "state cleared",
                                  "state assigned whole, then an entry replaced",
                                  "state copied whole, then a dict put in"])
def test_torch_state_entries_written_between_steps_are_used(what, flat):
    """An entry of a param's state replaced between steps (the state dict itself the
    same object), or the state changed whole, is what the next step reads and updates,
    as in torch.optim; so is an entry replaced a step after the whole state was
    assigned (the new state tracked in its turn)."""
    rng = np.random.default_rng(2)
    mine, theirs = _twin_params(rng)
    a = fot.Adam(mine, lr=0.05, flat=flat)
    b = torch.optim.Adam(theirs, lr=0.05, foreach=False)
    for t in range(7):
        _same_grads(rng, mine, theirs)
        if t == 5 and what.endswith("then an entry replaced"):
            for opt, x in ((a, mine[1]), (b, theirs[1])):
                opt.state[x]["exp_avg"] = opt.state[x]["exp_avg"] - 1.0
        if t == 5 and what.endswith("then a dict put in"):
            for opt, x in ((a, mine[1]), (b, theirs[1])):
                opt.state[x] = {k: v * 2 for k, v in opt.state[x].items()}
        if t == 3:
            for opt, x in ((a, mine[0]), (b, theirs[0])):
                st = opt.state[x]
                if what == "exp_avg replaced":
                    st["exp_avg"] = st["exp_avg"] + 1.0
                elif what == "step replaced":
                    st["step"] = torch.tensor(10.0)
                elif what == "state dict replaced":
                    opt.state[x] = {k: v.clone() * (2 if k == "exp_avg_sq" else 1)
                                    for k, v in st.items()}
                elif what.startswith("state assigned whole"):
                    state = defaultdict(dict, {k: dict(v) for k, v in opt.state.items()})
                    state[x]["exp_avg"] = state[x]["exp_avg"] * 3
                    opt.state = state
                elif what.startswith("state copied whole"):
                    opt.state = defaultdict(dict, opt.state)  # (the same state dicts)
                elif what == "a param's state deleted":
                    del opt.state[x]
                elif what == "state cleared":
                    opt.state.clear()
                else:
                    value = st.pop("exp_avg_sq")
                    st["exp_avg_sq"] = value * 3
        a.step()
        b.step()
    for p, q in zip(mine, theirs):
        np.testing.assert_allclose(p.detach().numpy(), q.detach().numpy(), rtol=1e-12,
                                   atol=1e-15)


def test_torch_state_dicts_save_as_plain_dicts():
    """fusedopt.torch's per-param states count their writes, but what is saved of them
    (pickle, deepcopy, torch.save of the state dict) is plain dicts."""
    import io
    import pickle

    p = torch.nn.Parameter(torch.ones(3))
    p.grad = torch.ones(3)
    opt = fot.Adam([p])
    opt.step()
    assert isinstance(opt.state[p], dict) and isinstance(opt.state, defaultdict)
    assert type(pickle.loads(pickle.dumps(opt.state[p]))) is dict
    saved = pickle.loads(pickle.dumps(opt.state))
    assert type(saved) is defaultdict and type(saved[p if p in saved else 0]) is dict
    assert type(copy.copy(opt.state)) is defaultdict
    assert type(copy.deepcopy(opt.state_dict())["state"][0]) is dict
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    assert type(torch.load(buf, weights_only=True)["state"][0]) is dict
    # a copy of the optimizer steps its own params, its states tracked again
    clone = copy.deepcopy(opt)
    q = clone.param_groups[0]["params"][0]
    q.grad = torch.ones(3)  # (a deepcopy of a Parameter leaves its grad behind)
    before = p.detach().clone()
    clone.step()
    assert torch.equal(p.detach(), before) and not torch.equal(q.detach(), before)
    assert type(clone.state[q]).__name__ == "StateDict"
    assert type(clone.state).__name__ == "StateMap"
