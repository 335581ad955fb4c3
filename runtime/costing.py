"""Kernel.cost, Kernel.measure and Kernel.aot: predictions (moa/cost.py), the instrumented interpreter's counters
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
from moa import cost_symbolic as CS
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
    `measure` counts for the same config). tiles_needed: (query tile, key tile) pairs holding an admissible
    (i, j). intermediate_bytes: global memory beyond inputs, outputs and lse (0: fused). unfused_*: the PyTorch
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

    tiles_visited: key-tile iterations whose body executed, summed over programs and branches. It is read from
    the interpreter as the number of load operations touching the tensor(s) read by the branches' values (V):
    the generated kernel loads the value tile exactly once per visited tile and nowhere else, which
    `measure` verifies on the kernel's access ledger before trusting it (the tensor is cloned so that its
    address span is its own)."""
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


def _specs(kernel, compute: str, nbatch: int, configs: dict, store_lse=False) -> dict:
    from moa.codegen.emit import generate

    return {name: generate(kernel.program, kernel.schedules[name], compute, nbatch, cfg.block_m, cfg.block_n,
                           store_lse) for name, cfg in configs.items()}


# ---- cost ---------------------------------------------------------------------------------------------------

def cost(kernel, dtype="bf16", device="h100", config: Config | None = None, batch=(), index_dtype="int64",
         fit: bool = False, **dims) -> CostReport:
    """Predicted cost of calling the kernel with these dims (see CostReport); no dims -> sympy formulas.

    device: 'h100', 'a100', 'h200' (tile config of the GPU runtime, time from the device table), or 'cpu' (the
    interpreter's tile config and float32 compute for bf16, as `measure` runs it; no time prediction).
    config: force a tile config (otherwise runtime.kernel.choose_config's). batch: extra leading axes.
    index_dtype: dtype of integer inputs (int64, torch's default, or int32). fit: use the config the GPU
    runtime launches after its ahead-of-time check (fit_config; compiles once, cached on disk) instead of the
    default table's."""
    if dims and not str(device).lower() == "cpu":
        from .linear_cost import linear_cost, runs_linear

        linear = [n for n in kernel.output_names if runs_linear(kernel, n, dims, device, dtype)]
        if linear:
            return linear_cost(kernel, linear[0], dtype, device, dims)
    return cost_breakdown(kernel, dtype, device, config, batch, index_dtype, fit=fit, **dims)[0]


