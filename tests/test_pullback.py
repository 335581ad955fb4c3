"""The operand pullback (moa/pullback.py): programs whose contraction operands or value are computed in the kernel
(rotary embeddings, QK-norm, a value norm, a slice) get fused backward kernels; the kernels return the gradients of
the operand tiles and the gradient DNF of the operands carries them to the inputs. Gradients equal torch.autograd
through the float64 reference, the cost model stays exact on the kernels, and the pullback's DNF has no equality
mask (no O(n d^2) or O(h g n d) evaluation)."""
import math

import pytest
import torch

import moa
from moa.grad import show_grad
from moa.pullback import outputs, pullback_grad, pulled_inputs
from moa.runtime import backward_run
from moa.runtime.tiling import Config

try:
    import grad_cases as C
except ImportError:  # pragma: no cover
    from tests import grad_cases as C

F64 = torch.float64

ROT = "where(k < d // 2, -1, 1)"
ODD = "where(k % 2 == 0, -1, 1)"
ANGLE2 = "base ^ (-2 * (k // 2) / d)"
ANGLE = "base ^ (-2 * (k % (d // 2)) / d)"
PROGRAMS = {
    # rotary embeddings computed in the kernel (GPT-NeoX halves), causal
    "rope": ("dim n, d, e\nparam base = 10000\nin Q[n, d], K[n, d], V[n, e]\n"
             f"Qr[i, k] = Q[i, k] * cos(i * {ANGLE}) + {ROT} * Q[i, (k + d // 2) % d] * sin(i * {ANGLE})\n"
             f"Kr[j, k] = K[j, k] * cos(j * {ANGLE}) + {ROT} * K[j, (k + d // 2) % d] * sin(j * {ANGLE})\n"
             "S[i, j] = where(j <= i, dot(Qr[i], Kr[j]) / sqrt(d), -inf)\nout O = softmax(S, axis=-1) @ V\n",
             ("Q", "K"), {"Q", "K"}),
    # the rotary tables as inputs: they get gradients too (read by both operands)
    "rope_tables": ("dim h, n, d, e\nin Q[h, n, d], K[h, n, d], V[h, n, e], cs[n, d], sn[n, d]\n"
                    f"Qr[a, i, k] = Q[a, i, k] * cs[i, k] + {ROT} * Q[a, i, (k + d // 2) % d] * sn[i, k]\n"
                    f"Kr[a, j, k] = K[a, j, k] * cs[j, k] + {ROT} * K[a, j, (k + d // 2) % d] * sn[j, k]\n"
                    "S[a, i, j] = dot(Qr[a, i], Kr[a, j]) / sqrt(d)\nout O[a] = softmax(S[a], axis=-1) @ V[a]\n",
                    ("Q", "K"), {"Q", "K", "cs", "sn"}),
    # Qwen3: RMS norm with weights, then rotary embeddings, grouped K / V heads
    "qk_norm_rope_gqa": ("dim h, g, n, d, e\nparam base = 10000\nparam eps = 1e-6\n"
                         "in Q[h, n, d], K[g, n, d], V[g, n, e], wq[d], wk[d]\n"
                         "Qn[a, i, k] = Q[a, i, k] * rsqrt(sum(Q[a, i] * Q[a, i]) / d + eps) * wq[k]\n"
                         "Kn[b, j, k] = K[b, j, k] * rsqrt(sum(K[b, j] * K[b, j]) / d + eps) * wk[k]\n"
                         f"Qr[a, i, k] = Qn[a, i, k] * cos(i * {ANGLE}) + {ROT} * Qn[a, i, (k + d // 2) % d] * "
                         f"sin(i * {ANGLE})\n"
                         f"Kr[b, j, k] = Kn[b, j, k] * cos(j * {ANGLE}) + {ROT} * Kn[b, j, (k + d // 2) % d] * "
                         f"sin(j * {ANGLE})\n"
                         "S[a, i, j] = where(j <= i, dot(Qr[a, i], Kr[a // (h // g), j]) / sqrt(d), -inf)\n"
                         "out O[a] = softmax(S[a], axis=-1) @ V[a // (h // g)]\n",
                         ("Q", "K"), {"Q", "K", "wq", "wk"}),
    # a norm of the value row; q . k plain
    "value_norm": ("dim n, d, e\nin Q[n, d], K[n, d], V[n, e], wv[e]\n"
                   "Vn[j, c] = V[j, c] * rsqrt(sum(V[j] * V[j]) / e + 1e-6) * wv[c]\n"
                   "S[i, j] = where(j <= i, dot(Q[i], K[j]) / sqrt(d), -inf)\nout O = softmax(S, axis=-1) @ Vn\n",
                   ("V",), {"V", "wv"}),
    # operands read at a shifted row (a slice of a longer input) and a key operand scaled per column
    "slice": ("dim n, d, e\nin Q[n + 3, d], K[n, d], V[n, e], wk[d]\n"
              "S[i:n, j] = where(j <= i, dot(Q[i + 3], K[j] * wk) / sqrt(d), -inf)\nout O = softmax(S, axis=-1) @ V\n",
              ("Q", "K"), {"Q", "K", "wk"}),
    # GPT-J's interleaved pairs (partner k + 1 - 2 (k % 2)), the angle per pair
    "gptj": ("dim n, d, e\nparam base = 10000\nin Q[n, d], K[n, d], V[n, e]\n"
             f"Qr[i, k] = Q[i, k] * cos(i * {ANGLE2}) + {ODD} * Q[i, k + 1 - 2 * (k % 2)] * sin(i * {ANGLE2})\n"
             f"Kr[j, k] = K[j, k] * cos(j * {ANGLE2}) + {ODD} * K[j, (k // 2) * 2 + 1 - k % 2] * sin(j * {ANGLE2})\n"
             "S[i, j] = where(j <= i, dot(Qr[i], Kr[j]) / sqrt(d), -inf)\nout O = softmax(S, axis=-1) @ V\n",
             ("Q", "K"), {"Q", "K"}),
    # GPT-J's partner written with a where
    "gptj_where": ("dim n, d, e\nparam base = 10000\nin Q[n, d], K[n, d], V[n, e]\n"
                   f"Qr[i, k] = Q[i, k] * cos(i * {ANGLE2}) + {ODD} * Q[i, where(k % 2 == 0, k + 1, k - 1)] * "
                   f"sin(i * {ANGLE2})\n"
                   f"Kr[j, k] = K[j, k] * cos(j * {ANGLE2}) + {ODD} * K[j, where(k % 2 == 0, k + 1, k - 1)] * "
                   f"sin(j * {ANGLE2})\n"
                   "S[i, j] = where(j <= i, dot(Qr[i], Kr[j]) / sqrt(d), -inf)\nout O = softmax(S, axis=-1) @ V\n",
                   ("Q", "K"), {"Q", "K"}),
    # partial rotary (the first rr dims rotated) with half-size tables cs[n, rr // 2] (LLaMA's layout)
    "partial_half": ("dim n, d, e\nparam rr = 4\nin Q[n, d], K[n, d], V[n, e], cs[n, rr // 2], sn[n, rr // 2]\n"
                     "Qr[i, k] = where(k < rr, Q[i, k] * cs[i, k % (rr // 2)] + where(k < rr // 2, -1, 1) * "
                     "Q[i, (k + rr // 2) % rr] * sn[i, k % (rr // 2)], Q[i, k])\n"
                     "Kr[j, k] = where(k < rr, K[j, k] * cs[j, k % (rr // 2)] + where(k < rr // 2, -1, 1) * "
                     "K[j, (k + rr // 2) % rr] * sn[j, k % (rr // 2)], K[j, k])\n"
                     "S[i, j] = where(j <= i, dot(Qr[i], Kr[j]) / sqrt(d), -inf)\nout O = softmax(S, axis=-1) @ V\n",
                     ("Q", "K"), {"Q", "K", "cs", "sn"}),
    # cosine attention: the norms in the score itself, a temperature per head
    "cosine": ("dim h, n, d, e\nin Q[h, n, d], K[h, n, d], V[h, n, e], tau[h]\n"
               "S[a, i, j] = dot(Q[a, i], K[a, j]) * rsqrt(dot(Q[a, i], Q[a, i])) * rsqrt(dot(K[a, j], K[a, j])) / "
               "tau[a]\nout O[a] = softmax(S[a], axis=-1) @ V[a]\n", (), {"Q", "K"}),
    # a key bias from the key row, a per-program norm of a weight vector, a RoPE'd q: every kind at once
    "score_norms": ("dim n, d, e\nparam base = 10000\nin Q[n, d], K[n, d], V[n, e], w[d], u[d]\n"
                    f"Qr[i, k] = Q[i, k] * cos(i * {ANGLE}) + {ROT} * Q[i, (k + d // 2) % d] * sin(i * {ANGLE})\n"
                    "S[i, j] = where(j <= i, dot(Qr[i], K[j]) * rsqrt(sum(w * w)) + dot(K[j], u) / 4, -inf)\n"
                    "out O = softmax(S, axis=-1) @ V\n", ("Q",), {"Q", "K", "w", "u"}),
}
DIMS = {"n": 37, "d": 8, "e": 5, "h": 4, "g": 2}
PI_NORM = open("examples/pi_attention.moa").read().replace(
    "in Q[n, d], K[n, d], V[n, e], wg[d]",
    "in Q[n, d], K[n, d], V[n, e], wg[d], wq[d]\nQs[i, c] = Q[i, c] * rsqrt(sum(Q[i] * Q[i]) / d + 1e-6) * wq[c]"
).replace("S = Q @ K.T / sqrt(d)", "S = Qs @ K.T / sqrt(d)")


