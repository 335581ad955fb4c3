"""`moa cost`, `moa aot` and the plots (`moa cost --plot`, `moa explain --tiles`)."""
from __future__ import annotations

import math

import sympy as sp

import moa
from moa import cost as C
from moa import onf
from moa import symbolic as sy
from moa.devices import DTYPE_BYTES, get_device
from moa.errors import InputError, MoaError
from moa.runtime import backward_configs
from moa.runtime.aot import TARGETS, fits
from moa.runtime.costing import cost_breakdown
from moa.runtime.decode_cost import decode_cost
from moa.runtime.form_configs import launch_label

from . import limits
from .args import DTYPES, count, output_path, parse_config, source, write_text
from .args import dims as _dims
from .args import dtype as _dtype
from .args import params as _params
from .plots import cost_plot, pyplot, sweep_dims


def add_commands(sub, common):
    """Register the `cost` and `aot` subcommands on moa's argparse subparsers."""
    p = sub.add_parser("cost", help="predicted FLOPs, DRAM bytes, intermediates and time: fused vs unfused")
    common(p)
    p.add_argument("--dims", help="e.g. n=8192,d=128,e=128 (omit for formulas in the dims)")
    p.add_argument("--dtype", default="bf16", help=f"{DTYPES} (default bf16)")
    p.add_argument("--device", default="h100", help="h100 (default), h200, a100, or cpu (interpreter tiles, no time)")
    p.add_argument("--batch", default=None, help="extra leading batch axis of that size (0: none; default: 0)")
    p.add_argument("--plot", metavar="FILE.png", help="draw predicted bytes and time against n (log-log)")
    p.add_argument("--backward", action="store_true", help="also the backward's kernels (training): their work per "
                   "kernel and, on a GPU, a roofline time (needs every dim)")
    p.add_argument("--no-fit", action="store_true", help="use the default tile table without the ahead-of-time "
                   "check the GPU runtime makes (no compile)")
    p.add_argument("--schedule", choices=onf.KINDS, help=_SCHEDULE)
    p.set_defaults(fn=cmd_cost)

    p = sub.add_parser("aot", help="compile the generated kernel for a GPU target without a GPU; print resources")
    common(p)
    p.add_argument("--dims", required=True, help="e.g. n=8192,d=128,e=128 (head dims are required)")
    p.add_argument("--dtype", default="bf16", help=f"{DTYPES} (default bf16)")
    p.add_argument("--target", default="sm_90", help="sm_90 (default), sm_90a, sm_80, sm_86, sm_89")
    p.add_argument("--config", metavar="BM,BN[,WARPS[,STAGES]][,tma][,overlap][,bv=N]", help="force a tile config "
                   "(default: the runtime's); tma / overlap: the tiled kernel's Hopper options; the linear form reads "
                   "BM,BN as CHUNK,BLOCK_F and bv=N as its scan's value tile BLOCK_V")
    p.add_argument("--ptx", metavar="FILE", help="write the PTX of the (first) output here")
    p.add_argument("--form", choices=["quadratic", "linear"], help="force the form of normalize(...) @ V outputs "
                   "(default: the one the runtime picks at --dims)")
    p.add_argument("--schedule", choices=onf.KINDS, help=_SCHEDULE)
    p.set_defaults(fn=cmd_aot)


_SCHEDULE = "force the schedule kind (default: the cost model's choice at --dims)"


# ---- formatting -----------------------------------------------------------------------------------------------

def _si(x, unit="") -> str:
    if x is None:
        return "-"
    if isinstance(x, sp.Basic) and x.free_symbols:
        return str(x)
    x = float(x)
    for p, s in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= p:
            return f"{x / p:.3g} {s}{unit}"
    return f"{x:.3g} {unit}".rstrip()


def _bytes(x) -> str:
    if x is None:
        return "-"
    if isinstance(x, sp.Basic) and x.free_symbols:
        return str(x)
    x = float(x)
    for p, s in ((2 ** 40, "TiB"), (2 ** 30, "GiB"), (2 ** 20, "MiB"), (2 ** 10, "KiB")):
        if abs(x) >= p:
            return f"{x / p:.3g} {s}"
    return f"{int(x)} B"


