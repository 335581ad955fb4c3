"""The Triton text of a power a^x: products for small integer exponents, one exp2 for a base that is a positive
constant or proven positive over the index ranges, torch.pow's special cases otherwise."""
from __future__ import annotations

import math

from moa import dnf as D
from moa import ir
from moa.onf import index_ranges
from moa.value_bounds import positive


def pow_code(em, e, a) -> str:
    """Code for a^x (DNF Op pow `e`, its arguments' code `a`) by emitter em: small integer powers by products, a
    constant positive base or one proven positive (moa/value_bounds.py) by one exp2, else torch.pow's cases
    (codegen/tidy.py's _pow / _powi)."""
    base, ex = e.args
    exv = constant_value(ex)
    if exv is not None and float(exv).is_integer() and (0 <= float(exv) <= 16 or e.dtype == ir.FLOAT):
        k = int(float(exv))
        if k == 0:
            return "1.0" if e.dtype == ir.FLOAT else "1"
        b = em._float(a[0], base) if e.dtype == ir.FLOAT else a[0]
        if abs(k) <= 16:   # a^k by products, a^-k = 1 / a^k: exact signs for negative bases
            prod = " * ".join([b] * abs(k))
            return f"({prod})" if k > 0 else f"(1.0 / ({prod}))"
        mag = f"tl.exp2({float(k)!r} * tl.log2(tl.abs({b})))"   # |a|^k, negated for a < 0 and odd k
        return f"tl.where({b} < 0, -{mag}, {mag})" if k % 2 else mag
    bv = constant_value(base)
    x = em._float(a[1], ex)
    if bv is not None and float(bv) > 0:
        return f"tl.exp2({x} * {math.log2(float(bv))!r})"
    if bv is None and positive(base, index_ranges(em.s, em.p.dims)):   # > 0 wherever evaluated (a decay)
        return f"tl.exp2({x} * tl.log2({em._float(a[0], base)}))"
    # else torch.pow's a^x by codegen/tidy.py's helpers (_powi: an integer x, its sign by parity); literals as typed
    # values (the helpers read their dtype)
    b = f"tl.full([], {float(bv)!r}, {em.acc})" if bv is not None else em._float(a[0], base)
    if ex.dtype == ir.INT:
        return f"_powi({b}, {a[1]})"
    return f"_pow({b}, {f'tl.full([], {float(exv)!r}, {em.acc})' if exv is not None else x})"


def constant_value(v):
    """The value of a constant DNF leaf (a Const, or an Index that folded to a number), else None."""
    return v.value if isinstance(v, D.Const) else v.expr if isinstance(v, D.Index) and v.expr.is_number else None
