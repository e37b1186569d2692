"""Docstrings and signatures of the front-ends, generated from the specs (numpydoc)."""

from __future__ import annotations

import inspect
import textwrap

from .._precision import KEYWORDS as PRECISION_KEYWORDS
from ._spec import REQUIRED

_P = inspect.Parameter


def _default(value):
    return "required" if value is REQUIRED else f"default {value!r}"


def _entry(name, annotation, text, default=REQUIRED):
    head = f"{name} : {annotation}"
    if default is not REQUIRED:
        head += f", {_default(default)}"
    return head + "\n" + textwrap.indent(textwrap.fill(text, 80), "    ")


def _math(spec):
    return textwrap.dedent(spec.math).strip()


def _states(spec):
    lines = []
    for name in spec.scalars:
        lines.append(f"- ``{name}``: " + ("the step count." if name == "step" else
                                          spec.scalar_docs.get(name, "a per-param scalar.")))
    lines += [f"- ``{s.name}``: {s.doc}" for s in spec.states]
    return "\n".join(lines) if lines else "None."


EMA_DOC = ("Keep an exponential moving average of every param, ``state['ema']``, moved in "
           "the same pass as each step as torch.optim.swa_utils.AveragedModel with "
           "get_ema_multi_avg_fn(ema_decay) moves it (the first step copies the params); "
           "``swap_ema()`` and ``with opt.averaged():`` put the averages into the params for "
           "evaluation. A value in [0, 1]; None keeps no averages (not with 8-bit state).")


def _group_notes(spec):
    """What the docstrings say about per-group bookkeeping and train/eval modes."""
    from ._spec import Spec

    lines = []
    if type(spec).advance_group is not Spec.advance_group and spec.group_extras:
        names = ", ".join(f"``{k}``" for k in spec.group_extras)
        lines += ["", textwrap.fill(
            f"Each param group also keeps {names}: the per-group bookkeeping that every "
            "step advances (it travels in the state dict's param groups).", 88)]
    if spec.mode_state is not None:
        lines += ["", textwrap.fill(
            "``train()`` puts the params in train mode and ``eval()`` in eval mode, moving "
            f"them between the two sequences with the ``{spec.mode_state}`` state; call "
            "``train()`` before stepping (a step in eval mode raises RuntimeError) and "
            "``eval()`` before evaluating or saving.", 88)]
    return lines


def class_signature(spec, torch=False):
    """The constructor's signature: ``(self, params, <options>, *, precision)`` for the
    NumPy classes, torch's exact one for `fusedopt.torch`."""
    params = [_P("self", _P.POSITIONAL_OR_KEYWORD),
              _P("params", _P.POSITIONAL_OR_KEYWORD, annotation="Iterable")]
    kw_only = False
    for o in spec.options:
        if o.torch_only and not torch:
            continue
        kw_only = kw_only or o.kw_only
        kind = _P.KEYWORD_ONLY if kw_only else _P.POSITIONAL_OR_KEYWORD
        default = _P.empty if o.default is REQUIRED else o.default
        params.append(_P(o.name, kind, default=default, annotation=o.annotation))
    if torch:
        params.append(_P("flat", _P.KEYWORD_ONLY, default=False, annotation="bool"))
        params.append(_P("optim_bits", _P.KEYWORD_ONLY, default=32, annotation="int"))
        params.append(_P("min_8bit_size", _P.KEYWORD_ONLY, default=4096, annotation="int"))
    else:
        params.append(_P("precision", _P.KEYWORD_ONLY, default=None,
                         annotation="Precision | None"))
    params.append(_P("ema_decay", _P.KEYWORD_ONLY, default=None, annotation="float | None"))
    return inspect.Signature(params, return_annotation=None)


