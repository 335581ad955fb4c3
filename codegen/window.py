"""Triton kernel of the window-mixing schedule (moa/onf.py `Mix`), e.g. Blurry Window Attention.

For a query tile: H[i, r] = g(i, r) A_i . B_(i, r) by W hops (row dot products, one key row per query row),
S = E(H w^T) over the slots j, P = softmax_j(S) (one tile: the W slots fit), P2 = P w, and
O_i = sum_r P2[i, r] g(i, r) X(i, r, :) by W hops again. O(n W (d + e) + n W^2) work; nothing is stored but O.
"""
from __future__ import annotations

from dataclasses import dataclass

import sympy as sp

from moa.onf import DotTile, MixTile, Schedule
from moa.program import Program

from moa import dnf as D

from .chunked import _Chunked
from .exprs import AccessSite
from .monoid import Monoid
from .scope import Scope
from .tidy import helpers_for


@dataclass(frozen=True)
class WindowSpec:
    source: str
    inputs: tuple
    dims: tuple
    nbatch: int
    loads: tuple = ()      # AccessSite per tl.load (codegen/exprs.py), for the cost model
    stores: tuple = ()


@dataclass(frozen=True)
class _Plan:
    schedule: Schedule
    ga = None
    gb = None


class _Window(_Chunked):
    # access sites: rows, head dims, value columns, slots j and the hop r (one value per loop iteration)
    SITE_AXES = {"offs_m": "row", "offs_head_dim": "HEAD_DIM", "offs_v": "col", "offs_w": "wslot", "r": "wr"}

    def __init__(self, program: Program, sched: Schedule, dtype: str, nbatch: int):
        super().__init__(program, _Plan(sched), dtype, nbatch)

    def kernel(self) -> WindowSpec:
        s = self.s
        b = s.branches[0]
        mx = b.mix
        i, n = s.row
        c, e = s.col
        j, r = b.var, mx.var
        n_c, e_c = self.ix(n), self.ix(e)
        hd_ok = f"(offs_head_dim[None, :] < {self.ix(mx.kext)})"
        body = ["    start_m = tl.program_id(0)"]
        pro = self.prologue(1)
        body += ["    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)", "    offs_w = tl.arange(0, W_PAD)",
                 "    offs_head_dim = tl.arange(0, HEAD_DIM)", "    offs_v = tl.arange(0, HEAD_DIM_V)",
                 f"    row_ok = offs_m < {n_c}", f"    w_ext = {self.ix(mx.extent)}  # window hops r < w_ext",
                 f"    j_ext = {self.ix(b.extent)}  # slots j < j_ext"]
        a = self.emit(mx.a, {i: "offs_m[:, None]", mx.kvar: "offs_head_dim[None, :]"}, body)
        body += [f"    a = tl.where(row_ok[:, None] & {hd_ok}, {a}, 0.0)",
                 f"    H = tl.zeros([BLOCK_M, W_PAD], dtype={self.acc})",
                 "    for r in range(0, w_ext):  # hop r: row i meets key row i - r (one diagonal, no wasted pair)"]
        inner: list = []
        bb = self.emit(mx.b, {i: "offs_m[:, None]", r: "r", mx.kvar: "offs_head_dim[None, :]"}, inner)
        inner += [f"    bk = tl.where(row_ok[:, None] & {hd_ok}, {bb}, 0.0)", "    h = tl.sum(a * bk, 1)"]
        if mx.guard is not None:
            g = self.emit(mx.guard, {i: "offs_m", r: "r"}, inner)
            inner.append(f"    h = tl.where({g}, h, 0.0)")
        inner.append("    H = tl.where(offs_w[None, :] == r, h[:, None], H)")
        body += ["    " + ln for ln in inner]
        wm = self.emit(mx.weight, {j: "offs_w[:, None]", r: "offs_w[None, :]"}, body)
        body += [f"    Wm = tl.where((offs_w[:, None] < j_ext) & (offs_w[None, :] < w_ext), {wm}, 0.0)  # w[j, r]",
                 f"    qk{self.em.sfx(0)} = tl.dot(H, tl.trans(Wm){self.dot_kw})  # mixed scores [BLOCK_M, slots]"]
        smap = {i: "offs_m[:, None]", j: "offs_w[None, :]"}
        score = self._score(b.score, smap, body)
        valid = "(offs_w[None, :] < j_ext)"
        if b.mask is not None:
            valid = f"{self.emit(b.mask, smap, body)} & {valid}"
        body.append(f"    s = tl.where({valid}, {score}, float(\"-inf\"))")
        mo = Monoid("softmax", "", self.acc)   # one tile of slots: one step of the online softmax
        scope = Scope(body, "    ")
        mo.init(scope, "W_PAD")
        mo.update(scope, "s", lambda p: f"tl.dot({p}, Wm{self.dot_kw})")
        mo.finish(scope, "P2")   # [BLOCK_M, r]: sum_j p[i, j] w[j, r], 0 for rows with no admissible slot
        body += [f"    o = tl.zeros([BLOCK_M, HEAD_DIM_V], dtype={self.acc})", "    for r in range(0, w_ext):"]
        inner = []
        x = self.emit(mx.x, {i: "offs_m[:, None]", r: "r", c: "offs_v[None, :]"}, inner)
        inner.append(f"    x = tl.where(row_ok[:, None] & (offs_v[None, :] < {e_c}), {x}, 0.0)")
        if mx.guard is not None:
            g = self.emit(mx.guard, {i: "offs_m[:, None]", r: "r"}, inner)
            inner.append(f"    x = tl.where({g}, x, 0.0)")
        inner += ["    pr = tl.sum(tl.where(offs_w[None, :] == r, P2, 0.0), 1)", "    o += pr[:, None] * x"]
        body += ["    " + ln for ln in inner]
        body.append(f"    tl.store(out_ptr + zl.to(tl.int64) * stride_out_z + offs_m[:, None] * stride_out_0 + "
                    f"offs_v[None, :] * stride_out_1, o.to(out_ptr.dtype.element_ty), "
                    f"mask=row_ok[:, None] & (offs_v[None, :] < {e_c}))")
        fn = self._fn("_attn_window", pro, body, ["out_ptr", "stride_out_z", "stride_out_0", "stride_out_1"],
                      ["BLOCK_M", "HEAD_DIM", "HEAD_DIM_V", "W_PAD"])
        header = (f"# Generated by moa: window-mixing schedule of output {s.output} (hops r < W, slots j < W).\n"
                  "# a = query factor tile; H[i, r] = hop dot products; Wm[j, r] = mixing weights; P2 = P Wm.")
        fn_text = fn()
        src = f"{header}\nimport triton\nimport triton.language as tl\n\n\n{helpers_for(fn_text)}\n\n\n{fn_text}"
        out = AccessSite("out", "out", (i, c), ((i, "row"), (c, "col")),
                         (sp.Lt(i, n, evaluate=False), sp.Lt(c, e, evaluate=False)))
        return WindowSpec(src, tuple(self.em.used_inputs), tuple(d.name for d in self.p.dims), self.nbatch,
                          tuple(self.em.loads), (out,))

    def _score(self, e, smap, body) -> str:
        """The score with its MixTile placeholder bound to the mixed tile (emitted as the score tile qk)."""
        def put(x):
            if isinstance(x, MixTile):
                return DotTile(x.branch)
            kids = D.children(x)
            return D.with_children(x, [put(y) for y in kids]) if kids else x

        return self.emit(put(e), smap, body)


def generate_window(program: Program, sched: Schedule, dtype: str, nbatch: int) -> WindowSpec:
    return _Window(program, sched, dtype, nbatch).kernel()
