"""Training through moa: `k(Q=q, ...)` with inputs that require grad goes through the moa::attention operator, whose
backward gives the gradient of every float input. Acceptance: every example against torch.autograd through the
float64 reference at ragged sizes (max relative error <= 1e-10), fully masked rows with zero gradient (not NaN),
gradcheck, opcheck, moa.nn.Attention's layouts, and torch.compile(fullgraph=True) of a 2-layer model."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

import moa
from moa.cli import main
from moa.errors import InputError

try:
    import grad_cases as C
except ImportError:  # pragma: no cover
    from tests import grad_cases as C

F64 = torch.float64


def _compile(stem: str):
    return moa.compile(f"examples/{stem}.moa", **C.PARAMS.get(stem, {}))


def _op_grads(k, x: dict, cot: dict) -> tuple[dict, dict]:
    """(outputs, gradients) of k(**x) through the operator, for the loss sum(out * cot)."""
    names = C.float_names(k.program)
    leaves = {n: (t.clone().requires_grad_() if n in names else t) for n, t in x.items()}
    out = k(**leaves)
    outs = out if isinstance(out, dict) else {k.output_names[0]: out}
    assert all(o.grad_fn is not None for o in outs.values())
    sum((o * cot[n]).sum() for n, o in outs.items()).backward()
    return outs, {n: leaves[n].grad for n in names}


@pytest.mark.parametrize("size", range(len(C.SIZES)))
@pytest.mark.parametrize("stem", [p.stem for p in C.EXAMPLES])
def test_example_gradients_match_autograd(stem, size):
    k = _compile(stem)
    x = C.inputs(k.program, C.dims_for(k.program, C.SIZES[size]), size)
    cot = C.cotangents(k, x, size)
    want = C.autograd_grads(k, x, cot)
    outs, got = _op_grads(k, x, cot)
    for n in want:
        assert got[n] is not None and got[n].shape == x[n].shape and got[n].dtype == F64, n
        assert torch.isfinite(got[n]).all(), n
        assert C.rel_err(got[n], want[n]) <= 1e-10, (n, C.rel_err(got[n], want[n]))


def test_fully_masked_rows_have_zero_gradient():
    """causal_bottom_right with m < n: the first n - m query rows see no key; their output and dQ rows are 0."""
    k = _compile("causal_bottom_right")
    size = C.SIZES[0]
    assert size["m"] < size["n"]
    x = C.inputs(k.program, C.dims_for(k.program, size), 7)
    cot = C.cotangents(k, x, 7)
    outs, got = _op_grads(k, x, cot)
    dead = size["n"] - size["m"]
    assert (outs["O"][..., :dead, :] == 0).all()
    assert (got["Q"][..., :dead, :] == 0).all()
    assert all(torch.isfinite(g).all() for g in got.values())
    want = C.autograd_grads(k, x, cot)
    assert all(C.rel_err(got[n], want[n]) <= 1e-10 for n in want)


def test_inputs_without_grad_skip_the_operator():
    k = _compile("causal")
    x = C.inputs(k.program, {"n": 9, "d": 4, "e": 3}, 0)
    assert k(**x).grad_fn is None
    q = x["Q"].clone().requires_grad_()
    with torch.no_grad():
        assert k(**{**x, "Q": q}).grad_fn is None
    out = k(**{**x, "Q": q})
    out.sum().backward()
    assert q.grad is not None and x["K"].grad is None


def test_batch_broadcast_gradients_sum_over_the_broadcast_axes():
    """K and V shared by every batch element (no leading axis): their gradients sum over the batch."""
    k = _compile("causal")
    x = C.inputs(k.program, {"n": 10, "d": 4, "e": 3}, 1, batch=(3,))
    x["K"], x["V"] = x["K"][0], x["V"][0]
    cot = C.cotangents(k, x, 1)
    want = C.autograd_grads(k, x, cot)
    _, got = _op_grads(k, x, cot)
    assert got["K"].shape == x["K"].shape
    assert all(C.rel_err(got[n], want[n]) <= 1e-10 for n in want)


@pytest.mark.parametrize("stem", ["causal", "softcap", pytest.param("pi_attention", marks=pytest.mark.slow)])
def test_gradcheck(stem):   # pi_attention (17 s): its fused gradients are checked by test_grad_fused / grad_cost_all
    k = _compile(stem)
    x = C.inputs(k.program, C.dims_for(k.program, {"n": 6, "m": 5, "d": 2, "e": 2}), 0, batch=())
    names = C.float_names(k.program)

    def f(*ts):
        return k(**{**x, **dict(zip(names, ts))})

    assert torch.autograd.gradcheck(f, tuple(x[n].clone().requires_grad_() for n in names))


@pytest.mark.parametrize("stem", ["causal", "document_mask", "relative_bias", "power_gated", "pi_attention"])
def test_opcheck(stem):
    k = _compile(stem)
    x = C.inputs(k.program, C.dims_for(k.program, {"n": 7, "d": 3, "e": 2, "h": 2, "m": 5, "g": 1}), 0)
    ts = [x[n].clone().requires_grad_() if n in C.float_names(k.program) else x[n] for n in k.input_names]
    torch.library.opcheck(torch.ops.moa.attention, (k.op_key, ts))


# ---- moa.nn.Attention -----------------------------------------------------------------------------------------


def test_attention_layouts_agree_and_misreads_are_errors():
    att = moa.nn.Attention("examples/causal.moa", num_heads=3)
    att_t = moa.nn.Attention("examples/causal.moa", num_heads=3, layout="bnhd")
    g = torch.Generator().manual_seed(0)
    q, kk, v = (torch.randn(2, 3, 11, 4, generator=g, dtype=F64) for _ in range(3))
    want = att.kernel.reference(Q=q, K=kk, V=v)
    assert (att(q, kk, v) - want).abs().max() < 1e-12
    got = att_t(q.transpose(1, 2), kk.transpose(1, 2), v.transpose(1, 2))
    assert got.shape == (2, 11, 3, 4) and (got.transpose(1, 2) - want).abs().max() < 1e-12
    with pytest.raises(InputError, match="heads"):
        att(q.transpose(1, 2), kk.transpose(1, 2), v.transpose(1, 2))   # (B, N, H, D) read as (B, H, N, D)
    with pytest.raises(InputError, match="4-D"):
        att(q[0], kk[0], v[0])
    with pytest.raises(InputError, match="layout"):
        moa.nn.Attention("examples/causal.moa", num_heads=3, layout="bshd")
    with pytest.raises(InputError, match="num_heads"):
        moa.nn.Attention("examples/causal.moa", num_heads=0)


def test_a_copied_module_runs_on_its_own_kernel_and_refuses_what_a_call_refuses():
    """A deepcopy / pickle of moa.nn.Attention ran the original's kernel key (gone with the original); the module
    skipped the call's refusals (torch.func transforms, a forced linear form): found by a training-loop helper."""
    import copy
    import gc
    import pickle

    from moa.errors import UnsupportedError

    q = torch.randn(1, 2, 9, 8, generator=torch.Generator().manual_seed(3), dtype=F64)
    a = moa.nn.Attention("examples/causal.moa", num_heads=2)
    want = a(q, q, q)
    copies = [copy.deepcopy(a), pickle.loads(pickle.dumps(a))]
    del a
    gc.collect()
    for b in copies:
        assert b.key == b.kernel.op_key and torch.equal(b(q, q, q), want)
    with pytest.raises(UnsupportedError, match="torch.func"):
        torch.func.grad(lambda x: copies[0](x, q, q).sum())(q)
    with pytest.raises(UnsupportedError, match="form='linear'"):
        moa.nn.Attention("examples/causal.moa", num_heads=2, form="linear")(q, q, q)
    with pytest.raises(UnsupportedError, match="form='linear'"):   # with_lse without gradients too
        moa.compile("examples/causal.moa", form="linear").with_lse(Q=q, K=q, V=q)


