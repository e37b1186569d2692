"""Adafactor, with torch.optim.Adafactor's arguments, defaults, messages, state names and
math: factored row/column second moments for matrices, a full one for vectors, run by
the factored drivers (`fusedopt._adafactor`: three passes over the elements)."""

from __future__ import annotations

from ._spec import REQUIRED, Option, Spec, State, check, number, torch_flag
from .classic import MAXIMIZE, OP_MAXIMIZE, OP_STEP


class Adafactor(Spec):
    name, title = "adafactor", "Adafactor"
    summary = ("Adafactor (Shazeer and Stern, 2018): second moments factored into row and "
               "column averages for matrices, update clipping, relative step sizes.")
    math = r"""
    :math:`\hat\beta_t = 1 - t^{\tau}`; :math:`\rho_t = \min(\eta, 1/\sqrt t)`;
    :math:`\alpha_t = \max(\epsilon_2, \mathrm{RMS}(p))\,\rho_t`;
    :math:`p \leftarrow p (1 - \eta\lambda)`. A matrix (the last two dimensions of a tensor
    with two or more) keeps row factors :math:`R \leftarrow \hat\beta_t R + (1 - \hat\beta_t)
    \,\mathrm{mean}_j g_{ij}^2` and column factors :math:`C \leftarrow \hat\beta_t C +
    (1 - \hat\beta_t)\,\mathrm{mean}_i g_{ij}^2`, with
    :math:`\hat V_{ij} = R_i C_j / \max(\mathrm{mean}_i R_i, \epsilon_1)`; a vector keeps
    :math:`\hat V \leftarrow \hat\beta_t \hat V + (1 - \hat\beta_t) g^2`. Then
    :math:`U = g / \sqrt{\max(\hat V, \epsilon_1^2)}`,
    :math:`p \leftarrow p - \alpha_t\, U / \max(1, \mathrm{RMS}(U) / d)` (torch's lerps and
    order of operations). A step of a matrix is three passes over its elements: the row
    and column sums of :math:`g^2` (and :math:`\sum p^2`), the sum of :math:`U^2`, the
    update."""
    options = (
        Option("lr", 1e-2, "Learning rate: the weight decay's factor and the largest "
               "relative step size."),
        Option("beta2_decay", -0.8, "The decay rate :math:`\\tau` of "
               ":math:`\\hat\\beta_2`."),
        Option("eps", (None, 1e-3), "(:math:`\\epsilon_1`, :math:`\\epsilon_2`): the floor "
               "of the second moments (None: the params' machine epsilon) and of the "
               "params' RMS.", "tuple[float | None, float]"),
        Option("d", 1.0, "The update clipping threshold."),
        Option("weight_decay", 0.0, "Decoupled weight decay: "
               ":math:`p \\leftarrow p (1 - \\eta\\lambda)`."),
        torch_flag("foreach"),
        Option("maximize", False, MAXIMIZE.doc, "bool", kw_only=True),
    )
    op_keywords = (
        OP_STEP,
        Option("lr", REQUIRED, "Learning rate."),
        Option("beta2_decay", -0.8, "The decay rate of beta2."),
        Option("eps1", None, "The floor of the second moments (None: the first param's "
               "machine epsilon, as torch).", "float | None"),
        Option("eps2", 1e-3, "The floor of the params' RMS."),
        Option("d", 1.0, "The update clipping threshold."),
        Option("weight_decay", 0.0, "Decoupled weight decay."),
        OP_MAXIMIZE,
    )
    states = (
        State("row_var", "row_vars", "Row factors of the second moment (matrices: shape "
              "``(*batch, m, 1)``; None for vectors).", positive=True, optional=True),
        State("col_var", "col_vars", "Column factors of the second moment (matrices: shape "
              "``(*batch, 1, n)``; None for vectors).", positive=True, optional=True),
        State("variance", "variances", "The second moment of a vector (None for matrices).",
              positive=True, optional=True),
    )
    composite = True
    shaped_states = True
    batchable = False
    torch_class = "fusedopt._torch_adafactor:Adafactor"
    bench = {}  # (benchmarks/bench_more.py --only adafactor)
    example = "lr=1e-2"

    def validate(self, g):
        lr, tau, d, wd = (number(g[k]) for k in ("lr", "beta2_decay", "d", "weight_decay"))
        eps = g["eps"]
        check(0.0 <= lr, f"Learning rate should be >= 0 but is: {lr}")
        check(0.0 >= tau, f"beta2_decay should be <= 0 but is: {tau}")
        check(eps[0] is None or 0.0 <= eps[0], f"epsilon1 should be >= 0 but is: {eps[0]}")
        check(0.0 <= eps[1], f"epsilon2 should be >= 0 but is: {eps[1]}")
        check(1.0 <= d, f"Clipping threshold d should be >= 1 but is: {d}")
        check(0.0 <= wd, f"weight_decay should be >= 0 but is: {wd}")

    def to_op(self, g):
        eps1, eps2 = g["eps"]
        return dict(lr=number(g["lr"]), beta2_decay=number(g["beta2_decay"]),
                    eps1=None if eps1 is None else number(eps1), eps2=number(eps2),
                    d=number(g["d"]), weight_decay=number(g["weight_decay"]),
                    maximize=g["maximize"])

    def state_shape(self, name, shape):
        matrix = len(shape) > 1
        if name == "variance":
            return None if matrix else shape
        if not matrix:
            return None
        return (*shape[:-1], 1) if name == "row_var" else (*shape[:-2], 1, shape[-1])

    def hyper(self, kw):
        return dict(lr=kw["lr"], beta2_decay=kw["beta2_decay"], eps1=kw["eps1"],
                    eps2=kw["eps2"], d=kw["d"], weight_decay=kw["weight_decay"],
                    maximize=kw["maximize"])

    def make_plan(self, kw, params, grads, states, names, options, stream, op):
        from .. import _adafactor

        return _adafactor.plan(self, kw, params, grads, states, options, stream, op)


SPECS = (Adafactor(),)
