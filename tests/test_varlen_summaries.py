"""Varlen batches of programs whose tile tests read per-tile summaries of integer / boolean inputs (document ids,
global tokens): the summaries are computed per sequence in its local tiles (runtime/summaries.py
packed_tile_summaries), so a sequence starting mid-tile skips exactly the tiles it skips alone; float64, equal to
the reference of each sequence."""
import pytest
import torch

import moa
from moa.runtime.summaries import packed_tile_summaries, tile_summaries

D = 16
F64 = torch.float64


def _sequences(name, lq, lk, heads=()):
    """Packed inputs of sequences of lk keys whose queries are the last lq rows, with each sequence's full
    inputs (queries for every row) for the reference."""
    g = torch.Generator().manual_seed(sum(lk) + len(lq))
    full = []
    for n in lk:
        x = dict(Q=torch.randn(*heads, n, D, generator=g, dtype=F64), K=torch.randn(*heads, n, D, generator=g,
                 dtype=F64), V=torch.randn(*heads, n, D, generator=g, dtype=F64))
        if name == "document_mask":   # sorted documents of 1 .. 40 tokens: whole key tiles are skipped
            x["doc"] = torch.bucketize(torch.arange(n), torch.randint(1, 41, (n,), generator=g).cumsum(0), right=True)
        else:   # a few global tokens
            x["glob"] = torch.rand(n, generator=g) < 0.02
        full.append(x)
    packed = {}
    for name_ in full[0]:
        if name_ == "Q":
            parts = [x["Q"][..., n - q:, :] for x, q, n in zip(full, lq, lk)]
        else:
            parts = [x[name_] for x in full]
        packed[name_] = torch.cat(parts, dim=-1 if name_ in ("doc", "glob") else -2)
    cq = torch.tensor([0] + lq).cumsum(0)
    ck = torch.tensor([0] + lk).cumsum(0).to(torch.int32)
    return full, packed, cq, ck


@pytest.mark.parametrize("name", ["document_mask", "global_window"])
def test_varlen_with_tile_summaries_equals_each_sequence(name):
    """Sequences starting mid-tile, queries fewer than keys (the last rows), an empty sequence, keys split 3 ways,
    two heads as a batch axis."""
    k = moa.compile(f"examples/{name}.moa", **({"w": 8} if name == "global_window" else {}))
    lq, lk = [1, 5, 0, 70, 3], [33, 5, 0, 150, 90]
    full, packed, cq, ck = _sequences(name, lq, lk, heads=(2,))
    got = k.varlen(cq, ck, splits=3, **packed)
    for s, x in enumerate(full):
        if lq[s]:
            want = k.reference(**x)[..., lk[s] - lq[s]:, :]
            torch.testing.assert_close(got[..., int(cq[s]):int(cq[s + 1]), :], want, rtol=1e-12, atol=1e-12)


def test_packed_summaries_are_each_sequences_own():
    """Sequence s's tiles start at tile cu[s] // block + s and equal its own summaries; the SCAN padding follows."""
    t = torch.arange(100) // 7
    cu = [0, 10, 10, 43, 100]
    st = packed_tile_summaries(t, 0, 16, cu, extra=4)
    assert st.shape == (100 // 16 + 5 + 4, 2)
    for s in range(4):
        own = tile_summaries(t[cu[s]:cu[s + 1]], 0, 16)
        assert torch.equal(st[cu[s] // 16 + s: cu[s] // 16 + s + own.shape[0]], own)


def test_generated_varlen_sources_with_summaries_are_pyflakes_clean(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    from moa.runtime import decode

    for name in ("document_mask", "global_window"):
        for mode in ("varlen", "split"):
            for i, src in enumerate(decode.grid_sources(moa.compile(f"examples/{name}.moa"), "float32", 1, mode)):
                assert "_tiles_ptr" in src or "_tiles" in src
                (tmp_path / f"{name}_{mode}_{i}.py").write_text(src)
    exe = Path(sys.executable).with_name("ruff")
    proc = subprocess.run([str(exe), "check", "--isolated", "--no-cache", "--select", "F", "--output-format",
                           "concise", str(tmp_path)], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stdout[-4000:]


def test_document_mask_varlen_kernel_fits_sm90():
    """The varlen grid kernel of a document mask (summaries moved per sequence) compiles for sm_90 without spills
    in decode_config's tiles (bf16, d = 128; runtime/decode_aot.py)."""
    from moa.runtime.decode_aot import decode_aot

    (rep, ok, why), = decode_aot(moa.compile("examples/document_mask.moa"), 16, 4096, dtype="bf16", mode="varlen",
                                 d=128, e=128).values()
    assert ok, why
    assert rep.spills == 0
