"""Timed tuning on a GPU: the first call of a shape bucket times the candidate plans and keeps the fastest.

A bucket is what a launch's best plan depends on: the device's name, the dtype, the program (its source, params,
forced form and schedule), the output, the number of batch axes, the head dims, and the sequence dims rounded up
to powers of two. Its candidates are the plans the model ranks first (runtime/plan.py `Planner.candidates`: the
schedules, tile configs, warps and stages, and the linear form where one exists). On the first call of a bucket
each candidate is launched and timed (CUDA events through triton.testing.do_bench by default), and the fastest is
written to the on-disk cache (`MOA_CACHE_DIR`/tune), under a file lock, so that a second process re-tunes nothing
and two processes never tune the same bucket at once. `compile(autotune=False)` or `MOA_AUTOTUNE=0` keeps the
model's choice (checked ahead of time: runtime/configs.py); a candidate that fails to compile or run is skipped.

The first call's cost is compile plus timing, and both are kept short. Before anything is timed, `precompile` launches
each candidate once with Triton's JIT compile caught (runtime/compile_pool.py `recording`: nothing compiles, nothing
runs) and compiles the kernels caught concurrently, in compile processes, into Triton's on-disk cache; the timed
launches then only load them. Then `Timer` times each candidate briefly (do_bench with TUNE_WARMUP_MS / TUNE_REP_MS, a
few ms: enough for kernels of ms size) after a probe of TUNE_PROBE_MS; a candidate whose probe is already SLOWER times
the best so far stops there, its probe's time recorded. The Record keeps both costs (compile_seconds, tune_seconds).

The logic takes its timer as an argument (`measure(candidate) -> seconds`) and its compile step as a callable
(`prepare`), so it is tested on the CPU with fakes (tests/test_tune.py, tests/test_tune_compile.py)."""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import triton.testing

from moa.symbolic import next_pow2

from . import compile_pool as P
from .cache import cache_dir

try:   # POSIX file locks; elsewhere the in-process lock alone (a second process may then tune too)
    import fcntl
except ImportError:   # Windows
    fcntl = None

_MEMORY: dict = {}
_LOCK = threading.Lock()


def enabled(flag: bool | None) -> bool:
    """Whether calls are tuned: the compile() argument if given, else MOA_AUTOTUNE (default on)."""
    if flag is not None:
        return bool(flag)
    return os.environ.get("MOA_AUTOTUNE", "1").strip().lower() not in ("0", "false", "no", "off")


def bucket_of(n: int) -> int:
    """A sequence length's bucket: the next power of two (1 for 0 and 1)."""
    return next_pow2(n)


def bucket_key(device: str, dtype: str, program_key: str, output: str, nbatch: int, heads: dict, seqs: dict) -> str:
    """The key of a shape bucket (a hex digest): heads exact, sequence dims rounded up to powers of two."""
    parts = {"device": device, "dtype": dtype, "program": program_key, "output": output, "nbatch": nbatch,
             "heads": sorted(heads.items()), "seqs": sorted((k, bucket_of(v)) for k, v in seqs.items())}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:32]


TUNE_PROBE_MS, TUNE_WARMUP_MS, TUNE_REP_MS = 1, 3, 10   # do_bench's budgets (ms) of a probe and of a timing
SLOWER = 1.5   # a candidate whose probe takes this many times the best so far is not timed further


@dataclass
class Record:
    """A tuned bucket: the index of the chosen candidate, its label, every candidate's time (None: failed), and the
    cost of the tuning: the candidates' compiles before timing and their timing, in seconds (as measured by the
    process that tuned; `cached`: this process read the record from disk and spent neither)."""
    choice: int
    label: str
    times: list = field(default_factory=list)   # [(label, seconds or None)]
    compile_seconds: float = 0.0
    tune_seconds: float = 0.0
    cached: bool = False

    @property
    def seconds(self) -> float | None:
        return self.times[self.choice][1] if self.times else None


def _path(key: str) -> Path:
    return cache_dir() / "tune" / f"{key}.json"


def _read(path: Path, labels: list) -> Record | None:
    try:
        raw = json.loads(path.read_text())
        rec = Record(int(raw["choice"]), str(raw["label"]), [tuple(t) for t in raw["times"]],
                     float(raw.get("compile_seconds", 0.0)), float(raw.get("tune_seconds", 0.0)), cached=True)
    except (OSError, ValueError, KeyError, TypeError, IndexError):
        return None
    # a record from other candidates (another version of moa, another model ranking) is not reused
    return rec if [t[0] for t in rec.times] == labels and 0 <= rec.choice < len(labels) else None


def _write(path: Path, rec: Record) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp_", suffix=".json")
        with os.fdopen(fd, "w") as f:
            json.dump({"choice": rec.choice, "label": rec.label, "times": rec.times,
                       "compile_seconds": rec.compile_seconds, "tune_seconds": rec.tune_seconds}, f)
        os.replace(tmp, path)   # atomic: a reader sees the old record or this one
    except OSError:
        pass   # an unwritable cache: the process keeps the choice in memory


