"""The algorithms of the step benchmark, each with one fixed set of hyperparameters.

For every algorithm this module says how many state buffers it keeps, what
torch.optim and fusedopt call them, and how to run one step four ways: the
fusedopt functional op, the float64 reference, NumPy written by hand, and the
arguments of the optimizer classes (torch.optim's and fusedopt's take the same).

State lists are always in the functional op's order, and `t` is the step count
after the update (1 on the first step), as the functional ops take it.
"""

from __future__ import annotations

import math

import numpy as np

from fusedopt import functional as F
from fusedopt import reference as R


class Algo:
    name = ""
    states = ()  # state names of the classes (torch.optim's), in the functional op's order
    cls = ""  # class name in torch.optim and in fusedopt
    kwargs = {}  # class arguments; the functional and hand-written steps use the same values
    op = ""  # fusedopt functional op

    @property
    def nstates(self):
        return len(self.states)

    def functional(self, params, grads, states, t):
        raise NotImplementedError

    def reference(self, params, grads, states, t):
        """New float64 arrays (params, *states) after one step."""
        raise NotImplementedError

    def numpy(self, params, grads, states, t):
        """The step as a user would write it: NumPy expressions, one tensor at a time."""
        raise NotImplementedError


class Sgd(Algo):
    name, states, cls, op = "sgd", (), "SGD", "sgd_"
    kwargs = dict(lr=0.01)

    def functional(self, params, grads, states, t):
        F.sgd_(params, grads, **self.kwargs)

    def reference(self, params, grads, states, t):
        return R.sgd(params, grads, **self.kwargs)

    def numpy(self, params, grads, states, t):
        lr = self.kwargs["lr"]
        for p, g in zip(params, grads):
            p -= lr * g


class SgdMomentum(Algo):
    name, states, cls, op = "sgd_momentum", ("momentum_buffer",), "SGD", "sgd_"
    kwargs = dict(lr=0.01, momentum=0.9)

    def functional(self, params, grads, states, t):
        F.sgd_(params, grads, states[0], first_step=t == 1, **self.kwargs)

    def reference(self, params, grads, states, t):
        return R.sgd(params, grads, states[0], first_step=t == 1, **self.kwargs)

    def numpy(self, params, grads, states, t):
        lr, mu = self.kwargs["lr"], self.kwargs["momentum"]
        for p, g, b in zip(params, grads, states[0]):
            if t == 1:
                b[...] = g
            else:
                b *= mu
                b += g
            p -= lr * b


class Adagrad(Algo):
    name, states, cls, op = "adagrad", ("sum",), "Adagrad", "adagrad_"
    kwargs = dict(lr=0.01, eps=1e-10)

    def functional(self, params, grads, states, t):
        F.adagrad_(params, grads, states[0], step=t, **self.kwargs)

    def reference(self, params, grads, states, t):
        return R.adagrad(params, grads, states[0], step=t, **self.kwargs)

    def numpy(self, params, grads, states, t):
        lr, eps = self.kwargs["lr"], self.kwargs["eps"]
        for p, g, s in zip(params, grads, states[0]):
            s += g * g
            p -= lr * g / (np.sqrt(s) + eps)


class Rmsprop(Algo):
    name, states, cls, op = "rmsprop", ("square_avg",), "RMSprop", "rmsprop_"
    kwargs = dict(lr=0.01, alpha=0.99, eps=1e-8)

    def functional(self, params, grads, states, t):
        F.rmsprop_(params, grads, states[0], **self.kwargs)

    def reference(self, params, grads, states, t):
        return R.rmsprop(params, grads, states[0], **self.kwargs)

    def numpy(self, params, grads, states, t):
        lr, alpha, eps = self.kwargs["lr"], self.kwargs["alpha"], self.kwargs["eps"]
        for p, g, v in zip(params, grads, states[0]):
            v *= alpha
            v += (1 - alpha) * g * g
            p -= lr * g / (np.sqrt(v) + eps)


class Adadelta(Algo):
    name, states, cls, op = "adadelta", ("square_avg", "acc_delta"), "Adadelta", "adadelta_"
    kwargs = dict(lr=1.0, rho=0.9, eps=1e-6)

    def functional(self, params, grads, states, t):
        F.adadelta_(params, grads, states[0], states[1], **self.kwargs)

    def reference(self, params, grads, states, t):
        return R.adadelta(params, grads, states[0], states[1], **self.kwargs)

    def numpy(self, params, grads, states, t):
        lr, rho, eps = self.kwargs["lr"], self.kwargs["rho"], self.kwargs["eps"]
        for p, g, v, u in zip(params, grads, states[0], states[1]):
            v *= rho
            v += (1 - rho) * g * g
            delta = np.sqrt(u + eps) / np.sqrt(v + eps) * g
            u *= rho
            u += (1 - rho) * delta * delta
            p -= lr * delta


class Adam(Algo):
    name, states, cls, op = "adam", ("exp_avg", "exp_avg_sq"), "Adam", "adam_"
    kwargs = dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    decoupled = False

    def _flat(self):
        k = dict(self.kwargs)
        k["beta1"], k["beta2"] = k.pop("betas")
        return k

    def functional(self, params, grads, states, t):
        F.adam_(params, grads, states[0], states[1], step=t, decoupled_weight_decay=self.decoupled,
                **self._flat())

    def reference(self, params, grads, states, t):
        return R.adam(params, grads, states[0], states[1], step=t,
                      decoupled_weight_decay=self.decoupled, **self._flat())

    def numpy(self, params, grads, states, t):
        k = self._flat()
        lr, b1, b2, eps, wd = k["lr"], k["beta1"], k["beta2"], k["eps"], k["weight_decay"]
        step_size = lr / (1 - b1**t)
        bc2_sqrt = math.sqrt(1 - b2**t)
        for p, g, m, v in zip(params, grads, states[0], states[1]):
            if self.decoupled:
                p *= 1 - lr * wd
            elif wd:
                g = g + wd * p
            m *= b1
            m += (1 - b1) * g
            v *= b2
            v += (1 - b2) * g * g
            p -= step_size * m / (np.sqrt(v) / bc2_sqrt + eps)


class AdamW(Adam):
    name, cls, op = "adamw", "AdamW", "adamw_"
    kwargs = dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2)
    decoupled = True


ALGOS = {a.name: a for a in (Sgd(), SgdMomentum(), Adagrad(), Rmsprop(), Adadelta(), Adam(),
                             AdamW())}
