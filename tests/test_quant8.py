"""Blockwise 8-bit optimizer state (`fusedopt.Precision(state_dtype="int8")`).

The code tables against their definition (and bitsandbytes' when it is installed); the
quantizer's codes and scales against a brute-force search (`fusedopt.reference`), with
its special values; the fused 8-bit step of every algorithm of the case table, for
float32 and 16-bit params, against the float64 reference step from the decoded state,
followed by the reference quantization of the new state; thread-count and
instruction-set parity, bit for bit; state dicts; the accuracy of 8-bit AdamW on a
regression and on the digits MLP; and the bad inputs.

Tolerances. The kernel's state before a step is exactly its decoded value (the table
value times the block's float32 scale), so the reference step starts from the same
numbers and differs from the kernel's float32 math by at most C u (|terms|) per element
(test_mixed_precision's bound). A new block scale is the largest magnitude of the new
state: it follows the reference within that bound. A code is the nearest one to
state / scale; where the reference's value lies farther than the bound (relative to
the scale, plus the encoder's own float32 rounding, 2^-20) from a midpoint between two
codes the kernel's code must be the reference's, elsewhere one of the two neighbours.
"""

from __future__ import annotations

import numpy as np
import pytest

import fusedopt
from fusedopt import _cpu, reference as R
from cases import CASES, assert_same_bits, case, random_states
from test_mixed_precision import BF16, F16, F32, F64, assert_within, half_ulp, math_error

BLOCK = 256
SIGNED = {s: _cpu.quant_tables(s)["code"] for s in (True, False)}
ENCODER_SLACK = 2.0 ** -20  # the encoder's float32 roundings, relative to the scale



def _quantizable(c):
    """Whether a case's options keep 8-bit state (the spec's `quantizable` states;
    centered RMSprop refuses it)."""
    spec = c.algo.spec
    try:
        spec.check_quantized(spec.to_op({**spec.group_defaults(), **c.options}), str(c))
    except ValueError:
        return False
    return True


# the cases whose state can be 8-bit
Q_CASES = [c for c in CASES if _quantizable(c)]
assert len(Q_CASES) < len(CASES)  # centered RMSprop is not among them


def quant(x, signed):
    return _cpu.quantize_blockwise(np.ascontiguousarray(x, dtype=np.float32), signed)


def dequant(codes, scales, signed):
    return _cpu.dequantize_blockwise(np.ascontiguousarray(codes), scales, signed)


def midpoints(signed):
    t = SIGNED[signed].astype(F64)
    return (t[1:] + t[:-1]) / 2


def near_tie(y, signed, slack):
    """Where y lies within `slack` of a midpoint between two codes."""
    m = midpoints(signed)
    k = np.clip(np.searchsorted(m, y), 1, m.size - 1)
    return np.minimum(np.abs(y - m[k - 1]), np.abs(y - m[k])) <= slack


def assert_codes(codes, values, scales, signed, slack, what):
    """The kernel's codes of `values` (float64) under the kernel's `scales`: the nearest
    code (reference) where no midpoint lies within `slack` (scaled units; a number or
    one per element), else one of the two around it."""
    codes = np.asarray(codes).ravel().astype(np.int64)
    values = np.asarray(values, dtype=F64).ravel()
    slack = np.broadcast_to(np.asarray(slack, dtype=F64).ravel(), values.shape)
    s = np.repeat(np.asarray(scales, dtype=F64), BLOCK)[:values.size]
    zero = s == 0
    y = np.where(zero, 0.0, values / np.where(zero, 1.0, s))
    if not signed:
        y = np.maximum(y, 0.0)
    table = SIGNED[signed].astype(F64)
    want = np.abs(y[:, None] - table[None, :]).argmin(axis=1)
    tie = near_tie(y, signed, slack)
    diff = np.abs(codes - want)
    bad = (diff > 1) | ((diff == 1) & ~tie)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise AssertionError(f"{what}: {int(bad.sum())} of {bad.size} codes off; first at {i}: "
                             f"{codes[i]} for y = {y[i]!r}, nearest {want[i]}")


# --- the code tables ---------------------------------------------------------------------------


