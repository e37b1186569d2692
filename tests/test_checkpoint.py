"""fusedopt.save / fusedopt.load: every optimizer and precision policy round-trips bit for
bit (a run interrupted by save + load into a fresh optimizer goes on exactly as the
uninterrupted one); a bad file is refused with ValueError and changes nothing; a
failed save leaves the previous file in place."""

from __future__ import annotations

import json
import os
import zipfile

import ml_dtypes
import numpy as np
import pytest

import fusedopt
from cases import CASES, FULL_CASES, assert_same_bits, random_arrays
from fusedopt import batched

BF16 = np.dtype(ml_dtypes.bfloat16)
SHAPES = [(6,), (2, 3), (), (0,), (1,)]


def assert_same_tree(a, b, where="state_dict"):
    """Equal nests of dicts/lists/tuples; arrays bit for bit, numbers exactly (NaN too)."""
    assert type(a) is type(b) or (isinstance(a, np.ndarray) and isinstance(b, np.ndarray)), \
        f"{where}: {type(a).__name__} != {type(b).__name__}"
    if isinstance(a, dict):  # the same keys, in any order (a load may reorder them)
        assert sorted(map(str, a)) == sorted(map(str, b)), f"{where}: keys {list(a)} != {list(b)}"
        for k in a:
            assert_same_tree(a[k], b[k], f"{where}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), f"{where}: length {len(a)} != {len(b)}"
        for k, (x, y) in enumerate(zip(a, b)):
            assert_same_tree(x, y, f"{where}[{k}]")
    elif isinstance(a, (np.ndarray, np.generic)):
        assert_same_bits(np.asarray(a), np.asarray(b), where)
    elif isinstance(a, float):
        assert np.asarray(a).tobytes() == np.asarray(b).tobytes(), f"{where}: {a!r} != {b!r}"
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def resume_and_compare(make, params, steps, tmp_path, *, step=None, before=3, after=3):
    """Run `before` steps, save, go on for `after` steps; load the file into a fresh
    optimizer over copies of the params at the save and take the same `after` steps:
    the params, state dicts and step counts of both runs must be the same bits."""
    step = step or (lambda opt, k: opt.step(steps[k]))
    opt = make(params)
    for k in range(before):
        step(opt, k)
    path = tmp_path / "opt.ckpt"
    fusedopt.save(opt, path)
    saved_params = [p.copy() for p in params]
    saved_sd = opt.state_dict()
    for k in range(before, before + after):
        step(opt, k)

    resumed_params = [p.copy() for p in saved_params]
    resumed = make(resumed_params)
    fusedopt.load(resumed, path)
    assert_same_tree(resumed.state_dict(), saved_sd, "loaded state dict")
    for k in range(before, before + after):
        step(resumed, k)
    for i, (a, b) in enumerate(zip(resumed_params, params)):
        assert_same_bits(a, b, f"params[{i}] after resuming")
    assert_same_tree(resumed.state_dict(), opt.state_dict(), "state dict after resuming")
    assert getattr(resumed, "steps_taken", None) == getattr(opt, "steps_taken", None)
    return opt, resumed


def two_groups(params, c):
    return [{"params": params[:2]}, {"params": params[2:], "lr": c.options["lr"] * 0.5}]


@pytest.mark.parametrize("c", CASES, ids=str)
def test_every_case_resumes_bit_for_bit(c, rng, tmp_path):
    """Two groups (the second with its own lr), float32 and float64 params mixed; the
    fresh optimizer starts with other hyperparameters, which loading replaces."""
    dtypes = [np.float32, np.float64, np.float32, np.float64, np.float32]
    params = [np.asarray(rng.standard_normal(s), dtype=d) for s, d in zip(SHAPES, dtypes)]
    steps = [[np.asarray(rng.standard_normal(s), dtype=d) for s, d in zip(SHAPES, dtypes)]
             for _ in range(6)]

    def make(ps):
        groups = two_groups(ps, c)
        groups[1]["lr"] *= 3
        return c.make(groups, lr=c.options["lr"] * 7)

    def make_and_restore(ps):  # the saved run starts from the case's own settings
        return c.make(two_groups(ps, c)) if ps is params else make(ps)

    opt, resumed = resume_and_compare(make_and_restore, params, steps, tmp_path)
    assert [g["lr"] for g in resumed.param_groups] == [g["lr"] for g in opt.param_groups]


POLICIES = {
    "plain": {},
    "bf16 state": dict(state_dtype=BF16),
    "master": dict(master_weights=True),
    "kahan": dict(kahan=True),
    "stochastic": dict(stochastic_rounding=True, seed=11),
    "master, stochastic, bf16 state": dict(master_weights=True, stochastic_rounding=True,
                                           seed=3, state_dtype=BF16),
    "kahan, stochastic": dict(kahan=True, stochastic_rounding=True, seed=5),
    "8-bit state": dict(state_dtype="int8", min_8bit_size=4),
}


def _takes_8bit_state(c):
    spec = c.algo.spec
    try:
        spec.check_quantized(spec.to_op({**spec.group_extras, **c.options}), "step")
    except ValueError:
        return False
    return True


@pytest.mark.parametrize("c, policy", [
    (c, policy) for c in FULL_CASES for policy in POLICIES
    if policy != "8-bit state" or _takes_8bit_state(c)], ids=str)
def test_every_precision_policy_resumes_bit_for_bit(c, policy, rng, tmp_path):
    """16-bit params (bfloat16 and float16) next to a float32 one: the master copies,
    compensation buffers, bfloat16 or 8-bit state (codes and block scales) and the
    stochastic rounding stream (which follows the optimizer's step count) all continue
    exactly. 8-bit state for the algorithms and options that have it."""
    dtypes = [BF16, np.float16, np.float32, BF16, np.float16]
    params = [np.asarray(rng.standard_normal(s), dtype=d) for s, d in zip(SHAPES, dtypes)]
    steps = [[np.asarray(rng.standard_normal(s), dtype=d) for s, d in zip(SHAPES, dtypes)]
             for _ in range(6)]
    precision = POLICIES[policy]
    opt, _ = resume_and_compare(
        lambda ps: c.make(ps, precision=fusedopt.Precision(**precision)), params, steps,
        tmp_path)
    if precision.get("state_dtype") is not None:
        want = np.uint8 if precision["state_dtype"] == "int8" else BF16
        assert any(v.dtype == want for s in opt.state.values() for v in s.values()
                   if isinstance(v, np.ndarray))


def test_bfloat16_is_stored_as_raw_bits_and_no_pickle(rng, tmp_path):
    params = [np.asarray(rng.standard_normal(5), dtype=BF16)]
    opt = fusedopt.Adam(params, precision=fusedopt.Precision(state_dtype=BF16))
    opt.step([np.asarray(rng.standard_normal(5), dtype=BF16)])
    fusedopt.save(opt, tmp_path / "c")
    with np.load(tmp_path / "c", allow_pickle=False) as z:
        dtypes = {z[name].dtype for name in z.files}
        meta = json.loads(bytes(z["meta"]).decode())
    assert all(d.kind in "ui" for d in dtypes), dtypes  # bits, no pickled dtype
    assert meta["format"] == fusedopt.checkpoint.FORMAT and meta["version"] == 1
    assert meta["type"] == "Adam" and meta["steps_taken"] == 1
    assert meta["precision"]["state_dtype"] == "bfloat16"


def quadratic(params, rng):
    """A closure for LBFGS and Newton: 0.5 * sum(a_i * x_i^2) + b·x over all params."""
    a = [rng.uniform(0.5, 3.0, p.shape) for p in params]
    b = [rng.standard_normal(p.shape) for p in params]

    def closure_for(ps, hessian=False):
        def closure():
            loss = sum(float(np.sum(0.5 * ai * p * p + bi * p)) for ai, bi, p in zip(a, b, ps))
            grads = [np.asarray(ai * p + bi, dtype=p.dtype) for ai, bi, p in zip(a, b, ps)]
            if hessian:
                return loss, grads, np.diag(np.concatenate([ai.ravel() for ai in a]))
            return loss, grads
        return closure
    return closure_for


@pytest.mark.parametrize("line_search_fn", [None, "strong_wolfe"])
def test_lbfgs_resumes_bit_for_bit(line_search_fn, rng, tmp_path):
    """The history (old_dirs, old_stps, ro, H_diag, d, t, ...) travels with the file."""
    params = random_arrays([(5,), (2, 3), (4,)], np.float64, rng)
    closure_for = quadratic(params, rng)
    opt, resumed = resume_and_compare(
        lambda ps: fusedopt.LBFGS(ps, lr=0.5, max_iter=2, history_size=3,
                                  line_search_fn=line_search_fn),
        params, None, tmp_path,
        step=lambda opt, k: opt.step(closure_for(opt.param_groups[0]["params"])))
    assert len(resumed.state[0]["old_dirs"]) > 0


def test_newton_resumes_bit_for_bit(rng, tmp_path):
    params = random_arrays([(3,), (2, 2)], np.float64, rng)
    closure_for = quadratic(params, rng)
    resume_and_compare(
        lambda ps: fusedopt.Newton(ps, lr=0.5, damping=0.1),
        params, None, tmp_path,
        step=lambda opt, k: opt.step(closure_for(opt.param_groups[0]["params"], True)))


@pytest.mark.parametrize("cls, kwargs", [
    (batched.BatchedSGD, dict(lr=[0.1, 0.01, 0.05], momentum=[0.0, 0.9, 0.5])),
    (batched.BatchedAdam, dict(lr=[0.1, 0.01, 0.05], betas=[(0.9, 0.99), (0.8, 0.9), (0.5, 0.6)],
                               amsgrad=True)),
    (batched.BatchedAdamW, dict(lr=[0.1, 0.01, 0.05], weight_decay=[0.0, 0.1, 0.2], l1=0.01)),
] + [  # every algorithm's batched optimizer, with the fullest options of the case table
    (batched.OPTIMIZERS[c.algo.name], dict(c.options, lr=[c.options["lr"] * f
                                                          for f in (1.0, 0.5, 0.25)]))
    for c in FULL_CASES if c.algo.name in batched.OPTIMIZERS
], ids=lambda v: v.__name__ if isinstance(v, type) else None)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_batched_resumes_bit_for_bit(cls, kwargs, dtype, rng, tmp_path):
    params = batched.stack(random_arrays([(4,), (2, 3), ()], dtype, rng), 3)
    params = [p + np.asarray(rng.standard_normal(p.shape), dtype=dtype) for p in params]
    steps = [[np.asarray(rng.standard_normal(p.shape), dtype=dtype) for p in params]
             for _ in range(6)]
    resume_and_compare(lambda ps: cls(ps, **kwargs), params, steps, tmp_path)


# --- beyond the case table: row-sparse gradients, composite specs, the EMA of the params ----


MATRICES = [(6, 4), (3, 5), (4, 4), (6, 4)]  # Muon's params are 2-D (two of one shape)
MIXED = [(6, 4), (3,), (2, 3, 4), (), (1, 1)]  # Adafactor: factored and full second moments
ROWS = [(20, 3), (7,), (5, 2, 2)]  # SparseAdam: an embedding, a vector, a 3-D table


def row_grads(rng, shapes, dtype, count=8):
    """(rows, values) for each param: rows with repeats (from the first half of the rows)."""
    out = []
    for s in shapes:
        rows = rng.integers(0, max(1, s[0] // 2 + 1), count)
        out.append((rows, np.asarray(rng.standard_normal((count, *s[1:])), dtype=dtype)))
    return out


def dense_grads(rng, shapes, dtype):
    return [np.asarray(rng.standard_normal(s), dtype=dtype) for s in shapes]


#: name -> (class, options, param shapes, gradient maker)
BEYOND = {
    "SparseAdam": (lambda ps, **kw: fusedopt.SparseAdam(ps, **kw),
                   dict(lr=0.05, betas=(0.8, 0.95), eps=1e-6), ROWS, row_grads),
    "Muon": (lambda ps, **kw: fusedopt.Muon(ps, **kw),
             dict(lr=0.02, weight_decay=0.05, momentum=0.9), MATRICES, dense_grads),
    "Muon, plain momentum": (lambda ps, **kw: fusedopt.Muon(ps, **kw),
                             dict(lr=0.02, nesterov=False, adjust_lr_fn="match_rms_adamw",
                                  ns_steps=3), MATRICES, dense_grads),
    "Adafactor": (lambda ps, **kw: fusedopt.Adafactor(ps, **kw),
                  dict(lr=0.05, weight_decay=0.01, beta2_decay=-0.7), MIXED, dense_grads),
}


def beyond_run(name, rng, dtype=np.float64, steps=6, **extra):
    """(make, params, per-step gradients) for a row of BEYOND."""
    cls, options, shapes, grads = BEYOND[name]
    params = [np.asarray(rng.standard_normal(s), dtype=dtype) for s in shapes]
    return (lambda ps: cls(ps, **options, **extra)), params, \
        [grads(rng, shapes, dtype) for _ in range(steps)]


@pytest.mark.parametrize("ema", [None, 0.9], ids=["", "ema"])
@pytest.mark.parametrize("name", list(BEYOND))
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_beyond_the_table_resumes_bit_for_bit(name, ema, dtype, rng, tmp_path):
    """SparseAdam (repeated rows), Muon and Adafactor, with and without the EMA of the
    params: the state (moments, factors, momentum buffers, averages) and step counts
    continue exactly."""
    make, params, steps = beyond_run(name, rng, dtype, ema_decay=ema)
    opt, resumed = resume_and_compare(make, params, steps, tmp_path)
    assert all(("ema" in s) == (ema is not None) for s in resumed.state.values())
    assert resumed.state, "no state was saved"


EMA_MAKERS = {
    "Adam": (lambda ps, **kw: fusedopt.Adam(ps, lr=0.01, amsgrad=True, **kw), SHAPES,
             dense_grads),
    "SGD": (lambda ps, **kw: fusedopt.SGD(ps, lr=0.05, momentum=0.9, nesterov=True, **kw),
            SHAPES, dense_grads),
    "Muon": (lambda ps, **kw: fusedopt.Muon(ps, lr=0.02, **kw), MATRICES, dense_grads),
    "SparseAdam": (lambda ps, **kw: fusedopt.SparseAdam(ps, lr=0.05, **kw), ROWS, row_grads),
    "Adafactor": (lambda ps, **kw: fusedopt.Adafactor(ps, lr=0.05, **kw), MIXED, dense_grads),
}
#: the policies each class takes next to ema_decay (SparseAdam and Adafactor keep no
#: master weights, Adafactor rounds to nearest)
EMA_POLICIES = [(name, policy) for name in ("Adam", "SGD", "Muon")
                for policy in ("master", "master, stochastic, bf16 state", "stochastic")] + \
    [("SparseAdam", "stochastic"), ("Adafactor", "plain")]


@pytest.mark.parametrize("name, policy", EMA_POLICIES, ids=str)
def test_ema_with_sixteen_bit_params_resumes_bit_for_bit(name, policy, rng, tmp_path):
    """bfloat16 params and averages, with master weights or stochastic rounding where
    the class takes them: the averages, masters and rounding stream continue exactly."""
    make, shapes, grads = EMA_MAKERS[name]
    precision = fusedopt.Precision(**POLICIES[policy])
    params = [np.asarray(rng.standard_normal(s), dtype=BF16) for s in shapes]
    steps = [grads(rng, shapes, BF16) for _ in range(6)]
    opt, resumed = resume_and_compare(
        lambda ps: make(ps, precision=precision, ema_decay=0.75), params, steps, tmp_path)
    assert all(s["ema"].dtype == BF16 for s in resumed.state.values())


def test_beyond_the_table_refuses_other_optimizers_and_params(rng, tmp_path):
    """An Adafactor checkpoint into a Muon (and back), a Muon one over other shapes, a
    SparseAdam one over another table: ValueError, the optimizer unchanged."""
    def trained(name, shapes=None, dtype=np.float64, **extra):
        cls, options, default, grads = BEYOND[name]
        shapes = shapes or default
        opt = cls(random_arrays(list(shapes), dtype, rng), **options, **extra)
        for _ in range(2):
            opt.step(grads(rng, shapes, dtype))
        return opt

    files = {}
    for name in ("Adafactor", "Muon", "SparseAdam"):
        files[name] = tmp_path / name
        fusedopt.save(trained(name), files[name])
    refused(trained("Muon"), files["Adafactor"], "state of a Adafactor, not of a Muon")
    refused(trained("Adafactor"), files["Muon"], "state of a Muon, not of a Adafactor")
    refused(trained("Adafactor", [(6, 4), (3, 5)]), files["SparseAdam"], "not of a Adafactor")
    refused(trained("Muon", [(4, 6), (3, 5), (4, 4), (6, 4)]), files["Muon"], r"shape")
    refused(trained("Muon", MATRICES[:3]), files["Muon"], "has 4 params, the optimizer's has 3")
    refused(trained("Muon", dtype=np.float32), files["Muon"], "dtype float64")
    refused(trained("Adafactor", [(24,), (3,), (2, 3, 4), (), (1, 1)]), files["Adafactor"],
            "no 'variance'")
    refused(trained("SparseAdam", [(21, 3), (7,), (5, 2, 2)]), files["SparseAdam"], r"shape")


LBFGS_KW = dict(lr=0.5, max_iter=3, history_size=4, line_search_fn="strong_wolfe")


def test_averages_where_the_optimizer_keeps_none_are_refused(rng, tmp_path):
    """A checkpoint with averages of the params (ema_decay) into an optimizer without
    ema_decay, and one without them into an optimizer with it: ValueError, unchanged
    (loaded, the first would carry averages it never moves, the second would move
    averages it never had)."""
    def trained(name, **extra):
        cls, options, shapes, grads = BEYOND[name]
        opt = cls(random_arrays(list(shapes), np.float64, rng), **options, **extra)
        for _ in range(2):
            opt.step(grads(rng, shapes, np.float64))
        return opt

    for name in ("Muon", "SparseAdam", "Adafactor"):
        fusedopt.save(trained(name, ema_decay=0.5), tmp_path / "ema")
        fusedopt.save(trained(name), tmp_path / "plain")
        refused(trained(name), tmp_path / "ema", "keeps none")
        refused(trained(name, ema_decay=0.5), tmp_path / "plain", r"keeps them \(ema_decay=0.5")
        fusedopt.load(trained(name, ema_decay=0.9), tmp_path / "ema")  # another decay: taken
    fusedopt.save(fusedopt.Adam(random_arrays([(3,)], np.float64, rng), ema_decay=0.5),
                  tmp_path / "fresh")  # no state yet: loads either way
    fusedopt.load(fusedopt.Adam(random_arrays([(3,)], np.float64, rng)), tmp_path / "fresh")


TORCH_BEYOND = [  # (class name, options, param shapes, sparse gradients)
    ("SparseAdam", dict(lr=0.05, ema_decay=0.9), ROWS, True),
    ("Muon", dict(lr=0.02), MATRICES, False),
    ("Muon", dict(lr=0.02, ema_decay=0.8), MATRICES, False),
    ("Adafactor", dict(lr=0.05, ema_decay=0.5), MIXED, False),
    ("Adam", dict(lr=0.01, ema_decay=0.9), SHAPES, False),
    ("LBFGS", LBFGS_KW, [(5,), (2, 3)], False),
]


@pytest.mark.parametrize("name, options, shapes, sparse", TORCH_BEYOND,
                         ids=[f"{r[0]}{' ema' if 'ema_decay' in r[1] else ''}"
                              for r in TORCH_BEYOND])
def test_fusedopt_torch_classes_take_torch_save_not_fo_save(name, options, shapes, sparse,
                                                            rng, tmp_path):
    """fo.save / fo.load refuse the fusedopt.torch classes (torch.optim.Optimizers:
    SparseAdam, Muon, Adafactor, LBFGS, any class with ema_decay) and write nothing;
    their state dicts go through torch.save / torch.load and the resumed run is the
    uninterrupted one, bit for bit."""
    torch = pytest.importorskip("torch")
    import io

    import fusedopt.torch as fot
    cls = getattr(fot, name)
    start = [rng.standard_normal(s) for s in shapes]
    if name == "LBFGS":
        closure_for = quadratic(start, rng)
    grads = [(row_grads(rng, shapes, np.float64) if sparse else dense_grads(rng, shapes,
                                                                           np.float64))
             for _ in range(6)]

    def step(opt, ps, k):
        if name == "LBFGS":
            def closure():
                loss, gs = closure_for([p.detach().numpy() for p in ps])()
                for p, g in zip(ps, gs):
                    p.grad = torch.from_numpy(np.array(g))
                return loss
            return opt.step(closure)
        for p, s, g in zip(ps, shapes, grads[k]):
            p.grad = (torch.sparse_coo_tensor(torch.from_numpy(g[0])[None], torch.from_numpy(
                g[1]), s, check_invariants=True) if sparse else torch.from_numpy(g.copy()))
        return opt.step()

    params = [torch.tensor(v, requires_grad=True) for v in start]
    opt = cls(params, **options)
    with pytest.raises(TypeError, match=r"torch\.save"):
        fusedopt.save(opt, tmp_path / "t")
    with pytest.raises(TypeError, match=r"torch\.load"):
        fusedopt.load(opt, tmp_path / "t")
    assert not os.listdir(tmp_path)
    for k in range(3):
        step(opt, params, k)
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    saved = [p.detach().clone() for p in params]
    for k in range(3, 6):
        step(opt, params, k)
    resumed_params = [p.clone().requires_grad_() for p in saved]
    resumed = cls(resumed_params, **options)
    buffer.seek(0)
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    for k in range(3, 6):
        step(resumed, resumed_params, k)
    for i, (a, b) in enumerate(zip(resumed_params, params)):
        assert_same_bits(a.detach().numpy(), b.detach().numpy(), f"params[{i}] after resuming")
    for a, b in zip(resumed_params, params):
        assert sorted(resumed.state[a]) == sorted(opt.state[b])
        for key, v in opt.state[b].items():
            if isinstance(v, torch.Tensor):
                assert_same_bits(resumed.state[a][key].numpy(), v.numpy(), key)


# --- bad files: ValueError, and the optimizer unchanged --------------------------------------


@pytest.fixture
def trained(rng, tmp_path):
    """(make, optimizer after two steps, its params, a checkpoint of it)."""
    def make(ps, **kw):
        return fusedopt.Adam(ps, lr=0.01, amsgrad=True, **kw)
    params = random_arrays([(6,), (2, 3)], np.float32, rng)
    opt = make(params)
    for _ in range(2):
        opt.step(random_arrays([(6,), (2, 3)], np.float32, rng))
    path = tmp_path / "good.ckpt"
    fusedopt.save(opt, path)
    return make, opt, params, path


def refused(opt, path, match):
    """load() raises ValueError matching `match` and leaves opt's state dict as it was."""
    before = opt.state_dict()
    steps = getattr(opt, "steps_taken", None)
    with pytest.raises(ValueError, match=match):
        fusedopt.load(opt, path)
    assert_same_tree(opt.state_dict(), before, "state dict after a refused load")
    assert getattr(opt, "steps_taken", None) == steps


def target(rng, make=None, shapes=((6,), (2, 3)), dtype=np.float32, steps=1, **kw):
    """An optimizer with state of its own, to show a refused load keeps it."""
    make = make or (lambda ps, **k: fusedopt.Adam(ps, lr=0.5, amsgrad=True, **k))
    params = random_arrays(list(shapes), dtype, rng)
    opt = make(params, **kw)
    for _ in range(steps):
        opt.step(random_arrays(list(shapes), dtype, rng))
    return opt


def test_the_good_file_loads(trained, rng):
    make, opt, _, path = trained
    other = target(rng, make)
    fusedopt.load(other, path)
    assert_same_tree(other.state_dict(), opt.state_dict())


def test_other_type_is_refused(trained, rng):
    _, _, _, path = trained
    refused(target(rng, lambda ps: fusedopt.AdamW(ps, amsgrad=True)), path,
            "state of a Adam, not of a AdamW")
    refused(target(rng, lambda ps: fusedopt.SGD(ps, momentum=0.9)), path, "not of a SGD")


@pytest.mark.parametrize("shapes, dtype, match", [
    (((6,), (3, 2)), np.float32, r"shape \(2, 3\)"),
    (((6,), (2, 3)), np.float64, "dtype float32"),
    (((6,),), np.float32, "group 0 has 2 params, the optimizer's has 1"),
    (((6,), (2, 3), (1,)), np.float32, "group 0 has 2 params, the optimizer's has 3"),
])
def test_other_params_are_refused(trained, rng, shapes, dtype, match):
    make, _, _, path = trained
    refused(target(rng, make, shapes, dtype), path, match)


def test_other_8bit_threshold_is_refused(rng, tmp_path):
    """8-bit state saved with one min_8bit_size does not load where another one holds."""
    def make(ps, size):
        return fusedopt.Adam(ps, precision=fusedopt.Precision(state_dtype="int8",
                                                              min_8bit_size=size))
    params = random_arrays([(600,), (3,)], np.float32, rng)
    opt = make(params, 4)
    opt.step(random_arrays([(600,), (3,)], np.float32, rng))
    path = tmp_path / "q.ckpt"
    fusedopt.save(opt, path)
    other = make([p.copy() for p in params], 4096)
    other.step(random_arrays([(600,), (3,)], np.float32, rng))
    refused(other, path, "saved with precision")
    same = make([p.copy() for p in params], 4)
    fusedopt.load(same, path)
    assert same.state[0]["exp_avg"].dtype == np.uint8


def test_other_precision_is_refused(trained, rng):
    make, _, _, path = trained
    refused(target(rng, make, precision=fusedopt.Precision(stochastic_rounding=True, seed=1)),
            path, "saved with precision")


def test_other_param_groups_are_refused(trained, rng):
    make, _, _, path = trained
    params = random_arrays([(6,), (2, 3)], np.float32, rng)
    opt = make([{"params": params[:1]}, {"params": params[1:]}])
    opt.step(random_arrays([(6,), (2, 3)], np.float32, rng))
    refused(opt, path, "parameter groups")


@pytest.mark.parametrize("keep", [0, 10, 100, 0.5, -1])
def test_truncated_files_are_refused(trained, rng, keep):
    _, _, _, path = trained
    data = path.read_bytes()
    n = keep if isinstance(keep, int) and keep >= 0 else \
        int(len(data) * keep) if keep > 0 else len(data) - 1
    path.write_bytes(data[:n])
    refused(target(rng), path, "truncated, damaged or not a fusedopt checkpoint")


def test_damaged_entry_is_refused(trained, rng):
    """A flipped byte inside an array's data fails the zip's CRC check."""
    _, _, _, path = trained
    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as z:
        entry = z.read("a0.npy")
    at = bytes(data).find(entry) + len(entry) - 1  # stored, not compressed: its last byte
    assert at > 0
    data[at] ^= 0xFF
    path.write_bytes(bytes(data))
    refused(target(rng), path, "damaged")


def rewrite(path, change):
    """Rewrite a checkpoint with change(meta, entries) applied."""
    with np.load(path, allow_pickle=False) as z:
        entries = {name: z[name] for name in z.files}
    meta = json.loads(bytes(entries["meta"]).decode())
    change(meta, entries)
    entries["meta"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
    with open(path, "wb") as f:
        np.savez(f, **entries)


@pytest.mark.parametrize("change, match", [
    (lambda m, e: m.update(version=2), "format version 2"),
    (lambda m, e: m.update(format="other"), "not a fusedopt checkpoint"),
    (lambda m, e: e.pop("a1"), "document names"),
    (lambda m, e: e.update(a99=np.zeros(1)), "document names"),
    (lambda m, e: e.update(a0=e["a0"][:-1]), "the document says"),
    (lambda m, e: e.update(a0=e["a0"].astype(np.float64)), "the document says"),
    (lambda m, e: m.update(state_dict=[1, 2]), "no state dict"),
    (lambda m, e: m.update(state_dict={"weird": 1}), "cannot be rebuilt"),
    (lambda m, e: m.update(steps_taken=-1), "steps_taken -1"),
    (lambda m, e: m.clear(), "not a fusedopt checkpoint"),
], ids=["newer version", "other format", "missing array", "extra array", "array shape",
        "array dtype", "no state dict", "unknown record", "bad step count", "no document"])
def test_inconsistent_files_are_refused(trained, rng, change, match):
    _, _, _, path = trained
    rewrite(path, change)
    refused(target(rng), path, match)


def test_pickled_objects_are_never_loaded(trained, rng):
    _, _, _, path = trained
    rewrite(path, lambda m, e: e.update(a0=np.array([{"x": 1}], dtype=object)))
    refused(target(rng), path, "pickled|Object arrays")


def test_files_that_are_not_checkpoints(rng, tmp_path):
    opt = target(rng)
    refused(opt, tmp_path / "missing", "does not exist")
    (tmp_path / "text").write_text("hello")
    refused(opt, tmp_path / "text", "not a fusedopt checkpoint")
    np.save(tmp_path / "plain.npy", np.zeros(3))
    refused(opt, tmp_path / "plain.npy", "not an .npz archive")
    np.savez(tmp_path / "other.npz", x=np.zeros(3))
    refused(opt, tmp_path / "other.npz", "no fusedopt document")


# --- saving: all or nothing ------------------------------------------------------------------


def test_a_failed_save_leaves_the_old_file(trained, rng, monkeypatch):
    """np.savez dies half-way through writing: the previous checkpoint stays, whole,
    and no temporary file is left behind."""
    make, opt, _, path = trained
    good = path.read_bytes()
    real = np.savez

    def dying(f, **entries):
        real(f, **entries)
        f.seek(len(good) // 2)
        f.truncate()
        raise OSError("disk full")

    monkeypatch.setattr(np, "savez", dying)
    opt.step(random_arrays([(6,), (2, 3)], np.float32, rng))
    with pytest.raises(OSError, match="disk full"):
        fusedopt.save(opt, path)
    monkeypatch.setattr(np, "savez", real)
    assert path.read_bytes() == good
    assert os.listdir(path.parent) == [path.name]
    fusedopt.load(target(rng, make), path)  # still a good checkpoint


def test_unstorable_state_is_refused_before_writing(trained, monkeypatch, rng):
    _, opt, _, path = trained
    good = path.read_bytes()
    sd = opt.state_dict()
    sd["state"][0]["odd"] = object()
    monkeypatch.setattr(opt, "state_dict", lambda: sd)
    with pytest.raises(TypeError, match=r"state_dict\['state'\]\[0\]\['odd'\] is a object"):
        fusedopt.save(opt, path)
    assert path.read_bytes() == good and os.listdir(path.parent) == [path.name]


def test_save_replaces_an_existing_checkpoint(trained, rng):
    make, opt, _, path = trained
    opt.step(random_arrays([(6,), (2, 3)], np.float32, rng))
    fusedopt.save(opt, str(path))  # a str path works as a PathLike does
    other = target(rng, make)
    fusedopt.load(other, str(path))
    assert other.steps_taken == 3 and other.state[0]["step"] == 3.0


def test_values_of_every_kind_round_trip(tmp_path):
    """The document keeps the types of keys and values: ints, floats (NaN, inf, -0.0),
    NumPy scalars, tuples, strings, None, booleans, nested lists."""
    class Holder:
        precision = None

        def __init__(self, sd):
            self.sd = sd

        def state_dict(self):
            return self.sd

        def load_state_dict(self, sd):
            self.sd = sd

    sd = {"state": {0: {"step": 3.0, "t": None, "h": np.float32(1.5), "n": np.int64(-4),
                        "hist": [[np.arange(3.0)], [np.zeros((0, 2), np.float16)]],
                        "odd": [float("nan"), float("inf"), -0.0, 2**70, True, "x"]},
                    (1, "a"): {}},
          "param_groups": [{"params": [0, 1], "betas": (0.9, 0.99), "name": "g",
                            "frozen_params": [1], "line_search_fn": None}]}
    fusedopt.save(Holder(sd), tmp_path / "h")
    back = Holder(None)
    fusedopt.load(back, tmp_path / "h")
    assert_same_tree(back.sd, sd)


def test_torch_optimizers_are_pointed_to_torch_save(tmp_path):
    torch = pytest.importorskip("torch")
    import fusedopt.torch as fot
    opt = fot.Adam([torch.zeros(3, requires_grad=True)])
    with pytest.raises(TypeError, match=r"torch\.save"):
        fusedopt.save(opt, tmp_path / "t")
    with pytest.raises(TypeError, match=r"torch\.load"):
        fusedopt.load(opt, tmp_path / "t")
    assert not os.listdir(tmp_path)


@pytest.mark.cuda
@pytest.mark.parametrize("policy", ["plain", "master", "kahan, stochastic"])
def test_cupy_optimizer_resumes_bit_for_bit(policy, tmp_path):
    """State in GPU memory is saved through the host and loaded back onto the params'
    device; the resumed run is the uninterrupted one, bit for bit."""
    cp = pytest.importorskip("cupy")
    if not fusedopt.cuda_available():
        pytest.skip(f"no usable GPU: {fusedopt.cuda_unavailable_reason()}")
    rng = np.random.default_rng(5)
    dtype = np.float32 if policy == "plain" else np.float16
    shapes = [(6,), (2, 3), (), (0,)]
    params = [cp.asarray(np.asarray(rng.standard_normal(s), dtype=dtype)) for s in shapes]
    steps = [[cp.asarray(np.asarray(rng.standard_normal(s), dtype=dtype)) for s in shapes]
             for _ in range(6)]
    precision = fusedopt.Precision(**POLICIES[policy])
    make = lambda ps: fusedopt.Adam(ps, lr=0.01, amsgrad=True, precision=precision)  # noqa: E731
    opt = make(params)
    for g in steps[:3]:
        opt.step(g)
    fusedopt.save(opt, tmp_path / "gpu.ckpt")
    saved = [p.copy() for p in params]
    for g in steps[3:]:
        opt.step(g)
    resumed_params = [p.copy() for p in saved]
    resumed = make(resumed_params)
    fusedopt.load(resumed, tmp_path / "gpu.ckpt")
    assert all(isinstance(v, cp.ndarray) for s in resumed.state.values() for v in s.values()
               if hasattr(v, "shape"))
    for g in steps[3:]:
        resumed.step(g)
    cp.cuda.Device().synchronize()
    for a, b in zip(resumed_params, params):
        assert_same_bits(cp.asnumpy(a), cp.asnumpy(b), "param")
    for i, st in opt.state.items():
        for name, v in st.items():
            if hasattr(v, "shape"):
                assert_same_bits(cp.asnumpy(resumed.state[i][name]), cp.asnumpy(v), name)
            else:
                assert resumed.state[i][name] == v


def test_a_load_that_fails_half_way_is_undone(rng, tmp_path):
    """A load_state_dict that raises after changing something (Newton takes the new
    param_groups before it finds that a state is not a dict) is rolled back."""
    opt = fusedopt.Newton(random_arrays([(3,)], np.float64, rng), lr=0.5)
    fusedopt.save(opt, tmp_path / "n")
    rewrite(tmp_path / "n", lambda m, e: m["state_dict"]["dict"].__setitem__(
        0, ["state", {"dict": [[0, 5]]}]))  # state {0: 5}
    other = fusedopt.Newton(random_arrays([(3,)], np.float64, rng), lr=0.25)
    refused(other, tmp_path / "n", "does not fit this optimizer: TypeError")
    assert other.param_groups[0]["lr"] == 0.25
