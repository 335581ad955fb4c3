"""Every rule of the gradient derivation (moa/grad.py GRAD_RULES, moa/grad_scatter.py SCATTER_RULES and the
elimination) on a program that needs it: the derived gradient DNF, evaluated directly in float64
(runtime/grad_eval.py), equals torch.autograd through the unfused reference, and each rule fires."""
from __future__ import annotations

import re

import pytest
import torch

import moa
from moa import grad as G
from moa import grad_scatter as GS
from moa.dnf_nodes import BINDERS, Op, Reduce, children, nodes
from moa.runtime.grad_eval import evaluate_grad

try:
    import grad_cases as C
except ImportError:  # pragma: no cover
    from tests import grad_cases as C

F64 = torch.float64

EWISE = """
dim n, d
in X[n, d], Y[n, d]
A[i, c] = exp(X[i, c] / 4) + log(abs(X[i, c]) + 1) + sqrt(abs(Y[i, c]) + 1) * rsqrt(abs(Y[i, c]) + 2)
B[i, c] = tanh(X[i, c]) * sigmoid(Y[i, c]) + relu(X[i, c]) * elu(Y[i, c]) + sin(X[i, c]) - cos(Y[i, c]) + erf(X[i, c])
C[i, c] = sign(X[i, c]) * X[i, c] + min(X[i, c], Y[i, c]) + max(X[i, c], 2 * Y[i, c]) + X[i, c] ^ 3
D[i, c] = X[i, c] / (Y[i, c] ^ 2 + 1) + -X[i, c] * 2 ^ Y[i, c] + X[i, c] * (i - c) / 3
out O[i, c] = A[i, c] + B[i, c] + C[i, c] - D[i, c]
"""

PROGRAMS = {
    "grad-read": ("dim n, d\nin X[n, d]\nout O[i, c] = X[i, c] * X[i, c]", {"n": 5, "d": 3}),
    "grad-sum": ("dim n, d, e\nin X[n, d], Y[d, e]\nout O = X @ Y", {"n": 5, "d": 4, "e": 3}),
    "grad-ewise": (EWISE, {"n": 6, "d": 7}),
    "grad-where": ("dim n, d\nin X[n, d], Y[n, d]\nout O[i, c] = where(X[i, c] > 0, X[i, c] * Y[i, c], "
                   "exp(Y[i, c]))", {"n": 6, "d": 5}),
    "grad-extremum": ("dim n, d\nin X[n, d]\nout O[c] = max(X[:, c], axis=0) + min(X[:, c], axis=0)",
                      {"n": 7, "d": 4}),
    "grad-softmax-sum": ("examples/causal.moa", {"n": 9, "d": 4, "e": 3}),
    "grad-norm-sum": ("examples/linear.moa", {"n": 9, "d": 4, "e": 3}),
    "grad-logsumexp": ("dim n, d\nin Q[n, d], K[n, d]\nS[i, j] = where(j <= i - 2, dot(Q[i], K[j]), -inf)\n"
                       "out L = logsumexp(S, axis=-1)", {"n": 8, "d": 3}),
    "grad-constant": ("dim n, d\nin X[n, d], t[n]: int\nout O[i, c] = X[i, c] + (i - c) * 0.5 + t[i] * 2",
                      {"n": 5, "d": 3}),
    "solve-index": ("dim n, d\nin X[2 * n, d]\nout O[i:n, c] = X[2 * i, c] * X[i + n, c] + X[2 * n - 1 - i, c]",
                    {"n": 5, "d": 3}),
    "solve-mod-index": ("dim n, d\nin X[n, d]\nout O[i:n, c:d] = X[i, (c + d // 2) % d] * X[(n - 1 - i) % n, c] + "
                        "X[i, (c + 1) % d]", {"n": 7, "d": 5}),
    "solve-floor-index": ("dim n, d\nin X[n, d]\nout O[i:n, c:d] = X[i // 2, c] * X[(i + 1) // 3, c]",
                          {"n": 7, "d": 3}),
    "clamp-index": ("dim n, d\nin X[n, 2], Y[n, d]\nout O[i:n, c:d + 2] = where(c < 2, X[i, min(c, 1)], "
                    "Y[i, max(c - 2, 0)]) * where(c >= 2, Y[i, max(c - 2, 0)], 1.0)", {"n": 5, "d": 3}),
    "split-mod-index": ("dim n, d\nin X[n, d], T[n, 3]\nout O[i:n, c:d] = X[i, c + 1 - 2 * (c % 2)] * T[i, c % 3] + "
                        "X[i, (c // 2) * 2]", {"n": 5, "d": 6}),
    "split-piecewise-index": ("dim n, d\nin X[n, d]\nout O[i:n, c:d] = X[i, where(c % 2 == 0, c + 1, c - 1)] * "
                              "X[where(i < 2, i, i - 2), c]", {"n": 5, "d": 6}),
    "mask-index": ("dim n, d\nin X[n, d]\nout O[i:n, c:d] = X[(i * i) % n, c] * X[(2 * i) % n, c]", {"n": 7, "d": 3}),
    "eliminate": ("examples/causal.moa", {"n": 9, "d": 4, "e": 3}),
}


