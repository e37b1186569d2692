"""Checkpoints of an optimizer in one file: `save(optimizer, path)`, `load(optimizer, path)`.

    fo.save(opt, "opt.ckpt")     # opt.state_dict(), the optimizer's type and precision policy
    ...
    opt = fo.AdamW(params, lr=1e-3, precision=policy)   # the same type, params and policy
    fo.load(opt, "opt.ckpt")     # state, step counters and param_groups, bit for bit

The file is a NumPy ``.npz`` archive (a zip of ``.npy`` files) written by `numpy.savez`
and read with ``allow_pickle=False``: it holds no pickled objects, only arrays and one
JSON document. The document records the format version, the optimizer's class name,
its precision policy and step count (``steps_taken``) where it has them, and the
structure of ``state_dict()``: dicts (with their key types), lists, tuples, numbers,
strings, booleans and None, each array stored as an entry of its own. Arrays of dtypes
that ``.npy`` cannot describe without pickling (ml_dtypes' bfloat16, float8 ...) are
stored as their raw bits with the dtype's name and viewed back on load; arrays in GPU
memory (CuPy) are saved through host memory and loaded back into CuPy arrays on the
params' device.

`save` writes to a temporary file in the target's directory, flushes it to disk and
renames it over the target (`os.replace`): a crash or an error mid-save leaves either
the previous file or the new one, never a part of one. `load` reads and checks the
whole file before it changes anything: a truncated or damaged file, another format
version, another optimizer type or precision policy, averages of the params (state
``"ema"``) where the optimizer has no ``ema_decay`` or none where it has, and (through
``load_state_dict``) other parameter counts, shapes or dtypes raise ValueError, and
the optimizer keeps its state.

Only the optimizer is saved, not the params: save them with the model.
"""

from __future__ import annotations

import json
import os
import tempfile
import zipfile
from typing import Any

import numpy as np

__all__ = ["save", "load", "FORMAT", "VERSION"]

#: the "format" field of every checkpoint's document
FORMAT = "fusedopt.checkpoint"
#: the version this module writes; `load` reads it and older ones
VERSION = 1

_META = "meta"  # archive entry of the JSON document
_ARRAY = "a{}"  # archive entry of array number k


def save(optimizer: Any, path: str | os.PathLike) -> None:
    """Write the optimizer's state to `path` (replaced whole, never partly written).

    Parameters
    ----------
    optimizer
        A fusedopt optimizer: a class of `fusedopt` (SGD ... AdamW, LBFGS, Newton) or
        of `fusedopt.batched`, or anything with ``state_dict()`` in their layout.
    path
        The file to write. Its directory must exist; the name is used as given (no
        suffix is added).

    Raises
    ------
    TypeError
        When the state holds a value that cannot be stored without pickling (the
        message names where), or the optimizer is a ``torch.optim.Optimizer`` (use
        ``torch.save(optimizer.state_dict(), path)``).
    """
    _refuse_torch(optimizer, "save")
    arrays: list[np.ndarray] = []
    tree = _encode(optimizer.state_dict(), arrays, "state_dict")
    meta = {"format": FORMAT, "version": VERSION, "type": type(optimizer).__name__,
            "precision": _precision_of(optimizer), "steps_taken": _steps_taken(optimizer),
            "arrays": len(arrays), "state_dict": tree}
    text = json.dumps(meta, allow_nan=True, separators=(",", ":"))
    entries = {_META: np.frombuffer(text.encode("utf-8"), dtype=np.uint8)}
    entries.update((_ARRAY.format(k), a) for k, a in enumerate(arrays))

    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.",
                               suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **entries)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    _sync_directory(directory)


