"""Predicted work of the window-mixing backward kernels (codegen/window_backward.py): tl.dot FLOPs, other FLOPs,
transcendentals and DRAM bytes loaded and stored per kernel, as the interpreter's counters count them
(runtime/measure.py).

As for the forward window kernel (codegen/launches.py window_launch): the work of one execution of each region (the
program, one iteration of a hop loop) is the abstract walk of the generated source (codegen/ledger.py); the first
kernel runs cdiv(n, BLOCK_M) programs of three hop loops over r < W, the second cdiv(rows of K and V, BLOCK_N)
programs of one. The bytes are the lanes of every access site over those executions (codegen/counts.py): the first
kernel's rows start at p BLOCK_M, hop r's value and key rows are i - r by their index; the second kernel's rows t
start at p BLOCK_N and the rows it gathers for hop r at p BLOCK_N - h(r) (h(r) = -r in bla), masked 0 <= i < n."""
from __future__ import annotations

import sympy as sp

from moa import ir
from moa import symbolic as sy
from moa.codegen.constexprs import BLOCK_M, BLOCK_N, HEAD_DIM_V, csym
from moa.codegen.launches import Launch, total_counts
from moa.codegen.ledger import function_ledger
from moa.codegen.window_backward import KERNELS
from moa.cost import Counts

from .tiling import Config

HEAD_DIM, W_PAD = csym("HEAD_DIM"), csym("W_PAD")
_PID = sp.Symbol("p", integer=True, nonnegative=True)     # program_id(0): the row tile
_HOP = sp.Symbol("r_", integer=True, nonnegative=True)    # the loop variable r of the hop loops


def launches(runner, dtype: str, nbatch: int) -> list:
    """The cost model's Launch of each backward kernel of a window runner (runtime/window_backward.py)."""
    spec = runner.spec(dtype, nbatch)
    program, sched = runner.planner.cg_program, runner.sched
    mx = sched.branches[0].mix
    hk, hv = (sp.sympify(h).xreplace({mx.var: _HOP}) for h in spec.shifts)
    heads = {"HEAD_DIM": (HEAD_DIM, 0), "col": (HEAD_DIM_V, 0), "wslot": (W_PAD, 0), "wr": (1, _HOP)}
    out = []
    for fn, loads, stores in spec.sites:
        led = function_ledger(program, spec.source, fn, loads, stores)
        if fn == KERNELS[0]:
            grid = ((_PID, sp.ceiling(spec.row_extent / BLOCK_M)),)
            axes = {"row": (BLOCK_M, _PID * BLOCK_M), **heads}
        else:
            grid = ((_PID, sp.ceiling(sp.Max(spec.key_rows, spec.value_rows) / BLOCK_N)),)
            axes = {"trow": (BLOCK_N, _PID * BLOCK_N), "krow": (BLOCK_N, _PID * BLOCK_N - hk),
                    "vrow": (BLOCK_N, _PID * BLOCK_N - hv), **heads}
        loops = {r: (_HOP, sp.Integer(0), mx.extent) for r in led.regions if r != "program"}
        out.append(Launch(fn, led, grid, loops, axes, ("loop", 0), spec.source))
    return out


def predict(runner, dims: dict, batch: tuple, dtype: str, cfg: Config) -> dict:
    """Kernel name -> Counts of a backward call (dims in the program's names, batch: the call's batch shape, cfg:
    BLOCK_M of the first kernel, BLOCK_N of the second)."""
    program, sched = runner.planner.cg_program, runner.sched
    spec = runner.spec(dtype, len(batch))
    dims = {x.name: int(dims[x.name]) for x in program.dims}
    env = {d: dims[d.name] for d in program.dims}
    cv = runner.constexprs(spec, dims, cfg)
    cvals = {csym(k): v for k, v in cv.items()}
    size = {"float64": 8, "float32": 4, "float16": 2, "bfloat16": 2}[dtype]
    acc = 8 if dtype == "float64" else 4
    nbytes = {"dO": size, **dict.fromkeys(("dH", "P2", "dQ", "dK", "dV"), acc)}
    for name, node in program.input_map.items():
        nbytes[name] = size if node.dtype == ir.FLOAT else 1 if node.dtype == ir.BOOL else 8
    nb = 1
    for x in batch:
        nb *= int(x)
    out: dict = {}
    for launch in launches(runner, dtype, len(batch)):
        c = total_counts([launch], sched, env, cvals, nbytes, nb)
        out[launch.fn] = c
    if not sy.evaluate(spec.row_extent, dims):   # no rows: the runtime launches nothing
        out = {k: Counts() for k in out}
    return out
