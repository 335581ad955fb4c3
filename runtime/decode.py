"""Decoding against a KV cache (split-KV, flash-decoding; GQA packing, valid lengths, paged caches), and the launch
that variable-length batches share (runtime/varlen.py).

Both run the block program of ring attention (moa/shard.py: the key axis lifted, j := j + C - 1, rows
i := i + R - 1, local extents) through one launch of `_attn_grid` (codegen/splitkv.py), whose third grid axis
enumerates (sequence, key split) pairs, then merge the key splits' partials (O_s, lse_s) with `_merge_splits`
(the log-sum-exp algebra of runtime/ring.py; sums of the normaliser for normalize outputs).

Where the queries sit: a program whose query and key axes are two dims (`Q[n, d], K[m, d]`) sees the call's
query rows as rows 0 .. n_q - 1 (its masks say how they align, e.g. bottom-right causal); a program with one dim
for both (`Q[n, d], K[n, d]`: sliding window, ALiBi, PiAttention) sees them as the last n_q rows of the m keys
(rows m - n_q .. m - 1): the decoding step of an autoregressive model. Varlen batches apply the same rule per
sequence.
"""
from __future__ import annotations

import dataclasses
import math
import os
import weakref
from dataclasses import dataclass

import torch
import triton.testing

from moa import gqa, onf, shard
from moa import symbolic as sy
from moa.codegen.splitkv import (GRID_KERNEL, LENGTHS, MERGE_KERNEL, MERGE_SOURCE, PAGED, SPLIT, VARLEN_PAGED,
                                 VARLENS, Layout, grid_source)
from moa.errors import InputError, MoaError, UnsupportedError
from moa.splitkv import call_key_range, choose_splits

from . import costing, decode_merge, paged, tune
from .binding import check_dense, check_names, refuse_grad
from .cache import module_for
from .decode_rows import (bind_block, both_sides_per_batch, check_call_reads, check_replicated, finish_per_length,
                          lengths_per_batch, page_size_of, per_sequence, positive, query_rows)
from .decode_rows import global_dims as _global
from .decode_summaries import replace_summaries
from .device import cdiv, check_device, device_table_name, run
from .launch import compute_dtype
from .ring import _results, block_kernel, norm_outputs, sum_outputs
from .tiling import DTYPE_NAME, Config, exact_heads, head_dims, row_programs

_SOURCES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_PACKED, _PACKED_WHY = weakref.WeakKeyDictionary(), weakref.WeakKeyDictionary()
_PREFER: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
PACK_ROWS = 128   # GQA packing by default while the packed rows fit one or two query tiles


@dataclass(frozen=True)
class DecodeStats:
    """What one decode / varlen call ran: key splits, the length of a split, the grid of the block launch."""
    splits: int
    split_len: int
    grid: tuple
    predicted_seconds: float | None = None
    packed_heads: int = 1     # query heads per tile row group (GQA packing; 1: not packed)
    specs: tuple = dataclasses.field(default=(), repr=False, compare=False)   # plan_only: each output's kernel
    # plan_only: (output index, grid source) of the outputs whose grids run in one launch, or (grid source,)
    branch_sources: tuple = dataclasses.field(default=(), repr=False, compare=False)


def _plan(kernel):
    """(ShardPlan, block Kernel): the program over a block of keys, as ring attention shards it."""
    if any(kernel.planner.is_window(n) for n in kernel.output_names):
        raise UnsupportedError("decode and varlen calls do not take window-mixing outputs: their scores mix keys "
                               "across a block's boundary; call k(...) (or k.ring, which exchanges halos)")
    try:
        return block_kernel(kernel)
    except UnsupportedError as e:
        raise UnsupportedError(f"decode and varlen calls run the program over blocks of keys, as ring attention "
                               f"does, and this program cannot be split so: {e.message}") from None


