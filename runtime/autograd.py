"""moa kernels as PyTorch operators: `torch.library.custom_op` with `register_fake` (shapes) and `register_autograd`,
so that a call composes with autograd, `torch.library.opcheck` and `torch.compile(fullgraph=True)`.

Two operators serve every compiled program; the program is named by a string key (the Kernel's registry key):

    moa::attention(str kernel, Tensor[] inputs) -> Tensor[]            outputs, then saved values for the backward
    moa::attention_backward(str kernel, Tensor[] inputs, Tensor[] saved, Tensor[] cotangents) -> Tensor[]
                                                                        one gradient per float input

Their fake implementations compute shapes from the inputs' shapes alone (plain integer arithmetic on possibly
symbolic sizes; no sympy, nothing a tracer cannot follow), so Dynamo and AOTAutograd trace a model that calls moa
without a graph break. The backward runs runtime/backward.py: fused Triton kernels where the program has them, the
derived gradient DNF evaluated in float64 otherwise (runtime/grad_eval.py)."""
from __future__ import annotations

import itertools
import os
import threading
import weakref

import torch

from moa import ir
from moa import symbolic as sy
from moa.errors import InputError, UnsupportedError
from moa.exprfold import Backend, fold, lookup

from .backward import Backward
from .binding import compound_dims, refuse_functorch

_LOCK = threading.Lock()
_KERNELS = weakref.WeakValueDictionary()   # key -> Kernel (the entry goes when the Kernel does)
_COUNT = itertools.count()


def register(kernel) -> str:
    """Give a Kernel its operator key and its Backward (Kernel.__init__ calls this: a tracer then only reads the
    key, an attribute)."""
    with _LOCK:
        key = f"moa_{kernel.planner.key[:16]}_{next(_COUNT)}"
        kernel.op_key = key
        kernel.backward = Backward(kernel)
        _KERNELS[key] = kernel
    return key


def entry(key: str):
    """(Kernel, Backward) of an operator key."""
    k = _KERNELS.get(key)
    if k is None:
        raise InputError(f"no moa kernel is registered under {key!r} in this process (compile it with moa.compile "
                         f"and keep a reference to it)")
    return k, k.backward


# ---- shapes without sympy (fake tensors, symbolic sizes) ---------------------------------------------------


