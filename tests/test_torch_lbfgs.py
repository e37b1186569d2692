"""fusedopt.torch.LBFGS against torch.optim.LBFGS: torch's closure convention, the same
iterates on a float64 MLP, state dicts both ways, torch's errors."""

from __future__ import annotations

import copy
import io

import numpy as np
import pytest

torch = pytest.importorskip("torch")
fot = pytest.importorskip("fusedopt.torch")

# L-BFGS amplifies the last-bit differences of its dot products (fusedopt's are summed in
# double in a fixed order, torch's by BLAS) by about 10x per 10 iterations on this
# problem: 48 iterations stay within 1e-11, far inside rtol 1e-9.
RTOL, ATOL = 1e-9, 1e-12
VARIANTS = [dict(lr=0.5, line_search_fn=None), dict(lr=1.0, line_search_fn="strong_wolfe")]


@pytest.fixture(autouse=True)
def _one_thread():
    import fusedopt

    before = torch.get_num_threads(), fusedopt.get_num_threads()
    torch.set_num_threads(1)
    fusedopt.set_num_threads(1)
    yield
    torch.set_num_threads(before[0])
    fusedopt.set_num_threads(before[1])


def make_model():
    torch.manual_seed(3)
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(),
                               torch.nn.Linear(8, 2)).double()


def make_data():
    g = torch.Generator().manual_seed(7)
    return (torch.randn(32, 6, generator=g, dtype=torch.float64),
            torch.randn(32, 2, generator=g, dtype=torch.float64))


def closure_of(model, opt, data):
    x, y = data

    def closure():
        opt.zero_grad()
        loss = ((model(x) - y) ** 2).mean()
        loss.backward()
        return loss

    return closure


def run(model, opt, data, steps):
    return [float(opt.step(closure_of(model, opt, data)).detach()) for _ in range(steps)]


def pair(**opts):
    tm, fm = make_model(), make_model()
    opts = dict(dict(history_size=5, max_iter=4), **opts)
    return (tm, torch.optim.LBFGS(tm.parameters(), **opts)), \
        (fm, fot.LBFGS(fm.parameters(), **opts))


def assert_models_close(a, b, what):
    for i, (p, q) in enumerate(zip(a.parameters(), b.parameters())):
        np.testing.assert_allclose(p.detach().numpy(), q.detach().numpy(), rtol=RTOL,
                                   atol=ATOL, err_msg=f"{what}: param {i}")


def assert_states_close(mine, theirs, what):
    """The state both keep (torch's also holds its scratch list ``al``)."""
    assert set(mine) <= set(theirs), what
    for name in ("func_evals", "n_iter"):
        assert mine[name] == theirs[name], f"{what}: {name}"
    for name in ("t", "H_diag", "prev_loss"):
        assert float(mine[name]) == pytest.approx(float(theirs[name]), rel=RTOL), name
    # vectors: to rtol of their largest element (an element of a gradient near zero is
    # the difference of larger terms, and carries their absolute error)
    def vectors_close(a, b, name):
        a, b = np.asarray(a), np.asarray(b)
        np.testing.assert_allclose(a, b, rtol=RTOL, atol=RTOL * np.abs(b).max(),
                                   err_msg=f"{what}: {name}")

    for name in ("d", "prev_flat_grad"):
        assert mine[name].dtype == theirs[name].dtype and mine[name].shape == theirs[name].shape
        vectors_close(mine[name], theirs[name], name)
    for name in ("old_dirs", "old_stps", "ro"):
        assert len(mine[name]) == len(theirs[name]), f"{what}: {name}"
        for a, b in zip(mine[name], theirs[name]):
            vectors_close(a, b, name)


def first_state(opt, model):
    return opt.state[next(iter(model.parameters()))]


@pytest.mark.parametrize("opts", VARIANTS, ids=lambda o: str(o["line_search_fn"]))
def test_training_matches_torch(opts):
    data = make_data()
    (tm, topt), (fm, fopt) = pair(**opts)
    start = [p.detach().clone() for p in fm.parameters()]
    tl = run(tm, topt, data, 12)
    fl = run(fm, fopt, data, 12)
    np.testing.assert_allclose(fl, tl, rtol=RTOL, atol=ATOL)
    assert_models_close(fm, tm, "after 12 steps")
    assert_states_close(first_state(fopt, fm), first_state(topt, tm), "state")
    assert fl[-1] < 0.2 * fl[0]  # training moved: the comparison means something
    assert max((p.detach() - s).abs().max().item()
               for p, s in zip(fm.parameters(), start)) > 1e-2


