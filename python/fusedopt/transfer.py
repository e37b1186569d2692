"""Transfer learning helpers: freezing, per-group and layer-wise learning rates, L1.

    opt = fo.AdamW(fo.transfer.layerwise_lr_groups(model.named_params(), 1e-3, decay=0.8))
    fo.transfer.freeze(opt, backbone_params)      # their updates stop; no copy is made
    fo.transfer.set_l1(opt, 1e-4)                 # sparse fine-tuning
    opt.step(grads)                               # grads for every param, as usual
    fo.transfer.unfreeze(opt, backbone_params)

Freezing marks the optimizer's groups: `group["frozen"] = True` for a whole group, and
`group["frozen_params"]` (positions within the group) for single params; both travel in
`state_dict()`. The classic optimizers read these flags themselves: a frozen param and
its state are neither read nor written, and its step count does not advance. For
`LBFGS`, `freeze` installs a thin wrapper on that optimizer's `step` (the instance's)
that turns the closure's gradients of frozen params into None, so they never move
(after loading flags into a new LBFGS, call `attach(opt)`). The batched optimizers
take `l1=` directly and skip a param for all members with a None gradient.

L1 regularization is the proximal (soft-threshold) step after the update,
    p = sign(p) * max(|p| - lr * l1, 0),
i.e. proximal gradient descent on loss + l1 * |p|_1: unlike adding l1 * sign(p) to the
gradient, it sets small weights exactly to zero. `set_l1` sets `group["l1"]`; the fused
kernels apply the step in the same pass as the update, beside L2 weight decay
(`weight_decay`) and decoupled decay (`AdamW`). `prox_l1_` is the same step as plain
NumPy, for arrays updated by other means.
"""

from __future__ import annotations

import fnmatch

import numpy as np

__all__ = ["freeze", "unfreeze", "frozen_params", "masked_grads", "set_l1", "prox_l1_", "attach",
           "layerwise_lr_groups", "groups_by_name"]


def prox_l1_(params, threshold):
    """Soft-threshold each array in place: p = sign(p) * max(|p| - threshold, 0).
    `threshold` is a number or an array broadcastable to every param (e.g. one value per
    member of a stacked param, shaped (K, 1, ...))."""
    threshold = np.asarray(threshold, dtype=np.float64)
    if (threshold < 0).any():
        raise ValueError("prox_l1_: the threshold must be >= 0")
    for p in params:
        mag = np.abs(p, out=np.empty_like(p))  # (an array also for 0-d params)
        mag -= threshold.astype(p.dtype, copy=False)
        np.maximum(mag, 0, out=mag)
        np.copysign(mag, p, out=p)


# --- finding params and groups ----------------------------------------------------------------

def _locate(optimizer, target):
    """[(group, position or None)] for a target: a group dict, a group index, an array,
    or a list of those. Position None means the whole group."""
    if isinstance(target, (list, tuple)):
        out = []
        for t in target:
            out += _locate(optimizer, t)
        return out
    groups = optimizer.param_groups
    if isinstance(target, dict):
        if not any(target is g for g in groups):
            raise ValueError("freeze: the group is not one of this optimizer's param_groups")
        return [(target, None)]
    if isinstance(target, int) and not isinstance(target, bool):
        return [(groups[target], None)]
    for g in groups:
        for i, p in enumerate(g["params"]):
            if p is target:
                return [(g, i)]
    raise ValueError("freeze: an array that is not one of the optimizer's params (pass the "
                     "very array object given to the optimizer)")


def freeze(optimizer, target):
    """Stop updating `target` (a param, a group, a group index, or a list of them): its
    gradients are ignored from the next step on. Returns the optimizer."""
    for group, pos in _locate(optimizer, target):
        if pos is None:
            group["frozen"] = True
        else:
            group["frozen_params"] = sorted(set(group.get("frozen_params", [])) | {pos})
    attach(optimizer)
    return optimizer


def unfreeze(optimizer, target):
    """Resume updating `target`; unfreezing a param of a frozen group is an error (unfreeze
    the group). Returns the optimizer."""
    for group, pos in _locate(optimizer, target):
        if pos is None:
            group["frozen"] = False
            group.pop("frozen_params", None)
        else:
            if group.get("frozen"):
                raise ValueError("unfreeze: the param's whole group is frozen; unfreeze the "
                                 "group")
            group["frozen_params"] = [i for i in group.get("frozen_params", []) if i != pos]
    return optimizer


def frozen_params(optimizer):
    """Flat positions (over all groups, in order) of the params that are frozen."""
    out, offset = [], 0
    for g in optimizer.param_groups:
        n = len(g["params"])
        if g.get("frozen"):
            out += range(offset, offset + n)
        else:
            out += [offset + i for i in g.get("frozen_params", [])]
        offset += n
    return out


