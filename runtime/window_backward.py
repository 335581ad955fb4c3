"""Launching the fused backward kernels of a window-mixing output (codegen/window_backward.py): the buffers (dO, the
per-row hop adjoints dH and mixed probabilities P2, dQ, dK, dV per batch x leading index), the two launches, and the
sums into the inputs' shapes (runtime/backward_run.py's, for inputs read by several heads).

In the interpreter both kernels take the forward's row tile (tiling.window_default, or INTERPRETER_BLOCKS); on a GPU
each kernel launches the first of CANDIDATES that compiles ahead of time for the device without spills and within
shared memory (runtime/aot.py), as the forward's kernels do."""
from __future__ import annotations

import math

import torch

from moa import symbolic as sy
from moa.codegen.window_backward import (KERNELS, WindowBackwardSpec, generate_window_backward,
                                         window_unfused_reason)

from . import cache
from .aot_batch import TRITON_TYPE, aot_groups, choose_fitting, cuda_target, divisible_args, kernel_signature
from .backward_run import BackwardRunner, call_setup
from .binding import Binding
from .device import cdiv, run
from .tiling import DTYPE_NAME, Config, window_default

INTERPRETER_BLOCKS = None   # (BLOCK_M, BLOCK_N) of interpreted launches; None: the forward's row tile
CANDIDATES = (Config(64, 64, 4, 2), Config(64, 64, 8, 2), Config(32, 32, 4, 2), Config(16, 16, 4, 2))


def is_window(planner) -> bool:
    """Whether the program's one output runs the window-mixing kernel (False when it has no schedule)."""
    if len(planner.output_names) != 1:
        return False
    try:
        return planner.is_window(planner.output_names[0])
    except Exception:  # noqa: BLE001 - no schedule at all: not a window program (BackwardRunner.reason says why)
        return False


