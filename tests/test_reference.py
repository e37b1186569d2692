"""The fused ops against the float64 NumPy references, element by element.

Every case of the table runs for several steps on one multi-tensor call that
holds odd sizes (empty, one element, a SIMD remainder, a size that splits
across threads, a 0-d array and a 2-D array). At each step the reference runs
on float64 copies of the fused result of the previous step, so a float32 run is
judged on the error of one step, which does not compound.
"""

from __future__ import annotations

import numpy as np
import pytest

from cases import (CASES, FULL_CASES, assert_same_bits, case, data_ptr, random_arrays,
                   random_states)

SHAPES = [(0,), (1,), (7,), (4097,), (278011,), (), (33, 65)]
STEPS = 7


def tolerance(dtype, expected):
    """(rtol, atol) for comparing a fused result with the float64 reference.

    float64: the kernels and the reference run the same equations in double and
    differ only in how operations are grouped (a multiply by a precomputed
    reciprocal instead of a division, say): a few ulps, far below rtol 1e-12.
    Values that cancel to near zero (an average of gradients of both signs) carry
    an absolute error of a few ulps of the terms, hence atol relative to the
    array's largest value.

    float32: one step is a chain of about ten float operations, each rounded to
    2**-24 (6e-8) relative, then a rounded store; the worst case stays below
    ~1e-6 relative to the operands. rtol 1e-5 leaves a tenfold margin; atol,
    again relative to the array's largest value, covers results that cancel.
    """
    finite = np.abs(expected[np.isfinite(expected)])
    scale = float(np.max(finite, initial=0.0))
    if dtype == np.float64:
        return 1e-12, 1e-14 * max(scale, 1.0)
    return 1e-5, 1e-6 * max(scale, 1.0)


def assert_close(actual, expected, dtype, what):
    rtol, atol = tolerance(dtype, expected)
    np.testing.assert_allclose(actual.astype(np.float64), expected, rtol=rtol, atol=atol,
                               err_msg=what)


def run_against_reference(c, dtype, rng, shapes=SHAPES, steps=STEPS, grad_fn=None):
    params = random_arrays(shapes, dtype, rng)
    states = random_states(c, params, rng)
    if "momentum_buffer" in states and c.algo.name == "sgd":
        # On its first step SGD creates the buffer from the gradient: the old
        # contents must not be read at all, so fill them with NaN.
        for b in states["momentum_buffer"]:
            b[...] = np.nan
    written = params + [b for name in c.state_names for b in states[name]]
    ptrs = [data_ptr(a) for a in written]
    for t in range(1, steps + 1):
        grads = grad_fn(shapes, dtype, rng) if grad_fn else random_arrays(shapes, dtype, rng)
        grads_before = [g.copy() for g in grads]
        params_before = [p.copy() for p in params]
        exp_params, exp_states = c.run_reference(
            [p.astype(np.float64) for p in params], [g.astype(np.float64) for g in grads],
            {n: [b.astype(np.float64) for b in bs] for n, bs in states.items()}, t)

        assert c.run_op(params, grads, states, t) is None

        # in place: the very same buffers, now holding the new values
        assert [data_ptr(a) for a in written] == ptrs
        for i, (p, before) in enumerate(zip(params, params_before)):
            assert p.dtype == dtype and p.shape == shapes[i]
            # (a rule may hold an element still: Rprop where the gradient's sign flipped)
            if p.size and grad_fn is None and not np.array_equal(exp_params[i], before):
                assert not np.array_equal(p, before), f"params[{i}] not updated at step {t}"
        for i, (g, before) in enumerate(zip(grads, grads_before)):
            assert_same_bits(g, before, f"grads[{i}] was written at step {t}")

        for i, (p, e) in enumerate(zip(params, exp_params)):
            assert_close(p, e, dtype, f"{c}: params[{i}] shape {shapes[i]} step {t}")
        for name in c.state_names:
            for i, (b, e) in enumerate(zip(states[name], exp_states[name])):
                assert b.dtype == dtype
                assert_close(b, e, dtype, f"{c}: {name}[{i}] shape {shapes[i]} step {t}")
    return params, states


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("c", CASES, ids=str)
def test_matches_reference(c, dtype, rng):
    run_against_reference(c, dtype, rng)


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("decoupled", [False, True])
@pytest.mark.parametrize("op", ["adam", "adamw"])
def test_adam_decay_mode_flag(op, decoupled, dtype, rng):
    """adam_ and adamw_ are one rule: the flag alone picks L2 or decoupled decay."""
    c = case(op, lr=0.01, weight_decay=0.1, amsgrad=True)
    kwargs = dict(decoupled_weight_decay=decoupled)
    shapes = [(5,), (300,), ()]
    params = random_arrays(shapes, dtype, rng)
    states = random_states(c, params, rng)
    for t in (1, 2, 3):
        grads = random_arrays(shapes, dtype, rng)
        args = [[s.astype(np.float64) for s in states[n]] for n in c.state_names]
        expected = c.algo.ref([p.astype(np.float64) for p in params],
                              [g.astype(np.float64) for g in grads], *args,
                              **{**c.op_kwargs(t), **kwargs})
        # the flag really changes the reference: L2 decay and decoupled decay differ
        other = c.algo.ref([p.astype(np.float64) for p in params],
                           [g.astype(np.float64) for g in grads], *args,
                           **{**c.op_kwargs(t), "decoupled_weight_decay": not decoupled})
        assert not np.allclose(expected[0][1], other[0][1], rtol=1e-6, atol=0)
        c.algo.op(params, grads, *[states[n] for n in c.state_names],
                  **{**c.op_kwargs(t), **kwargs})
        for i, p in enumerate(params):
            assert_close(p, expected[0][i], dtype, f"params[{i}] step {t}")
        for k, name in enumerate(c.state_names):
            for i, b in enumerate(states[name]):
                assert_close(b, expected[1 + k][i], dtype, f"{name}[{i}] step {t}")


