"""Muon: the float32 iterations against a float64 NumPy Newton-Schulz (the reference), the
bfloat16 ones and fusedopt.torch.Muon against torch.optim.Muon within bfloat16's
tolerance, the momentum bit for bit, the iterations batched over the params of a shape."""

from __future__ import annotations

import copy

import numpy as np
import pytest

import fusedopt as fo
from fusedopt import _muon
from fusedopt import functional as F
from fusedopt import reference as R
from cases import assert_same_bits

SHAPES = [(16, 24), (24, 16), (16, 24), (12, 12), (24, 16), (5, 40)]
KW = dict(lr=0.02, weight_decay=0.1, momentum=0.95, nesterov=True, eps=1e-7, ns_steps=5,
          ns_coefficients=(3.4445, -4.7750, 2.0315), adjust_lr_fn=None)


def _data(rng, dtype=np.float32):
    params = [rng.standard_normal(s).astype(dtype) for s in SHAPES]
    bufs = [0.1 * rng.standard_normal(s).astype(dtype) for s in SHAPES]
    return params, bufs


def _directions(before, after, kw):
    """The orthogonalized updates O a step applied: (p (1 - lr wd) - p') / lr'."""
    from fusedopt.algorithms.muon import adjusted_lr

    lr, wd = kw["lr"], kw["weight_decay"]
    return [(np.asarray(b, np.float64) * (1 - lr * wd) - np.asarray(a, np.float64)) /
            adjusted_lr(lr, kw["adjust_lr_fn"], b.shape) for b, a in zip(before, after)]


@pytest.mark.parametrize("changes", [{}, dict(nesterov=False), dict(adjust_lr_fn="original"),
                                     dict(adjust_lr_fn="match_rms_adamw", weight_decay=0.0),
                                     dict(momentum=0.5, ns_steps=3, eps=1e-3)], ids=str)
def test_float32_iterations_match_the_float64_reference(rng, changes):
    kw = dict(KW, **changes)
    params, bufs = _data(rng)
    ref_p, ref_b = [p.astype(np.float64) for p in params], [b.astype(np.float64) for b in bufs]
    for _ in range(3):
        grads = [rng.standard_normal(s).astype(np.float32) for s in SHAPES]
        before = [p.copy() for p in params]
        F.muon_(params, grads, bufs, ns_dtype="float32", **kw)
        ref_before = [p.copy() for p in ref_p]
        ref_p, ref_b = R.muon(ref_p, grads, ref_b, **kw)
        # (a direction carries the params' float32 rounding divided by the small lr:
        # the params themselves are compared)
        for got, want in zip(params, ref_p):
            np.testing.assert_allclose(got, want, rtol=2e-6, atol=1e-6)
        for b, rb in zip(bufs, ref_b):
            np.testing.assert_allclose(b, rb, rtol=1e-6, atol=1e-7)
        ref_p = [p.astype(np.float32).astype(np.float64) for p in params]  # in step again
        ref_b = [b.astype(np.float64) for b in bufs]


def test_bfloat16_iterations_are_within_bfloat16_tolerance(rng):
    params, bufs = _data(rng)
    grads = [rng.standard_normal(s).astype(np.float32) for s in SHAPES]
    before = [p.copy() for p in params]
    ref_p, _ = R.muon([p.astype(np.float64) for p in params], grads,
                      [b.astype(np.float64) for b in bufs], **KW)
    F.muon_(params, grads, bufs, **KW)  # ns_dtype="bfloat16", the default
    for got, want in zip(_directions(before, params, KW), _directions(before, ref_p, KW)):
        err = np.abs(got - want).max() / np.abs(want).max()
        assert 1e-4 < err < 3e-2  # bfloat16's, not float32's


def test_momentum_is_torchs_lerp_bit_for_bit(rng):
    torch = pytest.importorskip("torch")
    params, bufs = _data(rng)
    grads = [rng.standard_normal(s).astype(np.float32) for s in SHAPES]
    want = [torch.from_numpy(b.copy()) for b in bufs]
    for b, g in zip(want, grads):
        b.lerp_(torch.from_numpy(g), 1 - KW["momentum"])
    F.muon_(params, grads, bufs, **KW)
    for b, w in zip(bufs, want):
        assert_same_bits(b, w.numpy(), "momentum buffer")


