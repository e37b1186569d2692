"""fusedopt.Newton: quadratic convergence on a strongly convex problem, the line search
from far away, Newton-CG with Hessian-vector products, and bad input."""

from __future__ import annotations

import numpy as np
import pytest

from fusedopt.newton import Newton


def _logreg_problem(rng, n=120, d=6):
    a = rng.standard_normal((n, d))
    t = (rng.random(n) < 1.0 / (1.0 + np.exp(-(a @ rng.standard_normal(d))))).astype(float)
    return a, t


def _logreg(a, t, w, b, lam=0.1):
    """L2-regularized logistic regression: strongly convex, smooth Hessian. Params: w (d,)
    and the bias b (a 0-d array)."""
    z = a @ w + b
    s = 1.0 / (1.0 + np.exp(-z))
    loss = np.mean(np.logaddexp(0.0, z) - t * z) + 0.5 * lam * (w @ w + b * b)
    r = (s - t) / len(t)
    grads = [a.T @ r + lam * w, np.asarray(r.sum() + lam * b)]
    ab = np.hstack([a, np.ones((len(t), 1))])
    h = ab.T @ (ab * (s * (1 - s) / len(t))[:, None]) + lam * np.eye(a.shape[1] + 1)
    return float(loss), grads, h


def _errors(rng, dense=True, steps=8):
    a, t = _logreg_problem(rng)
    w, b = np.zeros(a.shape[1]), np.zeros(())
    if dense:
        closure = lambda: _logreg(a, t, w, b)  # noqa: E731
    else:
        def closure():
            loss, grads, h = _logreg(a, t, w, b)
            return loss, grads, lambda v: _split(h @ np.append(v[0], v[1]), w)
    ref_w, ref_b = np.zeros_like(w), np.zeros(())
    opt_ref = Newton([ref_w, ref_b], max_iter=30, tolerance_grad=0.0)
    opt_ref.step(lambda: _logreg(a, t, ref_w, ref_b))
    star = np.append(ref_w, ref_b)
    opt = Newton([w, b], cg_tol=1e-14 if not dense else None)
    errors = [np.linalg.norm(np.append(w, b) - star)]
    for _ in range(steps):
        opt.step(closure)
        errors.append(np.linalg.norm(np.append(w, b) - star))
    return np.array(errors), opt


def _split(v, w):
    return [v[:w.size].copy(), np.asarray(v[w.size])]


def test_quadratic_convergence_dense(rng):
    errors, opt = _errors(rng)
    assert errors[-1] < 1e-12
    # every step that starts above rounding level: e_{k+1} <= C e_k^2
    ks = [k for k in range(len(errors) - 1) if errors[k] > 1e-6]
    assert len(ks) >= 3
    ratios = [errors[k + 1] / errors[k] ** 2 for k in ks]
    assert max(ratios) < 2.0, ratios
    # and the full Newton step was always accepted (no backtracking needed here)
    assert opt.state[0]["t"] == 1.0 and opt.state[0]["shift"] == 0.0


def test_newton_cg_with_hessian_vector_products(rng):
    errors, _ = _errors(rng, dense=False)
    assert errors[-1] < 1e-12
    ks = [k for k in range(len(errors) - 1) if errors[k] > 1e-6]
    assert max(errors[k + 1] / errors[k] ** 2 for k in ks) < 2.0


def _rosenbrock(x):
    f = (1 - x[0]) ** 2 + 100 * (x[1] - x[0] ** 2) ** 2
    g = np.array([-2 * (1 - x[0]) - 400 * x[0] * (x[1] - x[0] ** 2), 200 * (x[1] - x[0] ** 2)])
    h = np.array([[2 - 400 * x[1] + 1200 * x[0] ** 2, -400 * x[0]], [-400 * x[0], 200.0]])
    return float(f), [g], h


@pytest.mark.parametrize("start", [(-1.2, 1.0), (2.0, -1.0)])
def test_line_search_and_shift_reach_rosenbrock_minimum(start):
    x = np.array(start)
    opt = Newton([x], max_iter=100)
    opt.step(lambda: _rosenbrock(x))
    np.testing.assert_allclose(x, [1.0, 1.0], atol=1e-10)


