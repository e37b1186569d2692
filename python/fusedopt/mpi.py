"""Data-parallel training over MPI with the optimizer state sharded across ranks (ZeRO-1),
for NumPy and CuPy training loops outside a framework. mpi4py is the engine:

    import numpy as np
    import fusedopt as fo
    from fusedopt.mpi import ZeroRedundancyOptimizer

    params = fo.flat_arrays(shapes, np.float32)  # the same initial values on every rank
    init(params.views, seed=0)
    opt = ZeroRedundancyOptimizer(params.views, optimizer_class=fo.AdamW, lr=1e-3)
    for batch in my_batches:                     # each rank its own data
        grads = backward(params.views, batch)    # this rank's gradients
        opt.step(grads)                          # every rank ends with the same new params

    # mpiexec -n 4 python train.py

Each step

1. sums the gradients of all ranks with one reduce-scatter over a flat buffer (per
   dtype): rank r receives the sum over ranks of its shard, the elements
   [r*n//N, (r+1)*n//N) of the n elements of all params in order (shards are cut on
   element boundaries, not on array boundaries, and differ in size by one element at
   most; the collective takes per-rank counts, so nothing is padded);
2. steps that shard with one fused call of the inner optimizer (`optimizer_class`, a
   fusedopt optimizer), dividing the sums by N in the same pass, so each rank holds
   and updates the state of its shard only: 1/N of the state memory;
3. brings every rank the new params with one allgather.

Params that are packed views of one buffer (`fusedopt.flat_arrays`) are gathered in
place; other params are gathered through a staging buffer and copied back (one extra
pass). Gradients that are packed views of one buffer are reduced from it directly,
others are first copied into one.

Arrays: NumPy arrays, or CuPy arrays when the MPI library is CUDA-aware (`cuda_aware`);
float32 and float64 (MPI has no standard 16-bit float type).
"""

from __future__ import annotations

import ctypes
import os
import sys
from typing import Any, Optional

import numpy as np

try:
    from mpi4py import MPI
except ImportError as e:  # pragma: no cover - depends on the installation
    raise ImportError("fusedopt.mpi needs mpi4py and an MPI library: "
                      "pip install 'fusedopt[mpi]'") from e

from . import _arrays
from .lbfgs import LBFGS
from .newton import Newton
from .optimizer import Optimizer
from .optimizers import AdamW

__all__ = ["ZeroRedundancyOptimizer", "cuda_aware"]

_OP = "ZeroRedundancyOptimizer"
_MPI_TYPES = {np.dtype(np.float32): MPI.FLOAT, np.dtype(np.float64): MPI.DOUBLE}
_FALSE = ("", "0", "false", "no", "off")


def cuda_aware(comm: Optional[Any] = None) -> bool:
    """Whether the MPI library takes CUDA device memory in its calls.

    Asked in this order: the environment variable ``FUSEDOPT_MPI_CUDA_AWARE`` (``1`` or
    ``0``, for a library that cannot say), the MPI 4.1 info key
    ``mpi_memory_alloc_kinds`` of `comm` (a ``cuda`` kind), then the
    ``MPIX_Query_cuda_support`` extension of Open MPI and MPICH.

    Parameters
    ----------
    comm : mpi4py.MPI.Intracomm, optional
        The communicator to ask (default ``MPI.COMM_WORLD``).

    Returns
    -------
    bool
    """
    env = os.environ.get("FUSEDOPT_MPI_CUDA_AWARE")
    if env is not None:
        return env.strip().lower() not in _FALSE
    comm = MPI.COMM_WORLD if comm is None else comm
    info = comm.Get_info()
    try:
        kinds = info.Get("mpi_memory_alloc_kinds")
    finally:
        info.Free()
    if kinds and any(k.split(":")[0].strip() == "cuda" for k in kinds.split(",")):
        return True
    try:
        query = ctypes.CDLL(MPI.__file__).MPIX_Query_cuda_support
    except (OSError, AttributeError):
        return False
    query.restype, query.argtypes = ctypes.c_int, []
    return bool(query())


