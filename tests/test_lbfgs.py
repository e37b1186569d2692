"""fusedopt.LBFGS: the same iterates as torch.optim.LBFGS, the known minima of Rosenbrock
and of a logistic regression, the fused list operations, state dicts and bad input."""

from __future__ import annotations

import numpy as np
import pytest

import fusedopt
from fusedopt import functional as F
from fusedopt.lbfgs import LBFGS

# --- a smooth, non-quadratic test function in NumPy and in torch -----------------------------


def _problem(rng, n=40, d=5, k=3):
    x = rng.standard_normal((n, d))
    y = (rng.random((n, k)) < 0.5).astype(np.float64)
    w0 = 0.5 * rng.standard_normal((d, k))
    b0 = 0.1 * rng.standard_normal(k)
    return x, y, w0, b0


def _np_loss_grads(x, y, w, b, lam=0.1):
    """Logistic losses of k labels, an L2 term and a quartic term."""
    z = x @ w + b
    loss = np.sum(np.logaddexp(0.0, z) - y * z) + 0.5 * lam * np.sum(w * w) + 0.25 * np.sum(w**4)
    dz = 1.0 / (1.0 + np.exp(-z)) - y
    return float(loss), [x.T @ dz + lam * w + w**3, dz.sum(axis=0)]


def _torch_loss(torch, x, y, w, b, lam=0.1):
    z = x @ w + b
    return (torch.nn.functional.softplus(z) - y * z).sum() + 0.5 * lam * (w * w).sum() + \
        0.25 * (w**4).sum()


@pytest.mark.parametrize("line_search_fn", [None, "strong_wolfe"])
@pytest.mark.parametrize("history_size,max_iter", [(100, 20), (3, 7)])
def test_same_iterates_as_torch(rng, line_search_fn, history_size, max_iter):
    torch = pytest.importorskip("torch")
    x, y, w0, b0 = _problem(rng)
    w, b = w0.copy(), b0.copy()
    opt = LBFGS([w, b], lr=0.8 if line_search_fn is None else 1.0, max_iter=max_iter,
                history_size=history_size, line_search_fn=line_search_fn)

    tx, ty = torch.tensor(x), torch.tensor(y)
    tw, tb = torch.tensor(w0, requires_grad=True), torch.tensor(b0, requires_grad=True)
    topt = torch.optim.LBFGS([tw, tb], lr=opt.param_groups[0]["lr"], max_iter=max_iter,
                             history_size=history_size, line_search_fn=line_search_fn)

    def closure():
        return _np_loss_grads(x, y, w, b)

    def tclosure():
        topt.zero_grad()
        loss = _torch_loss(torch, tx, ty, tw, tb)
        loss.backward()
        return loss.detach()

    for _ in range(4):
        loss = opt.step(closure)
        tloss = topt.step(tclosure)
        assert loss == pytest.approx(float(tloss), rel=1e-10)
        np.testing.assert_allclose(w, tw.detach().numpy(), rtol=1e-8, atol=1e-10)
        np.testing.assert_allclose(b, tb.detach().numpy(), rtol=1e-8, atol=1e-10)
        mine, theirs = opt.state[0], topt.state[tw]
        assert mine["func_evals"] == theirs["func_evals"]
        assert mine["n_iter"] == theirs["n_iter"]
        assert len(mine["old_dirs"]) == len(theirs["old_dirs"])
        assert float(mine["t"]) == pytest.approx(float(theirs["t"]), rel=1e-7)


def _rosenbrock(x, y):
    fx = (1.0 - x) ** 2 + 100.0 * (y - x * x) ** 2
    gx = -2.0 * (1.0 - x) - 400.0 * x * (y - x * x)
    gy = 200.0 * (y - x * x)
    return float(fx), [gx, gy]  # NumPy scalars for the 0-d params: accepted


@pytest.mark.parametrize("line_search_fn", [None, "strong_wolfe"])
def test_rosenbrock_reaches_one_one(line_search_fn):
    # two 0-d params: the fused kernels handle them like any other tensor
    x, y = np.array(-1.2), np.array(1.0)
    lr = 1.0 if line_search_fn else 0.1
    opt = LBFGS([x, y], lr=lr, max_iter=200, max_eval=400, tolerance_grad=1e-10,
                tolerance_change=1e-14, line_search_fn=line_search_fn)
    for _ in range(20 if line_search_fn else 60):
        opt.step(lambda: _rosenbrock(x, y))
    assert float(x) == pytest.approx(1.0, abs=1e-6)
    assert float(y) == pytest.approx(1.0, abs=1e-6)


