"""The ledger of an emitted kernel: its source walked once abstractly, giving the work per region (see the
moa/cost.py docstring, point 2)."""
from __future__ import annotations

import ast
from collections import defaultdict
from dataclasses import dataclass, field

import sympy as sp

from moa import ir
from moa import symbolic as sy
from moa.errors import UnsupportedError

from .constexprs import csym


# ---- the ledger: abstract interpretation of the emitted kernel ---------------------------------------------

@dataclass
class Work:
    """The work of one execution of a region, in the constexpr symbols."""
    dot: sp.Expr = sp.Integer(0)         # tl.dot FLOPs
    other: sp.Expr = sp.Integer(0)       # other floating-point operations
    trans: sp.Expr = sp.Integer(0)       # transcendental evaluations
    loads: list = field(default_factory=list)    # names of the load sites executed here
    stores: list = field(default_factory=list)   # names of the store sites executed here
    atomics: list = field(default_factory=list)  # names of the atomic-add sites (each also a load and a store site)


@dataclass(frozen=True)
class Ledger:
    """Region -> Work of one generated kernel, plus its access sites by name."""
    regions: dict
    loads: dict      # name -> AccessSite
    stores: dict     # name -> AccessSite


@dataclass(frozen=True)
class _V:
    """Abstract value: kind f/i/b (float/int/bool tensor), p (pointer tensor), dt (dtype), pyf/pyi/pyb (Python
    numbers: never counted, as in the interpreter), c (constexpr); shape as a tuple of sympy extents."""
    kind: str
    shape: tuple = ()
    elem: str = ""          # pointer / dtype element kind
    value: object = None    # constexpr symbol, pointer base name, or a list for list literals


_PY = ("pyf", "pyi", "pyb", "c")
_TRANS = {"exp", "exp2", "log", "log2", "sqrt", "sqrt_rn", "rsqrt", "sin", "cos", "erf"}
_TL_DTYPES = {"float64": "f", "float32": "f", "float16": "f", "bfloat16": "f", "int64": "i", "int32": "i",
              "int16": "i", "int8": "i", "int1": "b"}


def _numel(shape) -> sp.Expr:
    return sy.product(shape)


def _broadcast(*shapes):
    rank = max((len(s) for s in shapes), default=0)
    out = []
    for k in range(rank):
        dim = sp.Integer(1)
        for s in shapes:
            x = s[k - rank + len(s)] if k - rank + len(s) >= 0 else sp.Integer(1)
            if x == 1:
                continue
            if dim != 1 and dim != x:
                raise UnsupportedError(f"cost model: shapes {shapes} do not broadcast")
            dim = x
        out.append(dim)
    return tuple(out)


