"""Which (query tile, key tile) pairs and hops a schedule visits: the ONF's loop bounds and tile-skip / mask-free
formulas evaluated on the tile corners (I_LO, I_HI, J_LO, J_HI) of every pair, exactly as a kernel of that schedule
evaluates them; and, independently, which pairs hold an admissible (i, j) at all (the mask on the index grid). The
target-independent half of the cost model: codegen/counts.py multiplies these by the work of the emitted code."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import sympy as sp

from . import dnf as D
from . import intervals as iv
from . import ir
from . import symbolic as sy
from .exprfold import np_eval


@dataclass
class BranchTiles:
    """The key-loop iterations of one branch over all row tiles (flat arrays, one entry per iteration)."""
    rows: np.ndarray        # row tile index of the iteration
    starts: np.ndarray      # start_n
    visited: np.ndarray     # bool: the tile body runs (not skipped)
    partial: np.ndarray     # bool: the mask code runs (visited tiles only are meaningful)
    loop: np.ndarray | None = None   # a split key loop (Branch.split): 0 boundary tiles before, 1 full, 2 after
    scans: np.ndarray | None = None  # per row tile: steps of the scan that trims a data-tested loop


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
    for r in range(min(st, n)):   # residues r >= n hold no row (a stride may be 2^30)
        nrows = (n - 1 - r) // st + 1
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


@dataclass(frozen=True)
class KeyTable:
    """A per-key-tile value in an env (a key summary of the data): the key loop reads entry start_n // BLOCK_N."""
    values: np.ndarray


@dataclass(frozen=True)
class PairTable:
    """A per-(row tile, key tile) value in an env (a pair summary): program r's key loop reads [r, start_n //
    BLOCK_N]."""
    values: np.ndarray


