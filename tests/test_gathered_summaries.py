"""Masks that read an input at a function of the row or of the key alone (flag[j // 2], a document id per chunk of
16 tokens grp[i // 16] == grp[j // 16], a where-guarded read past its table) skip tiles by per-tile summaries of
the input gathered at every row (key) first (moa/data_summaries.py: a "gathered" row or key summary). Exact in
float64, forward, backward, decoding (split, valid lengths, paged) and varlen; the cost models given the data
count what the instrumented interpreter counts; standalone launchers gather as the runtime does."""
from __future__ import annotations

import itertools

import numpy as np
import pytest
import sympy as sp
import torch

import moa
from moa import dnf as D
from moa import ir
from moa import symbolic as sy
from moa.data_summaries import summaries_of
from moa.runtime import backward_run
from moa.runtime.costing import cost
from moa.runtime.measuring import measure
from moa.runtime.tiling import Config

try:
    import data_cases as DC
except ImportError:  # pragma: no cover
    from tests import data_cases as DC

COUNTERS = ("flops", "transcendentals", "dram_bytes", "dram_bytes_loaded", "dram_bytes_stored", "tiles_visited")
HEAD = "dim n, m, d, e\nin Q[n, d], K[m, d], V[m, e]\n"
TAIL = "out O = softmax(S, axis=-1) @ V\n"
PROGRAMS = {
    "pairs": HEAD + "in flag[(m + 1) // 2]: bool\nS[i, j] = where(flag[j // 2], dot(Q[i], K[j]) / sqrt(d), -inf)\n"
    + TAIL,
    "chunks": HEAD + "in grp[(n + 15) // 16]: int\n"
    "S[i, j] = where(grp[i // 16] == grp[j // 16] and j <= i, dot(Q[i], K[j]) / sqrt(d), -inf)\n" + TAIL,
    "guarded": HEAD + "in flag[40]: bool\n"
    "S[i, j] = where(where(j < 80, flag[j // 2], j <= i), dot(Q[i], K[j]) / sqrt(d), -inf)\n" + TAIL,
}


