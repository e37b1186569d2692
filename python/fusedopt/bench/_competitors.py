"""The implementations the step benchmark times, per device.

An implementation builds a runner on its own copy of a workload (nothing is
shared with the others), with zero state as every optimizer starts. A runner
has `step()`, the timed call, `arrays()`, its params and state lists in the
functional op's order, readable as NumPy arrays, for the check against the
reference, and `gradients()`, its gradients likewise; the arrays share the runner's
memory, so that the benchmark can run the streaming limit on the very same buffers. A
GPU mode would add a list under its own device key.
"""

from __future__ import annotations

import importlib.util
import os

import numpy as np

import fusedopt


class Impl:
    key = ""  # name for --impls
    fusedopt = False  # one of ours, compared against the best competitor
    default = True  # run unless --impls says otherwise

    def label(self, algo):
        return self.key

    def supports(self, algo, dtype):
        return True

    def build(self, algo, work):
        raise NotImplementedError


# --- NumPy arrays: the fusedopt functional op, the fusedopt class, NumPy by hand ----------

class ArrayRunner:
    def __init__(self, algo, work, update):
        self.algo, self.update, self.t = algo, update, 0
        self.params = [p.copy() for p in work.params]
        self.grads = [g.copy() for g in work.grads]
        self.states = algo.initial_states(self.params)

    def step(self):
        self.t += 1
        self.update(self.params, self.grads, self.states, self.t)

    def arrays(self):
        return self.params, self.states

    def gradients(self):
        return self.grads


class FusedFunctional(Impl):
    key, fusedopt = "fusedopt", True

    def label(self, algo):
        return f"fusedopt.{algo.op}"

    def build(self, algo, work):
        return ArrayRunner(algo, work, algo.functional)


class NumpyByHand(Impl):
    key = "numpy"

    def supports(self, algo, dtype):
        return algo.has_numpy

    def build(self, algo, work):
        return ArrayRunner(algo, work, algo.numpy)


class ClassRunner:
    """An optimizer object that owns its state: fusedopt's classes take the gradients as
    an argument, torch.optim's and DeepSpeed's read `param.grad`."""

    def __init__(self, algo, params, grads, opt, state_keys, pass_grads):
        self.params, self.grads, self.opt = params, grads, opt
        self.state_keys, self.pass_grads = state_keys, pass_grads

    def step(self):
        if self.pass_grads:
            self.opt.step(self.grads)
        else:
            self.opt.step()

    def arrays(self):
        keys = range(len(self.params)) if self.pass_grads else self.params
        states = [[_numpy(self.opt.state[k][name]) for k in keys] for name in self.state_keys]
        return [_numpy(p) for p in self.params], states

    def gradients(self):
        return self.grads if self.pass_grads else [_numpy(p.grad) for p in self.params]


def _numpy(x):
    return x.numpy() if hasattr(x, "numpy") else x


class FusedClass(Impl):
    key, fusedopt = "fusedopt-class", True

    def label(self, algo):
        return f"fusedopt.{algo.cls}"

    def build(self, algo, work):
        params = [p.copy() for p in work.params]
        grads = [g.copy() for g in work.grads]
        opt = getattr(fusedopt, algo.cls)(params, **algo.kwargs)
        if algo.modes:
            opt.train()
        return ClassRunner(algo, params, grads, opt, algo.states, pass_grads=True)


# --- PyTorch -------------------------------------------------------------------------------

def _torch_tensors(work):
    import torch

    params = [torch.from_numpy(p).clone() for p in work.params]  # torch's own memory
    for p, g in zip(params, work.grads):
        p.grad = torch.from_numpy(g).clone()
    return params


class TorchOptim(Impl):
    MODES = {"loop": dict(foreach=False), "foreach": dict(foreach=True),
             "fused": dict(fused=True)}

    def __init__(self, mode):
        self.mode = mode
        self.key = f"torch-{mode}"
        self._supported = {}

    def label(self, algo):
        return "torch for-loop" if self.mode == "loop" else f"torch {self.mode}"

    def supports(self, algo, dtype):
        """Whether torch.optim takes this mode for this algorithm and dtype: tried once on a
        small tensor (not every algorithm has a fused CPU kernel)."""
        import torch

        if not hasattr(torch.optim, algo.cls):
            return False
        key = (algo.name, np.dtype(dtype).name)
        if key not in self._supported:
            p = torch.zeros(8, dtype=getattr(torch, np.dtype(dtype).name))
            p.grad = torch.ones_like(p)
            try:
                getattr(torch.optim, algo.cls)([p], **algo.kwargs, **self.MODES[self.mode]).step()
                self._supported[key] = True
            except (TypeError, RuntimeError, ValueError):
                self._supported[key] = False
        return self._supported[key]

    def build(self, algo, work):
        import torch

        params = _torch_tensors(work)
        opt = getattr(torch.optim, algo.cls)(params, **algo.kwargs, **self.MODES[self.mode])
        return ClassRunner(algo, params, None, opt, algo.states, pass_grads=False)


