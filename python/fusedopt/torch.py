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

``optim_bits=8`` (keyword-only, bitsandbytes' name; with ``min_8bit_size``, default
4096) keeps the state of every float32, float16 or bfloat16 param with at least that
many elements in 8 bits: uint8 codes under torch's names and float32 block scales
(one per 256 elements) under ``<name>_absmax``; smaller params keep float32 state
(float64 params their own). Loaded 8-bit state keeps its dtypes. `Adam8bit` and
`AdamW8bit` are bitsandbytes' classes of those names, with its signatures, state
names and state-dict layout (`fusedopt._torch8bit`). With ``flat=True`` the 8-bit
params of a group get flat buffers of their own, each param starting on a block
boundary, so that its scales are a view too.
`capturable` and `differentiable` are not supported. Complex params are refused
(TypeError), as are sparse gradients (but by SparseAdam, hand-written in
`_torch_sparse`, like Adafactor in `_torch_adafactor` and LBFGS in `_torch_lbfgs`).

``ema_decay`` (`_torch_ema.TorchEma`) adds each param's average to the plans of a
step: the default and kept plans carry the averages of their params, a flat bucket's
plan its EMA buffer; the averages of params without a gradient move in a plan of
their own, after the others.
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

from . import _engine, _flat, _foreign, _precision, _quant, _torch8bit
from ._engine import StateDict, StateMap
from ._torch_ema import TorchEma
from .algorithms import SPECS
from .algorithms._doc import class_doc, class_signature
from .optimizers import bind_options

__all__ = []

_GRAD = attrgetter("grad")
_QUANTIZED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


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


def _stored(values):
    """The per-param scalars of params that share them, each as a NumPy scalar of the
    dtype it is stored in (what `Spec.advance` takes to compute as torch does)."""
    return {name: v[0] for name, v in values.items()}


class _Cache:
    """The state tensor lists of one param group, aligned with its params (None where a
    param has no state yet), its per-param scalars, and the params' state dicts they
    came from."""

    __slots__ = ("group", "params", "names", "state", "nstate", "lists", "has",
                 "scalars", "values", "fresh", "kept", "steady", "flat", "dicts", "dtensor",
                 "keys", "scales", "q8")


