"""The fused Triton kernels (issue 3), run on CPU tensors through Triton's interpreter.

Every kernel is checked against two things that share no code with codegen: the program's own float64 meaning
(``k.reference``, the IR evaluated unfused) and an independent float64 oracle from ``tests/oracles.py``
(eager ``flex_attention`` / ``F.scaled_dot_product_attention`` / explicit materialised formulas, mapping in
examples/README.md). Errors are scale-aware: ``max|out - ref| / max(1, max|ref|)``.

What is covered
- every softmax-family example in float64 (O and the log-sum-exp), power / gated power / linear / linear-relu
  (quadratic form) and BLA in float64; every example is covered (checked);
- ragged n != m in {1, 17, 100, 257}; batch and head axes with broadcasting; non-contiguous inputs; rows with
  no admissible key (O = 0, lse = -inf); logits of magnitude 1e4 in fp32 / fp16 / bf16;
- fp32 / fp16 / bf16 against the float64 reference of the same (rounded) inputs (and fp16 normalised weights
  beyond the fp16 range);
- programs that are in no example, and programs outside codegen's support (``moa.UnsupportedError``);
- golden generated source (``MOA_UPDATE_GOLDEN=1`` rewrites tests/golden/);
- the storage theorem (an instrumented run stores only the output and lse; loads only the inputs);
- hostile but valid identifiers (renamed injectively, never pasted verbatim).

Tolerances (max abs error relative to max(1, max|ref|); the reference is float64 on the low-precision inputs
converted exactly to float64). Measured on this suite's inputs (n <= 100, d = 16, e = 24, N(0, 1) data) as the
worst case over every example (softmax family, power / linear quadratic forms, BLA); the tolerances leave a
margin of about 10x or more:

| dtype    | accumulation             | measured worst | tolerance | logits ~ 1e4: measured / tolerance |
|----------|--------------------------|----------------|-----------|------------------------------------|
| float64  | float64                  | 1.5e-15        | 1e-12     |                                    |
| float32  | float32 (ieee tl.dot)    | 5.3e-7         | 2e-5      | 1.6e-4 / 1e-2                      |
| float16  | float32, P / V in fp16   | 5.1e-4         | 5e-3      | 2.3e-4 / 1e-2                      |
| bfloat16 | fp32 on CPU, cast back   | 3.0e-3         | 3e-2      | 1.9e-3 / 3e-2                      |

fp16 / bf16 errors are dominated by rounding the probabilities to the input dtype for the P @ V product and by
rounding the output itself (half an ulp: 2^-11 and 2^-8 relative). With logits of magnitude 1e4 the absolute
rounding error of one score (~|s| 2^-24 in fp32) reaches 1e-3 and moves each softmax weight by ~1e-3
relative, hence the looser tolerance there (the claim tested is mainly: no inf / NaN, finite lse).
"""
from __future__ import annotations

import ast
import difflib
import json
import math
import os
import re
import subprocess
import sys
import zlib
from dataclasses import dataclass
from pathlib import Path

import moa  # first: it turns on Triton's interpreter before triton is imported
import moa.runtime.launch as kernel_mod
from moa.runtime.tiling import Config
import pytest
import torch
from moa.runtime.measure import instrument

try:  # pytest's default (prepend) import mode puts tests/ on sys.path
    import oracles as O
except ImportError:  # pragma: no cover - importlib mode / run from the repository root
    from tests import oracles as O

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
GOLDEN = Path(__file__).resolve().parent / "golden"
F64 = torch.float64
NEG_INF = float("-inf")

D, E = 16, 24          # head dims: e = 24 is not a power of two (padding lanes of the value tile)
N = 100                # default query length
TOL64 = 1e-12
TOL = {torch.float32: 2e-5, torch.float16: 5e-3, torch.bfloat16: 3e-2}
TOL_LARGE = {torch.float32: 1e-2, torch.float16: 1e-2, torch.bfloat16: 3e-2}
LOW = [torch.float32, torch.float16, torch.bfloat16]


# ---------------------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------------------


def gen(*key) -> torch.Generator:
    """A generator seeded from the test's own key (stable across runs and xdist workers)."""
    return torch.Generator().manual_seed(zlib.crc32(repr(key).encode()))


def randn(g, *shape, scale=1.0, dtype=F64):
    return (torch.randn(*shape, generator=g, dtype=F64) * scale).to(dtype)


def err(out, ref) -> float:
    """max |out - ref| / max(1, max |ref|); equal infinities count as equal; NaN is an infinite error."""
    out, ref = out.to(F64), ref.to(F64)
    assert out.shape == ref.shape, (tuple(out.shape), tuple(ref.shape))
    if out.numel() == 0:
        return 0.0
    if torch.isnan(out).any() or torch.isnan(ref).any():
        return math.inf
    same_inf = torch.isinf(out) & torch.isinf(ref) & (torch.sign(out) == torch.sign(ref))
    diff = torch.where(same_inf, torch.zeros_like(out), out - ref).abs().max().item()
    finite = ref[torch.isfinite(ref)]
    scale = max(1.0, finite.abs().max().item()) if finite.numel() else 1.0
    return diff / scale


def example(name, **params):
    return moa.compile(EXAMPLES / f"{name}.moa", **params)


def f64(inputs: dict) -> dict:
    return {k: (t.to(F64) if t.is_floating_point() else t) for k, t in inputs.items()}


def cast(inputs: dict, dtype) -> dict:
    return {k: (t.to(dtype) if t.is_floating_point() else t) for k, t in inputs.items()}


# ---------------------------------------------------------------------------------------------------------
# the examples: inputs and independent oracles
# ---------------------------------------------------------------------------------------------------------


@dataclass
class Case:
    name: str                 # example file stem
    params: dict              # compile-time params
    make: object              # g -> inputs dict (float64)
    oracle: object            # inputs -> O (float64), independent of moa
    lse: object = None        # inputs -> lse (float64), or None (no single-softmax lse)
    kind: str = "softmax"     # softmax | norm | bla


def _qkv(g, n=N, m=None, hq=(), hk=None, qscale=1.0, d=D, e=E):
    m = n if m is None else m
    hk = hq if hk is None else hk
    return dict(Q=randn(g, *hq, n, d, scale=qscale), K=randn(g, *hk, m, d), V=randn(g, *hk, m, e))


def _with(g, base, **extra):
    return {**base, **{k: (v(g) if callable(v) else v) for k, v in extra.items()}}


def _sorted_doc(g, n, ndocs=5):
    return torch.sort(torch.randint(0, ndocs, (n,), generator=g)).values


def _cum_gates(g, n):
    return torch.cumsum(-torch.rand(n, generator=g, dtype=F64) * 0.1, 0)


