"""Adafactor: the factored drivers against the float64 reference (matrices, stacks of
matrices, vectors, 0-d params), the same bits for every thread count, the NumPy class
with its state dicts, fusedopt.torch.Adafactor against torch.optim.Adafactor on a float64
MLP for 50 steps with state dicts both ways, torch's messages."""

from __future__ import annotations

import copy

import numpy as np
import pytest

import fusedopt as fo
from fusedopt import functional as F
from fusedopt import reference as R
from fusedopt.algorithms import SPECS
from cases import assert_same_bits

SPEC = SPECS["adafactor"]
SHAPES = [(6, 5), (3, 4, 7), (9,), (), (1, 8), (8, 1), (300, 70)]
VARIANTS = [dict(), dict(weight_decay=0.1, maximize=True), dict(eps1=1e-20, eps2=0.5, d=1.5),
            dict(beta2_decay=-0.5, lr=0.5)]


def _buffers(shapes, dtype, rng=None):
    rows, cols, var = [], [], []
    for s in shapes:
        def fill(shape):
            if shape is None:
                return None
            return (rng.uniform(0.01, 1.0, shape) if rng is not None else np.zeros(shape)
                    ).astype(dtype)
        rows.append(fill(SPEC.state_shape("row_var", s)))
        cols.append(fill(SPEC.state_shape("col_var", s)))
        var.append(fill(SPEC.state_shape("variance", s)))
    return rows, cols, var


def _kw(variant, t):
    kw = dict(lr=1e-2, beta2_decay=-0.8, eps1=None, eps2=1e-3, d=1.0, weight_decay=0.0,
              maximize=False)
    kw.update(variant)
    return dict(kw, step=t)


@pytest.mark.parametrize("variant", VARIANTS, ids=str)
@pytest.mark.parametrize("dtype,rtol,atol", [(np.float64, 1e-12, 1e-15), (np.float32, 2e-5, 1e-6)])
def test_functional_matches_reference(rng, variant, dtype, rtol, atol):
    params = [rng.standard_normal(s).astype(dtype) for s in SHAPES]
    state = _buffers(SHAPES, dtype, rng)
    ref = [[p.astype(np.float64) for p in params]] + \
        [[None if b is None else b.astype(np.float64) for b in lst] for lst in state]
    for t in range(1, 5):
        grads = [rng.standard_normal(s).astype(dtype) for s in SHAPES]
        F.adafactor_(params, grads, *state, **_kw(variant, t))
        kw = _kw(variant, t)
        if kw["eps1"] is None:  # (the reference's machine epsilon is the float64 one)
            kw["eps1"] = float(np.finfo(dtype).eps)
        ref = list(R.adafactor(*ref[:1], grads, *ref[1:], **kw))
        for got, want in zip([params, *state], ref):
            for a, b in zip(got, want):
                assert (a is None) == (b is None)
                if a is not None:
                    np.testing.assert_allclose(a, b, rtol=rtol, atol=atol)


def test_same_bits_for_every_thread_count(rng):
    shapes = [(700, 300), (40000,), (2, 50, 900)]
    base = [rng.standard_normal(s) for s in shapes]
    grads = [rng.standard_normal(s) for s in shapes]
    out = []
    for threads in (1, 2):
        fo.set_num_threads(threads)
        params = [p.copy() for p in base]
        state = _buffers(shapes, np.float64)
        for t in (1, 2):
            F.adafactor_(params, grads, *state, **_kw({}, t))
        out.append(params + [b for lst in state for b in lst if b is not None])
    for a, b in zip(*out):
        assert_same_bits(a, b, "1 vs 2 threads")


def test_strided_gradients_are_read_as_they_are(rng):
    """A gradient that is not C-contiguous (a transpose) is read through its contiguous
    copy: the same bits as the contiguous gradient."""
    shapes = [(4, 6), (2, 5, 3), (7,)]
    start = [rng.standard_normal(s) for s in shapes]
    grads = [rng.standard_normal(s[::-1]).T for s in shapes]
    assert not any(g.flags.c_contiguous for g in grads[:2])
    out = []
    for given in (grads, [np.ascontiguousarray(g) for g in grads]):
        params = [p.copy() for p in start]
        state = _buffers(shapes, np.float64)
        for t in (1, 2):
            F.adafactor_(params, given, *state, **_kw({}, t))
        out.append(params + [b for lst in state for b in lst if b is not None])
    for a, b in zip(*out):
        assert_same_bits(a, b, "strided vs contiguous")