def _check(src: str, dims: dict, seed: int = 0, x: dict | None = None):
    k = moa.compile(src)
    x = x if x is not None else C.inputs(k.program, dims, seed, batch=(2,))
    cot = C.cotangents(k, x, seed)
    want = C.autograd_grads(k, x, cot)
    gp = G.grad(k.program, k.dnf)
    got = evaluate_grad(k.program, gp, x, cot)
    for name in C.float_names(k.program):
        assert C.rel_err(got[name], want[name]) <= 1e-12, (name, C.rel_err(got[name], want[name]))
    return gp


def test_every_rule_is_tested():
    rules = {r.name for r in G.GRAD_RULES.values()} | {r.name for r in GS.SCATTER_RULES} | \
        {GS.ELIMINATION_RULE.name}
    assert rules == set(PROGRAMS), rules ^ set(PROGRAMS)
    for r in [*G.GRAD_RULES.values(), *GS.SCATTER_RULES, GS.ELIMINATION_RULE]:
        assert r.identity and "=>" in r.identity
        assert r.apply.__doc__ and r.name in r.apply.__doc__, r.name


@pytest.mark.parametrize("rule", sorted(PROGRAMS))
def test_rule_float64(rule, monkeypatch):
    """The rule's program: derived gradient == autograd; and the rule is applied while deriving it."""
    table = {r.name: (owner, key) for owner, key, r in
             [(G.GRAD_RULES, k, r) for k, r in G.GRAD_RULES.items()]}
    fired = []
    if rule in table:
        owner, key = table[rule]
        orig = owner[key]
        monkeypatch.setitem(owner, key, G.Rule(orig.name, orig.identity,
                                               lambda *a: (fired.append(1), orig.apply(*a))[1]))
    src, dims = PROGRAMS[rule]
    gp = _check(src, dims)
    if rule in table:
        assert fired, rule
    text = G.show_grad(gp)
    if rule == "solve-index":
        assert "% 2" in text and " >= 0" in text or "2)" in text   # the coefficient-2 axis keeps a parity guard
    if rule == "mask-index":
        assert "% n) ==" in text
    if rule in ("solve-mod-index", "solve-floor-index", "clamp-index", "split-mod-index", "split-piecewise-index"):
        assert not re.search(r"== u\d", text), text   # every axis solved: no equality mask left


def test_extremum_ties_share_the_gradient():
    """Ties of max / min share the adjoint evenly, as torch.amax / amin do."""
    src, dims = PROGRAMS["grad-extremum"]
    x = {"X": torch.tensor([[1.0, 2.0, 0.0, 3.0], [1.0, 2.0, 0.0, 3.0], [0.5, -1.0, 0.0, 3.0]], dtype=F64)}
    _check(src, {"n": 3, "d": 4}, x=x)


