"""Launching the fused backward kernels (codegen/backward.py) of a softmax-family output: the buffers (dO, lse,
delta = rowsum(dO * O), and dQ, dK, dV per batch x leading index), the two launches, and the sums that turn the
per-head gradients into the gradients of the inputs (a K read by every query head of its group: the heads' dK
added up)."""
from __future__ import annotations

import itertools
import math

import torch

from moa import symbolic as sy
from moa.codegen.backward import BackwardSpec, generate_backward
from moa.codegen.backward_shape import unfused_reason
from moa.pullback import outputs, pullback_grad, pulled_inputs

from . import backward_configs
from .aot_batch import cuda_target
from .binding import Binding
from .cache import module_for
from .device import check_device, run
from .grad_eval import _GradEval, gradients
from .launch import as_kernel_input, compute_dtype
from .summaries import summary_tensor
from .tiling import DTYPE_NAME, Config, choose_config

INTERPRETER_BLOCKS = None   # (BLOCK_M, BLOCK_N) for interpreted launches; None: the forward's choice (tests: 16)


def call_setup(runner, b: Binding) -> tuple:
    """(the binding in code-generation names, compute dtype, accumulation dtype, the runner's spec for them, an
    evaluator of extents at the call's dims) of a backward call; runner: has .planner and .spec(dtname, nbatch)."""
    b = runner.planner.cg_binding(b)
    check_device(b.device)
    compute = compute_dtype(b.dtype, b.device)
    acc = torch.float64 if compute == torch.float64 else torch.float32
    return b, compute, acc, runner.spec(DTYPE_NAME[compute], len(b.batch)), lambda x: int(sy.evaluate(x, b.dims))


