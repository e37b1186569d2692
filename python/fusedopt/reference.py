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

from typing import Any, Optional, Sequence, Tuple

import numpy as np
from numpy.typing import ArrayLike

__all__ = ["sgd", "adagrad", "rmsprop", "adadelta", "adam", "adamw", "nadam", "radam", "adamax",
           "asgd", "rprop", "lion", "lamb", "lars", "adamw_schedulefree"]
__all__ += ["dynamic_map", "quantize_blockwise", "dequantize_blockwise"]
__all__ += ["sparse_adam"]
__all__ += ["muon", "newton_schulz"]
__all__ += ["adafactor"]

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


def nadam(params: _Arrays, grads: _Arrays, exp_avgs: _Arrays, exp_avg_sqs: _Arrays, *,
          step: int, lr: float, beta1: float, beta2: float, eps: float,
          weight_decay: float = 0.0, momentum_decay: float = 4e-3, mu_product: float,
          maximize: bool = False, decoupled_weight_decay: bool = False) -> _Result:
    """One step of NAdam (torch.optim.NAdam's algorithm), with L2 or decoupled weight decay.

    The momentum coefficients :math:`\\mu_t = \\beta_1 (1 - \\tfrac12\\, 0.96^{t\\psi})`
    and their product :math:`\\Pi_t = \\mu_1 \\cdots \\mu_t`;
    :math:`g \\mathrel{+}= \\lambda p` (L2) or :math:`p \\mathrel{*}= 1 - \\eta\\lambda`
    (decoupled); :math:`m = \\beta_1 m + (1 - \\beta_1) g`;
    :math:`v = \\beta_2 v + (1 - \\beta_2) g^2`;
    :math:`p \\mathrel{-}= \\eta \\left(\\frac{(1 - \\mu_t)\\, g}{1 - \\Pi_t} +
    \\frac{\\mu_{t+1}\\, m}{1 - \\Pi_t \\mu_{t+1}}\\right) /
    \\left(\\sqrt{v / (1 - \\beta_2^t)} + \\epsilon\\right)`.

    Parameters
    ----------
    params, grads, exp_avgs, exp_avg_sqs : sequence of array_like
        Parameters, gradients, first and second moments, aligned.
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
    momentum_decay : float, default 4e-3
        :math:`\\psi`.
    mu_product : float
        :math:`\\Pi_t`, this step's coefficient included (torch's ``mu_product`` after
        the step).
    maximize : bool, default False
        Maximize the objective (negate the gradient).
    decoupled_weight_decay : bool, default False
        Decay the params directly instead of adding :math:`\\lambda p` to the gradient.

    Returns
    -------
    tuple of lists of ndarray
        ``(params, exp_avgs, exp_avg_sqs)``, new float64 arrays.
    """
    n = len(params)
    ps = _f64(params, "params")
    gs = _f64(grads, "grads", n)
    ms = _f64(exp_avgs, "exp_avgs", n)
    vs = _f64(exp_avg_sqs, "exp_avg_sqs", n)
    mu = beta1 * (1.0 - 0.5 * 0.96 ** (step * momentum_decay))
    mu_next = beta1 * (1.0 - 0.5 * 0.96 ** ((step + 1) * momentum_decay))
    for i in range(n):
        p = ps[i]
        g = -gs[i] if maximize else gs[i]
        if weight_decay != 0:
            if decoupled_weight_decay:
                p = p * (1.0 - lr * weight_decay)
            else:
                g = g + weight_decay * p
        m = beta1 * ms[i] + (1.0 - beta1) * g
        v = beta2 * vs[i] + (1.0 - beta2) * g * g
        ms[i], vs[i] = m, v
        m_hat = (mu_next * m / (1.0 - mu_product * mu_next)
                 + (1.0 - mu) * g / (1.0 - mu_product))
        v_hat = v / (1.0 - beta2 ** step)
        ps[i] = p - lr * m_hat / (np.sqrt(v_hat) + eps)
    return _result(ps, ms, vs)


