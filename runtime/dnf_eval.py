"""Evaluate the DNF itself, vectorised over the output index space (float64), to show DNF == IR.

A value is a tensor shaped batch + one axis per active index variable (output variables first, then each
enclosing reduction's variable). The online-softmax reduction is evaluated the way a kernel does it: chunk by
chunk along its variable, merging (m, l, o) states with the monoid's merge rule.
"""
from __future__ import annotations

import torch

from moa import ir
from moa import symbolic as sy
from moa.errors import InputError
from moa.program import Program

from .binding import Binding, bind
from .indexing import ieval
from .reference import F64, scalar_fn

CHUNK = 16  # key-axis chunk of the online-softmax evaluation


class Converted(dict):
    """Input name -> its tensor as an evaluator reads it (floats in `dtype`, booleans, integers as int64), converted
    on its first read: an evaluation that reads a few inputs (the operand pullback reads Q and a norm's weights,
    not K or V) copies only those."""

    def __init__(self, program: Program, tensors: dict, dtype: torch.dtype, device=None):
        super().__init__()
        self.nodes, self.tensors, self.dtype, self.device = program.input_map, tensors, dtype, device

    def __missing__(self, name: str) -> torch.Tensor:
        node, t = self.nodes[name], self.tensors[name]
        t = t.to(self.device) if self.device is not None else t
        self[name] = out = t.to(self.dtype) if node.dtype == ir.FLOAT else \
            t.to(torch.bool) if node.dtype == ir.BOOL else t.to(torch.int64)
        return out


