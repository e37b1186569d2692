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
state dict, the set of states or a param's state dict (replaced whole, as
ZeroRedundancyOptimizer.load_state_dict does) change; replacing a single tensor inside
`opt.state[p]` by assignment is not seen until the next `load_state_dict`.

Step hooks (`register_step_pre_hook`, `register_step_post_hook` and the global ones)
run as torch.optim runs them; the profiler's ``Optimizer.step#<Class>.step`` range is
recorded while a profiler runs (torch enters it on every step, which costs more than
the whole step of a small model).

`foreach` and `fused` are accepted and kept in the param groups (state dicts then
load into torch.optim unchanged) but change nothing here: every step is fused.
`capturable` and `differentiable` are not supported. Complex params are refused
(TypeError), as are sparse gradients.
"""

from __future__ import annotations

import functools
import threading
from itertools import chain, repeat
from operator import attrgetter, is_

import numpy as np
import torch
from torch.optim import Optimizer
from torch.optim import optimizer as _torch_optimizer

from . import _engine, _flat, _foreign, _precision
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


def _hooked_step(func):
    """`step` wrapped as torch.optim wraps it (the step pre- and post-hooks, global and
    per optimizer, with torch's rules; `_optimizer_step_code` for the profiler), with the
    profiler's `record_function` range only while a profiler runs: entered always, it
    costs more than a whole step of a small model."""
    pre_hooks = _torch_optimizer._global_optimizer_pre_hooks
    post_hooks = _torch_optimizer._global_optimizer_post_hooks
    profiling = torch._C._autograd._profiler_enabled

    def hooked(self, args, kwargs):
        for pre_hook in chain(pre_hooks.values(), self._optimizer_step_pre_hooks.values()):
            result = pre_hook(self, args, kwargs)
            if result is not None:
                if isinstance(result, tuple) and len(result) == 2:
                    args, kwargs = result
                else:
                    raise RuntimeError(f"{func} must return None or a tuple of (new_args, "
                                       f"new_kwargs), but got {result}.")
        out = func(*args, **kwargs)
        self._optimizer_step_code()
        for post_hook in chain(self._optimizer_step_post_hooks.values(), post_hooks.values()):
            post_hook(self, args, kwargs)
        return out

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        self = args[0]
        if profiling():
            with torch.autograd.profiler.record_function(
                    f"Optimizer.step#{type(self).__name__}.step"):
                return hooked(self, args, kwargs)
        if pre_hooks or self._optimizer_step_pre_hooks or \
                self._optimizer_step_post_hooks or post_hooks:
            return hooked(self, args, kwargs)
        out = func(*args, **kwargs)
        self._optimizer_step_code()
        return out

    return wrapper


class _Cache:
    """The state tensor lists of one param group, aligned with its params (None where a
    param has no state yet), its per-param scalars, and the params' state dicts they
    came from."""

    __slots__ = ("group", "params", "names", "state", "nstate", "lists", "has",
                 "scalars", "values", "fresh", "kept", "steady", "flat", "dicts", "dtensor")


class _Fused(Optimizer):
    """What every class shares: state bookkeeping and the step loop, over a spec."""

    spec = None

    def __init__(self, params, defaults, flat=False):
        self._fo_caches = {}
        self._fo_lock = threading.Lock()
        self._fo_flat = bool(flat)
        self._fo_buckets = {}  # group's index -> its flat buckets (flat=True)
        self._fo_where = {}  # id(param) -> (bucket, position) (flat=True)
        self._fo_seen = None  # (keys, values) of `state` when the last step ended
        super().__init__(params, defaults)
        if self.spec.eager_state:  # torch.optim makes (Adagrad's) state at construction
            for group in self.param_groups:
                cache = self._cache(group)
                self._add_state(group, cache, range(len(group["params"])))

    # --- torch.optim.Optimizer ----------------------------------------------------------

    def _patch_step_function(self):
        """torch.optim's wrapping of `step` (hooks, profiler), made light (`_hooked_step`)."""
        self._zero_grad_profile_name = f"Optimizer.zero_grad#{type(self).__name__}.zero_grad"
        cls = type(self)
        if not getattr(cls.step, "hooked", None):
            cls.step = _hooked_step(cls.step)
            cls.step.hooked = True

    def __getstate__(self):
        state = super().__getstate__()
        for name in ("_fo_lock", "_fo_caches", "_fo_buckets", "_fo_where", "_fo_seen"):
            state.pop(name, None)
        return state

    def __setstate__(self, state):
        copied = not hasattr(self, "_fo_lock")  # a copy (deepcopy, pickle), not a load
        super().__setstate__(state)
        self._fo_caches, self._fo_seen = {}, None
        if copied:
            self._fo_lock = threading.Lock()
            # a copy steps its params one by one: the flat buffers, which the copied
            # params no longer live in, stay with the original
            self._fo_flat, self._fo_buckets, self._fo_where = False, {}, {}
        for group in self.param_groups:
            for key, value in self.spec.group_defaults(torch=True).items():
                group.setdefault(key, value)

    def add_param_group(self, param_group):
        """Add a param group (torch.optim's rules); with ``flat=True`` its params move
        into flat buffers of their own."""
        super().add_param_group(param_group)
        if self._fo_flat:
            group = self.param_groups[-1]
            DTensor = _foreign._dtensor_class()
            if DTensor is not None and any(isinstance(p, DTensor) for p in group["params"]):
                raise ValueError(f"{type(self).__name__}(flat=True): DTensor params are "
                                 "sharded by their engine (FSDP2); step them with flat=False")
            everything = [p for g in self.param_groups for p in g["params"]]
            _flat.check_disjoint(everything, type(self).__name__)
            made = self._fo_buckets[len(self.param_groups) - 1] = _flat.buckets(group["params"])
            for bucket in made:
                for position, p in enumerate(bucket.params):
                    self._fo_where[id(p)] = (bucket, position)

    def zero_grad(self, set_to_none=True):
        """Reset the gradients (torch.optim's `zero_grad`). With ``flat=True`` the
        gradient buffers are zeroed in one pass each and every trainable param's `.grad`
        stays (or becomes again) its view of the buffer, a zero tensor rather than None
        whatever `set_to_none` says, so that the next backward accumulates into the
        buffer; params that do not require gradients get None."""
        if not self._fo_flat:
            return super().zero_grad(set_to_none)
        for gi, group in enumerate(self.param_groups):
            for bucket in self._fo_buckets.get(gi, ()):
                bucket.zero_grad(set_to_none)
            flat = {id(p) for b in self._fo_buckets.get(gi, ()) for p in b.params}
            for p in group["params"]:
                if id(p) not in flat and p.grad is not None:
                    p.grad = None if set_to_none else p.grad.zero_()
        return None

    def load_state_dict(self, state_dict):
        """torch.optim's `load_state_dict`; with ``flat=True`` the loaded state is copied
        into the flat state buffers, and `state` holds their views again."""
        super().load_state_dict(state_dict)
        if not self._fo_flat:
            return
        names = {s.name for s in self.spec.states}
        with torch.no_grad():
            for p, st in self.state.items():
                where = self._fo_where.get(id(p))
                if where is None:
                    continue
                bucket, position = where
                for name, value in list(st.items()):
                    if name in names and isinstance(value, torch.Tensor) and \
                            value.shape == p.shape:
                        view = bucket.state_view(name, position, 0.0)
                        view.copy_(value)
                        st[name] = view

    def step(self, closure=None):
        """One update of every param whose `grad` is not None; returns the closure's loss.

        Steps of one optimizer from several threads run one after the other."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        with self._fo_lock:
            plans, counted = [], []
            same = self._state_unchanged()
            for gi, group in enumerate(self.param_groups):
                self._plan_group(gi, group, plans, counted, same)
            # every group validated: run, then count the step and install first buffers
            for plan in plans:
                plan.run()
            for cache, sel, params, after in counted:
                for index, new in after:
                    for name, value in new.items():
                        cache.values[name][index] = value
                if cache.fresh is not None and cache.fresh.any():
                    self._install_fresh(cache, sel)
                    cache.steady, cache.flat = self._is_steady(cache), None
                torch.autograd.graph.increment_version(params)
            self._fo_seen = (list(self.state), list(self.state.values()))
        return loss

    def _state_unchanged(self):
        """Whether `state` maps the same params to the same dicts as when the last step
        ended (identities, read in order: no hashing of tensors); then the caches that
        step validated need not look their params' dicts up again."""
        seen = self._fo_seen
        state = self.state
        return (seen is not None and len(seen[0]) == len(state) and
                all(map(is_, state, seen[0])) and all(map(is_, state.values(), seen[1])))

    # --- the step -----------------------------------------------------------------------

    def _plan_group(self, gi, group, plans, counted, same=False):
        params = group["params"]
        if not params:
            return
        spec = self.spec
        kw = spec.to_op(group)
        cache = self._cache(group, spec.active(kw), same)
        grads = list(map(_GRAD, params))
        counted_params = params
        if cache.dtensor:
            # DTensors (FSDP2) are stepped on their local shards, so that a kept plan is
            # checked against the shards' addresses
            params = _foreign.local_shards(params, torch, "step", "params")
            grads = _foreign.local_shards(grads, torch, "step", "grads")
        if any(map(is_, grads, repeat(None))):
            sel = [i for i, g in enumerate(grads) if g is not None]
            if not sel:
                return
        else:
            sel = None
        after = []
        if sel is None and cache.steady and self._fo_flat and \
                self._plan_flat(gi, cache, kw, grads, plans, after):
            counted.append((cache, sel, counted_params, after))
            return
        if sel is None and cache.steady:
            # the common case: every param has its state and the same scalars
            scalars = {name: float(v[0]) for name, v in cache.values.items()}
            plans.append(self._plan(kw, params, grads, cache.lists, scalars, False, cache,
                                    after, slice(None)))
            counted.append((cache, sel, counted_params, after))
            return
        if sel is None:
            if not cache.has.all():
                self._add_state(group, cache, range(len(params)))
            lists = cache.lists
        else:
            if not cache.has[sel].all():
                self._add_state(group, cache, sel)
            params = [params[i] for i in sel]
            counted_params = [counted_params[i] for i in sel]
            grads = [grads[i] for i in sel]
            lists = [[lst[i] for i in sel] for lst in cache.lists]
        values = {name: (v if sel is None else v[sel]) for name, v in cache.values.items()}
        first = None
        if cache.fresh is not None:
            first = cache.fresh if sel is None else cache.fresh[sel]
        index = slice(None) if sel is None else np.asarray(sel)
        if all(v.min() == v.max() for v in values.values()) and \
                (first is None or first.all() or not first.any()):
            scalars = {name: float(v[0]) for name, v in values.items()}
            plans.append(self._plan(kw, params, grads, lists, scalars,
                                    first is not None and bool(first[0]),
                                    cache if sel is None else None, after, index))
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
        cache.steady = None if sel is not None else self._is_steady(cache)
        counted.append((cache, sel, counted_params, after))

    def _plan_flat(self, gi, cache, kw, grads, plans, after):
        """The plans of a flat group: one per bucket, over its buffers. False (nothing
        planned) when the per-tensor path must run: a param without a gradient, or state
        that is not the buckets' (loaded and not yet copied in)."""
        buckets = self._fo_buckets.get(gi)
        if not buckets:
            return False
        if cache.flat is None:
            cache.flat = all(self._fo_where[id(p)][0].owns_state(name, self._fo_where[id(p)][1],
                                                                 lst[i])
                             for i, p in enumerate(cache.params)
                             for name, lst in zip(cache.names, cache.lists))
        if not cache.flat:
            return False
        owner = type(self).__name__
        for bucket in buckets:
            bucket.check_params(owner)
            mine = grads if len(buckets) == 1 else [grads[i] for i in bucket.indices]
            if not bucket.gather_grads(mine):
                return False
        spec = self.spec
        scalars = {name: float(v[0]) for name, v in cache.values.items()}
        extra, new = spec.advance(kw, scalars)
        if extra:
            kw = {**kw, **extra}
        if spec.fresh_keyword is not None:
            kw = {**kw, spec.fresh_keyword: False}
        after.append((slice(None), new))
        options = _precision.PLAIN
        for bucket in buckets:
            params, bgrads = [bucket.data], [bucket.grad]
            lists = [[bucket.states[name]] for name in cache.names]
            plan = None
            if bucket.kept is not None:
                plan = bucket.kept.reuse(spec, kw, params, bgrads, lists, options,
                                         torch_params=True)
            if plan is None:
                plan = _engine.plan(spec, kw, params, bgrads, lists, options=options)
                bucket.kept = _engine.Kept(plan, params, lists)
            plans.append(plan)
        return True

    @staticmethod
    def _is_steady(cache):
        """Whether every param of the group has its state, with the same scalars, and no
        buffer awaits its first step: the next step is one plan, the kept one."""
        return bool(cache.has.all()) and (cache.fresh is None or not cache.fresh.any()) and \
            all(v.min() == v.max() for v in cache.values.values())

    def _plan(self, kw, params, grads, lists, scalars, first, cache, after, index):
        """The validated plan of one bucket (params with the same scalars). A whole
        group's plan is kept in its cache for the next step (`_engine.Kept`): the params
        are then checked by address and the gradients by address and contiguity (torch
        checked their dtype, shape and device against the params when they were
        assigned)."""
        spec = self.spec
        extra, new = spec.advance(kw, scalars)
        if extra:
            kw = {**kw, **extra}
        if spec.fresh_keyword is not None:
            kw = {**kw, spec.fresh_keyword: first}
        after.append((index, new))
        options = _precision.PLAIN
        if cache is not None and cache.kept is not None:
            plan = cache.kept.reuse(spec, kw, params, grads, lists, options, torch_params=True,
                                    checked=True)
            if plan is not None:
                return plan
        plan = _engine.plan(spec, kw, params, grads, lists, options=options)
        if cache is not None:
            cache.kept = _engine.Kept(plan, params, lists)
        return plan

    def _init_state(self, name, param, group):
        value = self.spec.init_value(name, group)
        where = self._fo_where.get(id(param))
        if where is not None:  # flat=True: a view of the bucket's state buffer
            view = where[0].state_view(name, where[1], _plain(value))
            if value:
                view.fill_(_plain(value))
            else:
                view.zero_()
            return view
        if value:
            return torch.full_like(param, _plain(value), memory_format=torch.preserve_format)
        return torch.zeros_like(param, memory_format=torch.preserve_format)

    def _cache(self, group, names=None, same=False):
        """The group's cache, rebuilt when it no longer matches the group, its state
        `names`, or the state (`same`: the state's dicts are known unchanged)."""
        cache = self._fo_caches.get(id(group))
        params = group["params"]
        if names is None:
            names = self.spec.active(self.spec.to_op(group))
        if (cache is None or cache.group is not group or cache.state is not self.state or
                cache.nstate != len(self.state) or cache.names != names or
                len(cache.params) != len(params) or
                not all(map(is_, cache.params, params)) or
                (not same and not all(map(is_, cache.dicts, map(self.state.get, params))))):
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
        cache.kept = None
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
        cache.dicts = list(map(self.state.get, params))
        cache.nstate = len(self.state)
        cache.steady = self._is_steady(cache)
        cache.flat = None  # whether the state is the flat buckets' (flat=True), when known
        DTensor = _foreign._dtensor_class()
        # DTensor params (FSDP2) are stepped on their local shards; their grads are DTensors
        cache.dtensor = DTensor is not None and any(isinstance(p, DTensor) for p in params)
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
        cache.steady, cache.flat = False, None
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
            st = cache.dicts[i] = self.state[p]
            for name, tensor in cache.scalars.items():
                cache.values[name][i] = initial[name]
                st[name] = tensor[i]
            for lst, name in zip(cache.lists, cache.names):
                lst[i] = st[name] = self._init_state(name, p, group)
            cache.has[i] = True
            cache.kept = None
        cache.nstate = len(self.state)

    def _install_fresh(self, cache, sel):
        index = np.arange(len(cache.params)) if sel is None else np.asarray(sel)
        for i in index[cache.fresh[index]]:
            st = cache.dicts[i] = self.state[cache.params[i]]
            st[cache.names[0]] = cache.lists[0][i]
            cache.fresh[i] = False
        cache.nstate = len(self.state)


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
        flat = values.pop("flat")
        spec.validate(values)
        _check_torch_flags(type(self), values)
        _Fused.__init__(self, params, {**values, **spec.group_extras}, flat=flat)

    __init__.__signature__ = signature
    __init__.__doc__ = f"See `{spec.title}`."
    attrs = {"spec": spec, "__init__": __init__, "__doc__": class_doc(spec, torch=True),
             "__module__": __name__}
    return type(spec.title, (base,), attrs)


def _make_all():
    made = {}
    for spec in SPECS.values():
        made[spec.name] = make_class(spec, made[spec.base] if spec.base else _Fused)
    return made


CLASSES = _make_all()
globals().update({cls.__name__: cls for cls in CLASSES.values()})
__all__ += [cls.__name__ for cls in CLASSES.values()]
