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
import warnings

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

try:  # torch >= 2.8
    from torch.nn.attention.flex_attention import AuxRequest
except ImportError:  # pragma: no cover - older torch
    AuxRequest = None

F64 = torch.float64
NEG_INF = float("-inf")

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
    "ring_merge",
    "sdpa",
    "sliding_window",
    "softcap",
]


# ---------------------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------------------


def _f64(*xs):
    return tuple(x.to(F64) if torch.is_tensor(x) else x for x in xs)


def _ij(n: int, m: int, device=None):
    """Index grids i [n, 1], j [1, m] (int64)."""
    i = torch.arange(n, device=device).unsqueeze(-1)
    j = torch.arange(m, device=device).unsqueeze(0)
    return i, j


def _scale(d: int, scale):
    return 1.0 / math.sqrt(d) if scale is None else float(scale)


def _safe_div(num, den):
    """num / den, 0 where den == 0 (den broadcast against num)."""
    ok = den != 0
    return torch.where(ok, num / torch.where(ok, den, torch.ones_like(den)), torch.zeros_like(num))


def _softmax_rows(s):
    """Explicit max-shifted softmax over the last axis: (P, lse). A row with no finite entry gives P = 0 and
    lse = -inf (instead of NaN)."""
    mx = s.amax(dim=-1, keepdim=True)
    mx = torch.where(torch.isfinite(mx), mx, torch.zeros_like(mx))  # empty row: shift by 0, exp(-inf) = 0
    e = torch.exp(s - mx)
    l = e.sum(dim=-1, keepdim=True)
    p = _safe_div(e, l)
    lse = torch.where(l > 0, mx + torch.log(torch.where(l > 0, l, torch.ones_like(l))),
                      torch.full_like(l, NEG_INF))
    return p, lse.squeeze(-1)


def masked_softmax_attention(q, k, v, mask=None, score=None, *, scale=None, return_lse=False):
    """Plain softmax attention, explicitly materialised: O = softmax(where(mask, s, -inf)) @ v.

    q [..., n, d], k [..., m, d], v [..., m, e] (leading axes broadcast).
    mask:  None (all keys), a bool tensor broadcastable to [..., n, m], or a callable ``mask(i, j)`` of index
           grids i [n, 1], j [1, m] returning such a tensor.
    score: None (s = scale * q @ k^T), a tensor broadcastable to [..., n, m] that replaces the scores, or a
           callable ``score(s, i, j)`` returning the modified scores.
    Rows with no admissible key (every entry -inf) give O = 0 and lse = -inf.
    Returns O [..., n, e], or (O, lse [..., n]) with ``return_lse``.
    """
    q, k, v = _f64(q, k, v)
    n, d = q.shape[-2:]
    m = k.shape[-2]
    i, j = _ij(n, m, q.device)
    if score is None or callable(score):
        s = (q @ k.transpose(-1, -2)) * _scale(d, scale)
        if callable(score):
            s = score(s, i, j)
    else:
        s = score.to(F64)
    if mask is not None:
        if callable(mask):
            mask = mask(i, j)
        s = torch.where(mask, s, torch.full_like(s, NEG_INF))
    p, lse = _softmax_rows(s)
    o = p @ v
    return (o, lse) if return_lse else o


def _lead(heads: bool, *xs):
    nb = 3 if heads else 2
    return torch.broadcast_shapes(*(x.shape[:-nb] for x in xs))


def _to4(x, lead, heads: bool):
    """[..., (H,) n, d] -> [B, H, n, d] (H = 1 when not head-aware)."""
    nb = 3 if heads else 2
    x = x.expand(*lead, *x.shape[-nb:])
    x = x.reshape(-1, *x.shape[-nb:]).contiguous()
    return x if heads else x.unsqueeze(1)


def _from4(o, lead, heads: bool):
    if not heads:
        o = o.squeeze(1)
    return o.reshape(*lead, *o.shape[1:])