def _module_of(p):
    """numpy or cupy, by the array's type; TypeError for anything else."""
    if isinstance(p, np.ndarray):
        return np
    if type(p).__module__.partition(".")[0] == "cupy":
        return sys.modules["cupy"]
    raise TypeError(f"{_OP}: expected NumPy or CuPy arrays, got {type(p).__name__} (PyTorch "
                    "models shard their optimizer state with torch.distributed: see "
                    "docs/distributed.md)")


def _shard_bounds(n, world):
    """Element bounds of the N shards of n elements: rank r owns [b[r], b[r+1])."""
    return [r * n // world for r in range(world + 1)]


def _overlap(lo, hi, bounds):
    """Per-rank sizes and displacements of the range [lo, hi) cut by the shard bounds."""
    counts, displs = [], []
    for r in range(len(bounds) - 1):
        a, b = max(lo, bounds[r]), min(hi, bounds[r + 1])
        counts.append(max(b - a, 0))
        displs.append(sum(counts[:-1]))
    return counts, displs


def _packed(arrays, rows):
    """A one-dimensional array over the memory of `arrays` when they are C-contiguous
    views packed in order in one buffer (`fusedopt.flat_arrays`), else None."""
    if not len(arrays):
        return None
    flags = rows[:, _arrays.FLAGS]
    if ((flags & _arrays.F_CONTIG) == 0).any():
        return None
    sizes, ptrs = rows[:, _arrays.SIZE], rows[:, _arrays.PTR]
    itemsize = int(rows[0, _arrays.ITEMSIZE])
    nonempty = np.flatnonzero(sizes > 0)
    if not nonempty.size:
        return None
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    start = ptrs[nonempty] - itemsize * offsets[nonempty]
    if (start != start[0]).any():
        return None
    first = arrays[int(nonempty[0])]
    root = first
    while getattr(root, "base", None) is not None and type(root.base) is type(first):
        root = root.base
    if root.dtype != first.dtype or not root.flags.c_contiguous:
        return None
    root_ptr = _arrays.describe_list(_OP, "params", [root])[0][0, _arrays.PTR]
    delta = int(start[0] - root_ptr)
    n = int(offsets[-1])
    if delta % itemsize or delta < 0 or delta // itemsize + n > root.size:
        return None
    return root.reshape(-1)[delta // itemsize:delta // itemsize + n]


class _Bucket:
    """The params of one dtype, in group order: their flat layout and this rank's shard."""

    def __init__(self, dtype, members, params, world, rank, xp):
        self.dtype = dtype
        self.mpi_type = _MPI_TYPES[dtype]
        self.members = members  # global param indices
        self.arrays = [params[i] for i in members]
        self.sizes = [int(a.size) for a in self.arrays]
        self.offsets = np.concatenate([[0], np.cumsum(self.sizes, dtype=np.int64)]).tolist()
        self.n = self.offsets[-1]
        self.bounds = _shard_bounds(self.n, world)
        self.counts = [self.bounds[r + 1] - self.bounds[r] for r in range(world)]
        self.displs = self.bounds[:-1]
        self.lo, self.hi = self.bounds[rank], self.bounds[rank + 1]
        rows = _arrays.describe_list(_OP, "params", self.arrays)[0]
        self.flat = _packed(self.arrays, rows)
        self.in_place = self.flat is not None
        if not self.in_place:
            self.flat = xp.empty(self.n, dtype=dtype)  # the staging buffer of the allgather
        self.send = None  # the gradient buffer, made on the first step that needs it
        self.grad_shard = xp.zeros(self.hi - self.lo, dtype=dtype)

    def pieces(self, start, stop):
        """Views of the params covering [start, stop) of the flat layout, in order."""
        if self.in_place:
            return [self.flat[start:stop]]
        out = []
        for a, lo, size in zip(self.arrays, self.offsets, self.sizes):
            a_lo, a_hi = max(start, lo), min(stop, lo + size)
            if a_lo < a_hi:
                out.append(a.reshape(-1)[a_lo - lo:a_hi - lo])
        return out


class ZeroRedundancyOptimizer:
    """A fusedopt optimizer whose state is sharded across the ranks of an MPI
    communicator (ZeRO stage 1), for data-parallel training of NumPy or CuPy models.

    Parameters
    ----------
    params : list of arrays, or list of dicts
        The model's params (NumPy or CuPy, float32 or float64, C-contiguous), or param
        groups as for the inner optimizer (``{"params": [...], "lr": ...}``). Every rank
        passes params of the same shapes and dtypes, in the same order, with the same
        values (broadcast them or seed every rank alike); this is checked at
        construction (shapes, dtypes and group options) with one allgather, and a
        mismatch raises ValueError on every rank.
    optimizer_class : type, optional
        The inner optimizer, a fusedopt element-wise optimizer class (`fusedopt.SGD`,
        `Adam`, `AdamW`, `NAdam`, `Rprop`, `Lion`, ... any elementwise class of the table
        of algorithms, or a subclass); default `fusedopt.AdamW`. L-BFGS and Newton need
        the whole parameter vector, LAMB and LARS every tensor's norms, and they are
        refused, as is `AdamWScheduleFree` (its train/eval modes and per-group
        bookkeeping).
    comm : mpi4py.MPI.Intracomm, optional
        The ranks that share the training (default ``MPI.COMM_WORLD``).
    **defaults
        Hyperparameters and options of the inner optimizer (``lr``, ``weight_decay``,
        ``precision``, ...).

    Attributes
    ----------
    optim : fusedopt.Optimizer
        The inner optimizer over this rank's shard (its params are views of the shard).
    param_groups : list of dict
        The groups over the whole params, with every option; changes (a learning-rate
        schedule) reach the inner optimizer at the next step.
    comm : mpi4py.MPI.Intracomm
    rank, world_size : int

    Raises
    ------
    TypeError
        A param is not a NumPy or CuPy array, has a dtype other than float32/float64,
        is a CuPy array while the MPI library is not CUDA-aware, or `optimizer_class` is
        not a fusedopt element-wise optimizer that steps shards (see above).
    ValueError
        Params that are not C-contiguous or writeable, a param given twice, the
        group option ``frozen_params`` (freeze a whole group instead), invalid
        hyperparameters, or ranks whose params or options differ.
    RuntimeError
        Another rank failed to set up (every rank raises).

    Notes
    -----
    Every method but the properties is collective: call it on every rank of `comm`, in
    the same order. A step whose gradients fail validation raises on the ranks that see
    the error before any communication, so the program must stop on every rank (a
    rank-specific error would leave the others waiting in the collective, as in any
    MPI program).

    The gradients are averaged exactly as ``sum over ranks / N``: the sum is MPI's
    (the order of a sum over more than two ranks is the library's), the division is
    one multiply by 1/N inside the fused step (exact for N a power of two).
    """

    def __init__(self, params: Any, optimizer_class: type = AdamW, comm: Optional[Any] = None,
                 **defaults: Any) -> None:
        self.comm = MPI.COMM_WORLD if comm is None else comm
        self.rank, self.world_size = self.comm.Get_rank(), self.comm.Get_size()
        error, signature = None, None
        try:
            self._setup(params, optimizer_class, defaults)
            signature = self._signature()
        except Exception as e:  # noqa: BLE001 - every rank must hear of it, then it is raised
            error = e
        gathered = self.comm.allgather(
            (signature, None if error is None else f"{type(error).__name__}: {error}"))
        if error is not None:
            raise error
        for r, (_, message) in enumerate(gathered):
            if message is not None:
                raise RuntimeError(f"{_OP}: rank {r} failed to set up: {message}")
        mismatch = _compare([s for s, _ in gathered])
        if mismatch is not None:
            raise ValueError(f"{_OP}: {mismatch}; every rank must pass params of the same "
                             "shapes and dtypes in the same order, with the same options")

    # --- construction ------------------------------------------------------------------

    def _setup(self, params, optimizer_class, defaults):
        if not (isinstance(optimizer_class, type) and issubclass(optimizer_class, Optimizer)) \
                or issubclass(optimizer_class, (LBFGS, Newton)):
            raise TypeError(f"{_OP}: optimizer_class must be a fusedopt element-wise optimizer "
                            "(SGD, Adam, AdamW, NAdam, Rprop, Lion, ... or a subclass), got "
                            f"{optimizer_class!r}")
        spec = getattr(optimizer_class, "spec", None)
        if spec is not None and spec.mode_state is not None:
            raise TypeError(f"{_OP}: {optimizer_class.__name__} switches its params between "
                            "two sequences (train()/eval()) and keeps per-group step "
                            "bookkeeping, which the shards do not carry; step it without "
                            "ZeroRedundancyOptimizer")
        if spec is not None and spec.reductions(spec.to_op({**spec.group_defaults(),
                                                            **defaults})):
            raise TypeError(f"{_OP}: {optimizer_class.__name__} needs every tensor's norms "
                            "(per-tensor trust ratios), and the shards cut through tensors")
        groups = list(params) if isinstance(params, (list, tuple)) else None
        if not groups:
            raise ValueError(f"{_OP}: params must be a non-empty list of arrays or of dicts")
        if not isinstance(groups[0], dict):
            groups = [{"params": groups}]
        flat, group_of = [], []
        for k, group in enumerate(groups):
            if not isinstance(group, dict):
                raise TypeError(f"{_OP}: param group {k} is not a dict")
            if group.get("frozen_params"):
                raise ValueError(f"{_OP}: param group {k} has frozen_params; the shards cut "
                                 "through params, so freeze whole groups (\"frozen\": True)")
            ps = group["params"]
            ps = list(ps) if isinstance(ps, (list, tuple)) else [ps]
            flat += ps
            group_of += [k] * len(ps)
        if len({id(p) for p in flat}) != len(flat):
            raise ValueError(f"{_OP}: a param appears more than once")
        modules = {_module_of(p) for p in flat}
        if len(modules) > 1:
            raise TypeError(f"{_OP}: params mix NumPy and CuPy arrays")
        xp = modules.pop()
        for i, p in enumerate(flat):
            if np.dtype(p.dtype) not in _MPI_TYPES:
                raise TypeError(f"{_OP}: params[{i}] has dtype {p.dtype}; fusedopt.mpi "
                                "communicates float32 and float64")
            if not p.flags.c_contiguous:
                raise ValueError(f"{_OP}: params[{i}] is not C-contiguous")
            if xp is np and not p.flags.writeable:
                raise ValueError(f"{_OP}: params[{i}] is read-only")
        self._cuda = xp is not np
        if self._cuda:
            if not cuda_aware(self.comm):
                raise TypeError(
                    f"{_OP}: the params are CuPy arrays, but this MPI library "
                    f"({MPI.Get_library_version().splitlines()[0].strip()}) is not CUDA-aware, "
                    "and fusedopt does not copy through host memory behind your back. Use a "
                    "CUDA-aware MPI (Open MPI or MPICH built with CUDA, MVAPICH2-GDR, Cray "
                    "MPICH; FUSEDOPT_MPI_CUDA_AWARE=1 if yours cannot say so), or train on "
                    "NumPy copies")
            devices = {int(p.device.id) for p in flat}
            if len(devices) > 1:
                raise TypeError(f"{_OP}: params on several GPUs {sorted(devices)}; one rank "
                                "steps params on one device")
        self._xp = xp
        self._params = flat
        self._group_of = group_of
        self._group_sizes = [group_of.count(k) for k in range(len(groups))]
        dtypes = list(dict.fromkeys(np.dtype(p.dtype) for p in flat))
        self._buckets = [_Bucket(dt, [i for i, p in enumerate(flat) if np.dtype(p.dtype) == dt],
                                 flat, self.world_size, self.rank, xp) for dt in dtypes]
        self._param_rows = _arrays.describe_list(_OP, "params", flat)[0]

        # the inner optimizer: one group per (bucket, param group) with params in it,
        # over the part of this rank's shard that falls into that group
        inner_groups, self._slots = [], []
        for b, bucket in enumerate(self._buckets):
            group_ids = [group_of[i] for i in bucket.members]
            for k in dict.fromkeys(group_ids):
                where = [j for j, g in enumerate(group_ids) if g == k]
                g_lo, g_hi = bucket.offsets[where[0]], bucket.offsets[where[-1] + 1]
                lo, hi = max(g_lo, bucket.lo), min(g_hi, bucket.hi)
                if lo >= hi:  # no element of this group here: an empty piece keeps the
                    lo = hi = bucket.lo  # inner optimizer's layout alike on every rank
                pieces = bucket.pieces(lo, hi) or [xp.empty(0, dtype=bucket.dtype)]
                grads = _split_like(bucket.grad_shard[lo - bucket.lo:hi - bucket.lo], pieces)
                options = {key: v for key, v in groups[k].items() if key != "params"}
                inner_groups.append({**options, "params": pieces})
                self._slots.append(_Slot(b, k, g_lo, g_hi, grads))
        self.optim = optimizer_class(inner_groups, **defaults)
        self._inner_grads = [g for slot in self._slots for g in slot.grads]
        self.param_groups = []
        for k, group in enumerate(groups):
            first = next((g for g, s in zip(self.optim.param_groups, self._slots) if s.k == k),
                         None)
            options = {key: v for key, v in (first or self.optim.defaults).items()
                       if key != "params"}
            self.param_groups.append({**options, **{key: v for key, v in group.items()
                                                    if key != "params"},
                                      "params": [p for p, g in zip(flat, group_of) if g == k]})

    def _signature(self):
        shapes = [(tuple(p.shape), np.dtype(p.dtype).str) for p in self._params]
        options = [repr(sorted((k, v) for k, v in g.items() if k != "params"))
                   for g in self.param_groups]
        return shapes, self._group_sizes, options

    # --- the step ------------------------------------------------------------------------

    def step(self, grads: list) -> None:
        """Average the gradients over the ranks and update every rank's params.

        Parameters
        ----------
        grads : list of arrays
            This rank's gradients, aligned with the params (in group order), of the
            params' shapes and dtypes. Every param needs one (pass zeros for a param
            that got none: every rank reduces every element).

        Raises
        ------
        TypeError, ValueError
            Gradients missing, of other shapes, dtypes or array kinds; nothing is
            communicated or changed.
        """
        grads, rows = self._check_grads(grads)
        for slot, group in zip(self._slots, self.optim.param_groups):
            options = self.param_groups[slot.k]
            for key, value in options.items():
                if key != "params":
                    group[key] = value
        sends = []
        for bucket in self._buckets:
            chosen = [grads[i] for i in bucket.members]
            send = _packed(chosen, rows[bucket.members])
            if send is None:
                if bucket.send is None:
                    bucket.send = self._xp.empty(bucket.n, dtype=bucket.dtype)
                send = bucket.send
                for g, lo, size in zip(chosen, bucket.offsets, bucket.sizes):
                    send[lo:lo + size] = g.reshape(-1)
            sends.append(send)
        self._sync()
        for bucket, send in zip(self._buckets, sends):
            self.comm.Reduce_scatter(send, [bucket.grad_shard, bucket.mpi_type],
                                     recvcounts=bucket.counts, op=MPI.SUM)
        self.optim.step(self._inner_grads, loss_scale=float(self.world_size))
        self._sync()
        for bucket in self._buckets:
            if not bucket.in_place:
                _gather_into(bucket.flat[bucket.lo:bucket.hi], bucket.pieces(bucket.lo, bucket.hi))
            self.comm.Allgatherv(MPI.IN_PLACE,
                                 [bucket.flat, bucket.counts, bucket.displs, bucket.mpi_type])
            if not bucket.in_place:
                for a, lo, size in zip(bucket.arrays, bucket.offsets, bucket.sizes):
                    a.reshape(-1)[...] = bucket.flat[lo:lo + size]

    def _check_grads(self, grads):
        if not isinstance(grads, (list, tuple)):
            raise TypeError(f"{_OP}.step: grads must be a list of arrays, got "
                            f"{type(grads).__name__}")
        grads = list(grads)
        n = len(self._params)
        if len(grads) != n:
            raise ValueError(f"{_OP}.step: got {len(grads)} grads for {n} params")
        for i, g in enumerate(grads):
            if g is None:
                raise TypeError(f"{_OP}.step: grads[{i}] is None; every rank reduces every "
                                "gradient, so pass zeros for a param that got none")
            if _module_of(g) is not self._xp:
                raise TypeError(f"{_OP}.step: grads[{i}] is a {type(g).__name__}, the params "
                                f"are {type(self._params[i]).__name__}s")
        rows = _arrays.describe_list(_OP, "grads", grads)[0]
        mine = self._param_rows
        cols = [_arrays.SIZE, _arrays.SHAPE, _arrays.NDIM, _arrays.TYPENUM, _arrays.DEVICE]
        bad = np.flatnonzero((rows[:, cols] != mine[:, cols]).any(axis=1))
        if bad.size:
            i = int(bad[0])
            p, g = self._params[i], grads[i]
            if g.dtype != p.dtype:
                raise TypeError(f"{_OP}.step: grads[{i}] has dtype {g.dtype}, params[{i}] "
                                f"has {p.dtype}")
            if tuple(g.shape) != tuple(p.shape):
                raise ValueError(f"{_OP}.step: grads[{i}] has shape {tuple(g.shape)}, "
                                 f"params[{i}] has {tuple(p.shape)}")
            raise TypeError(f"{_OP}.step: grads[{i}] is on another device than params[{i}]")
        return grads, rows

    def _sync(self):
        """MPI reads device memory outside CUDA's streams: wait for the queued work."""
        if self._cuda:
            self._xp.cuda.get_current_stream().synchronize()

    # --- state dicts ----------------------------------------------------------------------

    def state_dict(self) -> Optional[dict]:
        """Gather the state to rank 0, in the inner optimizer's layout.

        Collective. On rank 0 the result equals what ``optimizer_class(params,
        **defaults).state_dict()`` would hold after the same steps on the averaged
        gradients in one process: one entry per param with its full state arrays and
        per-param scalars (the step count, NAdam's mu_product, ...), and the param
        groups. Other ranks get None.

        Returns
        -------
        dict or None
        """
        root = self.rank == 0
        inner = self.optim
        scalars = inner.spec.scalars
        index = 0
        # per slot: ({scalar: value} or None, {name: full array of the slot's range})
        gathered = []
        for slot, group in zip(self._slots, inner.param_groups):
            states = [inner.state.get(index + j) for j in range(len(group["params"]))]
            index += len(group["params"])
            first = states[0]
            if first is None:
                gathered.append((None, {}))
                continue
            bucket = self._buckets[slot.b]
            counts, displs = _overlap(slot.lo, slot.hi, bucket.bounds)
            full = {}
            for name, value in first.items():
                if name in scalars:
                    continue
                local = value.reshape(-1) if len(states) == 1 else \
                    self._xp.concatenate([s[name].reshape(-1) for s in states])
                out = self._xp.empty(slot.hi - slot.lo, dtype=local.dtype) if root else None
                self._sync()
                self.comm.Gatherv(local, [out, counts, displs, _MPI_TYPES[np.dtype(local.dtype)]]
                                  if root else None, root=0)
                full[name] = out
            gathered.append(({n: first[n] for n in scalars if n in first} or None, full))
        if not root:
            return None
        state, groups, start = {}, [], 0
        for k, group in enumerate(self.param_groups):
            n = len(group["params"])
            packed = {key: v for key, v in group.items() if key != "params"}
            packed["params"] = list(range(start, start + n))
            groups.append(packed)
            start += n
        for slot, (step, full) in zip(self._slots, gathered):
            if step is None and not full:
                continue
            bucket = self._buckets[slot.b]
            for j, i in enumerate(bucket.members):
                if self._group_of[i] != slot.k:
                    continue
                lo, size, p = bucket.offsets[j], bucket.sizes[j], self._params[i]
                entry = {name: arr[lo - slot.lo:lo - slot.lo + size].reshape(p.shape).copy()
                         for name, arr in full.items()}
                if step is not None:
                    entry.update(step)
                state[i] = entry
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, state_dict: Optional[dict]) -> None:
        """Scatter rank 0's `state_dict` (the layout of `state_dict`) to the shards.

        Collective; the argument on other ranks is ignored (pass None). On any mismatch
        every rank raises ValueError and keeps its old state.

        Parameters
        ----------
        state_dict : dict or None
        """
        root = self.rank == 0
        message, plan = None, None
        if root:
            try:
                plan = self._unpack(state_dict)
            except Exception as e:  # noqa: BLE001 - every rank must hear of it
                message = f"{type(e).__name__}: {e}"
        header = self.comm.bcast((message, None if plan is None else
                                  (plan[0], [(step, list(full)) for step, full in plan[1]])),
                                 root=0)
        if header[0] is not None:
            raise ValueError(f"{_OP}.load_state_dict: {header[0]}")
        options, slots = header[1]
        inner_state, index = {}, 0
        for s, (slot, group) in enumerate(zip(self._slots, self.optim.param_groups)):
            step, names = slots[s]
            bucket = self._buckets[slot.b]
            counts, displs = _overlap(slot.lo, slot.hi, bucket.bounds)
            pieces = group["params"]
            local = {}
            for name in names:
                buf = self._xp.empty(counts[self.rank], dtype=bucket.dtype)
                full = plan[1][s][1][name] if root else None
                self._sync()
                self.comm.Scatterv([full, counts, displs, bucket.mpi_type] if root else None,
                                   [buf, bucket.mpi_type], root=0)
                local[name] = _split_like(buf, pieces)
            for j, piece in enumerate(pieces):
                if step is None and not names:
                    continue
                entry = {name: local[name][j].reshape(piece.shape) for name in names}
                if step is not None:
                    entry.update(step)
                inner_state[index + j] = entry
            index += len(pieces)
        inner_groups = []
        start = 0
        for slot, group in zip(self._slots, self.optim.param_groups):
            n = len(group["params"])
            inner_groups.append({**options[slot.k], "params": list(range(start, start + n))})
            start += n
        before = self.optim.state_dict()
        error = None
        try:
            self.optim.load_state_dict({"state": inner_state, "param_groups": inner_groups})
        except Exception as e:  # noqa: BLE001 - every rank must hear of it
            error = f"{type(e).__name__}: {e}"
        errors = self.comm.allgather(error)
        failed = next((e for e in errors if e is not None), None)
        if failed is not None:
            if error is None:
                self.optim.load_state_dict(before)
            raise ValueError(f"{_OP}.load_state_dict: {failed}")
        for group, opts in zip(self.param_groups, options):
            group.update(opts)

    def _unpack(self, state_dict):
        """Rank 0: check `state_dict` against the layout and flatten it per slot."""
        groups = state_dict["param_groups"]
        if len(groups) != len(self.param_groups):
            raise ValueError(f"loaded state dict has {len(groups)} parameter groups, the "
                             f"optimizer has {len(self.param_groups)}")
        where, start = {}, 0
        options = []
        for k, (saved, mine) in enumerate(zip(groups, self.param_groups)):
            n = len(mine["params"])
            if len(saved["params"]) != n:
                raise ValueError(f"loaded state dict's group {k} has {len(saved['params'])} "
                                 f"params, the optimizer's has {n}")
            for j, key in enumerate(saved["params"]):
                where[key] = start + j
            start += n
            options.append({key: v for key, v in saved.items() if key != "params"})
        state = {}
        for key, value in state_dict["state"].items():
            if key not in where:
                raise ValueError(f"loaded state dict has state for unknown param {key!r}")
            state[where[key]] = value
        xp = self._xp
        scalars = self.optim.spec.scalars
        slots = []
        for slot in self._slots:
            bucket = self._buckets[slot.b]
            members = [i for i in bucket.members if self._group_of[i] == slot.k]
            have = [i for i in members if state.get(i)]
            if not have:
                slots.append((None, {}))
                continue
            if len(have) != len(members):
                raise ValueError(f"loaded state of group {slot.k} covers some of its params "
                                 f"only (params {have[:3]}...); the shards need all or none")
            names = sorted(name for name in state[have[0]] if name not in scalars)
            step = {}  # the group's per-param scalars: one value each, as the shards keep
            for name in scalars:
                values = {None if state[i].get(name) is None else float(state[i][name])
                          for i in members}
                if len(values) > 1:
                    what = "step counts" if name == "step" else f"values of {name}"
                    raise ValueError(f"loaded state of group {slot.k} has different {what} "
                                     f"{sorted(values, key=str)}; the shards keep one per group")
                value = values.pop()
                if value is not None:
                    step[name] = value
            step = step or None
            full = {}
            for name in names:
                parts = []
                for i in members:
                    value = state[i].get(name)
                    p = self._params[i]
                    if value is None:
                        raise ValueError(f"loaded state of param {i} has no {name!r}")
                    if tuple(getattr(value, "shape", ())) != tuple(p.shape):
                        raise ValueError(f"loaded {name} of param {i} has shape "
                                         f"{tuple(getattr(value, 'shape', ()))}, the param has "
                                         f"{tuple(p.shape)}")
                    if getattr(value, "dtype", None) != p.dtype:
                        raise ValueError(f"loaded {name} of param {i} has dtype "
                                         f"{getattr(value, 'dtype', None)}, the param has "
                                         f"{p.dtype}")
                    parts.append(xp.asarray(value).reshape(-1))
                full[name] = xp.ascontiguousarray(xp.concatenate(parts)) if parts else \
                    xp.empty(0, dtype=bucket.dtype)
            slots.append((step, full))
        return options, slots

    def __repr__(self) -> str:
        return (f"{_OP}({type(self.optim).__name__}, rank {self.rank} of {self.world_size}: "
                f"{sum(b.hi - b.lo for b in self._buckets)} of "
                f"{sum(b.n for b in self._buckets)} elements)")


class _Slot:
    """One group of the inner optimizer: param group k of bucket b, whose elements are
    [lo, hi) of the bucket's flat layout; `grads` are the views of the reduced shard
    that the inner optimizer reads for it."""

    __slots__ = ("b", "k", "lo", "hi", "grads")

    def __init__(self, b, k, lo, hi, grads):
        self.b, self.k, self.lo, self.hi, self.grads = b, k, lo, hi, grads


def _split_like(flat, pieces):
    """Views of `flat` with the sizes of `pieces`, in order."""
    out, start = [], 0
    for piece in pieces:
        out.append(flat[start:start + piece.size])
        start += piece.size
    return out


def _gather_into(out, pieces):
    """Copy `pieces` one after the other into `out`."""
    start = 0
    for piece in pieces:
        out[start:start + piece.size] = piece
        start += piece.size


def _compare(signatures):
    """A message naming the first difference between rank 0's params and another's."""
    shapes0, sizes0, options0 = signatures[0]
    for r, (shapes, sizes, options) in enumerate(signatures[1:], 1):
        if sizes != sizes0:
            return (f"rank {r} has param groups of {sizes} params, rank 0 of {sizes0}")
        for i, (a, b) in enumerate(zip(shapes, shapes0)):
            if a != b:
                return (f"params[{i}] has shape {a[0]} and dtype {np.dtype(a[1])} on rank {r}, "
                        f"shape {b[0]} and dtype {np.dtype(b[1])} on rank 0")
        if options != options0:
            k = next(k for k, (a, b) in enumerate(zip(options, options0)) if a != b)
            return f"param group {k} has options {options[k]} on rank {r}, {options0[k]} on rank 0"
    return None
