"""Flat parameter, gradient and state buffers for `fusedopt.torch` (``flat=True``).

The params of one param group that share a device and a dtype move into one contiguous
buffer: each stays the same `torch.nn.Parameter`, its `.data` a view of the buffer.
Their gradients are views of a second buffer, and every state buffer of the group is a
third, with per-param views in `optimizer.state` (so state dicts keep torch's
per-param layout). A step over such a bucket is one kernel call over contiguous memory:
its only per-tensor work is a check that the params and gradients are still the views
(addresses, identities).

Params with 8-bit state (``optim_bits=8``) get buckets of their own, in which each param
starts on a block boundary (a multiple of `_quant.BLOCK` elements): a block of codes
then never holds two params, and each param's block scales are a view of the bucket's
scale buffer too. The padding between params is zero in every buffer (zero params and
gradients, the zero code), which the update leaves zero, so that a flat step gives the
same bits as the per-tensor one.
"""

from __future__ import annotations

from operator import is_

import torch

from . import _foreign, _quant


class Bucket:
    """The params of one group with one (device, dtype), in one buffer."""

    def __init__(self, params, indices, quantized=False):
        self.params, self.indices = list(params), list(indices)
        self.quantized = quantized  # 8-bit state: each param starts on a block boundary
        first = self.params[0]
        self.numels = [p.numel() for p in self.params]
        align = _quant.BLOCK if quantized else 1
        self.starts, total = [], 0
        for n in self.numels:
            self.starts.append(total)
            total = -(-(total + n) // align) * align
        kind = dict(dtype=first.dtype, device=first.device)
        self.data = torch.zeros(total, **kind) if quantized else torch.empty(total, **kind)
        self.grad = torch.zeros(total, **kind)
        self.param_views, self.grad_views = [], []
        with torch.no_grad():
            for p, view, gview in zip(self.params, self._views(self.data),
                                      self._views(self.grad)):
                view.copy_(p.detach())
                if p.grad is not None:
                    gview.copy_(p.grad.detach())
                p.data = view
                self.param_views.append(view)
                self.grad_views.append(gview)
                if p.grad is not None or p.requires_grad:
                    p.grad = gview
        self.ptrs = self._ptrs()
        self.states = {}  # state name -> its flat buffer (8-bit state: its codes)
        self.state_views = {}  # state name -> the per-param views
        self.scales = {}  # 8-bit state name -> its flat block scales
        self.scale_views = {}  # 8-bit state name -> the per-param views of the scales
        self.kept = None  # the bucket's plan, kept between steps

    def _views(self, flat):
        return [flat[a:a + n].view(p.shape)
                for p, a, n in zip(self.params, self.starts, self.numels)]

    def _ptrs(self):
        return _foreign.tensor_addresses(self.params).tobytes()

    def state_view(self, name, position, value, dtype=None):
        """The view of param `position` in the flat buffer of state `name` (made on first
        use, filled with `value`, of `dtype`: default the params')."""
        if name not in self.states:
            dtype = self.data.dtype if dtype is None else dtype
            self.states[name] = torch.full_like(self.data, value, dtype=dtype) if value else \
                torch.zeros_like(self.data, dtype=dtype)
            self.state_views[name] = self._views(self.states[name])
        return self.state_views[name][position]

    def quant_view(self, name, position, zero_code):
        """(codes, scales): the views of param `position` in the flat uint8 codes and
        float32 block scales of 8-bit state `name` (made on first use: `zero_code`, the
        code of 0, and scales of 0, which the padding keeps)."""
        if name not in self.states:
            total = self.data.numel()
            device = self.data.device
            self.states[name] = torch.full((total,), zero_code, dtype=torch.uint8,
                                           device=device)
            self.state_views[name] = self._views(self.states[name])
            scales = self.scales[name] = torch.zeros(_quant.blocks(total), dtype=torch.float32,
                                                     device=device)
            self.scale_views[name] = [
                scales[a // _quant.BLOCK:a // _quant.BLOCK + _quant.blocks(n)]
                for a, n in zip(self.starts, self.numels)]
        return self.state_views[name][position], self.scale_views[name][position]

    def owns_state(self, name, position, tensor, scales=None):
        """Whether `tensor` (and, for 8-bit state, `scales`) is param `position`'s view of
        the bucket's buffers of state `name`."""
        views = self.state_views.get(name)
        if views is None or views[position] is not tensor:
            return False
        if self.quantized:
            return self.scale_views[name][position] is scales
        return scales is None

    def holds_params(self):
        """Whether every param still lives in the buffer (its `.data` the view)."""
        return self._ptrs() == self.ptrs

    def check_params(self, owner):
        """RuntimeError when a param no longer lives in the buffer (the model was moved
        with `.to()`, or a param's `.data` replaced, after the optimizer was built)."""
        if self._ptrs() == self.ptrs:
            return
        for i, (p, view) in enumerate(zip(self.params, self.param_views)):
            if p.data_ptr() != view.data_ptr() or p.dtype != view.dtype or \
                    p.device != view.device:
                raise RuntimeError(
                    f"{owner}(flat=True): a param ({tuple(p.shape)}, {p.dtype}, {p.device}) no "
                    f"longer lives in the optimizer's flat buffer ({view.dtype}, "
                    f"{view.device}): the model was moved (.to(), .cuda(), .double()) or a "
                    "param's .data replaced after the optimizer was built; build the "
                    "optimizer after moving the model")
        self.ptrs = self._ptrs()

    def gather_grads(self, grads):
        """Make every gradient the buffer's view: a gradient that was replaced (a new
        tensor from a module's zero_grad + backward, or an assignment) is copied into its
        view, which becomes `.grad` again. False when some param has no gradient (the
        step then takes the per-tensor path, which skips it, as torch does)."""
        if all(map(is_, grads, self.grad_views)):
            return True
        if any(g is None for g in grads):
            return False
        with torch.no_grad():
            for p, g, view in zip(self.params, grads, self.grad_views):
                if g is not view:
                    view.copy_(g)
                    p.grad = view
        return True

    def zero_grad(self, set_to_none):
        """Zero the gradient buffer in one pass and point every trainable param's `.grad`
        at its view again; params that do not require gradients get None (they are
        skipped by a step, as torch skips them)."""
        self.grad.zero_()
        for p, view in zip(self.params, self.grad_views):
            if p.requires_grad:
                if p.grad is not view:
                    p.grad = view
            elif p.grad is not None:
                p.grad = None if set_to_none else p.grad.zero_()


def buckets(group_params, quantizes=None):
    """The buckets of one group: its params by (device, dtype), in first-seen order;
    with `quantizes` (param -> whether it keeps 8-bit state), those that do in buckets
    of their own."""
    order = {}
    for i, p in enumerate(group_params):
        quantized = bool(quantizes is not None and quantizes(p))
        order.setdefault((p.device, p.dtype, quantized), []).append(i)
    return [Bucket([group_params[i] for i in idx], idx, key[2]) for key, idx in order.items()]


def check_disjoint(params, owner):
    """ValueError when two params share memory: a flat buffer would untie them."""
    spans = sorted((p.data_ptr(), p.data_ptr() + p.numel() * p.element_size(), i)
                   for i, p in enumerate(params) if p.numel())
    for (s0, e0, i), (s1, _, j) in zip(spans, spans[1:]):
        if s1 < e0:
            raise ValueError(f"{owner}(flat=True): params {min(i, j)} and {max(i, j)} share "
                             "memory; a flat buffer would untie them")