def test_min_max_ties_split_like_torch():
    x = {"X": torch.ones(2, 6, 7, dtype=F64), "Y": torch.ones(2, 6, 7, dtype=F64) * 0.5}
    _check(EWISE, {"n": 6, "d": 7}, x=x)


def _active(e, depth=0) -> int:
    """The most variables active at once while evaluating e (its binders' nesting depth)."""
    inner = depth + 1 if isinstance(e, BINDERS) else depth
    return max([inner] + [_active(k, inner) for k in children(e)])


def test_elimination_factors_the_softmax_gradient():
    """dK and dQ of causal attention nest as FlashAttention's backward: the value axis c innermost (dP - delta),
    never the four-deep sum over (i, j, c, k) at once."""
    k = moa.compile("examples/causal.moa")
    gp = G.grad(k.program, k.dnf)
    for name in ("Q", "K", "V"):
        g = gp.grad_map[name]
        assert _active(g.expr) <= 2, (name, G.show_grad(gp))
    dk = gp.grad_map["K"].expr
    sums = [x for x in nodes(dk) if isinstance(x, Reduce) and x.op == "sum"]
    outer = [x for x in sums if x.var.name == "i"][0]
    assert any(isinstance(x, Reduce) and x.var.name == "c" for x in nodes(outer.body))
    assert not any(isinstance(x, Op) and x.fn == "where" and "c" in {v.name for v in G.free_vars(x.args[0])}
                   for x in nodes(dk))


def test_fully_masked_rows_have_zero_gradient():
    """Rows with no admissible key (i < 3) give exactly 0 gradient, not NaN, and the others match autograd."""
    src = ("dim n, d, e\nin Q[n, d], K[n, d], V[n, e]\nS[i, j] = where(j <= i - 3, dot(Q[i], K[j]), -inf)\n"
           "out O = softmax(S, axis=-1) @ V")
    k = moa.compile(src)
    x = C.inputs(k.program, {"n": 9, "d": 4, "e": 3}, 3)
    cot = C.cotangents(k, x, 3)
    got = evaluate_grad(k.program, G.grad(k.program, k.dnf), x, cot)
    for t in got.values():
        assert torch.isfinite(t).all()
    assert (got["Q"][..., :3, :] == 0).all()
    assert (got["K"][..., -3:, :] == 0).all() and (got["V"][..., -3:, :] == 0).all()
    want = C.autograd_grads(k, x, cot)
    for n in got:
        assert C.rel_err(got[n], want[n]) <= 1e-12


@pytest.mark.parametrize("src, dims", [
    # a condition bounding v by another dim than its extent: v does not take every value of the mod (found by a
    # fuzzer: the solved index read the cotangent out of range)
    ("dim n, d\nin X[n, n], Y[n, d]\nout O[i:n, c:d] = where(c < n, X[i, (c + 1) % n], 0.0) + Y[i, c]",
     {"n": 5, "d": 3}),
    ("dim n, d\nin X[n, 2], Y[n, d]\nout O[i:n, c:d] = where(c < 2, X[i, (c + 1) % 2], 0.0) + Y[i, c]",
     {"n": 3, "d": 1}),
    ("dim n, d\nin X[n, n], Y[n, d]\nout O[i:n, c:d] = where(c <= i, X[i, (c + 1) % (i + 1)], 0.0) + Y[i, c]",
     {"n": 5, "d": 2}),
    # divisors varying over the sums (raw KeyErrors on the extents of the sums they made)
    ("dim n, d\nin X[n, d]\nout O[i:n, c:d] = X[i, c // (i + 1)] + X[i, c % (i + 1)]", {"n": 3, "d": 4}),
    ("dim n, d\nin X[n, n], Y[n, d]\nout O[i:n, c:d] = X[0, c % (i + 1)] * Y[i, c]", {"n": 3, "d": 4}),
])
def test_rules_decline_what_they_cannot_solve(src, dims):
    _check(src, dims)
