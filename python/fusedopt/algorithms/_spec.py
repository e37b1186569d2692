"""What an algorithm spec is: its options, state buffers, validation, and how a set of
hyperparameters fills the kernel's Hyper by field name.

A spec is a small subclass of `Spec` (one per algorithm, in the modules of this
package). The optimizer classes, `fusedopt.torch`, the batched optimizers, the
functional ops, the tests' case table and the benchmarks all derive from it; nothing
else knows an algorithm's defaults, state names or Hyper layout.

Two sets of names meet here. A *group* is a param group of the classes, in torch's
names (``betas``, ``momentum``, ...). The *op keywords* are the functional op's
(``beta1``, ``beta2``, ``step``, ...), which are also what `active`, `kernel` and
`hyper` read; `to_op` turns a group into op keywords.
"""

from __future__ import annotations

import numbers
import struct
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from .. import _cpu


class _Required:
    """The default of an argument that must be given."""

    def __repr__(self):
        return "<required>"

    def __reduce__(self):
        return "REQUIRED"


REQUIRED: Any = _Required()


@dataclass(frozen=True)
class Option:
    """One constructor argument (or functional op keyword) of an algorithm.

    ``kw_only`` marks the arguments after torch's ``*``; ``torch_only`` the flags that
    only `fusedopt.torch` takes (``foreach``, ``fused``, ``capturable``,
    ``differentiable``), which are kept in its param groups so that state dicts load
    into torch.optim.
    """

    name: str
    default: Any
    doc: str
    annotation: str = "float"
    kw_only: bool = False
    torch_only: bool = False


@dataclass(frozen=True)
class State:
    """One state buffer: torch's state name, the functional op's argument (a list),
    whether its values are never negative (sums and averages of squares), whether the
    op's argument may be left out (only some options use the buffer), and whether a
    fresh buffer is a copy of its param (schedule-free's ``z``) rather than filled with
    the spec's `init_value`."""

    name: str
    arg: str
    doc: str
    positive: bool = False
    optional: bool = False
    like_param: bool = False


def torch_flag(name, kw_only=True):
    """One of torch.optim's execution flags, accepted and kept by fusedopt.torch."""
    docs = {
        "foreach": "Accepted for torch.optim compatibility and kept in the param groups; "
                   "every step is fused.",
        "fused": "Accepted for torch.optim compatibility and kept in the param groups; "
                 "every step is fused.",
        "capturable": "Must be False (CUDA graph capture is not supported).",
        "differentiable": "Must be False (steps are not differentiable).",
    }
    default = None if name in ("foreach", "fused") else False
    return Option(name, default, docs[name], "bool | None" if default is None else "bool",
                  kw_only=kw_only, torch_only=True)


# --- validation with torch.optim's messages --------------------------------------------------


_PLAIN = (float, int, bool)


def number(value):
    """A hyperparameter as a Python number (torch.optim accepts 1-element tensors)."""
    if type(value) in _PLAIN or isinstance(value, numbers.Real):
        return value
    item = getattr(value, "item", None)
    if callable(item):
        try:
            return item()
        except (ValueError, RuntimeError):  # more than one element: left for the checks
            return value
    return value


def check(cond, message):
    """ValueError(message) unless `cond`."""
    if not cond:
        raise ValueError(message)


def check_number(name, value, low=None, high=None, *, high_open=False):
    """torch.optim's range checks: ``Invalid <name>: <value>``."""
    value = number(value)
    if not isinstance(value, numbers.Real) or isinstance(value, bool):
        raise ValueError(f"Invalid {name}: {value!r} is not a number")
    if low is not None and not value >= low:
        raise ValueError(f"Invalid {name}: {value}")
    if high is not None and not (value < high if high_open else value <= high):
        raise ValueError(f"Invalid {name}: {value}")


def check_betas(betas, count=2):
    """Each beta in [0, 1), torch's messages."""
    check(isinstance(betas, (tuple, list)) and len(betas) == count, f"Invalid betas: {betas!r}")
    for i, beta in enumerate(betas):
        check_number(f"beta parameter at index {i}", beta, 0.0, 1.0, high_open=True)


# --- the Hyper, by field name ------------------------------------------------------------------

_FIELDS: dict = {}


def hyper_fields(kernel):
    """(fields the host fills, fields the rule fills per step) of a kernel's Hyper."""
    fields = _FIELDS.get(kernel)
    if fields is None:
        fields = _FIELDS[kernel] = _cpu.hyper_fields(kernel)
    return fields


