"""Decoding against a KV cache (runtime/decode.py): split-KV launches merged by log-sum-exp, float64 in the
interpreter, against the unfused float64 reference and against one unsplit launch."""
import pytest
import torch

import moa
from moa.errors import InputError, UnsupportedError
from moa.runtime import decode

D = 16
PROGRAMS = {   # program -> (params, shapes of the full-sequence inputs at m keys)
    "causal_bottom_right": ({}, None),
    "sliding_window": ({"w": 300}, lambda m: dict(Q=(m, D), K=(m, D), V=(m, D))),
    "alibi": ({}, lambda m: dict(Q=(2, m, D), K=(2, m, D), V=(2, m, D))),
    "gqa_alibi": ({}, lambda m: dict(Q=(4, m, D), K=(2, m, D), V=(2, m, D))),
    "pi_attention": ({"k": 100, "s": 37}, lambda m: dict(Q=(m, D), K=(m, D), V=(m, D), wg=(D,))),
}
_KERNELS: dict = {}
_REFS: dict = {}


def _kernel(name):
    if name not in _KERNELS:
        _KERNELS[name] = moa.compile(f"examples/{name}.moa", **PROGRAMS[name][0])
    return _KERNELS[name]


def _case(name, nq, m):
    """(decode inputs, expected rows): the last nq rows of the full-sequence reference (one dim for both axes),
    or the reference at n = nq (causal_bottom_right: its own n, m)."""
    k = _kernel(name)
    g = torch.Generator().manual_seed(m)
    if PROGRAMS[name][1] is None:
        ins = {x: torch.randn(s, generator=g, dtype=torch.float64)
               for x, s in dict(Q=(2, nq, D), K=(2, m, D), V=(2, m, D)).items()}
        return ins, k.reference(**ins)
    if (name, m) not in _REFS:
        full = {x: torch.randn(s, generator=g, dtype=torch.float64) for x, s in PROGRAMS[name][1](m).items()}
        _REFS[(name, m)] = (full, k.reference(**full))
    full, ref = _REFS[(name, m)]
    ins = dict(full)
    ins["Q"] = full["Q"][..., m - nq:, :]
    return ins, ref[..., m - nq:, :]


