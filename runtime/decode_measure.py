"""Measurement of a decoding call: k.decode run on CPU tensors in the instrumented Triton interpreter
(runtime/measure.py), with the key tiles the split launch visits read from the executions of the first load of
each key-tile loop of the block kernel (the lines runtime/measuring.py uses for a plain call). The cost model of
the same call is runtime/decode_cost.py."""
from __future__ import annotations

import ast

from moa.codegen.splitkv import branches_source
from moa.errors import InputError

from .decode import decode
from .measure import instrument
from .measuring import VISITED, _first_load
from .reports import Measurement
from .varlen import varlen


def measure(kernel, inputs: dict, **options) -> Measurement:
    """Counters of k.decode(**inputs, **options) (splits, cache_len, block_table, page_size, pack_heads): FLOPs,
    transcendentals, bytes loaded and stored (split launch and merge), programs, and visited key tiles."""
    _cpu(inputs)
    return _measured(decode(kernel, inputs, plan_only=True, **options), lambda: decode(kernel, inputs, **options))


def measure_varlen(kernel, inputs: dict, cu_seqlens_q, cu_seqlens_k, **options) -> Measurement:
    """The same counters of k.varlen(cu_seqlens_q, cu_seqlens_k, **inputs, **options) (splits); the cost model of
    the call is runtime/varlen_cost.py."""
    _cpu(inputs)
    st = varlen(kernel, inputs, cu_seqlens_q, cu_seqlens_k, plan_only=True, **options)
    return _measured(st, lambda: varlen(kernel, inputs, cu_seqlens_q, cu_seqlens_k, **options))


def _cpu(inputs: dict) -> None:
    if any(t.device.type != "cpu" for t in inputs.values() if hasattr(t, "device")):
        raise InputError("measure counts what the Triton interpreter executes: pass CPU tensors")


def _measured(st, call) -> Measurement:
    """Run call() in the instrumented interpreter, counting the first load of each key-tile loop of the block
    kernels in st.specs (the visited tiles; spec k's kernel is _attn_fwd, or _attn_fwd_b<k> when the branches
    of an epilogue run in one launch)."""
    lines = {}
    together = {}   # output index -> (its block kernel's name, its def line) in the branches' one launch
    if len(st.branch_sources) > 1:
        tree = ast.parse(branches_source([src for _, src in st.branch_sources])).body
        for j, (k, _) in enumerate(st.branch_sources):
            together[k] = next((x.name, x.lineno) for x in tree if isinstance(x, ast.FunctionDef) and
                               x.name == f"_attn_fwd_b{j}")
    for k, spec in enumerate(st.specs):
        fn = next(x for x in ast.parse(spec.source).body if isinstance(x, ast.FunctionDef) and x.name == "_attn_fwd")
        for node in ast.walk(fn):
            region = spec.regions.get(getattr(node, "lineno", None))
            if isinstance(node, (ast.For, ast.If)) and region is not None and region[0] in VISITED:
                line = _first_load(node, region)
                lines[f"{k}:{region}"] = ("_attn_fwd", line)
                if k in together:   # the same line of the kernel renamed in the branches' launch
                    name, first = together[k]
                    lines[f"{k}:{region}:b"] = (name, first + line - fn.lineno)
    with instrument() as c:
        with instrument(lines=lines) as ci:
            call()
    return Measurement(flops=c.flops, transcendentals=c.transcendentals, dram_bytes=c.dram_bytes,
                       dram_bytes_loaded=c.dram_bytes_loaded, dram_bytes_stored=c.dram_bytes_stored,
                       tiles_visited=sum(ci.load_calls_by_line.values()), programs=c.programs)
