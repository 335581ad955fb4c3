"""The generated kernels compiled for sm_90 without a GPU: the config the runtime launches never spills, stays in
the 227 KiB shared-memory budget and uses wgmma (fp16/bf16, d in {64, 128}, every softmax-family example and
the quadratic form of the normalised ones (power, linear), in the schedule the runtime chooses for the dims:
tiled, hops or residue); and the other two kernel families the same way: the chunked linear form's two kernels
with every flag combination a launch uses (the ring's included) and the window-mixing kernel
(runtime/form_configs.py)."""


import dataclasses
import difflib
import types
from pathlib import Path

import pytest

import moa
from moa.cli import main
from moa import onf
from moa.errors import UnsupportedError
from moa.runtime import aot as A
from moa.runtime import configs as K
from moa.runtime import form_configs as F
from moa.runtime.tiling import Config

ROOT = Path(__file__).resolve().parents[1]
KB = 1024


def softmax_family():
    out = []
    for path in sorted((ROOT / "examples").glob("*.moa")):
        # PiAttention's tiled kernel (at these dims the model picks the split schedule: one launch per branch)
        k = moa.compile(path, form="quadratic", schedule="tiled" if path.stem == "pi_attention" else None)
        try:
            scheds = k.schedules
        except UnsupportedError:
            continue
        bs = [b for s in scheds.values() for b in s.branches]
        if bs and all(b.kind in ("softmax", "norm") and getattr(b, "mix", None) is None for b in bs):
            out.append((path.stem, k))
    return out


FAMILY = softmax_family()
# PiAttention's other schedules: hops (short skips) and residue
FAMILY.append(("pi_attention_hops", moa.compile(ROOT / "examples" / "pi_attention.moa", s=64, T=8, schedule="hops")))
FAMILY.append(("pi_attention_residue", moa.compile(ROOT / "examples" / "pi_attention.moa", schedule="residue")))
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
                plans.append(K.fit_plan(k.planner, k.output_names[0], dt, dims_for(k, d)))
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
    """The predicted-fastest schedule when one of its configs fits; else the next schedule in the ranking (a
    forced schedule: that one)."""
    assert fitted[("pi_attention", 64, "bfloat16")][1].schedule == "tiled"
    assert fitted[("pi_attention_residue", 64, "bfloat16")][1].schedule == "residue s=16"
    assert fitted[("pi_attention_hops", 64, "bfloat16")][1].schedule == "hops"
    assert fitted[("causal", 128, "bfloat16")][1].schedule == "tiled"
    k = moa.compile(ROOT / "examples" / "pi_attention.moa", s=64, T=8)
    dims = dims_for(k, 128)
    ranking = K.ranked_schedules(k.planner, "O", "bfloat16", dims, "sm_90")
    assert ranking[0].kind == "tiled"
    ranking = [ranking[0], next(s for s in ranking if s.kind == "hops")]
    # when no config of the first schedule fits, the first fitting one of the next is chosen
    plan = K.fit_plan(k.planner, "O", "bfloat16", dims, scheds=ranking[:2])
    first = sum(1 for s, _, _ in plan if s is ranking[0])
    ok = fitted[("causal", 128, "bfloat16")][1]
    results = [("error", "cannot compile: 1024 bytes of register spills")] * first + [ok] * (len(plan) - first)
    i, rep = K.choose_plan(plan, results, "sm_90", "pi_attention_hops")
    assert i == first and plan[i][0] is ranking[1] and rep.schedule == onf.label(ranking[1])
    with pytest.raises(UnsupportedError, match="tiled schedule BLOCK_M=.*hops schedule BLOCK_M="):
        K.choose_plan(plan, [("error", "spills")] * len(plan), "sm_90", "pi_attention_hops")


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
    # two accumulators at d = 128 (PiAttention): whatever config is kept, it fits (no spills)
    assert fitted[("pi_attention", 128, "bfloat16")][1].spills == 0


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
    r = k.aot(target="sm_90", dtype="bf16", config=Config(128, 64, 4, 1), n=1024, d=256, e=256)
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
    sched, cfg = K.runtime_config(k.planner, "O", "bfloat16", dims_for(k, 128), 0, torch.device("cuda"))
    assert cfg == fitted[("pi_attention", 128, "bfloat16")][0]
    assert onf.label(sched) == fitted[("pi_attention", 128, "bfloat16")][1].schedule


