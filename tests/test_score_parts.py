"""Norms of one operand in a score (QK-norm as Qwen3 and OLMo 2 apply it, cosine attention): the rule that pulls
them out of the contraction (moa/score_parts.py), and the kernels that compute them per row tile and per key
tile. Against a plain PyTorch implementation in float64 (forward, gradients, decoding), the cost model against
the interpreter's counters, AOT for sm_90."""
from __future__ import annotations

import pytest
import torch

import moa
from moa import dnf as D
from moa.runtime.costing import cost
from moa.runtime.measuring import measure

F64 = torch.float64
QK_NORM = """dim h, g, n, d, e
param eps = 1e-6
in Q[h, n, d], K[g, n, d], V[g, n, e], wq[d], wk[d]
Qn[a, i, k] = Q[a, i, k] * rsqrt(sum(Q[a, i] * Q[a, i]) / d + eps) * wq[k]
Kn[b, j, k] = K[b, j, k] * rsqrt(sum(K[b, j] * K[b, j]) / d + eps) * wk[k]
S[a, i, j] = where(j <= i, dot(Qn[a, i], Kn[a // (h // g), j]) / sqrt(d), -inf)
out O[a] = softmax(S[a], axis=-1) @ V[a // (h // g)]
"""
COSINE = """dim h, n, d, e
in Q[h, n, d], K[h, n, d], V[h, n, e], tau[h]
S[a, i, j] = dot(Q[a, i], K[a, j]) * rsqrt(dot(Q[a, i], Q[a, i])) * rsqrt(dot(K[a, j], K[a, j])) / tau[a]
out O[a] = softmax(S[a], axis=-1) @ V[a]
"""


def _qk_norm(Q, K, V, wq, wk, causal=True):
    """Qwen3-style attention in torch: RMSNorm of q and k with weights, grouped K / V, causal softmax."""
    qn = Q * torch.rsqrt((Q * Q).mean(-1, keepdim=True) + 1e-6) * wq
    kn = K * torch.rsqrt((K * K).mean(-1, keepdim=True) + 1e-6) * wk
    rep = Q.shape[-3] // K.shape[-3]
    kn, v = kn.repeat_interleave(rep, -3), V.repeat_interleave(rep, -3)
    n, m = Q.shape[-2], K.shape[-2]
    mask = torch.ones(n, m, dtype=torch.bool).tril(m - n)
    return torch.nn.functional.scaled_dot_product_attention(qn, kn, v, attn_mask=mask)


