"""fo.flat_arrays: views of one buffer, packed in order, and a step on the buffer that
equals the step on the views, bit for bit."""

from __future__ import annotations

import numpy as np
import pytest

import fusedopt as fo
from cases import assert_same_bits

SHAPES = [(7, 5), (5,), (), (0, 3), 11, (2, 3, 4)]


def test_views_are_packed_in_order():
    flat = fo.flat_arrays(SHAPES, np.float64)
    sizes = [35, 5, 1, 0, 11, 24]
    assert flat.buffer.shape == (sum(sizes),) and flat.buffer.dtype == np.float64
    assert [v.shape for v in flat.views] == [(7, 5), (5,), (), (0, 3), (11,), (2, 3, 4)]
    base = flat.buffer.__array_interface__["data"][0]
    offset = 0
    for v, size in zip(flat.views, sizes):
        assert v.dtype == np.float64 and v.flags.c_contiguous and v.flags.writeable
        if size:
            assert v.__array_interface__["data"][0] == base + 8 * offset
            assert np.shares_memory(v, flat.buffer)
        offset += size
    assert not flat.buffer.any()


def test_writes_go_through_both_ways():
    buffer, views = fo.flat_arrays([(2, 2), (3,)], np.float32)
    views[0][...] = [[1, 2], [3, 4]]
    views[1][...] = 5
    assert buffer.tolist() == [1, 2, 3, 4, 5, 5, 5]
    buffer *= 2
    assert views[1].tolist() == [10, 10, 10]


@pytest.mark.parametrize("cls, options", [
    (fo.Adam, {"lr": 1e-2, "weight_decay": 0.1}),
    (fo.SGD, {"lr": 0.1, "momentum": 0.9, "nesterov": True}),
    (fo.Adagrad, {"lr": 0.1, "lr_decay": 0.01}),
    (fo.RMSprop, {"lr": 1e-2, "centered": True, "momentum": 0.5}),
])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_one_call_on_the_buffer_equals_a_step_on_the_views(cls, options, dtype, rng):
    shapes = [(13, 7), (7,), (7, 3), (3,)]
    params = fo.flat_arrays(shapes, dtype)
    grads = fo.flat_arrays(shapes, dtype)
    params.buffer[...] = rng.standard_normal(params.buffer.size)
    separate = [v.copy() for v in params.views]
    on_buffer = cls([params.buffer], **options)
    on_views = cls(separate, **options)
    for _ in range(5):
        grads.buffer[...] = rng.standard_normal(grads.buffer.size)
        on_buffer.step([grads.buffer])
        on_views.step([g.copy() for g in grads.views])
        for k, (a, b) in enumerate(zip(params.views, separate)):
            assert_same_bits(a, b, f"params[{k}]")


def test_bad_shapes():
    with pytest.raises(ValueError, match=r"shapes\[1\] = \(3, -1\) has a negative"):
        fo.flat_arrays([(2,), (3, -1)])
    with pytest.raises(TypeError, match=r"shapes\[0\] is not a shape"):
        fo.flat_arrays([(2.5, 1)])
    with pytest.raises(TypeError, match=r"shapes\[0\] is not a shape"):
        fo.flat_arrays(["ab"])


def test_empty_list():
    buffer, views = fo.flat_arrays([], np.float64)
    assert buffer.shape == (0,) and views == []
