"""L-BFGS with torch.optim.LBFGS's interface and semantics, over lists of arrays.

    opt = fo.LBFGS(params, lr=1, max_iter=20, line_search_fn="strong_wolfe")

    def closure():
        loss, grads = loss_and_grads(params)   # grads: a list aligned with params
        return loss, grads

    opt.step(closure)

NumPy arrays carry no `.grad`, so the closure returns the pair `(loss, grads)` instead
of filling gradients; a `None` gradient counts as zeros, as in torch. `step` returns
the first value the closure returned (the loss before the step).

Every vector of the method (the search direction, the gradient, the history pairs) is a
list of arrays with the params' shapes and dtypes, never one flattened copy: the two-loop
recursion's dot products and updates `y += a * x` each run as one fused multi-tensor
kernel call over all parameters (`functional.dot`, `functional.axpy_`). Negation and
scaling by a scalar, which the kernels do not offer, are NumPy operations per tensor.

The iteration is the one of Nocedal & Wright, "Numerical Optimization" (2nd ed.),
algorithm 7.4 (the two-loop recursion, with the initial scaling gamma = s'y / y'y of
eq. 7.20), with torch's choices where the book leaves room: the first step size
min(1, 1/|g|_1) * lr, pairs with s'y <= 1e-10 skipped, and the stopping tests on the
gradient (max |g| <= tolerance_grad), the step and the change of the loss. The line
search (`line_search_fn="strong_wolfe"`) is algorithms 3.5 (bracketing) and 3.6 (zoom)
with the cubic interpolation of eq. 3.59, safeguarded as in torch so that both take the
same trial steps.
"""

from __future__ import annotations

import math

import numpy as np

from . import _cpu
from . import functional as F
from .algorithms import pack
from .optimizer import Optimizer, check, check_number

__all__ = ["LBFGS", "ListSpace", "iterate"]

# The CPU kernels' dtype codes (fo::DType) of the fast path; other dtypes (float16,
# bfloat16) go through `functional`.
_CODES = {np.dtype(np.float32): 0, np.dtype(np.float64): 1}


# --- list-of-arrays vector helpers -------------------------------------------------------

class ListKernels:
    """`dot(xs, ys)` and `axpy_(ys, xs, alpha)` over lists of arrays laid out like `params`.

    For NumPy params these call the fused CPU kernels (`_cpu.dot`, and the plain SGD rule
    with lr = -alpha, exactly what `functional.dot` and `functional.axpy_` run) on the
    pointers of the lists, without `_arrays.prepare`'s per-call validation: every list
    passed here was allocated by the caller with the params' shapes and dtypes,
    C-contiguous and disjoint, or is the params themselves (validated by a
    `functional.axpy_` on them before). Other arrays (CuPy, ...) go through `functional`.
    """

    def __init__(self, params):
        self.fast = bool(params) and all(type(p) is np.ndarray and p.dtype in _CODES and
                                         p.flags.c_contiguous for p in params)
        if not self.fast:
            return
        codes = np.array([_CODES[p.dtype] for p in params])
        sizes = np.array([p.size for p in params], dtype=np.int64)
        self.groups = []
        for code in np.unique(codes):
            sel = None if (codes == code).all() else np.flatnonzero(codes == code)
            self.groups.append((int(code), sel, sizes if sel is None else sizes[sel]))
        self.hyper = dict(lr=0.0, momentum=0.0, dampening=0.0, weight_decay=0.0,
                          nesterov=False, maximize=False, first_step=False)

    def _tables(self, xs, ys):
        px, py = _cpu.describe(xs)[:, 0], _cpu.describe(ys)[:, 0]
        for code, sel, sizes in self.groups:
            pair = (px, py) if sel is None else (px[sel], py[sel])
            yield code, np.concatenate(pair).astype(np.uint64), sizes

    def dot(self, xs, ys):
        if not self.fast:
            return F.dot(xs, ys)
        return sum(_cpu.dot(code, table, sizes) for code, table, sizes in self._tables(xs, ys))

    def axpy_(self, ys, xs, alpha):
        if not self.fast:
            return F.axpy_(ys, xs, alpha)
        hyper = pack("sgd", dict(self.hyper, lr=-alpha))  # y + alpha * x, exactly
        for code, table, sizes in self._tables(ys, xs):
            _cpu.step("sgd", code, table, sizes, hyper)
        return None