def _inputs(n=70, h=4, g=2, d=8, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = {"Q": torch.randn(h, n, d, generator=gen, dtype=F64), "K": torch.randn(g, n, d, generator=gen, dtype=F64),
         "V": torch.randn(g, n, d, generator=gen, dtype=F64)}
    w = {a: torch.rand(d, generator=gen, dtype=F64) + 0.5 for a in ("wq", "wk")}
    return {**x, **w}


def test_norms_stay_on_the_operand_tiles_in_any_spelling():
    """The norm is computed on the operand tile (the score is the bare q . k tile); a division by the norm, the order
    of the terms, RMS norm then rotary embedding (Qwen3's order) and a norm of a weight vector compile too."""
    k = moa.compile(QK_NORM)
    (b,) = k.schedules["O"].branches
    assert any(isinstance(x, D.Reduce) for x in D.nodes(b.dot.a)) and not any(
        isinstance(x, D.Reduce) for x in D.nodes(b.score))
    head = "dim n, d, e\nin Q[n, d], K[n, d], V[n, e], w[d]\n"
    gen = torch.Generator().manual_seed(5)
    x = {a: torch.randn(40, 8, generator=gen, dtype=F64) for a in "QKV"}
    x["w"] = torch.rand(8, generator=gen, dtype=F64) + 0.5
    qn = x["Q"] / (x["Q"] * x["Q"]).sum(-1, keepdim=True).add(1e-6).sqrt()
    ang = torch.arange(40, dtype=F64)[:, None] * 10000.0 ** (-2 * torch.arange(4, dtype=F64) / 8)
    rot = torch.cat([qn[:, :4] * ang.cos() - qn[:, 4:] * ang.sin(), qn[:, 4:] * ang.cos() + qn[:, :4] * ang.sin()], -1)
    cases = {
        "Qn[i, k] = Q[i, k] / sqrt(sum(Q[i] * Q[i]) + 1e-6)\nS[i, j] = dot(Qn[i], K[j])\n": qn @ x["K"].T,
        "S[i, j] = sum(Q[i] * w) + dot(Q[i], K[j])\n": (x["Q"] @ x["w"])[:, None] + x["Q"] @ x["K"].T,
        "S[i, j] = dot(Q[i], K[j]) * rsqrt(sum(w * w))\n": x["Q"] @ x["K"].T / x["w"].norm(),
        "Qn[i, k] = Q[i, k] * rsqrt(sum(Q[i] * Q[i]) + 1e-6)\n"
        "Qr[i, k] = Qn[i, k] * cos(i * 10000 ^ (-2 * (k % (d // 2)) / d)) + where(k < d // 2, -1, 1) * "
        "Qn[i, (k + d // 2) % d] * sin(i * 10000 ^ (-2 * (k % (d // 2)) / d))\nS[i, j] = dot(Qr[i], K[j])\n":
            rot @ x["K"].T,
    }
    for body, score in cases.items():
        got = moa.compile(head + body + "out O = softmax(S, axis=-1) @ V\n")(**x)
        assert (got - torch.softmax(score, -1) @ x["V"]).abs().max().item() < 1e-12, body


def test_operands_are_normalised_before_the_cast_to_half():
    """q * wq of an unnormalised row can pass float16's range (40000 * 2); the normalised operand cannot: the norm
    is applied on the operand tile in float32, before the cast for the tensor cores (it gave NaN rows)."""
    k = moa.compile(QK_NORM)
    x = _inputs(n=20, seed=6)
    x["Q"][0, 3, 2] = 40000.0
    x["wq"][:] = 2.0
    out = k(**{a: t.half() for a, t in x.items()})
    assert torch.isfinite(out).all()
    assert (out.double() - _qk_norm(**{a: t.half().double() for a, t in x.items()})).abs().max().item() < 5e-3


def test_qk_norm_with_grouped_heads_against_torch():
    k = moa.compile(QK_NORM)
    x = _inputs()
    assert (k(**x) - _qk_norm(**x)).abs().max().item() < 1e-12
    assert (k.reference(**x) - _qk_norm(**x)).abs().max().item() < 1e-12
    dims = {"h": 4, "g": 2, "n": 70, "d": 8, "e": 8}
    got, c = measure(k, **x), cost(k, dtype="float64", device="cpu", **dims)
    assert (got.flops, got.transcendentals, got.dram_bytes) == (c.flops, c.transcendentals, c.dram_bytes)
    leaves = {a: t.clone().requires_grad_() for a, t in x.items()}
    want = {a: t.clone().requires_grad_() for a, t in x.items()}
    cot = torch.randn(4, 70, 8, generator=torch.Generator().manual_seed(1), dtype=F64)
    (k(**leaves) * cot).sum().backward()
    (_qk_norm(**want) * cot).sum().backward()
    for a in x:
        assert (leaves[a].grad - want[a].grad).abs().max().item() < 1e-12, a
    for dt, tol in ((torch.float32, 1e-5), (torch.float16, 5e-3)):
        assert (k(**{a: t.to(dt) for a, t in x.items()}).double() - _qk_norm(**x)).abs().max().item() < tol, dt


@pytest.mark.parametrize("splits", [1, 3])
def test_decoding_with_qk_norm(splits):
    """The key norms are computed per key tile of each split; with valid lengths the rows are the last of each."""
    k = moa.compile(QK_NORM)
    x = _inputs(n=90, seed=2)
    q = x["Q"][:, -3:]
    assert (k.decode(**{**x, "Q": q}, splits=splits) - _qk_norm(**x)[:, -3:]).abs().max().item() < 1e-12
    lens = torch.tensor([90, 61])
    both = {a: torch.stack([t, t]) for a, t in {**x, "Q": q}.items()}
    out = k.decode(**both, cache_len=lens, splits=splits)
    for b, L in enumerate(lens.tolist()):
        full = {**x, "Q": torch.cat([x["Q"][:, :L - 3], q], 1), "K": x["K"][:, :L], "V": x["V"][:, :L]}
        assert (out[b] - _qk_norm(**full)[:, -3:]).abs().max().item() < 1e-12, b


def test_cosine_attention_with_a_temperature_per_head():
    k = moa.compile(COSINE)
    gen = torch.Generator().manual_seed(3)
    x = {a: torch.randn(2, 75, 8, generator=gen, dtype=F64) for a in "QKV"}
    x["tau"] = torch.rand(2, generator=gen, dtype=F64) + 0.1
    qn, kn = x["Q"] / x["Q"].norm(dim=-1, keepdim=True), x["K"] / x["K"].norm(dim=-1, keepdim=True)
    want = torch.softmax(qn @ kn.transpose(-1, -2) / x["tau"][:, None, None], -1) @ x["V"]
    assert (k(**x) - want).abs().max().item() < 1e-12


def test_qk_norm_builds_for_sm_90_without_spills():
    rep = moa.compile(QK_NORM).aot(dtype="bf16", h=32, g=8, n=4096, d=128, e=128)
    assert rep.spills == 0 and rep.uses_wgmma, rep.summary()


def test_the_program_of_the_variants_page_is_this_one():
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "docs" / "variants.md").read_text()
    assert f"```\n{QK_NORM}```" in text


