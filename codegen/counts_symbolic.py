"""The cost model's totals as sympy formulas (Sum over row and key tiles where masks shape the count)."""
from __future__ import annotations


import sympy as sp

from moa import intervals as iv
from moa.errors import UnsupportedError
from moa.onf import Schedule, unknown_summaries, uses_summaries

from .constexprs import BLOCK_M, BLOCK_N, HEAD_DIM_V, KEY_TILE, ROW_TILE, csym

from .counts import components
from .data_tiles import SCAN
from .ledger import ledger

HOP = sp.Symbol("h", integer=True)   # the hop of a hop loop (codegen/hops.py)


# ---- symbolic prediction ---------------------------------------------------------------------------------------

def _interval_1d(conds, v):
    """[lo, hi] of v from conditions linear in v with coefficient +-1, or None."""
    lo, hi = None, None
    for c in conds:
        d = sp.expand(c.lhs - c.rhs)
        if not d.is_polynomial(v) or sp.Poly(d, v).degree() != 1:
            return None
        a = sp.Poly(d, v).coeff_monomial(v)
        rest = sp.expand(d - a * v)
        if a not in (1, -1):
            return None
        op = c.rel_op
        if a == -1:
            op = {"<": ">", "<=": ">=", ">": "<", ">=": "<=", "==": "=="}[op]
            rest = -rest
        bound = -rest  # v op bound
        if op == "<":
            hi = bound - 1 if hi is None else sp.Min(hi, bound - 1)
        elif op == "<=":
            hi = bound if hi is None else sp.Min(hi, bound)
        elif op == ">":
            lo = bound + 1 if lo is None else sp.Max(lo, bound + 1)
        elif op == ">=":
            lo = bound if lo is None else sp.Max(lo, bound)
        else:
            return None
    return lo, hi


def lanes_formula(site, bases: dict, lengths: dict):
    """Lanes of one execution of an access site as a sympy formula in the tile starts (bases: axis -> start).
    A variable on an axis of length 1 (a hop, a loop or program index) is its base."""
    axes = dict(site.axes)
    scal = {v: sp.sympify(bases.get(a, 0)) for v, a in axes.items() if lengths.get(a) == 1}
    conds = []
    for c in site.conds:
        c = c.xreplace(scal) if scal else c
        if c is sp.false:
            return sp.Integer(0)
        if c is not sp.true:
            conds.append(c)
    axes = {v: a for v, a in axes.items() if v not in scal}
    comps, scalar = components(conds, list(axes))
    f = sp.Integer(1)
    for c in scalar:
        f *= Iverson(c)
    for vs, cs in comps:
        if not cs:
            for v in vs:
                f *= lengths[axes[v]]
            continue
        if len(vs) == 1:
            v = vs[0]
            base, L = bases.get(axes[v], sp.Integer(0)), lengths[axes[v]]
            rng = _interval_1d(cs, v)
            if rng is not None:
                lo, hi = rng
                first = base if lo is None else sp.Max(base, lo)
                last = base + L - 1 if hi is None else sp.Min(base + L - 1, hi)
                f *= sp.Max(0, last - first + 1)
                continue
        body = Iverson(sp.And(*cs))
        for v in vs:
            base, L = bases.get(axes[v], sp.Integer(0)), lengths[axes[v]]
            body = sp.Sum(body, (v, base, base + L - 1))
        f *= body
    return f


class Iverson(sp.Function):
    """[cond]: 1 where cond holds, else 0 (opaque to sympy's Piecewise folding, so that conditions stay inside the
    Sum that binds their variables)."""
    nargs = 1
    is_integer = True
    is_nonnegative = True

    @classmethod
    def eval(cls, cond):
        if cond is sp.true:
            return sp.Integer(1)
        if cond is sp.false:
            return sp.Integer(0)
        return None

    def _sympystr(self, printer):
        return f"[{printer.doprint(self.args[0])}]"


def _row_count(n):
    """Valid rows of row tile r, as lanes_formula writes it for the condition i < n."""
    ilo = ROW_TILE * BLOCK_M
    return sp.Max(0, sp.Min(ilo + BLOCK_M - 1, n - 1) - ilo + 1)


def _key_count(m):
    jlo = KEY_TILE * BLOCK_N
    return sp.Max(0, sp.Min(jlo + BLOCK_N - 1, m - 1) - jlo + 1)


def _sum_full(expr, var, count, total, ntiles):
    """sum over every tile var < ntiles of expr; sum of the valid-index count of each tile = total."""
    if not expr.has(var):
        return ntiles * expr
    indep, dep = expr.as_independent(var, as_Add=False)
    if dep == count:
        return total * indep
    return sp.Sum(expr, (var, 0, ntiles - 1))