def _seconds(x) -> str:
    if x is None:
        return "-"
    if isinstance(x, sp.Basic) and x.free_symbols:
        return str(x)
    x = float(x)
    for p, s in ((1, "s"), (1e-3, "ms"), (1e-6, "us")):
        if x >= p:
            return f"{x / p:.3g} {s}"
    return f"{x * 1e9:.3g} ns"


# ---- moa cost ---------------------------------------------------------------------------------------------------

DENSE_CAUSAL = """dim n, d, e
in Q[n, d], K[n, d], V[n, e]
S[i, j] = where(j <= i, dot(Q[i], K[j]) / sqrt(d), -inf)
out O = softmax(S, axis=-1) @ V
"""


def dense_causal_line(k, rep, dims: dict, dtype: str, device: str, batch: int = 1) -> str | None:
    """FLOPs of dense causal attention at the same sequence length and head dims (times the leading axes and the
    call's batch), for a sparse or windowed program (PiAttention, windows, BLA)."""
    try:
        if len(k.output_names) != 1 or isinstance(rep.flops, sp.Basic):
            return None
        s = k.schedules[k.output_names[0]]
        heads = [b.dot.extent for b in s.branches if b.dot is not None]
        if not heads:
            return None
        n, e = sy.evaluate(s.row[1], dims), sy.evaluate(s.col[1], dims)
        if any(sy.evaluate(b.extent, dims) != n for b in s.branches):   # queries against another length of keys
            return None
        d = max(sy.evaluate(h, dims) for h in heads)
        lead = math.prod(sy.evaluate(x, dims) for _, x in s.lead) * batch
        c = cost_breakdown(moa.compile(DENSE_CAUSAL), dtype, device, needed=False, n=n, d=d, e=e)[0]
    except MoaError:
        return None
    dense = c.flops * lead
    if not dense:
        return None
    times = f" (x {lead} {'heads' if batch == 1 else 'heads x batch'})" if lead > 1 else ""
    return (f"dense causal attention at n={n}, d={d}, e={e}{times}: "
            f"{_si(dense)} FLOPs; this program {_si(rep.flops)} = {rep.flops / dense:.3g} of it")


def decode_note(k, dims: dict, dtype: str, device: str, batch: tuple, plain: float) -> str | None:
    """A note when a CUDA call at these dims runs as a split-KV decode (few query rows against many keys, or GQA
    heads packed, predicted faster than the plain kernel's `plain` seconds, as runtime/decode.split_preference
    decides): the decode's prediction (runtime/decode_cost.py), which this table (the plain kernel) is not."""
    s = k.schedules[k.output_names[0]]
    row, key = s.row[1], s.branches[0].extent
    if not (row.is_Symbol and key.is_Symbol) or row == key:
        return None
    rest = {x: v for x, v in dims.items() if x not in (row.name, key.name)}
    try:
        c = decode_cost(k, dims[row.name], dims[key.name], dtype=dtype, device=device, batch=batch, **rest)
    except MoaError:
        return None
    if (c.splits == 1 and c.packed_heads == 1) or c.predicted_seconds >= plain:
        return None
    return (f"note: a CUDA call at these dims runs as a split-KV decode ({c.splits} key splits, {c.packed_heads} "
            f"query heads per tile): predicted {_seconds(c.predicted_seconds)}, {_si(c.dram_bytes, 'B')} accessed "
            "(decode_cost, docs/inference.md); this table is the plain tiled kernel")


