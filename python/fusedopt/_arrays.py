"""Take arrays in, check every one of them, and lay out the kernels' pointer tables.

Each accepted array becomes one row of integers (address, element count,
itemsize, NumPy type number, flags, shape hash, ndim, device). NumPy arrays are
described in C++ (`_cpu.describe_lists`) at about a tenth of a microsecond each;
anything else (PyTorch tensors, arrays with `__array_interface__` or
`__cuda_array_interface__`, DLPack producers) goes through `_foreign`. Every check
then runs in C++ over those rows (`_cpu.Tables`, csrc/tables.h), before any kernel
writes anything: an error leaves every array as it was, and `_error` turns the
failed check into its message.
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
EMA_BIT = 4  # bit of a layout's extra code: the EMA slot (csrc/core/layouts.h, kEmaBit)

# NumPy type number -> the kernels' dtype code (fo::DType): float32 0, float64 1,
# float16 2, bfloat16 3 (ml_dtypes' NumPy type, or the marker for producers that
# say bfloat16 through DLPack or torch).
F32, F64, F16 = (np.dtype(t).num for t in (np.float32, np.float64, np.float16))
SUPPORTED = "float32, float64, float16, bfloat16"
QUANT_BLOCK = _cpu.QUANT_BLOCK  # elements per block scale of 8-bit state


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
    """A validated call: one pointer table per storage layout present, ready for a backend.

    The tables are a `_cpu.Tables`: a caller that keeps a Prepared between steps (the
    optimizer classes) exchanges only the gradients (`with_grads`), which checks the new
    gradients against the kept params and states."""

    __slots__ = ("device", "groups", "layouts", "keep", "tables", "op", "names", "stream",
                 "params", "rows", "grad_keep")

    def __init__(self, device, groups, layouts, keep, tables=None, op="", names=(),
                 stream=None, params=None, rows=None):
        self.device = device  # CPU or 1 + CUDA ordinal
        self.groups = groups  # list of (param dtype code, ptrs uint64, sizes int64)
        self.layouts = layouts  # aligned with groups: dict(state_dtype=code, extra=code)
        self.keep = keep  # objects that must outlive the kernel (copies, DLPack holders)
        self.tables, self.op, self.names = tables, op, names
        self.stream, self.params, self.rows = stream, params, rows
        self.grad_keep = []  # what the current gradients need kept alive

    def with_grads(self, grads, trusted=False):
        """The same call with other gradients (a list aligned with the params): checked
        against the kept rows, then swapped into the tables in place. `trusted`: the
        gradients are torch tensors whose dtype, shape and device torch checked against
        their params when they were assigned (`Tensor.grad`'s setter), and the caller
        checked that the params are the ones described; only their addresses and
        contiguity are read. Returns self; raises, changing nothing, on a bad one."""
        n = 0 if self.params is None else len(self.params)
        if len(grads) != n:
            raise ValueError(f"{self.op}: got {len(grads)} grads for {n} params")
        if n == 0:
            return self
        if trusted:
            T = sys.modules["torch"].Tensor
            if all(map(T.is_contiguous, grads)):
                issue = self.tables.set_grad_ptrs(_foreign.tensor_addresses(grads))
                if issue is not None:
                    raise _error(self.op, self.names, [self.params, grads], self.rows, issue)
                self.grad_keep = []
                return self
        keep = []
        rows, strided = _describe_lists(self.op, [grads], self.names[1:2], n, keep,
                                        self.stream, self.params)
        if strided:
            _copy_strided(self.op, [grads], self.names[1:2], rows, self.device, keep,
                          self.stream, self.params)
        issue = self.tables.set_grads(rows[0])
        if issue is not None:
            raise _error(self.op, self.names, [self.params, grads], self.rows, issue,
                         {1: rows[0]})
        self.grad_keep = keep
        return self


def _describe_lists(op, seqs, names, n, keep, stream=None, params=None):
    """((L, n, NCOLS) rows of the lists, whether some array is not C-contiguous): NumPy
    arrays in C++, the rest through `_foreign` (one path for every array kind)."""
    R, foreign, strided = _cpu.describe_lists(seqs, n)
    if foreign:
        consumer = _foreign.Consumer(params if params is not None else seqs[0], stream)
        for k in np.flatnonzero((R[:, :, FLAGS] == 0).any(axis=1)):
            k = int(k)
            other = np.flatnonzero(R[k][:, FLAGS] == 0)
            _foreign.describe_into(op, names[k], seqs[k], other, R[k], keep, consumer)
        strided = not (R[:, :, FLAGS] & F_CONTIG).all()
    return R, bool(strided)


def describe_list(op, name, seq, stream=None, params=None):
    """(rows, keep): the (n, NCOLS) description rows of one list of arrays of any kind,
    and the objects that must outlive their use (DLPack holders)."""
    if not isinstance(seq, (list, tuple)):
        raise TypeError(f"{op}: {name} must be a list or tuple of arrays, got "
                        f"{type(seq).__name__}")
    keep = []
    rows, _ = _describe_lists(op, [seq], [name], len(seq), keep, stream, params)
    return rows[0], keep


def describe_params(params, stream=None):
    """The rows of a list of params for a kept plan's check (`_engine.Kept`), or None
    when one cannot be described."""
    try:
        return _describe_lists("step", [params], ["params"], len(params), [], stream,
                               params)[0][0]
    except (TypeError, ValueError):
        return None


def _copy_strided(op, seqs, names, R, device, keep, stream, params):
    """Arrays that are only read (gradients; every list of a reduction) and not
    C-contiguous are read through a contiguous copy, described in their place. On a GPU
    the copy is made on the kernels' stream (`contiguous_copy`)."""
    consumer = _foreign.Consumer(params, stream)
    for k in range(len(seqs)):
        bad = np.flatnonzero((R[k][:, FLAGS] & F_CONTIG) == 0)
        for i in bad:
            i = int(i)
            copy = _foreign.contiguous_copy(op, f"{names[k]}[{i}]", seqs[k][i], device,
                                            consumer)
            keep.append(copy)
            R[k][i] = _describe_lists(op, [[copy]], names[k:k + 1], 1, keep, stream,
                                      params)[0][0, 0] if device == CPU else \
                _foreign.describe(op, f"{names[k]}[{i}]", copy, consumer)[0]


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


def prepare(op, params, grads, states, state_names, stream=None, *, read_only=False,
            extra=None, ema=None, scales=None):
    """Validate `params`, `grads`, the state lists and the optional extra list together
    and build one pointer table per storage layout.

    `states` is a list of lists aligned with `params`; `state_names` names them for
    messages. `extra` is None or (list, name, kind): float32 master weights (kind 1) or
    Kahan compensation buffers of the param's dtype (kind 2), for 16-bit params. With
    `read_only`, nothing is written (a reduction): writeability and overlap are not
    required. Arrays only read that are not C-contiguous are copied once; everything
    else is used in place or refused. `stream` is the CUDA stream the kernels will run
    on (None: the current stream of params[0]'s producer); GPU producers order their
    pending work before it. `ema` is None or (list, name): the EMA slot, written, of the
    params' dtypes and shapes, after the extra list; the layouts' extra code then has
    `EMA_BIT` set. `scales`, for 8-bit states, holds one list of float32
    block-scale arrays per state list (ceil(size / QUANT_BLOCK) elements each; the states
    are then uint8 codes): they are checked with the rest, and their pointers follow
    the other slots of the tables. 8-bit states take no EMA slot.
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
    if ema is not None and scales is not None:
        raise ValueError(f"{op}: no EMA of the params with 8-bit state (absmax)")
    if ema is not None:
        _check_list(op, ema[1], ema[0], n)
        seqs.append(ema[0])
        names.append(ema[1])
    nscales = 0
    if scales is not None:
        if not isinstance(scales, (list, tuple)) or len(scales) != len(states):
            raise ValueError(f"{op}: absmax must hold one list of scale arrays per state list "
                             f"({len(states)}), got "
                             f"{len(scales) if isinstance(scales, (list, tuple)) else scales!r}")
        for name, seq in zip(state_names, scales):
            _check_list(op, f"absmax of {name}", seq, n)
            seqs.append(seq)
            names.append(f"absmax of {name}")
        nscales = len(scales)
    if n == 0:
        return Prepared(CPU, [], [], keep, op=op, names=names, stream=stream, params=params)
    R, strided = _describe_lists(op, seqs, names, n, keep, stream, params)
    device = int(R[0, 0, DEVICE])
    read = range(len(seqs)) if read_only else [1]
    if strided and not (R[list(read), :, FLAGS] & F_CONTIG).all():
        sub = [seqs[k] for k in read]
        rows = R[list(read)]
        _copy_strided(op, sub, [names[k] for k in read], rows, device, keep, stream, params)
        R[list(read)] = rows
    kind = extra_kind | (EMA_BIT if ema is not None else 0)
    tables = _cpu.Tables(R, len(states), kind, read_only, _bf16_num(), False, nscales)
    issue = tables.issue
    if issue is not None:
        raise _error(op, names, seqs, R, issue, extra_kind=kind, nscales=nscales)
    groups, layouts = [], []
    for code, scode, ptrs, sizes in tables.groups():
        groups.append((code, ptrs, sizes))
        layouts.append({"state_dtype": scode, "extra": kind})
    return Prepared(device, groups, layouts, keep, tables, op, names, stream, params, R)


# --- the messages ---------------------------------------------------------------------------


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


# What a failed check found (csrc/tables.h's What).
(_PARAM_DTYPE, _STATE16_DTYPE, _DTYPE_MISMATCH, _EXTRA_NOT_16, _SHAPE, _DEVICE,
 _NOT_CONTIGUOUS, _READ_ONLY, _OVERLAP, _INT8_PARAM, _CODE_DTYPE, _SCALE_DTYPE,
 _SCALE_SIZE) = range(1, 14)


def _error(op, names, seqs, R, issue, rows=None, extra_kind=0, nscales=0):
    """The exception for an issue of `_cpu.Tables`: the one place where a bad row
    becomes a message. `R` holds the rows of every list (or `rows` those of some);
    `extra_kind` is the layouts' extra code (with `EMA_BIT`: the list after the extra
    list is the EMA); `nscales`: the last lists are 8-bit states' block scales."""
    what, k, i, k2, j = issue
    ema_list = len(names) - 1 - nscales if extra_kind & EMA_BIT else -1
    extra_list = len(names) - 1 - nscales - (ema_list >= 0) if extra_kind & 3 else -1

    def row(list_, index):
        return (rows[list_] if rows is not None and list_ in rows else R[list_])[index]

    def obj(list_, index):
        return seqs[list_][index] if list_ < len(seqs) else None

    def dtype(list_, index):
        found = getattr(obj(list_, index), "dtype", None)
        return found if found is not None else _dtype_name(int(row(list_, index)[TYPENUM]))

    if what == _PARAM_DTYPE:
        return TypeError(f"{op}: params[{i}] has dtype {dtype(0, i)}; supported: {SUPPORTED} "
                         "in native byte order (no silent cast)")
    if what == _STATE16_DTYPE:
        return TypeError(f"{op}: {names[k]}[{i}] has dtype {dtype(k, i)}; the state of a "
                         "16-bit param is float32 or bfloat16")
    if what == _DTYPE_MISMATCH:
        if k == extra_list and extra_kind & 3 == 1:
            rule = "master weights are float32"
        elif 2 < k and k not in (extra_list, ema_list):  # a later state: as the first
            rule = f"{names[2]}[{i}] has {dtype(2, i)}"
        else:
            rule = f"params[{i}] has {dtype(0, i)}"
        return TypeError(f"{op}: {names[k]}[{i}] has dtype {dtype(k, i)}, " + rule)
    if what == _EXTRA_NOT_16:
        return TypeError(f"{op}: {names[k]} are for float16 and bfloat16 params; "
                         f"params[{i}] has {dtype(0, i)}")
    if what == _SHAPE:
        return ValueError(f"{op}: {names[k]}[{i}] has shape {_shape_of(obj(k, i))}, "
                          f"params[{i}] has {_shape_of(obj(0, i))}")
    if what == _DEVICE:
        return TypeError(f"{op}: {names[k]}[{i}] is on {_device_name(int(row(k, i)[DEVICE]))}, "
                         f"params[0] is on {_device_name(int(row(0, 0)[DEVICE]))}; all arrays "
                         "of a step must be on one device")
    if what == _NOT_CONTIGUOUS:
        return ValueError(f"{op}: {names[k]}[{i}] is not C-contiguous; it is updated in place, "
                          "so an update of a copy would be lost")
    if what == _READ_ONLY:
        return ValueError(_foreign.readonly_message(op, f"{names[k]}[{i}]", obj(k, i)))
    if what == _OVERLAP:
        return ValueError(f"{op}: {names[k]}[{i}] and {names[k2]}[{j}] share memory; arrays a "
                          "step writes must not overlap each other or the gradients")
    if what == _INT8_PARAM:
        return TypeError(f"{op}: params[{i}] has dtype {dtype(0, i)}; 8-bit state is for "
                         "float32, float16 and bfloat16 params")
    if what == _CODE_DTYPE:
        return TypeError(f"{op}: {names[k]}[{i}] has dtype {dtype(k, i)}; 8-bit state (absmax "
                         "given) is stored as uint8 codes")
    if what == _SCALE_DTYPE:
        return TypeError(f"{op}: {names[k]}[{i}] has dtype {dtype(k, i)}; block scales are "
                         "float32")
    if what == _SCALE_SIZE:
        size, need = int(row(k, i)[SIZE]), int(row(0, i)[SIZE])
        return ValueError(f"{op}: {names[k]}[{i}] has {size} elements; params[{i}] has {need}, "
                          f"which need {-(-need // QUANT_BLOCK)} (one scale per block of "
                          f"{QUANT_BLOCK})")
    return AssertionError(f"{op}: unknown issue {issue}")


