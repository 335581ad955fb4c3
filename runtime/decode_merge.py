"""The merge of a decoding call's branch partials with the output's epilogue fused (codegen/splitkv_epilogue.py):
an output computed from several softmax branches (PiAttention's gate) runs as its branches' split launches and
one `_merge_epilogue` launch, which merges every branch over the splits and evaluates the epilogue on the merged
tiles, instead of one merge per branch and torch operations after them (runtime/epilogue_eval.py, still the path
of epilogues that are not elementwise in the branch values and the rows' inputs, of varlen calls, whose epilogue
is evaluated per sequence, and of the ring).

`fused_counts` counts the kernel as the instrumented interpreter executes it, for the cost model
(runtime/decode_cost.py)."""
from __future__ import annotations

import functools
import math
import weakref

import sympy as sp
import torch

from moa import dnf as D
from moa import shard
from moa import symbolic as sy
from moa.codegen.splitkv import BRANCHES_KERNEL, GRID_KERNEL, LAUNCH_OPTIONS, branches_source
from moa.codegen.splitkv_epilogue import FUSED_MERGE_KERNEL, fused_merge_source
from moa.devices import DTYPE_BYTES
from moa.errors import UnsupportedError

from . import epilogue_eval
from .cache import module_for
from .device import cdiv, run

_MEMO: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
BLOCK_R = 16
_TL = {torch.float64: "tl.float64", torch.float32: "tl.float32"}


def fused_epilogues(block, plan, nbatch: int, acc: torch.dtype, batched=frozenset()) -> dict:
    """User output -> FusedMerge for every epilogue of the plan when all of them fuse, else {} (the torch path;
    `why_not` says why). batched: the inputs that vary along the batch axes."""
    out = {}
    for ep in plan.epilogues:
        fm = _source(block, plan, ep, nbatch, acc, frozenset(batched))
        if isinstance(fm, str):
            return {}
        out[ep.output] = fm
    return out


def why_not(block, plan, nbatch: int = 0, acc: torch.dtype = torch.float32) -> str | None:
    """Why the epilogues of the plan are evaluated with torch ops after the merges, or None when they fuse."""
    for ep in plan.epilogues:
        fm = _source(block, plan, ep, nbatch, acc, frozenset())
        if isinstance(fm, str):
            return fm
    return None


def _source(block, plan, ep, nbatch: int, acc: torch.dtype, batched: frozenset):
    memo = _MEMO.setdefault(block, {})
    key = (ep.output, nbatch, acc, batched)
    if key not in memo:
        if not epilogue_eval.on_device(ep.expr):
            memo[key] = "the epilogue holds a softmax, normalize or log-sum-exp reduction of its own"
        else:
            decl = shard.epilogue_program(plan, ep).input_map
            kinds = tuple(block.planner.schedules[b].branches[0].kind for b in ep.branches)
            try:
                memo[key] = fused_merge_source(ep, decl, kinds, nbatch, _TL[acc], batched)
            except UnsupportedError as exc:
                memo[key] = str(exc)
    return memo[key]


def batched_inputs(plan, ep, b) -> frozenset:
    """The epilogue's inputs read at each row's batch index: the query side (rows of the call, which a decode
    with valid lengths gathers per batch index), and a replicated input (a gate's weights) whose bound tensor
    varies along the batch axes (non-zero batch strides); the cost model (decode_cost._fused) takes the same rule
    with replicated inputs shared."""
    nb = len(b.batch)
    out = set()
    for node in shard.epilogue_program(plan, ep).inputs:
        name = node.attrs[0]
        t = b.tensors.get(name)
        if name in ep.branches or t is None or not nb:
            continue
        full = t.expand(*b.batch, *t.shape[t.dim() - len(node.shape):])
        if plan.roles.get(name, (shard.REPLICATED,))[0] != shard.REPLICATED or \
                any(s != 0 and n > 1 for s, n in zip(full.stride()[:nb], full.shape[:nb])):
            out.add(name)
    return frozenset(out)


