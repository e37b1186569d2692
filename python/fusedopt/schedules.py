"""Learning-rate schedules that work with every fusedopt optimizer.

A schedule sets `group["lr"]` on `optimizer.param_groups`, as torch.optim.lr_scheduler
does, so it drives any optimizer that reads its learning rate from there: the classic
family, `LBFGS`, `Newton`, and the batched optimizers of `fusedopt.batched` (one group
per member: each member follows the schedule from its own base rate)::

    opt = fo.SGD(params, lr=0.1, momentum=0.9)
    sched = fo.schedules.WarmupCosineLR(opt, warmup_steps=100, total_steps=1000)
    for batch in batches:
        opt.step(grads(batch))
        sched.step()

Values are torch's (StepLR, ExponentialLR, CosineAnnealingLR, LinearLR followed by
CosineAnnealingLR, OneCycleLR, ReduceLROnPlateau): the constructor applies the value
of step 0, each `step()` advances one step, `get_last_lr()` lists the rates it set.
Schedules here compute the rate of step t in closed form from each group's base rate
(`group["initial_lr"]`, set from `group["lr"]` at construction, as torch does), so
they do not compound when two of them drive the same optimizer; use one at a time.
"""

from __future__ import annotations

import math
from typing import Any, Sequence, Union

__all__ = ["LRScheduler", "StepLR", "ExponentialLR", "CosineAnnealingLR", "WarmupCosineLR",
           "OneCycleLR", "ReduceLROnPlateau"]


_Number = Union[float, Sequence[float]]  # one value, or one per param group


def __dir__():
    return sorted(__all__)


class _LastLR:
    """What every schedule keeps: the last rates it set, and a state dict of itself."""

    def get_last_lr(self) -> list[float]:
        """Return the rates set by the last `step` (or by the constructor).

        Returns
        -------
        list of float
            One rate per param group, in the optimizer's order.
        """
        return list(self._last_lr)

    def state_dict(self) -> dict[str, Any]:
        """Return the schedule's state, everything but the optimizer.

        Returns
        -------
        dict
            The attributes of the schedule (step count, base rates, options); pass it
            to `load_state_dict` of a schedule built on the same optimizer to resume.
        """
        return {k: v for k, v in self.__dict__.items() if k != "optimizer"}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore a state returned by `state_dict`.

        Parameters
        ----------
        state_dict : dict
            A state returned by `state_dict` of a schedule of the same class.
        """
        self.__dict__.update(state_dict)


class LRScheduler(_LastLR):
    """Base class of the schedules that compute the rate of step t in closed form.

    A subclass defines ``lr_at(base_lr, t)``. The constructor records each group's
    base rate (``group["initial_lr"]``, set from ``group["lr"]`` unless resuming) and
    applies the rate of step 0; each `step` applies the next one.

    Parameters
    ----------
    optimizer : Optimizer
        Any optimizer with torch-style ``param_groups`` (a list of dicts with ``"lr"``):
        the fusedopt optimizers, ``fusedopt.torch``'s, the batched ones.
    last_epoch : int, default -1
        The index of the last step taken: -1 starts a new schedule; a value >= 0
        resumes one, and then every group must hold ``"initial_lr"``.

    Attributes
    ----------
    base_lrs : list of float
        The base rate of each group.
    last_epoch : int
        The index of the step whose rate is applied (0 after construction).

    Raises
    ------
    KeyError
        If resuming (``last_epoch >= 0``) and a group has no ``"initial_lr"``.

    Examples
    --------
    >>> class Halving(LRScheduler):
    ...     def lr_at(self, base_lr, t):
    ...         return base_lr / 2 ** t
    """

    def __init__(self, optimizer: Any, last_epoch: int = -1) -> None:
        self.optimizer = optimizer
        groups = optimizer.param_groups
        if last_epoch == -1:
            for group in groups:
                group.setdefault("initial_lr", group["lr"])
        else:
            for i, group in enumerate(groups):
                if "initial_lr" not in group:
                    raise KeyError(f"param 'initial_lr' is not specified in param_groups[{i}] "
                                   "when resuming a schedule (last_epoch >= 0)")
        self.base_lrs = [group["initial_lr"] for group in groups]
        self.last_epoch = last_epoch
        self.step()

    def lr_at(self, base_lr: float, t: int) -> float:
        """Return the rate of step `t` for a group whose base rate is `base_lr`.

        Parameters
        ----------
        base_lr : float
            The group's base rate (``group["initial_lr"]``).
        t : int
            The step index, 0 for the rate the constructor applies.

        Returns
        -------
        float
            The learning rate.
        """
        raise NotImplementedError

    def _group_lrs(self, t):
        return [self.lr_at(base, t) for base in self.base_lrs]

    def step(self) -> None:
        """Advance one step and set every group's ``"lr"`` to its rate for that step."""
        self.last_epoch += 1
        lrs = self._group_lrs(self.last_epoch)
        for group, lr in zip(self.optimizer.param_groups, lrs):
            group["lr"] = lr
        self._last_lr = list(lrs)


