"""NumPy float64 reference implementations of every update rule.

These functions are the independent check of the fused kernels. They are
written from the published equations (torch.optim's semantics, written out in
DESIGN.md section 3), not from the C++ rules, and they favour plain, readable
NumPy over speed.

Each function mirrors the in-place op of the same name in
``fusedopt.functional`` (``adam`` for ``adam_``): it takes the same lists of
arrays, in the same order, and the same keyword hyperparameters. Inputs of any
floating dtype are converted to float64 and are never modified. The result is a
tuple of lists of new float64 arrays, ``(params, *states)``, with the state
lists in the order of the op's array arguments; a state list passed as None is
left out of the result, and one that the options do not use (momentum buffers
without momentum, say) comes back as an unchanged copy.
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import numpy as np
from numpy.typing import ArrayLike

__all__ = ["sgd", "adagrad", "rmsprop", "adadelta", "adam", "adamw"]

_Arrays = Sequence[ArrayLike]
_Result = Tuple[list, ...]  # (params, *states), lists of new float64 arrays


def __dir__():
    return sorted(__all__)


def _f64(arrays, name, count=None):
    """New float64 copies of a list of arrays (None stays None)."""
    if arrays is None:
        return None
    out = [np.array(a, dtype=np.float64, copy=True) for a in arrays]
    if count is not None and len(out) != count:
        raise ValueError(f"reference: {name} has {len(out)} arrays, params has {count}")
    return out


def _prepare_grad(g, p, maximize, weight_decay):
    """The common prologue: negate the gradient when maximizing, add L2 decay."""
    if maximize:
        g = -g
    if weight_decay != 0:
        g = g + weight_decay * p
    return g


def _result(params, *states):
    return (params,) + tuple(s for s in states if s is not None)


def sgd(params: _Arrays, grads: _Arrays, momentum_buffers: Optional[_Arrays] = None, *,
        lr: float, momentum: float = 0.0, dampening: float = 0.0, weight_decay: float = 0.0,
        nesterov: bool = False, maximize: bool = False, first_step: bool = False) -> _Result:
    """One step of SGD, with optional momentum, dampening and Nesterov momentum.

    With :math:`g` the gradient (negated if `maximize`):
    :math:`g \\mathrel{+}= \\lambda p`; with momentum :math:`\\mu`,
    :math:`b = g` on the first step, else :math:`b = \\mu b + (1 - \\tau) g`, and
    :math:`g = g + \\mu b` (Nesterov) or :math:`g = b`; then :math:`p \\mathrel{-}= \\eta g`.

    Parameters
    ----------
    params, grads : sequence of array_like
        Parameters and their gradients, aligned.
    momentum_buffers : sequence of array_like, optional
        The momentum buffers; needed when `momentum` != 0.
    lr : float
        The learning rate :math:`\\eta`.
    momentum : float, default 0.0
        :math:`\\mu`.
    dampening : float, default 0.0
        :math:`\\tau`.
    weight_decay : float, default 0.0
        L2 decay :math:`\\lambda`.
    nesterov : bool, default False
        Nesterov momentum.
    maximize : bool, default False
        Maximize the objective (negate the gradient).
    first_step : bool, default False
        With momentum: the buffers are created by this step (:math:`b = g`, whatever
        they held before), as torch.optim's first step.

    Returns
    -------
    tuple of lists of ndarray
        ``(params, momentum_buffers)``, or ``(params,)`` without buffers: new float64
        arrays.

    Raises
    ------
    ValueError
        If the lists differ in length, or momentum is asked without buffers.

    Examples
    --------
    >>> import numpy as np
    >>> from fusedopt import reference
    >>> (p,), = reference.sgd([np.array([1.0, 2.0])], [np.array([0.5, -1.0])], lr=0.1)
    >>> p
    array([0.95, 2.1 ])
    """
    n = len(params)
    ps = _f64(params, "params")
    gs = _f64(grads, "grads", n)
    bs = _f64(momentum_buffers, "momentum_buffers", n)
    if momentum != 0 and bs is None:
        raise ValueError("reference.sgd: momentum != 0 needs momentum_buffers")
    for i in range(n):
        p = ps[i]
        g = _prepare_grad(gs[i], p, maximize, weight_decay)
        if momentum != 0:
            if first_step:
                b = g.copy()
            else:
                b = momentum * bs[i] + (1.0 - dampening) * g
            bs[i] = b
            g = g + momentum * b if nesterov else b
        ps[i] = p - lr * g
    return _result(ps, bs)


def adagrad(params: _Arrays, grads: _Arrays, state_sums: _Arrays, *, step: int, lr: float,
            lr_decay: float = 0.0, weight_decay: float = 0.0, eps: float = 1e-10,
            maximize: bool = False) -> _Result:
    """One step of Adagrad.

    :math:`g \\mathrel{+}= \\lambda p`;
    :math:`\\tilde\\eta = \\eta / (1 + (t - 1)\\,\\delta)`; :math:`s \\mathrel{+}= g^2`;
    :math:`p \\mathrel{-}= \\tilde\\eta\\, g / (\\sqrt{s} + \\epsilon)`.

    Parameters
    ----------
    params, grads, state_sums : sequence of array_like
        Parameters, gradients and the sums of squared gradients, aligned.
    step : int
        :math:`t` after its increment (1 on the first step).
    lr : float
        :math:`\\eta`.
    lr_decay : float, default 0.0
        :math:`\\delta`.
    weight_decay : float, default 0.0
        L2 decay :math:`\\lambda`.
    eps : float, default 1e-10
        :math:`\\epsilon`.
    maximize : bool, default False
        Maximize the objective (negate the gradient).

    Returns
    -------
    tuple of lists of ndarray
        ``(params, state_sums)``, new float64 arrays.
    """
    n = len(params)
    ps = _f64(params, "params")
    gs = _f64(grads, "grads", n)
    ss = _f64(state_sums, "state_sums", n)
    clr = lr / (1.0 + (step - 1) * lr_decay)
    for i in range(n):
        p = ps[i]
        g = _prepare_grad(gs[i], p, maximize, weight_decay)
        s = ss[i] + g * g
        ss[i] = s
        ps[i] = p - clr * g / (np.sqrt(s) + eps)
    return _result(ps, ss)


def rmsprop(params: _Arrays, grads: _Arrays, square_avgs: _Arrays,
            momentum_buffers: Optional[_Arrays] = None, grad_avgs: Optional[_Arrays] = None,
            *, lr: float, alpha: float, eps: float, weight_decay: float = 0.0,
            momentum: float = 0.0, centered: bool = False, maximize: bool = False) -> _Result:
    """One step of RMSprop, with optional momentum and centering.

    :math:`g \\mathrel{+}= \\lambda p`; :math:`v = \\alpha v + (1 - \\alpha) g^2`;
    centered: :math:`\\bar g = \\alpha \\bar g + (1 - \\alpha) g`,
    :math:`d = \\sqrt{v - \\bar g^2} + \\epsilon`, else :math:`d = \\sqrt{v} + \\epsilon`;
    with momentum :math:`b = \\mu b + g / d`, :math:`p \\mathrel{-}= \\eta b`, else
    :math:`p \\mathrel{-}= \\eta g / d`.

    Parameters
    ----------
    params, grads, square_avgs : sequence of array_like
        Parameters, gradients and the averages of squared gradients, aligned.
    momentum_buffers : sequence of array_like, optional
        Needed when `momentum` > 0.
    grad_avgs : sequence of array_like, optional
        The averages of the gradients; needed when `centered`.
    lr : float
        :math:`\\eta`.
    alpha : float
        The smoothing constant :math:`\\alpha`.
    eps : float
        :math:`\\epsilon`.
    weight_decay : float, default 0.0
        L2 decay :math:`\\lambda`.
    momentum : float, default 0.0
        :math:`\\mu`.
    centered : bool, default False
        Normalize by the estimated variance instead of the second moment.
    maximize : bool, default False
        Maximize the objective (negate the gradient).

    Returns
    -------
    tuple of lists of ndarray
        ``(params, square_avgs[, momentum_buffers][, grad_avgs])``, new float64 arrays.
    """
    n = len(params)
    ps = _f64(params, "params")
    gs = _f64(grads, "grads", n)
    vs = _f64(square_avgs, "square_avgs", n)
    bs = _f64(momentum_buffers, "momentum_buffers", n)
    gas = _f64(grad_avgs, "grad_avgs", n)
    if momentum > 0 and bs is None:
        raise ValueError("reference.rmsprop: momentum > 0 needs momentum_buffers")
    if centered and gas is None:
        raise ValueError("reference.rmsprop: centered needs grad_avgs")
    for i in range(n):
        p = ps[i]
        g = _prepare_grad(gs[i], p, maximize, weight_decay)
        v = alpha * vs[i] + (1.0 - alpha) * g * g
        vs[i] = v
        if centered:
            gbar = alpha * gas[i] + (1.0 - alpha) * g
            gas[i] = gbar
            d = np.sqrt(v - gbar * gbar) + eps
        else:
            d = np.sqrt(v) + eps
        if momentum > 0:
            b = momentum * bs[i] + g / d
            bs[i] = b
            ps[i] = p - lr * b
        else:
            ps[i] = p - lr * g / d
    return _result(ps, vs, bs, gas)


def adadelta(params: _Arrays, grads: _Arrays, square_avgs: _Arrays, acc_deltas: _Arrays, *,
             lr: float, rho: float, eps: float, weight_decay: float = 0.0,
             maximize: bool = False) -> _Result:
    """One step of Adadelta.

    :math:`g \\mathrel{+}= \\lambda p`; :math:`v = \\rho v + (1 - \\rho) g^2`;
    :math:`\\Delta = \\sqrt{u + \\epsilon} / \\sqrt{v + \\epsilon}\\; g`;
    :math:`u = \\rho u + (1 - \\rho) \\Delta^2`; :math:`p \\mathrel{-}= \\eta \\Delta`.

    Parameters
    ----------
    params, grads, square_avgs, acc_deltas : sequence of array_like
        Parameters, gradients, the averages of squared gradients (:math:`v`) and of
        squared updates (:math:`u`), aligned.
    lr : float
        :math:`\\eta`.
    rho : float
        :math:`\\rho`.
    eps : float
        :math:`\\epsilon`.
    weight_decay : float, default 0.0
        L2 decay :math:`\\lambda`.
    maximize : bool, default False
        Maximize the objective (negate the gradient).

    Returns
    -------
    tuple of lists of ndarray
        ``(params, square_avgs, acc_deltas)``, new float64 arrays.
    """
    n = len(params)
    ps = _f64(params, "params")
    gs = _f64(grads, "grads", n)
    vs = _f64(square_avgs, "square_avgs", n)
    us = _f64(acc_deltas, "acc_deltas", n)
    for i in range(n):
        p = ps[i]
        g = _prepare_grad(gs[i], p, maximize, weight_decay)
        v = rho * vs[i] + (1.0 - rho) * g * g
        delta = np.sqrt(us[i] + eps) / np.sqrt(v + eps) * g
        us[i] = rho * us[i] + (1.0 - rho) * delta * delta
        vs[i] = v
        ps[i] = p - lr * delta
    return _result(ps, vs, us)


def adam(params: _Arrays, grads: _Arrays, exp_avgs: _Arrays, exp_avg_sqs: _Arrays,
         max_exp_avg_sqs: Optional[_Arrays] = None, *, step: int, lr: float, beta1: float,
         beta2: float, eps: float, weight_decay: float = 0.0, amsgrad: bool = False,
         maximize: bool = False, decoupled_weight_decay: bool = False) -> _Result:
    """One step of Adam (L2 weight decay) or, with `decoupled_weight_decay`, AdamW.

    :math:`g \\mathrel{+}= \\lambda p` (Adam) or :math:`p \\mathrel{*}= 1 - \\eta\\lambda`
    (AdamW); :math:`m = \\beta_1 m + (1 - \\beta_1) g`;
    :math:`v = \\beta_2 v + (1 - \\beta_2) g^2`; amsgrad:
    :math:`\\hat v = \\max(\\hat v, v)`, else :math:`\\hat v = v`;
    :math:`p \\mathrel{-}= \\frac{\\eta}{1 - \\beta_1^t}\\,
    \\frac{m}{\\sqrt{\\hat v} / \\sqrt{1 - \\beta_2^t} + \\epsilon}`.

    Parameters
    ----------
    params, grads, exp_avgs, exp_avg_sqs : sequence of array_like
        Parameters, gradients, first and second moments, aligned.
    max_exp_avg_sqs : sequence of array_like, optional
        The running maxima of the second moment; needed when `amsgrad`.
    step : int
        :math:`t` after its increment (1 on the first step).
    lr : float
        :math:`\\eta`.
    beta1, beta2 : float
        :math:`\\beta_1, \\beta_2`.
    eps : float
        :math:`\\epsilon`.
    weight_decay : float, default 0.0
        :math:`\\lambda`.
    amsgrad : bool, default False
        Use the running maximum of the second moment.
    maximize : bool, default False
        Maximize the objective (negate the gradient).
    decoupled_weight_decay : bool, default False
        Decay the params directly (AdamW) instead of adding :math:`\\lambda p` to the
        gradient.

    Returns
    -------
    tuple of lists of ndarray
        ``(params, exp_avgs, exp_avg_sqs[, max_exp_avg_sqs])``, new float64 arrays.

    Examples
    --------
    >>> import numpy as np
    >>> from fusedopt import reference
    >>> z = [np.zeros(2)]
    >>> p, m, v = reference.adam([np.ones(2)], [np.array([1.0, -1.0])], z, z, step=1,
    ...                          lr=0.1, beta1=0.9, beta2=0.999, eps=1e-8)
    >>> np.round(p[0], 6)          # the first step moves each element by lr
    array([0.9, 1.1])
    """
    n = len(params)
    ps = _f64(params, "params")
    gs = _f64(grads, "grads", n)
    ms = _f64(exp_avgs, "exp_avgs", n)
    vs = _f64(exp_avg_sqs, "exp_avg_sqs", n)
    vmaxs = _f64(max_exp_avg_sqs, "max_exp_avg_sqs", n)
    if amsgrad and vmaxs is None:
        raise ValueError("reference.adam: amsgrad needs max_exp_avg_sqs")
    bias_correction1 = 1.0 - beta1 ** step
    bias_correction2 = 1.0 - beta2 ** step
    for i in range(n):
        p = ps[i]
        g = -gs[i] if maximize else gs[i]
        if decoupled_weight_decay:
            p = p * (1.0 - lr * weight_decay)
        elif weight_decay != 0:
            g = g + weight_decay * p
        m = beta1 * ms[i] + (1.0 - beta1) * g
        v = beta2 * vs[i] + (1.0 - beta2) * g * g
        ms[i], vs[i] = m, v
        if amsgrad:
            vhat = np.maximum(vmaxs[i], v)
            vmaxs[i] = vhat
        else:
            vhat = v
        denom = np.sqrt(vhat) / np.sqrt(bias_correction2) + eps
        ps[i] = p - lr / bias_correction1 * m / denom
    return _result(ps, ms, vs, vmaxs)


def adamw(params: _Arrays, grads: _Arrays, exp_avgs: _Arrays, exp_avg_sqs: _Arrays,
          max_exp_avg_sqs: Optional[_Arrays] = None, *, step: int, lr: float, beta1: float,
          beta2: float, eps: float, weight_decay: float = 1e-2, amsgrad: bool = False,
          maximize: bool = False, decoupled_weight_decay: bool = True) -> _Result:
    """One step of AdamW: `adam` with decoupled weight decay (default 1e-2, as
    torch.optim.AdamW).

    Parameters
    ----------
    params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs
        As for `adam`.
    step, lr, beta1, beta2, eps, amsgrad, maximize
        As for `adam`.
    weight_decay : float, default 1e-2
        :math:`\\lambda`, applied as :math:`p \\mathrel{*}= 1 - \\eta\\lambda`.
    decoupled_weight_decay : bool, default True
        False gives `adam`'s L2 decay.

    Returns
    -------
    tuple of lists of ndarray
        ``(params, exp_avgs, exp_avg_sqs[, max_exp_avg_sqs])``, new float64 arrays.
    """
    return adam(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, step=step, lr=lr,
                beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay,
                amsgrad=amsgrad, maximize=maximize,
                decoupled_weight_decay=decoupled_weight_decay)
