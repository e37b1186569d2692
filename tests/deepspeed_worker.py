"""The DeepSpeed side of tests/test_deepspeed.py: run once per rank (2 gloo ranks, the
CPU accelerator), it trains an MLP with DeepSpeed's ZeRO stage 1 and 2 and
`offload_optimizer: cpu`, the client optimizer being fusedopt.torch.X or torch.optim.X,
and writes what each rank saw to OUT/rank<r>.pt.

    DS_ACCELERATOR=cpu RANK=r WORLD_SIZE=2 FUSEDOPT_TEST_RENDEZVOUS=file:///tmp/x \\
        python deepspeed_worker.py OUT

ZeRO-Offload hands the client optimizer one param group holding this rank's flat fp32
partition on the CPU, whose .grad it fills before each step; the worker records that
contract as the optimizer sees it.
"""

from __future__ import annotations

import os
import sys
import traceback

import torch

STEPS = 8
CHECKPOINT_AT = 4

OPTIONS = {
    "AdamW": {"lr": 0.01, "weight_decay": 0.1},
    "SGD": {"lr": 0.05, "momentum": 0.9},
    "Adagrad": {"lr": 0.05},
}
RUNS = [(2, "AdamW"), (2, "SGD"), (2, "Adagrad"), (1, "AdamW")]


def config(stage):
    return {
        "train_micro_batch_size_per_gpu": 8,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": stage, "offload_optimizer": {"device": "cpu"}},
        # take the client optimizer as it is on the offloaded partition
        "zero_force_ds_cpu_optimizer": False,
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10 ** 9,
    }


def mlp(seed):
    """Layers of 7, 5 and 3 rows: 98 elements, split over the ranks by DeepSpeed."""
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 7), torch.nn.Tanh(), torch.nn.Linear(7, 5),
                               torch.nn.Tanh(), torch.nn.Linear(5, 3))


def batch(step, rank):
    g = torch.Generator().manual_seed(1000 * step + rank)
    return torch.randn(8, 6, generator=g), torch.randn(8, 3, generator=g)


class Recorder:
    """Wraps the client optimizer's step to record what DeepSpeed hands it: the layout of
    its param groups (once), and each step's partition before, its gradient, and the
    partition after."""

    def __init__(self, opt):
        self.seen, self.steps = None, []
        step = opt.step

        def recording_step(*args, **kwargs):
            params = [p for g in opt.param_groups for p in g["params"]]
            if self.seen is None:
                self.seen = [[(tuple(p.shape), str(p.dtype), str(p.device), p.is_contiguous(),
                               None if p.grad is None else (tuple(p.grad.shape),
                                                            str(p.grad.dtype)))
                              for p in g["params"]] for g in opt.param_groups]
            before = [(p.detach().clone(), None if p.grad is None else p.grad.clone())
                      for p in params]
            out = step(*args, **kwargs)
            self.steps.append((before, [p.detach().clone() for p in params]))
            return out

        opt.step = recording_step


def run(stage, impl, name, folder, checkpoint=False):
    import deepspeed

    import fusedopt.torch as fot

    rank = torch.distributed.get_rank()
    module = fot if impl == "fusedopt" else torch.optim

    def build(seed):
        model = mlp(seed)
        opt = getattr(module, name)(model.parameters(), **OPTIONS[name])
        recorder = Recorder(opt)
        engine, zero_opt, _, _ = deepspeed.initialize(model=model, optimizer=opt,
                                                      config=config(stage))
        return engine, zero_opt, opt, recorder

    engine, zero_opt, opt, recorder = build(0)
    losses = []
    for step in range(1, STEPS + 1):
        if checkpoint and step == CHECKPOINT_AT + 1:
            path = os.path.join(folder, f"ds-{stage}-{impl}-{name}")
            engine.save_checkpoint(path, tag="mid")
            engine, zero_opt, opt, recorder = build(1)  # other initial values
            engine.load_checkpoint(path, tag="mid")
        x, y = batch(step, rank)
        loss = torch.nn.functional.mse_loss(engine(x), y)
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    params = []
    for p in engine.module.parameters():
        params.append(p.detach().clone())
    state = [{k: (v.clone() if torch.is_tensor(v) else v) for k, v in opt.state[p].items()}
             for g in opt.param_groups for p in g["params"]]
    return {"losses": losses, "params": params, "seen": recorder.seen, "steps": recorder.steps,
            "engine_optimizer": type(zero_opt).__name__, "client": type(opt).__module__,
            "state": state}


def main():
    folder = sys.argv[1]
    torch.set_num_threads(1)
    import deepspeed
    import deepspeed.comm.torch  # noqa: F401 - the module, reached through sys.modules

    # DeepSpeed JIT-compiles a shared-memory all-reduce for the CPU accelerator (about
    # 100 s on 2 cores) when its communication backend starts; the training steps here
    # do not need it, gloo does the collectives
    sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None
    deepspeed.init_distributed("gloo", init_method=os.environ["FUSEDOPT_TEST_RENDEZVOUS"],
                               rank=int(os.environ["RANK"]),
                               world_size=int(os.environ["WORLD_SIZE"]), verbose=False)
    todo = {}
    for stage, name in RUNS:
        for impl in ("fusedopt", "torch"):
            todo[f"zero{stage}/{impl}/{name}"] = (stage, impl, name, False)
    todo["zero2-checkpoint/fusedopt/AdamW"] = (2, "fusedopt", "AdamW", True)
    todo["zero1-checkpoint/fusedopt/AdamW"] = (1, "fusedopt", "AdamW", True)
    results = {}
    for key, (stage, impl, name, checkpoint) in todo.items():
        try:
            results[key] = run(stage, impl, name, folder, checkpoint)
        except Exception:  # noqa: BLE001 - the test that reads this run reports it
            results[key] = {"error": traceback.format_exc()}
    torch.save(results, os.path.join(folder, f"rank{torch.distributed.get_rank()}.pt"))
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