def class_doc(spec, torch=False):
    """The class docstring."""
    lines = [spec.summary, "", _math(spec), "", "Parameters", "----------"]
    if torch:
        lines.append(_entry("params", "iterable of torch.Tensor or dict",
                            "The parameters (or named parameters), or param groups: dicts "
                            "with ``params`` and any of the options below."))
    else:
        lines.append(_entry("params", "list of arrays or list of dict",
                            "The arrays updated in place (NumPy, CuPy, PyTorch tensors, or any "
                            "DLPack or array-interface producer), or param groups: dicts with "
                            "``params`` and any of the options below."))
    for o in spec.options:
        if o.torch_only and not torch:
            continue
        lines.append(_entry(o.name, o.annotation, o.doc, o.default))
    if torch:
        lines.append(_entry("flat", "bool", "Move each group's params (per device and dtype) "
                            "into one contiguous buffer, their gradients and states into "
                            "others, so that a step is one kernel call with no per-tensor "
                            "work; the params stay the same objects, their .data views of the "
                            "buffer. zero_grad then zeroes the gradient buffer and keeps the "
                            "views (see the docs: fusedopt.torch, flat buffers).", False))
        lines.append(_entry("optim_bits", "int",
                            "32, or 8 to keep the state of float32 and 16-bit params in 8 "
                            "bits (bitsandbytes' option): uint8 codes under the state's "
                            "names and float32 scales, one per block of 256 elements, under "
                            "``<name>_absmax``.", 32))
        lines.append(_entry("min_8bit_size", "int",
                            "With ``optim_bits=8``, params with fewer elements keep float32 "
                            "state.", 4096))
    else:
        lines.append(_entry("precision", "Precision or None",
                            "The mixed-precision policy (`fusedopt.Precision`): state dtype "
                            "(float32, bfloat16 or 8-bit), master weights or Kahan buffers, "
                            "stochastic rounding.", None))
    lines.append(_entry("ema_decay", "float or None", EMA_DOC, None))
    lines += ["", "Notes", "-----",
              "State per param, under torch.optim's names:", "", _states(spec),
              "- ``ema``: the param's exponential moving average (with ``ema_decay``).", "",
              "``learning_rate=`` is accepted as an alias of ``lr``."]
    lines += _group_notes(spec)
    if torch:
        lines += ["", f"A drop-in for {_origin(spec)}: the same arguments, "
                  "defaults, validation, param groups and state dicts (which load into "
                  "it and back); the step runs fusedopt's fused kernels."]
    lines += ["", "Examples", "--------"]
    train = [">>> opt.train()"] if spec.mode_state is not None else []
    evaluate = [">>> opt.eval()  # the params now hold the average"] \
        if spec.mode_state is not None else []
    if torch and spec.gradient == "rows":
        lines += [">>> import torch", ">>> from fusedopt.torch import " + spec.title,
                  ">>> emb = torch.nn.Embedding(10, 4, sparse=True)",
                  f">>> opt = {spec.title}(emb.parameters(), {spec.example})",
                  ">>> emb(torch.tensor([1, 3, 1])).sum().backward()",
                  ">>> opt.step()  # rows 1 and 3 change", ">>> opt.zero_grad()"]
    elif torch:
        lines += [">>> import torch", ">>> from fusedopt.torch import " + spec.title,
                  f">>> model = {spec.example_model}",
                  f">>> opt = {spec.title}(model.parameters(), {spec.example})", *train,
                  ">>> model(torch.ones(3, 4)).sum().backward()", ">>> opt.step()",
                  ">>> opt.zero_grad()", *evaluate]
    elif spec.gradient == "rows":
        lines += [">>> import numpy as np", ">>> import fusedopt as fo",
                  ">>> table = np.zeros((10, 4), np.float32)",
                  f">>> opt = fo.{spec.title}([table], {spec.example})",
                  ">>> rows, values = np.array([1, 3, 1]), np.ones((3, 4), np.float32)",
                  ">>> opt.step([(rows, values)])  # rows 1 (twice: summed) and 3 change"]
    else:
        a, b = spec.example_shapes
        lines += [">>> import numpy as np", ">>> import fusedopt as fo",
                  f">>> params = [np.ones({a}, np.float32), np.zeros({b}, np.float32)]",
                  f">>> opt = fo.{spec.title}(params, {spec.example})", *train,
                  f">>> grads = [np.full({a}, 0.5, np.float32), np.ones({b}, np.float32)]",
                  ">>> opt.step(grads)  # the params change in place", *evaluate]
    return "\n".join(lines) + "\n"


