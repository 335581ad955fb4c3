"""From an adjoint to a gradient DNF: scattering `dA[f(V)] += adj(V)` into `<u> psi dA = expr`.

Reverse-mode differentiation (moa/grad.py) ends at input reads: the read `A[f(V)]`, inside the reductions that
bind the variables V, receives the adjoint `where(C(V), F1(V) * F2(V) * ..., 0)` for every point V of its index
space. The gradient of A is the sum of those adjoints over the points that read a given element:

    dA[u] = +red_V where(f(V) == u, where(C, F1 * F2 * ..., 0), 0)

The rules below turn that into a DNF without the equality mask wherever the index can be solved, and nest the
remaining sums so that each factor sits in the innermost sum over the variables it uses (the factored form of
FlashAttention's backward: dK[j] = +red_i dS_ij Q[i] with dS_ij = P_ij (+red_c dO[i, c] (V[j, c] - O[i, c]))).
Each rule is data (SCATTER_RULES) with the identity it applies; tests/test_grad_rules.py checks each in float64.
"""
from __future__ import annotations

from dataclasses import dataclass

import sympy as sp

from . import intervals as iv
from . import ir
from . import symbolic as sy
from .dnf import Rule
from .dnf_nodes import BINDERS, Const, Index, Op, Reduce, free_vars, nodes, subs


@dataclass(frozen=True)
class Term:
    """The adjoint of one read `name[index]`: the sum over `ranges` ((var, extent) ...) of
    where(and(conds), prod(factors), 0), added to the element of `name` the index names."""
    name: str
    index: tuple
    ranges: tuple
    conds: tuple
    factors: tuple


@dataclass(frozen=True)
class Scatter:
    """A term on its way to a gradient DNF over the gradient's variables: `pending` holds the (index, u) axes not
    matched yet; the axes already matched were solved for a variable (dropped from `ranges`) or became masks."""
    ranges: tuple
    conds: tuple
    factors: tuple
    pending: tuple


def subs_free(e, mapping: dict):
    """Substitute free index variables only (a binder's own variable is not replaced inside it)."""
    return subs(e, mapping, free_only=True)


def conj(conds: tuple):
    out = None
    for c in conds:
        out = c if out is None else Op("and", (out, c), ir.BOOL)
    return out


def product(factors: tuple):
    out = None
    for f in factors:
        if isinstance(f, Const) and f.value == 1:
            continue
        out = f if out is None else Op("mul", (out, f), ir.FLOAT)
    return Const(1.0) if out is None else out


def guarded(conds: tuple, e):
    """where(c1 and c2 ..., e, 0), or e without conditions."""
    c = conj(conds)
    return e if c is None else Op("where", (c, e, Const(0.0)), ir.FLOAT)


# ---- the rules ----------------------------------------------------------------------------------------------


def _linear_coeff(f, v):
    """c when f = c v + rest with c a nonzero integer and rest free of v, else None."""
    if any(v in x.free_symbols for x in f.find(lambda y: isinstance(y, (sp.floor, sp.ceiling, sp.Mod, sp.Min,
                                                                         sp.Max, sp.Abs)))):
        return None
    c = sp.expand(sp.diff(f, v))
    if not (c.is_Integer and c != 0) or v in sp.expand(f - c * v).free_symbols:
        return None
    return int(c)


def _in_range(value, ext, ranges, u_ranges) -> tuple[bool, bool]:
    """(0 <= value, value < ext) provable over the box of the remaining variables and the gradient's variables."""
    box = iv.Box({**{v: (sp.Integer(0), sp.sympify(x) - 1) for v, x in ranges},
                  **{v: (sp.Integer(0), sp.sympify(x) - 1) for v, x in u_ranges}})
    rng = iv.interval(value, box)
    if rng is None:
        return False, False
    lo, hi = rng
    return sy.prove_nonneg(lo) is True, sy.prove_nonneg(sp.sympify(ext) - 1 - hi) is True


def _substituted(s: Scatter, v, value, ranges: tuple, conds) -> Scatter:
    """The scatter with the summed variable v replaced by `value` everywhere, over `ranges`, under `conds` too."""
    m = {v: value}
    return Scatter(ranges, tuple(conds) + tuple(subs_free(x, m) for x in s.conds),
                   tuple(subs_free(x, m) for x in s.factors),
                   tuple((sp.sympify(f).xreplace(m), w) for f, w in s.pending[1:]))


