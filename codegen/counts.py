"""The counters of an emitted kernel (FLOPs, transcendentals, DRAM bytes, tiles), predicted without running it.

Three ingredients, none of which executes the kernel:
1. The ONF schedule (moa/tiles.py): loop bounds (key_lo, key_hi), the tile-skip and mask-free formulas of every
   branch, evaluated on the tile corners (I_LO, I_HI, J_LO, J_HI) of every (query tile, key tile) pair exactly
   as the kernel evaluates them, which gives the iterations, the visited tiles and the partial (masked) tiles.
2. The ledger of the emitted kernel (codegen/ledger.py): the generated source walked once, abstractly (shapes in
   the constexpr symbols BLOCK_M, BLOCK_N, HEAD_DIM*, HEAD_DIM_V; no values), giving per region the work of one
   execution: tl.dot FLOPs (2*M*N*K), other floating-point operations (one per element, reductions n_in - n_out)
   and transcendentals. Regions: "program" (once per program), ("iter", k) (each iteration of branch k's key
   loop), ("visit", k) (each visited tile), ("partial", k) (each visited tile whose mask code runs), "lse".
   The counting conventions are those of the instrumented interpreter (moa.runtime.measure).
3. The access sites the emitter recorded for every tl.load / tl.store (codegen.exprs.AccessSite): the index
   expressions and the mask as sympy relations. The lanes an access touches in one tile are counted over the
   tile's index box (padding lanes included, masked lanes excluded), per axis when the mask separates.

Totals = sum over regions of (executions of the region) x (work of one execution); bytes = sum over access sites of
lanes x element size. `predict` gives numbers for concrete dims and a tile config; codegen/counts_symbolic.py gives
the same totals as sympy formulas (Sum over row tiles r and key tiles t where masks make the count data-shaped).

The schedules of the tiled kernel: a branch of kind HOPS runs a hop loop, region ("hop", k), whose iterations are
range(t_lo, t_hi + 1) of the ONF's Hop evaluated on each row tile (each iteration counts as a visited tile); the
residue schedule's programs are (residue r, tile of a) pairs with rows r + s a (`row_tiles`: strided row lanes),
and its lifted branches loop over key tiles in b-space with the box over a. The window-mixing kernel and the
chunked linear form are counted by codegen/launches.py with the same ledger and lane counting.
"""
from __future__ import annotations

import itertools
import math
from collections import defaultdict
from dataclasses import dataclass

import numpy as np
import sympy as sp

from moa import dnf as D
from moa import symbolic as sy
from moa.cost import Counts
from moa.exprfold import np_eval
from moa.onf import Schedule, scans_keys, uses_summaries
from moa.tiles import (DATA, RowTiles, hop_iters, hops_needed, key_iterations, residue_needed, row_tiles,
                       summary_env, tiles_needed)

from .constexprs import BLOCK_M, BLOCK_N, HEAD_DIM_V, csym
from .data_tiles import SCAN
from .ledger import ledger


# ---- lanes of an access site over a tile ------------------------------------------------------------------

def components(conds, boxvars):
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
    comps, scalar = components(conds, list(axes))
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


def constexpr_values(spec, dims: dict, block_m: int, block_n: int) -> dict:
    """BLOCK_M, BLOCK_N, HEAD_DIM* and HEAD_DIM_V as the launcher sets them (padded to powers of two, >= 16)."""
    vals = {BLOCK_M: block_m, BLOCK_N: block_n,
            HEAD_DIM_V: sy.tile_width(sy.evaluate(spec.col_extent, dims))}
    for name, ext in spec.head_dims:
        vals[csym(name)] = sy.tile_width(sy.evaluate(ext, dims))
    return vals


def _axis_lengths(cvals: dict) -> dict:
    out = {"row": cvals[BLOCK_M], "key": cvals[BLOCK_N], "col": cvals[HEAD_DIM_V], "hop": 1,
           "lifted_row": cvals[BLOCK_M], "scan": SCAN}
    for k, v in cvals.items():
        if k.name.startswith("HEAD_DIM") and k.name != "HEAD_DIM_V":
            out[k.name] = v
    return out


def predict(program, sched: Schedule, spec, dims: dict, batch: tuple, elem_bytes: dict,
            needed: bool = True, data: dict | None = None) -> Counts:
    """Counters of one output's kernel for concrete dims and the tile config baked into `spec` (the tiled, hops or
    residue schedule: key-tile loops, hop loops, lifted key-tile loops in b-space).

    elem_bytes: tensor name (inputs, the output, 'lse') -> bytes per element as the kernel sees it.
    data: input name -> array (batch axes first, as the call's tensors) of the integer and boolean inputs, or None.
    With data, the tiles a mask over them skips (per-tile summaries, moa/intervals.py) are counted per batch entry
    as the kernel skips them, and tiles_needed evaluates the mask on the data; without, a data-dependent test
    skips nothing (the summaries say nothing) and every data-dependent atom may hold."""
    led = ledger(program, spec)
    cvals = constexpr_values(spec, dims, spec.block_m, spec.block_n)
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
    by_data = data is not None and (any(uses_summaries(sched, b) for b in sched.branches) or
                                    (needed and any(b.mask is not None for b in sched.branches)))
    per_lead = by_data or any(sp.sympify(f).free_symbols & leadvars for f in formulas) or \
        (needed and any(b.mask is not None and D.free_vars(b.mask) & leadvars for b in sched.branches))
    combos = list(itertools.product(*(range(x) for _, x in lead))) if per_lead else [None]
    entries = list(itertools.product(*(range(x) for x in batch))) if by_data else [None]
    weight = (1 if by_data else nb) * (1 if per_lead else math.prod(x for _, x in lead))
    for entry, combo in itertools.product(entries, combos):
        env = {d: dims[d.name] for d in program.dims}
        if combo is not None:
            env.update({v: val for (v, _), val in zip(lead, combo)})
        if entry is not None:
            env[DATA] = _entry(data, entry, len(batch))
        it = _iterations(sched, led, env, dims, spec.block_m, spec.block_n, needed)
        c = it.counts
        for region, (dot, other, trans) in work.items():
            k = it.mult.get(region, 0)
            c.dot_flops += k * dot
            c.flops += k * (dot + other)
            c.transcendentals += k * trans
        _count_bytes(c, it, led, env, _axis_lengths(cvals), elem_bytes)
        out.add(c.scaled(weight))
    return out


