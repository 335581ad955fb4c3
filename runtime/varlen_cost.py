"""The cost of a varlen call (k.varlen, runtime/varlen.py): one launch of the grid kernel over (row tiles of the
longest sequence, batch x heads, sequences x key splits), in which every program reads its sequence's offsets and
lengths, and the programs of (sequence, split, row tile) that hold rows and keys run the block program at the
sequence's dims and the split's offsets; then the merge pass over every packed row. Each running block is counted
by the cost model (runtime/costing.py) as decode_cost counts a split (runtime/decode_cost.py), with the data of a
mask over per-token ids or flags narrowed to the sequence and split (so tiles skipped by per-tile summaries are
counted as the kernel skips them)."""
from __future__ import annotations

import dataclasses
import math

import torch

from moa import shard
from moa import symbolic as sy
from moa.devices import canonical_dtype
from moa.errors import InputError
from moa.splitkv import choose_splits, split_seconds

from .cost_data import check_data
from .costing import cost_breakdown
from .decode import _global, _plan, call_schedules, decode_config
from .decode_cost import DecodeCost, _fused, _lse_counts, fused_merges, key_bytes, merge_counts
from .decode_merge import packed_rows
from .decode_rows import check_replicated
from .decode_summaries import varlen_key_positions
from .device import cdiv
from .tiling import head_dims, row_programs

PROLOGUE_BYTES = 16   # every program of the grid loads cu_q[s], cu_q[s + 1], cu_k[s], cu_k[s + 1] (int32)


def _lengths(cu, what: str) -> list:
    c = cu.tolist() if isinstance(cu, torch.Tensor) else list(cu)
    if len(c) < 2 or c[0] != 0 or any(b < a for a, b in zip(c, c[1:])) or not all(isinstance(x, int) for x in c):
        raise InputError(f"varlen_cost: {what} must be integers starting at 0 and never decreasing, got {c[:8]}")
    return c


