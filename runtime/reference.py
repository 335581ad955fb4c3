"""The meaning of a program: the IR evaluated op by op with torch in float64, unfused (every array exists).

Values are tensors shaped batch + context + own: `batch` are the call's extra leading axes, `context` one axis
per index variable of the enclosing comprehensions (size 1 where a value does not depend on it), `own` the
node's shape. `where(c, a, b)` evaluates each branch under a guard so that an out-of-range read in an untaken
branch is no error, while an unguarded out-of-range read is.
"""
from __future__ import annotations


import torch

from moa import ir
from moa import symbolic as sy
from moa.errors import InputError, UnsupportedError
from moa.program import Program

from .binding import Binding, bind
from .indexing import ieval

F64 = torch.float64

_UNARY = {
    "exp": torch.exp, "log": torch.log, "sqrt": torch.sqrt, "rsqrt": torch.rsqrt, "tanh": torch.tanh,
    "sigmoid": torch.sigmoid, "elu": torch.nn.functional.elu, "sin": torch.sin, "cos": torch.cos, "erf": torch.erf,
    "neg": torch.neg, "abs": torch.abs, "sign": torch.sign, "relu": torch.relu, "not": torch.logical_not,
}
_BINARY = {
    "add": torch.add, "sub": torch.sub, "mul": torch.mul, "div": torch.true_divide,
    "floordiv": lambda a, b: torch.div(a, b, rounding_mode="floor"), "mod": torch.remainder,
    "min": torch.minimum, "max": torch.maximum, "lt": torch.lt, "le": torch.le, "gt": torch.gt,
    "ge": torch.ge, "eq": torch.eq, "ne": torch.ne, "and": torch.logical_and, "or": torch.logical_or,
}


def scalar_fn(fn: str, args: list):
    """Apply a scalar function (ir names) to broadcasting tensors; float64 semantics of the language."""
    if fn in _UNARY:
        return _UNARY[fn](args[0])
    if fn == "where":
        return torch.where(args[0], args[1], args[2])
    if fn == "pow":
        a, b = args
        if not a.is_floating_point() and not b.is_floating_point():
            if (b < 0).any():
                return torch.pow(a.to(F64), b.to(F64))
            return torch.pow(a, b)
        return torch.pow(a, b)
    return _BINARY[fn](*args)


