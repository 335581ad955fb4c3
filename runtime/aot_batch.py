"""Ahead-of-time compiles in batches: requests (a generated kernel, its argument types and constexprs, a target
and launch options), compiled concurrently in a child process with forked workers (runtime/compile_pool.py), or
here when one worker is all there is; results (AotReport or ('error', message)) memoised per process; the first
config that fits chosen and the choice cached on disk. The tiled kernel's requests are made in runtime/configs.py,
the other families' in runtime/form_configs.py."""
from __future__ import annotations

import ast
import hashlib
import json
import math
import os
import re
import tempfile
import threading

import torch

from moa import ir
from moa import symbolic as sy
from moa.errors import UnsupportedError

from . import aot as A
from . import compile_pool as P
from .cache import cache_dir
from .tiling import Config

TRITON_TYPE = {"float64": "fp64", "float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}
_MEM: dict = {}
_LOCK = threading.Lock()


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
    for arg in arg_names(source, fn):
        if arg in constexprs:
            continue
        if special and arg in special:
            sig[arg] = special[arg]
        elif arg.endswith("_ptr"):
            base = arg[:-4]
            node = inputs.get(base)
            sig[arg] = f"*{TRITON_TYPE[dtype]}" if node is None or node.dtype == ir.FLOAT else \
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


def arg_names(source: str, name: str = "_attn_fwd") -> list:
    tree = ast.parse(source)
    fn = next(f for f in tree.body if isinstance(f, ast.FunctionDef) and f.name == name)
    return [a.arg for a in fn.args.args]


def req_key(req: dict) -> str:
    with open(req["file"], "rb") as f:
        src = f.read()
    h = hashlib.sha256(src)
    h.update(repr(sorted((k, v) for k, v in req.items() if k != "file")).encode())
    return h.hexdigest()[:32]


def aot_batch(requests: list) -> list:
    """Compile many kernels ahead of time (results: AotReport or ('error', message)); see aot_groups."""
    return [g[0] for g in aot_groups([[r] for r in requests])]


def aot_groups(groups: list, first_fit: bool = False) -> list:
    """Compile groups of kernels ahead of time, concurrently: in one child process with compile_pool.workers()
    forked compile processes (runtime/compile_pool.py; Triton's compile holds the GIL, so threads would not help),
    or here, serially, when one worker is all there is and this process does not run the Triton interpreter. An
    item of a group is one request, or a bundle (a list of requests: the kernels one config launches, e.g. the
    linear form's two kernels with each set of flags). With first_fit, each group stops at its first item that
    fits its target (runtime.aot.fits; a bundle fits when each of its kernels does, and stops at its first kernel
    that does not): the result is the serial one, the items after the fit being compiled only speculatively, on
    workers that would idle otherwise. Returns, per group, the results compiled so far (AotReport or ('error',
    message); a list of them for a bundle); results are memoised per process by the kernel source and options."""
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
        units = sum(len(it) if isinstance(it, list) else 1 for g in payload for it in g)
        spec = P.speculates(P.workers(units))
        # the compiles that can run at once: without speculation, a first-fit group's first item (or bundle)
        useful = units if spec or not first_fit else \
            sum(max(len(it) if isinstance(it, list) else 1 for it in g) for g in payload if g)
        n = P.workers(useful)
        if A._language_is_interpreted() or n > 1:   # a child compiles (in parallel)
            results = P.in_child(payload, first_fit, n, spec)
        else:
            results = P.run_groups(payload, _compile_guarded, P.job_fits, first_fit)
        with _LOCK:
            for gi, res in zip(todo, results):
                for r, x in zip(groups[gi], res):
                    for rq, y in (zip(r, x) if isinstance(r, list) else [(r, x)]):
                        _MEM[req_key(rq)] = y
                out[gi] = res
    return out


def _memo(item, first_fit: bool):
    """The memoised result of a request or bundle, None when something it needs was not compiled yet."""
    if not isinstance(item, list):
        return _MEM.get(req_key(item))
    got = []
    for r in item:
        x = _MEM.get(req_key(r))
        if x is None:
            return None
        got.append(x)
        if first_fit and not _fits(x, r):
            break
    return got


def _fits(res, req) -> bool:
    if isinstance(req, list):
        return len(res) == len(req) and all(_fits(x, r) for x, r in zip(res, req))
    return P.job_fits(res, req)


def _compile_guarded(req: dict):
    """compile_pool.compile_job, memoised (a bundle may hold the same kernel twice: flags it does not read)."""
    key = req_key(req)
    if key not in _MEM:
        _MEM[key] = P.compile_job(req)
    return _MEM[key]


def disk_path(key: str):
    return cache_dir() / "aot" / f"{key}.json"


def choose_fitting(cands: list, results: list, target: str, what: str) -> tuple:
    """The first candidate whose report fits, or UnsupportedError naming every config tried and why. Candidates
    are Configs (returns (config, report)) or (schedule label, Config) pairs (returns (index, report))."""
    reasons = []
    for k, (c, res) in enumerate(zip(cands, results)):
        text = f"{c[0]} schedule {cfg_text(c[1])}" if isinstance(c, tuple) else cfg_text(c)
        if isinstance(res, tuple):
            reasons.append(f"{text}: {short_reason(res[1])}")
            continue
        ok, why = A.fits(res, target)
        if ok:
            return (k if isinstance(c, tuple) else c), res
        reasons.append(f"{text}: {why}")
    raise UnsupportedError(f"{what} does not fit on {target}: every tile config spills, exceeds shared memory or "
                           f"fails to compile ({'; '.join(reasons)})")


def target_device(target: str) -> str:
    """The device-table entry whose schedule choice a target's kernel follows (sm_90 -> h100, sm_8x -> a100)."""
    return "h100" if A.TARGETS.get(target, 90) >= 90 else "a100"


def no_fit(e) -> bool:
    """Whether an UnsupportedError is a config search that ran and found nothing that fits (choose_fitting,
    form_configs.choose_bundle), not a failure of the AOT check itself (no ptxas, a compile process that died)."""
    return " does not fit on " in e.message


def short_reason(message: str) -> str:
    """The gist of an AOT failure: the shared memory needed, else the message's tail."""
    m = re.search(r"needs (\d+) bytes of shared memory, more than the (\d+) bytes", message)
    if m:
        return f"needs {int(m.group(1)) // 1024} KiB of shared memory > {int(m.group(2)) // 1024} KiB"
    tail = message.split("): ", 1)[-1]
    return tail[:160]


def load_choice(path, count: int) -> int:
    """The cached index of the first fitting candidate among `count`; ValueError when the file holds anything else
    (a negative index, a bool or another type: a stale or edited file is rebuilt, never obeyed)."""
    x = json.loads(path.read_text())["choice"]
    if type(x) is not int or not 0 <= x < count:
        raise ValueError(f"bad cached choice {x!r}")
    return x


def save_choice(path, index: int):
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp_", suffix=".json")
        with os.fdopen(fd, "w") as f:
            json.dump({"choice": index}, f)
        os.replace(tmp, path)
    except OSError:
        pass


def cfg_text(c: Config) -> str:
    return c.text()


def cuda_target(device) -> str:
    """The AOT target of a CUDA device (its sm_XX when known, else sm_90 / sm_80 by major version)."""
    cap = torch.cuda.get_device_capability(device)
    target = f"sm_{cap[0]}{cap[1]}"
    if target not in A.TARGETS:
        target = "sm_90" if cap[0] >= 9 else "sm_80"
    return target