# long: one formula per region kind, in the order of the numeric predict (codegen/counts.py) it mirrors
def predict_symbolic(program, sched: Schedule, spec, elem_bytes: dict, batch=1) -> dict:
    """The counters as sympy formulas in the dims and the constexprs BLOCK_M, BLOCK_N, HEAD_DIM*, HEAD_DIM_V.

    Sums run over row tiles r < ceiling(n / BLOCK_M) and the key tiles t of each row tile's loop; they are left
    unevaluated where a mask shapes them (sympy `Sum`; substitute numbers and call `.doit()` to evaluate).
    Closed forms are used where they are exact: sum over row tiles of the valid rows = n, likewise keys."""
    if getattr(sched, "lift", None) is not None:
        raise UnsupportedError(f"output {sched.output}: the cost model has no formulas for the residue schedule "
                               f"(rows r + s a per program); pass every dim for numbers")
    led = ledger(program, spec)
    bm, bn = BLOCK_M, BLOCK_N
    lengths = {"row": bm, "key": bn, "col": HEAD_DIM_V, "hop": 1, "scan": SCAN}
    for name, _ in spec.head_dims:
        lengths[name] = csym(name)
    _, n = sched.row
    R = sp.ceiling(n / bm)
    r, t = ROW_TILE, KEY_TILE
    ilo, ihi = r * bm, sp.Min(r * bm + bm, n) - 1
    loops, hops, splits = {}, {}, {}
    for k, b in enumerate(sched.branches):
        m = b.extent
        if ("hop", k) in led.regions:   # hop loop (codegen/hops.py): t in [t_lo, t_hi] per row tile
            rows = {iv.I_LO: ilo, iv.I_HI: ihi}
            hops[k] = (b.hop.t_lo.xreplace(rows), b.hop.t_hi.xreplace(rows))
            continue
        data = uses_summaries(sched, b)   # tested with the data's summaries: without data, they say nothing
        skip, full = (sp.sympify(f).subs(unknown_summaries(b)) for f in b.tile_tests(data))
        if skip is sp.true:
            loops[k] = None
            continue
        rows = {iv.I_LO: ilo, iv.I_HI: ihi}
        lo_t = sp.Integer(0) if b.key_lo is None else sp.floor(sp.Max(0, b.key_lo.xreplace(rows)) / bn)
        hi_e = m - 1 if b.key_hi is None else sp.Min(m - 1, b.key_hi.xreplace(rows))
        hi_t = sp.floor(hi_e / bn)
        if b.split and not data:   # three loops over tile indices: [lo, full_lo) / [full_lo, full_hi) / [full_hi, hi]
            splits[k] = _split_tiles(b, rows, lo_t * bn, hi_e, m, bn)
            loops[k] = (lo_t, hi_t, sp.true, sp.true, False, m)
            continue
        corners = {**rows, iv.J_LO: t * bn, iv.J_HI: sp.Min(t * bn + bn, m) - 1}
        vis = sp.true if skip is sp.false else sp.Not(skip.xreplace(corners))
        part = sp.true if full is sp.false else sp.Or(sp.Not(full.xreplace(corners)), t * bn + bn > m)
        full_rect = b.key_lo is None and b.key_hi is None and skip is sp.false
        loops[k] = (lo_t, hi_t, vis, sp.And(vis, part), full_rect, m)

    def region_sum(region, expr):
        """Sum of a per-execution quantity (a formula in r, t) over the executions of a region."""
        if region in ("program", "lse"):
            return _sum_full(expr, r, _row_count(n), n, R)
        kind, k = region
        if kind == "hop":
            lo_h, hi_h = hops[k]
            inner = sp.Sum(expr, (HOP, lo_h, sp.Max(hi_h, lo_h - 1))) if expr.has(HOP) else \
                expr * sp.Max(0, hi_h - lo_h + 1)
            return _sum_full(inner, r, _row_count(n), n, R)
        if kind == "scan":   # steps of the scan over [lo, hi] (the loop it trims is counted untrimmed: a bound)
            lo_t, hi_t = loops[k][:2]
            return _sum_full(expr * sp.Max(0, sp.floor((hi_t - lo_t) / SCAN) + 1), r, _row_count(n), n, R)
        if kind in splits.get(k, {}):
            a, z = splits[k][kind]
            inner = expr * sp.Max(0, z - a + 1) if not expr.has(t) else sp.Sum(expr, (t, a, sp.Max(z, a - 1)))
            return _sum_full(inner, r, _row_count(n), n, R)
        lo_t, hi_t, vis, part, full_rect, m = loops[k]
        ind = sp.true if kind == "iter" else vis if kind == "visit" else part
        if full_rect and ind is sp.true:
            inner = _sum_full(expr, t, _key_count(m), m, sp.ceiling(m / bn))
        else:
            body = expr if ind is sp.true else expr * Iverson(ind)
            inner = body * sp.Max(0, hi_t - lo_t + 1) if not body.has(t) else \
                sp.Sum(body, (t, lo_t, sp.Max(hi_t, lo_t - 1)))
        return _sum_full(inner, r, _row_count(n), n, R)

    def over_lead(expr):
        for v, x in sched.lead:
            expr = sp.Sum(expr, (v, 0, x - 1)) if expr.has(v) else expr * x
        return expr * batch

    totals = dict.fromkeys(("dot", "other", "trans", "loaded", "stored", "tiles"), sp.Integer(0))
    for k in loops:
        for kind in (("lo", "full", "hi") if k in splits else ("visit",)):
            if loops[k] is not None:
                totals["tiles"] += region_sum((kind, k), sp.Integer(1))
    for k in hops:   # every hop iteration is a visited tile
        totals["tiles"] += region_sum(("hop", k), sp.Integer(1))
    for region, w in led.regions.items():
        if region == "lse" or (region != "program" and region[0] != "hop" and loops.get(region[1]) is None):
            continue
        ex = region_sum(region, sp.Integer(1))
        totals["dot"] += ex * w.dot
        totals["other"] += ex * w.other
        totals["trans"] += ex * w.trans
        for names, sites, key in ((w.loads, led.loads, "loaded"), (w.stores, led.stores, "stored")):
            for name in names:
                site = sites[name]
                lanes = lanes_formula(site, {"row": ilo, "key": t * bn, "hop": HOP}, lengths)
                totals[key] += region_sum(region, lanes) * elem_bytes[site.tensor]
    f = {key: _padded(over_lead(val), spec) for key, val in totals.items()}
    return {"flops": f["dot"] + f["other"], "dot_flops": f["dot"], "transcendentals": f["trans"],
            "dram_bytes_loaded": f["loaded"], "dram_bytes_stored": f["stored"],
            "dram_bytes": f["loaded"] + f["stored"], "tiles_visited": f["tiles"], "programs": over_lead(R)}


