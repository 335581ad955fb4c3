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

import datetime
import functools
import json
import time
import weakref
from dataclasses import dataclass, field

import torch

from moa import shard
from moa import symbolic as sy
from moa.errors import InputError, MoaError, UnsupportedError

from .binding import bind, check_offsets

ALIGN = 16  # byte alignment of each tensor inside the travelling buffer


class RingError(MoaError):
    """A rank of the ring raised, died or timed out. The process group cannot be used afterwards."""


@dataclass
class RingStats:
    """What one rank did: blocks computed and skipped (by key-shard source rank) and where time went."""
    rank: int
    world: int
    computed: list = field(default_factory=list)    # source ranks of the key shards computed
    skipped: list = field(default_factory=list)     # source ranks of the key shards skipped (no admissible pair)
    compute_seconds: float = 0.0
    wait_seconds: float = 0.0                       # time blocked on transfers after the compute (not hidden)
    bytes_sent: int = 0


# ---- the block kernel -------------------------------------------------------------------------------------

_PLANS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def block_kernel(kernel):
    """(ShardPlan, Kernel of the block program) of a kernel, built once."""
    hit = _PLANS.get(kernel)
    if hit is None:
        from .kernel import Kernel

        from moa.codegen.emit import returns_total

        plan = shard.plan(kernel.program, kernel.dnf)
        block = Kernel(plan.program, plan.outputs)
        for name, s in block.schedules.items():
            if any(getattr(b, "mix", None) is not None for b in s.branches):
                raise UnsupportedError(f"ring attention: output {name} runs the window-mixing kernel, whose score "
                                       "reads keys outside the key shard; it runs across ranks by a halo exchange "
                                       "(runtime/ring_halo.py), not on the K/V rotation")
            if not returns_total(s):
                raise UnsupportedError(
                    f"ring attention: block output {name} is not a single softmax(S) @ V or normalize(A) @ V "
                    "reduction; partials merge by log-sum-exp or by sums of the normaliser, which the kernel "
                    "returns only for those")
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
    """Block outputs that are normalize(A) @ V: the kernel returns (O, z), z the normaliser; partials merge by
    sums, (sum_k z_k O_k, sum_k z_k), divided once at the end."""
    return {name for name, s in block.schedules.items() if s.branches[0].kind == "norm"}


def accumulate(acc, name, o, t, norm: bool):
    """Fold one block's (O, lse) or (O, z) into the running partial of an output."""
    o = o.to(t.dtype)
    if norm:
        part = (o * t.unsqueeze(-1), t)
        acc[name] = part if name not in acc else (acc[name][0] + part[0], acc[name][1] + part[1])
    else:
        acc[name] = (o, t) if name not in acc else merge(*acc[name], o, t)


def finish(acc, norm: set) -> dict:
    """The merged (O, total) of every output: normalize outputs divided by their summed normaliser (0 where it
    is 0, as in one process)."""
    out = {}
    for name, (o, t) in acc.items():
        if name in norm:
            ok = t != 0
            o = torch.where(ok.unsqueeze(-1), o / torch.where(ok, t, torch.ones_like(t)).unsqueeze(-1),
                            torch.zeros_like(o))
        out[name] = (o, t)
    return out


def _compute_block(block, names, b):
    """Run every output of the block program on one binding: name -> (O, lse), or (O, z) for a normalize output.
    (A seam for fault tests.)"""
    return {name: block._run(name, b, store_lse=True) for name in names}


# ---- communication helpers ------------------------------------------------------------------------------------


def _timeout(t):
    if t is None:
        return None
    t = t if isinstance(t, datetime.timedelta) else datetime.timedelta(seconds=float(t))
    if t.total_seconds() <= 0:
        raise InputError(f"ring attention: timeout must be positive, got {t.total_seconds():g} s")
    return t


def _comm_error(e, timeout, rank, what):
    first = (str(e).strip().splitlines() or [type(e).__name__])[0].split(" This is typically")[0][:300]
    limit = f"{timeout.total_seconds():g} s" if timeout is not None else "the process group's timeout"
    return RingError(f"ring attention, rank {rank}: {what} failed: {first} Another rank of the ring raised, died "
                     f"or stalled (every wait is bounded by {limit}); the process group cannot be used for further "
                     "communication (destroy it)")


def _post(fn, timeout, rank, what):
    """Start communication; a backend failure (a peer already gone) becomes a RingError."""
    try:
        return fn()
    except RuntimeError as e:  # DistBackendError, closed connections
        raise _comm_error(e, timeout, rank, what) from e


