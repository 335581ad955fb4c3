"""Linear forms across ranks: causal normalize(...) @ V attention (power, gated power, linear attention) with the
sequence sharded over P ranks, and no K/V rotation.

Rank r holds rows [r0, r0 + nl) of the sequence axis, for queries and keys alike (moa/shard.py `aligned`: the
rank program reads its shards with local indices and everything else with global ones). With phi the feature
map and G the gate (gb of moa/linear.py; 0 when not gated), the state carried to row i is
S_i = sum_{j <= i} e^(G_i - G_j) phi(k_j) v_j^T (z likewise with v = 1), so

  rank total     T_r = sum_{j in shard r} e^(G_{b_r} - G_j) phi(k_j) v_j^T,   b_r = the shard's last row
  incoming       S_in(r) = sum_{s < r} e^(G_{b_{r-1}} - G_{b_s}) T_s   (an exclusive prefix over ranks;
                 computed as the chunk scan does: S <- e^(G_{b_s} - G_{b_s'}) S + T_s over s < r in order)

and the rank's chunked form runs with S_in as the state before its first chunk, relative to G at row r0 - 1
(= G_{b_{r-1}}). The totals come from the scan kernel (FINAL: the state after the last chunk); one all_gather
of (T_r [Z, D, e], z_r [Z, D], G_{b_r} [Z]) per rank gives every rank the totals of the ranks before it.
All_gather rather than a sequential pass: one collective of P x state bytes instead of P - 1 dependent steps.
"""
from __future__ import annotations

import math
import time
import weakref

import torch

from moa import shard
from moa import symbolic as sy
from moa.devices import canonical_dtype
from moa.errors import InputError, UnsupportedError

from .binding import bind
from .costing import cost, linear_pass
from .launch import compute_dtype
from .linear_run import LinearRunner
from .ring_comm import (RingError, RingStats, agree_or_raise, bind_check, comm_device, exchange_shapes, lengths,
                        outcome, post, wait)
from .ring_cost import INTERCONNECTS, LINK_LATENCY, aligned_shards, one_exchange_cost
from .tiling import DTYPE_NAME

TOTAL_FLAGS = {"INIT": 0, "PREFIX": 0, "FINAL": 1}   # the scan that gives a rank's total and stores no prefix


def rank_launches(has_prev: bool, need_total: bool) -> list:
    """(kernel, flags) of the launches of one non-empty rank, in order (ring_linear): the scan giving its total
    (storing the prefix too when no rank before holds rows), the scan from the carried state, the output."""
    out = []
    if need_total:
        out.append(("_chunk_scan", {**TOTAL_FLAGS, "PREFIX": int(not has_prev)}))
    if has_prev or not need_total:
        out.append(("_chunk_scan", {"INIT": int(has_prev), "PREFIX": 1, "FINAL": 0}))
    return out + [("_chunk_out", {"INIT": int(has_prev), "PREFIX": 1, "FINAL": 0})]
_RANK_KERNELS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def linear_kernel(kernel):
    """(AlignedPlan, Kernel of the rank program) when the program's outputs are normalize(...) @ V with a linear
    form; None otherwise: no output has a normalize branch, or one has no linear form (then the K/V rotation
    applies, normalize partials merging by sums; `linear_refusal` says why)."""
    hit = _RANK_KERNELS.get(kernel)
    if hit is None:
        hit = _linear(kernel)
        _RANK_KERNELS[kernel] = hit
    return None if hit[0] is None else hit


def linear_refusal(kernel) -> str | None:
    """Why the program has no linear form across ranks (None when it has one, or has no normalize output)."""
    linear_kernel(kernel)
    hit = _RANK_KERNELS[kernel]
    return hit[1] if hit[0] is None and len(hit) == 2 else None


def _linear(kernel):
    """(plan, rank kernel), or (None,) / (None, why): cached by linear_kernel."""
    try:
        schedules = kernel.schedules
    except UnsupportedError:
        return (None,)   # the softmax ring's block program reports what it cannot compile
    if not any(b.kind == "norm" for s in schedules.values() for b in s.branches):
        return (None,)
    for name, (lp, why) in kernel.planner.linear_plans.items():
        if lp is None:
            return (None, f"output {name}: {why}")
    try:
        plan = shard.aligned(kernel.program, kernel.dnf)
    except UnsupportedError as e:
        return (None, str(e))
    rank = type(kernel)(plan.program, plan.outputs, form="linear")
    for name, (lp, why) in rank.planner.linear_plans.items():
        if lp is None:
            return (None, f"output {name}: with global row offsets the rank's program has no linear form: {why}")
    return (plan, rank)


