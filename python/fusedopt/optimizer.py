"""The optimizer base class: parameter groups, state, state dicts (torch.optim's layout).

A subclass says which state buffers a group needs, how to create them, and which
functional op runs a group. `step` validates every group before it runs any, and
creates new state only once the whole step has been validated, so a bad input
leaves params, state and step counters as they were.
"""

from __future__ import annotations

import copy
import functools
import numbers
import threading
from operator import itemgetter

import numpy as np

from . import _arrays, _precision, functional
from ._precision import Precision

_required = object()
_NoneType = type(None)
_STEP = itemgetter("step")


def _is_array(x):
    return hasattr(x, "__array_interface__") or hasattr(x, "__cuda_array_interface__") or \
        hasattr(x, "__dlpack__")


def serialized(step):
    """`step` under the optimizer's `_step_lock`: one step at a time per optimizer, so
    steps called from several threads run one after the other, each whole."""

    @functools.wraps(step)
    def locked(self, *args, **kwargs):
        with self._step_lock:
            return step(self, *args, **kwargs)

    return locked


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
    #: a checked GPU step whose outcome the host has not read yet: (DeviceStepInfo,
    #: indices of the state it created, the states whose step it counts)
    _pending = None

    #: state buffers (besides `step`) of a group, in the order the functional op takes them
    def _state_names(self, group):
        raise NotImplementedError

    #: whether the state holds a `step` counter (every algorithm but SGD)
    has_step = True

    def _new_state(self, param, group):
        """Fresh state of one param: zeros, like torch (in the precision policy's dtype),
        plus the master copy or compensation buffer the policy asks for."""
        dtype = self.precision.state_dtype_for(param.dtype)
        state = {name: _zeros_like(param, dtype) for name in self._state_names(group)}
        extra = self.precision.extra_name(param.dtype)
        if extra == "master_param":
            state[extra] = _zeros_like(param, np.float32)
            state[extra][...] = param
        elif extra == "kahan_comp":
            state[extra] = _zeros_like(param)
        if self.has_step:
            state["step"] = 0.0
        return state

    def _plan(self, group, params, grads, states, step, fresh, precision):
        """The functional op's deferred plan for one bucket of a group."""
        raise NotImplementedError

    def _validate_group(self, group):
        """ValueError for invalid hyperparameters, by torch.optim's rules."""

    def __init__(self, params, defaults, precision=None):
        self.precision = precision if precision is not None else Precision()
        if not isinstance(self.precision, Precision):
            raise TypeError(f"precision must be a fusedopt.Precision, got "
                            f"{type(self.precision).__name__}")
        self._steps_taken = 0  # steps of the whole optimizer (the rounding stream's counter)
        self._step_lock = threading.Lock()
        self.defaults = dict(defaults)
        self.param_groups = []
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

    # --- a checked step on the GPU leaves its outcome on the device ------------------------
    # The update kernels read the skip flag there; the host learns it only when it needs
    # the counts: at the next step, or when `state` or `steps_taken` is read. By then the
    # flag has long been copied back, and reading it waits for that copy only.

    state = _settled("_state")
    steps_taken = _settled("_steps_taken")

    def _settle(self):
        pending, self._pending = self._pending, None
        if pending is None:
            return
        info, created, counted = pending
        if info.skipped:  # the kernels changed nothing: neither does the bookkeeping
            for idx in created:
                del self._state[idx]
            return
        self._count(counted)

    def _count(self, counted):
        self._steps_taken += 1
        if self.has_step:
            for state in counted:
                state["step"] += 1.0

    def __getstate__(self):
        state = self.__dict__.copy()
        state.pop("_step_lock", None)  # a lock is not state: copies get their own
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._step_lock = threading.Lock()

    def __repr__(self):
        lines = [f"{type(self).__name__} ("]
        for i, group in enumerate(self.param_groups):
            lines.append(f"Parameter Group {i}")
            lines += [f"    {k}: {v}" for k, v in sorted(group.items()) if k != "params"]
        return "\n".join(lines + [")"])

    def add_param_group(self, group):
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

    # --- stepping -------------------------------------------------------------------------

    @serialized
    def step(self, grads, *, loss_scale=None, max_grad_norm=None, skip_nonfinite=False):
        """One update of every param whose gradient is not None. `grads` is aligned with
        the params of all groups, in group order. A group with `"frozen": True`, and the
        params whose in-group indices are in its `"frozen_params"`, are skipped likewise
        (no copy, no state, no step counted). A group's `"l1"` (default 0) adds L1
        regularization as a proximal step of lr * l1 after the update, in the same pass.

        Gradients are divided by `loss_scale`; with `max_grad_norm` they are clipped to
        that global L2 norm (over all groups); with `skip_nonfinite` a step whose
        gradients hold inf or NaN changes nothing (no state created, no step counted).
        With either check the step returns a StepInfo(skipped, grad_norm); on a GPU a
        DeviceStepInfo: the kernels skip there, and the step counts (and any state the
        skipped step created) are settled when the host next needs them. Steps of one
        optimizer called from several threads run one at a time."""
        self._settle()
        known = self._state
        total = sum(len(g["params"]) for g in self.param_groups)
        if not isinstance(grads, (list, tuple)):
            raise TypeError(f"step: grads must be a list of arrays, got {type(grads).__name__}")
        if len(grads) != total:
            raise ValueError(f"step: got {len(grads)} grads for {total} params")
        plans, created, counted = [], {}, []
        offset = 0
        for group in self.param_groups:
            params = group["params"]
            n = len(params)
            gslice = grads[offset:offset + n]
            if group.get("frozen"):  # a frozen group is skipped as if it had no gradients
                offset += n
                continue
            frozen = group.get("frozen_params")
            if frozen:
                gslice = [None if j in frozen else g for j, g in enumerate(gslice)]
            states = list(map(known.get, range(offset, offset + n)))
            # (`None in gslice` would compare arrays elementwise: test the types instead)
            if _NoneType not in set(map(type, gslice)) and None not in states:
                steps = set(map(_STEP, states)) if self.has_step else {0.0}
                if self.precision.has_extra and len({p.dtype for p in params}) > 1:
                    steps.add(None)  # 16-bit params with master/Kahan buffers and others
                if len(steps) == 1:  # the common case: one bucket for the whole group
                    plans.append(self._bucket_plan(group, params, gslice, states, steps.pop(),
                                                   False))
                    counted += states
                    offset += n
                    continue
            buckets = {}
            for j, (p, g, state) in enumerate(zip(params, gslice, states)):
                if g is None:
                    continue
                if state is None:
                    state = created[offset + j] = self._new_state(p, group)
                key = (state.get("step", 0.0), (offset + j) in created,
                       self.precision.extra_name(p.dtype))
                bucket = buckets.setdefault(key, ([], [], []))
                bucket[0].append(p)
                bucket[1].append(g)
                bucket[2].append(state)
            for (step, fresh, _), (ps, gs, ss) in buckets.items():
                plans.append(self._bucket_plan(group, ps, gs, ss, step, fresh))
                counted += ss
            offset += n
        # everything validated: check the gradients, create the new state, run, count
        options = _precision.Options("step", {"loss_scale": loss_scale,
                                              "max_grad_norm": max_grad_norm,
                                              "skip_nonfinite": skip_nonfinite})
        info, coef = None, (1.0 / loss_scale if loss_scale is not None else 1.0)
        if options.checks_grads:
            devices = {plan.prep.device for plan in plans if plan.prep.groups}
            if len(devices) > 1:
                raise TypeError("step: gradient checks need every param on one device, got "
                                f"{sorted(_arrays._device_name(d) for d in devices)}")
            if devices and devices != {_arrays.CPU}:
                return self._checked_on_device(plans, options, created, counted)
            skip, coef, norm = _precision.grad_multiplier(
                *_precision.total_sumsq(plans), options)
            info = _precision.StepInfo(skip, norm)
            if skip:
                return info
        known.update(created)
        for plan in plans:
            plan.run(coef)
        self._count(counted)
        return info

    def _checked_on_device(self, plans, options, created, counted):
        """The kernels skip or scale on the device; the counts follow once the host reads
        the flag (`_settle`)."""
        info = functional.device_checks(plans, options)
        self._state.update(created)
        for plan in plans:
            plan.run(1.0, info.stats.ptr)  # coef on the device includes 1 / loss_scale
        self._pending = (info, list(created), counted)
        return info

    def _bucket_plan(self, group, params, grads, states, step, fresh):
        lists = [list(map(itemgetter(name), states)) for name in self._state_names(group)]
        precision = self.precision.step_options(self.steps_taken)
        if group.get("l1"):
            precision["l1"] = group["l1"]
        extra = self.precision.extra_name(params[0].dtype) if params else None
        if extra == "master_param":
            precision["master_params"] = [s[extra] for s in states]
        elif extra == "kahan_comp":
            precision["kahan_buffers"] = [s[extra] for s in states]
        return self._plan(group, params, grads, lists, int(step) + 1, fresh, precision)

    # --- state dicts ----------------------------------------------------------------------

    def state_dict(self):
        groups, start = [], 0
        for group in self.param_groups:
            packed = {k: v for k, v in group.items() if k != "params"}
            packed["params"] = list(range(start, start + len(group["params"])))
            start += len(group["params"])
            groups.append(packed)
        state = {i: {k: (v.copy() if _is_array(v) else v) for k, v in s.items()}
                 for i, s in self.state.items()}
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, state_dict):
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

    def _param(self, idx):
        for group in self.param_groups:
            if idx < len(group["params"]):
                return group["params"][idx]
            idx -= len(group["params"])
        raise IndexError(idx)

    def _load_param_state(self, idx, group, saved):
        param = self._param(idx)
        state = {}
        names = list(self._state_names(group))
        extra = self.precision.extra_name(param.dtype)
        if extra is not None:
            names.append(extra)
        for name in names:
            if name not in saved or saved[name] is None:
                raise ValueError(f"loaded state of param {idx} has no {name!r}")
            value = saved[name]
            shape, dtype = tuple(getattr(value, "shape", ())), getattr(value, "dtype", None)
            if shape != tuple(param.shape):
                raise ValueError(f"loaded {name} of param {idx} has shape {shape}, the param "
                                 f"has {tuple(param.shape)}")
            want = np.dtype(np.float32) if name == "master_param" else \
                param.dtype if name == "kahan_comp" else \
                self.precision.state_dtype_for(param.dtype)
            if dtype != want:
                raise ValueError(f"loaded {name} of param {idx} has dtype {dtype}, expected "
                                 f"{want} for a param of dtype {param.dtype}")
            state[name] = _copy_like(value, param, want)
        if self.has_step:
            step = saved.get("step")
            if step is None:
                raise ValueError(f"loaded state of param {idx} has no 'step'")
            step = float(step.item() if hasattr(step, "item") else step)
            if not (step >= 0 and float(step).is_integer()):
                raise ValueError(f"loaded step of param {idx} is {step}, not a count")
            state["step"] = step
        return state


def _zeros_like(param, dtype=None):
    # CuPy arrays answer with a CuPy array (__array_function__)
    return np.zeros_like(param, dtype=dtype)


def _copy_like(value, param, dtype=None):
    """A contiguous copy of `value` in the param's array type and device."""
    out = _zeros_like(param, dtype)
    out[...] = value
    return out


def check(cond, message):
    if not cond:
        raise ValueError(message)


def check_number(name, value, low=None, high=None, *, high_open=False):
    if not isinstance(value, numbers.Real) or isinstance(value, bool):
        raise ValueError(f"Invalid {name}: {value!r} is not a number")
    if low is not None and not value >= low:
        raise ValueError(f"Invalid {name}: {value}")
    if high is not None and not (value < high if high_open else value <= high):
        raise ValueError(f"Invalid {name}: {value}")
