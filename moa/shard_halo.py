"""Halo shards: window programs whose rows read a bounded stretch of earlier rows (Blurry Window Attention) run on
ranks that each receive the rows before their shard (runtime/ring_halo.py); the other shard plans are in
moa/shard.py."""
from __future__ import annotations

from dataclasses import dataclass, replace

import sympy as sp

from . import dnf as D
from . import symbolic as sy
from .errors import UnsupportedError
from .program import Program
from .shard import QUERY, REPLICATED, _extent_symbol, _fresh_names, _rank_program, _resized_inputs


HALO = "halo"


@dataclass(frozen=True)
class HaloPlan:
    """The program one rank runs on its rows [row0, row0 + nl) of the sequence axis n when every read of a
    sequence-sharded input looks back a bounded number of rows (X[i - r], r < W: the window-mixing kernel's
    K, V). Such an input (role `halo`) is passed extended by the rows before the shard: H = min(halo, row0) of
    them, so its local index is i - off + H; inputs read only at the bare row i (role `query`) pass the rank's
    rows; everything else is replicated. Every other occurrence of i is global (i := i + R - 1: the guard
    i - r >= 0 and the slot mask j <= i see global rows)."""
    program: Program
    outputs: tuple
    roles: dict               # input name -> (QUERY | HALO | REPLICATED, axis)
    n: sp.Symbol              # global extent of the sequence axis
    nl: sp.Symbol             # local length (new dim)
    r1: sp.Symbol             # row0 + 1 (new dim)
    h1: sp.Symbol             # H + 1: rows of halo actually passed, plus one (new dim)
    halo: object              # rows before its own a rank needs (the largest look-back), over dims / params

    @property
    def halo_inputs(self) -> tuple:
        return tuple(nd.attrs[0] for nd in self.program.inputs if self.roles[nd.attrs[0]][0] == HALO)

    def block_dims(self, dims: dict, row0: int, nl: int, h: int) -> dict:
        return {**dims, self.nl.name: nl, self.r1.name: row0 + 1, self.h1.name: h + 1}

    def describe(self) -> str:
        lines = [f"halo shards of {self.program.name}: sequence axis {self.n}, halo {sy.show(self.halo)} rows"]
        for name, (role, ax) in self.roles.items():
            lines.append(f"  {name}: {role}" + ("" if ax is None else f" (axis {ax})"))
        return "\n".join(lines)


def _look_back(r: D.Read, shape: tuple, i, n):
    """(axis, offset) if the read indexes one axis of extent n by i - offset (offset free of i) and no other axis
    by i; 'free' if no axis uses i; None otherwise."""
    hits = []
    for k, (ix, ext) in enumerate(zip(r.index, shape)):
        ix = sp.sympify(ix)
        if i not in ix.free_symbols:
            continue
        off = sp.expand(i - ix)
        if i in off.free_symbols or sy.prove_equal(ext, n) is not True:
            return None
        hits.append((k, off))
    if not hits:
        return "free"
    return hits[0] if len(hits) == 1 else None


def _offset_range(off, ranges: dict, what: str):
    """(min, max) of an offset linear in bound variables (var -> extent)."""
    off = sp.sympify(off)
    free = off.free_symbols - set(ranges)
    if free:
        raise UnsupportedError(f"ring attention (halo): {what} looks back by {sy.show(off)}, which depends on "
                               f"{', '.join(sorted(map(str, free)))}; only bound window variables are supported")
    lo = hi = off.xreplace({v: 0 for v in ranges})
    for v in off.free_symbols:
        c = sp.diff(off, v)
        if c.free_symbols or not c.is_Integer:
            raise UnsupportedError(f"ring attention (halo): {what} looks back by {sy.show(off)}, not linear in the "
                                   "window variables")
        span = c * (sp.sympify(ranges[v]) - 1)
        lo, hi = (lo + span, hi) if c < 0 else (lo, hi + span)
    return lo, hi


