"""The query side of an input read by both the query and the key index (a document id `doc[i] == doc[j]`, global
tokens, a gate `G[i] - G[j]`; moa/shard.py role BOTH) in a decode against a cache with valid lengths or pages.

Such an input is passed once along the keys, as the cache. Its key copy is the tensor itself (the grid kernel
moves it with the other key inputs: per split, or per page); its query side is the queries' rows, which with
`cache_len` are the last n_q rows of each batch index's valid keys, L_b - n_q .. L_b - 1 (a program with one dim
for both axes sees its queries there), and with a block table the pool positions of those logical rows,
block_table[b, r // P] P + r % P. Each batch index gets its own rows: the query side is gathered per batch index
(it has the call's batch axes even where the input has none).

An epilogue that reads the row index or the length as a number (O = (A @ V) / (i + 1)) takes them per batch
index too: `finish_per_length` evaluates it for the batch indices of each valid length as a call of their own."""
from __future__ import annotations

import dataclasses
import numbers
import re

import sympy as sp
import torch

from moa import dnf as D
from moa import shard
from moa.errors import InputError, UnsupportedError

from .binding import bind, check_reads
from .ring import _results


def bind_block(plan, inputs: dict, dims: dict, what: str = "decode"):
    """bind() of the block program a decode or varlen call runs (moa/shard.py), its InputError in the user's
    terms: the block's local lengths named by the program's dims they stand for (the query rows, the keys), the
    dims the call's query and key inputs gave named so, and no block program's name."""
    try:
        return bind(plan.program, inputs, dims)
    except InputError as e:
        one = plan.n == plan.m   # one dim for both axes: its query rows and its keys
        names = {plan.nl.name: f"{plan.n.name} (the query rows)" if one else plan.n.name,
                 plan.ml.name: f"{plan.m.name} (the keys)" if one else plan.m.name,
                 **{copy: name for name, copy in plan.kv_copies.items()}}   # an id's key copy: the id
        msg = re.sub(r"(?<![\w])(" + "|".join(map(re.escape, names)) + r")(?![\w])", lambda x: names[x.group(1)],
                     e.message).replace(" from given ", " from the query and key inputs ")
        raise InputError(f"{what}: {msg}") from None


def per_sequence(t: torch.Tensor, batch: tuple, trailing: int = 0) -> torch.Tensor:
    """A per-sequence tensor (cache_len [B], a block table [B, pages]: `trailing` axes of its own) with its axes
    aligned to the LEADING batch axes: with inputs [B, H, n, d] to a program without a head axis the call's batch
    axes are (B, H), and lengths [B] are per sequence, as serving stacks pass them (numpy broadcasting would align
    them with H: per head, wrong numbers when B == H). A tensor with every batch axis is taken as it is."""
    lead = t.dim() - trailing
    if 0 < lead < len(batch):
        t = t.reshape(*t.shape[:lead], *([1] * (len(batch) - lead)), *t.shape[lead:])
    return t


def lengths_per_batch(b, t, what: str, limit: int, why: str = ""):
    """An int tensor broadcast to the call's batch axes, flattened (int32, on the device)."""
    if not isinstance(t, torch.Tensor):
        t = torch.tensor(t)
    if t.dtype not in (torch.int32, torch.int64):
        raise InputError(f"decode: {what} must be an int32 or int64 tensor, got {t.dtype}")
    try:
        t = per_sequence(t, b.batch).expand(*b.batch) if b.batch else t.reshape(())
    except RuntimeError:
        raise InputError(f"decode: {what} of shape {tuple(t.shape)} does not broadcast to the call's batch axes "
                         f"{tuple(b.batch)}") from None
    if t.numel() and (bool((t < 0).any()) or bool((t > limit).any())):
        raise InputError(f"decode: {what} must lie in 0 .. {limit}{why}, got {t.flatten().tolist()[:8]}")
    return t.reshape(-1).to(device=b.device, dtype=torch.int32).contiguous()


def whole(x, what: str, who: str = "decode") -> int:
    """An integer argument (a Python, numpy or 0-d tensor integer; not a bool), else an InputError naming it."""
    if isinstance(x, torch.Tensor) and x.dim() == 0 and not x.is_floating_point() and x.dtype != torch.bool:
        x = int(x)
    if isinstance(x, bool) or not isinstance(x, numbers.Integral):
        raise InputError(f"{who}: {what} must be a positive integer, got {x!r}")
    return int(x)


def positive(x, what: str, who: str = "decode") -> int:
    """A count argument (splits): a whole number of at least 1, else an InputError naming it."""
    v = whole(x, what, who)
    if v < 1:
        raise InputError(f"{who}: {what} must be a positive integer, got {x!r}")
    return v


def page_size_of(page_size, block_table, who: str, pool: int | None = None, table: bool = True) -> int:
    """A paged call's page size: given with its block table (table=False: decode_cost may price pages without
    one), an integer power of two >= 16 (a key tile) and, with `pool`, a whole number of pages of the pool's keys."""
    if page_size is None or (table and block_table is None):
        raise InputError(f"{who}: a paged cache needs both block_table and page_size")
    page_size = whole(page_size, "page_size", who)
    if page_size < 16 or page_size & (page_size - 1):
        raise InputError(f"{who}: page_size must be a power of two >= 16 (a key tile), got {page_size}")
    if pool is not None and pool % page_size:
        raise InputError(f"{who}: the key inputs hold {pool} keys, not a whole number of pages of {page_size}")
    return page_size