def _bounds(conds: tuple, ranges: tuple) -> dict:
    """var -> (lo, hi) of the summed variables, narrowed by the conditions that bound one of them alone
    (v < E, v >= E, not(v < E) ..., E free of v)."""
    box = {v: [sp.Integer(0), sp.sympify(x) - 1] for v, x in ranges}
    flat, todo = [], list(conds)
    while todo:   # the conjuncts of every condition
        c = todo.pop()
        if isinstance(c, Op) and c.fn == "and":
            todo += list(c.args)
        else:
            flat.append(c)
    for c in flat:
        neg = isinstance(c, Op) and c.fn == "not"
        c = c.args[0] if neg else c
        if not (isinstance(c, Op) and c.fn in ("lt", "le", "gt", "ge") and
                all(isinstance(a, Index) or isinstance(a, Const) and a.dtype == ir.INT for a in c.args)):
            continue
        fn = {"lt": "ge", "le": "gt", "gt": "le", "ge": "lt"}[c.fn] if neg else c.fn
        a, b = (sp.sympify(x.expr if isinstance(x, Index) else int(x.value)) for x in c.args)
        for v in box:
            if _linear_coeff(a - b, v) not in (1, -1):
                continue
            k = _linear_coeff(a - b, v)
            rest = sp.expand((a - b) - k * v)   # k v + rest (fn) 0
            fn_v = fn if k == 1 else {"lt": "gt", "le": "ge", "gt": "lt", "ge": "le"}[fn]
            bound = -rest * k                      # v (fn_v) bound; each condition holds: either bound is sound
            if fn_v in ("lt", "le"):
                box[v][1] = bound - 1 if fn_v == "lt" else bound
            else:
                box[v][0] = bound + 1 if fn_v == "gt" else bound
    return {v: tuple(r) for v, r in box.items()}


def _clamp_index(s: Scatter, u_ranges: tuple):
    # +red_v where(v < E and C, X[min(v, E - 1)], 0)  ->  +red_v where(v < E and C, X[v], 0)
    """clamp-index: a min / max in the first pending axis that the conditions decide (the clamp of a read joined
    by a where, where(k < dn, QN[min(k, dn - 1)], QR[max(k - dn, 0)])) is replaced by the argument it takes
    under them, so the axis is solved instead of masked."""
    f, u = s.pending[0]
    f = sp.sympify(f)
    if not f.has(sp.Min, sp.Max):
        return None
    box = iv.Box(_bounds(s.conds, s.ranges))

    def pick(e):
        if not isinstance(e, (sp.Min, sp.Max)) or len(e.args) != 2:
            return e
        a, b = e.args
        rng = iv.interval(b - a, box)
        if rng is None:
            return e
        a_smaller = sy.prove_nonneg(rng[0]) is True
        b_smaller = sy.prove_nonneg(-rng[1]) is True
        if isinstance(e, sp.Min):
            return a if a_smaller else b if b_smaller else e
        return b if a_smaller else a if b_smaller else e

    g = f.replace(lambda e: isinstance(e, (sp.Min, sp.Max)), pick)
    if g == f:
        return None
    return Scatter(s.ranges, s.conds, s.factors, ((g, u),) + s.pending[1:])


def _solve_index(s: Scatter, u_ranges: tuple):
    # +red_{v<N} where(f(v) == u, X(v), 0)  ->  where(0 <= g(u) < N, X(g(u)), 0),   g = f^-1 (f = c v + r)
    """solve-index: the first pending axis f(V) == u is affine in a summed variable v with an integer coefficient
    c: v = (u - r) / c, one point of the sum instead of a mask (the innermost such v is taken). Guards keep
    0 <= v < N unless the intervals prove them, and (u - r) % c == 0 when |c| > 1."""
    f, u = s.pending[0]
    f = sp.sympify(f)
    for v, ext in reversed(s.ranges):
        c = _linear_coeff(f, v) if v in f.free_symbols else None
        if c is None:
            continue
        rest = sp.expand(f - c * v)
        conds = []
        if abs(c) == 1:
            value = sp.expand((u - rest) * c)
        else:
            value = sy.floordiv(u - rest, c)
            conds.append(Op("eq", (Index(sy.mod(u - rest, abs(c))), Index(sp.Integer(0))), ir.BOOL))
        ranges = tuple((w, x) for w, x in s.ranges if w != v)
        lo_ok, hi_ok = _in_range(value, ext, ranges, u_ranges)
        if not lo_ok:
            conds.append(Op("ge", (Index(value), Index(sp.Integer(0))), ir.BOOL))
        if not hi_ok:
            conds.append(Op("lt", (Index(value), Index(sp.sympify(ext))), ir.BOOL))
        return _substituted(s, v, value, ranges, conds)
    return None