def test_moa_cost_uses_the_config_the_gpu_runtime_launches(fitted, capsys):
    assert main(["cost", str(ROOT / "examples" / "pi_attention.moa"), "--dims", "n=4096,d=128,e=128",
                 "--schedule", "tiled"]) == 0
    out = capsys.readouterr().out
    cfg = fitted[("pi_attention", 128, "bfloat16")][0]
    assert f"config O: BLOCK_M={cfg.block_m} BLOCK_N={cfg.block_n} num_warps={cfg.num_warps}" in out


# ---- the chunked linear form and the window-mixing kernel (runtime/form_configs.py) --------------------------

LINEAR_FORM = {name: moa.compile(ROOT / "examples" / f"{name}.moa", form="linear")
               for name in ("power", "power_gated", "linear")}   # p = 2 for the power ones
WINDOW = moa.compile(ROOT / "examples" / "bla.moa")


def form_plan(name, d, dt):
    if name == "bla":
        return F.window_plan(WINDOW.planner.cg_program, WINDOW.schedules["O"], dt, dims_for(WINDOW, d))
    k = LINEAR_FORM[name]
    return F.linear_plan(k.planner.cg_program, k.planner.linear_plans["O"][0], dt, dims_for(k, d))


@pytest.fixture(scope="module")
def form_fitted():
    """(example, d, dtype) -> (config, FormAotReport): the config searches of the linear form (power, power_gated,
    linear at d in {64, 128}, bf16 and fp16: every kernel with every flag combination a launch uses) and of the
    window kernel (bla, bf16), compiled in one child process."""
    keys = [(n, d, dt) for n in LINEAR_FORM for d in (64, 128) for dt in ("bfloat16", "float16")]
    keys += [("bla", d, "bfloat16") for d in (64, 128)]
    plans = [form_plan(*key) for key in keys]
    results = K.aot_groups([p.bundles for p in plans], first_fit=True)
    return {key: plan.choose(res) for key, plan, res in zip(keys, plans, results)}


def test_linear_and_window_configs_fit(form_fitted):
    rows = []
    for (name, d, dt), (cfg, rep) in sorted(form_fitted.items()):
        assert rep.config == cfg and rep.target == "sm_90"
        for kr in rep.kernels:
            rows.append(f"{name:12s} d={d:3d} {dt:8s} {cfg.text():38s} {F.launch_label(kr):26s} "
                        f"{kr.registers:3d} regs, {kr.spills} B spills, {kr.shared_bytes:6d} B shared, "
                        f"wgmma {kr.uses_wgmma}")
            assert kr.spills == 0, rows[-1]
            assert kr.shared_bytes <= 227 * KB, rows[-1]
            assert kr.registers <= 255 and kr.registers * kr.num_warps * 32 <= 64 * KB, rows[-1]
            assert (kr.num_warps, kr.num_stages) == (cfg.num_warps, cfg.num_stages), rows[-1]
        assert A.fits(rep, "sm_90") == (True, "ok") and rep.spills == 0
        if name == "bla":
            assert [kr.name for kr in rep.kernels] == ["_attn_window"]
            assert rep.kernels[0].block_m == cfg.block_m and rep.uses_wgmma
        else:   # every launch, the ring's included, with its flags and the config's tiles
            assert [(kr.name, *(kr.constant(f) for f in ("INIT", "PREFIX", "FINAL"))) for kr in rep.kernels] == \
                [tuple(x) for x in F.LINEAR_LAUNCHES]
            assert all((kr.constant("CHUNK"), kr.constant("BLOCK_F")) == (cfg.chunk, cfg.block_f)
                       for kr in rep.kernels)
            assert cfg.chunk == 64 and rep.kernel("_chunk_out").uses_wgmma   # 64-row chunks: wgmma
    print("\n".join(rows))


def test_value_tiles_of_a_fitted_config_fit(form_fitted):
    """A launch without timing splits the fitted config's scan along the value axis (linear_launch_split: BLOCK_V
    of half the padded width, down to 32) without compiling it again: every split scan launch the rule can produce
    compiles with no spills, where its registers do not exceed the unsplit scan's by more than a few."""
    keys = [(name, d, bv) for name in ("linear", "power_gated") for d, bvs in ((64, (32,)), (128, (64, 32)))
            for bv in bvs]
    bundles = []
    for name, d, bv in keys:
        k = LINEAR_FORM[name]
        cfg = dataclasses.replace(form_fitted[(name, d, "bfloat16")][0], block_v=bv)
        reqs = F.linear_requests(k.planner.cg_program, k.planner.linear_plans["O"][0], "bfloat16", dims_for(k, d), cfg)
        bundles.append([r for r in reqs if r["kernel"] == "_chunk_scan"])
    results = K.aot_groups([[b] for b in bundles])
    for (name, d, bv), res in zip(keys, results):
        whole = max(kr.registers for kr in form_fitted[(name, d, "bfloat16")][1].kernels if kr.name == "_chunk_scan")
        assert len(res[0]) == 4 and all(not isinstance(kr, tuple) for kr in res[0]), (name, d, bv, res[0])
        assert all(kr.spills == 0 and kr.constant("BLOCK_V") == bv for kr in res[0]), (name, d, bv)
        assert max(kr.registers for kr in res[0]) <= whole + 32, (name, d, bv)


