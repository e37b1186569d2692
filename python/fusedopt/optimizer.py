"""The optimizer base class: parameter groups, state, state dicts (torch.optim's layout).

An optimizer class is a spec of `fusedopt.algorithms` over this base: the spec says
which state buffers a group needs, how to create them, and how a group's
hyperparameters become the functional op's keywords; the base runs every step through
the same entry as the functional ops (`_engine.plan`). `step` validates every group
before it runs any, and creates new state only once the whole step has been validated,
so a bad input leaves params, state and step counters as they were.
"""

from __future__ import annotations

import copy
import sys
import threading
from contextlib import contextmanager
from operator import itemgetter
from typing import Any

import numpy as np

from . import _arrays, _ema, _engine, _precision, _quant
from ._precision import Precision
from .algorithms._spec import check, check_number  # noqa: F401 - re-exported

_required = object()
_NoneType = type(None)


def _is_array(x):
    return hasattr(x, "__array_interface__") or hasattr(x, "__cuda_array_interface__") or \
        hasattr(x, "__dlpack__")


def _settled(name):
    """An attribute read and written through `name`, after the pending outcome of a
    checked GPU step has been settled (`Optimizer._settle`)."""

    def get(self):
        if self._pending is not None:
            self._settle()
        return getattr(self, name)

    def set(self, value):
        self._settle()
        setattr(self, name, value)

    return property(get, set)


