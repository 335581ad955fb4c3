"""Which outputs have fused backward kernels (codegen/backward.py): a tiled key loop of one branch (or of each branch,
moa/split.py `branch_alone`) whose contraction operands and value are computed from the inputs on their own tiles
(plain reads, elementwise functions of one read, or any expression of the tile's own variables that the gradient
rules differentiate: its gradient is pulled back, moa/pullback.py), whose score reaches its contraction through
smooth ops, and whose inputs are not named like the kernels' buffers. `unfused_reason` says why not; the runtime
then evaluates the gradient DNF."""
from __future__ import annotations

import sympy as sp

from moa import dnf as D
from moa import ir
from moa import symbolic as sy
from moa.grad_sym import Translation, is_smooth_op
from moa.onf import TILED, BranchValue, DotTile, Schedule
from moa.errors import UnsupportedError
from moa.program import Program
from moa.pullback import outputs, pullback_grad, pullback_reason, pulled_inputs, role_output, score_reductions
from moa.split import branch_alone

BUFFERS = frozenset({"dO", "lse", "delta", "dQ", "dK", "dV"})   # the kernels' own pointer names (X_ptr)


def _plain_read(e, last: tuple, tile_vars: set):
    """e is a read X[g(lead)..., last...] of a float input whose leading indices use no tile variable."""
    if not isinstance(e, D.Read) or e.dtype != ir.FLOAT or len(e.index) < len(last):
        return False
    tail = tuple(sp.sympify(x) for x in e.index[len(e.index) - len(last):])
    head = [sp.sympify(x) for x in e.index[:len(e.index) - len(last)]]
    return tail == tuple(last) and not any(x.free_symbols & tile_vars for x in head)


def operand_read(e, last: tuple, tile_vars: set):
    """The read of a dot operand: e itself when a plain read, or the one plain read of an elementwise expression of
    it (elu(Q[i, k]) + 1); None otherwise."""
    if _plain_read(e, last, tile_vars):
        return e
    if not is_smooth_op(e):
        return None
    reads = [x for x in D.nodes(e) if isinstance(x, D.Read)]
    rest_ok = all(isinstance(x, (D.Read, D.Const)) or is_smooth_op(x) or isinstance(x, D.Index) and x.expr.is_number
                  for x in D.nodes(e))
    return reads[0] if len(set(reads)) == 1 and rest_ok and _plain_read(reads[0], last, tile_vars) else None


def hidden_reads(score, pieces: bool = False, skip=frozenset()) -> set:
    """The inputs a score reads inside a leaf of its sympy translation other than a read or (`pieces`) a where's
    test, or the leaves in `skip` (the score's pulled-back norms): reads the kernels cannot differentiate."""
    leaves = Translation(score, pieces).leaves.values()
    return {x.name for leaf in leaves if not isinstance(leaf, D.Read) and not (pieces and leaf.dtype == ir.BOOL)
            and leaf not in skip for x in D.nodes(leaf) if isinstance(x, D.Read)}


def score_reads(score, pieces: bool = False) -> list:
    """The float input reads of a score other than the contraction (bias tables, gates, Q or K read outside it),
    each once, whose gradient the kernels take by atomic adds: every read of that input is a leaf of the score's
    sympy translation (reached through smooth ops) or sits in a condition (`pieces`: a where's test, whose
    derivative is 0). An input also read inside another non-smooth leaf (a norm) is left out: its gradient runs
    unfused (the gradient DNF) or is pulled back (moa/pullback.py)."""
    hidden = hidden_reads(score, pieces)
    return list(dict.fromkeys(x for x in D.nodes(score) if isinstance(x, D.Read) and x.dtype == ir.FLOAT
                              and x.name not in hidden))


def is_multi(sched: Schedule) -> bool:
    """Several branches, or an epilogue around the branch (a gate): each branch gets the single-branch kernels
    (moa/split.py `branch_alone`) and the runtime differentiates the epilogue."""
    return len(sched.branches) != 1 or sched.epilogue != BranchValue(0)


