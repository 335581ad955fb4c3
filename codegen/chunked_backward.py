"""Backward of the chunked-state (linear) form: a reverse chunked scan of states (Triton text).

For one output of a LinearPlan (moa/linear.py), rows i and keys j of one axis, chunks of C rows:

  O_i = num_i / Z_i,  num_i = sum_{j <= i} w_ij v_j,  Z_i = sum_{j <= i} w_ij,
  w_ij = (phi(A_i) . phi(B_j)) e^(ga_i - gb_j)   (the gate optional; A = dot.a over (i, k), B = dot.b over (j, k)).

Identities (each checked in float64 against torch.autograd through the reference, tests/test_linear_backward.py):

  normalise     with delta_i = dO_i . O_i:  dnum_i = dO_i / Z_i,  dZ_i = -delta_i / Z_i  (0 where Z_i = 0, as the
                forward's O). With v'_j = [v_j, 1] and dy_i = [dnum_i, dZ_i] the loss is sum_{j <= i} w_ij g_ij,
                g_ij = dy_i . v'_j = dnum_i . v_j + dZ_i  (the quadratic backward's (dP_ij - delta_i) / Z_i).
  query side    dphiA_i = sum_{j <= i} e^(ga_i - gb_j) g_ij phi(B_j)
                        = e^(ga_i - gb_b(c)) (S_c dnum_i + z_c dZ_i) + intra_i,
                S_c, z_c: the forward's exclusive prefix states (moa/linear.py causal-chunked), c = i // C.
  key side      dphiB_j = sum_{i >= j} e^(ga_i - gb_j) g_ij phi(A_i) = e^(ga_r - gb_j) (U_c v_j + u_c) + intra_j,
                dv_j    = sum_{i >= j} w_ij dnum_i = e^(ga_r - gb_j) U_c^T phi(B_j) + intra_j,
                with the exclusive SUFFIX states (chunks after c, relative to ga at r = r(c) = (c + 1) C)
                U_c = sum_{i >= r} e^(ga_i - ga_r) phi(A_i) dnum_i^T  [D, e],  u_c the same with dZ_i  [D],
                U_{c-1} = e^(ga_r(c) - ga_r(c-1)) U_c + dU_c,  dU_c = sum_{i in c} e^(ga_i - ga_{cC}) phi(A_i) dy_i^T
                (the gate-split rule run backwards: every factor <= 1 for a cumulative log-gate).
  intra-chunk   the pairs j <= i of one chunk in the contraction space, as the quadratic backward: ds_ij = g_ij
                d score / d qk_ij (the sympy partial, moa/grad_sym.py), dA_i += sum_j ds_ij B_j, dB_j += sum_i ds_ij
                A_i, dv_j += sum_i w_ij dnum_i.
  gates         dw_ij / dga_i = w_ij, dw_ij / dgb_j = -w_ij:  dga_i = sum_j w_ij g_ij = phi(A_i) . dphiA_i (the
                state part; the intra part directly), dgb_j = -phi(B_j) . dphiB_j; then each float read X of ga
                (gb) gets dga_i (dgb_j) times its sympy partial, by atomic adds at the read's index (G of gated power
                attention gets both).
  features      phi_f(x) = w_f prod_t x_idx[f, t] (moa/linear.py feature_table): dx_m = sum_f sum_t dphi_f w_f
                prod_{t' != t} x_idx[f, t'] [idx[f, t] = m], the gather's adjoint written as p dots with the one-hot
                matrices [idx[f, t] = m] (BLOCK_F x HEAD_DIM); then dRead = dx d(operand)/d(read), the sympy partial
                of an elementwise operand (elu(Q) + 1).

Kernels (one module with the forward's two, whose _chunk_out also stores Z per row: the training forward):
  _bwd_scan   grid (cdiv(D, BLOCK_F), cdiv(HEAD_DIM_V, BLOCK_V), Z): over the chunks in reverse order, each
              chunk's dU_c, du_c (relative to ga at its first row) and the exclusive suffix, stored per chunk
              (a BLOCK_F x BLOCK_V block of U per program, as the forward's scan; u by the first value tile)
  _bwd_dk     grid (T, Z): dK of the chunk's keys (then its read), and gb's reads
  _bwd_dv     grid (T, Z): dV of the chunk's keys (apart from _bwd_dk: one [CHUNK, d] accumulator each)
  _bwd_dq     grid (T, Z): dQ of the chunk's rows from the forward's prefix states, and ga's reads

Saved and recomputed: the forward stores Z per row (as the quadratic form's saved normaliser, the same slot and
shape); the prefix states S, z are recomputed by the forward's _chunk_scan in the backward rather
than stored: they are O(n D e / C) in the accumulator dtype (p = 2, d = e = 64, C = 64: 2080 x 64 x 4 B = 530 KB per
chunk of 64 rows, 16x the size of those rows' K and V together in fp32), cost one state pass to recompute, and storing
them would make the operator's saved values depend on the form.
"""
from __future__ import annotations

