"""Kernel.cost: the counters of the kernel(s) a call runs, predicted without running anything, and the time they take
on a device table entry. The tiled kernel is counted by codegen/counts.py (ONF tiles x the emitted code's ledger),
the window-mixing kernel by codegen/launches.py, the chunked linear form by runtime/linear_cost.py; the unfused
PyTorch plan and the roofline are moa/cost.py's.

Counting conventions are those of moa.runtime.measure (see its docstring): a lane of a masked load/store counts
only when its mask is true; arithmetic counts every lane of a block (padding included); tl.dot counts 2*M*N*K;
transcendentals (exp, exp2, log, log2, sqrt, rsqrt, sin, cos) count once per element and not as FLOPs.
"""
from __future__ import annotations

import math
import numbers
import weakref
from dataclasses import dataclass, field

import sympy as sp
import torch

from moa import cost as C
from moa import ir, onf
from moa import symbolic as sy
from moa import tiles as TL
from moa.codegen import counts as CN
from moa.codegen import counts_symbolic as CS
from moa.codegen import launches as CL
from moa.codegen.constexprs import BLOCK_M, BLOCK_N, HEAD_DIM_V
from moa.codegen.emit import generate
from moa.codegen.ledger import function_ledger
from moa.codegen.window import generate_window
from moa.devices import DTYPE_BYTES, canonical_dtype, get_device
from moa.errors import InputError, UnsupportedError

from .aot_batch import no_fit
from .cost_data import codegen_names, data_arrays, check_data, check_data_reads, int_widths
from .configs import fit_schedule
from .form_configs import fit_linear
from .linear_cost import KERNELS as LINEAR_KERNELS
from .linear_cost import linear_counts, linear_formulas, linear_launch_split
from .plan import LINEAR, TILED, WINDOW
from .reports import Breakdown, CostReport
from .tiling import Config, LinearConfig, exact_heads

__all__ = ["cost", "cost_breakdown", "launch_specs", "linear_pass", "run_schedule", "window_launch"]


def _compute_dtype(dtype: str, on_cpu: bool) -> str:
    return "float32" if (dtype == "bfloat16" and on_cpu) else dtype


def _elem_bytes(planner, sched, compute: str, index_dtype: str, widths: dict | None = None) -> dict:
    """Tensor name -> element bytes as the kernel reads it: floats in the compute dtype, flags one byte, integers
    by `widths` (codegen name -> bytes, int_widths) where given, else in index_dtype."""
    out = {}
    ib = torch.empty(0, dtype=getattr(torch, index_dtype)).element_size()
    for node in planner.cg_program.inputs:
        name = node.attrs[0]
        out[name] = DTYPE_BYTES[compute] if node.dtype == ir.FLOAT else 1 if node.dtype == ir.BOOL else \
            (widths or {}).get(name, ib)
    out[sched.output] = DTYPE_BYTES[compute]
    out["lse"] = 8 if compute == "float64" else 4
    return out


_SPECS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()   # planner -> launch_specs' kernels


def launch_specs(planner, compute: str, nbatch: int, configs: dict, scheds: dict, dims: dict | None = None) -> dict:
    """Output name -> the generated tiled kernel the cost model counts (in the program's own names), specialised
    to the head dims as a launch at `dims` is (tiling.exact_heads)."""
    out = {}
    memo = _SPECS.setdefault(planner, {})
    for name, cfg in configs.items():   # the same kernel for every split of a decode: generated once
        sched = scheds[name]
        exact = exact_heads(planner.schedules[name], dims) if dims else frozenset()
        key = (name, id(sched), compute, nbatch, cfg.block_m, cfg.block_n, exact)
        hit = memo.get(key)
        if hit is None or hit[0] is not sched:   # the schedule held with its spec: its id is not reused meanwhile
            if len(memo) >= 256:
                memo.clear()
            hit = memo[key] = (sched, generate(planner.cg_program, sched, compute, nbatch, cfg.block_m, cfg.block_n,
                                               False, exact))
        out[name] = hit[1]
    return out


