"""Ahead-of-time compilation for sm_90 without a GPU: registers, spills, shared memory, wgmma."""
from __future__ import annotations

import dataclasses
import importlib.util
import os
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import pytest
import triton
import triton.language as tl

from moa.errors import UnsupportedError

try:
    from moa.runtime import aot
except ImportError:  # the package is not installed: use the source tree
    from runtime import aot  # type: ignore[no-redef]

ROOT = Path(__file__).resolve().parents[1]
SIG = {"Q": "*fp16", "K": "*fp16", "V": "*fp16", "O": "*fp16", "sm_scale": "fp32", "N_CTX": "i32"}
KB = 1024


@triton.jit
def _online_softmax(qk, m_i, l_i):
    """One online-softmax step on a [BLOCK_M, BLOCK_N] tile of base-2 logits."""
    m_new = tl.maximum(m_i, tl.max(qk, 1))
    p = tl.math.exp2(qk - m_new[:, None])
    alpha = tl.math.exp2(m_i - m_new)
    return p, alpha, l_i * alpha + tl.sum(p, 1), m_new


@triton.jit
def flash_fwd(Q, K, V, O, sm_scale, N_CTX,
              HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Flash-attention forward over contiguous [B*H, N_CTX, HEAD_DIM] fp16 tensors.

    Grid (N_CTX // BLOCK_M, B*H); N_CTX must be a multiple of BLOCK_M and BLOCK_N (no masks).
    """
    start_m = tl.program_id(0)
    base = tl.program_id(1).to(tl.int64) * N_CTX * HEAD_DIM
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    q = tl.load(Q + base + offs_m[:, None] * HEAD_DIM + offs_d[None, :])
    kt_ptrs = K + base + offs_n[None, :] * HEAD_DIM + offs_d[:, None]  # K^T tile [HEAD_DIM, BLOCK_N]
    v_ptrs = V + base + offs_n[:, None] * HEAD_DIM + offs_d[None, :]
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    qk_scale = sm_scale * 1.4426950408889634  # log2(e): softmax via exp2
    for _ in range(0, N_CTX, BLOCK_N):
        qk = tl.dot(q, tl.load(kt_ptrs)) * qk_scale
        p, alpha, l_i, m_i = _online_softmax(qk, m_i, l_i)
        acc = acc * alpha[:, None] + tl.dot(p.to(tl.float16), tl.load(v_ptrs))
        kt_ptrs += BLOCK_N * HEAD_DIM
        v_ptrs += BLOCK_N * HEAD_DIM
    acc = acc / l_i[:, None]
    tl.store(O + base + offs_m[:, None] * HEAD_DIM + offs_d[None, :], acc.to(tl.float16))


@triton.jit
def broken(X, BLOCK: tl.constexpr):
    """Does not compile: a [BLOCK] x [BLOCK] tl.dot."""
    x = tl.load(X + tl.arange(0, BLOCK))
    tl.store(X + tl.arange(0, BLOCK), tl.dot(x, x))


def compile_flash(head_dim, *, target="sm_90", block_m=128, block_n=64, num_warps=8, num_stages=3):
    return aot.aot_compile(flash_fwd, SIG, {"HEAD_DIM": head_dim}, target=target, num_warps=num_warps,
                           num_stages=num_stages, block_m=block_m, block_n=block_n)


@pytest.fixture(scope="module")
def reports():
    return {d: compile_flash(d) for d in (64, 128)}


@pytest.mark.parametrize("head_dim", [64, 128])
def test_flash_forward_fits_sm90(reports, head_dim):
    r = reports[head_dim]
    assert r.registers > 0
    assert r.spills == 0
    assert r.uses_wgmma
    assert 0 < r.shared_bytes <= 227 * KB
    assert (r.num_warps, r.num_stages, r.block_m, r.block_n, r.target) == (8, 3, 128, 64, "sm_90")
    assert r.name == "flash_fwd"
    assert r.cubin[:4] == b"\x7fELF"
    assert ".target sm_90a" in r.ptx
    assert "spill stores" in r.ptxas_log
    assert aot.fits(r) == (True, "ok")


def test_shared_memory_grows_with_head_dim(reports):
    assert reports[128].shared_bytes > reports[64].shared_bytes


def test_ptxas_rerun_agrees_with_triton_log(reports):
    r = reports[64]
    md = types.SimpleNamespace(enable_fp_fusion=True, ptx_options=None)
    log = aot._run_ptxas(r.ptx, 90, md)
    assert f"Used {r.registers} registers" in log
    assert "0 bytes spill stores, 0 bytes spill loads" in log


def test_oversized_config_is_rejected():
    # 3 stages of 128x512 fp16 K and V tiles alone need 2 x 128 KiB of shared memory.
    with pytest.raises(UnsupportedError) as info:
        compile_flash(512, block_m=128, block_n=128)
    msg = str(info.value)
    assert "flash_fwd" in msg and "sm_90" in msg and "shared memory" in msg
    assert "Traceback" not in msg


def test_fits_names_each_problem(reports):
    r = reports[64]
    ok, why = aot.fits(dataclasses.replace(r, spills=16, shared_bytes=230 * KB))
    assert not ok and "16 bytes of register spills" in why and "shared memory" in why
    assert aot.fits(dataclasses.replace(r, shared_bytes=200 * KB))[0]
    ok, why = aot.fits(dataclasses.replace(r, shared_bytes=200 * KB), "sm_80")  # 163 KiB there
    assert not ok and "sm_80" in why
    assert not aot.fits(dataclasses.replace(r, registers=256))[0]


def test_sm80_has_no_wgmma():
    r = compile_flash(64, target="sm_80", num_warps=4, block_n=32)
    assert r.registers > 0 and not r.uses_wgmma and r.target == "sm_80"
    assert ".target sm_80" in r.ptx


def test_unknown_target():
    with pytest.raises(UnsupportedError, match="sm_75"):
        compile_flash(64, target="sm_75")


def test_frontend_error_is_unsupported():
    with pytest.raises(UnsupportedError) as info:
        aot.aot_compile(broken, {"X": "*fp16"}, {"BLOCK": 32})
    msg = str(info.value)
    assert "broken" in msg and "sm_90" in msg and "tl.dot" in msg
    assert "Traceback" not in msg


def test_ptxas_failure_is_unsupported(capsys):
    with pytest.raises(UnsupportedError, match="ptxas failed.*no-such-ptxas-flag"):
        aot.aot_compile(flash_fwd, SIG, {"HEAD_DIM": 64, "BLOCK_M": 128, "BLOCK_N": 64},
                        options={"ptx_options": "--no-such-ptxas-flag"})
    assert ".entry" not in capsys.readouterr().out  # triton's PTX dump is not echoed


def test_interpreted_function_compiles_in_process(monkeypatch):
    """Kernels defined while knobs.runtime.interpret is on are InterpretedFunctions (their jit helpers
    too); aot_compile rebuilds JITFunctions from them."""
    from triton import knobs
    from triton.runtime.interpreter import InterpretedFunction
    monkeypatch.setenv("TRITON_ALWAYS_COMPILE", "1")  # go through code generation, not the cache
    with knobs.runtime.scope():
        knobs.runtime.interpret = True
        spec = importlib.util.spec_from_file_location("_test_aot_interpreted", __file__)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        assert isinstance(mod.flash_fwd, InterpretedFunction)
        assert isinstance(mod._online_softmax, InterpretedFunction)
        r = mod.compile_flash(64)
    assert r.registers > 0 and r.spills == 0 and r.uses_wgmma


def test_triton_imported_in_interpreter_mode(tmp_path):
    """With TRITON_INTERPRET=1 at import, triton.language itself is interpreted: the kernel runs in
    the interpreter (checked against PyTorch) and aot_compile compiles it in a child process."""
    script = textwrap.dedent(f"""
        import importlib.util, sys
        import torch, triton
        spec = importlib.util.spec_from_file_location("t_aot", {str(Path(__file__))!r})
        t = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(t)
        from triton.runtime.interpreter import InterpretedFunction
        assert isinstance(t.flash_fwd, InterpretedFunction)
        torch.manual_seed(0)
        q, k, v = (torch.randn(2, 128, 64).half() for _ in range(3))
        o = torch.empty_like(q)
        t.flash_fwd[(2, 2)](q, k, v, o, 0.125, 128, HEAD_DIM=64, BLOCK_M=64, BLOCK_N=32)
        ref = torch.softmax((q.float() @ k.float().transpose(1, 2)) * 0.125, -1) @ v.float()
        assert torch.allclose(o.float(), ref, atol=2e-2), (o.float() - ref).abs().max()
        r = t.compile_flash(64)
        assert r.spills == 0 and r.uses_wgmma and r.registers > 0, r.summary()
        print("OK", r.summary())
    """)
    # A fresh cache, so the rebuilt kernel goes through code generation rather than a cache hit.
    env = dict(os.environ, TRITON_INTERPRET="1", TRITON_CACHE_DIR=str(tmp_path / "cache"),
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-c", script], env=env, cwd=tmp_path, capture_output=True,
                          text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "OK flash_fwd" in proc.stdout
