"""Reverse-mode differentiation of the DNF: a gradient DNF for every float input, derived by rules.

The loss is L = sum over the outputs of <V> psi dO * <V> psi O (dO: the cotangent of output O, an input of the
gradient). The adjoint of a sub-expression e of an output's DNF, at a point of the variables bound around e (the
output's, then each enclosing reduction's), is dL/de there; it is kept as a product of factors under conditions,
`where(C1 and C2 ..., F1 * F2 * ..., 0)` (class Adjoint). It starts as dO at the output and is pushed down the
expression by GRAD_RULES, one rule per kind of node, each stating its identity:

| rule | identity (adj = the adjoint arriving at the node) |
|---|---|
| `grad-read` | `A[f(V)]`: dA[f(V)] += adj  (scattered by moa/grad_scatter.py) |
| `grad-ewise` | `f(x1, x2 ...)`: adj(x_k) += adj * df/dx_k, the partials by sympy (moa/grad_sym.py) |
| `grad-where` | `where(c, a, b)`: adj(a) += where(c, adj, 0); adj(b) += where(c, 0, adj) |
| `grad-sum` | `+red_v x`: adj(x at v) += adj |
| `grad-extremum` | `max red_v x`: adj(x at v) += adj * (x == M) / #{v : x == M}  (ties share, as torch.amax) |
| `grad-softmax-sum` | `fin((+)_j (s, 1, v))` = O: adj(v_j) += adj P_j; adj(s_j) += adj P_j (v_j - O) |
|  | with P_j = exp(s_j - lse) |
| `grad-norm-sum` | `+red w v / +red w` = O: adj(v_j) += adj w_j / Z; adj(w_j) += adj (v_j - O) / Z (0 where Z = 0) |
| `grad-logsumexp` | `log +red_j exp(s)` = L: adj(s_j) += adj exp(s_j - L) |
| `grad-constant` | constants, index values, comparisons and integer arithmetic: no adjoint |

A masked score `where(m, x, -inf)` (or weight `where(m, x, 0)`) is peeled first: P_j is 0 off the mask, so the
adjoint of x carries the condition m and exp(x - lse) is only evaluated where m holds (fully masked rows get no
adjoint at all, never exp(-inf - -inf)). The forward values a rule needs (O, lse, Z, L of each monoid
reduction) are *saved*: DNF outputs of their own (`GradProgram.saved`, evaluated by the forward), which the
gradients read like inputs (FlashAttention saves O and lse). Gradients of inputs that are read with several
indices (a bias table at i - j + n - 1, a kv head at a // (h // g)) are sums over the points that read an element
(moa/grad_scatter.py).
"""
from __future__ import annotations

from dataclasses import dataclass

import sympy as sp

from . import ir
from . import symbolic as sy
from .dnf import DnfOutput, Rule, show
from .dnf_nodes import (BINDERS, Const, Index, LogSumExp, NormSum, Op, Read, Reduce, SoftmaxSum, free_vars, nodes,
                        show_clipped, subs)
from .errors import UnsupportedError
from .grad_scatter import Term, scatter, subs_free
from .grad_sym import Translation, is_smooth_op
from .program import Program

NEG_INF = float("-inf")


@dataclass(frozen=True)
class Adjoint:
    """dL/de at every point of `ranges` ((var, extent) ...: the output's variables, then each enclosing binder's):
    where(and(conds), prod(factors), 0)."""
    ranges: tuple
    conds: tuple = ()
    factors: tuple = ()

    def times(self, *fs) -> Adjoint:
        keep = tuple(f for f in fs if not (isinstance(f, Const) and f.value == 1))
        return Adjoint(self.ranges, self.conds, self.factors + keep)

    def guard(self, *cs) -> Adjoint:
        return Adjoint(self.ranges, self.conds + tuple(cs), self.factors)

    def over(self, var, extent) -> Adjoint:
        return Adjoint(self.ranges + ((var, extent),), self.conds, self.factors)


@dataclass(frozen=True)
class GradProgram:
    """The gradients of a program: `cotangents` output name -> the read name of its cotangent (shaped like the
    output); `saved` the forward values the gradients read (DNF outputs over the inputs); `grads` one DNF output
    per float input (named like the input, shaped like it), over the inputs, the cotangents and the saved values."""
    outputs: tuple
    cotangents: dict
    saved: tuple
    grads: tuple

    @property
    def grad_map(self) -> dict:
        return {g.name: g for g in self.grads}


def cotangent_name(output: str) -> str:
    """The cotangent of an output, as the gradient DNF reads it (user names never start with '__')."""
    return f"__d{output}"