def _inputs(k, seed: int) -> dict:
    x = C.inputs(k.program, C.dims_for(k.program, DIMS), seed)
    if "tau" in x:
        x["tau"] = x["tau"].abs() + 0.5
    return x


@pytest.mark.parametrize("name", sorted(PROGRAMS))
def test_pulled_back_gradients_equal_autograd(name, monkeypatch):
    monkeypatch.setattr(backward_run, "INTERPRETER_BLOCKS", (16, 16))
    src, roles, inputs = PROGRAMS[name]
    k = moa.compile(src)
    assert k.backward.unfused_reason is None
    runner = k.backward.runner
    spec = runner.spec("float64", 1)
    assert spec.pulled == roles
    assert set(k.backward.fused_inputs) == set(C.float_names(k.program))
    assert set(pulled_inputs(outputs(runner.sched, roles))) == inputs
    x = _inputs(k, 0)
    C.check_kernel_grads(k, x)


def _largest_sum(gp, dims: dict) -> int:
    """The largest index space a sum of the gradient program is evaluated over at these dims (the extents of the
    variables its body uses, its own included): what the evaluator's largest tensor holds."""
    from moa import symbolic as sy
    from moa.dnf_nodes import BINDERS, children, free_vars

    def walk(e, ext: dict):
        if isinstance(e, BINDERS):
            ext = {**ext, e.var: int(sy.evaluate(e.extent, dims))}
            yield math.prod(ext[v] for v in {*free_vars(e), e.var} if v in ext)
        for c in children(e):
            yield from walk(c, ext)

    sizes = [w for g in gp.grads
             for w in walk(g.expr, {v: int(sy.evaluate(x, dims)) for v, x in zip(g.vars, g.extents)})]
    return max(sizes, default=1)


