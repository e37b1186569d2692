"""K optimizer settings stepped in one fused call: hyperparameter search and ensembles.

Each parameter is stored as K stacked copies, an array of shape (K, *shape): member k
owns the slices `param[k]`. A batched optimizer updates every member of every parameter
in ONE kernel call, each member with its own hyperparameters (the CPU kernels take a
table of one hyperparameter row per tensor), instead of K optimizer calls:

    params = [np.stack([w0] * 16), np.stack([b0] * 16)]        # 16 members
    opt = fo.batched.BatchedAdamW(params, lr=np.logspace(-4, -1, 16), weight_decay=1e-2)
    opt.step(grads)              # grads: stacked like the params, one slice per member

A hyperparameter is either one value for all members or a sequence of K values
(`betas`: one pair, or K pairs). `opt.param_groups[k]` is member k's group (its params
are the slices): the schedules of `fusedopt.schedules` drive every member from its own
base rate. The algorithms are torch.optim's SGD (momentum, dampening, Nesterov) and
Adam / AdamW (per member even the kind of weight decay), plus an optional L1 term
(`l1`, a proximal soft-threshold after each step; see `fusedopt.transfer.prox_l1_`).

On top: `grid`, `sample` and `search` (train K members of a small model in lockstep and
rank them), `grid_search`, `random_search`, and `bayesian_search` (Optuna, optional).
An ensemble is a batched optimizer whose members share the hyperparameters and differ
in their initialization; its prediction is the mean of the members'.

The params of one batched optimizer share one float dtype. Arrays on a GPU are stepped
with one fused call per member (the CUDA kernels take one hyperparameter row per call).
"""

from __future__ import annotations

import itertools
import math
import threading
from dataclasses import dataclass, field

import numpy as np

from . import _cpu
from . import functional as F
from .optimizer import check, check_number, serialized
from .transfer import prox_l1_

__all__ = ["BatchedSGD", "BatchedAdam", "BatchedAdamW", "stack", "grid", "sample", "uniform",
           "loguniform", "choice", "search", "grid_search", "random_search", "bayesian_search",
           "SearchResult"]


def stack(arrays, members):
    """`members` stacked copies of each array: the params of a batched optimizer."""
    return [np.ascontiguousarray(np.broadcast_to(a, (members, *np.shape(a)))) for a in arrays]


def _slices(a, members):
    """The member slices of a stacked array, as arrays (0-d views for 1-d stacks)."""
    if a.ndim > 1:
        return list(a)
    return [a[k, ...] for k in range(members)]


