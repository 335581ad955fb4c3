"""Ahead-of-time compilation of Triton kernels for an NVIDIA target, without a GPU.

``aot_compile`` runs Triton's full pipeline (TTIR -> TTGIR -> LLVM -> PTX -> cubin) for a chosen
``sm_XX`` target and reports what the compiled kernel needs: registers per thread, spill bytes,
shared memory, and whether Hopper ``wgmma`` instructions were emitted. ``fits`` says whether such a
kernel can launch on that target. Only the ``ptxas`` and ``cuobjdump`` binaries bundled with Triton
are used; no CUDA driver is touched.
"""
from __future__ import annotations

import contextlib
import dataclasses
import importlib
import importlib.util
import io
import os
import pickle
import re
import subprocess
import sys
import tempfile
import time
import traceback
import types
from typing import Any

import triton
from triton import knobs
from triton.backends.compiler import GPUTarget
from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability
from triton.language import standard
from triton.runtime.interpreter import InterpretedFunction
from triton.runtime.jit import JITFunction

from moa.errors import UnsupportedError

__all__ = ["SHARED_LIMITS", "TARGETS", "AotReport", "aot_compile", "fits"]

# Target name -> compute capability passed to triton's GPUTarget. Triton itself compiles
# capability 90 for sm_90a (wgmma needs the arch-specific variant), so "sm_90" and "sm_90a" agree.
TARGETS: dict[str, int] = {"sm_80": 80, "sm_86": 86, "sm_89": 89, "sm_90": 90, "sm_90a": 90}

# Largest shared memory one CTA may use (the CUDA "opt-in" per-block limit), by capability.
SHARED_LIMITS: dict[int, int] = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024}

MAX_REGISTERS_PER_THREAD = 255
REGISTERS_PER_SM = 64 * 1024

_SPILL_RE = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")
_USED_REGS_RE = re.compile(r"Used (\d+) registers")
_RES_USAGE_RE = re.compile(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)")
# Key that carries the ptxas log from the compile hook into triton's (cached) kernel metadata.
_LOG_KEY = "moa_ptxas_log"


@dataclasses.dataclass(frozen=True)
class AotReport:
    """Resources of one kernel compiled ahead of time for one target.

    ``shared_bytes`` is Triton's dynamic shared-memory allocation (``metadata.shared``) plus the
    static shared memory ptxas put into the cubin (``cuobjdump -res-usage`` SHARED), i.e. what
    counts against the per-block opt-in limit at launch.
    """

    registers: int
    spills: int
    shared_bytes: int
    uses_wgmma: bool
    num_warps: int
    num_stages: int
    block_m: int | None
    block_n: int | None
    ptx: str
    cubin: bytes
    target: str
    name: str = ""
    static_shared_bytes: int = 0
    local_bytes: int = 0
    compile_seconds: float = 0.0
    ptxas_log: str = ""
    schedule: str = ""      # the ONF kind compiled (tiled, hops, residue s=...), when known
    constants: tuple = ()   # (name, value) of every constexpr but strides: tile sizes, head dims, flags

    def constant(self, name: str, default=None):
        """The value of constexpr `name` the kernel was compiled with (``default`` when it has none)."""
        return dict(self.constants).get(name, default)

    @property
    def uses_tma(self) -> bool:
        """Whether the kernel loads tiles through TMA tensor descriptors (bulk tensor copies in its PTX)."""
        return "cp.async.bulk.tensor" in self.ptx

    def summary(self) -> str:
        """One line: kernel, target, config and resources."""
        blocks = f" BLOCK_M={self.block_m} BLOCK_N={self.block_n}" if self.block_m or self.block_n else ""
        if not blocks and self.constants:
            blocks = "".join(f" {k}={v}" for k, v in self.constants)
        sched = f" [{self.schedule} schedule]" if self.schedule else ""
        return (f"{self.name}{sched} on {self.target} (num_warps={self.num_warps} "
                f"num_stages={self.num_stages}{blocks}):"
                f" {self.registers} registers, {self.spills} spill bytes, {self.shared_bytes} B shared,"
                f" wgmma={'yes' if self.uses_wgmma else 'no'}")


