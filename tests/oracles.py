"""Independent float64 reference implementations of every variant in docs/variants.md.

Written straight from the variants' definitions (docs/variants.md states each one), never from moa code: nothing
here imports moa. Every function takes tensors with optional leading batch (and, for the head-aware variants,
head) axes, computes in float64 on whatever device the inputs live on, and returns float64.

Shapes: q [..., n, d], k [..., m, d], v [..., m, e] -> O [..., n, e]. The leading axes of q, k, v broadcast.
Head-aware variants (alibi, relative_bias, gqa) take q [..., H, n, d] and k/v [..., H or G, m, *].

Conventions (docs/variants.md):
  * s_ij = scale * q_i . k_j, scale = 1/sqrt(d) unless given;
  * "causal" is top-left (j <= i) unless stated;
  * a softmax over a row with no admissible key gives 0 (and its log-sum-exp is -inf);
  * a normalisation (power / linear attention) with a zero denominator gives 0.

Softmax family: each oracle has two independent paths selected by ``impl``:
  * ``impl="flex"`` (default): EAGER ``torch.nn.attention.flex_attention.flex_attention`` (its unfused math
    path, float64, works on CPU) with score_mod / mask_mod written here;
  * ``impl="explicit"``: the same definition written a second time as dense index tensors and evaluated by
    :func:`masked_softmax_attention` (materialised scores, explicit max-shifted softmax).
The two are cross-checked in tests/test_oracles.py.

Facts about eager flex_attention (torch 2.13, CPU, float64), checked in tests/test_oracles.py:
  * it runs without torch.compile (warns that it materialises the score matrix; we silence that warning),
    keeps float64 throughout (agrees with an explicit formula to ~1e-16);
  * it requires 4-D [B, H, n, d] tensors ("NYI: query, key, and value must be 4D tensors"), so the helpers
    here flatten leading axes into B (H = 1 for head-agnostic variants) and restore them afterwards;
  * rows whose keys are all masked (by mask_mod, or by a score_mod returning -inf) come out as exactly 0, with
    lse = -inf;
  * the mask_mod is applied element-wise (not only per 128-block), and score_mod receives the already scaled
    score; index arguments are int64 tensors, so score_mod arithmetic must be cast to float64 explicitly
    (``-8 * (h + 1) / H`` on an int tensor is float32!).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

try:  # pytest's default (prepend) import mode puts tests/ on sys.path
    from oracle_core import (
        F64, NEG_INF, _check_impl, _f64, _ij, _safe_div, _scale, _softmax_rows, flex_oracle,
        masked_softmax_attention, ring_merge)
except ImportError:  # pragma: no cover
    from tests.oracle_core import (
        F64, NEG_INF, _check_impl, _f64, _ij, _safe_div, _scale, _softmax_rows, flex_oracle,
        masked_softmax_attention, ring_merge)

__all__ = [
    "alibi",
    "alibi_slopes",
    "bla",
    "causal",
    "dilated_window",
    "dirichlet",
    "document",
    "flex_oracle",
    "global_window",
    "gqa",
    "linear_attention",
    "masked_softmax_attention",
    "pi_attention",
    "power_attention",
    "prefix_lm",
    "relative_bias",
    "ring_local",
    "retention",
    "ring_merge",
    "sdpa",
    "sigmoid_attention",
    "sliding_window",
    "softcap",
]


# ---------------------------------------------------------------------------------------------------------
# softmax family
# ---------------------------------------------------------------------------------------------------------


def sdpa(q, k, v, *, is_causal=False, scale=None):
    """O = softmax(s) V via ``F.scaled_dot_product_attention`` in float64 (is_causal is top-left)."""
    q, k, v = _f64(q, k, v)
    return F.scaled_dot_product_attention(q, k, v, is_causal=is_causal, scale=scale)


def causal(q, k, v, bottom_right=False, *, impl="flex", scale=None, return_lse=False):
    """Causal mask j <= i (top-left); bottom_right: j <= i + m - n (rows with no key -> 0)."""
    _check_impl(impl)
    n, m = q.shape[-2], k.shape[-2]
    off = (m - n) if bottom_right else 0
    if impl == "explicit":
        return masked_softmax_attention(q, k, v, lambda i, j: j <= i + off, scale=scale,
                                        return_lse=return_lse)
    return flex_oracle(q, k, v, mask_mod=lambda b, h, qi, kv: kv <= qi + off, scale=scale,
                       return_lse=return_lse)


def sliding_window(q, k, v, w, *, impl="flex", scale=None, return_lse=False):
    """j <= i and i - j <= w: w + 1 keys including self (attention-gym convention)."""
    _check_impl(impl)
    if impl == "explicit":
        return masked_softmax_attention(q, k, v, lambda i, j: (j <= i) & (i - j <= w), scale=scale,
                                        return_lse=return_lse)
    return flex_oracle(q, k, v, mask_mod=lambda b, h, qi, kv: (kv <= qi) & (qi - kv <= w), scale=scale,
                       return_lse=return_lse)


def dilated_window(q, k, v, w, r, *, impl="flex", scale=None, return_lse=False):
    """j <= i and i - j <= w and (i - j) % r == 0."""
    _check_impl(impl)
    if impl == "explicit":
        def mask(i, j):
            dist = i - j
            return (dist >= 0) & (dist <= w) & (torch.remainder(dist, r) == 0)
        return masked_softmax_attention(q, k, v, mask, scale=scale, return_lse=return_lse)

    def mask_mod(b, h, qi, kv):
        return (kv <= qi) & (qi - kv <= w) & ((qi - kv) % r == 0)
    return flex_oracle(q, k, v, mask_mod=mask_mod, scale=scale, return_lse=return_lse)


def global_window(q, k, v, w, glob, *, impl="flex", scale=None, return_lse=False):
    """Longformer: abs(i - j) <= w or glob[i] or glob[j]; glob [..., n] bool (self-attention, n == m)."""
    _check_impl(impl)
    glob = glob.to(torch.bool)
    if impl == "explicit":
        def mask(i, j):
            gi = glob.unsqueeze(-1)  # [..., n, 1]
            gj = glob.unsqueeze(-2)  # [..., 1, m]
            return ((i - j).abs() <= w) | gi | gj
        return masked_softmax_attention(q, k, v, mask, scale=scale, return_lse=return_lse)

    def mask_mod(b, h, qi, kv, g):
        return ((qi - kv).abs() <= w) | g[b, qi] | g[b, kv]
    return flex_oracle(q, k, v, mask_mod=mask_mod, extras=[(glob, 1)], scale=scale, return_lse=return_lse)


def prefix_lm(q, k, v, p, *, impl="flex", scale=None, return_lse=False):
    """Prefix-LM: j < p or j <= i."""
    _check_impl(impl)
    if impl == "explicit":
        return masked_softmax_attention(q, k, v, lambda i, j: (j < p) | (j <= i), scale=scale,
                                        return_lse=return_lse)
    return flex_oracle(q, k, v, mask_mod=lambda b, h, qi, kv: (kv < p) | (kv <= qi), scale=scale,
                       return_lse=return_lse)


def document(q, k, v, doc, *, impl="flex", scale=None, return_lse=False):
    """Document mask: doc[i] == doc[j] and j <= i; doc [..., n] int (sorted), self-attention."""
    _check_impl(impl)
    if impl == "explicit":
        def mask(i, j):
            return (doc.unsqueeze(-1) == doc.unsqueeze(-2)) & (j <= i)
        return masked_softmax_attention(q, k, v, mask, scale=scale, return_lse=return_lse)

    def mask_mod(b, h, qi, kv, dc):
        return (dc[b, qi] == dc[b, kv]) & (kv <= qi)
    return flex_oracle(q, k, v, mask_mod=mask_mod, extras=[(doc, 1)], scale=scale, return_lse=return_lse)


def alibi_slopes(H: int, device=None):
    """2^(-8 (h + 1) / H) for h in 0..H-1, float64."""
    h = torch.arange(H, dtype=F64, device=device)
    return torch.exp2(-8.0 * (h + 1.0) / H)


def alibi(q, k, v, *, causal=False, impl="flex", scale=None, return_lse=False):
    """ALiBi: s_ij + (j - i) * 2^(-8 (h+1)/H) for head h of H; q/k/v [..., H, n, *]. No mask unless causal."""
    return gqa(q, k, v, causal=causal, alibi=True, impl=impl, scale=scale, return_lse=return_lse)


def softcap(q, k, v, c, *, causal=False, impl="flex", scale=None, return_lse=False):
    """Softcapping: c * tanh(s_ij / c). No mask unless causal (top-left)."""
    _check_impl(impl)
    c = float(c)
    if impl == "explicit":
        mask = (lambda i, j: j <= i) if causal else None
        return masked_softmax_attention(q, k, v, mask, lambda s, i, j: c * torch.tanh(s / c), scale=scale,
                                        return_lse=return_lse)
    mask_mod = (lambda b, h, qi, kv: kv <= qi) if causal else None
    return flex_oracle(q, k, v, score_mod=lambda s, b, h, qi, kv: c * torch.tanh(s / c), mask_mod=mask_mod,
                       scale=scale, return_lse=return_lse)


def relative_bias(q, k, v, bias, *, impl="flex", scale=None, return_lse=False):
    """s_ij + bias[h, i - j + m - 1]; q [..., H, n, d], k/v [..., H, m, *], bias [..., H, n + m - 1]."""
    _check_impl(impl)
    bias = bias.to(F64)
    m = k.shape[-2]
    if impl == "explicit":
        def score(s, i, j):
            idx = (i - j + m - 1)  # [n, m]
            return s + bias[..., idx]  # [..., H, n, m]
        return masked_softmax_attention(q, k, v, None, score, scale=scale, return_lse=return_lse)

    def score_mod(s, b, h, qi, kv, bs):
        return s + bs[b, h, qi - kv + m - 1]
    return flex_oracle(q, k, v, score_mod=score_mod, heads=True, extras=[(bias, 2)], scale=scale,
                       return_lse=return_lse)


def gqa(q, k, v, *, causal=False, alibi=False, impl="flex", scale=None, return_lse=False):
    """GQA / MQA: q [..., H, n, d], k/v [..., G, m, *]; query head a uses kv head a // (H / G).

    causal=True adds the top-left mask j <= i, alibi=True the ALiBi bias of query head a of H (this pair is
    examples/gqa_alibi.moa).
    """
    _check_impl(impl)
    H, G = q.shape[-3], k.shape[-3]
    if H % G:
        raise ValueError(f"query heads H={H} not a multiple of kv heads G={G}")
    if impl == "explicit":
        k2 = k.repeat_interleave(H // G, dim=-3)
        v2 = v.repeat_interleave(H // G, dim=-3)
        slopes = alibi_slopes(H, q.device).view(H, 1, 1)
        score = (lambda s, i, j: s + slopes * (j - i).to(F64)) if alibi else None
        mask = (lambda i, j: j <= i) if causal else None
        return masked_softmax_attention(q, k2, v2, mask, score, scale=scale, return_lse=return_lse)

    def score_mod(s, b, h, qi, kv):
        slope = torch.exp2(-8.0 * (h.to(F64) + 1.0) / H)
        return s + (kv - qi).to(F64) * slope
    return flex_oracle(q, k, v, score_mod=score_mod if alibi else None,
                       mask_mod=(lambda b, h, qi, kv: kv <= qi) if causal else None,
                       heads=True, scale=scale, return_lse=return_lse)


# ---------------------------------------------------------------------------------------------------------
# PiAttention
# ---------------------------------------------------------------------------------------------------------


def ring_local(q, k, v, k_win, *, impl="flex", scale=None, return_lse=False):
    """PiAttention's local branch alone: L(i) = { j : i - k < j <= i } (k keys including self)."""
    _check_impl(impl)
    if impl == "explicit":
        return masked_softmax_attention(q, k, v, lambda i, j: (j <= i) & (j > i - k_win), scale=scale,
                                        return_lse=return_lse)
    return flex_oracle(q, k, v, mask_mod=lambda b, h, qi, kv: (kv <= qi) & (kv > qi - k_win), scale=scale,
                       return_lse=return_lse)


