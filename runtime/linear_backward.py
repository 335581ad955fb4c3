"""Launching the chunked linear form's backward (codegen/chunked_backward.py): the training forward (the forward's
two kernels, _chunk_out also storing Z per row) and the four backward kernels, one module.

Which form a call that needs gradients runs is Planner.run_kind with the call's dims and training=True (`form=` when
forced, else the smaller predicted time of the forward plus the backward, moa/linear.py's form costs); the quadratic
fused backward
(runtime/backward_run.py) runs where it picks the quadratic form or where `linear_backward_reason` refuses. The saved
value is the same in both (Z per row, the accumulation dtype), so the operator's saved values do not depend on it.

The backward recomputes the forward's prefix states (_chunk_scan), then: dn = dO / Z and
dz = -delta / Z (torch, O(n e)), _bwd_scan (the suffix states), _bwd_dk, _bwd_dv and _bwd_dq. On
CUDA each call's config is the first LinearConfig candidate whose kernels compile for the device without spills and
within shared memory (runtime/aot.py, cached), chosen separately for the training forward and for the backward (the
backward recomputes the states in its own chunks, so only its kernels' chunks must agree); in the interpreter
chunk_config's, or INTERPRETER_CONFIG."""
from __future__ import annotations

import collections
import math

import torch

from moa import symbolic as sy
from moa.errors import UnsupportedError
from moa.codegen.chunked_backward import BACKWARD_KERNELS, generate_chunked_backward

from . import cache
from . import aot as A
from .aot_batch import TRITON_TYPE, aot_groups, cuda_target, divisible_args, kernel_signature
from .binding import Binding
from .device import check_device, run, sm_count
from .launch import compute_dtype
from .linear_cost import linear_launch_split
from .linear_run import LinearRunner
from .tiling import DTYPE_NAME, LinearConfig, chunk_config, linear_candidates

INTERPRETER_CONFIG = None   # a LinearConfig for interpreted launches (tests: 16- and 32-row chunks); None: chunk_config
_WHAT = "the chunked linear form's backward kernels"


class _TrainRunner(LinearRunner):
    """The forward's phases on the module that also holds the backward kernels (_chunk_out storing Z per row); the
    states in the accumulator dtype (the backward's dQ kernel reads them)."""

    STATE_16 = False

    def _spec(self, dtname: str, nbatch: int):
        key = ("train", dtname, nbatch)
        if key not in self._mods:
            self._mods[key] = generate_chunked_backward(self.program, self.lp, dtname, nbatch)
        return self._mods[key]

    def output_z(self, launch, zrow: torch.Tensor) -> torch.Tensor:
        out = launch.out
        run(launch.mod._chunk_out, (launch.T, launch.zl),
            [*launch.args, *launch.carry_args(), out, *out.stride(), zrow, *launch.tail],
            launch.flags(0, 1, 0), out.device, _WHAT)
        return launch.result()


