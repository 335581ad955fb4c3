"""Cross-checks among the independent float64 oracles of tests/oracles.py (no moa import).

- every softmax-family oracle: eager flex_attention path == explicit materialised formula (<= 1e-12),
  including log-sum-exp, ragged n in (1, 17, 100), leading batch / head axes;
- sdpa (F.scaled_dot_product_attention) == explicit formula;
- BLA with M == W equals sliding-window attention with w = W - 1; BLA == a direct per-query loop;
- power attention (p = 2, 4, gated, eps) == a direct loop; linear attention == its recurrent state form;
- ring_merge of key shards (including fully masked shards) == full attention, O and lse;
- the "row with no admissible key gives 0" convention, for flex itself and for every path here.
"""

from __future__ import annotations

import itertools
import math
import warnings

import pytest
import torch
import torch.nn.functional as F

try:  # pytest's default (prepend) import mode puts tests/ on sys.path
    import oracles as O
except ImportError:  # pragma: no cover - importlib mode / run from the repository root
    from tests import oracles as O

F64 = torch.float64
TOL = 1e-12
NS = (1, 17, 100)
D, E = 8, 5


def _gen(seed):
    g = torch.Generator().manual_seed(seed)
    return g


def _randn(g, *shape, scale=1.0):
    return torch.randn(*shape, generator=g, dtype=F64) * scale


def _qkv(g, lead, n, m=None, heads=None, kv_heads=None, qscale=1.0):
    m = n if m is None else m
    hq = () if heads is None else (heads,)
    hk = hq if kv_heads is None else (kv_heads,)
    q = _randn(g, *lead, *hq, n, D, scale=qscale)
    k = _randn(g, *lead, *hk, m, D)
    v = _randn(g, *lead, *hk, m, E)
    return q, k, v


def _maxdiff(a, b):
    assert a.shape == b.shape, (a.shape, b.shape)
    assert a.dtype == F64 and b.dtype == F64
    both_inf = torch.isinf(a) & torch.isinf(b) & (torch.sign(a) == torch.sign(b))
    assert not torch.isnan(a).any() and not torch.isnan(b).any()
    return (torch.where(both_inf, torch.zeros_like(a), a - b)).abs().max().item() if a.numel() else 0.0


# ---------------------------------------------------------------------------------------------------------
# softmax family: flex == explicit
# ---------------------------------------------------------------------------------------------------------


