"""Command-line argument parsing shared by the `moa` subcommands."""
from __future__ import annotations

import math
import os
import re
from pathlib import Path

from moa.devices import canonical_dtype
from moa.errors import InputError
from moa.runtime.check import MAX_DIM, check_dims
from moa.runtime.tiling import Config, LinearConfig

INT64 = 2 ** 63 - 1

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
            if abs(out[k]) > INT64:   # as literals in the source: the kernels negate values
                raise InputError(f"{what}: {k}={v} does not fit in a 64-bit integer (magnitude at most 2^63 - 1)")
        except ValueError:
            try:
                out[k] = float(v)
            except ValueError:
                raise InputError(f"{what}: {k} must be a number, got {v!r}") from None
        if isinstance(out[k], float) and math.isinf(out[k]) and v.lower().lstrip("+-") not in ("inf", "infinity"):
            raise InputError(f"{what}: {k}={v} overflows a 64-bit float (write inf for infinity)")
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


def parse_config(text: str | None) -> Config | LinearConfig | None:
    """--config BM,BN[,WARPS[,STAGES]][,tma][,overlap][,bv=N] as a tile Config (None when not given). `tma` and
    `overlap` set the tiled kernel's Hopper options; `bv=N` (the chunked linear form's value tile) gives a
    LinearConfig with CHUNK = BM, BLOCK_F = BN."""
    if not text:
        return None
    usage = "BM,BN[,WARPS[,STAGES]][,tma][,overlap][,bv=N]"
    words = [w for w in text.replace(" ", "").lower().split(",") if w]
    flags = {w for w in words if w in ("tma", "overlap")}
    bv = [w for w in words if w.startswith("bv=")]
    nums = [w for w in words if w not in flags and w not in bv]
    try:
        parts = [int(x) for x in nums]
        block_v = [int(w[3:]) for w in bv]
        if not 2 <= len(parts) <= 4 or min(parts + block_v) <= 0 or len(block_v) > 1:
            raise ValueError
    except ValueError:
        raise InputError(f"--config: expected {usage} (positive integers), got {text!r}") from None
    bm, bn = parts[:2]
    if bm < 16 or bn < 16 or bm & (bm - 1) or bn & (bn - 1):
        raise InputError(f"--config: BLOCK_M and BLOCK_N must be powers of two >= 16 (tl.dot's minimum), got {bm}, "
                         f"{bn}")
    if bm * bn > 2 ** 20:
        raise InputError(f"--config: a BLOCK_M x BLOCK_N tile holds at most 2^20 elements (Triton's limit), got "
                         f"{bm} x {bn}")
    if len(parts) > 2 and (parts[2] > 32 or parts[2] & (parts[2] - 1)):
        raise InputError(f"--config: WARPS must be a power of two of at most 32 (1024 threads), got {parts[2]}")
    if len(parts) > 3 and parts[3] > 16:
        raise InputError(f"--config: STAGES must be at most 16, got {parts[3]}")
    if block_v:
        if flags:
            raise InputError(f"--config: bv= (the linear form's value tile) does not combine with "
                             f"{', '.join(sorted(flags))} (options of the tiled kernel), got {text!r}")
        if block_v[0] < 16 or block_v[0] & (block_v[0] - 1):
            raise InputError(f"--config: bv (BLOCK_V) must be a power of two >= 16, got {block_v[0]}")
        return LinearConfig(*parts, block_v=block_v[0])
    return Config(*parts, tma="tma" in flags, overlap="overlap" in flags)


def count(text: str | None, flag: str, default: int, largest: int = MAX_DIM) -> int:
    """A non-negative integer option (--batch): an InputError naming the flag and the value otherwise."""
    if text is None:
        return default
    try:
        v = int(str(text).strip())
    except ValueError:
        raise InputError(f"{flag} must be a non-negative integer, got {text!r}") from None
    if not 0 <= v <= largest:
        raise InputError(f"{flag} must be a non-negative integer of at most {largest}, got {v}")
    return v


def seed(text: str | None) -> int:
    """--seed: any integer torch.Generator.manual_seed takes (-2^63 .. 2^64 - 1)."""
    if text is None:
        return 0
    try:
        v = int(str(text).strip())
    except ValueError:
        raise InputError(f"--seed must be an integer, got {text!r}") from None
    if not -(2 ** 63) <= v < 2 ** 64:
        raise InputError(f"--seed must be an integer between -2^63 and 2^64 - 1, got {v}")
    return v


DTYPES = "float64, float32, float16, bfloat16 (or fp64, fp32, fp16, half, bf16)"


def dtype(text: str, flag: str = "--dtype") -> str:
    """--dtype in any spelling moa.devices knows (bf16, bfloat16, fp16, half ...) -> the canonical name. tf32 is a
    precision of float32 matrix multiplies, not a dtype of the inputs: refused here."""
    try:
        name = canonical_dtype(text)
    except InputError:
        name = None
    if name is None or name == "tf32":
        raise InputError(f"{flag}: unknown dtype {text!r}; use one of {DTYPES}")
    return name


def source(arg: str):
    """The program argument of every subcommand: a path (pathlib.Path) when it names an existing file or looks like
    one (no line break and ending in .moa, or without blanks), else .moa program text. A directory, a missing file
    or an unreadable file is an InputError naming the path."""
    if "\n" in arg:
        return arg
    if not arg.strip():
        raise InputError("the program argument is empty; name a .moa file")
    path = Path(arg)
    if path.is_dir():
        inside = sorted(path.glob("*.moa"))
        raise InputError(f"{arg} is a directory; name a .moa file (e.g. {inside[0]})" if inside else
                         f"{arg} is a directory, not a .moa file")
    if path.exists():
        if not os.access(path, os.R_OK):
            raise InputError(f"cannot read {arg}: permission denied")
        return path
    if arg.strip().endswith(".moa") or not re.search(r"\s", arg):
        raise InputError(f"{arg}: no such file")
    return arg


def output_path(path: str | None, flag: str) -> str | None:
    """A file the command will write, checked before any work: its directory exists and it is not a directory."""
    if path is None:
        return None
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise InputError(f"{flag} {path}: is a directory; name the file to write")
    if not os.path.isdir(folder):
        raise InputError(f"{flag} {path}: the directory {folder} does not exist")
    return path


def write_text(path: str, text: str, flag: str) -> None:
    """Write a command's output file; an OSError (permissions, a full disk) is an InputError naming the flag."""
    try:
        with open(path, "w") as f:
            f.write(text)
    except OSError as ex:
        raise InputError(f"{flag} {path}: cannot write it ({ex.strerror or ex})") from None