def kernel_specs(planner, name: str, sched, spec, compute: str, nbatch: int, cfg, dims: dict) -> list:
    """[(program, schedule, KernelSpec)] of the kernels an output's tiled launch runs, in order: its one kernel
    (`spec`), or a split schedule's kernels (moa/split.py: each stored branch, then the final one, whose program
    holds the stored values as inputs), generated as the Launcher generates them."""
    if sched.kind != onf.SPLIT:
        return [(planner.cg_program, sched, spec)]
    exact = exact_heads(planner.schedules[name], dims)
    return [(prog, s, generate(prog, s, compute, nbatch, cfg.block_m, cfg.block_n, False, exact, cfg.tma))
            for _, _, prog, s in planner.kernels(name, sched)]


def run_schedule(planner, name: str, dims: dict | None = None, dtype: str = "bfloat16", device=None,
                 batch: int = 1):
    """The ONF a call with these dims and batch size (the product of its batch axes) runs (the planner's choice on
    the device, h100 for CPU tensors, or the one forced by compile(schedule=...)); without dims the base schedule
    unless one is forced."""
    if dims is None:
        return planner.base_schedule(name)
    dev = "h100" if device is None or str(device).lower() == "cpu" else str(device)
    return planner.schedule_for(name, dims, canonical_dtype(dtype), dev, batch)


def cost(kernel, dtype="bf16", device="h100", config: Config | None = None, batch=(), index_dtype=None,
         fit: bool = False, inputs: dict | None = None, **dims) -> CostReport:
    """Predicted cost of calling the kernel with these dims (see CostReport); no dims -> sympy formulas.

    device: 'h100', 'a100', 'h200' (tile config of the GPU runtime, time from the device table), or 'cpu' (the
    interpreter's tile config and float32 compute for bf16, as `measure` runs it; no time prediction).
    config: force a tile config (otherwise the runtime's default table): a Config for the tiled kernel, a
    LinearConfig for the chunked linear form. batch: extra leading axes.
    index_dtype: dtype of the integer inputs not given in `inputs` (int64, torch's default, or int32; default: int32
    when every integer input given is narrower than int64); each one given is counted at its own width, as a launch
    passes it (int64 as is, any narrower integer as int32). fit: use the config the GPU
    runtime launches after its ahead-of-time check (compiles once, cached on disk) instead of the default
    table's. Each output is predicted in the kernel a call runs: the tiled kernel, the window-mixing kernel, or
    the chunked linear form (form='linear', or where the runtime picks it at these dims).
    inputs: name -> tensor or array (batch axes first, or leading axes that broadcast to them, as a call takes
    them) of integer or boolean inputs a mask reads (document ids, flags): the tiles the kernel skips by their
    per-tile summaries, and tiles_needed, are counted on this data; without it a data-dependent test is counted
    as skipping nothing."""
    check_data(kernel.program, inputs, "cost")
    if inputs and all(d.name in dims for d in kernel.program.dims):
        check_data_reads(kernel, dims)
    if index_dtype is None:
        decl = kernel.program.input_map   # a bool input passed as integers is read as flags: not an int width
        ints = [torch.as_tensor(t).dtype for n, t in (inputs or {}).items()
                if n not in decl or decl[n].dtype != ir.BOOL]
        ints = [t for t in ints if not t.is_floating_point and t != torch.bool]
        index_dtype = "int32" if ints and torch.int64 not in ints else "int64"
    return cost_breakdown(kernel, dtype, device, config, batch, index_dtype, fit=fit, as_called=True,
                          inputs=inputs, **dims)[0]


def linear_pass(kernel, name: str, dims: dict, batch, dtype: str, device: str, launches: list) -> tuple:
    """(FLOPs, transcendentals, DRAM bytes, predicted seconds) of launches (kernel, flags INIT / PREFIX / FINAL) of
    one output's chunked linear form, such as the ring runs them (runtime/ring_linear.py: a rank's total, a scan
    from a carried state), counted as cost() counts the linear form, in the config a CUDA launch runs."""
    planner = kernel.planner
    dtype = canonical_dtype(dtype)
    dev = get_device(device)
    batch = (batch,) if isinstance(batch, int) else tuple(batch)
    dims, _ = codegen_names(planner, dims, None)
    eb = _elem_bytes(planner, planner.schedules[name], dtype, "int64")
    cfg = linear_launch_split(planner.linear_plans[name][0], dims, batch, dev.sms)
    per = [linear_counts(planner, name, dims, batch, dtype, "cuda", eb, cfg, flags, (fn,))[3][0]
           for fn, flags in launches]
    seconds = C.launches_roofline([(c.dot_flops, c.flops - c.dot_flops, c.transcendentals, c.dram_bytes, c.programs)
                                   for c in per], dev, dtype)[0]
    return (sum(c.flops for c in per), sum(c.transcendentals for c in per), sum(c.dram_bytes for c in per),
            seconds)


