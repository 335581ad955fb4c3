"""The cost of a decoding call (runtime/decode.py): every key split is the block program at its offsets, so the
cost model (runtime/costing.py) counts each split exactly as it counts a ring block (runtime/ring.py
ring_cost); the merge pass adds its reads and writes; the time is moa/splitkv.py's model of the split launch."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch

from moa import symbolic as sy
from moa.devices import DTYPE_BYTES, canonical_dtype
from moa import shard
from moa.errors import InputError
from moa.splitkv import call_key_range, choose_splits, split_seconds

from .cost_data import check_data
from .costing import cost_breakdown
from .decode import _global, _gqa, _plan, call_schedules, decode_config, runner_schedules
from .decode_merge import fused_counts, fused_epilogues, positional
from .binding import Binding
from .decode_rows import check_call_reads, check_replicated, page_size_of, per_sequence, positive, whole
from .decode_summaries import logical_keys
from .device import cdiv
from .tiling import row_programs


@dataclass(frozen=True)
class DecodeCost:
    """Predicted cost of k.decode at given dims. flops, transcendentals, dram_bytes: the split launch (every split
    counted by the cost model) plus the merge pass; kv_bytes: the K/V bytes the call reads (the keys from the tile
    holding the first key some row admits to the last, of every K/V head, once: the whole cache without a mask,
    the window of a sliding window from its first tile; with cache_len or pages each batch index's valid keys),
    the numerator of the bandwidth target; predicted_seconds: moa/splitkv.py's time at
    `splits`, unsplit_seconds at 1."""
    splits: int
    split_len: int
    packed_heads: int
    flops: int
    transcendentals: int
    dram_bytes: int
    dram_bytes_loaded: int
    dram_bytes_stored: int
    merge_bytes: int
    kv_bytes: int
    tiles_visited: int
    predicted_seconds: float
    unsplit_seconds: float
    split_reports: tuple

    @property
    def kv_bandwidth(self) -> float:
        """KV bytes / predicted seconds (bytes per second)."""
        return self.kv_bytes / self.predicted_seconds


def fused_merges(plan, fused: dict, block, planner, splits: int, rows, cdims: dict, bd0: dict, dtype: str,
                 on_cpu: bool, extra: list) -> int:
    """Bytes of the merges with an epilogue fused (one per epilogue, at any splits; decode_merge.fused_counts),
    their counts added to extra (flops, transcendentals, loaded, stored); planner: whose branch schedules give
    the rows (rows(schedule): the merged rows) and columns."""
    merge = 0
    for ep in plan.epilogues if fused else ():
        so = planner.schedules[ep.branches[0]]
        counts = fused_counts(fused[ep.output], tuple(block.planner.schedules[b].branches[0].kind
                                                      for b in ep.branches), splits, rows(so),
                              sy.evaluate(so.col[1], cdims), bd0, shard.epilogue_program(plan, ep).input_map, dtype,
                              on_cpu)
        merge += sum(counts[2:])
        for k, v in enumerate(counts):
            extra[k] += v
    return merge


def key_bytes(plan, dtype: str, bd0: dict) -> int:
    """Bytes of one key of every key input, per batch index (integers as int64)."""
    per_key = 0
    for x in plan.key_inputs:
        node = plan.program.input_map[x]
        per = DTYPE_BYTES[dtype] if node.dtype == "float" else 8
        for ext in node.shape:
            per *= 1 if ext == plan.ml else sy.evaluate(ext, bd0)
        per_key += per
    return per_key


# long: config, packing, splits, then every split's report and the merge, in the order decode runs them
def decode_cost(kernel, nq: int, m: int, splits: int | None = None, dtype="bf16", device="h100", batch=(),
                pack_heads: bool | None = None, config=None, page_size: int | None = None, cache_len=None,
                inputs: dict | None = None, block_table=None, **dims) -> DecodeCost:
    """DecodeCost of a decoding call with nq query rows against m cached keys; dims: the program's other dims
    (d, e, heads ...). config: the block kernel's tiles (default: the runtime's CUDA table). page_size: a paged
    cache (one split per page, key tiles of at most a page); m is then the pages' keys of one batch index.
    cache_len: the valid keys per batch index (a list over the flattened batch, one per index of the leading
    batch axis as decode aligns a [B] tensor, or one int for all).
    inputs: the integer / boolean inputs a mask reads, as passed to decode (document ids along the keys): the
    tiles their per-tile summaries skip are counted on them. With pages, the key data are pools as passed to
    decode and block_table (as passed to decode) says where each batch index's keys lie."""
    plan, block = _plan(kernel)
    if cache_len is not None or page_size is not None:   # the call refuses a table sized by the sequence then
        check_replicated(kernel, plan, "decode_cost", "with cache_len each batch index has a length of its own",
                         by_index=True)
    dtype = canonical_dtype(dtype)
    nq, m = whole(nq, "nq", "decode_cost"), whole(m, "m", "decode_cost")
    if nq < 1 or m < 1:
        raise InputError(f"decode_cost: nq and m must be at least 1 (a call without query rows or keys launches "
                         f"nothing), got nq={nq}, m={m}")
    if plan.n == plan.m and nq > m:
        raise InputError(f"decode_cost: {nq} query rows against {m} keys; the program uses one dim {plan.n} for both "
                         "axes, so the queries are the last rows of the keys (nq <= m)")
    if splits is not None:
        positive(splits, "splits", "decode_cost")
    check_data(kernel.program, inputs, "decode_cost")
    unknown = sorted(set(dims) - {d.name for d in kernel.program.dims})
    if unknown:   # named in the program's terms (the block program's dims are its own)
        raise InputError(f"decode_cost: unknown dim{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}; "
                         f"{kernel.program.name} has {', '.join(d.name for d in kernel.program.dims)}")
    if isinstance(cache_len, torch.Tensor) and cache_len.dim() > 0:
        cache_len = cache_len.tolist()
    if cache_len is not None:   # integers, as decode takes them (a float was truncated)
        cache_len = [whole(x, "cache_len", "decode_cost") for x in cache_len] if isinstance(cache_len, (list, tuple)) \
            else whole(cache_len, "cache_len", "decode_cost")
    if page_size is not None or block_table is not None:
        page_size = page_size_of(page_size, block_table, "decode_cost", table=False)
    gdims, row0 = _global(plan, nq, m)
    base = {**dims, **gdims}
    missing = sorted(d.name for d in kernel.program.dims if d.name not in base)
    if missing:
        raise InputError(f"decode_cost needs every dim of {kernel.program.name}; missing {', '.join(missing)}")
    batch = (batch,) if isinstance(batch, int) else tuple(batch)
    packed = _gqa(kernel) if pack_heads is not False else None
    bd0 = plan.block_dims(base, row0, nq, 0, m)
    if packed is not None and pack_heads is None and sy.evaluate(packed[0].group, bd0) * nq > 128:
        packed = None
    runner = block if packed is None else packed[1]
    group = 1 if packed is None else sy.evaluate(packed[0].group, bd0)
    name = plan.outputs[0].name
    sched = runner.planner.schedules[name]
    cdims = {c: bd0[u] for c, u in runner.planner.codegen.dims.items() if u in bd0}   # codegen names
    if config is None and str(device).lower() == "cpu":   # the interpreter's tiles, as a CPU decode runs
        config = runner.planner.launch_config(name, torch.device("cpu"), dtype, cdims)
    cfg = config or decode_config(sched, cdims, dtype)
    if page_size:
        cfg = dataclasses.replace(cfg, block_n=min(cfg.block_n, page_size))
    lead = [sy.evaluate(x, cdims) for _, x in sched.lead]
    rows = sy.evaluate(sched.row[1], cdims)
    e = sy.evaluate(sched.col[1], cdims)
    head = max([sy.evaluate(b.dot.extent, cdims) for b in sched.branches if b.dot is not None] + [e])
    z = 1
    for x in (*batch, *lead):
        z *= x
    ptiles = row_programs(sched, rows, cfg.block_m)
    span = None if page_size or cache_len is not None else \
        call_key_range(runner_schedules(runner, plan), cdims)   # as decode splits a whole cache
    key0 = 0 if span is None else span[0] // cfg.block_n * cfg.block_n
    keys = m if span is None else max(0, span[1] + 1 - key0)
    ktiles = max(1, cdiv(keys, cfg.block_n))
    args = (ptiles * z, ktiles, cfg.block_m, cfg.block_n, head, e, z * rows, dtype,
            "h100" if str(device).lower() == "cpu" else device)
    splits = cdiv(m, page_size) if page_size else splits or choose_splits(*args).splits
    split_len = cdiv(ktiles, min(splits, ktiles)) * cfg.block_n
    splits = max(1, cdiv(keys, split_len))
    nbatch = 1
    for x in batch:
        nbatch *= x
    if cache_len is None and not page_size:
        groups = [(batch, m, splits)]   # (batch of the reports, valid keys, splits that run)
    else:
        lens = [m] * nbatch if cache_len is None else \
            [int(cache_len)] * nbatch if isinstance(cache_len, int) else [int(x) for x in cache_len]
        if len(batch) > 1 and len(lens) == batch[0] != nbatch:   # per sequence, aligned as decode aligns them
            lens = per_sequence(torch.tensor(lens), batch).expand(tuple(batch)).reshape(-1).tolist()
        if len(lens) != nbatch or any(not 0 <= x <= m for x in lens):
            raise InputError(f"decode_cost: cache_len needs {nbatch} lengths in 0 .. {m}, got {lens}")
        groups = [((), x, cdiv(x, split_len)) for x in lens] if inputs else \
            [((lens.count(x),), x, cdiv(x, split_len)) for x in sorted(set(lens))]   # one length costs the same
    if plan.n == plan.m and min(x for _, x, _ in groups) < nq:
        raise InputError(f"decode_cost: a cache_len is below the {nq} query rows; the program uses one dim {plan.n} "
                         "for both axes, so the queries are the last rows of the valid keys")
    for length in sorted({x for _, x, _ in groups}):   # the reads decode refuses, at each valid length
        gl = _global(plan, nq, length)[0]
        check_call_reads(kernel, Binding({**dims, **gl}, (), torch.float64, torch.device("cpu"), {}), gl)
    zlead = z // nbatch
    reports = []   # per group and split that runs, over every block output (cost_breakdown sums the outputs)
    extra = [0, 0, 0, 0]   # flops, transcendentals, loaded, stored beyond the block programs' reports
    if inputs and page_size and block_table is None:
        raise InputError("decode_cost(inputs=...) with pages needs the block_table the call reads the pools "
                         "through")
    table = None if not (inputs and page_size) else _flat_table(block_table, batch)
    data = split_data(kernel, plan, inputs, nq, batch, table, page_size or 0, dims)
    run = call_schedules(runner, plan, cdims, dtype, device, nbatch)
    for g, (gbatch, length, runs) in enumerate(groups):
        zg = zlead * math.prod(gbatch)
        gd, r0 = _global(plan, nq, length)
        for s in range(runs):
            c0 = key0 + s * split_len
            ml = min(split_len, length - c0)
            bd = plan.block_dims({**dims, **gd}, r0, nq, c0, ml)
            part = None if data is None else \
                {n: f(None if gbatch == batch else g, length, c0, ml) for n, f in data.items()}
            reports.append(cost_breakdown(runner, dtype=dtype, device=device, config=cfg, batch=gbatch,
                                          needed=False, inputs=part, schedules=run, **bd)[0])
        for o in plan.outputs:   # each split that runs stores its lse (z) and its partial
            so = runner.planner.schedules[o.name]
            ro, eo = sy.evaluate(so.row[1], cdims), sy.evaluate(so.col[1], cdims)
            for k, v in enumerate(_lse_counts(runs, row_programs(so, ro, cfg.block_m) * zg, cfg.block_m, zg * ro,
                                              eo, so.branches[0].kind != "softmax", dtype, device, splits)):
                extra[k] += v
    longest = cdiv(max([r.tiles_visited for r in reports] + [0]), ptiles * z)
    per_length = (page_size or cache_len is not None) and positional(plan)   # the epilogue by torch, per length
    fused = {} if per_length else _fused(block, plan, batch, dtype)
    merge = 0   # bytes of the merge passes
    for o in plan.outputs:
        so = runner.planner.schedules[o.name]
        ro, eo = sy.evaluate(so.row[1], cdims), sy.evaluate(so.col[1], cdims)
        if splits > 1 and plan.owner.get(o.name) not in fused:
            counts = merge_counts(splits, z * ro, eo, so.branches[0].kind, dtype, device)
            merge += sum(counts[2:])
            for k, v in enumerate(counts):
                extra[k] += v
        if page_size or cache_len is not None:   # every program reads its valid length (and page number), int32
            extra[2] += (8 if page_size else 4) * splits * row_programs(so, ro, cfg.block_m) * z
    merge += fused_merges(plan, fused, block, runner.planner, splits, lambda so: z * sy.evaluate(so.row[1], cdims),
                          cdims, bd0, dtype, str(device).lower() == "cpu", extra)
    per_key = key_bytes(plan, dtype, bd0)
    kv = per_key * keys * nbatch if cache_len is None and not page_size else \
        per_key * sum(length * math.prod(gb) for gb, length, _ in groups)
    tdev = "h100" if str(device).lower() == "cpu" else device
    args = (*args[:-1], tdev)
    t = split_seconds(splits, *args, longest=longest)
    loaded = sum(r.dram_bytes_loaded for r in reports) + extra[2]
    stored = sum(r.dram_bytes_stored for r in reports) + extra[3]
    return DecodeCost(splits, split_len, group, sum(r.flops for r in reports) + extra[0],
                      sum(r.transcendentals for r in reports) + extra[1], loaded + stored, loaded, stored, merge, kv,
                      sum(r.tiles_visited for r in reports), t, split_seconds(1, *args, longest=ktiles),
                      tuple(reports))