class Optimizer:
    """Base class of fusedopt's optimizers (`fusedopt.Adam`, ...), over an algorithm spec.

    Parameters
    ----------
    params : list of arrays or list of dict
        The arrays to update in place, or param groups (dicts with ``params`` and any
        hyperparameter).
    defaults : dict
        Every hyperparameter's default, for groups that do not set it.
    precision : Precision, optional
        The mixed-precision policy.
    ema_decay : float, optional
        Keep an exponential moving average of the params (``state["ema"]``), updated in
        the same pass as each step (see `swap_ema`).

    Attributes
    ----------
    param_groups : list of dict
        The groups, torch.optim's way: each holds ``params`` and every hyperparameter.
    state : dict
        Per-param state, keyed by the param's index over all groups (torch's state-dict
        keys), with torch.optim's names.
    """

    #: the algorithm (set by every concrete class)
    spec: Any = None
    #: a checked GPU step whose outcome the host has not read yet: (DeviceStepInfo,
    #: indices of the state it created, [(states, scalars after the step)])
    _pending = None
    #: the EMA's decay (None: no averages); whether the averages are swapped in; the
    #: averages a step makes (installed once it is validated) and the step's decay
    ema_decay = None
    _ema_swapped = False
    _ema_pending: dict = {}
    _ema_step_decay = None
    #: (precision, [(group, its snapshot, state dicts, op keywords, Kept)]) of the last
    #: step, when the next may replay it (`_replay_step`), and the write log's count then
    _replay = None
    _replay_log = None

    def __init__(self, params, defaults, precision=None, ema_decay=None):
        self.precision = precision if precision is not None else Precision()
        if ema_decay is not None:
            _precision.check_ema_decay("ema_decay", ema_decay)
        self.ema_decay = ema_decay
        self._ema_swapped = False
        if not isinstance(self.precision, Precision):
            raise TypeError(f"precision must be a fusedopt.Precision, got "
                            f"{type(self.precision).__name__}")
        if ema_decay is not None and self.precision.int8:
            raise ValueError("ema_decay does not go with 8-bit state (Precision('int8')): the "
                             "8-bit kernels have no EMA slot")
        self._lock = threading.Lock()
        self._kept = {}  # group index -> the group's plan, kept between steps
        self._steps_taken = 0  # steps of the whole optimizer (the rounding stream's counter)
        self.defaults = dict(defaults)
        self.param_groups = []
        self._log = [0]  # writes to `state` and its dicts (`_engine.StateDict`)
        self.state = {}
        if isinstance(params, dict) or _is_array(params):
            raise TypeError("params must be a list of arrays or of dicts, got "
                            f"{type(params).__name__}")
        groups = list(params)
        if not groups:
            raise ValueError("optimizer got an empty parameter list")
        if not isinstance(groups[0], dict):
            groups = [{"params": groups}]
        for group in groups:
            self.add_param_group(group)
        if self.spec is not None and self.spec.eager_state:  # torch creates (Adagrad's) state at construction
            index = 0
            for group in self.param_groups:
                for p in group["params"]:
                    self._state[index] = self._new_state(index, p, group)
                    index += 1

    def __getstate__(self):
        state = dict(self.__dict__)
        state.pop("_lock", None)
        state.pop("_kept", None)
        state.pop("_replay", None)
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._lock = threading.Lock()
        self._kept = {}
        self._log = [0]
        self._state = _engine.track(self._state, self._log)  # (pickled as plain dicts)

    # --- a checked step on the GPU leaves its outcome on the device ------------------------
    # The update kernels read the skip flag there; the host learns it only when it needs
    # the counts: at the next step, or when `state` or `steps_taken` is read. By then the
    # flag has long been copied back, and reading it waits for that copy only.

    steps_taken = _settled("_steps_taken")

    @property
    def state(self):
        if self._pending is not None:
            self._settle()
        return self._state

    @state.setter
    def state(self, value):
        self._settle()
        # (its writes counted from now on: a step tells in one comparison that the
        # state is as the last step left it, `_replay_step`)
        self._state = _engine.track(value, self._log)

    def _settle(self):
        pending, self._pending = self._pending, None
        if pending is None:
            return
        info, created, updates = pending
        if info.skipped:  # the kernels changed nothing: neither does the bookkeeping
            for idx in created:
                del self._state[idx]
            return
        self._count(updates)

    def _count(self, updates):
        self._steps_taken += 1
        for states, scalars in updates:
            for key, value in scalars.items():  # (each state's entry set in one C loop,
                # not counted in the write log: the replay knows what it wrote)
                _engine.set_uncounted(states, key, value)

    def __repr__(self):
        lines = [f"{type(self).__name__} ("]
        for i, group in enumerate(self.param_groups):
            lines.append(f"Parameter Group {i}")
            lines += [f"    {k}: {v}" for k, v in sorted(group.items()) if k != "params"]
        return "\n".join(lines + [")"])

    def add_param_group(self, group: dict) -> None:
        """Add a param group (a dict with ``params`` and any hyperparameters; the others
        take the defaults)."""
        if not isinstance(group, dict):
            raise TypeError(f"a param group must be a dict, got {type(group).__name__}")
        params = group["params"]
        params = [params] if _is_array(params) else list(params)
        for i, p in enumerate(params):
            if not _is_array(p):
                raise TypeError(f"params[{i}] is not an array (got {type(p).__name__})")
        group = dict(group, params=params)
        for key, value in self.defaults.items():
            if value is _required and key not in group:
                raise ValueError(f"parameter group didn't specify a value of required "
                                 f"optimization parameter {key}")
            group.setdefault(key, value)
        self._validate_group(group)
        self._kept = {}
        seen = {id(p) for g in self.param_groups for p in g["params"]}
        if any(id(p) in seen for p in params) or len({id(p) for p in params}) != len(params):
            raise ValueError("some parameters appear in more than one parameter group")
        # a step checks the arrays of each group's call; memory shared across groups
        # (two views of one array) is found here, once
        earlier = [p for g in self.param_groups for p in g["params"]]
        clash = _arrays.first_overlap(params, earlier)
        if clash is not None:
            raise ValueError(f"params[{clash[0]}] of parameter group {len(self.param_groups)} "
                             f"shares memory with param {clash[1]} of an earlier group; the "
                             "arrays a step writes must not overlap")
        self.param_groups.append(group)

    def _validate_group(self, group):
        """ValueError for invalid hyperparameters and params (the spec's rules,
        torch.optim's)."""
        self.spec.validate(group)
        self.spec.check_params(group["params"])

    # --- state -------------------------------------------------------------------------------

    def _new_state(self, idx, param, group):
        """Fresh state of one param: the buffers its group's options use, filled as torch
        fills them (in the precision policy's dtype), the master copy or compensation
        buffer the policy asks for, and the scalars."""
        spec = self.spec
        arr = _arrays.like("step", f"params[{idx}]", param)
        size = _quant.size_of(arr)
        dtype = self.precision.state_dtype_for(arr.dtype, size)
        quantized = self.precision.quantizes(arr.dtype, size)
        state = _engine.StateDict(log=self._log)
        for name in spec.active(spec.to_op(group)):
            if spec.shaped_states:
                shape = spec.state_shape(name, tuple(arr.shape))
                if shape is None:
                    continue
                buf = state[name] = _zeros(arr, shape, dtype)
            else:
                buf = state[name] = _arrays.zeros_like(arr, dtype)
            if spec.state(name).like_param:
                _copy_into(buf, arr)
                continue
            value = spec.init_value(name, group)
            if quantized:  # uint8 codes and a scale per block
                scales = state[_quant.absmax_name(name)] = _quant.scales_like(arr, size)
                code, scale = _quant.constant(value, spec.state(name).positive)
                buf[...] = code
                scales[...] = scale
            elif value:
                buf[...] = value
        extra = self.precision.extra_name(arr.dtype)
        if extra == "master_param":
            state[extra] = _arrays.zeros_like(arr, np.float32)
            state[extra][...] = arr
        elif extra == "kahan_comp":
            state[extra] = _arrays.zeros_like(arr)
        state.update(spec.init_scalars(group))
        return state

    @staticmethod
    def _new_ema(arr):
        """The average of a param that had none: the param itself (before this step)."""
        ema = _arrays.zeros_like(arr)
        ema[...] = arr
        return ema

    # --- stepping ------------------------------------------------------------------------------

    def step(self, grads, *, loss_scale=None, max_grad_norm=None, skip_nonfinite=False):
        """One update of every param whose gradient is not None.

        Parameters
        ----------
        grads : list of arrays or None
            Aligned with the params of all groups, in group order. A None gradient
            skips its param (no state, no step counted). A group with ``"frozen":
            True``, and the params whose in-group indices are in its
            ``"frozen_params"``, are skipped likewise. A group's ``"l1"`` (default 0)
            adds L1 regularization as a proximal step of lr * l1 after the update, in
            the same pass.
        loss_scale : float, optional
            The gradients are divided by it.
        max_grad_norm : float, optional
            Clip the gradients to this global L2 norm (over all groups).
        skip_nonfinite : bool, default False
            A step whose gradients hold inf or NaN changes nothing (no state created,
            no step counted).

        Returns
        -------
        StepInfo or DeviceStepInfo or None
            With a gradient check, what it found (on a GPU a DeviceStepInfo: the
            kernels skip there, and the step counts, and any state a skipped step
            created, are settled when the host next needs them).

        Notes
        -----
        One optimizer stepped from several threads at once runs the steps one after
        the other (a lock); independent optimizers step in parallel (the kernels
        release the GIL). With ``ema_decay``, the averages of the updated params move
        in the same pass, those of the params that have state but no gradient in this
        step in a pass of their own; a skipped step (``skip_nonfinite``) leaves them
        too as they were on the CPU.
        """
        with self._lock:
            return self._step(grads, loss_scale, max_grad_norm, skip_nonfinite)

    def _step(self, grads, loss_scale, max_grad_norm, skip_nonfinite):
        self._settle()
        if self._ema_swapped:
            raise RuntimeError("step: the averages are swapped into the params (swap_ema); "
                               "swap them back before stepping")
        spec = self.spec
        known = self._state
        # the EMA: AveragedModel copies the params at its first update
        self._ema_pending = {}  # id(state) -> (state, an average it gets with this step)
        self._ema_step_decay = None
        if self.ema_decay is not None:
            self._ema_step_decay = self.ema_decay if any("ema" in st for st in known.values()) \
                else 0.0
        stepped = set()  # indices of the params this step updates
        total = sum(len(g["params"]) for g in self.param_groups)
        if not isinstance(grads, (list, tuple)):
            raise TypeError(f"step: grads must be a list of arrays, got {type(grads).__name__}")
        if len(grads) != total:
            raise ValueError(f"step: got {len(grads)} grads for {total} params")
        if loss_scale is None and max_grad_norm is None and not skip_nonfinite:
            options = _precision.PLAIN
            if self._replay is not None and self._replay_step(grads):
                return None
        else:
            options = _precision.Options("step", {"loss_scale": loss_scale,
                                                  "max_grad_norm": max_grad_norm,
                                                  "skip_nonfinite": skip_nonfinite})
        scalar_key = itemgetter(*spec.scalars) if spec.scalars else _no_scalars
        for group in self.param_groups:
            spec.check_step(group)
        plans, created, updates = [], {}, []
        # what the next step may replay (`_replay_step`): one kept plan per group
        replay = [] if options is _precision.PLAIN and self.ema_decay is None else None
        self._replay = None
        offset = 0
        for gi, group in enumerate(self.param_groups):
            params = group["params"]
            n = len(params)
            gslice = grads[offset:offset + n]
            kw = spec.to_op(group)
            # per-group bookkeeping: every group, every step, gradients or not
            if replay is not None:
                snapshot = _engine.snapshot(group)
                if snapshot is None:
                    replay = None
            extra, after = spec.advance_group(kw, group)
            if after:
                replay = None
                kw.update(extra)
                updates.append(([group], after))
            if group.get("frozen"):  # a frozen group is skipped as if it had no gradients
                offset += n
                continue
            frozen = group.get("frozen_params")
            if frozen:
                gslice = [None if j in frozen else g for j, g in enumerate(gslice)]
            precision = self._precision_options(group)
            states = list(map(known.get, range(offset, offset + n)))
            # (`None in gslice` would compare arrays elementwise: test the types instead)
            if _NoneType not in set(map(type, gslice)) and None not in states:
                keys = set(map(scalar_key, states))
                if self.precision.has_extra and len({_dtype(p) for p in params}) > 1:
                    keys.add(None)  # 16-bit params with master/Kahan buffers and others
                if self.precision.int8 and len(set(map(_quantized, states))) > 1:
                    keys.add(None)  # params with 8-bit state and others
                if len(keys) == 1:  # the common case: one bucket for the whole group
                    plans.append(self._bucket_plan(kw, precision, params, gslice, states,
                                                   keys.pop(), False, updates, gi))
                    stepped.update(range(offset, offset + n))
                    offset += n
                    kept = self._kept.get(gi)
                    if replay is not None and not precision and kept is not None and \
                            kept.plan is plans[-1] and kept.rows is not None and \
                            plans[-1].options is _precision.PLAIN:
                        replay.append((group, snapshot, states, kw, kept))
                    else:
                        replay = None
                    continue
            replay = None
            buckets = {}
            for j, (p, g, state) in enumerate(zip(params, gslice, states)):
                if g is None:
                    continue
                stepped.add(offset + j)
                if state is None:
                    state = created[offset + j] = self._new_state(offset + j, p, group)
                key = (scalar_key(state), (offset + j) in created,
                       self.precision.extra_name(_dtype(p)), _quantized(state))
                bucket = buckets.setdefault(key, ([], [], []))
                bucket[0].append(p)
                bucket[1].append(g)
                bucket[2].append(state)
            for (scalars, fresh, _, _), (ps, gs, ss) in buckets.items():
                plans.append(self._bucket_plan(kw, precision, ps, gs, ss, scalars, fresh,
                                               updates))
            offset += n
        ema_plan = self._ema_rest_plan(known, stepped)
        # everything validated: check the gradients, create the new state, run, count
        info, coef = None, (1.0 / loss_scale if loss_scale is not None else 1.0)
        if options.checks_grads:
            devices = {plan.prep.device for plan in plans if plan.prep.groups}
            if len(devices) > 1:
                raise TypeError("step: gradient checks need every param on one device, got "
                                f"{sorted(_arrays._device_name(d) for d in devices)}")
            if devices and devices != {_arrays.CPU}:
                return self._checked_on_device(plans, options, created, updates, ema_plan)
            skip, coef, norm = _precision.grad_multiplier(
                *_precision.total_sumsq(plans), options)
            info = _precision.StepInfo(skip, norm)
            if skip:
                return info
        known.update(created)
        self._install_ema()
        for plan in plans:
            plan.run(coef)
        if ema_plan is not None:
            ema_plan.run()
        self._count(updates)
        if replay is not None and len(replay) == len(self.param_groups) and not created \
                and _engine.all_tracked(self._state, self._log,
                                        dicts=[st for entry in replay for st in entry[2]]):
            self._replay, self._replay_log = (self.precision, replay), self._log[0]
        return info

    def _replay_step(self, grads):
        """The step of a steady state, when the last step's kept plans still fit: the
        same groups with the same hyperparameters (`_engine.snapshot`) and params, every
        param with a gradient, and nothing written to the state since the last step (its
        write log, `_engine.StateDict`: the same state dicts holding the same arrays, each
        group's states at the one set of scalars the last step left them at). Only what
        changes between such steps is done (the scalars advanced, the gradients described
        and checked, the kernels run). False, with nothing changed, when something else
        changed: the full step then runs."""
        precision, replay = self._replay
        groups = self.param_groups
        if precision is not self.precision or len(groups) != len(replay) or \
                self.ema_decay is not None or self._log[0] != self._replay_log:
            return False
        spec = self.spec
        scalars_of = itemgetter(*spec.scalars) if spec.scalars else _no_scalars
        todo, offset = [], 0
        for group, (kept_group, snapshot, states, kw, kept) in zip(groups, replay):
            n = len(states)
            gslice = grads[offset:offset + n]
            if group is not kept_group or not _engine.same_snapshot(group, snapshot) or \
                    not kept.same_params(group["params"]) or \
                    _NoneType in set(map(type, gslice)):
                return False
            offset += n
            todo.append((kw, gslice, kept.plan, scalars_of(states[0]), states))
        updates = []
        for kw, gslice, plan, scalars, states in todo:
            before = dict(zip(spec.scalars, scalars if len(spec.scalars) > 1 else (scalars,)))
            kw, after = spec.step_keywords(kw, before)
            if not plan.refresh(spec, kw, gslice, _precision.PLAIN):
                return False  # (no plan was run yet: the full step plans anew)
            updates.append((states, after))
        for todo_group in todo:
            todo_group[2].run(1.0)
        self._count(updates)
        return True

    def _checked_on_device(self, plans, options, created, updates, ema_plan=None):
        """The kernels skip or scale on the device; the counts follow once the host reads
        the flag (`_settle`). (The averages of the params without a gradient move
        whatever the flag says.)"""
        info = _engine.device_checks(plans, options)
        self._state.update(created)
        self._install_ema()
        for plan in plans:
            plan.run(1.0, info.stats.ptr)  # coef on the device includes 1 / loss_scale
        if ema_plan is not None:
            ema_plan.run()
        self._pending = (info, list(created), updates)
        return info

    # --- the EMA of the params ----------------------------------------------------------

    def _ema_of(self, state, param):
        """A param's average, made (a copy of the param) when its state has none; it
        enters the state once the step is validated (`_install_ema`)."""
        ema = state.get("ema")
        if ema is None:
            pending = self._ema_pending.get(id(state))
            if pending is None:
                arr = _arrays.like("step", "a param", param)
                pending = self._ema_pending[id(state)] = (state, self._new_ema(arr))
            ema = pending[1]
        return ema

    def _install_ema(self):
        for state, ema in self._ema_pending.values():
            state["ema"] = ema
        self._ema_pending = {}

    def _ema_rest_plan(self, known, stepped):
        """The plan that moves the averages of the params with state that this step does
        not update, or None."""
        if self.ema_decay is None:
            return None
        rest = [i for i in sorted(known) if i not in stepped]
        if not rest:
            return None
        params = [self._param(i) for i in rest]
        emas = [self._ema_of(known[i], p) for i, p in zip(rest, params)]
        return _ema.plan(emas, params, self._ema_step_decay, op="step")

    def swap_ema(self) -> None:
        """Exchange every param that has an average with its average, in place (call it
        again to swap back). While the averages are in the params, `step` refuses to
        run. Params without an average (no state yet) are their own average and stay."""
        for i, state in self.state.items():
            if state.get("ema") is not None:
                _ema.swap([(self._param(i), state["ema"])])
        self._ema_swapped = not self._ema_swapped

    @contextmanager
    def averaged(self):
        """A context in which the params hold their averages (``ema_decay``), for
        evaluation; the params are swapped back on leaving it.

        Examples
        --------
        >>> with opt.averaged():        # doctest: +SKIP
        ...     accuracy = evaluate(params)
        """
        self.swap_ema()
        try:
            yield self
        finally:
            self.swap_ema()

    def _precision_options(self, group):
        """The precision keywords of a group's step (without the per-bucket buffers)."""
        precision = self.precision.step_options(self._steps_taken)
        if group.get("l1"):
            precision["l1"] = group["l1"]
        return precision

    def _bucket_plan(self, kw, precision, params, grads, states, scalars, fresh, updates,
                     group_index=None):
        """The plan of one bucket (params with the same scalars); a whole group's is kept
        for the next step (`_engine.Kept`), which then checks only the gradients."""
        spec = self.spec
        names = spec.active(kw)
        if spec.shaped_states:  # (None for a param without the buffer)
            lists = [[s.get(name) for s in states] for name in names]
        else:
            lists = [list(map(itemgetter(name), states)) for name in names]
        kept_lists = lists
        if names and states and _quantized(states[0]):
            absmax = [list(map(itemgetter(_quant.absmax_name(name)), states)) for name in names]
            precision = dict(precision, absmax=absmax)
            kept_lists = lists + absmax
        before = dict(zip(spec.scalars, scalars if len(spec.scalars) > 1 else (scalars,)))
        kw, after = spec.step_keywords(kw, before, fresh)
        if params:
            name = self.precision.extra_name(_dtype(params[0]))
            if name is not None:
                precision = dict(precision)
                key = "master_params" if name == "master_param" else "kahan_buffers"
                precision[key] = [s[name] for s in states]
                kept_lists = kept_lists + [precision[key]]
        if self._ema_step_decay is not None:
            precision = dict(precision, ema=list(map(self._ema_of, states, params)),
                             ema_decay=self._ema_step_decay)
        updates.append((states, after))
        options = _precision.Options("step", precision) if precision else _precision.PLAIN
        if group_index is not None:
            kept = self._kept.get(group_index)
            if kept is not None:
                plan = kept.reuse(spec, kw, params, grads, kept_lists, options)
                if plan is not None:
                    return plan
        plan = _engine.plan(spec, kw, params, grads, lists, options=options)
        if group_index is not None:
            self._kept[group_index] = _engine.Kept(plan, params, kept_lists)
        return plan

    # --- state dicts ----------------------------------------------------------------------

    def state_dict(self) -> dict:
        """The state and the param groups in torch.optim's layout: ``{"state": {index:
        {name: value}}, "param_groups": [{hyperparameters, "params": [indices]}]}``, with
        copies of the state arrays."""
        groups, start = [], 0
        for group in self.param_groups:
            packed = {k: v for k, v in group.items() if k != "params"}
            packed["params"] = list(range(start, start + len(group["params"])))
            start += len(group["params"])
            groups.append(packed)
        state = {i: {k: (v.copy() if _is_array(v) else v) for k, v in s.items()}
                 for i, s in self.state.items()}
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, state_dict: dict) -> None:
        """Restore state and hyperparameters; on any mismatch raise ValueError and keep
        the current state."""
        groups = state_dict["param_groups"]
        if len(groups) != len(self.param_groups):
            raise ValueError(f"loaded state dict has {len(groups)} parameter groups, the "
                             f"optimizer has {len(self.param_groups)}")
        new_groups, index = [], {}
        for k, (mine, saved) in enumerate(zip(self.param_groups, groups)):
            if len(saved["params"]) != len(mine["params"]):
                raise ValueError(f"loaded state dict's group {k} has {len(saved['params'])} "
                                 f"params, the optimizer's has {len(mine['params'])}")
            group = dict(mine)
            group.update({key: copy.deepcopy(v) for key, v in saved.items() if key != "params"})
            self._validate_group(group)
            new_groups.append(group)
            start = sum(len(g["params"]) for g in self.param_groups[:k])
            for j, key in enumerate(saved["params"]):
                index[key] = (start + j, group)
        new_state = {}
        for key, saved in state_dict["state"].items():
            if key not in index:
                raise ValueError(f"loaded state dict has state for unknown param {key!r}")
            idx, group = index[key]
            new_state[idx] = self._load_param_state(idx, group, saved)
        self.param_groups[:] = new_groups
        self.state = new_state
        self._kept = {}

    def _param(self, idx):
        for group in self.param_groups:
            if idx < len(group["params"]):
                return group["params"][idx]
            idx -= len(group["params"])
        raise IndexError(idx)

    def _load_param_state(self, idx, group, saved):
        spec = self.spec
        param = _arrays.like("load_state_dict", f"params[{idx}]", self._param(idx))
        size = _quant.size_of(param)
        quantized = self.precision.quantizes(param.dtype, size)
        state = {}
        names = list(spec.active(spec.to_op(group)))
        scale_names = [_quant.absmax_name(n) for n in names] if quantized else []
        extra = self.precision.extra_name(param.dtype)
        if extra is not None:
            names.append(extra)
        if saved.get("ema") is not None:
            names.append("ema")
        for name in names + scale_names:
            expect = tuple(param.shape)
            if name in scale_names:
                expect = (_quant.blocks(size),)
            elif spec.shaped_states and name in {st.name for st in spec.states}:
                expect = spec.state_shape(name, expect)
                if expect is None:
                    continue
            if name not in saved or saved[name] is None:
                raise ValueError(f"loaded state of param {idx} has no {name!r}")
            value = saved[name]
            shape, dtype = tuple(getattr(value, "shape", ())), getattr(value, "dtype", None)
            if shape != expect:
                raise ValueError(f"loaded {name} of param {idx} has shape {shape}, expected "
                                 f"{expect} for a param of shape {tuple(param.shape)}")
            want = np.dtype(np.float32) if name == "master_param" or name in scale_names else \
                param.dtype if name in ("kahan_comp", "ema") else \
                self.precision.state_dtype_for(param.dtype, size)
            if dtype != want:
                raise ValueError(f"loaded {name} of param {idx} has dtype {dtype}, expected "
                                 f"{want} for a param of dtype {param.dtype}")
            if name in scale_names:
                out = state[name] = _quant.scales_like(param, size)
            else:
                out = state[name] = _zeros(param, expect, want)
            out[...] = value
        for name in spec.scalars:
            value = saved.get(name)
            if value is None:
                raise ValueError(f"loaded state of param {idx} has no {name!r}")
            value = float(value.item() if hasattr(value, "item") else value)
            if name == "step" and not (value >= 0 and value.is_integer()):
                raise ValueError(f"loaded step of param {idx} is {value}, not a count")
            state[name] = value
        return state


