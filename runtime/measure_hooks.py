"""The hooks of runtime/measure.py: each wraps one operation of Triton's interpreter (its builder's create_* methods
and its numpy fast paths for reductions and scans) and credits what it executes to the instrument() blocks active
in the calling thread (their Counters). The conventions are those of runtime/measure.py's docstring."""
from __future__ import annotations

import linecache
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import triton.language as tl


@dataclass
class Counters:
    """Work performed by interpreted Triton launches inside one ``instrument()`` block.

    Attributes:
        dram_bytes_loaded: bytes of the lanes that loads really read (mask true, op executed).
        dram_bytes_stored: bytes of the lanes that stores really wrote.
        flops: floating-point operations, see the module docstring for the conventions.
        transcendentals: transcendental function evaluations (one per element).
        programs: program instances executed (summed over launches).
        launches: grid launches executed.
        load_calls: load operations executed (each masked/unmasked load op counts once).
        store_calls: store operations executed.
        loads_by_region: region name -> bytes loaded from that region.
        load_calls_by_region: region name -> number of load ops with at least one active lane in it.
        stores_by_region: region name -> bytes stored into that region.
        store_calls_by_region: region name -> number of store ops with at least one active lane in it.
        load_calls_by_line: label -> number of load ops executed by the source line given for it (all lanes
            masked or not).
    """

    dram_bytes_loaded: int = 0
    dram_bytes_stored: int = 0
    flops: int = 0
    transcendentals: int = 0
    programs: int = 0
    launches: int = 0
    load_calls: int = 0
    store_calls: int = 0
    loads_by_region: dict[str, int] = field(default_factory=dict)
    load_calls_by_region: dict[str, int] = field(default_factory=dict)
    stores_by_region: dict[str, int] = field(default_factory=dict)
    store_calls_by_region: dict[str, int] = field(default_factory=dict)
    load_calls_by_line: dict[str, int] = field(default_factory=dict)

    @property
    def dram_bytes(self) -> int:
        """Total bytes moved: ``dram_bytes_loaded + dram_bytes_stored``."""
        return self.dram_bytes_loaded + self.dram_bytes_stored


@dataclass(eq=False)
class Session:
    """One instrument() block: its counters, address regions and watched load lines."""
    counters: Counters
    regions: list[tuple[str, np.uint64, np.uint64]]
    lines: dict[str, dict[str, str]] = field(default_factory=dict)   # function -> {line prefix: label}


TLS = threading.local()   # .sessions: the instrument() blocks active in this thread

# Builder method name -> flops per result element.
_FLOP_OPS: dict[str, int] = {
    "create_fadd": 1,
    "create_fsub": 1,
    "create_fmul": 1,
    "create_fdiv": 1,
    "create_precise_divf": 1,
    "create_approx_divf": 1,
    "create_frem": 1,
    "create_fneg": 1,
    "create_minimumf": 1,
    "create_maximumf": 1,
    "create_minnumf": 1,
    "create_maxnumf": 1,
    "create_fma": 2,
    "create_clampf": 2,
}

_TRANSCENDENTAL_OPS: tuple[str, ...] = (
    "create_exp",
    "create_exp2",
    "create_log",
    "create_log2",
    "create_sin",
    "create_cos",
    "create_sqrt",
    "create_precise_sqrt",
    "create_rsqrt",
    "create_erf",
)


def _sessions() -> list[Session]:
    return getattr(TLS, "sessions", None) or []


def _is_float(handle: Any) -> bool:
    dtype = getattr(handle, "dtype", None)
    is_floating = getattr(dtype, "is_floating", None)
    return bool(is_floating()) if is_floating is not None else False