def _logistic(a, t, w, b, lam):
    z = a @ w + b
    loss = np.mean(np.logaddexp(0.0, z) - t * z) + 0.5 * lam * (w @ w)
    r = (1.0 / (1.0 + np.exp(-z)) - t) / len(t)
    return float(loss), [a.T @ r + lam * w, np.asarray(r.sum())]


def test_logistic_regression_reaches_the_optimum(rng):
    a = rng.standard_normal((200, 6))
    true_w = rng.standard_normal(6)
    t = (rng.random(200) < 1.0 / (1.0 + np.exp(-(a @ true_w + 0.3)))).astype(np.float64)
    lam = 1e-2
    w, b = np.zeros(6), np.zeros(())
    opt = LBFGS([w, b], line_search_fn="strong_wolfe", max_iter=100, tolerance_grad=1e-12,
                tolerance_change=1e-15)
    for _ in range(3):
        opt.step(lambda: _logistic(a, t, w, b, lam))
    # (about as far as a line search on the loss can resolve: the loss changes by
    # |g|^2 / curvature, below its rounding once |g| is near sqrt(eps))
    _, grads = _logistic(a, t, w, b, lam)
    assert max(np.abs(g).max() for g in grads) < 1e-7
    try:
        from scipy.optimize import minimize
    except ImportError:
        return

    def fun(v):
        loss, (gw, gb) = _logistic(a, t, v[:6], v[6], lam)
        return loss, np.append(gw, gb)

    ref = minimize(fun, np.zeros(7), jac=True, method="BFGS", options=dict(gtol=1e-10))
    np.testing.assert_allclose(np.append(w, b), ref.x, atol=1e-6)


def test_float32_params_keep_their_dtype(rng):
    x, y, w0, b0 = _problem(rng)
    w, b = w0.astype(np.float32), b0.astype(np.float32)

    def closure():
        loss, grads = _np_loss_grads(x, y, w.astype(np.float64), b.astype(np.float64))
        return loss, [g.astype(np.float32) for g in grads]

    opt = LBFGS([w, b], line_search_fn="strong_wolfe")
    first = opt.step(closure)
    assert opt.step(closure) < first
    assert w.dtype == np.float32 and all(v.dtype == np.float32 for v in opt.state[0]["d"])


def test_uses_the_fused_list_kernels(rng, monkeypatch):
    """Every dot product and update of the two-loop recursion is one multi-tensor kernel
    call over all params; the history is kept as lists of arrays, one per param."""
    x, y, w0, b0 = _problem(rng)
    w, b = w0.copy(), b0.copy()
    calls = {"dot": 0, "step": 0}

    class Counting:
        def __getattr__(self, name):
            return getattr(fusedopt._cpu, name)

        def dot(self, dtype, ptrs, sizes):
            calls["dot"] += 1
            assert len(sizes) == 2 and len(ptrs) == 4  # both params, one call
            return fusedopt._cpu.dot(dtype, ptrs, sizes)

        def step(self, kernel, dtype, ptrs, sizes, hyper, **kw):
            calls["step"] += 1
            assert kernel == "sgd" and len(sizes) == 2
            return fusedopt._cpu.step(kernel, dtype, ptrs, sizes, hyper, **kw)

    monkeypatch.setattr(fusedopt.lbfgs, "_cpu", Counting())
    opt = LBFGS([w, b], max_iter=5, history_size=3)
    opt.step(lambda: _np_loss_grads(x, y, w, b))
    history = opt.state[0]["old_dirs"]
    assert len(history) == 3 and all(len(v) == 2 for v in history)
    assert [v.shape for v in history[0]] == [w.shape, b.shape]
    # 4 iterations with history: 2 * len(history) + 2 dots each, and as many updates
    assert calls["dot"] >= 4 * 4 and calls["step"] >= 2 * 3


def test_list_kernels_agree_with_functional(rng):
    from fusedopt.lbfgs import ListKernels

    xs = [rng.standard_normal((3, 4)), rng.standard_normal(5).astype(np.float32),
          rng.standard_normal(())]
    ys = [rng.standard_normal(x.shape).astype(x.dtype) for x in xs]
    k = ListKernels(xs)
    assert k.dot(xs, ys) == pytest.approx(F.dot(xs, ys), rel=1e-12)
    a, b = [x.copy() for x in xs], [x.copy() for x in xs]
    k.axpy_(a, ys, 0.37)
    F.axpy_(b, ys, 0.37)
    for u, v in zip(a, b):
        np.testing.assert_array_equal(u, v)