def pack(kernel, values):
    """The kernel's hyperparameter array from a dict of its host fields, by name.
    Every host field must be given and no other; the per-step fields are left 0 for
    the rule's at_step to fill."""
    try:  # the same values as a recent call: its array (read-only, the kernels copy it),
        # keyed by the values' bits (-0.0 == 0.0, and either may change a signed zero)
        packer = _PACKERS.get(len(values))
        if packer is None:
            packer = _PACKERS[len(values)] = struct.Struct(f"{len(values)}d")
        key = (kernel, tuple(values), packer.pack(*values.values()))
        out = _PACKED.get(key)
    except (TypeError, ValueError, struct.error):  # (left for the checks below)
        key = out = None
    if out is not None:
        return out
    host, per_step = hyper_fields(kernel)
    if len(values) != len(host) or not all(map(values.__contains__, host)):
        missing = [f for f in host if f not in values]
        unknown = [f for f in values if f not in host]
        raise KeyError(f"{kernel}: the Hyper's fields are {list(host)}; missing {missing}, "
                       f"unknown {unknown}")
    out = np.zeros(len(host) + len(per_step), dtype=np.float64)
    out[:len(host)] = [float(values[f]) for f in host]
    if key is not None:
        out.flags.writeable = False
        if len(_PACKED) >= 256:
            _PACKED.clear()
        _PACKED[key] = out
    return out


_PACKED: dict = {}  # pack's recent results, by (kernel, names, values)
_PACKERS: dict = {}  # struct.Struct of n doubles, by n


# --- the spec ------------------------------------------------------------------------------------


