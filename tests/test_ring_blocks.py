"""Ring attention in one process: every (query shard, key shard) block merged like the ring, the plan's roles of
the inputs, the linear and normalised forms' plans, and the ring's cost model (no process group)."""
from __future__ import annotations

import os

import pytest
import torch

import moa

try:  # pytest's default (prepend) import mode puts tests/ on sys.path
    from ring_cases import EXAMPLES, F64, NORM, _bounds, _compile, _inputs
except ImportError:  # pragma: no cover
    from tests.ring_cases import EXAMPLES, F64, NORM, _bounds, _compile, _inputs


def _simulate(kernel, full, nb, mb):
    """Every (query shard, key shard) block run in one process and merged by log-sum-exp, like the ring."""
    from moa.runtime.binding import bind
    from moa.runtime.ring import _results, block_kernel, merge
    from moa.shard import pair_skipped

    plan, block = block_kernel(kernel)
    world = len(nb) - 1
    gd = bind(kernel.program, full).dims
    rows, skipped = [], 0
    for r in range(world):
        acc, b0, qside = {}, None, None
        for s in range(world):
            local = {}
            for nm, t in full.items():
                role, ax = plan.roles[nm]
                pos = None if ax is None else t.dim() - kernel.program.input_map[nm].rank + ax
                if role in ("query", "both"):
                    local[nm] = t.narrow(pos, nb[r], nb[r + 1] - nb[r])
                if role == "key":
                    local[nm] = t.narrow(pos, mb[s], mb[s + 1] - mb[s])
                if role == "both":
                    local[plan.kv_copies[nm]] = t.narrow(pos, mb[s], mb[s + 1] - mb[s])
                if role == "replicated":
                    local[nm] = t
            dims = plan.block_dims(gd, nb[r], nb[r + 1] - nb[r], mb[s], mb[s + 1] - mb[s])
            b = bind(plan.program, local, dims)
            if s == r:
                b0, qside = b, {nm: local[nm] for nm in full if plan.roles[nm][0] != "key"}
            if all(pair_skipped(block.schedules[o.name], b.dims) for o in plan.outputs):
                skipped += 1
                continue
            for o in plan.outputs:
                out, lse = block.launcher.tiled(o.name, b, store_lse=True)
                acc[o.name] = (out, lse) if o.name not in acc else merge(*acc[o.name], out, lse)
        rows.append(_results(plan, block, acc, b0, nb[r + 1] - nb[r], qside)["O"])
    return torch.cat(rows, dim=-2), skipped


@pytest.mark.parametrize("src, params, shape", [
    ("causal.moa", {}, dict(n=37)),
    ("sliding_window.moa", {"w": 7}, dict(n=37)),
    ("prefix_lm.moa", {"p": 9}, dict(n=37)),
    ("causal_bottom_right.moa", {}, dict(n=23, m=37)),
    ("relative_bias.moa", {}, dict(h=2, n=37)),
    ("gqa_alibi.moa", {}, dict(h=4, g=2, n=37)),
    ("mqa.moa", {}, dict(h=2, n=23, m=37)),
    ("dilated_window.moa", {}, dict(n=37)),
    ("global_window.moa", {}, dict(n=37)),
    ("softcap.moa", {}, dict(n=37)),
    ("pi_attention.moa", {"k": 5, "s": 4, "T": 3}, dict(n=37)),
])
def test_blocks_merge_to_single_process(src, params, shape):
    """The block program of every (query shard, key shard) pair, merged by log-sum-exp, is the kernel."""
    from moa import symbolic as sy

    k = moa.compile(os.path.join(EXAMPLES, src), **params)
    g = torch.Generator().manual_seed(1)
    dims = {"d": 8, "e": 8, **shape}
    dims.setdefault("m", dims["n"])
    full = {}
    for node in k.program.inputs:
        shp = [sy.evaluate(x, {**dims, **{p: v for p, v in k.program.params}}) for x in node.shape]
        if node.dtype == "float":
            full[node.attrs[0]] = torch.randn(shp, generator=g, dtype=F64)
        else:
            full[node.attrs[0]] = torch.rand(shp, generator=g) < 0.1 if node.dtype == "bool" else \
                torch.randint(0, 3, shp, generator=g)
    want = k(**full)
    for world in (2, 3):
        got, _ = _simulate(k, full, _bounds(dims["n"], world), _bounds(dims["m"], world))
        assert (got - want).abs().max().item() <= 1e-12, (src, world)


def test_plan_roles():
    from moa.runtime.ring import block_kernel

    plan, _ = block_kernel(moa.compile(os.path.join(EXAMPLES, "document_mask.moa")))
    assert plan.roles == {"Q": ("query", 0), "K": ("key", 0), "V": ("key", 0), "doc": ("both", 0)}
    assert plan.key_inputs == ("K", "V", "doc_kv")
    plan, _ = block_kernel(moa.compile(os.path.join(EXAMPLES, "relative_bias.moa")))
    assert plan.roles["bias"] == ("replicated", None) and plan.roles["Q"] == ("query", 1)
    plan, _ = block_kernel(_compile("novel"))
    assert plan.roles == {"Q": ("query", 1), "K": ("key", 1), "V": ("key", 1), "kb": ("key", 0),
                          "tq": ("query", 0), "sl": ("replicated", None)}


