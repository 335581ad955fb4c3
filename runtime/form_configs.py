"""AOT-checked configs of the two kernel families beside the tiled kernel: the chunked linear form
(codegen/chunked.py: _chunk_scan, _chunk_out, launched by runtime/linear_run.py, and by the ring with
other INIT / PREFIX / FINAL flags) and the window-mixing kernel (codegen/window.py: _attn_window,
runtime/window_run.py).

As for the tiled kernel (runtime/configs.py fit_schedule): candidate configs in order, the runtime's default first;
the first whose every kernel compiles for the target with no spills and shared memory within the per-block limit
is launched; decisions are cached on disk and in memory; none fitting is an UnsupportedError naming every config
tried. A config of the linear form is checked with every flag combination a launch uses (LINEAR_LAUNCHES: the
single-process call and the ring's), so one config serves both; where none fits them all, a single-process call fits
its own two launches alone (the ring then says it does not fit)."""
from __future__ import annotations

import ast
import dataclasses
import hashlib
import warnings


from moa import symbolic as sy
from moa.devices import canonical_dtype
from moa.errors import InputError, UnsupportedError

from moa.codegen.chunked import generate_chunked
from moa.codegen.window import generate_window

from . import aot as A
from . import cache
from .aot_batch import (TRITON_TYPE, aot_groups, cuda_target, disk_path, divisible_args, kernel_signature, req_key,
                        load_choice, no_fit, save_choice, short_reason)
from .tiling import (LinearConfig, WindowConfig, linear_candidates, linear_default, rows_of, state_dtype,
                     window_candidates, window_default)

__all__ = ["LINEAR_LAUNCHES", "FormAotReport", "FormPlan", "LinearConfig", "WindowConfig", "aot_form",
           "choose_bundle", "fit_linear", "fit_window", "linear_candidates", "linear_plan", "linear_runtime_config",
           "window_candidates", "window_plan", "window_runtime_config"]


# (planner, INIT, PREFIX, FINAL) of every launch of the linear form: a single-process call (scan, output
# with 0, 1, 0), then the ring's other ones (runtime/ring_linear.py): the scan giving the rank's total (FINAL, with
# or without the prefix), the scan from the carried state (INIT) and the output after it (INIT)
LINEAR_LAUNCHES = (("_chunk_scan", 0, 1, 0), ("_chunk_out", 0, 1, 0),
                   ("_chunk_scan", 0, 1, 1), ("_chunk_scan", 0, 0, 1), ("_chunk_scan", 1, 1, 0),
                   ("_chunk_out", 1, 1, 0))
_FLAGS = ("INIT", "PREFIX", "FINAL")
_SINGLE = {"INIT": 0, "PREFIX": 1, "FINAL": 0}


def _names_in(source: str, fn: str) -> set:
    """The names kernel `fn` of `source` reads in its body."""
    node = next(f for f in ast.parse(source).body if isinstance(f, ast.FunctionDef) and f.name == fn)
    return {x.id for stmt in node.body for x in ast.walk(stmt) if isinstance(x, ast.Name)}


# the order a bundle compiles them in (indices into LINEAR_LAUNCHES): the likeliest to spill first (the ring's scan
# with PREFIX and FINAL, the output kernel), so that a config that does not fit stops early; SINGLE_ORDER: the
# single-process call's two launches alone
_COMPILE_ORDER = (2, 1, 5, 3, 4, 0)
SINGLE_ORDER = (1, 0)


def _relabel(form: str, res: list, order: tuple = _COMPILE_ORDER) -> list:
    """A complete bundle's reports (compile order) in launch order, each with its launch's own flags in
    .constants (a kernel that does not read a flag was compiled once, with the single-process value)."""
    if form != "linear":
        return list(res)
    out = {}
    for rep, k in zip(res, order):
        if isinstance(rep, A.AotReport):
            consts = dict(rep.constants)
            consts.update(zip(_FLAGS, LINEAR_LAUNCHES[k][1:]))
            rep = dataclasses.replace(rep, constants=tuple(consts.items()))
        out[k] = rep
    return [out[k] for k in sorted(out)]


def launch_label(rep: A.AotReport) -> str:
    """A kernel's name with its flags (INIT / PREFIX / FINAL of the linear form), e.g. `_chunk_scan 0,1,1`."""
    flags = [rep.constant(f) for f in _FLAGS]
    if any(f is None for f in flags):
        return rep.name
    return f"{rep.name} {','.join(str(f) for f in flags)}{'' if tuple(flags) == (0, 1, 0) else ' (ring)'}"


