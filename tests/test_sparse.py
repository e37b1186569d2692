"""SparseAdam and row-sparse gradients: the functional op and the NumPy class against the
float64 reference, fusedopt.torch.SparseAdam against torch.optim.SparseAdam on sparse
embeddings with repeated indices; rows never touched keep their bits, state included."""

from __future__ import annotations

import copy

import numpy as np
import pytest

import fusedopt as fo
from fusedopt import functional as F
from fusedopt import reference as R
from cases import assert_same_bits

KW = dict(lr=0.05, beta1=0.9, beta2=0.99, eps=1e-8)
SHAPES = [(50, 4), (7,), (300, 3, 2)]


def _rows(rng, shape, count, spread=None):
    """Row indices with repeats (each drawn from the first `spread` rows)."""
    return rng.integers(0, spread or shape[0], count)


def _grads(rng, shapes, dtype, counts=(12, 3, 40), spread=(20, 7, 100)):
    rows = [_rows(rng, s, c, sp) for s, c, sp in zip(shapes, counts, spread)]
    values = [rng.standard_normal((len(r), *s[1:])).astype(dtype) for r, s in zip(rows, shapes)]
    return rows, values


@pytest.mark.parametrize("dtype,rtol", [(np.float64, 1e-12), (np.float32, 2e-5)])
@pytest.mark.parametrize("maximize", [False, True])
def test_functional_matches_reference_and_leaves_other_rows(rng, dtype, rtol, maximize):
    params = [rng.standard_normal(s).astype(dtype) for s in SHAPES]
    m = [0.1 * rng.standard_normal(s).astype(dtype) for s in SHAPES]
    v = [rng.uniform(0.1, 1.0, s).astype(dtype) for s in SHAPES]
    start = [[a.copy() for a in x] for x in (params, m, v)]
    ref = [[a.astype(np.float64) for a in x] for x in (params, m, v)]
    touched = [set() for _ in SHAPES]
    for t in range(1, 5):
        rows, values = _grads(rng, SHAPES, dtype)
        for k, r in enumerate(rows):
            touched[k].update(r.tolist())
        F.sparse_adam_(params, rows, values, m, v, step=t, maximize=maximize, **KW)
        ref = R.sparse_adam(*ref[:1], rows, values, *ref[1:], step=t, maximize=maximize, **KW)
        ref = [list(x) for x in ref]
        for got, want in zip((params, m, v), ref):
            for a, b in zip(got, want):
                np.testing.assert_allclose(a, b, rtol=rtol, atol=rtol)
    for x, x0 in zip((params, m, v), start):
        for k, (a, a0) in enumerate(zip(x, x0)):
            other = np.setdiff1d(np.arange(a.shape[0]), sorted(touched[k]))
            assert other.size and len(touched[k])
            assert_same_bits(a[other], a0[other], f"untouched rows of tensor {k}")


def test_repeated_rows_are_summed_first(rng):
    """Rows 3 (three times) and 5 (twice) in any order: the same as their sums once."""
    p1, p2 = np.ones((8, 3)), np.ones((8, 3))
    m1, m2, v1, v2 = (np.zeros((8, 3)) for _ in range(4))
    vals = rng.standard_normal((5, 3))
    F.sparse_adam_([p1], [np.array([5, 3, 3, 5, 3])], [vals], [m1], [v1], step=1, **KW)
    summed = np.stack([vals[1] + vals[2] + vals[4], vals[0] + vals[3]])
    F.sparse_adam_([p2], [np.array([3, 5])], [summed], [m2], [v2], step=1, **KW)
    for a, b in ((p1, p2), (m1, m2), (v1, v2)):
        np.testing.assert_allclose(a, b, rtol=1e-15)


def test_empty_gradient_changes_nothing(rng):
    p, m, v = np.ones((4, 2)), np.zeros((4, 2)), np.zeros((4, 2))
    F.sparse_adam_([p], [np.zeros(0, np.int64)], [np.zeros((0, 2))], [m], [v], step=1, **KW)
    np.testing.assert_array_equal(p, 1.0)


def test_same_bits_for_every_thread_count(rng):
    shape = (20000, 8)
    base = rng.standard_normal(shape)
    rows = rng.integers(0, shape[0], 15000)
    values = rng.standard_normal((len(rows), 8))
    out = []
    for threads in (1, 2):
        fo.set_num_threads(threads)
        p, m, v = base.copy(), np.zeros(shape), np.zeros(shape)
        F.sparse_adam_([p], [rows], [values], [m], [v], step=3, **KW)
        out.append((p, m, v))
    for a, b in zip(*out):
        assert_same_bits(a, b, "1 vs 2 threads")


