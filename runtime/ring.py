"""Sequence-parallel ring attention on torch.distributed (NCCL on GPUs, gloo on CPUs).

Every rank holds a contiguous shard of the query axis and one of the key axis (moa/shard.py says which inputs
are which). The block program (the DNF with global offsets, moa/shard.py) runs on the rank's query shard
against each key shard in turn; key shards (K, V and every key-indexed input, packed into one buffer) travel
around the ring with `batch_isend_irecv`, the transfer of the next shard posted before the compute on the
current one. Each block returns (O, lse); partials merge with the log-sum-exp rule of the online-softmax
monoid:  m = max(l1, l2);  O = (O1 e^(l1-m) + O2 e^(l2-m)) / (e^(l1-m) + e^(l2-m));  lse = m + log(...).
A block with no admissible (i, j) (the tile analysis on the block's whole index box) is not computed; the
rotation still completes. A normalize(A) @ V block returns (O, z), z its normaliser, and merges by sums:
O = sum_k z_k O_k / sum_k z_k. Causal normalize(...) @ V outputs with a linear form (power, linear attention)
do not rotate: runtime/ring_linear.py carries their chunk states across ranks instead; window-mixing outputs
(Blurry Window Attention) do not either: runtime/ring_halo.py exchanges the W - 1 rows before each shard.

Faults: shapes are exchanged (all_gather) before anything else, so mismatched shards are an InputError on
every rank. A rank whose block raises keeps the rotation going and announces the failure at the end, so the
others raise RingError naming it at once; every wait is bounded by `timeout` (default: the process group's own
timeout), so a rank that dies or stalls makes the others fail with RingError instead of hanging.
"""
from __future__ import annotations

import functools
import time
import weakref

import torch

from moa import shard
from moa import symbolic as sy
from moa.codegen.emit import returns_total
from moa.devices import DTYPE_BYTES, canonical_dtype
from moa.errors import InputError, UnsupportedError

from . import epilogue_eval
from .binding import bind, refuse_grad
from .costing import cost_breakdown
from .dnf_eval import _DnfEval
from .reference import F64
from .ring_backward import backward_pass, needs_grad, train_reason
from .ring_comm import (DTYPES, RingError, RingStats, agree, agree_or_raise, bind_check, comm_device, geometry,
                        layout, pack, post, timeout_of, unpack, wait)
from .ring_cost import INTERCONNECTS, LINK_LATENCY, RingCost
from .ring_halo import halo_kernel, halo_ring_cost, ring_halo
from .ring_linear import linear_kernel, linear_ring_cost, ring_linear

__all__ = ["INTERCONNECTS", "RingCost", "RingError", "RingStats", "block_kernel", "merge", "ring", "ring_cost"]

# ---- the block kernel -------------------------------------------------------------------------------------

_PLANS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def block_kernel(kernel):
    """(ShardPlan, Kernel of the block program) of a kernel, built once."""
    hit = _PLANS.get(kernel)
    if hit is None:
        plan = shard.plan(kernel.program, kernel.dnf)
        block = type(kernel)(plan.program, plan.outputs)
        for name, s in block.schedules.items():
            if any(getattr(b, "mix", None) is not None for b in s.branches):
                raise UnsupportedError(f"ring attention: output {name} runs the window-mixing kernel, whose score "
                                       "reads keys outside the key shard; it runs across ranks by a halo exchange "
                                       "(runtime/ring_halo.py), not on the K/V rotation")
            if not returns_total(s):
                raise UnsupportedError(
                    f"ring attention: block output {name} is not a single softmax(S) @ V, normalize(A) @ V or "
                    "A @ V reduction; partials merge by log-sum-exp or by sums, which the kernel returns only "
                    "for those")
        if not any(r[0] in (shard.QUERY, shard.BOTH) for r in plan.roles.values()):
            raise UnsupportedError("ring attention: no input is indexed by the query axis (a bare row index i), "
                                   "so the rank's rows cannot be told from its inputs")
        hit = (plan, block)
        _PLANS[kernel] = hit
    return hit