@pytest.mark.parametrize("src", ["power.moa", "linear.moa", "power_gated.moa"])
def test_normalize_runs_in_the_linear_form_not_by_lse(src):
    from moa.runtime.ring import block_kernel
    from moa.runtime.ring_linear import linear_kernel

    k = moa.compile(os.path.join(EXAMPLES, src))
    block_kernel(k)   # the rotation could run it (merged by sums), but the linear form moves no K/V and is used
    plan, rank = linear_kernel(k)
    assert plan.roles["Q"] == ("query", 0) and plan.roles["K"] == ("key", 0)
    assert rank.planner.linear_plans["O"][0] is not None   # the rank program keeps the causal mask j <= i
    assert linear_kernel(_compile("causal")) is None


def test_normalize_without_a_linear_form_rotates():
    from moa.runtime.ring import block_kernel, norm_outputs
    from moa.runtime.ring_linear import linear_kernel, linear_refusal

    k = moa.compile(NORM["norm_plain"])
    assert linear_kernel(k) is None and "causal mask" in linear_refusal(k)
    plan, block = block_kernel(k)
    assert norm_outputs(block) == {"O"} and plan.roles["K"] == ("key", 0)
    assert "lse = z_i" in block.source("O", dtype="float64", store_lse=True)   # the kernel returns z with O


def test_linear_ring_cost():
    k = moa.compile(os.path.join(EXAMPLES, "power_gated.moa"))
    # 32 heads: one device would run the linear form too (with one, its scan's few programs keep it quadratic)
    c = k.cost(ranks=4, interconnect="nvlink4", dtype="bf16", batch=32, n=65536, d=64, e=64)
    feats = 65 * 64 // 2                                     # D = C(64 + 1, 2)
    assert c.form == "linear" and c.blocks_total == 4 and c.blocks_skipped == 0
    assert c.bytes_sent == [32 * 3 * (feats * 64 + feats + 1) * 4] * 4   # fp32 states, G at the last row, P - 1 sends
    assert not c.hides and c.exposed_seconds[0] > 0
    assert c.flops[0] == c.flops[3] < c.flops[1] == c.flops[2]     # middle ranks run the extra total scan
    # which computes their chunk states a second time (p = 2, d = 64: the scan's dots and features, about half of
    # an edge rank's work): two ranks x ~1.5 + two x 1
    assert 1.4 < c.flops[1] / c.flops[0] < 1.6
    # each rank is counted with the flags it launches: the first stores its total state (FINAL), the last reads the
    # carried one (INIT) and its output kernel the carried gate, once per program (32 heads x 256 chunks, float32)
    assert c.dram_bytes[3] - c.dram_bytes[0] == 32 * 256 * 4
    assert 0.99 * c.single_device_flops <= sum(c.flops) <= 1.3 * c.single_device_flops
    assert c.predicted_seconds < c.single_device_seconds
    assert "no K/V rotation" in c.summary()


def test_ring_without_process_group_is_a_clear_error():
    import torch.distributed as dist

    # the ring tests run their ranks in spawned processes: the pytest process never holds a group
    assert not dist.is_initialized()
    k = _compile("sdpa")
    with pytest.raises(moa.MoaError, match="init_process_group"):
        k.ring(**_inputs("sdpa"))


def test_ring_cost():
    from moa.runtime.ring import INTERCONNECTS, ring_cost

    k = moa.compile(os.path.join(EXAMPLES, "causal.moa"))
    c = k.cost(ranks=4, interconnect="nvlink4", dtype="bf16", n=8192, d=128, e=128)
    assert c.blocks_skipped == 6 and c.blocks_total == 16
    # tile-aligned shards: the same tiles, redistributed; each block adds only its own epilogue
    assert c.single_device_flops <= sum(c.flops) <= 1.0001 * c.single_device_flops
    assert c.blocks[0][1] is None and c.blocks[3][1].flops > 0  # rank 0 skips rank 3's keys; rank 3 computes 2's
    assert c.flops[0] < c.flops[1] < c.flops[2] < c.flops[3]  # contiguous causal shards are imbalanced
    kv = 2 * (8192 // 4) * 128 * 2                            # K and V shard, bf16
    assert c.step_bytes_sent[0] == [kv, kv, kv, 0] and c.bytes_sent == [3 * kv] * 4
    sdpa = moa.compile(os.path.join(EXAMPLES, "sdpa.moa"))
    fast = ring_cost(sdpa, ranks=4, interconnect="nvlink4", n=65536, m=65536, d=64, e=64)
    assert fast.hides and max(fast.exposed_seconds) == 0
    slow = ring_cost(sdpa, ranks=4, interconnect="ib_hdr", n=2048, m=2048, d=64, e=64)
    assert not slow.hides and max(slow.exposed_seconds) > 0
    assert all(src for _, src in INTERCONNECTS.values())
    with pytest.raises(moa.InputError):
        ring_cost(sdpa, ranks=4, interconnect="carrier-pigeon", n=64, m=64, d=8, e=8)
