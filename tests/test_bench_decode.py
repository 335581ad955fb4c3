"""The decoding rows of the benchmark (benchmarks/decode_bench.py, `bench.py --decode`) assembled on the CPU at
toy sizes: every step (first call, timing, prediction, float64 error, SDPA) must work on tensors of any device."""

import pytest
import torch

try:  # pytest's default (prepend) import mode puts tests/ on sys.path
    from bench_loader import load_benchmark, wall_ms
except ImportError:  # pragma: no cover
    from tests.bench_loader import load_benchmark, wall_ms


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("decode_bench.py")


@pytest.mark.parametrize("index", [0, 2, 3])   # gqa, gqa paged, gqa speculative (bottom-right)
def test_a_decode_row_has_every_field_on_cpu(bench, monkeypatch, index):
    monkeypatch.setattr(bench, "ERROR_SHAPE", (1, 4, 2, 2, 128, 16))
    label, program, params, _, page, versus = bench.WORKLOADS[index]
    shape = (1, 4, 2, 4 if index == 3 else 1, 128, 16)
    r = bench.row(label, program, params, shape, page and 16, versus, torch.float32, "h100", where="cpu",
                  timer=wall_ms)
    assert "failed" not in r, r
    for field in ("moa_ms", "first_call_s", "splits", "packed_heads", "pred_ms", "kv_bytes", "kv_gbps",
                  "pct_bandwidth", "error_vs_fp64", "sdpa_ms"):
        assert r.get(field) is not None, (field, r)
    assert r["error_vs_fp64"] < 1e-5 and r["packed_heads"] == 2
    assert r["kv_bytes"] == 2 * 128 * 32 * 4   # K and V (d = 16 each) of 2 heads, float32
    assert label in bench.line(r) and "FAILED" not in bench.line(r)


def test_the_paged_inputs_hold_the_same_cache(bench):
    x = {"Q": torch.randn(2, 4, 1, 8), "K": torch.randn(2, 2, 64, 8), "V": torch.randn(2, 2, 64, 8)}
    px, table = bench.paged(x, 16)
    pool = px["K"].reshape(2, 8, 16, 8)
    for b in range(2):
        for p in range(4):
            assert torch.equal(pool[:, table[b, p]], x["K"][b, :, 16 * p:16 * (p + 1)])
