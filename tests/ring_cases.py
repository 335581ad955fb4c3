"""Programs and full inputs shared by the ring tests (tests/test_ring.py: spawned processes; tests/test_ring_blocks.py:
the block program, plan and cost in one process)."""
from __future__ import annotations

import os

import torch

import moa

F64 = torch.float64
HERE = os.path.dirname(os.path.abspath(__file__))
EXAMPLES = os.path.join(os.path.dirname(HERE), "examples")

# in no example: cross attention (n != m) with bottom-right causal plus 3 sink keys, softcapped scores with a
# per-query temperature, a per-key bias that travels with K/V, and a replicated per-head slope times (j - i)
NOVEL = """\
dim h, n, m, d, e
param c = 20.0
in Q[h, n, d], K[h, m, d], V[h, m, e], kb[m], tq[n], sl[h]
S[a, i, j] = where(j < 3 or j <= i + m - n, c * tanh(dot(Q[a, i], K[a, j]) * tq[i] / c) + kb[j] + sl[a] * (j - i), -inf)
out O[a] = softmax(S[a], axis=-1) @ V[a]
"""

# name -> (source, params, dims, mask(i, j, dims) on global indices for the expected block skips, or None)
PROGRAMS = {
    "sdpa": ("sdpa.moa", {}, {"n": 40, "d": 8, "e": 8}, None),
    "causal": ("causal.moa", {}, {"n": 48, "d": 8, "e": 8}, lambda i, j, x: j <= i),
    "sliding_window": ("sliding_window.moa", {"w": 9}, {"n": 45, "d": 8, "e": 8},
                       lambda i, j, x: (j <= i) & (i - j <= 9)),
    "document_mask": ("document_mask.moa", {}, {"n": 42, "d": 8, "e": 8}, None),
    "novel": (NOVEL, {}, {"h": 2, "n": 30, "m": 44, "d": 8, "e": 8}, None),
    "pi_attention": ("pi_attention.moa", {"k": 5, "s": 4, "T": 3}, {"n": 40, "d": 8, "e": 8},
                     lambda i, j, x: ((j <= i) & (i - j < 5)) | ((j < i) & ((i - j) % 4 == 0) & ((i - j) // 4 <= 3))),
    "sigmoid": ("sigmoid.moa", {}, {"n": 44, "d": 8, "e": 8}, lambda i, j, x: j <= i),   # a plain sum: partials add
}


def _compile(name, table=None):
    src, params, _, _ = (table or PROGRAMS)[name]
    return moa.compile(os.path.join(EXAMPLES, src) if src.endswith(".moa") else src, **params)


def _inputs(name, seed=0):
    """Full float64 inputs of a program (deterministic)."""
    g = torch.Generator().manual_seed(seed)
    x = PROGRAMS[name][2]
    n, m, d, e, h = x["n"], x.get("m", x["n"]), x["d"], x["e"], x.get("h", 1)
    r = lambda *s: torch.randn(*s, generator=g, dtype=F64)
    if name == "novel":  # a batch axis of 2 on Q, K, V (kb, tq, sl broadcast)
        return {"Q": r(2, h, n, d), "K": r(2, h, m, d), "V": r(2, h, m, e), "kb": r(m), "tq": 1 + r(n).abs(),
                "sl": r(h).abs() / 4}
    out = {"Q": r(n, d), "K": r(m, d), "V": r(m, e)}
    if name == "pi_attention":
        out["wg"] = r(d)
    if name == "document_mask":
        out["doc"] = torch.sort(torch.randint(0, 5, (n,), generator=g)).values
    return out


def _bounds(length, world):
    return [length * r // world for r in range(world + 1)]


# normalize(...) @ V without a linear form (no mask; a window mask): the K/V rotation, partials merged by sums of
# (z O, z); on 3 uneven ranks (one holding a single row), run with the halo job to save a launch
NORM = {
    "norm_plain": "dim n, d, e\nin Q[n, d], K[n, d], V[n, e]\nA = (Q @ K.T) ^ 2\nout O = normalize(A, axis=-1) @ V\n",
    "norm_window": "dim n, d, e\nin Q[n, d], K[n, d], V[n, e]\n"
                   "A[i, j] = where(j <= i and i - j < 6, dot(Q[i], K[j]) ^ 2, 0)\n"
                   "out O[i] = normalize(A[i], axis=-1) @ V\n",
}
