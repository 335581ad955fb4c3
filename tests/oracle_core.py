"""The shared pieces of the float64 oracles (tests/oracles.py): the explicit masked softmax, the four-axis
adapter to eager flex_attention, the log-sum-exp merge of ring attention. No moa import."""
from __future__ import annotations

import math
import warnings

import torch
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

try:  # torch >= 2.8
    from torch.nn.attention.flex_attention import AuxRequest
except ImportError:  # pragma: no cover - older torch
    AuxRequest = None

F64 = torch.float64
NEG_INF = float("-inf")


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