@pytest.mark.parametrize("opts", VARIANTS, ids=lambda o: str(o["line_search_fn"]))
@pytest.mark.parametrize("direction", ["torch_to_fusedopt", "fusedopt_to_torch"])
def test_state_dict_crosses_over(opts, direction):
    data = make_data()
    (tm, topt), (fm, fopt) = pair(**opts)
    first, second = ((tm, topt), (fm, fopt)) if direction == "torch_to_fusedopt" else \
        ((fm, fopt), (tm, topt))
    run(*first, data, 6)
    second[0].load_state_dict(first[0].state_dict())
    second[1].load_state_dict(copy.deepcopy(first[1].state_dict()))
    l1 = run(*first, data, 6)
    l2 = run(*second, data, 6)
    np.testing.assert_allclose(l2, l1, rtol=RTOL, atol=ATOL)
    assert_models_close(second[0], first[0], direction)


def test_state_dict_survives_torch_save():
    data = make_data()
    (tm, topt), (fm, fopt) = pair(line_search_fn="strong_wolfe")
    run(fm, fopt, data, 3)
    buf = io.BytesIO()
    torch.save(fopt.state_dict(), buf)
    buf.seek(0)
    tm.load_state_dict(fm.state_dict())
    topt.load_state_dict(torch.load(buf))
    np.testing.assert_allclose(run(fm, fopt, data, 3), run(tm, topt, data, 3), rtol=RTOL)


def test_moves_every_param_in_one_fused_call(monkeypatch):
    import fusedopt._torch_lbfgs as mod

    calls = []
    real = mod.F.axpy_

    def counting(ys, xs, alpha, **kw):
        calls.append(len(ys))
        return real(ys, xs, alpha, **kw)

    monkeypatch.setattr(mod.F, "axpy_", counting)
    data = make_data()
    _, (fm, fopt) = pair(line_search_fn=None, max_iter=3, max_eval=10)
    run(fm, fopt, data, 1)
    assert calls == [4, 4, 4]  # one call per iteration, over the 4 params


def test_none_gradient_counts_as_zero():
    w = torch.ones(3, dtype=torch.float64, requires_grad=True)
    frozen = torch.full((2,), 7.0, dtype=torch.float64, requires_grad=True)
    opt = fot.LBFGS([w, frozen], line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = ((w - 2.0) ** 2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    np.testing.assert_allclose(w.detach().numpy(), 2.0)
    np.testing.assert_array_equal(frozen.detach().numpy(), 7.0)


def test_sparse_gradients_are_made_dense():
    data = torch.tensor([[0, 2], [1, 1]])
    results = []
    for sparse in (False, True):
        torch.manual_seed(0)
        emb = torch.nn.Embedding(4, 3, sparse=sparse).double()
        opt = fot.LBFGS(emb.parameters(), max_iter=3)

        def closure():
            opt.zero_grad()
            loss = (emb(data) ** 2).sum()
            loss.backward()
            return loss

        opt.step(closure)
        results.append(emb.weight.detach().clone())
    np.testing.assert_array_equal(results[0].numpy(), results[1].numpy())


@pytest.mark.parametrize("kwargs", [dict(lr=-1.0), dict(lr=torch.tensor([1.0, 2.0]))])
def test_torchs_errors(kwargs):
    p = [torch.zeros(2, requires_grad=True)]
    with pytest.raises(ValueError) as theirs:
        torch.optim.LBFGS(p, **kwargs)
    with pytest.raises(ValueError) as mine:
        fot.LBFGS(p, **kwargs)
    assert str(mine.value) == str(theirs.value)


def test_one_param_group_and_line_search_names():
    groups = [{"params": [torch.zeros(2, requires_grad=True)]},
              {"params": [torch.zeros(3, requires_grad=True)], "lr": 0.1}]
    with pytest.raises(ValueError, match="parameter groups"):
        fot.LBFGS(groups)
    w = torch.ones(2, requires_grad=True)
    opt = fot.LBFGS([w], line_search_fn="armijo")
    with pytest.raises(RuntimeError, match="only 'strong_wolfe'"):
        opt.step(lambda: (w ** 2).sum())
    np.testing.assert_array_equal(w.detach().numpy(), 1.0)


def test_default_max_eval_is_torchs():
    p = [torch.zeros(1, requires_grad=True)]
    assert fot.LBFGS(p, max_iter=7).param_groups[0]["max_eval"] == \
        torch.optim.LBFGS(p, max_iter=7).param_groups[0]["max_eval"]
