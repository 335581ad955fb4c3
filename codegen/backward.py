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

Programs outside this shape (several branches, a gate epilogue, normalised forms, window mixing, a computed dot
operand) have no fused backward: `unfused_reason` says why, and the runtime evaluates the gradient DNF instead.
"""
from __future__ import annotations

from dataclasses import dataclass

import sympy as sp

from moa import dnf as D
from moa import intervals as iv
from moa import ir
from moa.grad_sym import Translation
from moa.onf import TILED, BranchValue, DotTile, Schedule
from moa.program import Program

from .exprs import Emitter
from .printer import code as pcode
from .scope import Scope
from .tidy import helpers_for, prune

ROLES = ("Q", "K", "V")   # the operand roles: dot.a, dot.b, value


@dataclass(frozen=True)
class BackwardKernel:
    """One generated backward kernel: its function name and the inputs it reads, in signature order."""
    name: str
    inputs: tuple


@dataclass(frozen=True)
class BackwardSpec:
    """The two backward kernels of one output (one source), and what the runtime needs to launch them."""
    source: str
    kernels: tuple         # (dkdv, dq) BackwardKernel
    dims: tuple            # dim names in signature order
    nbatch: int
    head_dims: tuple       # ((constexpr name, extent expr), ...) padded to powers of two at launch
    reads: dict            # role -> the Read of Q (dot.a), K (dot.b), V (value)
    key_extent: sp.Expr
    row_extent: sp.Expr
    dot_extent: sp.Expr
    col_extent: sp.Expr


def _plain_read(e, last: tuple, tile_vars: set):
    """e is a read X[g(lead)..., last...] of a float input whose leading indices use no tile variable."""
    if not isinstance(e, D.Read) or e.dtype != ir.FLOAT or len(e.index) < len(last):
        return False
    tail = tuple(sp.sympify(x) for x in e.index[len(e.index) - len(last):])
    head = [sp.sympify(x) for x in e.index[:len(e.index) - len(last)]]
    return tail == tuple(last) and not any(x.free_symbols & tile_vars for x in head)


def unfused_reason(program: Program, sched: Schedule) -> str | None:
    """None when the output has fused backward kernels, else why not (in words)."""
    if len(program.outputs) != 1:
        return "several outputs"
    if len(sched.branches) != 1:
        return "several branches (a sum of softmaxes, as PiAttention) have no fused backward yet"
    b = sched.branches[0]
    if b.kind != "softmax":
        return "a normalised form (normalize) has no fused backward yet"
    if b.mix is not None:
        return "window mixing has no fused backward yet"
    if sched.epilogue != BranchValue(0):
        return "the output is not the softmax branch itself (an epilogue such as a gate)"
    if sched.kind != TILED or b.mode != TILED or b.dot is None or b.lift is not None:
        return "the branch is not a plain key-tile loop with a q . k contraction"
    i, c, j, kv = sched.row[0], sched.col[0], b.var, b.dot.var
    tiles = {i, c, j, kv}
    if not (_plain_read(b.dot.a, (i, kv), tiles) and _plain_read(b.dot.b, (j, kv), tiles)
            and _plain_read(b.value, (j, c), tiles)):
        return "the contraction operands or the value are not plain reads of inputs"
    qkv = {b.dot.a.name, b.dot.b.name, b.value.name}
    for part in (b.score, b.mask):
        if part is not None and any(isinstance(x, D.Read) and x.name in qkv for x in D.nodes(part)):
            return "the score or mask reads Q, K or V outside the contraction"
    return None


class _BackwardEmitter:
    """The two kernels of one schedule (a new Emitter per kernel: names and common sub-expressions are per kernel)."""

    def __init__(self, program: Program, sched: Schedule, dtype: str, nbatch: int):
        self.p, self.s, self.dtype, self.nbatch = program, sched, dtype, nbatch
        self.b = sched.branches[0]
        self.head_dims: dict = {}

    def _emitter(self) -> Emitter:
        x = Emitter(self.p, self.s, self.dtype)
        x.head_dims = self.head_dims    # shared: HEAD_DIM means the same extent in both kernels
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

    def _rows(self, scope: Scope, x: Emitter, q_offs: str) -> tuple:
        """Loads of one query tile's q, dO, lse and delta (rows offs_m)."""
        s, b = self.s, self.b
        n = x.idx(s.row[1], {})
        q = x.factor(b.dot.a, {s.row[0]: "offs_m[:, None]", b.dot.var: f"{q_offs}[None, :]"}, scope, "q",
                     f"(offs_m[:, None] < {n}) & ({q_offs}[None, :] < {x.idx(b.dot.extent, {})})")
        e = x.idx(s.col[1], {})
        scope.add(f"do = tl.load(dO_ptr + zz * stride_dO_z + offs_m[:, None] * stride_dO_0 + offs_v[None, :] * "
                  f"stride_dO_1, mask=(offs_m[:, None] < {n}) & (offs_v[None, :] < {e}), other=0.0)")
        scope.add(f"lse = tl.load(lse_ptr + zz * stride_lse_z + offs_m, mask=offs_m < {n}, other=0.0)")
        scope.add('lse = tl.where(lse == float("-inf"), 0.0, lse)  # rows without a key: every p is masked')
        scope.add(f"delta = tl.load(delta_ptr + zz * stride_delta_z + offs_m, mask=offs_m < {n}, other=0.0)")
        return q, "do"

    def _keys(self, scope: Scope, x: Emitter, k_offs: str) -> tuple:
        """Loads of one key tile's k and v (keys offs_n)."""
        s, b = self.s, self.b
        m = x.idx(b.extent, {})
        k = x.factor(b.dot.b, {b.var: "offs_n[:, None]", b.dot.var: f"{k_offs}[None, :]"}, scope, "k",
                     f"(offs_n[:, None] < {m}) & ({k_offs}[None, :] < {x.idx(b.dot.extent, {})})")
        v = x.factor(b.value, {b.var: "offs_n[:, None]", s.col[0]: "offs_v[None, :]"}, scope, "v",
                     f"(offs_n[:, None] < {m}) & (offs_v[None, :] < {x.idx(s.col[1], {})})")
        return k, v

    def _ds(self, scope: Scope, x: Emitter, q: str, k: str, v: str, do: str) -> None:
        """p and ds of one (query tile, key tile) pair: the score recomputed, p from lse, ds = p (dp - delta) f'."""
        s, b = self.s, self.b
        smap = {s.row[0]: "offs_m[:, None]", b.var: "offs_n[None, :]"}
        scope.add(f"qk = tl.dot({q}, tl.trans({k}){x.dot_kw()})")
        score = x.emit(b.score, smap, scope, role="score")
        valid = f"(offs_m[:, None] < {x.idx(s.row[1], {})}) & (offs_n[None, :] < {x.idx(b.extent, {})})"
        if b.mask is not None:
            valid = f"{x.emit(b.mask, smap, scope, role='mask')} & {valid}"
        scope.add(f"p = tl.where({valid}, tl.exp({x._float(score, b.score)} - lse[:, None]), 0.0)")
        scope.add(f"dp = tl.dot({do}, tl.trans({v}).to({do}.dtype){x.dot_kw()})")
        t = Translation(b.score)
        sym = next(sy for sy, leaf in t.leaves.items() if leaf == DotTile(0))
        d = t.to_dnf(t.partial(sym))
        dscore = x.emit(d, smap, scope, role="dscore")
        scope.add(f"ds = p * (dp - delta[:, None]) * {x._float(dscore, d)}")

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
        body.add(f"dk = tl.zeros([BLOCK_N, {x.head_dim(b.dot.extent)}], dtype={x.acc})")
        body.add(f"dv = tl.zeros([BLOCK_N, HEAD_DIM_V], dtype={x.acc})")
        loop = body.open(f"for start_m in range(0, {x.idx(s.row[1], {})}, BLOCK_M):")
        loop.add("offs_m = start_m + tl.arange(0, BLOCK_M)")
        loop.add("row_lo = start_m  # I_LO")
        loop.add(f"row_hi = tl.minimum(start_m + BLOCK_M, {x.idx(s.row[1], {})}) - 1  # I_HI")
        inner = loop.open(f"if {self._code(b.skip, x)} == 0:") if b.skip is not sp.false else loop
        q, do = self._rows(inner, x, offs)
        self._ds(inner, x, q, k, v, do)
        inner.add(f"dv += tl.dot(tl.trans(p).to({do}.dtype), {do}{x.dot_kw()})")
        inner.add(f"dk += tl.dot(tl.trans(ds).to({q}.dtype), {q}{x.dot_kw()})")
        d = x.idx(b.dot.extent, {})
        body.add(f"tl.store(dK_ptr + zz * stride_dK_z + offs_n[:, None] * stride_dK_0 + {offs}[None, :] * "
                 f"stride_dK_1, dk, mask=(offs_n[:, None] < {m}) & ({offs}[None, :] < {d}))")
        body.add(f"tl.store(dV_ptr + zz * stride_dV_z + offs_n[:, None] * stride_dV_0 + offs_v[None, :] * "
                 f"stride_dV_1, dv, mask=(offs_n[:, None] < {m}) & (offs_v[None, :] < {x.idx(s.col[1], {})}))")
        return self._function("_attn_bwd_dkdv", body, x, ("dK", "dV"))

    def dq(self) -> tuple:
        """`_attn_bwd_dq`: one program per query tile; dQ accumulated over the key tiles the forward visits."""
        s, b = self.s, self.b
        x = self._emitter()
        body = Scope([], "    ")
        self._prologue(body, x, "start_m")
        offs = x.head_offsets(b.dot.extent, body)
        n, m = x.idx(s.row[1], {}), x.idx(b.extent, {})
        body.add("offs_m = start_m + tl.arange(0, BLOCK_M)")
        body.add("row_lo = start_m  # I_LO")
        body.add(f"row_hi = tl.minimum(start_m + BLOCK_M, {n}) - 1  # I_HI")
        q, do = self._rows(body, x, offs)
        body.add(f"dq = tl.zeros([BLOCK_M, {x.head_dim(b.dot.extent)}], dtype={x.acc})")
        lo = "0" if b.key_lo is None else f"(tl.maximum(0, {self._code(b.key_lo, x)}) // BLOCK_N) * BLOCK_N"
        hi = f"{m} - 1" if b.key_hi is None else f"tl.minimum({m} - 1, {self._code(b.key_hi, x)})"
        body.add(f"lo = {lo}  # the forward's first key tile")
        body.add(f"hi = {hi}  # last admissible key")
        loop = body.open("for start_n in range(lo, hi + 1, BLOCK_N):")
        loop.add("offs_n = start_n + tl.arange(0, BLOCK_N)")
        loop.add("col_lo = start_n  # J_LO")
        loop.add(f"col_hi = tl.minimum(start_n + BLOCK_N, {m}) - 1  # J_HI")
        tested = b.skip is not sp.false and not iv.skip_implied_by_range(b.skip, b.key_lo, b.key_hi)
        inner = loop.open(f"if {self._code(b.skip, x)} == 0:") if tested else loop
        k, v = self._keys(inner, x, offs)
        self._ds(inner, x, q, k, v, do)
        inner.add(f"dq += tl.dot(ds.to({k}.dtype), {k}{x.dot_kw()})")
        body.add(f"tl.store(dQ_ptr + zz * stride_dQ_z + offs_m[:, None] * stride_dQ_0 + {offs}[None, :] * "
                 f"stride_dQ_1, dq, mask=(offs_m[:, None] < {n}) & ({offs}[None, :] < "
                 f"{x.idx(b.dot.extent, {})}))")
        return self._function("_attn_bwd_dq", body, x, ("dQ",))

    def _code(self, e, x: Emitter) -> str:
        """An index formula over the tile box (row_lo, row_hi, col_lo, col_hi)."""
        names = {iv.I_LO: "row_lo", iv.I_HI: "row_hi", iv.J_LO: "col_lo", iv.J_HI: "col_hi",
                 iv.TILE_W: "BLOCK_N", **x.names}
        return pcode(sp.sympify(e), names)

    def _function(self, name: str, body: Scope, x: Emitter, outs: tuple) -> tuple:
        """(source of the @triton.jit function, BackwardKernel)."""
        args = []
        for inp in x.used_inputs:
            args.append(f"{inp}_ptr")
            args += [f"stride_{inp}_z{z}" for z in range(self.nbatch)]
            args += [f"stride_{inp}_{k}" for k in range(self.p.input_map[inp].rank)]
        for buf in ("dO", "lse", "delta"):
            args += [f"{buf}_ptr", f"stride_{buf}_z"] + ([f"stride_{buf}_0", f"stride_{buf}_1"] if buf == "dO" else [])
        for buf in outs:
            args += [f"{buf}_ptr", f"stride_{buf}_z", f"stride_{buf}_0", f"stride_{buf}_1"]
        args += [f"dim_{d.name}" for d in self.p.dims]
        args += [f"Z{z}" for z in range(self.nbatch)]
        consts = ["BLOCK_M: tl.constexpr", "BLOCK_N: tl.constexpr"]
        consts += [f"{hd}: tl.constexpr" for hd in self.head_dims.values()] + ["HEAD_DIM_V: tl.constexpr"]
        lines = []
        for ln in body.lines:
            lines += self._batch_offsets(x) if ln.strip() == "for_batch_offsets" else [ln]
        sig = ",\n    ".join(args + consts)
        src = f"@triton.jit\ndef {name}(\n    {sig},\n):\n" + "\n".join(prune(lines)) + "\n"
        return src, BackwardKernel(name, tuple(x.used_inputs))

    def _batch_offsets(self, x: Emitter) -> list:
        """Offsets of the inputs for this program's batch indices (decoded row-major from what is left of pid_z)."""
        dec = []
        for z in reversed(range(self.nbatch)):
            dec.append(f"    off_z{z} = pid_z % Z{z}" if z else f"    off_z{z} = pid_z")
            if z:
                dec.append(f"    pid_z = pid_z // Z{z}")
        for name in x.used_inputs:
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
            f"# score {''.join(ch if 32 <= ord(ch) < 127 else '?' for ch in D.show(b.score))[:150]}\n"
            "import triton\nimport triton.language as tl\n")
    source = head + (f"\n\n{helpers}\n" if helpers else "") + "\n\n" + code
    return BackwardSpec(source, (kv, q), tuple(d.name for d in program.dims), nbatch,
                        tuple((name, ext) for ext, name in em.head_dims.items()),
                        {"Q": b.dot.a, "K": b.dot.b, "V": b.value}, b.extent, sched.row[1], b.dot.extent,
                        sched.col[1])
