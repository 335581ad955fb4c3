"""The communication of ring attention across ranks (torch.distributed): errors and statistics, bounded waits,
agreeing on every rank's problem, the shard shapes every rank exchanges first, and the byte buffers that carry
shards. Shared by the K/V rotation (runtime/ring.py), the halo exchange (runtime/ring_halo.py) and the linear form
across ranks (runtime/ring_linear.py)."""
from __future__ import annotations

import datetime
import json
from dataclasses import dataclass, field

import torch

from moa import shard
from moa.errors import InputError, MoaError

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


def timeout_of(t):
    """A ring timeout as a timedelta (None: the process group's own)."""
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


def post(fn, timeout, rank, what):
    """Start communication; a backend failure (a peer already gone) becomes a RingError."""
    try:
        return fn()
    except RuntimeError as e:  # DistBackendError, closed connections
        raise _comm_error(e, timeout, rank, what) from e


def wait(works, timeout, rank, what):
    for w in works:
        try:
            if timeout is None:
                w.wait()
            else:
                w.wait(timeout)
        except RuntimeError as e:  # DistBackendError, gloo timeouts and closed connections
            raise _comm_error(e, timeout, rank, what) from e


def gather_json(obj, group, device, timeout, rank, what):
    """all_gather of a JSON-able object, every wait bounded by the timeout."""
    import torch.distributed as dist   # optional part of torch: imported where the ring runs

    world = dist.get_world_size(group)
    data = torch.tensor(list(json.dumps(obj).encode()), dtype=torch.uint8, device=device)
    size = torch.tensor([data.numel()], dtype=torch.int64, device=device)
    sizes = [torch.zeros_like(size) for _ in range(world)]
    wait([post(lambda: dist.all_gather(sizes, size, group=group, async_op=True), timeout, rank, what)], timeout,
          rank, what)
    top = max(int(s.item()) for s in sizes)
    buf = torch.zeros(top, dtype=torch.uint8, device=device)
    buf[:data.numel()] = data
    bufs = [torch.zeros_like(buf) for _ in range(world)]
    wait([post(lambda: dist.all_gather(bufs, buf, group=group, async_op=True), timeout, rank, what)], timeout,
          rank, what)
    return [json.loads(bytes(x[:int(s.item())].cpu().tolist()).decode()) for x, s in zip(bufs, sizes)]


def agree(msg, group, device, timeout, rank, what):
    """Every rank's problem (None when it has none), with one small collective when nobody has one."""
    import torch.distributed as dist   # optional part of torch: imported where the ring runs

    world = dist.get_world_size(group)
    flag = torch.tensor([0 if msg is None else 1], dtype=torch.int64, device=device)
    flags = [torch.zeros_like(flag) for _ in range(world)]
    wait([post(lambda: dist.all_gather(flags, flag, group=group, async_op=True), timeout, rank, what)], timeout,
          rank, what)
    if not any(int(f.item()) for f in flags):
        return [None] * world
    return gather_json(msg, group, device, timeout, rank, what)


DTYPES = {str(d): d for d in (torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.int64,
                                torch.int32, torch.int16, torch.int8, torch.uint8, torch.bool)}