def radam(params: _Arrays, grads: _Arrays, exp_avgs: _Arrays, exp_avg_sqs: _Arrays, *,
          step: int, lr: float, beta1: float, beta2: float, eps: float,
          weight_decay: float = 0.0, maximize: bool = False,
          decoupled_weight_decay: bool = False) -> _Result:
    """One step of RAdam (torch.optim.RAdam's algorithm), with L2 or decoupled weight decay.

    :math:`g \\mathrel{+}= \\lambda p` (L2) or :math:`p \\mathrel{*}= 1 - \\eta\\lambda`
    (decoupled); :math:`m = \\beta_1 m + (1 - \\beta_1) g`;
    :math:`v = \\beta_2 v + (1 - \\beta_2) g^2`. The length of the approximated simple
    moving average :math:`\\rho_t = \\rho_\\infty - 2 t \\beta_2^t / (1 - \\beta_2^t)`,
    :math:`\\rho_\\infty = 2 / (1 - \\beta_2) - 1`, decides: above 5 the adaptive step,
    rectified by :math:`r_t = \\sqrt{(\\rho_t - 4)(\\rho_t - 2)\\rho_\\infty /
    ((\\rho_\\infty - 4)(\\rho_\\infty - 2)\\rho_t)}`,
    :math:`p \\mathrel{-}= \\frac{\\eta\\, r_t}{1 - \\beta_1^t}\\, m\\,
    \\frac{\\sqrt{1 - \\beta_2^t}}{\\sqrt{v} + \\epsilon}`; otherwise
    :math:`p \\mathrel{-}= \\frac{\\eta}{1 - \\beta_1^t}\\, m`.

    Parameters
    ----------
    params, grads, exp_avgs, exp_avg_sqs : sequence of array_like
        Parameters, gradients, first and second moments, aligned.
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
    maximize : bool, default False
        Maximize the objective (negate the gradient).
    decoupled_weight_decay : bool, default False
        Decay the params directly instead of adding :math:`\\lambda p` to the gradient.

    Returns
    -------
    tuple of lists of ndarray
        ``(params, exp_avgs, exp_avg_sqs)``, new float64 arrays.
    """
    n = len(params)
    ps = _f64(params, "params")
    gs = _f64(grads, "grads", n)
    ms = _f64(exp_avgs, "exp_avgs", n)
    vs = _f64(exp_avg_sqs, "exp_avg_sqs", n)
    rho_inf = 2.0 / (1.0 - beta2) - 1.0
    rho_t = rho_inf - 2.0 * step * beta2 ** step / (1.0 - beta2 ** step)
    for i in range(n):
        p = ps[i]
        g = -gs[i] if maximize else gs[i]
        if weight_decay != 0:
            if decoupled_weight_decay:
                p = p * (1.0 - lr * weight_decay)
            else:
                g = g + weight_decay * p
        m = beta1 * ms[i] + (1.0 - beta1) * g
        v = beta2 * vs[i] + (1.0 - beta2) * g * g
        ms[i], vs[i] = m, v
        m_hat = m / (1.0 - beta1 ** step)
        if rho_t > 5.0:
            adaptive = np.sqrt(1.0 - beta2 ** step) / (np.sqrt(v) + eps)
            rect = np.sqrt((rho_t - 4.0) * (rho_t - 2.0) * rho_inf
                           / ((rho_inf - 4.0) * (rho_inf - 2.0) * rho_t))
            ps[i] = p - lr * m_hat * adaptive * rect
        else:
            ps[i] = p - lr * m_hat
    return _result(ps, ms, vs)


def adamax(params: _Arrays, grads: _Arrays, exp_avgs: _Arrays, exp_infs: _Arrays, *,
           step: int, lr: float, beta1: float, beta2: float, eps: float,
           weight_decay: float = 0.0, maximize: bool = False) -> _Result:
    """One step of Adamax (torch.optim.Adamax's algorithm).

    :math:`g \\mathrel{+}= \\lambda p`; :math:`m = \\beta_1 m + (1 - \\beta_1) g`;
    :math:`u = \\max(\\beta_2 u, |g| + \\epsilon)`, a NaN kept (as torch.maximum keeps
    it); :math:`p \\mathrel{-}= \\frac{\\eta}{1 - \\beta_1^t}\\, m / u`.

    Parameters
    ----------
    params, grads, exp_avgs, exp_infs : sequence of array_like
        Parameters, gradients, first moments and infinity norms, aligned.
    step : int
        :math:`t` after its increment (1 on the first step).
    lr : float
        :math:`\\eta`.
    beta1, beta2 : float
        :math:`\\beta_1, \\beta_2`.
    eps : float
        :math:`\\epsilon`.
    weight_decay : float, default 0.0
        L2 decay :math:`\\lambda`.
    maximize : bool, default False
        Maximize the objective (negate the gradient).

    Returns
    -------
    tuple of lists of ndarray
        ``(params, exp_avgs, exp_infs)``, new float64 arrays.
    """
    n = len(params)
    ps = _f64(params, "params")
    gs = _f64(grads, "grads", n)
    ms = _f64(exp_avgs, "exp_avgs", n)
    us = _f64(exp_infs, "exp_infs", n)
    for i in range(n):
        p = ps[i]
        g = _prepare_grad(gs[i], p, maximize, weight_decay)
        m = beta1 * ms[i] + (1.0 - beta1) * g
        u = np.maximum(beta2 * us[i], np.abs(g) + eps)
        ms[i], us[i] = m, u
        ps[i] = p - lr / (1.0 - beta1 ** step) * m / u
    return _result(ps, ms, us)


