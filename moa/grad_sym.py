"""Partial derivatives of elementwise DNF expressions, by sympy.

An elementwise DNF expression (Op nodes over leaves: reads, reductions, monoid reductions, index values, constants,
`where` selections) is translated into one sympy expression whose leaves are real symbols, differentiated by
sympy's chain rule, and translated back into DNF. No derivative is written by hand for any attention variant:
softcap's `c tanh(s / c)`, ALiBi's additive slope term, power attention's `x^p`, the `elu + 1` features and
PiAttention's sigmoid gate are all differentiated here. Scalar functions sympy lacks are sympy Functions with their
derivative (`fdiff`), chosen to agree with torch's autograd at the points where the derivative is a convention:

| function | derivative | at the kink |
|---|---|---|
| sigmoid(x) | sigmoid(x) (1 - sigmoid(x)) | |
| relu(x) | step(x) | 0 at x = 0 (torch: grad where x > 0) |
| elu(x) | where(x > 0, 1, exp(x)) | |
| sign(x) | 0 | |
| abs(x) | sign(x) | 0 at x = 0 |
| min(a, b), max(a, b) | Heaviside | 1/2 each on a tie (torch splits the gradient evenly) |
"""
from __future__ import annotations

import math

import sympy as sp

from . import ir
from .dnf_nodes import Const, Index, Op
from .errors import UnsupportedError


class Sigmoid(sp.Function):
    """sigmoid(x) = 1 / (1 + exp(-x)); d/dx = sigmoid(x) (1 - sigmoid(x)) (no overflow for large |x|)."""

    def fdiff(self, argindex=1):
        s = Sigmoid(self.args[0])
        return s * (1 - s)


class Step(sp.Function):
    """step(x) = 1 for x > 0, else 0 (relu's derivative; 0 at x = 0 as torch's)."""

    def fdiff(self, argindex=1):
        return sp.Integer(0)


class Relu(sp.Function):
    """relu(x) = max(x, 0); d/dx = step(x)."""

    def fdiff(self, argindex=1):
        return Step(self.args[0])


class Elu(sp.Function):
    """elu(x) = x for x > 0, exp(x) - 1 otherwise; d/dx = where(x > 0, 1, exp(x))."""

    def fdiff(self, argindex=1):
        x = self.args[0]
        return sp.Piecewise((sp.Integer(1), x > 0), (sp.exp(x), True))


class Sgn(sp.Function):
    """sign(x) in {-1, 0, 1}; d/dx = 0 (not sympy's DiracDelta: the language's sign is piecewise constant)."""

    def fdiff(self, argindex=1):
        return sp.Integer(0)


class RealAbs(sp.Function):
    """|x| of a real x; d/dx = sign(x) (sympy's Abs differentiates a possibly complex argument: sqrt(d) of a leaf
    it cannot prove non-negative gave atan2 terms)."""

    def fdiff(self, argindex=1):
        return Sgn(self.args[0])


class Power(sp.Function):
    """a^x with an exponent that is not a number; the derivatives torch's autograd takes: d/da = x a^(x - 1), 0
    where x = 0 (0 * inf at a = 0 otherwise), d/dx = a^x log a, 0 where a = 0 and x >= 0."""
    nargs = 2

    def fdiff(self, argindex=1):
        a, x = self.args
        if argindex == 1:
            return sp.Piecewise((sp.Integer(0), sp.Eq(x, 0)), (x * Power(a, x - 1), True))
        return sp.Piecewise((sp.Integer(0), sp.And(sp.Eq(a, 0), x >= 0)), (Power(a, x) * sp.log(a), True))


_UNARY = {"exp": sp.exp, "log": sp.log, "sqrt": sp.sqrt, "rsqrt": lambda x: 1 / sp.sqrt(x), "tanh": sp.tanh,
          "sin": sp.sin, "cos": sp.cos, "erf": sp.erf, "sigmoid": Sigmoid, "relu": Relu, "elu": Elu, "sign": Sgn,
          "abs": RealAbs, "neg": lambda x: -x}
_BINARY = {"add": lambda a, b: a + b, "sub": lambda a, b: a - b, "mul": lambda a, b: a * b,
           "div": lambda a, b: a / b, "pow": lambda a, b: a ** b if b.is_number else Power(a, b), "min": sp.Min,
           "max": sp.Max}
DIFFERENTIABLE = frozenset(_UNARY) | frozenset(_BINARY)


