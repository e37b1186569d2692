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

import sys

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

# NumPy type number -> the kernels' dtype code (fo::DType): float32 0, float64 1,
# float16 2, bfloat16 3 (ml_dtypes' NumPy type, or the marker for producers that
# say bfloat16 through DLPack or torch).
F32, F64, F16 = (np.dtype(t).num for t in (np.float32, np.float64, np.float16))
SUPPORTED = "float32, float64, float16, bfloat16"


def kernel_dtypes():
    codes = {F32: 0, F64: 1, F16: 2, _foreign.BFLOAT16: 3}
    ml = sys.modules.get("ml_dtypes")  # a NumPy bfloat16 array exists only once it is imported
    if ml is not None:
        codes[np.dtype(ml.bfloat16).num] = 3
    return codes


def _bf16_num():
    """NumPy's type number of ml_dtypes.bfloat16, or -1 while ml_dtypes is not imported."""
    ml = sys.modules.get("ml_dtypes")
    return np.dtype(ml.bfloat16).num if ml is not None else -1


class Prepared:
    """A validated call: one pointer table per storage layout present, ready for a backend."""

    __slots__ = ("device", "groups", "layouts", "keep")

    def __init__(self, device, groups, layouts, keep):
        self.device = device  # CPU or 1 + CUDA ordinal
        self.groups = groups  # list of (param dtype code, ptrs uint64, sizes int64)
        self.layouts = layouts  # aligned with groups: dict(state_dtype=code, extra=code)
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


def _dtype_of(seqs, R, k, i):
    """The dtype of seqs[k][i] for a message: the object's own, else the row's."""
    dtype = getattr(seqs[k][i], "dtype", None)
    return dtype if dtype is not None else _dtype_name(int(R[k][i, TYPENUM]))


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


def _check_overlap(op, names, R, writable_mask):
    """No two written arrays may share memory, nor a gradient with a written array.
    R holds the rows of every list, R[k, i] for element i of list k."""
    L, n = R.shape[:2]
    rows = R.reshape(L * n, NCOLS)
    start = rows[:, PTR].astype(np.uint64)
    end = start + (rows[:, SIZE] * rows[:, ITEMSIZE]).astype(np.uint64)
    live = rows[:, SIZE] > 0
    written = np.repeat(writable_mask, n)
    w = np.flatnonzero(live & written)
    order = w[np.argsort(start[w])]
    ws, we = start[order], end[order]

    def fail(a, b):
        raise ValueError(f"{op}: {names[a // n]}[{a % n}] and {names[b // n]}[{b % n}] "
                         "share memory; arrays a step writes must not overlap each other or "
                         "the gradients")

    if (ws[1:] < we[:-1]).any():
        hit = int(np.flatnonzero(ws[1:] < we[:-1])[0])
        fail(order[hit], order[hit + 1])
    g = np.flatnonzero(live & ~written)
    if g.size and order.size:
        # the written array with the largest start below each gradient's end; written
        # arrays are disjoint and sorted, so it is the only one that can overlap
        k = np.searchsorted(ws, end[g], side="left") - 1
        bad = (k >= 0) & (we[np.maximum(k, 0)] > start[g])
        if bad.any():
            hit = int(np.flatnonzero(bad)[0])
            fail(order[k[hit]], g[hit])


def memory_extent(obj):
    """[low, high) of the bytes an array spans (strides included), from what it says about
    itself without exporting anything; None when it is empty or says nothing (DLPack
    producers). Host and device addresses share one space (CUDA's unified addressing)."""
    if isinstance(obj, np.ndarray):
        return _byte_bounds(obj) if obj.size else None
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(obj, torch.Tensor):
        if not obj.numel() or obj.layout is not torch.strided:
            return None
        item = obj.element_size()
        low = obj.data_ptr()
        return low, low + item + sum((n - 1) * st * item for n, st in zip(obj.shape,
                                                                            obj.stride()))
    iface = getattr(obj, "__cuda_array_interface__", None) or \
        getattr(obj, "__array_interface__", None)
    if not isinstance(iface, dict) or "data" not in iface:
        return None
    shape = tuple(iface.get("shape", ()))
    if any(n == 0 for n in shape):
        return None
    item = np.dtype(iface.get("typestr", "|u1")).itemsize
    low = int(iface["data"][0])
    strides = iface.get("strides")
    if strides is None:
        return low, low + item * int(np.prod(shape, dtype=np.int64))
    reach = sum((n - 1) * st for n, st in zip(shape, strides))
    return low + min(0, reach), low + max(0, reach) + item


