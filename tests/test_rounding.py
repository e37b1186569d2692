"""Stochastic rounding of 16-bit params: unbiased, bit-reproducible for a seed (and the
same on every instruction set and thread count), and able to make progress where
round to nearest stalls.

A float32 value x between the 16-bit neighbours lo and hi (|lo| <= |x| < |hi|) rounds
to hi with probability q = |x - lo| / |hi - lo|, so the mean of N roundings estimates
x with standard error |hi - lo|·sqrt(q(1 - q) / N). The tests feed exact float32 values
through float32 master weights and an SGD step with lr = 0: the step leaves the master
as it is and writes the param as the master rounded, one independent rounding per
element.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest

import fusedopt
from cases import assert_same_bits, case
from fusedopt import functional as F
from fusedopt._precision import rounding_key

F16 = np.dtype(np.float16)
BF16 = np.dtype(ml_dtypes.bfloat16)
F32 = np.dtype(np.float32)
F64 = np.dtype(np.float64)
MANTISSA = {F16: 10, BF16: 7}
SIGMAS = 5.0  # allowed distance of a mean from the exact value, in standard errors

# Values between the neighbours that matter: just above and just below powers of two
# (where the spacing halves), negative values, large and small magnitudes, float16
# subnormals and the values below the smallest of them, and exact values (which must
# never move).
VALUES = {
    BF16: [1 + 0.3 * 2**-7, 1 - 0.3 * 2**-8, 0.5 * (1 - 2**-20), -(1 + 0.5 * 2**-7),
           -(2 - 0.9 * 2**-7), 256 * (1 + 0.71 * 2**-7), 3.7e30, -1.3e-30, -3.3e-3, 0.1,
           1.5, -0.75, 2.0**-20],
    F16: [1 + 0.3 * 2**-10, 1 - 0.3 * 2**-11, -(1 + 0.5 * 2**-10), -(2 - 0.9 * 2**-10),
          1000.3, 65000.0, -0.0123, 3.3 * 2**-24, -0.4 * 2**-24, 0.07 * 2**-24,
          2**-14 - 0.3 * 2**-24, -(2**-14 + 0.6 * 2**-24), -1e-6, 0.1, 0.75, -3 * 2**-24],
}


def neighbours(x32, dtype):
    """(toward zero, away from zero) 16-bit neighbours of float32 values; equal for
    values the format holds exactly. Adding one to the bits of a sign-magnitude format
    steps away from zero, across binades and out of the subnormals alike."""
    x32 = np.asarray(x32, dtype=F32)
    nearest = x32.astype(dtype)
    bits = nearest.view(np.uint16).astype(np.int64)
    exact = nearest.astype(F32) == x32
    below = np.abs(nearest.astype(F64)) < np.abs(x32.astype(F64))  # rounded toward zero
    other = np.where(below, bits + 1, bits - 1).astype(np.uint16).view(dtype)
    lo = np.where(exact | below, nearest, other)
    hi = np.where(exact, nearest, np.where(below, other, nearest))
    return lo.astype(dtype), hi.astype(dtype)


def round_stochastically(x32, dtype, seed, step=1):
    """The param a stochastic-rounding step writes for float32 master values `x32`."""
    master = np.array(x32, dtype=F32)
    param = np.zeros(master.shape, dtype=dtype)
    before = master.copy()
    F.sgd_([param], [np.zeros_like(param)], lr=0.0, master_params=[master],
           stochastic_rounding=True, seed=seed)
    assert_same_bits(master, before, "master (lr = 0)")
    return param


@pytest.mark.parametrize("dtype", [BF16, F16], ids=["bf16", "f16"])
def test_stochastic_rounding_is_unbiased(dtype):
    n = 40_000
    values = np.asarray(VALUES[dtype], dtype=F32)
    rounded = round_stochastically(np.repeat(values, n), dtype, seed=11).reshape(-1, n)
    lo, hi = neighbours(values, dtype)
    for k, x in enumerate(values):
        r = rounded[k]
        assert np.isin(r.view(np.uint16), [lo[k:k + 1].view(np.uint16),
                                           hi[k:k + 1].view(np.uint16)]).all(), \
            f"{x!r}: a result is not one of the neighbours {lo[k]!r}, {hi[k]!r}"
        exact = float(x)
        gap = abs(float(hi[k]) - float(lo[k]))
        q = abs(exact - float(lo[k])) / gap if gap else 0.0
        stderr = gap * np.sqrt(q * (1 - q) / n)
        mean = float(r.astype(F64).mean())
        assert abs(mean - exact) <= SIGMAS * stderr, \
            f"{x!r}: mean of {n} roundings {mean!r}, {abs(mean - exact) / stderr:.1f} " \
            f"standard errors away (q = {q:.4f})"
        if gap:  # both neighbours occur, in about the right proportion
            frac = float(np.mean(r.view(np.uint16) == hi[k:k + 1].view(np.uint16)))
            assert abs(frac - q) <= SIGMAS * np.sqrt(q * (1 - q) / n) + 1e-12, (x, frac, q)


def test_bfloat16_stochastic_bits_follow_the_documented_stream():
    """bfloat16 rounds away from zero exactly when the 16 dropped bits of the float32
    value plus the low 16 random bits of its element carry into the kept half. The bits
    of element i of tensor j are random_bits(key, j, i), with key = rounding_key(seed,
    step) for a functional call (SGD's step is 1): each tensor has its own stream."""
    rng = np.random.default_rng(3)
    xs = [np.asarray(rng.standard_normal(n), dtype=F32) for n in (1000, 37)]
    masters = [x.copy() for x in xs]
    params = [np.zeros(x.shape, dtype=BF16) for x in xs]
    seed = 1234
    F.sgd_(params, [np.zeros_like(p) for p in params], lr=0.0, master_params=masters,
           stochastic_rounding=True, seed=seed)
    key = rounding_key(seed, 1)
    for j, (x, p) in enumerate(zip(xs, params)):
        bits = x.view(np.uint32).astype(np.uint64)
        rnd = np.array([fusedopt._cpu.random_bits(key, j, i) for i in range(x.size)],
                       dtype=np.uint64)
        expect = ((bits + (rnd & 0xFFFF)) >> 16).astype(np.uint16)
        assert_same_bits(p.view(np.uint16), expect, f"tensor {j}")


@pytest.mark.parametrize("dtype", [BF16, F16], ids=["bf16", "f16"])
def test_same_seed_same_bits_other_seed_other_bits(dtype):
    rng = np.random.default_rng(4)
    x = np.asarray(rng.standard_normal(5000), dtype=F32)
    a = round_stochastically(x, dtype, seed=7)
    b = round_stochastically(x, dtype, seed=7)
    c = round_stochastically(x, dtype, seed=8)
    assert_same_bits(a, b, "same seed")
    differ = float(np.mean(a.view(np.uint16) != c.view(np.uint16)))
    # each element differs with probability 2q(1-q), 1/3 on average for uniform q
    assert 0.25 < differ < 0.42, differ


@pytest.mark.parametrize("dtype", [BF16, F16], ids=["bf16", "f16"])
def test_classes_round_each_step_with_fresh_reproducible_bits(dtype):
    """An optimizer's stream depends on its seed and its step count: two optimizers with
    one seed write the same bits step after step, another seed other bits, and
    successive steps of one optimizer draw different bits."""
    rng = np.random.default_rng(6)
    start = np.asarray(rng.standard_normal(3000), dtype=F32)

    def run(seed, steps=3):
        param = start.astype(dtype)
        opt = fusedopt.SGD([param], lr=0.0, precision=fusedopt.Precision(
            master_weights=True, stochastic_rounding=True, seed=seed))
        opt.state[0] = {"master_param": start.copy()}  # a master the param cannot hold
        out = []
        for _ in range(steps):
            opt.step([np.zeros_like(param)])
            out.append(param.copy())
        return out

    a, b, c = run(21), run(21), run(22)
    for t in range(3):
        assert_same_bits(a[t], b[t], f"step {t}, same seed")
        assert (a[t].view(np.uint16) != c[t].view(np.uint16)).mean() > 0.2
    assert (a[0].view(np.uint16) != a[1].view(np.uint16)).mean() > 0.2
    assert (a[1].view(np.uint16) != a[2].view(np.uint16)).mean() > 0.2


LAYOUTS = [(F16, F32, "master"), (BF16, BF16, "kahan"), (BF16, F32, "none"),
           (F16, BF16, "none"), (F16, F32, "kahan")]


def available_isas():
    isas = []
    for isa in ("base", "avx2", "avx512"):
        try:
            fusedopt._cpu.set_isa(isa)
        except ValueError:
            continue
        isas.append(isa)
    return isas


@pytest.mark.parametrize("stochastic", [True, False], ids=["stochastic", "nearest"])
@pytest.mark.parametrize("dtype,state_dtype,extra", LAYOUTS,
                         ids=[f"{d}-{s}-{x}" for d, s, x in LAYOUTS])
def test_bits_same_on_every_isa_and_thread_count(dtype, state_dtype, extra, stochastic):
    """Two Adam steps, rounding stochastically or to nearest, over tensors large enough
    to be split between two threads (the boundary falls inside a tensor), with
    infinities, NaN and subnormals among the params and gradients: params, states and
    extra buffers are bit-identical for every instruction set and thread count."""
    rng = np.random.default_rng(8)
    sizes = [40_000, 7, 30_001, 1]
    params0 = [np.asarray(rng.standard_normal(n), dtype=dtype) for n in sizes]
    grads = [[np.asarray(rng.standard_normal(n), dtype=dtype) for n in sizes]
             for _ in range(2)]
    special = [np.nan, np.inf, -np.inf, 6e-8, -3e-5, 0.0, -0.0, 60000.0]
    params0[0][100:108] = np.asarray(special, dtype=dtype)
    grads[0][0][200:208] = np.asarray(special, dtype=dtype)
    grads[1][2][5:13] = np.asarray(special[::-1], dtype=dtype)
    c = case("adam", lr=0.01, amsgrad=True)

    def run():
        params = [p.copy() for p in params0]
        states = [[np.zeros(p.shape, dtype=state_dtype) for p in params] for _ in range(3)]
        kwargs = {}
        if extra == "master":
            kwargs["master_params"] = [p.astype(F32) + np.float32(1e-4) for p in params]
        elif extra == "kahan":
            kwargs["kahan_buffers"] = [np.zeros_like(p) for p in params]
        for t, g in enumerate(grads, start=1):
            c.algo.op(params, g, *states, **c.op_kwargs(t), stochastic_rounding=stochastic,
                      seed=99, **kwargs)
        return params + [s for lst in states for s in lst] + sum(kwargs.values(), [])

    results = {}
    for isa in available_isas():
        fusedopt._cpu.set_isa(isa)
        for threads in (1, 2):
            fusedopt.set_num_threads(threads)
            results[(isa, threads)] = run()
    assert len(results) >= 2
    (first, expect), *others = results.items()
    for where, got in others:
        for k, (a, b) in enumerate(zip(got, expect)):
            assert_same_bits(a, b, f"array {k}, {where} vs {first}")


def test_float16_conversions_same_on_every_isa():
    """float16 params go through the conversion instructions in the AVX2 and AVX-512
    builds and through integer code in the base build. SGD with lr = 0 loads every
    float16 pattern and stores it back (NaN made quiet), and with master weights rounds
    float32 values to float16: every float16 value, the midpoints between neighbours and
    the floats next to them (ties and near ties, subnormals included), and 2^20 random
    patterns (NaN payloads included). Every build must write the same bits."""
    halves = np.arange(1 << 16, dtype=np.uint16).view(F16)
    finite = halves[np.isfinite(halves)].astype(np.float64)
    finite = np.unique(finite)  # sorted; +0 and -0 are one value here
    mids = ((finite[:-1] + finite[1:]) / 2).astype(F32)
    rng = np.random.default_rng(12)
    masters = np.concatenate([
        halves.astype(F32), mids, np.nextafter(mids, np.float32(np.inf)),
        np.nextafter(mids, np.float32(-np.inf)), -mids,
        rng.integers(0, 1 << 32, 1 << 20, dtype=np.uint64).astype(np.uint32).view(F32)])
    results = {}
    for isa in available_isas():
        fusedopt._cpu.set_isa(isa)
        loaded = [halves.copy()]
        F.sgd_(loaded, [np.zeros_like(halves)], lr=0.0)
        stored = [np.zeros(masters.size, F16)]
        F.sgd_(stored, [np.zeros(masters.size, F16)], lr=0.0, master_params=[masters.copy()])
        results[isa] = (loaded[0], stored[0])
    assert len(results) >= 2, "only one instruction set on this CPU"
    base = results.pop("base")
    finite_in = np.isfinite(halves)
    np.testing.assert_array_equal(base[0].view(np.uint16)[finite_in],
                                  halves.view(np.uint16)[finite_in])
    for isa, (loaded, stored) in results.items():
        assert_same_bits(loaded, base[0], f"float16 loads, {isa} vs base")
        assert_same_bits(stored, base[1], f"float16 stores, {isa} vs base")


@pytest.mark.parametrize("dtype", [BF16, F16], ids=["bf16", "f16"])
def test_stochastic_rounding_moves_where_round_to_nearest_stalls(dtype):
    """SGD with lr·g = 1e-4 (bfloat16) or 1e-5 (float16), more than 30 times below half
    an ulp of params in [1.25, 1.75]. Round to nearest writes back the same param every
    step. With stochastic rounding each step is unbiased, so after n steps the expected
    param is p0 - n·lr·g: the mean displacement over the elements matches within a few
    standard errors (each step adds a variance of at most ulp²/4 per element)."""
    rng = np.random.default_rng(9)
    n, steps = 4096, 300
    lr = 1e-4 if dtype == BF16 else 1e-5
    start = np.asarray(rng.uniform(1.25, 1.75, n), dtype=dtype)
    grad = np.ones(n, dtype=dtype)
    nearest, stochastic = start.copy(), start.copy()
    opt_n = fusedopt.SGD([nearest], lr=lr)
    opt_s = fusedopt.SGD([stochastic], lr=lr,
                         precision=fusedopt.Precision(stochastic_rounding=True, seed=5))
    for _ in range(steps):
        opt_n.step([grad])
        opt_s.step([grad])
    assert_same_bits(nearest, start, "round to nearest")
    moved = start.astype(F64) - stochastic.astype(F64)
    expected = steps * float(np.float32(lr))
    ulp = 2.0 ** -MANTISSA[dtype]  # spacing in [1, 2)
    stderr = np.sqrt(steps * ulp**2 / 4 / n)
    assert abs(moved.mean() - expected) <= SIGMAS * stderr, (moved.mean(), expected, stderr)
    assert (moved > 0).mean() > 0.9  # nearly every element moved, all the same way


@pytest.mark.parametrize("dtype", [BF16, F16], ids=["bf16", "f16"])
def test_stochastic_step_lands_on_a_neighbour_of_the_reference(dtype):
    """An Adam step with stochastic rounding writes one of the two 16-bit neighbours of
    the float32 result: within one ulp (2^-m·|x|) of the float64 reference plus the
    float32 math error, and not always the nearest one."""
    rng = np.random.default_rng(10)
    c = case("adam", lr=0.01)
    p0 = np.asarray(rng.standard_normal(20_000), dtype=dtype)
    g = np.asarray(rng.standard_normal(p0.shape), dtype=dtype)
    m0 = np.asarray(0.1 * rng.standard_normal(p0.shape), dtype=F32)
    v0 = np.asarray(rng.uniform(0.05, 1.0, p0.shape), dtype=F32)
    ref = c.algo.ref([p0], [g], [m0], [v0], **c.op_kwargs(3))[0][0]
    outs = {}
    for sr in (False, True):
        p, m, v = p0.copy(), m0.copy(), v0.copy()
        c.algo.op([p], [g], [m], [v], **c.op_kwargs(3), stochastic_rounding=sr, seed=2)
        outs[sr] = p
    tol = np.maximum(np.abs(ref) * 2.0 ** -MANTISSA[dtype], 2.0 ** -24) + \
        32 * 2.0 ** -24 * (np.abs(ref) + np.abs(p0.astype(F64)))
    assert (np.abs(outs[True].astype(F64) - ref) <= tol).all()
    assert (outs[True].view(np.uint16) != outs[False].view(np.uint16)).mean() > 0.05
