"""Per-tile summaries of a mask's data (runtime/summaries.py) for the split-KV launches whose programs see only part
of the bound key tensors: a valid length per batch index (`cache_len`), pages of a pool (a block table), packed
sequences (varlen). The key tiles of each batch index (or sequence) are summarised in its own logical key order
over its valid keys only, so a program skips exactly the tiles a call on that index's valid keys alone skips:
keys past the valid length (stale cache entries, the rest of a partly filled page) never widen a tile's
(min, max), and the cost model (runtime/decode_cost.py, varlen_cost.py), given the logical data, counts what the
kernel runs. The grid kernel moves a key-summary pointer to the split's first logical tile (codegen/splitkv.py)."""
from __future__ import annotations

import torch

from moa.codegen.data_tiles import SCAN
from moa.codegen.splitkv import LENGTHS, PAGED, VARLEN_PAGED, VARLENS

from .summaries import along_tensor, packed_tile_summaries, tile_summaries


def replace_summaries(block, spec, cb, args: list, call, cfg) -> None:
    """Replace the per-tile summary arguments of a launch (computed by the launcher over the bound tensors) by
    those of the call's mode: VARLEN(_PAGED) per sequence in its local tiles (runtime/summaries.
    packed_tile_summaries), LENGTHS and PAGED key tiles per batch index in logical order over its valid keys."""
    decl = block.planner.cg_program.input_map
    nb = len(cb.batch)
    pos = sum(1 + nb + len(decl[x].shape) for x in spec.inputs)
    for ts in spec.summaries:
        width = 2 + nb + ts.rank
        t = cb.tensors[ts.tensor]
        if t.dtype not in (torch.int32, torch.int64, torch.bool):
            t = t.to(torch.int32)
        st = None
        if ts.at is not None and ts.axis in ("row", "key"):   # read at a function of the index: at logical indices
            t = local_values(t, nb, ts, call, cb.dims)
        if call.mode in VARLENS:
            if ts.axis == "row":
                st = packed_tile_summaries(t, nb + ts.pos, cfg.block_m, call.cu_host[0])
            else:
                if call.mode == VARLEN_PAGED and ts.at is None:   # each sequence's keys gathered from its pages
                    t = t.index_select(nb + ts.pos, varlen_key_positions(call.block_table, call.page,
                                                                         call.cu_host[1]).to(t.device))
                st = packed_tile_summaries(t, nb + ts.pos, cfg.block_n, call.cu_host[1], SCAN)
        elif call.mode in (LENGTHS, PAGED) and ts.axis == "key":
            table = call.block_table if call.mode == PAGED and ts.at is None else None
            st = valid_key_summaries(t, nb, ts.pos, cfg.block_n, call.cache_len, table, call.page, tuple(cb.batch))
        if st is not None:
            args[pos: pos + width] = [st, *st.stride()]
        pos += width


def local_values(t: torch.Tensor, nb: int, ts, call, dims: dict) -> torch.Tensor:
    """A row or key read at a function of its index (flag[j // 2], codegen TileSummaries.at) as the kernel reads it:
    at each sequence's local indices, packed (varlen), else at every logical key of the cache (paged: the read's
    index is the logical key, not a pool position). Indices past the input are clipped (a where-guarded read).
    dims: the block's dims by name (the function's dims: a block's first key)."""
    pos = nb + ts.pos
    ix = ts.at.rows if ts.axis == "row" else ts.at.keys

    def at(count: int) -> torch.Tensor:
        return along_tensor(ix, dims, count, t, pos)

    if call.mode in VARLENS:
        cu = call.cu_host[0 if ts.axis == "row" else 1]
        idx = torch.cat([at(cu[s + 1] - cu[s]) for s in range(len(cu) - 1)] + [at(0)])
    else:
        idx = at(call.block_table.shape[1] * call.page if call.mode == PAGED else call.mk)
    return t.index_select(pos, idx)


def varlen_key_positions(table: torch.Tensor, page: int, cu_k: list) -> torch.Tensor:
    """Pool positions of every sequence's keys, packed by cu_k: key j of sequence s at table[s, j // P] P + j % P."""
    table = table.to(torch.int64).cpu()
    parts = []
    for s in range(len(cu_k) - 1):
        j = torch.arange(cu_k[s + 1] - cu_k[s])
        parts.append(table[s, j // page] * page + j % page)
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.int64)


def logical_keys(t: torch.Tensor, nb: int, pos: int, batch: tuple, table: torch.Tensor | None, page: int):
    """t [*batch, own] broadcast to the batch; with a block table ([flattened batch, pages]), its key axis `pos`
    gathered into each batch index's logical order (pages x page keys)."""
    full = t.expand(*batch, *t.shape[nb:]) if batch else t
    if table is None:
        return full
    nbatch = table.shape[0]
    flat = full.reshape(nbatch, *full.shape[nb:])
    j = torch.arange(table.shape[1] * page, device=table.device)
    pages = table.to(torch.int64).clamp(0, flat.shape[1 + pos] // page - 1)   # padding past the valid keys
    idx = pages[:, j // page] * page + j % page   # [flattened batch, logical keys]
    shape = [1] * flat.dim()
    shape[0], shape[1 + pos] = nbatch, idx.shape[1]
    want = list(flat.shape)
    want[1 + pos] = idx.shape[1]
    out = flat.gather(1 + pos, idx.to(flat.device).reshape(shape).expand(want))
    return out.reshape(*batch, *out.shape[1:])


def valid_key_summaries(t, nb: int, pos: int, block: int, lens: torch.Tensor, table, page: int, batch: tuple):
    """(min, max) per key tile of each batch index's valid keys (lens: int per flattened batch index), in logical
    key order (through the block table when paged), with the SCAN padding the kernel's scan reads: keys past the
    valid length take values that never win, as the padding of a last partial tile does."""
    x = logical_keys(t, nb, pos, batch, table, page)
    if x.dtype == torch.bool:
        x = x.to(torch.int8)
    axis = nb + pos
    keys = x.shape[axis]
    shape = [1] * x.dim()
    shape[axis] = keys
    valid = torch.arange(keys, device=x.device).reshape(shape) < \
        lens.to(device=x.device, dtype=torch.int64).reshape(*batch, *[1] * (x.dim() - nb))
    info = torch.iinfo(x.dtype)
    lo = tile_summaries(torch.where(valid, x, info.max), axis, block, SCAN)
    hi = tile_summaries(torch.where(valid, x, info.min), axis, block, SCAN)
    return torch.stack([lo[..., 0], hi[..., 1]], -1).contiguous()
