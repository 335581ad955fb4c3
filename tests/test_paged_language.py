"""Paged KV caches written in the language (moa/paging.py, runtime/paged.py): K[page[j // P], j % P] lowered to
the contiguous program plus its paging, run by the paged decode; float64 in the interpreter, shuffled pages equal
to the contiguous cache and the reference."""
import pytest
import torch

import moa
from moa.errors import InputError, UnsupportedError

F64 = torch.float64
D = 16
PAGED = """
dim n, m, d, e, np, P, L
in Q[n, d], Kc[np, P, d], Vc[np, P, e]
in page[L]: int
Kp[j:m, k] = Kc[page[j // P], j % P, k]
Vp[j:m, c] = Vc[page[j // P], j % P, c]
S[i, j] = where(j <= i + m - n, dot(Q[i], Kp[j]) / sqrt(d), -inf)
out O = softmax(S, axis=-1) @ Vp
"""
# the vLLM layout [pages, page size, kv heads, d], grouped query heads and ALiBi
PAGED_GQA = """
dim h, g, n, m, d, e, np, P, L
in Q[h, n, d], Kc[np, P, g, d], Vc[np, P, g, e]
in page[L]: int
K2[a:h, j:m, k] = Kc[page[j // P], j % P, a // (h // g), k]
V2[a:h, j:m, c] = Vc[page[j // P], j % P, a // (h // g), c]
S[a, i, j] = where(j <= i + m - n, dot(Q[a, i], K2[a, j]) / sqrt(d) + 2 ^ (-8 * (a + 1) / h) * (j - i - m + n), -inf)
out O[a] = softmax(S[a], axis=-1) @ V2[a]
"""


def _rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed + sum(shape)), dtype=F64)


def test_paged_program_equals_the_contiguous_cache():
    k = moa.compile(PAGED)
    pool, vpool = _rand(12, 16, D), _rand(12, 16, D, seed=1)
    table = torch.tensor([7, 0, 11, 3, 5])
    q = _rand(3, D)
    got = k(Q=q, Kc=pool, Vc=vpool, page=table)
    kk, vv = pool[table].flatten(0, 1), vpool[table].flatten(0, 1)
    torch.testing.assert_close(got, k.reference(Q=q, Kc=pool, Vc=vpool, page=table), rtol=1e-12, atol=1e-12)
    flat = moa.compile(PAGED.replace("Kc[page[j // P], j % P, k]", "Kf[j, k]").replace(
        "Vc[page[j // P], j % P, c]", "Vf[j, c]").replace("Kc[np, P, d], Vc[np, P, e]", "Kf[m, d], Vf[m, e]")
        .replace("in page[L]: int\n", "").replace(", np, P, L", ""))
    assert (got - flat(Q=q, Kf=kk, Vf=vv)).abs().max().item() <= 1e-12


