"""fusedopt.torch with flat=True: the params, gradients and states of a group live in
flat buffers, and a step is one kernel call per (device, dtype). Bit for bit the same
training as the default mode, whatever the user does to the gradients in between."""

from __future__ import annotations

import copy

import numpy as np
import pytest

torch = pytest.importorskip("torch")
fot = pytest.importorskip("fusedopt.torch")

from cases import CASES  # noqa: E402

from fusedopt import _backend  # noqa: E402

STEPS = 50


@pytest.fixture(autouse=True)
def _one_thread():
    import fusedopt

    before = torch.get_num_threads(), fusedopt.get_num_threads()
    torch.set_num_threads(1)
    fusedopt.set_num_threads(1)
    yield
    torch.set_num_threads(before[0])
    fusedopt.set_num_threads(before[1])


def make_model(dtype=torch.float64, seed=3):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(),
                               torch.nn.Linear(8, 2)).to(dtype)


def make_data(dtype=torch.float64):
    g = torch.Generator().manual_seed(7)
    return torch.randn(32, 6, generator=g, dtype=dtype), torch.randn(32, 2, generator=g,
                                                                       dtype=dtype)


def train(model, opt, steps, data, zero=None):
    x, y = data
    losses = []
    for _ in range(steps):
        (zero or opt.zero_grad)()
        loss = ((model(x) - y) ** 2).mean()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def same_bits(a, b, what):
    assert a.dtype == b.dtype and a.shape == b.shape, what
    assert torch.equal(a.view(-1).view(torch.int64 if a.element_size() == 8 else torch.int32)
                       if a.element_size() in (4, 8) else a, b.view(-1).view(
                           torch.int64 if b.element_size() == 8 else torch.int32)
                       if b.element_size() in (4, 8) else b), what


def assert_same_training(m1, o1, m2, o2, what):
    for i, (a, b) in enumerate(zip(m1.parameters(), m2.parameters())):
        same_bits(a.detach(), b.detach(), f"{what}: param {i}")
    s1, s2 = o1.state_dict(), o2.state_dict()
    assert sorted(s1["state"]) == sorted(s2["state"])
    for k in s1["state"]:
        assert sorted(s1["state"][k]) == sorted(s2["state"][k]), what
        for name, v in s1["state"][k].items():
            if isinstance(v, torch.Tensor):
                same_bits(v, s2["state"][k][name], f"{what}: {name} of param {k}")
            else:
                assert v == s2["state"][k][name]
    assert s1["param_groups"] == s2["param_groups"]


def torch_cases():
    seen = []
    for c in CASES:
        name = c.algo.cls.__name__
        if hasattr(fot, name):
            seen.append(pytest.param(name, dict(c.overrides), id=str(c)))
    return seen


@pytest.mark.parametrize("name, opts", torch_cases())
def test_flat_equals_default_bit_for_bit(name, opts):
    opts = {**opts, "lr": min(opts.get("lr", 1e-3), 1e-2)}  # a steady 50-step run
    data = make_data()
    m1, m2 = make_model(), make_model()
    o1 = getattr(fot, name)(m1.parameters(), **opts)
    o2 = getattr(fot, name)(m2.parameters(), **opts, flat=True)
    for o in (o1, o2):
        if hasattr(o, "train"):  # schedule-free: steps need train mode
            o.train()
    l1 = train(m1, o1, STEPS, data)
    l2 = train(m2, o2, STEPS, data)
    assert l1 == l2
    assert_same_training(m1, o1, m2, o2, name)


def count_calls(monkeypatch):
    calls = []
    real = _backend._cpu

    class Counting:
        def __getattr__(self, attr):
            return getattr(real, attr)

        def step(self, kernel, dtype, ptrs, sizes, hyper, *args, **kw):
            calls.append(len(sizes))
            return real.step(kernel, dtype, ptrs, sizes, hyper, *args, **kw)

    monkeypatch.setattr(_backend, "_cpu", Counting())
    return calls


