"""The one description path (`_arrays.prepare` over `_cpu.Tables`): the pointer tables it
lays out, what it refuses, and the gradients exchanged in a kept call (`with_grads`,
`_engine.Kept`), which must check the new gradients as fully as a new call does."""

import ml_dtypes
import numpy as np
import pytest

import fusedopt as fo
import fusedopt.functional as F
from fusedopt import _arrays, _engine
from fusedopt.algorithms import SPECS

BF16 = np.dtype(ml_dtypes.bfloat16)


def prepare(params, grads, states, extra=None, read_only=False):
    names = [f"s{k}" for k in range(len(states))]
    return _arrays.prepare("op", params, grads, states, names, extra=extra,
                           read_only=read_only)


def address(a):
    return a.__array_interface__["data"][0]


def expected_tables(lists, picks):
    """The pointer table of the tensors `picks`: slot-major, ptrs[slot * m + j]."""
    return np.array([address(lst[i]) for lst in lists for i in picks], dtype=np.uint64)


def arrays(shapes, dtype):
    rng = np.random.default_rng(len(shapes))
    return [rng.standard_normal(s).astype(dtype) for s in shapes]


SHAPES = [(3, 5), (), (0,), (7,), (2, 0, 3), (4097,)]


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16, BF16])
@pytest.mark.parametrize("nstates", [0, 1, 2, 3])
def test_one_dtype_is_one_table(dtype, nstates):
    p, g = arrays(SHAPES, dtype), arrays(SHAPES, dtype)
    sdt = np.float32 if np.dtype(dtype).itemsize == 2 else dtype
    states = [arrays(SHAPES, sdt) for _ in range(nstates)]
    prep = prepare(p, g, states)
    assert len(prep.groups) == 1
    code, ptrs, sizes = prep.groups[0]
    assert code == {4: 0, 8: 1}.get(np.dtype(dtype).itemsize, 2 if dtype == np.float16 else 3)
    np.testing.assert_array_equal(ptrs, expected_tables([p, g, *states], range(len(p))))
    np.testing.assert_array_equal(sizes, [a.size for a in p])
    assert ptrs.dtype == np.uint64 and sizes.dtype == np.int64


def test_mixed_dtypes_make_one_table_each_in_order():
    dtypes = [np.float64, np.float32, BF16, np.float16, np.float32, BF16]
    p = [np.ones(4, d) for d in dtypes]
    g = [np.ones(4, d) for d in dtypes]
    sd = [d if np.dtype(d).itemsize > 2 else (BF16 if i == 2 else np.float32)
          for i, d in enumerate(dtypes)]
    states = [[np.zeros(4, d) for d in sd] for _ in range(2)]
    prep = prepare(p, g, states)
    assert [(c, lay["state_dtype"]) for (c, _, _), lay in zip(prep.groups, prep.layouts)] == \
        [(0, 0), (1, 1), (2, 0), (3, 0), (3, 3)]
    picks = [[1, 4], [0], [3], [5], [2]]
    for (_, ptrs, _), pick in zip(prep.groups, picks):
        np.testing.assert_array_equal(ptrs, expected_tables([p, g, *states], pick))


@pytest.mark.parametrize("kind", [1, 2])
def test_master_and_kahan_lists(kind):
    p, g = arrays(SHAPES, BF16), arrays(SHAPES, BF16)
    states = [arrays(SHAPES, np.float32)]
    extra = arrays(SHAPES, np.float32 if kind == 1 else BF16)
    prep = prepare(p, g, states, (extra, "extra", kind))
    assert prep.layouts == [{"state_dtype": 0, "extra": kind}]
    np.testing.assert_array_equal(prep.groups[0][1],
                                  expected_tables([p, g, *states, extra], range(len(p))))


def test_read_only_reduction_accepts_read_only_arrays():
    x, y = arrays(SHAPES, np.float64), arrays(SHAPES, np.float64)
    for a in x + y:
        a.flags.writeable = False
    prepare(x, y, [], read_only=True)
    with pytest.raises(ValueError, match="read-only"):
        prepare(x, y, [])  # a step writes params


