"""`moa check --grad`: the gradient of every float input, by the kernel's backward (the moa::attention operator:
fused kernels where the program has them, the gradient DNF otherwise), against torch.autograd through the float64
IR reference, for a random cotangent of every output."""
from __future__ import annotations

import torch

from moa import ir

from .check import CheckReport, _err, random_inputs

F64 = torch.float64


def autograd_reference(kernel, inputs: dict, cotangents: dict) -> dict:
    """Input name -> the gradient of sum(output * cotangent) by torch.autograd through k.reference (float64)."""
    names = [n.attrs[0] for n in kernel.program.inputs if n.dtype == ir.FLOAT]
    leaves = {n: (t.detach().to(F64).requires_grad_() if n in names else t) for n, t in inputs.items()}
    out = kernel.reference(**leaves)
    outs = out if isinstance(out, dict) else {kernel.output_names[0]: out}
    loss = sum((o * cotangents[n]).sum() for n, o in outs.items())
    grads = torch.autograd.grad(loss, [leaves[n] for n in names], allow_unused=True)
    return {n: torch.zeros_like(leaves[n]) if g is None else g for n, g in zip(names, grads)}


def kernel_grads(kernel, inputs: dict, cotangents: dict) -> dict:
    """Input name -> the gradient by the kernel's backward (k(**inputs) with inputs that require grad)."""
    names = [n.attrs[0] for n in kernel.program.inputs if n.dtype == ir.FLOAT]
    leaves = {n: (t.detach().clone().requires_grad_() if n in names else t) for n, t in inputs.items()}
    with torch.enable_grad():
        out = kernel(**leaves)
        outs = out if isinstance(out, dict) else {kernel.output_names[0]: out}
        loss = sum((o.to(F64) * cotangents[n]).sum() for n, o in outs.items())
        grads = torch.autograd.grad(loss, [leaves[n] for n in names], allow_unused=True)
    return {n: torch.zeros_like(leaves[n]) if g is None else g for n, g in zip(names, grads)}


def check_grad(kernel, dims: dict, seed: int = 0, batch: int = 2, report: CheckReport | None = None) -> CheckReport:
    """Rows `d<input> kernel vs autograd` (float64) for every float input, and a note naming the backward used."""
    rep = report or CheckReport()
    if rep.no_kernel is not None:   # no forward kernel, so no backward of it to compare
        rep.notes.append("--grad: no gradient rows (no kernel: the program's gradients exist only through "
                         "torch.autograd on k.reference)")
        return rep
    inputs = random_inputs(kernel.program, dims, seed, batch)
    ref = kernel.reference(**inputs)
    ref = ref if isinstance(ref, dict) else {kernel.output_names[0]: ref}
    g = torch.Generator().manual_seed(seed + 1)
    cot = {n: torch.randn(t.shape, generator=g, dtype=F64) for n, t in ref.items()}
    want = autograd_reference(kernel, inputs, cot)
    got = kernel_grads(kernel, inputs, cot)
    for name in want:
        rep.rows.append((f"d{name}: kernel vs autograd (f64)", name, *_err(got[name], want[name])))
    bw = kernel.backward
    fused = ", ".join(bw.fused_inputs)
    rest = ", ".join(x for x in want if x not in bw.fused_inputs)
    unfused = f"; the gradient DNF (unfused) for {rest}" if rest else ""
    rep.notes.append(f"backward: fused kernels for {fused}{unfused}" if fused else
                     f"backward: the gradient DNF, unfused ({bw.unfused_reason})")
    return rep
