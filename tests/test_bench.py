"""The GPU benchmark's row assembly, run on the CPU at toy sizes: every step (first call, timing, plan, cost,
float64 error, comparison) must work on tensors of any device, since a GPU session is too rare to debug in."""
import json

import pytest
import torch

from moa.devices import DEVICES

try:  # pytest's default (prepend) import mode puts tests/ on sys.path
    from bench_loader import load_benchmark, wall_ms
except ImportError:  # pragma: no cover
    from tests.bench_loader import load_benchmark, wall_ms


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("bench.py")


@pytest.mark.parametrize("label, name, params, form, versus", [
    ("sdpa", "sdpa", {}, None, "ref"),
    ("pi", "pi_attention", {"k": 8, "s": 4}, None, "causal"),
    ("retention", "retention", {}, None, "causal"),
])
def test_a_workload_row_has_every_field_on_cpu_tensors(bench, monkeypatch, label, name, params, form, versus):
    monkeypatch.setattr(bench, "_time", wall_ms)
    monkeypatch.setattr(bench, "ERROR_SHAPE", (1, 2, 24, 16))
    row = bench._workload(label, name, params, (1, 2, 24, 16), form, versus, "float32", torch.float32, "h100",
                          DEVICES["h100"], where="cpu")
    assert "failed" not in row and not row.get("step_failures"), row
    for field in ("moa_ms", "first_call_s", "plan", "pred_ms", "tflops", "error_vs_fp64", "ref_ms", "ratio"):
        assert row.get(field) is not None, field
    assert row["error_vs_fp64"] < 1e-5
    assert bench._line(row).startswith(label)
    json.dumps(row)   # the report is written as JSON


def test_a_failing_step_keeps_the_timing(bench, monkeypatch, tmp_path):
    monkeypatch.setattr(bench, "_time", wall_ms)
    monkeypatch.setattr(bench, "_error", lambda *a: 1 / 0)
    row = bench._workload("sdpa", "sdpa", {}, (1, 1, 16, 16), None, "ref", "float32", torch.float32, "h100",
                          DEVICES["h100"], where="cpu")
    assert row["moa_ms"] > 0 and "ZeroDivisionError" in row["step_failures"]["error_vs_fp64"]
    bench._write(tmp_path, "NVIDIA H200", [row, {"workload": "x", "failed": "E: no"}], "2026-01-01", json)
    md = (tmp_path / "nvidia-h200-2026-01-01.md").read_text()
    assert "ZeroDivisionError" in md and "failed: E: no" in md
    assert json.loads((tmp_path / "nvidia-h200-2026-01-01.json").read_text())["rows"][0]["moa_ms"] == row["moa_ms"]
