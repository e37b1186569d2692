"""Mixed-precision options of a step: master weights, Kahan buffers, rounding, loss
scaling, non-finite skipping and global-norm clipping.

Loss scaling, the non-finite check and clipping share one pass over the gradients: the
sum of their squares (in double, the same for every thread count). If it is not
finite some gradient is inf or NaN, and with `skip_nonfinite` the step does nothing.
Otherwise the unscale factor and the clip coefficient become one gradient multiplier
of the update pass, so the whole step reads the gradients twice at most. On the GPU
the pass writes {skip, coef, norm} to device memory and the update kernels read them
there: a checked step makes no host round trip (DeviceStepInfo).
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import numpy as np

#: The mixed-precision and gradient-check keywords every functional op takes:
#: (name, default, annotation, description).
KEYWORDS = (
    ("master_params", None, "list | None",
     "float32 master weights of 16-bit params, updated with them in the same pass."),
    ("kahan_buffers", None, "list | None",
     "Compensation buffers (the params' dtype) that carry what rounding 16-bit params lost."),
    ("stochastic_rounding", False, "bool",
     "Write 16-bit params back with stochastic rounding."),
    ("seed", 0, "int", "The random stream of stochastic rounding (mixed with the step)."),
    ("loss_scale", None, "float | None", "The gradients are divided by it."),
    ("max_grad_norm", None, "float | None",
     "Clip the gradients to this global L2 norm (over all params of the call)."),
    ("skip_nonfinite", False, "bool",
     "A step whose gradients hold inf or NaN changes nothing."),
    ("l1", 0.0, "float",
     "L1 regularization: the proximal step ``p = sign(p) max(|p| - lr l1, 0)`` after the "
     "update."),
    ("ema", None, "list | None",
     "Exponential moving averages of the params (their dtypes and shapes), moved toward the "
     "updated params in the same pass: ``ema = torch.lerp(ema, p, 1 - ema_decay)``, "
     "torch.optim.swa_utils' EMA update (not with `kahan_buffers` nor `absmax`)."),
    ("ema_decay", None, "float | None",
     "The decay of `ema`, in [0, 1]; 0 copies the updated params (AveragedModel's first "
     "update)."),
    ("absmax", None, "list | None",
     "8-bit state: for each state list the op uses (in the op's order), a list of float32 "
     "arrays of block scales, ceil(size / 256) for each param; the state arrays then hold "
     "uint8 codes (see `fusedopt.Precision`)."),
)
OPTIONS = tuple(k[0] for k in KEYWORDS)

_MASK = (1 << 64) - 1


class StepInfo(NamedTuple):
    """What a step with gradient checks found, on the CPU.

    A step returns one when it was given ``loss_scale``, ``max_grad_norm`` or
    ``skip_nonfinite``; on the GPU it returns a `DeviceStepInfo` instead.

    Attributes
    ----------
    skipped : bool
        True when a gradient was inf or NaN and ``skip_nonfinite`` was asked for: the
        step changed nothing.
    grad_norm : float
        The global L2 norm of the unscaled gradients (before clipping); inf or NaN
        when a gradient is.

    Examples
    --------
    >>> import numpy as np, fusedopt as fo
    >>> p = np.zeros(2, np.float32)
    >>> fo.SGD([p], lr=0.1).step([np.array([3.0, 4.0], np.float32)], max_grad_norm=1.0)
    StepInfo(skipped=False, grad_norm=5.0)
    """

    skipped: bool
    grad_norm: float


class DeviceStepInfo:
    """What a checked step on the GPU found, kept on the device.

    A checked step on CUDA arrays returns this at once, without waiting for the
    device. Reading `skipped` or `grad_norm` copies three numbers to the host: it
    waits for the gradient pass of this step (an event after it), not for the update
    or anything enqueued later. It unpacks and compares like a `StepInfo`.

    Parameters
    ----------
    stats : object
        float64 {skip, coef, norm} in device memory (it has
        ``__cuda_array_interface__``), which the step's update kernels read there.
    stream : int
        The CUDA stream of the step.

    Notes
    -----
    The steps create it; there is no need to build one.
    """

    __slots__ = ("stats", "stream", "_values")

    def __init__(self, stats: Any, stream: int) -> None:
        self.stats, self.stream, self._values = stats, stream, None

    def fetch(self) -> None:
        """Enqueue the copy of the numbers to the host (right after the gradient pass)."""
        self.stats.fetch(self.stream)

    def _host(self):
        if self._values is None:
            self._values = self.stats.values()
        return self._values

    @property
    def skipped(self) -> bool:
        """Whether the step found an inf or NaN gradient and changed nothing (waits for
        the gradient pass)."""
        return self._host()[0] != 0.0

    @property
    def grad_norm(self) -> float:
        """The global L2 norm of the unscaled gradients (waits for the gradient pass)."""
        return self._host()[2]

    def __iter__(self):
        return iter((self.skipped, self.grad_norm))

    def __eq__(self, other):
        return tuple(self) == tuple(other)

    def __repr__(self):
        if self._values is None:
            return "DeviceStepInfo(<on the device>)"
        return f"DeviceStepInfo(skipped={self.skipped}, grad_norm={self.grad_norm})"


class Options:
    __slots__ = OPTIONS

    def __init__(self, op, kwargs):
        unknown = set(kwargs) - set(OPTIONS)
        if unknown:
            raise TypeError(f"{op}: unexpected keyword argument {sorted(unknown)[0]!r}")
        self.master_params = kwargs.get("master_params")
        self.kahan_buffers = kwargs.get("kahan_buffers")
        self.stochastic_rounding = bool(kwargs.get("stochastic_rounding", False))
        self.seed = int(kwargs.get("seed", 0))
        self.loss_scale = kwargs.get("loss_scale")
        self.max_grad_norm = kwargs.get("max_grad_norm")
        self.skip_nonfinite = bool(kwargs.get("skip_nonfinite", False))
        self.l1 = float(kwargs.get("l1", 0.0))
        self.absmax = kwargs.get("absmax")
        if self.absmax is not None and not isinstance(self.absmax, (list, tuple)):
            raise TypeError(f"{op}: absmax must be a list (one list of scale arrays per state "
                            f"list), got {type(self.absmax).__name__}")
        if not self.l1 >= 0.0:
            raise ValueError(f"{op}: l1 must be >= 0, got {self.l1}")
        if self.master_params is not None and self.kahan_buffers is not None:
            raise ValueError(f"{op}: master_params and kahan_buffers are alternatives; "
                             "pass one of them")
        if self.loss_scale is not None and not (self.loss_scale > 0 and
                                                math.isfinite(self.loss_scale)):
            raise ValueError(f"{op}: loss_scale must be a positive finite number, got "
                             f"{self.loss_scale}")
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            raise ValueError(f"{op}: max_grad_norm must be > 0, got {self.max_grad_norm}")
        self.ema = kwargs.get("ema")
        self.ema_decay = kwargs.get("ema_decay")
        if self.ema is not None or self.ema_decay is not None:
            check_ema_decay(op, self.ema_decay)
            if self.ema is None:
                raise ValueError(f"{op}: ema_decay was given without the ema arrays")
            if self.kahan_buffers is not None:
                raise ValueError(f"{op}: ema and kahan_buffers do not go together; use "
                                 "master_params")
            if self.absmax is not None:
                raise ValueError(f"{op}: ema and 8-bit state (absmax) do not go together: "
                                 "the EMA slot has no place in the 8-bit kernels")
            self.ema_decay = float(self.ema_decay)

    @property
    def checks_grads(self):
        return self.max_grad_norm is not None or self.skip_nonfinite

    @property
    def extra(self):
        """(list, name, kernel code) of the layout's extra buffer, or None."""
        if self.master_params is not None:
            return self.master_params, "master_params", 1
        if self.kahan_buffers is not None:
            return self.kahan_buffers, "kahan_buffers", 2
        return None


