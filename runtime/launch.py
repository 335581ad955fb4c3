"""Launching: a call's bound tensors in, the output tensors out. The Launcher asks the Planner (runtime/plan.py) what
to run, generates the kernel (cached per schedule, dtype and config), marshals the arguments (tensors in the compute
dtype, strides, dims, batch sizes, constexprs), computes the grid and launches: in Triton's interpreter for CPU
tensors, on the GPU for CUDA tensors (runtime/device.py). The window-mixing kernel and the chunked linear form have
runners of their own (runtime/window_run.py, runtime/linear_run.py)."""
from __future__ import annotations

import dataclasses
import math

import torch

from moa import ir, onf
from moa.errors import UnsupportedError
from moa import symbolic as sy
from moa.codegen.emit import SCAN, generate

from . import tune
from .aot_batch import no_fit
from .binding import Binding
from .cache import module_for
from .device import check_device, run
from .linear_run import LinearRunner
from .plan import LINEAR, TILED, WINDOW, Plan, Planner
from .summaries import summary_tensor
from .tiling import DTYPE_NAME, Config, TensorDescriptor, check_grid, exact_heads, row_programs
from .window_run import WindowRunner


def compute_dtype(dt: torch.dtype, device: torch.device) -> torch.dtype:
    """The dtype a kernel computes in: the call's, except bf16 on CPU (the interpreter's bf16 is wrong: fp32)."""
    return torch.float32 if (dt == torch.bfloat16 and device.type == "cpu") else dt


def as_kernel_input(t: torch.Tensor, node, compute: torch.dtype) -> torch.Tensor:
    """An input tensor as a kernel reads it: floats in the compute dtype, integers as int32 or int64."""
    if node.dtype == ir.FLOAT and t.dtype != compute:
        return t.to(compute)
    if node.dtype == ir.INT and t.dtype not in (torch.int32, torch.int64):
        return t.to(torch.int32)
    return t


def tma_ready(t: torch.Tensor) -> bool:
    """Whether the copy engine can address a tensor through a descriptor: at most 5 axes, none empty, the last
    contiguous, every other stride a non-zero multiple of 16 bytes, the base 16-byte aligned (a broadcast or
    sliced view may not be: it then runs with plain loads)."""
    size = t.element_size()
    return TensorDescriptor is not None and 2 <= t.dim() <= 5 and min(t.shape) > 0 and t.stride()[-1] == 1 and \
        t.data_ptr() % 16 == 0 and all(st > 0 and st * size % 16 == 0 for st in t.stride()[:-1])


def _finish(out, dt):
    return out if out.dtype == dt else out.to(dt)


