"""Layer-wise trust ratios: LAMB and LARS, with optax's equations.

Both scale each tensor's update by a ratio of norms, ``|p| / |u|``, so their kernels
run two passes over a call (csrc/core/two_pass.h): the first sums ``p**2`` and
``u**2`` per tensor, deterministically (fixed blocks added in a fixed order: the same
bits for every thread count and instruction set), the second updates each tensor with
its own ratio. On a GPU the second pass reads the sums from device memory.
"""

from __future__ import annotations

from ._spec import REQUIRED, Option, Spec, State, check_betas, check_number, number
from .classic import OP_STEP, check_lr, lr_option

TRUST_RATIO = (r"the ratio is 1 where either norm is 0; the norms are taken per tensor, "
               r"in a first pass over the call")


class Lamb(Spec):
    name, title = "lamb", "LAMB"
    summary = ("LAMB (You et al., 2020, \"Large Batch Optimization for Deep Learning\"), with "
               "optax.lamb's equations: Adam's direction scaled per tensor by a trust ratio.")
    math = r"""
    :math:`m \leftarrow \beta_1 m + (1 - \beta_1) g`;
    :math:`v \leftarrow \beta_2 v + (1 - \beta_2) g^2`;
    :math:`u = \frac{m / (1 - \beta_1^t)}{\sqrt{v / (1 - \beta_2^t)} + \epsilon} + \lambda p`;
    :math:`p \leftarrow p - \eta\, \frac{\|p\|}{\|u\|}\, u`, """ + TRUST_RATIO + "."
    options = (
        lr_option(1e-3),
        Option("betas", (0.9, 0.999), "Decay rates :math:`(\\beta_1, \\beta_2)` of the "
               "moment estimates.", "tuple[float, float]"),
        Option("eps", 1e-6, "Added to the denominator."),
        Option("weight_decay", 0.0, "Weight decay :math:`\\lambda`, added to the direction "
               "before the trust ratio."),
    )
    op_keywords = (
        OP_STEP,
        Option("lr", REQUIRED, "Learning rate."),
        Option("beta1", REQUIRED, "Decay rate of the first moment."),
        Option("beta2", REQUIRED, "Decay rate of the second moment."),
        Option("eps", REQUIRED, "Added to the denominator."),
        Option("weight_decay", 0.0, "Weight decay, added to the direction."),
    )
    states = (
        State("exp_avg", "exp_avgs", "First moment estimate."),
        State("exp_avg_sq", "exp_avg_sqs", "Second moment estimate.", positive=True),
    )
    example = "lr=1e-3, weight_decay=1e-2"
    bench = {"lamb": dict(lr=1e-3, weight_decay=1e-2)}

    def validate(self, g):
        check_lr(g)
        check_number("epsilon value", g["eps"], 0.0)
        check_betas(g["betas"])
        check_number("weight_decay value", g["weight_decay"], 0.0)

    def to_op(self, g):
        beta1, beta2 = g["betas"]
        return dict(lr=number(g["lr"]), beta1=number(beta1), beta2=number(beta2),
                    eps=number(g["eps"]), weight_decay=number(g["weight_decay"]))

    def hyper(self, kw):
        return dict(lr=kw["lr"], beta1=kw["beta1"], beta2=kw["beta2"], eps=kw["eps"],
                    weight_decay=kw["weight_decay"])


class Lars(Spec):
    name, title = "lars", "LARS"
    summary = ("LARS (You et al., 2017, \"Large Batch Training of Convolutional Networks\"), "
               "with optax.lars's equations: the gradient scaled per tensor by a trust "
               "ratio, then momentum.")
    math = r"""
    :math:`u = g + \lambda p`;
    :math:`u \leftarrow -\eta\, \frac{\tau \|p\|}{\|u\| + \epsilon}\, u` (trust coefficient
    :math:`\tau`; """ + TRUST_RATIO + r"""); :math:`b \leftarrow u + \mu b`;
    :math:`p \leftarrow p + b`, or with Nesterov momentum :math:`p \leftarrow p + u + \mu b`.
    Without momentum (:math:`\mu = 0`) no buffer is kept and :math:`p \leftarrow p + u`."""
    options = (
        Option("lr", REQUIRED, "Learning rate."),
        Option("momentum", 0.9, "Momentum factor :math:`\\mu`."),
        Option("weight_decay", 0.0, "Weight decay :math:`\\lambda`, added to the gradient "
               "before the trust ratio."),
        Option("trust_coefficient", 0.001, "Trust coefficient :math:`\\tau`."),
        Option("eps", 0.0, "Added to the norm of the update in the trust ratio."),
        Option("nesterov", False, "Nesterov momentum.", "bool"),
    )
    op_keywords = (
        Option("lr", REQUIRED, "Learning rate."),
        Option("momentum", 0.9, "Momentum factor."),
        Option("weight_decay", 0.0, "Weight decay, added to the gradient."),
        Option("trust_coefficient", 0.001, "Trust coefficient."),
        Option("eps", 0.0, "Added to the norm of the update."),
        Option("nesterov", False, "Nesterov momentum.", "bool"),
    )
    states = (State("momentum_buffer", "momentum_buffers", "The momentum trace (with a "
                    "momentum).", optional=True),)
    scalars = ()
    example = "lr=0.1, momentum=0.9"
    bench = {"lars": dict(lr=0.1, weight_decay=1e-4)}

    def validate(self, g):
        check_lr(g)
        check_number("momentum value", g["momentum"], 0.0)
        check_number("weight_decay value", g["weight_decay"], 0.0)
        check_number("trust_coefficient value", g["trust_coefficient"], 0.0)
        check_number("epsilon value", g["eps"], 0.0)

    def active(self, kw):
        return ("momentum_buffer",) if kw.get("momentum", 0.0) != 0 else ()

    def kernel(self, kw):
        return "lars_momentum" if kw.get("momentum", 0.0) != 0 else "lars"

    def batch_kernel(self, kws, existing):
        # members without momentum run in the momentum kernel exactly as without it
        # (b = u + 0 b, p += b)
        if any(kw["momentum"] != 0 for kw in kws) or "momentum_buffer" in existing:
            return "lars_momentum", ("momentum_buffer",), kws
        return "lars", (), kws

    def hyper(self, kw):
        return dict(lr=kw["lr"], momentum=kw["momentum"], weight_decay=kw["weight_decay"],
                    trust_coefficient=kw["trust_coefficient"], eps=kw["eps"],
                    nesterov=kw["nesterov"])


SPECS = (Lamb(), Lars())
