"""Edges of the cost model against what the instrumented interpreter executes (measure() runs the kernel; float64,
CPU tiles): a split key loop whose row tile has an empty key range that still rounds down onto a tile (the kernel
runs that tile: there is no skip test in a split loop), and integer inputs without the call's batch axes (they
broadcast, in cost and varlen_cost as in the call)."""
import itertools

import numpy as np
import pytest
import torch

import moa
from moa import tiles as TL
from moa.errors import InputError
from moa.runtime.check import random_inputs
from moa.runtime.decode_cost import decode_cost
from moa.runtime.decode_measure import measure, measure_varlen
from moa.runtime.varlen_cost import varlen_cost

D = 16
F64 = torch.float64
COUNTERS = ("flops", "transcendentals", "dram_bytes_loaded", "dram_bytes_stored", "tiles_visited")

BAND = """dim n, d, e
param a = 5, w = 20
in Q[n, d], K[n, d], V[n, e]
S[i, j] = where(j >= i + a and j - i <= w, dot(Q[i], K[j]) / sqrt(d), -inf)
out O = softmax(S, axis=-1) @ V"""

_KERNELS: dict = {}


def _kernel(src, **params):
    key = (src, tuple(sorted(params.items())))
    if key not in _KERNELS:
        _KERNELS[key] = moa.compile(src, **params)
    return _KERNELS[key]


def _counters(r) -> dict:
    return {f: getattr(r, f) for f in COUNTERS}


def _check(k, n, batch=(), data=None, **inputs):
    """measure() of a call against cost() of its dims (data: the integer inputs given to the cost model)."""
    got = _counters(k.measure(**inputs))
    want = _counters(k.cost(dtype="float64", device="cpu", batch=batch, inputs=data, n=n, d=D, e=D))
    assert got == want, f"measured {got}\npredicted {want}"
    return got


def _rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


# ---- bug 1: a split key loop's tile past the row tile's keys ----------------------------------------------

@pytest.mark.parametrize("src, params, n", [
    (BAND, {}, 257), (BAND, {}, 130), (BAND, {"a": 1, "w": 64}, 257),
    ("examples/sliding_window.moa", {"w": -5}, 257),
])
def test_empty_key_range_rounding_onto_a_tile_is_counted_as_visited(src, params, n):
    """The last row tile's first admissible key lies past the last key; the loop starts at the tile holding it,
    rounded down, which ends at the last key: the kernel runs it (no skip test in a split loop), so it counts."""
    k = _kernel(src, **params)
    got = _check(k, n, **random_inputs(k.program, dict(n=n, d=D, e=D), seed=1, dtype=F64))
    rep = k.cost(dtype="float64", device="cpu", n=n, d=D, e=D)
    assert got["tiles_visited"] > rep.tiles_needed   # the extra tile holds no admissible pair


def test_split_loop_iterations_are_all_visited():
    """moa/tiles.py: a split loop (no skip test) visits every iteration, even one the skip formula would skip."""
    k = _kernel(BAND)
    sched = k.planner.schedules[k.output_names[0]]
    b = sched.branches[0]
    assert b.split
    env = {dim: 257 if dim.name == "n" else D for dim in k.planner.cg_program.dims}
    t = TL.branch_tiles(b, env, 257, 257, 64, 64)
    assert t.visited.all() and len(t.rows) > 0
    assert int((t.rows == 4).sum()) == 1   # row 256: keys from 261 (none), one tile [256, 256]


@pytest.mark.parametrize("a, w", list(itertools.product([-3, 0, 1, 5], [0, 20, 64])))
def test_band_masks_counted_exactly_at_ragged_sizes(a, w):
    k = _kernel(BAND, a=a, w=w)
    for n in (1, 63, 64, 65, 130, 257):
        _check(k, n, **random_inputs(k.program, dict(n=n, d=D, e=D), seed=n, dtype=F64))


# ---- bug 2: integer inputs without the call's batch axes --------------------------------------------------

