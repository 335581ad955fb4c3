"""Masks that read an input fixed per program (a key length per batch entry `in L: int`, a length or a causal switch
per head L[a]) skip tiles by its value: the kernel loads it once per program, and the tile tests compare it as they
compare a per-tile (min, max) summary whose min and max are that value (moa/intervals.py, axis "program"). Exact in
float64, forward and backward; the tiles visited are exactly those holding an admissible pair; the cost model
given the inputs counts what the instrumented interpreter counts."""
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
