"""fusedopt.torch.LBFGS: torch.optim.LBFGS's interface, closure convention and state, over
fusedopt's L-BFGS iteration (`fusedopt.lbfgs.iterate`).

The closure re-evaluates the model, calls ``backward()`` and returns the loss; the
optimizer reads ``p.grad``. The vectors of the method are flat tensors, as torch.optim
keeps them (``d``, ``prev_flat_grad``, ``old_dirs``, ``old_stps``), so that state dicts
cross over with torch.optim.LBFGS both ways. The two-loop recursion's dot products and
updates ``y += a x`` run on fusedopt's kernels (a dot product accumulated in double, the
plain SGD rule for the update), and a step of the parameters along the direction,
``p += t d``, is one fused multi-tensor call over all of them, on views of the flat
direction.
"""

from __future__ import annotations

import threading
from typing import Callable

import torch
from torch.optim import Optimizer

from . import functional as F
from .lbfgs import ListKernels, iterate

__all__ = ["LBFGS"]


def _number(value):
    return float(value.item() if isinstance(value, torch.Tensor) else value)


class _FlatSpace:
    """Flat tensors in the params' dtype and device (torch.optim.LBFGS's vectors)."""

    def __init__(self, params, closure):
        self.params, self.closure = params, closure
        self.numels = [p.numel() for p in params]
        self.cpu = params[0].device.type == "cpu"
        self.kernels = None  # the fused CPU kernels on NumPy views of the flat tensors

    @staticmethod
    def neg(x):
        return x.neg()

    @staticmethod
    def scale(x, a):
        return x.mul(a)

    @staticmethod
    def sub(x, y):
        return x.sub(y)

    @staticmethod
    def copy(x):
        return x.clone(memory_format=torch.contiguous_format)

    @staticmethod
    def abs_max(x):
        return float(x.abs().max()) if x.numel() else 0.0

    @staticmethod
    def abs_sum(x):
        return float(x.abs().sum())

    def _fast(self, x):
        """The CPU kernels for flat tensors like `x` (NumPy views share their memory),
        or None (GPU tensors, dtypes the fast path does not take)."""
        if not self.cpu:
            return None
        if self.kernels is None:
            self.kernels = ListKernels([x.numpy()])
        return self.kernels if self.kernels.fast else None

    def dot(self, x, y):
        k = self._fast(x)
        if k is not None:
            return k.dot([x.numpy()], [y.numpy()])
        return F.dot([x], [y])

    def axpy_(self, y, x, alpha):
        k = self._fast(x)
        if k is not None:
            k.axpy_([y.numpy()], [x.numpy()], float(alpha))
        else:
            F.axpy_([y], [x], float(alpha))

    def views(self, flat):
        return [v.view_as(p) for v, p in zip(flat.split(self.numels), self.params)]

    def evaluate(self):
        with torch.enable_grad():
            out = self.closure()
        views = []
        for p in self.params:
            if torch.is_complex(p):
                raise TypeError("fusedopt.torch.LBFGS: complex params are not supported")
            g = p.grad
            if g is None:
                views.append(p.new_zeros(p.numel()))
            elif g.is_sparse:
                views.append(g.to_dense().reshape(-1))
            else:
                views.append(g.reshape(-1))
        loss = float(out.detach() if isinstance(out, torch.Tensor) else out)
        return loss, out, torch.cat(views, 0)

    def move(self, d, t):
        """params += t * d: one fused call over all params."""
        F.axpy_(self.params, self.views(d), float(t))
        torch.autograd.graph.increment_version(self.params)

    def save(self):
        return [p.clone(memory_format=torch.contiguous_format) for p in self.params]

    def restore(self, saved):
        for p, x in zip(self.params, saved):
            p.copy_(x)


