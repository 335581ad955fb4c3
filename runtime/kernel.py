"""moa.compile and the Kernel object: the four-line driver plus launch, reference, explain."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import torch
from moa.frontend import elaborate

from moa import ir, onf
from moa import dnf as D
from moa import symbolic as sy
from moa.errors import InputError, UnsupportedError
from moa.program import Program

from .binding import Binding, bind, check_offsets, check_reads
from .device import cdiv, check_device, next_pow2
from .launch import module_for, run

DTYPE_NAME = {torch.float64: "float64", torch.float32: "float32", torch.float16: "float16",
              torch.bfloat16: "bfloat16"}


@dataclass(frozen=True)
class Config:
    """Tile sizes and launch options of one kernel."""
    block_m: int
    block_n: int
    num_warps: int = 4
    num_stages: int = 2


def choose_config(device: torch.device, dtype: str, n: int, m: int, head: int) -> Config:
    """Block sizes for a call. The interpreter favours few, large programs; on a GPU the table follows the
    fused-attention tutorial's H100 choices with 8 warps (AOT for sm_90: 4 warps spill at d = 64). On CUDA,
    Kernel._run checks this default ahead of time and falls back to smaller tiles when it spills
    (costing.fit_config)."""
    if device.type == "cpu":
        return Config(min(64, max(16, next_pow2(n))), min(64, max(16, next_pow2(m))))
    if dtype == "float64":
        return Config(32, 32, 4, 1)
    if dtype == "float32":
        return Config(64, 32, 4, 2)
    return Config(128, 64, 8, 3)


MAX_TILE = 1 << 20  # triton's TRITON_MAX_TENSOR_NUMEL: no tile (rows x padded head dim) may hold more elements


def fit_tiles(cfg: Config, heads, what: str) -> Config:
    """Halve BLOCK_M / BLOCK_N (not below 16, tl.dot's minimum) until every tile of BLOCK x padded head dim
    holds at most 2^20 elements; a head dim that does not fit even with 16 rows is an UnsupportedError (never
    a Triton failure at launch)."""
    h = max(max(16, next_pow2(x)) for x in heads)
    if 16 * h > MAX_TILE:
        raise UnsupportedError(f"{what}: a head dim of {max(heads)} (padded to {h}) does not fit: one tile of 16 x "
                               f"{h} elements exceeds Triton's limit of {MAX_TILE} elements per tile; head dims up "
                               f"to {MAX_TILE // 16} are supported")
    bm, bn = cfg.block_m, cfg.block_n
    while bm > 16 and bm * h > MAX_TILE:
        bm //= 2
    while bn > 16 and bn * h > MAX_TILE:
        bn //= 2
    return cfg if (bm, bn) == (cfg.block_m, cfg.block_n) else dataclasses.replace(cfg, block_m=bm, block_n=bn)


CUDA_GRID_LIMITS = (2 ** 31 - 1, 65535)  # grid x and y of a CUDA launch


def check_grid(grid, device, what: str) -> None:
    """A CUDA launch grid beyond the hardware limits is the call's error (never a CUDA 'invalid argument')."""
    if device.type != "cuda":
        return  # the interpreter has no grid limit
    if grid[0] > CUDA_GRID_LIMITS[0]:
        raise InputError(f"{what}: {grid[0]} row tiles exceed the CUDA grid limit {CUDA_GRID_LIMITS[0]}")
    if grid[1] > CUDA_GRID_LIMITS[1]:
        raise InputError(f"{what}: batch x leading axes = {grid[1]} programs exceed the CUDA grid limit of "
                         f"{CUDA_GRID_LIMITS[1]} in y; split the call along a batch axis")


def _no_positional(args, names):
    if args:
        raise InputError(f"pass the inputs by name: k({', '.join(f'{n}=...' for n in names)}), got {len(args)} "
                         f"positional argument{'s' if len(args) > 1 else ''}")


def _load_source(source_or_path) -> tuple[str, str]:
    if isinstance(source_or_path, Path) or (isinstance(source_or_path, str) and "\n" not in source_or_path
                                            and source_or_path.endswith(".moa")):
        path = Path(source_or_path)
        try:
            return path.read_text(encoding="utf-8"), path.name
        except OSError as e:
            raise InputError(f"cannot read {path}: {e.strerror}") from None
        except ValueError as e:  # an embedded NUL in the path, or a file that is not UTF-8 text
            raise InputError(f"cannot read {str(path)[:200]!r}: {str(e)[:200]}") from None
    if not isinstance(source_or_path, str):
        raise InputError(f"moa.compile takes .moa text or a path, got {type(source_or_path).__name__}")
    return source_or_path, "<source>"


def compile(source_or_path, form=None, schedule=None, **params) -> Kernel:
    """Parse, elaborate, reduce to DNF and schedule a program: the driver of the pipeline. schedule: None (the
    cost model picks per call among the legal ONFs, moa/schedule_cost.py) or 'tiled' | 'hops' | 'residue'."""
    text, filename = _load_source(source_or_path)
    program = elaborate(text, filename, **params)   # text -> MoA IR with proven shapes
    try:
        outputs = D.dnf(program)                      # psi-reduction: no intermediate arrays
    except RecursionError:
        raise UnsupportedError("the program is too deeply nested for psi-reduction (a chain of a few hundred "
                               "operations); split the chain or use reductions such as sum(X, axis=k)",
                               program.outputs[0][1].loc) from None
    return Kernel(program, outputs, form, schedule)   # ONF + Triton on demand (per dtype and config)


class Kernel:
    """A compiled program. Call it with tensors by input name; see the README for the whole API."""

    def __init__(self, program: Program, outputs, form=None, schedule=None):
        if form not in (None, "quadratic", "linear"):
            raise InputError(f"form={form!r}: choose None (the cost model decides), 'quadratic' or 'linear'")
        if schedule not in (None, *onf.KINDS):
            raise InputError(f"schedule={schedule!r}: choose None (the cost model decides), "
                             + ", ".join(repr(k) for k in onf.KINDS))
        self.program = program
        self.dnf = outputs
        self.form = form
        self.schedule = schedule
        self._fns: dict = {}
        self._linear: dict = {}
        self._window: dict = {}
        self._choices: dict = {}

    # ---- schedules ------------------------------------------------------------------------------------
    @cached_property
    def codegen(self):
        """The program and DNF code generation sees (user names replaced when their renamed forms could collide;
        see codegen/names.py)."""
        from moa.codegen.names import codegen_view

        return codegen_view(self.program, self.dnf)

    @property
    def cg_program(self) -> Program:
        return self.codegen.program

    def _cg_binding(self, b: Binding) -> Binding:
        from moa.codegen.names import codegen_binding

        return codegen_binding(self.codegen, b)

    @cached_property
    def schedules(self) -> dict:
        """Output name -> ONF Schedule (raises UnsupportedError naming the construct codegen lacks)."""
        return {self.codegen.outputs[o.name]: onf.schedule(o) for o in self.codegen.dnf}

    def _schedule(self, name):
        return self.schedules[name]

    @cached_property
    def variants(self) -> dict:
        """Output name -> its legal ONFs (moa/onf.py `variants`): tiled first, then hops and residue liftings."""
        return {name: onf.variants(s) for name, s in self.schedules.items()}

    def schedule_choice(self, name: str, dims: dict, dtype: str = "bfloat16", device: str = "h100",
                        batch: int = 1):
        """(the schedule run for these dims, the predictions of every legal schedule): forced by `schedule=`,
        else the smallest predicted time on the device (moa/schedule_cost.py; ties go to the simpler kind)."""
        from moa import schedule_cost

        vs = self.variants[name]
        if self.schedule is not None:
            forced = [v for v in vs if v.kind == self.schedule]
            if not forced:
                raise UnsupportedError(f"schedule={self.schedule!r} for output {name}: not legal for this program "
                                       f"(legal: {', '.join(onf.label(v) for v in vs)}; hops and residue need a "
                                       f"mask with a conjunct (i - j) % s == 0, s >= 2)")
            vs = tuple(forced)
        if len(vs) == 1 and self.schedule is None:
            return vs[0], None
        s = self.schedules[name]
        n = sy.evaluate(s.row[1], dims)
        mext = max([sy.evaluate(br.extent, dims) for br in s.branches] + [1])
        heads = [sy.evaluate(br.dot.extent, dims) for br in s.branches if br.dot is not None] + \
            [sy.evaluate(s.col[1], dims)]
        cfg = fit_tiles(choose_config(torch.device("cuda"), _canonical(dtype), n, mext, max(heads)), heads,
                        f"output {name}")
        chosen, _, preds = schedule_cost.choose(vs, dims, dtype, device, cfg.block_m, cfg.block_n, batch)
        return chosen, preds

    def schedule_ranking(self, name: str, dims: dict, dtype: str = "bfloat16", device: str = "h100",
                         batch: int = 1) -> list:
        """The legal schedules in the order a CUDA launch tries them: the choice first, then by predicted time
        (runtime/configs.fit_schedule takes the first whose kernel fits the GPU without spilling)."""
        chosen, preds = self.schedule_choice(name, dims, dtype, device, batch)
        if preds is None:
            return [chosen]
        vs = [v for v in self.variants[name] if self.schedule is None or v.kind == self.schedule]
        order = sorted(range(len(vs)), key=lambda k: preds[k].seconds)
        return [chosen] + [vs[k] for k in order if vs[k] is not chosen]

    def schedule_for(self, name: str, dims: dict, dtype: str = "bfloat16", device: str = "h100",
                     batch: int = 1) -> onf.Schedule:
        """The ONF Kernel._run generates and launches for a call with these dims and batch size (the product of
        the call's batch axes); see schedule_choice."""
        key = (name, tuple(sorted(dims.items())), str(dtype), str(device), batch)
        if key not in self._choices:
            self._choices[key] = self.schedule_choice(name, dims, dtype, device, batch)[0]
        return self._choices[key]

    @cached_property
    def linear_plans(self) -> dict:
        """Output name -> (LinearPlan or None, why not): the chunked-state form derived by moa/linear.py."""
        from moa.linear import plan

        return {name: plan(s) for name, s in self.schedules.items()}

    def choose_form(self, name: str, dims: dict, device: str = "h100", dtype: str = "bf16") -> str:
        """The form run for one output: forced by `form=`, else the one with the smaller predicted time."""
        from moa import linear

        lp, why = self.linear_plans[name]
        if self.form == "linear":
            if lp is None:
                raise UnsupportedError(f"form='linear' for output {name}: {why}")
            return "linear"
        if self.form == "quadratic" or lp is None:
            return "quadratic"
        peak, bw = _device_roofline(device, dtype)
        c = linear.form_costs(lp, dims)
        return min(c, key=lambda f: linear.predicted_seconds(c[f], peak, bw))

    @property
    def input_names(self) -> tuple:
        return tuple(n.attrs[0] for n in self.program.inputs)

    @property
    def output_names(self) -> tuple:
        return tuple(n for n, _ in self.program.outputs)

    # ---- source -----------------------------------------------------------------------------------------
    def source(self, output: str | None = None, dtype: str = "float16", nbatch: int = 0,
               config: Config | None = None, store_lse: bool = False, dims: dict | None = None) -> str:
        """The generated Triton source of one output, for the schedule chosen at `dims` (default: head dims 64
        and every other dim 4096, see reference_dims) or forced by compile(schedule=...)."""
        from moa.codegen.emit import generate

        name = output or self.output_names[0]
        if self._is_window(name):
            from moa.codegen.window import generate_window

            return generate_window(self.cg_program, self._schedule(name), dtype, nbatch).source
        cfg = config or Config(128, 64)
        sched = self.schedule_for(name, dims or self.reference_dims(name), dtype)
        return generate(self.cg_program, sched, dtype, nbatch, cfg.block_m, cfg.block_n, store_lse).source

    def reference_dims(self, name: str | None = None) -> dict:
        """Dims for a schedule choice without a call: head dims (contracted extents, value columns) 64, every
        other dim 4096."""
        s = self.schedules[name or self.output_names[0]]
        heads = {str(x) for x in [s.col[1]] + [b.dot.extent for b in s.branches if b.dot is not None]}
        return {d.name: 64 if d.name in heads else 4096 for d in self.program.dims}

    @property
    def triton_source(self) -> str:
        """The Triton source of every output (fp16, no batch axes, default GPU tiles)."""
        return "\n\n".join(self.source(n) for n in self.output_names)

    # ---- calls ------------------------------------------------------------------------------------------
    def __call__(self, /, *args, **inputs):
        """Run the fused kernel(s): one output -> a tensor; several -> dict name -> tensor."""
        _no_positional(args, self.input_names)
        b = bind(self.program, inputs)
        check_offsets(self.program, b)
        self._check_reads(b)
        outs = {}
        for n in self.output_names:
            if self._is_window(n):
                outs[n] = self._run_window(n, b)
            elif self.choose_form(n, b.dims) == "linear":
                outs[n] = self._run_linear(n, b)
            else:
                outs[n] = self._run(n, b, store_lse=False)[0]
        return outs[self.output_names[0]] if len(outs) == 1 else outs

    def _check_reads(self, b: Binding) -> None:
        """binding.check_reads, once per set of dims (it depends on nothing else)."""
        done = self.__dict__.setdefault("_reads_checked", set())
        key = tuple(sorted(b.dims.items()))
        if key not in done:
            check_reads(self.program, self.dnf, b)
            done.add(key)

    def _is_window(self, name: str) -> bool:
        return any(br.mix is not None for br in self._schedule(name).branches)

    def _run_window(self, name: str, b: Binding):
        b = self._cg_binding(b)
        from .window_run import WindowRunner

        if name not in self._window:
            self._window[name] = WindowRunner(self.cg_program, self._schedule(name))
        dt = b.dtype
        compute = torch.float32 if (dt == torch.bfloat16 and b.device.type == "cpu") else dt
        return self._finish(self._window[name].run(b, compute, DTYPE_NAME[compute]), dt)

    def _run_linear(self, name: str, b: Binding):
        b = self._cg_binding(b)
        from .linear_run import LinearRunner

        if name not in self._linear:
            self._linear[name] = LinearRunner(self.cg_program, self.linear_plans[name][0])
        dt = b.dtype
        compute = torch.float32 if (dt == torch.bfloat16 and b.device.type == "cpu") else dt
        return self._finish(self._linear[name].run(b, compute, DTYPE_NAME[compute]), dt)

    def with_lse(self, /, **inputs):
        """(O, lse) for a single softmax-attention output: lse[..., i] = log sum_j exp(s_ij), -inf for a row
        with no admissible key (natural log). Used to merge partial results (ring attention)."""
        b = bind(self.program, inputs)
        check_offsets(self.program, b)
        self._check_reads(b)
        name = self.output_names[0]
        if len(self.output_names) != 1 or not self._schedule(name).has_lse:
            raise UnsupportedError("with_lse needs a program with one output of the form softmax(S) @ V")
        return self._run(name, b, store_lse=True)

    def ring(self, group=None, *, timeout=None, stats=False, **local_inputs):
        """Sequence-parallel ring attention over torch.distributed: this rank's query/key shards in, this
        rank's rows of every output out (see runtime/ring.py and docs/ring.md)."""
        from .ring import ring

        return ring(self, local_inputs, group=group, timeout=timeout, stats=stats)

    def reference(self, /, **inputs):
        """The float64 meaning of the program, evaluated unfused (every intermediate array exists)."""
        from .reference import reference

        outs = reference(self.program, inputs)
        return outs[self.output_names[0]] if len(outs) == 1 else outs

    def dnf_reference(self, /, **inputs):
        """The DNF evaluated directly (vectorised, float64, online-softmax merges): equals reference()."""
        from .dnf_eval import evaluate_dnf

        outs = evaluate_dnf(self.program, self.dnf, inputs)
        return outs[self.output_names[0]] if len(outs) == 1 else outs

    def _run(self, name: str, b: Binding, store_lse: bool, config: Config | None = None):
        b = self._cg_binding(b)
        check_device(b.device)
        dt = b.dtype
        sched = self.schedule_for(name, b.dims, DTYPE_NAME[dt], _device_name(b.device), math.prod(b.batch))
        compute = torch.float32 if (dt == torch.bfloat16 and b.device.type == "cpu") else dt
        dtname = DTYPE_NAME[compute]
        dims = b.dims
        n = sy.evaluate(sched.row[1], dims)
        e = sy.evaluate(sched.col[1], dims)
        lead = [sy.evaluate(x, dims) for _, x in sched.lead]
        base = self._schedule(name)  # launch extents of the unlifted schedule (the same for every kind)
        mext = max([sy.evaluate(br.extent, dims) for br in base.branches] + [1])
        heads = [sy.evaluate(br.dot.extent, dims) for br in base.branches if br.dot is not None] + [e]
        cfg = fit_tiles(config or choose_config(b.device, dtname, n, mext, max(heads)), heads, f"output {name}")
        if config is None and b.device.type == "cuda":  # AOT-checked: never a config that spills (configs.py)
            from .configs import runtime_config

            sched, cfg = runtime_config(self, name, dtname, dims, len(b.batch), b.device, math.prod(b.batch))
        shape = (*b.batch, *lead, n, e)
        out = torch.empty(shape, dtype=dt if compute == dt else compute, device=b.device)
        acc_dt = torch.float64 if compute == torch.float64 else torch.float32
        lse = torch.empty((*b.batch, *lead, n), dtype=acc_dt, device=b.device) if store_lse else None
        if out.numel() == 0:
            return self._finish(out, dt), lse
        spec = self._spec(name, dtname, len(b.batch), cfg, store_lse, sched)
        fn = module_for(spec.source, b.device)._attn_fwd
        args = []
        nb = len(b.batch)
        for inp in spec.inputs:
            t = b.tensors[inp]
            node = self.cg_program.input_map[inp]
            if node.dtype == ir.FLOAT and t.dtype != compute:
                t = t.to(compute)
            if node.dtype == ir.INT and t.dtype not in (torch.int32, torch.int64):
                t = t.to(torch.int32)
            args += [t, *t.stride()[:nb], *t.stride()[nb:]]
        args += [out, *out.stride()]
        if store_lse:
            args += [lse, *lse.stride()[:-1]]
        args += [dims[d] for d in spec.dims]
        args += list(b.batch)
        consts = {"BLOCK_M": cfg.block_m, "BLOCK_N": cfg.block_n, "HEAD_DIM_V": max(16, next_pow2(e))}
        for hd, ext in spec.head_dims:
            consts[hd] = max(16, next_pow2(sy.evaluate(ext, dims)))
        if store_lse:
            consts["STORE_LSE"] = True
        grid = (_row_programs(sched, n, cfg.block_m), math.prod(b.batch) * math.prod(lead))
        if grid[1] == 0:
            return self._finish(out, dt), lse
        check_grid(grid, b.device, f"output {name}")
        if b.device.type == "cuda":
            consts.update(num_warps=cfg.num_warps, num_stages=cfg.num_stages)
        run(fn, grid, args, consts, b.device, f"the generated kernel for output {name}")
        return self._finish(out, dt), lse

    @staticmethod
    def _finish(out, dt):
        return out if out.dtype == dt else out.to(dt)

    def _spec(self, name, dtname, nbatch, cfg: Config, store_lse, sched=None):
        from moa.codegen.emit import generate

        sched = sched or self._schedule(name)
        key = (name, onf.label(sched), dtname, nbatch, cfg.block_m, cfg.block_n, store_lse)
        if key not in self._fns:
            self._fns[key] = generate(self.cg_program, sched, dtname, nbatch, cfg.block_m, cfg.block_n, store_lse)
        return self._fns[key]

    # ---- cost model, counters, AOT resources (runtime/costing.py) ---------------------------------------
    def cost(self, dtype="bf16", device="h100", ranks=None, interconnect="nvlink4", **dims):
        """Predicted CostReport from the ONF (no execution); no dims -> sympy formulas. ranks=P: the ring over P
        devices instead (runtime/ring.py RingCost: per-rank compute, bytes sent, whether transfers hide)."""
        if ranks is not None:
            from .ring import ring_cost

            return ring_cost(self, ranks=ranks, interconnect=interconnect, dtype=dtype, device=device, **dims)
        from .costing import cost

        return cost(self, dtype=dtype, device=device, **dims)

    def measure(self, /, **inputs):
        """Measurement: counters of a run in the instrumented Triton interpreter (CPU tensors)."""
        from .costing import measure

        return measure(self, **inputs)

    def aot(self, target="sm_90", dtype="bf16", **dims):
        """The kernel a CUDA launch at these dims would run, compiled for a GPU target without a GPU, in the
        schedule and config the runtime fits (no spills, shared memory in budget): an AotReport (registers,
        spills, shared bytes, wgmma, ptx, cubin, schedule) for the tiled family, a FormAotReport (one AotReport
        per kernel) for the chunked linear form and the window-mixing kernel. Keywords: dims, plus `config=`,
        `output=`, `nbatch=`, `index_dtype=` (runtime/configs.aot)."""
        from .costing import aot

        return aot(self, target=target, dtype=dtype, **dims)

    # ---- explanation ------------------------------------------------------------------------------------
    def _explain_forms(self) -> list:
        return _explain_forms_of(self)

    def explain(self) -> str:
        """IR with shapes, the DNF in MoA notation, the eliminated intermediates and the ONF schedule."""
        p = self.program
        lines = [f"program {p.name}"]
        if p.dims:
            lines.append("  dims:   " + ", ".join(d.name for d in p.dims))
        if p.params:
            lines.append("  params: " + ", ".join(f"{k} = {v}" for k, v in p.params))
        lines.append("IR (shapes proven by sympy):")
        for n in p.inputs:
            lines.append(f"  in  {n.attrs[0]}: {sy.show_shape(n.shape)} {n.dtype}")
        outs = set(self.output_names)
        for name, node in p.bindings:
            tag = "out" if name in outs else "   "
            lines.append(f"  {tag} {name}: {sy.show_shape(node.shape)} = {_ir_text(node, p)}")
        guards = p.guards()
        if guards:
            lines.append("runtime guards:")
            lines += [f"  {g.message}" for g in guards]
        lines.append("DNF (psi-reduced; every output element over input elements):")
        lines += [f"  {D.show_output(o)}" for o in self.dnf]
        inter = p.intermediates()
        lines.append("intermediate arrays eliminated by fusion:")
        lines += [f"  {nm}: {sy.show(sz)} elements" for nm, sz in inter] or ["  (none)"]
        lines += self._explain_forms()
        try:
            lines += _explain_schedules_of(self)
            lines.append("ONF (tiled schedule):" if all(len(v) == 1 for v in self.variants.values()) else
                         "ONF (every legal schedule):")
            for vs in self.variants.values():
                for s in vs:
                    lines += ["  " + ln for ln in onf.show(s).splitlines()]
        except UnsupportedError as e:
            lines.append(f"  not compiled by this version: {e.message}")
        return "\n".join(lines)


def _row_programs(sched, n: int, block_m: int) -> int:
    """Programs along the grid's first axis: row tiles, or for the residue schedule the tiles of every residue
    (residues r < n mod s hold n // s + 1 rows, the others n // s)."""
    if sched.kind != onf.RESIDUE:
        return cdiv(n, block_m)
    st = sched.lift.stride
    q, rem = divmod(n, st)
    return rem * cdiv(q + 1, block_m) + (st - rem) * cdiv(q, block_m)


def _device_name(device: torch.device) -> str:
    """The device-table entry for a CUDA device (h100 when it is not in the table, or for CPU tensors: the
    schedule choice is a GPU prediction either way)."""
    if device.type == "cuda":
        try:
            from moa import devices

            name = torch.cuda.get_device_name(device)
            devices.get_device(name)
            return name
        except Exception:  # an unnamed or unknown device: the default entry
            pass
    return "h100"


def _canonical(dtype: str) -> str:
    from moa.devices import canonical_dtype

    return canonical_dtype(dtype)


def _explain_schedules_of(kernel) -> list:
    """The legal schedules of every output with their predicted times at a few n (h100, bf16) and the choice."""
    out = []
    for name, vs in kernel.variants.items():
        if len(vs) < 2:
            continue
        out.append(f"schedules of {name}: {', '.join(onf.label(v) for v in vs)} (predicted on h100, bf16, "
                   f"moa/schedule_cost.py; ONF of each below)")
        base = kernel.reference_dims(name)
        row = str(kernel.schedules[name].row[1])
        for n in (1024, 4096, 16384):
            dims = {k: (n if (k == row or v != 64) else v) for k, v in base.items()}
            chosen, preds = kernel.schedule_choice(name, dims)
            if preds is None:
                continue
            shown = ", ".join(f"{k}={v}" for k, v in dims.items())
            cells = "; ".join(f"{p.label} {p.seconds * 1e6:.1f} us ({p.tiles} tiles, {p.hops} hops)" for p in preds)
            out.append(f"  {shown}: {cells} -> {onf.label(chosen)}")
    return out


def _explain_forms_of(kernel) -> list:
    from moa import linear

    out = []
    try:
        plans = kernel.linear_plans
    except UnsupportedError:
        return out
    for name, (lp, _why) in plans.items():
        if lp is None:
            continue
        peak, bw = _device_roofline("h100", "bf16")
        d = lp.branch.dot.extent
        e = lp.schedule.col[1]
        dims = {str(s): 64 for s in (d, e) if s.is_Symbol}
        out.append(f"forms of {name}: quadratic (tiled) and linear (chunked states, D = {sy.show(lp.features_expr())}"
                   f" features of degree {lp.p}{', gated' if lp.ga is not None else ''})")
        for n in (1024, 16384, 131072):
            row = lp.schedule.row[1]
            c = linear.form_costs(lp, {**dims, str(row): n})
            t = {f: linear.predicted_seconds(c[f], peak, bw) for f in c}
            out.append(f"  n = {n:6d} ({', '.join(f'{k}={v}' for k, v in dims.items())}): quadratic "
                       f"{c['quadratic'].flops:.3g} FLOP {t['quadratic'] * 1e6:.1f} us, linear "
                       f"{c['linear'].flops:.3g} FLOP {t['linear'] * 1e6:.1f} us (h100 bf16 roofline)")
        x = linear.crossover(lp, dims, peak, bw)
        out.append(f"  predicted crossover: linear is faster from n = {x} on" if x else
                   "  predicted crossover: none below n = 2^24")
    return out


def _device_roofline(device: str, dtype: str) -> tuple[float, float]:
    """(peak FLOP/s, DRAM bytes/s) of a named device for the form choice."""
    try:
        from moa import devices

        dev = devices.get_device(device)
        return dev.peak_flops(dtype), dev.dram_bandwidth
    except (ImportError, AttributeError, KeyError):
        return 989e12, 3.35e12  # H100 SXM dense bf16, HBM3 (DESIGN.md's device table)


def _ir_text(node, program, depth=0) -> str:
    """A compact one-line rendering of an IR expression, naming bound arrays."""
    names = {id(n): nm for nm, n in program.bindings}
    names.update({id(n): n.attrs[0] for n in program.inputs})

    def go(n, d):
        if d > 0 and id(n) in names:
            return names[id(n)]
        if d > 12:
            return "..."
        if n.op == "input":
            return n.attrs[0]
        if n.op == "const":
            return repr(n.attrs[0])
        if n.op == "sym":
            return sy.show(n.attrs[0])
        if n.op == "ewise":
            return f"{n.attrs[0]}({', '.join(go(a, d + 1) for a in n.args)})"
        if n.op == "matmul":
            return f"({go(n.args[0], d + 1)} +.x {go(n.args[1], d + 1)})"
        if n.op == "psi":
            a, *ix = n.args
            it = iter(ix)
            parts = [":" if s == ":" else go(next(it), d + 1) for s in n.attrs[0]]
            return f"<{' '.join(parts)}> psi {go(a, d + 1)}"
        if n.op == "comp":
            return f"[{' '.join(v.name for v in n.attrs[0])}] {go(n.args[0], d + 1)}"
        attrs = ", ".join(str(a) for a in n.attrs)
        return f"{n.op}({', '.join(go(a, d + 1) for a in n.args)}{', ' + attrs if attrs else ''})"

    return go(node, depth)
