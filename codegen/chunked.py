"""Triton kernels of the chunked-state (linear) form: chunk states with their exclusive prefix over chunks, output.

Derived from a LinearPlan (moa/linear.py). Two kernels, each with the grid's last axis over batch x leading
axes (decoded like the quadratic kernel's):
  _chunk_scan   grid (cdiv(D, BLOCK_F), cdiv(HEAD_DIM_V, BLOCK_V), Z): a loop over the chunks c in order, over
                a BLOCK_F x BLOCK_V block of the state (the value axis split: more programs where batch x heads
                x feature tiles are fewer than the SMs, as flash-linear-attention's BV blocks): the chunk's own state
                dS_c[f, :] = sum_{j in c} e^(gb_b - gb_j) phi(B_j)_f v_j, dz_c[f] likewise with v = 1 (b = the
                chunk's last row; phi(x)_f = w_f prod_t x[idx[f, t]]), and S_c, the exclusive prefix with decays
                e^(gb_b' - gb_b), stored (optionally from a carried state, and writing the final state: ring
                attention); the states are written once and never read back here; z (no value axis) is
                computed by every value tile and stored by the first
  _chunk_out    grid (T, Z): O_i = (e^(ga_i - gb_b) phi(A_i) . S_c + intra_i) / (same with z), 0 if 0
States are [Z, T, D, e] in the buffers' dtype (the accumulator's, or bfloat16 for a bfloat16 forward:
runtime/linear_run.py), the running sums in the accumulator dtype: the only arrays beyond inputs and outputs,
O(n D e / C).
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import sympy as sp
from sympy import Symbol as _sym

from moa.linear import LinearPlan
from moa.program import Program

from .exprs import AccessSite, Emitter
from .scope import Scope
from .tidy import helpers_for, prune

# access sites (cost model): the chunk index t, a feature f, the constexpr CHUNK and the argument n_feat
CHUNK_IDX = _sym("t", integer=True, nonnegative=True)
FEAT = _sym("f", integer=True, nonnegative=True)
CHUNK = _sym("CHUNK", integer=True, positive=True)
NFEAT = _sym("n_feat", integer=True, positive=True)
VTILE = _sym("v_tile", integer=True, nonnegative=True)   # the scan's value tile (a lane of axis "vtile")


@dataclass(frozen=True)
class ChunkedSpec:
    source: str
    inputs: tuple      # input names in signature order
    dims: tuple
    nbatch: int
    lead: tuple
    sites: tuple = ()  # (function, loads, stores): AccessSite per tl.load / tl.store, for the cost model


class _Chunked:
    def __init__(self, program: Program, lp: LinearPlan, dtype: str, nbatch: int):
        self.p, self.lp = program, lp
        self.s = lp.schedule
        self.em = Emitter(program, self.s, dtype)
        self.acc = self.em.acc
        self.nbatch = nbatch
        self.store_z = False   # _chunk_out also stores the normaliser per row (the training forward)
        # operands are computed in the accumulator dtype (features, states, weights: unbounded, so no 16-bit cast):
        # float32 inputs keep exact fp32 dots; 16-bit inputs use TF32 tensor cores (fp32 range, 10-bit mantissa)
        self.dot_kw = {"float32": ', input_precision="ieee"', "float16": ', input_precision="tf32"',
                       "bfloat16": ', input_precision="tf32"'}.get(dtype, "")
        # the forward of a bfloat16 call multiplies bfloat16 operands (float32 accumulation, fp32's range: as the
        # quadratic kernel's P @ V and flash-linear-attention's chunked kernels), at twice tf32's rate
        self.dot16 = "tl.bfloat16" if dtype == "bfloat16" else None
        # degree 1: phi_f(x) = x_f (feature_table(d, 1) is the identity with weights 1), a block of columns read
        # directly (contiguous, vectorised) instead of gathered through the feature table
        self.direct = getattr(lp, "p", 0) == 1   # (the window kernel's plan has no degree)

    # access sites (cost model): the tile axis of each index code; None: the value of a loaded feature index
    SITE_AXES = {"offs_j": "crow", "offs_i": "crow", "offs_v": "col", "offs_head_dim": "HEAD_DIM", "last": "chunk",
                 "ref": "chunk", "fidx": None, "offs_f": "feat"}

    def emit(self, e, vmap, lines, indent="    ", role: str = "tmp") -> str:
        # a fresh scope per call: the same expression under different index maps must not be shared
        first = len(self.em.loads)
        code = self.em.emit(e, vmap, Scope(lines, indent), role=role)
        self._sites(first, vmap)
        return code

    def _sites(self, first: int, vmap) -> None:
        """Re-label the access sites emitted since `first` with this kernel's tile axes (SITE_AXES)."""
        for q in range(first, len(self.em.loads)):
            site = self.em.loads[q]
            axes, conds = [], list(site.conds)
            for v, label in site.axes:
                code = vmap[v].split("[")[0].strip()
                base = code.rstrip("0123456789") if code.startswith("fidx") else code
                axis = self.SITE_AXES.get(base, label)
                if base in ("last", "ref"):   # a chunk's boundary row: a formula of the chunk index
                    conds = [c.xreplace({v: self.site_scalar(base)}) for c in conds]
                    axes.append((CHUNK_IDX, "chunk"))
                elif axis is None:   # a feature index loaded from fidx: in [0, d) for a feature, HEAD_DIM (>= d,
                    # so the read's bound test masks it) for a padded one: the lane is read iff f < n_feat
                    conds = [c for c in conds if v not in c.free_symbols] + [sp.Lt(v, NFEAT)]
                    axes.append((v, "feat"))
                else:
                    axes.append((v, axis))
            self.em.loads[q] = replace(site, axes=tuple(dict.fromkeys(axes)), conds=tuple(conds))

    def site_scalar(self, name: str):
        """`last` / `ref` of the kernels as formulas of the chunk index (CHUNK_IDX)."""
        n = self.s.row[1]
        if name == "last":
            return sp.Min(CHUNK_IDX * CHUNK + CHUNK, n) - 1
        return sp.Max(CHUNK_IDX * CHUNK - 1, 0)

    def ix(self, e) -> str:
        return self.em.idx(e, {})

    def prologue(self, zaxis: int) -> list:
        s = self.s
        out = [f"    pid_z = tl.program_id({zaxis})"]
        for v, ext in reversed(s.lead):
            out += [f"    idx_{v.name} = pid_z % {self.ix(ext)}", f"    pid_z = pid_z // {self.ix(ext)}"]
        for b in reversed(range(self.nbatch)):
            out.append(f"    off_z{b} = pid_z % Z{b}" if b else f"    off_z{b} = pid_z")
            if b:
                out.append(f"    pid_z = pid_z // Z{b}")
        out.append("    zl = tl.program_id(%d)  # flat batch x leading index (states, outputs)" % zaxis)
        return out

    def offsets(self) -> list:
        out = []
        for name in self.em.used_inputs:
            terms = [f"off_z{b}.to(tl.int64) * stride_{name}_z{b}" for b in range(self.nbatch)]
            out.append(f"    off_{name} = {' + '.join(terms) if terms else '0'}")
        return out

    def features(self, expr, var, rows: str, lines) -> str:
        """phi(x) tile [rows, BLOCK_F]: w_f prod_t x(rows, idx[f, t]), zero on padding."""
        return self.weighted(self.factors(expr, var, rows, lines))

    def weighted(self, factors: list) -> str:
        """w_f times the factors (the weights are 1 for direct features)."""
        return " * ".join(factors if self.direct else ["fw[None, :]", *factors])

    def value(self, rows: str, lines: list) -> None:
        """v [rows, HEAD_DIM_V]: the branch's value at key rows `rows`, zero outside the rows and columns."""
        br, c = self.lp.branch, self.s.col[0]
        v = self.emit(br.value, {br.var: f"{rows}[:, None]", c: "offs_v[None, :]"}, lines)
        lines.append(f"    v = tl.where(row_ok[:, None] & v_ok[None, :], {v}, 0.0).to({self.acc})")

    def dot(self, a: str, b: str) -> str:
        """tl.dot of two fp32 tiles: bfloat16 operands in a bfloat16 forward (dot16), else at dot_kw's precision."""
        if self.dot16:
            return f"tl.dot({a}.to({self.dot16}), {b}.to({self.dot16}))"
        return f"tl.dot({a}, {b}{self.dot_kw})"

    def factors(self, expr, var, rows: str, lines, table: list | None = None) -> list:
        """The loads of fw and fidx0..fidx{p-1} (into `table` if given, else `lines`), and the p gathered factors
        x(rows, idx[f, t]) of phi (codes)."""
        br = self.lp.branch
        if self.direct:
            return [self.emit(expr, {var: f"{rows}[:, None]", br.dot.var: "offs_f[None, :]"}, lines)]
        table = lines if table is None else table
        table.append("    fw = tl.load(fw_ptr + offs_f, mask=f_ok, other=0.0)")
        self._site("fw", "fw", FEAT)
        factors = []
        for t in range(self.lp.p):
            table.append(f"    fidx{t} = tl.load(fidx_ptr + offs_f * {self.lp.p} + {t}, mask=f_ok, other=HEAD_DIM)")
            self._site(f"fidx{t}", "fidx", FEAT * self.lp.p + t)
            factors.append(self.emit(expr, {var: f"{rows}[:, None]", br.dot.var: f"fidx{t}[None, :]"}, lines))
        return factors

    def signature(self, extra_args, consts) -> str:
        args = []
        for name in self.em.used_inputs:
            node = self.p.input_map[name]
            args.append(f"{name}_ptr")
            args += [f"stride_{name}_z{z}" for z in range(self.nbatch)]
            args += [f"stride_{name}_{k}" for k in range(node.rank)]
        args += extra_args
        args += [f"dim_{d.name}" for d in self.p.dims]
        args += [f"Z{z}" for z in range(self.nbatch)]
        args += [f"{c}: tl.constexpr" for c in consts]
        return ",\n    ".join(args)

    def gate(self, which, var, at: str, lines) -> str | None:
        e = self.lp.ga if which == "a" else self.lp.gb
        if e is None:
            return None
        return self.emit(e, {var: at}, lines)

    def kernels(self, more=()) -> ChunkedSpec:
        """The two kernels' source (`more`: builders of further kernels in the same module, the backward's)."""
        s = self.s
        built = [self._scan_kernel(), self._out_kernel(), *(k() for k in more)]
        header = (f"# Generated by moa: the chunked-state (linear) form of {_safe(self.p.name)} output "
                  f"{s.output}, degree p = {self.lp.p}, {'gated' if self.lp.ga is not None else 'not gated'}.\n"
                  "# offs_j / offs_i = rows of a chunk; offs_f = feature indices of phi (D of them);\n"
                  "# S_ptr / zs_ptr = per-chunk states [Z, T, D, HEAD_DIM_V] and normalisers [Z, T, D].")
        fns = "\n\n".join(k() for k in built)
        src = f"{header}\nimport triton\nimport triton.language as tl\n\n\n{helpers_for(fns)}\n\n\n{fns}"
        return ChunkedSpec(src, tuple(self.em.used_inputs), tuple(d.name for d in self.p.dims), self.nbatch,
                           tuple((v.name, x) for v, x in s.lead), self.fn_sites)

    def _common(self):
        """The names every kernel of the form uses: extents, arguments, constexprs, state pointers."""
        s, br = self.s, self.lp.branch
        i, n = s.row
        c, e = s.col
        j = br.var
        n_c, e_c = self.ix(n), self.ix(e)
        # S0 / z0 / g0: a state [Z, D, HEAD_DIM_V] / [Z, D] / [Z] carried across ranks (runtime/ring_linear.py):
        # INIT reads it as the state before chunk 0 (relative to gb at row -1), FINAL writes the state after the
        # last chunk there, PREFIX stores the exclusive prefix per chunk (single process: 0, 1, 0)
        st_args = ["S_ptr", "zs_ptr", "fidx_ptr", "fw_ptr", "n_feat", "n_chunks", "S0_ptr", "z0_ptr", "g0_ptr"]
        consts = ["CHUNK", "BLOCK_F", "BLOCK_V", "HEAD_DIM", "HEAD_DIM_V", "INIT", "PREFIX", "FINAL"]
        carried = ("        c_ptrs = S0_ptr + zl.to(tl.int64) * n_feat * HEAD_DIM_V + offs_f[:, None] * HEAD_DIM_V + "
                   "offs_v[None, :]\n        c_zptrs = z0_ptr + zl.to(tl.int64) * n_feat + offs_f")
        states = ("    s_base = zl.to(tl.int64) * n_chunks * n_feat * HEAD_DIM_V\n"
                  "    z_base = zl.to(tl.int64) * n_chunks * n_feat")
        return br, i, n, c, e, j, n_c, e_c, st_args, consts, carried, states

    def _scan_kernel(self):
        """_chunk_scan: each chunk's own state dS_c, dz_c, computed in the loop, and the exclusive prefix over the
        chunks (with the carried state and the final one of the ring): the states are written once, never read."""
        br, i, n, c, e, j, n_c, e_c, st_args, consts, carried, states = self._common()
        pro, body = self.value_tiled("S", "z", e_c, states)
        body += [f"    g_prev = tl.zeros([1], dtype={self.acc})",
                 "    if INIT:  # the state before chunk 0", carried,
                 "        S = tl.load(c_ptrs, mask=f_ok[:, None] & v_ok[None, :], other=0.0)",
                 "        z = tl.load(c_zptrs, mask=f_ok, other=0.0)"]
        if self.lp.gb is not None:
            body.append("        g_prev = tl.load(g0_ptr + zl + tl.zeros([1], dtype=tl.int32))")
        # chunk t's own state (the feature table is read once, before the loop)
        inner = ["    offs_j = t * CHUNK + tl.arange(0, CHUNK)", f"    row_ok = offs_j < {n_c}"]
        factors = self.factors(br.dot.b, j, "offs_j", inner, table=body)
        inner.append(f"    phi = tl.where(row_ok[:, None] & f_ok[None, :], {self.weighted(factors)}, 0.0)")
        inner.append(f"    last = tl.minimum(t * CHUNK + CHUNK, {n_c}) - 1  # b: the chunk's last row")
        gl = self.gate("b", j, "last", inner)
        if gl is not None:
            gj = self.gate("b", j, "offs_j[:, None]", inner)
            inner.append(f"    phi = phi * tl.exp({gl} - {gj})  # e^(gb_b - gb_j) <= 1 for a cumulative log-gate")
        self.value("offs_j", inner)
        inner += [f"    dS = {self.dot('tl.trans(phi)', 'v')}", "    dz = tl.sum(phi, 0)",
                  "    if PREFIX:  # the state before chunk t",
                  "        s_ptrs = S_ptr + s_base + t * n_feat * HEAD_DIM_V + offs_f[:, None] * HEAD_DIM_V + "
                  "offs_v[None, :]",
                  "        tl.store(s_ptrs, S.to(S_ptr.dtype.element_ty), mask=f_ok[:, None] & v_ok[None, :])",
                  "        tl.store(zs_ptr + z_base + t * n_feat + offs_f, z.to(zs_ptr.dtype.element_ty), mask=z_st)"]
        body += ["    for t in range(0, n_chunks):", *("    " + ln for ln in inner)]
        if gl is not None:
            body += [f"        decay = tl.where(t + INIT > 0, tl.exp({gl} - g_prev), 1.0)",
                     "        S = S * decay + dS", "        z = z * decay + dz", f"        g_prev = {gl} + g_prev * 0"]
        else:
            body += ["        S = S + dS", "        z = z + dz"]
        body += ["    if FINAL:  # the state after the last chunk, relative to gb at the last row", carried,
                 "        tl.store(c_ptrs, S, mask=f_ok[:, None] & v_ok[None, :])",
                 "        tl.store(c_zptrs, z, mask=z_st)"]
        if self.lp.gb is not None:
            body.append("        tl.store(g0_ptr + zl + tl.zeros([1], dtype=tl.int32), g_prev, "
                        "mask=tl.zeros([1], dtype=tl.int32) + vt == 0)")
        return self._fn("_chunk_scan", pro, body, st_args, consts)

    def value_tiled(self, state: str, norm: str, e_c: str, states: str) -> tuple:
        """(prologue, body start) of a scan over a BLOCK_F x BLOCK_V block of a state: grid (feature tiles, value
        tiles, Z), the offsets and masks (z_st: the normaliser's lanes, stored by the first value tile), the state
        `state` and its normaliser `norm` set to 0."""
        body = ["    ft = tl.program_id(0)", "    vt = tl.program_id(1)  # the value tile",
                "    offs_f = ft * BLOCK_F + tl.arange(0, BLOCK_F)",
                "    offs_v = vt * BLOCK_V + tl.arange(0, BLOCK_V)", "    f_ok = offs_f < n_feat",
                f"    v_ok = offs_v < {e_c}",
                "    z_st = offs_f < tl.where(vt == 0, n_feat, 0)  # the normaliser: stored by the first value tile",
                states, f"    {state} = tl.zeros([BLOCK_F, BLOCK_V], dtype={self.acc})",
                f"    {norm} = tl.zeros([BLOCK_F], dtype={self.acc})"]
        return self.prologue(2), body

    def _out_kernel(self):
        """_chunk_out: O from the exclusive prefix states and the intra-chunk quadratic part."""
        br, i, n, c, e, j, n_c, e_c, st_args, consts, carried, states = self._common()
        body = ["    t = tl.program_id(0)"]
        pro = self.prologue(1)
        body += ["    offs_i = t * CHUNK + tl.arange(0, CHUNK)", "    offs_v = tl.arange(0, HEAD_DIM_V)",
                 "    offs_head_dim = tl.arange(0, HEAD_DIM)", f"    row_ok = offs_i < {n_c}",
                 f"    v_ok = offs_v < {e_c}", states,
                 f"    num = tl.zeros([CHUNK, HEAD_DIM_V], dtype={self.acc})",
                 f"    den = tl.zeros([CHUNK], dtype={self.acc})",
                 "    for ft in range(0, tl.cdiv(n_feat, BLOCK_F)):",
                 "        offs_f = ft * BLOCK_F + tl.arange(0, BLOCK_F)", "        f_ok = offs_f < n_feat"]
        inner = []
        phi = self.features(br.dot.a, i, "offs_i", inner)
        inner.append(f"    phi = tl.where(row_ok[:, None] & f_ok[None, :], {phi}, 0.0)")
        body += ["    " + ln for ln in inner]
        body += ["        S = tl.load(S_ptr + s_base + t * n_feat * HEAD_DIM_V + offs_f[:, None] * HEAD_DIM_V + "
                 f"offs_v[None, :], mask=f_ok[:, None] & v_ok[None, :], other=0.0).to({self.acc})",
                 f"        z = tl.load(zs_ptr + z_base + t * n_feat + offs_f, mask=f_ok, other=0.0).to({self.acc})",
                 f"        num += {self.dot('phi', 'S')}", "        den += tl.sum(phi * z[None, :], 1)"]
        ga = self.gate("a", i, "offs_i", body)
        if ga is not None:
            body.append("    ref = tl.maximum(t * CHUNK - 1, 0)  # b: the previous chunk's last row")
            gref = self.gate("b", j, "ref", body)
            body += [f"    g_ref = {gref}",
                     "    if INIT:  # chunk 0 continues the carried state, relative to gb at row -1 (g0)",
                     "        g_ref = tl.where(t > 0, g_ref, tl.load(g0_ptr + zl))",
                     f"    scale = tl.where(t + INIT > 0, tl.exp({ga} - g_ref), 0.0)",
                     "    num = num * scale[:, None]", "    den = den * scale"]
        # intra-chunk quadratic part (the tiled kernel's score on the diagonal block)
        amap = {i: "offs_i[:, None]", br.dot.var: "offs_head_dim[None, :]"}
        bmap = {j: "offs_i[:, None]", br.dot.var: "offs_head_dim[None, :]"}
        qa = self.emit(br.dot.a, amap, body)
        kb = self.emit(br.dot.b, bmap, body)
        hd_ok = f"(offs_head_dim[None, :] < {self.ix(br.dot.extent)})"
        body += [f"    qa = tl.where(row_ok[:, None] & {hd_ok}, {qa}, 0.0)",
                 f"    kb = tl.where(row_ok[:, None] & {hd_ok}, {kb}, 0.0)",
                 f"    qk{self.em.sfx(0)} = {self.dot('qa', 'tl.trans(kb)')}"]
        w = self.emit(br.score, {i: "offs_i[:, None]", j: "offs_i[None, :]"}, body)
        body.append(f"    w = tl.where((offs_i[None, :] <= offs_i[:, None]) & row_ok[None, :], {w}, 0.0)")
        self.value("offs_i", body)
        body += [f"    num += {self.dot('w', 'v')}", "    den += tl.sum(w, 1)",
                 "    out = num / tl.where(den == 0, 1.0, den)[:, None]  # 0 where the normaliser is 0",
                 "    tl.store(out_ptr + zl.to(tl.int64) * stride_out_z + offs_i[:, None] * stride_out_0 + "
                 "offs_v[None, :] * stride_out_1, out.to(out_ptr.dtype.element_ty), "
                 "mask=row_ok[:, None] & v_ok[None, :])"]
        extra = ["out_ptr", "stride_out_z", "stride_out_0", "stride_out_1"]
        if self.store_z:   # a call that needs gradients (codegen/chunked_backward.py): Z per row, for the backward
            body.append(f"    tl.store(zrow_ptr + zl.to(tl.int64) * ({n_c}) + offs_i, den, mask=row_ok)")
            extra.append("zrow_ptr")
        return self._fn("_chunk_out", pro, body, st_args + extra, consts)

    def _site(self, name, tensor, index, col=False) -> None:
        """Record a load written as text: a feature vector (f < n_feat), with col: a state tile (and c < e)."""
        c, e = self.s.col
        axes = ((FEAT, "feat"), (c, "col")) if col else ((FEAT, "feat"),)
        conds = (sp.Lt(FEAT, NFEAT), sp.Lt(c, e)) if col else (sp.Lt(FEAT, NFEAT),)
        self.em.loads.append(AccessSite(name, tensor, (index,), axes, conds))

    def _sites_of(self, name) -> tuple:
        """(function, loads, stores) of the accesses of kernel `name` (the loads emitted since the previous
        kernel, plus the state loads and every store, which the kernels write as text)."""
        mark = getattr(self, "_mark", 0)
        if name == "_chunk_out":
            self._site("S", "S", FEAT, col=True)
            self._site("z", "zs", FEAT)
        loads = tuple(self.em.loads[mark:])
        self._mark = len(self.em.loads)
        (i, n), (c, e) = self.s.row, self.s.col
        state = scan_state_sites(self.s)
        if name == "_chunk_scan":   # the carried state of the ring: read (INIT), written (FINAL), one per program
            carried = (AccessSite("S0", "S0", (FEAT, c), ((FEAT, "feat"), (c, "col")),
                                  (sp.Lt(FEAT, NFEAT), sp.Lt(c, e))),
                       AccessSite("z0", "z0", (FEAT,), ((FEAT, "feat"),), (sp.Lt(FEAT, NFEAT),)),
                       AccessSite("g0", "g0", (), (), ()))
            state += tuple(first_value_tile(x) if x.tensor != "S0" else x for x in carried)
            loads += tuple(replace(x, name=v) for x, v in zip(carried, ("S", "z", "g_prev")))
        elif self.lp.ga is not None:   # _chunk_out after a carried state (INIT): the gate's value at row -1
            loads += (AccessSite("g_ref", "g0", (), (), ()),)
        out = AccessSite("out", "out", (i, c), ((i, "crow"), (c, "col")), (sp.Lt(i, n), sp.Lt(c, e)))
        return name, loads, (out,) if name == "_chunk_out" else state

    def _fn(self, name, pro, body, extra, consts):
        self.fn_sites = getattr(self, "fn_sites", ()) + (self._sites_of(name),)
        # assembled later: every kernel takes the inputs any of them uses (one argument list for all of them)
        return lambda: (f"@triton.jit\ndef {name}(\n    {self.signature(extra, consts)},\n):\n"
                        + "\n".join(prune("\n".join(pro + self.offsets() + body).split("\n"))) + "\n")