def test_attention_grouped_heads_and_gradients():
    att = moa.nn.Attention("examples/gqa_alibi.moa", num_heads=4, layout="bnhd")
    g = torch.Generator().manual_seed(1)
    q = torch.randn(2, 9, 4, 4, generator=g, dtype=F64, requires_grad=True)
    kv = [torch.randn(2, 9, 2, 4, generator=g, dtype=F64, requires_grad=True) for _ in range(2)]
    out = att(q, *kv)
    want = att.kernel.reference(Q=q.transpose(1, 2), K=kv[0].transpose(1, 2), V=kv[1].transpose(1, 2))
    assert (out.transpose(1, 2) - want).abs().max() < 1e-12
    out.sum().backward()
    assert all(t.grad is not None and torch.isfinite(t.grad).all() for t in (q, *kv))
    with pytest.raises(InputError, match="divisor of 4"):
        att(q, kv[0][:, :, :1].expand(2, 9, 3, 4), kv[1])


class _Block(torch.nn.Module):
    def __init__(self, dim: int, heads: int, source: str = "examples/causal.moa"):
        super().__init__()
        self.heads = heads
        self.qkv = torch.nn.Linear(dim, 3 * dim)
        self.proj = torch.nn.Linear(dim, dim)
        self.attn = moa.nn.Attention(source, num_heads=heads, layout="bnhd")

    def forward(self, x):
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, d // self.heads).unbind(2)
        return x + self.proj(self.attn(q, k, v).reshape(b, n, d))