def both_sides(kernel, plan, inputs: dict, rows, keys: int, what: str = "decode") -> dict:
    """The block program's inputs: an input read by the query and the key index (an id, a gate: role BOTH) passes
    along the `keys` keys; its key copy is the whole, its query side the rows `rows` selects (int: the last ones)."""
    out = dict(inputs)
    decl = kernel.program.input_map
    for name, copy in plan.kv_copies.items():
        t = inputs.get(name)
        if isinstance(t, torch.Tensor) and t.dim() >= len(decl[name].shape):
            ax = t.dim() - len(decl[name].shape) + plan.roles[name][1]
            if t.shape[ax] != keys:
                raise InputError(f"{what}: input {name} is read by both the query and the key index, so it is passed "
                                 f"along the keys: {keys} entries on axis {plan.roles[name][1]}, got {t.shape[ax]}")
            out[copy] = t
            out[name] = t.narrow(ax, t.shape[ax] - rows, rows) if isinstance(rows, int) else \
                t.index_select(ax, rows.to(t.device))
    return out


def lengths(kernel, inputs: dict) -> tuple[int, int]:
    """(query rows, keys) of a call: the extents of a query input's row axis and a key input's key axis."""
    plan, _ = _plan(kernel)
    decl = kernel.program.input_map
    check_dense({n: t for n, t in inputs.items() if isinstance(t, torch.Tensor)})
    nq = mk = None
    for name, (role, axis) in plan.roles.items():
        t = inputs.get(name)
        if not isinstance(t, torch.Tensor) or t.dim() < len(decl[name].shape):
            continue
        if role == shard.QUERY and nq is None:
            nq = t.shape[t.dim() - len(decl[name].shape) + axis]
        elif role == shard.KEY and mk is None:
            mk = t.shape[t.dim() - len(decl[name].shape) + axis]
    if nq is None or mk is None:
        why = "no input is read by the query or the key index alone (queries that are their own keys have one " \
            "length: call k(...))" if set(decl) <= set(inputs) else f"pass every input of {', '.join(decl)}"
        raise InputError(f"decode: cannot tell the query rows and the cache length of {kernel.program.name}; {why}")
    return nq, mk


@dataclass
class _Call:
    """What the grid kernel of one call needs besides the block kernel's arguments (codegen/splitkv.py modes)."""
    mode: str
    nq: int                   # query rows of the bound tensors (all sequences when packed)
    mk: int                   # keys of the bound tensors (the pool when paged)
    rows: int                 # the longest sequence's query rows
    keys: int                 # the longest sequence's keys
    nseq: int = 1
    cu: tuple = ()            # VARLEN: (cu_seqlens_q, cu_seqlens_k) on the device, int32
    cu_host: tuple = ()       # VARLEN: the same as lists (the per-sequence tile summaries)
    cache_len: object = None  # LENGTHS, PAGED: the valid length per batch index
    block_table: object = None   # PAGED: [batch, pages] page numbers
    page: int = 0             # PAGED: keys per page


