"""Fused backward kernels of the softmax family, FlashAttention-2 style, emitted from an output's ONF schedule.

For O[i, c] = sum_j P_ij V[j, c], P_ij = where(mask_ij, exp(s_ij - lse_i), 0), s_ij = f(qk_ij, i, j, ...) with
qk_ij = sum_k Q[i, k] K[j, k], the gradient DNF (moa/grad.py, grad-softmax-sum then grad-ewise) is

    dV[j, c] = sum_i P_ij dO[i, c]
    dS_ij    = P_ij (dP_ij - delta_i) f'(qk_ij),   dP_ij = sum_c dO[i, c] V[j, c],   delta_i = sum_c dO[i, c] O[i, c]
    dQ[i, k] = sum_j dS_ij K[j, k]                  dK[j, k] = sum_i dS_ij Q[i, k]

f' is the sympy partial of the score by its contraction tile (moa/grad_sym.py, the grad-ewise rule), emitted by the
shared expression emitter (codegen/exprs.py) like the score itself. Two kernels, as FlashAttention-2:
`_attn_bwd_dkdv`, one program per key tile, recomputes P per query tile from Q, K and the saved lse and accumulates
dK and dV; `_attn_bwd_dq`, one program per query tile, loops over the key tiles the forward visits (the schedule's
key bounds and skip test) and accumulates dQ. The dK/dV kernel visits every query tile and skips the tiles the
schedule's skip test proves empty. Gradients are written per leading index (head) and program batch; the runtime
sums them into inputs read by several heads (GQA, MQA). delta is computed by the runtime (one rowsum).

A normalised branch (O = sum_j w_ij V[j] / Z_i, w_ij = f(qk_ij, ...), power and linear attention) runs the same
kernels with P_ij = w_ij / Z_i and the adjoint of the weight (dP_ij - delta_i) / Z_i in place of P_ij (dP_ij -
delta_i); the forward saves Z in place of lse. A plain sum (O = sum_j w_ij V[j], sigmoid attention, retention) has
P_ij = w_ij and the weight's adjoint dP_ij: no saved total, no delta. A dot operand computed elementwise from one
read (linear attention's elu(Q) + 1) gets its gradient times the operand's sympy partial; an operand or value
computed otherwise (RoPE, a norm: `BackwardSpec.pulled`) is computed on its tile as the forward does and its buffer
holds the gradient of the tile itself, which the runtime pulls back to the inputs (moa/pullback.py). Float inputs
the score reads (a bias table, the gate G of gated power attention) get theirs by atomic adds at the read's index,
in the dQ kernel (each pair once).

Programs outside this shape (several branches, a gate epilogue, window mixing) have no fused backward:
`unfused_reason` says why, and the runtime evaluates the gradient DNF instead.
"""
from __future__ import annotations

from dataclasses import dataclass

import sympy as sp

from moa import dnf as D
from moa import intervals as iv
from moa.grad_sym import Translation
from moa.onf import DotTile, Schedule, uses_summaries
from moa.program import Program
from moa.pullback import score_reductions

from .backward_bounds import query_loop
from .backward_shape import roles, score_reads
from .data_tiles import program_values, summary_arg, summary_offsets, widen
from .exprs import AccessSite, Emitter, joined_mask
from .printer import code as pcode
from .scope import Scope
from .tidy import helpers_for, prune

ROLES = ("Q", "K", "V")   # the operand roles: dot.a, dot.b, value


@dataclass(frozen=True)
class BackwardKernel:
    """One generated backward kernel: its function name, the inputs it reads (signature order), and its access
    sites (codegen/exprs.py AccessSite: the cost model's loads and stores)."""
    name: str
    inputs: tuple
    loads: tuple = ()
    stores: tuple = ()
    atomics: tuple = ()   # AccessSite "atomic{k}" of the k-th tl.atomic_add (codegen/ledger.py)