def _solve_mod_index(s: Scatter, u_ranges: tuple):
    # +red_{v<N} where((c v + r) % N == u, X(v), 0)  ->  where(u < N, X((c (u - r)) % N), 0),   c = +-1
    """solve-mod-index: the first pending axis (c v + r) % N == u with c = +-1 and the summed v inside one period
    (its extent at most N, or a condition keeps it below N: partial rotary's k < r) (a rotation of the axis, as
    rotary embeddings' rotate-half reads it): v = (c (u - r)) % N, one point of the sum, guarded by v < its extent.
    A guard keeps u < N unless the gradient's axis is provably no longer."""
    f, u = s.pending[0]
    f = sp.sympify(f)
    if not isinstance(f, sp.Mod):
        return None
    g, big = f.args
    box = _bounds(s.conds, s.ranges)
    index_vars = {w for w, _ in (*s.ranges, *u_ranges)}
    for v, ext in reversed(s.ranges):
        c = _linear_coeff(g, v) if v in g.free_symbols else None
        # the summed v stay inside one period [0, N): by their extent, or by a condition (v < r); then u has one
        # solution there, kept where it is inside v's extent (the conditions follow, substituted)
        period = sy.prove_nonneg(sp.sympify(big) - ext) is True or sy.prove_nonneg(big - 1 - box[v][1]) is True
        if c not in (1, -1) or big.free_symbols & index_vars or not period:
            continue
        value = sy.mod(c * (u - sp.expand(g - c * v)), big)
        ranges = tuple((w, x) for w, x in s.ranges if w != v)
        u_ext = dict(u_ranges)[u]
        conds = () if sy.prove_nonneg(sp.sympify(big) - u_ext) is True else \
            (Op("lt", (Index(u), Index(sp.sympify(big))), ir.BOOL),)
        if sy.prove_nonneg(sp.sympify(ext) - big) is not True:
            conds += (Op("lt", (Index(value), Index(sp.sympify(ext))), ir.BOOL),)
        return _substituted(s, v, value, ranges, conds)
    return None


def _fresh(s: Scatter, u_ranges: tuple, base: str) -> sp.Symbol:
    """An index variable named after `base` that no variable of the scatter (bound or free) uses."""
    taken = {v.name for v, _ in (*s.ranges, *u_ranges)}
    for e in (*s.conds, *s.factors):
        taken |= {x.var.name for x in nodes(e) if isinstance(x, BINDERS)} | {v.name for v in free_vars(e)}
    for f, _ in s.pending:
        taken |= {x.name for x in sp.sympify(f).free_symbols}
    k = 0
    while f"{base}{k}" in taken:
        k += 1
    return sy.index_var(f"{base}{k}")


def _solve_floor_index(s: Scatter, u_ranges: tuple):
    # +red_{v<N} where((v + r) // c == u, X(v), 0)  ->  +red_{t<c} where(0 <= c u - r + t < N, X(c u - r + t), 0)
    """solve-floor-index: the first pending axis (v + r) // c == u (c >= 0 free of v: a grouped head's
    a // (h // g)) holds for the c points v = c u - r + t, t < c: a sum over c points instead of a mask over N
    (guards keep 0 <= v < N unless the intervals prove them)."""
    f, u = s.pending[0]
    f = sp.sympify(f)
    if not isinstance(f, sp.floor):
        return None
    num, den = sy.split_floor(f)
    if den.free_symbols & {w for w, _ in (*s.ranges, *u_ranges)}:   # c must not vary over the sums (c = i + 1)
        return None
    for v, ext in reversed(s.ranges):
        if v not in num.free_symbols or _linear_coeff(num, v) != 1 or \
                sy.prove_nonneg(den) is not True:   # c = 0: the forward's own index divides by zero
            continue
        t = _fresh(s, u_ranges, "t")
        value = sp.expand(den * u - (num - v) + t)
        ranges = tuple((w, x) for w, x in s.ranges if w != v) + ((t, den),)
        lo_ok, hi_ok = _in_range(value, ext, ranges, u_ranges)
        conds = [] if lo_ok else [Op("ge", (Index(value), Index(sp.Integer(0))), ir.BOOL)]
        if not hi_ok:
            conds.append(Op("lt", (Index(value), Index(sp.sympify(ext))), ir.BOOL))
        return _substituted(s, v, value, ranges, conds)
    return None


