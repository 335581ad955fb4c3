"""A whole program: dims, params, inputs, named arrays and outputs, all as MoA IR."""
from __future__ import annotations

from dataclasses import dataclass

import sympy as sp

from . import ir
from . import symbolic as sy


@dataclass(frozen=True)
class Program:
    """The elaborated program. `bindings` holds every named array in source order (outputs included)."""

    name: str
    source: str
    dims: tuple            # sympy symbols, in declaration order
    params: tuple          # (name, value) in declaration order, after overrides
    inputs: tuple          # input nodes in declaration order
    bindings: tuple        # (name, Node)
    outputs: tuple         # (name, Node)

    @property
    def param_values(self) -> dict:
        return dict(self.params)

    @property
    def input_map(self) -> dict:
        return {n.attrs[0]: n for n in self.inputs}

    @property
    def output_map(self) -> dict:
        return dict(self.outputs)

    def guards(self) -> tuple[ir.Guard, ...]:
        """Facts only the call can decide, collected from every node (deduplicated)."""
        seen, out = set(), []
        for node in ir.walk([n for _, n in self.outputs]):
            for g in node.guards:
                key = sp.srepr(g.expr)
                if key not in seen:
                    seen.add(key)
                    out.append(g)
        return tuple(out)

    def intermediates(self) -> list[tuple[str, sp.Expr]]:
        """Named arrays that are not outputs, with their element counts (what fusion eliminates)."""
        outs = {id(n) for _, n in self.outputs}
        return [(name, sy.product(n.shape)) for name, n in self.bindings if id(n) not in outs and n.rank > 0]
