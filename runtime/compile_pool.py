"""Compiling many Triton kernels at once: the AOT fit checks (runtime/aot_batch.py) and the JIT compiles of the tuning
candidates (runtime/tune.py `precompile`).

Triton's compile holds the GIL for most of its time (the MLIR passes and the LLVM translation; only ptxas is a
subprocess): measured on Triton 3.9 for sm_90, two threads compile four causal kernels no faster than one thread
(docs/runtime.md). Concurrency therefore needs processes. A batch of jobs goes to one fresh child Python
(`python -c`: the user's __main__ is never imported again, as a spawned multiprocessing worker would, and a parent
that initialised CUDA is never forked), which imports Triton but not torch, hashes Triton's sources (triton_key) and
forks up to `workers()` compile processes that inherit both. Nothing is started at import. A child (`Child`) serves
one batch, or every batch of a `with Child():` block (tune.precompile starts one before catching the launches: it
serves the AOT checks they make, then the JIT jobs), and ends with its workers when its parent is gone.

Jobs are of two kinds:
- an AOT request (runtime/aot_batch.py): aot_compile's AotReport, or ('error', message);
- a JIT job (`recording`): a kernel specialisation a CUDA launch was about to compile, caught through Triton's
  jit_cache_hook, compiled with triton.compile into Triton's on-disk cache under the key the launch's JIT computes
  (its ASTSource, options and target, as JITFunction.preload rebuilds them), so that the launch then only loads it.
  A job the child cannot compile, or whose key does not match, costs nothing but time: the launch compiles it.

`run_groups` schedules the jobs, in order, at most `workers` in flight, with the first-fit rule of aot_groups: a group
stops at its first item that fits (later items are compiled only speculatively, while workers are free, and only
with 4 workers or more: `speculates`) and a bundle at its first kernel that does not. The executor is injectable
(tests use threads and sleeping fakes)."""
from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import json
import linecache
import multiprocessing
import os
import pickle
import subprocess
import sys
import tempfile
import threading
import time
import types
from concurrent.futures import FIRST_COMPLETED, Future, wait

import triton
import triton.language as tl
from triton import knobs
from triton.backends.compiler import GPUTarget
from triton.compiler.compiler import make_backend
from triton.runtime import driver
from triton.runtime.cache import triton_key

from moa.errors import UnsupportedError

from . import aot as A

MAX_WORKERS = 16


def speculates(n: int) -> bool:
    """Whether first-fit compiles run ahead speculatively with n workers: with 4 or more (a machine with cores to
    spare); on fewer, measured on 2 busy cores, a speculative compile slows down the one that decides."""
    return n >= 4


def workers(jobs: int) -> int:
    """Compile processes for `jobs` jobs: MOA_COMPILE_WORKERS (MOA_AOT_JOBS, its older name), else one per
    available core (at most 16); never more than there are jobs, never fewer than 1."""
    n = 0
    for var in ("MOA_COMPILE_WORKERS", "MOA_AOT_JOBS"):
        try:
            n = int(os.environ.get(var, "0"))
        except ValueError:
            n = 0
        if n > 0:
            break
    if n <= 0:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        n = min(MAX_WORKERS, cores)
    return max(1, min(n, jobs))


# ---- the scheduler -------------------------------------------------------------------------------------------

class Inline:
    """An executor that runs each job as it is submitted (one worker: the serial order)."""

    def submit(self, fn, *args):
        f: Future = Future()
        try:
            f.set_result(fn(*args))
        except Exception as e:  # noqa: BLE001  (delivered through the future, as an executor does)
            f.set_exception(e)
        return f