# long: the checks of the cache arguments, one after the other
def decode(kernel, inputs: dict, splits: int | None = None, stats: bool = False, cache_len=None,
           block_table=None, page_size: int | None = None, pack_heads: bool | None = None,
           plan_only: bool = False):
    """Every output of a decoding call (module docstring): one launch over (query tiles, batch x heads, key
    splits), the splits merged. splits: None (the cost model, moa/splitkv.py) or a positive integer.
    cache_len: the valid length of the cache per batch index (an int tensor broadcasting to the call's batch
    axes): keys past it are never read. block_table (with page_size): the key inputs are a pool of pages of
    page_size keys laid back to back along the key axis, and batch index b's key j lives in page
    block_table[b, j // page_size] at j % page_size. pack_heads: run the query heads sharing a K/V head in one
    tile (moa/gqa.py); None: when that makes at most PACK_ROWS rows. plan_only: the DecodeStats of the call,
    nothing launched."""
    refuse_grad(inputs)
    if paged.paging_of(kernel) is not None:   # pools and a block table read through the language's gather
        inputs, block_table, page_size = paged.unpage(kernel, inputs)
    check_names(kernel.program, inputs)
    plan, block = _plan(kernel)
    nq, mk = lengths(kernel, inputs)
    gdims, row0 = _global(plan, nq, mk)
    raw, inputs = inputs, both_sides(kernel, plan, inputs, nq, mk)
    b = bind_block(plan, inputs, plan.block_dims(gdims, row0, nq, 0, mk))
    check_device(b.device)
    call = _Call(SPLIT, nq, mk, nq, mk)
    if block_table is not None or page_size is not None:
        call = _paged(b, call, cache_len, block_table, page_size, plan)
    elif cache_len is not None:
        lens = lengths_per_batch(b, cache_len, "cache_len", mk)
        call = _Call(LENGTHS, nq, mk, nq, mk, cache_len=lens)
    if call.mode != SPLIT:
        check_replicated(kernel, plan, "decode", "with cache_len each batch index has its own length", by_index=True)
    per_length = call.mode != SPLIT and decode_merge.positional(plan)   # the epilogue per valid length
    if call.cache_len is not None and plan.n == plan.m and bool((call.cache_len < nq).any()):
        raise InputError(f"decode: a cache_len is below the {nq} query rows; the program uses one dim {plan.n} "
                         "for both axes, so the queries are the last rows of the valid keys")
    for length in [mk] if call.cache_len is None else sorted(set(call.cache_len.tolist())):   # the keys read
        check_call_reads(kernel, b, _global(plan, nq, length)[0])
    if call.mode != SPLIT and plan.kv_copies:   # an input read by i and j: its query rows per batch index
        rows = query_rows(nq, call.cache_len, call.block_table, call.page)
        inputs = both_sides_per_batch(kernel, plan, raw, rows, tuple(b.batch))
        b = bind_block(plan, inputs, plan.block_dims(gdims, row0, nq, 0, mk))
    packed = _gqa(kernel) if pack_heads is not False else None
    if packed is None and pack_heads:
        raise UnsupportedError("decode: pack_heads=True, but " + _PACKED_WHY.get(kernel, "the key inputs are not read "
                               "by a head index floor(a / q) of the output's head a (GQA) nor by no head (MQA)"))
    runner = block if packed is None else packed[1]
    if packed is not None and pack_heads is None and \
            sy.evaluate(packed[0].group, b.dims) * nq > PACK_ROWS:
        runner, packed = block, None
    if splits is None and call.mode == SPLIT and not plan_only and b.device.type == "cuda" and \
            tune.enabled(kernel.planner.autotune):
        model = _run_output(runner, plan.outputs[0].name, b, plan, call, None, dry=True)[1].splits
        splits = tuned_splits(kernel, plan, b, model, lambda s: _timed(lambda: decode(
            kernel, inputs, splits=s, pack_heads=pack_heads)))
    compute = compute_dtype(b.dtype, b.device)
    acc_dt = torch.float64 if compute == torch.float64 else torch.float32
    fused = {} if not plan.epilogues or per_length else decode_merge.fused_epilogues(   # merge + epilogue in one kernel
        block, plan, len(b.batch), acc_dt, frozenset().union(*[decode_merge.batched_inputs(plan, ep, b)
                                                                for ep in plan.epilogues]))
    if plan_only:   # every output's stats and kernel, nothing launched (the first output's stats returned)
        infos = []
        for o in plan.outputs:
            infos.append(_run_output(runner, o.name, b, plan, call, splits, dry=True)[1])
            splits = infos[-1].splits
        deferred = tuple((k, x.branch_sources[0]) for k, (o, x) in enumerate(zip(plan.outputs, infos))
                         if plan.owner.get(o.name) in fused)
        return dataclasses.replace(infos[0], specs=tuple(x.specs[0] for x in infos), branch_sources=deferred,
                                   packed_heads=1 if packed is None else sy.evaluate(packed[0].group, b.dims))
    acc, info = {}, None
    pending = [] if fused else None   # the branches' grid kernels, launched together
    for o in plan.outputs:   # one split layout for every output (the first one's choice)
        keep = plan.owner.get(o.name) in fused   # its partials go to the fused merge unmerged
        (out, lse), info = _run_output(runner, o.name, b, plan, call, splits, merge=not keep,
                                       defer=pending if keep else None)
        splits = info.splits
        if packed is not None:   # O'[G, r] is O[h, nq] in the same memory order
            h = sy.evaluate(packed[0].heads, b.dims)
            s = (out.shape[0],) if keep else ()
            out, lse = out.reshape(*s, *b.batch, h, nq, out.shape[-1]), lse.reshape(*s, *b.batch, h, nq)
            info = dataclasses.replace(info, packed_heads=sy.evaluate(packed[0].group, b.dims))
        acc[o.name] = (out, lse)
    if fused:
        res = decode_merge.finish_fused(plan, fused, acc, pending, b, compute)
    elif per_length:
        res = finish_per_length(plan, block, acc, b, nq, inputs, call.cache_len)
    else:
        res = _finish(kernel, plan, block, acc, b, nq, inputs)
    return (res, info) if stats else res


