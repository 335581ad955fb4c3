"""Exact work counters for Triton kernels run under Triton's interpreter.

``instrument()`` temporarily hooks the interpreter's global ``InterpreterBuilder`` instance
(``triton.runtime.interpreter.interpreter_builder``) plus the interpreter's numpy fast paths for
reductions and scans, so that every ``InterpretedFunction`` launch inside the ``with`` block is
counted from what the interpreter actually executes.  The kernel source is never touched.

Launching kernels
-----------------
Set ``TRITON_INTERPRET=1`` in the environment *before* ``triton`` is imported (the environment variable
is read when ``@triton.jit`` decorates a function, and ``triton.language.standard`` -- ``tl.sum``,
``tl.max``, ``tl.softmax``, ``tl.sigmoid``, ``tl.cdiv``, ... -- is decorated when ``triton`` is
imported).  Then ``@triton.jit`` returns an ``InterpretedFunction`` and ``kernel[grid](...)`` runs it
on the CPU with torch CPU tensors.  Wrapping a plain function with
``triton.runtime.interpreter.InterpretedFunction(fn)`` without the environment variable also works,
but only for kernels that use builtins exclusively: any call into a standard-library ``@jit``
function then fails with "Cannot call @triton.jit'd outside of the scope of a kernel".
This module imports ``triton`` lazily (on the first ``instrument()``), so importing it does not fix
the interpreter mode too early.

Memory traffic
--------------
``create_masked_load`` / ``create_masked_store`` are the only memory hooks needed for plain accesses:
the interpreter's ``create_load`` / ``create_store`` (unmasked), atomic load/store, tensor-descriptor
load/store/gather/scatter all delegate to them.  A lane counts only if its mask is true; masked-off
lanes of ``tl.load(p, mask=m, other=0)`` are not read (the interpreter fills them from ``other``) and
are not counted.  Bytes are ``active lanes * element size`` (``int1`` pointers are loaded as
``int8``; pointer elements are 8 bytes).  Every executed access counts (no cache model): loading
the same address twice counts twice.  ``create_atomic_rmw`` counts its active lanes as one load and
one store each; ``create_atomic_cas`` counts every lane as loaded and the lanes whose old value
equalled ``cmp`` as stored.

Regions: ``instrument({"K": k, ...})`` attributes each active lane to every region whose address
span contains the lane's address.  A region's span is the extent of the tensor *view*:
``[data_ptr, data_ptr + (1 + sum((size_i - 1) * stride_i)) * element_size)`` (empty if ``numel`` is 0),
so overlapping views (e.g. interleaved q/k/v slices of one buffer) can both be credited for one lane.
Regions must be CPU tensors: the interpreter aliases CPU storages (kernel addresses equal
``data_ptr()``), but copies device tensors to fresh host buffers, whose addresses cannot be known in
advance.

Load statements: ``instrument(lines={"visit": ("_attn_fwd", "v0 = tl.load(")})`` also counts how often loads
issued by given source lines of the kernels execute (masked or not, whatever their mask): the hook walks up
from the load to the kernel's frame (named by its function) and matches the stripped source line's beginning.
This counts loop iterations exactly (e.g. visited key tiles: the value tile is loaded once per visited tile).

Flop conventions (per element of the result, floating-point operands only)
--------------------------------------------------------------------------
Arithmetic has no mask, so every lane of the block counts, including padding lanes whose loads and
stores were masked off: a masked vector add of ``n = 100`` with ``BLOCK = 64`` moves ``3 * 100``
elements but executes ``2 * 64 = 128`` adds.  This is what the hardware executes, and it is consistent
with ``tl.dot`` being counted per full tile.

* 1 flop: ``fadd``, ``fsub``, ``fmul``, ``fdiv`` (also ``precise_divf``/``approx_divf``), ``frem``,
  ``fneg`` (unary minus on floats), ``minimumf``/``maximumf``/``minnumf``/``maxnumf``
  (``tl.minimum``/``tl.maximum``).
* 2 flops: ``fma`` (``tl.fma``) and ``clampf`` (``tl.clamp``: one max and one min).
* 0 flops: comparisons, ``select``/``tl.where``, casts and bitcasts, ``abs``, ``floor``, ``ceil``, all
  integer and pointer arithmetic (``create_add``/``create_mul``/``create_addptr``/... are never hooked,
  and hooked float ops additionally require a floating operand dtype), loads/stores.
* ``tl.dot``: ``2 * M * N * K`` per call, times the product of any batch dimensions, for every operand
  dtype (int8 MMA included); the accumulator add is part of it.  ``tl.dot_scaled`` likewise, with
  ``K`` the unpacked contraction length.
* Reductions (``tl.sum``, ``tl.max``, ``tl.min``, ``tl.argmax``/``tl.argmin``) over floats:
  ``n_in - n_out`` flops (reducing ``n`` elements to one takes ``n - 1`` binary ops).  The interpreter
  evaluates these with numpy directly (bypassing the builder), so ``ReduceOps.sum`` and
  ``ReduceOps.min_max`` are hooked.  Custom combine functions go through the interpreter's
  generic path, which calls the builder once per combine, giving the same ``n_in - n_out`` combines.
* Scans (``tl.cumsum``, ``tl.cumprod``) over floats: ``n - n / scan_length`` flops (``ScanOps.cumsum``
  and ``ScanOps.cumprod`` hooked); custom scans go through the builder.
* ``atomic_add`` on floats: 1 flop per active lane.

Transcendentals (1 per element, *not* also counted as flops): ``exp``, ``exp2``, ``log``, ``log2``,
``sin``, ``cos``, ``sqrt``, ``sqrt_rn`` (``precise_sqrt``), ``rsqrt``, ``erf``.  Composite standard
functions are counted through their parts, e.g. ``tl.sigmoid(x) = 1 / (1 + exp(-x))`` is 3 flops
(neg, add, div) + 1 transcendental per element.

Other interpreter facts worth knowing
-------------------------------------
* Python ``float`` kernel arguments are not turned into tensors by the interpreter, so arithmetic
  among them (``sm_scale * 1.44269504``) runs in plain Python and is not counted; once such a value
  meets a tensor it is splatted and the op is counted per element.  Constexpr arithmetic is never
  counted.
* The grid is executed serially (x outermost, then y, z) by one process-global builder, so one
  launch is inherently single-threaded; ``programs`` counts ``set_grid_idx`` calls and ``launches``
  counts ``set_grid_dim`` calls.

Thread-safety and nesting
-------------------------
Hooks are installed on entry of the outermost ``instrument()`` (reference counted under a lock) and
removed, restoring the original attributes, when the last one exits -- also on exceptions.  Events
are credited to the ``instrument()`` blocks active *in the calling thread* (all of them, when nested),
so concurrent threads each running their own launch under their own ``instrument()`` do not mix
counts.
"""

