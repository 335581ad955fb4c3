"""The generated source and what a kernel touches: golden source (``MOA_UPDATE_GOLDEN=1`` rewrites tests/golden/),
the skip test only where loop bounds do not imply it, the storage theorem (an instrumented run stores only the
output and lse and loads only the inputs, besides the per-tile summaries of ids and flags), and hostile but valid
identifiers (renamed injectively, never pasted verbatim)."""
from __future__ import annotations

import ast
import difflib
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import moa
import moa.runtime.launch as kernel_mod
from moa.runtime.tiling import Config
import pytest
import torch
from moa.runtime.measure import instrument


try:  # pytest's default (prepend) import mode puts tests/ on sys.path
    from kernel_cases import (
        D, E, EXAMPLES, F64, GOLDEN, ROOT, TOL, TOL64, _cum_gates, _qkv, _sorted_doc, _with, cast, err, example,
        f64, gen, randn)
except ImportError:  # pragma: no cover
    from tests.kernel_cases import (
        D, E, EXAMPLES, F64, GOLDEN, ROOT, TOL, TOL64, _cum_gates, _qkv, _sorted_doc, _with, cast, err, example,
        f64, gen, randn)


# ---------------------------------------------------------------------------------------------------------
# golden generated source
# ---------------------------------------------------------------------------------------------------------

GOLDEN_CASES = ["causal", "sliding_window"]


@pytest.mark.parametrize("name", GOLDEN_CASES)
def test_golden_source(name):
    src = example(name).source(dtype="float16", nbatch=1)
    path = GOLDEN / f"{name}_float16_nbatch1.py"
    if os.environ.get("MOA_UPDATE_GOLDEN") == "1":
        GOLDEN.mkdir(exist_ok=True)
        path.write_text(src)
    assert path.exists(), f"{path} is missing: run with MOA_UPDATE_GOLDEN=1 to create it"
    want = path.read_text()
    if src != want:
        diff = "".join(difflib.unified_diff(want.splitlines(keepends=True), src.splitlines(keepends=True),
                                            fromfile=f"golden/{path.name}", tofile="generated"))
        pytest.fail(f"generated source of {name}.moa changed (MOA_UPDATE_GOLDEN=1 accepts it):\n{diff}")
    ast.parse(src)


@pytest.mark.parametrize("name,kept", [("causal", False), ("sliding_window", False), ("prefix_lm", False),
                                       ("ring_local", False), ("dilated_window", True)])
def test_skip_test_only_where_the_loop_bounds_do_not_imply_it(name, kept):
    """A skip formula made of J_LO > key_hi / J_HI < key_lo (or conjunctions of such bounds, prefix-LM's
    (J_LO >= p) & (J_LO > I_HI) against key_hi = Max(p - 1, I_HI)) is implied by the loop range: no test, the
    loads stay at the loop's top level (pipelined). The dilated window's modular skip can hold inside the range:
    a scan tests 64 key tiles at a time and only the kept tiles run, again with no test around their loads."""
    from moa import intervals as iv

    k = moa.compile(EXAMPLES / f"{name}.moa", schedule="tiled")
    b = k.schedules["O"].branches[0]
    assert iv.skip_implied_by_range(b.skip, b.key_lo, b.key_hi) is not kept
    spec = k.launcher.spec("O", "float16", 0, Config(128, 64), False, k.schedules["O"])
    assert (("scan", 0) in spec.regions.values()) is kept    # the skip test on vectors of key tiles
    assert ("iter", 0) not in spec.regions.values()            # no loop body under a per-tile test
    assert not any(ln.strip().endswith("== 0:") for ln in spec.source.splitlines())


# ---------------------------------------------------------------------------------------------------------
# storage theorem: the kernel writes the output (and lse) and nothing else
# ---------------------------------------------------------------------------------------------------------


