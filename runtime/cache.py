"""On-disk cache of generated kernel modules, safe under concurrent processes.

Each entry is a Python file named by the SHA-256 of its content key (IR hash, params, dtype, config and the
versions of moa, triton and torch). Files are written to a temporary name and renamed atomically, so a reader
sees a whole file or none; the first line holds the digest of the rest, so a truncated or corrupted file is
detected, reported with a warning and rebuilt. MOA_CACHE_DIR overrides the platform cache directory.

A module is executed from the validated text itself (never from bytecode written next to it, which the digest
would not cover), and that text is what `inspect` (Triton's @jit) reads. A cache directory that cannot be
written falls back, with a warning, to a private temporary directory.
"""
from __future__ import annotations

import contextlib
import hashlib
import linecache
import os
import sys
import tempfile
import types
import warnings
from pathlib import Path

import torch
import triton

from moa.version import __version__

from .device import check_device, interpret_module

_LOADED: dict = {}


def cache_dir() -> Path:
    """MOA_CACHE_DIR, else $XDG_CACHE_HOME/moa, else ~/.cache/moa (Linux), ~/Library/Caches/moa (macOS),
    %LOCALAPPDATA%/moa (Windows)."""
    env = os.environ.get("MOA_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    if sys.platform == "win32":
        return Path(os.environ.get("LOCALAPPDATA", Path.home() / "AppData" / "Local")) / "moa"
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Caches" / "moa"
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "moa"


def key_of(*parts) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(repr(p).encode())
        h.update(b"\0")
    return h.hexdigest()[:32]


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _path(key: str, root: Path | None = None) -> Path:
    return (root or cache_dir()) / "kernels" / f"moa_{key}.py"


def _entry(source: str) -> str:
    return f"# moa-digest: {_digest(source)}\n{source}"


_PRIVATE: list = []


def _private_dir() -> Path:
    if not _PRIVATE:
        _PRIVATE.append(Path(tempfile.mkdtemp(prefix="moa-cache-")))
    return _PRIVATE[0]


def _read_valid(path: Path) -> str | None:
    try:
        raw = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return None
    first, _, rest = raw.partition("\n")
    if first != f"# moa-digest: {_digest(rest)}":
        return None
    return rest


def store(key: str, source: str, root: Path | None = None) -> Path:
    """Write (or validate) the cache entry for key; returns its path."""
    path = _path(key, root)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists():
        have = _read_valid(path)
        if have == source:
            return path
        warnings.warn(f"moa: cache entry {path.name} is corrupted or stale; rebuilding it", RuntimeWarning,
                      stacklevel=3)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp_", suffix=".py")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(_entry(source))
        os.replace(tmp, path)  # atomic: readers see the old entry, or this whole one
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return path


def load_module(key: str, source: str, interpret: bool = False):
    """The module of a generated kernel (executed once per process and mode): its @triton.jit functions compile
    for CUDA, or with interpret=True they are interpreted functions for CPU tensors (runtime/device.py)."""
    if (key, interpret) in _LOADED:
        return _LOADED[key, interpret]
    try:
        path = store(key, source)
    except OSError as e:
        warnings.warn(f"moa: cannot write the kernel cache in {cache_dir()} ({e.strerror or e}); using a private "
                      f"temporary directory instead (set MOA_CACHE_DIR to a writable directory)", RuntimeWarning,
                      stacklevel=2)
        path = store(key, source, _private_dir())
    text, filename = source, str(path)
    # inspect (Triton's @jit) reads the validated text, whatever happens to the file later; mtime None keeps
    # linecache.checkcache from dropping the entry. The digest line is the file's, not the module's: line numbers
    # are those of the generated source (the cost model's ledger and measure() refer to them)
    linecache.cache[filename] = (len(text), None, text.splitlines(True), filename)
    name = f"moa_kernels.{path.stem}" + ("_interpreted" if interpret else "")
    mod = types.ModuleType(name)
    mod.__file__ = filename
    sys.modules[name] = mod
    exec(compile(text, filename, "exec"), mod.__dict__)
    if interpret:
        interpret_module(mod)
    _LOADED[key, interpret] = mod
    return mod


def module_stem(source: str) -> str:
    """The file name (without '.py') the module of a generated source is executed from (module_for)."""
    return _path(key_of(source, __version__, triton.__version__, torch.__version__)).stem


def module_for(source: str, device: torch.device):
    """The module of a generated source for tensors on `device`: interpreted for CPU, JIT-compiled for CUDA."""
    check_device(device)
    key = key_of(source, __version__, triton.__version__, torch.__version__)
    return load_module(key, source, interpret=device.type == "cpu")