@dataclass
class _Totals:
    """What cost_breakdown sums over the outputs."""
    counts: C.Counts = field(default_factory=C.Counts)
    onchip: int = 0
    hbm: int = 0
    inter: int = 0
    launches: int = 0
    eager_dram: int = 0
    eager_inter: int = 0
    eager_flops: int = 0
    unfused_s: float = 0.0
    unfused_bounds: list = field(default_factory=list)
    unfused_ops: list = field(default_factory=list)
    kernels: list = field(default_factory=list)   # per launch: (dot, other FLOPs, transcendentals, HBM bytes, programs)

    def add_launch(self, c: C.Counts, hbm: int) -> None:
        """One launch of the fused call: its counts and the HBM bytes it moves."""
        self.hbm += hbm
        self.launches += 1
        self.kernels.append((c.dot_flops, c.flops - c.dot_flops, c.transcendentals, hbm, c.programs))


def _check_dims(program, dims: dict, batch: tuple = ()) -> None:
    unknown = sorted(set(dims) - {d.name for d in program.dims})
    if unknown:
        raise InputError(f"unknown dim{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}; {program.name}"
                         f" has {', '.join(d.name for d in program.dims)}")
    def size(v):   # an integer size (numpy ones too), not a bool or a float
        return isinstance(v, numbers.Integral) and not isinstance(v, bool) and v >= 0

    bad = [f"{k}={v!r}" for k, v in dims.items() if not size(v)] + [f"batch {x!r}" for x in batch if not size(x)]
    if bad:   # negative sizes gave negative FLOPs and bytes, fractional ones a prediction
        raise InputError(f"dims and batch sizes must be non-negative integers, got {', '.join(bad)}")


def _fitting_kind(planner, name: str, kind: str, compute: str, dims: dict, dev, batch: tuple, index_dtype: str) -> str:
    """The kernel family a CUDA call runs (runtime/launch.py Launcher.run_kind): the tiled kernel where the model
    picked the linear form (not forced) and no linear-form config fits the device."""
    if kind != LINEAR or planner.form == "linear":
        return kind
    try:
        fit_linear(planner.cg_program, planner.linear_plans[name][0], compute, dims, dev.target, len(batch),
                   index_dtype, single=True)
    except UnsupportedError as e:
        if not no_fit(e):
            raise
        return TILED
    return kind