def check_ema_decay(op, decay):
    """ValueError unless `decay` is a number in [0, 1] (torch's get_ema_multi_avg_fn)."""
    if decay is None:
        raise ValueError(f"{op}: ema needs ema_decay")
    if isinstance(decay, bool) or not isinstance(decay, (int, float, np.floating)) or \
            not 0.0 <= decay <= 1.0:
        raise ValueError(f"Invalid decay value {decay} provided. Please provide a value in "
                         "[0,1] range.")


#: the options of a step without any (shared: an Options is never changed)
PLAIN = None


class Precision:
    """The mixed-precision policy of an optimizer (``fo.Adam(..., precision=...)``).

    16-bit params (float16, bfloat16) run their math in float32; these options say
    where the state lives and how the result is written back. float32 and float64
    params are not affected, except by 8-bit state.

    Parameters
    ----------
    state_dtype : dtype or "int8", optional
        The dtype of the state buffers of 16-bit params: float32 (the default, None)
        or bfloat16 (needs ml_dtypes). ``"int8"``: 8-bit state for float32 and 16-bit
        params alike (float64 params keep float64 state): each state buffer is stored
        as uint8 codes of bitsandbytes' dynamic quantization maps (signed, or unsigned
        for states that are never negative) with one float32 scale per block of 256
        elements (the block's largest magnitude), under ``<name>_absmax`` in the state
        (Dettmers et al. 2022). The kernels decode a block, update it and encode it
        back in one pass: Adam moves 16 bytes per float32 element instead of 28.
    master_weights : bool, default False
        Keep a float32 master copy of each 16-bit param (state ``"master_param"``);
        the kernel updates it and writes the rounded param in the same pass.
    kahan : bool, default False
        Instead, a compensation buffer of the param's dtype (state ``"kahan_comp"``)
        carries what rounding to 16 bits lost into the next step.
    stochastic_rounding : bool, default False
        Write 16-bit params back with stochastic rounding instead of round to
        nearest even.
    seed : int, default 0
        The seed of the rounding: a given seed and step count give the same bits on
        every run, thread count and device.
    min_8bit_size : int, default 4096
        With ``"int8"``, params with fewer elements keep float32 state (their own
        dtype for float64 params), as bitsandbytes' 8-bit optimizers do: small
        tensors such as biases and norms cost little and are the most sensitive.

    Raises
    ------
    ValueError
        If both `master_weights` and `kahan` are asked, `state_dtype` is neither
        float32, bfloat16 nor ``"int8"``, or `min_8bit_size` is not an integer >= 0.

    Examples
    --------
    >>> import ml_dtypes, numpy as np, fusedopt as fo
    >>> params = [np.zeros(4, ml_dtypes.bfloat16)]
    >>> opt = fo.AdamW(params, lr=1e-3, precision=fo.Precision(master_weights=True))
    >>> opt.step([np.ones(4, ml_dtypes.bfloat16)])
    >>> sorted(opt.state[0])
    ['exp_avg', 'exp_avg_sq', 'master_param', 'step']
    >>> params = [np.zeros(1000, np.float32)]
    >>> opt = fo.Adam(params, lr=1e-3, precision=fo.Precision(state_dtype="int8",
    ...                                                        min_8bit_size=0))
    >>> opt.step([np.ones(1000, np.float32)])
    >>> for name, value in sorted(opt.state[0].items()):
    ...     if name != "step":
    ...         print(name, value.dtype, value.shape)
    exp_avg uint8 (1000,)
    exp_avg_absmax float32 (4,)
    exp_avg_sq uint8 (1000,)
    exp_avg_sq_absmax float32 (4,)
    """

    def __init__(self, *, state_dtype: Any = None, master_weights: bool = False,
                 kahan: bool = False, stochastic_rounding: bool = False,
                 seed: int = 0, min_8bit_size: int = 4096) -> None:
        if master_weights and kahan:
            raise ValueError("master_weights and kahan are alternatives; choose one")
        self.int8 = _is_int8(state_dtype)
        self.state_dtype = None
        if state_dtype is not None:
            try:
                self.state_dtype = np.dtype(state_dtype)
            except TypeError:
                raise ValueError(f"state_dtype must be float32 or bfloat16, or 'int8' for "
                                 f"8-bit state, got {state_dtype!r}") from None
        if self.state_dtype is not None and not self.int8 and \
                self.state_dtype.name not in ("float32", "bfloat16"):
            raise ValueError(f"state_dtype must be float32 or bfloat16, or 'int8' for 8-bit "
                             f"state, got {self.state_dtype}")
        if isinstance(min_8bit_size, bool) or not isinstance(min_8bit_size, (int, np.integer)) \
                or min_8bit_size < 0:
            raise ValueError(f"min_8bit_size must be an integer >= 0, got {min_8bit_size!r}")
        self.min_8bit_size = int(min_8bit_size)
        self.master_weights, self.kahan = bool(master_weights), bool(kahan)
        self.stochastic_rounding, self.seed = bool(stochastic_rounding), int(seed)

    def __repr__(self):
        state = "'int8'" if self.int8 else str(self.state_dtype)
        extra = f", min_8bit_size={self.min_8bit_size}" if self.int8 else ""
        return (f"Precision(state_dtype={state}, master_weights={self.master_weights}, "
                f"kahan={self.kahan}, stochastic_rounding={self.stochastic_rounding}, "
                f"seed={self.seed}{extra})")

    def quantizes(self, dtype: Any, size: int) -> bool:
        """Whether a param of `dtype` (NumPy's or torch's) with `size` elements gets
        8-bit state."""
        return self.int8 and size >= self.min_8bit_size and \
            (self.is_16bit(dtype) or _dtype_name(dtype) == "float32")

    @staticmethod
    def is_16bit(dtype: Any) -> bool:
        """Whether `dtype` (a NumPy, ml_dtypes or torch dtype) is a 16-bit float."""
        return np.dtype(dtype).itemsize == 2 if _is_numpy_dtype(dtype) else \
            getattr(dtype, "itemsize", 4) == 2

    def state_dtype_for(self, param_dtype: Any, size: int | None = None) -> Any:
        """The dtype of the state buffers of a param of `param_dtype`: uint8 (codes)
        where 8-bit state applies (`size`, the param's element count, decides under
        ``"int8"``)."""
        if size is not None and self.quantizes(param_dtype, size):
            return np.dtype(np.uint8)
        if not self.is_16bit(param_dtype):
            return param_dtype
        if self.int8 or self.state_dtype is None:
            return np.dtype(np.float32)
        return self.state_dtype

    @property
    def has_extra(self) -> bool:
        """Whether 16-bit params get an extra buffer (master weights or Kahan)."""
        return self.master_weights or self.kahan

    def extra_name(self, param_dtype: Any) -> str | None:
        """The state name of the extra buffer of a param of `param_dtype`, or None."""
        if not self.is_16bit(param_dtype):
            return None
        return "master_param" if self.master_weights else "kahan_comp" if self.kahan else None

    def step_options(self, steps_taken: int) -> dict:
        """The rounding keywords of the functional ops for the step after
        `steps_taken` steps."""
        if not self.stochastic_rounding:
            return {}
        return {"stochastic_rounding": True, "seed": rounding_key(self.seed, steps_taken)}


