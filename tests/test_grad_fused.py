"""The fused backward kernels (codegen/backward.py): which examples have them and why the others do not, the kernels
against the unfused gradient DNF in float64 (interpreter, sizes that cross tile edges, GQA / MQA head sums, batch
broadcast), lower precisions against the float64 reference within docs/robustness.md's tolerances, and the
generated sources pyflakes-clean."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

import moa
from moa.runtime import aot, backward_configs, backward_run
from moa.runtime.grad_eval import evaluate_grad
from moa.runtime.measure import instrument

try:
    import grad_cases as C
except ImportError:  # pragma: no cover
    from tests import grad_cases as C

F64 = torch.float64
FUSED = {"alibi", "causal", "causal_bottom_right", "dilated_window", "document_mask", "global_window", "gqa_alibi",
         "linear", "linear_relu", "mqa", "pi_attention", "power", "power_gated", "prefix_lm", "relative_bias",
         "retention", "ring_local", "sdpa", "sigmoid", "sliding_window", "softcap"}
SCORE_READS = {"relative_bias": {"bias"}, "power_gated": {"G"}}   # gradients by atomic adds in the dQ kernel
UNFUSED: dict = {}
WINDOW = {"bla"}   # fused by codegen/window_backward.py (tests/test_window_backward.py)


@pytest.fixture(autouse=True)
def _small_tiles(monkeypatch):
    """16 x 16 tiles in the interpreter: the sizes below cross several tile edges."""
    monkeypatch.setattr(backward_run, "INTERPRETER_BLOCKS", (16, 16))


def _compile(stem: str):
    return moa.compile(f"examples/{stem}.moa", **C.PARAMS.get(stem, {}))


def _runners(k) -> list:
    """The backward runners of a kernel: one, or one per branch."""
    bw = k.backward
    return [bw.runner] if bw.runner is not None else list(bw.multi.runners)


def test_which_examples_have_fused_backward_kernels():
    stems = {p.stem for p in C.EXAMPLES}
    assert stems == FUSED | set(UNFUSED) | WINDOW
    for stem in sorted(stems):
        bw = _compile(stem).backward
        if stem in FUSED | WINDOW:
            assert bw.unfused_reason is None, (stem, bw.unfused_reason)
            assert set(bw.fused_inputs) == {"Q", "K", "V"} | SCORE_READS.get(stem, set()), stem
        else:
            assert UNFUSED[stem] in bw.unfused_reason and bw.fused_inputs == (), (stem, bw.unfused_reason)


def _fused_vs_dnf(stem: str, size: dict, batch=(2,), seed=0, shared_kv=False):
    """The fused kernels' gradients (dQ, dK, dV, the score's reads) against the gradient DNF evaluated directly
    (float64)."""
    k = _compile(stem)
    x = C.inputs(k.program, C.dims_for(k.program, size), seed, batch=batch)
    if shared_kv:   # K and V without the batch axis: their gradients sum over it
        x["K"], x["V"] = x["K"][0], x["V"][0]
    cot = C.cotangents(k, x, seed)
    b = k.bind(x)
    if k.backward.multi is not None:   # several branches: recomputed per branch, the epilogue by its gradient DNF
        got = k.backward.multi.grads(b, cot["O"], k.launcher)
    else:
        out, lse = k.launcher.tiled(k.output_names[0], b, store_lse=True)
        got = k.backward.runner.grads(b, out, lse, cot["O"])
    want = evaluate_grad(k.program, k.backward.grad_program, x, cot)
    assert set(k.backward.fused_inputs) <= set(got)
    for n in got:
        assert got[n].shape == want[n].shape, (n, got[n].shape, want[n].shape)
        assert C.rel_err(got[n], want[n]) <= 1e-12, (stem, n, C.rel_err(got[n], want[n]))


@pytest.mark.parametrize("stem", ["causal", "sliding_window", "softcap", "document_mask", "relative_bias", "power",
                                  "power_gated", "linear", "linear_relu", "pi_attention"])
def test_fused_kernels_match_the_gradient_dnf(stem):
    _fused_vs_dnf(stem, {"n": 45, "m": 45, "d": 5, "e": 3, "h": 2, "g": 1}, seed=1)


@pytest.mark.parametrize("stem", ["gqa_alibi", "mqa"])
def test_fused_kernels_sum_heads_into_shared_kv(stem):
    _fused_vs_dnf(stem, {"n": 21, "m": 18, "d": 4, "e": 3, "h": 4, "g": 2}, seed=2)


def test_fused_kernels_with_broadcast_kv_and_two_batch_axes():
    _fused_vs_dnf("causal", {"n": 19, "d": 4, "e": 6}, batch=(2, 3), seed=3, shared_kv=True)


TOLERANCE = {torch.float32: 2e-5, torch.float16: 5e-3, torch.bfloat16: 3e-2}   # docs/robustness.md


@pytest.mark.parametrize("dtype", sorted(TOLERANCE, key=str))
@pytest.mark.parametrize("stem", ["causal", "softcap", "pi_attention", "power", "linear", "relative_bias"])
def test_lower_precision_gradients_against_float64(stem, dtype):
    k = _compile(stem)
    x = C.inputs(k.program, C.dims_for(k.program, C.SIZES[1]), 4)
    cot = C.cotangents(k, x, 4)
    want = C.autograd_grads(k, x, cot)
    names = C.float_names(k.program)
    leaves = {n: (t.to(dtype).requires_grad_() if n in names else t) for n, t in x.items()}
    (k(**leaves).to(F64) * cot["O"]).sum().backward()
    for n in names:
        assert leaves[n].grad.dtype == dtype
        assert C.rel_err(leaves[n].grad, want[n]) <= TOLERANCE[dtype], (n, C.rel_err(leaves[n].grad, want[n]))


def test_generated_backward_sources_are_pyflakes_clean(tmp_path):
    for stem in sorted(FUSED):
        for r, runner in enumerate(_runners(_compile(stem))):
            for dt, nb in (("float32", 1), ("bfloat16", 2), ("float64", 0)):
                src = runner.spec(dt, nb).source
                assert "def _attn_bwd_dkdv(" in src and "def _attn_bwd_dq(" in src
                (tmp_path / f"{stem}_{r}_{dt}.py").write_text(src)
    exe = Path(sys.executable).with_name("ruff")
    proc = subprocess.run([str(exe), "check", "--isolated", "--no-cache", "--select", "F", "--output-format",
                           "concise", str(tmp_path)], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stdout[-4000:]


def test_document_mask_backward_skips_tiles_by_the_data():
    """Sorted document ids: both kernels visit only the tile pairs whose id ranges meet on or below the diagonal
    (counted by the value-tile loads), and the gradients still equal the gradient DNF."""
    k = _compile("document_mask")
    n, t = 64, 16
    doc = torch.repeat_interleave(torch.arange(4), torch.tensor([10, 30, 4, 20]))[None]
    x = {**C.inputs(k.program, {"n": n, "d": 4, "e": 3}, 6, batch=(1,)), "doc": doc}
    cot = C.cotangents(k, x, 6)
    b = k.bind(x)
    out, lse = k.launcher.tiled("O", b, store_lse=True)
    with instrument(lines={"kv": ("_attn_bwd_dkdv", "q = tl.load("), "q": ("_attn_bwd_dq", "k = tl.load(")}) as c:
        got = k.backward.runner.grads(b, out, lse, cot["O"])
    lo = [int(doc[0, s:s + t].min()) for s in range(0, n, t)]
    hi = [int(doc[0, s:s + t].max()) for s in range(0, n, t)]
    want_pairs = sum(1 for a in range(n // t) for u in range(a + 1) if lo[a] <= hi[u] and lo[u] <= hi[a])
    assert c.load_calls_by_line["kv"] == c.load_calls_by_line["q"] == want_pairs < (n // t) * (n // t + 1) // 2
    want = evaluate_grad(k.program, k.backward.grad_program, x, cot)
    assert all(C.rel_err(got[name], want[name]) <= 1e-12 for name in got)


def test_causal_backward_skips_the_tiles_the_forward_skips():
    """dQ loops over the key tiles up to the diagonal (the forward's bounds); dK/dV tests the skip formula."""
    src = _compile("causal").backward.runner.spec("float32", 1).source
    dq = src[src.index("def _attn_bwd_dq("):]
    dkdv = src[src.index("def _attn_bwd_dkdv("):src.index("def _attn_bwd_dq(")]
    assert "hi = tl.minimum(dim_n - 1, row_hi)" in dq, dq
    assert "if " in dkdv and "row_hi" in dkdv and "col_lo" in dkdv
    for kernel in (dq, dkdv):   # the full/partial split: the full tiles' block has no mask code
        full = kernel[kernel.index("# a full tile"):kernel.index("# a partial tile")]
        assert "tl.where" not in full and "valid" not in full and "ds = " in full
        assert ("dk +=" in full) != ("dq +=" in full)


def _aot_fits(stem: str, dtype: str = "bfloat16"):
    """Every backward kernel at d = 64 and 128 has a config that compiles for sm_90 without spills, within 227 KB
    of shared memory (runtime/backward_configs.py chooses it as a CUDA launch does)."""
    k = _compile(stem)
    chosen = {}
    for runner in _runners(k):
        spec = runner.spec(dtype, 1)
        for d in (64, 128):
            dims = {**{x.name: 4 for x in k.program.dims}, "n": 1024, "m": 1024, "d": d, "e": d}
            picks = backward_configs.choose(k.planner.cg_program, spec, dtype, dims, "sm_90")
            for name, (cfg, rep) in picks.items():
                assert aot.fits(rep, "sm_90")[0] and rep.spills == 0 and rep.shared_bytes <= 227 * 1024, \
                    rep.summary()
                chosen[(name, d)] = cfg
    return chosen


def test_aot_sm90_backward_kernels_fit():
    chosen = _aot_fits("causal")
    assert chosen[("_attn_bwd_dq", 64)].block_m == 64   # the first candidate fits at d = 64


@pytest.mark.slow
@pytest.mark.parametrize("stem", sorted(FUSED))
def test_aot_sm90_backward_kernels_fit_every_fused_example(stem):
    _aot_fits(stem)


def test_large_logits_stay_finite_and_accurate():
    """Scores of a few thousand (Q x 300): lse keeps exp(s - lse) <= 1, float32 gradients within docs/robustness.md's
    large-logit tolerance, float64 ones exact up to the conditioning."""
    k = _compile("causal")
    x = C.inputs(k.program, {"n": 40, "d": 8, "e": 4}, 1)
    x["Q"] = x["Q"] * 300
    cot = C.cotangents(k, x, 1)
    want = C.autograd_grads(k, x, cot)
    for dtype, tol in ((torch.float32, 1e-2), (F64, 1e-10)):
        leaves = {n: t.to(dtype).requires_grad_() for n, t in x.items()}
        (k(**leaves).to(F64) * cot["O"]).sum().backward()
        for n in want:
            assert torch.isfinite(leaves[n].grad).all() and C.rel_err(leaves[n].grad, want[n]) <= tol, (dtype, n)


@pytest.mark.parametrize("names", [("p", "ds", "do"), ("q", "k", "v"), ("dsc", "valid", "zz"), ("lse", "dK", "grad_V")])
def test_input_names_like_the_kernels_own(names):
    """Inputs named like the backward kernels' variables and buffers: fused, and still exact."""
    a, b, c = names
    k = moa.compile(f"dim n, d, e\nin {a}[n, d], {b}[n, d], {c}[n, e]\nS[i, j] = where(j <= i, dot({a}[i], {b}[j]) / "
                    f"sqrt(d), -inf)\nout O = softmax(S, axis=-1) @ {c}")
    assert k.backward.unfused_reason is None
    C.check_kernel_grads(k, C.inputs(k.program, {"n": 20, "d": 4, "e": 3}, 0), tol=1e-10)