def test_indefinite_hessian_gives_a_descent_step():
    # f = x^4/4 - x^2/2 + y^2: at x = 0.1 the Hessian has a negative entry
    x = np.array([0.1, 1.0])

    def closure():
        f = x[0] ** 4 / 4 - x[0] ** 2 / 2 + x[1] ** 2
        g = np.array([x[0] ** 3 - x[0], 2 * x[1]])
        return float(f), [g], np.diag([3 * x[0] ** 2 - 1, 2.0])

    opt = Newton([x], max_iter=50)
    opt.step(closure)
    np.testing.assert_allclose(np.abs(x), [1.0, 0.0], atol=1e-10)


def test_multi_dimensional_params_and_float32(rng):
    m = rng.standard_normal((6, 6))
    q = m @ m.T + 6 * np.eye(6)
    c = rng.standard_normal(6)
    w = np.zeros((2, 3), np.float32)
    b = np.zeros(0, np.float32)  # an empty param takes no part

    def closure():
        v = w.astype(np.float64).ravel()
        return float(0.5 * v @ q @ v - c @ v), [(q @ v - c).reshape(2, 3).astype(np.float32),
                                                 b.copy()], q
    Newton([w, b], max_iter=3).step(closure)
    np.testing.assert_allclose(w.ravel(), np.linalg.solve(q, c), rtol=1e-5)
    assert w.dtype == np.float32


def test_hessian_in_param_shape_is_accepted():
    w = np.zeros((2, 2))
    target = np.array([[1.0, 2.0], [3.0, 4.0]])
    h = np.einsum("ik,jl->ijkl", np.eye(2), np.eye(2)) * 2.0  # shape (2, 2, 2, 2)
    Newton([w]).step(lambda: (float(((w - target) ** 2).sum()), [2 * (w - target)], h))
    np.testing.assert_allclose(w, target)


def test_damping_shortens_the_step():
    x = np.zeros(1)
    Newton([x], damping=1.0).step(lambda: (float((x[0] - 2) ** 2), [2 * (x - 2)],
                                           np.array([[2.0]])))
    np.testing.assert_allclose(x, [4.0 / 3.0])


def test_no_decrease_leaves_params_unchanged():
    x = np.array([1.0])
    # a gradient that lies about the function: no step along it decreases f
    opt = Newton([x], max_backtracks=5)
    opt.step(lambda: (float(x[0] ** 2), [np.array([-1.0])], np.array([[1.0]])))
    np.testing.assert_array_equal(x, [1.0])
    assert opt.state[0]["t"] == 0.0


def test_state_dict_round_trip():
    x = np.array([-1.2, 1.0])
    opt = Newton([x], max_iter=2, damping=0.5)
    opt.step(lambda: _rosenbrock(x))
    sd = opt.state_dict()
    other = Newton([np.zeros(2)])
    other.load_state_dict(sd)
    assert other.param_groups[0]["damping"] == 0.5 and other.param_groups[0]["max_iter"] == 2
    assert other.state[0]["n_iter"] == opt.state[0]["n_iter"]
    with pytest.raises(ValueError, match="single group"):
        Newton([np.zeros(2), np.zeros(1)]).load_state_dict(sd)


@pytest.mark.parametrize("kwargs,match", [
    (dict(lr=-1.0), "learning rate"),
    (dict(backtrack=1.0), "backtrack"),
    (dict(backtrack=0.0), "backtrack"),
    (dict(c1=1.0), "c1"),
    (dict(damping=-1.0), "damping"),
    (dict(max_iter=0), "max_iter"),
    (dict(cg_max_iter=0), "cg_max_iter"),
])
def test_invalid_hyperparameters(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Newton([np.zeros(2)], **kwargs)


def test_bad_closure_output():
    x = np.ones(2)
    opt = Newton([x])
    with pytest.raises(TypeError, match="hessian"):
        opt.step(lambda: (1.0, [np.ones(2)]))
    with pytest.raises(ValueError, match="Hessian has shape"):
        opt.step(lambda: (1.0, [np.ones(2)], np.eye(3)))
    with pytest.raises(ValueError, match="shape"):
        opt.step(lambda: (1.0, [np.ones(3)], np.eye(2)))
    np.testing.assert_array_equal(x, 1.0)
