"""The cost of varlen calls (runtime/varlen_cost.py) equals what the instrumented interpreter executes for k.varlen
(runtime/decode_measure.measure_varlen): every (sequence, split) block, the grid's offset reads, the lse stores and
partials, the merge pass, and the visited key tiles; float64, CPU tiles."""
import pytest
import torch

import moa
from moa.errors import InputError
from moa.runtime.decode_measure import measure_varlen
from moa.runtime.varlen_cost import varlen_cost

D = 16
F64 = torch.float64


def _rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed + sum(shape)), dtype=F64)


def _check(k, x, lq, lk, splits, batch=(), data=None, **dims):
    cq, ck = torch.tensor([0] + lq).cumsum(0), torch.tensor([0] + lk).cumsum(0).to(torch.int32)
    got = measure_varlen(k, x, cq, ck, splits=splits)
    p = varlen_cost(k, cq, ck, splits=splits, dtype="fp64", device="cpu", batch=batch, inputs=data, d=D, e=D,
                    **dims)
    assert (got.flops, got.transcendentals, got.dram_bytes_loaded, got.dram_bytes_stored, got.tiles_visited) == \
        (p.flops, p.transcendentals, p.dram_bytes_loaded, p.dram_bytes_stored, p.tiles_visited)
    return p


@pytest.mark.parametrize("splits", [1, 3])
def test_varlen_counted_exactly(splits):
    """Causal, ragged sequences (one empty, one of one row), one launch and three key splits merged."""
    k = moa.compile("examples/causal.moa")
    lens = [1, 37, 200, 0, 5]
    n = sum(lens)
    p = _check(k, dict(Q=_rand(n, D), K=_rand(n, D, seed=1), V=_rand(n, D, seed=2)), lens, lens, splits)
    assert (p.merge_bytes > 0) == (p.splits > 1) == (splits > 1)
    assert p.kv_bytes == n * 2 * D * 8


def test_varlen_bottom_right_heads_and_one_dim_programs_counted_exactly():
    k = moa.compile("examples/causal_bottom_right.moa")
    lq, lk = [1, 3, 0, 16, 2], [1, 200, 0, 90, 130]
    x = dict(Q=_rand(2, sum(lq), D), K=_rand(2, sum(lk), D, seed=1), V=_rand(2, sum(lk), D, seed=2))
    _check(k, x, lq, lk, 3, batch=(2,))
    k = moa.compile("examples/sliding_window.moa", w=20)   # queries are each sequence's last rows
    lq, lk = [4, 1, 30], [50, 1, 30]
    _check(k, dict(Q=_rand(sum(lq), D), K=_rand(sum(lk), D, seed=1), V=_rand(sum(lk), D, seed=2)), lq, lk, 2)


def test_varlen_document_mask_counted_exactly_with_its_data():
    """Tiles skipped by per-sequence summaries of the document ids are counted on the packed ids (inputs=); a
    split past a row tile's keys runs no scan step (codegen/data_tiles.py)."""
    k = moa.compile("examples/document_mask.moa")
    lens = [1, 40, 130, 70]
    n = sum(lens)
    doc = torch.cat([torch.arange(x) // 9 for x in lens])
    x = dict(Q=_rand(n, D), K=_rand(n, D, seed=1), V=_rand(n, D, seed=2), doc=doc)
    p = _check(k, x, lens, lens, 2, data={"doc": doc})
    blind = varlen_cost(k, [0, 1, 41, 171, 241], [0, 1, 41, 171, 241], splits=2, dtype="fp64", device="cpu", d=D,
                        e=D)
    assert blind.tiles_visited > p.tiles_visited   # without the ids nothing is skipped by the data


def test_varlen_two_branches_and_normalize_counted_exactly():
    k = moa.compile("examples/pi_attention.moa", k=20, s=7)
    lens = [1, 40, 0, 130]
    n = sum(lens)
    _check(k, dict(Q=_rand(n, D), K=_rand(n, D, seed=1), V=_rand(n, D, seed=2), wg=_rand(D)), lens, lens, 2)
    from moa.runtime.check import random_inputs

    k = moa.compile("examples/power_gated.moa")
    xs = [random_inputs(k.program, {"n": x, "d": D, "e": D}, seed=x, batch=0, dtype=F64) for x in lens if x]
    _check(k, {name: torch.cat([x[name] for x in xs]) for name in xs[0]}, [1, 40, 130], [1, 40, 130], 2)


def test_varlen_cost_refusals():
    k = moa.compile("examples/sliding_window.moa")
    with pytest.raises(InputError, match="starting at 0"):
        varlen_cost(k, [1, 3], [0, 3], d=D, e=D)
    with pytest.raises(InputError, match="its last rows"):
        varlen_cost(k, [0, 4], [0, 3], d=D, e=D)
    with pytest.raises(InputError, match="missing e"):
        varlen_cost(k, [0, 3], [0, 3], d=D)
    dm = moa.compile("examples/document_mask.moa")
    with pytest.raises(InputError, match="not an input"):
        varlen_cost(dm, [0, 3], [0, 3], inputs={"ids": torch.zeros(3)}, d=D, e=D)


def test_paged_varlen_counted_exactly():
    """Keys in shuffled pages (one split per page; every program also reads its page number)."""
    k = moa.compile("examples/causal_bottom_right.moa")
    lq, lk, page, pages = [3, 1, 0, 20], [40, 1, 0, 96], 16, 6
    cq, ck = torch.tensor([0] + lq).cumsum(0), torch.tensor([0] + lk).cumsum(0)
    pool = len(lk) * pages * page
    x = dict(Q=_rand(sum(lq), D), K=_rand(pool, D, seed=1), V=_rand(pool, D, seed=2))
    table = torch.randperm(len(lk) * pages, generator=torch.Generator().manual_seed(0)).view(len(lk), pages)
    got = measure_varlen(k, x, cq, ck, block_table=table, page_size=page)
    p = varlen_cost(k, cq, ck, dtype="fp64", device="cpu", page_size=page, pages=pages, d=D, e=D)
    assert p.splits == pages
    assert (got.flops, got.transcendentals, got.dram_bytes_loaded, got.dram_bytes_stored, got.tiles_visited) == \
        (p.flops, p.transcendentals, p.dram_bytes_loaded, p.dram_bytes_stored, p.tiles_visited)


def test_mixed_lengths_split_the_long_sequence():
    # one long sequence among short ones: the model counted every (sequence, split) program at the longest length,
    # so no split looked worthwhile (1 split, ~4x its own decode prediction; found by a helper); now the longest
    # split bounds the time and all splits' tiles fill the waves
    from moa.runtime.decode_cost import decode_cost

    k = moa.compile("examples/causal_bottom_right.moa")
    cu_q, cu_k = [0, 1, 2, 3, 4], [0, 100, 30000, 30100, 31000]
    mixed = varlen_cost(k, cu_q, cu_k, dtype="bf16", device="h100", batch=(32,), d=128, e=128)
    alone = decode_cost(k, 1, 29900, dtype="bf16", device="h100", batch=(32,), d=128, e=128)
    assert mixed.splits > 8 and mixed.predicted_seconds < 1.3 * alone.predicted_seconds
    assert mixed.predicted_seconds < 0.5 * mixed.unsplit_seconds