class FusedTorch(Impl):
    """fusedopt.torch: the drop-in torch.optim.Optimizer classes on torch tensors (the
    same tensors and grads as torch.optim's runs), running fusedopt's kernels."""

    key, fusedopt = "fusedopt-torch", True

    def label(self, algo):
        return f"fusedopt.torch.{algo.cls}"

    def build(self, algo, work):
        import fusedopt.torch as fot

        params = _torch_tensors(work)
        opt = getattr(fot, algo.cls)(params, **algo.kwargs)
        if algo.modes:
            opt.train()
        return ClassRunner(algo, params, None, opt, algo.states, pass_grads=False)


# --- steps torch.optim does not have, with torch's foreach ops ------------------------------

def _lion_foreach(k, params, grads, states, t):
    """Lion as lucidrains/lion-pytorch writes it, with foreach ops over the tensor list."""
    import torch

    (exp_avgs,) = states
    lr, b1, b2, wd = k["lr"], k["beta1"], k["beta2"], k["weight_decay"]
    if wd:
        torch._foreach_mul_(params, 1.0 - lr * wd)
    update = torch._foreach_mul(exp_avgs, b1)
    torch._foreach_add_(update, grads, alpha=1.0 - b1)
    torch._foreach_sign_(update)
    torch._foreach_add_(params, update, alpha=-lr)
    torch._foreach_mul_(exp_avgs, b2)
    torch._foreach_add_(exp_avgs, grads, alpha=1.0 - b2)


def _ratios(torch, params, updates, coefficient=1.0, eps=0.0):
    """optax's trust ratios of every tensor, as Python floats (one host round trip)."""
    pn = torch.stack(torch._foreach_norm(params))
    un = torch.stack(torch._foreach_norm(updates))
    ratio = torch.where((pn == 0) | (un == 0), torch.ones_like(pn), coefficient * pn / (un + eps))
    return ratio.tolist()


def _lamb_foreach(k, params, grads, states, t):
    """optax.lamb's equations with foreach ops: Adam's direction, per-tensor norms."""
    import torch

    exp_avgs, exp_avg_sqs = states
    b1, b2, eps, wd = k["beta1"], k["beta2"], k["eps"], k["weight_decay"]
    torch._foreach_mul_(exp_avgs, b1)
    torch._foreach_add_(exp_avgs, grads, alpha=1.0 - b1)
    torch._foreach_mul_(exp_avg_sqs, b2)
    torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1.0 - b2)
    denom = torch._foreach_div(exp_avg_sqs, 1.0 - b2**t)
    torch._foreach_sqrt_(denom)
    torch._foreach_add_(denom, eps)
    update = torch._foreach_div(exp_avgs, 1.0 - b1**t)
    torch._foreach_div_(update, denom)
    if wd:
        torch._foreach_add_(update, params, alpha=wd)
    torch._foreach_mul_(update, [-k["lr"] * r for r in _ratios(torch, params, update)])
    torch._foreach_add_(params, update)


def _lars_foreach(k, params, grads, states, t):
    """optax.lars's equations with foreach ops: per-tensor trust ratios, then momentum."""
    import torch

    wd, mu = k["weight_decay"], k["momentum"]
    update = torch._foreach_add(grads, params, alpha=wd) if wd else torch._foreach_mul(grads, 1.0)
    ratios = _ratios(torch, params, update, k["trust_coefficient"], k["eps"])
    torch._foreach_mul_(update, [-k["lr"] * r for r in ratios])
    if not states:
        torch._foreach_add_(params, update)
        return
    (traces,) = states
    torch._foreach_mul_(traces, mu)
    torch._foreach_add_(traces, update)
    if k["nesterov"]:
        torch._foreach_add_(update, traces, alpha=mu)
        torch._foreach_add_(params, update)
    else:
        torch._foreach_add_(params, traces)


TORCH_WRITTEN = {"lion": _lion_foreach, "lamb": _lamb_foreach, "lars": _lars_foreach}


