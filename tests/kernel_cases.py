"""Shared inputs of the kernel tests (tests/test_kernels.py, tests/test_kernels_source.py): seeded generators,
scale-aware errors, and the cases of every example (inputs and the oracle each is compared with)."""
from __future__ import annotations

import math
import zlib
from dataclasses import dataclass
from pathlib import Path

import moa
import torch

try:  # pytest's default (prepend) import mode puts tests/ on sys.path
    import oracles as O
except ImportError:  # pragma: no cover - importlib mode / run from the repository root
    from tests import oracles as O


ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
GOLDEN = Path(__file__).resolve().parent / "golden"
F64 = torch.float64
NEG_INF = float("-inf")

D, E = 16, 24          # head dims: e = 24 is not a power of two (padding lanes of the value tile)
N = 100                # default query length
TOL64 = 1e-12
TOL = {torch.float32: 2e-5, torch.float16: 5e-3, torch.bfloat16: 3e-2}
TOL_LARGE = {torch.float32: 1e-2, torch.float16: 1e-2, torch.bfloat16: 3e-2}
LOW = [torch.float32, torch.float16, torch.bfloat16]


# ---------------------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------------------


def gen(*key) -> torch.Generator:
    """A generator seeded from the test's own key (stable across runs and xdist workers)."""
    return torch.Generator().manual_seed(zlib.crc32(repr(key).encode()))


def randn(g, *shape, scale=1.0, dtype=F64):
    return (torch.randn(*shape, generator=g, dtype=F64) * scale).to(dtype)


def err(out, ref) -> float:
    """max |out - ref| / max(1, max |ref|); equal infinities count as equal; NaN is an infinite error."""
    out, ref = out.to(F64), ref.to(F64)
    assert out.shape == ref.shape, (tuple(out.shape), tuple(ref.shape))
    if out.numel() == 0:
        return 0.0
    if torch.isnan(out).any() or torch.isnan(ref).any():
        return math.inf
    same_inf = torch.isinf(out) & torch.isinf(ref) & (torch.sign(out) == torch.sign(ref))
    diff = torch.where(same_inf, torch.zeros_like(out), out - ref).abs().max().item()
    finite = ref[torch.isfinite(ref)]
    scale = max(1.0, finite.abs().max().item()) if finite.numel() else 1.0
    return diff / scale


def example(name, **params):
    return moa.compile(EXAMPLES / f"{name}.moa", **params)


def f64(inputs: dict) -> dict:
    return {k: (t.to(F64) if t.is_floating_point() else t) for k, t in inputs.items()}


def cast(inputs: dict, dtype) -> dict:
    return {k: (t.to(dtype) if t.is_floating_point() else t) for k, t in inputs.items()}


# ---------------------------------------------------------------------------------------------------------
# the examples: inputs and independent oracles
# ---------------------------------------------------------------------------------------------------------


@dataclass
class Case:
    name: str                 # example file stem
    params: dict              # compile-time params
    make: object              # g -> inputs dict (float64)
    oracle: object            # inputs -> O (float64), independent of moa
    lse: object = None        # inputs -> lse (float64), or None (no single-softmax lse)
    kind: str = "softmax"     # softmax | norm | bla | sum


def _qkv(g, n=N, m=None, hq=(), hk=None, qscale=1.0, d=D, e=E):
    m = n if m is None else m
    hk = hq if hk is None else hk
    return dict(Q=randn(g, *hq, n, d, scale=qscale), K=randn(g, *hk, m, d), V=randn(g, *hk, m, e))


def _with(g, base, **extra):
    return {**base, **{k: (v(g) if callable(v) else v) for k, v in extra.items()}}


def _sorted_doc(g, n, ndocs=5):
    return torch.sort(torch.randint(0, ndocs, (n,), generator=g)).values


def _cum_gates(g, n):
    return torch.cumsum(-torch.rand(n, generator=g, dtype=F64) * 0.1, 0)


def _qkv_(x):
    return x["Q"], x["K"], x["V"]