def _tile_reduce(x: np.ndarray, block: int, axis: int) -> tuple:
    """(min, max) of x over tiles of `block` along `axis` (the last tile padded with values that never win)."""
    x = np.moveaxis(x, axis, -1)
    tiles = -(-x.shape[-1] // block)
    pad = [(0, 0)] * (x.ndim - 1) + [(0, tiles * block - x.shape[-1])]
    info = np.iinfo(np.int64)
    lo = np.pad(x, pad, constant_values=info.max).reshape(*x.shape[:-1], tiles, block).min(-1)
    hi = np.pad(x, pad, constant_values=info.min).reshape(*x.shape[:-1], tiles, block).max(-1)
    return np.moveaxis(lo, -1, axis), np.moveaxis(hi, -1, axis)


def pair_summary(table: np.ndarray, rows_at: np.ndarray, keys_at: np.ndarray, bm: int, bn: int) -> tuple:
    """(min, max) of table[rows_at[i], keys_at[j]] over every (row tile of bm rows, key tile of bn keys): two
    [row tiles, key tiles] arrays, from table's rows gathered and reduced per row tile, then its columns."""
    lo, hi = _tile_reduce(table[rows_at], bm, 0)
    return _tile_reduce(lo[:, keys_at], bn, 1)[0], _tile_reduce(hi[:, keys_at], bn, 1)[1]


def along(ix, env: dict, extent: int, size: int | None = None) -> np.ndarray:
    """The values of an index expression in one variable (a pair summary's row or key function, a gathered row or
    key read's) at that variable = 0 .. extent - 1; with `size`, clipped to 0 .. size - 1 (a where-guarded read
    may index past its input where its guard is false: a clipped value only widens a tile's (min, max))."""
    ix = sp.sympify(ix)
    (v,) = sy.variables(ix)   # the dims' values are in env
    out = np.broadcast_to(np_eval(ix, {**env, v: np.arange(extent, dtype=np.int64)}), (extent,)).astype(np.int64)
    return out if size is None else np.clip(out, 0, max(size - 1, 0))


def summary_env(b, env: dict, data: dict | None, n: int, m: int, bm: int, bn: int) -> dict:
    """The values of branch b's summary symbols: per row tile (arrays over the row tiles) and per key tile
    (KeyTable), from `data` (input name -> array without batch axes), at the leading indices in env; without data,
    the summaries that say nothing (data_summaries.UNKNOWN)."""
    out = {}
    for sm in b.summaries:
        if data is None or sm.read.name not in data:
            out.update({k: float(v) for k, v in sm.unknown.items()})   # -inf, inf: no test decides
            continue
        x = np.asarray(data[sm.read.name])
        ix = tuple(slice(None) if k in (sm.pos, sm.kpos) else int(np_eval(sp.sympify(e), env))
                   for k, e in enumerate(sm.read.index))
        line = x[ix].astype(np.int64) if sm.read.dtype != ir.BOOL else (x[ix] != 0).astype(np.int64)   # flags: 0 / 1
        if sm.axis == "program":   # one value per program: its own min and max
            out.update({sm.lo: int(line), sm.hi: int(line)})
            continue
        if sm.axis == "pair":   # the table's (row position, key position) plane, at the rows' and keys' indices
            plane = line if sm.pos < sm.kpos else line.T
            lo, hi = pair_summary(plane, along(sm.read.index[sm.pos], env, n, plane.shape[0]),
                                  along(sm.read.index[sm.kpos], env, m, plane.shape[1]), bm, bn)
            out.update({sm.lo: PairTable(lo), sm.hi: PairTable(hi)})
            continue
        if sm.gathered:   # read at a function of the row (key): at every row (key), clipped as the pre-pass does
            line = line[along(sm.read.index[sm.pos], env, n if sm.axis == "row" else m, len(line))]
        lo, hi = _tile_reduce(line, bm if sm.axis == "row" else bn, 0)   # as runtime/summaries.py: the whole input
        if sm.axis == "row":
            out.update({sm.lo: lo, sm.hi: hi})
        else:
            out.update({sm.lo: KeyTable(lo), sm.hi: KeyTable(hi)})
    return out


def branch_tiles(b, env: dict, n: int, m: int, bm: int, bn: int) -> BranchTiles:
    """Iterations of branch b's key loop in every row tile: the ONF formulas evaluated like the kernel does."""
    R = -(-n // bm)
    r = np.arange(R, dtype=np.int64)
    return key_iterations(b, env, r * bm, np.minimum(r * bm + bm, n) - 1, m, bn)


def key_iterations(b, env: dict, ilo, ihi, m, bn: int, data: bool = False, scan: int = 0) -> BranchTiles:
    """Iterations of branch b's key loop for programs with row boxes [ilo, ihi] (arrays) and key extents m (an
    int or an array: a lifted branch's keys depend on the residue); env may hold per-program arrays. data: the
    kernel tests the tiles with the data's summaries (their values in env: summary_env). scan: the kernel scans
    `scan` key tiles per step with the skip test and runs the kept tiles only (onf.scans_keys)."""
    R = len(ilo)
    m = np.broadcast_to(np.asarray(m, dtype=np.int64), (R,))
    skip_f, full_f = b.tile_tests(data)
    tables = {k: v.values for k, v in env.items() if isinstance(v, KeyTable)}
    pairs = {k: v.values for k, v in env.items() if isinstance(v, PairTable)}
    env = {k: v for k, v in env.items() if not isinstance(v, (KeyTable, PairTable))}
    if skip_f is sp.true:
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

    def tests(rows, starts):
        te = {**{k: (v[rows] if isinstance(v, np.ndarray) and v.shape == (R,) else v) for k, v in env.items()},
              iv.I_LO: ilo[rows], iv.I_HI: ihi[rows], iv.J_LO: starts,
              iv.J_HI: np.minimum(starts + bn, m[rows]) - 1, **{k: v[starts // bn] for k, v in tables.items()},
              **{k: v[rows, starts // bn] for k, v in pairs.items()}}
        skip = np.zeros(len(rows), dtype=bool) if skip_f is sp.false else \
            np.broadcast_to(np_eval(skip_f, te), (len(rows),)).astype(bool)
        return te, skip

    te, skip = tests(rows, starts)
    if not scan and iv.skip_implied_by_range(skip_f, b.key_lo, b.key_hi):
        # no skip test in the kernel (codegen/emit.py): every iteration runs its tile. The skip formula can still
        # hold on one: a row tile whose first admissible key lies past the last key (key_lo >= m) starts at the
        # tile holding key_lo rounded down, which ends at m - 1 < key_lo (J_HI clipped to the keys)
        skip = np.zeros(len(rows), dtype=bool)
    scans = None
    if scan:   # the scan's kept tiles run, and only they
        rows, starts, skip = rows[~skip], starts[~skip], skip[~skip]
        te, _ = tests(rows, starts)
        scans = np.maximum(0, -(-(hi // bn - lo // bn + 1) // scan))
    if b.split and not (data and b.summaries):   # three loops: [lo, full_lo) masked, full tiles, [full_hi, hi]
        full_lo, full_hi = split_bounds(b, e, lo, hi, m, bn)
        loop = np.where(starts < full_lo[rows], 0, np.where(starts < full_hi[rows], 1, 2))
        return BranchTiles(rows, starts, ~skip, loop != 1, loop)
    if full_f is sp.false:
        partial = np.ones(len(rows), dtype=bool)
    else:
        partial = np.logical_or(np.logical_not(np_eval(full_f, te)), starts + bn > m[rows])
        partial = np.broadcast_to(partial, (len(rows),)).astype(bool)
    return BranchTiles(rows, starts, ~skip, partial, scans=scans)


def split_bounds(b, env: dict, lo, hi, m, bn: int) -> tuple:
    """(full_lo, full_hi) per program of a split key loop, as the kernel computes them (codegen/emit.py): the
    tile starts in [full_lo, full_hi) are the full tiles of Branch.span that end inside the keys (start + bn <= m),
    aligned to bn and clipped to the loop's range [lo, hi + 1]."""
    R = len(lo)
    e = {**env, iv.TILE_W: bn}
    fl, fu = b.span
    first = lo if fl is None else np.maximum(lo, np.floor_divide(np_eval(fl, e) + bn - 1, bn) * bn)
    full_lo = np.broadcast_to(np.minimum(first, hi + 1), (R,)).astype(np.int64)
    last = m - bn if fu is None else np.minimum(np_eval(fu, e), m - bn)
    full_hi = np.maximum(full_lo, np.minimum(hi + 1, (np.floor_divide(last, bn) + 1) * bn))
    return full_lo, np.broadcast_to(full_hi, (R,)).astype(np.int64)


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


DATA = "__data__"   # env key of the inputs the cost model was given (name -> array without batch axes)


def mask3(e, env):
    """Three-valued evaluation of a DNF mask on index grids: ('b', possible, certain) for booleans, ('v', x) for
    values, ('u',) for data-dependent values (a Read of an input the cost model was not given: env[DATA])."""
    if isinstance(e, D.Const):
        if isinstance(e.value, bool):
            return ("b", e.value, e.value)
        return ("v", e.value)
    if isinstance(e, D.Index):
        return ("v", np_eval(e.expr, env))
    if isinstance(e, D.Read):
        data = env.get(DATA, {})
        if e.name in data and e.dtype != ir.FLOAT:   # the cost model was given this input
            arr = np.asarray(data[e.name])
            at = [np.asarray(np_eval(sp.sympify(ix), env), dtype=np.int64) for ix in e.index]
            if any(x == 0 for x in arr.shape[:len(at)]):
                return ("u",) if e.dtype != ir.BOOL else ("b", True, False)
            # a point outside the input is one a where(...) guard never takes (the call refuses unguarded ones):
            # read in range there, and a flag read there says nothing
            out = np.zeros((), dtype=bool)
            for k, x in enumerate(at):
                out = out | (x < 0) | (x >= arr.shape[k])
            v = arr[tuple(np.clip(x, 0, arr.shape[k] - 1) for k, x in enumerate(at))]
            if e.dtype == ir.BOOL:
                v = v.astype(bool)
                return "b", v | out, v & ~out
            return "v", v.astype(np.int64)   # in 64 bits, as the reference and the kernel's mask compute
        return ("u",) if e.dtype != ir.BOOL else ("b", True, False)
    if isinstance(e, D.Op):
        args = [mask3(a, env) for a in e.args]
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
        res = mask3(b.mask, {**env, row_var: i[:, None], b.var: j[None, :]})
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
        res = mask3(b.mask, env_ij)
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
        if b.lift is not None and b.lift.base != rl.res:   # rho = (r + c) mod s, a scalar of the residue
            e[b.lift.base] = int(np_eval(b.lift.base_value, e))
        ncols = int(np_eval(b.extent, e))
        cols = np.arange(max(0, ncols), dtype=np.int64)
        step = max(1, (1 << 22) // max(1, len(cols)))
        for q0 in range(0, len(ivals), step):
            iv_, av_ = ivals[q0:q0 + step, None], avals[q0:q0 + step, None]
            grid = {**e, i: iv_, rl.a: av_, b.var: cols[None, :]}
            res = mask3(b.mask, grid) if b.mask is not None else ("b", True, True)
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
    b = sched.branches[0]
    mx, i = b.mix, sched.row[0]
    W, J = sy.evaluate(mx.extent, env), sy.evaluate(b.extent, env)
    R = -(-n // bm)
    if R == 0 or W <= 0 or J <= 0:
        return 0
    rows = np.arange(n, dtype=np.int64)[:, None]
    row_ok = np.ones(n, dtype=bool)
    if b.mask is not None:
        res = mask3(b.mask, {**env, i: rows, b.var: np.arange(J, dtype=np.int64)[None, :]})
        row_ok = np.broadcast_to(res[1] if res[0] == "b" else True, (n, J)).any(axis=1)
    need = np.broadcast_to(row_ok[:, None], (n, W))
    if mx.guard is not None:
        res = mask3(mx.guard, {**env, i: rows, mx.var: np.arange(W, dtype=np.int64)[None, :]})
        need = need & np.broadcast_to(res[1] if res[0] == "b" else True, (n, W))
    need = np.concatenate([need, np.zeros((R * bm - n, W), dtype=bool)], axis=0)
    return int(need.reshape(R, bm, W).any(axis=1).sum())
