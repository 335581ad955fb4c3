"""Triton kernels of the chunked-state (linear) form: chunk states, exclusive prefix over chunks, output.

Derived from a LinearPlan (moa/linear.py). Three kernels, each with the grid's last axis over batch x leading
axes (decoded like the quadratic kernel's):
  _chunk_state  grid (T, cdiv(D, BLOCK_F), Z): dS_c[f, :] = sum_{j in c} e^(gb_b - gb_j) phi(B_j)_f v_j,
                dz_c[f] likewise with v = 1 (b = the chunk's last row); phi(x)_f = w_f prod_t x[idx[f, t]]
  _chunk_scan   grid (cdiv(D, BLOCK_F), Z): in place, S_c <- exclusive prefix with decays e^(gb_b' - gb_b)
  _chunk_out    grid (T, Z): O_i = (e^(ga_i - gb_b) phi(A_i) . S_c + intra_i) / (same with z), 0 if 0
States are [Z, T, D, e] in the accumulator dtype: the only arrays beyond inputs and outputs, O(n D e / C).
"""
from __future__ import annotations

from dataclasses import dataclass

from moa.linear import LinearPlan
from moa.program import Program

from .emit import HELPERS, Emitter, _Scope


@dataclass(frozen=True)
class ChunkedSpec:
    source: str
    inputs: tuple      # input names in signature order
    dims: tuple
    nbatch: int
    lead: tuple


