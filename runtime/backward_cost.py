"""Predicted work of the fused backward kernels: tl.dot FLOPs, other floating-point operations, transcendentals and
DRAM bytes loaded and stored per kernel, exact against the interpreter's counters (runtime/measure.py).

The work of one execution of each region of a kernel (the program, one iteration of its tile loop, one visit of a
tile the skip test keeps) is the abstract walk of its source (codegen/ledger.py); the number of executions comes
from the schedule: every program of the dK/dV kernel iterates over all query tiles and visits those its skip test
keeps; every program of the dQ kernel iterates over the key tiles of the forward's bounds (and visits those its
skip test keeps, when the bounds do not imply it), each full or partial. The bytes are the lanes of every access
site (codegen/counts.py site_lanes) over those executions. The atomic adds of the score's own reads (a bias table or
gate) and the tiles skipped by the data (document masks) are not predicted: such programs are refused."""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import numpy as np
import sympy as sp

from moa import intervals as iv
from moa import ir
from moa import symbolic as sy
from moa.codegen.backward_bounds import row_bounds
from moa.codegen.constexprs import csym
from moa.codegen.counts import site_lanes
from moa.codegen.ledger import function_ledger
from moa.errors import UnsupportedError

from . import backward_configs
from .tiling import Config


@dataclass(frozen=True)
class BackwardWork:
    """The work of one backward kernel's launch."""
    kernel: str
    dot_flops: int
    other_flops: int
    transcendentals: int
    programs: int
    iterations: int
    visits: int
    full_tiles: int = 0      # visits the schedule proves full (no mask code)
    partial_tiles: int = 0
    bytes_loaded: int = 0    # DRAM bytes of the lanes loads read (every access counts, as runtime/measure.py)
    bytes_stored: int = 0

    @property
    def flops(self) -> int:
        """dot and other FLOPs, as runtime/measure.py's Counters.flops counts them."""
        return self.dot_flops + self.other_flops


def _marks(source: str) -> dict:
    """Line number -> ledger region of the tile loops and skip tests of the generated backward source."""
    marks = {}
    for no, line in enumerate(source.splitlines(), 1):
        text = line.strip()
        if text.startswith(("for start_m in range(", "for start_n in range(")):
            marks[no] = ("iter", 0)
        elif text.startswith("if ") and text.endswith("== 0:"):
            marks[no] = ("visit", 0)
        elif text.startswith("if (") and text.endswith(("# a full tile: no mask code", "# a partial tile: masked")):
            marks[no] = ("full" if "full tile" in text else "partial", 0)
    return marks


def _holds(e, env: dict) -> bool:
    return bool(sp.sympify(e).xreplace({k: sp.Integer(v) for k, v in env.items()}))


def _value(e, env: dict) -> int:
    return int(sp.sympify(e).xreplace({k: sp.Integer(v) for k, v in env.items()}))