def _byte_bounds(a):
    try:
        from numpy.lib.array_utils import byte_bounds
    except ImportError:  # NumPy < 2
        byte_bounds = np.byte_bounds
    return byte_bounds(a)


def first_overlap(new, old):
    """(i, j) for the first array new[i] whose memory overlaps that of an array old[j],
    or None. One sort of the old extents; a Python pass over the new arrays."""
    olds = [(e, j) for j, e in enumerate(map(memory_extent, old)) if e is not None]
    if not olds:
        return None
    olds.sort()
    lows = np.array([e[0] for e, _ in olds], dtype=np.uint64)
    reach = np.maximum.accumulate(np.array([e[1] for e, _ in olds], dtype=np.uint64))
    for i, obj in enumerate(new):
        ext = memory_extent(obj)
        if ext is None:
            continue
        k = int(np.searchsorted(lows, np.uint64(ext[1]), side="left")) - 1
        if k >= 0 and int(reach[k]) > ext[0]:
            for (low, high), j in olds[:k + 1]:
                if high > ext[0]:
                    return i, j
    return None


def _check_list(op, name, seq, n):
    if seq is None:
        raise ValueError(f"{op}: {name} is required with these options")
    if not isinstance(seq, (list, tuple)):
        raise TypeError(f"{op}: {name} must be a list or tuple of arrays, got {type(seq).__name__}")
    if len(seq) != n:
        raise ValueError(f"{op}: got {len(seq)} {name} for {n} params")


def _diagnose(op, names, seqs, R, codes, extra_kind, read_only):
    """Find and raise the first problem of a call whose combined check failed. The
    order is the documented one: dtypes, shapes, devices, then writeability."""
    params, prow = seqs[0], R[0]
    nstates = len(seqs) - 2 - (extra_kind != 0)
    bad = np.flatnonzero((codes < 0) | ((prow[:, FLAGS] & F_NATIVE) == 0))
    if bad.size:
        i = int(bad[0])
        raise TypeError(f"{op}: params[{i}] has dtype {_dtype_of(seqs, R, 0, i)}; supported: {SUPPORTED} "
                        "in native byte order (no silent cast)")
    for k in range(1, len(seqs)):
        expect, rule = prow[:, TYPENUM], "params[{i}] has {p}"
        if 2 <= k < 2 + nstates:
            # states: the param's dtype, or float32/bfloat16 (one for all) for 16-bit params
            sixteen = codes >= 2
            expect = np.where(sixteen, R[2][:, TYPENUM], prow[:, TYPENUM])
            bf16 = [t for t, c in kernel_dtypes().items() if c == 3]
            ok16 = np.isin(R[2][:, TYPENUM], [F32, *bf16])
            if k == 2 and not ok16[sixteen].all():
                i = int(np.flatnonzero(sixteen & ~ok16)[0])
                raise TypeError(f"{op}: {names[2]}[{i}] has dtype "
                                f"{_dtype_of(seqs, R, 2, i)}; the state of a 16-bit "
                                "param is float32 or bfloat16")
            rule = "params[{i}] has {p}" if k == 2 else f"{names[2]}[{{i}}] has {{s}}"
        elif k == len(seqs) - 1 and extra_kind == 1:
            expect, rule = np.full_like(expect, F32), "master weights are float32"
        bad = np.flatnonzero((R[k][:, TYPENUM] != expect) | ((R[k][:, FLAGS] & F_NATIVE) == 0))
        if bad.size:
            i = int(bad[0])
            raise TypeError(f"{op}: {names[k]}[{i}] has dtype {_dtype_of(seqs, R, k, i)}, "
                            + rule.format(i=i, p=_dtype_of(seqs, R, 0, i),
                                          s=_dtype_of(seqs, R, 2, i) if nstates else "?"))
    if extra_kind:
        bad = np.flatnonzero(codes < 2)
        if bad.size:
            raise TypeError(f"{op}: {names[-1]} are for float16 and bfloat16 params; "
                            f"params[{int(bad[0])}] has {_dtype_of(seqs, R, 0, int(bad[0]))}")
    for k in range(1, len(seqs)):
        bad = np.flatnonzero((R[k][:, SHAPE] != prow[:, SHAPE]) | (R[k][:, SIZE] != prow[:, SIZE]))
        if bad.size:
            i = int(bad[0])
            raise ValueError(f"{op}: {names[k]}[{i}] has shape {_shape_of(seqs[k][i])}, "
                             f"params[{i}] has {_shape_of(params[i])}")
    device = int(prow[0, DEVICE])
    for k in range(len(seqs)):
        bad = np.flatnonzero(R[k][:, DEVICE] != device)
        if bad.size:
            i = int(bad[0])
            raise TypeError(f"{op}: {names[k]}[{i}] is on {_device_name(int(R[k][i, DEVICE]))}, "
                            f"params[0] is on {_device_name(device)}; all arrays of a step "
                            "must be on one device")
    if not read_only:
        for k in [0] + list(range(2, len(seqs))):
            _check_writable(op, names[k], seqs[k], R[k])
    raise AssertionError(f"{op}: inconsistent validation")  # the combined check had a reason


