"""In-place, multi-tensor optimizer steps: one kernel call per (device, dtype) per step.

Each function updates `params` and the state lists in place. Every op also takes the
mixed-precision keywords (see `_precision`): `master_params` (float32 master weights of
16-bit params, updated with them in the same pass) or `kahan_buffers` (compensation
buffers of the params' dtype), `stochastic_rounding` and `seed` (the 16-bit write-back),
`loss_scale` (gradients are divided by it), `max_grad_norm` (global-norm clipping) and
`skip_nonfinite` (a step whose gradients hold inf or NaN changes nothing), and `l1`
(L1 regularization as a proximal soft-threshold step of lr * l1 after the update, in
the same pass). With
`max_grad_norm` or `skip_nonfinite` an op returns a StepInfo(skipped, grad_norm);
otherwise None. On a GPU it returns a DeviceStepInfo instead: the checks and the skip
stay on the device, and only reading the info waits for them. There `step` may also
be a float64 array of one element on the device: the op adds 1 to it unless the step
is skipped, and the per-step scalars and the rounding stream come from that count.
Hyperparameters are plain Python numbers; per-step scalars (bias corrections,
decayed rates) are computed here, once per call, in double precision. The
equations are torch.optim's (DESIGN.md section 3).
"""

from __future__ import annotations


import numpy as np

from . import _arrays, _backend, _cpu, _foreign, _precision

__all__ = ["sgd_", "adagrad_", "rmsprop_", "adadelta_", "adam_", "adamw_", "axpy_", "dot"]


class Plan:
    """A validated step, not yet run: the optimizer classes validate every group of a
    step before running any, so that a bad input anywhere writes nothing."""

    __slots__ = ("op", "kernel", "prep", "hyper", "stream", "params", "grads", "step",
                 "options", "step_ptr")

    def __init__(self, op, kernel, prep, hyper, stream, params, grads, step, options,
                 step_ptr=0):
        self.op, self.kernel, self.prep = op, kernel, prep
        self.hyper, self.stream, self.params, self.grads = hyper, stream, params, grads
        self.step, self.options = step, options
        self.step_ptr = step_ptr  # device address of a float64 step count, or 0

    def sumsq(self):
        """Sum of squares of this step's raw gradients, in double (CPU)."""
        return _precision.sumsq(self.prep.groups) if self.prep.groups else 0.0

    def grads_finite(self):
        """Whether every gradient element is finite (the rare check behind an infinite
        sum of squares; CPU)."""
        return all(bool(np.isfinite(np.asarray(g)).all()) for g in self.grads)

    def backend(self):
        return _backend.for_device(self.op, self.prep.device)

    def cuda_stream(self):
        """The stream this plan's kernels run on (GPU)."""
        return self.backend().stream_of(self.stream, self.params, self.prep.device)

    def run(self, grad_scale=None, scale_ptr=0):
        """Run the kernels; `grad_scale` multiplies the gradients (default: 1 / loss_scale).
        On the GPU, `scale_ptr` is the device {skip, coef, norm} of a checked step."""
        if not self.prep.groups:
            return
        opts = self.options
        if grad_scale is None:
            grad_scale = 1.0 / opts.loss_scale if opts.loss_scale is not None else 1.0
        mode = {"grad_scale": grad_scale, "step": self.step}
        if opts.l1:
            # the proximal step of lr * l1 after the update (hyper[0] is every rule's lr)
            mode["l1"] = float(self.hyper[0]) * opts.l1
        if opts.stochastic_rounding:
            mode["stochastic"] = True
            # with the count on the device, the kernels derive the stream from the seed
            mode["key"] = opts.seed & _precision._MASK if self.step_ptr else \
                _precision.rounding_key(opts.seed, self.step)
        backend = self.backend()
        if self.prep.device != _arrays.CPU:
            mode["stream"] = self.cuda_stream()
            if scale_ptr:
                mode["scale_ptr"] = scale_ptr
            if self.step_ptr:
                backend.module.advance_step(self.step_ptr, scale_ptr, mode["stream"])
                mode["step_ptr"] = self.step_ptr
        for (dtype, ptrs, sizes), layout in zip(self.prep.groups, self.prep.layouts):
            backend.step(self.kernel, dtype, ptrs, sizes, self.hyper, **mode, **layout)

    def execute(self):
        """Run with the gradient checks the options ask for; a StepInfo when there were any
        (a DeviceStepInfo on the GPU: the checks stay on the device)."""
        if not self.options.checks_grads:
            self.run()
            return None
        if self.prep.device != _arrays.CPU:
            info = device_checks([self], self.options)
            self.run(1.0, info.stats.ptr)  # coef on the device includes 1 / loss_scale
            return info
        skip, coef, norm = _precision.grad_multiplier(*_precision.total_sumsq([self]),
                                                      self.options)
        if not skip:
            self.run(coef)
        return _precision.StepInfo(skip, norm)


