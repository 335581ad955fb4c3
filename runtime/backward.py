"""The backward pass of a compiled program: what the forward saves, and how the gradients are computed.

The gradients are the derived gradient DNF (moa/grad.py). They are evaluated unfused (runtime/grad_eval.py, float64,
vectorised) for now; the fused backward kernels replace that evaluation where the program has them."""
from __future__ import annotations

from functools import cached_property

import torch

from moa import ir
from moa.grad import GradProgram, grad

from .grad_eval import evaluate_grad


class Backward:
    """The backward of one Kernel."""

    def __init__(self, kernel):
        self.k = kernel

    @cached_property
    def grad_program(self) -> GradProgram:
        """The gradient DNF of every float input (moa/grad.py)."""
        return grad(self.k.program, self.k.dnf)

    def saved_spec(self, dtype: torch.dtype) -> list:
        """(shape as extents, dtype) of each value the forward returns for the backward, after the outputs."""
        return []

    def forward(self, named: dict) -> tuple[list, list]:
        """(outputs, saved values) of a call, by the fused forward kernels."""
        k = self.k
        b = k.bind(named)
        return [k.launcher.output(n, b) for n in k.output_names], []

    def backward(self, named: dict, saved: list, cotangents: list) -> list:
        """The gradient of every float input, in input order, shaped and typed like the input."""
        k = self.k
        b = k.bind(named)
        cot = dict(zip(k.output_names, (c.detach().cpu() for c in cotangents)))
        cpu = {n: t.detach().cpu() for n, t in b.tensors.items()}
        b_cpu = type(b)(b.dims, b.batch, b.dtype, torch.device("cpu"), cpu)
        grads = evaluate_grad(k.program, self.grad_program, binding=b_cpu, cotangents=cot)
        out = []
        for node in k.program.inputs:
            if node.dtype != ir.FLOAT:
                continue
            name = node.attrs[0]
            t = named[name]
            g = torch.empty_like(t)   # the strides the fake implementation promises
            out.append(g.copy_(grads[name].sum_to_size(t.shape)))
        return out