@contextlib.contextmanager
def _file_lock(path: Path):
    """An exclusive lock on path + '.lock' (POSIX), held while a bucket is tuned."""
    if fcntl is None:
        yield
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(str(path) + ".lock", os.O_CREAT | os.O_RDWR, 0o644)
    except OSError:
        yield
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        with contextlib.suppress(OSError):
            fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def choose(key: str, labels: list, measure, prepare=None) -> Record:
    """The tuned Record of a bucket: from memory, else from disk, else by timing every candidate (measure(k) ->
    seconds for candidate k, raising for a candidate that cannot run) under the bucket's lock, after prepare() (the
    candidates' compiles, e.g. precompile; its failure only leaves the compiles to the timed launches). Raises
    RuntimeError when no candidate runs."""
    with _LOCK:
        hit = _MEMORY.get(key)
    if hit is not None and [t[0] for t in hit.times] == labels:
        return hit
    path = _path(key)
    with _file_lock(path):
        rec = _read(path, labels)     # another process may have tuned it while this one waited
        if rec is None:
            t0 = time.perf_counter()
            if prepare is not None:
                with contextlib.suppress(Exception):   # noqa: BLE001  (the timed launches compile what is missing)
                    prepare()
            t1 = time.perf_counter()
            times = []
            for k, label in enumerate(labels):
                try:
                    t = float(measure(k))
                    times.append((label, t if math.isfinite(t) else None))
                except Exception:   # noqa: BLE001  (a candidate that does not compile or run is skipped)
                    times.append((label, None))
            ok = [(t, k) for k, (_, t) in enumerate(times) if t is not None]
            if not ok:
                raise RuntimeError(f"no candidate of {len(labels)} ran: " + ", ".join(labels))
            best = min(ok)[1]
            rec = Record(best, labels[best], times, t1 - t0, time.perf_counter() - t1)
            _write(path, rec)
    with _LOCK:
        _MEMORY[key] = rec
    return rec


class Timer:
    """Times the candidates of one bucket in turn (`timer(fn) -> seconds`): a probe of TUNE_PROBE_MS first; a
    candidate whose probe is over SLOWER x the best time so far stops there (its probe's time is its time: it cannot
    win), the others are timed with TUNE_WARMUP_MS / TUNE_REP_MS. `bench(fn, warmup, rep) -> ms` is
    triton.testing.do_bench's median by default (CUDA events); `stopped` counts the candidates stopped early."""

    def __init__(self, bench=None, slower: float = SLOWER):
        self.bench, self.slower = bench, slower
        self.best: float | None = None
        self.stopped = 0

    def _ms(self, fn, warmup, rep) -> float:
        if self.bench is not None:
            return float(self.bench(fn, warmup, rep))
        return float(triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="median"))

    def __call__(self, fn) -> float:
        probe = self._ms(fn, TUNE_PROBE_MS, TUNE_PROBE_MS) * 1e-3
        if self.best is not None and probe > self.slower * self.best:
            self.stopped += 1
            return probe
        t = self._ms(fn, TUNE_WARMUP_MS, TUNE_REP_MS) * 1e-3
        if math.isfinite(t) and (self.best is None or t < self.best):
            self.best = t
        return t


def precompile(launch, n: int, compile_jobs=None) -> int:
    """Compile the kernels of n candidates before they are timed, concurrently: launch(k) runs candidate k once with
    Triton's JIT compile caught (compile_pool.recording: a kernel not compiled yet neither compiles nor runs), then
    compile_jobs(jobs) compiles the kernels caught (default compile_pool.compile_jit: compile processes writing
    Triton's on-disk cache, their child started before the launches, so that its start overlaps them, and serving
    the AOT checks the launches make, e.g. the linear form's fit). A candidate
    whose launch fails is left to the timing. Returns the number of kernels caught."""
    jobs: list = []
    # the child starts while the jobs are caught, and serves the AOT checks made meanwhile (the linear form's)
    with P.Child() if compile_jobs is None and P.workers(n) > 1 else contextlib.nullcontext() as child:
        with P.recording(jobs):
            for k in range(n):
                with contextlib.suppress(Exception):   # noqa: BLE001  (the timing skips a candidate that cannot run)
                    launch(k)
        if jobs:
            (compile_jobs or (lambda js: P.compile_jit(js, child)))(jobs)
    return len(jobs)


def recorded(key: str) -> Record | None:
    """The record of a bucket tuned in this process, if any (for explain / Kernel.plan)."""
    with _LOCK:
        return _MEMORY.get(key)


def clear_memory() -> None:
    """Forget the in-process records (the disk cache stays)."""
    with _LOCK:
        _MEMORY.clear()
