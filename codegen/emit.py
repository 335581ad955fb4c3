"""Emit a readable Triton kernel from an ONF Schedule, named like the Triton fused-attention tutorial: one program per
query tile (offs_m) and batch x leading index (pid_z); per branch the query tile q, a loop over key tiles (offs_n)
with the score tile qk, the online-softmax state m_i, l_i, acc (codegen/monoid.py) and the value tile v; an
epilogue that combines the branches and stores the output.

Expressions are emitted by codegen/exprs.py, hop loops by codegen/hops.py, and the assembled body goes through the
tidy pass (codegen/tidy.py: no dead assignment, only the helpers used). The lines that open a loop or a test carry
the cost model's regions, which the spec maps to line numbers (codegen/ledger.py reads them)."""
from __future__ import annotations

from dataclasses import dataclass, field

import sympy as sp

from moa import dnf as D
from moa import intervals as iv
from moa import symbolic as sy
from moa.onf import HOPS, RESIDUE, TILED, BranchValue, DotTile, Schedule, scans_keys, uses_summaries
from moa.program import Program

from .affine import emit_key_affine
from .scale import affine, free_of, positive
from .data_tiles import SCAN, SCAN_T, TILE_FULL, DataTiles, TileSummaries  # noqa: F401  (re-exported)
from .exprs import AccessSite, Emitter
from .hops import emit_hop_branch
from .monoid import LOG2E, Monoid
from .printer import code as pcode
from .printer import float_literal, int_literal, is_number
from .scope import Scope, regions_by_line
from .tidy import helpers_for, prune


@dataclass(frozen=True)
class KernelSpec:
    """What the launcher needs to call a generated kernel, and what the cost model reads of it."""
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
    regions: dict = field(default_factory=dict)   # line number -> the ledger region its block opens
    summaries: tuple = ()  # TileSummaries arguments, after the inputs in signature order
    descriptors: tuple = ()   # exprs.TensorDesc arguments (TMA), after the summaries


def returns_total(sched: Schedule) -> bool:
    """The kernel can store a per-row total with the output: the lse of a single softmax branch, the normaliser z
    of a single normalize branch, or 1 for a plain sum (STORE_LSE; ring attention and split-KV merge partials by
    it)."""
    return sched.has_lse or (len(sched.branches) == 1 and sched.branches[0].kind in ("norm", "sum")
                             and sched.branches[0].mix is None and sched.epilogue == BranchValue(0))


