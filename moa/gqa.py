"""GQA packing: the query heads that share one K/V head go into one tile of rows, so K and V are read once per
group instead of once per query head (decoding: a few rows per head, a tile of BLOCK_M rows mostly empty).

Derived from the head index expression of the key reads. When every read of a key input (moa/shard.py roles)
indexes its head axis by floor(a / q), a the output's one leading index and q free of index variables
(gqa_alibi.moa: K[a // (h // g), j]), or reads no head at all (mqa.moa: K[j], one group of q = h heads), the
block program is rewritten with a group index and packed rows:

  a  := G q + floor(r / nl)        G < g (the key input's head extent), r < q nl (packed rows), nl the rows
  i  := r mod nl                    per head;  every key read K[floor(a / q), ...] := K[G, ...]

so that the query heads G q .. G q + q - 1 of group G are the rows r = (a - G q) nl + i of one program. The
packed output O'[G, r, c] is O[G q + floor(r / nl), r mod nl, c], i.e. O[h, nl, e] in the same memory order
(when h = g q: a runtime guard). Score modifiers of the head (ALiBi's slope of a) become per-row values.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import sympy as sp

from . import dnf as D
from . import shard
from . import symbolic as sy


@dataclass(frozen=True)
class GqaPack:
    """The packed block program and what the runtime needs to run it and unpack its rows."""
    program: object           # the packed block program
    outputs: tuple            # its DNF outputs (same names as the block program's)
    group: sp.Expr            # q: query heads per K/V head
    heads: sp.Expr            # h: the output's head extent
    kv_heads: sp.Expr         # g: the key inputs' head extent


def _group_index(plan, outputs):
    """(q, g) when every key read indexes its head axis by floor(a / q) (a the one leading index), else None."""
    found = set()
    for o in outputs:
        if len(o.vars) != 3:
            return None
        a = o.vars[0]
        for x in D.nodes(o.expr):
            if not isinstance(x, D.Read) or plan.roles.get(x.name, (None,))[0] != shard.KEY:
                continue
            shape = plan.program.input_map[x.name].shape
            heads = [k for k, ix in enumerate(x.index) if a in sp.sympify(ix).free_symbols]
            if not heads:   # one K/V head for every query head (MQA): a single group of all h heads
                found.add((o.extents[0], sp.Integer(1), o.extents[0]))
                continue
            if len(heads) != 1:
                return None
            ix = sp.sympify(x.index[heads[0]])
            if not isinstance(ix, sp.floor):
                return None
            q = sp.simplify(a / ix.args[0])
            if q.free_symbols & {a, *o.vars} or sp.simplify(ix.args[0] * q - a) != 0:
                return None
            found.add((q, shape[heads[0]], o.extents[0]))
    return found.pop() if len(found) == 1 else None


def _pack_expr(e, plan, a, i, gv, r, q, nl):
    if isinstance(e, D.Read) and plan.roles.get(e.name, (None,))[0] == shard.KEY:
        return replace(e, index=tuple(gv if a in sp.sympify(x).free_symbols else x for x in e.index))
    if isinstance(e, (D.Read, D.Index, D.SoftmaxAt, D.NormalizeAt)) or not D.children(e):
        return D.subs(e, {a: gv * q + sp.floor(r / nl), i: sp.Mod(r, nl)})
    return D.with_children(e, [_pack_expr(k, plan, a, i, gv, r, q, nl) for k in D.children(e)])


def pack(plan: shard.ShardPlan) -> GqaPack | None:
    """The packed block program of a ring/decoding block plan, or None when its key reads are not grouped."""
    outputs = tuple(plan.outputs)
    found = _group_index(plan, outputs)
    if found is None:
        return None
    q, g, h = found
    gv, r = sy.index_var("a_group"), sy.index_var("r_packed")
    new = []
    for o in outputs:
        a, i, c = o.vars
        expr = _pack_expr(o.expr, plan, a, i, gv, r, q, plan.nl)
        new.append(D.DnfOutput(o.name, (gv, r, c), (g, q * plan.nl, o.extents[2]), expr, o.dtype))
    prog = plan.program
    outs = tuple((name, replace(node, shape=(g, q * plan.nl, node.shape[-1]))) for name, node in prog.outputs)
    program = replace(prog, name=f"{prog.name}_gqa", outputs=outs)
    return GqaPack(program, tuple(new), q, h, g)
