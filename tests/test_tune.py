"""The tuner's logic on the CPU with an injected fake timer (runtime/tune.py): buckets, the choice of the fastest
candidate, failed candidates skipped, the on-disk cache a second process reads (nothing re-timed), one tuning per
bucket under concurrent callers, stale records ignored, and the switch that turns tuning off."""
import os
import subprocess
import sys
import textwrap
import threading

import pytest

from moa.runtime import tune


@pytest.fixture(autouse=True)
def _fresh(tmp_path, monkeypatch):
    monkeypatch.setenv("MOA_CACHE_DIR", str(tmp_path))
    tune.clear_memory()
    yield
    tune.clear_memory()


def _key(n=1000, m=1000, d=64, dtype="bfloat16", device="NVIDIA H200"):
    return tune.bucket_key(device, dtype, "prog", "O", 1, {"d": d}, {"n": n, "m": m})


def test_buckets_round_sequence_dims_up_to_powers_of_two():
    assert [tune.bucket_of(n) for n in (0, 1, 2, 3, 1000, 1024, 1025)] == [1, 1, 2, 4, 1024, 1024, 2048]
    assert _key(n=700) == _key(n=1024) != _key(n=1025)
    assert _key(d=64) != _key(d=128)          # head dims exact
    assert _key(dtype="float16") != _key()
    assert _key(device="NVIDIA H100 80GB HBM3") != _key()


def test_the_fastest_candidate_is_chosen_and_failures_are_skipped():
    times = {"a": 3e-3, "b": None, "c": 1e-3, "d": 2e-3}
    calls = []

    def measure(k):
        label = "abcd"[k]
        calls.append(label)
        if times[label] is None:
            raise RuntimeError("does not compile")
        return times[label]

    rec = tune.choose(_key(), list("abcd"), measure)
    assert (rec.choice, rec.label, rec.seconds) == (2, "c", 1e-3)
    assert calls == list("abcd")
    assert dict(rec.times)["b"] is None
    # a second call in this process: from memory, nothing timed
    assert tune.choose(_key(), list("abcd"), lambda k: pytest.fail("re-timed")).label == "c"


def test_no_candidate_runs():
    with pytest.raises(RuntimeError, match="no candidate"):
        tune.choose(_key(), ["a", "b"], lambda k: (_ for _ in ()).throw(ValueError("x")))


def test_the_record_carries_compile_and_timing_seconds_and_the_disk_keeps_them():
    import time

    rec = tune.choose(_key(), ["x", "y"], lambda k: (time.sleep(0.02), [2.0, 1.0][k])[1],
                      prepare=lambda: time.sleep(0.05))
    assert rec.compile_seconds >= 0.05 and rec.tune_seconds >= 0.04 and not rec.cached
    tune.clear_memory()
    again = tune.choose(_key(), ["x", "y"], lambda k: pytest.fail("re-timed"),
                        prepare=lambda: pytest.fail("re-compiled"))
    assert again.cached and (again.label, again.compile_seconds) == ("y", rec.compile_seconds)


def test_a_failing_prepare_leaves_the_compiles_to_the_timing():
    rec = tune.choose(_key(), ["x", "y"], lambda k: [2.0, 1.0][k], prepare=lambda: 1 / 0)
    assert rec.label == "y"


def test_the_disk_cache_spares_a_second_process(tmp_path):
    tune.choose(_key(), ["x", "y"], lambda k: [2.0, 1.0][k])
    files = list((tmp_path / "tune").glob("*.json"))
    assert len(files) == 1
    script = textwrap.dedent("""
        from moa.runtime import tune
        key = tune.bucket_key("NVIDIA H200", "bfloat16", "prog", "O", 1, {"d": 64}, {"n": 1000, "m": 1000})
        def never(k):
            raise SystemExit("a second process re-timed")
        print(tune.choose(key, ["x", "y"], never).label)
    """)
    env = {**os.environ, "MOA_CACHE_DIR": str(tmp_path)}
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120,
                          check=False)
    assert proc.returncode == 0 and proc.stdout.strip() == "y", proc.stderr[-2000:]


def test_a_record_of_other_candidates_is_not_reused():
    tune.choose(_key(), ["x", "y"], lambda k: [2.0, 1.0][k])
    tune.clear_memory()
    rec = tune.choose(_key(), ["x", "y", "z"], lambda k: [2.0, 1.0, 0.5][k])
    assert rec.label == "z"


def test_concurrent_callers_tune_a_bucket_once():
    timed = []
    gate = threading.Event()

    def measure(k):
        timed.append(k)
        gate.wait(5)
        return [3.0, 1.0][k]

    results = []
    threads = [threading.Thread(target=lambda: results.append(tune.choose(_key(), ["x", "y"], measure).label))
               for _ in range(4)]
    for t in threads:
        t.start()
    gate.set()
    for t in threads:
        t.join(30)
    assert results == ["y"] * 4
    assert sorted(timed) == [0, 1]     # one tuning: each candidate timed once


