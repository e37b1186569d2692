"""Drop-in replacements for torch.optim's optimizers, one per algorithm of the table.

    from fusedopt.torch import Adam        # instead of: from torch.optim import Adam
    opt = Adam(model.parameters(), lr=1e-3)
    loss.backward(); opt.step(); opt.zero_grad()

Each class is a `torch.optim.Optimizer`: same constructor arguments, defaults and
validation, param groups, `zero_grad`, `state_dict` / `load_state_dict` (state dicts
cross over with torch.optim's both ways, state cast to the param's dtype and device on
load by torch's rule), and the LR schedulers of `torch.optim.lr_scheduler`. `step`
reads `p.grad` and runs fusedopt's fused kernels on the tensors' memory: one call per
group (per device and dtype) for all its tensors, through the same entry as the
functional ops (`_engine.plan`).

State is kept under torch's names (`step`, `exp_avg`, ...). The per-param scalars
(`step`, and any other an algorithm keeps) of a param group live in one float tensor
per name, and each param's `state["step"]` is a 0-d view of it, so one vectorized
assignment counts a step for every tensor. The lists of state tensors are cached per
param group and rebuilt when the group's params, the state options, the optimizer's
state dict or the set of states change; replacing a single tensor inside
`opt.state[p]` by assignment is not seen until the next `load_state_dict`.

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

from . import _arrays, _engine
from .algorithms import SPECS
from .algorithms._doc import class_doc, class_signature
from .optimizers import bind_options

__all__ = []

_GRAD = attrgetter("grad")


def _scalar_dtype():
    """torch.optim's dtype of `step`: float64 when that is the default dtype, else float32."""
    return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32


def _plain(value):
    """A hyperparameter as a Python number (torch.optim takes 1-element tensors too)."""
    if isinstance(value, torch.Tensor):
        return value.item()
    if isinstance(value, tuple):
        return tuple(map(_plain, value))
    return value


class _Cache:
    """The state tensor lists of one param group, aligned with its params (None where a
    param has no state yet), and its per-param scalars."""

    __slots__ = ("group", "params", "names", "state", "nstate", "lists", "has",
                 "scalars", "values", "fresh", "rows")


