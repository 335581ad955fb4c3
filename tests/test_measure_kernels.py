"""Predicted counters (moa/cost.py: the ONF plus the emitted kernel's ledger, nothing executed) equal what the
instrumented Triton interpreter counts when the generated kernel runs, exactly, for every example at ragged
sizes, in float64 and float32: the tiled kernel, its hops and residue schedules, the window-mixing kernel
(bla.moa) and the two launches of the chunked linear form."""


from pathlib import Path

import numpy as np
import pytest
import torch

import moa
from moa.runtime.check import random_inputs
from moa.runtime.costing import cost
from moa.runtime.measuring import measure
from moa.runtime.tiling import Config

ROOT = Path(__file__).resolve().parents[1]
COUNTERS = ("flops", "transcendentals", "dram_bytes", "dram_bytes_loaded", "dram_bytes_stored", "tiles_visited")

# example -> params: windows small enough that tiles are skipped at these sizes
EXAMPLES = {
    "sdpa": {}, "causal": {}, "sliding_window": {"w": 20}, "gqa_alibi": {}, "power": {}, "linear": {},
    "causal_bottom_right": {}, "dilated_window": {"w": 40, "r": 3}, "global_window": {"w": 20},
    "prefix_lm": {"p": 20}, "document_mask": {}, "alibi": {}, "softcap": {}, "relative_bias": {}, "mqa": {},
    "ring_local": {"k": 20}, "pi_attention": {"k": 20, "s": 7}, "power_gated": {}, "linear_relu": {},
    "bla": {},   # the window-mixing kernel (codegen/window.py)
    "sigmoid": {}, "retention": {},   # plain sums A @ V
}
LINEAR = ("power", "power_gated", "linear", "linear_relu")   # also run in the chunked linear form
LINEAR_SIZES = (1, 17, 63, 65, 129)   # chunks of 32 / 64 rows: one row, ragged, a multiple +- 1
# schedules with a residue conjunct (i - j) % s == 0: hop loops and the residue lifting, besides the tiled one
SCHEDULES = [("pi_attention", "hops"), ("pi_attention", "residue"), ("pi_attention", "split"),
             ("dilated_window", "hops"), ("dilated_window", "residue")]
STRUCTURED = ("causal", "sliding_window", "dilated_window", "prefix_lm", "causal_bottom_right", "ring_local")
SIZES = (1, 17, 100, 130)
KEYS = {1: 1, 17: 24, 100: 61, 130: 130}   # m for programs with a separate key length (m < n and m > n)

_KERNELS: dict = {}


def kernel(name, form="quadratic", schedule=None):
    key = (name, form, schedule)
    if key not in _KERNELS:
        _KERNELS[key] = moa.compile(ROOT / "examples" / f"{name}.moa", form=form, schedule=schedule,
                                    **EXAMPLES[name])
    return _KERNELS[key]


def dims_for(k, n, d=16, e=16):
    values = {"n": n, "m": KEYS[n] if n in KEYS else n, "d": d, "e": e, "h": 2, "g": 1}
    return {x.name: values[x.name] for x in k.program.dims}


def check(k, dims, dtype, batch=0, seed=0, convert=None, **kw):
    inputs = random_inputs(k.program, dims, seed=seed, batch=batch, dtype=dtype)
    if convert:
        inputs = convert(inputs)
    m = measure(k, **inputs)
    data = {x: t for x, t in inputs.items() if not t.is_floating_point()}   # ids and flags: tiles skipped by data
    c = cost(k, dtype=str(dtype).replace("torch.", ""), device="cpu", batch=(batch,) if batch else (),
             inputs=data or None, **kw, **dims)
    got = {f: getattr(m, f) for f in COUNTERS}
    want = {f: getattr(c, f) for f in COUNTERS}
    assert got == want, f"measured {got}\npredicted {want}"
    assert m.dram_bytes == m.dram_bytes_loaded + m.dram_bytes_stored
    return m, c


