"""The CUDA backend, fusedopt._cuda.

The module itself is checked everywhere it was built (import, device count and
the validation of a call need no GPU). Kernel results are checked against the CPU
module on the same inputs: the CPU kernels are tested against the float64
references elsewhere, so parity with them is the check here. Both builds round
every operation the same way (no FMA contraction on either side) and draw the
same random bits for stochastic rounding, so the results agree bit for bit: the
layout, stochastic-rounding and per-tensor tests hold the build to that; the
float32/float64 tests allow a relative error of 1e-6 (float32) or 1e-12 (float64).
float16 and bfloat16 arrays are passed as their uint16 bit patterns.

GPU tests need CuPy and a device, and skip with the reason otherwise. CI sets
FUSEDOPT_REQUIRE_CUDA=1, which turns a missing module into a failure.
"""
import importlib.util
import math
import os

import numpy as np
import pytest

from fusedopt.algorithms import pack

SIZES = (0, 1, 7, 4097, 278011)
RTOL = {np.float32: 1e-6, np.float64: 1e-12}
DTYPE_CODE = {np.float32: 0, np.float64: 1}
FLOAT32, FLOAT64, FLOAT16, BFLOAT16 = 0, 1, 2, 3  # storage dtype codes


def _cuda_built():
    try:
        return importlib.util.find_spec("fusedopt._cuda") is not None
    except ModuleNotFoundError:
        return False


def _hyper(kernel, **fields):
    """hyper(t) of a kernel: its Hyper packed by field name (a field given as a function
    of t is evaluated per step); the fields a rule fills from the step count (at_step)
    are left 0."""
    def hyper(t):
        return list(pack(kernel, {k: v(t) if callable(v) else v for k, v in fields.items()}))
    return hyper


def _sgd(kernel, lr=0.1, momentum=0.0, dampening=0.0, wd=0.0, nesterov=False, maximize=False):
    return (kernel, 1 if kernel == "sgd_momentum" else 0,
            _hyper(kernel, lr=lr, momentum=momentum, dampening=dampening, weight_decay=wd,
                   nesterov=nesterov, maximize=maximize, first_step=lambda t: t == 1))


def _rmsprop(kernel, states, alpha=0.99, wd=0.01, momentum=0.0, maximize=False):
    return (kernel, states, _hyper(kernel, lr=0.01, alpha=alpha, eps=1e-8, weight_decay=wd,
                                   momentum=momentum, maximize=maximize))


def _adam(amsgrad=False, decoupled=False, maximize=False, lr=1e-2, b1=0.9, b2=0.999, wd=0.05):
    kernel = "adam_amsgrad" if amsgrad else "adam"
    return (kernel, 3 if amsgrad else 2,
            _hyper(kernel, lr=lr, beta1=b1, beta2=b2, eps=1e-8, l2=0.0 if decoupled else wd,
                   shrink=1.0 - lr * wd if decoupled else 1.0, maximize=maximize))


# (kernel, state count, hyper(t)): each kernel's Hyper, by field name.
CASES = {
    "sgd": _sgd("sgd", wd=0.01),
    "sgd_maximize": _sgd("sgd", maximize=True),
    "sgd_momentum": _sgd("sgd_momentum", momentum=0.9, dampening=0.1, wd=0.01),
    "sgd_nesterov": _sgd("sgd_momentum", momentum=0.9, nesterov=True),
    "adagrad": ("adagrad", 1, _hyper("adagrad", lr=0.1, lr_decay=0.01, eps=1e-10,
                                     weight_decay=0.01, maximize=False)),
    "rmsprop": _rmsprop("rmsprop", 1),
    "rmsprop_momentum": _rmsprop("rmsprop_momentum", 2, wd=0.0, momentum=0.9),
    "rmsprop_centered": _rmsprop("rmsprop_centered", 2, alpha=0.9, maximize=True),
    "rmsprop_centered_momentum": _rmsprop("rmsprop_centered_momentum", 3, alpha=0.9,
                                          momentum=0.9),
    "adadelta": ("adadelta", 2, _hyper("adadelta", lr=1.0, rho=0.9, eps=1e-6,
                                       weight_decay=0.01, maximize=False)),
    "adam": _adam(),
    "adamw": _adam(decoupled=True),
    "adam_maximize": _adam(maximize=True),
    "adam_amsgrad": _adam(amsgrad=True),
    "adamw_amsgrad": _adam(amsgrad=True, decoupled=True),
    **{f"stream{k}": (f"stream{k}", k, _hyper(f"stream{k}", scale=0.5)) for k in range(4)},
    "lion": ("lion", 1, _hyper("lion", lr=1e-2, beta1=0.9, beta2=0.99, weight_decay=0.1,
                               maximize=False)),
    "lion_maximize": ("lion", 1, _hyper("lion", lr=1e-2, beta1=0.5, beta2=0.9,
                                        weight_decay=0.0, maximize=True)),
    "lamb": ("lamb", 2, _hyper("lamb", lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-6,
                               weight_decay=0.05)),
    "lars": ("lars", 0, _hyper("lars", lr=1.0, momentum=0.0, weight_decay=0.01,
                               trust_coefficient=0.01, eps=0.0, nesterov=False)),
    "lars_nesterov": ("lars_momentum", 1, _hyper("lars_momentum", lr=0.5, momentum=0.9,
                                                 weight_decay=0.0, trust_coefficient=0.02,
                                                 eps=1e-3, nesterov=True)),
    "adamw_schedulefree": ("adamw_schedulefree", 2, _hyper(
        "adamw_schedulefree", lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01,
        ckp1=lambda t: 1.0 / t, y_coef=lambda t: 1e-2 * (0.9 * (1.0 - 1.0 / t) - 1.0))),
}
# Kernels with a first pass of per-tensor sums (LAMB, LARS): the GPU adds the terms in
# another order than the CPU, so their trust ratios agree to rounding, not bit for bit.
TWO_PASS = {name for name, (kernel, _, _) in CASES.items() if kernel.startswith(("lamb", "lars"))}


def _table_case(c):
    """(kernel, state count, hyper(t)) of a case of the case table (tests/cases.py): its
    op keywords of step t through the spec, packed by field name."""
    spec = c.algo.spec
    kw = c.op_kwargs(1)
    kernel = spec.kernel(kw)

    def hyper(t):
        kw_t = c.op_kwargs(t)
        assert spec.kernel(kw_t) == kernel
        return list(pack(kernel, spec.hyper(kw_t)))

    return kernel, len(spec.active(kw)), hyper


def _table_cases():
    """Every case of the case table, named "table-<case id>": an algorithm's rows there
    bring its kernels here."""
    from cases import CASES as TABLE
    return {f"table-{c.id}": _table_case(c) for c in TABLE}


CASES.update(_table_cases())

# Storage layouts (param dtype, state dtype, extra buffer: 0 none, 1 float32 master
# weights, 2 Kahan compensation), as fusedopt._cpu.step takes them.
LAYOUTS = {
    "float32": (FLOAT32, FLOAT32, 0),
    "float64": (FLOAT64, FLOAT64, 0),
    **{f"{p}/{s}{x}": (pc, sc, xc)
       for p, pc in (("float16", FLOAT16), ("bfloat16", BFLOAT16))
       for s, sc in (("float32", FLOAT32), ("bfloat16", BFLOAT16))
       for x, xc in (("", 0), ("/master", 1), ("/kahan", 2))},
}
STORAGE = {FLOAT32: np.float32, FLOAT64: np.float64, FLOAT16: np.uint16, BFLOAT16: np.uint16}


# --- The module, with or without a GPU ---------------------------------------

NOT_BUILT = ("fusedopt._cuda was not built (it is built where nvcc and a GPU are found, "
             "or with FUSEDOPT_CUDA=ON)")


@pytest.fixture(scope="module")
def cuda_mod():
    if not _cuda_built():
        pytest.skip(NOT_BUILT)
    from fusedopt import _cuda
    return _cuda


def test_cuda_available_says_why_not():
    """cuda_available() is True exactly when no reason is given; the reason names the
    missing module, the missing or too old driver, or the missing device."""
    import fusedopt
    reason = fusedopt.cuda_unavailable_reason()
    assert fusedopt.cuda_available() == (reason is None)
    if not _cuda_built():
        assert "no CUDA module" in reason
        return
    from fusedopt import _cuda
    assert type(_cuda.driver_version()) is int and _cuda.driver_version() >= 0
    if _cuda.device_count() == 0:
        assert isinstance(reason, str) and reason
        if _cuda.driver_version() == 0:
            assert "no NVIDIA driver" in reason or "cudaError" in reason
        elif _cuda.driver_version() < _cuda.cuda_runtime_version:
            assert "older than the CUDA" in reason


def test_imports_and_counts_devices_without_a_gpu():
    if not _cuda_built():
        if os.environ.get("FUSEDOPT_REQUIRE_CUDA") == "1":
            pytest.fail(NOT_BUILT + ", but FUSEDOPT_REQUIRE_CUDA=1")
        pytest.skip(NOT_BUILT)
    from fusedopt import _cuda  # a module that exists must import, driver or not
    n = _cuda.device_count()
    assert type(n) is int and n >= 0
    assert _cuda.device_count() == n  # no error left behind by the first call
    assert (_cuda.device_error() is None) == (n > 0)


def test_knows_every_kernel_of_the_cpu_module(cuda_mod):
    from fusedopt import _cpu
    for kernel, _, hyper in CASES.values():
        assert cuda_mod.hyper_size(kernel) == _cpu.hyper_size(kernel) == len(hyper(1))
        assert cuda_mod.launch_limits(kernel)["max_tensors"] >= 100
    # the gradient pass of a checked step reads one slot: more tensors per launch
    assert cuda_mod.launch_limits("grad_stats")["max_tensors"] > \
        cuda_mod.launch_limits("sgd")["max_tensors"]


@pytest.mark.parametrize("ptrs, hyper, match", [
    (4, 8, r"expected 9 hyperparameters \(or 9 per tensor\), got 8"),
    (3, 9, "expected 4 x 1 pointers, got 3"),
    (8, 17, r"expected 9 hyperparameters \(or 9 per tensor\), got 17"),
])
def test_bad_tables_raise_before_any_cuda_call(cuda_mod, ptrs, hyper, match):
    n = ptrs // 4 if ptrs % 4 == 0 else 1
    with pytest.raises(ValueError, match=match):
        cuda_mod.step("adam", 0, np.zeros(ptrs, np.uint64), np.ones(n, np.int64),
                      np.zeros(hyper), 0)


@pytest.mark.parametrize("kwargs, slots, match", [
    (dict(extra=1), 5, r"unsupported storage layout \(param 0, state 0, extra 1\)"),
    (dict(state_dtype=3), 4, r"unsupported storage layout \(param 0, state 3, extra 0\)"),
    (dict(extra=3), 5, r"unsupported storage layout"),
    (dict(scale_ptr=12), 4, "scale_ptr must be 8-byte aligned"),
    (dict(step_ptr=4), 4, "step_ptr must be 8-byte aligned"),
    (dict(extra=1), 4, "expected 5 x 1 pointers, got 4"),
])
def test_bad_layouts_raise_before_any_cuda_call(cuda_mod, kwargs, slots, match):
    with pytest.raises(ValueError, match=match):
        cuda_mod.step("adam", 0, np.zeros(slots, np.uint64), np.ones(1, np.int64),
                      np.zeros(9), 0, **kwargs)


def test_which_layouts_have_kernels(cuda_mod):
    for (param, state, extra) in LAYOUTS.values():
        for kernel, _, _ in CASES.values():
            built = cuda_mod.has_kernel(kernel, param, state, extra)
            # The bandwidth probes are built for the layouts the benchmarks use only.
            probe_layouts = {(0, 0, 0), (1, 1, 0), (3, 0, 1)}
            assert built == (not kernel.startswith("stream") or (param, state, extra) in probe_layouts)
    assert not cuda_mod.has_kernel("adam", 0, 0, 1)
    nslots = 2 + 2 + 1
    with pytest.raises(ValueError, match=r"stream2\[float16 params, float32 states\]: this build has no"):
        cuda_mod.step("stream2", 2, np.zeros(4, np.uint64), np.ones(1, np.int64), np.zeros(1), 0,
                      state_dtype=0)
    cuda_mod.step("adam", 3, np.zeros(nslots, np.uint64), np.zeros(1, np.int64), np.zeros(9), 0,
                  state_dtype=0, extra=1)  # a valid layout, empty: no CUDA call