def _split_mod_index(s: Scatter, u_ranges: tuple):
    # +red_{v<N} where(f(v % c, v // c) == u, X(v), 0)
    #     ->  +red_{r<c} +red_{q<ceil(N/c)} where(c q + r < N and f(r, q) == u, X(c q + r), 0)
    """split-mod-index: a summed variable v read in the first pending axis only through v % c and v // c (c > 0
    free of v: GPT-J's interleaved partner k + 1 - 2 (k % 2), a half-size rotary table cs[i, k % (d // 2)]) is
    split as v = c q + r; the axis is then affine in q and r and solve-index takes it (a sum over c points, or
    over the ceil(N / c) values of q, instead of a mask over N)."""
    f, u = s.pending[0]
    f = sp.sympify(f)
    for v, ext in reversed(s.ranges):
        parts = [x for x in f.atoms(sp.Mod, sp.floor) if v in x.free_symbols]
        if not parts:
            continue
        cs = set()
        for x in parts:
            num, den = (x.args[0], x.args[1]) if isinstance(x, sp.Mod) else sy.split_floor(x)
            cs.add(den if num == v else None)
        c = cs.pop() if len(cs) == 1 else None
        if c is None or c.free_symbols & {w for w, _ in (*s.ranges, *u_ranges)} or sy.prove_nonneg(c) is not True:
            continue   # c varying over the sums (c = i + 1) splits nothing; c = 0: the forward's own % 0
        r = _fresh(s, u_ranges, "r")
        q = _fresh(Scatter(s.ranges + ((r, c),), s.conds, s.factors, s.pending), u_ranges, "q")
        whole = c * q + r
        g = f.xreplace({x: r if isinstance(x, sp.Mod) else q for x in parts}).xreplace({v: whole})
        ranges = tuple((w, x) for w, x in s.ranges if w != v) + ((r, c), (q, sy.floordiv(sp.sympify(ext) + c - 1, c)))
        hi_ok = _in_range(whole, ext, ranges, u_ranges)[1]
        out = _substituted(s, v, whole, ranges, [] if hi_ok else [Op("lt", (Index(whole), Index(sp.sympify(ext))),
                                                                     ir.BOOL)])
        return Scatter(out.ranges, out.conds, out.factors, ((g, u),) + out.pending)
    return None


def _bool(c):
    """A sympy condition over index expressions as a DNF boolean (relations, and / or / not)."""
    rel = {"<": "lt", "<=": "le", ">": "gt", ">=": "ge", "==": "eq", "!=": "ne"}
    if c is sp.true or c is sp.false:
        return Const(bool(c), ir.BOOL)
    if isinstance(c, sp.core.relational.Relational) and c.rel_op in rel:
        return Op(rel[c.rel_op], (Index(c.lhs), Index(c.rhs)), ir.BOOL)
    parts = [_bool(a) for a in c.args] if isinstance(c, (sp.Not, sp.And, sp.Or)) else [None]
    if None in parts:   # a condition not expressed here: the rule declines
        return None
    if isinstance(c, sp.Not):
        return Op("not", (parts[0],), ir.BOOL)
    out = parts[0]
    for a in parts[1:]:
        out = Op("and" if isinstance(c, sp.And) else "or", (out, a), ir.BOOL)
    return out


def _split_piecewise_index(s: Scatter, u_ranges: tuple):
    # +red_V where(C, X, 0) at index p(V) == u, p = where(c, a, b)
    #     ->  +red_V where(c and C, X, 0) at a == u  +  +red_V where(not c and C, X, 0) at b == u
    """split-piecewise-index: a where in the first pending axis (a partner index where(k % 2 == 0, k + 1, k - 1))
    splits the scatter in one per piece, each under its condition (the earlier pieces' negated), so each index is
    solved on its own instead of masked."""
    f, u = s.pending[0]
    f = sp.sympify(f)
    pieces = [x for x in f.atoms(sp.Piecewise)]
    if not pieces:
        return None
    p, out, before = pieces[0], [], []
    for value, cond in p.args:
        c, b = _bool(cond), [Op("not", (x,), ir.BOOL) for x in before]
        if c is None:
            return None
        conds = tuple(b) + (() if cond is sp.true else (c,))
        out.append(Scatter(s.ranges, conds + s.conds, s.factors, ((f.xreplace({p: value}), u),) + s.pending[1:]))
        before.append(c)
    return out


