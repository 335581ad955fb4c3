"""Per-tile summaries of the integer and boolean inputs a mask reads (data-derived block sparsity): the pre-pass
before a launch. For an input read as X[..., i, ...] by a mask, the min and max of X over every row tile (or key
tile) of the launch's tile size, so that the kernel skips a (row tile, key tile) pair the summaries prove empty,
and runs a tile they prove full without mask code (moa/intervals.py decides both from the mask's algebra).
Booleans are summarised as 0/1: the max is `any`, the min is `all`. The cost model evaluates the same tests on
the same summaries when it is given the inputs."""
from __future__ import annotations

import numpy as np
import torch

from moa import symbolic as sy
from moa.tiles import along


def tile_summaries(t: torch.Tensor, axis: int, block: int, extra: int = 0) -> torch.Tensor:
    """(min, max) of `t` over tiles of `block` along `axis`: the shape of t with that axis replaced by its tile
    count and a last axis of 2, contiguous. Booleans become int8; integers keep their dtype. extra: tiles of
    padding after the last (the kernel's scan reads key tiles a vector at a time, unmasked; their values are
    never used)."""
    if t.dtype == torch.bool:
        t = t.to(torch.int8)
    lo, hi = _tiles(t, block, axis)
    return _padded(torch.stack([lo, hi], -1), axis % t.dim(), extra).contiguous()


def pair_tile_summaries(t: torch.Tensor, rpos: int, kpos: int, rows: torch.Tensor, keys: torch.Tensor, bm: int,
                        bn: int, extra: int = 0) -> torch.Tensor:
    """(min, max) of t[..., rows[i], ..., keys[j], ...] (axes rpos and kpos) over every (tile of bm rows, tile of bn
    keys): t's shape with axis rpos replaced by the row tile count, kpos by the key tile count (plus `extra`
    padding tiles) and a last axis of 2. The rows are gathered and reduced per row tile first, then the keys, so
    the work is rows x the table's key extent plus row tiles x keys, not rows x keys."""
    if t.dtype == torch.bool:
        t = t.to(torch.int8)
    x = t.movedim((rpos, kpos), (-2, -1)).index_select(-2, rows)
    lo, hi = _tiles(x, bm, -2)
    lo = _tiles(lo.index_select(-1, keys), bn, -1)[0]
    hi = _tiles(hi.index_select(-1, keys), bn, -1)[1]
    out = _padded(torch.stack([lo, hi], -1), x.dim() - 1, extra)   # the key tiles' axis
    return out.movedim((-3, -2), (rpos, kpos)).contiguous()


def _tiles(t: torch.Tensor, block: int, axis: int) -> tuple:
    """(min, max) of t over tiles of `block` along `axis` (the last tile padded with values that never win)."""
    x = t.movedim(axis, -1)
    length = x.shape[-1]
    tiles = -(-length // block)
    pad = tiles * block - length
    info = torch.iinfo(x.dtype)

    def padded(value):   # exact in any integer dtype
        fill = torch.full((*x.shape[:-1], pad), value, dtype=x.dtype, device=x.device)
        return torch.cat([x, fill], -1) if pad else x

    lo = padded(info.max).reshape(*x.shape[:-1], tiles, block).amin(-1)
    hi = padded(info.min).reshape(*x.shape[:-1], tiles, block).amax(-1)
    return lo.movedim(-1, axis), hi.movedim(-1, axis)


def _padded(out: torch.Tensor, axis: int, extra: int) -> torch.Tensor:
    """out (summaries with a last axis of 2) with `extra` zero tiles appended along its axis `axis`."""
    if not extra:
        return out
    shape = list(out.shape)
    shape[axis] = extra
    return torch.cat([out, out.new_zeros(shape)], axis)


def summary_tensor(ts, t: torch.Tensor, nb: int, bm: int, bn: int, dims: dict, extra: int = 0) -> torch.Tensor:
    """The argument of TileSummaries ts (codegen/data_tiles.py) for input t with nb batch axes, at tiles of bm rows
    and bn keys; key tiles padded by `extra`. dims: dim name -> value (a pair summary evaluates its row and key
    functions at every row and key)."""
    if t.dtype not in (torch.int32, torch.int64, torch.bool):
        t = t.to(torch.int32)

    def at(ix, ext, pos):   # the index function at every row (key), clipped to the input (a where-guarded read)
        return along_tensor(ix, dims, int(sy.evaluate(ext, dims)), t, nb + pos)

    if ts.axis in ("row", "key"):
        if ts.at is not None:   # read at a function of the row (key): gathered at every row (key) first
            ix, ext = (ts.at.rows, ts.at.n) if ts.axis == "row" else (ts.at.keys, ts.at.m)
            t = t.index_select(nb + ts.pos, at(ix, ext, ts.pos))
        return tile_summaries(t, nb + ts.pos, bm) if ts.axis == "row" else tile_summaries(t, nb + ts.pos, bn, extra)
    rows, keys = at(ts.at.rows, ts.at.n, ts.pos), at(ts.at.keys, ts.at.m, ts.kpos)
    return pair_tile_summaries(t, nb + ts.pos, nb + ts.kpos, rows, keys, bm, bn, extra)


def along_tensor(ix, dims: dict, count: int, t: torch.Tensor, axis: int) -> torch.Tensor:
    """tiles.along as indices into axis `axis` of t (on its device): the index function ix at 0 .. count - 1, the
    dims by name in `dims`, clipped to the axis."""
    idx = along(ix, {sy.dim(name): v for name, v in dims.items()}, count, t.shape[axis])
    return torch.from_numpy(np.ascontiguousarray(idx)).to(t.device)


def packed_tile_summaries(t: torch.Tensor, axis: int, block: int, cu: list, extra: int = 0) -> torch.Tensor:
    """Per-tile summaries of a varlen batch's packed input (sequence s: indices cu[s] .. cu[s + 1] - 1 of `axis`),
    tiled per sequence in its local indices: sequence s's tiles start at tile cu[s] // block + s (where the grid
    kernel reads them, codegen/splitkv.py; no two sequences' tiles overlap, as ceil(L / block) <= floor(L / block)
    + 1), the tiles between sequences zero. The axis holds cu[-1] // block + len(cu) + extra tiles."""
    ref = tile_summaries(t.narrow(axis, 0, 0), axis, block)
    shape = list(ref.shape)
    shape[axis] = cu[-1] // block + len(cu) + extra
    out = ref.new_zeros(shape)
    for s in range(len(cu) - 1):
        if cu[s + 1] > cu[s]:
            part = tile_summaries(t.narrow(axis, cu[s], cu[s + 1] - cu[s]), axis, block)
            out.narrow(axis, cu[s] // block + s, part.shape[axis]).copy_(part)
    return out
