"""The rest of torch.optim's elementwise algorithms, with torch's arguments, defaults,
messages, state names and per-param scalars.

Where torch keeps a per-param scalar besides the step count (NAdam's ``mu_product``),
the spec's `advance` carries it from step to step, computed as torch computes it (in
the dtype the front-end stores it in, see `Spec.advance`), and the kernel receives the
per-step coefficients derived from it, in double, through its Hyper.
"""

from __future__ import annotations

import math
import numbers

import numpy as np

from ._spec import (REQUIRED, Option, Spec, State, check, check_betas, check_number, number,
                    torch_flag)
from .classic import MAXIMIZE, OP_LR, OP_MAXIMIZE, OP_STEP, check_lr, lr_option, wd_option

OP_STEP_HOST = Option("step", REQUIRED, "The step count after this update (1 on the first "
                      "step).", "int")


def _in_dtype_of(stored, value):
    """``stored * value`` computed as torch computes ``tensor *= value`` for a 0-d
    tensor holding `stored`: in its dtype when `stored` is a NumPy scalar (the value
    rounded to that dtype first), in double for a Python float."""
    if isinstance(stored, np.floating):
        return stored * type(stored)(value)
    return float(stored) * value


def _check_host_step(spec, kw):
    step = kw.get("step")
    if not isinstance(step, numbers.Real):
        raise TypeError(f"{spec.op_name}: step must be a number (the per-param scalars that "
                        f"go with it are kept on the host), got {type(step).__name__}")


