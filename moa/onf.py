"""Operational Normal Form: the DNF of an output lifted onto a tiled schedule.

For an output <lead... i c> psi O whose DNF is an elementwise epilogue E over monoid reductions
(online-softmax `SoftmaxSum` or `NormSum` branches) along a key axis j:
  lead axes (heads, comprehension axes, and the call's batch axes) -> the grid's second axis;
  i -> (cdiv(n, BLOCK_M) programs) x BLOCK_M rows;   j -> (loop) x BLOCK_N columns;   c -> one tile;
  a contraction +red_k A(i, k) * B(j, k) inside a score -> one tl.dot of a [BLOCK_M, d] and a [BLOCK_N, d] tile;
  the mask predicate of `where(P, s, -inf)` -> loop bounds (key_range) and a per-tile skip / full test.
The schedule is target-independent apart from the block sizes, which the runtime chooses.

A schedule has a kind (`variants` lists the legal ones of an output; the runtime picks by predicted cost):
  tiled    every branch loops over key tiles of contiguous query tiles (the construction above);
  hops     a branch whose mask has a conjunct (i - j + c) % s == 0 (s >= 2) loops over hops j = i + c - s t
           instead (`Hop`: one key row per query row per hop, a diagonal of the key tile);
  residue  the rows are lifted by residue, i = r + s a (`RowLift`): a program holds rows of one residue r; a
           stride-s branch becomes dense key tiles in b-space, j = rho + s b (rule `residue-lift`), and every
           other branch gathers per-row windows by hops (its own stride, or diagonals j = i - t).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

import sympy as sp

from . import data_summaries as ds
from . import dnf as D
from . import intervals as iv
from . import symbolic as sy
from .key_sums import key_sum, score_conjuncts, strip_zero, with_key_sums  # noqa: F401  (key_sum re-exported)
from .residue import (LIFTING_RULES, Hop, Lift, RowLift, _band, _hop, _strip_mask,
                      row_lift)
from .errors import UnsupportedError
from .score_parts import check_no_binders

TILED, HOPS, RESIDUE, SPLIT = "tiled", "hops", "residue", "split"
KINDS = (TILED, HOPS, RESIDUE, SPLIT)   # SPLIT: one kernel per branch (moa/split.py)


@dataclass(frozen=True)
class DotTile:
    """Placeholder for the [BLOCK_M, BLOCK_N] tile of +red_k A(i, k) * B(j, k) in a branch's score."""
    branch: int
    dtype: str = "float"


@dataclass(frozen=True)
class BranchValue:
    """Placeholder for the finished [BLOCK_M, BLOCK_E] value of branch k in the epilogue."""
    branch: int
    dtype: str = "float"


@dataclass(frozen=True)
class Dot:
    a: object          # A(lead, i, k)
    b: object          # B(lead, j, k)
    var: sp.Symbol     # k
    extent: sp.Expr    # d


@dataclass(frozen=True)
class MixTile:
    """Placeholder for the [BLOCK_M, W] tile of +red_r w(j, r) * [g(i, r)] * (A_i . B_(i, r)) in a score."""
    branch: int
    dtype: str = "float"


@dataclass(frozen=True)
class Mix:
    """A score that mixes a window of hop dot products (Blurry Window Attention after reassociation):
    score(i, j) = E(+red_r w(j, r) * where(g(i, r), +red_k A(i, k) B(i, r, k), 0)) and
    value(i, j, c) = +red_r w(j, r) * where(g(i, r), X(i, r, c), 0). Computed as H[i, r] by r hops (row dots),
    S = H w^T, P = softmax_j(S), O = (P w) X: O(n W (d + e) + n W^2) work, no n x n array."""
    var: sp.Symbol
    extent: sp.Expr
    weight: object       # w(j, r)
    guard: object        # g(i, r) or None
    a: object            # A(i, k)
    b: object            # B(i, r, k)
    kvar: sp.Symbol
    kext: sp.Expr
    x: object            # X(i, r, c)


