"""Row-sparse gradients: an embedding's gradient as (row indices, rows of values),
updated in one call that reads and writes only those rows.

A spec whose ``gradient`` is ``"rows"`` (SparseAdam) takes, for each param, a pair
``(rows, values)``: ``rows`` a 1-D integer array of indices into the param's first
dimension, ``values`` an array of shape ``(len(rows), *param.shape[1:])`` in the
param's dtype; or a torch sparse COO tensor of the param's shape. Rows that repeat are
summed first, as torch's ``coalesce`` sums them (the indices sorted, the repeats of an
index added in their order). `plan` validates every array of the call, coalesces, and
returns a `RowsPlan` whose kernels (``step_rows`` of `fusedopt._cpu` / `fusedopt._cuda`:
csrc/cpu/rows.h, csrc/cuda/rows.cuh) run the spec's elementwise rule on those rows only;
every other row of the params and of their state keeps its bits.
"""

from __future__ import annotations

import math
import sys

import numpy as np

from . import _arrays, _backend, _ema, _precision

#: the step options a row-sparse call takes (the others need every element's gradient)
SUPPORTED = ("loss_scale", "stochastic_rounding", "seed", "ema", "ema_decay")


def _module(x):
    return type(x).__module__.partition(".")[0]


def _is_torch_sparse(g):
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(g, torch.Tensor) and g.is_sparse


def split(op, grads):
    """(rows, values) lists from a list of gradients given as pairs or torch sparse COO
    tensors (coalesced by torch, whose sums they then are)."""
    rows, values = [], []
    for i, g in enumerate(grads):
        if _is_torch_sparse(g):
            g = g.coalesce()
            if g.sparse_dim() != 1:
                raise ValueError(f"{op}: grads[{i}] is sparse in {g.sparse_dim()} dimensions; "
                                 "row-sparse gradients are sparse in the first only")
            rows.append(g.indices()[0])
            values.append(g.values())
        elif isinstance(g, (tuple, list)) and len(g) == 2:
            rows.append(g[0])
            values.append(g[1])
        else:
            raise TypeError(f"{op}: grads[{i}] must be a pair (rows, values) or a torch sparse "
                            f"tensor, got {type(g).__name__}")
    return rows, values


def _coalesce_one(op, i, r, v, nrows):
    """Sorted distinct int64 indices and the sums of their rows, in r's array module."""
    kind = _module(r)
    if kind == "torch":
        import torch

        if r.dim() != 1 or r.dtype.is_floating_point or r.dtype.is_complex or \
                r.dtype == torch.bool:
            raise TypeError(f"{op}: rows[{i}] must be a 1-D integer tensor")
        if r.numel():
            lo, hi = int(r.min()), int(r.max())
            if lo < 0 or hi >= nrows:
                raise ValueError(f"{op}: rows[{i}] holds {lo if lo < 0 else hi}, outside "
                                 f"[0, {nrows})")
        r = r.to(torch.int64)
        if r.numel() < 2 or bool((r[1:] > r[:-1]).all()):
            return r.contiguous(), v
        shape = (nrows, *v.shape[1:])
        g = torch.sparse_coo_tensor(r.unsqueeze(0), v, shape).coalesce()
        return g.indices()[0].contiguous(), g.values()
    xp = np if kind != "cupy" else sys.modules["cupy"]
    if getattr(r, "ndim", None) != 1 or xp.dtype(r.dtype).kind not in "iu":
        raise TypeError(f"{op}: rows[{i}] must be a 1-D integer array, got "
                        f"{getattr(r, 'dtype', type(r).__name__)} with shape "
                        f"{getattr(r, 'shape', '?')}")
    if r.size:
        lo, hi = int(r.min()), int(r.max())
        if lo < 0 or hi >= nrows:
            raise ValueError(f"{op}: rows[{i}] holds {lo if lo < 0 else hi}, outside [0, {nrows})")
    r = xp.ascontiguousarray(r, dtype=xp.int64)
    if r.size < 2 or bool((r[1:] > r[:-1]).all()):
        return r, v
    order = xp.argsort(r, kind="stable")
    rs = r[order]
    starts = xp.flatnonzero(xp.concatenate([xp.ones(1, bool), rs[1:] != rs[:-1]]))
    ordered = v[order]
    if kind == "cupy":  # (CuPy has no reduceat: the sums in index order, per row)
        import cupyx

        index = xp.cumsum(xp.concatenate([xp.zeros(1, xp.int64),
                                          (rs[1:] != rs[:-1]).astype(xp.int64)]))
        sums = xp.zeros((starts.size, *v.shape[1:]), v.dtype)
        cupyx.scatter_add(sums, index, ordered)
    else:
        sums = np.add.reduceat(ordered, starts, axis=0)
    return rs[starts], sums