def layout(names, shapes, dtypes):
    """Byte layout of the travelling buffer: [(name, offset, nbytes, shape, dtype)], total bytes."""
    out, off = [], 0
    for name in names:
        dt = DTYPES[dtypes[name]]
        nb = _numel(shapes[name]) * torch.empty((), dtype=dt).element_size()
        out.append((name, off, nb, tuple(shapes[name]), dt))
        off += -(-nb // ALIGN) * ALIGN
    return out, off


def _numel(shape):
    n = 1
    for s in shape:
        n *= int(s)
    return n


def pack(layout, total, tensors, device):
    buf = torch.empty(total, dtype=torch.uint8, device=device)
    for name, off, nb, _, dt in layout:
        if nb:
            buf[off:off + nb].view(dt).copy_(tensors[name].reshape(-1))   # any strides (a 1-element view too)
    return buf


def unpack(layout, buf):
    return {name: buf[off:off + nb].view(dt).view(shape) for name, off, nb, shape, dt in layout}


def bind_check(program, fake: dict, dims: dict) -> str | None:
    """The InputError message of binding `program` to meta tensors `fake` at `dims` (shapes alone), or None."""
    try:
        check_offsets(program, bind(program, fake, dims))
    except InputError as e:
        return e.message
    return None


def agree_or_raise(err, group, cdev, timeout, rank, what) -> None:
    """Share every rank's local error (or None); raise the same InputError on every rank if any rank has one."""
    bad = [f"rank {s}: {m}" for s, m in enumerate(agree(err, group, cdev, timeout, rank, what)) if m]
    if bad:
        raise InputError("ring attention: " + "; ".join(bad))


def comm_device(inputs, group):
    """The device collectives run on: the inputs' CUDA device under NCCL, else the CPU (gloo)."""
    import torch.distributed as dist   # optional part of torch: imported where the ring runs

    devs = [t.device for t in inputs.values() if isinstance(t, torch.Tensor)]
    nccl = "nccl" in str(dist.get_backend(group))
    return devs[0] if devs and devs[0].type == "cuda" and nccl else torch.device("cpu")


def exchange_shapes(prog, inputs, group, cdev, timeout, rank, phase: str = "") -> list:
    """Every rank's shard shapes and dtypes (one JSON all_gather); a rank's local problem (missing input, wrong
    rank ...) travels too and becomes the same InputError on every rank."""
    local_err = _local_check(prog, inputs)
    meta = {"error": local_err}
    if local_err is None:
        meta["inputs"] = {n: [list(t.shape), str(t.dtype)] for n, t in inputs.items()}
    metas = gather_json(meta, group, cdev, timeout, rank, f"{phase}exchanging shard shapes")
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
        if str(t.dtype) not in DTYPES:
            return f"input {n} has dtype {t.dtype}, which moa does not take"
    if len({t.device for t in inputs.values()}) > 1:
        return "inputs are on different devices"
    return None


def lengths(plan, decl, metas):
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
            problems.append(f"{role}-sharded input {name} may differ across ranks only in axis {pos} of its "
                            "tensor (the sharded one), got shape "
                            + ", ".join(f"{s} on rank {r}" for r, s in enumerate(shp)))
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


@dataclass(frozen=True)
class Geometry:
    """Where every rank's shards sit: local query and key lengths, their offsets, the global dims, and the shapes
    and dtypes of every rank's travelling key inputs (block names)."""
    nl: list
    ml: list
    rows0: list
    cols0: list
    gdims: dict
    shapes: list
    dtypes: dict


def geometry(plan, prog, inputs, group, cdev, timeout, rank, phase: str = "") -> Geometry:
    """Every rank's shard geometry (one shape exchange); mismatched shards are the same InputError everywhere.
    `phase` names the step in a timeout's message ("the backward, every rank calling it: ")."""
    metas = exchange_shapes(prog, inputs, group, cdev, timeout, rank, phase)
    nl, ml, problems = lengths(plan, prog.input_map, metas)
    if problems:
        raise InputError("ring attention: shards do not match across ranks: " + "; ".join(problems))
    world = len(metas)
    gdims = {plan.n.name: sum(nl), plan.m.name: sum(ml)}
    if plan.n == plan.m and sum(nl) != sum(ml):
        raise InputError(f"ring attention: the query shards hold {sum(nl)} rows in all but the key shards "
                         f"{sum(ml)} keys; {prog.name} uses the one dim {plan.n} for both")
    keys = plan.key_inputs
    shapes = [{bn: metas[s]["inputs"][plan.source_of(bn)][0] for bn in keys} for s in range(world)]
    dtypes = {bn: metas[0]["inputs"][plan.source_of(bn)][1] for bn in keys}
    return Geometry(nl, ml, [sum(nl[:s]) for s in range(world)], [sum(ml[:s]) for s in range(world)], gdims, shapes,
                    dtypes)


def outcome(failed, group, cdev, timeout, rank, what):
    """Every rank learns whether one failed: the failing rank raises its own error, the others RingError."""
    why = None
    if failed:
        why = f"{type(failed[0]).__name__}: {(str(failed[0]).splitlines() or [''])[0][:300]}"
    status = agree(why, group, cdev, timeout, rank, what)
    if failed:
        raise failed[0]
    bad = [f"rank {s}: {m}" for s, m in enumerate(status) if m]
    if bad:
        raise RingError("ring attention failed on " + "; ".join(bad))