class Spec:
    """An algorithm: everything the front-ends need to know about it, once.

    Subclasses set the class attributes and override the methods whose defaults do not
    fit. `name` is the functional op's name without its trailing underscore and the
    reference's name (``fusedopt.reference.<name>``); `title` the class name.
    """

    name: ClassVar[str] = ""
    title: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    #: the update equations (reStructuredText), shown in every front-end's docstring
    math: ClassVar[str] = ""
    #: constructor arguments after `params`, in torch's order
    options: ClassVar[tuple] = ()
    #: the functional op's keywords after the state lists, in order
    op_keywords: ClassVar[tuple] = ()
    #: every state buffer any option uses, in the kernel's slot order
    states: ClassVar[tuple] = ()
    #: the state buffers that may be kept in 8 bits (blockwise codes with a float32 scale
    #: per block: `fusedopt.Precision`'s "int8", fusedopt.torch's ``optim_bits=8``). The
    #: drivers take any elementwise rule with 8-bit state (they decode a block of each
    #: state, run the rule and encode it back); a spec lists the states it was checked
    #: with, and options that use another state refuse 8-bit state (`check_quantized`)
    quantizable: ClassVar[tuple] = ()
    #: per-param scalars kept in the state (torch's 0-d tensors), besides the buffers
    scalars: ClassVar[tuple] = ("step",)
    #: what each scalar other than `step` holds, for the docstrings: {name: text}
    scalar_docs: ClassVar[dict] = {}
    #: extra entries of every param group that are not constructor arguments
    group_extras: ClassVar[dict] = {}
    #: state created at construction (torch's Adagrad), not at a param's first step
    eager_state: ClassVar[bool] = False
    #: the op keyword that says "the state buffers were created by this step", if any
    fresh_keyword: ClassVar[str | None] = None
    #: the spec whose class this one's class subclasses (torch's AdamW(Adam))
    base: ClassVar[str | None] = None
    #: options the batched optimizers take as one value for all members (they change
    #: the kernel or the state buffers)
    batch_shared: ClassVar[tuple] = ()
    #: the step benchmark's rows of this algorithm: {row name: constructor options}
    #: (default: one row, named after the algorithm, with the default options; {}: none)
    bench: ClassVar[dict | None] = None
    #: the options shown in the docstring's example
    example: ClassVar[str] = "lr=1e-3"
    #: the example's param shapes (NumPy classes) and model (fusedopt.torch)
    example_shapes: ClassVar[tuple] = ((4, 2), (2,))
    example_model: ClassVar[str] = "torch.nn.Linear(4, 2)"
    #: the class fusedopt.torch's class stands in for, where torch.optim has none (its
    #: docstring's words), e.g. "the schedulefree package's ``AdamWScheduleFree``"
    defined_by: ClassVar[str | None] = None
    #: how gradients come: "dense" (an array like the param) or "rows" (row-sparse: a
    #: pair (row indices, rows of values) or a torch sparse tensor, see `fusedopt._rows`;
    #: the functional op then takes ``rows`` and ``values`` lists instead of ``grads``,
    #: and the kernel runs on the touched rows only)
    gradient: ClassVar[str] = "dense"
    #: whether the batched optimizers (`fusedopt.batched`) and the generic test tables
    #: take it (elementwise rules over dense gradients)
    batchable: ClassVar[bool] = True
    #: "module:Name" of a hand-written `fusedopt.torch` class, for algorithms whose torch
    #: state does not fit the generated one (torch keeps SparseAdam's step as an int)
    torch_class: ClassVar[str | None] = None
    #: a step that is more than one elementwise kernel call (Muon's Newton-Schulz
    #: iterations between two elementwise passes, Adafactor's reductions): `make_plan`
    #: builds it, and everything else (state, classes, state dicts) stays generic
    composite: ClassVar[bool] = False
    #: the state buffer that `train()` and `eval()` move the params towards and away
    #: from (schedule-free methods keep the average x in the params for evaluation and
    #: the interpolation y for training); None: the classes have no such methods
    mode_state: ClassVar[str | None] = None

    # --- derived names -------------------------------------------------------------------------

    @property
    def op_name(self):
        return self.name + "_"

    def defaults(self, torch=False):
        """Constructor defaults (with the torch-only flags with ``torch=True``)."""
        return {o.name: o.default for o in self.options if torch or not o.torch_only}

    def group_defaults(self, torch=False):
        """What a param group holds by default: the constructor defaults and the group
        extras."""
        return {**self.defaults(torch), **self.group_extras}

    def state(self, name):
        for s in self.states:
            if s.name == name:
                return s
        raise KeyError(name)

    def arg_names(self, names):
        """The functional op's argument names of these state buffers."""
        return [self.state(n).arg for n in names]

    # --- per algorithm ---------------------------------------------------------------------------

    def validate(self, group):
        """ValueError for invalid hyperparameters, with torch.optim's messages."""

    def check_params(self, params):
        """ValueError for params the algorithm does not take (torch's message; Muon's
        2-D only), checked when a class gets them."""

    def state_shape(self, name, shape):
        """The shape of state buffer `name` of a param of `shape`, or None when such a
        param keeps no such buffer (Adafactor: row and column factors for matrices, a
        full second moment for vectors). By default every buffer has the param's shape;
        a spec that says otherwise sets `shaped_states`."""
        return shape

    #: whether `state_shape` differs from the param's shape for some buffer or param (the
    #: classes then make, load and pass each param's buffers by `state_shape`; lists of
    #: state buffers hold None for a param without the buffer)
    shaped_states: ClassVar[bool] = False

    def make_plan(self, kw, params, grads, states, names, options, stream, op):
        """The validated plan of a composite step (`composite`): an object with the
        methods of `_engine.Plan` that the front-ends use (``run``, ``execute``,
        ``sumsq``, ``grads_finite``) and its ``prep`` and ``params``."""
        raise NotImplementedError

    def to_op(self, group):
        """A param group's hyperparameters as the functional op's keywords (without the
        scalars, which `advance` gives): those of the group's entries that the op takes
        under the same name."""
        names = self.__dict__.get("_op_names")
        if names is None:
            names = self._op_names = tuple(o.name for o in self.op_keywords
                                           if o.name not in self.scalars)
        return {name: number(group[name]) for name in names if name in group}

    def active(self, kw):
        """Names of the state buffers these op keywords use, in slot order."""
        return tuple(s.name for s in self.states)

    def kernel(self, kw):
        """The kernel that runs these op keywords."""
        return self.name

    def hyper(self, kw):
        """The kernel's Hyper host fields, by name, from the op keywords."""
        raise NotImplementedError

    def batch_kernel(self, kws, existing):
        """(kernel, state names, op keywords per member) for the members of a batched
        optimizer, whose op keywords are `kws`; `existing` names the state buffers made
        by earlier steps. `kernel` may be a tuple of one kernel per member (the members
        of each kernel then run in a call of their own, over the state names that
        kernel uses); the state names are those of every member. By default every
        member must run the same kernel."""
        kernels = {self.kernel(kw) for kw in kws}
        if len(kernels) > 1:
            raise ValueError(f"{self.title}: the members need different kernels "
                             f"({sorted(kernels)}); options that change the state buffers "
                             "must be one value for all members")
        return kernels.pop(), self.active(kws[0]), kws

    def init_scalars(self, group):
        """The scalars of a fresh state."""
        return {name: 0.0 for name in self.scalars}

    def init_value(self, name, group):
        """The value a fresh state buffer is filled with."""
        return 0.0

    def advance_group(self, kw, group):
        """(op keywords this step adds, group entries after the step) from a param
        group before the step: per-group bookkeeping kept in the group itself (entries
        that `group_extras` starts), advanced once per step of every group whether or
        not its params have gradients, as the schedulefree package keeps its ``k``,
        ``weight_sum`` and ``lr_max``. The front-ends apply the new entries once the
        whole step has been validated. Default: none."""
        return {}, {}

    def check_step(self, group):
        """Raise when a group cannot step as it is (a schedule-free group in eval
        mode); nothing has been validated or changed yet."""

    def mode_weight(self, group, train):
        """The lerp weight that moves a group's params from its current mode to train
        mode (``train`` True) or eval mode: ``p <- p + w (state - p)`` (torch.lerp)
        with the `mode_state` buffer; None when the group is in that mode already.
        The front-ends then set the group's mode with `set_mode`."""
        return None

    def set_mode(self, group, train):
        """The group entries that record the mode (see `mode_weight`)."""
        return {}

    def reductions(self, kw):
        """How many per-tensor sums the kernel for these op keywords computes in a first
        pass before its update (0: an elementwise rule; csrc/core/two_pass.h)."""
        kernel = self.kernel(kw)
        known = self.__dict__.setdefault("_reductions", {})
        count = known.get(kernel)
        if count is None:
            count = known[kernel] = _cpu.num_reductions(kernel)
        return count

    def advance(self, kw, scalars):
        """(op keywords this step adds, the scalars after it) from a param's scalars
        before the step. By default the scalars are the step count: the op receives the
        count after this step if it takes `step`.

        `scalars` holds each value as its front-end stores it: a Python float (the NumPy
        classes, the batched optimizers, the case table) or a NumPy scalar of the dtype
        it is stored in (`fusedopt.torch`, which keeps torch.optim's dtypes: float32
        unless the default dtype is float64, and after a load the dtype torch's
        load_state_dict gives). Where torch computes a new scalar in its stored dtype
        (NAdam's ``mu_product *= mu``), compute it in ``type(value)``, so that runs and
        state dicts agree with torch's bit for bit; the front-end stores what this
        returns in its own dtype."""
        if not self.scalars:
            return {}, {}
        step = scalars["step"] + 1.0
        extra = {"step": int(step)} if self.takes_step else {}
        return extra, {"step": step}

    def step_keywords(self, kw, scalars, fresh=False):
        """(the op keywords of one step, the scalars after it) from a group's op keywords
        and its params' scalars before the step (`advance`); `fresh`: whether the step is
        the params' first (the op's `fresh_keyword`, for the specs that have one)."""
        extra, after = self.advance(kw, scalars)
        if extra:
            kw = {**kw, **extra}
        if self.fresh_keyword is not None:
            kw = {**kw, self.fresh_keyword: fresh}
        return kw, after

    @property
    def takes_step(self):
        """Whether the functional op takes the step count."""
        takes = self.__dict__.get("_takes_step")
        if takes is None:
            takes = self._takes_step = any(o.name == "step" for o in self.op_keywords)
        return takes

    def check_quantized(self, kw, op):
        """ValueError when these op keywords cannot keep their state in 8 bits (blockwise
        codes, `fusedopt.Precision`): they use a state that is not in `quantizable`. A
        spec also refuses the options whose math breaks under the rounding of the states
        (centered RMSprop: v - mean(g)^2 of separately rounded states can turn
        negative)."""
        for name in self.active(kw):
            if name not in self.quantizable:
                raise ValueError(f"{op}: 8-bit state is not supported for {self.title}'s "
                                 f"{name!r}" + ("" if self.quantizable else
                                                " (it has no 8-bit state)"))

    def check_op(self, kw):
        """ValueError for op keywords a kernel cannot run (not hyperparameter ranges:
        the functional ops leave those to the caller, as torch's functional API)."""
        step = kw.get("step")
        if step is not None and isinstance(step, numbers.Real) and not step >= 1:
            raise ValueError(f"{self.op_name}: step must be >= 1 (the count after this "
                             f"update), got {step}")

    def __repr__(self):
        return f"<spec {self.name}>"