def is_smooth_op(e) -> bool:
    """An elementwise float operation sympy differentiates (not where, comparisons, logic, integer arithmetic)."""
    return isinstance(e, Op) and e.fn in DIFFERENTIABLE and e.dtype == ir.FLOAT


class Translation:
    """One elementwise DNF expression as sympy: `expr` over real symbols, `leaves` symbol -> DNF leaf (equal leaves
    share a symbol, so a sub-expression used twice, like PiAttention's gate, gets the sum of both paths). With
    `pieces`, a float where(c, a, b) is a Piecewise over the condition c (a leaf of its own), so the derivative
    reaches into both branches: d where(c, a, b) = where(c, da, db) (c's own derivative is 0 almost everywhere)."""

    def __init__(self, e, pieces: bool = False):
        self.leaves: dict = {}
        self._sym: dict = {}
        self.pieces = pieces
        self.expr = self._to(e)

    def _leaf(self, e) -> sp.Symbol:
        if e not in self._sym:   # a float leaf is a real symbol, a condition (pieces) a plain one
            s = sp.Symbol(f"x{len(self._sym)}", real=True) if e.dtype != ir.BOOL else sp.Symbol(f"x{len(self._sym)}")
            self._sym[e] = s
            self.leaves[s] = e
        return self._sym[e]

    def _to(self, e):
        if isinstance(e, Const) and isinstance(e.value, (int, float)) and not isinstance(e.value, bool) \
                and math.isfinite(e.value):
            v = e.value
            return sp.Integer(int(v)) if float(v).is_integer() and abs(v) < 2 ** 53 else sp.Float(float(v))
        if self.pieces and isinstance(e, Op) and e.fn == "where" and e.dtype == ir.FLOAT:
            # where(c, a, b) as Piecewise((a, c), (b, True)): its partials are where(c, da, db) (c a leaf)
            return sp.Piecewise((self._to(e.args[1]), self._leaf(e.args[0])), (self._to(e.args[2]), True))
        if not is_smooth_op(e):
            return self._leaf(e)
        args = [self._to(a) for a in e.args]
        if e.fn in _UNARY:
            return _UNARY[e.fn](args[0])
        return _BINARY[e.fn](*args)

    def partial(self, leaf_symbol: sp.Symbol):
        """d expr / d leaf as sympy (0 when it does not occur)."""
        return sp.diff(self.expr, leaf_symbol)

    def to_dnf(self, x, leaf_map: dict | None = None):
        """A sympy expression over this translation's symbols back as DNF; leaf_map overrides a leaf (the forward
        value a derivative reads, e.g. a saved monoid result in place of its recomputation)."""
        leaves = {s: (leaf_map or {}).get(e, e) for s, e in self.leaves.items()}
        return from_sympy(x, leaves)


def partials(e, wanted=None) -> dict:
    """{leaf: d e / d leaf as DNF} for every float leaf of the elementwise expression e whose derivative is not 0
    (`wanted`: a predicate selecting the leaves). The derivatives read the leaves themselves (forward values)."""
    t = Translation(e)
    out = {}
    for s, leaf in t.leaves.items():
        if leaf.dtype != ir.FLOAT or (wanted is not None and not wanted(leaf)):
            continue
        d = t.partial(s)
        if d != 0:
            out[leaf] = t.to_dnf(d)
    return out


# ---- sympy -> DNF --------------------------------------------------------------------------------------------


def _dtype(args, fn) -> str:
    return ir.FLOAT if fn in ir.UNARY_FLOAT or fn == "div" or any(a.dtype == ir.FLOAT for a in args) else ir.INT


def _op(fn, *args):
    return Op(fn, tuple(args), _dtype(args, fn))


def _num(v) -> Const:
    return Const(float(v))


_REL = {"<": "lt", "<=": "le", ">": "gt", ">=": "ge", "==": "eq", "!=": "ne"}


def _cond(c, leaves):
    if c in leaves:   # a condition kept whole (Translation's pieces)
        return leaves[c]
    if c is sp.true:
        return Const(True, ir.BOOL)
    if c is sp.false:
        return Const(False, ir.BOOL)
    if isinstance(c, sp.core.relational.Relational) and c.rel_op in _REL:
        return Op(_REL[c.rel_op], (from_sympy(c.lhs, leaves), from_sympy(c.rhs, leaves)), ir.BOOL)
    if isinstance(c, (sp.And, sp.Or)):
        out = _cond(c.args[0], leaves)
        for a in c.args[1:]:
            out = Op("and" if isinstance(c, sp.And) else "or", (out, _cond(a, leaves)), ir.BOOL)
        return out
    if isinstance(c, sp.Not):
        return Op("not", (_cond(c.args[0], leaves),), ir.BOOL)
    raise UnsupportedError(f"differentiation produced a condition moa cannot express: {c}")


