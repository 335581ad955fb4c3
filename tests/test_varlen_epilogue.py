"""Varlen and decode calls of programs whose outputs have an epilogue (several softmax branches mixed by a
per-row gate) and inputs read by both the row and the key index (a document id doc[i] == doc[j]; a per-position
value G read as a key bias G[j] in the scores and as the gate G[i] in the epilogue). The per-sequence epilogue of
runtime/varlen.py must take such an input's query side at the sequence's query offsets (cu_seqlens_q) and its
travelling key copy at the key offsets (cu_seqlens_k): it read the key copy's name as an unknown role (KeyError)
and the query side at the key offsets before. Float64 in the interpreter, against separate per-sequence calls
(1e-12), with cu_seqlens_q equal to and different from cu_seqlens_k, key splits, pages; through both epilogue
paths of a varlen call: fused into the merge over the packed rows (runtime/decode_merge.py), and per sequence
with torch ops for a gate without a fused form (`sign`)."""
import pytest
import torch

import moa
from moa.runtime import decode_merge, ring

D = 16
F64 = torch.float64
P, PAGES = 16, 10

# one dim n for both axes: queries are each sequence's last rows; G and doc are read by i and by j
GATED_DOC = """dim n, d, e
param k = 24
in Q[n, d], K[n, d], V[n, e], G[n], wg[d]
in doc[n]: int
S[i, j] = dot(Q[i], K[j]) / sqrt(d) + G[j]
L[i, j] = where(doc[i] == doc[j] and j <= i and i - j < k, S[i, j], -inf)
A[i, j] = where(doc[i] == doc[j] and j <= i, S[i, j], -inf)
g[i] = sigmoid(dot(Q[i], wg) + G[i])
out O[i] = g[i] * (softmax(L[i], axis=-1) @ V) + (1 - g[i]) * (softmax(A[i], axis=-1) @ V)
"""

# two dims (m != n): a per-row gate input gq read by i only, a key bias kb read by j only
GATED_TWO_DIM = """dim n, m, d, e
in Q[n, d], K[m, d], V[m, e], gq[n], kb[m]
S[i, j] = dot(Q[i], K[j]) / sqrt(d) + kb[j]
L[i, j] = where(j <= i + m - n and i + m - n - j < 10, S[i, j], -inf)
A[i, j] = where(j <= i + m - n, S[i, j], -inf)
out O[i] = sigmoid(gq[i]) * (softmax(L[i], axis=-1) @ V) + (1 - sigmoid(gq[i])) * (softmax(A[i], axis=-1) @ V)
"""


def _compile(two_dim: bool, path: str = "fused"):
    """The program; path "torch": its gate through `sign`, which has no fused form, so a varlen call evaluates the
    epilogue per sequence with torch ops (runtime/varlen._finish_per_sequence) instead of in the fused merge."""
    src = GATED_TWO_DIM if two_dim else GATED_DOC
    if path == "torch":
        src = src.replace("sigmoid(gq[i])", "sigmoid(sign(gq[i]))").replace("sigmoid(dot(Q[i], wg)",
                                                                             "sigmoid(sign(dot(Q[i], wg))")
    k = moa.compile(src)
    plan, block = ring.block_kernel(k)
    assert (decode_merge.why_not(block, plan) is None) == (path == "fused")
    return k


