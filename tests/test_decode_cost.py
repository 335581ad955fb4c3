"""The cost of decoding calls (runtime/decode_cost.py, moa/splitkv.py): splits counted as block programs at their
offsets, the merge pass, the split choice against the SM count."""
import pytest

import moa
from moa.errors import InputError
from moa.runtime.decode_cost import decode_cost
from moa.runtime.tiling import Config
from moa.splitkv import choose_splits, split_seconds

CFG = Config(16, 64)


def test_splits_visit_the_unsplit_tiles():
    """Tile-aligned splits visit exactly the unsplit launch's key tiles (tile skipping at global offsets); each
    split adds only its epilogue's FLOPs, and the merge pass its bytes."""
    k = moa.compile("examples/causal_bottom_right.moa")
    one = decode_cost(k, 3, 1000, splits=1, dtype="fp64", batch=(2,), config=CFG, d=16, e=16)
    plain = k.cost(dtype="fp64", batch=(2,), config=CFG, n=3, m=1000, d=16, e=16)
    assert one.flops - plain.flops == 2 * 16 * 2   # the lse a split stores: 2 flops on each lane of 2 programs
    four = decode_cost(k, 3, 1000, splits=4, dtype="fp64", batch=(2,), config=CFG, d=16, e=16)
    assert (one.splits, four.splits, four.split_len) == (1, 4, 256)
    assert four.tiles_visited == one.tiles_visited == 2 * 16
    assert 0 < four.flops - one.flops < 0.01 * one.flops
    assert one.merge_bytes == 0 and four.merge_bytes == 4 * 2 * 3 * 18 * 8 + 2 * 3 * (16 * 8 + 8)
    assert four.kv_bytes == 2 * 1000 * 32 * 8


def test_sliding_window_splits_only_the_window():
    """Row 4095 admits keys 3995 .. 4095 (tiles 62, 63): the splits cover those tiles, not the cache."""
    k = moa.compile("examples/sliding_window.moa", w=100)
    c = decode_cost(k, 1, 4096, splits=8, dtype="fp64", config=CFG, d=16, e=16)
    assert (c.splits, c.split_len) == (2, 64)
    assert [r.tiles_visited for r in c.split_reports] == [1, 1]
    assert c.kv_bytes == 128 * 32 * 8


def test_the_model_splits_few_programs_and_not_many():
    """One query row of 8 K/V heads against 32k keys splits (8 programs on 132 SMs); 32 x 64 programs do not."""
    few = choose_splits(8, 512, 64, 64, 128, 128, 32, "bfloat16", "h100")
    assert few.splits > 8 and few.seconds < few.unsplit_seconds / 4
    many = choose_splits(32 * 64, 512, 64, 64, 128, 128, 32 * 64 * 64, "bfloat16", "h100")
    assert many.splits == 1
    assert split_seconds(2, 8, 512, 64, 64, 128, 128, 32) < split_seconds(1, 8, 512, 64, 64, 128, 128, 32)


def test_gqa_decode_cost_packs_and_names_missing_dims():
    k = moa.compile("examples/gqa_alibi.moa")
    c = decode_cost(k, 1, 8192, dtype="bf16", h=32, g=8, d=128, e=128)
    assert c.packed_heads == 4 and c.splits > 1
    assert c.kv_bytes == 8 * 8192 * 256 * 2
    with pytest.raises(InputError, match="missing g"):
        decode_cost(k, 1, 8192, h=32, d=128, e=128)
