"""The one way a step runs: a spec and its op keywords, the arrays, a validated plan, the
kernels.

`plan` is the shared internal entry of the functional ops and of every optimizer class:
it takes an algorithm's spec (`fusedopt.algorithms`), the functional op's keywords and
the lists of arrays, validates all of them through the arrays layer (`_arrays.prepare`)
and returns a `Plan`, which runs the kernels. The classes validate every group of a
step before running any plan, so that a bad input anywhere writes nothing; a
functional op runs its one plan at once (`Plan.execute`). `functional_op` makes the
functional op of a spec.
"""

from __future__ import annotations

import numbers
from collections import defaultdict
from operator import is_ as _is

import numpy as np

from . import _arrays, _backend, _foreign, _precision
from .algorithms import REQUIRED, pack
from .algorithms._doc import op_doc, op_signature


_NUMBER = (int, float)


class Plan:
    """A validated step, not yet run."""

    __slots__ = ("op", "kernel", "prep", "hyper", "stream", "params", "grads", "step",
                 "options", "step_ptr", "lr", "unsigned_states")

    def __init__(self, op, kernel, prep, hyper, stream, params, grads, step, options, lr,
                 step_ptr=0, unsigned_states=0):
        self.op, self.kernel, self.prep = op, kernel, prep
        self.hyper, self.stream, self.params, self.grads = hyper, stream, params, grads
        self.step, self.options, self.lr = step, options, lr
        self.step_ptr = step_ptr  # device address of a float64 step count, or 0
        # 8-bit state: bit k set when state k is never negative (the unsigned code table)
        self.unsigned_states = unsigned_states

    def sumsq(self):
        """Sum of squares of this step's raw gradients, in double (CPU)."""
        return _precision.sumsq(self.prep.groups) if self.prep.groups else 0.0

    def grads_finite(self):
        """Whether every gradient element is finite (the rare check behind an infinite
        sum of squares; CPU)."""
        return all(bool(np.isfinite(np.asarray(g)).all()) for g in self.grads)

    def backend(self):
        return _backend.for_device(self.op, self.prep.device)

    def cuda_stream(self):
        """The stream this plan's kernels run on (GPU)."""
        return self.backend().stream_of(self.stream, self.params, self.prep.device)

    def run(self, grad_scale=None, scale_ptr=0):
        """Run the kernels; `grad_scale` multiplies the gradients (default: 1 / loss_scale).
        On the GPU, `scale_ptr` is the device {skip, coef, norm} of a checked step."""
        if not self.prep.groups:
            return
        opts = self.options
        if grad_scale is None:
            grad_scale = 1.0 / opts.loss_scale if opts.loss_scale is not None else 1.0
        if self.prep.device == _arrays.CPU and not opts.l1 and opts.ema is None and \
                not opts.stochastic_rounding and opts.absmax is None:
            # the common case, in fewer steps (the binding takes its arguments by position)
            for (dtype, ptrs, sizes), layout in zip(self.prep.groups, self.prep.layouts):
                _backend.Cpu.step(self.kernel, dtype, ptrs, sizes, self.hyper,
                                  layout["state_dtype"], layout["extra"], grad_scale,
                                  False, 0, self.step)
            return
        mode = {"grad_scale": grad_scale, "step": self.step}
        if opts.l1:
            mode["l1"] = float(self.lr) * opts.l1  # the proximal step of lr * l1
        if opts.ema is not None:
            mode["ema_decay"] = opts.ema_decay
        if opts.stochastic_rounding:
            mode["stochastic"] = True
            # with the count on the device, the kernels derive the stream from the seed
            mode["key"] = opts.seed & _precision._MASK if self.step_ptr else \
                _precision.rounding_key(opts.seed, self.step)
        backend = self.backend()
        if self.prep.device != _arrays.CPU:
            mode["stream"] = self.cuda_stream()
            if scale_ptr:
                mode["scale_ptr"] = scale_ptr
            if self.step_ptr:
                backend.module.advance_step(self.step_ptr, scale_ptr, mode["stream"])
                mode["step_ptr"] = self.step_ptr
        if opts.absmax is not None and self.unsigned_states:
            mode["unsigned_states"] = self.unsigned_states
        for (dtype, ptrs, sizes), layout in zip(self.prep.groups, self.prep.layouts):
            backend.step(self.kernel, dtype, ptrs, sizes, self.hyper, **mode, **layout)

    def refresh(self, spec, kw, grads, options, trusted=False):
        """This plan for another step of the same arrays: new op keywords (hyperparameters,
        step) and new gradients, checked against the kept params and states. False when
        the keywords now need another kernel (the caller plans anew)."""
        kernel = spec.kernel(kw)
        if kernel != self.kernel:
            return False
        lr = _l1_rate(self.op, kw, options)
        self.prep.with_grads(grads, trusted)
        self.hyper = pack(kernel, spec.hyper(kw))
        self.lr, self.options, self.grads = lr, options, grads
        step = kw.get("step", 1)
        self.step = float(step) if type(step) in _NUMBER or isinstance(step, numbers.Real) \
            else 1.0
        return True

    def execute(self):
        """Run with the gradient checks the options ask for; a StepInfo when there were any
        (a DeviceStepInfo on the GPU: the checks stay on the device)."""
        if not self.options.checks_grads:
            self.run()
            return None
        if self.prep.device != _arrays.CPU:
            info = device_checks([self], self.options)
            self.run(1.0, info.stats.ptr)  # coef on the device includes 1 / loss_scale
            return info
        skip, coef, norm = _precision.grad_multiplier(*_precision.total_sumsq([self]),
                                                      self.options)
        if not skip:
            self.run(coef)
        return _precision.StepInfo(skip, norm)


