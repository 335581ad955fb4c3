"""Every rewrite rule of the psi-reduction (PSI_RULES, FUSION_RULES, LOWERING_RULES) exercised by a small
program: the rule fires, the DNF's extents are proven equal to the IR shape (and to the shape the MoA shape
rule predicts, written here by hand), no intermediate array survives, and the DNF evaluated on random float64
inputs equals the unfused reference to 1e-12."""
from __future__ import annotations

from dataclasses import replace
from functools import lru_cache
from pathlib import Path

import pytest
import sympy as sp
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import moa.dnf as dnf_mod
from moa import symbolic as sy
from moa.dnf import FUSION_RULES, LOWERING_RULES, PSI_RULES, Read, Rule, dnf, nodes
from moa.frontend import elaborate
from moa.runtime.dnf_eval import evaluate_dnf
from moa.runtime.reference import reference

F64 = torch.float64

# id, rules that must fire, program, the output's shape by the MoA shape rule
CASES = [
    ("take", {"psi-take"}, "dim n, d\nin X[n, d]\nout O = take(3, X)\n", ("3", "d")),
    ("take-negative", {"psi-take"}, "dim n, d\nin X[n, d]\nout O = take(-2, X)\n", ("2", "d")),
    ("drop", {"psi-drop"}, "dim n, d\nin X[n, d]\nout O = drop(2, X)\n", ("n - 2", "d")),
    ("drop-negative", {"psi-drop"}, "dim n, d\nin X[n, d]\nout O = drop(-3, X)\n", ("n - 3", "d")),
    ("take-of-drop", {"psi-take", "psi-drop"}, "dim n, d\nin X[n, d]\nout O = take(2, drop(1, X))\n",
     ("2", "d")),
    ("cat", {"psi-cat"}, "dim n, m, d\nin X[n, d], Y[m, d]\nout O = cat(X, Y)\n", ("n + m", "d")),
    ("reverse", {"psi-reverse"}, "dim n, d\nin X[n, d]\nout O = reverse(X)\n", ("n", "d")),
    ("rotate", {"psi-rotate"}, "dim n, d\nin X[n, d]\nout O = rotate(3, X)\n", ("n", "d")),
    ("rotate-negative", {"psi-rotate"}, "dim n, d\nin X[n, d]\nout O = rotate(-2, X)\n", ("n", "d")),
    ("rotate-past-extent", {"psi-rotate"}, "dim n, d\nin X[n, d]\nout O = rotate(n + 1, X)\n", ("n", "d")),
    ("reshape", {"psi-reshape"}, "dim n\nin X[n, 6]\nout O = reshape(X, [n, 2, 3])\n", ("n", "2", "3")),
    ("reshape-flat", {"psi-reshape"}, "dim n\nin X[n, 6]\nout O = reshape(X, [3, 2 * n])\n", ("3", "2*n")),
    ("transpose", {"psi-transpose"}, "dim n, d, e\nin X[n, d, e]\nout O = transpose(X, [2, 0, 1])\n",
     ("e", "n", "d")),
    ("transpose-T", {"psi-transpose"}, "dim n, d\nin X[n, d]\nout O = X.T\n", ("d", "n")),
    ("outer", {"psi-outer"}, "dim n, d\nin x[n], y[d]\nout O = outer(mul, x, y)\n", ("n", "d")),
    ("outer-rank3", {"psi-outer"}, "dim n, d, e\nin x[n], Y[d, e]\nout O = outer(sub, x, Y)\n",
     ("n", "d", "e")),
    ("iota", {"psi-iota", "psi-scalar-extension"}, "dim n\nin x[n]\nout O = x * iota(n)\n", ("n",)),
    ("shape", {"psi-vec", "psi-psi"}, "dim n, d\nin x[n], Y[n, d]\nout O[i] = x[i] * shape(Y)[1]\n", ("n",)),
    ("shape-vector", {"psi-vec"}, "dim n, d\nin Y[n, d]\nout O = shape(Y) * 2.5\n", ("2",)),
    ("psi", {"psi-psi"}, "dim n, d\nin X[n, d]\nout O = psi([2], X)\n", ("d",)),
    ("psi-kept-axis", {"psi-psi"}, "dim n, d\nin X[n, d]\nout O = X[:, 1]\n", ("n",)),
    ("psi-of-psi", {"psi-psi"}, "dim n, d, e\nin X[n, d, e]\nA = X[1]\nout O = A[:, 2]\n", ("d",)),
    ("psi-index-arithmetic", {"psi-psi", "psi-omega"}, "dim n, d\nin X[n, d]\nout O[i:n] = X[n - 1 - i, 0]\n",
     ("n",)),
    ("comprehension", {"psi-omega", "psi-index", "psi-const"},
     "dim n, d\nin X[n, d], y[d]\nout O[i, j] = where(j <= i, X[i, j] * y[j], 0)\n", ("n", "d")),
    ("omega", {"psi-omega", "fuse-softmax-contraction"},
     "dim h, n, m, d\nin S[h, n, m], V[h, m, d]\nout O[a] = softmax(S[a], axis=-1) @ V[a]\n",
     ("h", "n", "d")),
    ("omega-shared", {"psi-omega", "psi-inner-product"},
     "dim h, n, d, e\nin X[h, n, d], W[d, e]\nout O[a] = X[a] @ W\n", ("h", "n", "e")),
    ("sum", {"psi-reduce"}, "dim n, d\nin X[n, d]\nout O = sum(X, axis=0)\n", ("d",)),
    ("max", {"psi-reduce"}, "dim n, d\nin X[n, d]\nout O = max(X, axis=1)\n", ("n",)),
    ("min", {"psi-reduce"}, "dim n, d\nin X[n, d]\nout O = min(X, axis=-1)\n", ("n",)),
    ("sum-vector", {"psi-reduce"}, "dim n\nin x[n]\nout O = sum(x)\n", ()),
    ("softmax", {"psi-softmax", "lower-softmax"}, "dim n, d\nin X[n, d]\nout O = softmax(X, axis=-1)\n",
     ("n", "d")),
    ("softmax-axis0", {"psi-softmax", "lower-softmax"}, "dim n, d\nin X[n, d]\nout O = softmax(X, axis=0)\n",
     ("n", "d")),
    ("softmax-empty-row", {"psi-softmax", "lower-softmax"},
     "dim n\nin X[n, n]\nS[i, j] = where(j < i, X[i, j], -inf)\nout O = softmax(S, axis=-1)\n", ("n", "n")),
    ("normalize", {"psi-normalize", "lower-normalize"},
     "dim n, d\nin X[n, d]\nout O = normalize(exp(X), axis=-1)\n", ("n", "d")),
    ("normalize-zero-row", {"psi-normalize", "lower-normalize"},
     "dim n\nin X[n, n]\nA[i, j] = where(j < i, exp(X[i, j]), 0)\nout O = normalize(A, axis=-1)\n",
     ("n", "n")),
    ("logsumexp", {"psi-logsumexp"}, "dim n, d\nin X[n, d]\nout O = logsumexp(X, axis=1)\n", ("n",)),
    ("logsumexp-axis0", {"psi-logsumexp"}, "dim n, d\nin X[n, d]\nout O = logsumexp(X, axis=0)\n", ("d",)),
    ("matmul", {"psi-inner-product", "psi-input"}, "dim n, d, e\nin X[n, d], Y[d, e]\nout O = X @ Y\n",
     ("n", "e")),
    ("matmul-batched", {"psi-inner-product"}, "dim b, n, d, e\nin X[b, n, d], Y[d, e]\nout O = X @ Y\n",
     ("b", "n", "e")),
    ("matmul-transpose", {"psi-inner-product", "psi-transpose"},
     "dim n, m, d\nin X[n, d], Y[m, d]\nout O = X @ Y.T / sqrt(d)\n", ("n", "m")),
    ("dot", {"psi-inner-product"}, "dim d\nin x[d], y[d]\nout O = dot(x, y)\n", ()),
    ("scalar-extension", {"psi-scalar-extension", "psi-const"},
     "dim n, d\nin X[n, d]\nout O = exp(X) * 2 - X / 3 + 1\n", ("n", "d")),
    ("scalar-extension-index", {"psi-scalar-extension", "psi-index"},
     "dim n, d\nin X[n, d]\nout O = X * n + d\n", ("n", "d")),
    ("fold-mul-one", {"fold-mul-one"}, "dim n, d\nin X[n, d]\nout O = X * 1.0\n", ("n", "d")),
    ("fold-unbounded-param", {"fold-infinite-compare", "fold-boolean-constant"},
     "dim n\nparam w = inf\nin X[n, n]\nout O[i, j] = where(j <= i and i - j <= w, X[i, j], 0)\n", ("n", "n")),
    ("fold-where-true", {"fold-infinite-compare", "fold-boolean-constant"},
     "dim n\nparam w = inf\nin X[n, n]\nout O[i, j] = where(i - j < w, X[i, j], 0) + where(j >= w, X[i, j], 1)\n",
     ("n", "n")),
    ("fuse-softmax", {"fuse-softmax-contraction"}, "dim n, m, e\nin S[n, m], V[m, e]\n"
     "out O = softmax(S, axis=-1) @ V\n",
     ("n", "e")),
    ("fuse-softmax-masked", {"fuse-softmax-contraction"},
     "dim n, e\nin S[n, n], V[n, e]\nC[i, j] = where(j < i, S[i, j], -inf)\n"
     "out O = softmax(C, axis=-1) @ V\n",
     ("n", "e")),
    ("fuse-normalize", {"fuse-normalize-contraction"},
     "dim n, m, e\nin S[n, m], V[m, e]\nout O = normalize(abs(S), axis=-1) @ V\n", ("n", "e")),
    ("unfused-softmax-contraction", {"lower-softmax"},
     "dim n, e\nin S[n, n], V[n, e]\nout O = softmax(S, axis=0) @ V\n", ("n", "e")),
]