def _zeros(arr, shape, dtype=None):
    """Zeros of `shape` on the device and of the array kind of `arr` (from `_arrays.like`)."""
    if tuple(shape) == tuple(arr.shape):
        return _arrays.zeros_like(arr, dtype)
    # the kind, dtype and device `zeros_like` picks for the param, from one element of it
    return _zeros_of(_arrays.zeros_like(arr.reshape(-1)[:1], dtype), shape)


def _zeros_of(like, shape):
    """Zeros of `shape` and of like's dtype, array kind and device."""
    module = type(like).__module__.partition(".")[0]
    if module == "torch":
        import torch

        return torch.zeros(tuple(shape), dtype=like.dtype, device=like.device)
    if module == "cupy":
        import cupy

        return cupy.zeros(tuple(shape), like.dtype)
    return np.zeros(tuple(shape), like.dtype)


def _no_scalars(state):
    return ()


def _quantized(state):
    """Whether a param's state is 8-bit (its buffers have block scales)."""
    return any(k.endswith("_absmax") for k in state)


class Modes:
    """``train()`` and ``eval()`` of the algorithms whose params move between two
    sequences (a spec with a `mode_state`: schedule-free methods keep y in the params
    for training and the average x for evaluation). Each moves every param that has
    state by ``p <- lerp(p, state, w)`` with the weight the spec gives (torch.lerp's
    formula; with master weights the master copy moves and the param is its rounded
    value; with Kahan buffers the param plus its compensation moves)."""

    def train(self) -> None:
        """Put the params in train mode (the sequence the steps update)."""
        self._switch(True)

    def eval(self) -> None:
        """Put the params in eval mode (the sequence to evaluate and save)."""
        self._switch(False)

    def _switch(self, train):
        with self._lock:
            self._settle()
            spec, index = self.spec, 0
            for group in self.param_groups:
                weight = spec.mode_weight(group, train)
                if weight is not None:
                    for j, p in enumerate(group["params"]):
                        st = self._state.get(index + j)
                        if st and spec.mode_state in st:
                            _lerp_param(p, st[spec.mode_state], weight, st)
                    group.update(spec.set_mode(group, train))
                index += len(group["params"])


