"""The first call's compiles (runtime/compile_pool.py, runtime/tune.py): the scheduler with sleeping fake compiles
(concurrency, the worker bound, a failing job, first-fit results equal to the serial ones), the worker count, the
early-stopping timer, the JIT precompile through Triton's real jit_cache_hook and compile (a stand-in driver for
sm_90: the launch after the precompile loads the kernel from Triton's cache, compiling nothing), and real AOT
compiles of causal.moa candidates for sm_90 in compile processes reporting what a serial compile reports."""
import os
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from triton import knobs
from triton.backends.compiler import GPUTarget
from triton.runtime import driver

import moa
from moa.runtime import aot_batch, compile_pool as P, configs, tune
from moa.runtime.cache import module_for
from moa.runtime.tiling import Config


class Gauge:
    """A fake compile: sleeps, counts how many run at once, fails or 'fits' as its job says."""

    def __init__(self, seconds=0.05):
        self.seconds, self.now, self.most, self.lock, self.ran = seconds, 0, 0, threading.Lock(), []

    def __call__(self, job):
        with self.lock:
            self.now += 1
            self.most = max(self.most, self.now)
            self.ran.append(job["id"])
        time.sleep(self.seconds)
        with self.lock:
            self.now -= 1
        if job.get("raise"):
            raise RuntimeError(f"job {job['id']} does not compile")
        return {"id": job["id"], "fits": job.get("fits", True)}


def fits(res, job):
    return not isinstance(res, tuple) and res["fits"]


def test_jobs_run_concurrently_within_the_worker_bound():
    gauge = Gauge(0.1)
    jobs = [[{"id": k} for k in range(8)]]
    with ThreadPoolExecutor(8) as ex:
        t0 = time.perf_counter()
        out = P.run_groups(jobs, gauge, fits, executor=ex, max_workers=3)
        wall = time.perf_counter() - t0
    assert [r["id"] for r in out[0]] == list(range(8))
    assert gauge.most == 3                  # never more than max_workers at once, and as many as allowed
    assert wall < 8 * 0.1 * 0.75            # 8 x 0.1 s serially; 3 at once take about 0.3 s


def test_a_failing_job_is_reported_and_the_others_go_on():
    jobs = [[{"id": 0}, {"id": 1, "raise": True}, {"id": 2}]]
    with ThreadPoolExecutor(3) as ex:
        out = P.run_groups(jobs, Gauge(0.01), fits, executor=ex, max_workers=3)
    assert out[0][0]["id"] == 0 and out[0][2]["id"] == 2
    assert out[0][1][0] == "error" and "does not compile" in out[0][1][1]


def _random_groups(rng):
    groups, n = [], 0
    for _ in range(rng.randint(1, 3)):
        group = []
        for _ in range(rng.randint(1, 4)):
            if rng.random() < 0.4:   # a bundle
                item = []
                for _ in range(rng.randint(1, 4)):
                    item.append({"id": n, "fits": rng.random() < 0.8, "raise": rng.random() < 0.1})
                    n += 1
            else:
                item = {"id": n, "fits": rng.random() < 0.5, "raise": rng.random() < 0.1}
                n += 1
            group.append(item)
        groups.append(group)
    return groups


def _shape(out):
    return [[[x["id"] if isinstance(x, dict) else "err" for x in it] if isinstance(it, list) else
             (it["id"] if isinstance(it, dict) else "err") for it in g] for g in out]


@pytest.mark.parametrize("speculate", [True, False])
def test_first_fit_results_equal_the_serial_ones(speculate):
    """Whatever finishes first, a group ends at its first item that fits and a bundle at its first kernel that
    does not, as the serial order gives (the chosen config is deterministic)."""
    rng = random.Random(7)
    for _ in range(25):
        groups = _random_groups(rng)
        serial = P.run_groups(groups, Gauge(0), fits, first_fit=True)
        gauge = Gauge(0)
        gauge.seconds = 0.002

        def jittery(job, gauge=gauge):
            time.sleep(rng.random() * 0.004)
            return gauge(job)

        with ThreadPoolExecutor(4) as ex:
            par = P.run_groups(groups, jittery, fits, first_fit=True, executor=ex, max_workers=4,
                               speculate=speculate)
        assert _shape(par) == _shape(serial)


