"""Data-derived block sparsity in the tiled kernel: per-tile (min, max) summaries of the integer and boolean inputs a
mask reads (their kernel arguments, computed by the launcher's pre-pass, runtime/summaries.py), and the key loop of
a branch tested with them: a scan over SCAN key tiles at a time, then the kept tiles only (moa/intervals.py and
moa/data_summaries.py derive the skip and full tests from the mask's algebra)."""
from __future__ import annotations

from dataclasses import dataclass

import sympy as sp

from moa import intervals as iv
from moa import ir
from moa.onf import uses_summaries

from .exprs import AccessSite
from .monoid import Monoid
from .scope import Scope

SCAN = 64   # key tiles per step of the scan that trims a data-tested key loop (the pre-pass pads by as many)
SCAN_T = sp.Symbol("scan_t", integer=True)   # a lane of the scan (an access site's axis, for the cost model)
TILE_FULL = sp.Symbol("tile_full", integer=True)   # 1 where the scan proved the kept tile mask-free


@dataclass(frozen=True)
class PairIndex:
    """Where a pair summary reads its table: an index expression in the row variable alone and one in the key
    variable alone, over the row extent n and the key extent m (the pre-pass evaluates them at every row and key).
    A row (key) summary read at a function of its variable has that function only, the other None."""
    rows: object
    keys: object
    n: object
    m: object


@dataclass(frozen=True)
class TileSummaries:
    """A kernel argument holding per-tile summaries of an input (runtime/launch.py computes it before the launch):
    the input's shape with axis `pos` (the row or key axis, in tiles of BLOCK_M or BLOCK_N) replaced by its
    tile count, and a last axis of 2: the (min, max) of each tile. Booleans are summarised as 0/1. Axis "pair":
    axis `pos` holds row tiles and axis `kpos` key tiles, each entry the (min, max) of the table over the
    (row tile, key tile) pair at the read's index (`at`)."""
    arg: str               # the argument's name (arg_ptr, stride_arg_z*, stride_arg_k, stride_arg_s)
    tensor: str            # the input it summarises
    axis: str              # "row" (tiles of BLOCK_M), "key" (tiles of BLOCK_N) or "pair"
    pos: int               # the tiled axis of the input (pair: its row tiles)
    rank: int              # the input's rank (without batch axes)
    kpos: int = -1         # pair: the axis of its key tiles
    at: PairIndex | None = None


def summary_arg(summaries: dict, sm, taken: set, n, m) -> TileSummaries:
    """The kernel argument of summary sm (data_summaries.Summary), made once per (input, axis, positions, pair index) in
    `summaries` with a name not in `taken`; n, m: the schedule's row and key extents."""
    ix, at = sm.read.index, None
    if sm.axis == "pair":
        at = PairIndex(ix[sm.pos], ix[sm.kpos], n, m)
    elif sm.gathered:
        at = PairIndex(ix[sm.pos], None, n, m) if sm.axis == "row" else PairIndex(None, ix[sm.pos], n, m)
    key = (sm.read.name, sm.axis, sm.pos, sm.kpos, at)
    if key not in summaries:
        taken = taken | {t.arg for t in summaries.values()}
        arg, k = f"{sm.read.name}_{sm.axis}_tiles", 1
        while arg in taken:
            k += 1
            arg = f"{sm.read.name}_{sm.axis}_tiles{k}"
        summaries[key] = TileSummaries(arg, sm.read.name, sm.axis, sm.pos, len(sm.read.index), sm.kpos, at)
    return summaries[key]


def summary_offsets(ts: TileSummaries, sm, row_tile: str, key_tile: str, idx) -> str:
    """The element offset of a tile's (min) summary: the tile indices at the tiled axes, the read's leading
    indices (code by `idx`) elsewhere."""
    tiled = {ts.pos: row_tile if ts.axis in ("row", "pair") else key_tile}
    if ts.axis == "pair":
        tiled[ts.kpos] = key_tile
    offs = [f"{tiled[p]} * stride_{ts.arg}_{p}" if p in tiled else f"{idx(ix)} * stride_{ts.arg}_{p}"
            for p, ix in enumerate(sm.read.index)]
    return f"{ts.arg}_ptr + off_{ts.arg} + {' + '.join(offs)}"


