"""K / V tiles through TMA tensor descriptors (Config.tma: a tuning candidate on Hopper GPUs). Triton's interpreter
executes descriptor loads, so the TMA kernels are checked in float64 like the others: out-of-bounds rows and
head-dim lanes come back zero as from the masked loads; layouts the copy engine cannot address fall back to
plain loads; the variant compiles for sm_90 without spills and issues bulk tensor copies."""
import dataclasses
from pathlib import Path

import pytest
import torch

import moa
from moa.runtime import launch, plan
from moa.runtime.check import random_inputs
from moa.runtime.tiling import Config

ROOT = Path(__file__).resolve().parents[1]
TMA = Config(16, 16, tma=True)
CASES = [("causal", {}), ("gqa_alibi", {}), ("document_mask", {}), ("pi_attention", {"k": 20, "s": 7}),
         ("sliding_window", {"w": 20}), ("softcap", {}), ("relative_bias", {})]


@pytest.fixture
def descriptors(monkeypatch):
    """The descriptors the launcher builds (tensor shapes and boxes)."""
    made = []

    def counting(t, shape, strides, block):
        made.append((tuple(shape), tuple(block)))
        return real(t, shape, strides, block)

    real = launch.TensorDescriptor
    monkeypatch.setattr(launch, "TensorDescriptor", counting)
    return made


def _run(k, x, config=TMA):
    out, _ = k.launcher.tiled(k.output_names[0], k.bind(x), store_lse=False, config=config)
    return (out - k.reference(**x)).abs().max().item()


@pytest.mark.parametrize("name,params", CASES, ids=[c[0] for c in CASES])
def test_tma_kernels_are_exact(name, params, descriptors):
    k = moa.compile(ROOT / "examples" / f"{name}.moa", **params)
    values = {"n": 70, "m": 70, "d": 20, "e": 12, "h": 4, "g": 2}   # ragged rows, head dims below their tiles
    x = random_inputs(k.program, {d.name: values[d.name] for d in k.program.dims}, batch=2)
    assert _run(k, x) < 1e-12
    assert len(descriptors) == 2 and all(box[-2] == 16 for _, box in descriptors)   # K and V, BLOCK_N rows


def test_layouts_the_copy_engine_cannot_address_fall_back(descriptors):
    k = moa.compile(ROOT / "examples" / "causal.moa")
    g = torch.Generator().manual_seed(0)
    q = torch.randn(50, 3, generator=g, dtype=torch.float64)
    kk = torch.randn(3, 50, generator=g, dtype=torch.float64).t()    # last axis strided
    v = torch.randn(50, 3, generator=g, dtype=torch.float64)        # rows of 24 bytes: not 16-byte aligned
    assert _run(k, {"Q": q, "K": kk, "V": v}) < 1e-12
    assert descriptors == []
    x = {n: torch.randn(1, 40, 16, generator=g, dtype=torch.float64).expand(3, 40, 16) for n in "QKV"}
    assert _run(k, x) < 1e-12 and descriptors == []     # a broadcast batch axis (stride 0)


def test_hopper_tuning_times_tma_candidates(monkeypatch):
    k = moa.compile(ROOT / "examples" / "causal.moa")
    g = torch.Generator().manual_seed(1)
    x = {n: torch.randn(2, 70, 16, generator=g, dtype=torch.float64) for n in "QKV"}
    b = k.bind(x)
    monkeypatch.setattr(plan, "tma_capable", lambda device: True)
    cands = k.planner.candidates("O", b.dims, "float64", "float64", b.device, 1, 2)
    tma = [c for c in cands if c.config is not None and c.config.tma]
    assert [c.key for c in tma] == [c.key + " tma" for c in cands[:2]]
    ref = k.reference(**x)
    for c in tma:
        assert (k.launcher.run("O", b, c) - ref).abs().max().item() < 1e-12
    monkeypatch.setattr(plan, "tma_capable", lambda device: False)
    assert not any(c.config is not None and c.config.tma
                   for c in k.planner.candidates("O", b.dims, "float64", "float64", b.device, 1, 2))


def test_tma_variant_compiles_for_hopper():
    k = moa.compile(ROOT / "examples" / "gqa_alibi.moa")
    for d in (64, 128):
        plain = k.aot(target="sm_90", dtype="bf16", config=Config(128, 64, 8, 3), n=4096, d=d, e=d, h=32, g=8)
        rep = k.aot(target="sm_90", dtype="bf16", config=dataclasses.replace(plain_cfg(plain), tma=True),
                    n=4096, d=d, e=d, h=32, g=8)
        assert rep.spills == 0 and rep.shared_bytes <= 227 * 1024 and rep.uses_wgmma
        assert "cp.async.bulk.tensor" in rep.ptx and "cp.async.bulk.tensor" not in plain.ptx


def plain_cfg(rep):
    return Config(rep.block_m, rep.block_n, rep.num_warps, rep.num_stages)