def _torch_dynamic_map(signed):
    """The map as bitsandbytes builds it: float32 linspace midpoints per decade (torch's
    linspace, whose roundings the stored table carries)."""
    torch = pytest.importorskip("torch")
    values = [0.0, 1.0]
    for i in range(7):
        n = 2 ** i if signed else 2 ** (i + 1)
        b = torch.linspace(0.1, 1, n + 1, dtype=torch.float32)
        means = (b[:-1] + b[1:]) / 2.0
        values += (10.0 ** (i - 6) * means).tolist()
        if signed:
            values += (-(10.0 ** (i - 6)) * means).tolist()
    return np.sort(np.array(values, dtype=np.float32))


@pytest.mark.parametrize("signed", [True, False], ids=["signed", "unsigned"])
def test_code_table_is_the_dynamic_map(signed):
    table = SIGNED[signed]
    assert table.dtype == F32 and table.shape == (256,)
    assert (np.diff(table) > 0).all()  # sorted, distinct
    assert_same_bits(table, _torch_dynamic_map(signed), "code table")
    # the float64 definition, to the table's float32 roundings
    np.testing.assert_allclose(table, R.dynamic_map(signed), rtol=2e-7, atol=0)
    assert table[-1] == 1.0 and (table[127] == 0.0 if signed else table[0] == 0.0)
    if signed:  # symmetric but for the top code 1
        assert_same_bits(-table[:127][::-1], table[128:255], "negative half")


@pytest.mark.parametrize("signed", [True, False], ids=["signed", "unsigned"])
def test_code_table_is_bitsandbytes(signed):
    bnb_f = pytest.importorskip("bitsandbytes.functional")
    assert_same_bits(SIGNED[signed], bnb_f.create_dynamic_map(signed=signed).numpy(),
                     "bitsandbytes' map")


@pytest.mark.parametrize("signed", [True, False], ids=["signed", "unsigned"])
def test_encoder_tables_follow_their_definition(signed):
    """The encoder's tables (quant8.h) recomputed from its documented formula."""
    t = _cpu.quant_tables(signed)
    code = SIGNED[signed].astype(F64)
    off, top = (127.0, 128.0) if signed else (0.0, 255.0)
    thr = np.full(16, np.inf)
    thr[0] = 0.5 * code[128 if signed else 1]
    mul, sub, cap = np.zeros(16), np.full(16, -top - off), np.full(16, top + off)
    sub[0], cap[0] = -off, off
    for i in range(7):
        n = 2.0 ** i if signed else 2.0 ** (i + 1)
        base = n if signed else n - 1
        dec = 1.0 / 10.0 ** (6 - i) if i < 6 else 1.0
        mul[1 + i], sub[1 + i], cap[1 + i] = n / (0.9 * dec), n / 9 - base - off, base + n - 1 + off
        if i < 6:
            thr[1 + i] = dec * (1 + 0.9 / n)
    thr[7] = 0.5 * (code[254] + 1.0)
    for name, want in [("thr", thr), ("mul", mul), ("sub", sub), ("cap", cap)]:
        assert_same_bits(t[name], want.astype(F32), name)
    first = [int((t["thr"][:8].astype(F64) <= 2.0 ** (o - 31)).sum()) for o in range(32)]
    assert list(t["first"]) == first


# --- quantizing ------------------------------------------------------------------------------


