"""`moa check`: random float64 inputs, IR reference vs DNF evaluation vs the kernel, and PyTorch where known."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from moa import ir
from moa import dnf
from moa import symbolic as sy
from moa.errors import InputError, UnsupportedError


def random_inputs(program, dims: dict, seed: int = 0, batch: int = 0, dtype=torch.float64) -> dict:
    """Inputs for a program: normal floats, sorted small ints (document ids), sparse booleans (flags)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    lead = (batch,) if batch else ()
    for node in program.inputs:
        try:
            shape = tuple(int(sy.evaluate(s, dims)) for s in node.shape)
        except KeyError:
            raise InputError(f"--dims must give every dim used by input {node.attrs[0]} "
                             f"{sy.show_shape(node.shape)}") from None
        name = node.attrs[0]
        if node.dtype == ir.FLOAT:
            out[name] = torch.randn(*lead, *shape, generator=g, dtype=torch.float64).to(dtype)
        elif node.dtype == ir.INT:
            hi = max(2, (shape[-1] if shape else 4) // 8)
            out[name] = torch.sort(torch.randint(0, hi, (*lead, *shape), generator=g), dim=-1)[0]
        else:
            out[name] = torch.rand(*lead, *shape, generator=g) < 0.1
    return out


@dataclass
class CheckReport:
    rows: list = field(default_factory=list)   # (what, output, max abs err, max rel err)
    notes: list = field(default_factory=list)
    tol: float = 1e-12

    @property
    def ok(self) -> bool:
        return all(rel <= self.tol for _, _, _, rel in self.rows)

    def text(self) -> str:
        lines = [f"{'comparison':34s} {'output':8s} {'max abs err':>12s} {'max rel err':>12s}"]
        for what, name, a, r in self.rows:
            lines.append(f"{what:34s} {name:8s} {a:12.3e} {r:12.3e}")
        lines += self.notes
        lines.append("OK" if self.ok else f"FAILED (tolerance {self.tol:g} relative)")
        return "\n".join(lines)


def _err(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    a, b = a.double(), b.double()
    if a.numel() == 0:
        return 0.0, 0.0
    diff = (a - b).abs().max().item()
    return diff, diff / max(b.abs().max().item(), 1e-300)


def check(kernel, dims: dict, seed: int = 0, batch: int = 2, run_kernel: bool = True) -> CheckReport:
    """Compare the unfused IR reference with the DNF evaluation and (if it compiles) the fused kernel."""
    rep = CheckReport()
    inputs = random_inputs(kernel.program, dims, seed, batch)
    ref = kernel.reference(**inputs)
    dnf = kernel.dnf_reference(**inputs)
    if not isinstance(ref, dict):
        ref, dnf = {kernel.output_names[0]: ref}, {kernel.output_names[0]: dnf}
    for name in ref:
        rep.rows.append(("DNF vs IR reference (float64)", name, *_err(dnf[name], ref[name])))
    if run_kernel:
        try:
            out = kernel(**inputs)
        except UnsupportedError as e:
            rep.notes.append(f"kernel: not compiled ({e.message})")
        else:
            if not isinstance(out, dict):
                out = {kernel.output_names[0]: out}
            for name in ref:
                rep.rows.append(("Triton kernel vs IR reference", name, *_err(out[name], ref[name])))
    torch_ref = _pytorch_oracle(kernel, inputs)
    if torch_ref is not None:
        name = kernel.output_names[0]
        rep.rows.append(("IR reference vs PyTorch SDPA", name, *_err(ref[name], torch_ref)))
    return rep


def _pytorch_oracle(kernel, inputs):
    """F.scaled_dot_product_attention for programs that are plain or causal SDPA (recognised from the ONF)."""
    try:
        (sched,) = kernel.schedules.values()
    except (UnsupportedError, ValueError):
        return None
    if len(sched.branches) != 1 or sched.lead or set(inputs) != {"Q", "K", "V"}:
        return None
    b = sched.branches[0]
    mask = None if b.mask is None else ir_text(b.mask)
    if b.kind != "softmax" or mask not in (None, f"({b.var} <= {sched.row[0]})"):
        return None
    q, k, v = inputs["Q"], inputs["K"], inputs["V"]
    if mask is not None and q.shape[-2] != k.shape[-2]:
        return None
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=mask is not None)


def ir_text(e) -> str:
    return dnf.show(e)