# long: the linear-form protocol step by step (every rank runs the same collectives)
def ring_linear(kernel, inputs: dict, group, timeout, stats: bool):
    """kernel.ring for programs with a linear form (see the module docstring); timeout already normalised."""
    import torch.distributed as dist   # optional part of torch: imported where the ring runs

    world, rank = dist.get_world_size(group), dist.get_rank(group)
    plan, rk = linear_kernel(kernel)
    prog = kernel.program
    decl = prog.input_map
    cdev = comm_device(inputs, group)

    # 1. shapes: the same exchange and InputError on every rank as the softmax ring
    metas = exchange_shapes(prog, inputs, group, cdev, timeout, rank)
    nl, ml, problems = lengths(plan, decl, metas)
    problems += [f"rank {s}: {nl[s]} query rows but {ml[s]} keys; the linear form across ranks needs each rank's "
                 "query and key shards to be the same rows" for s in range(world) if nl[s] != ml[s]]
    if problems:
        raise InputError("ring attention: shards do not match across ranks: " + "; ".join(problems))
    rows0 = [sum(nl[:s]) for s in range(world)]
    dims = plan.block_dims({plan.n.name: sum(nl)}, rows0[rank], nl[rank])

    # 2. bind on shapes alone (meta tensors): any rank's failure fails every rank
    fake = {n: torch.empty(t.shape, dtype=t.dtype, device="meta") for n, t in inputs.items()}
    agree_or_raise(bind_check(plan.program, fake, dims), group, cdev, timeout, rank, "checking the shards")

    # 3. this rank's total (the scan computes the chunk states)
    st = RingStats(rank, world)
    has_prev = any(nl[s] for s in range(rank))
    need_total = nl[rank] > 0 and any(nl[s] for s in range(rank + 1, world))
    names = list(rk.output_names)
    launches, failed = {}, []
    t0 = time.perf_counter()
    try:
        b = bind(plan.program, inputs, dims)
        dt = b.dtype
        compute = compute_dtype(dt, b.device)
        cgb = rk.planner.cg_binding(b)
        for name in names:
            runner = LinearRunner(rk.planner.cg_program, rk.planner.linear_plans[name][0])
            cfg = runner.launch_config(cgb.device, DTYPE_NAME[compute], len(cgb.batch), cgb.dims, cgb.batch, ring=True)
            L = runner.prepare(cgb, compute, DTYPE_NAME[compute], cfg)
            launches[name] = (runner, L)
            if not L.empty:
                if need_total:   # without a prefix from before, the exclusive prefix is stored in the same pass
                    runner.scan(L, init=False, prefix=not has_prev, final=True)
    except Exception as e:  # re-raised below, after the others have been told
        failed.append(e)
    st.compute_seconds += time.perf_counter() - t0
    try:
        outcome(failed, group, cdev, timeout, rank, "computing the shard states")
        # 4. the exclusive prefix over ranks: all_gather of every rank's total
        gated = {nm: rk.planner.linear_plans[nm][0].gb is not None for nm in names}
        sizes = {nm: (L.zl, L.nfeat, L.e) for nm, (_, L) in launches.items()}
        acc = torch.float64 if compute == torch.float64 else torch.float32
        payload = torch.cat([_total(launches[nm][1], gated[nm], need_total, acc) for nm in names]).to(cdev)
        t1 = time.perf_counter()
        if payload.numel():
            parts = [torch.empty_like(payload) for _ in range(world)]
            wait([post(lambda: dist.all_gather(parts, payload, group=group, async_op=True), timeout, rank,
                             "gathering the ranks' states")], timeout, rank, "gathering the ranks' states")
            st.bytes_sent = payload.numel() * payload.element_size() * (world - 1)
        else:
            parts = [payload] * world
        st.wait_seconds += time.perf_counter() - t1

        # 5. the incoming state, then the prefix and output kernels
        t0 = time.perf_counter()
        outs = {}
        try:
            off = 0
            for nm in names:
                runner, L = launches[nm]
                zl, nf, e = sizes[nm]
                width = zl * nf * e + zl * nf + (zl if gated[nm] else 0)
                if not L.empty and has_prev:
                    S, z, g = _incoming([p[off:off + width].to(L.out.device) for p in parts[:rank]],
                                        nl[:rank], zl, nf, e, gated[nm])
                    S0, z0, g0 = L.carry()
                    S0[..., :e].copy_(S)
                    z0.copy_(z)
                    if g is not None:
                        g0.copy_(g)
                    runner.scan(L, init=True, prefix=True, final=False)
                elif not L.empty and not need_total:
                    runner.scan(L)
                out = L.result() if L.empty else runner.output(L)
                outs[nm] = out if out.dtype == dt else out.to(dt)
                off += width
            st.computed.append(rank)
        except Exception as e:  # re-raised below, after the others have been told
            failed.append(e)
        st.compute_seconds += time.perf_counter() - t0
        outcome(failed, group, cdev, timeout, rank, "agreeing on the outcome")
    except RingError:
        if failed:   # this rank's own failure explains the broken ring better
            raise failed[0] from None
        raise
    res = outs[names[0]] if len(names) == 1 else outs
    return (res, st) if stats else res