def _compiled_matches_eager(backend: str):
    torch.manual_seed(0)
    model = torch.nn.Sequential(_Block(8, 2), _Block(8, 2, "examples/softcap.moa")).double()
    x = torch.randn(2, 13, 8, dtype=F64)
    y = model(x)
    y.square().sum().backward()
    eager = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    compiled = torch.compile(model, fullgraph=True, backend=backend)
    y2 = compiled(x)
    y2.square().sum().backward()
    assert (y - y2).abs().max() < 1e-12
    for a, p in zip(eager, model.parameters()):
        assert (a - p.grad).abs().max() < 1e-10


def test_compile_fullgraph_two_layers_matches_eager():
    _compiled_matches_eager("aot_eager")


@pytest.mark.slow
def test_compile_fullgraph_inductor_matches_eager():
    _compiled_matches_eager("inductor")


# window mixing by a learned table T: the window backward kernels refuse float inputs in the mixing weights
LEARNED_MIX = Path("examples/bla.moa").read_text().replace("in Q[n, d], K[n, d], V[n, e]",
                                                           "in Q[n, d], K[n, d], V[n, e], T[W, W]")
LEARNED_MIX = LEARNED_MIX[:LEARNED_MIX.index("Dk[j:W, tau:W] =")] + "Dk[j:W, tau:W] = T[j, tau]\n" + \
    LEARNED_MIX[LEARNED_MIX.index("Kt[i:n"):]


@pytest.mark.parametrize("stem, dims, backward", [("relative_bias", "h=2,n=13,d=4,e=3", "fused kernels for Q, K, V"),
                                                  ("bla", "n=13,d=4,e=3", "fused kernels for Q, K, V"),
                                                  (None, "n=13,d=4,e=3", "the gradient DNF, unfused")])
def test_cli_check_grad(stem, dims, backward, capsys, tmp_path):
    path = tmp_path / "learned_mix.moa"
    path.write_text(LEARNED_MIX)
    assert main(["check", str(path) if stem is None else f"examples/{stem}.moa", "--dims", dims, "--grad"]) == 0
    out = capsys.readouterr().out
    names = ["Q", "K", "V"] + (["bias"] if stem == "relative_bias" else ["T"] if stem is None else [])
    assert all(f"d{n}: kernel vs autograd (f64)" in out for n in names), out
    assert backward in out and out.rstrip().endswith("OK")