def _l1_rate(op, kw, options):
    """The rate of the L1 proximal step (``lr * l1``): the op's ``lr``. An op whose update
    takes no rate (Rprop's) may leave it None, unless ``l1`` needs it."""
    lr = kw.get("lr", 0.0)
    if lr is None:
        if options.l1:
            raise ValueError(f"{op}: l1 needs lr (the proximal step is lr * l1)")
        lr = 0.0
    return lr


def device_checks(plans, options):
    """Enqueue one pass over the gradients of every plan (GPU, one device) that writes
    {skip, coef, norm} to device memory; the plans then run with scale_ptr set to it, so
    neither the skip nor the clip coefficient travels through the host."""
    live = [p for p in plans if p.prep.groups]
    first = live[0] if live else plans[0]
    backend = first.backend()
    stream = first.cuda_stream() if live else 0
    # zeroed on the step's stream, from a pool (no allocation that waits for the device)
    stats = backend.module.DeviceScalars(3, first.prep.device - 1, stream)
    tables = [(dtype, ptrs[sizes.size:2 * sizes.size], sizes)
              for p in live for dtype, ptrs, sizes in p.prep.groups]
    inv = 1.0 / options.loss_scale if options.loss_scale is not None else 1.0
    max_norm = options.max_grad_norm if options.max_grad_norm is not None else -1.0
    backend.module.grad_stats(tables, stream, stats.ptr, inv_scale=inv, max_norm=max_norm,
                              skip_nonfinite=options.skip_nonfinite)
    info = _precision.DeviceStepInfo(stats, stream)
    info.fetch()  # the copy to the host waits for this pass only, not for the update
    return info