from __future__ import annotations

import linecache
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

__all__ = ["Counters", "instrument"]


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
class _Session:
    counters: Counters
    regions: list[tuple[str, np.uint64, np.uint64]]
    lines: dict[str, dict[str, str]] = field(default_factory=dict)   # function -> {line prefix: label}


_MISSING = object()
_LOCK = threading.RLock()
_TLS = threading.local()
_install_count = 0
_saved: list[tuple[Any, str, Any]] = []

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


def _sessions() -> list[_Session]:
    return getattr(_TLS, "sessions", None) or []


def _is_float(handle: Any) -> bool:
    dtype = getattr(handle, "dtype", None)
    is_floating = getattr(dtype, "is_floating", None)
    return bool(is_floating()) if is_floating is not None else False


def _elem_bytes(ptrs: Any) -> int:
    import triton.language as tl

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


def _record(sessions: list[_Session], addrs: np.ndarray, nbytes: int, store: bool) -> None:
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


def _add(sessions: list[_Session], attr: str, amount: int) -> None:
    if amount:
        for s in sessions:
            setattr(s.counters, attr, getattr(s.counters, attr) + amount)


# ---------------------------------------------------------------------------------------------------
# Hook factories: each takes the original callable and returns a wrapper that forwards to it.
# ---------------------------------------------------------------------------------------------------


def _record_line(sessions: list[_Session]) -> None:
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
        for prefix, label in s.lines.get(frame.f_code.co_name, {}).items():
            if text.startswith(prefix):
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