def _total(L, gated, have, acc):
    """This rank's contribution to the all_gather: (T [Z, D, e], z [Z, D], G at the last row [Z]) flattened;
    zeros when no later rank needs it (the sizes must agree across ranks)."""
    width = L.zl * L.nfeat * L.e + L.zl * L.nfeat + (L.zl if gated else 0)
    if not have or L.carried is None:
        return torch.zeros(width, dtype=acc, device=L.out.device)
    S, z, g = L.carried
    parts = [S[..., :L.e].reshape(-1), z.reshape(-1)] + ([g.reshape(-1)] if gated else [])
    return torch.cat(parts)


def _incoming(parts, lengths, zl, nf, e, gated):
    """S_in, z_in, G of the last non-empty earlier rank: the exclusive prefix over ranks (module docstring)."""
    S = z = g = None
    for p, n in zip(parts, lengths):
        if not n:
            continue
        Ts = p[:zl * nf * e].view(zl, nf, e)
        zs = p[zl * nf * e:zl * nf * (e + 1)].view(zl, nf)
        gs = p[zl * nf * (e + 1):].view(zl) if gated else None
        if S is None:
            S, z = Ts.clone(), zs.clone()
        elif gated:
            f = torch.exp(gs - g)   # e^(G_{b_s} - G_{b_s'}): the decay from the previous rank's last row
            S, z = S * f[:, None, None] + Ts, z * f[:, None] + zs
        else:
            S, z = S + Ts, z + zs
        g = gs
    return S, z, g


# ---- cost: per-rank linear form, one all_gather of the states, no rotation ------------------------------------

def linear_ring_cost(kernel, ranks, interconnect, dtype, device, batch, shards, dims):
    """RingCost of ring_linear (runtime/ring.py ring_cost delegates here): each rank's chunked linear form (the
    cost model, runtime/costing.py, of the rank program with its global offset), every launch with the flags the
    rank runs it with (rank_launches: the total's scan with FINAL, its stores of the state; the scan and output
    after a carried state with INIT, their loads of it; on ranks that both take a carried state and give a total
    to later ranks, the extra scan pass); the link: one all_gather of (T_r, z_r,
    G_r) in the accumulator dtype, each rank sending (P - 1) x its state (a ring all_gather), between the two
    compute phases, so never hidden. The per-rank combination of the gathered states (P small tensor ops) is not
    counted."""
    plan, rk = linear_kernel(kernel)
    dtype = canonical_dtype(dtype)
    bw, source = INTERCONNECTS[interconnect]
    n = dims[plan.n.name]
    nl = aligned_shards(n, ranks, shards, "the linear form across ranks")
    rows0 = [sum(nl[:s]) for s in range(ranks)]
    nb = math.prod((batch,) if isinstance(batch, int) else tuple(batch))
    acc = 8 if dtype == "float64" else 4
    names = list(rk.output_names)

    def state(name, d):   # (Z without batch, D, e) of one output
        lp = rk.planner.linear_plans[name][0]
        return (math.prod(sy.evaluate(x, d) for _, x in lp.schedule.lead),
                lp.features(sy.evaluate(lp.branch.dot.extent, d)), sy.evaluate(lp.schedule.col[1], d))

    payload = 0   # bytes each rank puts into the all_gather
    for name in names:
        zl, feats, e = state(name, dims)
        payload += nb * zl * (feats * e + feats + (rk.planner.linear_plans[name][0].gb is not None)) * acc
    sent = payload * (ranks - 1)
    gather_s = (ranks - 1) * (payload / bw + LINK_LATENCY) if ranks > 1 else 0.0
    def rank_cost(r):
        bd = plan.block_dims(dims, rows0[r], nl[r])
        rep = cost(rk, dtype=dtype, device=device, batch=batch, **bd)
        if not nl[r]:
            return rep.flops, rep.transcendentals, rep.dram_bytes, rep.predicted_seconds, rep
        f = t = by = sec = 0
        for name in names:   # the launches ring_linear makes on this rank, with their flags
            xf, xt, xb, xs = linear_pass(rk, name, bd, batch, dtype, device, rank_launches(any(nl[:r]),
                                                                                           any(nl[r + 1:])))
            f, t, by, sec = f + xf, t + xt, by + xb, sec + xs
        return f, t, by, sec, rep

    single = cost(kernel, dtype=dtype, device=device, batch=batch, **dims)
    return one_exchange_cost(ranks, interconnect, bw, source, device, dtype, nl, rank_cost, [sent] * ranks,
                             [gather_s] * ranks, ranks == 1, single, "linear")