class _AllocInto:
    """Stands in for `torch` inside moa.runtime.launch: every torch.empty returns the next pre-allocated byte
    buffer viewed as the requested tensor, so that the instrumented run knows the outputs' addresses up front.
    Any other allocation (a scratch array) exhausts the list and fails the test."""

    def __init__(self, buffers):
        self.buffers = list(buffers)
        self.requests = []

    def __getattr__(self, name):
        return getattr(torch, name)

    def empty(self, *shape, dtype=None, device=None, **kw):
        shape = tuple(shape[0]) if len(shape) == 1 and isinstance(shape[0], (tuple, list, torch.Size)) else shape
        self.requests.append((shape, dtype))
        assert self.buffers, f"the runtime allocated an unexpected array {shape} {dtype}"
        buf = self.buffers.pop(0)
        nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        assert buf.numel() == nbytes, (shape, dtype, buf.numel())
        return buf.view(dtype).view(shape)


STORAGE = [
    ("causal", {}, torch.float16, True, lambda g: _qkv(g, n=100, hq=(2,))),
    ("sliding_window", {"w": 20}, F64, True, lambda g: _qkv(g, n=130)),
    ("gqa_alibi", {}, torch.float32, True, lambda g: _qkv(g, n=50, hq=(2, 4), hk=(2, 2))),
    ("document_mask", {}, F64, True, lambda g: _with(g, _qkv(g, n=90), doc=lambda g: _sorted_doc(g, 90))),
    ("pi_attention", {"k": 8, "s": 5, "T": 4}, F64, False, lambda g: _with(g, _qkv(g, n=70), wg=lambda g: randn(g, D))),
    ("power_gated", {}, torch.float16, False, lambda g: _with(g, _qkv(g, n=70), G=lambda g: _cum_gates(g, 70))),
]


