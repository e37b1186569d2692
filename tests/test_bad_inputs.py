"""Bad input gets a clear error and modifies nothing (DESIGN.md section 4).

Each row of the table spoils one argument of an otherwise valid call, usually at
the last index so that a partial update of the earlier tensors would show. The
test checks the exception type, that the message names the op and the argument,
and that every array involved is bit-for-bit what it was.
"""

from __future__ import annotations

import re

import numpy as np
import pytest

from cases import FULL_CASES, assert_same_bits, case, random_arrays, random_states

SHAPES = [(10,), (4, 3), (5,)]
LAST = len(SHAPES) - 1


def mentions(*parts):
    """A regex that matches when the message contains every part (as literal text)."""
    return "(?s)" + "".join(f"(?=.*{re.escape(p)})" for p in parts)


class Call:
    """A valid call of a case's functional op; rows of the table spoil it."""

    def __init__(self, c, dtype=np.float64, seed=0):
        rng = np.random.default_rng(seed)
        self.case = c
        self.op = c.algo.op.__name__
        self.params = random_arrays(SHAPES, dtype, rng)
        self.grads = random_arrays(SHAPES, dtype, rng)
        self.states = random_states(c, self.params, rng)
        self.originals = self.everything()

    @property
    def state_args(self):
        """(functional argument name, list) of every state list of the call."""
        return [(self.case.algo.arg_name(n), self.states[n]) for n in self.case.state_names]

    def everything(self):
        out = []
        for seq in [self.params, self.grads, *self.states.values()]:
            out += [a for a in seq if isinstance(a, np.ndarray)]
        return out

    def run(self, t=2):
        return self.case.run_op(self.params, self.grads, self.states, t)


def _replace(seq, i, new):
    seq[i] = new
    return new


def _set_dtype_everywhere(call, i, dtype):
    for seq in [call.params, call.grads, *call.states.values()]:
        seq[i] = seq[i].astype(dtype)


def _noncontiguous(a):
    """The same values, in a strided view (every other element of a larger array)."""
    base = np.zeros((2 * a.size,) if a.ndim == 1 else a.shape + (2,), dtype=a.dtype)
    view = base[::2] if a.ndim == 1 else base[..., 0]
    view[...] = a
    assert not view.flags.c_contiguous and view.shape == a.shape
    return view


def _read_only(a):
    a = a.copy()
    a.flags.writeable = False
    return a


# id, how to spoil the call, exception, what the message must contain. `spoil`
# returns the parts the message must name besides the op.
def _short_grads(call):
    call.grads.pop()
    return ["grads", "2", "3"]


def _long_grads(call):
    call.grads.append(call.grads[0].copy())
    return ["grads", "4", "3"]


def _short_state(call):
    name, seq = call.state_args[-1]
    seq.pop()
    return [name, "2", "3"]


def _grad_shape(call):
    _replace(call.grads, LAST, np.zeros(6))
    return ["grads[2]", "(6,)", "(5,)"]


def _grad_same_size_other_shape(call):
    _replace(call.grads, 1, np.zeros((3, 4)))
    return ["grads[1]", "(3, 4)", "(4, 3)"]


def _grad_flat_for_2d(call):
    _replace(call.grads, 1, np.zeros(12))
    return ["grads[1]", "(12,)", "(4, 3)"]


def _grad_of_one_element_for_0d(call):
    for seq in [call.params, *call.states.values()]:
        seq[LAST] = seq[LAST][:1].reshape(())
    call.grads[LAST] = np.zeros(1)
    return ["grads[2]", "(1,)", "()"]


def _state_shape(call):
    name, seq = call.state_args[-1]
    _replace(seq, LAST, np.zeros((5, 1)))
    return [f"{name}[2]", "(5, 1)", "(5,)"]


def _grad_dtype(call):
    call.grads[LAST] = call.grads[LAST].astype(np.float32)
    return ["grads[2]", "float32"]


def _state_dtype(call):
    name, seq = call.state_args[-1]
    seq[LAST] = seq[LAST].astype(np.float32)
    return [f"{name}[2]", "float32"]


