"""Elaboration: lark tree -> MoA IR (Program). Names are resolved, single assignment and arity are checked,
and every shape rule runs here (through the IR constructors), each error located in the source."""
from __future__ import annotations

import difflib
import math
from dataclasses import dataclass, field

import lark
import sympy as sp

from moa import ir
from moa import symbolic as sy
from moa.errors import InputError, Loc, MoaError, ParseError, ShapeError
from moa.program import Program

from .checks import COMPILE_KEYWORDS, MAX_NAME, article, check_extent, check_override
from .parser import KEYWORDS, parse

UNARY = {"exp", "log", "sqrt", "rsqrt", "abs", "sign", "tanh", "sigmoid", "relu", "elu", "sin", "cos", "erf"}
REDUCTIONS = {"sum", "max", "min"}
NORMALIZATIONS = {"softmax", "normalize", "logsumexp"}
STRUCTURAL = {"iota", "shape", "psi", "take", "drop", "cat", "reverse", "rotate", "reshape", "outer", "transpose",
              "dot", "where"}
BUILTINS = UNARY | REDUCTIONS | NORMALIZATIONS | STRUCTURAL
OUTER_OPS = {"add", "sub", "mul", "div", "min", "max", "pow"}
TYPES = {"float": ir.FLOAT, "int": ir.INT, "bool": ir.BOOL}

_BINOPS = {"+": "add", "-": "sub", "*": "mul", "/": "div", "//": "floordiv", "%": "mod"}
_CMPS = {"<": "lt", "<=": "le", ">": "gt", ">=": "ge", "==": "eq", "!=": "ne"}

@dataclass
class _Scope:
    dims: dict = field(default_factory=dict)      # name -> sympy symbol
    params: dict = field(default_factory=dict)    # name -> int | float
    arrays: dict = field(default_factory=dict)    # name -> Node
    index: dict = field(default_factory=dict)     # name -> sympy symbol (inside a comprehension)
    inferred: dict = field(default_factory=dict)  # index symbol -> [(extent, loc)]


