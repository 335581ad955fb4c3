"""Data-derived block sparsity: masks over integer and boolean inputs skip (query tile, key tile) pairs by per-tile
(min, max) summaries of those inputs (moa/intervals.py decides skip / full from the mask's algebra; the launcher's
pre-pass computes the summaries). Every kernel is exact in float64, skips what the summaries prove empty, and the
cost model given the same inputs counts what the instrumented interpreter counts."""
import numpy as np
import pytest
import torch

import moa
from moa.runtime.costing import cost
from moa.runtime.measuring import measure

try:
    import data_cases as DC
except ImportError:  # pragma: no cover
    from tests import data_cases as DC

COUNTERS = ("flops", "transcendentals", "dram_bytes", "dram_bytes_loaded", "dram_bytes_stored", "tiles_visited")
HEAD = "dim n, d, e\nin Q[n, d], K[n, d], V[n, e]\n"
PROGRAMS = {   # unseen predicates: no example has them
    "segments": HEAD + "in seg[n]: int\n"
                "S[i, j] = where(seg[i] == seg[j] and j <= i, dot(Q[i], K[j]) / sqrt(d), -inf)\n"
                "out O = softmax(S, axis=-1) @ V\n",
    "flags": HEAD + "param w = 24\nin flag[n]: bool\n"
             "S[i, j] = where(flag[j] or i - j < w, dot(Q[i], K[j]) / sqrt(d), -inf)\n"
             "out O = softmax(S, axis=-1) @ V\n",
    "not_equal_later": HEAD + "in seg[n]: int\n"
                       "S[i, j] = where(not (seg[j] != seg[i]) and (j >= i or seg[i] < 2), dot(Q[i], K[j]), -inf)\n"
                       "out O = softmax(S, axis=-1) @ V\n",
}


def inputs(n, d=16, seed=0, **extra):
    g = torch.Generator().manual_seed(seed)
    return {"Q": torch.randn(n, d, generator=g, dtype=torch.float64),
            "K": torch.randn(n, d, generator=g, dtype=torch.float64),
            "V": torch.randn(n, d, generator=g, dtype=torch.float64), **extra}


def segments(*lengths):
    return torch.cat([torch.full((x,), k) for k, x in enumerate(lengths)])


def run(k, x):
    """Output error against the float64 reference; measured and predicted counters (with the data, without)."""
    out = k(**x)
    err = (out - k.reference(**x)).abs().max().item()
    m = measure(k, **x)
    data = {a: t for a, t in x.items() if not t.is_floating_point()}
    n, d = x["Q"].shape
    c = cost(k, dtype="float64", device="cpu", inputs=data, n=n, d=d, e=d)
    blind = cost(k, dtype="float64", device="cpu", n=n, d=d, e=d)
    return err, m, c, blind


def counters(r):
    return {f: getattr(r, f) for f in COUNTERS}


def test_document_mask_visits_only_tiles_of_shared_documents():
    k = moa.compile("examples/document_mask.moa")
    doc = segments(100, 150, 50)
    x = inputs(300, doc=doc)
    err, m, c, blind = run(k, x)
    assert err < 1e-12
    assert counters(m) == counters(c)
    i = np.arange(300)
    mask = (doc.numpy()[:, None] == doc.numpy()[None, :]) & (i[None, :] <= i[:, None])
    bm, bn = k.plan(**x)["O"].config.block_m, k.plan(**x)["O"].config.block_n
    assert c.tiles_visited == c.tiles_needed == DC.needed(mask, bm, bn)   # sorted ids: the summaries are exact
    assert blind.tiles_visited > c.tiles_visited   # without the data the cost model cannot know


@pytest.mark.parametrize("name", sorted(PROGRAMS))
def test_unseen_predicates_skip_by_their_summaries(name):
    k = moa.compile(PROGRAMS[name])
    n = 200
    if name == "flags":
        flag = torch.zeros(n, dtype=torch.bool)
        flag[[5, 7]] = True    # two global keys, both in the first key tile
        x = inputs(n, flag=flag)
    else:
        x = inputs(n, seg=segments(30, 90, 10, 70))
    err, m, c, blind = run(k, x)
    assert err < 1e-12
    assert counters(m) == counters(c)
    assert c.tiles_visited < blind.tiles_visited