def bad_calls():
    """(label, params, grads, states, extra, error, message) that are refused."""
    def base(dtype=np.float32):
        return arrays([(4,), (3, 2)], dtype), arrays([(4,), (3, 2)], dtype), \
            [arrays([(4,), (3, 2)], dtype) for _ in range(2)]

    p, g, s = base()
    yield "int params", [p[0].astype(np.int32), p[1]], g, s, None, TypeError, r"params\[0\] has dtype int32"
    p, g, s = base()
    yield "grad dtype", p, [g[0].astype(np.float64), g[1]], s, None, TypeError, r"grads\[0\] has dtype float64, params\[0\] has float32"
    p, g, s = base()
    yield "state dtype", p, g, [s[0], [s[1][0].astype(np.float64), s[1][1]]], None, TypeError, r"s1\[0\] has dtype float64"
    p, g, s = base(BF16)
    yield "16-bit state float16", p, g, [arrays([(4,), (3, 2)], np.float16)] * 2, None, TypeError, "float32 or bfloat16"
    p, g, s = base(BF16)
    yield "states disagree", p, g, [arrays([(4,), (3, 2)], np.float32), arrays([(4,), (3, 2)], BF16)], None, TypeError, r"s1\[0\] has dtype bfloat16, s0\[0\] has float32"
    p, g, s = base()
    yield "byte order", [p[0].astype(">f4"), p[1]], g, s, None, TypeError, "native byte order"
    p, g, s = base()
    yield "shape", p, [g[0].reshape(2, 2), g[1]], s, None, ValueError, r"grads\[0\] has shape \(2, 2\), params\[0\] has \(4,\)"
    p, g, s = base()
    yield "size", p, g, [s[0], [s[1][0][:3], s[1][1]]], None, ValueError, r"s1\[0\] has shape \(3,\)"
    p, g, s = base()
    p[1].flags.writeable = False
    yield "read-only param", p, g, s, None, ValueError, r"params\[1\] is read-only"
    p, g, s = base()
    yield "strided state", p, g, [s[0], [np.ones(8, np.float32)[::2], s[1][1]]], None, ValueError, r"s1\[0\] is not C-contiguous"
    p, g, s = base()
    yield "list, not array", [list(p[0]), p[1]], g, s, None, TypeError, "not an array"
    p, g, s = base()
    yield "param is a state", p, g, [s[0], [p[0], s[1][1]]], None, ValueError, "share memory"
    p, g, s = base()
    yield "states overlap", p, g, [s[0], [s[0][0][:], s[1][1]]], None, ValueError, "share memory"
    p, g, s = base()
    big = np.zeros(6, np.float32)
    yield "grad inside a param", [big[:4], p[1]], [big[2:6], g[1]], s, None, ValueError, r"params\[0\] and grads\[0\] share memory"
    yield "master of float32 params", *base(), (arrays([(4,), (3, 2)], np.float32), "m", 1), TypeError, "for float16 and bfloat16 params"
    p, g, s = base(BF16)
    s = [arrays([(4,), (3, 2)], np.float32) for _ in range(2)]
    yield "master not float32", p, g, s, (arrays([(4,), (3, 2)], BF16), "m", 1), TypeError, "master weights are float32"


@pytest.mark.parametrize("case", list(bad_calls()), ids=lambda c: c[0])
def test_refused_with_its_message(case):
    _, p, g, s, extra, error, match = case
    with pytest.raises(error, match=match):
        prepare(p, g, s, extra)


def test_strided_gradient_is_read_through_a_copy():
    p, s = arrays([(4,)], np.float32), [arrays([(4,)], np.float32)]
    g = np.arange(8, dtype=np.float32)[::2]
    prep = prepare(p, [g], s)
    assert len(prep.keep) == 1
    np.testing.assert_array_equal(prep.keep[0], g)
    assert prep.groups[0][1][1] == address(prep.keep[0])


