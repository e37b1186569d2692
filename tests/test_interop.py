"""Arrays from other libraries: updated in place where they can be, refused untouched where not.

Accepted: NumPy arrays, objects with `__array_interface__`, DLPack producers (the
versioned 1.x capsule and the legacy one), PyTorch tensors (also leaf tensors that
require grad), and on a GPU CuPy arrays, torch CUDA tensors and
`__cuda_array_interface__` objects. Each accepted kind is updated in place and the
producer sees the change. Each refused kind raises and every array stays as it was.
"""

from __future__ import annotations

import copy
import ctypes
import gc
import sys
from types import SimpleNamespace

import numpy as np
import pytest

import fusedopt
from fusedopt import _dlpack, _engine
from fusedopt import functional as F

torch = pytest.importorskip("torch")


# --- producers ------------------------------------------------------------------------------


class ArrayInterfaceOnly:
    """Exposes nothing but `__array_interface__`."""

    def __init__(self, a):
        self._a = a

    @property
    def __array_interface__(self):
        return self._a.__array_interface__


class DLPackOnly:
    """Exposes nothing but `__dlpack__` / `__dlpack_device__`, and records the calls."""

    def __init__(self, a):
        self._a = a
        self.calls = []

    def __dlpack__(self, **kwargs):
        self.calls.append(kwargs)
        return self._a.__dlpack__(**kwargs)

    def __dlpack_device__(self):
        return self._a.__dlpack_device__()


class LegacyDLPack(DLPackOnly):
    """A producer from before DLPack 1.0: no `max_version`, legacy capsules only."""

    def __dlpack__(self, stream=None):
        self.calls.append({"stream": stream})
        return self._a.__dlpack__()


class RefusingProducer(DLPackOnly):
    def __dlpack__(self, **kwargs):
        raise BufferError("this buffer cannot be exported")


class ForeignDevice(DLPackOnly):
    def __dlpack_device__(self):
        return (3, 0)  # CUDA host memory


class FakeJaxArray(DLPackOnly):
    """Stands in for a JAX array: the type's module is what identifies JAX."""


FakeJaxArray.__module__ = "jaxlib.xla_extension"


def sgd(params, grads, lr=0.5):
    F.sgd_(params, grads, lr=lr)


def expected_sgd(p, g, lr=0.5):
    return p - lr * g


# --- accepted kinds, updated in place -------------------------------------------------------


def test_numpy_in_place():
    p, g = np.arange(5.0), np.ones(5)
    want = expected_sgd(p, g)
    sgd([p], [g])
    np.testing.assert_array_equal(p, want)


def test_array_interface_only():
    a, g = np.arange(6.0).reshape(2, 3), np.full((2, 3), 2.0)
    want = expected_sgd(a, g)
    sgd([ArrayInterfaceOnly(a)], [ArrayInterfaceOnly(g)])
    np.testing.assert_array_equal(a, want)


def test_dlpack_versioned_in_place():
    a, g = np.arange(7, dtype=np.float32), np.ones(7, dtype=np.float32)
    want = expected_sgd(a, g)
    wp, wg = DLPackOnly(a), DLPackOnly(g)
    sgd([wp], [wg])
    np.testing.assert_array_equal(a, want)
    # a CPU producer is asked for the versioned capsule and given no stream
    assert wp.calls == [{"max_version": (1, 0)}]


def test_dlpack_legacy_in_place():
    a, g = np.arange(7.0), np.ones(7)
    want = expected_sgd(a, g)
    wp = LegacyDLPack(a)
    sgd([wp], [LegacyDLPack(g)])
    np.testing.assert_array_equal(a, want)
    assert wp.calls == [{"stream": None}]  # asked once with max_version, refused, then legacy


def test_dlpack_from_torch_producer():
    t, g = torch.arange(5, dtype=torch.float64), torch.ones(5, dtype=torch.float64)
    want = t - 0.5 * g
    sgd([DLPackOnly(t)], [DLPackOnly(g)])
    assert torch.equal(t, want)


def test_dlpack_strided_view_is_described_with_its_strides():
    base = np.zeros((4, 6))
    sgd([DLPackOnly(base[1:3])], [np.ones((2, 6))])  # a contiguous block inside a larger array
    np.testing.assert_array_equal(base[1:3], -0.5)
    np.testing.assert_array_equal(base[[0, 3]], 0.0)