@dataclass(frozen=True)
class BackwardSpec:
    """The two backward kernels of one output (one source), and what the runtime needs to launch them."""
    source: str
    kernels: tuple         # (dkdv, dq) BackwardKernel
    dims: tuple            # dim names in signature order
    nbatch: int
    head_dims: tuple       # ((constexpr name, extent expr), ...) padded to powers of two at launch
    reads: dict            # role -> the Read of Q (dot.a), K (dot.b), V (value); None: pulled back
    key_extent: sp.Expr
    row_extent: sp.Expr
    dot_extent: sp.Expr
    col_extent: sp.Expr
    kind: str = "softmax"  # the branch's monoid: softmax (saved lse) or norm (saved Z)
    scatters: tuple = ()   # the inputs the score reads whose gradients the dQ kernel adds atomically (grad_X)
    summaries: tuple = ()  # TileSummaries (codegen/data_tiles.py) both kernels read, after the inputs
    pulled: tuple = ()     # the roles whose buffer holds the gradient of the operand expression (moa/pullback.py)
    reductions: tuple = () # (buffer, side) of the score's norms: grad_row{k} [zl, n] (dQ), grad_key{k} [zl, m] (dK/dV)


class _BackwardEmitter:
    """The two kernels of one schedule (a new Emitter per kernel: names and common sub-expressions are per kernel)."""

    OWN = ("zz", "pid_z", "offs_v", "offs_m", "offs_n", "q", "k", "v", "do", "lse", "z", "zinv", "delta", "qk",
           "valid", "p", "dp", "dsc", "ds", "dq", "dk", "dv", "lo", "hi", "row_lo", "row_hi", "col_lo", "col_hi",
           "start_m", "start_n", "m_first", "m_stop")

    def __init__(self, program: Program, sched: Schedule, dtype: str, nbatch: int):
        self.p, self.s, self.dtype, self.nbatch = program, sched, dtype, nbatch
        self.b = b = sched.branches[0]
        self.head_dims: dict = {}
        self.reads = roles(program, sched)[0]   # role -> its read, or None: the role is pulled back
        self.qread, self.kread = self.reads["Q"], self.reads["K"]
        self.pulled = tuple(r for r, read in self.reads.items() if read is None)
        self.scatters = score_reads(b.score, pieces=True)
        # the score's reductions of one side (a query or key norm): leaf -> (side, its gradient buffer)
        self.reductions = {leaf: (side, f"grad_{side}{k}")
                           for k, (leaf, side) in enumerate(score_reductions(sched)[0])}
        self.accs = {buf: f"d{side}{k}" for k, (side, buf) in enumerate(self.reductions.values())}  # accumulators
        self.scatter_names = tuple(dict.fromkeys(r.name for r in self.scatters))
        self.data = uses_summaries(sched, b)   # the forward skips tiles by the data too: so do these kernels
        self.skip, self.full = b.tile_tests(self.data)
        self.summaries = {}
        for sm in b.summaries if self.data else ():
            if sm.axis != "program":   # a per-program value is loaded by the kernels themselves (program_values)
                summary_arg(self.summaries, sm, set(program.input_map), sched.row[1], b.extent)

    def _emitter(self) -> Emitter:
        x = Emitter(self.p, self.s, self.dtype)
        x.head_dims = self.head_dims    # shared: HEAD_DIM means the same extent in both kernels
        x.taken |= set(self.OWN)        # the emitter's temporaries never take the kernels' own names
        x.taken |= set(self.accs.values())
        return x

    def _prologue(self, body: Scope, x: Emitter, tile: str) -> None:
        """Program ids: the tile (`start_m` or `start_n`), the flat batch x lead index zz, the lead indices."""
        body.add(f"{tile} = tl.program_id(0) * {'BLOCK_M' if tile == 'start_m' else 'BLOCK_N'}")
        body.add("zz = tl.program_id(1).to(tl.int64)  # batch x leading index, flat (the runtime's buffers)")
        body.add("pid_z = tl.program_id(1)")
        for v, ext in reversed(self.s.lead):
            body.add(f"idx_{v.name} = pid_z % {x.idx(ext, {})}")
            body.add(f"pid_z = pid_z // {x.idx(ext, {})}")
        body.add("for_batch_offsets")
        body.add("offs_v = tl.arange(0, HEAD_DIM_V)")
        for e in (self.b.dot.a, self.b.dot.b, self.b.value, self.b.score):   # a norm's lanes, before any loop
            for r in D.nodes(e):
                if isinstance(r, D.Reduce):
                    x.head_offsets(r.extent, body)

    def _rows(self, scope: Scope, x: Emitter, q_offs: str) -> str:
        """Loads of one query tile's q, dO, the saved total (lse or Z) and delta (rows offs_m); returns q."""
        s, b = self.s, self.b
        n = x.idx(s.row[1], {})
        q = x.factor(b.dot.a, {s.row[0]: "offs_m[:, None]", b.dot.var: f"{q_offs}[None, :]"}, scope, "q",
                     f"(offs_m[:, None] < {n}) & ({q_offs}[None, :] < {x.idx(b.dot.extent, {})})")
        e = x.idx(s.col[1], {})
        scope.add(f"do = tl.load(dO_ptr + zz * stride_dO_z + offs_m[:, None] * stride_dO_0 + offs_v[None, :] * "
                  f"stride_dO_1, mask=(offs_m[:, None] < {n}) & (offs_v[None, :] < {e}), other=0.0)")
        i, c = s.row[0], s.col[0]
        rows, cols = (sp.Lt(i, s.row[1], evaluate=False),), (sp.Lt(c, s.col[1], evaluate=False),)
        x.loads.append(AccessSite("do", "dO", (i, c), ((i, "row"), (c, "col")), rows + cols))
        if b.kind == "sum":   # no normaliser: the weight's adjoint is dp itself (no total, no delta)
            return q
        total = f"tl.load(lse_ptr + zz * stride_lse_z + offs_m, mask=offs_m < {n}, other=0.0)"
        if b.kind == "softmax":
            scope.add(f"lse = {total}")
            scope.add('lse = tl.where(lse == float("-inf"), 0.0, lse)  # rows without a key: every p is masked')
        else:
            scope.add(f"z = {total}  # the normaliser Z (0: the row's output is the constant 0)")
            scope.add("zinv = tl.where(z == 0, 0.0, 1.0 / tl.where(z == 0, 1.0, z))")
        scope.add(f"delta = tl.load(delta_ptr + zz * stride_delta_z + offs_m, mask=offs_m < {n}, other=0.0)")
        x.loads += [AccessSite("lse" if b.kind == "softmax" else "z", "lse", (i,), ((i, "row"),), rows),
                    AccessSite("delta", "delta", (i,), ((i, "row"),), rows)]
        return q

    def _keys(self, scope: Scope, x: Emitter, k_offs: str) -> tuple:
        """Loads of one key tile's k and v (keys offs_n)."""
        s, b = self.s, self.b
        m = x.idx(b.extent, {})
        k = x.factor(b.dot.b, {b.var: "offs_n[:, None]", b.dot.var: f"{k_offs}[None, :]"}, scope, "k",
                     f"(offs_n[:, None] < {m}) & ({k_offs}[None, :] < {x.idx(b.dot.extent, {})})")
        v = x.factor(b.value, {b.var: "offs_n[:, None]", s.col[0]: "offs_v[None, :]"}, scope, "v",
                     f"(offs_n[:, None] < {m}) & (offs_v[None, :] < {x.idx(s.col[1], {})})")
        return k, v

    def _pair(self, scope: Scope, x: Emitter, q: str, k: str, v: str, scatter: bool, accumulate) -> None:
        """One (query tile, key tile) pair: qk, the score and dp; then, on a tile the schedule proves full and inside
        the bounds, the unmasked update, else the masked one (the forward's full/partial split): p (softmax:
        exp(s - lse); norm: w / Z), dsc, the adjoint of the score (softmax: p (dp - delta); norm: (dp - delta) / Z),
        ds = dsc f'(qk), with `scatter` the atomic adds of the score's other reads' adjoints, and accumulate(scope)
        (the dot products into dK, dV or dQ)."""
        s, b = self.s, self.b
        smap = {s.row[0]: "offs_m[:, None]", b.var: "offs_n[None, :]"}
        scope.add(f"qk = tl.dot({q}, tl.trans({k}){x.dot_kw()})")
        score = x._float(x.emit(b.score, smap, scope, role="score"), b.score)
        scope.add(f"dp = tl.dot(do, tl.trans({v}).to(do.dtype){x.dot_kw()})")
        full = self.full
        n, m = x.idx(s.row[1], {}), x.idx(b.extent, {})
        test = f"{self._code(sp.Not(full), x, self.names)} | (start_m + BLOCK_M > {n}) | (start_n + BLOCK_N > {m})"
        for masked in ([True] if full is sp.false else [False, True]):   # each block opened after the last one
            inner = scope if full is sp.false else \
                scope.open(f"if ({test}) != 0:  # a partial tile: masked", ("partial", 0)) if masked else \
                scope.open(f"if ({test}) == 0:  # a full tile: no mask code", ("full", 0))
            guard = (lambda e: f"tl.where(valid, {e}, 0.0)") if masked else (lambda e: e)
            if masked:
                valid = f"(offs_m[:, None] < {n}) & (offs_n[None, :] < {m})"
                if b.mask is not None:
                    valid = f"{x.emit(b.mask, smap, inner, role='mask')} & {valid}"
                inner.add(f"valid = {valid}")
            if b.kind == "softmax":
                inner.add(f"p = {guard(f'tl.exp({score} - lse[:, None])')}")
                inner.add("dsc = p * (dp - delta[:, None])")
            elif b.kind == "norm":
                inner.add(f"p = {guard(f'{score} * zinv[:, None]')}")
                inner.add(f"dsc = {guard('(dp - delta[:, None]) * zinv[:, None]')}")
            else:
                inner.add(f"p = {guard(score)}")
                inner.add(f"dsc = {guard('dp')}")
            t = Translation(b.score, pieces=True)
            for sym, leaf in t.leaves.items():
                side = self.reductions.get(leaf, ("",))[0]
                if leaf == DotTile(0) or scatter and leaf in self.scatters or side == ("row" if scatter else "key"):
                    d = t.to_dnf(t.partial(sym))
                    adj = guard(f"dsc * {x._float(x.emit(d, smap, inner, role='dscore'), d)}")
                    if leaf == DotTile(0):
                        inner.add(f"ds = {adj}")
                    elif side:   # d score / d (a norm of the row or key), summed over the tile's other side
                        acc = self.accs[self.reductions[leaf][1]]
                        inner.add(f"{acc} += tl.sum({adj}, {1 if side == 'row' else 0})")
                    else:
                        self._atomic(inner, x, leaf, adj)
            accumulate(inner)

    def _atomic(self, scope: Scope, x: Emitter, r, adj: str) -> None:
        """grad_X[index of the read r] += its adjoint over the tile (summed over a tile axis the index does not use)."""
        s, b = self.s, self.b
        i, j = s.row[0], b.var
        used = set().union(*(sp.sympify(ix).free_symbols for ix in r.index))
        vmap, masks, scalar_masks, conds = {}, [], [], []
        if i in used and j in used:
            vmap = {i: "offs_m[:, None]", j: "offs_n[None, :]"}
        elif i in used:
            adj, vmap = f"tl.sum({adj}, 1)", {i: "offs_m"}
        elif j in used:
            adj, vmap = f"tl.sum({adj}, 0)", {j: "offs_n"}
        else:
            adj = f"tl.sum(tl.sum({adj}, 1), 0)"
        node = self.p.input_map[r.name]
        g = f"grad_{r.name}"
        parts = [f"{g}_ptr + off_{g}"]
        for k, (ix, ext) in enumerate(zip(r.index, node.shape)):
            ix = sp.sympify(ix)
            c = x.idx(ix, vmap)
            parts.append(f"{c} * stride_{g}_{k}")
            lo_ok, hi_ok = x._in_range(ix, ext, vmap)
            sink = masks if set(vmap) & ix.free_symbols else scalar_masks   # a head index's test is a scalar
            for ok, code, rel in ((hi_ok, f"({c} < {x.idx(ext, {})})", sp.Lt(ix, ext, evaluate=False)),
                                  (lo_ok, f"({c} >= 0)", sp.Ge(ix, 0, evaluate=False))):
                if not ok:
                    sink.append(code)
                    conds.append(rel)
        m = joined_mask(masks, scalar_masks)
        m = f", mask={m}" if m else ""
        scope.add(f"tl.atomic_add({' + '.join(parts)}, {adj}{m})")
        x.atomics.append(AccessSite(f"atomic{len(x.atomics)}", g, tuple(sp.sympify(ix) for ix in r.index),
                                    tuple((v, a) for v, a in ((i, "row"), (j, "key")) if v in vmap), tuple(conds)))

    def _summary_loads(self, axis: str, scope: Scope, x: Emitter, names: dict, pair: bool = False) -> None:
        """The (min, max) of every summarised read of the mask over this row tile ("row") or key tile ("key"), and
        with `pair` (in the inner loop, where both tiles are known) over the (row tile, key tile) pair, into the
        variables the data's skip test names (`names`: summary symbol -> variable)."""
        if axis == "program":
            program_values(self.b.summaries if self.data else (), x, scope, names)
            return
        for sm in self.b.summaries if self.data else ():
            if sm.axis != axis and not (pair and sm.axis == "pair"):
                continue
            ts = summary_arg(self.summaries, sm, set(), self.s.row[1], self.b.extent)
            base = summary_offsets(ts, sm, "(start_m // BLOCK_M)", "(start_n // BLOCK_N)", lambda ix: x.idx(ix, {}))
            for sym, stat, extra in ((sm.lo, "min", ""), (sm.hi, "max", f" + stride_{ts.arg}_s")):
                names[sym] = x.fresh(f"{sm.read.name}_{sm.axis}_{stat}")
                x.loads.append(AccessSite(names[sym], ts.arg, (), (), ()))
                scope.add(f"{names[sym]} = tl.load({base}{extra}){widen(sm)}  # {stat} of {sm.read.name} over the "
                          f"{'tile pair' if sm.axis == 'pair' else sm.axis + ' tile'}")

    def _ds_dot(self, ds: str, operand: str, x: Emitter) -> str:
        """ds times an operand tile: in the operand's dtype for softmax (ds is bounded by p); for a normalised
        branch ds is unbounded ((q . k)^p), so it takes the forward's weights dot (fp16: tf32, fp32 range)."""
        if self.b.kind == "softmax":
            return f"tl.dot({ds}.to({operand}.dtype), {operand}{x.dot_kw()})"
        return x.weights_dot(ds, operand)

    def _chain(self, scope: Scope, x: Emitter, acc: str, operand, read, vmap: dict) -> None:
        """acc *= d operand / d read, for a dot operand computed from its read (elu(Q) + 1); an operand pulled back
        (read None) keeps its own gradient."""
        if read is None or operand is read:
            return
        t = Translation(operand)
        sym = next(sy for sy, leaf in t.leaves.items() if leaf == read)
        d = t.to_dnf(t.partial(sym))
        scope.add(f"{acc} = {acc} * {x._float(x.emit(d, vmap, scope, role='dfeat'), d)}")

    def dkdv(self) -> tuple:
        """`_attn_bwd_dkdv`: one program per key tile; dK and dV accumulated over the query tiles."""
        s, b = self.s, self.b
        x = self._emitter()
        body = Scope([], "    ")
        self._prologue(body, x, "start_n")
        offs = x.head_offsets(b.dot.extent, body)
        m = x.idx(b.extent, {})
        body.add("offs_n = start_n + tl.arange(0, BLOCK_N)")
        body.add("col_lo = start_n  # J_LO")
        body.add(f"col_hi = tl.minimum(start_n + BLOCK_N, {m}) - 1  # J_HI")
        k, v = self._keys(body, x, offs)
        names = self.names = {}
        self._summary_loads("program", body, x, names)
        self._summary_loads("key", body, x, names)
        body.add(f"dk = tl.zeros([BLOCK_N, {x.head_dim(b.dot.extent)}], dtype={x.acc})")
        body.add(f"dv = tl.zeros([BLOCK_N, HEAD_DIM_V], dtype={x.acc})")
        self._open_reductions("key", body, x, {b.var: "offs_n[None, :]"}, "BLOCK_N")
        first, stop = query_loop(b.skip, lambda e: self._code(e, x), x.idx(s.row[1], {}))   # the tiles it can need
        body.add(f"m_first = {first}  # the first query tile that can see this key tile")
        body.add(f"m_stop = {stop}  # past the last one")
        loop = body.open("for start_m in range(m_first, m_stop, BLOCK_M):")
        loop.add("offs_m = start_m + tl.arange(0, BLOCK_M)")
        loop.add("row_lo = start_m  # I_LO")
        loop.add(f"row_hi = tl.minimum(start_m + BLOCK_M, {x.idx(s.row[1], {})}) - 1  # I_HI")
        self._summary_loads("row", loop, x, names, pair=True)
        inner = loop.open(f"if {self._code(self.skip, x, names)} == 0:") if self.skip is not sp.false else loop
        q = self._rows(inner, x, offs)
        def acc_kv(sc: Scope) -> None:
            sc.add(f"dv += tl.dot(tl.trans(p).to(do.dtype), do{x.dot_kw()})")
            sc.add(f"dk += {self._ds_dot('tl.trans(ds)', q, x)}")

        self._pair(inner, x, q, k, v, False, acc_kv)
        self._chain(body, x, "dk", b.dot.b, self.kread, {b.var: "offs_n[:, None]", b.dot.var: f"{offs}[None, :]"})
        d = x.idx(b.dot.extent, {})
        body.add(f"tl.store(dK_ptr + zz * stride_dK_z + offs_n[:, None] * stride_dK_0 + {offs}[None, :] * "
                 f"stride_dK_1, dk, mask=(offs_n[:, None] < {m}) & ({offs}[None, :] < {d}))")
        body.add(f"tl.store(dV_ptr + zz * stride_dV_z + offs_n[:, None] * stride_dV_0 + offs_v[None, :] * "
                 f"stride_dV_1, dv, mask=(offs_n[:, None] < {m}) & (offs_v[None, :] < {x.idx(s.col[1], {})}))")
        j, kv, c = b.var, b.dot.var, s.col[0]
        keys = sp.Lt(j, b.extent, evaluate=False)
        stores = (AccessSite("dK", "dK", (j, kv), ((j, "key"), (kv, x.head_dim(b.dot.extent))),
                             (keys, sp.Lt(kv, b.dot.extent, evaluate=False))),
                  AccessSite("dV", "dV", (j, c), ((j, "key"), (c, "col")), (keys, sp.Lt(c, s.col[1], evaluate=False))))
        stores += self._store_reductions("key", body, "offs_n", m, j, b.extent)
        return self._function("_attn_bwd_dkdv", body, x, ("dK", "dV"), (), stores, self._side("key"))

    def dq(self) -> tuple:
        """`_attn_bwd_dq`: one program per query tile; dQ accumulated over the key tiles the forward visits, and the
        score's other reads' gradients added atomically."""
        s, b = self.s, self.b
        x = self._emitter()
        body = Scope([], "    ")
        self._prologue(body, x, "start_m")
        offs = x.head_offsets(b.dot.extent, body)
        n, m = x.idx(s.row[1], {}), x.idx(b.extent, {})
        body.add("offs_m = start_m + tl.arange(0, BLOCK_M)")
        body.add("row_lo = start_m  # I_LO")
        body.add(f"row_hi = tl.minimum(start_m + BLOCK_M, {n}) - 1  # I_HI")
        q = self._rows(body, x, offs)
        names = self.names = {}
        self._summary_loads("program", body, x, names)
        self._summary_loads("row", body, x, names)
        body.add(f"dq = tl.zeros([BLOCK_M, {x.head_dim(b.dot.extent)}], dtype={x.acc})")
        self._open_reductions("row", body, x, {s.row[0]: "offs_m[:, None]"}, "BLOCK_M")
        lo = "0" if b.key_lo is None else f"(tl.maximum(0, {self._code(b.key_lo, x)}) // BLOCK_N) * BLOCK_N"
        hi = f"{m} - 1" if b.key_hi is None else f"tl.minimum({m} - 1, {self._code(b.key_hi, x)})"
        body.add(f"lo = {lo}  # the forward's first key tile")
        body.add(f"hi = {hi}  # last admissible key")
        loop = body.open("for start_n in range(lo, hi + 1, BLOCK_N):")
        loop.add("offs_n = start_n + tl.arange(0, BLOCK_N)")
        loop.add("col_lo = start_n  # J_LO")
        loop.add(f"col_hi = tl.minimum(start_n + BLOCK_N, {m}) - 1  # J_HI")
        self._summary_loads("key", loop, x, names, pair=True)
        tested = self.skip is not sp.false and (self.data or not iv.skip_implied_by_range(b.skip, b.key_lo, b.key_hi))
        inner = loop.open(f"if {self._code(self.skip, x, names)} == 0:") if tested else loop
        k, v = self._keys(inner, x, offs)
        self._pair(inner, x, q, k, v, True, lambda sc: sc.add(f"dq += {self._ds_dot('ds', k, x)}"))
        self._chain(body, x, "dq", b.dot.a, self.qread, {s.row[0]: "offs_m[:, None]", b.dot.var: f"{offs}[None, :]"})
        body.add(f"tl.store(dQ_ptr + zz * stride_dQ_z + offs_m[:, None] * stride_dQ_0 + {offs}[None, :] * "
                 f"stride_dQ_1, dq, mask=(offs_m[:, None] < {n}) & ({offs}[None, :] < "
                 f"{x.idx(b.dot.extent, {})}))")
        i, kv = s.row[0], b.dot.var
        stores = (AccessSite("dQ", "dQ", (i, kv), ((i, "row"), (kv, x.head_dim(b.dot.extent))),
                             (sp.Lt(i, s.row[1], evaluate=False), sp.Lt(kv, b.dot.extent, evaluate=False))),)
        stores += self._store_reductions("row", body, "offs_m", n, i, s.row[1])
        return self._function("_attn_bwd_dq", body, x, ("dQ",), self.scatter_names, stores, self._side("row"))

    def _side(self, side: str) -> tuple:
        """The gradient buffers of the score's reductions of one side ("row": the dQ kernel's, "key": dK/dV's)."""
        return tuple(buf for sd, buf in self.reductions.values() if sd == side)

    def _open_reductions(self, side: str, body: Scope, x: Emitter, vmap: dict, block: str) -> None:
        """Before the loop: each reduction of this kernel's own side, and each one per program (a weight's norm),
        computed once (the score in the loop finds it in the cache); the accumulator of the own side's adjoints
        zeroed."""
        for leaf, (sd, buf) in self.reductions.items():
            if sd == side:
                x.emit(leaf, vmap, body, role="score")
                body.add(f"{self.accs[buf]} = tl.zeros([{block}], dtype={x.acc})")
            elif not set(D.free_vars(leaf)) & {self.s.row[0], self.b.var}:
                x.emit(leaf, vmap, body, role="score")

    def _store_reductions(self, side: str, body: Scope, offs: str, extent_code: str, var, extent) -> tuple:
        """After the loop: the adjoint of each reduction of this side stored per row (key); their AccessSites."""
        sites = []
        for buf in self._side(side):
            body.add(f"tl.store({buf}_ptr + zz * stride_{buf}_z + {offs} * stride_{buf}_0, {self.accs[buf]}, "
                     f"mask={offs} < {extent_code})")
            sites.append(AccessSite(buf, buf, (var,), ((var, side),), (sp.Lt(var, extent, evaluate=False),)))
        return tuple(sites)

    def _code(self, e, x: Emitter, summaries: dict | None = None) -> str:
        """An index formula over the tile box (row_lo, row_hi, col_lo, col_hi) and the tiles' data summaries."""
        names = {iv.I_LO: "row_lo", iv.I_HI: "row_hi", iv.J_LO: "col_lo", iv.J_HI: "col_hi",
                 iv.TILE_W: "BLOCK_N", **x.names, **(summaries or {})}
        return pcode(sp.sympify(e), names)

    def _function(self, name: str, body: Scope, x: Emitter, outs: tuple, scatters: tuple, stores: tuple,
                  vecs: tuple = ()) -> tuple:
        """(source of the @triton.jit function, BackwardKernel)."""
        args = []
        for inp in x.used_inputs:
            args.append(f"{inp}_ptr")
            args += [f"stride_{inp}_z{z}" for z in range(self.nbatch)]
            args += [f"stride_{inp}_{k}" for k in range(self.p.input_map[inp].rank)]
        for ts in self.summaries.values():
            args.append(f"{ts.arg}_ptr")
            args += [f"stride_{ts.arg}_z{z}" for z in range(self.nbatch)]
            args += [f"stride_{ts.arg}_{k}" for k in range(ts.rank)] + [f"stride_{ts.arg}_s"]
        for buf in ("dO", "lse", "delta"):
            args += [f"{buf}_ptr", f"stride_{buf}_z"] + ([f"stride_{buf}_0", f"stride_{buf}_1"] if buf == "dO" else [])
        for buf in outs:
            args += [f"{buf}_ptr", f"stride_{buf}_z", f"stride_{buf}_0", f"stride_{buf}_1"]
        for buf in vecs:   # per row (key) gradient buffers of the score's reductions
            args += [f"{buf}_ptr", f"stride_{buf}_z", f"stride_{buf}_0"]
        for inp in scatters:   # grad_X: batch + the input's shape, contiguous
            args.append(f"grad_{inp}_ptr")
            args += [f"stride_grad_{inp}_z{z}" for z in range(self.nbatch)]
            args += [f"stride_grad_{inp}_{k}" for k in range(self.p.input_map[inp].rank)]
        args += [f"dim_{d.name}" for d in self.p.dims]
        args += [f"Z{z}" for z in range(self.nbatch)]
        consts = ["BLOCK_M: tl.constexpr", "BLOCK_N: tl.constexpr"]
        consts += [f"{hd}: tl.constexpr" for hd in self.head_dims.values()] + ["HEAD_DIM_V: tl.constexpr"]
        lines = []
        for ln in body.lines:
            lines += self._batch_offsets(x, scatters) if ln.strip() == "for_batch_offsets" else [ln]
        sig = ",\n    ".join(args + consts)
        src = f"@triton.jit\ndef {name}(\n    {sig},\n):\n" + "\n".join(prune(lines)) + "\n"
        return src, BackwardKernel(name, tuple(x.used_inputs), tuple(x.loads), stores, tuple(x.atomics))

    def _batch_offsets(self, x: Emitter, scatters: tuple) -> list:
        """Offsets of the inputs (and gradient buffers) for this program's batch indices (decoded row-major from
        what is left of pid_z)."""
        dec = []
        for z in reversed(range(self.nbatch)):
            dec.append(f"    off_z{z} = pid_z % Z{z}" if z else f"    off_z{z} = pid_z")
            if z:
                dec.append(f"    pid_z = pid_z // Z{z}")
        for name in [*x.used_inputs, *(t.arg for t in self.summaries.values()), *(f"grad_{n}" for n in scatters)]:
            terms = [f"off_z{z}.to(tl.int64) * stride_{name}_z{z}" for z in range(self.nbatch)]
            dec.append(f"    off_{name} = {' + '.join(terms) if terms else '0'}")
        return dec


