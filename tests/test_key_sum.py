"""Plain sums over the keys, O = A @ V with no softmax or normalize (sigmoid attention, retention, SSD-style gated
forms): rule `key-sum` (moa/onf.py), the kernel's third monoid (acc only), its fused backward, its schedules, tile
skipping by the data and the cost model, each against the float64 reference."""
import pytest
import torch

import moa
from moa import dnf as D
from moa.errors import UnsupportedError
from moa.onf import key_sum
from moa.runtime.costing import cost
from moa.runtime.decode_cost import decode_cost
from moa.runtime.measure import instrument
from moa.runtime.measuring import measure

F64 = torch.float64
HEAD = "dim n, d, e\nin Q[n, d], K[n, d], V[n, e]\n"
COUNTERS = ("flops", "transcendentals", "dram_bytes", "tiles_visited")


def _x(n, d=8, e=5, seed=0, **extra):
    g = torch.Generator().manual_seed(seed)
    x = {"Q": torch.randn(n, d, generator=g, dtype=F64), "K": torch.randn(n, d, generator=g, dtype=F64),
         "V": torch.randn(n, e, generator=g, dtype=F64)}
    for name, make in extra.items():
        x[name] = make(g)
    return x


def _rel(a, b) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-300)).item()


def _grads_match(k, x, tol=1e-11):
    fl = {n: t.clone().requires_grad_(t.is_floating_point()) for n, t in x.items()}
    w = torch.randn(k.reference(**x).shape, generator=torch.Generator().manual_seed(7), dtype=F64)
    ts = [t for t in fl.values() if t.requires_grad]
    ref = torch.autograd.grad((k.reference(**fl) * w).sum(), ts)
    got = torch.autograd.grad((k(**fl) * w).sum(), ts)
    for r, o in zip(ref, got):
        assert _rel(o, r) <= tol


SUMS = {   # score forms: a mask around the weight or the whole product, factors in any order, gates, constants
    "sigmoid": "A[i, j] = where(j <= i, sigmoid(dot(Q[i], K[j]) / sqrt(d) - 2), 0)\nout O = A @ V",
    "relu2": "A[i, j] = relu(dot(Q[i], K[j])) ^ 2\nout O = A @ V",
    "product_in_where": "P[i, c, j] = where(j <= i, V[j, c] * dot(Q[i], K[j]), 0)\nout O[i, c] = sum(P[i, c], axis=0)",
    "value_factors": "in G[n]\nA[i, j] = where(j <= i and i - j < 9, dot(Q[i], K[j]), 0)\n"
                     "out O[i, c] = sum(A[i] * (V[:, c] * G), axis=0)",
    "gated": "in G[n]\nA[i, j] = where(j <= i, dot(Q[i], K[j]) * exp(G[i] - G[j]), 0)\nout O = A @ V",
}


def _gates(g, n=40):
    return torch.cumsum(-torch.rand(n, generator=g, dtype=F64) * 0.3, 0)


@pytest.mark.parametrize("name", sorted(SUMS))
@pytest.mark.parametrize("n", [1, 17, 40])
def test_sum_kernels_equal_the_reference(name, n):
    k = moa.compile(HEAD + SUMS[name])
    assert k.planner.schedules["O"].branches[0].kind == "sum"
    x = _x(n, G=lambda g: _gates(g, n)) if "G[n]" in SUMS[name] else _x(n)
    assert _rel(k(**x), k.reference(**x)) <= 1e-12
    _grads_match(k, x)
    m = measure(k, **x)
    c = cost(k, dtype="float64", device="cpu", n=n, d=8, e=5)
    assert {f: getattr(m, f) for f in COUNTERS} == {f: getattr(c, f) for f in COUNTERS}


def test_rule_key_sum_regroups_the_product():
    k = moa.compile(HEAD + SUMS["value_factors"])
    out = next(o for o in D.dnf(k.program) if o.name == "O")
    *lead, i, c = out.vars
    ks = key_sum(out.expr, set(lead), i, c)
    assert isinstance(ks, D.KeySum)
    assert D.free_vars(ks.weight) <= {i, ks.var} and D.free_vars(ks.value) <= {ks.var, c}
    assert c in D.free_vars(ks.value) and i in D.free_vars(ks.weight)


def test_products_without_a_contraction_are_not_attention():
    # A @ V with A free of any q . k (a mask of ones; Q @ K.T itself): no kernel, the reference stays
    for src in ("A[i:n, j:n] = where(j <= i, 1.0, 0.0)\nout O = A @ V", "out O = Q @ K.T"):
        k = moa.compile(HEAD + src)
        x = _x(20)
        assert k.reference(**x).shape[0] == 20
        with pytest.raises(UnsupportedError, match="contraction over a key axis"):
            k(**x)


