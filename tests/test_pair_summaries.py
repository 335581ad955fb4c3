"""Masks that read a table at a function of the row and a function of the key (a block mask blk[i // B, j // B] as a
FlexAttention BlockMask holds, a dense mask M[i, j]) skip (query tile, key tile) pairs by per-pair (min, max)
summaries of that table: the pre-pass gathers the table at every row's and key's index and reduces it per tile
pair (moa/data_summaries.py axis "pair"). Exact in float64, forward and backward; the cost model given the table counts
what the instrumented interpreter counts; decoding stays exact."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import moa
from moa.runtime import backward_run
from moa.runtime.costing import cost
from moa.runtime.measuring import measure
from moa.runtime.summaries import pair_tile_summaries
from moa.runtime.tiling import Config

try:
    import data_cases as DC
except ImportError:  # pragma: no cover
    from tests import data_cases as DC
from moa.tiles import pair_summary

COUNTERS = ("flops", "transcendentals", "dram_bytes", "dram_bytes_loaded", "dram_bytes_stored", "tiles_visited")
HEAD = "dim n, m, d, e\nin Q[n, d], K[m, d], V[m, e]\n"
PROGRAMS = {
    "block": HEAD + "param B = 64\nin blk[(n + B - 1) // B, (m + B - 1) // B]: bool\n"
                    "S[i, j] = where(blk[i // B, j // B], dot(Q[i], K[j]) / sqrt(d), -inf)\n"
                    "out O = softmax(S, axis=-1) @ V\n",
    "block_causal": HEAD + "param B = 32\nin blk[(n + B - 1) // B, (m + B - 1) // B]: bool\n"
                           "S[i, j] = where(blk[i // B, j // B] and j <= i, dot(Q[i], K[j]) / sqrt(d), -inf)\n"
                           "out O = softmax(S, axis=-1) @ V\n",
    "dense": HEAD + "in M[n, m]: bool\nS[i, j] = where(M[i, j], dot(Q[i], K[j]) / sqrt(d), -inf)\n"
                    "out O = softmax(S, axis=-1) @ V\n",
    "transposed_levels": HEAD + "in lvl[m, n]: int\n"
                                "S[i, j] = where(lvl[j, i] >= 2 or i == j, dot(Q[i], K[j]) / sqrt(d), -inf)\n"
                                "out O = softmax(S, axis=-1) @ V\n",
}


def _mask(name: str, x: dict, n: int, m: int) -> np.ndarray:
    i, j = np.arange(n)[:, None], np.arange(m)[None, :]
    if name == "block":
        return x["blk"].numpy()[i // 64, j // 64]
    if name == "block_causal":
        return x["blk"].numpy()[i // 32, j // 32] & (j <= i)
    if name == "dense":
        return x["M"].numpy()
    return (x["lvl"].numpy()[j, i] >= 2) | (i == j)


def _inputs(name: str, n: int, m: int, d: int = 8, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    x = {"Q": torch.randn(n, d, generator=g, dtype=torch.float64),
         "K": torch.randn(m, d, generator=g, dtype=torch.float64),
         "V": torch.randn(m, d, generator=g, dtype=torch.float64)}
    if name.startswith("block"):
        B = 64 if name == "block" else 32
        x["blk"] = torch.rand(-(-n // B), -(-m // B), generator=g) < 0.35
    elif name == "dense":   # a banded pattern: whole tile pairs empty, some full, some partial
        i, j = torch.arange(n)[:, None], torch.arange(m)[None, :]
        x["M"] = ((i - j).abs() < 40) & (torch.rand(n, m, generator=g) < 0.9)
    else:
        x["lvl"] = torch.randint(0, 3, (m // 48 + 1, n // 48 + 1), generator=g).repeat_interleave(48, 0)[:m] \
            .repeat_interleave(48, 1)[:, :n]
    return x


def _counters(r) -> dict:
    return {f: getattr(r, f) for f in COUNTERS}


@pytest.mark.parametrize("name", sorted(PROGRAMS))
def test_tables_skip_tile_pairs_exactly(name):
    n, m = 200, 230
    k = moa.compile(PROGRAMS[name])
    x = _inputs(name, n, m)
    assert (k(**x) - k.reference(**x)).abs().max().item() < 1e-12
    got = measure(k, **x)
    data = {a: t for a, t in x.items() if not t.is_floating_point()}
    c = cost(k, dtype="float64", device="cpu", inputs=data, n=n, m=m, d=8, e=8)
    blind = cost(k, dtype="float64", device="cpu", n=n, m=m, d=8, e=8)
    assert _counters(got) == _counters(c)
    cfg = k.plan(**x)["O"].config
    need = DC.needed(_mask(name, x, n, m), cfg.block_m, cfg.block_n)
    assert c.tiles_needed == need <= got.tiles_visited < blind.tiles_visited
    if name != "block_causal":   # a causal block mask keeps a diagonal tile pair whose set blocks lie above it
        assert got.tiles_visited == need


def test_pair_summaries_are_min_and_max_per_tile_pair():
    g = torch.Generator().manual_seed(1)
    t = torch.randint(-50, 50, (2, 7, 9), generator=g)   # batch 2, the table [7, 9]
    rows, keys = torch.arange(45) // 7, (torch.arange(50) * 3) // 17
    st = pair_tile_summaries(t, 1, 2, rows, keys, 16, 8, extra=2)
    assert st.shape == (2, 3, 7 + 2, 2)
    full = t[:, rows][:, :, keys]
    for r in range(3):
        for c in range(7):
            cell = full[:, 16 * r: 16 * r + 16, 8 * c: 8 * c + 8]
            assert st[:, r, c, 0].tolist() == cell.amin((1, 2)).tolist()
            assert st[:, r, c, 1].tolist() == cell.amax((1, 2)).tolist()
    lo, hi = pair_summary(t[1].numpy(), rows.numpy(), keys.numpy(), 16, 8)   # the cost model's own
    assert lo.tolist() == st[1, :, :7, 0].tolist() and hi.tolist() == st[1, :, :7, 1].tolist()
    swapped = pair_tile_summaries(t.transpose(1, 2), 2, 1, rows, keys, 16, 8)   # key position before the row's
    assert swapped.transpose(1, 2).tolist() == st[:, :, :7].tolist()


def test_per_head_block_masks_and_the_backward(monkeypatch):
    monkeypatch.setattr(backward_run, "INTERPRETER_BLOCKS", (16, 16))
    src = ("dim h, n, d, e\nparam B = 16\nin Q[h, n, d], K[h, n, d], V[h, n, e]\n"
           "in blk[h, (n + B - 1) // B, (n + B - 1) // B]: bool\n"
           "S[a, i, j] = where(blk[a, i // B, j // B] and j <= i, dot(Q[a, i], K[a, j]) / sqrt(d), -inf)\n"
           "out O[a] = softmax(S[a], axis=-1) @ V[a]\n")
    k = moa.compile(src)
    g = torch.Generator().manual_seed(2)
    h, n, d = 3, 50, 4
    blk = torch.rand(2, h, 4, 4, generator=g) < 0.5
    blk |= torch.eye(4, dtype=torch.bool)   # every row sees its own block
    x = {a: torch.randn(2, h, n, d, generator=g, dtype=torch.float64) for a in ("Q", "K", "V")}
    want = {a: t.clone().requires_grad_() for a, t in x.items()}
    got = {a: t.clone().requires_grad_() for a, t in x.items()}
    cot = torch.randn(2, h, n, d, generator=g, dtype=torch.float64)
    (k.reference(**want, blk=blk) * cot).sum().backward()
    (k(**got, blk=blk) * cot).sum().backward()
    for a in x:
        assert (got[a].grad - want[a].grad).abs().max().item() < 1e-12, a
    dims = {"h": h, "n": n, "d": d, "e": d}
    pred = k.backward.cost(dims, (2,), "float64", inputs={"blk": blk}, config=Config(16, 16))
    DC.check_backward_prediction(k, {**x, "blk": blk}, cot, pred, monkeypatch)
    every = k.backward.cost(dims, (2,), "float64", inputs={"blk": torch.ones_like(blk)}, config=Config(16, 16))
    assert pred.flops < every.flops


@pytest.mark.parametrize("splits", [1, 3])
def test_decoding_with_a_block_mask(splits):
    from moa.runtime.decode_cost import decode_cost
    from moa.runtime.decode_measure import measure as decode_measure

    k = moa.compile(PROGRAMS["block"])
    x = _inputs("block", 2, 300, d=16, seed=4)
    assert (k.decode(**x, splits=splits) - k.reference(**x)).abs().max().item() < 1e-12
    got = decode_measure(k, x, splits=splits)
    p = decode_cost(k, 2, 300, splits=splits, dtype="fp64", device="cpu", d=16, e=16, inputs={"blk": x["blk"]})
    assert (got.flops, got.dram_bytes_loaded, got.tiles_visited) == (p.flops, p.dram_bytes_loaded, p.tiles_visited)


def test_standalone_launchers_summarise_tables(tmp_path, capsys):
    """`moa compile --launcher` modules compute the pair summaries themselves (no moa import), batch axes too."""
    names = ("block", "transposed_levels")
    outs, refs = DC.launched_tables(tmp_path, {a: PROGRAMS[a] for a in names}, _inputs, 150, 170)
    capsys.readouterr()
    for name in names:
        assert (outs[name] - refs[name]).abs().max().item() < 1e-12, name
    assert "_pair_summaries(" in (tmp_path / "block.py").read_text()


def test_the_block_mask_of_the_variants_page_is_this_one():
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "docs" / "variants.md").read_text()
    assert f"```\n{PROGRAMS['block_causal']}```" in text


def test_found_by_fuzzers(tmp_path, capsys):
    """A table read per key-value group (a dim in its leading index) is summarised; cost(inputs=) refuses an
    unguarded read outside the table as the call does, reads a guarded one without an IndexError, and without
    inputs never skips a tile for a threshold beyond any summary; a launcher summarises flags given as integers."""
    from moa.errors import InputError

    gqa = ("dim h, g, n, d, e\nin Q[h, n, d], K[g, n, d], V[g, n, e]\nin blk[g, (n + 15) // 16, (n + 15) // 16]: bool\n"
           "S[a, i, j] = where(blk[a // (h // g), i // 16, j // 16], dot(Q[a, i], K[a // (h // g), j]), -inf)\n"
           "out O[a] = softmax(S[a], axis=-1) @ V[a // (h // g)]\n")
    k = moa.compile(gqa)
    assert [s.axis for s in k.planner.schedules["O"].branches[0].summaries] == ["pair"]
    g = torch.Generator().manual_seed(7)
    x = {"Q": torch.randn(4, 70, 8, generator=g, dtype=torch.float64),
         "K": torch.randn(2, 70, 8, generator=g, dtype=torch.float64),
         "V": torch.randn(2, 70, 8, generator=g, dtype=torch.float64), "blk": torch.rand(2, 5, 5, generator=g) < 0.5}
    assert (k(**x) - k.reference(**x)).abs().max().item() < 1e-12
    c = cost(k, dtype="float64", device="cpu", inputs={"blk": x["blk"]}, h=4, g=2, n=70, d=8, e=8)
    assert _counters(measure(k, **x)) == _counters(c)

    short = HEAD + "in blk[2, 6]: bool\nS[i, j] = where({}, dot(Q[i], K[j]), -inf)\nout O = softmax(S, axis=-1) @ V\n"
    dims = {"n": 100, "m": 90, "d": 8, "e": 8}
    blk = torch.rand(2, 6, generator=g) < 0.5
    with pytest.raises(InputError, match="index out of range"):
        cost(moa.compile(short.format("blk[i // 16, j // 16]")), dtype="float64", device="cpu", inputs={"blk": blk},
             **dims)
    guarded = moa.compile(short.format("where(i < 32, blk[i // 16, j // 16], j <= i)"))
    y = _inputs("block", 100, 90)
    y["blk"] = blk
    assert _counters(measure(guarded, **y)) == _counters(cost(guarded, dtype="float64", device="cpu",
                                                              inputs={"blk": blk}, **dims))

    lvl = moa.compile(HEAD + "in lvl[(n + 15) // 16, (m + 15) // 16]: int\n"
                      "S[i, j] = where(lvl[i // 16, j // 16] < 1099511627777, dot(Q[i], K[j]), -inf)\n"
                      "out O = softmax(S, axis=-1) @ V\n")
    assert cost(lvl, dtype="float64", device="cpu", **dims).tiles_visited == 4   # 2^40 + 1: every tile may run

    from moa.cli import main
    src, path = tmp_path / "flags.moa", tmp_path / "flags.py"
    src.write_text(PROGRAMS["block"].replace("blk[i // B, j // B]", "not blk[i // B, j // B]"))
    assert main(["compile", str(src), "--launcher", "--dtype", "float64", "-o", str(path)]) == 0
    capsys.readouterr()
    assert "(blk != 0)" in path.read_text()
    src.write_text(PROGRAMS["block"].replace("blk[i // B, j // B]", "blk[abs(i - 100) // B, j // B]"))
    assert main(["compile", str(src), "--launcher", "--dtype", "float64", "-o", str(path)]) == 2   # no Abs written
    assert "no standalone form" in capsys.readouterr().err


def test_decode_cost_of_a_block_mask_with_valid_lengths_and_pages():
    """A table read at logical key positions (not a pool) beside a cache with valid lengths, contiguous or paged:
    decode_cost(inputs=) reads its part at each valid length as the launch does (it refused the table's shape)."""
    from moa.runtime.decode_cost import decode_cost
    from moa.runtime.decode_measure import measure as decode_measure

    k = moa.compile(PROGRAMS["block"].replace("param B = 64", "param B = 32"))
    g = torch.Generator().manual_seed(8)
    x = {"Q": torch.randn(2, 1, 8, generator=g, dtype=torch.float64),
         "K": torch.randn(2, 128, 8, generator=g, dtype=torch.float64),
         "V": torch.randn(2, 128, 8, generator=g, dtype=torch.float64),
         "blk": torch.tensor([[[True, False, True, True]], [[False, True, True, False]]])}
    lens = torch.tensor([100, 40])
    for page, table in ((None, None), (16, torch.stack([torch.randperm(8, generator=g) for _ in range(2)]))):
        out = k.decode(**x, cache_len=lens, splits=2, block_table=table, page_size=page)
        for b in range(2):   # the reference of each batch index's valid keys (the pool gathered through the table)
            keys = torch.arange(int(lens[b])) if table is None else \
                table[b][torch.arange(int(lens[b])) // 16] * 16 + torch.arange(int(lens[b])) % 16
            want = k.reference(Q=x["Q"][b], K=x["K"][b, keys], V=x["V"][b, keys],
                               blk=x["blk"][b, :, :-(-int(lens[b]) // 32)])
            assert (out[b] - want).abs().max().item() < 1e-12
        got = decode_measure(k, x, cache_len=lens, splits=2, block_table=table, page_size=page)
        p = decode_cost(k, 1, 128, splits=2, dtype="fp64", device="cpu", batch=(2,), cache_len=lens.tolist(),
                        page_size=page, block_table=table, inputs={"blk": x["blk"]}, d=8, e=8)
        assert (got.flops, got.dram_bytes_loaded, got.tiles_visited) == (p.flops, p.dram_bytes_loaded,
                                                                          p.tiles_visited)