# ---- the rules ----------------------------------------------------------------------------------------------


def peel(score, neutral: float):
    """(conditions, x) with score = where(c1, where(c2, x, neutral), neutral) ... (either branch order)."""
    conds = []
    while isinstance(score, Op) and score.fn == "where":
        c, a, b = score.args
        if _is_value(b, neutral):
            conds.append(c)
            score = a
        elif _is_value(a, neutral):
            conds.append(Op("not", (c,), ir.BOOL))
            score = b
        else:
            break
    return tuple(conds), score


def _is_value(e, v: float) -> bool:
    return isinstance(e, Const) and not isinstance(e.value, bool) and e.value == v or \
        isinstance(e, Index) and e.expr.is_number and float(e.expr) == v


def _grad_read(bp, e: Read, adj: Adjoint):
    # adj(A[f(V)])  ->  dA[f(V)] += adj
    """grad-read: the adjoint of a float input's read is a term of that input's gradient."""
    if e.dtype == ir.FLOAT and e.name in bp.float_inputs:
        bp.terms.append(Term(e.name, tuple(sp.sympify(x) for x in e.index), adj.ranges, adj.conds, adj.factors))


def _grad_constant(bp, e, adj: Adjoint):
    # adj(c), adj(index value), adj(comparison)  ->  nothing
    """grad-constant: constants, index arithmetic, comparisons, logic and integer operations have no adjoint."""


def _grad_ewise(bp, e: Op, adj: Adjoint):
    # adj(f(x1, x2 ...))  ->  adj(x_k) += adj * df/dx_k      (sympy)
    """grad-ewise: the maximal elementwise float sub-expression is one sympy expression over its leaves; each float
    leaf receives the adjoint times the partial derivative, which reads the forward values of the leaves (saved
    monoid results in place of their recomputation)."""
    t = Translation(e)
    forward = {leaf: bp.primal(leaf, adj) for leaf in t.leaves.values()}
    for s, leaf in t.leaves.items():
        if node_kind(leaf) == "constant":   # index values, integer reads: grad-constant
            bp.back(leaf, adj)
            continue
        d = t.partial(s)
        if d == 0:
            continue
        bp.back(leaf, adj.times(t.to_dnf(d, forward)))


def _grad_where(bp, e: Op, adj: Adjoint):
    # adj(where(c, a, b))  ->  adj(a) += where(c, adj, 0) ; adj(b) += where(c, 0, adj)
    """grad-where: each branch receives the adjoint where it was taken (the condition has no adjoint)."""
    c, a, b = e.args
    if a.dtype == ir.FLOAT:
        bp.back(a, adj.guard(c))
    if b.dtype == ir.FLOAT:
        bp.back(b, adj.guard(Op("not", (c,), ir.BOOL)))


def _grad_sum(bp, e: Reduce, adj: Adjoint):
    # adj(+red_v x)  ->  adj(x at v) += adj
    """grad-sum: every term of a sum receives the sum's adjoint."""
    bp.back(e.body, adj.over(e.var, e.extent))


def _grad_extremum(bp, e: Reduce, adj: Adjoint):
    # adj(max red_v x)  ->  adj(x at v) += adj * where(x == M, 1, 0) / +red_v' where(x' == M, 1, 0)
    """grad-extremum: the terms equal to the extremum M share its adjoint evenly (torch.amax / amin)."""
    v2 = bp.fresh("t")
    m = Reduce(e.op, v2, e.extent, subs(e.body, {e.var: v2}))
    v3 = bp.fresh("t")
    at = Op("eq", (subs(e.body, {e.var: v3}), m), ir.BOOL)
    count = Reduce("sum", v3, e.extent, Op("where", (at, Const(1.0), Const(0.0)), ir.FLOAT))
    bp.back(e.body, adj.over(e.var, e.extent).guard(Op("eq", (e.body, m), ir.BOOL))
            .times(Op("div", (Const(1.0), count), ir.FLOAT)))