def generate_backward(program: Program, sched: Schedule, dtype: str, nbatch: int) -> BackwardSpec:
    """The fused backward kernels of an output whose schedule `unfused_reason` accepts, for a compute dtype and a
    number of batch axes (tile sizes are constexprs of the launch)."""
    em = _BackwardEmitter(program, sched, dtype, nbatch)
    src_kv, kv = em.dkdv()
    src_q, q = em.dq()
    code = src_kv + "\n\n" + src_q
    helpers = helpers_for(code)
    b = sched.branches[0]
    head = (f"# Generated by moa: do not edit. Fused backward (FlashAttention-2 style) of output {sched.output} of "
            f"{''.join(ch if 32 <= ord(ch) < 127 else '?' for ch in program.name)[:80]}, dtype {dtype}\n"
            f"# {b.kind} branch, score {''.join(ch if 32 <= ord(ch) < 127 else '?' for ch in D.show(b.score))[:150]}\n"
            "import triton\nimport triton.language as tl\n")
    source = head + (f"\n\n{helpers}\n" if helpers else "") + "\n\n" + code
    return BackwardSpec(source, (kv, q), tuple(d.name for d in program.dims), nbatch,
                        tuple((name, ext) for ext, name in em.head_dims.items()),
                        em.reads, b.extent, sched.row[1], b.dot.extent, sched.col[1], b.kind, em.scatter_names,
                        tuple(em.summaries.values()), em.pulled,
                        tuple((buf, side) for side, buf in em.reductions.values()))