def cmd_cost(args) -> int:
    dtype, nbatch = _dtype(args.dtype), count(args.batch, "--batch", 0)
    if args.device != "cpu":
        get_device(args.device)
    k = moa.compile(source(args.file), schedule=args.schedule, **_params(args))
    dims = _dims(args, k.program)
    if dims and len(dims) < len(k.program.dims):   # numbers need every dim; none gives the formulas
        missing = [d.name for d in k.program.dims if d.name not in dims]
        raise InputError(f"--dims: missing {', '.join(missing)} (give every dim for numbers, or no --dims for the "
                         "formulas)")
    if args.backward and any(d.name not in dims for d in k.program.dims):   # checked before anything is printed
        raise InputError("--backward needs --dims with every dim")
    if args.plot:   # every argument checked before anything is printed
        if len(dims) < len(k.program.dims):
            raise InputError("--plot needs --dims with every dim (the sequence dims give the largest n)")
        pyplot(args.plot, "--plot")
    if len(dims) == len(k.program.dims):
        limits.grid_budget(k, dims, "moa cost")
    batch = (nbatch,) if nbatch else ()
    fit = not args.no_fit and args.device != "cpu" and len(dims) == len(k.program.dims)
    rep, bd = cost_breakdown(k, dtype, args.device, batch=batch, fit=fit, **dims)
    print(cost_table(k, rep, bd, dims))
    line = dense_causal_line(k, rep, dims, dtype, args.device, max(1, nbatch))
    if line:
        print(line)
    if len(dims) == len(k.program.dims) and args.device != "cpu":
        for name in k.output_names:
            if k.planner.choose_form(name, dims, args.device, dtype, batch=max(1, nbatch)) == "linear":
                print(f"note: at these dims the runtime runs output {name} in the linear (chunked) form, which is "
                      f"predicted faster (moa explain); this table is the quadratic (tiled) kernel")
        note = decode_note(k, dims, dtype, args.device, batch, rep.predicted_seconds)
        if note:
            print(note)
    if args.backward:
        dev = get_device(args.device) if args.device != "cpu" else None
        cfg = backward_fit(k, dims, dtype, dev.target) if fit and dev else None
        bc = k.backward.cost(dims, batch, dtype, device="cuda" if dev else "cpu", config=cfg)
        print(bc.table(dev, dtype if dev else "float32"))
        if cfg:
            print("backward configs: " + ", ".join(f"{n} {c.block_m} x {c.block_n}, {c.num_warps} warps" for n, c in
                                                   cfg.items()) + " (the first that fits the target ahead of time)")
    if fit:
        print("config: the one the GPU runtime launches: the first of its candidates (its default first) that "
              "compiles ahead of time for the device's target without spills and with shared memory in budget")
    if args.plot:
        path = cost_plot(k, args.plot, dims, dtype, args.device, batch, fit)
        print(f"wrote {path}")
    return 0


def backward_fit(k, dims: dict, dtype: str, target: str) -> dict | None:
    """Kernel -> the Config a GPU launches for the fused single-branch backward (runtime/backward_configs.py: the
    first candidate that compiles for the target without spills); None for the other backward paths (their own
    default tiles)."""
    runner = k.backward.runner
    if runner is None or k.backward.linear is not None:
        return None
    cg = {c: dims[u] for c, u in k.planner.codegen.dims.items()}
    spec = runner.spec(dtype, 0)
    return {n: c for n, (c, _) in backward_configs.choose(k.planner.cg_program, spec, dtype, cg, target).items()}