@dataclasses.dataclass(frozen=True)
class FormAotReport:
    """AOT resources of every kernel one config of the linear or window form launches (`kernels`: an AotReport
    per kernel and flag combination, its constexprs in .constants). The aggregate properties are the worst over
    the kernels (spills: the sum)."""
    form: str            # "linear" or "window"
    target: str
    config: LinearConfig | WindowConfig
    kernels: tuple
    output: str = ""

    @property
    def registers(self) -> int:
        return max(k.registers for k in self.kernels)

    @property
    def spills(self) -> int:
        return sum(k.spills for k in self.kernels)

    @property
    def shared_bytes(self) -> int:
        return max(k.shared_bytes for k in self.kernels)

    @property
    def uses_wgmma(self) -> bool:
        return any(k.uses_wgmma for k in self.kernels)

    @property
    def num_warps(self) -> int:
        return self.config.num_warps

    @property
    def num_stages(self) -> int:
        return self.config.num_stages

    @property
    def schedule(self) -> str:
        return f"{self.form} form"

    def kernel(self, name: str, init: int = 0, prefix: int = 1, final: int = 0) -> A.AotReport:
        """The report of kernel `name` (with those flags, for the linear form)."""
        for k in self.kernels:
            if k.name == name and (k.constant("INIT") is None
                                   or (k.constant("INIT"), k.constant("PREFIX"), k.constant("FINAL"))
                                   == (init, prefix, final)):
                return k
        raise KeyError(name)

    def fits(self, target: str | None = None) -> tuple[bool, str]:
        """(ok, reason) as runtime.aot.fits: ok when every kernel fits; the reason names those that do not."""
        bad = []
        for k in self.kernels:
            ok, why = A.fits(k, target or self.target)
            if not ok:
                bad.append(f"{launch_label(k)}: {why}")
        return (not bad, "; ".join(bad) if bad else "ok")

    def rows(self) -> list:
        """One line per kernel: name, flags, registers, spills, shared bytes, wgmma."""
        return [f"{launch_label(k):34s} {k.registers:4d} regs  {k.spills:5d} B spills  {k.shared_bytes:7d} B shared"
                f"  wgmma {'yes' if k.uses_wgmma else 'no'}" for k in self.kernels]

    def summary(self) -> str:
        head = (f"{self.output + ': ' if self.output else ''}{self.form} form on {self.target} "
                f"({self.config.text()})")
        return "\n".join([head] + ["  " + r for r in self.rows()])


# ---- requests ------------------------------------------------------------------------------------------------

def _acc_ptr(dtype: str) -> str:
    return "*fp64" if dtype == "float64" else "*fp32"


def _store(source: str) -> str:
    return str(cache.store(cache.key_of(source, "aot"), source))


def linear_extents(lp, dims: dict) -> tuple:
    """(n, d, e) of a LinearPlan at dims: rows, contraction (feature) extent, value columns."""
    s = lp.schedule
    return sy.evaluate(s.row[1], dims), sy.evaluate(lp.branch.dot.extent, dims), sy.evaluate(s.col[1], dims)


def linear_requests(program, lp, dtype: str, dims: dict, cfg: LinearConfig, target: str = "sm_90",
                    nbatch: int = 0, index_dtype: str = "int64", order: tuple = _COMPILE_ORDER) -> list:
    """AOT requests (a bundle) of the launches of the linear form with `cfg` in `order` (default every launch, in
    _COMPILE_ORDER; SINGLE_ORDER: a single-process call's): the kernels generated as runtime/linear_run.py
    generates them, with its constexprs."""
    dtype = canonical_dtype(dtype)
    spec = generate_chunked(program, lp, dtype, nbatch)
    path = _store(spec.source)
    _, d, e = linear_extents(lp, dims)
    acc = _acc_ptr(dtype)
    state = f"*{TRITON_TYPE[state_dtype(dtype)]}"   # the stored states
    special = {"S_ptr": state, "zs_ptr": state, "fw_ptr": acc, "S0_ptr": acc, "z0_ptr": acc, "g0_ptr": acc,
               "fidx_ptr": "*i32"}
    hv = sy.tile_width(e)
    base = {"CHUNK": cfg.chunk, "BLOCK_F": cfg.block_f, "BLOCK_V": cfg.value_tile(hv),
            "HEAD_DIM": sy.tile_width(d), "HEAD_DIM_V": hv}
    out = []
    for fn, *flags in (LINEAR_LAUNCHES[k] for k in order):
        # a flag the kernel does not read is given its single-process value: the same kernel, compiled once
        used = _names_in(spec.source, fn)
        cx = {**base, **{f: v if f in used else _SINGLE[f] for f, v in zip(_FLAGS, flags)}}
        sig = kernel_signature(program, spec.source, fn, dtype, index_dtype, cx, special)
        div = divisible_args(None, program, sig, dims, (lp.schedule.row[1], lp.schedule.col[1]))
        out.append({"file": path, "kernel": fn, "signature": sig, "constexprs": cx, "target": target,
                    "num_warps": cfg.num_warps, "num_stages": cfg.num_stages, "block_m": None, "block_n": None,
                    "divisible": div})
    return out