def test_grad_stats_and_advance_step_validate_first(cuda_mod):
    def table(dtype=0, ptrs=np.zeros(1, np.uint64), sizes=np.ones(1, np.int64)):
        return [(dtype, ptrs, sizes)]

    with pytest.raises(ValueError, match="expected 1 x 2 pointers, got 3"):
        cuda_mod.grad_stats(table(0, np.zeros(3, np.uint64), np.ones(2, np.int64)), 0, 8)
    with pytest.raises(ValueError, match="unsupported dtype code 4"):
        cuda_mod.grad_stats(table(4), 0, 8)
    with pytest.raises(ValueError, match="out_ptr is required"):
        cuda_mod.grad_stats(table(), 0, 0)
    with pytest.raises(ValueError, match="out_ptr must be 8-byte aligned"):
        cuda_mod.grad_stats(table(), 0, 4)
    with pytest.raises(ValueError, match="negative size for tensor 0"):
        cuda_mod.grad_stats(table(0, sizes=-np.ones(1, np.int64)), 0, 8)
    with pytest.raises(ValueError, match=r"each table is \(dtype, ptrs, sizes\)"):
        cuda_mod.grad_stats([(0, np.zeros(1, np.uint64))], 0, 8)
    with pytest.raises(ValueError, match="size must be positive"):
        cuda_mod.DeviceScalars(0, 0)
    with pytest.raises(ValueError, match="at most 64"):
        cuda_mod.DeviceScalars(65, 0, 0)
    with pytest.raises(ValueError, match="step_ptr is required"):
        cuda_mod.advance_step(0)
    with pytest.raises(ValueError, match="scale_ptr must be 8-byte aligned"):
        cuda_mod.advance_step(8, 3)


def test_unknown_kernel_and_empty_call(cuda_mod):
    with pytest.raises(ValueError, match="unknown kernel 'nope'"):
        cuda_mod.step("nope", 0, np.zeros(0, np.uint64), np.zeros(0, np.int64), np.zeros(1), 0)
    # No tensors, or only empty ones: a no-op that makes no CUDA call.
    cuda_mod.step("adam", 0, np.zeros(0, np.uint64), np.zeros(0, np.int64), np.zeros(9), 0)
    cuda_mod.step("sgd", 1, np.zeros(2, np.uint64), np.zeros(1, np.int64), np.zeros(7), 0)


# --- Kernels on a GPU: parity with the CPU module ----------------------------

@pytest.fixture(scope="module")
def cp(cuda_mod):
    try:
        import cupy
    except Exception as e:  # not installed, or no CUDA libraries for it
        pytest.skip(f"CuPy cannot be imported: {e}")
    try:
        n = cupy.cuda.runtime.getDeviceCount()
    except Exception as e:
        pytest.skip(f"no usable CUDA device: {e}")
    if n == 0:
        pytest.skip("no CUDA device")
    if cuda_mod.device_count() == 0:  # CuPy sees a GPU that this build cannot use
        pytest.fail(f"fusedopt._cuda (CUDA runtime {cuda_mod.cuda_runtime_version}) finds no "
                    f"device: {cuda_mod.device_error()}")
    return cupy



def _host_slots(rng, sizes, nstates, dtype):
    """[params, grads, state 0, ...], each a list of host arrays. States start
    away from zero, and state 0 (square_avg) above the square of the others
    (grad_avg), which rmsprop_centered needs for a real square root."""
    slots = [[rng.standard_normal(n).astype(dtype) for n in sizes] for _ in range(2)]
    for k in range(nstates):
        lo, hi = (0.5, 1.5) if k == 0 else (0.0, 0.2)
        slots.append([rng.uniform(lo, hi, n).astype(dtype) for n in sizes])
    return slots


def _place(xp, slots, offsets=None):
    """Copies of `slots` in xp's memory (NumPy or CuPy). Slot k starts
    offsets[k] elements into its own allocation: 1 misaligns it for 16-byte access."""
    out = []
    for k, slot in enumerate(slots):
        off = offsets[k] if offsets else 0
        row = []
        for a in slot:
            view = xp.empty(a.size + off, a.dtype)[off:]
            view[...] = xp.asarray(a)
            row.append(view)
        out.append(row)
    return out


def _table(slots, address):
    ptrs = np.array([address(a) for slot in slots for a in slot], dtype=np.uint64)
    return ptrs, np.array([a.size for a in slots[0]], dtype=np.int64)


def _cpu_step(kernel, code, slots, hyper, **mode):
    """One _cpu.step over host slots; `code` is a storage dtype code (or a NumPy float type)."""
    from fusedopt import _cpu
    ptrs, sizes = _table(slots, lambda a: a.ctypes.data)
    _cpu.step(kernel, DTYPE_CODE.get(code, code), ptrs, sizes, np.asarray(hyper, np.float64),
              **mode)


def _gpu_step(cp, kernel, code, slots, hyper, stream=None, **mode):
    from fusedopt import _cuda
    ptrs, sizes = _table(slots, lambda a: a.data.ptr)
    stream = cp.cuda.get_current_stream() if stream is None else stream
    _cuda.step(kernel, DTYPE_CODE.get(code, code), ptrs, sizes, np.asarray(hyper, np.float64),
               stream.ptr, **mode)


def _run_both(cp, rng, case, dtype, sizes, steps=3, offsets=None):
    """`steps` steps of `case` on the CPU and on the GPU from the same data."""
    kernel, nstates, hyper = case
    data = _host_slots(rng, sizes, nstates, dtype)
    host, dev = _place(np, data, offsets), _place(cp, data, offsets)
    for t in range(1, steps + 1):
        for j, n in enumerate(sizes):
            g = rng.standard_normal(n).astype(dtype)
            host[1][j][...] = g
            dev[1][j][...] = cp.asarray(g)
        _cpu_step(kernel, dtype, host, hyper(t), step=t)
        _gpu_step(cp, kernel, dtype, dev, hyper(t), step=t)
    cp.cuda.get_current_stream().synchronize()
    return host, dev


def _assert_same(cp, dev, host, dtype, bitwise=False, scaled=False):
    """Every slot of every tensor: bit for bit, or within RTOL; `scaled` adds an absolute
    tolerance of RTOL times the tensor's largest value (results of a trust ratio that
    cancel to near zero)."""
    for k, (dev_slot, host_slot) in enumerate(zip(dev, host)):
        for j, (d, h) in enumerate(zip(dev_slot, host_slot)):
            got = cp.asnumpy(d)
            where = f"slot {k}, tensor {j} ({h.size} elements)"
            if bitwise:
                assert got.tobytes() == h.tobytes(), where
            atol = RTOL[dtype] * float(np.abs(h).max(initial=0.0)) if scaled else 0.0
            np.testing.assert_allclose(got, h, rtol=RTOL[dtype], atol=atol, err_msg=where)


DTYPES = pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])


@pytest.mark.cuda
@DTYPES
@pytest.mark.parametrize("case", list(CASES))
def test_matches_cpu(cp, case, dtype):
    host, dev = _run_both(cp, np.random.default_rng(0), CASES[case], dtype, SIZES)
    _assert_same(cp, dev, host, dtype, scaled=case in TWO_PASS)


# Every operation rounds the same way on both sides (--fmad=false for nvcc,
# -ffp-contract=off for the CPU, IEEE division and square root on both): a
# difference in the last bit means a contraction or an approximation crept in.
@pytest.mark.cuda
@DTYPES
@pytest.mark.parametrize("case", ["adam", "adamw_amsgrad", "rmsprop_centered_momentum", "adadelta",
                                  "lion", "lion_maximize", "adamw_schedulefree"])
def test_bitwise_equal_to_cpu(cp, case, dtype):
    host, dev = _run_both(cp, np.random.default_rng(1), CASES[case], dtype, SIZES)
    _assert_same(cp, dev, host, dtype, bitwise=True)


@pytest.mark.cuda
@DTYPES
@pytest.mark.parametrize("offsets", [(1, 1, 1, 1, 1), (0, 1, 0, 0, 0), (0, 0, 0, 0, 1)],
                         ids=["all", "grad", "last_state"])
def test_misaligned_arrays(cp, offsets, dtype):
    host, dev = _run_both(cp, np.random.default_rng(2), CASES["adam_amsgrad"], dtype, SIZES,
                          offsets=offsets)
    assert any(slot[-1].data.ptr % 16 for slot in dev)  # the scalar path did run
    _assert_same(cp, dev, host, dtype)


@pytest.mark.cuda
@pytest.mark.parametrize("case, dtype", [("adam", np.float32), ("sgd", np.float64),
                                         ("rmsprop_centered_momentum", np.float32)])
def test_more_tensors_than_one_launch_holds(cp, case, dtype):
    from fusedopt import _cuda
    lim = _cuda.launch_limits(CASES[case][0])
    assert 2 * lim["max_tensors"] < 1000
    rng = np.random.default_rng(3)
    sizes = [int(n) for n in rng.integers(0, 3000, 1000)]
    sizes[10] = lim["chunk"] + 1
    sizes[lim["max_tensors"] - 1] = 2 * lim["chunk"]  # in the last slot of the first launch
    sizes[500] = 3 * lim["chunk"] - 5
    host, dev = _run_both(cp, rng, CASES[case], dtype, sizes, steps=2)
    _assert_same(cp, dev, host, dtype)


@pytest.mark.cuda
def test_more_chunks_than_one_launch_holds(cp):
    from fusedopt import _cuda
    lim = _cuda.launch_limits("sgd")
    sizes = [5, lim["chunk"] * lim["max_blocks"] + 7, 3]  # the big one spans two launches
    host, dev = _run_both(cp, np.random.default_rng(4), CASES["sgd"], np.float32, sizes, steps=1)
    _assert_same(cp, dev, host, np.float32)


@pytest.mark.cuda
def test_runs_in_order_on_the_callers_stream(cp):
    # A non-blocking stream does not wait for the legacy default stream: a step
    # launched anywhere but on `stream` would run before the gradients exist.
    kernel, nstates, hyper = CASES["adam"]
    rng = np.random.default_rng(5)
    data = _host_slots(rng, [1 << 22], nstates, np.float32)
    host, dev = _place(np, data), _place(cp, data)
    cp.cuda.Device().synchronize()
    g = rng.standard_normal(1 << 22).astype(np.float32)
    host[1][0][...] = g
    stream = cp.cuda.Stream(non_blocking=True)
    with stream:
        a = cp.asarray(rng.standard_normal((4096, 4096)), dtype=cp.float32)
        eye = cp.eye(4096, dtype=cp.float32)
        for _ in range(20):  # tens of milliseconds queued ahead of the gradients
            a = a @ eye
        dev[1][0][...] = cp.asarray(g) + 0 * a[0, 0]
        _gpu_step(cp, kernel, np.float32, dev, hyper(1), stream=stream, step=1)
    stream.synchronize()
    _cpu_step(kernel, np.float32, host, hyper(1), step=1)
    _assert_same(cp, dev, host, np.float32)


@pytest.mark.cuda
def test_legacy_default_stream(cp):
    kernel, nstates, hyper = CASES["adagrad"]
    data = _host_slots(np.random.default_rng(6), SIZES, nstates, np.float64)
    host, dev = _place(np, data), _place(cp, data)
    _cpu_step(kernel, np.float64, host, hyper(1), step=1)
    _gpu_step(cp, kernel, np.float64, dev, hyper(1), stream=cp.cuda.Stream.null, step=1)
    cp.cuda.Device().synchronize()
    _assert_same(cp, dev, host, np.float64)


@pytest.mark.cuda
def test_host_memory_is_refused(cp):
    from fusedopt import _cuda
    arrays = [np.zeros(8, np.float32), np.zeros(8, np.float32)]
    ptrs, sizes = _table([[a] for a in arrays], lambda a: a.ctypes.data)
    with pytest.raises(ValueError, match="not CUDA device memory"):
        _cuda.step("sgd", 0, ptrs, sizes, np.zeros(7), 0)