class KernelEmitter(DataTiles):
    """The tiled kernel (`_attn_fwd`) of one output's schedule, for a dtype and a number of batch axes."""

    def __init__(self, program: Program, sched: Schedule, dtype: str, nbatch: int, exact=frozenset(),
                 tma: bool = False, overlap: bool = False):
        self.p, self.s, self.dtype, self.nbatch = program, sched, dtype, nbatch
        self.overlap = overlap   # the full-tile loop computes the next tile's q . k^T ahead (_ahead)
        self.x = Emitter(program, sched, dtype)
        self.x.tma, self.x.nbatch = tma, nbatch
        # head dims equal to their padded tiles at this launch: loads along them need no bound
        self.x.exact = frozenset(sp.sympify(x) for x in exact)
        self.monoids = [Monoid(b.kind, self.x.sfx(k), self.x.acc) for k, b in enumerate(sched.branches)]
        self.summaries: dict = {}   # (input, axis, pos) -> TileSummaries
        self.summary_names: dict = {}   # summary symbol (min / max) -> the variable holding it
        self.store_lse = False   # set by kernel()

    def idx(self, e) -> str:
        return self.x.idx(e, {})

    # ---- the kernel -----------------------------------------------------------------------------------------
    def kernel(self, block_m: int, block_n: int, store_lse: bool) -> KernelSpec:
        s = self.s
        i, n_ext = s.row
        c, e_ext = s.col
        body = Scope([], "    ")
        rowmap = {i: "offs_m[:, None]", c: "offs_v[None, :]"}
        self.store_lse = store_lse
        self._programs(body)
        for k, b in enumerate(s.branches):
            self._branch(k, b, body)
        body.add("# epilogue")
        res = self.x.emit(s.epilogue, rowmap, body, role="out")
        body.add(f"out_mask = (offs_m[:, None] < {self.idx(n_ext)}) & (offs_v[None, :] < {self.idx(e_ext)})")
        o = s.output
        body.add(f"tl.store({o}_ptr + off_{o} + offs_m[:, None] * stride_{o}_0 + offs_v[None, :] * stride_{o}_1, "
                 f"{res}.to({o}_ptr.dtype.element_ty), mask=out_mask)")
        rows = (i, "row")
        stores = [AccessSite(o, o, (i, c), (rows, (c, "col")),
                             (sp.Lt(i, n_ext, evaluate=False), sp.Lt(c, e_ext, evaluate=False)))]
        if store_lse:
            lse = body.open("if STORE_LSE:", "lse")
            lse.add(f"lse = {self.monoids[0].total()}")
            lse.add(f"tl.store(lse_out + off_lse + offs_m, lse, mask=offs_m < {self.idx(n_ext)})")
            stores.append(AccessSite("lse", "lse", (i,), (rows,), (sp.Lt(i, n_ext, evaluate=False),)))
        return self._assemble(body.lines, block_m, block_n, store_lse, tuple(stores))

    def _programs(self, body: Scope) -> None:
        """Program ids, leading indices, batch offsets (placeholder), the rows of the tile and their box."""
        s = self.s
        body.add("pid = tl.program_id(0)" if s.kind == RESIDUE else "start_m = tl.program_id(0)")
        body.add("pid_z = tl.program_id(1)")
        for v, ext in reversed(s.lead):
            body.add(f"idx_{v.name} = pid_z % {self.idx(ext)}")
            body.add(f"pid_z = pid_z // {self.idx(ext)}")
        body.add("for_batch_offsets")  # replaced once the used inputs are known
        if s.kind == RESIDUE:
            self._residue_rows(body)
        else:
            body.add("offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)")
        body.add("offs_v = tl.arange(0, HEAD_DIM_V)")
        if s.kind == RESIDUE:
            st = int_literal(s.lift.stride)
            body.add("a_lo = start_m * BLOCK_M  # I_LO of a lifted branch: first a of this tile")
            body.add("a_hi = tl.minimum(a_lo + BLOCK_M, rows_res) - 1  # I_HI of a lifted branch: last valid a")
            body.add(f"row_lo = res + {st} * a_lo  # I_LO: first row of this tile")
            body.add(f"row_hi = res + {st} * a_hi  # I_HI: last valid row")
        else:
            body.add("row_lo = start_m * BLOCK_M  # I_LO: first row of this tile")
            body.add(f"row_hi = tl.minimum(row_lo + BLOCK_M, {self.idx(s.row[1])}) - 1  # I_HI: last valid row")

    def _residue_rows(self, body: Scope) -> None:
        """The rows of a program of the residue schedule: i = r + s a for one residue r and a tile of a."""
        rl = self.s.lift
        st = int_literal(rl.stride)   # 64-bit past 2^30: r + s a must not wrap
        n = self.idx(self.s.row[1])
        body.add(f"# residue lifting i = r + {rl.stride} a: program_id(0) -> (residue res, tile start_m of a); the "
                 "residues")
        body.add("# below rows_rem hold rows_q + 1 rows, the others rows_q: no program without a row")
        body.add(f"rows_q = _floordiv({n}, {st})")
        body.add(f"rows_rem = {n} - {st} * rows_q")
        body.add("tiles_long = (rows_q + BLOCK_M) // BLOCK_M")
        body.add("tiles_short = tl.maximum((rows_q + BLOCK_M - 1) // BLOCK_M, 1)")
        body.add("pid_short = pid - rows_rem * tiles_long")
        body.add("res = tl.where(pid_short < 0, pid // tiles_long, rows_rem + pid_short // tiles_short)")
        body.add("start_m = tl.where(pid_short < 0, pid - res * tiles_long, pid_short - (res - rows_rem) * "
                 "tiles_short)")
        body.add(f"rows_res = {self.idx(rl.rows)}  # rows of residue res")
        self.x.name_expr(rl.rows, "rows_res")
        body.add("offs_a = start_m * BLOCK_M + tl.arange(0, BLOCK_M)")
        body.add(f"offs_m = res + {st} * offs_a  # query rows i = r + s a")

    # ---- a branch -------------------------------------------------------------------------------------------
    def _branch(self, k: int, b, body: Scope) -> None:
        s, x, mo = self.s, self.x, self.monoids[k]
        i = s.row[0]
        sfx = x.sfx(k)
        body.add(f"# branch {k}: {b.kind} reduction over {b.var.name} < {sy.show(b.extent)}")
        if b.skip is sp.true:
            if k == 0 and self.store_lse:   # the stored total of no key: lse -inf, z 0 (the monoid's identity)
                mo.init(body)
            body.add(f"o{sfx} = tl.zeros([BLOCK_M, HEAD_DIM_V], dtype={x.acc})  # no admissible key")
            return
        q = None
        if b.dot is not None:
            offs = x.head_offsets(b.dot.extent, body)
            q = x.factor(b.dot.a, {i: "offs_m[:, None]", b.dot.var: f"{offs}[None, :]"}, body, f"q{sfx}",
                         f"(offs_m[:, None] < {self.idx(s.row[1])}) & ({offs}[None, :] < {self.idx(b.dot.extent)})")
        mo.init(body)
        if b.mode == HOPS:  # one key row per query row per hop (codegen/hops.py)
            emit_hop_branch(x, k, b, body, q, mo)
        else:
            self._key_loop(k, b, body, q, mo)
        mo.finish(body, f"o{sfx}")

    def _key_loop(self, k: int, b, body: Scope, q: str | None, mo: Monoid) -> None:
        """The loops over key tiles of branch k, bounds from the ONF. When the tiles known full form one interval
        (`Branch.span`) and the loop bounds imply every skip, the range splits in three: the boundary tiles
        before the full ones, the full tiles (no mask code), the boundary tiles after them (masked); otherwise
        one loop with a skip test (where the bounds do not imply it) and a partial-tile test."""
        x = self.x
        sfx = x.sfx(k)
        ext = b.extent
        if not (ext.is_Symbol or ext.is_Integer):   # a key extent computed once (lifted branches: rows_res)
            if ext not in x.named:
                name = x.fresh(f"keys{sfx}")
                body.add(f"{name} = {self.idx(ext)}  # keys of branch {k}")
                x.name_expr(ext, name)
        m_ext = self.idx(ext)
        names = {iv.I_LO: "row_lo", iv.I_HI: "row_hi", iv.J_LO: "col_lo", iv.J_HI: "col_hi",
                 iv.TILE_W: "BLOCK_N", **x.names}
        data = uses_summaries(self.s, b)
        skip, full = b.tile_tests(data)
        if data:
            kinds = (("per-tile min / max", ("row", "key", "pair")), ("one value per program", ("program",)))
            body.add("# tiles skipped by the data too: " + "; ".join(
                f"{what} of {', '.join(sorted({sm.read.name for sm in b.summaries if sm.axis in axes}))}"
                for what, axes in kinds if any(sm.axis in axes for sm in b.summaries)))
            self._program_values(b, body)
            self._summary_loads(b, "row", body)
            names.update(self.summary_names)
        if b.mode == "lift":  # residue-lift: key tiles in b-space, the box over (a, b)
            names.update({iv.I_LO: "a_lo", iv.I_HI: "a_hi"})
            body.add(f"# lifted by residue-lift: keys {b.lift.var.name} = {sy.show(b.lift.key)}, loop over tiles of "
                     f"{b.var.name}")
        lo = "0" if b.key_lo is None else \
            f"(tl.maximum(0, {self._code(b.key_lo, names)}) // BLOCK_N) * BLOCK_N  # first key tile"
        hi = f"{m_ext} - 1" if b.key_hi is None else f"tl.minimum({m_ext} - 1, {self._code(b.key_hi, names)})"
        body.add(f"lo{sfx} = {lo}")
        body.add(f"hi{sfx} = {hi}  # last admissible key")
        scale = self._scale(k, b, body)
        tested = not iv.skip_implied_by_range(skip, b.key_lo, b.key_hi)
        if scans_keys(self.s, b):   # tiles decided by a test (data summaries, a modular atom): scan, then run kept
            self._data_loop(k, b, body, q, mo, scale, names, skip, full, m_ext)
            return
        if not b.split:
            loop = Scope([], "    ", parent=body).open(f"for start_n in range(lo{sfx}, hi{sfx} + 1, BLOCK_N):",
                                                         ("iter" if tested else "visit", k))
            self._tile_box(loop, m_ext)
            inner = loop.open(f"if {self._code(skip, names)} == 0:", ("visit", k)) if tested else loop
            self._tile(k, b, inner, body, q, mo, scale, names, "test", full)
            body.lines.extend(loop.parent.lines)
            return
        fl, fu = b.span
        body.add("# the tiles known full (no mask code) lie in [full_lo, full_hi); the others are masked")
        first = f"lo{sfx}" if fl is None else \
            f"tl.maximum(lo{sfx}, _floordiv({self._code(fl, names)} + BLOCK_N - 1, BLOCK_N) * BLOCK_N)"
        body.add(f"full_lo{sfx} = tl.minimum({first}, hi{sfx} + 1)")
        last = f"{m_ext} - BLOCK_N" if fu is None else f"tl.minimum({self._code(fu, names)}, {m_ext} - BLOCK_N)"
        body.add(f"full_hi{sfx} = tl.maximum(full_lo{sfx}, tl.minimum(hi{sfx} + 1, (_floordiv({last}, BLOCK_N) + 1) "
                 f"* BLOCK_N))")
        for region, start, stop, masked in (("lo", f"lo{sfx}", f"full_lo{sfx}", "always"),
                                            ("full", f"full_lo{sfx}", f"full_hi{sfx}", "never"),
                                            ("hi", f"full_hi{sfx}", f"hi{sfx} + 1", "always")):
            ahead = region == "full" and self.overlap and looks_ahead(self.s, b)
            if ahead:   # the first full tile's scores before the loop, each next tile's one iteration ahead
                body.add("# q . k^T of the next full tile is issued before this tile's softmax (tensor cores "
                         "overlap it)")
                body.add(f"nxt_n = full_lo{sfx}")
                pro = body.child()   # its loads cached apart: the loop's own look-ahead loads the next tiles
                self._ahead(k, b, pro, body, q)
                body.lines.extend(pro.lines)
            loop = Scope([], "    ", parent=body).open(f"for start_n in range({start}, {stop}, BLOCK_N):",
                                                         (region, k))
            if ahead:
                loop.add(f"qk{sfx} = qk_nxt{sfx}")
                loop.add("nxt_n = start_n + BLOCK_N")
                self._ahead(k, b, loop, body, q)
            self._tile_box(loop, m_ext)
            x.inside = {b.var: b.extent} if masked == "never" else {}   # full tiles end inside the keys
            self._tile(k, b, loop, body, q, mo, scale, names, masked, b.full, ahead)
            x.inside = {}
            body.lines.extend(loop.parent.lines)

    def _ahead(self, k: int, b, scope: Scope, body: Scope, q) -> None:
        """qk_nxt = q . k^T of the key tile starting at nxt_n, with bound masks (past the last full tile it reads
        zeros or a tile it discards): its tensor-core work can run while the current tile's softmax does."""
        x, sfx = self.x, self.x.sfx(k)
        m_ext = self.idx(b.extent)
        offs = x.head_offsets(b.dot.extent, body)
        scope.add("offs_nx = nxt_n + tl.arange(0, BLOCK_N)")
        kt = x.factor(b.dot.b, {b.var: "offs_nx[:, None]", b.dot.var: f"{offs}[None, :]"}, scope, f"k{sfx}",
                      f"(offs_nx[:, None] < {m_ext}) & ({offs}[None, :] < {self.idx(b.dot.extent)})")
        scope.add(f"qk_nxt{sfx} = tl.dot({q}, tl.trans({kt}){x.dot_kw()})")

    @staticmethod
    def _tile_box(loop: Scope, m_ext: str) -> None:
        """The key columns of a tile and its box (J_LO, J_HI: read by the skip and partial tests)."""
        loop.add("offs_n = start_n + tl.arange(0, BLOCK_N)")
        loop.add("col_lo = start_n  # J_LO")
        loop.add(f"col_hi = tl.minimum(start_n + BLOCK_N, {m_ext}) - 1  # J_HI")

    def _tile(self, k: int, b, inner: Scope, body: Scope, q, mo: Monoid, scale, names: dict, masked: str,
              full, ahead: bool = False) -> None:
        """One key tile of branch k: the key tile and qk (`ahead`: qk computed by the previous iteration), the
        score, the mask (masked: 'always', 'never', or 'test': on tiles not known `full` only), the value tile and
        the monoid's update."""
        s, x = self.s, self.x
        i, j = s.row[0], b.var
        sfx = x.sfx(k)
        m_ext = self.idx(b.extent)
        smap = {i: "offs_m[:, None]", j: "offs_n[None, :]"}
        if b.mode == "lift":
            smap[s.lift.a] = "offs_a[:, None]"
        if b.dot is not None and not ahead:
            offs = x.head_offsets(b.dot.extent, body)
            kt = x.factor(b.dot.b, {j: "offs_n[:, None]", b.dot.var: f"{offs}[None, :]"}, inner, f"k{sfx}",
                          f"(offs_n[:, None] < {m_ext}) & ({offs}[None, :] < {self.idx(b.dot.extent)})")
            inner.add(f"qk{sfx} = tl.dot({q}, tl.trans({kt}){x.dot_kw()})")
        sname = f"s{sfx}" if b.kind == "softmax" else f"w{sfx}"
        raw = scale is not None and scale[1] is None and scale[2]   # s = qk: the monoid scales max and exponent
        if raw and masked == "never":
            sname = f"qk{sfx}"
        elif raw:
            inner.add(f"{sname} = qk{sfx}  # the score in units of 1 / qk_scale")
        elif scale is not None:   # the score in log2 units: qk * qk_scale (+ the rest times log2 e)
            rest = scale[1]
            text = f"qk{sfx} * {scale[0]}"
            if scale[3] is not None:   # a rest affine in the key: one FFMA per element (codegen/affine.py)
                text += f" + {scale[3].element(inner)}"
            elif rest is not None:
                r = x.emit(rest, smap, inner, hoist=body, key_vars=frozenset({j}), role=f"score{sfx}")
                text += f" + {x._float(r, rest)} * {LOG2E}"
            inner.add(f"{sname} = {text}")
        else:
            score = x.emit(b.score, smap, inner, hoist=body, key_vars=frozenset({j}), role=f"score{sfx}")
            if is_number(score) or score in ('float("inf")', 'float("-inf")'):   # constant (x^0 = 1, -inf): a tile
                score = f"tl.full((BLOCK_M, BLOCK_N), {score}, {x.acc})"
            elif not _tile_wide(b.score, set(smap) - {j}, j):   # constant along a tile axis (a key bias)
                score = f"tl.broadcast_to({score}, (BLOCK_M, BLOCK_N))"
            inner.add(f"{sname} = {score}")
        neutral = 'float("-inf")' if b.kind == "softmax" else "0.0"
        if masked != "never":
            valid = f"(offs_n[None, :] < {m_ext})"
            if b.mask is not None:
                mask = x.emit(b.mask, smap, inner, hoist=body, key_vars=frozenset({j}), role=f"mask{sfx}")
                valid = f"{mask} & {valid}"
            if masked == "always" or full is sp.false:   # no tile known mask-free: mask every tile
                inner.add(f"{sname} = tl.where({valid}, {sname}, {neutral})")
            else:
                part = inner.open(f"if {self._code(sp.Not(full), names)} | (start_n + BLOCK_N > {m_ext}):",
                                  ("partial", k))
                part.add(f"{sname} = tl.where({valid}, {sname}, {neutral})")
        v = x.factor(b.value, {j: "offs_n[:, None]", s.col[0]: "offs_v[None, :]"}, inner, f"v{sfx}",
                     f"(offs_n[:, None] < {m_ext}) & (offs_v[None, :] < {self.idx(s.col[1])})")
        to_log2 = scale[0] if raw else "" if scale is not None else LOG2E
        if b.kind == "softmax":
            mo.update(inner, sname, lambda p: f"tl.dot({p}.to({v}.dtype), {v}{x.dot_kw()})", to_log2=to_log2)
        else:
            mo.update(inner, sname, lambda w: x.weights_dot(w, v))

    def _scale(self, k: int, b, body: Scope):
        """Scale folding: a softmax score affine in the score tile, c * qk + rest with c constant along the keys,
        gets qk_scale = c log2 e computed once (before the key loop), so a tile costs one multiply per element
        instead of a division and the log2 e multiply. Returns (qk_scale code, rest or None, c > 0), or None. With
        no rest and c > 0 the row max is taken over qk and scaled after (rowmax(c qk) = c rowmax(qk), exactly: a
        rounded multiply by c > 0 is monotone), and the exponent is one fused multiply-add, qk * qk_scale - m. A rest
        affine in the key index (ALiBi) gets its slope and key-free part once too (codegen/affine.py: the 4th item,
        else None), so that an element costs qk * qk_scale + (offs_nf * slope + tile bias)."""
        if b.kind != "softmax" or b.dot is None:
            return None
        aff = affine(b.score, DotTile(k))
        if aff is None or aff[0] is None or not free_of(aff[0], {b.var}):
            return None
        c, sfx = aff[0], self.x.sfx(k)
        value = c.value if isinstance(c, D.Const) else c.expr if isinstance(c, D.Index) and c.expr.is_number \
            else None
        rowmap = {self.s.row[0]: "offs_m[:, None]"}
        if b.mode == "lift":
            rowmap[self.s.lift.a] = "offs_a[:, None]"
        if value is not None:   # a number: folded into one literal
            name = float_literal(float(value) * float(LOG2E))
        else:
            coef = self.x.emit(c, rowmap, body, role=f"qk_scale{sfx}")
            name = f"qk_scale{sfx}"
            if any(isinstance(e, D.Read) or isinstance(e, D.Index) and not e.expr.is_number for e in D.nodes(c)):
                body.add(f"{name} = {self.x._float(coef, c)} * {LOG2E}  # the score scale in log2 units, once")
            else:   # a constant expression: typed (a bare Python float would be fp32 in the interpreter)
                body.add(f"{name} = tl.full([1], ({coef}) * {LOG2E}, dtype={self.x.acc})  # the score scale, "
                         "log2 units")
            self.x.taken.add(name)
        key = None if aff[1] is None else emit_key_affine(self.x, aff[1], b.var, rowmap, body, sfx)
        per_row = bool(D.free_vars(c) & set(rowmap))   # a [BLOCK_M, 1] scale: the row max is taken after it
        return name, aff[1], positive(c) and not per_row, key

    def _code(self, e, names) -> str:
        """Code of an index formula over the tile box (row_lo, row_hi, col_lo, col_hi) and named expressions."""
        e = sp.sympify(e)
        return pcode(e.xreplace(self.x.named) if self.x.named else e, {**names, **self.x.names})

    # ---- assembly -------------------------------------------------------------------------------------------
    def _assemble(self, body_lines, block_m, block_n, store_lse, stores) -> KernelSpec:
        s, x = self.s, self.x
        o = s.output
        args = []
        for name in x.used_inputs:
            node = self.p.input_map[name]
            args.append(f"{name}_ptr")
            args += [f"stride_{name}_z{z}" for z in range(self.nbatch)]
            args += [f"stride_{name}_{k}" for k in range(node.rank)]
        for ts in self.summaries.values():
            args.append(f"{ts.arg}_ptr")
            args += [f"stride_{ts.arg}_z{z}" for z in range(self.nbatch)]
            args += [f"stride_{ts.arg}_{k}" for k in range(ts.rank)] + [f"stride_{ts.arg}_s"]
        args += [td.arg for td in x.descriptors.values()]
        args.append(f"{o}_ptr")
        args += [f"stride_{o}_z{z}" for z in range(self.nbatch + len(s.lead))]
        args += [f"stride_{o}_0", f"stride_{o}_1"]
        if store_lse:
            args.append("lse_out")
            args += [f"lse_stride_z{z}" for z in range(self.nbatch + len(s.lead))]
        args += [f"dim_{d.name}" for d in self.p.dims]
        args += [f"Z{z}" for z in range(self.nbatch)]
        consts = ["BLOCK_M: tl.constexpr", "BLOCK_N: tl.constexpr"]
        consts += [f"{hd}: tl.constexpr" for hd in x.head_dims.values()]
        consts += ["HEAD_DIM_V: tl.constexpr"]
        if store_lse:
            consts.append("STORE_LSE: tl.constexpr")
        lines = []
        for ln in body_lines:
            lines += self._batch_offsets(store_lse) if ln.strip() == "for_batch_offsets" else [ln]
        lines = prune(lines)
        sig = ",\n    ".join(args + consts)
        head = f"{self._header()}\nimport triton\nimport triton.language as tl\n"
        helpers = helpers_for("\n".join(lines))
        if helpers:
            head += f"\n\n{helpers}\n"
        head += f"\n\n@triton.jit\ndef _attn_fwd(\n    {sig},\n):\n"
        src = head + "\n".join(lines) + "\n"
        hd = tuple((name, ext) for ext, name in x.head_dims.items())
        return KernelSpec("_attn_fwd", src, o, tuple(x.used_inputs), tuple(d.name for d in self.p.dims),
                          self.nbatch, block_m, block_n, hd, store_lse,
                          tuple((v.name, e) for v, e in s.lead), s.row[1], s.col[1], tuple(x.loads), stores,
                          regions_by_line(lines, head.count("\n") + 1), tuple(self.summaries.values()),
                          tuple(x.descriptors.values()))

    def _batch_offsets(self, store_lse: bool) -> list:
        """Offsets of every pointer for this program's batch indices (decoded row-major from pid_z)."""
        s, x = self.s, self.x
        dec = ["    # batch axes (broadcast): row-major decode of what is left of pid_z"] if self.nbatch else []
        z = "pid_z"
        for b in reversed(range(self.nbatch)):
            dec.append(f"    off_z{b} = {z} % Z{b}" if b else f"    off_z{b} = {z}")
            if b:
                dec.append(f"    {z} = {z} // Z{b}")
        for name in [*x.used_inputs, *(ts.arg for ts in self.summaries.values())]:
            terms = [f"off_z{b}.to(tl.int64) * stride_{name}_z{b}" for b in range(self.nbatch)]
            dec.append(f"    off_{name} = {' + '.join(terms) if terms else '0'}")
        lead_idx = [f"off_z{b}.to(tl.int64)" for b in range(self.nbatch)] + \
            [f"idx_{v.name}.to(tl.int64)" for v, _ in s.lead]
        o = s.output
        terms = [f"{t} * stride_{o}_z{k}" for k, t in enumerate(lead_idx)]
        dec.append(f"    off_{o} = {' + '.join(terms) if terms else '0'}")
        if store_lse:
            terms = [f"{t} * lse_stride_z{k}" for k, t in enumerate(lead_idx)]
            dec.append(f"    off_lse = {' + '.join(terms) if terms else '0'}")
        return dec

    def _header(self) -> str:
        s = self.s
        i, _ = s.row
        c, _ = s.col
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


