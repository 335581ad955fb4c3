"""The MoA IR: an immutable DAG of array operations, each with a symbolic shape proven by its shape rule.

Every constructor here checks its shape rule; a conformance failure is a ShapeError naming both shapes and the
source location. Facts that only the call can decide (n == m) become runtime guards carried by the node.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import networkx as nx
import sympy as sp

from . import symbolic as sy
from .errors import Loc, ShapeError

FLOAT, INT, BOOL = "float", "int", "bool"

# scalar functions by arity and result kind
UNARY_FLOAT = {"exp", "log", "sqrt", "rsqrt", "tanh", "sigmoid", "elu", "sin", "cos", "erf"}
UNARY_SAME = {"neg", "abs", "sign", "relu"}
BINARY_ARITH = {"add", "sub", "mul", "div", "floordiv", "mod", "pow", "min", "max"}
COMPARE = {"lt", "le", "gt", "ge", "eq", "ne"}
LOGIC = {"and", "or", "not"}


@dataclass(frozen=True)
class Guard:
    """A fact the call must satisfy: `expr == 0` (sympy), with the message shown when it does not."""

    expr: sp.Expr
    message: str
    loc: Loc | None = None


@dataclass(frozen=True, eq=False)
class Node:
    """One array operation. `shape` is a tuple of sympy extents (() for scalars); `attrs` is op-specific."""

    op: str
    args: tuple[Node, ...]
    shape: tuple
    dtype: str
    attrs: tuple = ()
    loc: Loc | None = field(default=None, compare=False)
    guards: tuple = field(default=(), compare=False)

    def __post_init__(self):
        object.__setattr__(self, "_key", (self.op, tuple(id(a) for a in self.args), self.shape, self.dtype,
                                          self.attrs))
        object.__setattr__(self, "_hash", hash((self.op, tuple(hash(a) for a in self.args), self.attrs)))

    def __hash__(self):
        return self._hash

    def __eq__(self, other):
        if self is other:
            return True
        if not isinstance(other, Node) or self._hash != other._hash:
            return False
        return (self.op, self.shape, self.dtype, self.attrs) == (other.op, other.shape, other.dtype,
                                                                   other.attrs) and self.args == other.args

    @property
    def rank(self) -> int:
        return len(self.shape)

    def __repr__(self):
        return f"Node({self.op}, {sy.show_shape(self.shape)}, {self.dtype})"


def _loc_text(loc):
    return f" at {loc}" if loc else ""


def conform(a: tuple, b: tuple, what: str, loc: Loc | None) -> tuple[Guard, ...]:
    """Check that two shapes are equal: provably equal -> (), provably different -> ShapeError,
    undecidable -> runtime guards."""
    if len(a) != len(b):
        raise ShapeError(f"{what}: shapes {sy.show_shape(a)} and {sy.show_shape(b)} differ in rank "
                         f"({len(a)} vs {len(b)})", loc)
    guards = []
    for x, y in zip(a, b):
        eq = sy.prove_equal(x, y)
        if eq is False:
            raise ShapeError(f"{what}: shapes {sy.show_shape(a)} and {sy.show_shape(b)} do not conform "
                             f"({sy.show(x)} != {sy.show(y)})", loc)
        if eq is None:
            guards.append(Guard(sp.sympify(x) - sp.sympify(y),
                                f"{what}{_loc_text(loc)} needs {sy.show(x)} == {sy.show(y)}", loc))
    return tuple(guards)


# ---- leaves -------------------------------------------------------------------------------------------------

def input_(name: str, shape: tuple, dtype: str = FLOAT, loc=None) -> Node:
    return Node("input", (), tuple(sp.sympify(s) for s in shape), dtype, (name,), loc)


def const(value, loc=None) -> Node:
    if isinstance(value, bool):
        return Node("const", (), (), BOOL, (value,), loc)
    if isinstance(value, int):
        return Node("const", (), (), INT, (value,), loc)
    return Node("const", (), (), FLOAT, (float(value),), loc)


def sym(expr, loc=None) -> Node:
    """A scalar integer given by index arithmetic over index variables, dims and params."""
    expr = sp.sympify(expr)
    if expr.is_Integer:
        return const(int(expr), loc)
    return Node("sym", (), (), INT, (expr,), loc)


def vec(values: tuple, loc=None) -> Node:
    """A constant integer vector (e.g. shape(X))."""
    values = tuple(sp.sympify(v) for v in values)
    return Node("vec", (), (sp.Integer(len(values)),), INT, (values,), loc)


def iota(n, loc=None) -> Node:
    n = sp.sympify(n)
    if sy.prove_nonneg(n) is False:
        raise ShapeError(f"iota({sy.show(n)}): the extent must be non-negative", loc)
    return Node("iota", (), (n,), INT, (n,), loc)


# ---- elementwise --------------------------------------------------------------------------------------------

def _result_shape(args, what, loc):
    shapes = [a.shape for a in args if a.rank > 0]
    if not shapes:
        return (), ()
    guards = []
    for s in shapes[1:]:
        guards.extend(conform(shapes[0], s, what, loc))
    return shapes[0], tuple(guards)


INT_LIMIT = 2 ** 63  # integer constants (literal or folded) must fit int64, the index type of the reference


def _check_int_range(e, loc):
    """An error for a folded integer expression holding a constant outside int64 (never silently wrapped)."""
    e = sp.sympify(e)
    big = [a for a in e.atoms(sp.Integer) if abs(int(a)) >= INT_LIMIT]
    if big:
        digits = str(abs(int(big[0])))
        shown = digits if len(digits) <= 24 else f"{digits[:8]}...({len(digits)} digits)"
        raise ShapeError(f"integer arithmetic overflows int64: a constant of magnitude {shown} (at most 2^63 - 1)",
                         loc)
    return e


_RELATIONS = {"lt": sp.Lt, "le": sp.Le, "gt": sp.Gt, "ge": sp.Ge, "eq": sp.Eq, "ne": sp.Ne}


def index_condition(node: Node):
    """A boolean scalar over index arithmetic (comparisons of integer scalars joined by and / or / not) as a
    sympy condition; None for anything that reads data."""
    if node.rank or node.dtype != BOOL:
        return None
    if node.op == "const":
        return sp.true if node.attrs[0] else sp.false
    if node.op != "ewise":
        return None
    fn, args = node.attrs[0], node.args
    if fn in _RELATIONS and all(a.rank == 0 and a.op in ("sym", "const") and a.dtype == INT for a in args):
        return _RELATIONS[fn](*(a.attrs[0] if a.op == "sym" else sp.Integer(a.attrs[0]) for a in args))
    if fn in LOGIC:
        parts = [index_condition(a) for a in args]
        if any(p is None for p in parts):
            return None
        return sp.Not(parts[0]) if fn == "not" else (sp.And if fn == "and" else sp.Or)(*parts)
    return None


def _fold_int(fn, args, loc=None):
    """Integer scalar arithmetic folds into one sympy index expression (constants stay within int64)."""
    if not all(a.rank == 0 and a.op in ("sym", "const") and a.dtype == INT for a in args):
        return None
    xs = [a.attrs[0] if a.op == "sym" else sp.Integer(a.attrs[0]) for a in args]
    if fn == "pow" and xs[1].is_Integer and xs[1] >= 64 and not (xs[0].is_Integer and abs(int(xs[0])) <= 1):
        raise ShapeError(f"integer arithmetic overflows int64: {sy.show(xs[0])} ^ {sy.show(xs[1])}", loc)
    folded = fold_int_expr(fn, xs)
    return None if folded is None else _check_int_range(folded, loc)


def fold_int_expr(fn, xs):
    """The sympy index expression of an integer scalar function `fn` of sympy arguments, or None (no such
    index arithmetic: a division by zero, a negative power ...)."""
    if fn == "add":
        return xs[0] + xs[1]
    if fn == "sub":
        return xs[0] - xs[1]
    if fn == "mul":
        return xs[0] * xs[1]
    if fn == "neg":
        return -xs[0]
    if fn == "floordiv" and xs[1] != 0:
        return sy.floordiv(xs[0], xs[1])
    if fn == "mod" and xs[1] != 0:
        return sy.mod(xs[0], xs[1])
    if fn == "pow" and xs[1].is_Integer and xs[1] >= 0:
        return xs[0] ** xs[1]
    if fn in ("min", "max"):
        return (sp.Min if fn == "min" else sp.Max)(xs[0], xs[1])
    if fn == "abs":
        return sp.Abs(xs[0])
    return None


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x))


# functions of constants, folded in float64 at elaboration (a kernel would evaluate them on a float32 literal)
_PY = {
    "add": lambda a, b: a + b, "sub": lambda a, b: a - b, "mul": lambda a, b: a * b,
    "neg": lambda a: -a, "abs": abs, "min": min, "max": max, "div": lambda a, b: a / b,
    "pow": lambda a, b: float(a) ** b, "exp": math.exp, "log": math.log, "sqrt": math.sqrt,
    "rsqrt": lambda a: 1.0 / math.sqrt(a), "tanh": math.tanh, "sigmoid": _sigmoid, "sin": math.sin,
    "cos": math.cos, "erf": math.erf, "relu": lambda a: max(a, 0), "elu": lambda a: a if a > 0 else math.expm1(a),
}


def _fold_float(fn, args):
    if not all(a.op == "const" for a in args) or fn not in _PY:
        return None
    vals = [a.attrs[0] for a in args]
    if any(isinstance(v, bool) for v in vals):
        return None
    try:
        r = _PY[fn](*vals)
    except (OverflowError, ValueError, ZeroDivisionError):
        return None
    if isinstance(r, complex):   # (-8) ^ 0.5
        return None
    return r if isinstance(r, int) or math.isfinite(r) or math.isinf(r) else None


_MIRROR = {"lt": "gt", "le": "ge", "gt": "lt", "ge": "le"}


def _integer_compare(fn, args, loc):
    """x op c with x an integer and c a non-integer float constant (a param w = 7.5) as a comparison of integers:
    x <= 7.5 and x < 7.5 are x <= 7, x >= 7.5 and x > 7.5 are x >= 8 (the same
    truth values; the kernels' index arithmetic stays integer). None where it does not apply: == and != keep x
    (its reads are still evaluated and checked)."""
    if fn not in _MIRROR:
        return None
    for x, c, op in ((args[0], args[1], fn), (args[1], args[0], _MIRROR[fn])):
        v = c.attrs[0] if c.op == "const" else None
        if x.dtype == INT and isinstance(v, float) and math.isfinite(v) and not v.is_integer():
            return ewise(op if op in ("le", "ge") else {"lt": "le", "gt": "ge"}[op], x,
                         sym(math.floor(v) if op in ("le", "lt") else math.ceil(v), loc), loc=loc)
    return None


def ewise(fn: str, *args: Node, loc=None) -> Node:
    """An elementwise scalar function over arrays of equal shape; scalars extend to any shape (MoA)."""
    whole = _integer_compare(fn, args, loc)
    if whole is not None:
        return whole
    shape, guards = _result_shape(args, f"'{fn}'", loc)
    folded = _fold_int(fn, args, loc)
    if folded is not None:
        return sym(folded, loc)
    folded = _fold_float(fn, args)
    if folded is not None:
        return const(folded, loc)
    dts = [a.dtype for a in args]
    if fn in COMPARE or fn in LOGIC:
        dtype = BOOL
        if fn in LOGIC and any(d != BOOL for d in dts):
            raise ShapeError(f"'{fn}' needs boolean operands (comparisons), got {', '.join(dts)}", loc)
    elif fn == "where":
        if dts[0] != BOOL:
            raise ShapeError("where(cond, a, b): cond must be a comparison or boolean", loc)
        dtype = FLOAT if FLOAT in dts[1:] else INT if INT in dts[1:] else BOOL
    elif fn in UNARY_FLOAT or fn == "div" or FLOAT in dts:
        dtype = FLOAT
    elif fn == "pow":
        dtype = INT
    else:
        dtype = INT
    if fn != "where" and fn not in LOGIC and BOOL in dts and fn not in ("eq", "ne"):
        raise ShapeError(f"'{fn}' is not defined on booleans", loc)
    return Node("ewise", tuple(args), shape, dtype, (fn,), loc, guards)


def where(c: Node, a: Node, b: Node, loc=None) -> Node:
    return ewise("where", c, a, b, loc=loc)


# ---- structure ----------------------------------------------------------------------------------------------

def matmul(a: Node, b: Node, loc=None) -> Node:
    """Inner product +.x over the last axis of a and the first axis of b; leading axes of a batch it."""
    if a.rank == 0 or b.rank == 0:
        raise ShapeError(f"'@' needs arrays, got shapes {sy.show_shape(a.shape)} and {sy.show_shape(b.shape)}",
                         loc)
    guards = conform((a.shape[-1],), (b.shape[0],),
                     f"'@' (contracting {sy.show_shape(a.shape)} with {sy.show_shape(b.shape)})", loc)
    return Node("matmul", (a, b), a.shape[:-1] + b.shape[1:], _num(a, b), (), loc, guards)


def _num(*xs):
    return FLOAT if any(x.dtype == FLOAT for x in xs) else INT


def transpose(a: Node, perm: tuple | None = None, loc=None) -> Node:
    perm = tuple(range(a.rank))[::-1] if perm is None else tuple(perm)
    if sorted(perm) != list(range(a.rank)):
        raise ShapeError(f"transpose: {list(perm)} is not a permutation of the {a.rank} axes of "
                         f"{sy.show_shape(a.shape)}", loc)
    return Node("transpose", (a,), tuple(a.shape[p] for p in perm), a.dtype, (perm,), loc)


def psi(a: Node, index: tuple, slots: tuple | None = None, loc=None) -> Node:
    """<i j ...> psi a: `index` holds scalar integer nodes; `slots` marks each leading axis as indexed ('i')
    or kept (':'). A partial index selects a subarray."""
    slots = tuple("i" for _ in index) if slots is None else tuple(slots)
    if len(slots) > a.rank:
        raise ShapeError(f"indexing {sy.show_shape(a.shape)} with {len(slots)} indices: the array has rank "
                         f"{a.rank}", loc)
    it = iter(index)
    out = []
    for k, s in enumerate(slots):
        if s == ":":
            out.append(a.shape[k])
            continue
        ix = next(it)
        if ix.rank != 0 or ix.dtype != INT:
            hint = " (a step function of an index, such as T5's logarithmic buckets, is a sum of where(i - j >= " \
                "step, 1, 0) terms: docs/variants.md)" if ix.rank == 0 and ix.dtype == FLOAT else ""
            raise ShapeError(f"index {k} of {sy.show_shape(a.shape)} must be an integer scalar, got a "
                             f"{ix.dtype} of shape {sy.show_shape(ix.shape)}{hint}",
                             loc if ix.op == "input" else ix.loc or loc)   # an input's loc is its declaration
        if ix.op in ("const", "sym"):
            v = sp.sympify(ix.attrs[0])
            if sy.prove_nonneg(v) is False or (v.is_number and sy.prove_nonneg(a.shape[k] - 1 - v) is False):
                raise ShapeError(f"index {sy.show(v)} is out of range for axis {k} of extent "
                                 f"{sy.show(a.shape[k])}", ix.loc or loc)
    shape = tuple(out) + a.shape[len(slots):]
    return Node("psi", (a, *index), shape, a.dtype, (slots,), loc)


def comp(body: Node, variables: tuple, extents: tuple, loc=None, guards: tuple = ()) -> Node:
    """[v0 v1 ...] body: an array whose cell at (v0, v1, ...) is `body` (MoA Omega when body is an array).
    `guards`: extents the elaborator could not prove equal to the axes each variable indexes."""
    return Node("comp", (body,), tuple(sp.sympify(e) for e in extents) + body.shape, body.dtype,
                (tuple(variables),), loc, tuple(guards))


def _axis(a: Node, axis: int, what: str, loc) -> int:
    if a.rank == 0:
        raise ShapeError(f"{what} needs an array, got a scalar", loc)
    if not -a.rank <= axis < a.rank:
        raise ShapeError(f"{what}: axis {axis} is out of range for shape {sy.show_shape(a.shape)}", loc)
    return axis % a.rank


def reduce(op: str, a: Node, axis: int, loc=None) -> Node:
    """op-reduction (sum, max, min) over one axis."""
    ax = _axis(a, axis, f"{op}(..., axis={axis})", loc)
    return Node("reduce", (a,), a.shape[:ax] + a.shape[ax + 1:], a.dtype if op != "sum" else _num(a),
                (op, ax), loc)


def normalization(op: str, a: Node, axis: int, loc=None) -> Node:
    """softmax / normalize (same shape) or logsumexp (the axis removed) along one axis."""
    ax = _axis(a, axis, f"{op}(..., axis={axis})", loc)
    shape = a.shape[:ax] + a.shape[ax + 1:] if op == "logsumexp" else a.shape
    return Node(op, (a,), shape, FLOAT, (ax,), loc)


def _first_axis(a, what, loc):
    if a.rank == 0:
        raise ShapeError(f"{what} needs an array, got a scalar", loc)


def take(k, a: Node, loc=None) -> Node:
    """k take a: the first k items (k >= 0) or the last -k (k < 0) along axis 0."""
    _first_axis(a, "take", loc)
    k = sp.sympify(k)
    size, guards = _take_size(k, a, "take", loc)
    return Node("take", (a,), (size,) + a.shape[1:], a.dtype, (k,), loc, guards)


def drop(k, a: Node, loc=None) -> Node:
    """k drop a: all but the first k items (k >= 0) or the last -k (k < 0) along axis 0."""
    _first_axis(a, "drop", loc)
    k = sp.sympify(k)
    size, guards = _take_size(k, a, "drop", loc)
    return Node("drop", (a,), (a.shape[0] - size,) + a.shape[1:], a.dtype, (k,), loc, guards)


def _take_size(k, a, what, loc):
    sign = sy.prove_nonneg(k)
    if sign is None:
        raise ShapeError(f"{what}({sy.show(k)}, ...): the sign of {sy.show(k)} must be known at compile time (a "
                         f"count >= 0 from the front, < 0 from the end); dims are only known to be >= 0, so write "
                         f"the extents so that it is a dim or a sum of dims (e.g. K[n + c, d] with {what}(c, K))", loc)
    size = k if sign else -k
    fits = sy.prove_nonneg(a.shape[0] - size)
    if fits is False:
        raise ShapeError(f"{what}({sy.show(k)}, ...) on an axis of extent {sy.show(a.shape[0])}: "
                         f"{sy.show(size)} > {sy.show(a.shape[0])}", loc)
    guards = () if fits else (Guard(sp.Max(0, size - a.shape[0]),
                                    f"{what}{_loc_text(loc)} needs {sy.show(size)} <= {sy.show(a.shape[0])}",
                                    loc),)
    return size, guards


def cat(a: Node, b: Node, loc=None) -> Node:
    _first_axis(a, "cat", loc)
    _first_axis(b, "cat", loc)
    guards = conform(a.shape[1:], b.shape[1:], "cat (items of both arrays)", loc)
    dt = a.dtype if a.dtype == b.dtype else _num(a, b)
    return Node("cat", (a, b), (a.shape[0] + b.shape[0],) + a.shape[1:], dt, (), loc, guards)


def reverse(a: Node, loc=None) -> Node:
    _first_axis(a, "reverse", loc)
    return Node("reverse", (a,), a.shape, a.dtype, (), loc)


def rotate(k, a: Node, loc=None) -> Node:
    """k rotate a: item i of the result is item (i + k) mod n of a, along axis 0."""
    _first_axis(a, "rotate", loc)
    return Node("rotate", (a,), a.shape, a.dtype, (sp.sympify(k),), loc)


def reshape(a: Node, shape: tuple, loc=None) -> Node:
    shape = tuple(sp.sympify(s) for s in shape)
    eq = sy.prove_equal(sy.product(shape), sy.product(a.shape))
    if eq is False:
        raise ShapeError(f"reshape: {sy.show_shape(a.shape)} has {sy.show(sy.product(a.shape))} elements, "
                         f"{sy.show_shape(shape)} has {sy.show(sy.product(shape))}", loc)
    guards = () if eq else (Guard(sy.product(shape) - sy.product(a.shape),
                                  f"reshape{_loc_text(loc)} needs {sy.show(sy.product(shape))} == "
                                  f"{sy.show(sy.product(a.shape))} elements", loc),)
    return Node("reshape", (a,), shape, a.dtype, (shape,), loc, guards)


def outer(fn: str, a: Node, b: Node, loc=None) -> Node:
    """outer(op, a, b)[i..., j...] = op(a[i...], b[j...])."""
    probe = ewise(fn, Node("input", (), (), a.dtype, ("_a",)), Node("input", (), (), b.dtype, ("_b",)), loc=loc)
    return Node("outer", (a, b), a.shape + b.shape, probe.dtype, (fn,), loc)


# ---- traversal ----------------------------------------------------------------------------------------------

def walk(roots) -> list[Node]:
    """Every node reachable from roots, inputs before users (topological order, shared nodes once)."""
    g = nx.DiGraph()
    seen = {}
    stack = list(roots)
    while stack:
        n = stack.pop()
        if id(n) in seen:
            continue
        seen[id(n)] = n
        g.add_node(id(n))
        for a in n.args:
            g.add_edge(id(a), id(n))
            stack.append(a)
    return [seen[i] for i in nx.lexicographical_topological_sort(g, key=lambda i: str(seen[i].op))]


def index_symbols(node: Node) -> set:
    """Index variables a node refers to but does not bind."""
    free: set = set()
    for n in walk([node]):
        if n.op == "sym":
            free |= {s for s in n.attrs[0].free_symbols if not s.is_positive}
    bound: set = set()
    for n in walk([node]):
        if n.op == "comp":
            bound |= set(n.attrs[0])
    return free - bound
