"""What a branch's score may hold besides its one contraction, and the refusal of the rest.

A norm of one operand (QK-norm's rsqrt(mean(q^2) + eps), cosine attention's 1 / |q|) is a reduction over the head
dim of the query row alone, or of the key row alone. Inside the contraction it is a factor free of the contraction's
index, so it comes out of the sum; outside it, the kernel computes it once per row tile (from the q tile) or per
key tile (from the k tile), and multiplies the score tile by it:

    +red_k (r(i) a(i, k)) * (s(j) b(j, k))  ->  r(i) s(j) +red_k a(i, k) b(j, k)     (r, s free of k)

Only factors that hold a reduction are pulled out: a scale on an operand (Q[i, k] / sqrt(d), a rotary embedding)
stays on the operand tile, where the kernel applies it once per element of q or k, not of the score.
"""
from __future__ import annotations

from . import dnf as D
from . import ir
from . import symbolic as sy
from .errors import UnsupportedError


def _factors(e) -> list:
    """The factors of a product (nested binary mul), left to right."""
    if isinstance(e, D.Op) and e.fn == "mul":
        return [f for a in e.args for f in _factors(a)]
    return [e]


def _product(fs: list):
    out = fs[0]
    for f in fs[1:]:
        out = D.Op("mul", (out, f), ir.FLOAT)
    return out


def _holds_reduction(e) -> bool:
    return any(isinstance(x, D.BINDERS) for x in D.nodes(e))


def _pull(x):
    # +red_k (r * a_k) * (s * b_k)  ->  (r * s) * +red_k a_k * b_k     (r, s hold a reduction, free of k)
    if not (isinstance(x, D.Reduce) and x.op == "sum" and isinstance(x.body, D.Op) and x.body.fn == "mul"):
        return None
    outer, inner = [], []
    for operand in x.body.args:
        fs = _factors(operand)
        out = [f for f in fs if x.var not in D.free_vars(f) and _holds_reduction(f)]
        rest = [f for f in fs if not any(f is o for o in out)]
        if not rest:
            return None
        outer += out
        inner.append(_product(rest))
    if not outer:
        return None
    body = D.Op("mul", tuple(inner), x.body.dtype)
    return D.Op("mul", (_product(outer), D.Reduce(x.op, x.var, x.extent, body, x.dtype)), x.dtype)


def pull_norms(e):
    """e with every contraction's operand norms pulled out of it (the rule above), bottom-up."""
    kids = D.children(e)
    if kids:
        e = D.with_children(e, [pull_norms(k) for k in kids])
    return _pull(e) or e


def one_sided(x, rows: set, keys: set) -> bool:
    """Whether reduction x reads the row side alone (rows: the leading variables and the row) or the key side
    alone: a norm the kernel computes per row tile or per key tile."""
    free = D.free_vars(x)
    return bool(free) and (free <= rows or free <= keys)


def check_no_binders(e, what, name, dot=None, sides=None):
    """Refuse a reduction in e (a score, mask, value or contraction factor) that the tiled schedule cannot place;
    sides (rows, keys): the score's, whose one-sided reductions (norms) the kernel computes per tile."""
    for x in D.nodes(e):
        if not isinstance(x, D.BINDERS):
            continue
        if sides is not None and isinstance(x, D.Reduce) and not _holds_reduction(x.body) and one_sided(x, *sides):
            continue
        if dot is not None and isinstance(x, D.Reduce) and x.op == "sum" and getattr(x.body, "fn", "") == "mul":
            first = f"+red_{{{dot.var} < {sy.show(dot.extent)}}} ({D.show(dot.a)} * {D.show(dot.b)})"
            for side, other, arr in ((dot.a, dot.b, "Q"), (dot.b, dot.a, "K")):
                own, theirs = D.free_vars(side) - D.free_vars(other), D.free_vars(other) - D.free_vars(side)
                if D.free_vars(x) & own and not D.free_vars(x) & theirs:   # of the row (key) alone
                    raise UnsupportedError(f"output {name}: the score holds a reduction over one side, "
                                           f"{D.show_clipped(x, 60)} (a norm: cosine attention, QK-norm), beside "
                                           f"{first}, in a form no kernel computes: pass {arr} normalised as the input")
            raise UnsupportedError(f"output {name}: the score and its mask hold two contractions, {first} "
                                   f"and {D.show_clipped(x, 60)}; a kernel computes one q . k tile per score")
        raise UnsupportedError(f"output {name}: {what} contains a reduction ({type(x).__name__}) that the "
                               f"tiled schedule cannot place yet: {D.show_clipped(x, 120)}")