def test_the_linear_default_is_kept_only_when_it_fits(form_fitted):
    """The default (CHUNK 64, BLOCK_F 64, 4 warps) fits every form at d = 64 (Triton 3.6, the GPU machines': linear
    only; p = 2 gathers its features and needs 8 warps); at d = 128 the power kernels spill with 4 warps in float16
    (float32 states) and the search moves on (8 warps); in bfloat16 (bfloat16 states) power fits 4 warps on Triton
    3.9, power_gated needs 8."""
    import triton

    old = tuple(int(x) for x in triton.__version__.split(".")[:2]) < (3, 8)
    default = F.linear_default(4096)
    assert default == F.LinearConfig(64, 64, 4, 3)
    for name in ("linear",) if old else ("power", "power_gated", "linear"):
        assert form_fitted[(name, 64, "bfloat16")][0] == default, name
    for key in (("power", 128, "float16"), ("power_gated", 128, "float16"), ("power_gated", 128, "bfloat16")):
        assert form_fitted[key][0] != default and form_fitted[key][0].num_warps == 8, key
    assert (form_fitted[("power", 128, "bfloat16")][0] == default) != old
    assert form_fitted[("bla", 64, "bfloat16")][0] == F.window_default(4096)


def test_kernel_aot_reports_each_kernel_of_the_form(form_fitted):
    r = LINEAR_FORM["power_gated"].aot(target="sm_90", dtype="bf16", n=4096, d=128, e=128)
    cfg, rep = form_fitted[("power_gated", 128, "bfloat16")]
    assert isinstance(r, F.FormAotReport) and r.form == "linear" and r.config == cfg
    assert [(kr.registers, kr.spills, kr.shared_bytes, kr.constants) for kr in r.kernels] == \
        [(kr.registers, kr.spills, kr.shared_bytes, kr.constants) for kr in rep.kernels]
    ring = r.kernel("_chunk_scan", 0, 1, 1)   # the gated scan that once spilled with the default config
    assert ring.spills == 0 and ring.cubin[:4] == b"\x7fELF" and ".target sm_90a" in ring.ptx
    w = WINDOW.aot(target="sm_90", dtype="bf16", n=4096, d=64, e=64)
    assert w.form == "window" and w.config == form_fitted[("bla", 64, "bfloat16")][0] and w.spills == 0
    # the tiled kernel's report is unchanged: one AotReport
    assert isinstance(dict(FAMILY)["causal"].aot(target="sm_90", dtype="bf16", n=4096, d=64, e=64), A.AotReport)


def test_moa_aot_cli_prints_each_kernel(form_fitted, capsys):
    assert main(["aot", str(ROOT / "examples" / "bla.moa"), "--dims", "n=4096,d=128,e=128"]) == 0
    out = capsys.readouterr().out
    cfg, rep = form_fitted[("bla", 128, "bfloat16")]
    assert f"window form, {cfg.text()}" in out
    kr = rep.kernels[0]
    row = next(ln.split() for ln in out.splitlines() if ln.strip().startswith("_attn_window"))
    assert row == ["_attn_window", str(kr.registers), "0", "B", str(kr.shared_bytes), "B", "yes"]
    assert "fits sm_90      yes" in out
    assert main(["aot", str(ROOT / "examples" / "power.moa"), "--form", "linear", "--dims", "n=4096,d=64,e=64",
                 "--dtype", "fp16"]) == 0
    out = capsys.readouterr().out
    assert f"linear form, {form_fitted[('power', 64, 'float16')][0].text()}" in out
    for fn, *flags in F.LINEAR_LAUNCHES:
        assert f"{fn} {','.join(map(str, flags))}" in out