def plan(spec, kw, params, grads, states, *, options=None, stream=None,
         hyper=None, op=None, kernel=None, names=None):
    """The validated step of one algorithm over lists of arrays.

    `kw` holds the functional op's keywords (all of them, defaults filled); `states`
    the state lists of the buffers `spec.active(kw)` names, in that order; `options`
    the step's `_precision.Options`. `hyper` may hold a ready hyperparameter table (one
    row per tensor: the batched optimizers, which also give the `kernel` and the state
    `names` their members share); `op` the name errors carry (default: the op's). The L1
    proximal step (``l1``) is ``kw["lr"] * l1``; an op whose update takes no rate
    (Rprop's) has an optional ``lr`` for it, which ``l1`` then needs.
    """
    op = op or spec.op_name
    if options is None:
        options = _precision.Options(op, {})
    if spec.composite:  # more than one kernel call: the spec builds the plan
        names = spec.arg_names(spec.active(kw) if names is None else names)
        return spec.make_plan(kw, params, grads, states, names, options, stream, op)
    lr = _l1_rate(op, kw, options)
    if kernel is None:
        kernel = spec.kernel(kw)
    if hyper is None:
        hyper = pack(kernel, spec.hyper(kw))
    active = spec.active(kw) if names is None else names
    names = spec.arg_names(active)
    if spec.gradient == "rows":  # row-sparse gradients: only the rows they touch
        from . import _rows

        return _rows.plan(spec, kw, hyper, kernel, params, grads, states, names, options,
                          stream, op)
    unsigned = 0
    if options.absmax is not None:
        if options.ema is not None:
            raise ValueError(f"{op}: no EMA of the params (ema) with 8-bit state (absmax)")
        spec.check_quantized(kw, op)
        unsigned = sum(1 << k for k, name in enumerate(active) if spec.state(name).positive)
    ema = (options.ema, "ema") if options.ema is not None else None
    prep = _arrays.prepare(op, params, grads, states, names, stream, extra=options.extra,
                           ema=ema, scales=options.absmax)
    # a deferred plan's tables point into them
    prep.keep.append((states, options.extra, options.ema, options.absmax))
    step = kw.get("step", 1)
    step_ptr = 0
    if not isinstance(step, numbers.Real):
        step_ptr = _device_count(op, step, prep)
        prep.keep.append(step)
        step = 1.0
    return Plan(op, kernel, prep, hyper, stream, params, grads, float(step), options, lr,
                step_ptr, unsigned)


_IMMUTABLE = (int, float, bool, str, bytes, type(None), np.generic)


def _immutable(value):
    if isinstance(value, tuple):
        return all(map(_immutable, value))
    return isinstance(value, _IMMUTABLE)


def snapshot(group):
    """What a param group holds (its keys, and its values with the params list itself),
    for `same_snapshot` to tell at the next step that nothing but the params list's
    contents can have changed; None when some hyperparameter is a mutable object (one
    changed in place would look the same), so that there is nothing to compare."""
    if not all(_immutable(v) for k, v in group.items() if k != "params"):
        return None
    return tuple(group), tuple(group.values())


def same_snapshot(group, snap):
    """Whether a group holds the same keys and equal values as when `snapshot` took
    `snap` (the params list the same object or equal element by element: the caller
    checks its contents)."""
    keys, values = snap
    try:
        return tuple(group) == keys and tuple(group.values()) == values
    except (TypeError, ValueError, RuntimeError):  # (arrays compared elementwise)
        return False


class _Counted:
    """The writes of a dict counted in its optimizer's log (a one-element list), by
    every method that changes the dict (`StateDict`, `StateMap`)."""

    __slots__ = ()

    def __setitem__(self, key, value):
        super().__setitem__(key, value)
        self._fo_log[0] += 1

    def __delitem__(self, key):
        super().__delitem__(key)
        self._fo_log[0] += 1

    def __ior__(self, other):
        self._fo_log[0] += 1
        return super().__ior__(other)

    def update(self, *args, **kwargs):
        self._fo_log[0] += 1
        super().update(*args, **kwargs)

    def setdefault(self, key, default=None):
        self._fo_log[0] += 1
        return super().setdefault(key, default)

    def pop(self, *args):
        self._fo_log[0] += 1
        return super().pop(*args)

    def popitem(self):
        self._fo_log[0] += 1
        return super().popitem()

    def clear(self):
        self._fo_log[0] += 1
        super().clear()