def _capability(target: str) -> int:
    try:
        return TARGETS[target.strip().lower()]
    except KeyError:
        raise UnsupportedError(
            f"unknown GPU target {target!r}; supported targets: {', '.join(sorted(TARGETS))}") from None


def fits(report: AotReport, target: str | None = None) -> tuple[bool, str]:
    """Whether the kernel in ``report`` can launch on ``target`` (default: the report's own target).

    Checks: no register spills, ``shared_bytes`` within the target's per-block limit (227 KiB on
    sm_90, 163 KiB on sm_80), at most 255 registers per thread and at most 64K registers per CTA.
    Returns ``(ok, reason)``; ``reason`` is ``"ok"`` or lists every violated limit. A report with
    several kernels (a ``kernels`` attribute and a ``fits`` method, e.g.
    runtime/form_configs.FormAotReport) fits when each of them does.
    """
    if hasattr(report, "kernels"):
        return report.fits(target)
    tgt = target or report.target
    cap = _capability(tgt)
    problems = []
    if report.spills:
        problems.append(f"{report.spills} bytes of register spills")
    limit = SHARED_LIMITS[cap]
    if report.shared_bytes > limit:
        problems.append(f"shared memory {report.shared_bytes} B exceeds the {limit} B limit of {tgt}")
    if report.registers > MAX_REGISTERS_PER_THREAD:
        problems.append(f"{report.registers} registers per thread exceed {MAX_REGISTERS_PER_THREAD}")
    threads = report.num_warps * 32
    if report.registers * threads > REGISTERS_PER_SM:
        problems.append(f"{report.registers} registers x {threads} threads exceed the {REGISTERS_PER_SM}"
                        " registers of an SM")
    return (not problems, "; ".join(problems) if problems else "ok")