def describe_list(op, name, seq, stream=None, params=None):
    """The description rows of one list of arrays, for a caller that keeps them between
    steps (`prepare(..., rows=...)`); `keep` objects are returned with them."""
    keep = []
    rows = np.zeros((len(seq), NCOLS), dtype=np.int64)
    if len(seq):
        rows[:, :DEVICE] = _cpu.describe(seq)
        other = np.flatnonzero(rows[:, FLAGS] == 0)
        if other.size:
            consumer = _foreign.Consumer(params if params is not None else seq, stream)
            _foreign.describe_into(op, name, seq, other, rows, keep, consumer)
    return rows, keep


def prepare(op, params, grads, states, state_names, stream=None, *, read_only=False,
            extra=None, rows=None):
    """Validate `params`, `grads`, the state lists and the optional extra list together
    and build one pointer table per storage layout.

    `states` is a list of lists aligned with `params`; `state_names` names them for
    messages. `extra` is None or (list, name, kind): float32 master weights (kind 1) or
    Kahan compensation buffers of the param's dtype (kind 2), for 16-bit params. With
    `read_only`, nothing is written (a reduction): writeability and overlap are not
    required. Gradients that are not C-contiguous are copied once (they are only read);
    everything else is used in place or refused. `stream` is the CUDA stream the
    kernels will run on (None: the current stream of params[0]'s producer); GPU
    producers order their pending work before it. `rows`, aligned with the lists
    (params, grads, states, extra), may hold the description rows of lists that the
    caller knows unchanged since it described them (`describe_list`); only the other
    lists are described, and every check still runs on all rows.
    """
    keep = []
    if not isinstance(params, (list, tuple)):
        raise TypeError(f"{op}: params must be a list or tuple of arrays, got "
                        f"{type(params).__name__}")
    n = len(params)
    if not isinstance(grads, (list, tuple)):
        raise TypeError(f"{op}: grads must be a list or tuple of arrays, got {type(grads).__name__}")
    if len(grads) != n:
        raise ValueError(f"{op}: got {len(grads)} grads for {n} params")
    for name, seq in zip(state_names, states):
        _check_list(op, name, seq, n)
    seqs, names = [params, grads, *states], ["params", "grads", *state_names]
    extra_kind = 0
    if extra is not None:
        _check_list(op, extra[1], extra[0], n)
        seqs.append(extra[0])
        names.append(extra[1])
        extra_kind = extra[2]
    if n == 0:
        return Prepared(CPU, [], [], keep)
    if rows is None:
        # NumPy arrays that pass every check: described, checked and laid out in C++
        fast = _cpu.prepare_numpy(seqs, len(states), extra_kind, read_only, _bf16_num())
        if fast is not None:
            return Prepared(CPU, [(code, ptrs, sizes) for code, _, ptrs, sizes in fast],
                            [{"state_dtype": s, "extra": extra_kind} for _, s, _, _ in fast],
                            keep)

    # every array of the call described at once: R[k] holds the rows of list k
    L = len(seqs)
    R = np.zeros((L, n, NCOLS), dtype=np.int64)
    fresh = [k for k in range(L) if rows is None or rows[k] is None]
    if len(fresh) == L:
        R.reshape(L * n, NCOLS)[:, :DEVICE] = _cpu.describe([x for seq in seqs for x in seq])
    else:
        for k in range(L):
            if k in fresh:
                R[k][:, :DEVICE] = _cpu.describe(seqs[k])
            else:
                R[k] = rows[k]
    flat = R.reshape(L * n, NCOLS)
    if not flat[:, FLAGS].all():
        consumer = _foreign.Consumer(params, stream)
        for k in np.flatnonzero((R[:, :, FLAGS] == 0).any(axis=1)):
            other = np.flatnonzero(R[k][:, FLAGS] == 0)
            _foreign.describe_into(op, names[k], seqs[k], other, R[k], keep, consumer)
    else:
        consumer = None

    # one combined check; the slow, precise search for the culprit runs only on failure
    typ, flags, prow = R[:, :, TYPENUM], R[:, :, FLAGS], R[0]
    known = kernel_dtypes()
    codes = np.full(n, -1)
    for typenum, code in known.items():
        codes[typ[0] == typenum] = code
    nstates = len(states)
    ok = (codes >= 0).all() and (flags & F_NATIVE).all() and (typ[1] == typ[0]).all()
    if ok and nstates:
        stype = typ[2]
        plain = codes < 2
        ok = (typ[2:2 + nstates] == stype).all() and (stype[plain] == typ[0][plain]).all()
        if ok and not plain.all():
            bf16 = [t for t, c in known.items() if c == 3]
            ok = np.isin(stype[~plain], [F32, *bf16]).all()
    if ok and extra_kind:
        ok = (codes >= 2).all() and (typ[-1] == (F32 if extra_kind == 1 else typ[0])).all()
    ok = ok and (R[1:, :, SHAPE] == R[0, :, SHAPE]).all() and \
        (R[1:, :, SIZE] == R[0, :, SIZE]).all() and (R[:, :, DEVICE] == R[0, 0, DEVICE]).all()
    if ok and not read_only:
        written = np.delete(flags, 1, axis=0)
        ok = ((written & (F_CONTIG | F_WRITEABLE)) == (F_CONTIG | F_WRITEABLE)).all()
    if not ok:
        _diagnose(op, names, seqs, R, codes, extra_kind, read_only)
    device = int(prow[0, DEVICE])

    # arrays only read (the gradients; every list of a reduction) that are not
    # contiguous are read through a contiguous copy
    for k in range(L) if read_only else [1]:
        for i in np.flatnonzero((flags[k] & F_CONTIG) == 0):
            i = int(i)
            copy = _foreign.contiguous_copy(op, f"{names[k]}[{i}]", seqs[k][i], device,
                                            consumer)
            keep.append(copy)
            R[k][i, :DEVICE] = _cpu.describe([copy])[0] if device == CPU else \
                _foreign.describe(op, f"{names[k]}[{i}]", copy, consumer)[0][:DEVICE]
    if not read_only:
        writable = np.ones(L, dtype=bool)
        writable[1] = False
        _check_overlap(op, names, R, writable)

    # one pointer table per (param dtype, state dtype)
    table = R[:, :, PTR].astype(np.uint64)
    scodes = np.where(codes < 2, codes, 0)  # no states: float32 for 16-bit params
    if nstates:
        for typenum, code in known.items():
            scodes[typ[2] == typenum] = code
    key = codes * 4 + scodes
    groups, layouts = [], []
    for k in np.unique(key):
        sel = key == k
        if sel.all():
            ptrs, sizes = table, prow[:, SIZE]
        else:
            ptrs, sizes = table[:, sel], prow[sel, SIZE]
        groups.append((int(k // 4), np.ascontiguousarray(ptrs).ravel(),
                       np.ascontiguousarray(sizes)))
        layouts.append({"state_dtype": int(k % 4), "extra": extra_kind})
    return Prepared(device, groups, layouts, keep)
