"""The one-pass C++ validation of NumPy-only calls (`_cpu.prepare_numpy`) against the
general Python path of `_arrays.prepare`: the same pointer tables for every call the
general path accepts, and a hand-over (None) for every call it refuses or must copy
for, so that the general path raises its precise error."""

import ml_dtypes
import numpy as np
import pytest

import fusedopt.functional as F
from fusedopt import _arrays, _cpu

BF16 = np.dtype(ml_dtypes.bfloat16)


def general(params, grads, states, extra=None, read_only=False):
    """The Python path: `rows` of all None describes every list there."""
    L = 2 + len(states) + (extra is not None)
    names = [f"s{k}" for k in range(len(states))]
    return _arrays.prepare("op", params, grads, states, names, rows=[None] * L, extra=extra,
                           read_only=read_only)


def fast(params, grads, states, extra=None, read_only=False):
    lists = [params, grads, *states] + ([extra[0]] if extra is not None else [])
    return _cpu.prepare_numpy(lists, len(states), extra[2] if extra else 0, read_only,
                              BF16.num)


def same_tables(params, grads, states, extra=None, read_only=False):
    got = fast(params, grads, states, extra, read_only)
    want = general(params, grads, states, extra, read_only)
    assert got is not None
    assert [(c, s) for c, s, _, _ in got] == \
        [(code, lay["state_dtype"]) for (code, _, _), lay in zip(want.groups, want.layouts)]
    for (_, _, ptrs, sizes), (_, wptrs, wsizes) in zip(got, want.groups):
        np.testing.assert_array_equal(ptrs, wptrs)
        np.testing.assert_array_equal(sizes, wsizes)
        assert ptrs.dtype == np.uint64 and sizes.dtype == np.int64
    return got


def arrays(shapes, dtype):
    rng = np.random.default_rng(len(shapes))
    return [rng.standard_normal(s).astype(dtype) for s in shapes]


SHAPES = [(3, 5), (), (0,), (7,), (2, 0, 3), (4097,)]


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16, BF16])
@pytest.mark.parametrize("nstates", [0, 1, 2, 3])
def test_one_dtype(dtype, nstates):
    p, g = arrays(SHAPES, dtype), arrays(SHAPES, dtype)
    sdt = np.float32 if np.dtype(dtype).itemsize == 2 else dtype
    states = [arrays(SHAPES, sdt) for _ in range(nstates)]
    got = same_tables(p, g, states)
    assert len(got) == 1


def test_mixed_dtypes_make_one_group_each():
    dtypes = [np.float64, np.float32, BF16, np.float16, np.float32, BF16]
    p = [np.ones(4, d) for d in dtypes]
    g = [np.ones(4, d) for d in dtypes]
    sd = [d if np.dtype(d).itemsize > 2 else (BF16 if i == 2 else np.float32)
          for i, d in enumerate(dtypes)]
    states = [[np.zeros(4, d) for d in sd] for _ in range(2)]
    got = same_tables(p, g, states)
    assert [(c, s) for c, s, _, _ in got] == [(0, 0), (1, 1), (2, 0), (3, 0), (3, 3)]


@pytest.mark.parametrize("kind", [1, 2])
def test_master_and_kahan_lists(kind):
    p, g = arrays(SHAPES, BF16), arrays(SHAPES, BF16)
    states = [arrays(SHAPES, np.float32)]
    extra = arrays(SHAPES, np.float32 if kind == 1 else BF16)
    same_tables(p, g, states, (extra, "extra", kind))


def test_read_only_reduction_accepts_read_only_arrays():
    x, y = arrays(SHAPES, np.float64), arrays(SHAPES, np.float64)
    for a in x + y:
        a.flags.writeable = False
    same_tables(x, y, [], read_only=True)
    assert fast(x, y, []) is None  # a step writes params: the general path refuses


