"""fusedopt.torch as the client optimizer of DeepSpeed's ZeRO-Offload (stage 1 and 2,
`offload_optimizer: cpu`), on 2 gloo ranks with DeepSpeed's CPU accelerator
(tests/deepspeed_worker.py, one process per rank, bounded in time).

DeepSpeed hands the client optimizer one param group holding the rank's flat fp32
partition on the CPU, with its gradient in .grad. What the optimizer does with it is
replayed here: one fusedopt.torch optimizer in this process, given the same partition
and gradients, reproduces every step bit for bit. Against torch.optim.X in the same
engine, losses and params agree to float32 rounding (DeepSpeed keeps its master
partition in float32 whatever the model's dtype, so the two kernels' different
grouping of float32 operations shows after a few steps). A checkpoint saved and loaded
mid-run (DeepSpeed's save_checkpoint / load_checkpoint, which go through the client
optimizer's state_dict / load_state_dict) continues exactly as the uninterrupted run.
"""

from __future__ import annotations

import importlib.util
import shutil
import tempfile

import numpy as np
import pytest

torch = pytest.importorskip("torch")
if importlib.util.find_spec("deepspeed") is None:
    pytest.skip("DeepSpeed is not installed (pip install 'fusedopt[deepspeed]')",
                allow_module_level=True)

import fusedopt.torch as fot  # noqa: E402
import deepspeed_worker as W  # noqa: E402
from _launch import run_ranks  # noqa: E402

RANKS = 2
FLOAT32_RTOL, FLOAT32_ATOL = 1e-4, 1e-6


@pytest.fixture(scope="module")
def results():
    folder = tempfile.mkdtemp(prefix="fo-deepspeed-")
    try:
        # a private extensions folder: nothing DeepSpeed might JIT-build outlives the test
        run_ranks("deepspeed_worker.py", [folder], RANKS, timeout=240, DS_ACCELERATOR="cpu",
                  TORCH_EXTENSIONS_DIR=f"{folder}/extensions").check()
        return [torch.load(f"{folder}/rank{r}.pt", weights_only=False) for r in range(RANKS)]
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _run(results, key, rank):
    run = results[rank][key]
    if "error" in run:
        pytest.fail(f"{key} failed on rank {rank}:\n{run['error']}")
    return run


RUN_IDS = [f"zero{stage}-{name}" for stage, name in W.RUNS]


@pytest.mark.parametrize("stage, name", W.RUNS, ids=RUN_IDS)
def test_the_client_optimizer_gets_one_flat_fp32_cpu_partition_with_its_grad(results, stage,
                                                                              name):
    sizes = []
    for rank in range(RANKS):
        run = _run(results, f"zero{stage}/fusedopt/{name}", rank)
        assert run["engine_optimizer"] == "DeepSpeedZeroOptimizer"
        assert run["client"] == "fusedopt.torch"
        ((layout,),) = run["seen"]  # one group, one tensor
        shape, dtype, device, contiguous, grad = layout
        assert len(shape) == 1 and dtype == "torch.float32" and device == "cpu" and contiguous
        assert grad == (shape, "torch.float32")
        sizes.append(shape[0])
        for key, value in run["state"][0].items():  # the state lives on the partition too
            if key != "step":
                assert tuple(value.shape) == shape and value.dtype == torch.float32, key
    assert sum(sizes) >= 98  # the model's elements, padded by DeepSpeed


@pytest.mark.parametrize("stage, name", W.RUNS, ids=RUN_IDS)
def test_each_step_is_fusedopts_step_on_the_partition(results, stage, name):
    for rank in range(RANKS):
        steps = _run(results, f"zero{stage}/fusedopt/{name}", rank)["steps"]
        assert len(steps) == W.STEPS
        ((start, _),), _ = steps[0]
        p = torch.nn.Parameter(start.clone())
        opt = getattr(fot, name)([p], **W.OPTIONS[name])
        for t, (before, after) in enumerate(steps):
            ((value, grad),), (want,) = before, after
            assert torch.equal(p.detach(), value), f"rank {rank}: partition before step {t + 1}"
            p.grad = grad
            opt.step()
            assert torch.equal(p.detach(), want), f"rank {rank}: partition after step {t + 1}"


@pytest.mark.parametrize("stage, name", W.RUNS, ids=RUN_IDS)
def test_matches_torch_optim_in_the_same_engine(results, stage, name):
    for rank in range(RANKS):
        ours = _run(results, f"zero{stage}/fusedopt/{name}", rank)
        theirs = _run(results, f"zero{stage}/torch/{name}", rank)
        np.testing.assert_allclose(ours["losses"], theirs["losses"], rtol=FLOAT32_RTOL,
                                   atol=FLOAT32_ATOL)
        assert len(ours["params"]) == 6
        for i, (a, b) in enumerate(zip(ours["params"], theirs["params"])):
            np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=FLOAT32_RTOL,
                                       atol=FLOAT32_ATOL, err_msg=f"rank {rank} params[{i}]")


@pytest.mark.parametrize("stage", [1, 2])
def test_a_checkpoint_continues_identically(results, stage):
    for rank in range(RANKS):
        resumed = _run(results, f"zero{stage}-checkpoint/fusedopt/AdamW", rank)
        straight = _run(results, f"zero{stage}/fusedopt/AdamW", rank)
        assert resumed["losses"] == straight["losses"]
        for i, (a, b) in enumerate(zip(resumed["params"], straight["params"])):
            assert torch.equal(a, b), f"rank {rank} params[{i}]"
        for key, value in straight["state"][0].items():
            assert torch.equal(torch.as_tensor(resumed["state"][0][key]),
                               torch.as_tensor(value)), key
