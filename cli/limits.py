"""Size limits of the command line, checked before any work: the memory `moa check` would take (it evaluates the
program unfused on the CPU in float64), and the (query, key) index pairs `moa cost` and `moa explain --tiles`
evaluate the mask on. A size over a limit is an InputError that says how much it would take and suggests smaller
dims, instead of an allocation failure, a killed process or hours of work."""
from __future__ import annotations

import math

import sympy as sp

from moa import cost as C
from moa import symbolic as sy
from moa.errors import InputError, MoaError

CHECK_BYTES = 2 * 2 ** 30   # what `moa check` may hold: inputs, outputs and the unfused reference's intermediates
INDEX_PAIRS = 2 ** 37       # (query, key) pairs `moa cost` evaluates in a few minutes (about 1e9 a second)
ELT = 8                     # float64 (and int64) elements


def _bytes(x: float) -> str:
    for p, s in ((2 ** 40, "TiB"), (2 ** 30, "GiB"), (2 ** 20, "MiB"), (2 ** 10, "KiB")):
        if x >= p:
            return f"{x / p:.3g} {s}"
    return f"{int(x)} B"


def _shrink(dims: dict, measure, budget: float) -> dict | None:
    """`dims` with its largest dims halved until measure(dims) fits the budget (None if it never does)."""
    d = dict(dims)
    for _ in range(256):
        if measure(d) <= budget:
            return d
        top = max(d.values(), default=0)
        if top <= 1:
            return None
        d = {k: (v + 1) // 2 if v == top else v for k, v in d.items()}
    return None


def _suggest(dims: dict, measure, budget: float) -> str:
    d = _shrink(dims, measure, budget)
    return f"; try smaller dims, e.g. --dims {','.join(f'{k}={v}' for k, v in d.items())}" if d else ""


def check_footprint(k, batch: int, grad: bool = False):
    """A function dims -> bytes `moa check` holds at once, about: float64 inputs and outputs, plus twice every
    intermediate the unfused reference materialises (moa.cost.eager_plan: the [n, m] scores, the mask, the
    probabilities ...; the IR reference and the DNF evaluation each make them), times the batch; --grad keeps
    them for the backward and adds their gradients (x 3). Measured: causal n=3000, d=e=16, batch 2 peaks at
    about 1.0 GB above the interpreter's own, estimated 1.1 GB."""
    p = k.program
    b = max(1, batch)
    arrays = sum((sy.product(n.shape) for n in p.inputs), sp.Integer(0)) + \
        sum((sy.product(node.shape) for _, node in p.outputs), sp.Integer(0))
    total = arrays * ELT * b
    try:
        for name in k.output_names:
            total += 2 * C.eager_plan(k.schedules[name], ELT, b).intermediate_bytes
    except (MoaError, KeyError):   # an output without an eager plan: its inputs and outputs only
        pass
    total *= 3 if grad else 1
    return lambda dims: float(sy.evaluate(total, dims))


def check_budget(k, dims: dict, batch: int, grad: bool = False) -> None:
    """Refuse a `moa check` whose float64 arrays would exceed CHECK_BYTES."""
    need = check_footprint(k, batch, grad)
    got = need(dims)
    if got <= CHECK_BYTES:
        return
    shown = ",".join(f"{a}={v}" for a, v in dims.items())
    hint = _suggest(dims, need, CHECK_BYTES)
    if batch > 1:
        hint += f" (or a smaller --batch than {batch})"
    what = "float64 inputs, outputs and the unfused intermediates of the IR reference and the DNF evaluation" + \
        (", x 3 for --grad" if grad else "") + (f", batch {batch}" if batch > 1 else "")
    raise InputError(f"--dims {shown}: moa check would need about {_bytes(got)} of memory ({what}), more than its "
                     f"budget of {_bytes(CHECK_BYTES)}{hint}")


def index_pairs(k, dims: dict) -> float:
    """(query, key) index pairs the cost model evaluates: rows x keys of every branch, times the leading extents
    (heads), of every output; dims missing from `dims` count as 64 (head dims) ."""
    env = {**{d.name: 64 for d in k.program.dims}, **dims}
    total = 0.0
    for name in k.output_names:
        s = k.schedules[name]
        lead = math.prod(float(sy.evaluate(x, env)) for _, x in s.lead)
        rows = float(sy.evaluate(s.row[1], env))
        total += sum(rows * float(sy.evaluate(b.extent, env)) for b in s.branches) * lead
    return total


def grid_budget(k, dims: dict, flag: str) -> None:
    """Refuse `moa cost` at dims (or `moa explain --tiles`) whose index grid exceeds INDEX_PAIRS."""
    got = index_pairs(k, dims)
    if got <= INDEX_PAIRS:
        return
    shown = ",".join(f"{a}={v}" for a, v in dims.items())
    raise InputError(f"--dims {shown}: {flag} evaluates the mask on every (query, key) index pair of every head, "
                     f"{got:.3g} pairs here, more than the {INDEX_PAIRS:.3g} (2^37) it does in a few minutes"
                     f"{_suggest(dims, lambda d: index_pairs(k, d), INDEX_PAIRS)}"
                     + ("; or omit --dims for the formulas in the dims" if flag == "moa cost" else ""))
