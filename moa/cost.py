"""The cost model: what a fused kernel does (FLOPs, transcendentals, DRAM bytes, tiles) predicted without running it.

Three ingredients, none of which executes the kernel:
1. The ONF schedule: loop bounds (key_lo, key_hi), the tile-skip and mask-free formulas of every branch. They are
   evaluated on the tile corners (I_LO, I_HI, J_LO, J_HI) of every (query tile, key tile) pair, exactly as the
   kernel evaluates them, which gives the iterations, the visited tiles and the partial (masked) tiles.
2. The ledger of the emitted kernel (`ledger`): the generated source is walked once, abstractly (shapes in the
   constexpr symbols BLOCK_M, BLOCK_N, HEAD_DIM*, HEAD_DIM_V; no values), giving per region the work of one
   execution: tl.dot FLOPs (2*M*N*K), other floating-point operations (one per element, reductions n_in - n_out)
   and transcendentals. Regions: "program" (once per program), ("iter", k) (each iteration of branch k's key
   loop), ("visit", k) (each visited tile), ("partial", k) (each visited tile whose mask code runs), "lse".
   The counting conventions are those of the instrumented interpreter (moa.runtime.measure).
3. The access sites the emitter recorded for every tl.load / tl.store (codegen.emit.AccessSite): the index
   expressions and the mask as sympy relations. The lanes an access touches in one tile are counted over the
   tile's index box (padding lanes included, masked lanes excluded), per axis when the mask separates.

Totals = sum over regions of (executions of the region) x (work of one execution); bytes = sum over access sites of
lanes x element size. `predict` gives numbers for concrete dims and a tile config, `predict_symbolic` the same
totals as sympy formulas (Sum over row tiles r and key tiles t where masks make the count data-shaped).

The schedules of the tiled kernel: a branch of kind HOPS runs a hop loop, region ("hop", k), whose iterations are
range(t_lo, t_hi + 1) of the ONF's Hop evaluated on each row tile (each iteration counts as a visited tile); the
residue schedule's programs are (residue r, tile of a) pairs with rows r + s a (`row_tiles`: strided row lanes),
and its lifted branches loop over key tiles in b-space with the box over a. The window-mixing kernel and the
chunked linear form are counted by moa/cost_launch.py with the same ledger and lane counting.
"""
from __future__ import annotations

import itertools
import math
from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np
import sympy as sp

from . import dnf as D
from . import intervals as iv
from . import ir
from . import symbolic as sy
from .onf import BranchValue, DotTile, Schedule

from .cost_common import BLOCK_M, BLOCK_N, HEAD_DIM_V, csym, np_eval
from .ledger import ledger


# ---- lanes of an access site over a tile ------------------------------------------------------------------

def _components(conds, boxvars):
    """Group conditions by the box variables they couple (union-find)."""
    parent = {v: v for v in boxvars}

    def find(v):
        while parent[v] != v:
            v = parent[v]
        return v

    for c in conds:
        vs = [v for v in c.free_symbols if v in parent]
        for a, b in zip(vs, vs[1:]):
            parent[find(a)] = find(b)
    comps = defaultdict(lambda: ([], []))
    scalar = []
    for v in boxvars:
        comps[find(v)][0].append(v)
    for c in conds:
        vs = [v for v in c.free_symbols if v in parent]
        if vs:
            comps[find(vs[0])][1].append(c)
        else:
            scalar.append(c)
    return list(comps.values()), scalar