def finish_fused(plan, fused: dict, acc: dict, pending: list, b, compute: torch.dtype):
    """The user outputs of a call whose epilogues fuse: the branches' deferred grid launches run (together), each
    epilogue's fused merge over its branches' partials, other outputs as merged (one output: its tensor)."""
    launch_branches(pending, b.device)
    res = {o.name: acc[o.name][0].to(b.dtype) for o in plan.outputs if o.name not in plan.owner}
    for ep in plan.epilogues:
        res[ep.output] = run_fused(fused[ep.output], ep, acc, b, compute)
    return res[plan.output_names[0]] if len(plan.output_names) == 1 else {n: res[n] for n in plan.output_names}


def positional(plan) -> bool:
    """Whether an epilogue reads the row index as a number or a dim that differs per sequence (its length, offset):
    evaluated once for a call, it would take the call's values, not each sequence's."""
    local = {s.name for s in (plan.n, plan.m, plan.nl, plan.ml, plan.r1, plan.c1)}
    for ep in plan.epilogues:
        row = ep.vars[-2]
        for x in D.nodes(ep.expr):
            syms = x.expr.free_symbols if isinstance(x, D.Index) else \
                set().union(*(sp.sympify(i).free_symbols for i in x.index)) - {row} if isinstance(x, D.Read) else \
                sp.sympify(x.extent).free_symbols if isinstance(x, D.BINDERS) else set()
            if row in syms and isinstance(x, D.Index) or {s.name for s in syms} & local:
                return True
    return False


def packed_rows(plan, fused: dict) -> dict:
    """The fused merges of a varlen call, whose rows are every sequence's rows packed: `fused` when no epilogue
    reads a dim that differs per sequence (its lengths, offsets) or the row index as a number (a position of its
    own sequence), so that evaluating it on the packed rows is evaluating it per sequence; else {}."""
    return {} if fused and positional(plan) else fused


def launch_branches(pending: list, device) -> None:
    """Run the deferred grid launches of an epilogue's branches (runtime/decode.py _run_output(defer=)): one
    `_attn_branches` launch (codegen/splitkv.branches_source) when their grids' first two axes and launch options
    agree, else one launch each."""
    grids = {(g[0], g[1]) for _, _, _, g, _ in pending}
    options = {tuple(c.get(x) for x in LAUNCH_OPTIONS) for _, _, c, _, _ in pending}
    if len(pending) < 2 or len(grids) > 1 or len(options) > 1:
        for source, args, consts, grid, name in pending:
            if grid[2]:
                run(getattr(module_for(source, device), GRID_KERNEL), grid, args, consts, device,
                    f"the split-KV kernel for output {name}")
        return
    args, consts, offsets, total = [], {}, [], 0
    for k, (_, a, c, grid, _) in enumerate(pending):
        offsets += [total] if k else []
        total += grid[2]
        args += a
        consts.update({f"b{k}_{n}": v for n, v in c.items() if n not in LAUNCH_OPTIONS})
        consts.update({n: v for n, v in c.items() if n in LAUNCH_OPTIONS})
    if total == 0:
        return
    fn = getattr(module_for(_branches(tuple(p[0] for p in pending)), device), BRANCHES_KERNEL)
    run(fn, (*grids.pop(), total), args + offsets, consts, device, "the split-KV kernel of the branches")


@functools.lru_cache(maxsize=64)
def _branches(sources: tuple) -> str:
    return branches_source(list(sources))