def test_unsorted_ids_stay_exact():
    """Random ids make wide tile ranges: few tiles are skipped, none wrongly."""
    k = moa.compile(PROGRAMS["segments"])
    g = torch.Generator().manual_seed(3)
    x = inputs(130, seg=torch.randint(0, 4, (130,), generator=g))
    err, m, c, _ = run(k, x)
    assert err < 1e-12 and counters(m) == counters(c)


def test_contiguous_documents_numbered_in_order_skip_every_tile():
    """docs/variants.md: relabelled contiguous documents ([3, 3, 0, 0, 4]) skip fewer tiles; numbered in order (the
    cumsum of the changes) they give the same output and visit only the tiles that hold a pair of one document."""
    k = moa.compile("examples/document_mask.moa")
    labels = torch.cat([torch.full((x,), v) for v, x in zip([3, 0, 4, 1, 2], [70, 60, 90, 50, 30])])
    ordered = torch.cat([torch.zeros(1, dtype=torch.long), (labels[1:] != labels[:-1]).long()]).cumsum(0)
    x, y = inputs(300, doc=labels), inputs(300, doc=ordered)
    (err, m, _, _), (err2, m2, c2, _) = run(k, x), run(k, y)
    assert err < 1e-12 and err2 < 1e-12 and (k(**x) - k(**y)).abs().max().item() == 0
    assert m2.tiles_visited == c2.tiles_needed < m.tiles_visited


def test_batched_ids_are_summarised_per_entry():
    k = moa.compile("examples/document_mask.moa")
    doc = torch.stack([segments(60, 40, 30), segments(10, 120)])
    g = torch.Generator().manual_seed(1)
    x = {a: torch.randn(2, 130, 16, generator=g, dtype=torch.float64) for a in "QKV"}
    x["doc"] = doc
    out = k(**x)
    assert (out - k.reference(**x)).abs().max().item() < 1e-12
    m = measure(k, **x)
    c = cost(k, dtype="float64", device="cpu", inputs={"doc": doc}, batch=(2,), config=None, n=130, d=16, e=16)
    assert counters(m) == counters(c)


def test_summaries_are_min_and_max_per_tile():
    from moa.runtime.summaries import tile_summaries
    t = torch.tensor([[3, 1, 4, 1, 5], [9, 2, 6, 5, 3]])
    s = tile_summaries(t, 1, 2)
    assert s.tolist() == [[[1, 3], [1, 4], [5, 5]], [[2, 9], [5, 6], [3, 3]]]
    b = tile_summaries(torch.tensor([False, True, False, False]), 0, 2)
    assert b.tolist() == [[0, 1], [0, 0]]


def test_cost_inputs_are_checked():
    k = moa.compile("examples/document_mask.moa")
    with pytest.raises(moa.InputError, match="float input"):
        cost(k, dtype="float64", device="cpu", inputs={"Q": torch.zeros(10, 4)}, n=10, d=4, e=4)
    with pytest.raises(moa.InputError, match="shape"):
        cost(k, dtype="float64", device="cpu", inputs={"doc": torch.zeros(9, dtype=torch.long)}, n=10, d=4, e=4)


