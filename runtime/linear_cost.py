"""The cost of the chunked linear form (codegen/chunked.py, run by runtime/linear_run.py): its two launches
described for the cost model (codegen/launches.py), counted exactly like the tiled planner.

  _chunk_scan   programs (feature tile ft, value tile vt), a loop over the chunks t: each chunk's rows x BLOCK_F
                features give its own state (BLOCK_V of its columns), stored as the exclusive prefix of the states
  _chunk_out    programs (chunk t), a loop over the feature tiles ft, then the intra-chunk tile

tiles_visited of the linear form: the (chunk, feature tile, value tile) blocks of the state, i.e. the iterations
of the scan's loop (with one value tile, each block is also one iteration of _chunk_out's loop).
tiles_needed: the same (every block holds valid rows and features). The state buffers S [Z, T, D, HEAD_DIM_V]
and zs [Z, T, D] (tiling.state_dtype) are the form's intermediate_bytes.
"""
from __future__ import annotations

import dataclasses
import math

import sympy as sp
import torch

from moa import symbolic as sy
from moa.codegen import launches as CL
from moa.codegen.chunked import CHUNK, CHUNK_IDX, NFEAT, generate_chunked
from moa.codegen.constexprs import HEAD_DIM_V, csym
from moa.codegen.ledger import function_ledger
from moa.cost import Counts
from moa.devices import DTYPE_BYTES
from moa.errors import UnsupportedError
from moa.linear import scan_value_tile

from .tiling import LinearConfig, chunk_config, state_dtype

FLAGS = {"INIT": 0, "PREFIX": 1, "FINAL": 0}   # a single-process call (runtime/linear_run.py)
KERNELS = ("_chunk_scan", "_chunk_out")       # what such a call launches, in order


def linear_launches(planner, name: str, dtname: str, nbatch: int, device: str = "cpu", flags=None,
                    kernels: tuple = KERNELS) -> list:
    """The launches of one output's chunked form (codegen.launches.Launch), in launch order: `kernels` of it
    (default both) with `flags` INIT, PREFIX, FINAL (default a single-process call's)."""
    lp = planner.linear_plans[name][0]
    if lp is None:
        raise UnsupportedError(f"output {name} has no linear form: {planner.linear_plans[name][1]}")
    spec = generate_chunked(planner.cg_program, lp, dtname, nbatch)
    sites = {fn: (loads, stores) for fn, loads, stores in spec.sites}
    consts = {k: v for k, v in (flags or FLAGS).items() if f"{k}: tl.constexpr" in spec.source}

    def led(fn):
        return function_ledger(planner.cg_program, spec.source, fn, *sites[fn], "out", consts, {"fidx": "i"})

    n = lp.schedule.row[1]
    block_f, hd = csym("BLOCK_F"), csym("HEAD_DIM")
    T, NFT = sp.ceiling(n / CHUNK), sp.ceiling(NFEAT / block_f)
    axes = {"crow": (CHUNK, CHUNK_IDX * CHUNK), "feat": (block_f, FT * block_f), "col": (HEAD_DIM_V, 0),
            "HEAD_DIM": (hd, 0), "chunk": (1, CHUNK_IDX)}
    shape = {"_chunk_scan": (scan_grid(), {("loop", 0): (CHUNK_IDX, 0, T)}, ("loop", 0)),
             "_chunk_out": (((CHUNK_IDX, T),), {("loop", 0): (FT, 0, NFT)}, None)}
    return [CL.Launch(fn, led(fn), shape[fn][0], shape[fn][1], scan_axes(axes) if fn == "_chunk_scan" else axes,
                      shape[fn][2], spec.source) for fn in kernels]


FT = sp.Symbol("ft", integer=True, nonnegative=True)   # program ids of the scan: feature tile, value tile
VT = sp.Symbol("vt", integer=True, nonnegative=True)
BLOCK_V = csym("BLOCK_V")


def scan_grid() -> tuple:
    """_chunk_scan's program ids (codegen/chunked.py): feature tiles x value tiles."""
    return (FT, sp.ceiling(NFEAT / csym("BLOCK_F"))), (VT, sp.ceiling(HEAD_DIM_V / BLOCK_V))


def scan_axes(axes: dict) -> dict:
    """The tile axes of _chunk_scan: `axes` with the value columns a BLOCK_V block at vt, and the value tile a
    lane (the normaliser's stores: the first value tile's)."""
    return {**axes, "col": (BLOCK_V, VT * BLOCK_V), "vtile": (1, VT)}


