"""Per-tile summaries of the integer and boolean inputs a mask reads (data-derived block sparsity): the pre-pass
before a launch. For an input read as X[..., i, ...] by a mask, the min and max of X over every row tile (or key
tile) of the launch's tile size, so that the kernel skips a (row tile, key tile) pair the summaries prove empty,
and runs a tile they prove full without mask code (moa/intervals.py decides both from the mask's algebra).
Booleans are summarised as 0/1: the max is `any`, the min is `all`. The cost model evaluates the same tests on
the same summaries when it is given the inputs."""
from __future__ import annotations

import torch


def tile_summaries(t: torch.Tensor, axis: int, block: int, extra: int = 0) -> torch.Tensor:
    """(min, max) of `t` over tiles of `block` along `axis`: the shape of t with that axis replaced by its tile
    count and a last axis of 2, contiguous. Booleans become int8; integers keep their dtype. extra: tiles of
    padding after the last (the kernel's scan reads key tiles a vector at a time, unmasked; their values are
    never used)."""
    if t.dtype == torch.bool:
        t = t.to(torch.int8)
    x = t.movedim(axis, -1)
    length = x.shape[-1]
    tiles = -(-length // block)
    pad = tiles * block - length
    info = torch.iinfo(x.dtype)

    def padded(value):   # the last tile filled with a value that never wins (exact in any integer dtype)
        fill = torch.full((*x.shape[:-1], pad), value, dtype=x.dtype, device=x.device)
        return torch.cat([x, fill], -1) if pad else x

    lo, hi = padded(info.max), padded(info.min)
    lo = lo.reshape(*x.shape[:-1], tiles, block).amin(-1)
    hi = hi.reshape(*x.shape[:-1], tiles, block).amax(-1)
    out = torch.stack([lo, hi], -1)
    if extra:
        out = torch.cat([out, out.new_zeros((*out.shape[:-2], extra, 2))], -2)
    return out.movedim(-2, axis).contiguous()


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
