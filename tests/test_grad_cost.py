"""The backward cost model (runtime/backward_cost.py): predicted FLOPs, transcendentals and bytes loaded and stored
of the fused backward kernels equal the interpreter's counters exactly (float64, ragged sizes, 16 x 16 tiles), with
the tiles each kernel iterates over, visits, and finds full or partial."""
import pytest

import moa
from moa.errors import UnsupportedError
from moa.runtime import backward_cost, backward_run
from moa.runtime.measure import instrument
from moa.runtime.tiling import Config

try:
    import grad_cases as C
except ImportError:  # pragma: no cover
    from tests import grad_cases as C

STEMS = ["alibi", "causal", "causal_bottom_right", "dilated_window", "gqa_alibi", "linear", "linear_relu", "mqa",
         "power", "prefix_lm", "ring_local", "sdpa", "sliding_window", "softcap"]


@pytest.fixture(autouse=True)
def _small_tiles(monkeypatch):
    monkeypatch.setattr(backward_run, "INTERPRETER_BLOCKS", (16, 16))


def _call(stem: str):
    k = moa.compile(f"examples/{stem}.moa", **C.PARAMS.get(stem, {}))
    x = C.inputs(k.program, C.dims_for(k.program, {"n": 45, "m": 37, "d": 5, "e": 3, "h": 2, "g": 1}), 0)
    return k, k.bind(x), C.cotangents(k, x, 0)


@pytest.mark.parametrize("stem", STEMS)
def test_predicted_backward_work_is_exact(stem):
    k, b, cot = _call(stem)
    out, lse = k.launcher.tiled(k.output_names[0], b, store_lse=True)
    pred = backward_cost.predict(k.backward.runner, b.dims, b.batch, "float64", Config(16, 16))
    with instrument() as c:
        k.backward.runner.grads(b, out, lse, cot["O"])
    assert sum(w.flops for w in pred.values()) == c.flops
    assert sum(w.transcendentals for w in pred.values()) == c.transcendentals
    assert sum(w.programs for w in pred.values()) == c.programs
    assert sum(w.bytes_loaded for w in pred.values()) == c.dram_bytes_loaded
    assert sum(w.bytes_stored for w in pred.values()) == c.dram_bytes_stored
    kv, q = pred["_attn_bwd_dkdv"], pred["_attn_bwd_dq"]
    heads = 2 if any(v.name == "a" for v, _ in k.backward.runner.sched.lead) else 1
    assert kv.visits <= kv.iterations <= 2 * heads * 3 * 3   # batch 2 x heads programs, <= 3 key x 3 query tiles
    if stem in ("sdpa", "alibi", "softcap", "mqa"):   # no mask: every tile pair, no skip test (no visit region)
        assert (kv.iterations, kv.visits) == (2 * heads * 9, 0)
    if stem == "sliding_window":   # w = 7: key tile 0 needs row tiles 0-1, tile 1 rows 1-2, tile 2 row 2 only
        assert kv.iterations == 2 * 5
    if stem == "causal":   # 45 rows, 45 keys in tiles of 16: 6 of the 9 tile pairs hold a pair j <= i
        assert (kv.iterations, kv.visits, q.iterations) == (2 * 6, 2 * 6, 2 * 6)   # both loops start at the diagonal
        assert (kv.full_tiles, kv.partial_tiles) == (2 * 1, 2 * 5)   # rows 16-31 x keys 0-15: full, no mask code


@pytest.mark.parametrize("stem, why", [("document_mask", "by the data")])
def test_data_skipping_without_the_data_is_refused(stem, why):
    """Which tiles a document mask skips depends on the ids: without them (data=) there is no exact prediction
    (tests/test_grad_cost_all.py predicts it with them, and the atomic adds of relative_bias)."""
    k, b, _ = _call(stem)
    with pytest.raises(UnsupportedError, match=why):
        backward_cost.predict(k.backward.runner, b.dims, b.batch, "float64", Config(16, 16))