@pytest.mark.parametrize("shape", [(3, 16, 24), (2, 40, 8), (1, 12, 12)])
def test_float32_newton_schulz_matches_float64(rng, shape):
    stack = rng.standard_normal(shape).astype(np.float32)
    got = _muon.newton_schulz(stack, KW["ns_coefficients"], 5, 1e-7, "float32")
    for k in range(shape[0]):
        want = R.newton_schulz(stack[k], KW["ns_coefficients"], 5, 1e-7)
        np.testing.assert_allclose(got[k], want, rtol=0, atol=2e-6 * np.abs(want).max())


@pytest.mark.parametrize("ns_dtype", ["float32", "bfloat16"])
def test_iterations_batched_over_a_stack_equal_one_by_one(rng, ns_dtype):
    stack = rng.standard_normal((4, 16, 24)).astype(np.float32)
    batched = _muon.newton_schulz(stack, KW["ns_coefficients"], 5, 1e-7, ns_dtype)
    for k in range(4):
        one = _muon.newton_schulz(stack[k:k + 1], KW["ns_coefficients"], 5, 1e-7, ns_dtype)
        assert_same_bits(np.asarray(batched[k]), np.asarray(one[0]), f"matrix {k}")
    tall = np.ascontiguousarray(np.swapaxes(stack, 1, 2))
    np.testing.assert_array_equal(_muon.newton_schulz(tall, KW["ns_coefficients"], 5, 1e-7,
                                                      ns_dtype),
                                  np.swapaxes(batched, 1, 2))


def test_one_batched_product_per_operation_and_shape(rng, monkeypatch):
    params, bufs = _data(rng)
    grads = [rng.standard_normal(s).astype(np.float32) for s in SHAPES]
    calls = []
    real = np.matmul

    def counting(a, b, *args, **kw):
        calls.append(a.shape[0])
        return real(a, b, *args, **kw)

    monkeypatch.setattr(_muon.np, "matmul", counting)
    F.muon_(params, grads, bufs, **KW)
    # 4 shapes ((16, 24) x2, (24, 16) x2, (12, 12), (5, 40)), 3 products per iteration
    assert len(calls) == 4 * 3 * KW["ns_steps"]
    assert sorted(set(calls)) == [1, 2]


def test_bad_input(rng):
    p = [np.ones((3, 4), np.float32)]
    with pytest.raises(ValueError, match="only supports 2D parameters.*size: \\(3,\\)"):
        F.muon_([np.ones(3, np.float32)], [np.ones(3, np.float32)],
                [np.zeros(3, np.float32)], **KW)
    with pytest.raises(ValueError, match="momentum_buffers\\[0\\] has shape"):
        F.muon_(p, [np.ones((3, 4), np.float32)], [np.zeros((4, 3), np.float32)], **KW)
    with pytest.raises(ValueError, match="ns_dtype must be one of"):
        F.muon_(p, [np.ones((3, 4), np.float32)], [np.zeros((3, 4), np.float32)],
                **dict(KW, ns_dtype="float16"))
    np.testing.assert_array_equal(p[0], 1.0)
    with pytest.raises(ValueError, match="only supports 2D"):
        fo.Muon([np.zeros((2, 2, 2))])


def test_numpy_class_state_dict_and_ema(rng):
    params, _ = _data(rng)
    start = [p.copy() for p in params]
    runs = []
    for reload in (False, True):
        ps = [p.copy() for p in start]
        opt = fo.Muon(ps, lr=0.02, ns_dtype="float32", ema_decay=0.9)
        r = np.random.default_rng(4)
        for k in range(3):
            if reload and k == 2:
                sd = opt.state_dict()
                opt = fo.Muon(ps, lr=0.02, ns_dtype="float32", ema_decay=0.9)
                opt.load_state_dict(sd)
            opt.step([r.standard_normal(s).astype(np.float32) for s in SHAPES])
        runs.append(ps + [opt.state[i]["ema"] for i in range(len(ps))] +
                    [opt.state[i]["momentum_buffer"] for i in range(len(ps))])
    for a, b in zip(*runs):
        assert_same_bits(a, b, "after reload")


# --- fusedopt.torch.Muon against torch.optim.Muon ----------------------------------------

