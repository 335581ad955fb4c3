"""Branch splitting: an output with several branches run as one kernel per branch, each in a schedule of its own.

An output whose DNF is an epilogue over K monoid branches,
    O[lead, i, c] = E(o_0[lead, i, c], ..., o_{K-1}[lead, i, c], reads at (lead, i)),
runs in one kernel when every branch suits the same schedule. PiAttention's local window wants key tiles over
contiguous rows, its strided branch (keys i - s t) wants residue-lifted rows (i = r + s a, tensor cores in b-space):
no single schedule of the output serves both (the residue schedule walks the window by per-row hops, the tiled one
computes the strided branch on every causal tile). Splitting runs each branch alone (`branch_alone`: its value
o_k = softmax over its keys @ V, or the normalised sum), stores the values of all branches but one, `last`, in the
accumulation dtype, and runs `last` with the epilogue, whose other branch values become reads of those stored arrays
(`final`). Each kernel takes any legal schedule of its branch alone (moa/onf.py `variants`).

    E(o_0, ..., o_{K-1}) = E(stored o_0, ..., o_last, ..., stored o_{K-1})     (the values are the same arrays)

The cost: each stored value written once and read once (n e elements per leading instance), and one launch per
branch. moa/schedule_cost.py predicts a split like any schedule, so the runtime picks it only where it is faster."""
from __future__ import annotations

import itertools
from dataclasses import dataclass, replace

from . import dnf as D
from . import ir
from . import onf

@dataclass(frozen=True)
class Split:
    """The kernels of a split schedule in launch order: `parts` (branch k alone, output `names[k]`, stored), then
    `final` (branch `last` with the epilogue, reading the stored values by their names)."""
    parts: tuple        # (branch index, Schedule), launch order
    last: int
    final: onf.Schedule
    names: tuple        # per branch: the stored value's array name ('' for `last`)

    @property
    def kernels(self) -> tuple:
        """Every kernel's schedule in launch order (the parts, then the final one)."""
        return tuple(s for _, s in self.parts) + (self.final,)


def _retile(e, k: int):
    """e with branch k's contraction tile renamed DotTile(0) (the tile of a single-branch schedule)."""
    if e == onf.DotTile(k):
        return onf.DotTile(0)
    kids = D.children(e)
    return D.with_children(e, [_retile(x, k) for x in kids]) if kids else e


def branch_alone(sched: onf.Schedule, k: int) -> onf.Schedule:
    """Branch k of a schedule alone, as its own output: O_k[i, c] = its softmax (or normalised) sum."""
    b = sched.branches[k]
    return replace(sched, branches=(replace(b, score=_retile(b.score, k)),), epilogue=onf.BranchValue(0))


def value_vars(sched: onf.Schedule) -> tuple:
    """The index variables of a branch value, o_k[lead..., i, c]."""
    return tuple(v for v, _ in sched.lead) + (sched.row[0], sched.col[0])


def value_shape(sched: onf.Schedule) -> tuple:
    """The shape of a stored branch value: [lead extents..., n, e]."""
    return tuple(x for _, x in sched.lead) + (sched.row[1], sched.col[1])


def value_input(sched: onf.Schedule, name: str) -> ir.Node:
    """The IR input node of a stored branch value (a float array of `value_shape`)."""
    return ir.input_(name, value_shape(sched), ir.FLOAT)


def with_values(e, values: dict):
    """The epilogue e with BranchValue(k) replaced by values[k] (k in values; the others kept)."""
    if isinstance(e, onf.BranchValue):
        return values.get(e.branch, e)
    kids = D.children(e)
    return D.with_children(e, [with_values(x, values) for x in kids]) if kids else e


def value_reads(sched: onf.Schedule, names: dict) -> dict:
    """Branch k -> the read names[k][lead, i, c] of its stored value."""
    idx = value_vars(sched)
    return {k: D.Read(n, idx, ir.FLOAT) for k, n in names.items()}


def final(sched: onf.Schedule, last: int, names: tuple) -> onf.Schedule:
    """Branch `last` alone with the output's epilogue, the other branches' values read from their stored arrays:
    E(o_0, ..., o_last, ...) with o_k (k != last) -> names[k][lead, i, c]."""
    reads = value_reads(sched, {k: n for k, n in enumerate(names) if k != last})
    return replace(branch_alone(sched, last), epilogue=with_values(sched.epilogue, {**reads, last: onf.BranchValue(0)}))


def splittable(sched: onf.Schedule) -> bool:
    """Whether an output can split: several branches, none mixing windows, the base (tiled) schedule."""
    return len(sched.branches) >= 2 and sched.kind == onf.TILED and all(b.mix is None for b in sched.branches)


def variants(sched: onf.Schedule, names: tuple) -> tuple:
    """The split schedules of an output (none unless `splittable`): one per choice of a legal schedule for every
    branch alone, except the all-tiled choice (the fused tiled kernel does the same work without the stores).
    The final kernel takes the last branch whose choice is tiled (plain rows), else the last branch; its schedule
    is the same kind of the final program. `names[k]`: the array name of branch k's stored value."""
    if not splittable(sched):
        return ()
    per = [onf.variants(branch_alone(sched, k)) for k in range(len(sched.branches))]
    out = []
    for combo in itertools.product(*per):
        if all(v.kind == onf.TILED for v in combo):
            continue
        plain = [k for k, v in enumerate(combo) if v.kind == onf.TILED]
        last = plain[-1] if plain else len(combo) - 1
        fin = next((v for v in onf.variants(final(sched, last, names)) if onf.label(v) == onf.label(combo[last])),
                   None)
        if fin is None:
            continue
        parts = tuple((k, replace(v, output=names[k])) for k, v in enumerate(combo) if k != last)
        kept = tuple("" if k == last else n for k, n in enumerate(names))
        out.append(replace(sched, kind=onf.SPLIT, split=Split(parts, last, fin, kept)))
    return tuple(out)