def _param_dtype_only(call):
    call.params[LAST] = call.params[LAST].astype(np.float32)
    return ["[2]", "float32"]


def _int32(call):
    _set_dtype_everywhere(call, LAST, np.int32)
    return ["[2]", "int32"]


def _int64(call):
    _set_dtype_everywhere(call, LAST, np.int64)
    return ["[2]", "int64"]


def _complex(call):
    _set_dtype_everywhere(call, LAST, np.complex128)
    return ["[2]", "complex128"]


def _float16(call):
    _set_dtype_everywhere(call, LAST, np.float16)
    return ["[2]", "float16"]


def _bool(call):
    _set_dtype_everywhere(call, LAST, np.bool_)
    return ["[2]", "bool"]


def _big_endian_everywhere(call):
    _set_dtype_everywhere(call, LAST, np.dtype(">f8"))
    return ["params[2]"]


def _big_endian_grad(call):
    call.grads[LAST] = call.grads[LAST].astype(">f8")
    return ["grads[2]"]


def _big_endian_state(call):
    name, seq = call.state_args[-1]
    seq[LAST] = seq[LAST].astype(">f8")
    return [f"{name}[2]"]


def _param_strided(call):
    call.params[LAST] = _noncontiguous(call.params[LAST])
    return ["params[2]", "contiguous"]


def _param_fortran(call):
    call.params[1] = np.asfortranarray(call.params[1])
    return ["params[1]", "contiguous"]


def _param_transposed(call):
    call.params[1] = np.ascontiguousarray(call.params[1].T).T
    return ["params[1]", "contiguous"]


def _state_strided(call):
    name, seq = call.state_args[-1]
    seq[LAST] = _noncontiguous(seq[LAST])
    return [f"{name}[2]", "contiguous"]


def _param_read_only(call):
    call.params[LAST] = _read_only(call.params[LAST])
    return ["params[2]"]


def _state_read_only(call):
    name, seq = call.state_args[0]
    seq[LAST] = _read_only(seq[LAST])
    return [f"{name}[2]"]


def _same_param_twice(call):
    call.params[LAST] = call.params[0][:5]
    return ["params[0]", "params[2]"]


def _params_overlap_partly(call):
    base = np.concatenate([call.params[0], call.params[LAST]])
    call.params[0] = base[:10]
    call.params[LAST] = base[8:13]
    return ["params[0]", "params[2]"]


def _state_is_param(call):
    name, seq = call.state_args[-1]
    seq[LAST] = call.params[LAST]
    return [f"{name}[2]", "params[2]"]


def _states_overlap(call):
    (n0, s0), (n1, s1) = call.state_args[0], call.state_args[-1]
    if n0 == n1:  # one state list: two of its arrays
        s1[LAST] = s0[0][:5]
        return [f"{n0}[0]", f"{n0}[2]"]
    s1[LAST] = s0[LAST]
    return [f"{n0}[2]", f"{n1}[2]"]


def _grad_is_param(call):
    call.grads[LAST] = call.params[LAST]
    return ["grads[2]", "params[2]"]


def _grad_views_param(call):
    call.grads[LAST] = call.params[0][3:8]
    return ["grads[2]", "params[0]"]


def _grad_is_state(call):
    name, seq = call.state_args[-1]
    call.grads[LAST] = seq[LAST]
    return ["grads[2]", f"{name}[2]"]


def _grad_is_list(call):
    call.grads[LAST] = call.grads[LAST].tolist()
    return ["grads[2]"]


def _grad_is_none(call):
    call.grads[LAST] = None
    return ["grads[2]"]


def _param_is_float(call):
    call.params[LAST] = 3.0
    return ["params[2]"]


def _state_is_string(call):
    name, seq = call.state_args[-1]
    seq[LAST] = "not an array"
    return [f"{name}[2]"]


def _grads_not_a_list(call):
    call.grads = call.grads[0]
    return ["grads"]


