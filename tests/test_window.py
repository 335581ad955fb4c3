"""Issue 6: Blurry Window Attention (window-mixing schedule) and PiAttention, float64 against the reference and
independent implementations (tests/oracles.py)."""
from __future__ import annotations

import pytest
import torch

import moa
import oracles

F64 = torch.float64


def _qkv(n, d=8, e=6, batch=(2,), seed=0):
    g = torch.Generator().manual_seed(seed)
    return {x: torch.randn(*batch, n, dd, generator=g, dtype=F64) for x, dd in (("Q", d), ("K", d), ("V", e))}


def _err(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp(min=1.0)).item()


@pytest.mark.parametrize("W,M", [(4, 1), (4, 3), (8, 5), (8, 8), (16, 7), (5, 5)])
@pytest.mark.parametrize("n", [1, 3, 17, 70])
def test_bla_against_reference_and_oracle(W, M, n):
    k = moa.compile("examples/bla.moa", W=W, M=M)
    ins = _qkv(n, seed=W * 100 + M + n)
    out = k(**ins)
    assert _err(out, k.reference(**ins)) <= 1e-12
    assert _err(out, oracles.bla(ins["Q"], ins["K"], ins["V"], W=W, M=M)) <= 1e-12


@pytest.mark.parametrize("W", [2, 8, 13])
def test_bla_full_band_is_sliding_window(W):
    """M = W makes the Dirichlet kernel a delta: BLA equals sliding-window attention with w = W - 1."""
    ins = _qkv(45, batch=(2, 3), seed=W)
    bla = moa.compile("examples/bla.moa", W=W, M=W)(**ins)
    swa = moa.compile("examples/sliding_window.moa", w=W - 1)(**ins)
    assert _err(bla, swa) <= 1e-12


def test_bla_schedule_has_no_square_array():
    k = moa.compile("examples/bla.moa", W=8, M=3)
    b = k.schedules["O"].branches[0]
    assert b.mix is not None and b.dot is None
    src = k.source(dtype="float16")
    assert "_attn_window" in src and "tl.store" in src
    assert src.count("tl.store(") == 1  # only the output is stored
    from moa.dnf import REASSOCIATION_RULES

    assert {"fubini", "hoist-where", "factor-out"} <= {r.name for r in REASSOCIATION_RULES}


@pytest.mark.parametrize("kw,n", [({"k": 4, "s": 3, "T": 2}, 40), ({"k": 8, "s": 5}, 41),
                                  ({"k": 3, "s": 16, "T": 3}, 10), ({"k": 6, "s": 4, "T": 100}, 67),
                                  ({"k": 1, "s": 1, "T": 5}, 23)])
def test_pi_attention(kw, n):
    """T unbounded (default), n not a multiple of s, n < s (every skip row empty), batch and heads."""
    k = moa.compile("examples/pi_attention.moa", bg=0.25, **kw)
    ins = _qkv(n, batch=(2, 2), seed=n)
    ins["wg"] = torch.randn(8, dtype=F64)
    out = k(**ins)
    assert _err(out, k.reference(**ins)) <= 1e-12
    T = kw.get("T")
    want = oracles.pi_attention(ins["Q"], ins["K"], ins["V"], ins["wg"], k_win=kw["k"], s=kw["s"], T=T, bg=0.25)
    assert _err(out, want) <= 1e-12
