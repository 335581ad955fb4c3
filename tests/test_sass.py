"""The split key loop in machine code: the dense causal kernel compiled for sm_90 (no GPU needed) and read back
with cuobjdump (shipped with Triton). Its key loops are the backward branches around HGMMA (wgmma) tiles: the
loop over full tiles must hold no mask select (FSEL to -inf) and no division (MUFU.RCP); the diagonal loop is
masked (the test would see a mask if there were one). The score scale is one multiply: no per-element division
in any loop, and in the full-tile loop no multiply of its own either (the row max is taken over qk and scaled once
per row; the exponent's argument qk * qk_scale - m is one FFMA)."""
import re
import subprocess
from pathlib import Path

import pytest

import moa
from moa.runtime import aot as A

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
_INSN = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")
_BRA = re.compile(r"BRA\s+(?:`\(\.L_x_\d+\)|0x([0-9a-f]+))")


def _sass(cubin: bytes, tmp_path) -> list[tuple[int, str]]:
    exe = A._tool("cuobjdump")
    if exe is None:
        pytest.skip("Triton's cuobjdump is not available")
    path = tmp_path / "k.cubin"
    path.write_bytes(cubin)
    out = subprocess.run([exe, "-sass", str(path)], capture_output=True, text=True, check=True).stdout
    return [(int(m.group(1), 16), m.group(2)) for m in _INSN.finditer(out)]


def _key_loops(cubin: bytes, tmp_path) -> tuple[list, list]:
    """(full, masked): the instruction texts of the key loops (loops around HGMMA tiles) without and with a mask
    select (FSEL to -inf)."""
    insns = _sass(cubin, tmp_path)
    key_loops = []
    for lo, hi in _loops(insns):
        body = [t for a, t in insns if lo <= a <= hi]
        if any("HGMMA" in t for t in body):
            key_loops.append(body)
    masked = [b for b in key_loops if _selects(b)]
    return [b for b in key_loops if not _selects(b)], masked


def _selects(body) -> int:
    return sum(1 for t in body if "FSEL" in t and "-INF" in t)


def _opcode(text: str) -> str:
    """FMUL of '@P0 FMUL.FTZ R1, R2, R3' (predicate and modifiers dropped)."""
    return re.sub(r"^@!?U?P\w+\s+", "", text).split()[0].split(".")[0]


def _loops(insns):
    """(start, end) address ranges of loops: a branch back to an earlier address."""
    out = []
    for addr, text in insns:
        m = _BRA.search(text)
        if m and m.group(1) and int(m.group(1), 16) < addr:
            out.append((int(m.group(1), 16), addr))
    return out


@pytest.mark.parametrize("d", [64, 128])
def test_the_full_tile_loop_has_no_mask_and_no_division(tmp_path, d):
    k = moa.compile(EXAMPLES / "causal.moa")
    rep = k.aot(dtype="bf16", n=4096, d=d, e=d)
    full, masked = _key_loops(rep.cubin, tmp_path)
    assert len(full) + len(masked) >= 2, "expected the full-tile loop and the masked diagonal loop"
    assert full and masked, [_selects(b) for b in full + masked]
    key_loops = full + masked
    for body in key_loops:
        assert not any("MUFU.RCP" in t for t in body)
    assert any("MUFU.EX2" in t for t in full[0])   # it is the softmax loop


@pytest.mark.parametrize("d", [64, 128])
def test_the_score_scale_costs_no_multiply_per_element(tmp_path, d):
    """Per thread, a 128 x 64 tile with 8 warps holds 32 scores and the 128 x d accumulator d / 2 elements: the
    full-tile loop's FMULs are the accumulator's rescale by alpha (and a few per row), not one per score."""
    k = moa.compile(EXAMPLES / "causal.moa")
    rep = k.aot(dtype="bf16", n=4096, d=d, e=d)
    assert (rep.block_m, rep.block_n, rep.num_warps) == (128, 64, 8)
    full, _ = _key_loops(rep.cubin, tmp_path)
    ops = [_opcode(t) for t in full[0]]
    scores, acc = 128 * 64 // 256, 128 * d // 256
    assert ops.count("FFMA") >= scores          # qk * qk_scale - m, fused
    assert ops.count("FMUL") <= acc + 4, ops.count("FMUL")


@pytest.mark.parametrize("name", ["alibi", "gqa_alibi"])
def test_a_score_modifier_affine_in_the_key_costs_two_flops_per_element(tmp_path, name):
    """ALiBi's slope * (j - i) is affine in the key index: its slope and the value at each tile's first key are
    computed before the loop and once per row of a tile (codegen/affine.py), so a score element costs
    qk * qk_scale + (offs_nf * slope + tile bias), two FFMAs, and the exponent's s - m one FADD, where causal's
    element is one FFMA: at most two float instructions per score beyond causal's, and no int -> float
    conversion per element (one per row of the thread's tile; 548 -> 441 instructions per thread at d = 128)."""
    d = 128
    rep = moa.compile(EXAMPLES / f"{name}.moa").aot(dtype="bf16", n=4096, d=d, e=d)
    base = moa.compile(EXAMPLES / "causal.moa").aot(dtype="bf16", n=4096, d=d, e=d)
    assert (rep.block_m, rep.block_n, rep.num_warps) == (base.block_m, base.block_n, base.num_warps) == (128, 64, 8)
    full, _ = _key_loops(rep.cubin, tmp_path)
    causal, _ = _key_loops(base.cubin, tmp_path)
    ops, ref = [_opcode(t) for t in full[0]], [_opcode(t) for t in causal[0]]
    scores, acc, rows = 128 * 64 // 256, 128 * d // 256, 2   # per thread: a wgmma m64 tile gives a thread 2 rows

    def flops(xs):
        return sum(xs.count(op) for op in ("FMUL", "FFMA", "FADD"))

    assert sum(ops.count(op) for op in ("I2F", "I2FP")) <= rows, [t for t in full[0] if t.startswith("I2F")]
    assert ops.count("FMUL") <= acc + 4, ops.count("FMUL")
    assert flops(ops) <= flops(ref) + 2 * scores + 4, (flops(ops), flops(ref))
    assert len(ops) <= len(ref) + 2 * scores + 8, (len(ops), len(ref))