def _wait(works, timeout, rank, what):
    for w in works:
        try:
            if timeout is None:
                w.wait()
            else:
                w.wait(timeout)
        except RuntimeError as e:  # DistBackendError, gloo timeouts and closed connections
            raise _comm_error(e, timeout, rank, what) from e


def _gather_json(obj, group, device, timeout, rank, what):
    """all_gather of a JSON-able object, every wait bounded by the timeout."""
    import torch.distributed as dist

    world = dist.get_world_size(group)
    data = torch.tensor(list(json.dumps(obj).encode()), dtype=torch.uint8, device=device)
    size = torch.tensor([data.numel()], dtype=torch.int64, device=device)
    sizes = [torch.zeros_like(size) for _ in range(world)]
    _wait([_post(lambda: dist.all_gather(sizes, size, group=group, async_op=True), timeout, rank, what)], timeout,
          rank, what)
    top = max(int(s.item()) for s in sizes)
    buf = torch.zeros(top, dtype=torch.uint8, device=device)
    buf[:data.numel()] = data
    bufs = [torch.zeros_like(buf) for _ in range(world)]
    _wait([_post(lambda: dist.all_gather(bufs, buf, group=group, async_op=True), timeout, rank, what)], timeout,
          rank, what)
    return [json.loads(bytes(x[:int(s.item())].cpu().tolist()).decode()) for x, s in zip(bufs, sizes)]


def _agree(msg, group, device, timeout, rank, what):
    """Every rank's problem (None when it has none), with one small collective when nobody has one."""
    import torch.distributed as dist

    world = dist.get_world_size(group)
    flag = torch.tensor([0 if msg is None else 1], dtype=torch.int64, device=device)
    flags = [torch.zeros_like(flag) for _ in range(world)]
    _wait([_post(lambda: dist.all_gather(flags, flag, group=group, async_op=True), timeout, rank, what)], timeout,
          rank, what)
    if not any(int(f.item()) for f in flags):
        return [None] * world
    return _gather_json(msg, group, device, timeout, rank, what)


_DTYPES = {str(d): d for d in (torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.int64,
                                torch.int32, torch.int16, torch.int8, torch.uint8, torch.bool)}