def _copy(xs):
    return [x.copy() for x in xs]


# (ufuncs with `out`: on 0-d arrays they would return scalars otherwise)
def _neg(xs):
    return [np.negative(x, out=np.empty_like(x, order="C")) for x in xs]


def _scale(xs, a):
    return [np.multiply(x, a, out=np.empty_like(x, order="C")) for x in xs]


def _sub(xs, ys):
    return [np.subtract(x, y, out=np.empty_like(x, order="C")) for x, y in zip(xs, ys)]


def _abs_max(xs):
    return max((float(abs(x).max()) for x in xs if x.size), default=0.0)


def _abs_sum(xs):
    return math.fsum(float(abs(x).sum()) for x in xs)


def _restore(params, saved):
    for p, x in zip(params, saved):
        p[...] = x


def take_grads(op, params, grads):
    """Own copies of the closure's gradients (it may reuse its buffers); None is zeros.
    Shapes and dtypes must match the params': there is no silent cast."""
    if not isinstance(grads, (list, tuple)):
        raise TypeError(f"{op}: the closure must return (loss, grads) with grads a list of "
                        f"arrays aligned with the params, got grads of type {type(grads).__name__}")
    if len(grads) != len(params):
        raise ValueError(f"{op}: the closure returned {len(grads)} grads for {len(params)} params")
    out = []
    for i, (p, g) in enumerate(zip(params, grads)):
        host = isinstance(p, np.ndarray)
        if g is None:
            out.append(np.zeros(p.shape, p.dtype) if host else np.zeros_like(p))
            continue
        if host:  # a C-contiguous NumPy copy (of a NumPy array or scalar, a CPU tensor, ...)
            g = np.array(g, order="C", copy=True)
        if tuple(g.shape) != tuple(p.shape):
            raise ValueError(f"{op}: grads[{i}] has shape {tuple(g.shape)}, params[{i}] has "
                             f"{tuple(p.shape)}")
        if g.dtype != p.dtype:
            raise TypeError(f"{op}: grads[{i}] has dtype {g.dtype}, params[{i}] has {p.dtype}")
        out.append(g if host else g.copy())
    return out


def evaluate(op, closure, params):
    """Call the closure; (loss as float, the value it returned, own gradient copies)."""
    out = closure()
    if not isinstance(out, tuple) or len(out) < 2:
        raise TypeError(f"{op}: the closure must return a tuple (loss, grads)")
    return float(out[0]), out[0], take_grads(op, params, out[1])


# --- strong Wolfe line search --------------------------------------------------------------

def _cubic_min(a, b, bounds=None):
    """Minimizer of the cubic through two points (t, f, f') of the line (eq. 3.59), clipped
    to `bounds` (default: the interval between them); the middle of the bounds when the
    cubic has no minimizer."""
    (ta, fa, da), (tb, fb, db) = (a, b) if a[0] <= b[0] else (b, a)
    lo, hi = bounds if bounds is not None else (ta, tb)
    d1 = da + db - 3.0 * (fa - fb) / (ta - tb)
    disc = d1 * d1 - da * db
    if disc < 0:
        return (lo + hi) / 2.0
    d2 = math.sqrt(disc)
    t = tb - (tb - ta) * ((db + d2 - d1) / (db - da + 2.0 * d2))
    return min(max(t, lo), hi)


