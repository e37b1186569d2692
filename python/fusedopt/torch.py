"""Drop-in replacements for torch.optim's SGD, Adagrad, RMSprop, Adadelta, Adam and AdamW.

    from fusedopt.torch import Adam        # instead of: from torch.optim import Adam
    opt = Adam(model.parameters(), lr=1e-3)
    loss.backward(); opt.step(); opt.zero_grad()

Each class is a `torch.optim.Optimizer`: same constructor arguments, defaults and
validation, param groups, `zero_grad`, `state_dict` / `load_state_dict` (state
dicts cross over with torch.optim's both ways, state cast to the param's dtype and
device on load by torch's rule), and the LR schedulers of `torch.optim.lr_scheduler`.
`step` reads `p.grad` and runs fusedopt's fused kernels on the tensors' memory: one
call per group (per device and dtype) for all its tensors.

State is kept under torch's names (`step`, `exp_avg`, ...). The `step` counts of a
param group live in one float tensor, and each param's `state["step"]` is a 0-d
view of it, so one vectorized add counts a step for every tensor. The lists of
state tensors are cached per param group and rebuilt when the group's params, the
state options, the optimizer's state dict or the set of states change; replacing
a single tensor inside `opt.state[p]` by assignment is not seen until the next
`load_state_dict`.

`foreach` and `fused` are accepted and kept in the param groups (state dicts then
load into torch.optim unchanged) but change nothing here: every step is fused.
`capturable` and `differentiable` are not supported. Complex params are refused
(TypeError), as are sparse gradients.
"""

from __future__ import annotations

import threading
from itertools import repeat
from operator import attrgetter, is_

import numpy as np
import torch
from torch.optim import Optimizer

from . import _arrays
from . import functional as F
from .optimizer import serialized

__all__ = ["SGD", "Adagrad", "RMSprop", "Adadelta", "Adam", "AdamW"]

_GRAD = attrgetter("grad")


def _scalar_dtype():
    """torch.optim's dtype of `step`: float64 when that is the default dtype, else float32."""
    return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32


def _value(x):
    """A hyperparameter as a Python number (torch.optim takes 1-element tensors too)."""
    return x.item() if isinstance(x, torch.Tensor) else x


def _check_unsupported(capturable, differentiable, name):
    if capturable:
        raise ValueError(f"fusedopt.torch.{name} does not support capturable=True")
    if differentiable:
        raise ValueError(f"fusedopt.torch.{name} does not support differentiable=True")


def _check_lr(lr):
    if isinstance(lr, torch.Tensor) and lr.numel() != 1:
        raise ValueError("Tensor lr must be 1-element")
    if not 0.0 <= lr:
        raise ValueError(f"Invalid learning rate: {lr}")


class _Cache:
    """The state tensor lists of one param group, aligned with its params (None where a
    param has no state yet), and its step counts."""

    __slots__ = ("group", "params", "names", "state", "nstate", "lists", "has",
                 "steps", "counts", "fresh", "rows")