SOFTMAX_CASES = [
    Case("sdpa", {}, lambda g: _qkv(g, m=77),
         lambda x: O.sdpa(*_qkv_(x)),
         lambda x: O.flex_oracle(*_qkv_(x), return_lse=True)[1]),
    Case("causal", {}, lambda g: _qkv(g),
         lambda x: O.causal(*_qkv_(x)),
         lambda x: O.causal(*_qkv_(x), return_lse=True)[1]),
    Case("causal_bottom_right", {}, lambda g: _qkv(g, n=77, m=140),
         lambda x: O.causal(*_qkv_(x), bottom_right=True),
         lambda x: O.causal(*_qkv_(x), bottom_right=True, return_lse=True)[1]),
    Case("sliding_window", {"w": 37}, lambda g: _qkv(g),
         lambda x: O.sliding_window(*_qkv_(x), w=37),
         lambda x: O.sliding_window(*_qkv_(x), w=37, return_lse=True)[1]),
    Case("dilated_window", {"w": 50, "r": 3}, lambda g: _qkv(g),
         lambda x: O.dilated_window(*_qkv_(x), w=50, r=3),
         lambda x: O.dilated_window(*_qkv_(x), w=50, r=3, return_lse=True)[1]),
    Case("global_window", {"w": 10}, lambda g: _with(g, _qkv(g), glob=lambda g: torch.rand(N, generator=g) < 0.06),
         lambda x: O.global_window(*_qkv_(x), w=10, glob=x["glob"]),
         lambda x: O.global_window(*_qkv_(x), w=10, glob=x["glob"], return_lse=True)[1]),
    Case("prefix_lm", {"p": 20}, lambda g: _qkv(g),
         lambda x: O.prefix_lm(*_qkv_(x), p=20),
         lambda x: O.prefix_lm(*_qkv_(x), p=20, return_lse=True)[1]),
    Case("document_mask", {}, lambda g: _with(g, _qkv(g), doc=lambda g: _sorted_doc(g, N)),
         lambda x: O.document(*_qkv_(x), doc=x["doc"]),
         lambda x: O.document(*_qkv_(x), doc=x["doc"], return_lse=True)[1]),
    Case("alibi", {}, lambda g: _qkv(g, hq=(4,)),
         lambda x: O.alibi(*_qkv_(x)),
         lambda x: O.alibi(*_qkv_(x), return_lse=True)[1]),
    Case("gqa_alibi", {}, lambda g: _qkv(g, hq=(4,), hk=(2,)),
         lambda x: O.gqa(*_qkv_(x), causal=True, alibi=True),
         lambda x: O.gqa(*_qkv_(x), causal=True, alibi=True, return_lse=True)[1]),
    Case("mqa", {}, lambda g: _qkv(g, m=77, hq=(4,), hk=()),
         lambda x: O.gqa(x["Q"], x["K"][..., None, :, :], x["V"][..., None, :, :]),
         lambda x: O.gqa(x["Q"], x["K"][..., None, :, :], x["V"][..., None, :, :], return_lse=True)[1]),
    Case("softcap", {"c": 2.5}, lambda g: _qkv(g, m=77, qscale=4.0),   # scores up to ~15: the cap matters
         lambda x: O.softcap(*_qkv_(x), c=2.5),
         lambda x: O.softcap(*_qkv_(x), c=2.5, return_lse=True)[1]),
    Case("relative_bias", {}, lambda g: _with(g, _qkv(g, hq=(4,)), bias=lambda g: randn(g, 4, 2 * N - 1)),
         lambda x: O.relative_bias(*_qkv_(x), bias=x["bias"]),
         lambda x: O.relative_bias(*_qkv_(x), bias=x["bias"], return_lse=True)[1]),
    Case("ring_local", {"k": 16}, lambda g: _qkv(g),
         lambda x: O.ring_local(*_qkv_(x), k_win=16),
         lambda x: O.ring_local(*_qkv_(x), k_win=16, return_lse=True)[1]),
    Case("pi_attention", {"k": 16, "s": 7, "T": 5, "bg": 0.3}, lambda g: _with(g, _qkv(g), wg=lambda g: randn(g, D)),
         lambda x: O.pi_attention(*_qkv_(x), x["wg"], k_win=16, s=7, T=5, bg=0.3)),
    Case("pi_attention", {"k": 9, "s": 11}, lambda g: _with(g, _qkv(g), wg=lambda g: randn(g, D)),  # T unbounded
         lambda x: O.pi_attention(*_qkv_(x), x["wg"], k_win=9, s=11, T=None)),
]

NORM_CASES = [
    Case("power", {}, lambda g: _qkv(g), lambda x: O.power_attention(*_qkv_(x), p=2), kind="norm"),
    Case("power", {"p": 4}, lambda g: _qkv(g), lambda x: O.power_attention(*_qkv_(x), p=4), kind="norm"),
    Case("power_gated", {}, lambda g: _with(g, _qkv(g), G=lambda g: _cum_gates(g, N)),
         lambda x: O.power_attention(*_qkv_(x), p=2, G=x["G"]), kind="norm"),
    Case("linear", {}, lambda g: _qkv(g), lambda x: O.linear_attention(*_qkv_(x), eps=0.0), kind="norm"),
    Case("linear_relu", {}, lambda g: _qkv(g),
         lambda x: O.linear_attention(*_qkv_(x), phi=torch.relu, eps=0.0), kind="norm"),
]

BLA_CASES = [   # Blurry Window Attention: its own window-mixing schedule
    Case("bla", {"W": 16, "M": 5}, lambda g: _qkv(g), lambda x: O.bla(*_qkv_(x), W=16, M=5), kind="bla"),
    Case("bla", {"W": 8, "M": 8}, lambda g: _qkv(g, n=37),   # M = W: exactly sliding window with w = W - 1
         lambda x: O.sliding_window(*_qkv_(x), w=7), kind="bla"),
]

SUM_CASES = [   # plain sums A @ V (no normaliser)
    Case("sigmoid", {}, lambda g: _qkv(g), lambda x: O.sigmoid_attention(*_qkv_(x)), kind="sum"),
    Case("retention", {}, lambda g: _qkv(g, hq=(4,)),
         lambda x: O.retention(*_qkv_(x), gamma=1 - 2.0 ** (-5 - torch.arange(4))), kind="sum"),
]

ALL_CASES = SOFTMAX_CASES + NORM_CASES + BLA_CASES + SUM_CASES


def case_id(c: Case) -> str:
    return c.name + "".join(f"-{k}{v}" for k, v in c.params.items())


def compiled(c: Case):
    # the normalised programs also have a linear (chunked-state) form; these tests are about the tiled kernel
    return example(c.name, form="quadratic", **c.params) if c.kind == "norm" else example(c.name, **c.params)