from dataclasses import dataclass

import sympy as sp

from moa import dnf as D
from moa.grad_sym import Translation, partials
from moa.linear import LinearPlan
from moa.onf import DotTile
from moa.program import Program

from .backward_shape import operand_read
from .chunked import ChunkedSpec, _Chunked
from .exprs import joined_mask

BACKWARD_KERNELS = ("_bwd_scan", "_bwd_dk", "_bwd_dv", "_bwd_dq")
BUFFERS = frozenset({"dn", "dz", "U", "uz", "dQ", "dK", "dV", "zrow", "S", "zs", "fidx", "fw", "S0", "z0", "g0", "out"})


@dataclass(frozen=True)
class ChunkedBackwardSpec(ChunkedSpec):
    reads: dict = None     # role -> the Read of Q (dot.a), K (dot.b), V (value)
    scatters: tuple = ()   # inputs the gates read: their gradients by atomic adds (grad_X buffers)


def linear_backward_reason(program: Program, lp: LinearPlan) -> str | None:
    """None when the chunked backward applies to the output, else why not (the quadratic backward runs)."""
    s, b = lp.schedule, lp.branch
    if len(program.outputs) != 1:
        return "several outputs"
    i, c, j, kv = s.row[0], s.col[0], b.var, b.dot.var
    tiles = {i, c, j, kv}
    qa, kb = operand_read(b.dot.a, (i, kv), tiles), operand_read(b.dot.b, (j, kv), tiles)
    if qa is None or kb is None or operand_read(b.value, (j, c), tiles) is not b.value:
        return "the contraction operands or the value are not (functions of) plain reads of inputs"
    names = {n.attrs[0] for n in program.inputs}
    if names & BUFFERS or any(n.startswith("grad_") for n in names):
        return f"an input is named like a buffer of the backward kernels ({', '.join(sorted(BUFFERS))}, grad_*)"
    for g in (lp.ga, lp.gb):
        for leaf in (Translation(g).leaves.values() if g is not None else ()):
            if isinstance(leaf, D.Read) and leaf.name in {qa.name, kb.name, b.value.name}:
                return "a gate reads Q, K or V"
            if not isinstance(leaf, (D.Read, D.Index, D.Const)):
                return "a gate is not an elementwise expression of reads"
    return None


