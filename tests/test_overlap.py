"""Config.overlap (codegen/emit.py `_ahead`): the loop over full key tiles computes each next tile's q . k^T one
iteration ahead, so that its tensor-core work runs while the current tile's softmax does (FlashAttention-3's
intra-warpgroup overlap). The results equal the plain kernel's, and the sm_90 machine code interleaves the next
tile's HGMMA with the current tile's exp2 (MUFU.EX2), where the plain loop waits for all of q . k^T first."""
import re
import sys
from pathlib import Path

import pytest
import torch

import moa
from moa.runtime.check import random_inputs
from moa.runtime.plan import TILED, Plan, overlaps
from moa.runtime.tiling import Config

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_sass import _key_loops, _opcode  # noqa: E402

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
DIMS = {"n": 150, "m": 130, "d": 16, "e": 16, "h": 4, "g": 2}


@pytest.mark.parametrize("name", ["causal", "sdpa", "sliding_window", "alibi", "gqa_alibi", "document_mask",
                                  "prefix_lm", "causal_bottom_right", "pi_attention"])
def test_overlap_equals_the_reference(name):
    k = moa.compile(EXAMPLES / f"{name}.moa")
    dims = {d.name: DIMS[d.name] for d in k.program.dims}
    ins = random_inputs(k.program, dims, seed=3, batch=2)
    ref = k.reference(**ins)
    sched = k.planner.schedule_for("O", dims, "float64")
    assert overlaps(sched) or name == "document_mask"   # its key loop runs the tiles a data scan keeps
    for cfg in (Config(32, 16, overlap=True), Config(16, 32, overlap=True)):
        out = k.launcher.tiled("O", k.bind(ins), False, plan=Plan("O", TILED, sched, cfg))[0]
        assert (out - ref).abs().max().item() <= 1e-12, (name, cfg)
    src = k.launcher.spec("O", "float64", 1, Config(32, 16, overlap=True), False, sched).source
    assert bool(re.search(r"qk_nxt\d* = tl.dot\(q\d*, tl.trans\(k\d*\)\)", src)) == overlaps(sched)


def test_the_next_tiles_hgmma_runs_among_this_tiles_exp2(tmp_path):
    """sm_90, bf16, d = 128: in the plain full-tile loop every MUFU.EX2 comes after the last HGMMA of q . k^T and
    its wait; with the look-ahead, HGMMAs of the next tile sit between the exp2s of this one."""
    k = moa.compile(EXAMPLES / "causal.moa")

    def runs(cfg):
        rep = k.aot(dtype="bf16", n=4096, d=128, e=128, config=cfg)
        assert rep.spills == 0
        full, _ = _key_loops(rep.cubin, tmp_path)
        ops = [_opcode(t) for t in full[0]]
        text = "".join("H" if o == "HGMMA" else "E" if o == "MUFU" else "" for o in ops)
        return len(re.findall(r"E+H+E", text))

    assert runs(Config(128, 64, 8, 3)) == 0
    assert runs(Config(128, 64, 8, 3, overlap=True)) >= 2


def test_the_tuner_times_the_look_ahead_where_it_changes_the_kernel(monkeypatch):
    """The two leading configs with overlap (and with TMA keys on compute capability 9.0), for a schedule whose
    kernel has a loop over full key tiles (sdpa's covers every key); none for one without (document_mask's key
    loop runs the tiles its data scan keeps)."""
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    dev = torch.device("cuda")

    def keys(name, dims, **params):
        k = moa.compile(EXAMPLES / f"{name}.moa", **params)
        return [p.key for p in k.planner.candidates("O", dims, "bfloat16", "bfloat16", dev, 2, 32)]

    causal = keys("causal", {"n": 8192, "d": 128, "e": 128})
    assert causal[:2] == ["tiled tiled 128x64 w8 s3", "tiled tiled 128x128 w8 s2"]
    assert causal[2:6] == [c + " overlap" for c in causal[:2]] + [c + " tma" for c in causal[:2]]
    assert any("overlap" in c for c in keys("sdpa", {"n": 8192, "m": 8192, "d": 128, "e": 128}))   # all full
    assert not any("overlap" in c for c in keys("document_mask", {"n": 8192, "d": 128, "e": 128}))   # a data scan
    pi = keys("pi_attention", {"n": 8192, "d": 128, "e": 128}, k=1024, s=64)
    assert pi[0] == "tiled split(b0 tiled, b1 residue s=64) 128x64 w8 s3" and pi[2].endswith(" overlap")
    assert pi[-1] == "tiled tiled 128x64 w8 s3"   # the runner-up schedule: one fused kernel


@pytest.mark.parametrize("schedule", ["residue", "split"])
def test_overlap_in_residue_lifted_branches(schedule):
    """The lifted branch's full b-space tiles (PiAttention's strided branch, alone in a split or with the window's
    hops in the residue schedule) look ahead too; n = 131 is no multiple of s = 7."""
    k = moa.compile(EXAMPLES / "pi_attention.moa", k=9, s=7, schedule=schedule)
    dims = {"n": 131, "d": 16, "e": 16}
    ins = random_inputs(k.program, dims, seed=2, batch=2)
    ref = k.reference(**ins)
    sched = k.planner.schedule_for("O", dims, "float64")
    assert overlaps(sched)
    for cfg in (Config(32, 16, overlap=True), Config(16, 32, overlap=True)):
        out = k.launcher.tiled("O", k.bind(ins), False, plan=Plan("O", TILED, sched, cfg))[0]
        assert (out - ref).abs().max().item() <= 1e-12, cfg