class Elaborator:
    def __init__(self, source: str, filename: str, overrides: dict):
        self.source, self.filename = source, filename
        self.overrides = dict(overrides)
        self.s = _Scope()
        self.inputs: list = []
        self.bindings: list = []
        self.outputs: list = []

    # ---- locations and names ---------------------------------------------------------------------------
    def loc(self, item) -> Loc | None:
        if isinstance(item, lark.Token):
            return Loc(item.line, item.column, self.source, self.filename)
        meta = getattr(item, "meta", None)
        if meta is not None and not meta.empty:
            return Loc(meta.line, meta.column, self.source, self.filename)
        return None

    def _all_names(self):
        return [*self.s.dims, *self.s.params, *self.s.arrays, *self.s.index]

    def new_name(self, tok: lark.Token, what: str) -> str:
        name = str(tok)
        loc = self.loc(tok)
        if len(name) > MAX_NAME:
            raise ParseError(f"{what} name is {len(name)} characters long; at most {MAX_NAME} allowed", loc)
        if name in KEYWORDS:
            raise ParseError(f"'{name}' is a keyword and cannot name {article(what)}", loc)
        if name in BUILTINS:
            raise ParseError(f"'{name}' is a builtin function and cannot name {article(what)}", loc)
        if name.startswith("__"):
            raise ParseError(f"names starting with '__' are reserved ('{name[:20]}')", loc)
        if name in self._all_names():
            raise ParseError(f"'{name}' is already defined (names are bound once)", loc)
        return name

    def undefined(self, tok) -> ParseError:
        name = str(tok)
        close = difflib.get_close_matches(name, self._all_names() + sorted(BUILTINS), n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        return ParseError(f"name '{name[:64]}' is not defined{hint}", self.loc(tok))

    # ---- statements -------------------------------------------------------------------------------------
    def run(self, tree: lark.Tree, name: str) -> Program:
        for st in tree.children:
            getattr(self, "st_" + st.data)(st)
        unknown = set(self.overrides) - set(self.s.params)
        if unknown:
            raise InputError(f"unknown param(s) {', '.join(sorted(unknown))}; the program declares "
                             f"{', '.join(self.s.params) or 'none'}")
        if not self.outputs:
            raise ParseError("the program has no output: mark one assignment with 'out'",
                             Loc(1, 1, self.source, self.filename))
        return Program(name, self.source, tuple(self.s.dims.values()), tuple(self.s.params.items()),
                       tuple(self.inputs), tuple(self.bindings), tuple(self.outputs))

    def st_dim_stmt(self, st):
        for tok in st.children:
            name = self.new_name(tok, "dim")
            self.s.dims[name] = sy.dim(name)

    def st_param_stmt(self, st):
        for item in st.children:
            tok, expr = item.children
            name = self.new_name(tok, "param")
            if name in COMPILE_KEYWORDS:
                raise ParseError(f"a param cannot be named '{name}': moa.compile takes {name}= itself (rename the "
                                 "param)", self.loc(tok))
            if name in self.overrides:
                v = check_override(name, self.overrides[name])
            else:
                node = self.expr(expr)
                if node.op == "sym":
                    raise ParseError(f"param {name}'s default must be a constant, not {sy.show(node.attrs[0])}",
                                     self.loc(expr))
                if node.op != "const" or node.dtype == ir.BOOL:
                    raise ParseError(f"param {name}'s default must be a number", self.loc(expr))
                v = node.attrs[0]
                if isinstance(v, float) and (math.isnan(v) or v == -math.inf):
                    raise ParseError(f"param {name}'s default must be a number or inf (unbounded)", self.loc(expr))
            self.s.params[name] = v   # inf: unbounded, compared only (i <= inf folds to true in the DNF)

    def st_in_stmt(self, st):
        for item in st.children:
            tok, rest = item.children[0], item.children[1:]
            name = self.new_name(tok, "input")
            dtype = ir.FLOAT
            if rest and isinstance(rest[-1], lark.Token):
                t = str(rest[-1])
                if t not in TYPES:
                    raise ParseError(f"unknown element type '{t[:20]}'; use int, bool or float", self.loc(rest[-1]))
                dtype = TYPES[t]
                rest = rest[:-1]
            shape = tuple(self.extent(e, f"extent of input {name}") for e in rest)
            node = ir.input_(name, shape, dtype, self.loc(tok))
            self.inputs.append(node)
            self.s.arrays[name] = node

    def extent(self, tree, what) -> sp.Expr:
        node = self.expr(tree)
        if node.dtype != ir.INT or node.rank != 0 or node.op not in ("sym", "const"):
            raise ShapeError(f"{what} must be an integer expression of dims and params", self.loc(tree))
        e = sp.sympify(node.attrs[0])
        if e.free_symbols - set(self.s.dims.values()):
            raise ShapeError(f"{what} may use only dims and params, not index variables", self.loc(tree))
        if sy.prove_nonneg(e - 1) is False:
            raise ShapeError(f"{what} must be positive, got {sy.show(e)}", self.loc(tree))
        return check_extent(e, what, self.loc(tree))

    def st_assign_stmt(self, st):
        is_out = isinstance(st.children[0], lark.Token) and st.children[0].type == "OUT"
        target, body = st.children[-2], st.children[-1]
        tok, binds = target.children[0], target.children[1:]
        name = self.new_name(tok, "array")
        if not binds:
            node = self.expr(body)
        else:
            node = self.comprehension(name, binds, body)
        if node.rank == 0 and not binds and is_out is False and node.op in ("const",):
            pass
        self.s.arrays[name] = node
        self.bindings.append((name, node))
        if is_out:
            self.outputs.append((name, node))

    def comprehension(self, name, binds, body):
        syms, given = [], {}
        for b in binds:
            vtok = b.children[0]
            vname = self.new_name(vtok, "index variable")
            if vname in [s.name for s in syms]:
                raise ParseError(f"index variable '{vname}' appears twice", self.loc(vtok))
            v = sy.index_var(vname)
            syms.append(v)
            if len(b.children) > 1:
                given[v] = self.extent(b.children[1], f"extent of index {vname}")
        saved = dict(self.s.index), dict(self.s.inferred)
        for v in syms:
            self.s.index[v.name] = v
            self.s.inferred[v] = []
        try:
            node = self.expr(body)
            extents, guards = [], []
            for v, b in zip(syms, binds):
                cands = self.s.inferred[v]
                if v in given:
                    ext = given[v]
                    for e, where in cands:
                        eq = sy.prove_equal(e, ext)
                        if eq is False:
                            raise ShapeError(f"index {v.name} is given extent {sy.show(ext)} but indexes an "
                                             f"axis of extent {sy.show(e)} at {where} (an index read bare ranges "
                                             f"over the whole axis: to read part of {v.name}'s range there, clamp it, "
                                             f"where({v.name} < {sy.show(e)}, X[min({v.name}, {sy.show(e)} - 1)], "
                                             "...), or join the arrays with cat)", self.loc(b))
                        if eq is None:
                            guards.append(ir.Guard(ext - e, f"index {v.name} at {self.loc(b)} has extent "
                                                   f"{sy.show(ext)} and indexes an axis of extent {sy.show(e)} "
                                                   f"at {where}: needs {sy.show(ext)} == {sy.show(e)}",
                                                   self.loc(b)))
                elif cands:
                    ext = cands[0][0]
                    for e, where in cands[1:]:
                        eq = sy.prove_equal(e, ext)
                        if eq is False:
                            raise ShapeError(f"index {v.name} indexes axes of different extents: "
                                             f"{sy.show(ext)} at {cands[0][1]} and {sy.show(e)} at {where}",
                                             self.loc(b))
                        if eq is None:
                            guards.append(ir.Guard(ext - e, f"index {v.name} at {self.loc(b)} indexes axes of "
                                                   f"extents {sy.show(ext)} at {cands[0][1]} and {sy.show(e)} at "
                                                   f"{where}: needs {sy.show(ext)} == {sy.show(e)}", self.loc(b)))
                else:
                    raise ShapeError(f"cannot infer the extent of index {v.name}: it never indexes an array "
                                     f"directly; write {name}[{v.name}:N, ...]", self.loc(b))
                extents.append(ext)
        finally:
            self.s.index, self.s.inferred = saved
        return ir.comp(node, tuple(syms), tuple(extents), self.loc(binds[0]), tuple(guards))

    # ---- expressions ------------------------------------------------------------------------------------
    def expr(self, t) -> ir.Node:
        if isinstance(t, lark.Token):
            raise ParseError(f"unexpected {str(t)[:20]!r}", self.loc(t))
        try:
            return getattr(self, "e_" + t.data)(t)
        except RecursionError:
            raise ParseError("expression nested too deeply", self.loc(t)) from None

    def e_number(self, t):
        text = str(t.children[0])
        loc = self.loc(t)
        if any(c in text for c in ".eE"):
            v = float(text)
            if math.isinf(v):
                raise ParseError(f"number {text[:30]} is out of the float64 range; write inf for infinity", loc)
            return ir.const(v, loc)
        if len(text) > 18:
            raise ParseError(f"integer {text[:30]}... is too large (at most 18 digits)", loc)
        return ir.const(int(text), loc)

    def e_inf(self, t):
        return ir.const(math.inf, self.loc(t))

    def e_name(self, t):
        tok = t.children[0]
        name = str(tok)
        loc = self.loc(tok)
        if name in self.s.index:
            return ir.sym(self.s.index[name], loc)
        if name in self.s.dims:
            return ir.sym(self.s.dims[name], loc)
        if name in self.s.params:
            return ir.const(self.s.params[name], loc)
        if name in self.s.arrays:
            return self.s.arrays[name]
        if name in BUILTINS:
            raise ParseError(f"builtin '{name}' must be called: {name}(...)", loc)
        raise self.undefined(tok)

    def e_list_(self, t):
        raise ParseError("a list [...] is only allowed as an argument of psi, reshape or transpose", self.loc(t))

    def e_binop(self, t):
        a, op, b = t.children
        x, y = self.expr(a), self.expr(b)
        loc = self.loc(op)
        if str(op) == "@":
            return ir.matmul(x, y, loc)
        if str(op) in ("//", "%") and (x.dtype == ir.FLOAT or y.dtype == ir.FLOAT):
            raise ShapeError(f"'{op}' needs integer operands", loc)
        if y.op == "const" and str(op) in ("//", "%", "/") and y.attrs[0] == 0 and y.dtype != ir.BOOL:
            # also 1 / 0.0: a constant quotient would be evaluated (and fail) while the kernel is traced
            raise ShapeError(f"division by zero in '{op}'", loc)
        return ir.ewise(_BINOPS[str(op)], x, y, loc=loc)

    def e_compare(self, t):
        a, op, b = t.children
        return ir.ewise(_CMPS[str(op)], self.expr(a), self.expr(b), loc=self.loc(op))

    def e_and_(self, t):
        return ir.ewise("and", self.expr(t.children[0]), self.expr(t.children[1]), loc=self.loc(t))

    def e_or_(self, t):
        return ir.ewise("or", self.expr(t.children[0]), self.expr(t.children[1]), loc=self.loc(t))

    def e_not_(self, t):
        return ir.ewise("not", self.expr(t.children[0]), loc=self.loc(t))

    def e_neg(self, t):
        return ir.ewise("neg", self.expr(t.children[0]), loc=self.loc(t))

    def e_pow(self, t):
        return ir.ewise("pow", self.expr(t.children[0]), self.expr(t.children[1]), loc=self.loc(t))

    def e_attr(self, t):
        base, attr = t.children
        if str(attr) != "T":
            raise ParseError(f"unknown attribute '.{str(attr)[:20]}' (only .T, the transpose, exists)",
                             self.loc(attr))
        return ir.transpose(self.expr(base), loc=self.loc(attr))

    def e_index(self, t):
        base, subs = t.children[0], t.children[1:]
        arr = self.expr(base)
        loc = self.loc(t)
        if arr.rank == 0:
            raise ShapeError("indexing a scalar", loc)
        slots, idx = [], []
        for k, s in enumerate(subs):
            c = s.children[0]
            if isinstance(c, lark.Token) and c.type == "COLON":
                slots.append(":")
                continue
            node = self.expr(c)
            slots.append("i")
            idx.append(node)
            if k < arr.rank and node.op == "sym" and node.attrs[0] in self.s.inferred:
                self.s.inferred[node.attrs[0]].append((arr.shape[k], self.loc(c)))
        while slots and slots[-1] == ":":
            slots.pop()
        return ir.psi(arr, tuple(idx), tuple(slots), loc)

    # ---- calls ------------------------------------------------------------------------------------------
    def e_call(self, t):
        ftok, rawargs = t.children[0], t.children[1:]
        fname = str(ftok)
        loc = self.loc(ftok)
        if fname not in BUILTINS:
            if fname in self._all_names():
                what = next(w for w, t in (("a dim", self.s.dims), ("a param", self.s.params),
                                           ("an index", self.s.index), ("an array", self.s.arrays)) if fname in t)
                raise ParseError(f"'{fname}' is {what}, not a function" + (f"; index it with {fname}[...]"
                                                                          if what == "an array" else ""), loc)
            raise self.undefined(ftok)
        pos, kw = [], {}
        for a in rawargs:
            if isinstance(a, lark.Tree) and a.data == "kwarg":
                k = str(a.children[0])
                if k in kw:
                    raise ParseError(f"keyword '{k}' given twice", self.loc(a.children[0]))
                kw[k] = a.children[1]
            else:
                if kw:
                    raise ParseError("positional argument after a keyword argument", self.loc(a))
                pos.append(a)
        return getattr(self, "f_" + ("unary" if fname in UNARY else fname if fname not in REDUCTIONS
                                     else "reduction"))(fname, pos, kw, loc)

    def arity(self, fname, pos, kw, n, loc, keywords=()):
        bad = set(kw) - set(keywords)
        if bad:
            raise ParseError(f"{fname}() got an unexpected keyword '{sorted(bad)[0][:20]}'"
                             + (f" (allowed: {', '.join(keywords)})" if keywords else ""), loc)
        counts = (n,) if isinstance(n, int) else n
        if len(pos) not in counts:
            want = " or ".join(str(c) for c in counts)
            raise ParseError(f"{fname}() takes {want} argument{'s' if counts != (1,) else ''}, got {len(pos)}",
                             loc)

    def static_int(self, tree, what) -> sp.Expr:
        node = self.expr(tree)
        if node.rank != 0 or node.dtype != ir.INT or node.op not in ("sym", "const"):
            raise ShapeError(f"{what} must be an integer expression of dims and params", self.loc(tree))
        e = sp.sympify(node.attrs[0])
        if any(not s.is_positive for s in e.free_symbols):
            raise ShapeError(f"{what} may not depend on index variables", self.loc(tree))
        return e

    def axis(self, fname, kw, loc, default):
        if "axis" not in kw:
            return default
        node = self.expr(kw["axis"])
        if node.op != "const" or node.dtype != ir.INT:
            raise ParseError(f"{fname}(): axis must be an integer literal", self.loc(kw["axis"]))
        return node.attrs[0]

    def int_list(self, tree, what) -> list:
        if not (isinstance(tree, lark.Tree) and tree.data == "list_"):
            raise ParseError(f"{what} must be a list [a, b, ...]", self.loc(tree))
        return list(tree.children)

    def f_unary(self, fname, pos, kw, loc):
        self.arity(fname, pos, kw, 1, loc)
        return ir.ewise(fname, self.expr(pos[0]), loc=loc)

    def f_reduction(self, fname, pos, kw, loc):
        if fname in ("max", "min") and len(pos) == 2 and not kw:
            return ir.ewise(fname, self.expr(pos[0]), self.expr(pos[1]), loc=loc)
        self.arity(fname, pos, kw, (1, 2) if fname in ("max", "min") and not kw else 1, loc, ("axis",))
        x = self.expr(pos[0])
        if "axis" not in kw and x.rank != 1:
            raise ParseError(f"{fname}() of a rank-{x.rank} array needs axis=k", loc)
        return ir.reduce(fname, x, self.axis(fname, kw, loc, 0), loc)

    def _norm(self, fname, pos, kw, loc):
        self.arity(fname, pos, kw, 1, loc, ("axis",))
        return ir.normalization(fname, self.expr(pos[0]), self.axis(fname, kw, loc, -1), loc)

    f_softmax = f_normalize = f_logsumexp = _norm

    def f_where(self, fname, pos, kw, loc):
        self.arity(fname, pos, kw, 3, loc)
        return ir.where(*(self.expr(p) for p in pos), loc=loc)

    def f_dot(self, fname, pos, kw, loc):
        self.arity(fname, pos, kw, 2, loc)
        a, b = self.expr(pos[0]), self.expr(pos[1])
        if a.rank != 1 or b.rank != 1:
            raise ShapeError(f"dot(a, b) needs two vectors, got shapes {sy.show_shape(a.shape)} and "
                             f"{sy.show_shape(b.shape)}", loc)
        return ir.matmul(a, b, loc)

    def f_iota(self, fname, pos, kw, loc):
        self.arity(fname, pos, kw, 1, loc)
        return ir.iota(check_extent(self.static_int(pos[0], "iota's extent"), "iota's extent", loc), loc)

    def f_shape(self, fname, pos, kw, loc):
        self.arity(fname, pos, kw, 1, loc)
        x = self.expr(pos[0])
        if x.rank == 0:
            raise ShapeError("shape() of a scalar is the empty vector, which has no element to use; shape() needs "
                             "an array", loc)
        return ir.vec(x.shape, loc)

    def f_psi(self, fname, pos, kw, loc):
        self.arity(fname, pos, kw, 2, loc)
        arr = self.expr(pos[1])
        items = pos[0].children if isinstance(pos[0], lark.Tree) and pos[0].data == "list_" else [pos[0]]
        idx = tuple(self.expr(i) for i in items)
        for k, (tree, node) in enumerate(zip(items, idx)):
            if k < arr.rank and node.op == "sym" and node.attrs[0] in self.s.inferred:
                self.s.inferred[node.attrs[0]].append((arr.shape[k], self.loc(tree)))
        return ir.psi(arr, idx, None, loc)

    def f_take(self, fname, pos, kw, loc):
        self.arity(fname, pos, kw, 2, loc)
        return ir.take(self.static_int(pos[0], "take's count"), self.expr(pos[1]), loc)

    def f_drop(self, fname, pos, kw, loc):
        self.arity(fname, pos, kw, 2, loc)
        return ir.drop(self.static_int(pos[0], "drop's count"), self.expr(pos[1]), loc)

    def f_rotate(self, fname, pos, kw, loc):
        self.arity(fname, pos, kw, 2, loc)
        return ir.rotate(self.static_int(pos[0], "rotate's count"), self.expr(pos[1]), loc)

    def f_cat(self, fname, pos, kw, loc):
        self.arity(fname, pos, kw, 2, loc)
        return ir.cat(self.expr(pos[0]), self.expr(pos[1]), loc)

    def f_reverse(self, fname, pos, kw, loc):
        self.arity(fname, pos, kw, 1, loc)
        return ir.reverse(self.expr(pos[0]), loc)

    def f_reshape(self, fname, pos, kw, loc):
        self.arity(fname, pos, kw, 2, loc)
        shape = [self.extent(e, "reshape extent") for e in self.int_list(pos[1], "reshape's shape")]
        return ir.reshape(self.expr(pos[0]), tuple(shape), loc)

    def f_transpose(self, fname, pos, kw, loc):
        self.arity(fname, pos, kw, (1, 2), loc)
        x = self.expr(pos[0])
        if len(pos) == 1:
            return ir.transpose(x, None, loc)
        perm = []
        for e in self.int_list(pos[1], "transpose's permutation"):
            n = self.expr(e)
            if n.op != "const" or n.dtype != ir.INT:
                raise ParseError("a permutation holds integer literals", self.loc(e))
            perm.append(n.attrs[0])
        return ir.transpose(x, tuple(perm), loc)

    def f_outer(self, fname, pos, kw, loc):
        self.arity(fname, pos, kw, 3, loc)
        op = pos[0]
        if not (isinstance(op, lark.Tree) and op.data == "name" and str(op.children[0]) in OUTER_OPS):
            raise ParseError(f"outer(op, X, Y): op must be one of {', '.join(sorted(OUTER_OPS))}", self.loc(op))
        return ir.outer(str(op.children[0]), self.expr(pos[1]), self.expr(pos[2]), loc)


def elaborate(source: str, filename: str = "<source>", name: str | None = None, **params) -> Program:
    """Parse and elaborate .moa text into a Program; params override the program's param defaults."""
    tree = parse(source, filename)
    try:
        return Elaborator(source, filename, params).run(tree, name or filename)
    except MoaError:
        raise
    except RecursionError:
        raise ParseError("program nested too deeply", Loc(1, 1, source, filename)) from None
