"""Planning: everything decided before a launch. Per program, the code-generation view, the ONF schedules and their
legal variants, the linear plans; per call, the kernel family (tiled, window-mixing or the chunked linear form),
the schedule (tiled, hops, residue) and the tile config.

Choices come from the cost model (moa/schedule_cost.py for schedules, moa/linear.py for forms) and, on CUDA, from
the ahead-of-time check of the candidate configs (runtime/configs.py, runtime/form_configs.py): a kernel that
spills or overflows shared memory is never launched. `compile(form=..., schedule=...)` forces a choice."""
from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass
from functools import cached_property

import torch

from moa import linear, onf, schedule_cost, split
from moa import symbolic as sy
from moa.codegen.emit import looks_ahead
from moa.codegen.names import codegen_binding, codegen_view, fresh_names
from moa.devices import DTYPE_BYTES, canonical_dtype, get_device
from moa.errors import InputError, MoaError, UnsupportedError
from moa.program import Program
from moa.version import __version__

from . import configs, tune
from .binding import Binding
from .device import device_table_name
from .tiling import (Config, LinearConfig, TensorDescriptor, choose_config, default_config, fit_tiles, head_dims,
                     linear_tune_configs, state_dtype, tune_candidates)

TILED, WINDOW, LINEAR = "tiled", "window", "linear"


@dataclass(frozen=True)
class Plan:
    """What a call of one output runs: the kernel family, the schedule and config of the tiled kernel (None for the
    other families, whose configs runtime/form_configs.py fits), and the prediction behind the choice."""
    output: str
    kind: str                  # TILED, WINDOW or LINEAR
    schedule: object = None    # the ONF Schedule (tiled family)
    config: Config | LinearConfig | None = None   # a LinearConfig for a tuned linear-form candidate
    predictions: tuple = ()    # schedule_cost.Prediction of every legal schedule (tiled family), if several
    measured_seconds: float | None = None    # the time a GPU measured when it tuned this call's bucket
    predicted_seconds: float | None = None   # the cost model's time (Kernel.plan fills it in)
    compile_seconds: float | None = None     # tuning in this process: the candidates' compiles (runtime/tune.py)
    tune_seconds: float | None = None        # tuning in this process: timing them (0, 0: read from the cache)

    @property
    def label(self) -> str:
        return onf.label(self.schedule) if self.schedule is not None else self.kind

    @property
    def key(self) -> str:
        """The plan in one string (a tuning record's label)."""
        c = self.config
        if isinstance(c, LinearConfig):
            tiles = f" chunk{c.chunk} f{c.block_f}" + (f" v{c.block_v}" if c.block_v else "") + \
                f" w{c.num_warps} s{c.num_stages}"
        else:
            tiles = "" if c is None else f" {c.block_m}x{c.block_n} w{c.num_warps} s{c.num_stages}" + \
                (" tma" if c.tma else "") + (" overlap" if c.overlap else "")
        return f"{self.kind} {self.label}{tiles}"

    def __repr__(self) -> str:
        cfg = self.config
        if isinstance(cfg, LinearConfig):
            tiles = f", {cfg.text()}"
        else:
            tiles = "" if cfg is None else ", " + cfg.text()
        times = "".join(f", {what} {t * 1e6:.1f} us" for what, t in (("predicted", self.predicted_seconds),
                                                                     ("measured", self.measured_seconds))
                        if t is not None)
        if self.compile_seconds is not None:
            times += f", tuned in {self.compile_seconds:.2f} s compile + {self.tune_seconds or 0.0:.2f} s timing"
        return f"Plan({self.output}: {self.kind} kernel, schedule {self.label}{tiles}{times})"