class _Chunked:
    def __init__(self, program: Program, lp: LinearPlan, dtype: str, nbatch: int):
        self.p, self.lp = program, lp
        self.s = lp.schedule
        self.em = Emitter(program, self.s, dtype)
        self.acc = self.em.acc
        self.nbatch = nbatch
        self.dot_kw = ', input_precision="ieee"' if dtype in ("float32", "float16", "bfloat16") else ""

    def emit(self, e, vmap, lines, indent="    ") -> str:
        # a fresh scope per call: the same expression under different index maps must not be shared
        return self.em.emit(e, vmap, _Scope(lines, indent))

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
        br = self.lp.branch
        lines.append("    fw = tl.load(fw_ptr + offs_f, mask=f_ok, other=0.0)")
        factors = []
        for t in range(self.lp.p):
            lines.append(f"    fidx{t} = tl.load(fidx_ptr + offs_f * {self.lp.p} + {t}, mask=f_ok, other=0)")
            factors.append(self.emit(expr, {var: f"{rows}[:, None]", br.dot.var: f"fidx{t}[None, :]"}, lines))
        return "fw[None, :] * " + " * ".join(factors)

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

    def kernels(self) -> ChunkedSpec:
        s, br = self.s, self.lp.branch
        i, n = s.row
        c, e = s.col
        j = br.var
        n_c, e_c = self.ix(n), self.ix(e)
        st_args = ["S_ptr", "zs_ptr", "fidx_ptr", "fw_ptr", "n_feat", "n_chunks"]
        consts = ["CHUNK", "BLOCK_F", "HEAD_DIM", "HEAD_DIM_V"]
        states = ("    s_base = zl.to(tl.int64) * n_chunks * n_feat * HEAD_DIM_V\n"
                  "    z_base = zl.to(tl.int64) * n_chunks * n_feat")

        # ---- chunk states
        body = ["    t = tl.program_id(0)", "    ft = tl.program_id(1)"]
        pro = self.prologue(2)
        body += ["    offs_j = t * CHUNK + tl.arange(0, CHUNK)", "    offs_f = ft * BLOCK_F + tl.arange(0, BLOCK_F)",
                 "    offs_v = tl.arange(0, HEAD_DIM_V)", "    f_ok = offs_f < n_feat",
                 f"    row_ok = offs_j < {n_c}", f"    v_ok = offs_v < {e_c}"]
        phi = self.features(br.dot.b, j, "offs_j", body)
        body.append(f"    phi = tl.where(row_ok[:, None] & f_ok[None, :], {phi}, 0.0)")
        body.append(f"    last = tl.minimum(t * CHUNK + CHUNK, {n_c}) - 1  # b: the chunk's last row")
        gl = self.gate("b", j, "last", body)
        if gl is not None:
            gj = self.gate("b", j, "offs_j[:, None]", body)
            body.append(f"    phi = phi * tl.exp({gl} - {gj})  # e^(gb_b - gb_j) <= 1 for a cumulative log-gate")
        v = self.emit(br.value, {j: "offs_j[:, None]", c: "offs_v[None, :]"}, body)
        body.append(f"    v = tl.where(row_ok[:, None] & v_ok[None, :], {v}, 0.0)")
        body += [f"    dS = tl.dot(tl.trans(phi), v{self.dot_kw})", "    dz = tl.sum(phi, 0)", states,
                 "    tl.store(S_ptr + s_base + t * n_feat * HEAD_DIM_V + offs_f[:, None] * HEAD_DIM_V + "
                 "offs_v[None, :], dS, mask=f_ok[:, None] & v_ok[None, :])",
                 "    tl.store(zs_ptr + z_base + t * n_feat + offs_f, dz, mask=f_ok)"]
        k1 = self._fn("_chunk_state", pro, body, st_args, consts)

        # ---- exclusive prefix over chunks
        body = ["    ft = tl.program_id(0)"]
        pro = self.prologue(1)
        body += ["    offs_f = ft * BLOCK_F + tl.arange(0, BLOCK_F)", "    offs_v = tl.arange(0, HEAD_DIM_V)",
                 "    f_ok = offs_f < n_feat", f"    v_ok = offs_v < {e_c}", states,
                 f"    S = tl.zeros([BLOCK_F, HEAD_DIM_V], dtype={self.acc})",
                 f"    z = tl.zeros([BLOCK_F], dtype={self.acc})",
                 f"    g_prev = tl.zeros([1], dtype={self.acc})",
                 "    for t in range(0, n_chunks):",
                 "        s_ptrs = S_ptr + s_base + t * n_feat * HEAD_DIM_V + offs_f[:, None] * HEAD_DIM_V + "
                 "offs_v[None, :]",
                 "        dS = tl.load(s_ptrs, mask=f_ok[:, None] & v_ok[None, :], other=0.0)",
                 "        dz = tl.load(zs_ptr + z_base + t * n_feat + offs_f, mask=f_ok, other=0.0)",
                 "        tl.store(s_ptrs, S, mask=f_ok[:, None] & v_ok[None, :])  # state before chunk t",
                 "        tl.store(zs_ptr + z_base + t * n_feat + offs_f, z, mask=f_ok)"]
        inner: list = []
        inner.append(f"    last = tl.minimum(t * CHUNK + CHUNK, {n_c}) - 1")
        gl = self.gate("b", j, "last", inner)
        body += ["    " + ln for ln in inner]
        if gl is not None:
            body += [f"        decay = tl.where(t > 0, tl.exp({gl} - g_prev), 1.0)",
                     "        S = S * decay + dS", "        z = z * decay + dz", f"        g_prev = {gl} + g_prev * 0"]
        else:
            body += ["        S = S + dS", "        z = z + dz"]
        k2 = self._fn("_chunk_scan", pro, body, st_args, consts)

        # ---- output
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
                 "offs_v[None, :], mask=f_ok[:, None] & v_ok[None, :], other=0.0)",
                 "        z = tl.load(zs_ptr + z_base + t * n_feat + offs_f, mask=f_ok, other=0.0)",
                 f"        num += tl.dot(phi, S{self.dot_kw})", "        den += tl.sum(phi * z[None, :], 1)"]
        ga = self.gate("a", i, "offs_i", body)
        if ga is not None:
            body.append("    ref = tl.maximum(t * CHUNK - 1, 0)  # b: the previous chunk's last row")
            gref = self.gate("b", j, "ref", body)
            body += [f"    scale = tl.where(t > 0, tl.exp({ga} - {gref}), 0.0)",
                     "    num = num * scale[:, None]", "    den = den * scale"]
        # intra-chunk quadratic part (the tiled kernel's score on the diagonal block)
        amap = {i: "offs_i[:, None]", br.dot.var: "offs_head_dim[None, :]"}
        bmap = {j: "offs_i[:, None]", br.dot.var: "offs_head_dim[None, :]"}
        qa = self.emit(br.dot.a, amap, body)
        kb = self.emit(br.dot.b, bmap, body)
        hd_ok = f"(offs_head_dim[None, :] < {self.ix(br.dot.extent)})"
        body += [f"    qa = tl.where(row_ok[:, None] & {hd_ok}, {qa}, 0.0)",
                 f"    kb = tl.where(row_ok[:, None] & {hd_ok}, {kb}, 0.0)",
                 f"    qk0 = tl.dot(qa, tl.trans(kb){self.dot_kw})"]
        w = self.emit(br.score, {i: "offs_i[:, None]", j: "offs_i[None, :]"}, body)
        body.append(f"    w = tl.where((offs_i[None, :] <= offs_i[:, None]) & row_ok[None, :], {w}, 0.0)")
        v = self.emit(br.value, {j: "offs_i[:, None]", c: "offs_v[None, :]"}, body)
        body += [f"    v = tl.where(row_ok[:, None] & v_ok[None, :], {v}, 0.0)",
                 f"    num += tl.dot(w, v{self.dot_kw})", "    den += tl.sum(w, 1)",
                 "    out = num / tl.where(den == 0, 1.0, den)[:, None]  # 0 where the normaliser is 0",
                 "    tl.store(out_ptr + zl.to(tl.int64) * stride_out_z + offs_i[:, None] * stride_out_0 + "
                 "offs_v[None, :] * stride_out_1, out.to(out_ptr.dtype.element_ty), "
                 "mask=row_ok[:, None] & v_ok[None, :])"]
        k3 = self._fn("_chunk_out", pro, body, st_args + ["out_ptr", "stride_out_z", "stride_out_0",
                                                          "stride_out_1"], consts)
        header = (f"# Generated by moa: the chunked-state (linear) form of {_safe(self.p.name)} output "
                  f"{s.output}, degree p = {self.lp.p}, {'gated' if self.lp.ga is not None else 'not gated'}.\n"
                  "# offs_j / offs_i = rows of a chunk; offs_f = feature indices of phi (D of them);\n"
                  "# S_ptr / zs_ptr = per-chunk states [Z, T, D, HEAD_DIM_V] and normalisers [Z, T, D].")
        src = f"{header}\nimport triton\nimport triton.language as tl\n{HELPERS}\n\n{k1()}\n\n{k2()}\n\n{k3()}"
        return ChunkedSpec(src, tuple(self.em.used_inputs), tuple(d.name for d in self.p.dims), self.nbatch,
                           tuple((v.name, x) for v, x in s.lead))

    def _fn(self, name, pro, body, extra, consts):
        # assembled later: every kernel takes the inputs any of them uses (one argument list for all three)
        return lambda: (f"@triton.jit\ndef {name}(\n    {self.signature(extra, consts)},\n):\n"
                        + "\n".join(pro + self.offsets() + body) + "\n")


def _safe(text: str) -> str:
    return "".join(ch if 32 <= ord(ch) < 127 else "?" for ch in text)[:80]


def generate_chunked(program: Program, lp: LinearPlan, dtype: str, nbatch: int) -> ChunkedSpec:
    """Source of the three chunked-form kernels, specialised to a dtype and the number of batch axes."""
    return _Chunked(program, lp, dtype, nbatch).kernels()


__all__ = ["ChunkedSpec", "generate_chunked"]