def test_linear_and_window_runtime_configs_on_cuda_use_the_fit(monkeypatch, form_fitted):
    import torch

    from moa.runtime.linear_run import LinearRunner
    from moa.runtime.window_run import WindowRunner

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    cuda = torch.device("cuda")
    for name, d, split in (("power_gated", 128, 0), ("linear", 64, 32), ("power", 64, 32)):
        k = LINEAR_FORM[name]
        runner = LinearRunner(k.planner.cg_program, k.planner.linear_plans["O"][0])
        fitted = form_fitted[(name, d, "bfloat16")][0]
        assert runner.launch_config(cuda, "bfloat16", 1, dims_for(k, d), (128,)) == fitted
        # one (batch, head): the scan's programs (feature tiles x value tiles) far below the SMs, its value axis split
        # (linear_cost.linear_launch_split; power_gated at d = 128 has 129 feature tiles already)
        assert runner.launch_config(cuda, "bfloat16", 0, dims_for(k, d)) == dataclasses.replace(fitted, block_v=split)
    runner = WindowRunner(WINDOW.planner.cg_program, WINDOW.schedules["O"])
    assert runner.launch_config(cuda, "bfloat16", 0, dims_for(WINDOW, 128)) == form_fitted[("bla", 128, "bfloat16")][0]
    # the CPU interpreter keeps its own tiles
    assert runner.launch_config(torch.device("cpu"), "float32", 0, {"n": 100, "d": 8, "e": 8}).block_m == 64


def test_runtime_form_config_without_aot_warns_and_uses_the_default(monkeypatch, tmp_path):
    import torch

    from moa.runtime.linear_run import LinearRunner

    def broken(*a, **kw):
        raise UnsupportedError("AOT compile process failed: no ptxas")

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setattr(F, "_RUNTIME", {})
    monkeypatch.setattr(F, "aot_groups", broken)
    monkeypatch.setattr(F, "disk_path", lambda key: tmp_path / f"{key}.json")
    k = LINEAR_FORM["power_gated"]
    with pytest.warns(RuntimeWarning, match="AOT config check unavailable"):
        cfg = LinearRunner(k.planner.cg_program, k.planner.linear_plans["O"][0]).launch_config(
            torch.device("cuda"), "bfloat16", 0, dims_for(k, 128))
    assert cfg == F.linear_default(4096)


def test_form_search_names_every_config_it_tried():
    rep = A.AotReport(registers=255, spills=148, shared_bytes=0, uses_wgmma=False, num_warps=4, num_stages=3,
                      block_m=None, block_n=None, ptx="", cubin=b"", target="sm_90", name="_chunk_scan",
                      constants=(("INIT", 0), ("PREFIX", 1), ("FINAL", 1)))
    cands = [F.LinearConfig(64, 64, 4), F.LinearConfig(64, 32, 8)]
    results = [[rep], [("error", "cannot compile kernel '_chunk_out' for sm_90 (...): needs 300000 bytes of shared "
                                 "memory, more than the 232448 bytes sm_90 allows per block")]]
    with pytest.raises(UnsupportedError) as e:
        F.choose_bundle("linear", cands, results, "sm_90", "output O of power_gated.moa")
    msg = e.value.message
    assert "does not fit on sm_90" in msg
    assert "CHUNK=64 BLOCK_F=64 warps=4" in msg and "CHUNK=64 BLOCK_F=32 warps=8" in msg
    assert "_chunk_scan 0,1,1 (ring): 148 bytes of register spills" in msg and "needs 292 KiB" in msg


def _no_fit(what="output O of linear.moa (float32, n=4096, d=128, e=128)"):
    return UnsupportedError(f"{what} does not fit on sm_90: every linear-form config spills (...)")


def test_a_single_process_call_fits_its_own_launches_where_the_ring_does_not_fit(monkeypatch):
    """fit_linear: every launch (the ring's too) where one config fits them all; else, for a single-process call
    (single=True), the first config its own two launches fit; the ring's search still raises."""
    seen = []

    def fake_fit(plan):
        seen.append(plan.order)
        if plan.order != F.SINGLE_ORDER:
            raise _no_fit()
        return plan.cands[-1], None

    monkeypatch.setattr(F, "_fit", fake_fit)
    k = LINEAR_FORM["linear"]
    args = (k.planner.cg_program, k.planner.linear_plans["O"][0], "float32", dims_for(k, 128))
    with pytest.raises(UnsupportedError, match="does not fit on sm_90"):
        F.fit_linear(*args)
    assert F.fit_linear(*args, single=True)[0] == F.linear_candidates(4096)[-1]
    assert seen == [F._COMPILE_ORDER, F._COMPILE_ORDER, F.SINGLE_ORDER] and len(F._COMPILE_ORDER) == 6
    plan = F.linear_plan(*args, single=True)   # its bundles: the two single-process launches, output kernel first
    assert [(r["kernel"], r["constexprs"].get("PREFIX")) for r in plan.bundles[0]] == \
        [("_chunk_out", 1), ("_chunk_scan", 1)]
    assert plan.key != F.linear_plan(*args).key and "(a single-process call)" in plan.what
    # a failure that is not a search that ran (no ptxas ...) is not retried
    monkeypatch.setattr(F, "_fit", lambda plan: (_ for _ in ()).throw(UnsupportedError("no ptxas")))
    with pytest.raises(UnsupportedError, match="no ptxas"):
        F.fit_linear(*args, single=True)


