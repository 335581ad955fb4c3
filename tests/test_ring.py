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

try:  # pytest's default (prepend) import mode puts tests/ on sys.path
    from ring_cases import EXAMPLES, F64, NORM, PROGRAMS, _bounds, _compile, _inputs
    from test_variant_edges import ROPE   # rotary embeddings computed in the kernel
except ImportError:  # pragma: no cover
    from tests.ring_cases import EXAMPLES, F64, NORM, PROGRAMS, _bounds, _compile, _inputs
    from tests.test_variant_edges import ROPE


def _shards(kernel, name, full, rank, world):
    """This rank's shards: contiguous (uneven where the length does not divide) query and key ranges."""
    x = PROGRAMS[name][2]
    return _split(kernel, full, x["n"], x.get("m", x["n"]), rank, world)


def _split(kernel, full, n, m, rank, world):
    """This rank's shards of inputs whose query axis has n rows and key axis m keys."""
    from moa.runtime.ring import block_kernel

    plan, _ = block_kernel(kernel)
    nb, mb = _bounds(n, world), _bounds(m, world)
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
        def scan(self, launch, **flags):
            raise RuntimeError("injected failure")
        linear_run.LinearRunner.scan = scan
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
    recs = _launch_ok(world, {"kind": "halo"}, tmp_path, deadline=120)
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


def _launch_ok(world, job, tmp_path, deadline):
    """The records of a job that must succeed on every rank (a failing rank's error in the assertion)."""
    recs, _ = _launch(world, job, tmp_path, deadline)
    for r in range(world):
        assert recs[r]["ok"], f"rank {r}: {recs[r].get('type')}: {recs[r].get('msg')}"
    return recs


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


@pytest.mark.parametrize("world", [2, pytest.param(3, marks=pytest.mark.slow), 4])   # 3: make test-slow
def test_ring_equals_single_process(world, tmp_path):
    names = list(PROGRAMS)
    recs = _launch_ok(world, {"kind": "equal", "programs": names}, tmp_path, deadline=240)
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
    recs = _launch_ok(world, {"kind": "mismatch", "victim": 1, "variants": variants}, tmp_path, deadline=90)
    for r in range(world):
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
    recs = _launch_ok(world, {"kind": "linear"}, tmp_path, deadline=180)
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


# ---- training through the ring --------------------------------------------------------------------------------


FROZEN = {"rope_tables": {"cs", "sn"}}   # inputs that do not require grad (precomputed rotary tables)


def _train_kernel(name):
    if name == "rope":
        return moa.compile(ROPE)
    if name == "rope_tables":   # tables read along both the query and the key axis, never trained
        return moa.compile("dim h, n, d, e\nin Q[h, n, d], K[h, n, d], V[h, n, e], cs[n, d], sn[n, d]\n"
                           "Qr[a, i, k] = Q[a, i, k] * cs[i, k] + Q[a, i, (k + d // 2) % d] * sn[i, k]\n"
                           "Kr[a, j, k] = K[a, j, k] * cs[j, k] + K[a, j, (k + d // 2) % d] * sn[j, k]\n"
                           "S[a, i, j] = where(j <= i, dot(Qr[a, i], Kr[a, j]), -inf)\n"
                           "out O[a] = softmax(S[a], axis=-1) @ V[a]\n")
    if name == "pi_attention":   # two softmax branches mixed by a sigmoid gate reading Q and wg (replicated)
        return moa.compile(os.path.join(EXAMPLES, "pi_attention.moa"), k=5, s=4, T=3)
    if name in NORM:
        return moa.compile(NORM[name])
    return _compile(name)


def _train_inputs(name):
    if name == "rope_tables":
        g = torch.Generator().manual_seed(4)
        return {x: torch.randn(*s, generator=g, dtype=F64) for x, s in
                (("Q", (2, 30, 8)), ("K", (2, 30, 8)), ("V", (2, 30, 4)), ("cs", (30, 8)), ("sn", (30, 8)))}
    if name in ("rope",) or name in NORM:
        g = torch.Generator().manual_seed(3)
        return {"Q": torch.randn(40, 8, generator=g, dtype=F64), "K": torch.randn(40, 8, generator=g, dtype=F64),
                "V": torch.randn(40, 8, generator=g, dtype=F64)}
    return _inputs(name)


def _train_shards(k, full, rank, world):
    n, m = full["Q"].shape[-2], full["K"].shape[-2]
    return _split(k, full, n, m, rank, world), _bounds(n, world)


