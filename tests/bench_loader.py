"""Shared by the benchmark tests (tests/test_bench*.py): a benchmark script loaded as a module, and a wall clock."""
import importlib.util
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def load_benchmark(filename: str):
    """benchmarks/<filename> as a module (the benchmarks are scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(f"moa_{Path(filename).stem}", ROOT / "benchmarks" / filename)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def wall_ms(fn) -> float:
    """Milliseconds one call of fn takes (a stand-in timer for the GPU's)."""
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3