ALL_RULES = [*PSI_RULES.values(), *FUSION_RULES, *LOWERING_RULES]


@lru_cache(maxsize=None)
def _compiled(source: str):
    p = elaborate(source)
    return p, dnf(p)


def _fired(source: str, monkeypatch) -> set:
    """The names of the rules that fire while psi-reducing the program (every rule table instrumented)."""
    fired: set = set()

    def spy(rule: Rule) -> Rule:
        def apply(*args):
            out = rule.apply(*args)
            if out is not None:
                fired.add(rule.name)
            return out
        return Rule(rule.name, rule.identity, apply)

    for op, rule in list(PSI_RULES.items()):
        monkeypatch.setitem(PSI_RULES, op, spy(rule))
    monkeypatch.setattr(dnf_mod, "FUSION_RULES", tuple(spy(r) for r in FUSION_RULES))
    monkeypatch.setattr(dnf_mod, "LOWERING_RULES", tuple(spy(r) for r in LOWERING_RULES))
    dnf(elaborate(source))
    return fired


def _reads(outs) -> set:
    return {x.name for o in outs for x in nodes(o.expr) if isinstance(x, Read)}


def test_every_rule_states_its_identity():
    names = [r.name for r in ALL_RULES]
    assert len(set(names)) == len(names)
    for r in ALL_RULES:
        assert isinstance(r, Rule) and r.name
        assert r.identity.strip() and "=>" in r.identity, r
        assert callable(r.apply)