# long: config, splits, then every (sequence, split)'s report, the lse stores and the merge, as varlen runs them
def varlen_cost(kernel, cu_seqlens_q, cu_seqlens_k, splits: int | None = None, dtype="bf16", device="h100",
                batch=(), config=None, inputs: dict | None = None, page_size: int | None = None,
                pages: int | None = None, block_table=None, **dims) -> DecodeCost:
    """DecodeCost of k.varlen(cu_seqlens_q, cu_seqlens_k, ...) (lists or tensors of cumulative lengths); dims: the
    program's dims other than the sequence lengths (d, e, heads ...); batch: the leading axes (heads) of the
    packed inputs. inputs: the packed integer / boolean inputs a mask reads (document ids, flags), as passed to
    varlen: tiles their per-tile summaries skip are counted on this data (without it: none skipped).
    split_reports holds one report per (sequence, split) that runs; kv_bytes every key of every sequence once.
    page_size, pages: the keys in pages (varlen(block_table=, page_size=)): one split per page, `pages` the
    table's pages per sequence; with inputs=, the key data are pools and block_table (as passed to varlen) says
    where each sequence's keys lie (the launch summarises them per sequence, runtime/decode_summaries.py)."""
    plan, block = _plan(kernel)
    check_replicated(kernel, plan, "varlen_cost", "a packed batch has one length per sequence")
    dtype = canonical_dtype(dtype)
    cq, ck = _lengths(cu_seqlens_q, "cu_seqlens_q"), _lengths(cu_seqlens_k, "cu_seqlens_k")
    check_data(kernel.program, inputs, "varlen_cost")
    if len(cq) != len(ck):
        raise InputError(f"varlen_cost: cu_seqlens_q has {len(cq) - 1} sequences and cu_seqlens_k {len(ck) - 1}")
    lq = [b - a for a, b in zip(cq, cq[1:])]
    lk = [b - a for a, b in zip(ck, ck[1:])]
    nq, mk, nseq = cq[-1], ck[-1], len(lq)
    gdims, row0 = _global(plan, nq, mk) if plan.n != plan.m else ({plan.n.name: mk}, mk - nq)
    if plan.n == plan.m and any(a > b for a, b in zip(lq, lk)):
        raise InputError("varlen_cost: a sequence has more query rows than keys; the program uses one dim "
                         f"{plan.n} for both axes, so its queries are its last rows")
    missing = sorted(d.name for d in kernel.program.dims if d.name not in {**dims, **gdims})
    if missing:
        raise InputError(f"varlen_cost needs every dim of {kernel.program.name}; missing {', '.join(missing)}")
    batch = (batch,) if isinstance(batch, int) else tuple(batch)
    bd0 = plan.block_dims({**dims, **gdims}, row0, nq, 0, mk)
    name = plan.outputs[0].name
    sched = block.planner.schedules[name]
    cdims = {c: bd0[u] for c, u in block.planner.codegen.dims.items() if u in bd0}
    on_cpu = str(device).lower() == "cpu"
    if config is None and on_cpu:
        config = block.planner.launch_config(name, torch.device("cpu"), dtype, cdims)
    cfg = config or decode_config(sched, cdims, dtype)
    if page_size:   # key tiles of at most a page; one split per page of the table
        if not pages or (inputs and block_table is None):
            raise InputError("varlen_cost: pages needs page_size and the table's pages per sequence, and with "
                             "inputs= the block_table")
        cfg = dataclasses.replace(cfg, block_n=min(cfg.block_n, page_size))
    z = 1
    for x in (*batch, *[sy.evaluate(x, cdims) for _, x in sched.lead]):
        z *= x
    e = sy.evaluate(sched.col[1], cdims)
    ptiles = row_programs(sched, max(lq), cfg.block_m)
    keys = pages * page_size if page_size else max(lk)
    ktiles = max(1, cdiv(keys, cfg.block_n))
    head = max(head_dims(sched, cdims) or [e])
    tdev = "h100" if on_cpu else device
    args = (ptiles * z * nseq, ktiles, cfg.block_m, cfg.block_n, head, e, z * sy.evaluate(sched.row[1], cdims),
            dtype, tdev)
    mix = tuple((row_programs(sched, a, cfg.block_m) * z, cdiv(b, cfg.block_n)) for a, b in zip(lq, lk))
    splits = pages if page_size else splits or choose_splits(*args, mix=mix).splits
    split_len = cdiv(ktiles, min(splits, ktiles)) * cfg.block_n
    splits = max(1, cdiv(keys, split_len))
    inputs = _broadcast(kernel, inputs, batch)
    if page_size and inputs:   # the key data gathered from the pools into each sequence's packed keys
        inputs = _unpaged(plan, inputs, varlen_key_positions(torch.as_tensor(block_table), page_size, ck), batch)
    data = _packed_data(kernel, plan, inputs, cq, ck, lq, batch)
    run = call_schedules(block, plan, cdims, dtype, device, math.prod(batch), varlen=True)
    reports = []
    extra = [0, 0, 0, 0]
    for o in plan.outputs:   # every program of each output's grid reads its sequence's offsets (and page)
        extra[2] += row_programs(block.planner.schedules[o.name], max(lq), cfg.block_m) * z * nseq * splits * \
            (PROLOGUE_BYTES + (4 if page_size else 0))
    for s in range(nseq):
        if lq[s] == 0:
            continue
        gd, r0 = _global(plan, lq[s], lk[s])
        runs = cdiv(lk[s], split_len)
        for t in range(runs):
            c0 = t * split_len
            ml = min(split_len, lk[s] - c0)
            bd = plan.block_dims({**dims, **gd}, r0, lq[s], c0, ml)
            part = None if data is None else {n: f(s, c0, ml) for n, f in data.items()}
            reports.append(cost_breakdown(block, dtype=dtype, device=device, config=cfg, batch=batch, needed=False,
                                          inputs=part, schedules=run, **bd)[0])
        bdc = {c: bd[u] for c, u in block.planner.codegen.dims.items() if u in bd} if runs else {}
        for o in plan.outputs if runs else ():   # each split that runs stores its lse (z) and its partial
            so = block.planner.schedules[o.name]
            ro, eo = sy.evaluate(so.row[1], bdc), sy.evaluate(so.col[1], bdc)
            for k, v in enumerate(_lse_counts(runs, row_programs(so, ro, cfg.block_m) * z, cfg.block_m, z * ro, eo,
                                              so.branches[0].kind != "softmax", dtype, device, splits)):
                extra[k] += v
    merge = 0
    fused = packed_rows(plan, _fused(block, plan, batch, dtype))   # the epilogue fused into the merge
    for o in plan.outputs if splits > 1 else ():
        if plan.owner.get(o.name) in fused:
            continue
        so = block.planner.schedules[o.name]
        counts = merge_counts(splits, z * nq, sy.evaluate(so.col[1], cdims), so.branches[0].kind, dtype, device)
        merge += sum(counts[2:])
        for k, v in enumerate(counts):
            extra[k] += v
    # one fused merge per epilogue over every packed row
    merge += fused_merges(plan, fused, block, block.planner, splits, lambda so: z * nq, cdims, bd0, dtype, on_cpu,
                          extra)
    per_key = key_bytes(plan, dtype, bd0)
    nbatch = _prod(batch)
    longest = cdiv(max([r.tiles_visited for r in reports] + [0]), max(1, ptiles * z))
    loaded = sum(r.dram_bytes_loaded for r in reports) + extra[2]
    stored = sum(r.dram_bytes_stored for r in reports) + extra[3]
    return DecodeCost(splits, split_len, 1, sum(r.flops for r in reports) + extra[0],
                      sum(r.transcendentals for r in reports) + extra[1], loaded + stored, loaded, stored, merge,
                      per_key * mk * nbatch, sum(r.tiles_visited for r in reports),
                      split_seconds(splits, *args, longest=longest, mix=mix),
                      split_seconds(1, *args, longest=ktiles, mix=mix),
                      tuple(reports))


