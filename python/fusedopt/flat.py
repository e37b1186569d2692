"""A model's arrays as views of one contiguous buffer.

    import numpy as np
    import fusedopt as fo

    shapes = [(784, 128), (128,), (128, 10), (10,)]
    params = fo.flat_arrays(shapes, np.float32)     # params.views: the four arrays
    grads = fo.flat_arrays(shapes, np.float32)
    opt = fo.Adam([params.buffer], lr=1e-3)
    for batch in data:
        backward(params.views, grads.views, batch)  # writes into the grad views
        opt.step([grads.buffer])                    # one call over contiguous memory

The forward and backward passes read and write the per-layer views; the optimizer
steps the whole buffer in one call, with no per-array work on the host. The
optimizer's state is then one array per state buffer, laid out like the params.
"""

from __future__ import annotations

import operator
from typing import Any, Iterable, NamedTuple, Sequence, Union

import numpy as np

__all__ = ["FlatArrays", "flat_arrays"]

Shape = Union[int, Sequence[int]]


class FlatArrays(NamedTuple):
    """The result of `flat_arrays`: `buffer`, the one-dimensional array that holds
    everything, and `views`, one array per requested shape, in order."""

    buffer: Any
    views: list


def _shape(i: int, shape: Shape) -> tuple:
    try:
        dims = (operator.index(shape),) if not isinstance(shape, (tuple, list)) else \
            tuple(operator.index(d) for d in shape)
    except TypeError:
        raise TypeError(f"flat_arrays: shapes[{i}] is not a shape (got {shape!r}); expected "
                        "an int or a tuple of ints") from None
    if any(d < 0 for d in dims):
        raise ValueError(f"flat_arrays: shapes[{i}] = {dims} has a negative dimension")
    return dims


def flat_arrays(shapes: Iterable[Shape], dtype: Any = np.float32, *,
                like: Any = None) -> FlatArrays:
    """Allocate one zero-filled, contiguous buffer and return views of it with the
    given shapes.

    Parameters
    ----------
    shapes : iterable of int or tuple of int
        The shape of each array, in order. The views are packed one after the other
        in the buffer with no gaps (``views[k]`` starts where ``views[k-1]`` ends), so
        the buffer holds exactly ``sum(prod(shape))`` elements.
    dtype : data-type, optional
        The dtype of the buffer and every view (default float32).
    like : array, optional
        Allocate with the library of this array (NumPy's ``like=`` protocol): pass a
        CuPy array to get a buffer and views in GPU memory on its device.

    Returns
    -------
    FlatArrays
        ``(buffer, views)``: the one-dimensional buffer and a list of C-contiguous
        views of it. Writing to a view writes to the buffer and back.

    Raises
    ------
    TypeError
        A shape is not an int or a tuple of ints.
    ValueError
        A shape has a negative dimension.

    Notes
    -----
    Existing values are copied in with ``for v, a in zip(views, arrays): v[...] = a``.
    A step of any fusedopt optimizer on ``[buffer]`` with ``[grad_buffer]`` performs
    the same element-wise update as a step on the list of views, in one call;
    `fusedopt.mpi.ZeroRedundancyOptimizer` also communicates such buffers in place.
    """
    dims = [_shape(i, s) for i, s in enumerate(shapes)]
    sizes = [int(np.prod(d, dtype=np.int64)) for d in dims]
    offsets = np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)]).tolist()
    kwargs = {} if like is None else {"like": like}
    buffer = np.zeros(offsets[-1], dtype=dtype, **kwargs)
    views = [buffer[start:start + size].reshape(shape)
             for start, size, shape in zip(offsets, sizes, dims)]
    return FlatArrays(buffer, views)