def test_a_per_key_reduction_added_to_the_score():
    """Outside any contraction too: a bias per key computed from K's row (once per key tile) and per row from Q's."""
    k = moa.compile("dim n, d, e\nin Q[n, d], K[n, d], V[n, e]\n"
                    "S[i, j] = dot(Q[i], K[j]) + sum(K[j], axis=0) - max(Q[i], axis=0)\n"
                    "out O = softmax(S, axis=-1) @ V\n")
    gen = torch.Generator().manual_seed(4)
    x = {a: torch.randn(77, 8, generator=gen, dtype=F64) for a in "QKV"}
    s = x["Q"] @ x["K"].T + x["K"].sum(-1)[None, :] - x["Q"].amax(-1)[:, None]
    assert (k(**x) - torch.softmax(s, -1) @ x["V"]).abs().max().item() < 1e-12
    bias = moa.compile("dim n, d, e\nin Q[n, d], K[n, d], V[n, e], b[n, 6]\n"   # over an axis of its own
                       "S[i, j] = dot(Q[i], K[j]) + sum(b[j])\nout O = softmax(S, axis=-1) @ V\n")
    y = {**x, "b": torch.randn(77, 6, generator=gen, dtype=F64)}
    got = {a: t.clone().requires_grad_() for a, t in y.items()}
    want = {a: t.clone().requires_grad_() for a, t in y.items()}
    bias(**got).sum().backward()   # the fused backward kernel's source did not indent (IndentationError)
    (torch.softmax(want["Q"] @ want["K"].T + want["b"].sum(-1)[None, :], -1) @ want["V"]).sum().backward()
    for a in y:
        assert (got[a].grad - want[a].grad).abs().max().item() < 1e-12, a


def test_a_weight_per_kv_head_decodes_unpacked_when_packing_has_no_kernel():
    """Packing the query heads of a K / V group rewrites wk[b, k] to be read at the packed row, which has no kernel:
    the default decode fell over instead of running unpacked (pack_heads=True still says why)."""
    from moa.errors import UnsupportedError

    k = moa.compile("dim h, g, n, d, e\nin Q[h, n, d], K[g, n, d], V[g, n, e], wk[g, d]\n"
                    "Kn[b, j, k] = K[b, j, k] * rsqrt(sum(K[b, j] * K[b, j])) * wk[b, k]\n"
                    "S[a, i, j] = dot(Q[a, i], Kn[a // (h // g), j])\n"
                    "out O[a] = softmax(S[a], axis=-1) @ V[a // (h // g)]\n")
    x = _inputs(n=40, seed=7)
    x = {"Q": x["Q"], "K": x["K"], "V": x["V"], "wk": torch.rand(2, 8, dtype=F64) + 0.5}
    full = k(**x)
    q = {**x, "Q": x["Q"][:, -3:]}
    assert (k.decode(**q, splits=2) - full[:, -3:]).abs().max().item() < 1e-12
    with pytest.raises(UnsupportedError, match="pack_heads=True, but the packed program has no kernel"):
        k.decode(**q, pack_heads=True)