def test_a_flat_step_is_one_call_over_one_tensor(monkeypatch):
    model = make_model()
    opt = fot.Adam(model.parameters(), lr=1e-2, flat=True)
    data = make_data()
    train(model, opt, 2, data)  # the first step makes the state
    calls = count_calls(monkeypatch)
    train(model, opt, 3, data)
    assert calls == [1, 1, 1]


@pytest.mark.parametrize("name, opts", [("LAMB", dict(lr=1e-2)), ("LARS", dict(lr=0.1))])
def test_trust_ratios_see_each_tensor_of_a_flat_buffer(monkeypatch, name, opts):
    """LAMB's and LARS's per-tensor norms: a flat step is one call over the buffers' views,
    one tensor per param, not one tensor for the whole buffer."""
    model = make_model()
    opt = getattr(fot, name)(model.parameters(), **opts, flat=True)
    data = make_data()
    train(model, opt, 2, data)
    calls = count_calls(monkeypatch)
    train(model, opt, 2, data)
    assert calls == [4, 4]


@pytest.mark.parametrize("frozen", [False, True])
def test_schedule_free_train_and_eval_move_the_flat_buffers(monkeypatch, frozen):
    """train()/eval() with flat=True: the params move in their buffer (one lerp over a
    bucket whose params all have their state in the state buffer; param by param with a
    param that has no state yet, `frozen`) bit for bit as the default mode moves them, and
    stay the buffer's views."""
    whole = []
    real = fot.AdamWScheduleFree._switch_bucket

    def spy(self, bucket, name, weight):
        whole.append(real(self, bucket, name, weight))
        return whole[-1]

    monkeypatch.setattr(fot.AdamWScheduleFree, "_switch_bucket", spy)
    data = make_data()
    m1, m2 = make_model(), make_model()
    if frozen:
        for m in (m1, m2):
            m[2].bias.requires_grad_(False)
    o1 = fot.AdamWScheduleFree(m1.parameters(), lr=0.01, warmup_steps=3, weight_decay=0.01)
    o2 = fot.AdamWScheduleFree(m2.parameters(), lr=0.01, warmup_steps=3, weight_decay=0.01,
                               flat=True)
    bucket = o2._fo_buckets[0][0]
    for run in range(3):
        for o in (o1, o2):
            o.train()
        assert_same_training(m1, o1, m2, o2, f"train mode, run {run}")
        assert train(m1, o1, 5, data) == train(m2, o2, 5, data)
        before = [p.detach().clone() for p in m2.parameters()]
        for o in (o1, o2):
            o.eval()
        assert_same_training(m1, o1, m2, o2, f"eval mode, run {run}")
        assert any(not torch.equal(a, p.detach()) for a, p in zip(before, m2.parameters()))
        assert all(p.data_ptr() == v.data_ptr()
                   for p, v in zip(m2.parameters(), bucket.param_views))
    # the first train() finds no state; after it every switch is one lerp per bucket
    assert whole == [False] + [not frozen] * 5


def test_params_and_grads_are_views_of_the_buffers():
    model = make_model()
    before = [p.detach().clone() for p in model.parameters()]
    params = list(model.parameters())
    opt = fot.AdamW(params, flat=True)
    assert all(a is b for a, b in zip(params, model.parameters()))  # the same objects
    for p, b in zip(params, before):
        assert torch.equal(p.detach(), b) and p.is_leaf and p.requires_grad
    bucket = opt._fo_buckets[0][0]
    base = bucket.data.data_ptr()
    ends = base + bucket.data.numel() * bucket.data.element_size()
    assert all(base <= p.data_ptr() < ends for p in params)
    train(model, opt, 2, make_data())
    gbase = bucket.grad.data_ptr()
    assert all(p.grad.data_ptr() - gbase == p.data_ptr() - base for p in params)
    opt.zero_grad()  # set_to_none=True, yet the views stay, zeroed
    assert all(p.grad is not None and not p.grad.any() for p in params)
    state = opt.state[params[0]]["exp_avg"]
    assert bucket.states["exp_avg"].data_ptr() <= state.data_ptr()