def test_bad_input_raises_and_changes_nothing(rng):
    p = [np.ones((4, 3)), np.ones(5)]
    g = [np.ones((4, 3)), np.ones(5)]
    rows, cols, var = _buffers([(4, 3), (5,)], np.float64)
    with pytest.raises(ValueError, match=r"params\[0\] with shape \(4, 3\) needs row_vars\[0\]"):
        F.adafactor_(p, g, [None, None], cols, var, **_kw({}, 1))
    with pytest.raises(ValueError, match=r"col_vars\[0\] has shape \(3, 1\)"):
        F.adafactor_(p, g, rows, [np.zeros((3, 1)), None], var, **_kw({}, 1))
    with pytest.raises(TypeError, match=r"variances\[1\] has dtype float32"):
        F.adafactor_(p, g, rows, cols, [None, np.zeros(5, np.float32)], **_kw({}, 1))
    with pytest.raises(ValueError, match=r"params\[1\] and variances\[1\] share memory"):
        F.adafactor_(p, g, rows, cols, [None, p[1]], **_kw({}, 1))
    shared = np.zeros(12)  # a gradient that is also a factor's memory
    with pytest.raises(ValueError, match=r"row_vars\[0\] and grads\[0\] share memory"):
        F.adafactor_(p, [shared.reshape(4, 3), g[1]], [shared[:4].reshape(4, 1), None],
                     cols, var, **_kw({}, 1))
    assert not shared.any()
    with pytest.raises(ValueError, match="master_params is not supported"):
        F.adafactor_(p, g, rows, cols, var, master_params=[None, None], **_kw({}, 1))
    for a in p:
        np.testing.assert_array_equal(a, 1.0)
    assert not rows[0].any() and not cols[0].any() and not var[1].any()


def test_numpy_class_matches_reference_and_state_dicts(rng):
    shapes = [(6, 5), (9,)]
    params = [rng.standard_normal(s) for s in shapes]
    opt = fo.Adafactor(params, lr=0.05, weight_decay=0.01)
    ref = [[p.copy() for p in params]] + [list(x) for x in _buffers(shapes, np.float64)]
    for t in range(1, 6):
        grads = [rng.standard_normal(s) for s in shapes]
        if t == 3:
            sd = opt.state_dict()
            assert sd["state"][0]["row_var"].shape == (6, 1)
            assert sd["state"][0]["col_var"].shape == (1, 5)
            assert "variance" not in sd["state"][0] and "row_var" not in sd["state"][1]
            opt = fo.Adafactor(params, lr=0.05, weight_decay=0.01)
            opt.load_state_dict(sd)
        opt.step(grads)
        ref = list(R.adafactor(*ref[:1], grads, *ref[1:], **dict(
            _kw(dict(lr=0.05, weight_decay=0.01), t), eps1=float(np.finfo(np.float64).eps))))
    for a, b in zip(params, ref[0]):
        np.testing.assert_allclose(a, b, rtol=1e-12)
    np.testing.assert_allclose(opt.state[0]["col_var"], ref[2][0], rtol=1e-12)
    bad = copy.deepcopy(opt.state_dict())
    bad["state"][0]["row_var"] = np.zeros((5, 1))
    with pytest.raises(ValueError, match=r"row_var of param 0 has shape \(5, 1\), expected"):
        fo.Adafactor(params).load_state_dict(bad)


def test_ema_of_the_params(rng):
    torch = pytest.importorskip("torch")
    params = [rng.standard_normal((6, 5)), rng.standard_normal(4)]
    opt = fo.Adafactor(params, lr=0.1, ema_decay=0.5)
    opt.step([rng.standard_normal(p.shape) for p in params])
    first = [p.copy() for p in params]
    for i, p in enumerate(params):
        assert_same_bits(opt.state[i]["ema"], p, "the first step copies")
    opt.step([rng.standard_normal(p.shape) for p in params])
    for i, (p, f) in enumerate(zip(params, first)):
        want = torch.lerp(torch.from_numpy(f), torch.from_numpy(p), 0.5).numpy()
        assert_same_bits(opt.state[i]["ema"], want, "then torch's EMA update")


# --- fusedopt.torch.Adafactor against torch.optim.Adafactor --------------------------------

torch = pytest.importorskip("torch")
fot = pytest.importorskip("fusedopt.torch")

OPTIONS = [dict(), dict(lr=0.05, weight_decay=0.01), dict(maximize=True, lr=1e-3),
           dict(eps=(1e-30, 1e-2), d=2.0, beta2_decay=-0.5)]


