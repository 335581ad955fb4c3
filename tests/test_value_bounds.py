"""moa/value_bounds.py: bounds on scalar DNF values over index ranges hold at every point (a property test over
random expressions), and codegen uses them: a power whose base is proven positive is one exp2 (RetNet's decay),
a base that can be 0 or negative keeps torch.pow's sign handling; kernels stay exact in float64."""
from __future__ import annotations

import itertools
import math

import sympy as sp
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import moa
from moa import dnf as D
from moa.value_bounds import RULES, bounds, positive

A, B = sp.Symbol("a", integer=True), sp.Symbol("b", integer=True)
N = sp.Symbol("n", integer=True, positive=True)
RANGES = {A: (0.0, 5.0), B: (0.0, 3.0)}


def _value(e, env):
    if isinstance(e, D.Const):
        return float(e.value)
    if isinstance(e, D.Index):
        return float(sp.sympify(e.expr).xreplace({k: sp.Integer(v) for k, v in env.items()}))
    a = [_value(x, env) for x in e.args]
    f = {"add": lambda x, y: x + y, "sub": lambda x, y: x - y, "neg": lambda x: -x, "mul": lambda x, y: x * y,
         "div": lambda x, y: x / y, "pow": math.pow, "exp": math.exp, "sqrt": math.sqrt,
         "sigmoid": lambda x: 1 / (1 + math.exp(-x)), "erf": math.erf, "min": min, "max": max}[e.fn]
    return f(*a)


LEAVES = st.one_of(st.sampled_from([D.Index(A - 2), D.Index(-A - 5), D.Index(B), D.Index(2 * B - A)]),
                   st.sampled_from([D.Const(0.5), D.Const(2), D.Const(-1.5), D.Const(0.0)]))


def _tree(children):
    unary = st.tuples(st.sampled_from(["neg", "exp", "sigmoid", "erf"]), children).map(lambda t: D.Op(t[0], (t[1],)))
    binary = st.tuples(st.sampled_from(["add", "sub", "mul", "div", "pow", "min", "max"]), children, children) \
        .map(lambda t: D.Op(t[0], (t[1], t[2])))
    return st.one_of(unary, binary)


@settings(max_examples=400, deadline=None)
@given(st.recursive(LEAVES, _tree, max_leaves=6))
def test_bounds_hold_at_every_point(e):
    b = bounds(e, RANGES)
    if b is None:
        return
    for a, c in itertools.product(range(6), range(4)):
        try:
            v = _value(e, {A: a, B: c})
        except (ZeroDivisionError, ValueError, OverflowError):
            continue
        if math.isnan(v):
            continue
        assert b[0] - 1e-9 * abs(b[0]) <= v <= b[1] + 1e-9 * abs(b[1]), (D.show(e), b, a, c, v)


def test_every_rule_is_tested():
    assert set(RULES) == {"add", "sub", "neg", "mul", "div", "pow", "exp", "sqrt", "sigmoid", "erf", "min", "max"}


def test_retention_decay_is_positive_and_unknown_symbols_are_not():
    decay = D.Op("sub", (D.Const(1), D.Op("pow", (D.Const(2), D.Index(-A - 5)))))   # 1 - 2^(-5 - a)
    assert positive(decay, {A: (0.0, math.inf)})
    assert not positive(decay, {})   # a's range unknown: nothing is claimed
    assert not positive(D.Op("sub", (D.Const(1), D.Op("pow", (D.Const(2), D.Index(-A))))), {A: (0.0, 7.0)})   # 0 at a=0
    assert bounds(D.Index(N - A), {A: (0.0, math.inf), N: (1.0, math.inf)}) == (-math.inf, math.inf)


RETENTION_NEG = """dim h, n, d, e
in Q[h, n, d], K[h, n, d], V[h, n, e]
A[a, i, j] = where(j <= i, (0.75 - 2 ^ (-a)) ^ (i - j) * dot(Q[a, i], K[a, j]) / sqrt(d), 0)
out O[a] = A[a] @ V[a]
"""


def test_a_proven_positive_base_is_one_exp2_and_others_keep_the_sign_cases():
    src = moa.compile("examples/retention.moa").triton_source
    assert "_powi" not in src and "tl.log2(" in src
    neg = moa.compile(RETENTION_NEG)   # 0.75 - 2^0 < 0 at a = 0: a negative base to integer powers
    assert "_powi(" in neg.triton_source
    g = torch.Generator().manual_seed(0)
    x = {k: torch.randn(3, 40, 8, generator=g, dtype=torch.float64) for k in ("Q", "K", "V")}
    for k in (moa.compile("examples/retention.moa"), neg):
        assert (k(**x) - k.reference(**x)).abs().max().item() < 1e-12


def test_an_index_base_to_the_power_zero_runs():
    """(2 ^ (-a)) ^ 0 folds to the integer 1 in the kernel, which is then used as a float (it raised)."""
    k = moa.compile(RETENTION_NEG.replace("(0.75 - 2 ^ (-a)) ^ (i - j)", "(2 ^ (-a)) ^ (0)"))
    g = torch.Generator().manual_seed(1)
    x = {n: torch.randn(2, 7, 4, generator=g, dtype=torch.float64) for n in ("Q", "K", "V")}
    assert (k(**x) - k.reference(**x)).abs().max().item() < 1e-12


def test_constant_base_powers_have_float64_gradients():
    """d/ds 2^s = 2^s ln 2: ln 2 is folded in float64 (tl.log(2.0) is a float32 log: 4e-9 relative errors)."""
    k = moa.compile("dim h, n, m, d, e\nin Q[h, n, d], K[h, m, d], V[h, m, e]\n"
                    "A[a, i, j] = where(j >= 0, 2 ^ dot(Q[a, i], K[a, j]) * dot(Q[a, i], K[a, j]) / sqrt(d + 1), 0)\n"
                    "out O[a] = A[a] @ V[a]\n")
    g = torch.Generator().manual_seed(3)
    x = {"Q": torch.randn(4, 7, 4, generator=g, dtype=torch.float64) * 0.5,
         "K": torch.randn(4, 50, 4, generator=g, dtype=torch.float64) * 0.5,
         "V": torch.randn(4, 50, 2, generator=g, dtype=torch.float64)}
    cot = torch.randn(4, 7, 2, generator=g, dtype=torch.float64)
    want = {n: t.clone().requires_grad_() for n, t in x.items()}
    got = {n: t.clone().requires_grad_() for n, t in x.items()}
    (k.reference(**want) * cot).sum().backward()
    (k(**got) * cot).sum().backward()
    for n in x:
        torch.testing.assert_close(got[n].grad, want[n].grad, rtol=1e-12, atol=1e-12)
    assert "tl.log(2.0)" not in k.backward.runner.spec("float64", 0).source