class _Fused(Optimizer):
    """What the six classes share: state bookkeeping and the step loop."""

    has_step = True  # whether the state holds a `step` count (every algorithm but SGD)

    def __init__(self, params, defaults):
        self._fo_caches = {}
        self._step_lock = threading.Lock()  # not in torch's __getstate__: never pickled
        super().__init__(params, defaults)

    # --- per algorithm ------------------------------------------------------------------

    def _state_names(self, group):
        """Names of the state tensors of a group, in the order `_plan` takes them."""
        raise NotImplementedError

    def _init_state(self, name, param, group):
        return torch.zeros_like(param, memory_format=torch.preserve_format)

    def _plan(self, group, params, grads, states, step, first, rows=None):
        """The functional op's deferred call for one bucket of a group."""
        raise NotImplementedError

    # --- torch.optim.Optimizer ----------------------------------------------------------

    def __setstate__(self, state):
        super().__setstate__(state)
        self._fo_caches = {}
        self._step_lock = threading.Lock()
        for group in self.param_groups:
            for key, value in self._group_defaults().items():
                group.setdefault(key, value)

    def _group_defaults(self):
        return {"foreach": None, "maximize": False, "differentiable": False}

    @serialized
    def step(self, closure=None):
        """One update of every param whose `grad` is not None; returns the closure's loss.
        Steps of one optimizer called from several threads run one at a time."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        plans, counted = [], []
        for group in self.param_groups:
            self._plan_group(group, plans, counted)
        # every group validated: run, then count the step and install first buffers
        for plan in plans:
            plan.run()
        for cache, sel, params in counted:
            if cache.steps is not None:
                if sel is None:
                    cache.counts += 1
                else:
                    cache.counts[sel] += 1
            if cache.fresh is not None:
                self._install_fresh(cache, sel)
            torch.autograd.graph.increment_version(params)
        return loss

    # --- the step -----------------------------------------------------------------------

    def _plan_group(self, group, plans, counted):
        params = group["params"]
        if not params:
            return
        cache = self._cache(group)
        grads = list(map(_GRAD, params))
        if any(map(is_, grads, repeat(None))):
            sel = [i for i, g in enumerate(grads) if g is not None]
            if not sel:
                return
        else:
            sel = None
        if sel is None:
            if not cache.has.all():
                self._add_state(group, cache, range(len(params)))
            lists = cache.lists
        else:
            if not cache.has[sel].all():
                self._add_state(group, cache, sel)
            params = [params[i] for i in sel]
            grads = [grads[i] for i in sel]
            lists = [[lst[i] for i in sel] for lst in cache.lists]
        counts = None
        if cache.steps is not None:
            counts = cache.counts if sel is None else cache.counts[sel]
        first = None
        if cache.fresh is not None:
            first = cache.fresh if sel is None else cache.fresh[sel]
        if (counts is None or counts.min() == counts.max()) and \
                (first is None or first.all() or not first.any()):
            step = int(counts[0]) + 1 if counts is not None else 0
            rows = self._kept_rows(cache, params) if sel is None else None
            plans.append(self._plan(group, params, grads, lists, step,
                                    first is not None and bool(first[0]), rows))
        else:  # params at different step counts, or new momentum buffers among old ones
            keys = np.zeros(len(params)) if counts is None else counts
            fresh = np.zeros(len(params), dtype=bool) if first is None else first
            for value in np.unique(keys):
                for is_first in (False, True):
                    pick = np.flatnonzero((keys == value) & (fresh == is_first))
                    if pick.size:
                        plans.append(self._plan(
                            group, [params[i] for i in pick], [grads[i] for i in pick],
                            [[lst[i] for i in pick] for lst in lists], int(value) + 1,
                            is_first))
        counted.append((cache, sel, params))

    def _kept_rows(self, cache, params):
        """Description rows of the group's params and state lists, kept between steps:
        the state tensors are the cache's own, and the params are checked by address
        each step (one pass instead of five). Gradients are described every step."""
        ptrs = np.fromiter(map(torch.Tensor.data_ptr, params), np.int64, len(params))
        if cache.rows is None or not np.array_equal(cache.rows[0][:, 0], ptrs):
            lists = [params] + [list(lst) for lst in cache.lists]
            described = [_arrays.describe_list("step", "params", lst)[0] for lst in lists]
            cache.rows = [described[0], None, *described[1:]]
        return cache.rows

    def _cache(self, group):
        """The group's cache, rebuilt when it no longer matches the group or the state."""
        cache = self._fo_caches.get(id(group))
        params = group["params"]
        names = self._state_names(group)
        if (cache is None or cache.group is not group or cache.state is not self.state or
                cache.nstate != len(self.state) or cache.names != names or
                len(cache.params) != len(params) or
                not all(map(is_, cache.params, params))):
            cache = self._fo_caches[id(group)] = self._build(group, names)
        return cache

    def _build(self, group, names):
        params = list(group["params"])
        n = len(params)
        cache = _Cache()
        cache.group, cache.params, cache.names, cache.state = group, params, names, self.state
        cache.lists = [[None] * n for _ in names]
        cache.has = np.zeros(n, dtype=bool)
        cache.fresh = None
        cache.rows = None
        cache.steps = cache.counts = None
        if self.has_step:
            dtype = _scalar_dtype()
            for p in params:
                st = self.state.get(p)
                if st and isinstance(st.get("step"), torch.Tensor):
                    dtype = st["step"].dtype
                    break
            cache.steps = torch.zeros(n, dtype=dtype)
            cache.counts = cache.steps.numpy()  # the same memory, counted in place
        for i, p in enumerate(params):
            st = self.state.get(p)
            if st:
                self._adopt(group, cache, i, p, st)
        cache.nstate = len(self.state)
        return cache

    def _adopt(self, group, cache, i, p, st):
        """Take an existing state into the cache, completing what the options now need."""
        if cache.steps is not None:
            step = st.get("step", 0.0)
            cache.counts[i] = float(step)
            st["step"] = cache.steps[i]
        for lst, name in zip(cache.lists, cache.names):
            t = st.get(name)
            if t is None:
                t = st[name] = self._init_state(name, p, group)
            lst[i] = t
        cache.has[i] = True

    def _add_state(self, group, cache, indices):
        """Fresh state for the params in `indices` that have none yet."""
        params = cache.params
        for i in indices:
            if cache.has[i]:
                continue
            p = params[i]
            st = self.state[p]
            if cache.steps is not None:
                cache.counts[i] = 0.0
                st["step"] = cache.steps[i]
            for lst, name in zip(cache.lists, cache.names):
                lst[i] = st[name] = self._init_state(name, p, group)
            cache.has[i] = True
            cache.rows = None
        cache.nstate = len(self.state)