def _pi_skips(q, k, v, s, T, impl, scale):
    """Skip branch: softmax over P(i) = { i - t*s : 1 <= t <= T, j >= 0 } (T None = unbounded)."""
    if impl == "explicit":
        def mask(i, j):
            dist = i - j
            ok = (dist >= 1) & (torch.remainder(dist, s) == 0)
            if T is not None:
                ok = ok & (dist <= T * s)
            return ok
        return masked_softmax_attention(q, k, v, mask, scale=scale)

    def mask_mod(b, h, qi, kv):
        dist = qi - kv
        ok = (dist > 0) & (dist % s == 0)
        if T is not None:
            ok = ok & (dist // s <= T)
        return ok
    return flex_oracle(q, k, v, mask_mod=mask_mod, scale=scale)


def pi_attention(q, k, v, wg, k_win, s, T=None, bg=0.0, *, impl="flex", scale=None):
    """PiAttention (our reading of arXiv 2511.10696, stated in docs/variants.md).

    O_i = g_i * softmax_{L(i)}(s_ij) V + (1 - g_i) * softmax_{P(i)}(s_ij) V, g_i = sigmoid(q_i . wg + bg),
    L(i) = { j : i - k_win < j <= i }, P(i) = { i - t*s : 1 <= t <= T, j >= 0 } (T None: unbounded).
    Rows with empty P(i) (i < s) get 0 from the skip branch. wg [..., d] (per head if it has a head axis).
    """
    _check_impl(impl)
    q, k, v, wg = _f64(q, k, v, wg)
    local = ring_local(q, k, v, k_win, impl=impl, scale=scale)
    skips = _pi_skips(q, k, v, s, T, impl, scale)
    g = torch.sigmoid((q * wg.unsqueeze(-2)).sum(-1) + float(bg)).unsqueeze(-1)  # [..., n, 1]
    return g * local + (1.0 - g) * skips


# ---------------------------------------------------------------------------------------------------------
# Blurry Window Attention
# ---------------------------------------------------------------------------------------------------------


def dirichlet(x, W: int, M: int):
    """D(x) = sin(pi M x / W) / (W sin(pi x / W)), D(x) = M / W where x is a multiple of W (period W)."""
    x = torch.as_tensor(x, dtype=F64)
    at0 = torch.remainder(x, W) == 0
    den = W * torch.sin(math.pi * x / W)
    val = torch.sin(math.pi * M * x / W) / torch.where(at0, torch.ones_like(den), den)
    return torch.where(at0, torch.full_like(x, M / W), val)


def bla(q, k, v, W, M, *, scale=None, return_lse=False):
    """Blurry Window Attention (our reading of arXiv 2606.09862, stated in docs/variants.md).

    khat_t(j) = sum_{tau=0}^{W-1} D(j - tau) k_{t-tau} (k_{t-tau} = 0 for t - tau < 0), vhat likewise,
    slots j in 0..W-1, slot j admissible iff j <= t; O_t = sum_j softmax_j(scale q_t . khat_t(j)) vhat_t(j).
    q [..., n, d], k [..., n, d], v [..., n, e].
    """
    q, k, v = _f64(q, k, v)
    n, d = q.shape[-2:]
    dev = q.device
    t = torch.arange(n, device=dev).unsqueeze(-1)        # [n, 1]
    tau = torch.arange(W, device=dev).unsqueeze(0)       # [1, W]
    src = t - tau                                        # [n, W]: token index k_{t - tau}
    valid = (src >= 0).to(F64).unsqueeze(-1)             # [n, W, 1]
    srcc = src.clamp(min=0)
    kwin = k[..., srcc, :] * valid                       # [..., n, W(tau), d]
    vwin = v[..., srcc, :] * valid                       # [..., n, W(tau), e]
    slot = torch.arange(W, device=dev)
    Dm = dirichlet((slot.unsqueeze(-1) - slot.unsqueeze(0)).to(F64), W, M).to(dev)  # [W(j), W(tau)]
    khat = torch.einsum("jT,...tTd->...tjd", Dm, kwin)   # [..., n, W(j), d]
    vhat = torch.einsum("jT,...tTe->...tje", Dm, vwin)
    sc = torch.einsum("...td,...tjd->...tj", q, khat) * _scale(d, scale)  # [..., n, W]
    admissible = slot.unsqueeze(0) <= t                  # [n, W]
    sc = torch.where(admissible, sc, torch.full_like(sc, NEG_INF))
    p, lse = _softmax_rows(sc)
    o = torch.einsum("...tj,...tje->...te", p, vhat)
    return (o, lse) if return_lse else o


# ---------------------------------------------------------------------------------------------------------
# Power / linear attention (normalised, no softmax)
# ---------------------------------------------------------------------------------------------------------


def power_attention(q, k, v, p, G=None, eps=0.0, scale=1.0, *, bottom_right=False):
    """Power attention (arXiv 2507.04239), causal.

    A_ij = (scale q_i . k_j)^p * exp(G_i - G_j) for j <= i (j <= i + m - n with bottom_right), else 0.
    O_i = sum_j A_ij v_j / (sum_j A_ij + eps); a zero denominator gives 0.
    G: optional log-gates [..., m] (cumulative, G_i = sum_{t<=i} log gate_t) over key positions; query i uses
    G at its own position (i, or i + m - n with bottom_right; n == m is the usual case).
    """
    q, k, v, G = _f64(q, k, v, G)
    n, m = q.shape[-2], k.shape[-2]
    off = (m - n) if bottom_right else 0
    i, j = _ij(n, m, q.device)
    mask = j <= i + off
    a = ((q @ k.transpose(-1, -2)) * float(scale)) ** p
    if G is not None:
        pos = (torch.arange(n, device=q.device) + off).clamp(0, m - 1)  # query i sits at key position i + off
        diff = G[..., pos].unsqueeze(-1) - G.unsqueeze(-2)
        a = a * torch.exp(torch.where(mask, diff, torch.zeros_like(diff)))
    a = torch.where(mask, a, torch.zeros_like(a))
    return _safe_div(a @ v, a.sum(-1, keepdim=True) + eps)


def _elu1(x):
    return F.elu(x) + 1.0


def linear_attention(q, k, v, phi=None, eps=1e-6, *, causal=True):
    """Linear attention (Katharopoulos et al.), quadratic form.

    O_i = phi(q_i)^T S_i / (phi(q_i) . z_i + eps), S_i = sum_{j<=i} phi(k_j) v_j^T, z_i = sum_{j<=i} phi(k_j);
    phi defaults to elu(x) + 1. A zero denominator gives 0. examples/linear.moa is eps = 0 (normalize).
    """
    q, k, v = _f64(q, k, v)
    phi = _elu1 if phi is None else phi
    fq, fk = phi(q), phi(k)
    a = fq @ fk.transpose(-1, -2)
    if causal:
        i, j = _ij(q.shape[-2], k.shape[-2], q.device)
        a = torch.where(j <= i, a, torch.zeros_like(a))
    return _safe_div(a @ v, a.sum(-1, keepdim=True) + eps)


# ---------------------------------------------------------------------------------------------------------
# Unnormalised sums (no softmax, no denominator)
# ---------------------------------------------------------------------------------------------------------


def sigmoid_attention(q, k, v, b=None, *, causal=True, scale=None):
    """Sigmoid attention (Ramapuram et al., arXiv 2409.04431): A_ij = sigmoid(scale q_i . k_j + b) for j <= i
    (every j when not causal), else 0; O = A V with no normaliser. b defaults to -log(n) (n: the key count)."""
    q, k, v = _f64(q, k, v)
    m = k.shape[-2]
    b = -math.log(m) if b is None else float(b)
    a = torch.sigmoid((q @ k.transpose(-1, -2)) * _scale(q.shape[-1], scale) + b)
    if causal:
        i, j = _ij(q.shape[-2], m, q.device)
        a = torch.where(j <= i, a, torch.zeros_like(a))
    return a @ v


def retention(q, k, v, gamma, *, scale=None):
    """Retention (RetNet, arXiv 2307.08621), parallel form, before its group norm: O = (scale Q K^T * D) V with
    D_ij = gamma^(i - j) for j <= i, else 0. q, k, v [..., H, n, *]: gamma is a float or a per-head tensor [H]."""
    q, k, v = _f64(q, k, v)
    n = q.shape[-2]
    i, j = _ij(n, k.shape[-2], q.device)
    g = torch.as_tensor(gamma, dtype=F64, device=q.device).reshape(-1, 1, 1)
    decay = torch.where(j <= i, g ** (i - j).clamp_min(0).to(F64), torch.zeros((), dtype=F64))
    a = (q @ k.transpose(-1, -2)) * _scale(q.shape[-1], scale) * decay
    return a @ v