def device_checks(plans, options):
    """Enqueue one pass over the gradients of every plan (GPU, one device) that writes
    {skip, coef, norm} to device memory; the plans then run with scale_ptr set to it, so
    neither the skip nor the clip coefficient travels through the host."""
    live = [p for p in plans if p.prep.groups]
    first = live[0] if live else plans[0]
    backend = first.backend()
    stream = first.cuda_stream() if live else 0
    # zeroed on the step's stream, from a pool (no allocation that waits for the device)
    stats = backend.module.DeviceScalars(3, first.prep.device - 1, stream)
    tables = [(dtype, ptrs[sizes.size:2 * sizes.size], sizes)
              for p in live for dtype, ptrs, sizes in p.prep.groups]
    inv = 1.0 / options.loss_scale if options.loss_scale is not None else 1.0
    max_norm = options.max_grad_norm if options.max_grad_norm is not None else -1.0
    backend.module.grad_stats(tables, stream, stats.ptr, inv_scale=inv, max_norm=max_norm,
                              skip_nonfinite=options.skip_nonfinite)
    info = _precision.DeviceStepInfo(stats, stream)
    info.fetch()  # the copy to the host waits for this pass only, not for the update
    return info


def _run(op, kernel, params, grads, states, state_names, hyper, stream, defer, step=1,
         precision=None):
    precision = dict(precision or {})
    rows = precision.pop("_rows", None)  # kept description rows (fusedopt.torch)
    options = _precision.Options(op, precision)
    prep = _arrays.prepare(op, params, grads, states, state_names, stream, extra=options.extra,
                           rows=rows)
    prep.keep.append((states, options.extra))  # a deferred plan's tables point into them
    step_ptr = 0
    if not isinstance(step, (int, float, np.number)):
        step_ptr = _device_count(op, step, prep)
        prep.keep.append(step)
        step = 1.0
    plan = Plan(op, kernel, prep, np.asarray(hyper, dtype=np.float64), stream, params, grads,
                float(step), options, step_ptr)
    if defer:
        return plan
    return plan.execute()


def _device_count(op, step, prep):
    """The device address of a step counter given as a float64 GPU array of one element."""
    row, _ = _foreign.describe(op, "step", step)
    if row[_arrays.DEVICE] == _arrays.CPU:
        raise TypeError(f"{op}: step must be a number, or a float64 array of one element on "
                        f"the arrays' GPU; got {type(step).__name__} in host memory")
    if row[_arrays.TYPENUM] != _arrays.F64 or row[_arrays.SIZE] != 1:
        raise TypeError(f"{op}: a step counter on the device must be a float64 array of one "
                        f"element, got {getattr(step, 'dtype', '?')} with "
                        f"{int(row[_arrays.SIZE])} elements")
    if not row[_arrays.FLAGS] & _arrays.F_WRITEABLE:
        raise ValueError(f"{op}: the step counter is read-only; the step adds 1 to it")
    if prep.groups and row[_arrays.DEVICE] != prep.device:
        raise TypeError(f"{op}: the step counter is on {_arrays._device_name(int(row[7]))}, "
                        f"the arrays on {_arrays._device_name(prep.device)}")
    return int(row[_arrays.PTR])


def _check_step(op, step):
    if not isinstance(step, (int, float, np.number)):
        return  # a counter on the device: checked with the arrays
    if not step >= 1:
        raise ValueError(f"{op}: step must be >= 1 (the count after this update), got {step}")