def _is_int8(state_dtype):
    """Whether a state_dtype asks for 8-bit state ("int8", or NumPy's int8)."""
    if state_dtype is None:
        return False
    if isinstance(state_dtype, str):
        return state_dtype == "int8"
    return _is_numpy_dtype(state_dtype) and np.dtype(state_dtype) == np.int8


def _dtype_name(dtype):
    """A dtype's name (NumPy's, or the last part of torch's)."""
    return np.dtype(dtype).name if _is_numpy_dtype(dtype) else str(dtype).rpartition(".")[2]


PLAIN = Options("step", {})


def _is_numpy_dtype(dtype):
    try:
        np.dtype(dtype)
        return True
    except TypeError:
        return False


def rounding_key(seed, step):
    """The random stream of one step: a mix of the seed and the step count, so each
    step rounds with fresh bits and a given (seed, step) always with the same ones
    (csrc/core/precision.h's step_key, which the GPU applies to device step counts)."""
    from . import _cpu

    return _cpu.step_key(int(seed) & _MASK, int(step) & _MASK)


def grad_multiplier(sumsq, finite, options):
    """(skip, multiplier, norm) from the sum of squares of the raw gradients and whether
    every gradient element is finite (see `total_sumsq`)."""
    inv = 1.0 / options.loss_scale if options.loss_scale is not None else 1.0
    norm = math.sqrt(sumsq) * inv  # inf for inf gradients (or overflow), nan for NaN ones
    if not finite and options.skip_nonfinite:
        return True, inv, norm
    coef = inv
    if options.max_grad_norm is not None:
        # torch's clip_grad_norm_: max_norm / (norm + 1e-6), clamped at 1; an infinite
        # norm gives 0 and a NaN norm NaN, which the update then propagates
        clip = options.max_grad_norm / (norm + 1e-6)
        coef *= clip if not clip >= 1.0 else 1.0
    return False, coef, norm


