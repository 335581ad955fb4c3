"""Generated kernels read like hand-written ones: ruff's pyflakes rules find nothing in the source of any example
(every kernel family, fp32 and bf16, K / V through TMA descriptors), only the helpers used are defined, no
sentinel literal stands for an unbounded parameter, temporaries are named by role; and every schedule (tiled,
hops, residue) runs the one online-softmax emitter, exactly (float64, ragged sizes, scores whose running max
moves)."""
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import moa
from moa.codegen.chunked import generate_chunked
from moa.runtime.tiling import Config

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((ROOT / "examples").glob("*.moa"))
F64 = torch.float64


def _sources(path: Path) -> dict:
    """label -> generated source: the kernel a call runs by default, and the chunked linear form if any."""
    k = moa.compile(path)
    out = {}
    for dt in ("float32", "bfloat16"):
        for name in k.output_names:
            out[f"{path.stem}_{name}_{dt}"] = k.source(name, dtype=dt)
            if dt == "bfloat16" and not k.planner.is_window(name):   # K / V tiles through TMA descriptors
                out[f"{path.stem}_{name}_{dt}_tma"] = k.source(name, dtype=dt, config=Config(128, 64, 8, 3, True))
            lp = k.planner.linear_plans[name][0]
            if lp is not None:
                out[f"{path.stem}_{name}_{dt}_chunked"] = generate_chunked(k.planner.cg_program, lp, dt, 1).source
    return out


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    folder = tmp_path_factory.mktemp("generated")
    files = {}
    for path in EXAMPLES:
        for label, src in _sources(path).items():
            f = folder / f"{label}.py"
            f.write_text(src)
            files[label] = (f, src)
    return folder, files


def test_pyflakes_finds_nothing_in_any_generated_kernel(generated):
    folder, files = generated
    assert len(files) >= 2 * len(EXAMPLES)
    exe = Path(sys.executable).with_name("ruff")
    proc = subprocess.run([str(exe), "check", "--isolated", "--no-cache", "--select", "F", "--output-format",
                           "concise", str(folder)], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stdout[-4000:]


def test_only_the_helpers_used_and_no_dead_lines(generated):
    _, files = generated
    for label, (_, src) in files.items():
        for helper in ("_mod", "_floordiv", "_tanh", "_elu", "_sign"):
            defined = f"def {helper}(" in src
            called = re.search(rf"\b{helper}\(", src.replace(f"def {helper}(", "")) is not None
            assert defined == called, (label, helper, defined, called)
        assert not re.search(r"^\s*lo\w* = 0\n\s*lo\w* = \(lo", src, re.M), label
        assert "1000000" not in src, label          # no sentinel for an unbounded parameter
        assert not re.search(r"\b(t\d+|ld_\d+|red\d+)\s*=", src), label   # temporaries are named by role


def test_unbounded_param_leaves_no_compare():
    """PiAttention's T = inf: the conjunct (i - j) // s <= T folds to true in the DNF, no code compares with it;
    a finite T is compared."""
    unbounded = moa.compile(ROOT / "examples" / "pi_attention.moa").source(dtype="float32")
    bounded = moa.compile(ROOT / "examples" / "pi_attention.moa", T=8).source(dtype="float32")
    assert "<= 8" in bounded or "8)" in bounded
    assert "inf)" not in unbounded.replace('float("-inf")', "").replace('float("inf")', "")


def test_common_index_expressions_are_computed_once():
    src = moa.compile(ROOT / "examples" / "pi_attention.moa").source(dtype="float32",
                                                                     dims={"n": 8192, "d": 64, "e": 64})
    assert "rows_res = " in src
    assert src.count("_floordiv((dim_n - res - 1), 16)") <= 1, src


def _qkv(n, d, seed, spread=3.0):
    g = torch.Generator().manual_seed(seed)
    # scores spread over several units: the running max moves from hop to hop, so the rescale matters
    return [spread * torch.randn(2, n, d, generator=g, dtype=F64) for _ in range(3)]


SCHEDULES = [("pi_attention", {"k": 5, "s": 4, "T": 6}, "tiled"), ("pi_attention", {"k": 5, "s": 4, "T": 6}, "hops"),
             ("pi_attention", {"k": 5, "s": 4, "T": 6}, "residue"), ("dilated_window", {"w": 23, "r": 3}, "tiled"),
             ("dilated_window", {"w": 23, "r": 3}, "hops"), ("dilated_window", {"w": 23, "r": 3}, "residue")]


@pytest.mark.parametrize("name,params,schedule", SCHEDULES, ids=[f"{a}-{c}" for a, _, c in SCHEDULES])
@pytest.mark.parametrize("n", [37, 70])
def test_every_schedule_float64(name, params, schedule, n):
    """Each schedule of a strided mask against the float64 reference (<= 1e-12); the hop and residue schedules
    reach the online-softmax update once per hop, so a broken rescale (alpha) fails here."""
    k = moa.compile(ROOT / "examples" / f"{name}.moa", schedule=schedule, **params)
    q, kk, v = _qkv(n, 16, n)
    x = {"Q": q, "K": kk, "V": v}
    if "wg" in k.input_names:
        x["wg"] = torch.randn(16, generator=torch.Generator().manual_seed(1), dtype=F64)
    assert moa.onf.label(k.plan(**x)["O"].schedule).startswith(schedule)
    got, ref = k(**x), k.reference(**x)
    assert (got - ref).abs().max().item() <= 1e-12 * max(1.0, ref.abs().max().item())


def test_one_online_softmax_emitter_for_every_schedule():
    """The tiled, hops and window kernels all carry the monoid emitter's update (codegen/monoid.py)."""
    update = ("alpha = tl.exp2(", "m_safe = tl.where(m_ij == float(\"-inf\"), 0.0, m_ij)")
    for path, params, sched in (("causal", {}, None), ("pi_attention", {"k": 5, "s": 4, "T": 6}, "hops"),
                                ("pi_attention", {"s": 16}, "residue"), ("bla", {}, None)):
        src = moa.compile(ROOT / "examples" / f"{path}.moa", schedule=sched, **params).source(dtype="float32")
        assert all(u in src for u in update), (path, sched)
