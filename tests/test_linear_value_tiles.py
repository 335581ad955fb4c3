"""The chunked linear form's scan split along the value axis (LinearConfig.block_v: BLOCK_V columns of the state
per program, cdiv(HEAD_DIM_V, BLOCK_V) times the programs): the same output, carried state and counters as the
unsplit scan, in float64 in the interpreter; the cost model counts the split exactly as the interpreter runs it."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

import moa
from moa.runtime.check import random_inputs
from moa.runtime.costing import cost
from moa.runtime.measure import instrument
from moa.runtime.tiling import LinearConfig

ROOT = Path(__file__).resolve().parents[1]
LINEAR = ("power", "power_gated", "linear", "linear_relu")
WHOLE = LinearConfig(16, 16)                 # one value tile (BLOCK_V = HEAD_DIM_V)
SPLIT = LinearConfig(16, 16, block_v=16)     # e = 40: HEAD_DIM_V = 64, four value tiles
DIMS = {"n": 37, "d": 5, "e": 40}


def _setup(name, batch=2, seed=0):
    k = moa.compile(ROOT / "examples" / f"{name}.moa", form="linear")
    dims = {x.name: DIMS[x.name] for x in k.program.dims}
    inputs = random_inputs(k.program, dims, seed=seed, batch=batch, dtype=torch.float64)
    return k, dims, inputs


def _run(k, inputs, cfg):
    (name,) = k.output_names
    return k.launcher.linear(name, k.bind(inputs), config=cfg)


@pytest.mark.parametrize("name", LINEAR)
def test_value_tiles_give_the_same_output(name):
    k, dims, inputs = _setup(name)
    ref = k.reference(**inputs)
    whole, split = _run(k, inputs, WHOLE), _run(k, inputs, SPLIT)
    scale = ref.abs().max().clamp(min=1.0)
    assert ((split - ref).abs().max() / scale).item() <= 1e-12
    assert ((split - whole).abs().max() / scale).item() <= 1e-13


@pytest.mark.parametrize("name", LINEAR)
def test_value_tiles_counted_exactly(name):
    """cost(config=LinearConfig) equals what the interpreter executes for that config: FLOPs, transcendentals,
    bytes loaded and stored, programs (the normaliser stored by the first value tile only)."""
    k, dims, inputs = _setup(name, batch=2, seed=3)
    for cfg in (WHOLE, SPLIT, dataclasses.replace(SPLIT, block_v=32)):
        with instrument() as got:
            _run(k, inputs, cfg)
        want = cost(k, dtype="float64", device="cpu", config=cfg, batch=(2,), **dims)
        assert (got.flops, got.transcendentals, got.dram_bytes_loaded, got.dram_bytes_stored) == \
            (want.flops, want.transcendentals, want.dram_bytes_loaded, want.dram_bytes_stored), cfg
    whole = cost(k, dtype="float64", device="cpu", config=WHOLE, batch=(2,), **dims)
    split = cost(k, dtype="float64", device="cpu", config=SPLIT, batch=(2,), **dims)
    assert split.tiles_visited == 4 * whole.tiles_visited   # (chunk, feature tile, value tile) blocks
    assert split.dram_bytes_stored == whole.dram_bytes_stored   # every state stored once


@pytest.mark.parametrize("name", ["power_gated", "linear"])
def test_value_tiles_carry_the_ring_state(name):
    """The ring's phases with value tiles: the total state after the last chunk (FINAL: S0 by every value tile's
    columns, z0 and the gate g0 by the first) and a scan continuing a carried state (INIT) as without them."""
    k, dims, inputs = _setup(name, batch=1, seed=5)
    (out,) = k.output_names
    runner = k.launcher.linear_runner(out)
    b = k.planner.cg_binding(k.bind(inputs))
    res = {}
    for cfg in (WHOLE, SPLIT):
        total = runner.prepare(b, torch.float64, "float64", cfg)
        runner.scan(total, prefix=False, final=True)
        cont = runner.prepare(b, torch.float64, "float64", cfg)
        cont.carried = tuple(x.clone() for x in total.carried)
        runner.scan(cont, init=True)
        res[cfg] = (*total.carried, runner.output(cont))
    for a, c in zip(res[WHOLE], res[SPLIT]):
        assert torch.equal(a, c) or (a - c).abs().max().item() <= 1e-13 * a.abs().max().clamp(min=1.0).item()


def test_value_split_rule_and_its_predicted_time():
    """A launch halves BLOCK_V while twice the scan's programs fit on the SMs (down to 32 columns:
    moa.linear.scan_value_tile, linear_cost.linear_launch_split); the cost model (with the occupancy of each launch)
    predicts the split scan faster at the issue's shape, and a CUDA-table prediction without a config splits as a
    launch does."""
    from moa.linear import scan_value_tile
    from moa.runtime.linear_cost import linear_launch_split

    assert scan_value_tile(128, 64, 128, 32, 132) == 64                  # 64 -> 128 programs
    assert scan_value_tile(128, 64, 128, 64, 132) == 128                 # 128 already
    assert scan_value_tile(128, 64, 128, 1, 132) == 32                   # 2 -> 8, not below 32
    assert scan_value_tile(128, 64, 32, 1, 132) == 32                    # a 32-wide value tile
    k = moa.compile(ROOT / "examples" / "linear.moa", form="linear")
    dims = {"n": 8192, "d": 128, "e": 128}
    lp = k.planner.linear_plans["O"][0]
    assert linear_launch_split(lp, dims, (2, 16), 132) == LinearConfig(64, 64, block_v=64)
    assert linear_launch_split(lp, dims, (4, 16), 132) == LinearConfig(64, 64)
    assert linear_launch_split(lp, dims, (2, 16), 132, LinearConfig(64, 64, block_v=64)) == \
        LinearConfig(64, 64, block_v=64)   # already split: kept
    t = {c: cost(k, dtype="bf16", device="h200", batch=(2, 16), config=c, **dims).predicted_seconds
         for c in (LinearConfig(64, 64), LinearConfig(64, 64, block_v=64), None)}
    assert t[None] == t[LinearConfig(64, 64, block_v=64)] < 0.8 * t[LinearConfig(64, 64)]
