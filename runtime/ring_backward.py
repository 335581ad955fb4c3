"""The backward of ring attention: the block program's fused backward kernels, around the ring.

The forward leaves each rank its rows of O and their total (the merged lse of a softmax output, Z of a normalised
one). With them, the gradient of one (query shard, key shard) block is exactly what the fused backward kernels
(codegen/backward.py) compute on the block program, read with the rank's rows of O, the total and dO: P = exp(s -
lse) over the block's pairs, dS = P (dP - delta) with delta = rowsum(dO O) of the whole row, dQ = dS K, dK = dS^T Q,
dV = P^T dO, the score's float reads by atomic adds, operands computed in the kernel pulled back. Summed over the
key shards they are the single-device gradients, as the forward's blocks merge into its O.

So the backward rotates like the forward (Ring FlashAttention's schedule): at step t rank r holds key shard
(r - t) mod P, adds its block's dQ to its own, and its dK, dV (and every travelling float input's gradient) to
accumulators that travel with the shard; after the last step one more send brings each shard's accumulated
gradients home. Gradients of replicated float inputs (a bias table, a gate's weights) are summed over the ranks
(all_reduce). A block the tile analysis proves empty is not computed, as in the forward.

An output of several branches mixed by an epilogue (PiAttention's gate) keeps every branch's merged (O_k, total_k):
the epilogue's gradient DNF (moa/grad.py), evaluated on the rank's rows, gives each branch's cotangent dO_k and the
gradients of the inputs the epilogue reads itself; then each branch's kernels run around the ring as above.
"""
from __future__ import annotations

import functools
import weakref

import torch

from moa import dnf as D
from moa import ir, shard
from moa.codegen.backward_shape import is_multi, schedule_reason
from moa.dnf import DnfOutput
from moa.grad import grad

from .backward_run import BackwardRunner
from .binding import bind
from .grad_eval import _GradEval, gradients
from .reference import F64
from .ring_comm import RingError, comm_device, geometry, layout, outcome, pack, post, unpack, wait


def needs_grad(inputs: dict) -> bool:
    """Whether autograd will need the call's graph (grad mode on and an input that requires grad)."""
    return torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad for t in inputs.values())


def block_runners(block) -> dict:
    """Block output -> the fused backward of its branch (one per branch of an epilogue's output), built once."""
    hit = _RUNNERS.get(block)
    if hit is None:
        names = list(block.schedules)
        hit = {names[0]: block.backward.runner} if len(names) == 1 and block.backward.runner is not None else \
            {n: BackwardRunner(block.planner, n) for n in names}
        _RUNNERS[block] = hit
    return hit


_RUNNERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def train_reason(plan, block, wanted: set) -> str | None:
    """None when the ring can differentiate the program with the block's fused backward kernels (one per branch,
    an epilogue by its gradient DNF) for the inputs that require grad (`wanted`, user names), else why not."""
    if len(plan.output_names) != 1:
        return "ring attention's backward takes one output"
    cg = block.planner.cg_program
    back = block.planner.codegen.inputs
    floats = {n.attrs[0] for n in block.program.inputs if n.dtype == "float" and plan.source_of(n.attrs[0]) in wanted}
    covered = set()
    for name, sched in block.schedules.items():
        why = schedule_reason(cg, sched) if len(sched.branches) == 1 and not is_multi(sched) else \
            "a block output of several branches"
        if why:
            return f"the block program has no fused backward ({why})"
        fused = {back[x] for x in block_runners(block)[name].fused_names()}
        br = sched.branches[0]
        parts = [e for e in (br.dot.a, br.dot.b, br.value, br.score, br.mask) if e is not None]
        read = {back[x.name] for e in parts for x in D.nodes(e) if isinstance(x, D.Read)} & floats
        if read - fused:
            return f"the fused kernels give no gradient of {', '.join(sorted(read - fused))}"
        covered |= fused
    for ep in plan.epilogues:
        covered |= {n.attrs[0] for n in shard.epilogue_program(plan, ep).inputs if n.attrs[0] not in ep.branches}
    missing = sorted(floats - covered)
    if missing:
        return f"the fused kernels give no gradient of {', '.join(missing)}"
    both = [n for n, (role, _) in plan.roles.items() if role == shard.BOTH and n in wanted]
    if both:
        return f"float input {', '.join(both)} is read along both the query and the key axis"
    return None