class _DnfEval:
    guarding_logic = False   # and / or guard their right operand (gradient DNFs); the program's own DNF: not

    def __init__(self, program: Program, b: Binding):
        self.p, self.b = program, b
        self.dev = b.device   # every tensor made here lives where the inputs do (the GPU's, for the epilogue)
        self.nb = len(b.batch)
        self.inputs = Converted(program, b.tensors, F64)

    def rank(self, active):
        return self.nb + len(active)

    def full(self, t, active):
        t = torch.as_tensor(t)
        r = self.rank(active)
        if t.dim() == 0:
            return t.reshape([1] * r)
        if t.dim() < r:  # built from variables only: prepend the batch axes
            return t.reshape(*([1] * (r - t.dim())), *t.shape)
        return t

    def env(self, active):
        env = {}
        n = len(active)
        for k, (v, ext, chunk) in enumerate(active):
            shape = [1] * n
            rng = torch.arange(ext, dtype=torch.int64, device=self.dev) if chunk is None else chunk
            shape[k] = rng.numel()
            env[v] = rng.reshape(shape)
        for d in self.p.dims:
            env[d] = self.b.dims[d.name]
        return env

    def ev(self, e, active, guard=None):
        f = getattr(self, "e_" + type(e).__name__)
        return f(e, active, guard)

    def e_Const(self, e, active, guard):
        dt = torch.bool if e.dtype == ir.BOOL else torch.int64 if e.dtype == ir.INT else F64
        return self.full(torch.tensor(e.value, dtype=dt, device=self.dev), active)

    def e_Index(self, e, active, guard):
        v = torch.as_tensor(ieval(e.expr, self.env(active)), device=self.dev)
        v = v.to(torch.int64) if not v.is_floating_point() else v.to(F64)
        return self.full(v, active)

    def e_Read(self, e, active, guard):
        t = self.inputs[e.name]
        env = self.env(active)
        own = t.shape[self.nb:]
        idx = []
        shape = torch.broadcast_shapes(*(torch.as_tensor(ieval(i, env)).shape for i in e.index)) if e.index else ()
        for k, i in enumerate(e.index):
            v = torch.as_tensor(ieval(i, env), dtype=torch.int64, device=self.dev)
            v = v.expand(shape) if v.dim() else v.expand(shape) if shape else v
            bad = (v < 0) | (v >= own[k])
            if guard is not None:
                bad = bad & self._vars_guard(guard, bad.shape, len(active))
            self.check_range(bad, e, k, own[k])
            idx.append(v.clamp(0, max(own[k] - 1, 0)))
        out = t[(Ellipsis, *idx)] if idx else t
        if not shape and self.nb:   # a scalar (or a constant index: lam[0]) with batch axes: at every point
            out = out.reshape(*out.shape, *([1] * len(active)))
        return self.full(out.reshape(*self.b.batch, *out.shape[self.nb:]) if self.nb else out, active)

    @staticmethod
    def check_range(bad, e, k: int, extent: int) -> None:
        """An InputError where a read's index `k` leaves its axis at an unguarded point (bad: a bool tensor)."""
        if bool(bad.any()):
            raise InputError(f"index out of range: {e.name}[{', '.join(sy.show(x) for x in e.index)}] reads "
                             f"axis {k} (extent {extent}) outside 0..{extent - 1}; guard it with where(...)")

    def _vars_guard(self, guard, shape, nvars):
        """The guard over the variable axes only, any-reduced where the read does not vary."""
        g = guard
        for _ in range(self.nb):
            g = g.any(0)
        g = g.reshape(g.shape[-nvars:]) if nvars else g.reshape(())
        shape = (1,) * (nvars - len(shape)) + tuple(shape)
        for d in range(nvars):
            if shape[d] == 1 and g.shape[d] > 1:
                g = g.any(d, keepdim=True)
        return g.reshape(shape[nvars - len(shape):] if shape else ()) if g.numel() == 1 and not shape else g

    def e_Op(self, e, active, guard):
        if e.fn == "where":
            c = self.ev(e.args[0], active, guard)
            a = self.ev(e.args[1], active, c if guard is None else guard & c)
            b = self.ev(e.args[2], active, ~c if guard is None else guard & ~c)
            if a.dtype != b.dtype:
                a, b = a.to(F64), b.to(F64)
            return torch.where(c, a, b)
        if e.fn in ("and", "or") and self.guarding_logic:   # gradient DNFs: the scatter's range guard conjunct
            a = self.ev(e.args[0], active, guard)              # protects the next one (a substituted doc[j])
            g = a if a.dtype == torch.bool else a != 0
            g = g if e.fn == "and" else ~g
            b = self.ev(e.args[1], active, g if guard is None else guard & g)
            return scalar_fn(e.fn, [a, b])
        args = [self.ev(a, active, guard) for a in e.args]
        if e.dtype == ir.FLOAT:
            args = [a.to(F64) if a.dtype != torch.bool else a for a in args]
        elif e.fn not in ("and", "or", "not") and any(a.dtype == torch.bool for a in args):
            args = [a.to(torch.int64) for a in args]
        return scalar_fn(e.fn, args)

    def _inner(self, e, active, chunk=None):
        ext = int(sy.evaluate(e.extent, self.b.dims))
        return active + ((e.var, ext, chunk),), ext

    def _guard(self, guard):
        return None if guard is None else guard.unsqueeze(-1)

    def e_Reduce(self, e, active, guard):
        inner, ext = self._inner(e, active)
        t = self.full(self.ev(e.body, inner, self._guard(guard)), inner)
        t = t.expand(*t.shape[:-1], ext)
        if e.op == "sum":
            return t.sum(-1)
        if ext == 0:
            ident = float("-inf") if e.op == "max" else float("inf")
            return torch.full(t.shape[:-1], ident, dtype=F64, device=self.dev)
        return t.amax(-1) if e.op == "max" else t.amin(-1)

    def e_SoftmaxSum(self, e, active, guard):
        ext = int(sy.evaluate(e.extent, self.b.dims))
        m = l = o = None
        for start in range(0, max(ext, 1), CHUNK):
            chunk = torch.arange(start, min(start + CHUNK, ext), dtype=torch.int64, device=self.dev)
            if chunk.numel() == 0:
                break
            inner = active + ((e.var, ext, chunk),)
            s = self.full(self.ev(e.score, inner, self._guard(guard)), inner).to(F64)
            v = self.full(self.ev(e.value, inner, self._guard(guard)), inner).to(F64)
            s, v = torch.broadcast_tensors(s, v)
            mb = s.amax(-1)
            safe = torch.where(torch.isneginf(mb), 0.0, mb)
            w = torch.exp(s - safe.unsqueeze(-1))
            lb, ob = w.sum(-1), (w * v).sum(-1)
            if m is None:
                m, l, o = mb, lb, ob
                continue
            # (m, l, o) (+) (mb, lb, ob)
            mn = torch.maximum(m, mb)
            safe_n = torch.where(torch.isneginf(mn), 0.0, mn)
            a, b = torch.exp(m - safe_n), torch.exp(mb - safe_n)
            m, l, o = mn, l * a + lb * b, o * a + ob * b
        if m is None:
            return self.full(torch.zeros((), dtype=F64, device=self.dev), active)
        return torch.where(l == 0, torch.zeros((), dtype=F64, device=self.dev), o / torch.where(l == 0, 1.0, l))

    def e_NormSum(self, e, active, guard):
        inner, ext = self._inner(e, active)
        w = self.full(self.ev(e.weight, inner, self._guard(guard)), inner).to(F64)
        v = self.full(self.ev(e.value, inner, self._guard(guard)), inner).to(F64)
        w, v = torch.broadcast_tensors(w, v)
        z = w.sum(-1)
        zero = torch.zeros((), dtype=F64, device=self.dev)
        return torch.where(z == 0, zero, (w * v).sum(-1) / torch.where(z == 0, 1.0, z))

    def e_KeySum(self, e, active, guard):
        inner, ext = self._inner(e, active)
        w = self.full(self.ev(e.weight, inner, self._guard(guard)), inner).to(F64)
        v = self.full(self.ev(e.value, inner, self._guard(guard)), inner).to(F64)
        w, v = torch.broadcast_tensors(w, v)
        return (w * v).sum(-1)

    def e_LogSumExp(self, e, active, guard):
        inner, ext = self._inner(e, active)
        s = self.full(self.ev(e.score, inner, self._guard(guard)), inner).to(F64)
        return torch.logsumexp(s.expand(*s.shape[:-1], ext), -1)


def evaluate_dnf(program: Program, outputs, inputs: dict | None = None, dims: dict | None = None,
                 binding: Binding | None = None) -> dict:
    """Every DNF output evaluated on the call's tensors: name -> float64 tensor of shape batch + output."""
    b = binding or bind(program, inputs, dims)
    ev = _DnfEval(program, b)
    res = {}
    for o in outputs:
        exts = [int(sy.evaluate(x, b.dims)) for x in o.extents]
        active = tuple((v, ext, None) for v, ext in zip(o.vars, exts))
        t = ev.full(ev.ev(o.expr, active), active)
        res[o.name] = t.expand((*b.batch, *exts)).contiguous()
    return res
