"""The chunked-state (linear) form evaluated with torch in float64: proves the rewrite rules numerically.

Follows moa/linear.py step by step: feature maps phi_p of the factor rows, per-chunk states, the exclusive
prefix over chunks with gate decays, and the intra-chunk quadratic part.
"""
from __future__ import annotations

import torch

from moa import symbolic as sy
from moa.linear import LinearPlan, feature_table

from .binding import bind
from .dnf_eval import _DnfEval
from .reference import F64


def _grid(ev: _DnfEval, expr, vars_exts):
    active = tuple((v, ext, None) for v, ext in vars_exts)
    t = ev.full(ev.ev(expr, active), active).to(F64)
    return t.expand(*t.shape[:ev.nb], *(ext for _, ext in vars_exts))


def linear_reference(program, lp: LinearPlan, inputs: dict, chunk: int = 16) -> torch.Tensor:
    """O evaluated in the chunked linear form (float64)."""
    b = bind(program, inputs)
    ev = _DnfEval(program, b)
    s = lp.schedule
    br = lp.branch
    dims = b.dims
    lead = [(v, sy.evaluate(x, dims)) for v, x in s.lead]
    i, n = s.row[0], sy.evaluate(s.row[1], dims)
    c, e = s.col[0], sy.evaluate(s.col[1], dims)
    j, k = br.var, br.dot.var
    d = sy.evaluate(br.dot.extent, dims)
    A = _grid(ev, br.dot.a, [*lead, (i, n), (k, d)])
    B = _grid(ev, br.dot.b, [*lead, (j, n), (k, d)])
    V = _grid(ev, br.value, [*lead, (j, n), (c, e)])
    ga = _grid(ev, lp.ga, [*lead, (i, n)]) if lp.ga is not None else torch.zeros(A.shape[:-1], dtype=F64)
    gb = _grid(ev, lp.gb, [*lead, (j, n)]) if lp.gb is not None else torch.zeros(B.shape[:-1], dtype=F64)
    idx, w = feature_table(d, lp.p)
    idx = torch.tensor(idx, dtype=torch.int64).reshape(-1, lp.p)
    w = torch.tensor(w, dtype=F64)
    # phi_p(x)_D = w_D prod_t x[idx[D, t]]
    phiA = w * A[..., idx].prod(-1)
    phiB = w * B[..., idx].prod(-1)
    shape = torch.broadcast_shapes(phiA.shape[:-2], phiB.shape[:-2], V.shape[:-2])
    Dn = w.numel()
    S = torch.zeros(*shape, Dn, e, dtype=F64)
    z = torch.zeros(*shape, Dn, dtype=F64)
    out = torch.zeros(*shape, n, e, dtype=F64)
    ref_b = None  # gb at the last row of the previous chunk
    for c0 in range(0, n, chunk):
        c1 = min(c0 + chunk, n)
        rows = slice(c0, c1)
        num = torch.zeros(*shape, c1 - c0, e, dtype=F64)
        den = torch.zeros(*shape, c1 - c0, dtype=F64)
        if ref_b is not None:   # inter-chunk: e^(ga_i - gb_b) phi_i . S_c
            scale = torch.exp(ga[..., rows] - ref_b[..., None])
            num = num + scale[..., None] * (phiA[..., rows, :] @ S)
            den = den + scale * (phiA[..., rows, :] @ z[..., None])[..., 0]
        # intra-chunk quadratic part, j <= i inside the chunk
        wq = (A[..., rows, :] @ B[..., rows, :].transpose(-1, -2)) ** lp.p
        wq = wq * torch.exp(ga[..., rows, None] - gb[..., None, rows])
        wq = torch.where(torch.ones(c1 - c0, c1 - c0, dtype=torch.bool).tril(), wq, torch.zeros((), dtype=F64))
        num = num + wq @ V[..., rows, :]
        den = den + wq.sum(-1)
        out[..., rows, :] = torch.where(den[..., None] == 0, torch.zeros((), dtype=F64),
                                        num / torch.where(den == 0, 1.0, den)[..., None])
        # state update: S_{c+1} = e^(gb_b' - gb_b) S_c + sum_{j in c} e^(gb_b' - gb_j) phi_j v_j^T
        new_b = gb[..., c1 - 1]
        decay_j = torch.exp(new_b[..., None] - gb[..., rows])
        dS = (phiB[..., rows, :] * decay_j[..., None]).transpose(-1, -2) @ V[..., rows, :]
        dz = (phiB[..., rows, :] * decay_j[..., None]).sum(-2)
        if ref_b is not None:
            f = torch.exp(new_b - ref_b)
            S, z = S * f[..., None, None], z * f[..., None]
        S, z = S + dS, z + dz
        ref_b = new_b
    return out
