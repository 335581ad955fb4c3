"""Shared helpers of the gradient tests: small params per example, ragged sizes, random inputs of a program, the
autograd gradients through the float64 reference (the meaning of a program), and the error metric."""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from moa import symbolic as sy

F64 = torch.float64
EXAMPLES = sorted((Path(__file__).resolve().parent.parent / "examples").glob("*.moa"))

# small params where the defaults are large (or do not bite at n ~ 20-40); names as declared in each file
PARAMS = {
    "bla": {"W": 8, "M": 3},
    "dilated_window": {"w": 9, "r": 3},
    "global_window": {"w": 4},
    "pi_attention": {"k": 6, "s": 4, "bg": 0.25},
    "prefix_lm": {"p": 5},
    "ring_local": {"k": 6},
    "sliding_window": {"w": 7},
    "softcap": {"c": 1.5},
}

# ragged: n != m where a program has both (m < n leaves rows of causal_bottom_right without keys), n not a
# multiple of any block
SIZES = [{"n": 23, "m": 17, "d": 8, "e": 5, "h": 4, "g": 2},
         {"n": 19, "m": 31, "d": 8, "e": 5, "h": 4, "g": 2}]


def dims_for(program, size: dict) -> dict:
    return {d.name: size[d.name] for d in program.dims}


def inputs(program, dims: dict, seed: int, batch=(2,), dtype=F64) -> dict:
    """Random inputs of the program's declared shapes, sensible per name (sorted document ids, log-gates)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for node in program.inputs:
        name = node.attrs[0]
        shape = (*batch, *(sy.evaluate(s, dims) for s in node.shape))
        if name == "doc":
            out[name] = torch.sort(torch.randint(0, 4, shape, generator=g), dim=-1).values
        elif node.dtype == "bool":
            out[name] = torch.rand(shape, generator=g, dtype=F64) < 0.15
        elif node.dtype == "int":
            out[name] = torch.randint(0, 5, shape, generator=g)
        elif name == "G":
            out[name] = F.logsigmoid(torch.randn(shape, generator=g, dtype=F64) + 2).cumsum(-1).to(dtype)
        else:
            out[name] = torch.randn(shape, generator=g, dtype=F64).to(dtype)
    return out


def float_names(program) -> list:
    return [n.attrs[0] for n in program.inputs if n.dtype == "float"]


def cotangents(kernel, x: dict, seed: int) -> dict:
    """A random cotangent per output (float64), shaped like the output."""
    out = kernel.reference(**x)
    outs = out if isinstance(out, dict) else {kernel.output_names[0]: out}
    g = torch.Generator().manual_seed(seed + 1000)
    return {n: torch.randn(o.shape, generator=g, dtype=F64) for n, o in outs.items()}


def autograd_grads(kernel, x: dict, cot: dict) -> dict:
    """The gradient of every float input by torch.autograd through k.reference (float64)."""
    names = float_names(kernel.program)
    leaves = {n: (t.detach().to(F64).requires_grad_() if n in names else t) for n, t in x.items()}
    out = kernel.reference(**leaves)
    outs = out if isinstance(out, dict) else {kernel.output_names[0]: out}
    loss = sum((o * cot[n]).sum() for n, o in outs.items())
    grads = torch.autograd.grad(loss, [leaves[n] for n in names], allow_unused=True)
    return {n: torch.zeros_like(leaves[n]) if g is None else g for n, g in zip(names, grads)}


def rel_err(got, want) -> float:
    """max |got - want| / max(1, max |want|) (the metric of docs/robustness.md)."""
    got, want = got.to(F64), want.to(F64)
    assert got.shape == want.shape, (got.shape, want.shape)
    return float((got - want).abs().max() / max(1.0, float(want.abs().max()))) if want.numel() else 0.0


def check_backward_cost(k, x: dict, cot, config) -> None:
    """The backward cost model's prediction (runtime/backward_cost.py, at `config`'s tiles) equals the
    interpreter's counters of one fused backward call (the caller sets backward_run.INTERPRETER_BLOCKS to the same
    tiles)."""
    from moa.runtime import backward_cost
    from moa.runtime.measure import instrument

    b = k.bind(x)
    out, lse = k.launcher.tiled(k.output_names[0], b, store_lse=True)
    pred = backward_cost.predict(k.backward.runner, b.dims, b.batch, "float64", config)
    with instrument() as c:
        k.backward.runner.grads(b, out, lse, cot)
    assert sum(w.flops for w in pred.values()) == c.flops
    assert sum(w.transcendentals for w in pred.values()) == c.transcendentals
    assert sum(w.bytes_loaded for w in pred.values()) == c.dram_bytes_loaded
    assert sum(w.bytes_stored for w in pred.values()) == c.dram_bytes_stored


def kernel_grads(kernel, x: dict, cot) -> dict:
    """The gradient of every float input by torch.autograd through the kernel itself (k(...)), for the cotangent
    `cot` of its single output (inputs and gradients in the inputs' dtype)."""
    leaves = {n: t.clone().requires_grad_() if t.is_floating_point() else t for n, t in x.items()}
    (kernel(**leaves) * cot).sum().backward()
    return {n: t.grad for n, t in leaves.items() if t.is_floating_point()}


def check_kernel_grads(kernel, x: dict, seed: int = 0, tol: float = 1e-12) -> None:
    """The kernel's gradients (kernel_grads: fused or not) equal autograd through the float64 reference, each within
    `tol` relative to max(1, max |want|)."""
    cot = cotangents(kernel, x, seed)
    want = autograd_grads(kernel, x, cot)
    got = kernel_grads(kernel, x, cot[kernel.output_names[0]])
    for n in want:
        assert rel_err(got[n], want[n]) <= tol, (n, rel_err(got[n], want[n]))
