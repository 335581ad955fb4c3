"""Linear-cost forms derived by algebra from the quadratic program (power and linear attention).

Rules (each an identity; tests check shapes and float64 values, tests/test_linear.py):

  power-features     (+red_k A_ik B_jk)^p  =>  +red_D phi_p(A_i)_D phi_p(B_j)_D
                     phi_p(x)_D = sqrt(p! / prod_k a_k!) prod_k x_k^a_k over the multi-indices a of degree p
                     (|a| = p), D = C(d + p - 1, p): the multinomial theorem. p = 1 with an elementwise map
                     (A = f(Q), B = g(K)) is the factored kernel of linear attention.
  gate-split         exp(ga_i - gb_j) = exp(ga_i - gb_b) exp(gb_b - gb_j) for any reference index b
                     (per-chunk decays; with G a cumulative log-gate every factor is <= 1 for j <= b <= i).
  causal-chunked     sum_{j <= i} phi_i . phi_j e^(ga_i - gb_j) v_j
                       = e^(ga_i - gb_{b(c)}) phi_i . S_c + sum_{c0 <= j <= i} phi_i . phi_j e^(ga_i - gb_j) v_j
                     with chunks of C rows, c = i // C, c0 = c C, b(c) = c0 - 1, and the exclusive prefix state
                     S_c = sum_{j < c0} e^(gb_{b(c)} - gb_j) phi_j v_j^T   [D, e],
                     S_{c+1} = e^(gb_{b(c+1)} - gb_{b(c)}) S_c + dS_c,
                     dS_c = sum_{j in c} e^(gb_{b(c+1)} - gb_j) phi_j v_j^T;
                     the normaliser z is the same with v_j = 1.

The plan is recognised on the ONF: one `normalize` branch with the causal mask `j <= i` over the same axis,
a score `(A . B)^p [* exp(ga_i - gb_j)]`, and the epilogue being that branch.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from functools import lru_cache

import sympy as sp

from . import dnf as D
from . import symbolic as sy
from .devices import occupancy
from .onf import BranchValue, DotTile, Schedule
from .score_parts import holds_reduction


@dataclass(frozen=True)
class LinearPlan:
    """The chunked-state form of one output."""
    schedule: Schedule
    p: int                  # degree of the power (1: elementwise feature map)
    ga: object | None       # gate terms exp(ga_i - gb_j) (DNF over lead and i / lead and j) or None
    gb: object | None

    @property
    def branch(self):
        return self.schedule.branches[0]

    def features(self, d: int) -> int:
        """D = C(d + p - 1, p)."""
        return math.comb(d + self.p - 1, self.p)

    def features_expr(self) -> sp.Expr:
        d = self.branch.dot.extent
        return sp.binomial(d + self.p - 1, self.p)


def _as_int(e):
    if isinstance(e, D.Const) and not isinstance(e.value, bool):
        v = e.value
        return int(v) if float(v).is_integer() else None
    if isinstance(e, D.Index) and e.expr.is_Integer:
        return int(e.expr)
    return None


def _gate(e, i, j):
    """exp(ga_i - gb_j) -> (ga, gb), else None."""
    if isinstance(e, D.Op) and e.fn == "exp" and isinstance(e.args[0], D.Op) and e.args[0].fn == "sub":
        ga, gb = e.args[0].args
        fa, fb = D.free_vars(ga), D.free_vars(gb)
        if j not in fa and i not in fb:
            return ga, gb
    return None


def _power(e, k):
    """DotTile(k) ^ p -> p; DotTile(k) -> 1."""
    if e == DotTile(k):
        return 1
    if isinstance(e, D.Op) and e.fn == "pow" and e.args[0] == DotTile(k):
        p = _as_int(e.args[1])
        if p is not None and 1 <= p <= 8:
            return p
    return None


def plan(s: Schedule) -> tuple[LinearPlan | None, str]:
    """The linear form of a schedule, or (None, why not)."""
    if len(s.branches) != 1 or s.epilogue != BranchValue(0):
        return None, "the linear form needs exactly one normalize(...) @ V contraction as the output"
    b = s.branches[0]
    i, n = s.row
    if b.kind == "softmax":
        return None, "softmax has no finite feature map (only normalize(...) @ V with a factored kernel)"
    if b.kind != "norm":
        return None, "the linear form is derived for normalize(...) @ V; a plain sum A @ V runs the quadratic kernel"
    if b.dot is None:
        return None, "no contraction over a feature axis in the score"
    if holds_reduction(b.value, b.dot.a, b.dot.b):
        return None, "the chunked scans read plain operand and value tiles (a norm of a row in them runs quadratic)"
    j = D.Index(b.var)
    if b.mask not in (D.Op("le", (j, D.Index(i)), "bool"), D.Op("ge", (D.Index(i), j), "bool")):
        return None, "the linear form is derived for the causal mask j <= i"
    if sp.simplify(b.extent - n) != 0:
        return None, "the causal linear form needs as many keys as queries"
    score, ga, gb = b.score, None, None
    if isinstance(score, D.Op) and score.fn == "mul":
        for x, y in (score.args, score.args[::-1]):
            g = _gate(y, i, b.var)
            if g is not None and _power(x, 0) is not None:
                score, (ga, gb) = x, g
                break
    p = _power(score, 0)
    if p is None:
        if isinstance(score, D.Op) and score.fn == "pow" and score.args[0] == DotTile(0) \
                and _as_int(score.args[1]) is not None:
            return None, f"the power feature map is built for 1 <= p <= 8, got p = {_as_int(score.args[1])}"
        return None, "the score is not (A . B)^p [* exp(ga_i - gb_j)]"
    if ga is not None and D.subs(ga, {i: b.var}) != gb:
        return None, ("the gate-split rule needs one gate read at both indices, exp(G[i] - G[j]) with G a "
                      "cumulative log-gate (non-increasing: every chunk factor is then <= 1)")
    return LinearPlan(s, p, ga, gb), ""


@lru_cache(maxsize=64)
def feature_table(d: int, p: int):
    """(index table [D, p] as nested tuples, weights [D]) of the symmetric power feature map."""
    idx, w = [], []
    for combo in itertools.combinations_with_replacement(range(d), p):
        counts = {}
        for k in combo:
            counts[k] = counts.get(k, 0) + 1
        mult = math.factorial(p)
        for c in counts.values():
            mult //= math.factorial(c)
        idx.append(combo)
        w.append(math.sqrt(mult))
    return tuple(idx), tuple(w)


# ---- costs of the two forms (leading-order counts of the generated kernels) -----------------------------

@dataclass(frozen=True)
class FormCost:
    form: str
    flops: float
    dram_bytes: float
    onchip_state_bytes: float
    # ((tl.dot FLOPs, other FLOPs, bytes, programs, launches), ...): kernels one after the other, each group of
    # `launches` kernels timed as one launch of `programs` programs (the backward's kernels of one grid)
    launches: tuple = ()


def scan_value_tile(nfeat: int, block_f: int, head_dim_v: int, zl: int, sms: int, start: int | None = None) -> int:
    """The chunk scan's value tile BLOCK_V (the state's columns per program) when the value axis is split for the
    device: the padded value width, halved while twice the scan's programs (feature tiles x value tiles x zl, zl =
    batch x leading indices) still fit on the `sms` SMs and the tile keeps 32 columns or more. A launch of fewer
    programs than SMs has that share of the device (moa/devices.py Device.occupancy); the split re-reads the
    keys' features once per value tile. start: the tile to halve from (default the whole width)."""
    bv = start or head_dim_v
    while bv >= 64 and 2 * -(-nfeat // block_f) * -(-head_dim_v // bv) * zl <= sms:
        bv //= 2
    return bv


# long: the two forms' counts side by side, forward and training, per launch
def form_costs(lp: LinearPlan, dims: dict, elem_bytes: int = 2, acc_bytes: int = 4, block_m: int = 128,
               block_n: int = 64, chunk: int = 64, block_f: int = 64, training: bool = False,
               state_bytes: int | None = None, batch: int = 1, sms: int | None = None,
               l2_bytes: int | None = None) -> dict:
    """FLOPs and DRAM bytes of the quadratic (tiled, causal) and chunked linear forms for concrete dims,
    counted on padded tiles like the generated kernels (HD, HV: head dims padded to powers of two >= 16), over
    the leading indices and `batch` instances; `launches` holds them per kernel with its programs.

    quadratic: visited tiles = the causal part of (n / BM) x (n / BN); per tile 2 BM BN (HD + HV) for the two
               dots and (p + 4) BM BN elementwise; reads Q once, K and V once per visited tile (once in all
               where one instance's K and V fit in half of `l2_bytes`: the re-reads hit L2, as moa/cost.py
               counts them); writes O. One launch of n / BM row tiles.
    linear:    T = n / C chunks, F = D rounded up to BLOCK_F features (D = C(d + p - 1, p)):
               scan T F C (2 HV + p + 2) for the chunks' own states plus 2 T F (HV + 1) for the prefix, output
               T F C (2 HV + p + 2) plus the intra-chunk part C^2 (2 HD + 2 HV + p + 4); reads per row the p
               factors of every feature twice (the scan's operand, once per value tile; the output kernel's), V
               once per feature tile, and Q, K, V once more for the intra-chunk part; states written once (by the
               scan) and read once (by the output kernel), state_bytes each (default acc_bytes; 2 for a bfloat16
               forward). The scan's programs are the feature tiles x value tiles (`scan_value_tile` for `sms`; one
               value tile without), the output kernel's the chunks.
    training: the forward plus the backward of each form (`backward_costs`; the states in acc_bytes): the
              quadratic backward's two kernels timed as one launch over the key tiles (its dK / dV grid), the
              chunked backward's two scans (the recomputed prefix, the reverse suffix: 2 T F C (2 HV + p + 2)
              + 4 T F (HV + 1), their operand's factors per value tile and V per feature tile, the states) as
              launches over the feature x value tiles, and its dK, dV and dQ kernels as launches over the chunks.
    """
    s, br = lp.schedule, lp.branch
    n = sy.evaluate(s.row[1], dims)
    e = sy.evaluate(s.col[1], dims)
    d = sy.evaluate(br.dot.extent, dims)
    hd, hv = sy.tile_width(d), sy.tile_width(e)
    zl = batch
    for _, x in s.lead:
        zl *= sy.evaluate(x, dims)
    rt = -(-n // block_m)
    tiles = sum(min(-(-n // block_n), ((r + 1) * block_m - 1) // block_n + 1) for r in range(rt))
    kv_rows = n if l2_bytes and n * (d + e) * elem_bytes <= l2_bytes / 2 else tiles * block_n
    quad = [(tiles * block_m * block_n * 2 * (hd + hv), tiles * block_m * block_n * (lp.p + 4),
             elem_bytes * (n * d + kv_rows * (d + e) + n * e), rt, 1)]
    t = -(-n // chunk)
    D = lp.features(d)
    nft = -(-D // block_f)
    F = nft * block_f
    nvt = hv // scan_value_tile(D, block_f, hv, zl, sms) if sms else 1
    st = acc_bytes if training or state_bytes is None else state_bytes
    states = st * t * D * (e + 1)
    lin = [(t * F * chunk * 2 * hv, t * F * chunk * (lp.p + 2) + 2 * t * F * (hv + 1),
            elem_bytes * n * (lp.p * D * nvt + nft * e) + states, nft * nvt, 1),
           (t * F * chunk * 2 * hv + t * chunk * chunk * 2 * (hd + hv),
            t * F * chunk * (lp.p + 2) + t * chunk * chunk * (lp.p + 4),
            elem_bytes * n * (lp.p * D + 2 * d + e) + states, t, 1)]
    if training:
        (qd, qo, qb), (ld, lo, lb) = backward_costs(lp, n, d, e, tiles, elem_bytes, acc_bytes, block_m, block_n,
                                                    chunk, block_f, parts=True)
        quad.append((qd, qo, qb, -(-n // block_n), 2))
        scans = (2 * t * F * chunk * 2 * hv, 2 * t * F * chunk * (lp.p + 2) + 4 * t * F * (hv + 1),
                 elem_bytes * 2 * n * (lp.p * D + nft * e) + acc_bytes * 2 * t * D * (e + 1))
        rest = (ld - scans[0], lo - scans[1], lb - scans[2], t, 3)
        lin += [(*scans[:2], scans[2] + elem_bytes * 2 * n * lp.p * D * (nvt - 1), nft * nvt, 2), rest]

    def cost(form, parts, onchip):
        launches = tuple((zl * a, zl * o, zl * b, zl * p, k) for a, o, b, p, k in parts)
        return FormCost(form, sum(x[0] + x[1] for x in launches), sum(x[2] for x in launches), onchip, launches)

    return {"quadratic": cost("quadratic", quad, acc_bytes * block_m * hv),
            "linear": cost("linear", lin, acc_bytes * block_f * hv)}


def backward_costs(lp: LinearPlan, n: int, d: int, e: int, tiles: int, elem_bytes: int, acc_bytes: int,
                   block_m: int, block_n: int, chunk: int, block_f: int, parts: bool = False) -> tuple:
    """((FLOPs, bytes) of the quadratic backward, (FLOPs, bytes) of the chunked backward) of one leading index,
    leading order, on padded tiles like the generated kernels (their tl.dot FLOPs are these exactly); parts:
    (tl.dot FLOPs, other FLOPs, bytes) each.

    quadratic: per visited tile, dK/dV 4 BM BN (HD + HV) (S, dP, dV, dK) and dQ BM BN (2 HV + 2 HD + 2 HD [p >= 2:
               the score's partial needs S]); reads Q, dO per visited tile, K, V per visited tile, writes dQ, dK, dV.
    linear:    per chunk and feature, 2 HV for the recomputed state, the suffix state, dK, dV and dQ, plus p one-hot
               dots of 2 HD for the features' adjoint in dK and dQ (p >= 2); per chunk C^2 (10 HD + 6 HV) intra;
               the two scans read their operand's p gathered factors of every feature (p D per row) and V (dn)
               per feature tile, the dK, dV and dQ kernels an operand's p factors of every feature and once the
               intra-chunk tiles; the prefix states
               written by the recomputing scan and read by dQ's kernel, the suffix states written by the reverse
               scan and read by dK's and dV's.
    """
    hd, hv, p = sy.tile_width(d), sy.tile_width(e), lp.p
    q_dots = tiles * block_m * block_n * (4 * (hd + hv) + 2 * hv + 2 * hd + (2 * hd if p >= 2 else 0))
    q_other = tiles * block_m * block_n * (p + 10)
    q_bytes = elem_bytes * (tiles * (block_m + block_n) * (d + e) + 2 * n * (d + e)) + acc_bytes * n * (2 * d + e)
    t = -(-n // chunk)
    D = lp.features(d)
    F = -(-D // block_f) * block_f
    one_hot = 2 * hd * p if p >= 2 else 0
    l_dots = t * F * chunk * (10 * hv + 2 * one_hot) + t * chunk * chunk * (10 * hd + 6 * hv)
    l_other = 5 * t * F * chunk * (p + 2) + 4 * t * F * (hv + 1)
    nft = F // block_f
    l_bytes = elem_bytes * (2 * n * (p * D + nft * e) + 3 * n * p * D + 3 * n * (d + e)) \
        + acc_bytes * (5 * t * D * (e + 1) + n * (2 * d + e))
    if parts:
        return (q_dots, q_other, q_bytes), (l_dots, l_other, l_bytes)
    return (q_dots + q_other, q_bytes), (l_dots + l_other, l_bytes)


def predicted_seconds(c: FormCost, peak_flops: float, bandwidth: float, sms: int | None = None,
                      launch_s: float = 0.0, vector_flops: float | None = None) -> float:
    """Roofline: the larger of compute time and memory time. With `sms`, as moa/cost.py times a call: per launch,
    tl.dot FLOPs at peak_flops and the others at vector_flops (the CUDA cores), divided by the launch's
    occupancy min(1, programs / SMs), plus launch_s per launch."""
    if sms is None or not c.launches:
        return max(c.flops / peak_flops, c.dram_bytes / bandwidth) + launch_s * sum(x[4] for x in c.launches)
    vec = vector_flops or peak_flops
    return sum(max(a / peak_flops + o / vec, b / bandwidth) / occupancy(p, sms) + launch_s * k
               for a, o, b, p, k in c.launches)


def crossover(lp: LinearPlan, dims: dict, peak_flops: float, bandwidth: float, launch_s: float = 0.0,
              vector_flops: float | None = None, **kw) -> int | None:
    """The n from which the linear form is predicted faster (power of two search, then bisection); kw: those of
    form_costs (`sms` also times the launches by their occupancy). Past a tile boundary the choice can flip back
    for a few rows, so some smaller n may favour the linear form too."""
    row = lp.schedule.row[1]
    if not row.is_Symbol:
        return None

    def faster(n):
        c = form_costs(lp, {**dims, row.name: n}, **kw)
        t = {f: predicted_seconds(c[f], peak_flops, bandwidth, kw.get("sms"), launch_s, vector_flops) for f in c}
        return t["linear"] < t["quadratic"]
    hi = 64
    while not faster(hi):
        hi *= 2
        if hi > 1 << 24:
            return None
    lo = hi // 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if faster(mid) else (mid, hi)
    return hi
