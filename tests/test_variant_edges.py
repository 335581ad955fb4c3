"""Edges of the non-softmax families and of the forced schedules found by review: window mixing with anything
around it, the linear form's gate and mask rules, lse / Z at e = 0, non-integer window bounds under hops, empty
outputs in the cost model. Each against the float64 reference (or a clear refusal)."""
import pytest
import torch

import moa
from moa.errors import UnsupportedError
from moa.runtime.costing import cost
from moa.runtime.measuring import measure

F64 = torch.float64
EX = "examples/"
HEAD = "dim n, d, e\nin Q[n, d], K[n, d], V[n, e]\n"


def _x(n, d=4, e=3, seed=0, **extra):
    g = torch.Generator().manual_seed(seed)
    out = {a: torch.randn(n, d if a != "V" else e, generator=g, dtype=F64) for a in "QKV"}
    return {**out, **extra}


@pytest.mark.parametrize("out", ["out O[i] = 2 * (softmax(S[i], axis=-1) @ Vh[i])",
                                 "C[i, j] = where(j <= i, dot(Q[i], K[j]), -inf)\n"
                                 "out O[i] = (softmax(S[i], axis=-1) @ Vh[i]) + (softmax(C[i], axis=-1) @ V)"])
def test_window_mixing_with_an_epilogue_or_another_branch_is_refused(out):
    # the window kernel computed the first branch alone (the epilogue and the other branches were dropped)
    src = open(EX + "bla.moa").read().replace("out O[i] = softmax(S[i], axis=-1) @ Vh[i]", out)
    k = moa.compile(src, W=8, M=3)
    x = _x(30)
    assert k.reference(**x).shape == (30, 3)
    with pytest.raises(UnsupportedError, match="window-mixing"):
        k(**x)


def _same_gradients(k, x: dict, tol: float) -> None:
    """Every input's gradient of sum(O^2) through the kernels equals the reference's autograd."""
    grads = []
    for f in (k, k.reference):
        xs = {a: t.clone().requires_grad_() for a, t in x.items()}
        f(**xs).square().sum().backward()
        grads.append(xs)
    for a in x:
        assert (grads[0][a].grad - grads[1][a].grad).abs().max() <= tol, a


def test_lse_and_normaliser_at_no_value_columns():
    # e = 0 with rows: the kernel still computes the lse (it returned uninitialised memory) and Z (NaN gradients)
    k = moa.compile(EX + "causal.moa")
    x = _x(20)
    _, lse = k.with_lse(**x)
    _, lse0 = k.with_lse(Q=x["Q"], K=x["K"], V=x["V"][:, :0])
    assert torch.equal(lse, lse0)
    k = moa.compile(EX + "power.moa", form="quadratic")
    q, kk = (x[a].clone().requires_grad_(True) for a in "QK")
    k(Q=q, K=kk, V=x["V"][:, :0]).sum().backward()
    assert torch.equal(q.grad, torch.zeros_like(q)) and torch.equal(kk.grad, torch.zeros_like(kk))


@pytest.mark.parametrize("schedule", ["tiled", "hops", "residue"])
def test_a_non_integer_window_bound(schedule):
    # i - j <= 7.5 is i - j <= 7 on integers: the hop loop compared a Python int with a float (a crash)
    k = moa.compile(EX + "dilated_window.moa", schedule=schedule, w=7.5, r=2)
    x = _x(40)
    assert (k(**x) - k.reference(**x)).abs().max() <= 1e-12
    lt = moa.compile(HEAD + "param w = 7.5\nS[i, j] = where(j <= i and i - j < w and i - j != w, "
                            "dot(Q[i], K[j]) / sqrt(d), -inf)\nout O = softmax(S, axis=-1) @ V")
    assert (lt(**x) - moa.compile(EX + "sliding_window.moa", w=7)(**x)).abs().max() <= 1e-12


def test_linear_form_rules():
    pg = HEAD + "in G[n], H[n]\nA[i, j] = where(j <= i, dot(Q[i], K[j]) ^ 2 * exp(G[i] - H[j]), 0)\n" \
                "out O = normalize(A, axis=-1) @ V"
    with pytest.raises(UnsupportedError, match="one gate read at both indices"):
        moa.compile(pg, form="linear")(**_x(10, G=torch.zeros(10, dtype=F64), H=torch.zeros(10, dtype=F64)))
    ge = moa.compile(HEAD + "A[i, j] = where(i >= j, dot(Q[i], K[j]) ^ 2, 0)\nout O = normalize(A, axis=-1) @ V",
                     form="linear")
    x = _x(70)
    assert (ge(**x) - ge.reference(**x)).abs().max() <= 1e-12   # i >= j is the causal mask too
    with pytest.raises(UnsupportedError, match="1 <= p <= 8, got p = 9"):
        moa.compile(EX + "power.moa", form="linear", p=9)(**x)