def test_norm_then_rope_builds_for_sm_90_at_head_dim_128():
    """Qwen3's order (RMS norm, then the rotation) holds two key tiles, the angles and the norm per key tile: at
    d = 128 every config down to 32 x 32 spilled; 64 x 16 tiles with 8 warps fit (240 registers)."""
    src = QK_NORM.replace(
        "S[a, i, j] = where(j <= i, dot(Qn[a, i], Kn[a // (h // g), j]) / sqrt(d), -inf)",
        "Qr[a, i, k] = Qn[a, i, k] * cos(i * 10000 ^ (-2 * (k % (d // 2)) / d)) + where(k < d // 2, -1, 1) * "
        "Qn[a, i, (k + d // 2) % d] * sin(i * 10000 ^ (-2 * (k % (d // 2)) / d))\n"
        "Kr[b, j, k] = Kn[b, j, k] * cos(j * 10000 ^ (-2 * (k % (d // 2)) / d)) + where(k < d // 2, -1, 1) * "
        "Kn[b, j, (k + d // 2) % d] * sin(j * 10000 ^ (-2 * (k % (d // 2)) / d))\n"
        "S[a, i, j] = where(j <= i, dot(Qr[a, i], Kr[a // (h // g), j]) / sqrt(d), -inf)")
    k = moa.compile(src)
    assert "Kr[b, j, k]" in src
    rep = k.aot(dtype="bf16", h=32, g=8, n=4096, d=128, e=128)
    assert rep.spills == 0 and rep.uses_wgmma, rep.summary()


def test_a_norm_of_the_value_row():
    """V[j, c] * rsqrt(mean(V[j]^2) + eps) * w[c] is computed on each value tile (it was refused); decoding too.
    The chunked linear form reads plain tiles: it declines such a program, which runs quadratic."""
    from moa.errors import UnsupportedError

    k = moa.compile("dim n, d, e\nin Q[n, d], K[n, d], V[n, e], wv[e]\n"
                    "Vn[j, c] = V[j, c] * rsqrt(sum(V[j] * V[j]) / e + 1e-6) * wv[c]\n"
                    "S[i, j] = where(j <= i, dot(Q[i], K[j]) / sqrt(d), -inf)\nout O = softmax(S, axis=-1) @ Vn\n")
    gen = torch.Generator().manual_seed(8)
    x = {"Q": torch.randn(70, 8, generator=gen, dtype=F64), "K": torch.randn(70, 8, generator=gen, dtype=F64),
         "V": torch.randn(70, 6, generator=gen, dtype=F64), "wv": torch.rand(6, generator=gen, dtype=F64) + 0.5}
    vn = x["V"] * torch.rsqrt((x["V"] ** 2).mean(-1, keepdim=True) + 1e-6) * x["wv"]
    want = torch.nn.functional.scaled_dot_product_attention(x["Q"], x["K"], vn, is_causal=True)
    assert (k(**x) - want).abs().max().item() < 1e-12
    assert (k.decode(**{**x, "Q": x["Q"][-3:]}, splits=3) - want[-3:]).abs().max().item() < 1e-12
    assert measure(k, **x).flops == cost(k, dtype="float64", device="cpu", n=70, d=8, e=6).flops
    lin = open("examples/linear.moa").read().replace("in Q[n, d], K[n, d], V[n, e]", "in Q[n, d], K[n, d], V[n, e]\n"
                                                     "Vn[j, c] = V[j, c] * rsqrt(sum(V[j] * V[j]) + 1.0)")
    lin = lin.replace("@ V", "@ Vn")
    y = {a: x[a] for a in "QKV"}
    assert (moa.compile(lin)(**y) - moa.compile(lin).reference(**y)).abs().max().item() < 1e-12
    with pytest.raises(UnsupportedError, match="chunked scans read plain operand and value tiles"):
        moa.compile(lin, form="linear")(**y)