def _item_state(done: dict, gi: int, ii: int, n: int, ok) -> tuple[str, int]:
    """(state, prefix) of item ii of group gi with n kernels: 'fits' (all compiled, all fit), 'fails' (a kernel does
    not fit and every kernel before it is compiled) or 'pending'; prefix: the kernels its result holds (up to its
    first kernel that does not fit)."""
    bad = next((k for k in range(n) if (gi, ii, k) in done and not ok(done[gi, ii, k], gi, ii, k)), None)
    if bad is None:
        return ("fits" if all((gi, ii, k) in done for k in range(n)) else "pending"), n
    return ("fails" if all((gi, ii, k) in done for k in range(bad)) else "pending"), bad + 1


def _group_state(done: dict, gi: int, sizes: list, ok) -> tuple[bool, int, list]:
    """(complete, items in the result, per item (state, prefix)) of a first-fit group."""
    states = [_item_state(done, gi, ii, n, ok) for ii, n in enumerate(sizes)]
    for ii, (s, _) in enumerate(states):
        if s == "fails":
            continue
        return s == "fits", ii + 1, states
    return True, len(sizes), states


def _needed(done: dict, gi: int, ii: int, k: int, sizes: list, ok, first_fit: bool, speculate: bool) -> bool:
    if not first_fit:
        return True
    complete, _, states = _group_state(done, gi, sizes, ok)
    if complete or any(s != "fails" if not speculate else s == "fits" for s, _ in states[:ii]):
        return False
    return k < states[ii][1]


def run_groups(groups: list, compile_one, fits, first_fit: bool = False, executor=None, max_workers: int = 1,
               speculate: bool = True) -> list:
    """Compile groups of jobs (an item of a group: one job, or a bundle, a list of jobs) with `compile_one(job)`,
    at most `max_workers` at once on `executor` (None: serially, here). With first_fit (fits(result, job) -> bool),
    a group's result ends at its first item that fits and a bundle's at its first kernel that does not, exactly as
    a serial compile stopping there gives; with `speculate`, jobs past those are compiled while workers would idle
    otherwise, in order (without: only the kernels of a group's first undecided item run at once). A job that
    raises gives ('error', message). Returns per group the list of item results (a list for a bundle)."""
    executor = executor or Inline()
    cap = max(1, max_workers)
    units, sizes = [], []
    for gi, group in enumerate(groups):
        sizes.append([len(it) if isinstance(it, list) else 1 for it in group])
        for ii, it in enumerate(group):
            for k, job in enumerate(it if isinstance(it, list) else [it]):
                units.append((gi, ii, k, job))
    jobs = {(gi, ii, k): job for gi, ii, k, job in units}

    def ok(res, gi, ii, k):
        return fits(res, jobs[gi, ii, k])

    done: dict = {}
    inflight: dict = {}
    started: set = set()
    while True:
        for gi, ii, k, job in units:
            if len(inflight) >= cap:
                break
            if (gi, ii, k) not in started and _needed(done, gi, ii, k, sizes[gi], ok, first_fit, speculate):
                started.add((gi, ii, k))
                inflight[executor.submit(compile_one, job)] = (gi, ii, k)
        if not inflight:
            break
        finished, _ = wait(list(inflight), return_when=FIRST_COMPLETED)
        for f in finished:
            pos = inflight.pop(f)
            try:
                done[pos] = f.result()
            except Exception as e:  # noqa: BLE001  (a job that fails is reported, the others go on)
                done[pos] = ("error", f"{type(e).__name__}: {e}")
    return [_assemble(done, gi, group, sizes[gi], ok, first_fit) for gi, group in enumerate(groups)]


def _assemble(done, gi, group, sizes, ok, first_fit):
    if first_fit:
        _, count, states = _group_state(done, gi, sizes, ok)
    else:
        count, states = len(group), [("fits", n) for n in sizes]
    out = []
    for ii in range(count):
        got = [done[gi, ii, k] for k in range(states[ii][1])]
        out.append(got if isinstance(group[ii], list) else got[0])
    return out


# ---- the child process ---------------------------------------------------------------------------------------