def _case(name, n, seed=0):
    """Returns (call(impl, return_lse) -> result) for one softmax-family variant at sequence length n."""
    g = _gen(1000 * seed + n)
    B = (2,)
    if name == "causal":
        q, k, v = _qkv(g, B, n)
        return lambda impl, lse: O.causal(q, k, v, impl=impl, return_lse=lse)
    if name == "causal_top_left_ragged":
        q, k, v = _qkv(g, B, n, n + 9)
        return lambda impl, lse: O.causal(q, k, v, impl=impl, return_lse=lse)
    if name == "causal_bottom_right_longer_k":
        q, k, v = _qkv(g, B, n, n + 9)
        return lambda impl, lse: O.causal(q, k, v, bottom_right=True, impl=impl, return_lse=lse)
    if name == "causal_bottom_right_shorter_k":  # rows i < n - m have no key
        q, k, v = _qkv(g, B, n, n // 2 + 1)
        return lambda impl, lse: O.causal(q, k, v, bottom_right=True, impl=impl, return_lse=lse)
    if name == "sliding_window":
        q, k, v = _qkv(g, B, n)
        return lambda impl, lse: O.sliding_window(q, k, v, w=5, impl=impl, return_lse=lse)
    if name == "dilated_window":
        q, k, v = _qkv(g, B, n)
        return lambda impl, lse: O.dilated_window(q, k, v, w=12, r=3, impl=impl, return_lse=lse)
    if name == "global_window":
        q, k, v = _qkv(g, B, n)
        glob = torch.rand(*B, n, generator=g) < 0.1
        return lambda impl, lse: O.global_window(q, k, v, w=3, glob=glob, impl=impl, return_lse=lse)
    if name == "prefix_lm":
        q, k, v = _qkv(g, B, n)
        return lambda impl, lse: O.prefix_lm(q, k, v, p=7, impl=impl, return_lse=lse)
    if name == "document":
        q, k, v = _qkv(g, B, n)
        doc = torch.sort(torch.randint(0, 5, (*B, n), generator=g), dim=-1).values
        return lambda impl, lse: O.document(q, k, v, doc=doc, impl=impl, return_lse=lse)
    if name == "alibi":
        q, k, v = _qkv(g, B, n, heads=4)
        return lambda impl, lse: O.alibi(q, k, v, impl=impl, return_lse=lse)
    if name == "alibi_causal":
        q, k, v = _qkv(g, B, n, heads=4)
        return lambda impl, lse: O.alibi(q, k, v, causal=True, impl=impl, return_lse=lse)
    if name == "softcap":
        q, k, v = _qkv(g, B, n, qscale=4.0)  # large scores so that the cap matters
        return lambda impl, lse: O.softcap(q, k, v, c=2.0, impl=impl, return_lse=lse)
    if name == "softcap_causal":
        q, k, v = _qkv(g, B, n, qscale=4.0)
        return lambda impl, lse: O.softcap(q, k, v, c=2.0, causal=True, impl=impl, return_lse=lse)
    if name == "relative_bias":
        q, k, v = _qkv(g, B, n, heads=3)
        bias = _randn(g, 3, 2 * n - 1)
        return lambda impl, lse: O.relative_bias(q, k, v, bias=bias, impl=impl, return_lse=lse)
    if name == "relative_bias_batched_ragged":
        q, k, v = _qkv(g, B, n, n + 4, heads=3)
        bias = _randn(g, *B, 3, n + (n + 4) - 1)
        return lambda impl, lse: O.relative_bias(q, k, v, bias=bias, impl=impl, return_lse=lse)
    if name == "gqa":
        q, k, v = _qkv(g, B, n, heads=4, kv_heads=2)
        return lambda impl, lse: O.gqa(q, k, v, impl=impl, return_lse=lse)
    if name == "mqa":
        q, k, v = _qkv(g, B, n, heads=4, kv_heads=1)
        return lambda impl, lse: O.gqa(q, k, v, impl=impl, return_lse=lse)
    if name == "gqa_alibi":
        q, k, v = _qkv(g, B, n, heads=4, kv_heads=2)
        return lambda impl, lse: O.gqa(q, k, v, causal=True, alibi=True, impl=impl, return_lse=lse)
    if name == "ring_local":
        q, k, v = _qkv(g, B, n)
        return lambda impl, lse: O.ring_local(q, k, v, k_win=4, impl=impl, return_lse=lse)
    if name == "pi_attention":
        q, k, v = _qkv(g, B, n)
        wg = _randn(g, D)
        return lambda impl, lse: O.pi_attention(q, k, v, wg, k_win=4, s=3, T=None, bg=0.3, impl=impl)
    if name == "pi_attention_T2":
        q, k, v = _qkv(g, B, n)
        wg = _randn(g, D)
        return lambda impl, lse: O.pi_attention(q, k, v, wg, k_win=5, s=4, T=2, bg=-0.2, impl=impl)
    raise KeyError(name)


SOFTMAX_CASES = [
    "causal", "causal_top_left_ragged", "causal_bottom_right_longer_k", "causal_bottom_right_shorter_k",
    "sliding_window", "dilated_window", "global_window", "prefix_lm", "document", "alibi", "alibi_causal",
    "softcap", "softcap_causal", "relative_bias", "relative_bias_batched_ragged", "gqa", "mqa", "gqa_alibi",
    "ring_local", "pi_attention", "pi_attention_T2",
]
NO_LSE = {"pi_attention", "pi_attention_T2"}


@pytest.mark.parametrize("n", NS)
@pytest.mark.parametrize("name", SOFTMAX_CASES)
def test_flex_equals_explicit(name, n):
    call = _case(name, n)
    if name in NO_LSE:
        a, b = call("flex", False), call("explicit", False)
        assert _maxdiff(a, b) <= TOL
        return
    (a, la), (b, lb) = call("flex", True), call("explicit", True)
    assert _maxdiff(a, b) <= TOL
    assert _maxdiff(la, lb) <= TOL
    assert torch.equal(torch.isinf(la), torch.isinf(lb))  # the same rows are empty


def test_impl_is_checked():
    q = torch.zeros(3, D, dtype=F64)
    with pytest.raises(ValueError):
        O.causal(q, q, q, impl="nope")


# ---------------------------------------------------------------------------------------------------------
# sdpa, explicit formula, and flex itself
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", NS)
def test_sdpa_equals_explicit(n):
    g = _gen(7 + n)
    q, k, v = _qkv(g, (2, 3), n, n + 5)
    assert _maxdiff(O.sdpa(q, k, v), O.masked_softmax_attention(q, k, v)) <= TOL
    assert _maxdiff(O.sdpa(q, k, v, scale=0.3), O.masked_softmax_attention(q, k, v, scale=0.3)) <= TOL
    # the flex helper with no mods is plain softmax attention too, and works without leading axes
    assert _maxdiff(O.flex_oracle(q[0, 0], k[0, 0], v[0, 0]), O.sdpa(q[0, 0], k[0, 0], v[0, 0])) <= TOL
    # is_causal in SDPA is top-left
    q, k, v = _qkv(g, (2,), n)
    assert _maxdiff(O.sdpa(q, k, v, is_causal=True), O.causal(q, k, v, impl="explicit")) <= TOL


def test_explicit_accepts_tensor_mask_and_scores():
    g = _gen(3)
    q, k, v = _qkv(g, (2,), 9, 11)
    i, j = torch.arange(9)[:, None], torch.arange(11)[None, :]
    s = q @ k.transpose(-1, -2) / math.sqrt(D)
    a = O.masked_softmax_attention(q, k, v, mask=(j <= i), score=s * 0.5)
    b = O.masked_softmax_attention(q, k, v, mask=lambda i, j: j <= i, score=lambda s, i, j: s * 0.5)
    c = O.masked_softmax_attention(q, k, v, mask=lambda i, j: j <= i, scale=0.5 / math.sqrt(D))
    assert _maxdiff(a, b) <= TOL and _maxdiff(a, c) <= TOL


def test_flex_eager_float64_cpu_facts():
    """What the oracles rely on: eager flex_attention runs on CPU in float64, wants 4-D tensors, and gives 0
    (lse -inf) for a row whose keys are all masked, whether masked by mask_mod or by a -inf score_mod."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    g = _gen(11)
    q, k, v = _qkv(g, (1, 2), 17)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        o = flex_attention(q, k, v)
        assert o.dtype == F64
        assert _maxdiff(o, F.scaled_dot_product_attention(q, k, v)) <= TOL

        bm = create_block_mask(lambda b, h, qi, kv: (kv <= qi) & (qi != 3), 1, 2, 17, 17, device="cpu")
        o = flex_attention(q, k, v, block_mask=bm)
        assert torch.all(o[:, :, 3] == 0)
        o2 = flex_attention(q, k, v, score_mod=lambda s, b, h, qi, kv: torch.where(
            (kv <= qi) & (qi != 3), s, torch.full_like(s, float("-inf"))))
        assert torch.all(o2[:, :, 3] == 0)
        assert _maxdiff(o, o2) <= TOL
    _, lse = O.flex_oracle(q, k, v, mask_mod=lambda b, h, qi, kv: (kv <= qi) & (qi != 3), return_lse=True)
    assert torch.all(torch.isneginf(lse[:, :, 3]))
    assert torch.isfinite(lse[:, :, :3]).all() and torch.isfinite(lse[:, :, 4:]).all()
    # lse is the natural-log log-sum-exp of the scaled scores
    _, lse = O.flex_oracle(q, k, v, return_lse=True)
    ref = torch.logsumexp(q @ k.transpose(-1, -2) / math.sqrt(D), dim=-1)
    assert _maxdiff(lse, ref) <= TOL


def test_empty_rows_give_zero_everywhere():
    g = _gen(12)
    q, k, v = _qkv(g, (2,), 20, 6)
    for impl in ("flex", "explicit"):
        o, lse = O.causal(q, k, v, bottom_right=True, impl=impl, return_lse=True)
        assert torch.all(o[:, :14] == 0) and torch.all(torch.isneginf(lse[:, :14]))
        assert torch.isfinite(lse[:, 14:]).all()
    # PiAttention: with g ~ 0 only the skip branch is left, and it is empty for i < s
    q, k, v = _qkv(g, (2,), 20)
    wg = torch.zeros(D, dtype=F64)
    for impl in ("flex", "explicit"):
        o = O.pi_attention(q, k, v, wg, k_win=3, s=5, bg=-80.0, impl=impl)
        assert o[:, :5].abs().max() <= TOL
        assert o[:, 5:].abs().min(dim=-1).values.min() > 0


# ---------------------------------------------------------------------------------------------------------
# relations between variants (each side computed by its own oracle)
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("impl", ["flex", "explicit"])
def test_variant_relations(impl):
    g = _gen(21)
    n = 33
    q, k, v = _qkv(g, (2,), n)
    caus = O.causal(q, k, v, impl=impl)
    assert _maxdiff(O.sliding_window(q, k, v, w=n, impl=impl), caus) <= TOL
    win6 = O.sliding_window(q, k, v, w=6, impl=impl)
    assert _maxdiff(O.dilated_window(q, k, v, w=6, r=1, impl=impl), win6) <= TOL
    assert _maxdiff(O.prefix_lm(q, k, v, p=0, impl=impl), caus) <= TOL
    assert _maxdiff(O.prefix_lm(q, k, v, p=1, impl=impl), caus) <= TOL
    assert _maxdiff(O.document(q, k, v, torch.zeros(n, dtype=torch.long), impl=impl), caus) <= TOL
    assert _maxdiff(O.ring_local(q, k, v, k_win=7, impl=impl), win6) <= TOL
    full = O.sdpa(q, k, v)
    no_glob = torch.zeros(n, dtype=torch.bool)
    assert _maxdiff(O.global_window(q, k, v, w=n, glob=no_glob, impl=impl), full) <= TOL
    all_glob = torch.ones(n, dtype=torch.bool)
    assert _maxdiff(O.global_window(q, k, v, w=0, glob=all_glob, impl=impl), full) <= TOL
    assert (O.softcap(q, k, v, c=1e9, impl=impl) - full).abs().max() <= 1e-9
    # heads
    qh, kh, vh = _qkv(g, (2,), n, heads=4)
    fullh = O.sdpa(qh, kh, vh)
    zero_bias = torch.zeros(4, 2 * n - 1, dtype=F64)
    assert _maxdiff(O.relative_bias(qh, kh, vh, zero_bias, impl=impl), fullh) <= TOL
    assert _maxdiff(O.gqa(qh, kh, vh, impl=impl), fullh) <= TOL
    kk, vv = kh[..., :1, :, :], vh[..., :1, :, :]
    assert _maxdiff(O.gqa(qh, kk, vv, impl=impl), O.sdpa(qh, kk.expand_as(kh), vv.expand_as(vh))) <= TOL
    # ALiBi is a relative bias: bias[h, i - j + n - 1] = (j - i) * slope_h
    rel = torch.arange(2 * n - 1, dtype=F64) - (n - 1)  # = i - j
    bias = -rel[None, :] * O.alibi_slopes(4)[:, None]
    assert _maxdiff(O.alibi(qh, kh, vh, impl=impl), O.relative_bias(qh, kh, vh, bias, impl=impl)) <= TOL
    # PiAttention: T >= n / s is unbounded; a huge gate bias leaves the local branch only
    wg = _randn(g, D)
    a = O.pi_attention(q, k, v, wg, k_win=4, s=3, T=None, impl=impl)
    b = O.pi_attention(q, k, v, wg, k_win=4, s=3, T=1000000, impl=impl)
    assert _maxdiff(a, b) <= TOL
    local = O.ring_local(q, k, v, 4, impl=impl)
    assert _maxdiff(O.pi_attention(q, k, v, wg, 4, 3, bg=80.0, impl=impl), local) <= TOL


def test_pi_attention_direct_loop():
    g = _gen(31)
    n, k_win, s, T, bg = 23, 4, 3, 2, 0.1
    q, k, v = _qkv(g, (), n)
    wg = _randn(g, D)
    got = O.pi_attention(q, k, v, wg, k_win, s, T, bg)

    def branch(i, keys):
        if not keys:
            return torch.zeros(E, dtype=F64)
        sc = torch.stack([q[i] @ k[j] / math.sqrt(D) for j in keys])
        p = torch.softmax(sc, 0)
        return sum(p[t] * v[j] for t, j in enumerate(keys))

    for i in range(n):
        loc = [j for j in range(n) if i - k_win < j <= i]
        skp = [i - t * s for t in range(1, T + 1) if i - t * s >= 0]
        gi = torch.sigmoid(q[i] @ wg + bg)
        want = gi * branch(i, loc) + (1 - gi) * branch(i, skp)
        assert (got[i] - want).abs().max() <= TOL


# ---------------------------------------------------------------------------------------------------------
# BLA
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("W", [1, 3, 5, 9])
def test_dirichlet_kernel(W):
    for M in range(1, W + 1, 2):
        x = torch.arange(-W + 1, W, dtype=F64)
        Dx = O.dirichlet(x, W, M)
        assert Dx[W - 1].item() == M / W
        assert abs(Dx[W - 1:].sum().item() - 1.0) <= TOL  # sums to 1 over one period
        for xv, dv in zip(x.tolist(), Dx.tolist()):
            if xv != 0:
                want = math.sin(math.pi * M * xv / W) / (W * math.sin(math.pi * xv / W))
                assert abs(dv - want) <= TOL
        if M == W and W > 1:  # a delta: zero at every nonzero offset
            assert Dx[torch.arange(2 * W - 1) != W - 1].abs().max().item() <= TOL


@pytest.mark.parametrize("n", NS)
@pytest.mark.parametrize("W", [1, 5, 9])
def test_bla_full_band_is_sliding_window(n, W):
    g = _gen(41 + n + W)
    q, k, v = _qkv(g, (2,), n)
    a, la = O.bla(q, k, v, W=W, M=W, return_lse=True)
    b, lb = O.sliding_window(q, k, v, w=W - 1, return_lse=True)
    assert _maxdiff(a, b) <= TOL
    assert _maxdiff(la, lb) <= TOL


@pytest.mark.parametrize("W,M", [(6, 3), (5, 1), (7, 5)])
def test_bla_direct_loop(W, M):
    g = _gen(51 + W + M)
    n = 17
    q, k, v = _qkv(g, (), n)
    got = O.bla(q, k, v, W=W, M=M)
    Q, K, V = q.tolist(), k.tolist(), v.tolist()

    def Dk(x):
        return M / W if x % W == 0 else math.sin(math.pi * M * x / W) / (W * math.sin(math.pi * x / W))

    for t in range(n):
        khat, vhat = [], []
        for j in range(W):
            kj, vj = [0.0] * D, [0.0] * E
            for tau in range(W):
                if t - tau >= 0:
                    kj = [a + Dk(j - tau) * b for a, b in zip(kj, K[t - tau])]
                    vj = [a + Dk(j - tau) * b for a, b in zip(vj, V[t - tau])]
            khat.append(kj)
            vhat.append(vj)
        sc = [sum(a * b for a, b in zip(Q[t], khat[j])) / math.sqrt(D) for j in range(W) if j <= t]
        mx = max(sc)
        ex = [math.exp(x - mx) for x in sc]
        want = [sum(ex[j] * vhat[j][c] for j in range(len(sc))) / sum(ex) for c in range(E)]
        assert max(abs(a - b) for a, b in zip(got[t].tolist(), want)) <= TOL


# ---------------------------------------------------------------------------------------------------------
# power and linear attention
# ---------------------------------------------------------------------------------------------------------


def _power_loop(q, k, v, p, G=None, eps=0.0, scale=1.0):
    Q, K, V = q.tolist(), k.tolist(), v.tolist()
    Gl = None if G is None else G.tolist()
    out = []
    for i in range(len(Q)):
        num, den = [0.0] * len(V[0]), 0.0
        for j in range(i + 1):
            a = (scale * sum(x * y for x, y in zip(Q[i], K[j]))) ** p
            if Gl is not None:
                a *= math.exp(Gl[i] - Gl[j])
            num = [x + a * y for x, y in zip(num, V[j])]
            den += a
        den += eps
        out.append([x / den if den != 0 else 0.0 for x in num])
    return torch.tensor(out, dtype=F64)


@pytest.mark.parametrize("n", NS)
def test_power_attention_loop(n):
    g = _gen(61 + n)
    q, k, v = _qkv(g, (2,), n)
    G = torch.cumsum(torch.log(torch.sigmoid(_randn(g, 2, n) + 2.0)), dim=-1)
    cases = [{"p": 2}, {"p": 2, "G": G}, {"p": 2, "G": G, "eps": 1e-3, "scale": 0.5},
             {"p": 4, "scale": 1 / math.sqrt(D)}]
    for kw in cases:
        got = O.power_attention(q, k, v, **kw)
        for b in range(2):
            kwb = dict(kw, G=kw["G"][b]) if "G" in kw else kw
            want = _power_loop(q[b], k[b], v[b], **kwb)
            assert (got[b] - want).abs().max().item() <= 1e-12 * max(1.0, want.abs().max().item())


def test_power_attention_zero_denominator_and_bottom_right():
    q = torch.zeros(4, D, dtype=F64)
    k = torch.randn(4, D, dtype=F64)
    v = torch.randn(4, E, dtype=F64)
    assert torch.all(O.power_attention(q, k, v, p=2) == 0)
    g = _gen(62)
    q, k, v = _qkv(g, (), 6, 10)
    a = O.power_attention(q, k, v, p=2, bottom_right=True)
    # bottom-right == top-left on the last n queries of a padded length-m query block
    qpad = torch.cat([torch.zeros(4, D, dtype=F64), q], dim=0)
    b = O.power_attention(qpad, k, v, p=2)[4:]
    assert _maxdiff(a, b) <= TOL


@pytest.mark.parametrize("n", NS)
@pytest.mark.parametrize("phi_name", ["elu1", "relu"])
def test_linear_attention_recurrent(n, phi_name):
    g = _gen(71 + n)
    q, k, v = _qkv(g, (2,), n)
    phi = None if phi_name == "elu1" else torch.relu
    phif = (lambda x: F.elu(x) + 1) if phi is None else phi
    for eps in (1e-6, 0.0):
        got = O.linear_attention(q, k, v, phi=phi, eps=eps)
        fq, fk = phif(q), phif(k)
        S = torch.zeros(2, D, E, dtype=F64)
        z = torch.zeros(2, D, dtype=F64)
        for i in range(n):
            S = S + fk[:, i, :, None] * v[:, i, None, :]
            z = z + fk[:, i]
            num = torch.einsum("bd,bde->be", fq[:, i], S)
            den = (fq[:, i] * z).sum(-1, keepdim=True) + eps
            want = torch.where(den != 0, num / torch.where(den != 0, den, 1.0), 0.0)
            assert (got[:, i] - want).abs().max().item() <= TOL
    # with eps = 0, linear attention is power attention of degree 1 on the features phi(q), phi(k)
    fq, fk = phif(q), phif(k)
    assert _maxdiff(O.linear_attention(q, k, v, phi=phi, eps=0.0),
                    O.power_attention(fq, fk, v, p=1)) <= TOL


# ---------------------------------------------------------------------------------------------------------
# ring merge
# ---------------------------------------------------------------------------------------------------------


def _shards(m, parts):
    edges = [round(m * t / parts) for t in range(parts + 1)]
    return [(a, b) for a, b in itertools.pairwise(edges) if b > a]


@pytest.mark.parametrize("n", NS)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("parts", [2, 3])
def test_ring_merge_equals_full(n, causal, parts):
    g = _gen(81 + n)
    m = n if causal else n + 6
    q, k, v = _qkv(g, (2, 2), n, m)
    if causal:
        full_o, full_l = O.causal(q, k, v, impl="explicit", return_lse=True)
    else:
        full_o, full_l = O.masked_softmax_attention(q, k, v, return_lse=True)
        assert _maxdiff(full_o, O.sdpa(q, k, v)) <= TOL
    acc_o = torch.zeros_like(full_o)
    acc_l = torch.full_like(full_l, float("-inf"))  # the merge identity: no keys yet
    for a, b in _shards(m, parts):
        ks, vs = k[..., a:b, :], v[..., a:b, :]
        if causal:  # shard keys sit at global positions a..b-1; the flex path checks the same partials
            po, pl = O.masked_softmax_attention(q, ks, vs, lambda i, j, a=a: j + a <= i,
                                                return_lse=True)
            fo, fl = O.flex_oracle(q, ks, vs, mask_mod=lambda bb, h, qi, kv, a=a: kv + a <= qi,
                                   return_lse=True)
            assert _maxdiff(po, fo) <= TOL and _maxdiff(pl, fl) <= TOL
        else:
            po, pl = O.masked_softmax_attention(q, ks, vs, return_lse=True)
        acc_o, acc_l = O.ring_merge(acc_o, acc_l, po, pl)
    assert _maxdiff(acc_o, full_o) <= TOL
    assert _maxdiff(acc_l, full_l) <= TOL


def test_ring_merge_edge_cases():
    g = _gen(91)
    o1, o2 = _randn(g, 3, E), _randn(g, 3, E)
    ninf = float("-inf")
    l1 = torch.tensor([0.5, ninf, ninf], dtype=F64)
    l2 = torch.tensor([ninf, 1.5, ninf], dtype=F64)
    o, lse = O.ring_merge(o1, l1, o2, l2)
    assert torch.equal(o[0], o1[0]) and torch.equal(o[1], o2[1]) and torch.all(o[2] == 0)
    assert lse[0].item() == 0.5 and lse[1].item() == 1.5 and torch.isneginf(lse[2])
    # symmetric, and merging equal halves keeps O and adds log 2
    l = torch.tensor([0.3, -2.0, 4.0], dtype=F64)
    o, lse = O.ring_merge(o1, l, o1, l)
    assert _maxdiff(o, o1) <= TOL and _maxdiff(lse, l + math.log(2)) <= TOL
    a = O.ring_merge(o1, l, o2, l1)
    b = O.ring_merge(o2, l1, o1, l)
    assert _maxdiff(a[0], b[0]) <= TOL and _maxdiff(a[1], b[1]) <= TOL