class _Batched:
    """Shared machinery: members, per-member groups, the hyperparameter table, state."""

    op = "batched"
    defaults: dict = {}
    per_member: tuple = ()  # hyperparameters that may differ between members

    def __init__(self, params, **hyper):
        if isinstance(params, np.ndarray) or not isinstance(params, (list, tuple)):
            raise TypeError(f"{self.op}: params must be a list of stacked arrays")
        params = list(params)
        if not params:
            raise ValueError(f"{self.op}: got an empty parameter list")
        members = None
        for i, p in enumerate(params):
            shape = getattr(p, "shape", None)
            if shape is None:
                raise TypeError(f"{self.op}: params[{i}] is not an array (got "
                                f"{type(p).__name__})")
            if len(shape) == 0:
                raise ValueError(f"{self.op}: params[{i}] is 0-d; stacked params have the "
                                 "members on their first axis")
            members = shape[0] if members is None else members
            if shape[0] != members:
                raise ValueError(f"{self.op}: params[{i}] stacks {shape[0]} members, "
                                 f"params[0] stacks {members}")
            if p.dtype != params[0].dtype:
                raise TypeError(f"{self.op}: params[{i}] has dtype {p.dtype}, params[0] has "
                                f"{params[0].dtype}; the params of a batched optimizer share "
                                "one dtype")
        if members == 0:
            raise ValueError(f"{self.op}: params stack no members")
        self.members = members
        self.params = params
        self.defaults = dict(self.defaults)
        unknown = set(hyper) - set(self.defaults)
        if unknown:
            raise TypeError(f"{self.op}: unknown hyperparameters {sorted(unknown)}")
        self.defaults.update(hyper)
        per = {name: self._per_member_values(name, value) for name, value in self.defaults.items()}
        self.param_groups = []
        for k in range(members):
            group = {name: values[k] for name, values in per.items()}
            group["params"] = [_slices(p, members)[k] for p in params]
            self._validate_group(group, k)
            self.param_groups.append(group)
        self.state = {}
        self._views = {}
        self._step_lock = threading.Lock()
        self._check_kernels()

    def __getstate__(self):
        state = self.__dict__.copy()
        state.pop("_step_lock", None)  # a lock is not state: copies get their own
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._step_lock = threading.Lock()

    def _per_member_values(self, name, value):
        k = self.members
        if name == "betas":
            if len(value) == k and all(isinstance(v, (tuple, list, np.ndarray)) for v in value):
                return [tuple(float(x) for x in v) for v in value]
            return [tuple(value)] * k
        if name in self.per_member and isinstance(value, (list, tuple, np.ndarray)):
            if len(value) != k:
                raise ValueError(f"{self.op}: {name} has {len(value)} values for {k} members")
            return [v.item() if hasattr(v, "item") else v for v in value]
        if isinstance(value, (list, tuple, np.ndarray)):
            raise ValueError(f"{self.op}: {name} is one value for all members")
        return [value] * k

    def __repr__(self):
        return f"{type(self).__name__}({self.members} members, {len(self.params)} params)"

    # --- subclass interface ---------------------------------------------------------------

    def _validate_group(self, group, k):
        raise NotImplementedError

    def _kernel(self):
        """(kernel name, state names) of the next step."""
        raise NotImplementedError

    def _row(self, group, step, fresh):
        """The kernel's hyperparameter row of one member."""
        raise NotImplementedError

    def _check_kernels(self):
        kernel, _ = self._kernel()
        want = _cpu.hyper_size(kernel)
        row = self._row(self.param_groups[0], 1, True)
        if len(row) != want:  # the rule's Hyper struct changed: fill the rows anew
            raise AssertionError(f"{self.op}: {kernel} takes {want} hyperparameters, the "
                                 f"batched optimizer fills {len(row)}")

    # --- stepping ---------------------------------------------------------------------------

    def _member_major(self, key, arrays, active):
        """[a_j[k] for k in members for j in active], cached for arrays we own."""
        if key is not None:
            hit = self._views.get(key)
            if hit is not None and hit[0] is arrays:
                return hit[1]
        per_param = [_slices(arrays[j], self.members) for j in active]
        out = [s for member in zip(*per_param) for s in member]
        if key is not None:
            self._views[key] = (arrays, out)
        return out

    @serialized
    def step(self, grads):
        """One update of every member of every param with a gradient (stacked like the
        params); a None gradient skips its param for all members."""
        if not isinstance(grads, (list, tuple)):
            raise TypeError(f"{self.op}: grads must be a list of stacked arrays, got "
                            f"{type(grads).__name__}")
        if len(grads) != len(self.params):
            raise ValueError(f"{self.op}: got {len(grads)} grads for {len(self.params)} params")
        active = tuple(j for j, g in enumerate(grads) if g is not None)
        for j in active:
            if tuple(getattr(grads[j], "shape", ())) != tuple(self.params[j].shape):
                raise ValueError(f"{self.op}: grads[{j}] has shape "
                                 f"{tuple(getattr(grads[j], 'shape', ()))}, params[{j}] has "
                                 f"{tuple(self.params[j].shape)}")
        if not active:
            return
        kernel, names = self._kernel()
        created = {name: [np.zeros_like(p) for p in self.params]
                   for name in names if name not in self.state}
        fresh = bool(created)
        states = {**{n: self.state[n] for n in names if n in self.state}, **created}
        step = int(self.state.get("step", 0)) + 1
        flat_p = self._member_major(("params", active), self.params, active)
        flat_g = self._member_major(None, grads, active)
        flat_s = [self._member_major((name, active) if name not in created else None,
                                     states[name], active) for name in names]
        rows = [self._row(group, step, fresh) for group in self.param_groups]
        plans = self._plans(kernel, names, flat_p, flat_g, flat_s, rows, len(active), step)
        # every member validated: create the state, run, then count the step
        self.state.update(created)
        for plan in plans:
            plan.run()
        self.state["step"] = step
        self._proximal(active)

    @staticmethod
    def _one_call(array):
        """Whether the kernels for this array take a hyperparameter row per tensor (the
        CPU kernels do; the CUDA kernels take one row per call)."""
        return type(array) is np.ndarray

    def _plans(self, kernel, names, flat_p, flat_g, flat_s, rows, m, step):
        if self._one_call(flat_p[0]):  # one call, one row per tensor
            table = np.repeat(np.asarray(rows, dtype=np.float64), m, axis=0).ravel()
            return [F._run(self.op, kernel, flat_p, flat_g, flat_s, names, table, None, True,
                           step)]
        plans = []  # one call per member, each validated before any runs
        for k, row in enumerate(rows):
            sl = slice(k * m, (k + 1) * m)
            plans.append(F._run(self.op, kernel, flat_p[sl], flat_g[sl], [s[sl] for s in flat_s],
                                names, np.asarray(row, dtype=np.float64), None, True, step))
        return plans

    def _proximal(self, active):
        l1 = np.array([g.get("l1", 0.0) * g["lr"] for g in self.param_groups])
        if not l1.any():
            return
        for j in active:
            p = self.params[j]
            prox_l1_([p], l1.reshape((-1,) + (1,) * (p.ndim - 1)))

    # --- state dicts ------------------------------------------------------------------------

    def state_dict(self):
        state = {k: ([a.copy() for a in v] if isinstance(v, list) else v)
                 for k, v in self.state.items()}
        groups = [{k: v for k, v in g.items() if k != "params"} for g in self.param_groups]
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, state_dict):
        """Restore state and per-member hyperparameters; ValueError on any mismatch
        (member count, shapes, dtypes), keeping the current state."""
        groups = state_dict["param_groups"]
        if len(groups) != self.members:
            raise ValueError(f"loaded state dict has {len(groups)} members, the optimizer has "
                             f"{self.members}")
        new_groups = []
        for k, (mine, saved) in enumerate(zip(self.param_groups, groups)):
            group = dict(mine)
            group.update({key: v for key, v in saved.items() if key != "params"})
            self._validate_group(group, k)
            new_groups.append(group)
        new_state = {}
        for name, value in state_dict["state"].items():
            if name == "step":
                new_state[name] = int(value)
                continue
            if not isinstance(value, (list, tuple)) or len(value) != len(self.params):
                raise ValueError(f"loaded {name} must be a list of {len(self.params)} arrays")
            copies = []
            for j, (a, p) in enumerate(zip(value, self.params)):
                if tuple(getattr(a, "shape", ())) != tuple(p.shape):
                    raise ValueError(f"loaded {name}[{j}] has shape "
                                     f"{tuple(getattr(a, 'shape', ()))}, params[{j}] has "
                                     f"{tuple(p.shape)}")
                if getattr(a, "dtype", None) != p.dtype:
                    raise ValueError(f"loaded {name}[{j}] has dtype {getattr(a, 'dtype', None)}, "
                                     f"params[{j}] has {p.dtype}")
                out = np.zeros_like(p)
                out[...] = a
                copies.append(out)
            new_state[name] = copies
        self.param_groups[:] = new_groups
        self.state = new_state
        self._views.clear()