def _power(base, k):
    """base ^ k for a sympy rational k: products, sqrt and one division, never a general power for k in Z/2."""
    if k.is_Integer:
        kk = int(k)
        if kk == 1:
            return base
        if kk < 0:
            return _op("div", _num(1), _power(base, sp.Integer(-kk)))
        return _op("pow", base, Index(sp.Integer(kk)))
    if k.is_Rational and k.q == 2:
        root = _op("sqrt", base)
        whole = _power(base, sp.Integer(abs(k.p) // 2)) if abs(k.p) > 1 else None
        pos = root if whole is None else _op("mul", whole, root)
        return pos if k > 0 else _op("div", _num(1), pos)
    return None


def _from_mul(x, leaves):
    coeff, rest = x.as_coeff_Mul()
    if coeff == -1:
        return _op("neg", from_sympy(rest, leaves))
    num, den = sp.fraction(x)
    if den != 1:
        return _op("div", from_sympy(num, leaves), from_sympy(den, leaves))
    out = None
    for a in x.args:
        y = from_sympy(a, leaves)
        out = y if out is None else _op("mul", out, y)
    return out


def _from_add(x, leaves):
    out = None
    for a in x.as_ordered_terms():
        c, rest = a.as_coeff_Mul()
        if out is not None and c.is_negative:
            out = _op("sub", out, from_sympy(-a, leaves))
            continue
        y = from_sympy(a, leaves)
        out = y if out is None else _op("add", out, y)
    return out


_FUNC = {sp.exp: "exp", sp.log: "log", sp.tanh: "tanh", sp.sin: "sin", sp.cos: "cos", sp.erf: "erf", Sigmoid: "sigmoid",
         Relu: "relu", Elu: "elu", sp.Abs: "abs", RealAbs: "abs", Sgn: "sign", sp.sign: "sign"}


def from_sympy(x, leaves: dict):  # noqa: C901 - one case per sympy construct
    """A sympy expression over leaf symbols as a DNF scalar expression."""
    x = sp.sympify(x)
    if x in leaves:
        return leaves[x]
    if x.is_Number or x.is_number and x.is_real:   # pi, 2 / sqrt(pi) (erf's derivative): float64 constants
        return _num(x)
    if isinstance(x, sp.Add):
        return _from_add(x, leaves)
    if isinstance(x, sp.Mul):
        return _from_mul(x, leaves)
    if isinstance(x, Power):
        return _op("pow", from_sympy(x.args[0], leaves), from_sympy(x.args[1], leaves))
    if isinstance(x, sp.Pow):
        b, k = x.args
        if k.is_Rational:
            out = _power(from_sympy(b, leaves), k)
            if out is not None:
                return out
        return _op("pow", from_sympy(b, leaves), from_sympy(k, leaves))
    if x.func in _FUNC:
        return _op(_FUNC[x.func], from_sympy(x.args[0], leaves))
    if isinstance(x, Step):
        return Op("where", (_op("gt", from_sympy(x.args[0], leaves), _num(0)), _num(1), _num(0)), ir.FLOAT)
    if isinstance(x, sp.Heaviside):
        a = from_sympy(x.args[0], leaves)
        at0 = float(x.args[1]) if len(x.args) > 1 else 0.5
        return Op("where", (_op("gt", a, _num(0)), _num(1),
                            Op("where", (_op("lt", a, _num(0)), _num(0), _num(at0)), ir.FLOAT)), ir.FLOAT)
    if isinstance(x, sp.DiracDelta):
        return _num(0)
    if isinstance(x, (sp.Min, sp.Max)):
        out = from_sympy(x.args[0], leaves)
        for a in x.args[1:]:
            out = _op("min" if isinstance(x, sp.Min) else "max", out, from_sympy(a, leaves))
        return out
    if isinstance(x, sp.Piecewise):
        out = None
        for v, c in reversed(x.args):
            val = from_sympy(v, leaves)
            out = val if out is None or c is sp.true else Op("where", (_cond(c, leaves), val, out), ir.FLOAT)
        return out
    raise UnsupportedError(f"differentiation produced an expression moa cannot express: {x}")