def _mask_index(s: Scatter, u_ranges: tuple):
    # +red_V where(C, F, 0) at index f(V) == u  ->  +red_V where(f(V) == u and C, F, 0)
    """mask-index: an axis whose index solves for no summed variable (a product, a clamp ...) stays
    a condition of the sum: the gradient sums the adjoint over every point that reads the element."""
    f, u = s.pending[0]
    cond = Op("eq", (Index(sp.sympify(f)), Index(u)), ir.BOOL)
    return Scatter(s.ranges, (cond,) + s.conds, s.factors, s.pending[1:])


def _degree(v, parts) -> int:
    return sum(v in free_vars(p) for p in parts)


def eliminate(ranges: tuple, conds: tuple, factors: tuple):
    # +red_{v, W} where(C_v and C, F_v * F, 0)  ->  +red_W where(C, F * +red_v where(C_v, F_v, 0), 0)
    """eliminate: sum out one variable at a time, the one fewest factors and conditions use first (the innermost
    binder on a tie); only the factors and conditions that use it go inside its sum (distributivity), so every
    factor is evaluated in the smallest index space that holds its variables. A condition stays with the factors
    it guards as long as it uses the variable being summed."""
    conds, factors, todo = list(conds), list(factors), list(ranges)
    while todo:
        v, ext = min(todo, key=lambda item: (_degree(item[0], conds + factors), -todo.index(item)))
        todo.remove((v, ext))
        dc = [c for c in conds if v in free_vars(c)]
        df = [f for f in factors if v in free_vars(f)]
        conds = [c for c in conds if not any(c is x for x in dc)]
        factors = [f for f in factors if not any(f is x for x in df)]
        factors.append(Reduce("sum", v, ext, guarded(tuple(dc), product(tuple(df)))))
    return guarded(tuple(conds), product(tuple(factors)))


SCATTER_RULES = (
    Rule("clamp-index", "+red_v where(v < E and C, X[min(v, E - 1)], 0) => +red_v where(v < E and C, X[v], 0)   "
                        "(min / max decided by the conditions)", _clamp_index),
    Rule("solve-index", "+red_{v<N} where(f(v) == u, X(v), 0) => where(0 <= f^-1(u) < N, X(f^-1(u)), 0)   "
                        "(f affine in v, integer coefficient)", _solve_index),
    Rule("solve-mod-index", "+red_{v<N} where((c v + r) % N == u, X(v), 0) => where(u < N, X((c (u - r)) % N), 0)   "
                            "(c = +-1)", _solve_mod_index),
    Rule("solve-floor-index", "+red_{v<N} where((v + r) // c == u, X(v), 0) => +red_{t<c} where(0 <= c u - r + t < N, "
                              "X(c u - r + t), 0)", _solve_floor_index),
    Rule("split-piecewise-index", "+red_V where(C, X, 0) at where(c, a, b) == u => +red_V where(c and C, X, 0) at "
                                  "a == u + +red_V where(not c and C, X, 0) at b == u", _split_piecewise_index),
    Rule("split-mod-index", "+red_{v<N} where(f(v % c, v // c) == u, X(v), 0) => +red_{r<c} +red_{q<ceil(N/c)} "
                            "where(c q + r < N and f(r, q) == u, X(c q + r), 0)", _split_mod_index),
    Rule("mask-index", "dA[f(V)] += X(V) => dA[u] = +red_V where(f(V) == u, X(V), 0)", _mask_index),
)
ELIMINATION_RULE = Rule("eliminate", "+red_{v,W} where(C_v and C, F_v * F, 0) => +red_W where(C, F * +red_v "
                                     "where(C_v, F_v, 0), 0)", eliminate)


def scatter(term: Term, us: tuple, extents: tuple):
    """The gradient DNF expression (over the variables `us`, of extents `extents`) of one term: the rules turn each
    scatter into one (or, split-piecewise-index, several summed) until no axis is pending."""
    u_ranges = tuple(zip(us, extents))
    todo, done = [Scatter(term.ranges, term.conds, term.factors, tuple(zip(term.index, us)))], []
    while todo:
        s = todo.pop()
        if not s.pending:
            done.append(ELIMINATION_RULE.apply(s.ranges, s.conds, s.factors))
            continue
        for rule in SCATTER_RULES:
            out = rule.apply(s, u_ranges)
            if out is not None:
                todo += out if isinstance(out, list) else [out]
                break
    out = None
    for e in reversed(done):
        out = e if out is None else Op("add", (out, e), ir.FLOAT)
    return out
