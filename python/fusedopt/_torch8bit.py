"""8-bit optimizer state for `fusedopt.torch`: the state keys, the state-dict layouts,
and `Adam8bit` and `AdamW8bit` under bitsandbytes' names and signatures.

With ``optim_bits=8`` each state buffer of a param with at least ``min_8bit_size``
elements (float32, float16 or bfloat16) is kept as uint8 codes of the dynamic
quantization maps with one float32 scale per block of 256 elements
(`fusedopt.Precision`'s ``"int8"``); smaller params keep float32 state (their own dtype
for float64). The state is kept under torch's names: ``state[p]["exp_avg"]`` holds the
codes and ``state[p]["exp_avg_absmax"]`` the scales. `Adam8bit` and `AdamW8bit` keep
bitsandbytes' names instead (``state1``, ``state2``, ``absmax1``, ``absmax2``,
``qmap1``, ``qmap2``) and its state-dict layout (the tensors nested under `BNB_WRAP`,
``step`` an integer), so that their state dicts and bitsandbytes' load into each other.
The steps run through fusedopt.torch's one step path (its caches, kept plans and flat
buffers), which asks `keys` for the names.

Loading a state dict moves every state tensor to its param's device and keeps its
dtype (torch.optim would cast float tensors to the param's dtype, which would change
the codes and the scales).
"""
from __future__ import annotations

from itertools import chain

import numpy as np
import torch

from . import _cpu, _quant

#: where bitsandbytes' state_dict nests the quantization state of a param
BNB_WRAP = "__bnb_optimizer_quant_state__"


def check_options(cls, optim_bits, min_8bit_size):
    """ValueError for optim_bits other than 8 or 32 and a min_8bit_size below 0."""
    if isinstance(optim_bits, bool) or optim_bits not in (8, 32):
        raise ValueError(f"{cls.__name__}: optim_bits must be 32 or 8, got {optim_bits!r}")
    if isinstance(min_8bit_size, bool) or not isinstance(min_8bit_size, int) or \
            min_8bit_size < 0:
        raise ValueError(f"{cls.__name__}: min_8bit_size must be an integer >= 0, got "
                         f"{min_8bit_size!r}")


def keys(opt, k, name):
    """(codes or buffer, scales, code table or None) state keys of state buffer `name`,
    the k-th the options use."""
    if opt._fo_bnb_names:
        return f"state{k + 1}", f"absmax{k + 1}", f"qmap{k + 1}"
    return name, _quant.absmax_name(name), None


def qmap(positive, device):
    """bitsandbytes' code table of a state (its ``qmap1``/``qmap2``)."""
    return torch.from_numpy(_cpu.quant_tables(not positive)["code"]).to(device)


def _scalar_dtype():
    return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32


def has_8bit(state_dict):
    """Whether a state dict holds 8-bit state (block scales, or bitsandbytes' nesting)."""
    for st in state_dict.get("state", {}).values():
        if isinstance(st, dict) and (BNB_WRAP in st or any(
                isinstance(k, str) and (k.endswith("_absmax") or k.startswith("absmax"))
                for k in st)):
            return True
    return False


def _is_state_tensor(key, value):
    return isinstance(value, torch.Tensor) and key != "step"


def state_dict(opt, base):
    """bitsandbytes' layout for its named classes: the quantization state of each param
    nested under BNB_WRAP; `base` is torch's state dict."""
    if not opt._fo_bnb_names:
        return base
    out = dict(base)
    out["state"] = {}
    for index, st in base["state"].items():
        st = dict(st)
        wrapped = {k: st.pop(k) for k in list(st) if _is_state_tensor(k, st[k])}
        if wrapped:
            st[BNB_WRAP] = wrapped
        if "step" in st:  # bitsandbytes counts in a Python int
            st["step"] = int(st["step"])
        out["state"][index] = st
    return out


def load_state_dict(opt, state_dict, load):
    """Load a state dict (ours, or bitsandbytes' for its named classes): the state
    tensors keep their dtype and move to their param's device; the rest goes through
    torch.optim's `load` (the base class's load_state_dict)."""
    groups = opt.param_groups
    saved_groups = state_dict["param_groups"]
    if len(groups) != len(saved_groups) or any(
            len(g["params"]) != len(s["params"]) for g, s in zip(groups, saved_groups)):
        load(state_dict)  # torch's messages for mismatched groups
        return
    id_map = dict(zip(chain.from_iterable(g["params"] for g in saved_groups),
                      chain.from_iterable(g["params"] for g in groups)))
    plain, tensors = {}, {}
    for index, st in state_dict["state"].items():
        st = dict(st)
        st.update(st.pop(BNB_WRAP, {}))
        tensors[index] = {k: st.pop(k) for k in list(st) if _is_state_tensor(k, st[k])}
        plain[index] = st
    load({**state_dict, "state": plain})
    defaults = opt.spec.group_defaults(torch=True)
    for group in opt.param_groups:  # bitsandbytes' groups lack fusedopt's options
        for key, value in defaults.items():
            group.setdefault(key, value)
    for index, values in tensors.items():
        p = id_map.get(index)
        if p is None:
            continue
        st = opt.state[p]
        for key, value in values.items():
            st[key] = value.detach().clone().to(p.device)
        for name in opt.spec.scalars:
            if name in st and not isinstance(st[name], torch.Tensor):
                st[name] = torch.tensor(float(st[name]), dtype=_scalar_dtype())