def run_fused(fm, ep, parts: dict, b, compute: torch.dtype) -> torch.Tensor:
    """The epilogue's output [*batch, *lead, n, e] from its branches' partials parts[branch] = (O_s [splits, *batch,
    *lead, n, e], lse_s or z_s [splits, *batch, *lead, n]), merged and combined by one `_merge_epilogue` launch."""
    o0 = parts[ep.branches[0]][0]
    splits, e = o0.shape[0], o0.shape[-1]
    out = torch.empty(o0.shape[1:], dtype=compute, device=o0.device)
    rows = out.numel() // max(e, 1)
    if rows == 0 or e == 0:
        return out.to(b.dtype)
    args = []
    for br in ep.branches:
        o, lse = parts[br]
        op, lp = o.reshape(splits, rows, e), lse.reshape(splits, rows)
        args += [op, op.stride(0), op.stride(1), lp, lp.stride(0)]
    nb = len(b.batch)
    for name, rank in fm.inputs:
        t = b.tensors[name]
        t = t.expand(*b.batch, *t.shape[t.dim() - rank:])
        t = t.to(compute) if t.is_floating_point() else t if t.dtype == torch.bool else t.to(torch.int64)
        args += [t, *t.stride()[:nb], *t.stride()[nb:]]
    lead = [sy.evaluate(x, b.dims) for x in ep.extents[:-2]]
    args += [out.view(rows, e), e, rows, e, splits, o0.shape[-2], *lead, *b.batch]
    args += [b.dims[d] for d in fm.dims]
    consts = {"BLOCK_R": BLOCK_R, "BLOCK_E": sy.tile_width(e)}
    consts.update({c: sy.tile_width(sy.evaluate(ext, b.dims)) for c, ext in fm.reduces})
    fn = getattr(module_for(fm.source, o0.device), FUSED_MERGE_KERNEL)
    run(fn, (cdiv(rows, BLOCK_R),), args, consts, o0.device, "the split-KV merge with the fused epilogue")
    return out.to(b.dtype)


def fused_counts(fm, kinds: tuple, splits: int, rows: int, e: int, dims: dict, decl: dict, dtype: str,
                 on_cpu: bool) -> tuple:
    """(flops, transcendentals, bytes loaded, bytes stored) of one `_merge_epilogue` launch over `rows` rows of e
    columns, counted as the instrumented interpreter counts: arithmetic on every lane of the tiles it runs on,
    loads and stores of the valid lanes. Each branch's merge is `_merge_splits`' without the lse (no log, no
    lse store); then the epilogue's operations and loads as the emitter recorded them."""
    comp = DTYPE_BYTES["float32" if dtype == "bfloat16" and on_cpu else dtype]
    acc = 8 if dtype == "float64" else 4
    part = comp if splits == 1 else acc   # one split: the grid kernel's output in the compute dtype
    be = sy.tile_width(e)
    programs = cdiv(rows, BLOCK_R)
    flops = trans = loaded = 0
    for kind in kinds:   # each branch's merge: softmax, norm or sum (no division, and no normaliser: tidied away)
        norm = kind != "softmax"
        per = 2 * BLOCK_R * be + (0 if kind == "sum" else 1 if norm else 3) * BLOCK_R
        flops += programs * (splits * per + (BLOCK_R * be if kind != "sum" else 0))
        trans += 0 if norm else programs * BLOCK_R * splits
        loaded += splits * rows * (e * part + (1 if norm else 2) * acc)
    lanes = {"e": (be, e)}
    for k, (_, ext) in enumerate(fm.reduces):
        v = sy.evaluate(ext, dims)
        lanes[f"k{k}"] = (sy.tile_width(v), v)
    for shape, fl, tr, reduce in fm.ops:
        width = math.prod(lanes[x][0] for x in shape if x != "r")
        height = BLOCK_R if "r" in shape else 1
        n = height * width - height if reduce else height * width
        flops += programs * fl * n
        trans += programs * tr * n
    for name, shape in fm.loads:
        node = decl[name]
        eb = comp if node.dtype == "float" else 1 if node.dtype == "bool" else 8
        valid = math.prod(lanes[x][1] for x in shape if x != "r")
        loaded += (rows if "r" in shape else programs) * valid * eb
    return flops, trans, loaded, rows * e * comp
