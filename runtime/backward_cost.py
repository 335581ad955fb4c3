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
    return marks


def _holds(e, env: dict) -> bool:
    return bool(sp.sympify(e).xreplace({k: sp.Integer(v) for k, v in env.items()}))


def _value(e, env: dict) -> int:
    return int(sp.sympify(e).xreplace({k: sp.Integer(v) for k, v in env.items()}))


def _tile_counts(sched, subs: dict, n: int, m: int, bm: int, bn: int) -> dict:
    """Kernel name -> (iterations, visits) per batch x lead index (subs: dim symbol -> value)."""
    b = sched.branches[0]
    it_kv = vis_kv = it_q = vis_q = 0
    tested = b.skip is not sp.false and not iv.skip_implied_by_range(b.skip, b.key_lo, b.key_hi)
    for t in range(math.ceil(n / bm)):
        rows = {iv.I_LO: t * bm, iv.I_HI: min(t * bm + bm, n) - 1}
        lo = 0 if b.key_lo is None else (max(0, _value(b.key_lo, {**subs, **rows})) // bn) * bn
        hi = m - 1 if b.key_hi is None else min(m - 1, _value(b.key_hi, {**subs, **rows}))
        for u in range(math.ceil(m / bn)):
            box = {**subs, **rows, iv.J_LO: u * bn, iv.J_HI: min(u * bn + bn, m) - 1, iv.TILE_W: bn}
            kept = b.skip is sp.false or not _holds(b.skip, box)
            it_kv += 1
            vis_kv += kept
        starts = range(lo, hi + 1, bn)
        it_q += len(starts)
        vis_q += sum(1 for s0 in starts if not tested or not _holds(
            b.skip, {**subs, **rows, iv.J_LO: s0, iv.J_HI: min(s0 + bn, m) - 1, iv.TILE_W: bn}))
    return {"_attn_bwd_dkdv": (it_kv, vis_kv), "_attn_bwd_dq": (it_q, vis_q if tested else 0)}


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
        iters, visits = (zl * c for c in counts[kern.name])
        reps = {"program": progs, ("iter", 0): iters, ("visit", 0): visits}
        tot = {"dot": 0, "other": 0, "trans": 0}
        for region, work in led.regions.items():
            for what in tot:
                tot[what] += reps[region] * int(sp.sympify(getattr(work, what)).xreplace(consts))
        out[kern.name] = BackwardWork(kern.name, tot["dot"], tot["other"], tot["trans"], progs, iters, visits)
    return out
