"""GQA packing in decoding (moa/gqa.py, k.decode(pack_heads=)): the query heads of one K/V head share a tile, one
program per K/V head and key split; float64 in the interpreter against the reference."""
import pytest
import torch

import moa
from moa import gqa
from moa.errors import UnsupportedError
from moa.runtime import ring

D = 16
F64 = torch.float64


@pytest.mark.parametrize("nq,m", [(1, 1), (3, 150), (16, 300)])
def test_gqa_alibi_packed_matches_reference(nq, m):
    k = moa.compile("examples/gqa_alibi.moa")
    g = torch.Generator().manual_seed(nq + m)
    full = dict(Q=torch.randn(8, m, D, generator=g, dtype=F64), K=torch.randn(2, m, D, generator=g, dtype=F64),
                V=torch.randn(2, m, D, generator=g, dtype=F64))
    want = k.reference(**full)[..., m - nq:, :]
    ins = dict(full, Q=full["Q"][..., m - nq:, :])
    got, st = k.decode(**ins, splits=2, pack_heads=True, stats=True)
    assert st.packed_heads == 4 and st.grid[1] == 2   # one program per K/V head (and split), not per query head
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    plain, st = k.decode(**ins, splits=2, pack_heads=False, stats=True)
    assert st.packed_heads == 1 and st.grid[1] == 8
    assert (got - plain).abs().max().item() <= 1e-12


def test_mqa_packs_all_heads_with_a_valid_length():
    k = moa.compile("examples/mqa.moa")
    g = torch.Generator().manual_seed(1)
    ins = dict(Q=torch.randn(2, 4, 3, D, generator=g, dtype=F64), K=torch.randn(2, 200, D, generator=g, dtype=F64),
               V=torch.randn(2, 200, D, generator=g, dtype=F64))
    lens = torch.tensor([7, 130])
    got, st = k.decode(**ins, cache_len=lens, splits=3, stats=True)
    assert st.packed_heads == 4 and st.grid[1] == 2   # pack_heads=None: packed (12 rows)
    for b in range(2):
        n = int(lens[b])
        want = k.reference(Q=ins["Q"][b], K=ins["K"][b, :n], V=ins["V"][b, :n])
        torch.testing.assert_close(got[b], want, rtol=1e-12, atol=1e-12)


def test_pack_derivation():
    """q = h // g from K[a // (h // g), j]; no packing for per-head keys (alibi: K[a, j])."""
    plan, _ = ring.block_kernel(moa.compile("examples/gqa_alibi.moa"))
    p = gqa.pack(plan)
    assert str(p.group) == "floor(h/g)" and str(p.kv_heads) == "g"
    assert gqa.pack(ring.block_kernel(moa.compile("examples/alibi.moa"))[0]) is None
    k = moa.compile("examples/alibi.moa")
    x = torch.randn(2, 4, D, dtype=F64)
    with pytest.raises(UnsupportedError, match="pack_heads=True"):
        k.decode(Q=x[:, :1], K=x, V=x, pack_heads=True)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
def test_packed_split_decode_in_lower_precision(dtype, tol):
    """Partials in fp32 (the accumulation dtype), merged, cast back to the call's dtype."""
    k = moa.compile("examples/gqa_alibi.moa")
    g = torch.Generator().manual_seed(11)
    full = dict(Q=torch.randn(8, 300, 32, generator=g), K=torch.randn(2, 300, 32, generator=g),
                V=torch.randn(2, 300, 32, generator=g))
    want = k.reference(**{n: t.double() for n, t in full.items()})[..., -2:, :]
    ins = {n: t.to(dtype) for n, t in full.items()}
    got = k.decode(**dict(ins, Q=ins["Q"][..., -2:, :]), splits=3)
    assert got.dtype == dtype and (got.double() - want).abs().max().item() < tol


def test_heads_that_do_not_divide_are_refused_like_the_plain_call():
    # h = 3 query heads over g = 2 K/V heads: a // (h // g) reads K/V head 2, which does not exist; the plain call
    # refuses it, decode returned zeros for that head (unpacked) or raised a raw RuntimeError (packed)
    k = moa.compile("examples/gqa_alibi.moa")
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 3, 1, 8, generator=g, dtype=torch.float64)
    kv = {a: torch.randn(2, 2, 64, 8, generator=g, dtype=torch.float64) for a in "KV"}
    for pack in (None, False, True):
        with pytest.raises(moa.InputError, match=r"reaches index 2 on axis 0"):
            k.decode(Q=q, **kv, pack_heads=pack)
    with pytest.raises(moa.InputError, match=r"reaches index 2 on axis 0"):
        k.varlen(torch.tensor([0, 1]), torch.tensor([0, 64]), Q=q[0], K=kv["K"][0], V=kv["V"][0])