def _patch(obj: Any, name: str, factory: Callable[[Callable], Callable]) -> None:
    prev = obj.__dict__.get(name, _MISSING)
    orig = getattr(obj, name)
    setattr(obj, name, factory(orig))
    _saved.append((obj, name, prev))


def _restore() -> None:
    while _saved:
        obj, name, prev = _saved.pop()
        if prev is _MISSING:
            delattr(obj, name)
        else:
            setattr(obj, name, prev)


def _install() -> None:
    from triton.runtime import interpreter as interp

    builder = interp.interpreter_builder
    try:
        _patch(builder, "create_masked_load", _hook_masked_load)
        _patch(builder, "create_masked_store", _hook_masked_store)
        _patch(builder, "create_atomic_rmw", _hook_atomic_rmw)
        _patch(builder, "create_atomic_cas", _hook_atomic_cas)
        _patch(builder, "create_dot", _hook_dot)
        if hasattr(builder, "create_dot_scaled"):
            _patch(builder, "create_dot_scaled", _hook_dot_scaled)
        for name, per_elem in _FLOP_OPS.items():
            if hasattr(builder, name):
                _patch(builder, name, _hook_flop(per_elem))
        for name in _TRANSCENDENTAL_OPS:
            if hasattr(builder, name):
                _patch(builder, name, _hook_transcendental)
        _patch(builder, "set_grid_idx", _hook_count("programs"))
        _patch(builder, "set_grid_dim", _hook_count("launches"))
        _patch(interp.ReduceOps, "sum", _hook_reduce)
        _patch(interp.ReduceOps, "min_max", _hook_reduce)
        _patch(interp.ScanOps, "cumsum", _hook_scan)
        _patch(interp.ScanOps, "cumprod", _hook_scan)
    except BaseException:
        _restore()
        raise


def _region_span(name: str, t: torch.Tensor) -> tuple[str, np.uint64, np.uint64]:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"region {name!r} must be a torch.Tensor, got {type(t).__name__}")
    if t.device.type != "cpu":
        raise ValueError(
            f"region {name!r} is on {t.device}; the interpreter copies non-CPU tensors to host buffers, "
            "so only CPU tensors can be attributed by address"
        )
    lo = int(t.data_ptr())
    if t.numel() == 0:
        return name, np.uint64(lo), np.uint64(lo)
    extent = 1 + sum((size - 1) * stride for size, stride in zip(t.shape, t.stride()))
    return name, np.uint64(lo), np.uint64(lo + extent * t.element_size())


@contextmanager
def instrument(regions: dict[str, torch.Tensor] | None = None,
               lines: dict[str, tuple[str, str]] | None = None) -> Iterator[Counters]:
    """Count the work of every interpreted Triton launch executed in this thread inside the block.

    Args:
        regions: optional mapping ``name -> CPU tensor``; loads and stores are additionally attributed
            to each named tensor whose address span contains the accessed lane (see module docstring).
            Every name appears in the ``*_by_region`` dictionaries, with 0 if never touched.
        lines: optional mapping ``label -> (kernel function name, source line prefix)``: load operations
            issued by a matching line are counted in ``load_calls_by_line[label]`` (0 if never run).

    Yields:
        A ``Counters`` object updated live while kernels run; final once the block exits.

    Example::

        with instrument({"K": k}) as c:
            kernel[grid](q, k, v, o, ...)
        key_tiles = c.load_calls_by_region["K"]
    """
    spans = [_region_span(name, t) for name, t in (regions or {}).items()]
    counters = Counters()
    for name, _, _ in spans:
        counters.loads_by_region[name] = 0
        counters.load_calls_by_region[name] = 0
        counters.stores_by_region[name] = 0
        counters.store_calls_by_region[name] = 0
    by_fn: dict[str, dict[str, str]] = {}
    for label, (fn, prefix) in (lines or {}).items():
        by_fn.setdefault(fn, {})[prefix] = label
        counters.load_calls_by_line[label] = 0
    session = _Session(counters, spans, by_fn)

    global _install_count
    with _LOCK:
        if _install_count == 0:
            _install()
        _install_count += 1
    stack = getattr(_TLS, "sessions", None)
    if stack is None:
        stack = _TLS.sessions = []
    stack.append(session)
    try:
        yield counters
    finally:
        stack.remove(session)
        with _LOCK:
            _install_count -= 1
            if _install_count == 0:
                _restore()
