"""The score scale of the tiled kernel: a softmax score c * qk + rest, with c constant along the keys, gets
qk_scale = c log2 e once per program (codegen/emit.py `_scale`); with no rest and c provably positive the row max is
taken over qk and scaled once per row. These functions find c and rest in the DNF and decide c's sign."""
from __future__ import annotations

import sympy as sp

from moa import dnf as D
from moa import ir
from moa.onf import DotTile


def has_tile(e, tile) -> bool:
    return any(x == tile for x in D.nodes(e))


def free_of(e, vars_) -> bool:
    return not (D.free_vars(e) & set(vars_)) and not any(isinstance(x, DotTile) for x in D.nodes(e))


def positive(e) -> bool:
    """Whether a score scale is positive at every evaluation: positive numbers, index arithmetic sympy proves
    positive (dims are), and sums, products, quotients, square roots, exponentials and powers of positive bases."""
    if isinstance(e, D.Const):
        return isinstance(e.value, (int, float)) and not isinstance(e.value, bool) and e.value > 0
    if isinstance(e, D.Index):
        return bool(sp.sympify(e.expr).is_positive)
    if isinstance(e, D.Op):
        if e.fn in ("add", "mul", "div"):
            return all(positive(a) for a in e.args)
        if e.fn == "sqrt":
            return positive(e.args[0])
        if e.fn == "pow":
            return positive(e.args[0])
        return e.fn == "exp"
    return False


def scaled(e, tile):
    """c for e = tile * c, c * tile or tile / c (c free of the tile), else None."""
    if e == tile:
        return D.Const(1.0)
    if isinstance(e, D.Op) and e.fn in ("mul", "div"):
        a, b = e.args
        if e.fn == "mul" and b == tile and not has_tile(a, tile):
            return a
        if a == tile and not has_tile(b, tile):
            return b if e.fn == "mul" else D.Op("div", (D.Const(1.0), b), ir.FLOAT)
    return None


def affine(e, tile):
    """(c, rest) with e = tile * c + rest at the top of the score (rest None: no additive term), or None. Only
    these forms, so that folding c log2 e into one multiply changes no evaluation order beyond the log2 e factor
    (an adversarial `qk / s + 2^62 - 2^62` keeps its cancellation)."""
    c = scaled(e, tile)
    if c is not None:
        return c, None
    if isinstance(e, D.Op) and e.fn in ("add", "sub"):
        a, b = e.args
        if e.fn == "add" and scaled(b, tile) is not None and not has_tile(a, tile):
            a, b = b, a
        c = scaled(a, tile)
        if c is not None and not has_tile(b, tile):
            return c, b if e.fn == "add" else D.Op("neg", (b,), ir.FLOAT)
    return None