def asgd(params: _Arrays, grads: _Arrays, axs: _Arrays, *, step: int, lr: float,
         lambd: float = 1e-4, alpha: float = 0.75, t0: float = 1e6, weight_decay: float = 0.0,
         maximize: bool = False, eta: Optional[float] = None,
         mu: Optional[float] = None) -> _Result:
    """One step of ASGD (torch.optim.ASGD's algorithm): SGD with a decaying rate, and the
    running average of the iterates.

    :math:`g \\mathrel{+}= \\lambda_2 p`;
    :math:`p = p\\,(1 - \\lambda \\eta_t) - \\eta_t\\, g`;
    :math:`a = a + \\mu_t (p - a)`, or :math:`a = p` while :math:`\\mu_t = 1`. Step
    :math:`t`'s rate and averaging coefficient are `eta` and `mu` when given (torch's
    state before the step), else
    :math:`\\eta_t = \\eta / (1 + \\lambda \\eta (t - 1))^\\alpha` and
    :math:`\\mu_t = 1 / \\max(1, t - 1 - t_0)`.

    Parameters
    ----------
    params, grads, axs : sequence of array_like
        Parameters, gradients and the running averages of the params, aligned.
    step : int
        :math:`t` after its increment (1 on the first step).
    lr : float
        :math:`\\eta`, from which the rate decays.
    lambd : float, default 1e-4
        :math:`\\lambda`.
    alpha : float, default 0.75
        :math:`\\alpha`.
    t0 : float, default 1e6
        :math:`t_0`, the step from which the iterates are averaged.
    weight_decay : float, default 0.0
        L2 decay :math:`\\lambda_2`.
    maximize : bool, default False
        Maximize the objective (negate the gradient).
    eta : float, optional
        :math:`\\eta_t`.
    mu : float, optional
        :math:`\\mu_t`.

    Returns
    -------
    tuple of lists of ndarray
        ``(params, axs)``, new float64 arrays.
    """
    n = len(params)
    ps = _f64(params, "params")
    gs = _f64(grads, "grads", n)
    axs_ = _f64(axs, "axs", n)
    if eta is None:
        eta = lr / (1.0 + lambd * lr * (step - 1)) ** alpha
    if mu is None:
        mu = 1.0 / max(1.0, step - 1 - t0)
    for i in range(n):
        p = ps[i]
        g = _prepare_grad(gs[i], p, maximize, weight_decay)
        p = p * (1.0 - lambd * eta) - eta * g
        ps[i] = p
        axs_[i] = p.copy() if mu == 1 else axs_[i] + mu * (p - axs_[i])
    return _result(ps, axs_)


def _torch_sign(x):
    """torch.sign: -1, 0 or 1, and 0 for NaN."""
    return np.where(np.isnan(x), 0.0, np.sign(x))


def rprop(params: _Arrays, grads: _Arrays, prevs: _Arrays, step_sizes: _Arrays, *,
          etaminus: float, etaplus: float, step_size_min: float, step_size_max: float,
          maximize: bool = False, lr: Optional[float] = None) -> _Result:
    """One step of Rprop (torch.optim.Rprop's algorithm).

    Each step size :math:`s` grows by :math:`\\eta_+` where the gradient kept the
    previous gradient's sign, shrinks by :math:`\\eta_-` where it flipped (and the
    gradient counts as 0 there), and is clamped to :math:`[s_{min}, s_{max}]` every
    step, a NaN kept, as torch clamps it; :math:`p \\mathrel{-}= \\mathrm{sign}(g)\\, s`
    with torch.sign's signs (0 for NaN); the gradient becomes the previous one.

    Parameters
    ----------
    params, grads, prevs, step_sizes : sequence of array_like
        Parameters, gradients, previous gradients and step sizes, aligned.
    etaminus, etaplus : float
        :math:`\\eta_-, \\eta_+`.
    step_size_min, step_size_max : float
        :math:`s_{min}, s_{max}`.
    maximize : bool, default False
        Maximize the objective (negate the gradient).
    lr : float, optional
        Plays no part in the update (the classes start the step sizes at it); taken
        for the functional op's signature.

    Returns
    -------
    tuple of lists of ndarray
        ``(params, prevs, step_sizes)``, new float64 arrays.
    """
    n = len(params)
    ps = _f64(params, "params")
    gs = _f64(grads, "grads", n)
    prev_ = _f64(prevs, "prevs", n)
    sizes = _f64(step_sizes, "step_sizes", n)
    for i in range(n):
        g = -gs[i] if maximize else gs[i]
        same = _torch_sign(g * prev_[i])
        size = np.where(same > 0, sizes[i] * etaplus,
                        np.where(same < 0, sizes[i] * etaminus, sizes[i]))
        size = np.minimum(np.maximum(size, step_size_min), step_size_max)
        g = np.where(same < 0, 0.0, g)
        ps[i] = ps[i] - _torch_sign(g) * size
        prev_[i], sizes[i] = g, size
    return _result(ps, prev_, sizes)
# --- blockwise 8-bit state ------------------------------------------------------------------------

_BLOCK = 256  # elements per block scale


