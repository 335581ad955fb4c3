"""Launching the window-mixing kernel (codegen/window.py)."""
from __future__ import annotations

import math

import torch

from moa import ir
from moa import symbolic as sy
from moa.codegen.window import generate_window

from .binding import Binding
from .cache import module_for
from .device import cdiv, run
from .form_configs import window_runtime_config
from .tiling import window_default


class WindowRunner:
    def __init__(self, program, sched):
        self.program, self.sched = program, sched
        self._mods: dict = {}

    def _spec(self, dtname, nbatch):
        key = (dtname, nbatch)
        if key not in self._mods:
            self._mods[key] = generate_window(self.program, self.sched, dtname, nbatch)
        return self._mods[key]

    def source(self, dtname="float32", nbatch=0) -> str:
        return generate_window(self.program, self.sched, dtname, nbatch).source

    def launch_config(self, device: torch.device, dtname: str, nbatch: int, dims: dict):
        """The WindowConfig of a call: on CUDA, the first candidate that compiles for the device's architecture with
        no spills and shared memory in budget (form_configs.window_runtime_config: AOT-checked, cached on disk and
        in memory); on the CPU interpreter, BLOCK_M = min(64, next_pow2(n))."""
        if device.type == "cuda":
            return window_runtime_config(self.program, self.sched, dtname, dims, nbatch, device,
                                         self._spec(dtname, nbatch).source)
        return window_default(sy.evaluate(self.sched.row[1], dims))

    def run(self, b: Binding, dt_compute: torch.dtype, dtname: str) -> torch.Tensor:
        s = self.sched
        br = s.branches[0]
        dims = b.dims
        n = sy.evaluate(s.row[1], dims)
        e = sy.evaluate(s.col[1], dims)
        d = sy.evaluate(br.mix.kext, dims)
        w = max(sy.evaluate(br.mix.extent, dims), sy.evaluate(br.extent, dims))
        lead = [sy.evaluate(x, dims) for _, x in s.lead]
        zl = math.prod(b.batch) * math.prod(lead)
        out = torch.empty((zl, n, e), dtype=dt_compute, device=b.device)
        if out.numel() == 0:
            return out.reshape(*b.batch, *lead, n, e)
        spec = self._spec(dtname, len(b.batch))
        mod = module_for(spec.source, b.device)
        nb = len(b.batch)
        args = []
        for inp in spec.inputs:
            t = b.tensors[inp]
            if self.program.input_map[inp].dtype == ir.FLOAT and t.dtype != dt_compute:
                t = t.to(dt_compute)
            args += [t, *t.stride()[:nb], *t.stride()[nb:]]
        tail = [dims[dn] for dn in spec.dims] + list(b.batch)
        cfg = self.launch_config(b.device, dtname, nb, dims)
        block_m = cfg.block_m
        consts = dict(BLOCK_M=block_m, HEAD_DIM=sy.tile_width(d), HEAD_DIM_V=sy.tile_width(e),
                      W_PAD=sy.tile_width(w))
        if b.device.type == "cuda":
            consts.update(num_warps=cfg.num_warps, num_stages=cfg.num_stages)
        run(mod._attn_window, (cdiv(n, block_m), zl), [*args, out, *out.stride(), *tail], consts, b.device,
            "the window-mixing kernel")
        return out.reshape(*b.batch, *lead, n, e)