class DataTiles:
    """The KernelEmitter's part for branches whose tiles the data's summaries decide (a mixin: it uses the
    emitter's expression emitter `x`, `_code`, `_tile` and `_tile_box`)."""

    def _summary_loads(self, b, axis: str, scope: Scope, tile: str | None = None, names: dict | None = None) -> None:
        """Load the (min, max) of every summarised read of branch b on `axis` for this row tile ("row", once per
        program) or key tile ("key", in the key loop), into the variables the tile tests name (`names`: default
        summary_names). tile: the key tiles' index (a vector over SCAN tiles in the scan)."""
        vector = tile is not None
        key_tile = tile or "(start_n // BLOCK_N)"
        names = self.summary_names if names is None else names
        for sm in b.summaries:
            if sm.axis != axis and not (axis == "key" and sm.axis == "pair"):   # pairs: with the key tiles
                continue
            ts = summary_arg(self.summaries, sm, set(self.p.input_map), self.s.row[1], b.extent)
            base = summary_offsets(ts, sm, "start_m", key_tile, self.idx)
            for sym, stat, extra in ((sm.lo, "min", ""), (sm.hi, "max", f" + stride_{ts.arg}_s")):
                name = self.x.fresh(f"{sm.read.name}_{sm.axis}_{stat}" + ("_t" if vector else ""))
                names[sym] = name
                what = f"each of {SCAN} key tiles" if vector else f"the {axis} tile"
                scope.add(f"{name} = tl.load({base}{extra}){widen(sm)}  # {stat} of {sm.read.name} over {what}")
                self.x.loads.append(AccessSite(name, ts.arg, (), ((SCAN_T, "scan"),) if vector else (), ()))

    def _program_values(self, b, scope: Scope, names: dict | None = None) -> None:
        """Load once per program the value of every read of branch b's mask fixed per program (a key length L[b]):
        its own min and max for the tile tests."""
        program_values(b.summaries, self.x, scope, self.summary_names if names is None else names)

    def _data_loop(self, k: int, b, body: Scope, q, mo: Monoid, scale, names: dict, skip, full, m_ext: str) -> None:
        """The key loop of a branch whose tiles need a skip test (onf.scans_keys): a scan evaluates the skip and
        full tests on SCAN key tiles at a time (with the data's summaries as vector loads, padded by the pre-pass so
        unmasked); then each kept tile runs, in order, with no test around its loads (the software pipeline can
        prefetch them). A document mask visits only the tiles of the documents in the row tile; a strided branch
        (i - j) % s == 0 only the tiles holding a multiple of s."""
        sfx = self.x.sfx(k)
        by = "the data" if b.summaries and uses_summaries(self.s, b) else "the skip test"
        body.add(f"# key tiles kept by {by}, found {SCAN} at a time; only those run")
        scan = Scope([], "    ", parent=body).open(
            # (hi + BLOCK_N) // BLOCK_N, not hi // BLOCK_N + 1: Triton's // truncates, and a key split past the
            # row tile's keys has -BLOCK_N < hi < 0 (no scan step; the cost model counts none)
            f"for scan_t in range(lo{sfx} // BLOCK_N, (hi{sfx} + BLOCK_N) // BLOCK_N, {SCAN}):", ("scan", k))
        scan.add(f"offs_t = scan_t + tl.arange(0, {SCAN})")
        scan.add("col_lo_t = offs_t * BLOCK_N")
        scan.add(f"col_hi_t = tl.minimum(col_lo_t + BLOCK_N, {m_ext}) - 1")
        vec = {**names, iv.J_LO: "col_lo_t", iv.J_HI: "col_hi_t"}
        self._summary_loads(b, "key", scan, "offs_t", vec)
        scan.add(f"kept = ({self._code(skip, vec)} == 0) & (offs_t <= hi{sfx} // BLOCK_N)")
        if full not in (sp.true, sp.false):
            scan.add(f"full_t = tl.where({self._code(full, vec)}, 1, 0)  # tiles the data proves mask-free")
        inner = scan.open("for kept_i in range(tl.sum(kept.to(tl.int32), 0)):", ("visit", k))
        inner.add("tile_t = tl.min(tl.where(kept, offs_t, 2147483647), 0)  # the next kept key tile")
        inner.add("kept = kept & (offs_t != tile_t)")
        inner.add("start_n = tile_t * BLOCK_N")
        self._tile_box(inner, m_ext)
        if full not in (sp.true, sp.false):
            inner.add("tile_full = tl.max(tl.where(offs_t == tile_t, full_t, 0), 0)")
            full = sp.Eq(TILE_FULL, 1)
        self._tile(k, b, inner, body, q, mo, scale, {**names, TILE_FULL: "tile_full"}, "test", full)
        body.lines.extend(scan.parent.lines)



def program_values(summaries, x, scope: Scope, names: dict) -> None:
    """The per-program reads among `summaries` (axis "program"), each loaded once into `scope` by the expression
    emitter x (the mask's own read of it in a tile reuses the load), named as both its min and its max."""
    for sm in summaries:
        if sm.axis != "program":
            continue
        value = x.emit(sm.read, {}, scope, role="bound")
        # tested as 0 / 1 (a flag, like a tile's any / all) or in 64 bits (an int32 length plus a tile bound)
        wide = x.fresh(f"{sm.read.name}_{'flag' if sm.read.dtype == ir.BOOL else 'wide'}")
        scope.add(f"{wide} = {value}.to({'tl.int32' if sm.read.dtype == ir.BOOL else 'tl.int64'})")
        names[sm.lo] = names[sm.hi] = wide


def widen(sm) -> str:
    """The conversion of an integer summary to 64 bits for the tile tests (an int32 id or length next to a tile
    bound); flags stay 0 / 1."""
    return "" if sm.read.dtype == ir.BOOL else ".to(tl.int64)"
