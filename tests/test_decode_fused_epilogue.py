"""Decoding outputs computed from several softmax branches (PiAttention's gate) with the epilogue fused into the
merge (codegen/splitkv_epilogue.py, runtime/decode_merge.py): one split launch of every branch
(codegen/splitkv.branches_source) and one merge launch, no torch operation after them; float64 in the
interpreter, equal to the unsplit plain call (1e-12) at 1 and 3 splits, with batch axes, GQA packing (a per-head
gate), valid lengths and pages, an input read by both indices in the gate; the cost model counts the fused kernel
exactly as the instrumented interpreter executes it; an epilogue without a fused form keeps the torch path, and
says why."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import moa
from moa.runtime import decode_merge, ring
from moa.runtime.decode_cost import decode_cost
from moa.runtime.decode_measure import measure
from moa.runtime.measure import instrument

D = 16
F64 = torch.float64
NQ, P = 3, 16

GQA_PI = """dim h, g, n, d, e
param k = 24
in Q[h, n, d], K[g, n, d], V[g, n, e], wg[d], bh[h]
S[a, i, j] = dot(Q[a, i], K[a // (h // g), j]) / sqrt(d)
L[a, i, j] = where(j <= i and i - j < k, S[a, i, j], -inf)
A[a, i, j] = where(j <= i, S[a, i, j], -inf)
gt[a, i] = sigmoid(dot(Q[a, i], wg) + bh[a])
B0[a, i] = softmax(L[a, i], axis=-1) @ V[a // (h // g)]
B1[a, i] = softmax(A[a, i], axis=-1) @ V[a // (h // g)]
out O[a, i] = gt[a, i] * B0[a, i] + (1 - gt[a, i]) * B1[a, i]
"""

# a gate of a per-position value G read by the row (G[i]) and by the key (G[j], a score bias), documents doc[i],
# doc[j], and tanh and relu in the gate (their fused forms)
GATED_DOC = """dim n, d, e
param k = 24
in Q[n, d], K[n, d], V[n, e], G[n], wg[d]
in doc[n]: int
S[i, j] = dot(Q[i], K[j]) / sqrt(d) + G[j]
L[i, j] = where(doc[i] == doc[j] and j <= i and i - j < k, S[i, j], -inf)
A[i, j] = where(doc[i] == doc[j] and j <= i, S[i, j], -inf)
g[i] = sigmoid(tanh(dot(Q[i], wg)) + relu(G[i]))
out O[i] = g[i] * (softmax(L[i], axis=-1) @ V) + (1 - g[i]) * (softmax(A[i], axis=-1) @ V)
"""

SIGN_GATE = """dim n, d, e
in Q[n, d], K[n, d], V[n, e], wg[d]
L[i, j] = where(j <= i and i - j < 16, dot(Q[i], K[j]) / sqrt(d), -inf)
A[i, j] = where(j <= i, dot(Q[i], K[j]) / sqrt(d), -inf)
g[i] = sigmoid(sign(dot(Q[i], wg)))
out O[i] = g[i] * (softmax(L[i], axis=-1) @ V) + (1 - g[i]) * (softmax(A[i], axis=-1) @ V)
"""


def _rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed + sum(shape)), dtype=F64)


def _pi(batch=(2,), m=200):
    k = moa.compile("examples/pi_attention.moa", k=20, s=7)
    x = dict(Q=_rand(*batch, m, D), K=_rand(*batch, m, D, seed=1), V=_rand(*batch, m, D, seed=2), wg=_rand(D, seed=3))
    return k, x


def _same(got, p):
    assert (got.flops, got.transcendentals, got.dram_bytes_loaded, got.dram_bytes_stored) == \
        (p.flops, p.transcendentals, p.dram_bytes_loaded, p.dram_bytes_stored)


@pytest.mark.parametrize("splits", [1, 3])
def test_pi_attention_decodes_in_one_split_launch_and_one_fused_merge(splits):
    k, x = _pi()
    plan, block = ring.block_kernel(k)
    assert decode_merge.why_not(block, plan) is None
    full = k(**x)
    with instrument() as c:
        got = k.decode(**dict(x, Q=x["Q"][:, -NQ:]), splits=splits)
    assert len(plan.outputs) == 2 and c.launches == 2   # one split launch of both branches, one merge with the gate
    assert (got - full[:, -NQ:]).abs().max().item() <= 1e-12


@pytest.mark.parametrize("splits", [1, 3])
def test_gqa_packed_per_head_gate(splits):
    """4 query heads per K/V head packed into one tile; the gate's bias bh[a] per query head (the row's head index
    decomposed from the packed rows)."""
    k = moa.compile(GQA_PI)
    m = 100
    x = dict(Q=_rand(2, 8, m, D), K=_rand(2, 2, m, D, seed=1), V=_rand(2, 2, m, D, seed=2), wg=_rand(D, seed=3),
             bh=_rand(8, seed=4))
    full = k(**x)
    got, st = k.decode(**dict(x, Q=x["Q"][..., -NQ:, :]), splits=splits, stats=True)
    assert st.packed_heads == 4
    assert (got - full[..., -NQ:, :]).abs().max().item() <= 1e-12


def test_gqa_packed_per_head_gate_counted_exactly():
    k = moa.compile(GQA_PI)
    m = 100
    x = dict(Q=_rand(2, 8, NQ, D), K=_rand(2, 2, m, D, seed=1), V=_rand(2, 2, m, D, seed=2), wg=_rand(D, seed=3),
             bh=_rand(8, seed=4))
    _same(measure(k, x, splits=3), decode_cost(k, NQ, m, splits=3, dtype="fp64", device="cpu", batch=(2,), h=8,
                                               g=2, d=D, e=D))


def test_gate_of_an_input_read_by_both_indices_with_valid_lengths_and_pages():
    k = moa.compile(GATED_DOC)
    m, lens = 96, torch.tensor([50, 96])
    x = dict(Q=_rand(2, m, D), K=_rand(2, m, D, seed=1), V=_rand(2, m, D, seed=2), G=_rand(2, m, seed=3),
             wg=_rand(D, seed=4), doc=(torch.arange(m) // 30).expand(2, m).contiguous())
    plan, block = ring.block_kernel(k)
    assert decode_merge.why_not(block, plan) is None
    want = torch.stack([k(**{n: t if n == "wg" else t[b, :int(lens[b])] for n, t in x.items()})[-NQ:]
                        for b in range(2)])
    q = torch.stack([x["Q"][b, int(lens[b]) - NQ:int(lens[b])] for b in range(2)])
    assert (k.decode(**dict(x, Q=q), splits=3, cache_len=lens) - want).abs().max().item() <= 1e-12
    perm = torch.randperm(2 * m // P, generator=torch.Generator().manual_seed(2))
    pools = {}
    for n in ("K", "V", "G", "doc"):
        src = x[n].reshape(2 * m // P, P, *x[n].shape[2:])
        dst = torch.empty_like(src)
        dst[perm] = src
        pools[n] = dst.flatten(0, 1)
    table = perm.view(2, m // P)
    got = k.decode(Q=q, wg=x["wg"], **pools, block_table=table, page_size=P, cache_len=lens)
    assert (got - want).abs().max().item() <= 1e-12
    _same(measure(k, dict(Q=q, wg=x["wg"], **pools), block_table=table, page_size=P, cache_len=lens),
          decode_cost(k, NQ, m, dtype="fp64", device="cpu", batch=(2,), page_size=P, cache_len=lens.tolist(),
                      inputs={"doc": pools["doc"]}, block_table=table, d=D, e=D))


@pytest.mark.parametrize("splits", [1, 3])
def test_fused_merge_counted_exactly(splits):
    """The cost model's merge with the gate equals the interpreter's counters (batch axes, one and three
    splits: one split still runs the fused merge, its partials in the compute dtype)."""
    k, x = _pi(batch=(2,))
    x1 = dict(x, Q=x["Q"][:, -NQ:])
    p = decode_cost(k, NQ, 200, splits=splits, dtype="fp64", device="cpu", batch=(2,), d=D, e=D)
    got = measure(k, x1, splits=splits)
    _same(got, p)
    assert got.tiles_visited == p.tiles_visited
    assert p.merge_bytes > 0


def test_epilogue_without_a_fused_form_keeps_the_torch_path():
    k = moa.compile(SIGN_GATE)
    plan, block = ring.block_kernel(k)
    assert "sign" in decode_merge.why_not(block, plan)
    x = dict(Q=_rand(100, D), K=_rand(100, D, seed=1), V=_rand(100, D, seed=2), wg=_rand(D, seed=3))
    full = k(**x)
    with instrument() as c:
        got = k.decode(**dict(x, Q=x["Q"][-NQ:]), splits=3)
    assert c.launches == 2 * len(plan.outputs)   # a split launch and a merge per branch, the gate in torch
    assert (got - full[-NQ:]).abs().max().item() <= 1e-12
    p = decode_cost(k, NQ, 100, splits=3, dtype="fp64", device="cpu", d=D, e=D)
    _same(measure(k, dict(x, Q=x["Q"][-NQ:]), splits=3), p)


def test_fused_merge_sources_are_pyflakes_clean(tmp_path):
    from moa import shard
    from moa.codegen.splitkv import branches_source
    from moa.codegen.splitkv_epilogue import fused_merge_source
    from moa.runtime import decode

    for i, src in enumerate((None, GQA_PI, GATED_DOC)):
        k = moa.compile("examples/pi_attention.moa") if src is None else moa.compile(src)
        plan, block = ring.block_kernel(k)
        for ep in plan.epilogues:
            for nb in (0, 2):
                fm = fused_merge_source(ep, shard.epilogue_program(plan, ep).input_map, ("softmax", "softmax"), nb,
                                        "tl.float32", frozenset({"Q"}))
                (tmp_path / f"m{i}_{nb}.py").write_text(fm.source)
        for mode in ("split", "lengths", "paged"):   # the branches' grid kernels in one launch
            src = branches_source(decode.grid_sources(k, "float32", nbatch=1, mode=mode))
            assert src.count("def _attn_fwd_b") == len(plan.outputs)
            (tmp_path / f"b{i}_{mode}.py").write_text(src)
    exe = Path(sys.executable).with_name("ruff")
    proc = subprocess.run([str(exe), "check", "--isolated", "--no-cache", "--select", "F", "--output-format",
                           "concise", str(tmp_path)], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stdout[-4000:]


def test_branches_launch_and_fused_merge_fit_sm90():
    """PiAttention at d = 128, bf16: both branches' grid kernels in one launch fit sm_90 without spills (255
    registers; 248 and 202 apart), and so does the merge with the gate (182)."""
    from moa.runtime.decode_aot import branches_aot

    out = branches_aot(moa.compile("examples/pi_attention.moa"), 1, 4096, dtype="bf16", d=128, e=128)
    assert set(out) == {"_attn_branches", "_merge_epilogue"}
    for rep, ok, why in out.values():
        assert ok, why
        assert rep.spills == 0


def test_fused_merge_of_inputs_shared_by_the_batch_counted_exactly():
    """G (read by both indices, in the gate) and doc passed once for both batch indices: the fused merge reads the
    query side per row all the same (the model's rule), and the count stays exact."""
    k = moa.compile(GATED_DOC)
    m = 96
    x = dict(Q=_rand(2, NQ, D), K=_rand(2, m, D, seed=1), V=_rand(2, m, D, seed=2), G=_rand(m, seed=3),
             wg=_rand(D, seed=4), doc=torch.arange(m) // 30)
    full = k(**dict(x, Q=_rand(2, m, D, seed=5).index_copy(1, torch.arange(m - NQ, m), x["Q"])))
    assert (k.decode(**x, splits=3) - full[:, -NQ:]).abs().max().item() <= 1e-12
    _same(measure(k, x, splits=3), decode_cost(k, NQ, m, splits=3, dtype="fp64", device="cpu", batch=(2,),
                                               inputs={"doc": x["doc"]}, d=D, e=D))