@pytest.mark.parametrize("signed", [True, False], ids=["signed", "unsigned"])
def test_every_code_encodes_to_itself(signed):
    table = SIGNED[signed]
    # one block per code, each with the value 1 (the scale) and the code's value
    x = np.zeros((256, BLOCK), F32)
    x[:, 0] = 1.0
    x[:, 1] = table
    codes, scales = quant(x.ravel(), signed)
    assert_same_bits(scales, np.ones(256, F32), "scales")
    got = codes.reshape(256, BLOCK)[:, 1]
    want = np.arange(256)
    if signed:  # -0.993 is code 0 whatever sign the zero code would give
        assert got[127] == 127
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("n", [1, 7, 255, 256, 257, 300, 1000, 4097])
@pytest.mark.parametrize("signed", [True, False], ids=["signed", "unsigned"])
def test_codes_and_scales_against_reference(signed, n, rng):
    """Values over twelve decades: the scale of each block (the last one shorter, a
    tensor under one block a block of its own) is exactly its largest magnitude; each
    code the nearest (reference) one but near a midpoint."""
    x = rng.standard_normal(n) * 10.0 ** rng.uniform(-12, 0, n)
    if not signed:
        x = np.abs(x)
    x = x.astype(F32)
    codes, scales = quant(x, signed)
    assert codes.dtype == np.uint8 and codes.shape == x.shape
    assert scales.dtype == F32 and scales.shape == ((n + BLOCK - 1) // BLOCK,)
    want_scales = [np.abs(x[b:b + BLOCK]).max() for b in range(0, n, BLOCK)]
    assert_same_bits(scales, np.array(want_scales, F32), "scales")
    ref_codes, ref_scales = R.quantize_blockwise(x, signed)
    np.testing.assert_array_equal(ref_scales, scales.astype(F64))
    assert_codes(codes, x, scales, signed, ENCODER_SLACK, "codes")
    far = ~near_tie(x.astype(F64) / np.repeat(scales.astype(F64), BLOCK)[:n], signed, ENCODER_SLACK)
    np.testing.assert_array_equal(codes[far], ref_codes[far])
    # decoding is the table value times the scale, in float32
    values = dequant(codes, scales, signed)
    assert_same_bits(values, SIGNED[signed][codes] * np.repeat(scales, BLOCK)[:n], "decoded")
    # within half a code gap of the value (the largest gap is 1 - 0.993 or 0.0141)
    gap = np.diff(SIGNED[signed].astype(F64)).max()
    assert np.all(np.abs(values - x) <= (gap / 2 + 1e-6) * np.repeat(scales, BLOCK)[:n])


def test_special_values():
    """Zeros (and -0) give scale 0 and the zero code; a block holding inf or NaN gets
    that value's magnitude as its scale and reads back as NaN, the other blocks as
    ever; a subnormal scale is exact and its codes the nearest; negative values of the
    unsigned map are stored as 0."""
    x = np.zeros(6 * BLOCK, F32)
    x[BLOCK:2 * BLOCK] = -0.0
    x[2 * BLOCK + 3] = np.inf
    x[2 * BLOCK + 4] = 0.5
    x[3 * BLOCK + 9] = np.nan
    x[4 * BLOCK:5 * BLOCK] = np.linspace(-1, 1, BLOCK, dtype=F32)
    sub = np.float32(2.0 ** -140)  # subnormal
    x[5 * BLOCK:] = np.linspace(0, 1, BLOCK, dtype=F32) * sub
    codes, scales = quant(x, True)
    c = codes.reshape(6, BLOCK)
    assert scales[0] == 0 and scales[1] == 0 and (c[:2] == 127).all()
    assert np.signbit(scales[1]) == False  # noqa: E712
    assert scales[2] == np.inf and np.isnan(scales[3])
    assert (c[2] == 127).all() and (c[3] == 127).all()
    values = dequant(codes, scales, True).reshape(6, BLOCK)
    assert (values[:2] == 0).all() and not np.signbit(values[1]).any()
    assert np.isnan(values[2]).all() and np.isnan(values[3]).all()
    assert scales[4] == 1.0 and np.isfinite(values[4]).all()
    assert scales[5] == sub and np.isfinite(values[5]).all()
    assert_codes(c[5], x[5 * BLOCK:].astype(F64), scales[5:], True, ENCODER_SLACK, "subnormal")
    ucodes, uscales = quant(np.array([-1.0, 0.5, -0.0, 2.0], F32), False)
    assert uscales[0] == 2.0
    np.testing.assert_array_equal(ucodes[[0, 2]], [0, 0])  # negatives: 0


def select_isa(isa):
    try:
        _cpu.set_isa(isa)
    except ValueError as e:
        if "does not support" in str(e):
            pytest.skip(f"this CPU or build does not support {isa}")
        raise


@pytest.mark.parametrize("isa", ["avx2", "avx512"])
def test_quantizer_isa_and_threads_parity(isa, rng):
    """The same codes, scales and decoded values on every instruction set and thread
    count (against the scalar build on one thread)."""
    x = (rng.standard_normal(300_001) * 10.0 ** rng.uniform(-9, 3, 300_001)).astype(F32)
    select_isa("base")
    fusedopt.set_num_threads(1)
    want = {s: quant(x if s else np.abs(x), s) for s in (True, False)}
    select_isa(isa)
    fusedopt.set_num_threads(2)
    for s in (True, False):
        codes, scales = quant(x if s else np.abs(x), s)
        assert_same_bits(codes, want[s][0], f"{isa} codes")
        assert_same_bits(scales, want[s][1], f"{isa} scales")
        assert_same_bits(dequant(codes, scales, s), dequant(*want[s], s), f"{isa} decoded")


# --- the fused 8-bit step against the reference ----------------------------------------------

SIZES = [(1,), (7,), (300,), (2, 256), (4097,), ()]
STEPS = 3


def is_signed(case_, name):
    return not case_.algo.spec.state(name).positive


def f64(arrays):
    return [np.asarray(a, dtype=F64) for a in arrays]


def random_q8_states(case_, params64, rng):
    """Random valid states, quantized: {name: (codes list, scales list)}."""
    out = {}
    for name, bufs in random_states(case_, params64, rng).items():
        pairs = [quant(np.asarray(b, F32).ravel(), is_signed(case_, name)) for b in bufs]
        out[name] = ([c.reshape(np.shape(b)) for (c, _), b in zip(pairs, bufs)],
                     [sc for _, sc in pairs])
    return out


def decoded(case_, states):
    return {name: [dequant(c, sc, is_signed(case_, name)).astype(F64).reshape(c.shape)
                   for c, sc in zip(codes, scales)]
            for name, (codes, scales) in states.items()}


def check_params(dtype, extra, p_old, start, ref, p_new, before_x, after_x, terms, what):
    """A param after the step against the reference (test_mixed_precision's bounds, with
    the update's terms, which may cancel: lr times the gradient and the states)."""
    update = ref - start
    if extra == "master":
        assert_within(after_x, ref, math_error(start, update, terms), what + " master")
        assert_same_bits(p_new, np.asarray(after_x, F32).astype(dtype), what + " = master rounded")
    elif extra == "kahan":
        c_old = np.asarray(before_x, F64)
        err = math_error(start, update, c_old, terms)
        assert_within(p_new, ref + c_old, half_ulp(ref + c_old, dtype) + err, what)
    else:
        assert_within(p_new, ref, half_ulp(ref, dtype) + math_error(start, update, terms), what)


def check_q8_step(case_, dtype, extra, before, grads, after, t, what):
    """One fused step of a list of params with 8-bit states against the reference step
    from the decoded states, and the new codes and scales against the reference
    quantization of the reference's new states. `before`/`after`: {"params", "states":
    {name: (codes, scales)}, "extra"}."""
    p_old = f64(before["params"])
    start = f64(before["extra"]) if extra == "master" else p_old
    old = decoded(case_, before["states"])
    ref_p, ref_s = case_.run_reference(start, f64(grads), old, t)
    lr = case_.op_kwargs(t).get("lr", 1.0)
    for i, p_new in enumerate(after["params"]):
        terms = lr * (np.abs(np.asarray(grads[i], F64)) +
                      sum(np.abs(old[n][i]) + np.abs(ref_s[n][i]) for n in ref_s))
        check_params(dtype, extra, p_old[i], start[i], ref_p[i], p_new,
                     before.get("extra", [None] * len(p_old))[i],
                     after.get("extra", [None] * len(p_old))[i], terms, f"{what} param {i}")
    for name, refs in ref_s.items():
        signed = is_signed(case_, name)
        codes_new, scales_new = after["states"][name]
        for i, r in enumerate(refs):
            where = f"{what} {name} {i}"
            tol = math_error(old[name][i], r, grads[i], start[i]).ravel()
            flat = np.asarray(r, F64).ravel()
            sc = np.asarray(scales_new[i], F64)
            blocks = [slice(b, b + BLOCK) for b in range(0, flat.size, BLOCK)]
            want = np.array([np.abs(flat[b]).max() for b in blocks])
            assert_within(sc, want, np.array([tol[b].max() for b in blocks]) + 1e-30,
                          where + " scale")
            s_el = np.repeat(sc, BLOCK)[:flat.size]
            slack = np.where(s_el > 0, tol / np.where(s_el > 0, s_el, 1.0), 0.0) + ENCODER_SLACK
            assert_codes(codes_new[i], flat, sc, signed, slack, where + " codes")


def copy_q8(live):
    out = {"params": [p.copy() for p in live["params"]],
           "states": {n: ([c.copy() for c in cs], [s.copy() for s in ss])
                      for n, (cs, ss) in live["states"].items()}}
    if "extra" in live:
        out["extra"] = [x.copy() for x in live["extra"]]
    return out


def q8_args(case_, states):
    """The op's state lists (codes) and its absmax keyword (the scales, in slot order)."""
    args = [states[s][0] if s in case_.state_names else None for _, s in case_.algo.slots]
    return args, [states[n][1] for n in case_.state_names]


LAYOUTS = [(F32, "none"), (BF16, "none"), (F16, "none"), (BF16, "master"), (F16, "kahan")]


@pytest.mark.parametrize("dtype,extra", LAYOUTS, ids=["f32", "bf16", "f16", "bf16-master",
                                                      "f16-kahan"])
@pytest.mark.parametrize("case_", Q_CASES, ids=str)
def test_functional_8bit_matches_reference(case_, dtype, extra, rng):
    params64 = [rng.standard_normal(shape) for shape in SIZES]
    live = {"params": [np.asarray(p, dtype=dtype) for p in params64],
            "states": random_q8_states(case_, params64, rng)}
    kwargs = {}
    if extra == "master":
        live["extra"] = [np.array(np.asarray(p, F32) + np.float32(1e-3)) for p in live["params"]]
        kwargs["master_params"] = live["extra"]
    elif extra == "kahan":
        live["extra"] = [np.zeros_like(p) for p in live["params"]]
        kwargs["kahan_buffers"] = live["extra"]
    for t in range(1, STEPS + 1):
        grads = [np.asarray(rng.standard_normal(p.shape), dtype=dtype) for p in live["params"]]
        before = copy_q8(live)
        args, absmax = q8_args(case_, live["states"])
        assert case_.algo.op(live["params"], grads, *args, absmax=absmax,
                             **case_.op_kwargs(t), **kwargs) is None
        check_q8_step(case_, dtype, extra, before, grads, live, t, f"step {t}")
    for name, (codes, scales) in live["states"].items():
        assert all(c.dtype == np.uint8 for c in codes) and all(s.dtype == F32 for s in scales)


CLASS_CASES = [c for c in Q_CASES if c.algo.name != "sgd" or c.options.get("momentum")]


def class_state_q8(opt, case_, i, p):
    """Param i's 8-bit state before a step as (codes, scales) per name: a copy, or what
    the step creates (the constant initial value, quantized)."""
    st = opt.state.get(i)
    out = {}
    for name in case_.state_names:
        if st is not None:
            out[name] = (st[name].copy(), st[name + "_absmax"].copy())
        else:
            value = case_.algo.spec.init_value(name, case_.options)
            c, sc = quant(np.full(p.size, value, F32), is_signed(case_, name))
            out[name] = (c.reshape(p.shape), sc)
    return out


@pytest.mark.parametrize("dtype", [F32, BF16], ids=["f32", "bf16"])
@pytest.mark.parametrize("case_", CLASS_CASES, ids=str)
def test_class_8bit_matches_reference(case_, dtype, rng):
    """The classes under Precision(state_dtype="int8"): the state is uint8 codes and
    float32 scales, and every step follows the reference from the state held before it."""
    params = [np.asarray(rng.standard_normal(s), dtype=dtype) for s in [(9,), (3, 100), ()]]
    opt = case_.make(params, precision=fusedopt.Precision(state_dtype="int8", min_8bit_size=0))
    for t in range(1, STEPS + 1):
        grads = [np.asarray(rng.standard_normal(p.shape), dtype=dtype) for p in params]
        before = [(p.copy(), class_state_q8(opt, case_, i, p)) for i, p in enumerate(params)]
        opt.step(grads)
        for i, (p, (p_old, old)) in enumerate(zip(params, before)):
            st = opt.state[i]
            for n in case_.state_names:
                assert st[n].dtype == np.uint8 and st[n].shape == p.shape
                assert st[n + "_absmax"].dtype == F32
                assert st[n + "_absmax"].shape == ((p.size + BLOCK - 1) // BLOCK,)
            if case_.algo.has_step:
                assert st["step"] == float(t)
            after = {"params": [p], "states": {n: ([st[n]], [st[n + "_absmax"]])
                                               for n in case_.state_names}}
            check_q8_step(case_, dtype, "none", {"params": [p_old], "states": {
                n: ([c], [sc]) for n, (c, sc) in old.items()}}, [grads[i]], after, t,
                f"step {t} param {i}")


def test_min_8bit_size_and_float64_params(rng):
    """Params under min_8bit_size keep float32 state (float64 ones float64), in the same
    step as the 8-bit ones, each against its reference."""
    params = [np.asarray(rng.standard_normal(n), dtype=d)
              for n, d in [(5000, F32), (100, F32), (5000, F64), (5000, BF16), (10, BF16)]]
    opt = fusedopt.AdamW(params, lr=0.01, precision=fusedopt.Precision(state_dtype="int8"))
    for _ in range(2):
        opt.step([np.asarray(rng.standard_normal(p.shape), p.dtype) for p in params])
    kinds = [(opt.state[i]["exp_avg"].dtype, "exp_avg_absmax" in opt.state[i])
             for i in range(len(params))]
    assert kinds == [(np.uint8, True), (F32, False), (F64, False), (np.uint8, True),
                     (F32, False)]


# --- parity ------------------------------------------------------------------------------------

PARITY = [case("adam", lr=0.01, weight_decay=0.1), case("adamw", lr=0.01, amsgrad=True),
          case("sgd", lr=0.05, momentum=0.9, nesterov=True), case("adagrad", lr=0.1),
          case("rmsprop", momentum=0.9), case("adadelta")]
PARITY_SIZES = [70001, 300, 65537, 1, 256]


def run_parity(case_, dtype, rng_seed, stochastic=False):
    rng = np.random.default_rng(rng_seed)
    params64 = [rng.standard_normal(n) for n in PARITY_SIZES]
    params = [np.asarray(p, dtype=dtype) for p in params64]
    states = random_q8_states(case_, params64, rng)
    kwargs = dict(stochastic_rounding=True, seed=3) if stochastic else {}
    for t in range(1, 3):
        grads = [np.asarray(rng.standard_normal(p.shape), dtype=dtype) for p in params]
        args, absmax = q8_args(case_, states)
        case_.algo.op(params, grads, *args, absmax=absmax, **case_.op_kwargs(t), **kwargs)
    return params, states


def assert_same_run(a, b, what):
    for i, (x, y) in enumerate(zip(a[0], b[0])):
        assert_same_bits(x, y, f"{what} param {i}")
    for name in a[1]:
        for i, (x, y) in enumerate(zip(a[1][name][0], b[1][name][0])):
            assert_same_bits(x, y, f"{what} {name} codes {i}")
        for i, (x, y) in enumerate(zip(a[1][name][1], b[1][name][1])):
            assert_same_bits(x, y, f"{what} {name} scales {i}")


@pytest.mark.parametrize("dtype", [F32, BF16, F16], ids=["f32", "bf16", "f16"])
@pytest.mark.parametrize("case_", PARITY, ids=str)
def test_threads_agree(case_, dtype):
    """1 and 2 threads split the blocks differently: the same bits."""
    fusedopt.set_num_threads(1)
    one = run_parity(case_, dtype, 7)
    fusedopt.set_num_threads(2)
    two = run_parity(case_, dtype, 7)
    assert_same_run(one, two, "1 vs 2 threads")


@pytest.mark.parametrize("isa", ["avx2", "avx512"])
@pytest.mark.parametrize("dtype,stochastic", [(F32, False), (BF16, False), (F16, False),
                                              (BF16, True), (F16, True)],
                         ids=["f32", "bf16", "f16", "bf16-sr", "f16-sr"])
@pytest.mark.parametrize("case_", PARITY[:3], ids=str)
def test_instruction_sets_agree(case_, dtype, stochastic, isa):
    select_isa("base")
    base = run_parity(case_, dtype, 11, stochastic)
    select_isa(isa)
    other = run_parity(case_, dtype, 11, stochastic)
    assert_same_run(base, other, f"base vs {isa}")
