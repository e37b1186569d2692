"""The classic family, with torch.optim's arguments, defaults, messages and state names:
SGD, Adagrad, RMSprop, Adadelta, Adam and AdamW."""

from __future__ import annotations

from ._spec import (REQUIRED, Option, Spec, State, check, check_betas, check_number, number,
                    torch_flag)

# Options shared by several algorithms (same name, same meaning).
MAXIMIZE = Option("maximize", False, "Maximize the objective instead of minimizing it.", "bool")


def lr_option(default, kw_only=False):
    return Option("lr", default, "Learning rate.", kw_only=kw_only)


def wd_option(default=0.0, doc="L2 penalty: ``g += weight_decay * p``."):
    return Option("weight_decay", default, doc)


def check_lr(group):
    check_number("learning rate", group["lr"], 0.0)


# The functional ops' keywords shared by several algorithms.
OP_LR = Option("lr", REQUIRED, "Learning rate.")
OP_STEP = Option("step", REQUIRED, "The step count after this update (1 on the first step); "
                 "on a GPU also a float64 device array of one element, to which the op adds 1.",
                 "int | array")
OP_MAXIMIZE = MAXIMIZE


class Sgd(Spec):
    name, title = "sgd", "SGD"
    summary = "Stochastic gradient descent with momentum, dampening and Nesterov momentum."
    math = r"""
    :math:`g \leftarrow g + \lambda p`; with momentum :math:`\mu`:
    :math:`b \leftarrow g` on a buffer's first step, else
    :math:`b \leftarrow \mu b + (1 - \tau) g`; then :math:`g \leftarrow g + \mu b` (Nesterov)
    or :math:`g \leftarrow b`; :math:`p \leftarrow p - \eta g`. Plain (full-batch) gradient
    descent and mini-batch SGD are momentum 0."""
    options = (
        lr_option(1e-3),
        Option("momentum", 0.0, "Momentum factor :math:`\\mu`."),
        Option("dampening", 0.0, "Dampening :math:`\\tau` of the momentum."),
        wd_option(),
        Option("nesterov", False, "Nesterov momentum (needs a momentum and zero dampening).",
               "bool"),
        Option("maximize", False, MAXIMIZE.doc, "bool", kw_only=True),
        torch_flag("foreach"), torch_flag("differentiable"), torch_flag("fused"),
    )
    op_keywords = (
        OP_LR,
        Option("momentum", 0.0, "Momentum factor."),
        Option("dampening", 0.0, "Dampening of the momentum."),
        Option("weight_decay", 0.0, "L2 penalty."),
        Option("nesterov", False, "Nesterov momentum.", "bool"),
        OP_MAXIMIZE,
        Option("first_step", False, "Set the momentum buffers to the gradient, whatever they "
               "held (torch's first step of a buffer).", "bool"),
    )
    states = (State("momentum_buffer", "momentum_buffers", "The momentum buffer (only with a "
                    "momentum).", optional=True),)
    quantizable = ("momentum_buffer",)
    scalars = ()
    fresh_keyword = "first_step"
    example = "lr=0.01, momentum=0.9"
    bench = {"sgd": dict(lr=0.01), "sgd_momentum": dict(lr=0.01, momentum=0.9)}

    def validate(self, g):
        check_lr(g)
        check_number("momentum value", g["momentum"], 0.0)
        check_number("dampening value", g["dampening"])
        check_number("weight_decay value", g["weight_decay"], 0.0)
        check(not g["nesterov"] or (g["momentum"] > 0 and g["dampening"] == 0),
              "Nesterov momentum requires a momentum and zero dampening")

    def active(self, kw):
        return ("momentum_buffer",) if kw.get("momentum", 0.0) != 0 else ()

    def kernel(self, kw):
        return "sgd_momentum" if kw.get("momentum", 0.0) != 0 else "sgd"

    def batch_kernel(self, kws, existing):
        # Each member runs the kernel its own optimizer runs: inside the momentum kernel
        # a member without momentum would compute b = 0 * b + g, NaN where an earlier
        # gradient left b infinite, where SGD's plain step keeps the infinity.
        kernels = tuple(self.kernel(kw) for kw in kws)
        if len(set(kernels)) == 1:
            return kernels[0], self.active(kws[0]), kws
        return kernels, ("momentum_buffer",), kws

    def hyper(self, kw):
        return dict(lr=kw["lr"], momentum=kw["momentum"], dampening=kw["dampening"],
                    weight_decay=kw["weight_decay"], nesterov=kw["nesterov"],
                    maximize=kw["maximize"], first_step=kw["first_step"])


