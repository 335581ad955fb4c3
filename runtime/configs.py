"""The tiled kernel's configs checked ahead of time for a GPU target: the AOT requests of a schedule's candidate
configs, the first (schedule, config) that fits (no spills, shared memory within the per-block limit), the CUDA
runtime's choice, and Kernel.aot. The chunked linear form's and the window kernel's configs are in
runtime/form_configs.py; the batched compiles they share in runtime/aot_batch.py.

Functions take the program's Planner (runtime/plan.py): its schedules, code-generation view and schedule ranking."""
from __future__ import annotations

import dataclasses
import hashlib
import warnings

import torch

from moa import ir, onf
from moa import symbolic as sy
from moa.codegen.emit import generate
from moa.devices import canonical_dtype
from moa.errors import InputError, UnsupportedError

from . import aot as A
from . import cache
from . import form_configs as F
from .aot_batch import (TRITON_TYPE, aot_groups, choose_fitting, cuda_target, disk_path, load_choice,
                        divisible_args, kernel_signature, no_fit, req_key, save_choice, target_device)
from .device import device_table_name
from .tiling import Config, candidates, default_config, exact_heads, launch_extents


def _aot_request(planner, name: str, dtype: str, cfg: Config, dims: dict, nbatch: int, index_dtype: str,
                 target: str, sched=None):
    """Everything needed to compile one output's kernel ahead of time (a picklable request): the kernel of
    `sched` (default: the tiled schedule) generated as the Launcher generates it (the code-generation view). A
    split schedule gives a bundle: a request per kernel, the stored branch values typed in the accumulation
    dtype."""
    sched = sched or planner.schedules[name]
    acc = "*fp64" if dtype == "float64" else "*fp32"
    values = {f"{v}_ptr": acc for v in planner.value_names(name)} if sched.kind == onf.SPLIT else {}
    reqs = [_kernel_request(planner, prog, s, dtype, cfg, dims, nbatch, index_dtype, target, values,
                            exact_heads(sched, dims)) for _, _, prog, s in planner.kernels(name, sched)]
    return reqs if sched.kind == onf.SPLIT else reqs[0]


def _kernel_request(planner, prog, sched, dtype: str, cfg: Config, dims: dict, nbatch: int, index_dtype: str,
                    target: str, values: dict, exact) -> dict:
    spec = generate(prog, sched, dtype, nbatch, cfg.block_m, cfg.block_n, False, exact, cfg.tma, cfg.overlap)
    path = cache.store(cache.key_of(spec.source, "aot"), spec.source)
    e = sy.evaluate(sched.col[1], dims)
    constexprs = {"BLOCK_M": cfg.block_m, "BLOCK_N": cfg.block_n, "HEAD_DIM_V": sy.tile_width(e)}
    for hd, ext in spec.head_dims:
        constexprs[hd] = sy.tile_width(sy.evaluate(ext, dims))
    special = {**summary_types(prog, spec, index_dtype, constexprs), **values}
    for d in spec.descriptors:   # TMA: the descriptor's element type and box, as a CUDA launch specialises it
        box = ", ".join(str(constexprs.get(x, x)) for x in d.block)
        special[d.arg] = f"tensordesc<{TRITON_TYPE[dtype]}[{box}]>"
    sig = kernel_signature(prog, spec.source, "_attn_fwd", dtype, index_dtype, constexprs, special)
    return {"file": str(path), "signature": sig, "constexprs": constexprs, "target": target,
            "num_warps": cfg.num_warps, "num_stages": cfg.num_stages, "block_m": cfg.block_m,
            "block_n": cfg.block_n, "divisible": divisible_args(planner, prog, sig, dims)}


def summary_types(prog, spec, index_dtype: str, constexprs: dict) -> dict:
    """Triton types of the per-tile summary arguments (runtime/summaries.py): booleans as int8, integers in the
    index dtype, strides i32 but the (min, max) axis, contiguous, specialised to 1 (added to `constexprs`)."""
    out = {}
    for ts in spec.summaries:
        node = prog.input_map[ts.tensor]
        out[f"{ts.arg}_ptr"] = "*i8" if node.dtype == ir.BOOL else {"int64": "*i64", "int32": "*i32"}[index_dtype]
        out.update({f"stride_{ts.arg}_{a}": "i32" for a in (*(f"z{z}" for z in range(spec.nbatch)),
                                                           *(str(k) for k in range(ts.rank)))})
        constexprs[f"stride_{ts.arg}_s"] = 1
    return out


def fit_requests(planner, name: str, dtype: str, dims: dict, target: str = "sm_90", nbatch: int = 0,
                 index_dtype: str = "int64", default: Config | None = None, sched=None) -> tuple[list, list]:
    """(candidate configs, AOT requests) of fit_config, in the order they are tried."""
    dtype = canonical_dtype(dtype)
    n, m, head = launch_extents(planner.schedules[name], dims)  # the same extents for every schedule kind
    default = default or default_config(planner.schedules[name], torch.device("cuda"), dtype, dims, f"output {name}")
    cands = candidates(dtype, head, default)
    return cands, [_aot_request(planner, name, dtype, c, dims, nbatch, index_dtype, target, sched) for c in cands]


