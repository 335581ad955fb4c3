"""The epilogue of an output computed from several softmax branches (PiAttention: O = g B0 + (1 - g) B1 with the
gate g[i] = sigmoid(dot(Q[i], wg) + bg)), evaluated on the merged branch rows where they are: on their device,
in the call's compute dtype, with torch ops only, so a decoding step on a GPU makes no round trip through the
host. The DNF evaluator of runtime/dnf_eval.py, with its index tensors made on the device and no data-dependent
check (a check would wait for the device): reads are clamped to their axes, as the kernels mask them. In float64
on the CPU it computes what the float64 host evaluation computes, operation for operation."""
from __future__ import annotations

import torch

from moa import dnf as D
from moa import ir
from moa import symbolic as sy

from .binding import bind
from .dnf_eval import Converted, _DnfEval
from .indexing import ieval
from .reference import scalar_fn

# reductions of their own: such an epilogue is evaluated on the host (runtime/ring.py)
HOST_ONLY = (D.SoftmaxSum, D.NormSum, D.KeySum, D.LogSumExp, D.SoftmaxAt, D.NormalizeAt)


def on_device(expr) -> bool:
    """Whether the epilogue expression is evaluated here (it holds no softmax, normalize or log-sum-exp
    reduction of its own: the branches are its inputs)."""
    return not any(isinstance(x, HOST_ONLY) for x in D.nodes(expr))


def evaluate(prog, ep, tensors: dict, dims: dict, dtype: torch.dtype, device) -> torch.Tensor:
    """The epilogue `ep` (moa/shard.py Epilogue) over its program's inputs `tensors` (query-side inputs and merged
    branches, all on `device`), in `dtype`: a tensor of the batch and the output's shape."""
    b = bind(prog, tensors, dims)
    ev = _DeviceEval(prog, b, dtype, device)
    exts = [sy.evaluate(x, b.dims) for x in ep.extents]
    active = tuple((v, ext, None) for v, ext in zip(ep.vars, exts))
    return ev.full(ev.ev(ep.expr, active), active).expand(*b.batch, *exts)


class _DeviceEval(_DnfEval):
    def __init__(self, program, b, dtype: torch.dtype, device):   # not the parent's: it converts to float64
        self.p, self.b, self.nb = program, b, len(b.batch)
        self.f, self.device = dtype, device
        self.inputs = Converted(program, b.tensors, dtype, device)

    def env(self, active):
        env = {}
        for k, (v, ext, chunk) in enumerate(active):
            shape = [1] * len(active)
            rng = torch.arange(ext, dtype=torch.int64, device=self.device) if chunk is None else chunk
            shape[k] = rng.numel()
            env[v] = rng.reshape(shape)
        for d in self.p.dims:
            env[d] = self.b.dims[d.name]
        return env

    def e_Const(self, e, active, guard):
        dt = torch.bool if e.dtype == ir.BOOL else torch.int64 if e.dtype == ir.INT else self.f
        return self.full(torch.tensor(e.value, dtype=dt, device=self.device), active)

    def e_Index(self, e, active, guard):
        v = torch.as_tensor(ieval(e.expr, self.env(active)), device=self.device)
        return self.full(v.to(self.f) if v.is_floating_point() else v.to(torch.int64), active)

    def e_Read(self, e, active, guard):
        t = self.inputs[e.name]
        env = self.env(active)
        own = t.shape[self.nb:]
        vals = [torch.as_tensor(ieval(i, env), dtype=torch.int64, device=self.device) for i in e.index]
        shape = torch.broadcast_shapes(*(v.shape for v in vals)) if vals else ()
        idx = [v.expand(shape).clamp(0, max(own[k] - 1, 0)) for k, v in enumerate(vals)]
        out = t[(Ellipsis, *idx)] if idx else t
        return self.full(out.reshape(*self.b.batch, *out.shape[self.nb:]) if self.nb else out, active)

    def e_Op(self, e, active, guard):
        if e.fn == "where":
            c = self.ev(e.args[0], active, guard)
            a, b = self.ev(e.args[1], active, guard), self.ev(e.args[2], active, guard)
            if a.dtype != b.dtype:
                a, b = a.to(self.f), b.to(self.f)
            return torch.where(c, a, b)
        args = [self.ev(a, active, guard) for a in e.args]
        if e.dtype == ir.FLOAT:
            args = [a.to(self.f) if a.dtype != torch.bool else a for a in args]
        elif e.fn not in ("and", "or", "not") and any(a.dtype == torch.bool for a in args):
            args = [a.to(torch.int64) for a in args]
        return scalar_fn(e.fn, args)

    def e_Reduce(self, e, active, guard):
        inner, ext = self._inner(e, active)
        t = self.full(self.ev(e.body, inner, None), inner)
        t = t.expand(*t.shape[:-1], ext)
        if e.op == "sum":
            return t.sum(-1)
        if ext == 0:
            ident = float("-inf") if e.op == "max" else float("inf")
            return torch.full(t.shape[:-1], ident, dtype=self.f, device=self.device)
        return t.amax(-1) if e.op == "max" else t.amin(-1)