def test_every_rule_is_exercised():
    covered = set().union(*(c[1] for c in CASES))
    assert covered == {r.name for r in ALL_RULES}


@pytest.mark.parametrize("rules, source, shape", [pytest.param(*c[1:], id=c[0]) for c in CASES])
def test_rule_fires_shape_and_no_intermediates(rules, source, shape, monkeypatch):
    p, outs = _compiled(source)
    (name, node), = p.outputs
    (o,) = outs
    # (a) shapes: DNF extents == IR shape == the shape rule, proven symbolically
    want = tuple(sp.sympify(s, locals={d.name: d for d in p.dims}) for s in shape)
    assert len(o.extents) == node.rank == len(want) == len(o.vars)
    for x, y, z in zip(o.extents, node.shape, want):
        assert sy.prove_equal(x, y) is True and sy.prove_equal(y, z) is True, (o.extents, node.shape, want)
    # no array but the inputs survives, and every output variable is distinct
    assert _reads(outs) <= set(p.input_map), _reads(outs)
    assert len(set(o.vars)) == len(o.vars)
    assert not any(isinstance(x, (dnf_mod.SoftmaxAt, dnf_mod.NormalizeAt)) for x in nodes(o.expr))
    # the rule under test fires
    fired = _fired(source, monkeypatch)
    assert rules <= fired, (rules, fired)


def _inputs(p, dims, seed):
    g = torch.Generator().manual_seed(seed)
    return {n.attrs[0]: torch.randn(*[sy.evaluate(s, dims) for s in n.shape], generator=g, dtype=F64)
            for n in p.inputs}