def test_reductions_that_are_not_key_sums_stay_in_the_epilogue():
    # PiAttention-style gate: +red_k Q[i, k] wg[k] has no column index: not a branch; a value reading i is none
    src = HEAD + ("in wg[d]\nS[i, j] = where(j <= i, dot(Q[i], K[j]), -inf)\n"
                  "out O[i, c] = sigmoid(dot(Q[i], wg)) * (softmax(S[i], axis=-1) @ V)[c]")
    k = moa.compile(src)
    assert [b.kind for b in k.planner.schedules["O"].branches] == ["softmax"]
    out = next(o for o in D.dnf(k.program) if o.name == "O")
    i, c = out.vars
    gate = next(x for x in D.nodes(out.expr) if isinstance(x, D.Reduce))
    assert key_sum(gate, set(), i, c) is None
    bad = D.Reduce("sum", gate.var, gate.extent, D.Op("mul", (D.Read("V", (gate.var, c)), D.Read("V", (i, c)))))
    assert key_sum(bad, set(), i, c) is None


def test_a_sum_beside_a_softmax_branch():
    src = HEAD + ("S[i, j] = where(j <= i, dot(Q[i], K[j]) / sqrt(d), -inf)\n"
                  "A[i, j] = where(j <= i, sigmoid(dot(Q[i], K[j])), 0)\n"
                  "out O = softmax(S, axis=-1) @ V + 0.5 * (A @ V)")
    k = moa.compile(src)
    assert sorted(b.kind for b in k.planner.schedules["O"].branches) == ["softmax", "sum"]
    x = _x(70)
    assert _rel(k(**x), k.reference(**x)) <= 1e-12
    _grads_match(k, x)


@pytest.mark.parametrize("schedule", ["tiled", "hops", "residue"])
def test_strided_sums_in_every_schedule(schedule):
    src = HEAD + ("param w = 30, r = 3\n"
                  "A[i, j] = where(j <= i and i - j <= w and (i - j) % r == 0, sigmoid(dot(Q[i], K[j])), 0)\n"
                  "out O = A @ V")
    k = moa.compile(src, schedule=schedule)
    assert k.planner.schedules["O"].branches[0].kind == "sum"
    for n in (17, 100):
        x = _x(n, seed=n)
        assert _rel(k(**x), k.reference(**x)) <= 1e-12
        m = measure(k, **x)
        c = cost(k, dtype="float64", device="cpu", n=n, d=8, e=5)
        assert {f: getattr(m, f) for f in COUNTERS} == {f: getattr(c, f) for f in COUNTERS}
        assert c.tiles_visited == c.tiles_needed


def test_data_skipped_tiles_of_a_sum():
    src = HEAD + "in doc[n]: int\nA[i, j] = where(doc[i] == doc[j] and j <= i, sigmoid(dot(Q[i], K[j])), 0)\n" \
                 "out O = A @ V"
    k = moa.compile(src)
    n = 300
    doc = torch.repeat_interleave(torch.arange(3), torch.tensor([100, 150, 50]))
    x = _x(n, doc=lambda g: doc)
    assert _rel(k(**x), k.reference(**x)) <= 1e-12
    m = measure(k, **x)
    c = cost(k, dtype="float64", device="cpu", inputs={"doc": doc}, n=n, d=8, e=5)
    assert {f: getattr(m, f) for f in COUNTERS} == {f: getattr(c, f) for f in COUNTERS}
    full = cost(k, dtype="float64", device="cpu", n=n, d=8, e=5)
    assert c.tiles_visited < full.tiles_visited   # the ids skip tiles of different documents
    _grads_match(k, x)


def test_batched_float32_sums():
    k = moa.compile(HEAD + SUMS["sigmoid"])
    g = torch.Generator().manual_seed(3)
    x = {n: torch.randn(2, 3, 50, 8, generator=g) for n in "QK"}
    x["V"] = torch.randn(2, 3, 50, 5, generator=g)
    out = k(**x)
    assert out.dtype == torch.float32 and out.shape == (2, 3, 50, 5)
    assert _rel(out.double(), k.reference(**{n: t.double() for n, t in x.items()})) <= 2e-6


def test_the_linear_form_is_not_derived_for_sums():
    with pytest.raises(UnsupportedError, match="plain sum A @ V runs the quadratic kernel"):
        moa.compile(HEAD + SUMS["sigmoid"], form="linear")(**_x(40))