def _check_common(group, k):
    where = f" (member {k})"
    check_number("learning rate" + where, group["lr"], 0.0)
    check_number("weight_decay value" + where, group["weight_decay"], 0.0)
    check_number("l1 value" + where, group["l1"], 0.0)


class BatchedSGD(_Batched):
    """SGD for K members (torch.optim.SGD's math per member). Members with momentum 0
    take plain SGD steps inside the same momentum kernel call."""

    op = "BatchedSGD"
    defaults = dict(lr=1e-3, momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False,
                    maximize=False, l1=0.0)
    per_member = ("lr", "momentum", "dampening", "weight_decay", "nesterov", "maximize", "l1")

    def _validate_group(self, g, k):
        _check_common(g, k)
        check_number(f"momentum value (member {k})", g["momentum"], 0.0)
        check_number(f"dampening value (member {k})", g["dampening"])
        check(not g["nesterov"] or (g["momentum"] > 0 and g["dampening"] == 0),
              f"Nesterov momentum requires a momentum and zero dampening (member {k})")

    def _kernel(self):
        if any(g["momentum"] != 0 for g in self.param_groups) or "momentum_buffer" in self.state:
            return "sgd_momentum", ["momentum_buffer"]
        return "sgd", []

    def _row(self, g, step, fresh):
        mom = g["momentum"] != 0
        return [g["lr"], g["momentum"], g["dampening"] if mom else 0.0, g["weight_decay"],
                float(bool(g["nesterov"]) and mom), float(bool(g["maximize"])), float(fresh)]


