"""The split-KV / varlen / paged grid kernel of a decoding call compiled ahead of time for a GPU target without a
GPU (runtime/aot.py): registers, spills and shared memory of what k.decode would launch on CUDA."""
from __future__ import annotations

import dataclasses
import re

import torch

from moa import symbolic as sy
from moa.codegen.splitkv import BRANCHES_KERNEL, GRID_KERNEL, SPLIT, VARLEN, branches_source
from moa.codegen.splitkv_epilogue import FUSED_MERGE_KERNEL
from moa.devices import canonical_dtype

from . import cache, decode_merge
from .aot import fits
from .aot_batch import TRITON_TYPE, aot_batch, arg_names, kernel_signature
from .decode import _global, _gqa, _plan, _source, decode_config
from .tiling import exact_heads



# long: the launch decode would make, assembled as a picklable AOT request per block output
def decode_aot(kernel, nq: int, m: int, dtype="bf16", target: str = "sm_90", mode: str = SPLIT, splits: int = 8,
               pack_heads: bool | None = None, config=None, **dims) -> dict:
    """Block output name -> (AotReport, fits, why) of the grid kernel a CUDA decode of nq rows against m keys
    launches (one batch axis; `mode` SPLIT, VARLEN, LENGTHS or PAGED; partials in fp32 when splits > 1)."""
    plan, block = _plan(kernel)
    dtype = canonical_dtype(dtype)
    gdims, row0 = _global(plan, nq, m)
    bd = plan.block_dims({**dims, **gdims}, row0, nq, 0, m)
    packed = _gqa(kernel) if pack_heads is not False and mode != VARLEN else None
    runner = block if packed is None else packed[1]
    view = runner.planner.codegen
    cdims = {c: bd[u] for c, u in view.dims.items() if u in bd}
    acc = "fp64" if dtype == "float64" else "fp32"
    requests, names = [], []
    for o in plan.outputs:
        sched = runner.planner.schedules[o.name]
        cfg = config or decode_config(sched, cdims, dtype)
        cfg = dataclasses.replace(cfg, tma=False)
        spec = runner.launcher.spec(o.name, dtype, 1, cfg, True, sched, exact_heads(sched, cdims))
        source = _source(runner, plan, spec, 1, len(sched.lead), mode)
        path = cache.store(cache.key_of(source, "aot-decode"), source)
        consts = {"BLOCK_M": cfg.block_m, "BLOCK_N": cfg.block_n, "STORE_LSE": True, "NSPLIT": splits,
                  "HEAD_DIM_V": sy.tile_width(sy.evaluate(sched.col[1], cdims))}
        for hd, ext in spec.head_dims:
            consts[hd] = sy.tile_width(sy.evaluate(ext, cdims))
        out = next(c for c, u in view.outputs.items() if u == o.name)
        special = {"lse_out": f"*{acc}", f"{out}_ptr": f"*{acc}" if splits > 1 else f"*{TRITON_TYPE[dtype]}",
                   **{x: "*i32" for x in ("cu_q", "cu_k", "cache_len", "block_table")}}
        sig = kernel_signature(runner.planner.cg_program, source, GRID_KERNEL, dtype, "int64", consts, special)
        requests.append({"file": str(path), "kernel": GRID_KERNEL, "signature": sig, "constexprs": consts,
                         "target": target, "num_warps": cfg.num_warps, "num_stages": cfg.num_stages,
                         "block_m": cfg.block_m, "block_n": cfg.block_n})
        names.append(o.name)
    out = {}
    for name, res in zip(names, aot_batch(requests)):
        if isinstance(res, tuple):
            out[name] = (None, False, res[1])
        else:
            ok, why = fits(res, target)
            out[name] = (res, ok, why)
    return out


