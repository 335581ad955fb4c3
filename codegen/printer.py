"""sympy index arithmetic and scalar formulas -> Triton expression text (floor semantics for // and %)."""
from __future__ import annotations

import sympy as sp

from moa.errors import UnsupportedError


def code(e, names: dict) -> str:
    """Triton text for a sympy integer expression or boolean formula; `names` maps symbols to code."""
    e = sp.sympify(e)
    if e is sp.true:
        return "True"
    if e is sp.false:
        return "False"
    if e.is_Integer:
        return str(int(e))
    if e.is_Rational:
        return repr(float(e))
    if e.is_Float:
        return repr(float(e))
    if e.is_Symbol:
        if e in names:
            return names[e]
        for k, v in names.items():
            if getattr(k, "name", None) == e.name:
                return v
        raise UnsupportedError(f"internal: no code name for symbol {e}")
    if isinstance(e, sp.Add):
        terms = [code(a, names) for a in e.args]
        out = terms[0]
        for t in terms[1:]:
            out += f" - {t[1:]}" if t.startswith("-") and not t.startswith("-(") else f" + {t}"
        return f"({out})"
    if isinstance(e, sp.Mul):
        coeff, rest = e.as_coeff_Mul()
        if coeff == -1:
            return f"(-{code(rest, names)})"
        num, den = sp.fraction(e)
        if den != 1:
            return f"({code(num, names)} / {code(den, names)})"
        return "(" + " * ".join(code(a, names) for a in e.args) + ")"
    if isinstance(e, sp.Pow):
        b, x = e.args
        if x.is_Integer and 0 < x <= 16:
            return "(" + " * ".join([code(b, names)] * int(x)) + ")"
        if x == -1:
            return f"(1.0 / {code(b, names)})"
        raise UnsupportedError(f"index power {e}")
    if isinstance(e, sp.floor):
        num, den = sp.fraction(sp.together(e.args[0]))
        return f"_floordiv({code(num, names)}, {code(den, names)})"
    if isinstance(e, sp.Mod):
        return f"_mod({code(e.args[0], names)}, {code(e.args[1], names)})"
    if isinstance(e, (sp.Min, sp.Max)):
        f = "tl.minimum" if isinstance(e, sp.Min) else "tl.maximum"
        args = [code(a, names) for a in e.args]
        out = args[0]
        for a in args[1:]:
            out = f"{f}({out}, {a})"
        return out
    if isinstance(e, sp.Abs):
        return f"tl.abs({code(e.args[0], names)})"
    if isinstance(e, sp.And):
        return "(" + " & ".join(code(a, names) for a in e.args) + ")"
    if isinstance(e, sp.Or):
        return "(" + " | ".join(code(a, names) for a in e.args) + ")"
    if isinstance(e, sp.Not):
        return f"(({code(e.args[0], names)}) == 0)"
    if isinstance(e, sp.core.relational.Relational):
        op = {"==": "==", "!=": "!=", "<": "<", "<=": "<=", ">": ">", ">=": ">="}[e.rel_op]
        return f"({code(e.lhs, names)} {op} {code(e.rhs, names)})"
    raise UnsupportedError(f"cannot print index expression {e} for Triton")
