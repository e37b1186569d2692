"""LAMB and LARS: per-tensor trust ratios, computed in a first pass over the call.

The case table runs both against their float64 references (every dtype, odd sizes,
16-bit params, thread counts and instruction sets bit for bit, ...). Here: what the
ratio is per tensor and where a norm is 0, the fused first pass's sums against NumPy,
and optax's own lamb and lars, where optax is installed (an extra cross-check: the
suite does not depend on it).
"""

from __future__ import annotations

import numpy as np
import pytest

import fusedopt
from fusedopt import functional as F
from fusedopt import reference as R

LAMB = dict(lr=0.01, beta1=0.9, beta2=0.999, eps=1e-6)
LARS = dict(lr=1.0, momentum=0.9, trust_coefficient=0.01)


def _lamb_direction(p, g, t, weight_decay=0.0, beta1=0.9, beta2=0.999, eps=1e-6):
    """u of a first LAMB step from zero moments (m = (1 - b1) g, v = (1 - b2) g^2)."""
    m, v = (1 - beta1) * g, (1 - beta2) * g * g
    return m / (1 - beta1**t) / (np.sqrt(v / (1 - beta2**t)) + eps) + weight_decay * p


def test_lamb_ratio_is_per_tensor(rng):
    """Each tensor moves by lr |p| / |u| u with its own norms, whatever the other tensors
    of the call hold."""
    shapes = [(300,), (40, 7), (5,)]
    params = [rng.standard_normal(s) for s in shapes]
    params[1] *= 1000.0  # a tensor of another scale must not change the others' ratios
    grads = [rng.standard_normal(s) for s in shapes]
    start = [p.copy() for p in params]
    states = [[np.zeros(s) for s in shapes] for _ in range(2)]
    F.lamb_(params, grads, *states, step=1, weight_decay=0.1, **LAMB)
    for p, p0, g in zip(params, start, grads):
        u = _lamb_direction(p0, g, 1, weight_decay=0.1)
        ratio = np.linalg.norm(p0) / np.linalg.norm(u)
        np.testing.assert_allclose(p, p0 - LAMB["lr"] * ratio * u, rtol=1e-13, atol=1e-15)
    assert not np.allclose(params[1] - start[1], 0.0)


def test_ratio_is_one_where_a_norm_is_zero(rng):
    """optax's rule: a tensor of zeros (|p| = 0) steps with ratio 1, not 0; a zero update
    (|u| = 0) leaves its tensor as it is."""
    g = rng.standard_normal(50)
    # LAMB: zero params, the plain Adam-like direction with ratio 1
    params = [np.zeros(50), rng.standard_normal(50)]
    states = [[np.zeros(50) for _ in range(2)] for _ in range(2)]
    F.lamb_(params, [g, np.zeros(50)], *states, step=1, **LAMB)
    np.testing.assert_allclose(params[0], -LAMB["lr"] * _lamb_direction(0.0, g, 1),
                               rtol=1e-14)
    # LARS: zero params step by -lr u (ratio 1, not the trust coefficient); a zero
    # gradient without weight decay changes nothing
    params = [np.zeros(50), rng.standard_normal(50)]
    before = params[1].copy()
    F.lars_(params, [g, np.zeros(50)], [np.zeros(50), np.zeros(50)], **LARS)
    np.testing.assert_array_equal(params[0], -LARS["lr"] * g)
    np.testing.assert_array_equal(params[1], before)


@pytest.mark.parametrize("momentum,nesterov", [(0.0, False), (0.9, False), (0.9, True)])
def test_lars_trust_coefficient_and_eps(momentum, nesterov, rng):
    p0, g = rng.standard_normal(64), rng.standard_normal(64)
    trace0 = rng.standard_normal(64)
    kw = dict(lr=0.5, momentum=momentum, weight_decay=0.01, trust_coefficient=0.02, eps=0.1,
              nesterov=nesterov)
    p, trace = p0.copy(), trace0.copy()
    F.lars_([p], [g], [trace] if momentum else None, **kw)
    u = g + 0.01 * p0
    u = -0.5 * 0.02 * np.linalg.norm(p0) / (np.linalg.norm(u) + 0.1) * u
    if momentum:
        t = u + momentum * trace0
        np.testing.assert_allclose(trace, t, rtol=1e-14)
        expect = p0 + (u + momentum * t if nesterov else t)
    else:
        expect = p0 + u
    np.testing.assert_allclose(p, expect, rtol=1e-14)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_norms_over_many_blocks(dtype, rng):
    """A tensor of many first-pass blocks (16K elements each) and a 0-d one: the ratio
    from the fused sums equals NumPy's norms to double rounding."""
    shapes = [(1_000_003,), ()]
    params = [np.asarray(rng.standard_normal(s), dtype) for s in shapes]
    grads = [np.asarray(rng.standard_normal(s), dtype) for s in shapes]
    expected = R.lars([p.astype(np.float64) for p in params],
                      [g.astype(np.float64) for g in grads], **dict(LARS, momentum=0.0))[0]
    F.lars_(params, grads, **dict(LARS, momentum=0.0))
    # float32: one rounding of the stored result, relative to the array's largest value
    rtol, atol = (1e-6, 1e-6) if dtype == np.float32 else (1e-13, 1e-15)
    for p, e in zip(params, expected):
        np.testing.assert_allclose(p, e, rtol=rtol, atol=atol * np.abs(e).max())