def epilogue_grads(plan, block, ep, qside: dict, branches: dict, dims: dict, d_out) -> tuple[dict, dict]:
    """(branch -> its cotangent dO_k, input -> its gradient) through an output's epilogue on the rank's rows: the
    epilogue's gradient DNF evaluated in float64 by torch where the tensors are (O(rows e) work)."""
    prog = shard.epilogue_program(plan, ep)
    grads = _EPILOGUE_GRADS.setdefault(block, {})   # per block kernel: two programs may share a name
    if ep.output not in grads:
        grads[ep.output] = grad(prog, [DnfOutput(ep.output, ep.vars, ep.extents, ep.expr, ir.FLOAT)])
    gp = grads[ep.output]
    tensors = {n.attrs[0]: (qside[n.attrs[0]] if n.attrs[0] not in branches else branches[n.attrs[0]])
               for n in prog.inputs}
    b = bind(prog, {n: t.to(F64) if t.is_floating_point() else t for n, t in tensors.items()},
             {d.name: dims[d.name] for d in prog.dims})
    got = gradients(_GradEval(prog, b, {gp.cotangents[ep.output]: d_out.to(F64)}), gp, b)
    return {x: got.pop(x) for x in ep.branches}, got


_EPILOGUE_GRADS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()   # block kernel -> output -> gradient


