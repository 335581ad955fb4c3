"""The nodes of the Denotational Normal Form: scalar expressions over input elements (Read, Const, Index, Op),
reductions over index ranges (Reduce) and the monoid reductions that fusion makes of softmax and normalize
(SoftmaxSum, NormSum, ...); their traversal (children, substitution, free variables) and MoA notation (show)."""
from __future__ import annotations

from dataclasses import dataclass, replace

import sympy as sp

from . import ir
from . import symbolic as sy


# ---- scalar expressions ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Read:
    """An input element: name[index...]."""
    name: str
    index: tuple
    dtype: str = ir.FLOAT


@dataclass(frozen=True)
class Const:
    value: object
    dtype: str = ir.FLOAT


@dataclass(frozen=True)
class Index:
    """An integer given by index arithmetic over index variables and dims."""
    expr: sp.Expr
    dtype: str = ir.INT


@dataclass(frozen=True)
class Op:
    """A scalar function (ir.ewise names: add, mul, exp, where, le, and ...)."""
    fn: str
    args: tuple
    dtype: str = ir.FLOAT


@dataclass(frozen=True)
class Reduce:
    """op-reduction (sum, max, min) of body over var in iota(extent)."""
    op: str
    var: sp.Symbol
    extent: sp.Expr
    body: object
    dtype: str = ir.FLOAT


@dataclass(frozen=True)
class SoftmaxAt:
    """softmax over var of score, taken at var = target (before fusion; lowered if no contraction uses it)."""
    target: sp.Expr
    var: sp.Symbol
    extent: sp.Expr
    score: object
    dtype: str = ir.FLOAT


@dataclass(frozen=True)
class NormalizeAt:
    """weight at var = target divided by the sum of weight over var (0 where the sum is 0)."""
    target: sp.Expr
    var: sp.Symbol
    extent: sp.Expr
    weight: object
    dtype: str = ir.FLOAT


@dataclass(frozen=True)
class SoftmaxSum:
    """fin( (+)_{var < extent} (score, 1, value) ): the online-softmax monoid.

    State (m, l, o); merge m = max(ma, mb), l = la e^(ma-m) + lb e^(mb-m), o = oa e^(ma-m) + ob e^(mb-m);
    identity (-inf, 0, 0); fin(m, l, o) = o / l (0 when l = 0). Equals sum_var softmax_var(score) * value."""
    var: sp.Symbol
    extent: sp.Expr
    score: object
    value: object
    dtype: str = ir.FLOAT


@dataclass(frozen=True)
class NormSum:
    """sum_var weight * value / sum_var weight (0 where the denominator is 0): a (sum, sum) monoid."""
    var: sp.Symbol
    extent: sp.Expr
    weight: object
    value: object
    dtype: str = ir.FLOAT


@dataclass(frozen=True)
class KeySum:
    """sum_var weight * value with no normaliser: a (sum) monoid. Not a rewrite result: the DNF keeps it as
    +red_var (weight * value); moa/onf.py recognises the attention-shaped ones (weight over (i, j), value over
    (j, c): sigmoid attention, retention) as branches of a kernel."""
    var: sp.Symbol
    extent: sp.Expr
    weight: object
    value: object
    dtype: str = ir.FLOAT


@dataclass(frozen=True)
class LogSumExp:
    """log sum_var exp(score) (-inf when every score is -inf)."""
    var: sp.Symbol
    extent: sp.Expr
    score: object
    dtype: str = ir.FLOAT


BINDERS = (Reduce, SoftmaxAt, NormalizeAt, SoftmaxSum, NormSum, KeySum, LogSumExp)


def children(e) -> tuple:
    if isinstance(e, Op):
        return e.args
    if isinstance(e, Reduce):
        return (e.body,)
    if isinstance(e, (SoftmaxAt, LogSumExp)):
        return (e.score,)
    if isinstance(e, NormalizeAt):
        return (e.weight,)
    if isinstance(e, SoftmaxSum):
        return (e.score, e.value)
    if isinstance(e, (NormSum, KeySum)):
        return (e.weight, e.value)
    return ()


def with_children(e, kids):
    if isinstance(e, Op):
        return replace(e, args=tuple(kids))
    if isinstance(e, Reduce):
        return replace(e, body=kids[0])
    if isinstance(e, (SoftmaxAt, LogSumExp)):
        return replace(e, score=kids[0])
    if isinstance(e, NormalizeAt):
        return replace(e, weight=kids[0])
    if isinstance(e, SoftmaxSum):
        return replace(e, score=kids[0], value=kids[1])
    if isinstance(e, (NormSum, KeySum)):
        return replace(e, weight=kids[0], value=kids[1])
    return e


