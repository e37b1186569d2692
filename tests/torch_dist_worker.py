"""The torch.distributed side of tests/test_torch_distributed.py: run once per rank (2
gloo ranks on the CPU), it trains a float64 MLP with each engine and each optimizer,
fusedopt.torch.X and torch.optim.X under the same sharding, and writes what each rank
saw (losses, full params, checks) to OUT/rank<r>.pt.

    RANK=r WORLD_SIZE=2 FUSEDOPT_TEST_RENDEZVOUS=file:///tmp/x python torch_dist_worker.py OUT

Engines: DDP + ZeroRedundancyOptimizer, FSDP2 (`fully_shard`, DTensor params), FSDP2
with CPUOffloadPolicy; checkpoints mid-run through ZeroRedundancyOptimizer's
consolidated state dict and through torch.distributed.checkpoint.
"""

from __future__ import annotations

import os
import sys
import traceback

import torch
import torch.distributed as dist

import fusedopt.torch as fot

STEPS = 8
CHECKPOINT_AT = 4  # saved after this step, loaded into fresh objects that continue

# options of each class: every class, a non-default option or two
OPTIONS = {
    "SGD": {"lr": 0.05, "momentum": 0.9, "nesterov": True, "weight_decay": 0.01},
    "Adagrad": {"lr": 0.05, "lr_decay": 0.01},
    "RMSprop": {"lr": 0.01, "momentum": 0.5, "centered": True},
    "Adadelta": {"lr": 1.0, "weight_decay": 0.01},
    "Adam": {"lr": 0.01, "amsgrad": True},
    "AdamW": {"lr": 0.01, "weight_decay": 0.1},
}
# classes torch.optim does not have: stepped on DTensors made by hand only, sharded and
# replicated (an elementwise rule gives the same bits either way)
BEYOND = {"Lion": {"lr": 0.01, "weight_decay": 0.1}}
# FSDP2 checkpoints: the classes the checkpoint round trip runs for
CHECKPOINTED = ("Adam", "AdamW", "SGD", "Adagrad")


def optimizer(impl, name):
    module = fot if impl == "fusedopt" else torch.optim
    return getattr(module, name)


def mlp(seed=0):
    """A float64 MLP whose layers split unevenly over 2 ranks (7, 5 and 3 rows)."""
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 7), torch.nn.Tanh(), torch.nn.Linear(7, 5),
                               torch.nn.Tanh(), torch.nn.Linear(5, 3)).double()


def batch(step, rank):
    g = torch.Generator().manual_seed(1000 * step + rank)
    return (torch.randn(8, 6, generator=g, dtype=torch.float64),
            torch.randn(8, 3, generator=g, dtype=torch.float64))


def train_step(model, opt, step, rank):
    x, y = batch(step, dist.get_rank())
    loss = torch.nn.functional.mse_loss(model(x), y)
    opt.zero_grad()
    loss.backward()
    opt.step()
    return loss.item()


# --- DDP + ZeroRedundancyOptimizer ------------------------------------------------------------

def zero(impl, name, folder, checkpoint=False, bucket_view=False):
    from torch.distributed.optim import ZeroRedundancyOptimizer
    from torch.nn.parallel import DistributedDataParallel as DDP

    rank = dist.get_rank()

    def build(seed):
        model = DDP(mlp(seed))
        opt = ZeroRedundancyOptimizer(model.parameters(), optimizer_class=optimizer(impl, name),
                                      parameters_as_bucket_view=bucket_view, **OPTIONS[name])
        return model, opt

    model, opt = build(0)
    losses = []
    for step in range(1, STEPS + 1):
        if checkpoint and step == CHECKPOINT_AT + 1:
            path = os.path.join(folder, f"zero-{impl}-{name}.pt")
            opt.consolidate_state_dict(to=0)
            if rank == 0:
                torch.save({"model": model.module.state_dict(), "optim": opt.state_dict()}, path)
            dist.barrier()
            saved = torch.load(path, weights_only=False)
            model, opt = build(1)  # other initial values: the load must bring everything
            model.module.load_state_dict(saved["model"])
            opt.load_state_dict(saved["optim"])
            dist.barrier()
        losses.append(train_step(model, opt, step, rank))
    return {"losses": losses, "params": [p.detach().clone() for p in model.module.parameters()]}


# --- FSDP2 ------------------------------------------------------------------------------------

def fsdp_model(seed, offload):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, OffloadPolicy, fully_shard

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    policy = CPUOffloadPolicy(pin_memory=False) if offload else OffloadPolicy()
    model = mlp(seed)
    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer, mesh=mesh, offload_policy=policy)
    fully_shard(model, mesh=mesh, offload_policy=policy)
    return model


