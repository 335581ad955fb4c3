"""Predicted time of each legal schedule of an output (moa/onf.py `variants`): the schedule choice.

A schedule-level model, evaluated from the ONF alone (nothing is generated or run). The row tiles of the
schedule (contiguous, or per residue for the residue lifting i = r + s a) are enumerated; for each branch the
kernel's own loop bounds and skip tests give the visited key tiles (key-tile loops, in b-space for a lifted
branch) or hops (hop loops). Per visit:

  key tile   tl.dot 2 BM BN (D + E) (tensor cores), 8 BM BN + 2 BM E other (scale, mask, max, exp argument,
             row sum, rescale), BM BN exp2; loads BN (d + e) elements of K and V;
  hop        2 BM D + 3 BM E + 8 BM row-wise (CUDA cores: multiply and row sum, p v, rescale), 2 BM exp2;
             loads BM (d + e) elements (one key row per query row);

with D, E the head dims padded to powers of two (>= 16) as the launcher pads them, and per program the query
tile and the output tile. Bytes that reach HBM count every input of a key-tile loop at most once when a (batch,
head)'s key-side inputs fit in half of L2 (as moa/cost.py); a hop loop's rows count in full (measured on an H200
on 2026-12-04: PiAttention's hop schedule, 8.6 GB of hop rows at n = 8192, took 2.1 ms, i.e. its hop loads ran
at about the HBM rate, where the L2 rule predicted 0.36 ms). Time = max(tl.dot FLOPs at the dtype's matrix
peak + other FLOPs at the vector peak, bytes at the HBM bandwidth, exp2 at the transcendental rate), divided
by the launch's occupancy when its programs are fewer than the SMs (`Device.occupancy`), + one launch
(moa/devices.py). A split schedule (moa/split.py) is its kernels' predictions summed, plus its stored values.

Leading axes (heads, comprehension axes) multiply the work; formulas that depend on a leading index are
evaluated at index 0. The exact, kernel-level model (moa/cost.py) counts what the generated kernel does;
this one only ranks schedules, with the same device table.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import sympy as sp

from . import dnf as D
from . import intervals as iv
from . import onf
from . import symbolic as sy
from .exprfold import np_eval
from .devices import DTYPE_BYTES, canonical_dtype, get_device

TIE = 0.01  # predictions within 1% of the best are a tie: the first legal kind (tiled, hops, residue) wins


@dataclass(frozen=True)
class Prediction:
    """What one schedule does for the call's dims (summed over batch and leading axes)."""
    label: str
    programs: int
    tiles: int            # key tiles visited (key-tile loops, lifted ones included)
    hops: int             # hops visited (hop loops), each a [BLOCK_M] vector of rows
    dot_flops: int
    other_flops: int
    transcendentals: int
    hbm_bytes: int
    seconds: float
    bound: str


def _vec(x, size):
    return np.broadcast_to(np.asarray(x, dtype=np.int64), (size,)).astype(np.int64)