def fit_config(planner, name: str, dtype: str, dims: dict, target: str = "sm_90", nbatch: int = 0,
               index_dtype: str = "int64", default: Config | None = None,
               sched=None) -> tuple[Config, A.AotReport | None]:
    """The first candidate config (the runtime default first, then smaller tiles) whose kernel compiles for
    `target` with no spills, shared memory within the per-block limit and registers within bounds. The kernel is
    that of `sched`; without it, that of the schedule a CUDA launch uses (fit_schedule). Decisions are cached on
    disk (JSON in the moa cache directory) and in memory (the report is None when the decision came from the disk
    cache). Raises UnsupportedError naming every config tried when none fits."""
    if sched is None:
        return fit_schedule(planner, name, dtype, dims, target, nbatch, index_dtype, default=default)[1:]
    return _first_fit(planner, name, dtype, dims, [sched], target, nbatch, index_dtype, default)[1:]


def fit_schedule(planner, name: str, dtype: str, dims: dict, target: str = "sm_90", nbatch: int = 0,
                 index_dtype: str = "int64", batch: int = 1, default: Config | None = None):
    """(schedule, config, AotReport or None) of a CUDA launch on `target`: the schedules in the runtime's order
    (Kernel.schedule_ranking: the predicted-fastest first), each with its candidate configs, and the first kernel
    that fits. So a schedule whose kernel spills on the target (e.g. the hop loop at d = 128) gives way to the
    next one. Raises UnsupportedError naming every schedule and config tried when none fits."""
    return _first_fit(planner, name, dtype, dims, ranked_schedules(planner, name, dtype, dims, target, batch), target,
                      nbatch, index_dtype, default)


def ranked_schedules(planner, name: str, dtype: str, dims: dict, target: str, batch: int = 1,
                     device: str | None = None, fills: bool = False) -> list:
    """The schedules a CUDA launch on `target` tries, in order (Kernel.schedule_ranking), predicted on `device`
    (a device-table name; default: the target's, sm_90 -> h100)."""
    return planner.schedule_ranking(name, dims, canonical_dtype(dtype), device or target_device(target), batch,
                                    fills)


def fit_plan(planner, name: str, dtype: str, dims: dict, target: str = "sm_90", nbatch: int = 0,
             index_dtype: str = "int64", default: Config | None = None, scheds=None) -> list:
    """[(schedule, config, AOT request)] in the order fit_schedule tries them (`scheds`: default the runtime's
    ranking). Compile the requests as one group of aot_groups(first_fit=True), then choose_plan."""
    dtype = canonical_dtype(dtype)
    plan = []
    for sched in scheds or ranked_schedules(planner, name, dtype, dims, target):
        cands, reqs = fit_requests(planner, name, dtype, dims, target, nbatch, index_dtype, default, sched)
        plan += [(sched, c, r) for c, r in zip(cands, reqs)]
    return plan


def choose_plan(plan: list, results: list, target: str, what: str) -> tuple:
    """(index into plan, report) of the first entry that fits: an AotReport with .schedule set, or for a split
    schedule a FormAotReport (form: the split's label) of its kernels; UnsupportedError naming every schedule and
    config tried otherwise."""
    results = [_bundle(s, c, r, target) for (s, c, _), r in zip(plan, results)]
    k, rep = choose_fitting([(_label(s), c) for s, c, _ in plan], results, target, what)
    return k, rep if isinstance(rep, F.FormAotReport) else dataclasses.replace(rep, schedule=_label(plan[k][0]))


def _bundle(sched, cfg: Config, res, target: str):
    """A split schedule's results (one per kernel) as one report, or its first error."""
    if not isinstance(res, list):
        return res
    bad = next((x for x in res if isinstance(x, tuple)), None)
    if bad is not None:
        return bad
    return F.FormAotReport(_label(sched), target, cfg, tuple(res), sched.output)


def _first_fit(planner, name, dtype, dims, scheds, target, nbatch, index_dtype, default):
    plan = fit_plan(planner, name, dtype, dims, target, nbatch, index_dtype, default, scheds)
    key = hashlib.sha256("".join(req_key(x) for _, _, r in plan for x in (r if isinstance(r, list) else [r]))
                         .encode()).hexdigest()[:32]
    path = disk_path(key)
    try:
        sched, cfg, _ = plan[load_choice(path, len(plan))]
        return sched, cfg, None
    except (OSError, ValueError, KeyError, IndexError, TypeError):
        pass
    results = aot_groups([[r for _, _, r in plan]], first_fit=True)[0]
    what = (f"output {name} of {planner.program.name} ({canonical_dtype(dtype)}, "
            f"{', '.join(f'{k}={v}' for k, v in dims.items())})")
    k, rep = choose_plan(plan, results, target, what)
    save_choice(path, k)
    return plan[k][0], plan[k][1], rep