def _qkv_(x):
    return x["Q"], x["K"], x["V"]


SOFTMAX_CASES = [
    Case("sdpa", {}, lambda g: _qkv(g, m=77),
         lambda x: O.sdpa(*_qkv_(x)),
         lambda x: O.flex_oracle(*_qkv_(x), return_lse=True)[1]),
    Case("causal", {}, lambda g: _qkv(g),
         lambda x: O.causal(*_qkv_(x)),
         lambda x: O.causal(*_qkv_(x), return_lse=True)[1]),
    Case("causal_bottom_right", {}, lambda g: _qkv(g, n=77, m=140),
         lambda x: O.causal(*_qkv_(x), bottom_right=True),
         lambda x: O.causal(*_qkv_(x), bottom_right=True, return_lse=True)[1]),
    Case("sliding_window", {"w": 37}, lambda g: _qkv(g),
         lambda x: O.sliding_window(*_qkv_(x), w=37),
         lambda x: O.sliding_window(*_qkv_(x), w=37, return_lse=True)[1]),
    Case("dilated_window", {"w": 50, "r": 3}, lambda g: _qkv(g),
         lambda x: O.dilated_window(*_qkv_(x), w=50, r=3),
         lambda x: O.dilated_window(*_qkv_(x), w=50, r=3, return_lse=True)[1]),
    Case("global_window", {"w": 10}, lambda g: _with(g, _qkv(g), glob=lambda g: torch.rand(N, generator=g) < 0.06),
         lambda x: O.global_window(*_qkv_(x), w=10, glob=x["glob"]),
         lambda x: O.global_window(*_qkv_(x), w=10, glob=x["glob"], return_lse=True)[1]),
    Case("prefix_lm", {"p": 20}, lambda g: _qkv(g),
         lambda x: O.prefix_lm(*_qkv_(x), p=20),
         lambda x: O.prefix_lm(*_qkv_(x), p=20, return_lse=True)[1]),
    Case("document_mask", {}, lambda g: _with(g, _qkv(g), doc=lambda g: _sorted_doc(g, N)),
         lambda x: O.document(*_qkv_(x), doc=x["doc"]),
         lambda x: O.document(*_qkv_(x), doc=x["doc"], return_lse=True)[1]),
    Case("alibi", {}, lambda g: _qkv(g, hq=(4,)),
         lambda x: O.alibi(*_qkv_(x)),
         lambda x: O.alibi(*_qkv_(x), return_lse=True)[1]),
    Case("gqa_alibi", {}, lambda g: _qkv(g, hq=(4,), hk=(2,)),
         lambda x: O.gqa(*_qkv_(x), causal=True, alibi=True),
         lambda x: O.gqa(*_qkv_(x), causal=True, alibi=True, return_lse=True)[1]),
    Case("mqa", {}, lambda g: _qkv(g, m=77, hq=(4,), hk=()),
         lambda x: O.gqa(x["Q"], x["K"][..., None, :, :], x["V"][..., None, :, :]),
         lambda x: O.gqa(x["Q"], x["K"][..., None, :, :], x["V"][..., None, :, :], return_lse=True)[1]),
    Case("softcap", {"c": 2.5}, lambda g: _qkv(g, m=77, qscale=4.0),   # scores up to ~15: the cap matters
         lambda x: O.softcap(*_qkv_(x), c=2.5),
         lambda x: O.softcap(*_qkv_(x), c=2.5, return_lse=True)[1]),
    Case("relative_bias", {}, lambda g: _with(g, _qkv(g, hq=(4,)), bias=lambda g: randn(g, 4, 2 * N - 1)),
         lambda x: O.relative_bias(*_qkv_(x), bias=x["bias"]),
         lambda x: O.relative_bias(*_qkv_(x), bias=x["bias"], return_lse=True)[1]),
    Case("ring_local", {"k": 16}, lambda g: _qkv(g),
         lambda x: O.ring_local(*_qkv_(x), k_win=16),
         lambda x: O.ring_local(*_qkv_(x), k_win=16, return_lse=True)[1]),
    Case("pi_attention", {"k": 16, "s": 7, "T": 5, "bg": 0.3}, lambda g: _with(g, _qkv(g), wg=lambda g: randn(g, D)),
         lambda x: O.pi_attention(*_qkv_(x), x["wg"], k_win=16, s=7, T=5, bg=0.3)),
    Case("pi_attention", {"k": 9, "s": 11}, lambda g: _with(g, _qkv(g), wg=lambda g: randn(g, D)),  # T unbounded
         lambda x: O.pi_attention(*_qkv_(x), x["wg"], k_win=9, s=11, T=None)),
]

NORM_CASES = [
    Case("power", {}, lambda g: _qkv(g), lambda x: O.power_attention(*_qkv_(x), p=2), kind="norm"),
    Case("power", {"p": 4}, lambda g: _qkv(g), lambda x: O.power_attention(*_qkv_(x), p=4), kind="norm"),
    Case("power_gated", {}, lambda g: _with(g, _qkv(g), G=lambda g: _cum_gates(g, N)),
         lambda x: O.power_attention(*_qkv_(x), p=2, G=x["G"]), kind="norm"),
    Case("linear", {}, lambda g: _qkv(g), lambda x: O.linear_attention(*_qkv_(x), eps=0.0), kind="norm"),
    Case("linear_relu", {}, lambda g: _qkv(g),
         lambda x: O.linear_attention(*_qkv_(x), phi=torch.relu, eps=0.0), kind="norm"),
]

BLA_CASES = [   # Blurry Window Attention: its own window-mixing schedule
    Case("bla", {"W": 16, "M": 5}, lambda g: _qkv(g), lambda x: O.bla(*_qkv_(x), W=16, M=5), kind="bla"),
    Case("bla", {"W": 8, "M": 8}, lambda g: _qkv(g, n=37),   # M = W: exactly sliding window with w = W - 1
         lambda x: O.sliding_window(*_qkv_(x), w=7), kind="bla"),
]

ALL_CASES = SOFTMAX_CASES + NORM_CASES + BLA_CASES


def case_id(c: Case) -> str:
    return c.name + "".join(f"-{k}{v}" for k, v in c.params.items())


def compiled(c: Case):
    # the normalised programs also have a linear (chunked-state) form; these tests are about the tiled kernel
    return example(c.name, form="quadratic", **c.params) if c.kind == "norm" else example(c.name, **c.params)


# ---------------------------------------------------------------------------------------------------------
# float64: kernel == reference == independent oracle
# ---------------------------------------------------------------------------------------------------------


