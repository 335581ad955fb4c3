"""Command-line argument parsing shared by the `moa` subcommands."""
from __future__ import annotations

from moa.errors import InputError, MoaError


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


def params(args) -> dict:
    params: dict = {}
    for p in args.param or []:
        params.update(parse_assignments(p, "--param"))
    return params


def dims(args) -> dict:
    """--dims as non-negative integers."""
    d = parse_assignments(getattr(args, "dims", None), "--dims")
    for k, v in d.items():
        if not isinstance(v, int) or v < 0:
            raise InputError(f"--dims: {k} must be a non-negative integer, got {v}")
    return d
