"""Predicted work of the chunked linear form's backward (codegen/chunked_backward.py, launched by
runtime/linear_backward.py): the forward's prefix states recomputed (_chunk_scan), then
_bwd_scan, _bwd_dk, _bwd_dv and _bwd_dq, counted as runtime/linear_cost.py counts the forward's chunked kernels
(codegen/launches.py: the ledger of each function, its grid and loops, the lanes of its access sites).

  _chunk_scan, _bwd_scan     programs (feature tile ft), a loop over the chunks
  _bwd_dk, _bwd_dv, _bwd_dq  programs (chunk t), a loop over the feature tiles

The emitter records the sites of the loads it writes through the expression emitter (Q, K, V, gates, features);
the accesses the backward kernels write as text (dn, dz, the suffix states U and uz, the prefix states S and zs,
the gradient stores and the gates' atomic adds) are described here, with the same masks. A gate read at a chunk's
boundary row (first = t CHUNK, nxt = min(t CHUNK + CHUNK, n - 1)) is one lane, always in range. An atomic add
counts one load, one store and one flop per active lane (runtime/measure.py)."""
from __future__ import annotations

import math
from dataclasses import replace

import sympy as sp
import torch

from moa import dnf as D
from moa import ir
from moa import symbolic as sy
from moa.codegen import launches as CL
from moa.codegen.chunked import CHUNK, CHUNK_IDX, FEAT, NFEAT, first_value_tile, scan_state_sites
from moa.codegen.chunked_backward import BACKWARD_KERNELS
from moa.codegen.constexprs import HEAD_DIM_V, csym
from moa.codegen.exprs import AccessSite
from moa.codegen.ledger import function_ledger
from moa.grad_sym import partials

from . import linear_backward
from .backward_cost import BackwardCost, work_of
from .linear_cost import FLAGS, consts_of, scan_axes, scan_grid
from .linear_cost import FT as _FT
from .tiling import LinearConfig, chunk_config

KERNELS = ("_chunk_scan", *BACKWARD_KERNELS)
SCANS = ("_chunk_scan", "_bwd_scan")   # grid (feature tiles, value tiles, Z)
_ONE = "one"   # the axis of a gate read at a chunk's boundary row: one lane


def _text_sites(lp, program) -> dict:
    """Kernel -> (extra loads, stores) of the accesses written as text (module docstring)."""
    s, br = lp.schedule, lp.branch
    (i, n), (c, e), kv, d = s.row, s.col, br.dot.var, br.dot.extent
    rows, cols = ((i, "crow"),), ((c, "col"),)
    dn = AccessSite("dn", "dn", (i, c), rows + cols, (sp.Lt(i, n), sp.Lt(c, e)))
    dz = AccessSite("dz", "dz", (i,), rows, (sp.Lt(i, n),))

    def state(name, tensor, col=True):
        return AccessSite(name, tensor, (FEAT, c) if col else (FEAT,), ((FEAT, "feat"),) + (cols if col else ()),
                          (sp.Lt(FEAT, NFEAT),) + ((sp.Lt(c, e),) if col else ()))

    def grad(name, col, axis, ext):
        return AccessSite(name, name, (i, col), rows + ((col, axis),), (sp.Lt(i, n), sp.Lt(col, ext)))

    def atomics(g, var):   # codegen/chunked_backward.py _gate_scatter: rows < n and the read's index in range
        out = []
        for r in (partials(g, lambda x: isinstance(x, D.Read)) if g is not None else {}):
            conds = [sp.Lt(var, n)]
            for ix, ext in zip(r.index, program.input_map[r.name].shape):
                conds += [sp.Lt(sp.sympify(ix), ext), sp.Ge(sp.sympify(ix), 0)]
            out.append(AccessSite(f"atomic{len(out)}", f"grad_{r.name}", tuple(r.index), ((var, "crow"),),
                                  tuple(conds)))
        return tuple(out)

    ua, ub = atomics(lp.ga, i), atomics(lp.gb, br.var)
    return {"_chunk_scan": ((), scan_state_sites(s)),
            "_bwd_scan": ((dn, dz), (state("U", "U"), first_value_tile(state("uz", "uz", False)))),
            "_bwd_dk": ((dn, dz, state("U", "U"), state("u", "uz", False)) + ub, (grad("dK", kv, "HEAD_DIM", d),) + ub),
            "_bwd_dv": ((dn, dz, state("U", "U")), (grad("dV", c, "col", e),)),
            "_bwd_dq": ((dn, dz, state("S", "S"), state("z", "zs", False)) + ua, (grad("dQ", kv, "HEAD_DIM", d),) + ua)}