def _prod(xs) -> int:
    out = 1
    for x in xs:
        out *= x
    return out


def _broadcast(kernel, inputs: dict | None, batch: tuple) -> dict | None:
    """The inputs with leading axes that broadcast to the batch expanded to it, as varlen binds them (document ids
    shared by every head)."""
    if not inputs:
        return inputs
    decl = kernel.program.input_map
    out = {}
    for name, x in inputs.items():
        t = torch.as_tensor(x)
        if name in decl:
            rank = len(decl[name].shape)
            try:
                t = t.expand((*batch, *t.shape[t.dim() - rank:])) if t.dim() >= rank else None
            except RuntimeError:
                t = None
            if t is None:
                raise InputError(f"varlen_cost(inputs=...): {name} of shape {tuple(torch.as_tensor(x).shape)} "
                                 f"does not broadcast to the batch {tuple(batch)} (its own axes: {rank})")
        out[name] = t
    return out


def _unpaged(plan, inputs: dict, positions: torch.Tensor, batch: tuple) -> dict:
    """The inputs with the key axis of every key (or both-indices) input taken at the pool positions."""
    out = dict(inputs)
    for name, x in inputs.items():
        role, axis = plan.roles.get(name, (shard.REPLICATED, None))
        if role in (shard.KEY, shard.BOTH):
            out[name] = torch.as_tensor(x).index_select(len(batch) + axis, positions)
    return out


def _packed_data(kernel, plan, inputs: dict | None, cq: list, ck: list, lq: list, batch: tuple):
    """Block-program input name -> f(sequence, c0, ml): the sequence's (and split's) part of a packed integer or
    boolean input, as varlen binds it: query inputs the sequence's rows, key inputs (and the key copy of an input
    read by both indices) the split's keys, the query side of such an input the sequence's last rows."""
    if not inputs:
        return None
    decl = kernel.program.input_map
    out = {}
    for name, x in inputs.items():
        if name not in plan.roles:
            raise InputError(f"varlen_cost(inputs=...): {name!r} is not an input of {kernel.program.name}")
        t = torch.as_tensor(x)
        role, axis = plan.roles[name]
        if role == shard.REPLICATED:
            out[name] = lambda s, c0, ml, t=t: t
            continue
        ax = len(batch) + axis
        if t.dim() != len(batch) + len(decl[name].shape):
            raise InputError(f"varlen_cost(inputs=...): {name} has shape {tuple(t.shape)}; with batch {batch} it "
                             f"has {len(batch) + len(decl[name].shape)} axes")
        if role == shard.QUERY:
            out[name] = lambda s, c0, ml, t=t, ax=ax: t.narrow(ax, cq[s], lq[s])
        else:
            out[plan.kv_copies.get(name, name)] = lambda s, c0, ml, t=t, ax=ax: t.narrow(ax, ck[s] + c0, ml)
            if role == shard.BOTH:
                out[name] = lambda s, c0, ml, t=t, ax=ax: t.narrow(ax, ck[s + 1] - lq[s], lq[s])
    return out