def test_torch_cpu_tensors_in_place():
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(3, 4, dtype=torch.float64)),
              torch.nn.Parameter(torch.randn(5, dtype=torch.float64)),
              torch.randn(2, 2, dtype=torch.float32, requires_grad=True)]
    grads = [torch.randn_like(p) for p in params]
    exp_avgs = [torch.zeros_like(p) for p in params]
    exp_avg_sqs = [torch.zeros_like(p) for p in params]
    np_params = [p.detach().numpy().copy() for p in params]
    np_states = [[s.numpy().copy() for s in exp_avgs], [s.numpy().copy() for s in exp_avg_sqs]]
    ptrs = [p.data_ptr() for p in params]
    kw = dict(step=1, lr=0.1, beta1=0.9, beta2=0.99, eps=1e-8)
    F.adam_(params, grads, exp_avgs, exp_avg_sqs, **kw)
    F.adam_(np_params, [g.numpy() for g in grads], *np_states, **kw)
    for p, q in zip(params, np_params):
        np.testing.assert_array_equal(p.detach().numpy(), q)
    for s, q in zip(exp_avgs, np_states[0]):
        np.testing.assert_array_equal(s.numpy(), q)
    assert [p.data_ptr() for p in params] == ptrs
    assert all(p.requires_grad and p.is_leaf for p in params)


@pytest.mark.parametrize("n", [1, 47, 48, 49, 300])
def test_torch_lists_of_any_length(n):
    """Short lists and long lists take different description paths: both agree with NumPy."""
    rng = np.random.default_rng(n)
    shapes = [(int(k % 5),) if k % 3 else (2, int(k % 4) + 1) for k in range(n)]
    dtypes = [np.float32 if k % 2 else np.float64 for k in range(n)]
    arrays = [rng.standard_normal(s).astype(d) for s, d in zip(shapes, dtypes)]
    grads = [rng.standard_normal(s).astype(d) for s, d in zip(shapes, dtypes)]
    tensors = [torch.from_numpy(a.copy()).requires_grad_() for a in arrays]
    sgd(tensors, [torch.from_numpy(g) for g in grads])
    sgd(arrays, grads)
    for t, a in zip(tensors, arrays):
        np.testing.assert_array_equal(t.detach().numpy(), a)


def test_torch_tensors_never_go_through_dlpack(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a torch tensor was exported through DLPack")

    monkeypatch.setattr(torch.Tensor, "__dlpack__", refuse)
    p = [torch.ones(3, requires_grad=True) for _ in range(60)]
    sgd(p, [torch.ones(3) for _ in p], lr=1.0)  # a long list
    sgd(p[:2], [torch.ones(3) for _ in p[:2]], lr=1.0)  # a short one
    assert all(torch.equal(t.detach(), torch.zeros(3)) for t in p[2:])
    assert all(torch.equal(t.detach(), -torch.ones(3)) for t in p[:2])


def test_mixed_kinds_in_one_call():
    a, b, c, d = np.ones(3), np.ones(3), np.ones(3), torch.ones(3, dtype=torch.float64)
    sgd([a, ArrayInterfaceOnly(b), DLPackOnly(c), d],
        [np.ones(3), torch.ones(3, dtype=torch.float64), DLPackOnly(np.ones(3)), np.ones(3)])
    for x in (a, b, c, d.numpy()):
        np.testing.assert_array_equal(x, 0.5)


def test_noncontiguous_torch_grad_is_read_through_a_copy():
    p = torch.zeros(4, 3, dtype=torch.float64)
    g = torch.arange(12, dtype=torch.float64).reshape(3, 4).t()
    sgd([p], [g], lr=1.0)
    assert torch.equal(p, -g)


def test_dlpack_holder_lives_until_the_kernel_ran():
    a = np.ones(4)
    base = sys.getrefcount(a)
    spec = fusedopt.algorithms.SPECS["sgd"]
    kw = dict(lr=1.0, momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False,
              maximize=False, first_step=False)
    plan = _engine.plan(spec, kw, [DLPackOnly(a)], [np.ones(4)], [])
    gc.collect()
    assert sys.getrefcount(a) > base  # the exported tensor still holds the array
    plan.run()
    np.testing.assert_array_equal(a, 0.0)
    del plan
    gc.collect()
    assert sys.getrefcount(a) == base  # the deleter ran: nothing holds the array any more


@pytest.mark.parametrize("wrap", [DLPackOnly, LegacyDLPack])
def test_dlpack_capsules_are_released(wrap):
    a = np.ones(4)
    base = sys.getrefcount(a)
    for _ in range(20):
        sgd([wrap(a)], [wrap(np.ones(4))], lr=0.0)
    gc.collect()
    assert sys.getrefcount(a) == base


# --- hand-made capsules: flags, versions and dtypes no NumPy array produces ---------------

_api = ctypes.pythonapi
_api.PyCapsule_New.restype = ctypes.py_object
_api.PyCapsule_New.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_void_p]