def site_lanes(site, env: dict, lengths: dict, starts: dict, ntiles: int, strides: dict | None = None,
               scalars: dict | None = None) -> np.ndarray:
    """Lanes of one execution of an access site, per tile: an int64 array of length ntiles.

    env: dims and leading indices -> ints; lengths: axis -> tile length (BLOCK_M, BLOCK_N, padded head dims);
    starts: axis -> per-tile first index (arrays of length ntiles; 'col' and head axes start at 0); strides:
    axis -> lane step (1 unless given: the residue schedule's rows r + s a); scalars: symbol -> per-tile value
    of a program scalar that is no tile axis (the residue r)."""
    axes = dict(site.axes)
    strides = strides or {}
    if ntiles == 0:
        return np.zeros(0, dtype=np.int64)
    if scalars:  # a program scalar is an axis of length 1 starting at its value
        used = set().union(*(c.free_symbols for c in site.conds)) if site.conds else set()
        lengths, starts = dict(lengths), dict(starts)
        for sym, val in scalars.items():
            if sym in used and sym not in axes:
                axes[sym] = f"scalar {sym.name}"
                lengths[axes[sym]], starts[axes[sym]] = 1, val
    subs = {k: sp.Integer(v) for k, v in env.items() if isinstance(k, sp.Symbol)}
    conds = []
    for c in site.conds:
        c = c.xreplace(subs)
        if c is sp.false:
            return np.zeros(ntiles, dtype=np.int64)
        if c is not sp.true:
            conds.append(c)
    comps, scalar = _components(conds, list(axes))
    total = np.ones(ntiles, dtype=np.int64)
    for c in scalar:
        if not bool(np_eval(c, {})):
            return np.zeros(ntiles, dtype=np.int64)
    for vs, cs in comps:
        if not cs:
            for v in vs:
                total = total * lengths[axes[v]]
            continue
        bases = [np.broadcast_to(np.asarray(starts.get(axes[v], 0), dtype=np.int64), (ntiles,)) for v in vs]
        keyarr = np.stack(bases, axis=1) if bases else np.zeros((ntiles, 0), dtype=np.int64)
        uniq, inv = np.unique(keyarr, axis=0, return_inverse=True)
        inv = inv.reshape(-1)
        grids = {}
        nv = len(vs)
        for k, v in enumerate(vs):
            L = lengths[axes[v]]
            shape = [1] * (1 + nv)
            shape[1 + k] = L
            step = strides.get(axes[v], 1)
            grids[v] = uniq[:, k].reshape([len(uniq)] + [1] * nv) + step * np.arange(L).reshape(shape)
        ok = np.ones([len(uniq)] + [lengths[axes[v]] for v in vs], dtype=bool)
        for c in cs:
            ok = ok & np.broadcast_to(np_eval(c, grids), ok.shape)
        cnt = ok.reshape(len(uniq), -1).sum(axis=1)
        total = total * cnt[inv]
    return total


# ---- tiles of a branch ------------------------------------------------------------------------------------

@dataclass
class BranchTiles:
    """The key-loop iterations of one branch over all row tiles (flat arrays, one entry per iteration)."""
    rows: np.ndarray        # row tile index of the iteration
    starts: np.ndarray      # start_n
    visited: np.ndarray     # bool: the tile body runs (not skipped)
    partial: np.ndarray     # bool: the mask code runs (visited tiles only are meaningful)


@dataclass
class RowTiles:
    """The programs of a schedule along the grid's first axis: row tiles (contiguous rows), or for the residue
    schedule (i = r + s a) tiles of a per residue r. Arrays have one entry per program."""
    count: int
    ilo: np.ndarray          # I_LO, I_HI: the first and last valid row i
    ihi: np.ndarray
    base: np.ndarray         # first lane of the rows (offs_m), in steps of `stride`
    stride: int
    alo: np.ndarray | None = None   # residue schedule: the box of a (a lifted branch's I_LO, I_HI)
    ahi: np.ndarray | None = None
    scalars: dict = field(default_factory=dict)   # symbol -> per-program value (the residue r)
    rows: list = field(default_factory=list)      # [(first program, rows i of its tiles, a of them)] per residue


