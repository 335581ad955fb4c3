"""The one small facade over sympy: every shape and index question goes through here."""
from __future__ import annotations

from functools import reduce

import sympy as sp
from sympy.printing.precedence import PRECEDENCE

Expr = sp.Expr


def dim(name: str) -> sp.Symbol:
    """A symbolic extent: a positive integer."""
    return sp.Symbol(name, integer=True, positive=True)


def variables(e) -> set:
    """The index variables of an expression: its symbols but the dims (positive extents), whose values a call
    knows (flag[(j + c) // 2] with c a dim, as a block of keys offset by its start reads a table)."""
    return {s for s in sp.sympify(e).free_symbols if not s.is_positive}


def index_var(name: str) -> sp.Symbol:
    """An index variable of a comprehension or reduction: a non-negative integer."""
    return sp.Symbol(name, integer=True, nonnegative=True)


def const(value) -> sp.Expr:
    return sp.Integer(value) if isinstance(value, int) else sp.sympify(value)


def simplify(e) -> sp.Expr:
    return sp.simplify(sp.sympify(e))


def prove_equal(a, b) -> bool | None:
    """True if a == b for every value of the symbols, False if never (or provably different), None if
    only the values at call time can decide."""
    d = sp.simplify(sp.sympify(a) - sp.sympify(b))
    if d == 0:
        return True
    if d.is_zero is False or d.is_nonzero:
        return False
    if d.is_number:
        return bool(d == 0)
    return None


def prove_nonneg(e) -> bool | None:
    e = sp.simplify(sp.sympify(e))
    if e.is_nonnegative:
        return True
    if e.is_negative:
        return False
    return None


def free_names(e) -> set[str]:
    return {s.name for s in sp.sympify(e).free_symbols}


def evaluate(e, env: dict) -> int | float:
    """The value of an expression for concrete symbol values (names or symbols as keys)."""
    e = sp.sympify(e)
    subs = {}
    for s in e.free_symbols:
        if s in env:
            subs[s] = env[s]
        elif s.name in env:
            subs[s] = env[s.name]
    v = e.xreplace({k: sp.sympify(val) for k, val in subs.items()})
    if v.free_symbols:
        raise KeyError(f"no value for {sorted(x.name for x in v.free_symbols)} in {e}")
    if v.is_integer:
        return int(v)
    f = float(v)
    return int(f) if f.is_integer() and v.is_Integer else f


def product(xs) -> sp.Expr:
    return reduce(lambda a, b: a * b, xs, sp.Integer(1))


def show(e) -> str:
    """Human text for a shape extent or index expression ('a // r' rather than 'floor(a/r)')."""
    return _Printer().doprint(sp.sympify(e))


def show_shape(shape) -> str:
    return "<" + " ".join(show(s) for s in shape) + ">"


class _Printer(sp.printing.str.StrPrinter):
    def parenthesize(self, item, level, strict=False):
        # a // b and a % b bind like a product: inside one (or a power) they keep their parentheses
        if isinstance(item, (sp.floor, sp.Mod)) and level >= PRECEDENCE["Add"]:
            return f"({self._print(item)})"
        return super().parenthesize(item, level, strict)

    def _print_floor(self, e):
        num, den = sp.fraction(sp.together(e.args[0]))
        if den != 1:
            return f"({self._print(num)}) // ({self._print(den)})" if not num.is_Atom else \
                f"{self._print(num)} // {self._print(den) if den.is_Atom else '(' + self._print(den) + ')'}"
        return f"floor({self._print(e.args[0])})"

    def _print_Mod(self, e):
        a, b = e.args
        pa = self._print(a) if a.is_Atom else f"({self._print(a)})"
        pb = self._print(b) if b.is_Atom else f"({self._print(b)})"
        return f"{pa} % {pb}"

    def _print_Piecewise(self, e):   # where(c, a, b), as the language writes it
        out = self._print(e.args[-1][0])
        for v, c in reversed(e.args[:-1]):
            out = f"where({self._print(c)}, {self._print(v)}, {out})"
        return out

    def _print_And(self, e):
        return " and ".join(f"({self._print(a)})" if isinstance(a, sp.Or) else self._print(a) for a in e.args)

    def _print_Or(self, e):
        return " or ".join(self._print(a) for a in e.args)

    def _print_Not(self, e):
        return f"not ({self._print(e.args[0])})"


def floordiv(a, b) -> sp.Expr:
    return sp.floor(sp.sympify(a) / sp.sympify(b))


def mod(a, b) -> sp.Expr:
    return sp.Mod(sp.sympify(a), sp.sympify(b))


def split_floor(e: sp.Expr) -> tuple[sp.Expr, sp.Expr]:
    """floor(num/den) -> (num, den) with both integer expressions."""
    num, den = sp.fraction(sp.together(e.args[0]))
    return num, den


def is_int_expr(e) -> bool:
    return bool(sp.sympify(e).is_integer)


__all__ = [
    "Expr",
    "const",
    "dim",
    "evaluate",
    "floordiv",
    "free_names",
    "index_var",
    "is_int_expr",
    "mod",
    "product",
    "prove_equal",
    "prove_nonneg",
    "show",
    "show_shape",
    "simplify",
    "split_floor",
]


def next_pow2(x: int) -> int:
    """The smallest power of two >= x (1 for x <= 1)."""
    return 1 << max(0, int(x) - 1).bit_length()


def tile_width(x: int) -> int:
    """The extent of a tile that holds x: the next power of two, at least 16 (tl.arange takes powers of two and
    tl.dot needs 16): a head axis's HEAD_DIM, the smallest BLOCK_M."""
    return max(16, next_pow2(x))