@pytest.mark.parametrize("name", ["rope", "qk_norm_rope_gqa", "gptj", "gptj_where", "partial_half", "rope_tables"])
def test_the_pullback_solves_every_index(name):
    """Rotate-half reads (k + d // 2) % d, GPT-J's partner k + 1 - 2 (k % 2), half-size tables k % (d // 2), the
    partial rotation's (k + r // 2) % r under k < r and the grouped head a // (h // g) are solved
    (moa/grad_scatter.py): at d = 128 every sum the pullback evaluates adds at most 2 terms, besides the norm's
    own sum over d, so it costs O(heads n d), never a mask over d (O(n d^2)) or over every head."""
    k = moa.compile(PROGRAMS[name][0])
    gp = pullback_grad(k.planner.cg_program, outputs(k.backward.runner.sched, PROGRAMS[name][1]))
    dims = {"h": 32, "g": 8, "n": 4096, "d": 128, "e": 128}
    heads = 32 if "h" in {x.name for x in k.program.dims} else 1
    assert _largest_sum(gp, {x.name: dims[x.name] for x in k.program.dims}) <= 2 * heads * 4096 * 128, show_grad(gp)


@pytest.mark.parametrize("name", ["rope", "qk_norm_rope_gqa", "value_norm", "cosine", "score_norms"])
def test_backward_kernel_work_is_predicted_exactly(name, monkeypatch):
    """The kernels compute the operand tiles as the forward does; the cost model counts them exactly (the
    pullback runs in torch, outside the kernels)."""
    monkeypatch.setattr(backward_run, "INTERPRETER_BLOCKS", (16, 16))
    k = moa.compile(PROGRAMS[name][0])
    x = _inputs(k, 0)
    C.check_backward_cost(k, x, C.cotangents(k, x, 0)["O"], Config(16, 16))
    b = k.bind(x)
    notes = " ".join(k.backward.cost(b.dims, b.batch, "float64", inputs=None).notes)
    assert "pulled back" in notes