def cost_breakdown(kernel, dtype="bf16", device="h100", config: Config | None = None, batch=(),
                   index_dtype="int64", needed: bool = True, fit: bool = False, as_called: bool = False,
                   inputs: dict | None = None, schedules: dict | None = None, **dims) -> tuple[CostReport, Breakdown]:
    """cost() and the details `moa cost` prints (needed=False skips tiles_needed, which evaluates the mask on the
    index grid). as_called=False: an output of a form=None kernel is predicted in the tiled kernel even where the
    runtime would pick the linear form (`moa cost` prints a note then). schedules: output -> the ONF schedule to
    count (a decode or varlen call counts each split, at the split's dims, in the schedule the whole call runs)."""
    planner = kernel.planner
    dtype = canonical_dtype(dtype)
    on_cpu = str(device).lower() == "cpu"
    dev = None if on_cpu else get_device(device)
    compute = _compute_dtype(dtype, on_cpu)
    batch = tuple(batch) if isinstance(batch, (tuple, list)) else (batch,)
    _check_dims(planner.program, dims, batch)
    # a LinearConfig is the chunked form's tiles (a tuned candidate's), a Config the tiled kernel's
    linear_config, config = (config, None) if isinstance(config, LinearConfig) else (None, config)
    if any(d.name not in dims for d in planner.program.dims):
        return _symbolic(planner, dtype, dev, compute, config, math.prod(batch), index_dtype, dims)
    dims, inputs = codegen_names(planner, dims, inputs)
    kinds = {name: planner.run_kind(name, dims if as_called else None, None if on_cpu else device, dtype,
                                    batch=math.prod(batch)) for name in planner.output_names}
    if fit and linear_config is None and dev is not None:
        kinds = {nm: _fitting_kind(planner, nm, kd, compute, dims, dev, batch, index_dtype) for nm, kd in kinds.items()}
    configs, scheds = _tiled_configs(planner, kinds, dims, dtype, device, compute, config, batch, index_dtype,
                                     fit and config is None and dev is not None, schedules or {})
    specs = launch_specs(planner, compute, len(batch), configs, scheds, dims)
    data = data_arrays(planner, inputs, dims, batch)
    t = _Totals()
    for name in planner.output_names:
        sched = planner.schedules[name]
        eb = _elem_bytes(planner, sched, compute if on_cpu else dtype, index_dtype, int_widths(planner, inputs))
        if kinds[name] == WINDOW:
            counts, chip = _window_counts(planner, name, dims, batch, compute, eb, needed)
            # a program's W hops re-read rows [i0 - W + 1, i0 + BLOCK_M): from L1/L2, like the tiled key loop
            counts.loop_loaded_by_tensor = dict(counts.loaded_by_tensor)
            t.add_launch(counts, _hbm_bytes(planner, sched, counts, dims, math.prod(batch), eb, dev))
        elif kinds[name] == LINEAR:
            lcfg = linear_config
            if lcfg is None and dev is not None:   # the config a CUDA launch fits (fit), or the default table's,
                lp = planner.linear_plans[name][0]   # its value axis split as a launch splits it
                lcfg = fit_linear(planner.cg_program, lp, compute, dims, dev.target, len(batch), index_dtype,
                                  single=True)[0] \
                    if fit else None
                lcfg = linear_launch_split(lp, dims, batch, dev.sms, lcfg)
            counts, states, chip, per = linear_counts(planner, name, dims, batch, compute,
                                                      "cpu" if on_cpu else "cuda", eb, lcfg)
            t.inter += states
            for c in per:
                t.add_launch(c, c.dram_bytes)
        else:
            counts, chip = C.Counts(), 0
            for prog, ks, spec in kernel_specs(planner, name, scheds[name], specs[name], compute, len(batch),
                                               configs[name], dims):
                eb.update({ts.arg: eb[ts.tensor] for ts in spec.summaries})
                eb.update({v: 8 if compute == "float64" else 4 for v in planner.value_names(name)})
                got = CN.predict(prog, ks, spec, dims, batch, eb, needed=needed, data=data)
                chip = max(chip, CN.onchip_bytes(ks, spec, dims, DTYPE_BYTES[compute], 8 if compute == "float64"
                                                 else 4, configs[name].num_stages))
                t.add_launch(got, _hbm_bytes(planner, ks, got, dims, math.prod(batch), eb, dev))
                counts.add(got)
        t.onchip = max(t.onchip, chip)
        t.counts.add(counts)
        _add_eager(t, planner, name, sched, dims, dtype, dev, math.prod(batch))
    return _report(t, planner, kinds, configs, dev, dtype, needed)


def _tiled_configs(planner, kinds, dims, dtype, device, compute, config, batch, index_dtype, fit,
                   forced: dict) -> tuple:
    """(configs, schedules) of the outputs that run the tiled kernel: the default table's (or the forced config),
    or with `fit` the (schedule, config) a CUDA launch fits; `forced`: output -> schedule given by the caller."""
    tdev = torch.device("cpu" if str(device).lower() == "cpu" else "cuda")
    configs, scheds = {}, {}
    for name in planner.output_names:
        if kinds[name] != TILED:
            continue
        scheds[name] = forced.get(name) or run_schedule(planner, name, dims, dtype, device, math.prod(batch))
        configs[name] = config or planner.launch_config(name, tdev, compute, dims)
        if fit:
            target = get_device(device).target
            scheds[name], configs[name], _ = fit_schedule(planner, name, compute, dims, target, len(batch),
                                                          index_dtype, math.prod(batch) if batch else 1)
    return configs, scheds