def _split_tiles(b, rows: dict, lo, hi, m, bn) -> dict:
    """Tile-index ranges [a, z] of a split key loop's three loops, from the bounds the kernel computes
    (moa/tiles.py split_bounds): a tile starts at t * bn."""
    fl, fu = (None if x is None else x.xreplace({**rows, iv.TILE_W: bn}) for x in b.span)
    first = lo if fl is None else sp.Max(lo, sp.floor((fl + bn - 1) / bn) * bn)
    full_lo = sp.Min(first, hi + 1)
    last = m - bn if fu is None else sp.Min(fu, m - bn)
    full_hi = sp.Max(full_lo, sp.Min(hi + 1, (sp.floor(last / bn) + 1) * bn))
    c_lo, c_hi = sp.ceiling(full_lo / bn), sp.ceiling(full_hi / bn)
    return {"lo": (lo / bn, c_lo - 1), "full": (c_lo, c_hi - 1), "hi": (c_hi, sp.floor(hi / bn))}


def _padded(expr, spec):
    """min(HEAD_DIM, d) = d: a padded head dim is never below its extent."""
    pairs = [(csym(name), sp.sympify(ext)) for name, ext in spec.head_dims]
    pairs.append((HEAD_DIM_V, sp.sympify(spec.col_extent)))
    for sym, ext in pairs:
        expr = expr.replace(lambda x, s=sym, e=ext: isinstance(x, sp.Min) and set(x.args) == {s - 1, e - 1},
                            lambda x, e=ext: e - 1)
    return expr


def evaluate_formula(expr, values: dict):
    """The value of a formula of predict_symbolic for concrete values (symbols or names -> numbers), evaluating
    nested Sums by explicit summation over their (concrete) ranges."""
    expr = sp.sympify(expr)
    subs = {}
    for s in expr.free_symbols:
        if s in values:
            subs[s] = values[s]
        elif s.name in values:
            subs[s] = values[s.name]
    expr = expr.xreplace({k: sp.sympify(v) for k, v in subs.items()})

    def ev(e, env):
        if isinstance(e, sp.Sum):
            body, limits = e.function, list(e.limits)
            v, lo, hi = limits[-1]
            inner = sp.Sum(body, *limits[:-1]) if len(limits) > 1 else body
            lo, hi = int(ev(lo, env)), int(ev(hi, env))
            return sum((ev(inner, {**env, v: sp.Integer(k)}) for k in range(lo, hi + 1)), sp.Integer(0))
        if not e.args or not e.has(sp.Sum):
            return e.xreplace(env)
        return e.func(*[ev(a, env) for a in e.args])

    out = ev(expr, {})
    return int(out) if out.is_Integer else out