def _fused(block, plan, batch: tuple, dtype: str) -> dict:
    """The fused merges a decode runs (runtime/decode_merge.py), with the epilogue's query-side inputs read per
    batch index and its replicated inputs (a gate's weights) shared by the batch (as passed without batch axes;
    decode_merge.batched_inputs)."""
    if not plan.epilogues:
        return {}
    batched = frozenset(n for n, (r, _) in plan.roles.items() if r != shard.REPLICATED) if batch else frozenset()
    return fused_epilogues(block, plan, len(batch), torch.float64 if dtype == "float64" else torch.float32, batched)


def _bytes(dtype: str, device) -> tuple[int, int]:
    """(output element bytes, accumulation bytes) of a launch: the interpreter computes bf16 in fp32."""
    compute = "float32" if dtype == "bfloat16" and str(device).lower() == "cpu" else dtype
    return DTYPE_BYTES[compute], 8 if dtype == "float64" else 4


def _lse_counts(splits, programs, block_m, rows, e, norm, dtype, device, merged=None) -> tuple:
    """What each of `splits` splits that run adds to its block program's report: the lse (z) store of STORE_LSE,
    lse = (m + log2 l) ln 2 on every lane (1 log2, 2 flops), and the partial O in the accumulation dtype when
    the call's `merged` splits (default: these) are more than one."""
    eb, acc = _bytes(dtype, device)
    stored = splits * rows * acc + (splits * rows * e * (acc - eb) if (merged or splits) > 1 else 0)
    if norm:
        return 0, 0, 0, stored
    return splits * programs * block_m * 2, splits * programs * block_m, 0, stored


