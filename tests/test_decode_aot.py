"""The decoding grid kernel compiled ahead of time for sm_90 (runtime/decode_aot.py): what k.decode launches on
a GPU at d = 64 and 128 (bf16, GQA packed, split, paged) fits: no spills, registers and shared memory in budget."""
import pytest

import moa
from moa.runtime.decode import decode_config
from moa.runtime.decode_aot import decode_aot

GQA = """
dim h, g, n, m, d, e
in Q[h, n, d], K[g, m, d], V[g, m, e]
S[a, i, j] = dot(Q[a, i], K[a // (h // g), j]) / sqrt(d)
out O[a] = softmax(S[a], axis=-1) @ V[a // (h // g)]
"""


@pytest.mark.parametrize("d", [64, 128])
def test_gqa_decode_kernel_fits_sm90(d):
    res = decode_aot(moa.compile(GQA), 1, 32768, dtype="bf16", h=32, g=8, d=d, e=d)
    (rep, ok, why), = res.values()
    assert ok, why
    assert rep.spills == 0 and rep.block_m == 16 and rep.block_n == (128 if d == 64 else 64)


def test_gqa_alibi_paged_kernel_fits_sm90():
    res = decode_aot(moa.compile("examples/gqa_alibi.moa"), 1, 32768, dtype="bf16", mode="paged", h=32, g=8,
                     d=128, e=128)
    (rep, ok, why), = res.values()
    assert ok, why
    assert rep.spills == 0


def test_decode_config_covers_the_packed_rows():
    from moa.runtime import ring

    k = moa.compile("examples/causal_bottom_right.moa")
    _, block = ring.block_kernel(k)
    sched = block.schedules["O"]
    dims = {"n": 3, "m": 100, "d": 128, "e": 128, "n_local": 3, "m_local": 100, "row0_1": 1, "col0_1": 1}
    assert (decode_config(sched, dims, "bfloat16").block_m, decode_config(sched, dict(dims, n_local=40),
                                                                          "bfloat16").block_m) == (16, 64)


@pytest.mark.parametrize("mode", ["varlen", "lengths"])
def test_varlen_and_valid_length_kernels_fit_sm90(mode):
    res = decode_aot(moa.compile(GQA), 1, 32768, dtype="bf16", mode=mode, h=32, g=8, d=128, e=128)
    (rep, ok, why), = res.values()
    assert ok, why