def test_every_softmax_example_is_covered():
    stems = {p.stem for p in EXAMPLES.glob("*.moa")}
    covered = {c.name for c in ALL_CASES}
    assert stems <= covered, f"examples without a kernel test: {sorted(stems - covered)}"


@pytest.mark.parametrize("c", SOFTMAX_CASES, ids=case_id)
def test_softmax_family_float64(c: Case):
    x = c.make(gen("f64", case_id(c)))
    k = compiled(c)
    out = k(**x)
    ref = k.reference(**x)
    orc = c.oracle(x)
    assert out.dtype == F64 and out.shape == ref.shape == orc.shape
    assert err(ref, orc) <= TOL64, "the reference disagrees with the oracle"
    assert err(out, ref) <= TOL64
    assert err(out, orc) <= TOL64
    if c.lse is not None:
        o2, lse = k.with_lse(**x)
        assert lse.dtype == F64
        assert err(o2, orc) <= TOL64
        assert err(lse, c.lse(x)) <= TOL64
    else:
        with pytest.raises(moa.UnsupportedError, match="with_lse"):
            k.with_lse(**x)


@pytest.mark.parametrize("c", NORM_CASES + BLA_CASES, ids=case_id)
def test_normalised_and_bla_float64(c: Case):
    x = c.make(gen("f64", case_id(c)))
    k = compiled(c)
    out = k(**x)
    ref = k.reference(**x)
    orc = c.oracle(x)
    assert out.dtype == F64
    assert err(ref, orc) <= TOL64, "the reference disagrees with the oracle"
    assert err(out, ref) <= TOL64
    assert err(out, orc) <= TOL64


# ---------------------------------------------------------------------------------------------------------
# ragged sizes, batch / heads, broadcasting, non-contiguous inputs
# ---------------------------------------------------------------------------------------------------------

RAGGED = [(n, m) for n in (1, 17, 100, 257) for m in (1, 17, 100, 257) if n != m]


@pytest.mark.parametrize("n,m", RAGGED, ids=[f"n{n}-m{m}" for n, m in RAGGED])
@pytest.mark.parametrize("name", ["sdpa", "causal_bottom_right"])
def test_ragged_sizes(name, n, m):
    g = gen("ragged", name, n, m)
    q, kk, v = randn(g, n, 20), randn(g, m, 20), randn(g, m, 12)   # d = 20, e = 12: padded head tiles
    k = example(name)
    o, lse = k.with_lse(Q=q, K=kk, V=v)
    if name == "sdpa":
        o_ref, lse_ref = O.masked_softmax_attention(q, kk, v, return_lse=True)
        assert err(k(Q=q, K=kk, V=v), O.sdpa(q, kk, v)) <= TOL64
    else:
        o_ref, lse_ref = O.causal(q, kk, v, bottom_right=True, return_lse=True)
    assert o.shape == (n, 12) and lse.shape == (n,)
    assert err(o, o_ref) <= TOL64
    assert err(lse, lse_ref) <= TOL64
    assert err(o, k.reference(Q=q, K=kk, V=v)) <= TOL64


def test_batch_and_heads_broadcast():
    g = gen("batch")
    k = example("causal")
    q = randn(g, 2, 3, 50, D)
    # K / V without the batch axis; with a size-1 batch axis; Q without any leading axis
    for kk, v in [(randn(g, 3, 50, D), randn(g, 3, 50, E)), (randn(g, 1, 3, 50, D), randn(g, 1, 3, 50, E))]:
        out = k(Q=q, K=kk, V=v)
        assert out.shape == (2, 3, 50, E)
        assert err(out, O.causal(q, kk, v)) <= TOL64
    q1, kk, v = randn(g, 50, D), randn(g, 2, 3, 50, D), randn(g, 2, 3, 50, E)
    out, lse = k.with_lse(Q=q1, K=kk, V=v)
    o_ref, lse_ref = O.causal(q1, kk, v, return_lse=True)
    assert out.shape == (2, 3, 50, E) and lse.shape == (2, 3, 50)
    assert err(out, o_ref) <= TOL64 and err(lse, lse_ref) <= TOL64


def test_batch_with_program_heads():
    g = gen("batch-heads")
    # GQA: batch axis on Q only, the kv heads broadcast over it
    k = example("gqa_alibi")
    q, kk, v = randn(g, 2, 4, 40, D), randn(g, 2, 40, D), randn(g, 2, 40, E)
    out = k(Q=q, K=kk, V=v)
    assert out.shape == (2, 4, 40, E)
    assert err(out, O.gqa(q, kk.expand(2, 2, 40, D), v.expand(2, 2, 40, E), causal=True, alibi=True)) <= TOL64
    # relative bias: the bias table shared by the batch
    k = example("relative_bias")
    x = dict(Q=randn(g, 3, 4, 30, D), K=randn(g, 3, 4, 30, D), V=randn(g, 3, 4, 30, E), bias=randn(g, 4, 59))
    assert err(k(**x), O.relative_bias(*_qkv_(x), bias=x["bias"].expand(3, 4, 59))) <= TOL64
    # document ids per batch row, broadcast over a head axis the program does not name
    k = example("document_mask")
    doc = torch.sort(torch.randint(0, 4, (2, 1, 60), generator=g), dim=-1).values
    x = dict(Q=randn(g, 2, 3, 60, D), K=randn(g, 2, 3, 60, D), V=randn(g, 2, 3, 60, E), doc=doc)
    assert err(k(**x), O.document(*_qkv_(x), doc=doc.expand(2, 3, 60))) <= TOL64
    # PiAttention: a gate vector per head
    k = example("pi_attention", k=8, s=5, T=3)
    x = dict(Q=randn(g, 2, 3, 60, D), K=randn(g, 2, 3, 60, D), V=randn(g, 2, 3, 60, E), wg=randn(g, 3, D))
    o = k(**x)
    assert o.shape == (2, 3, 60, E)
    assert err(o, O.pi_attention(*_qkv_(x), x["wg"].expand(2, 3, D), k_win=8, s=5, T=3)) <= TOL64