def test_tied_weights_stay_tied():
    class Tied(torch.nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.emb = torch.nn.Embedding(10, 4, dtype=torch.float64)
            self.out = torch.nn.Linear(4, 10, bias=True, dtype=torch.float64)
            self.out.weight = self.emb.weight  # weight tying

        def forward(self, i):
            return self.out(self.emb(i))

    idx = torch.tensor([1, 2, 3, 4])
    runs = []
    for flat in (False, True):
        m = Tied()
        opt = fot.Adam(m.parameters(), lr=0.01, flat=flat)
        for _ in range(10):
            opt.zero_grad()
            m(idx).pow(2).mean().backward()
            opt.step()
        assert m.out.weight is m.emb.weight
        runs.append([p.detach().clone() for p in m.parameters()])
    for a, b in zip(*runs):
        same_bits(a, b, "tied")


@pytest.mark.parametrize("how", ["assign", "none_then_fresh", "module_zero_grad", "skip_one"])
def test_replaced_or_missing_gradients_are_used_correctly(how):
    data = make_data()
    runs = []
    for flat in (False, True):
        model = make_model()
        opt = fot.Adam(model.parameters(), lr=0.01, flat=flat)
        x, y = data
        for t in range(12):
            if how == "module_zero_grad":
                model.zero_grad()  # sets None: backward makes fresh gradient tensors
            else:
                opt.zero_grad()
            ((model(x) - y) ** 2).mean().backward()
            if how == "assign" and t % 3 == 1:
                w = model[0].weight
                w.grad = w.grad.clone() * 0.5  # a new tensor in place of the view
            if how == "none_then_fresh" and t % 4 == 2:
                model[2].bias.grad = None  # this param skips the step
            if how == "skip_one" and t >= 6:
                model[0].bias.grad = None
            opt.step()
        runs.append((model, opt))
    (m1, o1), (m2, o2) = runs
    assert_same_training(m1, o1, m2, o2, how)


def test_params_without_grad_are_skipped_like_torch():
    data = make_data()
    runs = []
    for flat in (False, True):
        model = make_model()
        opt = fot.Adam(model.parameters(), lr=0.01, flat=flat)
        for t in range(10):
            model[2].weight.requires_grad_(t % 2 == 0)
            train(model, opt, 1, data)
        runs.append((model, opt))
    (m1, o1), (m2, o2) = runs
    assert_same_training(m1, o1, m2, o2, "requires_grad toggled")


def test_add_param_group_later():
    data = make_data()
    runs = []
    for flat in (False, True):
        model = make_model()
        opt = fot.SGD(model[0].parameters(), lr=0.05, momentum=0.9, flat=flat)
        train(model, opt, 5, data)
        opt.add_param_group({"params": list(model[2].parameters()), "lr": 0.01})
        train(model, opt, 10, data)
        runs.append((model, opt))
    (m1, o1), (m2, o2) = runs
    assert_same_training(m1, o1, m2, o2, "added group")


@pytest.mark.parametrize("name, opts", [("Adam", dict(lr=0.01, amsgrad=True)),
                                        ("SGD", dict(lr=0.05, momentum=0.9)),
                                        ("Adagrad", dict(lr=0.05)),
                                        ("NAdam", dict(lr=0.01)),
                                        ("ASGD", dict(lr=0.01, t0=5.0)),
                                        ("Rprop", dict(lr=0.01))])
def test_state_dict_into_torch_optim_and_back(name, opts):
    """(NAdam's mu_product and ASGD's eta and mu are per-param scalars that torch's
    load_state_dict turns into the param's dtype: the flat mode keeps them so, as the
    default mode does, bit for bit.)"""
    data = make_data()
    mf, mt = make_model(), make_model()
    flat = getattr(fot, name)(mf.parameters(), **opts, flat=True)
    ref = getattr(torch.optim, name)(mt.parameters(), **opts)
    train(mf, flat, 10, data)
    train(mt, ref, 10, data)
    # flat -> torch.optim
    m2 = make_model()
    m2.load_state_dict(mf.state_dict())
    t2 = getattr(torch.optim, name)(m2.parameters(), **opts)
    t2.load_state_dict(copy.deepcopy(flat.state_dict()))
    # torch.optim -> flat
    m3 = make_model()
    m3.load_state_dict(mt.state_dict())
    f3 = getattr(fot, name)(m3.parameters(), **opts, flat=True)
    f3.load_state_dict(copy.deepcopy(ref.state_dict()))
    bucket = f3._fo_buckets[0][0]
    for position, p in enumerate(m3.parameters()):  # the loaded state is flat again
        for key, v in f3.state[p].items():
            if key not in f3.spec.scalars:
                assert bucket.owns_state(key, position, v), key
    # the default mode, loaded alike: the twin of f3
    m4 = make_model()
    m4.load_state_dict(mt.state_dict())
    d4 = getattr(fot, name)(m4.parameters(), **opts)
    d4.load_state_dict(copy.deepcopy(ref.state_dict()))
    for model, opt in ((mf, flat), (mt, ref), (m2, t2), (m3, f3), (m4, d4)):
        train(model, opt, 10, data)
    assert_same_training(m3, f3, m4, d4, "loaded from torch.optim")
    for a, b in zip(mf.parameters(), m2.parameters()):
        np.testing.assert_allclose(a.detach().numpy(), b.detach().numpy(), rtol=1e-9)
    for a, b in zip(mt.parameters(), m3.parameters()):
        np.testing.assert_allclose(a.detach().numpy(), b.detach().numpy(), rtol=1e-9)


def test_model_moved_after_construction_is_refused():
    model = make_model(torch.float32)
    opt = fot.Adam(model.parameters(), flat=True)
    train(model, opt, 1, make_data(torch.float32))
    model.to(torch.float64)
    x, y = make_data(torch.float64)
    opt.zero_grad()
    ((model(x) - y) ** 2).mean().backward()
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(RuntimeError, match="no longer lives in the optimizer's flat buffer"):
        opt.step()
    for p, b in zip(model.parameters(), before):
        assert torch.equal(p.detach(), b)


def test_params_sharing_memory_are_refused():
    base = torch.zeros(10, dtype=torch.float64)
    a = torch.nn.Parameter(base[:6])
    b = torch.nn.Parameter(base[4:])
    with pytest.raises(ValueError, match="share memory"):
        fot.SGD([a, b], lr=0.1, flat=True)


def test_deepcopy_steps_per_tensor():
    model = make_model()
    opt = fot.Adam(model.parameters(), lr=0.01, flat=True)
    train(model, opt, 3, make_data())
    clone = copy.deepcopy(opt)
    assert not clone._fo_flat
    assert clone.state_dict()["param_groups"] == opt.state_dict()["param_groups"]


# --- the EMA of the params (ema_decay) and Muon ---------------------------------------------


@pytest.mark.parametrize("name, opts", [("Adam", dict(lr=0.01)),
                                        ("SGD", dict(lr=0.05, momentum=0.9)),
                                        ("Adagrad", dict(lr=0.05))])  # state at construction
def test_flat_with_ema_equals_default_bit_for_bit(name, opts, monkeypatch):
    """With ema_decay the averages are one more flat buffer: the same params and
    averages as the default mode, also over steps where a param has no gradient (the
    per-tensor path, and the EMA rule's pass for that param), and a steady step is one
    kernel call that moves the averages too."""
    data = make_data()
    m1, m2 = make_model(), make_model()
    o1 = getattr(fot, name)(m1.parameters(), ema_decay=0.9, **opts)
    o2 = getattr(fot, name)(m2.parameters(), ema_decay=0.9, flat=True, **opts)
    train(m1, o1, 3, data)
    train(m2, o2, 2, data)
    calls = count_calls(monkeypatch)
    train(m2, o2, 1, data)
    assert calls == [1]  # params, state and averages: one call over one tensor
    monkeypatch.undo()
    bucket = o2._fo_buckets[0][0]
    for position, p in enumerate(m2.parameters()):
        assert bucket.owns_state("ema", position, o2.state[p]["ema"])
    assert_same_training(m1, o1, m2, o2, name)
    x, y = data
    for model, opt in ((m1, o1), (m2, o2)):
        for k in range(9):
            opt.zero_grad()
            ((model(x) - y) ** 2).mean().backward()
            if k % 4 == 2:
                model[0].weight.grad = None
            opt.step()
    assert_same_training(m1, o1, m2, o2, name)
    with o1.averaged(), o2.averaged():
        for a, b in zip(m1.parameters(), m2.parameters()):
            same_bits(a.detach(), b.detach(), "averaged")


def test_flat_state_dict_with_ema_loads_into_the_buffers():
    data = make_data()
    m1, m2 = make_model(), make_model()
    o1 = fot.AdamW(m1.parameters(), lr=0.01, ema_decay=0.8)
    train(m1, o1, 3, data)
    m2.load_state_dict(m1.state_dict())
    o2 = fot.AdamW(m2.parameters(), lr=0.01, ema_decay=0.8, flat=True)
    o2.load_state_dict(copy.deepcopy(o1.state_dict()))
    bucket = o2._fo_buckets[0][0]
    for position, p in enumerate(m2.parameters()):
        assert bucket.owns_state("ema", position, o2.state[p]["ema"])
    train(m1, o1, 3, data)
    train(m2, o2, 3, data)
    assert_same_training(m1, o1, m2, o2, "loaded")


def test_muon_refuses_flat_and_other_than_2d_params():
    weights = [torch.nn.Parameter(torch.randn(4, 3)), torch.nn.Parameter(torch.randn(3, 5))]
    with pytest.raises(ValueError, match=r"Muon\(flat=True\): flat buffers are for the "
                                         "elementwise algorithms"):
        fot.Muon(weights, lr=0.02, flat=True)
    opt = fot.Muon(weights, lr=0.02)
    with pytest.raises(ValueError, match="Muon only supports 2D parameters"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.randn(3))]})
    assert len(opt.param_groups) == 1  # the refused group is not kept