def _check(name, nq, m):
    ins, want = _case(name, nq, m)
    got, st = decode.decode(_kernel(name), ins, splits=3, stats=True)
    assert st.splits == min(3, -(-m // st.split_len))
    assert st.grid[2] == st.splits
    torch.testing.assert_close(got, want, rtol=1e-11, atol=1e-11)
    one = decode.decode(_kernel(name), ins, splits=1)
    assert (got - one).abs().max().item() <= 1e-12   # split equals unsplit


# a program with one dim for both axes needs nq <= m (its queries are the last rows of the keys)
CASES = [(name, nq, m) for name in PROGRAMS for m in (1, 1000) for nq in (1, 3, 16)
         if nq <= m or PROGRAMS[name][1] is None]


@pytest.mark.parametrize("name,nq,m", CASES)
def test_decode_matches_reference(name, nq, m):
    _check(name, nq, m)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(PROGRAMS))
@pytest.mark.parametrize("nq", [1, 3, 16])
def test_decode_long_cache(name, nq):
    _check(name, nq, 4097)


def test_decode_long_cache_fast():
    """m = 4097 (a ragged last key tile, many splits) on the cheapest program, in the default run."""
    _check("causal_bottom_right", 3, 4097)
    ins, want = _case("causal_bottom_right", 1, 4097)
    got, st = decode.decode(_kernel("causal_bottom_right"), ins, stats=True)
    assert st.splits > 1 and st.predicted_seconds is not None   # the cost model splits a 1-row, 2-head call
    torch.testing.assert_close(got, want, rtol=1e-11, atol=1e-11)


def test_decode_equals_plain_call_for_two_dim_programs():
    """A program with its own n and m: decode() is the ordinary call, split."""
    ins, _ = _case("causal_bottom_right", 16, 1000)
    k = _kernel("causal_bottom_right")
    assert (decode.decode(k, ins, splits=4) - k(**ins)).abs().max().item() <= 1e-12


@pytest.mark.parametrize("splits", [None, 3])
def test_decode_against_an_empty_cache_is_zero(splits):
    """No key at all: every row is 0 (as a plain call gives), not the unwritten partial output."""
    k = _kernel("causal_bottom_right")
    for dt in (torch.float64, torch.float32):
        q, kv = torch.randn(2, 3, D, dtype=dt), torch.randn(2, 0, D, dtype=dt)
        o = k.decode(Q=q, K=kv, V=kv, splits=splits)
        assert o.shape == (2, 3, D) and o.dtype == dt and not o.any()


def test_decode_refusals():
    k = _kernel("sliding_window")
    q = torch.randn(5, D, dtype=torch.float64)
    kv = torch.randn(3, D, dtype=torch.float64)
    with pytest.raises(InputError, match="last rows of the keys"):
        decode.decode(k, dict(Q=q, K=kv, V=kv))
    with pytest.raises(InputError, match="splits must be a positive integer"):
        decode.decode(k, dict(Q=kv[:1], K=kv, V=kv), splits=0)
    bla = moa.compile("examples/bla.moa")
    with pytest.raises(UnsupportedError, match="do not take window-mixing outputs"):
        decode.decode(bla, dict(Q=q, K=q, V=q))


def test_window_splits_stay_in_the_window():
    """A sliding window's splits cover the keys its rows admit (the last w + n_q keys), not the whole cache."""
    k = moa.compile("examples/sliding_window.moa", w=100)
    g = torch.Generator().manual_seed(5)
    full = {x: torch.randn(4096, D, generator=g, dtype=torch.float64) for x in "QKV"}
    want = k.reference(Q=full["Q"][3900:], K=full["K"][3900:], V=full["V"][3900:])[-2:]   # keys >= 3900 suffice
    got, st = decode.decode(k, dict(full, Q=full["Q"][-2:]), splits=4, stats=True)
    assert st.splits * st.split_len <= 192 and st.splits == 2   # tiles 62, 63 of 64 keys
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_plain_cuda_calls_of_decode_shapes_run_split():
    """k(...) on CUDA runs as a decode when the cost model splits or packs (decided from the shapes, tested here
    on CPU tensors, which always run the plain kernel); a prefill does not."""
    gqa = """
dim h, g, n, m, d, e
in Q[h, n, d], K[g, m, d], V[g, m, e]
S[a, i, j] = dot(Q[a, i], K[a // (h // g), j]) / sqrt(d)
out O[a] = softmax(S[a], axis=-1) @ V[a // (h // g)]
"""
    k = moa.compile(gqa)
    one = dict(Q=torch.zeros(32, 1, D), K=torch.zeros(8, 8192, D), V=torch.zeros(8, 8192, D))
    st = decode.split_preference(k, one)
    assert st is not None and st.splits > 1 and st.packed_heads == 4
    assert not decode.prefers_split(k, one)   # CPU tensors
    prefill = dict(Q=torch.zeros(32, 512, D), K=torch.zeros(8, 512, D), V=torch.zeros(8, 512, D))
    assert decode.split_preference(k, prefill) is None
    assert decode.split_preference(moa.compile("examples/bla.moa"), {}) is None   # refusals: no split
    # a prefill whose split the time model picks (2 splits) but predicts slower than the plain kernel (45 us against
    # 28 us on the h100 table): it stays plain (found by a cost-auditing helper)
    cbr = moa.compile("examples/causal_bottom_right.moa")
    big = dict(Q=torch.zeros(4096, 128), K=torch.zeros(4096, 128), V=torch.zeros(4096, 128))
    assert decode.decode(cbr, big, plan_only=True).splits > 1 and decode.split_preference(cbr, big) is None
    # the decision is per dtype too (it was memoised by shapes: an fp64 call decided for fp16 ones)
    half = {x: t.half() for x, t in one.items()}
    fresh = moa.compile(gqa)
    assert decode.split_preference(k, half).predicted_seconds == decode.split_preference(fresh, half).predicted_seconds
    assert decode.split_preference(k, half).predicted_seconds != st.predicted_seconds


def test_tuned_splits_time_the_model_choice_and_its_neighbours(private_cache):
    """On a GPU the first call of a shape bucket times 1, S / 2, S and 2 S splits (S the model's) and keeps the
    fastest (runtime/tune.py); here with a stand-in timer that prefers 2 S."""
    from moa.runtime import ring
    from moa.runtime.binding import bind

    k = _kernel("causal_bottom_right")
    ins, _ = _case("causal_bottom_right", 1, 1000)
    plan, _ = ring.block_kernel(k)
    b = bind(plan.program, ins, plan.block_dims({"n": 1, "m": 1000}, 0, 1, 0, 1000))
    timed = []

    def seconds(s):
        timed.append(s)
        return 1.0 / s
    assert decode.tuned_splits(k, plan, b, 6, seconds) == 12 and sorted(timed) == [1, 3, 6, 12]
    assert decode.tuned_splits(k, plan, b, 6, seconds) == 12 and len(timed) == 4   # the bucket's record


@pytest.mark.parametrize("name", ["document_mask", "global_window", "power_gated"])
def test_inputs_read_by_both_indices(name):
    """A per-token input read by i and by j (document ids, global tokens, a gate) is passed once along the keys:
    its last rows are the queries' (tile summaries of document ids follow the splits)."""
    from moa.runtime.check import random_inputs

    k = moa.compile(f"examples/{name}.moa")
    dims = {d.name: {"n": 300, "d": D, "e": D}.get(d.name, D) for d in k.program.dims}
    x = random_inputs(k.program, dims, seed=2, batch=0, dtype=torch.float64)
    want = k.reference(**x)[..., -3:, :]
    got = decode.decode(k, dict(x, Q=x["Q"][-3:]), splits=3)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    if name == "document_mask":   # with a valid length: the queries are the last rows of the valid keys
        got = decode.decode(k, dict(x, Q=x["Q"][197:200]), cache_len=torch.tensor(200))
        want = k.reference(**{n: t[:200] for n, t in x.items()})[197:]
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_a_table_sized_by_the_sequence_with_valid_lengths_is_refused():
    """relative_bias's bias[h, 2n - 1] is sized for the cache's m keys; with cache_len = L each batch index is a
    call on L keys, which reads the table at i - j + L - 1: the decode read entries of another distance (a wrong
    output, found by a fuzzer). Refused, as varlen refuses it; without cache_len the call is exact."""
    k = moa.compile("examples/relative_bias.moa")
    h, m, d = 1, 64, 4
    x = {"Q": torch.zeros(h, 1, d, dtype=torch.float64), "K": torch.zeros(h, m, d, dtype=torch.float64),
         "V": torch.arange(m, dtype=torch.float64).view(1, m, 1).expand(h, m, d).contiguous(),
         "bias": torch.zeros(h, 2 * m - 1, dtype=torch.float64)}
    x["bias"][:, m - 1] = 50.0   # distance 0
    assert k.decode(**x)[0, 0, 0].item() == pytest.approx(63.0)
    for extra in ({"cache_len": 40}, {"cache_len": 40, "block_table": torch.arange(4), "page_size": 16}):
        with pytest.raises(UnsupportedError, match="depends on the sequence length"):
            k.decode(**x, **extra)


def test_the_cost_models_refuse_what_the_calls_refuse():
    from moa.runtime.decode_cost import decode_cost
    from moa.runtime.varlen_cost import varlen_cost

    k = moa.compile("examples/relative_bias.moa")
    with pytest.raises(UnsupportedError, match="depends on the sequence length"):
        decode_cost(k, 1, 64, cache_len=[40], dtype="fp64", device="cpu", h=1, d=4, e=4)
    with pytest.raises(UnsupportedError, match="depends on the sequence length"):
        varlen_cost(k, [0, 3, 9], [0, 3, 9], dtype="fp64", device="cpu", h=1, d=4, e=4)
    assert decode_cost(k, 1, 64, dtype="fp64", device="cpu", h=1, d=4, e=4).flops > 0   # one length: exact


def test_queries_that_are_their_own_keys_say_so():
    """Q read at both the row and the key (self-similarity): decode cannot tell the query rows from the cache; it
    asked for inputs that were all passed."""
    k = moa.compile("dim n, d, e\nin Q[n, d], V[n, e]\nout O = softmax(Q @ Q.T, axis=-1) @ V\n")
    x = {"Q": torch.randn(20, 4, dtype=torch.float64), "V": torch.randn(20, 3, dtype=torch.float64)}
    with pytest.raises(InputError, match="queries that are their own keys"):
        k.decode(**x)
