"""The split key loop in machine code: the dense causal kernel compiled for sm_90 (no GPU needed) and read back
with cuobjdump (shipped with Triton). Its key loops are the backward branches around HGMMA (wgmma) tiles: the
loop over full tiles must hold no mask select (FSEL to -inf) and no division (MUFU.RCP); the diagonal loop is
masked (the test would see a mask if there were one). The score scale is one multiply: no per-element division
in any loop."""
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
    insns = _sass(rep.cubin, tmp_path)
    key_loops = []
    for lo, hi in _loops(insns):
        body = [t for a, t in insns if lo <= a <= hi]
        if any("HGMMA" in t for t in body):
            key_loops.append(body)
    assert len(key_loops) >= 2, "expected the full-tile loop and the masked diagonal loop"

    def selects(body):
        return sum(1 for t in body if "FSEL" in t and "-INF" in t)

    masked = [b for b in key_loops if selects(b)]
    full = [b for b in key_loops if not selects(b)]
    assert full and masked, [selects(b) for b in key_loops]
    for body in key_loops:
        assert not any("MUFU.RCP" in t for t in body)
    assert any("MUFU.EX2" in t for t in full[0])   # it is the softmax loop