def halo(program: Program, outputs) -> HaloPlan:
    """The HaloPlan of `program` (see the class): window programs across ranks by a halo exchange."""
    outputs = tuple(outputs)
    decl = program.input_map
    ns, per_out = set(), []
    for o in outputs:
        if len(o.vars) < 2:
            raise UnsupportedError(f"output {o.name}: ring attention needs rows x columns outputs")
        ns.add(_extent_symbol(o.extents[-2], f"sequence (rows of {o.name})"))
        per_out.append((o, o.vars[-2]))
    if len(ns) != 1:
        raise UnsupportedError(f"ring attention needs one sequence extent across outputs, got {sorted(map(str, ns))}")
    n = ns.pop()
    seen: dict = {name: [] for name in decl}
    his = []
    for o, i in per_out:
        ranges = {x.var: x.extent for x in D.nodes(o.expr) if isinstance(x, D.BINDERS)}
        for x in D.nodes(o.expr):
            if isinstance(x, D.Read):
                lb = _look_back(x, decl[x.name].shape, i, n)
                seen[x.name].append(lb)
                if isinstance(lb, tuple):
                    lo, hi = _offset_range(lb[1], ranges, f"read {x.name}")
                    if (sp.sympify(lo) >= 0) is not sp.true:
                        raise UnsupportedError(f"ring attention (halo): read {x.name} at row i - ({sy.show(lb[1])}) "
                                               "may read rows after i; only look-backs are exchanged")
                    his.append(hi)
    roles = {}
    for name, rs in seen.items():
        axes = {r[0] for r in rs if isinstance(r, tuple)}
        if not rs or any(not isinstance(r, tuple) for r in rs) or len(axes) != 1:
            roles[name] = (REPLICATED, None)
        else:
            roles[name] = (QUERY if all(sp.sympify(r[1]) == 0 for r in rs) else HALO, axes.pop())
    if not any(r[0] == QUERY for r in roles.values()) and not any(r[0] == HALO for r in roles.values()):
        raise UnsupportedError("ring attention (halo): no input is read at the row index i, so the rank's rows "
                               "cannot be told from its inputs")
    hmax = sp.Max(0, *his) if his else sp.Integer(0)
    fresh = _fresh_names(program, [(o, i, set()) for o, i in per_out])
    nl, r1, h1 = sy.dim(fresh("n_local")), sy.dim(fresh("row0_1")), sy.dim(fresh("halo_1"))
    inputs = _resized_inputs(program, roles, lambda role: nl if role == QUERY else nl + h1 - 1)
    new_outputs = []
    for o, i in per_out:
        expr = _rewrite_halo(o.expr, {i: i + r1 - 1}, roles, decl, i, n, h1)
        new_outputs.append(replace(o, extents=(*o.extents[:-2], nl, o.extents[-1]), expr=expr))
    prog = _rank_program(program, "ring_halo", (nl, r1, h1), inputs, nl, program.outputs)
    return HaloPlan(prog, tuple(new_outputs), roles, n, nl, r1, h1, hmax)


def _rewrite_halo(e, gmap, roles, decl, i, n, h1):
    """Global rows everywhere except the sequence index of a sharded read, which becomes local to the (extended)
    shard: i - off for a query input, i - off + H for a halo input."""
    if isinstance(e, D.Read):
        role, ax = roles[e.name]
        lb = _look_back(e, decl[e.name].shape, i, n)
        if role != REPLICATED and isinstance(lb, tuple):
            k, off = lb
            local = i - off + (h1 - 1 if role == HALO else 0)
            return replace(e, index=tuple(local if p == k else sp.sympify(x).xreplace(gmap)
                                          for p, x in enumerate(e.index)))
        return replace(e, index=tuple(sp.sympify(x).xreplace(gmap) for x in e.index))
    if isinstance(e, D.Index):
        return replace(e, expr=e.expr.xreplace(gmap))
    if isinstance(e, (D.SoftmaxAt, D.NormalizeAt)):
        e = replace(e, target=sp.sympify(e.target).xreplace(gmap))
    kids = D.children(e)
    return D.with_children(e, [_rewrite_halo(k, gmap, roles, decl, i, n, h1) for k in kids]) if kids else e
