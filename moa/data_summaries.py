"""Data-dependent reads of a mask decided per tile (data-derived block sparsity): integer and boolean inputs whose
(min, max) over a row tile, a key tile, a (row tile, key tile) pair, or one value per program, a pre-pass or the
kernel itself provides. In the tile box such a read ranges over its summary's [min, max], and intervals.classify
decides the predicate with them as it decides index comparisons."""
from __future__ import annotations

from dataclasses import dataclass

import sympy as sp

from . import dnf as D
from . import ir
from . import symbolic as sy
from .intervals import Box

UNKNOWN = sp.oo   # a summary without data: min -oo, max oo (the tile may hold any value: every threshold)


@dataclass(frozen=True)
class Summary:
    """The min and max of an integer or boolean input read by a mask (booleans as 0/1: max = any, min = all), over
    the row tile (axis "row": index position `pos` of the read is the row variable) or the key tile ("key"); the
    read's other indices are leading (fixed per program). A pre-pass computes them from the data; the tile tests
    compare them (intervals of the reads) as they compare index ranges. Axis "program": a read whose indices are
    all leading (a length L[b], a flag per head: pos -1), one value per program, loaded by the kernel itself
    (min = max = the value). Axis "pair": a table read at a function of the row in position `pos` and a function
    of the key in position `kpos` (a block mask blk[i // B, j // B], a dense mask M[i, j]), summarised per
    (row tile, key tile)."""
    read: D.Read
    axis: str
    pos: int
    lo: sp.Symbol
    hi: sp.Symbol
    placeholder: sp.Symbol
    kpos: int = -1

    @property
    def gathered(self) -> bool:
        """A row or key read at a function of its variable (flag[j // 2], grp[i // 16]): the pre-pass gathers the
        input at that function of every row (key) before it reduces per tile."""
        return self.axis in ("row", "key") and not sp.sympify(self.read.index[self.pos]).is_Symbol

    @property
    def unknown(self) -> dict:
        """The substitution that makes the summary say nothing (no data)."""
        return {self.lo: -UNKNOWN, self.hi: UNKNOWN}


def summaries_of(pred, row: sp.Symbol, key: sp.Symbol) -> tuple:
    """The reads of a mask predicate that a per-tile summary can decide: integer or boolean inputs indexed by the
    row (or key) variable, or a function of it alone (flag[j // 2]; of the key and dims), in one position and by
    leading variables and dims elsewhere (doc[i], glob[j], seg[h, i], keep[a // (h // g), j]), by those only (a key
    length L[b]: one value per program), or by a function of the row alone in one position and of the key alone in
    another (blk[i // B, j // B]: per pair of tiles)."""
    out = {}
    for x in D.nodes(pred):
        if not isinstance(x, D.Read) or x.dtype not in (ir.INT, ir.BOOL) or x in out:
            continue
        index = [sp.sympify(ix) for ix in x.index]
        fixed = [not (ix.free_symbols & {row, key}) for ix in index]   # leading indices and dims (a // (h // g))
        if all(fixed):
            tag = f"{x.name}_program{len(out)}"
            out[x] = Summary(x, "program", -1, sp.Symbol(f"{tag}_min", integer=True),
                             sp.Symbol(f"{tag}_max", integer=True), sp.Symbol(f"{tag}_value", integer=True))
            continue
        for var, axis in ((row, "row"), (key, "key")):   # the variable itself, else one function of it alone
            pos = [k for k, ix in enumerate(index) if ix == var] or \
                [k for k, ix in enumerate(index) if _function_of(ix, var, axis)]
            if len(pos) == 1 and all(f for k, f in enumerate(fixed) if k != pos[0]):
                tag = f"{x.name}_{axis}{len(out)}"
                out[x] = Summary(x, axis, pos[0], sp.Symbol(f"{tag}_min", integer=True),
                                 sp.Symbol(f"{tag}_max", integer=True), sp.Symbol(f"{tag}_value", integer=True))
                break
        else:   # a function of the row alone at one position, of the key alone at another (constants aside)
            rows = [k for k, ix in enumerate(index) if ix.free_symbols == {row}]
            keys = [k for k, ix in enumerate(index) if ix.free_symbols == {key}]
            if len(rows) == 1 and len(keys) == 1 and all(f for k, f in enumerate(fixed) if k not in rows + keys):
                tag = f"{x.name}_pair{len(out)}"
                out[x] = Summary(x, "pair", rows[0], sp.Symbol(f"{tag}_min", integer=True),
                                 sp.Symbol(f"{tag}_max", integer=True), sp.Symbol(f"{tag}_value", integer=True),
                                 keys[0])
    return tuple(out.values())


def _function_of(ix, var, axis: str) -> bool:
    """Whether a row (key) read's index is a function of the row (key) alone that a gathered summary can follow: of
    the key and dims (a split-KV block reads flag[(j + C - 1) // 2], its first key C shared by the launch's
    programs, each summary pointer moved to its split's tile); of the row alone (a block's first row differs per
    program where the valid lengths do, and one gathered summary cannot follow it)."""
    return (sy.variables(ix) if axis == "key" else ix.free_symbols) == {var}


def with_summaries(box: Box, summaries, axes=("row", "key", "program", "pair")) -> Box:
    """The box with the reads of these summaries (on the given axes) ranging over their per-tile min and max."""
    sums = [s for s in summaries if s.axis in axes]
    return Box({**box.ranges, **{s.placeholder: (s.lo, s.hi) for s in sums}},
               {**box.reads, **{s.read: s.placeholder for s in sums}})


def no_wrap(e, data=frozenset()):
    """A tile test with every comparison `sum op 0` rewritten so that no sum or difference involves data near the
    ends of its integer type (int32 or int64 ids, hashed document ids, a length of 2^31 - 1 meaning "no limit"):
    a comparison with one data symbol (of `data`, the summaries' min / max) of coefficient +-1 keeps it alone on one
    side (i - j < L: I_LO - J_HI >= L_max skips, never I_LO >= J_HI + L_max); otherwise `(its positive terms) op
    (its negated negative terms)`: doc_min - doc_max > 0 becomes doc_min > doc_max. The same truth value over the
    integers; the kernel and the cost model both evaluate this form."""
    def split(r):
        terms = sp.Add.make_args(sp.expand(r.lhs - r.rhs))
        held = [t for t in terms if t.free_symbols & data]
        if len(held) == 1 and len(held[0].free_symbols & data) == 1:
            coeff, sym = held[0].as_coeff_Mul()
            if coeff in (1, -1) and sym.is_Symbol:
                rest = sp.Add(*[t for t in terms if t is not held[0]])
                # sym + rest op 0  ->  sym op -rest;   -sym + rest op 0  ->  rest op sym
                return r.func(sym, -rest, evaluate=False) if coeff == 1 else r.func(rest, sym, evaluate=False)
        pos, neg = [], []
        for t in terms:
            (neg if t.could_extract_minus_sign() else pos).append(t)
        return r.func(sp.Add(*pos), -sp.Add(*neg), evaluate=False)

    e = sp.sympify(e)
    return e.replace(lambda x: isinstance(x, sp.core.relational.Relational), split) if e.free_symbols else e
