"""Predicted work of whichever backward a call runs (`Backward.cost`): the kernels it launches, each with its tl.dot
FLOPs, other FLOPs, transcendentals, programs and DRAM bytes loaded and stored, as the interpreter's counters count
them (runtime/measure.py).

  fused    a single softmax or normalised branch: `_attn_bwd_dkdv`, `_attn_bwd_dq` (runtime/backward_cost.py; the
           atomic adds of a bias table or gate; tiles skipped by the data, predicted from `inputs=`)
  multi    several branches or an epilogue (PiAttention): per branch k its forward recomputed (`branch{k}/_attn_fwd`,
           codegen/counts.py as the forward's cost) and its two fused kernels (`branch{k}/_attn_bwd_*`); the
           epilogue's gradient is evaluated in float64 by torch where the tensors are (no kernel: no counted work)
  window   window mixing (bla): its two kernels (runtime/window_backward_cost.py)
  linear   the chunked linear form, where the training form choice picks it (runtime/backward_cost_linear.py)

The tiles are the ones a call in the interpreter takes (runtime/backward_run.py INTERPRETER_BLOCKS or the
forward's choice), or `config=` (a GPU's fitted config is chosen ahead of time per kernel: pass it). Torch's own
work around the kernels (delta = rowsum(dO O), dn, dz, the gradient sums of shared heads) is not kernel work and
is not counted, as the interpreter's counters do not count it."""
from __future__ import annotations

import math

import numpy as np
import torch

from moa import ir
from moa import symbolic as sy
from moa.codegen import counts as CN
from moa.codegen.emit import generate
from moa.errors import UnsupportedError

from . import backward_cost, backward_cost_linear, backward_run, window_backward, window_backward_cost
from .backward_cost import BackwardCost, work_of
from .cost_data import batched, check_data, check_data_reads, int_widths
from .launch import compute_dtype
from .tiling import DTYPE_NAME, Config, choose_config, exact_heads, window_default

BYTES = {"float64": 8, "float32": 4, "float16": 2, "bfloat16": 2}


def _data(planner, inputs: dict | None, dims: dict, batch: tuple) -> tuple[dict | None, dict]:
    """(codegen name -> numpy array of the integer and boolean inputs given, codegen name -> element bytes of the
    integers given: cost_data.int_widths)."""
    if not inputs:
        return None, {}
    back = planner.codegen.inputs   # codegen name -> user name
    nodes = planner.program.input_map
    out = {}
    for cg, user in back.items():
        if user not in inputs or nodes[user].dtype == ir.FLOAT:
            continue
        x = inputs[user]
        a = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
        out[cg] = batched(a, tuple(sy.evaluate(e, dims) for e in nodes[user].shape), batch,
                          f"backward.cost(inputs=...): {user}")
    return out, int_widths(planner, {cg: inputs[user] for cg, user in back.items() if user in inputs})


def _runner_config(spec, dims: dict, config: Config | None) -> Config:
    """The tiles of the fused kernels' interpreted launch (BackwardRunner._config)."""
    if config is not None:
        return config
    if backward_run.INTERPRETER_BLOCKS:
        return Config(*backward_run.INTERPRETER_BLOCKS)
    n, m = (int(sy.evaluate(x, dims)) for x in (spec.row_extent, spec.key_extent))
    return choose_config(torch.device("cpu"), "", n, m, 0)