def unfused_reason(program: Program, sched: Schedule) -> str | None:
    """None when the output has fused backward kernels (for several branches: each branch has), else why not."""
    if len(program.outputs) != 1:
        return "several outputs"
    if is_multi(sched):
        if any(b.mix is not None for b in sched.branches):
            return "window mixing has no fused backward yet"
        for k in range(len(sched.branches)):
            why = _single_reason(program, branch_alone(sched, k))
            if why:
                return f"branch {k}: {why}"
        return None
    return _single_reason(program, sched)


def roles(program: Program, sched: Schedule) -> tuple[dict, str | None]:
    """(role -> how the kernels' dQ, dK, dV buffer becomes input gradients, why not). Q and K: the operand's read,
    when the operand is that read or an elementwise function of it (the kernels apply the chain rule); V: the value's
    read, when a plain one. The read's input must be laid out as the tile (its last two axes the tile's). Else None:
    the buffer is the gradient of the operand or value expression itself, pulled back to the inputs it reads by its
    gradient DNF (moa/pullback.py: rotary embeddings, norms, slices)."""
    b = sched.branches[0]
    i, c, j, kv = sched.row[0], sched.col[0], b.var, b.dot.var
    tiles = {i, c, j, kv}
    found = {"Q": (operand_read(b.dot.a, (i, kv), tiles), (sched.row[1], b.dot.extent)),
             "K": (operand_read(b.dot.b, (j, kv), tiles), (b.extent, b.dot.extent)),
             "V": (b.value if _plain_read(b.value, (j, c), tiles) else None, (b.extent, sched.col[1]))}
    out = {}
    for role, (read, tail) in found.items():
        shape = program.input_map[read.name].shape if read is not None else ()
        if read is not None and all(sy.prove_equal(x, y) for x, y in zip(shape[len(shape) - 2:], tail)):
            out[role] = read
            continue
        why = pullback_reason(sched, role)
        if why:
            return out, why
        out[role] = None
    return out, None


def schedule_reason(program: Program, sched: Schedule) -> str | None:
    """None when one single-branch schedule has fused backward kernels (whatever else the program outputs: a
    ring's block program holds one output per branch), else why not."""
    return _single_reason(program, sched)


def _single_reason(program: Program, sched: Schedule) -> str | None:
    b = sched.branches[0]
    if b.mix is not None:
        return "window mixing has no fused backward yet"
    if sched.kind != TILED or b.mode != TILED or b.dot is None or b.lift is not None:
        return "the branch is not a plain key-tile loop with a q . k contraction"
    names = {n.attrs[0] for n in program.inputs}
    if names & BUFFERS or any(n.startswith("grad_") for n in names):
        return f"an input is named like a buffer of the backward kernels ({', '.join(sorted(BUFFERS))}, grad_*)"
    found, why = roles(program, sched)
    if why:
        return why
    reds, why = score_reductions(sched)
    if why:
        return why
    if DotTile(0) not in Translation(b.score, pieces=True).leaves.values():
        return "the score reaches its contraction through an op with no derivative rule (a comparison of it)"
    pulled = tuple(r for r, read in found.items() if read is None)
    qkv = {read.name for read in found.values() if read is not None} | \
        set(pulled_inputs([role_output(sched, r) for r in pulled]))
    # Q, K or V read in the score outside the contraction get atomic adds like any score read (a mask's reads have
    # no derivative); not where an op without a derivative rule hides the read
    hidden = hidden_reads(b.score, True, {leaf for leaf, _ in reds}) & qkv
    if hidden:
        return (f"the score reads {', '.join(sorted(hidden))} (an input of the contraction operands or the value) "
                "inside an op with no derivative rule")
    outs = outputs(sched, pulled)
    if outs:
        try:
            pullback_grad(program, outs)
        except UnsupportedError as ex:
            return str(ex)
    return None