class Adagrad(Spec):
    name, title = "adagrad", "Adagrad"
    summary = "Adagrad: per-element rates from the sum of squared gradients."
    math = r"""
    :math:`g \leftarrow g + \lambda p`;
    :math:`\tilde\eta = \eta / (1 + (t - 1)\,\mathrm{lr\_decay})`;
    :math:`s \leftarrow s + g^2`; :math:`p \leftarrow p - \tilde\eta\, g / (\sqrt{s} + \epsilon)`.
    The sums start at ``initial_accumulator_value``."""
    options = (
        lr_option(1e-2),
        Option("lr_decay", 0.0, "Learning-rate decay."),
        wd_option(),
        Option("initial_accumulator_value", 0.0, "The value the sums start from."),
        Option("eps", 1e-10, "Added to the denominator."),
        torch_flag("foreach", kw_only=False),
        Option("maximize", False, MAXIMIZE.doc, "bool", kw_only=True),
        torch_flag("differentiable"), torch_flag("fused"),
    )
    op_keywords = (
        OP_STEP, OP_LR,
        Option("lr_decay", 0.0, "Learning-rate decay."),
        Option("weight_decay", 0.0, "L2 penalty."),
        Option("eps", 1e-10, "Added to the denominator."),
        OP_MAXIMIZE,
    )
    states = (State("sum", "state_sums", "Sum of squared gradients.", positive=True),)
    quantizable = ("sum",)
    eager_state = True
    example = "lr=0.1"
    bench = {"adagrad": dict(lr=0.01, eps=1e-10)}

    def validate(self, g):
        check_lr(g)
        check_number("lr_decay value", g["lr_decay"], 0.0)
        check_number("weight_decay value", g["weight_decay"], 0.0)
        check_number("initial_accumulator_value value", g["initial_accumulator_value"], 0.0)
        check_number("epsilon value", g["eps"], 0.0)

    def init_value(self, name, group):
        return number(group["initial_accumulator_value"])

    def hyper(self, kw):
        return dict(lr=kw["lr"], lr_decay=kw["lr_decay"], eps=kw["eps"],
                    weight_decay=kw["weight_decay"], maximize=kw["maximize"])


class Rmsprop(Spec):
    name, title = "rmsprop", "RMSprop"
    summary = "RMSprop, with momentum and centering."
    math = r"""
    :math:`g \leftarrow g + \lambda p`; :math:`v \leftarrow \alpha v + (1 - \alpha) g^2`;
    centered: :math:`\bar g \leftarrow \alpha \bar g + (1 - \alpha) g`,
    :math:`d = \sqrt{v - \bar g^2} + \epsilon`, else :math:`d = \sqrt{v} + \epsilon`;
    with momentum :math:`b \leftarrow \mu b + g / d`, :math:`p \leftarrow p - \eta b`,
    else :math:`p \leftarrow p - \eta g / d`."""
    options = (
        lr_option(1e-2),
        Option("alpha", 0.99, "Smoothing constant of the square average."),
        Option("eps", 1e-8, "Added to the denominator."),
        wd_option(),
        Option("momentum", 0.0, "Momentum factor."),
        Option("centered", False, "Normalize by the variance estimate (keeps ``grad_avg``).",
               "bool"),
        torch_flag("capturable", kw_only=False), torch_flag("foreach", kw_only=False),
        Option("maximize", False, MAXIMIZE.doc, "bool"),
        torch_flag("differentiable", kw_only=False),
    )
    op_keywords = (
        OP_LR,
        Option("alpha", REQUIRED, "Smoothing constant."),
        Option("eps", REQUIRED, "Added to the denominator."),
        Option("weight_decay", 0.0, "L2 penalty."),
        Option("momentum", 0.0, "Momentum factor."),
        Option("centered", False, "Centered variant.", "bool"),
        OP_MAXIMIZE,
    )
    states = (
        State("square_avg", "square_avgs", "Running average of squared gradients.",
              positive=True),
        State("momentum_buffer", "momentum_buffers", "Momentum buffer (with a momentum).",
              optional=True),
        State("grad_avg", "grad_avgs", "Running average of gradients (centered).",
              optional=True),
    )
    quantizable = ("square_avg", "momentum_buffer")  # not grad_avg (centered)
    example = "lr=1e-3, momentum=0.9"

    def validate(self, g):
        check_lr(g)
        check_number("epsilon value", g["eps"], 0.0)
        check_number("momentum value", g["momentum"], 0.0)
        check_number("weight_decay value", g["weight_decay"], 0.0)
        check_number("alpha value", g["alpha"], 0.0)

    def active(self, kw):
        names = ("square_avg",)
        if kw.get("momentum", 0.0) > 0:
            names += ("momentum_buffer",)
        if kw.get("centered"):
            names += ("grad_avg",)
        return names

    def kernel(self, kw):
        kernel = "rmsprop_centered" if kw.get("centered") else "rmsprop"
        return kernel + "_momentum" if kw.get("momentum", 0.0) > 0 else kernel

    batch_shared = ("centered",)

    def batch_kernel(self, kws, existing):
        # Each member runs the kernel a single optimizer with its options runs. The
        # momentum kernel cannot stand in for the plain one: it rounds lr * (g / d),
        # the plain kernel (lr * g) / d, as torch.optim does.
        kernels = tuple(self.kernel(kw) for kw in kws)
        if len(set(kernels)) == 1:
            return kernels[0], self.active(kws[0]), kws
        probe = dict(kws[0], momentum=1.0)  # the state of the members with momentum
        return kernels, self.active(probe), kws

    def check_quantized(self, kw, op):
        # square_avg - grad_avg^2 of two separately rounded states can be negative
        if kw.get("centered"):
            raise ValueError(f"{op}: 8-bit state is not supported for centered RMSprop")
        super().check_quantized(kw, op)

    def hyper(self, kw):
        return dict(lr=kw["lr"], alpha=kw["alpha"], eps=kw["eps"],
                    weight_decay=kw["weight_decay"], momentum=kw["momentum"],
                    maximize=kw["maximize"])