@pytest.mark.cuda
def test_arrays_on_a_second_device(cp):
    if cp.cuda.runtime.getDeviceCount() < 2:
        pytest.skip("needs two CUDA devices")
    kernel, nstates, hyper = CASES["adam"]
    data = _host_slots(np.random.default_rng(7), SIZES, nstates, np.float32)
    host = _place(np, data)
    with cp.cuda.Device(1):
        dev = _place(cp, data)
        cp.cuda.Device(1).synchronize()
    # Called with device 0 current: the module switches to the arrays' device.
    _cpu_step(kernel, np.float32, host, hyper(1), step=1)
    _gpu_step(cp, kernel, np.float32, dev, hyper(1), stream=cp.cuda.Stream.null, step=1)
    with cp.cuda.Device(1):
        cp.cuda.Device(1).synchronize()
        _assert_same(cp, dev, host, np.float32)


# --- Storage layouts, stochastic rounding, per-tensor settings: bit for bit ---

def _encode(code, x):
    """float64 values -> the storage array of dtype `code` (16-bit types as uint16 bits,
    rounded to nearest even)."""
    if code in (FLOAT32, FLOAT64):
        return x.astype(STORAGE[code])
    if code == FLOAT16:
        return x.astype(np.float16).view(np.uint16)
    u = x.astype(np.float32).view(np.uint32)
    return ((u + np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)).astype(np.uint16)


def _decode(code, a):
    """A storage array of dtype `code` -> float64 values."""
    if code in (FLOAT32, FLOAT64):
        return a.astype(np.float64)
    if code == FLOAT16:
        return a.view(np.float16).astype(np.float64)
    return (a.astype(np.uint32) << np.uint32(16)).view(np.float32).astype(np.float64)


def _layout_codes(layout, nstates):
    """Storage dtype code of every slot: param, grad, states, then the extra buffer, then
    the EMA slot (extra code + 4)."""
    param, state, extra = layout
    return [param, param] + [state] * nstates + {0: [], 1: [FLOAT32], 2: [param]}[extra & 3] + \
        ([param] if extra & 4 else [])


def _layout_slots(rng, sizes, nstates, layout):
    """Host slots of a layout. A master copy holds the float32 value the param rounds
    from; a Kahan buffer starts with small compensations."""
    values = [[rng.standard_normal(n) for n in sizes] for _ in range(2)]
    for k in range(nstates):
        lo, hi = (0.5, 1.5) if k == 0 else (0.0, 0.2)
        values.append([rng.uniform(lo, hi, n) for n in sizes])
    if layout[2] & 3 == 1:
        values.append([v.astype(np.float32).astype(np.float64) for v in values[0]])
    elif layout[2] & 3 == 2:
        values.append([1e-3 * rng.standard_normal(n) for n in sizes])
    if layout[2] & 4:  # averages near the params
        values.append([v + 0.1 * rng.standard_normal(v.size) for v in values[0]])
    codes = _layout_codes(layout, nstates)
    return [[_encode(codes[k], v) for v in slot] for k, slot in enumerate(values)]


def _new_grads(rng, host, dev, code, cp):
    for j, h in enumerate(host[1]):
        g = _encode(code, rng.standard_normal(h.size))
        h[...] = g
        dev[1][j][...] = cp.asarray(g)


def _run_layout(cp, rng, case, layout, sizes=SIZES, steps=3, offsets=None, per_tensor=False,
                **mode):
    """`steps` steps of `case` in `layout` on the CPU and on the GPU from the same data.
    mode(t) -> keyword arguments of both steps; per_tensor: one Hyper per tensor, with
    a different learning rate for each."""
    kernel, nstates, hyper = case
    data = _layout_slots(rng, sizes, nstates, layout)
    host, dev = _place(np, data, offsets), _place(cp, data, offsets)
    for t in range(1, steps + 1):
        _new_grads(rng, host, dev, layout[0], cp)
        if per_tensor:
            h = np.array([hyper(t)] * len(sizes), np.float64)
            h[:, 0] *= 1.0 + 0.25 * np.arange(len(sizes))
        else:
            h = hyper(t)
        kw = dict(state_dtype=layout[1], extra=layout[2], step=t,
                  **{k: (v(t) if callable(v) else v) for k, v in mode.items()})
        _cpu_step(kernel, layout[0], host, h, **kw)
        _gpu_step(cp, kernel, layout[0], dev, h, **kw)
    cp.cuda.get_current_stream().synchronize()
    return host, dev


def _assert_bits(cp, dev, host):
    from cases import assert_same_bits
    for k, (dev_slot, host_slot) in enumerate(zip(dev, host)):
        for j, (d, h) in enumerate(zip(dev_slot, host_slot)):
            assert_same_bits(cp.asnumpy(d), h, f"slot {k}, tensor {j} ({h.size} elements)")


LAYOUT_CASES = ["sgd", "sgd_momentum", "adagrad", "rmsprop", "rmsprop_momentum",
                "rmsprop_centered", "rmsprop_centered_momentum", "adadelta",
                "adam", "adamw_amsgrad"]
# and, for every other kernel, its first case in the case table
_kernels = {CASES[name][0] for name in LAYOUT_CASES}
for _name, (_kernel, _, _) in CASES.items():
    if _name.startswith("table-") and _kernel not in _kernels:
        _kernels.add(_kernel)
        LAYOUT_CASES.append(_name)


@pytest.mark.cuda
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("case", LAYOUT_CASES)
def test_layout_bitwise_equal_to_cpu(cp, case, layout):
    host, dev = _run_layout(cp, np.random.default_rng(10), CASES[case], LAYOUTS[layout],
                            grad_scale=0.5)
    _assert_bits(cp, dev, host)


@pytest.mark.cuda
@pytest.mark.parametrize("layout", ["float32", "float64", "bfloat16/float32/master"])
@pytest.mark.parametrize("case", ["stream0", "stream3"])
def test_bandwidth_probes_in_their_layouts(cp, case, layout):
    host, dev = _run_layout(cp, np.random.default_rng(11), CASES[case], LAYOUTS[layout])
    _assert_bits(cp, dev, host)


SIXTEEN_BIT = [name for name, (p, _, _) in LAYOUTS.items() if p in (FLOAT16, BFLOAT16)]


@pytest.mark.cuda
@pytest.mark.parametrize("layout", SIXTEEN_BIT)
@pytest.mark.parametrize("case", ["adam", "sgd_momentum"])
def test_stochastic_rounding_same_bits_as_cpu(cp, case, layout):
    keys = {t: (0x9E3779B97F4A7C15 * t + 12345) % 2**64 for t in range(1, 4)}
    mode = dict(stochastic=True, key=lambda t: keys[t])
    host, dev = _run_layout(cp, np.random.default_rng(12), CASES[case], LAYOUTS[layout], **mode)
    _assert_bits(cp, dev, host)
    # and the rounding was stochastic: round to nearest gives other params
    nearest, _ = _run_layout(cp, np.random.default_rng(12), CASES[case], LAYOUTS[layout])
    assert any(a.tobytes() != b.tobytes() for a, b in zip(host[0], nearest[0]))


@pytest.mark.cuda
@pytest.mark.parametrize("layout", ["float32", "float64", "bfloat16/bfloat16/kahan",
                                    "float16/float32/master"])
@pytest.mark.parametrize("case", ["adam", "rmsprop_momentum"])
def test_misaligned_layouts(cp, case, layout):
    kernel, nstates, _ = CASES[case]
    offsets = [1 if k % 2 else 0 for k in range(len(_layout_codes(LAYOUTS[layout], nstates)))]
    host, dev = _run_layout(cp, np.random.default_rng(13), CASES[case], LAYOUTS[layout],
                            offsets=offsets, stochastic=True, key=7)
    _assert_bits(cp, dev, host)


@pytest.mark.cuda
@pytest.mark.parametrize("layout", ["float32", "float64", "bfloat16/float32/master",
                                    "float16/bfloat16"])
def test_per_tensor_hyperparameters(cp, layout):
    host, dev = _run_layout(cp, np.random.default_rng(14), CASES["adam"], LAYOUTS[layout],
                            per_tensor=True, stochastic=True, key=99)
    _assert_bits(cp, dev, host)


@pytest.mark.cuda
@pytest.mark.parametrize("layout", ["float32", "float64", "bfloat16/float32/master",
                                    "float16/bfloat16/kahan"])
def test_l1_proximal_step(cp, layout):
    host, dev = _run_layout(cp, np.random.default_rng(19), CASES["sgd_momentum"],
                            LAYOUTS[layout], l1=0.05)
    _assert_bits(cp, dev, host)
    if LAYOUTS[layout][2] != 2:  # (Kahan adds back what rounding dropped)
        assert any((h == 0).any() for h in host[0])  # the threshold did zero some params


@pytest.mark.cuda
def test_per_tensor_hyperparameters_across_launches(cp):
    from fusedopt import _cuda
    lim = _cuda.launch_limits("adam", extra=1)
    rng = np.random.default_rng(15)
    sizes = [int(n) for n in rng.integers(0, 3000, 2 * lim["max_tensors"] + 50)]
    sizes[lim["max_tensors"] - 1] = 2 * lim["chunk"] + 3  # cut across two launches
    host, dev = _run_layout(cp, rng, CASES["adam"], LAYOUTS["bfloat16/float32/master"],
                            sizes=sizes, steps=2, per_tensor=True, stochastic=True, key=5)
    _assert_bits(cp, dev, host)


# --- Device-side loss scaling, clipping and step counting --------------------

def _decoded_norm(tables, inv_scale):
    """The float64 norm of [(code, arrays), ...], as the host computes it."""
    total = sum(float(np.sum(_decode(code, a) ** 2)) for code, arrays in tables for a in arrays)
    return math.sqrt(total) * inv_scale


@pytest.mark.cuda
@pytest.mark.parametrize("code", [FLOAT32, FLOAT64, FLOAT16, BFLOAT16],
                         ids=["float32", "float64", "float16", "bfloat16"])
def test_grad_stats(cp, code):
    from fusedopt import _cuda
    rng = np.random.default_rng(16)
    grads = [_encode(code, 3.0 * rng.standard_normal(n)) for n in SIZES]
    dev = _place(cp, [grads], offsets=[1])[0] + _place(cp, [grads])[0]  # misaligned and not
    host = grads + grads
    ptrs, sizes = _table([dev], lambda a: a.data.ptr)
    stream = cp.cuda.get_current_stream()
    out = cp.zeros(3, cp.float64)
    inv = 1.0 / 64

    def stats(max_norm=-1.0, skip_nonfinite=True):
        _cuda.grad_stats([(code, ptrs, sizes)], stream.ptr, out.data.ptr, inv_scale=inv,
                         max_norm=max_norm, skip_nonfinite=skip_nonfinite)
        return cp.asnumpy(out)

    skip, coef, norm = first = stats()
    assert skip == 0.0 and coef == inv
    assert norm == pytest.approx(_decoded_norm([(code, host)], inv), rel=1e-12)
    assert stats().tobytes() == first.tobytes()  # the same sum on every run
    # torch's clip_grad_norm_ coefficient: max_norm / (norm + 1e-6), at most 1
    assert stats(max_norm=norm / 4)[1] == inv * ((norm / 4) / (norm + 1e-6))
    assert stats(max_norm=norm * 4)[1] == inv
    for bad in (np.inf, -np.inf, np.nan):
        dev[3][17:18] = cp.asarray(_encode(code, np.array([bad])))
        assert stats()[0] == 1.0, bad
        # without skipping: no flag, and the coefficient the host computes (0 or NaN)
        kept = stats(max_norm=1.0, skip_nonfinite=False)
        assert kept[0] == 0.0 and (np.isnan(kept[1]) if np.isnan(bad) else kept[1] == 0.0)
        dev[3][17:18] = cp.asarray(grads[3][17:18])
    assert stats()[0] == 0.0
    # no elements: norm 0, nothing to skip
    _cuda.grad_stats([(code, ptrs[:1], sizes[:1])], stream.ptr, out.data.ptr, inv_scale=0.5,
                     max_norm=1.0)
    assert cp.asnumpy(out).tolist() == [0.0, 0.5, 0.0]