@dataclass(frozen=True)
class Branch:
    """One monoid reduction over the key axis: kind 'softmax' (m, l, acc), 'norm' (z, acc) or 'sum' (acc)."""
    kind: str
    var: sp.Symbol
    extent: sp.Expr
    mask: object          # predicate over (lead, i, j) or None (every key admissible)
    score: object         # softmax score / norm weight over (lead, i, j), with DotTile for the contraction
    dot: Dot | None
    value: object         # over (lead, j, c)
    key_lo: sp.Expr | None   # in I_LO, I_HI: admissible keys lie in [key_lo, key_hi]
    key_hi: sp.Expr | None
    skip: object          # sympy boolean in I_LO, I_HI, J_LO, J_HI: the tile has no admissible pair
    full: object          # ... every pair of the tile is admissible (no mask code)
    hop: Hop | None = None  # the residue re-indexing, when the mask has (i - j) % s == 0 structure
    mix: Mix | None = None  # a window-mixing score (then `score` holds MixTile and `value` is the r-sum)
    mode: str = TILED       # how the kernel runs it: TILED (key tiles), HOPS (loop over `hop`), "lift" (below)
    source: object = None   # the DNF reduction this branch was built from
    lift: Lift | None = None  # mode "lift": the key map j = rho + s b; var is b, the box is in a-space
    span: tuple | None = None  # the first keys of the tiles known full (intervals.full_span), or None
    summaries: tuple = ()      # data-dependent reads of the mask decided by their min / max (data_summaries.Summary)
    data_skip: object = None   # skip / full with those summaries (None: the data decides nothing)
    data_full: object = None

    def tile_tests(self, data: bool) -> tuple:
        """(skip, full) as the kernel tests them: with the summaries of the data (`data`) or without."""
        return (self.data_skip, self.data_full) if data and self.summaries else (self.skip, self.full)

    @property
    def split(self) -> bool:
        """Whether the key loop splits into boundary tiles, full tiles (no mask code) and boundary tiles: the full
        tiles are one interval and the loop's bounds imply every skip (no skip test inside)."""
        return self.span is not None and self.mode in (TILED, "lift") and \
            iv.skip_implied_by_range(self.skip, self.key_lo, self.key_hi)


@dataclass(frozen=True)
class Schedule:
    """The ONF of one output."""
    output: str
    lead: tuple           # ((var, extent), ...)
    row: tuple            # (i, n)
    col: tuple            # (c, e)
    branches: tuple
    epilogue: object      # over (lead, i, c) with BranchValue placeholders
    dtype: str
    kind: str = TILED
    lift: RowLift | None = None   # kind RESIDUE: the row lifting
    split: object = None          # kind SPLIT: moa/split.py Split (its kernels); the fields above are the base's

    @property
    def has_lse(self) -> bool:
        """A single softmax branch returned as is: its log-sum-exp per row is meaningful."""
        return (len(self.branches) == 1 and self.branches[0].kind == "softmax" and self.branches[0].mix is None
                and self.epilogue == BranchValue(0))


def _free(e) -> set:
    return D.free_vars(e)


def _find_dot(e, rowvars, colvars, k_branch):
    """Replace the contraction +red_k A(rows, k) * B(cols, k) by a DotTile: its first occurrence, and every
    occurrence of the same contraction (up to the name of k: a score read twice, S * sigmoid(S))."""
    found = []

    def go(x):
        if isinstance(x, D.Reduce) and x.op == "sum" and isinstance(x.body, D.Op) and x.body.fn == "mul":
            a, b = x.body.args
            fa, fb = _free(a) - {x.var}, _free(b) - {x.var}
            for p, q, fp, fq in ((a, b, fa, fb), (b, a, fb, fa)):
                if fp <= rowvars and fq <= colvars and fp - colvars and fq - rowvars:   # the row's and the key's
                    if not found:
                        found.append(Dot(p, q, x.var, x.extent))
                    f = found[0]
                    ren = {x.var: f.var}
                    if (D.subs(p, ren), D.subs(q, ren), sy.simplify(x.extent - f.extent)) == (f.a, f.b, 0):
                        return DotTile(k_branch)
        kids = D.children(x)
        return D.with_children(x, [go(k) for k in kids]) if kids else x

    out = go(e)
    return out, (found[0] if found else None)


