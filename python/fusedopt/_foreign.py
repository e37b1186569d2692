"""Describe arrays that are not NumPy arrays: PyTorch tensors, the array interfaces
and DLPack.

`describe` returns the same row `_cpu.describe` gives a NumPy array, plus the
device column, and an object to keep alive until the kernel has run (or None).
`describe_into` fills the rows of many objects at once; PyTorch tensors are read
from their attributes directly (no DLPack capsule per tensor and step).

Objects are tried in this order: PyTorch tensors, `__cuda_array_interface__`,
`__array_interface__`, then DLPack (`__dlpack__` / `__dlpack_device__`). JAX
arrays are described but never writeable: JAX buffers are immutable. A DTensor
(torch.distributed.tensor, e.g. an FSDP2 parameter) is described by its local
shard: a step updates each rank's shard where it lives.
"""

from __future__ import annotations

import sys
from itertools import repeat

import numpy as np

from . import _backend, _cpu, _dlpack

_F_NDARRAY = _cpu.FLAG_NDARRAY
_F_CONTIG = _cpu.FLAG_C_CONTIGUOUS
_F_WRITEABLE = _cpu.FLAG_WRITEABLE
_F_NATIVE = _cpu.FLAG_NATIVE

# Type numbers for dtypes NumPy does not have: negative, so that they never equal a
# NumPy type number and never pass as a kernel dtype.
BFLOAT16 = -2
_MARKER_NAMES = {BFLOAT16: "bfloat16"}


def dtype_name(typenum):
    """The name of a marker type number, or None for NumPy's own numbers."""
    return _MARKER_NAMES.get(int(typenum))


def _marker(name):
    for num, known in _MARKER_NAMES.items():
        if known == name:
            return num
    num = min(_MARKER_NAMES) - 1
    _MARKER_NAMES[num] = name
    return num


def readonly_message(op, name, obj):
    """The ValueError text for a read-only param or state."""
    if _is_jax(obj):
        return (f"{op}: {name} is a JAX array; JAX arrays are immutable and cannot be updated "
                "in place. Copy it to NumPy (numpy.array(x)), update the copies with fusedopt "
                "and convert back with jax.numpy.asarray")
    return f"{op}: {name} is read-only; it must be writeable to be updated in place"


def _is_jax(obj):
    return type(obj).__module__.partition(".")[0] in ("jax", "jaxlib")


def _c_contiguous(shape, strides, itemsize):
    if strides is None:
        return True
    expect = itemsize
    for dim, stride in zip(reversed(shape), reversed(strides)):
        if dim != 1 and stride != expect:
            return False
        expect *= dim
    return True


def _row(ptr, shape, strides, typenum, itemsize, native, readonly, device):
    """A description row; `strides` in bytes, or None for C order."""
    size = int(np.prod(shape, dtype=np.int64)) if shape else 1
    flags = _F_NDARRAY  # "described": the column is non-zero for every known array
    if _c_contiguous(shape, strides, itemsize):
        flags |= _F_CONTIG
    if not readonly:
        flags |= _F_WRITEABLE
    if native:
        flags |= _F_NATIVE
    return np.array([ptr, size, itemsize, typenum, flags, _cpu.shape_hash(list(shape)),
                     len(shape), device], dtype=np.int64)


def _typestr_row(ptr, shape, strides, typestr, readonly, device):
    dt = np.dtype(typestr)
    return _row(ptr, shape, strides, dt.num, dt.itemsize, dt.byteorder != ">", readonly, device)


