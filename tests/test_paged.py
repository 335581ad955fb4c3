"""KV caches with a valid length per batch index and paged caches (k.decode(cache_len=, block_table=, page_size=),
runtime/decode.py): float64 in the interpreter against the reference on the valid keys; shuffled pages equal the
contiguous cache; refusals."""
import pytest
import torch

import moa
from moa.errors import InputError

D = 16
F64 = torch.float64
B, NQ, P, PAGES = 3, 3, 16, 9
LENS = torch.tensor([5, 70, 144])


def _setup(name, params, heads=()):
    g = torch.Generator().manual_seed(7)
    k = moa.compile(f"examples/{name}.moa", **params)
    kc = torch.randn(B, *heads, PAGES * P, D, generator=g, dtype=F64)
    vc = torch.randn(B, *heads, PAGES * P, D, generator=g, dtype=F64)
    q = torch.randn(B, *heads, NQ, D, generator=g, dtype=F64)
    shared = name != "causal_bottom_right"
    want = []
    for b in range(B):
        n = int(LENS[b])
        kv = dict(K=kc[b, ..., :n, :], V=vc[b, ..., :n, :])
        if shared:   # the queries are the last rows of the valid keys
            qf = torch.randn(*heads, n, D, generator=g, dtype=F64)
            qf[..., n - NQ:, :] = q[b]
            want.append(k.reference(Q=qf, **kv)[..., n - NQ:, :])
        else:
            want.append(k.reference(Q=q[b], **kv))
    return k, q, kc, vc, torch.stack(want)


def _pool(cache, perm, heads):
    """The batch's pages shuffled into one pool: page p of batch index b goes to pool page perm[b * PAGES + p]."""
    src = cache.movedim(0, -3).reshape(*heads, B * PAGES, P, D)
    pool = torch.empty_like(src)
    pool[..., perm, :, :] = src
    return pool.flatten(-3, -2)


@pytest.mark.parametrize("name,params,heads", [("causal_bottom_right", {}, ()), ("sliding_window", {"w": 40}, ()),
                                               ("alibi", {}, (2,))])
def test_valid_length_and_shuffled_pages(name, params, heads):
    k, q, kc, vc, want = _setup(name, params, heads)
    pad = torch.arange(PAGES * P)[:, None] >= LENS.view(B, *([1] * len(heads)), 1, 1)
    kc_nan, vc_nan = kc.masked_fill(pad, float("nan")), vc.masked_fill(pad, float("nan"))
    got, st = k.decode(Q=q, K=kc_nan, V=vc_nan, cache_len=LENS, splits=3, stats=True)
    assert st.splits == 3   # splits past a batch index's valid length run no tile
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)   # keys past the valid length never count
    perm = torch.randperm(B * PAGES, generator=torch.Generator().manual_seed(3))
    paged, st = k.decode(Q=q, K=_pool(kc, perm, heads), V=_pool(vc, perm, heads), cache_len=LENS,
                         block_table=perm.view(B, PAGES), page_size=P, stats=True)
    assert st.splits == PAGES and st.split_len == P
    contiguous = k.decode(Q=q, K=kc, V=vc, cache_len=LENS)
    assert (paged - contiguous).abs().max().item() <= 1e-12
    torch.testing.assert_close(paged, want, rtol=1e-12, atol=1e-12)


def test_cache_refusals():
    k, q, kc, vc, _ = _setup("sliding_window", {"w": 40})
    with pytest.raises(InputError, match="cache_len must lie in 0 .. 144"):
        k.decode(Q=q, K=kc, V=vc, cache_len=torch.tensor([1, 2, 200]))
    with pytest.raises(InputError, match="below the 3 query rows"):
        k.decode(Q=q, K=kc, V=vc, cache_len=torch.tensor([2, 9, 9]))
    with pytest.raises(InputError, match="does not broadcast"):
        k.decode(Q=q, K=kc, V=vc, cache_len=torch.tensor([9, 9]))
    with pytest.raises(InputError, match="int32 or int64"):
        k.decode(Q=q, K=kc, V=vc, cache_len=torch.tensor([9.0, 9.0, 9.0]))
    table = torch.arange(B * PAGES).view(B, PAGES)
    with pytest.raises(InputError, match="power of two >= 16"):
        k.decode(Q=q, K=kc, V=vc, block_table=table, page_size=24)
    with pytest.raises(InputError, match="needs both"):
        k.decode(Q=q, K=kc, V=vc, block_table=table)
    with pytest.raises(InputError, match=r"pages 0 \.\. 8 of the pool"):
        k.decode(Q=q, K=kc, V=vc, block_table=table, page_size=P)


