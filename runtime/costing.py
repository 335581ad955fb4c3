"""Kernel.cost, Kernel.measure and Kernel.aot: predictions (codegen/counts.py; codegen/launches.py for the window-mixing
kernel and, through runtime/linear_cost.py, the chunked linear form), the instrumented interpreter's counters
(runtime/measure.py) and AOT resource reports (runtime/aot.py), plus the AOT-checked config choice.

Counting conventions are those of moa.runtime.measure (see its docstring): a lane of a masked load/store counts
only when its mask is true; arithmetic counts every lane of a block (padding included); tl.dot counts 2*M*N*K;
transcendentals (exp, exp2, log, log2, sqrt, rsqrt, sin, cos) count once per element and not as FLOPs.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import sympy as sp
import torch

from moa import cost as C
from moa import tiles as TL
from moa.codegen import counts as CN
from moa.codegen import counts_symbolic as CS
from moa.codegen import launches as CL
from moa.codegen.constexprs import BLOCK_M, BLOCK_N, HEAD_DIM_V
from moa.codegen.ledger import function_ledger, ledger
from moa import ir
from moa import symbolic as sy
from moa.devices import DTYPE_BYTES, canonical_dtype, get_device
from moa.errors import InputError, UnsupportedError

from .kernel import DTYPE_NAME, Config, choose_config

__all__ = ["CostReport", "Measurement", "cost", "cost_breakdown", "measure", "aot", "fit_config"]


@dataclass(frozen=True)
class CostReport:
    """Predicted cost of a call (sum over the program's outputs), computed from the ONF without running anything.

    flops, transcendentals, dram_bytes(_loaded/_stored), tiles_visited: what the fused kernel does (exactly what
    `measure` counts for the same config; see Measurement for the tiles of hop loops, the window-mixing kernel
    and the linear form). tiles_needed: (query tile, key tile or hop) pairs holding an admissible (i, j).
    intermediate_bytes: global memory beyond inputs, outputs and lse (0: fused; the linear form's chunk states).
    unfused_*: the PyTorch
    eager plan (moa.cost.eager_plan). onchip_bytes: tiles one program holds. arithmetic_intensity = flops /
    dram_bytes. predicted_seconds and bound ("compute" / "memory" / "transcendental") from the device table.
    With no dims every field is a sympy formula (tiles_needed None, bound "symbolic")."""
    flops: object
    transcendentals: object
    dram_bytes: object
    dram_bytes_loaded: object
    dram_bytes_stored: object
    tiles_visited: object
    tiles_needed: object
    intermediate_bytes: object
    unfused_dram_bytes: object
    unfused_intermediate_bytes: object
    onchip_bytes: object
    arithmetic_intensity: object
    predicted_seconds: object
    bound: str
    form: str


@dataclass(frozen=True)
class Measurement:
    """Counters of a real run in the instrumented Triton interpreter (sum over the program's outputs).

    tiles_visited: key-tile iterations whose body executed (hop iterations for a hop loop), summed over programs
    and branches; for the window-mixing kernel the (row tile, hop) iterations of its first hop loop; for the
    chunked linear form the (chunk, feature tile) iterations of its scan. It is read from the interpreter as the
    number of times one load statement of that loop body executed (identified by its source line: a load that
    the kernel's ledger places in the region, assigned on no other line of the function)."""
    flops: int
    transcendentals: int
    dram_bytes: int
    dram_bytes_loaded: int
    dram_bytes_stored: int
    tiles_visited: int
    programs: int


@dataclass(frozen=True)
class Breakdown:
    """What `moa cost` prints besides the CostReport."""
    device: object
    dtype: str
    configs: dict                 # output -> Config
    dot_flops: object
    programs: object
    hbm_bytes: object
    parts: dict                   # compute / memory / transcendental seconds
    unfused_flops: object
    unfused_seconds: object
    unfused_bound: str
    unfused_ops: list
    fraction_of_peak: object


# ---- launch facts shared with Kernel._run -----------------------------------------------------------------

def launch_extents(sched, dims: dict) -> tuple[int, int, int]:
    """(n, m, head) as Kernel._run computes them for choose_config."""
    n = sy.evaluate(sched.row[1], dims)
    e = sy.evaluate(sched.col[1], dims)
    mext = max([sy.evaluate(br.extent, dims) for br in sched.branches] + [1])
    heads = [sy.evaluate(br.dot.extent, dims) for br in sched.branches if br.dot is not None] + [e]
    return n, mext, max(heads)


def launch_config(kernel, name: str, device: torch.device, dtype: str, dims: dict) -> Config:
    """The default config Kernel._run starts from: choose_config's table, with tiles shrunk where a huge head dim
    would exceed Triton's tile limit (kernel.fit_tiles, when this runtime has it)."""
    sched = kernel.schedules[name]
    n, m, head = launch_extents(sched, dims)
    cfg = choose_config(device, dtype, n, m, head)
    try:
        from .kernel import fit_tiles
    except ImportError:
        return cfg
    heads = [sy.evaluate(b.dot.extent, dims) for b in sched.branches if b.dot is not None] + \
        [sy.evaluate(sched.col[1], dims)]
    return fit_tiles(cfg, heads, f"output {name}")


def _compute_dtype(dtype: str, on_cpu: bool) -> str:
    return "float32" if (dtype == "bfloat16" and on_cpu) else dtype


def _elem_bytes(kernel, sched, compute: str, index_dtype: str) -> dict:
    out = {}
    ib = torch.empty(0, dtype=getattr(torch, index_dtype)).element_size()
    for node in kernel.program.inputs:
        name = node.attrs[0]
        out[name] = DTYPE_BYTES[compute] if node.dtype == ir.FLOAT else 1 if node.dtype == ir.BOOL else ib
    out[sched.output] = DTYPE_BYTES[compute]
    out["lse"] = 8 if compute == "float64" else 4
    return out


def _specs(kernel, compute: str, nbatch: int, configs: dict, store_lse=False, scheds=None) -> dict:
    from moa.codegen.emit import generate

    scheds = scheds or {}
    return {name: generate(kernel.program, scheds.get(name) or kernel.schedules[name], compute, nbatch, cfg.block_m,
                           cfg.block_n, store_lse) for name, cfg in configs.items()}


def run_schedule(kernel, name: str, dims: dict | None = None, dtype: str = "bfloat16", device=None):
    """The ONF a call with these dims runs (Kernel.schedule_for: the legal schedule of smallest predicted time
    on the device, h100 for CPU tensors, or the one forced by compile(schedule=...)); without dims the base
    schedule unless one is forced."""
    if not hasattr(kernel, "schedule_for"):
        return kernel.schedules[name]
    if dims is None:
        forced = [v for v in kernel.variants[name] if v.kind == kernel.schedule] if kernel.schedule else []
        sched = forced[0] if forced else kernel.schedules[name]
    else:
        dev = "h100" if device is None or str(device).lower() == "cpu" else str(device)
        sched = kernel.schedule_for(name, dims, canonical_dtype(dtype), dev)
    return sched


# ---- cost ---------------------------------------------------------------------------------------------------

def cost(kernel, dtype="bf16", device="h100", config: Config | None = None, batch=(), index_dtype="int64",
         fit: bool = False, **dims) -> CostReport:
    """Predicted cost of calling the kernel with these dims (see CostReport); no dims -> sympy formulas.

    device: 'h100', 'a100', 'h200' (tile config of the GPU runtime, time from the device table), or 'cpu' (the
    interpreter's tile config and float32 compute for bf16, as `measure` runs it; no time prediction).
    config: force a tile config (otherwise runtime.kernel.choose_config's). batch: extra leading axes.
    index_dtype: dtype of integer inputs (int64, torch's default, or int32). fit: use the config the GPU
    runtime launches after its ahead-of-time check (fit_config; compiles once, cached on disk) instead of the
    default table's. Each output is predicted in the kernel a call runs: the tiled kernel, the window-mixing
    kernel, or the chunked linear form (form='linear', or where the runtime picks it at these dims)."""
    return cost_breakdown(kernel, dtype, device, config, batch, index_dtype, fit=fit, as_called=True, **dims)[0]


def cost_breakdown(kernel, dtype="bf16", device="h100", config: Config | None = None, batch=(),
                   index_dtype="int64", needed: bool = True, fit: bool = False, as_called: bool = False,
                   **dims) -> tuple[CostReport, Breakdown]:
    """cost() and the details `moa cost` prints (needed=False skips tiles_needed, which evaluates the mask on the
    index grid). as_called=False: an output of a form=None kernel is predicted in the tiled kernel even where the
    runtime would pick the linear form (`moa cost` prints a note then)."""
    dtype = canonical_dtype(dtype)
    on_cpu = str(device).lower() == "cpu"
    dev = None if on_cpu else get_device(device)
    compute = _compute_dtype(dtype, on_cpu)
    batch = (batch,) if isinstance(batch, int) else tuple(batch)
    nb = math.prod(batch)
    missing = sorted(d.name for d in kernel.program.dims if d.name not in dims)
    unknown = sorted(set(dims) - {d.name for d in kernel.program.dims})
    if unknown:
        raise InputError(f"unknown dim{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}; {kernel.program.name}"
                         f" has {', '.join(d.name for d in kernel.program.dims)}")
    if missing:
        return _symbolic(kernel, dtype, dev, compute, config, nb, index_dtype, dims)
    kinds = {name: run_kind(kernel, name, dims if as_called else None, None if on_cpu else device, dtype)
             for name in kernel.output_names}
    tdev = torch.device("cpu" if on_cpu else "cuda")
    configs, scheds = {}, {}
    for name in kernel.output_names:
        if kinds[name] != "tiled":
            continue
        scheds[name] = run_schedule(kernel, name, dims, dtype, device)
        configs[name] = config or launch_config(kernel, name, tdev, compute, dims)
        if fit and config is None and dev is not None:
            scheds[name], configs[name], _ = fit_schedule(kernel, name, compute, dims, dev.target, len(batch),
                                                          index_dtype, math.prod(batch) if batch else 1)
    specs = _specs(kernel, compute, len(batch), configs, scheds=scheds)
    total = C.Counts()
    eager_dram = eager_inter = eager_flops = 0
    unfused_s = 0.0
    unfused_bounds: list = []
    unfused_ops: list = []
    onchip = 0
    hbm = 0
    inter = 0
    launches = 0
    elt = DTYPE_BYTES[dtype]
    acc = 8 if compute == "float64" else 4
    for name in kernel.output_names:
        sched = kernel.schedules[name]
        eb = _elem_bytes(kernel, sched, compute if on_cpu else dtype, index_dtype)
        if kinds[name] == "window":
            counts, chip = _window_counts(kernel, name, dims, batch, compute, eb, needed)
            onchip = max(onchip, chip)
            # a program's W hops re-read rows [i0 - W + 1, i0 + BLOCK_M): from L1/L2, like the tiled key loop
            counts.loop_loaded_by_tensor = dict(counts.loaded_by_tensor)
            hbm += _hbm_bytes(kernel, sched, counts, dims, nb, eb, dev)
            launches += 1
        elif kinds[name] == "linear":
            from .linear_cost import linear_counts

            tiles = None
            if fit and config is None and dev is not None and not on_cpu:   # the config a CUDA launch fits
                from .form_configs import fit_linear

                lcfg = fit_linear(kernel.cg_program, kernel.linear_plans[name][0], compute, dims, dev.target,
                                  len(batch), index_dtype)[0]
                tiles = (lcfg.chunk, lcfg.block_f)
            counts, states, chip = linear_counts(kernel, name, dims, batch, compute, "cpu" if on_cpu else "cuda", eb,
                                                 tiles)
            onchip = max(onchip, chip)
            inter += states
            hbm += counts.dram_bytes
            launches += 3
        else:
            counts = CN.predict(kernel.program, scheds[name], specs[name], dims, batch, eb, needed=needed)
            onchip = max(onchip, CN.onchip_bytes(sched, specs[name], dims, DTYPE_BYTES[compute], acc,
                                                configs[name].num_stages))
            hbm += _hbm_bytes(kernel, sched, counts, dims, nb, eb, dev)
            launches += 1
        total.add(counts)
        plan = C.eager_plan(sched, elt, nb)
        env = {d: dims[d.name] for d in kernel.program.dims}
        eager_dram += int(plan.dram_bytes.xreplace(env))
        eager_inter += int(plan.intermediate_bytes.xreplace(env))
        eager_flops += int(plan.flops.xreplace(env))
        for what, rd, wr, dot, other, tr, _ in plan.ops:
            vals = [int(sp.sympify(x).xreplace(env)) for x in (rd, wr, dot, other, tr)]
            unfused_ops.append((f"{name}: {what}" if len(kernel.output_names) > 1 else what, *vals))
            if dev is not None:
                s, bnd, _ = C.roofline(vals[2], vals[3], vals[4], vals[0] + vals[1], dev, dtype)
                unfused_s += s
                unfused_bounds.append((s, bnd))
    if dev is not None:
        seconds, bound, parts = C.roofline(total.dot_flops, total.flops - total.dot_flops, total.transcendentals,
                                           hbm, dev, dtype, launches=launches)
        frac = total.flops / seconds / dev.matmul_rate(dtype)
        ubound = max(unfused_bounds)[1] if unfused_bounds else "n/a"
    else:
        seconds, bound, parts, frac, unfused_s, ubound = None, "n/a", {}, None, None, "n/a"
    form = "linear" if "linear" in kinds.values() else kernel.form or "quadratic"
    report = CostReport(
        flops=total.flops, transcendentals=total.transcendentals, dram_bytes=total.dram_bytes,
        dram_bytes_loaded=total.dram_bytes_loaded, dram_bytes_stored=total.dram_bytes_stored,
        tiles_visited=total.tiles_visited, tiles_needed=total.tiles_needed if needed else None,
        intermediate_bytes=inter, unfused_dram_bytes=eager_dram, unfused_intermediate_bytes=eager_inter,
        onchip_bytes=onchip, arithmetic_intensity=total.flops / total.dram_bytes if total.dram_bytes else 0.0,
        predicted_seconds=seconds, bound=bound, form=form)
    bd = Breakdown(dev, dtype, configs, total.dot_flops, total.programs, hbm, parts, eager_flops, unfused_s,
                   ubound, unfused_ops, frac)
    return report, bd


# ---- the window-mixing kernel -------------------------------------------------------------------------------

def _window_launch_of(kernel, name: str, dtname: str, nbatch: int):
    """The cost model's Launch of the window-mixing kernel of one output (codegen/window.py)."""
    from moa.codegen.window import generate_window

    sched = kernel.schedules[name]
    spec = generate_window(kernel.cg_program, sched, dtname, nbatch)
    led = function_ledger(kernel.cg_program, spec.source, "_attn_window", spec.loads, spec.stores, "out")
    return CL.window_launch(sched, led, spec.source)


def _window_counts(kernel, name, dims, batch, dtname, eb, needed) -> tuple[C.Counts, int]:
    """(Counts, on-chip estimate) of the window-mixing kernel: tiles_visited = (row tile, hop) iterations of its
    first hop loop; tiles_needed = those holding a row for which the hop is admissible."""
    sched = kernel.schedules[name]
    launch = _window_launch_of(kernel, name, dtname, len(batch))
    cv = CL.window_consts(sched, dims)
    env = {d: dims[d.name] for d in kernel.program.dims}
    counts = CL.total_counts([launch], sched, env, cv, {**eb, "out": eb[sched.output]}, math.prod(batch))
    if needed:
        n = sy.evaluate(sched.row[1], dims)
        lead = math.prod(sy.evaluate(x, dims) for _, x in sched.lead)
        counts.tiles_needed = TL.window_hops_needed(sched, env, n, cv[BLOCK_M]) * lead * math.prod(batch)
    acc = 8 if dtname == "float64" else 4
    bm, hd, hv, wp = cv[BLOCK_M], cv[CL.HEAD_DIM], cv[HEAD_DIM_V], cv[CL.W_PAD]
    return counts, acc * (bm * hd + 4 * bm * wp + wp * wp + bm * hv)


def _hbm_bytes(kernel, sched, counts: C.Counts, dims, nb, eb, dev) -> int:
    """DRAM traffic that reaches HBM: the key-side tensors re-read by every row tile are served from L2 when the
    per-(batch, head) working set fits in half of L2; then each input costs at most its size once."""
    if dev is None:
        return counts.dram_bytes
    size = {}
    for node in kernel.program.inputs:
        name = node.attrs[0]
        size[name] = math.prod(sy.evaluate(s, dims) for s in node.shape) * nb * eb[name]
    instances = nb * math.prod(sy.evaluate(x, dims) for _, x in sched.lead)
    ws = sum(size[t] for t in counts.loop_loaded_by_tensor) / max(1, instances)
    if ws > dev.l2_bytes / 2:
        return counts.dram_bytes
    loaded = sum(min(v, size.get(t, v)) for t, v in counts.loaded_by_tensor.items())
    return loaded + counts.dram_bytes_stored


def _symbolic(kernel, dtype, dev, compute, config, nb, index_dtype, dims) -> tuple[CostReport, Breakdown]:
    given = {d: dims[d.name] for d in kernel.program.dims if d.name in dims}
    totals: dict = {}
    eager = {"dram": sp.Integer(0), "inter": sp.Integer(0), "flops": sp.Integer(0)}
    cfg = config or Config(128, 64)
    kinds = {name: run_kind(kernel, name, None) for name in kernel.output_names}
    scheds = {n: run_schedule(kernel, n) for n in kernel.output_names if kinds[n] == "tiled"}
    specs = _specs(kernel, compute, 0, {n: cfg for n in scheds}, scheds=scheds)
    launches = 0
    for name in kernel.output_names:
        sched = kernel.schedules[name]
        eb = _elem_bytes(kernel, sched, compute if dev is None else dtype, index_dtype)
        if kinds[name] == "window":
            f = CL.total_formulas([_window_launch_of(kernel, name, compute, 0)], sched,
                                  {**eb, "out": eb[sched.output]}, nb)
            launches += 1
        elif kinds[name] == "linear":
            from .linear_cost import linear_formulas

            f = linear_formulas(kernel, name, compute, eb, nb)
            launches += 3
        else:
            f = CS.predict_symbolic(kernel.program, scheds[name], specs[name], eb, nb)
            if config is not None:
                sub = {BLOCK_M: config.block_m, BLOCK_N: config.block_n}
                f = {k: v.xreplace(sub) for k, v in f.items()}
            launches += 1
        for k, v in f.items():
            totals[k] = totals.get(k, sp.Integer(0)) + v
        plan = C.eager_plan(sched, DTYPE_BYTES[dtype], nb)
        eager["dram"] += plan.dram_bytes
        eager["inter"] += plan.intermediate_bytes
        eager["flops"] += plan.flops
    totals = {k: v.xreplace(given) for k, v in totals.items()}
    eager = {k: v.xreplace(given) for k, v in eager.items()}
    if dev is not None:
        seconds, _, parts = C.roofline(totals["dot_flops"], totals["flops"] - totals["dot_flops"],
                                       totals["transcendentals"], totals["dram_bytes"], dev, dtype,
                                       launches=launches)
    else:
        seconds, parts = None, {}
    form = "linear" if "linear" in kinds.values() else kernel.form or "quadratic"
    report = CostReport(
        flops=totals["flops"], transcendentals=totals["transcendentals"], dram_bytes=totals["dram_bytes"],
        dram_bytes_loaded=totals["dram_bytes_loaded"], dram_bytes_stored=totals["dram_bytes_stored"],
        tiles_visited=totals["tiles_visited"], tiles_needed=None, intermediate_bytes=sp.Integer(0),
        unfused_dram_bytes=eager["dram"], unfused_intermediate_bytes=eager["inter"], onchip_bytes=None,
        arithmetic_intensity=totals["flops"] / totals["dram_bytes"], predicted_seconds=seconds,
        bound="symbolic" if dev is not None else "n/a", form=form)
    bd = Breakdown(dev, dtype, {n: config for n in kernel.output_names if kinds[n] == "tiled"}, totals["dot_flops"],
                   totals["programs"], totals["dram_bytes"], parts, eager["flops"], None, "n/a", [], None)
    return report, bd


# ---- measure ------------------------------------------------------------------------------------------------

def measure(kernel, **inputs) -> Measurement:
    """Run the kernel(s) on CPU tensors in the instrumented Triton interpreter and return its counters: the kernel
    a call runs (tiled, window-mixing, or the three chunked linear-form launches, summed)."""
    from .binding import bind
    from .device import check_device
    from .measure import instrument

    b = bind(kernel.program, inputs)
    if b.device.type != "cpu":
        raise InputError("measure() counts what the Triton interpreter executes: pass CPU tensors")
    from .binding import check_offsets

    check_offsets(kernel.program, b)
    kernel._check_reads(b)     # the refusals a call makes, before anything runs
    check_device(b.device)
    compute = torch.float32 if b.dtype == torch.bfloat16 else b.dtype   # the runners convert inputs to it
    dtname = DTYPE_NAME[compute]
    tiles = 0
    with instrument() as c:
        for name in kernel.output_names:
            kind = run_kind(kernel, name, b.dims)
            lines = witness_lines(kernel, name, kind, dtname, len(b.batch), b.dims, DTYPE_NAME[b.dtype])
            with instrument(lines=lines) as ci:
                if kind == "window":
                    kernel._run_window(name, b)
                elif kind == "linear":
                    kernel._run_linear(name, b)
                else:
                    kernel._run(name, b, store_lse=False)
            tiles += sum(ci.load_calls_by_line.values())
    return Measurement(flops=c.flops, transcendentals=c.transcendentals, dram_bytes=c.dram_bytes,
                       dram_bytes_loaded=c.dram_bytes_loaded, dram_bytes_stored=c.dram_bytes_stored,
                       tiles_visited=tiles, programs=c.programs)


def run_kind(kernel, name: str, dims: dict, device=None, dtype=None) -> str:
    """The kernel an output runs: 'window' (codegen/window.py), 'linear' (codegen/chunked.py) or 'tiled'
    (codegen/emit.py); device/dtype None: as a call decides (Kernel.__call__)."""
    if any(getattr(br, "mix", None) is not None for br in kernel.schedules[name].branches):
        return "window"
    if kernel.form == "linear":
        return "linear"
    if kernel.form == "quadratic" or dims is None:
        return "tiled"
    if device is None:
        return "linear" if kernel.choose_form(name, dims) == "linear" else "tiled"
    from .linear_cost import runs_linear

    return "linear" if runs_linear(kernel, name, dims, device, dtype) else "tiled"


def witness_lines(kernel, name: str, kind: str, dtname: str, nbatch: int, dims: dict, call_dtype: str) -> dict:
    """label -> (kernel function, line prefix) of one load statement per region whose executions are the visited
    tiles: a load of each branch's key-tile body ('visit') or hop loop ('hop') of the tiled kernel, of the window
    kernel's first hop loop, of the linear form's chunk scan (one iteration per chunk x feature tile)."""
    if kind == "window":
        launches = [_window_launch_of(kernel, name, dtname, nbatch)]
    elif kind == "linear":
        from .linear_cost import linear_launches

        launches = [x for x in linear_launches(kernel, name, dtname, nbatch, "cpu") if x.witness is not None]
    else:
        cfg = launch_config(kernel, name, torch.device("cpu"), dtname, dims)
        sched = run_schedule(kernel, name, dims, call_dtype)
        spec = _specs(kernel, dtname, nbatch, {name: cfg}, scheds={name: sched})[name]
        led = ledger(kernel.program, spec)
        launches = [(spec.source, "_attn_fwd", led, r) for r in led.regions
                    if isinstance(r, tuple) and r[0] in ("visit", "hop")]
        return {f"{name}:{r}": _witness_line(src, fn, lg, r) for src, fn, lg, r in launches}
    return {f"{name}:{x.fn}": _witness_line(x.source, x.fn, x.ledger, x.witness) for x in launches}


def _witness_line(source: str, fn: str, led, region) -> tuple[str, str]:
    """(function, 'name = ') of a load executed once per execution of `region`, assigned on one line only."""
    import ast

    node = next(x for x in ast.parse(source).body if isinstance(x, ast.FunctionDef) and x.name == fn)
    text = [ln.strip() for ln in source.splitlines()[node.lineno - 1:node.end_lineno]]
    for ld in led.regions[region].loads:
        prefix = f"{ld} = "
        if sum(t.startswith(prefix) for t in text) == 1:
            return fn, prefix
    raise UnsupportedError(f"measure: region {region} of {fn} has no load on a line of its own, so its executions "
                           f"(visited tiles) cannot be counted")


# the AOT config search lives in runtime/configs.py; its names stay reachable from here
from .configs import (  # noqa: E402,F401
    aot, aot_batch, aot_groups, candidates, choose_fitting, choose_plan, fit_config, fit_plan, fit_requests,
    fit_schedule, ranked_schedules, runtime_config,
)
