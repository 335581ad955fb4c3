"""Predicted work of the fused backward kernels: tl.dot FLOPs, other floating-point operations, transcendentals and
DRAM bytes loaded and stored per kernel, exact against the interpreter's counters (runtime/measure.py). Every
backward path is reached through `Backward.cost` (runtime/backward_cost_all.py); this module counts the two fused
kernels of one single-branch schedule.

The work of one execution of each region of a kernel (the program, one iteration of its tile loop, one visit of a
tile the skip test keeps) is the abstract walk of its source (codegen/ledger.py); the number of executions comes
from the schedule: every program of the dK/dV kernel iterates over the query tiles its bounds allow and visits
those its skip test keeps; every program of the dQ kernel iterates over the key tiles of the forward's bounds (and
visits those its skip test keeps, when the bounds do not imply it), each full or partial. The bytes are the lanes
of every access site (codegen/counts.py site_lanes) over those executions. The atomic adds of the score's own float
reads (a bias table, a gate) are access sites too (codegen/backward.py records them, the ledger names them
atomic{k}): one load, one store and one flop per active lane, as the interpreter counts tl.atomic_add. Where the
kernels skip tiles by the data (document ids, global flags: per-tile min / max summaries, runtime/summaries.py),
the skip and full tests are evaluated per batch entry and lead index on the summaries of the given data (`data=`);
without it the prediction is refused (the tiles depend on the ids)."""
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
from moa.cost import launches_roofline
from moa.errors import UnsupportedError
from moa.onf import uses_summaries
from moa.tiles import KeyTable, PairTable, summary_env

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


@dataclass(frozen=True)
class BackwardCost:
    """The predicted work of one backward call: `path` (fused, multi, window, linear), kernel -> BackwardWork in
    launch order, and what is not kernel work (`notes`)."""
    path: str
    kernels: dict
    notes: tuple = ()

    def total(self, what: str) -> int:
        return sum(getattr(w, what) for w in self.kernels.values())

    @property
    def flops(self) -> int:
        return self.total("flops")

    @property
    def transcendentals(self) -> int:
        return self.total("transcendentals")

    @property
    def bytes_loaded(self) -> int:
        return self.total("bytes_loaded")

    @property
    def bytes_stored(self) -> int:
        return self.total("bytes_stored")

    @property
    def programs(self) -> int:
        return self.total("programs")

    def seconds(self, device, dtype: str) -> dict:
        """Kernel -> predicted seconds on a device (moa.devices.Device) for kernels computing in `dtype`: each
        launch's roofline over its occupancy plus the launch overhead (moa/cost.py launches_roofline), with every
        byte loaded or stored counted at the HBM bandwidth (no L2 model: an upper bound on the memory part)."""
        return {name: launches_roofline([(w.dot_flops, w.other_flops, w.transcendentals,
                                          w.bytes_loaded + w.bytes_stored, w.programs)], device, dtype)[0]
                for name, w in self.kernels.items()}

    def table(self, device=None, dtype: str = "float32") -> str:
        """The per-kernel work as a text table (programs, tile pairs iterated, the visits a skip test lets through:
        '-' where none is counted, as for a kernel with no skip test (the dQ kernel of a causal mask), full and
        partial tiles, FLOPs, transcendentals, bytes), a total row, with `device` the predicted seconds
        (`seconds`), then the notes."""
        secs = self.seconds(device, dtype) if device is not None else {}
        head = ["kernel", "programs", "tile pairs", "tested in", "full", "partial", "dot FLOPs", "other FLOPs",
                "transc.", "loaded", "stored"] + (["time"] if secs else [])
        rows = []
        for name, w in [*self.kernels.items(), ("total", None)]:
            x = w or BackwardWork("total", *(self.total(f) for f in ("dot_flops", "other_flops", "transcendentals",
                                                                     "programs", "iterations", "visits",
                                                                     "full_tiles", "partial_tiles",
                                                                     "bytes_loaded", "bytes_stored")))
            rows.append([name, str(x.programs), str(x.iterations), str(x.visits) if x.visits else "-",
                         str(x.full_tiles), str(x.partial_tiles), _si(x.dot_flops), _si(x.other_flops),
                         _si(x.transcendentals), _si(x.bytes_loaded, "B"), _si(x.bytes_stored, "B")] +
                        ([_si(secs[name] if w else sum(secs.values()), "s")] if secs else []))
        widths = [max(len(r[c]) for r in [head, *rows]) for c in range(len(head))]
        lines = [f"backward ({self.path}): " + ("fused kernels" if self.kernels else "no kernels")]
        lines += ["  ".join(c.ljust(wd) for c, wd in zip(r, widths)).rstrip() for r in [head, *rows]]
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