class StateDict(_Counted, dict):
    """A dict that counts the writes made to it in its optimizer's log (a one-element
    list): a param's state (the dict torch.optim keeps), and the NumPy classes' map of
    them. A step then tells in one comparison that no state entry was replaced since the
    last one (an entry replaced, say ``state[p]["exp_avg"] = t``, must be the one the
    next step updates). The optimizers' own writes of the step counts go through
    ``dict.__setitem__`` and are not counted. It pickles and copies as a plain dict, so
    state dicts saved from it need nothing of fusedopt."""

    __slots__ = ("_fo_log",)

    def __init__(self, items=(), log=None):
        super().__init__(items)
        self._fo_log = log if log is not None else [0]

    def copy(self):
        return dict(self)

    def __reduce__(self):
        return dict, (dict(self),)


# dicts[i][key] = value for a list of dicts, through dict's own slot: not counted in a
# StateDict's log (the step counts an optimizer advances itself); TypeError, before any
# write, for a list holding something else
set_uncounted = _backend._cpu.set_entries


class StateMap(_Counted, defaultdict):
    """fusedopt.torch's `optimizer.state`, the defaultdict torch.optim keeps (param ->
    its state), counting its writes in the optimizer's log like each `StateDict` in
    it: a param's state made on first access, a dict put in or removed. It pickles and
    copies as a plain ``defaultdict(dict)``."""

    __slots__ = ("_fo_log",)

    def __init__(self, items=(), log=None):
        super().__init__(dict, items)
        self._fo_log = log if log is not None else [0]

    def __missing__(self, key):
        value = self[key] = StateDict(log=self._fo_log)
        return value

    def copy(self):
        return defaultdict(dict, self)

    __copy__ = copy

    def __reduce__(self):
        return defaultdict, (dict,), None, None, iter(self.items())


def tracks(obj, log, kind=StateDict):
    """Whether `obj` is a `kind` (`StateDict` or `StateMap`) counting its writes in `log`."""
    return type(obj) is kind and obj._fo_log is log


def all_tracked(state, log, kind=StateDict, dicts=None):
    """Whether `state` (a `kind`) and its dicts (or the given ones) count in `log`."""
    return tracks(state, log, kind) and \
        all(tracks(st, log) for st in (state.values() if dicts is None else dicts))


def track(state, log, kind=StateDict):
    """`state` as a `kind` (`StateDict`, or `StateMap` for torch.optim's defaultdict)
    counting its writes in `log`, and each of its dicts as a `StateDict` of `log` (a
    state assigned whole, loaded or unpickled is plain dicts); counted as a write."""
    log[0] += 1
    out = state if tracks(state, log, kind) else kind(state, log)
    for key, st in list(out.items()):
        if isinstance(st, dict) and not tracks(st, log):
            dict.__setitem__(out, key, StateDict(st, log))
    return out


class Kept:
    """A bucket's plan kept between steps by an optimizer class, with what it was made
    for: the step after reuses it when the params are the same arrays (their
    descriptions, or their addresses for torch parameters) and the state buffers (and
    the EMA arrays, when the step has them) the same objects, so only the gradients are
    described and checked again. Only a plain `Plan` is kept: the plans that specs build
    (`composite`) and row-sparse plans are made anew each step."""

    __slots__ = ("plan", "params", "lists", "rows", "ptrs", "ema")

    def __init__(self, plan, params, lists):
        self.plan, self.params, self.lists = plan, list(params), [list(x) for x in lists]
        rows = plan.prep.rows if type(plan) is Plan else None
        self.ema = None if rows is None or plan.options.ema is None else list(plan.options.ema)
        self.rows = None if rows is None else rows[0].copy()
        self.ptrs = None if rows is None else self.rows[:, _arrays.PTR].tobytes()

    def same_params(self, params):
        """Whether `params` are the kept plan's arrays, described as they were (the same
        objects at the same addresses, shapes and strides)."""
        if self.rows is None or len(params) != len(self.params) or \
                not all(map(_is, params, self.params)):
            return False
        rows = _arrays.describe_params(params, self.plan.stream)
        return rows is not None and rows.tobytes() == self.rows.tobytes()

    def reuse(self, spec, kw, params, grads, lists, options, torch_params=False,
              checked=False):
        """The kept plan refreshed for this step, or None when it no longer fits.
        `checked`: the caller knows the params and state lists are the same objects."""
        plan = self.plan
        if self.rows is None:
            return None
        ema = options.ema  # the EMA arrays are in the tables too: the same ones, or none
        if (ema is None) != (self.ema is None) or ema is not None and (
                len(ema) != len(self.ema) or not all(map(_is, ema, self.ema))):
            return None
        if not checked and (len(params) != len(self.params) or
                            not all(map(_is, params, self.params)) or
                            len(lists) != len(self.lists) or
                            not all(all(map(_is, a, b)) for a, b in zip(lists, self.lists))):
            return None
        if torch_params:
            if _foreign.tensor_addresses(params).tobytes() != self.ptrs:
                return None
        elif not self.same_params(params):
            return None
        if not plan.refresh(spec, kw, grads, options, trusted=torch_params):
            return None
        return plan