class _ChunkedBackward(_Chunked):
    """The forward's emitter (its helpers, inputs and sites) with the four backward kernels."""

    def __init__(self, program: Program, lp: LinearPlan, dtype: str, nbatch: int):
        super().__init__(program, lp, dtype, nbatch)
        self.store_z = True
        self.dot16, self.direct = None, False   # the training forward and the backward: fp32 / tf32 dots, the table
        s, b = self.s, lp.branch
        i, c, j, kv = s.row[0], s.col[0], b.var, b.dot.var
        tiles = {i, c, j, kv}
        self.reads = {"Q": operand_read(b.dot.a, (i, kv), tiles), "K": operand_read(b.dot.b, (j, kv), tiles),
                      "V": b.value}
        self.gate_partials = {w: (partials(g, lambda x: isinstance(x, D.Read)) if g is not None else {})
                              for w, g in (("a", lp.ga), ("b", lp.gb))}
        self.scatters = tuple(dict.fromkeys(r.name for d in self.gate_partials.values() for r in d))

    def spec(self) -> ChunkedBackwardSpec:
        base = self.kernels((self._bscan_kernel, self._dk_kernel, self._dv_kernel,
                             self._dq_kernel))
        return ChunkedBackwardSpec(base.source, base.inputs, base.dims, base.nbatch, base.lead, base.sites,
                                   self.reads, self.scatters)

    # ---- shared pieces ------------------------------------------------------------------------------------------
    def _args(self, st_args) -> list:
        out = st_args + ["dn_ptr", "dz_ptr", "U_ptr", "uz_ptr", "dQ_ptr", "dK_ptr", "dV_ptr"]
        for x in self.scatters:   # grad_X: batch + the input's shape
            out.append(f"grad_{x}_ptr")
            out += [f"stride_grad_{x}_z{z}" for z in range(self.nbatch)]
            out += [f"stride_grad_{x}_{k}" for k in range(self.p.input_map[x].rank)]
        return out

    def _dy(self, rows: str, n_c: str, e_c: str, lines: list, indent: str = "    ") -> None:
        """dn [CHUNK, HEAD_DIM_V] = dO / Z and dz [CHUNK] = -delta / Z of rows `rows` (runtime buffers, contiguous)."""
        lines.append(f"{indent}dn = tl.load(dn_ptr + zl.to(tl.int64) * ({n_c}) * ({e_c}) + {rows}[:, None] * ({e_c}) "
                     f"+ offs_v[None, :], mask=({rows}[:, None] < {n_c}) & v_ok[None, :], other=0.0)")
        lines.append(f"{indent}dz = tl.load(dz_ptr + zl.to(tl.int64) * ({n_c}) + {rows}, mask={rows} < {n_c}, "
                     "other=0.0)")

    def _scatter_features(self, dphi: str, factors: list, acc: str, lines: list) -> None:
        """acc [rows, HEAD_DIM] += the adjoint of the gather x -> phi(x) applied to dphi [rows, BLOCK_F]."""
        for t in range(self.lp.p):
            g = " * ".join([dphi, "fw[None, :]", *(f for u, f in enumerate(factors) if u != t)])
            lines.append(f"    {acc} += tl.dot({g}, (fidx{t}[:, None] == offs_head_dim[None, :]).to({self.acc})"
                         f"{self.dot_kw})")

    def _gate_scatter(self, which: str, var, rows: str, adj: str, n_c: str, lines: list) -> None:
        """grad_X[index of each float read X of ga (gb)] += adj * d ga / d X, rows `rows` (atomic adds)."""
        for r, d in self.gate_partials[which].items():
            vmap = {var: rows}
            dcode = self.em._float(self.emit(d, vmap, lines), d)
            node, g = self.p.input_map[r.name], f"grad_{r.name}"
            parts, masks, scalar = [f"{g}_ptr + off_{g}"], [f"({rows} < {n_c})"], []
            for k, (ix, ext) in enumerate(zip(r.index, node.shape)):
                ix = sp.sympify(ix)
                code = self.em.idx(ix, vmap)
                parts.append(f"({code}) * stride_{g}_{k}")
                lo_ok, hi_ok = self.em._in_range(ix, ext, vmap)
                sink = masks if var in ix.free_symbols else scalar   # a head index's test is a scalar
                sink += ([] if hi_ok else [f"({code} < {self.ix(ext)})"]) + ([] if lo_ok else [f"({code} >= 0)"])
            mask = joined_mask(list(dict.fromkeys(masks)), list(dict.fromkeys(scalar)))
            lines.append(f"    tl.atomic_add({' + '.join(parts)}, {adj} * {dcode}, mask={mask})")

    def _grad_offsets(self) -> list:
        out = []
        for x in self.scatters:
            terms = [f"off_z{b}.to(tl.int64) * stride_grad_{x}_z{b}" for b in range(self.nbatch)]
            out.append(f"    off_grad_{x} = {' + '.join(terms) if terms else '0'}")
        return out

    def _intra(self, rows: str, body: list) -> tuple:
        """The chunk's own pairs j <= i (rows `rows` are both): qa, kb, w [i, j], dsc = g masked, ds = dsc w'."""
        br, s = self.lp.branch, self.s
        i, j, kv = s.row[0], br.var, br.dot.var
        n_c = self.ix(s.row[1])
        qa = self.emit(br.dot.a, {i: f"{rows}[:, None]", kv: "offs_head_dim[None, :]"}, body)
        kb = self.emit(br.dot.b, {j: f"{rows}[:, None]", kv: "offs_head_dim[None, :]"}, body)
        hd_ok = f"(offs_head_dim[None, :] < {self.ix(br.dot.extent)})"
        body += [f"    qa = tl.where(row_ok[:, None] & {hd_ok}, {qa}, 0.0).to({self.acc})",
                 f"    kb = tl.where(row_ok[:, None] & {hd_ok}, {kb}, 0.0).to({self.acc})",
                 f"    qk{self.em.sfx(0)} = tl.dot(qa, tl.trans(kb){self.dot_kw})"]
        smap = {i: f"{rows}[:, None]", j: f"{rows}[None, :]"}
        w = self.emit(br.score, smap, body)
        body.append(f"    valid = ({rows}[None, :] <= {rows}[:, None]) & ({rows}[None, :] < {n_c}) & "
                    f"({rows}[:, None] < {n_c})")
        body.append(f"    w = tl.where(valid, {w}, 0.0)")
        t = Translation(br.score)
        sym = next(x for x, leaf in t.leaves.items() if leaf == DotTile(0))
        d = t.to_dnf(t.partial(sym))
        dw = self.em._float(self.emit(d, smap, body), d)
        body += [f"    g = tl.dot(dn, tl.trans(v){self.dot_kw}) + dz[:, None]  # g_ij = dnum_i . v_j + dZ_i",
                 "    dsc = tl.where(valid, g, 0.0)", f"    ds = tl.where(valid, dsc * {dw}, 0.0)"]
        return "qa", "kb"

    def _chain(self, acc: str, operand, read, var, rows: str, body: list) -> None:
        """acc *= d operand / d read (an elementwise operand of one read: elu(Q) + 1)."""
        if operand is read:
            return
        t = Translation(operand)
        sym = next(x for x, leaf in t.leaves.items() if leaf == read)
        d = t.to_dnf(t.partial(sym))
        vmap = {var: f"{rows}[:, None]", self.lp.branch.dot.var: "offs_head_dim[None, :]"}
        body.append(f"    {acc} = {acc} * {self.em._float(self.emit(d, vmap, body), d)}")

    def _store(self, buf: str, rows: str, cols: str, ext_c: str, acc: str, n_c: str) -> str:
        return (f"    tl.store({buf}_ptr + zl.to(tl.int64) * ({n_c}) * ({ext_c}) + {rows}[:, None] * ({ext_c}) + "
                f"{cols}[None, :], {acc}, mask=({rows}[:, None] < {n_c}) & ({cols}[None, :] < {ext_c}))")

    # ---- the kernels --------------------------------------------------------------------------------------------
    def _bscan_kernel(self):
        """_bwd_scan: each chunk's own suffix contribution dU_c, du_c (relative to ga at its first row), computed in
        the loop, and the exclusive suffix over the chunks, chunk order reversed: the states are written once."""
        br, i, n, c, e, j, n_c, e_c, st_args, consts, carried, states = self._common()
        pro, body = self.value_tiled("U", "u", e_c, states)
        inner = ["    t = n_chunks - 1 - tt", "    offs_i = t * CHUNK + tl.arange(0, CHUNK)",
                 f"    row_ok = offs_i < {n_c}"]
        factors = self.factors(br.dot.a, i, "offs_i", inner, table=body)
        inner.append(f"    phi = tl.where(row_ok[:, None] & f_ok[None, :], {self.weighted(factors)}, 0.0)")
        inner.append("    first = t * CHUNK  # the reference row of the chunk's suffix contribution")
        g0 = self.gate("a", i, "first", inner)
        if g0 is not None:
            gi = self.gate("a", i, "offs_i[:, None]", inner)
            inner.append(f"    phi = phi * tl.exp({gi} - {g0})  # e^(ga_i - ga_first) <= 1 for a cumulative log-gate")
        self._dy("offs_i", n_c, e_c, inner)
        inner += [f"    dU = tl.dot(tl.trans(phi), dn{self.dot_kw})", "    du = tl.sum(phi * dz[:, None], 0)",
                  "    tl.store(U_ptr + s_base + t * n_feat * HEAD_DIM_V + offs_f[:, None] * HEAD_DIM_V + "
                  "offs_v[None, :], U, mask=f_ok[:, None] & v_ok[None, :])  # chunks after t, ref. row (t+1) C",
                  "    tl.store(uz_ptr + z_base + t * n_feat + offs_f, u, mask=z_st)"]
        if g0 is not None:
            inner.append(f"    nxt = tl.minimum(t * CHUNK + CHUNK, {n_c} - 1)")
            g1 = self.gate("a", i, "nxt", inner)
            inner += [f"    decay = tl.exp({g1} - {g0})", "    U = U * decay + dU", "    u = u * decay + du"]
        else:
            inner += ["    U = U + dU", "    u = u + du"]
        body += ["    for tt in range(0, n_chunks):", *("    " + ln for ln in inner)]
        return self._fn("_bwd_scan", pro, body, self._args(st_args), consts)

    def _dk_kernel(self):
        return self._key_kernel("dk")

    def _dv_kernel(self):
        return self._key_kernel("dv")

    def _key_kernel(self, part: str):
        """_bwd_dk (part "dk": dK, then its read, and gb's reads) or _bwd_dv (dV) of one chunk's keys: the
        intra-chunk pairs (first: their operand tiles are dead before the state loop), then the suffix states. Two
        kernels: each holds one [CHUNK, head dim] accumulator."""
        br, i, n, c, e, j, n_c, e_c, st_args, consts, carried, states = self._common()
        dk = part == "dk"
        body = ["    t = tl.program_id(0)"]
        pro = self.prologue(1)
        body += self._grad_offsets() if dk else []
        body += ["    offs_j = t * CHUNK + tl.arange(0, CHUNK)", "    offs_v = tl.arange(0, HEAD_DIM_V)",
                 "    offs_head_dim = tl.arange(0, HEAD_DIM)", f"    row_ok = offs_j < {n_c}",
                 f"    v_ok = offs_v < {e_c}", states]
        self.value("offs_j", body)
        self._dy("offs_j", n_c, e_c, body)
        qa, _ = self._intra("offs_j", body)
        if dk:
            body += [f"    dkf = tl.dot(tl.trans(ds), {qa}{self.dot_kw})", "    dgb = -tl.sum(w * dsc, 0)"]
        else:
            body.append(f"    dv = tl.dot(tl.trans(w), dn{self.dot_kw})")
        scaled = self.lp.ga is not None
        if scaled:
            body.append(f"    nxt = tl.minimum(t * CHUNK + CHUNK, {n_c} - 1)  # r: the next chunk's first row")
            gr = self.gate("a", i, "nxt", body)
            gj = self.gate("b", j, "offs_j", body)
            body.append(f"    sc = tl.where(t + 1 < n_chunks, tl.exp({gr} - {gj}), 0.0)  # e^(ga_r - gb_j)")
        body += ["    for ft in range(0, tl.cdiv(n_feat, BLOCK_F)):",
                 "        offs_f = ft * BLOCK_F + tl.arange(0, BLOCK_F)", "        f_ok = offs_f < n_feat"]
        inner: list = []
        xs = self.factors(br.dot.b, j, "offs_j", inner)
        inner += [f"    phi = tl.where(row_ok[:, None] & f_ok[None, :], {self.weighted(xs)}, 0.0)",
                  "    U = tl.load(U_ptr + s_base + t * n_feat * HEAD_DIM_V + offs_f[:, None] * HEAD_DIM_V + "
                  "offs_v[None, :], mask=f_ok[:, None] & v_ok[None, :], other=0.0)"]
        if dk:
            inner += ["    u = tl.load(uz_ptr + z_base + t * n_feat + offs_f, mask=f_ok, other=0.0)",
                      f"    dphi = tl.dot(v, tl.trans(U){self.dot_kw}) + u[None, :]"]
            inner += ["    dphi = dphi * sc[:, None]"] if scaled else []
            inner.append("    dgb -= tl.sum(phi * dphi, 1)")
            self._scatter_features("dphi", xs, "dkf", inner)
        else:
            inner.append(f"    dv += tl.dot({'phi * sc[:, None]' if scaled else 'phi'}, U{self.dot_kw})")
        body += ["    " + ln for ln in inner]
        if dk:
            self._chain("dkf", br.dot.b, self.reads["K"], j, "offs_j", body)
            body.append(self._store("dK", "offs_j", "offs_head_dim", self.ix(br.dot.extent), "dkf", n_c))
            self._gate_scatter("b", j, "offs_j", "dgb", n_c, body)
        else:
            body.append(self._store("dV", "offs_j", "offs_v", e_c, "dv", n_c))
        return self._fn(f"_bwd_{part}", pro, body, self._args(st_args), consts)

    def _dq_kernel(self):
        """_bwd_dq: dQ of one chunk's rows (the intra-chunk pairs, then the forward's prefix states), ga's reads."""
        br, i, n, c, e, j, n_c, e_c, st_args, consts, carried, states = self._common()
        body = ["    t = tl.program_id(0)"]
        pro = self.prologue(1)
        body += self._grad_offsets()
        body += ["    offs_i = t * CHUNK + tl.arange(0, CHUNK)", "    offs_v = tl.arange(0, HEAD_DIM_V)",
                 "    offs_head_dim = tl.arange(0, HEAD_DIM)", f"    row_ok = offs_i < {n_c}",
                 f"    v_ok = offs_v < {e_c}", states]
        self._dy("offs_i", n_c, e_c, body)
        self.value("offs_i", body)
        _, kb = self._intra("offs_i", body)
        body += [f"    dqf = tl.dot(ds, {kb}{self.dot_kw})", "    dga = tl.sum(w * dsc, 1)"]
        scaled = self.lp.ga is not None
        if scaled:
            body.append("    ref = tl.maximum(t * CHUNK - 1, 0)  # b: the previous chunk's last row")
            gi = self.gate("a", i, "offs_i", body)
            gref = self.gate("b", j, "ref", body)
            body.append(f"    sc = tl.where(t > 0, tl.exp({gi} - {gref}), 0.0)  # e^(ga_i - gb_b)")
        body += ["    for ft in range(0, tl.cdiv(n_feat, BLOCK_F)):",
                 "        offs_f = ft * BLOCK_F + tl.arange(0, BLOCK_F)", "        f_ok = offs_f < n_feat"]
        inner: list = []
        xs = self.factors(br.dot.a, i, "offs_i", inner)
        inner += [f"    phi = tl.where(row_ok[:, None] & f_ok[None, :], {self.weighted(xs)}, 0.0)",
                  "    S = tl.load(S_ptr + s_base + t * n_feat * HEAD_DIM_V + offs_f[:, None] * HEAD_DIM_V + "
                  "offs_v[None, :], mask=f_ok[:, None] & v_ok[None, :], other=0.0)",
                  "    z = tl.load(zs_ptr + z_base + t * n_feat + offs_f, mask=f_ok, other=0.0)",
                  f"    dphi = tl.dot(dn, tl.trans(S){self.dot_kw}) + dz[:, None] * z[None, :]"]
        if scaled:
            inner.append("    dphi = dphi * sc[:, None]")
        inner.append("    dga += tl.sum(phi * dphi, 1)")
        self._scatter_features("dphi", xs, "dqf", inner)
        body += ["    " + ln for ln in inner]
        self._chain("dqf", br.dot.a, self.reads["Q"], i, "offs_i", body)
        body.append(self._store("dQ", "offs_i", "offs_head_dim", self.ix(br.dot.extent), "dqf", n_c))
        self._gate_scatter("a", i, "offs_i", "dga", n_c, body)
        return self._fn("_bwd_dq", pro, body, self._args(st_args), consts)


def generate_chunked_backward(program: Program, lp: LinearPlan, dtype: str, nbatch: int) -> ChunkedBackwardSpec:
    """One module: the forward's two kernels (_chunk_out also storing Z per row) and the four backward kernels."""
    return _ChunkedBackward(program, lp, dtype, nbatch).spec()


__all__ = ["BACKWARD_KERNELS", "ChunkedBackwardSpec", "generate_chunked_backward", "linear_backward_reason"]