# long: the public AOT entry point; its docstring states the whole contract
def aot_compile(fn, signature: dict[str, str], constexprs: dict[str, object], *, target: str = "sm_90",
                num_warps: int = 4, num_stages: int = 3, block_m: int | None = None,
                block_n: int | None = None, options: dict[str, Any] | None = None,
                divisible: tuple = ()) -> AotReport:
    """Compile the Triton kernel ``fn`` for ``target`` without a GPU and report its resource usage.

    ``fn`` is a ``triton.jit`` function (a ``JITFunction``, or the ``InterpretedFunction`` that
    ``triton.jit`` returns under ``TRITON_INTERPRET=1``). ``signature`` maps each runtime argument
    to a Triton type (``"*fp16"``, ``"i32"``, ``"fp32"`` ...); ``constexprs`` gives the value of every
    ``tl.constexpr`` parameter (they may be left out of ``signature``). ``block_m``/``block_n`` are
    recorded in the report; when the kernel has a ``BLOCK_M``/``BLOCK_N`` parameter that
    ``constexprs`` does not set, they are passed as its value, and when left as None they are read
    back from ``constexprs``. ``options`` adds other Triton compile options (``maxnreg``,
    ``ptx_options``, ``enable_fp_fusion`` ...). ``divisible`` names the arguments a CUDA launch's JIT would
    mark divisible by 16 (``tt.divisibility``: 16-byte aligned pointers, integers that are multiples of 16):
    the specialisation that lets Triton vectorise loads and software-pipeline the key loop.

    Raises ``UnsupportedError`` (naming the kernel, target and problem) when Triton or ptxas cannot
    compile the kernel, including when its shared memory exceeds the target's limit (checked before
    PTX generation); the error's ``detail`` attribute keeps Triton's full message. Register and
    spill limits are not enforced here: check the report with ``fits``.

    When ``TRITON_INTERPRET=1`` was set as Triton was imported, ``triton.language`` itself is made
    of interpreter functions and cannot generate code in this process; the kernel is then compiled
    in a child Python without that variable, which must be able to import it again (a module-level
    function of a module or file).
    """
    cap = _capability(target)
    if _language_is_interpreted():
        return _compile_in_child(fn, signature, constexprs, {
            "target": target, "num_warps": num_warps, "num_stages": num_stages, "block_m": block_m,
            "block_n": block_n, "options": options, "divisible": tuple(divisible)})

    jit_fn = _as_jit_function(fn)
    name = jit_fn.__name__
    constexprs = dict(constexprs)
    for param, value in (("BLOCK_M", block_m), ("BLOCK_N", block_n)):
        if value is not None and param in jit_fn.arg_names:
            given = constexprs.setdefault(param, value)
            if given != value:
                raise ValueError(f"{name}: {param}={given} in constexprs but {param.lower()}={value}")
    block_m = block_m if block_m is not None else _as_int(constexprs.get("BLOCK_M"))
    block_n = block_n if block_n is not None else _as_int(constexprs.get("BLOCK_N"))
    full_sig = _full_signature(jit_fn, signature, constexprs)
    config = (f"kernel {name!r} for {target} (num_warps={num_warps}, num_stages={num_stages}"
              + "".join(f", {k}={v}" for k, v in constexprs.items()) + ")")
    shared_limit = SHARED_LIMITS[cap]

    t0 = time.perf_counter()
    try:
        # stdout is swallowed: on a ptxas failure triton prints the whole PTX there.
        with knobs.runtime.scope(), knobs.nvidia.scope(), contextlib.redirect_stdout(io.StringIO()):
            knobs.runtime.interpret = False  # constexpr handling differs in interpreter mode
            knobs.nvidia.dump_ptxas_log = True  # triton prints the ptxas -v log; captured below
            knobs.runtime.add_stages_inspection_hook = _make_hook(shared_limit)
            attrs = {(jit_fn.arg_names.index(a),): [["tt.divisibility", 16]] for a in divisible
                     if a in jit_fn.arg_names and a not in constexprs}
            src = triton.compiler.ASTSource(fn=jit_fn, signature=full_sig, constexprs=constexprs, attrs=attrs)
            kernel = triton.compile(src, target=GPUTarget("cuda", cap, 32),
                                    options={"enable_fp_fusion": True, **(options or {}), "num_warps": num_warps,
                                             "num_stages": num_stages})
    except _SharedOverflow as e:
        raise UnsupportedError(f"cannot compile {config}: needs {e.needed} bytes of shared memory, "
                               f"more than the {shared_limit} bytes {target} allows per block") from None
    # Triton raises many types (CompilationError, PTXASError, RuntimeError, AssertionError ...);
    # every one becomes an UnsupportedError.
    except Exception as e:  # noqa: BLE001
        err = UnsupportedError(f"cannot compile {config}: {_describe(e)}")
        err.detail = f"{type(e).__name__}: {e}"
        raise err from None
    seconds = time.perf_counter() - t0

    md = kernel.metadata
    ptx: str = kernel.asm["ptx"]
    cubin: bytes = kernel.asm["cubin"]
    ptxas_log = getattr(md, _LOG_KEY, None) or _run_ptxas(ptx, cap, md)
    spills = sum(int(s) + int(ld) for s, ld in _SPILL_RE.findall(ptxas_log))
    usage = _res_usage(cubin)
    if usage is not None:
        registers, static_shared, local = usage
    else:  # cuobjdump unavailable: fall back on the ptxas log
        m = _USED_REGS_RE.search(ptxas_log)
        if m is None:
            raise UnsupportedError(f"cannot read the register count of {config} from ptxas or cuobjdump")
        registers, static_shared, local = int(m.group(1)), 0, 0
    return AotReport(
        registers=registers, spills=spills, shared_bytes=int(md.shared or 0) + static_shared,
        uses_wgmma="wgmma.mma_async" in ptx, num_warps=num_warps, num_stages=num_stages,
        block_m=block_m, block_n=block_n, ptx=ptx, cubin=cubin, target=target, name=md.name,
        static_shared_bytes=static_shared, local_bytes=local, compile_seconds=seconds, ptxas_log=ptxas_log,
        constants=tuple((k, v) for k, v in constexprs.items() if not k.startswith("stride_")))


