"""Muon, with torch.optim.Muon's arguments, defaults, messages, state and math; its
Newton-Schulz iterations batched over the params of one shape (`fusedopt._muon`)."""

from __future__ import annotations

import math

from ._spec import REQUIRED, Option, Spec, State, check, number

NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
ADJUST_LR_FNS = (None, "original", "match_rms_adamw")
NS_DTYPES = ("bfloat16", "float32")


def adjusted_lr(lr, adjust_lr_fn, shape):
    """torch.optim.Muon's learning rate for a param of `shape`: ``"original"`` (or None)
    scales by sqrt(max(1, A / B)), ``"match_rms_adamw"`` by 0.2 sqrt(max(A, B))."""
    a, b = shape[:2]
    if adjust_lr_fn is None or adjust_lr_fn == "original":
        ratio = math.sqrt(max(1, a / b))
    elif adjust_lr_fn == "match_rms_adamw":
        ratio = 0.2 * math.sqrt(max(a, b))
    else:
        ratio = 1.0
    return lr * ratio


def _options(op):
    """Constructor arguments (op=False) or op keywords (op=True)."""
    lr = Option("lr", REQUIRED if op else 1e-3, "Learning rate.")
    return (
        lr,
        Option("weight_decay", 0.1, "Decoupled weight decay: "
               ":math:`p \\leftarrow p (1 - \\eta\\lambda)`."),
        Option("momentum", 0.95, "Momentum factor :math:`\\mu`."),
        Option("nesterov", True, "Nesterov momentum.", "bool"),
        Option("ns_coefficients", NS_COEFFICIENTS, "Coefficients :math:`(a, b, c)` of the "
               "quintic Newton-Schulz iteration.", "tuple[float, float, float]"),
        Option("eps", 1e-7, "Lower bound of the norm the iteration's start is divided by."),
        Option("ns_steps", 5, "Newton-Schulz iterations (fewer than 100).", "int"),
        Option("adjust_lr_fn", None, "How the learning rate scales with the shape: "
               "``\"original\"`` (or None) :math:`\\sqrt{\\max(1, A/B)}`, "
               "``\"match_rms_adamw\"`` :math:`0.2 \\sqrt{\\max(A, B)}`.", "str | None"),
        Option("ns_dtype", "bfloat16", "The precision of the Newton-Schulz iterations: "
               "``\"bfloat16\"`` (torch's choice; on NumPy and CuPy arrays, float32 products "
               "rounded to bfloat16 after each operation, as bfloat16 matrix products "
               "accumulate in float32) or ``\"float32\"``.", "str", kw_only=True),
    )


class Muon(Spec):
    name, title = "muon", "Muon"
    summary = ("Muon: momentum orthogonalized by Newton-Schulz iterations, for 2-D params; "
               "the iterations batched over the params of one shape.")
    math = r"""
    :math:`b \leftarrow \mu b + (1 - \mu) g` (torch's lerp);
    :math:`u = g + \mu (b - g)` (Nesterov) or :math:`u = b`;
    :math:`O = \mathrm{NS}_k(u)`: :math:`X = u / \max(\|u\|_F, \epsilon)` (transposed when
    it has more rows than columns), then :math:`k` times :math:`A = X X^\top`,
    :math:`X \leftarrow a X + (b A + c A^2) X`;
    :math:`p \leftarrow p (1 - \eta\lambda) - \eta' O` with :math:`\eta'` the learning rate
    adjusted to the param's shape. The momentum and the final update are fused
    elementwise passes; the iterations of all params of one shape run as one batched
    matrix product per operation (NumPy's BLAS on the CPU, cuBLAS through CuPy or torch
    on the GPU)."""
    options = _options(False)
    op_keywords = _options(True)
    states = (State("momentum_buffer", "momentum_buffers", "The momentum buffer."),)
    scalars = ()
    composite = True
    batchable = False
    bench = {}  # (benchmarks/bench_muon.py: the iterations dominate)
    example = "lr=0.02"
    example_shapes = ((4, 2), (3, 5))
    example_model = "torch.nn.Linear(4, 2, bias=False)"

    def validate(self, g):
        lr, momentum, wd = number(g["lr"]), number(g["momentum"]), number(g["weight_decay"])
        check(0.0 <= lr, f"Learning rate should be >= 0 but is: {lr}")
        check(0.0 <= momentum, f"momentum should be >= 0 but is: {momentum}")
        check(0.0 <= wd, f"weight decay should be >= 0 but is: {wd}")
        fn = g["adjust_lr_fn"]
        check(fn in ADJUST_LR_FNS,
              f"Adjust learning rate function {fn} is not supported")
        check(g.get("ns_dtype", "bfloat16") in NS_DTYPES,
              f"ns_dtype must be one of {NS_DTYPES}, got {g.get('ns_dtype')!r}")
        check(isinstance(g["ns_steps"], int) and g["ns_steps"] < 100,
              "Number of steps must be less than 100 for computational efficiency")
        check(len(g["ns_coefficients"]) == 3, "Coefficients must be a tuple of exactly 3 values")

    def check_params(self, params):
        for p in params:
            if len(getattr(p, "shape", ())) != 2:
                size = p.size() if callable(getattr(p, "size", None)) else tuple(p.shape)
                raise ValueError("Muon only supports 2D parameters whereas we found a "
                                 f"parameter with size: {size}")

    def to_op(self, g):
        kw = super().to_op(g)
        kw["ns_coefficients"] = tuple(map(number, g["ns_coefficients"]))
        return kw

    def hyper(self, kw):  # (the passes' Hyper: fusedopt._muon)
        raise NotImplementedError

    def make_plan(self, kw, params, grads, states, names, options, stream, op):
        from .. import _muon

        return _muon.plan(self, kw, params, grads, states, names, options, stream, op)

    def check_op(self, kw):
        self.validate(kw)


SPECS = (Muon(),)
