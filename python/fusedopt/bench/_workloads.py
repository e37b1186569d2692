"""Workloads of the step benchmark: parameter shapes, random data, and the sample checked.

    1x16M     one tensor of 16M elements
    1000x16K  1000 tensors of 16K elements (about the same total)
    gpt2      GPT-2 small's parameter list: 148 tensors, 124M elements
    tiny      10000 tensors of 4 elements: the host cost per tensor
"""

from __future__ import annotations

import math

import numpy as np

M = 1 << 20
K = 1 << 10


def gpt2_small_shapes(layers=12, d=768, vocab=50257, ctx=1024):
    """Parameter shapes of GPT-2 small, in the order of its state dict."""
    shapes = [(vocab, d), (ctx, d)]  # token and position embeddings
    for _ in range(layers):
        shapes += [(d,), (d,),  # ln_1 weight, bias
                   (d, 3 * d), (3 * d,),  # attn.c_attn
                   (d, d), (d,),  # attn.c_proj
                   (d,), (d,),  # ln_2 weight, bias
                   (d, 4 * d), (4 * d,),  # mlp.c_fc
                   (4 * d, d), (d,)]  # mlp.c_proj
    return shapes + [(d,), (d,)]  # ln_f weight, bias


WORKLOADS = {
    "1x16M": lambda: [(16 * M,)],
    "1000x16K": lambda: [(16 * K,)] * 1000,
    "gpt2": gpt2_small_shapes,
    "tiny": lambda: [(4,)] * 10000,
}


class Workload:
    """Shapes and one set of random initial params and gradients, shared read-only by
    every implementation (each one copies them into arrays of its own)."""

    def __init__(self, name, dtype, seed):
        self.name = name
        self.dtype = np.dtype(dtype)
        self.shapes = WORKLOADS[name]()
        rng = np.random.default_rng(seed)
        self.params = [_uniform(rng, s, self.dtype) for s in self.shapes]
        self.grads = [_uniform(rng, s, self.dtype) for s in self.shapes]
        self.picks = _sample(self.shapes, rng)

    @property
    def ntensors(self):
        return len(self.shapes)

    @property
    def numel(self):
        return sum(math.prod(s) for s in self.shapes)

    def bytes_per_step(self, nstates, first_pass=0):
        """The ideal traffic of a step: p, g and the states read once, p and the states
        written once; a two-pass step (LAMB, LARS) also reads `first_pass` arrays before
        (p, g and the states its norms need)."""
        return self.numel * self.dtype.itemsize * ((2 + nstates) + (1 + nstates) + first_pass)


def _uniform(rng, shape, dtype):
    """Random values in [-1, 1): several times faster to draw than normal ones, which
    matters for GPT-2's 124M elements."""
    a = rng.random(shape, dtype=dtype)
    a -= 0.5
    a *= 2
    return a


def _sample(shapes, rng, tensors=8, elements=4096):
    """(tensor index, flat element indices) pairs checked against the reference: the first
    and last tensor and some others; all elements of small tensors, else a random set that
    includes both ends."""
    n = len(shapes)
    chosen = {0, n - 1}
    if n > 2:
        chosen.update(int(i) for i in rng.choice(n, size=min(n, tensors) - 2, replace=False))
    picks = []
    for i in sorted(chosen):
        size = math.prod(shapes[i])
        if size <= elements:
            idx = np.arange(size)
        else:
            idx = np.unique(np.concatenate([[0, size - 1], rng.integers(0, size, elements)]))
        picks.append((i, idx))
    return picks
