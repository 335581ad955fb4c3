"""Launching the chunked-state (linear) form: two kernels over chunk states (codegen/chunked.py)."""
from __future__ import annotations

import math

import torch

from moa import ir
from moa import symbolic as sy
from moa.codegen.chunked import generate_chunked
from moa.errors import InputError
from moa.linear import LinearPlan, feature_table

from .binding import Binding
from .cache import module_for
from .device import cdiv, run, sm_count
from .form_configs import linear_runtime_config
from .linear_cost import linear_launch_split
from .tiling import DTYPE_NAME, LinearConfig, chunk_config, state_dtype

_WHAT = "the chunked linear-form kernels"
STATE_LIMIT = 1 << 31   # elements of the state buffers beyond which the linear form is refused


class LinearRunner:
    """Compiled chunked-form kernels of one output, cached per dtype and number of batch axes.

    The chunk states cross DRAM once each way (the scan writes them, the output kernel reads them): a bfloat16 call
    stores them in bfloat16 (tiling.state_dtype: half the linear form's main traffic, as flash-linear-attention's
    chunked kernels store theirs). STATE_16 = False keeps the accumulator dtype (the training forward: the backward
    reads the states)."""

    STATE_16 = True

    def __init__(self, program, lp: LinearPlan):
        self.program, self.lp = program, lp
        self._mods: dict = {}

    def _spec(self, dtname: str, nbatch: int):
        key = (dtname, nbatch)
        if key not in self._mods:
            self._mods[key] = generate_chunked(self.program, self.lp, dtname, nbatch)
        return self._mods[key]

    def source(self, dtname: str = "float32", nbatch: int = 0) -> str:
        return generate_chunked(self.program, self.lp, dtname, nbatch).source

    def launch_config(self, device: torch.device, dtname: str, nbatch: int, dims: dict, batch: tuple = (),
                      ring: bool = False):
        """The LinearConfig of a call (batch: its batch sizes): on CUDA, the first candidate whose two kernels,
        with every flag combination a launch uses (the ring's too; where none fits them all, a single-process
        call's own, ring=False), compile for the device's architecture with no spills and shared memory in budget
        (form_configs.linear_runtime_config: AOT-checked, cached on disk and in memory), its scan's value axis
        split while that keeps its programs within the SMs (linear_cost.linear_launch_split); on the CPU
        interpreter, chunk_config's."""
        if device.type == "cuda":
            cfg = linear_runtime_config(self.program, self.lp, dtname, dims, nbatch, device,
                                        self._spec(dtname, nbatch).source, single=not ring)
            return linear_launch_split(self.lp, dims, batch, sm_count(device), cfg)
        n = sy.evaluate(self.lp.schedule.row[1], dims)
        chunk, block_f = chunk_config(device, n, self.lp.features(sy.evaluate(self.lp.branch.dot.extent, dims)))
        return LinearConfig(chunk, block_f)

    def run(self, b: Binding, dt_compute: torch.dtype, dtname: str, config: LinearConfig | None = None) -> torch.Tensor:
        """The output of one call, in `config` (default: launch_config's)."""
        launch = self.prepare(b, dt_compute, dtname, config)
        if launch.empty:
            return launch.result()
        self.scan(launch)
        return self.output(launch)

    # the phases, for the ring (runtime/ring_linear.py): scan(final=True, prefix=False) gives the shard's total
    # state in launch.carried; the carried state of the ranks before; scan(init=True); output

    def state_dtype(self, dt_compute: torch.dtype, acc: torch.dtype) -> torch.dtype:
        """The dtype the chunk states are stored in (tiling.state_dtype; the accumulator's where not STATE_16)."""
        return getattr(torch, state_dtype(DTYPE_NAME[dt_compute])) if self.STATE_16 else acc

    def prepare(self, b: Binding, dt_compute: torch.dtype, dtname: str, config: LinearConfig | None = None) -> _Launch:
        """Buffers and arguments of one call (nothing is launched), in `config` (default: launch_config's)."""
        s, br = self.lp.schedule, self.lp.branch
        dims = b.dims
        n = sy.evaluate(s.row[1], dims)
        e = sy.evaluate(s.col[1], dims)
        d = sy.evaluate(br.dot.extent, dims)
        lead = [sy.evaluate(x, dims) for _, x in s.lead]
        zl = math.prod(b.batch) * math.prod(lead)
        out = torch.empty((zl, n, e), dtype=dt_compute, device=b.device)
        shape = (*b.batch, *lead, n, e)
        nfeat = self.lp.features(d)
        if out.numel() == 0:
            return _Launch(out, shape, (), {}, [], (), nfeat, 0, zl, e, None)
        cfg = config or self.launch_config(b.device, dtname, len(b.batch), dims, b.batch)
        chunk, block_f = cfg.chunk, cfg.block_f
        T = cdiv(n, chunk)
        hv = sy.tile_width(e)
        if zl * T * nfeat * (hv + 1) > STATE_LIMIT:
            raise InputError(f"the linear form's chunk states need {zl * T * nfeat * (hv + 1):,} elements "
                             f"(D = C({d} + {self.lp.p} - 1, {self.lp.p}) = {nfeat:,} features); use "
                             f"form='quadratic' or a smaller head dimension")
        acc = torch.float64 if dt_compute == torch.float64 else torch.float32
        sdt = self.state_dtype(dt_compute, acc)
        S = torch.empty((zl, T, nfeat, hv), dtype=sdt, device=b.device)
        zs = torch.empty((zl, T, nfeat), dtype=sdt, device=b.device)
        idx, w = feature_table(d, self.lp.p)
        fidx = torch.tensor(idx, dtype=torch.int32, device=b.device).reshape(-1)
        fw = torch.tensor(w, dtype=acc, device=b.device)
        spec = self._spec(dtname, len(b.batch))
        mod = module_for(spec.source, b.device)
        nb = len(b.batch)
        args = []
        for inp in spec.inputs:
            t = b.tensors[inp]
            node = self.program.input_map[inp]
            if node.dtype == ir.FLOAT and t.dtype != dt_compute:
                t = t.to(dt_compute)
            args += [t, *t.stride()[:nb], *t.stride()[nb:]]
        tail = [dims[dn] for dn in spec.dims] + list(b.batch)
        consts = dict(CHUNK=chunk, BLOCK_F=block_f, BLOCK_V=cfg.value_tile(hv), HEAD_DIM=sy.tile_width(d),
                      HEAD_DIM_V=hv)
        st = [S, zs, fidx, fw, nfeat, T]
        launch = _Launch(out, shape, args + st, consts, tail, mod, nfeat, T, zl, e, (S, zs), acc)
        if b.device.type == "cuda":
            launch.options = {"num_warps": cfg.num_warps, "num_stages": cfg.num_stages}
        return launch

    def scan(self, launch: _Launch, init: bool = False, prefix: bool = True, final: bool = False) -> None:
        """Kernel 1: every chunk's own state and their exclusive prefix over chunks (prefix), from
        launch.carried (init), writing the state after the last chunk to launch.carried (final)."""
        if init or final:
            launch.carry()
        run(launch.mod._chunk_scan, launch.scan_grid(), [*launch.args, *launch.carry_args(), *launch.tail],
            launch.flags(int(init), int(prefix), int(final)), launch.out.device, _WHAT)
        launch.init = init

    def output(self, launch: _Launch) -> torch.Tensor:
        """Kernel 2: O from the exclusive prefix states and the intra-chunk part."""
        out = launch.out
        run(launch.mod._chunk_out, (launch.T, launch.zl),
            [*launch.args, *launch.carry_args(), out, *out.stride(), *launch.tail],
            launch.flags(int(launch.init), 1, 0), out.device, _WHAT)
        return launch.result()