def _add_eager(t: _Totals, planner, name, sched, dims, dtype, dev, nb) -> None:
    """The unfused PyTorch plan of one output, op by op, into the totals (and its roofline time on `dev`)."""
    plan = C.eager_plan(sched, DTYPE_BYTES[dtype], nb)
    env = {d: dims[d.name] for d in planner.cg_program.dims}
    t.eager_dram += int(plan.dram_bytes.xreplace(env))
    t.eager_inter += int(plan.intermediate_bytes.xreplace(env))
    t.eager_flops += int(plan.flops.xreplace(env))
    for what, rd, wr, dot, other, tr, _ in plan.ops:
        vals = [int(sp.sympify(x).xreplace(env)) for x in (rd, wr, dot, other, tr)]
        t.unfused_ops.append((f"{name}: {what}" if len(planner.output_names) > 1 else what, *vals))
        if dev is not None:
            s, bnd, _ = C.roofline(vals[2], vals[3], vals[4], vals[0] + vals[1], dev, dtype)
            t.unfused_s += s
            t.unfused_bounds.append((s, bnd))


def _report(t: _Totals, planner, kinds, configs, dev, dtype, needed) -> tuple[CostReport, Breakdown]:
    total = t.counts
    if dev is not None:
        seconds, bound, parts = C.launches_roofline(t.kernels, dev, dtype)
        frac = total.flops / seconds / dev.matmul_rate(dtype)
        ubound = max(t.unfused_bounds)[1] if t.unfused_bounds else "n/a"
        unfused_s = t.unfused_s
    else:
        seconds, bound, parts, frac, unfused_s, ubound = None, "n/a", {}, None, None, "n/a"
    form = "linear" if LINEAR in kinds.values() else planner.form or "quadratic"
    report = CostReport(
        flops=total.flops, transcendentals=total.transcendentals, dram_bytes=total.dram_bytes,
        dram_bytes_loaded=total.dram_bytes_loaded, dram_bytes_stored=total.dram_bytes_stored,
        tiles_visited=total.tiles_visited, tiles_needed=total.tiles_needed if needed else None,
        intermediate_bytes=t.inter, unfused_dram_bytes=t.eager_dram, unfused_intermediate_bytes=t.eager_inter,
        onchip_bytes=t.onchip, arithmetic_intensity=total.flops / total.dram_bytes if total.dram_bytes else 0.0,
        predicted_seconds=seconds, bound=bound, form=form)
    bd = Breakdown(dev, dtype, configs, total.dot_flops, total.programs, t.hbm, parts, t.eager_flops, unfused_s,
                   ubound, t.unfused_ops, frac, t.launches)
    return report, bd


# ---- the window-mixing kernel -------------------------------------------------------------------------------

def window_launch(planner, name: str, dtname: str, nbatch: int):
    """The cost model's Launch of the window-mixing kernel of one output (codegen/window.py)."""
    sched = planner.schedules[name]
    spec = generate_window(planner.cg_program, sched, dtname, nbatch)
    led = function_ledger(planner.cg_program, spec.source, "_attn_window", spec.loads, spec.stores, "out")
    return CL.window_launch(sched, led, spec.source)


def _window_counts(planner, name, dims, batch, dtname, eb, needed) -> tuple[C.Counts, int]:
    """(Counts, on-chip estimate) of the window-mixing kernel: tiles_visited = (row tile, hop) iterations of its
    first hop loop; tiles_needed = those holding a row for which the hop is admissible."""
    sched = planner.schedules[name]
    launch = window_launch(planner, name, dtname, len(batch))
    cv = CL.window_consts(sched, dims)
    env = {d: dims[d.name] for d in planner.cg_program.dims}
    size = math.prod(batch) * math.prod(sy.evaluate(x, dims) for x in (*(x for _, x in sched.lead), sched.row[1],
                                                                        sched.col[1]))
    counts = CL.total_counts([launch] if size else [], sched, env, cv, {**eb, "out": eb[sched.output]},
                             math.prod(batch))   # an empty output: the runner launches nothing
    if needed:
        n = sy.evaluate(sched.row[1], dims)
        lead = math.prod(sy.evaluate(x, dims) for _, x in sched.lead)
        counts.tiles_needed = TL.window_hops_needed(sched, env, n, cv[BLOCK_M]) * lead * math.prod(batch)
    acc = 8 if dtname == "float64" else 4
    bm, hd, hv, wp = cv[BLOCK_M], cv[CL.HEAD_DIM], cv[HEAD_DIM_V], cv[CL.W_PAD]
    return counts, acc * (bm * hd + 4 * bm * wp + wp * wp + bm * hv)