def dynamic_map(signed: bool) -> np.ndarray:
    """The 256 values of the dynamic quantization map, sorted, in float64.

    Dettmers et al.'s map (bitsandbytes' ``create_dynamic_map``): for each decade
    :math:`i = 0..6`, the midpoints of :math:`n_i` equal intervals of :math:`[0.1, 1]`
    times :math:`10^{i-6}`, with :math:`n_i = 2^i` (signed map, and their negatives)
    or :math:`2^{i+1}` (unsigned map); and 0 and 1.

    Parameters
    ----------
    signed : bool
        The signed map (for states of either sign) or the unsigned one (for states
        that are never negative).

    Returns
    -------
    ndarray
        The 256 values, ascending; a code is an index into it.

    Examples
    --------
    >>> from fusedopt import reference
    >>> table = reference.dynamic_map(signed=True)
    >>> print(table.size, table[0], table[-1])
    256 -0.99296875 1.0
    """
    values = [0.0, 1.0]
    for i in range(7):
        n = 2 ** i if signed else 2 ** (i + 1)
        means = 0.1 + 0.9 * (np.arange(n) + 0.5) / n
        values += list(10.0 ** (i - 6) * means)
        if signed:
            values += list(-10.0 ** (i - 6) * means)
    out = np.sort(np.array(values))
    assert out.size == 256
    return out


