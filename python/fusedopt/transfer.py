"""Transfer learning helpers: freezing, per-group and layer-wise learning rates, L1.

::

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

L1 regularization is the proximal (soft-threshold) step after the update::

    p = sign(p) * max(|p| - lr * l1, 0)

i.e. proximal gradient descent on ``loss + l1 * |p|_1``: unlike adding ``l1 * sign(p)`` to the
gradient, it sets small weights exactly to zero. `set_l1` sets `group["l1"]`; the fused
kernels apply the step in the same pass as the update, beside L2 weight decay
(`weight_decay`) and decoupled decay (`AdamW`). `prox_l1_` is the same step as plain
NumPy, for arrays updated by other means.
"""

from __future__ import annotations

import fnmatch
from typing import Any, Callable, Iterable, Mapping, Sequence, Union

import numpy as np

__all__ = ["freeze", "unfreeze", "frozen_params", "masked_grads", "set_l1", "prox_l1_", "attach",
           "layerwise_lr_groups", "groups_by_name"]

# What freeze, unfreeze and set_l1 take: a param (the very array object given to the
# optimizer), a param group (its dict), a group index, or a list of those.
_Target = Union[Any, dict, int, Sequence[Any]]
_NamedParams = Union[Mapping[str, Any], Iterable[tuple]]


def __dir__():
    return sorted(__all__)


def prox_l1_(params: Sequence[np.ndarray], threshold: float | np.ndarray) -> None:
    """Soft-threshold each array in place: the proximal step of an L1 penalty.

    .. math:: p \\leftarrow \\operatorname{sign}(p) \\max(|p| - \\tau, 0)

    Parameters
    ----------
    params : sequence of ndarray
        The arrays, updated in place.
    threshold : float or ndarray
        :math:`\\tau` >= 0: a number, or an array broadcastable to every param (e.g. one
        value per member of a stacked param, shaped ``(K, 1, ...)``). For a step of
        L1 strength ``l1`` at learning rate ``lr``, ``lr * l1``.

    Raises
    ------
    ValueError
        If a threshold is negative (no array is changed).

    Examples
    --------
    >>> import numpy as np
    >>> from fusedopt.transfer import prox_l1_
    >>> p = np.array([-0.3, 0.05, 0.2])
    >>> prox_l1_([p], 0.1)
    >>> p
    array([-0.2,  0. ,  0.1])
    """
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


def freeze(optimizer: Any, target: _Target) -> Any:
    """Stop updating some params: their gradients are ignored from the next step on.

    Marks the groups (``group["frozen"] = True``, or a param's position in
    ``group["frozen_params"]``); the flags travel in ``state_dict()``. A frozen param
    and its state are neither read nor written, and its step count does not advance.
    No array is copied.

    Parameters
    ----------
    optimizer : Optimizer
        A fusedopt optimizer (the classic ones, or `LBFGS`, whose ``step`` gets a thin
        wrapper: see `attach`).
    target : array, dict, int or list of them
        A param (the very array object given to the optimizer), a param group (its
        dict), a group index, or a list of those.

    Returns
    -------
    Optimizer
        `optimizer`, for chaining.

    Raises
    ------
    ValueError
        If `target` is not one of the optimizer's params or groups.
    TypeError
        For `Newton`, which couples all params through the Hessian.

    See Also
    --------
    unfreeze, frozen_params

    Examples
    --------
    >>> import numpy as np, fusedopt as fo
    >>> backbone, head = np.ones(4, np.float32), np.ones(2, np.float32)
    >>> opt = fo.SGD([backbone, head], lr=0.1)
    >>> _ = fo.transfer.freeze(opt, backbone)
    >>> opt.step([np.ones(4, np.float32), np.ones(2, np.float32)])
    >>> backbone, head
    (array([1., 1., 1., 1.], dtype=float32), array([0.9, 0.9], dtype=float32))
    """
    for group, pos in _locate(optimizer, target):
        if pos is None:
            group["frozen"] = True
        else:
            group["frozen_params"] = sorted(set(group.get("frozen_params", [])) | {pos})
    attach(optimizer)
    return optimizer


def unfreeze(optimizer: Any, target: _Target) -> Any:
    """Resume updating params frozen by `freeze`.

    Parameters
    ----------
    optimizer : Optimizer
        The optimizer.
    target : array, dict, int or list of them
        As for `freeze`.

    Returns
    -------
    Optimizer
        `optimizer`, for chaining.

    Raises
    ------
    ValueError
        If `target` is a param of a frozen group (unfreeze the group), or not one of
        the optimizer's params or groups.
    """
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


def frozen_params(optimizer: Any) -> list[int]:
    """Return the positions of the frozen params.

    Parameters
    ----------
    optimizer : Optimizer
        The optimizer.

    Returns
    -------
    list of int
        Flat positions, counted over all groups in order (the positions of the
        gradient list ``step`` takes).
    """
    out, offset = [], 0
    for g in optimizer.param_groups:
        n = len(g["params"])
        if g.get("frozen"):
            out += range(offset, offset + n)
        else:
            out += [offset + i for i in g.get("frozen_params", [])]
        offset += n
    return out


def masked_grads(optimizer: Any, grads: Sequence[Any]) -> Sequence[Any]:
    """Return `grads` with None in place of each frozen param's gradient.

    Parameters
    ----------
    optimizer : Optimizer
        The optimizer.
    grads : sequence
        Gradients aligned with the optimizer's params (flat, over all groups).

    Returns
    -------
    sequence
        `grads` itself when nothing is frozen, else a new list.
    """
    frozen = frozen_params(optimizer)
    if not frozen:
        return grads
    out = list(grads)
    for i in frozen:
        if i < len(out):
            out[i] = None
    return out