def _layout(names, shapes, dtypes):
    """Byte layout of the travelling buffer: [(name, offset, nbytes, shape, dtype)], total bytes."""
    out, off = [], 0
    for name in names:
        dt = _DTYPES[dtypes[name]]
        nb = _numel(shapes[name]) * torch.empty((), dtype=dt).element_size()
        out.append((name, off, nb, tuple(shapes[name]), dt))
        off += -(-nb // ALIGN) * ALIGN
    return out, off


def _numel(shape):
    n = 1
    for s in shape:
        n *= int(s)
    return n


def _pack(layout, total, tensors, device):
    buf = torch.empty(total, dtype=torch.uint8, device=device)
    for name, off, nb, _, _ in layout:
        if nb:
            buf[off:off + nb].copy_(tensors[name].contiguous().reshape(-1).view(torch.uint8))
    return buf


def _unpack(layout, buf):
    return {name: buf[off:off + nb].view(dt).view(shape) for name, off, nb, shape, dt in layout}


# ---- the driver ---------------------------------------------------------------------------------------------


def ring(kernel, inputs: dict, group=None, timeout=None, stats: bool = False):
    """Ring attention over the ranks of `group` (default: the world). `inputs` are this rank's shards: query
    shard of every query-indexed input, key shard of every key-indexed input (K, V, ...), whole replicated
    inputs. Returns this rank's rows of every output (a tensor, or a dict for several outputs), and RingStats
    when stats=True. `timeout` (seconds or timedelta) bounds every wait; None uses the process group's."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        raise RingError("ring attention needs torch.distributed initialised: call "
                        "torch.distributed.init_process_group(...) first (torchrun sets up the environment)")
    timeout = _timeout(timeout)
    from .ring_halo import halo_kernel, ring_halo
    from .ring_linear import linear_kernel, ring_linear

    if halo_kernel(kernel) is not None:     # window-mixing (Blurry Window Attention): a halo exchange, no rotation
        return ring_halo(kernel, inputs, group, timeout, stats)
    if linear_kernel(kernel) is not None:   # normalize(...) @ V: the linear form across ranks, no rotation
        return ring_linear(kernel, inputs, group, timeout, stats)
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    plan, block = block_kernel(kernel)
    prog = kernel.program
    decl = prog.input_map
    cdev = comm_device(inputs, group)

    # 1. every rank describes its shards; a local problem travels too, so that every rank raises it
    metas = exchange_shapes(prog, inputs, group, cdev, timeout, rank)
    nl, ml, problems = _lengths(plan, decl, metas)
    if problems:
        raise InputError("ring attention: shards do not match across ranks: " + "; ".join(problems))
    rows0 = [sum(nl[:s]) for s in range(world)]
    cols0 = [sum(ml[:s]) for s in range(world)]
    gdims = {plan.n.name: sum(nl), plan.m.name: sum(ml)}
    if plan.n == plan.m and sum(nl) != sum(ml):
        raise InputError(f"ring attention: the query shards hold {sum(nl)} rows in all but the key shards "
                         f"{sum(ml)} keys; {prog.name} uses the one dim {plan.n} for both")

    # 2. bind every step's block on shapes alone (meta tensors): any rank's failure fails every rank
    keys = plan.key_inputs
    shapes = [{bn: metas[s]["inputs"][plan.source_of(bn)][0] for bn in keys} for s in range(world)]
    dtypes = {bn: metas[0]["inputs"][plan.source_of(bn)][1] for bn in keys}
    err = None
    for t in range(world):
        src = (rank - t) % world
        fake = {n: torch.empty(x.shape, dtype=x.dtype, device="meta") for n, x in _query_side(plan, inputs).items()}
        fake.update({bn: torch.empty(shapes[src][bn], dtype=_DTYPES[dtypes[bn]], device="meta") for bn in keys})
        err = err or bind_check(plan.program, fake, plan.block_dims(gdims, rows0[rank], nl[rank], cols0[src], ml[src]))
    agree_or_raise(err, group, cdev, timeout, rank, "checking the blocks")

    # 3. the ring
    st = RingStats(rank, world)
    qside = _query_side(plan, inputs)
    dev = next(iter(inputs.values())).device
    layouts = [_layout(keys, shapes[s], dtypes) for s in range(world)]
    own = {bn: inputs[plan.source_of(bn)] for bn in keys}
    cur = _pack(*layouts[rank], own, dev)
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
                works = _post(functools.partial(dist.batch_isend_irecv, ops), timeout, rank, step) if ops else []
            dims = plan.block_dims(gdims, rows0[rank], nl[rank], cols0[src], ml[src])
            t0 = time.perf_counter()
            if not failed:
                try:
                    if all(shard.pair_skipped(block.schedules[n], {**b0.dims, **dims}) for n in names):
                        st.skipped.append(src)
                    else:
                        b = b0 if t == 0 else bind(plan.program, {**qside, **_unpack(layouts[src][0], cur)}, dims)
                        for name, (o, t) in _compute_block(block, names, b).items():
                            accumulate(acc, name, o, t, name in norm)
                        st.computed.append(src)
                except Exception as e:  # re-raised below, after the others have been told
                    failed.append(e)
            t1 = time.perf_counter()
            _wait(works, timeout, rank, step)
            st.compute_seconds += t1 - t0
            st.wait_seconds += time.perf_counter() - t1
            if nxt is not None:
                cur = nxt
        why = None
        if failed:
            why = f"{type(failed[0]).__name__}: {(str(failed[0]).splitlines() or [''])[0][:300]}"
        status = _agree(why, group, cdev, timeout, rank, "agreeing on the outcome")
    except RingError:
        if failed:   # this rank's own failure explains the broken ring better
            raise failed[0] from None
        raise
    if failed:
        raise failed[0]
    bad = [f"rank {s}: {m}" for s, m in enumerate(status) if m]
    if bad:
        raise RingError("ring attention failed on " + "; ".join(bad))
    outs = _results(plan, block, finish(acc, norm), b0, nl[rank], qside)
    names = plan.output_names
    res = outs[names[0]] if len(names) == 1 else outs
    return (res, st) if stats else res


def _results(plan, block, acc, b0, nl, qside):
    """The rank's rows of every user output: merged blocks, and the epilogue of multi-branch outputs."""
    merged = {}
    for o in plan.outputs:
        if o.name in acc:
            merged[o.name] = acc[o.name][0]
        else:  # every block skipped: no admissible key for any of this rank's rows
            s = block.schedules[o.name]
            lead = [sy.evaluate(x, b0.dims) for _, x in s.lead]
            e = sy.evaluate(s.col[1], b0.dims)
            merged[o.name] = torch.zeros((*b0.batch, *lead, nl, e), dtype=b0.dtype, device=b0.device)
    outs = {}
    for name in plan.output_names:
        ep = plan.epilogue_of(name)
        outs[name] = merged[name].to(b0.dtype) if ep is None else _epilogue(plan, ep, merged, qside, b0)
    return outs


def _epilogue(plan, ep, merged, qside, b0):
    """E(merged branches) on the rank's rows, evaluated from the DNF in float64 (on the CPU: it is O(rows e))."""
    from .dnf_eval import _DnfEval
    from .reference import F64

    prog = shard.epilogue_program(plan, ep)
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


def one_exchange_cost(ranks, interconnect, bw, source, device, dtype, nl, rank_cost, sent, tx, hidden, single,
                      form) -> "RingCost":
    """RingCost of a program whose ranks exchange once, then compute once (halo, linear form): rank_cost(r) ->
    (flops, transcendentals, DRAM bytes, seconds, CostReport) of a non-empty rank r; sent[r] and tx[r] its bytes
    and transfer time; the prediction is the slowest rank's transfer + compute."""
    rows = [rank_cost(r) if nl[r] else (0, 0, 0, 0.0, None) for r in range(ranks)]
    flops, trans, dbytes, comp, reports = (list(x) for x in zip(*rows))
    return RingCost(ranks, interconnect, bw, source, device, dtype, flops, trans, dbytes, comp, [[c] for c in comp],
                    sent, [[x] for x in sent], [[t] for t in tx], hidden, tx, sum(1 for x in nl if not x), ranks,
                    max(c + t for c, t in zip(comp, tx)), single.flops, single.predicted_seconds,
                    [[r] for r in reports], form=form)


def aligned_shards(n: int, ranks: int, shards, what: str) -> list:
    """Per-rank row counts for a cost prediction of a program whose query and key shards coincide: `shards`
    ((query lengths, key lengths) or None: as even as possible), checked."""
    if shards is None:
        return [n * (r + 1) // ranks - n * r // ranks for r in range(ranks)]
    nl = list(shards[0])
    if len(nl) != ranks or sum(nl) != n or (len(shards) > 1 and list(shards[1]) != nl):
        raise InputError(f"shards must give {ranks} lengths summing to {n}, the same for queries and keys ({what} "
                         "needs each rank's query and key shards to coincide)")
    return nl


def bind_check(program, fake: dict, dims: dict) -> str | None:
    """The InputError message of binding `program` to meta tensors `fake` at `dims` (shapes alone), or None."""
    try:
        check_offsets(program, bind(program, fake, dims))
    except InputError as e:
        return e.message
    return None


def agree_or_raise(err, group, cdev, timeout, rank, what) -> None:
    """Share every rank's local error (or None); raise the same InputError on every rank if any rank has one."""
    bad = [f"rank {s}: {m}" for s, m in enumerate(_agree(err, group, cdev, timeout, rank, what)) if m]
    if bad:
        raise InputError("ring attention: " + "; ".join(bad))


def comm_device(inputs, group):
    """The device collectives run on: the inputs' CUDA device under NCCL, else the CPU (gloo)."""
    import torch.distributed as dist

    devs = [t.device for t in inputs.values() if isinstance(t, torch.Tensor)]
    nccl = "nccl" in str(dist.get_backend(group))
    return devs[0] if devs and devs[0].type == "cuda" and nccl else torch.device("cpu")


def exchange_shapes(prog, inputs, group, cdev, timeout, rank) -> list:
    """Every rank's shard shapes and dtypes (one JSON all_gather); a rank's local problem (missing input, wrong
    rank ...) travels too and becomes the same InputError on every rank."""
    local_err = _local_check(prog, inputs)
    meta = {"error": local_err}
    if local_err is None:
        meta["inputs"] = {n: [list(t.shape), str(t.dtype)] for n, t in inputs.items()}
    metas = _gather_json(meta, group, cdev, timeout, rank, "exchanging shard shapes")
    bad = [f"rank {s}: {m['error']}" for s, m in enumerate(metas) if m["error"]]
    if bad:
        raise InputError("ring attention: " + "; ".join(bad))
    return metas


def _local_check(prog, inputs) -> str | None:
    decl = prog.input_map
    missing = [n for n in decl if n not in inputs]
    if missing:
        return f"missing input{'s' if len(missing) > 1 else ''} {', '.join(missing)}; {prog.name} takes " \
               f"{', '.join(decl)}"
    extra = [n for n in inputs if n not in decl]
    if extra:
        return f"unknown input{'s' if len(extra) > 1 else ''} {', '.join(extra)}; {prog.name} takes {', '.join(decl)}"
    for n, t in inputs.items():
        if not isinstance(t, torch.Tensor):
            return f"input {n} must be a torch.Tensor, got {type(t).__name__}"
        if t.dim() < decl[n].rank:
            return f"input {n} must have at least {decl[n].rank} axes, got shape {list(t.shape)}"
        if str(t.dtype) not in _DTYPES:
            return f"input {n} has dtype {t.dtype}, which moa does not take"
    if len({t.device for t in inputs.values()}) > 1:
        return "inputs are on different devices"
    return None


def _lengths(plan, decl, metas):
    """Per-rank local query and key lengths from the gathered shapes, and every mismatch found."""
    world = len(metas)
    problems = []
    nl, ml = [None] * world, [None] * world
    for name, node in decl.items():
        role, ax = plan.roles[name]
        shp = [m["inputs"][name][0] for m in metas]
        dts = [m["inputs"][name][1] for m in metas]
        if len(set(dts)) > 1:
            problems.append(f"input {name} has dtype " + ", ".join(f"{d} on rank {s}" for s, d in enumerate(dts)))
        if len({len(s) for s in shp}) > 1:
            problems.append(f"input {name} has shape " + ", ".join(f"{s} on rank {r}" for r, s in enumerate(shp)))
            continue
        if role == shard.REPLICATED:
            if any(s != shp[0] for s in shp):
                problems.append(f"replicated input {name} must be the same on every rank, got shape "
                                + ", ".join(f"{s} on rank {r}" for r, s in enumerate(shp)))
            continue
        pos = len(shp[0]) - node.rank + ax
        rest = [s[:pos] + s[pos + 1:] for s in shp]
        if any(x != rest[0] for x in rest):
            problems.append(f"{role}-sharded input {name} may differ across ranks only in axis {ax} (the sharded "
                            "one), got shape " + ", ".join(f"{s} on rank {r}" for r, s in enumerate(shp)))
        for s in range(world):
            length = shp[s][pos]
            for kind, store in (((shard.QUERY,), nl), ((shard.KEY,), ml)):
                if role in kind or role == shard.BOTH:
                    if store[s] is None:
                        store[s] = (length, name)
                    elif store[s][0] != length:
                        what = "query" if store is nl else "key"
                        problems.append(f"rank {s}: the {what} shards disagree: {store[s][1]} has {store[s][0]} "
                                        f"along the sharded axis but {name} has {length}")
    nl = [x[0] if x else 0 for x in nl]
    ml = [x[0] if x else 0 for x in ml]
    return nl, ml, problems


# ---- cost: per-rank compute, bytes on the wire, and whether the transfer hides behind the compute ------------

# One-direction bandwidth of the link a rank sends its key shard over (the ring sends to one neighbour while
# receiving from the other: full duplex, so the per-direction figure bounds each step's transfer).
INTERCONNECTS = {
    "nvlink4": (450e9, "NVLink 4 (H100 SXM): 900 GB/s total bidirectional per GPU = 450 GB/s each way "
                       "(NVIDIA H100 Tensor Core GPU datasheet)"),
    "nvlink3": (300e9, "NVLink 3 (A100 SXM): 600 GB/s total bidirectional per GPU = 300 GB/s each way "
                       "(NVIDIA A100 Tensor Core GPU datasheet)"),
    "pcie5": (64e9, "PCIe 5.0 x16: 32 GT/s x 16 lanes, 128b/130b encoding = 63 GB/s each way (PCI-SIG PCIe 5.0 "
                    "base specification)"),
    "pcie4": (32e9, "PCIe 4.0 x16: 16 GT/s x 16 lanes, 128b/130b encoding = 31.5 GB/s each way (PCI-SIG PCIe 4.0 "
                    "base specification)"),
    "ib_ndr": (50e9, "InfiniBand NDR: 400 Gb/s per port = 50 GB/s each way (NVIDIA ConnectX-7 / Quantum-2 "
                     "product briefs)"),
    "ib_hdr": (25e9, "InfiniBand HDR: 200 Gb/s per port = 25 GB/s each way (NVIDIA ConnectX-6 product brief)"),
}
LINK_LATENCY = 10e-6  # seconds per step and message: an assumption (a few us of NCCL p2p launch + wire latency)

@dataclass
class RingCost:
    """Predicted ring attention on `ranks` devices (equal contiguous shards unless given). Lists are per rank;
    step lists are per rank and ring step (step t computes the key shard of rank (r - t) mod P)."""
    ranks: int
    interconnect: str
    interconnect_bandwidth: float          # bytes/s, one direction
    interconnect_source: str
    device: str
    dtype: str
    flops: list                            # per rank, over its computed blocks
    transcendentals: list
    dram_bytes: list
    compute_seconds: list                  # per rank
    step_compute_seconds: list             # [rank][step] (0 for a skipped block)
    bytes_sent: list                       # per rank, over the P - 1 transfers
    step_bytes_sent: list                  # [rank][step] (0 at the last step)
    step_transfer_seconds: list            # [rank][step]
    hides: bool                            # every transfer no longer than the compute it overlaps
    exposed_seconds: list                  # per rank: transfer time not hidden behind compute
    blocks_skipped: int                    # (query shard, key shard) pairs with no admissible (i, j)
    blocks_total: int
    predicted_seconds: float               # lockstep ring: sum over steps of the slowest rank's max(compute, send)
    single_device_flops: float             # the same program on one device (for comparison)
    single_device_seconds: float
    blocks: list = field(default_factory=list)   # [rank][step] CostReport of the block (None: skipped)
    form: str = "softmax"                  # "linear": one step per rank, the all_gather of the states (ring_linear);
                                           # "halo": one step per rank, the halo rows sent before it (ring_halo)

    def summary(self) -> str:
        if self.form == "halo":
            return (f"halo exchange across {self.ranks} x {self.device} ({self.dtype}), {self.interconnect} "
                    f"{self.interconnect_bandwidth / 1e9:g} GB/s each way: per-rank FLOPs "
                    f"{min(self.flops):.3g}..{max(self.flops):.3g}, halo bytes sent per rank "
                    f"{max(self.bytes_sent):.3g} ({max(self.exposed_seconds) * 1e6:.1f} us, before the compute), no "
                    f"K/V rotation, predicted {self.predicted_seconds * 1e6:.1f} us")
        if self.form == "linear":
            return (f"linear form across {self.ranks} x {self.device} ({self.dtype}), {self.interconnect} "
                    f"{self.interconnect_bandwidth / 1e9:g} GB/s each way: per-rank FLOPs "
                    f"{min(self.flops):.3g}..{max(self.flops):.3g}, all_gather of the states: bytes sent per rank "
                    f"{max(self.bytes_sent):.3g} ({max(self.exposed_seconds) * 1e6:.1f} us, not overlapped), no "
                    f"K/V rotation, predicted {self.predicted_seconds * 1e6:.1f} us")
        return (f"ring on {self.ranks} x {self.device} ({self.dtype}), {self.interconnect} "
                f"{self.interconnect_bandwidth / 1e9:g} GB/s each way: per-rank FLOPs "
                f"{min(self.flops):.3g}..{max(self.flops):.3g}, bytes sent per rank {max(self.bytes_sent):.3g}, "
                f"blocks skipped {self.blocks_skipped}/{self.blocks_total}, transfer "
                f"{'hidden' if self.hides else 'exposed'} (max {max(self.exposed_seconds) * 1e6:.1f} us), "
                f"predicted {self.predicted_seconds * 1e6:.1f} us")


def ring_cost(kernel, ranks: int, interconnect: str = "nvlink4", dtype: str = "bf16", device: str = "h100",
              batch=(), shards: tuple | None = None, **dims) -> RingCost:
    """Predicted cost of `kernel.ring` on `ranks` devices for concrete global dims (n, m, d, e, heads ...):
    the cost model (runtime/costing.py) of every (query shard, key shard) block program with its global offsets,
    plus the interconnect. shards = (query lengths, key lengths) per rank; default equal contiguous shards."""
    from moa.devices import DTYPE_BYTES, canonical_dtype

    from .costing import cost_breakdown

    if interconnect not in INTERCONNECTS:
        raise InputError(f"unknown interconnect {interconnect!r}; known: {', '.join(INTERCONNECTS)}")
    if not isinstance(ranks, int) or ranks < 1:
        raise InputError(f"ranks must be a positive integer, got {ranks!r}")
    dtype = canonical_dtype(dtype)
    bw, source = INTERCONNECTS[interconnect]
    missing = sorted(d.name for d in kernel.program.dims if d.name not in dims)
    if missing:
        raise InputError(f"ring_cost needs every dim of {kernel.program.name}; missing {', '.join(missing)}")
    from .ring_halo import halo_kernel, halo_ring_cost
    from .ring_linear import linear_kernel, linear_ring_cost

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