def _boundary(site):
    """A gate load at `first` / `nxt` (the emitter leaves its axis unlabelled): one lane, no condition."""
    if any(axis == "" for _, axis in site.axes):
        return replace(site, axes=tuple((v, _ONE if axis == "" else axis) for v, axis in site.axes), conds=())
    return site


def launches(lb, dtname: str, nbatch: int) -> list:
    """The Launch (codegen/launches.py) of each kernel a backward call runs, in launch order."""
    program, lp = lb.planner.cg_program, lb.lp
    spec = lb.spec(dtname, nbatch)
    sites = {fn: (loads, stores) for fn, loads, stores in spec.sites}
    extra = _text_sites(lp, program)
    consts = {k: v for k, v in FLAGS.items() if f"{k}: tl.constexpr" in spec.source}
    block_f, hd = csym("BLOCK_F"), csym("HEAD_DIM")
    T, NFT = sp.ceiling(lp.schedule.row[1] / CHUNK), sp.ceiling(NFEAT / block_f)
    axes = {"crow": (CHUNK, CHUNK_IDX * CHUNK), "feat": (block_f, _FT * block_f), "col": (HEAD_DIM_V, 0),
            "HEAD_DIM": (hd, 0), "chunk": (1, CHUNK_IDX), _ONE: (1, 0)}
    shape = {"_chunk_scan": (scan_grid(), {("loop", 0): (CHUNK_IDX, 0, T)}),
             "_bwd_scan": (scan_grid(), {("loop", 0): (CHUNK_IDX, 0, T)}),
             **{k: (((CHUNK_IDX, T),), {("loop", 0): (_FT, 0, NFT)}) for k in ("_bwd_dk", "_bwd_dv", "_bwd_dq")}}
    out = []
    for fn in KERNELS:
        loads = tuple(_boundary(x) for x in sites[fn][0]) + extra[fn][0]
        led = function_ledger(program, spec.source, fn, loads, extra[fn][1], "out", consts, {"fidx": "i"})
        out.append(CL.Launch(fn, led, *shape[fn], scan_axes(axes) if fn in SCANS else axes, None, spec.source))
    return out


def cost(lb, dims: dict, batch: tuple, dtname: str, config: LinearConfig | None = None):
    """BackwardCost (runtime/backward_cost_all.py) of a chunked backward call (dims in codegen names)."""
    program, lp = lb.planner.cg_program, lb.lp
    s = lp.schedule
    n, e = (int(sy.evaluate(x, dims)) for x in (s.row[1], s.col[1]))
    d = int(sy.evaluate(lp.branch.dot.extent, dims))
    nfeat = lp.features(d)
    cfg = config or linear_backward.INTERPRETER_CONFIG or LinearConfig(*chunk_config(torch.device("cpu"), n, nfeat))
    cv = consts_of(cfg, d, e, nfeat)
    size = {"float64": 8, "float32": 4, "float16": 2, "bfloat16": 2}[dtname]
    acc = 8 if dtname == "float64" else 4
    eb = {name: size if node.dtype == ir.FLOAT else 1 if node.dtype == ir.BOOL else 8
          for name, node in program.input_map.items()}
    eb.update({x: acc for x in ("S", "zs", "fw", "dn", "dz", "U", "uz", "dQ", "dK", "dV")}, fidx=4)
    grads = {f"grad_{x}": acc for x in lb.spec(dtname, len(batch)).scatters}
    env = {x: dims[x.name] for x in program.dims}
    zl = math.prod(batch) * math.prod(int(sy.evaluate(x, dims)) for _, x in s.lead)
    out = {}
    for x in launches(lb, dtname, len(batch)):
        if not n * e * zl:   # runtime/linear_backward.py launches nothing
            break
        c = CL.total_counts([x], s, env, cv, {**eb, **grads}, math.prod(batch))
        if grads:   # one flop per active lane of an atomic add: its loaded lanes
            ones = CL.total_counts([x], s, env, cv, {**dict.fromkeys(eb, 0), **dict.fromkeys(grads, 1)},
                                   math.prod(batch))
            c.flops += ones.dram_bytes_loaded
        out[x.fn] = work_of(x.fn, c)
    return BackwardCost("linear", out, ("dn = dO / Z, dz = -delta / Z and delta are torch operations around the "
                                        "kernels: not kernel work, not counted",))