def fsdp(impl, name, folder, offload=False, checkpoint=False, resume_impl=None):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions, get_model_state_dict, get_optimizer_state_dict,
        set_model_state_dict, set_optimizer_state_dict)

    rank = dist.get_rank()
    model = fsdp_model(0, offload)
    opt = optimizer(impl, name)(model.parameters(), **OPTIONS[name])
    losses = []
    for step in range(1, STEPS + 1):
        if checkpoint and step == CHECKPOINT_AT + 1:
            path = os.path.join(folder, f"dcp-{impl}-{name}-{resume_impl}-{offload}")
            dcp.save({"model": get_model_state_dict(model),
                      "optim": get_optimizer_state_dict(model, opt)}, checkpoint_id=path)
            model = fsdp_model(1, offload)  # other initial values: the load brings them
            opt = optimizer(resume_impl or impl, name)(model.parameters(), **OPTIONS[name])
            state = {"model": get_model_state_dict(model),
                     "optim": get_optimizer_state_dict(model, opt)}
            dcp.load(state, checkpoint_id=path)
            set_model_state_dict(model, state["model"])
            set_optimizer_state_dict(model, opt, state["optim"])
        losses.append(train_step(model, opt, step, rank))
    out = {"losses": losses, "params": [p.full_tensor().detach().clone()
                                        for p in model.parameters()]}
    # the state: DTensors placed like their params, holding the local shard's values
    layout = []
    for p in model.parameters():
        for key, value in opt.state[p].items():
            if key == "step":
                continue
            layout.append((key, type(value).__name__, getattr(value, "placements", None) ==
                           p.placements, getattr(value, "device_mesh", None) == p.device_mesh,
                           tuple(value.to_local().shape) == tuple(p.to_local().shape)
                           if hasattr(value, "to_local") else False))
    out["state_layout"] = layout
    full = get_optimizer_state_dict(model, opt, options=StateDictOptions(full_state_dict=True,
                                                                         cpu_offload=True))
    out["full_state"] = full["state"] if rank == 0 else None
    return out


# --- DTensors made by hand ----------------------------------------------------------------

def dtensor(impl, name, placement):
    """Params and grads that are DTensors from distribute_tensor (no FSDP), 5 steps."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    placements = [Shard(0)] if placement == "shard" else [Replicate()]
    g = torch.Generator().manual_seed(5)
    full = [torch.randn(7, 3, generator=g, dtype=torch.float64),
            torch.randn(5, generator=g, dtype=torch.float64)]
    params = [torch.nn.Parameter(distribute_tensor(t, mesh, placements)) for t in full]
    opt = optimizer(impl, name)(params, **(OPTIONS.get(name) or BEYOND[name]))
    for step in range(5):
        for p in params:
            grad = torch.randn(p.shape, generator=g, dtype=torch.float64)
            p.grad = distribute_tensor(grad, mesh, placements)
        opt.step()
    return {"losses": [], "params": [p.full_tensor().detach().clone() for p in params]}


def dtensor_ema(placement):
    """fusedopt.torch.AdamW with ema_decay over DTensor params from distribute_tensor (one
    param without a gradient in one step), and over the same full tensors as plain
    tensors: the params and averages as full tensors, whether the averages are DTensors
    placed like their params, and what swap_ema puts into the params."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    placements = [Shard(0)] if placement == "shard" else [Replicate()]
    g = torch.Generator().manual_seed(6)
    full = [torch.randn(7, 3, generator=g, dtype=torch.float64),
            torch.randn(5, generator=g, dtype=torch.float64)]
    params = [torch.nn.Parameter(distribute_tensor(t, mesh, placements)) for t in full]
    plain = [torch.nn.Parameter(t.clone()) for t in full]
    opts = [fot.AdamW(ps, lr=0.01, weight_decay=0.1, ema_decay=0.9) for ps in (params, plain)]
    for step in range(6):
        for p, q in zip(params, plain):
            grad = torch.randn(q.shape, generator=g, dtype=torch.float64)
            skip = step == 3 and q.dim() == 1
            q.grad = None if skip else grad
            p.grad = None if skip else distribute_tensor(grad, mesh, placements)
        for opt in opts:
            opt.step()
    emas = [opts[0].state[p]["ema"] for p in params]
    out = {"losses": [], "params": [p.full_tensor().detach().clone() for p in params],
           "emas": [e.full_tensor().clone() for e in emas],
           "plain_params": [q.detach().clone() for q in plain],
           "plain_emas": [opts[1].state[q]["ema"].clone() for q in plain],
           "placed": all(isinstance(e, DTensor) and e.placements == p.placements
                         for e, p in zip(emas, params))}
    with opts[0].averaged():
        out["swapped"] = [p.full_tensor().detach().clone() for p in params]
    return out