def _executions(sched, subs: dict, n: int, m: int, bm: int, bn: int) -> dict:
    """Kernel name -> region -> (row starts, key starts) of its executions per batch x lead index (subs: dim symbol
    -> value). A visit is an iteration the skip test keeps (every iteration without a test); a visited tile is full
    when the schedule proves every pair admissible and the tile lies inside the bounds, else partial."""
    b = sched.branches[0]
    tested = b.skip is not sp.false and not iv.skip_implied_by_range(b.skip, b.key_lo, b.key_hi)
    split = b.full is not sp.false
    out = {k: {r: ([], []) for r in ("program", ("iter", 0), ("visit", 0), ("full", 0), ("partial", 0))}
           for k in ("_attn_bwd_dkdv", "_attn_bwd_dq")}

    def add(kernel: str, region, t0: int, s0: int) -> None:
        out[kernel][region][0].append(t0)
        out[kernel][region][1].append(s0)

    def pair(kernel: str, rows: dict, t0: int, s0: int, test: bool) -> None:
        box = {**subs, **rows, iv.J_LO: s0, iv.J_HI: min(s0 + bn, m) - 1, iv.TILE_W: bn}
        add(kernel, ("iter", 0), t0, s0)
        if test and b.skip is not sp.false and _holds(b.skip, box):
            return
        if test and b.skip is not sp.false:
            add(kernel, ("visit", 0), t0, s0)
        if split:
            full = _holds(b.full, box) and t0 + bm <= n and s0 + bn <= m
            add(kernel, ("full", 0) if full else ("partial", 0), t0, s0)

    row_lo, row_hi = row_bounds(b.skip)
    span = []   # per key tile: the query rows its loop covers (codegen/backward_bounds.py query_loop)
    for u in range(math.ceil(m / bn)):
        add("_attn_bwd_dkdv", "program", 0, u * bn)
        box = {**subs, iv.J_LO: u * bn, iv.J_HI: min(u * bn + bn, m) - 1}
        first = 0 if row_lo is None else (max(_value(row_lo, box), 0) // bm) * bm
        stop = n if row_hi is None else min(n, ((max(_value(row_hi, box), -1) + bm) // bm) * bm)
        span.append((first, stop))
    for t in range(math.ceil(n / bm)):
        rows = {iv.I_LO: t * bm, iv.I_HI: min(t * bm + bm, n) - 1}
        add("_attn_bwd_dq", "program", t * bm, 0)
        for u in range(math.ceil(m / bn)):
            if span[u][0] <= t * bm < span[u][1]:
                pair("_attn_bwd_dkdv", rows, t * bm, u * bn, True)
        lo = 0 if b.key_lo is None else (max(0, _value(b.key_lo, {**subs, **rows})) // bn) * bn
        hi = m - 1 if b.key_hi is None else min(m - 1, _value(b.key_hi, {**subs, **rows}))
        for s0 in range(lo, hi + 1, bn):
            pair("_attn_bwd_dq", rows, t * bm, s0, tested)
    return out


def _elem_bytes(program, spec, dtype: str, int_bytes: int) -> dict:
    """Tensor name -> element bytes: float inputs and dO in the compute dtype, ints as passed, booleans one byte;
    lse, delta and the gradients in the accumulation dtype; the data summaries like their input."""
    size = {"float64": 8, "float32": 4, "float16": 2, "bfloat16": 2}[dtype]
    acc = 8 if dtype == "float64" else 4
    out = {"dO": size, "lse": acc, "delta": acc, "dK": acc, "dV": acc, "dQ": acc}
    for name, node in program.input_map.items():
        out[name] = size if node.dtype == ir.FLOAT else 1 if node.dtype == ir.BOOL else int_bytes
    for ts in spec.summaries:
        out[ts.arg] = out[ts.tensor]
    return out


def predict(runner, dims: dict, batch: tuple, dtype: str, cfg: Config, int_bytes: int = 8) -> dict:
    """Kernel name -> BackwardWork of a backward call (runner: runtime/backward_run.py BackwardRunner; dims in the
    program's names; batch: the call's batch shape; int_bytes: the element size of integer inputs as passed)."""
    spec = runner.spec(dtype, len(batch))
    if spec.summaries:
        raise UnsupportedError("the backward kernels skip tiles by the data (per-tile summaries of "
                               f"{', '.join(sorted({t.tensor for t in spec.summaries}))}): their work depends on "
                               "the inputs, which the backward cost model does not read yet")
    if spec.scatters:
        raise UnsupportedError("the backward cost model does not count atomic adds yet (the score reads "
                               f"{', '.join(spec.scatters)})")
    program, sched = runner.planner.cg_program, runner.sched
    dims = {x.name: int(dims[x.name]) for x in program.dims}
    n, m = (int(sy.evaluate(x, dims)) for x in (spec.row_extent, spec.key_extent))
    lead = [int(sy.evaluate(x, dims)) for _, x in sched.lead]
    nb = math.prod(batch)
    cvals = backward_configs.constexprs(spec, dims, cfg)
    consts = {csym(k): v for k, v in cvals.items()}
    lengths = {"row": cfg.block_m, "key": cfg.block_n, "col": cvals["HEAD_DIM_V"],
               **{hd: cvals[hd] for hd, _ in spec.head_dims}}
    runs = _executions(sched, {d: dims[d.name] for d in program.dims}, n, m, cfg.block_m, cfg.block_n)
    nbytes = _elem_bytes(program, spec, dtype, int_bytes)
    marks = _marks(spec.source)
    out = {}
    for kern in spec.kernels:
        led = function_ledger(program, spec.source, kern.name, kern.loads, kern.stores, marks=marks)
        tot = {"dot": 0, "other": 0, "trans": 0, "loaded": 0, "stored": 0}
        for region, work in led.regions.items():
            rows, keys = (np.asarray(x, dtype=np.int64) for x in runs[kern.name][region])
            for what in ("dot", "other", "trans"):
                tot[what] += nb * math.prod(lead) * len(rows) * int(sp.sympify(getattr(work, what)).xreplace(consts))
            # lanes may depend on the leading indices (a head's bias row)
            for point in itertools.product(*(range(x) for x in lead)):
                env = {**{d: dims[d.name] for d in program.dims}, **{v: a for (v, _), a in zip(sched.lead, point)}}
                for names, sites, key in ((work.loads, led.loads, "loaded"), (work.stores, led.stores, "stored")):
                    for name in names:
                        site = sites[name]
                        lanes = site_lanes(site, env, lengths, {"row": rows, "key": keys}, len(rows))
                        tot[key] += nb * int(lanes.sum()) * nbytes[site.tensor]
        r = runs[kern.name]
        out[kern.name] = BackwardWork(kern.name, tot["dot"], tot["other"], tot["trans"],
                                      *(nb * math.prod(lead) * len(r[x][0]) for x in
                                        ("program", ("iter", 0), ("visit", 0), ("full", 0), ("partial", 0))),
                                      tot["loaded"], tot["stored"])
    return out

