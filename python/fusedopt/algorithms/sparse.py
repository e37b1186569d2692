"""Row-sparse gradients: SparseAdam, with torch.optim.SparseAdam's arguments, defaults,
messages, state names and math (`fusedopt._rows` runs it on the touched rows only)."""

from __future__ import annotations

from ._spec import REQUIRED, Option, Spec, State, check, check_betas, number
from .classic import MAXIMIZE, OP_LR, OP_MAXIMIZE, OP_STEP, lr_option


class SparseAdam(Spec):
    name, title = "sparse_adam", "SparseAdam"
    summary = ("SparseAdam: Adam on the rows a row-sparse gradient touches (an embedding's "
               "gradient), the other rows and their moments untouched.")
    math = r"""
    For each row the gradient touches (repeats summed first), elementwise:
    :math:`m \leftarrow m + (1 - \beta_1)(g - m)`;
    :math:`v \leftarrow v + (1 - \beta_2)(g^2 - v)`;
    :math:`p \leftarrow p - \eta \frac{\sqrt{1 - \beta_2^t}}{1 - \beta_1^t}\,
    m / (\sqrt{v} + \epsilon)`, with :math:`t` the param's step count (counted at every
    step with a gradient, also one that touches no row). Rows the gradient does not touch,
    and their moments, keep their values bit for bit."""
    options = (
        lr_option(1e-3),
        Option("betas", (0.9, 0.999), "Decay rates :math:`(\\beta_1, \\beta_2)` of the "
               "moment estimates.", "tuple[float, float]"),
        Option("eps", 1e-8, "Added to the denominator."),
        Option("maximize", False, MAXIMIZE.doc, "bool"),
    )
    op_keywords = (
        OP_STEP, OP_LR,
        Option("beta1", REQUIRED, "Decay rate of the first moment."),
        Option("beta2", REQUIRED, "Decay rate of the second moment."),
        Option("eps", REQUIRED, "Added to the denominator."),
        OP_MAXIMIZE,
    )
    states = (
        State("exp_avg", "exp_avgs", "First moment estimate."),
        State("exp_avg_sq", "exp_avg_sqs", "Second moment estimate.", positive=True),
    )
    gradient = "rows"
    batchable = False
    torch_class = "fusedopt._torch_sparse:SparseAdam"
    bench = {}  # (the dense step benchmark does not apply; bench_more.py --only sparse)
    example = "lr=1e-3"

    def validate(self, g):
        lr, eps = number(g["lr"]), number(g["eps"])
        check(0.0 < lr, f"Invalid learning rate: {lr}")
        check(0.0 < eps, f"Invalid epsilon value: {eps}")
        check_betas(g["betas"])

    def to_op(self, g):
        beta1, beta2 = g["betas"]
        return dict(lr=number(g["lr"]), beta1=number(beta1), beta2=number(beta2),
                    eps=number(g["eps"]), maximize=g["maximize"])

    def hyper(self, kw):
        return dict(lr=kw["lr"], beta1=kw["beta1"], beta2=kw["beta2"], eps=kw["eps"],
                    maximize=kw["maximize"])


SPECS = (SparseAdam(),)