def load(optimizer: Any, path: str | os.PathLike) -> None:
    """Restore the state that `save` wrote to `path` into `optimizer`.

    The optimizer must be of the same type and precision policy as the saved one, over
    params of the same counts, shapes and dtypes (their values are not part of the
    checkpoint). State, step counters and param_groups' hyperparameters are restored
    bit for bit.

    Raises
    ------
    ValueError
        The file is missing, truncated or not a checkpoint, of a newer format version,
        or of another optimizer type, precision policy or parameter layout, or holds
        averages of the params (``ema_decay``) where the optimizer keeps none or none
        where it keeps them. The optimizer is then unchanged.
    TypeError
        The optimizer is a ``torch.optim.Optimizer`` (use ``torch.load`` and
        ``load_state_dict``).
    """
    _refuse_torch(optimizer, "load")
    meta, arrays = _read(os.fspath(path))
    where = f"checkpoint {os.fspath(path)!r}"
    if meta.get("type") != type(optimizer).__name__:
        raise ValueError(f"{where} holds the state of a {meta.get('type')}, not of a "
                         f"{type(optimizer).__name__}")
    mine = _precision_of(optimizer)
    if meta.get("precision") != mine:
        raise ValueError(f"{where} was saved with precision {meta.get('precision')}; this "
                         f"optimizer has {mine}")
    steps = meta.get("steps_taken")
    if (steps is None) != (_steps_taken(optimizer) is None) or \
            (steps is not None and not (isinstance(steps, int) and steps >= 0)):
        raise ValueError(f"{where} has steps_taken {steps!r}, which this optimizer cannot take")
    try:
        state_dict = _decode(meta["state_dict"], arrays)
    except (KeyError, IndexError, TypeError, ValueError) as e:
        raise ValueError(f"{where} is damaged: its state dict cannot be rebuilt ({e})") from None
    if not (isinstance(state_dict, dict) and {"state", "param_groups"} <= set(state_dict)):
        raise ValueError(f"{where} is damaged: no state dict in it")
    _check_averages(where, state_dict["state"], optimizer)
    state_dict["state"] = _on_params_device(state_dict["state"], optimizer)
    before = optimizer.state_dict()  # fusedopt's loads change nothing when they fail; this
    try:                             # puts back what one that fails half-way did change
        optimizer.load_state_dict(state_dict)
    except (ValueError, KeyError, IndexError, TypeError) as e:
        optimizer.load_state_dict(before)
        what = str(e) if isinstance(e, ValueError) else f"{type(e).__name__}: {e}"
        raise ValueError(f"{where} does not fit this optimizer: {what}") from None
    if steps is not None:
        optimizer.steps_taken = steps


# --- the document ---------------------------------------------------------------------------


def _refuse_torch(optimizer, verb):
    for cls in type(optimizer).__mro__:
        if cls.__module__.startswith("torch.optim") and cls.__name__ == "Optimizer":
            raise TypeError(f"fusedopt.{verb} takes fusedopt's own optimizers; for a "
                            f"torch.optim.Optimizer ({type(optimizer).__name__}) use "
                            "torch.save(opt.state_dict(), path) and "
                            "opt.load_state_dict(torch.load(path))")


def _check_averages(where, state, optimizer):
    """ValueError when the file holds averages of the params (state "ema") and the
    optimizer keeps none (no ``ema_decay``), or the other way round."""
    if not hasattr(optimizer, "ema_decay") or not isinstance(state, dict):
        return
    states = [s for s in state.values() if isinstance(s, dict) and s]
    saved = any("ema" in s for s in states)
    keeps = optimizer.ema_decay is not None
    if saved and not keeps:
        raise ValueError(f"{where} holds averages of the params (state 'ema'); this optimizer "
                         "keeps none (no ema_decay)")
    if states and keeps and not saved:
        raise ValueError(f"{where} holds no averages of the params (state 'ema'); this "
                         f"optimizer keeps them (ema_decay={optimizer.ema_decay})")


