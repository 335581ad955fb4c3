"""Tile code for DNF scalar expressions: the expression emitter every kernel family shares (codegen/emit.py for the
tiled kernel and its hop loops, codegen/window.py, codegen/chunked.py).

User identifiers never reach the source verbatim: they were validated by the parser (ASCII identifiers, no dunders,
at most 64 characters) and are renamed with affixes that the kernel's own names never use: input/output X -> X_ptr,
stride_X_0 ...; a tile of X -> X_row / X_key / X_tile ...; dim n -> dim_n; leading index a -> idx_a (and
codegen/names.py makes every user name opaque when renamed forms could collide). Numbers enter only as Python
literals printed by repr().
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

import sympy as sp

from moa import dnf as D
from moa import intervals as iv
from moa import ir
from moa import symbolic as sy
from moa.errors import UnsupportedError
from moa.onf import BranchValue, DotTile, Schedule
from moa.program import Program

from .printer import code as pcode
from .printer import float_literal, int_literal
from .powers import constant_value, pow_code
from .scope import Scope

_COMPARE = ("lt", "le", "gt", "ge", "eq", "ne")
TL_DTYPE = {"float64": "tl.float64", "float32": "tl.float32", "float16": "tl.float16", "bfloat16": "tl.bfloat16"}


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


@dataclass(frozen=True)
class TensorDesc:
    """A kernel argument that is a TMA tensor descriptor over an input (the call's tensor, batch axes first):
    `block` is its box, 1 on every axis but the last two (BLOCK_N and a head-dim constexpr, by name)."""
    arg: str
    tensor: str
    block: tuple


def _axis_of(code: str) -> str:
    """'offs_m[:, None]' -> 'row'; 'offs_n[None, :]' -> 'key'; 'offs_v[...]' -> 'col'; 'offs_a' (the residue
    schedule's a, i = r + s a) -> 'lifted_row'; 'offs_head_dim_2' -> 'HEAD_DIM_2'."""
    base = code.split("[")[0].strip()
    axes = {"offs_m": "row", "offs_n": "key", "offs_v": "col", "offs_a": "lifted_row"}
    return axes.get(base, base[len("offs_"):].upper())


def joined_mask(tile: list, scalar: list) -> str:
    """One mask of tile conditions and scalar ones (conditions on a program's leading indices): scalars join
    through tl.where (the interpreter rejects scalar & tile, and a mask of scalars alone); '' when there is none."""
    if scalar:
        return f"tl.where({' & '.join(scalar)}, {' & '.join(tile) or 'True'}, False)"
    return " & ".join(tile)


def _may_overflow(e, vmap) -> bool:
    """Whether integer index arithmetic e multiplies a tile variable by another variable, by itself, or by a
    constant of 128 or more: tile indices are 32-bit in a kernel (tl.arange), so such a product can wrap at
    dims far below the 2^31 a sum of indices reaches."""
    tiles = set(vmap)
    for t in sp.preorder_traversal(e):
        if isinstance(t, sp.Mul) and t.free_symbols & tiles:
            coeff, rest = t.as_coeff_Mul()
            if abs(coeff) >= 128 or len([f for f in sp.Mul.make_args(rest) if not f.is_number]) >= 2:
                return True
        if isinstance(t, sp.Pow) and t.base.free_symbols & tiles and t.exp.is_number and t.exp >= 2:
            return True
    return False


def _wide(code: str) -> str:
    """The code of a tile variable as a 64-bit integer (a loop counter is a Python int in the interpreter)."""
    scalar = code.isidentifier() and not code.startswith("offs_")   # offs_m & co. are index vectors
    return f"tl.full([], {code}, tl.int64)" if scalar else f"{code}.to(tl.int64)"


_KEY_STARTS = {"offs_n[:, None]": "start_n", "offs_nx[:, None]": "nxt_n"}   # key-tile rows -> their first key
_ROLE = {"offs_m": "row", "offs_a": "row", "offs_n": "key", "offs_v": "col", "hop": "hop"}


def _load_role(r: D.Read, vmap) -> str:
    """How a load is named after its tile axes: X_row, X_key, X_col, X_hd (a head dim), X_hop, X_tile (several)."""
    used = set().union(*(sp.sympify(ix).free_symbols for ix in r.index)) if r.index else set()
    roles = []
    for v, code in vmap.items():
        if v in used:
            base = code.split("[")[0].strip()
            role = _ROLE.get(base, "hop" if "hop" in base else "hd" if base.startswith("offs_") else "val")
            if role not in roles:
                roles.append(role)
    if "hop" in roles:
        return "hop"
    return roles[0] if len(roles) == 1 else "tile" if roles else "val"


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
            x = replace(x, var=new)
        kids = D.children(x)
        return D.with_children(x, [go(k) for k in kids]) if kids else x

    return D.show(go(e))


class Emitter:
    """Emits DNF scalar expressions as tile code: loads (with their access sites for the cost model), elementwise
    operations, reductions over a head dim held in one tile; common sub-expressions named once per scope."""

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
        self.taken: set = set()      # names of temporaries given out (fresh)
        self.head_dims: dict = {}   # extent -> constexpr name
        self.loads: list = []       # AccessSite per emitted tl.load (the cost model's ledger of memory accesses)
        self.atomics: list = []     # AccessSite per emitted tl.atomic_add (named atomic{k}, codegen/ledger.py)
        self.named: dict = {}       # index expression -> the kernel variable that holds it (computed once)
        self.inside: dict = {}      # tile variable -> an extent its whole tile lies below (loads need no bound)
        self.exact = frozenset()    # head-dim extents equal to their padded tiles at this launch
        self.tma = False            # key tiles of plain reads through TMA tensor descriptors (Hopper)
        self.nbatch = 0             # the call's batch axes (leading coordinates of a descriptor)
        self.descriptors: dict = {}  # (input, head-dim constexpr) -> TensorDesc
        self.nbranches = len(sched.branches)

    def sfx(self, k: int) -> str:
        """The suffix of branch k's names: none with one branch (acc, m_i, qk), else the branch number."""
        return "" if self.nbranches == 1 else str(k)

    def fresh(self, base: str) -> str:
        """A temporary's name: `base`, else base2, base3 ... (names by role, never a bare counter)."""
        name, k = base, 1
        sep = "_" if base[-1:].isdigit() else ""
        while name in self.taken:
            k += 1
            name = f"{base}{sep}{k}"
        self.taken.add(name)
        return name

    def name_expr(self, expr, name: str) -> None:
        """Index expression `expr` is held by kernel variable `name` from now on: printed as `name` wherever it
        occurs (common index expressions computed once)."""
        expr = sp.sympify(expr)
        if not (expr.is_Symbol or expr.is_Integer):
            self.named[expr] = sp.Symbol(f"_named_{len(self.named)}", integer=True)
            self.names[self.named[expr]] = name

    def head_dim(self, extent) -> str:
        extent = sp.sympify(extent)
        if extent not in self.head_dims:
            k = len(self.head_dims)
            self.head_dims[extent] = "HEAD_DIM" if k == 0 else f"HEAD_DIM_{k + 1}"
        return self.head_dims[extent]

    def head_offsets(self, extent, scope: Scope) -> str:
        """offs_head_dim (offs_head_dim_2 ...) of a head dim, defined once in the kernel's outermost scope."""
        hd = self.head_dim(extent)
        offs = f"offs_{hd.lower()}"
        if offs not in self.taken:
            self.taken.add(offs)
            while scope.parent is not None:
                scope = scope.parent
            scope.add(f"{offs} = tl.arange(0, {hd})")
        return offs

    def use_input(self, name):
        if name not in self.used_inputs:
            self.used_inputs.append(name)

    # ---- scalar expressions over tiles ----------------------------------------------------------------
    def idx(self, e, vmap) -> str:
        e = sp.sympify(e)
        if self.named:
            e = e.xreplace(self.named)
        if vmap and _may_overflow(e, vmap):   # a product of tile indices: in 64 bits, as the reference computes it
            vmap = {v: _wide(c) for v, c in vmap.items()}
        return pcode(e, {**self.names, **vmap})

    def emit(self, e, vmap: dict, scope: Scope, hoist: Scope | None = None, key_vars=frozenset(),
             role: str = "tmp") -> str:
        """Code for a DNF scalar expression as a tile; loads go to `hoist` when they do not use key_vars.
        Temporaries are named after `role` (mask, score, value, out ...)."""
        if isinstance(e, D.Const):
            v = e.value
            if isinstance(v, bool):
                return "True" if v else "False"
            return float_literal(v) if isinstance(v, float) else int_literal(v)
        if isinstance(e, D.Index):
            return self.idx(e.expr, vmap)
        if isinstance(e, DotTile):
            return f"qk{self.sfx(e.branch)}"
        if isinstance(e, BranchValue):
            return f"o{self.sfx(e.branch)}"
        target = scope
        if hoist is not None and _invariant(e, key_vars):
            target = hoist
        # the same expression at another tile layout (offs_m[:, None] in a key tile, offs_m in a hop loop) is
        # another value: the key holds the layout of the variables it reads
        key = (_canon(e), tuple(sorted((v.name, c) for v, c in vmap.items() if v in D.free_vars(e))))
        found = target.lookup(key) or scope.lookup(key)
        if found:
            return found
        if isinstance(e, D.Read):
            name = self._load(e, vmap, target)
        elif isinstance(e, D.Op):
            args = [self.emit(a, vmap, scope, hoist, key_vars, role) for a in e.args]
            text = self._op(e, args)
            if e.fn in _COMPARE and any(a.dtype == ir.FLOAT for a in e.args) and not (D.free_vars(e) & set(vmap)):
                text = f"({text} != 0)"   # a per-program float test: Triton's interpreter cannot & / | it with a tile
            if len(text) < 48 and e.fn not in ("where",):
                return text
            name = self.fresh(role)
            target.add(f"{name} = {text}")
        elif isinstance(e, D.Reduce):
            name = self._row_reduce(e, vmap, target, role)
        else:
            raise UnsupportedError(f"cannot emit {type(e).__name__} inside a tile: {D.show_clipped(e, 100)}")
        target.cache[key] = name
        return name

    def _float(self, a: str, e) -> str:
        if e.dtype == ir.FLOAT:
            return a
        if constant_value(e) is not None:
            return repr(float(constant_value(e)))
        if a.lstrip("-").isdigit():   # an integer literal the emitter folded to (x ^ 0 is 1): no .to on it
            return repr(float(int(a)))
        return f"({a}).to({self.acc})"

    def _op(self, e: D.Op, a: list) -> str:
        fn = e.fn
        if e.dtype == ir.INT and fn in ("add", "sub", "mul", "neg", "floordiv", "mod", "pow"):
            # integer data in arithmetic is 64-bit, as the reference computes it (int32 ids + 3 would wrap)
            a = [f"({c}).to(tl.int64)" if isinstance(x, D.Read) else c for c, x in zip(a, e.args)]
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
        if fn == "where":   # two literals would make a float32 tile (a float64 kernel's 0.7 rounded): typed ones
            if e.dtype == ir.FLOAT and all(isinstance(x, D.Const) for x in e.args[1:]):
                a = [a[0]] + [f"tl.full([], {x}, {self.acc})" for x in a[1:]]
            return f"tl.where({a[0]}, {a[1]}, {a[2]})"
        if fn in ("min", "max"):
            x, y = a
            if e.dtype == ir.FLOAT:
                x, y = self._float(x, e.args[0]), self._float(y, e.args[1])
            return f"tl.{'minimum' if fn == 'min' else 'maximum'}({x}, {y})"
        if fn == "pow":
            return self._pow(e, a)
        wide = "64" if self.acc == "tl.float64" else ""   # float64 kernels: helpers exact near 0 (codegen/tidy.py)
        one = {"exp": "tl.exp", "log": "tl.log", "sqrt": "tl.sqrt", "rsqrt": "tl.rsqrt", "sin": "tl.sin",
               "cos": "tl.cos", "erf": "tl.erf", "sigmoid": "tl.sigmoid", "tanh": f"_tanh{wide}", "elu": f"_elu{wide}"}
        if fn in one:
            return _folded(fn, e.args[0]) or f"{one[fn]}({self._float(a[0], e.args[0])})"
        if fn == "abs":
            return f"tl.abs({a[0]})"
        if fn == "relu":
            return f"tl.maximum({a[0]}, 0)" if e.dtype != ir.FLOAT else f"tl.maximum({a[0]}, 0.0)"
        if fn == "sign":
            s = f"_sign({a[0]})"
            return f"({s}).to({self.acc})" if e.dtype == ir.FLOAT else s
        raise UnsupportedError(f"no Triton form for scalar function '{fn}'")

    def _pow(self, e, a):
        return pow_code(self, e, a)

    def _load(self, r: D.Read, vmap, scope: Scope, name: str | None = None, cast: bool = True) -> str:
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
        for v, x in self._unbounded_lanes(r, node, vmap):   # padding lanes of a head dim read real data: zero them
            masks.append(f"({self.idx(v, vmap)} < {self.idx(x, {})})")
            conds.append(sp.Lt(v, x, evaluate=False))
        other = "0.0" if node.dtype == ir.FLOAT else "0"
        m = joined_mask(masks, scalar_masks) or "True"
        bound = f", mask={m}, other={other}" if masks or scalar_masks else ""  # inside on every axis: no mask
        raw = f"tl.load({' + '.join(parts)}{bound})"
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
        name = name or self.fresh(f"{r.name}_{_load_role(r, vmap)}")
        scope.cache[("load", load)] = name
        used = set().union(*(sp.sympify(ix).free_symbols for ix in r.index)) if r.index else set()
        self.loads.append(AccessSite(name, r.name, tuple(sp.sympify(ix) for ix in r.index),
                                     tuple((v, _axis_of(code)) for v, code in vmap.items() if v in used),
                                     tuple(conds)))
        scope.add(f"{name} = {load}")
        return name

    def _unbounded_lanes(self, r: D.Read, node, vmap) -> list:
        """(lane variable, its head-dim extent) of each head-dim lane the read's bound masks do not stop at that
        extent: a lane past it (the tile is padded to a power of two) must load 0, or a dot over the head dim adds
        it in. A lane read as the whole index of an axis of that very extent is bounded by the axis's own mask;
        one read through a slice (take(t, Q[i])) or an offset (heads packed into the last axis) is not."""
        extents = {name: x for x, name in self.head_dims.items()}
        out = []
        for v, code in vmap.items():
            x = extents.get(_axis_of(code))
            if x is None or not any(sp.sympify(ix).has(v) for ix in r.index):
                continue
            if any(sp.sympify(ix) == v and sy.prove_equal(ext, x) for ix, ext in zip(r.index, node.shape)):
                continue
            if self._exact_lane(v, x, vmap):   # the padded tile is the extent itself: no lane past it
                continue
            out.append((v, x))
        return out

    def _exact_lane(self, ix, ext, vmap) -> bool:
        """ix is a lane of a head-dim arange (offs_head_dim..., offs_v) whose padded tile equals ext at this launch."""
        if ix not in vmap or sp.sympify(ext) not in self.exact:
            return False
        axis = _axis_of(vmap[ix])
        if axis == "col":
            return sp.sympify(ext) == sp.sympify(self.s.col[1])
        return any(name == axis and sp.sympify(x) == sp.sympify(ext) for x, name in self.head_dims.items())

    def _in_range(self, ix, ext, vmap) -> tuple[bool, bool]:
        """(0 <= ix provably, ix < ext provably) over the ranges of the leading indices. Tile variables
        (rows, keys, head dims) are padded to powers of two, so an index using them is never provably below
        its extent, unless the tile is known to lie inside (`inside`: the key tiles of a full-tile loop)."""
        if ix in self.inside and sp.sympify(ext) == self.inside[ix] or self._exact_lane(ix, ext, vmap):
            return True, True
        if set(vmap) & ix.free_symbols:
            return bool(ix.is_nonnegative), False
        box = iv.Box({v: (sp.Integer(0), x - 1) for v, x in self.s.lead})
        rng = iv.interval(ix, box)
        if rng is None:
            return bool(ix.is_nonnegative), False
        lo, hi = rng
        return sy.prove_nonneg(lo) is True, sy.prove_nonneg(sp.sympify(ext) - 1 - hi) is True

    def _row_reduce(self, e: D.Reduce, vmap, scope: Scope, role: str) -> str:
        """A reduction over a small axis held in one tile (e.g. q . wg over the head dim): per row, or per key where
        it reads only the tile's columns (a norm of k in a score: the keys down a tile's rows, then back)."""
        offs = self.head_offsets(e.extent, scope)
        used = [v for v in D.free_vars(e) if "[" in vmap.get(v, "")]   # its tile axes (not per-program values)
        keys = bool(used) and all(vmap[v].endswith("[None, :]") for v in used)
        turned = {v: vmap[v][:-len("[None, :]")] + "[:, None]" for v in used} if keys else {}
        inner = {**vmap, **turned, e.var: f"{offs}[None, :]"}
        body = self.emit(e.body, inner, scope, role=role)
        valid = f"({offs}[None, :] < {self.idx(e.extent, {})})"
        neutral = {"sum": "0.0", "max": 'float("-inf")', "min": 'float("inf")'}[e.op]
        red = {"sum": "tl.sum", "max": "tl.max", "min": "tl.min"}[e.op]
        name = self.fresh(f"{role}_{e.op}")
        scope.add(f"{name} = {red}(tl.where({valid}, {body}, {neutral}), 1)[{'None, :' if keys else ':, None'}]")
        return name

    def factor(self, e, vmap, scope: Scope, name: str, valid: str) -> str:
        """A dot operand tile: a plain read stays in the input dtype (through a TMA descriptor where `tma` and the
        read is a key tile); anything computed is zeroed on padding lanes (f(0) need not be 0) and cast to the
        input dtype for the tensor cores."""
        if isinstance(e, D.Read) and set(vmap) <= set(D.free_vars(e)):
            return (self.tma and self._desc_load(e, vmap, scope, name)) or \
                self._load(e, vmap, scope, name=name, cast=False)
        # computed, or a read constant along one tile axis (K[j, 0]): broadcast to the whole tile by the where
        self.taken.add(name)   # before its parts: a temporary named `name` would be overwritten (and reused)
        x = self.emit(e, vmap, scope, role=f"{name}_part")
        scope.add(f"{name} = tl.where({valid}, {x}, 0.0).to({self.in_dt})")
        return name

    def _desc_load(self, r: D.Read, vmap, scope: Scope, name: str) -> str | None:
        """A key tile X[lead..., j, c] (rows start_n + arange(BLOCK_N), all of a head dim or of the value axis in
        one tile, the other indices fixed per program) read through a tensor descriptor over the call's tensor
        (batch axes first): the copy engine zero-fills rows and lanes out of bounds, as the masked load does.
        None where the read is not of that form."""
        node = self.p.input_map[r.name]
        index = [sp.sympify(ix) for ix in r.index]
        if node.dtype != ir.FLOAT or len(index) < 2 or self.nbatch + len(index) > 5:
            return None
        row, lane = index[-2], index[-1]
        base = vmap.get(lane, "").split("[")[0]
        hd = "HEAD_DIM_V" if base == "offs_v" else base[len("offs_"):].upper() if base.startswith("offs_head") \
            else None
        start = _KEY_STARTS.get(vmap.get(row))   # the current key tile, or the next one (a look-ahead load)
        if start is None or hd is None or any(ix.free_symbols & set(vmap) for ix in index[:-2]) or \
                self._unbounded_lanes(r, node, vmap):
            return None
        self.use_input(r.name)
        key = (r.name, hd)
        if key not in self.descriptors:
            arg = f"desc_{r.name}" if not any(k[0] == r.name for k in self.descriptors) else \
                f"desc_{r.name}_{hd.lower()}"
            self.descriptors[key] = TensorDesc(arg, r.name, (1,) * (self.nbatch + len(index) - 2) + ("BLOCK_N", hd))
        desc = self.descriptors[key]
        coords = [f"off_z{z}" for z in range(self.nbatch)] + [self.idx(ix, vmap) for ix in index[:-2]] + \
            [start, "0"]
        load = f"{desc.arg}.load([{', '.join(coords)}])"
        if len(desc.block) > 2:
            load += f".reshape(BLOCK_N, {hd})"
        self.taken.add(name)
        scope.add(f"{name} = {load}  # TMA: out-of-bounds rows and lanes are zero")
        return name

    def dot_kw(self) -> str:
        """tl.dot's precision argument: fp32 inputs stay exact (ieee), the others use the tensor cores."""
        return ', input_precision="ieee"' if self.dtype == "float32" else ""

    def weights_dot(self, w: str, v: str) -> str:
        """tl.dot of unbounded weights ((q . k)^p, not in [0, 1] like softmax's p) with a value tile. bf16 has
        fp32's exponent range: the weights are cast to it (tensor cores, as p is for softmax). fp16 would
        overflow past 65504: the dot runs in tf32 (tensor cores, fp32 range). fp32 and fp64 stay exact."""
        if self.dtype == "bfloat16":
            return f"tl.dot({w}.to(tl.bfloat16), {v})"
        if self.dtype == "float16":
            return f'tl.dot({w}, {v}.to(tl.float32), input_precision="tf32")'
        return f"tl.dot({w}, {v}.to({self.acc}){self.dot_kw()})"


# a function of a constant, folded in float64 (tl.log(2.0) is a float32 log: ln 2 to 4e-9 in a float64 gradient)
_FOLD = {"exp": math.exp, "log": math.log, "sqrt": math.sqrt, "rsqrt": lambda v: 1 / math.sqrt(v), "sin": math.sin,
         "cos": math.cos, "erf": math.erf, "tanh": math.tanh, "sigmoid": lambda v: 1 / (1 + math.exp(-v))}


def _folded(fn: str, arg) -> str | None:
    """The float literal of fn(arg) for a numeric constant arg (None when not one, or outside fn's domain)."""
    v = constant_value(arg)
    if fn not in _FOLD or v is None or isinstance(v, bool):
        return None
    try:
        out = _FOLD[fn](float(v))
    except (ValueError, OverflowError, ZeroDivisionError):
        return None
    return repr(out) if math.isfinite(out) else None