def test_stops_at_once_when_the_gradient_is_small():
    w = np.ones(3)
    opt = LBFGS([w])
    assert opt.step(lambda: (5.0, [np.zeros(3)])) == 5.0
    assert opt.state[0]["func_evals"] == 1 and opt.state[0]["n_iter"] == 0
    np.testing.assert_array_equal(w, 1.0)


def test_none_gradient_counts_as_zero(rng):
    w, frozen = np.ones(3), np.full(2, 7.0)
    opt = LBFGS([w, frozen], line_search_fn="strong_wolfe")
    opt.step(lambda: (float(((w - 2.0) ** 2).sum()), [2.0 * (w - 2.0), None]))
    np.testing.assert_allclose(w, 2.0)
    np.testing.assert_array_equal(frozen, 7.0)


def test_state_dict_round_trip_continues_identically(rng):
    x, y, w0, b0 = _problem(rng)
    runs = []
    for reload in (False, True):
        w, b = w0.copy(), b0.copy()
        opt = LBFGS([w, b], history_size=5, max_iter=4, line_search_fn="strong_wolfe")
        opt.step(lambda: _np_loss_grads(x, y, w, b))
        if reload:
            sd = opt.state_dict()
            opt.state[0]["old_dirs"][0][0][...] = np.nan  # the saved copy is independent
            opt = LBFGS([w, b], history_size=5, max_iter=4, line_search_fn="strong_wolfe")
            opt.load_state_dict(sd)
        opt.step(lambda: _np_loss_grads(x, y, w, b))
        runs.append((w.copy(), b.copy()))
    np.testing.assert_array_equal(runs[0][0], runs[1][0])
    np.testing.assert_array_equal(runs[0][1], runs[1][1])


def test_load_state_dict_refuses_mismatches(rng):
    x, y, w0, b0 = _problem(rng)
    w, b = w0.copy(), b0.copy()
    opt = LBFGS([w, b], max_iter=3)
    opt.step(lambda: _np_loss_grads(x, y, w, b))
    sd = opt.state_dict()
    other = LBFGS([np.zeros((5, 2)), np.zeros(3)])
    with pytest.raises(ValueError, match="shape"):
        other.load_state_dict(sd)
    assert other.state == {}
    sd32 = opt.state_dict()
    sd32["state"][0]["d"] = [v.astype(np.float32) for v in sd32["state"][0]["d"]]
    with pytest.raises(ValueError, match="dtype"):
        opt.load_state_dict(sd32)
    with pytest.raises(ValueError, match="has 2 params, the optimizer has 1"):
        LBFGS([np.zeros(3)]).load_state_dict(sd)


@pytest.mark.parametrize("kwargs,match", [
    (dict(lr=-1.0), "learning rate"),
    (dict(max_iter=0), "max_iter"),
    (dict(history_size=0), "history_size"),
    (dict(line_search_fn="armijo"), "line_search_fn"),
])
def test_invalid_hyperparameters(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LBFGS([np.zeros(2)], **kwargs)


def test_one_param_group_only():
    with pytest.raises(ValueError, match="parameter groups"):
        LBFGS([{"params": [np.zeros(2)]}, {"params": [np.zeros(3)], "lr": 0.1}])


def test_bad_closure_output():
    w = np.ones(3)
    opt = LBFGS([w])
    with pytest.raises(TypeError, match=r"\(loss, grads\)"):
        opt.step(lambda: 1.0)
    with pytest.raises(ValueError, match="2 grads for 1 params"):
        opt.step(lambda: (1.0, [np.ones(3), np.ones(3)]))
    with pytest.raises(ValueError, match="shape"):
        opt.step(lambda: (1.0, [np.ones(4)]))
    with pytest.raises(TypeError, match="dtype"):
        opt.step(lambda: (1.0, [np.ones(3, np.float32)]))
    np.testing.assert_array_equal(w, 1.0)


def test_params_must_be_contiguous():
    w = np.zeros((4, 3)).T  # a view that is not C-contiguous
    opt = LBFGS([w])
    with pytest.raises(ValueError, match="not C-contiguous"):
        opt.step(lambda: (float((w**2).sum() + w.sum()), [2 * w + 1]))
    np.testing.assert_array_equal(w, 0.0)


def test_default_max_eval_is_torchs():
    assert LBFGS([np.zeros(1)], max_iter=20).param_groups[0]["max_eval"] == 25
    assert LBFGS([np.zeros(1)], max_iter=7).param_groups[0]["max_eval"] == 8


def test_is_exported_or_importable():
    assert fusedopt.lbfgs.LBFGS is LBFGS