@pytest.mark.parametrize("name, form, dims", [("linear", "linear", {"n": 20, "d": 4, "e": 0}),
                                              ("power_gated", "linear", {"n": 0, "d": 4, "e": 3}),
                                              ("bla", None, {"n": 20, "d": 4, "e": 0})])
def test_empty_outputs_cost_nothing(name, form, dims):
    k = moa.compile(EX + f"{name}.moa", form=form)
    x = {nd.attrs[0]: torch.randn(*(dims[s.name] for s in nd.shape), dtype=F64) for nd in k.program.inputs}
    m = measure(k, **x)
    c = cost(k, dtype="float64", device="cpu", **dims)
    assert m.flops == c.flops == 0 and m.dram_bytes == c.dram_bytes == 0 and c.tiles_visited == 0
    if name == "bla":
        assert k.reference(**{**x, "Q": x["Q"][:0], "K": x["K"][:0], "V": x["V"][:0]}).shape == (0, 0)


def _grads(k, x, wanted):
    ts = {a: t.clone().requires_grad_(a in wanted) for a, t in x.items()}
    w = torch.randn(k.reference(**x).shape, generator=torch.Generator().manual_seed(3), dtype=F64)
    ref = torch.autograd.grad((k.reference(**ts) * w).sum(), [ts[a] for a in wanted])
    got = torch.autograd.grad((k(**ts) * w).sum(), [ts[a] for a in wanted])
    return ref, got


@pytest.mark.parametrize("bias", ["where(j >= 1, G[j - 1], 0)", "where(j <= 7, G[j + 1], 0) + G[j]"])
def test_a_bias_read_under_a_where_gets_its_gradient(bias):
    # the fused kernels scattered only the reads the score's sympy form reaches: G under a where got 0 (wrong)
    k = moa.compile(HEAD + f"in G[n]\nS[i, j] = where(j <= i, dot(Q[i], K[j]) + {bias}, -inf)\n"
                           "out O = softmax(S, axis=-1) @ V")
    x = _x(9, G=torch.randn(9, generator=torch.Generator().manual_seed(1), dtype=F64))
    ref, got = _grads(k, x, ("Q", "G"))
    for r, o in zip(ref, got):
        assert (r - o).abs().max() <= 1e-12 * max(1.0, r.abs().max().item())


def test_reference_guards_follow_the_axes():
    # a comprehension as the where's branch keeps its cells' guard (a false out-of-range error); a where over an
    # array inside a scalar where in a comprehension: the outer guard is the row's (a wrong, zeroed gradient)
    k = moa.compile(HEAD + "in G[n]\nGp[i:n, j:n] = G[i - j]\nM[i:n, j:n] = j <= i\n"
                           "S = where(M, Q @ K.T + Gp, -inf)\nout O = softmax(S, axis=-1) @ V")
    x = _x(9, G=torch.randn(9, dtype=F64))
    assert (k(**x) - k.reference(**x)).abs().max() <= 1e-12
    k = moa.compile("dim n, m\nin A[n, m], c[n]\nout O[i:n] = where(c[i] > 0, sum(where(A[i] > 0, exp(A[i]), 0), "
                    "axis=0), 0)")
    a = torch.randn(4, 6, dtype=F64, requires_grad=True)
    c = torch.tensor([1.0, -1.0, 1.0, -1.0], dtype=F64)
    (g,) = torch.autograd.grad(k.reference(A=a, c=c).sum(), [a])
    want = torch.where((c[:, None] > 0) & (a > 0), a.exp(), torch.zeros((), dtype=F64))
    assert torch.equal(g, want.detach())