class _Fused(TorchEma, Optimizer):
    """What every class shares: state bookkeeping and the step loop, over a spec."""

    spec = None

    #: 8 keeps the state of the params `_fo_quantizes` picks in 8 bits (optim_bits)
    _fo_bits = 32
    _fo_min_8bit_size = 4096
    #: bitsandbytes' state names and state-dict layout (its Adam8bit and AdamW8bit)
    _fo_bnb_names = False

    def __init__(self, params, defaults, flat=False, ema_decay=None):
        self._ema_init(ema_decay)
        self._fo_caches = {}
        self._fo_lock = threading.Lock()
        self._fo_flat = bool(flat)
        self._fo_buckets = {}  # group's index -> its flat buckets (flat=True)
        self._fo_where = {}  # id(param) -> (bucket, position) (flat=True)
        self._fo_seen = None  # `state` when the last step ended
        # [(group, its snapshot, cache, op keywords, kept part)] of the last step, when the
        # next may replay it (`_fo_replay_step`)
        self._fo_replay = None
        super().__init__(params, defaults)
        self._fo_track_state()
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
        for name in ("_fo_lock", "_fo_caches", "_fo_buckets", "_fo_where", "_fo_seen",
                     "_fo_replay", "_fo_log", "_fo_log_seen"):
            state.pop(name, None)
        state["_fo_bits"], state["_fo_min_8bit_size"] = self._fo_bits, self._fo_min_8bit_size
        return state

    def __setstate__(self, state):
        copied = not hasattr(self, "_fo_lock")  # a copy (deepcopy, pickle), not a load
        super().__setstate__(state)
        self._fo_caches, self._fo_seen, self._fo_replay = {}, None, None
        self._fo_track_state()
        if copied:
            self._fo_lock = threading.Lock()
            # a copy steps its params one by one: the flat buffers, which the copied
            # params no longer live in, stay with the original
            self._fo_flat, self._fo_buckets, self._fo_where = False, {}, {}
        for group in self.param_groups:
            for key, value in self.spec.group_defaults(torch=True).items():
                group.setdefault(key, value)

    def _fo_track_state(self):
        """Make every param's state a `StateDict` of this optimizer's log (the states a
        load or a copy brought are plain dicts), and the new ones too."""
        log = self.__dict__.get("_fo_log")
        if log is None:
            log = self._fo_log = [0]
        self._fo_log_seen = None
        self.state = _engine.track(self.state, log, StateMap)

    def add_param_group(self, param_group):
        """Add a param group (torch.optim's rules, and the algorithm's rule for params:
        Muon's are 2-D); with ``flat=True`` its params move into flat buffers of their
        own. An algorithm with per-tensor norms (LAMB, LARS) refuses params sharded by
        their engine (DTensors with a Shard placement, FSDP2): a shard's norms are not its
        tensor's."""
        self._check_shards(param_group)
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        try:
            self.spec.check_params(group["params"])
        except ValueError:
            self.param_groups.pop()  # a refused group is not kept
            raise
        DTensor = _foreign._dtensor_class()
        if self._fo_bits == 8 and DTensor is not None and \
                any(isinstance(p, DTensor) for p in group["params"]):
            raise ValueError(f"{type(self).__name__}(optim_bits=8): DTensor params (FSDP2) "
                             "are not supported with 8-bit state; use optim_bits=32")
        if self._fo_flat:
            if DTensor is not None and any(isinstance(p, DTensor) for p in group["params"]):
                raise ValueError(f"{type(self).__name__}(flat=True): DTensor params are "
                                 "sharded by their engine (FSDP2); step them with flat=False")
            everything = [p for g in self.param_groups for p in g["params"]]
            _flat.check_disjoint(everything, type(self).__name__)
            made = self._fo_buckets[len(self.param_groups) - 1] = _flat.buckets(
                group["params"], self._fo_quantizes if self._fo_bits == 8 else None)
            for bucket in made:
                for position, p in enumerate(bucket.params):
                    self._fo_where[id(p)] = (bucket, position)

    def _check_shards(self, param_group):
        DTensor = _foreign._dtensor_class()
        params = param_group.get("params") if isinstance(param_group, dict) else None
        if DTensor is None or params is None:
            return
        if isinstance(params, torch.Tensor):
            params = [params]
        elif not isinstance(params, set):  # (torch refuses sets)
            params = param_group["params"] = list(params)
        if not any(isinstance(p, DTensor) and any(pl.is_shard() for pl in p.placements)
                   for p in params):
            return
        spec = self.spec
        if spec.reductions(spec.to_op({**self.defaults, **param_group})):
            raise ValueError(f"{type(self).__name__}: params sharded by their engine (DTensors "
                             "with a Shard placement, FSDP2) are stepped on their local "
                             "shards, and this algorithm's trust ratios need each whole "
                             "tensor's norms")

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

    def state_dict(self):
        """torch.optim's `state_dict` (bitsandbytes' layout for `Adam8bit` and
        `AdamW8bit`), each param's state a plain dict (what `torch.load(...,
        weights_only=True)` reads back)."""
        out = super().state_dict()
        state = out.get("state")
        if isinstance(state, dict) and any(type(v) is StateDict for v in state.values()):
            out = dict(out, state={k: dict(v) if type(v) is StateDict else v
                                   for k, v in state.items()})
        return _torch8bit.state_dict(self, out)

    def load_state_dict(self, state_dict):
        """torch.optim's `load_state_dict`. 8-bit state (uint8 codes and float32 block
        scales, or bitsandbytes' layout) keeps its dtypes: torch's rule would cast it to
        the param's dtype. With ``flat=True`` the loaded state is copied into the flat
        state buffers, and `state` holds their views again."""
        if self._fo_bits == 8 or self._fo_bnb_names or _torch8bit.has_8bit(state_dict):
            _torch8bit.load_state_dict(self, state_dict, super().load_state_dict)
        else:
            super().load_state_dict(state_dict)
        if not self._fo_flat:
            return
        with torch.no_grad():
            for group in self.param_groups:
                kw = self.spec.to_op(group)
                keys = self._state_keys(self.spec.active(kw))
                for p in group["params"]:
                    where = self._fo_where.get(id(p))
                    st = self.state.get(p)
                    if where is None or not st:
                        continue
                    bucket, position = where
                    for name, (key, scale_key, _) in zip(self.spec.active(kw), keys):
                        value = st.get(key)
                        if not isinstance(value, torch.Tensor) or value.shape != p.shape:
                            continue
                        if bucket.quantized:
                            scales = st.get(scale_key)
                            if value.dtype != torch.uint8 or \
                                    not isinstance(scales, torch.Tensor) or \
                                    scales.dtype != torch.float32 or \
                                    scales.shape != (_quant.blocks(p.numel()),):
                                continue  # not this bucket's 8-bit state: stepped per tensor
                            view, sview = self._fo_quant_view(bucket, position, name)
                            view.copy_(value)
                            sview.copy_(scales)
                            st[key], st[scale_key] = view, sview
                        else:
                            view = bucket.state_view(name, position, 0.0,
                                                     self._fo_state_dtype(p))
                            if value.dtype != view.dtype:
                                continue
                            view.copy_(value)
                            st[key] = view
                    ema = st.get("ema")  # the average (ema_decay): a view of the EMA buffer
                    if isinstance(ema, torch.Tensor) and ema.shape == p.shape and \
                            ema.dtype == p.dtype:
                        view = bucket.state_view("ema", position, 0.0)
                        view.copy_(ema)
                        st["ema"] = view

    def step(self, closure=None):
        """One update of every param whose `grad` is not None; returns the closure's loss.

        Steps of one optimizer from several threads run one after the other."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        with self._fo_lock:
            if self._fo_replay is not None and self._fo_replay_step():
                return loss
            spec = self.spec
            for group in self.param_groups:
                spec.check_step(group)
            if self._fo_log[0] != self._fo_log_seen:
                # some state entry was written since the last step: the caches' lists may
                # hold tensors the state no longer does (their kept plans too)
                self._fo_caches = {}
            self._ema_begin()
            plans, counted, grouped = [], [], []
            same = self._state_unchanged()
            self._fo_replay, record = None, []
            for gi, group in enumerate(self.param_groups):
                self._plan_group(gi, group, plans, counted, grouped, same, record)
            ema_plan = self._ema_rest_plan({id(p) for c in counted for p in c[2]})
            # every group validated: run, then count the step and install first buffers
            if self._ema_install():  # new averages: the flat check of each group again
                for cache in self._fo_caches.values():
                    cache.flat = None
            for plan in plans:
                plan.run()
            if ema_plan is not None:
                ema_plan.run()
            for group, after in grouped:
                group.update(after)
            for cache, sel, params, after in counted:
                for index, new in after:
                    for name, value in new.items():
                        cache.values[name][index] = value
                if cache.fresh is not None and cache.fresh.any():
                    self._install_fresh(cache, sel)
                    cache.steady, cache.flat = self._is_steady(cache), None
                torch.autograd.graph.increment_version(params)
            if not _engine.all_tracked(self.state, self._fo_log, StateMap):
                # (a state dict, or the whole state, assigned: tracked from now on)
                self._fo_track_state()
            self._fo_seen = self.state
            self._fo_log_seen = self._fo_log[0]
            if len(record) == len(self.param_groups) and not grouped and \
                    self.ema_decay is None:
                self._fo_replay = record
        return loss

    def _fo_replay_step(self):
        """The step of a steady state, when the last step's kept plans still fit: the
        same groups with the same hyperparameters (`_engine.snapshot`), params (at the
        same addresses) and state, every param with a gradient and its state at the
        group's scalars. Only what changes between such steps is done (the scalars
        advanced, the gradients' addresses read and checked, the kernels run). False,
        with nothing changed, when something else changed: the full step then runs."""
        groups = self.param_groups
        replay = self._fo_replay
        if len(groups) != len(replay) or self.ema_decay is not None or \
                self._ema_swapped or not self._state_unchanged():
            return False
        caches, nstate = self._fo_caches, len(self.state)
        spec, owner = self.spec, type(self).__name__
        todo = []
        for gi, (group, (kept_group, snapshot, cache, kw, part)) in \
                enumerate(zip(groups, replay)):
            params = group["params"]
            if group is not kept_group or not _engine.same_snapshot(group, snapshot) or \
                    caches.get(id(group)) is not cache or not cache.steady or \
                    cache.state is not self.state or cache.nstate != nstate or \
                    len(params) != len(cache.params) or not all(map(is_, params, cache.params)):
                return False
            grads = list(map(_GRAD, params))
            if part is not None:
                if any(map(is_, grads, repeat(None))):
                    return False
                todo.append((cache, kw, [(cache.kept[part], params, grads)], params))
                continue
            # flat=True: the buckets' buffers, with every gradient their view again
            buckets = self._fo_buckets.get(gi)
            if not buckets or not cache.flat:
                return False
            whole = not spec.reductions(kw)
            runs = []
            for bucket in buckets:
                bucket.check_params(owner)
                if bucket.kept is None or not bucket.gather_grads(
                        grads if len(buckets) == 1 else [grads[i] for i in bucket.indices]):
                    return False
                runs.append((bucket.kept, bucket.kept.params,
                             [bucket.grad] if whole else bucket.grad_views))
            todo.append((cache, kw, runs, params))
        plans, counted = [], []
        for cache, kw, runs, params in todo:
            kw, new = spec.step_keywords(kw, _stored(cache.values))
            for kept, kparams, grads in runs:
                plan = kept.reuse(spec, kw, kparams, grads, kept.lists, kept.plan.options,
                                  torch_params=True, checked=True)
                if plan is None:
                    return False  # (no plan was run yet: the full step plans anew)
                plans.append(plan)
            counted.append((cache, new, params))
        for plan in plans:
            plan.run()
        for cache, new, params in counted:
            for name, value in new.items():
                cache.values[name][:] = value
            torch.autograd.graph.increment_version(params)
        return True

    def _state_unchanged(self):
        """Whether `state` maps the same params to the same dicts as when the last step
        ended: the same `StateMap`, with no write counted in the log since (no state
        made, replaced or removed, no entry of a param's state written); then the caches
        that step validated need not look their params' dicts up again."""
        return self.state is self._fo_seen and self._fo_log[0] == self._fo_log_seen

    # --- the step -----------------------------------------------------------------------

    def _plan_group(self, gi, group, plans, counted, grouped, same=False, record=None):
        spec = self.spec
        kw = spec.to_op(group)
        # per-group bookkeeping (spec.advance_group): every group, every step, with or
        # without params and gradients; the new entries are set once every group ran
        extra, after = spec.advance_group(kw, group)
        if after:
            kw.update(extra)
            grouped.append((group, after))
        params = group["params"]
        if not params:
            return
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
            snapshot = _engine.snapshot(group) if record is not None else None
            if snapshot is not None and not cache.dtensor:
                record.append((group, snapshot, cache, kw, None))  # (None: the buckets)
            return
        if sel is None and cache.steady:
            # the common case: every param has its state and the same scalars
            scalars = _stored(cache.values)
            parts = self._plan(kw, params, grads, cache.lists, scalars, False, cache,
                               after, slice(None), cache.scales, cache.q8,
                               self._ema_list(counted_params))
            plans.extend(parts)
            counted.append((cache, sel, counted_params, after))
            # what the next step may replay (`_fo_replay_step`): one kept plan
            if record is not None and len(parts) == 1 and not cache.dtensor and \
                    not self._fo_flat:
                snapshot = _engine.snapshot(group)
                part = bool(cache.q8.any())
                kept = cache.kept.get(part)
                if snapshot is not None and kept is not None and kept.plan is parts[0] and \
                        kept.rows is not None:
                    record.append((group, snapshot, cache, kw, part))
            return
        if sel is None:
            if not cache.has.all():
                self._add_state(group, cache, range(len(params)))
            lists, scales, q8 = cache.lists, cache.scales, cache.q8
        else:
            if not cache.has[sel].all():
                self._add_state(group, cache, sel)
            params = [params[i] for i in sel]
            counted_params = [counted_params[i] for i in sel]
            grads = [grads[i] for i in sel]
            lists = [[lst[i] for i in sel] for lst in cache.lists]
            scales = [[lst[i] for i in sel] for lst in cache.scales]
            q8 = cache.q8[sel]
        emas = self._ema_list(counted_params)
        values = {name: (v if sel is None else v[sel]) for name, v in cache.values.items()}
        first = None
        if cache.fresh is not None:
            first = cache.fresh if sel is None else cache.fresh[sel]
        index = slice(None) if sel is None else np.asarray(sel)
        if all(v.min() == v.max() for v in values.values()) and \
                (first is None or first.all() or not first.any()):
            scalars = _stored(values)
            plans.extend(self._plan(kw, params, grads, lists, scalars,
                                    first is not None and bool(first[0]),
                                    cache if sel is None else None, after, index, scales, q8,
                                    emas))
        else:  # params at different step counts, or new momentum buffers among old ones
            table = list(zip(*(values[n] for n in spec.scalars))) if spec.scalars else \
                [()] * len(params)  # each scalar in its stored dtype
            fresh = np.zeros(len(params), dtype=bool) if first is None else first
            keys = {}
            for i, (row, f) in enumerate(zip(table, fresh)):
                keys.setdefault((row, bool(f)), []).append(i)
            for (row, is_first), pick in keys.items():
                pick = np.asarray(pick)
                where = pick if sel is None else np.asarray(sel)[pick]
                plans.extend(self._plan(
                    kw, [params[i] for i in pick], [grads[i] for i in pick],
                    [[lst[i] for i in pick] for lst in lists],
                    dict(zip(spec.scalars, row)), is_first, None, after, where,
                    [[lst[i] for i in pick] for lst in scales], q8[pick],
                    None if emas is None else [emas[i] for i in pick]))
        cache.steady = None if sel is not None else self._is_steady(cache)
        counted.append((cache, sel, counted_params, after))

    def _plan_flat(self, gi, cache, kw, grads, plans, after):
        """The plans of a flat group: one per bucket, over its buffers (the EMA's too, with
        ``ema_decay``). False (nothing planned) when the per-tensor path must run: a param
        without a gradient, or state that is not the buckets' (loaded and not yet copied
        in; a param without an average yet)."""
        buckets = self._fo_buckets.get(gi)
        if not buckets:
            return False
        if cache.flat is None:
            where = self._fo_where
            cache.flat = all(where[id(p)][0].owns_state(name, where[id(p)][1], lst[i], scale_lst[i])
                             for i, p in enumerate(cache.params)
                             for name, lst, scale_lst in zip(cache.names, cache.lists,
                                                             cache.scales))
            if cache.flat and self.ema_decay is not None:
                cache.flat = all(where[id(p)][0].owns_state("ema", where[id(p)][1],
                                                            self.state[p].get("ema"))
                                 for p in cache.params)
        if not cache.flat:
            return False
        owner = type(self).__name__
        for bucket in buckets:
            bucket.check_params(owner)
            mine = grads if len(buckets) == 1 else [grads[i] for i in bucket.indices]
            if not bucket.gather_grads(mine):
                return False
        spec = self.spec
        scalars = _stored(cache.values)
        kw, new = spec.step_keywords(kw, scalars)
        after.append((slice(None), new))
        # per-tensor sums (LAMB's and LARS's trust ratios) need the params as tensors: the
        # buffers' views then, still contiguous memory and one call
        whole = not spec.reductions(kw)
        for bucket in buckets:
            if whole:
                params, bgrads = [bucket.data], [bucket.grad]
                lists = [[bucket.states[name]] for name in cache.names]
            else:
                params, bgrads = bucket.param_views, bucket.grad_views
                lists = [bucket.state_views[name] for name in cache.names]
            options, kept_lists = _precision.PLAIN, lists
            if bucket.quantized and cache.names:
                absmax = [[bucket.scales[name]] for name in cache.names]
                options = _precision.Options("step", {"absmax": absmax})
                kept_lists = lists + absmax
            elif self._ema_now is not None:
                emas = [bucket.states["ema"]] if whole else list(bucket.state_views["ema"])
                options = self._ema_options(params, emas)
            plan = None
            if bucket.kept is not None:
                plan = bucket.kept.reuse(spec, kw, params, bgrads, kept_lists, options,
                                         torch_params=True)
            if plan is None:
                plan = _engine.plan(spec, kw, params, bgrads, lists, options=options)
                bucket.kept = _engine.Kept(plan, params, kept_lists)
            plans.append(plan)
        return True

    @staticmethod
    def _is_steady(cache):
        """Whether every param of the group has its state, with the same scalars, and no
        buffer awaits its first step: the next step is one plan, the kept one."""
        return bool(cache.has.all()) and (cache.fresh is None or not cache.fresh.any()) and \
            all(v.min() == v.max() for v in cache.values.values())

    def _plan(self, kw, params, grads, lists, scalars, first, cache, after, index, scales,
              q8, emas=None):
        """The validated plans of one bucket (params with the same scalars; `emas`: their
        averages, with ``ema_decay``): one, or two where some params keep 8-bit state
        (`q8`, their block `scales`) and others do not. A whole group's plans are kept in
        its cache for the next step (`_engine.Kept`): the params are then checked by
        address and the gradients by address and contiguity (torch checked their dtype,
        shape and device against the params when they were assigned)."""
        spec = self.spec
        kw, new = spec.step_keywords(kw, scalars, first)
        after.append((index, new))
        if not lists or not q8.any():
            return [self._plan_part(kw, params, grads, lists, None, cache, False, emas)]
        if q8.all():
            return [self._plan_part(kw, params, grads, lists, scales, cache, True, emas)]
        parts = []
        for quantized in (False, True):
            pick = np.flatnonzero(q8 == quantized)
            parts.append(self._plan_part(
                kw, [params[i] for i in pick], [grads[i] for i in pick],
                [[lst[i] for i in pick] for lst in lists],
                [[lst[i] for i in pick] for lst in scales] if quantized else None,
                cache, quantized, None if emas is None else [emas[i] for i in pick]))
        return parts

    def _plan_part(self, kw, params, grads, lists, scales, cache, part, emas=None):
        """The plan of params whose states are all 8-bit (`scales`: their block scales)
        or none (`emas`: their averages, with ``ema_decay``; refused with 8-bit state);
        `part` keys the kept plan in the group's cache."""
        spec = self.spec
        options, kept_lists = _precision.PLAIN, lists
        precision = {}
        if scales is not None:
            precision["absmax"] = scales
            kept_lists = lists + scales
        if emas is not None:
            precision.update(ema=emas, ema_decay=self._ema_now)
        if precision:
            options = _precision.Options("step", precision)
        if cache is not None:
            kept = cache.kept.get(part)
            if kept is not None:
                plan = kept.reuse(spec, kw, params, grads, kept_lists, options,
                                  torch_params=True, checked=True)
                if plan is not None:
                    return plan
        plan = _engine.plan(spec, kw, params, grads, lists, options=options)
        if cache is not None:
            cache.kept[part] = _engine.Kept(plan, params, kept_lists)
        return plan

    # --- 8-bit state ---------------------------------------------------------------------

    def _fo_quantizes(self, p):
        """Whether param `p` gets 8-bit state (optim_bits=8 and min_8bit_size)."""
        return self._fo_bits == 8 and p.dtype in _QUANTIZED_DTYPES and \
            p.numel() >= self._fo_min_8bit_size

    def _fo_state_dtype(self, p):
        """The dtype of a param's float state: its own, float32 for a 16-bit param under
        optim_bits=8 (bitsandbytes' 32-bit state of small params)."""
        if self._fo_bits == 8 and p.dtype in (torch.float16, torch.bfloat16):
            return torch.float32
        return p.dtype

    def _state_keys(self, names):
        """(buffer, block scales, code table or None) state keys of the buffers `names`."""
        return [_torch8bit.keys(self, k, name) for k, name in enumerate(names)]

    def _fo_quant_view(self, bucket, position, name):
        """The views of a param's codes and scales in its 8-bit flat bucket."""
        return bucket.quant_view(name, position, _quant.constant(
            0.0, self.spec.state(name).positive)[0])

    def _init_state(self, name, param, group, quantized=False, st=None, k=0):
        """A fresh state buffer of `param`: its values, or with `quantized` (codes,
        scales) of 8-bit state (and bitsandbytes' code table into `st`, for its
        classes); a state `like_param` starts as a copy of the param. A view of the flat
        buckets' buffers with ``flat=True``."""
        like = self.spec.state(name).like_param  # a copy of its param (schedule-free's z)
        value = 0.0 if like else _plain(self.spec.init_value(name, group))
        where = self._fo_where.get(id(param))
        if quantized:
            positive = self.spec.state(name).positive
            code, scale = _quant.constant(value, positive)
            if st is not None and self._fo_bnb_names:
                st[f"qmap{k + 1}"] = _torch8bit.qmap(positive, param.device)
            if where is not None and where[0].quantized:
                codes, scales = self._fo_quant_view(where[0], where[1], name)
                codes.fill_(code)
                scales.fill_(scale)
                return codes, scales
            return (torch.full(param.shape, code, dtype=torch.uint8, device=param.device),
                    torch.full((_quant.blocks(param.numel()),), scale, dtype=torch.float32,
                               device=param.device))
        dtype = self._fo_state_dtype(param)
        if where is not None and not where[0].quantized:
            # flat=True: a view of the bucket's state buffer
            view = where[0].state_view(name, where[1], value, dtype)
            if like:
                view.copy_(param.detach())
            elif value:
                view.fill_(value)
            else:
                view.zero_()
            return view
        if like:
            return param.detach().to(dtype=dtype, memory_format=torch.preserve_format,
                                     copy=True)
        if dtype != param.dtype:
            return torch.full(param.shape, value, dtype=dtype, device=param.device)
        if value:
            return torch.full_like(param, value, memory_format=torch.preserve_format)
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
        cache.keys = self._state_keys(names)
        cache.lists = [[None] * n for _ in names]
        cache.scales = [[None] * n for _ in names]
        cache.q8 = np.zeros(n, dtype=bool)
        cache.has = np.zeros(n, dtype=bool)
        cache.fresh = None
        cache.kept = {}
        cache.scalars, cache.values = {}, {}
        if spec.scalars:
            dtypes = self._scalar_dtypes(params)
            for name in spec.scalars:
                cache.scalars[name] = torch.zeros(n, dtype=dtypes[name])
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

    def _scalar_dtypes(self, params):
        """The dtype of each per-param scalar of a group, as torch.optim keeps it: `step`
        in torch's scalar dtype (float32, or float64 when that is the default dtype) or
        the dtype the existing state has; any other scalar (NAdam's mu_product, ASGD's
        eta and mu) likewise when fresh, and after a load in the dtype torch's
        load_state_dict gave it (the param's: float64 for float64 params). A loaded
        scalar of another dtype (torch casts these to a 16-bit param's dtype) is kept
        in `step`'s dtype instead."""
        found = {}
        for p in params:
            st = self.state.get(p)
            if st:
                for name in self.spec.scalars:
                    if name not in found and isinstance(st.get(name), torch.Tensor):
                        found[name] = st[name].dtype
            if len(found) == len(self.spec.scalars):
                break
        default = found.get("step", _scalar_dtype())
        out = {}
        for name in self.spec.scalars:
            dtype = found.get(name, default)
            if name != "step" and dtype not in (torch.float32, torch.float64):
                dtype = torch.float32 if default not in (torch.float32, torch.float64) \
                    else default
            out[name] = dtype
        return out

    def _adopt(self, group, cache, i, p, st):
        """Take an existing state into the cache, completing what the options now need.
        A param's state is 8-bit when it holds block scales (whatever optim_bits says:
        a loaded state stays as it was saved), else when the options make it so."""
        if self.spec.fresh_keyword is not None and cache.names and \
                st.get(cache.keys[0][0]) is None:
            return  # no buffer yet: the param's next step is its first
        present = [key for key, _, _ in cache.keys if st.get(key) is not None]
        quantized = any(scale_key in st for _, scale_key, _ in cache.keys) if present else \
            self._fo_quantizes(p)
        for key, scale_key, _ in cache.keys:
            if (key in present) and quantized != (scale_key in st):
                raise ValueError(f"{type(self).__name__}: the state of a param has "
                                 f"{'no ' if quantized else ''}{scale_key!r}, but other "
                                 f"buffers of it {'are' if quantized else 'are not'} 8-bit; "
                                 "its 8-bit state must be complete (codes and scales)")
        initial = self.spec.init_scalars(group)
        for name, tensor in cache.scalars.items():
            cache.values[name][i] = float(st.get(name, initial[name]))
            st[name] = tensor[i]
        for k, (lst, name) in enumerate(zip(cache.lists, cache.names)):
            key, scale_key, _ = cache.keys[k]
            t = st.get(key)
            if t is None:
                t = self._init_state(name, p, group, quantized, st, k)
                if quantized:
                    t, st[scale_key] = t
                st[key] = t
            lst[i] = t
            if quantized:
                cache.scales[k][i] = st[scale_key]
        cache.q8[i] = quantized and bool(cache.names)
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
                    quantized = self._fo_quantizes(params[i])
                    made = self._init_state(cache.names[0], params[i], group, quantized)
                    if quantized:
                        made, cache.scales[0][i] = made
                    cache.lists[0][i] = made
                    cache.q8[i] = quantized
                    cache.has[i] = True
                    cache.fresh[i] = True
            cache.kept = {}
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
            quantized = self._fo_quantizes(p) and bool(cache.names)
            for k, (lst, name) in enumerate(zip(cache.lists, cache.names)):
                key, scale_key, _ = cache.keys[k]
                made = self._init_state(name, p, group, quantized, st, k)
                if quantized:
                    made, cache.scales[k][i] = made
                    st[scale_key] = cache.scales[k][i]
                lst[i] = st[key] = made
            cache.q8[i] = quantized
            cache.has[i] = True
            cache.kept = {}
        cache.nstate = len(self.state)

    def _install_fresh(self, cache, sel):
        index = np.arange(len(cache.params)) if sel is None else np.asarray(sel)
        key, scale_key, _ = cache.keys[0]
        for i in index[cache.fresh[index]]:
            st = cache.dicts[i] = self.state[cache.params[i]]
            st[key] = cache.lists[0][i]
            if cache.q8[i]:
                st[scale_key] = cache.scales[0][i]
                if self._fo_bnb_names:
                    st["qmap1"] = _torch8bit.qmap(self.spec.state(cache.names[0]).positive,
                                                  cache.params[i].device)
            cache.fresh[i] = False
        cache.nstate = len(self.state)


class _Modes:
    """``train()`` and ``eval()`` of the algorithms with two sequences (a spec with a
    `mode_state`), as the schedulefree package switches them: every param with state
    moves by ``p.lerp_(state, w)`` (with ``flat=True``, one lerp over a bucket's
    buffers, the same arithmetic element by element)."""

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
        name = spec.mode_state
        with self._fo_lock:
            for gi, group in enumerate(self.param_groups):
                weight = spec.mode_weight(group, train)
                if weight is None:
                    continue
                moved = set()
                for bucket in self._fo_buckets.get(gi, ()):
                    if self._switch_bucket(bucket, name, weight):
                        moved.update(map(id, bucket.params))
                for p in group["params"]:
                    if id(p) in moved:
                        continue
                    st = self.state.get(p)
                    if st and name in st:
                        p.lerp_(end=st[name].to(p.device), weight=weight)
                group.update(spec.set_mode(group, train))

    def _switch_bucket(self, bucket, name, weight):
        """Move the params of a flat bucket with one lerp of its buffer towards the
        state's buffer, when every param still lives in the buffer and its state is its
        view of the state's buffer; False (nothing done) otherwise: then param by
        param."""
        states = bucket.states.get(name)
        if states is None or not bucket.holds_params():
            return False
        for position, p in enumerate(bucket.params):
            st = self.state.get(p)
            if not st or not bucket.owns_state(name, position, st.get(name)):
                return False
        bucket.data.lerp_(states, weight)
        torch.autograd.graph.increment_version(bucket.params)
        return True


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
        bits, min_size = values.pop("optim_bits"), values.pop("min_8bit_size")
        _torch8bit.check_options(type(self), bits, min_size)
        self._fo_bits, self._fo_min_8bit_size = bits, min_size
        lr = values.get("lr")
        if isinstance(lr, torch.Tensor) and lr.numel() != 1:
            raise ValueError("Tensor lr must be 1-element")
        if "betas" in values:
            values["betas"] = tuple(map(_plain, values["betas"]))
        flat, ema_decay = values.pop("flat"), values.pop("ema_decay")
        spec.validate(values)
        _check_torch_flags(type(self), values)
        if flat and spec.composite:
            raise ValueError(f"{type(self).__name__}(flat=True): flat buffers are for the "
                             "elementwise algorithms; this one works on each param's own "
                             "shape (use flat=False)")
        if bits == 8:
            if ema_decay is not None:
                raise ValueError(f"{type(self).__name__}(optim_bits=8): ema_decay does not go "
                                 "with 8-bit state (the 8-bit kernels have no EMA slot)")
            spec.check_quantized(spec.to_op({**values, **spec.group_extras}),
                                 type(self).__name__)
        _Fused.__init__(self, params, {**values, **spec.group_extras}, flat=flat,
                        ema_decay=ema_decay)

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
        if spec.torch_class is not None:  # hand-written (its module imports this one)
            continue
        made[spec.name] = make_class(spec, made[spec.base] if spec.base else _Fused)
    return made


CLASSES = _make_all()
globals().update({cls.__name__: cls for cls in CLASSES.values()})
__all__ += [cls.__name__ for cls in CLASSES.values()]

Adam8bit = _torch8bit.bnb_class(CLASSES["adam"], "Adam8bit", 0, "Adam")
AdamW8bit = _torch8bit.bnb_class(CLASSES["adamw"], "AdamW8bit", 1e-2, "AdamW")
__all__ += ["Adam8bit", "AdamW8bit"]

# The optimizers that are not generated from an elementwise spec.
from ._torch_lbfgs import LBFGS  # noqa: E402


def _hand_written():
    import importlib

    for spec in SPECS.values():
        if spec.torch_class is not None:
            module, _, name = spec.torch_class.partition(":")
            CLASSES[spec.name] = getattr(importlib.import_module(module), name)


_hand_written()
globals().update({cls.__name__: cls for cls in CLASSES.values()})
__all__ += ["LBFGS"] + [cls.__name__ for cls in CLASSES.values() if cls.__name__ not in __all__]