def merge_counts(splits: int, rows: int, e: int, kind: str, dtype: str, device="h100") -> tuple:
    """(flops, transcendentals, bytes loaded, bytes stored) of `_merge_splits` (codegen/splitkv.py) over `rows`
    rows, counted as the instrumented interpreter counts: arithmetic on every lane of a [16, BLOCK_E] block, loads
    and stores of the valid lanes. Softmax: per split a max, a subtraction, an exp, the weighted add (2 lanes per
    element) and the normaliser's add; then the division and log. Normalize: no max, exp or log; a plain sum
    (kind 'sum') no division either."""
    norm = kind != "softmax"
    eb, acc = _bytes(dtype, device)
    br, be = 16, sy.tile_width(e)
    programs = cdiv(rows, br)
    loaded = splits * rows * (e + (1 if norm else 2)) * acc
    stored = rows * (e * eb + acc)
    if norm:
        return programs * (splits * (2 * br * be + br) + (br * be if kind == "norm" else 0)), 0, loaded, stored
    return programs * (splits * (2 * br * be + 3 * br) + br * be + br), programs * br * (splits + 1), loaded, stored


def _flat_table(block_table, batch: tuple) -> torch.Tensor:
    """The block table broadcast to the batch, [flattened batch, pages] int64 (as decode reads it)."""
    t = torch.as_tensor(block_table).to(torch.int64).cpu()
    try:
        return per_sequence(t, batch, 1).expand(*batch, t.shape[-1]).reshape(-1, t.shape[-1])
    except RuntimeError:
        raise InputError(f"decode_cost: block_table of shape {tuple(t.shape)} does not broadcast to the batch "
                         f"{tuple(batch)}") from None