def test_float32_training_step_with_rope_and_qk_norm():
    """The fp32 kernels and the float64 pullback agree with the float64 reference to fp32's accuracy."""
    k = moa.compile(PROGRAMS["qk_norm_rope_gqa"][0])
    x = C.inputs(k.program, C.dims_for(k.program, DIMS), 1)
    cot = C.cotangents(k, x, 1)
    want = C.autograd_grads(k, x, cot)
    got = C.kernel_grads(k, {a: t.float() for a, t in x.items()}, cot["O"].float())
    for a in want:
        assert got[a].dtype == torch.float32
        assert C.rel_err(got[a], want[a]) < 2e-5, (a, C.rel_err(got[a], want[a]))


def test_each_branch_pulls_back_its_operands(monkeypatch):
    """PiAttention with a normalised q: each branch's kernels return the q tile's gradient, pulled back per branch,
    and the gate's own read of Q adds its part (runtime/backward_multi.py)."""
    monkeypatch.setattr(backward_run, "INTERPRETER_BLOCKS", (16, 16))
    k = moa.compile(PI_NORM, s=4, k=8)
    assert k.backward.unfused_reason is None and k.backward.multi is not None
    assert {"Q", "wq"} <= set(k.backward.fused_inputs)
    x = C.inputs(k.program, {"n": 40, "d": 8, "e": 5}, 0)
    C.check_kernel_grads(k, x)
    assert any("pulled back" in n for n in k.backward.cost({"n": 40, "d": 8, "e": 5}, (2,), "float64").notes)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["rope", "rope_tables", "qk_norm_rope_gqa", "value_norm", "cosine", "score_norms"])
def test_aot_sm90_backward_kernels_fit(name):
    """The kernels that rotate and normalise tiles fit sm_90 in bf16 at d = 64 and 128 (32 query, 8 K / V heads)."""
    from moa.runtime import aot, backward_configs

    k = moa.compile(PROGRAMS[name][0])
    spec = k.backward.runner.spec("bfloat16", 1)
    for d in (64, 128):
        dims = {"h": 32, "g": 8, "n": 4096, "d": d, "e": d}
        picks = backward_configs.choose(k.planner.cg_program, spec, "bfloat16",
                                        {x.name: dims[x.name] for x in k.program.dims}, "sm_90")
        for _, rep in picks.values():
            assert aot.fits(rep, "sm_90")[0] and rep.spills == 0 and rep.shared_bytes <= 227 * 1024, rep.summary()


@pytest.mark.parametrize("score, why", [
    ("where(sum(w * w) > 1.0, dot(Q[i], K[j]), 0.5 * dot(Q[i], K[j]))", "under a where or a comparison"),
    ("dot(Q[i], K[j]) * rsqrt(sum(w * w)) + w[0]", "w is read both inside a reduction of the score"),
])
def test_score_reductions_it_cannot_pull_back_run_unfused(score, why):
    """A reduction the kernels cannot pull back leaves the program on the unfused gradient, which stays exact."""
    k = moa.compile(f"dim n, d, e\nin Q[n, d], K[n, d], V[n, e], w[d]\nS[i, j] = {score}\n"
                    "out O = softmax(S, axis=-1) @ V\n")
    assert why in (k.backward.unfused_reason or "")
    x = C.inputs(k.program, {"n": 20, "d": 4, "e": 3}, 0)
    C.check_kernel_grads(k, x)


