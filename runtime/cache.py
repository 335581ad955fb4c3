"""On-disk cache of generated kernel modules, safe under concurrent processes.

Each entry is a Python file named by the SHA-256 of its content key (IR hash, params, dtype, config and the
versions of moa, triton and torch). Files are written to a temporary name and renamed atomically, so a reader
sees a whole file or none; the first line holds the digest of the rest, so a truncated or corrupted file is
detected, reported with a warning and rebuilt. MOA_CACHE_DIR overrides the platform cache directory.
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
import sys
import tempfile
import warnings
from pathlib import Path

_LOADED: dict = {}


def cache_dir() -> Path:
    """MOA_CACHE_DIR, else $XDG_CACHE_HOME/moa, else ~/.cache/moa (Linux), ~/Library/Caches/moa (macOS),
    %LOCALAPPDATA%/moa (Windows)."""
    env = os.environ.get("MOA_CACHE_DIR")
    if env:
        return Path(env)
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


def _path(key: str) -> Path:
    return cache_dir() / "kernels" / f"moa_{key}.py"


def _read_valid(path: Path) -> str | None:
    try:
        raw = path.read_text()
    except (OSError, UnicodeDecodeError):
        return None
    first, _, rest = raw.partition("\n")
    if first != f"# moa-digest: {_digest(rest)}":
        return None
    return rest


def store(key: str, source: str) -> Path:
    """Write (or validate) the cache entry for key; returns its path."""
    path = _path(key)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists():
        have = _read_valid(path)
        if have == source:
            return path
        warnings.warn(f"moa: cache entry {path.name} is corrupted or stale; rebuilding it", RuntimeWarning,
                      stacklevel=3)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp_", suffix=".py")
    with os.fdopen(fd, "w") as f:
        f.write(f"# moa-digest: {_digest(source)}\n{source}")
    os.replace(tmp, path)
    return path


def load_module(key: str, source: str):
    """The module of a generated kernel (imported once per process)."""
    if key in _LOADED:
        return _LOADED[key]
    path = store(key, source)
    name = f"moa_kernels.{path.stem}"
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    _LOADED[key] = mod
    return mod
