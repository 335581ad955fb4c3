"""The chunked linear form's backward (codegen/chunked_backward.py, runtime/linear_backward.py): gradients of every
float input of linear, linear_relu, power and power_gated against torch.autograd through the float64 reference at
ragged sizes and chunk lengths, float32, broadcast inputs; which form a call that needs gradients runs (the forward's
rule) and that the chunked kernels are the ones launched; generated sources pyflakes-clean; sm_90 AOT fit."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

import moa
from moa.codegen.chunked_backward import BACKWARD_KERNELS, linear_backward_reason
from moa.errors import UnsupportedError
from moa.runtime import aot, backward_run, linear_backward
from moa.runtime.tiling import LinearConfig

try:
    import grad_cases as C
except ImportError:  # pragma: no cover
    from tests import grad_cases as C

F64 = torch.float64
STEMS = ("linear", "linear_relu", "power", "power_gated")


def _compile(stem: str, form="linear"):
    return moa.compile(f"examples/{stem}.moa", form=form)


def _chunk(monkeypatch, chunk: int, block_f: int = 16):
    monkeypatch.setattr(linear_backward, "INTERPRETER_CONFIG", LinearConfig(chunk, block_f))


def _no_quadratic(monkeypatch):
    """The quadratic fused backward (and its forward storing Z) must not run."""
    def boom(*a, **kw):
        raise AssertionError("the quadratic backward ran")
    monkeypatch.setattr(backward_run.BackwardRunner, "grads", boom)


def _grads(k, x: dict, cot: dict, dtype=F64) -> dict:
    names = C.float_names(k.program)
    leaves = {n: (t.detach().clone().to(dtype).requires_grad_() if n in names else t) for n, t in x.items()}
    out = k(**leaves)
    (out.to(F64) * cot["O"]).sum().backward()
    return {n: leaves[n].grad for n in names}, out


def _check(stem: str, size: dict, tol: float, dtype=F64, form="linear", seed=0, batch=(2,)):
    k = _compile(stem, form)
    x = C.inputs(k.program, C.dims_for(k.program, size), seed, batch=batch)
    cot = C.cotangents(k, x, seed)
    want = C.autograd_grads(k, x, cot)
    got, out = _grads(k, x, cot, dtype)
    errs = {n: C.rel_err(got[n].detach(), want[n]) for n in want}
    assert all(got[n].dtype == dtype and got[n].shape == x[n].shape for n in want)
    assert max(errs.values()) <= tol, (stem, size, dtype, errs)
    assert C.rel_err(out.detach(), k.reference(**x)) <= tol
    return k, errs


def test_every_linear_example_has_the_chunked_backward():
    for stem in STEMS:
        k = _compile(stem)
        assert linear_backward_reason(k.planner.cg_program, k.planner.linear_plans["O"][0]) is None
        assert k.backward.linear is not None
        want = {"Q", "K", "V"} | ({"G"} if stem == "power_gated" else set())
        assert set(k.backward.linear.fused_names()) == want
    # a program without the linear form (softmax) has none
    assert _compile("causal", None).backward.linear is None


@pytest.mark.parametrize("n, chunk", [(37, 16), (130, 32)])
@pytest.mark.parametrize("stem", STEMS)
def test_float64_gradients_against_autograd(stem, n, chunk, monkeypatch):
    """Ragged sizes (n not a multiple of the chunk, a partial last chunk), d = 5 (p = 2: 15 features, one partial
    feature tile), e = 3; every float input (Q, K, V, and G of power_gated)."""
    _chunk(monkeypatch, chunk)
    _no_quadratic(monkeypatch)
    k, _ = _check(stem, {"n": n, "d": 5, "e": 3}, 1e-10, seed=n)
    assert dict(k.backward.linear.launches) == {name: 1 for name in BACKWARD_KERNELS}


def test_one_chunk_and_tiny_sizes(monkeypatch):
    """n < CHUNK (a single chunk: the states are all zero) and n = 1."""
    _chunk(monkeypatch, 16)
    _no_quadratic(monkeypatch)
    for n in (1, 9):
        _check("power_gated", {"n": n, "d": 3, "e": 2}, 1e-10, seed=n)


def test_float32_gradients(monkeypatch):
    _chunk(monkeypatch, 16)
    _no_quadratic(monkeypatch)
    _check("power_gated", {"n": 37, "d": 5, "e": 3}, 2e-5, dtype=torch.float32, seed=5)
    _check("linear", {"n": 37, "d": 5, "e": 3}, 2e-5, dtype=torch.float32, seed=5)


def test_two_batch_axes_and_broadcast_kv(monkeypatch):
    """K, V (and G) shared over the batch: their gradients sum over it."""
    _chunk(monkeypatch, 16)
    _no_quadratic(monkeypatch)
    k = _compile("power_gated")
    x = C.inputs(k.program, {"n": 21, "d": 4, "e": 3}, 7, batch=(2, 3))
    x["K"], x["V"], x["G"] = x["K"][0, 0], x["V"][0], x["G"][1, 2]
    cot = C.cotangents(k, x, 7)
    want = C.autograd_grads(k, x, cot)
    got, _ = _grads(k, x, cot)
    for n in want:
        assert C.rel_err(got[n], want[n]) <= 1e-10, n


GQA_GATED = """dim h, g, n, d, e
in Q[h, n, d], K[g, n, d], V[g, n, e], G[h, n]
A[a, i, j] = where(j <= i, dot(Q[a, i], K[a // (h // g), j]) ^ 2 * exp(G[a, i] - G[a, j]), 0)
out O[a] = normalize(A[a], axis=-1) @ V[a // (h // g)]
"""


def test_heads_sharing_kv_with_a_per_head_gate(monkeypatch):
    """A leading head axis, K and V read by groups of heads (their dK, dV summed over the group), G per head."""
    _chunk(monkeypatch, 16)
    _no_quadratic(monkeypatch)
    k = moa.compile(GQA_GATED, form="linear")
    x = C.inputs(k.program, {"h": 4, "g": 2, "n": 21, "d": 4, "e": 3}, 1)
    cot = C.cotangents(k, x, 1)
    want = C.autograd_grads(k, x, cot)
    got, _ = _grads(k, x, cot)
    for n in want:
        assert C.rel_err(got[n], want[n]) <= 1e-10, n
    assert k.backward.linear.launches["_bwd_dq"] == 1


def test_form_choice_of_training(monkeypatch):
    """form=None: the training form choice (moa/linear.py's predicted times of forward plus backward) picks the
    kernels a call trains through, both exact. On the H100's table the chunked form wins at d = e = 4 and batch 2
    from n = 13569 only (its scans run few programs); on a device that any grid fills, without launch overhead
    (the interpreter's scale), from n = 257 (and for some n past a tile boundary, 129 to 255): n = 100 trains
    through the quadratic kernels, n = 520 through the chunked ones."""
    import dataclasses

    from moa.devices import get_device
    from moa.runtime import plan

    assert _compile("power", None).planner.form_crossover("O", {"d": 4, "e": 4}, training=True, batch=2) == 13569
    filled = dataclasses.replace(get_device("h100"), sms=1, launch_s=0.0)
    monkeypatch.setattr(plan, "form_device", lambda device: filled)
    assert _compile("power", None).planner.form_crossover("O", {"d": 4, "e": 4}, training=True, batch=2) == 257
    _chunk(monkeypatch, 32)
    for n, linear in ((100, False), (520, True)):
        k = _compile("power", None)
        x = C.inputs(k.program, {"n": n, "d": 4, "e": 4}, 3)
        assert k.backward.uses_linear(k.bind(x)) == linear
        assert k.planner.run_kind("O", k.bind(x).dims, training=True) == ("linear" if linear else "tiled")
        _check("power", {"n": n, "d": 4, "e": 4}, 1e-10, form=None, seed=3)
    kq = _compile("power", "quadratic")
    assert not kq.backward.uses_linear(kq.bind(x))


@pytest.mark.parametrize("stem", ["linear", "power_gated"])
def test_value_tiles_of_the_scans(monkeypatch, stem):
    """The forward's recomputed scan and the reverse scan split along the value axis (BLOCK_V = 16 of 64 value
    columns: four programs per feature tile) give the same gradients."""
    monkeypatch.setattr(linear_backward, "INTERPRETER_CONFIG", LinearConfig(16, 16, block_v=16))
    _check(stem, {"n": 37, "d": 5, "e": 40}, 1e-10, seed=2)


def test_no_grad_call_unchanged(monkeypatch):
    """Without gradients the plain chunked forward runs (no Z store, no backward module)."""
    k = _compile("power")
    x = C.inputs(k.program, {"n": 20, "d": 4, "e": 3}, 2)
    with torch.no_grad():
        out = k(**x)
    assert C.rel_err(out, k.reference(**x)) <= 1e-12
    assert not k.backward.linear.launches


def test_generated_sources_are_pyflakes_clean(tmp_path):
    for stem in STEMS:
        lb = _compile(stem).backward.linear
        for dt, nb in (("float32", 1), ("bfloat16", 2), ("float64", 0)):
            src = lb.spec(dt, nb).source
            assert all(f"def {name}(" in src for name in (*BACKWARD_KERNELS, "_chunk_out"))
            assert "tl.store(zrow_ptr" in src
            (tmp_path / f"{stem}_{dt}.py").write_text(src)
    exe = Path(sys.executable).with_name("ruff")
    proc = subprocess.run([str(exe), "check", "--isolated", "--no-cache", "--select", "F", "--output-format",
                           "concise", str(tmp_path)], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stdout[-4000:]


def _aot_fits(stem: str, d: int) -> dict:
    """The training forward's two kernels and the backward's (with the states it recomputes) each have a config
    that compiles for sm_90 without spills, within 227 KB of shared memory (chosen as a CUDA call does)."""
    k = _compile(stem)
    lb = k.backward.linear
    spec = lb.spec("bfloat16", 1)
    chosen = {}
    for phase, kernels in linear_backward.PHASES.items():
        cfg, reps = linear_backward.choose(k.planner.cg_program, lb.lp, spec, "bfloat16",
                                           {"n": 4096, "d": d, "e": d}, "sm_90", phase)
        assert set(reps) == set(kernels)
        for name, rep in reps.items():
            assert aot.fits(rep, "sm_90")[0] and rep.spills == 0 and rep.shared_bytes <= 227 * 1024, \
                (name, rep.summary())
        chosen[phase] = cfg
    return chosen


def test_aot_sm90_linear_d64_fits():
    chosen = _aot_fits("linear", 64)
    assert chosen["forward"].chunk == chosen["backward"].chunk == 64   # 64-row chunks: wgmma


@pytest.mark.slow
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("stem", ["linear", "power", "power_gated"])
def test_aot_sm90_fits(stem, d):
    _aot_fits(stem, d)


def test_opcheck_and_gradcheck(monkeypatch):
    """The operator with the chunked form: fake shapes and strides of the outputs and the saved Z (opcheck), and
    finite differences (gradcheck, float64)."""
    _chunk(monkeypatch, 16)
    k = _compile("power_gated")
    x = C.inputs(k.program, {"n": 7, "d": 3, "e": 2}, 0, batch=(1,))
    names = C.float_names(k.program)
    ts = [x[n].clone().requires_grad_() if n in names else x[n] for n in k.input_names]
    torch.library.opcheck(torch.ops.moa.attention, (k.op_key, ts))

    def f(*args):
        return k(**{**x, **dict(zip(names, args))})

    assert torch.autograd.gradcheck(f, tuple(x[n].clone().requires_grad_() for n in names))
    assert k.backward.linear.launches["_bwd_dq"] > 0


@pytest.mark.parametrize("phase", ["forward", "backward"])
def test_a_phase_without_a_config_runs_the_quadratic_kernels(phase, monkeypatch):
    """Where no config of a phase fits (CUDA), that phase runs the quadratic kernels: the saved Z means the same
    in both forms, so a chunked forward feeds the quadratic backward and the other way round."""
    real = linear_backward.LinearBackward._config

    def config(self, b, dtname, ph):
        if ph == phase:
            raise UnsupportedError("no config fits (test)")
        return real(self, b, dtname, ph)

    monkeypatch.setattr(linear_backward.LinearBackward, "_config", config)
    _chunk(monkeypatch, 16)
    k, _ = _check("power_gated", {"n": 37, "d": 5, "e": 3}, 1e-10, seed=9)
    assert bool(k.backward.linear.launches) == (phase == "forward")