class _Walker:
    """Walks one function of the generated module's AST; see `ledger`.

    Regions: "program"; ("iter", k), ("visit", k), ("partial", k) of branch k's key loop; ("hop", k) of its hop
    loop (codegen/hops.py); ("loop", q) of any other loop (the q-th in the function: window hops, chunk scans);
    "lse". `consts`: constexprs fixed at launch (INIT, PREFIX ...) whose `if NAME:` blocks are decided statically.
    `ptr_elems`: element kind of pointers that are not program inputs (f, i, b)."""

    def __init__(self, tree: ast.Module, program, output: str, consts=None, ptr_elems=None, marks=None):
        self.funcs = {f.name: f for f in tree.body if isinstance(f, ast.FunctionDef)}
        self.marks = dict(marks or {})   # line number -> region of the loops and tests the emitter marked
        self.program, self.output = program, output
        self.consts = dict(consts or {})
        self.ptr_elems = dict(ptr_elems or {})
        self.regions: dict = defaultdict(Work)
        self.region: object = "program"
        self.branch = None
        self.target = None
        self.loops = 0
        self.atomics = 0   # tl.atomic_add calls so far: the k-th is the site "atomic{k}" (its emitter's record)

    def count(self, what: str, amount):
        w = self.regions[self.region]
        setattr(w, what, getattr(w, what) + sp.sympify(amount))

    def run(self, fn_name: str = "_attn_fwd") -> dict:
        fn = self.funcs[fn_name]
        env = {}
        inputs = self.program.input_map
        for a in fn.args.args:
            name = a.arg
            if isinstance(a.annotation, ast.Attribute) and a.annotation.attr == "constexpr":
                env[name] = _V("pyb") if name == "STORE_LSE" or name in self.consts else _V("c", value=csym(name))
            elif name.endswith("_ptr"):
                base = name[:-4]
                node = inputs.get(base)
                elem = self.ptr_elems.get(base) or (
                    "f" if node is None or node.dtype == ir.FLOAT else "b" if node.dtype == ir.BOOL else "i")
                env[name] = _V("p", (), elem, base)
            elif name == "lse_out":
                env[name] = _V("p", (), "f", "lse")
            else:
                env[name] = _V("i")
        self.block(fn.body, env)
        return dict(self.regions)

    # statements
    def block(self, stmts, env):
        for s in stmts:
            if isinstance(s, ast.Assign) and len(s.targets) == 1 and isinstance(s.targets[0], ast.Name):
                name = s.targets[0].id
                saved, self.target = self.target, name
                env[name] = self.expr(s.value, env)
                self.target = saved
            elif isinstance(s, ast.AugAssign) and isinstance(s.target, ast.Name):
                name = s.target.id
                saved, self.target = self.target, name
                env[name] = self.binop(s.op, env[name], self.expr(s.value, env))
                self.target = saved
            elif isinstance(s, ast.For):
                nested = self.region != "program" and s.lineno not in self.marks   # marked: the data scan's tiles
                if nested or not (isinstance(s.iter, ast.Call) and isinstance(s.target, ast.Name)):
                    raise UnsupportedError("cost model: unexpected (nested) loop in the generated kernel")
                self.expr(s.iter, env)
                saved = self.region, self.branch
                if s.lineno in self.marks:   # a key-tile or hop loop: the emitter marked its region
                    self.region = self.marks[s.lineno]
                    self.branch = self.region[1]
                else:
                    self.region = ("loop", self.loops)
                    self.loops += 1
                self.regions[self.region]  # noqa: B018  (the region exists even when it does no counted work)
                env[s.target.id] = _V("i")
                self.block(s.body, env)
                self.region, self.branch = saved
            elif isinstance(s, ast.If) and isinstance(s.test, ast.Name) and s.test.id in self.consts:
                self.block(s.body if self.consts[s.test.id] else s.orelse, env)   # decided at launch
            elif isinstance(s, ast.If):
                if s.lineno in self.marks:
                    region = self.marks[s.lineno]
                elif isinstance(s.test, ast.Name) and s.test.id == "STORE_LSE":
                    region = "lse"
                else:
                    raise UnsupportedError(f"cost model: unexpected branch `if {ast.unparse(s.test)}`")
                self.expr(s.test, env)
                saved = self.region
                self.region = region
                self.regions[region]  # noqa: B018
                self.block(s.body, env)
                self.region = saved
            elif isinstance(s, ast.Expr):
                self.expr(s.value, env)
            elif isinstance(s, ast.Return):
                env["__return__"] = self.expr(s.value, env)
            else:
                raise UnsupportedError(f"cost model: unexpected statement {ast.unparse(s)[:80]}")

    # expressions
    def expr(self, e, env) -> _V:
        if isinstance(e, ast.Constant):
            v = e.value
            return _V("pyb" if isinstance(v, bool) else "pyi" if isinstance(v, int) else
                      "pyf" if isinstance(v, float) else "str", value=v)
        if isinstance(e, ast.Name):
            return env[e.id]
        if isinstance(e, (ast.List, ast.Tuple)):
            return _V("list", value=[self.expr(x, env) for x in e.elts])
        if isinstance(e, ast.UnaryOp):
            v = self.expr(e.operand, env)
            if isinstance(e.op, ast.USub):
                if v.kind == "f":
                    self.count("other", _numel(v.shape))   # the interpreter computes 0 - x
                return v
            if isinstance(e.op, ast.Not):
                return _V("pyb") if v.kind in _PY else _V("b", v.shape)
            raise UnsupportedError(f"cost model: operator {ast.unparse(e)}")
        if isinstance(e, ast.BinOp):
            return self.binop(e.op, self.expr(e.left, env), self.expr(e.right, env))
        if isinstance(e, ast.Compare):
            a = self.expr(e.left, env)
            b = self.expr(e.comparators[0], env)
            if a.kind in _PY and b.kind in _PY:
                return _V("pyb")
            return _V("b", _broadcast(a.shape, b.shape))
        if isinstance(e, ast.Subscript):
            v = self.expr(e.value, env)
            elts = e.slice.elts if isinstance(e.slice, ast.Tuple) else [e.slice]
            it = iter(v.shape)
            shape = tuple(sp.Integer(1) if isinstance(x, ast.Constant) and x.value is None else next(it)
                          for x in elts)
            return _V(v.kind, shape, v.elem, v.value)
        if isinstance(e, ast.Attribute):
            if isinstance(e.value, ast.Name) and e.value.id == "tl":
                return _V("dt", elem=_TL_DTYPES.get(e.attr, "f"))
            v = self.expr(e.value, env)
            if e.attr == "dtype":
                return _V("dt", elem=v.elem if v.kind == "p" else v.kind)
            if e.attr == "element_ty":
                return _V("dt", elem=v.elem)
            raise UnsupportedError(f"cost model: attribute {ast.unparse(e)}")
        if isinstance(e, ast.Call):
            return self.call(e, env)
        raise UnsupportedError(f"cost model: expression {ast.unparse(e)[:80]}")

    def binop(self, op, a: _V, b: _V) -> _V:
        if a.kind in _PY and b.kind in _PY:
            if isinstance(op, ast.Div) or "pyf" in (a.kind, b.kind):
                return _V("pyf")
            if a.kind == "c" and b.kind == "c" or a.kind == "c" and b.kind == "pyi" or \
                    a.kind == "pyi" and b.kind == "c":
                return _V("c", value=None)
            return _V("pyi")
        if a.kind == "p" or b.kind == "p":
            p = a if a.kind == "p" else b
            return _V("p", _broadcast(a.shape, b.shape), p.elem, p.value)
        shape = _broadcast(a.shape, b.shape)
        fl = "f" in (a.kind, b.kind) or "pyf" in (a.kind, b.kind)
        if isinstance(op, (ast.BitAnd, ast.BitOr, ast.BitXor)):
            return _V("b" if a.kind in ("b", "pyb") and b.kind in ("b", "pyb") else "i", shape)
        if isinstance(op, ast.Div):
            self.count("other", _numel(shape))     # int / int is a float division too
            return _V("f", shape)
        if isinstance(op, (ast.Add, ast.Sub, ast.Mult, ast.Mod, ast.FloorDiv)):
            if fl:
                self.count("other", _numel(shape))
                return _V("f", shape)
            return _V("i", shape)
        raise UnsupportedError(f"cost model: operator {type(op).__name__}")

    def call(self, e: ast.Call, env) -> _V:
        f = e.func
        args = [self.expr(a, env) for a in e.args]
        kw = {k.arg: self.expr(k.value, env) for k in e.keywords}
        if isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name) and f.value.id == "tl":
            return self.tl(f.attr, args, kw)
        if isinstance(f, ast.Attribute) and f.attr == "to":
            v = self.expr(f.value, env)
            return _V(args[0].elem, v.shape)
        if isinstance(f, ast.Name):
            if f.id == "float":
                return _V("pyf")
            if f.id == "range":
                return _V("range")
            if f.id in self.funcs:
                fn = self.funcs[f.id]
                local = {p.arg: v for p, v in zip(fn.args.args, args)}
                self.block(fn.body, local)
                return local["__return__"]
        raise UnsupportedError(f"cost model: call {ast.unparse(e)[:80]}")

    def tl(self, name, args, kw) -> _V:
        if name == "program_id":
            return _V("i")
        if name == "arange":
            return _V("i", (args[1].value,))
        if name in ("zeros", "full"):
            pos = 1 if name == "zeros" else 2
            dt = kw.get("dtype", args[pos] if len(args) > pos else None)
            return _V(dt.elem if dt is not None and dt.kind == "dt" else "f", tuple(x.value for x in args[0].value))
        if name == "cdiv":
            return _V("c", value=None) if all(a.kind in _PY for a in args) else _V("i")
        if name == "load":
            ptr = args[0]
            mask = kw.get("mask")
            shape = _broadcast(ptr.shape, mask.shape if mask is not None and mask.kind not in _PY else ())
            self.regions[self.region].loads.append(self.target)
            return _V(ptr.elem, shape)
        if name == "store":
            self.regions[self.region].stores.append(args[0].value)
            return _V("none")
        if name == "atomic_add":   # one load and one store per active lane, 1 flop each (runtime/measure.py)
            site = f"atomic{self.atomics}"
            self.atomics += 1
            w = self.regions[self.region]
            w.loads.append(site)
            w.stores.append(site)
            w.atomics.append(site)
            return _V("none")
        if name == "dot":
            a, b = args
            m_, k_ = a.shape
            n_ = b.shape[1]
            self.count("dot", 2 * m_ * n_ * k_)
            return _V("f", (m_, n_))
        if name == "trans":
            return _V(args[0].kind, tuple(reversed(args[0].shape)))
        if name == "where":
            c, a, b = args
            kinds = (a.kind, b.kind)
            kind = "f" if "f" in kinds or "pyf" in kinds else "i" if "i" in kinds or "pyi" in kinds else "b"
            return _V(kind, _broadcast(*(x.shape for x in args if x.kind not in _PY)))
        if name in ("maximum", "minimum"):
            a, b = args
            shape = _broadcast(a.shape, b.shape)
            if "f" in (a.kind, b.kind) or "pyf" in (a.kind, b.kind):
                self.count("other", _numel(shape))
                return _V("f", shape)
            return _V("i", shape)
        if name in _TRANS:
            self.count("trans", _numel(args[0].shape))
            return _V("f", args[0].shape)
        if name == "sigmoid":   # 1 / (1 + exp(-x)): neg, add, div + one exp
            self.count("other", 3 * _numel(args[0].shape))
            self.count("trans", _numel(args[0].shape))
            return _V("f", args[0].shape)
        if name == "abs":
            return args[0]
        if name == "floor":   # not a counted operation in the interpreter (runtime/measure_hooks.py)
            return _V("f", args[0].shape)
        if name in ("sum", "max", "min"):
            x = args[0]
            axis = args[1].value if len(args) > 1 else kw["axis"].value
            out = tuple(s for k, s in enumerate(x.shape) if k != axis % len(x.shape))
            if x.kind == "f":
                self.count("other", _numel(x.shape) - _numel(out))
            return _V(x.kind, out)
        raise UnsupportedError(f"cost model: tl.{name} is not modelled")


