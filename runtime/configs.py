"""Tile configurations checked ahead of time for a GPU target (split from runtime/costing.py): candidate
configs, batched AOT compiles (in a child process when the interpreter is on), the fitting choice cached on disk,
Kernel.aot and the CUDA runtime's config, for the tiled kernel (_attn_fwd); the linear form's and the window kernel's
configs are in runtime/form_configs.py, on the same batched compiles."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import pickle
import subprocess
import sys
import tempfile
import threading
import warnings

import torch

from moa import ir
from moa import symbolic as sy
from moa.devices import canonical_dtype
from moa.errors import InputError, UnsupportedError

from . import aot as A
from .kernel import Config
from .device import next_pow2



# ---- AOT ---------------------------------------------------------------------------------------------------

_TT = {"float64": "fp64", "float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}
_MEM: dict = {}
_LOCK = threading.Lock()


def _aot_request(kernel, name: str, dtype: str, cfg: Config, dims: dict, nbatch: int, index_dtype: str,
                 target: str, sched=None) -> dict:
    """Everything needed to compile one output's kernel ahead of time (a picklable request): the kernel of
    `sched` (default: the tiled schedule) generated as Kernel._run generates it (the code-generation view)."""
    from moa.codegen.emit import generate

    from . import cache

    sched = sched or kernel.schedules[name]
    prog = getattr(kernel, "cg_program", kernel.program)
    spec = generate(prog, sched, dtype, nbatch, cfg.block_m, cfg.block_n, False)
    path = cache.store(cache.key_of(spec.source, "aot"), spec.source)
    e = sy.evaluate(sched.col[1], dims)
    constexprs = {"BLOCK_M": cfg.block_m, "BLOCK_N": cfg.block_n, "HEAD_DIM_V": max(16, next_pow2(e))}
    for hd, ext in spec.head_dims:
        constexprs[hd] = max(16, next_pow2(sy.evaluate(ext, dims)))
    sig = kernel_signature(prog, spec.source, "_attn_fwd", dtype, index_dtype, constexprs)
    return {"file": str(path), "signature": sig, "constexprs": constexprs, "target": target,
            "num_warps": cfg.num_warps, "num_stages": cfg.num_stages, "block_m": cfg.block_m,
            "block_n": cfg.block_n, "divisible": divisible_args(kernel, prog, sig, dims)}


def divisible_args(kernel, prog, sig: dict, dims: dict, out_shape: tuple | None = None) -> tuple:
    """The arguments Triton's JIT marks divisible by 16 on a typical CUDA launch, which the AOT compile mirrors:
    every pointer (the caching allocator's blocks are 256-byte aligned) and every integer argument that is a
    multiple of 16 at these dims: dims, and the strides of contiguous inputs and outputs (`out_shape`: the
    shape behind `out_ptr` of the chunked and window kernels). Unknown values (batch sizes, feature counts)
    are left unmarked. A launch with other strides compiles another specialisation (not checked here).
    `kernel` (None: `dims` are keyed by `prog`'s own dim names) maps the user's dim names onto `prog`'s."""
    names = {d.name: d for d in prog.dims}
    env = dict(dims)
    for d, cg in zip(kernel.program.dims if kernel is not None else prog.dims, prog.dims):
        if d.name in dims:
            env[cg.name] = dims[d.name]
    shapes = {node.attrs[0]: node.shape for node in prog.inputs}
    shapes.update({name: node.shape for name, node in prog.outputs})
    if out_shape is not None:
        shapes["out"] = out_shape
    values = {}
    for arg in sig:
        if arg.startswith("dim_") and arg[4:] in names and arg[4:] in env:
            values[arg] = env[arg[4:]]
        elif arg.startswith("stride_"):
            base, _, axis = arg[len("stride_"):].rpartition("_")
            if base not in shapes:
                continue
            try:
                ext = [sy.evaluate(x, env) for x in shapes[base]]
            except Exception:  # noqa: BLE001  (a shape the dims do not determine: leave the stride unmarked)
                continue
            if axis.isdigit():
                values[arg] = math.prod(ext[int(axis) + 1:])
            elif axis.startswith("z"):   # a batch stride: the tensor's size times inner batch sizes
                values[arg] = math.prod(ext)
    return tuple(a for a, t in sig.items() if t.startswith("*")) + \
        tuple(a for a, v in values.items() if v % 16 == 0 and v > 0)


def kernel_signature(prog, source: str, fn: str, dtype: str, index_dtype: str, constexprs: dict,
                     special: dict | None = None) -> dict:
    """Triton types of the runtime arguments of kernel `fn` in `source`, as a CUDA launch passes them: inputs'
    pointers by their declared dtype (floats in the compute dtype), other pointers in the compute dtype unless
    `special` types them, strides i32 except the innermost axis of a contiguous tensor, which Triton specialises
    to 1 (added to `constexprs`, in place), every other argument i32."""
    sig = {}
    inputs = prog.input_map
    it = {"int64": "i64", "int32": "i32"}[index_dtype]
    for arg in _arg_names(source, fn):
        if arg in constexprs:
            continue
        if special and arg in special:
            sig[arg] = special[arg]
        elif arg.endswith("_ptr"):
            base = arg[:-4]
            node = inputs.get(base)
            sig[arg] = f"*{_TT[dtype]}" if node is None or node.dtype == ir.FLOAT else \
                "*i1" if node.dtype == ir.BOOL else f"*{it}"
        elif arg.startswith("stride_"):
            base, _, axis = arg[len("stride_"):].rpartition("_")
            rank = inputs[base].rank if base in inputs else 2
            if axis == str(rank - 1):
                constexprs[arg] = 1      # contiguous innermost axis: Triton specialises a stride of 1
            else:
                sig[arg] = "i32"
        else:
            sig[arg] = "i32"
    return sig


def _arg_names(source: str, name: str = "_attn_fwd") -> list:
    import ast

    tree = ast.parse(source)
    fn = next(f for f in tree.body if isinstance(f, ast.FunctionDef) and f.name == name)
    return [a.arg for a in fn.args.args]


def _req_key(req: dict) -> str:
    with open(req["file"], "rb") as f:
        src = f.read()
    h = hashlib.sha256(src)
    h.update(repr(sorted((k, v) for k, v in req.items() if k != "file")).encode())
    return h.hexdigest()[:32]


def _compile_one(req: dict):
    """In a process where triton.language is not interpreted: AotReport or ('error', message). The kernel is
    req["kernel"] of the module in req["file"] (default _attn_fwd)."""
    fn = A._load_kernel("moa_aot_kernel", req["file"], req.get("kernel", "_attn_fwd"))
    try:
        return A.aot_compile(fn, req["signature"], req["constexprs"], target=req["target"],
                             num_warps=req["num_warps"], num_stages=req["num_stages"], block_m=req["block_m"],
                             block_n=req["block_n"], divisible=tuple(req.get("divisible", ())))
    except UnsupportedError as e:
        return ("error", e.message)


def aot_batch(requests: list) -> list:
    """Compile many kernels ahead of time (results: AotReport or ('error', message)); see aot_groups."""
    return [g[0] for g in aot_groups([[r] for r in requests])]


def aot_groups(groups: list, first_fit: bool = False) -> list:
    """Compile groups of kernels ahead of time, in one child process for all of them when this process runs the
    Triton interpreter (aot_compile would start one per kernel). An item of a group is one request, or a bundle
    (a list of requests: the kernels one config launches, e.g. the linear form's three kernels with each set of
    flags). With first_fit, each group stops at its first item that fits its target (runtime.aot.fits; a bundle
    fits when each of its kernels does, and stops at its first kernel that does not). Returns, per group, the
    results compiled so far (AotReport or ('error', message); a list of them for a bundle); results are memoised
    per process by the kernel source and options."""
    out: list = [None] * len(groups)
    todo = []
    for gi, group in enumerate(groups):
        got, done = [], True
        for r in group:
            x = _memo(r, first_fit)
            if x is None:
                done = False
                break
            got.append(x)
            if first_fit and _fits(x, r):
                break
        if done:
            out[gi] = got
        else:
            todo.append(gi)
    if todo:
        payload = [groups[gi] for gi in todo]
        if A._language_is_interpreted() or aot_jobs(len(payload)) > 1:   # a child compiles (in parallel)
            results = _groups_in_child(payload, first_fit)
        else:
            results = _compile_groups(payload, first_fit)
        with _LOCK:
            for gi, res in zip(todo, results):
                for r, x in zip(groups[gi], res):
                    for rq, y in (zip(r, x) if isinstance(r, list) else [(r, x)]):
                        _MEM[_req_key(rq)] = y
                out[gi] = res
    return out


def _memo(item, first_fit: bool):
    """The memoised result of a request or bundle, None when something it needs was not compiled yet."""
    if not isinstance(item, list):
        return _MEM.get(_req_key(item))
    got = []
    for r in item:
        x = _MEM.get(_req_key(r))
        if x is None:
            return None
        got.append(x)
        if first_fit and not _fits(x, r):
            break
    return got


def _fits(res, req) -> bool:
    if isinstance(req, list):
        return len(res) == len(req) and all(_fits(x, r) for x, r in zip(res, req))
    return not isinstance(res, tuple) and A.fits(res, req["target"])[0]


def _compile_groups(groups: list, first_fit: bool) -> list:
    out = []
    for group in groups:
        res = []
        for r in group:
            if isinstance(r, list):
                x = []
                for rq in r:
                    x.append(_compile_guarded(rq))
                    if first_fit and not _fits(x[-1], rq):
                        break
            else:
                x = _compile_guarded(r)
            res.append(x)
            if first_fit and _fits(x, r):
                break
        out.append(res)
    return out


def aot_jobs(ngroups: int) -> int:
    """Worker processes of the AOT compile process: MOA_AOT_JOBS, else one per available core (at most 8), never
    more than there are groups."""
    try:
        jobs = int(os.environ.get("MOA_AOT_JOBS", "0"))
    except ValueError:
        jobs = 0
    if jobs <= 0:
        jobs = min(8, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
    return max(1, min(jobs, ngroups))


def _compile_parallel(groups: list, first_fit: bool) -> list:
    """_compile_groups with the groups spread over aot_jobs() forked workers. Only in the compile process started
    by _groups_in_child: a fresh process that has touched no GPU and runs no threads of its own."""
    jobs = aot_jobs(len(groups))
    if jobs <= 1:
        return _compile_groups(groups, first_fit)
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("fork")) as pool:
        return [g[0] for g in pool.map(_compile_groups, [[g] for g in groups], [first_fit] * len(groups))]


def _compile_guarded(req: dict):
    """_compile_one, memoised (a bundle may hold the same kernel twice: flags it does not read) and never raising."""
    key = _req_key(req)
    if key in _MEM:
        return _MEM[key]
    try:
        res = _compile_one(req)
    except Exception as e:  # noqa: BLE001  (report, keep going with the next kernel)
        res = ("error", f"{type(e).__name__}: {e}")
    _MEM[key] = res
    return res


def _groups_in_child(groups: list, first_fit: bool) -> list:
    env = dict(os.environ)
    env["TRITON_INTERPRET"] = "0"   # code generation needs a triton.language that is not interpreted
    env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
    with tempfile.TemporaryDirectory(prefix="moa-aot-") as tmp:
        req_path, resp_path = os.path.join(tmp, "req.pkl"), os.path.join(tmp, "resp.pkl")
        with open(req_path, "wb") as f:
            pickle.dump((groups, first_fit), f)
        script = "import moa.runtime.configs as c; c._child_main()"
        proc = subprocess.run([sys.executable, "-c", script, req_path, resp_path], env=env, check=False,
                              capture_output=True, text=True)
        if not os.path.exists(resp_path):
            tail = " ".join(proc.stderr.strip().splitlines()[-3:])
            raise UnsupportedError(f"AOT compile process failed: {tail[:600]}")
        with open(resp_path, "rb") as f:
            raw = pickle.load(f)
    return [[_thaw(r) for r in g] for g in raw]


def _freeze(res):
    """A result as plain data for the child's pickle (an AotReport as a dict, an error as a list)."""
    if isinstance(res, list):
        return [_freeze(x) for x in res]
    return dataclasses.asdict(res) if isinstance(res, A.AotReport) else {"error": list(res)}


def _thaw(raw):
    if isinstance(raw, list):
        return [_thaw(x) for x in raw]
    return tuple(raw["error"]) if "error" in raw else A.AotReport(**raw)


def _child_main():
    req_path, resp_path = sys.argv[1], sys.argv[2]
    with open(req_path, "rb") as f:
        groups, first_fit = pickle.load(f)
    out = [[_freeze(r) for r in g] for g in _compile_parallel(groups, first_fit)]
    with open(resp_path, "wb") as f:
        pickle.dump(out, f)


def candidates(dtype: str, head: int, default: Config) -> list:
    """Configs tried in order by fit_config: the runtime's default first, then smaller tiles. The fp16/bf16 lists
    keep BLOCK_M >= 64 (wgmma needs M = 64 per warpgroup) until the last resort."""
    if dtype == "float64":
        rest = [Config(32, 32, 4, 1), Config(16, 32, 4, 1), Config(16, 16, 4, 1)]
    elif dtype == "float32":
        rest = [Config(64, 32, 4, 2), Config(64, 32, 4, 1), Config(32, 32, 4, 1), Config(16, 16, 4, 1)]
    elif head <= 64:
        rest = [Config(128, 64, 8, 3), Config(128, 64, 4, 3), Config(64, 64, 4, 3), Config(128, 32, 4, 3),
                Config(64, 32, 4, 2), Config(64, 32, 8, 2), Config(32, 32, 4, 1)]
    else:
        rest = [Config(128, 64, 8, 3), Config(128, 32, 8, 3), Config(64, 64, 8, 2), Config(64, 32, 8, 2),
                Config(64, 64, 4, 2), Config(64, 32, 4, 2), Config(32, 32, 4, 1)]
    out = [default]
    for c in rest:
        if c not in out:
            out.append(c)
    return out


def _disk_path(key: str):
    from .cache import cache_dir

    return cache_dir() / "aot" / f"{key}.json"


def fit_requests(kernel, name: str, dtype: str, dims: dict, target: str = "sm_90", nbatch: int = 0,
                 index_dtype: str = "int64", default: Config | None = None, sched=None) -> tuple[list, list]:
    """(candidate configs, AOT requests) of fit_config, in the order they are tried."""
    dtype = canonical_dtype(dtype)
    from .costing import launch_config, launch_extents  # costing re-exports this module: import late

    n, m, head = launch_extents(kernel.schedules[name], dims)  # the same extents for every schedule kind
    default = default or launch_config(kernel, name, torch.device("cuda"), dtype, dims)
    cands = candidates(dtype, head, default)
    return cands, [_aot_request(kernel, name, dtype, c, dims, nbatch, index_dtype, target, sched) for c in cands]


def choose_fitting(cands: list, results: list, target: str, what: str) -> tuple:
    """The first candidate whose report fits, or UnsupportedError naming every config tried and why. Candidates
    are Configs (returns (config, report)) or (schedule label, Config) pairs (returns (index, report))."""
    reasons = []
    for k, (c, res) in enumerate(zip(cands, results)):
        text = f"{c[0]} schedule {_cfg_text(c[1])}" if isinstance(c, tuple) else _cfg_text(c)
        if isinstance(res, tuple):
            reasons.append(f"{text}: {_short(res[1])}")
            continue
        ok, why = A.fits(res, target)
        if ok:
            return (k if isinstance(c, tuple) else c), res
        reasons.append(f"{text}: {why}")
    raise UnsupportedError(f"{what} does not fit on {target}: every tile config spills, exceeds shared memory or "
                           f"fails to compile ({'; '.join(reasons)})")


def fit_config(kernel, name: str, dtype: str, dims: dict, target: str = "sm_90", nbatch: int = 0,
               index_dtype: str = "int64", default: Config | None = None,
               sched=None) -> tuple[Config, A.AotReport | None]:
    """The first candidate config (the runtime default first, then smaller tiles) whose kernel compiles for
    `target` with no spills, shared memory within the per-block limit and registers within bounds. The kernel is
    that of `sched`; without it, that of the schedule a CUDA launch uses (fit_schedule). Decisions are cached on
    disk (JSON in the moa cache directory) and in memory (the report is None when the decision came from the disk
    cache). Raises UnsupportedError naming every config tried when none fits."""
    if sched is None:
        return fit_schedule(kernel, name, dtype, dims, target, nbatch, index_dtype, default=default)[1:]
    return _first_fit(kernel, name, dtype, dims, [sched], target, nbatch, index_dtype, default)[1:]


def fit_schedule(kernel, name: str, dtype: str, dims: dict, target: str = "sm_90", nbatch: int = 0,
                 index_dtype: str = "int64", batch: int = 1, default: Config | None = None):
    """(schedule, config, AotReport or None) of a CUDA launch on `target`: the schedules in the runtime's order
    (Kernel.schedule_ranking: the predicted-fastest first), each with its candidate configs, and the first kernel
    that fits. So a schedule whose kernel spills on the target (e.g. the hop loop at d = 128) gives way to the
    next one. Raises UnsupportedError naming every schedule and config tried when none fits."""
    return _first_fit(kernel, name, dtype, dims, ranked_schedules(kernel, name, dtype, dims, target, batch), target,
                      nbatch, index_dtype, default)


def ranked_schedules(kernel, name: str, dtype: str, dims: dict, target: str, batch: int = 1,
                     device: str | None = None) -> list:
    """The schedules a CUDA launch on `target` tries, in order (Kernel.schedule_ranking), predicted on `device`
    (a device-table name; default: the target's, sm_90 -> h100)."""
    if not hasattr(kernel, "schedule_ranking"):
        return [kernel.schedules[name]]
    return kernel.schedule_ranking(name, dims, canonical_dtype(dtype), device or target_device(target), batch)


def fit_plan(kernel, name: str, dtype: str, dims: dict, target: str = "sm_90", nbatch: int = 0,
             index_dtype: str = "int64", default: Config | None = None, scheds=None) -> list:
    """[(schedule, config, AOT request)] in the order fit_schedule tries them (`scheds`: default the runtime's
    ranking). Compile the requests as one group of aot_groups(first_fit=True), then choose_plan."""
    dtype = canonical_dtype(dtype)
    plan = []
    for sched in scheds or ranked_schedules(kernel, name, dtype, dims, target):
        cands, reqs = fit_requests(kernel, name, dtype, dims, target, nbatch, index_dtype, default, sched)
        plan += [(sched, c, r) for c, r in zip(cands, reqs)]
    return plan


def choose_plan(plan: list, results: list, target: str, what: str) -> tuple:
    """(index into plan, AotReport with .schedule set) of the first entry that fits; UnsupportedError naming
    every schedule and config tried otherwise."""
    k, rep = choose_fitting([(_label(s), c) for s, c, _ in plan], results, target, what)
    return k, dataclasses.replace(rep, schedule=_label(plan[k][0]))


def _first_fit(kernel, name, dtype, dims, scheds, target, nbatch, index_dtype, default):
    plan = fit_plan(kernel, name, dtype, dims, target, nbatch, index_dtype, default, scheds)
    key = hashlib.sha256("".join(_req_key(r) for _, _, r in plan).encode()).hexdigest()[:32]
    path = _disk_path(key)
    try:
        sched, cfg, _ = plan[json.loads(path.read_text())["choice"]]
        return sched, cfg, None
    except (OSError, ValueError, KeyError, IndexError, TypeError):
        pass
    results = aot_groups([[r for _, _, r in plan]], first_fit=True)[0]
    what = (f"output {name} of {kernel.program.name} ({canonical_dtype(dtype)}, "
            f"{', '.join(f'{k}={v}' for k, v in dims.items())})")
    k, rep = choose_plan(plan, results, target, what)
    _save_choice(path, k)
    return plan[k][0], plan[k][1], rep


def _label(sched) -> str:
    from moa import onf

    return onf.label(sched)


def target_device(target: str) -> str:
    """The device-table entry whose schedule choice a target's kernel follows (sm_90 -> h100, sm_8x -> a100)."""
    return "h100" if A.TARGETS.get(target, 90) >= 90 else "a100"


def _short(message: str) -> str:
    """The gist of an AOT failure: the shared memory needed, else the message's tail."""
    import re

    m = re.search(r"needs (\d+) bytes of shared memory, more than the (\d+) bytes", message)
    if m:
        return f"needs {int(m.group(1)) // 1024} KiB of shared memory > {int(m.group(2)) // 1024} KiB"
    tail = message.split("): ", 1)[-1]
    return tail[:160]


def _save_choice(path, index: int):
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp_", suffix=".json")
        with os.fdopen(fd, "w") as f:
            json.dump({"choice": index}, f)
        os.replace(tmp, path)
    except OSError:
        pass


def _cfg_text(c: Config) -> str:
    return f"BLOCK_M={c.block_m} BLOCK_N={c.block_n} warps={c.num_warps} stages={c.num_stages}"


def aot(kernel, target: str = "sm_90", dtype="bf16", config: Config | None = None, output: str | None = None,
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
    BLOCK_N / BLOCK_M) and an AotReport per kernel (.kernels: the linear form's three kernels with every flag
    combination a launch uses, the ring's included)."""
    from . import form_configs as F

    dtype = canonical_dtype(dtype)
    name = output or kernel.output_names[0]
    if name not in kernel.output_names:
        raise InputError(f"no output {name!r}; outputs: {', '.join(kernel.output_names)}")
    if kernel._is_window(name):
        return F.aot_form(kernel, name, "window", target, dtype, config, nbatch, index_dtype,
                          F.window_dims(kernel, name, dims))
    dims = _aot_dims(kernel, name, dims)
    if kernel.choose_form(name, dims) == "linear":
        return F.aot_form(kernel, name, "linear", target, dtype, config, nbatch, index_dtype, dims)
    if config is None:
        sched, config, rep = fit_schedule(kernel, name, dtype, dims, target, nbatch, index_dtype)
        if rep is not None:
            return rep
    else:
        sched = ranked_schedules(kernel, name, dtype, dims, target)[0]
    res = aot_batch([_aot_request(kernel, name, dtype, config, dims, nbatch, index_dtype, target, sched)])[0]
    if isinstance(res, tuple):
        raise UnsupportedError(res[1])
    return dataclasses.replace(res, schedule=_label(sched))


def _aot_dims(kernel, name, dims) -> dict:
    """Dims for AOT: row/key extents default to 4096 when not given (they only steer the config choice)."""
    sched = kernel.schedules[name]
    need = set()
    for x in [sched.col[1]] + [b.dot.extent for b in sched.branches if b.dot is not None]:
        need |= sy.free_names(x)
    missing = sorted(need - set(dims))
    if missing:
        raise InputError(f"aot needs the head dims {', '.join(missing)} (e.g. --dims "
                         f"{','.join(f'{x}=128' for x in missing)})")
    out = dict(dims)
    for d in kernel.program.dims:
        out.setdefault(d.name, 4096)
    return out


def runtime_config(kernel, name: str, dtype: str, dims: dict, nbatch: int, device, batch: int = 1) -> tuple:
    """(schedule, config) Kernel._run launches on a CUDA device: the schedules in the runtime's order, each with
    the default table then smaller tiles, checked ahead of time for the device's architecture (no spills, shared
    memory in budget): fit_schedule. If the AOT check itself cannot run, the predicted schedule and the default
    config are used with a warning."""
    cap = torch.cuda.get_device_capability(device)
    target = f"sm_{cap[0]}{cap[1]}"
    if target not in A.TARGETS:
        target = "sm_90" if cap[0] >= 9 else "sm_80"
    sched = kernel.schedules[name]
    heads = tuple(sy.evaluate(x, dims) for x in [sched.col[1]] + [b.dot.extent for b in sched.branches
                                                                   if b.dot is not None])
    memo = kernel.__dict__.setdefault("_fit_memo", {})
    from .kernel import _device_name

    ranking = ranked_schedules(kernel, name, dtype, dims, target, batch, _device_name(device))
    key = (name, dtype, nbatch, target, tuple(max(16, next_pow2(h)) for h in heads),
           tuple(_label(x) for x in ranking),
           tuple(sorted((k, v % 16 == 0) for k, v in dims.items())))   # the JIT's divisibility specialisation
    if key in memo:
        return memo[key]
    try:
        memo[key] = _first_fit(kernel, name, dtype, dims, ranking, target, nbatch, "int64", None)[:2]
        return memo[key]
    except UnsupportedError as e:
        if " does not fit on " in e.message:
            raise
        warnings.warn(f"moa: AOT config check unavailable ({e.message[:200]}); using the default config",
                      RuntimeWarning, stacklevel=3)
        from .costing import launch_config

        return ranking[0], launch_config(kernel, name, device, dtype, dims)
