"""Where a generated kernel runs: Triton's interpreter for CPU tensors, a JIT launch for CUDA tensors.

There is no process-wide switch: moa neither sets nor needs TRITON_INTERPRET, so other Triton kernels in the
user's process keep compiling for the GPU, and `import triton` before `import moa` is fine. A module of
generated kernels is loaded as Triton JIT functions (CUDA) and, for CPU tensors, once more as interpreted
functions (`interpreted_module`). While an interpreted kernel runs, `interpreter()` lends the interpreter
Triton's standard library (tl.sum, tl.max, tl.sigmoid, tl.cdiv ... are JIT functions in a normal process) as
interpreted functions and restores it on exit, the way Triton's interpreter patches `tl` builtins for the
duration of a launch; it also lends the interpreter a tensor `__index__` that reads one-element arrays as scalars
(Triton 3.6 with numpy >= 2.4 failed on every tensor loop bound otherwise). When the user did set TRITON_INTERPRET=1,
Triton's own interpreted functions are used.
"""
from __future__ import annotations

import contextlib
import sys
import threading
import types
import warnings

import numpy as np
import torch
from triton.runtime import interpreter as triton_interpreter
from triton.runtime.interpreter import InterpretedFunction
from triton.runtime.jit import JITFunction

from moa.devices import get_device
from moa.errors import InputError, MoaError, UnsupportedError
from moa.symbolic import next_pow2  # noqa: F401  (the runtime's name for it)

_LOCK = threading.RLock()
_RUN = threading.RLock()     # held by a thread while it runs interpreted kernels (the interpreter is not thread-safe)
_DEPTH = [0]
_SAVED: list = []
_WRAPPED: dict = {}   # id(JITFunction) -> its InterpretedFunction (one per library function, reused)


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def check_device(device: torch.device) -> None:
    """CPU tensors run in the interpreter, CUDA tensors launch; anything else is the call's error."""
    if device.type not in ("cpu", "cuda"):
        raise InputError(f"tensors on {device} are not supported; use CPU (interpreter) or CUDA tensors")


def _interpreted(fn):
    if isinstance(fn, JITFunction):
        return _WRAPPED.setdefault(id(fn), InterpretedFunction(fn.fn))
    return fn


def interpret_module(module: types.ModuleType) -> types.ModuleType:
    """Turn the @triton.jit functions of a freshly executed generated module into interpreted functions, in
    place (they call each other through the module's globals). Its source must be in linecache under its
    __file__ (runtime/cache.py puts it there)."""
    for k, v in list(vars(module).items()):
        if isinstance(v, JITFunction):
            setattr(module, k, InterpretedFunction(v.fn))
    return module


def _language_objects() -> list:
    """Every object whose attributes Triton's interpreter patches during a launch: the triton.language modules and
    the tensor classes."""
    with contextlib.suppress(ImportError):   # imported lazily by Triton's argument mangling: never while patched
        import triton.experimental.gluon  # noqa: F401
    mods = [m for n, m in list(sys.modules.items()) if m is not None and n.startswith("triton.language")]
    core = sys.modules["triton.language.core"]
    classes = [getattr(core, c) for c in ("tensor", "tensor_descriptor_base", "tensor_descriptor") if hasattr(core, c)]
    return mods + classes


def _index_patch(original):
    """Triton's per-launch tensor patches, with `__index__` (a loop bound such as range(lo, hi, BLOCK_N)) read from a
    one-element array as a scalar: Triton 3.6's int(data) of a shape-(1,) array is an error from numpy 2.4 on
    (later Triton versions squeeze it, as here)."""
    def patch(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))
    patch.moa_index_patch = True
    return patch


def _lend() -> None:
    """Snapshot the language, then swap its JIT functions for interpreted ones."""
    objs = _language_objects()
    _SAVED.extend((obj, dict(vars(obj))) for obj in objs)
    original = getattr(triton_interpreter, "_patch_lang_tensor", None)
    if original is not None and not getattr(original, "moa_index_patch", False):
        _SAVED.append((triton_interpreter, {"_patch_lang_tensor": original}))
        triton_interpreter._patch_lang_tensor = _index_patch(original)
    for obj in objs:
        if isinstance(obj, types.ModuleType):
            for name, value in list(vars(obj).items()):
                if isinstance(value, JITFunction):
                    setattr(obj, name, _interpreted(value))


def _take_back() -> None:
    """Restore the snapshot: the interpreted library and whatever the interpreter patched inside device functions
    (it restores its launch-level patches itself, not those made by nested calls)."""
    missing = object()
    while _SAVED:   # names the interpreter added (the semantic its rewritten functions read) stay
        obj, snap = _SAVED.pop()
        now = vars(obj)
        for name, value in snap.items():
            if now.get(name, missing) is not value:
                setattr(obj, name, value)


@contextlib.contextmanager
def interpreter():
    """The scope of interpreted launches: Triton's standard library as interpreted functions, and numpy's
    floating-point warnings silenced (the untaken branch of a where, such as 0/0 or exp overflow of a masked
    score, is computed and discarded, as on a GPU), and numpy's "All-NaN slice" warning too (the max of a tile
    of NaN scores is NaN, as on a GPU). Re-entrant. One thread at a time: Triton's interpreter keeps its state in
    globals (interpreted launches from two threads at once failed with "Did you forget to add @triton.jit ?"), so
    the scope holds a re-entrant lock; the library and the warning filter (process-wide state too) are set by the
    outermost scope and restored when it exits."""
    with _RUN:
        with _LOCK:
            outermost = _DEPTH[0] == 0
            if outermost:
                _lend()
            _DEPTH[0] += 1
        try:
            with np.errstate(all="ignore"), warnings.catch_warnings() if outermost else contextlib.nullcontext():
                if outermost:   # a row tile of all-NaN scores (NaN inputs) makes numpy's nanmax warn; max is NaN
                    warnings.filterwarnings("ignore", "All-NaN slice encountered", RuntimeWarning)
                yield
        finally:
            with _LOCK:
                _DEPTH[0] -= 1
                if _DEPTH[0] == 0:
                    _take_back()


def run(fn, grid, args, consts: dict, device: torch.device, what: str) -> None:
    """fn[grid](*args, **consts) on `device` (in the interpreter scope for CPU tensors); a Triton failure is a bug
    of ours, reported as an UnsupportedError that names the kernel and keeps the cause."""
    try:
        if device.type == "cpu":
            with interpreter():
                fn[grid](*args, **consts)
        else:   # FMA contraction on, said explicitly (Triton 3.10 changes the default)
            fn[grid](*args, **{"enable_fp_fusion": True, **consts})
    except MoaError:
        raise
    except Exception as ex:
        raise UnsupportedError(f"{what} failed to run ({type(ex).__name__}: "
                               f"{str(ex).splitlines()[0][:300] if str(ex) else ''})") from ex


def device_table_name(device: torch.device) -> str:
    """The device-table entry (moa/devices.py) for a CUDA device; h100 when it is not in the table or cannot be
    named, and for CPU tensors (the schedule choice is a GPU prediction either way)."""
    if device.type == "cuda":
        try:
            name = torch.cuda.get_device_name(device)
            get_device(name)
            return name
        except (InputError, RuntimeError, AssertionError):   # unknown device; a torch build without CUDA
            pass
    return "h100"


def sm_count(device: torch.device) -> int:
    """The streaming multiprocessors of a CUDA device (its properties; the device table's where torch cannot say)."""
    try:
        return torch.cuda.get_device_properties(device).multi_processor_count
    except (RuntimeError, AssertionError):   # a torch build without CUDA
        return get_device(device_table_name(device)).sms