def _doc(n, seed=0):
    return torch.sort(torch.randint(0, 6, (n,), generator=torch.Generator().manual_seed(seed))).values


@pytest.mark.parametrize("shape", [(), (1,)])
def test_cost_inputs_broadcast_to_the_batch(shape):
    """doc of shape [n] (or [1, n]) with Q of shape [2, n, d]: cost expands it, as the call does."""
    k = _kernel("examples/document_mask.moa")
    n = 257
    doc = _doc(n).reshape(*shape, n)
    x = dict(Q=_rand(2, n, D), K=_rand(2, n, D, seed=1), V=_rand(2, n, D, seed=2), doc=doc)
    got = _check(k, n, batch=(2,), data={"doc": doc}, **x)
    full = k.cost(dtype="float64", device="cpu", batch=(2,), inputs={"doc": doc.expand(2, n)}, n=n, d=D, e=D)
    assert _counters(full) == got
    blind = k.cost(dtype="float64", device="cpu", batch=(2,), n=n, d=D, e=D)
    assert blind.tiles_visited > got["tiles_visited"]   # the ids were used: tiles skipped by the data
    assert full.tiles_needed == k.cost(dtype="float64", device="cpu", batch=(2,), inputs={"doc": doc}, n=n, d=D,
                                       e=D).tiles_needed


def test_backward_cost_inputs_broadcast_to_the_batch():
    """The backward's cost takes the same shared ids as the call and the forward's cost."""
    k = _kernel("examples/document_mask.moa")
    doc, dims = _doc(130), dict(n=130, d=D, e=D)
    assert k.backward.cost(dims, batch=(2,), dtype="float64", inputs={"doc": doc}) == \
        k.backward.cost(dims, batch=(2,), dtype="float64", inputs={"doc": doc.expand(2, 130)})


def test_cost_inputs_that_do_not_broadcast_are_refused():
    k = _kernel("examples/document_mask.moa")
    with pytest.raises(InputError, match="does not broadcast"):
        k.cost(dtype="float64", device="cpu", batch=(2,), inputs={"doc": np.zeros((3, 65), np.int64)}, n=65, d=D,
               e=D)
    with pytest.raises(InputError, match=r"ends in \(65,\)"):
        k.cost(dtype="float64", device="cpu", batch=(2,), inputs={"doc": np.zeros((2, 64), np.int64)}, n=65, d=D,
               e=D)