def merge(o1, lse1, o2, lse2):
    """Log-sum-exp merge of partial attentions over disjoint key sets (rows with lse -inf contribute nothing)."""
    mx = torch.maximum(lse1, lse2)
    mx = torch.where(torch.isfinite(mx), mx, torch.zeros_like(mx))
    a1, a2 = torch.exp(lse1 - mx), torch.exp(lse2 - mx)
    den = a1 + a2
    ok = den > 0
    safe = torch.where(ok, den, torch.ones_like(den))
    o = (o1 * a1.unsqueeze(-1) + o2 * a2.unsqueeze(-1)) / safe.unsqueeze(-1)
    o = torch.where(ok.unsqueeze(-1), o, torch.zeros_like(o))
    lse = torch.where(ok, mx + torch.log(safe), torch.full_like(den, float("-inf")))
    return o, lse


def norm_outputs(block) -> set:
    """Block outputs that merge by sums: normalize(A) @ V (the kernel returns (O, z), z the normaliser; partials
    merge as (sum_k z_k O_k, sum_k z_k), divided once at the end) and plain sums A @ V (the kernel returns (O, 1):
    the same sums, not divided: sum_outputs)."""
    return {name for name, s in block.schedules.items() if s.branches[0].kind in ("norm", "sum")}


def sum_outputs(block) -> set:
    """Block outputs that are plain sums A @ V: their merged partials are not divided by the summed totals."""
    return {name for name, s in block.schedules.items() if s.branches[0].kind == "sum"}


def accumulate(acc, name, o, t, norm: bool):
    """Fold one block's (O, lse) or (O, z) into the running partial of an output."""
    o = o.to(t.dtype)
    if norm:
        part = (o * t.unsqueeze(-1), t)
        acc[name] = part if name not in acc else (acc[name][0] + part[0], acc[name][1] + part[1])
    else:
        acc[name] = (o, t) if name not in acc else merge(*acc[name], o, t)


def finish(acc, norm: set, sums: frozenset = frozenset()) -> dict:
    """The merged (O, total) of every output: normalize outputs divided by their summed normaliser (0 where it
    is 0, as in one process); plain sums as added."""
    out = {}
    for name, (o, t) in acc.items():
        if name in norm and name not in sums:
            ok = t != 0
            o = torch.where(ok.unsqueeze(-1), o / torch.where(ok, t, torch.ones_like(t)).unsqueeze(-1),
                            torch.zeros_like(o))
        out[name] = (o, t)
    return out


def _compute_block(block, names, b):
    """Run every output of the block program on one binding: name -> (O, lse), or (O, z) for a normalize output.
    (A seam for fault tests.)"""
    return {name: block.launcher.tiled(name, b, store_lse=True) for name in names}


# ---- the driver ---------------------------------------------------------------------------------------------