def check_call_reads(kernel, b, gdims: dict) -> None:
    """The plain call's check of unguarded reads (runtime/binding.check_reads) at the user program's dims of this
    call (`gdims` the sequence dims): a GQA head index a // (h // g) past the K/V heads when g does not divide h."""
    dims = {**{d.name: b.dims[d.name] for d in kernel.program.dims if d.name in b.dims}, **gdims}
    key = tuple(sorted(dims.items()))
    if key not in kernel._reads_checked:   # depends on the dims only: once per shape, as Kernel.bind checks
        check_reads(kernel.program, kernel.dnf, dataclasses.replace(b, dims=dims))
        kernel._reads_checked.add(key)


def global_dims(plan, nq: int, mk: int) -> tuple[dict, int]:
    """(global dims n, m; first query row) of a call with nq query rows against mk keys: a program with one dim
    for both axes sees its queries as the last nq rows of the keys."""
    if plan.n == plan.m:
        if nq > mk:
            raise InputError(f"decode: {nq} query rows against {mk} keys; the program uses one dim "
                             f"{plan.n} for both axes, so the queries are the last rows of the keys (nq <= m)")
        return {plan.n.name: mk}, mk - nq
    return {plan.n.name: nq, plan.m.name: mk}, 0


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
            full = t.expand((*batch, *own))
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


def finish_per_length(plan, block, acc: dict, b, nq: int, inputs: dict, lens: torch.Tensor) -> dict:
    """The user outputs of a decode with valid lengths (lens: int32 per flattened batch index) whose epilogue
    reads the row index or the length as a number (decode_merge.positional): the batch indices of each length L
    are bound as a call of their own (L keys; the epilogue reads no key, so a key input is a stand-in of L rows),
    the epilogue evaluated on their merged rows, the rows put back in batch order."""
    decl = plan.program.input_map
    nbatch, lens_host = len(lens), lens.cpu().tolist()
    flat = {}
    for name, t in inputs.items():   # every input with one flattened batch axis
        own = t.shape[t.dim() - len(decl[name].shape):]
        flat[name] = t.expand(*b.batch, *own).reshape(nbatch, *own)
    parts: dict = {}
    for length in sorted(set(lens_host)):
        idx = torch.tensor([k for k, x in enumerate(lens_host) if x == length], device=b.device)
        seq, qside = {}, {}
        for name, t in flat.items():
            t = t.index_select(0, idx)
            role, axis = plan.roles.get(name, (shard.KEY, 0))
            if role == shard.KEY:
                shape = list(t.shape)
                shape[1 + axis] = length
                t = t.narrow(1 + axis, 0, 1).expand(shape)
            else:
                qside[name] = t
            seq[name] = t
        gdims, row0 = global_dims(plan, nq, length)
        b_s = bind_block(plan, seq, plan.block_dims(gdims, row0, nq, 0, length))
        acc_s = {n: (o.reshape(nbatch, *o.shape[len(b.batch):]).index_select(0, idx), None)
                 for n, (o, _) in acc.items()}
        for name, out in _results(plan, block, acc_s, b_s, nq, qside).items():
            parts.setdefault(name, []).append((idx, out))
    outs = {}
    for name, ps in parts.items():
        res = ps[0][1].new_empty((nbatch, *ps[0][1].shape[1:]))
        for idx, out in ps:
            res[idx] = out
        outs[name] = res.reshape(*b.batch, *res.shape[1:])
    names = plan.output_names
    return outs[names[0]] if len(names) == 1 else outs


def check_replicated(kernel, plan, who: str, why: str, by_index: bool = False) -> None:
    """Inputs read whole by every sequence (or batch index) must not depend on its length (a bias table of 2n - 1
    entries): with lengths that differ per sequence (varlen) or per batch index (a cache's valid lengths), no one
    table is right for all of them. by_index: only where a read's index holds the length too (bias[i - j + n - 1]);
    a table read at the key's own position (flag[j // 2], sized by the cache) serves every valid length, and a
    table of a fixed size read at a length's offset (fl[(j + n) // 2]) is read at each valid length's."""
    decl = kernel.program.input_map
    lengths = {plan.n, plan.m}
    reads = {x for o in kernel.dnf for x in D.nodes(o.expr) if isinstance(x, D.Read)} if by_index else set()
    for name, (role, _) in plan.roles.items():
        syms = set().union(*[getattr(x, "free_symbols", set()) for x in decl[name].shape])
        if by_index and syms & lengths:   # sized by the sequence and read at an offset that moves with it
            syms = set().union(*[sp.sympify(ix).free_symbols for r in reads if r.name == name for ix in r.index])
        if role == shard.REPLICATED and syms & lengths:
            raise UnsupportedError(f"{who}: input {name} has a shape that depends on the sequence length" +
                                   (" and is read at an index that does" if by_index else "") + f"; {why}")