@pytest.mark.parametrize("splits", [1, 3])
@pytest.mark.parametrize("nq", [1, 3, 16])
def test_decoding_a_sum(nq, splits):
    # split-KV: each split's partial (O_s, 1) adds up (no weights, no division); the last n_q rows of the call
    k = moa.compile("examples/sigmoid.moa")
    g = torch.Generator().manual_seed(nq)
    x = {a: torch.randn(2, 300, 8 if a != "V" else 5, generator=g, dtype=F64) for a in "QKV"}
    full = k(**x)
    o = k.decode(Q=x["Q"][:, -nq:], K=x["K"], V=x["V"], splits=splits)
    assert _rel(o, full[:, -nq:]) <= 1e-12
    with instrument() as c:
        k.decode(Q=x["Q"][:, -nq:], K=x["K"], V=x["V"], splits=splits)
    p = decode_cost(k, nq, 300, splits=splits, dtype="fp64", device="cpu", batch=(2,), d=8, e=5)
    assert (c.flops, c.transcendentals, c.dram_bytes_loaded, c.dram_bytes_stored) == \
        (p.flops, p.transcendentals, p.dram_bytes_loaded, p.dram_bytes_stored)


def test_decoding_sums_with_heads_lengths_and_pages():
    # retention's per-head decays; GQA packing of a gated sum; valid lengths and a shuffled paged cache
    r = moa.compile("examples/retention.moa")
    g = torch.Generator().manual_seed(5)
    x = {a: torch.randn(2, 4, 200, 8 if a != "V" else 5, generator=g, dtype=F64) for a in "QKV"}
    assert _rel(r.decode(Q=x["Q"][:, :, -2:], K=x["K"], V=x["V"], splits=3), r(**x)[..., -2:, :]) <= 1e-12
    gqa = moa.compile("dim h, g, n, d, e\nin Q[h, n, d], K[g, n, d], V[g, n, e], G[n]\n"
                      "A[a, i, j] = where(j <= i, dot(Q[a, i], K[a // (h // g), j]) * exp(G[i] - G[j]), 0)\n"
                      "out O[a] = A[a] @ V[a // (h // g)]")
    q, kk, v = (torch.randn(s, generator=g, dtype=F64) for s in ((8, 1, 8), (2, 160, 8), (2, 160, 5)))
    gates = torch.cumsum(-torch.rand(160, generator=g, dtype=F64) * 0.1, 0)
    lens = torch.tensor(120)
    want = gqa(Q=torch.randn(8, 120, 8, dtype=F64).index_copy(1, torch.tensor([119]), q), K=kk[:, :120],
               V=v[:, :120], G=gates[:120])[:, -1:]
    got, st = gqa.decode(Q=q, K=kk, V=v, G=gates, cache_len=lens, splits=2, stats=True)
    assert st.packed_heads > 1 and _rel(got, want) <= 1e-12
    pages = torch.randperm(10, generator=g)
    pool = [torch.zeros_like(t) for t in (kk, v, gates)]   # keys, values and the gates in the pool's layout
    for t, p in enumerate(pages.tolist()):
        pool[0][:, p * 16:(p + 1) * 16] = kk[:, t * 16:(t + 1) * 16]
        pool[1][:, p * 16:(p + 1) * 16] = v[:, t * 16:(t + 1) * 16]
        pool[2][p * 16:(p + 1) * 16] = gates[t * 16:(t + 1) * 16]
    paged = gqa.decode(Q=q, K=pool[0], V=pool[1], G=pool[2], cache_len=lens, block_table=pages, page_size=16)
    assert _rel(paged, want) <= 1e-12


def test_varlen_and_two_branch_decode_of_sums():
    k = moa.compile("examples/sigmoid.moa")
    g = torch.Generator().manual_seed(9)
    x = {a: torch.randn(300, 8 if a != "V" else 5, generator=g, dtype=F64) for a in "QKV"}
    cu = torch.tensor([0, 1, 70, 300])
    sep = torch.cat([k(**{a: t[cu[s]:cu[s + 1]] for a, t in x.items()}) for s in range(3)])
    assert _rel(k.varlen(cu, cu, **x, splits=2), sep) <= 1e-12
    two = moa.compile(HEAD + "S[i, j] = where(j <= i, dot(Q[i], K[j]) / sqrt(d), -inf)\n"
                             "A[i, j] = where(j <= i, sigmoid(dot(Q[i], K[j])), 0)\n"
                             "out O = softmax(S, axis=-1) @ V + 0.5 * (A @ V)")
    full = two(**x)
    for splits in (1, 3):
        assert _rel(two.decode(Q=x["Q"][-3:], K=x["K"], V=x["V"], splits=splits), full[-3:]) <= 1e-12


def test_unmasked_unnormalised_linear_attention_says_why_it_has_no_kernel():
    # (Q @ K.T) @ V with no mask reassociates to Q @ (K.T @ V): the refusal said no A @ V was found in a program
    # holding one (found by a fuzzing helper); it names the reassociation now
    k = moa.compile("dim n, d, e\nin Q[n, d], K[n, d], V[n, e]\nS[i, j] = dot(Q[i], K[j]) * 0.5\nout O = S @ V")
    x = torch.randn(6, 3, dtype=torch.float64)
    with pytest.raises(moa.UnsupportedError, match=r"reassociated to Q @ \(K.T @ V\)"):
        k(Q=x, K=x, V=x)
