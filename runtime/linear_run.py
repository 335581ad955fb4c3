"""Launching the chunked-state (linear) form: three kernels over chunk states (codegen/chunked.py)."""
from __future__ import annotations

import math

import torch

from moa import __version__
from moa import ir
from moa import symbolic as sy
from moa.errors import InputError, UnsupportedError
from moa.linear import LinearPlan, feature_table

from . import cache
from .binding import Binding
from .launch import cdiv, check_device, next_pow2, quiet, triton_module

STATE_LIMIT = 1 << 31   # elements of the state buffers beyond which the linear form is refused


def chunk_config(device: torch.device, n: int) -> tuple[int, int]:
    """(CHUNK, BLOCK_F): chunk rows and feature tile."""
    chunk = min(64, max(16, next_pow2(n)))
    return chunk, (256 if device.type == "cpu" else 64)


class LinearRunner:
    """Compiled chunked-form kernels of one output, cached per dtype and number of batch axes."""

    def __init__(self, program, lp: LinearPlan):
        self.program, self.lp = program, lp
        self._mods: dict = {}

    def _module(self, dtname: str, nbatch: int):
        from moa.codegen.chunked import generate_chunked

        key = (dtname, nbatch)
        if key not in self._mods:
            spec = generate_chunked(self.program, self.lp, dtname, nbatch)
            triton = triton_module()
            ckey = cache.key_of(spec.source, __version__, triton.__version__, torch.__version__)
            self._mods[key] = (cache.load_module(ckey, spec.source), spec)
        return self._mods[key]

    def source(self, dtname: str = "float32", nbatch: int = 0) -> str:
        from moa.codegen.chunked import generate_chunked

        return generate_chunked(self.program, self.lp, dtname, nbatch).source

    def run(self, b: Binding, dt_compute: torch.dtype, dtname: str) -> torch.Tensor:
        triton_module()
        check_device(b.device)
        s, br = self.lp.schedule, self.lp.branch
        dims = b.dims
        n = sy.evaluate(s.row[1], dims)
        e = sy.evaluate(s.col[1], dims)
        d = sy.evaluate(br.dot.extent, dims)
        lead = [sy.evaluate(x, dims) for _, x in s.lead]
        zl = math.prod(b.batch) * math.prod(lead)
        out = torch.empty((zl, n, e), dtype=dt_compute, device=b.device)
        if out.numel() == 0:
            return out.reshape(*b.batch, *lead, n, e)
        chunk, block_f = chunk_config(b.device, n)
        nfeat = self.lp.features(d)
        T = cdiv(n, chunk)
        hv = max(16, next_pow2(e))
        if zl * T * nfeat * (hv + 1) > STATE_LIMIT:
            raise InputError(f"the linear form's chunk states need {zl * T * nfeat * (hv + 1):,} elements "
                             f"(D = C({d} + {self.lp.p} - 1, {self.lp.p}) = {nfeat:,} features); use "
                             f"form='quadratic' or a smaller head dimension")
        acc = torch.float64 if dt_compute == torch.float64 else torch.float32
        S = torch.empty((zl, T, nfeat, hv), dtype=acc, device=b.device)
        zs = torch.empty((zl, T, nfeat), dtype=acc, device=b.device)
        idx, w = feature_table(d, self.lp.p)
        fidx = torch.tensor(idx, dtype=torch.int32, device=b.device).reshape(-1)
        fw = torch.tensor(w, dtype=acc, device=b.device)
        mod, spec = self._module(dtname, len(b.batch))
        nb = len(b.batch)
        args = []
        for inp in spec.inputs:
            t = b.tensors[inp]
            node = self.program.input_map[inp]
            if node.dtype == ir.FLOAT and t.dtype != dt_compute:
                t = t.to(dt_compute)
            args += [t, *t.stride()[:nb], *t.stride()[nb:]]
        tail = [dims[dn] for dn in spec.dims] + list(b.batch)
        consts = dict(CHUNK=chunk, BLOCK_F=block_f, HEAD_DIM=max(16, next_pow2(d)), HEAD_DIM_V=hv)
        st = [S, zs, fidx, fw, nfeat, T]
        nft = cdiv(nfeat, block_f)
        try:
            with quiet():
                mod._chunk_state[(T, nft, zl)](*args, *st, *tail, **consts)
                mod._chunk_scan[(nft, zl)](*args, *st, *tail, **consts)
                mod._chunk_out[(T, zl)](*args, *st, out, *out.stride(), *tail, **consts)
        except Exception as ex:
            raise UnsupportedError(f"the chunked linear-form kernels failed ({type(ex).__name__}: "
                                   f"{str(ex).splitlines()[0][:300] if str(ex) else ''})") from ex
        return out.reshape(*b.batch, *lead, n, e)
