"""moa.nn.Attention: a compiled program as a torch.nn.Module that takes (batch, heads, n, d) tensors like
F.scaled_dot_product_attention, or (batch, n, heads, d) with layout="bnhd".

A 4-D tensor in the wrong layout would otherwise be read with n = heads (a program's inputs broadcast over leading
axes, and every axis is just an extent): the module knows the number of query heads and checks it on the axis the
layout names, so (B, N, H, D) passed as (B, H, N, D) is an InputError, not a silently wrong result."""
from __future__ import annotations

import torch

from moa import ir
from moa.errors import InputError

from . import autograd
from .kernel import compile as compile_program

LAYOUTS = {"bhnd": "(batch, heads, n, d)", "bnhd": "(batch, n, heads, d)"}


class Attention(torch.nn.Module):
    """Attention(source, num_heads=H, layout="bhnd", form=None, schedule=None, **params).

    forward(q, k, v, **other_inputs): q, k, v are the program's first three float inputs in declaration order,
    4-D in `layout`; q has `num_heads` heads, k and v `num_heads` or a divisor of it when the program indexes kv
    heads itself (GQA, MQA), or 1 or `num_heads` when the program has no head axis (the heads broadcast). Other
    inputs (bias tables, gates, document ids) are passed by name in the program's own shape, with leading batch
    axes if any. Returns the output in `layout`. Gradients flow to every float input (moa::attention's backward),
    and the module traces under torch.compile(fullgraph=True)."""

    def __init__(self, source, *, num_heads: int, layout: str = "bhnd", form=None, schedule=None, **params):
        super().__init__()
        if layout not in LAYOUTS:
            raise InputError(f"layout={layout!r}: choose 'bhnd' {LAYOUTS['bhnd']} or 'bnhd' {LAYOUTS['bnhd']}")
        if not isinstance(num_heads, int) or isinstance(num_heads, bool) or num_heads < 1:
            raise InputError(f"num_heads must be a positive int, got {num_heads!r}")
        self.kernel = compile_program(source, form=form, schedule=schedule, **params)
        p = self.kernel.program
        floats = [n for n in p.inputs if n.dtype == ir.FLOAT]
        if len(floats) < 3 or len(p.outputs) != 1:
            raise InputError(f"moa.nn.Attention needs a program with three float inputs (q, k, v) and one output; "
                             f"{p.name} has inputs {', '.join(self.kernel.input_names)} and "
                             f"{len(p.outputs)} output(s)")
        self.num_heads, self.layout = num_heads, layout
        self.qkv = tuple(n.attrs[0] for n in floats[:3])
        self.ranks = tuple(n.rank for n in floats[:3])
        if p.outputs[0][1].rank < self.ranks[0]:
            raise InputError(f"moa.nn.Attention: the output of {p.name} has fewer axes than its query input "
                             f"{self.qkv[0]}; a module returns one output row per query row and head")

    @property
    def key(self) -> str:
        """The moa::attention operator's key of the module's kernel (a copy or unpickled module: its own kernel's)."""
        return self.kernel.op_key

    def extra_repr(self) -> str:
        return f"program={self.kernel.program.name!r}, num_heads={self.num_heads}, layout={self.layout!r}"

    def _heads_axis(self, name: str, t: torch.Tensor, kv: bool) -> torch.Tensor:
        """t in (batch, heads, n, d) order after checking its rank and number of heads."""
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            shape = list(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise InputError(f"moa.nn.Attention input {name} must be a 4-D tensor {LAYOUTS[self.layout]}, got "
                             f"{shape}")
        ax = 1 if self.layout == "bhnd" else 2
        h = t.shape[ax]
        ok = (h == self.num_heads) if not kv else (h >= 1 and self.num_heads % h == 0)
        if not ok:
            want = f"{self.num_heads}" if not kv else f"a divisor of {self.num_heads}"
            raise InputError(f"moa.nn.Attention input {name} has {h} heads on axis {ax} of shape {list(t.shape)}, "
                             f"expected {want} for layout={self.layout!r} {LAYOUTS[self.layout]}; a tensor in the "
                             f"other layout would be read with n = heads")
        return t if ax == 1 else t.transpose(1, 2)

    def forward(self, q, k, v, **others):
        heads = [self._heads_axis(name, t, kv) for name, t, kv in zip(self.qkv, (q, k, v), (False, True, True))]
        qrank = self.ranks[0]
        args = []
        for name, t, r in zip(self.qkv, heads, self.ranks):
            if r == 2 and qrank == 3:   # the program indexes query heads but this input has none: one kv head
                if t.shape[1] != 1:
                    raise InputError(f"moa.nn.Attention input {name}: program {self.kernel.program.name} reads it "
                                     f"without a head axis, so it must have 1 head, got {t.shape[1]}")
                t = t[:, 0]
            elif r == 2 and t.shape[1] not in (1, self.num_heads):
                raise InputError(f"moa.nn.Attention input {name}: program {self.kernel.program.name} has no head "
                                 f"axis (heads broadcast), so it needs 1 or {self.num_heads} heads, got {t.shape[1]}")
            args.append(t)
        named = dict(zip(self.qkv, args))
        unknown = [n for n in others if n not in self.kernel.input_names or n in self.qkv]
        if unknown:
            raise InputError(f"moa.nn.Attention: unknown input(s) {', '.join(unknown)}; the program takes "
                             f"{', '.join(self.kernel.input_names)} (the first three as q, k, v)")
        named.update(others)
        missing = [n for n in self.kernel.input_names if n not in named]
        if missing:
            raise InputError(f"moa.nn.Attention: missing input(s) {', '.join(missing)} (pass them by name)")
        out = autograd.call(self.kernel, named)   # the operator, after the call's refusals (torch.func, form=)
        out = out[self.kernel.output_names[0]] if isinstance(out, dict) else out
        return out if self.layout == "bhnd" else out.transpose(1, 2)