def test_normalize_output_with_valid_lengths():
    """power.moa (normalize(A) @ V, merged by sums): splits past a batch index's valid length contribute z = 0."""
    k = moa.compile("examples/power.moa")
    g = torch.Generator().manual_seed(9)
    q, kc, vc = (torch.randn(2, n, D, generator=g, dtype=F64) for n in (144, 144, 144))
    lens = torch.tensor([50, 144])
    got = k.decode(Q=q[:, -3:], K=kc, V=vc, cache_len=lens, splits=3)
    for b in range(2):
        n = int(lens[b])
        want = k.reference(Q=q[b, n - 3:n].new_zeros(n, D).index_copy(0, torch.arange(n - 3, n), q[b, -3:]),
                           K=kc[b, :n], V=vc[b, :n])[-3:]
        torch.testing.assert_close(got[b], want, rtol=1e-12, atol=1e-12)


def test_block_table_padding_past_the_valid_keys():
    """Entries past a batch index's (or a sequence's) keys are never read: padding them with -1, as serving
    stacks do, gives the same result (and the same predicted work with per-tile summaries); entries in use
    must still be pages of the pool."""
    from moa.runtime.decode_cost import decode_cost
    g = torch.Generator().manual_seed(0)
    pool, vpool = (torch.randn(160, 8, dtype=torch.float64, generator=g) for _ in range(2))
    doc = torch.sort(torch.randint(0, 4, (160,), generator=g)).values
    padded, lens = torch.tensor([[3, 7, -1, -1], [2, 5, 9, 0]]), torch.tensor([20, 64])
    q = torch.randn(2, 2, 8, dtype=torch.float64, generator=g)
    k = moa.compile("examples/document_mask.moa")
    for table in (padded, padded.clamp_min(0)):
        out = k.decode(Q=q, K=pool, V=vpool, doc=doc, block_table=table, page_size=16, cache_len=lens)
        c = decode_cost(k, 2, 64, dtype="float64", device="cpu", batch=(2,), page_size=16, cache_len=[20, 64],
                        inputs={"doc": doc}, block_table=table, d=8, e=8)
        if table is padded:
            want, cost = out, c
    assert (out - want).abs().max() == 0 and (c.flops, c.tiles_visited) == (cost.flops, cost.tiles_visited)
    causal = moa.compile("examples/causal_bottom_right.moa")
    rows = torch.randn(5, 8, dtype=torch.float64, generator=g)
    one, two = (causal.varlen([0, 2, 5], [0, 20, 64], Q=rows, K=pool, V=vpool, block_table=t, page_size=16)
                for t in (padded, padded.clamp_min(0)))
    assert (one - two).abs().max() == 0
    with pytest.raises(InputError, match="those holding keys below cache_len"):
        k.decode(Q=q, K=pool, V=vpool, doc=doc, block_table=torch.tensor([[3, -1, -1, -1], [2, 5, 9, 0]]),
                 page_size=16, cache_len=lens)


