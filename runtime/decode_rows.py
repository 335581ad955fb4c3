"""The query side of an input read by both the query and the key index (a document id `doc[i] == doc[j]`, global
tokens, a gate `G[i] - G[j]`; moa/shard.py role BOTH) in a decode against a cache with valid lengths or pages.

Such an input is passed once along the keys, as the cache. Its key copy is the tensor itself (the grid kernel
moves it with the other key inputs: per split, or per page); its query side is the queries' rows, which with
`cache_len` are the last n_q rows of each batch index's valid keys, L_b - n_q .. L_b - 1 (a program with one dim
for both axes sees its queries there), and with a block table the pool positions of those logical rows,
block_table[b, r // P] P + r % P. Each batch index gets its own rows: the query side is gathered per batch index
(it has the call's batch axes even where the input has none)."""
from __future__ import annotations

import torch

from moa.errors import InputError


def query_rows(nq: int, lens: torch.Tensor, table: torch.Tensor | None = None, page: int = 0) -> torch.Tensor:
    """[flattened batch, nq] positions of the query rows along the key axis of a BOTH input: the last nq valid
    keys of each batch index (lens: int32 per batch index), through the block table when paged."""
    r = lens.to(torch.int64)[:, None] - nq + torch.arange(nq, device=lens.device)
    if table is None:
        return r
    return table.to(torch.int64).gather(1, r // page) * page + r % page


def both_sides_per_batch(kernel, plan, inputs: dict, rows: torch.Tensor, batch: tuple) -> dict:
    """The block program's inputs (runtime/decode.both_sides) with each BOTH input's query side its rows `rows`
    ([flattened batch, nq], from query_rows) per batch index, and its key copy the input itself."""
    out = dict(inputs)
    decl = kernel.program.input_map
    for name, copy in plan.kv_copies.items():
        t = inputs.get(name)
        if not isinstance(t, torch.Tensor):
            continue
        rank, axis = len(decl[name].shape), plan.roles[name][1]
        own = t.shape[t.dim() - rank:]
        try:
            full = t.expand(*batch, *own)
        except RuntimeError:
            raise InputError(f"decode: input {name} of shape {tuple(t.shape)} does not broadcast to the call's "
                             f"batch axes {tuple(batch)}") from None
        nb = len(batch)
        shape = [1] * (nb + rank)
        shape[:nb] = batch
        shape[nb + axis] = rows.shape[-1]
        idx = rows.to(t.device).reshape(shape)
        want = list(full.shape)
        want[nb + axis] = rows.shape[-1]
        out[copy] = t
        out[name] = full.gather(nb + axis, idx.expand(want))
    return out
