"""The backward pass of a compiled program: what the forward saves, and how the gradients are computed.

The gradients are the derived gradient DNF (moa/grad.py). Programs of the softmax family with one plain branch have
fused backward kernels (codegen/backward.py, launched by runtime/backward_run.py): the forward then also stores the
log-sum-exp per row, and Q, K and V get their gradients from the kernels; window-mixing outputs have their own two
kernels (codegen/window_backward.py, runtime/window_backward.py; nothing saved). Every gradient the kernels do not
compute is the gradient DNF evaluated unfused in float64 (runtime/grad_eval.py)."""
from __future__ import annotations

import math

from functools import cached_property

import torch

from moa import ir
from moa.errors import InputError
from moa.grad import GradProgram, grad

from moa.codegen.backward_shape import is_multi
from moa.codegen.chunked_backward import linear_backward_reason

from . import backward_cost_all
from .backward_multi import MultiBranchBackward
from .backward_run import BackwardRunner
from .grad_eval import evaluate_grad
from .linear_backward import LinearBackward
from .plan import LINEAR
from .window_backward import WindowBackwardRunner, is_window


class Backward:
    """The backward of one Kernel."""

    def __init__(self, kernel):
        self.k = kernel

    @cached_property
    def grad_program(self) -> GradProgram:
        """The gradient DNF of every float input (moa/grad.py)."""
        return grad(self.k.program, self.k.dnf)

    @cached_property
    def unfused_reason(self) -> str | None:
        """None when the program has fused backward kernels, else why not."""
        if is_window(self.k.planner):
            return WindowBackwardRunner.reason(self.k.planner)
        return BackwardRunner.reason(self.k.planner)

    @cached_property
    def window(self) -> WindowBackwardRunner | None:
        """The fused kernels of a window-mixing output (codegen/window_backward.py; None otherwise)."""
        if self.unfused_reason or not is_window(self.k.planner):
            return None
        return WindowBackwardRunner(self.k.planner, self.k.output_names[0])

    @cached_property
    def runner(self) -> BackwardRunner | None:
        """The fused kernels of a single-branch output (None otherwise)."""
        if self.unfused_reason or self.window is not None or \
                is_multi(self.k.planner.schedules[self.k.output_names[0]]):
            return None
        return BackwardRunner(self.k.planner, self.k.output_names[0])

    @cached_property
    def linear(self) -> LinearBackward | None:
        """The chunked linear form's backward kernels (runtime/linear_backward.py) of an output that has the linear
        form and fused kernels; a call uses them when the training form choice picks the linear form (`uses_linear`)."""
        lp = self.k.planner.linear_plans[self.k.output_names[0]][0] if self.runner is not None else None
        if lp is None or linear_backward_reason(self.k.planner.cg_program, lp) is not None:
            return None
        return LinearBackward(self.k.planner, self.k.output_names[0], self.runner)

    def uses_linear(self, b, phase: str = "backward") -> bool:
        """Whether a call (binding b) runs the chunked form in a phase ("forward": storing Z, "backward"): the form
        a training call runs (Planner.run_kind with the call's dims and training=True: the form whose forward plus
        backward is predicted faster; `form=` when forced), where the chunked backward exists and, on CUDA, a config
        of the phase fits the device (else the quadratic kernels run: the saved Z is the same in both forms)."""
        return self.linear is not None and \
            self.k.planner.run_kind(self.k.output_names[0], b.dims, training=True,
                                    batch=math.prod(b.batch)) == LINEAR and \
            self.linear.fits(b, phase)

    @cached_property
    def multi(self) -> MultiBranchBackward | None:
        """The per-branch fused kernels of an output with several branches or an epilogue (None otherwise)."""
        if self.unfused_reason or self.runner is not None or self.window is not None:
            return None
        return MultiBranchBackward(self.k.planner, self.k.output_names[0])

    @property
    def fused_inputs(self) -> tuple:
        """The inputs whose gradients the fused kernels compute (user names); () without fused kernels."""
        fused = self.runner or self.multi or self.window
        if fused is None:
            return ()
        back = self.k.planner.codegen.inputs
        return tuple(back[x] for x in fused.fused_names())

    def cost(self, dims: dict, batch: tuple = (), dtype: str = "float32", inputs: dict | None = None, config=None,
             device: str = "cpu"):
        """The predicted work per kernel of the backward a call at these dims would run (runtime/backward_cost_all.py:
        fused, several branches, window, or the chunked linear form); `inputs`: the integer and boolean inputs whose
        per-tile summaries decide the tiles the kernels skip; device 'cpu' (the interpreter: bf16 computes in fp32)
        or 'cuda' (a GPU's kernels, in the call's dtype)."""
        missing = [d.name for d in self.k.program.dims if d.name not in dims]
        if missing:   # as moa cost names them (it was a raw KeyError)
            raise InputError(f"backward.cost needs every dim of {self.k.program.name}; missing {', '.join(missing)}")
        return backward_cost_all.cost(self, dims, batch, dtype, inputs, config, device)

    def saved_spec(self, dtype: torch.dtype) -> list:
        """(shape as extents, dtype) of each value the forward returns for the backward, after the outputs: the
        log-sum-exp per row (accumulation dtype) when the program has fused backward kernels."""
        if self.runner is None:
            return []
        acc = torch.float64 if dtype == torch.float64 else torch.float32
        return [(tuple(self.k.program.outputs[0][1].shape[:-1]), acc)]

    def forward(self, named: dict) -> tuple[list, list]:
        """(outputs, saved values) of a call, by the fused forward kernels."""
        k = self.k
        b = k.bind(named)
        if self.uses_linear(b, "forward"):
            out, z = self.linear.forward(b)
            return [out], [z]
        if self.runner is not None:
            out, lse = k.launcher.tiled(k.output_names[0], b, store_lse=True)
            return [out], [lse]
        return [k.launcher.output(n, b) for n in k.output_names], []

    def backward(self, named: dict, saved: list, cotangents: list) -> list:
        """The gradient of every float input, in input order, shaped and typed like the input. `saved`: the
        outputs, then the values saved_spec describes."""
        k = self.k
        b = k.bind(named)
        grads = {}
        if self.uses_linear(b):
            back = k.planner.codegen.inputs
            fused = self.linear.grads(b, saved[0], saved[1], cotangents[0])
            grads = {back[name]: g for name, g in fused.items()}
        elif self.runner is not None:
            back = k.planner.codegen.inputs
            d_lse = cotangents[1] if len(cotangents) > len(k.output_names) else None   # with_lse's lse
            fused = self.runner.grads(b, saved[0], saved[1], cotangents[0], d_lse)
            grads = {back[name]: g for name, g in fused.items()}
        elif self.window is not None:
            back = k.planner.codegen.inputs
            grads = {back[name]: g for name, g in self.window.grads(b, cotangents[0]).items()}
        elif self.multi is not None:
            back = k.planner.codegen.inputs
            fused = self.multi.grads(b, cotangents[0], k.launcher)
            grads = {back[name]: g for name, g in fused.items()}
            grads.update({n: torch.zeros(t.shape, dtype=torch.float64, device=t.device) for n, t in b.tensors.items()
                          if n not in grads and k.program.input_map[n].dtype == ir.FLOAT})
        rest = [n.attrs[0] for n in k.program.inputs if n.dtype == ir.FLOAT and n.attrs[0] not in grads]
        if rest:
            cot = dict(zip(k.output_names, (c.detach().cpu() for c in cotangents)))
            cpu = {n: t.detach().cpu() for n, t in b.tensors.items()}
            b_cpu = type(b)(b.dims, b.batch, b.dtype, torch.device("cpu"), cpu)
            grads.update(evaluate_grad(k.program, self.grad_program, binding=b_cpu, cotangents=cot, only=rest))
        out = []
        for node in k.program.inputs:
            if node.dtype != ir.FLOAT:
                continue
            name = node.attrs[0]
            t = named[name]
            g = torch.empty_like(t)   # the strides the fake implementation promises
            out.append(g.copy_(grads[name].sum_to_size(t.shape)))
        return out
