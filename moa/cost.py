"""The algebra's cost formulas: the counters of one kernel launch (Counts), the unfused PyTorch eager plan of a
schedule (what fusion saves: every intermediate array materialised), and the roofline that turns counts into a
predicted time on a device. Which tiles a schedule visits is moa/tiles.py; the work of the emitted code per tile
is counted by codegen (codegen/ledger.py, codegen/counts.py)."""
from __future__ import annotations

from dataclasses import dataclass, field

import sympy as sp

from . import dnf as D
from . import symbolic as sy
from .onf import BranchValue, DotTile, Schedule


@dataclass
class Counts:
    """Predicted counters of one kernel launch (or a sum of launches)."""
    flops: int = 0
    dot_flops: int = 0
    transcendentals: int = 0
    dram_bytes_loaded: int = 0
    dram_bytes_stored: int = 0
    tiles_visited: int = 0
    tiles_needed: int = 0
    programs: int = 0
    loaded_by_tensor: dict = field(default_factory=dict)
    loop_loaded_by_tensor: dict = field(default_factory=dict)
    hop_loaded_by_tensor: dict = field(default_factory=dict)   # loaded by hop loops (one key row per query row)

    @property
    def dram_bytes(self) -> int:
        return self.dram_bytes_loaded + self.dram_bytes_stored

    def scaled(self, k: int) -> Counts:
        """These counts times k (k identical instances: batch, leading indices that change nothing)."""
        out = Counts(**{f: getattr(self, f) * k for f in ("flops", "dot_flops", "transcendentals",
                                                          "dram_bytes_loaded", "dram_bytes_stored", "tiles_visited",
                                                          "tiles_needed", "programs")})
        out.loaded_by_tensor = {t: v * k for t, v in self.loaded_by_tensor.items()}
        out.loop_loaded_by_tensor = {t: v * k for t, v in self.loop_loaded_by_tensor.items()}
        out.hop_loaded_by_tensor = {t: v * k for t, v in self.hop_loaded_by_tensor.items()}
        return out

    def add(self, o: Counts):
        for f in ("flops", "dot_flops", "transcendentals", "dram_bytes_loaded", "dram_bytes_stored",
                  "tiles_visited", "tiles_needed", "programs"):
            setattr(self, f, getattr(self, f) + getattr(o, f))
        for d, od in ((self.loaded_by_tensor, o.loaded_by_tensor),
                      (self.loop_loaded_by_tensor, o.loop_loaded_by_tensor),
                      (self.hop_loaded_by_tensor, o.hop_loaded_by_tensor)):
            for k, v in od.items():
                d[k] = d.get(k, 0) + v


# ---- the unfused (PyTorch eager) plan ------------------------------------------------------------------------

def _depends_ij(e, i, j) -> bool:
    if any(isinstance(x, DotTile) for x in D.nodes(e)):
        return True
    fv = D.free_vars(e)
    return i in fv and j in fv


@dataclass
class Eager:
    """The unfused plan (sympy, in the dims): ops as (description, bytes read, bytes written, matmul FLOPs,
    other FLOPs, transcendentals), and the totals."""
    ops: list

    @property
    def dram_bytes(self) -> sp.Expr:
        return sp.expand(sum((o[1] + o[2] for o in self.ops), sp.Integer(0)))

    @property
    def intermediate_bytes(self) -> sp.Expr:
        return sp.expand(sum((o[2] for o in self.ops if o[6]), sp.Integer(0)))

    @property
    def flops(self) -> sp.Expr:
        return sp.expand(sum((o[3] + o[4] for o in self.ops), sp.Integer(0)))


