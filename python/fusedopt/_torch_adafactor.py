"""fusedopt.torch.Adafactor: torch.optim.Adafactor's interface and state (``step`` a 0-d
float tensor, ``row_var``/``col_var`` of shapes (..., m, 1)/(..., 1, n) for matrices,
``variance`` for vectors), over fusedopt's factored drivers (`fusedopt._adafactor`).

Hand-written rather than generated (`fusedopt.algorithms.adafactor`'s spec names it)
because its state buffers do not have the params' shapes.
"""

from __future__ import annotations

import threading

import torch
from torch.optim import Optimizer

from . import _engine
from ._torch_ema import TorchEma
from .algorithms import SPECS
from .algorithms._doc import class_doc

__all__ = ["Adafactor"]


def _plain(value):
    if isinstance(value, torch.Tensor):
        return value.item()
    if isinstance(value, tuple):
        return tuple(map(_plain, value))
    return value


def _scalar_dtype():
    return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32


class Adafactor(TorchEma, Optimizer):
    spec = SPECS["adafactor"]

    def __init__(self, params, lr: float = 1e-2, beta2_decay: float = -0.8,
                 eps: tuple = (None, 1e-3), d: float = 1.0, weight_decay: float = 0.0, *,
                 foreach: bool | None = None, maximize: bool = False,
                 ema_decay: float | None = None) -> None:
        if isinstance(lr, torch.Tensor) and lr.numel() != 1:
            raise ValueError("Tensor lr must be 1-element")
        defaults = dict(lr=lr, beta2_decay=beta2_decay, eps=eps, d=d, weight_decay=weight_decay,
                        foreach=foreach, maximize=maximize)
        self.spec.validate(defaults)
        self._ema_init(ema_decay)
        self._fo_lock = threading.Lock()
        super().__init__(params, defaults)

    def __setstate__(self, state):
        super().__setstate__(state)
        if not hasattr(self, "_fo_lock"):  # a copy: a lock of its own
            self._fo_lock = threading.Lock()
        for group in self.param_groups:
            group.setdefault("foreach", None)

    @torch.no_grad()
    def step(self, closure=None):
        """One update of every param whose `grad` is not None; returns the closure's loss.
        Every group is validated before any param changes."""
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
                    if torch.is_complex(p):
                        raise RuntimeError("Adafactor does not support complex parameters")
                    if p.grad.is_sparse:
                        raise RuntimeError("Adafactor does not support sparse gradients")
                    state = self.state.get(p)
                    if not state or "step" not in state:
                        state = {"step": torch.tensor(0.0, dtype=_scalar_dtype())}
                        if p.grad.dim() > 1:
                            shape = list(p.grad.shape)
                            state["row_var"] = p.grad.new_zeros(shape[:-1] + [1])
                            state["col_var"] = p.grad.new_zeros(shape[:-2] + [1, shape[-1]])
                        else:
                            state["variance"] = torch.zeros_like(
                                p.grad, memory_format=torch.preserve_format)
                        fresh[p] = state
                    bucket = buckets.setdefault(float(state["step"]), ([], [], [], [], []))
                    for lst, x in zip(bucket, (p, p.grad, state.get("row_var"),
                                               state.get("col_var"), state.get("variance"))):
                        lst.append(x)
                if not buckets:
                    continue
                kw = spec.to_op({k: _plain(v) for k, v in group.items() if k != "params"})
                for count, (ps, gs, rows, cols, var) in buckets.items():
                    plans.append(_engine.plan(spec, dict(kw, step=int(count) + 1), ps, gs,
                                              [rows, cols, var], options=self._ema_options(ps)))
                    counted += ps
            self._fo_commit(fresh, counted, plans)
        return loss


Adafactor.__doc__ = class_doc(Adafactor.spec, torch=True)
