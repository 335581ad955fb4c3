"""Variable-length batches (k.varlen, runtime/decode.py): packed sequences given by cumulative lengths, one launch,
equal to separate calls (float64, interpreter); refusals; generated sources pyflakes-clean."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import moa
from moa.codegen.splitkv import MERGE_SOURCE
from moa.errors import InputError, UnsupportedError
from moa.runtime import decode

D = 16
F64 = torch.float64


def _packed(lq, lk, heads=()):
    g = torch.Generator().manual_seed(len(lq) + sum(lk))
    cq = torch.tensor([0] + lq).cumsum(0)
    ck = torch.tensor([0] + lk).cumsum(0).to(torch.int32)
    ins = dict(Q=torch.randn(*heads, int(cq[-1]), D, generator=g, dtype=F64),
               K=torch.randn(*heads, int(ck[-1]), D, generator=g, dtype=F64),
               V=torch.randn(*heads, int(ck[-1]), D, generator=g, dtype=F64))
    return ins, cq, ck


def _separate(k, ins, cq, ck):
    outs = []
    for b in range(cq.numel() - 1):
        q0, q1, k0, k1 = int(cq[b]), int(cq[b + 1]), int(ck[b]), int(ck[b + 1])
        outs.append(k(Q=ins["Q"][..., q0:q1, :], K=ins["K"][..., k0:k1, :], V=ins["V"][..., k0:k1, :]))
    return torch.cat(outs, dim=-2)


def test_varlen_five_sequences_equal_separate_calls():
    """5 sequences of lengths 1 .. 700 (ragged tiles), causal: one launch (a grid axis per sequence x split)."""
    k = moa.compile("examples/causal.moa")
    lens = [1, 37, 700, 5, 130]
    ins, cq, ck = _packed(lens, lens)
    got, st = k.varlen(cq, ck, stats=True, **ins)
    assert st.grid[2] == 5 * st.splits
    assert (got - _separate(k, ins, cq, ck)).abs().max().item() <= 1e-12


def test_varlen_split_keys_bottom_right_heads():
    """Different query and key lengths (bottom-right causal: prefill continuing a cache), two heads as a batch
    axis, the keys split 3 ways, an empty sequence in the middle."""
    k = moa.compile("examples/causal_bottom_right.moa")
    ins, cq, ck = _packed([1, 3, 0, 16, 2], [1, 200, 0, 90, 130], heads=(2,))
    got = k.varlen(cq, ck, splits=3, **ins)
    assert (got - _separate(k, ins, cq, ck)).abs().max().item() <= 1e-12


def test_varlen_one_dim_programs_take_the_last_rows():
    """sliding_window (one dim for both axes): a sequence's queries are its last rows."""
    k = moa.compile("examples/sliding_window.moa", w=20)
    lq, lk = [4, 1, 30], [50, 1, 30]
    ins, cq, ck = _packed(lq, lk)
    got = k.varlen(cq, ck, splits=2, **ins)
    for b in range(3):
        full_q = torch.randn(lk[b], D, dtype=F64)
        full_q[lk[b] - lq[b]:] = ins["Q"][int(cq[b]):int(cq[b + 1])]
        kv = dict(K=ins["K"][int(ck[b]):int(ck[b + 1])], V=ins["V"][int(ck[b]):int(ck[b + 1])])
        want = k.reference(Q=full_q, **kv)[lk[b] - lq[b]:]
        torch.testing.assert_close(got[int(cq[b]):int(cq[b + 1])], want, rtol=1e-12, atol=1e-12)


def test_varlen_two_branch_program_equals_separate_calls():
    """PiAttention: both branches split and merged in one launch each, the gate evaluated per sequence."""
    k = moa.compile("examples/pi_attention.moa", k=20, s=7)
    lens = [1, 40, 0, 130]
    ins, cq, ck = _packed(lens, lens)
    wg = torch.randn(D, generator=torch.Generator().manual_seed(3), dtype=F64)
    got = k.varlen(cq, ck, splits=2, wg=wg, **ins)
    parts = [k(Q=ins["Q"][a:b], K=ins["K"][a:b], V=ins["V"][a:b], wg=wg)
             for a, b in zip(cq[:-1].tolist(), cq[1:].tolist()) if b > a]
    assert (got - torch.cat(parts)).abs().max().item() <= 1e-12


