"""Score modifiers affine in the key index (codegen/affine.py): the DNF forms recognised and refused, the code of the
key loop (no per-element conversion of j - i), and kernels outside the examples (several terms, a per-row slope, a
key-free part, an integer slope per head, the residue schedule's lifted keys) against the float64 reference. The
fp32 test runs rows far from 0 with a steep slope: there slope * j - slope * i (the key index absolute) cancels
terms of ~1e4 and misses TOL; offsets from the tile's first key keep the error at the modifier's own rounding."""
import sympy as sp
import torch

import moa
from moa import dnf as D
from moa import ir
from moa import symbolic as sy
from moa.codegen.affine import key_affine
from moa.codegen.scale import affine
from moa.onf import DotTile

try:  # pytest's default (prepend) import mode puts tests/ on sys.path
    from kernel_cases import EXAMPLES, TOL, TOL64, err, gen, randn
except ImportError:  # pragma: no cover
    from tests.kernel_cases import EXAMPLES, TOL, TOL64, err, gen, randn

I, J = sy.index_var("i"), sy.index_var("j")
H = sy.dim("h")

# several terms along j (a per-row coefficient W[i], a number), a part free of j (B[i]), ragged n != m
SEVERAL = """dim n, m, d, e
in Q[n, d], K[m, d], V[m, e], W[n], B[n]
S[i, j] = dot(Q[i], K[j]) / sqrt(d) + (B[i] - W[i] * (2 * j - i) + 0.5 * (j + 3))
out O = softmax(S, axis=-1) @ V
"""
# an integer slope per head, causal: the whole modifier is index arithmetic
STEEP = """dim h, n, d, e
in Q[h, n, d], K[h, n, d], V[h, n, e]
S[a, i, j] = where(j <= i, dot(Q[a, i], K[a, j]) * 0.125 + 4 * (a + 1) * (j - i), -inf)
out O[a] = softmax(S[a], axis=-1) @ V[a]
"""
# keys j = r + 3 b of the residue schedule: the modifier is affine in the lifted key b
STRIDED = """dim n, d, e
in Q[n, d], K[n, d], V[n, e]
S[i, j] = where((i - j) % 3 == 0, dot(Q[i], K[j]) / sqrt(d) + 0.25 * (j - i), -inf)
out O = softmax(S, axis=-1) @ V
"""


def _rest(k):
    b = k.schedules["O"].branches[0]
    return affine(b.score, DotTile(0))[1], b.var


def test_alibi_is_one_term_with_the_head_slope_as_coefficient():
    rest, j = _rest(moa.compile(EXAMPLES / "alibi.moa"))
    along, fixed, free = key_affine(rest, j)
    assert len(along) == 1 and not fixed and not free
    assert isinstance(along[0].coef, D.Op) and along[0].coef.fn == "pow"
    assert sp.expand(along[0].lin - (j - next(s for s in along[0].lin.free_symbols if s != j))) == 0


def test_terms_with_one_coefficient_merge_exactly_in_integers():
    e = D.Op("add", (D.Op("mul", (D.Index(J), D.Const(2.0)), ir.FLOAT),
                     D.Op("sub", (D.Index(3 * I), D.Op("mul", (D.Index(I), D.Index(J)), ir.INT)), ir.INT)), ir.FLOAT)
    along, fixed, free = key_affine(e, J)
    assert not free and not fixed
    assert {(t.coef, sp.expand(t.lin)) for t in along} == {(D.Const(2.0), J), (None, 3 * I - I * J)}


def test_a_modifier_not_affine_in_the_key_keeps_the_element_code():
    assert key_affine(D.Index(sp.floor(J / 2)), J) is None
    assert key_affine(D.Index(sp.Mod(J, 4) + I), J) is None
    assert key_affine(D.Index(J * J), J) is None
    assert key_affine(D.Op("exp", (D.Index(J),), ir.FLOAT), J) is None
    assert key_affine(D.Op("mul", (D.Index(J), D.Index(J - I)), ir.INT), J) is None
    assert key_affine(D.Read("W", (J,)), J) is None
    assert key_affine(D.Op("mul", (D.Read("W", (I,)), D.Index(I + H)), ir.FLOAT), J) is None   # free of j
    rest, j = _rest(moa.compile(EXAMPLES / "relative_bias.moa"))   # a table read along the keys
    assert key_affine(rest, j) is None
    for name in ("relative_bias", "softcap"):
        assert "offs_nf" not in moa.compile(EXAMPLES / f"{name}.moa").source(dtype="float32")


def test_the_key_loop_of_alibi_converts_no_index_per_element():
    for name in ("alibi", "gqa_alibi"):
        src = moa.compile(EXAMPLES / f"{name}.moa").source(dtype="bfloat16")
        loops = src.split("for start_n in range(")[1:]
        assert len(loops) == 3
        for body in loops:
            assert "s = qk * qk_scale + (offs_nf[None, :] * slope + tile_bias)" in body
            assert "offs_n[None, :] - offs_m" not in body
            assert "tile_bias = ((start_n - offs_m[:, None])).to(tl.float32) * slope" in body


def test_several_terms_and_a_row_slope_float64_and_float32():
    k = moa.compile(SEVERAL)
    g = gen("affine", "several")
    n, m, d, e = 70, 90, 16, 24
    x = dict(Q=randn(g, n, d), K=randn(g, m, d), V=randn(g, m, e), W=randn(g, n, scale=0.1), B=randn(g, n))
    ref = k.reference(**x)
    assert err(k(**x), ref) <= TOL64
    x32 = {a: t.float() for a, t in x.items()}
    assert err(k(**x32), k.reference(**x32)) <= TOL[torch.float32]


def test_the_residue_schedule_lifts_the_modifier_to_its_keys():
    k = moa.compile(STRIDED, schedule="residue")
    assert "offs_nf" in k.source(dtype="float64")
    g = gen("affine", "strided")
    x = dict(Q=randn(g, 100, 16), K=randn(g, 100, 16), V=randn(g, 100, 24))
    assert err(k(**x), k.reference(**x)) <= TOL64


def test_fp32_rows_far_from_zero_with_a_steep_slope():
    """Rows up to 2047, slope 4 log2 e per key: slope * j alone is ~1.2e4, whose fp32 ulp (1e-3) the absolute
    form slope * j - slope * i adds to every score (measured 3.4e-5 > TOL); from the tile's first key 1.2e-6."""
    k = moa.compile(STEEP)
    g = gen("affine", "steep")
    x = dict(Q=randn(g, 1, 2048, 16), K=randn(g, 1, 2048, 16), V=randn(g, 1, 2048, 16))
    x32 = {a: t.float() for a, t in x.items()}
    assert err(k(**x32), k.reference(**x32)) <= TOL[torch.float32] / 4
    small = {a: t[:, :200] for a, t in x.items()}
    assert err(k(**small), k.reference(**small)) <= TOL64