def strong_wolfe(phi, t, f0, g0, gtd0, d_norm, *, c1=1e-4, c2=0.9, tolerance_change=1e-9,
                 max_ls=25):
    """Find t with f(x + t d) <= f0 + c1 t g0'd and |g(x + t d)'d| <= c2 |g0'd|.

    `phi(t)` returns (f, g, g'd) at x + t d. Returns (f, g, t, evaluations). A point is a
    tuple (t, f, g, g'd)."""
    start = (0.0, f0, g0, gtd0)
    new = (t, *phi(t))
    evals = 1

    def armijo_fails(p):
        return p[1] > f0 + c1 * p[0] * gtd0

    def curvature_holds(p):
        return abs(p[3]) <= -c2 * gtd0

    # bracketing: grow the step until an interval holds an acceptable point
    prev, bracket, done, it = start, None, False, 0
    while it < max_ls:
        if armijo_fails(new) or (it > 1 and new[1] >= prev[1]):
            bracket = [prev, new]
            break
        if curvature_holds(new):
            bracket, done = [new], True
            break
        if new[3] >= 0:  # the slope turned: a minimizer lies between prev and new
            bracket = [prev, new]
            break
        t_next = _cubic_min((prev[0], prev[1], prev[3]), (new[0], new[1], new[3]),
                            bounds=(new[0] + 0.01 * (new[0] - prev[0]), 10.0 * new[0]))
        prev, new = new, (t_next, *phi(t_next))
        evals += 1
        it += 1
    if bracket is None:  # out of evaluations: the better of the start and the last point
        bracket = [start, new]

    # zoom: shrink the bracket; `low` is always its point with the lower loss
    low = 0 if bracket[0][1] <= bracket[-1][1] else 1
    stalled = False
    while not done and it < max_ls:
        (ta, *_), (tb, *_) = bracket
        if abs(tb - ta) * d_norm < tolerance_change:
            break
        t = _cubic_min((ta, bracket[0][1], bracket[0][3]), (tb, bracket[1][1], bracket[1][3]))
        left, right = min(ta, tb), max(ta, tb)
        margin = 0.1 * (right - left)
        if min(right - t, t - left) < margin:
            # near an end: accept once, but move off the end when it happens twice in a
            # row or the trial is the end itself
            if stalled or t >= right or t <= left:
                t = right - margin if abs(t - right) < abs(t - left) else left + margin
                stalled = False
            else:
                stalled = True
        else:
            stalled = False
        new = (t, *phi(t))
        evals += 1
        it += 1
        high = 1 - low
        if armijo_fails(new) or new[1] >= bracket[low][1]:
            bracket[high] = new
            low = 0 if bracket[0][1] <= bracket[1][1] else 1
        else:
            if curvature_holds(new):
                done = True
            elif new[3] * (bracket[high][0] - bracket[low][0]) >= 0:
                bracket[high] = bracket[low]
            bracket[low] = new
    t, f, g, _ = bracket[low]
    return f, g, t, evals


# --- the iteration, over any kind of vector ---------------------------------------------------


class ListSpace:
    """The vectors of `fo.LBFGS`: lists of arrays aligned with the params, the two-loop
    recursion's dot products and updates fused over all of them (`ListKernels`).

    `iterate` runs on any object with these methods; `fusedopt.torch.LBFGS` gives it flat
    tensors in torch.optim.LBFGS's layout instead."""

    def __init__(self, op, params, closure):
        self.op, self.params, self.closure = op, params, closure
        self.kernels = ListKernels(params)
        self.dot, self.axpy_ = self.kernels.dot, self.kernels.axpy_

    neg, scale, sub, copy = staticmethod(_neg), staticmethod(_scale), staticmethod(_sub), \
        staticmethod(_copy)
    abs_max, abs_sum = staticmethod(_abs_max), staticmethod(_abs_sum)

    def evaluate(self):
        """(loss as float, the closure's value, own gradient copies)."""
        return evaluate(self.op, self.closure, self.params)

    def move(self, d, t):
        """params += t * d, one fused call."""
        F.axpy_(self.params, d, t)

    def save(self):
        return _copy(self.params)

    def restore(self, saved):
        _restore(self.params, saved)


def two_loop(space, g, old_dirs, old_stps, ro, h_diag):
    """-H g by the two-loop recursion; every dot and update is one fused call."""
    q = space.neg(g)
    al = [0.0] * len(old_dirs)
    for i in range(len(old_dirs) - 1, -1, -1):
        al[i] = space.dot(old_stps[i], q) * ro[i]
        space.axpy_(q, old_dirs[i], -al[i])
    r = space.scale(q, h_diag)
    for i in range(len(old_dirs)):
        be_i = space.dot(old_dirs[i], r) * ro[i]
        space.axpy_(r, old_stps[i], al[i] - be_i)
    return r