class ForkPool:
    """up to n forked compile processes behind the executor interface (submit -> Future); close() ends them at
    once, running jobs included (a speculative compile nobody waits for). Only in the child of `in_child`."""

    def __init__(self, n: int):
        self.pool = multiprocessing.get_context("fork").Pool(n)

    def submit(self, fn, *args):
        f: Future = Future()
        f.set_running_or_notify_cancel()
        self.pool.apply_async(fn, args, callback=f.set_result, error_callback=f.set_exception)
        return f

    def close(self):
        self.pool.terminate()


def compile_job(job):
    """One job in a compile process (never raises): a JIT job's compile seconds, or an AOT request's report."""
    try:
        return jit_compile(job) if job.get("jit") else aot_compile(job)
    except Exception as e:  # noqa: BLE001  (reported to the parent, which decides)
        return ("error", f"{type(e).__name__}: {e}")


def job_fits(res, job) -> bool:
    if job.get("jit"):
        return not isinstance(res, tuple)
    return not isinstance(res, tuple) and A.fits(res, job["target"])[0]


def aot_compile(req: dict):
    """An AOT request (runtime/aot_batch.py) compiled: AotReport or ('error', message). The kernel is req["kernel"]
    (default _attn_fwd) of the module in req["file"]."""
    fn = A._load_kernel("moa_aot_kernel", req["file"], req.get("kernel", "_attn_fwd"))
    try:
        return A.aot_compile(fn, req["signature"], req["constexprs"], target=req["target"],
                             num_warps=req["num_warps"], num_stages=req["num_stages"], block_m=req["block_m"],
                             block_n=req["block_n"], divisible=tuple(req.get("divisible", ())))
    except UnsupportedError as e:
        return ("error", e.message)


_ACTIVE: contextvars.ContextVar = contextvars.ContextVar("moa_compile_child", default=None)


class Child:
    """A compile child, started ahead: it imports Triton and hashes Triton's sources (0.9 s together, measured) while
    the caller still prepares the jobs, then serves batches (`run`) read from its standard input until it is closed.
    Inside `with Child() as c:` the batches of this thread (in_child: AOT checks too) go to c."""

    def __init__(self):
        env = dict(os.environ)
        env["TRITON_INTERPRET"] = "0"   # code generation needs a triton.language that is not interpreted
        env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
        cache = _triton_cache_dir()
        if cache:
            env["TRITON_CACHE_DIR"] = cache   # the JIT jobs must land where this process's JIT looks
        self.err = tempfile.TemporaryFile()
        script = "import moa.runtime.compile_pool as c; c._child_main()"
        self.proc = subprocess.Popen([sys.executable, "-c", script], env=env, stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=self.err)
        self.token = None

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None and not self.proc.stdin.closed

    def run(self, groups: list, first_fit: bool, n: int, speculate: bool = True) -> list:
        """run_groups in the child with n forked compile processes; AotReports come back as AotReports."""
        try:
            pickle.dump((groups, first_fit, n, speculate), self.proc.stdin)
            self.proc.stdin.flush()
            raw = pickle.load(self.proc.stdout)
        except (OSError, EOFError, pickle.UnpicklingError) as e:
            self.close()
            self.err.seek(0)
            tail = " ".join(self.err.read().decode(errors="replace").strip().splitlines()[-3:]) or repr(e)
            raise UnsupportedError(f"AOT compile process failed: {tail[:600]}") from None
        return [[thaw(r) for r in g] for g in raw]

    def close(self) -> None:
        """End the child (it exits at the end of its input; killed if it does not within 2 s)."""
        with contextlib.suppress(OSError):
            self.proc.stdin.close()
        try:
            self.proc.wait(2)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        with contextlib.suppress(OSError):
            self.proc.stdout.close()

    def __enter__(self):
        self.token = _ACTIVE.set(self)
        return self

    def __exit__(self, *exc):
        _ACTIVE.reset(self.token)
        self.close()