def _inputs(lq, lk, two_dim: bool, seed=0):
    g = torch.Generator().manual_seed(seed + sum(lq) + 3 * sum(lk))
    nq, nk = sum(lq), sum(lk)
    x = dict(Q=torch.randn(nq, D, generator=g, dtype=F64), K=torch.randn(nk, D, generator=g, dtype=F64),
             V=torch.randn(nk, D, generator=g, dtype=F64))
    if two_dim:
        x.update(gq=torch.randn(nq, generator=g, dtype=F64), kb=torch.randn(nk, generator=g, dtype=F64))
    else:   # G along the keys (its query side: each sequence's last rows); documents of 9 tokens per sequence
        x.update(G=torch.randn(nk, generator=g, dtype=F64), wg=torch.randn(D, generator=g, dtype=F64),
                 doc=torch.cat([torch.arange(n) // 9 for n in lk]).to(torch.int64))
    return x, torch.tensor([0] + lq).cumsum(0), torch.tensor([0] + lk).cumsum(0).to(torch.int32)


def _separate(k, x, cq, ck, two_dim: bool):
    """Each sequence as a plain call of its own (one-dim: the full sequence, its queries the last rows)."""
    outs = []
    g = torch.Generator().manual_seed(99)
    for s in range(cq.numel() - 1):
        q0, q1, k0, k1 = int(cq[s]), int(cq[s + 1]), int(ck[s]), int(ck[s + 1])
        if q1 == q0:
            continue
        if two_dim:
            outs.append(k(Q=x["Q"][q0:q1], K=x["K"][k0:k1], V=x["V"][k0:k1], gq=x["gq"][q0:q1], kb=x["kb"][k0:k1]))
            continue
        full_q = torch.randn(k1 - k0, D, generator=g, dtype=F64)   # rows before the queries: not in the output
        full_q[k1 - k0 - (q1 - q0):] = x["Q"][q0:q1]
        o = k(Q=full_q, K=x["K"][k0:k1], V=x["V"][k0:k1], G=x["G"][k0:k1], doc=x["doc"][k0:k1], wg=x["wg"])
        outs.append(o[k1 - k0 - (q1 - q0):])
    return torch.cat(outs)


CASES = [([5, 150, 17, 1], [5, 150, 17, 1]),         # cu_seqlens_q == cu_seqlens_k
         ([2, 1, 0, 17], [150, 9, 0, 30])]            # fewer queries than keys (decoding, an empty sequence)


@pytest.mark.parametrize("path", ["fused", "torch"])
@pytest.mark.parametrize("two_dim", [False, True])
@pytest.mark.parametrize("lq,lk", CASES)
@pytest.mark.parametrize("splits", [1, 3])
def test_varlen_epilogue_equals_separate_calls(path, two_dim, lq, lk, splits):
    k = _compile(two_dim, path)
    x, cq, ck = _inputs(lq, lk, two_dim)
    got, st = k.varlen(cq, ck, splits=splits, stats=True, **x)
    assert st.splits == splits
    assert (got - _separate(k, x, cq, ck, two_dim)).abs().max().item() <= 1e-12


def _paged(t, lk, perm):
    """Sequence s's page p of the packed keys (axis 0) at pool page perm[s * PAGES + p]; unused rows never read
    (NaN, or -1 for ids)."""
    pool = torch.full((len(lk) * PAGES * P, *t.shape[1:]), float("nan") if t.is_floating_point() else -1,
                      dtype=t.dtype)
    start = 0
    for s, n in enumerate(lk):
        for j in range(n):
            pool[int(perm[s * PAGES + j // P]) * P + j % P] = t[start + j]
        start += n
    return pool


@pytest.mark.parametrize("path", ["fused", "torch"])
@pytest.mark.parametrize("two_dim", [False, True])
@pytest.mark.parametrize("lq,lk", CASES)
def test_paged_varlen_epilogue_equals_separate_calls(path, two_dim, lq, lk):
    """Keys (and the key side of G, doc) in shuffled pages: the query side of G is gathered through the table."""
    k = _compile(two_dim, path)
    x, cq, ck = _inputs(lq, lk, two_dim)
    perm = torch.randperm(len(lk) * PAGES, generator=torch.Generator().manual_seed(1))
    keyed = ("K", "V", "kb") if two_dim else ("K", "V", "G", "doc")
    pools = {n: _paged(t, lk, perm) if n in keyed else t for n, t in x.items()}
    got = k.varlen(cq, ck, **pools, block_table=perm.view(len(lk), PAGES), page_size=P)
    assert (got - _separate(k, x, cq, ck, two_dim)).abs().max().item() <= 1e-12


def test_decode_epilogue_with_inputs_read_by_both_indices():
    """The same one-dim program decoded (whole cache, valid lengths, pages): the gate reads G's query side."""
    k = moa.compile(GATED_DOC)
    g = torch.Generator().manual_seed(0)
    m, nq = 80, 3
    x = dict(Q=torch.randn(2, m, D, generator=g, dtype=F64), K=torch.randn(2, m, D, generator=g, dtype=F64),
             V=torch.randn(2, m, D, generator=g, dtype=F64), G=torch.randn(2, m, generator=g, dtype=F64),
             wg=torch.randn(D, generator=g, dtype=F64), doc=(torch.arange(m) // 30).expand(2, m))
    full = k(**x)
    got = k.decode(**dict(x, Q=x["Q"][:, -nq:]), splits=3)
    assert (got - full[:, -nq:]).abs().max().item() <= 1e-12
    lens = torch.tensor([50, 80])
    q = torch.stack([x["Q"][0, 47:50], x["Q"][1, 77:80]])
    want = torch.stack([k(**{n: t if n == "wg" else t[0, :50] for n, t in x.items()})[-3:], full[1, -3:]])
    assert (k.decode(**dict(x, Q=q), splits=3, cache_len=lens) - want).abs().max().item() <= 1e-12
    table = torch.randperm(2 * (m // P), generator=g).view(2, m // P)
    pools = {}
    for n in ("K", "V", "G", "doc"):
        t = x[n]
        pool = torch.empty((2 * m, *t.shape[2:]), dtype=t.dtype)
        for b in range(2):
            for p in range(m // P):
                pool[int(table[b, p]) * P:(int(table[b, p]) + 1) * P] = t[b, p * P:(p + 1) * P]
        pools[n] = pool
    got = k.decode(Q=q, wg=x["wg"], **pools, block_table=table, page_size=P, cache_len=lens)
    assert (got - want).abs().max().item() <= 1e-12


@pytest.mark.parametrize("splits", [1, 3])
def test_varlen_fused_merge_counted_exactly(splits):
    """varlen_cost counts the fused merge over the packed rows (at one split too) as the instrumented interpreter
    executes it: PiAttention with heads as a batch axis, and the gated document program with its ids (inputs=),
    fewer queries than keys; the visited tiles of the branches' one launch too."""
    from moa.runtime.decode_measure import measure_varlen
    from moa.runtime.varlen_cost import varlen_cost

    def same(k, x, lq, lk, batch=(), data=None):
        cq, ck = torch.tensor([0] + lq).cumsum(0), torch.tensor([0] + lk).cumsum(0)
        got = measure_varlen(k, x, cq, ck, splits=splits)
        p = varlen_cost(k, cq, ck, splits=splits, dtype="fp64", device="cpu", batch=batch, inputs=data, d=D, e=D)
        assert (got.flops, got.transcendentals, got.dram_bytes_loaded, got.dram_bytes_stored, got.tiles_visited) \
            == (p.flops, p.transcendentals, p.dram_bytes_loaded, p.dram_bytes_stored, p.tiles_visited)

    pi = moa.compile("examples/pi_attention.moa", k=20, s=7)
    lens = [1, 40, 0, 130]
    g = torch.Generator().manual_seed(7)
    x = {n: torch.randn(2, sum(lens), D, generator=g, dtype=F64) for n in ("Q", "K", "V")}
    same(pi, dict(x, wg=torch.randn(D, generator=g, dtype=F64)), lens, lens, batch=(2,))
    k = _compile(False)
    lq, lk = [2, 1, 0, 17], [150, 9, 0, 30]
    x, _, _ = _inputs(lq, lk, False)
    same(k, x, lq, lk, data={"doc": x["doc"]})