def test_without_speculation_only_the_deciding_item_runs():
    gauge = Gauge(0.02)
    group = [{"id": 0, "fits": True}, {"id": 1}, {"id": 2}]
    with ThreadPoolExecutor(3) as ex:
        out = P.run_groups([group], gauge, fits, first_fit=True, executor=ex, max_workers=3, speculate=False)
    assert [r["id"] for r in out[0]] == [0] and gauge.ran == [0]
    gauge = Gauge(0.02)
    with ThreadPoolExecutor(3) as ex:   # speculation starts the next items while workers are free
        P.run_groups([group], gauge, fits, first_fit=True, executor=ex, max_workers=3, speculate=True)
    assert sorted(gauge.ran) == [0, 1, 2]


def test_the_worker_count(monkeypatch):
    monkeypatch.delenv("MOA_AOT_JOBS", raising=False)
    monkeypatch.setenv("MOA_COMPILE_WORKERS", "3")
    assert [P.workers(n) for n in (0, 1, 2, 3, 10)] == [1, 1, 2, 3, 3]
    monkeypatch.setenv("MOA_COMPILE_WORKERS", "nonsense")
    assert 1 <= P.workers(100) <= P.MAX_WORKERS
    monkeypatch.delenv("MOA_COMPILE_WORKERS")
    assert P.workers(100) == min(P.MAX_WORKERS, len(os.sched_getaffinity(0)))
    assert not P.speculates(2) and P.speculates(4)


def test_one_worker_leaves_the_jit_compiles_to_the_launches(monkeypatch):
    monkeypatch.setenv("MOA_COMPILE_WORKERS", "1")
    res = P.compile_jit([{"jit": True, "name": "a"}, {"jit": True, "name": "b"}])
    assert [r[0] for r in res] == ["error", "error"]     # nothing compiled here: the same work as the launches'


def test_the_timer_stops_a_slow_candidate_after_its_probe():
    calls = []

    def bench(fn, warmup, rep):
        calls.append((fn(), rep))
        return fn()

    timer = tune.Timer(bench)
    times = [timer(lambda t=t: t) for t in (2.0, 1.0, 1.4, 1.6, 0.5)]
    assert times == [2e-3, 1e-3, 1.4e-3, 1.6e-3, 0.5e-3]
    assert timer.stopped == 1 and timer.best == 0.5e-3
    probes = [t for t, rep in calls if rep == tune.TUNE_PROBE_MS]
    timed = [t for t, rep in calls if rep == tune.TUNE_REP_MS]
    assert probes == [2.0, 1.0, 1.4, 1.6, 0.5] and timed == [2.0, 1.0, 1.4, 0.5]   # 1.6 > 1.5 x 1.0: probe only


def test_importing_creates_no_process():
    import multiprocessing

    assert not multiprocessing.active_children()


# ---- real Triton: the JIT caught, compiled elsewhere, loaded -----------------------------------------------------

class _Sm90:
    """A stand-in for Triton's CUDA driver: the JIT specialises and compiles for sm_90, nothing is launched."""

    def get_current_target(self):
        return GPUTarget("cuda", 90, 32)

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_active_torch_device(self):
        return torch.device("cpu")


@pytest.fixture
def sm90(tmp_path, monkeypatch):
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "triton"))
    monkeypatch.setenv("MOA_CACHE_DIR", str(tmp_path / "moa"))
    saved = driver._active
    driver.set_active(_Sm90())
    yield tmp_path / "triton"
    driver._active = saved


def _launch_args(cfg):
    k = moa.compile("examples/causal.moa")
    x = {n: torch.randn(256, 64, dtype=torch.bfloat16) for n in "QKV"}
    b = k.planner.cg_binding(k.bind(x))
    spec = k.launcher.spec("O", "bfloat16", 0, cfg, False)
    args, consts = k.launcher._arguments(spec, b, torch.bfloat16, torch.empty(256, 64, dtype=torch.bfloat16),
                                         None, cfg, 64)
    consts.update(num_warps=cfg.num_warps, num_stages=cfg.num_stages, enable_fp_fusion=True)
    return module_for(spec.source, torch.device("cuda"))._attn_fwd, args, consts


def _files(root):
    return sum(len(f) for _, _, f in os.walk(root))


