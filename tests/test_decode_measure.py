"""The decode cost model (runtime/decode_cost.py) equals what the instrumented interpreter executes
(runtime/measure.py) for k.decode: the split launch (every split's block program, its lse store, partials), the
merge pass and the paged grid's table reads; float64, CPU tiles."""
import pytest
import torch

import moa
from moa.runtime.decode_cost import decode_cost
from moa.runtime.measure import instrument

F64 = torch.float64
D = 16


def _rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed + sum(shape)), dtype=F64)


def _check(k, x, nq, m, splits, batch, page=None, table=None, **dims):
    with instrument() as c:
        _, st = k.decode(**x, splits=splits, stats=True, block_table=table, page_size=page)
    p = decode_cost(k, nq, m, splits=splits, dtype="fp64", device="cpu", batch=batch, page_size=page, **dims)
    assert p.splits == st.splits
    got = (c.flops, c.transcendentals, c.dram_bytes_loaded, c.dram_bytes_stored)
    assert got == (p.flops, p.transcendentals, p.dram_bytes_loaded, p.dram_bytes_stored)


@pytest.mark.parametrize("splits", [1, 5])
def test_split_and_merge_counted_exactly(splits):
    k = moa.compile("examples/causal_bottom_right.moa")
    x = dict(Q=_rand(2, 3, D), K=_rand(2, 300, D), V=_rand(2, 300, D, seed=1))
    _check(k, x, 3, 300, splits, (2,), d=D, e=D)


def test_gqa_packed_and_paged_counted_exactly():
    k = moa.compile("examples/gqa_alibi.moa")
    x = dict(Q=_rand(8, 3, D), K=_rand(2, 304, D), V=_rand(2, 304, D, seed=1))
    _check(k, x, 3, 304, 3, (), h=8, g=2, d=D, e=D)
    pool = dict(K=_rand(2, 608, D), V=_rand(2, 608, D, seed=1))   # 38 pages of 16; the call reads 19 of them
    table = torch.randperm(38, generator=torch.Generator().manual_seed(0))[:19]
    _check(k, dict(x, **pool), 3, 304, None, (), page=16, table=table, h=8, g=2, d=D, e=D)


def test_two_branch_program_counted_exactly():
    k = moa.compile("examples/pi_attention.moa", k=20, s=7)
    x = dict(Q=_rand(3, D), K=_rand(200, D), V=_rand(200, D, seed=1), wg=_rand(D))
    with instrument() as c:
        _, st = k.decode(**x, splits=2, stats=True)
    p = decode_cost(k, 3, 200, splits=2, dtype="fp64", device="cpu", d=D, e=D)
    assert (c.flops, c.transcendentals, c.dram_bytes_loaded, c.dram_bytes_stored) == \
        (p.flops, p.transcendentals, p.dram_bytes_loaded, p.dram_bytes_stored)


def test_decode_measure_counts_the_visited_tiles():
    """runtime/decode_measure.measure: the key tiles the split launch visits (first load of each key-tile loop),
    equal to the cost model's, with its other counters; a sliding window's splits visit only the window's tiles."""
    from moa.runtime.decode_measure import measure

    k = moa.compile("examples/sliding_window.moa", w=100)
    x = dict(Q=_rand(1, D), K=_rand(4096, D), V=_rand(4096, D, seed=1))
    got = measure(k, x, splits=8)
    p = decode_cost(k, 1, 4096, splits=8, dtype="fp64", device="cpu", d=D, e=D)
    assert got.tiles_visited == p.tiles_visited == 2
    assert (got.flops, got.dram_bytes_loaded, got.dram_bytes_stored) == \
        (p.flops, p.dram_bytes_loaded, p.dram_bytes_stored)
    pi = moa.compile("examples/pi_attention.moa", k=20, s=7)
    x = dict(Q=_rand(3, D), K=_rand(200, D), V=_rand(200, D, seed=1), wg=_rand(D))
    assert measure(pi, x, splits=2).tiles_visited == decode_cost(pi, 3, 200, splits=2, dtype="fp64", device="cpu",
                                                                 d=D, e=D).tiles_visited


@pytest.mark.parametrize("splits", [1, 3])
def test_valid_lengths_counted_exactly(splits):
    """Splits past a batch index's valid length run no tile and store nothing; every program reads its length."""
    from moa.runtime.decode_measure import measure

    k = moa.compile("examples/causal_bottom_right.moa")
    x = dict(Q=_rand(3, 3, D), K=_rand(3, 144, D), V=_rand(3, 144, D, seed=1))
    got = measure(k, x, splits=splits, cache_len=torch.tensor([5, 70, 144]))
    p = decode_cost(k, 3, 144, splits=splits, dtype="fp64", device="cpu", batch=(3,), cache_len=[5, 70, 144],
                    d=D, e=D)
    assert (got.flops, got.transcendentals, got.dram_bytes_loaded, got.dram_bytes_stored, got.tiles_visited) == \
        (p.flops, p.transcendentals, p.dram_bytes_loaded, p.dram_bytes_stored, p.tiles_visited)


def test_paged_partial_pages_counted_exactly():
    from moa.runtime.decode_measure import measure

    k = moa.compile("examples/gqa_alibi.moa")
    x = dict(Q=_rand(2, 8, 1, D), K=_rand(2, 320, D), V=_rand(2, 320, D, seed=1))
    table = torch.tensor([[3, 9, 1, 0], [19, 2, 4, 5]])
    got = measure(k, x, block_table=table, page_size=16, cache_len=torch.tensor([64, 20]))
    p = decode_cost(k, 1, 64, dtype="fp64", device="cpu", batch=(2,), page_size=16, cache_len=[64, 20], h=8, g=2,
                    d=D, e=D)
    assert (got.flops, got.transcendentals, got.dram_bytes_loaded, got.dram_bytes_stored, got.tiles_visited) == \
        (p.flops, p.transcendentals, p.dram_bytes_loaded, p.dram_bytes_stored, p.tiles_visited)