class LinearBackward:
    """The chunked backward of one output of a Kernel; `launches` counts the backward kernels launched."""

    def __init__(self, planner, name: str, quadratic):
        self.planner, self.name, self.quadratic = planner, name, quadratic   # quadratic: its BackwardRunner
        self.lp = planner.linear_plans[name][0]
        self.train = _TrainRunner(planner.cg_program, self.lp)
        self.launches: collections.Counter = collections.Counter()
        self._chosen: dict = {}

    def fused_names(self) -> tuple:
        spec = self.spec("float32", 0)
        return tuple(dict.fromkeys([*(r.name for r in spec.reads.values()), *spec.scatters]))

    def spec(self, dtname: str, nbatch: int):
        return self.train._spec(dtname, nbatch)

    def _config(self, b: Binding, dtname: str, phase: str) -> LinearConfig:
        """The LinearConfig of a phase ("forward": the training forward's two kernels; "backward": the states
        recomputed and the four backward kernels, whose chunks must agree). On CUDA the fitted config with the
        scans' value axis split while that keeps their programs within the SMs (linear_cost.linear_launch_split:
        the split only shrinks the scans' tiles)."""
        n = int(sy.evaluate(self.lp.schedule.row[1], b.dims))
        if b.device.type != "cuda":
            if INTERPRETER_CONFIG is not None:
                return INTERPRETER_CONFIG
            chunk, block_f = chunk_config(b.device, n, self.lp.features(self._d(b.dims)))
            return LinearConfig(chunk, block_f)
        key = (phase, dtname, len(b.batch), tuple(sorted(b.dims.items())))
        if key not in self._chosen:
            self._chosen[key] = choose(self.planner.cg_program, self.lp, self.spec(dtname, len(b.batch)), dtname,
                                       b.dims, cuda_target(b.device), phase)[0]
        return linear_launch_split(self.lp, b.dims, b.batch, sm_count(b.device), self._chosen[key])

    def fits(self, b: Binding, phase: str) -> bool:
        """Whether a phase of a call has a config (always in the interpreter; on CUDA one that fits the device). A
        phase without one runs the quadratic kernels: the saved Z means the same in both forms."""
        b = self.planner.cg_binding(b)
        try:
            self._config(b, DTYPE_NAME[compute_dtype(b.dtype, b.device)], phase)
        except UnsupportedError:
            return False
        return True

    def _d(self, dims) -> int:
        return int(sy.evaluate(self.lp.branch.dot.extent, dims))

    def forward(self, b: Binding) -> tuple[torch.Tensor, torch.Tensor]:
        """(output in the call's dtype, Z per row [*batch, *lead, n] in the accumulation dtype)."""
        b = self.planner.cg_binding(b)
        check_device(b.device)
        compute = compute_dtype(b.dtype, b.device)
        acc = torch.float64 if compute == torch.float64 else torch.float32
        launch = self.train.prepare(b, compute, DTYPE_NAME[compute], self._config(b, DTYPE_NAME[compute], "forward"))
        zrow = torch.zeros(launch.shape[:-1], dtype=acc, device=b.device)
        if launch.empty:
            out = launch.result()
        else:
            self.train.scan(launch)
            out = self.train.output_z(launch, zrow)
        return (out if out.dtype == b.dtype else out.to(b.dtype)), zrow

    def grads(self, b: Binding, out: torch.Tensor, z: torch.Tensor, d_out: torch.Tensor) -> dict:
        """Codegen input name -> gradient (batch + the input's shape, accumulation dtype) of Q, K, V and the gates'
        reads, for the cotangent d_out of `out` (z: the forward's saved Z per row)."""
        b = self.planner.cg_binding(b)
        check_device(b.device)
        compute = compute_dtype(b.dtype, b.device)
        dtname = DTYPE_NAME[compute]
        acc = torch.float64 if compute == torch.float64 else torch.float32
        spec = self.spec(dtname, len(b.batch))
        s, dev = self.lp.schedule, b.device
        ev = lambda x: int(sy.evaluate(x, b.dims))   # noqa: E731
        n, e, d = ev(s.row[1]), ev(s.col[1]), self._d(b.dims)
        lead = [ev(x) for _, x in s.lead]
        zl = math.prod(b.batch) * math.prod(lead)
        bufs = {"dQ": torch.zeros(zl, n, d, dtype=acc, device=dev), "dK": torch.zeros(zl, n, d, dtype=acc, device=dev),
                "dV": torch.zeros(zl, n, e, dtype=acc, device=dev)}
        scat = {x: torch.zeros((*b.batch, *(ev(y) for y in self.planner.cg_program.input_map[x].shape)), dtype=acc,
                               device=dev) for x in spec.scatters}
        launch = self.train.prepare(b, compute, dtname, self._config(b, dtname, "backward"))
        if not launch.empty:
            self.train.scan(launch)   # the forward's prefix states, recomputed (not saved)
            d_out = d_out.to(dev, acc).reshape(zl, n, e)
            zr = z.to(dev, acc).reshape(zl, n)
            zinv = torch.where(zr == 0, torch.zeros_like(zr), 1.0 / torch.where(zr == 0, torch.ones_like(zr), zr))
            delta = (d_out * out.to(dev, acc).reshape(zl, n, e)).sum(-1)
            dn = (d_out * zinv[..., None]).contiguous()
            dz = (-delta * zinv).contiguous()
            S, zs = launch.buffers
            args = [*launch.args, *launch.carry_args(), dn, dz, torch.empty_like(S), torch.empty_like(zs),
                    bufs["dQ"], bufs["dK"], bufs["dV"]]
            for g in scat.values():
                args += [g, *g.stride()]
            args += launch.tail
            grids = {"_bwd_scan": launch.scan_grid()}
            grids.update({x: (launch.T, zl) for x in ("_bwd_dk", "_bwd_dv", "_bwd_dq")})
            for kern in BACKWARD_KERNELS:
                run(getattr(launch.mod, kern), grids[kern], args, launch.flags(0, 1, 0), dev, _WHAT)
                self.launches[kern] += 1
        res: dict = {}
        for role, buf in zip(("Q", "K", "V"), ("dQ", "dK", "dV")):
            read = spec.reads[role]
            g = self.quadratic._to_input(read, bufs[buf], b, lead)
            res[read.name] = g if read.name not in res else res[read.name] + g
        for x, g in scat.items():
            res[x] = g if x not in res else res[x] + g
        return res