def test_sums_under_a_nonlinear_epilogue_have_gradients():
    # the gradient DNF recomputes the sum inside the epilogue's derivative; free_vars was not scope-aware and
    # factor-out hoisted a factor out of the sum that binds its index (KeyError 'no value for k')
    k = moa.compile(HEAD + "A[i, j] = where(j <= i, sigmoid(dot(Q[i], K[j])), 0)\nW[j, c] = tanh(V[j, c])\n"
                           "out O = relu(A @ W)")
    x = _x(30)
    ref, got = _grads(k, x, ("Q", "K", "V"))
    for r, o in zip(ref, got):
        assert (r - o).abs().max() <= 1e-12 * max(1.0, r.abs().max().item())
    masked_value = moa.compile(HEAD + "A[i, j] = sigmoid(dot(Q[i], K[j]))\n"
                                      "out O[i, c] = sum(A[i] * where(iota(n) <= i, V[:, c], 0), axis=0)")
    assert (masked_value(**x) - masked_value.reference(**x)).abs().max() <= 1e-12


def test_constants_that_fold_to_infinities_and_equalities_with_fractions():
    k = moa.compile(HEAD + "S[i, j] = dot(Q[i], K[j]) * exp(inf)\nout O = softmax(S, axis=-1) @ V")
    x = _x(20)
    assert torch.equal(k(**x).isnan(), k.reference(**x).isnan())
    eq = moa.compile(HEAD + "in doc[n]: int\nS[i, j] = where(doc[i + 1] == 2.5 or j <= i, dot(Q[i], K[j]), -inf)\n"
                            "out O = softmax(S, axis=-1) @ V")
    with pytest.raises(moa.InputError, match="out of range"):   # the read is still evaluated and checked
        eq.reference(**_x(20, doc=torch.zeros(20, dtype=torch.int64)))


@pytest.mark.parametrize("schedule", [None, "hops"])
def test_a_stride_past_the_sequence(schedule):
    # (i - j) % 2^30 == 0: the model enumerated 2^30 residues (MemoryError); the hop loop widened offs_m as a scalar
    k = moa.compile(HEAD + "S[i, j] = where(j <= i and (i - j) % 1073741824 == 0, dot(Q[i], K[j]), -inf)\n"
                           "out O = softmax(S, axis=-1) @ V", schedule=schedule)
    x = _x(70)
    assert (k(**x) - k.reference(**x)).abs().max() <= 1e-12


def test_reference_gradients_of_a_where_over_arrays():
    # the gate of the untaken cells is per cell (it was any-reduced over the array: sqrt's 0 * inf NaN leaked)
    a = torch.tensor([[1.5, -0.3], [0.6, -1.1]], dtype=F64, requires_grad=True)
    for src in ("dim n, m\nin A[n, m]\nout O = where(A > 0.1, sqrt(A), 0.0)",
                "dim n, m\nin A[n, m]\nout O[i:n] = sum(where(A[i] > 0.1, sqrt(A[i]), 0.0), axis=0)"):
        (g,) = torch.autograd.grad(moa.compile(src).reference(A=a).sum(), [a])
        want = torch.where(a > 0.1, 0.5 / a.clamp_min(0.1).sqrt(), torch.zeros((), dtype=F64))
        assert torch.allclose(g, want.detach(), rtol=1e-14, atol=0)


@pytest.mark.parametrize("epilogue", ["(A[i] @ V)[c] / (i + 1)", "(A[i] @ V)[c] * (n - i)"])
def test_decode_with_lengths_evaluates_positional_epilogues_per_batch_index(epilogue):
    # an epilogue reading the row index or the length as a number took the whole cache's values for every batch
    # index (wrong numbers; then refused): it is evaluated per valid length, as a call on K[b, :L_b]
    from moa.runtime.decode_cost import decode_cost
    from moa.runtime.measure import instrument

    k = moa.compile(HEAD + "A[i, j] = where(j <= i, sigmoid(dot(Q[i], K[j])), 0)\n"
                           f"out O[i, c] = {epilogue}")
    g = torch.Generator().manual_seed(0)
    x = {a: torch.randn(3, 64, 8 if a != "V" else 5, generator=g, dtype=F64) for a in "QKV"}
    lens = torch.tensor([10, 64, 10])
    q = torch.stack([x["Q"][b, L - 2:L] for b, L in enumerate(lens.tolist())])
    want = torch.stack([k(Q=x["Q"][b, :L], K=x["K"][b, :L], V=x["V"][b, :L])[-2:]
                        for b, L in enumerate(lens.tolist())])
    with instrument() as c:
        got = k.decode(Q=q, K=x["K"], V=x["V"], cache_len=lens, splits=3)
    assert (got - want).abs().max() <= 1e-12
    p = decode_cost(k, 2, 64, splits=3, dtype="fp64", device="cpu", batch=(3,), cache_len=lens.tolist(), d=8, e=5)
    assert (c.flops, c.dram_bytes_loaded, c.dram_bytes_stored) == (p.flops, p.dram_bytes_loaded, p.dram_bytes_stored)
    perm = torch.randperm(12, generator=g)   # the same cache as shuffled pages of 16 keys
    pool = {a: x[a].reshape(12, 16, -1)[perm.argsort()].reshape(192, -1) for a in "KV"}
    table = perm.reshape(3, 4)
    paged = k.decode(Q=q, **pool, cache_len=lens, block_table=table, page_size=16)
    assert (paged - want).abs().max() <= 1e-12