def window_extents(sched, dims: dict) -> tuple:
    """(n, d, e, w) of a window schedule at dims: rows, key width, value columns, window slots."""
    br = sched.branches[0]
    w = max(sy.evaluate(br.mix.extent, dims), sy.evaluate(br.extent, dims))
    return (sy.evaluate(sched.row[1], dims), sy.evaluate(br.mix.kext, dims), sy.evaluate(sched.col[1], dims), w)


def window_requests(program, sched, dtype: str, dims: dict, cfg: WindowConfig, target: str = "sm_90",
                    nbatch: int = 0, index_dtype: str = "int64") -> list:
    """The AOT request of the window-mixing kernel with `cfg` (a one-kernel bundle), generated and specialised
    as runtime/window_run.py launches it."""
    dtype = canonical_dtype(dtype)
    spec = generate_window(program, sched, dtype, nbatch)
    _, d, e, w = window_extents(sched, dims)
    cx = {"BLOCK_M": cfg.block_m, "HEAD_DIM": sy.tile_width(d), "HEAD_DIM_V": sy.tile_width(e),
          "W_PAD": sy.tile_width(w)}
    sig = kernel_signature(program, spec.source, "_attn_window", dtype, index_dtype, cx)
    div = divisible_args(None, program, sig, dims, (sched.row[1], sched.col[1]))
    return [{"file": _store(spec.source), "kernel": "_attn_window", "signature": sig, "constexprs": cx,
             "target": target, "num_warps": cfg.num_warps, "num_stages": cfg.num_stages, "block_m": cfg.block_m,
             "block_n": None, "divisible": div}]


# ---- the fit -------------------------------------------------------------------------------------------------

def choose_bundle(form: str, cands: list, results: list, target: str, what: str,
                  order: tuple = _COMPILE_ORDER) -> tuple:
    """(index, FormAotReport) of the first candidate whose every kernel fits (`results`: per candidate, the
    bundle's results from aot_groups; `order`: the linear form's launches in a bundle); UnsupportedError naming
    every config tried and why otherwise."""
    reasons = []
    for k, (cfg, res) in enumerate(zip(cands, results)):
        errors = [x for x in res if isinstance(x, tuple)]
        if errors:
            reasons.append(f"{cfg.text()}: {short_reason(errors[0][1])}")
            continue
        bad = [f"{launch_label(x)}: {why}" for x in res for ok, why in [A.fits(x, target)] if not ok]
        if not bad and len(res) == (len(order) if form == "linear" else 1):
            return k, FormAotReport(form, target, cfg, tuple(_relabel(form, res, order)))
        reasons.append(f"{cfg.text()}: {'; '.join(bad) or 'not compiled'}")
    raise UnsupportedError(f"{what} does not fit on {target}: every {form}-form config spills, exceeds shared "
                           f"memory or fails to compile ({'; '.join(reasons)})")


def _what(program, name, dtype, dims) -> str:
    dims_text = ", ".join(f"{k}={v}" for k, v in dims.items())
    return f"output {name} of {program.name} ({canonical_dtype(dtype)}, {dims_text})"


@dataclasses.dataclass(frozen=True)
class FormPlan:
    """A config search of the linear or window form: candidates in order, the AOT bundle of each (compile
    `bundles` as one group of configs.aot_groups(first_fit=True), then choose)."""
    form: str
    cands: list
    bundles: list
    target: str
    what: str
    output: str
    order: tuple = _COMPILE_ORDER   # the linear form's launches in a bundle

    def choose(self, results: list) -> tuple:
        """(config, FormAotReport) of the first candidate that fits (see choose_bundle)."""
        k, rep = choose_bundle(self.form, self.cands, results, self.target, self.what, self.order)
        return self.cands[k], dataclasses.replace(rep, output=self.output)

    @property
    def key(self) -> str:
        keys = "".join(req_key(r) for b in self.bundles for r in b)
        return hashlib.sha256(f"form:{self.form}:{self.order}:{keys}".encode()).hexdigest()[:32]