class HandMade:
    """A DLPack producer over a NumPy buffer whose managed tensor is built here, with a
    deleter that counts its calls."""

    def __init__(self, buf, *, flags=0, version=(1, 0), code=_dlpack.FLOAT, bits=None,
                 legacy=False, device=(_dlpack.CPU, 0)):
        self.buf = buf
        self.deleted = 0
        self.legacy = legacy
        self.device = device
        self.calls = []
        self._shape = (ctypes.c_int64 * buf.ndim)(*buf.shape)
        managed = _dlpack.DLManagedTensor() if legacy else _dlpack.DLManagedTensorVersioned()
        if not legacy:
            managed.version.major, managed.version.minor = version
            managed.flags = flags
        t = managed.dl_tensor
        t.data = buf.ctypes.data
        t.device.device_type, t.device.device_id = device
        t.ndim = buf.ndim
        t.dtype.code, t.dtype.bits, t.dtype.lanes = code, bits or buf.itemsize * 8, 1
        t.shape = self._shape
        t.strides = None
        self._deleter = _dlpack._Deleter(self._delete)
        managed.deleter = ctypes.cast(self._deleter, ctypes.c_void_p).value
        self.managed = managed

    def _delete(self, address):
        assert address == ctypes.addressof(self.managed)
        self.deleted += 1

    def __dlpack__(self, max_version=None, stream=None):
        self.calls.append(stream)
        name = b"dltensor" if self.legacy else b"dltensor_versioned"
        return _api.PyCapsule_New(ctypes.addressof(self.managed), name, None)

    def __dlpack_device__(self):
        return self.device


@pytest.mark.parametrize("legacy", [False, True])
def test_handmade_capsule_in_place_and_deleted_once(legacy):
    buf = np.ones(5)
    producer = HandMade(buf, legacy=legacy)
    sgd([producer], [np.ones(5)])
    gc.collect()
    np.testing.assert_array_equal(buf, 0.5)
    assert producer.deleted == 1


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(flags=_dlpack.FLAG_READ_ONLY), ValueError, "read-only"),
    (dict(flags=_dlpack.FLAG_IS_COPIED), ValueError, "read-only"),
    (dict(version=(2, 0)), TypeError, "DLPack version 2.0"),
    (dict(code=_dlpack.BFLOAT, bits=16), TypeError, "bfloat16"),
    (dict(code=7, bits=8), TypeError, "does not know"),
])
def test_handmade_capsule_refused_and_deleted_once(kwargs, error, match):
    buf = np.ones(4, dtype=np.float16 if kwargs.get("bits") == 16 else np.float64)
    if kwargs.get("bits") == 8:
        buf = np.ones(4, dtype=np.uint8)
    before = buf.copy()
    producer = HandMade(buf, **kwargs)
    with pytest.raises(error, match=match):
        sgd([producer], [np.ones(4, dtype=np.float64)])
    gc.collect()
    np.testing.assert_array_equal(buf, before)
    assert producer.deleted == 1


# --- refused kinds: an error, and nothing written -------------------------------------------


def _readonly(a):
    a.flags.writeable = False
    return a