def test_gradients_may_share_memory_with_each_other():
    g = np.ones(8, np.float32)
    p = [np.zeros(8, np.float32), np.zeros(8, np.float32)]
    prepare(p, [g, g], [])


def test_empty_arrays_at_one_address_do_not_overlap():
    e = np.zeros(0, np.float32)
    one = [np.ones(3, np.float32) for _ in range(3)]
    prepare([e, one[0]], [e, one[1]], [[e, one[2]]])


@pytest.mark.parametrize("first", [True, False])
def test_dot_of_strided_arrays_reads_their_elements(first):
    rng = np.random.default_rng(5)
    base = [rng.standard_normal(2 * n) for n in (7, 1000, 3)]
    other = [rng.standard_normal(n) for n in (7, 1000, 3)]
    strided = [b[::2] for b in base]
    xs, ys = (strided, other) if first else (other, strided)
    want = sum(float(np.dot(a.astype(np.float64), b)) for a, b in zip(xs, ys))
    assert F.dot(xs, ys) == pytest.approx(want, rel=1e-12)


# --- a kept call: the gradients exchanged ------------------------------------------------


def test_with_grads_swaps_the_gradient_slot_in_place():
    p, g, s = arrays([(4,), (3, 2)], np.float32), arrays([(4,), (3, 2)], np.float32), \
        [arrays([(4,), (3, 2)], np.float32)]
    prep = prepare(p, g, s)
    table = prep.groups[0][1]
    new = [x + 1 for x in g]
    prep.with_grads(new)
    np.testing.assert_array_equal(table, expected_tables([p, new, *s], range(2)))


@pytest.mark.parametrize("bad, error, match", [
    (lambda g, p, s: [g[0].astype(np.float64), g[1]], TypeError, r"grads\[0\] has dtype float64"),
    (lambda g, p, s: [g[0], g[1].reshape(6)], ValueError, r"grads\[1\] has shape \(6,\)"),
    (lambda g, p, s: [p[0], g[1]], ValueError, r"params\[0\] and grads\[0\] share memory"),
    (lambda g, p, s: [s[0][0], g[1]], ValueError, r"s0\[0\] and grads\[0\] share memory"),
    (lambda g, p, s: [g[0]], ValueError, "got 1 grads for 2 params"),
    (lambda g, p, s: [g[0], "x"], TypeError, "not an array"),
])
def test_with_grads_checks_the_new_gradients_and_keeps_the_old_on_failure(bad, error, match):
    p, g, s = arrays([(4,), (3, 2)], np.float32), arrays([(4,), (3, 2)], np.float32), \
        [arrays([(4,), (3, 2)], np.float32)]
    prep = prepare(p, g, s)
    before = prep.groups[0][1].copy()
    with pytest.raises(error, match=match):
        prep.with_grads(bad(g, p, s))
    np.testing.assert_array_equal(prep.groups[0][1], before)


def _adam_kw(step):
    return dict(step=step, lr=0.1, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.0,
                amsgrad=False, maximize=False, decoupled_weight_decay=False)


def test_kept_plan_is_reused_only_for_the_same_arrays():
    spec = SPECS["adam"]
    p = arrays([(4,), (3, 2)], np.float64)
    s = [[np.zeros_like(x) for x in p] for _ in range(2)]
    g = arrays([(4,), (3, 2)], np.float64)
    plan = _engine.plan(spec, _adam_kw(1), p, g, s)
    kept = _engine.Kept(plan, p, s)
    options = plan.options
    assert kept.reuse(spec, _adam_kw(2), p, g, s, options) is plan
    assert plan.step == 2.0
    other = [x.copy() for x in p]
    assert kept.reuse(spec, _adam_kw(3), other, g, s, options) is None  # other params
    assert kept.reuse(spec, _adam_kw(3), p, g, [s[0], [x.copy() for x in s[1]]],
                      options) is None  # other state
    assert kept.reuse(spec, dict(_adam_kw(3), amsgrad=True), p, g, s, options) is None


