"""What a branch's score and its contraction's operands may hold besides the one q . k contraction, and the refusal
of the rest.

A norm of one operand (QK-norm's rsqrt(mean(q^2) + eps) * w, cosine attention's 1 / |q|) is a reduction over the
head dim of the query row alone, or of the key row alone. Inside a contraction operand it is computed on the
operand's tile (the q tile once per program, each k tile in the key loop) before the tile is cast for the tensor
cores, so the operands are normalised in the accumulation dtype, as the model normalises them before attention;
outside the contraction, in the score, the kernel computes it once per row tile or per key tile and multiplies the
score tile by it. A reduction with no row or key index (a norm of a weight vector) is one value per program.
"""
from __future__ import annotations

from . import dnf as D
from . import symbolic as sy
from .errors import UnsupportedError


def one_sided(x, sides) -> bool:
    """Whether reduction x reads one side alone (sides: sets of variables, the leading ones and the row, or the
    key): a norm the kernel computes per row tile or per key tile (or once per program: no row or key)."""
    return any(D.free_vars(x) <= s for s in sides)


def holds_reduction(*parts) -> bool:
    """Whether any of these expressions (None for none) holds a reduction."""
    return any(isinstance(x, D.BINDERS) for e in parts if e is not None for x in D.nodes(e))


def check_no_binders(e, what, name, dot=None, sides=None):
    """Refuse a reduction in e (a score, mask, value or contraction factor) that the tiled schedule cannot place;
    sides: the variable sets of the sides whose reductions (norms) the kernel computes per tile (a score's row and
    key, an operand's or the value's own)."""
    for x in D.nodes(e):
        if not isinstance(x, D.BINDERS):
            continue
        if sides is not None and isinstance(x, D.Reduce) and not holds_reduction(x.body) and one_sided(x, sides):
            continue
        if isinstance(x, D.Reduce) and holds_reduction(x.body):
            raise UnsupportedError(f"output {name}: {what} holds a reduction nested in another, "
                                   f"{D.show_clipped(x, 80)}; no kernel computes one inside another. Where both sum "
                                   "one row's values (a norm across heads, as OLMo 2's), write one sum over the "
                                   "reshaped row: Qt = transpose(Q, [1, 0, 2]), then sum(reshape(Qt[i] * Qt[i], "
                                   "[h * d])); else (a mean over the keys inside a contraction, a norm of a centred "
                                   "row) compute the inner one before the call")
        if dot is not None and isinstance(x, D.Reduce) and x.op == "sum" and getattr(x.body, "fn", "") == "mul":
            first = f"+red_{{{dot.var} < {sy.show(dot.extent)}}} ({D.show(dot.a)} * {D.show(dot.b)})"
            for side, other, arr in ((dot.a, dot.b, "Q"), (dot.b, dot.a, "K")):
                own, theirs = D.free_vars(side) - D.free_vars(other), D.free_vars(other) - D.free_vars(side)
                if D.free_vars(x) & own and not D.free_vars(x) & theirs:   # of the row (key) alone
                    raise UnsupportedError(f"output {name}: the score holds a reduction over one side, "
                                           f"{D.show_clipped(x, 60)} (a norm: cosine attention, QK-norm), beside "
                                           f"{first}, in a form no kernel computes: pass {arr} normalised as the input")
            raise UnsupportedError(f"output {name}: the score and its mask hold two contractions, {first} "
                                   f"and {D.show_clipped(x, 60)}; a kernel computes one q . k tile per score. A sum "
                                   "of two (decoupled RoPE's q_nope . k_nope + q_rope . k_rope) is one contraction "
                                   "of the operands joined along the head dim: Qc[a, i, k:dn + dr] = where(k < dn, "
                                   "QN[a, i, min(k, dn - 1)], QR[a, i, max(k - dn, 0)]), and Kc likewise")
        raise UnsupportedError(f"output {name}: {what} contains a reduction ({type(x).__name__}) that the "
                               f"tiled schedule cannot place yet: {D.show_clipped(x, 120)}")
