"""The EMA of the params (``ema_decay=``) for the `fusedopt.torch` optimizers: the same
semantics as the NumPy classes (`fusedopt._ema`), over torch's param state. A param's
average is ``opt.state[p]["ema"]``, a tensor like the param, so it travels in state
dicts with the rest of the state."""

from __future__ import annotations

from contextlib import contextmanager

import torch

from . import _ema, _precision


class TorchEma:
    """What an optimizer of `fusedopt.torch` needs for ``ema_decay``; a step calls
    `_ema_begin`, passes `_ema_options(params)` to each plan of updated params, and
    after validating every plan calls `_ema_install` and runs `_ema_rest_plan`'s plan
    after its own."""

    ema_decay = None
    _ema_swapped = False
    _ema_pending: dict = {}
    _ema_now = None

    def _ema_init(self, ema_decay):
        if ema_decay is not None:
            _precision.check_ema_decay("ema_decay", ema_decay)
        self.ema_decay = ema_decay

    def _ema_begin(self):
        if self._ema_swapped:
            raise RuntimeError("step: the averages are swapped into the params (swap_ema); "
                               "swap them back before stepping")
        self._ema_pending = {}
        self._ema_now = None
        if self.ema_decay is not None:
            # AveragedModel copies the params at its first update
            started = any("ema" in st for st in self.state.values())
            self._ema_now = self.ema_decay if started else 0.0

    def _ema_of(self, p):
        st = self.state.get(p)
        ema = st.get("ema") if st else None
        if ema is None:
            ema = self._ema_pending.get(p)
            if ema is None:
                ema = self._ema_pending[p] = p.detach().clone(
                    memory_format=torch.contiguous_format)
        return ema

    def _ema_options(self, params):
        """The step options that add the EMA slot for `params`, or None."""
        if self._ema_now is None:
            return None
        return _precision.Options("step", {"ema": [self._ema_of(p) for p in params],
                                           "ema_decay": self._ema_now})

    def _ema_rest_plan(self, plans):
        """The plan that moves the averages of the params the plans do not update."""
        if self._ema_now is None:
            return None
        stepped = {id(p) for plan in plans for p in plan.params}
        rest = [p for group in self.param_groups for p in group["params"]
                if id(p) not in stepped and "ema" in self.state.get(p, ())]
        if not rest:
            return None
        return _ema.plan([self.state[p]["ema"] for p in rest], rest, self._ema_now, op="step")

    def _ema_install(self):
        for p, ema in self._ema_pending.items():
            self.state[p]["ema"] = ema
        self._ema_pending = {}

    @torch.no_grad()
    def swap_ema(self) -> None:
        """Exchange every param that has an average with its average, in place (call it
        again to swap back). While the averages are in the params, `step` refuses to
        run. Params without an average (no state yet) are their own average and stay."""
        for group in self.param_groups:
            for p in group["params"]:
                ema = self.state.get(p, {}).get("ema")
                if ema is not None:
                    saved = p.detach().clone()
                    p.copy_(ema)
                    ema.copy_(saved)
        self._ema_swapped = not self._ema_swapped

    @contextmanager
    def averaged(self):
        """A context in which the params hold their averages (``ema_decay``), for
        evaluation; the params are swapped back on leaving it.

        Examples
        --------
        >>> with opt.averaged():        # doctest: +SKIP
        ...     val_loss = evaluate(model)
        """
        self.swap_ema()
        try:
            yield self
        finally:
            self.swap_ema()