def test_attention_module_passes_other_inputs_and_their_gradients():
    """relative_bias through moa.nn.Attention: the bias table by name, its gradient against autograd."""
    att = moa.nn.Attention("examples/relative_bias.moa", num_heads=2, layout="bnhd")
    g = torch.Generator().manual_seed(5)
    q, kk, v = (torch.randn(2, 11, 2, 4, generator=g, dtype=F64, requires_grad=True) for _ in range(3))
    bias = torch.randn(2, 21, generator=g, dtype=F64, requires_grad=True)
    att(q, kk, v, bias=bias).square().sum().backward()
    leaves = [t.detach().clone().requires_grad_() for t in (q, kk, v, bias)]
    ref = att.kernel.reference(Q=leaves[0].transpose(1, 2), K=leaves[1].transpose(1, 2), V=leaves[2].transpose(1, 2),
                               bias=leaves[3])
    ref.transpose(1, 2).square().sum().backward()
    for got, want in zip((q, kk, v, bias), leaves):
        assert C.rel_err(got.grad, want.grad) <= 1e-10
    with pytest.raises(InputError, match="unknown input"):
        att(q, kk, v, bias=bias, tabel=bias)


def test_several_outputs_and_an_unused_output():
    """Two outputs (no fused backward: the gradient DNF): both cotangents, or one output only (the other's is 0)."""
    k = moa.compile("dim n, d, e\nin Q[n, d], K[n, d], V[n, e]\nS[i, j] = where(j <= i, dot(Q[i], K[j]) / sqrt(d), "
                    "-inf)\nT[i, j] = where(j >= i, dot(Q[i], K[j]), -inf)\nout O = softmax(S, axis=-1) @ V\n"
                    "out L = softmax(T, axis=-1) @ V")
    assert k.backward.unfused_reason == "several outputs"
    x = C.inputs(k.program, {"n": 9, "d": 4, "e": 3}, 0)
    cot = C.cotangents(k, x, 0)
    want = C.autograd_grads(k, x, cot)
    outs, got = _op_grads(k, x, cot)
    assert set(outs) == {"O", "L"} and all(C.rel_err(got[n], want[n]) <= 1e-10 for n in want)
    only = C.autograd_grads(k, x, {"O": torch.zeros_like(cot["O"]), "L": cot["L"]})
    leaves = {n: t.clone().requires_grad_() for n, t in x.items()}
    (k(**leaves)["L"] * cot["L"]).sum().backward()
    assert all(C.rel_err(leaves[n].grad, only[n]) <= 1e-10 for n in only)


def test_compile_with_dynamic_shapes():
    k = moa.compile("examples/causal.moa")
    f = torch.compile(lambda q, kk, v: k(Q=q, K=kk, V=v).square().sum(), fullgraph=True, dynamic=True,
                      backend="aot_eager")
    for n in (9, 13):
        x = C.inputs(k.program, {"n": n, "d": 4, "e": 3}, n)
        leaves = {name: t.clone().requires_grad_() for name, t in x.items()}
        f(leaves["Q"], leaves["K"], leaves["V"]).backward()
        want = C.autograd_grads(k, x, {"O": 2 * k.reference(**x)})
        assert all(C.rel_err(leaves[name].grad, want[name]) <= 1e-10 for name in want)


@pytest.mark.parametrize("stem,lead", [("causal", ()), ("softcap", ()),
                                       pytest.param("alibi", (2,), marks=pytest.mark.slow)])   # 25 s: heads
def test_with_lse_differentiates_both_outputs(stem, lead):
    """(O, lse) of with_lse are both differentiable: the lse's cotangent g enters the fused backward as
    delta - g (d lse_i / d s_ij = p_ij); checked against finite differences."""
    k = moa.compile(Path("examples") / f"{stem}.moa")
    g = torch.Generator().manual_seed(3)
    q, kk, v = (torch.randn(*lead, 5, w, dtype=F64, generator=g).requires_grad_() for w in (4, 4, 3))
    o, lse = k.with_lse(Q=q, K=kk, V=v)
    assert o.grad_fn is not None and lse.grad_fn is not None
    assert torch.autograd.gradcheck(lambda a, b, c: k.with_lse(Q=a, K=b, V=c), (q, kk, v), eps=1e-6, atol=1e-7)


