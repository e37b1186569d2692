"""fusedopt.torch's classes of the algorithms torch.optim does not have (Lion, LAMB,
LARS), against fusedopt's NumPy classes, which the case table checks against the
float64 references: the same kernels on the same float64 values, so the params and
every state buffer agree bit for bit over a training run. State dicts go through
torch.save and resume exactly; the torch step counter is torch's 0-d tensor.
"""

from __future__ import annotations

import io

import numpy as np
import pytest

import fusedopt
from cases import CASES, assert_same_bits, in_torch

torch = pytest.importorskip("torch")
fot = pytest.importorskip("fusedopt.torch")

BEYOND = [c for c in CASES if not in_torch(c) and c.algo.spec.mode_state is None]


def make_data():
    g = torch.Generator().manual_seed(7)
    return (torch.randn(32, 6, generator=g, dtype=torch.float64),
            torch.randn(32, 2, generator=g, dtype=torch.float64))


def make_model():
    torch.manual_seed(3)
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(),
                               torch.nn.Linear(8, 2)).to(torch.float64)


def step_both(model, topt, params, opt, data):
    topt.zero_grad()
    x, y = data
    ((model(x) - y) ** 2).mean().backward()
    grads = [p.grad.numpy().copy() for p in model.parameters()]
    topt.step()
    opt.step(grads)


def assert_same(model, topt, params, opt, what):
    for i, (tp, p) in enumerate(zip(model.parameters(), params)):
        assert_same_bits(tp.detach().numpy(), p, f"{what}: param {i}")
        for name, value in opt.state[i].items():
            mine = topt.state[tp][name]
            if name == "step":
                assert isinstance(mine, torch.Tensor) and mine.dim() == 0
                assert float(mine) == value
            else:
                assert_same_bits(mine.numpy(), value, f"{what}: {name} of param {i}")


@pytest.mark.parametrize("c", BEYOND, ids=str)
def test_torch_class_equals_numpy_class(c):
    data = make_data()
    model = make_model()
    params = [p.detach().numpy().copy() for p in model.parameters()]
    groups = [{"params": list(model[0].parameters())},
              {"params": list(model[2].parameters()), "lr": c.options["lr"] / 2}]
    topt = getattr(fot, c.algo.cls.__name__)(groups, **c.options)
    opt = c.make([{"params": params[:2]}, {"params": params[2:], "lr": c.options["lr"] / 2}])
    start = [p.copy() for p in params]
    for _ in range(30):
        step_both(model, topt, params, opt, data)
    assert_same(model, topt, params, opt, str(c))
    assert max(np.abs(p - s).max() for p, s in zip(params, start)) > 1e-4


@pytest.mark.parametrize("c", BEYOND, ids=str)
def test_torch_state_dict_resumes_exactly(c):
    """10 steps, torch.save of the state dict, a new optimizer over a copy of the model
    loads it, 10 more steps on both: bit for bit the same."""
    data = make_data()
    model = make_model()
    topt = getattr(fot, c.algo.cls.__name__)(model.parameters(), **c.options)
    params = [p.detach().numpy().copy() for p in model.parameters()]
    opt = c.make(params)
    for _ in range(10):
        step_both(model, topt, params, opt, data)
    buf = io.BytesIO()
    torch.save(topt.state_dict(), buf)
    buf.seek(0)
    other = make_model()
    other.load_state_dict(model.state_dict())
    resumed = getattr(fot, c.algo.cls.__name__)(other.parameters(), **{**c.options, "lr": 0.5})
    resumed.load_state_dict(torch.load(buf))
    assert resumed.param_groups[0]["lr"] == c.options["lr"]
    for _ in range(10):
        step_both(model, topt, params, opt, data)
        resumed.zero_grad()
        x, y = data
        ((other(x) - y) ** 2).mean().backward()
        resumed.step()
    assert_same(model, topt, params, opt, f"{c} uninterrupted")
    assert_same(other, resumed, params, opt, f"{c} resumed")


def test_signatures_are_the_specs():
    """The constructors take the arguments the issue of each algorithm gives, in order
    (and fusedopt.torch's keyword-only `flat`, `optim_bits`, `min_8bit_size` and
    `ema_decay`)."""
    import inspect

    def names(cls):
        return [(p.name, p.default) for p in inspect.signature(cls.__init__).parameters.values()]

    empty = inspect.Parameter.empty
    tail = [("flat", False), ("optim_bits", 32), ("min_8bit_size", 4096), ("ema_decay", None)]
    assert names(fot.Lion) == [("self", empty), ("params", empty), ("lr", 1e-4),
                               ("betas", (0.9, 0.99)), ("weight_decay", 0.0),
                               ("maximize", False), *tail]
    assert names(fot.LAMB) == [("self", empty), ("params", empty), ("lr", 1e-3),
                               ("betas", (0.9, 0.999)), ("eps", 1e-6), ("weight_decay", 0.0),
                               *tail]
    assert names(fot.LARS) == [("self", empty), ("params", empty), ("lr", empty),
                               ("momentum", 0.9), ("weight_decay", 0.0),
                               ("trust_coefficient", 0.001), ("eps", 0.0),
                               ("nesterov", False), *tail]
    assert names(fot.AdamWScheduleFree) == [
        ("self", empty), ("params", empty), ("lr", 0.0025), ("betas", (0.9, 0.999)),
        ("eps", 1e-8), ("weight_decay", 0.0), ("warmup_steps", 0), ("r", 0.0),
        ("weight_lr_power", 2.0), ("foreach", True), *tail]
    assert "foreach" not in inspect.signature(fusedopt.AdamWScheduleFree.__init__).parameters