def set_l1(optimizer: Any, l1: float, groups: _Target | None = None) -> Any:
    """Add an L1 proximal step to the updates of a first-order optimizer.

    Sets ``group["l1"]``: after each update, ``p = sign(p) * max(|p| - lr * l1, 0)``,
    in the same pass over memory (proximal gradient descent on ``loss + l1 * |p|_1``;
    unlike adding ``l1 * sign(p)`` to the gradient, it sets small weights exactly to
    zero).

    Parameters
    ----------
    optimizer : Optimizer
        A classic fusedopt optimizer (SGD, Adagrad, RMSprop, Adadelta, Adam, AdamW).
    l1 : float
        The strength, >= 0 (0 removes the step).
    groups : dict, int or list of them, optional
        The groups to change (as for `freeze`); default all.

    Returns
    -------
    Optimizer
        `optimizer`, for chaining.

    Raises
    ------
    ValueError
        If `l1` < 0.
    TypeError
        For batched optimizers (they take ``l1=`` at construction), `LBFGS` and
        `Newton` (a proximal step breaks their curvature model).
    """
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


def attach(optimizer: Any) -> Any:
    """Make ``optimizer.step`` honour the frozen flags of its groups.

    fusedopt's classic optimizers read the flags themselves; an `LBFGS` gets a thin
    wrapper on its (the instance's) ``step`` that turns the closure's gradients of
    frozen params into None. `freeze` calls this; call it yourself after loading a
    state dict that holds such flags into a new LBFGS.

    Parameters
    ----------
    optimizer : Optimizer
        The optimizer.

    Returns
    -------
    Optimizer
        `optimizer`, for chaining.

    Raises
    ------
    TypeError
        For `Newton`: pass it a closure over the trainable params only.
    """
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


def layerwise_lr_groups(named_params: _NamedParams, base_lr: float, decay: float, *,
                        layer_of: Callable[[str], str] | None = None,
                        **options: Any) -> list[dict]:
    """Build param groups with layer-wise learning-rate decay.

    Params are grouped into layers by ``layer_of(name)``, in order of first
    appearance. The last layer gets `base_lr`, and each earlier layer `decay` times
    the rate of the layer after it: layer i of L gets
    ``base_lr * decay ** (L - 1 - i)``.

    Parameters
    ----------
    named_params : dict or iterable of (str, array)
        The params by name, from the input side to the output side.
    base_lr : float
        The rate of the last layer.
    decay : float
        The factor between consecutive layers, >= 0.
    layer_of : callable, optional
        Maps a param's name to its layer's; default: the name without its last dotted
        part, so ``"blocks.3.weight"`` and ``"blocks.3.bias"`` form layer
        ``"blocks.3"``.
    **options
        Further entries of every group (e.g. ``weight_decay=0.01``).

    Returns
    -------
    list of dict
        Groups ``{"params": [...], "lr": ..., "layer": name, **options}``, for any
        optimizer's `params` argument.

    Raises
    ------
    ValueError
        If `decay` < 0.
    TypeError
        If `named_params` holds something other than (name, array) pairs.

    Examples
    --------
    >>> import numpy as np
    >>> from fusedopt.transfer import layerwise_lr_groups
    >>> named = {"embed.weight": np.zeros(4), "block.weight": np.zeros(4),
    ...          "head.weight": np.zeros(4), "head.bias": np.zeros(1)}
    >>> [(g["layer"], g["lr"]) for g in layerwise_lr_groups(named, 1e-3, 0.5)]
    [('embed', 0.00025), ('block', 0.0005), ('head', 0.001)]
    """
    if not 0 <= decay:
        raise ValueError(f"decay must be >= 0, got {decay}")
    layer_of = layer_of or (lambda name: name.rsplit(".", 1)[0])
    layers = {}
    for name, p in _named(named_params):
        layers.setdefault(layer_of(name), []).append(p)
    n = len(layers)
    return [{"params": ps, "lr": base_lr * decay ** (n - 1 - i), "layer": layer, **options}
            for i, (layer, ps) in enumerate(layers.items())]


def groups_by_name(named_params: _NamedParams, rules: Sequence[tuple[str, Mapping[str, Any]]],
                   **defaults: Any) -> list[dict]:
    """Build param groups from name patterns.

    Each param joins the group of the first pattern (``fnmatch``) its name matches;
    the others form a last group with `defaults`. Empty groups are left out; groups
    keep the params' order.

    Parameters
    ----------
    named_params : dict or iterable of (str, array)
        The params by name.
    rules : sequence of (str, dict)
        Patterns and the options of their groups, e.g.
        ``[("head.*", {"lr": 1e-2}), ("*.bias", {"weight_decay": 0.0})]``.
    **defaults
        Options of every group (a rule's options override them).

    Returns
    -------
    list of dict
        Groups ``{"params": [...], **options}``.

    Examples
    --------
    >>> import numpy as np
    >>> from fusedopt.transfer import groups_by_name
    >>> named = {"body.weight": np.zeros(4), "body.bias": np.zeros(4)}
    >>> groups = groups_by_name(named, [("*.bias", {"weight_decay": 0.0})], weight_decay=0.1)
    >>> [(len(g["params"]), g["weight_decay"]) for g in groups]
    [(1, 0.0), (1, 0.1)]
    """
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
