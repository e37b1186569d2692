"""Describe arrays that are not NumPy arrays: the array interfaces and DLPack.

`describe` returns the same row `_cpu.describe` gives a NumPy array, plus the
device column, and an object to keep alive until the kernel has run.
"""

from __future__ import annotations

import numpy as np

from . import _cpu

_F_NDARRAY = _cpu.FLAG_NDARRAY
_F_CONTIG = _cpu.FLAG_C_CONTIGUOUS
_F_WRITEABLE = _cpu.FLAG_WRITEABLE
_F_NATIVE = _cpu.FLAG_NATIVE


def _c_contiguous(shape, strides, itemsize):
    if strides is None:
        return True
    expect = itemsize
    for dim, stride in zip(reversed(shape), reversed(strides)):
        if dim != 1 and stride != expect:
            return False
        expect *= dim
    return True


def _row(ptr, shape, strides, typestr, readonly, device):
    dt = np.dtype(typestr)
    size = int(np.prod(shape, dtype=np.int64)) if shape else 1
    flags = _F_NDARRAY  # "described": the column is non-zero for every known array
    if _c_contiguous(shape, strides, dt.itemsize):
        flags |= _F_CONTIG
    if not readonly:
        flags |= _F_WRITEABLE
    if dt.byteorder != ">":
        flags |= _F_NATIVE
    return np.array([ptr, size, dt.itemsize, dt.num, flags, _cpu.shape_hash(list(shape)),
                     len(shape), device], dtype=np.int64)


def describe(op, name, obj):
    """(row, holder) for `obj`, or TypeError when it is not an array we can read."""
    cai = getattr(obj, "__cuda_array_interface__", None)
    if cai is not None:
        ptr, readonly = cai["data"]
        device = 1 + _cuda_device_of(ptr, obj)
        return _row(ptr, tuple(cai["shape"]), cai.get("strides"), cai["typestr"], readonly,
                    device), obj
    ai = getattr(obj, "__array_interface__", None)
    if ai is not None:
        arr = np.asarray(obj)  # a view of the same memory, never a copy
        if arr.__array_interface__["data"][0] != ai["data"][0]:
            raise TypeError(f"{op}: {name} could not be viewed without a copy")
        row = np.zeros(8, dtype=np.int64)
        row[:7] = _cpu.describe([arr])[0]
        return row, arr
    raise TypeError(f"{op}: {name} is not an array (got {type(obj).__name__}); expected a "
                    "NumPy or CuPy array, or an object with __array_interface__, "
                    "__cuda_array_interface__ or __dlpack__")


def _cuda_device_of(ptr, obj):
    dev = getattr(obj, "device", None)
    ident = getattr(dev, "id", None)
    if ident is None:
        ident = getattr(dev, "index", None)
    return int(ident) if ident is not None else 0


def contiguous_copy(op, name, obj, device):
    """A C-contiguous copy of a gradient (gradients are only read)."""
    if device == 0:
        return np.ascontiguousarray(obj)
    import cupy  # only reached for CUDA arrays

    return cupy.ascontiguousarray(obj)
