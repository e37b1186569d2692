"""The EMA of the params (``ema_decay=``) for the `fusedopt.torch` optimizers: the same
semantics as the NumPy classes (`fusedopt._ema`), over torch's param state. A param's
average is ``opt.state[p]["ema"]``, a tensor like the param, so it travels in state
dicts with the rest of the state.

With ``flat=True`` a param's average is its view of one more flat buffer of its
bucket (state ``"ema"``), so a step over the bucket moves every average in its one
kernel call. DTensor params (FSDP2) keep DTensor averages, stepped on their local
shards like the params.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

from . import _ema, _foreign, _precision


class TorchEma:
    """What an optimizer of `fusedopt.torch` needs for ``ema_decay``. A step calls
    `_ema_begin`; gives each plan of updated params the options of `_ema_options` (or
    the averages of `_ema_list`, aligned with the params); once every plan is
    validated, plans the averages of the params it does not update
    (`_ema_rest_plan`), calls `_ema_install` and runs that plan after its own."""

    ema_decay = None
    _ema_swapped = False
    _ema_pending: dict = {}
    _ema_now = None

    def _ema_init(self, ema_decay):
        if ema_decay is not None:
            _precision.check_ema_decay("ema_decay", ema_decay)
        self.ema_decay = ema_decay

    def __getstate__(self):
        # torch.optim's keeps only defaults, state and param groups: a copy keeps the
        # EMA's settings too
        state = super().__getstate__()
        state["ema_decay"] = self.ema_decay
        state["_ema_swapped"] = self._ema_swapped
        return state

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
        """A param's average; one made for this step (a copy of the param) enters the
        state once the step is validated."""
        st = self.state.get(p)
        ema = st.get("ema") if st else None
        if ema is None:
            ema = self._ema_pending.get(p)
            if ema is None:
                where = getattr(self, "_fo_where", {}).get(id(p))
                with torch.no_grad():
                    if where is not None:  # flat=True: a view of the bucket's EMA buffer
                        ema = where[0].state_view("ema", where[1], 0.0)
                        ema.copy_(p)
                    else:
                        ema = p.detach().clone(memory_format=torch.contiguous_format)
                self._ema_pending[p] = ema
        return ema

    def _ema_list(self, params):
        """The averages of `params` (torch params; DTensors' as their local shards, which
        the kernels update), or None without ``ema_decay``."""
        if self._ema_now is None:
            return None
        return _foreign.local_shards([self._ema_of(p) for p in params], torch, "step", "ema")

    def _ema_options(self, params, emas=None):
        """The step options that add the EMA slot for `params` (or the averages `emas`
        of `_ema_list`), or None without ``ema_decay``."""
        if self._ema_now is None:
            return None
        if emas is None:
            emas = self._ema_list(params)
        return _precision.Options("step", {"ema": emas, "ema_decay": self._ema_now})

    def _ema_rest_plan(self, stepped):
        """The plan that moves the averages of the params that have one and that this
        step does not update (`stepped`: ids of those it does), or None."""
        if self._ema_now is None:
            return None
        rest = [p for group in self.param_groups for p in group["params"]
                if id(p) not in stepped and "ema" in self.state.get(p, ())]
        if not rest:
            return None
        emas = _foreign.local_shards([self.state[p]["ema"] for p in rest], torch, "step", "ema")
        return _ema.plan(emas, _foreign.local_shards(rest, torch, "step", "params"),
                         self._ema_now, op="step")

    def _ema_install(self):
        """Put this step's new averages into the state; whether there were any."""
        made = bool(self._ema_pending)
        for p, ema in self._ema_pending.items():
            self.state[p]["ema"] = ema
        self._ema_pending = {}
        return made

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

    def _fo_commit(self, fresh, counted, plans):
        """The end of a validated step of the hand-written classes (SparseAdam,
        Adafactor): their new state, the averages, the step counts of the `counted`
        params, then the kernels (and the averages of the params without a gradient)."""
        ema_plan = self._ema_rest_plan({id(p) for p in counted})
        for p, state in fresh.items():
            self.state[p].update(state)
        self._ema_install()
        for p in counted:
            self.state[p]["step"] += 1
        for plan in plans:
            plan.run()
        if ema_plan is not None:
            ema_plan.run()
        if counted:
            torch.autograd.graph.increment_version(counted)

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