def subs(e, mapping: dict, free_only: bool = False):
    """Substitute index variables (sympy symbol -> expression) everywhere in a scalar expression; free_only: not
    a binder's own variable inside the binder (only the free occurrences)."""
    if not mapping:
        return e
    if isinstance(e, Read):
        return replace(e, index=tuple(sp.sympify(x).xreplace(mapping) for x in e.index))
    if isinstance(e, Index):
        return replace(e, expr=e.expr.xreplace(mapping))
    if isinstance(e, (SoftmaxAt, NormalizeAt)):
        e = replace(e, target=sp.sympify(e.target).xreplace(mapping))
    if free_only and isinstance(e, BINDERS):
        mapping = {k: v for k, v in mapping.items() if k != e.var}
    kids = children(e)
    return with_children(e, [subs(k, mapping, free_only) for k in kids]) if kids else e


def nodes(e):
    """Every sub-expression, pre-order."""
    yield e
    for k in children(e):
        yield from nodes(k)


def free_vars(e) -> set:
    """The index variables e depends on: those it reads, less each binder's own variable within that binder only
    (V[k, c] * +red_k V[k, c] depends on k: its first factor is outside the sum)."""
    out: set = set()
    if isinstance(e, Read):
        for i in e.index:
            out |= sp.sympify(i).free_symbols
    elif isinstance(e, Index):
        out |= e.expr.free_symbols
    elif isinstance(e, (SoftmaxAt, NormalizeAt)):
        out |= sp.sympify(e.target).free_symbols
    inner = set().union(*(free_vars(k) for k in children(e)))
    if isinstance(e, BINDERS):
        inner.discard(e.var)
        out |= sp.sympify(e.extent).free_symbols
    return {s for s in out | inner if not s.is_positive}


# ---- MoA notation --------------------------------------------------------------------------------------

_INFIX = {"add": "+", "sub": "-", "mul": "*", "div": "/", "floordiv": "//", "mod": "%", "pow": "^",
          "lt": "<", "le": "<=", "gt": ">", "ge": ">=", "eq": "==", "ne": "!=", "and": "and", "or": "or"}


def show_clipped(e, limit: int) -> str:
    """show(e) for a message: at most about `limit` characters, cut at a space and marked by ' ...'."""
    text = show(e)
    if len(text) <= limit:
        return text
    cut = text.rfind(" ", 0, limit)
    return text[:cut if cut > limit // 2 else limit] + " ..."


def show(e) -> str:
    """A scalar expression in MoA notation."""
    if isinstance(e, Read):
        return f"{e.name}[{', '.join(sy.show(i) for i in e.index)}]"
    if isinstance(e, Const):
        v = e.value
        return "inf" if v == float("inf") else "-inf" if v == float("-inf") else repr(v)
    if isinstance(e, Index):
        return sy.show(e.expr) if e.expr.is_Atom else f"({sy.show(e.expr)})"
    if isinstance(e, Op):
        if e.fn in _INFIX:
            return f"({show(e.args[0])} {_INFIX[e.fn]} {show(e.args[1])})"
        if e.fn == "neg":
            return f"-{show(e.args[0])}"
        if e.fn == "not":
            return f"not {show(e.args[0])}"
        return f"{e.fn}({', '.join(show(a) for a in e.args)})"
    if hasattr(e, "branch"):  # ONF placeholders
        return f"{type(e).__name__}{e.branch}"
    rng = f"{e.var} < {sy.show(e.extent)}"
    if isinstance(e, Reduce):
        sym = {"sum": "+red", "max": "max red", "min": "min red"}[e.op]
        return f"{sym}_{{{rng}}} {show(e.body)}"
    if isinstance(e, SoftmaxSum):
        return f"fin((+)_{{{rng}}} ({show(e.score)}, 1, {show(e.value)}))"
    if isinstance(e, NormSum):
        return f"(+red_{{{rng}}} {show(e.weight)} * {show(e.value)}) / (+red_{{{rng}}} {show(e.weight)})"
    if isinstance(e, KeySum):
        return f"+red_{{{rng}}} {show(e.weight)} * {show(e.value)}"
    if isinstance(e, LogSumExp):
        return f"log +red_{{{rng}}} exp({show(e.score)})"
    if isinstance(e, SoftmaxAt):
        return f"softmax_{{{rng}}}({show(e.score)})|{e.var}={sy.show(e.target)}"
    if isinstance(e, NormalizeAt):
        return f"normalize_{{{rng}}}({show(e.weight)})|{e.var}={sy.show(e.target)}"
    return repr(e)


def unguarded_reads(out) -> list:
    """(Read, ranges) for every input read of a DNF output (moa/dnf.py DnfOutput) that no `where` guards:
    evaluated at every point of its index space, so each index must lie in its axis for all values of the
    variables in `ranges` (var -> extent, the output's and the enclosing binders'). Reads inside a `where`
    branch are lazy (the untaken branch is never evaluated) and are not listed."""
    found: list = []

    def walk(e, ranges):
        if isinstance(e, Read):
            found.append((e, dict(ranges)))
            return
        if isinstance(e, Op) and e.fn == "where":
            walk(e.args[0], ranges)          # the condition is always evaluated; the branches are guarded
            return
        inner = {**ranges, e.var: e.extent} if isinstance(e, BINDERS) else ranges
        for k in children(e):
            walk(k, inner)

    walk(out.expr, dict(zip(out.vars, out.extents)))
    return found