MODELS = {
    # OLMo 2: the RMS norm of the whole projected q (across heads), one sum over the reshaped row
    "olmo2": ("dim h, n, d, e\nparam eps = 1e-6\nin Q[h, n, d], K[h, n, d], V[h, n, e], wq[h * d], wk[h * d]\n"
              "Qt = transpose(Q, [1, 0, 2])\nKt = transpose(K, [1, 0, 2])\n"
              "Qn[a, i, k] = Q[a, i, k] * rsqrt(sum(reshape(Qt[i] * Qt[i], [h * d])) / (h * d) + eps) * wq[a * d + k]\n"
              "Kn[a, j, k] = K[a, j, k] * rsqrt(sum(reshape(Kt[j] * Kt[j], [h * d])) / (h * d) + eps) * wk[a * d + k]\n"
              "S[a, i, j] = where(j <= i, dot(Qn[a, i], Kn[a, j]) / sqrt(d), -inf)\n"
              "out O[a] = softmax(S[a], axis=-1) @ V[a]\n", {"h": 3, "n": 29, "d": 4, "e": 5}),
    # DeepSeek's decoupled RoPE: q_nope . k_nope + q_rope . k_rope, k_rope shared by the heads, as one contraction
    # of the operands joined along the head dim (clamped reads under a where)
    "decoupled": ("dim h, n, dn, dr, e\nin QN[h, n, dn], QR[h, n, dr], KN[h, n, dn], KR[n, dr], V[h, n, e]\n"
                  "Qc[a, i, k:dn + dr] = where(k < dn, QN[a, i, min(k, dn - 1)], QR[a, i, max(k - dn, 0)])\n"
                  "Kc[a, j, k:dn + dr] = where(k < dn, KN[a, j, min(k, dn - 1)], KR[j, max(k - dn, 0)])\n"
                  "S[a, i, j] = where(j <= i, dot(Qc[a, i], Kc[a, j]) / sqrt(dn + dr), -inf)\n"
                  "out O[a] = softmax(S[a], axis=-1) @ V[a]\n", {"h": 2, "n": 29, "dn": 6, "dr": 4, "e": 5}),
    # the projected q as it comes out of a linear layer, [n, h * d], read per head
    "flat_q": ("dim h, n, d\nin Qf[n, h * d], K[n, d], V[n, d]\nQ[a:h, i, k:d] = Qf[i, a * d + k]\n"
               "S[a, i, j] = dot(Q[a, i], K[j])\nout O[a] = softmax(S[a], axis=-1) @ V\n", {"h": 2, "n": 20, "d": 4}),
}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_model_spellings_train_fused(name):
    """Spellings the refusal messages recommend (a norm across heads, two contractions as one) train through the
    fused kernels; the pullback solves every index (reshape's r // d and r % d, the clamps under the where)."""
    src, dims = MODELS[name]
    k = moa.compile(src)
    assert k.backward.unfused_reason is None
    runner = k.backward.runner
    gp = pullback_grad(k.planner.cg_program, outputs(runner.sched, runner.spec("float64", 0).pulled))
    assert "==" not in show_grad(gp), show_grad(gp)
    x = C.inputs(k.program, dims, 0)
    C.check_kernel_grads(k, x)