def in_child(groups: list, first_fit: bool, n: int, speculate: bool = True) -> list:
    """run_groups in a child with n forked compile processes: this thread's active Child, else a new one."""
    child = _ACTIVE.get()
    if child is not None and child.alive:
        return child.run(groups, first_fit, n, speculate)
    child = Child()
    try:
        return child.run(groups, first_fit, n, speculate)
    finally:
        child.close()


def freeze(res):
    """A result as plain data for the child's pickle (an AotReport as a dict, an error as a list)."""
    if isinstance(res, list):
        return [freeze(x) for x in res]
    if isinstance(res, A.AotReport):
        return dataclasses.asdict(res)
    return {"error": list(res)} if isinstance(res, tuple) else {"value": res}


def thaw(raw):
    if isinstance(raw, list):
        return [thaw(x) for x in raw]
    if "error" in raw:
        return tuple(raw["error"])
    return raw["value"] if "value" in raw else A.AotReport(**raw)


def _child_main():
    """Serve batches from standard input until its end; the responses go to the original standard output, while
    fd 1 (inherited by the workers: Triton prints there) goes to /dev/null."""
    proto = os.fdopen(os.dup(1), "wb")
    os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
    with contextlib.suppress(Exception):
        triton_key()   # while the parent prepares the jobs; the forked workers inherit it
    while True:
        try:
            groups, first_fit, n, speculate = pickle.load(sys.stdin.buffer)
        except EOFError:   # closed, or the parent is gone
            return
        if n > 1:
            _warm(groups)
        pool = ForkPool(n) if n > 1 else None
        stop = _watch_parent(pool)
        try:
            out = run_groups(groups, compile_job, job_fits, first_fit, pool, n, speculate)
        finally:
            stop()
        pickle.dump([[freeze(r) for r in g] for g in out], proto)
        proto.flush()


def _warm(groups: list) -> None:
    """Fill Triton's per-process caches that every compile needs before the workers fork, so that they inherit them:
    triton_key (a hash of Triton's sources, 0.5 s; _child_main computes it first) and the target backend's hash
    (ptxas --version)."""
    with contextlib.suppress(Exception):
        triton_key()
        job = next(j for g in groups for it in g for j in (it if isinstance(it, list) else [it]))
        t = job["target"]
        target = GPUTarget(t["backend"], t["arch"], t["warp_size"]) if job.get("jit") else \
            GPUTarget("cuda", A.TARGETS[t], 32)
        make_backend(target).hash()


def _watch_parent(pool):
    """While a batch compiles: end the child and its compile processes when the parent that waits for them is gone
    (killed, interrupted), so that no orphan keeps compiling. Returns the function that ends the batch (the pool
    and the watch; no thread is left when the next batch forks)."""
    parent, done = os.getppid(), threading.Event()

    def watch():
        while not done.wait(0.5):
            if os.getppid() != parent:
                if pool is not None:
                    pool.close()
                os._exit(1)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()

    def stop():
        done.set()
        thread.join()
        if pool is not None:
            pool.close()

    return stop


def _triton_cache_dir() -> str | None:
    with contextlib.suppress(Exception):
        return str(knobs.cache.dir)
    return None


def compile_jit(jobs: list, child: Child | None = None) -> list:
    """Compile JIT jobs (`recording`) into Triton's cache, on workers(len(jobs)) processes (in `child`, one started
    ahead, else in_child's); per job its compile seconds or ('error', message). With one worker nothing is compiled
    here: the launches compile their kernels as they come, which is the same work."""
    n = workers(len(jobs))
    if n <= 1:
        return [("error", "one compile worker: the launch compiles the kernel")] * len(jobs)
    if child is not None and child.alive:
        return child.run([jobs], False, n)[0]
    return in_child([jobs], False, n)[0]


# ---- JIT jobs --------------------------------------------------------------------------------------------------

