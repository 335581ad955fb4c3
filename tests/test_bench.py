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


@pytest.mark.parametrize("name, params", [("key_padding", {}), ("block_mask", {"B": 8})])
def test_the_data_mask_rows_compare_with_the_same_mask_in_flex_attention(bench, monkeypatch, name, params):
    """The rows of masks from data (a key length per batch entry, a block table) give flex_attention the mask the
    moa program computes: eager flex_attention (torch.compile stubbed out on the CPU) equals moa's output, and the
    row itself is complete."""
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: fn)
    monkeypatch.setattr("torch.nn.attention.flex_attention._warn_once", lambda *a, **kw: None)
    k, x, dims, batch = bench._setup(name, params, (2, 2, 40, 16), None, torch.float32, "cpu", seed=3)
    if name == "key_padding":
        assert x["L"].shape == (2, 2) and torch.equal(x["L"][:, 0], x["L"][:, 1])   # per batch entry
    label, ref = bench.reference_fn(name, k, x, dims, dict(k.program.params))
    assert label == "flex_attention"
    torch.testing.assert_close(ref(), k(**x), atol=2e-5, rtol=2e-5)
    monkeypatch.setattr(bench, "_time", wall_ms)
    monkeypatch.setattr(bench, "ERROR_SHAPE", (1, 2, 24, 16))
    row = bench._workload(name, name, params, (2, 2, 40, 16), None, "ref", "float32", torch.float32, "h100",
                          DEVICES["h100"], where="cpu")
    assert "failed" not in row and not row.get("step_failures"), row
    assert row["reference"] == "flex_attention" and row["error_vs_fp64"] < 1e-5
