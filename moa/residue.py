"""Residue structure of masks, and the lifting it allows (the algebra behind the hops and residue schedules).

A mask with a conjunct (i - j + c) % s == 0 (s >= 2) admits only keys j = i + c - s t: the reduction over j
re-indexes to one over hops t (`Hop`), each pairing a query row with one key. Lifting the rows by residue,
i = r + s a (`RowLift`), makes such a branch a dense band of keys j = rho + s b in b-space (`Lift`, rule
residue-lift in LIFTING_RULES); the other branches then gather per-row windows by hops. moa/onf.py builds the
schedules (`variants`) from these pieces."""
from __future__ import annotations

from dataclasses import dataclass

import sympy as sp

from . import dnf as D
from . import intervals as iv


@dataclass(frozen=True)
class Hop:
    """Residue structure of a mask: every admissible key is j = i + c - s t (the conjunct (i - j) % s == 0 solved
    for j), so the reduction over j re-indexes to one over hops t in [t_lo, t_hi] (formulas in I_LO, I_HI):
    each hop pairs a query row with exactly one key (a diagonal of the key tile), no wasted pair."""
    stride: int
    var: sp.Symbol
    key: sp.Expr          # j as a function of i and t
    t_lo: sp.Expr
    t_hi: sp.Expr
    mask: object          # the rest of the mask with j := key (includes 0 <= j < m)


@dataclass(frozen=True)
class RowLift:
    """Residue lifting of the row axis: i = r + s a with r = i mod s (one residue per program) and
    a < rows = cdiv(n - r, s) (floor((n - 1 - r) / s) + 1, 0 for a residue r >= n)."""
    stride: int
    res: sp.Symbol        # r
    a: sp.Symbol          # a
    row: sp.Expr          # r + s a
    rows: sp.Expr         # the extent of a for residue r


@dataclass(frozen=True)
class Lift:
    """A branch lifted by rule `residue-lift`: its keys are j = rho + s b (b < keys), rho = (r + c) mod s; its
    mask, key range and skip / full tests are over (a, b): I_LO, I_HI bound a and J_LO, J_HI bound b."""
    stride: int
    var: sp.Symbol        # j, the key variable before lifting
    extent: sp.Expr       # m, its extent
    key: sp.Expr          # rho + s b
    base: sp.Expr         # rho: r, or a symbol standing for base_value (a fixed scalar for the tile analysis)
    base_value: sp.Expr   # (r + c) mod s
    keys: sp.Expr         # floor((m - 1 - rho) / s) + 1


def _strip_mask(e, neutral):
    """where(P, s, neutral) => (P, s); nested masks conjoin; where(P, neutral, s) => (not P, s)."""
    mask = None
    while isinstance(e, D.Op) and e.fn == "where":
        c, a, b = e.args
        if isinstance(b, D.Const) and b.value == neutral:
            p, e = c, a
        elif isinstance(a, D.Const) and a.value == neutral:
            p, e = D.Op("not", (c,), "bool"), b
        else:
            break
        mask = p if mask is None else D.Op("and", (mask, p), "bool")
    return mask, e


def _conjuncts(p):
    if isinstance(p, D.Op) and p.fn == "and":
        return _conjuncts(p.args[0]) + _conjuncts(p.args[1])
    return [p]


def _residue_conjunct(mask, i, j):
    """The first conjunct (a i - a j + e) % s == 0 (a = +-1, e free of i and j, s a positive integer) of a mask,
    as (its position, the conjuncts, s, c) with every admissible key j = i + c - s t (t an integer; c = a e), or
    None."""
    parts = _conjuncts(mask)
    for k, p in enumerate(parts):
        if not (isinstance(p, D.Op) and p.fn == "eq"):
            continue
        a, b = p.args
        if isinstance(a, D.Const) or (isinstance(a, D.Index) and a.expr == 0):
            a, b = b, a
        zero = (isinstance(b, D.Const) and b.value == 0) or (isinstance(b, D.Index) and b.expr == 0)
        if not (zero and isinstance(a, D.Index) and isinstance(a.expr, sp.Mod)):
            continue
        e, s = a.expr.args
        if not (s.is_Integer and s > 0):
            continue
        e = sp.expand(e)
        ci, cj = e.coeff(i), e.coeff(j)
        rest = sp.expand(e - ci * i - cj * j)
        if not ((ci, cj) in ((1, -1), (-1, 1)) and not (rest.free_symbols & {i, j})):
            continue
        return k, parts, int(s), sp.expand(ci * rest)  # ci (i - j) + rest = s t'  =>  j = i + ci rest - s t
    return None