def test_noncontiguous_inputs():
    g = gen("strides")
    k = example("causal")
    # [B, n, H, d] layout seen as [B, H, n, d]; V stored transposed
    q = randn(g, 2, 50, 3, D).transpose(1, 2)
    kk = randn(g, 2, 50, 3, D).transpose(1, 2)
    v = randn(g, 2, 3, E, 50).transpose(-1, -2)
    assert not q.is_contiguous() and not v.is_contiguous()
    o, lse = k.with_lse(Q=q, K=kk, V=v)
    o_ref, lse_ref = O.causal(q, kk, v, return_lse=True)
    assert err(o, o_ref) <= TOL64 and err(lse, lse_ref) <= TOL64
    # slices with a step on both the sequence and the head axis
    big = randn(g, 2, 3, 120, 2 * D)
    q, kk, v = big[..., ::2, ::2], big[..., 1::2, 1::2], randn(g, 2, 3, 60, 3 * E)[..., ::3]
    assert err(k(Q=q, K=kk, V=v), O.causal(q, kk, v)) <= TOL64
    # one interleaved [B, n, 3, H, d] buffer (packed QKV)
    qkv = randn(g, 2, 50, 3, 3, D)
    q, kk, v = (qkv[:, :, t].transpose(1, 2) for t in range(3))
    assert err(k(Q=q, K=kk, V=v), O.causal(q, kk, v)) <= TOL64
    # expanded (stride 0) batch axis
    q, kk, v = randn(g, 50, D).expand(4, 50, D), randn(g, 50, D), randn(g, 50, E)
    assert err(k(Q=q, K=kk, V=v), O.causal(q, kk, v)) <= TOL64
    # GQA with every tensor non-contiguous, a strided bias and strided document ids
    k = example("gqa_alibi")
    q = randn(g, 2, 40, 4, D).transpose(1, 2)
    kk, v = randn(g, 2, 2, 80, D)[:, :, ::2], randn(g, 2, 2, E, 40).transpose(-1, -2)
    assert err(k(Q=q, K=kk, V=v), O.gqa(q, kk, v, causal=True, alibi=True)) <= TOL64
    k = example("relative_bias")
    x = dict(Q=randn(g, 4, 30, D), K=randn(g, 4, 30, D), V=randn(g, 4, 30, E), bias=randn(g, 59, 8).T[::2])
    assert not x["bias"].is_contiguous()
    assert err(k(**x), O.relative_bias(*_qkv_(x), bias=x["bias"])) <= TOL64
    k = example("document_mask")
    doc = torch.sort(torch.randint(0, 4, (120,), generator=g)).values[::2]
    x = dict(Q=randn(g, 60, D), K=randn(g, 60, D), V=randn(g, 60, E), doc=doc)
    assert err(k(**x), O.document(*_qkv_(x), doc=doc)) <= TOL64


# ---------------------------------------------------------------------------------------------------------
# rows with no admissible key
# ---------------------------------------------------------------------------------------------------------

DOC_PAD = """
dim n, d, e
in Q[n, d], K[n, d], V[n, e]
in doc[n]: int
S[i, j] = where(doc[i] == doc[j] and doc[i] >= 0 and j <= i, dot(Q[i], K[j]) / sqrt(d), -inf)
out O = softmax(S, axis=-1) @ V
"""  # doc = -1 marks padding: padding rows attend to nothing

PREFIX_ONLY_TARGET = """
dim n, d, e
param p = 40
in Q[n, d], K[n, d], V[n, e]
S[i, j] = where(i >= p and (j < p or j <= i), dot(Q[i], K[j]) / sqrt(d), -inf)
out O = softmax(S, axis=-1) @ V
"""  # prefix-LM whose prefix rows are not computed: rows i < p have no key (a mask on the row alone)


def _masked_cases():
    g = gen("masked")
    out = []
    for n, m in [(100, 37), (257, 17)]:
        x = _qkv(g, n=n, m=m)
        out.append(("bottom_right-n%d-m%d" % (n, m), example("causal_bottom_right"), x,
                    lambda x: O.causal(*_qkv_(x), bottom_right=True, return_lse=True),
                    torch.arange(n) < n - m))
    doc = torch.tensor([-1] * 7 + [0] * 30 + [-1] * 5 + [1] * 40 + [2] * 10 + [-1] * 8)
    x = _with(g, _qkv(g, n=100), doc=doc)
    out.append(("document-padding", moa.compile(DOC_PAD), x,
                lambda x: O.masked_softmax_attention(
                    *_qkv_(x), mask=lambda i, j: (x["doc"][:, None] == x["doc"][None, :]) & (x["doc"][:, None] >= 0)
                    & (j <= i), return_lse=True),
                doc < 0))
    x = _qkv(g, n=100)
    out.append(("prefix-rows", moa.compile(PREFIX_ONLY_TARGET), x,
                lambda x: O.masked_softmax_attention(*_qkv_(x), mask=lambda i, j: (i >= 40) & ((j < 40) | (j <= i)),
                                                     return_lse=True),
                torch.arange(100) < 40))
    return out


MASKED = _masked_cases()


@pytest.mark.parametrize("label,k,x,oracle,empty", MASKED, ids=[c[0] for c in MASKED])
def test_fully_masked_rows(label, k, x, oracle, empty):
    o, lse = k.with_lse(**x)
    o_ref, lse_ref = oracle(x)
    assert empty.any() and not empty.all()
    assert torch.all(o[empty] == 0), "a row with no admissible key must be exactly 0"
    assert torch.all(lse[empty] == NEG_INF), "a row with no admissible key has lse = -inf"
    assert torch.isfinite(o).all() and torch.isfinite(lse[~empty]).all()
    assert err(o, o_ref) <= TOL64 and err(lse, lse_ref) <= TOL64
    assert err(k(**x), k.reference(**x)) <= TOL64
    for dt in (torch.float32, torch.float16):
        o, lse = k.with_lse(**cast(x, dt))
        assert torch.all(o[empty] == 0) and torch.all(lse[empty] == NEG_INF)
        assert not torch.isnan(o).any() and torch.isfinite(lse[~empty]).all()


def test_pi_attention_skip_branch_empty_rows():
    # rows i < s have no skip key: the skip branch contributes 0, so O = g * local there
    g = gen("pi-empty")
    x = _with(g, _qkv(g, n=40), wg=lambda g: randn(g, D))
    k = example("pi_attention", k=4, s=16, T=2)
    out = k(**x)
    assert torch.isfinite(out).all()
    assert err(out, O.pi_attention(*_qkv_(x), x["wg"], k_win=4, s=16, T=2)) <= TOL64


# ---------------------------------------------------------------------------------------------------------
# low precision
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", LOW, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("c", ALL_CASES, ids=case_id)
def test_low_precision_against_float64(c: Case, dtype):
    x = cast(c.make(gen("low", case_id(c))), dtype)
    k = compiled(c)
    out = k(**x)
    assert out.dtype == dtype
    ref = k.reference(**f64(x))   # the meaning of the program on exactly these (rounded) inputs
    assert torch.isfinite(out).all()
    assert err(out, ref) <= TOL[dtype]