def _grad_softmax_sum(bp, e: SoftmaxSum, adj: Adjoint):
    # adj(fin((+)_j (s, 1, v)))  ->  adj(v_j) += adj P_j ; adj(s_j) += adj P_j (v_j - O),   P_j = exp(s_j - lse)
    """grad-softmax-sum: O = sum_j P_j v_j with P = softmax_j(s): dO/dv_j = P_j and dO/ds_j = P_j (v_j - O). The
    mask of the score is peeled (P_j = 0 off it); O and lse are saved forward values."""
    out, lse = bp.save(e, "O", e, adj), bp.save(e, "lse", LogSumExp(e.var, e.extent, e.score), adj)
    conds, x = peel(e.score, NEG_INF)
    if _is_value(x, NEG_INF):   # no admissible key anywhere: P = 0, no adjoint (never exp(-inf - -inf))
        return
    inner = adj.over(e.var, e.extent).guard(*conds)
    p = Op("exp", (Op("sub", (x, lse), ir.FLOAT),), ir.FLOAT)
    bp.back(e.value, inner.times(p))
    bp.back(x, inner.times(p, Op("sub", (e.value, out), ir.FLOAT)))


def _grad_norm_sum(bp, e: NormSum, adj: Adjoint):
    # adj(+red w v / +red w)  ->  adj(v_j) += adj w_j / Z ; adj(w_j) += adj (v_j - O) / Z      (0 where Z = 0)
    """grad-norm-sum: O = sum_j w_j v_j / Z, Z = sum_j w_j: dO/dv_j = w_j / Z and dO/dw_j = (v_j - O) / Z; where
    Z = 0 the output is the constant 0 and has no adjoint. O and Z are saved forward values."""
    out, z = bp.save(e, "O", e, adj), bp.save(e, "Z", Reduce("sum", e.var, e.extent, e.weight), adj)
    conds, x = peel(e.weight, 0.0)
    inv = Op("div", (Const(1.0), z), ir.FLOAT)
    inner = adj.over(e.var, e.extent).guard(Op("ne", (z, Const(0.0)), ir.BOOL), *conds)
    bp.back(e.value, inner.times(x, inv))
    bp.back(x, inner.times(Op("sub", (e.value, out), ir.FLOAT), inv))


def _grad_logsumexp(bp, e: LogSumExp, adj: Adjoint):
    # adj(log +red_j exp(s))  ->  adj(s_j) += adj exp(s_j - L)
    """grad-logsumexp: dL/ds_j = exp(s_j - L) (softmax), 0 off the score's mask; L is a saved forward value."""
    total = bp.save(e, "L", e, adj)
    conds, x = peel(e.score, NEG_INF)
    if _is_value(x, NEG_INF):   # L = -inf for every row: no adjoint
        return
    bp.back(x, adj.over(e.var, e.extent).guard(*conds).times(Op("exp", (Op("sub", (x, total), ir.FLOAT),),
                                                                 ir.FLOAT)))


GRAD_RULES = {
    "read": Rule("grad-read", "adj(A[f(V)]) => dA[f(V)] += adj", _grad_read),
    "constant": Rule("grad-constant", "adj(c) => nothing   (constants, index values, comparisons, integers)",
                     _grad_constant),
    "ewise": Rule("grad-ewise", "adj(f(x1, x2 ...)) => adj(x_k) += adj * df/dx_k   (sympy)", _grad_ewise),
    "where": Rule("grad-where", "adj(where(c, a, b)) => adj(a) += where(c, adj, 0) ; adj(b) += where(c, 0, adj)",
                  _grad_where),
    "sum": Rule("grad-sum", "adj(+red_v x) => adj(x_v) += adj", _grad_sum),
    "extremum": Rule("grad-extremum", "adj(max red_v x) => adj(x_v) += adj * (x_v == M) / #(x == M)",
                     _grad_extremum),
    "softmax-sum": Rule("grad-softmax-sum", "adj(fin((+)_j (s, 1, v))) => adj(v_j) += adj P_j ; adj(s_j) += "
                                            "adj P_j (v_j - O)   (P_j = exp(s_j - lse))", _grad_softmax_sum),
    "norm-sum": Rule("grad-norm-sum", "adj(+red w v / +red w) => adj(v_j) += adj w_j / Z ; adj(w_j) += adj "
                                      "(v_j - O) / Z", _grad_norm_sum),
    "logsumexp": Rule("grad-logsumexp", "adj(log +red_j exp(s)) => adj(s_j) += adj exp(s_j - L)", _grad_logsumexp),
}


def node_kind(e) -> str:
    """The GRAD_RULES key of a DNF node."""
    if getattr(e, "dtype", None) != ir.FLOAT and isinstance(e, (Const, Index, Op, Read)):
        return "constant"
    if isinstance(e, Read):
        return "read"
    if isinstance(e, SoftmaxSum):
        return "softmax-sum"
    if isinstance(e, NormSum):
        return "norm-sum"
    if isinstance(e, LogSumExp):
        return "logsumexp"
    if isinstance(e, Reduce):
        return "sum" if e.op == "sum" else "extremum"
    if isinstance(e, Op) and e.dtype == ir.FLOAT:
        if e.fn == "where":
            return "where"
        if is_smooth_op(e):
            return "ewise"
    if isinstance(e, (Const, Index, Op)):
        return "constant"
    raise UnsupportedError(f"no gradient rule for {type(e).__name__}: {show_clipped(e, 120)}")