def score_parts(parts) -> tuple[list, list]:
    """(the conjuncts over indices and data, those that read a reduction: the score itself, S > 0): the first
    decide tiles and are re-indexed by liftings; the second are decided per pair, with the score."""
    reads = [p for p in parts if any(isinstance(y, D.BINDERS) for y in D.nodes(p))]
    return [p for p in parts if not any(p is y for y in reads)], reads


def _and(parts):
    out = parts[0]
    for q in parts[1:]:
        out = D.Op("and", (out, q), "bool")
    return out


def _hops(others, i, j, m_ext, s, c) -> Hop | None:
    """The hop re-indexing j = i + c - s t of a reduction whose admissible keys satisfy `others` (and the residue
    condition): the rest of the mask with j := i + c - s t, and the range of t over the tile's rows (None when
    the mask does not bound it)."""
    t = sp.Symbol(f"t_{j.name}", integer=True)
    key = sp.expand(i + c - s * t)
    others = list(others) + [D.Op("ge", (D.Index(j), D.Index(sp.Integer(0))), "bool"),
                             D.Op("lt", (D.Index(j), D.Index(m_ext)), "bool")]
    rest_mask = D.subs(_and(others), {j: key})
    lo, hi = iv.key_range(rest_mask, t, iv.Box({i: (iv.I_LO, iv.I_HI)}))
    if lo is None or hi is None:
        return None
    return Hop(int(s), t, key, sp.simplify(lo), sp.simplify(hi), rest_mask)


def _hop(mask, i, j, m_ext) -> Hop | None:
    """Solve a conjunct (a i - a j + c) % s == 0 (a = +-1, s a positive integer) for j = i + c' - s t."""
    found = _residue_conjunct(mask, i, j)
    if found is None:
        return None
    k, parts, s, c = found
    return _hops(parts[:k] + parts[k + 1:], i, j, m_ext, s, c)


def _band(b, i) -> Hop | None:
    """Any branch as diagonals j = i - t (stride 1): its whole mask solved for t over the tile's rows; None when
    the mask leaves t unbounded (no mask, data-dependent bounds)."""
    if b.mask is None or b.mix is not None:
        return None
    return _hops(_conjuncts(b.mask), i, b.var, b.extent, 1, 0)


# ---- residue lifting (a dimension-lifting rewrite of the ONF) -----------------------------------------------