def eager_plan(sched: Schedule, elt: int, batch: int = 1) -> Eager:
    """The plan PyTorch eager runs for one output, op by op, every intermediate materialised in global memory:

    per branch (softmax(S) @ V or normalize(A) @ V over keys j):
      phi(Q), phi(K)       if a dot factor is computed (elu(Q) + 1 ...): read the input, write the factor
      S = A @ B^T          read A [n, d], B [m, d]; write S [n, m]                      2 n m d FLOPs
      score ops            one kernel per elementwise op on an [n, m] array (scale, bias, tanh ...): read its
                           [n, m] operands, write [n, m]; index grids (j - i) and gathers (bias[i - j]) that
                           depend on both i and j are materialised first
      mask                 the boolean mask [n, m] (1 byte per element) is materialised, then masked_fill: read S
                           and the mask, write S_masked
      softmax              read S_masked, write P [n, m]                                 4 n m FLOPs + n m exp
      (normalize)          z = A.sum(-1): read A, write z [n]
      O_k = P @ V          read P and V [m, e]; write O_k [n, e]                         2 n m e FLOPs
      (normalize)          O_k / z: read O_k and z, write O_k
    epilogue               when the output is more than one branch's value: read every O_k, write O [n, e]
    A window-mixing branch (Blurry Window Attention: slots j < J mixing W hops r) materialises, before S, the
    unfolded windows K_u [n, W, d], V_u [n, W, e] and the mixed Khat = w @ K_u [n, J, d], Vhat [n, J, e]
    (2 n J W d and 2 n J W e FLOPs); S = einsum(Q, Khat) reads Khat and O = P @ Vhat reads Vhat.
    Intermediates are every array written except the output O. All sizes times batch x leading extents."""
    i, n = sched.row
    c, e = sched.col
    lead = sy.product([x for _, x in sched.lead]) * batch
    E = sp.Integer(elt)
    ops: list = []
    final_is_branch = sched.epilogue == BranchValue(0) and len(sched.branches) == 1

    def op(what, read, write, dot=0, other=0, trans=0, inter=True):
        ops.append((what, sp.sympify(read) * lead, sp.sympify(write) * lead, sp.sympify(dot) * lead,
                    sp.sympify(other) * lead, sp.sympify(trans) * lead, inter))

    for k, b in enumerate(sched.branches):
        j, m = b.var, b.extent
        nm = n * m
        tag = f"branch {k}: " if len(sched.branches) > 1 else ""
        mx = b.mix
        if mx is not None:
            W, dk = mx.extent, mx.kext
            for what, width in (("K", dk), ("V", e)):
                op(f"{tag}unfold {what} into [n, W] windows", n * width * E, n * W * width * E)
                op(f"{tag}{what}hat = w @ {what}_u", (n * W * width + m * W) * E, nm * width * E,
                   dot=2 * nm * W * width)
            op(f"{tag}S = einsum(Q, Khat)", (n * dk + nm * dk) * E, nm * E, dot=2 * nm * dk)
        elif b.dot is not None:
            dk = b.dot.extent
            for fac, rows in ((b.dot.a, n), (b.dot.b, m)):
                if not isinstance(fac, D.Read):
                    nops = sum(1 for x in D.nodes(fac) if isinstance(x, D.Op))
                    op(f"{tag}factor {D.show(fac)[:40]}", rows * dk * E, rows * dk * E, other=rows * dk * nops)
            op(f"{tag}S = A @ B^T", (n + m) * dk * E, nm * E, dot=2 * nm * dk)
        for x in _postorder(b.score):
            if isinstance(x, D.Op) and _depends_ij(x, i, j):
                operands = sum(1 for a in x.args if _depends_ij(a, i, j))
                tr = nm if x.fn in ("exp", "log", "sqrt", "rsqrt", "tanh", "sigmoid", "sin", "cos", "elu", "erf") else 0
                op(f"{tag}{x.fn} on [n, m]", operands * nm * E, nm * E, other=0 if tr else nm, trans=tr)
            elif isinstance(x, (D.Read, D.Index)) and _depends_ij(x, i, j):
                op(f"{tag}materialise {D.show(x)[:30]}", nm * E if isinstance(x, D.Read) else 0, nm * E)
        if b.mask is not None:
            op(f"{tag}mask [n, m] (bool)", 0, nm)
            op(f"{tag}masked_fill", nm * E + nm, nm * E)
        if b.kind == "softmax":
            op(f"{tag}P = softmax(S)", nm * E, nm * E, other=4 * nm, trans=nm)
        else:
            op(f"{tag}z = A.sum(-1)", nm * E, n * E, other=nm)
        last = final_is_branch and b.kind == "softmax"
        values = nm * e if mx is not None else m * e     # Vhat [n, J, e] for a window-mixing branch
        op(f"{tag}O = P @ V", (nm + values) * E, n * e * E, dot=2 * nm * e, inter=not last)
        if b.kind != "softmax":
            op(f"{tag}O / z", (n * e + n) * E, n * e * E, other=n * e, inter=not final_is_branch)
    if not final_is_branch:
        nops = sum(1 for x in D.nodes(sched.epilogue) if isinstance(x, D.Op))
        op("epilogue", len(sched.branches) * n * e * E, n * e * E, other=n * e * nops, inter=False)
    return Eager(ops)


def roofline(dot_flops, other_flops, trans, hbm_bytes, device, dtype: str, launches: int = 1):
    """(seconds, bound, parts): max(compute, memory, transcendental) + launch overhead on a device.

    compute = tl.dot FLOPs at the dtype's matrix peak + other FLOPs at the vector peak (float32 accumulation,
    float64 for float64 kernels); memory = HBM bytes at the HBM bandwidth; transcendental = evaluations at the
    MUFU rate (software sequences for float64)."""
    parts = {"compute": dot_flops / device.matmul_rate(dtype) + other_flops / device.vector_rate(dtype),
             "memory": hbm_bytes / device.hbm_bytes_per_s,
             "transcendental": trans / device.transcendental_rate(dtype)}
    if any(isinstance(v, sp.Basic) and v.free_symbols for v in parts.values()):
        return sp.Max(*parts.values(), evaluate=False) + launches * device.launch_s, "symbolic", parts
    bound = max(parts, key=lambda k: float(parts[k]))
    return float(parts[bound]) + launches * device.launch_s, bound, parts


def launches_roofline(launches, device, dtype: str):
    """(seconds, bound, parts) of launches run one after the other, each (dot FLOPs, other FLOPs, transcendentals,
    HBM bytes, programs): per launch its roofline divided by its occupancy (Device.occupancy), plus the launch
    overhead; parts (the compute, memory and transcendental times) summed over the launches, bound the largest."""
    parts = dict.fromkeys(("compute", "memory", "transcendental"), 0.0)
    seconds = 0.0
    for dot, other, trans, hbm, programs in launches:
        s, _, p = roofline(dot, other, trans, hbm, device, dtype, launches=0)
        occ = device.occupancy(programs)
        seconds += s / occ + device.launch_s
        for k in parts:
            parts[k] += float(p[k]) / occ
    return seconds, max(parts, key=parts.get), parts


def _postorder(e):
    for k in D.children(e):
        yield from _postorder(k)
    yield e