def cost_table(k, rep, bd, dims) -> str:
    """The fused-vs-unfused table of `moa cost`."""
    dev = bd.device
    head = f"moa cost {k.program.name}"
    if dims:
        head += "  " + " ".join(f"{a}={b}" for a, b in dims.items())
    head += f"  {bd.dtype} on {dev.name if dev else 'cpu (Triton interpreter tiles; no time model)'}"
    lines = [head]
    for name, cfg in bd.configs.items():
        if cfg is None:
            lines.append(f"config {name}: BLOCK_M, BLOCK_N symbolic (HEAD_DIM = padded d: max(16, 2^ceil(log2 d)))")
        else:
            lines.append(f"config {name}: BLOCK_M={cfg.block_m} BLOCK_N={cfg.block_n} num_warps={cfg.num_warps} "
                         f"num_stages={cfg.num_stages}")
    symbolic = any(isinstance(x, sp.Basic) and x.free_symbols for x in (rep.flops, rep.dram_bytes))
    if symbolic:
        lines.append("formulas (Sum over row tiles r and key tiles t; [c] is 1 where c holds):")
        for f in ("flops", "transcendentals", "dram_bytes", "tiles_visited"):
            lines.append(f"  fused {f} = {getattr(rep, f)}")
        lines.append(f"  unfused flops = {bd.unfused_flops}")
        lines.append(f"  unfused dram_bytes = {rep.unfused_dram_bytes}")
        lines.append(f"  intermediates: fused 0, unfused {rep.unfused_intermediate_bytes}")
        if rep.predicted_seconds is not None:
            lines.append(f"  predicted seconds = {rep.predicted_seconds}")
        return "\n".join(lines)
    peak = dev.matmul_rate(bd.dtype) if dev else None
    ufrac = (bd.unfused_flops / bd.unfused_seconds / peak) if dev and bd.unfused_seconds else None
    uai = bd.unfused_flops / rep.unfused_dram_bytes if rep.unfused_dram_bytes else 0
    rows = [
        ("FLOPs", _si(rep.flops), _si(bd.unfused_flops)),
        ("  of which tl.dot / matmul", _si(bd.dot_flops), ""),
        ("transcendentals", _si(rep.transcendentals), ""),
        ("DRAM bytes", _bytes(rep.dram_bytes), _bytes(rep.unfused_dram_bytes)),
        ("  loaded / stored", f"{_bytes(rep.dram_bytes_loaded)} / {_bytes(rep.dram_bytes_stored)}", ""),
        ("  reaching HBM (L2 model)", _bytes(bd.hbm_bytes) if dev else "-", ""),
        ("intermediates in DRAM", _bytes(rep.intermediate_bytes), _bytes(rep.unfused_intermediate_bytes)),
        ("on-chip per program (regs + smem)", _bytes(rep.onchip_bytes), ""),
        ("arithmetic intensity", f"{float(rep.arithmetic_intensity):.1f} FLOP/B", f"{float(uai):.1f} FLOP/B"),
        ("tiles visited / needed", f"{rep.tiles_visited} / {rep.tiles_needed}", ""),
        ("programs", str(bd.programs), ""),
        ("predicted time", _seconds(rep.predicted_seconds), _seconds(bd.unfused_seconds)),
        ("bound", rep.bound, bd.unfused_bound),
        ("fraction of peak", f"{100 * bd.fraction_of_peak:.1f}%" if bd.fraction_of_peak is not None else "-",
         f"{100 * ufrac:.1f}%" if ufrac is not None else "-"),
    ]
    w0 = max(len(r[0]) for r in rows) + 2
    w1 = max(max(len(r[1]) for r in rows), len("fused (moa)")) + 2
    lines.append(f"{'':{w0}}{'fused (moa)':{w1}}unfused (PyTorch eager)")
    lines += [f"{a:{w0}}{b:{w1}}{c}" for a, b, c in rows]
    if dev:
        parts = ", ".join(f"{k_} {_seconds(v)}" for k_, v in bd.parts.items())
        per = f"{bd.launches} x {_seconds(dev.launch_s)} launches" if bd.launches > 1 else \
            f"{_seconds(dev.launch_s)} launch"
        lines.append(f"roofline parts (fused): {parts}; + {per}")
    # the MoA storage theorem, as formulas in the dims
    inter = sp.Integer(0)
    for name in k.output_names:
        plan = C.eager_plan(k.schedules[name], DTYPE_BYTES[bd.dtype], 1)
        inter += plan.intermediate_bytes
    io = sum((sp.Mul(*n.shape) for n in k.program.inputs), sp.Integer(0)) + \
        sum((sp.Mul(*node.shape) for _, node in k.program.outputs), sp.Integer(0))
    seq = [x for x in sweep_dims(k) if x in {str(f) for f in inter.free_symbols}]
    try:
        deg = sp.Poly(sp.expand(inter), *[sp.Symbol(x, integer=True, positive=True) for x in seq]).total_degree() \
            if seq else 0
    except sp.PolynomialError:
        deg = None
    order = {2: "O(n^2 + n d)", 1: "O(n d), linear in n: window-sized intermediates"}.get(deg, "")
    lines.append(f"MoA storage theorem: unfused materialises {sp.expand(inter)} bytes of intermediates"
                 f"{f' ({order})' if order else ''}; fused holds only inputs + outputs, {sp.expand(io)} elements "
                 "(O(n d))")
    return "\n".join(lines)


