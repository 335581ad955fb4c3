"""Measurement of a decoding call: k.decode run on CPU tensors in the instrumented Triton interpreter
(runtime/measure.py), with the key tiles the split launch visits read from the executions of the first load of
each key-tile loop of the block kernel (the lines runtime/measuring.py uses for a plain call). The cost model of
the same call is runtime/decode_cost.py."""
from __future__ import annotations

import ast

from moa.errors import InputError

from .decode import decode
from .measure import instrument
from .measuring import VISITED, _first_load
from .reports import Measurement


def measure(kernel, inputs: dict, **options) -> Measurement:
    """Counters of k.decode(**inputs, **options) (splits, cache_len, block_table, page_size, pack_heads): FLOPs,
    transcendentals, bytes loaded and stored (split launch and merge), programs, and visited key tiles."""
    if any(t.device.type != "cpu" for t in inputs.values() if hasattr(t, "device")):
        raise InputError("measure counts what the Triton interpreter executes: pass CPU tensors")
    st = decode(kernel, inputs, plan_only=True, **options)
    lines = {}
    for k, spec in enumerate(st.specs):
        fn = next(x for x in ast.parse(spec.source).body if isinstance(x, ast.FunctionDef) and x.name == "_attn_fwd")
        for node in ast.walk(fn):
            region = spec.regions.get(getattr(node, "lineno", None))
            if isinstance(node, (ast.For, ast.If)) and region is not None and region[0] in VISITED:
                lines[f"{k}:{region}"] = ("_attn_fwd", _first_load(node, region))
    with instrument() as c:
        with instrument(lines=lines) as ci:
            decode(kernel, inputs, **options)
    return Measurement(flops=c.flops, transcendentals=c.transcendentals, dram_bytes=c.dram_bytes,
                       dram_bytes_loaded=c.dram_bytes_loaded, dram_bytes_stored=c.dram_bytes_stored,
                       tiles_visited=sum(ci.load_calls_by_line.values()), programs=c.programs)