# --- 8-bit state (optim_bits=8) ----------------------------------------------------------------


def make_model8(dtype=torch.float32, seed=3):
    """Weights of 600 elements (3 blocks of 256, the last partial) and 40, biases of 20
    and 2: with min_8bit_size=30 the weights keep 8-bit state, the biases float32."""
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(30, 20), torch.nn.Tanh(),
                               torch.nn.Linear(20, 2)).to(dtype)


def make_data8(dtype=torch.float32):
    g = torch.Generator().manual_seed(7)
    return torch.randn(32, 30, generator=g, dtype=dtype), torch.randn(32, 2, generator=g,
                                                                        dtype=dtype)


def torch_8bit_cases():
    """The cases of the table whose options keep 8-bit state (the specs' `quantizable`)."""
    seen = []
    for c in CASES:
        name = c.algo.cls.__name__
        cls = getattr(fot, name, None)
        if cls is None:
            continue
        try:
            cls.spec.check_quantized(cls.spec.to_op({**cls.spec.group_defaults(torch=True),
                                                     **c.overrides}), name)
        except ValueError:
            continue
        seen.append(pytest.param(name, dict(c.overrides), id=str(c)))
    return seen


EIGHT = dict(optim_bits=8, min_8bit_size=30)


@pytest.mark.parametrize("name, opts", torch_8bit_cases())
def test_flat_8bit_equals_default_bit_for_bit(name, opts):
    """flat=True with 8-bit state: the weights in a bucket of their own, on block
    boundaries; params, codes and scales the same bits as the per-tensor steps."""
    opts = {**opts, "lr": min(opts.get("lr", 1e-3), 1e-2), **EIGHT}
    data = make_data8()
    m1, m2 = make_model8(), make_model8()
    o1 = getattr(fot, name)(m1.parameters(), **opts)
    o2 = getattr(fot, name)(m2.parameters(), **opts, flat=True)
    l1 = train(m1, o1, 20, data)
    l2 = train(m2, o2, 20, data)
    assert l1 == l2
    assert_same_training(m1, o1, m2, o2, name)
    weight = o1.state[m1[0].weight]
    assert any(k.endswith("_absmax") for k in weight) or not o1.spec.active(
        o1.spec.to_op(o1.param_groups[0]))