PHASES = {"forward": ("_chunk_scan", "_chunk_out"),
          "backward": ("_chunk_scan", *BACKWARD_KERNELS)}


def choose(program, lp, spec, dtype: str, dims: dict, target: str = "sm_90", phase: str = "backward") -> tuple:
    """(LinearConfig, {kernel: AotReport}) of the first candidate (tiling.linear_candidates) whose kernels of a
    phase (PHASES) compile for `target` without spills, within shared memory; an UnsupportedError naming, per
    config, the first kernel that does not fit when none does."""
    n = int(sy.evaluate(lp.schedule.row[1], dims))
    d = int(sy.evaluate(lp.branch.dot.extent, dims))
    cands = linear_candidates(n)
    path = cache.store(cache.key_of(spec.source, "aot-linear-backward"), spec.source)
    acc = "fp64" if dtype == "float64" else "fp32"
    kernels = PHASES[phase]
    special = {f"{x}_ptr": f"*{acc}" for x in ("S", "zs", "fw", "S0", "z0", "g0", "dn", "dz", "U", "uz", "dQ", "dK",
                                                 "dV", "zrow", *(f"grad_{y}" for y in spec.scatters))}
    special.update({"fidx_ptr": "*i32", "out_ptr": f"*{TRITON_TYPE[dtype]}"})
    bundles = []
    for c in cands:   # a bundle: the phase's kernels in one config (aot_groups stops at its first misfit)
        hv = sy.tile_width(int(sy.evaluate(lp.schedule.col[1], dims)))
        consts = {"CHUNK": c.chunk, "BLOCK_F": c.block_f, "BLOCK_V": c.value_tile(hv),
                  "HEAD_DIM": sy.tile_width(d), "HEAD_DIM_V": hv, "INIT": 0, "PREFIX": 1, "FINAL": 0}
        bundle = []
        for k in kernels:
            kc = dict(consts)
            sig = kernel_signature(program, spec.source, k, dtype, "int32", kc, special)
            div = divisible_args(None, program, sig, dims, (lp.schedule.row[1], lp.schedule.col[1]))
            bundle.append({"file": str(path), "kernel": k, "signature": sig, "constexprs": kc, "target": target,
                           "num_warps": c.num_warps, "num_stages": c.num_stages, "block_m": None, "block_n": None,
                           "divisible": div})
        bundles.append(bundle)
    results = aot_groups([bundles], first_fit=True)[0]
    why = []
    for c, res in zip(cands, results):
        fit = [isinstance(r, A.AotReport) and A.fits(r, target)[0] for r in res]
        if len(res) == len(kernels) and all(fit):
            return c, dict(zip(kernels, res))
        why.append(f"{c.text()}: {next((k for k, f in zip(kernels, fit) if not f), kernels[len(res) - 1])}")
    raise UnsupportedError(f"no LinearConfig fits every kernel of the linear form's training {phase} "
                           f"on {target} (the first kernel that does not, per config: {'; '.join(why)})")