@pytest.mark.cuda
def test_grad_stats_over_several_tables(cp):
    """One pass over gradients of several dtypes gives their joint norm; finite float64
    gradients whose squares overflow are not taken for inf (the norm is inf, no skip)."""
    from fusedopt import _cuda
    rng = np.random.default_rng(19)
    tables, host, alive = [], [], []
    for code in (FLOAT32, BFLOAT16, FLOAT64, FLOAT16):
        grads = [_encode(code, rng.standard_normal(n)) for n in SIZES]
        dev = _place(cp, [grads])[0]
        alive.append(dev)  # the tables hold their addresses only
        tables.append((code, *_table([dev], lambda a: a.data.ptr)))
        host.append((code, grads))
    out = cp.zeros(3, cp.float64)
    stream = cp.cuda.get_current_stream()
    _cuda.grad_stats(tables, stream.ptr, out.data.ptr, inv_scale=0.5)
    assert cp.asnumpy(out)[2] == pytest.approx(_decoded_norm(host, 0.5), rel=1e-12)
    huge = cp.asarray(np.array([1e200, 3.0]))
    ptrs, sizes = _table([[huge]], lambda a: a.data.ptr)
    _cuda.grad_stats([(FLOAT64, ptrs, sizes)], stream.ptr, out.data.ptr, max_norm=1.0)
    assert cp.asnumpy(out).tolist() == [0.0, 0.0, math.inf]


@pytest.mark.cuda
def test_device_scalars(cp):
    from fusedopt import _cuda
    stats = _cuda.DeviceScalars(3, 0)
    view = cp.asarray(stats)  # __cuda_array_interface__: the same memory
    assert view.data.ptr == stats.ptr and view.dtype == cp.float64 and view.shape == (3,)
    assert cp.asnumpy(view).tolist() == [0.0, 0.0, 0.0]
    view[...] = cp.asarray([1.0, 2.0, 3.0])
    stats.fetch(cp.cuda.get_current_stream().ptr)
    assert stats.values() == [1.0, 2.0, 3.0]


@pytest.mark.cuda
@pytest.mark.parametrize("layout", ["float32", "bfloat16/float32/master", "float16/bfloat16/kahan"])
def test_scale_ptr_coefficient_and_skip(cp, layout):
    kernel, nstates, hyper = CASES["adam"]
    rng = np.random.default_rng(17)
    lay = LAYOUTS[layout]
    data = _layout_slots(rng, SIZES, nstates, lay)
    host, dev = _place(np, data), _place(cp, data)
    _new_grads(rng, host, dev, lay[0], cp)
    scale = cp.asarray([0.0, 0.25, 3.0])
    mode = dict(state_dtype=lay[1], extra=lay[2], step=1, stochastic=True, key=3)
    # coef multiplies the gradients, on top of grad_scale: as grad_scale * coef on the CPU
    _cpu_step(kernel, lay[0], host, hyper(1), grad_scale=2.0 * 0.25, **mode)
    _gpu_step(cp, kernel, lay[0], dev, hyper(1), grad_scale=2.0, scale_ptr=scale.data.ptr, **mode)
    cp.cuda.get_current_stream().synchronize()
    _assert_bits(cp, dev, host)
    # skip: nothing read or written
    scale[0] = 1.0
    _new_grads(rng, host, dev, lay[0], cp)
    _gpu_step(cp, kernel, lay[0], dev, hyper(2), scale_ptr=scale.data.ptr, **dict(mode, step=2))
    cp.cuda.get_current_stream().synchronize()
    _assert_bits(cp, dev, host)


@pytest.mark.cuda
@pytest.mark.parametrize("case, bitwise", [("adagrad", True), ("adam", False)])
def test_step_ptr_and_advance_step(cp, case, bitwise):
    """The step count lives on the device and skipped steps do not count. Adagrad's
    per-step rate is plain arithmetic, the same bits as on the host; Adam's bias
    corrections use pow, which the device may round differently in the last bit."""
    from fusedopt import _cuda
    kernel, nstates, hyper = CASES[case]
    rng = np.random.default_rng(18)
    data = _host_slots(rng, SIZES, nstates, np.float32)
    host, dev = _place(np, data), _place(cp, data)
    count = cp.zeros(1, cp.float64)
    scale = cp.asarray([0.0, 1.0, 0.0])
    stream = cp.cuda.get_current_stream()
    t = 0
    for skip in (False, False, True, False, True, False):
        g = [rng.standard_normal(n).astype(np.float32) for n in SIZES]
        if not skip:
            t += 1
            for h, x in zip(host[1], g):
                h[...] = x
            _cpu_step(kernel, np.float32, host, hyper(t), step=t)
        for d, x in zip(dev[1], g):
            d[...] = cp.asarray(x)
        scale[0] = float(skip)
        _cuda.advance_step(count.data.ptr, scale.data.ptr, stream.ptr)
        _gpu_step(cp, kernel, np.float32, dev, hyper(t), step=1e9, scale_ptr=scale.data.ptr,
                  step_ptr=count.data.ptr)
    stream.synchronize()
    assert float(count[0]) == t == 4
    if bitwise:
        _assert_bits(cp, dev, host)
    else:
        _assert_same(cp, dev, host, np.float32)
    _cuda.advance_step(count.data.ptr)  # without scale_ptr: always counts
    assert float(count[0]) == 5


@pytest.mark.cuda
def test_step_ptr_derives_the_rounding_stream_from_the_count(cp):
    """With the count on the device, `key` is the seed and the stream is the host's
    rounding_key(seed, t): the same bits as a CPU step told key=rounding_key(seed, t)."""
    from fusedopt import _cuda, _precision
    kernel, nstates, hyper = CASES["sgd_momentum"]
    lay = LAYOUTS["bfloat16/float32"]
    rng = np.random.default_rng(20)
    data = _layout_slots(rng, SIZES, nstates, lay)
    host, dev = _place(np, data), _place(cp, data)
    count = cp.zeros(1, cp.float64)
    stream = cp.cuda.get_current_stream()
    for t in (1, 2, 3):
        _new_grads(rng, host, dev, lay[0], cp)
        _cpu_step(kernel, lay[0], host, hyper(t), state_dtype=lay[1], extra=lay[2], step=t,
                  stochastic=True, key=_precision.rounding_key(99, t))
        _cuda.advance_step(count.data.ptr, 0, stream.ptr)
        _gpu_step(cp, kernel, lay[0], dev, hyper(t), state_dtype=lay[1], extra=lay[2],
                  stochastic=True, key=99, step_ptr=count.data.ptr)
    stream.synchronize()
    _assert_bits(cp, dev, host)


# --- Public API on CuPy arrays: fusedopt routes them to fusedopt._cuda --------

ADAM_VARIANTS = {"adam": {}, "adamw": {"decoupled_weight_decay": True},
                 "amsgrad": {"amsgrad": True}, "maximize": {"maximize": True}}


@pytest.mark.cuda
@DTYPES
@pytest.mark.parametrize("variant", list(ADAM_VARIANTS))
def test_functional_adam_on_cupy_matches_numpy(cp, variant, dtype):
    import fusedopt.functional as F
    opts = ADAM_VARIANTS[variant]
    rng = np.random.default_rng(8)
    data = _host_slots(rng, SIZES, 3 if opts.get("amsgrad") else 2, dtype)
    host, dev = _place(np, data), _place(cp, data)
    for t in range(1, 4):
        grads = [rng.standard_normal(n).astype(dtype) for n in SIZES]
        for side, xp in ((host, np), (dev, cp)):
            F.adam_(side[0], [xp.asarray(g) for g in grads], side[2], side[3],
                    side[4] if opts.get("amsgrad") else None, step=t, lr=1e-2, beta1=0.9,
                    beta2=0.999, eps=1e-8, weight_decay=0.05, **opts)
    cp.cuda.get_current_stream().synchronize()
    _assert_same(cp, dev, host, dtype)


def _assert_tree_same(cp, dev, host, dtype, where="state", scaled=False):
    if isinstance(host, dict):
        assert sorted(map(str, dev)) == sorted(map(str, host)), where
        for key in host:
            _assert_tree_same(cp, dev[key], host[key], dtype, f"{where}[{key!r}]", scaled)
    elif isinstance(host, (list, tuple)):
        assert len(dev) == len(host), where
        for i, (d, h) in enumerate(zip(dev, host)):
            _assert_tree_same(cp, d, h, dtype, f"{where}[{i}]", scaled)
    else:
        got = cp.asnumpy(dev) if isinstance(dev, cp.ndarray) else np.asarray(dev)
        want = np.asarray(host)
        atol = RTOL[dtype] * float(np.abs(want).max(initial=0.0)) if scaled else 0.0
        np.testing.assert_allclose(got, want, rtol=RTOL[dtype], atol=atol, err_msg=where)


@pytest.mark.cuda
@pytest.mark.parametrize("cls, kwargs", [("Adam", {}), ("Adam", {"amsgrad": True}),
                                         ("AdamW", {}), ("Adam", {"weight_decay": 0.1})])
def test_optimizer_on_cupy_matches_numpy(cp, cls, kwargs):
    import fusedopt
    rng = np.random.default_rng(9)
    params = [rng.standard_normal(n).astype(np.float32) for n in SIZES]
    p_np, p_cp = [p.copy() for p in params], [cp.asarray(p) for p in params]
    addresses = [p.data.ptr for p in p_cp]
    opt_np = getattr(fusedopt, cls)(p_np, lr=1e-2, **kwargs)
    opt_cp = getattr(fusedopt, cls)(p_cp, lr=1e-2, **kwargs)
    for _ in range(3):
        grads = [rng.standard_normal(n).astype(np.float32) for n in SIZES]
        opt_np.step(grads)
        opt_cp.step([cp.asarray(g) for g in grads])
    cp.cuda.get_current_stream().synchronize()
    assert [p.data.ptr for p in p_cp] == addresses  # updated in place
    _assert_same(cp, [p_cp], [p_np], np.float32)
    _assert_tree_same(cp, opt_cp.state_dict()["state"], opt_np.state_dict()["state"], np.float32)


# --- Checked steps on the GPU: skip and clip on the device, no host round trip --

_SPIN = r"""
extern "C" __global__ void spin(unsigned long long ns) {
  unsigned long long start, now;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(start));
  do {
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(now));
  } while (now - start < ns);
}
"""


def _adam_kwargs(t):
    return dict(step=t, lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.05)


CHECKS = {"loss scale": dict(loss_scale=1024.0), "clip": dict(max_grad_norm=0.5),
          "scale, clip, skip": dict(loss_scale=64.0, max_grad_norm=0.5, skip_nonfinite=True)}


@pytest.mark.cuda
@pytest.mark.parametrize("checks", list(CHECKS))
def test_functional_checked_steps_on_cupy_match_numpy(cp, checks):
    """The device's gradient pass gives the host's norm, skip and clip coefficient:
    the same results as the CPU step on the same inputs, over steps with inf and NaN
    gradients where the options skip them."""
    import fusedopt.functional as F
    from fusedopt._precision import DeviceStepInfo
    opts = CHECKS[checks]
    rng = np.random.default_rng(21)
    data = _host_slots(rng, SIZES, 2, np.float32)
    host, dev = _place(np, data), _place(cp, data)
    t = 0
    bads = (None, np.inf, None, np.nan, None) if opts.get("skip_nonfinite") else (None,) * 4
    for bad in bads:
        grads = [(100.0 * rng.standard_normal(n)).astype(np.float32) for n in SIZES]
        if bad is not None:
            grads[4][123] = bad
        got = F.adam_(dev[0], [cp.asarray(g) for g in grads], dev[2], dev[3],
                      **_adam_kwargs(t + 1), **opts)
        want = F.adam_(host[0], grads, host[2], host[3], **_adam_kwargs(t + 1), **opts)
        if want is None:
            assert got is None
        else:
            assert isinstance(got, DeviceStepInfo)
            assert got.skipped == want.skipped
            assert got.grad_norm == pytest.approx(want.grad_norm, rel=1e-12, nan_ok=True)
        t += 0 if want is not None and want.skipped else 1
    cp.cuda.get_current_stream().synchronize()
    _assert_same(cp, dev, host, np.float32)


@pytest.mark.cuda
def test_a_checked_step_does_not_wait_for_the_device(cp):
    """While the stream is busy for half a second, a loss-scaled, clipped, checked step
    and its device step count are enqueued and the call returns: nothing waited for
    the device. Reading the outcome then waits for the gradient pass."""
    import fusedopt.functional as F
    rng = np.random.default_rng(22)
    data = _host_slots(rng, SIZES, 2, np.float32)
    dev = _place(cp, data)
    count = cp.zeros(1, cp.float64)
    stream = cp.cuda.get_current_stream()
    cp.RawKernel(_SPIN, "spin")((1,), (1,), (np.uint64(500_000_000),))
    info = F.adam_(dev[0], dev[1], dev[2], dev[3], **_adam_kwargs(count),
                   loss_scale=8.0, max_grad_norm=1.0, skip_nonfinite=True)
    assert not stream.done
    assert info.skipped is False and info.grad_norm > 0.0
    stream.synchronize()
    assert float(count[0]) == 1.0