ROWS = [
    (_short_grads, ValueError, None),
    (_long_grads, ValueError, None),
    (_short_state, ValueError, None),
    (_grad_shape, ValueError, None),
    (_grad_same_size_other_shape, ValueError, None),
    (_grad_flat_for_2d, ValueError, None),
    (_grad_of_one_element_for_0d, ValueError, None),
    (_state_shape, ValueError, None),
    (_grad_dtype, TypeError, None),
    (_state_dtype, TypeError, None),
    (_param_dtype_only, TypeError, None),
    (_int32, TypeError, None),
    (_int64, TypeError, None),
    (_complex, TypeError, None),
    (_float16, TypeError, None),
    (_bool, TypeError, None),
    (_big_endian_everywhere, TypeError, None),
    (_big_endian_grad, TypeError, None),
    (_big_endian_state, TypeError, None),
    (_param_strided, ValueError, None),
    (_param_fortran, ValueError, None),
    (_param_transposed, ValueError, None),
    (_state_strided, ValueError, None),
    (_param_read_only, ValueError, "read-only|writeable|writable"),
    (_state_read_only, ValueError, "read-only|writeable|writable"),
    (_same_param_twice, ValueError, "overlap|share"),
    (_params_overlap_partly, ValueError, "overlap|share"),
    (_state_is_param, ValueError, "overlap|share"),
    (_states_overlap, ValueError, "overlap|share"),
    (_grad_is_param, ValueError, "overlap|share"),
    (_grad_views_param, ValueError, "overlap|share"),
    (_grad_is_state, ValueError, "overlap|share"),
    (_grad_is_list, TypeError, None),
    (_grad_is_none, TypeError, None),
    (_param_is_float, TypeError, None),
    (_state_is_string, TypeError, None),
    (_grads_not_a_list, TypeError, None),
]


@pytest.mark.parametrize("spoil,exc,also", ROWS, ids=[r[0].__name__[1:] for r in ROWS])
@pytest.mark.parametrize("c", FULL_CASES, ids=str)
def test_bad_input_is_refused_and_nothing_changes(c, spoil, exc, also, snapshot):
    call = Call(c)
    parts = spoil(call)
    # every array of the spoiled call, and every array of the original one
    before = snapshot(call.everything(), call.originals)
    pattern = mentions(call.op, *parts)
    if also:
        pattern += f"(?=.*(?:{also}))"
    with pytest.raises(exc, match=pattern):
        call.run()
    before.assert_unchanged()


@pytest.mark.parametrize("c", FULL_CASES, ids=str)
def test_missing_state_list_is_refused(c, snapshot):
    """Options that need a state list (momentum, centering, amsgrad) refuse None for it."""
    call = Call(c)
    before = snapshot(call.everything())
    name = call.case.state_names[-1]
    arg = c.algo.arg_name(name)
    args = [call.states[s] if s in c.state_names and s != name else None
            for _, s in c.algo.slots]
    with pytest.raises(ValueError, match=mentions(call.op, arg)):
        c.algo.op(call.params, call.grads, *args, **c.op_kwargs(2))
    before.assert_unchanged()


@pytest.mark.parametrize("op", ["adam", "adamw", "adagrad"])
def test_step_must_count_from_one(op, snapshot):
    c = case(op, amsgrad=True) if op.startswith("adam") else case(op)
    call = Call(c)
    before = snapshot(call.everything())
    kwargs = dict(c.op_kwargs(1), step=0)
    with pytest.raises(ValueError, match=mentions(call.op, "step")):
        c.algo.op(call.params, call.grads, *[call.states[n] for n in c.state_names], **kwargs)
    before.assert_unchanged()


# ---- inputs that look odd but are valid --------------------------------------------------


def _expected(c, params, grads, states, t=2):
    return c.run_reference([p.astype(np.float64) for p in params],
                           [np.asarray(g, dtype=np.float64) for g in grads],
                           {n: [b.astype(np.float64) for b in bs] for n, bs in states.items()}, t)


def _assert_matches(c, call, expected):
    exp_params, exp_states = expected
    for i, (p, e) in enumerate(zip(call.params, exp_params)):
        np.testing.assert_allclose(p, e, rtol=1e-12, atol=1e-14, err_msg=f"params[{i}]")
    for name in c.state_names:
        for i, (b, e) in enumerate(zip(call.states[name], exp_states[name])):
            np.testing.assert_allclose(b, e, rtol=1e-12, atol=1e-14, err_msg=f"{name}[{i}]")


