"""Window-mixing programs across ranks (Blurry Window Attention, examples/bla.moa): a halo exchange, no rotation.

The softmax of a window program runs over W slots per query row, not over the key axis, so there is nothing to
merge by log-sum-exp; instead row i reads keys and values of rows i - r, r < W only (moa/shard.py `halo`: the
largest look-back, W - 1 for bla.moa). Rank r holds rows [r0, r0 + nl) of every sequence-sharded input and
receives the H = min(W - 1, r0) rows before them (the halo) of every input read with a look-back (K, V):

  who sends what   the halo of rank r is taken from ranks r - 1, r - 2, ... in turn, the last
                   min(rows still needed, nl_s) rows of each, until H rows are found: with shards of at least
                   W - 1 rows only rank r - 1 sends (to r, its last W - 1 rows); a shorter shard is spanned, the
                   ranks before it sending their part directly (known to every rank from the exchanged shapes).
  one round        every rank posts all its sends and receives in one batch_isend_irecv: no chain of dependent
                   hops, exactly the halo rows on the wire (sum over ranks of H_r rows of K and V).

The rank program (HaloPlan) reads a halo input at local index i - r + H and sees global rows everywhere else
(the guard i - r >= 0 and the slot mask j <= i), so the ordinary window kernel runs on the rank's rows only.
"""
from __future__ import annotations

import functools
import math
import time
import types
import weakref

import sympy as sp
import torch

from moa import shard, shard_halo
from moa import symbolic as sy
from moa.devices import DTYPE_BYTES, canonical_dtype
from moa.errors import InputError, UnsupportedError

from .binding import bind
from .costing import cost_breakdown
from .ring_comm import (RingError, RingStats, agree_or_raise, bind_check, comm_device, exchange_shapes, layout,
                        lengths, outcome, pack, post, unpack, wait)
from .ring_cost import INTERCONNECTS, LINK_LATENCY, aligned_shards, one_exchange_cost

_HALO_KERNELS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def halo_kernel(kernel):
    """(HaloPlan, Kernel of the rank program) when the program's outputs run the window-mixing kernel; None when
    none does (the softmax ring or the linear form applies)."""
    hit = _HALO_KERNELS.get(kernel)
    if hit is not None:
        return hit
    try:
        schedules = kernel.schedules
    except UnsupportedError:
        return None
    window = [n for n, s in schedules.items() if any(b.mix is not None for b in s.branches)]
    if not window:
        return None
    others = [n for n in schedules if n not in window]
    if others:
        raise UnsupportedError(f"ring attention: output{'s' if len(window) > 1 else ''} {', '.join(window)} run the "
                               f"window-mixing kernel (a halo exchange across ranks) but {', '.join(others)} do not; "
                               "a program mixing both is not supported across ranks")
    plan = shard_halo.halo(kernel.program, kernel.dnf)
    if {x.name for x in sp.sympify(plan.halo).free_symbols} - {plan.n.name}:
        raise UnsupportedError(f"ring attention: the look-back of {kernel.program.name}, {sy.show(plan.halo)} rows, "
                               "must depend on params and the sequence length only")
    rk = type(kernel)(plan.program, plan.outputs)
    for name in rk.output_names:
        if not rk.planner.is_window(name):
            raise UnsupportedError(f"ring attention, output {name}: with global row offsets the rank's program is no "
                                   "longer recognised as window-mixing")
    hit = (plan, rk)
    _HALO_KERNELS[kernel] = hit
    return hit


def halo_sources(lengths: list, halo: int) -> list:
    """For every rank, [(source rank, rows)] of its halo, nearest source first: the last rows of ranks r - 1,
    r - 2, ... until min(halo, rows before r) rows are found."""
    out = []
    for r in range(len(lengths)):
        need, srcs = min(halo, sum(lengths[:r])), []
        for s in range(r - 1, -1, -1):
            if need <= 0:
                break
            c = min(need, lengths[s])
            if c:
                srcs.append((s, c))
                need -= c
        out.append(srcs)
    return out


def _axis(prog, name, shape, ax):
    return len(shape) - prog.input_map[name].rank + ax


