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
__all__ += ["dynamic_map", "quantize_blockwise", "dequantize_blockwise"]


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


# --- blockwise 8-bit state ------------------------------------------------------------------------

QUANT_BLOCK = 256


def dynamic_map(signed):
    """The 256 values of the dynamic quantization map (Dettmers et al.; bitsandbytes'
    create_dynamic_map), sorted, in float64: for each decade i = 0..6, the midpoints of
    n_i equal intervals of [0.1, 1] times 10^(i-6), with n_i = 2^i (signed map, and
    their negatives) or 2^(i+1) (unsigned map); and 0 and 1."""
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


def quantize_blockwise(values, signed):
    """(codes, scales) of a flat array in blocks of 256 elements (the last may be
    shorter): each block's scale is its largest magnitude, each code the index of the
    map value nearest to value / scale (the lower one on a tie). A block of zeros gets
    scale 0 and the code of 0; negative values of the unsigned map count as 0."""
    x = np.asarray(values, dtype=np.float64).ravel()
    table = dynamic_map(signed)
    zero = int(np.flatnonzero(table == 0.0)[0])
    codes = np.empty(x.size, dtype=np.int64)
    scales = np.zeros((x.size + QUANT_BLOCK - 1) // QUANT_BLOCK)
    for b in range(scales.size):
        block = x[b * QUANT_BLOCK:(b + 1) * QUANT_BLOCK]
        scale = np.abs(block).max()
        scales[b] = scale
        if scale == 0.0:
            codes[b * QUANT_BLOCK:(b + 1) * QUANT_BLOCK] = zero
            continue
        y = block / scale if signed else np.maximum(block, 0.0) / scale
        codes[b * QUANT_BLOCK:(b + 1) * QUANT_BLOCK] = \
            np.abs(y[:, None] - table[None, :]).argmin(axis=1)
    return codes, scales


def dequantize_blockwise(codes, scales, signed):
    """The float64 values of codes and block scales: map value times the block's scale."""
    codes = np.asarray(codes).ravel().astype(np.int64)
    scales = np.repeat(np.asarray(scales, dtype=np.float64), QUANT_BLOCK)[:codes.size]
    return dynamic_map(signed)[codes] * scales
