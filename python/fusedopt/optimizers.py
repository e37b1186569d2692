"""The optimizer classes (`fusedopt.SGD`, `fusedopt.Adam`, ...), one per algorithm of the
table (`fusedopt.algorithms`), with torch.optim's names, defaults, options and state
names. Each is the `Optimizer` base over its spec: the constructor's signature, its
validation and its docstring come from the spec."""

from __future__ import annotations

from .algorithms import SPECS
from .algorithms._doc import class_doc, class_signature
from .optimizer import Modes, Optimizer

__all__ = []


def bind_options(cls, spec, signature, params, args, kwargs):
    """The constructor's arguments as {option: value}, torch's binding rules, with
    ``learning_rate`` accepted as an alias of ``lr``."""
    if "learning_rate" in kwargs:
        if "lr" in kwargs or len(args) >= 1:
            raise TypeError(f"{cls.__name__}() got both lr and learning_rate (an alias); "
                            "pass one of them")
        kwargs = dict(kwargs)
        kwargs["lr"] = kwargs.pop("learning_rate")
    bound = signature.bind(None, params, *args, **kwargs)
    bound.apply_defaults()
    values = dict(bound.arguments)
    del values["self"], values["params"]
    return values


def make_class(spec, base=Optimizer, module=__name__):
    """The optimizer class of a spec, over `base` (with `train()` and `eval()` where the
    spec has modes)."""
    signature = class_signature(spec)
    bases = (Modes, base) if spec.mode_state is not None and not issubclass(base, Modes) \
        else (base,)

    def __init__(self, params, *args, **kwargs):
        values = bind_options(type(self), spec, signature, params, args, kwargs)
        precision, ema_decay = values.pop("precision"), values.pop("ema_decay")
        defaults = dict(values, **spec.group_extras)
        if "betas" in defaults:
            defaults["betas"] = tuple(defaults["betas"])
        Optimizer.__init__(self, params, defaults, precision, ema_decay)

    __init__.__signature__ = signature
    __init__.__doc__ = f"See `{spec.title}`."
    return type(spec.title, bases, {"spec": spec, "__init__": __init__,
                                       "__doc__": class_doc(spec), "__module__": module})


def _make_all():
    made = {}
    for spec in SPECS.values():
        base = made[spec.base] if spec.base else Optimizer
        made[spec.name] = make_class(spec, base, "fusedopt")
    return made


CLASSES = _make_all()
globals().update({cls.__name__: cls for cls in CLASSES.values()})
__all__ += [cls.__name__ for cls in CLASSES.values()]
