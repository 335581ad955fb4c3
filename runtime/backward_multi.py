"""The backward of an output with several branches or an epilogue around its branch (PiAttention: a sigmoid gate
mixing two softmax branches): O[i, c] = E(o_0[i, c], o_1[i, c], ..., the epilogue's own reads).

Each branch is recomputed alone by the forward kernel of its single-branch schedule (codegen/backward.py
`branch_schedule`), which stores its o_k and lse_k (or Z_k); the epilogue E, a DNF expression over (lead, i, c) with
the branch values as reads, is differentiated by the gradient rules (moa/grad.py) and evaluated in float64 where
the tensors are (torch on the GPU, no copy to the host), giving the cotangent of each branch, dO_k = dO dE/do_k,
and the gradients of the inputs E reads itself (the gate's Q and wg); then each branch's fused backward kernels
(runtime/backward_run.py) give its Q, K, V gradients for dO_k."""
from __future__ import annotations

import math

import torch

from moa import ir
from moa import symbolic as sy
from moa.codegen.backward import branch_schedule
from moa.codegen.emit import generate
from moa.dnf import DnfOutput
from moa.dnf_nodes import Read, children, with_children
from moa.grad import grad
from moa.onf import BranchValue

from .backward_run import BackwardRunner
from .binding import Binding
from .cache import module_for
from .device import check_device, run
from .grad_eval import _GradEval
from .launch import compute_dtype
from .reference import F64
from .tiling import DTYPE_NAME, choose_config, exact_heads, row_programs


def _branch_reads(e, k_of: dict):
    """The epilogue with BranchValue(k) replaced by reads of the named branch values."""
    if isinstance(e, BranchValue):
        return k_of[e.branch]
    kids = children(e)
    return with_children(e, [_branch_reads(x, k_of) for x in kids]) if kids else e


class MultiBranchBackward:
    """Fused backward kernels per branch, the epilogue by autograd (module docstring)."""

    def __init__(self, planner, name: str):
        self.planner, self.name = planner, name
        self.sched = planner.schedules[name]
        self.subs = [branch_schedule(self.sched, k) for k in range(len(self.sched.branches))]
        self.runners = [BackwardRunner(planner, name, sub) for sub in self.subs]
        s = self.sched
        vars_ = tuple(v for v, _ in s.lead) + (s.row[0], s.col[0])
        self.value_names = [f"__branch{k}" for k in range(len(s.branches))]
        k_of = {k: Read(n, vars_, ir.FLOAT) for k, n in enumerate(self.value_names)}
        exts = tuple(x for _, x in s.lead) + (s.row[1], s.col[1])
        self.epilogue = DnfOutput("__epilogue", vars_, exts, _branch_reads(s.epilogue, k_of), ir.FLOAT)
        self.grad_program = grad(planner.cg_program, [self.epilogue], {n: exts for n in self.value_names})

    def fused_names(self) -> tuple:
        """The inputs (codegen names) the branch kernels give gradients."""
        return tuple(dict.fromkeys(x for r in self.runners for x in r.fused_names()))

    def _branch_forward(self, k: int, b: Binding, launcher) -> tuple:
        """(o_k, lse_k) of branch k by the forward kernel of its schedule alone (b in codegen names)."""
        sub, dims = self.subs[k], b.dims
        compute = compute_dtype(b.dtype, b.device)
        n, e = sy.evaluate(sub.row[1], dims), sy.evaluate(sub.col[1], dims)
        lead = [sy.evaluate(x, dims) for _, x in sub.lead]
        cfg = choose_config(b.device, DTYPE_NAME[compute], n, sy.evaluate(sub.branches[0].extent, dims), 0) \
            if b.device.type != "cuda" else launcher.plan(self.name, b).config
        out = torch.empty((*b.batch, *lead, n, e), dtype=compute, device=b.device)
        acc = torch.float64 if compute == torch.float64 else torch.float32
        lse = torch.empty((*b.batch, *lead, n), dtype=acc, device=b.device)
        grid = (row_programs(sub, n, cfg.block_m), math.prod(b.batch) * math.prod(lead))
        if out.numel() == 0 or grid[1] == 0:
            return out, lse.fill_(float("-inf"))
        spec = generate(self.planner.cg_program, sub, DTYPE_NAME[compute], len(b.batch), cfg.block_m, cfg.block_n,
                        True, exact_heads(sub, dims))
        args, consts = launcher._arguments(spec, b, compute, out, lse, cfg, e)
        run(module_for(spec.source, b.device)._attn_fwd, grid, args, consts, b.device,
            f"the forward kernel of branch {k} of output {self.name}")
        return out, lse

    def _epilogue(self, b: Binding, values: list, d_out: torch.Tensor) -> dict:
        """Name -> gradient (batch + shape, float64, on the call's device) of every float input and branch value
        through the epilogue: its gradient DNF (moa/grad.py, the branch values as extra arrays) evaluated for the
        cotangent d_out (runtime/dnf_eval.py), where the tensors are (O(n e) work: no copy to the host)."""
        ins = {n: t.detach() for n, t in b.tensors.items()}
        extra = {n: o.detach().to(F64) for n, (o, _) in zip(self.value_names, values)}
        extra[self.grad_program.cotangents[self.epilogue.name]] = d_out.detach().to(F64)
        ev = _GradEval(self.planner.cg_program, Binding(b.dims, b.batch, b.dtype, b.device, ins), extra)
        res = {}
        for g in self.grad_program.grads:
            exts = [int(sy.evaluate(x, b.dims)) for x in g.extents]
            active = tuple((v, ext, None) for v, ext in zip(g.vars, exts))
            res[g.name] = ev.full(ev.ev(g.expr, active), active).expand((*b.batch, *exts))
        return res

    def grads(self, b_user: Binding, d_out: torch.Tensor, launcher) -> dict:
        """Codegen input name -> gradient (batch + the input's shape) for the cotangent d_out of the output."""
        b = self.planner.cg_binding(b_user)
        check_device(b.device)
        values = [self._branch_forward(k, b, launcher) for k in range(len(self.subs))]
        got = self._epilogue(b, values, d_out)
        res = {n: got.pop(n) for n in list(got) if n not in self.value_names}
        for k, (runner, (o, lse)) in enumerate(zip(self.runners, values)):
            for n, g in runner.grads(b_user, o, lse, got[self.value_names[k]]).items():
                g = g.to(F64)
                res[n] = g if n not in res else res[n] + g
        return res