def linear_plan(program, lp, dtype: str, dims: dict, target: str = "sm_90", nbatch: int = 0,
                index_dtype: str = "int64", single: bool = False) -> FormPlan:
    """The config search of the linear form of `lp` (a LinearPlan of `program`, the code-generation view): every
    launch, the ring's included; single=True: a single-process call's two launches alone."""
    order = SINGLE_ORDER if single else _COMPILE_ORDER
    cands = linear_candidates(linear_extents(lp, dims)[0])
    bundles = [linear_requests(program, lp, dtype, dims, c, target, nbatch, index_dtype, order) for c in cands]
    what = _what(program, lp.schedule.output, dtype, dims) + (" (a single-process call)" if single else "")
    return FormPlan("linear", cands, bundles, target, what, lp.schedule.output, order)


def window_plan(program, sched, dtype: str, dims: dict, target: str = "sm_90", nbatch: int = 0,
                index_dtype: str = "int64") -> FormPlan:
    """The config search of the window-mixing kernel of `sched`."""
    cands = window_candidates(window_extents(sched, dims)[0])
    bundles = [window_requests(program, sched, dtype, dims, c, target, nbatch, index_dtype) for c in cands]
    return FormPlan("window", cands, bundles, target, _what(program, sched.output, dtype, dims), sched.output)


def _fit(plan: FormPlan) -> tuple:
    """(config, FormAotReport or None): the first candidate whose bundle fits; the choice cached on disk (the
    report is None when it came from there) and the compiles in memory (configs.aot_groups)."""
    path = disk_path(plan.key)
    try:
        return plan.cands[load_choice(path, len(plan.cands))], None
    except (OSError, ValueError, KeyError, IndexError, TypeError):
        pass
    results = aot_groups([plan.bundles], first_fit=True)[0]
    cfg, rep = plan.choose(results)
    save_choice(path, plan.cands.index(cfg))
    return cfg, rep


def fit_linear(program, lp, dtype: str, dims: dict, target: str = "sm_90", nbatch: int = 0,
               index_dtype: str = "int64", single: bool = False) -> tuple:
    """(LinearConfig, FormAotReport or None) of the linear form of `lp` on `target`: the first of
    linear_candidates whose kernels, with every flag combination of LINEAR_LAUNCHES, compile with no spills and
    shared memory in budget. single=True: a single-process call's config, the one every launch fits where one
    does, else the first its own two launches fit. Raises UnsupportedError naming every config tried when none
    fits."""
    if not single:
        return _fit(linear_plan(program, lp, dtype, dims, target, nbatch, index_dtype))
    return _fit_call(program, lp, dtype, dims, target, nbatch, index_dtype)[:2]


def _fit_call(program, lp, dtype: str, dims: dict, target: str, nbatch: int, index_dtype: str) -> tuple:
    """(config, FormAotReport or None, launch order) of fit_linear(single=True)."""
    try:
        return (*_fit(linear_plan(program, lp, dtype, dims, target, nbatch, index_dtype)), _COMPILE_ORDER)
    except UnsupportedError as e:
        if not no_fit(e):
            raise
    return (*_fit(linear_plan(program, lp, dtype, dims, target, nbatch, index_dtype, single=True)), SINGLE_ORDER)


def fit_window(program, sched, dtype: str, dims: dict, target: str = "sm_90", nbatch: int = 0,
               index_dtype: str = "int64") -> tuple:
    """(WindowConfig, FormAotReport or None) of the window-mixing kernel of `sched` on `target` (see
    fit_linear)."""
    return _fit(window_plan(program, sched, dtype, dims, target, nbatch, index_dtype))


# ---- the CUDA runtime's configs ------------------------------------------------------------------------------

_RUNTIME: dict = {}   # (form, target, kernel source digest, constexprs ...) -> config


def _runtime(form: str, fit, default, key) -> LinearConfig | WindowConfig:
    """fit()'s config, memoised per process; the default with a warning when the AOT check itself cannot run
    (no ptxas, the compile process failed ...). A search that ran and found nothing raises (every time: the
    failure is memoised too)."""
    if key in _RUNTIME:
        if isinstance(_RUNTIME[key], UnsupportedError):
            raise _RUNTIME[key]
        return _RUNTIME[key]
    try:
        cfg = fit()[0]
    except UnsupportedError as e:
        if no_fit(e):
            _RUNTIME[key] = e
            raise
        warnings.warn(f"moa: AOT config check unavailable ({e.message[:200]}); using the default {form}-form "
                      "config", RuntimeWarning, stacklevel=4)
        cfg = default
    _RUNTIME[key] = cfg
    return cfg