class Launcher:
    """Runs the outputs of one program; kernels and runners are cached per output, dtype and config."""

    def __init__(self, planner: Planner):
        self.planner = planner
        self._specs: dict = {}
        self._window: dict = {}
        self._linear: dict = {}
        self._tuned: dict = {}

    def output(self, name: str, b: Binding) -> torch.Tensor:
        """One output of a call, in the kernel family the planner picks for its dims; on CUDA, with tuning on, the
        plan the GPU measured fastest for the call's bucket (runtime/tune.py)."""
        kind = self.run_kind(name, b)
        if kind == WINDOW:
            return self.window(name, b)
        if self.tunes(name, b):
            return self.run(name, b, self.tuned(name, b))
        if kind == LINEAR:
            return self.linear(name, b)
        return self.tiled(name, b, store_lse=False)[0]

    def run_kind(self, name: str, b: Binding) -> str:
        """The kernel family a call of output `name` runs (Planner.run_kind), except that on CUDA, where the cost
        model picked the linear form (no `form=` forcing it), the tiled kernel runs when no linear-form config fits
        the device (a forced linear form raises, naming each config tried)."""
        kind = self.planner.run_kind(name, b.dims, batch=math.prod(b.batch))
        if kind != LINEAR or b.device.type != "cuda" or self.planner.form == "linear":
            return kind
        cgb = self.planner.cg_binding(b)
        try:
            self.linear_runner(name).launch_config(cgb.device, DTYPE_NAME[compute_dtype(b.dtype, b.device)],
                                                   len(cgb.batch), cgb.dims, cgb.batch)
        except UnsupportedError as e:
            if not no_fit(e):
                raise
            return TILED
        return kind

    def tunes(self, name: str, b: Binding) -> bool:
        """Whether a call of output `name` is tuned by timing: CUDA tensors, tuning on, the tiled family, the form
        left to the cost model or the linear form (its chunk and feature tiles); the window-mixing kernel is not."""
        return b.device.type == "cuda" and tune.enabled(self.planner.autotune) and not self.planner.is_window(name)

    def run(self, name: str, b: Binding, plan: Plan) -> torch.Tensor:
        """One output of a call in a given plan (the linear form, or the tiled kernel's schedule and tiles)."""
        if plan.kind == LINEAR:
            return self.linear(name, b, plan.config)
        return self.tiled(name, b, store_lse=False, plan=plan)[0]

    def tuned(self, name: str, b: Binding) -> Plan:
        """The plan timed fastest for the call's bucket: chosen on the bucket's first call in any process (every
        candidate of Planner.candidates launched and timed), read from the tuning cache afterwards."""
        cgb = self.planner.cg_binding(b)
        compute = compute_dtype(b.dtype, b.device)
        device = torch.cuda.get_device_name(b.device)
        key = self.planner.bucket(name, cgb.dims, DTYPE_NAME[b.dtype], device, len(b.batch))
        memo = (key, tuple(sorted(cgb.dims.items())), tuple(b.batch))
        if memo not in self._tuned:
            cands = self.planner.candidates(name, cgb.dims, DTYPE_NAME[b.dtype], DTYPE_NAME[compute], b.device,
                                            len(b.batch), math.prod(b.batch))

            timer = tune.Timer()   # short timings; a candidate far slower than the best stops after a probe

            def launch(k):
                return self.run(name, b, cands[k])

            def prepare():   # the candidates' kernels compiled at once, in compile processes (runtime/tune.py)
                return tune.precompile(launch, len(cands))

            rec = tune.choose(key, [c.key for c in cands], lambda k: timer(lambda: launch(k)),
                              prepare if b.device.type == "cuda" else None)
            spent = (0.0, 0.0) if rec.cached else (rec.compile_seconds, rec.tune_seconds)   # by this process
            self._tuned[memo] = dataclasses.replace(cands[rec.choice], measured_seconds=rec.seconds,
                                                    compile_seconds=spent[0], tune_seconds=spent[1])
        return self._tuned[memo]

    def spec(self, name: str, dtname: str, nbatch: int, cfg: Config, store_lse: bool, sched=None,
             exact=frozenset(), role: str = ""):
        """The generated tiled kernel (codegen/emit.py KernelSpec) of a schedule, dtype and config; `exact`: the
        head dims equal to their padded tiles at the launch (tiling.exact_heads); role: '' for an output's kernel,
        'final' for a split schedule's last kernel (its program holds the stored branch values), 'part' for the
        others (moa/split.py)."""
        sched = sched or self.planner.schedules[name]
        key = (name, sched.output, role, onf.label(sched), dtname, nbatch, cfg.block_m, cfg.block_n, store_lse, exact,
               cfg.tma, cfg.overlap)
        if key not in self._specs:
            prog = self.planner.kernel_program(name, role)
            self._specs[key] = generate(prog, sched, dtname, nbatch, cfg.block_m, cfg.block_n, store_lse, exact,
                                        cfg.tma, cfg.overlap)
        return self._specs[key]

    def plan(self, name: str, b: Binding, config: Config | None = None, fills: bool = False) -> Plan:
        """The tiled Plan of a call (code-generation binding); fills: the launch fills the device whatever its row
        tiles (a split-KV decode), so the schedule choice has no occupancy term."""
        compute = compute_dtype(b.dtype, b.device)
        return self.planner.tiled(name, b.dims, DTYPE_NAME[b.dtype], DTYPE_NAME[compute], b.device, len(b.batch),
                                  math.prod(b.batch), config, fills)

    def tiled(self, name: str, b: Binding, store_lse: bool, config: Config | None = None, plan: Plan | None = None):
        """(output, lse or None) of the tiled kernel, in `plan` (default: the planner's); lse in the accumulation
        dtype. A split schedule runs its kernels in turn (no lse: an output of several branches has none)."""
        b = self.planner.cg_binding(b)
        check_device(b.device)
        compute = compute_dtype(b.dtype, b.device)
        plan = plan or self.plan(name, b, config)
        if plan.schedule.kind == onf.SPLIT:
            return _finish(self._split(name, b, compute, plan.schedule, plan.config), b.dtype), None
        out, lse = self._kernel(name, b, compute, plan.schedule, plan.config, store_lse)
        return _finish(out, b.dtype), lse

    def _split(self, name: str, b: Binding, compute, sched, cfg: Config) -> torch.Tensor:
        """The output of a split schedule (moa/split.py): each stored branch by its own kernel, in the accumulation
        dtype, then the last branch's kernel with the epilogue reading them."""
        acc = torch.float64 if compute == torch.float64 else torch.float32
        values = {}
        for role, k, _, s in self.planner.kernels(name, sched):
            if role == "part":
                values[sched.split.names[k]] = self._kernel(name, b, compute, s, cfg, False, role, acc)[0]
        return self._kernel(name, dataclasses.replace(b, tensors={**b.tensors, **values}), compute, s, cfg, False,
                            role)[0]

    def _kernel(self, name: str, b: Binding, compute, sched, cfg: Config, store_lse: bool, role: str = "",
                out_dtype=None):
        """(output in out_dtype (default: compute), lse or None) of one tiled kernel of `sched` (b in code-generation
        names)."""
        dims = b.dims
        n, e = sy.evaluate(sched.row[1], dims), sy.evaluate(sched.col[1], dims)
        lead = [sy.evaluate(x, dims) for _, x in sched.lead]
        out = torch.empty((*b.batch, *lead, n, e), dtype=out_dtype or compute, device=b.device)
        acc_dt = torch.float64 if compute == torch.float64 else torch.float32
        lse = torch.empty((*b.batch, *lead, n), dtype=acc_dt, device=b.device) if store_lse else None
        grid = (row_programs(sched, n, cfg.block_m), math.prod(b.batch) * math.prod(lead))
        if grid[1] == 0 or lse is None and out.numel() == 0 or lse is not None and lse.numel() == 0:
            return out, lse   # nothing to compute (with e = 0 but rows, the kernel still computes the lse / Z)
        check_grid(grid, b.device, f"output {name}")
        exact = exact_heads(self.planner.schedules[name], dims)
        spec = self.spec(name, DTYPE_NAME[compute], len(b.batch), cfg, store_lse, sched, exact, role)
        passed = self._passed(spec, b, compute)
        if spec.descriptors and not all(tma_ready(passed[d.tensor]) for d in spec.descriptors):
            cfg = dataclasses.replace(cfg, tma=False)   # a layout the copy engine cannot address: plain loads
            spec = self.spec(name, DTYPE_NAME[compute], len(b.batch), cfg, store_lse, sched, exact, role)
        args, consts = self._arguments(spec, b, compute, out, lse, cfg, e, passed)
        fn = module_for(spec.source, b.device)._attn_fwd
        run(fn, grid, args, consts, b.device, f"the generated kernel for output {name}")
        return out, lse

    def _passed(self, spec, b: Binding, compute) -> dict:
        """The input tensors as the kernel reads them (as_kernel_input); a split schedule's stored branch values
        (no input of the program) as they are, in the accumulation dtype."""
        decl = self.planner.cg_program.input_map
        return {inp: as_kernel_input(b.tensors[inp], decl[inp], compute) if inp in decl else b.tensors[inp]
                for inp in spec.inputs}

    def _arguments(self, spec, b: Binding, compute, out, lse, cfg: Config, e: int,
                   passed: dict | None = None) -> tuple[list, dict]:
        """The kernel's arguments in signature order (inputs with their batch and axis strides, the output, lse,
        dims, batch sizes) and its constexprs (tiles, padded head dims; warps and stages on CUDA). passed: the
        inputs as converted for the kernel (default: converted here)."""
        passed = passed or self._passed(spec, b, compute)
        args = []
        nb = len(b.batch)
        for inp in spec.inputs:
            t = passed[inp]
            args += [t, *t.stride()[:nb], *t.stride()[nb:]]
        for ts in spec.summaries:   # the pre-pass: per-tile (min, max) of the inputs the tile tests read
            st = summary_tensor(ts, b.tensors[ts.tensor], nb, cfg.block_m, cfg.block_n, b.dims, SCAN)
            args += [st, *st.stride()]
        sizes = {"BLOCK_N": cfg.block_n, "HEAD_DIM_V": sy.tile_width(e),
                 **{hd: sy.tile_width(sy.evaluate(ext, b.dims)) for hd, ext in spec.head_dims}}
        for d in spec.descriptors:   # TMA: the tensor as passed, its box in elements
            t = passed[d.tensor]
            args.append(TensorDescriptor(t, list(t.shape), list(t.stride()), [sizes.get(x, x) for x in d.block]))
        args += [out, *out.stride()]
        if lse is not None:
            args += [lse, *lse.stride()[:-1]]
        args += [b.dims[d] for d in spec.dims]
        args += list(b.batch)
        consts = {"BLOCK_M": cfg.block_m, "BLOCK_N": cfg.block_n, "HEAD_DIM_V": sy.tile_width(e)}
        for hd, ext in spec.head_dims:
            consts[hd] = sy.tile_width(sy.evaluate(ext, b.dims))
        if lse is not None:
            consts["STORE_LSE"] = True
        if b.device.type == "cuda":
            consts.update(num_warps=cfg.num_warps, num_stages=cfg.num_stages)
        return args, consts

    def window_runner(self, name: str) -> WindowRunner:
        if name not in self._window:
            self._window[name] = WindowRunner(self.planner.cg_program, self.planner.schedules[name])
        return self._window[name]

    def linear_runner(self, name: str) -> LinearRunner:
        if name not in self._linear:
            self._linear[name] = LinearRunner(self.planner.cg_program, self.planner.linear_plans[name][0])
        return self._linear[name]

    def window(self, name: str, b: Binding) -> torch.Tensor:
        """The output of the window-mixing kernel (codegen/window.py)."""
        b = self.planner.cg_binding(b)
        compute = compute_dtype(b.dtype, b.device)
        return _finish(self.window_runner(name).run(b, compute, DTYPE_NAME[compute]), b.dtype)

    def linear(self, name: str, b: Binding, config=None) -> torch.Tensor:
        """The output of the chunked linear form (codegen/chunked.py), in a LinearConfig (default: the runner's)."""
        b = self.planner.cg_binding(b)
        compute = compute_dtype(b.dtype, b.device)
        return _finish(self.linear_runner(name).run(b, compute, DTYPE_NAME[compute], config), b.dtype)
