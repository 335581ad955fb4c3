"""Issue 5: linear-cost forms derived by algebra (power and linear attention).

Rules are checked on values (float64) and sizes (sympy); kernels of both forms are checked against the
reference, an independent formula (tests/oracles.py) and eager flex_attention; measured counters show the
linear form is linear in n and locate the crossover.
"""
from __future__ import annotations

import math

import pytest
import sympy as sp
import torch
from torch.nn.attention.flex_attention import flex_attention

import moa
from moa.linear import backward_costs, crossover, feature_table, form_costs, plan
from moa.runtime.linear_eval import linear_reference
from moa.runtime.measure import instrument
from moa.runtime.tiling import Config, LinearConfig

import oracles

F64 = torch.float64


def _inputs(n, d, e=8, batch=(2,), gated=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    ins = {x: torch.randn(*batch, n, dd, generator=g, dtype=F64) / dd ** 0.25
           for x, dd in (("Q", d), ("K", d), ("V", e))}
    if gated:  # cumulative log-gates, per batch
        ins["G"] = torch.cumsum(torch.log(torch.rand(*batch, n, generator=g, dtype=F64) * 0.5 + 0.5), -1)
    return ins


def _err(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp(min=1.0)).item()


# ---- rules --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("d,p", [(1, 1), (3, 2), (5, 3), (4, 4), (16, 2), (8, 4)])
def test_power_features_identity(d, p):
    """(x . y)^p == phi_p(x) . phi_p(y), D = C(d + p - 1, p) (sympy)."""
    idx, w = feature_table(d, p)
    dsym = sp.Symbol("d", positive=True, integer=True)
    D = sp.binomial(dsym + p - 1, p)
    assert len(idx) == int(D.subs(dsym, d)) == math.comb(d + p - 1, p)
    x, y = torch.randn(7, d, dtype=F64), torch.randn(7, d, dtype=F64)
    I, W = torch.tensor(idx).reshape(-1, p), torch.tensor(w, dtype=F64)
    fx, fy = W * x[:, I].prod(-1), W * y[:, I].prod(-1)
    assert torch.allclose((fx * fy).sum(-1), (x * y).sum(-1) ** p, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("path,params,p,gated", [("power.moa", {"p": 2}, 2, False), ("power.moa", {"p": 4}, 4, False),
                                                 ("power_gated.moa", {}, 2, True), ("linear.moa", {}, 1, False),
                                                 ("linear_relu.moa", {}, 1, False)])
def test_plan_recognised(path, params, p, gated):
    k = moa.compile(f"examples/{path}", **params)
    lp, why = plan(k.schedules["O"])
    assert lp is not None, why
    assert lp.p == p and (lp.ga is not None) == gated
    assert lp.features_expr() == sp.binomial(k.schedules["O"].branches[0].dot.extent + p - 1, p)


@pytest.mark.parametrize("path", ["causal.moa", "sdpa.moa", "sliding_window.moa"])
def test_no_linear_form_for_softmax(path):
    k = moa.compile(f"examples/{path}", form="linear")
    lp, why = plan(k.schedules["O"])
    assert lp is None and "softmax" in why
    with pytest.raises(moa.UnsupportedError, match="form='linear'"):
        k(**_inputs(5, 4))


def test_unmasked_normalize_keeps_quadratic():
    src = "dim n, d, e\nin Q[n, d], K[n, d], V[n, e]\nA = (Q @ K.T) ^ 2\nout O = normalize(A, axis=-1) @ V\n"
    lp, why = plan(moa.compile(src).schedules["O"])
    assert lp is None and "causal" in why


@pytest.mark.parametrize("path,params,gated", [("power.moa", {"p": 2}, False), ("power.moa", {"p": 4}, False),
                                               ("power_gated.moa", {}, True), ("linear.moa", {}, False)])
@pytest.mark.parametrize("chunk", [1, 7, 16])
def test_chunked_rewrite_values(path, params, gated, chunk):
    """The rewritten (chunked-state) form evaluated with torch equals the unfused reference."""
    k = moa.compile(f"examples/{path}", **params)
    lp, _ = plan(k.schedules["O"])
    ins = _inputs(37, 6, gated=gated)
    assert _err(linear_reference(k.program, lp, ins, chunk=chunk), k.reference(**ins)) <= 1e-12


# ---- kernels --------------------------------------------------------------------------------------------

CASES = [(p, d, n) for p, d in [(2, 16), (2, 32), (2, 64), (4, 16)] for n in (1, 63, 64, 65, 300)]


@pytest.mark.parametrize("p,d,n", CASES)
@pytest.mark.parametrize("gated", [False, True])
def test_power_forms_agree(p, d, n, gated):
    src = "examples/power_gated.moa" if gated else "examples/power.moa"
    lin = moa.compile(src, form="linear", p=p)
    quad = moa.compile(src, form="quadratic", p=p)
    ins = _inputs(n, d, gated=gated, seed=n + d)
    ref = quad.reference(**ins)
    o_lin, o_quad = lin(**ins), quad(**ins)
    assert _err(o_lin, ref) <= 1e-12
    assert _err(o_quad, ref) <= 1e-12
    assert _err(o_lin, o_quad) <= 1e-12
    G = ins.get("G")
    assert _err(ref, oracles.power_attention(ins["Q"], ins["K"], ins["V"], p=p, G=G)) <= 1e-12


P4_D64 = [pytest.param(n, gated, marks=[pytest.mark.slow]) for n in (1, 63, 64, 65, 300) for gated in (False, True)]


@pytest.mark.parametrize("n,gated", P4_D64)
def test_power_p4_d64(n, gated):
    """p = 4, d = 64: D = C(67, 4) = 766,480 features (states of 392 MB per chunk in float64): about a minute per
    case in the interpreter, so all run with MOA_SLOW=1 (make test-slow); p = 4 at d = 32 runs by default."""
    src = "examples/power_gated.moa" if gated else "examples/power.moa"
    lin = moa.compile(src, form="linear", p=4)
    quad = moa.compile(src, form="quadratic", p=4)
    ins = _inputs(n, 64, batch=(1,), gated=gated, seed=n)
    ref = quad.reference(**ins)
    o_lin, o_quad = lin(**ins), quad(**ins)
    assert _err(o_lin, ref) <= 1e-12
    assert _err(o_quad, ref) <= 1e-12
    assert _err(ref, oracles.power_attention(ins["Q"], ins["K"], ins["V"], p=4, G=ins.get("G"))) <= 1e-12


def test_power_p4_d32_and_heads():
    """p = 4 with d = 32 (D = 52360 features) and extra batch and head axes."""
    lin = moa.compile("examples/power_gated.moa", form="linear", p=4)
    ins = _inputs(20, 32, batch=(1, 2), gated=True)
    ins["G"] = ins["G"][:, :1]  # the gate broadcasts over heads
    ref = lin.reference(**ins)
    assert _err(lin(**ins), ref) <= 1e-12


@pytest.mark.parametrize("path,phi", [("linear.moa", None), ("linear_relu.moa", torch.relu)])
@pytest.mark.parametrize("n", [1, 63, 65, 300])
def test_linear_attention_forms(path, phi, n):
    lin = moa.compile(f"examples/{path}", form="linear")
    quad = moa.compile(f"examples/{path}", form="quadratic")
    ins = _inputs(n, 16, batch=(2, 2), seed=n)
    ref = lin.reference(**ins)
    assert _err(lin(**ins), ref) <= 1e-12
    assert _err(quad(**ins), ref) <= 1e-12
    assert _err(ref, oracles.linear_attention(ins["Q"], ins["K"], ins["V"], phi=phi, eps=0.0)) <= 1e-12


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")  # eager: the oracle
@pytest.mark.parametrize("p", [2, 4])
def test_power_against_flex_attention(p):
    """Eager flex_attention with score_mod p*log|s| + G[q] - G[kv] (even p) is normalised power attention."""
    n, d = 50, 16
    ins = _inputs(n, d, batch=(1,), gated=True)
    G = ins["G"][0]

    def score_mod(s, b, h, qi, ki):
        return p * torch.log(torch.abs(s)) + G[qi] - G[ki]

    def causal(b, h, qi, ki):
        return ki <= qi

    from torch.nn.attention.flex_attention import create_block_mask

    q, k, v = (ins[x][None] for x in ("Q", "K", "V"))
    mask = create_block_mask(causal, None, None, n, n, device="cpu")
    flex = flex_attention(q, k, v, score_mod=score_mod, block_mask=mask, scale=1.0)[0]
    out = moa.compile("examples/power_gated.moa", form="linear", p=p)(**ins)
    assert _err(out, flex) <= 1e-12


# ---- counters: linear in n, and the crossover --------------------------------------------------------------

def _measure(kernel, n, d=16, e=16):
    ins = _inputs(n, d, e=e, batch=(), seed=1)
    with instrument() as c:
        kernel(**ins)
    return c


def test_linear_form_scales_linearly_and_crossover():
    lin = moa.compile("examples/power.moa", form="linear")
    quad = moa.compile("examples/power.moa", form="quadratic")
    ns = [256, 1024, 4096]
    ml = [_measure(lin, n) for n in ns]
    for a, b, na, nb in zip(ml, ml[1:], ns, ns[1:]):
        for what in ("flops", "dram_bytes"):
            slope = math.log(getattr(b, what) / getattr(a, what)) / math.log(nb / na)
            assert slope <= 1.05, (what, na, nb, slope)
    mq = [_measure(quad, n) for n in ns[:2]]
    slope_q = math.log(mq[1].flops / mq[0].flops) / math.log(ns[1] / ns[0])
    assert 1.8 <= slope_q <= 2.05
    # measured FLOP crossover (both forms measured by the instrumented interpreter) vs the model's
    grid = [128, 192, 256, 384, 512, 768, 1024]
    measured = next(n for n in grid if _measure(lin, n).flops < _measure(quad, n).flops)
    lp, _ = plan(lin.schedules["O"])
    dims = {"d": 16, "e": 16}
    cpu = dict(block_m=64, block_n=64, chunk=64, block_f=256)  # the interpreter's configuration
    predicted = crossover(lp, dims, peak_flops=1.0, bandwidth=float("inf"), elem_bytes=8, acc_bytes=8, **cpu)
    assert predicted is not None and measured / 2 <= predicted <= measured * 2, (predicted, measured)


def test_form_choice_follows_cost():
    k = moa.compile("examples/power.moa")
    lp, _ = plan(k.schedules["O"])
    small, large = {"n": 256, "d": 64, "e": 64}, {"n": 1 << 17, "d": 64, "e": 64}
    assert k.planner.choose_form("O", small) == "quadratic"
    assert k.planner.choose_form("O", large) == "linear"
    c = form_costs(lp, large)
    assert c["linear"].flops < c["quadratic"].flops


def test_explain_prints_the_form_choice_model():
    """moa explain prints both forms' predicted times (the form choice's, one batch index) and the crossover at
    batch 1 and 32, as Planner.form_crossover gives them."""
    k = moa.compile("examples/linear.moa")
    text = k.explain()
    t = k.planner.form_times("O", {"n": 16384, "d": 64, "e": 64})
    assert f"quadratic 3.53e+10 FLOP {t['quadratic'] * 1e6:.1f} us" in text
    for b in (1, 32):
        x = k.planner.form_crossover("O", {"d": 64, "e": 64}, batch=b)
        assert f"predicted crossover at batch {b}: linear is faster from n = {x} on" in text
    assert k.planner.choose_form("O", {"n": x, "d": 64, "e": 64}, batch=32) == "linear"
    assert k.planner.choose_form("O", {"n": x - 1, "d": 64, "e": 64}, batch=32) == "quadratic"


def test_cost_report_names_the_form():
    """CostReport.form is the form the runtime would run for those dims (quadratic short, linear long)."""
    k = moa.compile("examples/power_gated.moa")
    short = k.cost(dtype="bf16", device="h100", n=1024, d=64, e=64)
    long = k.cost(dtype="bf16", device="h100", n=1 << 17, d=64, e=64)
    assert short.form == "quadratic" and long.form == "linear"
    assert 0 < long.intermediate_bytes < long.unfused_intermediate_bytes  # states, not n x n arrays
    forced = moa.compile("examples/power_gated.moa", form="quadratic").cost(dtype="bf16", device="h100",
                                                                          n=1 << 17, d=64, e=64)
    assert forced.form == "quadratic" and forced.flops > long.flops


@pytest.mark.parametrize("example", ["power", "linear", "power_gated"])
def test_training_form_costs_follow_the_backward_kernels(example):
    """moa/linear.py backward_costs (the planner's training form choice) against the exact counts of the generated
    backward kernels of both forms (k.backward.cost), at the tiles it assumes: FLOPs within 3%, bytes within 25%."""
    kl = moa.compile(f"examples/{example}.moa", form="linear")
    kq = moa.compile(f"examples/{example}.moa", form="quadratic")
    lp = kl.planner.linear_plans["O"][0]
    n, d = 300, 64
    dims = {"n": n, "d": d, "e": d}
    exact_l = kl.backward.cost(dims, dtype="float32", config=LinearConfig(64, 64))
    exact_q = kq.backward.cost(dims, dtype="float32", config=Config(128, 64))
    assert (exact_l.path, exact_q.path) == ("linear", "fused")
    tiles = sum(min(-(-n // 64), ((r + 1) * 128 - 1) // 64 + 1) for r in range(-(-n // 128)))
    model_q, model_l = backward_costs(lp, n, d, d, tiles, 4, 4, 128, 64, 64, 64)
    for (flops, nbytes), exact in ((model_q, exact_q), (model_l, exact_l)):
        assert abs(flops / exact.flops - 1) < 0.03, (flops, exact.flops)
        assert abs(nbytes / (exact.bytes_loaded + exact.bytes_stored) - 1) < 0.25


def test_training_form_choice_counts_the_backward():
    """A call that needs gradients picks the form whose forward plus backward is predicted faster (per launch, with
    its occupancy and overhead, as cost() times a call): linear attention at d = 64 and one (batch, head) is
    chunked from n = 62209 for the forward alone (its scan runs 2 programs: the quadratic kernel's n / 128 row
    tiles fill the device sooner), from 36737 for forward plus backward (the quadratic backward's n^2 work weighs
    more); in between the forward stays quadratic and training is chunked; 32 heads bring both down to 3201 and
    1793."""
    k = moa.compile("examples/linear.moa")
    lp = k.planner.linear_plans["O"][0]
    cross = {(t, b): k.planner.form_crossover("O", {"d": 64, "e": 64}, training=t, batch=b)
             for t in (False, True) for b in (1, 32)}
    assert cross == {(False, 1): 62209, (True, 1): 36737, (False, 32): 3201, (True, 32): 1793}
    dims = {"n": 56000, "d": 64, "e": 64}
    assert k.planner.run_kind("O", dims) == "tiled" and k.planner.run_kind("O", dims, training=True) == "linear"
    assert k.backward.cost(dims, dtype="float32").path == "linear"
    assert k.backward.cost({**dims, "n": 1000}, dtype="float32").path == "fused"
    c = form_costs(lp, dims, training=True)
    assert c["quadratic"].flops > form_costs(lp, dims)["quadratic"].flops


def test_bfloat16_calls_store_bfloat16_states(monkeypatch):
    """A bfloat16 call stores the chunk states in bfloat16 (the running sums stay float32): the cost model counts
    half the state bytes of a float16 call. The interpreter cannot run bfloat16 inputs, so the store path runs
    with float32 inputs and bfloat16 state buffers: only the stored copy is rounded, once (error far above the
    float32 states', far below bfloat16's 2^-8); the training forward keeps float32 states."""
    from moa.runtime import linear_run
    from moa.runtime.linear_backward import _TrainRunner

    k = moa.compile("examples/linear.moa", form="linear")
    dims = {"n": 8192, "d": 128, "e": 128}
    half, bf = (k.cost(device="h200", dtype=dt, batch=(2, 16), **dims) for dt in ("fp16", "bf16"))
    assert 2 * bf.intermediate_bytes == half.intermediate_bytes
    assert half.dram_bytes - bf.dram_bytes == half.intermediate_bytes   # written once, read once
    quad = moa.compile("examples/linear.moa", form="quadratic").cost(device="h200", dtype="bf16", batch=(2, 16), **dims)
    assert bf.predicted_seconds < half.predicted_seconds < 0.5 * quad.predicted_seconds
    r = linear_run.LinearRunner(k.planner.cg_program, k.planner.linear_plans["O"][0])
    assert r.state_dtype(torch.bfloat16, torch.float32) == torch.bfloat16
    assert r.state_dtype(torch.float16, torch.float32) == torch.float32
    assert _TrainRunner(k.planner.cg_program, k.planner.linear_plans["O"][0]).state_dtype(
        torch.bfloat16, torch.float32) == torch.float32
    g = torch.Generator().manual_seed(0)
    x = {n: torch.randn(2, 300, 16, generator=g, dtype=torch.float32) for n in ("Q", "K", "V")}
    ref = k.reference(**{n: t.double() for n, t in x.items()})
    exact = _err(k(**x).double(), ref)
    monkeypatch.setattr(linear_run.LinearRunner, "state_dtype", lambda self, dc, acc: torch.bfloat16)
    k16 = moa.compile("examples/linear.moa", form="linear")
    rounded = _err(k16(**x).double(), ref)
    assert exact < 1e-6 and 1e-5 < rounded < 2 ** -8, (exact, rounded)


def test_bfloat16_forward_multiplies_bfloat16_operands(monkeypatch):
    """The chunked forward of a bfloat16 call casts its dot operands to bfloat16 (float32 accumulation), the training
    module keeps tf32; degree 1 reads a block of columns directly (no feature table). The interpreter cannot
    multiply bfloat16, so the casts run as float16 operands with float32 inputs: rounded once per operand (error
    near float16's 2^-11, far above the float32 dots')."""
    from moa.codegen import chunked
    from moa.codegen.chunked_backward import generate_chunked_backward

    k = moa.compile("examples/linear.moa", form="linear")
    lp = k.planner.linear_plans["O"][0]
    src = chunked.generate_chunked(k.planner.cg_program, lp, "bfloat16", 0).source
    assert src.count(".to(tl.bfloat16))") == 4 and "fidx0" not in src and "offs_f[None, :] * stride_K_1" in src
    train = generate_chunked_backward(k.planner.cg_program, lp, "bfloat16", 0).source
    assert "tl.bfloat16" not in train and 'input_precision="tf32"' in train and "fidx0" in train
    g = torch.Generator().manual_seed(0)
    x = {n: torch.randn(2, 300, 16, generator=g, dtype=torch.float32) for n in ("Q", "K", "V")}
    init = chunked._Chunked.__init__

    def half_dots(self, *a, **kw):
        init(self, *a, **kw)
        if type(self) is chunked._Chunked:   # the forward module, not the training one
            self.dot16 = "tl.float16"

    for name, params in (("linear", {}), ("power", {"p": 2})):
        ref = moa.compile(f"examples/{name}.moa", form="linear", **params).reference(
            **{n: t.double() for n, t in x.items()})
        exact = _err(moa.compile(f"examples/{name}.moa", form="linear", **params)(**x).double(), ref)
        monkeypatch.setattr(chunked._Chunked, "__init__", half_dots)
        rounded = _err(moa.compile(f"examples/{name}.moa", form="linear", **params)(**x).double(), ref)
        monkeypatch.setattr(chunked._Chunked, "__init__", init)
        assert exact < 1e-6 and 1e-5 < rounded < 2e-3, (name, exact, rounded)