def first_value_tile(site: AccessSite) -> AccessSite:
    """A store of the scan that only its first value tile's programs make (the normaliser, the gate)."""
    return replace(site, axes=site.axes + ((VTILE, "vtile"),), conds=site.conds + (sp.Lt(VTILE, 1),))


def scan_state_sites(s) -> tuple:
    """The stores of _chunk_scan's exclusive prefix states (schedule s): S [.., D, e] by every value tile's
    programs, over their block of columns; zs [.., D] by the first value tile's."""
    c, e = s.col
    return (AccessSite("S", "S", (FEAT, c), ((FEAT, "feat"), (c, "col")), (sp.Lt(FEAT, NFEAT), sp.Lt(c, e))),
            first_value_tile(AccessSite("zs", "zs", (FEAT,), ((FEAT, "feat"),), (sp.Lt(FEAT, NFEAT),))))


def _safe(text: str) -> str:
    return "".join(ch if 32 <= ord(ch) < 127 else "?" for ch in text)[:80]


def generate_chunked(program: Program, lp: LinearPlan, dtype: str, nbatch: int) -> ChunkedSpec:
    """Source of the three chunked-form kernels, specialised to a dtype and the number of batch axes."""
    return _Chunked(program, lp, dtype, nbatch).kernels()


__all__ = ["ChunkedSpec", "generate_chunked"]
