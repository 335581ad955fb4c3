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
from the load to the kernel's frame (named by its function) and matches the stripped source line's beginning,
or the line number when an int is given instead of a prefix.
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

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from triton.runtime import interpreter as interp

from . import measure_hooks as H
from .measure_hooks import Counters

__all__ = ["Counters", "instrument"]


_MISSING = object()
_LOCK = threading.RLock()
_install_count = 0
_saved: list[tuple[Any, str, Any]] = []


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
    builder = interp.interpreter_builder
    try:
        _patch(builder, "create_masked_load", H._hook_masked_load)
        _patch(builder, "create_masked_store", H._hook_masked_store)
        _patch(builder, "create_atomic_rmw", H._hook_atomic_rmw)
        _patch(builder, "create_atomic_cas", H._hook_atomic_cas)
        _patch(builder, "create_dot", H._hook_dot)
        if hasattr(builder, "create_dot_scaled"):
            _patch(builder, "create_dot_scaled", H._hook_dot_scaled)
        for name, per_elem in H._FLOP_OPS.items():
            if hasattr(builder, name):
                _patch(builder, name, H._hook_flop(per_elem))
        for name in H._TRANSCENDENTAL_OPS:
            if hasattr(builder, name):
                _patch(builder, name, H._hook_transcendental)
        _patch(builder, "set_grid_idx", H._hook_count("programs"))
        _patch(builder, "set_grid_dim", H._hook_count("launches"))
        _patch(interp.ReduceOps, "sum", H._hook_reduce)
        _patch(interp.ReduceOps, "min_max", H._hook_reduce)
        _patch(interp.ScanOps, "cumsum", H._hook_scan)
        _patch(interp.ScanOps, "cumprod", H._hook_scan)
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
    counters = H.Counters()
    for name, _, _ in spans:
        counters.loads_by_region[name] = 0
        counters.load_calls_by_region[name] = 0
        counters.stores_by_region[name] = 0
        counters.store_calls_by_region[name] = 0
    by_fn: dict[str, dict[str, str]] = {}
    for label, (fn, prefix) in (lines or {}).items():
        by_fn.setdefault(fn, {})[prefix] = label
        counters.load_calls_by_line[label] = 0
    session = H.Session(counters, spans, by_fn)

    global _install_count
    with _LOCK:
        if _install_count == 0:
            _install()
        _install_count += 1
    stack = getattr(H.TLS, "sessions", None)
    if stack is None:
        stack = H.TLS.sessions = []
    stack.append(session)
    try:
        yield counters
    finally:
        stack.remove(session)
        with _LOCK:
            _install_count -= 1
            if _install_count == 0:
                _restore()