class _Eval:
    def __init__(self, program: Program, b: Binding):
        self.p, self.b = program, b
        self.nb = len(b.batch)
        self.memo: dict = {}

    def lead(self, ctx) -> int:
        return self.nb + len(ctx)

    def ones(self, ctx) -> list:
        return [1] * self.lead(ctx)

    def run(self, node, ctx=(), guard=None):
        guard = self.aligned(guard, ctx, node.rank)
        key = (id(node), tuple(v for v, _ in ctx), id(guard))
        if key not in self.memo:
            # node and guard are kept alive with the result so that their ids stay unique
            self.memo[key] = (getattr(self, "op_" + node.op)(node, ctx, guard), node, guard)
        return self.memo[key][0]

    def aligned(self, guard, ctx, rank: int):
        """A guard as the node of own rank `rank` sees it: the context axes, then the node's own axes (an
        elementwise parent's leading own axes are its child's); axes past them any-reduced (the child does not
        vary along them: scalar extension), missing ones broadcast. Structural ops pass `lead(guard)`."""
        if guard is None:
            return None
        want = self.lead(ctx) + rank
        if guard.dim() > want:
            return guard.flatten(want).any(-1)
        return guard.reshape((*guard.shape, *([1] * (want - guard.dim())))) if guard.dim() < want else guard

    def lead_guard(self, guard, ctx):
        """The guard over the context axes only (any cell of the own axes counts): what a structural op (a
        reduction, transpose, read, contraction ...) passes on, its operands' axes not being its own."""
        return self.aligned(guard, ctx, 0)

    def align(self, t, rank, want):
        """Give a value of own rank `rank` the own rank `want` (scalar extension adds trailing axes)."""
        return t.reshape((*t.shape, *([1] * (want - rank)))) if rank < want else t

    # leaves
    def op_input(self, n, ctx, guard):
        t = self.b.tensors[n.attrs[0]]
        t = t.to(F64) if n.dtype == ir.FLOAT else t.to(torch.bool) if n.dtype == ir.BOOL else t.to(torch.int64)
        return t.reshape((*self.b.batch, *([1] * len(ctx)), *t.shape[self.nb:]))

    def op_const(self, n, ctx, guard):
        v = n.attrs[0]
        dt = torch.bool if n.dtype == ir.BOOL else torch.int64 if n.dtype == ir.INT else F64
        return torch.tensor(v, dtype=dt).reshape(self.ones(ctx))

    def env(self, ctx):
        env = {}
        for k, (v, ext) in enumerate(ctx):
            shape = self.ones(ctx)
            shape[self.nb + k] = ext
            env[v] = torch.arange(ext, dtype=torch.int64).reshape(shape)
        for d in self.p.dims:
            env[d] = self.b.dims[d.name]
        return env

    def op_sym(self, n, ctx, guard):
        v = ieval(n.attrs[0], self.env(ctx))
        t = torch.as_tensor(v)
        t = t.to(torch.int64) if not t.is_floating_point() else t.to(F64)
        return t.reshape((*t.shape, *([1] * (self.lead(ctx) - t.dim())))) if t.dim() < self.lead(ctx) else t

    def op_vec(self, n, ctx, guard):
        vals = [int(sy.evaluate(v, self.b.dims)) for v in n.attrs[0]]
        return torch.tensor(vals, dtype=torch.int64).reshape(*self.ones(ctx), len(vals))

    def op_iota(self, n, ctx, guard):
        ext = int(sy.evaluate(n.attrs[0], self.b.dims))
        return torch.arange(ext, dtype=torch.int64).reshape((*self.ones(ctx), ext))

    # elementwise
    def op_ewise(self, n, ctx, guard):
        fn = n.attrs[0]
        if fn == "where":
            c = self.align(self.run(n.args[0], ctx, guard), n.args[0].rank, n.rank)
            g = c if guard is None else guard & c   # both: the context axes, then this node's own
            a = self.align(self.run(n.args[1], ctx, g), n.args[1].rank, n.rank)
            b = self.align(self.run(n.args[2], ctx, ~c if guard is None else guard & ~c), n.args[2].rank, n.rank)
            if a.dtype != b.dtype:
                a, b = a.to(F64), b.to(F64)
            return torch.where(c, a, b)
        args = [self.align(self.run(a, ctx, guard), a.rank, n.rank) for a in n.args]
        if n.dtype == ir.FLOAT:
            args = [a.to(F64) if not a.dtype == torch.bool else a for a in args]
            if guard is not None and torch.is_grad_enabled() and any(a.requires_grad for a in args):
                args = self.gated(args, guard)
        elif fn not in ("and", "or", "not") and any(a.dtype == torch.bool for a in args):
            args = [a.to(torch.int64) for a in args]
        try:
            return scalar_fn(fn, args)
        except RuntimeError as e:  # torch: integer // or % by a zero element of the data
            if "ZeroDivision" not in str(e):
                raise
            raise InputError(f"integer division by zero at {n.loc} ('{fn}' of the call's data)") from None

    def gated(self, args: list, guard) -> list:
        """The float arguments of an op evaluated under a guard, their gradients zeroed where the guard is false:
        a cell no taken branch reads gets no gradient, so an op whose derivative is infinite there (exp of a large
        score in the untaken branch) gives 0, not 0 * inf = NaN. The guard is aligned with the op (`aligned`: the
        context axes, then the op's own), so each cell is gated by its own guard."""
        shape = torch.broadcast_shapes(*(a.shape for a in args))
        g = guard.flatten(len(shape)).any(-1) if guard.dim() > len(shape) else \
            guard.reshape((*guard.shape, *([1] * (len(shape) - guard.dim()))))
        for d in range(len(shape)):  # the op does not vary along this axis: any guarded cell counts
            if shape[d] == 1 and g.shape[d] > 1:
                g = g.any(d, keepdim=True)
        return [_Gate.apply(a.expand(shape), g) if a.requires_grad else a for a in args]

    # structure
    def op_matmul(self, n, ctx, guard):
        guard = self.lead_guard(guard, ctx)
        a, b = n.args
        x, y = self.run(a, ctx, guard), self.run(b, ctx, guard)
        dt = F64 if n.dtype == ir.FLOAT else torch.int64
        x, y = x.to(dt), y.to(dt)
        letters = "abcdefghijklmnopqrstuvwxyz"
        ra, rb = a.rank, b.rank
        sa = letters[:ra]
        sb = sa[-1] + letters[ra:ra + rb - 1]
        out = sa[:-1] + sb[1:]
        return torch.einsum(f"...{sa},...{sb}->...{out}", x, y)

    def op_transpose(self, n, ctx, guard):
        guard = self.lead_guard(guard, ctx)
        t = self.run(n.args[0], ctx, guard)
        L = self.lead(ctx)
        return t.permute((*range(L), *(L + p for p in n.attrs[0])))

    def op_psi(self, n, ctx, guard):
        guard = self.lead_guard(guard, ctx)
        a, *ix = n.args
        slots = n.attrs[0]
        t = self.run(a, ctx, guard)
        L = self.lead(ctx)
        idx = [self.run(i, ctx, guard) for i in ix]
        lead_shape = torch.broadcast_shapes(t.shape[:L], *(i.shape for i in idx))
        own = list(t.shape[L:])
        kept = [k for k, s in enumerate(slots) if s == ":"]
        taken = [k for k, s in enumerate(slots) if s == "i"]
        rest = list(range(len(slots), a.rank))
        # gather with broadcast index tensors: never expand the array over the lead shape (that is n^4 for a
        # comprehension reading a matrix)
        t = t.permute((*range(L), *(L + k for k in taken + kept + rest)))
        g = None
        if guard is not None:
            g = guard.flatten(L).any(-1) if guard.dim() > L else guard
            for d in range(L):  # the read does not vary along this axis: any guarded cell counts
                if lead_shape[d] == 1 and g.shape[d] > 1:
                    g = g.any(d, keepdim=True)
        lead_ix = []
        for d in range(L):
            shape = [1] * L
            shape[d] = t.shape[d]
            lead_ix.append(torch.arange(t.shape[d]).reshape(shape))
        flat = []
        for k, i in zip(taken, idx):
            ext = own[k]
            bad = (i < 0) | (i >= ext)
            if g is not None:
                bad = bad & g
            if bool(bad.any()):
                where = n.loc or a.loc
                what = f"the read of {a.attrs[0]}, " if a.op == "input" else ""
                both = torch.broadcast_shapes(i.shape, bad.shape)   # a guard may have axes the index has not
                raise InputError(f"index out of range at {where}: {what}axis {k} of extent {ext} read at index "
                                 f"{int(i.expand(both)[bad.expand(both)][0])} (guard the read with where(...))")
            flat.append(i.clamp(0, max(ext - 1, 0)))
        if not flat:
            return t.expand((*lead_shape, *t.shape[L:]))
        if any(own[k] == 0 for k in taken):   # an empty axis, read only where a guard fails: one unused zero cell
            shape = list(t.shape)
            for pos in range(len(taken)):
                shape[L + pos] = max(shape[L + pos], 1)
            t = t.new_zeros(shape)
        out = t[(*lead_ix, *flat)]
        return out.expand((*lead_shape, *out.shape[L:])) if out.dim() >= L else out

    def op_comp(self, n, ctx, guard):
        vs = n.attrs[0]
        exts = [int(sy.evaluate(e, self.b.dims)) for e in n.shape[:len(vs)]]
        inner = tuple(ctx) + tuple(zip(vs, exts))
        t = self.run(n.args[0], inner, guard)   # its own axes are the variables, then the body's own
        L = self.lead(ctx)
        want = list(t.shape)
        for k, e in enumerate(exts):
            want[L + k] = e
        return t.expand(tuple(want))

    def op_reduce(self, n, ctx, guard):
        guard = self.lead_guard(guard, ctx)
        op, ax = n.attrs
        t = self.run(n.args[0], ctx, guard)
        dim = self.lead(ctx) + ax
        if op == "sum":
            return t.sum(dim)
        if t.shape[dim] == 0:
            raise InputError(f"{op} over an empty axis at {n.loc}")
        return t.amax(dim) if op == "max" else t.amin(dim)

    def op_softmax(self, n, ctx, guard):
        guard = self.lead_guard(guard, ctx)
        t = self.run(n.args[0], ctx, guard).to(F64)
        dim = self.lead(ctx) + n.attrs[0]
        return softmax(t, dim)

    def op_normalize(self, n, ctx, guard):
        guard = self.lead_guard(guard, ctx)
        t = self.run(n.args[0], ctx, guard).to(F64)
        s = t.sum(self.lead(ctx) + n.attrs[0], keepdim=True)
        return torch.where(s == 0, torch.zeros((), dtype=F64), t / torch.where(s == 0, 1.0, s))

    def op_logsumexp(self, n, ctx, guard):
        guard = self.lead_guard(guard, ctx)
        t = self.run(n.args[0], ctx, guard).to(F64)
        return torch.logsumexp(t, self.lead(ctx) + n.attrs[0])

    def op_take(self, n, ctx, guard):
        guard = self.lead_guard(guard, ctx)
        t = self.run(n.args[0], ctx, guard)
        dim = self.lead(ctx)
        k = int(sy.evaluate(n.attrs[0], self.b.dims))
        return t.narrow(dim, 0, k) if k >= 0 else t.narrow(dim, t.shape[dim] + k, -k)

    def op_drop(self, n, ctx, guard):
        guard = self.lead_guard(guard, ctx)
        t = self.run(n.args[0], ctx, guard)
        dim = self.lead(ctx)
        k = int(sy.evaluate(n.attrs[0], self.b.dims))
        size = t.shape[dim]
        return t.narrow(dim, k, size - k) if k >= 0 else t.narrow(dim, 0, size + k)

    def op_cat(self, n, ctx, guard):
        guard = self.lead_guard(guard, ctx)
        a, b = (self.run(x, ctx, guard) for x in n.args)
        L = self.lead(ctx)
        lead = torch.broadcast_shapes(a.shape[:L], b.shape[:L])
        a = a.expand((*lead, *a.shape[L:]))
        b = b.expand((*lead, *b.shape[L:]))
        if a.dtype != b.dtype:
            a, b = a.to(F64), b.to(F64)
        return torch.cat([a, b], dim=L)

    def op_reverse(self, n, ctx, guard):
        guard = self.lead_guard(guard, ctx)
        return self.run(n.args[0], ctx, guard).flip(self.lead(ctx))

    def op_rotate(self, n, ctx, guard):
        guard = self.lead_guard(guard, ctx)
        k = int(sy.evaluate(n.attrs[0], self.b.dims))
        return self.run(n.args[0], ctx, guard).roll(-k, self.lead(ctx))

    def op_reshape(self, n, ctx, guard):
        guard = self.lead_guard(guard, ctx)
        t = self.run(n.args[0], ctx, guard)
        L = self.lead(ctx)
        shape = [int(sy.evaluate(s, self.b.dims)) for s in n.attrs[0]]
        return t.reshape((*t.shape[:L], *shape))

    def op_outer(self, n, ctx, guard):
        guard = self.lead_guard(guard, ctx)
        a, b = n.args
        x, y = self.run(a, ctx, guard), self.run(b, ctx, guard)
        x = x.reshape((*x.shape, *([1] * b.rank)))
        L = self.lead(ctx)
        y = y.reshape((*y.shape[:L], *([1] * a.rank), *y.shape[L:]))
        if n.dtype == ir.FLOAT:
            x, y = x.to(F64), y.to(F64)
        return scalar_fn(n.attrs[0], [x, y])


