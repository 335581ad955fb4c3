"""The gradient DNF evaluated directly (float64, vectorised): the unfused backward, and the check that the derived
gradients equal torch.autograd through the reference.

The saved forward values (O, lse, Z of each monoid reduction; moa/grad.py) are DNF outputs over the inputs and are
evaluated like any output (runtime/dnf_eval.py); the gradients then read them, and the cotangents, like inputs.
"""
from __future__ import annotations

import torch

from moa import symbolic as sy
from moa.grad import GradProgram
from moa.program import Program

from .binding import Binding, bind
from .dnf_eval import _DnfEval, evaluate_dnf
from .reference import F64


class _GradEval(_DnfEval):
    """The DNF evaluator with more named tensors to read: cotangents and saved values (batch + own shape); its
    and / or guard their right operand (moa/grad_scatter.py conjoins an index's range guard with the conditions
    it substitutes into)."""
    guarding_logic = True

    def __init__(self, program: Program, b: Binding, extra: dict):
        super().__init__(program, b)
        for name, t in extra.items():
            self.inputs[name] = t.to(F64)


def saved_values(program: Program, gp: GradProgram, b: Binding) -> dict:
    """Every saved forward value of the gradient program (name -> float64 tensor of batch + its shape)."""
    return evaluate_dnf(program, gp.saved, binding=b) if gp.saved else {}


def evaluate_grad(program: Program, gp: GradProgram, inputs: dict | None = None, cotangents: dict | None = None,
                  binding: Binding | None = None, saved: dict | None = None, only=None) -> dict:
    """Input name -> its gradient (float64, batch + input shape) for the cotangents (output name -> tensor of batch
    + output shape; a missing output's cotangent is zero). `saved`: the saved values when the caller has them (the
    fused forward's O and lse), else evaluated here. `only`: the inputs wanted (default: every float input)."""
    b = binding or bind(program, inputs)
    extra = dict(saved if saved is not None else saved_values(program, gp, b))
    outs = dict(program.outputs)
    for name, cname in gp.cotangents.items():
        shape = (*b.batch, *(int(sy.evaluate(x, b.dims)) for x in outs[name].shape))
        t = (cotangents or {}).get(name)
        extra[cname] = torch.zeros(shape, dtype=F64) if t is None else t.to(F64).expand(shape)
    return {n: t.contiguous() for n, t in gradients(_GradEval(program, b, extra), gp, b, only).items()}


def gradients(ev: _GradEval, gp: GradProgram, b: Binding, only=None) -> dict:
    """Input name -> its gradient (float64, batch + input shape, possibly an expanded view) by an evaluator that
    holds the cotangents and saved values; `only`: the inputs wanted (default: every float input)."""
    res = {}
    for g in gp.grads:
        if only is not None and g.name not in only:
            continue
        exts = [int(sy.evaluate(x, b.dims)) for x in g.extents]
        active = tuple((v, ext, None) for v, ext in zip(g.vars, exts))
        res[g.name] = ev.full(ev.ev(g.expr, active), active).expand((*b.batch, *exts))
    return res
