"""`moa compile --launcher`: a standalone Python module holding one output's tiled Triton kernel and a typed launcher
(dims from the input shapes, shape checks, strides, grid, launch). The module imports torch and triton only.

The launcher passes the arguments in the order the runtime's Launcher does (runtime/launch.py `_arguments`): each
input with its strides (one flattened batch axis first), the output with its strides, the dims, the batch size; the
constexprs BLOCK_M, BLOCK_N, the padded head dims and HEAD_DIM_V. tests/test_cli.py runs written modules against
the reference."""
from __future__ import annotations

import keyword
import re
import textwrap

import sympy as sp
import torch

from moa import ir, onf
from moa import symbolic as sy
from moa.codegen.emit import SCAN
from moa.errors import MoaError, UnsupportedError
from moa.runtime.configs import fit_config
from moa.runtime.tiling import Config

MODULE_NAMES = {"math", "os", "torch", "triton", "tl", "launch"}


def _along(ix, ext, name: str, dims: dict, dev: str, body: list, src: str, axis: int) -> str:
    """Launcher lines binding `name` to a summary's index function (one variable) at every row or key
    0 .. ext - 1 (torch's // and % floor as the kernel's do), clipped to axis `axis` of tensor `src` (a where-guarded
    read past it only widens a tile's range); refused for functions beyond + - * // %."""
    ix = sp.sympify(ix)
    (v,) = sy.variables(ix)
    text = _py(ix.xreplace({v: sp.Symbol(name, integer=True)}), dims)
    words = set(re.findall(r"[A-Za-z_]\w*", text))   # the variable and dims only: no function (Abs, Min, ...)
    if not re.fullmatch(r"[\w\s+\-*/%()]+", text) or not words <= {name, *dims.values()}:
        raise UnsupportedError(f"--launcher: the index {sy.show(ix)} of a summarised data read has no standalone form "
                               f"(only + - * // %); use the moa runtime")
    body.append(f"    {name} = torch.arange({_py(ext, dims)}, device={dev})")
    if text != name:
        body.append(f"    {name} = {text}")
    body.append(f"    {name} = {name}.clamp(0, max({src}.shape[{axis}] - 1, 0))")
    return name


def _py(e, names: dict) -> str:
    """Python text of an integer extent expression over dims (codegen names -> the launcher's local names)."""
    e = sp.sympify(e).xreplace({sy.dim(cg): sy.dim(user) for cg, user in names.items()})
    return sy.show(e)