def row_tiles(sched, env: dict, n: int, bm: int) -> RowTiles:
    """The programs of `sched` (see RowTiles), as the kernel maps program_id(0) to rows."""
    rl = getattr(sched, "lift", None)
    if rl is None:
        lo = np.arange(0, n, bm, dtype=np.int64)
        return RowTiles(len(lo), lo, np.minimum(lo + bm, n) - 1, lo, 1,
                        rows=[(0, np.arange(n, dtype=np.int64), np.arange(n, dtype=np.int64))])
    st = rl.stride
    res, alo, groups = [], [], []
    for r in range(st):
        nrows = (n - 1 - r) // st + 1 if r < n else 0
        a = np.arange(nrows, dtype=np.int64)
        groups.append((len(res), r + st * a, a))
        for a0 in range(0, nrows, bm):
            res.append(r)
            alo.append(a0)
    res, alo = np.array(res, dtype=np.int64), np.array(alo, dtype=np.int64)
    ahi = np.minimum(alo + bm, (n - 1 - res) // st + 1) - 1
    scal = {rl.res: res}
    for b in sched.branches:   # a lifted branch's key residue rho = (r + c) mod s, named in the kernel
        lift = getattr(b, "lift", None)
        if lift is not None and lift.base != rl.res and getattr(lift, "base_value", None) is not None:
            scal[lift.base] = np.broadcast_to(np_eval(lift.base_value, {**env, rl.res: res}), res.shape)
    return RowTiles(len(res), res + st * alo, res + st * ahi, res + st * alo, st, alo, ahi, scal, groups)


def branch_tiles(b, env: dict, n: int, m: int, bm: int, bn: int) -> BranchTiles:
    """Iterations of branch b's key loop in every row tile: the ONF formulas evaluated like the kernel does."""
    R = -(-n // bm)
    r = np.arange(R, dtype=np.int64)
    return key_iterations(b, env, r * bm, np.minimum(r * bm + bm, n) - 1, m, bn)


def key_iterations(b, env: dict, ilo, ihi, m, bn: int) -> BranchTiles:
    """Iterations of branch b's key loop for programs with row boxes [ilo, ihi] (arrays) and key extents m (an
    int or an array: a lifted branch's keys depend on the residue); env may hold per-program arrays."""
    R = len(ilo)
    m = np.broadcast_to(np.asarray(m, dtype=np.int64), (R,))
    if b.skip is sp.true:
        z = np.zeros(0, dtype=np.int64)
        return BranchTiles(z, z, z.astype(bool), z.astype(bool))
    r = np.arange(R, dtype=np.int64)
    e = {**env, iv.I_LO: ilo, iv.I_HI: ihi}
    lo = np.zeros(R, dtype=np.int64) if b.key_lo is None else \
        np.broadcast_to(np.maximum(0, np_eval(b.key_lo, e)), (R,)).astype(np.int64)
    lo = (lo // bn) * bn
    hi = m - 1 if b.key_hi is None else \
        np.broadcast_to(np.minimum(m - 1, np_eval(b.key_hi, e)), (R,)).astype(np.int64)
    cnt = np.maximum(0, -(-(hi + 1 - lo) // bn))
    rows = np.repeat(r, cnt)
    first = np.cumsum(cnt) - cnt
    starts = lo[rows] + (np.arange(len(rows)) - first[rows]) * bn
    te = {**{k: (v[rows] if isinstance(v, np.ndarray) and v.shape == (R,) else v) for k, v in env.items()},
          iv.I_LO: ilo[rows], iv.I_HI: ihi[rows], iv.J_LO: starts, iv.J_HI: np.minimum(starts + bn, m[rows]) - 1}
    skip = np.zeros(len(rows), dtype=bool) if b.skip is sp.false else \
        np.broadcast_to(np_eval(b.skip, te), (len(rows),)).astype(bool)
    if b.full is sp.false:
        partial = np.ones(len(rows), dtype=bool)
    else:
        partial = np.logical_or(np.logical_not(np_eval(b.full, te)), starts + bn > m[rows])
        partial = np.broadcast_to(partial, (len(rows),)).astype(bool)
    return BranchTiles(rows, starts, ~skip, partial)


@dataclass
class HopIters:
    """The hop-loop iterations of one branch (codegen/hops.py) over all row tiles, one entry per iteration."""
    rows: np.ndarray        # row tile index
    hops: np.ndarray        # the hop t


def hop_iterations(b, env: dict, n: int, bm: int) -> HopIters:
    """range(t_lo, t_hi + 1) of every row tile: the ONF's hop bounds evaluated like the kernel does."""
    r = np.arange(-(-n // bm), dtype=np.int64)
    return hop_iters(b, env, r * bm, np.minimum(r * bm + bm, n) - 1)


def hop_iters(b, env: dict, ilo, ihi) -> HopIters:
    """The hop loop's iterations for programs with row boxes [ilo, ihi] (env may hold per-program arrays)."""
    R = len(ilo)
    r = np.arange(R, dtype=np.int64)
    e = {**env, iv.I_LO: ilo, iv.I_HI: ihi}
    lo = np.broadcast_to(np_eval(b.hop.t_lo, e), (R,)).astype(np.int64)
    hi = np.broadcast_to(np_eval(b.hop.t_hi, e), (R,)).astype(np.int64)
    cnt = np.maximum(0, hi - lo + 1)
    rows = np.repeat(r, cnt)
    first = np.cumsum(cnt) - cnt
    return HopIters(rows, lo[rows] + np.arange(len(rows)) - first[rows])


# ---- the mask predicate on index grids (tiles_needed) ------------------------------------------------------

_UNKNOWN = object()


def _mask3(e, env):
    """Three-valued evaluation of a DNF mask on index grids: ('b', possible, certain) for booleans, ('v', x) for
    values, ('u',) for data-dependent values (a Read: the cost model has no data)."""
    if isinstance(e, D.Const):
        if isinstance(e.value, bool):
            return ("b", e.value, e.value)
        return ("v", e.value)
    if isinstance(e, D.Index):
        return ("v", np_eval(e.expr, env))
    if isinstance(e, D.Read):
        return ("u",) if e.dtype != ir.BOOL else ("b", True, False)
    if isinstance(e, D.Op):
        args = [_mask3(a, env) for a in e.args]
        fn = e.fn
        if fn in ("and", "or", "not"):
            bs = [a if a[0] == "b" else ("b", True, False) for a in args]
            if fn == "not":
                return ("b", np.logical_not(bs[0][2]), np.logical_not(bs[0][1]))
            f = np.logical_and if fn == "and" else np.logical_or
            return ("b", f(bs[0][1], bs[1][1]), f(bs[0][2], bs[1][2]))
        if any(a[0] == "u" for a in args):
            return ("b", True, False) if e.dtype == ir.BOOL else ("u",)
        vals = [a[1] for a in args]
        ops = {"lt": np.less, "le": np.less_equal, "gt": np.greater, "ge": np.greater_equal, "eq": np.equal,
               "ne": np.not_equal, "add": np.add, "sub": np.subtract, "mul": np.multiply,
               "floordiv": np.floor_divide, "mod": np.mod, "min": np.minimum, "max": np.maximum}
        if fn in ops:
            out = ops[fn](*vals)
        elif fn == "neg":
            out = np.negative(vals[0])
        elif fn == "abs":
            out = np.abs(vals[0])
        elif fn == "where":
            out = np.where(vals[0], vals[1], vals[2])
        else:
            return ("b", True, False) if e.dtype == ir.BOOL else ("u",)
        return ("b", out, out) if e.dtype == ir.BOOL else ("v", out)
    return ("u",)


def tiles_needed(b, row_var, env: dict, n: int, m: int, bm: int, bn: int) -> int:
    """(query tile, key tile) pairs containing an (i, j) whose mask may hold: the mask evaluated on the index grid
    of every tile (data-dependent atoms count as possibly true)."""
    R, T = -(-n // bm), -(-m // bn)
    if R == 0 or T == 0:
        return 0
    if b.mask is None:
        return R * T
    j = np.arange(m, dtype=np.int64)
    pad = T * bn - m
    total = 0
    chunk = max(1, (1 << 22) // max(1, bm * m))
    for r0 in range(0, R, chunk):
        r1 = min(R, r0 + chunk)
        i = np.arange(r0 * bm, min(n, r1 * bm), dtype=np.int64)
        res = _mask3(b.mask, {**env, row_var: i[:, None], b.var: j[None, :]})
        poss = np.broadcast_to(res[1] if res[0] == "b" else True, (len(i), m))
        if pad:
            poss = np.concatenate([poss, np.zeros((len(i), pad), dtype=bool)], axis=1)
        rowpad = (r1 - r0) * bm - len(i)
        if rowpad:
            poss = np.concatenate([poss, np.zeros((rowpad, T * bn), dtype=bool)], axis=0)
        total += int(poss.reshape(r1 - r0, bm, T, bn).any(axis=(1, 3)).sum())
    return total


def hops_needed(b, row_var, env: dict, n: int, m: int, bm: int) -> int:
    """(query tile, hop) pairs holding an (i, j) whose mask may hold, j = key(i, t): the mask evaluated on the
    index grid and each admissible pair mapped to its hop t = (key(i, 0) - j) / stride (independent of the hop
    bounds the kernel loops over)."""
    R = -(-n // bm)
    if R == 0 or m == 0:
        return 0
    h = b.hop
    j = np.arange(m, dtype=np.int64)
    total = 0
    group = max(1, (1 << 22) // max(1, bm * m))
    for r0 in range(0, R, group):
        r1 = min(R, r0 + group)
        i = np.arange(r0 * bm, min(n, r1 * bm), dtype=np.int64)
        env_ij = {**env, row_var: i[:, None], b.var: j[None, :]}
        res = _mask3(b.mask, env_ij)
        poss = np.broadcast_to(res[1] if res[0] == "b" else True, (len(i), m))
        key0 = np.broadcast_to(np_eval(h.key.xreplace({h.var: 0}), {**env, row_var: i[:, None]}), (len(i), 1))
        ii, jj = np.nonzero(poss)
        if len(ii):
            pairs = np.stack([i[ii] // bm, (key0[ii, 0] - jj) // h.stride], axis=1)
            total += len(np.unique(pairs, axis=0))
    return total


def residue_needed(b, sched, env: dict, rt: RowTiles, bm: int, bn: int, hop: bool) -> int:
    """tiles_needed of a branch of the residue schedule: (program, key tile or hop) pairs holding a pair whose
    mask may hold, over the rows i = r + s a of each residue's tiles; a lifted branch on its (a, b) grid."""
    rl, i = sched.lift, sched.row[0]
    found = [np.zeros((0, 2), dtype=np.int64)]
    for first, ivals, avals in rt.rows:
        if len(ivals) == 0:
            continue
        e = {**env, rl.res: int(ivals[0] - rl.stride * avals[0])}
        ncols = int(np_eval(b.extent, e))
        cols = np.arange(max(0, ncols), dtype=np.int64)
        step = max(1, (1 << 22) // max(1, len(cols)))
        for q0 in range(0, len(ivals), step):
            iv_, av_ = ivals[q0:q0 + step, None], avals[q0:q0 + step, None]
            grid = {**e, i: iv_, rl.a: av_, b.var: cols[None, :]}
            res = _mask3(b.mask, grid) if b.mask is not None else ("b", True, True)
            poss = np.broadcast_to(res[1] if res[0] == "b" else True, (len(iv_), len(cols)))
            ii, jj = np.nonzero(poss)
            if hop:
                key0 = np.broadcast_to(np_eval(b.hop.key.xreplace({b.hop.var: 0}), grid), (len(iv_), 1))
                bucket = (key0[ii, 0] - cols[jj]) // b.hop.stride
            else:
                bucket = cols[jj] // bn
            found.append(np.stack([first + av_[ii, 0] // bm, bucket], axis=1))
    return len(np.unique(np.concatenate(found), axis=0))


def window_hops_needed(sched, env: dict, n: int, bm: int) -> int:
    """(row tile, hop r) pairs of the window-mixing kernel holding a valid row i for which hop r is admissible:
    its guard g(i, r) may hold (the key row exists) and row i has a slot j whose mask may hold."""
    from . import symbolic as sy

    b = sched.branches[0]
    mx, i = b.mix, sched.row[0]
    W, J = sy.evaluate(mx.extent, env), sy.evaluate(b.extent, env)
    R = -(-n // bm)
    if R == 0 or W <= 0 or J <= 0:
        return 0
    rows = np.arange(n, dtype=np.int64)[:, None]
    row_ok = np.ones(n, dtype=bool)
    if b.mask is not None:
        res = _mask3(b.mask, {**env, i: rows, b.var: np.arange(J, dtype=np.int64)[None, :]})
        row_ok = np.broadcast_to(res[1] if res[0] == "b" else True, (n, J)).any(axis=1)
    need = np.broadcast_to(row_ok[:, None], (n, W))
    if mx.guard is not None:
        res = _mask3(mx.guard, {**env, i: rows, mx.var: np.arange(W, dtype=np.int64)[None, :]})
        need = need & np.broadcast_to(res[1] if res[0] == "b" else True, (n, W))
    need = np.concatenate([need, np.zeros((R * bm - n, W), dtype=bool)], axis=0)
    return int(need.reshape(R, bm, W).any(axis=1).sum())


# ---- numeric prediction -------------------------------------------------------------------------------------

@dataclass
class Counts:
    """Predicted counters of one kernel launch (or a sum of launches)."""
    flops: int = 0
    dot_flops: int = 0
    transcendentals: int = 0
    dram_bytes_loaded: int = 0
    dram_bytes_stored: int = 0
    tiles_visited: int = 0
    tiles_needed: int = 0
    programs: int = 0
    loaded_by_tensor: dict = field(default_factory=dict)
    loop_loaded_by_tensor: dict = field(default_factory=dict)

    @property
    def dram_bytes(self) -> int:
        return self.dram_bytes_loaded + self.dram_bytes_stored

    def add(self, o: Counts):
        for f in ("flops", "dot_flops", "transcendentals", "dram_bytes_loaded", "dram_bytes_stored",
                  "tiles_visited", "tiles_needed", "programs"):
            setattr(self, f, getattr(self, f) + getattr(o, f))
        for d, od in ((self.loaded_by_tensor, o.loaded_by_tensor),
                      (self.loop_loaded_by_tensor, o.loop_loaded_by_tensor)):
            for k, v in od.items():
                d[k] = d.get(k, 0) + v


def constexpr_values(spec, dims: dict, block_m: int, block_n: int) -> dict:
    """BLOCK_M, BLOCK_N, HEAD_DIM* and HEAD_DIM_V as the launcher sets them (padded to powers of two, >= 16)."""
    vals = {BLOCK_M: block_m, BLOCK_N: block_n,
            HEAD_DIM_V: max(16, _next_pow2(sy.evaluate(spec.col_extent, dims)))}
    for name, ext in spec.head_dims:
        vals[csym(name)] = max(16, _next_pow2(sy.evaluate(ext, dims)))
    return vals


def _next_pow2(x: int) -> int:
    return 1 << max(0, int(x) - 1).bit_length()


def _axis_lengths(cvals: dict) -> dict:
    out = {"row": cvals[BLOCK_M], "key": cvals[BLOCK_N], "col": cvals[HEAD_DIM_V], "hop": 1,
           "lifted_row": cvals[BLOCK_M]}
    for k, v in cvals.items():
        if k.name.startswith("HEAD_DIM") and k.name != "HEAD_DIM_V":
            out[k.name] = v
    return out


def predict(program, sched: Schedule, spec, dims: dict, batch: tuple, elem_bytes: dict,
            needed: bool = True) -> Counts:
    """Counters of one output's kernel for concrete dims and the tile config baked into `spec` (the tiled, hops or
    residue schedule: key-tile loops, hop loops, lifted key-tile loops in b-space).

    elem_bytes: tensor name (inputs, the output, 'lse') -> bytes per element as the kernel sees it."""
    led = ledger(program, spec)
    bm, bn = spec.block_m, spec.block_n
    cvals = constexpr_values(spec, dims, bm, bn)
    lengths = _axis_lengths(cvals)
    denv = {d: dims[d.name] for d in program.dims}
    i_var = sched.row[0]
    n = sy.evaluate(sched.row[1], dims)
    e = sy.evaluate(sched.col[1], dims)
    lead = [(v, sy.evaluate(x, dims)) for v, x in sched.lead]
    nb = math.prod(batch)
    out = Counts()
    if n * e * nb * math.prod(x for _, x in lead) == 0:
        return out
    work = {r: tuple(int(sp.sympify(x).xreplace(cvals)) for x in (w.dot, w.other, w.trans))
            for r, w in led.regions.items()}
    # do the leading indices matter anywhere (bounds, skip tests, access masks)?
    leadvars = {v for v, _ in lead}
    formulas = [x for b in sched.branches for x in (b.key_lo, b.key_hi, b.skip, b.full) if x is not None]
    formulas += [x for b in sched.branches if b.hop is not None for x in (b.hop.t_lo, b.hop.t_hi)]
    formulas += [c for s in (*spec.loads, *spec.stores) for c in s.conds]
    per_lead = any(sp.sympify(f).free_symbols & leadvars for f in formulas) or \
        (needed and any(b.mask is not None and D.free_vars(b.mask) & leadvars for b in sched.branches))
    combos = list(itertools.product(*(range(x) for _, x in lead))) if per_lead else [None]
    weight = nb * (1 if per_lead else math.prod(x for _, x in lead))
    residue = getattr(sched, "lift", None) is not None
    for combo in combos:
        env = dict(denv)
        if combo is not None:
            env.update({v: val for (v, _), val in zip(lead, combo)})
        rt = row_tiles(sched, env, n, bm)
        penv = {**env, **rt.scalars}   # per-program values (the residue r)
        R = rt.count
        c = Counts(programs=R)
        hops = {k: hop_iters(b, penv, rt.ilo, rt.ihi) for k, b in enumerate(sched.branches)
                if ("hop", k) in led.regions}
        tiles = {}
        for k, b in enumerate(sched.branches):
            if k in hops:
                continue
            lifted = getattr(b, "lift", None) is not None
            lo, hi = (rt.alo, rt.ahi) if lifted else (rt.ilo, rt.ihi)
            m = np_eval(b.extent, penv) if residue else sy.evaluate(b.extent, dims)
            tiles[k] = key_iterations(b, penv, lo, hi, m, bn)
        mult = {"program": R, "lse": R if "lse" in led.regions else 0}
        for k, t in tiles.items():
            mult[("iter", k)] = len(t.rows)
            mult[("visit", k)] = int(t.visited.sum())
            mult[("partial", k)] = int((t.visited & t.partial).sum())
            c.tiles_visited += mult[("visit", k)]
            if needed:
                b = sched.branches[k]
                c.tiles_needed += residue_needed(b, sched, env, rt, bm, bn, False) if residue else \
                    tiles_needed(b, i_var, env, n, sy.evaluate(b.extent, dims), bm, bn)
        for k, h in hops.items():  # a hop loop: every (row tile, hop) iteration is a visited tile
            mult[("hop", k)] = len(h.rows)
            c.tiles_visited += len(h.rows)
            if needed:
                b = sched.branches[k]
                c.tiles_needed += residue_needed(b, sched, env, rt, bm, bn, True) if residue else \
                    hops_needed(b, i_var, env, n, sy.evaluate(b.extent, dims), bm)
        for region, (dot, other, trans) in work.items():
            k = mult.get(region, 0)
            c.dot_flops += k * dot
            c.flops += k * (dot + other)
            c.transcendentals += k * trans
        for region, w in led.regions.items():
            if region in ("program", "lse"):
                prog = np.arange(R, dtype=np.int64)
                starts = {}
            elif region[0] == "hop":
                h = hops[region[1]]
                prog, starts = h.rows, {"hop": h.hops}
            else:
                t = tiles[region[1]]
                sel = np.ones(len(t.rows), dtype=bool) if region[0] == "iter" else \
                    t.visited if region[0] == "visit" else t.visited & t.partial
                prog, starts = t.rows[sel], {"key": t.starts[sel]}
            starts["row"] = rt.base[prog]
            if rt.alo is not None:
                starts["lifted_row"] = rt.alo[prog]
            scal = {sym: v[prog] for sym, v in rt.scalars.items()}
            for names, sites, loading in ((w.loads, led.loads, True), (w.stores, led.stores, False)):
                for name in names:
                    site = sites[name]
                    lanes = int(site_lanes(site, env, lengths, starts, len(prog), {"row": rt.stride}, scal).sum())
                    nbytes = lanes * elem_bytes[site.tensor]
                    if loading:
                        c.dram_bytes_loaded += nbytes
                        c.loaded_by_tensor[site.tensor] = c.loaded_by_tensor.get(site.tensor, 0) + nbytes
                        if region not in ("program", "lse"):
                            c.loop_loaded_by_tensor[site.tensor] = \
                                c.loop_loaded_by_tensor.get(site.tensor, 0) + nbytes
                    else:
                        c.dram_bytes_stored += nbytes
        for f in ("flops", "dot_flops", "transcendentals", "dram_bytes_loaded", "dram_bytes_stored",
                  "tiles_visited", "tiles_needed", "programs"):
            setattr(c, f, getattr(c, f) * weight)
        c.loaded_by_tensor = {k: v * weight for k, v in c.loaded_by_tensor.items()}
        c.loop_loaded_by_tensor = {k: v * weight for k, v in c.loop_loaded_by_tensor.items()}
        out.add(c)
    return out


def onchip_bytes(sched: Schedule, spec, dims: dict, in_bytes: int, acc_bytes: int, num_stages: int) -> int:
    """Bytes of tiles one program holds (registers + shared memory), an estimate: per branch the query tile
    (BLOCK_M x HEAD_DIM, input dtype), the accumulator (BLOCK_M x HEAD_DIM_V) and m_i, l_i (accumulation dtype),
    the score tile (BLOCK_M x BLOCK_N, accumulation) and P (input dtype); plus num_stages buffers of the key and
    value tiles (BLOCK_N x (HEAD_DIM + HEAD_DIM_V), input dtype) that the software pipeline keeps in shared
    memory."""
    cv = constexpr_values(spec, dims, spec.block_m, spec.block_n)
    bm, bn, hv = cv[BLOCK_M], cv[BLOCK_N], cv[HEAD_DIM_V]
    hds = {name: cv[csym(name)] for name, _ in spec.head_dims}
    total = 0
    kv = 0
    for b in sched.branches:
        hd = 0
        if b.dot is not None:
            hd = max(hds.values()) if hds else 0
        total += bm * hd * in_bytes + bm * hv * acc_bytes + 2 * bm * acc_bytes + bm * bn * (acc_bytes + in_bytes)
        kv = max(kv, bn * (hd + hv) * in_bytes)
    return total + max(1, num_stages) * kv


# ---- the unfused (PyTorch eager) plan ------------------------------------------------------------------------

def _depends_ij(e, i, j) -> bool:
    if any(isinstance(x, DotTile) for x in D.nodes(e)):
        return True
    fv = D.free_vars(e)
    return i in fv and j in fv


@dataclass
class Eager:
    """The unfused plan (sympy, in the dims): ops as (description, bytes read, bytes written, matmul FLOPs,
    other FLOPs, transcendentals), and the totals."""
    ops: list

    @property
    def dram_bytes(self) -> sp.Expr:
        return sp.expand(sum((o[1] + o[2] for o in self.ops), sp.Integer(0)))

    @property
    def intermediate_bytes(self) -> sp.Expr:
        return sp.expand(sum((o[2] for o in self.ops if o[6]), sp.Integer(0)))

    @property
    def flops(self) -> sp.Expr:
        return sp.expand(sum((o[3] + o[4] for o in self.ops), sp.Integer(0)))


def eager_plan(sched: Schedule, elt: int, batch: int = 1) -> Eager:
    """The plan PyTorch eager runs for one output, op by op, every intermediate materialised in global memory:

    per branch (softmax(S) @ V or normalize(A) @ V over keys j):
      phi(Q), phi(K)       if a dot factor is computed (elu(Q) + 1 ...): read the input, write the factor
      S = A @ B^T          read A [n, d], B [m, d]; write S [n, m]                      2 n m d FLOPs
      score ops            one kernel per elementwise op on an [n, m] array (scale, bias, tanh ...): read its
                           [n, m] operands, write [n, m]; index grids (j - i) and gathers (bias[i - j]) that
                           depend on both i and j are materialised first
      mask                 the boolean mask [n, m] (1 byte per element) is materialised, then masked_fill: read S
                           and the mask, write S_masked
      softmax              read S_masked, write P [n, m]                                 4 n m FLOPs + n m exp
      (normalize)          z = A.sum(-1): read A, write z [n]
      O_k = P @ V          read P and V [m, e]; write O_k [n, e]                         2 n m e FLOPs
      (normalize)          O_k / z: read O_k and z, write O_k
    epilogue               when the output is more than one branch's value: read every O_k, write O [n, e]
    A window-mixing branch (Blurry Window Attention: slots j < J mixing W hops r) materialises, before S, the
    unfolded windows K_u [n, W, d], V_u [n, W, e] and the mixed Khat = w @ K_u [n, J, d], Vhat [n, J, e]
    (2 n J W d and 2 n J W e FLOPs); S = einsum(Q, Khat) reads Khat and O = P @ Vhat reads Vhat.
    Intermediates are every array written except the output O. All sizes times batch x leading extents."""
    i, n = sched.row
    c, e = sched.col
    lead = sy.product([x for _, x in sched.lead]) * batch
    E = sp.Integer(elt)
    ops: list = []
    final_is_branch = sched.epilogue == BranchValue(0) and len(sched.branches) == 1

    def op(what, read, write, dot=0, other=0, trans=0, inter=True):
        ops.append((what, sp.sympify(read) * lead, sp.sympify(write) * lead, sp.sympify(dot) * lead,
                    sp.sympify(other) * lead, sp.sympify(trans) * lead, inter))

    for k, b in enumerate(sched.branches):
        j, m = b.var, b.extent
        nm = n * m
        tag = f"branch {k}: " if len(sched.branches) > 1 else ""
        mx = b.mix
        if mx is not None:
            W, dk = mx.extent, mx.kext
            for what, width in (("K", dk), ("V", e)):
                op(f"{tag}unfold {what} into [n, W] windows", n * width * E, n * W * width * E)
                op(f"{tag}{what}hat = w @ {what}_u", (n * W * width + m * W) * E, nm * width * E,
                   dot=2 * nm * W * width)
            op(f"{tag}S = einsum(Q, Khat)", (n * dk + nm * dk) * E, nm * E, dot=2 * nm * dk)
        elif b.dot is not None:
            dk = b.dot.extent
            for fac, rows in ((b.dot.a, n), (b.dot.b, m)):
                if not isinstance(fac, D.Read):
                    nops = sum(1 for x in D.nodes(fac) if isinstance(x, D.Op))
                    op(f"{tag}factor {D.show(fac)[:40]}", rows * dk * E, rows * dk * E, other=rows * dk * nops)
            op(f"{tag}S = A @ B^T", (n + m) * dk * E, nm * E, dot=2 * nm * dk)
        for x in _postorder(b.score):
            if isinstance(x, D.Op) and _depends_ij(x, i, j):
                operands = sum(1 for a in x.args if _depends_ij(a, i, j))
                tr = nm if x.fn in ("exp", "log", "sqrt", "rsqrt", "tanh", "sigmoid", "sin", "cos", "elu") else 0
                op(f"{tag}{x.fn} on [n, m]", operands * nm * E, nm * E, other=0 if tr else nm, trans=tr)
            elif isinstance(x, (D.Read, D.Index)) and _depends_ij(x, i, j):
                op(f"{tag}materialise {D.show(x)[:30]}", nm * E if isinstance(x, D.Read) else 0, nm * E)
        if b.mask is not None:
            op(f"{tag}mask [n, m] (bool)", 0, nm)
            op(f"{tag}masked_fill", nm * E + nm, nm * E)
        if b.kind == "softmax":
            op(f"{tag}P = softmax(S)", nm * E, nm * E, other=4 * nm, trans=nm)
        else:
            op(f"{tag}z = A.sum(-1)", nm * E, n * E, other=nm)
        last = final_is_branch and b.kind == "softmax"
        values = nm * e if mx is not None else m * e     # Vhat [n, J, e] for a window-mixing branch
        op(f"{tag}O = P @ V", (nm + values) * E, n * e * E, dot=2 * nm * e, inter=not last)
        if b.kind != "softmax":
            op(f"{tag}O / z", (n * e + n) * E, n * e * E, other=n * e, inter=not final_is_branch)
    if not final_is_branch:
        nops = sum(1 for x in D.nodes(sched.epilogue) if isinstance(x, D.Op))
        op("epilogue", len(sched.branches) * n * e * E, n * e * E, other=n * e * nops, inter=False)
    return Eager(ops)


def roofline(dot_flops, other_flops, trans, hbm_bytes, device, dtype: str, launches: int = 1):
    """(seconds, bound, parts): max(compute, memory, transcendental) + launch overhead on a device.

    compute = tl.dot FLOPs at the dtype's matrix peak + other FLOPs at the vector peak (float32 accumulation,
    float64 for float64 kernels); memory = HBM bytes at the HBM bandwidth; transcendental = evaluations at the
    MUFU rate (software sequences for float64)."""
    parts = {"compute": dot_flops / device.matmul_rate(dtype) + other_flops / device.vector_rate(dtype),
             "memory": hbm_bytes / device.hbm_bytes_per_s,
             "transcendental": trans / device.transcendental_rate(dtype)}
    if any(isinstance(v, sp.Basic) and v.free_symbols for v in parts.values()):
        return sp.Max(*parts.values()) + launches * device.launch_s, "symbolic", parts
    bound = max(parts, key=lambda k: float(parts[k]))
    return float(parts[bound]) + launches * device.launch_s, bound, parts


def _postorder(e):
    for k in D.children(e):
        yield from _postorder(k)
    yield e