@contextlib.contextmanager
def recording(jobs: list):
    """Inside: a CUDA launch from this thread whose kernel is not compiled yet neither compiles nor runs: the
    specialisation is appended to `jobs` (once per kernel and key) and the launch returns at once. Launches of
    other threads are left alone (a hook set before is called for them), and so is every launch once the block is
    left, even where another thread's recording, overlapping this one, put this hook back as the one it found.
    Triton >= 3.3 (knobs.runtime)."""
    prev = knobs.runtime.jit_cache_hook
    me = threading.get_ident()
    on = [True]
    seen: set = set()

    def hook(*, key, fn, compile, **kw):
        if not on[0] or threading.get_ident() != me:
            return prev(key=key, fn=fn, compile=compile, **kw) if prev is not None else None
        job = jit_job(fn.jit_function, compile)
        if job is None:
            return None   # compiled now, as without the hook
        tag = (job["file"], job["name"], str(key))
        if tag not in seen:
            seen.add(tag)
            jobs.append(job)
        return True

    knobs.runtime.jit_cache_hook = hook
    try:
        yield jobs
    finally:
        on[0] = False   # from now on the hook only passes launches on
        if knobs.runtime.jit_cache_hook is hook:
            knobs.runtime.jit_cache_hook = prev


def jit_job(jit_fn, compile: dict) -> dict | None:
    """The JIT job of a specialisation (jit_cache_hook's `compile` info): the kernel's module text as executed, its
    name, Triton's serialised specialisation and the target; None when the module text is not known."""
    py = getattr(jit_fn, "fn", None)
    code = getattr(py, "__code__", None)
    data = compile.get("specialization_data")
    if code is None or data is None:
        return None
    text = "".join(linecache.getlines(code.co_filename))
    if not text:
        return None
    target = json.loads(data).get("target")
    if target is None:   # Triton < 3.7 does not serialise it: the current device's
        t = driver.active.get_current_target()
        target = {"backend": t.backend, "arch": t.arch, "warp_size": t.warp_size}
    return {"jit": True, "module": py.__module__, "file": code.co_filename, "text": text, "name": py.__name__,
            "data": data, "target": target}


def _tuples(x):
    return tuple(_tuples(v) for v in x) if isinstance(x, list) else x


_MODULES: dict = {}


def _module(job: dict):
    """The kernel's module executed as runtime/cache.py load_module executes it (same text, file name and line
    numbers, hence the same JITFunction cache key)."""
    key = (job["file"], job["text"])
    if key not in _MODULES:
        linecache.cache[job["file"]] = (len(job["text"]), None, job["text"].splitlines(True), job["file"])
        mod = types.ModuleType(job["module"])
        mod.__file__ = job["file"]
        sys.modules[job["module"]] = mod
        exec(compile(job["text"], job["file"], "exec"), mod.__dict__)  # noqa: S102  (moa's generated kernel)
        _MODULES[key] = mod
    return _MODULES[key]


def jit_compile(job: dict) -> float:
    """Compile a JIT job into Triton's cache as JITFunction.preload would (without a GPU); its seconds."""

    fn = getattr(_module(job), job["name"])
    data = json.loads(job["data"])

    def const(v):
        if isinstance(v, str) and tl.dtype.is_dtype(v):
            return tl.dtype(v)
        if isinstance(v, dict):
            if "constexpr" in v:
                return tl.constexpr(_tuples(v["constexpr"]))
            raise ValueError(f"constant {v} cannot be rebuilt")
        return _tuples(v)

    constexprs = {tuple(k): const(v) for k, v in zip(data["constant_keys"], data["constant_vals"])}
    attrs = dict(zip(map(tuple, data["attrs_keys"]), data["attrs_vals"]))
    signature = {k: _tuples(v) for k, v in data["signature"].items()}
    options = {k: tuple(v) if isinstance(v, list) else v for k, v in data["options"].items()}
    t = job["target"]
    src = getattr(fn, "ASTSource", triton.compiler.ASTSource)(fn, signature, constexprs, attrs)
    t0 = time.perf_counter()
    triton.compile(src, target=GPUTarget(t["backend"], t["arch"], t["warp_size"]), options=options)
    return time.perf_counter() - t0
