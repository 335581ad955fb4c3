"""The fused Triton kernels, run on CPU tensors through Triton's interpreter.

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
- golden source, the storage theorem and hostile identifiers are in tests/test_kernels_source.py; the shared
  cases and helpers in tests/kernel_cases.py.

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

import math

import moa
import pytest
import torch

try:  # pytest's default (prepend) import mode puts tests/ on sys.path
    import oracles as O
except ImportError:  # pragma: no cover - importlib mode / run from the repository root
    from tests import oracles as O

try:  # pytest's default (prepend) import mode puts tests/ on sys.path
    from kernel_cases import (
        ALL_CASES, BLA_CASES, Case, D, E, EXAMPLES, F64, LOW, N, NEG_INF, NORM_CASES, SOFTMAX_CASES, SUM_CASES, TOL,
        TOL64, TOL_LARGE, _qkv, _qkv_, _with, case_id, cast, compiled, err, example, f64, gen, randn)
except ImportError:  # pragma: no cover
    from tests.kernel_cases import (
        ALL_CASES, BLA_CASES, Case, D, E, EXAMPLES, F64, LOW, N, NEG_INF, NORM_CASES, SOFTMAX_CASES, SUM_CASES, TOL,
        TOL64, TOL_LARGE, _qkv, _qkv_, _with, case_id, cast, compiled, err, example, f64, gen, randn)


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


@pytest.mark.parametrize("c", NORM_CASES + BLA_CASES + SUM_CASES, ids=case_id)
def test_normalised_bla_and_sums_float64(c: Case):
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
     "reduction"),
    ("max-over-keys", "dim n, d, e\nin Q[n, d], K[n, d], V[n, e]\nout O[i, c] = max(Q[i] @ K.T, axis=0) * V[i, c]\n",
     "softmax"),
    ("reduction-in-score", "dim n, d, e\nin Q[n, d], K[n, d], V[n, e]\n"
     "S[i, j] = dot(Q[i], K[j]) + sum(K[j] * max(K[j], axis=0))\nout O = softmax(S, axis=-1) @ V\n", "reduction"),
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