def test_inference_calls_refuse_inputs_that_require_grad():
    """decode and varlen compute no gradients: an input that requires grad is refused by name (it gave outputs
    without a graph, so a loss through them silently missed the attention's share)."""
    from moa.errors import UnsupportedError
    k = moa.compile(Path("examples") / "causal_bottom_right.moa")
    q = torch.randn(3, 8, dtype=F64).requires_grad_()
    kv = torch.randn(9, 8, dtype=F64)
    with pytest.raises(UnsupportedError, match="compute no gradients, and Q require grad"):
        k.decode(Q=q, K=kv, V=kv)
    with pytest.raises(UnsupportedError, match="compute no gradients"):
        k.varlen(torch.tensor([0, 3]), torch.tensor([0, 9]), Q=q, K=kv, V=kv)
    with torch.no_grad():
        assert k.decode(Q=q, K=kv, V=kv).shape == (3, 8)


def test_copies_of_a_kernel_register_their_own_operator():
    """A pickled (torch.save) or deep-copied kernel runs, gradients included, after the original is gone (it
    kept the original's operator key and failed in a fresh process)."""
    import copy
    import gc
    import pickle
    k = moa.compile(Path("examples") / "causal.moa")
    key = k.op_key
    copies = [pickle.loads(pickle.dumps(k)), copy.deepcopy(k)]
    del k
    gc.collect()
    for c in copies:
        q = torch.randn(5, 8, dtype=F64, requires_grad=True)
        c(Q=q, K=q, V=q).sum().backward()
        assert c.op_key != key and q.grad is not None


def test_double_backward_and_ring_gradients_are_refused_by_moa():
    """Double backward raises moa's UnsupportedError (it raised torch's 'no autograd formula'); k.ring with inputs
    that require grad is refused where the ring has no backward for the program (its output would carry no
    graph)."""
    from moa.errors import UnsupportedError
    k = moa.compile(Path("examples") / "causal.moa")
    q = torch.randn(5, 8, dtype=F64, requires_grad=True)
    g, = torch.autograd.grad(k(Q=q, K=q, V=q).square().sum(), q, create_graph=True)
    with pytest.raises(UnsupportedError, match="double backward"):
        g.sum().backward()
    two = moa.compile("dim n, d\nin Q[n, d], K[n, d], V[n, d]\nS = Q @ K.T\nout A = softmax(S, axis=-1) @ V\n"
                      "out B = softmax(2 * S, axis=-1) @ V\n")   # the ring trains one output
    with pytest.raises(UnsupportedError, match="ring attention's calls of this program compute no gradients"):
        two.ring(Q=q, K=q, V=q)


def test_with_lse_traces_in_one_graph():
    """with_lse under torch.compile(fullgraph=True): its program checks are constants to the tracer (they ran
    sympy inside the trace and broke the graph)."""
    k = moa.compile(Path("examples") / "causal.moa")
    q = torch.randn(5, 8, dtype=F64, requires_grad=True)
    f = torch.compile(lambda a: k.with_lse(Q=a, K=a, V=a), backend="aot_eager", fullgraph=True)
    o, lse = f(q)
    (o.sum() + lse.sum()).backward()
    want = q.grad.clone()
    q.grad = None
    o2, lse2 = k.with_lse(Q=q, K=q, V=q)
    (o2.sum() + lse2.sum()).backward()
    assert (o - o2).abs().max() == 0 and (lse - lse2).abs().max() == 0 and (q.grad - want).abs().max() == 0


def test_torch_func_transforms_are_refused_by_moa():
    """vmap and torch.func.grad reach the kernels with wrapped tensors: a moa UnsupportedError says so (they failed
    inside the launch, or in torch's autograd.Function check)."""
    from moa.errors import UnsupportedError
    k = moa.compile(Path("examples") / "causal.moa")
    q = torch.randn(3, 5, 8, dtype=F64)
    with pytest.raises(UnsupportedError, match="torch.func transform"):
        torch.vmap(lambda a: k(Q=a, K=a, V=a))(q)
    with pytest.raises(UnsupportedError, match="torch.func transform"):
        torch.func.grad(lambda a: k(Q=a, K=a, V=a).square().sum())(q[0])
    import torch.autograd.forward_ad as fwAD
    with fwAD.dual_level():   # the tangent was dropped silently (a zero derivative; found by a helper)
        d = fwAD.make_dual(q, torch.ones_like(q))
        with pytest.raises(UnsupportedError, match="forward-mode tangent"):
            k(Q=d, K=q, V=q)