@pytest.mark.cuda
def test_step_ptr_across_radams_rectification(cp):
    """RAdam switches to its rectified step (rho_t > 5: from t = 6 with betas 0.8, 0.9)
    by the step count; with the count on the device the switch is decided there, on
    the same step as on the host (pow there may round differently in the last bit,
    hence the tolerance)."""
    from fusedopt import _cuda
    kernel, nstates, hyper = CASES["table-radam-lr=0.01-betas=0.8,0.9-eps=1e-06"]
    rng = np.random.default_rng(25)
    data = _host_slots(rng, SIZES, nstates, np.float64)
    host, dev = _place(np, data), _place(cp, data)
    count = cp.zeros(1, cp.float64)
    stream = cp.cuda.get_current_stream()
    for t in range(1, 9):
        for h, d in zip(host[1], dev[1]):
            h[...] = rng.standard_normal(h.size)
            d[...] = cp.asarray(h)
        _cpu_step(kernel, np.float64, host, hyper(t), step=t)
        _cuda.advance_step(count.data.ptr, 0, stream.ptr)
        _gpu_step(cp, kernel, np.float64, dev, hyper(t), step=1e9, step_ptr=count.data.ptr)
    stream.synchronize()
    assert float(count[0]) == 8
    _assert_same(cp, dev, host, np.float64)


@pytest.mark.cuda
def test_functional_step_counter_on_the_device(cp):
    """step=<float64 device array>: the op adds 1 to it unless the step is skipped and
    computes the per-step scalars from it on the device (pow there may differ from the
    host's in the last bit, hence the tolerance)."""
    import fusedopt.functional as F
    rng = np.random.default_rng(23)
    data = _host_slots(rng, SIZES, 2, np.float32)
    host, dev = _place(np, data), _place(cp, data)
    count = cp.zeros(1, cp.float64)
    t = 0
    for bad in (None, np.inf, None, None, np.nan, None):
        grads = [rng.standard_normal(n).astype(np.float32) for n in SIZES]
        if bad is not None:
            grads[3][2] = bad
        F.adam_(dev[0], [cp.asarray(g) for g in grads], dev[2], dev[3],
                **_adam_kwargs(count), skip_nonfinite=True)
        if bad is None:
            t += 1
            F.adam_(host[0], grads, host[2], host[3], **_adam_kwargs(t))
    cp.cuda.get_current_stream().synchronize()
    assert float(count[0]) == t == 4
    _assert_same(cp, dev, host, np.float32)
    with pytest.raises(TypeError, match="float64 array of one element"):
        F.adam_(dev[0], dev[1], dev[2], dev[3], **_adam_kwargs(cp.zeros(2, cp.float64)))
    with pytest.raises(TypeError, match="in host memory"):
        F.adam_(dev[0], dev[1], dev[2], dev[3], **_adam_kwargs(np.zeros(1)))


@pytest.mark.cuda
@pytest.mark.parametrize("cls, kwargs", [("Adam", {"lr": 1e-2}),
                                         ("SGD", {"lr": 0.1, "momentum": 0.9})])
def test_optimizer_with_loss_scaler_on_cupy_matches_numpy(cp, cls, kwargs):
    """DynamicLossScaler + a class on the GPU: the kernels skip on the device, and the
    counts, the state a skipped step created and the scale follow when the host next
    needs them; everything ends as on the CPU. Param 1 first gets a gradient in a
    skipped step (its new state is dropped again)."""
    import fusedopt
    from fusedopt.amp import DynamicLossScaler
    rng = np.random.default_rng(24)
    params = [rng.standard_normal(n).astype(np.float32) for n in SIZES]
    p_np, p_cp = [p.copy() for p in params], [cp.asarray(p) for p in params]
    opt_np = getattr(fusedopt, cls)(p_np, **kwargs)
    opt_cp = getattr(fusedopt, cls)(p_cp, **kwargs)
    scalers = [DynamicLossScaler(init_scale=2.0**10, growth_interval=2) for _ in range(2)]
    for k, bad in enumerate((None, None, np.inf, None, None, np.nan, None, None)):
        assert scalers[0].get_scale() == scalers[1].get_scale()
        grads = [(scalers[0].get_scale() * rng.standard_normal(n)).astype(np.float32)
                 for n in SIZES]
        if bad is not None:
            grads[3][7] = bad
        if k < 2:
            grads[1] = None
        got = scalers[1].step(opt_cp, [None if g is None else cp.asarray(g) for g in grads],
                              max_grad_norm=5.0)
        want = scalers[0].step(opt_np, grads, max_grad_norm=5.0)
        assert got.skipped == want.skipped
        assert got.grad_norm == pytest.approx(want.grad_norm, rel=1e-12, nan_ok=True)
    cp.cuda.get_current_stream().synchronize()
    assert opt_cp.steps_taken == opt_np.steps_taken == 6
    assert scalers[1].state_dict() == scalers[0].state_dict()
    _assert_same(cp, [p_cp], [p_np], np.float32)
    _assert_tree_same(cp, opt_cp.state_dict()["state"], opt_np.state_dict()["state"], np.float32)


# --- The EMA slot (extra code + 4) and the EMA rule: bit for bit ------------------------

EMA_LAYOUTS = {name + "/ema": (p, st, x | 4) for name, (p, st, x) in LAYOUTS.items() if x != 2}
EMA_DECAY = {"ema_decay": lambda t: 0.0 if t == 1 else (0.999, 0.3, 0.9)[t % 3]}


def test_ema_layouts_have_kernels(cuda_mod):
    """Every update rule in every EMA layout; neither the bandwidth probes nor the EMA
    rule itself, and no EMA next to Kahan buffers."""
    for layout in EMA_LAYOUTS.values():
        for case in LAYOUT_CASES:
            assert cuda_mod.has_kernel(CASES[case][0], *layout)
        assert not cuda_mod.has_kernel("stream0", *layout)
        assert not cuda_mod.has_kernel("ema", *layout)
    assert cuda_mod.has_kernel("ema", FLOAT16, FLOAT32, 0)
    assert not cuda_mod.has_kernel("adam", FLOAT16, FLOAT32, 6)


@pytest.mark.cuda
@pytest.mark.parametrize("layout", list(EMA_LAYOUTS))
@pytest.mark.parametrize("case", ["sgd_momentum", "rmsprop_centered_momentum", "adam",
                                  "adamw_amsgrad"])
def test_ema_layout_bitwise_equal_to_cpu(cp, case, layout):
    """The EMA's lerp is a written-out fused multiply-add on both sides: the same bits."""
    host, dev = _run_layout(cp, np.random.default_rng(40), CASES[case], EMA_LAYOUTS[layout],
                            steps=4, **EMA_DECAY)
    _assert_bits(cp, dev, host)


@pytest.mark.cuda
@pytest.mark.parametrize("layout", ["bfloat16/float32/ema", "float16/float32/master/ema"])
def test_ema_layout_with_stochastic_rounding(cp, layout):
    host, dev = _run_layout(cp, np.random.default_rng(41), CASES["adam"], EMA_LAYOUTS[layout],
                            stochastic=True, key=lambda t: 1234 + t, **EMA_DECAY)
    _assert_bits(cp, dev, host)


@pytest.mark.cuda
@pytest.mark.parametrize("layout", ["float32", "float64", "bfloat16/float32", "float16/float32"])
def test_ema_rule_bitwise_equal_to_cpu(cp, layout):
    case = ("ema", 0, _hyper("ema", decay=lambda t: 0.0 if t == 1 else 0.75))
    host, dev = _run_layout(cp, np.random.default_rng(42), case, LAYOUTS[layout])
    _assert_bits(cp, dev, host)


@pytest.mark.cuda
@pytest.mark.parametrize("cls, kwargs", [("Adam", {"lr": 1e-2}), ("SGD", {"lr": 0.1})])
def test_optimizer_with_ema_on_cupy_matches_numpy(cp, cls, kwargs):
    """A class with ema_decay on the GPU: the averages as on the CPU, bit for bit,
    also for a param without a gradient in a step (the EMA rule's pass)."""
    import fusedopt
    rng = np.random.default_rng(43)
    params = [rng.standard_normal(n).astype(np.float32) for n in SIZES]
    p_np, p_cp = [p.copy() for p in params], [cp.asarray(p) for p in params]
    opt_np = getattr(fusedopt, cls)(p_np, ema_decay=0.9, **kwargs)
    opt_cp = getattr(fusedopt, cls)(p_cp, ema_decay=0.9, **kwargs)
    for k in range(4):
        grads = [rng.standard_normal(n).astype(np.float32) for n in SIZES]
        if k == 2:
            grads[3] = None
        opt_np.step(grads)
        opt_cp.step([None if g is None else cp.asarray(g) for g in grads])
    cp.cuda.get_current_stream().synchronize()
    for i in range(len(SIZES)):
        assert cp.asnumpy(p_cp[i]).tobytes() == p_np[i].tobytes()
        assert cp.asnumpy(opt_cp.state[i]["ema"]).tobytes() == opt_np.state[i]["ema"].tobytes()


# --- Row-sparse steps (step_rows): the CPU's bits on the touched rows only ---------------

