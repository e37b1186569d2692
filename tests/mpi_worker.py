"""The MPI side of tests/test_mpi.py: run under `mpiexec -n 2`, it trains with
fusedopt.mpi.ZeroRedundancyOptimizer and writes what each rank saw to
OUT/rank<r>.pkl; the test compares that with one process stepping on the averaged
gradients. The case table and the gradients are defined here, for both sides.

    mpiexec -n 2 python tests/mpi_worker.py train OUT
    mpiexec -n 2 python tests/mpi_worker.py mismatch OUT
"""

from __future__ import annotations

import pickle
import sys
import time
import traceback
from dataclasses import dataclass, field

import numpy as np

import fusedopt as fo

SHAPES = [(7, 5), (5,), (), (0, 3), (5, 3), (3,)]
STEPS = 6
RESUME_AT = 3  # the state goes through state_dict / load_state_dict after this step


@dataclass
class Case:
    name: str
    cls: type
    options: dict
    dtypes: tuple = (np.float64,)  # one per param group
    packed: bool = True  # params and grads as packed views of one buffer (flat_arrays)
    shapes: list = field(default_factory=lambda: SHAPES)
    group_options: tuple = ({},)

    def layout(self):
        """[(group, dtype, shapes)] of the case's param groups."""
        per = -(-len(self.shapes) // len(self.dtypes))
        return [(k, dt, self.shapes[k * per:(k + 1) * per]) for k, dt in enumerate(self.dtypes)]


CASES = [
    Case("adamw", fo.AdamW, {"lr": 1e-2, "weight_decay": 0.1}),
    Case("adam-amsgrad-f32-copied", fo.Adam, {"lr": 1e-2, "amsgrad": True, "weight_decay": 0.01},
         dtypes=(np.float32,), packed=False),
    Case("sgd-nesterov-copied", fo.SGD, {"lr": 0.05, "momentum": 0.9, "nesterov": True},
         packed=False),
    Case("adagrad-f32", fo.Adagrad, {"lr": 0.1, "lr_decay": 0.01, "initial_accumulator_value": 0.1},
         dtypes=(np.float32,)),
    Case("rmsprop-centered", fo.RMSprop, {"lr": 1e-2, "centered": True, "momentum": 0.5}),
    Case("adadelta-copied", fo.Adadelta, {"lr": 1.0, "weight_decay": 0.01}, packed=False),
    Case("adam-two-groups-two-dtypes", fo.Adam, {"lr": 1e-2}, dtypes=(np.float32, np.float64),
         packed=False, group_options=({"lr": 3e-2, "weight_decay": 0.1}, {})),
    Case("sgd-one-element", fo.SGD, {"lr": 0.1, "momentum": 0.5}, shapes=[(1,)]),
    # algorithms whose per-param scalars go beyond the step count (NAdam's mu_product,
    # ASGD's eta and mu: averaging from step 3), and the other rules of the table
    Case("nadamw", fo.NAdam, {"lr": 1e-2, "weight_decay": 0.1, "decoupled_weight_decay": True}),
    Case("asgd-averaging-f32", fo.ASGD, {"lr": 0.05, "t0": 2.0, "lambd": 0.01},
         dtypes=(np.float32,), packed=False),
    Case("radam", fo.RAdam, {"lr": 1e-2, "betas": (0.8, 0.9)}),
    Case("adamax-maximize", fo.Adamax, {"lr": 1e-2, "maximize": True}, packed=False),
    Case("rprop", fo.Rprop, {"lr": 1e-2, "etas": (0.4, 1.3)}),
    Case("lion", fo.Lion, {"lr": 1e-2, "weight_decay": 0.1}),
]


def initial(case):
    """The initial params, per group: the same on every rank."""
    rng = np.random.default_rng(7)
    return [[rng.standard_normal(s).astype(dt) for s in shapes] for _, dt, shapes in case.layout()]


def grads(case, step, rank):
    """Rank `rank`'s gradients at `step`, per group."""
    rng = np.random.default_rng([step, rank, len(case.name)])
    return [[rng.standard_normal(s).astype(dt) for s in shapes] for _, dt, shapes in case.layout()]


def groups_of(case, params):
    """The constructor's params argument."""
    if len(params) == 1 and case.group_options == ({},):
        return params[0]
    return [{"params": ps, **opts} for ps, opts in zip(params, case.group_options)]


def _arrays(case, values):
    """Writeable arrays holding `values` (per group): packed views of one buffer per
    group, or separate arrays."""
    if not case.packed:
        return [[v.copy() for v in group] for group in values]
    out = []
    for group in values:
        flat = fo.flat_arrays([v.shape for v in group], group[0].dtype if group else np.float64)
        for view, v in zip(flat.views, group):
            view[...] = v
        out.append(flat.views)
    return out


def train(case, comm):
    from fusedopt.mpi import ZeroRedundancyOptimizer

    rank = comm.Get_rank()
    params = _arrays(case, initial(case))
    flat = [p for group in params for p in group]
    opt = ZeroRedundancyOptimizer(groups_of(case, params), optimizer_class=case.cls, comm=comm,
                                  **case.options)
    record = {"params": [], "state_sizes": None}
    for step in range(1, STEPS + 1):
        g = _arrays(case, grads(case, step, rank))
        opt.step([x for group in g for x in group])
        record["params"].append([p.copy() for p in flat])
        if step == RESUME_AT:
            record["state_sizes"] = {
                name: sum(int(s[name].size) for s in opt.optim.state.values())
                for name in next(iter(opt.optim.state.values()), {})
                if name not in case.cls.spec.scalars}
            record["shard_size"] = sum(int(p.size) for g in opt.optim.param_groups
                                       for p in g["params"])
            record["state_dict"] = opt.state_dict()
            # a fresh optimizer over the same params continues from the gathered state
            sd = record["state_dict"]
            opt = ZeroRedundancyOptimizer(groups_of(case, params), optimizer_class=case.cls,
                                          comm=comm, **case.options)
            opt.load_state_dict(sd if rank == 0 else None)
    record["final_state_dict"] = opt.state_dict()
    # a state dict that does not fit: every rank refuses it and keeps its state
    bad = None
    if rank == 0:
        bad = pickle.loads(pickle.dumps(record["final_state_dict"]))
        first = next(iter(bad["state"].values()), None)
        for name, value in (first or {}).items():
            if isinstance(value, np.ndarray):  # a state array, not a per-param scalar
                first[name] = np.zeros(value.size + 1, value.dtype)
                break
        else:
            bad["param_groups"].append(bad["param_groups"][0])
    try:
        opt.load_state_dict(bad)
        record["bad_load"] = None
    except ValueError as e:
        record["bad_load"] = str(e)
    record["after_bad_load"] = opt.state_dict()
    return record


def mismatch(comm):
    """Setups that differ between the ranks: each must raise on every rank, quickly."""
    from fusedopt.mpi import ZeroRedundancyOptimizer

    rank = comm.Get_rank()
    out = {}
    trials = {
        "shape": lambda: [np.zeros((3, 4)), np.zeros(5 if rank == 0 else 6)],
        "dtype": lambda: [np.zeros(4, np.float64 if rank == 0 else np.float32)],
        "count": lambda: [np.zeros(4)] * 1 + ([np.zeros(2)] if rank == 1 else []),
        "local-error": lambda: [np.zeros(4)] if rank == 0 else [np.zeros(4, np.int32)],
    }
    for name, make in trials.items():
        start = time.monotonic()
        try:
            ZeroRedundancyOptimizer(make(), optimizer_class=fo.Adam, comm=comm, lr=1e-3)
            out[name] = (None, None, time.monotonic() - start)
        except Exception as e:  # noqa: BLE001 - the test reads the kind and the message
            out[name] = (type(e).__name__, str(e), time.monotonic() - start)
    # options that differ: the shards would step with different hyperparameters
    try:
        ZeroRedundancyOptimizer([np.zeros(4)], optimizer_class=fo.Adam, comm=comm,
                                lr=1e-3 * (1 + rank))
        out["options"] = (None, None, 0.0)
    except Exception as e:  # noqa: BLE001
        out["options"] = (type(e).__name__, str(e), 0.0)
    out["cupy"] = _cupy_refused(comm)
    out["bad"] = _bad_input(comm)
    return out


def _bad_input(comm):
    """Bad input on every rank alike: (kind, message) of each, and whether the params
    kept their values."""
    from fusedopt.mpi import ZeroRedundancyOptimizer

    def attempt(make):
        try:
            make()
        except Exception as e:  # noqa: BLE001 - the test reads the kind and the message
            return type(e).__name__, str(e)
        return None, None

    out = {}
    params = [np.ones((3, 4)), np.ones(5)]
    before = [p.copy() for p in params]
    opt = ZeroRedundancyOptimizer(params, optimizer_class=fo.Adam, comm=comm, lr=0.1)
    out["grads-count"] = attempt(lambda: opt.step([np.ones((3, 4))]))
    out["grads-shape"] = attempt(lambda: opt.step([np.ones((4, 3)), np.ones(5)]))
    out["grads-dtype"] = attempt(lambda: opt.step([np.ones((3, 4), np.float32), np.ones(5)]))
    out["grads-none"] = attempt(lambda: opt.step([np.ones((3, 4)), None]))
    out["unchanged"] = all(np.array_equal(a, b) for a, b in zip(params, before))
    out["lbfgs"] = attempt(lambda: ZeroRedundancyOptimizer([np.ones(3)], optimizer_class=fo.LBFGS,
                                                           comm=comm))
    out["lamb"] = attempt(lambda: ZeroRedundancyOptimizer([np.ones(3)], optimizer_class=fo.LAMB,
                                                          comm=comm))
    out["lars"] = attempt(lambda: ZeroRedundancyOptimizer([np.ones(3)], optimizer_class=fo.LARS,
                                                          comm=comm, lr=0.1, momentum=0.0))
    out["schedulefree"] = attempt(lambda: ZeroRedundancyOptimizer(
        [np.ones(3)], optimizer_class=fo.AdamWScheduleFree, comm=comm))
    out["strided"] = attempt(lambda: ZeroRedundancyOptimizer([np.ones((4, 4))[:, ::2]],
                                                             optimizer_class=fo.SGD, comm=comm))
    out["hyperparameter"] = attempt(lambda: ZeroRedundancyOptimizer(
        [np.ones(3)], optimizer_class=fo.Adam, comm=comm, lr=-1.0))
    opt.step([np.ones((3, 4)), np.ones(5)])  # the optimizer still works after the errors
    out["stepped"] = not np.array_equal(params[0], before[0])
    return out


def _cupy_refused(comm):
    """CuPy params with an MPI that is not CUDA-aware: refused, never copied through the
    host. CuPy is not needed: a stand-in class from a module named cupy is enough to
    reach the check, and FUSEDOPT_MPI_CUDA_AWARE=0 plays the MPI without CUDA."""
    import os
    import types

    from fusedopt.mpi import ZeroRedundancyOptimizer, cuda_aware

    fake = types.ModuleType("cupy")

    class ndarray:  # noqa: N801 - the name CuPy gives its arrays
        __module__ = "cupy"
        dtype = np.dtype(np.float32)
        shape, size = (4,), 4

        class flags:  # noqa: N801
            c_contiguous = writeable = True

    fake.ndarray = ndarray
    sys.modules["cupy"] = fake
    os.environ["FUSEDOPT_MPI_CUDA_AWARE"] = "0"
    try:
        ZeroRedundancyOptimizer([ndarray()], optimizer_class=fo.Adam, comm=comm)
        refused = (None, None)
    except Exception as e:  # noqa: BLE001
        refused = (type(e).__name__, str(e))
    finally:
        del sys.modules["cupy"]
    said = {}
    for value in ("1", "0"):
        os.environ["FUSEDOPT_MPI_CUDA_AWARE"] = value
        said[value] = cuda_aware(comm)
    del os.environ["FUSEDOPT_MPI_CUDA_AWARE"]
    return refused, said, cuda_aware(comm)


def main():
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    what, folder = sys.argv[1], sys.argv[2]
    if what == "train":
        result = {}
        for case in CASES:
            try:
                result[case.name] = train(case, comm)
            except Exception:  # noqa: BLE001 - reported by the test that reads this case
                result[case.name] = {"error": traceback.format_exc()}
    else:
        result = mismatch(comm)
    with open(f"{folder}/rank{comm.Get_rank()}.pkl", "wb") as f:
        pickle.dump(result, f)


if __name__ == "__main__":
    main()
