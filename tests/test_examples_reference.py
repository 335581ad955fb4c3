"""Every examples/*.moa program: it parses, elaborates (every shape proven), its DNF reads only inputs (no
intermediate array survives) and equals the unfused float64 reference to 1e-12 on ragged sizes; and the
reference itself equals an independent oracle (torch SDPA, eager flex_attention, the formulas of
tests/oracles.py, none of which imports moa) to 1e-12."""
from __future__ import annotations

import zlib
from functools import lru_cache
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from moa import symbolic as sy
from moa.dnf import NormSum, Read, SoftmaxAt, SoftmaxSum, dnf, nodes
from moa.frontend import elaborate
from moa.frontend.parser import parse
from moa.runtime.dnf_eval import evaluate_dnf
from moa.runtime.reference import reference

try:  # pytest's default (prepend) import mode puts tests/ on sys.path
    import oracles as O
except ImportError:  # pragma: no cover - importlib mode / run from the repository root
    from tests import oracles as O

F64 = torch.float64
EXAMPLES = sorted((Path(__file__).resolve().parent.parent / "examples").glob("*.moa"))
CANONICAL = {"sdpa", "causal", "sliding_window", "gqa_alibi", "power", "linear"}

# small params where the defaults are large (or do not bite at n ~ 17-40); names as declared in each file
PARAMS = {
    "bla": {"W": 8, "M": 3},
    "dilated_window": {"w": 9, "r": 3},
    "global_window": {"w": 4},
    "pi_attention": {"k": 6, "s": 4, "T": 3, "bg": 0.25},
    "prefix_lm": {"p": 5},
    "ring_local": {"k": 6},
    "sliding_window": {"w": 7},
    "softcap": {"c": 1.5},
}

# ragged sizes: n != m where a program has both, n not a multiple of anything; h query heads over g kv heads
SIZES = [
    {"n": 17, "m": 29, "d": 8, "e": 5, "h": 4, "g": 2},
    {"n": 37, "m": 21, "d": 8, "e": 5, "h": 4, "g": 2},
]
BATCH = (2,)


def _oracle_table():
    def sdpa(x, p):
        return F.scaled_dot_product_attention(x["Q"], x["K"], x["V"])

    def causal(x, p):
        return F.scaled_dot_product_attention(x["Q"], x["K"], x["V"], is_causal=True)

    def qkv(x):
        return x["Q"], x["K"], x["V"]

    return {
        "sdpa": sdpa,
        "causal": causal,
        "causal_bottom_right": lambda x, p: O.causal(*qkv(x), bottom_right=True),
        "sliding_window": lambda x, p: O.sliding_window(*qkv(x), w=p["w"]),
        "dilated_window": lambda x, p: O.dilated_window(*qkv(x), w=p["w"], r=p["r"]),
        "global_window": lambda x, p: O.global_window(*qkv(x), w=p["w"], glob=x["glob"]),
        "prefix_lm": lambda x, p: O.prefix_lm(*qkv(x), p=p["p"]),
        "document_mask": lambda x, p: O.document(*qkv(x), doc=x["doc"]),
        "gqa_alibi": lambda x, p: O.gqa(*qkv(x), causal=True, alibi=True),
        "alibi": lambda x, p: O.alibi(*qkv(x)),
        "mqa": lambda x, p: O.gqa(x["Q"], x["K"][..., None, :, :], x["V"][..., None, :, :]),
        "softcap": lambda x, p: O.softcap(*qkv(x), c=p["c"]),
        "relative_bias": lambda x, p: O.relative_bias(*qkv(x), bias=x["bias"]),
        "ring_local": lambda x, p: O.ring_local(*qkv(x), k_win=p["k"]),
        "pi_attention": lambda x, p: O.pi_attention(*qkv(x), x["wg"], k_win=p["k"], s=p["s"], T=p["T"],
                                                    bg=p["bg"]),
        "bla": lambda x, p: O.bla(*qkv(x), W=p["W"], M=p["M"]),
        "power": lambda x, p: O.power_attention(*qkv(x), p=p["p"]),
        "power_gated": lambda x, p: O.power_attention(*qkv(x), p=p["p"], G=x["G"]),
        "linear": lambda x, p: O.linear_attention(*qkv(x), eps=0),
        "linear_relu": lambda x, p: O.linear_attention(*qkv(x), phi=torch.relu, eps=0),
        "sigmoid": lambda x, p: O.sigmoid_attention(*qkv(x)),
        "retention": lambda x, p: O.retention(*qkv(x), gamma=1 - 2.0 ** (-5 - torch.arange(x["Q"].shape[-3]))),
    }


