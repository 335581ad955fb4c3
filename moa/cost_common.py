"""Shared pieces of the cost model: constexpr symbols and sympy -> numpy evaluation with the kernel's
integer semantics."""
from __future__ import annotations

from functools import reduce

import numpy as np
import sympy as sp

from .errors import UnsupportedError


def csym(name: str) -> sp.Symbol:
    """A constexpr of the generated kernel (BLOCK_M, BLOCK_N, HEAD_DIM, HEAD_DIM_V ...) as a sympy symbol."""
    return sp.Symbol(name, integer=True, positive=True)


BLOCK_M, BLOCK_N, HEAD_DIM_V = csym("BLOCK_M"), csym("BLOCK_N"), csym("HEAD_DIM_V")
ROW_TILE, KEY_TILE = sp.Symbol("r", integer=True, nonnegative=True), sp.Symbol("t", integer=True, nonnegative=True)


# ---- sympy -> numpy, with the kernel's integer semantics ----------------------------------------------------

def np_eval(e, env: dict):
    """Evaluate an integer/boolean sympy expression on numpy arrays (floor division and modulo as in the
    kernel's _floordiv/_mod helpers; Min/Max elementwise). `env` maps symbols to ints or arrays."""
    e = sp.sympify(e)
    if e is sp.true or e is sp.false:
        return bool(e)
    if e.is_Integer:
        return int(e)
    if e.is_Rational or e.is_Float:
        return float(e)
    if e.is_Symbol:
        if e in env:
            return env[e]
        for k, v in env.items():
            if getattr(k, "name", None) == e.name:
                return v
        raise KeyError(f"no value for {e}")
    if isinstance(e, sp.Add):
        return reduce(lambda a, b: a + b, (np_eval(a, env) for a in e.args))
    if isinstance(e, sp.Mul):
        num, den = sp.fraction(e)
        if den != 1 and num.is_integer and den.is_integer:
            return np_eval(num, env) / np_eval(den, env)
        return reduce(lambda a, b: a * b, (np_eval(a, env) for a in e.args))
    if isinstance(e, sp.Pow):
        return np_eval(e.args[0], env) ** int(e.args[1])
    if isinstance(e, (sp.floor, sp.ceiling)):
        num, den = sp.fraction(sp.together(e.args[0]))
        a, b = np_eval(num, env), np_eval(den, env)
        return np.floor_divide(a, b) if isinstance(e, sp.floor) else -np.floor_divide(-a, b)
    if isinstance(e, sp.Mod):
        return np.mod(np_eval(e.args[0], env), np_eval(e.args[1], env))
    if isinstance(e, sp.Min):
        return reduce(np.minimum, (np_eval(a, env) for a in e.args))
    if isinstance(e, sp.Max):
        return reduce(np.maximum, (np_eval(a, env) for a in e.args))
    if isinstance(e, sp.Abs):
        return np.abs(np_eval(e.args[0], env))
    if isinstance(e, sp.And):
        return reduce(np.logical_and, (np_eval(a, env) for a in e.args))
    if isinstance(e, sp.Or):
        return reduce(np.logical_or, (np_eval(a, env) for a in e.args))
    if isinstance(e, sp.Not):
        return np.logical_not(np_eval(e.args[0], env))
    if isinstance(e, sp.core.relational.Relational):
        a, b = np_eval(e.lhs, env), np_eval(e.rhs, env)
        return {"<": np.less, "<=": np.less_equal, ">": np.greater, ">=": np.greater_equal, "==": np.equal,
                "!=": np.not_equal}[e.rel_op](a, b)
    if isinstance(e, sp.Piecewise):
        out = None
        for val, cond in reversed(e.args):
            v, c = np_eval(val, env), np_eval(cond, env)
            out = v if out is None else np.where(c, v, out)
        return out
    raise UnsupportedError(f"cost model: cannot evaluate {e}")