def _label(sched) -> str:
    return onf.label(sched)


def aot(planner, target: str = "sm_90", dtype="bf16", config: Config | None = None, output: str | None = None,
        nbatch: int = 0, index_dtype: str = "int64", **dims):
    """Compile one output's generated kernel for `target` without a GPU and report its resources (AotReport:
    registers, spills, shared_bytes, uses_wgmma, num_warps, num_stages, block_m, block_n, ptx, cubin).
    Without `config`, the config is the one the GPU runtime launches: the default table's, or the first
    candidate that fits (fit_config). The kernel is that of the schedule the runtime chooses for these dims on
    the target (tiled, hops or residue: Kernel.schedule_for; AotReport.name says which). Dims of the row/key
    axes matter for the config and schedule choices; head dims (the contraction and value extents) are
    required.

    An output that runs in the window-mixing kernel, or in the chunked linear form (compiled with form="linear",
    or chosen by the runtime at these dims), gives a runtime/form_configs.FormAotReport instead: the config the
    runtime launches (or `config`: a LinearConfig / WindowConfig, or a Config read as CHUNK = BLOCK_M, BLOCK_F =
    BLOCK_N / BLOCK_M) and an AotReport per kernel (.kernels: the linear form's two kernels with every flag
    combination a launch uses, the ring's included)."""
    dtype = canonical_dtype(dtype)
    A._capability(target)   # an unknown target is refused once, not once per candidate config
    name = output or planner.output_names[0]
    if name not in planner.output_names:
        raise InputError(f"no output {name!r}; outputs: {', '.join(planner.output_names)}")
    if planner.is_window(name):
        return F.aot_form(planner, name, "window", target, dtype, config, nbatch, index_dtype,
                          F.window_dims(planner, name, dims))
    dims = _aot_dims(planner, name, dims)
    if planner.choose_form(name, dims) == "linear":
        return F.aot_form(planner, name, "linear", target, dtype, config, nbatch, index_dtype, dims)
    if config is not None and not isinstance(config, Config):
        raise InputError(f"output {name} runs in the tiled kernel at these dims: config must be a tile Config "
                         f"(BLOCK_M, BLOCK_N, warps, stages), not a {type(config).__name__}")
    if config is None:
        sched, config, rep = fit_schedule(planner, name, dtype, dims, target, nbatch, index_dtype)
        if rep is not None:
            return rep
    else:
        sched = ranked_schedules(planner, name, dtype, dims, target)[0]
    req = _aot_request(planner, name, dtype, config, dims, nbatch, index_dtype, target, sched)
    res = _bundle(sched, config, aot_groups([[req]])[0][0], target)
    if isinstance(res, tuple):
        raise UnsupportedError(res[1])
    return res if isinstance(res, F.FormAotReport) else dataclasses.replace(res, schedule=_label(sched))


def _aot_dims(planner, name, dims) -> dict:
    """Dims for AOT: row/key extents default to 4096 when not given (they only steer the config choice)."""
    sched = planner.schedules[name]
    need = set()
    for x in [sched.col[1]] + [b.dot.extent for b in sched.branches if b.dot is not None]:
        need |= sy.free_names(x)
    missing = sorted(need - set(dims))
    if missing:
        raise InputError(f"aot needs the head dims {', '.join(missing)} (e.g. --dims "
                         f"{','.join(f'{x}=128' for x in missing)})")
    out = dict(dims)
    for d in planner.program.dims:
        out.setdefault(d.name, 4096)
    return out


def runtime_config(planner, name: str, dtype: str, dims: dict, nbatch: int, device, batch: int = 1,
                   fills: bool = False) -> tuple:
    """(schedule, config) a tiled launch runs on a CUDA device: the schedules in the runtime's order, each with
    the default table then smaller tiles, checked ahead of time for the device's architecture (no spills, shared
    memory in budget): fit_schedule. If the AOT check itself cannot run, the predicted schedule and the default
    config are used with a warning."""
    target = cuda_target(device)
    sched = planner.schedules[name]
    heads = tuple(sy.evaluate(x, dims) for x in [sched.col[1]] + [b.dot.extent for b in sched.branches
                                                                   if b.dot is not None])
    memo = planner.fit_memo
    ranking = ranked_schedules(planner, name, dtype, dims, target, batch, device_table_name(device), fills)
    key = (name, dtype, nbatch, target, tuple(sy.tile_width(h) for h in heads),
           tuple(_label(x) for x in ranking),
           tuple(sorted((k, v % 16 == 0) for k, v in dims.items())))   # the JIT's divisibility specialisation
    if key in memo:
        return memo[key]
    try:
        memo[key] = _first_fit(planner, name, dtype, dims, ranking, target, nbatch, "int64", None)[:2]
        return memo[key]
    except UnsupportedError as e:
        if no_fit(e):
            raise
        warnings.warn(f"moa: AOT config check unavailable ({e.message[:200]}); using the default config",
                      RuntimeWarning, stacklevel=3)
        return ranking[0], default_config(sched, device, dtype, dims, f"output {name}")