def test_paged_gqa_vllm_layout_batched_table_and_valid_lengths():
    k = moa.compile(PAGED_GQA)
    pool, vpool = _rand(10, 16, 2, D), _rand(10, 16, 2, D, seed=1)
    table = torch.tensor([[9, 2, 4, 0], [1, 3, 5, 7]])
    lens = torch.tensor([64, 40])   # batch index 0: the whole pages (the reference), 1: a valid length
    q = _rand(2, 8, 1, D)
    got, st = k.decode(Q=q, Kc=pool, Vc=vpool, page=table, cache_len=lens, stats=True)
    assert st.packed_heads == 4 and st.splits == 4
    for b in range(2):
        n = int(lens[b])
        one = dict(Q=q[b], Kc=pool, Vc=vpool, page=table[b])
        want = k.reference(**one)   # the reference of the whole pages, then the valid length by a shorter table
        if n < 64:
            kk = pool[table[b]].flatten(0, 1)[:n].movedim(1, 0)
            vv = vpool[table[b]].flatten(0, 1)[:n].movedim(1, 0)
            s = (q[b] @ kk.repeat_interleave(4, 0).transpose(-1, -2)) / D ** 0.5
            a = torch.arange(8)[:, None, None]
            s = s + 2.0 ** (-8 * (a + 1) / 8) * (torch.arange(n)[None, None] - n + 1)
            want = torch.softmax(s, -1) @ vv.repeat_interleave(4, 0)
        torch.testing.assert_close(got[b], want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("aligned", [False, True])
def test_reference_of_a_batched_block_table(aligned):
    """k.reference gathers a table per batch index from a shared pool or from batch-aligned pools (it refused
    both), equal to the kernel and to a gather written here."""
    k = moa.compile(PAGED)
    lead = (2,) if aligned else ()
    pool, vpool = _rand(*lead, 6, 16, D), _rand(*lead, 6, 16, D, seed=1)
    table, q = torch.tensor([[0, 3], [5, 1]]), _rand(2, 3, D)
    ref = k.reference(Q=q, Kc=pool, Vc=vpool, page=table)
    torch.testing.assert_close(k(Q=q, Kc=pool, Vc=vpool, page=table), ref, rtol=1e-12, atol=1e-12)
    for b in range(2):
        kk, vv = ((x[b] if aligned else x)[table[b]].flatten(0, 1) for x in (pool, vpool))
        s = (q[b] @ kk.T / D ** 0.5).masked_fill(torch.arange(32)[None] > torch.arange(3)[:, None] + 29, -torch.inf)
        torch.testing.assert_close(ref[b], torch.softmax(s, -1) @ vv, rtol=1e-12, atol=1e-12)


def test_other_key_inputs_of_a_paged_program_are_paged_too():
    """A key-length input read directly (bias[j]) would be read at pool positions by the paged launch (wrong
    numbers): refused at compile time, naming the pooled form, which runs and equals a gather written here."""
    bias_src = PAGED.replace("in page[L]: int", "in bias[m]\nin page[L]: int").replace("/ sqrt(d)",
                                                                                      "/ sqrt(d) + bias[j]")
    with pytest.raises(UnsupportedError, match=r"input bias has an axis of the cache's logical length m.*biasc\["):
        moa.compile(bias_src)
    k = moa.compile(PAGED.replace("Vc[np, P, e]", "Vc[np, P, e], Bc[np, P]").replace(
        "Vp[j:m, c] =", "Bp[j:m] = Bc[page[j // P], j % P]\nVp[j:m, c] =").replace("/ sqrt(d)", "/ sqrt(d) + Bp[j]"))
    kc, vc, bc, q = _rand(4, 16, D), _rand(4, 16, D, seed=1), 3 * _rand(4, 16), _rand(3, D)
    page = torch.tensor([2, 0])
    got = k(Q=q, Kc=kc, Vc=vc, Bc=bc, page=page)
    kk, vv, bb = kc[page].flatten(0, 1), vc[page].flatten(0, 1), bc[page].flatten()
    s = (q @ kk.T / D ** 0.5 + bb).masked_fill(torch.arange(32)[None] > torch.arange(3)[:, None] + 29, -torch.inf)
    torch.testing.assert_close(got, torch.softmax(s, -1) @ vv, rtol=1e-12, atol=1e-12)


def test_paged_refusals():
    with pytest.raises(UnsupportedError, match="read outside the page indirection"):
        moa.compile(PAGED.replace("out O = softmax(S, axis=-1) @ Vp", "out O = softmax(S, axis=-1) @ Vp + Kc[0, 0, 0]"))
    k = moa.compile(PAGED)
    with pytest.raises(InputError, match="missing input page"):
        k(Q=_rand(1, D), Kc=_rand(4, 16, D), Vc=_rand(4, 16, D))
    with pytest.raises(InputError, match="different page sizes"):
        k(Q=_rand(1, D), Kc=_rand(4, 16, D), Vc=_rand(2, 32, D), page=torch.tensor([0, 1]))
