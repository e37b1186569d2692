"""K optimizer settings stepped in one fused call: hyperparameter search and ensembles.

Each parameter is stored as K stacked copies, an array of shape ``(K, *shape)``: member k
owns the slices `param[k]`. A batched optimizer updates every member of every parameter
in ONE kernel call, each member with its own hyperparameters (the CPU kernels take a
table of one hyperparameter row per tensor), instead of K optimizer calls:

    params = [np.stack([w0] * 16), np.stack([b0] * 16)]        # 16 members
    opt = fo.batched.BatchedAdamW(params, lr=np.logspace(-4, -1, 16), weight_decay=1e-2)
    opt.step(grads)              # grads: stacked like the params, one slice per member

A hyperparameter is either one value for all members or a sequence of K values
(`betas`: one pair, or K pairs). `opt.param_groups[k]` is member k's group (its params
are the slices): the schedules of `fusedopt.schedules` drive every member from its own
base rate. The algorithms are those of the table (`fusedopt.algorithms`): torch.optim's
SGD (momentum, dampening, Nesterov), Adam / AdamW (per member even the kind of weight
decay) and the rest of the classic family, Lion, LAMB and LARS (their trust ratios per
member and tensor), but not schedule-free AdamW, whose per-group bookkeeping and
train/eval modes have no batched form; plus an optional L1 term
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

from . import _engine
from .algorithms import REQUIRED, SPECS, pack
from .algorithms._spec import check_number
from .transfer import prox_l1_

__all__ = ["stack", "grid", "sample", "uniform",
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
    """Shared machinery over an algorithm's spec: members, per-member groups, the
    hyperparameter table, state."""

    spec = None
    op = "batched"
    defaults: dict = {}

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
        missing = [name for name, value in self.defaults.items() if value is REQUIRED]
        if missing:
            raise TypeError(f"{self.op}: missing required hyperparameter {missing[0]!r}")
        per = {name: self._per_member_values(name, value) for name, value in self.defaults.items()}
        self.param_groups = []
        for k in range(members):
            group = {name: values[k] for name, values in per.items()}
            group["params"] = [_slices(p, members)[k] for p in params]
            self._validate_group(group, k)
            self.param_groups.append(group)
        self.state = {}
        self._views = {}
        self._lock = threading.Lock()
        if self.spec.eager_state:
            kernel, names, _ = self._kernel()
            self.state.update(self._new_state(names))

    def __getstate__(self):
        state = self.__dict__.copy()
        state.pop("_lock", None)  # a lock is not state: copies get their own
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def _per_member_values(self, name, value):
        k = self.members
        default = self.defaults_of_spec().get(name)
        if isinstance(default, tuple):  # betas: one pair, or K pairs
            if len(value) == k and all(isinstance(v, (tuple, list, np.ndarray)) for v in value):
                return [tuple(float(x) for x in v) for v in value]
            return [tuple(value)] * k
        if isinstance(value, (list, tuple, np.ndarray)):
            if name in self.spec.batch_shared:
                raise ValueError(f"{self.op}: {name} is one value for all members")
            if len(value) != k:
                raise ValueError(f"{self.op}: {name} has {len(value)} values for {k} members")
            return [v.item() if hasattr(v, "item") else v for v in value]
        return [value] * k

    @classmethod
    def defaults_of_spec(cls):
        return cls.spec.group_defaults()

    def __repr__(self):
        return f"{type(self).__name__}({self.members} members, {len(self.params)} params)"

    def _validate_group(self, group, k):
        try:
            self.spec.validate(group)
            check_number("l1 value", group["l1"], 0.0)
        except ValueError as e:
            raise ValueError(f"{e} (member {k})") from None
        for name in self.spec.batch_shared:
            if group[name] != self.defaults[name]:
                raise ValueError(f"{self.op}: {name} is shared by all members")

    def _kernel(self):
        """(kernel, state names, op keywords per member) of the next step."""
        kws = [self.spec.to_op(g) for g in self.param_groups]
        kernel, names, kws = self.spec.batch_kernel(kws, set(self.state))
        return kernel, names, kws

    def _new_state(self, names):
        out = {}
        for name in names:
            bufs = [np.zeros_like(p) for p in self.params]
            for k, group in enumerate(self.param_groups):
                value = self.spec.init_value(name, group)
                if value:
                    for b in bufs:
                        b[k] = value
            out[name] = bufs
        return out

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

    def step(self, grads):
        """One update of every member of every param with a gradient (stacked like the
        params); a None gradient skips its param for all members. One optimizer stepped
        from several threads at once runs the steps one after the other (a lock)."""
        with self._lock:
            return self._step(grads)

    def _step(self, grads):
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
        spec = self.spec
        kernel, names, kws = self._kernel()
        created = self._new_state([n for n in names if n not in self.state])
        fresh = bool(created)
        states = {**{n: self.state[n] for n in names if n in self.state}, **created}
        before = self._scalars()
        kernels = kernel if isinstance(kernel, tuple) else (kernel,) * self.members
        rows, after = [], []
        for k, kw in enumerate(kws):
            extra, new = spec.advance(kw, before[k])
            kw = {**kw, **extra}
            if spec.fresh_keyword is not None:
                kw[spec.fresh_keyword] = fresh
            rows.append(pack(kernels[k], spec.hyper(kw)))
            after.append(new)
        step = int(self.state.get("step", 0)) + 1
        flat_p = self._member_major(("params", active), self.params, active)
        flat_g = self._member_major(None, grads, active)
        flat_s = [self._member_major((name, active) if name not in created else None,
                                     states[name], active) for name in names]
        m = len(active)
        plans = []
        for kern in dict.fromkeys(kernels):  # one kernel, or the members of each
            mine = [k for k in range(self.members) if kernels[k] == kern]
            kw = {**kws[mine[0]], "step": step}  # the shared step count (at_step)
            if len(mine) == self.members:
                plans += self._plans(kern, kw, names, flat_p, flat_g, flat_s, rows, m)
                continue
            used = spec.active(kws[mine[0]])
            pick = lambda arrays: [a for k in mine for a in arrays[k * m:(k + 1) * m]]  # noqa: E731
            plans += self._plans(kern, kw, used, pick(flat_p), pick(flat_g),
                                 [pick(flat_s[names.index(n)]) for n in used],
                                 [rows[k] for k in mine], m)
        # every member validated: create the state, run, then count the step
        self.state.update(created)
        for plan in plans:
            plan.run()
        self._set_scalars(after)
        self._proximal(active)

    def _scalars(self):
        """The scalars of each member before this step."""
        spec = self.spec
        out = []
        for k, group in enumerate(self.param_groups):
            scalars = spec.init_scalars(group)
            for name in spec.scalars:
                if name == "step":
                    scalars[name] = float(self.state.get("step", 0))
                elif name in self.state:
                    scalars[name] = float(self.state[name][k])
            out.append(scalars)
        return out

    def _set_scalars(self, after):
        for name in self.spec.scalars:
            if name != "step":
                self.state[name] = [float(a[name]) for a in after]
        self.state["step"] = int(self.state.get("step", 0)) + 1

    @staticmethod
    def _one_call(array):
        """Whether the kernels for this array take a hyperparameter row per tensor (the
        CPU kernels do; the CUDA kernels take one row per call)."""
        return type(array) is np.ndarray

    def _plans(self, kernel, kw, names, flat_p, flat_g, flat_s, rows, m):
        spec, shared = self.spec, dict(op=self.op, kernel=kernel, names=names)
        if self._one_call(flat_p[0]):  # one call, one row per tensor
            table = np.repeat(np.asarray(rows, dtype=np.float64), m, axis=0).ravel()
            return [_engine.plan(spec, kw, flat_p, flat_g, flat_s, hyper=table, **shared)]
        plans = []  # one call per member, each validated before any runs
        for k, row in enumerate(rows):
            sl = slice(k * m, (k + 1) * m)
            plans.append(_engine.plan(spec, kw, flat_p[sl], flat_g[sl],
                                      [s[sl] for s in flat_s], hyper=row, **shared))
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
        state = {k: ([a.copy() for a in v] if isinstance(v, list) and v and
                     hasattr(v[0], "copy") else (list(v) if isinstance(v, list) else v))
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
            if name in self.spec.scalars:
                if len(value) != self.members:
                    raise ValueError(f"loaded {name} must hold {self.members} values")
                new_state[name] = [float(v) for v in value]
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


def _make(spec):
    """The batched optimizer of a spec: `Batched<Title>`."""
    name = f"Batched{spec.title}"
    doc = (f"{spec.title} for K members ({spec.summary[:-1] if spec.summary.endswith('.') else spec.summary}),"
           " each member with its own hyperparameters, stepped in one fused call.\n\n"
           "A hyperparameter is one value for all members or a sequence of K values "
           "(`betas`-like pairs: one pair, or K pairs)"
           + (f"; {', '.join(spec.batch_shared)} is shared by all members" if spec.batch_shared
              else "")
           + ". `l1` adds a proximal L1 step (per member).\n\n"
           f"See `fusedopt.{spec.title}` for the algorithm.\n")
    defaults = {**spec.group_defaults(), "l1": 0.0}
    return type(name, (_Batched,), {"spec": spec, "op": name, "defaults": defaults,
                                     "__doc__": doc, "__module__": __name__})


OPTIMIZERS = {spec.name: _make(spec) for spec in SPECS.values() if spec.batchable}
globals().update({cls.__name__: cls for cls in OPTIMIZERS.values()})
__all__ += [cls.__name__ for cls in OPTIMIZERS.values()]


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