def iterate(space, state, group):
    """One `step`: up to `max_iter` L-BFGS iterations from `state` (torch.optim.LBFGS's
    names, updated in place) with the hyperparameters of `group`; returns the closure's
    first value."""
    lr, max_iter, max_eval = float(group["lr"]), group["max_iter"], group["max_eval"]
    tol_grad, tol_change = group["tolerance_grad"], group["tolerance_change"]
    history_size = group["history_size"]
    k = space

    loss, orig_loss, g = space.evaluate()
    evals = 1
    state["func_evals"] += 1
    if k.abs_max(g) <= tol_grad:
        return orig_loss

    d, t = state.get("d"), state.get("t")
    old_dirs, old_stps, ro = state.get("old_dirs"), state.get("old_stps"), state.get("ro")
    h_diag, prev_g = state.get("H_diag"), state.get("prev_flat_grad")
    prev_loss = state.get("prev_loss")

    n_iter = 0
    while n_iter < max_iter:
        n_iter += 1
        state["n_iter"] += 1

        # search direction
        if state["n_iter"] == 1:
            d = k.neg(g)
            old_dirs, old_stps, ro, h_diag = [], [], [], 1.0
        else:
            y = k.sub(g, prev_g)
            s = k.scale(d, t)
            ys = k.dot(y, s)
            if ys > 1e-10:
                if len(old_dirs) == history_size:
                    old_dirs.pop(0)
                    old_stps.pop(0)
                    ro.pop(0)
                old_dirs.append(y)
                old_stps.append(s)
                ro.append(1.0 / ys)
                h_diag = ys / k.dot(y, y)
            d = two_loop(k, g, old_dirs, old_stps, ro, h_diag)
        prev_g = k.copy(g)
        prev_loss = loss

        # step length
        t = min(1.0, 1.0 / k.abs_sum(g)) * lr if state["n_iter"] == 1 else lr
        gtd = k.dot(g, d)
        if gtd > -tol_change:
            break

        ls_evals = 0
        if group["line_search_fn"] == "strong_wolfe":
            x0 = space.save()

            def phi(step, d=d, x0=x0):
                space.move(d, step)
                f_t, _, g_t = space.evaluate()
                space.restore(x0)
                return f_t, g_t, k.dot(g_t, d)

            loss, g, t, ls_evals = strong_wolfe(phi, t, loss, g, gtd, k.abs_max(d),
                                                tolerance_change=tol_change,
                                                max_ls=max_eval - evals)
            space.move(d, t)
            converged = k.abs_max(g) <= tol_grad
        else:
            space.move(d, t)
            converged = False
            if n_iter != max_iter:
                # not after the last iteration: with stochastic losses the value
                # would not be used
                loss, _, g = space.evaluate()
                converged = k.abs_max(g) <= tol_grad
                ls_evals = 1
        evals += ls_evals
        state["func_evals"] += ls_evals

        if n_iter == max_iter or evals >= max_eval or converged:
            break
        if k.abs_max(d) * abs(t) <= tol_change:
            break
        if abs(loss - prev_loss) < tol_change:
            break

    state.update(d=d, t=t, old_dirs=old_dirs, old_stps=old_stps, ro=ro, H_diag=h_diag,
                 prev_flat_grad=prev_g, prev_loss=prev_loss)
    return orig_loss


# --- the optimizer -------------------------------------------------------------------------

_ARRAY_LISTS = ("d", "prev_flat_grad")
_HISTORY = ("old_dirs", "old_stps")