def _elem_bytes(ptrs: Any) -> int:
    ptr_ty = ptrs.dtype
    elt = ptr_ty.element_ty if isinstance(ptr_ty, tl.pointer_type) else ptrs.get_element_ty()
    if isinstance(elt, tl.pointer_type):
        return 8
    return max(1, elt.primitive_bitwidth // 8)


def _active_addresses(ptrs: Any, mask: Any) -> np.ndarray:
    addrs = np.asarray(ptrs.data)
    if mask is None:
        return addrs.reshape(-1)
    m = np.broadcast_to(np.asarray(mask.data, dtype=bool), addrs.shape)
    return addrs[m]


def _record(sessions: list[Session], addrs: np.ndarray, nbytes: int, store: bool) -> None:
    """Credit an executed access of the lanes at ``addrs`` (elements of ``nbytes`` each)."""
    total = int(addrs.size) * nbytes
    for s in sessions:
        c = s.counters
        if store:
            c.dram_bytes_stored += total
            c.store_calls += 1
            by_bytes, by_calls = c.stores_by_region, c.store_calls_by_region
        else:
            c.dram_bytes_loaded += total
            c.load_calls += 1
            by_bytes, by_calls = c.loads_by_region, c.load_calls_by_region
        for name, lo, hi in s.regions:
            k = int(np.count_nonzero((addrs >= lo) & (addrs < hi))) if addrs.size else 0
            if k:
                by_bytes[name] += k * nbytes
                by_calls[name] += 1


def _add(sessions: list[Session], attr: str, amount: int) -> None:
    if amount:
        for s in sessions:
            setattr(s.counters, attr, getattr(s.counters, attr) + amount)


# ---------------------------------------------------------------------------------------------------
# Hook factories: each takes the original callable and returns a wrapper that forwards to it.
# ---------------------------------------------------------------------------------------------------


def _record_line(sessions: list[Session]) -> None:
    """Credit the load to the labels of its kernel source line (see the module docstring)."""
    wanted = [s for s in sessions if s.lines]
    if not wanted:
        return
    names = set().union(*(s.lines for s in wanted))
    frame = sys._getframe(2)
    for _ in range(40):
        if frame is None:
            return
        if frame.f_code.co_name in names:
            break
        frame = frame.f_back
    else:
        return
    text = linecache.getline(frame.f_code.co_filename, frame.f_lineno).strip()
    for s in wanted:
        for where, label in s.lines.get(frame.f_code.co_name, {}).items():
            if isinstance(where, tuple):   # (line, file stem): one of several kernels with the same function name
                hit = where[0] == frame.f_lineno and frame.f_code.co_filename.endswith(f"{where[1]}.py")
            else:
                hit = where == frame.f_lineno if isinstance(where, int) else text.startswith(where)
            if hit:
                s.counters.load_calls_by_line[label] += 1


def _hook_masked_load(orig: Callable) -> Callable:
    def hook(ptrs, mask, *args, **kwargs):
        res = orig(ptrs, mask, *args, **kwargs)
        sessions = _sessions()
        if sessions:
            _record(sessions, _active_addresses(ptrs, mask), _elem_bytes(ptrs), store=False)
            _record_line(sessions)
        return res

    return hook


def _hook_masked_store(orig: Callable) -> Callable:
    def hook(ptrs, value, mask, *args, **kwargs):
        res = orig(ptrs, value, mask, *args, **kwargs)
        sessions = _sessions()
        if sessions:
            _record(sessions, _active_addresses(ptrs, mask), _elem_bytes(ptrs), store=True)
        return res

    return hook


def _hook_atomic_rmw(orig: Callable) -> Callable:
    def hook(rmw_op, ptr, val, mask, *args, **kwargs):
        res = orig(rmw_op, ptr, val, mask, *args, **kwargs)
        sessions = _sessions()
        if sessions:
            addrs = _active_addresses(ptr, mask)
            nbytes = _elem_bytes(ptr)
            _record(sessions, addrs, nbytes, store=False)
            _record(sessions, addrs, nbytes, store=True)
            if getattr(rmw_op, "name", "") == "FADD" and _is_float(val):
                _add(sessions, "flops", int(addrs.size))
        return res

    return hook


def _hook_atomic_cas(orig: Callable) -> Callable:
    def hook(ptr, cmp, val, *args, **kwargs):
        res = orig(ptr, cmp, val, *args, **kwargs)
        sessions = _sessions()
        if sessions:
            nbytes = _elem_bytes(ptr)
            addrs = np.asarray(ptr.data)
            _record(sessions, addrs.reshape(-1), nbytes, store=False)
            swapped = np.broadcast_to(np.asarray(res.data) == np.asarray(cmp.data), addrs.shape)
            _record(sessions, addrs[swapped], nbytes, store=True)
        return res

    return hook


def _hook_flop(per_elem: int) -> Callable[[Callable], Callable]:
    def factory(orig: Callable) -> Callable:
        def hook(*args, **kwargs):
            res = orig(*args, **kwargs)
            sessions = _sessions()
            if sessions and args and _is_float(args[0]):
                _add(sessions, "flops", per_elem * int(np.asarray(res.data).size))
            return res

        return hook

    return factory


def _hook_transcendental(orig: Callable) -> Callable:
    def hook(*args, **kwargs):
        res = orig(*args, **kwargs)
        sessions = _sessions()
        if sessions and args and _is_float(args[0]):
            _add(sessions, "transcendentals", int(np.asarray(res.data).size))
        return res

    return hook


def _hook_dot(orig: Callable) -> Callable:
    def hook(a, b, *args, **kwargs):
        res = orig(a, b, *args, **kwargs)
        sessions = _sessions()
        if sessions:
            k = int(np.asarray(a.data).shape[-1])
            _add(sessions, "flops", 2 * int(np.asarray(res.data).size) * k)
        return res

    return hook


def _hook_dot_scaled(orig: Callable) -> Callable:
    def hook(lhs, lhs_scale, lhs_format, *args, **kwargs):
        res = orig(lhs, lhs_scale, lhs_format, *args, **kwargs)
        sessions = _sessions()
        if sessions:
            k = int(np.asarray(lhs.data).shape[-1])
            lhs_k_pack = kwargs.get("lhs_k_pack", args[4] if len(args) > 4 else True)
            if getattr(lhs_format, "name", "") == "E2M1" and lhs_k_pack:
                k *= 2  # two e2m1 values per byte, packed along K
            _add(sessions, "flops", 2 * int(np.asarray(res.data).size) * k)
        return res

    return hook


def _hook_count(attr: str) -> Callable[[Callable], Callable]:
    def factory(orig: Callable) -> Callable:
        def hook(*args, **kwargs):
            res = orig(*args, **kwargs)
            _add(_sessions(), attr, 1)
            return res

        return hook

    return factory


def _reduced_size(data: np.ndarray, axis: int | None) -> int:
    if axis is None or data.ndim == 0:
        return 1
    length = data.shape[axis]
    return data.size // length if length else 0


def _hook_reduce(orig: Callable) -> Callable:
    # ReduceOps.sum(self, input) / ReduceOps.min_max(self, input, val_reduce_op, idx_reduce_op)
    def hook(self, input, *args, **kwargs):
        res = orig(self, input, *args, **kwargs)
        sessions = _sessions()
        value = input[0] if isinstance(input, tuple) else input
        if sessions and _is_float(value.handle):
            data = np.asarray(value.handle.data)
            _add(sessions, "flops", int(data.size) - _reduced_size(data, self.axis))
        return res

    return hook


def _hook_scan(orig: Callable) -> Callable:
    # ScanOps.cumsum(self, input) / ScanOps.cumprod(self, input)
    def hook(self, input, *args, **kwargs):
        res = orig(self, input, *args, **kwargs)
        sessions = _sessions()
        if sessions and _is_float(input.handle):
            data = np.asarray(input.handle.data)
            _add(sessions, "flops", int(data.size) - _reduced_size(data, self.axis))
        return res

    return hook


# ---------------------------------------------------------------------------------------------------
# Installation
# ---------------------------------------------------------------------------------------------------
