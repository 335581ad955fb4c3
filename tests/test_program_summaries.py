"""Masks that read an input fixed per program (a key length per batch entry `in L: int`, a length or a causal switch
per head L[a]) skip tiles by its value: the kernel loads it once per program, and the tile tests compare it as they
compare a per-tile (min, max) summary whose min and max are that value (moa/data_summaries.py, axis "program").
Exact in float64, forward and backward; the tiles visited are exactly those holding an admissible pair; the cost
model given the inputs counts what the instrumented interpreter counts."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import moa
from moa.runtime import backward_run
from moa.runtime.costing import cost
from moa.runtime.measuring import measure
from moa.runtime.tiling import Config

try:
    import data_cases as DC
except ImportError:  # pragma: no cover
    from tests import data_cases as DC

COUNTERS = ("flops", "transcendentals", "dram_bytes", "dram_bytes_loaded", "dram_bytes_stored", "tiles_visited")

KEY_PADDING = """dim n, m, d, e
in Q[n, d], K[m, d], V[m, e]
in L: int
S[i, j] = where(j < L, dot(Q[i], K[j]) / sqrt(d), -inf)
out O = softmax(S, axis=-1) @ V
"""

PER_HEAD = """dim h, n, m, d, e
in Q[h, n, d], K[h, m, d], V[h, m, e]
in L[h]: int, causal[h]: bool
S[a, i, j] = where(j < L[a] and (not causal[a] or j <= i), dot(Q[a, i], K[a, j]) / sqrt(d), -inf)
out O[a] = softmax(S[a], axis=-1) @ V[a]
"""


def _floats(shape, g):
    return torch.randn(*shape, generator=g, dtype=torch.float64)


def _key_padding(lengths, n=70, m=150, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    B = len(lengths)
    return {"Q": _floats((B, n, d), g), "K": _floats((B, m, d), g), "V": _floats((B, m, d), g),
            "L": torch.tensor(lengths)}


def _per_head(lengths, causal, n=90, d=8, seed=1):
    g = torch.Generator().manual_seed(seed)
    h = len(lengths)
    return {"Q": _floats((h, n, d), g), "K": _floats((h, n, d), g), "V": _floats((h, n, d), g),
            "L": torch.tensor(lengths), "causal": torch.tensor(causal)}


def _counters(r) -> dict:
    return {f: getattr(r, f) for f in COUNTERS}


def test_key_padding_visits_only_the_tiles_before_each_length():
    k = moa.compile(KEY_PADDING)
    lengths = [10, 64, 65, 150, 0]   # a length of 0: no key at all (the output is 0, as the reference's)
    x = _key_padding(lengths)
    assert (k(**x) - k.reference(**x)).abs().max().item() < 1e-12
    m = measure(k, **x)
    data = {"L": x["L"]}
    c = cost(k, dtype="float64", device="cpu", inputs=data, n=70, m=150, d=8, e=8, batch=len(lengths))
    blind = cost(k, dtype="float64", device="cpu", n=70, m=150, d=8, e=8, batch=len(lengths))
    assert _counters(m) == _counters(c)
    cfg = k.plan(**x)["O"].config
    j = np.arange(150)
    need = sum(DC.needed(np.broadcast_to(j[None, :] < L, (70, 150)), cfg.block_m, cfg.block_n) for L in lengths)
    assert m.tiles_visited == c.tiles_needed == need
    assert blind.tiles_visited > m.tiles_visited   # without L the cost model cannot know


def test_a_per_head_length_and_causal_switch():
    k = moa.compile(PER_HEAD)
    lengths, causal = [90, 33, 64, 1], [True, False, True, False]
    x = _per_head(lengths, causal)
    assert (k(**x) - k.reference(**x)).abs().max().item() < 1e-12
    m = measure(k, **x)
    data = {"L": x["L"], "causal": x["causal"]}
    c = cost(k, dtype="float64", device="cpu", inputs=data, h=4, n=90, m=90, d=8, e=8)
    assert _counters(m) == _counters(c)
    cfg = k.plan(**x)["O"].config
    i, j = np.arange(90)[:, None], np.arange(90)[None, :]
    need = sum(DC.needed((j < L) & (~np.bool_(cz) | (j <= i)), cfg.block_m, cfg.block_n)
               for L, cz in zip(lengths, causal))
    assert m.tiles_visited == c.tiles_needed == need


def test_the_kernel_loads_the_length_once_per_program():
    src = moa.compile(KEY_PADDING).triton_source
    loads = [ln for ln in src.splitlines() if "tl.load(L_ptr" in ln]
    assert len(loads) == 1 and "for " not in src.split(loads[0].strip())[0].splitlines()[-1]
    assert "L_tiles" not in src   # no pre-pass: the value is its own summary


def test_gradients_and_the_backward_prediction(monkeypatch):
    monkeypatch.setattr(backward_run, "INTERPRETER_BLOCKS", (16, 16))
    k = moa.compile(PER_HEAD)
    x = _per_head([40, 7, 25, 0], [True, False, False, True], n=40, d=4)
    want = {n: t.clone().requires_grad_() for n, t in x.items() if t.is_floating_point()}
    got = {n: t.clone().requires_grad_() for n, t in x.items() if t.is_floating_point()}
    ints = {n: t for n, t in x.items() if not t.is_floating_point()}
    cot = torch.randn(4, 40, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    (k.reference(**want, **ints) * cot).sum().backward()
    (k(**got, **ints) * cot).sum().backward()
    for name in want:
        assert (got[name].grad - want[name].grad).abs().max().item() < 1e-12, name
    dims = {"h": 4, "n": 40, "m": 40, "d": 4, "e": 4}
    pred = k.backward.cost(dims, (), "float64", inputs=ints, config=Config(16, 16))
    DC.check_backward_prediction(k, x, cot, pred, monkeypatch)
    every = {"L": torch.full((4,), 40), "causal": torch.zeros(4, dtype=torch.bool)}
    full = k.backward.cost(dims, (), "float64", inputs=every, config=Config(16, 16))
    assert pred.flops < full.flops


@pytest.mark.parametrize("splits", [1, 3])
def test_decode_with_a_per_head_length(splits):
    k = moa.compile(PER_HEAD)
    g = torch.Generator().manual_seed(5)
    x = {"Q": _floats((4, 2, 8), g), "K": _floats((4, 300, 8), g), "V": _floats((4, 300, 8), g),
         "L": torch.tensor([300, 17, 128, 200]), "causal": torch.tensor([False, True, False, True])}
    out = k.decode(**x, splits=splits)
    assert (out - k.reference(**x)).abs().max().item() < 1e-12


def test_the_key_padding_of_the_variants_page_is_this_one():
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "docs" / "variants.md").read_text()
    assert f"```\n{KEY_PADDING}```" in text


EDGE = """dim n, m, d, e
in Q[n, d], K[m, d], V[m, e]
in L: int
S[i, j] = where({}, dot(Q[i], K[j]) / sqrt(d), -inf)
out O = softmax(S, axis=-1) @ V
"""


@pytest.mark.parametrize("mask, admits", [
    ("i - j < L", lambda i, j, L: i - j < L), ("i - j >= L", lambda i, j, L: i - j >= L),
    ("j <= i and L > i - j", lambda i, j, L: (j <= i) & (L > i - j)), ("L <= j", lambda i, j, L: L <= j)])
@pytest.mark.parametrize("value, dtype", [(17, torch.int64), (2 ** 31 - 1, torch.int32), (2 ** 63 - 1, torch.int64),
                                          (-2 ** 31, torch.int32), (-2 ** 63, torch.int64), (2 ** 63 - 2, torch.int64)])
def test_lengths_at_the_ends_of_their_type(mask, admits, value, dtype):
    """A length next to a tile bound (i - j < L, its tile test I_LO - J_HI >= L) is compared, never added: a value
    of 2^31 - 1 or 2^63 - 1 meaning "no limit" does not wrap."""
    k = moa.compile(EDGE.format(mask))
    g = torch.Generator().manual_seed(2)
    x = {"Q": _floats((60, 8), g), "K": _floats((90, 8), g), "V": _floats((90, 8), g),
         "L": torch.tensor(value, dtype=dtype)}
    assert (k(**x) - k.reference(**x)).abs().max().item() < 1e-12
    got = measure(k, **x)
    c = cost(k, dtype="float64", device="cpu", inputs={"L": x["L"]}, n=60, m=90, d=8, e=8)
    assert _counters(got) == _counters(c)
    cfg = k.plan(**x)["O"].config
    i, j = np.arange(60, dtype=np.int64)[:, None], np.arange(90, dtype=np.int64)[None, :]
    with np.errstate(over="ignore"):
        need = DC.needed(np.broadcast_to(admits(i, j, np.int64(value)), (60, 90)), cfg.block_m, cfg.block_n)
    assert got.tiles_visited == c.tiles_needed == need


@pytest.mark.parametrize("mask", ["j < L - 1", "j + L > i and j <= i", "i - L <= j", "2 * L > j",
                                  "doc[i] - doc[j] <= 1"])
@pytest.mark.parametrize("value", [2 ** 63 - 1, -2 ** 63, 40])
def test_arithmetic_on_data_is_decided_per_pair(mask, value):
    """Data under arithmetic (L - 1, j + L, 2 * L, a difference of ids) wraps at the ends of int64 in the program's
    own evaluation, which a tile test's exact arithmetic would not follow: such a comparison decides no tile (every
    tile it could end is visited and masked) and the kernel equals the reference, wrapping included."""
    src = EDGE.format(mask).replace("in L: int", "in L: int, doc[n]: int")
    k = moa.compile(src)
    b = k.planner.schedules["O"].branches[0]
    assert not b.summaries   # no tile test uses the data
    g = torch.Generator().manual_seed(4)
    doc = torch.tensor([value] * 30 + [3] * 30)
    x = {"Q": _floats((60, 8), g), "K": _floats((60, 8), g), "V": _floats((60, 8), g), "L": torch.tensor(value),
         "doc": doc}
    x = {a: t for a, t in x.items() if a in k.input_names}
    assert (k(**x) - k.reference(**x)).abs().max().item() < 1e-12
    ints = {a: t for a, t in x.items() if not t.is_floating_point()}
    dims = {d.name: 60 for d in k.program.dims if d.name in ("n", "m")}
    assert _counters(measure(k, **x)) == _counters(cost(k, dtype="float64", device="cpu", inputs=ints, d=8, e=8,
                                                        **dims))


def test_integer_widths_per_input_in_every_cost_model(monkeypatch):
    """An int32 length next to int64 document ids: each is counted at its own width (a launch passes int64 as is,
    narrower integers as int32), in cost, decode_cost and backward.cost; a scalar length with no batch axes."""
    from moa.runtime.decode_cost import decode_cost
    from moa.runtime.decode_measure import measure as decode_measure

    src = EDGE.format("j < L and doc[i] == doc[j]").replace("in L: int", "in L: int, doc[n]: int").replace(
        "in Q[n, d], K[m, d], V[m, e]", "in Q[n, d], K[n, d], V[n, e]").replace("dim n, m, d, e", "dim n, d, e")
    k = moa.compile(src)
    g = torch.Generator().manual_seed(3)
    x = {"Q": _floats((2, 80, 8), g), "K": _floats((2, 80, 8), g), "V": _floats((2, 80, 8), g),
         "L": torch.tensor([70, 33], dtype=torch.int32), "doc": torch.arange(80) // 30}
    ints = {"L": x["L"], "doc": x["doc"]}
    assert _counters(measure(k, **x)) == _counters(cost(k, dtype="float64", device="cpu", inputs=ints, n=80, d=8,
                                                        e=8, batch=2))
    monkeypatch.setattr(backward_run, "INTERPRETER_BLOCKS", (16, 16))
    cot = _floats((2, 80, 8), g)
    pred = k.backward.cost({"n": 80, "d": 8, "e": 8}, (2,), "float64", inputs=ints, config=Config(16, 16))
    DC.check_backward_prediction(k, x, cot, pred, monkeypatch)
    y = {**x, "Q": x["Q"][:, -2:]}
    for splits in (1, 3):
        got = decode_measure(k, y, splits=splits)
        p = decode_cost(k, 2, 80, splits=splits, dtype="fp64", device="cpu", batch=(2,), inputs=ints, d=8, e=8)
        assert (got.dram_bytes_loaded, got.tiles_visited) == (p.dram_bytes_loaded, p.tiles_visited)
    one = moa.compile(EDGE.format("j < L"))
    z = {"Q": _floats((1, 8), g), "K": _floats((96, 8), g), "V": _floats((96, 8), g), "L": torch.tensor(50)}
    got = decode_measure(one, z, splits=2)
    p = decode_cost(one, 1, 96, splits=2, dtype="fp64", device="cpu", inputs={"L": z["L"]}, d=8, e=8)
    assert (got.dram_bytes_loaded, got.tiles_visited) == (p.dram_bytes_loaded, p.tiles_visited)