class _Gate(torch.autograd.Function):
    """Identity whose gradient is zero where a guard is false (the reference's untaken where-branches)."""

    @staticmethod
    def forward(ctx, x, g):
        ctx.save_for_backward(g)
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        (g,) = ctx.saved_tensors
        return torch.where(g, grad, torch.zeros((), dtype=grad.dtype)), None


def softmax(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Softmax along dim; a row with no finite entry (fully masked) gives zeros."""
    m = t.amax(dim, keepdim=True) if t.shape[dim] else torch.zeros_like(t.sum(dim, keepdim=True))
    m = torch.where(torch.isneginf(m), torch.zeros((), dtype=t.dtype), m)
    e = torch.exp(t - m)
    s = e.sum(dim, keepdim=True)
    return torch.where(s == 0, torch.zeros((), dtype=t.dtype), e / torch.where(s == 0, 1.0, s))


def reference(program: Program, inputs: dict, dims: dict | None = None, binding: Binding | None = None) -> dict:
    """Every output of the program, evaluated unfused in float64: name -> tensor of shape batch + output."""
    b = binding or bind(program, inputs, dims)
    ev = _Eval(program, b)
    out = {}
    for name, node in program.outputs:
        try:
            t = ev.run(node)
        except (UnsupportedError, InputError):
            raise
        except RuntimeError as e:  # torch's allocator refusing an unfused intermediate: the call is too big
            if "alloc" not in str(e) and not isinstance(e, torch.OutOfMemoryError):
                raise
            raise InputError(f"the unfused float64 reference cannot allocate an intermediate array of output "
                             f"{name} for these dims ({', '.join(f'{k}={v}' for k, v in b.dims.items())}): "
                             f"{str(e).splitlines()[0][-160:]}") from None
        want = tuple(b.batch) + tuple(int(sy.evaluate(s, b.dims)) for s in node.shape)
        out[name] = t.expand(want).to(F64 if node.dtype == ir.FLOAT else t.dtype).contiguous()
    return out