# long: one straight template of the module's text (kernel, helpers, argument checks, launch), in file order
def launcher_module(k, output: str | None, dtype: str, dims: dict | None, config: Config | None) -> str:
    """The text of a module with the tiled kernel of `output` for `dtype` and a function `launch(**inputs)`.

    dims choose the schedule and the tiles (default: head dims 64, other dims 4096, the runtime's default
    tiles); given dims take the GPU runtime's tiles, the first candidate that compiles for sm_90 without spills
    (runtime/configs.py fit_config); config forces the tiles. Raises UnsupportedError for outputs that the tiled
    kernel does not compute (the window-mixing form) and for names a Python launcher cannot take."""
    name = output or k.output_names[0]
    if name not in k.output_names:
        raise UnsupportedError(f"--output-name {name}: the program's outputs are {', '.join(k.output_names)}")
    if k.planner.is_window(name):
        raise UnsupportedError(f"--launcher: output {name} runs in the window-mixing kernel, which has a runner of "
                               "its own; --launcher writes the tiled kernel's launcher only")
    program = k.program
    for x in [n.attrs[0] for n in program.inputs] + [d.name for d in program.dims]:
        if keyword.iskeyword(x) or x in MODULE_NAMES:
            raise UnsupportedError(f"--launcher: the name {x!r} cannot be a Python launcher's argument or local "
                                   f"(a Python keyword or one of {', '.join(sorted(MODULE_NAMES))}); rename it")
    at = dims or k.planner.reference_dims(name)
    if k.planner.schedule == onf.SPLIT:
        raise UnsupportedError("--launcher writes one kernel; a split schedule runs one kernel per branch (use the "
                               "moa runtime for it, or another --schedule)")
    # the fastest predicted schedule of one kernel (a split one needs the runtime's launches)
    sched = next(s for s in k.planner.schedule_ranking(name, at, dtype) if s.kind != onf.SPLIT)
    if config is None:   # the runtime's default; at given dims the first candidate that fits sm_90 without spills
        config = k.planner.launch_config(name, torch.device("cuda"), dtype, at)
        if dims:
            try:
                config = fit_config(k.planner, name, dtype, at, "sm_90", 1, sched=sched)[0]
            except MoaError:   # none fits (or no ptxas): the default the runtime starts from
                pass
    elif config.tma:
        raise UnsupportedError("--launcher writes plain pointer loads; the tma option needs the runtime's tensor "
                               "descriptors (drop tma, or use the moa runtime)")
    spec = k.launcher.spec(name, dtype, 1, config, False, sched)
    view = k.planner.codegen
    dim_of = view.dims                      # codegen dim name -> user dim name
    inp_of = view.inputs                    # codegen input name -> user input name
    inputs = [n.attrs[0] for n in program.inputs]
    taken = set(inputs) | {d.name for d in program.dims}

    def local(base: str) -> str:
        while base in taken:
            base += "_"
        taken.add(base)
        return base

    out_, batch_, size_, dev_, grid_ = (local(x) for x in ("out", "batch", "size", "device", "grid"))
    lines = [spec.source.rstrip(), "", "",
             "# ---- launcher (written by `moa compile --launcher`; imports nothing from moa) " + "-" * 36,
             "import math", "import os", "", "import torch", "",
             f"DTYPE = torch.{dtype}", f"BLOCK_M, BLOCK_N = {config.block_m}, {config.block_n}",
             f"NUM_WARPS, NUM_STAGES = {config.num_warps}, {config.num_stages}", "", "",
             "def _pad(x: int) -> int:",
             "    \"\"\"A head dim's tile: the next power of two, at least 16.\"\"\"",
             "    return max(16, 1 << max(0, x - 1).bit_length())", "", "",
             "def _flat(t: torch.Tensor, name: str, rank: int, batch: tuple, size: int) -> torch.Tensor:",
             "    \"\"\"t with its leading batch axes as one (stride 0 where t has none).\"\"\"",
             "    lead = tuple(t.shape[:t.dim() - rank])",
             "    if lead == batch:",
             "        return t.reshape(size, *t.shape[t.dim() - rank:])",
             "    if not lead:",
             "        return t.unsqueeze(0).expand(size, *t.shape)",
             "    raise ValueError(f\"{name}: batch axes {list(lead)} differ from the other inputs' {list(batch)}\")",
             "", ""]
    summaries = getattr(spec, "summaries", ())   # per-tile (min, max) of the inputs a mask's tile tests read
    if summaries:
        lines += ["def _tile_summaries(t: torch.Tensor, axis: int, block: int, extra: int) -> torch.Tensor:",
                  "    \"\"\"(min, max) of t over tiles of `block` along `axis`: that axis becomes the tile count "
                  "(plus `extra`\n    tiles of padding the kernel's scan may read), a last axis of 2 holds min and "
                  "max (booleans as 0/1).\"\"\"",
                  "    if t.dtype == torch.bool:",
                  "        t = t.to(torch.int8)",
                  "    elif t.dtype not in (torch.int32, torch.int64, torch.int8):",
                  "        t = t.to(torch.int32)",
                  "    x = t.movedim(axis, -1)",
                  "    tiles = -(-x.shape[-1] // block)",
                  "    pad = tiles * block - x.shape[-1]",
                  "    info = torch.iinfo(x.dtype)",
                  "    lo = torch.cat([x, x.new_full((*x.shape[:-1], pad), info.max)], -1)",
                  "    hi = torch.cat([x, x.new_full((*x.shape[:-1], pad), info.min)], -1)",
                  "    lo = lo.reshape(*x.shape[:-1], tiles, block).amin(-1)",
                  "    hi = hi.reshape(*x.shape[:-1], tiles, block).amax(-1)",
                  "    out = torch.stack([lo, hi], -1)",
                  "    out = torch.cat([out, out.new_zeros((*out.shape[:-2], extra, 2))], -2)",
                  "    return out.movedim(-2, axis).contiguous()", "", ""]
    if any(ts.axis == "pair" for ts in summaries):
        lines += ["def _pair_summaries(t: torch.Tensor, rpos: int, kpos: int, rows: torch.Tensor, keys: torch.Tensor, "
                  "bm: int, bn: int,",
                  "                    extra: int) -> torch.Tensor:",
                  "    \"\"\"(min, max) of t at (rows[i], keys[j]) on axes (rpos, kpos) over every (bm rows, bn keys) "
                  "tile pair:\n    rpos becomes the row tile count, kpos the key tile count plus `extra`, a last "
                  "axis of 2.\"\"\"",
                  "    x = t.movedim((rpos, kpos), (-2, -1)).index_select(-2, rows)",
                  "    lo = _tile_summaries(x, x.dim() - 2, bm, 0)",
                  "    lo, hi = lo[..., 0], lo[..., 1]",
                  "    lo = _tile_summaries(lo.index_select(-1, keys), lo.dim() - 1, bn, extra)[..., 0]",
                  "    hi = _tile_summaries(hi.index_select(-1, keys), hi.dim() - 1, bn, extra)[..., 1]",
                  "    return torch.stack([lo, hi], -1).movedim((-3, -2), (rpos, kpos)).contiguous()", "", ""]
    params = ", ".join(f"{x}: torch.Tensor" for x in inputs)
    where = {}   # user dim -> (input, axis from the end)
    for node in program.inputs:
        for ax, ext in enumerate(node.shape):
            s = sp.sympify(ext)
            if s.is_Symbol and s.name not in where:
                where[s.name] = (node.attrs[0], len(node.shape) - ax)
    missing = [d.name for d in program.dims if d.name not in where]
    if missing:
        raise UnsupportedError(f"--launcher: dim{'s' if len(missing) > 1 else ''} {', '.join(missing)} "
                               "is not the extent of any input axis, so a launcher cannot read it from the shapes")
    doc = textwrap.fill(
        f"Output {name} of {program.name} ({dtype} kernel) from "
        f"{', '.join(f'{x}{sy.show_shape(n.shape)}' for x, n in zip(inputs, program.inputs))}, each with optional "
        "leading batch axes (the same for every input that has them). Float inputs are cast to DTYPE. CUDA "
        "tensors launch on the GPU; CPU tensors need TRITON_INTERPRET=1 (set before triton is imported) and a "
        "float32 or float64 module (the interpreter computes bfloat16 wrongly).",
        width=112, initial_indent='    """', subsequent_indent="    ") + '"""'
    body = [f"def launch({params}) -> torch.Tensor:", doc]
    for x in inputs:
        node = program.input_map[x]
        body.append(f"    if not isinstance({x}, torch.Tensor) or {x}.dim() < {node.rank}:")
        body.append(f"        raise ValueError(\"{x}: expected a tensor of rank >= {node.rank}\")")
    first = inputs[0]
    body.append(f"    {dev_} = {first}.device")
    body.append(f"    if any(t.device != {dev_} for t in ({', '.join(inputs)},)):")
    body.append(f"        raise ValueError(f\"every input must be on {{{dev_}}}\")")
    body.append(f"    if {dev_}.type == \"cpu\" and os.environ.get(\"TRITON_INTERPRET\") != \"1\":")
    body.append("        raise RuntimeError(\"CPU tensors run in Triton's interpreter: set TRITON_INTERPRET=1 before "
                "triton is imported\")")
    if dtype == "bfloat16":   # the interpreter computes bfloat16 wrongly (the moa runtime computes it in float32)
        body.append(f"    if {dev_}.type == \"cpu\":")
        body.append("        raise RuntimeError(\"a bfloat16 kernel computes wrong numbers in Triton's interpreter: "
                    "write the module with --dtype float32 for CPU tensors\")")
    for d in program.dims:
        x, ax = where[d.name]
        body.append(f"    {d.name} = {x}.shape[-{ax}]")
    for x in inputs:
        node = program.input_map[x]
        if node.rank:
            exts = [_py(s, {}) for s in node.shape]
            got = ", ".join(exts) + ("," if node.rank == 1 else "")
            body.append(f"    if tuple({x}.shape[{x}.dim() - {node.rank}:]) != ({got}):")
            body.append(f"        raise ValueError(f\"{x}: expected shape [..., {', '.join(exts)}] = "
                        f"[..., {', '.join('{' + e + '}' for e in exts)}], got {{list({x}.shape)}}\")")
    body.append(f"    {batch_} = max((tuple(t.shape[:t.dim() - r]) for t, r in "
                f"[{', '.join(f'({x}, {program.input_map[x].rank})' for x in inputs)}]), key=len)")
    body.append(f"    {size_} = math.prod({batch_})")
    for x in inputs:
        node = program.input_map[x]
        if node.dtype == ir.FLOAT:
            body.append(f"    {x} = {x}.to(DTYPE)")
        elif node.dtype == ir.INT:
            body.append(f"    {x} = {x} if {x}.dtype in (torch.int32, torch.int64) else {x}.to(torch.int32)")
        body.append(f"    {x} = _flat({x}, \"{x}\", {node.rank}, {batch_}, {size_})")
    lead = [_py(ext, dim_of) for _, ext in spec.lead]
    rows, cols = _py(spec.row_extent, dim_of), _py(spec.col_extent, dim_of)
    body.append(f"    {out_} = torch.empty(({size_}, {''.join(x + ', ' for x in lead)}{rows}, {cols}), dtype=DTYPE, "
                f"device={dev_})")
    if sched.kind == onf.RESIDUE:
        st = sched.lift.stride
        programs = (f"({rows}) % {st} * triton.cdiv(({rows}) // {st} + 1, BLOCK_M) + "
                    f"({st} - ({rows}) % {st}) * triton.cdiv(({rows}) // {st}, BLOCK_M)")
    else:
        programs = f"triton.cdiv({rows}, BLOCK_M)"
    heads = [x if sp.sympify(ext).is_Atom else f"({x})" for x, (_, ext) in zip(lead, spec.lead)]
    body.append(f"    {grid_} = ({programs}, {' * '.join([size_] + heads)})")
    body.append(f"    if {out_}.numel() == 0:")
    body.append(f"        return {out_}.reshape(*{batch_}, *{out_}.shape[1:])")
    args = [f"{inp_of[x]}, *{inp_of[x]}.stride()" for x in spec.inputs]
    for ts in summaries:
        block = "BLOCK_M" if ts.axis == "row" else "BLOCK_N"
        t = local(f"{inp_of[ts.tensor]}_{ts.axis}_tiles")
        src = inp_of[ts.tensor]   # flags given as integers are summarised as the kernel reads them: != 0
        src = f"({src} != 0)" if program.input_map[src].dtype == ir.BOOL else src
        if ts.axis == "pair":
            at = [_along(ix, ext, local(f"{t}_{side}"), dim_of, dev_, body, src, 1 + p) for side, ix, ext, p in
                  (("rows", ts.at.rows, ts.at.n, ts.pos), ("keys", ts.at.keys, ts.at.m, ts.kpos))]
            body.append(f"    {t} = _pair_summaries({src}, {1 + ts.pos}, {1 + ts.kpos}, {at[0]}, {at[1]}, BLOCK_M, "
                        f"BLOCK_N, {SCAN})")
        else:
            if ts.at is not None:   # read at a function of the row (key): gathered at every row (key), clipped
                ix, ext = (ts.at.rows, ts.at.n) if ts.axis == "row" else (ts.at.keys, ts.at.m)
                at = _along(ix, ext, local(f"{t}_at"), dim_of, dev_, body, src, 1 + ts.pos)
                src = f"{src}.index_select({1 + ts.pos}, {at})"
            body.append(f"    {t} = _tile_summaries({src}, {1 + ts.pos}, {block}, {0 if ts.axis == 'row' else SCAN})")
        args.append(f"{t}, *{t}.stride()")
    args.append(f"{out_}, *{out_}.stride()")
    args += [dim_of[x] for x in spec.dims]
    args.append(size_)
    consts = ["BLOCK_M=BLOCK_M", "BLOCK_N=BLOCK_N"]
    consts += [f"{hd}=_pad({_py(ext, dim_of)})" for hd, ext in spec.head_dims]
    consts += [f"HEAD_DIM_V=_pad({cols})", "num_warps=NUM_WARPS", "num_stages=NUM_STAGES"]
    body.append(f"    {spec.name}[{grid_}](")
    body += [f"        {a}," for a in args + consts]
    body.append("    )")
    body.append(f"    return {out_}.reshape(*{batch_}, *{out_}.shape[1:])")
    return "\n".join(lines + body) + "\n"