@pytest.mark.parametrize("bad,kind,match", [
    (dict(rows=[np.array([0, 8])]), ValueError, r"rows\[0\] holds 8, outside \[0, 8\)"),
    (dict(rows=[np.array([-1, 2])]), ValueError, r"holds -1"),
    (dict(rows=[np.array([0.0, 1.0])]), TypeError, "1-D integer"),
    (dict(values=[np.ones((2, 4))]), ValueError, r"values\[0\] has shape \(2, 4\)"),
    (dict(values=[np.ones((2, 3), np.float32)]), TypeError, "values.0. has dtype float32"),
    (dict(m=[np.zeros((8, 2))]), ValueError, r"exp_avgs\[0\] has shape"),
    (dict(m=[np.zeros((8, 3), np.float32)]), TypeError, "exp_avgs"),
    (dict(v=None), ValueError, "exp_avg_sqs is required"),
    (dict(rows=[[0, 3]]), TypeError, r"rows\[0\] is not an array, got list"),
    (dict(rows=[np.array([[0], [3]])]), TypeError, r"rows\[0\] must be a 1-D integer array, "
                                                   r"got shape \(2, 1\)"),
    (dict(values=[[[1.0] * 3] * 2]), TypeError, r"values\[0\] is not an array, got list"),
])
def test_bad_input_raises_and_changes_nothing(bad, kind, match):
    args = dict(rows=[np.array([0, 3])], values=[np.ones((2, 3))], m=[np.zeros((8, 3))],
                v=[np.zeros((8, 3))])
    p = [np.ones((8, 3))]
    args.update(bad)
    with pytest.raises(kind, match=match):
        F.sparse_adam_(p, args["rows"], args["values"], args["m"], args["v"], step=1, **KW)
    np.testing.assert_array_equal(p[0], 1.0)
    for a in (args["m"] or []) + (args["v"] or []):
        assert not a.any()


def test_unsupported_step_options_are_refused():
    p, m, v = [np.ones((3, 2))], [np.zeros((3, 2))], [np.zeros((3, 2))]
    with pytest.raises(ValueError, match="max_grad_norm is not supported with row-sparse"):
        F.sparse_adam_(p, [np.array([1])], [np.ones((1, 2))], m, v, step=1,
                       max_grad_norm=1.0, **KW)
    np.testing.assert_array_equal(p[0], 1.0)


def test_numpy_class_matches_reference_with_state_dicts(rng):
    params = [rng.standard_normal(s) for s in SHAPES[:2]]
    opt = fo.SparseAdam(params, lr=0.05, betas=(0.8, 0.99))
    ref = [[p.copy() for p in params], [np.zeros(s) for s in SHAPES[:2]],
           [np.zeros(s) for s in SHAPES[:2]]]
    steps = [0, 0]
    for k in range(5):
        rows, values = _grads(rng, SHAPES[:2], np.float64, counts=(9, 4), spread=(30, 7))
        grads = [(r, v) for r, v in zip(rows, values)]
        if k == 1:
            grads[1] = None  # no step for it
        if k == 3:
            sd = opt.state_dict()
            opt = fo.SparseAdam(params, lr=0.05, betas=(0.8, 0.99))
            opt.load_state_dict(sd)
        opt.step(grads)
        for j, g in enumerate(grads):
            if g is None:
                continue
            steps[j] += 1
            out = R.sparse_adam([ref[0][j]], [g[0]], [g[1]], [ref[1][j]], [ref[2][j]],
                                step=steps[j], lr=0.05, beta1=0.8, beta2=0.99, eps=1e-8)
            ref[0][j], ref[1][j], ref[2][j] = out[0][0], out[1][0], out[2][0]
    for j in range(2):
        np.testing.assert_allclose(params[j], ref[0][j], rtol=1e-12)
        np.testing.assert_allclose(opt.state[j]["exp_avg"], ref[1][j], rtol=1e-12, atol=1e-15)
        assert opt.state[j]["step"] == steps[j]


def test_numpy_class_with_ema_moves_every_row(rng):
    table = rng.standard_normal((10, 3))
    opt = fo.SparseAdam([table], lr=0.1, ema_decay=0.5)
    opt.step([(np.array([1, 2]), np.ones((2, 3)))])
    first = table.copy()
    assert_same_bits(opt.state[0]["ema"], first, "the first update copies")
    opt.step([(np.array([4]), np.ones((1, 3)))])
    import torch

    want = torch.from_numpy(first.copy())
    torch.lerp(want, torch.from_numpy(table), 0.5, out=want)
    assert_same_bits(opt.state[0]["ema"], want.numpy(), "every row of the average moves")


# --- fusedopt.torch.SparseAdam against torch.optim.SparseAdam -------------------------------

torch = pytest.importorskip("torch")
fot = pytest.importorskip("fusedopt.torch")


