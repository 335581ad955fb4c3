"""Varlen batches whose keys are pages of a pool (k.varlen(..., block_table=, page_size=), codegen/splitkv.py
VARLEN_PAGED): shuffled pages equal the packed keys, float64 in the interpreter, for a two-dim program, a
one-dim program (queries are each sequence's last rows), a document mask (ids along the keys: per-tile
summaries of the pool, query rows gathered through the table) and PiAttention; refusals."""
import pytest
import torch

import moa
from moa.errors import InputError

D = 16
F64 = torch.float64
P, PAGES = 16, 6


def _paged(t, lk, perm):
    """The packed keys (axis 0) of each sequence laid into pages of a pool: sequence s's page p goes to pool page
    perm[s * PAGES + p]; unused pool rows are NaN (never read)."""
    pool = torch.full((len(lk) * PAGES * P, *t.shape[1:]), float("nan") if t.is_floating_point() else -1,
                      dtype=t.dtype)
    start = 0
    for s, n in enumerate(lk):
        for j in range(n):
            page = int(perm[s * PAGES + j // P])
            pool[page * P + j % P] = t[start + j]
        start += n
    return pool


@pytest.mark.parametrize("name", ["causal_bottom_right", "sliding_window", "document_mask", "pi_attention"])
def test_varlen_paged_equals_packed_keys(name):
    """pi_attention: two branches split per page and merged, the gate per sequence."""
    params = {"sliding_window": {"w": 20}, "pi_attention": {"k": 20, "s": 7}}.get(name, {})
    k = moa.compile(f"examples/{name}.moa", **params)
    lq, lk = [3, 1, 0, 20], [40, 1, 0, 96]
    g = torch.Generator().manual_seed(5)
    cq, ck = torch.tensor([0] + lq).cumsum(0), torch.tensor([0] + lk).cumsum(0)
    x = dict(Q=torch.randn(sum(lq), D, generator=g, dtype=F64), K=torch.randn(sum(lk), D, generator=g, dtype=F64),
             V=torch.randn(sum(lk), D, generator=g, dtype=F64))
    if name == "document_mask":
        x["doc"] = torch.cat([torch.arange(n) // 9 for n in lk])
    wg = {"wg": torch.randn(D, generator=g, dtype=F64)} if name == "pi_attention" else {}
    want = k.varlen(cq, ck, **x, **wg)
    perm = torch.randperm(len(lk) * PAGES, generator=torch.Generator().manual_seed(1))
    pools = {n: _paged(t, lk, perm) for n, t in x.items() if n != "Q"}
    got, st = k.varlen(cq, ck, Q=x["Q"], **pools, **wg, block_table=perm.view(len(lk), PAGES), page_size=P,
                       stats=True)
    assert st.splits == PAGES
    assert (got - want).abs().max().item() <= 1e-12


def test_varlen_paged_refusals():
    k = moa.compile("examples/causal_bottom_right.moa")
    x = dict(Q=torch.zeros(4, D, dtype=F64), K=torch.zeros(64, D, dtype=F64), V=torch.zeros(64, D, dtype=F64))
    cq, ck = torch.tensor([0, 4]), torch.tensor([0, 40])
    with pytest.raises(InputError, match="needs both"):
        k.varlen(cq, ck, **x, page_size=16)
    with pytest.raises(InputError, match="more keys than"):
        k.varlen(cq, ck, **x, block_table=torch.tensor([[0, 1]]), page_size=16)
    with pytest.raises(InputError, match="pages 0 .. 3"):
        k.varlen(cq, ck, **x, block_table=torch.tensor([[0, 1, 4]]), page_size=16)


def test_varlen_paged_source_is_pyflakes_clean_and_fits_sm90(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    from moa.runtime import decode
    from moa.runtime.decode_aot import decode_aot

    for name in ("document_mask", "causal_bottom_right"):
        for i, src in enumerate(decode.grid_sources(moa.compile(f"examples/{name}.moa"), "float32", 1,
                                                    "varlen_paged")):
            assert "block_table + seq * stride_table + split" in src
            (tmp_path / f"{name}_{i}.py").write_text(src)
    exe = Path(sys.executable).with_name("ruff")
    proc = subprocess.run([str(exe), "check", "--isolated", "--no-cache", "--select", "F", "--output-format",
                           "concise", str(tmp_path)], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stdout[-4000:]
    (rep, ok, why), = decode_aot(moa.compile("examples/document_mask.moa"), 16, 4096, dtype="bf16",
                                 mode="varlen_paged", d=128, e=128).values()
    assert ok, why
    assert rep.spills == 0
