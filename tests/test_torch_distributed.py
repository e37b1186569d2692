"""fusedopt.torch inside torch.distributed's engines, on 2 gloo ranks of this machine
(tests/torch_dist_worker.py, one process per rank, bounded in time).

For every class, a float64 MLP trained with fusedopt.torch.X and with torch.optim.X
under the same sharding gives the same losses on each rank and the same full params
(rtol 1e-9): DDP + ZeroRedundancyOptimizer (also with parameters_as_bucket_view),
FSDP2 (`fully_shard`, DTensor params stepped on their local shards) and FSDP2 with
CPUOffloadPolicy. Under FSDP2 the state is made of DTensors placed like their params,
and the full optimizer state dict equals torch's. A checkpoint saved mid-run and loaded
into fresh objects continues exactly as the uninterrupted run: ZeroRedundancyOptimizer's
consolidated state dict, and torch.distributed.checkpoint with FSDP2's distributed state
dicts (also from fusedopt into torch.optim and back).
"""

from __future__ import annotations

import shutil
import tempfile

import numpy as np
import pytest

torch = pytest.importorskip("torch")
dist = pytest.importorskip("torch.distributed")
if not dist.is_available() or not dist.is_gloo_available():
    pytest.skip("torch.distributed with gloo is not available", allow_module_level=True)

import torch_dist_worker as W  # noqa: E402
from _launch import run_ranks  # noqa: E402

RANKS = 2
RTOL, ATOL = 1e-9, 1e-12
NAMES = list(W.OPTIONS)


@pytest.fixture(scope="module")
def results():
    folder = tempfile.mkdtemp(prefix="fo-torchdist-")
    try:
        run_ranks("torch_dist_worker.py", [folder], RANKS, timeout=240).check()
        return [torch.load(f"{folder}/rank{r}.pt", weights_only=False) for r in range(RANKS)]
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _run(results, key, rank):
    run = results[rank][key]
    if "error" in run:
        pytest.fail(f"{key} failed on rank {rank}:\n{run['error']}")
    return run


def _assert_same_training(results, key, other, rtol=RTOL, atol=ATOL, exact=False):
    for rank in range(RANKS):
        a, b = _run(results, key, rank), _run(results, other, rank)
        what = f"{key} vs {other}, rank {rank}"
        if exact:
            assert a["losses"] == b["losses"], what
        else:
            np.testing.assert_allclose(a["losses"], b["losses"], rtol=rtol, atol=atol,
                                       err_msg=f"{what}: losses")
        assert len(a["params"]) == len(b["params"]) > 0
        for i, (x, y) in enumerate(zip(a["params"], b["params"])):
            assert x.dtype == y.dtype == torch.float64
            if exact:
                assert torch.equal(x, y), f"{what}: params[{i}]"
            else:
                np.testing.assert_allclose(x.numpy(), y.numpy(), rtol=rtol, atol=atol,
                                           err_msg=f"{what}: params[{i}]")


@pytest.mark.parametrize("name", NAMES)
def test_zero_redundancy_optimizer_matches_torch_optim(results, name):
    _assert_same_training(results, f"zero/fusedopt/{name}", f"zero/torch/{name}")


def test_zero_redundancy_optimizer_bucket_view_matches_torch_optim(results):
    _assert_same_training(results, "zero-bucket-view/fusedopt/AdamW",
                          "zero-bucket-view/torch/AdamW")


@pytest.mark.parametrize("name", NAMES)
def test_zero_redundancy_optimizer_checkpoint_continues_identically(results, name):
    _assert_same_training(results, f"zero-checkpoint/fusedopt/{name}", f"zero/fusedopt/{name}",
                          exact=True)


@pytest.mark.parametrize("engine", ["fsdp", "fsdp-offload"])
@pytest.mark.parametrize("name", NAMES)
def test_fsdp2_matches_torch_optim(results, engine, name):
    _assert_same_training(results, f"{engine}/fusedopt/{name}", f"{engine}/torch/{name}")


@pytest.mark.parametrize("engine", ["fsdp", "fsdp-offload"])
@pytest.mark.parametrize("name", NAMES)
def test_fsdp2_state_is_dtensors_placed_like_the_params(results, engine, name):
    for rank in range(RANKS):
        layout = _run(results, f"{engine}/fusedopt/{name}", rank)["state_layout"]
        theirs = _run(results, f"{engine}/torch/{name}", rank)["state_layout"]
        assert [entry[0] for entry in layout] == [entry[0] for entry in theirs]
        assert layout, "no state"
        for key, kind, placements, mesh, local_shape in layout:
            assert kind == "DTensor", (key, kind)
            assert placements and mesh and local_shape, (key, placements, mesh, local_shape)