class WindowBackwardRunner(BackwardRunner):
    """The fused backward of a window-mixing output."""

    @classmethod
    def reason(cls, planner) -> str | None:
        return window_unfused_reason(planner.cg_program, planner.schedules[planner.output_names[0]])

    def fused_names(self) -> tuple:
        return tuple(dict.fromkeys(r.name for r in self.spec("float32", 0).reads.values()))

    def spec(self, dtname: str, nbatch: int) -> WindowBackwardSpec:
        key = (dtname, nbatch)
        if key not in self._specs:
            self._specs[key] = generate_window_backward(self.planner.cg_program, self.sched, dtname, nbatch)
        return self._specs[key]

    @staticmethod
    def constexprs(spec: WindowBackwardSpec, dims: dict, cfg: Config) -> dict:
        ev = lambda x: int(sy.evaluate(x, dims))   # noqa: E731
        return {"BLOCK_M": cfg.block_m, "BLOCK_N": cfg.block_n, "HEAD_DIM": sy.tile_width(ev(spec.dot_extent)),
                "HEAD_DIM_V": sy.tile_width(ev(spec.col_extent)), "W_PAD": sy.tile_width(ev(spec.w_extent))}

    def grads(self, b: Binding, d_out: torch.Tensor) -> dict:
        """Codegen input name -> gradient (batch + the input's shape, accumulation dtype) of the Q, K and V reads
        for the cotangent d_out of the output. Needs neither the output nor a saved total: each row's softmax is
        recomputed from its W scores."""
        b, compute, acc, spec, ev = call_setup(self, b)
        n, d, e, w = ev(spec.row_extent), ev(spec.dot_extent), ev(spec.col_extent), ev(spec.w_extent)
        mk, mv = ev(spec.key_rows), ev(spec.value_rows)
        lead = [ev(x) for _, x in self.sched.lead]
        zl = math.prod(b.batch) * math.prod(lead)
        dev = b.device
        d_out = d_out.to(dev, compute).reshape(zl, n, e).contiguous()
        zeros = lambda rows, cols: torch.zeros(zl, rows, cols, dtype=acc, device=dev)   # noqa: E731
        bufs = {"dO": d_out, "dH": zeros(n, w), "P2": zeros(n, w), "dQ": zeros(n, d), "dK": zeros(mk, d),
                "dV": zeros(mv, e)}
        if zl and n:
            mod = cache.module_for(spec.source, dev)
            args = self._inputs(spec.inputs, b, compute)
            for x in ("dO", "dH", "P2", "dQ", "dK", "dV"):
                args += [bufs[x], *bufs[x].stride()]
            args += [b.dims[x] for x in spec.dims] + list(b.batch)
            for kern, rows in zip(KERNELS, (n, max(mk, mv))):
                cfg = self._config(spec, kern, b, compute)
                consts = self.constexprs(spec, b.dims, cfg)
                if dev.type == "cuda":
                    consts.update(num_warps=cfg.num_warps, num_stages=cfg.num_stages)
                tile = cfg.block_m if kern == KERNELS[0] else cfg.block_n
                run(getattr(mod, kern), (cdiv(rows, tile), zl), args, consts, dev, f"the backward kernel {kern}")
        res: dict = {}
        for role, buf in zip(("Q", "K", "V"), ("dQ", "dK", "dV")):
            read = spec.reads[role]
            g = self._to_input(read, bufs[buf], b, lead)
            res[read.name] = g if read.name not in res else res[read.name] + g
        return res

    def _config(self, spec, kern, b: Binding, compute) -> Config:
        """The tiles of one kernel's launch: the forward's row tile in the interpreter, on a GPU the first candidate
        that fits the device ahead of time (`choose`)."""
        if b.device.type != "cuda":
            if INTERPRETER_BLOCKS:
                return Config(*INTERPRETER_BLOCKS)
            bm = window_default(int(sy.evaluate(spec.row_extent, b.dims))).block_m
            return Config(bm, bm)
        key = (spec.source, tuple(sorted(self.constexprs(spec, b.dims, Config(16, 16)).items())))
        if key not in self._chosen:
            self._chosen[key] = choose(self.planner.cg_program, spec, DTYPE_NAME[compute], b.dims,
                                       cuda_target(b.device))
        return self._chosen[key][kern][0]


def request(program, spec: WindowBackwardSpec, kernel: str, dtype: str, dims: dict, cfg: Config, target: str,
            index_dtype: str = "int32") -> dict:
    """A picklable AOT request (runtime/aot_batch.py) for one backward kernel of a window schedule in one config."""
    path = cache.store(cache.key_of(spec.source, "aot-window-backward"), spec.source)
    consts = WindowBackwardRunner.constexprs(spec, dims, cfg)
    acc = "fp64" if dtype == "float64" else "fp32"
    special = {f"{x}_ptr": f"*{acc}" for x in ("dH", "P2", "dQ", "dK", "dV")}
    special["dO_ptr"] = f"*{TRITON_TYPE[dtype]}"
    sig = kernel_signature(program, spec.source, kernel, dtype, index_dtype, consts, special)
    return {"file": str(path), "kernel": kernel, "signature": sig, "constexprs": consts, "target": target,
            "num_warps": cfg.num_warps, "num_stages": cfg.num_stages, "block_m": cfg.block_m, "block_n": cfg.block_n,
            "divisible": divisible_args(None, program, sig, dims)}


def choose(program, spec: WindowBackwardSpec, dtype: str, dims: dict, target: str = "sm_90") -> dict:
    """Kernel name -> (Config, AotReport) of the first candidate that fits `target`, per kernel; an UnsupportedError
    naming every config tried when none does."""
    groups = [[request(program, spec, k, dtype, dims, c, target) for c in CANDIDATES] for k in KERNELS]
    results = aot_groups(groups, first_fit=True)
    return {k: choose_fitting(list(CANDIDATES[:len(res)]), res, target, f"the backward kernel {k}")
            for k, res in zip(KERNELS, results)}
