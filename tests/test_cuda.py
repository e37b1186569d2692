"""The CUDA backend, fusedopt._cuda.

The module itself is checked everywhere it was built (import and device count
need no GPU). Kernel results are checked against the CPU module on the same
inputs: the CPU kernels are tested against the float64 references elsewhere, so
parity with them is the check here. Both builds round every operation the same
way (no FMA contraction on either side), so the results should agree bit for
bit: test_bitwise_equal_to_cpu holds the build to that, the other tests allow
a relative error of 1e-6 (float32) or 1e-12 (float64).

GPU tests need CuPy and a device, and skip with the reason otherwise. CI sets
FUSEDOPT_REQUIRE_CUDA=1, which turns a missing module into a failure.
"""
import importlib.util
import math
import os

import numpy as np
import pytest

SIZES = (0, 1, 7, 4097, 278011)
RTOL = {np.float32: 1e-6, np.float64: 1e-12}
DTYPE_CODE = {np.float32: 0, np.float64: 1}


def _cuda_built():
    try:
        return importlib.util.find_spec("fusedopt._cuda") is not None
    except ModuleNotFoundError:
        return False


def _adam(amsgrad=False, decoupled=False, maximize=False, lr=1e-2, b1=0.9, b2=0.999, wd=0.05):
    def hyper(t):
        return [lr, b1, b2, 1e-8, 0.0 if decoupled else wd, 1.0 - lr * wd if decoupled else 1.0,
                lr / (1.0 - b1**t), 1.0 / math.sqrt(1.0 - b2**t), float(maximize)]
    return ("adam_amsgrad" if amsgrad else "adam", 3 if amsgrad else 2, hyper)


# (kernel, state count, hyper(t)): each Hyper struct of csrc/core, field by field.
CASES = {
    "sgd": ("sgd", 0, lambda t: [0.1, 0.0, 0.0, 0.01, 0.0, 0.0, 0.0]),
    "sgd_maximize": ("sgd", 0, lambda t: [0.1, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0]),
    "sgd_momentum": ("sgd_momentum", 1, lambda t: [0.1, 0.9, 0.1, 0.01, 0.0, 0.0, float(t == 1)]),
    "sgd_nesterov": ("sgd_momentum", 1, lambda t: [0.1, 0.9, 0.0, 0.0, 1.0, 0.0, float(t == 1)]),
    "adagrad": ("adagrad", 1, lambda t: [0.1 / (1 + (t - 1) * 0.01), 1e-10, 0.01, 0.0]),
    "rmsprop": ("rmsprop", 1, lambda t: [0.01, 0.99, 1e-8, 0.01, 0.0, 0.0]),
    "rmsprop_momentum": ("rmsprop_momentum", 2, lambda t: [0.01, 0.99, 1e-8, 0.0, 0.9, 0.0]),
    "rmsprop_centered": ("rmsprop_centered", 2, lambda t: [0.01, 0.9, 1e-8, 0.01, 0.0, 1.0]),
    "rmsprop_centered_momentum": ("rmsprop_centered_momentum", 3,
                                  lambda t: [0.01, 0.9, 1e-8, 0.01, 0.9, 0.0]),
    "adadelta": ("adadelta", 2, lambda t: [1.0, 0.9, 1e-6, 0.01, 0.0]),
    "adam": _adam(),
    "adamw": _adam(decoupled=True),
    "adam_maximize": _adam(maximize=True),
    "adam_amsgrad": _adam(amsgrad=True),
    "adamw_amsgrad": _adam(amsgrad=True, decoupled=True),
    **{f"stream{k}": (f"stream{k}", k, lambda t: [0.5]) for k in range(4)},
}


# --- The module, with or without a GPU ---------------------------------------

NOT_BUILT = "fusedopt._cuda was not built (no CUDA compiler at build time)"


@pytest.fixture(scope="module")
def cuda_mod():
    if not _cuda_built():
        pytest.skip(NOT_BUILT)
    from fusedopt import _cuda
    return _cuda


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


