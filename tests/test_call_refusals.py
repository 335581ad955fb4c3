"""Refusals of serving and training calls in the user's own terms (found by helpers acting as users): decode and
varlen name the program's inputs and dims (not the block program's), the paged reference checks its table, the
decode cost refuses what decode refuses, and a forced linear form is refused with or without gradients."""
import numpy as np
import pytest
import torch

import moa
from moa.errors import InputError, UnsupportedError
from moa.runtime.decode_cost import decode_cost
from test_paged_language import PAGED  # the language's paged cache: K[page[j // P], j % P]

F64 = torch.float64
EX = "examples/"
FLAGGED = """
dim n, m, d, e
in Q[n, d], K[m, d], V[m, e]
in kf[m]: bool
S[i, j] = where(kf[j] and j <= i + m - n, dot(Q[i], K[j]) / sqrt(d), -inf)
out O = softmax(S, axis=-1) @ V
"""


def _r(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


def test_decode_and_varlen_name_the_programs_inputs_and_dims():
    k = moa.compile(FLAGGED)
    q, kk, v = _r(1, 8), _r(64, 8, seed=1), _r(64, 8, seed=2)
    short = torch.ones(63, dtype=torch.bool)
    with pytest.raises(InputError) as plain:
        k(Q=q, K=kk, V=v, kf=short)
    with pytest.raises(InputError) as dec:
        k.decode(Q=q, K=kk, V=v, kf=short)
    assert "dim m is 64" in str(plain.value)
    assert str(dec.value).startswith("decode: dim m is 64 from the query and key inputs but 63 from input kf")
    assert "_local" not in str(dec.value)
    for call in (lambda: k.decode(Q=q, K=kk, V=v), lambda: k.varlen([0, 1], [0, 64], Q=q, K=kk, V=v)):
        with pytest.raises(InputError) as e:
            call()
        assert str(e.value) == "missing input kf; <source> takes Q, K, V, kf"
    with pytest.raises(InputError, match=r"^varlen: dim m is 64 .* 63 from input kf"):
        k.varlen([0, 1], [0, 64], Q=q, K=kk, V=v, kf=short)
    # one dim for both axes: its query rows and its keys are told apart
    s = moa.compile("dim n, d, e\nin Q[n, d], K[n, d], V[n, e], kf[n]: bool\n"
                    "S[i, j] = where(kf[j] and j <= i, dot(Q[i], K[j]), -inf)\nout O = softmax(S, axis=-1) @ V")
    with pytest.raises(InputError, match=r"dim n \(the keys\) is 64 .* 63 from input kf"):
        s.decode(Q=q, K=kk, V=v, kf=short)


def test_varlen_takes_page_size_as_decode_does():
    k = moa.compile(EX + "causal_bottom_right.moa")
    q, kk, v = _r(2, 8), _r(64, 8, seed=1), _r(64, 8, seed=2)
    table = torch.tensor([[0, 1], [2, 3]])
    want = k.varlen([0, 1, 2], [0, 20, 40], Q=q, K=kk, V=v, block_table=table, page_size=16)
    for ps in (np.int64(16), torch.tensor(16)):
        got = k.varlen([0, 1, 2], [0, 20, 40], Q=q, K=kk, V=v, block_table=table, page_size=ps)
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    for ps in (16.0, True, torch.tensor(16.0)):
        with pytest.raises(InputError, match="varlen: page_size must be a positive integer"):
            k.varlen([0, 1, 2], [0, 20, 40], Q=q, K=kk, V=v, block_table=table, page_size=ps)


def test_the_paged_reference_checks_its_block_table():
    k = moa.compile(PAGED)
    ins = dict(Q=_r(1, 8), Kc=_r(4, 16, 8, seed=1), Vc=_r(4, 16, 8, seed=2))
    for bad, shown in (([4, 0], "0 .. 4"), ([0, -1], "-1 .. 0")):
        for call in (k, k.reference):
            with pytest.raises(InputError, match="entries must be pages 0 .. 3"):
                call(**ins, page=torch.tensor(bad))
        with pytest.raises(InputError, match=f"got {shown}"):
            k.reference(**ins, page=torch.tensor(bad))
    with pytest.raises(InputError, match="must be an integer tensor"):
        k.reference(**ins, page=torch.tensor([1.0, 2.0]))
    torch.testing.assert_close(k.reference(**ins, page=torch.tensor([3, 1])), k(**ins, page=torch.tensor([3, 1])),
                               rtol=1e-12, atol=1e-12)


def test_decode_cost_refuses_what_decode_refuses():
    k = moa.compile(EX + "causal_bottom_right.moa")
    g = moa.compile(EX + "gqa_alibi.moa")
    s = moa.compile(EX + "sliding_window.moa")
    cases = [(lambda: decode_cost(k, 0, 50, d=8, e=8), "nq and m must be at least 1"),
             (lambda: decode_cost(k, 1, 500, splits=2.5, d=8, e=8), "splits must be a positive integer"),
             (lambda: decode_cost(k, 1, 500, splits=0, d=8, e=8), "splits must be a positive integer"),
             (lambda: decode_cost(k, 1, 480, page_size=24, d=8, e=8), "power of two >= 16"),
             (lambda: decode_cost(k, 1, 480, page_size=1, d=8, e=8), "power of two >= 16"),
             (lambda: decode_cost(g, 1, 64, h=6, g=4, d=8, e=8), "reaches index 5"),
             (lambda: decode_cost(s, 5, 3, d=8, e=8), "nq <= m"),
             (lambda: decode_cost(s, 5, 64, cache_len=[3], d=8, e=8), "below the 5 query rows"),
             (lambda: decode_cost(k, 3, 30, batch=(2,), cache_len=torch.tensor([30., 20.]), d=8, e=8),
              "cache_len must be a positive integer, got 30.0"),
             (lambda: decode_cost(k, 3, 32, block_table=torch.tensor([[0, 1]]), d=8, e=8), "needs both block_table"),
             (lambda: decode_cost(k, 3, 30, batch=(-2,), d=8, e=8), "got batch -2"),
             (lambda: decode_cost(k, 3, 30, d=-1, e=8), "got d=-1"),
             (lambda: decode_cost(k, 3, 30, d=8, e=8, zz=3),
              "decode_cost: unknown dim zz; causal_bottom_right.moa has n, m, d, e"),
             (lambda: k.cost(n=4, m=4, d=-1, e=8), "got d=-1"),
             (lambda: k.cost(n=1.5, m=4, d=8, e=8), "got n=1.5"),
             (lambda: k.cost(n=4, m=4, d=8, e=8, batch=2.5), "got batch 2.5"),
             (lambda: k.cost(n=4, m=4, d=8, e=8, batch=(True,)), "got batch True"),
             (lambda: decode_cost(k, 1, 8192, d=128.0, e=128), "got d=128.0")]
    for call, why in cases:
        with pytest.raises(InputError, match=why):
            call()
    # and decode itself, at the same arguments
    with pytest.raises(InputError, match="reaches index 5"):
        g.decode(Q=_r(6, 1, 8), K=_r(4, 64, 8), V=_r(4, 64, 8))
    # 3 splits of 4 key tiles of 128 are whole tiles: 2 tiles per split, so 2 splits hold the 500 keys
    assert decode_cost(k, 1, 500, splits=np.int64(3), d=8, e=8).splits == 2
    assert decode_cost(g, 1, 64, h=8, g=4, d=8, e=8).splits >= 1


def test_a_forced_linear_form_is_refused_with_gradients_too():
    k = moa.compile(EX + "causal.moa", form="linear")   # softmax: no linear form
    ins = dict(Q=_r(20, 4), K=_r(20, 4, seed=1), V=_r(20, 3, seed=2))
    with pytest.raises(UnsupportedError, match="form='linear' for output O") as plain:
        k(**ins)
    grads = {x: t.clone().requires_grad_() for x, t in ins.items()}
    with pytest.raises(UnsupportedError) as trained:
        k(**grads)
    assert str(trained.value) == str(plain.value)
    with pytest.raises(UnsupportedError, match="form='linear' for output O"):
        k.with_lse(**grads)
    lin = moa.compile(EX + "linear.moa", form="linear")   # has a linear form: trains
    lin(**grads).sum().backward()
    assert grads["Q"].grad is not None


@pytest.mark.parametrize("src,why", [
    ("dim n, d, e\nin Q[n, d], K[n, d], V[n, e]\nout O = (softmax(Q @ K.T, axis=-1) @ V).T",
     "the score reads the output's last index"),
    ("dim n, d, e\nin Q[n, d], K[n, d], V[n, e]\nS[i, j] = where(j <= i, dot(Q[i], K[j]), -inf)\n"
     "X = softmax(S, axis=-1) @ V\nout O[i] = X[i] / sqrt(sum(X[i] * X[i]) + 1)",
     "an epilogue summing over the output's columns"),
    ("dim n, d, e\nin Q[n, d], K[n, d], V[n, e]\n"
     "S[i, j] = where(dot(elu(Q[i]) + 1, elu(K[j]) + 1) > -1.0, dot(Q[i], K[j]), -inf)\n"
     "out O = softmax(S, axis=-1) @ V",
     "two contractions"),
    ("dim n, d, e\nin Q[n, d], K[n, d], V[n, e]\n"
     "S[i, j] = where(j <= i, dot(Q[i], K[j]) * sum(K[j] * max(K[j], axis=0)), -inf)\nout O = softmax(S, axis=-1) @ V",
     "a reduction nested in another.*compute the inner one before the call"),
    ("dim n, d, e\nin Q[n, d], K[n, d], V[n, e]\nD[i, j] = where(j <= i, abs(dot(Q[i], K[j])), 0)\n"
     "out O[i] = (D[i] @ V) / (sum(D[i], axis=-1) + 1)",
     r"outside a softmax/normalize contraction: \+red_\{r < n\} where.*a sum of weights over the keys"),
])
def test_unsupported_output_shapes_say_what_the_user_wrote(src, why):
    with pytest.raises(UnsupportedError, match=why):
        moa.compile(src)(Q=_r(9, 4), K=_r(9, 4, seed=1), V=_r(9, 3, seed=2))


def test_param_overrides_and_names_moa_compile_takes_itself():
    sw = open(EX + "sliding_window.moa").read()
    for bad in (2 ** 63, -2 ** 63, 10 ** 30):   # -2^63 too: a literal's magnitude is at most 2^63 - 1
        with pytest.raises(InputError, match="does not fit in a 64-bit integer"):
            moa.compile(sw, w=bad)
    assert moa.compile(sw, w=1 - 2 ** 63).program.param_values["w"] == 1 - 2 ** 63
    assert moa.compile(sw, w=np.int64(3)).program.param_values["w"] == 3   # numpy scalars are numbers
    assert moa.compile(sw, w=np.float32(2.5)).program.param_values["w"] == 2.5
    for name in ("form", "schedule", "autotune"):
        with pytest.raises(moa.ParseError, match=f"a param cannot be named '{name}'") as e:
            moa.compile(f"dim n, d, e\nparam {name} = 2\nin Q[n, d], K[n, d], V[n, e]\n"
                        f"out O = softmax(Q @ K.T * {name}, axis=-1) @ V")
        assert e.value.loc is not None and e.value.loc.line == 2
    k = moa.compile("dim n, d, e\nparam source_or_path = 2\nin Q[n, d], K[n, d], V[n, e]\n"
                    "out O = softmax(Q @ K.T * source_or_path, axis=-1) @ V", source_or_path=3)
    assert k.program.param_values["source_or_path"] == 3


def test_every_call_method_refuses_positional_inputs_and_meta_tensors():
    k = moa.compile(EX + "causal.moa")
    q = _r(5, 4)
    calls = {"reference": k.reference, "dnf_reference": k.dnf_reference, "with_lse": k.with_lse, "plan": k.plan,
             "measure": k.measure, "call": k}
    for name, f in calls.items():
        with pytest.raises(InputError, match="pass the inputs by name"):
            f(q, q, q)
            pytest.fail(name)
    meta = {x: torch.empty(5, 4, device="meta", dtype=F64) for x in ("Q", "K", "V")}
    for name, f in calls.items():
        if name in ("plan", "measure"):   # what would run (no values needed); measure asks for CPU tensors
            continue
        with pytest.raises(InputError, match="tensors on meta are not supported"):
            f(**meta)
            pytest.fail(name)


def test_cli_params_within_int64_magnitude(capsys):
    from moa.cli import main
    assert main(["explain", EX + "sliding_window.moa", "--param", f"w={1 - 2 ** 63}"]) == 0
    capsys.readouterr()
    for bad in (2 ** 63, -2 ** 63):
        assert main(["explain", EX + "sliding_window.moa", "--param", f"w={bad}"]) == 2
        assert "magnitude at most 2^63 - 1" in capsys.readouterr().err


def test_a_boolean_output_is_a_bool_tensor_as_in_the_reference():
    k = moa.compile("dim n, d, e\nin Q[n, d], K[n, d], V[n, e]\nS[i, j] = where(j <= i, dot(Q[i], K[j]), -inf)\n"
                    "out O = (softmax(S, axis=-1) @ V) > 0")
    ins = dict(Q=_r(30, 4), K=_r(30, 4, seed=1), V=_r(30, 3, seed=2))
    out, ref = k(**ins), k.reference(**ins)
    assert out.dtype == ref.dtype == torch.bool and torch.equal(out, ref)
    dec = k.decode(Q=ins["Q"][27:29], K=ins["K"][:29], V=ins["V"][:29])   # decode (the last rows) and varlen
    assert dec.dtype == torch.bool and torch.equal(dec, k.reference(Q=ins["Q"][:29], K=ins["K"][:29],
                                                                    V=ins["V"][:29])[-2:])
    var = k.varlen([0, 30], [0, 30], **ins)
    assert var.dtype == torch.bool and torch.equal(var, ref)


def test_backward_cost_names_missing_dims():
    with pytest.raises(InputError, match="backward.cost needs every dim of .*; missing e"):
        moa.compile(EX + "causal.moa").backward.cost(dict(n=40, d=16))


def test_an_input_read_by_both_indices_must_span_the_keys():
    """doc[i] == doc[j] in decode / varlen: doc passes along the keys; a shorter one was a raw RuntimeError /
    IndexError, or named the internal key copy doc_kv (found by a helper)."""
    k = moa.compile("dim n, d, e\nin Q[n, d], K[n, d], V[n, e], doc[n]: int\n"
                    "S[i, j] = where(j <= i and doc[i] == doc[j], dot(Q[i], K[j]), -inf)\n"
                    "out O = softmax(S, axis=-1) @ V")
    q, kk, v = _r(3, 8), _r(30, 8, seed=1), _r(30, 4, seed=2)
    for short in (2, 29):
        with pytest.raises(InputError, match=f"decode: input doc is read by both .* 30 entries on axis 0, got {short}"):
            k.decode(Q=q, K=kk, V=v, doc=torch.zeros(short, dtype=torch.int64))
    with pytest.raises(InputError, match="varlen: input doc is read by both .* got 4"):
        k.varlen([0, 2, 3], [0, 10, 30], Q=q, K=kk, V=v, doc=torch.zeros(4, dtype=torch.int64))


def test_grouped_heads_that_do_not_divide_say_so():
    """h = 4 query heads over g = 3 K / V heads: the grouped read a // (h // g) leaves K's axis; the message names
    the divisibility before the where(...) that would hide it."""
    k = moa.compile("examples/gqa_alibi.moa")
    x = {"Q": torch.randn(4, 10, 4, dtype=torch.float64), "K": torch.randn(3, 10, 4, dtype=torch.float64),
         "V": torch.randn(3, 10, 4, dtype=torch.float64)}
    with pytest.raises(InputError, match=r"needs h a multiple of g"):
        k(**x)