def test_fp16_normalised_weights_beyond_fp16_range():
    # power attention's weights (q . k)^p are not bounded by 1 like softmax probabilities: with fp32
    # accumulation for fp16 inputs, a weight of 65536 (> fp16 max 65504) must not become inf
    k = example("power", form="quadratic")
    q = torch.full((1, 16), 4.0, dtype=torch.float16)      # q . q = 256, weight 256^2 = 65536
    v = torch.ones(1, 16, dtype=torch.float16)
    ref = k.reference(Q=q.to(F64), K=q.to(F64), V=v.to(F64))
    assert torch.all(ref == 1.0)
    out = k(Q=q, K=q, V=v)
    assert torch.isfinite(out).all(), f"fp16 power attention overflows: {out[0, :4].tolist()}"
    assert err(out, ref) <= TOL[torch.float16]


LARGE = ["sdpa", "causal", "causal_bottom_right", "softcap", "alibi", "sliding_window"]


@pytest.mark.parametrize("dtype", LOW, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("name", LARGE)
def test_logits_of_magnitude_1e4(name, dtype):
    g = gen("large", name)
    heads = (4,) if name == "alibi" else ()
    m = 77 if name in ("sdpa", "softcap") else 140 if name == "causal_bottom_right" else N
    x = _qkv(g, n=N, m=m, hq=heads)
    for key in ("Q", "K"):   # rows of norm 200: |q . k| / sqrt(d) up to 1e4
        x[key] = x[key] / x[key].norm(dim=-1, keepdim=True) * 200.0
    x = cast(x, dtype)
    k = example(name)
    ref = k.reference(**f64(x))
    scores = (x["Q"].to(F64) @ x["K"].to(F64).transpose(-1, -2)).abs().max().item() / math.sqrt(D)
    assert scores > 7e3
    o, lse = k.with_lse(**x)
    assert o.dtype == dtype and torch.isfinite(o).all()
    assert torch.isfinite(lse).all()
    assert err(o, ref) <= TOL_LARGE[dtype]
    assert err(k(**x), ref) <= TOL_LARGE[dtype]


# ---------------------------------------------------------------------------------------------------------
# programs in no example; programs outside codegen's support
# ---------------------------------------------------------------------------------------------------------

MOD3_COS = """
dim n, m, d, e
in Q[n, d], K[m, d], V[m, e]
S[i, j] = where((i + j) % 3 != 0, dot(Q[i], K[j]) / sqrt(d) * cos(i - j), -inf)
out O = softmax(S, axis=-1) @ V
"""

HEAD_WINDOW = """
dim h, n, d, e
in Q[h, n, d], K[h, n, d], V[h, n, e]
S[a, i, j] = where(j <= i and i - j < 4 * (a + 1), dot(Q[a, i], K[a, j]) / sqrt(d), -inf)
out O[a] = softmax(S[a], axis=-1) @ V[a]
"""  # head a sees a causal window of 4 (a + 1) keys

GATED_TWO_BRANCH = """
dim n, d, e
param w = 5
in Q[n, d], K[n, d], V[n, e], b[n]
S[i, j] = dot(Q[i], K[j]) / sqrt(d)
A[i, j] = where(j <= i and i - j <= w, S[i, j] + b[j], -inf)
B[i, j] = where(j <= i, sigmoid(S[i, j]), 0)
out O[i] = tanh(b[i]) * (softmax(A[i], axis=-1) @ V) + normalize(B[i], axis=-1) @ V
"""  # a softmax branch and a normalised branch mixed by a per-row factor


def test_program_in_no_example_mod3_cos():
    g = gen("mod3")
    x = _qkv(g, n=70, m=90, e=20)
    k = moa.compile(MOD3_COS)
    ref = k.reference(**x)
    orc = O.masked_softmax_attention(*_qkv_(x), mask=lambda i, j: (i + j) % 3 != 0,
                                     score=lambda s, i, j: s * torch.cos((i - j).to(F64)))
    assert err(ref, orc) <= TOL64
    o, lse = k.with_lse(**x)
    assert err(o, orc) <= TOL64
    assert err(lse, O.masked_softmax_attention(*_qkv_(x), mask=lambda i, j: (i + j) % 3 != 0,
                                               score=lambda s, i, j: s * torch.cos((i - j).to(F64)),
                                               return_lse=True)[1]) <= TOL64
    assert err(k(**cast(x, torch.float32)), ref) <= TOL[torch.float32]


def test_program_in_no_example_head_dependent_window():
    g = gen("headwin")
    x = _qkv(g, n=60, hq=(2, 3))    # batch 2, h = 3
    k = moa.compile(HEAD_WINDOW)
    a = torch.arange(3).view(3, 1, 1)
    orc = O.masked_softmax_attention(*_qkv_(x), mask=lambda i, j: (j <= i) & (i - j < 4 * (a + 1)))
    assert err(k.reference(**x), orc) <= TOL64
    assert err(k(**x), orc) <= TOL64


def test_program_in_no_example_two_branches():
    g = gen("two-branch")
    x = _with(g, _qkv(g, n=80), b=lambda g: randn(g, 80))
    k = moa.compile(GATED_TWO_BRANCH)
    q, kk, v, b = x["Q"], x["K"], x["V"], x["b"]
    a = O.masked_softmax_attention(q, kk, v, mask=lambda i, j: (j <= i) & (i - j <= 5),
                                   score=lambda s, i, j: s + b[None, :])
    s = q @ kk.T / math.sqrt(D)
    w = torch.where(torch.arange(80)[None, :] <= torch.arange(80)[:, None], torch.sigmoid(s), torch.zeros_like(s))
    orc = torch.tanh(b)[:, None] * a + (w @ v) / w.sum(-1, keepdim=True)
    assert err(k.reference(**x), orc) <= TOL64
    assert err(k(**x), orc) <= TOL64


UNSUPPORTED = [
    ("scores", "dim n, m, d\nin Q[n, d], K[m, d]\nout S = Q @ K.T / sqrt(d)\n", "softmax"),
    ("rank1", "dim n, d\nin Q[n, d]\nout s = sum(Q, axis=1)\n", "rank"),
    ("probabilities", "dim n, m, d\nin Q[n, d], K[m, d]\nout P = softmax(Q @ K.T, axis=-1)\n", "softmax"),
    ("column-softmax", "dim n, d, e\nin Q[n, d], K[n, d], V[n, e]\nout O = softmax(Q @ K.T, axis=0) @ V\n",
     "softmax"),
    ("max-over-keys", "dim n, d, e\nin Q[n, d], K[n, d], V[n, e]\nout O[i, c] = max(Q[i] @ K.T, axis=0) * V[i, c]\n",
     "softmax"),
    ("reduction-in-score", "dim n, d, e\nin Q[n, d], K[n, d], V[n, e]\n"
     "S[i, j] = dot(Q[i], K[j]) + sum(K[j], axis=0)\nout O = softmax(S, axis=-1) @ V\n", "reduction"),
]


@pytest.mark.parametrize("label,text,construct", UNSUPPORTED, ids=[u[0] for u in UNSUPPORTED])
def test_unsupported_programs_raise_and_reference_works(label, text, construct):
    k = moa.compile(text)   # a valid program: compiling (parse, shapes, DNF) succeeds
    g = gen("unsupported", label)
    shapes = {"Q": (20, 8), "K": (20, 8), "V": (20, 4)}
    x = {nm: randn(g, *shapes[nm]) for nm in k.input_names}
    with pytest.raises(moa.UnsupportedError, match=construct) as info:
        k(**x)
    assert k.output_names[0] in str(info.value)   # names the output it cannot compile
    with pytest.raises(moa.UnsupportedError, match=construct):
        k.source()
    ref = k.reference(**x)   # the meaning is still available
    assert torch.isfinite(ref).all()


# ---------------------------------------------------------------------------------------------------------
# golden generated source
# ---------------------------------------------------------------------------------------------------------

GOLDEN_CASES = ["causal", "sliding_window"]


@pytest.mark.parametrize("name", GOLDEN_CASES)
def test_golden_source(name):
    src = example(name).source(dtype="float16", nbatch=1)
    path = GOLDEN / f"{name}_float16_nbatch1.py"
    if os.environ.get("MOA_UPDATE_GOLDEN") == "1":
        GOLDEN.mkdir(exist_ok=True)
        path.write_text(src)
    assert path.exists(), f"{path} is missing: run with MOA_UPDATE_GOLDEN=1 to create it"
    want = path.read_text()
    if src != want:
        diff = "".join(difflib.unified_diff(want.splitlines(keepends=True), src.splitlines(keepends=True),
                                            fromfile=f"golden/{path.name}", tofile="generated"))
        pytest.fail(f"generated source of {name}.moa changed (MOA_UPDATE_GOLDEN=1 accepts it):\n{diff}")
    ast.parse(src)


@pytest.mark.parametrize("name,kept", [("causal", False), ("sliding_window", False), ("prefix_lm", False),
                                       ("ring_local", False), ("dilated_window", True)])
def test_skip_test_only_where_the_loop_bounds_do_not_imply_it(name, kept):
    """A skip formula made of J_LO > key_hi / J_HI < key_lo (or conjunctions of such bounds, prefix-LM's
    (J_LO >= p) & (J_LO > I_HI) against key_hi = Max(p - 1, I_HI)) is implied by the loop range: no test, the
    loads stay at the loop's top level (pipelined). The dilated window's modular skip can hold inside the range."""
    from moa import intervals as iv

    k = moa.compile(EXAMPLES / f"{name}.moa", schedule="tiled")
    b = k.schedules["O"].branches[0]
    assert iv.skip_implied_by_range(b.skip, b.key_lo, b.key_hi) is not kept
    spec = k.launcher.spec("O", "float16", 0, Config(128, 64), False, k.schedules["O"])
    assert (("iter", 0) in spec.regions.values()) is kept    # a loop whose body is under a skip test
    assert any(ln.strip().endswith("== 0:") for ln in spec.source.splitlines()) is kept


# ---------------------------------------------------------------------------------------------------------
# storage theorem: the kernel writes the output (and lse) and nothing else
# ---------------------------------------------------------------------------------------------------------


class _AllocInto:
    """Stands in for `torch` inside moa.runtime.launch: every torch.empty returns the next pre-allocated byte
    buffer viewed as the requested tensor, so that the instrumented run knows the outputs' addresses up front.
    Any other allocation (a scratch array) exhausts the list and fails the test."""

    def __init__(self, buffers):
        self.buffers = list(buffers)
        self.requests = []

    def __getattr__(self, name):
        return getattr(torch, name)

    def empty(self, *shape, dtype=None, device=None, **kw):
        shape = tuple(shape[0]) if len(shape) == 1 and isinstance(shape[0], (tuple, list, torch.Size)) else shape
        self.requests.append((shape, dtype))
        assert self.buffers, f"the runtime allocated an unexpected array {shape} {dtype}"
        buf = self.buffers.pop(0)
        nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        assert buf.numel() == nbytes, (shape, dtype, buf.numel())
        return buf.view(dtype).view(shape)


STORAGE = [
    ("causal", {}, torch.float16, True, lambda g: _qkv(g, n=100, hq=(2,))),
    ("sliding_window", {"w": 20}, F64, True, lambda g: _qkv(g, n=130)),
    ("gqa_alibi", {}, torch.float32, True, lambda g: _qkv(g, n=50, hq=(2, 4), hk=(2, 2))),
    ("document_mask", {}, F64, True, lambda g: _with(g, _qkv(g, n=90), doc=lambda g: _sorted_doc(g, 90))),
    ("pi_attention", {"k": 8, "s": 5, "T": 4}, F64, False, lambda g: _with(g, _qkv(g, n=70), wg=lambda g: randn(g, D))),
    ("power_gated", {}, torch.float16, False, lambda g: _with(g, _qkv(g, n=70), G=lambda g: _cum_gates(g, 70))),
]


@pytest.mark.parametrize("name,params,dtype,want_lse,make", STORAGE, ids=[s[0] for s in STORAGE])
def test_storage_theorem(monkeypatch, name, params, dtype, want_lse, make):
    x = cast(make(gen("storage", name)), dtype)
    k = moa.compile(EXAMPLES / f"{name}.moa", form="quadratic", **params)
    ref = k.reference(**f64(x))
    out_shape, lse_shape = ref.shape, ref.shape[:-1]
    size = torch.empty((), dtype=dtype).element_size()
    acc = 8 if dtype == F64 else 4
    o_buf = torch.full((math.prod(out_shape) * size,), 0xFF, dtype=torch.uint8)
    l_buf = torch.full((math.prod(lse_shape) * acc,), 0xFF, dtype=torch.uint8)
    k(**x)  # build and load the kernel outside the measured run
    alloc = _AllocInto([o_buf, l_buf] if want_lse else [o_buf])
    monkeypatch.setattr(kernel_mod, "torch", alloc)
    regions = {nm: t for nm, t in x.items()}
    regions.update(OUT=o_buf, LSE=l_buf)
    with instrument(regions=regions) as c:
        res = k.with_lse(**x) if want_lse else k(**x)
    monkeypatch.undo()
    o = res[0] if want_lse else res
    assert o.data_ptr() == o_buf.data_ptr() and not alloc.buffers
    assert c.launches == 1, "one fused kernel per output"
    stored = {nm: c.stores_by_region[nm] for nm in regions}
    assert stored["OUT"] == o_buf.numel(), "every output element is stored exactly once"
    assert stored["LSE"] == (l_buf.numel() if want_lse else 0)
    assert c.dram_bytes_stored == stored["OUT"] + stored["LSE"], "the kernel stores to memory other than O / lse"
    assert all(stored[nm] == 0 for nm in x), "the kernel stores into an input"
    loaded = {nm: c.loads_by_region[nm] for nm in regions}
    assert loaded["OUT"] == 0 and loaded["LSE"] == 0
    extra = c.dram_bytes_loaded - sum(loaded[nm] for nm in x)
    if all(t.is_floating_point() for t in x.values()):
        assert extra == 0, "the kernel loads from memory that is no input"
    else:   # besides the inputs, only the per-tile (min, max) of ids / flags: two per program and key iteration
        keys = ref.shape[-2]
        assert 0 < extra <= 2 * 8 * c.programs * (1 + -(-keys // 16)), "loads from memory that is no input"
    if name == "causal":   # the tutorial schedule: each query tile is read once
        assert loaded["Q"] == x["Q"].numel() * size
    assert err(o, ref) <= TOL.get(dtype, TOL64)


# ---------------------------------------------------------------------------------------------------------
# identifiers: hostile but valid names are renamed, never pasted, and renamed injectively
# ---------------------------------------------------------------------------------------------------------

# Each template names its identifiers as {placeholders}; `names` gives the hostile spelling of each.
HOSTILE = {
    # Python / Triton names as inputs and dims
    "python-triton": (
        "dim {n}, {m}, {d}, {e}\nparam {w} = 7\nin {Q}[{n}, {d}], {K}[{m}, {d}], {V}[{m}, {e}], {b}[{m}]\n"
        "{S}[{i}, {j}] = where({j} <= {i} + {w}, dot({Q}[{i}], {K}[{j}]) / sqrt({d}) + {b}[{j}], -inf)\n"
        "out {Out} = softmax({S}, axis=-1) @ {V}\n",
        dict(n="tl", m="triton", d="float", e="range", w="exp2", Q="exp_", K="Q_ptr", V="None", b="lambda",
             S="print", i="self", j="def_", Out="_attn_fwd")),
    # the kernel's own vocabulary as user names
    "kernel-vocabulary": (
        "dim {n}, {d}, {e}\nparam {w} = 3, {c} = 0.5\nin {Q}[{n}, {d}], {K}[{n}, {d}], {V}[{n}, {e}], {b}[{n}]\n"
        "{S}[{i}, {j}] = where({j} <= {i} + {w}, dot({Q}[{i}], {K}[{j}]) / sqrt({d}) + {c} * {b}[{i}], -inf)\n"
        "out {Out} = softmax({S}, axis=-1) @ {V}\n",
        dict(n="BLOCK_M", d="HEAD_DIM", e="start_m", w="acc", c="m_i", Q="offs_m", K="qk0", V="p", b="alpha",
             S="l_i", i="offs_n", j="start_n", Out="out_mask")),
    # a head axis: leading index and dims spelled like the kernel's names
    "heads": (
        "dim {h}, {n}, {d}, {e}\nin {Q}[{h}, {n}, {d}], {K}[{h}, {n}, {d}], {V}[{h}, {n}, {e}]\n"
        "{S}[{a}, {i}, {j}] = where({j} <= {i}, dot({Q}[{a}, {i}], {K}[{a}, {j}]) / sqrt({d}), -inf)\n"
        "out {Out}[{a}] = softmax({S}[{a}], axis=-1) @ {V}[{a}]\n",
        dict(h="pid_z", n="row_lo", d="Z0", e="col_hi", Q="tile_skip", K="m_ij", V="m_safe", S="o0", a="lo0",
             i="hi0", j="ld_1", Out="t1")),
    # an input named like the lse output's offset
    "input-named-lse": (
        "dim {n}, {d}, {e}\nin {Q}[{n}, {d}], {K}[{n}, {d}], {V}[{n}, {e}]\n"
        "out {Out} = softmax({Q} @ {K}.T / sqrt({d}), axis=-1) @ {V}\n",
        dict(n="n", d="d", e="e", Q="Q", K="lse", V="V", Out="O")),
    # an output named lse
    "output-named-lse": (
        "dim {n}, {d}, {e}\nin {Q}[{n}, {d}], {K}[{n}, {d}], {V}[{n}, {e}]\n"
        "out {Out} = softmax({Q} @ {K}.T / sqrt({d}), axis=-1) @ {V}\n",
        dict(n="n", d="d", e="e", Q="Q", K="K", V="V", Out="lse")),
    # an input named like a batch index
    "input-named-z0": (
        "dim {n}, {d}, {e}\nin {Q}[{n}, {d}], {K}[{n}, {d}], {V}[{n}, {e}]\n"
        "out {Out} = softmax({Q} @ {K}.T / sqrt({d}), axis=-1) @ {V}\n",
        dict(n="n", d="d", e="e", Q="z0", K="K", V="V", Out="O")),
    # two inputs whose renamed forms coincide: off_ + 'Q_ptr' == 'off_Q' + _ptr
    "prefix-suffix": (
        "dim {n}, {d}, {e}\nin {Q}[{n}, {d}], {K}[{n}, {d}], {V}[{n}, {e}]\n"
        "out {Out} = softmax({Q} @ {K}.T / sqrt({d}), axis=-1) @ {V}\n",
        dict(n="n", d="d", e="e", Q="Q_ptr", K="off_Q", V="V", Out="O")),
    # a leading index and an input whose renamed forms coincide: idx_ + 'a_ptr' == 'idx_a' + _ptr
    "index-vs-input": (
        "dim {h}, {n}, {d}, {e}\nin {Q}[{h}, {n}, {d}], {K}[{h}, {n}, {d}], {V}[{h}, {n}, {e}]\n"
        "{S}[{a}, {i}, {j}] = dot({Q}[{a}, {i}], {K}[{a}, {j}]) / sqrt({d})\n"
        "out {Out}[{a}] = softmax({S}[{a}], axis=-1) @ {V}[{a}]\n",
        dict(h="h", n="n", d="d", e="e", Q="Q", K="idx_a", V="V", S="S", a="a_ptr", i="i", j="j", Out="O")),
    # a dim and an input whose renamed forms coincide: dim_ + 'X_ptr' == 'dim_X' + _ptr
    "dim-vs-input": (
        "dim {n}, {d}, {e}\nin {Q}[{n}, {d}], {K}[{n}, {d}], {V}[{n}, {e}], {b}[{n}]\n"
        "{S}[{i}, {j}] = dot({Q}[{i}], {K}[{j}]) / sqrt({d}) + {b}[{j}]\n"
        "out {Out} = softmax({S}, axis=-1) @ {V}\n",
        dict(n="n", d="d", e="X_ptr", Q="Q", K="K", V="V", b="dim_X", S="S", i="i", j="j", Out="O")),
}


def _token(k: int) -> str:
    return f"Zq{k}Z"   # no token is a substring of another (Zq1Z vs Zq10Z)


def _kernel_names(src: str) -> set:
    """Every identifier the kernel source binds or reads: names, function arguments, function names."""
    out = set()
    for node in ast.walk(ast.parse(src)):
        if isinstance(node, ast.Name):
            out.add(node.id)
        elif isinstance(node, ast.arg):
            out.add(node.arg)
        elif isinstance(node, ast.FunctionDef):
            out.add(node.name)
    return out


def _hostile(label):
    template, names = HOSTILE[label]
    keys = sorted(names)
    tokens = {key: _token(t) for t, key in enumerate(keys)}
    return template.format(**names), template.format(**tokens), names, tokens


def _make_hostile_inputs(k, g):
    """Inputs for a hostile program: the first dim of a 4-dim program is a head count (3), then n = 37, d = 16,
    e = 24 in declaration order; a batch axis of 2 on every input."""
    dims = list(k.program.dims)
    values = [37, D, E]
    if len(dims) == 4:
        values = [3, 37, D, E]
    env = {dsym: v for dsym, v in zip(dims, values)}
    x = {}
    for node in k.program.inputs:
        shape = [int(ext.subs(env)) for ext in node.shape]
        x[node.attrs[0]] = randn(g, 2, *shape)
    return x


def _name_map(label):
    """(hostile kernel names, neutral kernel names, the substitution neutral -> hostile, tokens)."""
    hostile, neutral, names, tokens = _hostile(label)
    kh, kn = moa.compile(hostile), moa.compile(neutral)
    store_lse = kn.schedules[kn.output_names[0]].has_lse
    src_n = kn.source(dtype="float32", nbatch=1, store_lse=store_lse)
    src_h = kh.source(dtype="float32", nbatch=1, store_lse=store_lse)

    def subst(text):
        for key, tok in tokens.items():
            text = text.replace(tok, names[key])
        return text

    return _kernel_names(src_h), _kernel_names(src_n), subst, tokens


def _clashes(neutral_names, subst) -> dict:
    images = {}
    for nm in neutral_names:
        images.setdefault(subst(nm), []).append(nm)
    return {img: sorted(src) for img, src in images.items() if len(src) > 1}


@pytest.mark.parametrize("label", list(HOSTILE))
def test_identifiers_renamed_injectively(label):
    """The same program is compiled twice: with hostile names and with neutral tokens (Zq0Z, Zq1Z, ...).
    - no token appears as a bare name in the neutral kernel (user names are never pasted verbatim);
    - the hostile kernel's names are exactly the neutral kernel's names with the user's names substituted
      (so a hostile name that equals a user identifier is a renamed form or the kernel's own name);
    - the substitution is injective on the kernel's names: no two variables (a renamed user name and another
      renamed name, or one of the kernel's own names) become one name, which would silently alias them."""
    hostile, _, names, _ = _hostile(label)
    view = moa.compile(hostile).planner.codegen
    if any(k != v for k, v in {**view.inputs, **view.dims}.items()):
        # renamed forms could collide: every user name was replaced by an opaque u<k> (codegen/names.py)
        src = moa.compile(hostile).source(dtype="float32", nbatch=1)
        user = set(names.values())
        fwd = next(f for f in ast.walk(ast.parse(src)) if isinstance(f, ast.FunctionDef) and f.name == "_attn_fwd")
        leaked = sorted(nm for nm in _kernel_names(ast.unparse(fwd)) if nm in user or any(
            nm in (f"{u}_ptr", f"off_{u}", f"dim_{u}", f"idx_{u}") for u in user)
            and not re.fullmatch(r"off_z\d+|off_lse", nm))  # the kernel's own batch / lse offsets
        assert not leaked, f"user identifiers in a renamed kernel: {leaked}"
        return
    hostile_names, neutral_names, subst, tokens = _name_map(label)
    bare = sorted(t for t in tokens.values() if t in neutral_names)
    assert not bare, f"user identifiers pasted verbatim into the kernel: {bare}"
    clashes = _clashes(neutral_names, subst)
    assert not clashes, f"distinct kernel names collide once the user's names are substituted: {clashes}"
    assert hostile_names == {subst(nm) for nm in neutral_names}


_CHILD = """
import json, sys
sys.path.insert(0, {tests!r})
import test_kernels as T
print("RESULT " + json.dumps(T._hostile_errors({label!r})))
"""


def _hostile_errors(label) -> dict:
    """Run a hostile program (batch axis 2, O and with_lse) and return its errors against the reference."""
    hostile, _, _, _ = _hostile(label)
    k = moa.compile(hostile)
    x = _make_hostile_inputs(k, gen("hostile", label))
    ref = k.reference(**x)
    out = {"O": err(k(**x), ref)}
    if k.schedules[k.output_names[0]].has_lse:
        o, lse = k.with_lse(**x)
        out["O (with_lse)"] = err(o, ref)
        out["lse finite"] = bool(torch.isfinite(lse).all())
    return out


@pytest.mark.parametrize("label", list(HOSTILE))
def test_identifiers_hostile_programs_run(label):
    _, neutral_names, subst, _ = _name_map(label)
    if not _clashes(neutral_names, subst):
        res = _hostile_errors(label)
    else:
        # aliased pointers / offsets make the interpreter read and write wild addresses (heap corruption):
        # run it in a child process so that the failure is reported instead of killing the test session
        code = _CHILD.format(tests=str(Path(__file__).resolve().parent), label=label)
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                              cwd=str(ROOT), env=dict(os.environ))
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        assert proc.returncode == 0 and lines, (f"the kernel crashed (exit {proc.returncode}):\n"
                                                f"{proc.stderr[-1500:]}")
        res = json.loads(lines[-1][len("RESULT "):])
    bad = {key: v for key, v in res.items() if v is False or (not isinstance(v, bool) and v > TOL64)}
    assert not bad, f"wrong results for program {label!r}: {bad}"


def test_renamed_names_match_the_documented_scheme():
    # the README / docs promise: tutorial naming in the kernel, user names behind prefixes and suffixes
    src = example("causal").source(dtype="float16", nbatch=1)
    for word in ("_attn_fwd", "BLOCK_M", "BLOCK_N", "HEAD_DIM", "offs_m", "acc", "m_i", "l_i", "stride_Q_0",
                 "Q_ptr", "dim_n"):
        assert re.search(rf"\b{word}", src), word
