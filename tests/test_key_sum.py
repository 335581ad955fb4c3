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


def test_sums_say_what_they_do_not_run_yet():
    k = moa.compile(HEAD + SUMS["sigmoid"])
    x = _x(40)
    with pytest.raises(UnsupportedError, match="plain sum"):
        k.decode(Q=x["Q"][-2:], K=x["K"], V=x["V"])
    with pytest.raises(UnsupportedError, match="plain sum"):
        k.varlen(torch.tensor([0, 10, 40]), torch.tensor([0, 10, 40]), **x)
    with pytest.raises(UnsupportedError, match="plain sum A @ V runs the quadratic kernel"):
        moa.compile(HEAD + SUMS["sigmoid"], form="linear")(**x)