torch = pytest.importorskip("torch")
fot = pytest.importorskip("fusedopt.torch")


def _torch_params(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(*s, generator=g)) for s in SHAPES]


@pytest.mark.parametrize("opts", [dict(lr=0.02), dict(lr=0.01, nesterov=False,
                                                       adjust_lr_fn="match_rms_adamw")], ids=str)
def test_torch_class_follows_torch_optim_within_bfloat16(opts):
    """Each step from the same params and buffers: the same momentum (bit for bit) and
    the same update directions within bfloat16's tolerance."""
    mine, theirs = _torch_params(), _torch_params()
    fopt, topt = fot.Muon(mine, **opts), torch.optim.Muon(theirs, **opts)
    g = torch.Generator().manual_seed(1)
    kw = dict(KW, **{k: v for k, v in opts.items()})
    for _ in range(4):
        grads = [torch.randn(*s, generator=g) for s in SHAPES]
        before = [p.detach().numpy().copy() for p in theirs]
        for ps in (mine, theirs):
            for p, gr in zip(ps, grads):
                p.grad = gr.clone()
        fopt.step()
        topt.step()
        got = _directions(before, [p.detach().numpy() for p in mine], kw)
        want = _directions(before, [p.detach().numpy() for p in theirs], kw)
        for a, b in zip(got, want):
            assert np.abs(a - b).max() <= 2e-2 * np.abs(b).max()
        for p, q in zip(mine, theirs):
            assert torch.equal(fopt.state[p]["momentum_buffer"], topt.state[q]["momentum_buffer"])
            with torch.no_grad():  # the next step starts from the same params
                p.copy_(q)


def test_torch_class_float32_matches_the_reference():
    params = _torch_params()
    opt = fot.Muon(params, lr=0.02, ns_dtype="float32")
    ref_p = [p.detach().double().numpy() for p in params]
    ref_b = [np.zeros(s) for s in SHAPES]
    g = torch.Generator().manual_seed(2)
    for _ in range(3):
        grads = [torch.randn(*s, generator=g) for s in SHAPES]
        for p, gr in zip(params, grads):
            p.grad = gr
        opt.step()
        ref_p, ref_b = R.muon(ref_p, [x.numpy() for x in grads], ref_b, **dict(KW, lr=0.02))
        for a, b in zip(params, ref_p):
            np.testing.assert_allclose(a.detach().numpy(), b, rtol=2e-6, atol=1e-6)
        ref_p = [p.detach().double().numpy() for p in params]
        ref_b = [opt.state[p]["momentum_buffer"].double().numpy() for p in params]


@pytest.mark.parametrize("direction", ["torch_to_fusedopt", "fusedopt_to_torch"])
def test_torch_state_dicts_cross_over(direction):
    a, b = _torch_params(), _torch_params()
    fopt, topt = fot.Muon(a, lr=0.02), torch.optim.Muon(b, lr=0.02)
    first, second = ((b, topt), (a, fopt)) if direction == "torch_to_fusedopt" else \
        ((a, fopt), (b, topt))
    g = torch.Generator().manual_seed(3)
    for _ in range(2):
        for p in first[0]:
            p.grad = torch.randn(p.shape, generator=g)
        first[1].step()
    with torch.no_grad():
        for p, q in zip(second[0], first[0]):
            p.copy_(q)
    second[1].load_state_dict(copy.deepcopy(first[1].state_dict()))
    for p, q in zip(second[0], first[0]):
        assert torch.equal(second[1].state[p]["momentum_buffer"],
                           first[1].state[q]["momentum_buffer"])
    grads = [torch.randn(p.shape, generator=g) for p in first[0]]
    before = [p.detach().numpy().copy() for p in first[0]]
    for ps, opt in (first, second):
        for p, gr in zip(ps, grads):
            p.grad = gr.clone()
        opt.step()
    for x, y in zip(_directions(before, [p.detach().numpy() for p in second[0]], KW),
                    _directions(before, [p.detach().numpy() for p in first[0]], KW)):
        assert np.abs(x - y).max() <= 2e-2 * np.abs(y).max()


@pytest.mark.parametrize("kwargs", [dict(lr=-1.0), dict(momentum=-0.1), dict(weight_decay=-1.0),
                                    dict(adjust_lr_fn="cosine")])
