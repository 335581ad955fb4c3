"""Monoid branches that are not a softmax: rule `key-sum` lifts a plain sum over the key axis (A @ V with no
normaliser: sigmoid attention, retention) to a KeySum, the third monoid (acc only); and the split of a branch's
mask into what decides tiles and what the score decides per pair."""
from __future__ import annotations

from functools import reduce

from . import dnf as D
from . import ir
from .residue import _and, _conjuncts, _strip_mask, score_parts


def _free(e) -> set:
    return D.free_vars(e)


def strip_zero(e) -> tuple:
    """(P, x) of where(P, x, 0) (a float or an integer 0), else (None, e)."""
    mask, body = _strip_mask(e, 0.0)
    return (mask, body) if mask is not None else _strip_mask(e, 0)


def with_key_sums(e, lead: set, i, c):
    """e with every plain sum over a key axis (rule key-sum) as a KeySum node, as the other monoids are: the
    branches of a schedule (`schedule`) and of ring / split-KV block programs (moa/shard.py)."""
    done = e if isinstance(e, (D.SoftmaxSum, D.NormSum, D.KeySum)) else key_sum(e, lead, i, c)
    if done is not None:
        return done
    kids = D.children(e)
    return D.with_children(e, [with_key_sums(k, lead, i, c) for k in kids]) if kids else e


def _factors(e) -> list:
    if isinstance(e, D.Op) and e.fn == "mul":
        return _factors(e.args[0]) + _factors(e.args[1])
    return [e]


def key_sum(x, leadset, i, c):
    """Rule `key-sum`: +red_j where(P, w1 * ... * v1 * ..., 0) => KeySum_j(where(P, w1 * ..., 0), v1 * ...), the
    w factors over (lead, i, j) and holding a contraction (q . k), the v factors over (lead, j, c) and reading c,
    P free of c (A @ V with A an attention-shaped array and no normaliser: sigmoid attention, retention); a
    factor's own mask over (i, j), where(P2, f, 0), joins P. The product is regrouped (the same terms), so the
    reduction is the same sum; None where x is not of that form."""
    if not (isinstance(x, D.Reduce) and x.op == "sum" and x.dtype == ir.FLOAT):
        return None
    j = x.var
    mask, body = strip_zero(x.body)
    fs = []
    for f in _factors(body):   # where(P, f, 0) * x = where(P, f * x, 0): a factor's mask over (i, j) is the weight's
        p, g = strip_zero(f)
        if p is not None and c not in _free(p):
            mask, f = (p if mask is None else D.Op("and", (mask, p), "bool")), g
        fs.append(f)
    value = [f for f in fs if c in _free(f)]
    weight = [f for f in fs if c not in _free(f)]
    if not value or not all(_free(f) <= leadset | {j, c} for f in value) or \
            not all(_free(f) <= leadset | {i, j} for f in weight) or \
            (mask is not None and not _free(mask) <= leadset | {i, j}):
        return None
    w, v = (reduce(lambda x, y: D.Op("mul", (x, y), ir.FLOAT), fs) for fs in (weight or [D.Const(1.0)], value))
    if not any(isinstance(y, D.Reduce) and y.op == "sum" for part in (w, mask) if part is not None
               for y in D.nodes(part)):
        return None   # no contraction in the weight or its mask: a product of arrays (Q @ K.T), not attention
    if mask is not None:
        w = D.Op("where", (mask, w, D.Const(0.0)), ir.FLOAT)
    return D.KeySum(j, x.extent, w, v, x.dtype)


def score_conjuncts(mask, score, neutral) -> tuple:
    """(mask, score) with the mask's conjuncts that read a reduction (the contraction: S > 0) moved into the score
    as where(P, score, neutral): the mask decides tiles from indices and data summaries; P is decided per pair."""
    if mask is None:
        return mask, score
    rest, inner = score_parts(_conjuncts(mask))
    if not inner:
        return mask, score
    return (_and(rest) if rest else None), D.Op("where", (_and(inner), score, D.Const(neutral)), score.dtype)