def schedule(o: D.DnfOutput) -> Schedule:
    """Lift one DNF output onto the tiled schedule, or raise UnsupportedError naming what does not fit."""
    if len(o.vars) < 2:
        raise UnsupportedError(f"output {o.name}: codegen needs an output of rank >= 2 (rows x columns), got "
                               f"rank {len(o.vars)}")
    *lead, i, c = o.vars
    lead_ext = o.extents[:-2]
    leadset = set(lead)
    branches: list = []

    def lift(x):
        if isinstance(x, (D.SoftmaxSum, D.NormSum, D.KeySum)):
            k = len(branches)
            branches.append(_branch(o.name, x, k, leadset, i, c))
            return BranchValue(k)
        kids = D.children(x)
        return D.with_children(x, [lift(y) for y in kids]) if kids else x

    epi = lift(with_key_sums(o.expr, leadset, i, c))
    if not branches:
        nested = any(isinstance(x, D.Reduce) and any(isinstance(y, D.Reduce) for y in D.nodes(x.body))
                     for x in D.nodes(o.expr))
        raise UnsupportedError(f"output {o.name}: no softmax(...) @ V, normalize(...) @ V or A @ V contraction over "
                               f"a key axis found; " +
                               ("the DNF holds a nested sum, as an unmasked, unnormalised (Q @ K.T) @ V does once "
                                "reassociated to Q @ (K.T @ V): no kernel for that (two matmuls compute it); "
                                if nested else "") +
                               f"codegen compiles attention-shaped programs (DNF: {D.show_clipped(o.expr, 160)})")
    for x in D.nodes(epi):
        if isinstance(x, D.BINDERS) and not (isinstance(x, D.Reduce) and _free(x) <= leadset | {i}):
            lse = isinstance(x, D.LogSumExp) or any(isinstance(y, D.Op) and y.fn == "exp" for y in D.nodes(x))
            x = next(y for y in D.nodes(epi) if isinstance(y, D.BINDERS) and any(z is x for z in D.nodes(y)))
            raise UnsupportedError(f"output {o.name}: the epilogue has a reduction over the key axis outside "
                                   f"a softmax/normalize contraction: {D.show_clipped(x, 120)}" +
                                   ("; a sum of weights over the keys runs only as the weights of a contraction "
                                    "(W @ U, with U an input of ones for a plain sum)" if isinstance(x, D.Reduce)
                                    and x.op == "sum" and _free(x) <= leadset | {i} else
                                    "; a log-sum-exp of the scores is not fused into an epilogue (a learned sink "
                                    "logit is one more key: docs/variants.md, attention sinks)" if lse else ""))
    if not _free(epi) <= leadset | {i, c}:
        raise UnsupportedError(f"output {o.name}: epilogue depends on {sorted(map(str, _free(epi) - leadset))}")
    if any(b.mix is not None for b in branches) and (len(branches) > 1 or epi != BranchValue(0)):
        raise UnsupportedError(f"output {o.name}: a window-mixing softmax (Blurry Window Attention's form) has a "
                               f"kernel only as the whole output; other branches or an epilogue around it have none "
                               f"yet")
    return Schedule(o.name, tuple(zip(lead, lead_ext)), (i, o.extents[-2]), (c, o.extents[-1]), tuple(branches),
                    epi, o.dtype)


