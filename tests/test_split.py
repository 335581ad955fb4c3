"""Split schedules (moa/split.py): an output of several branches run as one kernel per branch, each branch in a
schedule of its own, the stored branch values read by the last kernel's epilogue."""
import pytest
import torch

import moa
from moa import onf, split
from moa.cli import main
from moa.runtime.costing import cost
from moa.runtime.plan import TILED, Plan
from moa.runtime.tiling import Config

F64 = torch.float64

# heads, two branches of different strides and an epilogue with a per-head weight: the split works on leading axes
HEADS = """
dim h, n, d
in Q[h, n, d], K[h, n, d], V[h, n, d], w[h]
S[a, i, j] = dot(Q[a, i], K[a, j]) / sqrt(d)
L[a, i, j] = where(j <= i and i - j < 5, S[a, i, j], -inf)
P[a, i, j] = where(j < i and (i - j) % 4 == 0, S[a, i, j], -inf)
g[a] = sigmoid(w[a])
out O[a, i] = g[a] * (softmax(L[a, i], axis=-1) @ V[a]) + (1 - g[a]) * (softmax(P[a, i], axis=-1) @ V[a])
"""

# three branches: two strides and a global softmax, normalised mixing
THREE = """
dim n, d
in Q[n, d], K[n, d], V[n, d]
S = Q @ K.T / sqrt(d)
A[i, j] = where(j <= i and (i - j) % 3 == 0, S[i, j], -inf)
B[i, j] = where(j <= i and (i - j) % 5 == 0, S[i, j], -inf)
X[i] = 0.5 * (softmax(A[i], axis=-1) @ V) + 0.25 * (softmax(B[i], axis=-1) @ V)
out O[i] = X[i] + 0.25 * (softmax(S[i], axis=-1) @ V)
"""


def _err(a, b):
    return (a.double() - b.double()).abs().max().item()


def _inputs(k, dims, batch=(), seed=0, dtype=F64):
    g = torch.Generator().manual_seed(seed)
    out = {}
    for node in k.program.inputs:
        shape = tuple(int(moa.symbolic.evaluate(x, dims)) for x in node.shape)
        out[node.attrs[0]] = torch.randn(*batch, *shape, generator=g, dtype=F64).to(dtype)
    return out


@pytest.mark.parametrize("which", [0, 1])
def test_pi_attention_every_split_equals_the_reference(which):
    """Both splits of PiAttention (the strided branch by hops or residue-lifted), n not a multiple of the stride,
    batch axes and a broadcast gate weight, in float64; fp32 within its tolerance."""
    k = moa.compile("examples/pi_attention.moa", k=9, s=7, schedule="split")
    assert [onf.label(v) for v in k.variants["O"] if v.kind == "split"] == [
        "split(b0 tiled, b1 hops)", "split(b0 tiled, b1 residue s=7)"]
    chosen = [v for v in k.variants["O"] if v.kind == "split"][which]
    for n in (1, 50, 131):
        ins = _inputs(k, {"n": n, "d": 16, "e": 16}, batch=(2,), seed=n)
        ins["wg"] = ins["wg"][0]
        ref = k.reference(**ins)
        for dt, tol in ((F64, 1e-12), (torch.float32, 2e-5)):
            b = k.bind({x: t.to(dt) for x, t in ins.items()})
            out = k.launcher.tiled("O", b, False, plan=Plan("O", TILED, chosen, Config(32, 16)))[0]
            assert _err(out, ref) <= tol, (n, dt)


def test_split_with_heads_and_three_branches():
    for src, dims, batch in ((HEADS, {"h": 3, "n": 45, "d": 8}, (2,)), (THREE, {"n": 77, "d": 8}, ())):
        k = moa.compile(src, schedule="split")
        labels = [onf.label(v) for v in k.variants["O"] if v.kind == "split"]
        assert labels, "a split of every program with several branches"
        ins = _inputs(k, dims, batch, seed=1)
        assert _err(k(**ins), k.reference(**ins)) <= 1e-12, labels
    assert "split(b0 residue s=3, b1 residue s=5, b2 tiled)" in labels   # the global branch runs the epilogue