class BackwardRunner:
    """The fused backward of one output of a Kernel (None from `for_kernel` when the output has none)."""

    def __init__(self, planner, name: str, sched=None):
        self.planner, self.name = planner, name
        self.sched = sched or planner.schedules[name]   # a branch of a several-branch output: its own schedule
        self._specs: dict = {}
        self._chosen: dict = {}   # (source, head dims) -> the configs chosen for a GPU
        self._pullback = None     # the gradient DNF through the pulled-back roles (moa/pullback.py)

    @classmethod
    def reason(cls, planner) -> str | None:
        """Why the program has no fused backward, or None."""
        if len(planner.output_names) != 1:
            return "several outputs"
        try:
            sched = planner.schedules[planner.output_names[0]]
        except Exception as ex:   # noqa: BLE001 - no tiled schedule at all: the reason is the error's text
            return str(ex)
        return unfused_reason(planner.cg_program, sched)

    def fused_names(self) -> tuple:
        """The inputs (codegen names) the kernels give gradients: the reads of Q, K, V, then the score's reads."""
        spec = self.spec("float32", 0)
        return tuple(dict.fromkeys([*(r.name for r in spec.reads.values() if r is not None), *spec.scatters,
                                    *pulled_inputs(outputs(self.sched, spec.pulled))]))

    def spec(self, dtname: str, nbatch: int) -> BackwardSpec:
        key = (dtname, nbatch)
        if key not in self._specs:
            self._specs[key] = generate_backward(self.planner.cg_program, self.sched, dtname, nbatch)
        return self._specs[key]

    def grads(self, b: Binding, out: torch.Tensor, lse: torch.Tensor, d_out: torch.Tensor,
              d_lse: torch.Tensor | None = None) -> dict:
        """Codegen input name -> gradient (batch + the input's shape, accumulation dtype) of the operands Q, K, V for
        the cotangent d_out of the output `out` (lse: the forward's saved log-sum-exp; d_lse: its cotangent, when
        the caller's loss used it: d lse_i / d s_ij = p_ij, so it enters as delta_i - d_lse_i)."""
        b, compute, acc, spec, ev = call_setup(self, b)
        n, m, d, e = ev(spec.row_extent), ev(spec.key_extent), ev(spec.dot_extent), ev(spec.col_extent)
        lead = [ev(x) for _, x in self.sched.lead]
        zl = math.prod(b.batch) * math.prod(lead)
        dev = b.device
        d_out = d_out.to(dev, compute).reshape(zl, n, e).contiguous()
        if self.sched.branches[0].kind == "sum":   # the kernels read neither delta nor a total
            delta = torch.zeros(zl, n, dtype=acc, device=dev)
        else:
            delta = (d_out.to(acc) * out.to(dev, acc).reshape(zl, n, e)).sum(-1)
        if d_lse is not None:
            delta = delta - d_lse.to(dev, acc).reshape(zl, n)
        delta = delta.contiguous()
        lse = lse.to(dev, acc).reshape(zl, n).contiguous()
        bufs = {"dQ": torch.zeros(zl, n, d, dtype=acc, device=dev), "dK": torch.zeros(zl, m, d, dtype=acc, device=dev),
                "dV": torch.zeros(zl, m, e, dtype=acc, device=dev)}
        scat = {x: torch.zeros((*b.batch, *(ev(y) for y in self.planner.cg_program.input_map[x].shape)), dtype=acc,
                               device=dev) for x in spec.scatters}
        vecs = {buf: torch.zeros(zl, n if side == "row" else m, dtype=acc, device=dev) for buf, side in spec.reductions}
        if zl and n and m:
            mod = module_for(spec.source, dev)
            for kern, outs in ((spec.kernels[0], ("dK", "dV")), (spec.kernels[1], ("dQ",))):
                cfg, consts = self._config(spec, kern, b, compute)
                grid = (math.ceil((m if kern is spec.kernels[0] else n) /
                                  (cfg.block_n if kern is spec.kernels[0] else cfg.block_m)), zl)
                args = self._inputs(kern.inputs, b, compute)
                for ts in spec.summaries:   # per-tile (min, max) of the mask's data, at this launch's tiles
                    st = summary_tensor(ts, b.tensors[ts.tensor], len(b.batch), cfg.block_m, cfg.block_n, b.dims)
                    args += [st, *st.stride()]
                args += [d_out, d_out.stride(0), d_out.stride(1), d_out.stride(2), lse, lse.stride(0),
                         delta, delta.stride(0)]
                for o in outs:
                    args += [bufs[o], *bufs[o].stride()]
                for buf, side in spec.reductions:   # the score's norms: the row ones in dQ's kernel, keys in dK/dV's
                    if (side == "row") == (kern is spec.kernels[1]):
                        args += [vecs[buf], *vecs[buf].stride()]
                if kern is spec.kernels[1]:
                    for x in spec.scatters:
                        args += [scat[x], *scat[x].stride()]
                args += [b.dims[x] for x in spec.dims] + list(b.batch)
                run(getattr(mod, kern.name), grid, args, consts, dev, f"the backward kernel {kern.name}")
        res: dict = {}
        for role, buf in zip(("Q", "K", "V"), ("dQ", "dK", "dV")):
            read = spec.reads[role]
            if read is not None:
                g = self._to_input(read, bufs[buf], b, lead)
                res[read.name] = g if read.name not in res else res[read.name] + g
        cots = [bufs[f"d{r}"] for r in spec.pulled] + [vecs[buf] for buf, _ in spec.reductions]
        got = self._pull(b, spec, cots, lead) if cots else {}
        for x, g in [*scat.items(), *got.items()]:
            res[x] = g if x not in res else res[x] + g
        return res

    def _pull(self, b: Binding, spec: BackwardSpec, cots: list, lead: list) -> dict:
        """Codegen input name -> gradient (float64, batch + the input's shape) through the pulled-back operand and
        value expressions and the score's reductions (moa/pullback.py `outputs`, in that order, as `cots`, the
        kernels' buffers): their gradient DNF evaluated for the buffers as cotangents, by torch where the tensors
        are (O(n d) work: no key axis; no copy to the host)."""
        outs = outputs(self.sched, spec.pulled)
        if self._pullback is None:
            self._pullback = pullback_grad(self.planner.cg_program, outs)
        gp = self._pullback
        extra = {gp.cotangents[o.name]: buf.reshape(*b.batch, *lead, *buf.shape[1:]) for o, buf in zip(outs, cots)}
        return gradients(_GradEval(self.planner.cg_program, b, extra), gp, b, set(pulled_inputs(outs)))

    def _config(self, spec, kern, b: Binding, compute) -> tuple:
        """(Config, constexprs) of one kernel's launch: in the interpreter the forward's few large tiles
        (tiling.choose_config) unless INTERPRETER_BLOCKS fixes them; on a GPU the first candidate that fits the
        device ahead of time (runtime/backward_configs.py)."""
        if b.device.type != "cuda":
            n, m = (int(sy.evaluate(x, b.dims)) for x in (spec.row_extent, spec.key_extent))
            cfg = Config(*INTERPRETER_BLOCKS) if INTERPRETER_BLOCKS else choose_config(b.device, "", n, m, 0)
            return cfg, backward_configs.constexprs(spec, b.dims, cfg)
        key = (spec.source, tuple(sorted(backward_configs.constexprs(spec, b.dims, Config(16, 16)).items())))
        if key not in self._chosen:
            self._chosen[key] = backward_configs.choose(self.planner.cg_program, spec, DTYPE_NAME[compute], b.dims,
                                                        cuda_target(b.device))
        cfg = self._chosen[key][kern.name][0]
        return cfg, {**backward_configs.constexprs(spec, b.dims, cfg), "num_warps": cfg.num_warps,
                     "num_stages": cfg.num_stages}

    def _inputs(self, names, b: Binding, compute) -> list:
        args = []
        nb = len(b.batch)
        for inp in names:
            t = as_kernel_input(b.tensors[inp], self.planner.cg_program.input_map[inp], compute)
            args += [t, *t.stride()[:nb], *t.stride()[nb:]]
        return args

    def _to_input(self, read, buf: torch.Tensor, b: Binding, lead: list) -> torch.Tensor:
        """The per-(batch, lead) gradient buffer summed into the input's shape: the lead point a adds to the input's
        leading index g(a) of the read X[g(a), row, col]."""
        node = self.planner.cg_program.input_map[read.name]
        ishape = [int(sy.evaluate(x, b.dims)) for x in node.shape]
        nb = math.prod(b.batch)
        rows, cols = buf.shape[1:]
        buf = buf.reshape(nb, math.prod(lead), rows, cols)
        head = [sp_index for sp_index in read.index[:-2]]
        lvars = [v for v, _ in self.sched.lead]
        if [str(h) for h in head] == [v.name for v in lvars] and ishape[:-2] == lead:
            return buf.reshape(*b.batch, *ishape)
        targets = []
        for point in itertools.product(*(range(x) for x in lead)):
            env = {**b.dims, **{v.name: a for v, a in zip(lvars, point)}}
            flat = 0
            for h, ext in zip(head, ishape[:-2]):
                flat = flat * ext + int(sy.evaluate(h, env))
            targets.append(flat)
        out = torch.zeros(nb, math.prod(ishape[:-2]), rows, cols, dtype=buf.dtype, device=buf.device)
        out.index_add_(1, torch.tensor(targets, device=buf.device), buf)
        return out.reshape(*b.batch, *ishape)

