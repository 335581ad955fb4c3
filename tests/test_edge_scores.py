"""Scores and shapes at the edges of what the kernels emit: a score constant along a tile axis (x^0 = 1, a bias
read by one index only), integer powers of either sign of a negative base, normalised programs over no rows. Each
kernel against the float64 reference."""
import pytest
import torch

import moa

EX = "examples/"


def _rand(*shape, dtype=torch.float64):
    return torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(sum(shape))).to(dtype)


def _rel(a, b) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-300)).item()


@pytest.mark.parametrize("score", ["where(j <= i, B[j], -inf)", "B[j]", "B[i] + 0 * j", "0.5"])
@pytest.mark.parametrize("kind", ["softmax", "normalize"])
def test_scores_constant_along_a_tile_axis(score, kind):
    """The score broadcast to the tile the monoid sums and the dot takes (it was a row, a column or a scalar)."""
    if kind == "normalize":
        score = score.replace("-inf", "0").replace("B[", "exp(B[").replace("]", "])") if "B" in score else score
    src = f"""dim n, d, e
in Q[n, d], K[n, d], V[n, e], B[n]
S[i:n, j:n] = {score}
out O = {kind}(S, axis=-1) @ V"""
    k = moa.compile(src)
    for dt, tol in ((torch.float64, 1e-13), (torch.float32, 1e-5)):
        ins = dict(Q=_rand(70, 4, dtype=dt), K=_rand(70, 4, dtype=dt), V=_rand(70, 3, dtype=dt), B=_rand(70, dtype=dt))
        assert _rel(k(**ins).double(), k.reference(**ins)) <= tol, (score, dt)


@pytest.mark.parametrize("p", [0, -1, -2, -3, 17, -17])
def test_integer_powers_of_negative_bases(p):
    """(q . k)^p for integer p of either sign: products and reciprocals (a negative base gave NaN through
    exp2(p log2 x)), |x|^p with the sign of x for odd p beyond 16."""
    k = moa.compile(EX + "power.moa", p=p)
    ins = dict(Q=_rand(40, 4), K=_rand(40, 4), V=_rand(40, 3))
    out, ref = k(**ins), k.reference(**ins)
    assert not out.isnan().any() and _rel(out, ref) <= 1e-12, p


@pytest.mark.parametrize("name", ["linear", "power", "power_gated"])
def test_normalised_programs_over_no_rows(name):
    """n = 0: an empty output (the form choice's cost model divided by a launch of no program)."""
    k = moa.compile(EX + f"{name}.moa")
    ins = {t.attrs[0]: _rand(2, 0, 8) for t in k.program.inputs}
    if "G" in ins:
        ins["G"] = _rand(2, 0)
    ins["V"] = _rand(2, 0, 5)
    assert k(**ins).shape == (2, 0, 5)


_TAKE = """dim n, d, e
param t = 3
in Q[n, d], K[n, d], V[n, e]
S[i, j] = where(j <= i, dot(take(t, Q[i]), take(t, K[j])), -inf)
out O = softmax(S, axis=-1) @ V"""
_PACKED = """dim n, d, e
param h = 2
in Q[n, h * d], K[n, h * d], V[n, e]
S[a:h, i, j] = dot(reshape(Q[i], [h, d])[a], reshape(K[j], [h, d])[a]) / sqrt(d)
out O[a] = softmax(S[a], axis=-1) @ V"""


@pytest.mark.parametrize("src,width", [(_TAKE, 8), (_PACKED, 10)])
def test_contractions_over_part_of_an_axis(src, width):
    """A dot over the first t features of Q and K (take), or over one head's d = 5 features of heads packed into
    the last axis: the lanes past the contraction's extent load 0 (they read the next features, and the dot summed
    them in); the gradients too."""
    k = moa.compile(src)
    q, kk, v = _rand(2, 40, width), _rand(2, 41, width)[:, 1:], _rand(2, 40, 5)
    assert _rel(k(Q=q, K=kk, V=v), k.reference(Q=q, K=kk, V=v)) <= 1e-13
    qg, kg = q.clone().requires_grad_(), kk.clone().requires_grad_()
    k(Q=qg, K=kg, V=v).square().sum().backward()
    qr, kr = q.clone().requires_grad_(), kk.clone().requires_grad_()
    k.reference(Q=qr, K=kr, V=v).square().sum().backward()
    assert _rel(qg.grad, qr.grad) <= 1e-12 and _rel(kg.grad, kr.grad) <= 1e-12


@pytest.mark.parametrize("score", ["dot(Q[i], K[j]) + i * 1000000000 * j / 1e10",
                                   "dot(Q[i], K[j]) + (i * 100000) * (j * 100000) / 1e10",
                                   "where((i * j * 300000) % 7 == 1, dot(Q[i], K[j]), -inf)"])
def test_products_of_indices_do_not_wrap(score):
    """Tile indices are 32-bit in a kernel: a product of them (or by a large constant) is computed in 64 bits, as
    the reference does (it wrapped, or failed to build: 'Scalar 10000000000 is out of range for type int32')."""
    k = moa.compile(f"""dim n, d, e
in Q[n, d], K[n, d], V[n, e]
S[i, j] = {score}
out O = softmax(S, axis=-1) @ V""")
    ins = dict(Q=_rand(23, 4), K=_rand(23, 4), V=_rand(23, 3))
    assert _rel(k(**ins), k.reference(**ins)) <= 1e-13
