"""Command-line argument parsing shared by the `moa` subcommands."""
from __future__ import annotations

import re

from moa.errors import InputError
from moa.runtime.check import check_dims
from moa.runtime.tiling import Config

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")


def parse_assignments(text: str | None, what: str) -> dict:
    """'n=100,d=16' or 'n=100 d=16' -> {'n': 100, 'd': 16} (ints, else floats). Commas and blanks separate
    assignments; blanks around '=' are allowed. Raises InputError naming the offending part."""
    out: dict = {}
    if not text:
        return out
    for part in re.split(r"[,\s]+", re.sub(r"\s*=\s*", "=", text.strip())):
        if not part:
            continue
        if "=" not in part:
            raise InputError(f"{what}: expected name=value, got {part!r}")
        k, v = part.split("=", 1)
        if not _NAME.match(k):
            raise InputError(f"{what}: {k!r} is not a name (in {part!r})")
        if k in out:
            raise InputError(f"{what}: {k} is given twice")
        try:
            out[k] = int(v)
        except ValueError:
            try:
                out[k] = float(v)
            except ValueError:
                raise InputError(f"{what}: {k} must be a number, got {v!r}") from None
    return out


def params(args) -> dict:
    """--param (repeatable) as name -> number; the program checks the names when it compiles."""
    params: dict = {}
    for p in args.param or []:
        for k, v in parse_assignments(p, "--param").items():
            if k in params:
                raise InputError(f"--param: {k} is given twice")
            params[k] = v
    return params


def dims(args, program, complete: bool = False) -> dict:
    """--dims of a program: its dims only (every one if `complete`), as non-negative integers."""
    return check_dims(program, parse_assignments(getattr(args, "dims", None), "--dims"), "--dims", complete)


def parse_config(text: str | None) -> Config | None:
    """--config BM,BN[,WARPS[,STAGES]] as a tile Config (None when not given)."""
    if not text:
        return None
    try:
        parts = [int(x) for x in text.replace(" ", "").split(",")]
        if not 2 <= len(parts) <= 4 or min(parts) <= 0:
            raise ValueError
    except ValueError:
        raise InputError(f"--config: expected BM,BN[,WARPS[,STAGES]] (positive integers), got {text!r}") from None
    bm, bn = parts[:2]
    if bm < 16 or bn < 16 or bm & (bm - 1) or bn & (bn - 1):
        raise InputError(f"--config: BLOCK_M and BLOCK_N must be powers of two >= 16 (tl.dot's minimum), got {bm}, "
                         f"{bn}")
    return Config(*parts)
