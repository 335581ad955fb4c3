"""Kernel.measure: the kernel(s) a call runs, executed on CPU tensors in the instrumented Triton interpreter
(runtime/measure.py), with the counters the cost model predicts (runtime/costing.py) and the visited tiles read from
the executions of one load statement per loop body (`witness_lines`)."""
from __future__ import annotations

import ast
import math

import torch

from moa.errors import InputError, UnsupportedError

from .cache import module_stem
from .costing import kernel_specs, launch_specs, run_schedule, window_launch
from .linear_cost import linear_launches
from .measure import instrument
from .plan import LINEAR, WINDOW
from .reports import Measurement
from .tiling import DTYPE_NAME


def measure(kernel, **inputs) -> Measurement:
    """Run the kernel(s) on CPU tensors in the instrumented Triton interpreter and return its counters: the kernel
    a call runs (tiled, window-mixing, or the two chunked linear-form launches, summed)."""
    b = kernel.bind(inputs)     # the refusals a call makes, before anything runs
    if b.device.type != "cpu":
        raise InputError("measure() counts what the Triton interpreter executes: pass CPU tensors")
    planner, launcher = kernel.planner, kernel.launcher
    compute = torch.float32 if b.dtype == torch.bfloat16 else b.dtype   # the runners convert inputs to it
    dtname = DTYPE_NAME[compute]
    tiles = 0
    dims = planner.cg_binding(b).dims   # the planner's names (renamed where a user name collides, codegen/names.py)
    with instrument() as c:
        for name in planner.output_names:
            kind = planner.run_kind(name, dims, batch=math.prod(b.batch))
            lines = witness_lines(planner, name, kind, dtname, len(b.batch), dims, DTYPE_NAME[b.dtype],
                                  math.prod(b.batch))
            with instrument(lines=lines) as ci:
                launcher.output(name, b)
            tiles += sum(ci.load_calls_by_line.values())
    return Measurement(flops=c.flops, transcendentals=c.transcendentals, dram_bytes=c.dram_bytes,
                       dram_bytes_loaded=c.dram_bytes_loaded, dram_bytes_stored=c.dram_bytes_stored,
                       tiles_visited=tiles, programs=c.programs)


def witness_lines(planner, name: str, kind: str, dtname: str, nbatch: int, dims: dict, call_dtype: str,
                  batch: int = 1) -> dict:
    """label -> (kernel function, line prefix or number) of one load statement per region whose executions are
    the visited tiles: the first load of each key-tile body or hop loop of the tiled kernel (by line number: the
    three loops of a split key loop load the same tiles), of the window kernel's first hop loop, of the linear
    form's chunk scan (one iteration per chunk x feature tile)."""
    if kind == WINDOW:
        launches = [window_launch(planner, name, dtname, nbatch)]
    elif kind == LINEAR:
        launches = [x for x in linear_launches(planner, name, dtname, nbatch, "cpu") if x.witness is not None]
    else:
        cfg = planner.launch_config(name, torch.device("cpu"), dtname, dims)
        sched = run_schedule(planner, name, dims, call_dtype, batch=batch)
        spec = launch_specs(planner, dtname, nbatch, {name: cfg}, {name: sched}, dims)[name]
        kernels = kernel_specs(planner, name, sched, spec, dtname, nbatch, cfg, dims)
        out = {}
        for k, (_, _, spec) in enumerate(kernels):
            fn = next(x for x in ast.parse(spec.source).body if isinstance(x, ast.FunctionDef) and
                      x.name == "_attn_fwd")
            stem = module_stem(spec.source) if len(kernels) > 1 else None   # the kernels' lines told apart
            for node in ast.walk(fn):
                region = spec.regions.get(getattr(node, "lineno", None))
                if isinstance(node, (ast.For, ast.If)) and region is not None and region[0] in VISITED:
                    line = _first_load(node, region)
                    out[f"{name}:{k}:{region}"] = ("_attn_fwd", line if stem is None else (line, stem))
        return out
    return {f"{name}:{x.fn}": _witness_line(x.source, x.fn, x.ledger, x.witness) for x in launches}


VISITED = ("visit", "hop", "lo", "full", "hi")   # regions whose every execution is a visited tile


def _first_load(block, region) -> int:
    """The line of the first tl.load at the top level of a loop's or test's body."""
    for st in block.body:
        if isinstance(st, ast.Assign) and isinstance(st.value, ast.Call) and ast.unparse(st.value).startswith(
                ("tl.load(", "tl.load ")) or isinstance(st, ast.Assign) and "tl.load(" in ast.unparse(st.value):
            return st.lineno
    raise UnsupportedError(f"measure: region {region} has no load of its own, so its executions (visited tiles) "
                           f"cannot be counted")


def _witness_line(source: str, fn: str, led, region) -> tuple[str, str]:
    """(function, 'name = ') of a load executed once per execution of `region`, assigned on one line only."""
    node = next(x for x in ast.parse(source).body if isinstance(x, ast.FunctionDef) and x.name == fn)
    text = [ln.strip() for ln in source.splitlines()[node.lineno - 1:node.end_lineno]]
    for ld in led.regions[region].loads:
        prefix = f"{ld} = "
        if sum(t.startswith(prefix) for t in text) == 1:
            return fn, prefix
    raise UnsupportedError(f"measure: region {region} of {fn} has no load on a line of its own, so its executions "
                           f"(visited tiles) cannot be counted")
