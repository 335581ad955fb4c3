"""The `moa` command line: compile, check, explain (cost and aot are added by moa.costcli)."""
from __future__ import annotations

import argparse
import sys

from .errors import MoaError


def parse_assignments(text: str | None, what: str) -> dict:
    """'n=100,d=16' -> {'n': 100, 'd': 16} (ints, else floats)."""
    out: dict = {}
    if not text:
        return out
    for part in text.replace(" ", "").split(","):
        if not part:
            continue
        if "=" not in part:
            raise MoaError(f"{what}: expected name=value, got {part!r}")
        k, v = part.split("=", 1)
        try:
            out[k] = int(v)
        except ValueError:
            try:
                out[k] = float(v)
            except ValueError:
                raise MoaError(f"{what}: {k} must be a number, got {v!r}") from None
    return out


def _params(args) -> dict:
    params: dict = {}
    for p in args.param or []:
        params.update(parse_assignments(p, "--param"))
    return params


def cmd_compile(args) -> int:
    import moa

    k = moa.compile(args.file, **_params(args))
    src = k.source(dtype=args.dtype)
    if args.output:
        with open(args.output, "w") as f:
            f.write(src)
        print(f"wrote {args.output} ({len(src.splitlines())} lines)")
    else:
        print(src)
    return 0


def cmd_explain(args) -> int:
    import moa

    k = moa.compile(args.file, **_params(args))
    print(k.explain())
    if getattr(args, "tiles", None):
        from . import costcli

        costcli.tiles_plot(k, args.tiles, parse_assignments(args.dims, "--dims"))
    return 0


def cmd_check(args) -> int:
    import moa

    from .runtime.check import check

    k = moa.compile(args.file, **_params(args))
    dims = parse_assignments(args.dims, "--dims")
    report = check(k, dims, seed=args.seed, batch=args.batch, run_kernel=not args.no_kernel)
    print(report.text())
    return 0 if report.ok else 1


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="moa", description="Attention as array expressions, compiled to Triton.")
    sub = ap.add_subparsers(dest="cmd", required=True)

    def common(p):
        p.add_argument("file", help="a .moa program")
        p.add_argument("--param", action="append", metavar="k=v[,k=v]", help="override param defaults")

    p = sub.add_parser("compile", help="write the generated Triton source")
    common(p)
    p.add_argument("-o", "--output", help="file to write (default: stdout)")
    p.add_argument("--dtype", default="float16", choices=["float64", "float32", "float16", "bfloat16"])
    p.set_defaults(fn=cmd_compile)

    p = sub.add_parser("explain", help="IR with shapes, DNF, eliminated intermediates, ONF schedule")
    common(p)
    p.add_argument("--tiles", metavar="FILE.png", help="draw the (query tile, key tile) map")
    p.add_argument("--dims", help="dims for --tiles, e.g. n=1024,d=64")
    p.set_defaults(fn=cmd_explain)

    p = sub.add_parser("check", help="evaluate IR, DNF and kernel on random float64 inputs; print errors")
    common(p)
    p.add_argument("--dims", required=True, help="e.g. n=100,d=16,e=16")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch", type=int, default=2, help="extra leading batch axis (0: none)")
    p.add_argument("--no-kernel", action="store_true", help="only compare the IR reference and the DNF")
    p.set_defaults(fn=cmd_check)

    try:
        from . import costcli

        costcli.add_commands(sub, common)
    except ImportError:
        pass
    args = ap.parse_args(argv)
    try:
        return args.fn(args)
    except MoaError as e:
        print(f"moa: error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # the reader went away (`moa ... | head`): stop quietly, like other CLI tools
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