def test_single_process_bundle_reports_its_two_launches():
    def rep(name, prefix=1):
        return A.AotReport(registers=182, spills=0, shared_bytes=27648, uses_wgmma=False, num_warps=4,
                           num_stages=3, block_m=None, block_n=None, ptx="", cubin=b"", target="sm_90", name=name,
                           constants=(("INIT", 0), ("PREFIX", prefix), ("FINAL", 0)))
    cands = [F.LinearConfig(64, 64, 4), F.LinearConfig(16, 16, 4)]
    results = [[("error", "needs 300000 bytes of shared memory")], [rep("_chunk_out"), rep("_chunk_scan")]]
    k, r = F.choose_bundle("linear", cands, results, "sm_90", "output O", F.SINGLE_ORDER)
    assert k == 1 and [F.launch_label(x) for x in r.kernels] == ["_chunk_scan 0,1,0", "_chunk_out 0,1,0"]
    # a six-launch search does not take a two-kernel bundle as complete
    with pytest.raises(UnsupportedError, match="not compiled"):
        F.choose_bundle("linear", cands, results, "sm_90", "output O")


def test_a_cuda_call_runs_the_tiled_kernel_where_no_linear_config_fits(monkeypatch):
    """The model's linear form (form=None) on a device where no linear-form config fits: the call runs the tiled
    kernel (Launcher.run_kind), and cost(fit=True) counts that kernel; a forced linear form still raises."""
    import torch

    from moa.runtime import costing, linear_run
    from moa.runtime.binding import Binding
    from moa.runtime.plan import LINEAR, TILED

    def no_fit(*a, **kw):
        raise _no_fit()

    monkeypatch.setattr(linear_run, "linear_runtime_config", no_fit)
    monkeypatch.setattr(costing, "fit_linear", no_fit)
    dims = {"n": 65536, "d": 128, "e": 128}
    for form, want in ((None, TILED), ("linear", LINEAR)):
        k = moa.compile(ROOT / "examples" / "linear.moa", form=form)
        assert k.planner.run_kind("O", dims) == LINEAR   # the model's choice at this n
        b = Binding(dims, (), torch.float32, torch.device("cuda"), {})
        assert k.launcher.run_kind("O", b) == want
        assert k.launcher.run_kind("O", dataclasses.replace(b, device=torch.device("cpu"))) == LINEAR
        dev = types.SimpleNamespace(target="sm_90")
        assert costing._fitting_kind(k.planner, "O", LINEAR, "float32", dims, dev, (), "int64") == want
    monkeypatch.setattr(linear_run, "linear_runtime_config",
                        lambda *a, **kw: (_ for _ in ()).throw(UnsupportedError("AOT compile process failed")))
    with pytest.raises(UnsupportedError, match="process failed"):   # not a search that found nothing: raised
        moa.compile(ROOT / "examples" / "linear.moa").launcher.run_kind("O", b)


@pytest.mark.slow
def test_fp32_linear_at_d128_fits_a_single_process_call_only(capsys):
    """fp32 linear.moa at d = e = 128 (no tensor cores): no config fits the ring's scan with PREFIX and FINAL, while
    the single-process call's two kernels fit at CHUNK = BLOCK_F = 16 (what a CUDA call launches)."""
    k = LINEAR_FORM["linear"]
    args = (k.planner.cg_program, k.planner.linear_plans["O"][0], "float32", dims_for(k, 128))
    with pytest.raises(UnsupportedError, match=r"_chunk_scan 0,1,1 \(ring\)"):
        F.fit_linear(*args)
    cfg, rep = F.fit_linear(*args, single=True)
    assert rep is None or [F.launch_label(x) for x in rep.kernels] == ["_chunk_scan 0,1,0", "_chunk_out 0,1,0"]
    assert rep is None or rep.fits()[0]
    assert cfg in F.linear_candidates(4096)
    assert main(["aot", str(ROOT / "examples" / "linear.moa"), "--form", "linear", "--dims", "n=4096,d=128,e=128",
                 "--dtype", "fp32"]) == 0
    out = capsys.readouterr().out
    assert f"linear form, {cfg.text()}" in out and "_chunk_scan 0,1,0" in out and "(ring)" not in out
