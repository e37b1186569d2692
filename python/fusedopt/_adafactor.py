"""Adafactor's step (torch.optim.Adafactor) over the factored drivers: `fusedopt._cpu` /
`fusedopt._cuda` ``step_factored`` (csrc/cpu/factored.h, csrc/cuda/factored.cuh) run the
whole step of every tensor of a call in three passes over its elements.

The functional op takes, per param, its row and column factors (matrices: the last two
dimensions of a tensor with two or more, factors of shapes ``(*batch, m, 1)`` and
``(*batch, 1, n)``, torch's) or its full second moment (vectors and 0-d tensors); the
lists hold None where a param has no such buffer.
"""

from __future__ import annotations

import math

import numpy as np

from . import _arrays, _backend, _ema, _foreign, _precision
from .algorithms import pack

#: torch.finfo(dtype).eps of the kernels' dtype codes
_MACHINE_EPS = {0: float(np.finfo(np.float32).eps), 1: float(np.finfo(np.float64).eps),
                2: float(np.finfo(np.float16).eps), 3: 2.0 ** -7}
_UNSUPPORTED = ("master_params", "kahan_buffers", "stochastic_rounding", "l1")


class AdafactorPlan:
    """A validated Adafactor step, not yet run (`_engine.Plan`'s counterpart)."""

    def __init__(self, op, prep, groups, hyper, step, options, stream, params, grads, keep,
                 ema_plan):
        self.op, self.prep, self.groups, self.hyper, self.step = op, prep, groups, hyper, step
        self.options, self.stream, self.params, self.grads = options, stream, params, grads
        self.keep, self.ema_plan = keep, ema_plan

    def sumsq(self):
        return _precision.sumsq(self.prep.groups) if self.prep.groups else 0.0

    def grads_finite(self):
        return all(bool(np.isfinite(np.asarray(g)).all()) for g in self.grads)

    def run(self, grad_scale=None, scale_ptr=0):
        if scale_ptr:
            raise ValueError(f"{self.op}: gradient checks on the device are not supported for "
                             "Adafactor; check on the host or leave them out")
        opts = self.options
        if grad_scale is None:
            grad_scale = 1.0 / opts.loss_scale if opts.loss_scale is not None else 1.0
        device = self.prep.device
        backend = _backend.for_device(self.op, device)
        for dtype, state_dtype, ptrs, shapes in self.groups:
            if device == _arrays.CPU:
                _backend._cpu.step_factored("adafactor", dtype, ptrs, shapes, self.hyper,
                                            state_dtype=state_dtype, grad_scale=grad_scale,
                                            step=self.step)
            else:
                stream = backend.stream_of(self.stream, self.params, device)
                backend.module.step_factored("adafactor", dtype, ptrs, shapes, self.hyper,
                                             stream, state_dtype=state_dtype,
                                             grad_scale=grad_scale, step=self.step)
        if self.ema_plan is not None:  # the averages move in a pass of their own
            self.ema_plan.run()

    def execute(self):
        return _precision.execute_on_host(self, "Adafactor")


