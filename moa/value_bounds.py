"""Bounds on the values of scalar DNF expressions over the ranges of their index variables (floats, infinities
allowed). Codegen asks whether a power's base is positive wherever it is evaluated: RetNet's per-head decay
(1 - 2^(-5 - a))^(i - j) is then one exp2 per element instead of torch.pow's sign cases. Unknown is None: never
wrong, only slower."""
from __future__ import annotations

import math

import sympy as sp

from . import dnf as D

INF = math.inf


def bounds(e, ranges: dict) -> tuple | None:
    """(lo, hi) of DNF expression e when every symbol v of its indices lies in ranges[v] (floats, infinities
    allowed: an index variable in [0, extent - 1], a dim in [1, inf]), or None when not known (a symbol without a
    range among them)."""
    if isinstance(e, D.Const):
        if isinstance(e.value, bool) or not isinstance(e.value, (int, float)) or math.isnan(e.value):
            return None
        return float(e.value), float(e.value)
    if isinstance(e, D.Index):
        return _affine(sp.expand(sp.sympify(e.expr)), ranges)
    if not isinstance(e, D.Op):
        return None
    args = [bounds(a, ranges) for a in e.args]
    if any(a is None for a in args):
        return None
    rule = RULES.get(e.fn)
    out = rule(*args) if rule is not None else None
    return None if out is None or any(math.isnan(x) for x in out) else out


def positive(e, ranges: dict) -> bool:
    """Whether e is finite and > 0 at every point of the ranges."""
    b = bounds(e, ranges)
    return b is not None and b[0] > 0 and b[1] < INF


def _affine(x, ranges: dict):
    lo = hi = 0.0
    for term in sp.Add.make_args(x):
        coeff, rest = term.as_coeff_Mul()
        if rest == 1:
            lo, hi = lo + float(coeff), hi + float(coeff)
            continue
        if not rest.is_Symbol or rest not in ranges:
            return None
        rlo, rhi = ranges[rest]
        a, b = float(coeff) * rlo, float(coeff) * rhi
        lo, hi = lo + min(a, b), hi + max(a, b)
    return lo, hi


def _mul(a, b):
    corners = [x * y for x in a for y in b if not (math.isinf(x) and y == 0 or math.isinf(y) and x == 0)]
    zero = (0.0 in a or 0.0 in b)
    if zero:
        corners.append(0.0)
    return min(corners), max(corners)


def _div(a, b):
    if b[0] > 0 or b[1] < 0:   # a denominator of one sign
        return _mul(a, (1 / b[1], 1 / b[0]))
    return None


def _pow(b, x):
    if b[0] <= 0:   # a positive base only: b^x is monotone in each of b and x, its extremes at the corners
        return None
    corners = [_safe_pow(p, q) for p in b for q in x]
    return min(corners), max(corners)


def _safe_pow(p, q):
    try:
        return math.pow(p, q)
    except OverflowError:
        return INF


def _exp(a):
    return tuple(INF if x > 709 else math.exp(x) for x in a)


# fn -> bounds of the result from its arguments' (lo, hi)
RULES = {
    "add": lambda a, b: (a[0] + b[0], a[1] + b[1]),          # [a0, a1] + [b0, b1] -> [a0 + b0, a1 + b1]
    "sub": lambda a, b: (a[0] - b[1], a[1] - b[0]),          # [a0, a1] - [b0, b1] -> [a0 - b1, a1 - b0]
    "neg": lambda a: (-a[1], -a[0]),                          # -[a0, a1] -> [-a1, -a0]
    "mul": _mul,                                              # the products of the corners
    "div": _div,                                              # a * [1 / b1, 1 / b0] for b of one sign
    "pow": _pow,                                              # b > 0: the corners of b^x
    "exp": _exp,                                              # monotone
    "sqrt": lambda a: (math.sqrt(a[0]), math.sqrt(a[1])) if a[0] >= 0 else None,
    "sigmoid": lambda a: (1 / (1 + _exp((-a[0],))[0]), 1 / (1 + _exp((-a[1],))[0])),
    "erf": lambda a: (math.erf(a[0]), math.erf(a[1])),        # monotone
    "min": lambda a, b: (min(a[0], b[0]), min(a[1], b[1])),
    "max": lambda a, b: (max(a[0], b[0]), max(a[1], b[1])),
}