def _branch(name, x, k, leadset, i, c, box=None, lift=None) -> Branch:
    """Analyse one monoid reduction x over its key variable. box: the row variable of the tile box (i, or a
    for a branch lifted by `residue-lift`, whose mask is over (a, b))."""
    j = x.var
    box = i if box is None else box
    if isinstance(x, D.SoftmaxSum):
        kind, mask, score = "softmax", *_strip_mask(x.score, float("-inf"))
    else:
        kind, mask, score = "norm" if isinstance(x, D.NormSum) else "sum", *strip_zero(x.weight)
    mask, score = score_conjuncts(mask, score, float("-inf") if kind == "softmax" else 0.0)
    score, dot = _find_dot(score, leadset | {i}, leadset | {j}, k)
    if dot is None and c in _free(score):
        raise UnsupportedError(f"output {name}: the score reads the output's last index {c}, which must be the "
                               f"value column of A @ V (a transposed output, (softmax(S) @ V).T, has no kernel: "
                               f"transpose the result after the call)")
    mix = None
    if kind == "softmax" and dot is None:
        score, mix = _find_mix(score, x.value, leadset, i, j, k)
    check_no_binders(score, "the score", name, dot, (leadset | {i}, leadset | {j}) if dot is not None else None)
    if mix is None:
        check_no_binders(x.value, "the value", name, sides=(leadset | {j},))
    if mask is not None:
        check_no_binders(mask, "the mask", name, dot)
    allowed = leadset | {i, j, box}
    for part, what in ((score, "score"), (mask, "mask")):
        if part is not None and not _free(part) <= allowed:
            raise UnsupportedError(f"output {name}: the {what} depends on {sorted(map(str, _free(part) - allowed))}"
                                   f" (it may use only the row, key and leading indices)")
    if mix is None and not _free(x.value) <= leadset | {j, c}:
        extra = _free(x.value) - (leadset | {j, c})
        what = "the row index" if i in extra else "the index of a reduction around the contraction (an epilogue " \
            "summing over the output's columns, sum(X[i] * X[i]) of X = A @ V, has no kernel)"
        raise UnsupportedError(f"output {name}: the value of the contraction depends on "
                               f"{sorted(map(str, extra))}, {what}; expected V[j, c] (the key, the output "
                               "column and the leading indices only)")
    if dot is not None:   # a norm of the operand's own row (QK-norm) is computed on its tile, before the cast
        for part, own in ((dot.a, leadset | {i}), (dot.b, leadset | {j})):
            check_no_binders(part, "a contraction factor", name, sides=(own,))
    pred = mask if mask is not None else D.Const(True, "bool")
    lo, hi = iv.key_range(pred, j, iv.Box({box: (iv.I_LO, iv.I_HI)}))
    tile_box = iv.Box({box: (iv.I_LO, iv.I_HI), j: (iv.J_LO, iv.J_HI)})
    skip, full = iv.classify(pred, tile_box)
    sums, dskip, dfull = (), None, None
    if lift is None:   # data-dependent reads decided by per-tile summaries (data-derived block sparsity)
        sums = ds.summaries_of(pred, box, j)
        if sums:
            held = {x for sm in sums for x in (sm.lo, sm.hi)}
            dskip, dfull = (ds.no_wrap(t, held) for t in iv.classify(pred, ds.with_summaries(tile_box, sums)))
            used = set().union(*(sp.sympify(f).free_symbols for f in (dskip, dfull)))
            sums = tuple(s for s in sums if {s.lo, s.hi} & used)
            dskip, dfull = (dskip, dfull) if sums else (None, None)
    hop = _hop(mask, i, j, x.extent) if mask is not None and lift is None else None
    return Branch(kind, j, x.extent, mask, score, dot, x.value, lo, hi, skip, full, hop, mix,
                  source=x, lift=lift, mode=TILED if lift is None else "lift", span=iv.full_span(full),
                  summaries=sums, data_skip=dskip, data_full=dfull)


def index_ranges(sched, dims) -> dict:
    """Symbol -> (lo, hi) as floats for moa/value_bounds.py: the schedule's index variables in [0, extent - 1], the
    dims in [1, inf]; a residue schedule's re-indexed rows and lifted keys are left out (no bound through them)."""
    pairs = [*sched.lead, sched.col] + ([] if sched.lift is not None else [sched.row]) + \
        [(b.var, b.extent) for b in sched.branches if b.lift is None] + \
        [(b.dot.var, b.dot.extent) for b in sched.branches if b.dot is not None]
    out = {d: (1.0, math.inf) for d in dims}
    for v, ext in pairs:
        ext = sp.sympify(ext)
        out[v] = (0.0, float(ext) - 1 if ext.is_number else math.inf)
    return out


