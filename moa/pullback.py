"""The operand pullback: gradients through the functions that make a contraction's operands and the value.

A softmax-family branch O[i, c] = sum_j P_ij Vt[j, c] with s_ij = f(sum_k A[i, k] B[j, k], ...) reads its operand
tiles A (rows), B (keys) and the value Vt through expressions of the inputs: rotary embeddings
A[i, k] = Q[i, k] cos(i t_k) + sign_k Q[i, (k + d/2) % d] sin(i t_k), a norm A[i, k] = Q[i, k] rsqrt(mean(Q[i]^2) +
eps) w[k], a slice Q[i + p, k]. The fused backward kernels (codegen/backward.py) compute those tiles as the forward
does and return the gradients of the tiles themselves, dA[i, k] = sum_j dS_ij B[j, k], dB and dVt. The chain rule
then ends in an O(n d) pass with no key axis:

    dQ[u] = sum over the points (i, k) of A's index space of dA[i, k] dA[i, k]/dQ[u]

which is the gradient DNF (moa/grad.py) of the output `A` (vars lead, i, k) for the cotangent dA: derived by the
same rules as every gradient, with reads at rotated or grouped indices solved (moa/grad_scatter.py). Each role whose
expression is not a plain read of an input laid out as the tile (`role_output`; codegen/backward_shape.py `roles`
decides) is pulled back this
way; the inputs it reads (Q, the rotary tables, the norm's weights) get their gradients from it.

A reduction over one side inside the score itself (cosine attention's rsqrt(q . q) r_i, a key norm c_j) is pulled
back the same way: it is a leaf of the score's sympy translation, the dQ kernel sums its adjoint over the keys,
dr_i = sum_j dS~_ij ds_ij/dr_i (dS~: the adjoint of the score), the dK/dV kernel over the rows for a key-side one,
and the gradient DNF of the reduction as an output over (lead, i) (or (lead, j)) carries dr to the inputs
(`score_reductions`, `reduction_output`).
"""
from __future__ import annotations

import functools

from . import dnf as D
from . import ir
from .dnf import DnfOutput
from .errors import UnsupportedError
from .grad import GradProgram, grad
from .grad_sym import Translation
from .onf import Schedule
from .program import Program

ROLES = ("Q", "K", "V")   # dot.a (rows), dot.b (keys), the value


def role_output(sched: Schedule, role: str) -> DnfOutput:
    """The operand (Q, K) or value (V) of the schedule's single branch as an output of its own, over the leading
    variables and its tile's two variables: what the backward kernels' dQ, dK or dV buffer is the gradient of."""
    b = sched.branches[0]
    lead = tuple(sched.lead)
    rows, cols, expr = {"Q": ((sched.row[0], sched.row[1]), (b.dot.var, b.dot.extent), b.dot.a),
                        "K": ((b.var, b.extent), (b.dot.var, b.dot.extent), b.dot.b),
                        "V": ((b.var, b.extent), sched.col, b.value)}[role]
    pts = (*lead, rows, cols)
    return DnfOutput(f"__op{role}", tuple(v for v, _ in pts), tuple(x for _, x in pts), expr, ir.FLOAT)


def float_reads(e) -> tuple:
    """The float inputs an expression (or None) reads, in first-read order."""
    if e is None:
        return ()
    return tuple(dict.fromkeys(x.name for x in D.nodes(e) if isinstance(x, D.Read) and x.dtype == ir.FLOAT))


def pullback_reason(sched: Schedule, role: str) -> str | None:
    """None when the role's expression can be pulled back (it uses only its own tile's variables and the leading
    ones, reads a float input, and holds no reduction over keys or rows), else why not."""
    out = role_output(sched, role)
    if not set(D.free_vars(out.expr)) <= set(out.vars):
        return f"the {role} operand uses a variable outside its own tile"
    if not float_reads(out.expr):
        return f"the {role} operand reads no float input"
    if any(isinstance(x, (D.SoftmaxSum, D.NormSum, D.LogSumExp, D.KeySum)) for x in D.nodes(out.expr)):
        return f"the {role} operand holds an attention reduction"
    return None


