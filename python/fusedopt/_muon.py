"""Muon's step (torch.optim.Muon), in three parts:

1. one fused elementwise pass over every param (kernel ``muon_momentum``): the momentum
   buffer and the matrix ``u`` the Newton-Schulz iterations start from, written into a
   stack of the params of one shape (K, m, n), read from the gradient and the buffer;
2. the Newton-Schulz iterations, batched over each stack: every operation is one batched
   matrix product for all K matrices (NumPy's ``matmul`` on the stack, which calls the
   BLAS NumPy was built with per matrix without returning to Python; CuPy's, i.e.
   cuBLAS, on the GPU; for torch tensors torch's own ``bmm``/``baddbmm``), in bfloat16
   (torch's choice) or float32;
3. one fused elementwise pass per stack (kernel ``muon_update``): weight decay and the
   step with the learning rate adjusted to the shape, plus any EMA slot or master
   weights.

On NumPy and CuPy arrays, which have no bfloat16 matrix product, ``ns_dtype="bfloat16"``
multiplies float32 matrices and rounds every result to bfloat16 (to nearest even), as a
bfloat16 matrix product accumulates in float32 and rounds its output once.
"""

from __future__ import annotations

import sys

import numpy as np

from . import _engine, _precision
from .algorithms._spec import Spec, State
from .algorithms.muon import adjusted_lr

#: step options that apply to the gradients (the momentum pass) and those that apply to
#: the params (the update pass)
_GRAD_OPTIONS = ("loss_scale", "max_grad_norm", "skip_nonfinite")
_PARAM_OPTIONS = ("master_params", "kahan_buffers", "stochastic_rounding", "seed", "ema",
                  "ema_decay")


class _MomentumPass(Spec):
    name, title = "muon_momentum", "Muon momentum"
    scalars = ()
    states = (State("momentum_buffer", "momentum_buffers", "The momentum buffer."),)

    def hyper(self, kw):
        return {"momentum": kw["momentum"], "nesterov": kw["nesterov"]}


class _UpdatePass(Spec):
    name, title = "muon_update", "Muon update"
    scalars = ()

    def hyper(self, kw):
        return {"shrink": kw["shrink"], "lr": kw["lr"]}


MOMENTUM, UPDATE = _MomentumPass(), _UpdatePass()


def _kind(a):
    module = type(a).__module__.partition(".")[0]
    return module if module in ("torch", "cupy") else "numpy"


def _empty(like, shape):
    """An uninitialized array of `shape` with the dtype and device of `like`."""
    kind = _kind(like)
    if kind == "torch":
        import torch

        return torch.empty(shape, dtype=like.dtype, device=like.device)
    if kind == "cupy":
        import cupy

        with cupy.cuda.Device(like.device.id):
            return cupy.empty(shape, like.dtype)
    return np.empty(shape, np.asarray(like).dtype)


# --- the Newton-Schulz iterations, batched ---------------------------------------------------


def round_bfloat16(xp, x):
    """float32 values rounded to the nearest bfloat16 (ties to even), in place (x
    contiguous float32); returns x."""
    u = x.view(xp.uint32)
    u += xp.uint32(0x7FFF) + ((u >> xp.uint32(16)) & xp.uint32(1))
    u &= xp.uint32(0xFFFF0000)
    return x


def newton_schulz(u, coefficients, steps, eps, ns_dtype="bfloat16"):
    """torch.optim.Muon's orthogonalization of every matrix of a stack ``u`` (K, m, n) at
    once: X = u / max(|u|_F, eps) (each matrix transposed while it has more rows than
    columns), then `steps` times A = X X^T, X = a X + (b A + c A A) X. Returns a (K, m, n)
    array (float32 or bfloat16) of the array kind of `u` (NumPy, CuPy, torch)."""
    a, b, c = (float(x) for x in coefficients)
    if _kind(u) == "torch":
        return _newton_schulz_torch(u, a, b, c, steps, eps, ns_dtype == "bfloat16")
    xp = np if _kind(u) == "numpy" else sys.modules["cupy"]
    bf16 = ns_dtype == "bfloat16"
    rnd = (lambda x: round_bfloat16(xp, x)) if bf16 else (lambda x: x)
    x = rnd(xp.array(u, dtype=xp.float32, order="C", copy=True))
    tall = x.shape[-2] > x.shape[-1]
    if tall:
        x = xp.swapaxes(x, -1, -2)
    # the Frobenius norms, accumulated in float64 (float32 for the bfloat16 iteration,
    # as torch's bfloat16 norm), clamped below at eps
    acc = xp.float32 if bf16 else xp.float64
    norm = xp.sqrt(xp.sum(xp.square(x, dtype=acc), axis=(-2, -1), keepdims=True, dtype=acc))
    norm = xp.maximum(norm, eps).astype(xp.float32)
    if bf16:
        norm = rnd(xp.ascontiguousarray(norm))
    x = rnd(xp.ascontiguousarray(x / norm))
    for _ in range(steps):
        gram = rnd(xp.matmul(x, xp.swapaxes(x, -1, -2)))
        update = xp.matmul(gram, gram)
        update *= xp.float32(c)
        update += xp.float32(b) * gram
        rnd(update)
        nxt = xp.matmul(update, x)
        nxt += xp.float32(a) * x
        x = rnd(nxt)
    return xp.swapaxes(x, -1, -2) if tall else x


