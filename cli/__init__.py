"""The `moa` command line: compile, check, explain, cost and aot (the top layer: it uses the runtime's public API)."""
from __future__ import annotations

import argparse
import os
import sys

import moa
from moa import onf
from moa.errors import InputError, MoaError
from moa.runtime.check import check
from moa.runtime.grad_check import check_grad
from moa.runtime.tiling import LinearConfig

from . import cost as cost_commands
from . import limits, plots
from .args import count, output_path, parse_config, seed, source, write_text
from .args import dims as _dims
from .args import dtype as _dtype
from .args import params as _params
from .launcher import launcher_module


def cmd_compile(args) -> int:
    dtype = _dtype(args.dtype)
    output_path(args.output, "-o")
    k = moa.compile(source(args.file), schedule=args.schedule, **_params(args))
    dims = _dims(args, k.program, complete=True) if args.dims else None
    config = parse_config(args.config)
    if isinstance(config, LinearConfig):
        raise InputError("--config: bv= sets the chunked linear form's value tile (moa aot); moa compile writes the "
                         "tiled kernel")
    if args.launcher:
        src = launcher_module(k, args.output_name, dtype, dims, config)
    else:
        if args.output_name and args.output_name not in k.output_names:
            raise InputError(f"--output-name {args.output_name}: the program's outputs are {', '.join(k.output_names)}")
        src = k.source(output=args.output_name, dtype=dtype, config=config, dims=dims)
    if args.output:
        write_text(args.output, src, "-o")
        print(f"wrote {args.output} ({len(src.splitlines())} lines)")
    else:
        print(src)
    return 0


def cmd_explain(args) -> int:
    k = moa.compile(source(args.file), **_params(args))
    if args.tiles:   # every argument checked before anything is printed
        dims = plots.tiles_dims(k, _dims(args, k.program))
        limits.grid_budget(k, dims, "moa explain --tiles")
        plots.pyplot(args.tiles, "--tiles")
    print(k.explain())
    if args.tiles:
        plots.tiles_plot(k, args.tiles, dims)
    return 0


def cmd_check(args) -> int:
    batch, sd = count(args.batch, "--batch", 2), seed(args.seed)
    k = moa.compile(source(args.file), **_params(args))
    dims = _dims(args, k.program, complete=True)
    limits.check_budget(k, dims, batch, args.grad)
    report = check(k, dims, seed=sd, batch=batch, run_kernel=not args.no_kernel)
    if args.grad:
        check_grad(k, dims, seed=sd, batch=batch, report=report)
    print(report.text())
    return 0 if report.ok else 1


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="moa", description="Attention as array expressions, compiled to Triton.")
    sub = ap.add_subparsers(dest="cmd", required=True)

    def common(p):
        p.add_argument("file", help="a .moa program")
        p.add_argument("--param", action="append", metavar="k=v[,k=v]", help="override param defaults")

    p = sub.add_parser("compile", help="write the generated Triton source (with --launcher: a runnable module)")
    common(p)
    p.add_argument("-o", "--output", help="file to write (default: stdout)")
    p.add_argument("--dtype", default="float16", help="the kernel's dtype (default: float16): float64, float32, "
                   "float16, bfloat16 (or fp64, fp32, fp16, half, bf16)")
    p.add_argument("--launcher", action="store_true", help="write a module with the kernel and a typed Python "
                   "launcher `launch(**inputs)` (shapes, strides, grid) that imports nothing from moa")
    p.add_argument("--output-name", metavar="NAME", help="the program output to compile (default: the first)")
    p.add_argument("--dims", help="dims the schedule and tiles are chosen for, e.g. n=4096,d=64,e=64 (default: "
                   "head dims 64, other dims 4096)")
    p.add_argument("--config", metavar="BM,BN[,WARPS[,STAGES]][,tma][,overlap]", help="force the tiles "
                   "(default: the GPU runtime's table for the dtype); tma / overlap: the Hopper options")
    p.add_argument("--schedule", choices=onf.KINDS, help="force the schedule kind (default: the cost model's "
                   "choice at --dims)")
    p.set_defaults(fn=cmd_compile)

    p = sub.add_parser("explain", help="IR with shapes, DNF, eliminated intermediates, ONF schedule")
    common(p)
    p.add_argument("--tiles", metavar="FILE.png", help="draw the (query tile, key tile) map")
    p.add_argument("--dims", help="dims for --tiles, e.g. n=1024,d=64")
    p.set_defaults(fn=cmd_explain)

    p = sub.add_parser("check", help="evaluate IR, DNF and kernel on random float64 inputs; print errors")
    common(p)
    p.add_argument("--dims", required=True, help="e.g. n=100,d=16,e=16 (float64 arrays: at most "
                   f"{limits.CHECK_BYTES // 2 ** 30} GiB of inputs, outputs and unfused intermediates)")
    p.add_argument("--seed", default=None, help="seed of the random inputs (default: 0)")
    p.add_argument("--batch", default=None, help="extra leading batch axis of that size (0: none; default: 2)")
    p.add_argument("--no-kernel", action="store_true", help="only compare the IR reference and the DNF")
    p.add_argument("--grad", action="store_true", help="also compare the gradient of every float input (the "
                   "kernel's backward) with torch.autograd through the float64 reference")
    p.set_defaults(fn=cmd_check)

    cost_commands.add_commands(sub, common)
    args = ap.parse_args(argv)
    try:
        return args.fn(args)
    except MoaError as e:
        print(f"moa: error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # the reader went away (`moa ... | head`): stop quietly, like other CLI tools
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