@pytest.mark.parametrize("c", FULL_CASES, ids=str)
def test_empty_lists_are_a_no_op(c):
    args = [[] if s in c.state_names else None for _, s in c.algo.slots]
    assert c.algo.op([], [], *args, **c.op_kwargs(2)) is None


@pytest.mark.parametrize("c", FULL_CASES, ids=str)
def test_zero_size_and_0d_arrays(c, rng):
    shapes = [(0,), (), (3, 0), (1,)]
    call = Call(c)
    call.params = random_arrays(shapes, np.float64, rng)
    call.grads = random_arrays(shapes, np.float64, rng)
    call.states = random_states(c, call.params, rng)
    expected = _expected(c, call.params, call.grads, call.states)
    ptr = call.params[1].__array_interface__["data"][0]
    call.run()
    assert call.params[1].shape == () and call.params[1].__array_interface__["data"][0] == ptr
    _assert_matches(c, call, expected)


@pytest.mark.parametrize("c", FULL_CASES, ids=str)
def test_noncontiguous_grads_are_read_correctly(c, snapshot):
    call = Call(c)
    twin = Call(c)
    call.grads = [_noncontiguous(g) for g in call.grads]
    call.grads[1] = np.asfortranarray(twin.grads[1])
    grads = snapshot(call.grads)
    call.run()
    twin.run()
    grads.assert_unchanged()
    for i, (a, b) in enumerate(zip(call.params, twin.params)):
        assert_same_bits(a, b, f"params[{i}]")
    for name in c.state_names:
        for i, (a, b) in enumerate(zip(call.states[name], twin.states[name])):
            assert_same_bits(a, b, f"{name}[{i}]")


@pytest.mark.parametrize("c", FULL_CASES, ids=str)
def test_gradients_may_share_memory_with_each_other(c):
    """Gradients are only read: two of them may be the same memory."""
    call = Call(c)
    call.grads[LAST] = call.grads[0][:5]
    expected = _expected(c, call.params, call.grads, call.states)
    call.run()
    _assert_matches(c, call, expected)


@pytest.mark.parametrize("c", FULL_CASES, ids=str)
def test_disjoint_views_of_one_buffer_are_fine(c):
    """Arrays that are views of one buffer but do not overlap are valid."""
    call = Call(c)
    base = np.concatenate([p.ravel() for p in call.params])
    views, start = [], 0
    for p in call.params:
        views.append(base[start:start + p.size].reshape(p.shape))
        start += p.size
    call.params = views
    expected = _expected(c, call.params, call.grads, call.states)
    call.run()
    _assert_matches(c, call, expected)


def test_grads_list_may_be_a_tuple():
    c = case("adam", lr=0.01)
    call = Call(c)
    expected = _expected(c, call.params, call.grads, call.states)
    c.algo.op(call.params, tuple(call.grads), *[call.states[n] for n in c.state_names],
              **c.op_kwargs(2))
    _assert_matches(c, call, expected)


# ---- the classes: a failed step leaves params, state and step counters alone -------------


def _class_spoilers():
    def wrong_count(grads, params):
        return grads[:-1]

    def wrong_shape(grads, params):
        return grads[:-1] + [np.zeros(7)]

    def wrong_dtype(grads, params):
        return grads[:-1] + [grads[-1].astype(np.float32)]

    def grad_is_param(grads, params):
        return grads[:-1] + [params[-1]]

    def not_an_array(grads, params):
        return grads[:-1] + ["x"]

    return [(wrong_count, ValueError), (wrong_shape, ValueError), (wrong_dtype, TypeError),
            (grad_is_param, ValueError), (not_an_array, TypeError)]


CLASS_SPOILERS = _class_spoilers()


