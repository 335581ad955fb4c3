"""Runtime inputs (issue 7.3): every bad call is a moa.InputError naming the input and the expectation; every
legal but unusual call (non-contiguous views, broadcast batch axes, empty extents, NaN / inf values) gives the
reference's result. Element offsets beyond 2^31 are refused, computed from shapes and strides only (meta
tensors: nothing is allocated).

PyTorch has no negative strides: `t.flip(0)` is a copy, so "negative-stride views" are tested as flipped
copies (legal, exact); `as_strided` with a negative stride is refused by torch itself.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import moa
from moa.runtime.binding import INT32_MAX

ROOT = Path(__file__).resolve().parent.parent
CAUSAL = moa.compile(ROOT / "examples" / "causal.moa")           # Q[n, d], K[n, d], V[n, e]
SDPA = moa.compile(ROOT / "examples" / "sdpa.moa")               # Q[n, d], K[m, d], V[m, e]
DOC = moa.compile(ROOT / "examples" / "document_mask.moa")       # ... doc[n]: int
MASKED = moa.compile("""dim n, d, e
in Q[n, d], K[n, d], V[n, e], M[n, n]: bool
S[i, j] = where(M[i, j], dot(Q[i], K[j]) / sqrt(d), -inf)
out O = softmax(S, axis=-1) @ V
""")
GUARDED = moa.compile("""dim n, m, d
in Q[n, d], K[m, d], V[m, d]
out O = softmax(Q @ K.T + Q @ Q.T, axis=-1) @ V
""")
UNBOUND = moa.compile("""dim n, d, w
in Q[n, d], K[n, d], V[n, d]
S[i, j] = where(j <= i and i - j < w, dot(Q[i], K[j]), -inf)
out O = softmax(S, axis=-1) @ V
""")
HALVED = moa.compile("""dim n, d, e
in Q[n, d], K[n, d], V[n, e // 2]
out O = softmax(Q @ K.T, axis=-1) @ V
""")
SELF = moa.compile("""dim n, d
in self[n, d], K[n, d], V[n, d]
out O = softmax(self @ K.T, axis=-1) @ V
""")


pytestmark = pytest.mark.usefixtures("private_cache")


def r(*shape, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed + sum(shape) * 7 + len(shape))
    return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)


def qkv(n=9, d=5, e=6, batch=(), dtype=torch.float64):
    return {"Q": r(*batch, n, d, dtype=dtype, seed=1), "K": r(*batch, n, d, dtype=dtype, seed=2),
            "V": r(*batch, n, e, dtype=dtype, seed=3)}


def meta(*shape, dtype=torch.float16):
    return torch.empty(*shape, dtype=dtype, device="meta")


def doc_ids(n, dtype=torch.int64):
    return (torch.arange(n) // 3).to(dtype)


# ---- bad calls: (kernel, inputs, message fragments) -----------------------------------------------------------

def _bad_calls():
    x = qkv()
    cases = {
        "missing-V": (CAUSAL, {"Q": x["Q"], "K": x["K"]}, ["missing input V", "takes Q, K, V"]),
        "missing-all": (CAUSAL, {}, ["missing inputs Q, K, V"]),
        "extra-input": (CAUSAL, {**x, "W": x["Q"]}, ["unknown input W", "takes Q, K, V"]),
        "typo-name": (CAUSAL, {"q": x["Q"], "K": x["K"], "V": x["V"]}, ["missing input Q"]),
        "rank-too-low": (CAUSAL, {**x, "Q": x["Q"][0]}, ["input Q", "at least 2 axes", "<n d>", "[5]"]),
        "zero-dim-tensor": (CAUSAL, {**x, "K": torch.tensor(1.0, dtype=torch.float64)},
                            ["input K", "at least 2 axes"]),
        "contradictory-n": (CAUSAL, {**x, "K": r(10, 5)}, ["dim n is 9", "10 from input K"]),
        "contradictory-d": (CAUSAL, {**x, "K": r(9, 4)}, ["dim d is 5", "4 from input K"]),
        "contradictory-m": (SDPA, {"Q": r(9, 5), "K": r(7, 5), "V": r(8, 6)}, ["dim m is 7", "8 from input V"]),
        "batch-no-broadcast": (CAUSAL, {**qkv(batch=(3,)), "K": r(2, 9, 5)},
                               ["leading (batch) axes do not broadcast", "Q [3]", "K [2]"]),
        "complex": (CAUSAL, {**x, "Q": x["Q"].to(torch.complex64)},
                    ["input Q must be a floating tensor", "complex64"]),
        "int-for-float": (CAUSAL, {**x, "V": x["V"].long()}, ["input V must be a floating tensor", "int64"]),
        "bool-for-float": (CAUSAL, {**x, "K": x["K"] > 0}, ["input K must be a floating tensor", "bool"]),
        "uint8-for-float": (CAUSAL, {**x, "Q": x["Q"].to(torch.uint8)}, ["input Q must be a floating", "uint8"]),
        "float8": (CAUSAL, {k: v.to(torch.float8_e4m3fn) for k, v in x.items()},
                   ["input Q must be a floating tensor (float64, float32, float16, bfloat16)", "float8"]),
        "mixed-float-dtypes": (CAUSAL, {**x, "K": x["K"].float()},
                               ["float inputs have different dtypes", "K torch.float32", "Q torch.float64"]),
        "float-for-int": (DOC, {**x, "V": r(9, 6), "doc": doc_ids(9).float()},
                          ["input doc is declared int", "integer tensor", "float32"]),
        "bool-for-int": (DOC, {**x, "doc": doc_ids(9) > 0}, ["input doc is declared int", "torch.bool"]),
        "float-for-bool": (MASKED, {**x, "M": torch.ones(9, 9, dtype=torch.float64)},
                           ["input M is declared bool", "float64"]),
        "numpy-array": (CAUSAL, {**x, "Q": x["Q"].numpy()}, ["input Q must be a torch.Tensor", "ndarray"]),
        "none": (CAUSAL, {**x, "V": None}, ["input V must be a torch.Tensor", "NoneType"]),
        "list": (CAUSAL, {**x, "K": [[1.0] * 5] * 9}, ["input K must be a torch.Tensor", "list"]),
        "mixed-devices": (CAUSAL, {**x, "K": x["K"].to("meta")},
                          ["inputs are on different devices", "K on meta", "Q on cpu"]),
        "meta-device": (CAUSAL, {k: v.to("meta") for k, v in x.items()}, ["tensors on meta are not supported"]),
        "sparse": (CAUSAL, {**x, "Q": x["Q"].to_sparse()}, ["input Q must be a dense (strided) tensor"]),
        "nested": (CAUSAL, {**x, "Q": torch.nested.nested_tensor([x["Q"], x["Q"]])},   # strided, no sizes
                   ["input Q must be a dense (strided) tensor", "nested", "k.varlen"]),
        "huge-rows": (CAUSAL, {"Q": meta(2 ** 31 + 1, 64), "K": meta(2 ** 31 + 1, 64), "V": meta(2 ** 31 + 1, 64)},
                      ["input Q", "> 2^31 - 1", "32-bit"]),
        "huge-stride": (CAUSAL, {"Q": meta(2 ** 26, 64).as_strided((2 ** 20, 64), (2 ** 12, 1)),
                                 "K": meta(2 ** 20, 64), "V": meta(2 ** 20, 64)},
                        ["input Q", "strides [4096, 1]", "or pass a contiguous tensor"]),
        "huge-head-axis": (CAUSAL, {"Q": meta(2, 2 ** 31), "K": meta(2, 2 ** 31), "V": meta(2, 8)},
                           ["input Q", "> 2^31 - 1"]),
        "huge-output": (SDPA, {"Q": meta(2 ** 17, 1), "K": meta(1, 1), "V": meta(1, 2 ** 15)},
                        ["output O", "131072 x 32768"]),
        "runtime-guard": (GUARDED, {"Q": r(9, 5), "K": r(7, 5), "V": r(7, 5)}, ["needs m == n", "n=9", "m=7"]),
        "unbindable-dim": (UNBOUND, qkv(e=5), ["dim w cannot be bound", "no input's shape mentions it"]),
        "floor-extent": (HALVED, {"Q": r(9, 5), "K": r(9, 5), "V": r(9, 3)},
                         ["dim e cannot be bound", "compound extents of V"]),   # floor(e / 2) = 3: e is 6 or 7
        "positional": (CAUSAL, None, ["pass the inputs by name", "k(Q=..., K=..., V=...)"]),
    }
    return cases


BAD = _bad_calls()


def test_at_least_thirty_bad_calls():
    assert len(BAD) >= 30, len(BAD)


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_call_is_an_input_error(case):
    k, ins, fragments = BAD[case]
    with pytest.raises(moa.InputError) as info:
        if ins is None:
            k(*qkv().values())
        else:
            k(**ins)
    msg = info.value.message
    for f in fragments:
        assert f in msg, f"{f!r} not in {msg!r}"


@pytest.mark.parametrize("case", ["missing-V", "extra-input", "rank-too-low", "contradictory-n", "int-for-float",
                                  "float-for-int", "mixed-devices", "sparse", "runtime-guard"])
def test_reference_reports_the_same_errors(case):
    k, ins, fragments = BAD[case]
    with pytest.raises(moa.InputError) as info:
        k.reference(**ins)
    assert fragments[0] in info.value.message


def test_huge_offsets_are_computed_without_allocating():
    """The meta tensors above describe 2^37 bytes; the check reads only shapes and strides."""
    from moa.runtime.binding import bind, check_offsets

    q = meta(1, 2 ** 31 + 1, 64)
    b = bind(CAUSAL.program, {"Q": q, "K": q, "V": q})
    with pytest.raises(moa.InputError, match="input Q"):
        check_offsets(CAUSAL.program, b)
    # exactly at the limit is accepted: (2^15 - 1) * 2^16 + (2^16 - 1) = 2^31 - 1
    ok = meta(2 ** 15, 2 ** 16)
    check_offsets(CAUSAL.program, bind(CAUSAL.program, {"Q": ok, "K": ok, "V": meta(2 ** 15, 8)}))
    assert (2 ** 15 - 1) * 2 ** 16 + 2 ** 16 - 1 == INT32_MAX
    # batch axes are offset in 64 bits: many batch items of a legal size pass
    big_batch = meta(2 ** 20, 2 ** 10, 64).expand(2 ** 20, 2 ** 10, 64)
    check_offsets(CAUSAL.program, bind(CAUSAL.program, {"Q": big_batch, "K": big_batch, "V": big_batch}))
    # broadcast (stride 0) axes add nothing: 2^31 + 5 keys that are one key repeated
    m = 2 ** 31 + 5
    keys, vals = meta(1, 64).expand(m, 64), meta(1, 8).expand(m, 8)
    check_offsets(SDPA.program, bind(SDPA.program, {"Q": meta(4, 64), "K": keys, "V": vals}))


def test_compile_time_bad_arguments():
    src = (ROOT / "examples" / "sliding_window.moa").read_text()
    cases = [
        (lambda: moa.compile(src, w="abc"), "param w must be a number or inf"),
        (lambda: moa.compile(src, w=float("nan")), "param w must be a number or inf"),
        (lambda: moa.compile(src, w=float("-inf")), "param w must be a number or inf"),
        (lambda: moa.compile(src, w=True), "param w must be a number or inf"),
        (lambda: moa.compile(src, window=3), "unknown param(s) window; the program declares w"),
        (lambda: moa.compile(123), "takes .moa text or a path, got int"),
        (lambda: moa.compile(b"dim n"), "takes .moa text or a path, got bytes"),
        (lambda: moa.compile("no/such/file.moa"), "cannot read"),
        (lambda: moa.compile(Path("bad\x00name.moa")), "cannot read"),
    ]
    for fn, fragment in cases:
        with pytest.raises(moa.InputError) as info:
            fn()
        assert fragment in info.value.message, (fragment, info.value.message)


def test_non_utf8_file_is_an_input_error(tmp_path):
    p = tmp_path / "latin1.moa"
    p.write_bytes("# caf\u00e9\n".encode("latin-1") + (ROOT / "examples" / "sdpa.moa").read_bytes())
    with pytest.raises(moa.InputError, match="cannot read"):
        moa.compile(p)


# ---- legal calls: exact agreement with the reference -----------------------------------------------------------

def agree(k, ins, tol=1e-12):
    out = k(**ins)
    ref = k.reference(**ins)
    assert out.shape == ref.shape
    torch.testing.assert_close(out, ref, rtol=tol, atol=tol, equal_nan=True)
    return out, ref


def _views():
    base = qkv(n=11, d=6, e=7)
    big = r(22, 12)
    return {
        "transposed": {**base, "Q": r(6, 11).T},
        "step-2-slice": {**base, "K": big[::2, ::2]},
        "offset-slice": {**base, "V": r(13, 9)[2:, 1:8]},
        "stride-0-broadcast": {**base, "K": r(1, 6).expand(11, 6)},
        "flipped-copy": {"Q": base["Q"].flip(0), "K": base["K"].flip(1), "V": base["V"].flip(0, 1)},
        "batch-broadcast": {"Q": r(3, 11, 6), "K": r(1, 11, 6), "V": base["V"]},
        "batch-transposed": {"Q": r(11, 3, 6).transpose(0, 1), "K": r(3, 11, 6), "V": r(3, 11, 7)},
        "channels-last": {"Q": r(2, 3, 11, 6).to(memory_format=torch.channels_last),
                          "K": r(2, 3, 11, 6), "V": r(2, 3, 11, 7)},
        "requires-grad": {**base, "Q": base["Q"].clone().requires_grad_()},
    }


@pytest.mark.parametrize("case", sorted(_views()))
def test_non_contiguous_views_are_exact(case):
    ins = _views()[case]
    out, _ = agree(CAUSAL, ins)
    contiguous = {k: v.detach().contiguous() for k, v in ins.items()}
    torch.testing.assert_close(out, CAUSAL(**contiguous), rtol=0, atol=0)


def test_negative_strides_do_not_exist_in_torch():
    with pytest.raises(RuntimeError):
        r(4, 4).as_strided((4, 4), (-4, 1))


@pytest.mark.parametrize("n,d,e,batch", [(0, 5, 6, ()), (9, 5, 0, ()), (9, 5, 6, (0,)), (0, 0, 0, (2,)),
                                         (9, 0, 6, ())])
def test_empty_extents(n, d, e, batch):
    ins = qkv(n=n, d=d, e=e, batch=batch)
    out, ref = agree(CAUSAL, ins)   # d = 0: the scores are 0 / sqrt(0) = NaN in both
    assert out.shape == (*batch, n, e)
    if d == 0 and n:   # without the scale, empty dot products are 0: each row averages its admissible values
        k = moa.compile("dim n, d, e\nin Q[n, d], K[n, d], V[n, e]\n"
                        "S[i, j] = where(j <= i, dot(Q[i], K[j]), -inf)\nout O = softmax(S, axis=-1) @ V\n")
        out, _ = agree(k, ins)
        want = torch.cumsum(ins["V"], 0) / torch.arange(1, n + 1, dtype=torch.float64)[:, None]
        torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-12)


def test_no_keys_gives_zeros():
    out, _ = agree(SDPA, {"Q": r(7, 5), "K": r(0, 5), "V": r(0, 6)})
    assert out.shape == (7, 6) and (out == 0).all()


@pytest.mark.parametrize("where,value", [("Q", float("nan")), ("K", float("nan")), ("V", float("nan")),
                                         ("Q", float("inf")), ("K", float("-inf")), ("V", float("inf"))])
def test_nan_and_inf_propagate_like_the_reference(where, value):
    ins = qkv(n=12, d=5, e=6)
    ins[where] = ins[where].clone()
    ins[where][4, 2] = value
    out, ref = agree(CAUSAL, ins)
    assert torch.equal(out.isnan(), ref.isnan())
    assert torch.equal(out.isinf(), ref.isinf())
    if where != "V":   # rows before the poisoned key / query never see it (a V entry meets 0 * NaN in P @ V)
        assert torch.isfinite(out[:4]).all()


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8])
def test_int_inputs_of_any_integer_dtype(dtype):
    ins = {**qkv(n=10), "doc": doc_ids(10, dtype)}
    agree(DOC, ins)


def test_bool_input_accepts_integer_tensors():
    mask = torch.rand(9, 9, generator=torch.Generator().manual_seed(0)) > 0.5
    a, _ = agree(MASKED, {**qkv(), "M": mask})
    b, _ = agree(MASKED, {**qkv(), "M": mask.to(torch.uint8)})
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_input_named_self():
    x = qkv(e=5)
    agree(SELF, {"self": x["Q"], "K": x["K"], "V": x["V"]})


def test_numpy_values_through_torch():
    x = {k: torch.from_numpy(np.ascontiguousarray(v.numpy())) for k, v in qkv().items()}
    agree(CAUSAL, x)


SHIFTED = moa.compile("""
dim n, d, e
in Q[n, d], K[n, d], V[n, e]
S[i, j:n] = dot(Q[i], K[j + 1])
out O = softmax(S, axis=-1) @ V
""")
GUARDED = moa.compile("""
dim n, d, e
in Q[n, d], K[n, d], V[n, e]
S[i, j:n] = where(j + 1 < n, dot(Q[i], K[j + 1]), -inf)
out O = softmax(S, axis=-1) @ V
""")
BEHIND = moa.compile("""
dim n, d, e
in Q[n, d], K[n, d], V[n, e]
Vs[j:n] = V[j - 1]
out O = softmax(Q @ K.T, axis=-1) @ Vs
""")


@pytest.mark.parametrize("k,text", [(SHIFTED, r"the read K\[j \+ 1, :\] reaches index 9 on axis 0 \(extent 9"),
                                    (BEHIND, r"the read V\[j\d* - 1, :\] reaches index -1 on axis 0 \(extent 9")])
def test_unguarded_out_of_range_read_is_an_input_error_like_the_reference(k, text):
    """The reference refuses an unguarded read outside its input; the kernel (masked loads would read 0) refuses
    it before launching, with the read, the axis and the index."""
    ins = qkv()
    with pytest.raises(moa.InputError, match="index out of range"):
        k.reference(**ins)
    with pytest.raises(moa.InputError, match=text):
        k(**ins)


TABLE = "dim n, d, e\nin Q[n, d], K[n, d], V[n, e], bias[4]\nS[i, j] = dot(Q[i], K[j]) + bias[{}]\n" \
        "out O = softmax(S, axis=-1) @ V\n"


@pytest.mark.parametrize("index", ["min(max(j - i, i - j), 3)", "min(i - min(i, j), 3)", "min(max(i, j) - j, 3)",
                                   "3 - min(max(i - j, j - i), 3)"])
def test_min_max_indices_in_range_are_not_refused(index):
    # the terms of i - min(i, j) were bounded apart ("reaches index -9"): Min / Max are spread first, and a bound
    # that is still not reached is checked at every point of the call's index space
    k = moa.compile(TABLE.format(index))
    ins = dict(qkv(n=10), bias=torch.randn(4, dtype=torch.float64))
    agree(k, ins)


def test_min_max_index_out_of_range_names_the_index_it_reaches():
    k = moa.compile(TABLE.format("min(max(j - i, i - j), 4)"))
    ins = dict(qkv(n=10), bias=torch.randn(4, dtype=torch.float64))
    with pytest.raises(moa.InputError, match="reaches index 4 on axis 0"):
        k(**ins)


def test_guarded_read_runs_and_an_empty_index_space_reads_nothing():
    agree(GUARDED, qkv())
    out = SHIFTED(**qkv(n=0))      # no row, no key: K[j + 1] is never read
    assert out.shape == (0, 6)


def test_a_nested_tensor_is_refused_by_decode_and_varlen_too():
    """decode and varlen read lengths before binding: a strided nested tensor raised torch's internal error."""
    k, ins, _ = BAD["nested"]
    for call in (lambda: k.decode(**ins), lambda: k.varlen([0, 9], [0, 9], **ins)):
        with pytest.raises(moa.InputError, match="nested tensor"):
            call()


def test_decode_and_varlen_take_their_inputs_by_name():
    """Positional tensors were bound to splits / stats / cache_len and the message said "missing input Q"; a string
    pack_heads turned packing on."""
    k = moa.compile("examples/causal.moa")
    x = qkv()
    with pytest.raises(moa.InputError, match=r"k.decode\(Q=..., K=..., V=...\), got 3 positional"):
        k.decode(*x.values())
    with pytest.raises(moa.InputError, match=r"k.varlen\(cu_seqlens_q, cu_seqlens_k, Q=..."):
        k.varlen([0, 9], [0, 9], x["Q"], K=x["K"], V=x["V"])
    with pytest.raises(moa.InputError, match="pack_heads is None, True or False"):
        k.decode(**x, pack_heads="no")


def test_the_cost_models_check_their_data_as_a_call_does():
    """inputs= as a list, on the meta device or of a float dtype raised raw errors or was counted as 4-byte ids."""
    from moa.runtime.decode_cost import decode_cost

    k = moa.compile("examples/document_mask.moa")
    doc = torch.zeros(40, dtype=torch.int64)
    dims = {"n": 40, "d": 8, "e": 8}
    for bad, match in (([doc], "takes a dict"), ({"doc": doc.to("meta")}, "meta device"),
                       ({"doc": doc.double()}, "declared int and was given torch.float64"),
                       ({"doc": doc.bool()}, "declared int and was given torch.bool")):
        with pytest.raises(moa.InputError, match=match):
            k.cost(dtype="float64", device="cpu", inputs=bad, **dims)
    with pytest.raises(moa.InputError, match="decode_cost: input doc"):
        decode_cost(k, 1, 40, dtype="fp64", device="cpu", d=8, e=8, inputs={"doc": doc.double()})
    with pytest.raises(moa.InputError, match="backward.cost: inputs= takes a dict"):
        k.backward.cost(dims, (), "float64", inputs=[doc])