# --- the algorithms -----------------------------------------------------------------------


class SGD(_Fused):
    has_step = False

    def __init__(self, params, lr=1e-3, momentum=0, dampening=0, weight_decay=0,
                 nesterov=False, *, maximize=False, foreach=None, differentiable=False,
                 fused=None):
        _check_lr(lr)
        if momentum < 0.0:
            raise ValueError(f"Invalid momentum value: {momentum}")
        if weight_decay < 0.0:
            raise ValueError(f"Invalid weight_decay value: {weight_decay}")
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError("Nesterov momentum requires a momentum and zero dampening")
        _check_unsupported(False, differentiable, "SGD")
        super().__init__(params, {"lr": lr, "momentum": momentum, "dampening": dampening,
                                  "weight_decay": weight_decay, "nesterov": nesterov,
                                  "maximize": maximize, "foreach": foreach,
                                  "differentiable": differentiable, "fused": fused})

    def _group_defaults(self):
        return {"nesterov": False, "maximize": False, "foreach": None,
                "differentiable": False, "fused": False}

    def _state_names(self, group):
        return ("momentum_buffer",) if group["momentum"] != 0 else ()

    # torch.optim keeps no momentum buffer until a param's first step, and then sets it to
    # the gradient; here the buffer is made at once and enters the state after that step.

    def _build(self, group, names):
        cache = super()._build(group, names)
        if names:
            cache.fresh = ~cache.has
        return cache

    def _adopt(self, group, cache, i, p, st):
        if cache.names and st.get("momentum_buffer") is None:
            return  # no buffer yet: the param's next step is its first
        super()._adopt(group, cache, i, p, st)

    def _add_state(self, group, cache, indices):
        if not cache.names:
            cache.has[:] = True
            return
        for i in indices:
            if not cache.has[i]:
                cache.lists[0][i] = self._init_state("momentum_buffer", cache.params[i], group)
                cache.has[i] = True
                cache.fresh[i] = True

    def _install_fresh(self, cache, sel):
        index = np.arange(len(cache.params)) if sel is None else np.asarray(sel)
        for i in index[cache.fresh[index]]:
            self.state[cache.params[i]]["momentum_buffer"] = cache.lists[0][i]
            cache.fresh[i] = False
        cache.nstate = len(self.state)

    def _plan(self, g, params, grads, states, step, first, rows=None):
        return F.sgd_(params, grads, *states, lr=_value(g["lr"]), momentum=g["momentum"],
                      dampening=g["dampening"], weight_decay=_value(g["weight_decay"]),
                      nesterov=g["nesterov"], maximize=g["maximize"], first_step=first,
                      _defer=True, _rows=rows)