class _Launch:
    """Buffers and arguments of one call of the chunked form; `carried` = (S0 [Z, D, HEAD_DIM_V], z0 [Z, D],
    g0 [Z]) when a state is carried in or out (ring attention)."""

    def __init__(self, out, shape, args, consts, tail, mod, nfeat, T, zl, e, buffers, acc=torch.float32):
        self.out, self.shape, self.args, self.consts, self.tail, self.mod = out, shape, args, consts, tail, mod
        self.nfeat, self.T, self.zl, self.e, self.buffers, self.acc = nfeat, T, zl, e, buffers, acc
        self.carried = None
        self.init = False
        self.options: dict = {}   # launch options of every kernel (CUDA: num_warps, num_stages)

    @property
    def empty(self) -> bool:
        return self.buffers is None

    def scan_grid(self) -> tuple:
        """_chunk_scan's grid: (feature tiles, value tiles, batch x leading)."""
        c = self.consts
        return cdiv(self.nfeat, c["BLOCK_F"]), cdiv(c["HEAD_DIM_V"], c["BLOCK_V"]), self.zl

    def carry(self) -> tuple:
        """The carried state's buffers (zeros when first asked for)."""
        if self.carried is None:
            acc, dev = self.acc, self.out.device
            self.carried = (torch.zeros((self.zl, self.nfeat, self.consts["HEAD_DIM_V"]), dtype=acc, device=dev),
                            torch.zeros((self.zl, self.nfeat), dtype=acc, device=dev),
                            torch.zeros((self.zl,), dtype=acc, device=dev))
        return self.carried

    def carry_args(self) -> list:
        if self.carried is not None:
            return list(self.carried)
        # not read (INIT = FINAL = 0), but typed as the carried state is (the accumulator dtype), as AOT checks them
        spare = torch.empty(1, dtype=self.acc, device=self.out.device)
        return [spare, spare, spare]

    def flags(self, init: int, prefix: int, final: int) -> dict:
        return {**self.consts, "INIT": init, "PREFIX": prefix, "FINAL": final, **self.options}

    def result(self) -> torch.Tensor:
        return self.out.reshape(self.shape)