def _bad_params():
    """name -> (make params, make grads, error, message pattern)."""
    f64 = torch.float64
    return {
        "read-only numpy": (lambda: [np.ones(3), _readonly(np.ones(3))],
                            lambda: [np.ones(3), np.ones(3)], ValueError,
                            r"params\[1\] is read-only"),
        "read-only numpy via DLPack 1.x": (
            lambda: [np.ones(3), DLPackOnly(_readonly(np.ones(3)))],
            lambda: [np.ones(3), np.ones(3)], ValueError, r"params\[1\] is read-only"),
        "read-only numpy via legacy DLPack": (
            lambda: [np.ones(3), LegacyDLPack(_readonly(np.ones(3)))],
            lambda: [np.ones(3), np.ones(3)], ValueError, "refused the DLPack export"),
        "producer raising BufferError": (
            lambda: [np.ones(3), RefusingProducer(np.ones(3))],
            lambda: [np.ones(3), np.ones(3)], ValueError, "cannot be exported"),
        "non-contiguous torch param": (
            lambda: [torch.ones(3, dtype=f64), torch.ones(4, 3, dtype=f64).t()],
            lambda: [torch.ones(3, dtype=f64), torch.ones(3, 4, dtype=f64)], ValueError,
            r"params\[1\] is not C-contiguous"),
        "non-contiguous DLPack param": (
            lambda: [np.ones(3), DLPackOnly(np.ones((3, 4))[:, ::2])],
            lambda: [np.ones(3), np.ones((3, 2))], ValueError, r"params\[1\] is not C-contiguous"),
        # 16-bit params are accepted; a gradient of another dtype is refused by name
        "bfloat16 torch": (lambda: [torch.ones(3, dtype=torch.bfloat16)],
                           lambda: [torch.ones(3, dtype=torch.float32)], TypeError, "bfloat16"),
        "bfloat16 via DLPack": (lambda: [DLPackOnly(torch.ones(3, dtype=torch.bfloat16))],
                                lambda: [DLPackOnly(torch.ones(3, dtype=torch.float32))],
                                TypeError, "params\\[0\\] has bfloat16"),
        "float16 torch": (lambda: [torch.ones(3, dtype=torch.float16)],
                          lambda: [torch.ones(3, dtype=torch.float32)], TypeError, "float16"),
        "int32 torch": (lambda: [torch.ones(3, dtype=torch.int32)],
                        lambda: [torch.ones(3, dtype=torch.int32)], TypeError, "int32"),
        "int64 via DLPack": (lambda: [DLPackOnly(np.ones(3, dtype=np.int64))],
                             lambda: [np.ones(3, dtype=np.int64)], TypeError, "int64"),
        "bool torch": (lambda: [torch.ones(3, dtype=torch.bool)],
                       lambda: [torch.ones(3, dtype=torch.bool)], TypeError, "bool"),
        "float32 grad for float64 torch param": (
            lambda: [torch.ones(3, dtype=f64)], lambda: [torch.ones(3)], TypeError,
            r"grads\[0\] has dtype torch.float32"),
        "sparse torch grad": (lambda: [torch.ones(3, dtype=f64)],
                              lambda: [torch.ones(3, dtype=f64).to_sparse()], TypeError, "sparse"),
        "meta torch param": (lambda: [torch.ones(3, dtype=f64, device="meta")],
                             lambda: [torch.ones(3, dtype=f64)], TypeError, "meta"),
        "DLPack on an unsupported device": (
            lambda: [np.ones(3), ForeignDevice(np.ones(3))],
            lambda: [np.ones(3), np.ones(3)], TypeError, "CUDA host"),
        "JAX array (stand-in)": (
            lambda: [np.ones(3), FakeJaxArray(np.ones(3))],
            lambda: [np.ones(3), np.ones(3)], ValueError,
            r"params\[1\] is a JAX array; JAX arrays are immutable"),
        "not an array": (lambda: [np.ones(3), [1.0, 2.0, 3.0]],
                         lambda: [np.ones(3), np.ones(3)], TypeError, "is not an array"),
    }


def _numpy_views(objs):
    """NumPy views of the memory behind params, to check afterwards that none changed."""
    out = []
    for o in objs:
        if isinstance(o, torch.Tensor):
            if o.device.type == "cpu" and o.layout == torch.strided and o.dtype != torch.bfloat16:
                out.append(o.detach().numpy())
            elif o.dtype == torch.bfloat16:
                out.append(o.view(torch.int16).numpy())
        elif isinstance(o, np.ndarray):
            out.append(o)
        elif hasattr(o, "_a"):
            out.extend(_numpy_views([o._a]))
    return out