def cost_breakdown(kernel, dtype="bf16", device="h100", config: Config | None = None, batch=(),
                   index_dtype="int64", needed: bool = True, fit: bool = False, **dims) -> tuple[CostReport, Breakdown]:
    """cost() and the details `moa cost` prints (needed=False skips tiles_needed, which evaluates the mask on the
    index grid)."""
    dtype = canonical_dtype(dtype)
    on_cpu = str(device).lower() == "cpu"
    dev = None if on_cpu else get_device(device)
    compute = _compute_dtype(dtype, on_cpu)
    batch = (batch,) if isinstance(batch, int) else tuple(batch)
    nb = math.prod(batch)
    _check_quadratic(kernel)
    missing = sorted(d.name for d in kernel.program.dims if d.name not in dims)
    unknown = sorted(set(dims) - {d.name for d in kernel.program.dims})
    if unknown:
        raise InputError(f"unknown dim{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}; {kernel.program.name}"
                         f" has {', '.join(d.name for d in kernel.program.dims)}")
    if missing:
        return _symbolic(kernel, dtype, dev, compute, config, nb, index_dtype, dims)
    tdev = torch.device("cpu" if on_cpu else "cuda")
    configs = {}
    for name in kernel.output_names:
        configs[name] = config or launch_config(kernel, name, tdev, compute, dims)
        if fit and config is None and dev is not None:
            configs[name] = fit_config(kernel, name, compute, dims, dev.target, len(batch), index_dtype)[0]
    specs = _specs(kernel, compute, len(batch), configs)
    total = C.Counts()
    eager_dram = eager_inter = eager_flops = 0
    unfused_s = 0.0
    unfused_bounds: list = []
    unfused_ops: list = []
    onchip = 0
    hbm = 0
    elt = DTYPE_BYTES[dtype]
    for name in kernel.output_names:
        sched = kernel.schedules[name]
        eb = _elem_bytes(kernel, sched, compute if on_cpu else dtype, index_dtype)
        counts = C.predict(kernel.program, sched, specs[name], dims, batch, eb, needed=needed)
        total.add(counts)
        onchip = max(onchip, C.onchip_bytes(sched, specs[name], dims, DTYPE_BYTES[compute],
                                            8 if compute == "float64" else 4, configs[name].num_stages))
        hbm += _hbm_bytes(kernel, sched, counts, dims, nb, eb, dev)
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
                                           hbm, dev, dtype, launches=len(kernel.output_names))
        frac = total.flops / seconds / dev.matmul_rate(dtype)
        ubound = max(unfused_bounds)[1] if unfused_bounds else "n/a"
    else:
        seconds, bound, parts, frac, unfused_s, ubound = None, "n/a", {}, None, None, "n/a"
    report = CostReport(
        flops=total.flops, transcendentals=total.transcendentals, dram_bytes=total.dram_bytes,
        dram_bytes_loaded=total.dram_bytes_loaded, dram_bytes_stored=total.dram_bytes_stored,
        tiles_visited=total.tiles_visited, tiles_needed=total.tiles_needed if needed else None,
        intermediate_bytes=0, unfused_dram_bytes=eager_dram, unfused_intermediate_bytes=eager_inter,
        onchip_bytes=onchip, arithmetic_intensity=total.flops / total.dram_bytes if total.dram_bytes else 0.0,
        predicted_seconds=seconds, bound=bound, form=kernel.form or "quadratic")
    bd = Breakdown(dev, dtype, configs, total.dot_flops, total.programs, hbm, parts, eager_flops, unfused_s,
                   ubound, unfused_ops, frac)
    return report, bd


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
    specs = _specs(kernel, compute, 0, {n: cfg for n in kernel.output_names})
    for name in kernel.output_names:
        sched = kernel.schedules[name]
        eb = _elem_bytes(kernel, sched, compute if dev is None else dtype, index_dtype)
        f = CS.predict_symbolic(kernel.program, sched, specs[name], eb, nb)
        for k, v in f.items():
            totals[k] = totals.get(k, sp.Integer(0)) + v
        plan = C.eager_plan(sched, DTYPE_BYTES[dtype], nb)
        eager["dram"] += plan.dram_bytes
        eager["inter"] += plan.intermediate_bytes
        eager["flops"] += plan.flops
    if config is not None:
        sub = {C.BLOCK_M: config.block_m, C.BLOCK_N: config.block_n}
        totals = {k: v.xreplace(sub) for k, v in totals.items()}
    totals = {k: v.xreplace(given) for k, v in totals.items()}
    eager = {k: v.xreplace(given) for k, v in eager.items()}
    if dev is not None:
        seconds, _, parts = C.roofline(totals["dot_flops"], totals["flops"] - totals["dot_flops"],
                                       totals["transcendentals"], totals["dram_bytes"], dev, dtype,
                                       launches=len(kernel.output_names))
    else:
        seconds, parts = None, {}
    report = CostReport(
        flops=totals["flops"], transcendentals=totals["transcendentals"], dram_bytes=totals["dram_bytes"],
        dram_bytes_loaded=totals["dram_bytes_loaded"], dram_bytes_stored=totals["dram_bytes_stored"],
        tiles_visited=totals["tiles_visited"], tiles_needed=None, intermediate_bytes=sp.Integer(0),
        unfused_dram_bytes=eager["dram"], unfused_intermediate_bytes=eager["inter"], onchip_bytes=None,
        arithmetic_intensity=totals["flops"] / totals["dram_bytes"], predicted_seconds=seconds,
        bound="symbolic" if dev is not None else "n/a", form=kernel.form or "quadratic")
    bd = Breakdown(dev, dtype, {n: config for n in kernel.output_names}, totals["dot_flops"], totals["programs"],
                   totals["dram_bytes"], parts, eager["flops"], None, "n/a", [], None)
    return report, bd


# ---- measure ------------------------------------------------------------------------------------------------