def test_varlen_refusals():
    k = moa.compile("examples/sliding_window.moa")
    ins, cq, ck = _packed([3, 4], [3, 4])
    with pytest.raises(InputError, match="start at 0"):
        k.varlen(cq + 1, ck, **ins)
    with pytest.raises(InputError, match="1-d int32 or int64"):
        k.varlen(cq.float(), ck, **ins)
    with pytest.raises(InputError, match="2 sequences and cu_seqlens_k 1"):
        k.varlen(cq, ck[:2], **ins)
    with pytest.raises(InputError, match="at least one sequence"):
        k.varlen([0], [0], **{n: t[:0] for n, t in ins.items()})
    assert (k.varlen(cq.tolist(), ck.tolist(), **ins) - k.varlen(cq, ck, **ins)).abs().max() == 0   # lists too
    with pytest.raises(InputError, match="its queries are its last rows"):
        k.varlen(torch.tensor([0, 4, 7]), torch.tensor([0, 3, 7]), **ins)
    with pytest.raises(InputError, match="cu_seqlens_q ends at"):
        k.varlen(torch.tensor([0, 3, 6]), torch.tensor([0, 3, 6]), **ins)
    rel = moa.compile("examples/relative_bias.moa")
    with pytest.raises(UnsupportedError, match="depends on the sequence length"):
        rel.varlen(cq, ck, **ins, bias=torch.zeros(13, dtype=F64))


def test_generated_split_and_varlen_sources_are_pyflakes_clean(tmp_path):
    for name in ("causal_bottom_right", "alibi", "pi_attention"):
        k = moa.compile(f"examples/{name}.moa")
        for mode in ("split", "varlen", "lengths", "paged"):
            for src in decode.grid_sources(k, "float32", nbatch=1, mode=mode):
                (tmp_path / f"{name}_{len(list(tmp_path.iterdir()))}.py").write_text(src)
    (tmp_path / "merge.py").write_text(MERGE_SOURCE)
    exe = Path(sys.executable).with_name("ruff")
    proc = subprocess.run([str(exe), "check", "--isolated", "--no-cache", "--select", "F", "--output-format",
                           "concise", str(tmp_path)], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stdout[-4000:]
    assert len(list(tmp_path.iterdir())) >= 8


def test_varlen_runs_a_residue_plan_in_its_tiled_variant(monkeypatch):
    """The residue schedule's programs are not row tiles of one sequence: a varlen call planned with it runs the
    tiled variant instead, with the same result."""
    import dataclasses

    from moa import onf
    from moa.runtime import ring

    k = moa.compile("examples/pi_attention.moa", k=20, s=7)
    _, block = ring.block_kernel(k)
    plan = block.launcher.plan

    def residue(name, b, config=None, fills=False):
        p = plan(name, b, config, fills)
        res = [v for v in block.planner.variants[name] if v.kind == onf.RESIDUE]
        return dataclasses.replace(p, schedule=res[0]) if res else p

    lens = [5, 60]
    ins, cq, ck = _packed(lens, lens)
    wg = torch.randn(D, generator=torch.Generator().manual_seed(4), dtype=F64)
    want = k.varlen(cq, ck, splits=2, wg=wg, **ins)
    monkeypatch.setattr(block.launcher, "plan", residue)
    assert any(v.kind == onf.RESIDUE for v in block.planner.variants["O_branch1"])
    assert (k.varlen(cq, ck, splits=2, wg=wg, **ins) - want).abs().max().item() <= 1e-12


def test_varlen_normalize_with_a_gate_read_by_both_indices():
    """power_gated: a normalize output (partials merged by sums of the normaliser; a split past a short sequence
    contributes z = 0) whose gate G[i], G[j] is packed along the keys."""
    from moa.runtime.check import random_inputs

    k = moa.compile("examples/power_gated.moa")
    lens = [1, 40, 130]
    xs = [random_inputs(k.program, {d.name: {"n": n}.get(d.name, D) for d in k.program.dims}, seed=n, batch=0,
                        dtype=F64) for n in lens]
    packed = {n: torch.cat([x[n] for x in xs], dim=0) for n in xs[0]}
    cu = torch.tensor([0] + lens).cumsum(0)
    got = k.varlen(cu, cu, splits=2, **packed)
    assert (got - torch.cat([k(**x) for x in xs])).abs().max().item() <= 1e-12


def test_varlen_with_no_query_rows_and_a_positional_epilogue():
    # the per-sequence epilogue found no sequence with rows: a raw KeyError (found by a fuzzing helper)
    k = moa.compile("dim n, m, d, e\nin Q[n, d], K[m, d], V[m, e]\nS[i, j] = dot(Q[i], K[j])\n"
                    "out O[i] = (softmax(S[i], axis=-1) @ V) / (i + 1)")
    kv = torch.randn(5, 4, dtype=F64)
    out = k.varlen(torch.tensor([0, 0]), torch.tensor([0, 5]), Q=torch.zeros(0, 4, dtype=F64), K=kv, V=kv)
    assert out.shape == (0, 4)