@pytest.mark.parametrize("name", list(_bad_params()))
def test_refused_and_unchanged(name):
    make_params, make_grads, error, match = _bad_params()[name]
    params, grads = make_params(), make_grads()
    views = _numpy_views(params)
    before = [v.copy() for v in views]
    with pytest.raises(error, match=match):
        sgd(params, grads)
    for v, b in zip(views, before):
        np.testing.assert_array_equal(v, b)


def test_read_only_state_refused():
    p, m = torch.ones(3, dtype=torch.float64), _readonly(np.zeros(3))
    with pytest.raises(ValueError, match=r"momentum_buffers\[0\] is read-only"):
        F.sgd_([p], [torch.ones(3, dtype=torch.float64)], [DLPackOnly(m)], lr=0.1, momentum=0.9)
    assert torch.equal(p, torch.ones(3, dtype=torch.float64))


def test_read_only_gradients_are_fine():
    p = np.ones(3)
    sgd([p], [DLPackOnly(_readonly(np.ones(3)))])
    np.testing.assert_array_equal(p, 0.5)


def test_real_jax_arrays_are_refused():
    jnp = pytest.importorskip("jax.numpy")
    p = jnp.ones(3)
    with pytest.raises(ValueError, match="JAX arrays are immutable"):
        sgd([p], [np.ones(3, dtype=np.float32)])
    assert (np.asarray(p) == 1).all()


# --- GPU producers --------------------------------------------------------------------------


class FakeCAI:
    """A `__cuda_array_interface__` (v3) that is never dereferenced: prepare only reads it
    (and its `device`: the address is not CUDA memory, the pointer cannot tell)."""

    device = SimpleNamespace(id=0)

    def __init__(self, address, stream):
        self._address, self._stream = address, stream

    @property
    def __cuda_array_interface__(self):
        return {"shape": (4,), "typestr": "<f4", "data": (self._address, False), "version": 3,
                "strides": None, "stream": self._stream}


@pytest.mark.parametrize("stream, expected", [(7, 7), (0, 1), (2, 2)])
def test_cuda_dlpack_producer_is_given_the_kernel_stream(stream, expected):
    """No GPU needed: describing a CUDA producer only reads its capsule. The producer gets
    the stream the kernel will run on; 0 (the legacy default stream) is DLPack's 1."""
    from fusedopt import _arrays

    producers = [HandMade(np.ones(4, dtype=np.float32), device=(_dlpack.CUDA, 0))
                 for _ in range(2)]
    prep = _arrays.prepare("sgd_", [producers[0]], [producers[1]], [], [], stream)
    assert prep.device == 1  # cuda:0
    assert [p.calls for p in producers] == [[expected], [expected]]
    del prep
    gc.collect()
    assert [p.deleted for p in producers] == [1, 1]


@pytest.mark.parametrize("cai_stream", [None, 7])
def test_cai_on_the_kernel_stream_needs_no_wait(cai_stream):
    from fusedopt import _arrays

    prep = _arrays.prepare("sgd_", [FakeCAI(1 << 40, cai_stream)],
                           [FakeCAI(2 << 40, cai_stream)], [], [], 7)
    assert prep.device == 1


def _need_gpu():
    cupy = pytest.importorskip("cupy")
    if not fusedopt.cuda_available():
        pytest.skip("no CUDA device or no CUDA module in this build")
    return cupy


class CAIOnly:
    """Exposes only `__cuda_array_interface__` (v3), naming `stream` as its stream."""

    def __init__(self, a, stream):
        self._a = a
        self.device = a.device
        self._stream = stream

    @property
    def __cuda_array_interface__(self):
        cai = dict(self._a.__cuda_array_interface__)
        cai["stream"] = self._stream
        return cai


@pytest.mark.cuda
def test_cupy_in_place():
    cupy = _need_gpu()
    p, g = cupy.arange(5, dtype=cupy.float32), cupy.ones(5, dtype=cupy.float32)
    want = p - 0.5 * g
    sgd([p], [g])
    assert bool((p == want).all())


@pytest.mark.cuda
def test_torch_cuda_in_place():
    _need_gpu()
    if not torch.cuda.is_available():
        pytest.skip("this torch has no CUDA")
    p = torch.nn.Parameter(torch.ones(100, device="cuda"))
    sgd([p], [torch.ones(100, device="cuda")])
    torch.cuda.synchronize()
    assert torch.equal(p.detach().cpu(), torch.full((100,), 0.5))


