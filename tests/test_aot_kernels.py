"""The generated kernels compiled for sm_90 without a GPU: the config the runtime launches never spills, stays in
the 227 KiB shared-memory budget and uses wgmma (fp16/bf16, d in {64, 128}, every softmax-family example and
the quadratic form of the normalised ones (power, linear), in the schedule the runtime chooses for the dims:
tiled, hops or residue)."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import difflib  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

import moa  # noqa: E402
from moa.cli import main  # noqa: E402
from moa import onf  # noqa: E402
from moa.errors import UnsupportedError  # noqa: E402
from moa.runtime import aot as A  # noqa: E402
from moa.runtime import costing as K  # noqa: E402
from moa.runtime.kernel import Config  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
KB = 1024


def softmax_family():
    out = []
    for path in sorted((ROOT / "examples").glob("*.moa")):
        k = moa.compile(path, form="quadratic")
        try:
            scheds = k.schedules
        except UnsupportedError:
            continue
        bs = [b for s in scheds.values() for b in s.branches]
        if bs and all(b.kind in ("softmax", "norm") and getattr(b, "mix", None) is None for b in bs):
            out.append((path.stem, k))
    return out


FAMILY = softmax_family()
# PiAttention's short-skip setting, where the runtime chooses the hop schedule (the default params choose residue)
FAMILY.append(("pi_attention_hops", moa.compile(ROOT / "examples" / "pi_attention.moa", s=64, T=8)))
# fp16 kernels differ from bf16 ones only in the dtype they cast to (test below): fp16 is compiled for a
# representative subset (both head dims), bf16 for every example
FP16 = ("causal", "sliding_window", "pi_attention", "relative_bias", "power", "linear")


def dims_for(k, d):
    values = {"n": 4096, "m": 4096, "d": d, "e": d, "h": 8, "g": 2}
    return {x.name: values[x.name] for x in k.program.dims}


@pytest.fixture(scope="module")
def fitted():
    """(example, d, dtype) -> (config, AotReport with .schedule), every fit search (the runtime's schedules in
    order, each with its candidate configs: configs.fit_schedule) compiled in one child process."""
    keys, plans = [], []
    for name, k in FAMILY:
        for d in (64, 128):
            for dt in ("bfloat16", "float16"):
                if dt == "float16" and name not in FP16:
                    continue
                keys.append((name, d, dt))
                plans.append(K.fit_plan(k, k.output_names[0], dt, dims_for(k, d)))
    results = K.aot_groups([[r for _, _, r in plan] for plan in plans], first_fit=True)
    out = {}
    for key, plan, res in zip(keys, plans, results):
        i, rep = K.choose_plan(plan, res, "sm_90", str(key))
        out[key] = (plan[i][1], rep)
    return out


def test_family_is_not_empty():
    names = {n for n, _ in FAMILY}
    assert {"sdpa", "causal", "sliding_window", "pi_attention", "gqa_alibi", "power", "power_gated", "linear",
            "linear_relu"} <= names


def test_the_schedule_that_fits_is_launched(fitted):
    """The predicted-fastest schedule when its kernel fits; at d = 128 the hop loop spills on sm_90 (row-wise
    [BLOCK_M, 128] key and value tiles beside two accumulators) and the next schedule is launched instead."""
    assert fitted[("pi_attention", 64, "bfloat16")][1].schedule.startswith("residue")
    assert fitted[("pi_attention_hops", 64, "bfloat16")][1].schedule == "hops"
    assert fitted[("pi_attention_hops", 128, "bfloat16")][1].schedule != "hops"
    assert fitted[("causal", 128, "bfloat16")][1].schedule == "tiled"
    k = dict(FAMILY)["pi_attention_hops"]
    ranking = K.ranked_schedules(k, "O", "bfloat16", dims_for(k, 128), "sm_90")
    assert ranking[0].kind == "hops" and len(ranking) == 3


def test_runtime_configs_fit_and_use_wgmma(fitted):
    rows = []
    for (name, d, dt), (cfg, rep) in sorted(fitted.items()):
        rows.append(f"{name:22s} d={d:3d} {dt:8s} {rep.schedule:12s} {cfg.block_m}x{cfg.block_n} w{cfg.num_warps} "
                    f"s{cfg.num_stages}: "
                    f"{rep.registers} regs, {rep.spills} B spills, {rep.shared_bytes} B shared, wgmma {rep.uses_wgmma}")
        assert rep.spills == 0, rows[-1]
        assert rep.uses_wgmma, rows[-1]
        assert 0 < rep.shared_bytes <= 227 * KB, rows[-1]
        assert rep.registers <= 255 and rep.registers * rep.num_warps * 32 <= 64 * KB, rows[-1]
        assert A.fits(rep, "sm_90") == (True, "ok")
        assert (rep.block_m, rep.block_n, rep.num_warps, rep.num_stages) == \
            (cfg.block_m, cfg.block_n, cfg.num_warps, cfg.num_stages)
        assert cfg.block_m >= 64   # wgmma needs M = 64 per warpgroup
    print("\n".join(rows))


def test_the_default_table_is_kept_when_it_fits(fitted):
    default = Config(128, 64, 8, 3)
    for d in (64, 128):
        assert fitted[("causal", d, "bfloat16")][0] == default
        assert fitted[("sdpa", d, "bfloat16")][0] == default
    # two accumulators at d = 128 do not fit in 255 registers with 128-row tiles: smaller tiles are chosen
    assert fitted[("pi_attention", 128, "bfloat16")][0] != default


def test_fp16_and_bf16_kernels_differ_only_in_dtype_names():
    """... and, for normalised weights (unbounded, unlike softmax's p), in the weights @ V dot: bf16 casts the
    weights (fp32's range), fp16 would overflow and runs it in tf32 (both kinds are AOT-checked above)."""
    for name, k in FAMILY:
        a = k.source(dtype="bfloat16").splitlines()
        b = k.source(dtype="float16").splitlines()
        changed = [ln for ln in difflib.unified_diff(a, b, lineterm="", n=0)
                   if ln[:1] in "+-" and not ln.startswith(("+++", "---"))]
        norm = any(b.kind == "norm" for s in k.schedules.values() for b in s.branches)
        for ln in changed:
            assert "bfloat16" in ln or "float16" in ln or (norm and 'input_precision="tf32"' in ln), (name, ln)


def test_kernel_aot_report(fitted):
    k = dict(FAMILY)["causal"]
    for d in (64, 128):
        r = k.aot(target="sm_90", dtype="bf16", n=8192, d=d, e=d)
        cfg, rep = fitted[("causal", d, "bfloat16")]
        assert (r.registers, r.spills, r.shared_bytes, r.uses_wgmma) == \
            (rep.registers, rep.spills, rep.shared_bytes, rep.uses_wgmma)
        assert (r.block_m, r.block_n, r.num_warps, r.num_stages) == \
            (cfg.block_m, cfg.block_n, cfg.num_warps, cfg.num_stages)
        assert r.cubin[:4] == b"\x7fELF" and "wgmma.mma_async" in r.ptx and r.target == "sm_90"


def test_moa_aot_cli(fitted, capsys):
    assert main(["aot", str(ROOT / "examples" / "causal.moa"), "--dims", "n=8192,d=128,e=128", "--dtype", "bf16",
                 "--target", "sm_90"]) == 0
    out = capsys.readouterr().out
    cfg, rep = fitted[("causal", 128, "bfloat16")]
    assert f"registers/thread  {rep.registers}" in out
    assert "spills            0 B" in out and "wgmma             yes" in out
    assert f"BLOCK_M={cfg.block_m} BLOCK_N={cfg.block_n}" in out


def test_a_forced_config_is_reported_even_when_it_does_not_fit():
    k = dict(FAMILY)["causal"]
    r = k.aot(target="sm_90", dtype="bf16", config=Config(128, 64, 8, 3), n=1024, d=512, e=512)
    ok, why = A.fits(r, "sm_90")
    assert not ok and "spills" in why and r.spills > 0


def test_fit_search_reports_every_config_it_tried():
    rep = A.AotReport(registers=255, spills=96, shared_bytes=50 * KB, uses_wgmma=True, num_warps=8, num_stages=3,
                      block_m=128, block_n=64, ptx="", cubin=b"", target="sm_90")
    cands = [Config(128, 64, 8, 3), Config(64, 64, 4, 2)]
    results = [rep, ("error", "cannot compile kernel '_attn_fwd' for sm_90 (...): needs 300000 bytes of shared "
                              "memory, more than the 232448 bytes sm_90 allows per block")]
    with pytest.raises(UnsupportedError) as e:
        K.choose_fitting(cands, results, "sm_90", "output O of x.moa")
    msg = e.value.message
    assert "does not fit on sm_90" in msg and "96 bytes of register spills" in msg
    assert "needs 292 KiB of shared memory > 227 KiB" in msg


def test_aot_needs_head_dims():
    k = dict(FAMILY)["causal"]
    with pytest.raises(moa.InputError, match="head dims"):
        k.aot(target="sm_90", dtype="bf16", n=1024)


def test_runtime_config_on_cuda_uses_the_fit(monkeypatch, fitted):
    import torch

    k = dict(FAMILY)["pi_attention"]
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    sched, cfg = K.runtime_config(k, "O", "bfloat16", dims_for(k, 128), 0, torch.device("cuda"))
    assert cfg == fitted[("pi_attention", 128, "bfloat16")][0]
    assert onf.label(sched) == fitted[("pi_attention", 128, "bfloat16")][1].schedule


def test_moa_cost_uses_the_config_the_gpu_runtime_launches(fitted, capsys):
    assert main(["cost", str(ROOT / "examples" / "sliding_window.moa"), "--dims", "n=4096,d=128,e=128"]) == 0
    out = capsys.readouterr().out
    cfg = fitted[("sliding_window", 128, "bfloat16")][0]
    assert cfg != Config(128, 64, 8, 3)      # the default spills for this mask at d = 128
    assert f"config O: BLOCK_M={cfg.block_m} BLOCK_N={cfg.block_n} num_warps={cfg.num_warps}" in out