# ---- the pass -----------------------------------------------------------------------------------------------


class _Backprop:
    def __init__(self, program: Program, taken: set):
        self.float_inputs = {n.attrs[0] for n in program.inputs if n.dtype == ir.FLOAT}
        self.terms: list = []
        self.saved: dict = {}        # (kind, node) -> DnfOutput
        self.taken = set(taken)

    def fresh(self, base: str) -> sp.Symbol:
        k = 0
        while f"{base}{k}" in self.taken:
            k += 1
        self.taken.add(f"{base}{k}")
        return sy.index_var(f"{base}{k}")

    def back(self, e, adj: Adjoint):
        GRAD_RULES[node_kind(e)].apply(self, e, adj)

    def save(self, node, kind: str, value, adj: Adjoint) -> Read:
        """The read of a saved forward value (one per monoid reduction and kind), over its free variables in the
        order of the enclosing ranges."""
        key = (kind, node)
        if key not in self.saved:
            fv = free_vars(value)
            order = [(v, x) for v, x in adj.ranges if v in fv]
            name = f"__{kind}{sum(1 for k in self.saved if k[0] == kind)}"
            self.saved[key] = DnfOutput(name, tuple(v for v, _ in order), tuple(x for _, x in order), value, ir.FLOAT)
        out = self.saved[key]
        return Read(out.name, out.vars, ir.FLOAT)

    def primal(self, leaf, adj: Adjoint):
        """The forward value of an elementwise expression's leaf as a derivative reads it."""
        if isinstance(leaf, (SoftmaxSum, NormSum, LogSumExp)):
            return self.save(leaf, "L" if isinstance(leaf, LogSumExp) else "O", leaf, adj)
        return leaf


def _names(program: Program, outputs) -> set:
    taken = {*(d.name for d in program.dims), *(p for p, _ in program.params), *(n for n, _ in program.bindings)}
    taken |= {n.attrs[0] for n in program.inputs}
    for o in outputs:
        taken |= {v.name for v in o.vars}
        for x in nodes(o.expr):
            if isinstance(x, BINDERS):
                taken.add(x.var.name)
    return taken


def grad(program: Program, outputs, extra: dict | None = None) -> GradProgram:
    """The gradient DNF of every float input of a program whose outputs have the DNF `outputs` (moa.dnf.dnf);
    `extra` (name -> shape): more float arrays the outputs read, whose gradients follow the inputs' (the branch
    values of an epilogue, runtime/backward_multi.py)."""
    bp = _Backprop(program, _names(program, outputs))
    bp.float_inputs |= set(extra or {})
    cot = {}
    for o in outputs:
        if o.dtype != ir.FLOAT:
            continue
        cot[o.name] = cotangent_name(o.name)
        start = Adjoint(tuple(zip(o.vars, o.extents)), (), (Read(cot[o.name], o.vars, ir.FLOAT),))
        bp.back(o.expr, start)
    arrays = [(n.attrs[0], n.shape) for n in program.inputs if n.dtype == ir.FLOAT] + list((extra or {}).items())
    grads = []
    for name, shape in arrays:
        us = tuple(bp.fresh("u") for _ in shape)
        expr = None
        for t in (t for t in bp.terms if t.name == name):
            x = scatter(t, us, shape)
            expr = x if expr is None else Op("add", (expr, x), ir.FLOAT)
        grads.append(DnfOutput(name, us, tuple(shape), Const(0.0) if expr is None else expr, ir.FLOAT))
    return GradProgram(tuple(outputs), cot, tuple(bp.saved.values()), tuple(grads))


def show_grad(gp: GradProgram) -> str:
    """The gradient program in MoA notation: saved forward values, then one gradient per float input."""
    lines = [f"saved <{' '.join(v.name for v in s.vars)}> psi {s.name} = {show(s.expr)}" for s in gp.saved]
    lines += [f"<{' '.join(v.name for v in g.vars)}> psi d{g.name} = {show(g.expr)}" for g in gp.grads]
    return "\n".join(lines)


__all__ = ["GRAD_RULES", "Adjoint", "GradProgram", "cotangent_name", "grad", "node_kind", "peel", "show_grad",
           "subs_free"]