def _residue_lift(x, i, rl: RowLift):
    """Rule `residue-lift`. For a reduction over keys j < m whose mask has a conjunct (i - j + c) % s == 0 (any
    form `_residue_conjunct` solves; it says j = i + c mod s), with the rows lifted as i = r + s a (r = i mod s):

        (+)_{j < m : P(i, j) and (i - j + c) % s == 0} f(i, j)
          = (+)_{b < cdiv(m - rho, s) : P(r + s a, rho + s b)} f(i, rho + s b),    rho = (r + c) mod s.

    Proof: i = r + s a with 0 <= r < s, so the conjunct holds iff j = r + c = rho (mod s), and b -> rho + s b
    is a bijection from iota(cdiv(m - rho, s)) onto { j < m : j = rho (mod s) } (0 <= rho < s); the conjunct is
    then identically true and drops. (+) is any branch monoid (online softmax, (sum, sum), sum), over the same
    terms. The result is a reduction over b whose mask is over (a, b): a dense band on each residue subsequence
    (PiAttention's skips: b in [a - T, a - 1]). Score and value keep i, which the row lifting binds to r + s a;
    rho is r when s divides c, else a symbol standing for (r + c) mod s (a fixed scalar for the tile analysis).
    Returns (the lifted reduction, its Lift) or None."""
    if isinstance(x, D.SoftmaxSum):
        neutral, body = float("-inf"), x.score
    elif isinstance(x, (D.NormSum, D.KeySum)):
        neutral, body = 0.0, x.weight
    else:
        return None
    mask, inner = _strip_mask(body, neutral)
    if mask is None and neutral == 0.0:
        mask, inner = _strip_mask(body, 0)
    if mask is None:
        return None
    j, s = x.var, rl.stride
    found = _residue_conjunct(mask, i, j)
    if found is None or found[2] != s:
        return None
    k, parts, _, c = found
    value = rl.res if c % s == 0 else sp.Mod(rl.res + c, s)
    rho = rl.res if c % s == 0 else sp.Symbol(f"rho_{j.name}", integer=True, nonnegative=True)
    bvar = sp.Symbol(f"b_{j.name}", integer=True, nonnegative=True)
    key = rho + s * bvar
    if c % s == 0:  # the dropped conjunct, lifted, is identically true (sympy: Mod(s (a - b) + ..., s) = 0)
        e = next(x.expr for x in parts[k].args if isinstance(x, D.Index) and isinstance(x.expr, sp.Mod))
        if sp.simplify(e.xreplace({i: rl.row, j: key})) != 0:
            return None
    others = parts[:k] + parts[k + 1:]
    others, reads = score_parts(others)   # a conjunct on the score (S > 0) keeps i, as the score does
    lifted = _tidy(D.subs(_and(others), {i: rl.row, j: key})) if others else None
    inner = D.subs(inner, {j: key})
    if reads:
        inner = D.Op("where", (D.subs(_and(reads), {j: key}), inner, D.Const(neutral)), inner.dtype)
    body = inner if lifted is None else D.Op("where", (lifted, inner, D.Const(neutral)), inner.dtype)
    keys = sp.floor((x.extent - 1 - rho) / s) + 1
    if isinstance(x, D.SoftmaxSum):
        out = D.SoftmaxSum(bvar, keys, body, D.subs(x.value, {j: key}), x.dtype)
    else:
        out = type(x)(bvar, keys, body, D.subs(x.value, {j: key}), x.dtype)
    return out, Lift(s, j, x.extent, key, rho, value, keys)


def _tidy(p):
    """Divide a lifted comparison of index expressions by the gcd of its coefficients: 16 b + r < 16 a + r
    becomes b < a (exact for integers: the difference is g x with g > 0)."""
    if isinstance(p, D.Op) and p.fn in ("and", "or", "not"):
        return D.Op(p.fn, tuple(_tidy(x) for x in p.args), p.dtype)
    if not (isinstance(p, D.Op) and p.fn in ("lt", "le", "gt", "ge", "eq", "ne")
            and all(isinstance(x, D.Index) for x in p.args)):
        return p
    d = sp.expand(p.args[0].expr - p.args[1].expr)
    if d.has(sp.Mod, sp.floor) or not d.free_symbols:
        return p
    coeffs = [t.as_coeff_Mul()[0] for t in sp.Add.make_args(d)]
    if not all(x.is_Integer for x in coeffs):
        return p
    g = sp.gcd_list(coeffs)
    if g <= 1:
        return p
    d = sp.expand(d / g)
    pos = sp.Add(*[t for t in sp.Add.make_args(d) if t.as_coeff_Mul()[0] > 0])
    neg = sp.Add(*[-t for t in sp.Add.make_args(d) if t.as_coeff_Mul()[0] < 0])
    return D.Op(p.fn, (D.Index(pos), D.Index(neg)), p.dtype)


LIFTING_RULES = (
    D.Rule("residue-lift", "(+)_{j: P(i, j), (i - j + c) % s == 0} f(i, j) => (+)_{b < cdiv(m - rho, s): "
           "P(r + s a, rho + s b)} f(i, rho + s b)   (i = r + s a, rho = (r + c) mod s)", _residue_lift),
)


def row_lift(i, n, s: int) -> RowLift:
    """i = r + s a: the residue r and the row a < floor((n - 1 - r) / s) + 1 of residue r."""
    r = sp.Symbol(f"r_{i.name}", integer=True, nonnegative=True)
    a = sp.Symbol(f"a_{i.name}", integer=True, nonnegative=True)
    return RowLift(s, r, a, r + s * a, sp.floor((n - 1 - r) / s) + 1)