class Adagrad(_Fused):
    def __init__(self, params, lr=1e-2, lr_decay=0, weight_decay=0, initial_accumulator_value=0,
                 eps=1e-10, foreach=None, *, maximize=False, differentiable=False, fused=None):
        _check_lr(lr)
        if not 0.0 <= lr_decay:
            raise ValueError(f"Invalid lr_decay value: {lr_decay}")
        if not 0.0 <= weight_decay:
            raise ValueError(f"Invalid weight_decay value: {weight_decay}")
        if not 0.0 <= initial_accumulator_value:
            raise ValueError(
                f"Invalid initial_accumulator_value value: {initial_accumulator_value}")
        if not 0.0 <= eps:
            raise ValueError(f"Invalid epsilon value: {eps}")
        _check_unsupported(False, differentiable, "Adagrad")
        super().__init__(params, {"lr": lr, "lr_decay": lr_decay, "eps": eps,
                                  "weight_decay": weight_decay,
                                  "initial_accumulator_value": initial_accumulator_value,
                                  "foreach": foreach, "maximize": maximize,
                                  "differentiable": differentiable, "fused": fused})
        # torch.optim makes Adagrad's state at construction
        for group in self.param_groups:
            cache = self._cache(group)
            self._add_state(group, cache, range(len(group["params"])))

    def _group_defaults(self):
        return {"foreach": None, "maximize": False, "differentiable": False, "fused": None}

    def _state_names(self, group):
        return ("sum",)

    def _init_state(self, name, param, group):
        return torch.full_like(param, group["initial_accumulator_value"],
                               memory_format=torch.preserve_format)

    def _plan(self, g, params, grads, states, step, first, rows=None):
        return F.adagrad_(params, grads, *states, step=step, lr=_value(g["lr"]),
                          lr_decay=g["lr_decay"], weight_decay=g["weight_decay"], eps=g["eps"],
                          maximize=g["maximize"], _defer=True, _rows=rows)


class RMSprop(_Fused):
    def __init__(self, params, lr=1e-2, alpha=0.99, eps=1e-8, weight_decay=0, momentum=0,
                 centered=False, capturable=False, foreach=None, maximize=False,
                 differentiable=False):
        _check_lr(lr)
        if not 0.0 <= eps:
            raise ValueError(f"Invalid epsilon value: {eps}")
        if not 0.0 <= momentum:
            raise ValueError(f"Invalid momentum value: {momentum}")
        if not 0.0 <= weight_decay:
            raise ValueError(f"Invalid weight_decay value: {weight_decay}")
        if not 0.0 <= alpha:
            raise ValueError(f"Invalid alpha value: {alpha}")
        _check_unsupported(capturable, differentiable, "RMSprop")
        super().__init__(params, {"lr": lr, "momentum": momentum, "alpha": alpha, "eps": eps,
                                  "centered": centered, "weight_decay": weight_decay,
                                  "capturable": capturable, "foreach": foreach,
                                  "maximize": maximize, "differentiable": differentiable})

    def _group_defaults(self):
        return {"momentum": 0, "centered": False, "foreach": None, "maximize": False,
                "differentiable": False, "capturable": False}

    def _state_names(self, group):
        names = ("square_avg",)
        if group["momentum"] > 0:
            names += ("momentum_buffer",)
        if group["centered"]:
            names += ("grad_avg",)
        return names

    def _plan(self, g, params, grads, states, step, first, rows=None):
        by_name = dict(zip(self._state_names(g), states))
        return F.rmsprop_(params, grads, by_name["square_avg"], by_name.get("momentum_buffer"),
                          by_name.get("grad_avg"), lr=_value(g["lr"]), alpha=g["alpha"],
                          eps=g["eps"], weight_decay=g["weight_decay"], momentum=g["momentum"],
                          centered=g["centered"], maximize=g["maximize"], _defer=True, _rows=rows)


