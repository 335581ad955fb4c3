"""Fused backward kernels of the window-mixing schedule (moa/onf.py `Mix`, e.g. Blurry Window Attention).

The forward (codegen/window.py) computes, per row i, hop scores H[i, r] = g(i, r) A(i) . B(i, r) (A: the query
factor, B(i, r): the key row the hop reads, g: the guard), mixed scores M = H w^T over the slots j, the score
S = E(M) (masked), P = softmax_j(S), P2 = P w, and O_i = sum_r P2[i, r] g(i, r) X(i, r). Reverse mode, per row:

    dP2[i, r] = g(i, r) dO_i . X(i, r)          (r hops of the value rows)
    dP        = dP2 w^T                         (tl.dot)
    dS        = P (dP - delta_i),  delta_i = sum_j P dP = dO_i . O_i
    dM        = dS E'(M)                        (E': the sympy partial of the score by its mixed tile, grad_sym)
    dH        = g (dM w)                        (tl.dot; the weights enter linearly, no derivative of w is written)
    dA_i      = sum_r dH[i, r] B(i, r)          (r hops of the key rows again)
    dB(i, r)  = dH[i, r] A_i,   dX(i, r) = g(i, r) P2[i, r] dO_i

and each of dA, dB, dX times the sympy partial of its operand by the one input read it is computed from (plain reads
in bla: factor 1). P is recomputed from the row's W scores alone (all slots fit one register tile: one max, one sum),
so the forward stores nothing but O (no lse) and delta needs no O.

dB and dX scatter to key / value rows: hop r of row i reads key row t = i + h(r) (the read's row index, affine in i
with coefficient 1, h(r) = -r in bla), so key row t gathers dK[t] = sum_r dH[t - h(r), r] A_(t - h(r)) * partial.
A row tile of dK therefore needs dH of W rows past the tile. Two kernels, not one with a recomputed halo:

  _attn_window_bwd_dq    grid (cdiv(n, BLOCK_M), Z): recomputes H, P, P2, computes dP2, dS, dH, stores dQ and the
                         per-row scalars dH[i, r] and g P2[i, r] (two [Z, n, W] arrays in the accumulator dtype);
  _attn_window_bwd_dkdv  grid (cdiv(rows of K and V, BLOCK_N), Z): per hop r, gathers dH, P2 of rows t - h(r) with
                         their A and dO rows: dK and dV.

Bytes: the gradients pass between rows only through the scalars dH and P2, 2 n W accumulator values per head
(fp32, W = 16: 128 bytes a row written once and read once), against Q, K, V, dO read by the first kernel
(bf16, d = e = 64: 512 bytes a row) and Q, dO re-read by the second (256 bytes a row, its W-row halo mostly from
L2). A single kernel would recompute H, the softmax and dP2 for BLOCK + W - 1 rows per tile, i.e. pad to a
power-of-two tile of 2 x BLOCK rows (2x the row work), and storing dKh / dVh instead would be n W (d + e) values
(64x the bytes of dH and P2 at d = e = 64). The scatter is a gather: no atomics, deterministic on a GPU.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import sympy as sp

from moa import dnf as D
from moa.grad_sym import Translation
from moa.onf import MixTile, Schedule
from moa.program import Program
from moa.pullback import float_reads

from .backward_shape import is_multi, operand_read
from .exprs import AccessSite
from .tidy import helpers_for, prune
from .window import _Window

BUFFERS = ("dO", "dH", "P2", "dQ", "dK", "dV")   # the kernels' own pointer names (X_ptr): one argument list
CONSTS = ["BLOCK_M", "BLOCK_N", "HEAD_DIM", "HEAD_DIM_V", "W_PAD"]
KERNELS = ("_attn_window_bwd_dq", "_attn_window_bwd_dkdv")
T_ROW = sp.Symbol("t", integer=True, nonnegative=True)   # a row of K and V in the second kernel (offs_t)
OWN = {"a", "H", "h", "bk", "Wm", "s", "valid", "m_row", "l_row", "p", "P2", "do", "x", "dP2", "dp2", "dp", "ds",
       "dmix", "dH", "gr", "da", "dh", "dk", "dv", "p2", "r", "zl", "pid_z", "w_ext", "j_ext", "row_ok",
       "offs_m", "offs_t", "offs_w", "offs_v", "offs_head_dim", "offs_ik", "offs_iv", "ik_ok", "iv_ok", "ikc", "ivc",
       "start_m", "start_n", "do_t"}


@dataclass(frozen=True)
class WindowBackwardSpec:
    """The two kernels' source and what runtime/window_backward.py needs to launch them: the input names of the
    (shared) argument list, the Q (A), K (B) and V (X) reads, the extents of the buffers."""
    source: str
    inputs: tuple
    dims: tuple
    nbatch: int
    reads: dict        # role -> Read: "Q" (the query factor's), "K" (the hop key's), "V" (the value's)
    row_extent: sp.Expr
    dot_extent: sp.Expr
    col_extent: sp.Expr
    w_extent: sp.Expr      # max(hops, slots): the columns of dH and P2
    key_rows: sp.Expr      # rows of the K and V reads' inputs (their dK / dV buffers)
    value_rows: sp.Expr
    kernels: tuple = KERNELS
    sites: tuple = ()      # per kernel (name, loads, stores): AccessSite per tl.load / tl.store, for the cost model
    shifts: tuple = ()     # (h_K(r), h_V(r)): hop r of row i reads key row i + h_K(r), value row i + h_V(r)


def shifted_read(e, i, r, lane, tiles: set):
    """(read, h) when e is (an elementwise function of) one plain read X[..., i + h(r), lane] whose leading indices
    use no tile variable, h free of i; None otherwise."""
    reads = list(dict.fromkeys(x for x in D.nodes(e) if isinstance(x, D.Read)))
    if len(reads) != 1 or len(reads[0].index) < 2:
        return None
    row = sp.sympify(reads[0].index[-2])
    got = operand_read(e, (row, lane), tiles - {i, r})
    if got is None or any(sp.sympify(x).free_symbols & tiles for x in got.index[:-2]):
        return None
    h = sp.expand(row - i)
    if i in h.free_symbols or h.free_symbols & (tiles - {r}):
        return None
    return got, h


def _reads(e) -> set:
    return set(float_reads(e))


def window_unfused_reason(program: Program, sched: Schedule) -> str | None:
    """None when the window-mixing output has fused backward kernels, else why not."""
    if len(program.outputs) != 1:
        return "several outputs"
    if is_multi(sched):
        return "window mixing with several branches or an epilogue around the branch has no fused backward"
    b = sched.branches[0]
    mx = b.mix
    if mx is None or b.kind != "softmax":
        return "not a softmax window-mixing schedule"
    names = {n.attrs[0] for n in program.inputs}
    if names & set(BUFFERS) or any(n.startswith("grad_") for n in names):
        return f"an input is named like a buffer of the backward kernels ({', '.join(BUFFERS)}, grad_*)"
    (i, n), (c, e) = sched.row, sched.col
    r, k, j = mx.var, mx.kvar, b.var
    tiles = {i, c, j, r, k}
    qa = operand_read(mx.a, (i, k), tiles - {i, k})
    if qa is None or any(sp.sympify(x).free_symbols & tiles for x in qa.index[:-2]):
        return "the query factor of the hop dot products is not (a function of) a plain read Q[..., i, k]"
    kb, xv = shifted_read(mx.b, i, r, k, tiles), shifted_read(mx.x, i, r, c, tiles)
    if kb is None or xv is None:
        return "a hop's key or value is not (a function of) a plain read X[..., i + h(r), lane]"
    qkv = {qa.name, kb[0].name, xv[0].name}
    if _reads(b.score) or _reads(mx.weight):
        return "the score or the mixing weights read float inputs (their gradients are not computed)"
    if (_reads(b.mask) | _reads(mx.guard)) & qkv:
        return "the mask or the hop guard reads Q, K or V"
    shapes = program.input_map
    for rd, ext in ((qa, mx.kext), (kb[0], mx.kext), (xv[0], e)):
        if sp.simplify(shapes[rd.name].shape[-1] - ext) != 0:
            return f"the last axis of {rd.name} is not the extent {ext} its read ranges over"
    if sp.simplify(shapes[qa.name].shape[-2] - n) != 0:
        return f"the rows of {qa.name} are not the output's rows"
    return None


class _WindowBackward(_Window):
    """The two kernels of one window schedule (one Emitter: the kernels share one argument list)."""

    # access sites: the second kernel's rows t of K and V, and the rows i gathered for the key and the value
    SITE_AXES = {**_Window.SITE_AXES, "offs_t": "trow", "ikc": "krow", "ivc": "vrow"}

    def __init__(self, program: Program, sched: Schedule, dtype: str, nbatch: int):
        super().__init__(program, sched, dtype, nbatch)
        self.em.taken |= OWN
        self.sites: list = []
        b = sched.branches[0]
        mx = b.mix
        i, c = sched.row[0], sched.col[0]
        tiles = {i, c, b.var, mx.var, mx.kvar}
        self.qread = operand_read(mx.a, (i, mx.kvar), tiles - {i, mx.kvar})
        self.kread, self.hk = shifted_read(mx.b, i, mx.var, mx.kvar, tiles)
        self.vread, self.hv = shifted_read(mx.x, i, mx.var, c, tiles)

    def chain(self, acc: str, operand, read, vmap: dict, lines: list, at=None) -> None:
        """acc *= d operand / d read (its sympy partial), for an operand computed from its read (elu(Q) + 1); `at`:
        the read as the partial reads it (a key row t in place of i + h(r): the operand is a function of the read's
        value alone, so the partial is one per gathered row, outside the hop loop)."""
        if operand is read:
            return
        t = Translation(operand)
        sym = next(s for s, leaf in t.leaves.items() if leaf == read)
        d = t.to_dnf(t.partial(sym), {read: at} if at is not None else None)
        lines.append(f"    {acc} = {acc} * {self.em._float(self.emit(d, vmap, lines), d)}")

    def buffer(self, name: str, rows: str, lane: str, row_ok: str, lane_ok: str) -> tuple:
        """(address, mask) of a [Z, rows, lanes] buffer's tile (rows, lanes: tile codes)."""
        return (f"{name}_ptr + zl.to(tl.int64) * stride_{name}_z + {rows} * stride_{name}_0 + {lane} * "
                f"stride_{name}_1", f"{row_ok} & {lane_ok}")

    def dq_kernel(self):
        s = self.s
        b = s.branches[0]
        mx = b.mix
        i, n = s.row
        c, e = s.col
        j, r, kv = b.var, mx.var, mx.kvar
        e_c = self.ix(e)
        hd_ok = f"(offs_head_dim[None, :] < {self.ix(mx.kext)})"
        v_ok = f"(offs_v[None, :] < {e_c})"
        rows, smap = {i: "offs_m[:, None]", kv: "offs_head_dim[None, :]"}, {i: "offs_m[:, None]", j: "offs_w[None, :]"}
        first = len(self.em.loads)
        body = ["    start_m = tl.program_id(0)"]
        pro = self.prologue(1)
        valid, score = self.mixed_scores(body)   # the forward's hop scores and mixed scores M
        body += [f"    valid = {valid}", f"    s = tl.where(valid, {score}, float(\"-inf\"))",
                 "    m_row = tl.max(s, 1)",
                 "    m_row = tl.where(m_row == float(\"-inf\"), 0.0, m_row)  # a row without an admissible slot",
                 "    p = tl.exp(s - m_row[:, None])", "    l_row = tl.sum(p, 1)",
                 "    p = p / tl.where(l_row == 0.0, 1.0, l_row)[:, None]  # P: all W slots in one tile",
                 f"    P2 = tl.dot(p, Wm{self.dot_kw})  # sum_j P[i, j] w[j, r]"]
        do_at, do_mask = self.buffer("dO", "offs_m[:, None]", "offs_v[None, :]", "row_ok[:, None]", v_ok)
        body += [f"    do = tl.load({do_at}, mask={do_mask}, other=0.0).to({self.acc})",
                 f"    dP2 = tl.zeros([BLOCK_M, W_PAD], dtype={self.acc})"]
        inner = []
        x = self.emit(mx.x, {i: "offs_m[:, None]", r: "r", c: "offs_v[None, :]"}, inner)
        inner.append(f"    x = tl.where(row_ok[:, None] & {v_ok}, {x}, 0.0)")
        if mx.guard is not None:
            inner.append(f"    x = tl.where({self.emit(mx.guard, {i: 'offs_m[:, None]', r: 'r'}, inner)}, x, 0.0)")
        inner += ["    dp2 = tl.sum(do * x, 1)", "    dP2 = tl.where(offs_w[None, :] == r, dp2[:, None], dP2)"]
        self.hops(body, inner)
        body += [f"    dp = tl.dot(dP2, tl.trans(Wm){self.dot_kw})  # dP[i, j] = sum_r w[j, r] dP2[i, r]",
                 "    ds = p * (dp - tl.sum(p * dp, 1)[:, None])  # P (dP - delta), delta = dO . O"]
        t = Translation(b.score)
        leaf = next((s_ for s_, x_ in t.leaves.items() if isinstance(x_, MixTile)), None)
        d = t.to_dnf(t.partial(leaf)) if leaf is not None else D.Const(0.0)
        body += [f"    dmix = tl.where(valid, ds * {self.em._float(self._score(d, smap, body), d)}, 0.0)  # dS E'(M)",
                 f"    dH = tl.dot(dmix, Wm{self.dot_kw})  # sum_j dM[i, j] w[j, r]"]
        if mx.guard is not None:
            gr = self.emit(mx.guard, {i: "offs_m[:, None]", r: "offs_w[None, :]"}, body)
            body += [f"    gr = {gr}", "    dH = tl.where(gr, dH, 0.0)", "    P2 = tl.where(gr, P2, 0.0)"]
        body.append(f"    da = tl.zeros([BLOCK_M, HEAD_DIM], dtype={self.acc})")
        inner = []
        bb = self.emit(mx.b, {**rows, r: "r"}, inner)
        inner += [f"    bk = tl.where(row_ok[:, None] & {hd_ok}, {bb}, 0.0)",
                  "    dh = tl.sum(tl.where(offs_w[None, :] == r, dH, 0.0), 1)", "    da += dh[:, None] * bk"]
        self.hops(body, inner)
        self.chain("da", mx.a, self.qread, rows, body)
        for name, val, lane, ok in (("dQ", "da", "offs_head_dim[None, :]", hd_ok),
                                    ("dH", "dH", "offs_w[None, :]", "(offs_w[None, :] < w_ext)"),
                                    ("P2", "P2", "offs_w[None, :]", "(offs_w[None, :] < w_ext)")):
            at, mask = self.buffer(name, "offs_m[:, None]", lane, "row_ok[:, None]", ok)
            body.append(f"    tl.store({at}, {val}, mask={mask})")
        self.dq_sites(first)
        return self.assemble(KERNELS[0], pro, body)

    def dq_sites(self, first: int) -> None:
        """The first kernel's accesses: the emitter's loads, dO's, and the stores of dQ, dH and P2."""
        s, mx = self.s, self.s.branches[0].mix
        (i, n), (c, e), r, kv = s.row, s.col, mx.var, mx.kvar
        rows, hops = sp.Lt(i, n, evaluate=False), sp.Lt(r, mx.extent, evaluate=False)
        slots = ((i, "row"), (r, "wslot"))
        self.em.loads.append(AccessSite("do", "dO", (i, c), ((i, "row"), (c, "col")), (rows, sp.Lt(c, e))))
        stores = (AccessSite("dQ", "dQ", (i, kv), ((i, "row"), (kv, "HEAD_DIM")), (rows, sp.Lt(kv, mx.kext))),
                  AccessSite("dH", "dH", (i, r), slots, (rows, hops)),
                  AccessSite("P2", "P2", (i, r), slots, (rows, hops)))
        self.sites.append((KERNELS[0], tuple(self.em.loads[first:]), stores))

    def gather(self, role: str, hop_shift, lines: list) -> tuple:
        """offs_i{role} = the rows i whose hop r reads row offs_t of the key (role k) or value (v) input, their
        validity (0 <= i < n) and a copy for addresses (n where invalid: every load of row i masks i < n)."""
        i = self.s.row[0]
        shift = self.em.idx(hop_shift, {self.s.branches[0].mix.var: "r"})
        n_c = self.ix(self.s.row[1])
        lines += [f"    offs_i{role} = offs_t - ({shift})  # i + h(r) = t",
                  f"    i{role}_ok = (offs_i{role} >= 0) & (offs_i{role} < {n_c})",
                  f"    i{role}c = tl.where(i{role}_ok, offs_i{role}, {n_c})  # rows out of range: n, masked"]
        return f"i{role}c", f"i{role}_ok", {i: f"i{role}c[:, None]"}

    def dkdv_kernel(self):
        s = self.s
        b = s.branches[0]
        mx = b.mix
        c, e = s.col
        kv = mx.kvar
        e_c = self.ix(e)
        hd_ok = f"(offs_head_dim[None, :] < {self.ix(mx.kext)})"
        v_ok = f"(offs_v[None, :] < {e_c})"
        first = len(self.em.loads)
        body = ["    start_n = tl.program_id(0)"]
        pro = self.prologue(1)
        body += ["    offs_t = start_n * BLOCK_N + tl.arange(0, BLOCK_N)  # rows of K and V",
                 "    offs_head_dim = tl.arange(0, HEAD_DIM)", "    offs_v = tl.arange(0, HEAD_DIM_V)",
                 f"    w_ext = {self.ix(mx.extent)}  # window hops r < w_ext",
                 f"    dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype={self.acc})",
                 f"    dv = tl.zeros([BLOCK_N, HEAD_DIM_V], dtype={self.acc})"]
        inner: list = []
        ic, ok, imap = self.gather("k", self.hk, inner)
        a = self.emit(mx.a, {**imap, kv: "offs_head_dim[None, :]"}, inner)
        inner += [f"    a = tl.where({ok}[:, None] & {hd_ok}, {a}, 0.0)",
                  f"    dh = tl.load(dH_ptr + zl.to(tl.int64) * stride_dH_z + {ic} * stride_dH_0 + r * stride_dH_1, "
                  f"mask={ok}, other=0.0)", "    dk += dh[:, None] * a"]
        if sp.simplify(self.hv - self.hk) != 0:
            ic, ok, imap = self.gather("v", self.hv, inner)
        do_at, do_mask = self.buffer("dO", f"{ic}[:, None]", "offs_v[None, :]", f"{ok}[:, None]", v_ok)
        inner += [f"    do_t = tl.load({do_at}, mask={do_mask}, other=0.0).to({self.acc})",
                  f"    p2 = tl.load(P2_ptr + zl.to(tl.int64) * stride_P2_z + {ic} * stride_P2_0 + r * stride_P2_1, "
                  f"mask={ok}, other=0.0)", "    dv += p2[:, None] * do_t"]
        self.hops(body, inner)
        for acc, operand, rd, lane in (("dk", mx.b, self.kread, kv), ("dv", mx.x, self.vread, c)):
            at = D.Read(rd.name, (*rd.index[:-2], T_ROW, rd.index[-1]), rd.dtype)
            lanes = "offs_head_dim[None, :]" if lane == kv else "offs_v[None, :]"
            self.chain(acc, operand, rd, {T_ROW: "offs_t[:, None]", lane: lanes}, body, at)
        node_k, node_v = (self.p.input_map[x.name] for x in (self.kread, self.vread))
        for name, val, lane, rows, ok in (("dK", "dk", "offs_head_dim[None, :]", node_k.shape[-2], hd_ok),
                                          ("dV", "dv", "offs_v[None, :]", node_v.shape[-2], v_ok)):
            at, mask = self.buffer(name, "offs_t[:, None]", lane, f"(offs_t[:, None] < {self.ix(rows)})", ok)
            body.append(f"    tl.store({at}, {val}, mask={mask})")
        self.sites.append((KERNELS[1], self.gathered(first, ic), (
            AccessSite("dK", "dK", (T_ROW, kv), ((T_ROW, "trow"), (kv, "HEAD_DIM")),
                       (sp.Lt(T_ROW, node_k.shape[-2]), sp.Lt(kv, mx.kext))),
            AccessSite("dV", "dV", (T_ROW, c), ((T_ROW, "trow"), (c, "col")),
                       (sp.Lt(T_ROW, node_v.shape[-2]), sp.Lt(c, e))))))
        return self.assemble(KERNELS[1], pro, body)

    def gathered(self, first: int, ic: str) -> tuple:
        """The second kernel's loads: the emitter's, a gathered row i also masked by i >= 0 (its address is n when
        out of range), and the buffer loads written as text (dH and P2 at (i, r), dO at row i)."""
        s, mx = self.s, self.s.branches[0].mix
        (i, n), (c, e), r = s.row, s.col, mx.var
        out = []
        for site in self.em.loads[first:]:
            gather = [v for v, axis in site.axes if axis in ("krow", "vrow")]
            out.append(replace(site, conds=site.conds + tuple(sp.Ge(v, 0) for v in gather)))
        rows = (sp.Ge(i, 0), sp.Lt(i, n, evaluate=False))
        kax, vax = "krow", ("vrow" if ic == "ivc" else "krow")
        out += [AccessSite("dh", "dH", (i, r), ((i, kax), (r, "wr")), rows),
                AccessSite("do_t", "dO", (i, c), ((i, vax), (c, "col")), rows + (sp.Lt(c, e),)),
                AccessSite("p2", "P2", (i, r), ((i, vax), (r, "wr")), rows)]
        return tuple(out)

    def assemble(self, name: str, pro: list, body: list):
        """The kernel's text, once every kernel has been emitted (one argument list: the inputs any of them reads)."""
        extra = [a for x in BUFFERS for a in (f"{x}_ptr", f"stride_{x}_z", f"stride_{x}_0", f"stride_{x}_1")]
        return lambda: (f"@triton.jit\ndef {name}(\n    {self.signature(extra, CONSTS)},\n):\n"
                        + "\n".join(prune("\n".join(pro + self.offsets() + body).split("\n"))) + "\n")

    def spec(self) -> WindowBackwardSpec:
        s = self.s
        b = s.branches[0]
        fns = [self.dq_kernel(), self.dkdv_kernel()]
        code = "\n\n".join(f() for f in fns)
        name = "".join(ch if 32 <= ord(ch) < 127 else "?" for ch in self.p.name)[:80]
        header = (f"# Generated by moa: do not edit. Fused backward of the window-mixing output {s.output} of {name}.\n"
                  "# dH[i, r], P2[i, r]: per-row hop adjoints and mixed probabilities, passed from the first kernel "
                  "to the second.")
        helpers = helpers_for(code)
        src = f"{header}\nimport triton\nimport triton.language as tl\n\n\n" + \
            (f"{helpers}\n\n\n" if helpers else "") + code
        key_rows, value_rows = (self.p.input_map[x.name].shape[-2] for x in (self.kread, self.vread))
        return WindowBackwardSpec(src, tuple(self.em.used_inputs), tuple(d.name for d in self.p.dims), self.nbatch,
                                  {"Q": self.qread, "K": self.kread, "V": self.vread}, s.row[1], b.mix.kext,
                                  s.col[1], sp.Max(b.mix.extent, b.extent), key_rows, value_rows, KERNELS,
                                  tuple(self.sites), (self.hk, self.hv))


def generate_window_backward(program: Program, sched: Schedule, dtype: str, nbatch: int) -> WindowBackwardSpec:
    """The two fused backward kernels of a window schedule `window_unfused_reason` accepts."""
    return _WindowBackward(program, sched, dtype, nbatch).spec()


__all__ = ["WindowBackwardSpec", "generate_window_backward", "shifted_read", "window_unfused_reason"]