class Nadam(Spec):
    name, title = "nadam", "NAdam"
    summary = ("NAdam (Dozat, 2016): Adam with Nesterov momentum and a momentum schedule, "
               "with L2 or decoupled weight decay.")
    math = r"""
    Weight decay :math:`\lambda`: :math:`g \leftarrow g + \lambda p` (L2), or
    :math:`p \leftarrow p (1 - \eta\lambda)` (decoupled, NAdamW); the momentum schedule
    :math:`\mu_t = \beta_1 (1 - \tfrac12\, 0.96^{t\psi})` and its running product
    :math:`\Pi_t = \mu_1 \cdots \mu_t`;
    :math:`m \leftarrow \beta_1 m + (1 - \beta_1) g`;
    :math:`v \leftarrow \beta_2 v + (1 - \beta_2) g^2`;
    :math:`p \leftarrow p - \eta \left(\frac{(1 - \mu_t)\, g}{1 - \Pi_t} +
    \frac{\mu_{t+1}\, m}{1 - \Pi_t \mu_{t+1}}\right) / \left(\sqrt{v / (1 - \beta_2^t)}
    + \epsilon\right)`."""
    options = (
        lr_option(2e-3),
        Option("betas", (0.9, 0.999), "Decay rates :math:`(\\beta_1, \\beta_2)` of the "
               "moment estimates.", "tuple[float, float]"),
        Option("eps", 1e-8, "Added to the denominator."),
        wd_option(doc="Weight decay: L2 (``g += weight_decay * p``), or decoupled with "
                  "``decoupled_weight_decay``."),
        Option("momentum_decay", 4e-3, "Momentum decay :math:`\\psi` of the schedule "
               ":math:`\\mu_t`."),
        Option("decoupled_weight_decay", False, "Decoupled weight decay (NAdamW): "
               ":math:`p \\leftarrow p (1 - \\eta\\lambda)`.", "bool"),
        torch_flag("foreach"),
        Option("maximize", False, MAXIMIZE.doc, "bool", kw_only=True),
        torch_flag("capturable"), torch_flag("differentiable"),
    )
    op_keywords = (
        OP_STEP_HOST, OP_LR,
        Option("beta1", REQUIRED, "Decay rate of the first moment."),
        Option("beta2", REQUIRED, "Decay rate of the second moment."),
        Option("eps", REQUIRED, "Added to the denominator."),
        Option("weight_decay", 0.0, "Weight decay (L2, or decoupled)."),
        Option("momentum_decay", 4e-3, "Momentum decay of the schedule."),
        Option("mu_product", REQUIRED, "The product of the momentum coefficients "
               ":math:`\\mu_1 \\cdots \\mu_t` up to and including this step's (torch's "
               "``mu_product`` after the step); in [0, 1)."),
        OP_MAXIMIZE,
        Option("decoupled_weight_decay", False, "Decoupled weight decay (NAdamW).", "bool"),
    )
    states = (
        State("exp_avg", "exp_avgs", "First moment estimate."),
        State("exp_avg_sq", "exp_avg_sqs", "Second moment estimate.", positive=True),
    )
    scalars = ("step", "mu_product")
    scalar_docs = {"mu_product": "the product of the momentum coefficients so far."}
    bench = {"nadam": {}}
    example = "lr=2e-3"

    def validate(self, g):
        check_lr(g)
        check_number("epsilon value", g["eps"], 0.0)
        check_betas(g["betas"])
        check_number("weight_decay value", g["weight_decay"], 0.0)
        check_number("momentum_decay value", g["momentum_decay"], 0.0)

    def to_op(self, g):
        beta1, beta2 = g["betas"]
        return dict(lr=number(g["lr"]), beta1=number(beta1), beta2=number(beta2),
                    eps=number(g["eps"]), weight_decay=number(g["weight_decay"]),
                    momentum_decay=number(g["momentum_decay"]), maximize=g["maximize"],
                    decoupled_weight_decay=g["decoupled_weight_decay"])

    def init_scalars(self, group):
        return {"step": 0.0, "mu_product": 1.0}

    @staticmethod
    def _mu(kw, t):
        return kw["beta1"] * (1.0 - 0.5 * (0.96 ** (t * kw["momentum_decay"])))

    def advance(self, kw, scalars):
        step = scalars["step"] + 1.0
        product = _in_dtype_of(scalars["mu_product"], self._mu(kw, float(step)))
        return ({"step": int(step), "mu_product": float(product)},
                {"step": step, "mu_product": product})

    def check_op(self, kw):
        _check_host_step(self, kw)
        super().check_op(kw)
        product = kw.get("mu_product")
        if not (isinstance(product, numbers.Real) and 0.0 <= product < 1.0):
            raise ValueError(f"{self.op_name}: mu_product must be a number in [0, 1) (the "
                             f"product of the momentum coefficients up to this step's), got "
                             f"{product!r}")

    def hyper(self, kw):
        t, lr, wd = float(kw["step"]), kw["lr"], kw["weight_decay"]
        mu, mu_next = self._mu(kw, t), self._mu(kw, t + 1.0)
        product = float(kw["mu_product"])
        l2, shrink = (0.0, 1.0 - lr * wd) if kw["decoupled_weight_decay"] else (wd, 1.0)
        return dict(beta1=kw["beta1"], beta2=kw["beta2"], eps=kw["eps"], l2=l2, shrink=shrink,
                    maximize=kw["maximize"],
                    grad_coef=lr * (1.0 - mu) / (1.0 - product),
                    avg_coef=lr * mu_next / (1.0 - product * mu_next),
                    inv_bc2_sqrt=1.0 / math.sqrt(1.0 - kw["beta2"] ** t))