def consts_of(cfg: LinearConfig, d: int, e: int, nfeat: int) -> dict:
    """The constexpr symbols' values (the counters' cvals) of a LinearConfig at head dims d, e and D features."""
    hv = sy.tile_width(e)
    return {CHUNK: cfg.chunk, csym("BLOCK_F"): cfg.block_f, BLOCK_V: cfg.value_tile(hv),
            csym("HEAD_DIM"): sy.tile_width(d), HEAD_DIM_V: hv, NFEAT: nfeat}


def state_bytes(dtname: str) -> int:
    """Bytes per element of the stored chunk states (tiling.state_dtype)."""
    return DTYPE_BYTES[state_dtype(dtname)]


def _elem_bytes(eb: dict, output: str, dtname: str) -> dict:
    acc, st = 8 if dtname == "float64" else 4, state_bytes(dtname)
    return {**eb, "out": eb[output], "S": st, "zs": st, "fw": acc, "fidx": 4, "S0": acc, "z0": acc, "g0": acc}


def linear_counts(planner, name: str, dims: dict, batch: tuple, dtname: str, device: str, eb: dict,
                  config: LinearConfig | None = None, flags: dict | None = None, kernels: tuple = KERNELS):
    """(Counts, state bytes, on-chip estimate, Counts per launch) of one output's chunked form at concrete dims;
    `config` overrides the runtime's default tiles (e.g. the AOT-fitted config a CUDA launch uses, a tuned one);
    `flags` and `kernels`: the launches of another call than a single-process one (the ring's: runtime/ring_linear.py
    rank_launches)."""

    lp = planner.linear_plans[name][0]
    sched = lp.schedule
    n = sy.evaluate(sched.row[1], dims)
    e = sy.evaluate(sched.col[1], dims)
    d = sy.evaluate(lp.branch.dot.extent, dims)
    nfeat = lp.features(d)
    cfg = config or LinearConfig(*chunk_config(torch.device(device), n, nfeat))
    chunk, block_f = cfg.chunk, cfg.block_f
    cv = consts_of(cfg, d, e, nfeat)
    launches = linear_launches(planner, name, dtname, len(batch), device, flags, kernels)
    env = {x: dims[x.name] for x in planner.cg_program.dims}
    nb = math.prod(batch)
    zl = nb * math.prod(sy.evaluate(x, dims) for _, x in sched.lead)
    if zl * n * e == 0:   # an empty output: the runner launches nothing
        launches = ()
    per = [CL.total_counts([x], sched, env, cv, _elem_bytes(eb, sched.output, dtname), nb) for x in launches]
    counts = Counts()
    for c in per:
        c.tiles_needed = c.tiles_visited
        counts.add(c)
    acc = 8 if dtname == "float64" else 4
    states = state_bytes(dtname) * zl * -(-n // chunk) * nfeat * (sy.tile_width(e) + 1) if n * e else 0
    return counts, states, acc * (chunk * block_f + chunk * sy.tile_width(e) + block_f * sy.tile_width(e)), per


def linear_launch_split(lp, dims: dict, batch: tuple, sms: int, config: LinearConfig | None = None) -> LinearConfig:
    """The LinearConfig a CUDA launch of `lp` at dims and batch runs without timing: `config` (default: the
    runtime's default tiles) with the scans' value tile halved while twice their programs (feature tiles x value
    tiles x batch x leading indices) still fit on the `sms` SMs and the tile keeps 32 columns or more
    (moa.linear.scan_value_tile, the rule the form choice counts): the split also shrinks the scans' state
    accumulator."""
    n, e, d = (sy.evaluate(x, dims) for x in (lp.schedule.row[1], lp.schedule.col[1], lp.branch.dot.extent))
    nfeat, hv = lp.features(d), sy.tile_width(e)
    cfg = config or LinearConfig(*chunk_config(torch.device("cuda"), n, nfeat))
    zl = math.prod(batch) * math.prod(sy.evaluate(x, dims) for _, x in lp.schedule.lead)
    bv = scan_value_tile(nfeat, cfg.block_f, hv, zl, sms, cfg.value_tile(hv))
    return cfg if bv == cfg.value_tile(hv) else dataclasses.replace(cfg, block_v=bv)


def linear_formulas(planner, name: str, dtname: str, eb: dict, nbatch=1) -> dict:
    """The counters of the chunked form as formulas in the dims and CHUNK, BLOCK_F, HEAD_DIM, HEAD_DIM_V
    (D = binomial(d + p - 1, p) features)."""
    lp = planner.linear_plans[name][0]
    f = CL.total_formulas(linear_launches(planner, name, dtname, 0), lp.schedule,
                          _elem_bytes(eb, lp.schedule.output, dtname), nbatch)
    return {k: v.xreplace({NFEAT: lp.features_expr()}) for k, v in f.items()}
