"""Read DLPack capsules with ctypes: the versioned (1.x) and the legacy layout.

The structs below follow the published DLPack ABI. A consumer that takes the
tensor out of a capsule renames the capsule ("used_dltensor" or
"used_dltensor_versioned", so that the producer's capsule destructor leaves it
alone) and from then on owns the managed tensor: it must call the tensor's
deleter exactly once when it no longer needs the memory. `Holder` does that
when it is released; the caller keeps it alive until the kernel has run.
"""

from __future__ import annotations

import ctypes

# Device types of DLDevice.device_type that fusedopt can update.
CPU = 1
CUDA = 2
DEVICE_NAMES = {1: "CPU", 2: "CUDA", 3: "CUDA host", 4: "OpenCL", 7: "Vulkan", 8: "Metal",
                9: "VPI", 10: "ROCm", 11: "ROCm host", 12: "ExtDev", 13: "CUDA managed",
                14: "oneAPI", 15: "WebGPU", 16: "Hexagon", 17: "MAIA"}

# Type codes of DLDataType.code.
INT, UINT, FLOAT, OPAQUE, BFLOAT, COMPLEX, BOOL = range(7)

# Bits of DLManagedTensorVersioned.flags.
FLAG_READ_ONLY = 1 << 0
FLAG_IS_COPIED = 1 << 1

VERSION = (1, 0)  # the newest layout this module reads


class DLDevice(ctypes.Structure):
    _fields_ = [("device_type", ctypes.c_int32), ("device_id", ctypes.c_int32)]


class DLDataType(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint8), ("bits", ctypes.c_uint8), ("lanes", ctypes.c_uint16)]


class DLTensor(ctypes.Structure):
    _fields_ = [
        ("data", ctypes.c_void_p),
        ("device", DLDevice),
        ("ndim", ctypes.c_int32),
        ("dtype", DLDataType),
        ("shape", ctypes.POINTER(ctypes.c_int64)),
        ("strides", ctypes.POINTER(ctypes.c_int64)),  # in elements; NULL: row-major compact
        ("byte_offset", ctypes.c_uint64),
    ]


class DLManagedTensor(ctypes.Structure):  # legacy capsule "dltensor"
    _fields_ = [("dl_tensor", DLTensor), ("manager_ctx", ctypes.c_void_p),
                ("deleter", ctypes.c_void_p)]


class DLPackVersion(ctypes.Structure):
    _fields_ = [("major", ctypes.c_uint32), ("minor", ctypes.c_uint32)]


class DLManagedTensorVersioned(ctypes.Structure):  # capsule "dltensor_versioned"
    _fields_ = [("version", DLPackVersion), ("manager_ctx", ctypes.c_void_p),
                ("deleter", ctypes.c_void_p), ("flags", ctypes.c_uint64),
                ("dl_tensor", DLTensor)]


# The deleter is called with the GIL held: producers written in Python, or in C
# that touches Python objects, may rely on it.
_Deleter = ctypes.PYFUNCTYPE(None, ctypes.c_void_p)

_api = ctypes.pythonapi
_api.PyCapsule_IsValid.argtypes = [ctypes.py_object, ctypes.c_char_p]
_api.PyCapsule_IsValid.restype = ctypes.c_int
_api.PyCapsule_GetPointer.argtypes = [ctypes.py_object, ctypes.c_char_p]
_api.PyCapsule_GetPointer.restype = ctypes.c_void_p
_api.PyCapsule_SetName.argtypes = [ctypes.py_object, ctypes.c_char_p]
_api.PyCapsule_SetName.restype = ctypes.c_int

# PyCapsule_SetName keeps the pointer it is given, so the new names live as long
# as this module.
_NAME = b"dltensor"
_NAME_VERSIONED = b"dltensor_versioned"
_USED = ctypes.create_string_buffer(b"used_dltensor")
_USED_VERSIONED = ctypes.create_string_buffer(b"used_dltensor_versioned")


class Holder:
    """Owns a managed tensor taken from a capsule; calls its deleter once, on release."""

    __slots__ = ("_address", "_deleter")

    def __init__(self, address, deleter):
        self._address = address
        self._deleter = _Deleter(deleter) if deleter else None

    def release(self):
        deleter, self._deleter = self._deleter, None
        if deleter is not None:
            deleter(self._address)

    def __del__(self):
        self.release()


class Exported:
    """What a capsule describes: the tensor's fields, copied out, and the holder that
    keeps its memory alive."""

    __slots__ = ("address", "shape", "strides", "code", "bits", "lanes", "device_type",
                 "device_id", "readonly", "copied", "holder")


def take(capsule):
    """Take the tensor out of a DLPack capsule: an `Exported`, or TypeError when
    `capsule` is not an unused DLPack capsule this module can read."""
    if _api.PyCapsule_IsValid(capsule, _NAME_VERSIONED):
        address = _api.PyCapsule_GetPointer(capsule, _NAME_VERSIONED)
        _api.PyCapsule_SetName(capsule, _USED_VERSIONED)
        managed = DLManagedTensorVersioned.from_address(address)
        holder = Holder(address, managed.deleter)
        if managed.version.major != VERSION[0]:
            holder.release()
            raise TypeError(f"DLPack version {managed.version.major}.{managed.version.minor} "
                            f"is not supported (this build reads {VERSION[0]}.x)")
        flags = managed.flags
        out = _fields(managed.dl_tensor)
        out.readonly = bool(flags & FLAG_READ_ONLY)
        out.copied = bool(flags & FLAG_IS_COPIED)
    elif _api.PyCapsule_IsValid(capsule, _NAME):
        address = _api.PyCapsule_GetPointer(capsule, _NAME)
        _api.PyCapsule_SetName(capsule, _USED)
        managed = DLManagedTensor.from_address(address)
        holder = Holder(address, managed.deleter)
        out = _fields(managed.dl_tensor)
        out.readonly = False  # the legacy layout has no flag: producers refuse instead
        out.copied = False
    else:
        raise TypeError("__dlpack__ did not return an unused DLPack capsule "
                        f"(got {type(capsule).__name__})")
    out.holder = holder
    return out


def _fields(t):
    out = Exported()
    ndim = t.ndim
    out.address = (t.data or 0) + t.byte_offset
    out.shape = tuple(t.shape[k] for k in range(ndim))
    out.strides = tuple(t.strides[k] for k in range(ndim)) if t.strides else None
    out.code, out.bits, out.lanes = t.dtype.code, t.dtype.bits, t.dtype.lanes
    out.device_type, out.device_id = t.device.device_type, t.device.device_id
    return out
