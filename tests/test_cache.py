"""The on-disk kernel cache (runtime/cache.py): concurrent writers, corruption, configuration.

Guarantees tested here (docs/robustness.md):
- 8 processes compiling and running the same program into one empty MOA_CACHE_DIR at the same moment leave
  exactly one valid entry (no temporary files) and compute bit-identical results;
- a corrupted, truncated, emptied or stale entry is detected (digest line), reported with a RuntimeWarning and
  rebuilt; the kernel then runs correctly;
- bytecode next to an entry is never trusted (modules execute from the validated text);
- an unwritable cache directory falls back to a private temporary directory with a warning;
- MOA_CACHE_DIR (with ~ expanded) overrides the platform default, which follows XDG / macOS / Windows rules.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import sys
from pathlib import Path

import pytest
import torch

import moa
from moa.runtime import cache

ROOT = Path(__file__).resolve().parent.parent
CAUSAL = (ROOT / "examples" / "causal.moa").read_text()
NPROC = 8


def _inputs(seed=0, batch=()):
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(*batch, 12, 8, generator=g, dtype=torch.float64) for k in ("Q", "K", "V")}


def _entries(root: Path):
    d = root / "kernels"
    return sorted(p for p in d.iterdir()) if d.exists() else []


@pytest.fixture
def fresh_cache(tmp_path, monkeypatch):
    """An empty cache directory for this test and an empty in-process module table."""
    monkeypatch.setenv("MOA_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(cache, "_LOADED", {})
    return tmp_path / "cache"


# ---- concurrency --------------------------------------------------------------------------------------------

def _child(barrier, out_q, source):
    """Spawned child: wait for every sibling, then compile + run the same program at once."""
    import torch as _torch

    import moa as _moa

    _torch.set_num_threads(1)
    try:
        k = _moa.compile(source)
        ins = _inputs(seed=7)
        barrier.wait(timeout=120)
        out = k(**ins)
        out_q.put(("ok", os.getpid(), out.numpy().tobytes(), str(out.dtype)))
    except BaseException as e:  # report, never hang the parent
        out_q.put(("error", os.getpid(), f"{type(e).__name__}: {e}", ""))


def test_eight_processes_share_one_valid_entry(fresh_cache):
    ctx = mp.get_context("spawn")
    barrier = ctx.Barrier(NPROC)
    out_q = ctx.Queue()
    procs = [ctx.Process(target=_child, args=(barrier, out_q, CAUSAL)) for _ in range(NPROC)]
    for p in procs:
        p.start()
    try:
        results = [out_q.get(timeout=240) for _ in procs]
    finally:
        for p in procs:
            p.join(timeout=60)
            if p.is_alive():
                p.kill()
    errors = [r for r in results if r[0] != "ok"]
    assert not errors, errors
    assert len({r[1] for r in results}) == NPROC            # eight distinct processes ...
    assert len({r[2] for r in results}) == 1                # ... bit-identical results
    entries = _entries(fresh_cache)
    assert [p.suffix for p in entries] == [".py"], entries  # one entry, no .tmp_ leftovers, no bytecode
    source = cache._read_valid(entries[0])
    assert source is not None and "def _attn_fwd(" in source
    # the shared result is the right one
    k = moa.compile(CAUSAL)
    got = torch.frombuffer(bytearray(results[0][2]), dtype=torch.float64).reshape(12, 8)
    torch.testing.assert_close(got, k.reference(**_inputs(seed=7)), rtol=1e-12, atol=1e-12)


# ---- corruption ---------------------------------------------------------------------------------------------

def _run_once(expect_warning: bool):
    cache._LOADED.clear()
    k = moa.compile(CAUSAL)
    ins = _inputs(seed=3)
    if expect_warning:
        with pytest.warns(RuntimeWarning, match="corrupted or stale; rebuilding"):
            out = k(**ins)
    else:
        out = k(**ins)
    torch.testing.assert_close(out, k.reference(**ins), rtol=1e-12, atol=1e-12)


CORRUPTIONS = {
    "truncated": lambda raw: raw[: len(raw) // 2],
    "empty": lambda raw: b"",
    "flipped-byte": lambda raw: raw[:-20] + bytes([raw[-20] ^ 0x01]) + raw[-19:],
    "digest-line-only": lambda raw: raw.split(b"\n", 1)[0] + b"\n",
    "no-digest": lambda raw: raw.split(b"\n", 1)[1],
    "binary-garbage": lambda raw: bytes(range(256)) * 4,
    "python-payload": lambda raw: raw.split(b"\n", 1)[0] + b"\nimport os\nraise SystemExit('owned')\n",
}


@pytest.mark.parametrize("how", sorted(CORRUPTIONS))
def test_corrupted_entry_is_detected_and_rebuilt(fresh_cache, how):
    _run_once(expect_warning=False)
    (entry,) = _entries(fresh_cache)
    good = entry.read_bytes()
    entry.write_bytes(CORRUPTIONS[how](good))
    _run_once(expect_warning=True)
    assert entry.read_bytes() == good            # rebuilt to the exact entry
    _run_once(expect_warning=False)              # and trusted again


def test_stale_entry_with_valid_digest_is_rebuilt(fresh_cache):
    """A well-formed entry whose text is not the generated source (a key collision or a hand edit)."""
    _run_once(expect_warning=False)
    (entry,) = _entries(fresh_cache)
    good = entry.read_text()
    other = "x = 1\n"
    entry.write_text(f"# moa-digest: {cache._digest(other)}\n{other}")
    _run_once(expect_warning=True)
    assert entry.read_text() == good


def test_entry_replaced_by_a_directory_falls_back(fresh_cache):
    _run_once(expect_warning=False)
    (entry,) = _entries(fresh_cache)
    entry.unlink()
    entry.mkdir()
    cache._LOADED.clear()
    k = moa.compile(CAUSAL)
    with pytest.warns(RuntimeWarning) as rec:
        out = k(**_inputs(seed=3))
    msgs = " | ".join(str(w.message) for w in rec)
    assert "private temporary directory" in msgs
    torch.testing.assert_close(out, k.reference(**_inputs(seed=3)), rtol=1e-12, atol=1e-12)


def test_poisoned_bytecode_is_never_used(fresh_cache):
    """Bytecode next to an entry is outside the digest: modules must execute from the validated text."""
    _run_once(expect_warning=False)
    (entry,) = _entries(fresh_cache)
    import importlib.util
    import py_compile

    pyc = Path(importlib.util.cache_from_source(str(entry)))
    evil = entry.with_name("evil_src.py")
    st = entry.stat()
    payload = "raise SystemExit('poisoned bytecode was executed')\n"
    evil.write_text(payload + "#" * (st.st_size - len(payload) - 1) + "\n")  # same size and mtime as the entry:
    os.utime(evil, (st.st_atime, st.st_mtime))                               # a file loader would trust it
    py_compile.compile(str(evil), cfile=str(pyc), doraise=True)
    evil.unlink()
    _run_once(expect_warning=False)
    assert not any(p.name.startswith("evil") for p in _entries(fresh_cache))


def test_unwritable_cache_dir_falls_back_with_warning(tmp_path, monkeypatch):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the cache directory should be")
    monkeypatch.setenv("MOA_CACHE_DIR", str(blocker))
    monkeypatch.setattr(cache, "_LOADED", {})
    k = moa.compile(CAUSAL)
    with pytest.warns(RuntimeWarning, match="cannot write the kernel cache"):
        out = k(**_inputs(seed=1))
    torch.testing.assert_close(out, k.reference(**_inputs(seed=1)), rtol=1e-12, atol=1e-12)


# ---- configuration ------------------------------------------------------------------------------------------

def test_moa_cache_dir_overrides(tmp_path, monkeypatch):
    monkeypatch.setenv("MOA_CACHE_DIR", str(tmp_path / "x"))
    assert cache.cache_dir() == tmp_path / "x"
    monkeypatch.setenv("MOA_CACHE_DIR", "~/moa-cache-test")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert cache.cache_dir() == tmp_path / "moa-cache-test"


def test_moa_cache_dir_is_used(fresh_cache):
    _run_once(expect_warning=False)
    (entry,) = _entries(fresh_cache)
    assert entry.parent == fresh_cache / "kernels" and entry.name.startswith("moa_")


def test_default_cache_dir_linux(tmp_path, monkeypatch):
    monkeypatch.delenv("MOA_CACHE_DIR", raising=False)
    monkeypatch.setattr(sys, "platform", "linux")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache.cache_dir() == tmp_path / "xdg" / "moa"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache.cache_dir() == tmp_path / "home" / ".cache" / "moa"


def test_default_cache_dir_macos(tmp_path, monkeypatch):
    monkeypatch.delenv("MOA_CACHE_DIR", raising=False)
    monkeypatch.setattr(sys, "platform", "darwin")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert cache.cache_dir() == tmp_path / "Library" / "Caches" / "moa"


def test_default_cache_dir_windows(tmp_path, monkeypatch):
    monkeypatch.delenv("MOA_CACHE_DIR", raising=False)
    monkeypatch.setattr(sys, "platform", "win32")
    monkeypatch.setenv("LOCALAPPDATA", str(tmp_path / "local"))
    assert cache.cache_dir() == tmp_path / "local" / "moa"


def test_empty_moa_cache_dir_means_default(tmp_path, monkeypatch):
    monkeypatch.setenv("MOA_CACHE_DIR", "")
    monkeypatch.setattr(sys, "platform", "linux")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert cache.cache_dir() == tmp_path / "moa"


def test_key_covers_versions_and_source():
    base = cache.key_of("src", "0.1.0", "3.2", "2.4")
    assert base != cache.key_of("src2", "0.1.0", "3.2", "2.4")
    assert base != cache.key_of("src", "0.1.1", "3.2", "2.4")
    assert base != cache.key_of("src", "0.1.0", "3.3", "2.4")
    assert base != cache.key_of("src", "0.1.0", "3.2", "2.5")
    assert len(base) == 32 and all(c in "0123456789abcdef" for c in base)


@pytest.mark.parametrize("raw", ['{"choice": -1}', '{"choice": true}', '{"choice": 1.0}', '{"choice": 7}', "[]"])
def test_a_stale_or_edited_aot_choice_is_not_obeyed(raw, tmp_path):
    # {"choice": -1} picked the last candidate and true the second, silently (found by a helper): only an index
    # of the candidates is read; anything else is rebuilt (the callers catch ValueError, KeyError, TypeError)
    from moa.runtime.aot_batch import load_choice, save_choice

    path = tmp_path / "aot" / "x.json"
    save_choice(path, 2)
    assert load_choice(path, 3) == 2
    path.write_text(raw)
    with pytest.raises((ValueError, KeyError, TypeError)):
        load_choice(path, 3)
