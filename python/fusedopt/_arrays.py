"""Take arrays in, check every one of them, and lay out the kernels' pointer tables.

Each accepted array becomes one row of integers (address, element count,
itemsize, NumPy type number, flags, shape hash, ndim, device). NumPy arrays are
described in C++ (`_cpu.describe`) at about a tenth of a microsecond each;
anything else (arrays with `__array_interface__` or `__cuda_array_interface__`,
DLPack producers) goes through `describe_foreign`. All checks then run as
vectorized NumPy over those rows, before any kernel writes anything: an error
leaves every array as it was.
"""

from __future__ import annotations

import numpy as np

from . import _cpu, _foreign

# Columns of a description row.
PTR, SIZE, ITEMSIZE, TYPENUM, FLAGS, SHAPE, NDIM, DEVICE = range(8)
NCOLS = 8

F_NDARRAY = _cpu.FLAG_NDARRAY
F_CONTIG = _cpu.FLAG_C_CONTIGUOUS
F_WRITEABLE = _cpu.FLAG_WRITEABLE
F_NATIVE = _cpu.FLAG_NATIVE

CPU = 0  # device column: 0 for host memory, 1 + ordinal for CUDA device `ordinal`

# NumPy type number -> the kernels' dtype code (fo::DType).
KERNEL_DTYPES = {np.dtype(np.float32).num: 0, np.dtype(np.float64).num: 1}
SUPPORTED = "float32, float64"


class Prepared:
    """A validated call: one pointer table per dtype present, ready for a backend."""

    __slots__ = ("device", "groups", "keep")

    def __init__(self, device, groups, keep):
        self.device = device  # CPU or 1 + CUDA ordinal
        self.groups = groups  # list of (kernel dtype code, ptrs uint64, sizes int64)
        self.keep = keep  # objects that must outlive the kernel (copies, DLPack holders)


def _describe_list(op, name, seq, keep, consumer=None):
    """Rows for one list, NumPy arrays in C++, the rest through `_foreign`."""
    if not isinstance(seq, (list, tuple)):
        raise TypeError(f"{op}: {name} must be a list or tuple of arrays, got {type(seq).__name__}")
    rows = np.zeros((len(seq), NCOLS), dtype=np.int64)
    if len(seq):
        rows[:, :DEVICE] = _cpu.describe(seq)
        other = np.flatnonzero(rows[:, FLAGS] == 0)
        if other.size:
            _foreign.describe_into(op, name, seq, other, rows, keep, consumer)
    return rows


def _shape_of(obj):
    shape = getattr(obj, "shape", None)
    return tuple(shape) if shape is not None else "?"


def _dtype_name(typenum):
    if typenum < 0:
        return _foreign.dtype_name(typenum)
    for t in np.sctypeDict.values():
        try:
            if np.dtype(t).num == typenum:
                return np.dtype(t).name
        except TypeError:
            continue
    return f"type number {typenum}"


def _device_name(code):
    return "cpu" if code == CPU else f"cuda:{code - 1}"


def _check_writable(op, name, seq, rows):
    bad = np.flatnonzero((rows[:, FLAGS] & F_CONTIG) == 0)
    if bad.size:
        i = int(bad[0])
        raise ValueError(f"{op}: {name}[{i}] is not C-contiguous; it is updated in place, "
                         "so an update of a copy would be lost")
    bad = np.flatnonzero((rows[:, FLAGS] & F_WRITEABLE) == 0)
    if bad.size:
        i = int(bad[0])
        raise ValueError(_foreign.readonly_message(op, f"{name}[{i}]", seq[i]))


def _check_overlap(op, names, all_rows, writable_mask):
    """No two written arrays may share memory, nor a gradient with a written array."""
    rows = np.concatenate(all_rows)
    owner = np.concatenate([np.full(len(r), k) for k, r in enumerate(all_rows)])
    index = np.concatenate([np.arange(len(r)) for r in all_rows])
    start = rows[:, PTR].astype(np.uint64)
    end = start + (rows[:, SIZE] * rows[:, ITEMSIZE]).astype(np.uint64)
    live = rows[:, SIZE] > 0
    w = np.flatnonzero(live & writable_mask[owner])
    order = w[np.argsort(start[w])]
    ws, we = start[order], end[order]

    def fail(a, b):
        raise ValueError(f"{op}: {names[owner[a]]}[{index[a]}] and {names[owner[b]]}[{index[b]}] "
                         "share memory; arrays a step writes must not overlap each other or "
                         "the gradients")

    hit = np.flatnonzero(ws[1:] < we[:-1])
    if hit.size:
        fail(order[hit[0]], order[hit[0] + 1])
    g = np.flatnonzero(live & ~writable_mask[owner])
    if g.size and order.size:
        # the written array with the largest start below each gradient's end; written
        # arrays are disjoint and sorted, so it is the only one that can overlap
        k = np.searchsorted(ws, end[g], side="left") - 1
        ok = k >= 0
        hit = np.flatnonzero(ok & (we[np.maximum(k, 0)] > start[g]))
        if hit.size:
            fail(order[k[hit[0]]], g[hit[0]])