def test_class_step_after_a_param_is_replaced_uses_the_new_param():
    """A kept plan must never update an array the optimizer no longer holds."""
    p = [np.ones(4), np.ones(3)]
    opt = fo.SGD(p, lr=0.5)
    opt.step([np.ones(4), np.ones(3)])
    replacement = np.ones(4)
    opt.param_groups[0]["params"][0] = replacement
    opt.step([np.ones(4), np.ones(3)])
    np.testing.assert_array_equal(replacement, 0.5)
    np.testing.assert_array_equal(p[0], 0.5)  # the old one took only the first step


# --- 8-bit state: uint8 codes and float32 block scales ---------------------------------------


BLOCK = _arrays.QUANT_BLOCK


def prepare8(params, grads, codes, scales, extra=None):
    names = [f"s{k}" for k in range(len(codes))]
    return _arrays.prepare("op", params, grads, codes, names, extra=extra, scales=scales)


def q8_lists(shapes, dtype, nstates=2):
    p, g = arrays(shapes, dtype), arrays(shapes, dtype)
    codes = [[np.full(s, 127, np.uint8) for s in shapes] for _ in range(nstates)]
    scales = [[np.ones(-(-int(np.prod(s)) // BLOCK), np.float32) for s in shapes]
              for _ in range(nstates)]
    return p, g, codes, scales


@pytest.mark.parametrize("extra", [None, "master"])
def test_8bit_states_are_one_table_per_param_dtype_with_the_scales_last(extra):
    """16-bit and float32 params with 8-bit state: state code 4 (Int8Block), the scale
    slots after the states and the extra buffers."""
    shapes = [(3, 5), (0,), (7,), (513,)]
    dtypes = [np.float32, BF16, np.float16] if extra is None else [BF16, np.float16]
    lists = [q8_lists(shapes, d) for d in dtypes]
    p, g = sum((x[0] for x in lists), []), sum((x[1] for x in lists), [])
    codes = [sum((x[2][k] for x in lists), []) for k in range(2)]
    scales = [sum((x[3][k] for x in lists), []) for k in range(2)]
    master = None
    if extra:
        master = ([x.astype(np.float32) for x in p], "m", 1)
    prep = prepare8(p, g, codes, scales, master)
    assert [code for code, _, _ in prep.groups] == \
        sorted({np.float32: 0, np.float16: 2}.get(d, 3) for d in dtypes)
    assert all(layout["state_dtype"] == 4 for layout in prep.layouts)
    slots = [p, g, *codes, *([master[0]] if master else []), *scales]
    for i, (code, ptrs, sizes) in enumerate(prep.groups):
        picks = [j for j, x in enumerate(p) if
                 {np.dtype(np.float32): 0, np.dtype(np.float16): 2}.get(x.dtype, 3) == code]
        np.testing.assert_array_equal(ptrs, expected_tables(slots, picks))
        np.testing.assert_array_equal(sizes, [p[j].size for j in picks])


def bad_8bit_calls():
    """(label, params, grads, codes, scales, error, message) that are refused."""
    shapes = [(600,), (3, 2)]

    def base(dtype=np.float32):
        return q8_lists(shapes, dtype)

    p, g, c, s = base(np.float64)
    yield "float64 params", p, g, c, s, TypeError, \
        r"params\[0\] has dtype float64; 8-bit state is for float32, float16 and bfloat16"
    p, g, c, s = base()
    c[1][1] = np.zeros((3, 2), np.float32)
    yield "float codes", p, g, c, s, TypeError, \
        r"s1\[1\] has dtype float32; 8-bit state \(absmax given\) is stored as uint8 codes"
    p, g, c, s = base()
    s[0][1] = np.ones(1)
    yield "float64 scales", p, g, c, s, TypeError, \
        r"absmax of s0\[1\] has dtype float64; block scales are float32"
    p, g, c, s = base()
    s[1][0] = np.ones(2, np.float32)
    yield "too few scales", p, g, c, s, ValueError, \
        r"absmax of s1\[0\] has 2 elements; params\[0\] has 600, which need 3 " \
        r"\(one scale per block of 256\)"
    p, g, c, s = base()
    s[1][0] = np.ones(3, ">f4")
    yield "scales byte order", p, g, c, s, TypeError, "block scales are float32"
    p, g, c, s = base()
    c[0][0] = c[0][0][:599]
    yield "codes' shape", p, g, c, s, ValueError, r"s0\[0\] has shape \(599,\)"
    p, g, c, s = base()
    s[0][0].flags.writeable = False
    yield "read-only scales", p, g, c, s, ValueError, r"absmax of s0\[0\] is read-only"
    p, g, c, s = base()
    s[0][0] = np.ones(6, np.float32)[::2]
    yield "strided scales", p, g, c, s, ValueError, r"absmax of s0\[0\] is not C-contiguous"
    p, g, c, s = base()
    s[1] = s[0]
    yield "scales shared by two states", p, g, c, s, ValueError, "share memory"
    p, g, c, s = base()
    buf = np.zeros(600 + 12, np.uint8)  # codes, then 3 scales: the last code's byte is shared
    c[0][0], s[0][0] = buf[:600], buf[596:608].view(np.float32)
    yield "codes and scales overlap by bytes", p, g, c, s, ValueError, \
        r"s0\[0\] and absmax of s0\[0\] share memory"
    p, g, c, s = base()
    gbuf = np.zeros(600 * 4 + 200, np.uint8)  # the codes start in the gradient's last bytes
    g[0], c[1][0] = gbuf[:2400].view(np.float32), gbuf[2000:2600]
    yield "a gradient over codes", p, g, c, s, ValueError, r"s1\[0\] and grads\[0\] share memory"


@pytest.mark.parametrize("case", list(bad_8bit_calls()), ids=lambda c: c[0])
def test_8bit_refused_with_its_message(case):
    _, p, g, c, s, error, match = case
    with pytest.raises(error, match=match):
        prepare8(p, g, c, s)


def test_8bit_overlap_check_counts_bytes():
    """Codes (1 byte each) directly followed by their scales (4 bytes each) in one buffer
    do not overlap: the check sizes each array by its own item size."""
    p, g, c, s = q8_lists([(600,)], np.float32)
    buf = np.zeros(600 + 12, np.uint8)
    c[0][0], s[0][0] = buf[:600], buf[600:612].view(np.float32)
    prepare8(p, g, c, s)


def test_8bit_scale_lists_must_match_the_states():
    p, g, c, s = q8_lists([(4,)], np.float32)
    with pytest.raises(ValueError, match="one list of scale arrays per state list"):
        prepare8(p, g, c, s[:1])
    with pytest.raises(ValueError, match=r"got 0 absmax of s1 for 1 params"):
        prepare8(p, g, c, [s[0], []])


def test_8bit_with_grads_checks_the_new_gradients():
    p, g, c, s = q8_lists([(600,), (3, 2)], np.float32)
    base = np.zeros(7, np.float32)
    s[1][1] = base[:1]
    prep = prepare8(p, g, c, s)
    table = prep.groups[0][1]
    new = [x + 1 for x in g]
    prep.with_grads(new)
    np.testing.assert_array_equal(table, expected_tables([p, new, *c, *s], range(2)))
    prep.with_grads([new[0], base[1:].reshape(3, 2)])  # right after the scale: no overlap
    before = table.copy()
    with pytest.raises(ValueError, match=r"absmax of s1\[1\] and grads\[1\] share memory"):
        prep.with_grads([new[0], base[:6].reshape(3, 2)])
    np.testing.assert_array_equal(prep.groups[0][1], before)