class LBFGS(Optimizer):
    """Limited-memory BFGS (torch.optim.LBFGS's arguments and defaults).

    One `step(closure)` runs up to `max_iter` iterations and `max_eval` closure calls.
    Only one parameter group is supported, as in torch; the params may have any shapes
    and mix float32 and float64 (each vector keeps the params' dtypes).
    """

    def __init__(self, params, lr=1, max_iter=20, max_eval=None, tolerance_grad=1e-7,
                 tolerance_change=1e-9, history_size=100, line_search_fn=None):
        if max_eval is None:
            max_eval = max_iter * 5 // 4
        super().__init__(params, dict(lr=lr, max_iter=max_iter, max_eval=max_eval,
                                      tolerance_grad=tolerance_grad,
                                      tolerance_change=tolerance_change,
                                      history_size=history_size, line_search_fn=line_search_fn))

    def add_param_group(self, group):
        if self.param_groups:
            raise ValueError("LBFGS doesn't support per-parameter options (parameter groups)")
        super().add_param_group(group)

    def _validate_group(self, g):
        check_number("learning rate", g["lr"], 0.0)
        for name in ("max_iter", "max_eval", "history_size"):
            check(isinstance(g[name], int) and not isinstance(g[name], bool) and g[name] >= 1,
                  f"Invalid {name}: {g[name]!r} (an integer >= 1)")
        check_number("tolerance_grad", g["tolerance_grad"], 0.0)
        check_number("tolerance_change", g["tolerance_change"], 0.0)
        check(g["line_search_fn"] in (None, "strong_wolfe"),
              f"Invalid line_search_fn: {g['line_search_fn']!r} (None or 'strong_wolfe')")

    def _state_names(self, group):
        return []

    @property
    def _params(self):
        return self.param_groups[0]["params"]

    def step(self, closure):
        """Up to `max_iter` L-BFGS iterations; returns the closure's first loss. One
        optimizer stepped from several threads at once runs the steps one after the
        other (a lock)."""
        with self._lock:
            state = self.state.setdefault(0, {"func_evals": 0, "n_iter": 0})
            return iterate(ListSpace("LBFGS", self._params, closure), state,
                           self.param_groups[0])

    # --- state dicts --------------------------------------------------------------------

    def state_dict(self):
        out = super().state_dict()
        out["state"] = {k: _deep_copy(v) for k, v in self.state.items()}
        return out

    def load_state_dict(self, state_dict):
        """Restore hyperparameters and the history; ValueError on any mismatch (counts,
        shapes, dtypes), keeping the current state."""
        groups = state_dict["param_groups"]
        if len(groups) != 1:
            raise ValueError(f"loaded state dict has {len(groups)} parameter groups, LBFGS "
                             "has 1")
        params = self._params
        if len(groups[0]["params"]) != len(params):
            raise ValueError(f"loaded state dict has {len(groups[0]['params'])} params, the "
                             f"optimizer has {len(params)}")
        group = dict(self.param_groups[0])
        group.update({k: v for k, v in groups[0].items() if k != "params"})
        self._validate_group(group)
        saved = dict(state_dict["state"])
        if set(saved) - {0}:
            raise ValueError("loaded LBFGS state must be keyed by 0 (the first param)")
        state = saved.get(0)
        if state is not None:
            state = _deep_copy(state)
            for name in _ARRAY_LISTS:
                if state.get(name) is not None:
                    _check_vector(name, state[name], params)
            lengths = {len(state.get(name) or []) for name in (*_HISTORY, "ro")}
            if len(lengths) > 1:
                raise ValueError("loaded old_dirs, old_stps and ro differ in length")
            for name in _HISTORY:
                for k, vec in enumerate(state.get(name) or []):
                    _check_vector(f"{name}[{k}]", vec, params)
        self.param_groups[0] = group
        self.state = {} if state is None else {0: state}


def _deep_copy(v):
    if isinstance(v, dict):
        return {k: _deep_copy(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return type(v)(_deep_copy(x) for x in v)
    return v.copy() if hasattr(v, "copy") and hasattr(v, "shape") else v


def _check_vector(name, vec, params):
    if not isinstance(vec, (list, tuple)) or len(vec) != len(params):
        raise ValueError(f"loaded {name} must be a list of {len(params)} arrays")
    for i, (x, p) in enumerate(zip(vec, params)):
        if tuple(getattr(x, "shape", ())) != tuple(p.shape):
            raise ValueError(f"loaded {name}[{i}] has shape {tuple(getattr(x, 'shape', ()))}, "
                             f"params[{i}] has {tuple(p.shape)}")
        if getattr(x, "dtype", None) != p.dtype:
            raise ValueError(f"loaded {name}[{i}] has dtype {getattr(x, 'dtype', None)}, "
                             f"params[{i}] has {p.dtype}")