class Consumer:
    """The CUDA stream the kernels of one call will run on, found when first needed:
    the `stream=` the caller gave, else the current stream of the producer of
    params[0] (the rule of `_backend`)."""

    __slots__ = ("_params", "_given", "_stream")

    def __init__(self, params=None, stream=None):
        self._params = params
        self._given = stream
        self._stream = None

    def stream(self, ordinal):
        """The kernel's stream, an integer; `ordinal` is the CUDA device of the arrays."""
        if self._stream is None:
            s = self._given
            if s is None:
                params = self._params
                first = params[0] if isinstance(params, (list, tuple)) and params else None
                s = _backend.current_stream(first, ordinal)
            elif not isinstance(s, int):
                s = int(getattr(s, "ptr", getattr(s, "cuda_stream", s)))
            self._stream = int(s)
        return self._stream

    def dlpack_stream(self, ordinal):
        """The kernel's stream as DLPack's `stream=` argument (1: the legacy default stream)."""
        s = self.stream(ordinal)
        return 1 if s == 0 else s

    def wait(self, producer_stream, ordinal):
        """Order the kernel's stream after all work now queued on `producer_stream`
        (the `stream` of a `__cuda_array_interface__`). Nothing waits on the host."""
        kernel = self.dlpack_stream(ordinal)
        if producer_stream is None or int(producer_stream) == kernel:
            return
        try:
            import cupy
        except ImportError:
            torch = sys.modules.get("torch")
            if torch is None:
                raise TypeError("an array's __cuda_array_interface__ names a stream other than "
                                "the kernel's; ordering the two needs CuPy or PyTorch") from None
            _torch_wait(torch, torch.cuda.ExternalStream(int(producer_stream), device=ordinal),
                        kernel, ordinal)
            return
        with cupy.cuda.Device(ordinal):
            event = cupy.cuda.Event(block=False, disable_timing=True)
            event.record(cupy.cuda.ExternalStream(int(producer_stream)))
            cupy.cuda.ExternalStream(kernel).wait_event(event)

    def after_torch(self, torch, ordinal):
        """Order the kernel's stream after torch's current stream on device `ordinal`,
        when the kernel does not already run on it (torch tensors among other arrays)."""
        producer = torch.cuda.current_stream(ordinal)
        kernel = self.stream(ordinal)
        if producer.cuda_stream != kernel:
            _torch_wait(torch, producer, kernel, ordinal)


def _torch_wait(torch, producer, kernel, ordinal):
    event = torch.cuda.Event()
    event.record(producer)
    torch.cuda.ExternalStream(kernel, device=ordinal).wait_event(event)


def describe(op, name, obj, consumer=None):
    """(row, holder) for `obj`, or TypeError when it is not an array we can read."""
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(obj, torch.Tensor):
        rows = np.zeros((1, 8), dtype=np.int64)
        _torch_rows(op, name, [local_shard(obj, torch, op, name)], [0], rows, torch, consumer)
        return rows[0], None
    jax = _is_jax(obj)
    cai = None if jax else getattr(obj, "__cuda_array_interface__", None)
    if cai is not None:
        ptr, readonly = cai["data"]
        device = _cuda_device_of(op, name, ptr, obj)
        if consumer is not None:
            consumer.wait(cai.get("stream"), device)
        return _typestr_row(ptr, tuple(cai["shape"]), cai.get("strides"), cai["typestr"],
                            readonly, 1 + device), obj
    ai = None if jax else getattr(obj, "__array_interface__", None)
    if ai is not None:
        arr = np.asarray(obj)  # a view of the same memory, never a copy
        if arr.__array_interface__["data"][0] != ai["data"][0]:
            raise TypeError(f"{op}: {name} could not be viewed without a copy")
        row = np.zeros(8, dtype=np.int64)
        row[:7] = _cpu.describe([arr])[0]
        return row, arr
    if hasattr(obj, "__dlpack__"):
        row, holder = _from_dlpack(op, name, obj, consumer)
        if jax:
            row[4] &= ~_F_WRITEABLE
        return row, holder
    raise TypeError(f"{op}: {name} is not an array (got {type(obj).__name__}); expected a "
                    "NumPy or CuPy array, a PyTorch tensor, or an object with "
                    "__array_interface__, __cuda_array_interface__ or __dlpack__")


def describe_into(op, name, seq, index, rows, keep, consumer=None):
    """Fill `rows[index]` for the objects `seq[index]`; holders go to `keep`."""
    torch = sys.modules.get("torch")
    if torch is not None:
        seq = local_shards(seq, torch, op, name)
        tensors = [int(i) for i in index if isinstance(seq[int(i)], torch.Tensor)]
        if tensors:
            _torch_rows(op, name, seq, tensors, rows, torch, consumer)
            if len(tensors) == len(index):
                return
            index = [int(i) for i in index if not isinstance(seq[int(i)], torch.Tensor)]
    for i in index:
        i = int(i)
        rows[i], holder = describe(op, f"{name}[{i}]", seq[i], consumer)
        if holder is not None:
            keep.append(holder)


