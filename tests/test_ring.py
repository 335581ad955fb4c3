"""Ring attention on torch.distributed (gloo on loopback, spawned processes, every wait bounded in time).

Each test starts `world` processes with torch.multiprocessing (spawn); a worker builds the full inputs from a
seed, takes its contiguous shards, runs `kernel.ring` and writes what happened to a file; the parent joins with
a deadline (killing whatever is left, so a failing test can never hang) and compares the gathered rows with
the single-process kernel on the full inputs.
"""
from __future__ import annotations

import datetime
import os
import pickle
import socket
import time

import pytest
import torch
import torch.multiprocessing as mp

import moa

F64 = torch.float64
HERE = os.path.dirname(os.path.abspath(__file__))
EXAMPLES = os.path.join(os.path.dirname(HERE), "examples")

# in no example: cross attention (n != m) with bottom-right causal plus 3 sink keys, softcapped scores with a
# per-query temperature, a per-key bias that travels with K/V, and a replicated per-head slope times (j - i)
NOVEL = """\
dim h, n, m, d, e
param c = 20.0
in Q[h, n, d], K[h, m, d], V[h, m, e], kb[m], tq[n], sl[h]
S[a, i, j] = where(j < 3 or j <= i + m - n, c * tanh(dot(Q[a, i], K[a, j]) * tq[i] / c) + kb[j] + sl[a] * (j - i), -inf)
out O[a] = softmax(S[a], axis=-1) @ V[a]
"""

