"""The fused backward kernels of the window-mixing schedule (codegen/window_backward.py, runtime/window_backward.py):
Blurry Window Attention's dQ, dK, dV through torch.autograd against autograd through the float64 reference (ragged
n, W = 16 and other W / M, several batch axes, tiles crossed), lower precisions, that the kernels and not the
gradient DNF compute them, other programs the window form accepts (elementwise operands, a score function, a
shifted hop, heads sharing K and V), the programs refused (with the reason), the predicted work equal to the
instrumented interpreter's, pyflakes-clean sources and the AOT fit for sm_90."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

import moa
from moa.runtime import aot
from moa.runtime import backward as runtime_backward
from moa.runtime import window_backward as WB
from moa.runtime import window_backward_cost as WC
from moa.runtime.measure import instrument
from moa.runtime.tiling import Config

try:
    import grad_cases as C
except ImportError:  # pragma: no cover
    from tests import grad_cases as C

F64 = torch.float64
DK = ("where(j == tau, M / W, sin(3.141592653589793 * M * (j - tau) / W) / "
      "(W * sin(3.141592653589793 * (j - tau) / W)))")


def _program(score="dot(Q[i], Kh[i, slot]) / sqrt(d)", key="K[i - tau]", value="V[i - tau]", guard="i - tau >= 0",
             extra="", mixing=DK, W=6, M=3) -> str:
    """bla.moa with its parts replaced."""
    return (f"dim n, d, e\nparam W = {W}, M = {M}\nin Q[n, d], K[n, d], V[n, e]{extra}\n"
            f"Dk[j:W, tau:W] = {mixing}\n"
            f"Kt[i:n, slot:W, tau:W] = where({guard}, Dk[slot, tau] * {key}, 0)\n"
            f"Vt[i:n, slot:W, tau:W] = where({guard}, Dk[slot, tau] * {value}, 0)\n"
            "Kh[i, slot] = sum(Kt[i, slot], axis=0)\nVh[i, slot] = sum(Vt[i, slot], axis=0)\n"
            f"S[i, slot] = where(slot <= i, {score}, -inf)\nout O[i] = softmax(S[i], axis=-1) @ Vh[i]\n")


HEADS = """dim h, n, d, e
param W = 5, M = 2
in Q[h, n, d], K[n, d], V[n, e]
Dk[j:W, tau:W] = DK
Kt[a:h, i:n, slot:W, tau:W] = where(i - tau >= 0, Dk[slot, tau] * K[i - tau], 0)
Vt[a:h, i:n, slot:W, tau:W] = where(i - tau >= 0, Dk[slot, tau] * V[i - tau], 0)
Kh[a, i, slot] = sum(Kt[a, i, slot], axis=0)
Vh[a, i, slot] = sum(Vt[a, i, slot], axis=0)
S[a, i, slot] = where(slot <= i, dot(Q[a, i], Kh[a, i, slot]) / sqrt(d), -inf)
out O[a, i] = softmax(S[a, i], axis=-1) @ Vh[a, i]
""".replace("DK", DK)


@pytest.fixture
def no_dnf(monkeypatch):
    """The gradient DNF must not be evaluated: every gradient comes from the fused kernels."""
    def refuse(*a, **kw):
        raise AssertionError("the unfused gradient DNF was evaluated")
    monkeypatch.setattr(runtime_backward, "evaluate_grad", refuse)


def _autograd_case(k, size: dict, batch, seed: int, dtype=F64) -> dict:
    """{input: rel_err} of the gradients of k's float inputs (k called with inputs requiring grad, `dtype`) against
    torch.autograd through the float64 reference."""
    x = C.inputs(k.program, C.dims_for(k.program, size), seed, batch=batch)
    cot = C.cotangents(k, x, seed)
    want = C.autograd_grads(k, x, cot)
    names = C.float_names(k.program)
    leaves = {n: (t.to(dtype).requires_grad_() if n in names else t) for n, t in x.items()}
    (k(**leaves).to(F64) * cot["O"]).sum().backward()
    for n in names:
        assert leaves[n].grad.dtype == dtype and leaves[n].grad.shape == x[n].shape
    return {n: C.rel_err(leaves[n].grad, want[n]) for n in names}


@pytest.mark.parametrize("W,M,n,batch,blocks", [
    (16, 5, 37, (2,), None),        # one row tile of 64 (the interpreter's default tile)
    (16, 5, 37, (2,), (16, 16)),    # 3 row tiles: the gather reads dH and P2 across tile edges
    (16, 5, 130, (2,), None),       # 3 ragged tiles of 64
    (12, 5, 70, (2, 3), (32, 16)),   # W not a power of two, two batch axes, different tiles per kernel
    (8, 3, 37, (3,), (16, 32)),
    (5, 5, 20, (2,), (16, 16)),     # M = W: the sliding window
])
def test_bla_gradients_match_autograd_float64(W, M, n, batch, blocks, no_dnf, monkeypatch):
    monkeypatch.setattr(WB, "INTERPRETER_BLOCKS", blocks)
    k = moa.compile("examples/bla.moa", W=W, M=M)
    assert k.backward.unfused_reason is None and k.backward.window is not None
    assert set(k.backward.fused_inputs) == {"Q", "K", "V"}
    assert k.backward.runner is None and k.backward.multi is None and k.backward.saved_spec(F64) == []
    errs = _autograd_case(k, {"n": n, "d": 8, "e": 5}, batch, seed=W + M + n)
    assert max(errs.values()) <= 1e-10, errs


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-5), (torch.bfloat16, 3e-2)])
def test_bla_lower_precision_gradients(dtype, tol, no_dnf):
    """docs/robustness.md's tolerances (the forward's), float64 reference."""
    k = moa.compile("examples/bla.moa")
    errs = _autograd_case(k, {"n": 37, "d": 16, "e": 8}, (2,), seed=7, dtype=dtype)
    assert max(errs.values()) <= tol, errs


def test_empty_and_one_row(no_dnf):
    k = moa.compile("examples/bla.moa", W=4, M=2)
    assert max(_autograd_case(k, {"n": 1, "d": 4, "e": 3}, (2,), seed=3).values()) <= 1e-10
    x = C.inputs(k.program, {"n": 5, "d": 4, "e": 3}, 0, batch=(0,))
    leaves = {n: t.requires_grad_() for n, t in x.items()}
    k(**leaves).sum().backward()
    assert all(t.grad.shape == t.shape for t in leaves.values())


@pytest.mark.parametrize("name,src", [
    ("tanh key", _program(key="tanh(K[i - tau])")),                       # dK times tanh' of the read
    ("elu query", _program(score="dot(elu(Q[i]) + 1, Kh[i, slot])")),     # dQ times elu'
    ("softcap", _program(score="2.0 * tanh(dot(Q[i], Kh[i, slot]) / 2.0)")),   # E'(M) by sympy
    ("shifted hops", _program(key="K[i - tau - 1]", value="V[i - tau - 1]", guard="i - tau - 1 >= 0")),
    ("heads share K, V", HEADS),                                           # dK, dV summed over the heads
])
def test_other_window_programs_get_fused_gradients(name, src, no_dnf):
    k = moa.compile(src)
    assert k.planner.is_window("O") and k.backward.unfused_reason is None, name
    errs = _autograd_case(k, {"n": 23, "d": 6, "e": 5, "h": 3}, (2,), seed=11)
    assert max(errs.values()) <= 1e-10, (name, errs)


@pytest.mark.parametrize("src,why", [
    (_program(extra=", B[W]", score="dot(Q[i], Kh[i, slot]) / sqrt(d) + B[slot]"), "read float inputs"),
    (_program(extra=", T[W, W]", mixing="T[j, tau]"), "read float inputs"),
])
def test_refused_window_programs_say_why_and_train_through_the_dnf(src, why):
    k = moa.compile(src)
    assert k.planner.is_window("O")
    assert why in k.backward.unfused_reason and k.backward.fused_inputs == () and k.backward.window is None
    assert max(_autograd_case(k, {"n": 13, "d": 4, "e": 3}, (2,), seed=5).values()) <= 1e-10


def test_kernel_sources_store_only_the_row_scalars_and_gradients(tmp_path):
    """dQ and the [n, W] scalars dH, P2 from the first kernel, dK and dV from the second; no atomics, no
    [n, W, d] array; every generated source pyflakes-clean."""
    for W, M in ((16, 5), (12, 5)):
        runner = moa.compile("examples/bla.moa", W=W, M=M).backward.window
        for dt, nb in (("float32", 1), ("bfloat16", 2), ("float64", 0)):
            src = runner.spec(dt, nb).source
            dq, dkdv = src.split("def _attn_window_bwd_dkdv(")
            assert [s.split("(")[1].split("_ptr")[0] for s in dq.split("tl.store")[1:]] == ["dQ", "dH", "P2"]
            assert [s.split("(")[1].split("_ptr")[0] for s in dkdv.split("tl.store")[1:]] == ["dK", "dV"]
            assert "atomic" not in src
            (tmp_path / f"bla_{W}_{dt}_{nb}.py").write_text(src)
    for name, src in (("heads", HEADS), ("elu", _program(score="dot(elu(Q[i]) + 1, Kh[i, slot])"))):
        (tmp_path / f"{name}.py").write_text(moa.compile(src).backward.window.spec("float16", 1).source)
    exe = Path(sys.executable).with_name("ruff")
    proc = subprocess.run([str(exe), "check", "--isolated", "--no-cache", "--select", "F", "--output-format",
                           "concise", str(tmp_path)], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stdout[-4000:]


@pytest.mark.parametrize("d", [64, 128])
def test_aot_sm90_window_backward_kernels_fit(d):
    """Both kernels have a config that compiles for sm_90 (bf16) without spills, within 227 KB of shared memory,
    chosen as a CUDA launch chooses it."""
    k = moa.compile("examples/bla.moa")
    spec = k.backward.window.spec("bfloat16", 1)
    picks = WB.choose(k.planner.cg_program, spec, "bfloat16", {"n": 1024, "d": d, "e": d}, "sm_90")
    assert set(picks) == set(WB.KERNELS)
    for _cfg, rep in picks.values():
        assert aot.fits(rep, "sm_90")[0] and rep.spills == 0 and rep.shared_bytes <= 227 * 1024, rep.summary()


@pytest.mark.parametrize("src,size,batch,blocks", [
    ("bla", {"n": 37, "d": 8, "e": 5}, (2,), (16, 16)),
    ("bla", {"n": 130, "d": 8, "e": 5}, (2,), (64, 32)),
    (_program(key="tanh(K[i - tau - 1])", value="V[i - tau - 1]", guard="i - tau - 1 >= 0",
              score="dot(elu(Q[i]) + 1, Kh[i, slot])"), {"n": 23, "d": 6, "e": 5}, (2, 2), (16, 32)),
    (HEADS, {"n": 23, "d": 6, "e": 5, "h": 3}, (2,), (16, 16)),
])
def test_predicted_work_equals_the_interpreters_counters(src, size, batch, blocks, monkeypatch):
    """runtime/window_backward_cost.py: per kernel, FLOPs, transcendentals, programs, bytes loaded and stored."""
    k = moa.compile("examples/bla.moa") if src == "bla" else moa.compile(src)
    monkeypatch.setattr(WB, "INTERPRETER_BLOCKS", blocks)
    measured, launch = {}, WB.run

    def counted(fn, grid, args, consts, dev, what):
        with instrument() as c:
            launch(fn, grid, args, consts, dev, what)
        measured[what.split()[-1]] = c
    monkeypatch.setattr(WB, "run", counted)
    x = {n: t.float() for n, t in C.inputs(k.program, C.dims_for(k.program, size), 1, batch=batch).items()}
    k.backward.window.grads(k.bind(x), torch.randn(k.reference(**x).shape))
    pred = WC.predict(k.backward.window, C.dims_for(k.program, size), batch, "float32", Config(*blocks))
    assert set(pred) == set(measured) == set(WB.KERNELS)
    for name, p in pred.items():
        for f in ("flops", "transcendentals", "programs", "dram_bytes_loaded", "dram_bytes_stored"):
            assert getattr(p, f) == getattr(measured[name], f), (name, f, getattr(p, f), getattr(measured[name], f))


@pytest.mark.parametrize("src", [
    # softmax: a key bias named lse, the values named delta, the queries dO (codegen/backward.py's buffers)
    "dim n, d, e\nin dO[n, d], K[n, d], delta[n, e], lse[n]\n"
    "S[i, j] = where(j <= i, dot(dO[i], K[j]) / sqrt(d) + lse[j], -inf)\nout O = softmax(S, axis=-1) @ delta\n",
    # window mixing: the keys named dH, the values P2 (window_backward.py's)
    open("examples/bla.moa").read().replace("K[", "dH[").replace("V[", "P2[").replace("K,", "dH,"),
    # the chunked linear form: queries S, keys U (chunked_backward.py's)
    "dim n, d, e\nin S[n, d], U[n, d], V[n, e]\n"
    "A[i, j] = where(j <= i, dot(elu(S[i]) + 1, elu(U[j]) + 1), 0)\nout O = normalize(A, axis=-1) @ V\n",
])
def test_inputs_named_like_the_backward_buffers_are_renamed_and_fused(src, no_dnf):
    """An input named like a buffer of the backward kernels is renamed for code generation (codegen/names.py
    KERNEL_BUFFERS), so the fused kernels still run (the gradient DNF is not evaluated); the name lists cannot
    drift apart."""
    from moa.codegen import backward_shape, chunked_backward, names, window_backward
    assert names.KERNEL_BUFFERS == backward_shape.BUFFERS | chunked_backward.BUFFERS | set(window_backward.BUFFERS)
    k = moa.compile(src, form="linear") if "normalize" in src else moa.compile(src)
    assert set(k.planner.codegen.inputs) != set(k.planner.codegen.inputs.values())   # renamed
    assert k.backward.unfused_reason is None, k.backward.unfused_reason
    assert max(_autograd_case(k, {"n": 13, "d": 4, "e": 3}, (2,), seed=5).values()) <= 1e-10