SINK = """dim h, n, d, e
param w = 30
in Q[h, n, d], K[h, n, d], V[h, n, e], sink[h]
S[a, i, j:n+1] = where(j >= 1, where(j - 1 <= i and i - j + 1 <= w, dot(Q[a, i], K[a, j - 1]) / sqrt(d), -inf), sink[a])
Vp[a, j:n+1, c:e] = where(j >= 1, V[a, j - 1, c], 0)
out O[a] = softmax(S[a], axis=-1) @ Vp[a]
"""


def test_learned_sink_logit_as_one_more_key():
    # docs/variants.md: the gpt-oss sink, e^sink added to every row's normaliser, written as key j = 0; against
    # a plain PyTorch softmax with the sink logit appended (forward and gradients); the log-sum-exp form is
    # refused with the way out in the message
    g = torch.Generator().manual_seed(4)
    x = {a: torch.randn(2, 3, 70, 8, generator=g, dtype=F64) for a in "QKV"}
    x["sink"] = torch.randn(3, generator=g, dtype=F64)

    def oracle(Q, K, V, sink):
        s = Q @ K.transpose(-1, -2) / 8 ** 0.5
        i, j = torch.arange(70)[:, None], torch.arange(70)[None, :]
        s = s.masked_fill(~((j <= i) & (i - j <= 30)), float("-inf"))
        s = torch.cat([sink[:, None, None].expand(*s.shape[:-1], 1), s], -1)
        return torch.softmax(s, -1)[..., 1:] @ V

    k = moa.compile(SINK)
    xs = {a: t.clone().requires_grad_() for a, t in x.items()}
    xr = {a: t.clone().requires_grad_() for a, t in x.items()}
    out, want = k(**xs), oracle(**xr)
    assert (out - want).abs().max() <= 1e-12
    w = torch.randn_like(want)
    (out * w).sum().backward()
    (want * w).sum().backward()
    for a in xs:
        assert (xs[a].grad - xr[a].grad).abs().max() <= 1e-11
    lse_form = moa.compile("dim h, n, d, e\nparam w = 30\nin Q[h, n, d], K[h, n, d], V[h, n, e], sink[h]\n"
                           "S[a, i, j] = where(j <= i and i - j <= w, dot(Q[a, i], K[a, j]) / sqrt(d), -inf)\n"
                           "out O[a, i] = (softmax(S[a, i], axis=-1) @ V[a]) * "
                           "sigmoid(logsumexp(S[a, i], axis=-1) - sink[a])")
    assert (lse_form.reference(**x) - want).abs().max() <= 1e-12
    with pytest.raises(UnsupportedError, match="a learned sink logit is one more key"):
        lse_form(**x)


@pytest.mark.parametrize("score", ["dot(Q[i], K[j]) * where(j > i - 3, 0.7, 1.2)",
                                   "sigmoid(dot(Q[i], K[j]) + where(j > i - 3, 0.7, 1.2))"])
def test_a_where_of_two_literals_is_float64_in_float64_kernels(score):
    # tl.where(mask, 0.7, 1.2) is a float32 tile: 0.7 was rounded (relative errors 5e-9 .. 8e-8, found by a
    # fuzzing helper); the literals are typed in the accumulation dtype
    k = moa.compile(HEAD + f"S[i, j] = {score}\nout O = softmax(S, axis=-1) @ V")
    x = _x(40)
    assert "tl.full([], 0.7, tl.float64)" in k.source(dtype="float64")
    assert (k(**x) - k.reference(**x)).abs().max() <= 1e-13