def test_first_pass_reads_the_master_weights(rng):
    """With float32 master weights the norm of the params is the master copy's (the
    values the update starts from), not the rounded 16-bit params'."""
    ml_dtypes = pytest.importorskip("ml_dtypes")
    master = [np.float32(1.0) + np.float32(1e-3) * rng.standard_normal(4096).astype(np.float32)]
    params = [master[0].astype(ml_dtypes.bfloat16)]
    grads = [rng.standard_normal(4096).astype(ml_dtypes.bfloat16)]
    expected = R.lars([master[0]], [grads[0].astype(np.float64)], lr=1.0, momentum=0.0,
                      trust_coefficient=0.5)[0][0]
    p16 = params[0].astype(np.float64)
    rounded = R.lars([p16], [grads[0].astype(np.float64)], lr=1.0, momentum=0.0,
                     trust_coefficient=0.5)[0][0]
    start = master[0].astype(np.float64)
    F.lars_(params, grads, lr=1.0, momentum=0.0, trust_coefficient=0.5, master_params=master)
    np.testing.assert_allclose(master[0], expected, rtol=1e-6, atol=1e-6)
    # the norm of the rounded params would give a visibly different update
    assert np.abs((rounded - p16) - (expected - start)).max() > 1e-4


def test_classes_keep_the_state_of_their_references(rng):
    """LAMB keeps step, exp_avg and exp_avg_sq; LARS a momentum buffer only with a
    momentum, and no step."""
    p = [rng.standard_normal(5)]
    lamb = fusedopt.LAMB(p)
    lamb.step([np.ones(5)])
    assert sorted(lamb.state[0]) == ["exp_avg", "exp_avg_sq", "step"]
    lars = fusedopt.LARS([rng.standard_normal(5)], lr=0.1)
    lars.step([np.ones(5)])
    assert sorted(lars.state[0]) == ["momentum_buffer"]
    plain = fusedopt.LARS([rng.standard_normal(5)], lr=0.1, momentum=0.0)
    plain.step([np.ones(5)])
    assert plain.state[0] == {}


# --- optax, where installed --------------------------------------------------------------

OPTAX_CASES = {
    "lamb": dict(lr=1e-2),
    "lamb-wd": dict(lr=1e-2, betas=(0.8, 0.99), eps=1e-4, weight_decay=0.1),
    "lars": dict(lr=1.0),
    "lars-nesterov": dict(lr=0.5, momentum=0.8, weight_decay=0.01, trust_coefficient=0.02,
                          eps=1e-3, nesterov=True),
    "lars-no-momentum": dict(lr=0.5, momentum=0.0, trust_coefficient=0.05),
}


def _optax_transform(optax, name, opts):
    if name.startswith("lamb"):
        b1, b2 = opts.get("betas", (0.9, 0.999))
        return optax.lamb(opts["lr"], b1=b1, b2=b2, eps=opts.get("eps", 1e-6),
                          weight_decay=opts.get("weight_decay", 0.0))
    return optax.lars(opts["lr"], weight_decay=opts.get("weight_decay", 0.0),
                      trust_coefficient=opts.get("trust_coefficient", 0.001),
                      eps=opts.get("eps", 0.0), momentum=opts.get("momentum", 0.9),
                      nesterov=opts.get("nesterov", False))


@pytest.mark.parametrize("name", list(OPTAX_CASES))
def test_matches_optax(name, rng):
    """fusedopt.LAMB / fusedopt.LARS against optax.lamb / optax.lars in float64 (jax with
    x64), over 20 steps, on tensors of several sizes including a tensor of zeros."""
    optax = pytest.importorskip("optax")
    import jax

    jax.config.update("jax_enable_x64", True)
    opts = OPTAX_CASES[name]
    shapes = [(7,), (30, 4), (129,), ()]
    params = [rng.standard_normal(s) for s in shapes]
    params.append(np.zeros(11))
    cls = fusedopt.LAMB if name.startswith("lamb") else fusedopt.LARS
    opt = cls(params, **opts)
    tx = _optax_transform(optax, name, opts)
    theirs = [jax.numpy.asarray(p) for p in params]
    state = tx.init(theirs)
    for _ in range(20):
        grads = [rng.standard_normal(p.shape) for p in params]
        opt.step(grads)
        updates, state = tx.update([jax.numpy.asarray(g) for g in grads], state, theirs)
        theirs = optax.apply_updates(theirs, updates)
    for i, (mine, ref) in enumerate(zip(params, theirs)):
        np.testing.assert_allclose(mine, np.asarray(ref), rtol=1e-9, atol=1e-12,
                                   err_msg=f"{name}: params[{i}]")
    assert not np.array_equal(params[-1], np.zeros(11))  # ratio 1 moved the zero tensor