def contiguous_copy(op, name, obj, device, consumer=None):
    """A C-contiguous copy of a gradient (gradients are only read).

    On a GPU the copy is allocated and made on the stream the kernels will run on
    (`consumer`'s; the producer's pending work on `obj` is already ordered before that
    stream when `obj` was described). The caller drops the copy when the call returns,
    while the kernels may still read it; a block freed by CuPy's pool or torch's
    caching allocator goes back into use only for work on the stream it was allocated
    on, which that stream orders after the kernels. A copy made on any other stream
    could be handed out and overwritten before the kernels ran."""
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(obj, torch.Tensor):
        obj = local_shard(obj, torch, op, name).detach()
        if device == 0:
            return obj.contiguous().numpy()
        if consumer is None:
            return obj.contiguous()
        ordinal = device - 1
        with torch.cuda.stream(torch.cuda.ExternalStream(consumer.stream(ordinal),
                                                         device=ordinal)):
            return obj.contiguous()
    if device == 0:
        return np.ascontiguousarray(obj)
    import cupy  # only reached for CUDA arrays

    if consumer is None:
        return cupy.ascontiguousarray(obj)
    ordinal = device - 1
    with cupy.cuda.Device(ordinal), cupy.cuda.ExternalStream(consumer.stream(ordinal)):
        return cupy.ascontiguousarray(obj)


def _cuda_device_of(op, name, ptr, obj):
    """The CUDA device of an array with __cuda_array_interface__: its `device` (CuPy's
    `.id`, torch's `.index`) where it has one, else the device that owns the pointer."""
    dev = getattr(obj, "device", None)
    ident = getattr(dev, "id", None)
    if ident is None:
        ident = getattr(dev, "index", None)
    if ident is not None:
        return int(ident)
    module = _backend.cuda_module()
    if module is None:
        raise TypeError(f"{op}: {name} is in CUDA memory, but this build of fusedopt has no "
                        "CUDA module")
    if module.device_count() == 0:
        return 0  # nothing can run without a device: the step says why (cuda_available)
    try:
        return int(module.pointer_device(int(ptr)))
    except ValueError as e:  # host memory behind a __cuda_array_interface__
        raise TypeError(f"{op}: {name} ({type(obj).__name__}) offers "
                        f"__cuda_array_interface__, but its memory is not on a CUDA device: "
                        f"{e}") from None


# --- DLPack ---------------------------------------------------------------------------------

_DLPACK_DTYPES = {
    (_dlpack.INT, 8): np.int8, (_dlpack.INT, 16): np.int16, (_dlpack.INT, 32): np.int32,
    (_dlpack.INT, 64): np.int64, (_dlpack.UINT, 8): np.uint8, (_dlpack.UINT, 16): np.uint16,
    (_dlpack.UINT, 32): np.uint32, (_dlpack.UINT, 64): np.uint64,
    (_dlpack.FLOAT, 16): np.float16, (_dlpack.FLOAT, 32): np.float32,
    (_dlpack.FLOAT, 64): np.float64, (_dlpack.COMPLEX, 64): np.complex64,
    (_dlpack.COMPLEX, 128): np.complex128, (_dlpack.BOOL, 8): np.bool_,
}


def _dlpack_dtype(op, name, code, bits, lanes):
    """(type number, itemsize) of a DLPack dtype."""
    if lanes == 1:
        if (code, bits) == (_dlpack.BFLOAT, 16):
            return BFLOAT16, 2
        np_type = _DLPACK_DTYPES.get((code, bits))
        if np_type is not None:
            dt = np.dtype(np_type)
            return dt.num, dt.itemsize
    raise TypeError(f"{op}: {name} has DLPack dtype (code {code}, bits {bits}, lanes {lanes}), "
                    "which fusedopt does not know; supported: float32, float64")