def test_gradient_of_a_relative_bias_under_a_data_mask_with_two_outputs():
    # the bias gradient substitutes j = i + n - 1 - u into the mask's doc[j]: the DNF evaluation read doc out of
    # range beside the conjunct that guards it ("index out of range", found by a fuzzing helper); `and` / `or`
    # evaluate their right operand under the left one
    k = moa.compile("dim n, d, e\nin Q[n, d], K[n, d], V[n, e], rb[2 * n - 1]\nin doc[n]: int\n"
                    "S[i, j] = where(doc[j] <= 1, dot(Q[i], K[j]) + rb[i - j + n - 1], -inf)\n"
                    "out O0 = softmax(S, axis=-1) @ V\nout O1 = exp(1.0) * (softmax(S, axis=-1) @ V)\n")
    x = _x(9, doc=torch.tensor([0, 1, 2, 1, 0, 3, 1, 1, 0]))
    grads = []
    for f in (k, k.reference):
        rb = torch.linspace(-1, 1, 17, dtype=F64).requires_grad_()
        o = f(**x, rb=rb)
        (o["O0"].sum() + o["O1"].square().sum()).backward()
        grads.append(rb.grad)
    assert (grads[0] - grads[1]).abs().max() <= 1e-12


@pytest.mark.parametrize("lam_shape", [(2, 1), (1,)])
def test_a_learnable_scalar_in_the_epilogue_with_batch_axes(lam_shape):
    # differential attention's lam[0]: a read at a constant index in the epilogue's gradient DNF was a (B,) tensor
    # aligned with the value axis (raw RuntimeError in .backward() with any batch axis; found by a helper)
    k = moa.compile("dim n, d, e\nin Q[n, d], K[n, d], V[n, e], W[n, d], lam[1]\n"
                    "S1[i, j] = where(j <= i, dot(Q[i], K[j]), -inf)\nS2[i, j] = where(j <= i, dot(W[i], K[j]), -inf)\n"
                    "out O[i] = (softmax(S1[i], axis=-1) @ V) - lam[0] * (softmax(S2[i], axis=-1) @ V)")
    g = torch.Generator().manual_seed(1)
    x = {a: torch.randn(2, 33, 4, generator=g, dtype=F64) for a in ("Q", "K", "V", "W")}
    x["lam"] = torch.randn(*lam_shape, generator=g, dtype=F64)
    _same_gradients(k, x, 1e-11)


def test_gradient_of_abs_of_a_scaled_score():
    # sympy's Abs differentiates a possibly complex argument: abs(q.k / sqrt(d) + b[i]) gave atan2 terms and the
    # backward was refused (found by a fuzzing helper); |x|' = sign(x) over the reals
    k = moa.compile("dim n, d, e\nin Q[n, d], K[n, d], V[n, e], bi[n]\n"
                    "A[i, j] = where(j <= i, abs(dot(Q[i], K[j]) / sqrt(d) + bi[i]), 0)\nout O = A @ V")
    x = _x(40, bi=torch.randn(40, dtype=F64))
    _same_gradients(k, x, 1e-10)


ROPE = """dim n, d, e
param base = 10000
in Q[n, d], K[n, d], V[n, e]
Qr[i, k] = Q[i, k] * cos(i * base ^ (-2 * (k % (d // 2)) / d)) + where(k < d // 2, -1, 1) * Q[i, (k + d // 2) % d] * sin(i * base ^ (-2 * (k % (d // 2)) / d))
Kr[j, k] = K[j, k] * cos(j * base ^ (-2 * (k % (d // 2)) / d)) + where(k < d // 2, -1, 1) * K[j, (k + d // 2) % d] * sin(j * base ^ (-2 * (k % (d // 2)) / d))
S[i, j] = where(j <= i, dot(Qr[i], Kr[j]) / sqrt(d), -inf)
out O = softmax(S, axis=-1) @ V
"""  # noqa: E501


