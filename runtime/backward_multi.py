"""The backward of an output with several branches or an epilogue around its branch (PiAttention: a sigmoid gate
mixing two softmax branches): O[i, c] = E(o_0[i, c], o_1[i, c], ..., the epilogue's own reads).

Each branch is recomputed alone by the forward kernel of its single-branch schedule (moa/split.py
`branch_alone`), which stores its o_k and lse_k (or Z_k); the epilogue E, a DNF expression over (lead, i, c) with
the branch values as reads, is differentiated by the gradient rules (moa/grad.py) and evaluated in float64 where
the tensors are (torch on the GPU, no copy to the host), giving the cotangent of each branch, dO_k = dO dE/do_k,
and the gradients of the inputs E reads itself (the gate's Q and wg); then each branch's fused backward kernels
(runtime/backward_run.py) give its Q, K, V gradients for dO_k."""
from __future__ import annotations


import torch

from moa import ir, split
from moa import symbolic as sy
from moa.dnf import DnfOutput
from moa.grad import grad

from .backward_run import BackwardRunner
from .binding import Binding
from .device import check_device
from .grad_eval import _GradEval, gradients
from .launch import compute_dtype
from .reference import F64
from .tiling import DTYPE_NAME, choose_config


class MultiBranchBackward:
    """Fused backward kernels per branch, the epilogue by autograd (module docstring)."""

    def __init__(self, planner, name: str):
        self.planner, self.name = planner, name
        self.sched = planner.schedules[name]
        self.subs = [split.branch_alone(self.sched, k) for k in range(len(self.sched.branches))]
        self.runners = [BackwardRunner(planner, name, sub) for sub in self.subs]
        s = self.sched
        self.value_names = [f"__branch{k}" for k in range(len(s.branches))]
        reads = split.value_reads(s, dict(enumerate(self.value_names)))
        exts = split.value_shape(s)
        self.epilogue = DnfOutput("__epilogue", split.value_vars(s), exts, split.with_values(s.epilogue, reads),
                                  ir.FLOAT)
        self.grad_program = grad(planner.cg_program, [self.epilogue], {n: exts for n in self.value_names})

    def fused_names(self) -> tuple:
        """The inputs (codegen names) the branch kernels give gradients."""
        return tuple(dict.fromkeys(x for r in self.runners for x in r.fused_names()))

    def _branch_forward(self, k: int, b: Binding, launcher) -> tuple:
        """(o_k, lse_k) of branch k by the forward kernel of its schedule alone (b in codegen names)."""
        sub = self.subs[k]
        compute = compute_dtype(b.dtype, b.device)
        cfg = choose_config(b.device, DTYPE_NAME[compute], sy.evaluate(sub.row[1], b.dims),
                            sy.evaluate(sub.branches[0].extent, b.dims), 0) \
            if b.device.type != "cuda" else launcher.plan(self.name, b).config
        out, lse = launcher._kernel(self.name, b, compute, sub, cfg, True, role=f"branch{k}")
        return out, (lse.fill_(float("-inf")) if out.numel() == 0 else lse)

    def _epilogue(self, b: Binding, values: list, d_out: torch.Tensor) -> dict:
        """Name -> gradient (batch + shape, float64, on the call's device) of every float input and branch value
        through the epilogue: its gradient DNF (moa/grad.py, the branch values as extra arrays) evaluated for the
        cotangent d_out (runtime/dnf_eval.py), where the tensors are (O(n e) work: no copy to the host)."""
        ins = {n: t.detach() for n, t in b.tensors.items()}
        extra = {n: o.detach().to(F64) for n, (o, _) in zip(self.value_names, values)}
        extra[self.grad_program.cotangents[self.epilogue.name]] = d_out.detach().to(F64)
        b = Binding(b.dims, b.batch, b.dtype, b.device, ins)
        return gradients(_GradEval(self.planner.cg_program, b, extra), self.grad_program, b)

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