def _from_dlpack(op, name, obj, consumer):
    try:
        device_type, device_id = obj.__dlpack_device__()
    except AttributeError:
        raise TypeError(f"{op}: {name} has __dlpack__ but no __dlpack_device__") from None
    device_type, device_id = int(device_type), int(device_id)
    if device_type == _dlpack.CPU:
        kwargs, device = {}, 0
    elif device_type == _dlpack.CUDA:
        # the producer orders its pending work before the kernel's stream
        kwargs = {"stream": consumer.dlpack_stream(device_id)} if consumer is not None else {}
        device = 1 + device_id
    else:
        where = _dlpack.DEVICE_NAMES.get(device_type, f"device type {device_type}")
        raise TypeError(f"{op}: {name} is on a DLPack {where} device; fusedopt updates "
                        "arrays on the CPU and on CUDA devices")
    try:
        try:
            capsule = obj.__dlpack__(max_version=_dlpack.VERSION, **kwargs)
        except TypeError:  # a producer from before DLPack 1.0 takes no max_version
            capsule = obj.__dlpack__(**kwargs)
    except BufferError as e:
        raise ValueError(f"{op}: {name} is read-only or cannot be shared: its producer "
                         f"refused the DLPack export: {e}") from None
    t = _dlpack.take(capsule)
    try:
        if (t.device_type, t.device_id) != (device_type, device_id):
            raise TypeError(f"{op}: {name} exported a tensor on another device than "
                            "__dlpack_device__ reported")
        typenum, itemsize = _dlpack_dtype(op, name, t.code, t.bits, t.lanes)
    except TypeError:
        t.holder.release()  # now, not when the traceback goes
        raise
    strides = None if t.strides is None else tuple(s * itemsize for s in t.strides)
    # a copy the producer made is only good for reading: an update of it would be lost
    readonly = t.readonly or t.copied
    return _row(t.address, t.shape, strides, typenum, itemsize, True, readonly, device), t.holder


# --- PyTorch --------------------------------------------------------------------------------

def _dtensor_class():
    """torch's DTensor class once torch.distributed.tensor has been imported, else None
    (then no tensor can be a DTensor, and nothing is checked)."""
    module = sys.modules.get("torch.distributed.tensor")
    return None if module is None else getattr(module, "DTensor", None)


def _local(op, name, t):
    """The local shard of DTensor `t`; ValueError for a pending reduction, whose local
    tensor is only this rank's part of a sum."""
    if any(p.is_partial() for p in t.placements):
        raise ValueError(f"{op}: {name} is a DTensor with placements {tuple(t.placements)}: "
                         "its local tensor holds a partial sum over ranks; redistribute it "
                         "to the param's placements (x.redistribute(placements=...)) first")
    return t.to_local()  # under no_grad: the shard tensor itself, not a copy


def local_shard(t, torch, op="step", name="array"):
    """The local shard of a DTensor (its own memory, not a copy), else `t`."""
    DTensor = _dtensor_class()
    if DTensor is None or not isinstance(t, DTensor):
        return t
    with torch.no_grad():
        return _local(op, name, t)


def local_shards(seq, torch, op="step", name="arrays"):
    """`seq`, with every DTensor replaced by its local shard."""
    DTensor = _dtensor_class()
    if DTensor is None or not any(map(isinstance, seq, repeat(DTensor))):
        return seq
    with torch.no_grad():
        return [_local(op, f"{name}[{i}]", t) if isinstance(t, DTensor) else t
                for i, t in enumerate(seq)]



# torch.dtype -> index into _DTYPE_ROWS (itemsize, type number); torch.Size -> index
# into _SHAPE_ROWS (element count, shape hash, ndim). Both grow as new ones are seen.
_DTYPE_INDEX = {}
_DTYPE_ROWS = []
_SHAPE_INDEX = {}
_SHAPE_ROWS = []
_MAX_SHAPES = 1 << 16
_TORCH_FLAGS = _F_NDARRAY | _F_WRITEABLE | _F_NATIVE  # torch tensors: native, writeable


def _torch_dtype_index(dtype):
    index = _DTYPE_INDEX.get(dtype)
    if index is None:
        name = str(dtype).rpartition(".")[2]
        if name == "bfloat16":
            typenum = BFLOAT16
        else:
            try:
                typenum = np.dtype(name).num
            except TypeError:
                typenum = _marker(name)
        index = _DTYPE_INDEX[dtype] = len(_DTYPE_ROWS)
        _DTYPE_ROWS.append((int(dtype.itemsize), int(typenum)))
    return index