class Adadelta(Spec):
    name, title = "adadelta", "Adadelta"
    summary = "Adadelta: steps scaled by the ratio of running update and gradient magnitudes."
    math = r"""
    :math:`g \leftarrow g + \lambda p`; :math:`v \leftarrow \rho v + (1 - \rho) g^2`;
    :math:`\Delta = \sqrt{u + \epsilon} / \sqrt{v + \epsilon}\; g`;
    :math:`u \leftarrow \rho u + (1 - \rho) \Delta^2`; :math:`p \leftarrow p - \eta \Delta`."""
    options = (
        lr_option(1.0),
        Option("rho", 0.9, "Smoothing constant of the running averages."),
        Option("eps", 1e-6, "Added inside the square roots."),
        wd_option(),
        torch_flag("foreach", kw_only=False),
        torch_flag("capturable"),
        Option("maximize", False, MAXIMIZE.doc, "bool", kw_only=True),
        torch_flag("differentiable"),
    )
    op_keywords = (
        OP_LR,
        Option("rho", REQUIRED, "Smoothing constant."),
        Option("eps", REQUIRED, "Added inside the square roots."),
        Option("weight_decay", 0.0, "L2 penalty."),
        OP_MAXIMIZE,
    )
    states = (
        State("square_avg", "square_avgs", "Running average of squared gradients.",
              positive=True),
        State("acc_delta", "acc_deltas", "Running average of squared updates.", positive=True),
    )
    quantizable = ("square_avg", "acc_delta")
    example = "lr=1.0"

    def validate(self, g):
        check_lr(g)
        check_number("rho value", g["rho"], 0.0, 1.0)
        check_number("epsilon value", g["eps"], 0.0)
        check_number("weight_decay value", g["weight_decay"], 0.0)

    def hyper(self, kw):
        return dict(lr=kw["lr"], rho=kw["rho"], eps=kw["eps"], weight_decay=kw["weight_decay"],
                    maximize=kw["maximize"])


ADAM_MATH = r"""
    :math:`m \leftarrow \beta_1 m + (1 - \beta_1) g`;
    :math:`v \leftarrow \beta_2 v + (1 - \beta_2) g^2`; amsgrad:
    :math:`\hat v \leftarrow \max(\hat v, v)`, else :math:`\hat v = v`;
    :math:`p \leftarrow p - \frac{\eta}{1 - \beta_1^t}\, m \,/\,
    (\sqrt{\hat v} / \sqrt{1 - \beta_2^t} + \epsilon)`."""