def _extra(x, lead, nb: int):
    """Broadcast an extra input ([..., *trailing nb axes]) to the flattened batch: [B, *trailing]."""
    x = x.expand(*lead, *x.shape[x.dim() - nb:])
    return x.reshape(-1, *x.shape[x.dim() - nb:]).contiguous()


def _flex4(q4, k4, v4, score_mod=None, mask_mod=None, *, scale=None, return_lse=False):
    """Eager flex_attention on [B, H, n, d] / [B, G, m, d] float64 tensors."""
    B, H, n, _ = q4.shape
    G, m = k4.shape[1], k4.shape[2]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "flex_attention called without torch.compile()"
        block_mask = None
        if mask_mod is not None:
            block_mask = create_block_mask(mask_mod, B, H, n, m, device=q4.device)
        kw = {"score_mod": score_mod, "block_mask": block_mask, "scale": scale, "enable_gqa": G != H}
        if not return_lse:
            return flex_attention(q4, k4, v4, **kw), None
        if AuxRequest is not None:
            o, aux = flex_attention(q4, k4, v4, return_aux=AuxRequest(lse=True), **kw)
            return o, aux.lse
        return flex_attention(q4, k4, v4, return_lse=True, **kw)  # pragma: no cover


def flex_oracle(q, k, v, score_mod=None, mask_mod=None, *, heads=False, extras=(), scale=None,
                return_lse=False):
    """Eager flex_attention on tensors with arbitrary leading axes, in float64.

    heads=False: q [..., n, d]; all leading axes are flattened into B, H = 1.
    heads=True:  q [..., H, n, d], k/v [..., G, m, *]; the head axis is kept (G < H -> enable_gqa).
    extras: tensors ``(x, nb)`` broadcast to the leading axes and flattened to [B, *x.shape[-nb:]]; they are
    passed to score_mod / mask_mod as trailing positional arguments after (score,) b, h, q_idx, kv_idx.
    """
    q, k, v = _f64(q, k, v)
    lead = _lead(heads, q, k, v)
    q4, k4, v4 = (_to4(x, lead, heads) for x in (q, k, v))
    ex = [_extra(x, lead, nb) for x, nb in extras]
    sm = None if score_mod is None else (lambda s, b, h, qi, kv: score_mod(s, b, h, qi, kv, *ex))
    mm = None if mask_mod is None else (lambda b, h, qi, kv: mask_mod(b, h, qi, kv, *ex))
    o, lse = _flex4(q4, k4, v4, sm, mm, scale=scale, return_lse=return_lse)
    o = _from4(o, lead, heads)
    if not return_lse:
        return o
    return o, _from4(lse, lead, heads)


def _check_impl(impl):
    if impl not in ("flex", "explicit"):
        raise ValueError(f"impl must be 'flex' or 'explicit', got {impl!r}")


def ring_merge(o1, lse1, o2, lse2):
    """Log-sum-exp merge of two partial attentions over disjoint key sets (ring attention).

    m = max(l1, l2); O = (O1 e^(l1-m) + O2 e^(l2-m)) / (e^(l1-m) + e^(l2-m));
    lse = m + log(e^(l1-m) + e^(l2-m)).
    o [..., n, e], lse [..., n]. Partials with lse = -inf (no admissible key) contribute nothing; if both are
    empty the row is 0 with lse = -inf. Returns (O, lse).
    """
    o1, lse1, o2, lse2 = _f64(o1, lse1, o2, lse2)
    mx = torch.maximum(lse1, lse2)
    mx = torch.where(torch.isfinite(mx), mx, torch.zeros_like(mx))
    a1 = torch.exp(lse1 - mx)
    a2 = torch.exp(lse2 - mx)
    den = a1 + a2
    o = _safe_div(o1 * a1.unsqueeze(-1) + o2 * a2.unsqueeze(-1), den.unsqueeze(-1))
    lse = torch.where(den > 0, mx + torch.log(torch.where(den > 0, den, torch.ones_like(den))),
                      torch.full_like(den, NEG_INF))
    return o, lse


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
