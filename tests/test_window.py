"""Issue 6: Blurry Window Attention (window-mixing schedule) and PiAttention (tiled, hops and residue-lifted
schedules, and the choice between them), float64 against the reference and independent implementations
(tests/oracles.py)."""
from __future__ import annotations

import pytest
import torch

import moa
import oracles

F64 = torch.float64


def _qkv(n, d=8, e=6, batch=(2,), seed=0):
    g = torch.Generator().manual_seed(seed)
    return {x: torch.randn(*batch, n, dd, generator=g, dtype=F64) for x, dd in (("Q", d), ("K", d), ("V", e))}


def _err(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp(min=1.0)).item()


@pytest.mark.parametrize("W,M", [(4, 1), (4, 3), (8, 5), (8, 8), (16, 7), (5, 5)])
@pytest.mark.parametrize("n", [1, 3, 17, 70])
def test_bla_against_reference_and_oracle(W, M, n):
    k = moa.compile("examples/bla.moa", W=W, M=M)
    ins = _qkv(n, seed=W * 100 + M + n)
    out = k(**ins)
    assert _err(out, k.reference(**ins)) <= 1e-12
    assert _err(out, oracles.bla(ins["Q"], ins["K"], ins["V"], W=W, M=M)) <= 1e-12


@pytest.mark.parametrize("W", [2, 8, 13])
def test_bla_full_band_is_sliding_window(W):
    """M = W makes the Dirichlet kernel a delta: BLA equals sliding-window attention with w = W - 1."""
    ins = _qkv(45, batch=(2, 3), seed=W)
    bla = moa.compile("examples/bla.moa", W=W, M=W)(**ins)
    swa = moa.compile("examples/sliding_window.moa", w=W - 1)(**ins)
    assert _err(bla, swa) <= 1e-12


def test_bla_schedule_has_no_square_array():
    k = moa.compile("examples/bla.moa", W=8, M=3)
    b = k.schedules["O"].branches[0]
    assert b.mix is not None and b.dot is None
    src = k.source(dtype="float16")
    assert "_attn_window" in src and "tl.store" in src
    assert src.count("tl.store(") == 1  # only the output is stored
    from moa.dnf import REASSOCIATION_RULES

    assert {"fubini", "hoist-where", "factor-out"} <= {r.name for r in REASSOCIATION_RULES}


@pytest.mark.parametrize("kw,n", [({"k": 4, "s": 3, "T": 2}, 40), ({"k": 8, "s": 5}, 41),
                                  ({"k": 3, "s": 16, "T": 3}, 10), ({"k": 6, "s": 4, "T": 100}, 67),
                                  ({"k": 1, "s": 1, "T": 5}, 23)])
def test_pi_attention(kw, n):
    """T unbounded (default), n not a multiple of s, n < s (every skip row empty), batch and heads."""
    k = moa.compile("examples/pi_attention.moa", bg=0.25, **kw)
    ins = _qkv(n, batch=(2, 2), seed=n)
    ins["wg"] = torch.randn(8, dtype=F64)
    out = k(**ins)
    assert _err(out, k.reference(**ins)) <= 1e-12
    T = kw.get("T")
    want = oracles.pi_attention(ins["Q"], ins["K"], ins["V"], ins["wg"], k_win=kw["k"], s=kw["s"], T=T, bg=0.25)
    assert _err(out, want) <= 1e-12


