"""The data-aware decode and varlen cost (decode_cost / varlen_cost with inputs=) equals what the instrumented
interpreter executes (runtime/decode_measure.py) with pages and GQA packing too, and keys past a batch index's
valid length never change what a program skips: the launch summarises each batch index's (sequence's) valid keys
in logical order (runtime/decode_summaries.py). Float64, CPU tiles."""
import pytest
import torch

import moa
from moa.errors import InputError
from moa.runtime.decode_cost import decode_cost
from moa.runtime.decode_measure import measure, measure_varlen
from moa.runtime.varlen_cost import varlen_cost

D = 16
F64 = torch.float64
B, NQ, P = 2, 3, 16

# a key-padding flag read by the key index only (role KEY)
KEEP = """dim n, d, e
in Q[n, d], K[n, d], V[n, e]
in keep[n]: bool
S[i, j] = where(keep[j] and j <= i, dot(Q[i], K[j]) / sqrt(d), -inf)
out O = softmax(S, axis=-1) @ V
"""

# GQA (8 query heads on 2 K/V heads) with a document mask (doc read by both indices) or a key flag per K/V head
GQA_DOC = """dim h, g, n, d, e
in Q[h, n, d], K[g, n, d], V[g, n, e]
in doc[n]: int
S[a, i, j] = where(doc[i] == doc[j] and j <= i, dot(Q[a, i], K[a // (h // g), j]) / sqrt(d), -inf)
out O[a] = softmax(S[a], axis=-1) @ V[a // (h // g)]
"""
GQA_KEEP = """dim h, g, n, d, e
in Q[h, n, d], K[g, n, d], V[g, n, e]
in keep[g, n]: bool
S[a, i, j] = where(keep[a // (h // g), j] and j <= i, dot(Q[a, i], K[a // (h // g), j]) / sqrt(d), -inf)
out O[a] = softmax(S[a], axis=-1) @ V[a // (h // g)]
"""


def _rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed + sum(shape)), dtype=F64)


def _same(got, p):
    assert (got.flops, got.transcendentals, got.dram_bytes_loaded, got.dram_bytes_stored, got.tiles_visited) == \
        (p.flops, p.transcendentals, p.dram_bytes_loaded, p.dram_bytes_stored, p.tiles_visited)


def _keep(m, lens):
    """The first 10 keys kept (the tiles after them skipped by the data), and every key past a batch index's valid
    length True: a launch that summarised those stale keys would visit the last partial tile, a call on the valid
    keys skips it."""
    keep = (torch.arange(m) < 10).expand(len(lens), m).clone()
    for b, n in enumerate(lens):
        keep[b, n:] = True
    return keep


def _pools(x: dict, names, perm, pages):
    """Batch index b's page p of each cache (keys on axis 1) at pool page perm[b * pages + p]; the pool has the
    batch's pages only, flattened along the keys."""
    out = {}
    for n in names:
        t = x[n]
        src = t.reshape(t.shape[0] * pages, P, *t.shape[2:])
        pool = torch.empty_like(src)
        pool[perm] = src
        out[n] = pool.flatten(0, 1)
    return out


@pytest.mark.parametrize("splits", [1, 3])
def test_stale_keys_past_the_valid_length_do_not_count(splits):
    k = moa.compile(KEEP)
    m, lens = 144, [70, 141]
    keep = _keep(m, lens)
    x = dict(Q=_rand(B, NQ, D), K=_rand(B, m, D, seed=1), V=_rand(B, m, D, seed=2), keep=keep)
    got = measure(k, x, splits=splits, cache_len=torch.tensor(lens))
    p = decode_cost(k, NQ, m, splits=splits, dtype="fp64", device="cpu", batch=(B,), cache_len=lens,
                    inputs={"keep": keep}, d=D, e=D)
    _same(got, p)
    blind = decode_cost(k, NQ, m, splits=splits, dtype="fp64", device="cpu", batch=(B,), cache_len=lens, d=D, e=D)
    assert blind.tiles_visited > p.tiles_visited
    want = torch.stack([k.reference(**{n: t[b, :lens[b]] for n, t in dict(x, Q=_rand(B, m, D, seed=5).index_copy(
        1, torch.arange(lens[b] - NQ, lens[b]), x["Q"])).items()})[lens[b] - NQ:] for b in range(B)])
    torch.testing.assert_close(k.decode(**x, splits=splits, cache_len=torch.tensor(lens)), want, rtol=1e-12,
                               atol=1e-12)


