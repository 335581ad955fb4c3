"""moa.compile and the Kernel: the pipeline's driver and the object a user calls.

    text --elaborate--> MoA IR --dnf--> DNF --plan--> ONF + config --emit--> Triton --launch--> tensors

`compile` runs the first two stages (frontend/, moa/dnf.py); everything that depends on a call (schedule, form,
tiles, code) is decided on demand by the Planner (runtime/plan.py) and run by the Launcher (runtime/launch.py).
Kernel is a thin facade over them and over the reference evaluators, the cost model, AOT and the ring."""
from __future__ import annotations


import dataclasses
from pathlib import Path

import torch

from moa import dnf as D
from moa import paging
from moa import ir, onf
from moa.errors import InputError, MoaError, UnsupportedError
from moa.frontend import elaborate
from moa.program import Program

from . import autograd, configs, costing, decode, explain, measuring, paged, ring, varlen
from .binding import Binding, bind, check_offsets, check_reads
from .dnf_eval import evaluate_dnf
from .launch import Launcher
from .device import check_device, device_table_name
from .plan import TILED, Plan, Planner
from .reference import reference
from .tiling import DTYPE_NAME, Config


def _no_positional(args, names, call: str = "k", lead: str = ""):
    if args:
        named = ", ".join(f"{n}=..." for n in names)
        raise InputError(f"pass the inputs by name: {call}({lead}{named}), got {len(args)} "
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


def compile(source_or_path, /, form=None, schedule=None, autotune=None, **params) -> Kernel:
    """Parse, elaborate and reduce a program to DNF; everything else happens per call.

    source_or_path: .moa text or a path. form: None (the cost model picks per call), "quadratic" or "linear".
    schedule: None (the cost model picks among the legal ONFs) or "tiled" | "hops" | "residue". autotune: on a
    GPU, time the candidate plans on the first call of a shape bucket and keep the fastest (None: MOA_AUTOTUNE,
    default on; runtime/tune.py). params override the program's `param` defaults."""
    text, filename = _load_source(source_or_path)
    program = elaborate(text, filename, **params)   # text -> MoA IR with proven shapes
    program, pages = paging.lower(program)          # K[page[j // P], j % P]: the contiguous program + its paging
    try:
        outputs = D.dnf(program)                      # psi-reduction: no intermediate arrays
    except RecursionError:
        raise UnsupportedError("the program is too deeply nested for psi-reduction (a chain of a few hundred "
                               "operations); split the chain or use reductions such as sum(X, axis=k)",
                               program.outputs[0][1].loc) from None
    kernel = Kernel(program, outputs, form, schedule, autotune)   # ONF + Triton on demand (per dtype and config)
    if pages is not None:
        paged.register(kernel, pages)   # calls run the paged decode (runtime/paged.py, runtime/decode.py)
    return kernel


class Kernel:
    """A compiled program. Call it with tensors by input name (`k(Q=q, K=k, V=v)`): one output gives a tensor,
    several a dict name -> tensor; extra leading axes of the tensors broadcast. CPU tensors run in Triton's
    interpreter, CUDA tensors on the GPU.

    Attributes: `program` (the elaborated IR), `dnf` (its normal form), `planner` (runtime/plan.py: schedules,
    forms and configs), `launcher` (runtime/launch.py)."""

    def __init__(self, program: Program, outputs, form: str | None = None, schedule: str | None = None,
                 autotune: bool | None = None):
        self.planner = Planner(program, outputs, form, schedule, autotune)
        self.launcher = Launcher(self.planner)
        self._reads_checked: set = set()
        autograd.register(self)   # op_key (the moa::attention operator's name for it) and its Backward

    def __getstate__(self) -> dict:
        """A copy (pickle, deepcopy, torch.save of a module holding it) keeps the plans, not the operator key."""
        state = {k: v for k, v in self.__dict__.items() if k not in ("op_key", "backward")}
        state["_paging"] = paged.paging_of(self)
        return state

    def __setstate__(self, state: dict) -> None:
        """The copy registers as a kernel of its own (in this process), with its paging if any."""
        paging = state.pop("_paging", None)
        self.__dict__.update(state)
        autograd.register(self)
        if paging is not None:
            paged.register(self, paging)

    program = property(lambda self: self.planner.program, doc="The elaborated program (MoA IR).")
    dnf = property(lambda self: self.planner.dnf, doc="The DNF of every output.")
    form = property(lambda self: self.planner.form, doc="The forced form, or None.")
    schedule = property(lambda self: self.planner.schedule, doc="The forced schedule kind, or None.")
    schedules = property(lambda self: self.planner.schedules, doc="Output name -> its ONF (tiled) schedule.")
    variants = property(lambda self: self.planner.variants, doc="Output name -> every legal ONF.")
    input_names = property(lambda self: self.planner.input_names)
    output_names = property(lambda self: self.planner.output_names)

    # ---- calls ----------------------------------------------------------------------------------------------
    def bind(self, inputs: dict) -> Binding:
        """Check a call's tensors against the program (names, shapes, dtypes, devices, offsets, in-range reads)."""
        b = bind(self.program, inputs)
        check_offsets(self.program, b)
        key = tuple(sorted(b.dims.items()))
        if key not in self._reads_checked:   # depends on the dims only
            check_reads(self.program, self.dnf, b)
            self._reads_checked.add(key)
        return b

    def __call__(self, /, *args, **inputs):
        """Run the fused kernel(s): one output -> a tensor; several -> dict name -> tensor. With inputs that require
        grad (or under torch.compile) the call goes through the moa::attention operator (runtime/autograd.py)."""
        _no_positional(args, self.input_names)
        if paged.paging_of(self) is not None:
            return self._typed(decode.decode(self, inputs))
        if autograd.wants_op(inputs):
            return self._typed(autograd.call(self, inputs))
        if decode.prefers_split(self, inputs):   # CUDA, few query rows: split-KV / GQA packing (docs/inference.md)
            return self._typed(decode.decode(self, inputs))
        b = self.bind(inputs)
        outs = {n: self.launcher.output(n, b) for n in self.output_names}
        return self._typed(outs[self.output_names[0]] if len(outs) == 1 else outs)

    def _typed(self, res):
        """A call's result with boolean outputs (out O = (A @ V) > 0) as bool tensors, as the reference gives
        them (the kernels compute them as 0 / 1 in the float dtype)."""
        types = self.program.output_map
        if all(types[n].dtype != ir.BOOL for n in self.output_names):
            return res
        if isinstance(res, dict):
            return {n: (o != 0 if types[n].dtype == ir.BOOL else o) for n, o in res.items()}
        return res != 0

    def with_lse(self, /, *args, **inputs):
        """(O, lse) for a single softmax-attention output: lse[..., i] = log sum_j exp(s_ij), -inf for a row
        with no admissible key (natural log). Used to merge partial results (ring attention)."""
        _no_positional(args, self.input_names)
        why = autograd.lse_refusal(self) or autograd.form_refusal(self)
        if why is not None:
            raise UnsupportedError(why)
        if autograd.wants_op(inputs):   # differentiable (O, lse), traceable: runtime/autograd.py call_with_lse
            return autograd.call_with_lse(self, inputs)
        return self.launcher.tiled(self.output_names[0], self.bind(inputs), store_lse=True)

    def plan(self, /, *args, **inputs) -> dict:
        """Output name -> the Plan a call with these tensors runs: the kernel family, the schedule and tile config,
        the cost model's predicted time of the call (on the device's table entry; h100 for CPU tensors) and, on a
        GPU that tuned the call's bucket, the measured time and what the tuning cost (Plan.compile_seconds,
        Plan.tune_seconds: the candidates' compiles and their timing; tuning runs here if it has not yet)."""
        _no_positional(args, self.input_names)
        b = self.bind(inputs)
        device = device_table_name(b.device)
        try:
            dims = {d.name: b.dims[d.name] for d in self.program.dims}
            data = {x.attrs[0]: b.tensors[x.attrs[0]] for x in self.program.inputs if x.dtype != ir.FLOAT}
            predicted = costing.cost(self, dtype=DTYPE_NAME[b.dtype], device=device, batch=b.batch,
                                     inputs=data or None, **dims).predicted_seconds
        except MoaError:   # a program the cost model cannot predict at these dims
            predicted = None
        out = {}
        for name in self.output_names:
            kind = self.launcher.run_kind(name, b)
            if self.launcher.tunes(name, b):
                p = self.launcher.tuned(name, b)
            elif kind == TILED:
                p = self.launcher.plan(name, self.planner.cg_binding(b))
            else:
                p = Plan(name, kind)
            out[name] = dataclasses.replace(p, predicted_seconds=predicted)
        return out

    def reference(self, /, *args, **inputs):
        """The float64 meaning of the program, evaluated unfused (every intermediate array exists). It runs on
        the CPU; the result comes back on the device of the inputs (GPU tensors are copied over and back)."""
        _no_positional(args, self.input_names)
        if paged.paging_of(self) is not None:   # the pools gathered into the contiguous cache they stand for
            inputs = paged.contiguous(self, inputs)
        return self._on_cpu(lambda x: reference(self.program, x), inputs)

    def dnf_reference(self, /, *args, **inputs):
        """The DNF evaluated directly (vectorised, float64, online-softmax merges): equals reference()."""
        _no_positional(args, self.input_names)
        return self._on_cpu(lambda x: evaluate_dnf(self.program, self.dnf, x), inputs)

    def _on_cpu(self, fn, inputs):
        devices = {t.device for t in inputs.values() if isinstance(t, torch.Tensor)}
        if len(devices) > 1:   # the call's own refusal (InputError naming the devices), before any copy
            self.bind(inputs)
        home = devices.pop() if len(devices) == 1 else torch.device("cpu")
        check_device(home)   # meta tensors hold no values to copy
        outs = fn({k: t.cpu() if isinstance(t, torch.Tensor) else t for k, t in inputs.items()})
        outs = {k: v.to(home) for k, v in outs.items()}
        return outs[self.output_names[0]] if len(outs) == 1 else outs

    def ring(self, group=None, *, timeout=None, stats=False, **local_inputs):
        """Sequence-parallel ring attention over torch.distributed: this rank's query/key shards in, this
        rank's rows of every output out (see runtime/ring.py and docs/ring.md)."""
        return ring.ring(self, local_inputs, group=group, timeout=timeout, stats=stats)

    def decode(self, /, *args, splits=None, stats=False, cache_len=None, block_table=None, page_size=None,
               pack_heads=None, **inputs):
        """A decoding call against a KV cache: one launch split over the key axis (flash-decoding), the splits
        merged by log-sum-exp; splits None: the cost model's choice. A program with one dim for the query and
        key axes sees the queries as the last rows of the keys. cache_len: valid keys per batch index;
        block_table, page_size: a paged cache; pack_heads: GQA packing (runtime/decode.py, docs/inference.md)."""
        _no_positional(args, self.input_names, "k.decode")
        if pack_heads not in (None, True, False):
            raise InputError(f"k.decode: pack_heads is None, True or False, got {pack_heads!r}")
        res = decode.decode(self, inputs, splits=splits, stats=stats, cache_len=cache_len,
                            block_table=block_table, page_size=page_size, pack_heads=pack_heads)
        return (self._typed(res[0]), res[1]) if stats else self._typed(res)

    def varlen(self, /, cu_seqlens_q, cu_seqlens_k, *args, splits=None, stats=False, block_table=None,
               page_size=None, **inputs):
        """A packed batch of sequences (cumulative lengths, FlashAttention's varlen layout) in one launch, each
        sequence with its own local indices; block_table, page_size: the keys in a pool of pages
        (runtime/varlen.py, docs/inference.md)."""
        _no_positional(args, self.input_names, "k.varlen", "cu_seqlens_q, cu_seqlens_k, ")
        res = varlen.varlen(self, inputs, cu_seqlens_q, cu_seqlens_k, splits=splits, stats=stats,
                            block_table=block_table, page_size=page_size)
        return (self._typed(res[0]), res[1]) if stats else self._typed(res)

    # ---- source ---------------------------------------------------------------------------------------------
    def source(self, output: str | None = None, dtype: str = "float16", nbatch: int = 0,
               config: Config | None = None, store_lse: bool = False, dims: dict | None = None) -> str:
        """The generated Triton source of one output, for the schedule chosen at `dims` (default: head dims 64
        and every other dim 4096) or forced by compile(schedule=...); `config` the tiles (default 128 x 64)."""
        name = output or self.output_names[0]
        if self.planner.is_window(name):
            return self.launcher.window_runner(name).source(dtype, nbatch)
        sched = self.planner.schedule_for(name, dims or self.planner.reference_dims(name), dtype)
        cfg = config or Config(128, 64)
        if sched.kind != onf.SPLIT:
            return self.launcher.spec(name, dtype, nbatch, cfg, store_lse, sched).source
        roles = self.planner.kernels(name, sched)
        return "\n\n".join(f"# ---- kernel {i + 1} of {len(roles)} ({onf.label(sched)}): branch {k} in {onf.label(s)}"
                           + (f", stored as {sched.split.names[k]}" if role == "part" else ", with the epilogue")
                           + "\n" + self.launcher.spec(name, dtype, nbatch, cfg, False, s, role=role).source
                           for i, (role, k, _, s) in enumerate(roles))

    @property
    def triton_source(self) -> str:
        """The Triton source of every output (fp16, no batch axes, default GPU tiles)."""
        return "\n\n".join(self.source(n) for n in self.output_names)

    def explain(self) -> str:
        """IR with shapes, the DNF in MoA notation, the eliminated intermediates and the ONF schedule."""
        return explain.explain(self.planner)

    # ---- cost model, counters, AOT resources ----------------------------------------------------------------
    def cost(self, dtype="bf16", device="h100", ranks=None, interconnect="nvlink4", inputs=None, **dims):
        """Predicted CostReport from the ONF (no execution); no dims -> sympy formulas. ranks=P: the ring over P
        devices instead (RingCost: per-rank compute, bytes sent, whether transfers hide). inputs: the integer and
        boolean inputs a mask reads (name -> tensor), so that the tiles their per-tile summaries skip are counted
        as the kernel skips them."""
        if ranks is not None:
            return ring.ring_cost(self, ranks=ranks, interconnect=interconnect, dtype=dtype, device=device, **dims)
        return costing.cost(self, dtype=dtype, device=device, inputs=inputs, **dims)

    def measure(self, /, *args, **inputs):
        """Measurement: counters of a run in the instrumented Triton interpreter (CPU tensors)."""
        _no_positional(args, self.input_names)
        return measuring.measure(self, **inputs)

    def aot(self, target="sm_90", dtype="bf16", **dims):
        """The kernel a CUDA launch at these dims would run, compiled for a GPU target without a GPU, in the
        schedule and config the runtime fits (no spills, shared memory in budget): an AotReport (registers,
        spills, shared bytes, wgmma, ptx, cubin, schedule) for the tiled family, a FormAotReport (one AotReport
        per kernel) for the chunked linear form and the window-mixing kernel. Keywords: dims, plus `config=`,
        `output=`, `nbatch=`, `index_dtype=` (runtime/configs.aot)."""
        return configs.aot(self.planner, target=target, dtype=dtype, **dims)
