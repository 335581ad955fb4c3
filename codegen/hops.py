"""The hop schedule of a branch whose mask has residue structure (moa/onf.py `Hop`): j = i + c - s t.

Instead of key tiles (most of whose pairs a stride-s mask rejects), the loop runs over hops t: hop t pairs
query row i with the single key row i + c - s t, so a [BLOCK_M, HEAD_DIM] block of key rows is loaded
(rows shifted by s t: a diagonal of the key tile) and the score is a row-wise dot product. The hop range
comes from the rest of the mask solved for t over the tile's rows, so no hop without an admissible pair is
visited. Work per row: (number of hops) x 2 (d + e), instead of (keys in the band) x 2 (d + e).
A branch runs this way when its mode is HOPS (moa/onf.py `variants`; the runtime picks the schedule by
predicted cost, moa/schedule_cost.py). Stride 1 (j = i - t) gathers a per-row window: the residue schedule's
non-lifted branches, whose rows are strided.
"""
from __future__ import annotations

from moa import symbolic as sy

from .printer import code as pcode


def emit_hop_branch(em, k: int, b, body, q_tile: str | None) -> None:
    """Append the hop loop of branch k (online softmax or normaliser) to `body` (an emit._Scope)."""
    from moa import dnf as D
    from moa import intervals as iv

    from .emit import _Scope

    s = em.s
    i, n_ext = s.row
    c, e_ext = s.col
    h = b.hop
    j, t = b.var, h.var
    w = body.lines.append
    acc = em.acc
    names = {iv.I_LO: "row_lo", iv.I_HI: "row_hi", **em.names}
    w(f"    # branch {k}: {b.kind} reduction over {j.name} by hops {t.name}: {j.name} = {sy.show(h.key)}")
    if b.kind == "softmax":
        w(f"    m_i{k} = tl.full([BLOCK_M], float(\"-inf\"), dtype={acc})")
        w(f"    l_i{k} = tl.zeros([BLOCK_M], dtype={acc})")
    else:
        w(f"    z_i{k} = tl.zeros([BLOCK_M], dtype={acc})")
    w(f"    acc{k} = tl.zeros([BLOCK_M, HEAD_DIM_V], dtype={acc})")
    w(f"    t_lo{k} = {pcode(h.t_lo, names)}")
    w(f"    t_hi{k} = {pcode(h.t_hi, names)}")
    loop = _Scope([f"    for hop in range(t_lo{k}, t_hi{k} + 1):"], "        ", parent=body)
    lw = loop.lines.append
    first_site = len(em.loads)
    lw(f"        # hop: key row {sy.show(h.key)} for query row {i.name}")
    lw("        hop_t = tl.full([], hop, tl.int32)  # a tensor, in the interpreter too (scalar terms may be cast)")
    if b.dot is not None:
        hd = em.head_dim(b.dot.extent)
        offs = f"offs_{hd.lower()}"
        # j := the key expression, so that loads check 0 <= j < m (a hop can reach before the first key)
        kb = em.emit(D.subs(b.dot.b, {j: h.key}), {i: "offs_m[:, None]", t: "hop_t", b.dot.var: f"{offs}[None, :]"},
                     loop)
        lw(f"        qk{k} = tl.sum({q_tile}.to({acc}) * {kb}, 1)  # row-wise dot products")
    score = em.emit(D.subs(b.score, {j: h.key}), {i: "offs_m", t: "hop_t"}, loop)
    mask = em.emit(h.mask, {i: "offs_m", t: "hop_t"}, loop)
    neutral = 'float("-inf")' if b.kind == "softmax" else "0.0"
    lw(f"        sc = tl.where({mask} & (offs_m < {em.idx(n_ext, {})}), {score}, {neutral})")
    v = em.emit(D.subs(b.value, {j: h.key}), {i: "offs_m[:, None]", t: "hop_t", c: "offs_v[None, :]"}, loop)
    if b.kind == "softmax":
        lw(f"        m_ij = tl.maximum(m_i{k}, sc * 1.4426950408889634)")
        lw("        m_safe = tl.where(m_ij == float(\"-inf\"), 0.0, m_ij)")
        lw("        p = tl.exp2(sc * 1.4426950408889634 - m_safe)")
        lw(f"        alpha = tl.exp2(m_i{k} - m_safe)")
        lw(f"        l_i{k} = l_i{k} * alpha + p")
        lw(f"        acc{k} = acc{k} * alpha[:, None] + p[:, None] * {v}")
        lw(f"        m_i{k} = m_ij")
        _hop_sites(em, first_site, t)
        body.lines.extend(loop.lines)
        w(f"    o{k} = acc{k} / tl.where(l_i{k} == 0, 1.0, l_i{k})[:, None]  # fin: 0 for rows with no key")
    else:
        lw(f"        z_i{k} = z_i{k} + sc")
        lw(f"        acc{k} = acc{k} + sc[:, None] * {v}")
        _hop_sites(em, first_site, t)
        body.lines.extend(loop.lines)
        w(f"    o{k} = acc{k} / tl.where(z_i{k} == 0, 1.0, z_i{k})[:, None]  # 0 where the normaliser is 0")


def _hop_sites(em, first: int, t) -> None:
    """Access sites of the hop loop (cost model): the hop variable is a scalar axis 'hop' (one value per iteration)."""
    from dataclasses import replace

    for q in range(first, len(em.loads)):
        site = em.loads[q]
        em.loads[q] = replace(site, axes=tuple((v, "hop" if v == t else a) for v, a in site.axes))