# --------------------------------------------------------------------------------------------------
# helpers

class _SharedOverflow(Exception):
    def __init__(self, needed: int):
        super().__init__(needed)
        self.needed = needed


def _make_hook(shared_limit: int):
    """A triton stages hook: stop before PTX when shared memory is over the limit (ptxas on such
    kernels can take minutes), and keep the ptxas log printed by the cubin stage in the metadata."""
    def hook(backend=None, stages=None, options=None, language=None, capability=None):
        if stages is None:  # triton asks for a cache key first
            return f"moa-aot-{shared_limit}", "moa-aot"
        make_ptx, make_cubin = stages["ptx"], stages["cubin"]

        def ptx_stage(src, metadata):
            if (metadata.get("shared") or 0) > shared_limit:
                raise _SharedOverflow(metadata["shared"])
            return make_ptx(src, metadata)

        def cubin_stage(src, metadata):
            out = io.StringIO()
            with contextlib.redirect_stdout(out):
                cubin = make_cubin(src, metadata)
            metadata[_LOG_KEY] = out.getvalue()
            return cubin

        stages["ptx"], stages["cubin"] = ptx_stage, cubin_stage
    return hook


def _as_jit_function(fn):
    """A ``JITFunction`` for ``fn``, rebuilding one when ``triton.jit`` made an InterpretedFunction."""
    if isinstance(fn, JITFunction):
        return fn
    return _rebuild(fn, {})


def _rebuild(fn, memo: dict):
    if isinstance(fn, JITFunction):
        return fn
    if not isinstance(fn, InterpretedFunction):
        raise TypeError(f"expected a triton.jit function, got {type(fn).__name__}")
    if id(fn) in memo:
        return memo[id(fn)]
    py = fn.fn
    # The kernel's globals may name other interpreted @triton.jit helpers: give it a copy of its
    # module globals in which those are JITFunctions too (the module itself is left unchanged).
    glb = dict(py.__globals__)
    new_py = types.FunctionType(py.__code__, glb, py.__name__, py.__defaults__, py.__closure__)
    new_py.__kwdefaults__ = py.__kwdefaults__
    new_py.__dict__.update(py.__dict__)
    new_py.__module__, new_py.__qualname__, new_py.__doc__ = py.__module__, py.__qualname__, py.__doc__
    new_py.__annotations__ = dict(py.__annotations__)
    jit = JITFunction(new_py, **fn.kwargs)
    memo[id(fn)] = jit
    for key, value in py.__globals__.items():
        if isinstance(value, InterpretedFunction):
            glb[key] = _rebuild(value, memo)
    return jit


def _language_is_interpreted() -> bool:
    """True when triton.language was imported under TRITON_INTERPRET=1 (its @jit helpers such as
    tl.cdiv or tl.sum are then InterpretedFunctions, which code generation cannot call)."""
    return not isinstance(standard.cdiv, JITFunction)