def ring(kernel, inputs: dict, group=None, timeout=None, stats: bool = False):
    """Ring attention over the ranks of `group` (default: the world). `inputs` are this rank's shards: query
    shard of every query-indexed input, key shard of every key-indexed input (K, V, ...), whole replicated
    inputs. Returns this rank's rows of every output (a tensor, or a dict for several outputs), and RingStats
    when stats=True. `timeout` (seconds or timedelta) bounds every wait; None uses the process group's.
    With inputs that require grad (grad mode on), the output is differentiable: its backward runs the fused
    backward kernels of the block program around the ring too (runtime/ring_backward.py)."""
    import torch.distributed as dist   # optional part of torch: imported where the ring runs

    train = needs_grad(inputs)
    if train:
        why = "the window-mixing and linear forms across ranks have no backward" \
            if halo_kernel(kernel) is not None or linear_kernel(kernel) is not None else \
            train_reason(*block_kernel(kernel), {n for n, t in inputs.items() if getattr(t, "requires_grad", False)})
        if why:
            refuse_grad(inputs, "ring attention's calls of this program", f"{why}; gather the shards and train "
                        "with k(...)")
    if not (dist.is_available() and dist.is_initialized()):
        raise RingError("ring attention needs torch.distributed initialised: call "
                        "torch.distributed.init_process_group(...) first (torchrun sets up the environment)")
    timeout = timeout_of(timeout)
    if halo_kernel(kernel) is not None:     # window-mixing (Blurry Window Attention): a halo exchange, no rotation
        return ring_halo(kernel, inputs, group, timeout, stats)
    if linear_kernel(kernel) is not None:   # normalize(...) @ V: the linear form across ranks, no rotation
        return ring_linear(kernel, inputs, group, timeout, stats)
    if train:
        names = list(inputs)
        held: dict = {}
        out = _RingTrain.apply(kernel, group, timeout, names, held, *(inputs[n] for n in names))
        return (out, held["stats"]) if stats else out
    plan, block, acc, b0, nl, qside, st = _rotate(kernel, inputs, group, timeout)
    outs = _results(plan, block, acc, b0, nl, qside)
    names = plan.output_names
    res = outs[names[0]] if len(names) == 1 else outs
    return (res, st) if stats else res


class _RingTrain(torch.autograd.Function):
    """The ring's forward keeps this rank's rows of every branch's merged O and total (lse, or Z); its backward
    runs the block program's fused backward kernels around the ring (runtime/ring_backward.py)."""

    @staticmethod
    def forward(ctx, kernel, group, timeout, names, held, *tensors):
        inputs = dict(zip(names, (t.detach() for t in tensors)))
        plan, block, acc, b0, nl, qside, st = _rotate(kernel, inputs, group, timeout)
        out = _results(plan, block, acc, b0, nl, qside)[plan.output_names[0]]
        branches = [o.name for o in plan.outputs]
        values = [x for name in branches for x in (acc[name] if name in acc else _empty(block, name, b0, nl))]
        held["stats"] = st
        ctx.ring = (kernel, group, timeout, names, branches, dict(b0.dims))
        ctx.save_for_backward(*tensors, *values)
        return out

    @staticmethod
    def backward(ctx, d_out):
        kernel, group, timeout, names, branches, dims = ctx.ring
        saved = ctx.saved_tensors
        tensors, vals = saved[:len(names)], saved[len(names):]
        values = {x: (vals[2 * k], vals[2 * k + 1]) for k, x in enumerate(branches)}
        plan, block = block_kernel(kernel)
        grads = backward_pass(kernel, plan, block, dict(zip(names, tensors)), values, d_out, dims, group, timeout)
        wanted = ctx.needs_input_grad[5:]
        return (None, None, None, None, None, *(grads.get(n) if w else None for n, w in zip(names, wanted)))


def _empty(block, name, b0, nl) -> tuple:
    """(O, total) of a block output no block computed on this rank (no admissible key for any of its rows): O is 0,
    the total that of no key (lse -inf, Z 0)."""
    s = block.schedules[name]
    lead = [sy.evaluate(x, b0.dims) for _, x in s.lead]
    acc = F64 if b0.dtype == F64 else torch.float32
    o = torch.zeros((*b0.batch, *lead, nl, sy.evaluate(s.col[1], b0.dims)), dtype=acc, device=b0.device)
    total = torch.full(o.shape[:-1], float("-inf") if s.branches[0].kind == "softmax" else 0.0, dtype=acc,
                       device=b0.device)
    return o, total