def partial_grad():
    """A gradient that is a pending sum over ranks is refused, and nothing changes."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Partial, Replicate, distribute_tensor

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    p = torch.nn.Parameter(distribute_tensor(torch.ones(4, 3, dtype=torch.float64), mesh,
                                             [Replicate()]))
    p.grad = DTensor.from_local(torch.ones(4, 3, dtype=torch.float64), mesh, [Partial()])
    opt = fot.SGD([p], lr=0.1)
    try:
        opt.step()
        message = None
    except ValueError as e:
        message = str(e)
    return {"message": message, "unchanged": bool((p.to_local() == 1).all())}


def dtensor_8bit():
    """8-bit state (optim_bits=8) is refused for DTensor params, at construction."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    p = torch.nn.Parameter(distribute_tensor(torch.ones(8, 3), mesh, [Shard(0)]))
    try:
        fot.AdamW([p], lr=0.1, optim_bits=8, min_8bit_size=0)
        return {"message": None}
    except ValueError as e:
        return {"message": str(e)}


def trust_ratio_on_shards():
    """LAMB and LARS refuse sharded DTensor params (a shard's norms are not its
    tensor's) and take replicated ones."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    out = {}
    for key, placement in (("shard", Shard(0)), ("replicate", Replicate())):
        p = torch.nn.Parameter(distribute_tensor(torch.ones(4, 3, dtype=torch.float64), mesh,
                                                 [placement]))
        for name, options in (("LAMB", {}), ("LARS", {"lr": 0.1})):
            try:
                getattr(fot, name)([p], **options)
                out[f"{name}/{key}"] = None
            except ValueError as e:
                out[f"{name}/{key}"] = str(e)
    return out


def runs(folder):
    """name -> function of each run, in an order every rank follows."""
    todo = {}
    for name in OPTIONS:
        for impl in ("fusedopt", "torch"):
            todo[f"zero/{impl}/{name}"] = lambda i=impl, n=name: zero(i, n, folder)
            todo[f"fsdp/{impl}/{name}"] = lambda i=impl, n=name: fsdp(i, n, folder)
            todo[f"fsdp-offload/{impl}/{name}"] = \
                lambda i=impl, n=name: fsdp(i, n, folder, offload=True)
        todo[f"zero-checkpoint/fusedopt/{name}"] = \
            lambda n=name: zero("fusedopt", n, folder, checkpoint=True)
    for impl in ("fusedopt", "torch"):
        todo[f"zero-bucket-view/{impl}/AdamW"] = \
            lambda i=impl: zero(i, "AdamW", folder, bucket_view=True)
    for name in CHECKPOINTED:
        todo[f"fsdp-checkpoint/fusedopt/{name}"] = \
            lambda n=name: fsdp("fusedopt", n, folder, checkpoint=True)
    # a checkpoint of fusedopt's state continues in torch.optim, and the other way round
    todo["fsdp-checkpoint/fusedopt-to-torch/AdamW"] = \
        lambda: fsdp("fusedopt", "AdamW", folder, checkpoint=True, resume_impl="torch")
    todo["fsdp-checkpoint/torch-to-fusedopt/Adagrad"] = \
        lambda: fsdp("torch", "Adagrad", folder, checkpoint=True, resume_impl="fusedopt")
    todo["fsdp-offload-checkpoint/fusedopt/AdamW"] = \
        lambda: fsdp("fusedopt", "AdamW", folder, offload=True, checkpoint=True)
    for placement in ("shard", "replicate"):
        for impl in ("fusedopt", "torch"):
            for name in ("AdamW", "Adagrad"):
                todo[f"dtensor-{placement}/{impl}/{name}"] = \
                    lambda i=impl, n=name, pl=placement: dtensor(i, n, pl)
    for placement in ("shard", "replicate"):
        todo[f"dtensor-ema-{placement}"] = lambda pl=placement: dtensor_ema(pl)
        todo[f"dtensor-{placement}/fusedopt/Lion"] = \
            lambda pl=placement: dtensor("fusedopt", "Lion", pl)
    todo["dtensor-partial-grad"] = partial_grad
    todo["dtensor-8bit"] = dtensor_8bit
    todo["dtensor-trust-ratio"] = trust_ratio_on_shards
    return todo


def main():
    folder = sys.argv[1]
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=os.environ["FUSEDOPT_TEST_RENDEZVOUS"],
                            rank=int(os.environ["RANK"]),
                            world_size=int(os.environ["WORLD_SIZE"]))
    only = sys.argv[2].split(",") if len(sys.argv) > 2 else None
    results = {}
    for key, run in runs(folder).items():
        if only and not any(key.startswith(o) for o in only):
            continue
        try:
            results[key] = run()
        except Exception:  # noqa: BLE001 - the test that reads this run reports it
            results[key] = {"error": traceback.format_exc()}
    torch.save(results, os.path.join(folder, f"rank{dist.get_rank()}.pt"))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
