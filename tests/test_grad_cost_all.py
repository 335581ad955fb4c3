"""Backward.cost (runtime/backward_cost_all.py) for every example: the predicted FLOPs, transcendentals, programs and
DRAM bytes loaded and stored of each kernel the backward call launches equal the instrumented interpreter's counters
of that launch (runtime/measure.py), at ragged sizes (n = 23, m = 17: no multiple of the 16 x 16 tiles), batch 2.

Paths: fused (softmax and normalised single branches; relative_bias's and power_gated's atomic adds; document_mask's
and global_window's tiles skipped by the data, given as inputs=), several branches (pi_attention: each branch's
forward recomputed and its two kernels), window mixing (bla), the chunked linear form (form="linear")."""
from __future__ import annotations

import collections

import pytest
import torch

import moa
from moa.errors import UnsupportedError
from moa.runtime import backward_configs, backward_run, launch, linear_backward, linear_run, window_backward
from moa.runtime.measure import instrument
from moa.runtime.tiling import Config, LinearConfig

try:
    import grad_cases as C
except ImportError:  # pragma: no cover
    from tests import grad_cases as C

STEMS = sorted(p.stem for p in C.EXAMPLES)
LINEAR = ["linear", "linear_relu", "power", "power_gated"]
SIZE = {"n": 23, "m": 17, "d": 5, "e": 3, "h": 2, "g": 1}
FIELDS = (("flops", "flops"), ("transcendentals", "transcendentals"), ("programs", "programs"),
          ("bytes_loaded", "dram_bytes_loaded"), ("bytes_stored", "dram_bytes_stored"))


@pytest.fixture(autouse=True)
def _small_tiles(monkeypatch):
    monkeypatch.setattr(backward_run, "INTERPRETER_BLOCKS", (16, 16))
    monkeypatch.setattr(window_backward, "INTERPRETER_BLOCKS", (16, 16))
    monkeypatch.setattr(linear_backward, "INTERPRETER_CONFIG", LinearConfig(16, 16))


@pytest.fixture
def launches(monkeypatch):
    """Every kernel launch of the modules a backward runs (launch: the several-branch forward recompute), counted
    alone: [(function name, Counters)]."""
    seen: list = []
    for mod in (backward_run, launch, window_backward, linear_backward, linear_run):
        orig = mod.run

        def counted(fn, grid, args, consts, device, what, _orig=orig):
            with instrument() as c:
                _orig(fn, grid, args, consts, device, what)
            seen.append((getattr(fn, "__name__", None) or fn.fn.__name__, c))

        monkeypatch.setattr(mod, "run", counted)
    return seen


def _setup(stem: str, form=None, seed=0, size=SIZE, batch=(2,), dtype=torch.float64):
    params = dict(C.PARAMS.get(stem, {}), **({"form": form} if form else {}))
    k = moa.compile(f"examples/{stem}.moa", **params)
    dims = C.dims_for(k.program, size)
    x = C.inputs(k.program, dims, seed, batch, dtype)
    return k, dims, x


def _measured(k, x, seen: list) -> list:
    """The launches of one backward call (the forward's outside), in launch order."""
    outs, saved = k.backward.forward(x)
    cot = C.cotangents(k, x, 0)
    seen.clear()
    k.backward.backward(x, outs + saved, [cot[k.output_names[0]].to(outs[0].dtype)])
    return list(seen)


def _ints(x: dict) -> dict:
    return {n: t for n, t in x.items() if not t.is_floating_point()}


def _check(pred, got: list) -> None:
    """Each kernel's prediction equals its launch's counters (a kernel launched per branch: in branch order)."""
    want = collections.defaultdict(list)
    for name, w in pred.kernels.items():
        want[name.split("/")[-1]].append(w)
    have = collections.defaultdict(list)
    for name, c in got:
        have[name].append(c)
    assert sorted(want) == sorted(have), (list(want), [n for n, _ in got])
    for name in want:
        assert len(want[name]) == len(have[name]), name
        for w, c in zip(want[name], have[name]):
            assert [getattr(w, a) for a, _ in FIELDS] == [getattr(c, b) for _, b in FIELDS], name
    assert pred.flops == sum(c.flops for _, c in got)
    assert pred.bytes_loaded + pred.bytes_stored == sum(c.dram_bytes_loaded + c.dram_bytes_stored for _, c in got)


@pytest.mark.parametrize("stem", STEMS)
def test_every_example_backward_is_predicted_exactly(stem, launches):
    """Whatever backward the call runs (at n = 23 the linear examples run the quadratic fused kernels)."""
    k, dims, x = _setup(stem)
    pred = k.backward.cost(dims, (2,), "float64", inputs=_ints(x))
    assert pred.path == {"bla": "window", "pi_attention": "multi"}.get(stem, "fused")
    _check(pred, _measured(k, x, launches))


@pytest.mark.parametrize("stem", LINEAR)
def test_chunked_linear_backward_is_predicted_exactly(stem, launches):
    """form="linear": the recomputed prefix states and the four backward kernels (power_gated: the gates' atomic
    adds at G[i] and G[j])."""
    k, dims, x = _setup(stem, form="linear")
    pred = k.backward.cost(dims, (2,), "float64")
    assert pred.path == "linear"
    assert list(pred.kernels) == ["_chunk_scan", "_bwd_scan", "_bwd_dk", "_bwd_dv", "_bwd_dq"]
    _check(pred, _measured(k, x, launches))


@pytest.mark.parametrize("stem, form, dtype", [("relative_bias", None, "float32"), ("document_mask", None, "bfloat16"),
                                               ("pi_attention", None, "float32"), ("bla", None, "bfloat16"),
                                               ("power_gated", "linear", "float32")])
