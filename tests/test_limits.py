"""Limits (issue 7.6): a kernel that cannot fit its target gets a fitting configuration or a clear MoaError,
never a raw Triton / ptxas / CUDA failure; so does a program too large or too deep for the compiler.

- Interpreter (CPU): tiles are BLOCK x padded head dim and Triton caps a tile at 2^20 elements, so the block
  sizes shrink down to 16 (head dims up to 65536 run); a larger head dim is an UnsupportedError.
- AOT (`Kernel.aot`, runtime/aot.py underneath): a head dim beyond the tile limit, or whose tiles fit no
  candidate config for sm_90, is an UnsupportedError (naming the configs tried).
- CUDA launch grid: more than 65535 programs along y (batch x leading axes) is an InputError (checked without
  a GPU through `check_grid`).
- Source size and depth: text over 2^18 characters, expressions nested beyond Python's recursion, chains of a
  few hundred operations: ParseError / UnsupportedError; constant extents over 2^31 - 1: ShapeError.
"""
from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch

import moa
from moa.runtime.tiling import MAX_TILE, Config, check_grid, fit_tiles

ROOT = Path(__file__).resolve().parent.parent
CAUSAL = moa.compile(ROOT / "examples" / "causal.moa")
H = "dim n, d\nin Q[n, d], K[n, d], V[n, d]\n"


pytestmark = pytest.mark.usefixtures("private_cache")


def rnd(*shape, seed=0, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype)


# ---- head dims on the interpreter ------------------------------------------------------------------------------

def test_fit_tiles_shrinks_blocks():
    assert fit_tiles(Config(64, 64), [128, 64], "o") == Config(64, 64)
    assert fit_tiles(Config(64, 64), [65536], "o") == Config(16, 16)
    assert fit_tiles(Config(64, 32), [16384, 64], "o") == Config(64, 32)
    assert fit_tiles(Config(128, 64), [16384], "o") == Config(64, 64)
    assert fit_tiles(Config(64, 64, 8, 3), [20000], "o") == Config(32, 32, 8, 3)   # 20000 pads to 32768
    for h in (65537, 131072, 2 ** 20, 2 ** 30):
        with pytest.raises(moa.UnsupportedError, match="head dims up to 65536 are supported"):
            fit_tiles(Config(64, 64), [h], "output O")
    assert 16 * 65536 == MAX_TILE


def test_head_dim_65536_runs_on_the_interpreter():
    """d = 65536: the default 64-row tile would hold 2^22 elements; the blocks shrink to 16 and it runs."""
    q, k, v = rnd(40, 65536, seed=1) / 16, rnd(40, 65536, seed=2) / 16, rnd(40, 24, seed=3)
    t0 = time.perf_counter()
    out = CAUSAL(Q=q, K=k, V=v)
    assert time.perf_counter() - t0 < 120
    ref = CAUSAL.reference(Q=q, K=k, V=v)
    assert ((out.double() - ref).abs().max() / ref.abs().max()) < 2e-5


@pytest.mark.parametrize("d,e", [(2 ** 20, 16), (65537, 16), (16, 2 ** 17)])
def test_head_dim_beyond_the_tile_limit_is_unsupported(d, e):
    q = rnd(4, d, dtype=torch.float16)
    v = rnd(4, e, dtype=torch.float16)
    with pytest.raises(moa.UnsupportedError) as info:
        CAUSAL(Q=q, K=q, V=v)
    msg = info.value.message
    assert "output O" in msg and "does not fit" in msg and "65536" in msg
    assert "InterpreterError" not in msg and "failed to run" not in msg


def test_huge_head_dim_with_lse_is_unsupported():
    q = rnd(3, 2 ** 18, dtype=torch.float16)
    with pytest.raises(moa.UnsupportedError, match="does not fit"):
        CAUSAL.with_lse(Q=q, K=q, V=q[:, :8].contiguous())


# ---- ahead of time (sm_90) -------------------------------------------------------------------------------------

@pytest.mark.parametrize("d", [2 ** 17, 2 ** 20])
def test_aot_huge_head_dim_is_a_clear_error(d):
    """(d = 65536 is refused as well, "does not fit on sm_90" after trying every candidate, but compiling its
    16 x 65536 candidates takes about a minute: too slow for this suite.)"""
    assert hasattr(CAUSAL, "aot"), "Kernel.aot is missing"
    t0 = time.perf_counter()
    with pytest.raises(moa.UnsupportedError) as info:
        CAUSAL.aot(target="sm_90", dtype="bf16", d=d, e=64)
    msg = info.value.message
    assert "does not fit" in msg and str(d) in msg  # the AOT search or the tile-size limit, both name d
    assert time.perf_counter() - t0 < 30