def op_signature(spec):
    """``(params, grads, <state lists>, *, <op keywords>, stream, <precision keywords>)``."""
    params = [_P("params", _P.POSITIONAL_OR_KEYWORD, annotation="list")]
    if spec.gradient == "rows":
        params += [_P("rows", _P.POSITIONAL_OR_KEYWORD, annotation="list"),
                   _P("values", _P.POSITIONAL_OR_KEYWORD, annotation="list")]
    else:
        params.append(_P("grads", _P.POSITIONAL_OR_KEYWORD, annotation="list"))
    for s in spec.states:
        default = None if s.optional else _P.empty
        params.append(_P(s.arg, _P.POSITIONAL_OR_KEYWORD, default=default,
                         annotation="list | None" if s.optional else "list"))
    for o in spec.op_keywords:
        default = _P.empty if o.default is REQUIRED else o.default
        params.append(_P(o.name, _P.KEYWORD_ONLY, default=default, annotation=o.annotation))
    params.append(_P("stream", _P.KEYWORD_ONLY, default=None, annotation="object | None"))
    for name, default, annotation, _ in PRECISION_KEYWORDS:
        params.append(_P(name, _P.KEYWORD_ONLY, default=default, annotation=annotation))
    return inspect.Signature(params, return_annotation="StepInfo | DeviceStepInfo | None")


def op_doc(spec):
    """The functional op's docstring."""
    lines = [f"In-place {spec.title} step over lists of arrays, one fused kernel call per "
             "(device, dtype).", "", spec.summary, "", _math(spec), "",
             "Parameters", "----------",
             _entry("params", "list of arrays", "Updated in place.")]
    if spec.gradient == "rows":
        lines += [_entry("rows", "list of arrays", "Per param, the 1-D integer indices of the "
                         "rows (along its first dimension) the gradient touches; repeats are "
                         "summed (torch's coalesce). Only these rows of the param and its "
                         "state are read or written."),
                  _entry("values", "list of arrays", "Per param, the gradient's rows: shape "
                         "``(len(rows), *param.shape[1:])``, the param's dtype.")]
    else:
        lines.append(_entry("grads", "list of arrays", "Aligned with `params`; only read "
                            "(gradients that are not C-contiguous are read through a copy)."))
    for s in spec.states:
        text = s.doc + " Updated in place."
        lines.append(_entry(s.arg, "list of arrays" + (", optional" if s.optional else ""),
                            text + (" Required when the options use it." if s.optional
                                    else "")))
    for o in spec.op_keywords:
        lines.append(_entry(o.name, o.annotation, o.doc, o.default))
    lines.append(_entry("stream", "CUDA stream or int or None",
                        "GPU arrays: the stream the kernels run on (default: the current "
                        "stream of the params' producer).", None))
    for name, default, annotation, text in PRECISION_KEYWORDS:
        lines.append(_entry(name, annotation, text, default))
    lines += ["", "Returns", "-------", "StepInfo or DeviceStepInfo or None",
              "    With `max_grad_norm` or `skip_nonfinite`, what the gradient check found "
              "(a DeviceStepInfo on a GPU, read lazily); otherwise None.", "",
              "Notes", "-----",
              "Every array is validated before any is written: a bad input raises "
              "(ValueError or TypeError) and changes nothing. The state lists are, in "
              "torch.optim's names:", "", _states(spec)]
    return "\n".join(lines) + "\n"


def _origin(spec):
    """The class a fusedopt.torch class stands in for."""
    if spec.defined_by is not None:
        return spec.defined_by
    import torch

    if hasattr(torch.optim, spec.title):
        return f"``torch.optim.{spec.title}``"
    return f"a ``torch.optim.Optimizer`` running {spec.title}"
