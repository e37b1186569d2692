"""Learning-rate schedules that work with every fusedopt optimizer.

A schedule sets `group["lr"]` on `optimizer.param_groups`, as torch.optim.lr_scheduler
does, so it drives any optimizer that reads its learning rate from there: the classic
family, `LBFGS`, `Newton`, and the batched optimizers of `fusedopt.batched` (one group
per member: each member follows the schedule from its own base rate).

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

__all__ = ["LRScheduler", "StepLR", "ExponentialLR", "CosineAnnealingLR", "WarmupCosineLR",
           "OneCycleLR", "ReduceLROnPlateau"]


class _LastLR:
    """What every schedule keeps: the last rates it set, and a state dict of itself."""

    def get_last_lr(self):
        """The rates set by the last `step` (or the constructor), one per group."""
        return list(self._last_lr)

    def state_dict(self):
        return {k: v for k, v in self.__dict__.items() if k != "optimizer"}

    def load_state_dict(self, state_dict):
        self.__dict__.update(state_dict)


class LRScheduler(_LastLR):
    """Base class: subclasses define `lr_at(base_lr, t)` for step t >= 0."""

    def __init__(self, optimizer, last_epoch=-1):
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

    def lr_at(self, base_lr, t):
        raise NotImplementedError

    def _group_lrs(self, t):
        return [self.lr_at(base, t) for base in self.base_lrs]

    def step(self):
        """Advance one step and set every group's rate."""
        self.last_epoch += 1
        lrs = self._group_lrs(self.last_epoch)
        for group, lr in zip(self.optimizer.param_groups, lrs):
            group["lr"] = lr
        self._last_lr = list(lrs)


def _check_positive_int(name, value):
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


class StepLR(LRScheduler):
    """lr = base * gamma ** (t // step_size)."""

    def __init__(self, optimizer, step_size, gamma=0.1, last_epoch=-1):
        _check_positive_int("step_size", step_size)
        self.step_size, self.gamma = step_size, gamma
        super().__init__(optimizer, last_epoch)

    def lr_at(self, base_lr, t):
        return base_lr * self.gamma ** (t // self.step_size)


class ExponentialLR(LRScheduler):
    """lr = base * gamma ** t."""

    def __init__(self, optimizer, gamma, last_epoch=-1):
        self.gamma = gamma
        super().__init__(optimizer, last_epoch)

    def lr_at(self, base_lr, t):
        return base_lr * self.gamma ** t


def _cosine(start, end, frac):
    """From `start` (frac = 0) to `end` (frac = 1) along half a cosine."""
    return end + (start - end) * (1.0 + math.cos(math.pi * frac)) / 2.0


class CosineAnnealingLR(LRScheduler):
    """lr = eta_min + (base - eta_min) (1 + cos(pi t / T_max)) / 2 (SGDR without restarts).

    As torch's, the curve goes on past T_max: it rises again towards base over the next
    T_max steps."""

    def __init__(self, optimizer, T_max, eta_min=0.0, last_epoch=-1):
        _check_positive_int("T_max", T_max)
        self.T_max, self.eta_min = T_max, eta_min
        super().__init__(optimizer, last_epoch)

    def lr_at(self, base_lr, t):
        return _cosine(base_lr, self.eta_min, t / self.T_max)


class WarmupCosineLR(LRScheduler):
    """Linear warmup, then cosine annealing.

    Over the first `warmup_steps` steps the rate grows linearly from
    `start_factor * base` to `base`; then it follows a cosine from `base` down to
    `eta_min`, reached at `total_steps`, and stays there. Up to `total_steps` these
    are the values of torch's SequentialLR([LinearLR(start_factor, total_iters=
    warmup_steps), CosineAnnealingLR(T_max=total_steps - warmup_steps, eta_min)],
    milestones=[warmup_steps])."""

    def __init__(self, optimizer, warmup_steps, total_steps, start_factor=0.01, eta_min=0.0,
                 last_epoch=-1):
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

    def lr_at(self, base_lr, t):
        w = self.warmup_steps
        if t < w:
            return base_lr * (self.start_factor + (1.0 - self.start_factor) * t / w)
        frac = min(t - w, self.total_steps - w) / (self.total_steps - w)
        return _cosine(base_lr, self.eta_min, frac)


class OneCycleLR(LRScheduler):
    """The 1cycle policy (Smith & Topin, 2017), with torch.optim.lr_scheduler.OneCycleLR's
    arguments and values.

    The rate rises from max_lr / div_factor to max_lr over the first pct_start of
    `total_steps`, then falls to initial_lr / final_div_factor (with `three_phase`,
    it first falls back to the initial rate symmetrically, then to the minimum). With
    `cycle_momentum`, the momentum (group["momentum"], or beta1 of group["betas"])
    moves the opposite way between max_momentum and base_momentum. Stepping past
    `total_steps` raises ValueError, as in torch."""

    def __init__(self, optimizer, max_lr, total_steps=None, epochs=None, steps_per_epoch=None,
                 pct_start=0.3, anneal_strategy="cos", cycle_momentum=True, base_momentum=0.85,
                 max_momentum=0.95, div_factor=25.0, final_div_factor=1e4, three_phase=False,
                 last_epoch=-1):
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
    """Multiply the rates by `factor` when a metric has stopped improving for more than
    `patience` steps (torch's arguments and rules: relative or absolute threshold,
    cooldown, per-group min_lr, and no change smaller than eps)."""

    def __init__(self, optimizer, mode="min", factor=0.1, patience=10, threshold=1e-4,
                 threshold_mode="rel", cooldown=0, min_lr=0.0, eps=1e-8):
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

    def step(self, metric):
        """Record one value of the monitored metric; lower the rates if it has stalled."""
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