def _close(got, want):
    got, want = got.to(F64), want.to(F64)
    assert got.shape == want.shape
    scale = max(1.0, float(want.abs().max())) if want.numel() else 1.0
    err = float((got - want).abs().max()) if want.numel() else 0.0
    assert err <= 1e-12 * scale, err


DIMS = st.fixed_dictionaries({"n": st.integers(4, 13), "m": st.integers(1, 11), "d": st.integers(3, 9),
                              "e": st.integers(3, 6), "h": st.integers(1, 3), "b": st.integers(1, 3)})


@pytest.mark.parametrize("source, shape", [pytest.param(c[2], c[3], id=c[0]) for c in CASES])
@settings(max_examples=6, deadline=None)
@given(dims=DIMS, seed=st.integers(0, 2**31 - 1))
def test_rule_values(source, shape, dims, seed):
    p, outs = _compiled(source)
    dims = {d.name: dims[d.name] for d in p.dims}
    if "drop(2" in source or "drop(-3" in source:
        dims["n"] = max(dims["n"], 4)
    ins = _inputs(p, dims, seed)
    ref = reference(p, ins)
    got = evaluate_dnf(p, outs, ins)
    assert set(ref) == set(got) == {"O"}
    want_shape = tuple(sy.evaluate(s, dims) for s in p.outputs[0][1].shape)
    assert tuple(ref["O"].shape) == want_shape
    _close(got["O"], ref["O"])


def test_rule_values_with_batch_axes():
    """Extra leading axes broadcast through the DNF evaluation exactly as through the reference."""
    for _, _, source, _ in CASES:
        p, outs = _compiled(source)
        dims = {"n": 6, "m": 5, "d": 4, "e": 3, "h": 2, "b": 2}
        g = torch.Generator().manual_seed(7)
        ins = {n.attrs[0]: torch.randn(2, *[sy.evaluate(s, dims) for s in n.shape], generator=g, dtype=F64)
               for n in p.inputs}
        ref, got = reference(p, ins), evaluate_dnf(p, outs, ins)
        _close(got["O"], ref["O"])


# ---- the ONF's dimension-lifting rule (moa/onf.py LIFTING_RULES): residue-lift --------------------------------------

PI = (Path(__file__).resolve().parents[1] / "examples" / "pi_attention.moa").read_text()
DILATED = (Path(__file__).resolve().parents[1] / "examples" / "dilated_window.moa").read_text()
OFFSET_HEADS = """dim h, n, d, e
in Q[h, n, d], K[h, n, d], V[h, n, e]
S[a, i, j] = where(j <= i + 4 and (j - i + 2) % 5 == 0, dot(Q[a, i], K[a, j]) / sqrt(d) + 0.1 * (j - i), -inf)
out O[a] = softmax(S[a], axis=-1) @ V[a]
"""
NORMALIZE = """dim n, d, e
in Q[n, d], K[n, d], V[n, e]
A[i, j] = where(j <= i and (i - j) % 3 == 0, dot(Q[i], K[j]) ^ 2, 0)
out O = normalize(A, axis=-1) @ V
"""
# id, program, params, stride
LIFT_CASES = [
    ("pi-skips-unbounded", PI, {"k": 3, "s": 4}, 4),
    ("pi-skips-T2", PI, {"k": 3, "s": 3, "T": 2}, 3),
    ("dilated-window", DILATED, {"w": 9, "r": 3}, 3),
    ("offset-and-heads", OFFSET_HEADS, {}, 5),
    ("normalize", NORMALIZE, {}, 3),
]


def _lifted_variant(source, params, stride):
    from moa import onf
    from moa.codegen.names import codegen_view

    p = elaborate(source, **params)
    view = codegen_view(p, dnf(p))
    (o,) = view.dnf
    base = onf.schedule(o)
    (lifted,) = [v for v in onf.variants(base) if v.kind == onf.RESIDUE and v.lift.stride == stride]
    pairs = [(b0, b1) for b0, b1 in zip(base.branches, lifted.branches) if b1.mode == "lift"]
    assert pairs
    return view.program, base, lifted, pairs


def test_lifting_rule_states_its_identity():
    from moa.onf import LIFTING_RULES

    (r,) = LIFTING_RULES
    assert r.name == "residue-lift" and "=>" in r.identity and "i = r + s a" in r.identity
    assert "rho = (r + c) mod s" in r.identity and callable(r.apply)