class RowsPlan:
    """A validated row-sparse step, not yet run (`_engine.Plan`'s counterpart)."""

    def __init__(self, op, kernel, device, groups, hyper, options, stream, params, grads,
                 step, keep, ema_plan):
        self.op, self.kernel, self.device, self.groups = op, kernel, device, groups
        self.hyper, self.options, self.stream = hyper, options, stream
        self.params, self.grads, self.step, self.keep = params, grads, step, keep
        self.ema_plan = ema_plan
        self.prep = _arrays.Prepared(device, [g[:3] for g in groups], [], keep)

    def run(self, grad_scale=None, scale_ptr=0):
        if scale_ptr:
            raise ValueError(f"{self.op}: device-side gradient checks are not supported with "
                             "row-sparse gradients")
        opts = self.options
        if grad_scale is None:
            grad_scale = 1.0 / opts.loss_scale if opts.loss_scale is not None else 1.0
        mode = {"grad_scale": grad_scale, "step": self.step}
        if opts.stochastic_rounding:
            mode["stochastic"] = True
            mode["key"] = _precision.rounding_key(opts.seed, self.step)
        if self.groups:
            backend = _backend.for_device(self.op, self.device)
            for dtype, ptrs, counts, state_dtype, rows, row_len in self.groups:
                args = (self.kernel, dtype, ptrs, rows, counts, row_len, self.hyper)
                if self.device == _arrays.CPU:
                    _backend._cpu.step_rows(*args, state_dtype=state_dtype, **mode)
                else:
                    stream = backend.stream_of(self.stream, self.params, self.device)
                    backend.module.step_rows(*args, stream, state_dtype=state_dtype, **mode)
        if self.ema_plan is not None:  # every row of the averages moves: a pass of its own
            self.ema_plan.run()

    def execute(self):
        self.run()
        return None

    def sumsq(self):
        raise ValueError(f"{self.op}: gradient checks are not supported with row-sparse "
                         "gradients")