def _tiles_needed_local(n, bm, bn, k):
    """Key tiles with an admissible pair of the local branch (i - k < j <= i), by enumeration."""
    i = torch.arange(n)
    ok = (i[None, :] <= i[:, None]) & (i[:, None] - i[None, :] < k)
    rt = -(-n // bm)
    pad = torch.zeros(rt * bm, -(-n // bn) * bn, dtype=torch.bool)
    pad[:n, :n] = ok
    return int(pad.reshape(rt, bm, -1, bn).any(3).any(1).sum())


def _hops_needed(n, bm, s, T):
    """Hops t with an admissible pair for some row of the tile: 1 <= t <= T and i - s t >= 0."""
    count = 0
    for r in range(-(-n // bm)):
        hi = min(n, (r + 1) * bm) - 1
        count += max(0, min(T, hi // s))
    return count


def test_pi_attention_visits_only_admissible_tiles_and_hops():
    """n = 4096, k = 64, s = 64, T = 8, the hop schedule forced: the strided branch runs by hops (one key row per
    query row); every visited tile and hop has an admissible pair, and the FLOPs are at most 1/12 of dense causal
    attention's. (The model prefers key tiles here: 9 tiles of a row tile's strided keys move the bytes of its 8
    hops, which have no tile reuse, and run on tensor cores.)"""
    from moa.runtime.measure import instrument

    n, d, kwin, s, T = 4096, 16, 64, 64, 8
    g = torch.Generator().manual_seed(0)
    q, kk, v = (torch.randn(n, d, generator=g, dtype=F64) for _ in range(3))
    wg = torch.randn(d, generator=g, dtype=F64)
    pi = moa.compile("examples/pi_attention.moa", k=kwin, s=s, T=T, schedule="hops")
    assert pi.schedules["O"].branches[1].hop is not None
    assert moa.onf.label(pi.planner.schedule_for("O", {"n": n, "d": d, "e": d}, "float64")) == "hops"
    assert "for hop in range" in pi.source(dtype="float64")
    with instrument({"K": kk}) as c_pi:
        out = pi(Q=q, K=kk, V=v, wg=wg)
    causal = moa.compile("examples/causal.moa")
    with instrument() as c_causal:
        causal(Q=q, K=kk, V=v)
    bm = bn = 64  # the interpreter's tiles for n >= 64
    needed = _tiles_needed_local(n, bm, bn, kwin) + _hops_needed(n, bm, s, T)
    assert c_pi.load_calls_by_region["K"] == needed
    assert c_pi.flops * 12 <= c_causal.flops, (c_pi.flops, c_causal.flops)
    rows = slice(0, 300)
    want = oracles.pi_attention(q[rows], kk[rows], v[rows], wg, k_win=kwin, s=s, T=T)
    assert _err(out[rows], want) <= 1e-12  # rows < 300 only see keys < 300


# ---- residue lifting (moa/onf.py rule residue-lift, codegen/emit.py) -------------------------------------------------

PI_CASES = [({"k": 4, "s": 3, "T": 2}, 40), ({"k": 8, "s": 5}, 41), ({"k": 3, "s": 16, "T": 3}, 10),
            ({"k": 6, "s": 4}, 67), ({"k": 2, "s": 7, "T": 1}, 7), ({"k": 5, "s": 2, "T": 30}, 33)]


@pytest.mark.parametrize("kw,n", PI_CASES)
def test_pi_attention_residue_lifted(kw, n):
    """The residue schedule (i = r + s a, j = r + s b) forced: T unbounded (default), n not a multiple of s,
    n < s (every skip row empty), n == s, batch axes; against the reference and the oracle."""
    k = moa.compile("examples/pi_attention.moa", bg=-0.5, schedule="residue", **kw)
    ins = _qkv(n, batch=(2, 3), seed=n + 1)
    ins["wg"] = torch.randn(8, dtype=F64)
    src = k.source(dtype="float64", nbatch=2)
    assert "offs_m = res + " in src and "for hop in range" in src and "tl.dot(q0" in src
    assert src.count("tl.load(Q_ptr") == 1  # the query tile is loaded once (both branches and the gate)
    out = k(**ins)
    assert _err(out, k.reference(**ins)) <= 1e-12
    want = oracles.pi_attention(ins["Q"], ins["K"], ins["V"], ins["wg"], k_win=kw["k"], s=kw["s"], T=kw.get("T"),
                                bg=-0.5)
    assert _err(out, want) <= 1e-12


OFFSET_HEADS = """dim h, n, d, e
in Q[h, n, d], K[h, n, d], V[h, n, e]
S[a, i, j] = where(j <= i + 4 and (j - i + 2) % 5 == 0, dot(Q[a, i], K[a, j]) / sqrt(d) + 0.1 * (a + 1) * (j - i), -inf)
out O[a] = softmax(S[a], axis=-1) @ V[a]
"""


@pytest.mark.parametrize("schedule", ["tiled", "hops", "residue"])
def test_residue_structure_in_other_programs(schedule):
    """Not keyed on PiAttention: any (i - j + c) % s == 0 conjunct gets hops and the residue lifting. A program
    with heads, an offset residue (j = i - 2 mod 5: key residue (r + 3) mod 5), keys above the diagonal and a
    position term; the dilated window example with its log-sum-exp."""
    k = moa.compile(OFFSET_HEADS, schedule=schedule)
    assert [moa.onf.label(v) for v in k.variants["O"]] == ["tiled", "hops", "residue s=5"]
    g = torch.Generator().manual_seed(3)
    for n in (3, 29):
        ins = {x: torch.randn(2, 3, n, 8, generator=g, dtype=F64) for x in "QKV"}
        assert _err(k(**ins), k.reference(**ins)) <= 1e-12
    dil = moa.compile("examples/dilated_window.moa", w=20, r=3, schedule=schedule)
    ins = _qkv(50, batch=(2,), seed=5)
    out, lse = dil.with_lse(**ins)
    want, want_lse = oracles.dilated_window(ins["Q"], ins["K"], ins["V"], w=20, r=3, return_lse=True)
    assert _err(out, want) <= 1e-12 and _err(lse, want_lse) <= 1e-12


def test_schedule_choice_by_predicted_cost():
    """Large T (unbounded) splits the branches: the local window in key tiles, the strided branch residue-lifted
    (one schedule for both walks the window by per-row hops); small T with a large stride keeps one tiled kernel
    (the hops would move the bytes of the key tiles without their reuse); small problems (launch-bound: a tie)
    keep the tiled kernel; schedule= overrides; explain shows the candidates, their predictions, the choice and
    the lifted index maps."""
    big = {"n": 16384, "d": 64, "e": 64}
    for s in (16, 32):
        k = moa.compile("examples/pi_attention.moa", s=s)
        chosen, preds = k.planner.schedule_choice("O", {**big, "n": 4096}, "bf16", "h100")
        # one head of 4096 rows: 32 row tiles keep a quarter of the SMs busy (Device.occupancy), so each
        # program's serial work decides and the split's smaller work pays for its second launch
        assert moa.onf.label(chosen) == f"split(b0 tiled, b1 residue s={s})", preds
        assert preds[0].programs == 32 and preds[-1].seconds < preds[0].seconds
        chosen, preds = k.planner.schedule_choice("O", big, "bf16", "h100")
        assert moa.onf.label(chosen) == f"split(b0 tiled, b1 residue s={s})", preds
        tiled, hops, res, split_hops, split_res = preds
        assert res.tiles * 4 < tiled.tiles  # the strided skips visit ~1/s of the causal tiles
        assert split_res.seconds < min(tiled.seconds, hops.seconds, res.seconds, split_hops.seconds)
    small_t = moa.compile("examples/pi_attention.moa", s=64, T=8)
    for dims in (big, {**big, "n": 4096}):
        assert moa.onf.label(small_t.planner.schedule_for("O", dims, "bf16")) == "tiled"
        assert moa.onf.label(small_t.planner.schedule_for("O", dims, "float64")) == "tiled"
    # n = 100: one row tile of 100 valid rows; the hop loop loads only those rows, and the exact kernel-level model
    # agrees that it is (slightly) faster there
    tiny = {"n": 100, "d": 16, "e": 16}
    exact = {s: moa.compile("examples/pi_attention.moa", s=64, T=8, schedule=s).cost(dtype="bf16", device="h100",
                                                                                     **tiny).predicted_seconds
             for s in ("tiled", "hops")}
    assert moa.onf.label(small_t.planner.schedule_for("O", tiny, "bf16")) == min(exact, key=exact.get)
    forced = moa.compile("examples/pi_attention.moa", s=64, T=8, schedule="residue")
    assert moa.onf.label(forced.planner.schedule_for("O", big)) == "residue s=64"
    # residue work ~ n (k + T) d: linear in n for a bounded T; with T unbounded the tiled kernel is quadratic
    from moa.schedule_cost import predict

    res = moa.compile("examples/pi_attention.moa", s=16, T=8).variants["O"][2]
    p1, p4 = (predict(res, {**big, "n": n}) for n in (16384, 65536))
    assert p4.dot_flops <= 4.2 * p1.dot_flops and p4.hops == 4 * p1.hops
    tiled = moa.compile("examples/pi_attention.moa", s=16).variants["O"][0]
    assert predict(tiled, {**big, "n": 65536}).dot_flops > 15 * predict(tiled, big).dot_flops
    text = moa.compile("examples/pi_attention.moa").explain()
    assert "schedules of O: tiled, hops, residue s=16, split(b0 tiled, b1 hops), split(b0 tiled, b1 residue s=16)" \
        in text
    assert "-> split(b0 tiled, b1 residue s=16)" in text and "-> tiled" in text  # n = 16384 and n = 1024
    assert "O_b1 stored, then branch 0 with the epilogue reading them" in text
    assert "residue lifting of the rows: i = 16*a_i + r_i" in text
    assert "keys j1 = 16*b_j1 + r_i" in text and "mask: (b_j1 < a_i)" in text
    with pytest.raises(moa.UnsupportedError, match="schedule='residue'"):
        moa.compile("examples/causal.moa", schedule="residue")(**_qkv(5))
    with pytest.raises(moa.InputError, match="schedule='strided'"):
        moa.compile("examples/causal.moa", schedule="strided")


@pytest.mark.parametrize("params,n", [({}, 4096), ({}, 8192), ({"s": 64, "T": 8}, 4096)])
def test_schedule_choice_agrees_with_the_exact_cost_model(params, n):
    """The schedule-level predictor ranks like the kernel-level model: the chosen schedule has the smallest
    k.cost() predicted time of the four kinds (each kernel compiled with schedule= forced; split: the split the
    model picks), within the 1% tie."""
    dims = {"n": n, "d": 64, "e": 64}
    exact = {}
    for kind in ("tiled", "hops", "residue", "split"):
        k = moa.compile("examples/pi_attention.moa", schedule=kind, **params)
        exact[kind] = k.cost(dtype="bf16", device="h100", **dims).predicted_seconds
    chosen = moa.compile("examples/pi_attention.moa", **params).planner.schedule_for("O", dims, "bf16")
    assert exact[chosen.kind] <= min(exact.values()) * 1.01, (chosen.kind, exact)


def _residue_needed(n, bm, bn, s, kwin, T):
    """(programs, local hops, lifted key tiles) with an admissible pair, by enumeration over (residue r, a-tile,
    hop or b-tile): rows i = r + s a (a < rows_r), local keys i - t (0 <= t < k, i - t >= 0), skip keys
    j = r + s b with b < a and a - b <= T."""
    programs = hops = tiles = 0
    for r in range(s):
        rows = (n - 1 - r) // s + 1
        for a0 in range(0, rows, bm):
            programs += 1
            a = torch.arange(a0, min(a0 + bm, rows))
            hops += min(kwin - 1, r + s * int(a[-1])) + 1
            for b0 in range(0, rows, bn):
                b = torch.arange(b0, min(b0 + bn, rows))
                ok = (b[None, :] < a[:, None]) & (a[:, None] - b[None, :] <= T)
                tiles += bool(ok.any())
    return programs, hops, tiles


@pytest.mark.parametrize("s,T", [(4, 10), (3, None), (8, 2)])
def test_residue_schedule_visits_only_admissible_tiles_and_hops(s, T):
    """Every program holds a row, every hop of the local window and every b-tile of the lifted skips has an
    admissible pair: K is loaded exactly that many times (instrumented interpreter)."""
    from moa.runtime.measure import instrument

    n, kwin = 300, 5
    kw = {"k": kwin, "s": s} | ({"T": T} if T is not None else {})
    k = moa.compile("examples/pi_attention.moa", schedule="residue", **kw)
    ins = _qkv(n, batch=(), seed=s)
    ins["wg"] = torch.randn(8, dtype=F64)
    kk = ins["K"]
    with instrument({"K": kk}) as c:
        out = k(**ins)
    programs, hops, tiles = _residue_needed(n, 64, 64, s, kwin, T if T is not None else n)  # interpreter tiles
    assert c.programs == programs
    assert c.load_calls_by_region["K"] == hops + tiles
    want = oracles.pi_attention(ins["Q"], kk, ins["V"], ins["wg"], k_win=kwin, s=s, T=T)
    assert _err(out, want) <= 1e-12


def test_residue_schedule_no_program_without_rows():
    """n < s: one program per non-empty residue (n of them), no skip key anywhere."""
    from moa.runtime.measure import instrument

    k = moa.compile("examples/pi_attention.moa", k=3, s=8, schedule="residue")
    ins = _qkv(5, batch=(), seed=1)
    ins["wg"] = torch.randn(8, dtype=F64)
    with instrument({"K": ins["K"]}) as c:
        out = k(**ins)
    assert c.programs == 5
    assert c.load_calls_by_region["K"] == sum(min(2, i) + 1 for i in range(5))  # local hops only
    assert _err(out, k.reference(**ins)) <= 1e-12


def test_residue_schedule_with_a_stride_past_int32():
    """s = 2^30: the launcher enumerated all s residues (hung), and r + s a wrapped in 32 bits (rows a >= 2 stored
    garbage over valid rows). Residues r >= n hold no row; the row arithmetic is 64-bit."""
    k = moa.compile("examples/pi_attention.moa", k=3, s=2 ** 30, schedule="residue")
    ins = _qkv(40, batch=(), seed=3)
    ins["wg"] = torch.randn(8, dtype=F64)
    assert _err(k(**ins), k.reference(**ins)) <= 1e-12
    m = k.measure(**ins)
    c = k.cost(dtype="float64", device="cpu", n=40, d=8, e=6)
    assert m.tiles_visited == c.tiles_visited and m.dram_bytes == c.dram_bytes


def test_with_lse_names_the_window_kernel():
    """bla is softmax(S) @ V, but its kernel keeps no log-sum-exp: the refusal says that, not that the form is
    wrong."""
    x = torch.randn(20, 8, dtype=torch.float64)
    with pytest.raises(moa.UnsupportedError, match="window-mixing kernel, which keeps no log-sum-exp"):
        moa.compile("examples/bla.moa").with_lse(Q=x, K=x, V=x)


def test_mixing_weights_made_of_literals_in_float64():
    """A mixing matrix of literal constants (Dk = where(j == tau, 1.0, 0)) is a float32 tile unless cast: the
    float64 kernel's dot failed on mixed dtypes."""
    k = moa.compile("""dim n, d, e
param W = 3
in Q[n, d], K[n, d], V[n, e]
Dk[j:W, tau:W] = where(j == tau, 1.0, 0)
Kt[i:n, slot:W, tau:W] = where(i - tau >= 0, Dk[slot, tau] * K[i - tau], 0)
Vt[i:n, slot:W, tau:W] = where(i - tau >= 0, Dk[slot, tau] * V[i - tau], 0)
Kh[i, slot] = sum(Kt[i, slot], axis=0)
Vh[i, slot] = sum(Vt[i, slot], axis=0)
S[i, slot] = where(slot <= i, dot(Q[i], Kh[i, slot]), -inf)
out O[i] = softmax(S[i], axis=-1) @ Vh[i]""")
    x = torch.randn(20, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    assert (k(Q=x, K=x, V=x) - k.reference(Q=x, K=x, V=x)).abs().max() <= 1e-13
