"""The integer and boolean inputs given to the cost models (cost, backward.cost, decode_cost, varlen_cost): checked as a
call checks them, renamed to code generation's names, counted at their own integer widths, and laid out over the
call's batch axes (the data per-tile summaries are computed from)."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import torch

from moa import ir
from moa import symbolic as sy
from moa.errors import InputError

from .binding import check_reads


def codegen_names(planner, dims: dict, inputs: dict | None) -> tuple[dict, dict | None]:
    """dims and inputs in the names code generation sees (the planner's schedules and the generated kernels use
    them: user names are replaced where their renamed forms could collide, codegen/names.py)."""
    cg = planner.codegen
    dims = {c: dims[u] for c, u in cg.dims.items()}
    if inputs:
        user = {u: c for c, u in cg.inputs.items()}
        nodes = planner.program.input_map
        for name in inputs:
            node = nodes.get(name)
            if node is None or node.dtype == ir.FLOAT:
                kind = "not an input" if node is None else "a float input"
                ints = ", ".join(n for n, v in nodes.items() if v.dtype != ir.FLOAT)
                raise InputError(f"cost(inputs=...): {name!r} is {kind}; the cost model reads the integer and "
                                 "boolean inputs of masks " + (f"({ints})" if ints else
                                                               "(this program has none: leave inputs= out)"))
        inputs = {user[n]: x for n, x in inputs.items()}
    return dims, inputs


def check_data(program, inputs, who: str) -> None:
    """A cost model's inputs= checked as a call checks the tensors: a dict of the integer and boolean inputs a mask
    reads, with values (not on the meta device), of an integer dtype (a flag may be bool or integer)."""
    if inputs is None:
        return
    if not isinstance(inputs, dict):
        raise InputError(f"{who}: inputs= takes a dict of input name -> tensor, got {type(inputs).__name__}")
    for name, x in inputs.items():
        node = program.input_map.get(name)
        if node is None or node.dtype == ir.FLOAT:
            continue   # named in the error of the names' check
        if isinstance(x, torch.Tensor) and x.device.type == "meta":
            raise InputError(f"{who}: input {name} is on the meta device; the cost model reads its values (the tiles "
                             "they skip)")
        dt = x.dtype if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x)).dtype
        if dt.is_floating_point or dt.is_complex or (node.dtype == ir.INT and dt == torch.bool):
            raise InputError(f"{who}: input {name} is declared {node.dtype} and was given {dt}; a call refuses "
                             "it too")


def check_data_reads(kernel, dims: dict) -> None:
    """The call's refusal of an unguarded read outside its input (runtime/binding.check_reads) at these dims (user
    names): the cost model given the data refuses what the call refuses, before it reads the data there."""
    check_reads(kernel.program, kernel.dnf, SimpleNamespace(dims=dims))


def int_widths(planner, inputs: dict | None) -> dict:
    """Codegen input name -> element bytes of each integer input given (codegen names), as a launch passes it:
    int64 as is (8), any narrower integer as int32 (4)."""
    nodes = planner.cg_program.input_map
    return {cg: 8 if torch.as_tensor(x).dtype == torch.int64 else 4 for cg, x in (inputs or {}).items()
            if cg in nodes and nodes[cg].dtype == ir.INT}


def data_arrays(planner, inputs: dict | None, dims: dict, batch: tuple) -> dict | None:
    """The integer and boolean inputs given to the cost model (code-generation names), as numpy arrays of shape
    batch + their own shape: leading axes that broadcast to the batch are expanded, as a call expands them
    (runtime/binding.py; document ids shared by every head)."""
    if not inputs:
        return None
    nodes, back = planner.cg_program.input_map, planner.codegen.inputs
    out = {}
    for cg, x in inputs.items():
        node, name = nodes[cg], back[cg]   # the user's name, for messages
        a = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
        out[cg] = batched(a, tuple(sy.evaluate(e, dims) for e in node.shape), batch, f"cost(inputs=...): {name}")
    return out


def batched(a: np.ndarray, own: tuple, batch: tuple, what: str) -> np.ndarray:
    """An input's array as batch + its own shape: leading axes that broadcast to the batch are expanded, as a call
    expands them (runtime/binding.py; document ids shared by every head). InputError naming `what` otherwise."""
    want = tuple(batch) + own
    lead = a.ndim - len(own)
    if lead < 0 or a.shape[lead:] != own:
        raise InputError(f"{what} has shape {tuple(a.shape)}; at these dims it ends in {own} (batch axes "
                         f"{tuple(batch)} before it, or any that broadcast to them)")
    try:
        return np.broadcast_to(a, want)
    except ValueError:
        raise InputError(f"{what} of shape {tuple(a.shape)} does not broadcast to the batch {tuple(batch)} (at "
                         f"these dims and batch it is {want})") from None