def _torch_of(x):
    torch = sys.modules.get("torch")
    return torch if torch is not None and isinstance(x, torch.Tensor) else None


def _copy_into(buf, src):
    """buf[...] = src for any pair of the accepted array kinds (torch tensors detached)."""
    if _torch_of(src) is not None:
        src = src.detach()
        if _torch_of(buf) is None:
            src = src.cpu().numpy() if src.dtype != _torch_of(src).bfloat16 else src
    elif _torch_of(buf) is not None:
        src = _torch_of(buf).as_tensor(src, device=buf.device)
    buf[...] = src


def _float32(x):
    torch = _torch_of(x)
    return x.detach().float() if torch is not None else x.astype(np.float32)


def _lerp(a, b, w):
    """torch.lerp(a, b, w): a + w (b - a) for |w| < 0.5, else b - (b - a)(1 - w)."""
    return a + w * (b - a) if abs(w) < 0.5 else b - (b - a) * (1.0 - w)


def _lerp_param(param, end, weight, state):
    """One param of `Modes._switch`, in float32 for 16-bit params, in its own dtype
    otherwise."""
    master, comp = state.get("master_param"), state.get("kahan_comp")
    if master is None and comp is None and _dtype(param).itemsize != 2:
        start = param.detach() if _torch_of(param) is not None else param
        _copy_into(param, _lerp(start, _like(end, start), weight))
        return
    if master is not None:
        moved = _lerp(_float32(master), _float32(_like(end, master)), weight)
        _copy_into(master, moved)
        _copy_into(param, _cast(moved, param))
        return
    start = _float32(param) + (_float32(comp) if comp is not None else 0.0)
    moved = _lerp(start, _float32(_like(end, start)), weight)
    rounded = _cast(moved, param)
    _copy_into(param, rounded)
    if comp is not None:
        _copy_into(comp, _cast(moved - _float32(rounded), comp))


def _like(x, other):
    """x as the array kind of `other` (a torch tensor or not)."""
    torch = _torch_of(other)
    if torch is not None and _torch_of(x) is None:
        return torch.as_tensor(x, device=other.device)
    if torch is None and _torch_of(x) is not None:
        return x.detach().cpu().numpy()
    return x


def _cast(x, like):
    """x converted to the dtype of `like` (round to nearest even)."""
    if _torch_of(like) is not None:
        return _like(x, like).to(like.dtype)
    return x.astype(like.dtype)


def _dtype(param):
    dtype = getattr(param, "dtype", None)
    return dtype if dtype is not None else _arrays.like("step", "a param", param).dtype
