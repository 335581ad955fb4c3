"""One walk over sympy index expressions and boolean formulas, with backends.

Index arithmetic (`K[a // (h // g), j]`, `(i - j) % s == 0`, loop bounds, tile-skip formulas) is sympy. It is
evaluated or printed in several places: printed as Triton text (codegen/printer.py), evaluated on numpy index
grids (the cost model: tile enumeration and lane counts, `np_eval` below) and on torch tensors (the float64
reference, runtime/indexing.py). `fold` walks an expression once, in one fixed way, and a `Backend` supplies the
meaning of each operation; integer division and modulo are floor operations in every backend (MoA's
semantics, which the kernels' `_floordiv` / `_mod` helpers and numpy/torch floor division share).

The walk:   integer / rational / float / True / False / symbol -> leaves
            a + b + ...      -> add([a, b, ...])          -c * x -> neg(x) when c = 1
            num / den        -> div(num, den)             (a Mul whose sympy fraction has den != 1)
            a * b * ...      -> mul([a, b, ...])          x ** k -> power(x, k), k an integer
            floor(num / den) -> floordiv(num, den)        ceiling(num / den) -> ceildiv(num, den)
            Mod(a, b), Min, Max, Abs, And, Or, Not, relations, Piecewise -> the operation of that name
"""
from __future__ import annotations

from functools import reduce

import numpy as np
import sympy as sp

from .errors import UnsupportedError


def lookup(env: dict, s: sp.Symbol):
    """The value of a symbol in an environment keyed by symbols or by names (symbols first)."""
    if s in env:
        return env[s]
    for k, v in env.items():
        if getattr(k, "name", k) == s.name:
            return v
    raise KeyError(f"no value for {s}")


class Backend:
    """The meaning of each operation of `fold`; every argument is already folded. Subclasses override what their
    target supports; the rest raise UnsupportedError naming the construct."""

    what = "this backend"

    def unsupported(self, construct: str):
        raise UnsupportedError(f"{self.what}: cannot handle {construct}")

    def symbol(self, s):
        return self.unsupported(f"the symbol {s}")

    def integer(self, v: int):
        return v

    def number(self, v: float):
        return v

    def boolean(self, v: bool):
        return v

    def add(self, terms):
        return reduce(lambda a, b: a + b, terms)

    def mul(self, factors):
        return reduce(lambda a, b: a * b, factors)

    def neg(self, x):
        return -x

    def div(self, num, den):
        return num / den

    def power(self, base, k: int):
        return base ** k

    def floordiv(self, a, b):
        return self.unsupported("floor division")

    def ceildiv(self, a, b):
        return self.unsupported("ceiling division")

    def mod(self, a, b):
        return self.unsupported("modulo")

    def minimum(self, xs):
        return self.unsupported("Min")

    def maximum(self, xs):
        return self.unsupported("Max")

    def abs(self, x):
        return self.unsupported("Abs")

    def and_(self, xs):
        return self.unsupported("and")

    def or_(self, xs):
        return self.unsupported("or")

    def not_(self, x):
        return self.unsupported("not")

    def compare(self, op: str, a, b):
        return self.unsupported(f"the comparison {op}")

    def piecewise(self, pairs):
        return self.unsupported("Piecewise")


_RELATIONS = ("==", "!=", "<", "<=", ">", ">=")


def fold(e, backend: Backend):
    """Walk a sympy expression (see the module docstring) and combine its parts with the backend's operations."""
    e = sp.sympify(e)
    go = lambda x: fold(x, backend)  # noqa: E731
    if e is sp.true or e is sp.false:
        return backend.boolean(e is sp.true)
    if e.is_Integer:
        return backend.integer(int(e))
    if e.is_Rational or e.is_Float:
        return backend.number(float(e))
    if e.is_Symbol:
        return backend.symbol(e)
    if isinstance(e, sp.Add):
        return backend.add([go(a) for a in e.args])
    if isinstance(e, sp.Mul):
        coeff, rest = e.as_coeff_Mul()
        if coeff == -1:
            return backend.neg(go(rest))
        num, den = sp.fraction(e)
        if den != 1:
            return backend.div(go(num), go(den))
        return backend.mul([go(a) for a in e.args])
    if isinstance(e, sp.Pow):
        base, k = e.args
        if not k.is_Integer:
            return backend.unsupported(f"the power {e}")
        return backend.power(go(base), int(k))
    if isinstance(e, (sp.floor, sp.ceiling)):
        num, den = sp.fraction(sp.together(e.args[0]))
        a, b = go(num), go(den)
        return backend.floordiv(a, b) if isinstance(e, sp.floor) else backend.ceildiv(a, b)
    if isinstance(e, sp.Mod):
        return backend.mod(go(e.args[0]), go(e.args[1]))
    if isinstance(e, sp.Min):
        return backend.minimum([go(a) for a in e.args])
    if isinstance(e, sp.Max):
        return backend.maximum([go(a) for a in e.args])
    if isinstance(e, sp.Abs):
        return backend.abs(go(e.args[0]))
    if isinstance(e, sp.And):
        return backend.and_([go(a) for a in e.args])
    if isinstance(e, sp.Or):
        return backend.or_([go(a) for a in e.args])
    if isinstance(e, sp.Not):
        return backend.not_(go(e.args[0]))
    if isinstance(e, sp.core.relational.Relational) and e.rel_op in _RELATIONS:
        return backend.compare(e.rel_op, go(e.lhs), go(e.rhs))
    if isinstance(e, sp.Piecewise):
        return backend.piecewise([(go(v), go(c)) for v, c in e.args])
    return backend.unsupported(f"the expression {e}")


class Numpy(Backend):
    """Values on numpy index grids (ints, or int64 arrays that broadcast), as the kernels compute them: floor
    division and modulo, elementwise Min/Max, three-argument where for Piecewise."""

    what = "cost model"

    def __init__(self, env: dict):
        self.env = env

    def symbol(self, s):
        return lookup(self.env, s)

    def div(self, num, den):
        return np.true_divide(num, den)

    def floordiv(self, a, b):
        return np.floor_divide(a, b)

    def ceildiv(self, a, b):
        return -np.floor_divide(-a, b)

    def mod(self, a, b):
        return np.mod(a, b)

    def minimum(self, xs):
        return reduce(np.minimum, xs)

    def maximum(self, xs):
        return reduce(np.maximum, xs)

    def abs(self, x):
        return np.abs(x)

    def and_(self, xs):
        return reduce(np.logical_and, xs)

    def or_(self, xs):
        return reduce(np.logical_or, xs)

    def not_(self, x):
        return np.logical_not(x)

    def compare(self, op, a, b):
        return {"<": np.less, "<=": np.less_equal, ">": np.greater, ">=": np.greater_equal, "==": np.equal,
                "!=": np.not_equal}[op](a, b)

    def piecewise(self, pairs):
        out = None
        for v, c in reversed(pairs):
            out = v if out is None else np.where(c, v, out)
        return out


def np_eval(e, env: dict):
    """An integer/boolean sympy expression on numpy arrays (see Numpy); env maps symbols (or names) to values."""
    return fold(e, Numpy(env))