def sgd_(params, grads, momentum_buffers=None, *, lr, momentum=0.0, dampening=0.0,
         weight_decay=0.0, nesterov=False, maximize=False, first_step=False, stream=None, _defer=False, **precision):
    """SGD; with momentum, `first_step=True` sets the buffers to the gradient (torch's
    "buffer is None" case) whatever they held."""
    if momentum != 0.0:
        kernel, states = "sgd_momentum", [momentum_buffers]
    else:
        kernel, states = "sgd", []
    hyper = [lr, momentum, dampening, weight_decay, nesterov, maximize, first_step]
    return _run("sgd_", kernel, params, grads, states, ["momentum_buffers"][: len(states)], hyper, stream, _defer, precision=precision)


def adagrad_(params, grads, state_sums, *, step, lr, lr_decay=0.0, weight_decay=0.0, eps=1e-10,
             maximize=False, stream=None, _defer=False, **precision):
    _check_step("adagrad_", step)
    return _run("adagrad_", "adagrad", params, grads, [state_sums], ["state_sums"],
                [lr, lr_decay, eps, weight_decay, maximize, 0.0], stream, _defer, step, precision)


def rmsprop_(params, grads, square_avgs, momentum_buffers=None, grad_avgs=None, *, lr, alpha, eps,
             weight_decay=0.0, momentum=0.0, centered=False, maximize=False, stream=None, _defer=False, **precision):
    states, names = [square_avgs], ["square_avgs"]
    kernel = "rmsprop"
    if centered:
        kernel += "_centered"
    if momentum != 0.0:
        kernel += "_momentum"
        states.append(momentum_buffers)
        names.append("momentum_buffers")
    if centered:
        states.append(grad_avgs)
        names.append("grad_avgs")
    return _run("rmsprop_", kernel, params, grads, states, names,
         [lr, alpha, eps, weight_decay, momentum, maximize], stream, _defer, precision=precision)


def adadelta_(params, grads, square_avgs, acc_deltas, *, lr, rho, eps, weight_decay=0.0,
              maximize=False, stream=None, _defer=False, **precision):
    return _run("adadelta_", "adadelta", params, grads, [square_avgs, acc_deltas],
         ["square_avgs", "acc_deltas"], [lr, rho, eps, weight_decay, maximize], stream, _defer, precision=precision)


def adam_(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs=None, *, step, lr, beta1, beta2,
          eps, weight_decay=0.0, amsgrad=False, maximize=False, decoupled_weight_decay=False,
          stream=None, _op="adam_", _defer=False, **precision):
    _check_step(_op, step)
    states, names = [exp_avgs, exp_avg_sqs], ["exp_avgs", "exp_avg_sqs"]
    if amsgrad:
        states.append(max_exp_avg_sqs)
        names.append("max_exp_avg_sqs")
    if decoupled_weight_decay:
        l2, shrink = 0.0, 1.0 - lr * weight_decay
    else:
        l2, shrink = weight_decay, 1.0
    # step_size and inv_bc2_sqrt (0 here) are filled from `step` by the rule
    hyper = [lr, beta1, beta2, eps, l2, shrink, 0.0, 0.0, maximize]
    return _run(_op, "adam_amsgrad" if amsgrad else "adam", params, grads, states, names, hyper,
                stream, _defer, step, precision)


def adamw_(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs=None, *, step, lr, beta1, beta2,
           eps, weight_decay=1e-2, amsgrad=False, maximize=False, decoupled_weight_decay=True,
           stream=None, _defer=False, **precision):
    return adam_(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, step=step, lr=lr,
                 beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad,
                 maximize=maximize, decoupled_weight_decay=decoupled_weight_decay, stream=stream,
                 _op="adamw_", _defer=_defer, **precision)


def axpy_(ys, xs, alpha, *, stream=None):
    """ys[j] += alpha * xs[j] for every j, in place (the plain SGD kernel with lr = -alpha,
    which computes exactly y + alpha * x)."""
    sgd_(ys, xs, lr=-alpha, stream=stream)


def dot(xs, ys):
    """Sum over j of the dot product of xs[j] and ys[j], accumulated in double. On the CPU
    the result is the same for every thread count (fixed blocks, summed in order)."""
    prep = _arrays.prepare("dot", xs, ys, [], [], read_only=True)
    if prep.device != _arrays.CPU:
        return float(sum(float((x.ravel() * y.ravel()).sum(dtype="float64"))
                         for x, y in zip(xs, ys)))
    return sum(_cpu.dot(dtype, ptrs, sizes) for dtype, ptrs, sizes in prep.groups)