class Bag(torch.nn.Module):
    """Two sparse embeddings (the second one 3-D per row) and a dense read-out."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(11)
        self.a = torch.nn.Embedding(40, 5, sparse=True).double()
        self.b = torch.nn.Embedding(30, 5, sparse=True).double()

    def forward(self, i, j):
        return (self.a(i) * self.b(j)).sum(-1)


def batches(steps):
    g = torch.Generator().manual_seed(5)
    for _ in range(steps):
        # indices from the first 25 / 20 rows only, with repeats: the rest stays untouched
        i = torch.randint(0, 25, (16,), generator=g)
        j = torch.randint(0, 20, (16,), generator=g)
        y = torch.randn(16, generator=g, dtype=torch.float64)
        yield i, j, y


def train(model, opt, steps, skip=()):
    losses = []
    for k, (i, j, y) in enumerate(batches(steps)):
        opt.zero_grad()
        loss = ((model(i, j) - y) ** 2).mean()
        loss.backward()
        if k in skip:
            model.b.weight.grad = None
        opt.step()
        losses.append(loss.item())
    return losses


OPTS = [dict(lr=0.05), dict(lr=0.02, betas=(0.8, 0.95), eps=1e-6, maximize=True)]


@pytest.mark.parametrize("opts", OPTS, ids=str)
def test_torch_class_matches_torch_optim(opts):
    tm, fm = Bag(), Bag()
    start = copy.deepcopy(fm.state_dict())
    topt = torch.optim.SparseAdam(tm.parameters(), **opts)
    fopt = fot.SparseAdam(fm.parameters(), **opts)
    tl = train(tm, topt, 50, skip={4, 9})
    fl = train(fm, fopt, 50, skip={4, 9})
    np.testing.assert_allclose(fl, tl, rtol=1e-9, atol=1e-12)
    for (name, a), b in zip(fm.named_parameters(), tm.parameters()):
        np.testing.assert_allclose(a.detach().numpy(), b.detach().numpy(), rtol=1e-9,
                                   atol=1e-12, err_msg=name)
        mine, theirs = fopt.state[a], topt.state[b]
        assert mine["step"] == theirs["step"] and isinstance(mine["step"], int)
        for s in ("exp_avg", "exp_avg_sq"):
            np.testing.assert_allclose(mine[s].numpy(), theirs[s].numpy(), rtol=1e-9,
                                       atol=1e-15, err_msg=s)
        # rows no index ever reached keep their bits, and so do their moments
        rows = slice(25, None) if name == "a.weight" else slice(20, None)
        assert torch.equal(a.detach()[rows], start[name][rows])
        assert not mine["exp_avg"][rows].any() and not mine["exp_avg_sq"][rows].any()


@pytest.mark.parametrize("direction", ["torch_to_fusedopt", "fusedopt_to_torch"])
def test_torch_state_dicts_cross_over(direction):
    tm, fm = Bag(), Bag()
    topt = torch.optim.SparseAdam(tm.parameters(), lr=0.05)
    fopt = fot.SparseAdam(fm.parameters(), lr=0.05)
    first, second = ((tm, topt), (fm, fopt)) if direction == "torch_to_fusedopt" else \
        ((fm, fopt), (tm, topt))
    train(*first, 10)
    second[0].load_state_dict(first[0].state_dict())
    second[1].load_state_dict(copy.deepcopy(first[1].state_dict()))
    l1, l2 = train(*first, 10), train(*second, 10)
    np.testing.assert_allclose(l2, l1, rtol=1e-9)
    for a, b in zip(second[0].parameters(), first[0].parameters()):
        np.testing.assert_allclose(a.detach().numpy(), b.detach().numpy(), rtol=1e-9,
                                   atol=1e-12)
    for a, b in zip(second[0].parameters(), first[0].parameters()):
        assert second[1].state[a]["step"] == first[1].state[b]["step"]


@pytest.mark.parametrize("kwargs", [dict(lr=0.0), dict(eps=0.0), dict(betas=(1.0, 0.9)),
                                    dict(betas=(0.9, -0.1))])
def test_torch_validation_messages(kwargs):
    p = [torch.zeros(3, 2, requires_grad=True)]
    with pytest.raises(ValueError) as theirs:
        torch.optim.SparseAdam(p, **kwargs)
    with pytest.raises(ValueError) as mine:
        fot.SparseAdam(p, **kwargs)
    assert str(mine.value) == str(theirs.value)


def test_torch_dense_gradient_is_refused():
    lin = torch.nn.Linear(3, 2)
    lin(torch.ones(1, 3)).sum().backward()
    before = [p.detach().clone() for p in lin.parameters()]
    with pytest.raises(RuntimeError, match="does not support dense gradients"):
        fot.SparseAdam(lin.parameters()).step()
    for p, b in zip(lin.parameters(), before):
        assert torch.equal(p.detach(), b)