def _rope(x, base=10000.0):
    """GPT-NeoX rotary embedding of x [n, d] (halves rotated), independently of moa."""
    n, d = x.shape
    theta = base ** (-2 * torch.arange(d // 2, dtype=F64) / d)
    ang = torch.arange(n, dtype=F64)[:, None] * theta[None, :]
    a, b = x[:, :d // 2], x[:, d // 2:]
    return torch.cat([a * ang.cos() - b * ang.sin(), b * ang.cos() + a * ang.sin()], -1)


@pytest.mark.parametrize("factor", ["2 ^ (-k)", "where(k < 4, 1.5, -0.5)", "sin(k + 1.0)", "exp(-k)"])
def test_the_same_factor_of_the_contraction_index_on_both_operands(factor):
    """A factor computed once for both dot operands kept its own name: the q operand's tile was written over it
    and the k operand read the q tile instead (wrong outputs, NaN for xPos; found by a user porting RoPE)."""
    src = HEAD + f"Qr[i, k] = Q[i, k] * {factor}\nKr[j, k] = K[j, k] * {factor}\n" \
        "out O = softmax(Qr @ Kr.T, axis=-1) @ V\n"
    k = moa.compile(src)
    x = _x(40, d=8)
    assert (k(**x) - k.reference(**x)).abs().max().item() < 1e-12
    assert measure(k, **x).flops == cost(k, dtype="float64", device="cpu", n=40, d=8, e=3).flops
    got = {a: t.clone().requires_grad_() for a, t in x.items()}
    want = {a: t.clone().requires_grad_() for a, t in x.items()}
    k(**got).sum().backward()
    k.reference(**want).sum().backward()
    for a in x:
        assert (got[a].grad - want[a].grad).abs().max().item() < 1e-12, a


def test_rotary_embeddings_in_the_program_against_torch():
    """RoPE written in the language (the docs' program): forward and gradients equal a plain torch RoPE + causal
    softmax attention in float64; the rotation is computed on the operand tiles, with no rotated copy of Q or K
    in memory."""
    k = moa.compile(ROPE)
    x = {a: t.requires_grad_() for a, t in _x(70, d=8, e=4, seed=3).items()}
    out = k(**x)
    q, kk = _rope(x["Q"]), _rope(x["K"])
    mask = torch.ones(70, 70, dtype=torch.bool).tril()
    want = torch.nn.functional.scaled_dot_product_attention(q, kk, x["V"], attn_mask=mask)
    assert (out - want).abs().max().item() < 1e-12
    cot = torch.randn(70, 4, dtype=F64, generator=torch.Generator().manual_seed(4))
    got = torch.autograd.grad(out, list(x.values()), cot)
    ref = torch.autograd.grad(want, list(x.values()), cot)
    for a, g1, g2 in zip(x, got, ref):
        assert (g1 - g2).abs().max().item() < 1e-12, a
    assert measure(k, **{a: t.detach() for a, t in x.items()}).flops == \
        cost(k, dtype="float64", device="cpu", n=70, d=8, e=4).flops


def test_the_rope_program_of_the_variants_page_is_this_one():
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "docs" / "variants.md").read_text()
    assert f"```\n{ROPE}```" in text


def test_erf_scores_in_the_kernel_and_its_gradient():
    """erf (Laplace attention's 0.5 (1 + erf((s - mu) / (sigma sqrt 2))), GELU-shaped maps): forward and
    gradients against torch in float64; one transcendental per score in the cost model as in the kernel."""
    import math

    src = ("dim n, d, e\nparam mu = 0.707107, s = 0.282095\nin Q[n, d], K[n, d], V[n, e]\n"
           "S[i, j] = where(j <= i, 0.5 * (1 + erf((dot(Q[i], K[j]) / sqrt(d) - mu) / (s * sqrt(2.0)))), 0)\n"
           "out O = S @ V\n")
    k = moa.compile(src)
    x = {a: t.requires_grad_() for a, t in _x(70, d=8, e=4, seed=5).items()}
    w = 0.5 * (1 + torch.erf((x["Q"] @ x["K"].T / math.sqrt(8) - 0.707107) / (0.282095 * math.sqrt(2.0))))
    want = (w * torch.ones(70, 70, dtype=F64).tril()) @ x["V"]
    out = k(**x)
    assert (out - want).abs().max().item() < 1e-12
    for a, g1, g2 in zip(x, torch.autograd.grad(out.sum(), list(x.values())),
                         torch.autograd.grad(want.sum(), list(x.values()))):
        assert (g1 - g2).abs().max().item() < 1e-12, a
    plain = {a: t.detach() for a, t in x.items()}
    assert measure(k, **plain).transcendentals == cost(k, dtype="float64", device="cpu", n=70, d=8, e=4).transcendentals
