"""The multi-tensor reductions (the dot products of L-BFGS, the gradient sum of squares
behind clipping and the non-finite check): their values against float64 NumPy, and
their bits across thread counts and instruction sets. Each block of 16K elements is
summed in 32 fixed lanes and the block sums in block order, so neither the thread
count nor the vector width changes how a sum is associated. 16-bit gradients are
squared and summed in float in short runs per lane (see csrc/cpu/reduce.h)."""

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
    # 16-bit squares are exact in float and summed there in runs of 16 per lane before
    # the double sum: each run rounds by at most 15 * 2^-24 of itself, all terms >= 0
    rel = 15 * 2.0 ** -24 if np.dtype(dtype).itemsize == 2 else 1e-10
    assert abs(_sumsq(xs) - want) <= rel * want


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


@pytest.mark.parametrize("n", [3, 40000])
def test_sumsq_of_large_bfloat16_does_not_overflow(n):
    # 2^100 squared is far beyond float32 but not float64 (3 elements: the double tail;
    # 40000: the float runs, whose infinite sum sends the block back through double)
    g = [np.full(n, 2.0 ** 100, ml_dtypes.bfloat16)]
    assert _sumsq(g) == n * 2.0 ** 200


def test_sumsq_table_is_checked():
    ptrs = np.zeros(2, np.uint64)
    with pytest.raises(ValueError, match="1 x n"):
        _cpu.sumsq(0, ptrs, np.zeros(1, np.int64))
    with pytest.raises(ValueError, match="dtype code"):
        _cpu.sumsq(7, ptrs[:1], np.zeros(1, np.int64))