class Net(torch.nn.Module):
    """An MLP with a stack of matrices (a 3-D param) besides matrices and vectors."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(3)
        self.a = torch.nn.Linear(6, 8)
        self.stack = torch.nn.Parameter(0.3 * torch.randn(2, 8, 4))
        self.b = torch.nn.Linear(8, 2)
        self.double()

    def forward(self, x):
        h = torch.tanh(self.a(x))
        h = torch.einsum("ni,kij->nj", h, self.stack)
        return self.b(torch.cat([h, h], dim=1))


def data():
    g = torch.Generator().manual_seed(7)
    return (torch.randn(32, 6, generator=g, dtype=torch.float64),
            torch.randn(32, 2, generator=g, dtype=torch.float64))


def train(model, opt, steps):
    x, y = data()
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = ((model(x) - y) ** 2).mean()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def assert_close(m1, o1, m2, o2, what):
    for (name, a), b in zip(m1.named_parameters(), m2.parameters()):
        np.testing.assert_allclose(a.detach().numpy(), b.detach().numpy(), rtol=1e-9,
                                   atol=1e-12, err_msg=f"{what}: {name}")
        s1, s2 = o1.state[a], o2.state[b]
        assert sorted(s1) == sorted(s2), what
        for k in s1:
            assert s1[k].dtype == s2[k].dtype and s1[k].shape == s2[k].shape, k
            np.testing.assert_allclose(s1[k].numpy(), s2[k].numpy(), rtol=1e-9, atol=1e-15,
                                       err_msg=f"{what}: {name} {k}")


@pytest.mark.parametrize("opts", OPTIONS, ids=str)
def test_torch_class_matches_torch_optim(opts):
    fm, tm = Net(), Net()
    start = [p.detach().clone() for p in fm.parameters()]
    fopt, topt = fot.Adafactor(fm.parameters(), **opts), torch.optim.Adafactor(tm.parameters(),
                                                                                 **opts)
    fl, tl = train(fm, fopt, 50), train(tm, topt, 50)
    np.testing.assert_allclose(fl, tl, rtol=1e-9, atol=1e-12)
    assert_close(fm, fopt, tm, topt, "50 steps")
    assert max((p.detach() - s).abs().max().item() for p, s in zip(fm.parameters(), start)) > 1e-3


@pytest.mark.parametrize("direction", ["torch_to_fusedopt", "fusedopt_to_torch"])
def test_torch_state_dicts_cross_over(direction):
    fm, tm = Net(), Net()
    fopt = fot.Adafactor(fm.parameters(), lr=0.05, weight_decay=0.01)
    topt = torch.optim.Adafactor(tm.parameters(), lr=0.05, weight_decay=0.01)
    first, second = ((tm, topt), (fm, fopt)) if direction == "torch_to_fusedopt" else \
        ((fm, fopt), (tm, topt))
    train(*first, 20)
    second[0].load_state_dict(first[0].state_dict())
    second[1].load_state_dict(copy.deepcopy(first[1].state_dict()))
    l1, l2 = train(*first, 20), train(*second, 20)
    np.testing.assert_allclose(l2, l1, rtol=1e-9)
    assert_close(second[0], second[1], first[0], first[1], direction)


@pytest.mark.parametrize("kwargs", [dict(lr=-1.0), dict(beta2_decay=0.5), dict(eps=(-1.0, 1e-3)),
                                    dict(eps=(None, -1.0)), dict(d=0.5),
                                    dict(weight_decay=-0.1)])
def test_torch_validation_messages(kwargs):
    p = [torch.zeros(3, 2, requires_grad=True)]
    with pytest.raises(ValueError) as theirs:
        torch.optim.Adafactor(p, **kwargs)
    with pytest.raises(ValueError) as mine:
        fot.Adafactor(p, **kwargs)
    assert str(mine.value) == str(theirs.value)


def test_torch_names_exist():
    for name in ("LBFGS", "SparseAdam", "Muon", "Adafactor"):
        assert issubclass(getattr(fot, name), torch.optim.Optimizer)
        assert name in fot.__all__


def test_functional_checked_steps_run_on_the_host():
    """adafactor_ with max_grad_norm equals adafactor_ on the gradients scaled by the
    clip's coefficient; with skip_nonfinite and a NaN gradient it changes nothing."""
    rng = np.random.default_rng(12)
    shapes = [(6, 5), (7,)]
    start = [rng.standard_normal(s) for s in shapes]
    g = [rng.standard_normal(s) for s in shapes]
    norm = np.sqrt(sum(float(np.sum(x * x)) for x in g))
    runs = []
    for grads, checks in (
            (g, dict(max_grad_norm=0.5 * norm)),
            ([x * (0.5 * norm / (norm + 1e-6)) for x in g], {})):
        p, bufs = [x.copy() for x in start], _buffers(shapes, np.float64)
        info = F.adafactor_(p, grads, *bufs, step=1, lr=0.05, **checks)
        runs.append((p, bufs, info))
    assert runs[0][2].grad_norm == pytest.approx(norm, rel=1e-12)
    for a, b in zip(runs[0][0], runs[1][0]):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-15)
    for x, y in zip(runs[0][1], runs[1][1]):
        for a, b in zip(x, y):
            if a is not None:
                np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-15)
    p, bufs = [x.copy() for x in start], _buffers(shapes, np.float64, rng)
    saved = [[None if a is None else a.copy() for a in x] for x in bufs]
    bad = [x.copy() for x in g]
    bad[1][3] = np.nan
    assert F.adafactor_(p, bad, *bufs, step=1, lr=0.05, skip_nonfinite=True).skipped
    for a, b in zip(p, start):
        np.testing.assert_array_equal(a, b)
    for x, y in zip(bufs, saved):
        for a, b in zip(x, y):
            if a is not None:
                np.testing.assert_array_equal(a, b)