# long: the rotation protocol step by step (every rank runs the same collective sequence)
def _rotate(kernel, inputs: dict, group, timeout):
    """The K/V rotation: (plan, block kernel, the merged (O, total) of every block output, the rank's binding,
    its query length, its query-side inputs, RingStats)."""
    import torch.distributed as dist   # optional part of torch: imported where the ring runs

    world, rank = dist.get_world_size(group), dist.get_rank(group)
    plan, block = block_kernel(kernel)
    prog = kernel.program
    cdev = comm_device(inputs, group)

    # 1. every rank describes its shards; a local problem travels too, so that every rank raises it
    geo = geometry(plan, prog, inputs, group, cdev, timeout, rank)
    nl, ml, rows0, cols0, gdims, shapes, dtypes = (geo.nl, geo.ml, geo.rows0, geo.cols0, geo.gdims, geo.shapes,
                                                   geo.dtypes)

    # 2. bind every step's block on shapes alone (meta tensors): any rank's failure fails every rank
    keys = plan.key_inputs
    err = None
    for t in range(world):
        src = (rank - t) % world
        fake = {n: torch.empty(x.shape, dtype=x.dtype, device="meta") for n, x in _query_side(plan, inputs).items()}
        fake.update({bn: torch.empty(shapes[src][bn], dtype=DTYPES[dtypes[bn]], device="meta") for bn in keys})
        err = err or bind_check(plan.program, fake, plan.block_dims(gdims, rows0[rank], nl[rank], cols0[src], ml[src]))
    agree_or_raise(err, group, cdev, timeout, rank, "checking the blocks")

    # 3. the ring
    st = RingStats(rank, world)
    qside = _query_side(plan, inputs)
    dev = next(iter(inputs.values())).device
    layouts = [layout(keys, shapes[s], dtypes) for s in range(world)]
    own = {bn: inputs[plan.source_of(bn)] for bn in keys}
    cur = pack(*layouts[rank], own, dev)
    nxt_rank = dist.get_global_rank(group, (rank + 1) % world) if group is not None else (rank + 1) % world
    prv_rank = dist.get_global_rank(group, (rank - 1) % world) if group is not None else (rank - 1) % world
    names = [o.name for o in plan.outputs]
    norm = norm_outputs(block)
    b0 = bind(plan.program, {**qside, **own}, plan.block_dims(gdims, rows0[rank], nl[rank], cols0[rank], ml[rank]))
    acc: dict = {}
    failed: list = []   # a local failure keeps the rotation going, then is announced to every rank
    try:
        for t in range(world):
            src = (rank - t) % world
            step = (f"step {t + 1} of {world} (sending to rank {(rank + 1) % world}, receiving rank "
                    f"{(rank - t - 1) % world}'s key shard from rank {(rank - 1) % world})")
            works, nxt = [], None
            if t < world - 1:
                nxt = torch.empty(layouts[(rank - t - 1) % world][1], dtype=torch.uint8, device=dev)
                ops = []
                if cur.numel():
                    ops.append(dist.P2POp(dist.isend, cur, nxt_rank, group))
                    st.bytes_sent += cur.numel()
                if nxt.numel():
                    ops.append(dist.P2POp(dist.irecv, nxt, prv_rank, group))
                works = post(functools.partial(dist.batch_isend_irecv, ops), timeout, rank, step) if ops else []
            dims = plan.block_dims(gdims, rows0[rank], nl[rank], cols0[src], ml[src])
            t0 = time.perf_counter()
            if not failed:
                try:
                    if all(shard.pair_skipped(block.schedules[n], {**b0.dims, **dims}) for n in names):
                        st.skipped.append(src)
                    else:
                        b = b0 if t == 0 else bind(plan.program, {**qside, **unpack(layouts[src][0], cur)}, dims)
                        for name, (o, t) in _compute_block(block, names, b).items():
                            accumulate(acc, name, o, t, name in norm)
                        st.computed.append(src)
                except Exception as e:  # re-raised below, after the others have been told
                    failed.append(e)
            t1 = time.perf_counter()
            wait(works, timeout, rank, step)
            st.compute_seconds += t1 - t0
            st.wait_seconds += time.perf_counter() - t1
            if nxt is not None:
                cur = nxt
        why = None
        if failed:
            why = f"{type(failed[0]).__name__}: {(str(failed[0]).splitlines() or [''])[0][:300]}"
        status = agree(why, group, cdev, timeout, rank, "agreeing on the outcome")
    except RingError:
        if failed:   # this rank's own failure explains the broken ring better
            raise failed[0] from None
        raise
    if failed:
        raise failed[0]
    bad = [f"rank {s}: {m}" for s, m in enumerate(status) if m]
    if bad:
        raise RingError("ring attention failed on " + "; ".join(bad))
    return plan, block, finish(acc, norm, sum_outputs(block)), b0, nl[rank], qside, st




