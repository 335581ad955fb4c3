"""How many key splits a decoding call runs (flash-decoding), from the shape of the grid and the device table.

One launch of the tiled kernel runs P = (row tiles) x batch x heads programs, each over all T key tiles. With a
few query rows, P is far below the device's SM count and most of the device idles. Splitting the key axis into
S contiguous splits of ceil(T / S) tiles gives P S programs; a second, small kernel merges the S partials.
The time model (per launch, the device of moa/devices.py):

  tile     = max(bytes of one K/V tile x SMs / DRAM bandwidth, flops of one tile x SMs / matmul peak):
             one SM's share of the device streaming one key tile (decoding is bandwidth-bound)
  main(S)  = ceil(P S / SMs) waves x ceil(T / S) tiles x tile
  merge(S) = launch overhead + (S partial rows of O and lse written and read back + the output) / bandwidth
  time(S)  = launch + main(S) + (merge(S) if S > 1)

S ranges over 1 .. min(T, 256); the smallest time wins (ties: fewer splits), and only if it saves 10% over one
launch (the wave quantisation alone of a saturated grid is not worth a second launch). It is a model, not a measurement:
on a GPU the tuner (runtime/tune.py) may time the candidates instead.
"""
from __future__ import annotations

from dataclasses import dataclass

import sympy as sp

from . import intervals as iv
from .devices import DTYPE_BYTES, get_device

MAX_SPLITS = 256
MIN_GAIN = 0.9    # splitting must save 10% of the predicted time


@dataclass(frozen=True)
class SplitChoice:
    splits: int
    seconds: float            # predicted time at `splits`
    unsplit_seconds: float    # predicted time of one launch (S = 1)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def split_seconds(splits: int, programs: int, key_tiles: int, block_m: int, block_n: int, head: int, head_v: int,
                  rows: int, dtype: str = "bfloat16", device: str = "h100", longest: int | None = None,
                  mix: tuple | None = None) -> float:
    """Predicted seconds of a decoding call with `splits` key splits (see the module docstring). rows: output rows
    of the call (batch x heads x query rows); head, head_v: the contraction and value extents; longest: the key
    tiles of the longest program when known (the cost model's count), else ceil(T / S). mix: ((programs, key
    tiles) ...) when the programs' keys differ (a varlen batch's sequences; key_tiles is the longest): the
    longest split bounds the time from below, the tiles of all of them fill the SMs' waves."""
    dev = get_device(device)
    eb = DTYPE_BYTES.get(dtype, 2)
    acc = 8 if dtype == "float64" else 4
    bw = dev.hbm_bytes_per_s
    tile = max(block_n * (head + head_v) * eb * dev.sms / bw,
               2.0 * block_m * block_n * (head + head_v) * dev.sms / dev.matmul_rate(dtype))
    per = _cdiv(key_tiles, splits) if longest is None else longest
    if mix:
        work = sum(p * kt for p, kt in mix)
        t = dev.launch_s + _cdiv(work, dev.sms * max(per, 1)) * per * tile
    else:
        t = dev.launch_s + _cdiv(programs * splits, dev.sms) * per * tile
    if splits > 1:
        t += dev.launch_s + (2 * splits * rows * (head_v + 1) * acc + rows * head_v * eb) / bw
    return t


def choose_splits(programs: int, key_tiles: int, block_m: int, block_n: int, head: int, head_v: int, rows: int,
                  dtype: str = "bfloat16", device: str = "h100", mix: tuple | None = None) -> SplitChoice:
    """The number of key splits with the smallest predicted time (mix: see split_seconds)."""
    best = None
    for s in range(1, max(1, min(key_tiles, MAX_SPLITS)) + 1):
        if s > 1 and _cdiv(key_tiles, s) == _cdiv(key_tiles, s - 1):
            continue   # the same tiles per split as fewer splits: more programs, no shorter loop
        t = split_seconds(s, programs, key_tiles, block_m, block_n, head, head_v, rows, dtype, device, mix=mix)
        if best is None or t < best[1]:
            best = (s, t)
    one = split_seconds(1, programs, key_tiles, block_m, block_n, head, head_v, rows, dtype, device, mix=mix)
    if best[1] > MIN_GAIN * one:   # a few percent of wave quantisation is not worth a second launch
        return SplitChoice(1, one, one)
    return SplitChoice(best[0], best[1], one)


def key_range(schedule, dims: dict) -> tuple[int, int] | None:
    """[lo, hi]: the keys any row of the call may admit (the union over branches of the loop bounds of the
    schedule, evaluated on the box of every row), or None when a bound does not evaluate (a data-dependent or
    per-head bound): the splits then cover every key. Splitting only [lo, hi] keeps a sliding window's splits
    inside the window."""
    rows = _eval(schedule.row[1], {}, dims)
    if not rows:
        return None
    los, his = [], []
    for b in schedule.branches:
        m = _eval(b.extent, {}, dims)
        if m is None:
            return None
        box = {iv.I_LO: 0, iv.I_HI: rows - 1}
        lo = 0 if b.key_lo is None else _eval(sp.Max(0, b.key_lo), box, dims)
        hi = m - 1 if b.key_hi is None else _eval(sp.Min(m - 1, b.key_hi), box, dims)
        if lo is None or hi is None:
            return None
        los.append(lo)
        his.append(hi)
    return (min(los), max(his)) if los else None


def _eval(e, box: dict, dims: dict):
    e = sp.sympify(e)
    vals = {s: sp.Integer(box[s]) if s in box else sp.Integer(dims[s.name]) for s in e.free_symbols
            if s in box or s.name in dims}
    v = e.xreplace(vals)
    return int(v) if v.is_Integer else None


def call_key_range(schedules, dims: dict):
    """The keys some row admits in any output of a call (key_range over every schedule), or None."""
    spans = [key_range(s, dims) for s in schedules]
    if not spans or any(x is None for x in spans):
        return None
    return min(x[0] for x in spans), max(x[1] for x in spans)