def test_every_example_is_covered():
    for path in sorted((ROOT / "examples").glob("*.moa")):
        k = moa.compile(path)
        assert path.stem in EXAMPLES, f"{path.name}: add it to EXAMPLES"
        for name in k.output_names:
            if k.planner.linear_plans[name][0] is not None:
                assert path.stem in LINEAR, f"{path.name} has a linear form: add it to LINEAR"
            if len(k.variants[name]) > 1:
                kinds = {v.kind for v in k.variants[name]} - {"tiled"}
                assert kinds <= {s for e, s in SCHEDULES if e == path.stem}, f"{path.name}: add {kinds} to SCHEDULES"


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_predicted_counters_equal_measured(name, dtype):
    k = kernel(name)
    for n in SIZES:
        m, c = check(k, dims_for(k, n), dtype, seed=n)
        assert m.programs > 0 and c.tiles_visited >= 0


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("name", LINEAR)
def test_linear_form_counters_equal_measured(name, dtype):
    """The chunked form's two launches, summed; tiles_visited = (chunk, feature tile) blocks."""
    k = kernel(name, form="linear")
    for n in LINEAR_SIZES:
        m, c = check(k, dims_for(k, n, d=8), dtype, seed=n)
        chunk = min(64, max(16, 1 << (n - 1).bit_length()))   # runtime/linear_run.py chunk_config
        assert c.form == "linear" and c.tiles_visited == c.tiles_needed == -(-n // chunk)   # one feature tile
        assert c.intermediate_bytes > 0   # the chunk states
    check(k, dims_for(k, 65, d=8), dtype, batch=2)


def test_linear_form_with_several_feature_tiles():
    """D = C(92, 2) = 4186 features: two feature tiles of 4096 on the CPU (64 on a GPU)."""
    m, c = check(kernel("power_gated", form="linear"), {"n": 70, "d": 91, "e": 8}, torch.float32)
    assert c.tiles_visited == 2 * 2   # chunks x feature tiles


@pytest.mark.parametrize("name, schedule", SCHEDULES)
def test_schedule_counters_equal_measured(name, schedule):
    """Hop loops (one key row per query row per hop) and the residue lifting (rows r + s a per program, lifted
    branches over key tiles in b-space) count exactly too, and visit no hop or tile without an admissible pair."""
    k = kernel(name, schedule=schedule)
    for n in SIZES:
        m, c = check(k, dims_for(k, n), torch.float32, seed=n)
        assert c.tiles_visited == c.tiles_needed


def test_pi_attention_hops_at_4096_visit_only_needed_hops():
    """PiAttention with stride 64: every hop (and key tile of the local branch) visited holds an admissible pair,
    measured in the interpreter at n = 4096."""
    k = moa.compile(ROOT / "examples" / "pi_attention.moa", schedule="hops", k=64, s=64, T=8)
    m, c = check(k, {"n": 4096, "d": 16, "e": 16}, torch.float32)
    assert m.tiles_visited == c.tiles_needed == 603
    for schedule in ("hops", "residue"):   # GPU tiles, bf16: predicted only
        k = moa.compile(ROOT / "examples" / "pi_attention.moa", schedule=schedule, k=64, s=64, T=8)
        c = cost(k, dtype="bf16", device="h100", n=4096, d=64, e=64)
        assert c.tiles_visited == c.tiles_needed > 0


def test_pi_attention_tiles_hold_an_admissible_pair():
    """The key-tile schedule of PiAttention (k = 64, s = 64, T = 8, n = 300) visits exactly the (row tile, key
    tile) pairs of each branch that hold an admissible pair, counted here from the masks themselves. The skip
    branch's diagonal tiles are the subtle ones: i - j = 0 is a multiple of s there, but j < i excludes it."""
    k = moa.compile(ROOT / "examples" / "pi_attention.moa", schedule="tiled", k=64, s=64, T=8)
    n = 300
    x = random_inputs(k.program, {"n": n, "d": 16, "e": 16}, seed=0, batch=0, dtype=torch.float64)
    cfg = k.plan(**x)["O"].config
    i, j = np.arange(n)[:, None], np.arange(n)[None, :]
    local = (j <= i) & (i - j < 64)
    skip = (j < i) & ((i - j) % 64 == 0) & ((i - j) // 64 <= 8)
    want = 0
    for mask in (local, skip):
        for r0 in range(0, n, cfg.block_m):
            for t0 in range(0, n, cfg.block_n):
                want += bool(mask[r0:r0 + cfg.block_m, t0:t0 + cfg.block_n].any())
    m = measure(k, **x)
    assert m.tiles_visited == want
    assert cost(k, dtype="float64", device="cpu", config=cfg, n=n, d=16, e=16).tiles_visited == want


def test_window_kernel_batch_and_hops():
    k = kernel("bla")
    m, c = check(k, {"n": 40, "d": 16, "e": 16}, torch.float64, batch=2)
    assert c.tiles_visited == 2 * 16                # one row tile x W = 16 hops, two batch entries
    c1 = cost(k, dtype="float64", device="cpu", n=1, d=16, e=16)
    assert (c1.tiles_visited, c1.tiles_needed) == (16, 1)   # row 0 has only hop 0 (key row 0 - r >= 0)


@pytest.mark.parametrize("name", STRUCTURED)
def test_structured_masks_visit_exactly_the_needed_tiles(name):
    k = kernel(name)
    for n in SIZES:
        c = cost(k, dtype="float64", device="cpu", **dims_for(k, n))
        assert c.tiles_visited == c.tiles_needed
    # GPU tiles and a long sequence: many skipped tiles, still none wasted
    for n in (1000, 4096):
        dims = {**dims_for(k, 130), "n": n, **({"m": n - 300} if "m" in dims_for(k, 130) else {})}
        c = cost(k, dtype="bf16", device="h100", **dims)
        assert c.tiles_visited == c.tiles_needed > 0


def test_batch_axes_and_heads():
    check(kernel("causal"), {"n": 100, "d": 16, "e": 16}, torch.float64, batch=3)
    check(kernel("gqa_alibi"), {"h": 4, "g": 2, "n": 70, "d": 16, "e": 16}, torch.float32, batch=2)


def test_padded_head_dims():
    check(kernel("causal"), {"n": 130, "d": 20, "e": 12}, torch.float64)
    check(kernel("pi_attention"), {"n": 100, "d": 24, "e": 40}, torch.float32)


def test_bfloat16_runs_in_float32_on_cpu():
    k = kernel("sliding_window")
    m, c = check(k, {"n": 130, "d": 16, "e": 16}, torch.bfloat16)
    c32 = cost(k, dtype="float32", device="cpu", n=130, d=16, e=16)
    assert c.dram_bytes == c32.dram_bytes  # inputs are converted to float32 before the launch


def test_int32_document_ids():
    k = kernel("document_mask")
    check(k, {"n": 130, "d": 16, "e": 16}, torch.float64, convert=lambda x: {**x, "doc": x["doc"].to(torch.int32)},
          index_dtype="int32")
    c64 = cost(k, dtype="float64", device="cpu", n=130, d=16, e=16)
    c32 = cost(k, dtype="float64", device="cpu", n=130, d=16, e=16, index_dtype="int32")
    assert c64.dram_bytes > c32.dram_bytes


def test_forced_config_changes_the_counts_consistently():
    k = kernel("causal")
    a = cost(k, dtype="float64", device="cpu", config=Config(16, 16), n=100, d=16, e=16)
    b = cost(k, dtype="float64", device="cpu", config=Config(64, 64), n=100, d=16, e=16)
    assert a.tiles_visited > b.tiles_visited and a.tiles_needed == a.tiles_visited
    assert a.flops < b.flops   # smaller tiles waste less of the triangle