@pytest.mark.parametrize("name", ["keep", "document_mask"])
def test_paged_cost_with_data_counted_exactly(name):
    """Shuffled pages, the last page of one batch index partly filled (the rest of its page stale)."""
    k = moa.compile(KEEP) if name == "keep" else moa.compile("examples/document_mask.moa")
    pages, lens = 9, [70, 144]
    m = pages * P
    x = dict(Q=_rand(B, NQ, D), K=_rand(B, m, D, seed=1), V=_rand(B, m, D, seed=2))
    if name == "keep":
        x["keep"] = _keep(m, lens)
    else:   # documents of 9 tokens; a new document starts past the valid length of batch index 0
        x["doc"] = (torch.arange(m) // 9).expand(B, m).clone()
        x["doc"][0, 70:] = 0
    data = "keep" if name == "keep" else "doc"
    perm = torch.randperm(B * pages, generator=torch.Generator().manual_seed(3))
    table = perm.view(B, pages)
    pools = _pools(x, ("K", "V", data), perm, pages)
    cl = torch.tensor(lens)
    got = measure(k, dict(Q=x["Q"], **pools), block_table=table, page_size=P, cache_len=cl)
    p = decode_cost(k, NQ, m, dtype="fp64", device="cpu", batch=(B,), page_size=P, cache_len=lens,
                    inputs={data: pools[data]}, block_table=table, d=D, e=D)
    _same(got, p)
    blind = decode_cost(k, NQ, m, dtype="fp64", device="cpu", batch=(B,), page_size=P, cache_len=lens, d=D, e=D)
    assert blind.tiles_visited > p.tiles_visited
    contiguous = k.decode(**x, cache_len=cl, splits=pages)
    paged = k.decode(Q=x["Q"], **pools, block_table=table, page_size=P, cache_len=cl)
    assert (paged - contiguous).abs().max().item() <= 1e-12
    with pytest.raises(InputError, match="block_table"):
        decode_cost(k, NQ, m, dtype="fp64", device="cpu", batch=(B,), page_size=P, inputs={data: pools[data]}, d=D,
                    e=D)


@pytest.mark.parametrize("name", ["doc", "keep"])
@pytest.mark.parametrize("paged", [False, True])
def test_gqa_packed_cost_with_data_counted_exactly(name, paged):
    """GQA-packed heads (4 query heads per K/V head in one tile): the packed program tests key tiles by a flag per
    K/V head; a document mask's row read doc[r mod n] is no tile of one axis, so its packed kernel skips nothing by
    the data (and the cost with the ids equals the cost without)."""
    k = moa.compile(GQA_DOC if name == "doc" else GQA_KEEP)
    pages, lens = 9, [70, 144]
    m = pages * P
    x = dict(Q=_rand(B, 8, NQ, D), K=_rand(B, 2, m, D, seed=1), V=_rand(B, 2, m, D, seed=2))
    if name == "doc":
        x["doc"] = torch.randint(0, 3, (B, m), generator=torch.Generator().manual_seed(0)).sort(-1).values
    else:
        x["keep"] = torch.stack([_keep(m, lens), _keep(m, lens[::-1])], 1)
    cl = torch.tensor(lens)
    dims = dict(h=8, g=2, d=D, e=D)
    if not paged:
        got = measure(k, x, splits=3, cache_len=cl)
        p = decode_cost(k, NQ, m, splits=3, dtype="fp64", device="cpu", batch=(B,), cache_len=lens,
                        inputs={name: x[name]}, **dims)
    else:   # keys on axis 2: pages of each (batch, K/V head) laid out per batch index
        perm = torch.randperm(B * pages, generator=torch.Generator().manual_seed(3))
        table = perm.view(B, pages)
        pool = {}
        for n in ("K", "V") + (("keep",) if name == "keep" else ()):
            t = x[n].movedim(2, 1)   # [B, m, g, ...]
            src = t.reshape(B * pages, P, *t.shape[2:])
            dst = torch.empty_like(src)
            dst[perm] = src
            pool[n] = dst.flatten(0, 1).movedim(0, 1)   # [g, pool keys, ...]
        if name == "doc":   # one id per key: a pool [pool keys]
            src = x["doc"].reshape(B * pages, P)
            dst = torch.empty_like(src)
            dst[perm] = src
            pool["doc"] = dst.flatten()
        got = measure(k, dict(Q=x["Q"], **pool), block_table=table, page_size=P, cache_len=cl)
        p = decode_cost(k, NQ, m, dtype="fp64", device="cpu", batch=(B,), page_size=P, cache_len=lens,
                        inputs={name: pool[name]}, block_table=table, **dims)
    assert p.packed_heads == 4
    _same(got, p)
    blind = decode_cost(k, NQ, m, splits=None if paged else 3, dtype="fp64", device="cpu", batch=(B,),
                        page_size=P if paged else None, cache_len=lens, **dims)
    assert (blind.tiles_visited > p.tiles_visited) == (name == "keep")


def test_paged_varlen_cost_with_data_counted_exactly():
    """varlen_cost(page_size=, pages=, block_table=, inputs=): the pools' ids gathered per sequence."""
    k = moa.compile("examples/document_mask.moa")
    lq, lk, pages = [3, 1, 0, 20], [40, 1, 0, 96], 6
    cq, ck = torch.tensor([0] + lq).cumsum(0), torch.tensor([0] + lk).cumsum(0)
    pool_keys = len(lk) * pages * P
    perm = torch.randperm(len(lk) * pages, generator=torch.Generator().manual_seed(0))
    table = perm.view(len(lk), pages)
    doc = torch.full((pool_keys,), 7)   # stale pool rows: an id that would widen a partial tile's summary
    for s, n in enumerate(lk):
        for j in range(n):
            doc[int(table[s, j // P]) * P + j % P] = j // 9
    x = dict(Q=_rand(sum(lq), D), K=_rand(pool_keys, D, seed=1), V=_rand(pool_keys, D, seed=2), doc=doc)
    got = measure_varlen(k, x, cq, ck, block_table=table, page_size=P)
    p = varlen_cost(k, cq, ck, dtype="fp64", device="cpu", page_size=P, pages=pages, block_table=table,
                    inputs={"doc": doc}, d=D, e=D)
    _same(got, p)
    blind = varlen_cost(k, cq, ck, dtype="fp64", device="cpu", page_size=P, pages=pages, d=D, e=D)
    assert blind.tiles_visited > p.tiles_visited
    with pytest.raises(InputError, match="block_table"):
        varlen_cost(k, cq, ck, dtype="fp64", device="cpu", page_size=P, pages=pages, inputs={"doc": doc}, d=D, e=D)