@pytest.mark.parametrize("ptrs, hyper, match", [
    (4, 8, "expected 9 hyperparameters, got 8"),
    (3, 9, "expected 4 x 1 pointers, got 3"),
])
def test_bad_tables_raise_before_any_cuda_call(cuda_mod, ptrs, hyper, match):
    with pytest.raises(ValueError, match=match):
        cuda_mod.step("adam", 0, np.zeros(ptrs, np.uint64), np.ones(1, np.int64),
                      np.zeros(hyper), 0)


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


def _cpu_step(kernel, dtype, slots, hyper):
    from fusedopt import _cpu
    ptrs, sizes = _table(slots, lambda a: a.ctypes.data)
    _cpu.step(kernel, DTYPE_CODE[dtype], ptrs, sizes, np.asarray(hyper, np.float64))


def _gpu_step(cp, kernel, dtype, slots, hyper, stream=None):
    from fusedopt import _cuda
    ptrs, sizes = _table(slots, lambda a: a.data.ptr)
    stream = cp.cuda.get_current_stream() if stream is None else stream
    _cuda.step(kernel, DTYPE_CODE[dtype], ptrs, sizes, np.asarray(hyper, np.float64), stream.ptr)


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
        _cpu_step(kernel, dtype, host, hyper(t))
        _gpu_step(cp, kernel, dtype, dev, hyper(t))
    cp.cuda.get_current_stream().synchronize()
    return host, dev


def _assert_same(cp, dev, host, dtype, bitwise=False):
    for k, (dev_slot, host_slot) in enumerate(zip(dev, host)):
        for j, (d, h) in enumerate(zip(dev_slot, host_slot)):
            got = cp.asnumpy(d)
            where = f"slot {k}, tensor {j} ({h.size} elements)"
            if bitwise:
                assert got.tobytes() == h.tobytes(), where
            np.testing.assert_allclose(got, h, rtol=RTOL[dtype], err_msg=where)


DTYPES = pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])


@pytest.mark.cuda
@DTYPES
@pytest.mark.parametrize("case", list(CASES))
def test_matches_cpu(cp, case, dtype):
    host, dev = _run_both(cp, np.random.default_rng(0), CASES[case], dtype, SIZES)
    _assert_same(cp, dev, host, dtype)


# Every operation rounds the same way on both sides (--fmad=false for nvcc,
# -ffp-contract=off for the CPU, IEEE division and square root on both): a
# difference in the last bit means a contraction or an approximation crept in.
@pytest.mark.cuda
@DTYPES
@pytest.mark.parametrize("case", ["adam", "adamw_amsgrad", "rmsprop_centered_momentum", "adadelta"])
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
        _gpu_step(cp, kernel, np.float32, dev, hyper(1), stream=stream)
    stream.synchronize()
    _cpu_step(kernel, np.float32, host, hyper(1))
    _assert_same(cp, dev, host, np.float32)


@pytest.mark.cuda
def test_legacy_default_stream(cp):
    kernel, nstates, hyper = CASES["adagrad"]
    data = _host_slots(np.random.default_rng(6), SIZES, nstates, np.float64)
    host, dev = _place(np, data), _place(cp, data)
    _cpu_step(kernel, np.float64, host, hyper(1))
    _gpu_step(cp, kernel, np.float64, dev, hyper(1), stream=cp.cuda.Stream.null)
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
    _cpu_step(kernel, np.float32, host, hyper(1))
    _gpu_step(cp, kernel, np.float32, dev, hyper(1), stream=cp.cuda.Stream.null)
    with cp.cuda.Device(1):
        cp.cuda.Device(1).synchronize()
        _assert_same(cp, dev, host, np.float32)


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


def _assert_tree_same(cp, dev, host, dtype, where="state"):
    if isinstance(host, dict):
        assert sorted(map(str, dev)) == sorted(map(str, host)), where
        for key in host:
            _assert_tree_same(cp, dev[key], host[key], dtype, f"{where}[{key!r}]")
    elif isinstance(host, (list, tuple)):
        assert len(dev) == len(host), where
        for i, (d, h) in enumerate(zip(dev, host)):
            _assert_tree_same(cp, d, h, dtype, f"{where}[{i}]")
    else:
        got = cp.asnumpy(dev) if isinstance(dev, cp.ndarray) else np.asarray(dev)
        np.testing.assert_allclose(got, np.asarray(host), rtol=RTOL[dtype], err_msg=where)


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