def _shape_index(shape):
    index = _SHAPE_INDEX.get(shape)
    if index is None:
        if len(_SHAPE_INDEX) >= _MAX_SHAPES:
            _SHAPE_INDEX.clear()
            _SHAPE_ROWS.clear()
        dims = list(shape)
        size = int(np.prod(dims, dtype=np.int64)) if dims else 1
        row = (size, int(_cpu.shape_hash(dims)), len(dims))
        index = _SHAPE_INDEX[shape] = len(_SHAPE_ROWS)
        _SHAPE_ROWS.append(row)
    return index


_ADDRESS_READER = None  # torch's exported address reader: not yet probed (None), 0 unusable


def tensor_addresses(tensors):
    """The data addresses (uint64) of a list of torch tensors, none of them None.

    Read in C++ through the function torch exports for its compiled code (a tensor's
    ``data_ptr()`` without a Python method call, about 8 ns instead of 70) when torch has
    it and it passed a probe against ``data_ptr`` on tensors of several kinds; otherwise,
    and for a tensor it cannot read, through ``Tensor.data_ptr`` one by one."""
    if type(tensors) is not list:
        tensors = list(tensors)
    reader = _ADDRESS_READER if _ADDRESS_READER is not None else _probe_address_reader()
    if reader:
        out = _cpu.tensor_addresses(reader, tensors)
        if out is not None:
            return out
    return np.fromiter(map(sys.modules["torch"].Tensor.data_ptr, tensors), np.uint64,
                       len(tensors))


def _probe_address_reader():
    """Find torch's exported reader and check it on tensors of several kinds (a plain
    tensor, views at an offset and strided, a Parameter, an empty tensor); its address,
    or 0 when it is missing or reads differently from ``data_ptr``."""
    global _ADDRESS_READER
    _ADDRESS_READER = 0
    torch = sys.modules.get("torch")
    try:
        reader = int(torch._C._dynamo.guards._torchinductor_pyobject_tensor_data_ptr)
    except (AttributeError, TypeError, ValueError):
        return 0
    base = torch.arange(12, dtype=torch.float32)
    probes = [base, base[5:], base.view(3, 4)[1:, 1:],
              torch.nn.Parameter(torch.zeros(2, 3, dtype=torch.float64)), torch.zeros(0)]
    got = _cpu.tensor_addresses(reader, probes)
    if got is None or got.tolist() != [t.data_ptr() for t in probes]:
        return 0
    _ADDRESS_READER = reader
    return reader


def _torch_rows(op, name, seq, index, rows, torch, consumer):
    """Rows of the tensors `seq[index]`, read from their attributes (no DLPack capsule
    per tensor and step); the kernel's stream is ordered after torch's current stream on
    every CUDA device among them."""
    devices = set()
    for i in index:
        t = seq[i]
        if t.layout is not torch.strided:
            raise TypeError(f"{op}: {name}[{i}] is a {t.layout} tensor; only dense (strided) "
                            "tensors are supported")
        if t.is_cpu:
            device = 0
        elif t.is_cuda:
            device = 1 + t.get_device()
            devices.add(device)
        else:
            raise TypeError(f"{op}: {name}[{i}] is on {t.device}; fusedopt updates tensors on "
                            "the CPU and on CUDA devices")
        shape = t.shape
        s = _SHAPE_INDEX.get(shape)
        if s is None:
            s = _shape_index(shape)
        d = _DTYPE_INDEX.get(t.dtype)
        if d is None:
            d = _torch_dtype_index(t.dtype)
        size, hash_, ndim = _SHAPE_ROWS[s]
        itemsize, typenum = _DTYPE_ROWS[d]
        rows[i] = (t.data_ptr(), size, itemsize, typenum,
                   _TORCH_FLAGS | _F_CONTIG if t.is_contiguous() else _TORCH_FLAGS,
                   hash_, ndim, device)
    if consumer is not None:
        for device in devices:
            consumer.after_torch(torch, device - 1)