# --- bitsandbytes' names ---------------------------------------------------------------------


def bnb_class(base, name, default_wd, doc_name):
    """`Adam8bit` / `AdamW8bit` over fusedopt.torch's Adam class `base`."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=default_wd,
                 amsgrad=False, optim_bits=32, args=None, min_8bit_size=4096, is_paged=False):
        if amsgrad:
            raise ValueError(f"{name} does not support amsgrad=True")
        if optim_bits != 32:
            raise ValueError(f"{name} only supports optim_bits=32 (default value for "
                             "compatibility)")
        if args is not None:
            raise ValueError(f"{name}: args (bitsandbytes' configuration object) is not "
                             "supported; pass min_8bit_size")
        if is_paged:
            raise ValueError(f"{name}: paged optimizer state is not supported")
        base.__init__(self, params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                      optim_bits=8, min_8bit_size=min_8bit_size)
        # bitsandbytes' "adam" decays the weights decoupled, as AdamW
        for group in self.param_groups:
            group["decoupled_weight_decay"] = True
        self.defaults["decoupled_weight_decay"] = True

    __init__.__doc__ = f"See `{name}`."
    doc = f"""{doc_name} with 8-bit state, under bitsandbytes' name and signature: replace
    ``bitsandbytes.optim.{name}`` by ``fusedopt.torch.{name}`` and keep the training loop.

    The update is Adam's with decoupled weight decay
    :math:`p \\leftarrow p (1 - \\eta\\lambda)`, as bitsandbytes' {name} computes it
    (for Adam8bit too). Each state of a param with at least `min_8bit_size` elements is
    kept as uint8 codes of bitsandbytes' dynamic quantization maps with one float32
    scale per block of 256 elements, decoded, updated and encoded back in one fused pass
    (CPU and CUDA); smaller params keep float32 state.

    Parameters
    ----------
    params : iterable of torch.Tensor or dict
        The parameters, or param groups.
    lr : float, default 1e-3
        Learning rate.
    betas : tuple[float, float], default (0.9, 0.999)
        Decay rates of the moment estimates.
    eps : float, default 1e-8
        Added to the denominator.
    weight_decay : float, default {default_wd!r}
        Decoupled weight decay.
    amsgrad : bool, default False
        Must be False (as bitsandbytes').
    optim_bits : int, default 32
        Must be 32 (as bitsandbytes': the state is 8-bit regardless).
    args : None
        bitsandbytes' configuration object: not supported (must be None).
    min_8bit_size : int, default 4096
        Params with fewer elements keep float32 state.
    is_paged : bool, default False
        Must be False (paged state is not supported).

    Notes
    -----
    State per param, under bitsandbytes' names: ``step`` (an int), ``state1`` and
    ``state2`` (uint8 codes of the first and second moments, or float32 for small
    params), ``absmax1`` and ``absmax2`` (float32 block scales), ``qmap1`` and
    ``qmap2`` (the signed and unsigned code tables). `state_dict` nests the tensors
    under ``"{BNB_WRAP}"`` as bitsandbytes does; its state dicts and
    bitsandbytes' load into each other.

    Examples
    --------
    >>> import torch
    >>> from fusedopt.torch import {name}
    >>> model = torch.nn.Linear(4096, 2)
    >>> opt = {name}(model.parameters(), lr=1e-3)
    >>> model(torch.ones(3, 4096)).sum().backward()
    >>> opt.step()
    >>> opt.zero_grad()
    """
    return type(name, (base,), {"__init__": __init__, "__doc__": doc, "_fo_bnb_names": True,
                                "__module__": "fusedopt.torch"})


# The tables of both maps, as bitsandbytes' qmap1 (signed) and qmap2 (unsigned)
QMAP_SIGNED = np.asarray(_cpu.quant_tables(True)["code"])
QMAP_UNSIGNED = np.asarray(_cpu.quant_tables(False)["code"])
