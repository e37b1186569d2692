"""Lion (Chen et al. 2023): the sign of an interpolated momentum, one state buffer."""

from __future__ import annotations

from ._spec import REQUIRED, Option, Spec, State, check_betas, check_number, number
from .classic import MAXIMIZE, check_lr, lr_option


class Lion(Spec):
    name, title = "lion", "Lion"
    summary = ("Lion (Chen et al., 2023, \"Symbolic Discovery of Optimization Algorithms\"): "
               "steps of the sign of an interpolated momentum, with decoupled weight decay.")
    math = r"""
    :math:`c = \beta_1 m + (1 - \beta_1) g`;
    :math:`p \leftarrow p - \eta\,(\mathrm{sign}(c) + \lambda p)`;
    :math:`m \leftarrow \beta_2 m + (1 - \beta_2) g`. :math:`\mathrm{sign}(0) = 0`. One
    state buffer: 20 bytes per float32 element and step."""
    options = (
        lr_option(1e-4),
        Option("betas", (0.9, 0.99), "Interpolation :math:`\\beta_1` of the update and "
               "decay rate :math:`\\beta_2` of the momentum.", "tuple[float, float]"),
        Option("weight_decay", 0.0, "Decoupled weight decay :math:`\\lambda`: "
               ":math:`p \\leftarrow p - \\eta\\lambda p`."),
        MAXIMIZE,
    )
    op_keywords = (
        Option("lr", REQUIRED, "Learning rate."),
        Option("beta1", REQUIRED, "Interpolation of the update."),
        Option("beta2", REQUIRED, "Decay rate of the momentum."),
        Option("weight_decay", 0.0, "Decoupled weight decay."),
        MAXIMIZE,
    )
    states = (State("exp_avg", "exp_avgs", "The momentum :math:`m`."),)
    scalars = ()
    quantizable = ("exp_avg",)  # 8-bit momentum, as bitsandbytes' Lion8bit
    example = "lr=1e-4, weight_decay=1e-2"
    bench = {"lion": dict(lr=1e-4, weight_decay=1e-2)}

    def validate(self, g):
        check_lr(g)
        check_betas(g["betas"])
        check_number("weight_decay value", g["weight_decay"], 0.0)

    def to_op(self, g):
        beta1, beta2 = g["betas"]
        return dict(lr=number(g["lr"]), beta1=number(beta1), beta2=number(beta2),
                    weight_decay=number(g["weight_decay"]), maximize=g["maximize"])

    def hyper(self, kw):
        return dict(lr=kw["lr"], beta1=kw["beta1"], beta2=kw["beta2"],
                    weight_decay=kw["weight_decay"], maximize=kw["maximize"])


SPECS = (Lion(),)