def _job_train(rank, world, job):
    """Each rank: its shards require grad, the loss is <O_rank, cot_rank>; returns its rows of O and the
    gradients of its shards (replicated inputs: the whole gradient)."""
    res = {}
    for name in job["programs"]:
        k = _train_kernel(name)
        full = _train_inputs(name)
        local, rows = _train_shards(k, full, rank, world)
        leaves = {n: (t.clone().requires_grad_() if t.is_floating_point() and n not in FROZEN.get(name, ()) else t)
                  for n, t in local.items()}
        o = k.ring(timeout=120, **leaves)
        cot = torch.randn(k.reference(**full).shape, generator=torch.Generator().manual_seed(7), dtype=F64)
        (o * cot.narrow(-2, rows[rank], rows[rank + 1] - rows[rank])).sum().backward()
        res[name] = (o.detach(), {n: t.grad for n, t in leaves.items() if t.requires_grad})
    try:
        k = moa.compile("dim n, d, e\nin Q[n, d], K[n, d], V[n, e]\nS = Q @ K.T\nout A = softmax(S, axis=-1) @ V\n"
                        "out B = softmax(2 * S, axis=-1) @ V\n")
        leaves = {n: t.clone().requires_grad_() for n, t in
                  _train_shards(k, _train_inputs("rope"), rank, world)[0].items()}
        k.ring(timeout=60, **leaves)
        res["refused"] = None
    except moa.MoaError as e:
        res["refused"] = (type(e).__name__, str(e))
    k = _train_kernel("rope")   # a rank whose backward block raises: it raises its own error, the others RingError
    local, _ = _train_shards(k, _train_inputs("rope"), rank, world)
    leaves = {n: t.clone().requires_grad_() for n, t in local.items()}
    o = k.ring(timeout=60, **leaves)
    if rank == 1:
        from moa.runtime.ring import block_kernel

        from moa.runtime.ring_backward import block_runners

        runner = next(iter(block_runners(block_kernel(k)[1]).values()))
        runner.grads = lambda *a, **kw: (_ for _ in ()).throw(RuntimeError("injected backward failure"))
    try:
        o.sum().backward()
        res["fault"] = None
    except Exception as e:  # noqa: BLE001 - reported to the parent
        res["fault"] = (type(e).__name__, str(e))
    return res


@pytest.mark.parametrize("world, names", [
    (3, ["novel", "pi_attention", "rope_tables"]),
    pytest.param(3, ["causal", "sliding_window", "sigmoid", "document_mask", "rope", "norm_plain"],
                 marks=pytest.mark.slow)])   # 25 s: make test-slow
def test_training_through_the_ring(world, names, tmp_path):
    """Gradients through k.ring (the block program's fused backward kernels around the ring, dK / dV travelling
    home with their shard) equal the single-process gradients: cross attention with a travelling key bias, a
    per-query temperature and a replicated slope (gradients all-reduced), PiAttention (each branch's kernels around
    the ring, the gate by its gradient DNF), rotary tables that do not require grad; in make test-slow also causal,
    a window, a plain sum, document ids (integer, both axes), rotary embeddings pulled back at global positions and
    normalize without a linear form. Two outputs are refused; a rank whose backward fails is named to the others."""
    recs = _launch_ok(world, {"kind": "train", "programs": names}, tmp_path, deadline=300)
    for name in names:
        k = _train_kernel(name)
        full = _train_inputs(name)
        leaves = {n: (t.clone().requires_grad_() if t.is_floating_point() and n not in FROZEN.get(name, ()) else t)
                  for n, t in full.items()}
        want = k(**leaves)
        cot = torch.randn(want.shape, generator=torch.Generator().manual_seed(7), dtype=F64)
        (want * cot).sum().backward()
        got = torch.cat([recs[r]["result"][name][0] for r in range(world)], dim=-2)
        assert (got - want.detach()).abs().max().item() <= 1e-12, name
        from moa.runtime.ring import block_kernel

        plan, _ = block_kernel(k)
        for n, t in leaves.items():
            if not t.requires_grad:
                continue
            role, ax = plan.roles[n]
            parts = [recs[r]["result"][name][1][n] for r in range(world)]
            if role == "replicated":
                assert all((p - t.grad).abs().max().item() <= 1e-12 for p in parts), (name, n)
                continue
            g = torch.cat(parts, dim=t.dim() - k.program.input_map[n].rank + ax)
            err = ((g - t.grad).abs().max() / max(1.0, t.grad.abs().max().item())).item()
            assert err <= 1e-12, f"{name}: d{n} relative error {err:.3g}"
    for r in range(world):
        kind, msg = recs[r]["result"]["refused"]
        assert kind == "UnsupportedError" and "takes one output" in msg, msg
        kind, msg = recs[r]["result"]["fault"]
        if r == 1:
            assert kind == "RuntimeError" and "injected backward failure" in msg, msg
        else:
            assert kind == "RingError" and "rank 1: RuntimeError: injected backward failure" in msg, (r, msg)


def test_packing_a_one_element_strided_view():
    """A one-key shard passed as a strided view (stride 2 on an axis of one element: torch calls it contiguous)
    packs into the travelling buffer (it raised torch's view error; found by a fuzzer)."""
    from moa.runtime.ring_comm import layout, pack, unpack

    kb = torch.randn(13, 2, dtype=F64)[0:1, 0]
    assert kb.stride() == (2,)
    lay = layout(["kb", "K"], {"kb": [1], "K": [1, 4]}, {"kb": "torch.float64", "K": "torch.float64"})
    K = torch.randn(1, 8, dtype=F64)[:, ::2]
    got = unpack(lay[0], pack(*lay, {"kb": kb, "K": K}, torch.device("cpu")))
    assert torch.equal(got["kb"], kb) and torch.equal(got["K"], K)