def test_fp16_split_is_close():
    k = moa.compile("examples/pi_attention.moa", k=16, s=8, schedule="split")
    ins = _inputs(k, {"n": 100, "d": 16, "e": 16}, seed=3)
    ref = k.reference(**ins)
    assert _err(k(**{x: t.half() for x, t in ins.items()}), ref) <= 5e-3


def test_the_model_splits_pi_attention_at_long_sequences():
    """k = 1024, s = 64 on 2 x 16 heads of 8192 rows (the speed issue's workload): the local window in key tiles,
    the strided branch residue-lifted; the kernel-level model predicts under half of dense causal attention's time
    (fused, one schedule could not: the tiled kernel computes the strided branch on every causal tile, the hop
    and residue schedules walk one branch by per-row hops)."""
    pi = moa.compile("examples/pi_attention.moa", k=1024, s=64)
    dims = {"n": 8192, "d": 128, "e": 128}
    chosen, preds = pi.planner.schedule_choice("O", dims, "bf16", "h200", 32)
    assert onf.label(chosen) == "split(b0 tiled, b1 residue s=64)", [(p.label, p.seconds) for p in preds]
    got = cost(pi, dtype="bf16", device="h200", batch=(2, 16), **dims)
    dense = cost(moa.compile("examples/causal.moa"), dtype="bf16", device="h200", batch=(2, 16), **dims)
    assert got.predicted_seconds < 0.5 * dense.predicted_seconds
    assert got.flops < 0.3 * dense.flops
    # a single head of 1024 rows: launch-bound, one kernel
    assert onf.label(pi.planner.schedule_for("O", {**dims, "n": 1024}, "bf16")) == "tiled"


def test_split_values_are_named_apart_from_the_inputs():
    src = "dim n, d\nin Q[n, d], K[n, d], V[n, d], O_b1[n, d]\n" + THREE.split("in Q[n, d], K[n, d], V[n, d]")[1] \
        .replace("0.25 * (softmax(S[i], axis=-1) @ V)", "0.25 * O_b1[i]")
    k = moa.compile(src, schedule="split")
    names = k.planner.value_names("O")
    assert "O_b1" not in names and len(set(names)) == 2
    ins = _inputs(k, {"n": 40, "d": 8}, seed=2)
    assert _err(k(**ins), k.reference(**ins)) <= 1e-12


def test_source_lists_every_kernel_and_the_launcher_refuses_a_split(tmp_path, capsys):
    k = moa.compile("examples/pi_attention.moa", schedule="split")
    src = k.source(dims={"n": 4096, "d": 64, "e": 64})
    assert src.count("def _attn_fwd(") == 2
    assert "# ---- kernel 1 of 2 (split(b0 tiled, b1 residue s=16)): branch 1 in residue s=16, stored as O_b1" in src
    assert "O_b1_ptr" in src.split("# ---- kernel 2 of 2")[1]
    assert main(["compile", "examples/pi_attention.moa", "--launcher", "--schedule", "split", "-o",
                 str(tmp_path / "x.py")]) != 0
    assert "a split schedule runs one kernel per branch" in capsys.readouterr().err
    assert split.splittable(moa.compile("examples/causal.moa").schedules["O"]) is False


def test_split_fits_sm_90_without_spills():
    """Both kernels of the split at d = 128, bf16, compiled for sm_90: no spills, within shared memory."""
    rep = moa.compile("examples/pi_attention.moa", k=1024, s=64).aot(dtype="bf16", n=16384, d=128, e=128)
    assert rep.form == "split(b0 tiled, b1 residue s=64)" and len(rep.kernels) == 2
    assert rep.fits()[0] and all(x.spills == 0 and x.uses_wgmma for x in rep.kernels)