@pytest.mark.parametrize("spoil,exc", CLASS_SPOILERS, ids=[s.__name__ for s, _ in CLASS_SPOILERS])
@pytest.mark.parametrize("c", FULL_CASES, ids=str)
def test_failed_class_step_changes_nothing(c, spoil, exc, rng, snapshot):
    params = random_arrays(SHAPES, np.float64, rng)
    twin_params = [p.copy() for p in params]
    # two groups: a bad gradient in the second must not let the first one run
    opt = c.make([{"params": params[:2]}, {"params": params[2:]}])
    twin = c.make([{"params": twin_params[:2]}, {"params": twin_params[2:]}])
    grads = [random_arrays(SHAPES, np.float64, rng) for _ in range(3)]

    # a failed first step, then a failed later step: neither counts
    for k in (0, 1):
        before = snapshot(params, opt.state)
        steps = {i: s.get("step") for i, s in opt.state.items()}
        with pytest.raises(exc):
            opt.step(spoil(grads[k], params))
        before.assert_unchanged()
        # no state created, no step counted
        assert {i: s.get("step") for i, s in opt.state.items()} == steps
        opt.step(grads[k])
        twin.step(grads[k])

    opt.step(grads[2])
    twin.step(grads[2])
    for i, (a, b) in enumerate(zip(params, twin_params)):
        assert_same_bits(a, b, f"params[{i}]")
    for i in twin.state:
        for name, v in twin.state[i].items():
            if isinstance(v, np.ndarray):
                assert_same_bits(opt.state[i][name], v, f"{name}[{i}]")
            else:
                assert opt.state[i][name] == v


def test_params_of_two_groups_sharing_memory_are_refused():
    """Each group's call checks its own arrays at every step; a param of a new group that
    is a view into a param of an earlier group is refused when the group is added (it
    would be updated twice per step)."""
    import fusedopt

    a = np.arange(10, dtype=np.float32)
    for view in (a[2:5], a[::3], a[9:], a.reshape(2, 5)[1]):
        with pytest.raises(ValueError, match=mentions("params[0] of parameter group 1",
                                                      "param 0 of an earlier group",
                                                      "shares memory")):
            fusedopt.Adam([{"params": [a]}, {"params": [view], "lr": 0.1}])
    opt = fusedopt.SGD([{"params": [np.zeros(3, np.float32), a[:5]]}], lr=1.0)
    with pytest.raises(ValueError, match="params.1. of parameter group 1 shares memory with "
                                         "param 1"):
        opt.add_param_group({"params": [np.zeros(2, np.float32), a[4:6]]})
    assert len(opt.param_groups) == 1
    # views that do not overlap are fine, as are empty ones
    d = np.zeros(10, np.float32)
    opt = fusedopt.SGD([{"params": [d[:5]]}, {"params": [d[5:], d[:0]]}], lr=1.0)
    opt.step([np.ones(5, np.float32), np.ones(5, np.float32), np.ones(0, np.float32)])
    assert (d == -1).all()


def test_memory_extents_of_every_array_kind():
    from fusedopt import _arrays

    a = np.zeros((4, 6), np.float64)
    base = a.__array_interface__["data"][0]
    assert _arrays.memory_extent(a) == (base, base + a.nbytes)
    assert _arrays.memory_extent(a[:, ::-2]) == (base + 8, base + 3 * 48 + 5 * 8 + 8)
    assert _arrays.memory_extent(a[:0]) is None

    class Iface:
        def __init__(self, arr):
            self.__array_interface__ = arr.__array_interface__

    assert _arrays.memory_extent(Iface(a[1:3, 2:4])) == (base + 48 + 16, base + 2 * 48 + 32)
    assert _arrays.memory_extent(object()) is None
    torch = pytest.importorskip("torch")
    t = torch.zeros(4, 6, dtype=torch.float64)
    low = t.data_ptr()
    assert _arrays.memory_extent(t) == (low, low + 4 * 6 * 8)
    assert _arrays.memory_extent(t[1:3, 2:4]) == (low + 48 + 16, low + 2 * 48 + 32)
    assert _arrays.first_overlap([t[3]], [t[:1], t[1:3]]) is None
    assert _arrays.first_overlap([t[2:]], [t[:1], t[1:3]]) == (0, 1)
