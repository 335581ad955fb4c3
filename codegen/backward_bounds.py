"""The query tiles a key tile of the dK/dV backward kernel can need: bounds read off the skip test of the schedule.

The skip test is a disjunction over the tile box (I_LO, I_HI, J_LO, J_HI). A disjunct `c0 + J - I_HI > 0` (or >= 0)
whose only row symbol is I_HI with coefficient -1 says every row tile whose last row is below a bound is skipped
(causal: I_HI < J_LO); one with I_LO and coefficient +1 says every row tile whose first row is above a bound is
skipped (a window: I_LO > J_HI + w). A row tile that is not the last has I_HI = I_LO + BLOCK_M - 1, so the tiles
before the first one that can reach the lower bound, and those after the last one that starts within the upper
bound, are skipped; the kernel loops over the rest and still tests each."""
from __future__ import annotations

import sympy as sp

from moa import intervals as iv

_ROWS = {iv.I_LO, iv.I_HI}


def _disjuncts(skip) -> list:
    if skip is sp.false or skip is sp.true:
        return []
    return list(skip.args) if isinstance(skip, sp.Or) else [skip]


def _bound(rel, row):
    """(rest, strict) for rel = (rest - row > 0) or (>= 0) with rest free of the row symbols (coefficient -1 on
    `row`), as a positive form c * row + rest with c = -1; None otherwise. For I_LO the sign is flipped."""
    if not isinstance(rel, (sp.StrictGreaterThan, sp.GreaterThan)):
        return None
    e = sp.expand(rel.lhs - rel.rhs)
    c = e.coeff(row)
    rest = sp.expand(e - c * row)
    if rest.free_symbols & _ROWS or not rest.is_polynomial() or c not in (-1, 1):
        return None
    return c, rest, isinstance(rel, sp.StrictGreaterThan)


def row_bounds(skip) -> tuple:
    """(lo, hi) sympy expressions in the key box and dims: rows below `lo` and rows above `hi` are in skipped row
    tiles (lo: skipped when I_HI < lo; hi: skipped when I_LO > hi); None where the test gives no such bound."""
    lo = hi = None
    for d in _disjuncts(skip):
        b = _bound(d, iv.I_HI)
        if b is not None and b[0] == -1:   # rest - I_HI > 0: skipped while I_HI < rest (<= rest - 1 if >=)
            bound = b[1] if b[2] else b[1] + 1
            lo = bound if lo is None else sp.Max(lo, bound)
        b = _bound(d, iv.I_LO)
        if b is not None and b[0] == 1:    # I_LO + rest > 0: skipped while I_LO > -rest (>= -rest if >=)
            bound = -b[1] if b[2] else -b[1] - 1
            hi = bound if hi is None else sp.Min(hi, bound)
    return lo, hi


def query_loop(skip, code, n: str) -> tuple:
    """(first, stop) code of the dK/dV kernel's loop over query tiles: `code` prints a formula over the key box
    (col_lo, col_hi) and dims; n is the code of the row extent. Rows below lo start at the tile holding lo; rows
    above hi end the loop after the tile holding hi."""
    lo, hi = row_bounds(skip)
    first = "0" if lo is None else f"(tl.maximum({code(lo)}, 0) // BLOCK_M) * BLOCK_M"
    stop = n if hi is None else f"tl.minimum({n}, ((tl.maximum({code(hi)}, -1) + BLOCK_M) // BLOCK_M) * BLOCK_M)"
    return first, stop