class Radam(Spec):
    name, title = "radam", "RAdam"
    summary = ("RAdam (Liu et al., 2020): Adam with the variance of its adaptive rate "
               "rectified, and SGD with momentum while that variance is intractable.")
    math = r"""
    Weight decay :math:`\lambda`: :math:`g \leftarrow g + \lambda p` (L2), or
    :math:`p \leftarrow p (1 - \eta\lambda)` (decoupled);
    :math:`m \leftarrow \beta_1 m + (1 - \beta_1) g`;
    :math:`v \leftarrow \beta_2 v + (1 - \beta_2) g^2`;
    :math:`\rho_\infty = 2 / (1 - \beta_2) - 1`,
    :math:`\rho_t = \rho_\infty - 2 t \beta_2^t / (1 - \beta_2^t)`; if
    :math:`\rho_t > 5`:
    :math:`r_t = \sqrt{\frac{(\rho_t - 4)(\rho_t - 2)\rho_\infty}
    {(\rho_\infty - 4)(\rho_\infty - 2)\rho_t}}` and
    :math:`p \leftarrow p - \frac{\eta\, r_t \sqrt{1 - \beta_2^t}}{1 - \beta_1^t}\,
    m / (\sqrt{v} + \epsilon)`; else :math:`p \leftarrow p - \frac{\eta}{1 - \beta_1^t}
    m`. The switch is decided per step, in double, as torch decides it."""
    options = (
        lr_option(1e-3),
        Option("betas", (0.9, 0.999), "Decay rates :math:`(\\beta_1, \\beta_2)` of the "
               "moment estimates.", "tuple[float, float]"),
        Option("eps", 1e-8, "Added to the denominator."),
        wd_option(doc="Weight decay: L2 (``g += weight_decay * p``), or decoupled with "
                  "``decoupled_weight_decay``."),
        Option("decoupled_weight_decay", False, "Decoupled weight decay (AdamW's): "
               ":math:`p \\leftarrow p (1 - \\eta\\lambda)`.", "bool"),
        torch_flag("foreach"),
        Option("maximize", False, MAXIMIZE.doc, "bool", kw_only=True),
        torch_flag("capturable"), torch_flag("differentiable"),
    )
    op_keywords = (
        OP_STEP, OP_LR,
        Option("beta1", REQUIRED, "Decay rate of the first moment."),
        Option("beta2", REQUIRED, "Decay rate of the second moment."),
        Option("eps", REQUIRED, "Added to the denominator."),
        Option("weight_decay", 0.0, "Weight decay (L2, or decoupled)."),
        OP_MAXIMIZE,
        Option("decoupled_weight_decay", False, "Decoupled weight decay.", "bool"),
    )
    states = (
        State("exp_avg", "exp_avgs", "First moment estimate."),
        State("exp_avg_sq", "exp_avg_sqs", "Second moment estimate.", positive=True),
    )
    bench = {"radam": {}}
    example = "lr=1e-3"

    def validate(self, g):
        check_lr(g)
        check_number("epsilon value", g["eps"], 0.0)
        check_betas(g["betas"])
        check_number("weight_decay value", g["weight_decay"], 0.0)

    def to_op(self, g):
        beta1, beta2 = g["betas"]
        return dict(lr=number(g["lr"]), beta1=number(beta1), beta2=number(beta2),
                    eps=number(g["eps"]), weight_decay=number(g["weight_decay"]),
                    maximize=g["maximize"], decoupled_weight_decay=g["decoupled_weight_decay"])

    def hyper(self, kw):
        lr, wd = kw["lr"], kw["weight_decay"]
        l2, shrink = (0.0, 1.0 - lr * wd) if kw["decoupled_weight_decay"] else (wd, 1.0)
        return dict(lr=lr, beta1=kw["beta1"], beta2=kw["beta2"], eps=kw["eps"], l2=l2,
                    shrink=shrink, maximize=kw["maximize"])


class Adamax(Spec):
    name, title = "adamax", "Adamax"
    summary = "Adamax (Kingma and Ba, 2015): Adam with the infinity norm of the gradients."
    math = r"""
    :math:`g \leftarrow g + \lambda p`; :math:`m \leftarrow \beta_1 m + (1 - \beta_1) g`;
    :math:`u \leftarrow \max(\beta_2 u, |g| + \epsilon)`;
    :math:`p \leftarrow p - \frac{\eta}{1 - \beta_1^t}\, m / u`."""
    options = (
        lr_option(2e-3),
        Option("betas", (0.9, 0.999), "Decay rates :math:`(\\beta_1, \\beta_2)` of the "
               "first moment and of the infinity norm.", "tuple[float, float]"),
        Option("eps", 1e-8, "Added to the gradients' magnitudes in the infinity norm."),
        wd_option(),
        torch_flag("foreach", kw_only=False),
        Option("maximize", False, MAXIMIZE.doc, "bool", kw_only=True),
        torch_flag("differentiable"), torch_flag("capturable"),
    )
    op_keywords = (
        OP_STEP, OP_LR,
        Option("beta1", REQUIRED, "Decay rate of the first moment."),
        Option("beta2", REQUIRED, "Decay rate of the infinity norm."),
        Option("eps", REQUIRED, "Added to the gradients' magnitudes."),
        Option("weight_decay", 0.0, "L2 penalty."),
        OP_MAXIMIZE,
    )
    states = (
        State("exp_avg", "exp_avgs", "First moment estimate."),
        State("exp_inf", "exp_infs", "Exponentially weighted infinity norm.", positive=True),
    )
    bench = {"adamax": {}}
    example = "lr=2e-3"

    def validate(self, g):
        check_lr(g)
        check_number("epsilon value", g["eps"], 0.0)
        check_betas(g["betas"])
        check_number("weight_decay value", g["weight_decay"], 0.0)

    def to_op(self, g):
        beta1, beta2 = g["betas"]
        return dict(lr=number(g["lr"]), beta1=number(beta1), beta2=number(beta2),
                    eps=number(g["eps"]), weight_decay=number(g["weight_decay"]),
                    maximize=g["maximize"])

    def hyper(self, kw):
        return dict(lr=kw["lr"], beta1=kw["beta1"], beta2=kw["beta2"], eps=kw["eps"],
                    weight_decay=kw["weight_decay"], maximize=kw["maximize"])