# long: the two launches of a decode with a fused epilogue, each assembled as an AOT request
def branches_aot(kernel, nq: int, m: int, dtype="bf16", target: str = "sm_90", splits: int = 8, config=None,
                 **dims) -> dict:
    """The launches of a CUDA decode of an output with a fused epilogue (PiAttention; runtime/decode_merge.py),
    compiled for `target` without a GPU: kernel name -> (AotReport, fits, why) of `_attn_branches` (every
    branch's grid kernel in one launch; one batch axis, SPLIT mode) and `_merge_epilogue`."""
    plan, block = _plan(kernel)
    dtype = canonical_dtype(dtype)
    gdims, row0 = _global(plan, nq, m)
    bd = plan.block_dims({**dims, **gdims}, row0, nq, 0, m)
    view = block.planner.codegen
    cdims = {c: bd[u] for c, u in view.dims.items() if u in bd}
    acc = "fp64" if dtype == "float64" else "fp32"
    sources, sig, consts, cfg = [], {}, {}, None
    for k, o in enumerate(plan.outputs):
        sched = block.planner.schedules[o.name]
        cfg = dataclasses.replace(config or decode_config(sched, cdims, dtype), tma=False)
        spec = block.launcher.spec(o.name, dtype, 1, cfg, True, sched, exact_heads(sched, cdims))
        source = _source(block, plan, spec, 1, len(sched.lead), SPLIT)
        c = {"BLOCK_M": cfg.block_m, "BLOCK_N": cfg.block_n, "STORE_LSE": True, "NSPLIT": splits,
             "HEAD_DIM_V": sy.tile_width(sy.evaluate(sched.col[1], cdims))}
        for hd, ext in spec.head_dims:
            c[hd] = sy.tile_width(sy.evaluate(ext, cdims))
        out = next(x for x, u in view.outputs.items() if u == o.name)
        special = {"lse_out": f"*{acc}", f"{out}_ptr": f"*{acc}"}
        s = kernel_signature(block.planner.cg_program, source, GRID_KERNEL, dtype, "int64", c, special)
        sig.update({f"b{k}_{a}": t for a, t in s.items()})
        consts.update({f"b{k}_{a}": v for a, v in c.items()})
        sources.append(source)
    sig.update({f"NP{k}": "i32" for k in range(1, len(sources))})
    requests = [{"file": str(cache.store(cache.key_of(branches_source(sources), "aot-decode"),
                                         branches_source(sources))),
                 "kernel": BRANCHES_KERNEL, "signature": sig, "constexprs": consts, "target": target,
                 "num_warps": cfg.num_warps, "num_stages": cfg.num_stages, "block_m": cfg.block_m,
                 "block_n": cfg.block_n}]
    ep = plan.epilogues[0]
    fm = decode_merge.fused_epilogues(block, plan, 1, torch.float32, frozenset(plan.roles))[ep.output]
    e = sy.evaluate(ep.extents[-1], bd)
    msig = {}
    for a in arg_names(fm.source, FUSED_MERGE_KERNEL):
        msig[a] = f"*{acc}" if re.fullmatch(r"(O|lse)\d+", a) else \
            f"*{TRITON_TYPE[dtype]}" if re.fullmatch(r"in\d+|O_out", a) else "i32"
    mconsts = {"BLOCK_R": decode_merge.BLOCK_R, "BLOCK_E": sy.tile_width(e),
               **{c: sy.tile_width(sy.evaluate(x, bd)) for c, x in fm.reduces}}
    for a in [a for a in msig if a.startswith("BLOCK")]:
        del msig[a]
    requests.append({"file": str(cache.store(cache.key_of(fm.source, "aot-decode"), fm.source)),
                     "kernel": FUSED_MERGE_KERNEL, "signature": msig, "constexprs": mconsts, "target": target,
                     "num_warps": 4, "num_stages": 1, "block_m": decode_merge.BLOCK_R, "block_n": 16})
    out = {}
    for name, res in zip((BRANCHES_KERNEL, FUSED_MERGE_KERNEL), aot_batch(requests)):
        out[name] = (None, False, res[1]) if isinstance(res, tuple) else (res, *fits(res, target))
    return out