def _rows_data(rng, layout, shapes=((300, 7), (5, 64), (70000, 3))):
    """Host slots (param, gradient rows, 2 states) and distinct sorted row indices."""
    codes = _layout_codes(layout, 2)
    rows = [np.unique(rng.integers(0, s[0], max(1, s[0] // 3))) for s in shapes]
    values = [[rng.standard_normal(s).ravel() for s in shapes],
              [rng.standard_normal(len(r) * s[1]) for r, s in zip(rows, shapes)],
              [0.1 * rng.standard_normal(s).ravel() for s in shapes],
              [rng.uniform(0.1, 1.0, s).ravel() for s in shapes]]
    if layout[2] == 1:
        values.append([v.astype(np.float32).astype(np.float64) for v in values[0]])
    elif layout[2] == 2:
        values.append([1e-3 * rng.standard_normal(v.size) for v in values[0]])
    slots = [[_encode(codes[k], v) for v in slot] for k, slot in enumerate(values)]
    return slots, rows, [s[1] for s in shapes]


@pytest.mark.cuda
@pytest.mark.parametrize("layout", ["float32", "float64", "bfloat16/float32",
                                    "float16/float32/master", "bfloat16/bfloat16/kahan"])
def test_step_rows_bitwise_equal_to_cpu(cp, layout):
    from fusedopt import _cpu, _cuda
    lay = LAYOUTS[layout]
    slots, rows, row_len = _rows_data(np.random.default_rng(50), lay)
    host, dev = _place(np, slots), _place(cp, slots)
    drows = [cp.asarray(r) for r in rows]
    hyper = np.asarray(pack("sparse_adam", dict(lr=0.05, beta1=0.9, beta2=0.99, eps=1e-8,
                                                maximize=False)), np.float64)
    counts = np.array([len(r) for r in rows], np.int64)
    lens = np.array(row_len, np.int64)
    before = [cp.asnumpy(a) for a in dev[0]]
    for t in (1, 2):
        hp, _ = _table(host, lambda a: a.ctypes.data)
        dp, _ = _table(dev, lambda a: a.data.ptr)
        _cpu.step_rows("sparse_adam", lay[0], hp, np.array([r.ctypes.data for r in rows],
                                                           np.uint64), counts, lens, hyper,
                       state_dtype=lay[1], extra=lay[2], step=t)
        _cuda.step_rows("sparse_adam", lay[0], dp, np.array([r.data.ptr for r in drows],
                                                            np.uint64), counts, lens, hyper,
                        cp.cuda.get_current_stream().ptr, state_dtype=lay[1], extra=lay[2],
                        step=t)
    cp.cuda.get_current_stream().synchronize()
    _assert_bits(cp, dev, host)
    for j, (b, r, n) in enumerate(zip(before, rows, row_len)):  # untouched rows: as they were
        other = np.setdiff1d(np.arange(b.size // n), r)
        got = cp.asnumpy(dev[0][j]).reshape(-1, n)
        assert got[other].tobytes() == b.reshape(-1, n)[other].tobytes()


@pytest.mark.cuda
def test_functional_sparse_adam_on_cupy_matches_numpy(cp):
    import fusedopt.functional as F
    rng = np.random.default_rng(51)
    shape = (1000, 16)
    host = [rng.standard_normal(shape).astype(np.float32), np.zeros(shape, np.float32),
            np.zeros(shape, np.float32)]
    dev = [cp.asarray(a) for a in host]
    for t in range(1, 4):
        rows = rng.integers(0, 200, 300)  # repeats: summed on either side
        values = rng.standard_normal((300, 16)).astype(np.float32)
        F.sparse_adam_([host[0]], [rows], [values], [host[1]], [host[2]], step=t, lr=0.01,
                       beta1=0.9, beta2=0.999, eps=1e-8)
        F.sparse_adam_([dev[0]], [cp.asarray(rows)], [cp.asarray(values)], [dev[1]], [dev[2]],
                       step=t, lr=0.01, beta1=0.9, beta2=0.999, eps=1e-8)
    cp.cuda.get_current_stream().synchronize()
    for d, h in zip(dev, host):  # (the sums of repeats may be added in another order)
        np.testing.assert_allclose(cp.asnumpy(d), h, rtol=1e-5, atol=1e-6)


@pytest.mark.cuda
def test_sparse_adam_rows_on_another_device_are_refused(cp):
    import fusedopt.functional as F
    p, m, v = (cp.zeros((10, 4), cp.float32) for _ in range(3))
    with pytest.raises(TypeError, match=r"rows\[0\] is on cpu, params\[0\] is on cuda"):
        F.sparse_adam_([p], [np.array([1, 2])], [cp.ones((2, 4), cp.float32)], [m], [v],
                       step=1, lr=0.01, beta1=0.9, beta2=0.999, eps=1e-8)
    assert not p.any() and not m.any() and not v.any()


# --- Muon, Adafactor and fusedopt.torch.LBFGS on a GPU ----------------------------------

@pytest.mark.cuda
@pytest.mark.parametrize("ns_dtype", ["float32", "bfloat16"])
def test_muon_on_cupy_matches_numpy(cp, ns_dtype):
    """The momentum and update passes on the GPU, the Newton-Schulz iterations through
    CuPy's batched products: the CPU's results within float32 rounding (bfloat16's for
    the emulated bfloat16 iterations)."""
    import fusedopt.functional as F
    rng = np.random.default_rng(60)
    shapes = [(64, 96), (96, 64), (64, 96), (32, 32)]
    host = [[rng.standard_normal(s).astype(np.float32) for s in shapes],
            [np.zeros(s, np.float32) for s in shapes]]
    dev = [[cp.asarray(a) for a in lst] for lst in host]
    kw = dict(lr=0.02, weight_decay=0.1, momentum=0.95, nesterov=True, ns_dtype=ns_dtype)
    for _ in range(3):
        grads = [rng.standard_normal(s).astype(np.float32) for s in shapes]
        F.muon_(host[0], grads, host[1], **kw)
        F.muon_(dev[0], [cp.asarray(g) for g in grads], dev[1], **kw)
    cp.cuda.get_current_stream().synchronize()
    tol = 1e-5 if ns_dtype == "float32" else 2e-3
    for d, h in zip(dev[0] + dev[1], host[0] + host[1]):
        np.testing.assert_allclose(cp.asnumpy(d), h, rtol=tol, atol=tol)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_adafactor_on_cupy_matches_numpy(cp, dtype):
    """The five factored kernels against the CPU driver: the same math, sums associated
    differently (float32 rounding of the sums, far below the tolerance)."""
    import fusedopt.functional as F
    from fusedopt.algorithms import SPECS
    spec = SPECS["adafactor"]
    rng = np.random.default_rng(61)
    shapes = [(300, 70), (3, 40, 50), (1000,), (), (5, 1)]
    host = [[rng.standard_normal(s).astype(dtype) for s in shapes]]
    for name in ("row_var", "col_var", "variance"):
        host.append([None if spec.state_shape(name, s) is None else
                     np.zeros(spec.state_shape(name, s), dtype) for s in shapes])
    dev = [[None if a is None else cp.asarray(a) for a in lst] for lst in host]
    for t in range(1, 4):
        grads = [rng.standard_normal(s).astype(dtype) for s in shapes]
        kw = dict(step=t, lr=0.05, weight_decay=0.01)
        F.adafactor_(host[0], grads, *host[1:], **kw)
        F.adafactor_(dev[0], [cp.asarray(g) for g in grads], *dev[1:], **kw)
    cp.cuda.get_current_stream().synchronize()
    tol = 1e-10 if dtype == np.float64 else 1e-4
    for dl, hl in zip(dev, host):
        for d, h in zip(dl, hl):
            if h is not None:
                np.testing.assert_allclose(cp.asnumpy(d), h, rtol=tol, atol=tol * 1e-2)


@pytest.mark.cuda
def test_torch_lbfgs_on_cuda_matches_cpu(cuda_mod):
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("torch has no CUDA device")
    import fusedopt.torch as fot
    results = []
    for device in ("cpu", "cuda"):
        torch.manual_seed(3)
        model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(),
                                    torch.nn.Linear(8, 2)).double().to(device)
        g = torch.Generator().manual_seed(7)
        x = torch.randn(32, 6, generator=g, dtype=torch.float64).to(device)
        y = torch.randn(32, 2, generator=g, dtype=torch.float64).to(device)
        opt = fot.LBFGS(model.parameters(), line_search_fn="strong_wolfe", max_iter=4)

        def closure():
            opt.zero_grad()
            loss = ((model(x) - y) ** 2).mean()
            loss.backward()
            return loss

        for _ in range(3):
            opt.step(closure)
        results.append([p.detach().cpu().numpy() for p in model.parameters()])
    for a, b in zip(*results):
        np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-12)


# --- Streams, allocations and devices of checked steps (before the first GPU run) ---

def _spin(cp, stream, ns):
    """Keep `stream` busy for `ns` nanoseconds (one thread spinning on the clock)."""
    with stream:
        cp.RawKernel(_SPIN, "spin")((1,), (1,), (np.uint64(ns),))


@pytest.mark.cuda
def test_device_scalars_are_zeroed_on_their_stream(cp):
    """The zeros of a new DeviceScalars are ordered on the stream it is made for: with
    the legacy default stream busy, a non-blocking stream writes values after them and
    those values stay (zeros on the legacy stream would land last and wipe them)."""
    from fusedopt import _cuda
    stream = cp.cuda.Stream(non_blocking=True)
    _spin(cp, cp.cuda.Stream.null, 300_000_000)
    stats = _cuda.DeviceScalars(3, 0, stream.ptr)
    with stream:
        cp.asarray(stats)[...] = cp.asarray([1.0, 2.0, 3.0])
    cp.cuda.Device().synchronize()  # the legacy stream too
    stats.fetch(stream.ptr)
    assert stats.values() == [1.0, 2.0, 3.0]


@pytest.mark.cuda
def test_device_scalars_come_back_only_when_their_kernels_are_done(cp):
    """A buffer dropped while a kernel that writes it is still queued is not handed out
    again; once the kernel is done it is reused (no new allocation)."""
    from fusedopt import _cuda
    stream = cp.cuda.Stream(non_blocking=True)
    grads = cp.ones(1000, cp.float32)
    ptrs, sizes = _table([[grads]], lambda a: a.data.ptr)
    _spin(cp, stream, 300_000_000)
    first = _cuda.DeviceScalars(3, 0, stream.ptr)
    _cuda.grad_stats([(FLOAT32, ptrs, sizes)], stream.ptr, first.ptr)  # queued behind the spin
    busy = first.ptr
    del first
    second = _cuda.DeviceScalars(3, 0, stream.ptr)
    assert second.ptr != busy
    assert not stream.done
    stream.synchronize()
    kept = second.ptr
    del second
    third = _cuda.DeviceScalars(3, 0, stream.ptr)
    assert third.ptr in (busy, kept)


@pytest.mark.cuda
def test_dropping_a_checked_steps_outcome_does_not_wait(cp):
    """While the stream is busy for half a second, a checked step is enqueued and its
    DeviceStepInfo dropped: neither waits for the device (no cudaFree, no sync)."""
    import gc
    import time
    import fusedopt.functional as F
    rng = np.random.default_rng(30)
    data = _host_slots(rng, SIZES, 2, np.float32)
    dev = _place(cp, data)
    stream = cp.cuda.get_current_stream()
    # one checked step first: the pool's first pinned slab (cudaMallocHost may wait for
    # the device) is made here, outside the timed part
    F.adam_(dev[0], dev[1], dev[2], dev[3], **_adam_kwargs(1), max_grad_norm=1.0)
    cp.cuda.Device().synchronize()
    _spin(cp, stream, 500_000_000)
    t0 = time.perf_counter()
    for t in range(1, 4):
        info = F.adam_(dev[0], dev[1], dev[2], dev[3], **_adam_kwargs(t), max_grad_norm=1.0,
                       skip_nonfinite=True)
        del info
        gc.collect()
    elapsed = time.perf_counter() - t0
    assert not stream.done and elapsed < 0.25, elapsed
    stream.synchronize()


@pytest.mark.cuda
@pytest.mark.parametrize("checks", list(CHECKS))
def test_checked_steps_on_a_non_blocking_stream(cp, checks):
    """Functional ops and a class, their checks and updates on a non-blocking stream
    while the legacy default stream is busy: the same results as on the CPU, and the
    norms the host computes."""
    import fusedopt
    import fusedopt.functional as F
    opts = CHECKS[checks]
    rng = np.random.default_rng(31)
    data = _host_slots(rng, SIZES, 2, np.float32)
    host, dev = _place(np, data), _place(cp, data)
    params = [rng.standard_normal(n).astype(np.float32) for n in SIZES]
    p_np, p_cp = [p.copy() for p in params], [cp.asarray(p) for p in params]
    opt_np, opt_cp = fusedopt.Adam(p_np, lr=1e-2), fusedopt.Adam(p_cp, lr=1e-2)
    cp.cuda.Device().synchronize()
    stream = cp.cuda.Stream(non_blocking=True)
    for t in range(1, 4):
        grads = [(10.0 * rng.standard_normal(n)).astype(np.float32) for n in SIZES]
        _spin(cp, cp.cuda.Stream.null, 100_000_000)
        with stream:
            g_cp = [cp.asarray(g) for g in grads]
        got = F.adam_(dev[0], g_cp, dev[2], dev[3], **_adam_kwargs(t), stream=stream, **opts)
        want = F.adam_(host[0], grads, host[2], host[3], **_adam_kwargs(t), **opts)
        with stream:
            got_cls = opt_cp.step(g_cp, **opts)
        want_cls = opt_np.step(grads, **opts)
        for g, w in ((got, want), (got_cls, want_cls)):
            if w is None:
                assert g is None
            else:
                assert g.skipped == w.skipped
                assert g.grad_norm == pytest.approx(w.grad_norm, rel=1e-12)
    cp.cuda.Device().synchronize()
    _assert_same(cp, dev, host, np.float32)
    _assert_same(cp, [p_cp], [p_np], np.float32)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16])
def test_checked_step_across_launch_boundaries(cp, dtype):
    """grad_stats over more tensors than one launch holds, and a tensor of more chunks
    than one launch holds: the norm and the clipped update are the CPU's (up to the
    last bit of the norm, which sums in another order)."""
    import fusedopt.functional as F
    from fusedopt import _cuda
    dtype = np.dtype(dtype)
    lim = _cuda.launch_limits("grad_stats")
    rng = np.random.default_rng(32)
    sizes = [int(n) for n in rng.integers(0, 200, 2 * lim["max_tensors"] + 17)]
    sizes[lim["max_tensors"] - 1] = 3 * lim["chunk"] + 1  # cut across two launches
    sizes.append(lim["chunk"] * lim["max_blocks"] + 7)  # more chunks than one launch takes
    params = [rng.standard_normal(n).astype(dtype) for n in sizes]
    grads = [rng.standard_normal(n).astype(dtype) for n in sizes]
    state = np.float32 if dtype.itemsize == 2 else dtype
    host = [[p.copy() for p in params], [np.zeros(n, state) for n in sizes],
            [np.zeros(n, state) for n in sizes]]
    dev = [[cp.asarray(a) for a in slot] for slot in host]
    kw = dict(step=1, lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, max_grad_norm=1.0,
              skip_nonfinite=True)
    got = F.adam_(dev[0], [cp.asarray(g) for g in grads], dev[1], dev[2], **kw)
    want = F.adam_(host[0], grads, host[1], host[2], **kw)
    assert got.grad_norm == pytest.approx(want.grad_norm, rel=1e-12)
    cp.cuda.get_current_stream().synchronize()
    for k, (d, h) in enumerate(zip(dev, host)):
        for j, (a, b) in enumerate(zip(d, h)):
            np.testing.assert_allclose(cp.asnumpy(a).astype(np.float64), b.astype(np.float64),
                                       rtol=1e-6 if dtype.itemsize > 2 else 2e-3,
                                       atol=1e-7, err_msg=f"slot {k}, tensor {j}")


@pytest.mark.cuda
def test_noncontiguous_grads_with_an_explicit_stream(cp):
    """The copy of a non-contiguous gradient is made on the kernel's stream: freed when
    the call returns, it is not handed to allocations on another stream (which would
    overwrite it) before the kernel, held back by a spin, has read it."""
    import fusedopt.functional as F
    rng = np.random.default_rng(33)
    n = 1 << 20
    p_host = rng.standard_normal(n).astype(np.float32)
    g_host = rng.standard_normal(2 * n).astype(np.float32)
    p = cp.asarray(p_host)
    g = cp.asarray(g_host)[::2]  # every other element: copied
    cp.cuda.Device().synchronize()
    kernel_stream = cp.cuda.Stream(non_blocking=True)
    _spin(cp, kernel_stream, 300_000_000)
    F.sgd_([p], [g], lr=0.5, stream=kernel_stream)
    for _ in range(8):  # the current stream reuses whatever its pool has free
        junk = cp.full(n, 1e6, cp.float32)
        del junk
    kernel_stream.synchronize()
    np.testing.assert_allclose(cp.asnumpy(p), p_host - 0.5 * g_host[::2], rtol=1e-6)


@pytest.mark.cuda
def test_cuda_array_interface_without_a_device_attribute(cp):
    """An object with only __cuda_array_interface__ (no .device) is placed on the device
    that owns its memory, not on device 0 by default; host memory behind the interface
    is refused."""
    import fusedopt.functional as F
    from fusedopt import _arrays, _cuda

    class Bare:
        def __init__(self, a, ptr=None):
            self._cai = dict(a.__cuda_array_interface__)
            if ptr is not None:
                self._cai["data"] = (ptr, False)
            self._a = a

        @property
        def __cuda_array_interface__(self):
            return self._cai

    last = cp.cuda.runtime.getDeviceCount() - 1
    with cp.cuda.Device(last):
        p, g = cp.arange(4, dtype=cp.float32), cp.ones(4, dtype=cp.float32)
        assert _cuda.pointer_device(p.data.ptr) == last
        prep = _arrays.prepare("sgd_", [Bare(p)], [Bare(g)], [], [])
        assert prep.device == 1 + last
        F.sgd_([Bare(p)], [Bare(g)], lr=1.0)
        assert cp.asnumpy(p).tolist() == [-1.0, 0.0, 1.0, 2.0]
    host = np.zeros(4, np.float32)
    with pytest.raises(ValueError, match="not CUDA device memory"):
        _cuda.pointer_device(host.ctypes.data)
    with pytest.raises(TypeError, match="not on a CUDA device"):
        F.sgd_([Bare(p, host.ctypes.data)], [Bare(g)], lr=1.0)


@pytest.mark.cuda
def test_every_param_is_checked_for_its_device(cp):
    if cp.cuda.runtime.getDeviceCount() < 2:
        pytest.skip("needs two CUDA devices")
    from fusedopt import _cuda
    arrays = []
    for device in (0, 1, 0, 1):  # param 0, param 1 (on device 1), grads
        with cp.cuda.Device(device):
            arrays.append(cp.zeros(8, cp.float32))
    ptrs = np.array([a.data.ptr for a in arrays], np.uint64)
    with pytest.raises(ValueError, match=r"params\[1\] is on device 1, params\[0\] on device 0"):
        _cuda.step("sgd", 0, ptrs, np.full(2, 8, np.int64), np.zeros(7), 0)


def _torch_cuda():
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("this torch has no CUDA")
    import fusedopt
    if not fusedopt.cuda_available():
        pytest.skip(f"fusedopt cannot use the GPU: {fusedopt.cuda_unavailable_reason()}")
    return torch


@pytest.mark.cuda
@pytest.mark.parametrize("name, kwargs", [("Adam", dict(lr=1e-2, amsgrad=True)),
                                          ("AdamW", dict(lr=1e-2)),
                                          ("SGD", dict(lr=0.1, momentum=0.9, nesterov=True)),
                                          ("RMSprop", dict(centered=True, momentum=0.5))])
def test_torch_cuda_tensors_on_a_torch_stream(name, kwargs):
    """fusedopt.torch on CUDA tensors, stepped inside `torch.cuda.stream(s)` (a side
    stream, gradients written there): the CPU run of the same optimizer."""
    torch = _torch_cuda()
    import fusedopt.torch as fot
    rng = np.random.default_rng(34)
    values = [rng.standard_normal(n).astype(np.float32) for n in SIZES]
    cpu = [torch.tensor(v, requires_grad=True) for v in values]
    gpu = [torch.tensor(v, device="cuda", requires_grad=True) for v in values]
    opt_cpu, opt_gpu = getattr(fot, name)(cpu, **kwargs), getattr(fot, name)(gpu, **kwargs)
    side = torch.cuda.Stream()
    torch.cuda.synchronize()
    for _ in range(3):
        grads = [rng.standard_normal(n).astype(np.float32) for n in SIZES]
        for p, g in zip(cpu, grads):
            p.grad = torch.tensor(g)
        with torch.cuda.stream(side):
            for p, g in zip(gpu, grads):
                p.grad = torch.tensor(g).to("cuda", non_blocking=False)
            opt_gpu.step()
        opt_cpu.step()
    torch.cuda.synchronize()
    for i, (a, b) in enumerate(zip(gpu, cpu)):
        np.testing.assert_allclose(a.detach().cpu().numpy(), b.detach().numpy(), rtol=1e-6,
                                   atol=1e-7, err_msg=f"params[{i}]")
        for key, v in opt_cpu.state[b].items():
            np.testing.assert_allclose(opt_gpu.state[a][key].cpu().numpy(), v.numpy(),
                                       rtol=1e-6, atol=1e-7, err_msg=f"{key} of {i}")


@pytest.mark.cuda
def test_functional_checked_step_on_torch_tensors_and_stream():
    """Functional adam_ with loss scaling, clipping and skipping on torch CUDA tensors,
    non-contiguous gradients (transposed), `stream=` a torch stream: the CPU's results;
    the copies of the gradients are not reused by torch's allocator too early."""
    torch = _torch_cuda()
    import fusedopt.functional as F
    rng = np.random.default_rng(35)
    shapes = [(64, 32), (3, 5), (1, 1), (0, 4)]
    host = [[rng.standard_normal(s).astype(np.float32) for s in shapes]]
    host += [[np.abs(rng.standard_normal(s)).astype(np.float32) for s in shapes]
             for _ in range(2)]
    dev = [[torch.tensor(a, device="cuda") for a in slot] for slot in host]
    side = torch.cuda.Stream()
    torch.cuda.synchronize()
    for t in range(1, 4):
        grads = [rng.standard_normal(s[::-1]).astype(np.float32) * 50 for s in shapes]
        if t == 2:
            grads[0][3, 4] = np.inf
        g_dev = [torch.tensor(g, device="cuda").t() for g in grads]  # non-contiguous
        g_host = [np.ascontiguousarray(g.T) for g in grads]
        kw = dict(_adam_kwargs(t), loss_scale=16.0, max_grad_norm=2.0, skip_nonfinite=True)
        got = F.adam_(dev[0], g_dev, dev[1], dev[2], stream=side, **kw)
        want = F.adam_(host[0], g_host, host[1], host[2], **kw)
        del g_dev
        junk = [torch.full(s, 1e6, device="cuda") for s in shapes]  # on the current stream
        del junk
        assert got.skipped == want.skipped
        assert got.grad_norm == pytest.approx(want.grad_norm, rel=1e-12)
    torch.cuda.synchronize()
    for k, (d, h) in enumerate(zip(dev, host)):
        for j, (a, b) in enumerate(zip(d, h)):
            np.testing.assert_allclose(a.cpu().numpy(), b, rtol=1e-6, atol=1e-7,
                                       err_msg=f"slot {k}, tensor {j}")


# --- 8-bit state (uint8 codes with float32 block scales): bit for bit --------------------------

INT8_BLOCK = 4  # the storage code of 8-bit states
# (kernel case, bit mask of the states that use the unsigned code table)
Q8_CASES = {"adam": 0b10, "adamw_amsgrad": 0b110, "sgd_momentum": 0, "adagrad": 0b1,
            "rmsprop_momentum": 0b1, "adadelta": 0b11}
Q8_LAYOUTS = {"float32": (FLOAT32, 0), "bfloat16": (BFLOAT16, 0), "float16": (FLOAT16, 0),
              "bfloat16/master": (BFLOAT16, 1), "float16/kahan": (FLOAT16, 2)}


def _q8_slots(rng, sizes, nstates, unsigned, param, extra):
    """Host slots: params, grads, each state's codes, the extra buffer, each state's
    scales (codes of random states, quantized by the CPU module)."""
    from fusedopt import _cpu
    values = [[rng.standard_normal(n) for n in sizes] for _ in range(2)]
    slots = [[_encode(param, v) for v in slot] for slot in values]
    codes, scales = [], []
    for k in range(nstates):
        positive = (unsigned >> k) & 1
        pairs = [_cpu.quantize_blockwise(
            (rng.uniform(0.05, 1.0, n) if positive else 0.5 * rng.standard_normal(n))
            .astype(np.float32), not positive) for n in sizes]
        codes.append([c for c, _ in pairs])
        scales.append([s for _, s in pairs])
    slots += codes
    if extra == 1:
        slots.append([v.astype(np.float32) for v in values[0]])
    elif extra == 2:
        slots.append([_encode(param, 1e-3 * rng.standard_normal(n)) for n in sizes])
    return slots + scales


def _run_q8(cp, rng, case, layout, sizes=SIZES, steps=3, **mode):
    kernel, nstates, hyper = CASES[case]
    param, extra = Q8_LAYOUTS[layout]
    data = _q8_slots(rng, sizes, nstates, Q8_CASES[case], param, extra)
    host, dev = _place(np, data), _place(cp, data)
    for t in range(1, steps + 1):
        _new_grads(rng, host, dev, param, cp)
        kw = dict(state_dtype=INT8_BLOCK, extra=extra, step=t, unsigned_states=Q8_CASES[case],
                  **mode)
        _cpu_step(kernel, param, host, hyper(t), **kw)
        _gpu_step(cp, kernel, param, dev, hyper(t), **kw)
    cp.cuda.get_current_stream().synchronize()
    return host, dev


def test_8bit_layouts_have_kernels(cuda_mod):
    for param, extra in Q8_LAYOUTS.values():
        for case in Q8_CASES:
            assert cuda_mod.has_kernel(CASES[case][0], param, INT8_BLOCK, extra)
        assert not cuda_mod.has_kernel("sgd", param, INT8_BLOCK, extra)  # no state to store
        assert not cuda_mod.has_kernel("stream2", param, INT8_BLOCK, extra)
    with pytest.raises(ValueError, match="unsupported storage layout"):
        cuda_mod.step("adam", 1, np.zeros(6, np.uint64), np.ones(1, np.int64), np.zeros(9), 0,
                      state_dtype=INT8_BLOCK)  # float64 params
    with pytest.raises(ValueError, match="expected 6 x 1 pointers, got 4"):
        cuda_mod.step("adam", 0, np.zeros(4, np.uint64), np.ones(1, np.int64), np.zeros(9), 0,
                      state_dtype=INT8_BLOCK)
    assert cuda_mod.launch_limits("adam_amsgrad", extra=1, state_dtype=INT8_BLOCK)[
        "max_tensors"] >= 100


def test_8bit_layouts_have_no_ema_slot(cuda_mod):
    """No EMA slot next to 8-bit state: no kernel, and the step refuses the layout."""
    for param, extra in Q8_LAYOUTS.values():
        if extra != 2:
            assert not cuda_mod.has_kernel("adam", param, INT8_BLOCK, extra | 4)
    with pytest.raises(ValueError, match="adam: no EMA slot with 8-bit state"):
        cuda_mod.step("adam", 0, np.zeros(7, np.uint64), np.ones(1, np.int64), np.zeros(9), 0,
                      state_dtype=INT8_BLOCK, extra=4, ema_decay=0.5)


@pytest.mark.cuda
@pytest.mark.parametrize("layout", list(Q8_LAYOUTS))
@pytest.mark.parametrize("case", list(Q8_CASES))
def test_8bit_bitwise_equal_to_cpu(cp, case, layout):
    """Params, codes and scales: the same bits as the CPU kernels (tensors of one
    element, partial blocks, and several chunks)."""
    host, dev = _run_q8(cp, np.random.default_rng(30), case, layout, grad_scale=0.5)
    _assert_bits(cp, dev, host)


@pytest.mark.cuda
@pytest.mark.parametrize("layout", ["bfloat16", "float16", "bfloat16/master"])
def test_8bit_stochastic_rounding_same_bits_as_cpu(cp, layout):
    host, dev = _run_q8(cp, np.random.default_rng(31), "adam", layout, stochastic=True,
                        key=12345)
    _assert_bits(cp, dev, host)


@pytest.mark.cuda
def test_8bit_more_tensors_than_one_launch_holds(cp):
    from fusedopt import _cuda
    lim = _cuda.launch_limits("adam", state_dtype=INT8_BLOCK)
    rng = np.random.default_rng(32)
    sizes = [int(n) for n in rng.integers(0, 3000, 2 * lim["max_tensors"] + 5)]
    sizes[7] = 2 * lim["chunk"] + 300
    host, dev = _run_q8(cp, rng, "adam", "float32", sizes=sizes, steps=2)
    _assert_bits(cp, dev, host)


@pytest.mark.cuda
def test_8bit_torch_classes_on_the_gpu():
    """fusedopt.torch.AdamW8bit on CUDA tensors: the same params and state as on the CPU."""
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("torch has no CUDA device")
    import fusedopt.torch as fot
    rng = np.random.default_rng(33)
    start = [torch.tensor(rng.standard_normal(s), dtype=torch.float32) for s in [(300, 70), (5000,)]]
    runs = {}
    for device in ("cpu", "cuda"):
        params = [p.to(device).requires_grad_() for p in start]
        opt = fot.AdamW8bit(params, lr=1e-2, min_8bit_size=0)
        for t in range(3):
            for j, p in enumerate(params):
                p.grad = torch.tensor(np.random.default_rng(100 * t + j).standard_normal(p.shape),
                                      dtype=torch.float32, device=device)
            opt.step()
        torch.cuda.synchronize()
        runs[device] = [p.detach().cpu() for p in params] + \
            [v.cpu() for p in params for v in opt.state[p].values() if torch.is_tensor(v)]
    for a, b in zip(runs["cpu"], runs["cuda"]):
        assert torch.equal(a, b)

# --- Two-pass rules (LAMB, LARS): per-tensor sums on the device --------------------

def _assert_layout_close(cp, dev, host, layout, nstates):
    """Decoded slots within one unit in the last place of their storage (16-bit and
    float32) or 1e-12 (float64), relative to each tensor's largest value: the trust
    ratios of both devices agree to rounding, and a result may round the other way."""
    codes = _layout_codes(layout, nstates)
    ulp = {FLOAT16: 2.0**-10, BFLOAT16: 2.0**-7, FLOAT32: 2.0**-22, FLOAT64: 1e-12}
    for k, (dev_slot, host_slot) in enumerate(zip(dev, host)):
        for j, (d, h) in enumerate(zip(dev_slot, host_slot)):
            got, want = _decode(codes[k], cp.asnumpy(d)), _decode(codes[k], h)
            tol = ulp[codes[k]] * (np.abs(want) + 1e-3 * np.abs(want).max(initial=0.0))
            np.testing.assert_array_less(np.abs(got - want), tol + 1e-300,
                                         err_msg=f"slot {k}, tensor {j} ({h.size} elements)")


TWO_PASS_LAYOUTS = ["float32", "float64", "bfloat16/float32/master", "float16/float32",
                    "float16/bfloat16/kahan", "bfloat16/bfloat16"]


@pytest.mark.cuda
@pytest.mark.parametrize("layout", TWO_PASS_LAYOUTS)
@pytest.mark.parametrize("case", sorted(TWO_PASS))
def test_two_pass_layouts_match_cpu(cp, case, layout):
    host, dev = _run_layout(cp, np.random.default_rng(30), CASES[case], LAYOUTS[layout],
                            grad_scale=0.5)
    _assert_layout_close(cp, dev, host, LAYOUTS[layout], CASES[case][1])


@pytest.mark.cuda
@pytest.mark.parametrize("case", sorted(TWO_PASS))
def test_two_pass_is_deterministic(cp, case):
    """The sums have a fixed association (no atomics): two runs give the same bits, on
    tensors of many chunks."""
    sizes = [5 * 65536 + 3, 1, 70000, 0, 4097]
    runs = [_run_layout(cp, np.random.default_rng(31), CASES[case], LAYOUTS["float32"],
                        sizes=sizes)[1] for _ in range(2)]
    _assert_bits(cp, runs[0], [[cp.asnumpy(a) for a in slot] for slot in runs[1]])


@pytest.mark.cuda
@pytest.mark.parametrize("case", sorted(TWO_PASS))
def test_two_pass_across_launches(cp, case):
    """More tensors than one launch holds, one of them cut across two launches, one
    Hyper per tensor: every tensor's sums are its own chunks' (the chunk table numbers
    them across launches)."""
    from fusedopt import _cuda
    kernel = CASES[case][0]
    lim = _cuda.launch_limits(kernel)
    rng = np.random.default_rng(32)
    sizes = [int(n) for n in rng.integers(0, 3000, 2 * lim["max_tensors"] + 50)]
    sizes[lim["max_tensors"] - 1] = 2 * lim["chunk"] + 3
    sizes[7] = lim["chunk"] * lim["max_blocks"] + 11  # itself more than one launch
    host, dev = _run_layout(cp, rng, CASES[case], LAYOUTS["float32"], sizes=sizes, steps=2,
                            per_tensor=True)
    _assert_layout_close(cp, dev, host, LAYOUTS["float32"], CASES[case][1])


@pytest.mark.cuda
@pytest.mark.parametrize("case", sorted(TWO_PASS))
def test_two_pass_single_tensor_launch(cp, case):
    """One non-empty tensor among empty ones (a flat buffer) runs as one launch without a
    block map, larger than one batch: its first pass numbers the chunks as the update's
    chunk table does."""
    from fusedopt import _cuda
    lim = _cuda.launch_limits(CASES[case][0])
    sizes = [0, lim["chunk"] * lim["max_blocks"] + 11, 0]
    assert _cuda.count_launches(CASES[case][0], np.array(sizes, np.int64)) == 1
    host, dev = _run_layout(cp, np.random.default_rng(35), CASES[case], LAYOUTS["float32"],
                            sizes=sizes, steps=2)
    _assert_layout_close(cp, dev, host, LAYOUTS["float32"], CASES[case][1])


@pytest.mark.cuda
@pytest.mark.parametrize("case", sorted(TWO_PASS))
def test_two_pass_scale_ptr_and_step_ptr(cp, case):
    """The gradient coefficient on the device scales both passes; a skipped step writes
    nothing; the step count on the device gives LAMB's bias corrections."""
    from fusedopt import _cuda
    kernel, nstates, hyper = CASES[case]
    lay = LAYOUTS["float32"]
    rng = np.random.default_rng(33)
    data = _layout_slots(rng, SIZES, nstates, lay)
    host, dev = _place(np, data), _place(cp, data)
    scale = cp.asarray([0.0, 0.25, 3.0])
    count = cp.zeros(1, cp.float64)
    stream = cp.cuda.get_current_stream()
    for t, skip in ((1, False), (2, True), (2, False)):
        _new_grads(rng, host, dev, lay[0], cp)
        scale[0] = float(skip)
        if not skip:
            _cpu_step(kernel, lay[0], host, hyper(t), grad_scale=0.25, step=t)
        _cuda.advance_step(count.data.ptr, scale.data.ptr, stream.ptr)
        _gpu_step(cp, kernel, lay[0], dev, hyper(t), step=1e9, scale_ptr=scale.data.ptr,
                  step_ptr=count.data.ptr)
    stream.synchronize()
    assert float(count[0]) == 2.0
    _assert_layout_close(cp, dev, host, lay, nstates)


@pytest.mark.cuda
@pytest.mark.parametrize("cls, kwargs", [("Lion", dict(lr=1e-2, weight_decay=0.1)),
                                         ("LAMB", dict(lr=1e-2, weight_decay=0.01)),
                                         ("LARS", dict(lr=1.0, trust_coefficient=0.01)),
                                         ("AdamWScheduleFree", dict(lr=1e-2, warmup_steps=2))])
def test_new_algorithms_on_cupy_match_numpy(cp, cls, kwargs):
    """The classes on CuPy arrays against the same classes on NumPy arrays (train/eval
    switches included for schedule-free AdamW)."""
    import fusedopt
    rng = np.random.default_rng(34)
    params = [rng.standard_normal(n).astype(np.float32) for n in SIZES]
    p_np, p_cp = [p.copy() for p in params], [cp.asarray(p) for p in params]
    opt_np = getattr(fusedopt, cls)(p_np, **kwargs)
    opt_cp = getattr(fusedopt, cls)(p_cp, **kwargs)
    modes = hasattr(opt_np, "train")
    for _ in range(2):
        if modes:
            opt_np.train()
            opt_cp.train()
        for _ in range(3):
            grads = [rng.standard_normal(n).astype(np.float32) for n in SIZES]
            opt_np.step(grads)
            opt_cp.step([cp.asarray(g) for g in grads])
        if modes:
            opt_np.eval()
            opt_cp.eval()
    cp.cuda.get_current_stream().synchronize()
    _assert_same(cp, [p_cp], [p_np], np.float32, scaled=cls in ("LAMB", "LARS"))
    _assert_tree_same(cp, opt_cp.state_dict()["state"], opt_np.state_dict()["state"],
                      np.float32, scaled=cls in ("LAMB", "LARS"))


# --- flat buffers: one launch -------------------------------------------------------------


def test_a_single_tensor_is_one_launch(cuda_mod):
    """Host-side packing (no GPU needed): a flat buffer of any size is one launch without
    a block map; the same elements as many tensors take one launch per batch."""
    lim = cuda_mod.launch_limits("adam")
    big = lim["chunk"] * lim["max_blocks"] * 3 + 5  # three batches' worth as one tensor
    assert cuda_mod.count_launches("adam", np.array([big], np.int64)) == 1
    assert cuda_mod.count_launches("adam", np.array([0, big, 0], np.int64)) == 1
    split = np.full(4, big // 4, np.int64)
    assert cuda_mod.count_launches("adam", split) >= 2
    many = np.full(lim["max_tensors"] + 1, 3, np.int64)
    assert cuda_mod.count_launches("adam", many) == 2


def test_single_tensor_launch_matches_cpu_beyond_one_batch(cp, rng):
    """The contiguous kernel's chunks cover a tensor larger than one batch's blocks."""
    from fusedopt import _cuda

    lim = _cuda.launch_limits("sgd_momentum")
    sizes = [lim["chunk"] * lim["max_blocks"] + 7]
    host, dev = _run_both(cp, rng, CASES["sgd_momentum"], np.float32, sizes)
    _assert_same(cp, dev, host, np.float32, bitwise=True)


@pytest.mark.parametrize("ema_decay", [None, 0.9])
def test_torch_flat_optimizer_on_cuda_matches_default(ema_decay):
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("torch has no CUDA device")
    import fusedopt.torch as fot

    runs = []
    for flat in (False, True):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(),
                                    torch.nn.Linear(32, 4)).cuda()
        opt = fot.AdamW(model.parameters(), lr=1e-2, flat=flat, ema_decay=ema_decay)
        x = torch.randn(64, 16, device="cuda")
        for k in range(20):
            opt.zero_grad()
            model(x).pow(2).mean().backward()
            if k == 17:  # a param without a gradient: the per-tensor path, once
                model[0].bias.grad = None
            opt.step()
        runs.append([p.detach().cpu() for p in model.parameters()])
        if ema_decay is not None:
            runs[-1] += [opt.state[p]["ema"].cpu() for p in model.parameters()]
    for a, b in zip(*runs):
        assert torch.equal(a, b)