@pytest.mark.parametrize("source, params, stride", [pytest.param(*c[1:], id=c[0]) for c in LIFT_CASES])
def test_residue_lift_shapes(source, params, stride):
    """Proven with sympy (by the residue class of the extent, n = s q + p): the rows a < rows(r) of the residues
    r < s partition iota(n), the keys b < keys(rho) of the key residues partition iota(m), and the dropped
    conjunct (i - j + c) % s == 0 is identically true under i = r + s a, j = rho + s b."""
    _, base, lifted, pairs = _lifted_variant(source, params, stride)
    rl = lifted.lift
    q = sp.Symbol("q", integer=True, nonnegative=True)
    n = base.row[1]
    for p in range(stride):
        total = sum(rl.rows.xreplace({rl.res: r}) for r in range(stride))
        assert sp.simplify(total.xreplace({n: stride * q + p}) - (stride * q + p)) == 0
    for b0, b1 in pairs:
        lk = b1.lift
        m = lk.extent
        # rho(r) runs over every residue once: the key extents of all residues sum to m
        rhos = sorted(int(lk.base_value.xreplace({rl.res: r})) for r in range(stride))
        assert rhos == list(range(stride))
        for p in range(stride):
            total = sum(lk.keys.xreplace({lk.base: rho}) for rho in range(stride))
            assert sp.simplify(total.xreplace({m: stride * q + p}) - (stride * q + p)) == 0
        # the residue conjunct of the unlifted mask, with rho = r + c - s w (w = floor((r + c) / s))
        from moa.residue import _residue_conjunct

        k, parts, s, c = _residue_conjunct(b0.mask, base.row[0], b0.var)
        assert s == stride
        e = next(x.expr for x in parts[k].args if isinstance(x, dnf_mod.Index) and isinstance(x.expr, sp.Mod))
        w = sp.Symbol("w", integer=True)
        key = lk.key.xreplace({lk.base: rl.res + c - stride * w})
        assert sp.simplify(e.xreplace({base.row[0]: rl.row, b0.var: key})) == 0
        lifted_mask = [] if b1.mask is None else list(nodes(b1.mask))   # ... and is gone from the lifted mask
        assert not any(isinstance(x, dnf_mod.Index) and x.expr.has(sp.Mod) for x in lifted_mask)


@pytest.mark.parametrize("source, params, stride", [pytest.param(*c[1:], id=c[0]) for c in LIFT_CASES])
@pytest.mark.parametrize("n", [1, 2, 7, 23])
def test_residue_lift_values(source, params, stride, n):
    """The lifted reduction, evaluated residue by residue on rows i = r + s a (runtime/dnf_eval.py, float64),
    equals the unlifted one on every row, with the batch axis broadcast."""
    program, base, lifted, pairs = _lifted_variant(source, params, stride)
    rl = lifted.lift
    dims = {"n": n, "d": 5, "e": 3, "h": 2}
    dims = {d.name: dims[d.name] for d in program.dims}
    g = torch.Generator().manual_seed(n)
    ins = {x.attrs[0]: torch.randn(2, *[sy.evaluate(s, dims) for s in x.shape], generator=g, dtype=F64)
           for x in program.inputs}
    i, c = base.row[0], base.col[0]
    lead = [v for v, _ in base.lead]
    lead_ext = [x for _, x in base.lead]
    for b0, b1 in pairs:
        whole = dnf_mod.DnfOutput("O", (*lead, i, c), (*lead_ext, base.row[1], base.col[1]), b0.source, "float")
        want = evaluate_dnf(program, [whole], ins)["O"]
        got = torch.full_like(want, float("nan"))
        for r in range(stride):
            rows = int(sy.evaluate(rl.rows.xreplace({rl.res: r}), dims))
            if rows == 0:
                continue
            fix = {rl.res: sp.Integer(r), b1.lift.base: b1.lift.base_value.xreplace({rl.res: r}), i: r + stride * rl.a}
            node = dnf_mod.subs(b1.source, fix)
            node = replace(node, extent=sp.sympify(node.extent).xreplace(fix))
            part = dnf_mod.DnfOutput("O", (*lead, rl.a, c), (*lead_ext, rows, base.col[1]), node, "float")
            got[..., r::stride, :] = evaluate_dnf(program, [part], ins)["O"]
        _close(got, want)