class LBFGS(Optimizer):
    """Limited-memory BFGS: a drop-in for ``torch.optim.LBFGS``.

    Up to `max_iter` iterations per `step`, each with a direction from the two-loop
    recursion over the last `history_size` pairs (Nocedal & Wright, algorithm 7.4) and,
    with ``line_search_fn="strong_wolfe"``, a step length that meets the strong Wolfe
    conditions (algorithms 3.5 and 3.6); torch.optim.LBFGS's choices everywhere the
    method leaves room (see `fusedopt.LBFGS`).

    Parameters
    ----------
    params : iterable of torch.Tensor or dict
        The parameters; one param group only, as in torch.
    lr : float, default 1
        Learning rate (the initial step length).
    max_iter : int, default 20
        Iterations per `step`.
    max_eval : int or None, default None
        Closure calls per `step` (default ``max_iter * 5 // 4``).
    tolerance_grad : float, default 1e-7
        Stop when the largest gradient element is at most this.
    tolerance_change : float, default 1e-9
        Stop when the loss or the step changes by less than this.
    history_size : int, default 100
        Pairs of the limited memory.
    line_search_fn : str or None, default None
        ``"strong_wolfe"`` or None (a fixed step of `lr`).

    Notes
    -----
    `step(closure)`: the closure clears the gradients, evaluates the model, calls
    ``backward()`` and returns the loss; `step` returns its first value. A param whose
    ``grad`` is None counts as a zero gradient; sparse gradients are made dense.

    State, under torch.optim.LBFGS's names, on the first param: ``func_evals``,
    ``n_iter``, ``d``, ``t``, ``old_dirs``, ``old_stps``, ``ro``, ``H_diag``,
    ``prev_flat_grad``, ``prev_loss`` (flat tensors as torch keeps them; ``ro``,
    ``H_diag`` and ``t`` as numbers). State dicts load into torch.optim.LBFGS and back.

    Examples
    --------
    >>> import torch
    >>> from fusedopt.torch import LBFGS
    >>> model = torch.nn.Linear(4, 1)
    >>> x, y = torch.randn(16, 4), torch.randn(16, 1)
    >>> opt = LBFGS(model.parameters(), line_search_fn="strong_wolfe")
    >>> def closure():
    ...     opt.zero_grad()
    ...     loss = ((model(x) - y) ** 2).mean()
    ...     loss.backward()
    ...     return loss
    >>> loss = opt.step(closure)
    """

    def __init__(self, params, lr: float = 1, max_iter: int = 20, max_eval: int | None = None,
                 tolerance_grad: float = 1e-7, tolerance_change: float = 1e-9,
                 history_size: int = 100, line_search_fn: str | None = None) -> None:
        if isinstance(lr, torch.Tensor) and lr.numel() != 1:
            raise ValueError("Tensor lr must be 1-element")
        if not 0.0 <= lr:
            raise ValueError(f"Invalid learning rate: {lr}")
        if max_eval is None:
            max_eval = max_iter * 5 // 4
        defaults = dict(lr=lr, max_iter=max_iter, max_eval=max_eval,
                        tolerance_grad=tolerance_grad, tolerance_change=tolerance_change,
                        history_size=history_size, line_search_fn=line_search_fn)
        super().__init__(params, defaults)
        if len(self.param_groups) != 1:
            raise ValueError("LBFGS doesn't support per-parameter options (parameter groups)")
        self._params = self.param_groups[0]["params"]
        self._fo_lock = threading.Lock()

    def __setstate__(self, state):
        super().__setstate__(state)
        self._params = self.param_groups[0]["params"]
        if not hasattr(self, "_fo_lock"):  # a copy (deepcopy, pickle): a lock of its own
            self._fo_lock = threading.Lock()

    @torch.no_grad()
    def step(self, closure: Callable) -> object:  # type: ignore[override]
        """Up to `max_iter` L-BFGS iterations; returns the closure's first value.

        Parameters
        ----------
        closure : callable
            Clears the gradients, re-evaluates the model, calls ``backward()`` and returns
            the loss.

        Notes
        -----
        One optimizer stepped from several threads at once runs the steps one after the
        other (a lock, as the other classes of `fusedopt.torch`).
        """
        with self._fo_lock:
            return self._step(closure)

    def _step(self, closure):
        group = self.param_groups[0]
        if group["line_search_fn"] not in (None, "strong_wolfe"):
            raise RuntimeError("only 'strong_wolfe' is supported")
        state = self.state[self._params[0]]
        state.setdefault("func_evals", 0)
        state.setdefault("n_iter", 0)
        # torch.optim keeps these as 0-d tensors: numbers here
        if state.get("ro") is not None:
            state["ro"] = [_number(r) for r in state["ro"]]
        for name in ("H_diag", "t"):
            if state.get(name) is not None:
                state[name] = _number(state[name])
        state.pop("al", None)  # torch.optim's scratch list of the recursion
        return iterate(_FlatSpace(self._params, closure), state, group)
