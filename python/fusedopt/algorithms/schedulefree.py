"""Schedule-free AdamW (Defazio et al. 2024), as the schedulefree package's
AdamWScheduleFree: the same arguments, group entries, state names and train/eval
switching, so that its state dicts load both ways.

The package keeps its per-step bookkeeping in each param group (``k``, ``weight_sum``,
``lr_max``, ``scheduled_lr``, ``train_mode``); here `advance_group` computes the same
numbers, in double on the host, once per step and group, and the elementwise part
(second moment, the interpolation y, the base sequence z) is one fused pass.
"""

from __future__ import annotations

import numbers

from ._spec import REQUIRED, Option, Spec, State, check, check_betas, check_number, number
from .classic import OP_STEP, check_lr, lr_option

NOT_TRAINING = ("Optimizer was not in train mode when step is called. Please insert .train() "
                "and .eval() calls on the optimizer. See documentation for details.")


class AdamWScheduleFree(Spec):
    name, title = "adamw_schedulefree", "AdamWScheduleFree"
    summary = ("Schedule-free AdamW (Defazio et al., 2024, \"The Road Less Scheduled\"), as "
               "the schedulefree package's AdamWScheduleFree: no learning-rate schedule, "
               "the params average the iterates.")
    math = r"""
    With :math:`y` the params in train mode, :math:`z` the base sequence and
    :math:`x` the average (the params in eval mode): at step :math:`t = k + 1`,
    :math:`\eta_t = \eta \min(1, t / \mathrm{warmup})`,
    :math:`\eta_{max} = \max(\eta_{max}, \eta_t)`,
    :math:`w_t = t^r \eta_{max}^{p}` (``weight_lr_power`` :math:`p`),
    :math:`c_t = w_t / \sum_{s \le t} w_s`; then
    :math:`v \leftarrow \beta_2 v + (1 - \beta_2) g^2`,
    :math:`u = g / (\sqrt{v / (1 - \beta_2^t)} + \epsilon) + \lambda y`,
    :math:`y \leftarrow (1 - c_t) y + c_t z + \eta_t (\beta_1 (1 - c_t) - 1) u`,
    :math:`z \leftarrow z - \eta_t u`. ``train()`` and ``eval()`` move the params between
    :math:`y = (1 - \beta_1) z + \beta_1 x` and :math:`x`; a step needs train mode."""
    options = (
        lr_option(0.0025),
        Option("betas", (0.9, 0.999), "Interpolation :math:`\\beta_1` between the average "
               "and the base sequence, decay rate :math:`\\beta_2` of the second moment.",
               "tuple[float, float]"),
        Option("eps", 1e-8, "Added to the denominator."),
        Option("weight_decay", 0.0, "Weight decay :math:`\\lambda`, taken at y and added to "
               "the normalized gradient."),
        Option("warmup_steps", 0, "Steps of linear learning-rate warmup.", "int"),
        Option("r", 0.0, "Polynomial weighting :math:`t^r` of the iterates in the average."),
        Option("weight_lr_power", 2.0, "The weights of the average grow with the largest "
               "learning rate so far to this power."),
        Option("foreach", True, "Accepted for the schedulefree package's compatibility and "
               "kept in the param groups; every step is fused.", "bool | None",
               torch_only=True),
    )
    op_keywords = (
        OP_STEP,
        Option("lr", REQUIRED, "The learning rate of this step (warmup applied)."),
        Option("beta1", REQUIRED, "Interpolation between the average and z."),
        Option("beta2", REQUIRED, "Decay rate of the second moment."),
        Option("eps", REQUIRED, "Added to the denominator."),
        Option("weight_decay", 0.0, "Weight decay, taken at y."),
        Option("ckp1", REQUIRED, "The weight :math:`c_t` of this step's iterate in the "
               "average (the package's ``ckp1``)."),
    )
    states = (
        State("z", "zs", "The base sequence :math:`z` (starts as a copy of the param).",
              like_param=True),
        State("exp_avg_sq", "exp_avg_sqs", "Second moment estimate.", positive=True),
    )
    scalars = ()
    group_extras = {"k": 0, "train_mode": False, "weight_sum": 0.0, "lr_max": -1.0,
                    "scheduled_lr": 0.0}
    mode_state = "z"
    defined_by = "the schedulefree package's ``AdamWScheduleFree``"
    batchable = False
    example = "lr=2.5e-3"
    bench = {"adamw_schedulefree": dict(lr=2.5e-3, weight_decay=1e-2)}

    def validate(self, g):
        check_lr(g)
        check_number("epsilon value", g["eps"], 0.0)
        check_betas(g["betas"])
        check_number("weight_decay value", g["weight_decay"], 0.0)
        warmup = number(g["warmup_steps"])
        check(isinstance(warmup, numbers.Integral) and not isinstance(warmup, bool) and
              warmup >= 0, f"Invalid warmup_steps value: {warmup}")
        check_number("r value", g["r"], 0.0)
        check_number("weight_lr_power value", g["weight_lr_power"], 0.0)

    def to_op(self, g):
        beta1, beta2 = g["betas"]
        return dict(beta1=number(beta1), beta2=number(beta2), eps=number(g["eps"]),
                    weight_decay=number(g["weight_decay"]))

    def advance_group(self, kw, g):
        # the package's bookkeeping, operation for operation
        k, warmup = int(g["k"]), number(g["warmup_steps"])
        sched = (k + 1) / warmup if k < warmup else 1.0
        lr = number(g["lr"]) * sched
        lr_max = max(lr, number(g["lr_max"]))
        weight = ((k + 1) ** number(g["r"])) * (lr_max ** number(g["weight_lr_power"]))
        weight_sum = number(g["weight_sum"]) + weight
        try:
            ckp1 = weight / weight_sum
        except ZeroDivisionError:
            ckp1 = 0
        return (dict(step=k + 1, lr=lr, ckp1=ckp1),
                dict(k=k + 1, weight_sum=weight_sum, lr_max=lr_max, scheduled_lr=lr))

    def check_step(self, g):
        if not g["train_mode"]:
            raise RuntimeError(NOT_TRAINING)

    def mode_weight(self, g, train):
        if bool(g["train_mode"]) == train:
            return None
        beta1 = number(g["betas"][0])
        return 1.0 - beta1 if train else 1.0 - 1.0 / beta1

    def set_mode(self, g, train):
        return {"train_mode": bool(train)}

    def hyper(self, kw):
        lr, beta1, ckp1 = kw["lr"], kw["beta1"], kw["ckp1"]
        return dict(lr=lr, beta1=beta1, beta2=kw["beta2"], eps=kw["eps"],
                    weight_decay=kw["weight_decay"], ckp1=ckp1,
                    y_coef=lr * (beta1 * (1 - ckp1) - 1))


SPECS = (AdamWScheduleFree(),)