# name -> (source, params, dims, mask(i, j, dims) on global indices for the expected block skips, or None)
PROGRAMS = {
    "sdpa": ("sdpa.moa", {}, {"n": 40, "d": 8, "e": 8}, None),
    "causal": ("causal.moa", {}, {"n": 48, "d": 8, "e": 8}, lambda i, j, x: j <= i),
    "sliding_window": ("sliding_window.moa", {"w": 9}, {"n": 45, "d": 8, "e": 8},
                       lambda i, j, x: (j <= i) & (i - j <= 9)),
    "document_mask": ("document_mask.moa", {}, {"n": 42, "d": 8, "e": 8}, None),
    "novel": (NOVEL, {}, {"h": 2, "n": 30, "m": 44, "d": 8, "e": 8}, None),
    "pi_attention": ("pi_attention.moa", {"k": 5, "s": 4, "T": 3}, {"n": 40, "d": 8, "e": 8},
                     lambda i, j, x: ((j <= i) & (i - j < 5)) | ((j < i) & ((i - j) % 4 == 0) & ((i - j) // 4 <= 3))),
}


def _compile(name, table=None):
    src, params, _, _ = (table or PROGRAMS)[name]
    return moa.compile(os.path.join(EXAMPLES, src) if src.endswith(".moa") else src, **params)


def _inputs(name, seed=0):
    """Full float64 inputs of a program (deterministic)."""
    g = torch.Generator().manual_seed(seed)
    x = PROGRAMS[name][2]
    n, m, d, e, h = x["n"], x.get("m", x["n"]), x["d"], x["e"], x.get("h", 1)
    r = lambda *s: torch.randn(*s, generator=g, dtype=F64)
    if name == "novel":  # a batch axis of 2 on Q, K, V (kb, tq, sl broadcast)
        return {"Q": r(2, h, n, d), "K": r(2, h, m, d), "V": r(2, h, m, e), "kb": r(m), "tq": 1 + r(n).abs(),
                "sl": r(h).abs() / 4}
    out = {"Q": r(n, d), "K": r(m, d), "V": r(m, e)}
    if name == "pi_attention":
        out["wg"] = r(d)
    if name == "document_mask":
        out["doc"] = torch.sort(torch.randint(0, 5, (n,), generator=g)).values
    return out


def _bounds(length, world):
    return [length * r // world for r in range(world + 1)]


def _shards(kernel, name, full, rank, world):
    """This rank's shards: contiguous (uneven where the length does not divide) query and key ranges."""
    from moa.runtime.ring import block_kernel

    plan, _ = block_kernel(kernel)
    x = PROGRAMS[name][2]
    nb, mb = _bounds(x["n"], world), _bounds(x.get("m", x["n"]), world)
    out = {}
    for nm, t in full.items():
        role, ax = plan.roles[nm]
        if role == "replicated":
            out[nm] = t
            continue
        b = nb if role in ("query", "both") else mb
        pos = t.dim() - kernel.program.input_map[nm].rank + ax
        out[nm] = t.narrow(pos, b[rank], b[rank + 1] - b[rank]).contiguous()
    return out


# ---- the worker (runs in each spawned process) --------------------------------------------------------------

def _worker(rank, world, port, job, outdir):
    import torch.distributed as dist

    t0 = time.monotonic()
    try:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=job.get("pg_timeout", 60)))
        res = globals()[f"_job_{job['kind']}"](rank, world, job)
        rec = {"ok": True, "result": res}
    except BaseException as e:  # noqa: B036 - everything is reported to the parent
        rec = {"ok": False, "type": type(e).__name__, "moa": isinstance(e, moa.MoaError), "msg": str(e)}
    rec["seconds"] = time.monotonic() - t0
    with open(os.path.join(outdir, f"rank{rank}.pkl"), "wb") as f:
        pickle.dump(rec, f)
    os._exit(0)  # no process-group teardown: peers may be dead on purpose


def _job_equal(rank, world, job):
    res = {}
    for name in job["programs"]:
        k = _compile(name)
        local = _shards(k, name, _inputs(name), rank, world)
        o, st = k.ring(timeout=120, stats=True, **local)
        res[name] = (o, st.skipped, st.computed)
    return res


def _job_fault(rank, world, job):
    from moa.runtime import ring as R

    k = _compile("sdpa")
    local = _shards(k, "sdpa", _inputs("sdpa"), rank, world)
    if rank == job["victim"]:
        orig, calls = R._compute_block, [0]

        def faulty(*a):
            calls[0] += 1
            if calls[0] == job["at"]:  # mid-ring: this rank's transfers of the step are in flight
                if job["mode"] == "die":
                    os._exit(17)
                if job["mode"] == "stall":
                    time.sleep(job["timeout"] + 2)  # alive, connections open: the others must time out
                raise RuntimeError("injected failure")
            return orig(*a)

        R._compute_block = faulty
    return k.ring(timeout=job["timeout"], **local)


def _job_mismatch(rank, world, job):
    """Every variant in one process group: each must fail on every rank, and the group stays usable."""
    k = _compile("document_mask")
    full = _inputs("document_mask")
    out = {}
    for what in job["variants"] + ["none"]:
        local = _shards(k, "document_mask", full, rank, world)
        if rank == job["victim"]:
            if what == "head":
                local["K"] = torch.cat([local["K"], local["K"][:, :1]], 1)   # d + 1 columns on one rank
            elif what == "both":
                local["doc"] = local["doc"][1:]                           # Q and doc disagree on the rows
            elif what == "dtype":
                local["V"] = local["V"].float()
            elif what == "missing":
                del local["V"]
        try:
            out[what] = ("ok", k.ring(timeout=60, **local))
        except moa.MoaError as e:
            out[what] = (type(e).__name__, str(e))
    return out


# ---- linear forms across ranks (power, gated power, linear attention): no K/V rotation ------------------------

# in no example: per-head cumulative log-gates plus a decay in the global index, exp(-c i^2 + c j^2), which a rank
# computes right only if its rows see their global offsets
POWER_HEADS = """\
dim h, n, d, e
in Q[h, n, d], K[h, n, d], V[h, n, e], G[h, n]
A[a, i, j] = where(j <= i, dot(Q[a, i], K[a, j]) ^ 2 * exp((G[a, i] - 0.0005 * i * i) - (G[a, j] - 0.0005 * j * j)), 0)
out O[a] = normalize(A[a], axis=-1) @ V[a]
"""

# name -> (source, params, dims, bounds of the 3 ranks' shards: uneven, empty ones, several chunks of 64 per rank)
LINEAR = {
    "power": ("power.moa", {"p": 2}, {"n": 200, "d": 8, "e": 8}, [0, 66, 133, 200]),
    "power_gated": ("power_gated.moa", {}, {"n": 200, "d": 8, "e": 8}, [0, 90, 131, 200]),
    "linear": ("linear.moa", {}, {"n": 150, "d": 8, "e": 8}, [0, 0, 70, 150]),
    "linear_relu": ("linear_relu.moa", {}, {"n": 100, "d": 8, "e": 8}, [0, 40, 40, 100]),
    "power_heads": (POWER_HEADS, {}, {"h": 2, "n": 150, "d": 4, "e": 5}, [0, 66, 100, 150]),
}


def _linear_inputs(name, seed=0):
    """Full float64 inputs with a batch axis of 2 (G, cumulative log-gates, broadcast over it)."""
    g = torch.Generator().manual_seed(seed)
    x = LINEAR[name][2]
    heads = (x["h"],) if "h" in x else ()
    out = {"Q": torch.randn(2, *heads, x["n"], x["d"], generator=g, dtype=F64),
           "K": torch.randn(2, *heads, x["n"], x["d"], generator=g, dtype=F64),
           "V": torch.randn(2, *heads, x["n"], x["e"], generator=g, dtype=F64)}
    if name in ("power_gated", "power_heads"):
        out["G"] = torch.cumsum(-0.1 * torch.rand(*heads, x["n"], generator=g, dtype=F64), -1)
    return out


def _linear_shards(kernel, name, full, rank):
    from moa.runtime.ring_linear import linear_kernel

    plan, _ = linear_kernel(kernel)
    b = LINEAR[name][3]
    out = {}
    for nm, t in full.items():
        role, ax = plan.roles[nm]
        pos = t.dim() - kernel.program.input_map[nm].rank + ax
        out[nm] = t if role == "replicated" else t.narrow(pos, b[rank], b[rank + 1] - b[rank]).contiguous()
    return out


def _job_linear(rank, world, job):
    from moa.runtime import linear_run

    res = {}
    for name in LINEAR:
        k = _compile(name, LINEAR)
        o, st = k.ring(timeout=120, stats=True, **_linear_shards(k, name, _linear_inputs(name), rank))
        res[name] = (o, st.bytes_sent)
    k = _compile("power", LINEAR)
    local = _linear_shards(k, "power", _linear_inputs("power"), rank)
    bad = dict(local)
    if rank == 1:   # one key fewer than its query rows
        bad["K"], bad["V"] = local["K"][:, 1:], local["V"][:, 1:]
    try:
        res["mismatch"] = ("ok", k.ring(timeout=60, **bad))
    except moa.MoaError as e:
        res["mismatch"] = (type(e).__name__, str(e))
    if rank == 2:   # a rank whose chunk states fail: every rank is told, nobody waits for a timeout
        def states(self, launch):
            raise RuntimeError("injected failure")
        linear_run.LinearRunner.states = states
    try:
        res["fault"] = ("ok", k.ring(timeout=60, **local))
    except Exception as e:  # noqa: BLE001 - reported to the parent
        res["fault"] = (type(e).__name__, str(e))
    return res


# ---- window-mixing programs across ranks (Blurry Window Attention): a halo exchange, no rotation ----------------

# world -> bounds of the ranks' rows (n = 30, W = 8: a halo of 7 rows): shards shorter than the halo, a halo that
# spans two ranks (world 3: rank 2 takes 3 rows from rank 1 and 4 from rank 0) and one cut short by row 0
HALO_BOUNDS = {2: [0, 5, 30], 3: [0, 12, 15, 30]}
HALO_PARAMS = {"W": 8, "M": 3}


def _halo_inputs(seed=0):
    """(bla.moa inputs: batch 2, n = 30; normalize inputs: n = 37)."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=F64)
    return {"Q": r(2, 30, 8), "K": r(2, 30, 8), "V": r(2, 30, 6)}, {"Q": r(37, 8), "K": r(37, 8), "V": r(37, 6)}


# normalize(...) @ V without a linear form (no mask; a window mask): the K/V rotation, partials merged by sums of
# (z O, z); on 3 uneven ranks (one holding a single row), run with the halo job to save a launch
NORM = {
    "norm_plain": "dim n, d, e\nin Q[n, d], K[n, d], V[n, e]\nA = (Q @ K.T) ^ 2\nout O = normalize(A, axis=-1) @ V\n",
    "norm_window": "dim n, d, e\nin Q[n, d], K[n, d], V[n, e]\n"
                   "A[i, j] = where(j <= i and i - j < 6, dot(Q[i], K[j]) ^ 2, 0)\n"
                   "out O[i] = normalize(A[i], axis=-1) @ V\n",
}
NORM_BOUNDS = [0, 10, 11, 37]


def _job_halo(rank, world, job):
    k = moa.compile(os.path.join(EXAMPLES, "bla.moa"), **HALO_PARAMS)
    b = HALO_BOUNDS[world]
    local = {nm: t[:, b[rank]:b[rank + 1]].contiguous() for nm, t in _halo_inputs()[0].items()}
    o, st = k.ring(timeout=120, stats=True, **local)
    res = {"out": o, "sent": st.bytes_sent}
    bad = dict(local)
    if rank == 1:   # one key row fewer than its query rows
        bad["K"] = local["K"][:, 1:]
    try:
        res["mismatch"] = ("ok", k.ring(timeout=60, **bad))
    except moa.MoaError as e:
        res["mismatch"] = (type(e).__name__, str(e))
    if world == 3:
        b = NORM_BOUNDS
        for name, src in NORM.items():
            k = moa.compile(src)
            local = {nm: t[b[rank]:b[rank + 1]].contiguous() for nm, t in _halo_inputs()[1].items()}
            o, st = k.ring(timeout=120, stats=True, **local)
            res[name] = (o, st.computed, st.skipped)
    return res


@pytest.mark.parametrize("world", [2, 3])
def test_window_program_across_ranks_by_halo(world, tmp_path):
    """bla.moa (W = 8, M = 3) with uneven shards, some shorter than the halo of W - 1 rows: == single process."""
    recs, wall = _launch(world, {"kind": "halo"}, tmp_path, deadline=120)
    for r in range(world):
        assert recs[r]["ok"], f"rank {r}: {recs[r].get('type')}: {recs[r].get('msg')}"
    k = moa.compile(os.path.join(EXAMPLES, "bla.moa"), **HALO_PARAMS)
    want = k(**_halo_inputs()[0])
    got = torch.cat([recs[r]["result"]["out"] for r in range(world)], dim=-2)
    assert got.shape == want.shape
    err = (got - want).abs().max().item()
    assert err <= 1e-12, f"{world} ranks: max |ring - single| = {err:.3g}"
    row = 2 * (8 + 6) * 8   # bytes of one row of K and V, 2 batch items, fp64
    sent = {2: [5 * row, 0], 3: [(7 + 4) * row, 3 * row, 0]}[world]
    assert [recs[r]["result"]["sent"] for r in range(world)] == sent
    for r in range(world):
        kind, msg = recs[r]["result"]["mismatch"]
        assert kind == "InputError" and "rank 1" in msg and "same rows" in msg, (r, kind, msg)
    if world == 3:   # normalize(...) @ V with no linear form: rotated, merged by sums
        for name, src in NORM.items():
            k = moa.compile(src)
            want = k(**_halo_inputs()[1])
            got = torch.cat([recs[r]["result"][name][0] for r in range(world)], dim=-2)
            err = (got - want).abs().max().item()
            assert err <= 1e-12, f"{name}: max |ring - single| = {err:.3g}"
            skipped = sum(len(recs[r]["result"][name][2]) for r in range(world))
            assert skipped == (0 if name == "norm_plain" else 3), (name, skipped)   # keys after the rows


def test_halo_sources_and_cost():
    from moa.runtime.ring_halo import halo_kernel, halo_sources

    assert halo_sources([12, 3, 15], 7) == [[], [(0, 7)], [(1, 3), (0, 4)]]
    assert halo_sources([3, 2, 0, 10, 4], 7) == [[], [(0, 3)], [(1, 2), (0, 3)], [(1, 2), (0, 3)], [(3, 7)]]
    k = moa.compile(os.path.join(EXAMPLES, "bla.moa"), W=8, M=3)
    plan, rank = halo_kernel(k)
    assert plan.roles == {"Q": ("query", 0), "K": ("halo", 0), "V": ("halo", 0)} and int(plan.halo) == 7
    c = k.cost(ranks=4, interconnect="nvlink4", dtype="bf16", n=4096, d=64, e=64)
    assert c.form == "halo" and c.bytes_sent == [7 * (64 + 64) * 2] * 3 + [0]
    assert 0.99 * c.single_device_flops <= sum(c.flops) <= 1.01 * c.single_device_flops
    assert "halo" in c.summary()


# ---- the parent ---------------------------------------------------------------------------------------------

def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(world, job, tmp_path, deadline):
    """Run the job on `world` spawned ranks; kill everything after `deadline` seconds. -> (records, wall)."""
    ctx = mp.get_context("spawn")
    outdir = str(tmp_path)
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, world, port, job, outdir), daemon=True) for r in range(world)]
    t0 = time.monotonic()
    for p in procs:
        p.start()
    for p in procs:
        p.join(max(0.0, deadline - (time.monotonic() - t0)))
    hung = [r for r, p in enumerate(procs) if p.is_alive()]
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join(5)
    assert not hung, f"ranks {hung} still running after {deadline} s"
    recs = {}
    for r in range(world):
        path = os.path.join(outdir, f"rank{r}.pkl")
        if os.path.exists(path):
            with open(path, "rb") as f:
                recs[r] = pickle.load(f)
    return recs, time.monotonic() - t0


def _expected_skips(name, world):
    x = PROGRAMS[name][2]
    n, m = x["n"], x.get("m", x["n"])
    nb, mb = _bounds(n, world), _bounds(m, world)
    mask = PROGRAMS[name][3]
    if name == "document_mask":  # doc ids are data: the analysis skips what j <= i alone rules out
        mask = lambda i, j, x: j <= i
    if name == "novel":
        mask = lambda i, j, x: (j < 3) | (j <= i + m - n)
    if mask is None:
        return 0
    count = 0
    for r in range(world):
        i = torch.arange(nb[r], nb[r + 1])[:, None]
        for s in range(world):
            j = torch.arange(mb[s], mb[s + 1])[None, :]
            count += not bool(mask(i, j, x).any())
    return count


@pytest.mark.parametrize("world", [2, 3, 4])
def test_ring_equals_single_process(world, tmp_path):
    names = list(PROGRAMS)
    recs, wall = _launch(world, {"kind": "equal", "programs": names}, tmp_path, deadline=240)
    for r in range(world):
        assert recs[r]["ok"], f"rank {r}: {recs[r].get('type')}: {recs[r].get('msg')}"
    for name in names:
        k = _compile(name)
        full = _inputs(name)
        want = k(**full)
        got = torch.cat([recs[r]["result"][name][0] for r in range(world)], dim=-2)
        assert got.shape == want.shape
        err = (got - want).abs().max().item()
        assert err <= 1e-12, f"{name}, {world} ranks: max |ring - single| = {err:.3g}"
        skipped = sum(len(recs[r]["result"][name][1]) for r in range(world))
        computed = sum(len(recs[r]["result"][name][2]) for r in range(world))
        assert skipped + computed == world * world
        if name == "pi_attention":  # interval and modular parts analysed apart: sound, not always exact
            assert world * (world - 1) // 2 <= skipped <= _expected_skips(name, world)
        else:
            assert skipped == _expected_skips(name, world), f"{name}: {skipped} blocks skipped"
        if name == "causal":
            assert skipped == world * (world - 1) // 2


def test_ring_rank_dies_mid_ring(tmp_path):
    world, timeout = 3, 5
    job = {"kind": "fault", "victim": 1, "mode": "die", "at": 1, "timeout": timeout}
    recs, wall = _launch(world, job, tmp_path, deadline=60)
    assert 1 not in recs  # the victim died without a word
    for r in (0, 2):
        assert not recs[r]["ok"] and recs[r]["type"] == "RingError", recs[r]
        assert recs[r]["seconds"] < 30 + timeout
        assert "rank" in recs[r]["msg"] and "process group" in recs[r]["msg"]


def test_ring_rank_raises_others_told(tmp_path):
    """A rank whose block fails keeps rotating, then every rank learns who failed and why (no timeout)."""
    world = 3
    job = {"kind": "fault", "victim": 2, "mode": "raise", "at": 2, "timeout": 60}
    recs, wall = _launch(world, job, tmp_path, deadline=60)
    assert not recs[2]["ok"] and recs[2]["type"] == "RuntimeError" and "injected failure" in recs[2]["msg"]
    for r in (0, 1):
        assert not recs[r]["ok"] and recs[r]["type"] == "RingError", recs[r]
        assert "rank 2: RuntimeError: injected failure" in recs[r]["msg"]
        assert recs[r]["seconds"] < 30


def test_ring_rank_stalls_others_time_out(tmp_path):
    world, timeout = 3, 3
    job = {"kind": "fault", "victim": 0, "mode": "stall", "at": 1, "timeout": timeout}
    recs, wall = _launch(world, job, tmp_path, deadline=60)
    for r in (1, 2):
        assert not recs[r]["ok"] and recs[r]["type"] == "RingError", recs[r]
        assert "bounded by 3 s" in recs[r]["msg"] and "step" in recs[r]["msg"], recs[r]["msg"]
        assert recs[r]["seconds"] < 30
    assert not recs[0]["ok"] and "injected failure" in recs[0]["msg"]  # the victim reports its own error


def test_ring_mismatched_shards_input_error_everywhere(tmp_path):
    world, variants = 3, ["head", "both", "dtype", "missing"]
    recs, wall = _launch(world, {"kind": "mismatch", "victim": 1, "variants": variants}, tmp_path, deadline=90)
    for r in range(world):
        assert recs[r]["ok"], recs[r]
        res = recs[r]["result"]
        for what in variants:
            kind, msg = res[what]
            assert kind == "InputError", (r, what, kind, msg)
            assert "rank 1" in msg, msg
        assert res["none"][0] == "ok"  # the group is still usable after an InputError
    k = _compile("document_mask")
    got = torch.cat([recs[r]["result"]["none"][1] for r in range(world)], dim=-2)
    assert (got - k(**_inputs("document_mask"))).abs().max().item() <= 1e-12


def test_linear_forms_across_ranks(tmp_path):
    """Power, gated power and linear attention across 3 ranks equal the single-process kernel and the reference."""
    world = 3
    recs, wall = _launch(world, {"kind": "linear"}, tmp_path, deadline=180)
    for r in range(world):
        assert recs[r]["ok"], f"rank {r}: {recs[r].get('type')}: {recs[r].get('msg')}"
    for name in LINEAR:
        k = _compile(name, LINEAR)
        full = _linear_inputs(name)
        want, ref = k(**full), k.reference(**full)
        got = torch.cat([recs[r]["result"][name][0] for r in range(world)], dim=-2)
        assert got.shape == want.shape
        for other in (want, ref):
            err = ((got - other).abs().max() / other.abs().max()).item()
            assert err <= 1e-12, f"{name}: relative error {err:.3g}"
    # the all_gather: (T [Z, D, e], z [Z, D]) per rank, Z = 2 batch items, D = C(8 + 1, 2) = 36, e = 8, fp64
    assert recs[0]["result"]["power"][1] == 2 * (36 * 8 + 36) * 8 * (world - 1)
    for r in range(world):
        kind, msg = recs[r]["result"]["mismatch"]
        assert kind == "InputError" and "rank 1: 67 query rows but 66 keys" in msg, (r, kind, msg)
        kind, msg = recs[r]["result"]["fault"]
        if r == 2:
            assert kind == "RuntimeError" and "injected failure" in msg
        else:
            assert kind == "RingError" and "rank 2: RuntimeError: injected failure" in msg, (r, kind, msg)


# ---- in-process: the block program, the plan, the cost (no process group) -------------------------------------

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
    c = k.cost(ranks=4, interconnect="nvlink4", dtype="bf16", n=65536, d=64, e=64)
    feats = 65 * 64 // 2                                     # D = C(64 + 1, 2)
    assert c.form == "linear" and c.blocks_total == 4 and c.blocks_skipped == 0
    assert c.bytes_sent == [3 * (feats * 64 + feats + 1) * 4] * 4   # fp32 states, G at the last row, P - 1 sends
    assert not c.hides and c.exposed_seconds[0] > 0
    assert c.flops[0] == c.flops[3] < c.flops[1] == c.flops[2]     # middle ranks run the extra total scan
    assert 0.99 * c.single_device_flops <= sum(c.flops) <= 1.05 * c.single_device_flops
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
