"""Counters of a kernel launch described by its grid and loops: the window-mixing kernel (codegen/window.py) and
the two kernels of the chunked linear form (codegen/chunked.py).

A `Launch` names one generated function, its ledger (codegen/ledger.py: work per region, access sites), the program
ids it ranges over, the range of every loop region, and the tile axes of its access sites: axis -> (length, base),
the lanes [base, base + length) one execution touches along that axis (a loop or program index is an axis of
length 1). From that, the same counting as for the tiled kernel (moa/cost.py): work = executions x work per
execution; bytes = lanes of every access (mask true) x element size. `launch_counts` enumerates the executions
(numbers), `launch_formulas` writes the same sums as sympy formulas.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import numpy as np
import sympy as sp

from moa import symbolic as sy
from moa.cost import Counts
from moa.errors import UnsupportedError
from moa.exprfold import np_eval

from .constexprs import BLOCK_M, HEAD_DIM_V, csym
from .counts import site_lanes
from .counts_symbolic import lanes_formula
from .ledger import Ledger


@dataclass(frozen=True)
class Launch:
    """One kernel launch for the cost model (the batch x leading grid axis apart: `weight` multiplies)."""
    fn: str
    ledger: Ledger
    grid: tuple              # ((symbol, extent), ...): the program ids
    loops: dict              # ("loop", q) -> (symbol, lo, hi): the loop variable runs over [lo, hi)
    axes: dict               # axis -> (length, base) of the lanes one execution touches
    witness: object = None   # the region whose executions count as visited tiles
    source: str = ""         # the module's source (measure finds the witness's load line in it)


def _executions(launch: Launch, env: dict):
    """Region -> (number of executions, symbol -> per-execution values) for concrete dims (env)."""
    ranges = [np.arange(max(0, int(np_eval(ext, env))), dtype=np.int64) for _, ext in launch.grid]
    mesh = np.meshgrid(*ranges, indexing="ij") if ranges else []
    prog = {sym: a.reshape(-1) for (sym, _), a in zip(launch.grid, mesh)}
    P = math.prod(len(r) for r in ranges)
    out = {"program": (P, prog)}
    for region, (v, lo, hi) in launch.loops.items():
        e = {**env, **prog}
        lo_a = np.broadcast_to(np_eval(lo, e), (P,)).astype(np.int64)
        hi_a = np.broadcast_to(np_eval(hi, e), (P,)).astype(np.int64)
        cnt = np.maximum(0, hi_a - lo_a)
        idx = np.repeat(np.arange(P, dtype=np.int64), cnt)
        first = np.cumsum(cnt) - cnt
        ex = {s: a[idx] for s, a in prog.items()}
        ex[v] = lo_a[idx] + np.arange(len(idx), dtype=np.int64) - first[idx]
        out[region] = (len(idx), ex)
    return out


def launch_counts(launch: Launch, env: dict, cvals: dict, elem_bytes: dict, weight: int = 1) -> Counts:
    """Counters of the launch for concrete dims and constexprs (env: symbols -> ints, cvals included), times
    `weight` (batch x leading instances). tiles_visited = executions of the witness region."""
    env = {**env, **cvals}
    c = Counts()
    execs = _executions(launch, env)
    c.programs = execs["program"][0]
    lengths = {a: int(np_eval(sp.sympify(L), env)) for a, (L, _) in launch.axes.items()}
    for region, w in launch.ledger.regions.items():
        if region not in execs:
            raise UnsupportedError(f"cost model: {launch.fn} has a region {region} without a domain")
        count, ex = execs[region]
        dot, other, trans = (int(sp.sympify(x).xreplace(cvals)) for x in (w.dot, w.other, w.trans))
        c.dot_flops += count * dot
        c.flops += count * (dot + other)
        c.transcendentals += count * trans
        if region == launch.witness:
            c.tiles_visited += count
        known = {**env, **ex}
        starts = {a: np.broadcast_to(np_eval(sp.sympify(base), known), (count,)).astype(np.int64)
                  for a, (_, base) in launch.axes.items() if sp.sympify(base).free_symbols <= set(known)}
        for names, sites, loading in ((w.loads, launch.ledger.loads, True), (w.stores, launch.ledger.stores, False)):
            for name in names:
                site = sites[name]
                nbytes = int(site_lanes(site, env, lengths, starts, count).sum()) * elem_bytes[site.tensor]
                if loading:
                    c.dram_bytes_loaded += nbytes
                    c.loaded_by_tensor[site.tensor] = c.loaded_by_tensor.get(site.tensor, 0) + nbytes
                else:
                    c.dram_bytes_stored += nbytes
    for f in ("flops", "dot_flops", "transcendentals", "dram_bytes_loaded", "dram_bytes_stored", "tiles_visited",
              "programs"):
        setattr(c, f, getattr(c, f) * weight)
    c.loaded_by_tensor = {k: v * weight for k, v in c.loaded_by_tensor.items()}
    return c


def launch_formulas(launch: Launch, elem_bytes: dict, weight=1) -> dict:
    """The counters of `launch_counts` as sympy formulas in the dims and constexprs (Sum over program ids and
    loop variables where an access's lanes depend on them)."""

    def over(region, expr):
        if region != "program":
            v, lo, hi = launch.loops[region]
            expr = sp.Sum(expr, (v, lo, sp.Max(hi, lo) - 1)) if expr.has(v) else expr * sp.Max(0, hi - lo)
        for sym, ext in reversed(launch.grid):
            expr = sp.Sum(expr, (sym, 0, ext - 1)) if expr.has(sym) else expr * ext
        return expr

    tot = dict.fromkeys(("dot", "other", "trans", "loaded", "stored", "tiles"), sp.Integer(0))
    lengths = {a: sp.sympify(L) for a, (L, _) in launch.axes.items()}
    bases = {a: sp.sympify(b) for a, (_, b) in launch.axes.items()}
    for region, w in launch.ledger.regions.items():
        ex = over(region, sp.Integer(1))
        tot["dot"] += ex * w.dot
        tot["other"] += ex * w.other
        tot["trans"] += ex * w.trans
        if region == launch.witness:
            tot["tiles"] += ex
        for names, sites, key in ((w.loads, launch.ledger.loads, "loaded"), (w.stores, launch.ledger.stores,
                                                                              "stored")):
            for name in names:
                site = sites[name]
                tot[key] += over(region, lanes_formula(site, bases, lengths)) * elem_bytes[site.tensor]
    f = {k: v * weight for k, v in tot.items()}
    return {"flops": f["dot"] + f["other"], "dot_flops": f["dot"], "transcendentals": f["trans"],
            "dram_bytes_loaded": f["loaded"], "dram_bytes_stored": f["stored"],
            "dram_bytes": f["loaded"] + f["stored"], "tiles_visited": f["tiles"],
            "programs": over("program", sp.Integer(1)) * weight}


def total_counts(launches, sched, dims_env: dict, cvals: dict, elem_bytes: dict, nbatch: int) -> Counts:
    """Counters of a sequence of launches of one output (dims_env: dim symbol -> int), summed over batch x leading
    instances (each leading index evaluated when a bound or an access mask uses it, else one instance
    multiplied)."""
    lead = [(v, int(sy.evaluate(x, dims_env))) for v, x in sched.lead]
    leadvars = {v for v, _ in lead}
    used = set()
    for x in launches:
        for w in x.ledger.regions.values():
            for name in w.loads:
                used |= set().union(*(c.free_symbols for c in x.ledger.loads[name].conds))
            for name in w.stores:
                used |= set().union(*(c.free_symbols for c in x.ledger.stores[name].conds))
        for _, lo, hi in x.loops.values():
            used |= sp.sympify(lo).free_symbols | sp.sympify(hi).free_symbols
    per_lead = bool(used & leadvars)
    out = Counts()
    if per_lead:
        for combo in itertools.product(*(range(x) for _, x in lead)):
            env = {**dims_env, **{v: val for (v, _), val in zip(lead, combo)}}
            for x in launches:
                out.add(launch_counts(x, env, cvals, elem_bytes, nbatch))
    else:
        weight = nbatch * math.prod(x for _, x in lead)
        for x in launches:
            out.add(launch_counts(x, dims_env, cvals, elem_bytes, weight))
    return out


def total_formulas(launches, sched, elem_bytes: dict, nbatch=1) -> dict:
    """`total_counts` as formulas (Sum over a leading index where an access uses it)."""
    out: dict = {}
    for x in launches:
        for k, v in launch_formulas(x, elem_bytes).items():
            for lv, ext in sched.lead:
                v = sp.Sum(v, (lv, 0, ext - 1)) if v.has(lv) else v * ext
            out[k] = out.get(k, sp.Integer(0)) + v * nbatch
    return out


# ---- the window-mixing kernel (codegen/window.py) -------------------------------------------------------------

W_PAD = csym("W_PAD")
HEAD_DIM = csym("HEAD_DIM")
_PID = sp.Symbol("p", integer=True, nonnegative=True)     # program_id(0): the row tile
_HOP = sp.Symbol("r_", integer=True, nonnegative=True)    # the loop variable r of the two hop loops


def window_launch(sched, led: Ledger, source: str = "") -> Launch:
    """`_attn_window`: programs over row tiles; two loops over the W hops r (key row i - r); the first one's
    iterations are the visited tiles (a hop of a row tile, like a key tile of the tiled kernel)."""
    b = sched.branches[0]
    n = sched.row[1]
    loops = {("loop", 0): (_HOP, sp.Integer(0), b.mix.extent), ("loop", 1): (_HOP, sp.Integer(0), b.mix.extent)}
    axes = {"row": (BLOCK_M, _PID * BLOCK_M), "HEAD_DIM": (HEAD_DIM, 0), "col": (HEAD_DIM_V, 0), "wslot": (W_PAD, 0),
            "wr": (1, _HOP)}
    return Launch("_attn_window", led, ((_PID, sp.ceiling(n / BLOCK_M)),), loops, axes, ("loop", 0), source)


def window_consts(sched, dims: dict) -> dict:
    """The constexprs runtime/window_run.py launches with."""
    b = sched.branches[0]
    n = sy.evaluate(sched.row[1], dims)
    w = max(sy.evaluate(b.mix.extent, dims), sy.evaluate(b.extent, dims))
    return {BLOCK_M: min(64, sy.tile_width(n)), HEAD_DIM: sy.tile_width(sy.evaluate(b.mix.kext, dims)),
            HEAD_DIM_V: sy.tile_width(sy.evaluate(sched.col[1], dims)), W_PAD: sy.tile_width(w)}
