"""Checks of the elaboration that need no parse tree: name and extent limits, compile-time param overrides."""
from __future__ import annotations

import math
import numbers

from moa.errors import InputError, ShapeError

MAX_NAME = 64
MAX_EXTENT = 2 ** 31 - 1  # kernels take extents as 32-bit integers
COMPILE_KEYWORDS = ("form", "schedule", "autotune")   # moa.compile's own keywords: not param names


def check_extent(e, what, loc):
    """A constant extent beyond 2^31 - 1 can never be called (kernels index with 32-bit integers)."""
    if e.is_Integer and int(e) > MAX_EXTENT:
        raise ShapeError(f"{what} is {int(e)}, more than 2^31 - 1", loc)
    return e


def article(noun: str) -> str:
    return ("an " if noun[:1] in "aeiou" else "a ") + noun


def check_override(name: str, v):
    """A param value given to moa.compile: a number (an integer of magnitude below 2^63, as literals in the source;
    numpy scalars too), or inf (unbounded)."""
    if isinstance(v, numbers.Integral) and not isinstance(v, bool):
        v = int(v)
    elif isinstance(v, numbers.Real) and not isinstance(v, bool):
        v = float(v)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or math.isnan(v) or v == -math.inf:
        raise InputError(f"param {name} must be a number or inf (unbounded), got {v!r}")
    if isinstance(v, int) and abs(v) > 2 ** 63 - 1:
        raise InputError(f"param {name} = {v} does not fit in a 64-bit integer (magnitude at most 2^63 - 1)")
    return v
