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

import numpy as np

__all__ = ["sgd", "adagrad", "rmsprop", "adadelta", "adam", "adamw", "lion", "lamb", "lars",
           "adamw_schedulefree"]


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


def sgd(params, grads, momentum_buffers=None, *, lr, momentum=0.0, dampening=0.0,
        weight_decay=0.0, nesterov=False, maximize=False, first_step=False):
    """SGD with optional momentum, dampening and Nesterov momentum.

    With momentum, ``first_step=True`` means the buffers are created by this
    step: b = g, whatever they held before.
    Returns ``(params, momentum_buffers)``, or ``(params,)`` without buffers.
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


def adagrad(params, grads, state_sums, *, step, lr, lr_decay=0.0, weight_decay=0.0,
            eps=1e-10, maximize=False):
    """Adagrad; ``step`` is t after its increment (1 on the first step).

    Returns ``(params, state_sums)``.
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


def rmsprop(params, grads, square_avgs, momentum_buffers=None, grad_avgs=None, *, lr,
            alpha, eps, weight_decay=0.0, momentum=0.0, centered=False, maximize=False):
    """RMSprop with optional momentum and centering.

    Returns ``(params, square_avgs[, momentum_buffers][, grad_avgs])``.
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


def adadelta(params, grads, square_avgs, acc_deltas, *, lr, rho, eps, weight_decay=0.0,
             maximize=False):
    """Adadelta. Returns ``(params, square_avgs, acc_deltas)``."""
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


def adam(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs=None, *, step, lr, beta1,
         beta2, eps, weight_decay=0.0, amsgrad=False, maximize=False,
         decoupled_weight_decay=False):
    """Adam (L2 weight decay) or, with ``decoupled_weight_decay``, AdamW.

    ``step`` is t after its increment (1 on the first step).
    Returns ``(params, exp_avgs, exp_avg_sqs[, max_exp_avg_sqs])``.
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


def adamw(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs=None, *, step, lr, beta1,
          beta2, eps, weight_decay=1e-2, amsgrad=False, maximize=False,
          decoupled_weight_decay=True):
    """AdamW: :func:`adam` with decoupled weight decay (default 1e-2, as torch.optim.AdamW)."""
    return adam(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, step=step, lr=lr,
                beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay,
                amsgrad=amsgrad, maximize=maximize,
                decoupled_weight_decay=decoupled_weight_decay)


def lion(params, grads, exp_avgs, *, lr, beta1, beta2, weight_decay=0.0, maximize=False):
    """Lion (Chen et al. 2023, Algorithm 2): c = beta1 m + (1 - beta1) g;
    p <- p - lr (sign(c) + weight_decay p); m <- beta2 m + (1 - beta2) g.

    Returns ``(params, exp_avgs)``.
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


def _trust_ratio(p, u, coefficient=1.0, eps=0.0):
    """optax's scale_by_trust_ratio: coefficient |p| / (|u| + eps) over the whole
    tensor, 1 where either norm is 0."""
    p_norm = np.sqrt(np.sum(p * p))
    u_norm = np.sqrt(np.sum(u * u))
    if p_norm == 0.0 or u_norm == 0.0:
        return 1.0
    return coefficient * p_norm / (u_norm + eps)


def lamb(params, grads, exp_avgs, exp_avg_sqs, *, step, lr, beta1, beta2, eps,
         weight_decay=0.0):
    """LAMB with optax.lamb's equations (scale_by_adam, add_decayed_weights,
    scale_by_trust_ratio, scale_by_learning_rate): u = m_hat / (sqrt(v_hat) + eps) +
    weight_decay p, p <- p - lr |p| / |u| u, with per-tensor norms. ``step`` is t after
    its increment (1 on the first step).

    Returns ``(params, exp_avgs, exp_avg_sqs)``.
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
        u = m_hat / (np.sqrt(v_hat) + eps) + weight_decay * p
        ps[i] = p - lr * _trust_ratio(p, u) * u
    return _result(ps, ms, vs)


def lars(params, grads, momentum_buffers=None, *, lr, momentum=0.9, weight_decay=0.0,
         trust_coefficient=0.001, eps=0.0, nesterov=False):
    """LARS with optax.lars's equations (add_decayed_weights, scale_by_trust_ratio,
    scale_by_learning_rate, trace): u = g + weight_decay p; u <- -lr
    trust_coefficient |p| / (|u| + eps) u (per tensor; 1 where a norm is 0);
    b <- u + momentum b; p <- p + b, or p + u + momentum b with Nesterov. Without
    momentum the buffers are optional and p <- p + u.

    Returns ``(params, momentum_buffers)``, or ``(params,)`` without buffers.
    """
    n = len(params)
    ps = _f64(params, "params")
    gs = _f64(grads, "grads", n)
    bs = _f64(momentum_buffers, "momentum_buffers", n)
    if momentum != 0 and bs is None:
        raise ValueError("reference.lars: momentum != 0 needs momentum_buffers")
    for i in range(n):
        p = ps[i]
        u = gs[i] + weight_decay * p
        u = -lr * _trust_ratio(p, u, trust_coefficient, eps) * u
        if bs is not None:
            bs[i] = u + momentum * bs[i]
            ps[i] = p + (u + momentum * bs[i] if nesterov else bs[i])
        else:
            ps[i] = p + u
    return _result(ps, bs)


def adamw_schedulefree(params, grads, zs, exp_avg_sqs, *, step, lr, beta1, beta2, eps, ckp1,
                       weight_decay=0.0):
    """Schedule-free AdamW (Defazio et al. 2024), one step of the schedulefree package's
    AdamWScheduleFree in train mode: the params hold y. ``step`` is t = k + 1, ``lr``
    the step's (warmed-up) rate and ``ckp1`` the weight c of this step in the average:
    v = beta2 v + (1 - beta2) g^2; u = g / (sqrt(v / (1 - beta2^t)) + eps) + weight_decay y;
    y <- (1 - c) y + c z + lr (beta1 (1 - c) - 1) u; z <- z - lr u.

    Returns ``(params, zs, exp_avg_sqs)``.
    """
    n = len(params)
    ys = _f64(params, "params")
    gs = _f64(grads, "grads", n)
    zs = _f64(zs, "zs", n)
    vs = _f64(exp_avg_sqs, "exp_avg_sqs", n)
    for i in range(n):
        y, g, z = ys[i], gs[i], zs[i]
        vs[i] = beta2 * vs[i] + (1.0 - beta2) * g * g
        u = g / (np.sqrt(vs[i] / (1.0 - beta2 ** step)) + eps) + weight_decay * y
        ys[i] = (1.0 - ckp1) * y + ckp1 * z + lr * (beta1 * (1.0 - ckp1) - 1.0) * u
        zs[i] = z - lr * u
    return _result(ys, zs, vs)