def score_reductions(sched: Schedule) -> tuple[tuple, str | None]:
    """((leaf, side) ...) of the reductions the branch's score holds, side "row" (over the leading variables and the
    row: a query norm, or a value per program) or "key" (over the leading variables and the key); with the reason
    when the kernels cannot pull them back: one inside another op than the smooth ones (under a where), a reduction
    in the mask, or an input read both inside such a reduction and elsewhere in the score or the mask (its
    gradient would be split between the pullback and the kernels' atomic adds)."""
    b = sched.branches[0]
    lead = {v for v, _ in sched.lead}
    if b.mask is not None and any(isinstance(x, D.BINDERS) for x in D.nodes(b.mask)):
        return (), "the mask holds a reduction"
    t = Translation(b.score, pieces=True)
    found, inside = [], set()
    for leaf in t.leaves.values():
        if not any(isinstance(x, D.BINDERS) for x in D.nodes(leaf)):
            continue
        fv = set(D.free_vars(leaf))
        side = "row" if fv <= lead | {sched.row[0]} else "key" if fv <= lead | {b.var} else None
        if not isinstance(leaf, D.Reduce):
            return (), f"the score holds a reduction under a where or a comparison: {D.show_clipped(leaf, 60)}"
        if side is None or any(isinstance(x, D.BINDERS) for x in D.nodes(leaf.body)):
            return (), f"the score holds a reduction over both sides or nested: {D.show_clipped(leaf, 60)}"
        found.append((leaf, side))
        inside |= set(float_reads(leaf))
    others = {x.name for leaf in t.leaves.values() if not isinstance(leaf, D.Reduce) for x in D.nodes(leaf)
              if isinstance(x, D.Read)}
    others |= {x.name for x in D.nodes(b.mask) if isinstance(x, D.Read)} if b.mask is not None else set()
    both = sorted(inside & others)
    if both:
        return (), f"{', '.join(both)} is read both inside a reduction of the score and elsewhere in the score or mask"
    return tuple(found), None


def reduction_output(sched: Schedule, k: int, leaf, side: str) -> DnfOutput:
    """The k-th score reduction as an output over the leading variables and its side's variable (a value per
    program is an output over the rows too, the same at every row): what the kernels' grad_row{k} (grad_key{k})
    buffer is the gradient of."""
    b = sched.branches[0]
    own = sched.row if side == "row" else (b.var, b.extent)
    pts = (*tuple(sched.lead), own)
    return DnfOutput(f"__{side}{k}", tuple(v for v, _ in pts), tuple(x for _, x in pts), leaf, ir.FLOAT)


def outputs(sched: Schedule, roles: tuple) -> list:
    """The pulled-back outputs of a branch: the roles' expressions, then the score's reductions."""
    reds = score_reductions(sched)[0]
    return [role_output(sched, r) for r in roles] + [reduction_output(sched, k, leaf, side)
                                                     for k, (leaf, side) in enumerate(reds)]


def pullback_grad(program: Program, outs: list) -> GradProgram:
    """The gradient DNF of every float input through the pulled-back outputs `outs` (cotangent of output o: the
    read `GradProgram.cotangents[o.name]`), derived once per program and outputs (the backward's check, its run and
    `moa explain` ask for the same one). UnsupportedError when an op of them has no derivative rule."""
    return _pullback_grad(program, tuple(outs))


@functools.lru_cache(maxsize=64)
def _pullback_grad(program: Program, outs: tuple) -> GradProgram:
    try:
        return grad(program, list(outs))
    except UnsupportedError as ex:
        raise UnsupportedError(f"no gradient through the operands' functions: {ex}") from None


def pulled_inputs(outs: list) -> tuple:
    """The float inputs whose gradients the pullback of `outs` gives (in first-read order)."""
    return tuple(dict.fromkeys(x for out in outs for x in float_reads(out.expr)))


__all__ = ["ROLES", "float_reads", "outputs", "pullback_grad", "pullback_reason", "pulled_inputs", "reduction_output",
           "role_output", "score_reductions"]