def _grads_with_nonfinite(shapes, dtype, rng):
    grads = random_arrays(shapes, dtype, rng)
    for g in grads:
        flat = g.reshape(-1)
        for k, v in zip(range(0, flat.size, 3), (np.nan, np.inf, -np.inf)):
            flat[k] = v
    return grads


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the reference's inf - inf, 0 * inf
@pytest.mark.parametrize("c", CASES, ids=str)
def test_nonfinite_gradients_propagate_as_the_math_says(c, rng):
    """NaN and Inf in a gradient give what the equations give (equal_nan compares NaNs)."""
    params, states = run_against_reference(c, np.float64, rng, shapes=[(7,), (70,)],
                                           steps=2, grad_fn=_grads_with_nonfinite)
    # the NaN reached the param, or the state (Rprop, whose NaN gradient moves nothing)
    assert not np.isfinite(params[0][0]) or \
        any(not np.isfinite(bufs[0][0]) for bufs in states.values())


def test_reference_does_not_modify_its_inputs(rng):
    c = case("rmsprop", momentum=0.9, centered=True)
    params = random_arrays([(4,), ()], np.float32, rng)
    grads = random_arrays([(4,), ()], np.float32, rng)
    states = random_states(c, params, rng)
    copies = [a.copy() for a in params + grads + [b for bs in states.values() for b in bs]]
    new_params, new_states = c.run_reference(params, grads, states, 1)
    for a, b in zip(params + grads + [b for bs in states.values() for b in bs], copies):
        assert_same_bits(a, b, "reference input")
    assert all(p.dtype == np.float64 for p in new_params)
    assert all(b.dtype == np.float64 for bs in new_states.values() for b in bs)
    assert new_params[1].shape == ()


ELEMENTWISE_CASES = [c for c in FULL_CASES if not c.algo.spec.reductions(c.op_kwargs(1))]


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16])
@pytest.mark.parametrize("c", ELEMENTWISE_CASES, ids=str)
def test_long_and_short_pieces_give_the_same_bits(c, dtype):
    """The CPU loop runs a long piece of a tensor (2048 elements and more) in chunks that
    prefetch ahead and a short one plainly: the same values as one tensor of 12 345
    elements and as pieces of at most 1999 give the same bits over three steps (params
    and every state; float16 params with float32 state run the loop on converted blocks). Algorithms with per-tensor norms (LAMB, LARS) are left out: their
    pieces are tensors of their own."""
    rng = np.random.default_rng(3)
    n = 12_345
    cuts = [0, 1000, 2999, 3000, 4001, 6000, 7999, 9000, 10_500, n]
    whole = [np.asarray(rng.standard_normal(n), dtype)]
    states = random_states(c, whole, rng)
    if dtype == np.float16:  # (16-bit params keep float32 state)
        states = {k: [v[0].astype(np.float32)] for k, v in states.items()}
    grads = [np.asarray(rng.standard_normal(n), dtype) for _ in range(3)]

    def split(a):
        return [a[i:j].copy() for i, j in zip(cuts, cuts[1:])]

    pieces = split(whole[0])
    piece_states = {k: split(v[0]) for k, v in states.items()}
    for t, g in enumerate(grads, 1):
        c.run_op(whole, [g], states, t)
        c.run_op(pieces, split(g), piece_states, t)
    assert_same_bits(np.concatenate(pieces), whole[0], "params")
    for k, v in states.items():
        assert_same_bits(np.concatenate(piece_states[k]), v[0], k)