def _compile_in_child(fn, signature, constexprs, kwargs) -> AotReport:
    """Run ``aot_compile`` in a fresh Python without TRITON_INTERPRET and return its report."""
    py = getattr(fn, "fn", fn)
    name = getattr(py, "__name__", repr(fn))
    qualname = getattr(py, "__qualname__", name)
    code = getattr(py, "__code__", None)
    if "<locals>" in qualname or code is None:
        raise UnsupportedError(
            f"cannot compile kernel {name!r} for {kwargs['target']}: TRITON_INTERPRET=1 was set when triton "
            "was imported, and only a module-level kernel can be recompiled in a separate process")
    request = {"module": py.__module__, "file": code.co_filename, "qualname": qualname,
               "signature": signature, "constexprs": constexprs, "kwargs": kwargs}
    # the child must generate code: its triton.language must not be interpreted
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
    with tempfile.TemporaryDirectory(prefix="moa-aot-") as tmp:
        req_path, resp_path = os.path.join(tmp, "request.pkl"), os.path.join(tmp, "response.pkl")
        with open(req_path, "wb") as f:
            pickle.dump(request, f)
        script = f"import importlib; importlib.import_module({__name__!r})._child_main()"
        proc = subprocess.run([sys.executable, "-c", script, req_path, resp_path], env=env, check=False,
                              capture_output=True, text=True)
        response = None
        if os.path.exists(resp_path):
            with open(resp_path, "rb") as f:
                response = pickle.load(f)
    if response is None:
        tail = " ".join(proc.stderr.strip().splitlines()[-3:])
        raise UnsupportedError(f"cannot compile kernel {name!r} for {kwargs['target']}: the compile "
                               f"process (needed under TRITON_INTERPRET=1) failed: {_clip(tail)}")
    if "error" in response:
        kind, message = response["error"]
        raise (ValueError if kind == "ValueError" else TypeError if kind == "TypeError"
               else UnsupportedError)(message)
    return AotReport(**response["report"])


def _child_main() -> None:
    """Entry point of the child process started by ``_compile_in_child``."""
    req_path, resp_path = sys.argv[1], sys.argv[2]
    with open(req_path, "rb") as f:
        req = pickle.load(f)
    try:
        fn = _load_kernel(req["module"], req["file"], req["qualname"])
        report = aot_compile(fn, req["signature"], req["constexprs"], **req["kwargs"])
        response: dict[str, Any] = {"report": dataclasses.asdict(report)}
    except (UnsupportedError, ValueError, TypeError) as e:
        message = e.message if isinstance(e, UnsupportedError) else str(e)
        response = {"error": (type(e).__name__, message)}
    with open(resp_path, "wb") as f:
        pickle.dump(response, f)


def _load_kernel(module: str, file: str, qualname: str):
    """The kernel ``module.qualname``: imported by name, else executed from ``file``."""
    mod = None
    if module not in ("__main__", "__mp_main__"):
        with contextlib.suppress(ImportError):
            mod = importlib.import_module(module)
    if mod is None or os.path.abspath(getattr(mod, "__file__", "") or "") != os.path.abspath(file):
        spec = importlib.util.spec_from_file_location("_moa_aot_kernel", file)
        if spec is None or spec.loader is None:
            raise UnsupportedError(f"cannot load the kernel module {file}")
        mod = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = mod
        spec.loader.exec_module(mod)
    obj = mod
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


def _full_signature(jit_fn, signature: dict[str, str], constexprs: dict[str, Any]) -> dict[str, str]:
    """The signature triton wants: every parameter in order, constexprs typed ``"constexpr"``."""
    unknown = (set(signature) | set(constexprs)) - set(jit_fn.arg_names)
    if unknown:
        raise ValueError(f"{jit_fn.__name__} has no parameter(s) {', '.join(sorted(unknown))}")
    full = {}
    for arg in jit_fn.arg_names:
        if arg in constexprs:
            full[arg] = "constexpr"
        elif arg in signature:
            full[arg] = signature[arg]
        else:
            raise ValueError(f"{jit_fn.__name__}: parameter {arg!r} is in neither signature nor constexprs")
    return full