def _row_tiles(s: onf.Schedule, dims: dict, bm: int) -> dict:
    """The programs' row boxes: arrays I_LO, I_HI (rows i) and, for the residue schedule, A_LO, A_HI (rows a)
    and the residue r of each program."""
    n = sy.evaluate(s.row[1], dims)
    if s.kind != onf.RESIDUE:
        lo = np.arange(0, n, bm, dtype=np.int64)
        return {"I_LO": lo, "I_HI": np.minimum(lo + bm, n) - 1}
    st = s.lift.stride
    rs = np.arange(min(st, max(n, 0)), dtype=np.int64)   # residues r >= n hold no row (a stride of 2^30 ...)
    per = (n - 1 - rs) // st + 1       # rows of residue r
    tiles = -(-per // bm)
    res = np.repeat(rs, tiles)
    alo = (np.arange(len(res)) - np.repeat(np.cumsum(tiles) - tiles, tiles)) * bm
    ahi = np.minimum(alo + bm, per[res]) - 1
    return {"I_LO": res + st * alo, "I_HI": res + st * ahi, "A_LO": alo, "A_HI": ahi, "r": res}


def _key_tiles(b, env, lo_f, hi_f, ext, box_lo, box_hi, bn):
    """Key tiles a key-tile loop visits (not skipped) over all row boxes, with the kernel's own bounds and test."""
    R = len(box_lo)
    e = {**env, iv.I_LO: box_lo, iv.I_HI: box_hi}
    m = _vec(np_eval(ext, e), R)
    lo = np.zeros(R, dtype=np.int64) if lo_f is None else np.maximum(0, _vec(np_eval(lo_f, e), R))
    lo = (lo // bn) * bn
    hi = m - 1 if hi_f is None else np.minimum(m - 1, _vec(np_eval(hi_f, e), R))
    cnt = np.maximum(0, -(-(hi + 1 - lo) // bn))
    if b.skip is sp.false or cnt.sum() == 0:
        return int(cnt.sum())
    rows = np.repeat(np.arange(R), cnt)
    first = np.cumsum(cnt) - cnt
    starts = lo[rows] + (np.arange(len(rows)) - first[rows]) * bn
    te = {k: (v[rows] if isinstance(v, np.ndarray) and v.shape == (R,) else v) for k, v in e.items()}
    te.update({iv.J_LO: starts, iv.J_HI: np.minimum(starts + bn, m[rows]) - 1})
    skip = np.broadcast_to(np_eval(b.skip, te), (len(rows),)).astype(bool)
    return int((~skip).sum())


def _hops(h, env, box_lo, box_hi, valid) -> tuple[int, int]:
    """(hops visited over all row boxes, the same weighted by each box's valid rows: the rows a hop loads)."""
    e = {**env, iv.I_LO: box_lo, iv.I_HI: box_hi}
    lo, hi = _vec(np_eval(h.t_lo, e), len(box_lo)), _vec(np_eval(h.t_hi, e), len(box_lo))
    per = np.maximum(0, hi - lo + 1)
    return int(per.sum()), int((per * valid).sum())


def predict(s: onf.Schedule, dims: dict, dtype="bfloat16", device="h100", block_m=128, block_n=64,
            batch: int = 1, fills: bool = False) -> Prediction:
    """The predicted work and time of schedule s for concrete dims (name -> int); fills: the launch fills the
    device whatever its row tiles (a split-KV decode chooses its key splits for that): no occupancy term."""
    if s.kind == onf.SPLIT:
        return _predict_split(s, dims, dtype, device, block_m, block_n, batch, fills)
    dev = get_device(device)
    dtype = canonical_dtype(dtype)
    elt = DTYPE_BYTES[dtype]
    env = {sp.Symbol(k, integer=True, positive=True): v for k, v in dims.items()}
    for v, _ in s.lead:
        env[v] = 0
    inst = batch * math.prod(sy.evaluate(x, dims) for _, x in s.lead)
    rows = _row_tiles(s, dims, block_m)
    R = len(rows["I_LO"])
    valid = (rows["A_HI"] - rows["A_LO"] + 1) if "A_LO" in rows else (rows["I_HI"] - rows["I_LO"] + 1)   # per box
    if s.kind == onf.RESIDUE:
        env[s.lift.res] = rows["r"]
        for b in s.branches:
            if b.lift is not None:
                env[b.lift.base] = np_eval(b.lift.base_value, env)
    bm, bn = block_m, block_n
    e_dim = sy.evaluate(s.col[1], dims)
    E = sy.tile_width(e_dim)
    tiles = hops = dot = other = trans = 0
    loaded: dict = {}   # input -> elements loaded by the key-tile loops
    gathered = 0        # elements loaded by hop loops
    sizes: dict = {}    # input -> elements of one (batch, head) instance
    for b in s.branches:
        if b.skip is sp.true and b.mode != onf.HOPS:
            continue
        d = sy.evaluate(b.dot.extent, dims) if b.dot is not None else 0
        D = sy.tile_width(d) if d else 0
        m = sy.evaluate(b.lift.extent if b.mode == "lift" else b.extent, dims)
        if b.mode == onf.HOPS:
            visits, loaded_rows = _hops(b.hop, env, rows["I_LO"], rows["I_HI"], valid)
            hops += visits
            other += visits * (2 * bm * D + 3 * bm * E + 8 * bm)
            trans += visits * 2 * bm
            width = bm
        else:
            box = (rows["A_LO"], rows["A_HI"]) if b.mode == "lift" else (rows["I_LO"], rows["I_HI"])
            visits = _key_tiles(b, env, b.key_lo, b.key_hi, b.extent, *box, bn)
            tiles += visits
            dot += visits * 2 * bm * bn * (D + E)
            other += visits * (8 * bm * bn + 2 * bm * E)
            trans += visits * bm * bn if b.kind == "softmax" else 0
            width = bn
        for part, cols in ((b.dot.b if b.dot is not None else None, d), (b.value, e_dim)):
            for x in _reads(part):
                if b.mode == onf.HOPS:   # one key row per valid query row: no tile reuse, every row from HBM
                    gathered += loaded_rows * cols
                    continue
                loaded[x.name] = loaded.get(x.name, 0) + visits * width * cols
                sizes[x.name] = max(sizes.get(x.name, 0), m * cols)
    qd = max([sy.evaluate(b.dot.extent, dims) for b in s.branches if b.dot is not None], default=0)
    rows_io = int(valid.sum()) * (qd + e_dim)  # the query and output rows of every program (masked past the rows)
    hbm = sum(loaded.values())
    if sum(sizes.values()) * elt <= dev.l2_bytes / 2:  # K, V re-reads served from L2: each read once from HBM
        hbm = sum(min(v, sizes[k]) for k, v in loaded.items())
    hbm = (hbm + gathered + rows_io) * elt * inst
    dot, other, trans = dot * inst, other * inst, trans * inst
    parts = {"compute": dot / dev.matmul_rate(dtype) + other / dev.vector_rate(dtype),
             "memory": hbm / dev.hbm_bytes_per_s, "transcendental": trans / dev.transcendental_rate(dtype)}
    bound = max(parts, key=parts.get)   # a launch of fewer programs than SMs has a share of the device
    return Prediction(onf.label(s), R * inst, tiles * inst, hops * inst, int(dot), int(other), int(trans), int(hbm),
                      parts[bound] / (1.0 if fills else dev.occupancy(R * inst)) + dev.launch_s, bound)


def _predict_split(s: onf.Schedule, dims: dict, dtype, device, block_m, block_n, batch, fills) -> Prediction:
    """A split schedule (moa/split.py): its kernels one after the other, plus the stored branch values: each
    written in the accumulation dtype (the part's prediction counted its output tile at the input width) and read
    once by the final kernel."""
    dev = get_device(device)
    dtype = canonical_dtype(dtype)
    preds = [predict(k, dims, dtype, device, block_m, block_n, batch, fills) for k in s.split.kernels]
    acc = 8 if dtype == "float64" else 4
    inst = batch * math.prod(sy.evaluate(x, dims) for _, x in s.lead)
    values = sy.evaluate(s.row[1], dims) * sy.evaluate(s.col[1], dims) * inst * len(s.split.parts)
    extra = values * (2 * acc - DTYPE_BYTES[dtype])
    top = max(preds, key=lambda p: p.seconds)
    return Prediction(onf.label(s), sum(p.programs for p in preds), sum(p.tiles for p in preds),
                      sum(p.hops for p in preds), sum(p.dot_flops for p in preds), sum(p.other_flops for p in preds),
                      sum(p.transcendentals for p in preds), sum(p.hbm_bytes for p in preds) + int(extra),
                      sum(p.seconds for p in preds) + extra / dev.hbm_bytes_per_s, top.bound)


def _reads(e):
    return [] if e is None else [x for x in D.nodes(e) if isinstance(x, D.Read)]


def choose(variants, dims: dict, dtype="bfloat16", device="h100", block_m=128, block_n=64, batch: int = 1,
           fills: bool = False):
    """(the chosen schedule, its index, the predictions of every variant): the smallest predicted time; a
    prediction within TIE of the best counts as equal and the earlier variant (simpler kind) wins."""
    preds = [predict(v, dims, dtype, device, block_m, block_n, batch, fills) for v in variants]
    best = min(p.seconds for p in preds)
    k = next(k for k, p in enumerate(preds) if p.seconds <= best * (1 + TIE))
    return variants[k], k, preds