def test_a_precompiled_kernel_is_loaded_by_the_launch_not_compiled(sm90, monkeypatch):
    """precompile: the launch is caught at its JIT compile (nothing compiles, nothing runs), the kernel is compiled
    in a compile process into Triton's cache, and the launch's own JIT then finds it there (same key): no new file
    (milliseconds instead of seconds, on an idle machine)."""
    monkeypatch.setenv("MOA_COMPILE_WORKERS", "2")   # through the child process, as on a GPU machine
    cands = [_launch_args(Config(128, 64, 8, 3)), _launch_args(Config(64, 64, 4, 3))]
    compiled, real = [], P.compile_jit

    def launch(k):
        fn, args, consts = cands[k % 2]
        fn[(2, 1)](*args, **consts)

    def spy(jobs, child=None):
        assert child is not None and child.proc.poll() is None   # started before the launches, waiting for jobs
        compiled.append(real(jobs, child))
        return compiled[-1]

    monkeypatch.setattr(P, "compile_jit", spy)
    assert tune.precompile(launch, 4) == 2                   # two kernels, each caught once
    assert knobs.runtime.jit_cache_hook is None             # the hook is gone
    assert len(compiled[0]) == 2 and all(isinstance(t, float) for t in compiled[0]), compiled
    before = _files(sm90)
    for fn, args, consts in cands:   # a compile would write its IRs, PTX and cubin to the cache: nothing new
        kernel = fn.warmup(*args, grid=(2, 1), **consts)
        assert _files(sm90) == before
        assert kernel.metadata.num_warps == consts["num_warps"]


def test_a_child_started_ahead_and_never_used_is_ended():
    child = P.Child()
    child.close()
    assert child.proc.poll() is not None and not child.alive


def test_a_child_serves_the_batches_of_its_block(tmp_path, monkeypatch):
    """Inside `with Child()`, in_child's batches (the AOT checks made while the launches are caught) go to that one
    process, one batch after the other; it ends with the block."""
    monkeypatch.setenv("MOA_CACHE_DIR", str(tmp_path))
    k = moa.compile("examples/causal.moa")
    reqs = [r for _, _, r in configs.fit_plan(k.planner, "O", "bf16", {"n": 4096, "d": 64, "e": 64})][:2]
    with P.Child() as child:
        first = P.in_child([[reqs[0]]], False, 1)
        second = P.in_child([[reqs[1]]], False, 1)
        assert child.alive
    assert not child.alive and P._ACTIVE.get() is None
    assert (first[0][0].block_m, second[0][0].block_m) == (reqs[0]["block_m"], reqs[1]["block_m"])
    assert first[0][0].spills == 0 == second[0][0].spills


def test_recording_leaves_other_threads_alone(sm90):
    jobs, answers = [], []
    with P.recording(jobs):
        hook = knobs.runtime.jit_cache_hook
        t = threading.Thread(target=lambda: answers.append(hook(key="k", fn=None, compile={}, repr="",
                                                                is_manual_warmup=False, already_compiled=False)))
        t.start()
        t.join()
    assert answers == [None] and jobs == []


def test_overlapping_recordings_leave_no_hook_that_swallows_launches():
    """Two tuning threads: A starts recording, B starts (chaining A's hook), A ends, B ends and puts back the hook it
    found, A's. That hook must pass A's later launches on, not swallow them."""
    a_in, b_in, a_out = threading.Event(), threading.Event(), threading.Event()
    hooks = {}

    def a():
        with P.recording([]):
            hooks["a"] = knobs.runtime.jit_cache_hook
            a_in.set()
            b_in.wait(5)
        a_out.set()
        hooks["a_after"] = knobs.runtime.jit_cache_hook(key="k", fn=None, compile={}) if \
            knobs.runtime.jit_cache_hook else None

    def b():
        a_in.wait(5)
        with P.recording([]):
            b_in.set()
            a_out.wait(5)

    threads = [threading.Thread(target=a), threading.Thread(target=b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    stale = knobs.runtime.jit_cache_hook
    try:
        assert stale is hooks["a"]                                  # B put back what it found
        assert stale(key="k", fn=None, compile={}) is None        # ... and it passes launches on
        assert hooks["a_after"] is None                            # as B's did for A's launches after A's end
    finally:
        knobs.runtime.jit_cache_hook = None


# ---- real AOT compiles for sm_90 ---------------------------------------------------------------------------------

def test_concurrent_aot_compiles_report_what_serial_ones_do(tmp_path, monkeypatch):
    monkeypatch.setenv("MOA_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("TRITON_ALWAYS_COMPILE", "1")
    k = moa.compile("examples/causal.moa")
    plan = configs.fit_plan(k.planner, "O", "bf16", {"n": 4096, "d": 64, "e": 64})
    reqs = [r for _, _, r in plan][:3]
    reports = {}
    for workers in ("1", "3"):
        monkeypatch.setenv("MOA_COMPILE_WORKERS", workers)
        aot_batch._MEM.clear()
        reports[workers] = aot_batch.aot_batch(reqs)
    aot_batch._MEM.clear()
    rows = {w: [(r.registers, r.spills, r.shared_bytes, r.block_m, r.block_n, r.num_warps) for r in rs]
            for w, rs in reports.items()}
    assert rows["1"] == rows["3"] and all(s == 0 for _, s, *_ in rows["1"])