def test_varlen_cost_inputs_broadcast_to_the_batch():
    """varlen_cost(batch=(2,), inputs={doc: packed ids of shape [N]}), as varlen takes them with Q [2, N, d]."""
    k = _kernel("examples/document_mask.moa")
    lens = [1, 40, 130, 70]
    n = sum(lens)
    doc = torch.cat([torch.arange(x) // 9 for x in lens])
    cq = torch.tensor([0] + lens).cumsum(0)
    ck = cq.to(torch.int32)
    x = dict(Q=_rand(2, n, D), K=_rand(2, n, D, seed=1), V=_rand(2, n, D, seed=2), doc=doc)
    got = measure_varlen(k, x, cq, ck, splits=2)
    p = varlen_cost(k, cq, ck, splits=2, dtype="fp64", device="cpu", batch=(2,), inputs={"doc": doc}, d=D, e=D)
    assert _counters(got) == _counters(p)
    full = varlen_cost(k, cq, ck, splits=2, dtype="fp64", device="cpu", batch=(2,), inputs={"doc": doc.expand(2, n)},
                       d=D, e=D)
    assert _counters(full) == _counters(p)
    with pytest.raises(InputError, match="does not broadcast"):
        varlen_cost(k, cq, ck, splits=2, dtype="fp64", device="cpu", batch=(2,), inputs={"doc": doc.expand(3, n)},
                    d=D, e=D)


def test_paged_varlen_cost_pool_ids_broadcast_to_the_batch():
    """The pools' ids of shape [pool keys] with K/V pools of shape [2, pool keys, d]: gathered per sequence after
    the batch expansion (the pool's key axis is the last)."""
    k, p_ = _kernel("examples/document_mask.moa"), 16
    lq, lk, pages = [3, 1, 0, 20], [40, 1, 0, 96], 6
    cq, ck = torch.tensor([0] + lq).cumsum(0), torch.tensor([0] + lk).cumsum(0)
    table = torch.randperm(len(lk) * pages, generator=torch.Generator().manual_seed(0)).view(len(lk), pages)
    doc = torch.full((len(lk) * pages * p_,), 7)   # stale pool rows
    for s, n in enumerate(lk):
        for j in range(n):
            doc[int(table[s, j // p_]) * p_ + j % p_] = j // 9
    keys = len(doc)
    x = dict(Q=_rand(2, sum(lq), D), K=_rand(2, keys, D, seed=1), V=_rand(2, keys, D, seed=2), doc=doc)
    got = measure_varlen(k, x, cq, ck, block_table=table, page_size=p_)
    p = varlen_cost(k, cq, ck, dtype="fp64", device="cpu", batch=(2,), page_size=p_, pages=pages, block_table=table,
                    inputs={"doc": doc}, d=D, e=D)
    assert _counters(got) == _counters(p)


def _counters5(x):
    return (x.flops, x.transcendentals, x.dram_bytes_loaded, x.dram_bytes_stored, x.tiles_visited)


def test_paged_calls_plan_for_the_keys_read_not_the_pool():
    """A paged decode or varlen call picks its schedule and tiles for the keys its table reads, as decode_cost and
    varlen_cost predict them: a pool larger than the call's pages changed the runtime's choice (a residue schedule
    at a 448-key pool, 32-key tiles at a 32-key pool), so measured and predicted work differed."""
    k = moa.compile("""dim n, d, e
param s = 5
in Q[n, d], K[n, d], V[n, e]
S[i, j] = where((i - j) % s == 0, dot(Q[i], K[j]) / sqrt(d), -inf)
out O = softmax(S, axis=-1) @ V""")
    want = _counters5(decode_cost(k, 1, 112, dtype="fp64", device="cpu", batch=(4,), page_size=16, d=4, e=4))
    for pool in (28, 7):   # each batch index its own 7 pages, or the same 7 shared
        table = torch.arange(28).view(4, 7) if pool == 28 else torch.arange(7).expand(4, 7).contiguous()
        x = dict(Q=_rand(4, 1, 4), K=_rand(pool * 16, 4, seed=1), V=_rand(pool * 16, 4, seed=2))
        assert _counters5(measure(k, x, block_table=table, page_size=16)) == want, pool
    causal = moa.compile("examples/causal_bottom_right.moa")
    for lk, pool in ((1, 1), (1, 4), (33, 2)):
        cq, ck, npg = torch.tensor([0, 1]), torch.tensor([0, lk]), -(-lk // 32)
        x = dict(Q=_rand(1, 4), K=_rand(pool * 32, 4, seed=1), V=_rand(pool * 32, 4, seed=2))
        got = measure_varlen(causal, x, cq, ck, block_table=torch.arange(npg).view(1, npg), page_size=32)
        assert _counters5(got) == _counters5(varlen_cost(causal, cq, ck, dtype="fp64", device="cpu", page_size=32,
                                                         pages=npg, d=4, e=4)), (lk, pool)


@pytest.mark.parametrize("name, schedule", [("causal", None),
                                            pytest.param("pi_attention", "hops", marks=pytest.mark.slow)])   # 15 s
def test_formulas_with_only_the_sequence_dims_given(name, schedule):
    # head dims left symbolic, sequence dims given: sympy sums over the row tiles inside the roofline's Max
    # (comparing them raised sympy's TypeError)
    from moa.runtime.tiling import Config
    k = moa.compile(f"examples/{name}.moa", schedule=schedule)
    c = k.cost(config=Config(64, 64), n=4096)
    assert c.flops.free_symbols and c.predicted_seconds.free_symbols