class _Sizes(Backend):
    """Index arithmetic on Python ints or torch SymInts (floor division, modulo, min / max)."""

    what = "shape inference"

    def __init__(self, env):
        self.env = env

    def symbol(self, s):
        return lookup(self.env, s)

    def div(self, num, den):
        return num // den

    def floordiv(self, a, b):
        return a // b

    def ceildiv(self, a, b):
        return -((-a) // b)

    def mod(self, a, b):
        return a % b

    def minimum(self, xs):
        return min(xs)

    def maximum(self, xs):
        return max(xs)


def call_shapes(program, tensors: list) -> tuple[dict, tuple]:
    """(dims, batch shape) of a call from its inputs' shapes only: every dim that is some input axis's whole
    extent; the batch is the broadcast of the inputs' leading axes."""
    dims, leads = {}, []
    for t, node in zip(tensors, program.inputs):
        r = node.rank
        if t.dim() < r:
            raise InputError(f"input {node.attrs[0]} must have at least {r} axes {sy.show_shape(node.shape)}, got "
                             f"shape {list(t.shape)}")
        leads.append(tuple(t.shape[:t.dim() - r]))
        for ax, ext in enumerate(node.shape):
            if ext.is_Symbol and ext.name not in dims:
                dims[ext.name] = t.shape[t.dim() - r + ax]
    if any(d.name not in dims for d in program.dims):   # a dim only in a compound extent (Qf[n, h * d])
        compound_dims(program, {node.attrs[0]: tuple(t.shape) for t, node in zip(tensors, program.inputs)}, dims)
    return dims, tuple(torch.broadcast_shapes(*leads)) if leads else ()


def output_shapes(program, tensors: list) -> list:
    dims, batch = call_shapes(program, tensors)
    return [(*batch, *(fold(x, _Sizes(dims)) for x in node.shape)) for _, node in program.outputs]


def _float_dtype(program, tensors):
    for t, node in zip(tensors, program.inputs):
        if node.dtype == ir.FLOAT:
            return t.dtype
    return torch.float64


# ---- the operators ------------------------------------------------------------------------------------------


@torch.library.custom_op("moa::attention", mutates_args=())
def attention(kernel: str, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
    """Every output of the kernel's program, then the values its backward saves (Backward.saved_spec)."""
    k, bw = entry(kernel)
    named = dict(zip(k.input_names, inputs))
    outs, saved = bw.forward(named)
    return [o.clone() if any(o is x for x in inputs) else o for o in outs] + saved


@attention.register_fake
def _attention_fake(kernel: str, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
    k, bw = entry(kernel)
    dt = _float_dtype(k.program, inputs)
    dev = inputs[0].device if inputs else torch.device("cpu")
    outs = [inputs[0].new_empty(s, dtype=dt, device=dev) for s in output_shapes(k.program, inputs)]
    dims, batch = call_shapes(k.program, inputs)
    saved = [inputs[0].new_empty((*batch, *(fold(x, _Sizes(dims)) for x in shape)), dtype=sdt, device=dev)
             for shape, sdt in bw.saved_spec(dt)]
    return outs + saved


@torch.library.custom_op("moa::attention_backward", mutates_args=())
def attention_backward(kernel: str, inputs: list[torch.Tensor], saved: list[torch.Tensor],
                       cotangents: list[torch.Tensor]) -> list[torch.Tensor]:
    """The gradient of every float input (shaped like the input, its dtype) for the outputs' cotangents."""
    k, bw = entry(kernel)
    return bw.backward(dict(zip(k.input_names, inputs)), saved, cotangents)


@attention_backward.register_fake
def _attention_backward_fake(kernel, inputs, saved, cotangents):
    k, _ = entry(kernel)
    return [torch.empty_like(t) for t, node in zip(inputs, k.program.inputs) if node.dtype == ir.FLOAT]


def _setup_context(ctx, inputs, output):
    kernel, tensors = inputs
    k, _ = entry(kernel)
    nout = len(k.output_names)
    ctx.kernel = kernel
    ctx.nin, ctx.nout = len(tensors), nout
    ctx.save_for_backward(*tensors, *output)   # the outputs (delta = rowsum(dO * O)), then the saved values


def _backward(ctx, grads):
    k, _ = entry(ctx.kernel)
    stored = ctx.saved_tensors
    tensors, saved = list(stored[:ctx.nin]), list(stored[ctx.nin:])
    outs = output_shapes(k.program, tensors)
    dt = _float_dtype(k.program, tensors)
    cot = [torch.zeros(s, dtype=dt, device=tensors[0].device) if g is None else g.contiguous()
           for g, s in zip(grads[:ctx.nout], outs)]
    d_lse = grads[ctx.nout] if len(grads) > ctx.nout else None
    if d_lse is not None and k.backward.runner is not None:   # with_lse's lse took part in the loss
        cot.append(d_lse.contiguous())
    got = iter(attention_backward(ctx.kernel, tensors, saved, cot))
    res = [next(got) if node.dtype == ir.FLOAT else None for node in k.program.inputs]
    return None, res


attention.register_autograd(_backward, setup_context=_setup_context)


def _no_double_backward(ctx, grads):
    raise UnsupportedError("gradients of moa's gradients (double backward, create_graph=True through the "
                           "backward) are not supported: the backward kernels have no derivative of their own")


attention_backward.register_autograd(_no_double_backward, setup_context=lambda ctx, inputs, output: None)


# ---- calls from Kernel.__call__ ---------------------------------------------------------------------------------


def _constant_to_tracers(fn):
    """torch.compiler.assume_constant_result(fn) without its side effect on the process: the first use imports
    torch._dynamo, which sets TORCHINDUCTOR_CACHE_DIR in os.environ; a moa call changes no environment variable."""
    had = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    try:
        return torch.compiler.assume_constant_result(fn)
    finally:
        if had is None:
            os.environ.pop("TORCHINDUCTOR_CACHE_DIR", None)


def wants_op(inputs: dict) -> bool:
    """A call goes through the operator when autograd needs its graph or a compiler is tracing it."""
    if torch.compiler.is_compiling():
        return True
    return torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad for t in inputs.values())


@_constant_to_tracers
def lse_refusal(kernel) -> str | None:
    """Why with_lse cannot run on this kernel (None: it can, differentiably where it has the fused backward). A
    constant to a tracer: decided on the program, never on tensors."""
    name = kernel.output_names[0]
    if len(kernel.output_names) == 1 and kernel.planner.is_window(name):
        return f"with_lse: output {name} runs in the window-mixing kernel, which keeps no log-sum-exp of its scores"
    if len(kernel.output_names) != 1 or not kernel.schedules[name].has_lse:
        return "with_lse needs a program with one output of the form softmax(S) @ V"
    return None


@_constant_to_tracers
def _lse_grad_refusal(kernel) -> str | None:
    if kernel.backward.runner is None:
        return ("with_lse differentiates only through the fused backward kernels, which this program does not have "
                f"({kernel.backward.unfused_reason or 'several branches'}); call k(...) for O's gradients, or "
                "with_lse under torch.no_grad()")
    return None


@_constant_to_tracers
def form_refusal(kernel) -> str | None:
    """Why a forced form='linear' cannot run (an output without a linear form), as a call without gradients says:
    a training call would otherwise run the quadratic kernels unasked."""
    if kernel.planner.form == "linear":
        for name in kernel.output_names:
            try:
                kernel.planner.choose_form(name, {})
            except UnsupportedError as e:
                return e.message
    return None


def call_with_lse(kernel, inputs: dict):
    """k.with_lse(**inputs) through the operator: (O, lse), both differentiable. The lse is the value the fused
    backward saves; its cotangent g enters the backward as delta - g (d lse_i / d s_ij = p_ij)."""
    why = _lse_grad_refusal(kernel) or form_refusal(kernel)
    if why is not None:
        raise UnsupportedError(why)
    outs = _op(kernel, inputs)
    return outs[0], outs[1]


def call(kernel, inputs: dict):
    """k(**inputs) through the operator: one output -> a tensor, several -> dict name -> tensor."""
    why = form_refusal(kernel)
    if why is not None:
        raise UnsupportedError(why)
    outs = _op(kernel, inputs)
    names = kernel.output_names
    return outs[0] if len(names) == 1 else dict(zip(names, outs[:len(names)]))


def _op(kernel, inputs: dict) -> list:
    """The moa::attention operator's outputs for a call (every output, then the values the backward saves)."""
    if not torch.compiler.is_compiling():
        refuse_functorch(inputs)
    missing = [n for n in kernel.input_names if n not in inputs]
    extra = [n for n in inputs if n not in kernel.input_names]
    if missing or extra:
        kernel.bind(inputs)   # raises the InputError naming what is missing or unknown
    return torch.ops.moa.attention(kernel.op_key, [inputs[n] for n in kernel.input_names])
