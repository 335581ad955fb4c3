"""where(c, a, b) inside an index, over index conditions (a Piecewise index expression): bidirectional relative
position buckets as T5 and Shaw et al. write them, bias[h, where(j > i, nb, 0) + min(abs(i - j), nb - 1)].
Kernels, gradients, decoding and the cost model against an independent PyTorch oracle in float64."""
from pathlib import Path

import pytest
import sympy as sp
import torch

import moa
from moa import symbolic as sy
from moa.errors import InputError, UnsupportedError

F64 = torch.float64
BUCKETS = """
dim h, n, d, e
param nb = 8
in Q[h, n, d], K[h, n, d], V[h, n, e], bias[h, 2 * nb]
S[a, i, j] = dot(Q[a, i], K[a, j]) / sqrt(d) + bias[a, where(j > i, nb, 0) + min(abs(i - j), nb - 1)]
out O[a] = softmax(S[a], axis=-1) @ V[a]
"""


def _inputs(n=70, h=2, nb=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return dict(Q=torch.randn(2, h, n, 8, generator=g, dtype=F64), K=torch.randn(2, h, n, 8, generator=g, dtype=F64),
                V=torch.randn(2, h, n, 4, generator=g, dtype=F64), bias=torch.randn(h, 2 * nb, generator=g, dtype=F64))


def _oracle(Q, K, V, bias, nb=8):
    n = Q.shape[-2]
    i, j = torch.arange(n)[:, None], torch.arange(n)[None, :]
    bucket = torch.where(j > i, nb, 0) + (i - j).abs().clamp(max=nb - 1)
    s = Q @ K.transpose(-1, -2) / Q.shape[-1] ** 0.5 + bias[:, bucket]
    return torch.softmax(s, -1) @ V


def test_bidirectional_buckets_forward_and_gradients():
    k = moa.compile(BUCKETS)
    ins = _inputs()
    out = k(**ins)
    torch.testing.assert_close(out, _oracle(**ins), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out, k.reference(**ins), rtol=1e-12, atol=1e-12)
    cot = torch.randn(out.shape, generator=torch.Generator().manual_seed(5), dtype=F64)
    mine = {x: t.clone().requires_grad_() for x, t in ins.items()}
    theirs = {x: t.clone().requires_grad_() for x, t in ins.items()}
    (k(**mine) * cot).sum().backward()
    (_oracle(**theirs) * cot).sum().backward()
    for x in ins:
        torch.testing.assert_close(mine[x].grad, theirs[x].grad, rtol=1e-11, atol=1e-11)
    assert "tl.where(" in k.source(dtype="float32")   # the index, computed per element in the kernel


def test_the_cost_model_counts_what_the_kernel_does():
    k = moa.compile(BUCKETS)
    m = k.measure(**_inputs(n=100))
    c = k.cost(dtype="fp64", device="cpu", batch=(2,), h=2, n=100, d=8, e=4)
    assert (c.flops, c.dram_bytes, c.tiles_visited) == (m.flops, m.dram_bytes, m.tiles_visited)


def test_decoding_reads_the_buckets_of_the_last_rows():
    k = moa.compile(BUCKETS)
    ins = _inputs(n=90)
    got = k.decode(Q=ins["Q"][..., -3:, :], K=ins["K"], V=ins["V"], bias=ins["bias"], splits=2)
    torch.testing.assert_close(got, _oracle(**ins)[..., -3:, :], rtol=1e-12, atol=1e-12)


def test_a_bucket_past_the_table_is_refused_with_the_index_shown():
    k = moa.compile(BUCKETS.replace("bias[h, 2 * nb]", "bias[h, nb]"))
    ins = _inputs()
    ins["bias"] = ins["bias"][:, :8]
    with pytest.raises(InputError, match=r"bias\[:, where\(i < j, 8, 0\) \+ Min\(7, Abs\(i - j\)\)\] reaches index 15"):
        k(**ins)
    i, j = sp.symbols("i j", integer=True)
    assert sy.show(sp.Piecewise((8, sp.And(i < j, i > 3)), (0, True))) == "where(i > 3 and i < j, 8, 0)"


def test_a_condition_or_value_that_reads_data_is_still_a_gather():
    for index in ("where(flag[j], 1, 0)", "where(j > i, pos[j], 0)"):
        with pytest.raises(UnsupportedError, match="a gather"):
            moa.compile(f"dim n, d, e\nin Q[n, d], K[n, d], V[n, e], bias[4], flag[n]: bool, pos[n]: int\n"
                        f"S[i, j] = dot(Q[i], K[j]) + bias[{index}]\nout O = softmax(S, axis=-1) @ V")


@pytest.mark.parametrize("index", ["where(j > i, 30, 0) // 2", "where(j > i, 31, 0) // 2",
                                   "where(j > i, 2 * j, 0) // 2 % 16"])
def test_divisions_of_a_where_stay_integer(index):
    """where(j > i, 30, 0) // 2: sympy drops the floor of a division exact in every branch, which printed as a
    float division (a float pointer offset; found by a helper): the division goes into the branches."""
    k = moa.compile(f"dim n, d, e\nin Q[n, d], K[n, d], V[n, e], bias[16]\n"
                    f"S[i, j] = dot(Q[i], K[j]) + bias[{index}]\nout O = softmax(S, axis=-1) @ V")
    g = torch.Generator().manual_seed(4)
    ins = dict(Q=torch.randn(20, 8, generator=g, dtype=F64), K=torch.randn(20, 8, generator=g, dtype=F64),
               V=torch.randn(20, 4, generator=g, dtype=F64), bias=torch.randn(16, generator=g, dtype=F64))
    torch.testing.assert_close(k(**ins), k.reference(**ins), rtol=1e-12, atol=1e-12)


def test_the_range_check_bounds_each_branch_where_it_is_taken():
    """where(j <= i, i - j, j - i - 1) stays in 0 .. n - 1; past 2^22 index points the check bounded the where by
    the hull of its branches over the whole box and refused n > 2048 (found by a helper): each branch is bounded
    where its condition holds now. One that does leave the table is still refused."""
    def bind(index, n):
        k = moa.compile(f"dim n, d, e\nin Q[n, d], K[n, d], V[n, e], bias[n]\n"
                        f"S[i, j] = dot(Q[i], K[j]) + bias[{index}]\nout O = softmax(S, axis=-1) @ V")
        z = torch.zeros(n, 1, dtype=F64)
        return k.bind(dict(Q=z, K=z, V=z, bias=z[:, 0]))

    for n in (2048, 2049, 5000):
        bind("where(j <= i, i - j, j - i - 1)", n)
    with pytest.raises(InputError, match="index -1"):
        bind("where(j <= i, i - j, j - i - 2)", 5000)
    # a condition with a fractional bound (2 i < n is i < n / 2): i = 1500 reads bias[3001] at n = 3001, and a
    # strict d < 0 is d <= -1 only in integer coefficients (it was accepted: found by a helper)
    with pytest.raises(InputError, match="index 3001"):
        bind("where(2 * i < n, 2 * i + 1, j)", 3001)
    with pytest.raises(InputError, match="index -1"):
        bind("where(2 * i > n, 2 * i - n - 2, j)", 3001)
    bind("where(2 * i < n, 2 * i, j)", 3001)


def test_the_reference_names_the_index_a_guarded_read_reaches():
    """A head read K[where(a < g, a, a - g), j] under a mask, past the K heads: the reference named index 0 (the
    smallest index, where the guard broadcast past the index's axes); it names 2, as the call's check does."""
    k = moa.compile("dim h, g, n, d, e\nin Q[h, n, d], K[g, n, d], V[g, n, e]\n"
                    "S[a, i, j] = where(j <= i, dot(Q[a, i], K[where(a < g, a, a - g), j]), -inf)\n"
                    "out O[a] = softmax(S[a], axis=-1) @ V[where(a < g, a, a - g)]")
    g = torch.Generator().manual_seed(6)
    ins = dict(Q=torch.randn(5, 8, 4, generator=g, dtype=F64), K=torch.randn(2, 8, 4, generator=g, dtype=F64),
               V=torch.randn(2, 8, 4, generator=g, dtype=F64))
    for f in (k, k.reference):
        with pytest.raises(InputError, match="index 2"):
            f(**ins)


def _t5_bucket(rel, num_buckets=32, max_distance=128):
    """T5's bidirectional relative position bucket of rel = j - i (its float32 logarithm, as T5 computes it)."""
    half = num_buckets // 2
    exact = half // 2
    n = rel.abs()
    large = exact + (torch.log(n.float() / exact) / torch.log(torch.tensor(max_distance / exact)) *
                     (half - exact)).long()
    return (rel > 0).long() * half + torch.where(n < exact, n, large.clamp(max=half - 1))


def test_t5_logarithmic_buckets_written_as_steps():
    """docs/variants.md's T5 program: the steps of T5's bucket function make its logarithmic buckets integer index
    arithmetic; equal to softmax(QK^T + bias[a, bucket(j - i)]) V in float64, forward and the bias gradient."""
    text = (Path(__file__).resolve().parents[1] / "docs" / "variants.md").read_text()
    src = text.split("`max_exact` = 8 are at")[1].split("```\n")[1]
    rel = torch.arange(1, 400)
    steps = [int(x) for x in rel[1:][_t5_bucket(rel)[1:] != _t5_bucket(rel)[:-1]] if x > 8]
    assert steps == [12, 16, 23, 32, 46, 64, 91] and src.count(">= ") == len(steps)
    assert all(f"where(abs(j - i) >= {x}, 1, 0)" in src for x in steps)
    k = moa.compile(src)
    g = torch.Generator().manual_seed(9)
    n = 150
    x = {a: torch.randn(2, n, 8, generator=g, dtype=F64, requires_grad=True) for a in ("Q", "K", "V")}
    x["bias"] = torch.randn(2, 32, generator=g, dtype=F64, requires_grad=True)
    i, j = torch.arange(n)[:, None], torch.arange(n)[None, :]
    want = torch.softmax(x["Q"] @ x["K"].transpose(-1, -2) + x["bias"][:, _t5_bucket(j - i)], -1) @ x["V"]
    got = k(**x)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    cot = torch.randn(got.shape, generator=g, dtype=F64)
    gw = torch.autograd.grad((want * cot).sum(), x["bias"])[0]
    gg = torch.autograd.grad((got * cot).sum(), x["bias"])[0]
    torch.testing.assert_close(gg, gw, rtol=1e-11, atol=1e-11)


def test_a_float_index_points_at_the_step_form():
    from moa.errors import ShapeError

    with pytest.raises(ShapeError, match="T5's logarithmic buckets, is a sum of where"):
        moa.compile(BUCKETS.replace("min(abs(i - j), nb - 1)", "min(nb - 1, log(abs(i - j) + 1))"))
