"""Decoding with valid lengths and paged caches for programs with an input read by both the query and the key
index (document ids, global tokens, a gate; runtime/decode_rows.py): the input is passed along the keys (a pool
when paged) and its query side is gathered per batch index from the last rows of that index's valid keys; float64
against the reference on each batch index's valid keys; shuffled pages equal the contiguous cache."""
import pytest
import torch

import moa
from moa.runtime.check import random_inputs

D = 16
F64 = torch.float64
B, NQ, P, PAGES = 3, 3, 16, 9
LENS = torch.tensor([5, 70, 144])


def _pool(cache, perm):
    """The batch's pages shuffled into one pool (keys on axis 1): page p of batch b goes to pool page
    perm[b * PAGES + p]."""
    src = cache.reshape(B * PAGES, P, *cache.shape[2:])
    pool = torch.empty_like(src)
    pool[perm] = src
    return pool.flatten(0, 1)


@pytest.mark.parametrize("name", ["document_mask", "global_window", "power_gated"])
def test_both_indices_with_valid_lengths_and_shuffled_pages(name):
    k = moa.compile(f"examples/{name}.moa", **({"w": 8} if name == "global_window" else {}))
    m = PAGES * P
    xs = [random_inputs(k.program, {d.name: {"n": m}.get(d.name, D) for d in k.program.dims}, seed=b, batch=0,
                        dtype=F64) for b in range(B)]
    x = {n: torch.stack([t[n] for t in xs]) for n in xs[0] if n != "wg"}
    if name == "document_mask":   # sorted documents of 9 tokens: tiles skipped by the data
        x["doc"] = (torch.arange(m) // 9).expand(B, m).contiguous()
    want = []
    for b in range(B):
        n = int(LENS[b])
        want.append(k.reference(**{nm: t[b, :n] for nm, t in x.items()})[n - NQ:])
    want = torch.stack(want)
    q = torch.stack([x["Q"][b, int(LENS[b]) - NQ:int(LENS[b])] for b in range(B)])
    got = k.decode(**dict(x, Q=q), cache_len=LENS, splits=3)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    perm = torch.randperm(B * PAGES, generator=torch.Generator().manual_seed(3))
    pools = {n: _pool(t, perm) for n, t in x.items() if n != "Q"}
    paged = k.decode(Q=q, **pools, cache_len=LENS, block_table=perm.view(B, PAGES), page_size=P)
    assert (paged - got).abs().max().item() <= 1e-12


def test_unbatched_document_ids_get_each_batch_index_query_rows():
    """doc[m] shared by every batch index, lengths differing: each index's queries read their own rows' ids."""
    k = moa.compile("examples/document_mask.moa")
    m = 100
    g = torch.Generator().manual_seed(0)
    kv = {n: torch.randn(B, m, D, generator=g, dtype=F64) for n in ("K", "V")}
    doc = torch.arange(m) // 7
    lens = torch.tensor([3, 50, 100])
    q = torch.randn(B, NQ, D, generator=g, dtype=F64)
    got = k.decode(Q=q, **kv, doc=doc, cache_len=lens)
    for b in range(B):
        n = int(lens[b])
        qf = torch.randn(n, D, generator=g, dtype=F64)
        qf[n - NQ:] = q[b]
        want = k.reference(Q=qf, K=kv["K"][b, :n], V=kv["V"][b, :n], doc=doc[:n])[n - NQ:]
        torch.testing.assert_close(got[b], want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("splits", [1, 3])
def test_decode_cost_counts_the_document_skips_exactly(splits):
    """decode_cost(inputs=) counts the tiles the document ids' summaries skip, per split and per batch index's
    valid length, as the instrumented interpreter executes them (runtime/decode_measure.py)."""
    from moa.runtime.decode_cost import decode_cost
    from moa.runtime.decode_measure import measure

    k = moa.compile("examples/document_mask.moa")
    g = torch.Generator().manual_seed(0)
    x = dict(Q=torch.randn(B, NQ, D, generator=g, dtype=F64), K=torch.randn(B, 144, D, generator=g, dtype=F64),
             V=torch.randn(B, 144, D, generator=g, dtype=F64), doc=torch.arange(144) // 9)
    for lens in (None, [5, 70, 144]):
        extra = {} if lens is None else {"cache_len": torch.tensor(lens)}
        got = measure(k, x, splits=splits, **extra)
        p = decode_cost(k, NQ, 144, splits=splits, dtype="fp64", device="cpu", batch=(B,), cache_len=lens,
                        inputs={"doc": x["doc"]}, d=D, e=D)
        assert (got.flops, got.transcendentals, got.dram_bytes_loaded, got.dram_bytes_stored, got.tiles_visited) \
            == (p.flops, p.transcendentals, p.dram_bytes_loaded, p.dram_bytes_stored, p.tiles_visited)