class Asgd(Spec):
    name, title = "asgd", "ASGD"
    summary = ("Averaged SGD (Polyak and Juditsky, 1992) with torch's decaying rate: the "
               "running average of the iterates is kept in the state.")
    math = r"""
    With this step's rate :math:`\eta_t` and averaging coefficient :math:`\mu_t`:
    :math:`g \leftarrow g + \lambda_2 p` (weight decay);
    :math:`p \leftarrow p (1 - \lambda \eta_t) - \eta_t g`;
    :math:`a \leftarrow a + \mu_t (p - a)`, or :math:`a \leftarrow p` while
    :math:`\mu_t = 1`. They start at :math:`\eta_1 = \eta` (lr), :math:`\mu_1 = 1`, and
    after step :math:`t`: :math:`\eta_{t+1} = \eta / (1 + \lambda \eta t)^\alpha`,
    :math:`\mu_{t+1} = 1 / \max(1, t - t_0)`."""
    options = (
        lr_option(1e-2),
        Option("lambd", 1e-4, "Decay term :math:`\\lambda` (of the rate and of the "
               "params)."),
        Option("alpha", 0.75, "Power :math:`\\alpha` of the rate's decay."),
        Option("t0", 1e6, "Step from which the iterates are averaged."),
        wd_option(),
        torch_flag("foreach", kw_only=False),
        Option("maximize", False, MAXIMIZE.doc, "bool"),
        torch_flag("differentiable", kw_only=False), torch_flag("capturable", kw_only=False),
    )
    op_keywords = (
        OP_STEP_HOST,
        Option("lr", REQUIRED, "Learning rate :math:`\\eta`, from which the rate decays "
               "(and the scale of the L1 proximal step with ``l1``)."),
        Option("lambd", 1e-4, "Decay term."),
        Option("alpha", 0.75, "Power of the rate's decay."),
        Option("t0", 1e6, "Step from which the iterates are averaged."),
        Option("weight_decay", 0.0, "L2 penalty."),
        OP_MAXIMIZE,
        Option("eta", None, "This step's rate (torch's ``eta`` before the step); None: "
               "computed in double from step, lr, lambd and alpha.", "float | None"),
        Option("mu", None, "This step's averaging coefficient (torch's ``mu`` before the "
               "step); None: computed in double from step and t0.", "float | None"),
    )
    states = (State("ax", "axs", "Running average of the params."),)
    scalars = ("step", "eta", "mu")
    scalar_docs = {"eta": "the rate of the next step.",
                   "mu": "the averaging coefficient of the next step."}
    bench = {"asgd": {}}
    example = "lr=0.01"

    def validate(self, g):
        check_lr(g)
        check_number("weight_decay value", g["weight_decay"], 0.0)

    def init_scalars(self, group):
        return {"step": 0.0, "eta": number(group["lr"]), "mu": 1.0}

    @staticmethod
    def _eta(kw, t):
        """The rate after step t (torch's formula)."""
        lr = kw["lr"]
        return lr / ((1 + kw["lambd"] * lr * t) ** kw["alpha"])

    @staticmethod
    def _mu(kw, t):
        """The averaging coefficient after step t (torch's formula)."""
        return 1 / max(1, t - kw["t0"])

    def advance(self, kw, scalars):
        step = scalars["step"] + 1.0
        t = float(step)
        # torch stores the new values through torch.as_tensor: rounded to its default
        # dtype (which the type of a stored step follows), then to the state's dtype
        rounded = type(step) if isinstance(step, np.floating) else float
        return ({"step": int(t), "eta": float(scalars["eta"]), "mu": float(scalars["mu"])},
                {"step": step, "eta": rounded(self._eta(kw, t)),
                 "mu": rounded(self._mu(kw, t))})

    def check_op(self, kw):
        _check_host_step(self, kw)
        super().check_op(kw)

    def hyper(self, kw):
        t = float(kw["step"])
        eta = kw.get("eta")
        eta = self._eta(kw, t - 1.0) if eta is None else float(eta)
        mu = kw.get("mu")
        mu = self._mu(kw, t - 1.0) if mu is None else float(mu)
        return dict(eta=eta, decay=1.0 - kw["lambd"] * eta, mu=mu, average=mu != 1.0,
                    weight_decay=kw["weight_decay"], maximize=kw["maximize"])


