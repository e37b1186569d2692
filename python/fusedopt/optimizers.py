"""The classic optimizers, with torch.optim's names, defaults, options and state names.

Plain gradient descent and mini-batch SGD are `SGD` with momentum 0 (the batch is
whatever the caller's gradient was computed on).
"""

from __future__ import annotations

from . import functional as F
from .optimizer import Optimizer, check, check_number


class SGD(Optimizer):
    has_step = False

    def __init__(self, params, lr=1e-3, momentum=0.0, dampening=0.0, weight_decay=0.0,
                 nesterov=False, *, maximize=False, precision=None):
        super().__init__(params, dict(lr=lr, momentum=momentum, dampening=dampening,
                                      weight_decay=weight_decay, nesterov=nesterov,
                                      maximize=maximize), precision)

    def _validate_group(self, g):
        check_number("learning rate", g["lr"], 0.0)
        check_number("momentum value", g["momentum"], 0.0)
        check_number("dampening value", g["dampening"])
        check_number("weight_decay value", g["weight_decay"], 0.0)
        check(not g["nesterov"] or (g["momentum"] > 0 and g["dampening"] == 0),
              "Nesterov momentum requires a momentum and zero dampening")

    def _state_names(self, group):
        return ["momentum_buffer"] if group["momentum"] != 0 else []

    def _plan(self, g, params, grads, states, step, fresh, precision):
        return F.sgd_(params, grads, *states, lr=g["lr"], momentum=g["momentum"],
                      dampening=g["dampening"], weight_decay=g["weight_decay"],
                      nesterov=g["nesterov"], maximize=g["maximize"], first_step=fresh,
                      _defer=True, **precision)


class Adagrad(Optimizer):
    def __init__(self, params, lr=1e-2, lr_decay=0.0, weight_decay=0.0,
                 initial_accumulator_value=0.0, eps=1e-10, *, maximize=False, precision=None):
        super().__init__(params, dict(lr=lr, lr_decay=lr_decay, weight_decay=weight_decay,
                                      initial_accumulator_value=initial_accumulator_value,
                                      eps=eps, maximize=maximize), precision)
        # torch creates Adagrad's state at construction, the sums filled with the initial value
        for idx, (p, group) in enumerate((p, g) for g in self.param_groups for p in g["params"]):
            self.state[idx] = self._new_state(p, group)

    def _new_state(self, param, group):
        state = super()._new_state(param, group)
        state["sum"][...] = group["initial_accumulator_value"]
        return state

    def _validate_group(self, g):
        check_number("learning rate", g["lr"], 0.0)
        check_number("lr_decay value", g["lr_decay"], 0.0)
        check_number("weight_decay value", g["weight_decay"], 0.0)
        check_number("initial_accumulator_value", g["initial_accumulator_value"], 0.0)
        check_number("epsilon value", g["eps"], 0.0)

    def _state_names(self, group):
        return ["sum"]

    def _plan(self, g, params, grads, states, step, fresh, precision):
        return F.adagrad_(params, grads, *states, step=step, lr=g["lr"], lr_decay=g["lr_decay"],
                          weight_decay=g["weight_decay"], eps=g["eps"], maximize=g["maximize"],
                          _defer=True, **precision)


class RMSprop(Optimizer):
    def __init__(self, params, lr=1e-2, alpha=0.99, eps=1e-8, weight_decay=0.0, momentum=0.0,
                 centered=False, *, maximize=False, precision=None):
        super().__init__(params, dict(lr=lr, alpha=alpha, eps=eps, weight_decay=weight_decay,
                                      momentum=momentum, centered=centered, maximize=maximize),
                         precision)

    def _validate_group(self, g):
        check_number("learning rate", g["lr"], 0.0)
        check_number("epsilon value", g["eps"], 0.0)
        check_number("momentum value", g["momentum"], 0.0)
        check_number("weight_decay value", g["weight_decay"], 0.0)
        check_number("alpha value", g["alpha"], 0.0)

    def _state_names(self, group):
        names = ["square_avg"]
        if group["momentum"] > 0:
            names.append("momentum_buffer")
        if group["centered"]:
            names.append("grad_avg")
        return names

    def _plan(self, g, params, grads, states, step, fresh, precision):
        names = self._state_names(g)
        by_name = dict(zip(names, states))
        return F.rmsprop_(params, grads, by_name["square_avg"], by_name.get("momentum_buffer"),
                          by_name.get("grad_avg"), lr=g["lr"], alpha=g["alpha"], eps=g["eps"],
                          weight_decay=g["weight_decay"], momentum=g["momentum"],
                          centered=g["centered"], maximize=g["maximize"], _defer=True, **precision)


class Adadelta(Optimizer):
    def __init__(self, params, lr=1.0, rho=0.9, eps=1e-6, weight_decay=0.0, *, maximize=False,
                 precision=None):
        super().__init__(params, dict(lr=lr, rho=rho, eps=eps, weight_decay=weight_decay,
                                      maximize=maximize), precision)

    def _validate_group(self, g):
        check_number("learning rate", g["lr"], 0.0)
        check_number("rho value", g["rho"], 0.0, 1.0)
        check_number("epsilon value", g["eps"], 0.0)
        check_number("weight_decay value", g["weight_decay"], 0.0)

    def _state_names(self, group):
        return ["square_avg", "acc_delta"]

    def _plan(self, g, params, grads, states, step, fresh, precision):
        return F.adadelta_(params, grads, *states, lr=g["lr"], rho=g["rho"], eps=g["eps"],
                           weight_decay=g["weight_decay"], maximize=g["maximize"], _defer=True, **precision)


class Adam(Optimizer):
    decoupled = False

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                 amsgrad=False, *, maximize=False, precision=None):
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps,
                                      weight_decay=weight_decay, amsgrad=amsgrad,
                                      maximize=maximize), precision)

    def _validate_group(self, g):
        check_number("learning rate", g["lr"], 0.0)
        check_number("epsilon value", g["eps"], 0.0)
        betas = g["betas"]
        check(len(betas) == 2, f"Invalid betas: {betas!r}")
        check_number("beta parameter at index 0", betas[0], 0.0, 1.0, high_open=True)
        check_number("beta parameter at index 1", betas[1], 0.0, 1.0, high_open=True)
        check_number("weight_decay value", g["weight_decay"], 0.0)

    def _state_names(self, group):
        names = ["exp_avg", "exp_avg_sq"]
        if group["amsgrad"]:
            names.append("max_exp_avg_sq")
        return names

    def _plan(self, g, params, grads, states, step, fresh, precision):
        beta1, beta2 = g["betas"]
        return F.adam_(params, grads, *states, step=step, lr=g["lr"], beta1=beta1, beta2=beta2,
                       eps=g["eps"], weight_decay=g["weight_decay"], amsgrad=g["amsgrad"],
                       maximize=g["maximize"], decoupled_weight_decay=self.decoupled,
                       _op="adamw_" if self.decoupled else "adam_", _defer=True, **precision)


class AdamW(Adam):
    decoupled = True

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2,
                 amsgrad=False, *, maximize=False, precision=None):
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                         amsgrad=amsgrad, maximize=maximize, precision=precision)