# long: the halo protocol step by step (every rank runs the same collective sequence)
def ring_halo(kernel, inputs: dict, group, timeout, stats: bool):
    """kernel.ring for window-mixing programs (see the module docstring); timeout already normalised."""
    import torch.distributed as dist   # optional part of torch: imported where the ring runs

    world, rank = dist.get_world_size(group), dist.get_rank(group)
    plan, rk = halo_kernel(kernel)
    prog = kernel.program
    cdev = comm_device(inputs, group)

    # 1. shapes: the same exchange and InputError on every rank as the softmax ring
    metas = exchange_shapes(prog, inputs, group, cdev, timeout, rank)
    roles = types.SimpleNamespace(roles={n: (shard.BOTH if r == shard_halo.HALO else r, ax)
                                         for n, (r, ax) in plan.roles.items()})
    nl, _, problems = lengths(roles, prog.input_map, metas)
    if problems:
        raise InputError("ring attention: shards do not match across ranks: " + "; ".join(problems) + " (a window "
                         "program across ranks needs every sequence-sharded input of a rank to hold the same rows)")
    rows0 = [sum(nl[:s]) for s in range(world)]
    gdims = {plan.n.name: sum(nl)}
    hmax = int(sy.evaluate(plan.halo, gdims))
    srcs = halo_sources(nl, hmax)
    h = sum(c for _, c in srcs[rank])
    dims = plan.block_dims(gdims, rows0[rank], nl[rank], h)
    names = plan.halo_inputs

    def shape_of(s, name, rows):   # rank s's shard of `name` with `rows` along the sequence axis
        shp = list(metas[s]["inputs"][name][0])
        shp[_axis(prog, name, shp, plan.roles[name][1])] = rows
        return shp

    # 2. bind on shapes alone (meta tensors): any rank's failure fails every rank
    fake = {n: torch.empty(t.shape, dtype=t.dtype, device="meta") for n, t in inputs.items()}
    for name in names:
        fake[name] = torch.empty(shape_of(rank, name, nl[rank] + h), dtype=inputs[name].dtype, device="meta")
    agree_or_raise(bind_check(plan.program, fake, dims), group, cdev, timeout, rank, "checking the shards")

    # 3. the halo exchange: one batch of point-to-point sends and receives
    st = RingStats(rank, world)
    dev = next(iter(inputs.values())).device
    dtypes = {name: metas[0]["inputs"][name][1] for name in names}

    def layout_of(s, rows):
        return layout(names, {nm: shape_of(s, nm, rows) for nm in names}, dtypes)

    def glob(r):
        return dist.get_global_rank(group, r) if group is not None else r

    ops, recvs = [], []
    for r in range(rank + 1, world):
        for s, c in srcs[r]:
            if s == rank:
                lay, total = layout_of(rank, c)
                if total:
                    tail = {nm: inputs[nm].narrow(_axis(prog, nm, inputs[nm].shape, plan.roles[nm][1]),
                                                  nl[rank] - c, c) for nm in names}
                    buf = pack(lay, total, tail, dev)
                    ops.append(dist.P2POp(dist.isend, buf, glob(r), group))
                    st.bytes_sent += total
    for s, c in srcs[rank]:
        lay, total = layout_of(s, c)
        buf = torch.empty(total, dtype=torch.uint8, device=dev)
        recvs.append((lay, buf))
        if total:
            ops.append(dist.P2POp(dist.irecv, buf, glob(s), group))
    what = (f"halo exchange (receiving {h} rows from rank{'s' if len(srcs[rank]) > 1 else ''} "
            f"{', '.join(str(s) for s, _ in srcs[rank]) or 'none'})")
    t1 = time.perf_counter()
    works = post(functools.partial(dist.batch_isend_irecv, ops), timeout, rank, what) if ops else []
    wait(works, timeout, rank, what)
    st.wait_seconds += time.perf_counter() - t1

    # 4. the window kernel on the rank's rows, its halo inputs extended by the rows received
    failed, outs = [], {}
    t0 = time.perf_counter()
    try:
        local = dict(inputs)
        for name in names:
            pos = _axis(prog, name, inputs[name].shape, plan.roles[name][1])
            parts = [unpack(lay, buf)[name] for lay, buf in reversed(recvs)]   # farthest rank first
            local[name] = torch.cat([*parts, inputs[name]], dim=pos) if parts else inputs[name]
        b = bind(plan.program, local, dims)
        for name in rk.output_names:
            outs[name] = _compute(rk, name, b)
        st.computed.append(rank)
    except Exception as e:  # re-raised below, after the others have been told
        failed.append(e)
    st.compute_seconds += time.perf_counter() - t0
    try:
        outcome(failed, group, cdev, timeout, rank, "agreeing on the outcome")
    except RingError:
        if failed:   # this rank's own failure explains the broken ring better
            raise failed[0] from None
        raise
    res = outs[rk.output_names[0]] if len(outs) == 1 else outs
    return (res, st) if stats else res


def _compute(rk, name, b):
    """One output of the rank program (a seam for fault tests)."""
    return rk.launcher.window(name, b)


# ---- cost: per-rank window kernel, the halo on the wire, not overlapped ----------------------------------------

def halo_ring_cost(kernel, ranks, interconnect, dtype, device, batch, shards, dims):
    """RingCost of ring_halo (runtime/ring.py ring_cost delegates here): each rank's window kernel (the cost
    model of the rank program at its offset) plus the halo: every rank sends its last rows to the ranks that
    need them, one round before the compute (not hidden)."""
    plan, rk = halo_kernel(kernel)
    dtype = canonical_dtype(dtype)
    bw, source = INTERCONNECTS[interconnect]
    n = dims[plan.n.name]
    nl = aligned_shards(n, ranks, shards, "a window program across ranks")
    rows0 = [sum(nl[:s]) for s in range(ranks)]
    hmax = int(sy.evaluate(plan.halo, dims))
    srcs = halo_sources(nl, hmax)
    nb = math.prod((batch,) if isinstance(batch, int) else tuple(batch))
    row_bytes = 0   # bytes per row of every halo input
    for name in plan.halo_inputs:
        node = kernel.program.input_map[name]
        per = math.prod(sy.evaluate(x, dims) for k, x in enumerate(node.shape) if k != plan.roles[name][1])
        row_bytes += per * (DTYPE_BYTES[dtype] if node.dtype == "float" else 8 if node.dtype == "int" else 1)
    sent = [0] * ranks
    for r in range(ranks):
        for s, c in srcs[r]:
            sent[s] += nb * c * row_bytes
    tx = [sum(nb * c * row_bytes / bw + LINK_LATENCY for _, c in srcs[r]) for r in range(ranks)]
    def rank_cost(r):
        h = sum(c for _, c in srcs[r])
        rep = cost_breakdown(rk, dtype=dtype, device=device, batch=batch, needed=False,
                             **plan.block_dims(dims, rows0[r], nl[r], h))[0]
        return rep.flops, rep.transcendentals, rep.dram_bytes, rep.predicted_seconds, rep

    single = cost_breakdown(kernel, dtype=dtype, device=device, batch=batch, needed=False, **dims)[0]
    return one_exchange_cost(ranks, interconnect, bw, source, device, dtype, nl, rank_cost, sent, tx,
                             ranks == 1 or max(tx) == 0, single, "halo")