class BatchedAdam(_Batched):
    """Adam for K members (torch.optim.Adam's math per member). `decoupled_weight_decay`
    (per member) makes a member AdamW; `amsgrad` is shared by all members."""

    op = "BatchedAdam"
    defaults = dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, amsgrad=False,
                    maximize=False, decoupled_weight_decay=False, l1=0.0)
    per_member = ("lr", "betas", "eps", "weight_decay", "maximize", "decoupled_weight_decay",
                  "l1")

    def _validate_group(self, g, k):
        _check_common(g, k)
        check_number(f"epsilon value (member {k})", g["eps"], 0.0)
        betas = g["betas"]
        check(len(betas) == 2, f"Invalid betas: {betas!r} (member {k})")
        check_number(f"beta parameter at index 0 (member {k})", betas[0], 0.0, 1.0,
                     high_open=True)
        check_number(f"beta parameter at index 1 (member {k})", betas[1], 0.0, 1.0,
                     high_open=True)
        check(g["amsgrad"] == self.defaults["amsgrad"], "amsgrad is shared by all members")

    def _kernel(self):
        if self.defaults["amsgrad"]:
            return "adam_amsgrad", ["exp_avg", "exp_avg_sq", "max_exp_avg_sq"]
        return "adam", ["exp_avg", "exp_avg_sq"]

    def _row(self, g, step, fresh):
        beta1, beta2 = g["betas"]
        lr, wd = g["lr"], g["weight_decay"]
        l2, shrink = (0.0, 1.0 - lr * wd) if g["decoupled_weight_decay"] else (wd, 1.0)
        # step_size and inv_bc2_sqrt (0 here) are filled from the step count by the rule
        return [lr, beta1, beta2, g["eps"], l2, shrink, 0.0, 0.0, float(bool(g["maximize"]))]


class BatchedAdamW(BatchedAdam):
    """AdamW for K members: BatchedAdam with decoupled weight decay, default 1e-2."""

    op = "BatchedAdamW"
    defaults = dict(BatchedAdam.defaults, weight_decay=1e-2, decoupled_weight_decay=True)


OPTIMIZERS = {"sgd": BatchedSGD, "adam": BatchedAdam, "adamw": BatchedAdamW}


# --- search spaces ----------------------------------------------------------------------------

def grid(**axes):
    """Every combination of the given values: grid(lr=[1e-3, 1e-2], momentum=[0, 0.9])
    gives 4 settings (dicts), the last axis varying fastest."""
    names = list(axes)
    return [dict(zip(names, combo)) for combo in itertools.product(*(axes[n] for n in names))]


@dataclass(frozen=True)
class uniform:
    low: float
    high: float

    def draw(self, rng):
        return float(rng.uniform(self.low, self.high))


@dataclass(frozen=True)
class loguniform:
    low: float
    high: float

    def draw(self, rng):
        return float(math.exp(rng.uniform(math.log(self.low), math.log(self.high))))


@dataclass(frozen=True)
class choice:
    values: tuple

    def draw(self, rng):
        return self.values[int(rng.integers(len(self.values)))]


def sample(n, seed=None, **space):
    """n random settings: each value of `space` is a distribution (`uniform`,
    `loguniform`, `choice`) or a constant."""
    rng = np.random.default_rng(seed)
    return [{name: (d.draw(rng) if hasattr(d, "draw") else d) for name, d in space.items()}
            for _ in range(n)]


