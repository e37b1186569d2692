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

__all__ = ["sgd", "adagrad", "rmsprop", "adadelta", "adam", "adamw"]
__all__ += ["sparse_adam"]
__all__ += ["muon", "newton_schulz"]
__all__ += ["adafactor"]


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


def sparse_adam(params, rows, values, exp_avgs, exp_avg_sqs, *, step, lr, beta1, beta2, eps,
                maximize=False):
    """SparseAdam (torch.optim.SparseAdam) on row-sparse gradients: ``values[j]`` holds the
    gradient rows of ``params[j]`` at the indices ``rows[j]`` (along the first dimension),
    repeats summed. On the touched rows: m += (1 - b1) (g - m), v += (1 - b2) (g^2 - v),
    p -= lr sqrt(1 - b2^t) / (1 - b1^t) m / (sqrt(v) + eps); the other rows, and their
    moments, are copied unchanged."""
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


def newton_schulz(g, coefficients=(3.4445, -4.7750, 2.0315), steps=5, eps=1e-7):
    """torch.optim.Muon's orthogonalization of one matrix, in float64: X = G / max(|G|_F,
    eps) (transposed while it has more rows than columns), then `steps` times
    A = X X^T, X = a X + (b A + c A^2) X."""
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


def muon(params, grads, momentum_buffers, *, lr, weight_decay=0.1, momentum=0.95,
         nesterov=True, ns_coefficients=(3.4445, -4.7750, 2.0315), eps=1e-7, ns_steps=5,
         adjust_lr_fn=None, ns_dtype="float32"):
    """Muon (torch.optim.Muon) in float64, the Newton-Schulz iterations included (whatever
    `ns_dtype` says): b = mu b + (1 - mu) g; u = g + mu (b - g) (Nesterov) or b;
    p = p (1 - lr wd) - lr' NS(u), lr' = lr sqrt(max(1, A / B)) ("original") or
    0.2 lr sqrt(max(A, B)) ("match_rms_adamw")."""
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


def adafactor(params, grads, row_vars, col_vars, variances, *, step, lr, beta2_decay=-0.8,
              eps1=None, eps2=1e-3, d=1.0, weight_decay=0.0, maximize=False):
    """Adafactor (torch.optim.Adafactor's equations) in float64. A param with two or more
    dimensions keeps row and column factors (``row_vars[i]`` of shape (*batch, m, 1),
    ``col_vars[i]`` of shape (*batch, 1, n)); a vector or 0-d param a full second moment
    (``variances[i]``); the lists hold None elsewhere. With b = t^beta2_decay:
    R += b (mean_j g^2 - R), C += b (mean_i g^2 - C), V = R C / max(mean_i R, eps1)
    (vectors: V += b (g^2 - V)); U = g / sqrt(max(V, eps1^2));
    p = p (1 - lr wd) - max(eps2, RMS(p)) min(lr, 1/sqrt(t)) / max(1, RMS(U) / d) U, with
    RMS(p) before the decay. eps1 None: the machine epsilon of the first param's dtype."""
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