def test_flat_8bit_buckets_views_and_padding():
    model = make_model8()
    params = list(model.parameters())
    opt = fot.AdamW(params, lr=1e-2, flat=True, **EIGHT)
    q8, plain = opt._fo_buckets[0]
    assert q8.quantized and [p.numel() for p in q8.params] == [600, 40]
    assert not plain.quantized and [p.numel() for p in plain.params] == [20, 2]
    assert q8.starts == [0, 768] and q8.data.numel() == 1024  # block boundaries
    train(model, opt, 5, make_data8())
    for position, p in enumerate(q8.params):
        st = opt.state[p]
        assert st["exp_avg"].dtype == torch.uint8 and st["exp_avg_absmax"].dtype == torch.float32
        for name in ("exp_avg", "exp_avg_sq"):
            assert q8.owns_state(name, position, st[name], st[name + "_absmax"])
    for p in plain.params:
        assert opt.state[p]["exp_avg"].dtype == torch.float32
        assert "exp_avg_absmax" not in opt.state[p]
    pad = torch.ones(1024, dtype=torch.bool)
    pad[:600] = pad[768:808] = False
    assert not q8.data[pad].any() and not q8.grad[pad].any()  # the padding stays zero
    for name in ("exp_avg", "exp_avg_sq"):
        zero = q8.states[name][pad]
        assert (zero == zero[0]).all()
        assert fusedopt_decoded_zero(zero[0], opt.spec.state(name).positive)