@pytest.mark.parametrize("name", NAMES)
def test_fsdp2_full_optimizer_state_dict_matches_torch(results, name):
    ours = _run(results, f"fsdp/fusedopt/{name}", 0)["full_state"]
    theirs = _run(results, f"fsdp/torch/{name}", 0)["full_state"]
    assert sorted(ours) == sorted(theirs) and len(ours) == 6
    for fqn, state in theirs.items():
        assert sorted(ours[fqn]) == sorted(state), fqn
        for key, value in state.items():
            np.testing.assert_allclose(torch.as_tensor(ours[fqn][key]).double().numpy(),
                                       torch.as_tensor(value).double().numpy(),
                                       rtol=RTOL, atol=ATOL, err_msg=f"{fqn}.{key}")


@pytest.mark.parametrize("name", W.CHECKPOINTED)
def test_fsdp2_distributed_checkpoint_continues_identically(results, name):
    _assert_same_training(results, f"fsdp-checkpoint/fusedopt/{name}", f"fsdp/fusedopt/{name}",
                          exact=True)


def test_fsdp2_offload_distributed_checkpoint_continues_identically(results):
    _assert_same_training(results, "fsdp-offload-checkpoint/fusedopt/AdamW",
                          "fsdp-offload/fusedopt/AdamW", exact=True)


def test_fsdp2_checkpoint_of_fusedopt_continues_in_torch_optim(results):
    _assert_same_training(results, "fsdp-checkpoint/fusedopt-to-torch/AdamW",
                          "fsdp/fusedopt/AdamW")


def test_fsdp2_checkpoint_of_torch_optim_continues_in_fusedopt(results):
    _assert_same_training(results, "fsdp-checkpoint/torch-to-fusedopt/Adagrad",
                          "fsdp/torch/Adagrad")


@pytest.mark.parametrize("placement", ["shard", "replicate"])
@pytest.mark.parametrize("name", ["AdamW", "Adagrad"])
def test_dtensors_from_distribute_tensor_match_torch_optim(results, placement, name):
    _assert_same_training(results, f"dtensor-{placement}/fusedopt/{name}",
                          f"dtensor-{placement}/torch/{name}")


@pytest.mark.parametrize("placement", ["shard", "replicate"])
def test_dtensor_params_with_ema(results, placement):
    """ema_decay over DTensor params: the averages are DTensors placed like their params
    (moved on the local shards, also for a param without a gradient in a step), and the
    params and averages equal those of the same run over plain tensors, bit for bit."""
    for rank in range(RANKS):
        run = _run(results, f"dtensor-ema-{placement}", rank)
        assert run["placed"]
        for mine, plain in (("params", "plain_params"), ("emas", "plain_emas")):
            for a, b in zip(run[mine], run[plain]):
                assert torch.equal(a, b), (placement, rank, mine)
        for a, b in zip(run["swapped"], run["emas"]):
            assert torch.equal(a, b)
        assert not torch.equal(run["emas"][0], run["params"][0])


def test_a_partial_gradient_is_refused(results):
    for rank in range(RANKS):
        run = _run(results, "dtensor-partial-grad", rank)
        assert run["message"] is not None and "partial sum over ranks" in run["message"]
        assert "grads[0]" in run["message"]
        assert run["unchanged"]


def test_8bit_state_is_refused_for_dtensor_params(results):
    for rank in range(RANKS):
        message = _run(results, "dtensor-8bit", rank)["message"]
        assert message is not None and "optim_bits=8" in message and "DTensor" in message


def test_an_elementwise_rule_gives_the_same_bits_on_shards(results):
    """Lion, which torch.optim does not have: sharded and replicated DTensors alike."""
    _assert_same_training(results, "dtensor-shard/fusedopt/Lion",
                          "dtensor-replicate/fusedopt/Lion", exact=True)


def test_trust_ratios_refuse_sharded_params(results):
    for rank in range(RANKS):
        run = _run(results, "dtensor-trust-ratio", rank)
        for name in ("LAMB", "LARS"):
            message = run[f"{name}/shard"]
            assert message is not None and "need each whole tensor's norms" in message, message
            assert run[f"{name}/replicate"] is None
