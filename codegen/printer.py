"""Triton text for sympy index arithmetic and boolean formulas: the Triton backend of moa/exprfold.py (floor
semantics for // and % through the kernel's _floordiv / _mod helpers)."""
from __future__ import annotations

import math

from moa.errors import UnsupportedError
from moa.exprfold import Backend, fold


class _Neg(str):
    """The text of -x, remembering x (so that a + (-x) prints as a - x)."""

    inner: str

    def __new__(cls, inner: str):
        out = super().__new__(cls, f"(-{inner})")
        out.inner = inner
        return out


class TritonText(Backend):
    """Code text; `names` maps symbols (or their names) to the code that holds them."""

    what = "Triton printer"

    def __init__(self, names: dict):
        self.names = names

    def unsupported(self, construct: str):
        raise UnsupportedError(f"cannot print {construct} for Triton")

    def symbol(self, s):
        if s in self.names:
            return self.names[s]
        for k, v in self.names.items():
            if getattr(k, "name", None) == s.name:
                return v
        raise UnsupportedError(f"internal: no code name for symbol {s}")

    def integer(self, v):
        return int_literal(int(v))

    def number(self, v):
        return repr(v)

    def boolean(self, v):
        return "True" if v else "False"

    def add(self, terms):
        # symbols first, numbers last: (row_hi - 1) rather than (-1 + row_hi)
        terms = sorted(terms, key=lambda t: is_number(t.inner if isinstance(t, _Neg) else t))
        first = terms[0]
        out = f"-{first.inner}" if isinstance(first, _Neg) else first
        for t in terms[1:]:
            if isinstance(t, _Neg):
                out += f" - {t.inner}"
            elif t.startswith("-") and not t.startswith("-("):
                out += f" - {t[1:]}"
            else:
                out += f" + {t}"
        return f"({out})"

    def mul(self, factors):
        return "(" + " * ".join(factors) + ")"

    def neg(self, x):
        return _Neg(x)

    def div(self, num, den):
        return f"({num} / {den})"

    def power(self, base, k):
        if 0 < k <= 16:
            return "(" + " * ".join([base] * k) + ")"
        if k == -1:
            return f"(1.0 / {base})"
        return self.unsupported(f"the index power {base} ** {k}")

    def floordiv(self, a, b):
        return f"_floordiv({a}, {b})"

    def mod(self, a, b):
        return f"_mod({a}, {b})"

    def _nest(self, fn, xs):
        out = xs[0]
        for x in xs[1:]:
            out = f"{fn}({out}, {x})"
        return out

    def minimum(self, xs):
        return self._nest("tl.minimum", xs)

    def maximum(self, xs):
        return self._nest("tl.maximum", xs)

    def abs(self, x):
        return f"tl.abs({x})"

    def and_(self, xs):
        return "(" + " & ".join(xs) + ")"

    def or_(self, xs):
        return "(" + " | ".join(xs) + ")"

    def not_(self, x):
        return f"(({x}) == 0)"

    def compare(self, op, a, b):
        return f"({a} {op} {b})"

    def piecewise(self, pairs):
        out = None
        for v, c in reversed(pairs):   # the last pair's condition is True
            out = v if out is None else f"tl.where({c}, {v}, {out})"
        return out


def int_literal(v: int) -> str:
    """An integer literal; one near or past int32's range makes the arithmetic 64-bit (offs_n + 2147483647 would
    wrap in 32 bits, tile indices being int32, and Triton refuses an int32 operand with 2147483648)."""
    return f"tl.full([], {v}, tl.int64)" if abs(v) >= 2 ** 30 else str(v)


def float_literal(v: float) -> str:
    """A float literal; infinities and NaN as float("inf") (repr gives a bare inf, no name in Python)."""
    return repr(v) if math.isfinite(v) else f'float("{v}")'


def is_number(text: str) -> bool:
    """Whether code text is a number literal."""
    try:
        float(text)
    except ValueError:
        return False
    return True


def code(e, names: dict) -> str:
    """Triton text for a sympy integer expression or boolean formula; `names` maps symbols to code."""
    return fold(e, TritonText(names))