class _Fused(Optimizer):
    """What every class shares: state bookkeeping and the step loop, over a spec."""

    spec = None

    def __init__(self, params, defaults):
        self._fo_caches = {}
        self._fo_lock = threading.Lock()
        super().__init__(params, defaults)
        if self.spec.eager_state:  # torch.optim makes (Adagrad's) state at construction
            for group in self.param_groups:
                cache = self._cache(group)
                self._add_state(group, cache, range(len(group["params"])))

    # --- torch.optim.Optimizer ----------------------------------------------------------

    def __getstate__(self):
        state = super().__getstate__()
        state.pop("_fo_lock", None)
        state.pop("_fo_caches", None)
        return state

    def __setstate__(self, state):
        super().__setstate__(state)
        self._fo_caches = {}
        self._fo_lock = threading.Lock()
        for group in self.param_groups:
            for key, value in self.spec.group_defaults(torch=True).items():
                group.setdefault(key, value)

    def step(self, closure=None):
        """One update of every param whose `grad` is not None; returns the closure's loss.

        Steps of one optimizer from several threads run one after the other."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        with self._fo_lock:
            for group in self.param_groups:
                self.spec.check_step(group)
            plans, counted, grouped = [], [], []
            for group in self.param_groups:
                self._plan_group(group, plans, counted, grouped)
            # every group validated: run, then count the step and install first buffers
            for plan in plans:
                plan.run()
            for group, after in grouped:
                group.update(after)
            for cache, sel, params, after in counted:
                for index, new in after:
                    for name, value in new.items():
                        cache.values[name][index] = value
                if cache.fresh is not None:
                    self._install_fresh(cache, sel)
                torch.autograd.graph.increment_version(params)
        return loss

    # --- the step -----------------------------------------------------------------------

    def _plan_group(self, group, plans, counted, grouped):
        spec = self.spec
        kw = spec.to_op({k: _plain(v) for k, v in group.items() if k != "params"})
        # per-group bookkeeping (spec.advance_group): every group, every step
        extra, after = spec.advance_group(kw, group)
        if after:
            kw.update(extra)
            grouped.append((group, after))
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
        values = {name: (v if sel is None else v[sel]) for name, v in cache.values.items()}
        first = None
        if cache.fresh is not None:
            first = cache.fresh if sel is None else cache.fresh[sel]
        index = slice(None) if sel is None else np.asarray(sel)
        after = []
        if all(v.min() == v.max() for v in values.values()) and \
                (first is None or first.all() or not first.any()):
            rows = self._kept_rows(cache, params) if sel is None else None
            scalars = {name: float(v[0]) for name, v in values.items()}
            plans.append(self._plan(kw, params, grads, lists, scalars,
                                    first is not None and bool(first[0]), rows, after, index))
        else:  # params at different step counts, or new momentum buffers among old ones
            table = np.stack([values[n] for n in spec.scalars], axis=1) if spec.scalars else \
                np.zeros((len(params), 0))
            fresh = np.zeros(len(params), dtype=bool) if first is None else first
            keys = {}
            for i, (row, f) in enumerate(zip(map(tuple, table), fresh)):
                keys.setdefault((row, bool(f)), []).append(i)
            for (row, is_first), pick in keys.items():
                pick = np.asarray(pick)
                where = pick if sel is None else np.asarray(sel)[pick]
                plans.append(self._plan(
                    kw, [params[i] for i in pick], [grads[i] for i in pick],
                    [[lst[i] for i in pick] for lst in lists],
                    dict(zip(spec.scalars, row)), is_first, None, after, where))
        counted.append((cache, sel, params, after))

    def _plan(self, kw, params, grads, lists, scalars, first, rows, after, index):
        """The validated plan of one bucket (params with the same scalars)."""
        spec = self.spec
        extra, new = spec.advance(kw, scalars)
        if extra:
            kw = {**kw, **extra}
        if spec.fresh_keyword is not None:
            kw = {**kw, spec.fresh_keyword: first}
        after.append((index, new))
        precision = None
        return _engine.plan(spec, kw, params, grads, lists, rows=rows, options=precision)

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

    def _state_names(self, group):
        spec = self.spec
        return spec.active(spec.to_op({k: _plain(v) for k, v in group.items()
                                       if k != "params"}))

    def _init_state(self, name, param, group):
        if self.spec.state(name).like_param:
            return param.detach().clone(memory_format=torch.preserve_format)
        value = self.spec.init_value(name, group)
        if value:
            return torch.full_like(param, _plain(value), memory_format=torch.preserve_format)
        return torch.zeros_like(param, memory_format=torch.preserve_format)

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
        spec = self.spec
        params = list(group["params"])
        n = len(params)
        cache = _Cache()
        cache.group, cache.params, cache.names, cache.state = group, params, names, self.state
        cache.lists = [[None] * n for _ in names]
        cache.has = np.zeros(n, dtype=bool)
        cache.fresh = None
        cache.rows = None
        cache.scalars, cache.values = {}, {}
        if spec.scalars:
            dtype = _scalar_dtype()
            for p in params:
                st = self.state.get(p)
                if st and isinstance(st.get("step"), torch.Tensor):
                    dtype = st["step"].dtype
                    break
            for name in spec.scalars:
                cache.scalars[name] = torch.zeros(n, dtype=dtype)
                cache.values[name] = cache.scalars[name].numpy()  # the same memory
        for i, p in enumerate(params):
            st = self.state.get(p)
            if st:
                self._adopt(group, cache, i, p, st)
        if spec.fresh_keyword is not None and names:
            cache.fresh = ~cache.has
        cache.nstate = len(self.state)
        return cache

    def _adopt(self, group, cache, i, p, st):
        """Take an existing state into the cache, completing what the options now need."""
        if self.spec.fresh_keyword is not None and cache.names and \
                st.get(cache.names[0]) is None:
            return  # no buffer yet: the param's next step is its first
        initial = self.spec.init_scalars(group)
        for name, tensor in cache.scalars.items():
            cache.values[name][i] = float(st.get(name, initial[name]))
            st[name] = tensor[i]
        for lst, name in zip(cache.lists, cache.names):
            t = st.get(name)
            if t is None:
                t = st[name] = self._init_state(name, p, group)
            lst[i] = t
        cache.has[i] = True

    def _add_state(self, group, cache, indices):
        """Fresh state for the params in `indices` that have none yet."""
        params = cache.params
        if self.spec.fresh_keyword is not None:
            # torch keeps no such buffer until a param's first step, and then sets it to
            # the gradient; here it is made at once and enters the state after that step
            if not cache.names:
                cache.has[:] = True
                return
            for i in indices:
                if not cache.has[i]:
                    cache.lists[0][i] = self._init_state(cache.names[0], params[i], group)
                    cache.has[i] = True
                    cache.fresh[i] = True
            return
        initial = self.spec.init_scalars(group)
        for i in indices:
            if cache.has[i]:
                continue
            p = params[i]
            st = self.state[p]
            for name, tensor in cache.scalars.items():
                cache.values[name][i] = initial[name]
                st[name] = tensor[i]
            for lst, name in zip(cache.lists, cache.names):
                lst[i] = st[name] = self._init_state(name, p, group)
            cache.has[i] = True
            cache.rows = None
        cache.nstate = len(self.state)

    def _install_fresh(self, cache, sel):
        index = np.arange(len(cache.params)) if sel is None else np.asarray(sel)
        for i in index[cache.fresh[index]]:
            self.state[cache.params[i]][cache.names[0]] = cache.lists[0][i]
            cache.fresh[i] = False
        cache.nstate = len(self.state)


class _Modes:
    """``train()`` and ``eval()`` of the algorithms with two sequences (a spec with a
    `mode_state`), as the schedulefree package switches them: every param with state
    moves by ``p.lerp_(state, w)``."""

    @torch.no_grad()
    def train(self) -> None:
        """Put the params in train mode (the sequence the steps update)."""
        self._switch(True)

    @torch.no_grad()
    def eval(self) -> None:
        """Put the params in eval mode (the sequence to evaluate and save)."""
        self._switch(False)

    def _switch(self, train):
        spec = self.spec
        with self._fo_lock:
            for group in self.param_groups:
                weight = spec.mode_weight({k: _plain(v) for k, v in group.items()
                                           if k != "params"}, train)
                if weight is None:
                    continue
                for p in group["params"]:
                    st = self.state.get(p)
                    if st and spec.mode_state in st:
                        p.lerp_(end=st[spec.mode_state].to(p.device), weight=weight)
                group.update(spec.set_mode(group, train))


# --- the classes, from the table --------------------------------------------------------------


def _check_torch_flags(cls, values):
    if values.get("capturable"):
        raise ValueError(f"fusedopt.torch.{cls.__name__} does not support capturable=True")
    if values.get("differentiable"):
        raise ValueError(f"fusedopt.torch.{cls.__name__} does not support "
                         "differentiable=True")


def make_class(spec, base=_Fused):
    """The torch.optim drop-in of a spec, over `base`."""
    signature = class_signature(spec, torch=True)

    def __init__(self, params, *args, **kwargs):
        values = bind_options(type(self), spec, signature, params, args, kwargs)
        lr = values.get("lr")
        if isinstance(lr, torch.Tensor) and lr.numel() != 1:
            raise ValueError("Tensor lr must be 1-element")
        if "betas" in values:
            values["betas"] = tuple(map(_plain, values["betas"]))
        spec.validate(values)
        _check_torch_flags(type(self), values)
        _Fused.__init__(self, params, {**values, **spec.group_extras})

    __init__.__signature__ = signature
    __init__.__doc__ = f"See `{spec.title}`."
    attrs = {"spec": spec, "__init__": __init__, "__doc__": class_doc(spec, torch=True),
             "__module__": __name__}
    bases = (_Modes, base) if spec.mode_state is not None and not issubclass(base, _Modes) \
        else (base,)
    return type(spec.title, bases, attrs)


def _make_all():
    made = {}
    for spec in SPECS.values():
        made[spec.name] = make_class(spec, made[spec.base] if spec.base else _Fused)
    return made


CLASSES = _make_all()
globals().update({cls.__name__: cls for cls in CLASSES.values()})
__all__ += [cls.__name__ for cls in CLASSES.values()]