def test_float32_and_bfloat16_are_predicted_exactly(stem, form, dtype, launches):
    """bfloat16 inputs compute in float32 in the interpreter (runtime/launch.py compute_dtype): 4-byte elements."""
    k, dims, x = _setup(stem, form, seed=1, dtype=getattr(torch, dtype))
    pred = k.backward.cost(dims, (2,), dtype, inputs=_ints(x))
    _check(pred, _measured(k, x, launches))


def test_atomic_adds_are_counted(launches):
    """relative_bias: every (row, key) lane of a visited tile whose bias index is in range adds once (one load, one
    store, one flop); the prediction without them would be short by exactly that."""
    k, dims, x = _setup("relative_bias")
    pred = k.backward.cost(dims, (2,), "float64")
    dq = pred.kernels["_attn_bwd_dq"]
    got = dict(_measured(k, x, launches))["_attn_bwd_dq"]
    assert dq.bytes_stored == got.dram_bytes_stored
    # dQ itself: 2 batch x 2 heads x 23 rows x 5 columns (float64); the rest are the bias gradient's atomic adds
    assert dq.bytes_stored > 2 * 2 * 23 * 5 * 8


def test_data_decides_the_tiles(launches):
    """document_mask with one document per row block skips more tiles than with one document: the prediction
    follows the ids per batch entry (each entry its own ids), and equals the interpreter for both."""
    k, dims, x = _setup("document_mask", size={**SIZE, "n": 40})
    x["doc"] = torch.stack([torch.zeros(40, dtype=torch.int64), torch.arange(40) // 16])
    pred = k.backward.cost(dims, (2,), "float64", inputs=_ints(x))
    _check(pred, _measured(k, x, launches))
    one = k.backward.cost(dims, (2,), "float64", inputs={"doc": torch.zeros(2, 40, dtype=torch.int64)})
    assert pred.kernels["_attn_bwd_dkdv"].visits < one.kernels["_attn_bwd_dkdv"].visits
    assert pred.flops < one.flops


GQA_GATED = """dim h, g, n, d, e
in Q[h, n, d], K[g, n, d], V[g, n, e], G[h, n]
A[a, i, j] = where(j <= i, dot(Q[a, i], K[a // (h // g), j]) ^ 2 * exp(G[a, i] - G[a, j]), 0)
out O[a] = normalize(A[a], axis=-1) @ V[a // (h // g)]
"""


@pytest.mark.parametrize("form", ["quadratic", "linear"])
def test_heads_sharing_kv_with_a_per_head_gate(form, launches):
    """A lead axis (K, V read by groups of heads), the gate's atomic adds at a per-head index, both forms."""
    k = moa.compile(GQA_GATED, form=form)
    dims = {"h": 4, "g": 2, "n": 21, "d": 4, "e": 3}
    x = C.inputs(k.program, dims, 1)
    pred = k.backward.cost(dims, (2,), "float64")
    assert pred.path == {"quadratic": "fused"}.get(form, form)
    _check(pred, _measured(k, x, launches))


def test_each_kernel_its_own_tiles(monkeypatch, launches):
    """On a GPU each fused kernel takes its own config (runtime/backward_configs.py): config= kernel -> Config."""
    tiles = {"_attn_bwd_dkdv": Config(16, 32), "_attn_bwd_dq": Config(32, 16)}
    monkeypatch.setattr(backward_run.BackwardRunner, "_config", lambda self, spec, kern, b, compute: (
        tiles[kern.name], backward_configs.constexprs(spec, b.dims, tiles[kern.name])))
    k, dims, x = _setup("document_mask", size={**SIZE, "n": 40})
    pred = k.backward.cost(dims, (2,), "float64", inputs=_ints(x), config=tiles)
    _check(pred, _measured(k, x, launches))


def test_data_skipping_needs_the_inputs():
    k, dims, _ = _setup("global_window")
    with pytest.raises(UnsupportedError, match="inputs="):
        k.backward.cost(dims, (2,), "float64")


def test_torch_work_is_named_not_counted():
    k, dims, _ = _setup("pi_attention")
    pred = k.backward.cost(dims, (2,), "float64")
    assert [n.split("/")[0] for n in pred.kernels] == ["branch0"] * 3 + ["branch1"] * 3
    assert any("by torch where the tensors are: no kernel work, not counted" in note for note in pred.notes)


@pytest.mark.slow
@pytest.mark.parametrize("stem, form", [("causal", None), ("document_mask", None), ("relative_bias", None),
                                        ("pi_attention", None), ("power_gated", "linear"), ("bla", None)])
def test_larger_and_two_batch_axes(stem, form, launches):
    k, dims, x = _setup(stem, form, size={**SIZE, "n": 70, "m": 53, "d": 20, "e": 9}, batch=(2, 3))
    pred = k.backward.cost(dims, (2, 3), "float64", inputs=_ints(x))
    _check(pred, _measured(k, x, launches))


@pytest.mark.parametrize("stem", ["linear", "power_gated"])
def test_chunked_linear_backward_with_value_tiles_is_predicted_exactly(stem, launches, monkeypatch):
    """The scans split along the value axis (BLOCK_V = 16 of HEAD_DIM_V = 64: four value tiles per feature tile;
    the normalisers z and u stored by the first), counted exactly."""
    monkeypatch.setattr(linear_backward, "INTERPRETER_CONFIG", LinearConfig(16, 16, block_v=16))
    k, dims, x = _setup(stem, form="linear", size={**SIZE, "e": 40})
    pred = k.backward.cost(dims, (2,), "float64")
    assert pred.kernels["_bwd_scan"].programs == 1 * 4 * 2   # one feature tile x 4 value tiles x batch 2
    _check(pred, _measured(k, x, launches))
