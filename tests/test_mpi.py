"""fusedopt.mpi.ZeroRedundancyOptimizer under `mpiexec -n 2` (tests/mpi_worker.py).

Two ranks, each with its own gradients: after every step both ranks' params equal,
bit for bit, one process stepping the same optimizer on the averaged gradient (the
sum of two floats is one rounding, halving it is exact, so the order of operations
cannot matter). Each rank holds the state of its shard only; state_dict gathers the
full state in the inner optimizer's layout and load_state_dict scatters it again (a
fresh optimizer resumes mid-run); a state dict that does not fit is refused on both
ranks. Ranks that pass params of other shapes, dtypes or counts, or other options,
raise on both ranks within seconds instead of hanging.
"""

from __future__ import annotations

import pickle
import re
import shutil
import tempfile

import numpy as np
import pytest

pytest.importorskip("mpi4py")

import mpi_worker as W  # noqa: E402
from _launch import mpiexec, run_mpiexec  # noqa: E402
from cases import assert_same_bits  # noqa: E402

if mpiexec() is None:
    pytest.skip("no mpiexec (pip install 'fusedopt[mpi]')", allow_module_level=True)

RANKS = 2


def _launch(what, timeout):
    folder = tempfile.mkdtemp(prefix="fo-mpi-")
    try:
        run_mpiexec("mpi_worker.py", [what, folder], RANKS, timeout).check()
        out = []
        for r in range(RANKS):
            with open(f"{folder}/rank{r}.pkl", "rb") as f:
                out.append(pickle.load(f))
        return out
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="module")
def trained():
    return _launch("train", timeout=120)


@pytest.fixture(scope="module")
def mismatched():
    return _launch("mismatch", timeout=60)


def _record(trained, case, rank):
    record = trained[rank][case.name]
    if "error" in record:
        pytest.fail(f"rank {rank} failed:\n{record['error']}")
    return record


def _reference(case):
    """One process: the same optimizer stepped on the averaged gradients; the params and
    state dicts after each step."""
    params = [[p.copy() for p in group] for group in W.initial(case)]
    opt = case.cls(W.groups_of(case, params), **case.options)
    seen, dicts = [], []
    for step in range(1, W.STEPS + 1):
        g0, g1 = (W.grads(case, step, r) for r in range(RANKS))
        opt.step([np.asarray((a + b) / 2) for ga, gb in zip(g0, g1) for a, b in zip(ga, gb)])
        seen.append([p.copy() for group in params for p in group])
        dicts.append(opt.state_dict())
    return seen, dicts


def _assert_state_dicts_equal(actual, expected, what):
    assert actual["param_groups"] == expected["param_groups"], what
    assert sorted(actual["state"]) == sorted(expected["state"]), what
    for i, state in expected["state"].items():
        assert sorted(actual["state"][i]) == sorted(state), f"{what}: names of param {i}"
        for name, value in state.items():
            if not isinstance(value, np.ndarray):  # a per-param scalar (step, mu_product...)
                assert actual["state"][i][name] == value, f"{what}: {name} of param {i}"
            else:
                assert_same_bits(actual["state"][i][name], value, f"{what}: {name} of param {i}")


@pytest.mark.parametrize("case", W.CASES, ids=lambda c: c.name)
def test_params_equal_one_process_on_the_averaged_gradient(trained, case):
    expected, _ = _reference(case)
    for rank in range(RANKS):
        record = _record(trained, case, rank)
        for step, (got, want) in enumerate(zip(record["params"], expected), 1):
            for i, (a, b) in enumerate(zip(got, want)):
                assert_same_bits(a, b, f"rank {rank}, step {step}, params[{i}]")


@pytest.mark.parametrize("case", W.CASES, ids=lambda c: c.name)
def test_state_dict_gathers_the_full_state_on_rank_0(trained, case):
    _, dicts = _reference(case)
    _assert_state_dicts_equal(_record(trained, case, 0)["state_dict"], dicts[W.RESUME_AT - 1],
                              f"step {W.RESUME_AT}")
    _assert_state_dicts_equal(_record(trained, case, 0)["final_state_dict"], dicts[-1], "last")
    assert _record(trained, case, 1)["state_dict"] is None