class Planner:
    """The decisions of one compiled program. `form` / `schedule` force the form or schedule (None: the cost
    model decides per call)."""

    def __init__(self, program: Program, dnf, form: str | None = None, schedule: str | None = None,
                 autotune: bool | None = None):
        if form not in (None, "quadratic", "linear"):
            raise InputError(f"form={form!r}: choose None (the cost model decides), 'quadratic' or 'linear'")
        if schedule not in (None, *onf.KINDS):
            raise InputError(f"schedule={schedule!r}: choose None (the cost model decides), "
                             + ", ".join(repr(k) for k in onf.KINDS))
        self.program, self.dnf, self.form, self.schedule = program, dnf, form, schedule
        self.autotune = autotune   # None: MOA_AUTOTUNE decides (runtime/tune.py)
        self._choices: dict = {}
        self._split_programs: dict = {}
        self.fit_memo: dict = {}     # runtime/configs.py: AOT-fitted (schedule, config) per call shape

    # ---- per program ------------------------------------------------------------------------------------------
    @cached_property
    def codegen(self):
        """The program and DNF code generation sees (user names replaced when their renamed forms could collide;
        see codegen/names.py)."""
        return codegen_view(self.program, self.dnf)

    @property
    def cg_program(self) -> Program:
        return self.codegen.program

    def cg_binding(self, b: Binding) -> Binding:
        """A call's binding in code-generation names."""
        return codegen_binding(self.codegen, b)

    @cached_property
    def schedules(self) -> dict:
        """Output name -> ONF Schedule (raises UnsupportedError naming the construct codegen lacks)."""
        try:
            return {self.codegen.outputs[o.name]: onf.schedule(o) for o in self.codegen.dnf}
        except UnsupportedError as e:   # said in the user's names, not the renamed ones (codegen/names.py)
            raise UnsupportedError(self.codegen.user_text(str(e))) from None

    @cached_property
    def variants(self) -> dict:
        """Output name -> its legal ONFs (moa/onf.py `variants`): tiled first, then hops and residue liftings, then
        the splits into one kernel per branch (moa/split.py)."""
        return {name: onf.variants(s) + split.variants(s, self.value_names(name))
                for name, s in self.schedules.items()}

    def value_names(self, name: str) -> tuple:
        """The array names of output `name`'s stored branch values in a split schedule (code-generation names)."""
        v = self.codegen
        return fresh_names(v.program, v.dnf, [f"{name}_b{k}" for k in range(len(self.schedules[name].branches))])

    def kernels(self, name: str, sched) -> list:
        """[(role, branch, program, schedule)] of the kernels a tiled launch of `sched` runs, in order: its one
        kernel (role ''), or a split schedule's stored branches ('part') and then the last branch with the epilogue
        ('final': its program holds the stored values as inputs, `kernel_program`)."""
        if sched.kind != onf.SPLIT:
            return [("", None, self.cg_program, sched)]
        sp_ = sched.split
        return [("part", k, self.cg_program, s) for k, s in sp_.parts] + \
            [("final", sp_.last, self.kernel_program(name, "final"), sp_.final)]

    def kernel_program(self, name: str, role: str) -> Program:
        """The program a kernel of output `name` is generated from: the code-generation program, or for a split
        schedule's final kernel that program with the stored branch values (`split_program`)."""
        return self.split_program(name) if role == "final" else self.cg_program

    def split_program(self, name: str) -> Program:
        """The code-generation program with output `name`'s stored branch values as inputs (a split schedule's final
        kernel reads them)."""
        if name not in self._split_programs:
            s, p = self.schedules[name], self.cg_program
            self._split_programs[name] = dataclasses.replace(
                p, inputs=p.inputs + tuple(split.value_input(s, n) for n in self.value_names(name)))
        return self._split_programs[name]

    @cached_property
    def linear_plans(self) -> dict:
        """Output name -> (LinearPlan or None, why not): the chunked-state form derived by moa/linear.py."""
        return {name: linear.plan(s) for name, s in self.schedules.items()}

    @cached_property
    def key(self) -> str:
        """The program as tuning records know it: source, params, forced form and schedule, moa's version."""
        text = repr((self.program.source, self.program.params, self.form, self.schedule, __version__))
        return hashlib.sha256(text.encode()).hexdigest()[:24]

    def bucket(self, name: str, dims: dict, dtype: str, device: str, nbatch: int) -> str:
        """The tuning bucket of a call (runtime/tune.py): head dims exact, sequence dims by powers of two."""
        s = self.schedules[name]
        heads = {str(x) for x in [s.col[1]] + [b.dot.extent for b in s.branches if b.dot is not None]}
        return tune.bucket_key(device, dtype, self.key, name, nbatch,
                               {k: v for k, v in dims.items() if k in heads},
                               {k: v for k, v in dims.items() if k not in heads})

    @property
    def output_names(self) -> tuple:
        return tuple(n for n, _ in self.program.outputs)

    @property
    def input_names(self) -> tuple:
        return tuple(n.attrs[0] for n in self.program.inputs)

    def is_window(self, name: str) -> bool:
        return any(br.mix is not None for br in self.schedules[name].branches)

    def reference_dims(self, name: str | None = None) -> dict:
        """Dims for a schedule choice without a call: head dims (contracted extents, value columns) 64, every
        other dim 4096."""
        s = self.schedules[name or self.output_names[0]]
        heads = {str(x) for x in [s.col[1]] + [b.dot.extent for b in s.branches if b.dot is not None]}
        return {d.name: 64 if d.name in heads else 4096 for d in self.program.dims}

    # ---- the schedule of the tiled family --------------------------------------------------------------------
    def schedule_choice(self, name: str, dims: dict, dtype: str = "bfloat16", device: str = "h100",
                        batch: int = 1, fills: bool = False):
        """(the schedule run for these dims, the predictions of every legal schedule): forced by `schedule=`,
        else the smallest predicted time on the device (moa/schedule_cost.py; ties go to the simpler kind).
        fills: the launch fills the device whatever its row tiles (a split-KV decode): no occupancy term."""
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
        cfg = default_config(self.schedules[name], torch.device("cuda"), canonical_dtype(dtype), dims,
                             f"output {name}")
        chosen, _, preds = schedule_cost.choose(vs, dims, dtype, device, cfg.block_m, cfg.block_n, batch, fills)
        return chosen, preds

    def schedule_ranking(self, name: str, dims: dict, dtype: str = "bfloat16", device: str = "h100",
                         batch: int = 1, fills: bool = False) -> list:
        """The legal schedules in the order a CUDA launch tries them: the choice first, then by predicted time
        (runtime/configs.py takes the first whose kernel fits the GPU without spilling)."""
        chosen, preds = self.schedule_choice(name, dims, dtype, device, batch, fills)
        if preds is None:
            return [chosen]
        vs = [v for v in self.variants[name] if self.schedule is None or v.kind == self.schedule]
        order = sorted(range(len(vs)), key=lambda k: preds[k].seconds)
        return [chosen] + [vs[k] for k in order if vs[k] is not chosen]

    def schedule_for(self, name: str, dims: dict, dtype: str = "bfloat16", device: str = "h100",
                     batch: int = 1, fills: bool = False) -> onf.Schedule:
        """The ONF a launch with these dims and batch size (the product of the batch axes) runs; see
        schedule_choice. Memoised per call shape."""
        key = (name, tuple(sorted(dims.items())), str(dtype), str(device), batch, fills)
        if key not in self._choices:
            self._choices[key] = self.schedule_choice(name, dims, dtype, device, batch, fills)[0]
        return self._choices[key]

    def base_schedule(self, name: str) -> onf.Schedule:
        """The schedule without dims: the forced kind if any, else the tiled one."""
        forced = [v for v in self.variants[name] if v.kind == self.schedule] if self.schedule else []
        return forced[0] if forced else self.schedules[name]

    # ---- the form and the kernel family --------------------------------------------------------------------------
    def choose_form(self, name: str, dims: dict, device: str = "h100", dtype: str = "bf16",
                    training: bool = False, batch: int = 1) -> str:
        """The form run for one output: forced by `form=`, else the one with the smaller predicted time (training:
        of the forward and the backward together, as a call that needs gradients runs both): per launch, its
        roofline on the device divided by its occupancy, plus the launch overhead, as cost() times a call, with
        `batch` instances (the product of the batch axes) and the scan's value axis split as a launch splits it."""
        lp, why = self.linear_plans[name]
        if self.form == "linear":
            if lp is None:
                raise UnsupportedError(f"form='linear' for output {name}: {why}")
            return "linear"
        if self.form == "quadratic" or lp is None:
            return "quadratic"
        t = self.form_times(name, dims, device, dtype, training, batch)
        return min(t, key=t.get)

    def _form_model(self, device: str, dtype: str, training: bool, batch: int) -> tuple:
        """(form_costs keywords, predicted_seconds arguments) of the form choice on a device."""
        dev = form_device(device)
        kw = dict(training=training, state_bytes=DTYPE_BYTES[state_dtype(canonical_dtype(dtype))],  # forward's states
                  batch=batch, sms=dev.sms, l2_bytes=dev.l2_bytes)
        return kw, (dev.matmul_rate(dtype), dev.dram_bandwidth, dev.sms, dev.launch_s, dev.vector_rate(dtype))

    def form_times(self, name: str, dims: dict, device: str = "h100", dtype: str = "bf16", training: bool = False,
                   batch: int = 1) -> dict:
        """Form -> predicted seconds of one output with a linear form (moa/linear.py form_costs and
        predicted_seconds, as choose_form compares them)."""
        kw, args = self._form_model(device, dtype, training, batch)
        c = linear.form_costs(self.linear_plans[name][0], dims, **kw)
        return {f: linear.predicted_seconds(c[f], *args) for f in c}

    def form_crossover(self, name: str, dims: dict, device: str = "h100", dtype: str = "bf16",
                       training: bool = False, batch: int = 1) -> int | None:
        """The n from which choose_form predicts the linear form faster (moa/linear.py crossover), dims: the
        others."""
        kw, (peak, bw, _, launch_s, vec) = self._form_model(device, dtype, training, batch)
        return linear.crossover(self.linear_plans[name][0], dims, peak, bw, launch_s, vec, **kw)

    def run_kind(self, name: str, dims: dict | None, device=None, dtype=None, training: bool = False,
                 batch: int = 1) -> str:
        """The kernel family an output runs: WINDOW (codegen/window.py), LINEAR (codegen/chunked.py) or TILED
        (codegen/emit.py). dims None: the family without a call (tiled unless forced); device/dtype None: as a
        call decides (h100, bf16 prediction); training: the form of a call that also runs the backward; batch:
        the product of the call's batch axes."""
        if self.is_window(name):
            return WINDOW
        if self.form == "linear":
            self.choose_form(name, dims or {})   # refuses an output without a linear form
            return LINEAR
        if self.form == "quadratic" or dims is None:
            return TILED
        try:
            form = self.choose_form(name, dims, training=training, batch=batch) if device is None else \
                self.choose_form(name, dims, device=str(device), dtype=dtype, training=training, batch=batch)
        except (UnsupportedError, KeyError):
            return TILED
        return LINEAR if form == "linear" else TILED

    # ---- the tiled family's config ------------------------------------------------------------------------------
    def launch_config(self, name: str, device: torch.device, dtype: str, dims: dict) -> Config:
        """The default config a launch starts from: choose_config's table, tiles shrunk for huge head dims."""
        return default_config(self.schedules[name], device, dtype, dims, f"output {name}")

    def tiled(self, name: str, dims: dict, call_dtype: str, compute: str, device: torch.device, nbatch: int,
              batch: int, config: Config | None = None, fills: bool = False) -> Plan:
        """The Plan of a tiled launch. The schedule is predicted for the call's dtype on the device (h100 for CPU
        tensors); the config is the compute dtype's: on CPU (the interpreter) the interpreter's tiles, on CUDA the
        schedules in the runtime's order with their candidate configs, the first that fits the device without
        spilling (runtime/configs.py; AOT-checked, cached). `config` forces the tiles; fills: schedule_choice's."""
        sched = self.schedule_for(name, dims, call_dtype, device_table_name(device), batch, fills)
        if config is None and device.type == "cuda":
            sched, cfg = configs.runtime_config(self, name, compute, dims, nbatch, device, batch, fills)
            return Plan(name, TILED, sched, cfg)
        n, m, head = _extents(self.schedules[name], dims)
        cfg = config or choose_config(device, compute, n, m, head)
        return Plan(name, TILED, sched, fit_tiles(cfg, head_dims(self.schedules[name], dims), f"output {name}"))

    def candidates(self, name: str, dims: dict, call_dtype: str, compute: str, device: torch.device,
                   nbatch: int, batch: int, limit: int = 6) -> list:
        """The plans a GPU times for a call's bucket (runtime/tune.py): the model's schedule with its default tiles
        first, then the tile configs of tiling.tune_candidates (the two leading ones also with the look-ahead
        q . k^T of `overlaps`, and on Hopper with TMA key tiles), the runner-up schedule with the default tiles, and
        the linear form where the program has one and no form is forced (a forced linear form: its configs only,
        `linear_candidates`). Nothing is checked ahead of time: a
        candidate that does not compile or run is skipped by the tuner, one that spills is timed slow."""
        n, m, head = _extents(self.schedules[name], dims)
        if self.form == "linear":   # the form is forced: its configs only
            return self.linear_candidates(name, n, dims)
        heads = head_dims(self.schedules[name], dims)
        first = Plan(name, TILED, self.schedule_for(name, dims, call_dtype, device_table_name(device), batch),
                     fit_tiles(choose_config(device, compute, n, m, head), heads, f"output {name}"))
        out = [first]
        for cfg in tune_candidates(compute, head, first.config, limit):
            p = Plan(name, TILED, first.schedule, fit_tiles(cfg, heads, f"output {name}"))
            if p.key not in {q.key for q in out}:
                out.append(p)
        lead, extra = out[:2], []
        if overlaps(first.schedule):   # the next full tile's q . k^T overlapping this tile's softmax
            extra += [dataclasses.replace(p, config=dataclasses.replace(p.config, overlap=True)) for p in lead]
        if tma_capable(device):   # Hopper's copy engine for the K / V tiles
            extra += [dataclasses.replace(p, config=dataclasses.replace(p.config, tma=True)) for p in lead]
        out[2:2] = extra
        ranking = self.schedule_ranking(name, dims, call_dtype, device_table_name(device), batch)
        for sched in ranking[1:2]:
            out.append(Plan(name, TILED, sched, first.config))
        if self.form is None and self.linear_plans[name][0] is not None:
            out += self.linear_candidates(name, n, dims)
        return out

    def linear_candidates(self, name: str, n: int, dims: dict) -> list:
        """The linear form's plans a GPU times: the config fitted ahead of time (its value axis split as a launch
        without timing splits it), then tiling.linear_tune_configs."""
        hv = sy.tile_width(sy.evaluate(self.schedules[name].col[1], dims))
        return [Plan(name, LINEAR), *(Plan(name, LINEAR, config=c) for c in linear_tune_configs(n, hv))]


def overlaps(sched) -> bool:
    """Whether Config.overlap changes a schedule's kernels: a branch with a loop over full key tiles and a q . k^T
    (a split schedule: in any of its kernels)."""
    scheds = sched.split.kernels if sched.kind == onf.SPLIT else (sched,)
    return any(looks_ahead(s, b) for s in scheds for b in s.branches)


def tma_capable(device: torch.device) -> bool:
    """Whether launches on `device` can read tiles through TMA tensor descriptors: a CUDA GPU of compute
    capability 9.0 or newer (Hopper, Blackwell)."""
    return TensorDescriptor is not None and device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 9


def _extents(sched, dims):
    n = sy.evaluate(sched.row[1], dims)
    mext = max([sy.evaluate(br.extent, dims) for br in sched.branches] + [1])
    return n, mext, max(head_dims(sched, dims))


def form_device(device: str):
    """The device-table entry (moa/devices.py) the form choice predicts on (h100 where `device` names none)."""
    try:
        return get_device(device)
    except (MoaError, AttributeError, KeyError):
        return get_device("h100")