class TensorRunner:
    """A step written in the benchmark over torch tensors (torch's memory), with the
    state lists as the functional op orders them."""

    def __init__(self, algo, work, update):
        import torch

        self.algo, self.update, self.t = algo, update, 0
        self.params = [torch.from_numpy(p).clone() for p in work.params]
        self.grads = [torch.from_numpy(g).clone() for g in work.grads]
        self.states = [[torch.from_numpy(b) for b in lst]
                       for lst in algo.initial_states([p.numpy() for p in self.params])]

    def step(self):
        self.t += 1
        self.update(self.algo.op_kwargs(self.t), self.params, self.grads, self.states, self.t)

    def arrays(self):
        return [p.numpy() for p in self.params], [[b.numpy() for b in lst] for lst in self.states]

    def gradients(self):
        return [g.numpy() for g in self.grads]


class TorchWritten(Impl):
    """Lion, LAMB and LARS, which torch.optim does not have, written here with torch's
    foreach ops (one op over the whole tensor list at a time, as torch.optim's foreach
    mode runs its own algorithms)."""

    key = "torch-foreach-written"

    def label(self, algo):
        return "torch foreach (written here)"

    def supports(self, algo, dtype):
        return algo.spec.name in TORCH_WRITTEN

    def build(self, algo, work):
        return TensorRunner(algo, work, TORCH_WRITTEN[algo.spec.name])


class ScheduleFree(Impl):
    """The schedulefree package's AdamWScheduleFree (foreach mode, its default): the
    defining implementation. Its step divides the gradients in place, which changes
    nothing of its cost."""

    key = "schedulefree"

    def label(self, algo):
        return "schedulefree foreach"

    def supports(self, algo, dtype):
        return algo.spec.name == "adamw_schedulefree"

    def build(self, algo, work):
        import schedulefree

        params = _torch_tensors(work)
        opt = schedulefree.AdamWScheduleFree(params, **algo.kwargs, foreach=True)
        opt.train()
        return ClassRunner(algo, params, None, opt, algo.states, pass_grads=False)


class FusedTorchFlat(FusedTorch):
    """fusedopt.torch with flat=True: the params, gradients and states in flat buffers,
    one kernel call over contiguous memory per step."""

    key = "fusedopt-torch-flat"

    def label(self, algo):
        return f"fusedopt.torch.{algo.cls}(flat)"

    def build(self, algo, work):
        import fusedopt.torch as fot

        params = _torch_tensors(work)
        opt = getattr(fot, algo.cls)(params, **algo.kwargs, flat=True)
        if algo.modes:
            opt.train()
        return ClassRunner(algo, params, None, opt, algo.states, pass_grads=False)


# --- DeepSpeed's CPU optimizers (when installed) -------------------------------------------

class DeepSpeedCpu(Impl):
    """DeepSpeedCPUAdam (Adam, AdamW) and DeepSpeedCPUAdagrad, float32 only. Not in the
    default run: the first use compiles DeepSpeed's CPU ops (minutes), and each optimizer
    then takes over a second to construct."""

    key, default = "deepspeed", False

    def supports(self, algo, dtype):
        return algo.name in ("adam", "adamw", "adagrad") and np.dtype(dtype) == np.float32

    def build(self, algo, work):
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # no probing for GPUs, no warning
        params = _torch_tensors(work)
        if algo.name == "adagrad":
            from deepspeed.ops.adagrad import DeepSpeedCPUAdagrad

            opt = DeepSpeedCPUAdagrad(params, **algo.kwargs)
            keys = ("exp_avg_sq",)  # DeepSpeed's name of Adagrad's sum
        else:
            from deepspeed.ops.adam import DeepSpeedCPUAdam

            opt = DeepSpeedCPUAdam(params, adamw_mode=algo.name == "adamw", **algo.kwargs)
            keys = algo.states
        return ClassRunner(algo, params, None, opt, keys, pass_grads=False)


def _has(module):
    return importlib.util.find_spec(module) is not None


def cpu_implementations():
    impls = [FusedFunctional(), FusedClass(), NumpyByHand()]
    if _has("torch"):
        impls += [FusedTorch(), FusedTorchFlat(), TorchOptim("loop"), TorchOptim("foreach"),
                  TorchOptim("fused"), TorchWritten()]
        if _has("schedulefree"):
            impls.append(ScheduleFree())
    if _has("deepspeed"):
        impls.append(DeepSpeedCpu())
    return impls


IMPLEMENTATIONS = {"cpu": cpu_implementations}