def scans_keys(sched, b) -> bool:
    """Whether the kernel runs branch b's key tiles through a scan (codegen/data_tiles.py): the skip test evaluated
    on many key tiles at once, then the kept tiles only, with no test around their loads. So for every tiled
    branch whose tiles need a skip test (one the loop bounds do not imply: a modular atom, data summaries); a
    split loop needs none, and lifted branches keep their tested loop."""
    if uses_summaries(sched, b):
        return True
    return b.mode == TILED and not b.split and not iv.skip_implied_by_range(b.skip, b.key_lo, b.key_hi)


def unknown_summaries(b) -> dict:
    """The substitution of branch b's summary symbols that says nothing of the data (every tile may hold any
    value): the tile tests the cost model counts without the inputs."""
    return {k: v for sm in b.summaries for k, v in sm.unknown.items()}


def uses_summaries(sched, b) -> bool:
    """Whether the kernel of `sched` tests branch b's tiles with the data's per-tile summaries: key tiles of
    contiguous row tiles (the tiled schedule; a residue schedule's rows are strided)."""
    return bool(b.summaries) and sched.kind == TILED and b.mode == TILED


def _split_guard(e):
    if isinstance(e, D.Op) and e.fn == "where" and D._is_zero(e.args[2]):
        return e.args[0], e.args[1]
    return None, e


def _find_mix(score, value, leadset, i, j, k):
    """score = E(+red_r w(j, r) * where(g(i, r), +red_k A(i,k) B(i,r,k), 0)) with the value the same r-sum
    of X(i, r, c): the window-mixing schedule (see Mix). Returns (score with MixTile, Mix) or (score, None)."""
    reds = [x for x in D.nodes(score) if isinstance(x, D.Reduce) and x.op == "sum"]
    if len(reds) < 1 or not (isinstance(value, D.Reduce) and value.op == "sum"):
        return score, None
    red = reds[0]
    r = red.var
    guard, body = _split_guard(red.body)
    if not (isinstance(body, D.Op) and body.fn == "mul"):
        return score, None
    for w, dot in (body.args, body.args[::-1]):
        if isinstance(dot, D.Reduce) and dot.op == "sum" and isinstance(dot.body, D.Op) and dot.body.fn == "mul" \
                and _free(w) <= leadset | {j, r}:
            kv = dot.var
            for a, b in (dot.body.args, dot.body.args[::-1]):
                if _free(a) <= leadset | {i, kv} and _free(b) <= leadset | {i, r, kv} and r in _free(b):
                    break
            else:
                continue
            break
    else:
        return score, None
    if guard is not None and not _free(guard) <= leadset | {i, r}:
        return score, None
    vguard, vbody = _split_guard(D.subs(value.body, {value.var: r}))
    if vguard != guard or sp.simplify(value.extent - red.extent) != 0:
        return score, None
    if not (isinstance(vbody, D.Op) and vbody.fn == "mul"):
        return score, None
    for vw, xv in (vbody.args, vbody.args[::-1]):
        if vw == w and _free(xv) <= leadset | {i, r} | (_free(xv) - leadset - {i, r, j}):
            break
    else:
        return score, None
    mix = Mix(r, red.extent, w, guard, a, b, kv, dot.extent, xv)

    def put(x):
        if x is red:
            return MixTile(k)
        kids = D.children(x)
        return D.with_children(x, [put(y) for y in kids]) if kids else x

    return put(score), mix