def cost(bw, dims: dict, batch: tuple = (), dtype: str = "float32", inputs: dict | None = None,
         config: Config | None = None, device: str = "cpu") -> BackwardCost:
    """The predicted work of the backward of Kernel bw.k at these dims (user names) and batch shape, for float inputs
    of `dtype` on the CPU interpreter (bf16 computes in fp32 there) or, device='cuda', on a GPU (bf16 kernels);
    `inputs`: the integer and boolean inputs (document ids, flags) where the kernels skip tiles by their per-tile
    summaries."""
    k = bw.k
    planner = k.planner
    dims = {x.name: int(dims[x.name]) for x in k.program.dims}
    batch = tuple(int(x) for x in batch)
    compute = DTYPE_NAME[compute_dtype(getattr(torch, dtype), torch.device("cuda" if device == "cuda" else "cpu"))]
    cg_dims = {cg: dims[user] for cg, user in planner.codegen.dims.items()}
    check_data(k.program, inputs, "backward.cost")
    if inputs:
        check_data_reads(k, dims)
    data, int_bytes = _data(planner, inputs, dims, batch)
    if bw.unfused_reason:
        return BackwardCost("unfused", {}, (f"no fused kernels ({bw.unfused_reason}): the gradient DNF is evaluated "
                                            "on the CPU in float64, no kernel work",))
    if bw.window is not None:
        r = bw.window
        spec = r.spec(compute, len(batch))
        cfg = config or (Config(*window_backward.INTERPRETER_BLOCKS) if window_backward.INTERPRETER_BLOCKS else
                         Config(*(2 * (window_default(int(sy.evaluate(spec.row_extent, cg_dims))).block_m,))))
        got = window_backward_cost.predict(r, cg_dims, batch, compute, cfg)
        return BackwardCost("window", {n: work_of(n, c) for n, c in got.items()})
    if bw.linear is not None and planner.run_kind(k.output_names[0], dims, training=True,
                                                  batch=math.prod(batch)) == "linear":
        return backward_cost_linear.cost(bw.linear, cg_dims, batch, compute, config)
    if bw.runner is not None:
        r = bw.runner
        spec = r.spec(compute, len(batch))
        cfg = _runner_config(spec, cg_dims, config)
        return BackwardCost("fused", backward_cost.predict(r, cg_dims, batch, compute, cfg, int_bytes, data),
                            _pulled_notes((spec,)))
    out = _multi(bw.multi, cg_dims, batch, compute, config, int_bytes, data)
    return BackwardCost(out.path, out.kernels, out.notes + _pulled_notes(
        tuple(r.spec(compute, len(batch)) for r in bw.multi.runners)))


def _pulled_notes(specs: tuple) -> tuple:
    """The note on the operand pullback (moa/pullback.py) where a kernel pair returns an operand's gradient."""
    roles = sorted({r for spec in specs for r in spec.pulled})
    what = [f"the {', '.join(roles)} operand tiles"] if roles else []
    if any(spec.reductions for spec in specs):
        what.append("the score's norms (summed per row or key by the kernels)")
    if not what:
        return ()
    return (f"the gradients of {' and '.join(what)} are pulled back to the inputs they are computed from (rotary "
            "embeddings, norms) by their gradient DNF, evaluated in float64 by torch where the tensors are: O(n d) "
            "work per head, no kernel work, not counted",)


def _multi(mb, dims: dict, batch: tuple, compute: str, config, int_bytes: dict, data) -> BackwardCost:
    """Per branch: its forward recomputed (the tiled forward kernel storing o_k and lse_k, counted as the forward's
    cost model counts it), then its two fused backward kernels for dO_k."""
    program = mb.planner.cg_program
    out = {}
    for k, (sub, runner) in enumerate(zip(mb.subs, mb.runners)):
        n = sy.evaluate(sub.row[1], dims)
        lead = math.prod(sy.evaluate(x, dims) for _, x in sub.lead)
        if n * lead * math.prod(batch):   # _branch_forward launches nothing otherwise (its lse: also at e = 0)
            cfg = config or choose_config(torch.device("cpu"), compute, n, sy.evaluate(sub.branches[0].extent, dims),
                                          0)
            spec = generate(program, sub, compute, len(batch), cfg.block_m, cfg.block_n, True,
                            exact_heads(sub, dims))
            eb = {name: BYTES[compute] if node.dtype == ir.FLOAT else 1 if node.dtype == ir.BOOL else
                  int_bytes.get(name, 8)
                  for name, node in program.input_map.items()}
            eb.update({sub.output: BYTES[compute], "lse": 8 if compute == "float64" else 4})
            eb.update({ts.arg: eb[ts.tensor] for ts in spec.summaries})
            c = CN.predict(program, sub, spec, dims, batch, eb, needed=False, data=data)
            out[f"branch{k}/_attn_fwd"] = work_of("_attn_fwd", c)
        cfg = _runner_config(runner.spec(compute, len(batch)), dims, config)
        for name, w in backward_cost.predict(runner, dims, batch, compute, cfg, int_bytes, data).items():
            out[f"branch{k}/{name}"] = w
    if not out:
        raise UnsupportedError("no branch")   # pragma: no cover - a schedule has a branch
    return BackwardCost("multi", out, ("the epilogue's gradient (the cotangent of each branch, the gradients of the "
                                       "inputs it reads itself, e.g. a gate's weights) is evaluated in float64 by "
                                       "torch where the tensors are: no kernel work, not counted",))