def linear_runtime_config(program, lp, dtype: str, dims: dict, nbatch: int, device,
                          source: str | None = None, single: bool = True) -> LinearConfig:
    """The LinearConfig runtime/linear_run.py launches on a CUDA device: fit_linear for the device's
    architecture (single: for a single-process call; False: the ring's, every launch), memoised per process by
    kernel source (`source`: the runner's, else generated) and constexprs (the ring builds a runner per call). If
    the AOT check itself cannot run, the default config is used with a warning."""
    target = cuda_target(device)
    n, d, e = linear_extents(lp, dims)
    src = cache.key_of(source or generate_chunked(program, lp, canonical_dtype(dtype), nbatch).source)
    key = ("linear", target, src, rows_of(n), sy.tile_width(d), sy.tile_width(e), single)
    return _runtime("linear", lambda: fit_linear(program, lp, dtype, dims, target, nbatch, single=single),
                    linear_default(n), key)


def window_runtime_config(program, sched, dtype: str, dims: dict, nbatch: int, device,
                          source: str | None = None) -> WindowConfig:
    """The WindowConfig runtime/window_run.py launches on a CUDA device (see linear_runtime_config)."""
    target = cuda_target(device)
    n, d, e, w = window_extents(sched, dims)
    src = cache.key_of(source or generate_window(program, sched, canonical_dtype(dtype), nbatch).source)
    key = ("window", target, src, rows_of(n), sy.tile_width(d), sy.tile_width(e), sy.tile_width(w))
    return _runtime("window", lambda: fit_window(program, sched, dtype, dims, target, nbatch), window_default(n),
                    key)


# ---- Kernel.aot for these forms -------------------------------------------------------------------------------

def form_of(planner, name: str, dims: dict) -> str:
    """The kernel family a call of output `name` runs at dims: "window", "linear" (Kernel.choose_form, as
    Kernel.__call__ asks it) or "tiled"."""
    if planner.is_window(name):
        return "window"
    return "linear" if planner.choose_form(name, dims) == "linear" else "tiled"


def window_dims(planner, name: str, dims: dict) -> dict:
    """Dims for the window kernel's AOT: its key width and value columns are required, rows default to 4096."""
    sched = planner.schedules[name]
    br = sched.branches[0]
    need = set()
    for x in (sched.col[1], br.mix.kext, br.mix.extent, br.extent):
        need |= sy.free_names(x)
    out = dict(dims)
    for dm in planner.program.dims:
        if dm.name not in need:
            out.setdefault(dm.name, 4096)
    missing = sorted(need - set(out))
    if missing:
        raise InputError(f"aot needs the head dims {', '.join(missing)} (e.g. --dims "
                         f"{','.join(f'{x}=128' for x in missing)})")
    return out


def aot_form(planner, name: str, form: str, target: str, dtype: str, config, nbatch: int, index_dtype: str,
             dims: dict) -> FormAotReport:
    """FormAotReport of output `name` in `form` ("linear" or "window"): the fitted config, or `config` (a
    LinearConfig / WindowConfig, or a tiled Config read as CHUNK = BLOCK_M, BLOCK_F = BLOCK_N / BLOCK_M) compiled
    whether it fits or not."""
    prog = planner.cg_program
    if form == "linear":
        lp = planner.linear_plans[name][0]
        order = _COMPILE_ORDER
        if config is None:   # a single-process call's config: every launch where one fits them all
            cfg, rep, order = _fit_call(prog, lp, dtype, dims, target, nbatch, index_dtype)
            if rep is not None:
                return rep
        else:
            cfg = config if isinstance(config, LinearConfig) else \
                LinearConfig(config.block_m, config.block_n, config.num_warps, config.num_stages)
        reqs = linear_requests(prog, lp, dtype, dims, cfg, target, nbatch, index_dtype, order)
    else:
        sched = planner.schedules[name]
        if config is None:
            cfg, rep = fit_window(prog, sched, dtype, dims, target, nbatch, index_dtype)
            if rep is not None:
                return rep
        else:
            cfg = config if isinstance(config, WindowConfig) else \
                WindowConfig(config.block_m, config.num_warps, config.num_stages)
        reqs = window_requests(prog, sched, dtype, dims, cfg, target, nbatch, index_dtype)
    res = aot_groups([[reqs]])[0][0]
    errors = [x for x in res if isinstance(x, tuple)]
    if errors:
        raise UnsupportedError(errors[0][1])
    return FormAotReport(form, target, cfg, tuple(_relabel(form, res, order if form == "linear" else ())), name)