def test_olmo2_against_torch_and_the_messages_that_lead_there():
    """The norm across heads in torch; the nested spelling's refusal names the reshape, the two-dot score's the
    joined operands."""
    src, dims = MODELS["olmo2"]
    k = moa.compile(src)
    x = C.inputs(k.program, dims, 1, batch=())
    h, n, d = 3, 29, 4

    def norm(t, w):
        flat = t.transpose(0, 1).reshape(n, h * d)
        flat = flat * torch.rsqrt((flat * flat).mean(-1, keepdim=True) + 1e-6) * w
        return flat.reshape(n, h, d).transpose(0, 1)

    want = torch.nn.functional.scaled_dot_product_attention(norm(x["Q"], x["wq"]), norm(x["K"], x["wk"]), x["V"],
                                                            is_causal=True)
    assert (k(**x) - want).abs().max().item() < 1e-12
    nested = src.replace("sum(reshape(Qt[i] * Qt[i], [h * d]))", "sum(qs[i])").replace(
        "Qt = transpose(Q, [1, 0, 2])\n", "qs[i, a] = sum(Q[a, i] * Q[a, i])\n")
    from moa.errors import UnsupportedError
    with pytest.raises(UnsupportedError, match=r"sum\(reshape\(Qt\[i\] \* Qt\[i\], \[h \* d\]\)\)"):
        moa.compile(nested)(**x)
    two = MODELS["decoupled"][0].replace("dot(Qc[a, i], Kc[a, j])", "(dot(QN[a, i], KN[a, j]) + dot(QR[a, i], KR[j]))")
    with pytest.raises(UnsupportedError, match="joined along the head dim"):
        moa.compile(two)(**C.inputs(moa.compile(two).program, MODELS["decoupled"][1], 0))


def test_the_docs_show_the_tested_spellings():
    text = open("docs/variants.md").read()
    assert f"```\n{MODELS['decoupled'][0]}```" in text
    norm = "sum(reshape(Qt[i] * Qt[i], [h * d]))"
    assert norm in text and norm in MODELS["olmo2"][0]


def test_explain_shows_the_backward_and_the_pullback():
    """`moa explain` says how training differentiates the output: the fused kernels and the operand pullback's
    gradient DNF (the grouped head solved as a sum over the group: t0 + u3*(h // g)), or why it runs unfused."""
    k = moa.compile(PROGRAMS["qk_norm_rope_gqa"][0])
    text = k.explain()
    assert "backward (training): fused kernels _attn_bwd_dkdv, _attn_bwd_dq" in text
    assert "operand pullback of Q, K" in text and "psi dwq = " in text and "u3*(h // g)" in text
    pi = moa.compile(PI_NORM, s=4, k=8).explain()
    assert "fused kernels _attn_bwd_dkdv, _attn_bwd_dq per branch" in pi and "branch 1: operand pullback of Q" in pi
    two = moa.compile("dim n, d\nin Q[n, d], K[n, d]\nS = Q @ K.T\nout A = softmax(S, axis=-1)\nout B = S")
    assert "backward (training): the gradient DNF evaluated unfused, in float64 (several outputs)" in two.explain()


def test_an_operand_constant_along_the_head_dim(monkeypatch):
    """Kr[j, k] = K[j, 0] (the same value on every lane): the operand tile is broadcast to the whole tile (the
    interpreter refused a [BLOCK_N, 1] tile in tl.dot); gradients through the pullback (found by a fuzzer)."""
    monkeypatch.setattr(backward_run, "INTERPRETER_BLOCKS", (16, 16))
    k = moa.compile("dim n, d, e\nin Q[n, d], K[n, d], V[n, e]\nKr[j:n, k:d] = K[j, 0]\n"
                    "S[i, j] = where(j <= i, dot(Q[i], Kr[j]) / sqrt(d), -inf)\nout O = softmax(S, axis=-1) @ V\n")
    x = C.inputs(k.program, {"n": 20, "d": 4, "e": 3}, 0)
    assert (k(**x) - k.reference(**x)).abs().max().item() < 1e-12
    C.check_kernel_grads(k, x)


def test_the_reference_reads_an_empty_axis_only_under_a_guard():
    """X[n, d // 2] at d = 1 has no column: a read of it under a where that never holds is 0, not an IndexError
    (found by a fuzzer)."""
    k = moa.compile("dim n, d\nin X[n, d // 2], Y[n, d]\n"
                    "out O[i:n, c:d] = where(c // 2 < d // 2, X[i, c // 2], 0.0) + Y[i, c]")
    x = C.inputs(k.program, {"n": 2, "d": 1}, 0)
    assert torch.equal(k.reference(**x), x["Y"])