def _newton_schulz_torch(u, a, b, c, steps, eps, bf16):
    import torch

    x = u.to(torch.bfloat16 if bf16 else torch.float32)
    if x.shape[-2] > x.shape[-1]:
        x = x.mT
        tall = True
    else:
        tall = False
    if bf16:  # as torch.optim.Muon: the norm in bfloat16 (accumulated in float32)
        norm = torch.linalg.vector_norm(x, dim=(-2, -1), keepdim=True)
    else:
        norm = torch.linalg.vector_norm(x, dim=(-2, -1), keepdim=True, dtype=torch.float64)
    x = x / norm.clamp(min=eps).to(x.dtype)
    for _ in range(steps):
        gram = torch.bmm(x, x.mT)
        update = torch.baddbmm(gram, gram, gram, beta=b, alpha=c)
        x = torch.baddbmm(x, update, x, beta=a)
    return x.mT if tall else x


def _copy_into(out, result):
    if _kind(out) == "torch":
        out.copy_(result)
    else:
        out[...] = result


# --- the plan ------------------------------------------------------------------------------


class _Group:
    """The params of one (shape, dtype, device): their indices, the stack the momentum
    pass writes, the buffer the update pass reads, and its update plan."""

    __slots__ = ("index", "stack", "out", "plan")


class MuonPlan:
    """A validated Muon step (see the module docstring), not yet run."""

    def __init__(self, op, kw, momentum, groups, params, grads, options):
        self.op, self.kw, self.momentum, self.groups = op, kw, momentum, groups
        self.params, self.grads, self.options = params, grads, options
        self.prep = momentum.prep

    def sumsq(self):
        return self.momentum.sumsq()

    def grads_finite(self):
        return self.momentum.grads_finite()

    def run(self, grad_scale=None, scale_ptr=0):
        if scale_ptr:
            raise ValueError(f"{self.op}: gradient checks on the device are not supported for "
                             "Muon; check on the host or leave them out")
        self.momentum.run(grad_scale)
        kw = self.kw
        for g in self.groups:
            result = newton_schulz(g.stack, kw["ns_coefficients"], kw["ns_steps"], kw["eps"],
                                   kw.get("ns_dtype", "bfloat16"))
            _copy_into(g.out, result)
            g.plan.run()

    def execute(self):
        return _precision.execute_on_host(self, "Muon")


def plan(spec, kw, params, grads, states, names, options, stream, op):
    """The validated Muon step over lists of 2-D arrays (`_engine.plan`'s entry for the
    spec)."""
    if not isinstance(params, (list, tuple)):
        raise TypeError(f"{op}: params must be a list or tuple of arrays, got "
                        f"{type(params).__name__}")
    spec.check_params(params)
    if options.l1:
        raise ValueError(f"{op}: l1 is not supported for Muon")
    if options.kahan_buffers is not None:
        raise ValueError(f"{op}: kahan_buffers are not supported for Muon (master_params are)")
    n = len(params)
    grad_options = _precision.Options(op, {k: getattr(options, k) for k in _GRAD_OPTIONS})
    # the params of one (shape, dtype, device) share a stack
    keys = {}
    for i, p in enumerate(params):
        kind = _kind(p)
        device = str(p.device) if kind in ("torch", "cupy") else "cpu"
        keys.setdefault((tuple(p.shape), str(p.dtype), device), []).append(i)
    groups, scratch = [], [None] * n
    for (shape, _, _), index in keys.items():
        g = _Group()
        g.index = index
        g.stack = _empty(params[index[0]], (len(index), *shape))
        g.out = _empty(params[index[0]], (len(index), *shape))
        for k, i in enumerate(index):
            scratch[i] = g.stack[k]
        groups.append(g)
    momentum = _engine.plan(MOMENTUM, kw, scratch if n else [], grads, states, op=op,
                            options=grad_options, stream=stream, names=["momentum_buffer"])
    lr, wd = float(kw["lr"]), float(kw["weight_decay"])
    for g in groups:
        shape = tuple(params[g.index[0]].shape)
        pick = {}
        for name in _PARAM_OPTIONS:
            value = getattr(options, name)
            if isinstance(value, (list, tuple)):
                if len(value) != n:
                    raise ValueError(f"{op}: got {len(value)} {name} for {n} params")
                value = [value[i] for i in g.index]
            pick[name] = value
        g.plan = _engine.plan(UPDATE, {"shrink": 1.0 - lr * wd,
                                       "lr": adjusted_lr(lr, kw["adjust_lr_fn"], shape)},
                              [params[i] for i in g.index], [g.out[k] for k in range(len(g.index))],
                              [], op=op, options=_precision.Options(op, pick), stream=stream)
    return MuonPlan(op, kw, momentum, groups, params, grads, options)