ORACLES = _oracle_table()


@lru_cache(maxsize=None)
def _compiled(path: Path):
    text = path.read_text()
    p = elaborate(text, filename=path.name, **PARAMS.get(path.stem, {}))
    return p, dnf(p)


def _inputs(p, dims: dict, seed: int) -> dict:
    """Random inputs of the program's declared shapes (extents evaluated with dims), sensible per name."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for node in p.inputs:
        name = node.attrs[0]
        shape = (*BATCH, *(sy.evaluate(s, dims) for s in node.shape))
        if name == "doc":  # sorted document ids
            out[name] = torch.sort(torch.randint(0, 4, shape, generator=g), dim=-1).values
        elif node.dtype == "bool":
            out[name] = torch.rand(shape, generator=g, dtype=F64) < 0.15
        elif node.dtype == "int":
            out[name] = torch.randint(0, 5, shape, generator=g)
        elif name == "G":  # cumulative log-gates: non-increasing, <= 0
            out[name] = F.logsigmoid(torch.randn(shape, generator=g, dtype=F64) + 2).cumsum(-1)
        else:
            out[name] = torch.randn(shape, generator=g, dtype=F64)
    return out


def _close(got, want, what=""):
    got, want = got.to(F64), want.to(F64)
    assert got.shape == want.shape, (what, got.shape, want.shape)
    assert torch.isfinite(want).all(), what
    err = float((got - want).abs().max())
    assert err <= 1e-12 * max(1.0, float(want.abs().max())), (what, err)


def _ids(paths):
    return [p.stem for p in paths]


def test_examples_exist():
    stems = {p.stem for p in EXAMPLES}
    assert CANONICAL <= stems, CANONICAL - stems
    assert len(EXAMPLES) >= 20


def test_every_example_has_an_oracle():
    missing = sorted({p.stem for p in EXAMPLES} - set(ORACLES))
    assert not missing, f"examples without an oracle here: {missing}"


def test_small_params_are_declared():
    for stem, overrides in PARAMS.items():
        path = next(p for p in EXAMPLES if p.stem == stem)
        declared = dict(elaborate(path.read_text()).params)
        assert set(overrides) <= set(declared), (stem, overrides, declared)
        for k, v in overrides.items():
            assert dict(_compiled(path)[0].params)[k] == v


@pytest.mark.parametrize("path", EXAMPLES, ids=_ids(EXAMPLES))
def test_example_parses_and_shapes(path):
    text = path.read_text()
    tree = parse(text, path.name)
    assert tree.children
    p, outs = _compiled(path)
    assert p.outputs and len(outs) == len(p.outputs)
    inputs = p.input_map
    # O has Q's shape with the last extent V's: <n e> or <h n e>
    (name, node), = p.outputs
    want = inputs["Q"].shape[:-1] + inputs["V"].shape[-1:]
    assert node.rank == len(want) and all(sy.prove_equal(a, b) for a, b in zip(node.shape, want)), \
        (node.shape, want)
    # the DNF reads only inputs: no named intermediate (S, C, A, Kt ...) survives
    reads = {x.name for o in outs for x in nodes(o.expr) if isinstance(x, Read)}
    assert reads <= set(inputs), reads
    assert not reads & {n for n, _ in p.intermediates()}
    for o in outs:
        assert all(sy.prove_equal(a, b) for a, b in zip(o.extents, node.shape))
        kinds = {type(x) for x in nodes(o.expr)}
        assert SoftmaxAt not in kinds
        if "softmax(" in text:  # softmax(...) @ V fuses into one online-softmax reduction
            assert SoftmaxSum in kinds, path.stem
        if "normalize(" in text:  # normalize(...) @ V fuses into one (sum, sum) reduction
            assert NormSum in kinds, path.stem
    assert not p.guards(), p.guards()  # every shape fact of the examples is decided at compile time


@pytest.mark.parametrize("sizes", SIZES, ids=["n17", "n37"])
@pytest.mark.parametrize("path", EXAMPLES, ids=_ids(EXAMPLES))
def test_example_dnf_equals_reference(path, sizes):
    p, outs = _compiled(path)
    dims = dict(sizes)
    if "m" not in {d.name for d in p.dims}:
        dims.pop("m")
    x = _inputs(p, dims, seed=zlib.crc32(path.stem.encode()) % 1000 + dims["n"])
    ref = reference(p, x)
    got = evaluate_dnf(p, outs, x)
    assert set(ref) == set(got) == {n for n, _ in p.outputs}
    for name in ref:
        want_shape = (*BATCH, *(sy.evaluate(s, dims) for s in p.output_map[name].shape))
        assert tuple(ref[name].shape) == want_shape
        assert ref[name].dtype == F64
        _close(got[name], ref[name], path.stem)


@pytest.mark.parametrize("sizes", SIZES, ids=["n17", "n37"])
@pytest.mark.parametrize("path", EXAMPLES, ids=_ids(EXAMPLES))
def test_example_reference_equals_oracle(path, sizes):
    if path.stem not in ORACLES:
        pytest.fail(f"no oracle for {path.stem}")
    p, _ = _compiled(path)
    dims = dict(sizes)
    x = _inputs(p, dims, seed=1 + zlib.crc32(path.stem.encode()) % 1000 + dims["n"])
    ref = reference(p, x)["O"]
    want = ORACLES[path.stem](x, p.param_values)
    _close(ref, want, path.stem)


def test_sdpa_and_causal_equal_torch_sdpa_directly():
    """The two canonical softmax programs against F.scaled_dot_product_attention (float64), no batch axis."""
    g = torch.Generator().manual_seed(3)
    for stem, n, m, causal in (("sdpa", 19, 33, False), ("causal", 31, 31, True)):
        path = next(p for p in EXAMPLES if p.stem == stem)
        p, outs = _compiled(path)
        q = torch.randn(n, 8, generator=g, dtype=F64)
        k = torch.randn(m, 8, generator=g, dtype=F64)
        v = torch.randn(m, 5, generator=g, dtype=F64)
        want = F.scaled_dot_product_attention(q[None], k[None], v[None], is_causal=causal)[0]
        ref = reference(p, {"Q": q, "K": k, "V": v})["O"]
        _close(ref, want, stem)
        _close(evaluate_dnf(p, outs, {"Q": q, "K": k, "V": v})["O"], want, stem)


def test_sliding_window_small_w_bites():
    """The window bites: with w = 7 at n = 37 the result differs from plain causal and equals the oracle."""
    path = next(p for p in EXAMPLES if p.stem == "sliding_window")
    p, _ = _compiled(path)
    x = _inputs(p, {"n": 37, "d": 8, "e": 5}, seed=11)
    ref = reference(p, x)["O"]
    _close(ref, O.sliding_window(x["Q"], x["K"], x["V"], w=7))
    assert float((ref - O.causal(x["Q"], x["K"], x["V"])).abs().max()) > 1e-3


def test_gqa_alibi_heads_and_explicit_oracle():
    """GQA + ALiBi against both oracle paths (flex and the explicit formula), h = 6 query heads on g = 3."""
    path = next(p for p in EXAMPLES if p.stem == "gqa_alibi")
    p, _ = _compiled(path)
    x = _inputs(p, {"h": 6, "g": 3, "n": 23, "d": 8, "e": 5}, seed=5)
    ref = reference(p, x)["O"]
    _close(ref, O.gqa(x["Q"], x["K"], x["V"], causal=True, alibi=True), "flex")
    _close(ref, O.gqa(x["Q"], x["K"], x["V"], causal=True, alibi=True, impl="explicit"), "explicit")
