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
expression is not a plain read of an input laid out as the tile (`operand_expr`, `ROLES`) is pulled back this
way; the inputs it reads (Q, the rotary tables, the norm's weights) get their gradients from it.
"""
from __future__ import annotations

from . import dnf as D
from . import ir
from .dnf import DnfOutput
from .errors import UnsupportedError
from .grad import GradProgram, grad
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


def float_reads(e) -> set:
    """The float inputs an expression reads."""
    return {x.name for x in D.nodes(e) if isinstance(x, D.Read) and x.dtype == ir.FLOAT}


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


def pullback_grad(program: Program, sched: Schedule, roles: tuple) -> GradProgram:
    """The gradient DNF of every float input through the expressions of `roles` (cotangent of role r: the read
    `GradProgram.cotangents[f"__op{r}"]`). UnsupportedError when an op of them has no derivative rule."""
    outs = [role_output(sched, r) for r in roles]
    try:
        return grad(program, outs)
    except UnsupportedError as ex:
        raise UnsupportedError(f"no gradient through the operands' functions: {ex}") from None


def pulled_inputs(sched: Schedule, roles: tuple) -> tuple:
    """The float inputs whose gradients the pullback of `roles` gives (in first-read order)."""
    names = []
    for r in roles:
        out = role_output(sched, r)
        names += [x.name for x in D.nodes(out.expr) if isinstance(x, D.Read) and x.dtype == ir.FLOAT]
    return tuple(dict.fromkeys(names))


__all__ = ["ROLES", "float_reads", "pullback_grad", "pullback_reason", "pulled_inputs", "role_output"]