def _device_count(op, step, prep):
    """The device address of a step counter given as a float64 GPU array of one element."""
    row, _ = _foreign.describe(op, "step", step)
    if row[_arrays.DEVICE] == _arrays.CPU:
        raise TypeError(f"{op}: step must be a number, or a float64 array of one element on "
                        f"the arrays' GPU; got {type(step).__name__} in host memory")
    if row[_arrays.TYPENUM] != _arrays.F64 or row[_arrays.SIZE] != 1:
        raise TypeError(f"{op}: a step counter on the device must be a float64 array of one "
                        f"element, got {getattr(step, 'dtype', '?')} with "
                        f"{int(row[_arrays.SIZE])} elements")
    if not row[_arrays.FLAGS] & _arrays.F_WRITEABLE:
        raise ValueError(f"{op}: the step counter is read-only; the step adds 1 to it")
    if prep.groups and row[_arrays.DEVICE] != prep.device:
        raise TypeError(f"{op}: the step counter is on "
                        f"{_arrays._device_name(int(row[_arrays.DEVICE]))}, the arrays on "
                        f"{_arrays._device_name(prep.device)}")
    return int(row[_arrays.PTR])


# --- the functional ops ------------------------------------------------------------------------


def functional_op(spec):
    """The in-place functional op of a spec: ``<name>_(params, grads, *state lists, *,
    <op keywords>, stream=None, <precision keywords>)``."""
    op_name = spec.op_name
    args = tuple(s.arg for s in spec.states)
    keywords = tuple((o.name, o.default) for o in spec.op_keywords)
    nargs = len(args)

    rows_form = spec.gradient == "rows"

    def op(params, grads, *states, stream=None, **kwargs):
        if rows_form:  # (params, rows, values, *states): the gradients as rows of values
            if not states:
                raise TypeError(f"{op_name}() missing required argument: 'values'")
            values, states = states[0], states[1:]
            if not isinstance(grads, (list, tuple)) or not isinstance(values, (list, tuple)):
                raise TypeError(f"{op_name}: rows and values must be lists of arrays")
            if len(grads) != len(values):
                raise ValueError(f"{op_name}: got {len(grads)} rows for {len(values)} values")
            grads = list(zip(grads, values))
        if len(states) > nargs:
            raise TypeError(f"{op_name}() takes at most {2 + rows_form + nargs} positional "
                            f"arguments ({2 + rows_form + len(states)} given)")
        lists = dict(zip(args, states))
        for name in args[len(states):]:
            if name in kwargs:
                lists[name] = kwargs.pop(name)
        kw = {}
        for name, default in keywords:
            value = kwargs.pop(name, default)
            if value is REQUIRED:
                raise TypeError(f"{op_name}() missing required keyword argument: {name!r}")
            kw[name] = value
        spec.check_op(kw)
        options = _precision.Options(op_name, kwargs)  # the rest: precision keywords
        names = spec.active(kw)
        state_lists = [lists.get(spec.state(n).arg) for n in names]
        return plan(spec, kw, params, grads, state_lists, options=options,
                    stream=stream).execute()

    op.__name__ = op.__qualname__ = op_name
    op.__module__ = "fusedopt.functional"
    op.__doc__ = op_doc(spec)
    op.__signature__ = op_signature(spec)
    return op