def plan(spec, kw, params, grads, states, options, stream, op):
    """The validated Adafactor step (`_engine.plan`'s entry for the spec)."""
    for name in _UNSUPPORTED:
        if getattr(options, name) not in (None, False, 0.0):
            raise ValueError(f"{op}: {name} is not supported for Adafactor")
    prep = _arrays.prepare(op, params, grads, [], [], stream)
    n = len(params)
    row_vars, col_vars, variances = (list(s) if s is not None else None for s in states)
    names = ("row_vars", "col_vars", "variances")
    for name, seq in zip(names, (row_vars, col_vars, variances)):
        if seq is not None and len(seq) != n:
            raise ValueError(f"{op}: got {len(seq)} {name} for {n} params")
    keep = [prep.keep]
    R = np.zeros((5, n, _arrays.NCOLS), dtype=np.int64)  # params, grads, rows, cols, vars
    if n:  # as checked (a strided gradient: its contiguous copy, which prep keeps)
        R[:2] = prep.rows
    known = _arrays.kernel_dtypes()
    codes = np.array([known.get(int(t), -1) for t in R[0][:, _arrays.TYPENUM]], dtype=np.int64)
    scodes = np.where(codes < 2, codes, 0)
    batch_rows_cols = np.zeros((n, 3), dtype=np.int64)
    device = prep.device
    for i, p in enumerate(params):
        shape = tuple(p.shape)
        matrix = len(shape) > 1
        need = ("row_vars", "col_vars") if matrix else ("variances",)
        if matrix:
            batch_rows_cols[i] = (math.prod(shape[:-2]), shape[-2], shape[-1])
        else:
            batch_rows_cols[i] = (1, 0, math.prod(shape))
        stype = None
        for k, (name, seq) in enumerate(zip(names, (row_vars, col_vars, variances))):
            state = "row_var" if k == 0 else "col_var" if k == 1 else "variance"
            want = spec.state_shape(state, shape)
            buf = seq[i] if seq is not None else None
            if name not in need:
                continue
            if buf is None:
                raise ValueError(f"{op}: params[{i}] with shape {shape} needs {name}[{i}] (of "
                                 f"shape {want})")
            if tuple(getattr(buf, "shape", ())) != want:
                raise ValueError(f"{op}: {name}[{i}] has shape "
                                 f"{tuple(getattr(buf, 'shape', ()))}, params[{i}] with shape "
                                 f"{shape} needs {want}")
            row, holder = _foreign.describe(op, f"{name}[{i}]", buf)
            if holder is not None:
                keep.append(holder)
            R[2 + k, i] = row
            t = int(row[_arrays.TYPENUM])
            ok = t == int(R[0][i, _arrays.TYPENUM]) if codes[i] < 2 else \
                known.get(t) in (0, 3)
            if not ok or (stype is not None and t != stype):
                raise TypeError(f"{op}: {name}[{i}] has dtype {getattr(buf, 'dtype', '?')}, "
                                f"params[{i}] has {getattr(p, 'dtype', '?')}")
            stype = t
            scodes[i] = known[t]
            if row[_arrays.DEVICE] != device:
                raise TypeError(f"{op}: {name}[{i}] is not on the device of params[{i}]")
            flags = int(row[_arrays.FLAGS])
            if not flags & _arrays.F_CONTIG:
                raise ValueError(f"{op}: {name}[{i}] is not C-contiguous; it is updated in "
                                 "place, so an update of a copy would be lost")
            if not flags & _arrays.F_WRITEABLE:
                raise ValueError(_foreign.readonly_message(op, f"{name}[{i}]", buf))
    seqs = [params, grads, *(seq or [] for seq in (row_vars, col_vars, variances))]
    _check_overlap(op, ["params", "grads", *names], seqs, R)
    ema_plan = None
    if options.ema is not None:
        ema_plan = _ema.plan(options.ema, params, options.ema_decay, op=op, stream=stream)
    eps1 = kw.get("eps1")
    if eps1 is None and n:  # torch: the machine epsilon of the first param's dtype
        eps1 = _MACHINE_EPS.get(int(codes[0]), 0.0)
    hyper = pack("adafactor", spec.hyper(dict(kw, eps1=0.0 if eps1 is None else eps1)))
    # one table per (param dtype, state dtype): param, grad, row factors or the vector's
    # moment, column factors (0 for vectors)
    ptrs = R[:, :, _arrays.PTR].astype(np.uint64)
    slots = np.stack([ptrs[0], ptrs[1], np.where(batch_rows_cols[:, 1] > 0, ptrs[2], ptrs[4]),
                      ptrs[3]])
    groups = []
    key = codes * 4 + scodes
    for k in np.unique(key) if n else []:
        sel = np.flatnonzero(key == k)
        groups.append((int(k // 4), int(k % 4), np.ascontiguousarray(slots[:, sel]).ravel(),
                       np.ascontiguousarray(batch_rows_cols[sel]).ravel()))
    return AdafactorPlan(op, prep, groups, hyper, float(kw.get("step", 1)), options, stream,
                         params, grads, keep, ema_plan)


def _check_overlap(op, names, seqs, R):
    """ValueError (`_arrays._error`'s message) when two arrays the step writes overlap,
    or a gradient and one of them: the checks of csrc/tables.h take buffers of the
    params' shapes, the factors are not (the rest of the call's checks are above)."""
    k, i = np.nonzero(R[:, :, _arrays.SIZE] > 0)
    start = R[k, i, _arrays.PTR]
    end = start + R[k, i, _arrays.SIZE] * R[k, i, _arrays.ITEMSIZE]
    w = k != 1  # every list but the gradients is written
    order = np.argsort(start[w], kind="stable")
    ws, we, wk, wi = start[w][order], end[w][order], k[w][order], i[w][order]
    # written arrays sorted by start: an overlap shows between neighbours
    bad = np.flatnonzero(ws[1:] < we[:-1])
    if bad.size:
        j = int(bad[0])
        raise _arrays._error(op, names, seqs, R, (_arrays._OVERLAP, int(wk[j]), int(wi[j]),
                                                  int(wk[j + 1]), int(wi[j + 1])))
    # a gradient can only meet the written array with the largest start below its end
    at = np.searchsorted(ws, end[~w], side="left") - 1
    hit = np.flatnonzero((at >= 0) & (we[np.maximum(at, 0)] > start[~w]))
    if hit.size:
        g, j = int(hit[0]), int(at[hit[0]])
        raise _arrays._error(op, names, seqs, R, (_arrays._OVERLAP, int(wk[j]), int(wi[j]), 1,
                                                  int(i[~w][g])))