def test_torch_validation_messages(kwargs):
    p = [torch.zeros(3, 2, requires_grad=True)]
    with pytest.raises(ValueError) as theirs:
        torch.optim.Muon(p, **kwargs)
    with pytest.raises(ValueError) as mine:
        fot.Muon(p, **kwargs)
    assert str(mine.value) == str(theirs.value)


def test_torch_two_d_only_message():
    p = [torch.zeros(3, requires_grad=True)]
    with pytest.raises(ValueError) as theirs:
        torch.optim.Muon(p)
    with pytest.raises(ValueError) as mine:
        fot.Muon(p)
    assert str(mine.value) == str(theirs.value)


@pytest.mark.parametrize("cls", [fo.Muon, fo.Adafactor])
def test_checked_steps_run_on_the_host(cls):
    """Muon and Adafactor (composite steps) clip, loss-scale and skip on the host: a
    clipped step equals a step on the gradients scaled by the clip's coefficient, a
    loss-scaled one a step on the unscaled gradients, and a step with a NaN gradient
    changes nothing."""
    rng = np.random.default_rng(11)
    shapes = [(6, 5), (4, 4), (5, 6)]
    start = [rng.standard_normal(s) for s in shapes]
    grads = [[rng.standard_normal(s) for s in shapes] for _ in range(3)]

    def make():
        return cls([p.copy() for p in start], lr=0.05)

    def params(opt):
        return [p.copy() for p in opt.param_groups[0]["params"]]

    clipped, scaled, plain, unscaled = make(), make(), make(), make()
    for g in grads:
        norm = np.sqrt(sum(float(np.sum(x * x)) for x in g))
        info = clipped.step(g, max_grad_norm=0.5 * norm)
        assert not info.skipped and info.grad_norm == pytest.approx(norm, rel=1e-12)
        coef = 0.5 * norm / (norm + 1e-6)
        scaled.step([x * coef for x in g])
        plain.step([x * 256.0 for x in g], loss_scale=256.0)
        unscaled.step(g)
    for a, b in zip(params(clipped), params(scaled)):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-15)
    for a, b in zip(params(plain), params(unscaled)):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-15)

    before, state = params(unscaled), copy.deepcopy(unscaled.state_dict())
    bad = [x.copy() for x in grads[0]]
    bad[1][2, 3] = np.nan
    info = unscaled.step(bad, skip_nonfinite=True)
    assert info.skipped
    for a, b in zip(params(unscaled), before):
        np.testing.assert_array_equal(a, b)
    after = unscaled.state_dict()
    for k, st in state["state"].items():
        for key, value in st.items():
            np.testing.assert_array_equal(np.asarray(after["state"][k][key]), np.asarray(value))


def test_functional_checked_steps_run_on_the_host():
    """muon_ with max_grad_norm equals muon_ on the gradients scaled by the clip's
    coefficient; with skip_nonfinite and a NaN gradient it changes nothing."""
    rng = np.random.default_rng(12)
    shapes = [(6, 5), (4, 4)]
    start = [rng.standard_normal(s) for s in shapes]
    g = [rng.standard_normal(s) for s in shapes]
    norm = np.sqrt(sum(float(np.sum(x * x)) for x in g))
    runs = []
    for grads, checks in (
            (g, dict(max_grad_norm=0.5 * norm)),
            ([x * (0.5 * norm / (norm + 1e-6)) for x in g], {})):
        p, m = [x.copy() for x in start], [np.zeros(s) for s in shapes]
        info = F.muon_(p, grads, m, lr=0.05, **checks)
        runs.append((p, m, info))
    assert runs[0][2].grad_norm == pytest.approx(norm, rel=1e-12)
    for a, b in zip(runs[0][0] + runs[0][1], runs[1][0] + runs[1][1]):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-15)
    p, m = [x.copy() for x in start], [np.ones(s) for s in shapes]
    bad = [x.copy() for x in g]
    bad[0][1, 1] = np.inf
    assert F.muon_(p, bad, m, lr=0.05, skip_nonfinite=True).skipped
    for a, b in zip(p + m, start + [np.ones(s) for s in shapes]):
        np.testing.assert_array_equal(a, b)