def test_the_switch(monkeypatch):
    assert tune.enabled(None) is True
    monkeypatch.setenv("MOA_AUTOTUNE", "0")
    assert tune.enabled(None) is False
    assert tune.enabled(True) is True
    monkeypatch.setenv("MOA_AUTOTUNE", "1")
    assert tune.enabled(False) is False


def test_a_call_tunes_its_bucket_with_every_candidate_correct(monkeypatch):
    """The launcher's tuning path on the CPU: the call is treated as a GPU call, the fake timer runs each candidate
    once (in the interpreter) and checks it against the float64 reference, and the fastest by its clock wins; a
    second call of the same bucket times nothing."""
    import torch
    import triton.testing

    import moa

    k = moa.compile("examples/power.moa")    # the tiled kernel's schedules and configs, and the linear form
    g = torch.Generator().manual_seed(0)
    x = {n: torch.randn(2, 70, 16, generator=g, dtype=torch.float64) for n in ("Q", "K", "V")}
    ref = k.reference(**x)
    b = k.bind(x)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H200")
    seen = []   # each candidate's timed function (the probe and the timing of a candidate share it)

    def fake_bench(fn, **kw):
        out = fn()
        assert (out - ref).abs().max().item() <= 1e-12 * ref.abs().max().item()
        if not any(f is fn for f in seen):
            seen.append(fn)
        k = next(i for i, f in enumerate(seen) if f is fn)
        return [5.0, 3.0, 4.0, 1.0, 2.0, 6.0, 7.0, 8.0, 9.0][k]

    monkeypatch.setattr(triton.testing, "do_bench", fake_bench)
    plan = k.launcher.tuned("O", b)
    labels = [p.key for p in k.planner.candidates("O", b.dims, "float64", "float64", b.device, 1, 2)]
    assert len(seen) == len(labels) >= 3 and "linear linear" in labels
    assert "linear linear chunk128 f32 w8 s3" in labels     # the linear form with 128-row chunks, timed too
    assert plan.key == labels[3] and plan.measured_seconds == 1e-3
    assert plan.compile_seconds < 0.01 and plan.tune_seconds > 0    # CPU tensors: nothing precompiled
    assert "tuned in" in repr(plan)
    monkeypatch.setattr(triton.testing, "do_bench", lambda fn, **kw: pytest.fail("re-timed"))
    k.launcher._tuned.clear()
    assert k.launcher.tuned("O", b).key == labels[3]     # from the record, not re-timed
    tune.clear_memory()
    k.launcher._tuned.clear()
    again = k.launcher.tuned("O", b)                        # from the disk: this process spent nothing on it
    assert again.key == labels[3] and (again.compile_seconds, again.tune_seconds) == (0.0, 0.0)


def test_a_forced_linear_form_tunes_its_chunk_configs(monkeypatch):
    """form="linear": the call is tuned too (it was not: the fitted config ran untimed), over the linear form's
    configs only (the fitted one, then 128-row chunks with 64, 32 and 16 features per tile, and 64-row chunks with
    32); each candidate is exact, the fastest by the fake clock wins, and the plan launches with its config."""
    import types

    import torch
    import triton.testing

    import moa

    k = moa.compile("examples/power.moa", form="linear")
    g = torch.Generator().manual_seed(1)
    x = {n: torch.randn(2, 150, 8, generator=g, dtype=torch.float64) for n in ("Q", "K", "V")}
    ref = k.reference(**x)
    b = k.bind(x)
    assert k.launcher.tunes("O", types.SimpleNamespace(device=torch.device("cuda")))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H200")
    seen = []

    def fake_bench(fn, **kw):
        out = fn()
        assert (out - ref).abs().max().item() <= 1e-12 * ref.abs().max().item()
        if not any(f is fn for f in seen):
            seen.append(fn)
        return [4.0, 3.0, 1.0, 2.0, 5.0][next(i for i, f in enumerate(seen) if f is fn)]

    monkeypatch.setattr(triton.testing, "do_bench", fake_bench)
    plan = k.launcher.tuned("O", b)
    labels = [p.key for p in k.planner.candidates("O", b.dims, "float64", "float64", b.device, 1, 2)]
    assert labels == ["linear linear", "linear linear chunk128 f64 w8 s3", "linear linear chunk128 f32 w8 s3",
                      "linear linear chunk128 f16 w8 s3", "linear linear chunk64 f32 w8 s3"]
    assert len(seen) == 5 and plan.key == labels[2] and plan.config.chunk == 128 and plan.config.block_f == 32
    # a value width over 32: half-width value tiles (the scan's programs doubled) instead of 32-feature tiles
    wide = [p.key for p in k.planner.candidates("O", {**b.dims, "e": 128}, "float64", "float64", b.device, 1, 2)]
    assert wide == labels[:4] + ["linear linear chunk128 f64 v64 w8 s3", "linear linear chunk64 f64 v64 w4 s3"]