@pytest.mark.parametrize("case", W.CASES, ids=lambda c: c.name)
def test_each_rank_holds_only_its_shard(trained, case):
    sizes = {}
    for _, dt, shapes in case.layout():
        sizes[np.dtype(dt)] = sizes.get(np.dtype(dt), 0) + sum(int(np.prod(s)) for s in shapes)
    for rank in range(RANKS):
        record = _record(trained, case, rank)
        shard = sum((rank + 1) * n // RANKS - rank * n // RANKS for n in sizes.values())
        assert record["shard_size"] == shard
        assert record["state_sizes"], "no state after the steps"
        for name, size in record["state_sizes"].items():
            assert size == shard, f"rank {rank}: {name} holds {size} elements, the shard {shard}"


@pytest.mark.parametrize("case", W.CASES[:3], ids=lambda c: c.name)
def test_a_state_dict_that_does_not_fit_is_refused_on_every_rank(trained, case):
    for rank in range(RANKS):
        message = _record(trained, case, rank)["bad_load"]
        assert message is not None and "load_state_dict" in message, message
        assert "shape" in message or "groups" in message, message
    record = _record(trained, case, 0)
    _assert_state_dicts_equal(record["after_bad_load"], record["final_state_dict"], "kept")


@pytest.mark.parametrize("trial, kind, text", [
    ("shape", "ValueError", r"params\[1\] has shape \(6,\) and dtype float64 on rank 1, "
                            r"shape \(5,\) and dtype float64 on rank 0"),
    ("dtype", "ValueError", r"params\[0\] has shape \(4,\) and dtype float32 on rank 1"),
    ("count", "ValueError", r"rank 1 has param groups of \[2\] params, rank 0 of \[1\]"),
    ("options", "ValueError", r"param group 0 has options .*'lr', 0.002.* on rank 1"),
], ids=["shape", "dtype", "count", "options"])
def test_ranks_that_differ_raise_on_every_rank(mismatched, trial, kind, text):
    for rank in range(RANKS):
        got_kind, message, seconds = mismatched[rank][trial]
        assert got_kind == kind, (rank, got_kind, message)
        assert message is not None
        assert re.search(text, message), message
        assert seconds < 5.0


def test_a_rank_that_fails_to_set_up_stops_every_rank(mismatched):
    kind0, message0, seconds0 = mismatched[0]["local-error"]
    kind1, message1, seconds1 = mismatched[1]["local-error"]
    assert kind1 == "TypeError" and "params[0] has dtype int32" in message1
    assert kind0 == "RuntimeError" and "rank 1 failed to set up: TypeError" in message0
    assert max(seconds0, seconds1) < 5.0


def test_cupy_arrays_are_refused_without_a_cuda_aware_mpi(mismatched):
    for rank in range(RANKS):
        (kind, message), said, _ = mismatched[rank]["cupy"]
        assert kind == "TypeError", message
        assert "not CUDA-aware" in message and "does not copy through host memory" in message
        assert said == {"1": True, "0": False}


BAD = [
    ("grads-count", "ValueError", r"step: got 1 grads for 2 params"),
    ("grads-shape", "ValueError", r"grads\[0\] has shape \(4, 3\), params\[0\] has \(3, 4\)"),
    ("grads-dtype", "TypeError", r"grads\[0\] has dtype float32, params\[0\] has float64"),
    ("grads-none", "TypeError", r"grads\[1\] is None"),
    ("lbfgs", "TypeError", r"optimizer_class must be a fusedopt element-wise optimizer"),
    ("lamb", "TypeError", r"LAMB needs every tensor's norms"),
    ("lars", "TypeError", r"LARS needs every tensor's norms"),
    ("schedulefree", "TypeError", r"AdamWScheduleFree switches its params between two"),
    ("strided", "ValueError", r"params\[0\] is not C-contiguous"),
    ("hyperparameter", "ValueError", r"Invalid learning rate"),
]


@pytest.mark.parametrize("trial, kind, text", BAD, ids=[b[0] for b in BAD])
def test_bad_input_is_refused_on_every_rank(mismatched, trial, kind, text):
    for rank in range(RANKS):
        got_kind, message = mismatched[rank]["bad"][trial]
        assert got_kind == kind, (rank, got_kind, message)
        assert re.search(text, message), message


def test_refused_gradients_change_nothing(mismatched):
    for rank in range(RANKS):
        assert mismatched[rank]["bad"]["unchanged"]
        assert mismatched[rank]["bad"]["stepped"]