def _mask(name: str, x: dict, n: int, m: int) -> np.ndarray:
    i, j = np.arange(n)[:, None], np.arange(m)[None, :]
    if name == "pairs":
        return np.broadcast_to(x["flag"].numpy()[j // 2], (n, m))
    if name == "chunks":
        g = x["grp"].numpy()
        return (g[i // 16] == g[j // 16]) & (j <= i)
    f = x["flag"].numpy()
    return np.where(j < 80, f[np.minimum(j, 79) // 2], j <= i)


def _inputs(name: str, n: int, m: int, d: int = 8, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    x = {"Q": torch.randn(n, d, generator=g, dtype=torch.float64),
         "K": torch.randn(m, d, generator=g, dtype=torch.float64),
         "V": torch.randn(m, d, generator=g, dtype=torch.float64)}
    if name == "chunks":   # a few long documents of whole chunks
        x["grp"] = torch.sort(torch.randint(0, 3, (-(-n // 16),), generator=g))[0]
    else:   # sparse runs of flags: whole key tiles off, some on
        flag = torch.zeros((m + 1) // 2 if name == "pairs" else 40, dtype=torch.bool)
        flag[3:9] = True
        if name == "pairs":
            flag[-5:] = True
        x["flag"] = flag
    return x


def _counters(r) -> dict:
    return {f: getattr(r, f) for f in COUNTERS}


def test_which_reads_are_gathered():
    i, j, a = sy.index_var("i"), sy.index_var("j"), sy.index_var("a")
    c = sy.dim("c")

    def axes(*index):
        return [(s.axis, s.gathered) for s in summaries_of(D.Read("t", index, ir.BOOL), i, j)]

    assert axes(j // 2) == [("key", True)]
    assert axes(j) == [("key", False)]
    assert axes(a, i // 16) == [("row", True)]                  # a leading index beside it
    assert axes(sp.floor((j + c) / 2)) == [("key", True)]       # a dim in the function (a block's first key)
    assert axes(sp.floor((i + c) / 2)) == []                       # not a row's: a block's first row varies
    assert axes(i // 2, j // 2) == [("pair", False)]
    assert axes(i, i // 2) == [] and axes(i * j) == [] and axes(a + j) == []


@pytest.mark.parametrize("name", sorted(PROGRAMS))
def test_gathered_reads_skip_tiles_exactly(name):
    n, m = 200, 230 if name != "chunks" else 200
    k = moa.compile(PROGRAMS[name])
    assert any(s.gathered for s in k.planner.schedules["O"].branches[0].summaries)
    x = _inputs(name, n, m)
    assert (k(**x) - k.reference(**x)).abs().max().item() < 1e-12
    got = measure(k, **x)
    data = {a: t for a, t in x.items() if not t.is_floating_point()}
    c = cost(k, dtype="float64", device="cpu", inputs=data, n=n, m=m, d=8, e=8)
    blind = cost(k, dtype="float64", device="cpu", n=n, m=m, d=8, e=8)
    assert _counters(got) == _counters(c)
    cfg = k.plan(**x)["O"].config
    assert c.tiles_needed == DC.needed(_mask(name, x, n, m), cfg.block_m, cfg.block_n) == got.tiles_visited \
        < blind.tiles_visited


def test_the_backward_of_a_gathered_read(monkeypatch):
    monkeypatch.setattr(backward_run, "INTERPRETER_BLOCKS", (16, 16))
    k = moa.compile(PROGRAMS["chunks"])
    n = 90
    x = _inputs("chunks", n, n, seed=1)
    g = torch.Generator().manual_seed(3)
    cot = torch.randn(n, 8, generator=g, dtype=torch.float64)
    want = {a: t.clone().requires_grad_() if t.is_floating_point() else t for a, t in x.items()}
    got = {a: t.clone().requires_grad_() if t.is_floating_point() else t for a, t in x.items()}
    (k.reference(**want) * cot).sum().backward()
    (k(**got) * cot).sum().backward()
    for a in "QKV":
        assert (got[a].grad - want[a].grad).abs().max().item() < 1e-12, a
    dims = {"n": n, "m": n, "d": 8, "e": 8}
    pred = k.backward.cost(dims, (), "float64", inputs={"grp": x["grp"]}, config=Config(16, 16))
    DC.check_backward_prediction(k, x, cot, pred, monkeypatch)
    one = k.backward.cost(dims, (), "float64", inputs={"grp": torch.zeros_like(x["grp"])}, config=Config(16, 16))
    assert pred.flops < one.flops


def _decode_inputs(seed: int = 4) -> dict:
    g = torch.Generator().manual_seed(seed)
    x = {"Q": torch.randn(2, 3, 8, generator=g, dtype=torch.float64),
         "K": torch.randn(2, 320, 8, generator=g, dtype=torch.float64),
         "V": torch.randn(2, 320, 8, generator=g, dtype=torch.float64)}
    flag = torch.zeros(2, 160, dtype=torch.bool)
    flag[0, 5] = flag[0, 100] = flag[1, 37] = True
    flag[1, 70:75] = True
    return {**x, "flag": flag}


def test_decoding_with_a_gathered_read():
    """Split, with valid lengths, and paged: the flags are read at logical keys (j // 2 of the key's position in
    its sequence, not in the pool); the summaries of each batch index are gathered there."""
    from moa.runtime.decode_cost import decode_cost
    from moa.runtime.decode_measure import measure as decode_measure

    k = moa.compile(PROGRAMS["pairs"])
    x = _decode_inputs()
    lens = torch.tensor([230, 160])
    table = torch.stack([torch.randperm(20, generator=torch.Generator().manual_seed(b)) for b in range(2)])
    calls = [{"splits": 1}, {"splits": 3}, {"splits": 2, "cache_len": lens},
             {"splits": 2, "cache_len": lens, "block_table": table, "page_size": 16}]
    for opts in calls:
        out = k.decode(**x, **opts)
        for b in range(2):
            keys = torch.arange(int(lens[b]) if "cache_len" in opts else 320)
            if "block_table" in opts:
                keys = table[b][keys // 16] * 16 + keys % 16
            want = k.reference(Q=x["Q"][b], K=x["K"][b, keys], V=x["V"][b, keys],
                               flag=x["flag"][b, :(len(keys) + 1) // 2])
            assert (out[b] - want).abs().max().item() < 1e-12, (opts, b)
        got = decode_measure(k, x, **opts)
        p = decode_cost(k, 3, 320, dtype="fp64", device="cpu", batch=(2,), d=8, e=8, inputs={"flag": x["flag"]},
                        **opts)
        assert (got.flops, got.dram_bytes_loaded, got.tiles_visited) == (p.flops, p.dram_bytes_loaded,
                                                                         p.tiles_visited), opts
        assert got.tiles_visited < decode_measure(k, {**x, "flag": torch.ones_like(x["flag"])}, **opts).tiles_visited


def test_varlen_with_a_gathered_read():
    """A table of fixed size read at a function of each sequence's local key index."""
    from moa.runtime.decode_measure import measure_varlen
    from moa.runtime.varlen_cost import varlen_cost

    k = moa.compile(HEAD + "in flag[64]: bool\nS[i, j] = where(flag[j // 4] or j == 0, dot(Q[i], K[j]) / sqrt(d), "
                    "-inf)\n" + TAIL)
    g = torch.Generator().manual_seed(5)
    lq, lk = [1, 5, 40], [10, 70, 131]
    cq, ck = [0, *itertools.accumulate(lq)], [0, *itertools.accumulate(lk)]
    x = {"Q": torch.randn(cq[-1], 8, generator=g, dtype=torch.float64),
         "K": torch.randn(ck[-1], 8, generator=g, dtype=torch.float64),
         "V": torch.randn(ck[-1], 8, generator=g, dtype=torch.float64), "flag": torch.zeros(64, dtype=torch.bool)}
    x["flag"][[3, 30]] = True
    out = k.varlen(**x, cu_seqlens_q=torch.tensor(cq), cu_seqlens_k=torch.tensor(ck))
    for s in range(3):
        want = k.reference(Q=x["Q"][cq[s]:cq[s + 1]], K=x["K"][ck[s]:ck[s + 1]], V=x["V"][ck[s]:ck[s + 1]],
                           flag=x["flag"])
        assert (out[cq[s]:cq[s + 1]] - want).abs().max().item() < 1e-12, s
    got = measure_varlen(k, x, torch.tensor(cq), torch.tensor(ck))
    p = varlen_cost(k, cq, ck, dtype="fp64", device="cpu", d=8, e=8, inputs={"flag": x["flag"]})
    assert (got.flops, got.dram_bytes_loaded, got.tiles_visited) == (p.flops, p.dram_bytes_loaded, p.tiles_visited)


def test_standalone_launchers_gather_reads(tmp_path, capsys):
    """`moa compile --launcher` modules gather the input at the read's function (clipped), no moa import."""
    names = ("chunks", "guarded")
    outs, refs = DC.launched_tables(tmp_path, {a: PROGRAMS[a] for a in names}, _inputs, 150, 150)
    capsys.readouterr()
    for name in names:
        assert (outs[name] - refs[name]).abs().max().item() < 1e-12, name
        assert ".index_select(" in (tmp_path / f"{name}.py").read_text()



def test_decoding_rows_at_a_function_of_the_row_with_valid_lengths():
    """A shared-length program's decode block reads grp[(i + R - 1) // 16] with R its first row, which differs per
    batch index where the valid lengths do: no gathered summary follows it (a summary at one R skipped needed
    tiles of the other batch index); the result is exact."""
    k = moa.compile("dim n, d, e\nin Q[n, d], K[n, d], V[n, e]\nin grp[(n + 15) // 16]: int\n"
                    "S[i, j] = where(grp[i // 16] == grp[j // 16] and j <= i, dot(Q[i], K[j]) / sqrt(d), -inf)\n"
                    + TAIL)
    g = torch.Generator().manual_seed(6)
    x = {"Q": torch.randn(2, 5, 8, generator=g, dtype=torch.float64),
         "K": torch.randn(2, 250, 8, generator=g, dtype=torch.float64),
         "V": torch.randn(2, 250, 8, generator=g, dtype=torch.float64),
         "grp": torch.tensor([[0] * 13 + [1] * 3] * 2)}
    lens = torch.tensor([250, 200])
    out = k.decode(**x, cache_len=lens, splits=2)
    for b in range(2):
        L = int(lens[b])
        q = torch.cat([torch.zeros(L - 5, 8, dtype=torch.float64), x["Q"][b]])   # the last 5 rows
        want = k.reference(Q=q, K=x["K"][b, :L], V=x["V"][b, :L], grp=x["grp"][b, :(L + 15) // 16])[-5:]
        assert (out[b] - want).abs().max().item() < 1e-12, b


def test_found_by_fuzzers():
    """measure() of a program whose names code generation renames (an input named like a kernel buffer, g0) read
    the call's dim names (a KeyError); a fixed-size table read at an offset of the key length (fl[(j + m) // 2 - 20])
    decodes with valid lengths at each batch index's own length (it was refused as a table sized by the sequence)."""
    k = moa.compile(HEAD + "in g0[(m + 1) // 2]: bool\nS[i, j] = where(g0[j // 2], dot(Q[i], K[j]) / sqrt(d), -inf)\n"
                    + TAIL)
    x = {**_inputs("pairs", 100, 190, d=4), "g0": _inputs("pairs", 100, 190, d=4)["flag"]}
    del x["flag"]
    c = cost(k, dtype="float64", device="cpu", inputs={"g0": x["g0"]}, n=100, m=190, d=4, e=4)
    assert _counters(measure(k, **x)) == _counters(c)
    k = moa.compile(HEAD + "in fl[40]: bool\nS[i, j] = where(where((j + m) // 2 >= 20 and (j + m) // 2 < 60, "
                    "fl[(j + m) // 2 - 20], j <= i), dot(Q[i], K[j]) / sqrt(d), -inf)\n" + TAIL)
    g = torch.Generator().manual_seed(9)
    x = {"Q": torch.randn(2, 3, 8, dtype=torch.float64, generator=g),
         "K": torch.randn(2, 64, 8, dtype=torch.float64, generator=g),
         "V": torch.randn(2, 64, 8, dtype=torch.float64, generator=g), "fl": torch.rand(2, 40, generator=g) < 0.5}
    lens = torch.tensor([64, 30])
    out = k.decode(**x, splits=2, cache_len=lens)
    for b, L in enumerate(lens.tolist()):
        want = k.reference(Q=x["Q"][b], K=x["K"][b, :L], V=x["V"][b, :L], fl=x["fl"][b])
        assert (out[b] - want).abs().max().item() < 1e-12, b