def test_aot_compile_reports_triton_failures_as_moa_errors():
    """The low-level entry point: a kernel whose tile exceeds Triton's limit, compiled for sm_90."""
    from moa.runtime.aot import aot_compile

    k = moa.compile(ROOT / "examples" / "sdpa.moa")
    from moa.runtime.tiling import Config as C

    from moa.runtime.launch import module_for

    spec = k.launcher.spec("O", "float16", 0, C(128, 64), False)
    fn = module_for(spec.source, torch.device("cuda"))._attn_fwd   # the JIT function (not interpreted)
    sig = {}
    consts = {"BLOCK_M": 128, "BLOCK_N": 64, "HEAD_DIM": 2 ** 16, "HEAD_DIM_V": 64}
    import inspect

    for p in inspect.signature(fn.fn).parameters:
        if p in consts:
            continue
        sig[p] = "*fp16" if p.endswith("_ptr") else "i32"
    with pytest.raises(moa.UnsupportedError) as info:
        aot_compile(fn, sig, consts, target="sm_90", num_warps=8, num_stages=3)
    assert "cannot compile kernel '_attn_fwd' for sm_90" in info.value.message
    assert "numel" in info.value.message or "shared memory" in info.value.message


# ---- CUDA grid -------------------------------------------------------------------------------------------------

def test_cuda_grid_limit_is_an_input_error():
    cuda = torch.device("cuda")
    check_grid((10, 65535), cuda, "output O")
    with pytest.raises(moa.InputError, match="65536 programs exceed the CUDA grid limit of 65535"):
        check_grid((10, 65536), cuda, "output O")
    with pytest.raises(moa.InputError, match="row tiles exceed"):
        check_grid((2 ** 31, 1), cuda, "output O")
    check_grid((2 ** 40, 2 ** 40), torch.device("cpu"), "output O")   # the interpreter has no grid limit


# ---- program size and depth ------------------------------------------------------------------------------------

@pytest.mark.parametrize("text,cls,fragment", [
    (H + "out O = Q" + " + 0" * 70_000 + "\n", moa.ParseError, "characters long; at most 262144"),
    (H + "out O = " + "-" * 10_000 + "Q\n", moa.ParseError, "nested too deeply"),
    (H + "out O = where(" + "not " * 5_000 + "1 < 2, Q, Q)\n", moa.ParseError, "nested too deeply"),
    (H + "out O = " + " + ".join(["Q"] * 3_000) + "\n", moa.ParseError, "nested too deeply"),
    (H + "X0 = Q\n" + "".join(f"X{i + 1} = X{i} + 1\n" for i in range(600)) + "out O = X600\n",
     moa.UnsupportedError, "too deeply nested for psi-reduction"),
    (H + "out O = sum(iota(2147483648))\n", moa.ShapeError, "more than 2^31 - 1"),
    ("dim n\nin Q[n, 4294967296]\nout O = Q\n", moa.ShapeError, "more than 2^31 - 1"),
    ("dim n\nparam w = 3000000000\nin Q[n, w]\nout O = Q\n", moa.ShapeError, "more than 2^31 - 1"),
    ("dim n\nin Q[n]\nX[i:4294967296] = i\nout O = X\n", moa.ShapeError, "more than 2^31 - 1"),
    (H + "out O = Q" + " ^ 2" * 200 + "\n", moa.ShapeError, "overflows int64"),
])
def test_size_and_depth_limits(text, cls, fragment):
    t0 = time.perf_counter()
    with pytest.raises(cls) as info:
        moa.compile(text)
    assert fragment in info.value.message, info.value.message
    assert time.perf_counter() - t0 < 5


def test_large_but_reasonable_programs_compile():
    moa.compile(H + "out O = " + "(" * 2_000 + "Q" + ")" * 2_000 + "\n")
    moa.compile("dim " + ", ".join(f"x{i}" for i in range(500)) + "\nin Q[x0]\nout O = Q\n")
    moa.compile("# comment\n" * 10_000 + H + "out O = Q\n")
    moa.compile("dim n\nin Q[" + ", ".join(["n"] * 40) + "]\nout O = Q.T\n")
    moa.compile(H + "X0 = Q\n" + "".join(f"X{i + 1} = X{i} + 1\n" for i in range(150)) + "out O = X150\n")
    moa.compile("dim n\nin Q[n, 2147483647]\nout O = Q\n")