def tuned_splits(kernel, plan, b, model: int, seconds) -> int:
    """The number of splits timed fastest for the call's shape bucket among the model's choice, half and twice it
    and one launch (runtime/tune.py: timed on the bucket's first call, then read from the tuning cache);
    seconds(s) times a decode with s splits."""
    cands = sorted({1, max(1, model // 2), model, 2 * model})
    seq = {s.name for s in (plan.n, plan.m, plan.nl, plan.ml, plan.r1, plan.c1)}
    heads = {n: v for n, v in b.dims.items() if n not in seq}
    seqs = {n: v for n, v in b.dims.items() if n in seq}
    device = torch.cuda.get_device_name(b.device) if b.device.type == "cuda" else str(b.device)
    key = tune.bucket_key(device, str(b.dtype), kernel.planner.key, "decode", len(b.batch), heads, seqs)
    rec = tune.choose(key, [f"splits={s}" for s in cands], lambda k: seconds(cands[k]))
    return cands[rec.choice]


def _timed(fn) -> float:
    """Seconds of fn on the GPU (CUDA events), where tuning runs."""
    return triton.testing.do_bench(fn, warmup=5, rep=25, return_mode="median") * 1e-3


def prefers_split(kernel, inputs: dict) -> bool:
    """Whether a plain call k(...) on CUDA runs as a decode: the cost model splits the keys or packs GQA heads
    for its shapes (MOA_SPLIT_KV=0 turns it off). Decided once per input shapes; a program decode does not take
    (a window-mixing or linear-form output, per-tile summaries ...) runs the plain kernel."""
    if os.environ.get("MOA_SPLIT_KV", "1") == "0":
        return False
    devices = {t.device.type for t in inputs.values() if isinstance(t, torch.Tensor)}
    return devices == {"cuda"} and split_preference(kernel, inputs) is not None


def split_preference(kernel, inputs: dict):
    """DecodeStats of the decode a plain call would run when it splits or packs and the cost model predicts it
    faster than the plain kernel (costing.cost: a prefill that fills the device stays plain), else None (memoised
    per input shapes, dtypes and devices; any refusal: None)."""
    key = tuple(sorted((n, (*t.shape, t.dtype, t.device)) for n, t in inputs.items() if torch.is_tensor(t)))
    memo = _PREFER.setdefault(kernel, {})
    if key not in memo:
        try:
            b = kernel.bind(inputs)
            kinds = {kernel.planner.run_kind(n, b.dims, batch=math.prod(b.batch)) for n in kernel.output_names}
            st = decode(kernel, inputs, plan_only=True) if kinds == {"tiled"} else None
            if st is not None and (st.splits > 1 or st.packed_heads > 1) and st.predicted_seconds is not None:
                plain = costing.cost(kernel, dtype=DTYPE_NAME[b.dtype], device=device_table_name(b.device),
                                     batch=b.batch, **{d.name: b.dims[d.name] for d in kernel.program.dims})
                st = st if st.predicted_seconds < plain.predicted_seconds else None
        except MoaError:
            st = None
        memo[key] = st if st is not None and (st.splits > 1 or st.packed_heads > 1) else None
    return memo[key]


def _gqa(kernel):
    """(GqaPack, Kernel of the packed block program) when the key reads are grouped (moa/gqa.py) and the packed
    program has kernels, else None (the calls run unpacked; _PACKED_WHY says why where it has none)."""
    if kernel not in _PACKED:
        plan, block = _plan(kernel)
        p = gqa.pack(plan)
        _PACKED[kernel] = None if p is None else (p, type(block)(p.program, p.outputs))
        try:
            _PACKED[kernel] and _PACKED[kernel][1].schedules   # every ONF of the packed program
        except UnsupportedError as e:   # a weight per K / V head read at the packed row, wk[a // q, k] ...
            _PACKED[kernel], _PACKED_WHY[kernel] = None, f"the packed program has no kernel: {e.message}"
    return _PACKED[kernel]


def _paged(b, call, cache_len, block_table, page_size, plan):
    page_size = page_size_of(page_size, block_table, "decode", call.mk)
    if not isinstance(block_table, torch.Tensor) or block_table.dtype not in (torch.int32, torch.int64) or \
            block_table.dim() < 1:
        raise InputError("decode: block_table must be an int32 or int64 tensor [..., pages per sequence]")
    pages = block_table.shape[-1]
    try:
        table = per_sequence(block_table, b.batch, 1).expand(*b.batch, pages)
    except RuntimeError:
        raise InputError(f"decode: block_table of shape {tuple(block_table.shape)} does not broadcast to the "
                         f"call's batch axes {tuple(b.batch)} (plus the pages axis)") from None
    npool = call.mk // page_size
    lens = lengths_per_batch(b, pages * page_size if cache_len is None else cache_len, "cache_len",
                             pages * page_size, f" (the block table's {pages} pages of {page_size} keys)")
    table = table.reshape(-1, pages)
    used = torch.arange(pages)[None, :] < (lens.cpu().to(torch.int64)[:, None] + page_size - 1) // page_size
    if bool((used & ((table.cpu() < 0) | (table.cpu() >= npool))).any()):   # entries past cache_len are never read
        raise InputError(f"decode: block_table entries must be pages 0 .. {npool - 1} of the pool (those holding "
                         "keys below cache_len; the rest may be any padding, e.g. -1); the pool is the key inputs' "
                         "key axis in pages: pool.flatten(-3, -2) of a [..., pages, page_size, d] pool")
    table = table.to(device=b.device, dtype=torch.int32).contiguous()
    return _Call(PAGED, call.nq, call.mk, call.nq, pages * page_size, cache_len=lens, block_table=table,
                 page=page_size)


def varlen_mix(sched, call, z: int, cfg) -> tuple | None:
    """((programs, key tiles) per sequence) of a varlen call (splitkv.split_seconds' mix), else None."""
    if call.mode not in VARLENS:
        return None
    cq, ck = call.cu_host
    return tuple((row_programs(sched, cq[s + 1] - cq[s], cfg.block_m) * z, cdiv(ck[s + 1] - ck[s], cfg.block_n))
                 for s in range(len(cq) - 1))


def _runnable(block, name: str, sched, varlen: bool):
    """The schedule a decode or varlen call runs when the model picks `sched`: a varlen call runs a residue
    schedule's tiled variant (its programs are not row tiles of one sequence)."""
    if varlen and sched.kind == onf.RESIDUE:
        return next(v for v in block.planner.variants[name] if v.kind != onf.RESIDUE)   # tiled comes first
    return sched


def call_schedules(block, plan, dims: dict, dtype: str, device: str, batch: int, varlen: bool = False) -> dict:
    """Output -> the schedule a decode (varlen) call of `block` at its dims (code-generation names) runs, as
    _run_output's plan picks it without an AOT fit: the model's choice for the whole call on `device` (h100 for
    the CPU), batch the product of the call's batch axes. The cost model counts every split in it."""
    dev = "h100" if str(device).lower() == "cpu" else str(device)
    return {o.name: _runnable(block, o.name, block.planner.schedule_for(o.name, dims, dtype, dev, batch, True),
                              varlen) for o in plan.outputs}


# long: one launch described top to bottom (config, splits, buffers, arguments, grid, merge)
def _run_output(block, name, b, plan, call: _Call, splits, dry: bool = False, merge: bool = True,
                defer: list | None = None):
    """(O, lse or z) of one block output over the whole call, and DecodeStats (dry: only the stats). merge=False:
    the partials unmerged, (O_s, lse_s) with the splits first (runtime/decode_merge.py merges them). defer: a
    list that takes the launch (source, args, constexprs, grid, name) instead of running it; the partials are
    written when the caller launches it (with the other branches, decode_merge.launch_branches)."""
    cb = block.planner.cg_binding(b)
    dt = b.dtype
    compute = compute_dtype(dt, b.device)
    acc_dt = torch.float64 if compute == torch.float64 else torch.float32
    pb, key = cb, block.planner.schedules[name].branches[0].extent
    if call.mode in (PAGED, VARLEN_PAGED) and key.is_Symbol:   # plan for the keys read, not the pool's size
        pb = dataclasses.replace(cb, dims={**cb.dims, key.name: call.keys if call.mode == PAGED else
                                           int(call.cu_host[1][-1])})
    p = block.launcher.plan(name, pb, decode_config(block.planner.schedules[name], pb.dims, DTYPE_NAME[dt])
                            if b.device.type == "cuda" else None, fills=True)   # the key splits fill the device
    if call.mode in (PAGED, VARLEN_PAGED) and p.config.block_n > call.page:   # a page holds whole key tiles
        p = block.launcher.plan(name, pb, dataclasses.replace(p.config, block_n=call.page), fills=True)
    if getattr(p.config, "tma", False):   # the grid kernel moves key pointers per split: plain loads
        p = block.launcher.plan(name, pb, dataclasses.replace(p.config, tma=False), fills=True)
    sched, cfg = _runnable(block, name, p.schedule, call.mode in VARLENS), p.config
    lead = [sy.evaluate(x, cb.dims) for _, x in sched.lead]
    e = sy.evaluate(sched.col[1], cb.dims)
    z = math.prod(b.batch) * math.prod(lead)
    rows = sy.evaluate(sched.row[1], cb.dims)   # the block's rows: nq, or the packed heads' rows
    ptiles = row_programs(sched, call.rows if call.mode in VARLENS else rows, cfg.block_m)
    key0, keys = 0, call.keys
    span = call_key_range(runner_schedules(block, plan), cb.dims) if call.mode == SPLIT else None
    if span is not None:   # split only the keys some row admits (a sliding window's last w keys)
        key0 = span[0] // cfg.block_n * cfg.block_n
        keys = max(0, span[1] + 1 - key0)
    ktiles = max(1, cdiv(keys, cfg.block_n))
    predicted = None
    if call.mode in (PAGED, VARLEN_PAGED):
        splits = ktiles * cfg.block_n // call.page   # one split per page
    elif splits is None:
        head = max(head_dims(sched, cb.dims) or [e])
        ch = choose_splits(ptiles * z * call.nseq, ktiles, cfg.block_m, cfg.block_n, head, e, z * rows,
                           DTYPE_NAME[dt], device_table_name(b.device), varlen_mix(sched, call, z, cfg))
        splits, predicted = ch.splits, ch.seconds
    splits = positive(splits, "splits")
    split_len = cdiv(ktiles, min(splits, ktiles)) * cfg.block_n
    splits = max(1, cdiv(keys, split_len))
    if dry:
        spec = block.launcher.spec(name, DTYPE_NAME[compute], len(b.batch), cfg, True, sched,
                                   exact_heads(block.planner.schedules[name], cb.dims))
        return None, DecodeStats(splits, split_len, (ptiles, z, call.nseq * splits), predicted, specs=(spec,),
                                 branch_sources=(_source(block, plan, spec, len(b.batch), len(lead), call.mode),))
    nq = call.nq
    o_part = torch.empty((splits, *b.batch, *lead, rows, e), dtype=compute if splits == 1 else acc_dt,
                         device=b.device)
    norm = name in norm_outputs(block)   # a split that runs no program contributes lse -inf, or z = 0
    lse_part = torch.full((splits, *b.batch, *lead, rows), 0.0 if norm else float("-inf"), dtype=acc_dt,
                          device=b.device)
    if (call.mode != SPLIT or keys == 0) and o_part.numel():
        o_part.zero_()   # a sequence (or a call) without keys runs no program: its rows are 0, as in a plain call
    grid = (ptiles, z, call.nseq * splits)
    info = DecodeStats(splits, split_len, grid, predicted)
    if o_part.numel() == 0 or z == 0:
        return ((o_part, lse_part) if not merge else (o_part[0], lse_part[0])), info
    spec = block.launcher.spec(name, DTYPE_NAME[compute], len(b.batch), cfg, True, sched,
                               exact_heads(block.planner.schedules[name], cb.dims))
    source = _source(block, plan, spec, len(b.batch), len(lead), call.mode)
    args, consts = block.launcher._arguments(spec, cb, compute, o_part[0], lse_part[0], cfg, e)
    if call.mode != SPLIT and spec.summaries:   # per sequence / batch index, over its valid keys
        replace_summaries(block, spec, cb, args, call, cfg)
    args += [o_part.stride(0), lse_part.stride(0)]
    if call.mode in VARLENS:
        args += list(call.cu)
        if call.mode == VARLEN_PAGED:
            args += [call.block_table, call.block_table.stride(0)]
    else:
        args += [nq, call.mk, b.dims[plan.r1.name] - 1] + ([key0] if call.mode == SPLIT else [])
        if call.mode != SPLIT:
            args += [math.prod(lead), call.cache_len]
        if call.mode == PAGED:
            args += [call.block_table, call.block_table.stride(0)]
    args.append(split_len)
    consts["NSPLIT"] = splits
    if defer is not None:
        defer.append((source, args, consts, grid, name))
        return (o_part, lse_part), info
    run(getattr(module_for(source, b.device), GRID_KERNEL), grid, args, consts, b.device,
        f"the split-KV kernel for output {name}")
    if not merge:
        return (o_part, lse_part), info
    if splits == 1:
        return (o_part[0], lse_part[0]), info
    return _merge(o_part, lse_part, norm, compute, e, name not in sum_outputs(block)), info


def runner_schedules(kernel, plan) -> list:
    """The schedules of every block output (of the block or the packed kernel), in plan order."""
    return [kernel.planner.schedules[o.name] for o in plan.outputs]


def decode_config(sched, dims: dict, dtype: str) -> Config:
    """Tiles of a decoding launch on a GPU: query tiles just covering the rows (packed heads x n_q, 16 .. 64),
    key tiles of 128 keys for head dims up to 64, 64 above, 8 warps, 3 stages to keep loads in flight (the key
    loop is bandwidth-bound). The AOT check (runtime/decode_aot.py) compiles these at d = 64 and 128
    without spills."""
    rows = sy.evaluate(sched.row[1], dims)
    head = max(head_dims(sched, dims))
    bm = min(64, sy.tile_width(rows))
    if dtype == "float64":
        return Config(min(bm, 32), 32, 4, 1)
    if dtype == "float32":
        return Config(bm, 32, 4, 2)
    return Config(bm, 128 if head <= 64 else 64, 8, 3)   # 4 warps: 254 registers at d = 64, spills paged at 128


def _source(block, plan, spec, nbatch: int, nlead: int, mode: str) -> str:
    """The block kernel with the grid kernel appended, memoised per spec."""
    memo = _SOURCES.setdefault(block, {})
    key = (spec.source, nbatch, nlead, mode)
    if key not in memo:
        view = block.planner.codegen
        cg_in = {u: c for c, u in view.inputs.items()}
        cg_dim = {u: c for c, u in view.dims.items()}
        decl = block.planner.cg_program.input_map
        q = {cg_in[n]: ax for n, (r, ax) in plan.roles.items() if r in (shard.QUERY, shard.BOTH)}
        k = {cg_in[n]: ax for n, (r, ax) in plan.roles.items() if r == shard.KEY}
        k.update({cg_in[plan.kv_copies[n]]: ax for n, (r, ax) in plan.roles.items() if r == shard.BOTH})
        dims = tuple(cg_dim[s.name] for s in (plan.n, plan.m, plan.nl, plan.ml, plan.r1, plan.c1))
        ranks = {n: len(decl[n].shape) for n in spec.inputs}
        memo[key] = grid_source(spec, ranks, Layout(q, k, nbatch, nlead, dims), mode)
    return memo[key]


def grid_sources(kernel, dtype: str = "float32", nbatch: int = 0, mode: str = SPLIT,
                 config: Config | None = None) -> list:
    """The split-KV (or varlen) kernel source of every block output, in the default schedule and `config`
    (default 16 x 64 tiles): what a decode / varlen call generates."""
    plan, block = _plan(kernel)
    cfg = config or Config(16, 64)
    out = []
    for o in plan.outputs:
        sched = block.schedules[o.name]
        spec = block.launcher.spec(o.name, dtype, nbatch, cfg, True, sched)
        out.append(_source(block, plan, spec, nbatch, len(sched.lead), mode))
    return out


def _merge(o_part, lse_part, norm: bool, compute, e: int, divide: bool = True):
    """(O, lse or z) merged over the splits by `_merge_splits` (codegen/splitkv.py); divide=False: a plain sum."""
    s = o_part.shape[0]
    out = torch.empty(o_part.shape[1:], dtype=compute, device=o_part.device)
    lse = torch.empty(lse_part.shape[1:], dtype=lse_part.dtype, device=o_part.device)
    rows = lse.numel()
    op, lp = o_part.reshape(s, rows, e), lse_part.reshape(s, rows)
    fn = getattr(module_for(MERGE_SOURCE, o_part.device), MERGE_KERNEL)
    block_r = 16
    consts = {"BLOCK_R": block_r, "BLOCK_E": sy.tile_width(e), "NORM": norm, "DIVIDE": divide}
    args = [op, op.stride(0), op.stride(1), lp, lp.stride(0), out.view(rows, e), e, lse.view(rows), rows, e, s]
    run(fn, (cdiv(rows, block_r),), args, consts, o_part.device, "the split-KV merge kernel")
    return out, lse


def _finish(kernel, plan, block, acc, b, nq, inputs):
    """The user outputs from the merged block outputs; `inputs` are the block program's (query sides of BOTH
    inputs included, their key copies left out of the epilogue's)."""
    qside = {n: t for n, t in inputs.items() if plan.roles.get(n, (shard.KEY,))[0] != shard.KEY}
    outs = _results(plan, block, acc, b, nq, qside)
    names = plan.output_names
    return outs[names[0]] if len(names) == 1 else outs
