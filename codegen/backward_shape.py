"""Which outputs have fused backward kernels (codegen/backward.py): a tiled key loop of one branch (or of each branch,
moa/split.py `branch_alone`) whose contraction operands and value are plain reads of inputs (or elementwise
functions of one read), whose score reaches its contraction through smooth ops, and whose inputs are not named like
the kernels' buffers. `unfused_reason` says why not; the runtime then evaluates the gradient DNF."""
from __future__ import annotations

import sympy as sp

from moa import dnf as D
from moa import ir
from moa import symbolic as sy
from moa.grad_sym import Translation, is_smooth_op
from moa.onf import TILED, BranchValue, DotTile, Schedule
from moa.program import Program
from moa.score_parts import holds_reduction
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


def score_reads(score, operands: set) -> list:
    """The float input reads of a score other than the contraction (bias tables, gates), each once, whose
    gradient the kernels take by atomic adds: every read of that input is a leaf of the score's sympy translation
    (reached through smooth ops). An input also read under a where (a non-smooth leaf) is left out: its gradient
    runs unfused (the gradient DNF), where the kernels would have given it none for that read."""
    leaves = Translation(score).leaves.values()
    hidden = {x.name for leaf in leaves if not isinstance(leaf, D.Read) for x in D.nodes(leaf)
              if isinstance(x, D.Read)}
    return list(dict.fromkeys(x for x in D.nodes(score) if isinstance(x, D.Read) and x.dtype == ir.FLOAT
                              and x.name not in operands and x.name not in hidden))


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


def _single_reason(program: Program, sched: Schedule) -> str | None:
    b = sched.branches[0]
    if b.mix is not None:
        return "window mixing has no fused backward yet"
    if sched.kind != TILED or b.mode != TILED or b.dot is None or b.lift is not None:
        return "the branch is not a plain key-tile loop with a q . k contraction"
    names = {n.attrs[0] for n in program.inputs}
    if names & BUFFERS or any(n.startswith("grad_") for n in names):
        return f"an input is named like a buffer of the backward kernels ({', '.join(sorted(BUFFERS))}, grad_*)"
    i, c, j, kv = sched.row[0], sched.col[0], b.var, b.dot.var
    tiles = {i, c, j, kv}
    qa, kb = operand_read(b.dot.a, (i, kv), tiles), operand_read(b.dot.b, (j, kv), tiles)
    if qa is None or kb is None or not _plain_read(b.value, (j, c), tiles):
        return "the contraction operands or the value are not (functions of) plain reads of inputs"
    for read, tail in ((qa, (sched.row[1], b.dot.extent)), (kb, (b.extent, b.dot.extent)),
                       (b.value, (b.extent, sched.col[1]))):
        shape = program.input_map[read.name].shape
        if not all(sy.prove_equal(x, y) for x, y in zip(shape[len(shape) - 2:], tail)):
            return (f"{read.name}'s last two axes are not the tile's rows and columns (a slice of the input, as "
                    f"take(t, {read.name}[...]), gets its gradient unfused)")
    if holds_reduction(b.score, b.mask):
        return "the score or mask holds a reduction over one side (a norm, a row or key bias)"
    if DotTile(0) not in Translation(b.score).leaves.values():
        return "the score reaches its contraction through an op with no derivative rule (a where inside the score)"
    qkv = {qa.name, kb.name, b.value.name}
    for part in (b.score, b.mask):
        if part is not None and any(isinstance(x, D.Read) and x.name in qkv for x in D.nodes(part)):
            return "the score or mask reads Q, K or V outside the contraction"
    return None