def plan(spec, kw, hyper, kernel, params, grads, states, names, options, stream=None, op=None):
    """The validated row-sparse step of `spec` (see the module docstring); `grads` holds
    (rows, values) pairs or torch sparse tensors."""
    op = op or spec.op_name
    for name in _precision.OPTIONS:
        if name not in SUPPORTED and getattr(options, name) not in (None, False, 0, 0.0):
            raise ValueError(f"{op}: {name} is not supported with row-sparse gradients")
    if not isinstance(params, (list, tuple)):
        raise TypeError(f"{op}: params must be a list or tuple of arrays, got "
                        f"{type(params).__name__}")
    n = len(params)
    if not isinstance(grads, (list, tuple)):
        raise TypeError(f"{op}: grads must be a list, got {type(grads).__name__}")
    rows, values = split(op, grads)
    if len(rows) != n:
        raise ValueError(f"{op}: got {len(rows)} grads for {n} params")
    for name, seq in zip(names, states):
        _arrays._check_list(op, name, seq, n)
    keep = []
    # the gradients: checked against their params' shapes and dtypes, then coalesced
    coalesced = []
    for i, (p, r, v) in enumerate(zip(params, rows, values)):
        for name, x in (("rows", r), ("values", v)):
            if not (hasattr(x, "shape") and hasattr(x, "dtype")):
                raise TypeError(f"{op}: {name}[{i}] is not an array, got {type(x).__name__}")
        if r.ndim != 1:  # (before the values' shape, which follows from the rows' count)
            raise TypeError(f"{op}: rows[{i}] must be a 1-D integer array, got shape "
                            f"{tuple(r.shape)}")
        shape = tuple(getattr(p, "shape", ()))
        if not shape:
            raise ValueError(f"{op}: params[{i}] is 0-d; row-sparse gradients need rows")
        vshape = tuple(getattr(v, "shape", ()))
        if len(vshape) != len(shape) or vshape[1:] != shape[1:] or \
                vshape[0] != (r.shape[0] if getattr(r, "ndim", 1) == 1 else -1):
            raise ValueError(f"{op}: values[{i}] has shape {vshape}; for {len(r)} rows of "
                             f"params[{i}] with shape {shape} it must be "
                             f"{(len(r), *shape[1:])}")
        if getattr(v, "dtype", None) != getattr(p, "dtype", None):
            raise TypeError(f"{op}: values[{i}] has dtype {getattr(v, 'dtype', '?')}, "
                            f"params[{i}] has {getattr(p, 'dtype', '?')}")
        coalesced.append((*_coalesce_one(op, i, r, v, shape[0]), math.prod(shape[1:])))
    keep.append(coalesced)
    # every array of the call, the values in the gradients' place, through the one
    # description path and the one set of checks (csrc/tables.h)
    seqs = [params, [c[1] for c in coalesced], *states]
    lnames = ["params", "values", *names]
    if n == 0:
        return RowsPlan(op, kernel, _arrays.CPU, [], hyper, options, stream, params, grads,
                        float(kw.get("step", 1)), keep, None)
    R, strided = _arrays._describe_lists(op, seqs, lnames, n, keep, stream, params)
    device = int(R[0, 0, _arrays.DEVICE])
    if strided and not (R[1, :, _arrays.FLAGS] & _arrays.F_CONTIG).all():
        sub = R[1:2]
        _arrays._copy_strided(op, seqs[1:2], lnames[1:2], sub, device, keep, stream, params)
        R[1:2] = sub
    tables = _arrays._cpu.Tables(R, len(states), 0, False, _arrays._bf16_num(), row_grads=True)
    if tables.issue is not None:
        raise _arrays._error(op, lnames, seqs, R, tables.issue)
    # the kernels read the row indices where the params are
    indices = [c[0] for c in coalesced]
    rrows, kept = _arrays.describe_list(op, "rows", indices, stream, params)
    keep += kept
    bad = np.flatnonzero(rrows[:, _arrays.DEVICE] != device)
    if bad.size:
        raise _arrays._error(op, lnames + ["rows"], seqs + [indices],
                             np.concatenate([R, rrows[None]]),
                             (_arrays._DEVICE, len(lnames), int(bad[0]), 0, 0))
    ema_plan = None
    if options.ema is not None:
        ema_plan = _ema.plan(options.ema, params, options.ema_decay, op=op, stream=stream)
    # one table per (param dtype, state dtype), as laid out by the checks
    groups = []
    for (code, scode, ptrs, _), sel in zip(tables.groups(), tables.group_tensors()):
        rows_ptrs = np.array([_address(coalesced[i][0]) for i in sel], dtype=np.uint64)
        counts = np.array([len(coalesced[i][0]) for i in sel], dtype=np.int64)
        row_len = np.array([coalesced[i][2] for i in sel], dtype=np.int64)
        groups.append((code, ptrs, counts, scode, rows_ptrs, row_len))
    keep.append(tables)  # the groups' pointer tables view its memory
    step = float(kw.get("step", 1))
    return RowsPlan(op, kernel, device, groups, hyper, options, stream, params, grads, step,
                    keep, ema_plan)


def _address(a):
    """The address of a contiguous int64 array (NumPy, CuPy, torch)."""
    kind = _module(a)
    if kind == "numpy":
        return a.ctypes.data
    if kind == "torch":
        return a.data_ptr()
    return a.data.ptr
