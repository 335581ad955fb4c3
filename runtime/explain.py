"""What `Kernel.explain()` and `moa explain` show: the IR with its shapes, the DNF, the eliminated intermediates, the
forms and schedules with their predicted times, the ONF; and the (query tile, key tile) map of a branch."""
from __future__ import annotations

import numpy as np

from moa import dnf as D
from moa import linear, onf, pullback, split
from moa import symbolic as sy
from moa import tiles as TL
from moa.codegen.backward_shape import is_multi
from moa.errors import UnsupportedError

from .backward_run import BackwardRunner
from .window_backward import WindowBackwardRunner, is_window



def tile_map(k, name: str, branch: int, dims: dict, config):
    """(R x T) int array over (query tile, key tile): 0 skipped, 1 full (no mask code), 2 partial (mask code
    runs), 3 visited although no (i, j) of it is admissible (the analysis could not prove the skip)."""
    sched = k.schedules[name]
    b = sched.branches[branch]
    n = sy.evaluate(sched.row[1], dims)
    m = sy.evaluate(b.extent, dims)
    bm, bn = config.block_m, config.block_n
    R, T = -(-n // bm), -(-m // bn)
    env = {d: dims[d.name] for d in k.program.dims}
    for v, _ in sched.lead:
        env[v] = 0                               # the map of the first head
    grid = np.zeros((R, T), dtype=np.int8)
    tiles = TL.branch_tiles(b, env, n, m, bm, bn)
    sel = tiles.visited
    grid[tiles.rows[sel], tiles.starts[sel] // bn] = np.where(tiles.partial[sel], 2, 1)
    if b.mask is not None and R * T and n * m <= 1 << 26:
        need = _needed_grid(b, sched.row[0], env, n, m, bm, bn)
        grid[(grid > 0) & ~need] = 3
    return grid


def _needed_grid(b, row_var, env, n, m, bm, bn):
    R, T = -(-n // bm), -(-m // bn)
    i = np.arange(n)[:, None]
    j = np.arange(m)[None, :]
    res = TL.mask3(b.mask, {**env, row_var: i, b.var: j})
    poss = np.broadcast_to(res[1] if res[0] == "b" else True, (n, m))
    full = np.zeros((R * bm, T * bn), dtype=bool)
    full[:n, :m] = poss
    return full.reshape(R, bm, T, bn).any(axis=(1, 3))


def explain(planner) -> str:
    """IR with shapes, the DNF in MoA notation, the eliminated intermediates, forms, schedules and the ONF."""
    p = planner.program
    lines = [f"program {p.name}"]
    if p.dims:
        lines.append("  dims:   " + ", ".join(d.name for d in p.dims))
    if p.params:
        lines.append("  params: " + ", ".join(f"{k} = {v}" for k, v in p.params))
    lines.append("IR (shapes proven by sympy):")
    for n in p.inputs:
        lines.append(f"  in  {n.attrs[0]}: {sy.show_shape(n.shape)} {n.dtype}")
    outs = set(planner.output_names)
    for name, node in p.bindings:
        tag = "out" if name in outs else "   "
        lines.append(f"  {tag} {name}: {sy.show_shape(node.shape)} = {_ir_text(node, p)}")
    guards = p.guards()
    if guards:
        lines.append("runtime guards:")
        lines += [f"  {g.message}" for g in guards]
    lines.append("DNF (psi-reduced; every output element over input elements):")
    lines += [f"  {D.show_output(o)}" for o in planner.dnf]
    inter = p.intermediates()
    lines.append("intermediate arrays eliminated by fusion:")
    lines += [f"  {nm}: {sy.show(sz)} elements" for nm, sz in inter] or ["  (none)"]
    lines += _forms(planner)
    lines += _backward(planner)
    try:
        lines += _schedules(planner)
        lines.append("ONF (tiled schedule):" if all(len(v) == 1 for v in planner.variants.values()) else
                     "ONF (every legal schedule):")
        for vs in planner.variants.values():
            for s in vs:
                lines += ["  " + ln for ln in onf.show(s).splitlines()]
    except UnsupportedError as e:
        lines.append(f"  not compiled by this version: {e.message}")
    return "\n".join(lines)


def _backward(planner) -> list:
    """How a training call differentiates the output: which fused backward kernels, and the operand pullback's
    gradient DNF (moa/pullback.py) where operands are computed in the kernel; or why the gradient runs unfused."""
    try:
        why = WindowBackwardRunner.reason(planner) if is_window(planner) else BackwardRunner.reason(planner)
    except UnsupportedError as e:
        why = e.message
    if why:
        return [f"backward (training): the gradient DNF evaluated unfused, in float64 ({why})"]
    name = planner.output_names[0]
    sched = planner.schedules[name]
    if is_window(planner):
        return ["backward (training): fused window kernels _attn_window_bwd_dq, _attn_window_bwd_dkdv"]
    subs = [split.branch_alone(sched, k) for k in range(len(sched.branches))] if is_multi(sched) else [sched]
    out = [f"backward (training): fused kernels _attn_bwd_dkdv, _attn_bwd_dq{' per branch' if len(subs) > 1 else ''}"
           f"{'; the epilogue by its gradient DNF' if is_multi(sched) else ''}"]
    for k, sub in enumerate(subs):
        spec = BackwardRunner(planner, name, sub).spec("float32", 0)
        outs = pullback.outputs(sub, spec.pulled)
        if not outs:
            continue
        gp = pullback.pullback_grad(planner.cg_program, outs)
        names = set(pullback.pulled_inputs(outs))
        what = ", ".join([*spec.pulled, *(f"the score's {side} reduction {buf}" for buf, side in spec.reductions)])
        out.append(f"  {'branch %d: ' % k if len(subs) > 1 else ''}operand pullback of {what} (the kernels return "
                   "the gradients of those tiles; this gradient DNF carries them to the inputs, O(n d)):")
        out += [f"    <{' '.join(v.name for v in g.vars)}> psi d{g.name} = {D.show(g.expr)}" for g in gp.grads
                if g.name in names]
    return out


def _schedules(planner) -> list:
    """The legal schedules of every output with their predicted times at a few n (h100, bf16) and the choice."""
    out = []
    for name, vs in planner.variants.items():
        if len(vs) < 2:
            continue
        out.append(f"schedules of {name}: {', '.join(onf.label(v) for v in vs)} (predicted on h100, bf16, "
                   f"moa/schedule_cost.py; ONF of each below)")
        base = planner.reference_dims(name)
        row = str(planner.schedules[name].row[1])
        for n in (1024, 4096, 16384):
            dims = {k: (n if (k == row or v != 64) else v) for k, v in base.items()}
            chosen, preds = planner.schedule_choice(name, dims)
            if preds is None:
                continue
            shown = ", ".join(f"{k}={v}" for k, v in dims.items())
            cells = "; ".join(f"{p.label} {p.seconds * 1e6:.1f} us ({p.tiles} tiles, {p.hops} hops)" for p in preds)
            out.append(f"  {shown}: {cells} -> {onf.label(chosen)}")
    return out


def _forms(planner) -> list:
    out = []
    try:
        plans = planner.linear_plans
    except UnsupportedError:
        return out
    for name, (lp, _why) in plans.items():
        if lp is None:
            continue
        d = lp.branch.dot.extent
        e = lp.schedule.col[1]
        dims = {str(s): 64 for s in (d, e) if s.is_Symbol}
        out.append(f"forms of {name}: quadratic (tiled) and linear (chunked states, D = {sy.show(lp.features_expr())}"
                   f" features of degree {lp.p}{', gated' if lp.ga is not None else ''})")
        for n in (1024, 16384, 131072):
            row = lp.schedule.row[1]
            c = linear.form_costs(lp, {**dims, str(row): n})
            t = planner.form_times(name, {**dims, str(row): n})
            out.append(f"  n = {n:6d} ({', '.join(f'{k}={v}' for k, v in dims.items())}): quadratic "
                       f"{c['quadratic'].flops:.3g} FLOP {t['quadratic'] * 1e6:.1f} us, linear "
                       f"{c['linear'].flops:.3g} FLOP {t['linear'] * 1e6:.1f} us (h100 bf16, one batch index)")
        for b in (1, 32):
            x = planner.form_crossover(name, dims, batch=b)
            out.append(f"  predicted crossover at batch {b}: linear is faster from n = {x} on" if x else
                       f"  predicted crossover at batch {b}: none below n = 2^24")
    return out


def _ir_text(node, program, depth=0) -> str:
    """A compact one-line rendering of an IR expression, naming bound arrays."""
    names = {id(n): nm for nm, n in program.bindings}
    names.update({id(n): n.attrs[0] for n in program.inputs})

    def go(n, d):
        if d > 0 and id(n) in names:
            return names[id(n)]
        if d > 12:
            return "..."
        if n.op == "input":
            return n.attrs[0]
        if n.op == "const":
            return repr(n.attrs[0])
        if n.op == "sym":
            return sy.show(n.attrs[0])
        if n.op == "ewise":
            return f"{n.attrs[0]}({', '.join(go(a, d + 1) for a in n.args)})"
        if n.op == "matmul":
            return f"({go(n.args[0], d + 1)} +.x {go(n.args[1], d + 1)})"
        if n.op == "psi":
            a, *ix = n.args
            it = iter(ix)
            parts = [":" if s == ":" else go(next(it), d + 1) for s in n.attrs[0]]
            return f"<{' '.join(parts)}> psi {go(a, d + 1)}"
        if n.op == "comp":
            return f"[{' '.join(v.name for v in n.attrs[0])}] {go(n.args[0], d + 1)}"
        attrs = ", ".join(str(a) for a in n.attrs)
        return f"{n.op}({', '.join(go(a, d + 1) for a in n.args)}{', ' + attrs if attrs else ''})"

    return go(node, depth)