@pytest.mark.parametrize("name,params,dtype,want_lse,make", STORAGE, ids=[s[0] for s in STORAGE])
def test_storage_theorem(monkeypatch, name, params, dtype, want_lse, make):
    x = cast(make(gen("storage", name)), dtype)
    k = moa.compile(EXAMPLES / f"{name}.moa", form="quadratic", **params)
    ref = k.reference(**f64(x))
    out_shape, lse_shape = ref.shape, ref.shape[:-1]
    size = torch.empty((), dtype=dtype).element_size()
    acc = 8 if dtype == F64 else 4
    o_buf = torch.full((math.prod(out_shape) * size,), 0xFF, dtype=torch.uint8)
    l_buf = torch.full((math.prod(lse_shape) * acc,), 0xFF, dtype=torch.uint8)
    k(**x)  # build and load the kernel outside the measured run
    alloc = _AllocInto([o_buf, l_buf] if want_lse else [o_buf])
    monkeypatch.setattr(kernel_mod, "torch", alloc)
    regions = {nm: t for nm, t in x.items()}
    regions.update(OUT=o_buf, LSE=l_buf)
    with instrument(regions=regions) as c:
        res = k.with_lse(**x) if want_lse else k(**x)
    monkeypatch.undo()
    o = res[0] if want_lse else res
    assert o.data_ptr() == o_buf.data_ptr() and not alloc.buffers
    assert c.launches == 1, "one fused kernel per output"
    stored = {nm: c.stores_by_region[nm] for nm in regions}
    assert stored["OUT"] == o_buf.numel(), "every output element is stored exactly once"
    assert stored["LSE"] == (l_buf.numel() if want_lse else 0)
    assert c.dram_bytes_stored == stored["OUT"] + stored["LSE"], "the kernel stores to memory other than O / lse"
    assert all(stored[nm] == 0 for nm in x), "the kernel stores into an input"
    loaded = {nm: c.loads_by_region[nm] for nm in regions}
    assert loaded["OUT"] == 0 and loaded["LSE"] == 0
    extra = c.dram_bytes_loaded - sum(loaded[nm] for nm in x)
    if all(t.is_floating_point() for t in x.values()):
        assert extra == 0, "the kernel loads from memory that is no input"
    else:   # besides the inputs, only the per-tile (min, max) of ids / flags: per program the row tile's, each
        # key iteration's, and the scan's vectors of 64 key tiles (tiles of >= 16 keys)
        tiles = -(-ref.shape[-2] // 16)
        assert 0 < extra <= 2 * 8 * c.programs * (1 + tiles + 64 * -(-tiles // 64)), "loads of no input"
    if name == "causal":   # the tutorial schedule: each query tile is read once
        assert loaded["Q"] == x["Q"].numel() * size
    assert err(o, ref) <= TOL.get(dtype, TOL64)


# ---------------------------------------------------------------------------------------------------------
# identifiers: hostile but valid names are renamed, never pasted, and renamed injectively
# ---------------------------------------------------------------------------------------------------------

# Each template names its identifiers as {placeholders}; `names` gives the hostile spelling of each.
HOSTILE = {
    # Python / Triton names as inputs and dims
    "python-triton": (
        "dim {n}, {m}, {d}, {e}\nparam {w} = 7\nin {Q}[{n}, {d}], {K}[{m}, {d}], {V}[{m}, {e}], {b}[{m}]\n"
        "{S}[{i}, {j}] = where({j} <= {i} + {w}, dot({Q}[{i}], {K}[{j}]) / sqrt({d}) + {b}[{j}], -inf)\n"
        "out {Out} = softmax({S}, axis=-1) @ {V}\n",
        dict(n="tl", m="triton", d="float", e="range", w="exp2", Q="exp_", K="Q_ptr", V="None", b="lambda",
             S="print", i="self", j="def_", Out="_attn_fwd")),
    # the kernel's own vocabulary as user names
    "kernel-vocabulary": (
        "dim {n}, {d}, {e}\nparam {w} = 3, {c} = 0.5\nin {Q}[{n}, {d}], {K}[{n}, {d}], {V}[{n}, {e}], {b}[{n}]\n"
        "{S}[{i}, {j}] = where({j} <= {i} + {w}, dot({Q}[{i}], {K}[{j}]) / sqrt({d}) + {c} * {b}[{i}], -inf)\n"
        "out {Out} = softmax({S}, axis=-1) @ {V}\n",
        dict(n="BLOCK_M", d="HEAD_DIM", e="start_m", w="acc", c="m_i", Q="offs_m", K="qk0", V="p", b="alpha",
             S="l_i", i="offs_n", j="start_n", Out="out_mask")),
    # a head axis: leading index and dims spelled like the kernel's names
    "heads": (
        "dim {h}, {n}, {d}, {e}\nin {Q}[{h}, {n}, {d}], {K}[{h}, {n}, {d}], {V}[{h}, {n}, {e}]\n"
        "{S}[{a}, {i}, {j}] = where({j} <= {i}, dot({Q}[{a}, {i}], {K}[{a}, {j}]) / sqrt({d}), -inf)\n"
        "out {Out}[{a}] = softmax({S}[{a}], axis=-1) @ {V}[{a}]\n",
        dict(h="pid_z", n="row_lo", d="Z0", e="col_hi", Q="tile_skip", K="m_ij", V="m_safe", S="o0", a="lo0",
             i="hi0", j="ld_1", Out="t1")),
    # an input named like the lse output's offset
    "input-named-lse": (
        "dim {n}, {d}, {e}\nin {Q}[{n}, {d}], {K}[{n}, {d}], {V}[{n}, {e}]\n"
        "out {Out} = softmax({Q} @ {K}.T / sqrt({d}), axis=-1) @ {V}\n",
        dict(n="n", d="d", e="e", Q="Q", K="lse", V="V", Out="O")),
    # an output named lse
    "output-named-lse": (
        "dim {n}, {d}, {e}\nin {Q}[{n}, {d}], {K}[{n}, {d}], {V}[{n}, {e}]\n"
        "out {Out} = softmax({Q} @ {K}.T / sqrt({d}), axis=-1) @ {V}\n",
        dict(n="n", d="d", e="e", Q="Q", K="K", V="V", Out="lse")),
    # an input named like a batch index
    "input-named-z0": (
        "dim {n}, {d}, {e}\nin {Q}[{n}, {d}], {K}[{n}, {d}], {V}[{n}, {e}]\n"
        "out {Out} = softmax({Q} @ {K}.T / sqrt({d}), axis=-1) @ {V}\n",
        dict(n="n", d="d", e="e", Q="z0", K="K", V="V", Out="O")),
    # two inputs whose renamed forms coincide: off_ + 'Q_ptr' == 'off_Q' + _ptr
    "prefix-suffix": (
        "dim {n}, {d}, {e}\nin {Q}[{n}, {d}], {K}[{n}, {d}], {V}[{n}, {e}]\n"
        "out {Out} = softmax({Q} @ {K}.T / sqrt({d}), axis=-1) @ {V}\n",
        dict(n="n", d="d", e="e", Q="Q_ptr", K="off_Q", V="V", Out="O")),
    # a leading index and an input whose renamed forms coincide: idx_ + 'a_ptr' == 'idx_a' + _ptr
    "index-vs-input": (
        "dim {h}, {n}, {d}, {e}\nin {Q}[{h}, {n}, {d}], {K}[{h}, {n}, {d}], {V}[{h}, {n}, {e}]\n"
        "{S}[{a}, {i}, {j}] = dot({Q}[{a}, {i}], {K}[{a}, {j}]) / sqrt({d})\n"
        "out {Out}[{a}] = softmax({S}[{a}], axis=-1) @ {V}[{a}]\n",
        dict(h="h", n="n", d="d", e="e", Q="Q", K="idx_a", V="V", S="S", a="a_ptr", i="i", j="j", Out="O")),
    # a dim and an input whose renamed forms coincide: dim_ + 'X_ptr' == 'dim_X' + _ptr
    "dim-vs-input": (
        "dim {n}, {d}, {e}\nin {Q}[{n}, {d}], {K}[{n}, {d}], {V}[{n}, {e}], {b}[{n}]\n"
        "{S}[{i}, {j}] = dot({Q}[{i}], {K}[{j}]) / sqrt({d}) + {b}[{j}]\n"
        "out {Out} = softmax({S}, axis=-1) @ {V}\n",
        dict(n="n", d="d", e="X_ptr", Q="Q", K="K", V="V", b="dim_X", S="S", i="i", j="j", Out="O")),
}


def _token(k: int) -> str:
    return f"Zq{k}Z"   # no token is a substring of another (Zq1Z vs Zq10Z)


def _kernel_names(src: str) -> set:
    """Every identifier the kernel source binds or reads: names, function arguments, function names."""
    out = set()
    for node in ast.walk(ast.parse(src)):
        if isinstance(node, ast.Name):
            out.add(node.id)
        elif isinstance(node, ast.arg):
            out.add(node.arg)
        elif isinstance(node, ast.FunctionDef):
            out.add(node.name)
    return out


def _hostile(label):
    template, names = HOSTILE[label]
    keys = sorted(names)
    tokens = {key: _token(t) for t, key in enumerate(keys)}
    return template.format(**names), template.format(**tokens), names, tokens


def _make_hostile_inputs(k, g):
    """Inputs for a hostile program: the first dim of a 4-dim program is a head count (3), then n = 37, d = 16,
    e = 24 in declaration order; a batch axis of 2 on every input."""
    dims = list(k.program.dims)
    values = [37, D, E]
    if len(dims) == 4:
        values = [3, 37, D, E]
    env = {dsym: v for dsym, v in zip(dims, values)}
    x = {}
    for node in k.program.inputs:
        shape = [int(ext.subs(env)) for ext in node.shape]
        x[node.attrs[0]] = randn(g, 2, *shape)
    return x


def _name_map(label):
    """(hostile kernel names, neutral kernel names, the substitution neutral -> hostile, tokens)."""
    hostile, neutral, names, tokens = _hostile(label)
    kh, kn = moa.compile(hostile), moa.compile(neutral)
    store_lse = kn.schedules[kn.output_names[0]].has_lse
    src_n = kn.source(dtype="float32", nbatch=1, store_lse=store_lse)
    src_h = kh.source(dtype="float32", nbatch=1, store_lse=store_lse)

    def subst(text):
        for key, tok in tokens.items():
            text = text.replace(tok, names[key])
        return text

    return _kernel_names(src_h), _kernel_names(src_n), subst, tokens


def _clashes(neutral_names, subst) -> dict:
    images = {}
    for nm in neutral_names:
        images.setdefault(subst(nm), []).append(nm)
    return {img: sorted(src) for img, src in images.items() if len(src) > 1}


@pytest.mark.parametrize("label", list(HOSTILE))
def test_identifiers_renamed_injectively(label):
    """The same program is compiled twice: with hostile names and with neutral tokens (Zq0Z, Zq1Z, ...).
    - no token appears as a bare name in the neutral kernel (user names are never pasted verbatim);
    - the hostile kernel's names are exactly the neutral kernel's names with the user's names substituted
      (so a hostile name that equals a user identifier is a renamed form or the kernel's own name);
    - the substitution is injective on the kernel's names: no two variables (a renamed user name and another
      renamed name, or one of the kernel's own names) become one name, which would silently alias them."""
    hostile, _, names, _ = _hostile(label)
    view = moa.compile(hostile).planner.codegen
    if any(k != v for k, v in {**view.inputs, **view.dims}.items()):
        # renamed forms could collide: every user name was replaced by an opaque u<k> (codegen/names.py)
        src = moa.compile(hostile).source(dtype="float32", nbatch=1)
        user = set(names.values())
        fwd = next(f for f in ast.walk(ast.parse(src)) if isinstance(f, ast.FunctionDef) and f.name == "_attn_fwd")
        leaked = sorted(nm for nm in _kernel_names(ast.unparse(fwd)) if nm in user or any(
            nm in (f"{u}_ptr", f"off_{u}", f"dim_{u}", f"idx_{u}") for u in user)
            and not re.fullmatch(r"off_z\d+|off_lse", nm))  # the kernel's own batch / lse offsets
        assert not leaked, f"user identifiers in a renamed kernel: {leaked}"
        return
    hostile_names, neutral_names, subst, tokens = _name_map(label)
    bare = sorted(t for t in tokens.values() if t in neutral_names)
    assert not bare, f"user identifiers pasted verbatim into the kernel: {bare}"
    clashes = _clashes(neutral_names, subst)
    assert not clashes, f"distinct kernel names collide once the user's names are substituted: {clashes}"
    assert hostile_names == {subst(nm) for nm in neutral_names}


_CHILD = """
import json, sys
sys.path.insert(0, {tests!r})
import test_kernels_source as T
print("RESULT " + json.dumps(T._hostile_errors({label!r})))
"""


def _hostile_errors(label) -> dict:
    """Run a hostile program (batch axis 2, O and with_lse) and return its errors against the reference."""
    hostile, _, _, _ = _hostile(label)
    k = moa.compile(hostile)
    x = _make_hostile_inputs(k, gen("hostile", label))
    ref = k.reference(**x)
    out = {"O": err(k(**x), ref)}
    if k.schedules[k.output_names[0]].has_lse:
        o, lse = k.with_lse(**x)
        out["O (with_lse)"] = err(o, ref)
        out["lse finite"] = bool(torch.isfinite(lse).all())
    return out


@pytest.mark.parametrize("label", list(HOSTILE))
def test_identifiers_hostile_programs_run(label):
    _, neutral_names, subst, _ = _name_map(label)
    if not _clashes(neutral_names, subst):
        res = _hostile_errors(label)
    else:
        # aliased pointers / offsets make the interpreter read and write wild addresses (heap corruption):
        # run it in a child process so that the failure is reported instead of killing the test session
        code = _CHILD.format(tests=str(Path(__file__).resolve().parent), label=label)
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                              cwd=str(ROOT), env=dict(os.environ))
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        assert proc.returncode == 0 and lines, (f"the kernel crashed (exit {proc.returncode}):\n"
                                                f"{proc.stderr[-1500:]}")
        res = json.loads(lines[-1][len("RESULT "):])
    bad = {key: v for key, v in res.items() if v is False or (not isinstance(v, bool) and v > TOL64)}
    assert not bad, f"wrong results for program {label!r}: {bad}"


def test_renamed_names_match_the_documented_scheme():
    # the README / docs promise: tutorial naming in the kernel, user names behind prefixes and suffixes
    src = example("causal").source(dtype="float16", nbatch=1)
    for word in ("_attn_fwd", "BLOCK_M", "BLOCK_N", "HEAD_DIM", "offs_m", "acc", "m_i", "l_i", "stride_Q_0",
                 "Q_ptr", "dim_n"):
        assert re.search(rf"\b{word}", src), word