# long: the backward rotation, step by step (every rank runs the same collective sequence)
def backward_pass(kernel, plan, block, inputs: dict, values: dict, d_out, dims: dict, group, timeout) -> dict:
    """User input name -> its gradient on this rank (its own shard's, or the whole replicated tensor's), for the
    cotangent d_out of this rank's rows of the output (values: block output -> the forward's merged (O, total) of
    each branch; dims: the rank's block dims)."""
    import torch.distributed as dist   # optional part of torch: imported where the ring runs

    world, rank = dist.get_world_size(group), dist.get_rank(group)
    prog = block.program
    cdev = comm_device(inputs, group)
    user = {n.attrs[0]: plan.source_of(n.attrs[0]) for n in prog.inputs}
    geo = geometry(plan, kernel.program, inputs, group, cdev, timeout, rank,
                   "the backward (a collective: every rank must call it), ")
    keys = plan.key_inputs
    fkeys = [bn for bn in keys if prog.input_map[bn].dtype == "float"]
    qside = {n: t for n, t in inputs.items() if plan.roles[n][0] != shard.KEY}
    first = next(iter(values.values()))[0]
    dev = first.device
    acc_dt = torch.float64 if first.dtype == torch.float64 else torch.float32
    layouts = [layout(keys, geo.shapes[s], geo.dtypes) for s in range(world)]
    cur = pack(*layouts[rank], {bn: inputs[user[bn]] for bn in keys}, dev)
    gkeys = {bn: torch.zeros(geo.shapes[rank][bn], dtype=acc_dt, device=dev) for bn in fkeys}
    ep = plan.epilogue_of(plan.output_names[0])
    runners = block_runners(block)
    back = block.planner.codegen.inputs
    nxt_rank = dist.get_global_rank(group, (rank + 1) % world) if group is not None else (rank + 1) % world
    prv_rank = dist.get_global_rank(group, (rank - 1) % world) if group is not None else (rank - 1) % world
    failed: list = []
    d_outs, local = {x: None for x in runners}, {}
    try:
        try:   # a failure here is announced like a block's (the others must not wait on this rank)
            d_outs, local = ({plan.outputs[0].name: d_out}, {}) if ep is None else \
                epilogue_grads(plan, block, ep, qside, {x: values[x][0] for x in ep.branches}, dims, d_out)
            local = {n: g.to(acc_dt).sum_to_size(inputs[n].shape) for n, g in local.items()}
        except Exception as e:  # re-raised below, after the others have been told
            failed.append(e)
        for t in range(world):
            src = (rank - t) % world
            step = f"backward step {t + 1} of {world}"
            nxt_src = (rank - t - 1) % world
            shard_works, recv_shard = [], None
            if t < world - 1:   # the next key shard's transfer runs while this block computes (as the forward's)
                recv_shard = torch.empty(layouts[nxt_src][1], dtype=torch.uint8, device=dev)
                ops = [dist.P2POp(dist.isend, cur, nxt_rank, group)] if cur.numel() else []
                ops += [dist.P2POp(dist.irecv, recv_shard, prv_rank, group)] if recv_shard.numel() else []
                shard_works = post(functools.partial(dist.batch_isend_irecv, ops), timeout, rank, step) if ops else []
            block_dims = plan.block_dims(geo.gdims, geo.rows0[rank], geo.nl[rank], geo.cols0[src], geo.ml[src])
            live = [x for x in runners if not shard.pair_skipped(block.schedules[x], block_dims)]
            if not failed and live:
                try:
                    b = bind(prog, {**qside, **unpack(layouts[src][0], cur)}, block_dims)
                    for x in live:
                        for cg, g in runners[x].grads(b, values[x][0].detach(), values[x][1], d_outs[x]).items():
                            name = back[cg]
                            if name in gkeys:
                                gkeys[name] += g.to(acc_dt).sum_to_size(gkeys[name].shape)
                            else:
                                g = g.to(acc_dt).sum_to_size(inputs[name].shape)
                                local[name] = g if name not in local else local[name] + g
                except Exception as e:  # re-raised below, after the others have been told
                    failed.append(e)
            if world == 1:   # the shard and its gradients are home already
                break
            # the shard's gradients so far follow it (after the last step: home to the shard's own rank)
            recv_grads = {bn: torch.empty(geo.shapes[nxt_src][bn], dtype=acc_dt, device=dev) for bn in fkeys}
            ops = []
            for bn in fkeys:
                ops += [dist.P2POp(dist.isend, gkeys[bn].contiguous(), nxt_rank, group)] if gkeys[bn].numel() else []
                ops += [dist.P2POp(dist.irecv, recv_grads[bn], prv_rank, group)] if recv_grads[bn].numel() else []
            works = post(functools.partial(dist.batch_isend_irecv, ops), timeout, rank, step) if ops else []
            wait(shard_works + works, timeout, rank, step)
            cur = recv_shard if recv_shard is not None else cur
            gkeys = recv_grads
        replicated = sorted(n for n, (role, _) in plan.roles.items() if role == shard.REPLICATED and
                            inputs[n].is_floating_point())
        for n in replicated:   # every rank's share of a replicated input's gradient
            g = local.get(n, torch.zeros(inputs[n].shape, dtype=acc_dt, device=dev))
            local[n] = g.to(acc_dt).sum_to_size(inputs[n].shape).contiguous()
            post(functools.partial(dist.all_reduce, local[n], group=group), timeout, rank,
                 f"summing the gradient of {n}")
        outcome(failed, group, cdev, timeout, rank, "agreeing on the backward's outcome")
    except RingError:
        if failed:
            raise failed[0] from None
        raise
    res = {}
    for name, t in inputs.items():
        if not t.is_floating_point():
            continue
        g = gkeys.get(next((bn for bn in fkeys if user[bn] == name), None)) if plan.roles[name][0] == shard.KEY \
            else local.get(name)
        res[name] = (torch.zeros_like(t) if g is None else g.to(t.dtype)).reshape(t.shape)
    return res