def _si(x, unit: str = "") -> str:
    """x with an SI prefix (3 significant digits)."""
    x = float(x)
    for p, s in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k"), (1.0, ""), (1e-3, "m"), (1e-6, "u")):
        if abs(x) >= p:
            return f"{x / p:.3g} {s}{unit}".rstrip()
    return f"{x:.3g} {unit}".rstrip()


def work_of(name: str, c) -> BackwardWork:
    """A Counts (codegen/counts.py, codegen/launches.py) as a BackwardWork."""
    return BackwardWork(name, c.dot_flops, c.flops - c.dot_flops, c.transcendentals, c.programs,
                                      c.tiles_visited, c.tiles_visited, 0, 0, c.dram_bytes_loaded,
                                      c.dram_bytes_stored)


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


def _executions(sched, subs: dict, n: int, m: int, bm: int, bn: int, tests: tuple, sums: dict) -> dict:
    """Kernel name -> region -> (row starts, key starts) of its executions for one batch entry x lead index (subs:
    dim and lead symbols -> values; tests: (skip, full, data) as the kernels test them (codegen/backward.py: with
    the data's summaries where the forward skips by them); sums: summary symbol -> (axis, per-tile values)). A visit
    is an iteration the skip test keeps (every iteration without a test); a visited tile is full when the schedule
    proves every pair admissible and the tile lies inside the bounds, else partial."""
    b = sched.branches[0]
    skip, full, data = tests
    tested = skip is not sp.false and (data or not iv.skip_implied_by_range(b.skip, b.key_lo, b.key_hi))
    split = full is not sp.false
    out = {k: {r: ([], []) for r in ("program", ("iter", 0), ("visit", 0), ("full", 0), ("partial", 0))}
           for k in ("_attn_bwd_dkdv", "_attn_bwd_dq")}

    def add(kernel: str, region, t0: int, s0: int) -> None:
        out[kernel][region][0].append(t0)
        out[kernel][region][1].append(s0)

    def pair(kernel: str, rows: dict, t0: int, s0: int, test: bool) -> None:
        box = {**subs, **rows, iv.J_LO: s0, iv.J_HI: min(s0 + bn, m) - 1, iv.TILE_W: bn}
        at = {"program": (), "row": (t0 // bm,), "key": (s0 // bn,), "pair": (t0 // bm, s0 // bn)}
        box.update({sym: int(v[at[axis]]) for sym, (axis, v) in sums.items()})
        add(kernel, ("iter", 0), t0, s0)
        if test and skip is not sp.false and _holds(skip, box):
            return
        if test and skip is not sp.false:
            add(kernel, ("visit", 0), t0, s0)
        if split:
            whole = _holds(full, box) and t0 + bm <= n and s0 + bn <= m
            add(kernel, ("full", 0) if whole else ("partial", 0), t0, s0)

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


def _summaries(b, env: dict, entry: dict, n: int, m: int, bm: int, bn: int) -> dict:
    """Summary symbol -> (axis, per-tile values) of one batch entry's data (runtime/summaries.py's min and max over
    each row tile of BLOCK_M rows, each key tile of BLOCK_N keys), at the lead indices in env."""
    out = {}
    for sym, v in summary_env(b, env, entry, n, m, bm, bn).items():
        sm = next(x for x in b.summaries if sym in (x.lo, x.hi))
        out[sym] = (sm.axis, np.asarray(v.values if isinstance(v, (KeyTable, PairTable)) else v))
    return out


def _elem_bytes(program, spec, dtype: str, int_bytes: int | dict) -> dict:
    """Tensor name -> element bytes: float inputs and dO in the compute dtype, ints as passed, booleans one byte;
    lse, delta and the gradients in the accumulation dtype; the data summaries like their input."""
    size = {"float64": 8, "float32": 4, "float16": 2, "bfloat16": 2}[dtype]
    acc = 8 if dtype == "float64" else 4
    out = {"dO": size, "lse": acc, "delta": acc, "dK": acc, "dV": acc, "dQ": acc}
    for name, node in program.input_map.items():
        out[name] = size if node.dtype == ir.FLOAT else 1 if node.dtype == ir.BOOL else \
            int_bytes.get(name, 8) if isinstance(int_bytes, dict) else int_bytes
    for ts in spec.summaries:
        out[ts.arg] = out[ts.tensor]
    for x in spec.scatters:
        out[f"grad_{x}"] = acc
    for buf, _ in spec.reductions:
        out[buf] = acc
    return out


def predict(runner, dims: dict, batch: tuple, dtype: str, cfg: Config | dict, int_bytes: int | dict = 8,
            data: dict | None = None) -> dict:
    """Kernel name -> BackwardWork of a backward call (runner: runtime/backward_run.py BackwardRunner; dims in the
    program's names; batch: the call's batch shape; cfg: the Config of both kernels, or kernel name -> Config (a GPU
    chooses each kernel's own, runtime/backward_configs.py); int_bytes: the element size of integer inputs as
    passed (one for all, or codegen name -> size); data: codegen input name -> array (batch axes first) of the
    integer and boolean inputs whose per-tile summaries the kernels test, required when they do)."""
    spec = runner.spec(dtype, len(batch))
    program, sched = runner.planner.cg_program, runner.sched
    b = sched.branches[0]
    is_data = uses_summaries(sched, b)
    read = sorted({sm.read.name for sm in b.summaries}) if is_data else []
    if is_data and (data is None or any(name not in data for name in read)):
        raise UnsupportedError(f"the backward kernels skip tiles by the data (per-tile summaries of "
                               f"{', '.join(read)}): pass those inputs (inputs=) to predict which tiles they visit")
    tests = (*b.tile_tests(is_data), is_data)
    dims = {x.name: int(dims[x.name]) for x in program.dims}
    n, m = (int(sy.evaluate(x, dims)) for x in (spec.row_extent, spec.key_extent))
    lead = [int(sy.evaluate(x, dims)) for _, x in sched.lead]
    nb = math.prod(batch)
    if not nb * math.prod(lead) * n * m:   # runtime/backward_run.py launches nothing
        return {k.name: BackwardWork(k.name, 0, 0, 0, 0, 0, 0) for k in spec.kernels}
    nbytes = _elem_bytes(program, spec, dtype, int_bytes)
    marks = _marks(spec.source)
    regions = ("program", ("iter", 0), ("visit", 0), ("full", 0), ("partial", 0))
    env0 = {d: dims[d.name] for d in program.dims}
    entries = list(itertools.product(*(range(x) for x in batch))) if is_data else [None]
    weight = 1 if is_data else nb   # the data's tiles per batch entry, else one entry for all
    out = {}
    for kern in spec.kernels:
        kc = cfg[kern.name] if isinstance(cfg, dict) else cfg
        cvals = backward_configs.constexprs(spec, dims, kc)
        consts = {csym(k): v for k, v in cvals.items()}
        lengths = {"row": kc.block_m, "key": kc.block_n, "col": cvals["HEAD_DIM_V"],
                   **{hd: cvals[hd] for hd, _ in spec.head_dims}}
        led = function_ledger(program, spec.source, kern.name, kern.loads + kern.atomics, kern.stores + kern.atomics,
                              marks=marks, ptr_elems={ts.arg: "i" for ts in spec.summaries} or None)
        tot = dict.fromkeys(("dot", "other", "trans", "loaded", "stored", *regions), 0)
        runs = None if is_data else _executions(sched, env0, n, m, kc.block_m, kc.block_n, tests, {})
        for entry in entries:
            for point in itertools.product(*(range(x) for x in lead)):   # lanes may depend on the lead (a bias row)
                env = {**env0, **{v: a for (v, _), a in zip(sched.lead, point)}}
                if is_data:
                    sums = _summaries(b, env, _entry(data, entry, len(batch)), n, m, kc.block_m, kc.block_n)
                    runs = _executions(sched, env, n, m, kc.block_m, kc.block_n, tests, sums)
                _count(tot, led, runs[kern.name], env, consts, lengths, nbytes, weight)
        out[kern.name] = BackwardWork(kern.name, tot["dot"], tot["other"], tot["trans"], *(tot[r] for r in regions),
                                      tot["loaded"], tot["stored"])
    return out


def _entry(data: dict, entry: tuple, nbatch: int) -> dict:
    """The arrays of one batch entry (an array with no batch axes is shared by every entry)."""
    return {name: (np.asarray(x)[entry] if np.ndim(x) >= nbatch and nbatch else np.asarray(x))
            for name, x in data.items()}


def _count(tot: dict, led, runs: dict, env: dict, consts: dict, lengths: dict, nbytes: dict, weight: int) -> None:
    """Add one (batch entry x lead index)'s work of a kernel, times weight: per region its executions x the work of
    one, the lanes of its access sites (an atomic add: one load, one store and one flop per active lane)."""
    for region in ("program", ("iter", 0), ("visit", 0), ("full", 0), ("partial", 0)):
        tot[region] += weight * len(runs[region][0])
    for region, work in led.regions.items():
        rows, keys = (np.asarray(x, dtype=np.int64) for x in runs[region])
        for what in ("dot", "other", "trans"):
            tot[what] += weight * len(rows) * int(sp.sympify(getattr(work, what)).xreplace(consts))
        for names, sites, key in ((work.loads, led.loads, "loaded"), (work.stores, led.stores, "stored")):
            for name in names:
                site = sites[name]
                lanes = int(site_lanes(site, env, lengths, {"row": rows, "key": keys}, len(rows)).sum())
                tot[key] += weight * lanes * nbytes[site.tensor]
                if key == "loaded" and name in work.atomics:
                    tot["other"] += weight * lanes
