"""Index arithmetic (sympy) evaluated on integers or torch tensors, with floor semantics for // and %."""
from __future__ import annotations

import sympy as sp
import torch

from moa.errors import InputError, UnsupportedError


def _nonzero(b, e):
    """Integer division by zero in index arithmetic (e.g. a // (h // g) with h < g) is the call's error."""
    zero = bool((b == 0).any()) if isinstance(b, torch.Tensor) else b == 0
    if zero:
        from moa import symbolic as sy

        raise InputError(f"division by zero in the index expression {sy.show(e)} for the call's dims")


def ieval(e, env: dict):
    """Value of a sympy index expression; env maps symbols to ints or int64 tensors (broadcasting)."""
    e = sp.sympify(e)
    if e.is_Integer:
        return int(e)
    if e.is_Rational:
        return float(e)
    if e.is_Float:
        return float(e)
    if e.is_Symbol:
        if e in env:
            return env[e]
        for k, v in env.items():
            if getattr(k, "name", k) == e.name:
                return v
        raise KeyError(e.name)
    if isinstance(e, sp.floor):
        num, den = sp.fraction(sp.together(e.args[0]))
        a, b = ieval(num, env), ieval(den, env)
        _nonzero(b, e)
        if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
            return torch.div(torch.as_tensor(a), b, rounding_mode="floor")
        return a // b
    if isinstance(e, sp.Mod):
        a, b = ieval(e.args[0], env), ieval(e.args[1], env)
        _nonzero(b, e)
        if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
            return torch.remainder(torch.as_tensor(a), b)
        return a % b
    if isinstance(e, sp.Add):
        out = 0
        for a in e.args:
            out = out + ieval(a, env)
        return out
    if isinstance(e, sp.Mul):
        out = 1
        for a in e.args:
            out = out * ieval(a, env)
        return out
    if isinstance(e, sp.Pow):
        b, x = ieval(e.args[0], env), ieval(e.args[1], env)
        if isinstance(x, int) and x < 0:
            return 1.0 / (b ** -x)
        return b ** x
    if isinstance(e, (sp.Min, sp.Max)):
        vals = [ieval(a, env) for a in e.args]
        if any(isinstance(v, torch.Tensor) for v in vals):
            f = torch.minimum if isinstance(e, sp.Min) else torch.maximum
            out = torch.as_tensor(vals[0])
            for v in vals[1:]:
                out = f(out, torch.as_tensor(v))
            return out
        return (min if isinstance(e, sp.Min) else max)(vals)
    if isinstance(e, sp.Abs):
        v = ieval(e.args[0], env)
        return v.abs() if isinstance(v, torch.Tensor) else abs(v)
    raise UnsupportedError(f"index expression {e} cannot be evaluated")