def _check_positive_int(name, value):
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


class StepLR(LRScheduler):
    """Decay the rate by `gamma` every `step_size` steps (torch's StepLR).

    .. math:: \\eta_t = \\eta_0 \\, \\gamma^{\\lfloor t / s \\rfloor}

    Parameters
    ----------
    optimizer : Optimizer
        An optimizer with ``param_groups``.
    step_size : int
        The period `s` of the decay, in steps; a positive integer.
    gamma : float, default 0.1
        The factor applied every `step_size` steps.
    last_epoch : int, default -1
        The last step taken; -1 starts a new schedule (see `LRScheduler`).

    Raises
    ------
    ValueError
        If `step_size` is not a positive integer.

    Examples
    --------
    >>> import numpy as np, fusedopt as fo
    >>> opt = fo.SGD([np.zeros(3, np.float32)], lr=0.1)
    >>> sched = fo.schedules.StepLR(opt, step_size=2, gamma=0.5)
    >>> lrs = []
    >>> for _ in range(4):
    ...     lrs.append(opt.param_groups[0]["lr"])    # opt.step(grads) here
    ...     sched.step()
    >>> lrs
    [0.1, 0.1, 0.05, 0.05]
    """

    def __init__(self, optimizer: Any, step_size: int, gamma: float = 0.1,
                 last_epoch: int = -1) -> None:
        _check_positive_int("step_size", step_size)
        self.step_size, self.gamma = step_size, gamma
        super().__init__(optimizer, last_epoch)

    def lr_at(self, base_lr: float, t: int) -> float:
        return base_lr * self.gamma ** (t // self.step_size)


class ExponentialLR(LRScheduler):
    """Decay the rate by `gamma` every step (torch's ExponentialLR).

    .. math:: \\eta_t = \\eta_0 \\, \\gamma^t

    Parameters
    ----------
    optimizer : Optimizer
        An optimizer with ``param_groups``.
    gamma : float
        The factor applied every step.
    last_epoch : int, default -1
        The last step taken; -1 starts a new schedule (see `LRScheduler`).
    """

    def __init__(self, optimizer: Any, gamma: float, last_epoch: int = -1) -> None:
        self.gamma = gamma
        super().__init__(optimizer, last_epoch)

    def lr_at(self, base_lr: float, t: int) -> float:
        return base_lr * self.gamma ** t


def _cosine(start, end, frac):
    """From `start` (frac = 0) to `end` (frac = 1) along half a cosine."""
    return end + (start - end) * (1.0 + math.cos(math.pi * frac)) / 2.0


class CosineAnnealingLR(LRScheduler):
    """Anneal the rate along half a cosine (SGDR without restarts; torch's
    CosineAnnealingLR).

    .. math:: \\eta_t = \\eta_{min} + (\\eta_0 - \\eta_{min})
              \\frac{1 + \\cos(\\pi t / T_{max})}{2}

    As torch's, the curve goes on past `T_max`: it rises again towards the base rate
    over the next `T_max` steps.

    Parameters
    ----------
    optimizer : Optimizer
        An optimizer with ``param_groups``.
    T_max : int
        The number of steps from the base rate down to `eta_min`; a positive integer.
    eta_min : float, default 0.0
        The lowest rate.
    last_epoch : int, default -1
        The last step taken; -1 starts a new schedule (see `LRScheduler`).

    Raises
    ------
    ValueError
        If `T_max` is not a positive integer.
    """

    def __init__(self, optimizer: Any, T_max: int, eta_min: float = 0.0,
                 last_epoch: int = -1) -> None:
        _check_positive_int("T_max", T_max)
        self.T_max, self.eta_min = T_max, eta_min
        super().__init__(optimizer, last_epoch)

    def lr_at(self, base_lr: float, t: int) -> float:
        return _cosine(base_lr, self.eta_min, t / self.T_max)


class WarmupCosineLR(LRScheduler):
    """Linear warmup, then cosine annealing.

    Over the first `warmup_steps` steps the rate grows linearly from
    ``start_factor * base`` to ``base``; then it follows a cosine from ``base`` down to
    `eta_min`, reached at `total_steps`, and stays there. Up to `total_steps` these
    are the values of torch's ``SequentialLR([LinearLR(start_factor,
    total_iters=warmup_steps), CosineAnnealingLR(T_max=total_steps - warmup_steps,
    eta_min)], milestones=[warmup_steps])``.

    Parameters
    ----------
    optimizer : Optimizer
        An optimizer with ``param_groups``.
    warmup_steps : int
        Steps of linear warmup, >= 0.
    total_steps : int
        The step at which the rate reaches `eta_min`; more than `warmup_steps`.
    start_factor : float, default 0.01
        The first rate as a fraction of the base rate, in [0, 1].
    eta_min : float, default 0.0
        The final rate.
    last_epoch : int, default -1
        The last step taken; -1 starts a new schedule (see `LRScheduler`).

    Raises
    ------
    ValueError
        If `warmup_steps` is negative, `total_steps` is not more than it, or
        `start_factor` is outside [0, 1].

    Examples
    --------
    >>> import numpy as np, fusedopt as fo
    >>> opt = fo.AdamW([np.zeros(3, np.float32)], lr=1e-3)
    >>> sched = fo.schedules.WarmupCosineLR(opt, warmup_steps=100, total_steps=1000)
    >>> for _ in range(1000):
    ...     # opt.step(grads)
    ...     sched.step()
    """

    def __init__(self, optimizer: Any, warmup_steps: int, total_steps: int,
                 start_factor: float = 0.01, eta_min: float = 0.0,
                 last_epoch: int = -1) -> None:
        if not isinstance(warmup_steps, int) or isinstance(warmup_steps, bool) or warmup_steps < 0:
            raise ValueError(f"warmup_steps must be an integer >= 0, got {warmup_steps!r}")
        _check_positive_int("total_steps", total_steps)
        if total_steps <= warmup_steps:
            raise ValueError(f"total_steps ({total_steps}) must exceed warmup_steps "
                             f"({warmup_steps})")
        if not 0.0 <= start_factor <= 1.0:
            raise ValueError(f"start_factor must be in [0, 1], got {start_factor}")
        self.warmup_steps, self.total_steps = warmup_steps, total_steps
        self.start_factor, self.eta_min = start_factor, eta_min
        super().__init__(optimizer, last_epoch)

    def lr_at(self, base_lr: float, t: int) -> float:
        w = self.warmup_steps
        if t < w:
            return base_lr * (self.start_factor + (1.0 - self.start_factor) * t / w)
        frac = min(t - w, self.total_steps - w) / (self.total_steps - w)
        return _cosine(base_lr, self.eta_min, frac)


class OneCycleLR(LRScheduler):
    """The 1cycle policy (Smith & Topin, 2017), with torch.optim.lr_scheduler.OneCycleLR's
    arguments and values.

    The rate rises from ``max_lr / div_factor`` to `max_lr` over the first `pct_start`
    of `total_steps`, then falls to ``initial_lr / final_div_factor`` (with
    `three_phase`, it first falls back to the initial rate symmetrically, then to the
    minimum). With `cycle_momentum`, the momentum (``group["momentum"]``, or beta1 of
    ``group["betas"]``) moves the opposite way between `max_momentum` and
    `base_momentum`.

    Parameters
    ----------
    optimizer : Optimizer
        An optimizer with ``param_groups``.
    max_lr : float or sequence of float
        The peak rate, one value or one per group.
    total_steps : int, optional
        The length of the cycle; if None, ``epochs * steps_per_epoch``.
    epochs, steps_per_epoch : int, optional
        The alternative to `total_steps`.
    pct_start : float, default 0.3
        The fraction of the cycle spent rising.
    anneal_strategy : {"cos", "linear"}, default "cos"
        The shape of each phase.
    cycle_momentum : bool, default True
        Move the momentum (or beta1) against the rate.
    base_momentum, max_momentum : float or sequence of float, default 0.85, 0.95
        The momentum's range, one value or one per group.
    div_factor : float, default 25.0
        ``initial_lr = max_lr / div_factor``.
    final_div_factor : float, default 1e4
        ``min_lr = initial_lr / final_div_factor``.
    three_phase : bool, default False
        Fall back to the initial rate before the final descent.
    last_epoch : int, default -1
        The last step taken; -1 starts a new schedule (see `LRScheduler`).

    Raises
    ------
    ValueError
        On invalid arguments, as torch; and when stepped past `total_steps`.
    """

    def __init__(self, optimizer: Any, max_lr: _Number, total_steps: int | None = None,
                 epochs: int | None = None, steps_per_epoch: int | None = None,
                 pct_start: float = 0.3, anneal_strategy: str = "cos",
                 cycle_momentum: bool = True, base_momentum: _Number = 0.85,
                 max_momentum: _Number = 0.95, div_factor: float = 25.0,
                 final_div_factor: float = 1e4, three_phase: bool = False,
                 last_epoch: int = -1) -> None:
        if total_steps is None:
            if epochs is None or steps_per_epoch is None:
                raise ValueError("You must define either total_steps OR (epochs AND "
                                 "steps_per_epoch)")
            _check_positive_int("epochs", epochs)
            _check_positive_int("steps_per_epoch", steps_per_epoch)
            total_steps = epochs * steps_per_epoch
        _check_positive_int("total_steps", total_steps)
        if not 0.0 <= pct_start <= 1.0:
            raise ValueError(f"Expected float between 0 and 1 pct_start, but got {pct_start}")
        if anneal_strategy not in ("cos", "linear"):
            raise ValueError(f"anneal_strategy must be one of 'cos' or 'linear', got "
                             f"{anneal_strategy!r}")
        groups = optimizer.param_groups
        self.total_steps = total_steps
        self.anneal_strategy = anneal_strategy
        if three_phase:
            self.phases = [(pct_start * total_steps - 1, "initial_lr", "max_lr", "max_momentum",
                            "base_momentum"),
                           (2 * pct_start * total_steps - 2, "max_lr", "initial_lr",
                            "base_momentum", "max_momentum"),
                           (total_steps - 1, "initial_lr", "min_lr", "max_momentum",
                            "max_momentum")]
        else:
            self.phases = [(pct_start * total_steps - 1, "initial_lr", "max_lr", "max_momentum",
                            "base_momentum"),
                           (total_steps - 1, "max_lr", "min_lr", "base_momentum",
                            "max_momentum")]
        max_lrs = _per_group("max_lr", max_lr, groups)
        if last_epoch == -1:
            for group, top in zip(groups, max_lrs):
                group["initial_lr"] = top / div_factor
                group["max_lr"] = top
                group["min_lr"] = group["initial_lr"] / final_div_factor
        self.cycle_momentum = cycle_momentum
        if cycle_momentum:
            if all("betas" in g for g in groups):
                self.use_beta1 = True
            elif all("momentum" in g for g in groups):
                self.use_beta1 = False
            else:
                raise ValueError("optimizer must support momentum or beta1 with "
                                 "`cycle_momentum` option enabled")
            tops = _per_group("max_momentum", max_momentum, groups)
            bases = _per_group("base_momentum", base_momentum, groups)
            if last_epoch == -1:
                for group, top, base in zip(groups, tops, bases):
                    self._set_momentum(group, top)
                    group["max_momentum"], group["base_momentum"] = top, base
        super().__init__(optimizer, last_epoch)

    def _set_momentum(self, group, value):
        if self.use_beta1:
            group["betas"] = (value, *tuple(group["betas"])[1:])
        else:
            group["momentum"] = value

    def _anneal(self, start, end, frac):
        if self.anneal_strategy == "cos":
            return _cosine(start, end, frac)
        return start + (end - start) * frac

    def _position(self, group, t):
        """(rate, momentum) of step t for one group."""
        begin = 0.0
        for i, (end, lr0, lr1, m0, m1) in enumerate(self.phases):
            if t <= end or i == len(self.phases) - 1:
                frac = (t - begin) / (end - begin)
                momentum = self._anneal(group[m0], group[m1], frac) if self.cycle_momentum \
                    else None
                return self._anneal(group[lr0], group[lr1], frac), momentum
            begin = end
        raise AssertionError("unreachable")

    def _group_lrs(self, t):
        if t > self.total_steps:
            raise ValueError(f"Tried to step {t} times. The specified number of total steps "
                             f"is {self.total_steps}")
        lrs = []
        for group in self.optimizer.param_groups:
            lr, momentum = self._position(group, t)
            if momentum is not None:
                self._set_momentum(group, momentum)
            lrs.append(lr)
        return lrs


def _per_group(name, value, groups):
    if isinstance(value, (list, tuple)):
        if len(value) != len(groups):
            raise ValueError(f"expected {len(groups)} values for {name}, got {len(value)}")
        return list(value)
    return [value] * len(groups)


class ReduceLROnPlateau(_LastLR):
    """Multiply the rates by `factor` when a metric has stopped improving (torch's
    ReduceLROnPlateau).

    Each `step` records one value of the metric. After more than `patience` steps
    without improvement, every group's rate is multiplied by `factor` (not below its
    `min_lr`, and not changed by less than `eps`), then `cooldown` steps pass before
    bad steps count again.

    Parameters
    ----------
    optimizer : Optimizer
        An optimizer with ``param_groups``.
    mode : {"min", "max"}, default "min"
        Whether the metric should fall (a loss) or rise (an accuracy).
    factor : float, default 0.1
        The factor applied to the rates, < 1.
    patience : int, default 10
        Steps without improvement tolerated before the rates drop.
    threshold : float, default 1e-4
        The least change that counts as an improvement.
    threshold_mode : {"rel", "abs"}, default "rel"
        Relative (``best * (1 - threshold)`` in min mode) or absolute
        (``best - threshold``) improvement.
    cooldown : int, default 0
        Steps to wait after a drop before counting bad steps again.
    min_lr : float or sequence of float, default 0.0
        The lowest rate, one value or one per group.
    eps : float, default 1e-8
        A change of a rate smaller than this is not made.

    Raises
    ------
    ValueError
        If `factor` >= 1 or a mode is unknown.

    Examples
    --------
    >>> import numpy as np, fusedopt as fo
    >>> opt = fo.SGD([np.zeros(3, np.float32)], lr=0.1)
    >>> sched = fo.schedules.ReduceLROnPlateau(opt, patience=2)
    >>> for loss in [1.0, 0.9, 0.9, 0.9, 0.9]:
    ...     sched.step(loss)
    >>> sched.get_last_lr()
    [0.010000000000000002]
    """

    def __init__(self, optimizer: Any, mode: str = "min", factor: float = 0.1,
                 patience: int = 10, threshold: float = 1e-4, threshold_mode: str = "rel",
                 cooldown: int = 0, min_lr: _Number = 0.0, eps: float = 1e-8) -> None:
        if factor >= 1.0:
            raise ValueError("Factor should be < 1.0.")
        if mode not in ("min", "max"):
            raise ValueError(f"mode {mode!r} is unknown (min or max)")
        if threshold_mode not in ("rel", "abs"):
            raise ValueError(f"threshold mode {threshold_mode!r} is unknown (rel or abs)")
        self.optimizer = optimizer
        self.min_lrs = _per_group("min_lr", min_lr, optimizer.param_groups)
        self.mode, self.factor, self.patience = mode, factor, patience
        self.threshold, self.threshold_mode = threshold, threshold_mode
        self.cooldown, self.eps = cooldown, eps
        self.best = math.inf if mode == "min" else -math.inf
        self.num_bad_epochs = 0
        self.cooldown_counter = 0
        self.last_epoch = 0
        self._last_lr = [group["lr"] for group in optimizer.param_groups]

    def _improves(self, value):
        if self.mode == "min":
            bar = self.best * (1.0 - self.threshold) if self.threshold_mode == "rel" \
                else self.best - self.threshold
            return value < bar
        bar = self.best * (1.0 + self.threshold) if self.threshold_mode == "rel" \
            else self.best + self.threshold
        return value > bar

    def step(self, metric: float) -> None:
        """Record one value of the monitored metric; lower the rates if it has stalled.

        Parameters
        ----------
        metric : float
            The metric's value this step (a float, or anything ``float()`` takes).
        """
        value = float(metric)
        self.last_epoch += 1
        if self._improves(value):
            self.best, self.num_bad_epochs = value, 0
        else:
            self.num_bad_epochs += 1
        if self.cooldown_counter > 0:
            self.cooldown_counter -= 1
            self.num_bad_epochs = 0
        if self.num_bad_epochs > self.patience:
            for group, floor in zip(self.optimizer.param_groups, self.min_lrs):
                old = float(group["lr"])
                new = max(old * self.factor, floor)
                if old - new > self.eps:
                    group["lr"] = new
            self.cooldown_counter = self.cooldown
            self.num_bad_epochs = 0
        self._last_lr = [group["lr"] for group in self.optimizer.param_groups]