def _lifted(s: Schedule, stride: int) -> Schedule | None:
    """The residue schedule of stride s: branches of stride s lifted by `residue-lift` (key tiles in b-space),
    other branches with residue structure by their hops, the rest by diagonals j = i - t (or key tiles)."""
    i, n = s.row
    rl = row_lift(i, n, stride)
    leadset = {v for v, _ in s.lead} | {rl.res}
    out = []
    for k, b in enumerate(s.branches):
        if b.mix is not None:
            return None
        hit = LIFTING_RULES[0].apply(b.source, i, rl) if b.hop is not None and b.hop.stride == stride else None
        if hit is not None:
            out.append(_branch(s.output, hit[0], k, leadset | {hit[1].base}, i, s.col[0], box=rl.a, lift=hit[1]))
        elif b.hop is not None and b.hop.stride >= 2:
            out.append(replace(b, mode=HOPS))
        else:
            band = _band(b, i)
            out.append(replace(b, mode=HOPS, hop=band) if band is not None else b)
    if not any(b.mode == "lift" for b in out):
        return None
    return replace(s, branches=tuple(out), kind=RESIDUE, lift=rl)


def variants(s: Schedule) -> tuple:
    """The legal schedules of one output (the base tiled schedule first): hops when a branch has a residue
    conjunct of stride >= 2, and one residue lifting per such stride."""
    out = [s]
    if any(b.mix is not None for b in s.branches) or s.kind != TILED:
        return tuple(out)
    strides = sorted({b.hop.stride for b in s.branches if b.hop is not None and b.hop.stride >= 2})
    if strides:
        out.append(replace(s, kind=HOPS, branches=tuple(
            replace(b, mode=HOPS) if b.hop is not None and b.hop.stride >= 2 else b for b in s.branches)))
    for st in strides:
        v = _lifted(s, st)
        if v is not None:
            out.append(v)
    return tuple(out)


def label(s: Schedule) -> str:
    """'tiled', 'hops', 'residue s=16' or 'split(b0 tiled, b1 residue s=16)' (each branch's kernel)."""
    if s.kind == SPLIT:
        kinds = {k: label(v) for k, v in s.split.parts}
        kinds[s.split.last] = label(s.split.final)
        return f"{SPLIT}(" + ", ".join(f"b{k} {kinds[k]}" for k in sorted(kinds)) + ")"
    return f"{RESIDUE} s={s.lift.stride}" if s.kind == RESIDUE else s.kind