def measure(kernel, **inputs) -> Measurement:
    """Run the kernel(s) on CPU tensors in the instrumented Triton interpreter and return its counters."""
    from .binding import bind
    from .launch import check_device, triton_module
    from .measure import instrument

    b = bind(kernel.program, inputs)
    if b.device.type != "cpu":
        raise InputError("measure() counts what the Triton interpreter executes: pass CPU tensors")
    try:
        from .binding import check_offsets
    except ImportError:  # older binding module
        check_offsets = None
    if check_offsets is not None:
        check_offsets(kernel.program, b)
    triton_module()
    check_device(b.device)
    _check_quadratic(kernel, b.dims)
    compute = torch.float32 if b.dtype == torch.bfloat16 else b.dtype
    prepared = {}
    for name, t in inputs.items():
        node = kernel.program.input_map[name]
        if node.dtype == ir.FLOAT and t.dtype != compute:
            t = t.to(compute)
        elif node.dtype == ir.INT and t.dtype not in (torch.int32, torch.int64):
            t = t.to(torch.int32)
        prepared[name] = t
    dtname = DTYPE_NAME[compute]
    witnesses = set()
    for name in kernel.output_names:
        sched = kernel.schedules[name]
        cfg = launch_config(kernel, name, b.device, dtname, b.dims)
        spec = _specs(kernel, dtname, len(b.batch), {name: cfg})[name]
        witnesses |= _witnesses(kernel, sched, spec)
    for w in witnesses:
        prepared[w] = prepared[w].clone()
    b = bind(kernel.program, prepared)
    with instrument({w: prepared[w] for w in witnesses}) as c:
        for name in kernel.output_names:
            kernel._run(name, b, store_lse=False)
    tiles = sum(c.load_calls_by_region[w] for w in witnesses)
    return Measurement(flops=c.flops, transcendentals=c.transcendentals, dram_bytes=c.dram_bytes,
                       dram_bytes_loaded=c.dram_bytes_loaded, dram_bytes_stored=c.dram_bytes_stored,
                       tiles_visited=tiles, programs=c.programs)


def _check_quadratic(kernel, dims=None):
    """The cost model and measure() cover the quadratic (tiled) kernel of codegen/emit.py."""
    for name in kernel.output_names:
        sched = kernel.schedules[name]
        if any(getattr(b, "mix", None) is not None for b in sched.branches):
            raise UnsupportedError(f"output {name} runs the window-mixing kernel (codegen/window.py); the cost model "
                                   f"and measure() cover the quadratic tiled kernel only")
        if getattr(kernel, "form", None) == "linear":
            raise UnsupportedError("form='linear': the cost model and measure() cover the quadratic tiled kernel; "
                                   "compile with form='quadratic'")
        if dims is not None and hasattr(kernel, "choose_form") and kernel.choose_form(name, dims) == "linear":
            raise UnsupportedError(f"output {name} would run in the linear (chunked) form at these dims; measure() "
                                   f"covers the quadratic kernel: compile with form='quadratic'")


def _witnesses(kernel, sched, spec) -> set:
    """Input tensors whose load operations count visited tiles: every load of them is in a ('visit', k) region
    and each branch with a loop has exactly one such load (checked on the kernel's ledger)."""
    led = C.ledger(kernel.program, spec)
    from moa import dnf as D

    cands = {x.name for b in sched.branches for x in D.nodes(b.value) if isinstance(x, D.Read)}
    for w in sorted(cands):
        per_branch: dict = {}
        ok = True
        for region, work in led.regions.items():
            for ld in work.loads:
                if led.loads[ld].tensor != w:
                    continue
                if not (isinstance(region, tuple) and region[0] == "visit"):
                    ok = False
                per_branch[region[1] if isinstance(region, tuple) else None] = \
                    per_branch.get(region[1] if isinstance(region, tuple) else None, 0) + 1
        looped = {k for k, b in enumerate(sched.branches) if b.skip is not sp.true}
        if ok and set(per_branch) == looped and all(v == 1 for v in per_branch.values()):
            return {w}
    raise UnsupportedError(f"measure: no input of output {sched.output} is loaded exactly once per visited key "
                           f"tile, so tiles_visited cannot be read from the interpreter's load counters")


# the AOT config search lives in runtime/configs.py; its names stay reachable from here
from .configs import (  # noqa: E402,F401
    aot, aot_batch, aot_groups, candidates, choose_fitting, fit_config, fit_requests, runtime_config,
)