def fusedopt_decoded_zero(code, positive):
    from fusedopt import _cpu

    return _cpu.quant_tables(not positive)["code"][int(code)] == 0.0


@pytest.mark.parametrize("flat", [False, True])
def test_8bit_steady_steps_reuse_the_kept_plans(flat, monkeypatch):
    """After the first step, a group with 8-bit and float32 state makes no new plan: two
    kernel calls per step (8-bit and float32), over one tensor each with flat=True."""
    from fusedopt import _engine

    model = make_model8()
    opt = fot.Adam(model.parameters(), lr=1e-2, flat=flat, **EIGHT)
    data = make_data8()
    train(model, opt, 2, data)
    made = []
    real = _engine.plan
    monkeypatch.setattr(_engine, "plan", lambda *a, **k: made.append(1) or real(*a, **k))
    calls = count_calls(monkeypatch)
    train(model, opt, 3, data)
    assert made == []
    assert calls == ([1, 1] if flat else [2, 2]) * 3


def test_8bit_state_dict_loads_into_flat_buffers():
    """A default optimizer's 8-bit state dict, loaded into a flat one: the codes and
    scales are copied into the buckets (views again), and training goes on bit for bit."""
    data = make_data8()
    m1 = make_model8()
    o1 = fot.Adagrad(m1.parameters(), lr=0.05, **EIGHT)
    train(m1, o1, 4, data)
    m2 = make_model8()
    m2.load_state_dict(m1.state_dict())
    o2 = fot.Adagrad(m2.parameters(), lr=0.05, flat=True, **EIGHT)
    o2.load_state_dict(copy.deepcopy(o1.state_dict()))
    q8, plain = o2._fo_buckets[0]
    for position, p in enumerate(q8.params):
        st = o2.state[p]
        assert q8.owns_state("sum", position, st["sum"], st["sum_absmax"])
    for position, p in enumerate(plain.params):
        assert plain.owns_state("sum", position, o2.state[p]["sum"])
    assert train(m1, o1, 4, data) == train(m2, o2, 4, data)
    assert_same_training(m1, o1, m2, o2, "loaded")


def test_8bit_16bit_params_flat_equals_default():
    """bfloat16 params: 8-bit state for the weights, float32 state for the small biases
    (bitsandbytes' 32-bit state), flat or not."""
    data = make_data8(torch.bfloat16)
    runs = []
    for flat in (False, True):
        model = make_model8(torch.bfloat16)
        opt = fot.AdamW(model.parameters(), lr=1e-2, flat=flat, **EIGHT)
        train(model, opt, 5, data)
        runs.append((model, opt))
    (m1, o1), (m2, o2) = runs
    assert_same_training(m1, o1, m2, o2, "bfloat16")
    assert o1.state[m1[0].bias]["exp_avg"].dtype == torch.float32
    assert o1.state[m1[0].weight]["exp_avg"].dtype == torch.uint8