def test_lengths_and_tables_align_with_the_leading_batch_axis():
    # inputs [B, H, ...] to a program without a head axis: the call's batch axes are (B, H), and cache_len [B] /
    # block_table [B, pages] are per sequence (numpy broadcasting read them per head: wrong numbers when B == H)
    k, q, kc, vc, want = _setup("causal_bottom_right", {}, (B,))
    got = k.decode(Q=q, K=kc, V=vc, cache_len=LENS, splits=2)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert (k.decode(Q=q, K=kc, V=vc, cache_len=LENS.view(B, 1)) - got).abs().max().item() <= 1e-12
    perm = torch.randperm(B * PAGES, generator=torch.Generator().manual_seed(5))
    paged = k.decode(Q=q, K=_pool(kc, perm, (B,)), V=_pool(vc, perm, (B,)), cache_len=LENS,
                     block_table=perm.view(B, PAGES), page_size=P)
    torch.testing.assert_close(paged, want, rtol=1e-12, atol=1e-12)


def test_integer_arguments_of_numpy_and_the_messages_name_the_table():
    # page_size as a numpy / 0-d tensor integer is a page size; splits=True is no split count; a cache_len past the
    # block table's pages names the table (found by a helper)
    import numpy as np

    k, q, kc, vc, want = _setup("causal_bottom_right", {})
    perm = torch.randperm(B * PAGES, generator=torch.Generator().manual_seed(1))
    pool = {"K": _pool(kc, perm, ()), "V": _pool(vc, perm, ())}
    for ps in (np.int64(P), torch.tensor(P)):
        got = k.decode(Q=q, **pool, cache_len=LENS, block_table=perm.view(B, PAGES), page_size=ps)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    with pytest.raises(InputError, match="splits must be a positive integer, got True"):
        k.decode(Q=q, K=kc, V=vc, splits=True)
    with pytest.raises(InputError, match=r"the block table's 2 pages of 16 keys"):
        k.decode(Q=q, **pool, cache_len=LENS, block_table=perm.view(B, PAGES)[:, :2], page_size=P)
    x = torch.randn(10, D, dtype=F64)
    c = moa.compile("examples/causal.moa")
    out = c.varlen(np.array([0, 4, 10]), [np.int64(0), np.int64(4), np.int64(10)], Q=x, K=x, V=x)
    torch.testing.assert_close(out[4:], c(Q=x[4:], K=x[4:], V=x[4:]), rtol=1e-12, atol=1e-12)


def test_reads_are_checked_at_the_valid_lengths():
    # bias[min(i, j) // 4] of 8 entries is in range for every valid length (<= 32) but not for the whole cache of
    # 48: decode checked the cache's length and refused (found by a helper); decode_cost takes lengths per sequence
    from moa.runtime.decode_cost import decode_cost
    from moa.runtime.measure import instrument

    k = moa.compile("dim n, d, e\nin Q[n, d], K[n, d], V[n, e], bias[8]\n"
                    "S[i, j] = where(j <= i, dot(Q[i], K[j]), -inf) + bias[min(i, j) // 4]\n"
                    "out O = softmax(S, axis=-1) @ V")
    g = torch.Generator().manual_seed(2)
    kc, vc = (torch.randn(2, 2, 48, D, generator=g, dtype=F64) for _ in range(2))
    bias = torch.randn(8, generator=g, dtype=F64)
    lens = torch.tensor([12, 30])
    q = torch.stack([kc[b, :, L - 1:L] for b, L in enumerate(lens.tolist())])
    with instrument() as c:
        got = k.decode(Q=q, K=kc, V=vc, bias=bias, cache_len=lens, splits=2)
    for b, L in enumerate(lens.tolist()):
        want = k(Q=kc[b, :, :L], K=kc[b, :, :L], V=vc[b, :, :L], bias=bias)[:, -1:]
        torch.testing.assert_close(got[b], want, rtol=1e-12, atol=1e-12)
    with pytest.raises(InputError, match=r"reaches index 11"):
        k.decode(Q=q, K=kc, V=vc, bias=bias, cache_len=torch.tensor([12, 48]))
    p = decode_cost(k, 1, 48, splits=2, dtype="fp64", device="cpu", batch=(2, 2), cache_len=lens.tolist(), d=D, e=D)
    assert (c.flops, c.dram_bytes_loaded, c.dram_bytes_stored) == (p.flops, p.dram_bytes_loaded, p.dram_bytes_stored)