def _precision_of(optimizer):
    """The precision policy as a dict of JSON values, or None for optimizers without one."""
    p = getattr(optimizer, "precision", None)
    if p is None:
        return None
    state_dtype = getattr(p, "state_dtype", None)
    out = {"state_dtype": None if state_dtype is None else np.dtype(state_dtype).name,
           "master_weights": bool(getattr(p, "master_weights", False)),
           "kahan": bool(getattr(p, "kahan", False)),
           "stochastic_rounding": bool(getattr(p, "stochastic_rounding", False)),
           "seed": int(getattr(p, "seed", 0))}
    if out["state_dtype"] == "int8":  # which params keep 8-bit state
        out["min_8bit_size"] = int(getattr(p, "min_8bit_size", 0))
    return out


def _steps_taken(optimizer):
    steps = getattr(optimizer, "steps_taken", None)
    return None if steps is None else int(steps)


def _first_param(optimizer):
    groups = getattr(optimizer, "param_groups", None) or []
    for group in groups:
        for p in group.get("params", []) if isinstance(group, dict) else []:
            if hasattr(p, "shape"):
                return p
    params = getattr(optimizer, "params", None)  # the batched optimizers
    return params[0] if params else None


def _on_params_device(state, optimizer):
    """The loaded state with its arrays in CuPy, on the params' device, when the
    optimizer's params are CuPy arrays; as loaded otherwise."""
    param = _first_param(optimizer)
    if param is None or not type(param).__module__.startswith("cupy"):
        return state
    import cupy

    def move(v):
        if isinstance(v, dict):
            return {k: move(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return type(v)(move(x) for x in v)
        return cupy.asarray(v) if isinstance(v, np.ndarray) else v

    with param.device:
        return move(state)


def _is_device_array(v):
    return hasattr(v, "__cuda_array_interface__") and hasattr(v, "get")


def _encode(value, arrays, where):
    """A JSON tree for `value`; its arrays are appended to `arrays`."""
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, np.generic):
        return {"scalar": _encode_array(np.asarray(value), arrays, where)}
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return value
    if isinstance(value, np.ndarray):
        return {"array": _encode_array(value, arrays, where)}
    if _is_device_array(value):
        return {"array": _encode_array(value.get(), arrays, where)}
    if isinstance(value, list):
        return [_encode(v, arrays, f"{where}[{k}]") for k, v in enumerate(value)]
    if isinstance(value, tuple):
        return {"tuple": [_encode(v, arrays, f"{where}[{k}]") for k, v in enumerate(value)]}
    if isinstance(value, dict):
        return {"dict": [[_encode(k, arrays, f"{where} key"), _encode(v, arrays, f"{where}[{k!r}]")]
                         for k, v in value.items()]}
    raise TypeError(f"fusedopt.save: {where} is a {type(value).__name__}, which a checkpoint "
                    "cannot hold (arrays, numbers, strings, None and lists, tuples and dicts "
                    "of them)")


def _encode_array(a, arrays, where):
    a = np.array(a, order="C", copy=None)  # (np.ascontiguousarray would make 0-d arrays 1-d)
    dtype = a.dtype
    if dtype.hasobject:
        raise TypeError(f"fusedopt.save: {where} is an array of Python objects")
    record = {"index": len(arrays), "dtype": dtype.name, "shape": list(a.shape)}
    if _npy_native(dtype):
        arrays.append(a)
    else:  # raw bits, viewed back through the dtype's name on load
        record["bits"] = True
        arrays.append(a.view(_bits_dtype(dtype)))
    return record


def _npy_native(dtype):
    """Whether .npy stores this dtype and reads it back without pickling."""
    if dtype.kind not in "biufcSU" or dtype.fields is not None:
        return False
    try:
        return np.dtype(dtype.str) == dtype
    except TypeError:
        return False


def _bits_dtype(dtype):
    return {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}.get(dtype.itemsize) or \
        np.dtype((np.uint8, (dtype.itemsize,)))


def _dtype_named(name):
    try:
        return np.dtype(name)
    except TypeError:
        pass
    try:
        import ml_dtypes
    except ImportError:
        raise ValueError(f"arrays of dtype {name} need the ml_dtypes package") from None
    dtype = getattr(ml_dtypes, name, None)
    if dtype is None:
        raise ValueError(f"unknown dtype {name!r}")
    return np.dtype(dtype)


def _decode(tree, arrays):
    if tree is None or isinstance(tree, (bool, str, int, float)):
        return tree
    if isinstance(tree, list):
        return [_decode(v, arrays) for v in tree]
    if isinstance(tree, dict) and len(tree) == 1:
        (kind, body), = tree.items()
        if kind == "array":
            return _decode_array(body, arrays)
        if kind == "scalar":
            return _decode_array(body, arrays)[()]
        if kind == "tuple":
            return tuple(_decode(v, arrays) for v in body)
        if kind == "dict":
            out = {}
            for key, value in body:
                key = _decode(key, arrays)
                if isinstance(key, list):
                    raise ValueError("a list cannot be a dict key")
                out[key] = _decode(value, arrays)
            return out
    raise ValueError(f"unknown record {str(tree)[:60]}")


def _decode_array(record, arrays):
    stored = arrays[record["index"]]
    dtype = _dtype_named(record["dtype"])
    shape = tuple(record["shape"])
    if record.get("bits"):
        if stored.dtype != np.dtype(_bits_dtype(dtype)).base:
            raise ValueError(f"array {record['index']} holds {stored.dtype}, not the bits of "
                             f"{dtype}")
        out = np.array(stored, order="C", copy=None).view(dtype)
        if out.shape != shape and out.shape[:-1] == shape and out.shape[-1] == 1:
            out = out.reshape(shape)
    else:
        out = stored
    if out.dtype != dtype or out.shape != shape:
        raise ValueError(f"array {record['index']} has {out.dtype} {out.shape}, the document "
                         f"says {dtype} {shape}")
    return out


# --- the file -------------------------------------------------------------------------------


def _read(path):
    """(document, arrays) of a checkpoint; ValueError for anything that is not one."""
    where = f"checkpoint {path!r}"
    if not os.path.isfile(path):
        raise ValueError(f"{where} does not exist")
    try:
        with open(path, "rb") as f:  # ours to close, also when np.load fails half-way
            archive = np.load(f, allow_pickle=False)
            if not isinstance(archive, np.lib.npyio.NpzFile):
                raise ValueError("not an .npz archive")
            with archive:
                if _META not in archive.files:
                    raise ValueError("no fusedopt document in it")
                meta = json.loads(bytes(archive[_META]).decode("utf-8"))
                if not isinstance(meta, dict) or meta.get("format") != FORMAT:
                    raise ValueError("no fusedopt document in it")
                version = meta.get("version")
                if not isinstance(version, int) or not 1 <= version <= VERSION:
                    raise _Refused(f"{where} has format version {version!r}; this fusedopt "
                                   f"reads versions 1 to {VERSION}")
                count = meta.get("arrays")
                names = [_ARRAY.format(k) for k in range(count if isinstance(count, int) else 0)]
                if not isinstance(count, int) or set(archive.files) != {_META, *names}:
                    raise ValueError(f"the archive holds {len(archive.files) - 1} arrays, the "
                                     f"document names {count}")
                arrays = [archive[name] for name in names]  # reads (and CRC-checks) every entry
    except _Refused as e:
        raise ValueError(str(e)) from None
    except (OSError, EOFError, ValueError, KeyError, UnicodeDecodeError, zipfile.BadZipFile,
            json.JSONDecodeError) as e:
        raise ValueError(f"{where} is truncated, damaged or not a fusedopt checkpoint: "
                         f"{type(e).__name__}: {e}") from None
    return meta, arrays


class _Refused(Exception):
    """A well-formed checkpoint this version does not read."""


def _sync_directory(directory):
    """Make the rename durable (POSIX); a no-op where directories cannot be opened."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