def prepare(op, params, grads, states, state_names, stream=None, *, read_only=False):
    """Validate `params`, `grads` and the state lists together and build pointer tables.

    `states` is a list of lists aligned with `params`; `state_names` names them for
    messages. With `read_only`, nothing is written (a reduction): writeability and
    overlap are not required. Gradients that are not C-contiguous are copied once (they are only
    read); everything else is used in place or refused. `stream` is the CUDA stream
    the kernels will run on (None: the current stream of params[0]'s producer);
    GPU producers order their pending work before it.
    """
    keep = []
    consumer = _foreign.Consumer(params, stream)
    prow = _describe_list(op, "params", params, keep, consumer)
    n = len(params)
    if not isinstance(grads, (list, tuple)):
        raise TypeError(f"{op}: grads must be a list or tuple of arrays, got {type(grads).__name__}")
    if len(grads) != n:
        raise ValueError(f"{op}: got {len(grads)} grads for {n} params")
    for name, seq in zip(state_names, states):
        if seq is None:
            raise ValueError(f"{op}: {name} is required with these options")
        if not isinstance(seq, (list, tuple)):
            raise TypeError(f"{op}: {name} must be a list or tuple of arrays, got {type(seq).__name__}")
        if len(seq) != n:
            raise ValueError(f"{op}: got {len(seq)} {name} for {n} params")
    grow = _describe_list(op, "grads", grads, keep, consumer)
    srows = [_describe_list(op, name, seq, keep, consumer) for name, seq in zip(state_names, states)]

    names = ["params", "grads", *state_names]
    seqs = [params, grads, *states]
    all_rows = [prow, grow, *srows]
    if n == 0:
        return Prepared(CPU, [], keep)

    # dtype: supported, native byte order, and the same as the param's
    bad = np.flatnonzero(~np.isin(prow[:, TYPENUM], list(KERNEL_DTYPES)) |
                         ((prow[:, FLAGS] & F_NATIVE) == 0))
    if bad.size:
        i = int(bad[0])
        what = getattr(params[i], "dtype", _dtype_name(prow[i, TYPENUM]))
        raise TypeError(f"{op}: params[{i}] has dtype {what}; supported: {SUPPORTED} "
                        "in native byte order (no silent cast)")
    for name, seq, rows in zip(names[1:], seqs[1:], all_rows[1:]):
        bad = np.flatnonzero((rows[:, TYPENUM] != prow[:, TYPENUM]) |
                             ((rows[:, FLAGS] & F_NATIVE) == 0))
        if bad.size:
            i = int(bad[0])
            raise TypeError(f"{op}: {name}[{i}] has dtype {getattr(seq[i], 'dtype', '?')}, "
                            f"params[{i}] has {getattr(params[i], 'dtype', '?')}")
    # shape
    for name, seq, rows in zip(names[1:], seqs[1:], all_rows[1:]):
        bad = np.flatnonzero((rows[:, SHAPE] != prow[:, SHAPE]) | (rows[:, SIZE] != prow[:, SIZE]))
        if bad.size:
            i = int(bad[0])
            raise ValueError(f"{op}: {name}[{i}] has shape {_shape_of(seq[i])}, "
                             f"params[{i}] has {_shape_of(params[i])}")
    # device
    device = int(prow[0, DEVICE])
    for name, rows in zip(names, all_rows):
        bad = np.flatnonzero(rows[:, DEVICE] != device)
        if bad.size:
            i = int(bad[0])
            raise TypeError(f"{op}: {name}[{i}] is on {_device_name(int(rows[i, DEVICE]))}, "
                            f"params[0] is on {_device_name(device)}; all arrays of a step "
                            "must be on one device")
    # written arrays: contiguous and writeable
    if read_only:
        prow[:, FLAGS] |= F_WRITEABLE
    _check_writable(op, "params", params, prow)
    for name, seq, rows in zip(state_names, states, srows):
        _check_writable(op, name, seq, rows)
    # gradients that are not contiguous are read through a contiguous copy
    for i in np.flatnonzero((grow[:, FLAGS] & F_CONTIG) == 0):
        i = int(i)
        copy = _foreign.contiguous_copy(op, f"grads[{i}]", grads[i], device)
        keep.append(copy)
        grow[i, :DEVICE] = _cpu.describe([copy])[0] if device == CPU else \
            _foreign.describe(op, f"grads[{i}]", copy, consumer)[0][:DEVICE]
    if not read_only:
        writable = np.array([True, False] + [True] * len(srows))
        _check_overlap(op, names, all_rows, writable)

    # one pointer table per dtype
    table = np.stack([r[:, PTR] for r in all_rows]).astype(np.uint64)
    groups = []
    for typenum, code in KERNEL_DTYPES.items():
        sel = prow[:, TYPENUM] == typenum
        if not sel.any():
            continue
        if sel.all():
            ptrs, sizes = table, prow[:, SIZE]
        else:
            ptrs, sizes = table[:, sel], prow[sel, SIZE]
        groups.append((code, np.ascontiguousarray(ptrs).ravel(), np.ascontiguousarray(sizes)))
    return Prepared(device, groups, keep)