def _safe_comment(text: str) -> str:
    """Comment text: printable ASCII without newlines (names are validated identifiers already)."""
    return "".join(ch if 32 <= ord(ch) < 127 else "?" for ch in text)[:200]


def looks_ahead(sched: Schedule, b) -> bool:
    """Whether `overlap` gives branch b a look-ahead q . k^T: a split key loop over full tiles (not the tiles a
    scan keeps), of key tiles or residue-lifted b-space tiles, with a contraction."""
    return b.split and b.dot is not None and b.mode in (TILED, "lift") and not scans_keys(sched, b)


def generate(program: Program, sched: Schedule, dtype: str, nbatch: int, block_m: int = 64, block_n: int = 64,
             store_lse: bool = False, exact=frozenset(), tma: bool = False, overlap: bool = False) -> KernelSpec:
    """Triton source for one output's schedule, specialised to a dtype, the number of batch axes and the head dims
    (extents) that equal their padded tiles at the launch (`exact`: their loads need no bound). tma: key tiles
    of plain K / V reads through tensor descriptors (spec.descriptors; Hopper's copy engine). overlap: the loop
    over full key tiles computes each next tile's q . k^T one iteration ahead, so that the tensor cores work on it
    while the current tile's softmax runs (FlashAttention-3's intra-warpgroup overlap)."""
    return KernelEmitter(program, sched, dtype, nbatch, frozenset(exact), tma, overlap).kernel(
        block_m, block_n, store_lse and returns_total(sched))


def _tile_wide(e, rows: set, key) -> bool:
    """Whether the score e varies along both axes of a tile (rows, keys), so that its code is a full tile."""
    if any(isinstance(t, DotTile) for t in D.nodes(e)):
        return True
    free = D.free_vars(e)
    return bool(free & rows) and key in free
