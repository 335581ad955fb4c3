"""The backward rows of the benchmark (benchmarks/backward_bench.py, `bench.py --backward`) assembled on the CPU at
toy sizes: every step (first call, timing, prediction, float64 gradient error, SDPA) works on tensors of any device,
and without a GPU the predicted table prints."""

import pytest
import torch

try:  # pytest's default (prepend) import mode puts tests/ on sys.path
    from bench_loader import load_benchmark, wall_ms
except ImportError:  # pragma: no cover
    from tests.bench_loader import load_benchmark, wall_ms


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("backward_bench.py")


@pytest.mark.parametrize("index", [1, 4])   # causal (SDPA to compare), gqa_alibi (kv heads)
def test_a_backward_row_has_every_field_on_cpu(bench, monkeypatch, index):
    monkeypatch.setattr(bench, "ERROR_SHAPE", (1, 4, 40, 16))
    stem, params, versus = bench.WORKLOADS[index]
    r = bench.row(stem, params, versus, (1, 4, 48, 16), torch.float32, "h100", where="cpu", timer=wall_ms)
    assert "failed" not in r and "step_failures" not in r, r
    for field in ("moa_ms", "first_call_s", "pred_gflop", "pred_mb", "roofline_ms", "error_vs_fp64"):
        assert r.get(field) is not None, (field, r)
    assert r["error_vs_fp64"] < 1e-5 and r["fused"] == "Q, K, V"
    assert (r.get("sdpa_ms") is not None) == (stem == "causal")
    assert stem in bench.line(r) and "FAILED" not in bench.line(r)


def test_predicted_table_without_a_gpu(bench, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)

    class Args:
        batch, heads, n, d, dtype, device, out = 1, 2, 256, 64, "bf16", "h100", "unused"
    bench.run(Args)
    out = capsys.readouterr().out
    assert "no CUDA GPU" in out and all(stem in out for stem, _, _ in bench.WORKLOADS)
    assert "not predicted" not in out, out