# ---- moa aot -----------------------------------------------------------------------------------------------------

def cmd_aot(args) -> int:
    dtype = _dtype(args.dtype)
    if args.target.strip().lower() not in TARGETS:
        raise InputError(f"--target {args.target}: unknown GPU target; supported targets: {', '.join(TARGETS)}")
    cfg = parse_config(args.config)
    output_path(args.ptx, "--ptx")
    k = moa.compile(source(args.file), form=args.form, schedule=args.schedule, **_params(args))
    dims = _dims(args, k.program)
    reports = [k.aot(target=args.target, dtype=dtype, config=cfg, output=name, **dims) for name in k.output_names]
    print(f"moa aot {k.program.name}  {' '.join(f'{a}={b}' for a, b in dims.items())}  {dtype} -> "
          f"{args.target} (compiled without a GPU: Triton -> PTX -> ptxas)")
    for i, (name, r) in enumerate(zip(k.output_names, reports)):
        ok, why = fits(r, args.target)
        if hasattr(r, "kernels"):   # the linear form's or the window kernel's: a report per kernel
            _print_form_aot(name, r, ok, why, args, i == 0)
            continue
        print(f"output {name}: {r.schedule + ' schedule, ' if r.schedule else ''}BLOCK_M={r.block_m} "
              f"BLOCK_N={r.block_n} num_warps={r.num_warps} num_stages={r.num_stages}")
        print(f"  registers/thread  {r.registers}")
        print(f"  spills            {r.spills} B")
        print(f"  shared memory     {r.shared_bytes} B ({r.shared_bytes / 1024:.1f} KiB)")
        print(f"  wgmma             {'yes' if r.uses_wgmma else 'no'}")
        print(f"  TMA loads         {'yes' if r.uses_tma else 'no'}")
        print(f"  fits {args.target}      {'yes' if ok else 'NO: ' + why}")
        print(f"  ptx {len(r.ptx.splitlines())} lines, cubin {len(r.cubin)} B, compiled in {r.compile_seconds:.2f} s")
        if args.ptx and i == 0:
            write_text(args.ptx, r.ptx, "--ptx")
            print(f"  wrote {args.ptx}")
    return 0


def _print_form_aot(name, r, ok, why, args, first) -> None:
    """moa aot for an output in the linear form or the window-mixing kernel (runtime/form_configs.FormAotReport):
    the config, then registers, spills, shared memory and wgmma of every kernel it launches."""
    print(f"output {name}: {r.form} form, {r.config.text()}")
    print(f"  {'kernel (INIT,PREFIX,FINAL)' if r.form == 'linear' else 'kernel':34s} {'registers':>9s} "
          f"{'spills':>8s} {'shared':>10s}  wgmma")
    for kr in r.kernels:
        print(f"  {launch_label(kr):34s} {kr.registers:9d} {kr.spills:6d} B {kr.shared_bytes:8d} B  "
              f"{'yes' if kr.uses_wgmma else 'no'}")
    print(f"  fits {args.target}      {'yes' if ok else 'NO: ' + why}")
    print(f"  compiled in {sum(kr.compile_seconds for kr in r.kernels):.2f} s")
    if args.ptx and first:
        write_text(args.ptx, "\n".join(kr.ptx for kr in r.kernels), "--ptx")
        print(f"  wrote {args.ptx}")