class Rprop(Spec):
    name, title = "rprop", "Rprop"
    summary = ("Rprop (Riedmiller and Braun, 1993): per-element step sizes adapted to the "
               "signs of successive gradients.")
    math = r"""
    With the previous gradient :math:`g'` and the step size :math:`s` of each element:
    :math:`s \leftarrow \mathrm{clamp}(s \eta_+, s_{min}, s_{max})` where
    :math:`g g' > 0`, :math:`\mathrm{clamp}(s \eta_-, s_{min}, s_{max})` and
    :math:`g \leftarrow 0` where :math:`g g' < 0`, :math:`\mathrm{clamp}(s, s_{min},
    s_{max})` elsewhere; :math:`p \leftarrow p - \mathrm{sign}(g)\, s`;
    :math:`g' \leftarrow g`. Step sizes start at lr. Signs are torch.sign's (a NaN's is
    0)."""
    options = (
        lr_option(1e-2),
        Option("etas", (0.5, 1.2), "Factors :math:`(\\eta_-, \\eta_+)` that shrink and "
               "grow the step sizes; :math:`0 < \\eta_- < 1 < \\eta_+`.",
               "tuple[float, float]"),
        Option("step_sizes", (1e-6, 50), "Bounds :math:`(s_{min}, s_{max})` of the step "
               "sizes.", "tuple[float, float]"),
        torch_flag("capturable"), torch_flag("foreach"),
        Option("maximize", False, MAXIMIZE.doc, "bool", kw_only=True),
        torch_flag("differentiable"),
    )
    op_keywords = (
        Option("etaminus", REQUIRED, "Factor that shrinks a step size where the gradient's "
               "sign flipped."),
        Option("etaplus", REQUIRED, "Factor that grows a step size where the sign held."),
        Option("step_size_min", REQUIRED, "Lower bound of the step sizes."),
        Option("step_size_max", REQUIRED, "Upper bound of the step sizes."),
        OP_MAXIMIZE,
        Option("lr", None, "Learning rate: only the scale of the L1 proximal step (with "
               "``l1``); the update takes the step sizes (which the classes start at lr).",
               "float | None"),
    )
    states = (
        State("prev", "prevs", "The previous gradient (0 where its sign flipped)."),
        State("step_size", "step_sizes", "Per-element step sizes.", positive=True),
    )
    bench = {"rprop": {}}
    example = "lr=0.01"

    def validate(self, g):
        check_lr(g)
        etas = g["etas"]
        check(isinstance(etas, (tuple, list)) and len(etas) == 2, f"Invalid eta values: {etas!r}")
        etaminus, etaplus = number(etas[0]), number(etas[1])
        check(0.0 < etaminus < 1.0 < etaplus, f"Invalid eta values: {etas[0]}, {etas[1]}")

    def to_op(self, g):
        (etaminus, etaplus), (low, high) = g["etas"], g["step_sizes"]
        return dict(etaminus=number(etaminus), etaplus=number(etaplus),
                    step_size_min=number(low), step_size_max=number(high),
                    maximize=g["maximize"], lr=number(g["lr"]))

    def init_value(self, name, group):
        return number(group["lr"]) if name == "step_size" else 0.0

    def hyper(self, kw):
        return dict(etaminus=kw["etaminus"], etaplus=kw["etaplus"],
                    step_size_min=kw["step_size_min"], step_size_max=kw["step_size_max"],
                    maximize=kw["maximize"])


SPECS = (Nadam(), Radam(), Adamax(), Asgd(), Rprop())
