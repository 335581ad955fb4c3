"""The merge of split-KV partials with the epilogue of an output computed from several softmax branches fused into
it (PiAttention: O = g B0 + (1 - g) B1, g = sigmoid(dot(Q[i], wg) + bg)), so a decoding step of such an output is
its branches' grid launches and this one kernel, with no torch operations after it.

`_merge_epilogue` merges every branch over the splits with the arithmetic of `_merge_splits` (codegen/splitkv.py)
into a [BLOCK_R, BLOCK_E] tile per branch, held in registers, then evaluates the epilogue on those tiles: rows are
the output's (batch..., lead..., n) rows flattened (decomposed into the indices the epilogue reads inputs at),
columns its last axis, and a reduction inside the epilogue (the gate's dot over d) runs over a tile axis of its own
lanes. Fused when the epilogue is elementwise in the branch values and the rows' inputs (reads of a branch at its
own row and column, inputs read at the epilogue's variables, reductions over inputs only); otherwise the caller
evaluates it with torch ops (runtime/epilogue_eval.py) and gets the reason from UnsupportedError.

The emitter records every floating-point operation it writes with its tile shape, and every load, so that the
cost model (runtime/decode_merge.py) counts the kernel as the instrumented interpreter executes it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import sympy as sp

from moa import dnf as D
from moa import ir
from moa.errors import UnsupportedError

from .exprs import _canon
from .printer import code as pcode
from .tidy import helpers_for, prune


FUSED_MERGE_KERNEL = "_merge_epilogue"
_ARITH = {"add": "+", "sub": "-", "mul": "*", "div": "/"}
_CMP = {"lt": "<", "le": "<=", "gt": ">", "ge": ">=", "eq": "==", "ne": "!=", "and": "&", "or": "|"}
# unary functions: (Triton text, flops per element, transcendentals per element), as the interpreter counts them
# (tl.sigmoid is 1 / (1 + exp(-x)); _tanh and _elu are codegen/tidy.py's helpers)
_UNARY = {"exp": ("tl.exp", 0, 1), "log": ("tl.log", 0, 1), "sqrt": ("tl.sqrt", 0, 1), "rsqrt": ("tl.rsqrt", 0, 1),
          "sin": ("tl.sin", 0, 1), "cos": ("tl.cos", 0, 1), "erf": ("tl.erf", 0, 1), "sigmoid": ("tl.sigmoid", 3, 1),
          "tanh": ("_tanh", 5, 1), "elu": ("_elu", 1, 1)}
_UNARY64 = {**_UNARY, "tanh": ("_tanh64", 15, 1), "elu": ("_elu64", 12, 1)}   # float64 kernels' exact helpers


@dataclass(frozen=True)
class FusedMerge:
    """The merge of an epilogue's branches with the epilogue evaluated on the merged tiles, in one kernel.

    inputs: (name, own rank) of the inputs the epilogue reads (query side or replicated), in argument order;
    dims: the dim names passed as integers; reduces: (constexpr, extent) of each reduction's tile axis.
    ops: (shape, flops, transcendentals per element, is_reduction) of every counted operation of the epilogue,
    shape a frozenset of tile axes ("r" rows, "e" columns, "k0" ... reductions); loads: (input, shape) of each
    load. The cost model (runtime/decode_merge.py) counts these as the instrumented interpreter does."""
    source: str
    inputs: tuple
    dims: tuple
    reduces: tuple
    ops: tuple
    loads: tuple


class _Epi:
    """Triton text of an epilogue expression over [BLOCK_R, *] tiles: rows on axis 0, the columns or one
    reduction's lanes on axis 1. A value is (code, shape, kind): kind "const" (a Python literal, free), "int",
    "bool" or "float"."""

    def __init__(self, ep, decl: dict, acc: str, batched: frozenset):
        self.ep, self.decl, self.acc, self.batched = ep, decl, acc, batched
        *lead, i, c = ep.vars
        self.branch = {b: k for k, b in enumerate(ep.branches)}
        self.names = {v: f"idx_{k}[:, None]" for k, v in enumerate(lead)}
        self.names[i] = "idx_i[:, None]"
        self.names[c] = "offs_e[None, :]"
        self.shapes = {v: frozenset("r") for v in (*lead, i)}
        self.shapes[c] = frozenset("e")
        self.lines, self.inputs, self.dims, self.reduces, self.ops, self.loads = [], [], [], [], [], []
        self.memo: dict = {}
        self.count = 0

    def fresh(self, base: str) -> str:
        self.count += 1
        return f"{base}{self.count}"

    def idx(self, e) -> tuple[str, frozenset]:
        e = sp.sympify(e)
        names = dict(self.names)
        for s in e.free_symbols:
            if s not in names:   # a dim: an integer argument
                if s.name not in self.dims:
                    self.dims.append(s.name)
                names[s] = f"dim_{s.name}"
        shape = frozenset().union(*[self.shapes.get(s, frozenset()) for s in e.free_symbols])
        return pcode(e, names), shape

    def value(self, e):
        key = (_canon(e), tuple(sorted(self.names.items(), key=str)))
        if key not in self.memo:
            self.memo[key] = self._value(e)
        return self.memo[key]

    def _float(self, v) -> str:
        code, _, kind = v
        if kind == "float":
            return code
        if kind != "const":
            return f"({code}).to({self.acc})"
        try:
            return repr(float(code))
        except ValueError:   # float("inf"), a boolean
            return code

    def _count(self, shape, flops: int, trans: int = 0, reduce: bool = False) -> None:
        if flops or trans:
            self.ops.append((shape, flops, trans, reduce))

    # long: one case per DNF node kind, each with the interpreter's count of what it emits
    def _value(self, e):
        if isinstance(e, D.Const):
            v = e.value
            if isinstance(v, float) and math.isinf(v):
                return ('float("inf")' if v > 0 else 'float("-inf")'), frozenset(), "const"
            return repr(v), frozenset(), "const"
        if isinstance(e, D.Index):
            code, shape = self.idx(e.expr)
            return code, shape, "int" if shape else "const" if e.expr.is_number else "int"
        if isinstance(e, D.Read):
            return self._read(e)
        if isinstance(e, D.Reduce):
            return self._reduce(e)
        if not isinstance(e, D.Op):
            raise UnsupportedError(f"{type(e).__name__} in an epilogue")
        args = [self.value(a) for a in e.args]
        shape = frozenset().union(*[a[1] for a in args])
        if len(shape - {"r"}) > 1:
            raise UnsupportedError("an operation mixing the columns and a reduction's lanes")
        const = all(a[2] == "const" for a in args)
        flt = e.dtype == ir.FLOAT
        fn = e.fn
        if fn in ("add", "sub") and flt and args[1][0] in ("0.0", "0") and args[0][2] == "float":
            return args[0]   # x + 0 (a gate's bias of 0.0): nothing to compute
        if fn in _ARITH or fn in ("min", "max"):
            x, y = (self._float(a) for a in args) if flt else (a[0] for a in args)
            text = f"({x} {_ARITH[fn]} {y})" if fn in _ARITH else \
                f"tl.{'minimum' if fn == 'min' else 'maximum'}({x}, {y})"
            cost = 1 if flt else 0
        elif fn in _CMP:
            text, cost = f"({args[0][0]} {_CMP[fn]} {args[1][0]})", 0
        elif fn == "where":
            a, b = (self._float(x) for x in args[1:]) if flt else (x[0] for x in args[1:])
            text, cost = f"tl.where({args[0][0]}, {a}, {b})", 0
        elif fn == "neg":
            text, cost = f"(-{args[0][0]})", 1 if flt else 0
        elif fn == "not":
            text, cost = f"({args[0][0]} == 0)", 0
        elif fn == "abs":
            text, cost = f"tl.abs({args[0][0]})", 0
        elif fn == "relu":
            text, cost = f"tl.maximum({args[0][0]}, {'0.0' if flt else '0'})", 1 if flt else 0
        elif fn in _UNARY:
            name, fl, tr = (_UNARY64 if self.acc == "tl.float64" else _UNARY)[fn]
            text = f"{name}({self._float(args[0])})"
            if not const:
                self._count(shape, fl, tr)
            return self._named(text, shape, "const" if const else "float")
        elif fn in ("floordiv", "mod") and not flt:
            text, cost = f"_{fn}({args[0][0]}, {args[1][0]})", 0
        elif fn == "pow" and isinstance(e.args[1], D.Const) and float(e.args[1].value).is_integer() and \
                1 <= float(e.args[1].value) <= 16:
            k = int(float(e.args[1].value))
            b = self._float(args[0]) if flt else args[0][0]
            text, cost = "(" + " * ".join([b] * k) + ")", (k - 1) if flt else 0
        else:
            raise UnsupportedError(f"no fused form for '{fn}' in an epilogue")
        if const:
            return text, shape, "const"
        if cost:
            self._count(shape, cost)
        return self._named(text, shape, "float" if flt else "bool" if e.dtype == ir.BOOL else "int")

    def _named(self, text: str, shape, kind: str):
        if kind == "const":
            return text, shape, kind
        name = self.fresh("t")
        self.lines.append(f"    {name} = {text}")
        return name, shape, kind

    def _read(self, e):
        if e.name in self.branch:
            if tuple(sp.sympify(x) for x in e.index) != tuple(self.ep.vars):
                raise UnsupportedError(f"branch {e.name} read at {e.index}, not at its own row and column")
            return f"br{self.branch[e.name]}", frozenset("re"), "float"
        node = self.decl[e.name]
        if e.name not in [n for n, _ in self.inputs]:
            self.inputs.append((e.name, len(node.shape)))
        k = [n for n, _ in self.inputs].index(e.name)
        batched = e.name in self.batched   # a batch offset per row: the load is a row vector at least
        parts, shape, masks = [f"in{k} + boff{k}" if batched else f"in{k}"], frozenset("r" if batched else ""), []
        for ax, ix in enumerate(e.index):
            ix = sp.sympify(ix)
            if not (ix.is_Symbol or ix.is_Integer):
                raise UnsupportedError(f"input {e.name} read at {ix}: a fused epilogue reads inputs at its "
                                       "variables or constants")
            code, sh = self.idx(ix)
            parts.append(f"{code} * st{k}_{ax}")
            shape |= sh
        masks += ["row_ok[:, None]"] if "r" in shape else []
        masks += ["col_ok"] if "e" in shape else []
        masks += [f"kmask{x[1:]}" for x in sorted(shape) if x.startswith("k")]
        self.loads.append((e.name, shape))
        text = f"tl.load({' + '.join(parts)}" + (f", mask={' & '.join(masks)}, other=0)" if masks else ")")
        kind = "float" if node.dtype == ir.FLOAT else "bool" if node.dtype == ir.BOOL else "int"
        return self._named(f"{text}.to({self.acc})" if kind == "float" else text, shape, kind)

    def _reduce(self, e):
        if e.op not in ("sum", "max", "min") or e.dtype != ir.FLOAT:
            raise UnsupportedError(f"a {e.op} reduction of {e.dtype} in an epilogue")
        n = len(self.reduces)
        ext, _ = self.idx(e.extent)
        self.reduces.append((f"BLOCK_K{n}", e.extent))
        lane = f"k{n}"
        self.lines.append(f"    kmask{n} = tl.arange(0, BLOCK_K{n})[None, :] < {ext}")
        outer = (dict(self.names), dict(self.shapes))
        self.names[e.var] = f"tl.arange(0, BLOCK_K{n})[None, :]"
        self.shapes[e.var] = frozenset([lane])
        try:
            body = self.value(e.body)
        finally:
            self.names, self.shapes = outer
        if any(x.startswith("k") and x != lane for x in body[1]) or "e" in body[1]:
            raise UnsupportedError("a reduction over the columns or a nested reduction in an epilogue")
        ident = {"sum": "0.0", "max": 'float("-inf")', "min": 'float("inf")'}[e.op]
        shape = (body[1] & {"r"}) | {lane}
        masked = self._named(f"tl.where(kmask{n}, {self._float(body)}, {ident})", shape, "float")
        self._count(shape, 1, 0, reduce=True)
        return self._named(f"tl.{e.op}({masked[0]}, axis=1)[:, None]", shape & {"r"}, "float")


# long: the signature, the row decomposition, each branch's merge, the epilogue and the store, top to bottom
def fused_merge_source(ep, decl: dict, kinds: tuple, nbatch: int, acc: str,
                       batched: frozenset = frozenset()) -> FusedMerge:
    """The kernel `_merge_epilogue`: every branch of `ep` (moa/shard.py Epilogue) merged over its splits as
    `_merge_splits` merges them (kinds[k]: branch k's monoid, softmax, norm or sum), then the epilogue evaluated on the
    merged tiles and the output stored; rows are (batch..., lead..., n) flattened. UnsupportedError (with the
    reason) for an epilogue that is not elementwise in the branch values and the rows' inputs: a branch read
    elsewhere than at its own (row, column), a reduction over the columns or nested, an input read at an index
    expression, a function without a fused form. acc: the accumulation dtype's Triton name; batched: the inputs
    that differ along the batch axes (read at each row's batch index; the others once per program)."""
    epi = _Epi(ep, decl, acc, batched if nbatch else frozenset())
    val = epi.value(ep.expr)
    nlead = len(ep.vars) - 2
    nb = len(ep.branches)
    head = [f"    O{k}, so{k}, sr{k}, lse{k}, sl{k}," for k in range(nb)]
    for k, (_, rank) in enumerate(epi.inputs):
        head.append(f"    in{k}, " + "".join(f"sb{k}_{j}, " for j in range(nbatch)) +
                    "".join(f"st{k}_{a}, " for a in range(rank)))
    head.append("    O_out, stride_out_r, rows, dim_e, nsplit, NL,")
    head += [f"    LEAD{k}," for k in range(nlead)] + [f"    BATCH{k}," for k in range(nbatch)]
    head += [f"    dim_{d}," for d in epi.dims]
    head += ["    BLOCK_R: tl.constexpr, BLOCK_E: tl.constexpr,"] + [f"    {c}: tl.constexpr," for c, _ in epi.reduces]
    body = ["    offs_r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)",
            "    offs_e = tl.arange(0, BLOCK_E)",
            "    row_ok = offs_r < rows",
            "    col_ok = offs_e[None, :] < dim_e",
            "    tile_ok = row_ok[:, None] & col_ok",
            "    idx_i = offs_r % NL",
            "    rest = offs_r // NL"]
    for k in reversed(range(nlead)):
        body += [f"    idx_{k} = rest % LEAD{k}", f"    rest = rest // LEAD{k}"]
    for k in reversed(range(nbatch)):
        body += [f"    bat{k} = rest % BATCH{k}", f"    rest = rest // BATCH{k}"]
    for k, (name, _) in enumerate(epi.inputs):
        if name in epi.batched:
            body.append(f"    boff{k} = " + " + ".join(f"bat{j}[:, None] * sb{k}_{j}" for j in range(nbatch)))
    for k, kind in enumerate(kinds):
        body += [line.replace("#", str(k)) for line in _merge_lines(kind, acc)]
    body += epi.lines
    out = val[0] if val[1] == frozenset("re") and val[2] == "float" else \
        f"tl.broadcast_to({epi._float(val)}, [BLOCK_R, BLOCK_E])"
    body.append(f"    tl.store(O_out + offs_r[:, None] * stride_out_r + offs_e[None, :], "
                f"{out}.to(O_out.dtype.element_ty), mask=tile_ok)")
    text = "\n".join(["@triton.jit", f"def {FUSED_MERGE_KERNEL}(", *head, "):",
                      "    # the branches merged over the splits, then the epilogue on the merged tiles", *prune(body)])
    helpers = helpers_for(text)
    source = "# Generated by moa: split-KV merge with a fused epilogue (codegen/splitkv.py).\nimport triton\n" \
        "import triton.language as tl\n\n\n" + (helpers + "\n\n\n" if helpers else "") + text + "\n"
    return FusedMerge(source, tuple(epi.inputs), tuple(epi.dims), tuple(epi.reduces), tuple(epi.ops),
                      tuple(epi.loads))


def _merge_lines(kind: str, acc: str) -> list:
    """Branch #'s merge over the splits (the arithmetic of `_merge_splits`), leaving br# [BLOCK_R, BLOCK_E]; kind
    softmax, norm or sum (partials (O_s, 1) added, not divided)."""
    norm = kind != "softmax"
    lines = [f"    den# = tl.zeros([BLOCK_R], dtype={acc})", f"    acc# = tl.zeros([BLOCK_R, BLOCK_E], dtype={acc})"]
    if not norm:
        lines += [f"    top# = tl.full([BLOCK_R], float(\"-inf\"), dtype={acc})",
                  "    for s in range(nsplit):",
                  "        top# = tl.maximum(top#, tl.load(lse# + s * sl# + offs_r, mask=row_ok, "
                  "other=float(\"-inf\")))",
                  "    top# = tl.where(top# == float(\"-inf\"), 0.0, top#)"]
    lines.append("    for s in range(nsplit):")
    lines.append("        w = tl.load(lse# + s * sl# + offs_r, mask=row_ok, other=0.0)" if norm else
                 "        w = tl.exp(tl.load(lse# + s * sl# + offs_r, mask=row_ok, other=float(\"-inf\")) - top#)")
    lines += ["        o = tl.load(O# + s * so# + offs_r[:, None] * sr# + offs_e[None, :], mask=tile_ok, other=0.0)",
              "        acc# += tl.where(w[:, None] != 0, o * w[:, None], 0.0)",
              "        den# += w",
              "    ok# = den# != 0",
              "    br# = tl.where(ok#[:, None], acc# / tl.where(ok#, den#, 1.0)[:, None], 0.0)" if kind != "sum" else
              "    br# = acc#"]
    return lines
