"""Damped Newton's method for small dense problems, and Newton-CG without a Hessian matrix.

::

    opt = fo.Newton(params)                     # lr=1: full Newton steps when they decrease f

    def closure():                              # dense Hessian over all params
        return loss, grads, hessian             # hessian: (N, N), N = total param elements

    def closure():                              # Newton-CG: Hessian-vector products only
        return loss, grads, hvp                 # hvp(vs) -> list of H v, aligned with params

    opt.step(closure)

The Hessian is over the concatenation of the flattened params in their order (row-major
within each param); a single param of shape S may also give it as S + S. Each iteration
solves (H + damping I) d = -g, then searches along d by backtracking from t = lr until
the Armijo condition f(x + t d) <= f(x) + c1 t g'd holds (Nocedal & Wright,
"Numerical Optimization", algorithm 3.1).

Dense: when H + damping I is not positive definite, a multiple of the identity is added,
doubling until a Cholesky factorization succeeds (N&W algorithm 3.3), so d is always a
descent direction; near a minimizer with a positive definite Hessian, no shift is needed
and the full steps converge quadratically.

Newton-CG (N&W algorithm 7.1): d comes from conjugate gradients on H d = -g, stopped at
the relative residual min(0.5, sqrt(|g|)) (superlinear convergence; `cg_tol` fixes it),
or at the first direction of non-positive curvature. Its vectors are lists of arrays and
each of its dot products and updates is one fused multi-tensor kernel call; the update of
the params along d, in both modes, is `functional.axpy_`.

`step` runs up to `max_iter` iterations (default 1) and returns the closure's first loss.
Trial points of the line search are evaluated with the same closure; the evaluation of an
accepted point starts the next iteration of the same `step`.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import numpy as np

from . import functional as F
from .lbfgs import ListKernels, _abs_max, _copy, _neg, _restore, _scale, take_grads
from .optimizer import Optimizer, check, check_number

__all__ = ["Newton"]


def __dir__():
    return sorted(__all__)


class Newton(Optimizer):
    """Damped (line-searched) Newton's method, with a dense Hessian or Newton-CG.

    Each iteration solves :math:`(H + \\lambda I)\\, d = -g` for the direction `d`, then
    backtracks from ``t = lr`` until the Armijo condition
    :math:`f(x + t d) \\le f(x) + c_1 t\\, g^\\top d` holds (Nocedal & Wright,
    *Numerical Optimization*, algorithm 3.1).

    - Dense: the closure returns the Hessian over the concatenation of the flattened
      params, ``(N, N)`` (a single param of shape ``S`` may give ``S + S``). When
      :math:`H + \\lambda I` is not positive definite, a multiple of the identity is
      added, doubling until a Cholesky factorization succeeds (N&W algorithm 3.3),
      so `d` is always a descent direction.
    - Newton-CG (N&W algorithm 7.1): the closure returns a function ``hvp(vs)`` giving
      the Hessian-vector products (a list aligned with the params); conjugate
      gradients stop at the relative residual ``min(0.5, sqrt(|g|))``, or `cg_tol`,
      or at the first direction of non-positive curvature. Its dot products and
      updates are fused multi-tensor kernel calls.

    Parameters
    ----------
    params : list of arrays or list of one dict
        The params (float32 or float64 arrays, updated in place); one group only.
    lr : float, default 1.0
        The first trial step (1: the full Newton step).
    max_iter : int, default 1
        Newton iterations per `step`.
    damping : float, default 0.0
        :math:`\\lambda`, a fixed Levenberg term added to the Hessian's diagonal.
    c1 : float, default 1e-4
        The Armijo constant, in [0, 1).
    backtrack : float, default 0.5
        The factor of each backtracking step, in (0, 1).
    max_backtracks : int, default 40
        Backtracking steps before giving up (the params then stay as they were).
    tolerance_grad : float, default 1e-12
        No update once ``max |g|`` is at or below it.
    cg_tol : float, optional
        Newton-CG's relative residual tolerance; default the forcing sequence above.
    cg_max_iter : int, optional
        Newton-CG's iteration limit; default the number of elements.

    Raises
    ------
    ValueError
        On an invalid option, or more than one param group.

    See Also
    --------
    fusedopt.LBFGS : for problems too large for a Hessian.

    Notes
    -----
    ``state[0]`` holds ``n_iter``, ``func_evals``, the last step length ``t``, the
    last diagonal ``shift`` of the dense solve, and ``loss``.

    Examples
    --------
    Minimize :math:`\\frac12 x^\\top A x - b^\\top x`, whose Hessian is `A`:

    >>> import numpy as np, fusedopt as fo
    >>> A, b = np.array([[3.0, 1.0], [1.0, 2.0]]), np.array([1.0, 1.0])
    >>> x = np.zeros(2)
    >>> opt = fo.Newton([x])
    >>> def closure():
    ...     return 0.5 * x @ A @ x - b @ x, [A @ x - b], A
    >>> _ = opt.step(closure)
    >>> np.allclose(A @ x, b)
    True
    """

    def __init__(self, params: Sequence[Any], lr: float = 1.0, max_iter: int = 1,
                 damping: float = 0.0, c1: float = 1e-4, backtrack: float = 0.5,
                 max_backtracks: int = 40, tolerance_grad: float = 1e-12,
                 cg_tol: float | None = None, cg_max_iter: int | None = None) -> None:
        super().__init__(params, dict(lr=lr, max_iter=max_iter, damping=damping, c1=c1,
                                      backtrack=backtrack, max_backtracks=max_backtracks,
                                      tolerance_grad=tolerance_grad, cg_tol=cg_tol,
                                      cg_max_iter=cg_max_iter))

    def add_param_group(self, group: dict) -> None:
        """Add the single param group (a second one is refused).

        Parameters
        ----------
        group : dict
            ``{"params": [...], **options}``.

        Raises
        ------
        ValueError
            If the optimizer already has its group.
        """
        if self.param_groups:
            raise ValueError("Newton doesn't support per-parameter options (parameter groups)")
        super().add_param_group(group)

    def _validate_group(self, g):
        check_number("learning rate", g["lr"], 0.0)
        check(isinstance(g["max_iter"], int) and g["max_iter"] >= 1,
              f"Invalid max_iter: {g['max_iter']!r}")
        check_number("damping", g["damping"], 0.0)
        check_number("c1", g["c1"], 0.0, 1.0, high_open=True)
        check_number("backtrack", g["backtrack"], 0.0, 1.0, high_open=True)
        check(g["backtrack"] > 0, f"Invalid backtrack: {g['backtrack']}")
        check(isinstance(g["max_backtracks"], int) and g["max_backtracks"] >= 0,
              f"Invalid max_backtracks: {g['max_backtracks']!r}")
        check_number("tolerance_grad", g["tolerance_grad"], 0.0)
        if g["cg_tol"] is not None:
            check_number("cg_tol", g["cg_tol"], 0.0)
        if g["cg_max_iter"] is not None:
            check(isinstance(g["cg_max_iter"], int) and g["cg_max_iter"] >= 1,
                  f"Invalid cg_max_iter: {g['cg_max_iter']!r}")

    def _state_names(self, group):
        return []

    def _evaluate(self, closure, params):
        out = closure()
        if not isinstance(out, tuple) or len(out) != 3:
            raise TypeError("Newton: the closure must return (loss, grads, hessian) or "
                            "(loss, grads, hvp)")
        loss, grads, curvature = out
        if not callable(curvature):
            n = sum(p.size for p in params)
            curvature = np.asarray(curvature, dtype=np.float64)
            if curvature.size != n * n:
                raise ValueError(f"Newton: the Hessian has shape {curvature.shape}, expected "
                                 f"({n}, {n}) for {n} parameter elements")
            curvature = curvature.reshape(n, n)
        return float(loss), loss, take_grads("Newton", params, grads), curvature

    def step(self, closure: Callable[[], tuple]) -> Any:
        """Run up to `max_iter` Newton iterations.

        Parameters
        ----------
        closure : callable
            Evaluates the objective at the current params and returns
            ``(loss, grads, hessian)`` or ``(loss, grads, hvp)``; it is called again at
            each trial point of the line search.

        Returns
        -------
        float or array
            The loss of the closure's first evaluation (before the update).

        Raises
        ------
        TypeError
            If the closure does not return a 3-tuple.
        ValueError
            If the Hessian's size does not match the params.

        Notes
        -----
        One optimizer stepped from several threads at once runs the steps one after
        the other (a lock).
        """
        with self._lock:
            return self._iterate(closure)

    def _iterate(self, closure):
        group = self.param_groups[0]
        params = group["params"]
        k = ListKernels(params)
        state = self.state.setdefault(0, {"n_iter": 0, "func_evals": 0, "shift": 0.0, "t": None})
        loss, orig_loss, g, curvature = self._evaluate(closure, params)
        state["func_evals"] += 1
        for _ in range(group["max_iter"]):
            if _abs_max(g) <= group["tolerance_grad"]:
                break
            if callable(curvature):
                d = self._cg_direction(k, params, g, curvature, group)
                state["shift"] = 0.0
            else:
                d, state["shift"] = _dense_direction(params, g, curvature, group["damping"])
            gtd = k.dot(g, d)
            if not gtd < 0:  # only by rounding: fall back to steepest descent
                d = _neg(g)
                gtd = k.dot(g, d)
            x0 = _copy(params)
            t = float(group["lr"])
            accepted = None
            for _ in range(group["max_backtracks"] + 1):
                F.axpy_(params, d, t)
                trial = self._evaluate(closure, params)
                state["func_evals"] += 1
                if trial[0] <= loss + group["c1"] * t * gtd:
                    accepted = trial
                    break
                _restore(params, x0)
                t *= group["backtrack"]
            state["t"] = t if accepted else 0.0
            if accepted is None:  # no decrease found along d: the params stay as they were
                break
            loss, _, g, curvature = accepted
            state["n_iter"] += 1
        state["loss"] = loss
        return orig_loss

    @staticmethod
    def _cg_direction(k, params, g, hvp, group):
        """Truncated conjugate gradients on (H + damping I) d = -g."""
        damping = group["damping"]
        z = [np.zeros_like(x) for x in g]
        r = _copy(g)
        p = _neg(g)
        rr = k.dot(r, r)
        g_norm = math.sqrt(rr)
        tol = group["cg_tol"]
        eps = (tol if tol is not None else min(0.5, math.sqrt(g_norm))) * g_norm
        max_iter = group["cg_max_iter"] or max(1, sum(x.size for x in g))
        for j in range(max_iter):
            hp = take_grads("Newton", params, hvp(p))  # (checks shapes and dtypes)
            if damping:
                k.axpy_(hp, p, damping)
            php = k.dot(p, hp)
            if php <= 0:  # non-positive curvature: stop with what we have
                return _neg(g) if j == 0 else z
            alpha = rr / php
            k.axpy_(z, p, alpha)
            k.axpy_(r, hp, alpha)
            rr_new = k.dot(r, r)
            if math.sqrt(rr_new) <= eps:
                break
            p = _scale(p, rr_new / rr)
            k.axpy_(p, r, -1.0)
            rr = rr_new
        return z

    def state_dict(self) -> dict:
        """Return the options and the iteration counters.

        Returns
        -------
        dict
            ``{"state": ..., "param_groups": ...}``, as the other optimizers.
        """
        out = super().state_dict()
        out["state"] = {k: dict(v) for k, v in self.state.items()}
        return out

    def load_state_dict(self, state_dict: dict) -> None:
        """Restore a state returned by `state_dict`.

        Parameters
        ----------
        state_dict : dict
            From `state_dict` of a Newton over as many params.

        Raises
        ------
        ValueError
            If the counts do not match or an option is invalid (nothing changes).
        """
        groups = state_dict["param_groups"]
        if len(groups) != 1 or len(groups[0]["params"]) != len(self.param_groups[0]["params"]):
            raise ValueError("loaded state dict does not match this optimizer's single group "
                             f"of {len(self.param_groups[0]['params'])} params")
        group = dict(self.param_groups[0])
        group.update({k: v for k, v in groups[0].items() if k != "params"})
        self._validate_group(group)
        self.param_groups[0] = group
        self.state = {k: dict(v) for k, v in state_dict["state"].items()}


def _dense_direction(params, g, hessian, damping, beta=1e-3):
    """Solve (H + damping I + tau I) d = -g with the smallest tau >= 0 of the sequence
    0 (or -min diag + beta), then doubling, for which a Cholesky factorization exists."""
    gflat = np.concatenate([np.asarray(x, dtype=np.float64).ravel() for x in g])
    a = hessian + damping * np.eye(len(gflat)) if damping else hessian
    diag_min = float(np.min(np.diag(a))) if len(gflat) else 0.0
    tau = 0.0 if diag_min > 0 else beta - diag_min
    for _ in range(200):
        shifted = a + tau * np.eye(len(gflat)) if tau else a
        try:
            lower = np.linalg.cholesky(shifted)
            break
        except np.linalg.LinAlgError:
            tau = max(2.0 * tau, beta)
    else:
        raise FloatingPointError("Newton: could not make the Hessian positive definite "
                                 "(does it hold NaN or Inf?)")
    d = np.linalg.solve(lower.T, np.linalg.solve(lower, -gflat))
    out, offset = [], 0
    for p in params:
        out.append(np.array(d[offset:offset + p.size].reshape(p.shape), dtype=p.dtype,
                            order="C"))
        offset += p.size
    return out, tau