def quantize_blockwise(values: ArrayLike, signed: bool) -> Tuple[np.ndarray, np.ndarray]:
    """Blockwise 8-bit codes and scales of a flat array, by brute force.

    In blocks of 256 elements (the last may be shorter), each block's scale is its
    largest magnitude and each code the index of the map value nearest to
    value / scale (the lower one on a tie). A block of zeros gets scale 0 and the code
    of 0; negative values count as 0 under the unsigned map.

    Parameters
    ----------
    values : array_like
        The values, flattened.
    signed : bool
        Which map (`dynamic_map`).

    Returns
    -------
    codes : ndarray of int64
        One code per value.
    scales : ndarray of float64
        One scale per block.

    Examples
    --------
    >>> import numpy as np
    >>> from fusedopt import reference
    >>> codes, scales = reference.quantize_blockwise(np.array([0.5, -2.0]), signed=True)
    >>> print(scales, reference.dequantize_blockwise(codes, scales, signed=True))
    [2.] [ 0.4953125 -1.9859375]
    """
    x = np.asarray(values, dtype=np.float64).ravel()
    table = dynamic_map(signed)
    zero = int(np.flatnonzero(table == 0.0)[0])
    codes = np.empty(x.size, dtype=np.int64)
    scales = np.zeros((x.size + _BLOCK - 1) // _BLOCK)
    for b in range(scales.size):
        block = x[b * _BLOCK:(b + 1) * _BLOCK]
        scale = np.abs(block).max()
        scales[b] = scale
        if scale == 0.0:
            codes[b * _BLOCK:(b + 1) * _BLOCK] = zero
            continue
        y = block / scale if signed else np.maximum(block, 0.0) / scale
        codes[b * _BLOCK:(b + 1) * _BLOCK] = np.abs(y[:, None] - table[None, :]).argmin(axis=1)
    return codes, scales


def dequantize_blockwise(codes: ArrayLike, scales: ArrayLike, signed: bool) -> np.ndarray:
    """The float64 values of blockwise 8-bit codes: map value times the block's scale.

    Parameters
    ----------
    codes : array_like of int
        One code per element (an index into `dynamic_map`), flattened.
    scales : array_like
        One scale per block of 256 elements.
    signed : bool
        Which map (`dynamic_map`).

    Returns
    -------
    ndarray
        The values, flat.

    Examples
    --------
    >>> import numpy as np
    >>> from fusedopt import reference
    >>> reference.dequantize_blockwise(np.array([0, 255]), np.array([3.0]), signed=False)
    array([0., 3.])
    """
    codes = np.asarray(codes).ravel().astype(np.int64)
    scales = np.repeat(np.asarray(scales, dtype=np.float64), _BLOCK)[:codes.size]
    return dynamic_map(signed)[codes] * scales


def lion(params: _Arrays, grads: _Arrays, exp_avgs: _Arrays, *, lr: float, beta1: float,
         beta2: float, weight_decay: float = 0.0, maximize: bool = False) -> _Result:
    """One step of Lion (Chen et al. 2023, Algorithm 2).

    :math:`c = \\beta_1 m + (1 - \\beta_1) g`;
    :math:`p \\leftarrow p - \\eta (\\mathrm{sign}(c) + \\lambda p)`;
    :math:`m \\leftarrow \\beta_2 m + (1 - \\beta_2) g`.

    Parameters
    ----------
    params, grads, exp_avgs : sequence of array_like
        Parameters, gradients and momentum buffers, aligned.
    lr : float
        :math:`\\eta`.
    beta1, beta2 : float
        :math:`\\beta_1` (the update's interpolation), :math:`\\beta_2` (the momentum's
        decay).
    weight_decay : float, default 0.0
        :math:`\\lambda`, decoupled.
    maximize : bool, default False
        Maximize the objective (negate the gradient).

    Returns
    -------
    tuple of lists of ndarray
        ``(params, exp_avgs)``, new float64 arrays.
    """
    n = len(params)
    ps = _f64(params, "params")
    gs = _f64(grads, "grads", n)
    ms = _f64(exp_avgs, "exp_avgs", n)
    for i in range(n):
        g = -gs[i] if maximize else gs[i]
        c = beta1 * ms[i] + (1.0 - beta1) * g
        ps[i] = ps[i] - lr * (np.sign(c) + weight_decay * ps[i])
        ms[i] = beta2 * ms[i] + (1.0 - beta2) * g
    return _result(ps, ms)


def _lerp(a, b, w):
    """torch.lerp's formula, the package's: a + w (b - a) for |w| < 0.5, else
    b - (b - a)(1 - w); (1 - w) a + w b in exact arithmetic, and the same infinities
    and NaNs as the package."""
    return a + w * (b - a) if abs(w) < 0.5 else b - (b - a) * (1.0 - w)


def _trust_ratio(p, u, coefficient=1.0, eps=0.0):
    """optax's scale_by_trust_ratio: coefficient |p| / (|u| + eps) over the whole
    tensor, 1 where either norm is 0."""
    p_norm = np.sqrt(np.sum(p * p))
    u_norm = np.sqrt(np.sum(u * u))
    if p_norm == 0.0 or u_norm == 0.0:
        return 1.0
    return coefficient * p_norm / (u_norm + eps)


def lamb(params: _Arrays, grads: _Arrays, exp_avgs: _Arrays, exp_avg_sqs: _Arrays, *,
         step: int, lr: float, beta1: float, beta2: float, eps: float,
         weight_decay: float = 0.0) -> _Result:
    """One step of LAMB with optax.lamb's equations (scale_by_adam, add_decayed_weights,
    scale_by_trust_ratio, scale_by_learning_rate).

    :math:`m = \\beta_1 m + (1 - \\beta_1) g`; :math:`v = \\beta_2 v + (1 - \\beta_2) g^2`;
    :math:`u = \\hat m / (\\sqrt{\\hat v} + \\epsilon) + \\lambda p` with the bias-corrected
    moments; :math:`p \\leftarrow p - \\eta \\, \\|p\\| / \\|u\\| \\, u`, the norms over
    each whole tensor, the ratio 1 where either norm is 0.

    Parameters
    ----------
    params, grads, exp_avgs, exp_avg_sqs : sequence of array_like
        Parameters, gradients, first and second moments, aligned.
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

    Returns
    -------
    tuple of lists of ndarray
        ``(params, exp_avgs, exp_avg_sqs)``, new float64 arrays.
    """
    n = len(params)
    ps = _f64(params, "params")
    gs = _f64(grads, "grads", n)
    ms = _f64(exp_avgs, "exp_avgs", n)
    vs = _f64(exp_avg_sqs, "exp_avg_sqs", n)
    for i in range(n):
        p, g = ps[i], gs[i]
        ms[i] = beta1 * ms[i] + (1.0 - beta1) * g
        vs[i] = beta2 * vs[i] + (1.0 - beta2) * g * g
        m_hat = ms[i] / (1.0 - beta1 ** step)
        v_hat = vs[i] / (1.0 - beta2 ** step)
        u = m_hat / (np.sqrt(v_hat) + eps)
        if weight_decay != 0:  # as the kernels: 0 * inf would be NaN
            u = u + weight_decay * p
        ps[i] = p - lr * _trust_ratio(p, u) * u
    return _result(ps, ms, vs)


def lars(params: _Arrays, grads: _Arrays, momentum_buffers: Optional[_Arrays] = None, *,
         lr: float, momentum: float = 0.9, weight_decay: float = 0.0,
         trust_coefficient: float = 0.001, eps: float = 0.0,
         nesterov: bool = False) -> _Result:
    """One step of LARS with optax.lars's equations (add_decayed_weights,
    scale_by_trust_ratio, scale_by_learning_rate, trace).

    :math:`u = g + \\lambda p`;
    :math:`u \\leftarrow -\\eta \\, \\tau \\|p\\| / (\\|u\\| + \\epsilon) \\, u` (per
    tensor; the ratio 1 where a norm is 0); :math:`b \\leftarrow u + \\mu b`;
    :math:`p \\leftarrow p + b`, or :math:`p + u + \\mu b` with Nesterov. Without
    momentum the buffers are optional and :math:`p \\leftarrow p + u`.

    Parameters
    ----------
    params, grads : sequence of array_like
        Parameters and gradients, aligned.
    momentum_buffers : sequence of array_like, optional
        The momentum traces :math:`b`; needed when `momentum` is not 0.
    lr : float
        :math:`\\eta`.
    momentum : float, default 0.9
        :math:`\\mu`.
    weight_decay : float, default 0.0
        :math:`\\lambda`.
    trust_coefficient : float, default 0.001
        :math:`\\tau`.
    eps : float, default 0.0
        :math:`\\epsilon`, added to the update's norm.
    nesterov : bool, default False
        Nesterov momentum.

    Returns
    -------
    tuple of lists of ndarray
        ``(params, momentum_buffers)``, or ``(params,)`` without buffers: new float64
        arrays.
    """
    n = len(params)
    ps = _f64(params, "params")
    gs = _f64(grads, "grads", n)
    bs = _f64(momentum_buffers, "momentum_buffers", n)
    if momentum != 0 and bs is None:
        raise ValueError("reference.lars: momentum != 0 needs momentum_buffers")
    for i in range(n):
        p = ps[i]
        u = gs[i] + weight_decay * p if weight_decay != 0 else gs[i]
        u = -lr * _trust_ratio(p, u, trust_coefficient, eps) * u
        if bs is not None:
            bs[i] = u + momentum * bs[i]
            ps[i] = p + (u + momentum * bs[i] if nesterov else bs[i])
        else:
            ps[i] = p + u
    return _result(ps, bs)


def adamw_schedulefree(params: _Arrays, grads: _Arrays, zs: _Arrays, exp_avg_sqs: _Arrays,
                       *, step: int, lr: float, beta1: float, beta2: float, eps: float,
                       ckp1: float, weight_decay: float = 0.0) -> _Result:
    """One step of schedule-free AdamW (Defazio et al. 2024) as the schedulefree package's
    AdamWScheduleFree steps in train mode (the params hold y).

    :math:`v = \\beta_2 v + (1 - \\beta_2) g^2`;
    :math:`u = g / (\\sqrt{v / (1 - \\beta_2^t)} + \\epsilon) + \\lambda y`;
    :math:`y \\leftarrow (1 - c) y + c z + \\eta (\\beta_1 (1 - c) - 1) u`;
    :math:`z \\leftarrow z - \\eta u`.

    Parameters
    ----------
    params, grads, zs, exp_avg_sqs : sequence of array_like
        Parameters (y), gradients, base sequences z and second moments, aligned.
    step : int
        :math:`t = k + 1` (1 on the first step).
    lr : float
        :math:`\\eta`, this step's rate (warmup applied).
    beta1, beta2 : float
        :math:`\\beta_1` (interpolation between the average and z), :math:`\\beta_2`.
    eps : float
        :math:`\\epsilon`.
    ckp1 : float
        :math:`c`, the weight of this step's iterate in the average.
    weight_decay : float, default 0.0
        :math:`\\lambda`, taken at y.

    Returns
    -------
    tuple of lists of ndarray
        ``(params, zs, exp_avg_sqs)``, new float64 arrays.
    """
    n = len(params)
    ys = _f64(params, "params")
    gs = _f64(grads, "grads", n)
    zs = _f64(zs, "zs", n)
    vs = _f64(exp_avg_sqs, "exp_avg_sqs", n)
    for i in range(n):
        y, g, z = ys[i], gs[i], zs[i]
        vs[i] = beta2 * vs[i] + (1.0 - beta2) * g * g
        u = g / (np.sqrt(vs[i] / (1.0 - beta2 ** step)) + eps)
        if weight_decay != 0:  # as the kernel and the package: 0 * inf would be NaN
            u = u + weight_decay * y
        ys[i] = _lerp(y, z, ckp1) + lr * (beta1 * (1.0 - ckp1) - 1.0) * u
        zs[i] = z - lr * u
    return _result(ys, zs, vs)


def sparse_adam(params: _Arrays, rows: _Arrays, values: _Arrays, exp_avgs: _Arrays,
                exp_avg_sqs: _Arrays, *, step: int, lr: float, beta1: float, beta2: float,
                eps: float, maximize: bool = False) -> _Result:
    """One step of SparseAdam (torch.optim.SparseAdam) on row-sparse gradients.

    The gradient of ``params[j]`` is ``values[j]`` at the indices ``rows[j]`` along the
    first dimension, repeats summed. On the touched rows:
    :math:`m \\mathrel{+}= (1 - \\beta_1)(g - m)`,
    :math:`v \\mathrel{+}= (1 - \\beta_2)(g^2 - v)`,
    :math:`p \\mathrel{-}= \\eta \\frac{\\sqrt{1 - \\beta_2^t}}{1 - \\beta_1^t}
    \\frac{m}{\\sqrt{v} + \\epsilon}`; the other rows, and their moments, are copied
    unchanged.

    Parameters
    ----------
    params, exp_avgs, exp_avg_sqs : sequence of array_like
        Parameters, first and second moments, aligned.
    rows : sequence of array_like
        1-D integer indices of the gradient rows of each param.
    values : sequence of array_like
        The gradient rows: ``values[j]`` has shape ``(len(rows[j]), *params[j].shape[1:])``.
    step : int
        :math:`t` after its increment (1 on the first step).
    lr : float
        :math:`\\eta`.
    beta1, beta2 : float
        :math:`\\beta_1, \\beta_2`.
    eps : float
        :math:`\\epsilon`.
    maximize : bool, default False
        Maximize the objective (negate the gradient).

    Returns
    -------
    tuple of lists of ndarray
        ``(params, exp_avgs, exp_avg_sqs)``, new float64 arrays.
    """
    params = _f64(params, "params")
    n = len(params)
    exp_avgs, exp_avg_sqs = _f64(exp_avgs, "exp_avgs", n), _f64(exp_avg_sqs, "exp_avg_sqs", n)
    step_size = lr * np.sqrt(1.0 - beta2**step) / (1.0 - beta1**step)
    for p, r, v, m, s in zip(params, rows, values, exp_avgs, exp_avg_sqs):
        r = np.asarray(r, dtype=np.int64)
        g = np.zeros_like(p)
        np.add.at(g, r, np.asarray(v, dtype=np.float64))  # repeats summed
        if maximize:
            g = -g
        touched = np.unique(r)
        gt, mt, st = g[touched], m[touched], s[touched]
        mt = mt + (1.0 - beta1) * (gt - mt)
        st = st + (1.0 - beta2) * (gt * gt - st)
        p[touched] = p[touched] - step_size * mt / (np.sqrt(st) + eps)
        m[touched], s[touched] = mt, st
    return _result(params, exp_avgs, exp_avg_sqs)


def newton_schulz(g: ArrayLike, coefficients: Tuple[float, float, float] = (3.4445, -4.7750,
                                                                            2.0315),
                  steps: int = 5, eps: float = 1e-7) -> np.ndarray:
    """torch.optim.Muon's orthogonalization of one matrix, in float64.

    :math:`X = G / \\max(\\lVert G \\rVert_F, \\epsilon)` (transposed while it has more
    rows than columns), then `steps` times :math:`A = X X^T`,
    :math:`X = a X + (b A + c A^2) X`.

    Parameters
    ----------
    g : array_like
        The matrix (2-D).
    coefficients : tuple of float, default (3.4445, -4.7750, 2.0315)
        :math:`a, b, c`.
    steps : int, default 5
        The number of iterations.
    eps : float, default 1e-7
        :math:`\\epsilon`.

    Returns
    -------
    ndarray
        The orthogonalized matrix, float64, of the shape of `g`.
    """
    a, b, c = coefficients
    x = np.array(g, dtype=np.float64)
    tall = x.shape[0] > x.shape[1]
    if tall:
        x = x.T
    x = x / max(np.linalg.norm(x), eps)
    for _ in range(steps):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x.T if tall else x


def muon(params: _Arrays, grads: _Arrays, momentum_buffers: _Arrays, *, lr: float,
         weight_decay: float = 0.1, momentum: float = 0.95, nesterov: bool = True,
         ns_coefficients: Tuple[float, float, float] = (3.4445, -4.7750, 2.0315),
         eps: float = 1e-7, ns_steps: int = 5, adjust_lr_fn: Optional[str] = None,
         ns_dtype: str = "float32") -> _Result:
    """One step of Muon (torch.optim.Muon) in float64, the Newton-Schulz iterations
    included.

    :math:`b = \\mu b + (1 - \\mu) g`; :math:`u = g + \\mu (b - g)` (Nesterov) or
    :math:`b`; :math:`p = p (1 - \\eta\\lambda) - \\eta' \\mathrm{NS}(u)` with
    :math:`\\eta' = \\eta \\sqrt{\\max(1, A / B)}` ("original") or
    :math:`0.2\\,\\eta \\sqrt{\\max(A, B)}` ("match_rms_adamw") for an A x B param.

    Parameters
    ----------
    params, grads, momentum_buffers : sequence of array_like
        2-D parameters, their gradients and momentum buffers, aligned.
    lr : float
        :math:`\\eta`.
    weight_decay : float, default 0.1
        :math:`\\lambda`.
    momentum : float, default 0.95
        :math:`\\mu`.
    nesterov : bool, default True
        Nesterov momentum.
    ns_coefficients : tuple of float, default (3.4445, -4.7750, 2.0315)
        The coefficients of `newton_schulz`.
    eps : float, default 1e-7
        The floor of the Frobenius norm in `newton_schulz`.
    ns_steps : int, default 5
        The number of Newton-Schulz iterations.
    adjust_lr_fn : str, optional
        "original" (None) or "match_rms_adamw".
    ns_dtype : str, default "float32"
        Accepted as the op takes it; the reference always iterates in float64.

    Returns
    -------
    tuple of lists of ndarray
        ``(params, momentum_buffers)``, new float64 arrays.
    """
    params = _f64(params, "params")
    bufs = _f64(momentum_buffers, "momentum_buffers", len(params))
    for p, g, b in zip(params, grads, bufs):
        g = np.asarray(g, dtype=np.float64)
        b += (1.0 - momentum) * (g - b)
        u = g + momentum * (b - g) if nesterov else b
        o = newton_schulz(u, ns_coefficients, ns_steps, eps)
        rows, cols = p.shape
        if adjust_lr_fn in (None, "original"):
            ratio = np.sqrt(max(1.0, rows / cols))
        else:
            ratio = 0.2 * np.sqrt(max(rows, cols))
        p *= 1.0 - lr * weight_decay
        p -= lr * ratio * o
    return _result(params, bufs)


def adafactor(params: _Arrays, grads: _Arrays, row_vars: Optional[Sequence[Any]],
              col_vars: Optional[Sequence[Any]], variances: Optional[Sequence[Any]], *,
              step: int, lr: float, beta2_decay: float = -0.8, eps1: Optional[float] = None,
              eps2: float = 1e-3, d: float = 1.0, weight_decay: float = 0.0,
              maximize: bool = False) -> _Result:
    """One step of Adafactor (torch.optim.Adafactor's equations) in float64.

    A param with two or more dimensions keeps row and column factors, a vector or 0-d
    param a full second moment. With :math:`b = t^{\\mathrm{beta2\\_decay}}`:
    :math:`R \\mathrel{+}= b(\\overline{g^2}_j - R)`,
    :math:`C \\mathrel{+}= b(\\overline{g^2}_i - C)`,
    :math:`V = R C / \\max(\\bar R, \\epsilon_1)` (vectors:
    :math:`V \\mathrel{+}= b(g^2 - V)`); :math:`U = g / \\sqrt{\\max(V, \\epsilon_1^2)}`;
    :math:`p = p (1 - \\eta\\lambda) - \\max(\\epsilon_2, \\mathrm{RMS}(p))
    \\min(\\eta, 1/\\sqrt t) / \\max(1, \\mathrm{RMS}(U) / d)\\, U`, with
    :math:`\\mathrm{RMS}(p)` taken before the decay.

    Parameters
    ----------
    params, grads : sequence of array_like
        Parameters and gradients, aligned.
    row_vars, col_vars : sequence of array_like or None, optional
        Row factors of shape ``(*batch, m, 1)`` and column factors of shape
        ``(*batch, 1, n)`` of the params with two or more dimensions; None in the other
        places (or for the whole list when no param has them).
    variances : sequence of array_like or None, optional
        The full second moments of the vectors and 0-d params; None elsewhere.
    step : int
        :math:`t` after its increment (1 on the first step).
    lr : float
        :math:`\\eta`.
    beta2_decay : float, default -0.8
        The exponent of :math:`b`.
    eps1 : float, optional
        :math:`\\epsilon_1`; None: the machine epsilon of the first param's dtype.
    eps2 : float, default 1e-3
        :math:`\\epsilon_2`.
    d : float, default 1.0
        The clipping threshold of :math:`\\mathrm{RMS}(U)`.
    weight_decay : float, default 0.0
        :math:`\\lambda`.
    maximize : bool, default False
        Maximize the objective (negate the gradient).

    Returns
    -------
    tuple of lists
        ``(params, row_vars, col_vars, variances)``: new float64 arrays, None where a
        param has no such buffer.
    """
    if eps1 is None:
        eps1 = float(np.finfo(np.asarray(params[0]).dtype).eps)
    params = _f64(params, "params")
    n = len(params)

    def copies(arrays):
        if arrays is None:
            return [None] * n
        return [None if a is None else np.array(a, dtype=np.float64) for a in arrays]

    rows, cols, var = copies(row_vars), copies(col_vars), copies(variances)
    b = float(step) ** beta2_decay
    rho = min(lr, 1.0 / np.sqrt(step))
    for i, (p, g) in enumerate(zip(params, grads)):
        g = np.asarray(g, dtype=np.float64)
        if maximize:
            g = -g
        alpha = max(eps2, np.sqrt(np.mean(p * p))) * rho
        if weight_decay != 0:
            p *= 1.0 - lr * weight_decay
        if p.ndim > 1:
            rows[i] += b * (np.mean(g * g, axis=-1, keepdims=True) - rows[i])
            cols[i] += b * (np.mean(g * g, axis=-2, keepdims=True) - cols[i])
            estimate = rows[i] * cols[i] / np.maximum(np.mean(rows[i], axis=-2, keepdims=True),
                                                      eps1)
        else:
            var[i] += b * (g * g - var[i])
            estimate = var[i]
        u = g / np.sqrt(np.maximum(estimate, eps1 * eps1))
        denom = max(1.0, np.sqrt(np.mean(u * u)) / d)
        p -= alpha / denom * u
    return params, rows, cols, var