@pytest.mark.cuda
def test_dlpack_cuda_producer_gets_the_kernel_stream():
    cupy = _need_gpu()
    stream = cupy.cuda.Stream(non_blocking=True)
    with stream:
        p = cupy.ones(64, dtype=cupy.float64)
        wp = DLPackOnly(p)
        sgd([wp], [cupy.ones(64, dtype=cupy.float64)])
        stream.synchronize()
    assert wp.calls[0]["stream"] == stream.ptr
    assert bool((p == 0.5).all())


@pytest.mark.cuda
def test_cai_stream_is_waited_for():
    """The gradient is written on a side stream and handed over with that stream in its
    `__cuda_array_interface__`: the kernel, on another stream, must see the final values."""
    cupy = _need_gpu()
    n = 1 << 22
    side = cupy.cuda.Stream(non_blocking=True)
    p = cupy.zeros(n, dtype=cupy.float32)
    cupy.cuda.Device().synchronize()
    with side:
        g = cupy.zeros(n, dtype=cupy.float32)
        for _ in range(50):  # keep the side stream busy for a while
            g += 1.0
    main = cupy.cuda.Stream(non_blocking=True)
    F.sgd_([p], [CAIOnly(g, side.ptr)], lr=1.0, stream=main)
    main.synchronize()
    assert float(p.min()) == -50.0 and float(p.max()) == -50.0


# --- the optimizer classes take what the functional ops take ---------------------------------


def _class_algorithms():
    from cases import ALGORITHMS, required_options
    return {name: (algo.cls, required_options(algo.spec)) for name, algo in ALGORITHMS.items()}


@pytest.mark.parametrize("name", sorted(_class_algorithms()))
@pytest.mark.parametrize("wrap", [DLPackOnly, LegacyDLPack, ArrayInterfaceOnly])
def test_classes_take_objects_with_only_an_export_protocol(name, wrap):
    """Params that expose nothing but `__dlpack__` (or `__array_interface__`): no dtype, no
    shape. The class makes their state from the description the functional op uses, and
    five steps give the bits of the same class on the NumPy arrays themselves."""
    cls, options = _class_algorithms()[name]
    rng = np.random.default_rng(3)
    shapes = [(5, 3), (7,), ()]
    start = [rng.standard_normal(s) for s in shapes]
    grads = [[rng.standard_normal(s) for s in shapes] for _ in range(5)]
    arrays = [a.copy() for a in start]
    wrapped = [wrap(a) for a in arrays]
    plain = [a.copy() for a in start]
    opt, want = cls(wrapped, **options), cls(plain, **options)
    for o in (opt, want):
        if hasattr(o, "train"):  # schedule-free: steps are taken in train mode
            o.train()
    for g in grads:
        opt.step([wrap(x) for x in g])
        want.step(g)
    for a, b in zip(arrays, plain):
        np.testing.assert_array_equal(a, b)
    for k in want.state:
        for key, value in want.state[k].items():
            np.testing.assert_array_equal(np.asarray(opt.state[k][key]), np.asarray(value),
                                          err_msg=f"state[{k}][{key!r}]")


@pytest.mark.parametrize("name", sorted(_class_algorithms()))
def test_classes_refuse_a_read_only_param_behind_dlpack(name):
    cls, options = _class_algorithms()[name]
    p, frozen = np.ones(4), _readonly(np.full(3, 2.0))
    opt = cls([p, DLPackOnly(frozen)], **options)
    if hasattr(opt, "train"):
        opt.train()
    before = copy.deepcopy(opt.state_dict())
    with pytest.raises(ValueError, match=r"params\[1\] is read-only"):
        opt.step([np.full(4, 0.5), np.full(3, 0.5)])
    np.testing.assert_array_equal(p, np.ones(4))
    np.testing.assert_array_equal(frozen, np.full(3, 2.0))
    after = opt.state_dict()
    assert after["state"].keys() == before["state"].keys()
    for k, st in before["state"].items():
        assert after["state"][k].keys() == st.keys()
        for key, value in st.items():
            np.testing.assert_array_equal(np.asarray(after["state"][k][key]), np.asarray(value))
