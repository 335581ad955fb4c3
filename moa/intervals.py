"""Interval and modular analysis of mask predicates over a tile's index box.

A tile is the box i in [I_LO, I_HI] x j in [J_LO, J_HI] (inclusive, clipped to the valid extents), with
every other index variable (heads, batch-like comprehension axes) fixed. For a predicate P(i, j) we derive,
as sympy formulas in the box corners:
  all_false(P): P is false at every point of the box (the tile is skipped),
  all_true(P):  P is true at every point (the tile needs no mask code),
and the key range: a superset [lo, hi] of the j admissible for some i in [I_LO, I_HI] (the loop bounds).
Anything the analysis cannot decide (data-dependent predicates, non-linear index arithmetic) is "unknown":
never all-false, never all-true, unbounded range. That is always correct, only slower.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import sympy as sp

from . import dnf as D
from . import ir

I_LO, I_HI = sp.Symbol("I_LO", integer=True), sp.Symbol("I_HI", integer=True)
J_LO, J_HI = sp.Symbol("J_LO", integer=True), sp.Symbol("J_HI", integer=True)
TILE_W = sp.Symbol("TILE_W", integer=True, positive=True)   # the width of a key tile (BLOCK_N in a kernel)


@dataclass(frozen=True)
class Box:
    """Index variables with a range over the tile: var -> (lo, hi). Other variables are fixed scalars.
    reads: data-dependent reads known by a per-tile summary (Read -> its placeholder, whose range is the
    summary's (min, max) symbols in `ranges`)."""
    ranges: dict
    reads: dict = field(default_factory=dict)


def spread_minmax(e) -> sp.Expr:
    """e with sums and constant factors pushed into Min / Max (a + Max(x, y) = Max(a + x, a + y), -Max = Min of
    the negatives) and Max(x, -x) as Abs(x): `interval` then bounds the terms together (i - Min(i, j) is
    Max(0, i - j) >= 0, where the terms' own bounds give -(n - 1))."""
    e = sp.sympify(e)
    if not e.has(sp.Min, sp.Max):
        return e
    args = [spread_minmax(a) for a in e.args]
    mm = next((a for a in args if isinstance(a, (sp.Min, sp.Max))), None)
    if isinstance(e, sp.Add) and mm is not None:
        rest = sp.Add(*args) - mm
        return spread_minmax(type(mm)(*[x + rest for x in mm.args]))
    if isinstance(e, sp.Mul) and mm is not None and len(args) == 2 and (sp.Mul(*args) / mm).is_number:
        c = sp.Mul(*args) / mm
        f = type(mm) if c.is_nonnegative else sp.Min if isinstance(mm, sp.Max) else sp.Max
        return spread_minmax(f(*[c * x for x in mm.args]))
    out = e.func(*args)
    if isinstance(out, (sp.Min, sp.Max)) and len(out.args) == 2 and sp.expand(sum(out.args)) == 0:
        a = sp.Abs(out.args[0])
        return a if isinstance(out, sp.Max) else -a
    return out


def interval(e: sp.Expr, box: Box):
    """(lo, hi) of an integer index expression over the box, or None when unknown."""
    e = sp.sympify(e)
    vs = [v for v in box.ranges if v in e.free_symbols]
    if not vs:
        return e, e
    if e in box.ranges:
        return box.ranges[e]
    if isinstance(e, sp.Add):
        parts = [interval(a, box) for a in e.args]
        if any(p is None for p in parts):
            return None
        return sp.Add(*(p[0] for p in parts)), sp.Add(*(p[1] for p in parts))
    if isinstance(e, sp.Mul):
        consts = [a for a in e.args if not (a.free_symbols & set(box.ranges))]
        rest = [a for a in e.args if a.free_symbols & set(box.ranges)]
        c = sp.Mul(*consts)
        if len(rest) != 1:
            return None
        r = interval(rest[0], box)
        if r is None:
            return None
        if c.is_nonnegative:
            return c * r[0], c * r[1]
        if c.is_nonpositive:
            return c * r[1], c * r[0]
        return None
    if isinstance(e, sp.floor):
        num, den = sp.fraction(sp.together(e.args[0]))
        r = interval(num, box)
        if r is None or den.free_symbols & set(box.ranges) or not den.is_positive:
            return None
        return sp.floor(r[0] / den), sp.floor(r[1] / den)
    if isinstance(e, sp.Mod):
        a, b = e.args
        if b.free_symbols & set(box.ranges) or not b.is_positive:
            return None
        return sp.Integer(0), b - 1
    if isinstance(e, sp.Abs):
        r = interval(e.args[0], box)
        if r is None:
            return None
        lo, hi = r
        return sp.Max(0, lo, -hi), sp.Max(-lo, hi)
    if isinstance(e, (sp.Min, sp.Max)):
        parts = [interval(a, box) for a in e.args]
        if any(p is None for p in parts):
            return None
        f = type(e)
        return f(*(p[0] for p in parts)), f(*(p[1] for p in parts))
    if isinstance(e, sp.Piecewise):   # where(c, a, b) of indices: the hull of its values (the conditions aside)
        parts = [interval(v, box) for v, _ in e.args]
        if any(p is None for p in parts):
            return None
        return sp.Min(*(p[0] for p in parts)), sp.Max(*(p[1] for p in parts))
    return None


_FLIP = {"lt": "gt", "le": "ge", "gt": "lt", "ge": "le", "eq": "eq", "ne": "ne"}
_NEG = {"lt": "ge", "le": "gt", "gt": "le", "ge": "lt", "eq": "ne", "ne": "eq"}


def _diff(c: D.Op, reads=None):
    """A comparison of index expressions (or of summarised reads: `reads`, Read -> placeholder) as (fn, d)
    meaning `d fn 0`, or None."""
    reads = reads or {}

    def value(x):
        if isinstance(x, D.Index):
            return x.expr
        if isinstance(x, D.Const) and isinstance(x.value, int) and not isinstance(x.value, bool):
            return sp.Integer(x.value)
        # a read only alone on its side: arithmetic on data (L - 1, i - L, 2 * L) wraps at the ends of its type in
        # the program's own evaluation, where a tile test's exact arithmetic would not
        return reads.get(x) if isinstance(x, D.Read) else None

    va, vb = (value(x) for x in c.args)
    if va is None or vb is None:
        return None
    return c.fn, sp.expand(va - vb) if not (va - vb).has(sp.Mod, sp.floor) else va - vb


def classify(pred, box: Box):
    """(all_false, all_true) of a predicate over the box, as sympy booleans."""
    if isinstance(pred, D.Const):
        v = bool(pred.value)
        return sp.false if v else sp.true, sp.true if v else sp.false
    if isinstance(pred, D.Read) and pred in box.reads and pred.dtype == ir.BOOL:   # any / all of the tile
        lo, hi = box.ranges[box.reads[pred]]
        return hi < 1, lo >= 1
    if isinstance(pred, D.Op):
        if pred.fn == "and":
            conj = _conjuncts(pred)
            parts = [classify(c, box) for c in conj]
            tight = _modular_conjunction(conj, box)   # replaces the modular atoms' own emptiness tests
            return sp.Or(*(tight.get(k, f) for k, (f, _) in enumerate(parts))), sp.And(*(t for _, t in parts))
        if pred.fn == "or":
            (f1, t1), (f2, t2) = classify(pred.args[0], box), classify(pred.args[1], box)
            return sp.And(f1, f2), sp.Or(t1, t2)
        if pred.fn == "not":
            f, t = classify(pred.args[0], box)
            return t, f
        if pred.fn == "where" and pred.dtype == ir.BOOL:   # where(c, a, b) = (c and a) or (not c and b)
            (fc, tc), (fa, ta), (fb, tb) = (classify(x, box) for x in pred.args)
            return sp.And(sp.Or(fc, fa), sp.Or(tc, fb)), sp.Or(sp.And(tc, ta), sp.And(fc, tb), sp.And(ta, tb))
        if pred.fn in _FLIP:
            d = _diff(pred, box.reads)
            if d is not None:
                return _compare(d[0], d[1], box)
    return sp.false, sp.false


def _conjuncts(pred):
    if isinstance(pred, D.Op) and pred.fn == "and":
        return [a for x in pred.args for a in _conjuncts(x)]
    return [pred]


def _modular_conjunction(conj, box) -> dict:
    """Emptiness of a conjunction that a modular atom and inequalities on the same index expression decide only
    together: (e mod r) == 0 with lo' <= e <= hi' from the other atoms (e.g. PiAttention's j < i and
    (i - j) // s <= T) holds nowhere in the box iff [Max(lo, lo'), Min(hi, hi')] holds no multiple of r.
    Each atom alone may be satisfiable in the box (i - j = 0 is a multiple of s; j < i holds off the diagonal).
    Returns {position of the modular atom: its tightened emptiness test}."""
    atoms = [_diff(c, box.reads) if isinstance(c, D.Op) and c.fn in _FLIP else None for c in conj]
    out = {}
    for k, a in enumerate(atoms):
        if a is None or a[0] != "eq" or not isinstance(a[1], sp.Mod) or not a[1].args[1].is_positive or \
                a[1].args[1].free_symbols & set(box.ranges):   # a modulus that varies over the box
            continue
        e, r = a[1].args
        rng = interval(e, box)
        if rng is None:
            continue
        los, his = [rng[0]], [rng[1]]
        for b in atoms:
            lo, hi = _bound_on(e, *b, set(box.ranges)) if b is not None else (None, None)
            los += [lo] if lo is not None else []
            his += [hi] if hi is not None else []
        if len(los) + len(his) > 2:
            out[k] = sp.floor(sp.Min(*his) / r) * r < sp.Max(*los)
    return out


def _bound_on(e, fn, d, boxvars):
    """(lo, hi) that `d fn 0` puts on the index expression e, where d is s e + c or s floor(e / r) + c
    (s = +-1, c free of the box's variables); a side is None when the atom does not bound it."""
    for sign in (1, -1):
        c = sp.expand(d - sign * e)
        if not (c.free_symbols & boxvars) and not c.has(sp.Mod, sp.floor):
            lo, hi = _solve(fn if sign == 1 else _FLIP[fn], -c if sign == 1 else c)
            return lo, hi
    fl = [a for a in sp.Add.make_args(d) if isinstance(a, sp.floor)]
    if len(fl) == 1 and fn in ("le", "lt", "ge", "gt"):
        num, den = sp.fraction(sp.together(fl[0].args[0]))
        c = sp.expand(d - fl[0])
        if den.is_positive and sp.expand(num - e) == 0 and not (c.free_symbols & boxvars):
            lo, hi = _solve(fn, -c)   # bounds on floor(e / den)
            return (None if lo is None else lo * den), (None if hi is None else hi * den + den - 1)
    return None, None


def _solve(fn, k):
    """(lo, hi) of the integers x with `x fn k` (fn one of lt le gt ge eq)."""
    return {"lt": (None, k - 1), "le": (None, k), "gt": (k + 1, None), "ge": (k, None),
            "eq": (k, k)}.get(fn, (None, None))


def _compare(fn, d, box):
    # eq/ne of a modular expression: (e mod r) == 0 holds somewhere iff [lo(e), hi(e)] holds a multiple of r
    if fn in ("eq", "ne") and isinstance(d, sp.Mod) and d.args[1].is_positive and \
            not d.args[1].free_symbols & set(box.ranges):   # a modulus fixed over the box (not a packed head's)
        e, r = d.args
        rng = interval(e, box)
        if rng is None:
            return sp.false, sp.false
        lo, hi = rng
        none = sp.floor(hi / r) * r < lo
        every = sp.And(sp.Eq(lo, hi), sp.Eq(sp.Mod(lo, r), 0))
        return (none, every) if fn == "eq" else (every, none)
    rng = interval(d, box)
    if rng is None:
        return sp.false, sp.false
    lo, hi = rng
    if fn == "le":
        return lo > 0, hi <= 0
    if fn == "lt":
        return lo >= 0, hi < 0
    if fn == "ge":
        return hi < 0, lo >= 0
    if fn == "gt":
        return hi <= 0, lo > 0
    if fn == "eq":
        return sp.Or(lo > 0, hi < 0), sp.And(sp.Eq(lo, 0), sp.Eq(hi, 0))
    return sp.And(sp.Eq(lo, 0), sp.Eq(hi, 0)), sp.Or(lo > 0, hi < 0)


def key_range(pred, j: sp.Symbol, box: Box):
    """(lo, hi): a superset of the j for which pred can hold with i in the box; None = unbounded."""
    if isinstance(pred, D.Const):
        return (None, None) if pred.value else (sp.Integer(1), sp.Integer(0))
    if isinstance(pred, D.Op):
        if pred.fn == "and":
            (l1, h1), (l2, h2) = key_range(pred.args[0], j, box), key_range(pred.args[1], j, box)
            return _combine(sp.Max, l1, l2), _combine(sp.Min, h1, h2)
        if pred.fn == "or":
            (l1, h1), (l2, h2) = key_range(pred.args[0], j, box), key_range(pred.args[1], j, box)
            return (None if l1 is None or l2 is None else sp.Min(l1, l2),
                    None if h1 is None or h2 is None else sp.Max(h1, h2))
        if pred.fn == "not" and isinstance(pred.args[0], D.Op) and pred.args[0].fn in _NEG:
            inner = pred.args[0]
            return key_range(D.Op(_NEG[inner.fn], inner.args, inner.dtype), j, box)
        if pred.fn in _FLIP:
            d = _diff(pred, box.reads)
            if d is not None:
                return _linear_bound(d[0], d[1], j, box)
    return None, None


def _combine(f, a, b):
    if a is None:
        return b
    if b is None:
        return a
    return f(a, b)


def _linear_bound(fn, d, j, box):
    """Bounds on j from `d fn 0` where d = a*j + rest, a a non-zero integer, rest free of j."""
    fl = [a for a in sp.Add.make_args(d) if isinstance(a, sp.floor) and j in a.free_symbols]
    if fn in ("le", "lt", "ge", "gt") and len(fl) == 1:
        # floor(num / den) + rest fn 0 with den > 0:  <= : num + den (rest - 1) < 0;  < : num + den rest < 0;
        #                                            >= : num + den rest >= 0;       > : num + den (rest - 1) >= 0
        num, den = sp.fraction(sp.together(fl[0].args[0]))
        rest = d - fl[0]
        if den.is_positive and not (rest.free_symbols & {j}) and not (den.free_symbols & {j}):
            shift = 1 if fn in ("le", "gt") else 0
            lin = sp.expand(num + den * (rest - shift))
            return _linear_bound("lt" if fn in ("le", "lt") else "ge", lin, j, box)
    if fn == "ne" or d.has(sp.Mod, sp.floor, sp.Abs, sp.Min, sp.Max):
        return _abs_bound(fn, d, j, box)
    poly = sp.Poly(d, j) if j in d.free_symbols else None
    if poly is None or poly.degree() != 1:
        return None, None
    a = poly.coeff_monomial(j)
    rest = sp.expand(d - a * j)
    if not (a.is_Integer and a != 0):
        return None, None
    rng = interval(rest, box)
    if rng is None:
        return None, None
    rlo, rhi = rng
    if fn == "eq":
        lo1, hi1 = _linear_bound("le", d, j, box)
        lo2, hi2 = _linear_bound("ge", d, j, box)
        return _combine(sp.Max, lo1, lo2), _combine(sp.Min, hi1, hi2)
    if fn in ("le", "lt"):  # a*j <= c - rest, loosest at rest = rlo
        c = 0 if fn == "le" else -1
        if a > 0:
            return None, sp.floor((c - rlo) / a)
        return -sp.floor((c - rlo) / -a), None
    c = 0 if fn == "ge" else 1  # a*j >= c - rest, loosest at rest = rhi
    if a > 0:
        return -sp.floor((rhi - c) / a), None
    return None, sp.floor((rhi - c) / -a)


def _abs_bound(fn, d, j, box):
    """abs(x) <= c style bounds: abs(lin) - c <= 0  =>  -c <= lin <= c."""
    if fn in ("le", "lt") and isinstance(d, sp.Add):
        absparts = [a for a in d.args if isinstance(a, sp.Abs)]
        if len(absparts) == 1:
            inner = absparts[0].args[0]
            c = absparts[0] - d  # d = abs(inner) - c
            lo1, hi1 = _linear_bound(fn, inner - c, j, box)
            lo2, hi2 = _linear_bound(fn, -inner - c, j, box)
            return _combine(sp.Max, lo1, lo2), _combine(sp.Min, hi1, hi2)
    return None, None


def _at_least_zero(rel):
    """e with rel <=> e >= 0 over the integers, or None for a non-inequality."""
    if isinstance(rel, sp.Gt):
        return rel.lhs - rel.rhs - 1
    if isinstance(rel, sp.Ge):
        return rel.lhs - rel.rhs
    if isinstance(rel, sp.Lt):
        return rel.rhs - rel.lhs - 1
    if isinstance(rel, sp.Le):
        return rel.rhs - rel.lhs
    return None


def skip_implied_by_range(skip, key_lo, key_hi) -> bool:
    """Whether every disjunct of a tile-skip formula is one the key loop's bounds already exclude:
    J_LO > key_hi (the loop stops at key_hi) or J_HI < key_lo (the first tile is the one holding key_lo).
    Then no tile inside the loop is skipped and the kernel needs no skip test: its loads stay at the loop's
    top level, where Triton can software-pipeline them."""
    if skip is sp.false:
        return True
    for d in sp.Or.make_args(skip):
        # a conjunction of J_LO > x_t is J_LO > Max(x_t); of J_HI < y_t, J_HI < Min(y_t) (e.g. prefix-LM's
        # (J_LO >= p) & (J_LO > I_HI) against key_hi = Max(p - 1, I_HI))
        es = [_at_least_zero(c) for c in sp.And.make_args(d)]
        if any(e is None for e in es):
            return False
        if key_hi is not None and all(sp.expand(e).coeff(J_LO) == 1 and J_HI not in e.free_symbols for e in es):
            if _same(sp.Max(*[J_LO - 1 - e for e in es]), key_hi):
                continue
        if key_lo is not None and all(sp.expand(e).coeff(J_HI) == -1 and J_LO not in e.free_symbols for e in es):
            if _same(sp.Min(*[e + J_HI + 1 for e in es]), key_lo):
                continue
        return False
    return True


def _same(a, b) -> bool:
    a, b = sp.expand(a), sp.expand(b)
    return a == b or sp.simplify(a - b) == 0


def full_span(full):
    """The key tiles that need no mask code, as an interval of their first key: (lo, hi) such that every tile
    [J_LO, J_LO + TILE_W - 1] with lo <= J_LO <= hi satisfies `full` (an all-true formula of `classify`), as
    formulas in I_LO, I_HI and TILE_W; a side is None when unbounded. None when the set is not known to be one
    interval (a modular or data-dependent mask): then no tile is known full. Used to split a key loop into its
    full tiles, whose loop carries no mask, and the boundary tiles before and after them."""
    if full is sp.false:
        return None
    if full is sp.true:
        return None, None
    return _span(full.xreplace({J_HI: J_LO + TILE_W - 1}))


def _span(f):
    if isinstance(f, sp.And):
        spans = [_span(a) for a in f.args]
        if any(x is None for x in spans):
            return None
        los = [x[0] for x in spans if x[0] is not None]
        his = [x[1] for x in spans if x[1] is not None]
        return (sp.Max(*los) if los else None), (sp.Min(*his) if his else None)
    if isinstance(f, sp.Or):
        spans = [_span(a) for a in f.args]
        if any(x is None for x in spans):
            return None
        los, his = [x[0] for x in spans], [x[1] for x in spans]
        if all(lo is None for lo in los) and all(h is not None for h in his):   # [-inf, Max(hi)]: one interval
            return None, sp.Max(*his)
        if all(h is None for h in his) and all(lo is not None for lo in los):
            return sp.Min(*los), None
        return None
    e = _at_least_zero(f)
    if e is None:
        return None
    e = sp.expand(e)
    for term in sp.Add.make_args(e):   # c - Max(x, y) >= 0 is (c - x >= 0) & (c - y >= 0); c + Min likewise
        if isinstance(term, sp.Mul) and term.args[0] == -1 and isinstance(term.args[1], sp.Max) or \
                isinstance(term, sp.Min):
            inner = term.args[1].args if isinstance(term, sp.Mul) else term.args
            sign = -1 if isinstance(term, sp.Mul) else 1
            return _span(sp.And(*[sp.Ge(e - term + sign * x, 0) for x in inner]))
    if J_LO not in e.free_symbols or e.has(sp.floor, sp.Mod, sp.Abs, sp.Min, sp.Max):
        return None
    a = e.coeff(J_LO)
    rest = sp.expand(e - a * J_LO)
    if not (a.is_Integer and a != 0) or J_LO in rest.free_symbols:
        return None
    if a > 0:   # a J_LO + rest >= 0  <=>  J_LO >= ceil(-rest / a)
        return -sp.floor(rest / a), None
    return None, sp.floor(rest / -a)
