"""The hop loop of a branch whose mask has residue structure (moa/onf.py `Hop`): j = i + c - s t.

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

from dataclasses import replace

from moa import dnf as D
from moa import intervals as iv
from moa import symbolic as sy

from .exprs import Emitter
from .monoid import Monoid
from .scope import Scope


def emit_hop_branch(x: Emitter, k: int, b, body: Scope, q_tile: str | None, mo: Monoid) -> None:
    """Append the hop loop of branch k (its monoid state initialised in `body` already)."""
    s = x.s
    i, n_ext = s.row
    c = s.col[0]
    h = b.hop
    j, t = b.var, h.var
    sfx = x.sfx(k)
    box = {iv.I_LO: "row_lo", iv.I_HI: "row_hi"}
    body.add(f"# hops {t.name}: key row {j.name} = {sy.show(h.key)} for query row {i.name}")
    body.add(f"t_lo{sfx} = {x.idx(h.t_lo, box)}")
    body.add(f"t_hi{sfx} = {x.idx(h.t_hi, box)}")
    loop = Scope([], "    ", parent=body).open(f"for hop in range(t_lo{sfx}, t_hi{sfx} + 1):", ("hop", k))
    first_site = len(x.loads)
    loop.add("hop_t = tl.full([], hop, tl.int32)  # a tensor, in the interpreter too (scalar terms may be cast)")
    if b.dot is not None:
        offs = x.head_offsets(b.dot.extent, body)
        # j := the key expression, so that loads check 0 <= j < m (a hop can reach before the first key)
        kb = x.emit(D.subs(b.dot.b, {j: h.key}), {i: "offs_m[:, None]", t: "hop_t", b.dot.var: f"{offs}[None, :]"},
                    loop, role=f"k{sfx}")
        loop.add(f"qk{sfx} = tl.sum({q_tile}.to({x.acc}) * {kb}, 1)  # row-wise dot products")
    score = x.emit(D.subs(b.score, {j: h.key}), {i: "offs_m", t: "hop_t"}, loop, role=f"score{sfx}")
    mask = x.emit(h.mask, {i: "offs_m", t: "hop_t"}, loop, role=f"mask{sfx}")
    neutral = 'float("-inf")' if b.kind == "softmax" else "0.0"
    sname = f"s{sfx}" if b.kind == "softmax" else f"w{sfx}"
    loop.add(f"{sname} = tl.where({mask} & (offs_m < {x.idx(n_ext, {})}), {score}, {neutral})")
    v = x.emit(D.subs(b.value, {j: h.key}), {i: "offs_m[:, None]", t: "hop_t", c: "offs_v[None, :]"}, loop,
               role=f"v{sfx}")
    mo.update(loop, sname, lambda p: f"{p}[:, None] * {v}", tile=False)
    for q in range(first_site, len(x.loads)):   # the hop is a scalar axis of the access sites: one value a loop
        site = x.loads[q]
        x.loads[q] = replace(site, axes=tuple((var, "hop" if var == t else a) for var, a in site.axes))
    body.lines.extend(loop.parent.lines)