# --- lockstep training and ranking ------------------------------------------------------------

@dataclass
class SearchResult:
    """The settings tried, their scores (lower is better unless mode="max"), the best
    one and the trained stacked params (member k trained with settings[k])."""

    settings: list
    scores: np.ndarray
    best_index: int
    params: list = field(repr=False)
    losses: np.ndarray = field(repr=False, default=None)

    @property
    def best(self):
        return self.settings[self.best_index]

    @property
    def best_score(self):
        return float(self.scores[self.best_index])


def search(settings, init, loss_and_grads, score, *, steps, optimizer="adam", mode="min",
           **fixed):
    """Train one member per setting, all in lockstep, and rank them.

    init(K) -> stacked params for K members; loss_and_grads(params, t) -> (losses of
    shape (K,), stacked grads) at step t; score(params) -> (K,) scores of the trained
    members (e.g. validation loss). `optimizer` is "sgd", "adam", "adamw" or a batched
    optimizer class; `fixed` hyperparameters apply to every member. A score that is not
    finite ranks last. Every step of all members is one fused optimizer call."""
    settings = [dict(s) for s in settings]
    if not settings:
        raise ValueError("search: no settings to try")
    names = set().union(*settings)
    missing = [n for n in names if any(n not in s for s in settings)]
    if missing:
        raise ValueError(f"search: settings differ in their keys ({sorted(missing)})")
    cls = OPTIMIZERS[optimizer] if isinstance(optimizer, str) else optimizer
    params = init(len(settings))
    hyper = {n: [s[n] for s in settings] for n in names}
    opt = cls(params, **fixed, **hyper)
    losses = np.empty((steps, len(settings)))
    for t in range(steps):
        loss, grads = loss_and_grads(params, t)
        losses[t] = loss
        opt.step(grads)
    scores = np.asarray(score(params), dtype=np.float64)
    if mode not in ("min", "max"):
        raise ValueError(f"search: mode must be 'min' or 'max', got {mode!r}")
    ranked = np.where(np.isfinite(scores), scores if mode == "min" else -scores, np.inf)
    return SearchResult(settings, scores, int(np.argmin(ranked)), params, losses)


def grid_search(axes, init, loss_and_grads, score, *, steps, optimizer="adam", mode="min",
                **fixed):
    """`search` over every combination of `axes` (a dict of lists of values)."""
    return search(grid(**axes), init, loss_and_grads, score, steps=steps, optimizer=optimizer,
                  mode=mode, **fixed)


def random_search(space, n, init, loss_and_grads, score, *, steps, seed=None, optimizer="adam",
                  mode="min", **fixed):
    """`search` over n settings drawn from `space` (see `sample`)."""
    return search(sample(n, seed, **space), init, loss_and_grads, score, steps=steps,
                  optimizer=optimizer, mode=mode, **fixed)


def bayesian_search(suggest, evaluate, *, members, rounds, study=None, direction="minimize"):
    """Bayesian optimization with Optuna, K trials at a time (needs `optuna`).

    Each round asks the study for `members` trials, turns each into a setting with
    `suggest(trial)` (e.g. {"lr": trial.suggest_float("lr", 1e-4, 1, log=True)}), scores
    all of them with one lockstep run, `evaluate(settings)` -> K scores (e.g. a `search`'s
    `.scores`), and tells the study. Returns the study (`study.best_params`)."""
    import optuna

    if study is None:
        study = optuna.create_study(direction=direction)
    for _ in range(rounds):
        trials = [study.ask() for _ in range(members)]
        scores = np.asarray(evaluate([suggest(t) for t in trials]), dtype=np.float64)
        if scores.shape != (members,):
            raise ValueError(f"bayesian_search: evaluate returned shape {scores.shape}, "
                             f"expected ({members},)")
        for trial, value in zip(trials, scores):
            if np.isfinite(value):
                study.tell(trial, float(value))
            else:
                study.tell(trial, state=optuna.trial.TrialState.FAIL)
    return study