def bad_calls():
    """(label, params, grads, states, extra) that the general path refuses or must copy."""
    def base(dtype=np.float32):
        return arrays([(4,), (3, 2)], dtype), arrays([(4,), (3, 2)], dtype), \
            [arrays([(4,), (3, 2)], dtype) for _ in range(2)]

    p, g, s = base()
    yield "int params", [p[0].astype(np.int32), p[1]], g, s, None
    p, g, s = base()
    yield "grad dtype", p, [g[0].astype(np.float64), g[1]], s, None
    p, g, s = base()
    yield "state dtype", p, g, [s[0], [s[1][0].astype(np.float64), s[1][1]]], None
    p, g, s = base(BF16)
    yield "16-bit state float16", p, g, [arrays([(4,), (3, 2)], np.float16)] * 2, None
    p, g, s = base(BF16)
    yield "states disagree", p, g, [arrays([(4,), (3, 2)], np.float32),
                                    arrays([(4,), (3, 2)], BF16)], None
    p, g, s = base()
    yield "byte order", [p[0].astype(">f4"), p[1]], g, s, None
    p, g, s = base()
    yield "shape", p, [g[0].reshape(2, 2), g[1]], s, None
    p, g, s = base()
    yield "size", p, g, [s[0], [s[1][0][:3], s[1][1]]], None
    p, g, s = base()
    p[1].flags.writeable = False
    yield "read-only param", p, g, s, None
    p, g, s = base()
    yield "strided state", p, g, [s[0], [np.ones(8, np.float32)[::2], s[1][1]]], None
    p, g, s = base()
    yield "strided grad (copied)", p, [np.ones(8, np.float32)[::2], g[1]], s, None
    p, g, s = base()
    yield "list, not array", [list(p[0]), p[1]], g, s, None
    p, g, s = base()
    yield "param is a state", p, g, [s[0], [p[0], s[1][1]]], None
    p, g, s = base()
    yield "states overlap", p, g, [s[0], [s[0][0][:], s[1][1]]], None
    p, g, s = base()
    big = np.zeros(6, np.float32)
    yield "grad inside a param", [big[:4], p[1]], [big[2:6], g[1]], s, None
    p, g, s = base(BF16)
    yield "master of float32 params", base()[0], base()[1], base()[2], \
        (arrays([(4,), (3, 2)], np.float32), "m", 1)
    p, g, s = base(BF16)
    s = [arrays([(4,), (3, 2)], np.float32) for _ in range(2)]
    yield "master not float32", p, g, s, (arrays([(4,), (3, 2)], BF16), "m", 1)


@pytest.mark.parametrize("case", list(bad_calls()), ids=lambda c: c[0])
def test_hands_over_what_it_does_not_accept(case):
    _, p, g, s, extra = case
    if "list, not array" not in case[0]:
        assert fast(p, g, s, extra) is None
    label = case[0]
    try:
        prep = general(p, g, s, extra)
    except (TypeError, ValueError):
        return
    # accepted by the general path only through a copy of the gradient
    assert label == "strided grad (copied)" and len(prep.keep) == 1


def test_gradients_may_share_memory_with_each_other():
    g = np.ones(8, np.float32)
    p = [np.zeros(8, np.float32), np.zeros(8, np.float32)]
    same_tables(p, [g, g], [])


def test_empty_arrays_at_one_address_do_not_overlap():
    e = np.zeros(0, np.float32)
    one = [np.ones(3, np.float32) for _ in range(3)]
    same_tables([e, one[0]], [e, one[1]], [[e, one[2]]])


@pytest.mark.parametrize("first", [True, False])
def test_dot_of_strided_arrays_reads_their_elements(first):
    rng = np.random.default_rng(5)
    base = [rng.standard_normal(2 * n) for n in (7, 1000, 3)]
    other = [rng.standard_normal(n) for n in (7, 1000, 3)]
    strided = [b[::2] for b in base]
    xs, ys = (strided, other) if first else (other, strided)
    want = sum(float(np.dot(a.astype(np.float64), b)) for a, b in zip(xs, ys))
    assert F.dot(xs, ys) == pytest.approx(want, rel=1e-12)