def _results(plan, block, acc, b0, nl, qside):
    """The rank's rows of every user output: merged blocks, and the epilogue of multi-branch outputs."""
    merged = {}
    for o in plan.outputs:
        # every block skipped: no admissible key for any of this rank's rows
        merged[o.name] = acc[o.name][0] if o.name in acc else _empty(block, o.name, b0, nl)[0]
    outs = {}
    for name in plan.output_names:
        ep = plan.epilogue_of(name)
        outs[name] = merged[name].to(b0.dtype) if ep is None else _epilogue(plan, ep, merged, qside, b0)
    return outs


def _epilogue(plan, ep, merged, qside, b0):
    """E(merged branches) on the rank's rows, evaluated from the DNF where the rows are, in the accumulation
    dtype (float32; float64 for float64 calls): runtime/epilogue_eval.py, no host round trip. An epilogue holding
    reductions of its own is evaluated on the CPU in float64 (it is O(rows e))."""
    prog = shard.epilogue_program(plan, ep)
    if epilogue_eval.on_device(ep.expr):
        compute = F64 if b0.dtype == F64 else torch.float32   # the kernels' accumulation dtype
        tensors = {**qside, **{b: merged[b] for b in ep.branches}}
        t = epilogue_eval.evaluate(prog, ep, tensors, {d.name: b0.dims[d.name] for d in prog.dims}, compute,
                                   b0.device)
        return t.to(b0.dtype)
    tensors = {n: t.cpu() for n, t in qside.items()}
    tensors.update({b: merged[b].cpu().to(F64) for b in ep.branches})
    b = bind(prog, tensors, {d.name: b0.dims[d.name] for d in prog.dims})
    ev = _DnfEval(prog, b)
    exts = [sy.evaluate(x, b.dims) for x in ep.extents]
    active = tuple((v, ext, None) for v, ext in zip(ep.vars, exts))
    t = ev.full(ev.ev(ep.expr, active), active)
    return t.expand(*b.batch, *exts).to(device=b0.device, dtype=b0.dtype)


def _query_side(plan, inputs):
    """Block inputs that stay on the rank: query shards and replicated tensors (user names)."""
    return {n: t for n, t in inputs.items() if plan.roles[n][0] != shard.KEY}