def _hbm_bytes(planner, sched, counts: C.Counts, dims, nb, eb, dev) -> int:
    """DRAM traffic that reaches HBM: the key-side tensors re-read by every row tile are served from L2 when the
    per-(batch, head) working set fits in half of L2; then each input costs at most its size once, except what hop
    loops load (one key row per query row, no tile reuse), which counts in full (moa/schedule_cost.py says why)."""
    if dev is None:
        return counts.dram_bytes
    size = {}
    for node in planner.cg_program.inputs:
        name = node.attrs[0]
        size[name] = math.prod(sy.evaluate(s, dims) for s in node.shape) * nb * eb[name]
    instances = nb * math.prod(sy.evaluate(x, dims) for _, x in sched.lead)
    ws = sum(size.get(t, 0) for t in counts.loop_loaded_by_tensor) / max(1, instances)   # summaries: tiny
    if ws > dev.l2_bytes / 2:
        return counts.dram_bytes
    hop = counts.hop_loaded_by_tensor
    loaded = sum(min(v - hop.get(t, 0), size.get(t, v)) + hop.get(t, 0) for t, v in counts.loaded_by_tensor.items())
    return loaded + counts.dram_bytes_stored


# ---- formulas (no dims) -------------------------------------------------------------------------------------

def _symbolic(planner, dtype, dev, compute, config, nb, index_dtype, dims) -> tuple[CostReport, Breakdown]:
    names = planner.codegen.dims   # codegen dim -> user dim: the formulas are written back in the user's names
    user = {d: sp.Symbol(names[d.name], **d.assumptions0) for d in planner.cg_program.dims}
    given = {d: dims[names[d.name]] for d in planner.cg_program.dims if names[d.name] in dims}
    totals: dict = {}
    eager = {"dram": sp.Integer(0), "inter": sp.Integer(0), "flops": sp.Integer(0)}
    cfg = config or Config(128, 64)
    kinds = {name: planner.run_kind(name, None) for name in planner.output_names}
    scheds = {n: run_schedule(planner, n) for n in planner.output_names if kinds[n] == TILED}
    specs = launch_specs(planner, compute, 0, {n: cfg for n in scheds}, scheds)
    launches = 0
    for name in planner.output_names:
        sched = planner.schedules[name]
        eb = _elem_bytes(planner, sched, compute if dev is None else dtype, index_dtype)
        if kinds[name] == WINDOW:
            f = CL.total_formulas([window_launch(planner, name, compute, 0)], sched,
                                  {**eb, "out": eb[sched.output]}, nb)
            launches += 1
        elif kinds[name] == LINEAR:
            f = linear_formulas(planner, name, compute, eb, nb)
            launches += len(LINEAR_KERNELS)
        else:
            eb.update({ts.arg: eb[ts.tensor] for ts in specs[name].summaries})
            f = CS.predict_symbolic(planner.cg_program, scheds[name], specs[name], eb, nb)
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
    totals = {k: v.xreplace(given).xreplace(user) for k, v in totals.items()}
    eager = {k: v.xreplace(given).xreplace(user) for k, v in eager.items()}
    if dev is not None:
        seconds, _, parts = C.roofline(totals["dot_flops"], totals["flops"] - totals["dot_flops"],
                                       totals["transcendentals"], totals["dram_bytes"], dev, dtype,
                                       launches=launches)
    else:
        seconds, parts = None, {}
    form = "linear" if LINEAR in kinds.values() else planner.form or "quadratic"
    report = CostReport(
        flops=totals["flops"], transcendentals=totals["transcendentals"], dram_bytes=totals["dram_bytes"],
        dram_bytes_loaded=totals["dram_bytes_loaded"], dram_bytes_stored=totals["dram_bytes_stored"],
        tiles_visited=totals["tiles_visited"], tiles_needed=None, intermediate_bytes=sp.Integer(0),
        unfused_dram_bytes=eager["dram"], unfused_intermediate_bytes=eager["inter"], onchip_bytes=None,
        arithmetic_intensity=totals["flops"] / totals["dram_bytes"], predicted_seconds=seconds,
        bound="symbolic" if dev is not None else "n/a", form=form)
    bd = Breakdown(dev, dtype, {n: config for n in planner.output_names if kinds[n] == TILED}, totals["dot_flops"],
                   totals["programs"], totals["dram_bytes"], parts, eager["flops"], None, "n/a", [], None)
    return report, bd