def masked_grads(optimizer, grads):
    """`grads` with None in place of each frozen param's gradient."""
    frozen = frozen_params(optimizer)
    if not frozen:
        return grads
    out = list(grads)
    for i in frozen:
        if i < len(out):
            out[i] = None
    return out


def set_l1(optimizer, l1, groups=None):
    """Add an L1 proximal step of strength `l1` to the groups (default: all) of a
    first-order optimizer. Returns the optimizer."""
    if hasattr(optimizer, "members"):
        raise TypeError("set_l1: batched optimizers take l1= at construction (per member)")
    if type(optimizer).__name__ in ("LBFGS", "Newton"):
        raise TypeError(f"set_l1: {type(optimizer).__name__} has no proximal L1 step (the "
                        "soft-threshold breaks its curvature pairs and line search); add the "
                        "L1 term to the loss or use a first-order optimizer")
    if not l1 >= 0:
        raise ValueError(f"set_l1: l1 must be >= 0, got {l1}")
    targets = optimizer.param_groups if groups is None else \
        [g for g, _ in _locate(optimizer, groups)]
    for g in targets:
        g["l1"] = float(l1)
    return optimizer


# --- the step wrapper -------------------------------------------------------------------------

class _Step:
    """The wrapper `freeze` installs as `optimizer.step` of an LBFGS."""

    def __init__(self, optimizer):
        self.optimizer = optimizer
        self.inner = type(optimizer).step

    def __call__(self, arg, *args, **kwargs):
        opt = self.optimizer
        if callable(arg):  # LBFGS: a closure returning (loss, grads, ...)
            closure = arg

            def masked():
                out = closure()
                frozen = frozen_params(opt)
                if not frozen:
                    return out
                grads = list(out[1])
                for i in frozen:
                    grads[i] = None
                return (out[0], grads, *out[2:])

            return self.inner(opt, masked, *args, **kwargs)
        return self.inner(opt, masked_grads(opt, arg), *args, **kwargs)


def attach(optimizer):
    """Make `optimizer.step` honour the frozen flags of its groups. fusedopt's classic
    optimizers do so by themselves; other optimizers (LBFGS) get a wrapper. `freeze`
    calls it; call it yourself after loading a state dict that holds such flags into a
    new LBFGS. Returns the optimizer."""
    from .optimizer import Optimizer

    if type(optimizer).step is Optimizer.step:  # reads the flags itself
        return optimizer
    if not isinstance(optimizer.__dict__.get("step"), _Step):
        if type(optimizer).__name__ == "Newton":
            raise TypeError("freeze: Newton couples all params through the Hessian; pass a "
                            "closure over the trainable params only")
        optimizer.step = _Step(optimizer)
    return optimizer


# --- learning rates per group -----------------------------------------------------------------

def _named(named_params):
    items = list(named_params.items()) if isinstance(named_params, dict) else list(named_params)
    for item in items:
        if not (isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str)):
            raise TypeError("expected (name, array) pairs or a dict of arrays by name")
    return items


def layerwise_lr_groups(named_params, base_lr, decay, *, layer_of=None, **options):
    """Param groups with layer-wise learning-rate decay.

    `named_params`: (name, array) pairs (or a dict) from the input side to the output
    side. Params are grouped into layers by `layer_of(name)` (default: the name without
    its last dotted part, so "blocks.3.weight" and "blocks.3.bias" form layer
    "blocks.3"), in order of first appearance. The last layer gets `base_lr`, and each
    earlier layer `decay` times the rate of the layer after it: layer i of L gets
    base_lr * decay ** (L - 1 - i). Each group also holds its "layer" name and any
    further `options` (e.g. weight_decay)."""
    if not 0 <= decay:
        raise ValueError(f"decay must be >= 0, got {decay}")
    layer_of = layer_of or (lambda name: name.rsplit(".", 1)[0])
    layers = {}
    for name, p in _named(named_params):
        layers.setdefault(layer_of(name), []).append(p)
    n = len(layers)
    return [{"params": ps, "lr": base_lr * decay ** (n - 1 - i), "layer": layer, **options}
            for i, (layer, ps) in enumerate(layers.items())]


def groups_by_name(named_params, rules, **defaults):
    """Param groups from name patterns: `rules` is a list of (pattern, options), e.g.
    [("head.*", {"lr": 1e-2}), ("*.bias", {"weight_decay": 0.0})]; each param joins the
    group of the first pattern (fnmatch) its name matches, the others form a last group
    with `defaults`. Empty groups are left out; groups keep the params' order."""
    buckets = [[] for _ in range(len(rules) + 1)]
    for name, p in _named(named_params):
        k = next((i for i, (pattern, _) in enumerate(rules)
                  if fnmatch.fnmatchcase(name, pattern)), len(rules))
        buckets[k].append(p)
    groups = []
    for k, ps in enumerate(buckets):
        if ps:
            options = dict(defaults) if k == len(rules) else {**defaults, **rules[k][1]}
            groups.append({"params": ps, **options})
    return groups