# long: the rotation's cost per rank and step, in the order the protocol runs them
def ring_cost(kernel, ranks: int, interconnect: str = "nvlink4", dtype: str = "bf16", device: str = "h100",
              batch=(), shards: tuple | None = None, **dims) -> RingCost:
    """Predicted cost of `kernel.ring` on `ranks` devices for concrete global dims (n, m, d, e, heads ...):
    the cost model (runtime/costing.py) of every (query shard, key shard) block program with its global offsets,
    plus the interconnect. shards = (query lengths, key lengths) per rank; default equal contiguous shards."""
    if interconnect not in INTERCONNECTS:
        raise InputError(f"unknown interconnect {interconnect!r}; known: {', '.join(INTERCONNECTS)}")
    if not isinstance(ranks, int) or ranks < 1:
        raise InputError(f"ranks must be a positive integer, got {ranks!r}")
    dtype = canonical_dtype(dtype)
    bw, source = INTERCONNECTS[interconnect]
    missing = sorted(d.name for d in kernel.program.dims if d.name not in dims)
    if missing:
        raise InputError(f"ring_cost needs every dim of {kernel.program.name}; missing {', '.join(missing)}")
    if halo_kernel(kernel) is not None:
        return halo_ring_cost(kernel, ranks, interconnect, dtype, device, batch, shards, dims)
    if linear_kernel(kernel) is not None:
        return linear_ring_cost(kernel, ranks, interconnect, dtype, device, batch, shards, dims)
    plan, block = block_kernel(kernel)
    n, m = dims[plan.n.name], dims[plan.m.name]
    if shards is None:
        nl = [n * (r + 1) // ranks - n * r // ranks for r in range(ranks)]
        ml = [m * (r + 1) // ranks - m * r // ranks for r in range(ranks)]
    else:
        nl, ml = list(shards[0]), list(shards[1])
        if len(nl) != ranks or len(ml) != ranks or sum(nl) != n or sum(ml) != m:
            raise InputError(f"shards must give {ranks} query lengths summing to {n} and {ranks} key lengths "
                             f"summing to {m}")
    rows0 = [sum(nl[:s]) for s in range(ranks)]
    cols0 = [sum(ml[:s]) for s in range(ranks)]
    nb = 1
    for x in ((batch,) if isinstance(batch, int) else tuple(batch)):
        nb *= x
    key_bytes = 0   # bytes per key of every travelling input (K, V, key-indexed inputs; ints as int64)
    for bn_ in plan.key_inputs:
        node = plan.program.input_map[bn_]
        per = 1
        for ext in node.shape:
            if ext != plan.ml:
                per *= sy.evaluate(ext, dims)
        key_bytes += per * (DTYPE_BYTES[dtype] if node.dtype == "float" else 8 if node.dtype == "int" else 1)
    names = [o.name for o in plan.outputs]
    cache: dict = {}
    flops, trans, dbytes, comp, step_comp, sent, step_sent, step_tx, exposed, reports = ([] for _ in range(10))
    skipped = 0
    for r in range(ranks):
        f = t_ = by = 0
        sc, ss, st_, rep = [], [], [], []
        for t in range(ranks):
            src = (r - t) % ranks
            bd = plan.block_dims(dims, rows0[r], nl[r], cols0[src], ml[src])
            if all(shard.pair_skipped(block.schedules[nm], bd) for nm in names):
                skipped += 1
                sc.append(0.0)
                rep.append(None)
            else:
                key = tuple(sorted(bd.items()))
                if key not in cache:
                    cache[key] = cost_breakdown(block, dtype=dtype, device=device, batch=batch, needed=False, **bd)[0]
                c = cache[key]
                f, t_, by = f + c.flops, t_ + c.transcendentals, by + c.dram_bytes
                sc.append(c.predicted_seconds)
                rep.append(c)
            nbytes = nb * key_bytes * ml[src] if t < ranks - 1 else 0
            ss.append(nbytes)
            st_.append(nbytes / bw + LINK_LATENCY if nbytes else 0.0)
        flops.append(f)
        trans.append(t_)
        dbytes.append(by)
        comp.append(sum(sc))
        step_comp.append(sc)
        sent.append(sum(ss))
        step_sent.append(ss)
        step_tx.append(st_)
        exposed.append(sum(max(0.0, x - c) for x, c in zip(st_, sc)))
        reports.append(rep)
    predicted = sum(max(max(step_comp[r][t], step_tx[r][t]) for r in range(ranks)) for t in range(ranks))
    single = cost_breakdown(kernel, dtype=dtype, device=device, batch=batch, needed=False, **dims)[0]
    return RingCost(ranks, interconnect, bw, source, device, dtype, flops, trans, dbytes, comp, step_comp, sent,
                    step_sent, step_tx, all(x == 0 for x in exposed), exposed, skipped, ranks * ranks,
                    predicted, single.flops, single.predicted_seconds, reports)