class Adam(Spec):
    name, title = "adam", "Adam"
    summary = "Adam (Kingma and Ba, 2015), with amsgrad and L2 or decoupled weight decay."
    math = r"""
    Weight decay :math:`\lambda`: :math:`g \leftarrow g + \lambda p` (L2), or
    :math:`p \leftarrow p (1 - \eta\lambda)` (decoupled, AdamW); then""" + ADAM_MATH
    options = (
        lr_option(1e-3),
        Option("betas", (0.9, 0.999), "Decay rates :math:`(\\beta_1, \\beta_2)` of the "
               "moment estimates.", "tuple[float, float]"),
        Option("eps", 1e-8, "Added to the denominator."),
        wd_option(),
        Option("amsgrad", False, "Use the maximum of past second moments (keeps "
               "``max_exp_avg_sq``).", "bool"),
        torch_flag("foreach"),
        Option("maximize", False, MAXIMIZE.doc, "bool", kw_only=True),
        torch_flag("capturable"), torch_flag("differentiable"), torch_flag("fused"),
        Option("decoupled_weight_decay", False, "Decoupled weight decay (AdamW's).", "bool",
               kw_only=True),
    )
    op_keywords = (
        OP_STEP, OP_LR,
        Option("beta1", REQUIRED, "Decay rate of the first moment."),
        Option("beta2", REQUIRED, "Decay rate of the second moment."),
        Option("eps", REQUIRED, "Added to the denominator."),
        Option("weight_decay", 0.0, "Weight decay (L2, or decoupled)."),
        Option("amsgrad", False, "AMSGrad variant.", "bool"),
        OP_MAXIMIZE,
        Option("decoupled_weight_decay", False, "Decoupled weight decay (AdamW).", "bool"),
    )
    states = (
        State("exp_avg", "exp_avgs", "First moment estimate."),
        State("exp_avg_sq", "exp_avg_sqs", "Second moment estimate.", positive=True),
        State("max_exp_avg_sq", "max_exp_avg_sqs", "Maximum of the second moments "
              "(amsgrad).", positive=True, optional=True),
    )
    quantizable = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")
    example = "lr=1e-3, weight_decay=0.0"
    batch_shared = ("amsgrad",)

    def validate(self, g):
        check_lr(g)
        check_number("epsilon value", g["eps"], 0.0)
        check_betas(g["betas"])
        check_number("weight_decay value", g["weight_decay"], 0.0)

    def to_op(self, g):
        beta1, beta2 = g["betas"]
        return dict(lr=number(g["lr"]), beta1=number(beta1), beta2=number(beta2),
                    eps=number(g["eps"]), weight_decay=number(g["weight_decay"]),
                    amsgrad=g["amsgrad"], maximize=g["maximize"],
                    decoupled_weight_decay=g["decoupled_weight_decay"])

    def active(self, kw):
        names = ("exp_avg", "exp_avg_sq")
        return names + ("max_exp_avg_sq",) if kw.get("amsgrad") else names

    def kernel(self, kw):
        return "adam_amsgrad" if kw.get("amsgrad") else "adam"

    def hyper(self, kw):
        lr, wd = kw["lr"], kw["weight_decay"]
        l2, shrink = (0.0, 1.0 - lr * wd) if kw["decoupled_weight_decay"] else (wd, 1.0)
        return dict(lr=lr, beta1=kw["beta1"], beta2=kw["beta2"], eps=kw["eps"], l2=l2,
                    shrink=shrink, maximize=kw["maximize"])


class AdamW(Adam):
    name, title = "adamw", "AdamW"
    summary = "AdamW (Loshchilov and Hutter, 2019): Adam with decoupled weight decay."
    math = r"""
    :math:`p \leftarrow p (1 - \eta\lambda)`; then""" + ADAM_MATH
    options = (
        *Adam.options[:3],
        Option("weight_decay", 1e-2, "Decoupled weight decay: "
               ":math:`p \\leftarrow p (1 - \\eta\\lambda)`."),
        Adam.options[4],  # amsgrad
        Option("maximize", False, MAXIMIZE.doc, "bool", kw_only=True),
        torch_flag("foreach"), torch_flag("capturable"), torch_flag("differentiable"),
        torch_flag("fused"),
    )
    op_keywords = tuple(Option(o.name, 1e-2 if o.name == "weight_decay" else True, o.doc, o.annotation)
                        if o.name in ("weight_decay", "decoupled_weight_decay") else o
                        for o in Adam.op_keywords)
    group_extras = {"decoupled_weight_decay": True}
    base = "adam"
    example = "lr=1e-3, weight_decay=1e-2"


SPECS = (Sgd(), Adagrad(), Rmsprop(), Adadelta(), Adam(), AdamW())