def test_the_scan_runs_only_the_kept_tiles():
    """After the scan (the skip test on 64 key tiles at a time) every iteration of the key loop is a kept tile;
    a loop testing each tile would also walk every skipped tile below the diagonal."""
    from moa import tiles
    from moa.codegen.emit import SCAN

    k = moa.compile("examples/document_mask.moa")
    b = k.schedules["O"].branches[0]
    n, bm, bn = 600, 32, 32
    env = {d: n for d in k.program.dims if d.name == "n"}
    doc = segments(100, 150, 50, 300).numpy()
    R = -(-n // bm)
    ilo = np.arange(R) * bm
    ihi = np.minimum(ilo + bm, n) - 1
    sums = tiles.summary_env(b, env, {"doc": doc}, n, n, bm, bn)
    trimmed = tiles.key_iterations(b, {**env, **sums}, ilo, ihi, n, bn, True, SCAN)
    full = tiles.key_iterations(b, {**env, **sums}, ilo, ihi, n, bn, True)
    assert trimmed.visited.all() and trimmed.visited.sum() == full.visited.sum()
    assert len(full.rows) > len(trimmed.rows)
    assert trimmed.scans.tolist() == [1] * R    # one step of 64 key tiles covers each row tile's range


def test_explain_shows_the_data_tests_and_the_scan():
    text = moa.compile("examples/document_mask.moa").explain()
    assert "with the data (per-tile min / max of doc[i] over the row tile, doc[j] over the key tile)" in text
    assert "key loop: the skip test on 64 key tiles at a time, then the kept tiles only" in text
    assert "key loop" not in moa.compile("examples/causal.moa").explain()   # a split loop: no test to scan


@pytest.mark.parametrize("dtype, lo, hi", [(torch.int32, -2 ** 31 + 1, 2 ** 31 - 1),
                                           (torch.int64, -2 ** 62 - 12345, 2 ** 62 + 999)])
def test_ids_near_the_ends_of_their_type(dtype, lo, hi):
    # the tile tests compare per-tile min / max without subtracting them (doc_min - doc_max wrapped in int32 and
    # near +-2^62 in int64: tiles holding admissible pairs were skipped)
    k = moa.compile("examples/document_mask.moa")
    n = 128
    doc = torch.full((n,), 5, dtype=dtype)
    doc[64], doc[63] = lo, hi
    x = inputs(n, doc=doc)
    assert (k(**x) - k.reference(**x)).abs().max() <= 1e-12
    m = measure(k, **x)
    c = cost(k, dtype="float64", device="cpu", inputs={"doc": doc}, n=n, d=16, e=16)
    assert m.tiles_visited == c.tiles_visited == c.tiles_needed == 3
    assert m.dram_bytes == c.dram_bytes   # int32 ids are read as 4 bytes (the cost model took 8 for any ids)


@pytest.mark.parametrize("mask, values", [("g[j] and j <= i", [-1]), ("not g[j]", [-1, 0]), ("g[i] == g[j]", [1, 2])])
def test_integer_tensors_for_bool_inputs(mask, values):
    # nonzero is true: the per-tile any / all summaries see 0 / 1, not the raw integers
    k = moa.compile(HEAD + f"in g[n]: bool\nS[i, j] = where({mask}, dot(Q[i], K[j]), -inf)\n"
                           "out O = softmax(S, axis=-1) @ V\n")
    n = 130
    g = torch.tensor(values).repeat_interleave(-(-n // len(values)))[:n]
    x = inputs(n, g=g)
    flags = inputs(n, g=g != 0)
    assert (k(**x) - k(**flags)).abs().max() == 0
    assert (k(**x) - k.reference(**flags)).abs().max() <= 1e-12
    m = measure(k, **x)
    c = cost(k, dtype="float64", device="cpu", inputs={"g": g}, n=n, d=16, e=16)
    assert m.tiles_visited == c.tiles_visited


def test_arithmetic_on_int32_ids_is_64_bit():
    # doc[j] + 3 in the mask: int32 ids near 2^31 - 1 wrapped in the kernel (the reference computes in int64)
    k = moa.compile(HEAD + "in doc[n]: int\nS[i, j] = where(doc[j] + 3 >= doc[i] and j <= i, dot(Q[i], K[j]), -inf)\n"
                           "out O = softmax(S, axis=-1) @ V\n")
    n = 100
    doc = torch.full((n,), 2 ** 31 - 2, dtype=torch.int32)
    doc[::3] = 2 ** 31 - 6
    x = inputs(n, doc=doc)
    assert (k(**x) - k.reference(**x)).abs().max() <= 1e-12
    m = measure(k, **x)
    c = cost(k, dtype="float64", device="cpu", inputs={"doc": doc}, n=n, d=16, e=16)
    assert {f: getattr(m, f) for f in COUNTERS} == {f: getattr(c, f) for f in COUNTERS}


def test_int_width_ignores_flags_given_as_integers():
    # int32 ids with a bool input passed as an int64 tensor: the flag is read as bools, so the ids' width is the
    # integers' (the cost model took int64 from the flag tensor: bytes off; found by a fuzzing helper)
    k = moa.compile(HEAD + "in seg[n]: int\nin flag[n]: bool\n"
                           "S[i, j] = where(seg[j] == 0 and flag[j], dot(Q[i], K[j]), -inf)\n"
                           "out O = softmax(S, axis=-1) @ V\n")
    n = 65
    seg, flag = torch.zeros(n, dtype=torch.int32), torch.ones(n, dtype=torch.int64)
    m = measure(k, **inputs(n, seg=seg, flag=flag))
    c = cost(k, dtype="float64", device="cpu", inputs={"seg": seg, "flag": flag}, n=n, d=16, e=16)
    assert m.dram_bytes == c.dram_bytes and m.tiles_visited == c.tiles_visited
