"""The multi-tensor reductions (the dot products of L-BFGS, the gradient sum of squares
behind clipping and the non-finite check): their values against float64 NumPy, and
their bits across thread counts and instruction sets. Each block of 16K elements is
summed in 32 fixed lanes and the block sums in block order, so neither the thread
count nor the vector width changes how a sum is associated."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest

import fusedopt
import fusedopt.functional as F
from fusedopt import _arrays, _cpu, _precision

from test_parity import MANY_SHAPES

DTYPES = pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16,
                                           ml_dtypes.bfloat16], ids=lambda d: np.dtype(d).name)


def _lists(dtype, seed=11):
    rng = np.random.default_rng(seed)
    xs = [np.array(rng.standard_normal(s) * 3, dtype) for s in MANY_SHAPES]
    ys = [np.array(rng.standard_normal(s), dtype) for s in MANY_SHAPES]
    return xs, ys


def _sumsq(grads):
    prep = _arrays.prepare("sumsq", grads, grads, [], [], read_only=True)
    return _precision.sumsq(prep.groups)


def _wide(xs):
    return np.concatenate([x.astype(np.float64).ravel() for x in xs])


@DTYPES
def test_values_match_float64(dtype):
    xs, ys = _lists(dtype)
    x, y = _wide(xs), _wide(ys)
    # every product of two float32/16-bit values is exact in double: only the sum of
    # ~700k terms rounds, by at most ~n * 2^-53 of the sum of magnitudes
    bound = 1e-10 * float(np.abs(x * y).sum())
    assert abs(F.dot(xs, ys) - float((x * y).sum())) <= bound
    want = float((x * x).sum())
    assert _sumsq(xs) == pytest.approx(want, rel=1e-10)


@DTYPES
def test_same_bits_for_every_thread_count_and_instruction_set(dtype):
    xs, ys = _lists(dtype)
    results = {}
    for isa in ("base", "avx2", "avx512"):
        try:
            _cpu.set_isa(isa)
        except ValueError:
            continue  # this CPU lacks the set
        for threads in (1, 2, 3):
            fusedopt.set_num_threads(threads)
            results[isa, threads] = (F.dot(xs, ys), _sumsq(xs))
    first = results["base", 1]
    for key, got in results.items():
        assert got == first, key


def test_sumsq_of_nonfinite_gradients():
    g = [np.ones(40000, np.float16), np.ones(5, np.float16)]
    assert _sumsq(g) == 40005.0
    g[0][30000] = np.inf
    assert _sumsq(g) == np.inf
    g[0][30000] = np.nan
    assert np.isnan(_sumsq(g))


def test_sumsq_of_large_bfloat16_does_not_overflow():
    # 2^100 squared is far beyond float32 but not float64
    g = [np.full(3, 2.0 ** 100, ml_dtypes.bfloat16)]
    assert _sumsq(g) == 3 * 2.0 ** 200


def test_sumsq_table_is_checked():
    ptrs = np.zeros(2, np.uint64)
    with pytest.raises(ValueError, match="1 x n"):
        _cpu.sumsq(0, ptrs, np.zeros(1, np.int64))
    with pytest.raises(ValueError, match="dtype code"):
        _cpu.sumsq(7, ptrs[:1], np.zeros(1, np.int64))
