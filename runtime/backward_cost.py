"""Predicted work of the fused backward kernels: tl.dot FLOPs, other floating-point operations and transcendentals
per kernel, exact against the interpreter's counters (runtime/measure.py).

The work of one execution of each region of a kernel (the program, one iteration of its tile loop, one visit of a
tile the skip test keeps) is the abstract walk of its source (codegen/ledger.py); the number of executions comes
from the schedule: every program of the dK/dV kernel iterates over all query tiles and visits those its skip test
keeps; every program of the dQ kernel iterates over the key tiles of the forward's bounds (and visits those its
skip test keeps, when the bounds do not imply it). Memory traffic is not predicted yet, nor the atomic adds of the
score's own reads (a program with a bias table or gate in its score is refused), nor the tiles skipped by the data
(document masks: refused)."""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

import sympy as sp

from moa import intervals as iv
from moa import symbolic as sy
from moa.codegen.constexprs import csym
from moa.codegen.exprs import AccessSite
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


def _tile_counts(sched, subs: dict, n: int, m: int, bm: int, bn: int) -> dict:
    """Kernel name -> (iterations, visits, full tiles, partial tiles) per batch x lead index (subs: dim symbol ->
    value). A visit is an iteration the skip test keeps (every iteration without a test); it is full when the
    schedule proves every pair admissible and the tile lies inside the bounds, else partial."""
    b = sched.branches[0]
    tested = b.skip is not sp.false and not iv.skip_implied_by_range(b.skip, b.key_lo, b.key_hi)
    kv = [0, 0, 0]
    q = [0, 0, 0, 0]

    def kind(rows: dict, s0: int) -> tuple:
        box = {**subs, **rows, iv.J_LO: s0, iv.J_HI: min(s0 + bn, m) - 1, iv.TILE_W: bn}
        kept = b.skip is sp.false or not _holds(b.skip, box)
        full = b.full is not sp.false and _holds(b.full, box) and rows[iv.I_LO] + bm <= n and s0 + bn <= m
        return kept, full

    for t in range(math.ceil(n / bm)):
        rows = {iv.I_LO: t * bm, iv.I_HI: min(t * bm + bm, n) - 1}
        for u in range(math.ceil(m / bn)):
            kept, full = kind(rows, u * bn)
            kv[0] += 1
            kv[1] += kept
            kv[2] += kept and full
        lo = 0 if b.key_lo is None else (max(0, _value(b.key_lo, {**subs, **rows})) // bn) * bn
        hi = m - 1 if b.key_hi is None else min(m - 1, _value(b.key_hi, {**subs, **rows}))
        for s0 in range(lo, hi + 1, bn):
            kept, full = kind(rows, s0)
            q[0] += 1
            q[1] += kept or not tested
            q[2] += (kept or not tested) and full
    visits_kv = kv[1] if b.skip is not sp.false else kv[0]
    split = b.full is not sp.false
    return {"_attn_bwd_dkdv": (kv[0], kv[1], kv[2] if split else 0, visits_kv - kv[2] if split else 0),
            "_attn_bwd_dq": (q[0], q[1] if tested else 0, q[2] if split else 0, q[1] - q[2] if split else 0)}


def predict(runner, dims: dict, batch: tuple, dtype: str, cfg: Config) -> dict:
    """Kernel name -> BackwardWork of a backward call (runner: runtime/backward_run.py BackwardRunner; dims in the
    program's names; batch: the call's batch shape)."""
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
    zl = math.prod(batch) * math.prod(int(sy.evaluate(x, dims)) for _, x in sched.lead)
    consts = {csym(k): v for k, v in backward_configs.constexprs(spec, dims, cfg).items()}
    counts = _tile_counts(sched, {d: dims[d.name] for d in program.dims}, n, m, cfg.block_m, cfg.block_n)
    marks = _marks(spec.source)
    out = {}
    for kern in spec.kernels:
        loads = [AccessSite(x, x, (), (), ()) for x in set(re.findall(r"^\s*(\w+) = .*tl\.load\(", spec.source, re.M))]
        stores = [AccessSite(x, x, (), (), ()) for x in ("dK", "dV", "dQ")]
        led = function_ledger(program, spec.source, kern.name, loads, stores, marks=marks)
        progs = zl * (math.ceil(m / cfg.block_n) if kern is spec.kernels[0] else math.ceil(n / cfg.block_m))
        iters, visits, full, partial = (zl * c for c in counts[kern.name])
        reps = {"program": progs, ("iter", 0): iters, ("visit", 0): visits, ("full", 0): full,
                ("partial", 0): partial}
        tot = {"dot": 0, "other": 0, "trans": 0}
        for region, work in led.regions.items():
            for what in tot:
                tot[what] += reps[region] * int(sp.sympify(getattr(work, what)).xreplace(consts))
        out[kern.name] = BackwardWork(kern.name, tot["dot"], tot["other"], tot["trans"], progs, iters, visits, full,
                                      partial)
    return out