def total_sumsq(plans):
    """(sum of squares of the gradients of all plans, all finite). One fused pass; only a
    sum that is inf is followed by an element check, since float64 gradients beyond
    1e154 overflow it while being finite."""
    total = sum(plan.sumsq() for plan in plans)
    if math.isfinite(total):
        return total, True
    if math.isnan(total):
        return total, False
    return total, all(plan.grads_finite() for plan in plans)


def execute_on_host(plan, title):
    """A plan's `execute` where the gradient checks run on the host only (the composite
    steps: Muon, Adafactor): run as is without checks; with them, the gradients' sum of
    squares decides on the host whether to skip and how much to scale. ValueError for a
    checked step on a GPU, before anything runs."""
    options = plan.options
    if not options.checks_grads:
        plan.run()
        return None
    if plan.prep.device != 0:  # _arrays.CPU
        raise ValueError(f"{plan.op}: gradient checks on the device are not supported for "
                         f"{title}")
    skip, coef, norm = grad_multiplier(*total_sumsq([plan]), options)
    if not skip:
        plan.run(coef)
    return StepInfo(skip, norm)


def sumsq(groups):
    """Sum of squares of the gradients of prepared CPU groups (slot 1 of each table),
    one fused pass, the same for every thread count."""
    from . import _cpu

    return sum(_cpu.sumsq(dtype, ptrs[sizes.size:2 * sizes.size], sizes)
               for dtype, ptrs, sizes in groups)