def show(s: Schedule) -> str:
    """The schedule in words and formulas (for `moa explain`)."""
    if s.kind == SPLIT:
        sp_ = s.split
        lines = [f"ONF {s.output} ({label(s)}): one kernel per branch; the values of branches "
                 + ", ".join(f"{k} -> {n}" for k, n in enumerate(sp_.names) if n)
                 + f" stored, then branch {sp_.last} with the epilogue reading them"]
        for _, v in sp_.parts:
            lines += ["  " + x for x in show(v).splitlines()]
        return "\n".join(lines + ["  " + x for x in show(sp_.final).splitlines()])
    i, n = s.row
    c, e = s.col
    lead = " * ".join(["batch"] + [sy.show(x) for _, x in s.lead])
    if s.kind == RESIDUE:
        rl = s.lift
        lines = [f"ONF {s.output} ({label(s)}): grid = (sum over residues {rl.res} < {rl.stride} of "
                 f"cdiv({sy.show(rl.rows)}, BLOCK_M), {lead})",
                 f"  residue lifting of the rows: {i} = {sy.show(rl.row)}  ({rl.res} = {i} mod {rl.stride}, "
                 f"{rl.a} < {sy.show(rl.rows)})",
                 f"  program_id(0) -> (residue {rl.res}, tile of {rl.a}); {rl.a} -> tile * BLOCK_M + arange(BLOCK_M)"
                 f"    {c} -> arange(BLOCK_E) (< {sy.show(e)})"]
    else:
        lines = [f"ONF {s.output}" + (f" ({s.kind})" if s.kind != TILED else "") + f": grid = (cdiv({sy.show(n)}, "
                 f"BLOCK_M), {lead})",
                 f"  {i} -> program_id(0) * BLOCK_M + arange(BLOCK_M)    {c} -> arange(BLOCK_E) (< {sy.show(e)})"]
    for v, x in s.lead:
        lines.append(f"  {v} -> decoded from program_id(1) (extent {sy.show(x)})")
    for k, b in enumerate(s.branches):
        if b.mode == "lift":
            lk = b.lift
            rho = "" if lk.base == s.lift.res else f", {lk.base} = {sy.show(lk.base_value)}"
            lines.append(f"  branch {k} ({b.kind}): lifted by residue-lift: {i} = {sy.show(s.lift.row)}, keys "
                         f"{lk.var} = {sy.show(lk.key)}{rho} ({b.var} < {sy.show(lk.keys)}); "
                         f"{b.var} -> loop over BLOCK_N tiles")
            lo = "0" if b.key_lo is None else f"max(0, {sy.show(b.key_lo)})"
            hi = f"{sy.show(lk.keys)} - 1" if b.key_hi is None else f"min({sy.show(lk.keys)} - 1, {sy.show(b.key_hi)})"
            lines.append(f"    {b.var} visited for {s.lift.a} in [I_LO, I_HI]: [{lo}, {hi}]")
            lines.append(f"    tile skipped if {b.skip};  mask-free if {b.full}  ({s.lift.a}-tile x {b.var}-tile box)")
        elif b.mode == HOPS:
            h = b.hop
            how = "residue re-indexing" if h.stride > 1 else "diagonals (per-row window)"
            lines.append(f"  branch {k} ({b.kind}): {how}: {b.var} = {sy.show(h.key)}, loop over hops {h.var} in "
                         f"[{sy.show(h.t_lo)}, {sy.show(h.t_hi)}] for rows in [I_LO, I_HI] (one key per row per hop)")
        elif b.mix is not None:
            lines.append(f"  branch {k} ({b.kind}, window mixing): the window kernel, not key tiles: per row the "
                         f"{sy.show(b.mix.extent)} hop dot products over {b.mix.kvar}, mixed by one tl.dot")
        else:
            lines.append(f"  branch {k} ({b.kind}): {b.var} -> loop over BLOCK_N tiles of {sy.show(b.extent)}")
            lo = "0" if b.key_lo is None else f"max(0, {b.key_lo})"
            hi = f"{sy.show(b.extent)} - 1" if b.key_hi is None else f"min({sy.show(b.extent)} - 1, {b.key_hi})"
            lines.append(f"    keys visited for rows [I_LO, I_HI]: [{lo}, {hi}]")
            lines.append(f"    tile skipped if {b.skip};  mask-free if {b.full}")
            if uses_summaries(s, b):
                over = {"row": "over the row tile", "key": "over the key tile", "program": "fixed per program",
                        "pair": "over the tile pair"}
                reads = ", ".join(f"{D.show(sm.read)} {over[sm.axis]}" for sm in b.summaries)
                lines.append(f"    with the data (per-tile min / max of {reads}): skipped if {b.data_skip};  "
                             f"mask-free if {b.data_full}")
            if scans_keys(s, b):
                lines.append("    key loop: the skip test on 64 key tiles at a time, then the kept tiles only")
            if b.hop is not None:
                h = b.hop
                lines.append(f"    residue re-indexing: {b.var} = {sy.show(h.key)}, hops {h.var} in "
                             f"[{sy.show(h.t_lo)}, {sy.show(h.t_hi)}] (schedules hops and residue)")
        if b.dot is not None:
            lines.append(f"    tl.dot: [{i} x {b.dot.var}] {D.show(b.dot.a)}  .  [{b.var} x {b.dot.var}] "
                         f"{D.show(b.dot.b)}  (contract {b.dot.var} < {sy.show(b.dot.extent)})")
        lines.append(f"    mask: {D.show(b.mask) if b.mask is not None else 'none'}")
        lines.append(f"    score: {D.show(b.score)}")
        lines.append(f"    value: {D.show(b.value)}")
    lines.append(f"  epilogue: {D.show(s.epilogue)}")
    return "\n".join(lines)