# --- arrays like a param (the optimizer classes' state) -----------------------------------------


def like(op, name, obj):
    """An array object with `shape` and `dtype` for `obj`: `obj` itself when it is a NumPy
    or CuPy array or a PyTorch tensor, else a view of its memory through the interface it
    offers (a NumPy view of host memory, a CuPy view of device memory). A read-only
    producer that refuses the export gets the read-only ValueError; an object that is
    no array, the TypeError of `describe`."""
    if isinstance(obj, np.ndarray) or _is_known_kind(obj):
        return obj
    if _foreign._is_jax(obj):
        raise ValueError(_foreign.readonly_message(op, name, obj))
    if hasattr(obj, "__array_interface__"):
        return np.asarray(obj)
    if hasattr(obj, "__cuda_array_interface__"):
        import cupy

        return cupy.asarray(obj)
    if hasattr(obj, "__dlpack__"):
        row, holder = _foreign.describe(op, name, obj)
        if holder is not None:
            holder.release()
        try:
            if row[DEVICE] == CPU:
                return np.from_dlpack(obj)
            import cupy

            return cupy.from_dlpack(obj)
        except BufferError as e:
            raise ValueError(_foreign.readonly_message(op, name, obj) + f" ({e})") from None
    _foreign.describe(op, name, obj)  # raises the TypeError for what is not an array
    raise TypeError(f"{op}: {name} is not an array")


def _is_known_kind(obj):
    module = type(obj).__module__
    return module.startswith("cupy") or module.startswith("torch")


def zeros_like(obj, dtype=None):
    """Zeros with the shape and device of an array from `like`, of `dtype` (a NumPy dtype;
    default: the array's): a torch tensor for a torch tensor, a CuPy array on the GPU, a
    NumPy array otherwise."""
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(obj, torch.Tensor):
        tdtype = obj.dtype if dtype is None else _torch_dtype(torch, dtype)
        if obj.is_cpu and tdtype != torch.bfloat16:
            # host memory: NumPy state, as for any host array (a bfloat16 tensor keeps
            # torch's bfloat16, which needs no ml_dtypes)
            return np.zeros(tuple(obj.shape), dtype=_numpy_dtype(tdtype))
        return torch.zeros(tuple(obj.shape), dtype=tdtype, device=obj.device)
    return np.zeros_like(obj, dtype=dtype)  # CuPy arrays answer with CuPy (__array_function__)


def _torch_dtype(torch, dtype):
    if isinstance(dtype, torch.dtype):
        return dtype
    return getattr(torch, np.dtype(dtype).name)


def _numpy_dtype(tdtype):
    return np.dtype(str(tdtype).rpartition(".")[2])
