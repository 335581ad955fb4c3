"""Psi-reduction to the Denotational Normal Form.

The DNF of an output is the value of one element, `<i ...> psi O`, as a closed scalar expression over input
elements, index arithmetic, scalar operations and reductions over index ranges. No intermediate array remains:
psi is pushed through every array operation by the rules in PSI_RULES (one per operation, each stating its
identity), and softmax / normalize followed by a contraction become single monoid reductions by FUSION_RULES.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import sympy as sp

from . import ir
from . import symbolic as sy
from .errors import UnsupportedError
from .dnf_nodes import (BINDERS, Const, Index, KeySum, LogSumExp, NormalizeAt, NormSum, Op, Read, Reduce,
                        SoftmaxAt, SoftmaxSum, children, free_vars, nodes, show, subs, unguarded_reads,
                        with_children)
from .dnf_nodes import show_clipped  # noqa: F401  (for messages, re-exported)
from .program import Program

__all__ = ["BINDERS", "FUSION_RULES", "LOWERING_RULES", "PSI_RULES", "REASSOCIATION_RULES", "Const", "DnfOutput",
           "Index", "KeySum", "LogSumExp", "NormSum", "NormalizeAt", "Op", "Read", "Reduce", "Rule", "SoftmaxAt",
           "SoftmaxSum", "children", "dnf", "free_vars", "nodes", "show", "show_output", "subs", "unguarded_reads",
           "with_children"]

# ---- psi-reduction ---------------------------------------------------------------------------------------


class _Fresh:
    def __init__(self, taken):
        self.taken = set(taken)

    def __call__(self, base: str) -> sp.Symbol:
        for k in itertools.chain([""], itertools.count(1)):
            name = f"{base}{k}"
            if name not in self.taken:
                self.taken.add(name)
                return sy.index_var(name)
        raise AssertionError


@dataclass(frozen=True)
class Rule:
    """One rewrite: `identity` states it in MoA notation; `apply` performs it."""
    name: str
    identity: str
    apply: object


def _idx(node: ir.Node, env) -> sp.Expr:
    """A read's index as sympy index arithmetic; where(c, a, b) over index conditions is a Piecewise there (T5's
    bidirectional buckets, bias[where(j > i, nb, 0) + min(abs(i - j), nb - 1)])."""
    if node.op == "sym":
        return node.attrs[0].xreplace(env)
    if node.op == "const" and node.dtype == ir.INT:
        return sp.Integer(node.attrs[0])
    if node.op == "ewise" and node.dtype == ir.INT and node.rank == 0:
        fn, args = node.attrs[0], node.args
        cond = ir.index_condition(args[0]) if fn == "where" else None
        if cond is not None:
            a, b = _idx(args[1], env), _idx(args[2], env)
            return sp.Piecewise((a, cond.xreplace(env)), (b, True))
        if fn != "where":
            folded = ir.fold_int_expr(fn, [_idx(a, env) for a in args])
            if folded is not None and fn in ("floordiv", "mod") and folded.has(sp.Piecewise):
                return sp.piecewise_fold(folded)   # where(c, 30, 0) // 2 into the branches (sympy drops an exact floor)
            if folded is not None:
                return folded
    raise UnsupportedError("an index computed from array data (a gather) is not supported yet; index with "
                           "index arithmetic over index variables, dims and params", node.loc)


def _psi_input(n, idx, env, fresh):
    # <I> psi A => A[I]
    return Read(n.attrs[0], tuple(idx), n.dtype)


def _psi_const(n, idx, env, fresh):
    # <> psi c => c
    return Const(n.attrs[0], n.dtype)


def _psi_sym(n, idx, env, fresh):
    # <> psi (index arithmetic e) => e with the bound index variables substituted
    return Index(n.attrs[0].xreplace(env))


def _psi_vec(n, idx, env, fresh):
    # <k> psi <v0 v1 ...> => v_k (k known at compile time; else where(k == 0, v0, where(k == 1, v1, ...)))
    k = sp.sympify(idx[0])
    vals = n.attrs[0]
    if k.is_Integer:
        return Index(vals[int(k)])
    out = Index(vals[-1])
    for pos in range(len(vals) - 2, -1, -1):
        out = Op("where", (Op("eq", (Index(k), Index(sp.Integer(pos))), ir.BOOL), Index(vals[pos]), out), ir.INT)
    return out


def _psi_iota(n, idx, env, fresh):
    # <i> psi iota(n) => i
    return Index(sp.sympify(idx[0]))


def _psi_ewise(n, idx, env, fresh):
    # <I> psi f(A, B, ...) => f(<I> psi A, <I> psi B, ...)   (a scalar argument s: <I> psi s => s)
    args = tuple(psi_reduce(a, idx if a.rank else (), env, fresh) for a in n.args)
    return Op(n.attrs[0], args, n.dtype)


def _psi_matmul(n, idx, env, fresh):
    # <I J> psi (A +.x B) => +red_l (<I l> psi A) * (<l J> psi B)
    a, b = n.args
    ia, jb = idx[:a.rank - 1], idx[a.rank - 1:]
    l = fresh("k")
    body = Op("mul", (psi_reduce(a, (*ia, l), env, fresh), psi_reduce(b, (l, *jb), env, fresh)), n.dtype)
    return Reduce("sum", l, a.shape[-1], body, n.dtype)


def _psi_transpose(n, idx, env, fresh):
    # <I> psi transpose(A, perm) => <J> psi A with J[perm[k]] = I[k]
    perm = n.attrs[0]
    inner = [None] * len(perm)
    for k, p in enumerate(perm):
        inner[p] = idx[k]
    return psi_reduce(n.args[0], tuple(inner), env, fresh)


def _psi_psi(n, idx, env, fresh):
    # <J> psi (<I> psi A) => <I J> psi A   (kept axes ':' take the leading items of J in order)
    a, *ix = n.args
    slots = n.attrs[0]
    it_i, it_j = iter(ix), iter(idx)
    full = [_idx(next(it_i), env) if s == "i" else next(it_j) for s in slots]
    full.extend(it_j)
    return psi_reduce(a, tuple(full), env, fresh)


def _psi_comp(n, idx, env, fresh):
    # <I J> psi [v0 ... vk] body => <J> psi body[v := I]
    vs = n.attrs[0]
    env2 = {**env, **dict(zip(vs, idx[:len(vs)]))}
    return psi_reduce(n.args[0], tuple(idx[len(vs):]), env2, fresh)


def _psi_reduce(n, idx, env, fresh):
    # <I> psi (op red_ax A) => op red_l (<I[:ax] l I[ax:]> psi A)
    op, ax = n.attrs
    a = n.args[0]
    l = fresh("r")
    body = psi_reduce(a, (*idx[:ax], l, *idx[ax:]), env, fresh)
    return Reduce(op, l, a.shape[ax], body, n.dtype)


def _psi_softmax(n, idx, env, fresh):
    # <I> psi softmax(A, ax) => exp(<I> psi A - M) / +red_l exp(<I[ax:=l]> psi A - M),  M = max red_l ...
    ax = n.attrs[0]
    a = n.args[0]
    l = fresh("j")
    score = psi_reduce(a, (*idx[:ax], l, *idx[ax + 1:]), env, fresh)
    return SoftmaxAt(idx[ax], l, a.shape[ax], score)


def _psi_normalize(n, idx, env, fresh):
    # <I> psi normalize(A, ax) => <I> psi A / +red_l <I[ax:=l]> psi A   (0 where the sum is 0)
    ax = n.attrs[0]
    a = n.args[0]
    l = fresh("j")
    weight = psi_reduce(a, (*idx[:ax], l, *idx[ax + 1:]), env, fresh)
    return NormalizeAt(idx[ax], l, a.shape[ax], weight)


def _psi_logsumexp(n, idx, env, fresh):
    # <I> psi logsumexp(A, ax) => log +red_l exp(<I[:ax] l I[ax:]> psi A)
    ax = n.attrs[0]
    a = n.args[0]
    l = fresh("j")
    return LogSumExp(l, a.shape[ax], psi_reduce(a, (*idx[:ax], l, *idx[ax:]), env, fresh))


def _psi_take(n, idx, env, fresh):
    # <i J> psi (k take A) => <i J> psi A (k >= 0);  <i + rho0(A) + k, J> psi A (k < 0)
    k = n.attrs[0]
    a = n.args[0]
    off = 0 if sy.prove_nonneg(k) else a.shape[0] + k
    return psi_reduce(a, (idx[0] + off, *idx[1:]), env, fresh)


def _psi_drop(n, idx, env, fresh):
    # <i J> psi (k drop A) => <i + k, J> psi A (k >= 0);  <i J> psi A (k < 0)
    k = n.attrs[0]
    off = k if sy.prove_nonneg(k) else 0
    return psi_reduce(n.args[0], (idx[0] + off, *idx[1:]), env, fresh)


def _psi_cat(n, idx, env, fresh):
    # <i J> psi cat(A, B) => where(i < rho0(A), <i J> psi A, <i - rho0(A), J> psi B)
    a, b = n.args
    na = a.shape[0]
    cond = Op("lt", (Index(sp.sympify(idx[0])), Index(na)), ir.BOOL)
    return Op("where", (cond, psi_reduce(a, idx, env, fresh),
                        psi_reduce(b, (idx[0] - na, *idx[1:]), env, fresh)), n.dtype)


def _psi_reverse(n, idx, env, fresh):
    # <i J> psi reverse(A) => <rho0(A) - 1 - i, J> psi A
    a = n.args[0]
    return psi_reduce(a, (a.shape[0] - 1 - idx[0], *idx[1:]), env, fresh)


def _psi_rotate(n, idx, env, fresh):
    # <i J> psi (k rotate A) => <(i + k) mod rho0(A), J> psi A
    a = n.args[0]
    return psi_reduce(a, (sy.mod(idx[0] + n.attrs[0], a.shape[0]), *idx[1:]), env, fresh)


def _psi_reshape(n, idx, env, fresh):
    # <I> psi reshape(A, s) => <gamma^-1(gamma(I; s); rho A)> psi A   (row-major offsets)
    a = n.args[0]
    shape = n.attrs[0]
    flat = sum((sp.sympify(i) * sy.product(shape[k + 1:]) for k, i in enumerate(idx)), sp.Integer(0))
    inner = []
    for k, s in enumerate(a.shape):
        q = sy.floordiv(flat, sy.product(a.shape[k + 1:]))
        inner.append(q if k == 0 else sy.mod(q, s))
    return psi_reduce(a, tuple(inner), env, fresh)


def _psi_outer(n, idx, env, fresh):
    # <I J> psi outer(f, A, B) => f(<I> psi A, <J> psi B)
    a, b = n.args
    return Op(n.attrs[0], (psi_reduce(a, idx[:a.rank], env, fresh), psi_reduce(b, idx[a.rank:], env, fresh)),
              n.dtype)


PSI_RULES = {
    "input": Rule("psi-input", "<I> psi A => A[I]", _psi_input),
    "const": Rule("psi-const", "<> psi c => c", _psi_const),
    "sym": Rule("psi-index", "<> psi e => e[v := I]", _psi_sym),
    "vec": Rule("psi-vec", "<k> psi <v0 v1 ...> => v_k", _psi_vec),
    "iota": Rule("psi-iota", "<i> psi iota(n) => i", _psi_iota),
    "ewise": Rule("psi-scalar-extension", "<I> psi f(A, B) => f(<I> psi A, <I> psi B)", _psi_ewise),
    "matmul": Rule("psi-inner-product", "<I J> psi (A +.x B) => +red_l (<I l> psi A) x (<l J> psi B)",
                   _psi_matmul),
    "transpose": Rule("psi-transpose", "<I> psi transpose(A, p) => <I o p^-1> psi A", _psi_transpose),
    "psi": Rule("psi-psi", "<J> psi (<I> psi A) => <I J> psi A", _psi_psi),
    "comp": Rule("psi-omega", "<I J> psi [v] body => <J> psi body[v := I]", _psi_comp),
    "reduce": Rule("psi-reduce", "<I> psi (op red_ax A) => op red_l <I[:ax] l I[ax:]> psi A", _psi_reduce),
    "softmax": Rule("psi-softmax", "<I> psi softmax(A, ax) => softmax_l(<I[ax:=l]> psi A) at l = I[ax]",
                    _psi_softmax),
    "normalize": Rule("psi-normalize", "<I> psi normalize(A, ax) => (<I> psi A) / +red_l <I[ax:=l]> psi A",
                      _psi_normalize),
    "logsumexp": Rule("psi-logsumexp", "<I> psi lse(A, ax) => log +red_l exp(<I[:ax] l I[ax:]> psi A)",
                      _psi_logsumexp),
    "take": Rule("psi-take", "<i J> psi (k take A) => <i + (k < 0 ? rho0 A + k : 0), J> psi A", _psi_take),
    "drop": Rule("psi-drop", "<i J> psi (k drop A) => <i + (k >= 0 ? k : 0), J> psi A", _psi_drop),
    "cat": Rule("psi-cat", "<i J> psi (A cat B) => i < rho0 A ? <i J> psi A : <i - rho0 A, J> psi B", _psi_cat),
    "reverse": Rule("psi-reverse", "<i J> psi reverse(A) => <rho0 A - 1 - i, J> psi A", _psi_reverse),
    "rotate": Rule("psi-rotate", "<i J> psi (k rotate A) => <(i + k) mod rho0 A, J> psi A", _psi_rotate),
    "reshape": Rule("psi-reshape", "<I> psi reshape(A, s) => <gamma^-1(gamma(I; s); rho A)> psi A",
                    _psi_reshape),
    "outer": Rule("psi-outer", "<I J> psi outer(f, A, B) => f(<I> psi A, <J> psi B)", _psi_outer),
}


def psi_reduce(node: ir.Node, idx: tuple, env: dict, fresh) -> object:
    """<idx> psi node as a scalar expression (idx must be a full index)."""
    if len(idx) != node.rank:
        raise AssertionError(f"psi_reduce: {len(idx)} indices for rank {node.rank} ({node.op})")
    rule = PSI_RULES.get(node.op)
    if rule is None:
        raise UnsupportedError(f"no psi rule for '{node.op}'", node.loc)
    return rule.apply(node, tuple(sp.sympify(i) for i in idx), env, fresh)


# ---- fusion: monoid reductions ---------------------------------------------------------------------------


def _split_product(e, var):
    """mul(SoftmaxAt|NormalizeAt at var, v) in either order -> (the normalisation, v), else None."""
    if isinstance(e, Op) and e.fn == "mul":
        a, b = e.args
        for p, v in ((a, b), (b, a)):
            if isinstance(p, (SoftmaxAt, NormalizeAt)) and sp.sympify(p.target) == var:
                return p, v
    return None


def _fuse_softmax_contraction(e):
    # +red_l (softmax_r(s) at l) * v  =>  fin( (+)_l (s[r:=l], 1, v) )       (online softmax)
    if isinstance(e, Reduce) and e.op == "sum":
        hit = _split_product(e.body, e.var)
        if hit and isinstance(hit[0], SoftmaxAt) and sp.simplify(hit[0].extent - e.extent) == 0:
            p, v = hit  # keep the softmax's variable name (the key index) for the fused reduction
            return SoftmaxSum(p.var, e.extent, p.score, subs(v, {e.var: p.var}))
    return None


def _fuse_normalize_contraction(e):
    # +red_l (normalize_r(a) at l) * v  =>  (+red_l a[r:=l] v) / (+red_l a[r:=l])   (one (sum, sum) monoid)
    if isinstance(e, Reduce) and e.op == "sum":
        hit = _split_product(e.body, e.var)
        if hit and isinstance(hit[0], NormalizeAt) and sp.simplify(hit[0].extent - e.extent) == 0:
            p, v = hit
            return NormSum(p.var, e.extent, p.weight, subs(v, {e.var: p.var}))
    return None


def _lower_softmax_at(e):
    # softmax_r(s) at t  =>  M == -inf ? 0 : exp(s[r:=t] - M) / +red_r exp(s - M),   M = max red_r s
    if isinstance(e, SoftmaxAt):
        m = Reduce("max", e.var, e.extent, e.score)
        z = Reduce("sum", e.var, e.extent, Op("exp", (Op("sub", (e.score, m)),)))
        num = Op("exp", (Op("sub", (subs(e.score, {e.var: e.target}), m)),))
        empty = Op("eq", (m, Const(float("-inf"))), ir.BOOL)
        return Op("where", (empty, Const(0.0), Op("div", (num, z))))
    return None


def _lower_normalize_at(e):
    # normalize_r(a) at t  =>  Z == 0 ? 0 : a[r:=t] / Z,   Z = +red_r a
    if isinstance(e, NormalizeAt):
        z = Reduce("sum", e.var, e.extent, e.weight)
        empty = Op("eq", (z, Const(0.0)), ir.BOOL)
        return Op("where", (empty, Const(0.0), Op("div", (subs(e.weight, {e.var: e.target}), z))))
    return None


def _fold_mul_one(e):
    # x * 1 => x ; 1 * x => x
    if isinstance(e, Op) and e.fn == "mul":
        a, b = e.args
        if isinstance(b, Const) and b.value == 1 and a.dtype == ir.FLOAT:
            return a
        if isinstance(a, Const) and a.value == 1 and b.dtype == ir.FLOAT:
            return b
    return None


_SIDE = {"lt": lambda a, b: a < b, "le": lambda a, b: a <= b, "gt": lambda a, b: a > b, "ge": lambda a, b: a >= b,
         "eq": lambda a, b: a == b, "ne": lambda a, b: a != b}


def _fold_infinite_compare(e):
    # i <= inf => true ; i >= inf => false ; -inf < i => true ...   (i an integer: always finite)
    if isinstance(e, Op) and e.fn in _SIDE:
        a, b = e.args
        inf_a = isinstance(a, Const) and isinstance(a.value, float) and math.isinf(a.value)
        inf_b = isinstance(b, Const) and isinstance(b.value, float) and math.isinf(b.value)
        if inf_b and a.dtype == ir.INT:
            return Const(bool(_SIDE[e.fn](0, b.value)), ir.BOOL)
        if inf_a and b.dtype == ir.INT:
            return Const(bool(_SIDE[e.fn](a.value, 0)), ir.BOOL)
    return None


def _fold_boolean_constant(e):
    # c and true => c ; c and false => false ; c or true => true ; c or false => c ; not true => false ;
    # where(true, a, b) => a ; where(false, a, b) => b
    if not isinstance(e, Op):
        return None
    consts = [isinstance(x, Const) and isinstance(x.value, bool) for x in e.args]
    if e.fn in ("and", "or") and any(consts):
        k = consts.index(True)
        v, other = e.args[k].value, e.args[1 - k]
        if e.fn == "and":
            return other if v else Const(False, ir.BOOL)
        return Const(True, ir.BOOL) if v else other
    if e.fn == "not" and consts[0]:
        return Const(not e.args[0].value, ir.BOOL)
    if e.fn == "where" and consts[0]:
        return e.args[1] if e.args[0].value else e.args[2]
    return None


FUSION_RULES = (
    Rule("fuse-softmax-contraction", "+red_l softmax_r(s)|l * v => fin((+)_l (s, 1, v))",
         _fuse_softmax_contraction),
    Rule("fuse-normalize-contraction", "+red_l normalize_r(a)|l * v => +red_l a v / +red_l a",
         _fuse_normalize_contraction),
    Rule("fold-mul-one", "x * 1 => x", _fold_mul_one),
    Rule("fold-infinite-compare", "i <= inf => true ; i >= inf => false   (i an integer index value)",
         _fold_infinite_compare),
    Rule("fold-boolean-constant", "c and true => c ; c or false => c ; where(true, a, b) => a ...",
         _fold_boolean_constant),
)
def _is_zero(e):
    return isinstance(e, Const) and e.value == 0 or isinstance(e, Index) and e.expr == 0


def _fubini(e):
    # +red_k (A * +red_r B) => +red_r +red_k (A * B)      (r not in A: exchange of sums, distributivity)
    if isinstance(e, Reduce) and e.op == "sum" and isinstance(e.body, Op) and e.body.fn == "mul":
        for a, b in (e.body.args, e.body.args[::-1]):
            if isinstance(b, Reduce) and b.op == "sum" and b.var not in free_vars(a):
                inner = Reduce("sum", e.var, e.extent, Op("mul", (a, b.body), e.dtype), e.dtype)
                return Reduce("sum", b.var, b.extent, inner, e.dtype)
    return None


def _hoist_where(e):
    # +red_k (A * where(c, X, 0)) => where(c, +red_k (A * X), 0)      (k not in c)
    if isinstance(e, Reduce) and e.op == "sum" and isinstance(e.body, Op) and e.body.fn == "mul":
        for a, b in (e.body.args, e.body.args[::-1]):
            if isinstance(b, Op) and b.fn == "where" and _is_zero(b.args[2]) and e.var not in free_vars(b.args[0]):
                red = Reduce("sum", e.var, e.extent, Op("mul", (a, b.args[1]), e.dtype), e.dtype)
                return Op("where", (b.args[0], red, Const(0.0)), e.dtype)
    return None


def _factor_out(e):
    # +red_k (A * (w * B)) => w * +red_k (A * B)      (k not in w)
    if isinstance(e, Reduce) and e.op == "sum" and isinstance(e.body, Op) and e.body.fn == "mul":
        for a, b in (e.body.args, e.body.args[::-1]):
            if isinstance(b, Op) and b.fn == "mul":
                for w, rest in (b.args, b.args[::-1]):
                    if e.var not in free_vars(w) and e.var in free_vars(rest):
                        red = Reduce("sum", e.var, e.extent, Op("mul", (a, rest), e.dtype), e.dtype)
                        return Op("mul", (w, red), e.dtype)
    return None


REASSOCIATION_RULES = (
    Rule("fubini", "+red_k (A * +red_r B) => +red_r +red_k (A * B)   (r not in A)", _fubini),
    Rule("hoist-where", "+red_k (A * where(c, X, 0)) => where(c, +red_k A * X, 0)   (k not in c)", _hoist_where),
    Rule("factor-out", "+red_k (A * (w * B)) => w * +red_k (A * B)   (k not in w)", _factor_out),
)
LOWERING_RULES = (
    Rule("lower-softmax", "softmax_r(s)|t => exp(s_t - max s) / +red exp(s - max s)", _lower_softmax_at),
    Rule("lower-normalize", "normalize_r(a)|t => a_t / +red a", _lower_normalize_at),
)


def rewrite(e, rules, _seen=frozenset()) -> object:
    """Apply rules bottom-up until none fires (a fixpoint). A chain of rewrites that comes back to an expression it
    passed through (fubini then factor-out swap two sums back and forth in A @ B @ C) stops before the step that
    closes the loop: the form reached first is kept."""
    kids = children(e)
    if kids:
        new = [rewrite(k, rules) for k in kids]
        if any(a is not b for a, b in zip(new, kids)):
            e = with_children(e, new)
    if e in _seen:
        return None
    for rule in rules:
        out = rule.apply(e)
        if out is not None:
            done = rewrite(out, rules, _seen | {e})
            if done is not None:
                return done
    return e


# ---- the pass ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DnfOutput:
    """O[vars...] = expr, vars ranging over extents (the output's shape)."""
    name: str
    vars: tuple
    extents: tuple
    expr: object
    dtype: str


def _out_vars(node: ir.Node, fresh) -> tuple:
    names = []
    n = node
    while n.op == "comp" and len(names) < node.rank:
        names.extend(v.name for v in n.attrs[0])
        n = n.args[0]
    defaults = ["i", "c", "p", "q", "u", "w"] if node.rank <= 2 else ["b", "i", "c", "p", "q", "u"]
    while len(names) < node.rank:
        names.append(defaults[len(names) % len(defaults)])
    return tuple(fresh(nm) for nm in names[:node.rank])


def dnf(program: Program) -> tuple[DnfOutput, ...]:
    """Every output of the program in Denotational Normal Form."""
    taken = {*(d.name for d in program.dims), *(p for p, _ in program.params), *(n for n, _ in program.bindings)}
    taken |= {n.attrs[0] for n in program.inputs}
    outs = []
    for name, node in program.outputs:
        fresh = _Fresh(taken)
        vs = _out_vars(node, fresh)
        e = psi_reduce(node, vs, {}, fresh)
        e = rewrite(e, FUSION_RULES)
        e = rewrite(e, REASSOCIATION_RULES)
        e = rewrite(e, LOWERING_RULES)
        outs.append(DnfOutput(name, vs, node.shape, e, node.dtype))
    return tuple(outs)


def show_output(o: DnfOutput) -> str:
    return f"<{' '.join(v.name for v in o.vars)}> psi {o.name} = {show(o.expr)}"