# long: one closure per role, each reading the data as the grid kernel's summaries and loads see it
def split_data(kernel, plan, inputs: dict | None, nq: int, batch: tuple, table=None, page: int = 0,
               dims: dict | None = None):
    """Block input name -> f(batch index or None for all, valid keys L, c0, ml): a mask's integer / boolean input
    as a decode binds it for the split of keys [c0, c0 + ml): key inputs (and the key copy of an input read by
    both indices) those keys, the query side of the latter rows L - nq .. L - 1, query inputs whole, replicated
    inputs (a block table blk[i // B, j // B], read at logical positions) their leading part at the global dims of
    L valid keys (dims: the call's own). table ([flattened batch, pages], with page): the key data are pools, read
    in each batch index's logical key order through the table, as the paged launch summarises them
    (runtime/decode_summaries.py)."""
    if not inputs:
        return None
    decl = kernel.program.input_map
    out = {}
    for name, x in inputs.items():
        if name not in plan.roles:
            raise InputError(f"decode_cost(inputs=...): {name!r} is not an input of {kernel.program.name}")
        t = torch.as_tensor(x)
        rank = len(decl[name].shape)
        try:
            t = t.expand((*batch, *t.shape[t.dim() - rank:]))
        except RuntimeError:
            raise InputError(f"decode_cost(inputs=...): {name} of shape {tuple(t.shape)} does not broadcast to "
                             f"the batch {tuple(batch)}") from None
        role, axis = plan.roles[name]
        if table is not None and role in (shard.KEY, shard.BOTH):
            t = logical_keys(t, len(batch), axis, batch, table, page)
        flat = t.reshape(-1, *t.shape[len(batch):])

        def pick(b, t=t, flat=flat):
            return t if b is None else flat[b]

        def rows(b, start, size, axis=axis, pick=pick):
            return pick(b).narrow((len(batch) if b is None else 0) + axis, start, size)
        if role == shard.QUERY or role == shard.REPLICATED and dims is None:
            out[name] = lambda b, L, c0, ml, pick=pick: pick(b)
            continue
        if role == shard.REPLICATED:   # its extents at the valid length: a table over the cache, read below L
            out[name] = lambda b, L, c0, ml, pick=pick, shape=decl[name].shape: _leading(
                pick(b), [int(sy.evaluate(e, {**dims, **_global(plan, nq, L)[0]})) for e in shape])
            continue
        out[plan.kv_copies.get(name, name)] = lambda b, L, c0, ml, rows=rows: rows(b, c0, ml)
        if role == shard.BOTH:
            out[name] = lambda b, L, c0, ml, rows=rows: rows(b, L - nq, nq)
    return out


def _leading(t: torch.Tensor, own: list) -> torch.Tensor:
    """t with its last len(own) axes narrowed to `own` where they are longer (the part a shorter call reads)."""
    lead = t.dim() - len(own)
    for k, ext in enumerate(own):
        if t.shape[lead + k] > ext >= 0:
            t = t.narrow(lead + k, 0, ext)
    return t
