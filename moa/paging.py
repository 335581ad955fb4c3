"""Paged KV caches written in the language: a key input read through a block table,

    in Kc[np, P, d], page[L]: int
    Kp[j:m, k] = Kc[page[j // P], j % P, k]

is lowered before psi-reduction (which does not reduce gathers) to the contiguous program that reads Kc[j, k]
with Kc of extent m (the logical cache), plus the paging: which inputs are paged, through which table, with
which page size. The runtime then runs that program's paged decode (runtime/decode.py: one key split per page,
its pointers moved to page[b, s] read from the table), so masks and score modifiers see the logical key j.

Recognised: every read of a paged input X is X[T[J // P], J % P, rest...] with T a rank-1 int input, P a dim
or an integer, J a comprehension variable of extent m (a dim); T is read nowhere else; P, the page count and
the table length appear nowhere else once the gathers are lowered.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import sympy as sp

from . import ir
from .errors import UnsupportedError
from .program import Program


@dataclass(frozen=True)
class Paging:
    """The paging of a lowered program: table input name, page size (a dim symbol or an int), the paged inputs
    (their declared rank before lowering), and the key dim m of the logical cache."""
    table: str
    page: object
    inputs: tuple
    key_dim: sp.Symbol


def _gather(node):
    """(X node, T name, J, P, rest index nodes) when `node` is X[T[J // P], J % P, rest...], else None."""
    if node.op != "psi" or len(node.args) < 3 or node.args[0].op != "input":
        return None
    x, first, second, *rest = node.args
    if first.op != "psi" or len(first.args) != 2 or first.args[0].op != "input" or first.args[0].dtype != ir.INT:
        return None
    if first.args[1].op != "sym" or second.op != "sym" or node.attrs[0][:2] != ("i", "i"):
        return None
    fl, md = sp.sympify(first.args[1].attrs[0]), sp.sympify(second.attrs[0])
    if not (isinstance(md, sp.Mod) and isinstance(fl, sp.floor)):
        return None
    j, p = md.args
    if not isinstance(j, sp.Symbol) or sp.simplify(fl.args[0] - j / p) != 0:
        return None
    return x, first.args[0].attrs[0], j, p, rest


def lower(program: Program) -> tuple[Program, Paging | None]:
    """(the contiguous program, Paging), or (program, None) when no input is read through a table."""
    nodes = ir.walk([n for _, n in program.bindings] + [n for _, n in program.outputs])
    found = {}
    extents = {}
    for node in nodes:
        if node.op == "comp":
            extents.update(zip(node.attrs[0], node.shape))
        g = _gather(node)
        if g is not None:
            found.setdefault((g[0].attrs[0], g[1], sp.sympify(g[3])), []).append(g)
    if not found:
        return program, None
    tables = {(t, p) for (_, t, p) in found}
    if len(tables) != 1:
        raise UnsupportedError("paged caches: every paged input must be read through one block table with one "
                               f"page size, got {sorted(map(str, tables))}")
    (table, page), = tables
    keys = {extents.get(g[2]) for gs in found.values() for g in gs}
    if len(keys) != 1 or not isinstance(next(iter(keys)), sp.Symbol):
        raise UnsupportedError("paged caches: the key index J of X[T[J // P], J % P] must range over one dim (the "
                               "cache's logical length m), as in Kp[j:m, k] = Kc[page[j // P], j % P, k]")
    m = keys.pop()
    paged = {x for (x, _, _) in found}
    decl = program.input_map
    new_inputs = {x: ir.input_(x, (m, *decl[x].shape[2:]), decl[x].dtype, decl[x].loc) for x in paged}
    memo: dict = {}

    def rebuild(node):
        if id(node) in memo:
            return memo[id(node)]
        g = _gather(node)
        if g is not None and g[0].attrs[0] in paged:
            rest = tuple(rebuild(r) for r in g[4])
            out = ir.Node("psi", (new_inputs[g[0].attrs[0]], ir.sym(g[2], node.loc), *rest), node.shape,
                          node.dtype, (("i",) + node.attrs[0][2:],), node.loc, node.guards)
        elif node.op == "input":
            if node.attrs[0] == table or node.attrs[0] in paged:
                raise UnsupportedError(f"paged caches: input {node.attrs[0]} is read outside the page "
                                       f"indirection {node.attrs[0]}[...]", node.loc)
            out = node
        else:
            out = replace(node, args=tuple(rebuild(a) for a in node.args)) if node.args else node
        memo[id(node)] = out
        return out

    for node in program.inputs:   # a key-length input read directly: the paged launch reads key inputs in pages
        name = node.attrs[0]
        if name not in paged and name != table and any(m in sp.sympify(x).free_symbols for x in node.shape):
            raise UnsupportedError(f"paged caches: input {name} has an axis of the cache's logical length {m}, but "
                                   "a paged call reads every key input through the block table: give it pages too "
                                   f"and read it as {name}c[{table}[j // {page}], j % {page}]", node.loc)
    bindings = tuple((n, rebuild(x)) for n, x in program.bindings)
    outputs = tuple((n, rebuild(x)) for n, x in program.outputs)
    inputs = tuple(new_inputs.get(n.attrs[0], n) for n in program.inputs if n.attrs[0] != table)
    used = set()
    for node in ir.walk([x for _, x in outputs] + list(inputs)):
        for e in (*node.shape, *[a for a in node.attrs if isinstance(a, sp.Basic)]):
            used |= sp.sympify(e).free_symbols
        used |= set().union(*[sp.sympify(g.expr).free_symbols for g in node.guards]) if node.guards else set()
    gone = set(decl[table].shape[0].free_symbols) | {s for x in paged for s in decl[x].shape[0].free_symbols}
    gone |= set(sp.sympify(page).free_symbols)
    if gone & used:
        raise UnsupportedError(f"paged caches: {', '.join(sorted(map(str, gone & used)))} (page size, page count "
                               "or table length) is used outside the page indirection")
    dims = tuple(d for d in program.dims if d not in gone)
    lowered = replace(program, name=f"{program.name}", dims=dims, inputs=inputs, bindings=bindings,
                      outputs=outputs)
    return lowered, Paging(table, page, tuple(sorted(paged)), m)