class Adadelta(_Fused):
    def __init__(self, params, lr=1.0, rho=0.9, eps=1e-6, weight_decay=0, foreach=None, *,
                 capturable=False, maximize=False, differentiable=False):
        _check_lr(lr)
        if not 0.0 <= rho <= 1.0:
            raise ValueError(f"Invalid rho value: {rho}")
        if not 0.0 <= eps:
            raise ValueError(f"Invalid epsilon value: {eps}")
        if not 0.0 <= weight_decay:
            raise ValueError(f"Invalid weight_decay value: {weight_decay}")
        _check_unsupported(capturable, differentiable, "Adadelta")
        super().__init__(params, {"lr": lr, "rho": rho, "eps": eps,
                                  "weight_decay": weight_decay, "maximize": maximize,
                                  "capturable": capturable, "foreach": foreach,
                                  "differentiable": differentiable})

    def _group_defaults(self):
        return {"foreach": None, "maximize": False, "differentiable": False,
                "capturable": False}

    def _state_names(self, group):
        return ("square_avg", "acc_delta")

    def _plan(self, g, params, grads, states, step, first, rows=None):
        return F.adadelta_(params, grads, *states, lr=_value(g["lr"]), rho=g["rho"],
                           eps=g["eps"], weight_decay=g["weight_decay"], maximize=g["maximize"],
                           _defer=True, _rows=rows)


class Adam(_Fused):
    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0,
                 amsgrad=False, *, foreach=None, maximize=False, capturable=False,
                 differentiable=False, fused=None, decoupled_weight_decay=False):
        _check_lr(lr)
        if not 0.0 <= eps:
            raise ValueError(f"Invalid epsilon value: {eps}")
        if not 0.0 <= betas[0] < 1.0:
            raise ValueError(f"Invalid beta parameter at index 0: {betas[0]}")
        if not 0.0 <= betas[1] < 1.0:
            raise ValueError(f"Invalid beta parameter at index 1: {betas[1]}")
        if not 0.0 <= weight_decay:
            raise ValueError(f"Invalid weight_decay value: {weight_decay}")
        _check_unsupported(capturable, differentiable, type(self).__name__)
        super().__init__(params, {"lr": lr, "betas": tuple(map(_value, betas)), "eps": eps,
                                  "weight_decay": weight_decay, "amsgrad": amsgrad,
                                  "maximize": maximize, "foreach": foreach,
                                  "capturable": capturable, "differentiable": differentiable,
                                  "fused": fused,
                                  "decoupled_weight_decay": decoupled_weight_decay})

    def _group_defaults(self):
        return {"amsgrad": False, "maximize": False, "foreach": None, "capturable": False,
                "differentiable": False, "decoupled_weight_decay": False, "fused": None}

    def _state_names(self, group):
        return ("exp_avg", "exp_avg_sq", "max_exp_avg_sq") if group["amsgrad"] else \
            ("exp_avg", "exp_avg_sq")

    def _plan(self, g, params, grads, states, step, first, rows=None):
        beta1, beta2 = g["betas"]
        return F.adam_(params, grads, *states, step=step, lr=_value(g["lr"]),
                       beta1=_value(beta1), beta2=_value(beta2), eps=g["eps"],
                       weight_decay=g["weight_decay"], amsgrad=g["amsgrad"],
                       maximize=g["maximize"],
                       decoupled_weight_decay=g["decoupled_weight_decay"],
                       _op="adamw_" if g["decoupled_weight_decay"] else "adam_", _defer=True, _rows=rows)


class AdamW(Adam):
    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2,
                 amsgrad=False, *, maximize=False, foreach=None, capturable=False,
                 differentiable=False, fused=None):
        super().__init__(params, lr, betas, eps, weight_decay, amsgrad, foreach=foreach,
                         maximize=maximize, capturable=capturable,
                         differentiable=differentiable, fused=fused,
                         decoupled_weight_decay=True)

    def __setstate__(self, state):
        super().__setstate__(state)
        for group in self.param_groups:
            group["decoupled_weight_decay"] = True