def _entry(data: dict, entry: tuple, nbatch: int) -> dict:
    """The arrays of one batch entry (an array with no batch axes is shared by every entry)."""
    out = {}
    for name, x in data.items():
        x = np.asarray(x)
        out[name] = x[entry] if x.ndim >= nbatch and nbatch else x
    return out


SPLIT = ("lo", "full", "hi")   # the regions of a split key loop's three loops (codegen/emit.py)


@dataclass
class _Iterations:
    """The iterations of every loop of one kernel instance (one leading-index combination): row tiles, key-tile
    iterations or hops per branch, how often each ledger region executes, and the tiles visited and needed."""
    rt: RowTiles
    tiles: dict          # branch -> BranchTiles
    hops: dict           # branch -> HopIters
    mult: dict           # region -> executions
    counts: Counts


def _iterations(sched, led, env, dims, bm: int, bn: int, needed: bool) -> _Iterations:
    n = sy.evaluate(sched.row[1], dims)
    residue = getattr(sched, "lift", None) is not None
    rt = row_tiles(sched, env, n, bm)
    penv = {**env, **rt.scalars}   # per-program values (the residue r)
    hops = {k: hop_iters(b, penv, rt.ilo, rt.ihi) for k, b in enumerate(sched.branches) if ("hop", k) in led.regions}
    tiles = {}
    for k, b in enumerate(sched.branches):
        if k not in hops:
            lo, hi = (rt.alo, rt.ahi) if getattr(b, "lift", None) is not None else (rt.ilo, rt.ihi)
            m = np_eval(b.extent, penv) if residue else sy.evaluate(b.extent, dims)
            data = uses_summaries(sched, b)   # the kernel tests b's tiles with the data's summaries
            benv = {**penv, **summary_env(b, env, env.get(DATA), n, m, bm, bn)} if data else penv
            tiles[k] = key_iterations(b, benv, lo, hi, m, bn, data, SCAN if scans_keys(sched, b) else 0)
    c = Counts(programs=rt.count)
    mult = {"program": rt.count, "lse": rt.count if "lse" in led.regions else 0}
    for k, t in tiles.items():
        if t.scans is not None:   # the scan that trims a data-tested loop
            mult[("scan", k)] = int(t.scans.sum())
        if t.loop is not None:   # a split key loop: its three loops
            for q, part in enumerate(SPLIT):
                mult[(part, k)] = int((t.loop == q).sum())
        else:
            mult[("iter", k)] = len(t.rows)
            mult[("visit", k)] = int(t.visited.sum())
            mult[("partial", k)] = int((t.visited & t.partial).sum())
        c.tiles_visited += int(t.visited.sum())
        if needed:
            b = sched.branches[k]
            c.tiles_needed += residue_needed(b, sched, env, rt, bm, bn, False) if residue else \
                tiles_needed(b, sched.row[0], env, n, sy.evaluate(b.extent, dims), bm, bn)
    for k, h in hops.items():  # a hop loop: every (row tile, hop) iteration is a visited tile
        mult[("hop", k)] = len(h.rows)
        c.tiles_visited += len(h.rows)
        if needed:
            b = sched.branches[k]
            c.tiles_needed += residue_needed(b, sched, env, rt, bm, bn, True) if residue else \
                hops_needed(b, sched.row[0], env, n, sy.evaluate(b.extent, dims), bm)
    return _Iterations(rt, tiles, hops, mult, c)


def _count_bytes(c: Counts, it: _Iterations, led, env, lengths, elem_bytes) -> None:
    """DRAM bytes of every load and store site, over the executions of its region (lanes of each tile)."""
    rt = it.rt
    for region, w in led.regions.items():
        if region in ("program", "lse"):
            prog, starts = np.arange(rt.count, dtype=np.int64), {}
        elif region[0] == "hop":
            h = it.hops[region[1]]
            prog, starts = h.rows, {"hop": h.hops}
        elif region[0] == "scan":
            scans = it.tiles[region[1]].scans
            prog, starts = np.repeat(np.arange(len(scans), dtype=np.int64), scans), {}
        else:
            t = it.tiles[region[1]]
            if region[0] in SPLIT:
                sel = t.loop == SPLIT.index(region[0])
            else:
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
                if not loading:
                    c.dram_bytes_stored += nbytes
                    continue
                c.dram_bytes_loaded += nbytes
                c.loaded_by_tensor[site.tensor] = c.loaded_by_tensor.get(site.tensor, 0) + nbytes
                if region not in ("program", "lse"):
                    c.loop_loaded_by_tensor[site.tensor] = c.loop_loaded_by_tensor.get(site.tensor, 0) + nbytes
                if region[0] == "hop":
                    c.hop_loaded_by_tensor[site.tensor] = c.hop_loaded_by_tensor.get(site.tensor, 0) + nbytes


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
