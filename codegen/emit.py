"""Emit a readable Triton kernel (tutorial naming) from an ONF Schedule.

User identifiers never reach the source verbatim: they were validated by the parser (ASCII identifiers,
no dunders, at most 64 characters) and are renamed here with prefixes and suffixes that the kernel's own
names never use: input/output X -> X_ptr, stride_X_0 ...; dim n -> dim_n; leading index a -> idx_a.
Numbers enter only as Python literals printed by repr().
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import sympy as sp

from moa import dnf as D
from moa import intervals as iv
from moa import ir
from moa import symbolic as sy
from moa.errors import UnsupportedError
from moa.onf import HOPS, RESIDUE, BranchValue, DotTile, Schedule
from moa.program import Program

from .hops import emit_hop_branch
from .printer import code as pcode

TL_DTYPE = {"float64": "tl.float64", "float32": "tl.float32", "float16": "tl.float16", "bfloat16": "tl.bfloat16"}

HELPERS = '''
@triton.jit
def _mod(a, b):
    # floor modulo (b > 0), the same on the GPU (truncating %) and in the interpreter (numpy %)
    return ((a % b) + b) % b


@triton.jit
def _floordiv(a, b):
    # floor division (b > 0): exact division of a - _mod(a, b)
    return (a - _mod(a, b)) // b


@triton.jit
def _tanh(x):
    e = tl.exp(-2.0 * tl.abs(x))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(x >= 0, t, -t)


@triton.jit
def _elu(x):
    return tl.where(x > 0, x, tl.exp(x) - 1.0)


@triton.jit
def _sign(x):
    return tl.where(x > 0, 1, 0) - tl.where(x < 0, 1, 0)
'''


@dataclass(frozen=True)
class AccessSite:
    """One tl.load / tl.store the emitter wrote, for the cost model (moa/cost.py).

    `name` is the variable a load assigns (or the output / "lse" for a store); `tensor` the input or output.
    `index` holds the sympy index expressions per axis; `axes` maps each tile variable used to the tile axis it
    ranges over ("row": offs_m, "key": offs_n, "col": offs_v, or a head-dim constexpr name such as "HEAD_DIM");
    `conds` is the access mask as sympy relations (lane-wise and scalar parts: a lane is accessed iff all hold).
    """
    name: str
    tensor: str
    index: tuple
    axes: tuple          # ((symbol, axis), ...)
    conds: tuple


def _axis_of(code: str) -> str:
    """'offs_m[:, None]' -> 'row'; 'offs_n[None, :]' -> 'key'; 'offs_v[...]' -> 'col'; 'offs_a' (the residue
    schedule's a, i = r + s a) -> 'lifted_row'; 'offs_head_dim_2' -> 'HEAD_DIM_2'."""
    base = code.split("[")[0].strip()
    axes = {"offs_m": "row", "offs_n": "key", "offs_v": "col", "offs_a": "lifted_row"}
    return axes.get(base, base[len("offs_"):].upper())


@dataclass(frozen=True)
class KernelSpec:
    """What the launcher needs to call a generated kernel."""
    name: str
    source: str
    output: str
    inputs: tuple          # input names in signature order
    dims: tuple            # dim names in signature order
    nbatch: int
    block_m: int
    block_n: int
    head_dims: tuple       # ((constexpr name, extent expr), ...) padded to powers of two at launch
    has_lse: bool
    lead: tuple            # ((var name, extent expr), ...)
    row_extent: sp.Expr
    col_extent: sp.Expr
    loads: tuple = ()      # AccessSite per tl.load, in emission order
    stores: tuple = ()     # AccessSite per tl.store


def _invariant(e, key_vars) -> bool:
    """True if e does not change along the key loop (no key variable, no score tile)."""
    return not (D.free_vars(e) & key_vars) and not any(isinstance(x, DotTile) for x in D.nodes(e))


def _canon(e):
    """Rename bound variables canonically so that alpha-equivalent expressions share one name (CSE)."""
    count = [0]

    def go(x):
        if isinstance(x, D.BINDERS):
            new = sp.Symbol(f"_b{count[0]}", integer=True, nonnegative=True)
            count[0] += 1
            x = D.subs(x, {x.var: new})
            from dataclasses import replace
            x = replace(x, var=new)
        kids = D.children(x)
        return D.with_children(x, [go(k) for k in kids]) if kids else x

    return D.show(go(e))


@dataclass
class _Scope:
    """Where emitted statements go, with the names they define (for CSE)."""
    lines: list
    indent: str
    cache: dict = field(default_factory=dict)
    parent: _Scope | None = None

    def lookup(self, key):
        s = self
        while s is not None:
            if key in s.cache:
                return s.cache[key]
            s = s.parent
        return None


class Emitter:
    def __init__(self, program: Program, sched: Schedule, dtype: str):
        self.p, self.s = program, sched
        self.dtype = dtype
        self.acc = "tl.float64" if dtype == "float64" else "tl.float32"
        self.in_dt = TL_DTYPE[dtype]
        self.names: dict = {d: f"dim_{d.name}" for d in program.dims}
        for v, _ in sched.lead:
            self.names[v] = f"idx_{v.name}"
        if sched.lift is not None:
            self.names[sched.lift.res] = "res"
            for b in sched.branches:  # a key residue rho = (r + c) mod s other than r
                if b.lift is not None and b.lift.base != sched.lift.res:
                    self.names[b.lift.base] = pcode(b.lift.base_value, self.names)
        self.used_inputs: list = []
        self.counter = 0
        self.head_dims: dict = {}   # extent -> constexpr name
        self.loads: list = []       # AccessSite per emitted tl.load (the cost model's ledger of memory accesses)

    def fresh(self, base):
        self.counter += 1
        return f"{base}{self.counter}"

    def head_dim(self, extent) -> str:
        extent = sp.sympify(extent)
        if extent not in self.head_dims:
            k = len(self.head_dims)
            self.head_dims[extent] = "HEAD_DIM" if k == 0 else f"HEAD_DIM_{k + 1}"
        return self.head_dims[extent]

    def use_input(self, name):
        if name not in self.used_inputs:
            self.used_inputs.append(name)

    # ---- scalar expressions over tiles ----------------------------------------------------------------
    def idx(self, e, vmap) -> str:
        return pcode(e, {**self.names, **vmap})

    def emit(self, e, vmap: dict, scope: _Scope, hoist: _Scope | None = None, key_vars=frozenset()) -> str:
        """Code for a DNF scalar expression as a tile; loads go to `hoist` when they do not use key_vars."""
        if isinstance(e, D.Const):
            v = e.value
            if isinstance(v, bool):
                return "True" if v else "False"
            if isinstance(v, float) and math.isinf(v):
                return 'float("inf")' if v > 0 else 'float("-inf")'
            return repr(v)
        if isinstance(e, D.Index):
            return self.idx(e.expr, vmap)
        if isinstance(e, DotTile):
            return f"qk{e.branch}"
        if isinstance(e, BranchValue):
            return f"o{e.branch}"
        target = scope
        if hoist is not None and _invariant(e, key_vars):
            target = hoist
        key = _canon(e)
        found = target.lookup(key) or scope.lookup(key)
        if found:
            return found
        if isinstance(e, D.Read):
            name = self._load(e, vmap, target)
        elif isinstance(e, D.Op):
            args = [self.emit(a, vmap, scope, hoist, key_vars) for a in e.args]
            text = self._op(e, args)
            if len(text) < 48 and e.fn not in ("where",):
                return text
            name = self.fresh("t")
            target.lines.append(f"{target.indent}{name} = {text}")
        elif isinstance(e, D.Reduce):
            name = self._row_reduce(e, vmap, target)
        else:
            raise UnsupportedError(f"cannot emit {type(e).__name__} inside a tile: {D.show(e)[:100]}")
        target.cache[key] = name
        return name

    def _float(self, a: str, e) -> str:
        if e.dtype == ir.FLOAT:
            return a
        if isinstance(e, D.Const) or (isinstance(e, D.Index) and e.expr.is_number):
            return repr(float(e.value if isinstance(e, D.Const) else e.expr))
        return f"({a}).to({self.acc})"

    def _op(self, e: D.Op, a: list) -> str:
        fn = e.fn
        binary = {"add": "+", "sub": "-", "mul": "*", "lt": "<", "le": "<=", "gt": ">", "ge": ">=", "eq": "==",
                  "ne": "!=", "and": "&", "or": "|"}
        if fn in binary:
            x, y = a
            if fn in ("add", "sub", "mul") and e.dtype == ir.FLOAT:
                x, y = self._float(x, e.args[0]), self._float(y, e.args[1])
            return f"({x} {binary[fn]} {y})"
        if fn == "div":
            return f"({self._float(a[0], e.args[0])} / {self._float(a[1], e.args[1])})"
        if fn == "floordiv":
            return f"_floordiv({a[0]}, {a[1]})"
        if fn == "mod":
            return f"_mod({a[0]}, {a[1]})"
        if fn == "neg":
            return f"(-{a[0]})"
        if fn == "not":
            return f"({a[0]} == 0)"
        if fn == "where":
            return f"tl.where({a[0]}, {a[1]}, {a[2]})"
        if fn in ("min", "max"):
            x, y = a
            if e.dtype == ir.FLOAT:
                x, y = self._float(x, e.args[0]), self._float(y, e.args[1])
            return f"tl.{'minimum' if fn == 'min' else 'maximum'}({x}, {y})"
        if fn == "pow":
            return self._pow(e, a)
        one = {"exp": "tl.exp", "log": "tl.log", "sqrt": "tl.sqrt", "rsqrt": "tl.rsqrt", "sin": "tl.sin",
               "cos": "tl.cos", "sigmoid": "tl.sigmoid", "tanh": "_tanh", "elu": "_elu"}
        if fn in one:
            return f"{one[fn]}({self._float(a[0], e.args[0])})"
        if fn == "abs":
            return f"tl.abs({a[0]})"
        if fn == "relu":
            return f"tl.maximum({a[0]}, 0)" if e.dtype != ir.FLOAT else f"tl.maximum({a[0]}, 0.0)"
        if fn == "sign":
            s = f"_sign({a[0]})"
            return f"({s}).to({self.acc})" if e.dtype == ir.FLOAT else s
        raise UnsupportedError(f"no Triton form for scalar function '{fn}'")

    def _pow(self, e, a):
        base, ex = e.args
        exv = ex.value if isinstance(ex, D.Const) else ex.expr if isinstance(ex, D.Index) and ex.expr.is_number \
            else None
        if exv is not None and float(exv).is_integer() and 0 <= float(exv) <= 16:
            k = int(float(exv))
            if k == 0:
                return "1.0" if e.dtype == ir.FLOAT else "1"
            b = self._float(a[0], base) if e.dtype == ir.FLOAT else a[0]
            return "(" + " * ".join([b] * k) + ")"
        bv = base.value if isinstance(base, D.Const) else base.expr if isinstance(base, D.Index) and \
            base.expr.is_number else None
        x = self._float(a[1], ex)
        if bv is not None and float(bv) > 0:
            return f"tl.exp2({x} * {math.log2(float(bv))!r})"
        # general real power a^b = 2^(b log2 a), defined for a > 0 (a = 0 gives 0 for b > 0)
        return f"tl.exp2({x} * tl.log2({self._float(a[0], base)}))"

    def _load(self, r: D.Read, vmap, scope: _Scope, name: str | None = None, cast: bool = True) -> str:
        self.use_input(r.name)
        node = self.p.input_map[r.name]
        parts, masks = [f"{r.name}_ptr + off_{r.name}"], []
        scalar_masks = []  # conditions on leading indices only: kept apart (see below)
        conds = []
        for k, (ix, ext) in enumerate(zip(r.index, node.shape)):
            ix = sp.sympify(ix)
            c = self.idx(ix, vmap)
            parts.append(f"{c} * stride_{r.name}_{k}")
            lo_ok, hi_ok = self._in_range(ix, ext, vmap)
            sink = masks if set(vmap) & ix.free_symbols else scalar_masks
            if not hi_ok:
                sink.append(f"({c} < {self.idx(ext, {})})")
                conds.append(sp.Lt(ix, ext, evaluate=False))
            if not lo_ok:
                sink.append(f"({c} >= 0)")
                conds.append(sp.Ge(ix, 0, evaluate=False))
        other = "0.0" if node.dtype == ir.FLOAT else "0"
        m = " & ".join(masks) if masks else "True"
        if scalar_masks:  # a scalar condition joins a tile mask through tl.where (the interpreter rejects &)
            m = f"tl.where({' & '.join(scalar_masks)}, {m}, False)"
        raw = f"tl.load({' + '.join(parts)}, mask={m}, other={other})"
        load = raw
        if node.dtype == ir.FLOAT and cast:
            load += f".to({self.acc})"
        elif node.dtype == ir.BOOL:
            load = f"({load} != 0)"
        # the same tile loaded before in this scope or an enclosing one (e.g. Q for a second branch or the gate)
        hit = scope.lookup(("load", load))
        if hit is None and load != raw:
            hit = scope.lookup(("load", raw))
            hit = hit and (f"{hit}.to({self.acc})" if node.dtype == ir.FLOAT else f"({hit} != 0)")
        if hit:
            return hit
        name = name or self.fresh("ld_")
        scope.cache[("load", load)] = name
        used = set().union(*(sp.sympify(ix).free_symbols for ix in r.index)) if r.index else set()
        self.loads.append(AccessSite(name, r.name, tuple(sp.sympify(ix) for ix in r.index),
                                     tuple((v, _axis_of(code)) for v, code in vmap.items() if v in used),
                                     tuple(conds)))
        scope.lines.append(f"{scope.indent}{name} = {load}")
        return name

    def _in_range(self, ix, ext, vmap) -> tuple[bool, bool]:
        """(0 <= ix provably, ix < ext provably) over the ranges of the leading indices. Tile variables
        (rows, keys, head dims) are padded to powers of two, so an index using them is never provably below
        its extent."""
        if set(vmap) & ix.free_symbols:
            return bool(ix.is_nonnegative), False
        box = iv.Box({v: (sp.Integer(0), x - 1) for v, x in self.s.lead})
        rng = iv.interval(ix, box)
        if rng is None:
            return bool(ix.is_nonnegative), False
        lo, hi = rng
        return sy.prove_nonneg(lo) is True, sy.prove_nonneg(sp.sympify(ext) - 1 - hi) is True

    def _row_reduce(self, e: D.Reduce, vmap, scope: _Scope) -> str:
        """A reduction over a small axis held in one tile (e.g. q . wg over the head dim)."""
        hd = self.head_dim(e.extent)
        offs = f"offs_{hd.lower()}"
        inner = {**vmap, e.var: f"{offs}[None, :]"}
        body = self.emit(e.body, inner, scope)
        valid = f"({offs}[None, :] < {self.idx(e.extent, {})})"
        neutral = {"sum": "0.0", "max": 'float("-inf")', "min": 'float("inf")'}[e.op]
        red = {"sum": "tl.sum", "max": "tl.max", "min": "tl.min"}[e.op]
        name = self.fresh("red")
        scope.lines.append(f"{scope.indent}{name} = {red}(tl.where({valid}, {body}, {neutral}), 1)[:, None]")
        return name

    # ---- the kernel -------------------------------------------------------------------------------------
    def kernel(self, block_m: int, block_n: int, store_lse: bool) -> KernelSpec:
        s = self.s
        i, n_ext = s.row
        c, e_ext = s.col
        out = []
        body = _Scope(out, "    ")
        hv = "HEAD_DIM_V"
        rowmap = {i: "offs_m[:, None]", c: "offs_v[None, :]"}
        w = body.lines.append
        w("    pid = tl.program_id(0)" if s.kind == RESIDUE else "    start_m = tl.program_id(0)")
        w("    pid_z = tl.program_id(1)")
        for v, ext in reversed(s.lead):
            w(f"    idx_{v.name} = pid_z % {self.idx(ext, {})}")
            w(f"    pid_z = pid_z // {self.idx(ext, {})}")
        w("    # batch axes (broadcast): row-major decode of what is left of pid_z")
        w("    for_batch_offsets")  # placeholder replaced once the used inputs are known
        if s.kind == RESIDUE:
            self._residue_rows(w)
        else:
            w("    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)")
        w(f"    offs_v = tl.arange(0, {hv})")
        if s.kind == RESIDUE:
            st = s.lift.stride
            w("    a_lo = start_m * BLOCK_M  # I_LO of a lifted branch: first a of this tile")
            w("    a_hi = tl.minimum(a_lo + BLOCK_M, rows_res) - 1  # I_HI of a lifted branch: last valid a")
            w(f"    row_lo = res + {st} * a_lo  # I_LO: first row of this tile")
            w(f"    row_hi = res + {st} * a_hi  # I_HI: last valid row")
        else:
            w("    row_lo = start_m * BLOCK_M  # I_LO: first row of this tile")
            w(f"    row_hi = tl.minimum(row_lo + BLOCK_M, {self.idx(n_ext, {})}) - 1  # I_HI: last valid row")
        for k, b in enumerate(s.branches):
            self._branch(k, b, body, rowmap, block_n)
        w("    # epilogue")
        res = self.emit(s.epilogue, rowmap, body)
        w(f"    out_mask = (offs_m[:, None] < {self.idx(n_ext, {})}) & (offs_v[None, :] < {self.idx(e_ext, {})})")
        w(f"    tl.store({s.output}_ptr + off_{s.output} + offs_m[:, None] * stride_{s.output}_0 + "
          f"offs_v[None, :] * stride_{s.output}_1, ({res}).to({s.output}_ptr.dtype.element_ty), mask=out_mask)")
        if store_lse:
            w("    if STORE_LSE:")
            if s.branches[0].kind == "norm":   # normalize: the normaliser z = sum_j w_ij (ring merges by sums)
                w("        lse = z_i0")
            else:
                w("        lse = tl.where(l_i0 == 0, float(\"-inf\"), (m_i0 + tl.log2(tl.where(l_i0 == 0, 1.0, "
                  "l_i0))) * 0.6931471805599453)")
            w(f"        tl.store(lse_out + off_lse + offs_m, lse, mask=offs_m < {self.idx(n_ext, {})})")
        rows = (i, "row")
        self.stores = [AccessSite(s.output, s.output, (i, c), (rows, (c, "col")),
                                  (sp.Lt(i, n_ext, evaluate=False), sp.Lt(c, e_ext, evaluate=False)))]
        if store_lse:
            self.stores.append(AccessSite("lse", "lse", (i,), (rows,), (sp.Lt(i, n_ext, evaluate=False),)))
        return self._assemble(out, block_m, block_n, store_lse)

    def _residue_rows(self, w):
        """The rows of a program of the residue schedule: i = r + s a for one residue r and a tile of a."""
        rl = self.s.lift
        st = rl.stride
        n = self.idx(self.s.row[1], {})
        w(f"    # residue lifting i = r + {st} a: program_id(0) -> (residue res, tile start_m of a); the residues")
        w("    # below rows_rem hold rows_q + 1 rows, the others rows_q: no program without a row")
        w(f"    rows_q = _floordiv({n}, {st})")
        w(f"    rows_rem = {n} - {st} * rows_q")
        w("    tiles_long = (rows_q + BLOCK_M) // BLOCK_M")
        w("    tiles_short = tl.maximum((rows_q + BLOCK_M - 1) // BLOCK_M, 1)")
        w("    pid_short = pid - rows_rem * tiles_long")
        w("    res = tl.where(pid_short < 0, pid // tiles_long, rows_rem + pid_short // tiles_short)")
        w("    start_m = tl.where(pid_short < 0, pid - res * tiles_long, pid_short - (res - rows_rem) * tiles_short)")
        w(f"    rows_res = {self.idx(rl.rows, {})}  # rows of residue res")
        w("    offs_a = start_m * BLOCK_M + tl.arange(0, BLOCK_M)")
        w(f"    offs_m = res + {st} * offs_a  # query rows i = r + s a")

    def _branch(self, k, b, body: _Scope, rowmap, block_n):
        s = self.s
        i, _ = s.row
        w = body.lines.append
        j = b.var
        m_ext = self.idx(b.extent, {})
        w(f"    # branch {k}: {b.kind} reduction over {j.name} < {sy.show(b.extent)}")
        if b.skip is sp.true:
            w(f"    acc{k} = tl.zeros([BLOCK_M, HEAD_DIM_V], dtype={self.acc})  # no admissible key")
            w(f"    o{k} = acc{k}")
            return
        if b.dot is not None:
            hd = self.head_dim(b.dot.extent)
            offs = f"offs_{hd.lower()}"
            w(f"    {offs} = tl.arange(0, {hd})")
            amap = {i: "offs_m[:, None]", b.dot.var: f"{offs}[None, :]"}
            qa = self._factor(b.dot.a, amap, body, f"q{k}", f"(offs_m[:, None] < {self.idx(s.row[1], {})}) & "
                              f"({offs}[None, :] < {self.idx(b.dot.extent, {})})")
        if b.mode == HOPS:  # one key row per query row per hop (codegen/hops.py)
            emit_hop_branch(self, k, b, body, qa if b.dot is not None else None)
            return
        if b.kind == "softmax":
            w(f"    m_i{k} = tl.full([BLOCK_M], float(\"-inf\"), dtype={self.acc})")
            w(f"    l_i{k} = tl.zeros([BLOCK_M], dtype={self.acc})")
        else:
            w(f"    z_i{k} = tl.zeros([BLOCK_M], dtype={self.acc})")
        w(f"    acc{k} = tl.zeros([BLOCK_M, HEAD_DIM_V], dtype={self.acc})")
        names = {iv.I_LO: "row_lo", iv.I_HI: "row_hi", iv.J_LO: "col_lo", iv.J_HI: "col_hi", **self.names}
        if b.mode == "lift":  # residue-lift: key tiles in b-space, the box over (a, b)
            names.update({iv.I_LO: "a_lo", iv.I_HI: "a_hi"})
            w(f"    # lifted by residue-lift: keys {b.lift.var.name} = {sy.show(b.lift.key)}, loop over tiles of "
              f"{b.var.name}")
        lo = "0" if b.key_lo is None else f"tl.maximum(0, {pcode(b.key_lo, names)})"
        hi = f"{m_ext} - 1" if b.key_hi is None else f"tl.minimum({m_ext} - 1, {pcode(b.key_hi, names)})"
        w(f"    lo{k} = {lo}")
        w(f"    lo{k} = (lo{k} // BLOCK_N) * BLOCK_N  # first key tile")
        w(f"    hi{k} = {hi}  # last admissible key")
        # the loop's lines are collected apart so that loop-invariant loads hoist above it
        loop = _Scope([f"    for start_n in range(lo{k}, hi{k} + 1, BLOCK_N):"], "        ", parent=body)
        lw = loop.lines.append
        lw("        offs_n = start_n + tl.arange(0, BLOCK_N)")
        lw("        col_lo = start_n  # J_LO")
        lw(f"        col_hi = tl.minimum(start_n + BLOCK_N, {m_ext}) - 1  # J_HI")
        inner = loop
        if not iv.skip_implied_by_range(b.skip, b.key_lo, b.key_hi):   # else no tile in the loop is skipped
            lw(f"        tile_skip = {pcode(b.skip, names)}")
            lw("        if tile_skip == 0:")
            inner = _Scope(loop.lines, "            ", parent=loop)
        iw = inner.lines.append
        smap = {i: "offs_m[:, None]", j: "offs_n[None, :]"}
        if b.mode == "lift":
            smap[s.lift.a] = "offs_a[:, None]"
        if b.dot is not None:
            hd = self.head_dim(b.dot.extent)
            offs = f"offs_{hd.lower()}"
            kb = self._factor(b.dot.b, {j: "offs_n[:, None]", b.dot.var: f"{offs}[None, :]"}, inner, f"k{k}",
                              f"(offs_n[:, None] < {m_ext}) & ({offs}[None, :] < {self.idx(b.dot.extent, {})})")
            iw(f"{inner.indent}qk{k} = tl.dot({qa}, tl.trans({kb}){self._dot_kw()})")
        score = self.emit(b.score, smap, inner, hoist=body, key_vars=frozenset({j}))
        sname = "s" if b.kind == "softmax" else "w"
        iw(f"{inner.indent}{sname}{k} = {score}")
        neutral = 'float("-inf")' if b.kind == "softmax" else "0.0"
        valid = f"(offs_n[None, :] < {m_ext})"
        if b.mask is not None:
            mask = self.emit(b.mask, smap, inner, hoist=body, key_vars=frozenset({j}))
            valid = f"{mask} & {valid}"
        if b.full is sp.false:  # the analysis cannot prove any tile mask-free: mask every tile
            iw(f"{inner.indent}{sname}{k} = tl.where({valid}, {sname}{k}, {neutral})")
        else:
            iw(f"{inner.indent}tile_partial = {pcode(sp.Not(b.full), names)} | (start_n + BLOCK_N > {m_ext})")
            iw(f"{inner.indent}if tile_partial:")
            iw(f"{inner.indent}    {sname}{k} = tl.where({valid}, {sname}{k}, {neutral})")
        vmap = {j: "offs_n[:, None]", s.col[0]: "offs_v[None, :]"}
        v = self._factor(b.value, vmap, inner, f"v{k}", f"(offs_n[:, None] < {m_ext}) & "
                         f"(offs_v[None, :] < {self.idx(s.col[1], {})})")
        ind = inner.indent
        if b.kind == "softmax":
            w = body.lines.append
            iw(f"{ind}m_ij = tl.maximum(m_i{k}, tl.max({sname}{k}, 1) * 1.4426950408889634)")
            iw(f"{ind}m_safe = tl.where(m_ij == float(\"-inf\"), 0.0, m_ij)")
            iw(f"{ind}p = tl.exp2({sname}{k} * 1.4426950408889634 - m_safe[:, None])")
            iw(f"{ind}alpha = tl.exp2(m_i{k} - m_safe)")
            iw(f"{ind}l_i{k} = l_i{k} * alpha + tl.sum(p, 1)")
            iw(f"{ind}acc{k} = acc{k} * alpha[:, None] + tl.dot(p.to({v}.dtype), {v}{self._dot_kw()})")
            iw(f"{ind}m_i{k} = m_ij")
            body.lines.extend(loop.lines)
            w(f"    o{k} = acc{k} / tl.where(l_i{k} == 0, 1.0, l_i{k})[:, None]  # fin: 0 for rows with no key")
        else:
            iw(f"{ind}z_i{k} = z_i{k} + tl.sum({sname}{k}, 1)")
            iw(f"{ind}acc{k} = acc{k} + {self._weights_dot(f'{sname}{k}', v)}")
            body.lines.extend(loop.lines)
            w(f"    o{k} = acc{k} / tl.where(z_i{k} == 0, 1.0, z_i{k})[:, None]  # 0 where the normaliser is 0")

    def _weights_dot(self, w: str, v: str) -> str:
        """tl.dot of unbounded weights ((q . k)^p, not in [0, 1] like softmax's p) with a value tile. bf16 has
        fp32's exponent range: the weights are cast to it (tensor cores, as p is for softmax). fp16 would
        overflow past 65504: the dot runs in tf32 (tensor cores, fp32 range). fp32 and fp64 stay exact."""
        if self.dtype == "bfloat16":
            return f"tl.dot({w}.to(tl.bfloat16), {v})"
        if self.dtype == "float16":
            return f'tl.dot({w}, {v}.to(tl.float32), input_precision="tf32")'
        return f"tl.dot({w}, {v}.to({self.acc}){self._dot_kw()})"

    def _dot_kw(self):
        return ', input_precision="ieee"' if self.dtype == "float32" else ""

    def _factor(self, e, vmap, scope: _Scope, name, valid) -> str:
        """A dot operand tile: a plain read stays in the input dtype; anything computed is zeroed on padding
        lanes (f(0) need not be 0) and cast to the input dtype for the tensor cores."""
        if isinstance(e, D.Read):
            return self._load(e, vmap, scope, name=name, cast=False)
        x = self.emit(e, vmap, scope)
        scope.lines.append(f"{scope.indent}{name} = tl.where({valid}, {x}, 0.0).to({self.in_dt})")
        return name

    def _assemble(self, body_lines, block_m, block_n, store_lse) -> KernelSpec:
        s = self.s
        args = []
        for name in self.used_inputs:
            node = self.p.input_map[name]
            args.append(f"{name}_ptr")
            args += [f"stride_{name}_z{z}" for z in range(self.nbatch)]
            args += [f"stride_{name}_{k}" for k in range(node.rank)]
        o = s.output
        args.append(f"{o}_ptr")
        args += [f"stride_{o}_z{z}" for z in range(self.nbatch + len(s.lead))]
        args += [f"stride_{o}_0", f"stride_{o}_1"]
        if store_lse:
            args.append("lse_out")
            args += [f"lse_stride_z{z}" for z in range(self.nbatch + len(s.lead))]
        args += [f"dim_{d.name}" for d in self.p.dims]
        args += [f"Z{z}" for z in range(self.nbatch)]
        consts = ["BLOCK_M: tl.constexpr", "BLOCK_N: tl.constexpr"]
        consts += [f"{hd}: tl.constexpr" for hd in self.head_dims.values()]
        consts += ["HEAD_DIM_V: tl.constexpr"]
        if store_lse:
            consts.append("STORE_LSE: tl.constexpr")
        # batch offsets of every pointer
        dec = []
        z = "pid_z"
        for b in reversed(range(self.nbatch)):
            dec.append(f"    off_z{b} = {z} % Z{b}" if b else f"    off_z{b} = {z}")
            if b:
                dec.append(f"    {z} = {z} // Z{b}")
        for name in self.used_inputs:
            terms = [f"off_z{b}.to(tl.int64) * stride_{name}_z{b}" for b in range(self.nbatch)]
            dec.append(f"    off_{name} = {' + '.join(terms) if terms else '0'}")
        lead_idx = [f"off_z{b}.to(tl.int64)" for b in range(self.nbatch)] + \
            [f"idx_{v.name}.to(tl.int64)" for v, _ in s.lead]
        terms = [f"{x} * stride_{o}_z{k}" for k, x in enumerate(lead_idx)]
        dec.append(f"    off_{o} = {' + '.join(terms) if terms else '0'}")
        if store_lse:
            terms = [f"{x} * lse_stride_z{k}" for k, x in enumerate(lead_idx)]
            dec.append(f"    off_lse = {' + '.join(terms) if terms else '0'}")
        lines = []
        for ln in body_lines:
            if ln.strip() == "for_batch_offsets":
                lines += dec
            else:
                lines.append(ln)
        sig = ",\n    ".join(args + consts)
        header = self._header()
        src = (f"{header}\nimport triton\nimport triton.language as tl\n{HELPERS}\n\n@triton.jit\n"
               f"def _attn_fwd(\n    {sig},\n):\n" + "\n".join(lines) + "\n")
        hd = tuple((name, ext) for ext, name in self.head_dims.items())
        return KernelSpec("_attn_fwd", src, o, tuple(self.used_inputs), tuple(d.name for d in self.p.dims),
                          self.nbatch, block_m, block_n, hd, store_lse,
                          tuple((v.name, x) for v, x in s.lead), s.row[1], s.col[1], tuple(self.loads),
                          tuple(self.stores))

    def _header(self) -> str:
        s = self.s
        i, n = s.row
        c, e = s.col
        lines = ["# Generated by moa: do not edit. One fused kernel, no intermediate array in global memory.",
                 f"# program: {_safe_comment(self.p.name)}   output: {s.output}   dtype: {self.dtype}",
                 f"# {s.output}[{', '.join([v.name for v, _ in s.lead] + [i.name, c.name])}] = "
                 f"{_safe_comment(D.show(s.epilogue))}"]
        for k, b in enumerate(s.branches):
            lines.append(f"#   branch {k} ({b.kind}) over {b.var.name} < {sy.show(b.extent)}: "
                         f"score {_safe_comment(D.show(b.score))}")
            if b.mask is not None:
                lines.append(f"#     mask {_safe_comment(D.show(b.mask))}")
            lines.append(f"#     value {_safe_comment(D.show(b.value))}")
        lines += ["# symbols: offs_m = rows (query index) of this program; offs_n = key columns of a tile;",
                  "#   offs_v = value columns; HEAD_DIM = padded contraction extent; qk = score tile before",
                  "#   modifiers; m_i, l_i = running max (log2 units) and normaliser; acc = unnormalised output;",
                  "#   dim_X = extent X; X_ptr / stride_X_k = input X and its strides; idx_a = leading index a;",
                  "#   row_lo/row_hi, col_lo/col_hi = the tile's index box (I_LO, I_HI, J_LO, J_HI)."]
        return "\n".join(lines)

    nbatch = 0


def _safe_comment(text: str) -> str:
    """Comment text: printable ASCII without newlines (names are validated identifiers already)."""
    return "".join(ch if 32 <= ord(ch) < 127 else "?" for ch in text)[:200]


def generate(program: Program, sched: Schedule, dtype: str, nbatch: int, block_m: int = 64, block_n: int = 64,
             store_lse: bool = False) -> KernelSpec:
    """Triton source for one output's schedule, specialised to a dtype and the number of batch axes."""
    em = Emitter(program, sched, dtype)
    em.nbatch = nbatch
    return em.kernel(block_m, block_n, store_lse and returns_total(sched))


def returns_total(sched: Schedule) -> bool:
    """The kernel can store a per-row total with the output: the lse of a single softmax branch, or the normaliser
    z of a single normalize branch (STORE_LSE; ring attention merges partials by it)."""
    return sched.has_lse or (len(sched.branches) == 1 and sched.branches[0].kind == "norm"
                             and sched.branches[0].mix is None and sched.epilogue == BranchValue(0))
