"""Scores holding a where (moa/grad_sym.py Translation(pieces=True)): the fused backward kernels differentiate
where(c, a, b) as where(c, da, db), so attention sinks written as a key (gpt-oss), leaky or clipped scores and mask
conjuncts on the score itself train through the kernels; the gradients equal torch.autograd through the float64
reference, and the kernels' work stays exactly predicted."""
import pytest

import moa
from moa.runtime import backward_run
from moa.runtime.tiling import Config

try:
    import grad_cases as C
    from test_variant_edges import SINK   # the attention sink written as a key (docs/variants.md)
except ImportError:  # pragma: no cover
    from tests import grad_cases as C
    from tests.test_variant_edges import SINK

PROGRAMS = {
    "sink": (SINK, {"w": 7}, {"h": 2, "n": 40, "d": 8, "e": 5}),
    # a leaky score and a bias clipped at 0: the bias's gradient by the kernels' atomic adds (its read in the
    # where's test has derivative 0)
    "leaky": ("dim n, d, e\nin Q[n, d], K[n, d], V[n, e], b[n]\nS[i, j] = where(j <= i, where(dot(Q[i], K[j]) > 0, "
              "dot(Q[i], K[j]), 0.1 * dot(Q[i], K[j])) + where(b[j] > 0, b[j], 0.0), -inf)\n"
              "out O = softmax(S, axis=-1) @ V\n", {}, {"n": 40, "d": 8, "e": 5}),
    # a mask conjunct on the score's own value
    "score_mask": ("dim n, d, e\nin Q[n, d], K[n, d], V[n, e]\nS = Q @ K.T / sqrt(d)\n"
                   "M[i, j] = where(j <= i and S[i, j] > -0.5, S[i, j], -inf)\nout O = softmax(M, axis=-1) @ V\n",
                   {}, {"n": 40, "d": 8, "e": 5}),
    # a hard clip of the logits (softcap's non-smooth cousin)
    "clip": ("dim n, d, e\nparam c = 1.5\nin Q[n, d], K[n, d], V[n, e]\n"
             "S[i, j] = where(dot(Q[i], K[j]) > c, c, where(dot(Q[i], K[j]) < -c, -c, dot(Q[i], K[j])))\n"
             "out O = softmax(S, axis=-1) @ V\n", {}, {"n": 40, "d": 8, "e": 5}),
}


@pytest.mark.parametrize("name", sorted(PROGRAMS))
def test_where_scores_train_fused(name, monkeypatch):
    monkeypatch.setattr(backward_run, "INTERPRETER_BLOCKS", (16, 16))
    src, params, dims = PROGRAMS[name]
    k = moa.compile(src, **params)
    assert k.backward.unfused_reason is None
    assert set(k.backward.fused_inputs) == set(C.float_names(k.program))
    x = C.inputs(k.program, dims, 0)
    C.check_kernel_grads(k, x)


def test_sink_backward_work_is_predicted_exactly(monkeypatch):
    monkeypatch.setattr(backward_run, "INTERPRETER_BLOCKS", (16, 16))
    src, params, dims = PROGRAMS["sink"]
    k = moa.compile(src, **params)
    x = C.inputs(k.program, dims, 0)
    C.check_backward_cost(k, x, C.cotangents(k, x, 0)["O"], Config(16, 16))


def test_the_docs_sink_program_is_this_one():
    assert f"```\n{SINK}```" in open("docs/variants.md").read()


@pytest.mark.parametrize("score", [
    "where(j <= i, dot(Q[i], K[j]) + 0.5 * K[j, 0] - Q[i, 1] * V[j, 2], -inf)",   # Q, K, V read beside q . k
    "where(K[j, 0] > -0.5 and j <= i, dot(Q[i], K[j]), -inf)",                  # a mask on K's values
])
def test_operand_inputs_read_beside_the_contraction(score, monkeypatch):
    """Q, K or V read in the score outside the contraction get atomic adds like a bias table (they were refused:
    unfused); a mask on their values has no derivative."""
    monkeypatch.setattr(backward_run, "INTERPRETER_BLOCKS", (16, 16))
    k = moa.compile(f"dim n, d, e\nin Q[n, d], K[n, d], V[n, e]\nS[i, j] = {score}\nout O = softmax(S, axis=-1) @ V\n")
    assert k.backward.unfused_reason is None
    x = C.inputs(k.program, {"n": 40, "d": 8, "e": 5}, 0)
    C.check_kernel_grads(k, x)
