"""Results that must not depend on how a step is run, bit for bit.

Every element is updated by the same instructions whatever the grouping of the
tensors into calls, the thread count, or the instruction set the kernels were
compiled for (the build forbids contraction into FMA), so these comparisons
are exact.
"""

from __future__ import annotations

import numpy as np
import pytest

import fusedopt
from cases import CASES, assert_same_bits, random_arrays, random_states

# The step counts of the steps each test runs: the last one a later step, so that rules
# whose math changes with t (RAdam's rectification, from t = 6) run both ways.
STEP_COUNTS = (1, 2, 7)

# Many tensors of irregular sizes, 340k elements in all: well above the size
# below which the driver runs on one thread, and with thread boundaries that fall
# inside tensors rather than between them.
MANY_SHAPES = [(n,) for n in (1, 7, 63, 64, 65, 1000, 4097, 12345, 30001, 77777)] * 3 + \
    [(0,), (), (129, 257), (3, 5, 7), (100003,)]


def _setup(c, dtype, shapes, seed):
    rng = np.random.default_rng(seed)
    params = random_arrays(shapes, dtype, rng)
    states = random_states(c, params, rng)
    grads = [random_arrays(shapes, dtype, rng) for _ in STEP_COUNTS]
    return params, states, grads


def _run(c, params, states, grads, per_tensor=False):
    for t, g in zip(STEP_COUNTS, grads):
        if per_tensor:
            for i in range(len(params)):
                c.run_op([params[i]], [g[i]], {n: [b[i]] for n, b in states.items()}, t)
        else:
            c.run_op(params, g, states, t)
    return params, states


def _assert_same(c, a, b, what):
    (pa, sa), (pb, sb) = a, b
    for i, (x, y) in enumerate(zip(pa, pb)):
        assert_same_bits(x, y, f"{c} {what}: params[{i}]")
    for name in c.state_names:
        for i, (x, y) in enumerate(zip(sa[name], sb[name])):
            assert_same_bits(x, y, f"{c} {what}: {name}[{i}]")


DTYPES = pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
ALL_CASES = pytest.mark.parametrize("c", CASES, ids=str)


@DTYPES
@ALL_CASES
def test_one_call_equals_one_call_per_tensor(c, dtype):
    shapes = MANY_SHAPES[:12] + [(0,), (), (40000,)]
    multi = _run(c, *_setup(c, dtype, shapes, 1))
    single = _run(c, *_setup(c, dtype, shapes, 1), per_tensor=True)
    _assert_same(c, multi, single, "one call vs one call per tensor")


@DTYPES
@ALL_CASES
def test_thread_counts_agree(c, dtype):
    fusedopt.set_num_threads(1)
    assert fusedopt.get_num_threads() == 1
    one = _run(c, *_setup(c, dtype, MANY_SHAPES, 2))
    fusedopt.set_num_threads(2)
    assert fusedopt.get_num_threads() == 2
    two = _run(c, *_setup(c, dtype, MANY_SHAPES, 2))
    _assert_same(c, one, two, "1 thread vs 2 threads")


def test_set_num_threads_rejects_zero():
    with pytest.raises(ValueError):
        fusedopt.set_num_threads(0)


def _select_isa_or_skip(isa):
    try:
        fusedopt._cpu.set_isa(isa)
    except ValueError as e:
        if "does not support" in str(e):
            pytest.skip(f"this CPU does not support {isa}")
        raise
    assert fusedopt._cpu.get_isa() == isa


@pytest.mark.parametrize("isa", ["avx2", "avx512"])
@DTYPES
@ALL_CASES
def test_instruction_sets_agree(c, dtype, isa):
    fusedopt.set_num_threads(2)
    _select_isa_or_skip("base")
    base = _run(c, *_setup(c, dtype, MANY_SHAPES, 3))
    _select_isa_or_skip(isa)
    other = _run(c, *_setup(c, dtype, MANY_SHAPES, 3))
    _assert_same(c, base, other, f"base vs {isa}")


def test_unknown_isa_is_refused():
    before = fusedopt._cpu.get_isa()
    with pytest.raises(ValueError, match="unknown instruction set"):
        fusedopt._cpu.set_isa("sse9")
    assert fusedopt._cpu.get_isa() == before


def test_each_instruction_set_runs_its_own_kernels():
    """The kernels are compiled once per instruction set; each set must run its own
    build (a merged instantiation would make every set run the same code, and the
    parity tests above would then compare a build with itself)."""
    from fusedopt import _cpu

    expected = {"base": 128, "avx2": 256, "avx512": 512}
    ran = 0
    for isa, bits in expected.items():
        try:
            _cpu.set_isa(isa)
        except ValueError:
            continue  # this CPU lacks the set
        assert _cpu.vector_bits() == bits, isa
        ran += 1
    assert ran >= 1


def _moved(arrays, shift):
    """Copies of `arrays` that start `shift` elements (times a per-array step) into a
    buffer, so that their addresses fall anywhere within a cache line."""
    out = []
    for k, a in enumerate(arrays):
        off = (shift * (k + 1)) % 17
        buf = np.empty(a.size + off, a.dtype)
        view = buf[off:].reshape(a.shape)
        view[...] = a
        out.append(view)
    return out


@pytest.mark.parametrize("shift", [0, 1, 3, 8])
@DTYPES
@ALL_CASES
def test_addresses_do_not_change_results(c, dtype, shift):
    """The driver runs the elements before a cache-line boundary as a piece of their
    own; where that boundary falls must not change a bit."""
    fusedopt.set_num_threads(2)
    params, states, grads = _setup(c, dtype, MANY_SHAPES, 9)
    moved = (_moved(params, shift), {n: _moved(b, shift + 1) for n, b in states.items()},
             [_moved(g, shift + 2) for g in grads])
    want = _run(c, [p.copy() for p in params], {n: [x.copy() for x in b] for n, b in states.items()},
                grads)
    got = _run(c, *moved)
    _assert_same(c, want, got, f"arrays moved by {shift}")
