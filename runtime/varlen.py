"""Variable-length batches (FlashAttention's cu_seqlens layout): k.varlen runs the packed sequences of a batch in
one launch of the split-KV grid kernel (runtime/decode.py, codegen/splitkv.py VARLEN mode), every sequence with
its own lengths as the block program's dims, so masks written in local indices apply per sequence; programs past
a sequence's row tiles exit at once (no padding work)."""
from __future__ import annotations

import dataclasses
import numbers

import numpy as np
import torch

from moa import shard
from moa.codegen.splitkv import VARLEN, VARLEN_PAGED
from moa.errors import InputError

from . import decode_merge
from .binding import check_names, refuse_grad
from .decode import _Call, _finish, _global, _plan, _run_output, both_sides, lengths
from .decode_rows import bind_block, check_call_reads, check_replicated, page_size_of
from .device import check_device
from .launch import compute_dtype
from .ring import _results


# long: the checks of the packed layout (and the pages), then one launch per output
def varlen(kernel, inputs: dict, cu_seqlens_q, cu_seqlens_k, splits: int | None = None, stats: bool = False,
           plan_only: bool = False, block_table=None, page_size: int | None = None):
    """Every output of a packed batch of sequences: rows cu_seqlens_q[b] .. cu_seqlens_q[b + 1] - 1 of the query
    inputs attend to keys cu_seqlens_k[b] .. cu_seqlens_k[b + 1] - 1 of the key inputs, with local indices in
    each sequence; one launch, no padding (a program past its sequence's rows exits at once). plan_only: the
    DecodeStats of the call (its kernels in specs), nothing launched. block_table [sequences, pages] with
    page_size P: the key inputs are a pool of pages (as in a paged decode) and key j of sequence b, for j below
    its length cu_seqlens_k[b + 1] - cu_seqlens_k[b], lives in page block_table[b, j // P] at j % P."""
    refuse_grad(inputs)
    check_names(kernel.program, inputs)
    plan, block = _plan(kernel)
    cu_q, cu_k, nq_max, mk_max = _check_cu(cu_seqlens_q, cu_seqlens_k, plan)
    check_replicated(kernel, plan, "varlen", "a packed batch has one length per sequence")
    nq, mk = lengths(kernel, inputs)
    paged = block_table is not None or page_size is not None
    if nq != int(cu_q[-1]) or (mk != int(cu_k[-1]) and not paged):
        raise InputError(f"varlen: the packed inputs hold {nq} query rows and {mk} keys, but cu_seqlens_q ends at "
                         f"{int(cu_q[-1])} and cu_seqlens_k at {int(cu_k[-1])}")
    table, page_size = _check_pages(block_table, page_size, cu_k, mk) if paged else (None, None)
    gdims, row0 = _global(plan, nq, mk) if plan.n != plan.m else ({plan.n.name: mk}, mk - nq)
    if plan.kv_copies:   # an input read by i and j, packed along the keys: each sequence's last rows are its queries
        rows = torch.cat([torch.arange(int(cu_k[s + 1]) - int(cu_q[s + 1] - cu_q[s]), int(cu_k[s + 1]))
                          for s in range(cu_q.numel() - 1)])
        if paged:   # logical row r of sequence s is pool key table[s, r // P] P + r % P
            seq = torch.repeat_interleave(torch.arange(cu_q.numel() - 1), cu_q.diff())
            r = rows - cu_k[seq]
            rows = table[seq, r // page_size].to(torch.int64) * page_size + r % page_size
        inputs = both_sides(kernel, plan, inputs, rows, mk, "varlen")
    b = bind_block(plan, inputs, plan.block_dims(gdims, row0, nq, 0, mk), "varlen")
    check_device(b.device)
    check_call_reads(kernel, b, {plan.n.name: nq_max, plan.m.name: mk_max} if plan.n != plan.m else
                     {plan.n.name: mk_max})
    dev = b.device
    cu = (cu_q.to(device=dev, dtype=torch.int32), cu_k.to(device=dev, dtype=torch.int32))
    call = _Call(VARLEN, nq, mk, nq_max, mk_max, cu_q.numel() - 1, cu, cu_host=(cu_q.tolist(), cu_k.tolist()))
    if paged:
        call = dataclasses.replace(call, mode=VARLEN_PAGED, keys=table.shape[1] * page_size, page=page_size,
                                   block_table=table.to(device=dev, dtype=torch.int32).contiguous())
    compute = compute_dtype(b.dtype, b.device)
    fused = {} if not plan.epilogues else decode_merge.packed_rows(plan, decode_merge.fused_epilogues(
        block, plan, len(b.batch), torch.float64 if compute == torch.float64 else torch.float32,
        frozenset().union(*[decode_merge.batched_inputs(plan, ep, b) for ep in plan.epilogues])))
    if plan_only:
        infos = []
        for o in plan.outputs:
            infos.append(_run_output(block, o.name, b, plan, call, splits, dry=True)[1])
            splits = infos[-1].splits
        deferred = tuple((k, x.branch_sources[0]) for k, (o, x) in enumerate(zip(plan.outputs, infos))
                         if plan.owner.get(o.name) in fused)
        return dataclasses.replace(infos[0], specs=tuple(x.specs[0] for x in infos), branch_sources=deferred)
    acc, info = {}, None
    pending = [] if fused else None   # the branches' grid kernels in one launch, merged with the epilogue
    for o in plan.outputs:
        keep = plan.owner.get(o.name) in fused
        acc[o.name], info = _run_output(block, o.name, b, plan, call, splits, merge=not keep,
                                        defer=pending if keep else None)
        splits = info.splits
    if fused:   # the epilogue on the packed rows, in the merge (runtime/decode_merge.py)
        res = decode_merge.finish_fused(plan, fused, acc, pending, b, compute)
    elif plan.epilogues and nq:   # the epilogue per sequence, on its own rows and dims, with torch ops
        res = _finish_per_sequence(kernel, plan, block, acc, inputs, cu_q.tolist(), cu_k.tolist(), paged)
    else:
        res = _finish(kernel, plan, block, acc, b, nq, inputs)
    return (res, info) if stats else res


def _finish_per_sequence(kernel, plan, block, acc, inputs, cq, ck, paged: bool = False):
    """The user outputs of a varlen call whose outputs have an epilogue: each sequence's merged branch rows and
    inputs bound with its own dims (as a call of its own), the epilogue evaluated, the rows concatenated."""
    decl = plan.program.input_map
    parts: dict = {}
    for s in range(len(cq) - 1):
        nq_s, mk_s = cq[s + 1] - cq[s], ck[s + 1] - ck[s]
        if nq_s == 0:
            continue
        seq, qside = {}, {}
        for name, t in inputs.items():
            role, axis = _role(plan, name)
            if role == shard.REPLICATED:
                seq[name] = qside[name] = t
                continue
            ax = t.dim() - len(decl[name].shape) + axis
            if role != shard.KEY:   # query rows packed by cu_q: a BOTH input's query side is its sequences' rows
                seq[name] = qside[name] = t.narrow(ax, cq[s], nq_s)
            elif paged:   # the epilogue reads no key: a stand-in of the sequence's length
                shape = list(t.shape)
                shape[ax] = mk_s
                seq[name] = t.narrow(ax, 0, 1).expand(shape)
            else:
                seq[name] = t.narrow(ax, ck[s], mk_s)
        gdims, row0 = _global(plan, nq_s, mk_s)
        b_s = bind_block(plan, seq, plan.block_dims(gdims, row0, nq_s, 0, mk_s), "varlen")
        acc_s = {n: (o.narrow(-2, cq[s], nq_s), t.narrow(-1, cq[s], nq_s)) for n, (o, t) in acc.items()}
        for name, out in _results(plan, block, acc_s, b_s, nq_s, qside).items():
            parts.setdefault(name, []).append(out)
    outs = {name: torch.cat(ps, dim=-2) for name, ps in parts.items()}
    names = plan.output_names
    return outs[names[0]] if len(names) == 1 else outs


def _role(plan, name: str) -> tuple:
    """(role, axis) of a block-program input: an input read by both indices is its query side (packed by the
    query rows), its travelling copy (`plan.kv_copies`) a key input (packed by the keys)."""
    if name in plan.roles:
        return plan.roles[name]
    return shard.KEY, plan.roles[plan.source_of(name)][1]


def _check_pages(block_table, page_size, cu_k, mk: int):
    """(block table on the CPU, int64; page_size as an int) of a paged varlen call, checked against the pool of mk
    keys."""
    page_size = page_size_of(page_size, block_table, "varlen", mk)
    nseq = cu_k.numel() - 1
    if not isinstance(block_table, torch.Tensor) or block_table.dtype not in (torch.int32, torch.int64) or \
            block_table.dim() != 2 or block_table.shape[0] != nseq:
        raise InputError(f"varlen: block_table must be an int32 or int64 tensor [{nseq} sequences, pages]")
    t = block_table.cpu().to(torch.int64)
    used = torch.arange(t.shape[1])[None, :] < (cu_k.diff()[:, None] + page_size - 1) // page_size
    if bool((used & ((t < 0) | (t >= mk // page_size))).any()):   # entries past a sequence's keys are never read
        raise InputError(f"varlen: block_table entries must be pages 0 .. {mk // page_size - 1} of the pool (those "
                         "holding a sequence's keys; the rest may be any padding, e.g. -1)")
    if bool((cu_k.diff() > t.shape[1] * page_size).any()):
        raise InputError(f"varlen: a sequence has more keys than its {t.shape[1]} pages of {page_size} hold")
    return t, page_size


def _check_cu(cu_q, cu_k, plan):
    out = []
    for name, cu in (("cu_seqlens_q", cu_q), ("cu_seqlens_k", cu_k)):
        if isinstance(cu, np.ndarray) and cu.dtype.kind in "iu":
            cu = torch.from_numpy(cu.astype(np.int64))
        if isinstance(cu, (list, tuple)) and all(isinstance(x, numbers.Integral) and not isinstance(x, bool)
                                                 for x in cu):
            cu = torch.tensor([int(x) for x in cu], dtype=torch.int64)   # a list, as cache_len takes one
        if not isinstance(cu, torch.Tensor) or cu.dim() != 1 or cu.dtype not in (torch.int32, torch.int64):
            raise InputError(f"varlen: {name} must be a 1-d int32 or int64 tensor (or a list of ints) of cumulative "
                             "lengths")
        c = cu.cpu().to(torch.int64)
        if c.numel() < 2:
            raise InputError(f"varlen: {name} must hold at least one sequence (0 and its end), got {c.tolist()}")
        if int(c[0]) != 0 or bool((c[1:] < c[:-1]).any()):
            raise InputError(f"varlen: {name} must start at 0 and never decrease, got {c.tolist()[:8]}")
        out.append(c)
    if out[0].numel() != out[1].numel():
        raise InputError(f"varlen: cu_seqlens_q has {out[0].numel() - 1} sequences and cu_seqlens_k "
                         f"{out[1].numel() - 1}")
    lq, lk = out[0].diff(), out[1].diff()
    if plan.n == plan.m and bool((lq > lk).any()):
        bad = int((lq > lk).nonzero()[0, 0])
        raise InputError(f"varlen: sequence {bad} has {int(lq[bad])} query rows and {int(lk[bad])} keys; the "
                         f"program uses one dim {plan.n} for both axes, so its queries are its last rows")
    return out[0], out[1], int(lq.max()), int(lk.max())
