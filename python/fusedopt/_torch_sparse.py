"""fusedopt.torch.SparseAdam: torch.optim.SparseAdam's interface and state (``step`` a
Python int, as torch keeps it), over fusedopt's row-sparse kernels.

``nn.Embedding(..., sparse=True)`` leaves a sparse COO gradient; `step` coalesces it
(torch's sums of repeated rows) and updates, in one call per group (per device, dtype
and step count), only the rows it touches and their moments: the other rows keep their
bits. Hand-written rather than generated (`fusedopt.algorithms.sparse`'s spec names it)
because torch keeps this optimizer's step count as an int, not a tensor.
"""

from __future__ import annotations

import threading

import torch
from torch.optim import Optimizer

from . import _engine
from ._torch_ema import TorchEma
from .algorithms import SPECS
from .algorithms._doc import class_doc

__all__ = ["SparseAdam"]


def _plain(value):
    if isinstance(value, torch.Tensor):
        return value.item()
    if isinstance(value, tuple):
        return tuple(map(_plain, value))
    return value


class SparseAdam(TorchEma, Optimizer):
    spec = SPECS["sparse_adam"]

    def __init__(self, params, lr: float = 1e-3, betas: tuple = (0.9, 0.999),
                 eps: float = 1e-8, maximize: bool = False, *,
                 ema_decay: float | None = None) -> None:
        if isinstance(lr, torch.Tensor) and lr.numel() != 1:
            raise ValueError("Tensor lr must be 1-element")
        if not 0.0 < lr:
            raise ValueError(f"Invalid learning rate: {lr}")
        if not 0.0 < eps:
            raise ValueError(f"Invalid epsilon value: {eps}")
        if not 0.0 <= betas[0] < 1.0:
            raise ValueError(f"Invalid beta parameter at index 0: {betas[0]}")
        if not 0.0 <= betas[1] < 1.0:
            raise ValueError(f"Invalid beta parameter at index 1: {betas[1]}")
        self._ema_init(ema_decay)
        self._fo_lock = threading.Lock()
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, maximize=maximize))
        sparse_params, complex_params = [], []
        for index, group in enumerate(self.param_groups):
            for d_index, p in enumerate(group["params"]):
                if p.is_sparse:
                    sparse_params.append([index, d_index])
                if p.is_complex():
                    complex_params.append([index, d_index])
        if sparse_params:
            raise ValueError(f"Sparse params at indices {sparse_params}: SparseAdam requires "
                             "dense parameter tensors")
        if complex_params:
            raise ValueError(f"Complex params at indices {complex_params}: SparseAdam does not "
                             "support complex parameters")

    def __setstate__(self, state):
        super().__setstate__(state)
        if not hasattr(self, "_fo_lock"):  # a copy: a lock of its own
            self._fo_lock = threading.Lock()

    @torch.no_grad()
    def step(self, closure=None):
        """One update of the rows each param's sparse gradient touches; returns the
        closure's loss. Every group is validated before any param changes."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        with self._fo_lock:  # one step at a time (as the other fusedopt.torch classes)
            spec = self.spec
            self._ema_begin()
            plans, fresh, counted = [], {}, []
            for group in self.param_groups:
                buckets = {}
                for p in group["params"]:
                    if p.grad is None:
                        continue
                    if not p.grad.is_sparse:
                        raise RuntimeError("SparseAdam does not support dense gradients, please "
                                           "consider Adam instead")
                    state = self.state.get(p)
                    if not state or "step" not in state:
                        state = fresh[p] = {
                            "step": 0,
                            "exp_avg": torch.zeros_like(p, memory_format=torch.preserve_format),
                            "exp_avg_sq": torch.zeros_like(p, memory_format=torch.preserve_format)}
                    bucket = buckets.setdefault(int(state["step"]), ([], [], [], []))
                    for lst, x in zip(bucket, (p, p.grad, state["exp_avg"], state["exp_avg_sq"])):
                        lst.append(x)
                if not buckets:
                    continue
                kw = spec.to_op({k: _plain(v) for k, v in group.items() if k != "params"})
                for count, (ps, gs, ms, vs) in buckets.items():
                    plans.append(_engine.plan(spec, dict(kw, step=count + 1), ps, gs, [ms, vs],
                                              options=self._ema_options(ps)))
                    counted += ps
            self._fo_commit(fresh, counted, plans)
        return loss


SparseAdam.__doc__ = class_doc(SparseAdam.spec, torch=True)