def _as_int(value) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _describe(e: Exception) -> str:
    """A short statement of what went wrong, without triton's traceback or the kernel's PTX."""
    if hasattr(e, "node") and hasattr(e, "src"):  # triton.CompilationError and its subclasses
        return _describe_frontend(e)
    text = str(e)
    lower = text.lower()
    if "shared" in lower and any(w in lower for w in ("too much", "out of", "exceed")):
        kind = "out of shared memory"
    elif "register" in lower and any(w in lower for w in ("too many", "out of", "exceed")):
        kind = "out of registers"
    elif type(e).__name__ == "PTXASError":
        kind = "ptxas failed"
    else:
        kind = f"triton {type(e).__name__}"
    # Keep ptxas/MLIR diagnostic lines; drop the repro command and anything else.
    diag = [ln.strip() for ln in text.splitlines()
            if re.search(r"\b(error|fatal|out of|too (much|many)|exceeds?)\b", ln, re.IGNORECASE)
            and not ln.startswith("Repro command")]
    body = "; ".join(dict.fromkeys(diag)) if diag else " ".join(text.split())
    if not body and e.__traceback__ is not None:  # e.g. a bare assert inside triton: say where
        frame = traceback.extract_tb(e.__traceback__)[-1]
        body = f"raised at {os.path.basename(frame.filename)}:{frame.lineno}: {frame.line}"
    return f"{kind}: {_clip(body)}" if body else kind


def _describe_frontend(e: Exception) -> str:
    """A triton front-end error: its message and the offending kernel line."""
    message = getattr(e, "error_message", None)
    cause = e.__cause__ or e.__context__
    if not message and cause is not None:
        message = f"{type(cause).__name__}: {cause}"
    node, src = getattr(e, "node", None), getattr(e, "src", None)
    where = ""
    if node is not None and hasattr(node, "lineno") and src:
        lines = src.splitlines()
        if 1 <= node.lineno <= len(lines):
            where = f" (kernel line {node.lineno}: {lines[node.lineno - 1].strip()})"
    message = " ".join((message or str(e)).split())
    return f"triton {type(e).__name__}: {_clip(message)}{where}"


def _clip(text: str, limit: int = 600) -> str:
    return text if len(text) <= limit else text[:limit] + " ..."


def _tool(name: str) -> str | None:
    try:
        return getattr(knobs.nvidia, name).path
    except Exception:  # noqa: BLE001  (knobs raise RuntimeError, or OSError, when the tool is unusable)
        return None


def _res_usage(cubin: bytes) -> tuple[int, int, int] | None:
    """(registers, static shared bytes, local bytes) of the kernel in ``cubin``, from cuobjdump."""
    exe = _tool("cuobjdump")
    if exe is None:
        return None
    with tempfile.TemporaryDirectory(prefix="moa-aot-") as tmp:
        path = os.path.join(tmp, "kernel.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        proc = subprocess.run([exe, "-res-usage", path], check=False, capture_output=True, text=True)
    m = _RES_USAGE_RE.search(proc.stdout)
    if proc.returncode != 0 or m is None:
        return None
    return int(m.group(1)), int(m.group(3)), int(m.group(4))


def _run_ptxas(ptx: str, cap: int, md) -> str:
    """Re-run ptxas -v on ``ptx`` with the flags triton uses and return its log (used only when the
    log did not come through triton's metadata)."""
    cmd = [get_ptxas(cap).path, "-lineinfo", "-v", "--regAllocOptLevel=2",
           f"--gpu-name={sm_arch_from_capability(cap)}"]
    if not getattr(md, "enable_fp_fusion", True):
        cmd.append("--fmad=false")
    if getattr(md, "ptx_options", None):
        cmd += md.ptx_options.split()
    with tempfile.TemporaryDirectory(prefix="moa-aot-") as tmp:
        src = os.path.join(tmp, "kernel.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        proc = subprocess.run([*cmd, src, "-o", os.path.join(tmp, "kernel.cubin")],
                              check=False, capture_output=True, text=True)
    return proc.stdout + proc.stderr