_LEDGERS: dict = {}


def ledger(program, spec) -> Ledger:
    """The per-region work of a generated tiled kernel (cached by source text)."""
    return function_ledger(program, spec.source, "_attn_fwd", spec.loads, spec.stores, spec.output,
                           ptr_elems={ts.arg: "i" for ts in spec.summaries} or None, marks=spec.regions)


def function_ledger(program, source: str, fn: str, loads, stores, output: str = "", consts=None,
                    ptr_elems=None, marks=None) -> Ledger:
    """The per-region work of one function of a generated module, with its access sites (cached). `marks`: line
    number -> region of the blocks the emitter marked (key-tile loops, hop loops, skip and mask tests); any other
    loop is ("loop", q), the q-th of the function."""
    key = (source, fn, tuple(sorted((consts or {}).items())), tuple(sorted((ptr_elems or {}).items())))
    if key not in _LEDGERS:
        regions = _Walker(ast.parse(source), program, output, consts, ptr_elems, marks).run(fn)
        loads = {s.name: s for s in loads}
        stores = {s.name: s for s in stores}
        for r, w in regions.items():
            missing = [x for x in w.loads if x not in loads] + [x for x in w.stores if x not in stores]
            if missing:
                raise UnsupportedError(f"cost model: accesses {missing} in region {r} of {fn} have no emitter "
                                       f"record")
        _LEDGERS[key] = Ledger(regions, loads, stores)
    return _LEDGERS[key]
