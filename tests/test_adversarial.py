"""Code generation safety (issue 7.2): an adversarial corpus of programs written against the code generator.

Every program is either rejected with a clear MoaError (class and message fragment checked) or accepted; an
accepted program's generated Triton source is proven hygienic by comparing it with the same program where the
hostile name is replaced by a neutral one (alpha-renaming):

- token for token the two sources are equal, except identifiers derived from user names, and those are
  renamed forms (X_ptr, stride_X_k, stride_X_zk, off_X, dim_X, idx_X of a user name, or of the opaque u<k>
  that codegen/names.py substitutes when affixed forms could meet), never a bare user name;
- the identifier map neutral -> hostile is a bijection: no renamed user name coincides with a name of the
  kernel's own and no two user names merge (this caught inputs `z0`, `z1` and output `lse`, whose `off_X`
  was the kernel's batch / lse offset, before codegen/names.py);
- every comment is one line of printable ASCII (no newline injection through names, file names, DNF text);
- the source parses (ast), string constants are only "inf", "-inf", "ieee", "tf32", attributes come from a fixed set;
- the kernel runs (Triton interpreter, float64, with a batch axis) and matches the float64 reference.
"""
from __future__ import annotations

import ast
import io
import re
import tokenize
from pathlib import Path

import pytest
import torch

import moa
from moa import ir
from moa.runtime import cache

ROOT = Path(__file__).resolve().parent.parent
NEUTRAL = "Uq7"

# ---- program templates: one hostile name X in one role ---------------------------------------------------------

TEMPLATES = {
    "input": ("dim n, d\nin {X}[n, d], K[n, d], V[n, d]\n"
              "S[i, j] = where(j <= i, dot({X}[i], K[j]) / sqrt(d), -inf)\nout O = softmax(S, axis=-1) @ V\n",
              ("{X}", "K", "V")),
    "dim": ("dim {X}, d\nin Q[{X}, d], K[{X}, d], V[{X}, d]\n"
            "S[i, j] = where(j <= i, dot(Q[i], K[j]) / sqrt(d), -inf)\nout O = softmax(S, axis=-1) @ V\n",
            ("Q", "K", "V")),
    "output": ("dim n, d\nin Q[n, d], K[n, d], V[n, d]\n"
               "S[i, j] = where(j <= i, dot(Q[i], K[j]) / sqrt(d), -inf)\nout {X} = softmax(S, axis=-1) @ V\n",
               ("Q", "K", "V")),
    "array": ("dim n, d\nin Q[n, d], K[n, d], V[n, d]\n"
              "{X}[i, j] = where(j <= i, dot(Q[i], K[j]) / sqrt(d), -inf)\nout O = softmax({X}, axis=-1) @ V\n",
              ("Q", "K", "V")),
    "row_index": ("dim n, d\nin Q[n, d], K[n, d], V[n, d]\n"
                  "S[{X}, j] = where(j <= {X}, dot(Q[{X}], K[j]) / sqrt(d), -inf)\n"
                  "out O = softmax(S, axis=-1) @ V\n", ("Q", "K", "V")),
    "key_index": ("dim n, d\nin Q[n, d], K[n, d], V[n, d]\n"
                  "S[i, {X}] = where({X} <= i, dot(Q[i], K[{X}]) / sqrt(d), -inf)\n"
                  "out O = softmax(S, axis=-1) @ V\n", ("Q", "K", "V")),
    "lead_index": ("dim h, n, d\nin Q[h, n, d], K[h, n, d], V[h, n, d]\n"
                   "S[{X}, i, j] = where(j <= i, dot(Q[{X}, i], K[{X}, j]) / sqrt(d), -inf)\n"
                   "out O[{X}] = softmax(S[{X}], axis=-1) @ V[{X}]\n", ("Q", "K", "V")),
    "param": ("dim n, d\nparam {X} = 2\nin Q[n, d], K[n, d], V[n, d]\n"
              "S[i, j] = where(j <= i and i - j <= {X}, dot(Q[i], K[j]) / sqrt(d), -inf)\n"
              "out O = softmax(S, axis=-1) @ V\n", ("Q", "K", "V")),
}
TEMPLATE_NAMES = {"n", "d", "h", "i", "j", "Q", "K", "V", "S", "O"}

# names a user could write against Python, Triton or the generated kernel; each is accepted and renamed
ACCEPTED = [
    ("os", "input"), ("exec", "dim"), ("eval", "output"), ("tl", "input"), ("tl", "dim"), ("triton", "array"),
    ("Q_ptr", "input"), ("K_ptr", "output"), ("dim_n", "dim"), ("idx_a", "lead_index"), ("offs_m", "row_index"),
    ("offs_n", "key_index"), ("BLOCK_M", "param"), ("BLOCK_N", "dim"), ("acc", "input"), ("m_i", "output"),
    ("acc0", "array"), ("m_i0", "input"), ("l_i0", "dim"), ("qk0", "output"), ("p", "input"), ("alpha", "dim"),
    ("lambda", "input"), ("import", "output"), ("if", "dim"), ("class", "lead_index"), ("None", "dim"),
    ("True", "input"), ("False", "param"), ("self", "input"), ("float", "dim"), ("range", "row_index"),
    ("print", "param"), ("Z0", "input"), ("off_z0", "input"), ("pid_z", "lead_index"), ("start_m", "dim"),
    ("HEAD_DIM", "input"), ("HEAD_DIM_V", "dim"), ("_mod", "input"), ("_floordiv", "dim"), ("_attn_fwd", "output"),
    ("lse_out", "input"), ("x__", "input"), ("_", "dim"), ("_x", "lead_index"), ("x" * 64, "input"),
    ("x" * 64, "dim"), ("I", "dim"), ("E", "input"), ("oo", "dim"), ("pi", "param"), ("zoo", "output"),
    ("nan", "input"), ("inf_", "dim"), ("Infinity", "output"), ("STORE_LSE", "input"), ("tile_skip", "dim"),
    ("start_n", "key_index"), ("row_lo", "row_index"), ("out_mask", "output"), ("t1", "input"), ("ld_1", "dim"),
]
# names whose affixed forms are kernel names: input z0 -> off_z0 is also the first batch offset, output lse ->
# off_lse the lse offset (once silently wrong results; codegen/names.py now renames such programs opaquely)
CODEGEN_COLLISIONS = {
    ("z0", "input"): "input z0 -> off_z0, the batch offset off_z0",
    ("z1", "input"): "input z1 -> off_z1, the second batch offset",
    ("lse", "output"): "output lse -> off_lse, the lse row offset",
}
# two user names whose renamed forms meet: (template, first name, second name)
PAIR_TEMPLATES = {
    "two-inputs": ("dim n, d\nin {A}[n, d], {B}[n, d], V[n, d]\n"
                   "S[i, j] = where(j <= i, dot({A}[i], {B}[j]) / sqrt(d), -inf)\nout O = softmax(S, axis=-1) @ V\n",
                   ("{A}", "{B}", "V")),
    "dim-input": ("dim {A}, d\nin {B}[{A}, d], K[{A}, d], V[{A}, d]\n"
                  "S[i, j] = where(j <= i, dot({B}[i], K[j]) / sqrt(d), -inf)\nout O = softmax(S, axis=-1) @ V\n",
                  ("{B}", "K", "V")),
    "input-output": ("dim n, d\nin {A}[n, d], K[n, d], V[n, d]\n"
                     "S[i, j] = where(j <= i, dot({A}[i], K[j]) / sqrt(d), -inf)\n"
                     "out {B} = softmax(S, axis=-1) @ V\n", ("{A}", "K", "V")),
    "lead-input": ("dim h, n, d\nin {B}[h, n, d], K[h, n, d], V[h, n, d]\n"
                   "S[{A}, i, j] = where(j <= i, dot({B}[{A}, i], K[{A}, j]) / sqrt(d), -inf)\n"
                   "out O[{A}] = softmax(S[{A}], axis=-1) @ V[{A}]\n", ("{B}", "K", "V")),
}
PAIRS = [
    ("two-inputs", "Q_ptr", "off_Q"),      # off_Q_ptr: the offset of Q_ptr and the pointer of off_Q
    ("two-inputs", "off_K", "K_ptr"),
    ("two-inputs", "a", "a_0"),            # stride_a_0_0 vs stride_a_0 ...: distinct, must stay distinct
    ("two-inputs", "stride_Q", "Q"),
    ("dim-input", "Q_ptr", "dim_Q"),       # dim_Q_ptr: the dim Q_ptr and the pointer of dim_Q
    ("dim-input", "n", "dim_n"),
    ("input-output", "O_ptr", "off_O"),
    ("input-output", "z0", "lse"),
    ("lead-input", "Q_ptr", "idx_Q"),      # idx_Q_ptr: the index Q_ptr and the pointer of idx_Q
    ("lead-input", "u0", "u1"),            # the opaque scheme's own names, written by the user
]

REJECTED = [  # (name, role, error class, message fragment)
    ("__import__", "input", moa.ParseError, "names starting with '__' are reserved"),
    ("__class__", "dim", moa.ParseError, "names starting with '__' are reserved"),
    ("__x", "output", moa.ParseError, "names starting with '__' are reserved"),
    ("__builtins__", "param", moa.ParseError, "names starting with '__' are reserved"),
    ("dim", "input", moa.ParseError, "keyword"),
    ("in", "dim", moa.ParseError, "keyword"),
    ("out", "array", moa.ParseError, "keyword"),
    ("where", "output", moa.ParseError, "keyword"),
    ("inf", "param", moa.ParseError, "keyword"),
    ("not", "row_index", moa.ParseError, "keyword"),
    ("exp", "input", moa.ParseError, "builtin"),
    ("softmax", "dim", moa.ParseError, "builtin"),
    ("dot", "array", moa.ParseError, "builtin"),
    ("sum", "lead_index", moa.ParseError, "builtin"),
    ("x" * 65, "input", moa.ParseError, "65 characters long; at most 64"),
    ("a" * 10_000, "dim", moa.ParseError, "10000 characters long; at most 64"),
    ("Q\u0430", "input", moa.ParseError, "unexpected character"),      # Cyrillic a
    ("\u0430", "dim", moa.ParseError, "unexpected character"),         # Cyrillic a alone
    ("\uff31", "input", moa.ParseError, "unexpected character"),       # fullwidth Q
    ("\uff4e", "dim", moa.ParseError, "unexpected character"),         # fullwidth n
    ("Q\u200b", "input", moa.ParseError, "unexpected character"),      # zero-width space
    ("\u0391", "output", moa.ParseError, "unexpected character"),      # Greek capital alpha
    ("caf\u00e9", "param", moa.ParseError, "unexpected character"),    # Latin-1 letter
    ("x\x00", "input", moa.ParseError, "unexpected character"),        # NUL
    ("Q'", "input", moa.ParseError, "unexpected character"),
    ('Q"', "output", moa.ParseError, "unexpected character"),
    ("Q\\n", "input", moa.ParseError, "unexpected character"),
    ("Q;import os", "input", moa.ParseError, "unexpected character"),
]

# numbers and comments in an otherwise fixed program: (score expression or comment, error class, fragment)
BODY = ("dim n, d\nin Q[n, d], K[n, d], V[n, d]\n"
        "S[i, j] = where(j <= i, dot(Q[i], K[j]) / sqrt(d) + {X}, -inf)\nout O = softmax(S, axis=-1) @ V\n")
NUMBERS = [
    ("1e999", moa.ParseError, "out of the float64 range"),
    ("-1e999", moa.ParseError, "out of the float64 range"),
    ("nan", moa.ParseError, "name 'nan' is not defined"),
    ("NaN", moa.ParseError, "name 'NaN' is not defined"),
    ("99999999999999999999", moa.ParseError, "is too large"),
    ("9" * 5000, moa.ParseError, "is too large"),
    ("2 ^ 64", moa.ShapeError, "overflows int64"),
    ("2 ^ 99999999", moa.ShapeError, "overflows int64"),
    ("10 ^ 18 ^ 18", moa.ShapeError, "overflows int64"),
    ("999999999999999999 * 999999999999999999", moa.ShapeError, "overflows int64"),
    ("(i + 999999999999999999 * 10) * 0", moa.ShapeError, "overflows int64"),
    ("0x1F", moa.ParseError, "unexpected"),
    ("1_000", moa.ParseError, "unexpected"),
    ("1 / 0.0", moa.ShapeError, "division by zero"),
    ("1 // 0", moa.ShapeError, "division by zero"),
    ("(i - j) % (n - n)", moa.ShapeError, "division by zero"),
    ("sum(iota(3000000000))", moa.ShapeError, "more than 2^31 - 1"),
    ("-0.0", None, None),
    ("1e-999", None, None),
    ("1e308", None, None),
    ("1.5e308 * 10 * 0", None, None),      # folds to inf * 0 at run time: NaN like the reference
    ("123456789012345678 * 0.0", None, None),
    ("0.000000000000000000000000000001", None, None),
    ("2 ^ 62 - 2 ^ 62", None, None),
    (".5e-3", None, None),
]
COMMENTS = [
    "# ''' \"\"\" \\ \\\\ \\n \\x00 {X}",
    "# \x00 NUL and \x1b[31m escape",
    "# \u2028 import os \u2029 line separators",
    "# '; import os; '",
    "#" * 5000,
    "# \\",
    "# \"\"\"\nimport os\n\"\"\"",       # the newline ends the comment: `import os` is then a parse error
]

ALLOWED_STRINGS = {"inf", "-inf", "ieee", "tf32"}


# ---- helpers --------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module", autouse=True)
def _private_cache(tmp_path_factory):
    import os

    old = os.environ.get("MOA_CACHE_DIR")
    os.environ["MOA_CACHE_DIR"] = str(tmp_path_factory.mktemp("adversarial-cache"))
    yield
    if old is None:
        os.environ.pop("MOA_CACHE_DIR", None)
    else:
        os.environ["MOA_CACHE_DIR"] = old


def program(role: str, name: str) -> str:
    return TEMPLATES[role][0].replace("{X}", name)


def sources(k) -> list[str]:
    """Every generated source the program has: per output, float64 and float16, 0, 1 and 2 batch axes, and
    the lse variant when there is one."""
    out = []
    for o in k.output_names:
        for dtype, nbatch in (("float64", 1), ("float16", 0), ("float32", 2)):
            out.append(k.source(o, dtype=dtype, nbatch=nbatch, store_lse=True))
    return out


def _tokens(src: str):
    skip = {tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT, tokenize.ENCODING,
            tokenize.ENDMARKER}
    return [t for t in tokenize.generate_tokens(io.StringIO(src).readline) if t.type not in skip]


def check_source(src: str):
    """Facts every generated source satisfies, whatever the program (a split schedule's source: each of its
    kernel modules, after the '# ---- kernel i of n' line k.source puts before each)."""
    parts = re.split(r"^# ---- kernel \d+ of \d+ .*\n", src, flags=re.M)
    if len(parts) > 1:
        assert parts[0] == "" and len(parts) >= 3
        for part in parts[1:]:
            check_source(part)
        return
    tree = ast.parse(src)
    compile(tree, "<generated>", "exec")
    imports = [n for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))]
    assert [a.name for n in imports for a in n.names] == ["triton", "triton.language"]
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            assert node.value in ALLOWED_STRINGS, node.value
        if isinstance(node, ast.Constant) and isinstance(node.value, bytes):
            raise AssertionError("bytes constant in generated source")
        if isinstance(node, ast.Attribute):
            assert re.fullmatch(r"[a-z_0-9]+", node.attr) and not node.attr.startswith("__"), node.attr
        if isinstance(node, ast.Name):
            assert not node.id.startswith("__"), node.id
            assert node.id not in {"exec", "eval", "open", "compile", "getattr", "setattr", "globals", "locals",
                                   "vars", "input", "breakpoint", "os", "sys", "builtins"}, node.id
        if isinstance(node, (ast.Lambda, ast.ClassDef, ast.Global, ast.Nonlocal, ast.With, ast.Try, ast.Raise,
                             ast.Delete, ast.Await, ast.Yield)):
            raise AssertionError(f"unexpected {type(node).__name__} in generated source")
    for t in _tokens(src):
        if t.type == tokenize.COMMENT:
            assert all(32 <= ord(c) < 127 for c in t.string), repr(t.string)


def user_names(k) -> set:
    """Every name the program's text declares: dims, params, inputs, arrays, index variables."""
    p = k.program
    names = {n.attrs[0] for n in p.inputs} | {n for n, _ in p.bindings} | {d.name for d in p.dims}
    names |= {n for n, _ in p.params}
    for _, node in p.bindings:
        for n in ir.walk([node]):
            if n.op == "comp":
                names |= {v.name for v in n.attrs[0]}
    return names


def _derived(tok: str, names: set) -> bool:
    """Is tok a renamed form (X_ptr, off_X, dim_X, idx_X, stride_X_k, stride_X_zk) of one of `names`, or of an
    opaque codegen name u<k> (the scheme of codegen/names.py when affixed forms could collide)?"""
    bases = []
    if tok.endswith("_ptr"):
        bases.append(tok[:-4])
    for prefix in ("off_", "dim_", "idx_"):
        if tok.startswith(prefix):
            bases.append(tok[len(prefix):])
    if tok.startswith("stride_"):
        body = tok[len("stride_"):]
        bases += [body[:i] for i, c in enumerate(body) if c == "_" and re.fullmatch(r"z?\d+", body[i + 1:])]
    return any(b in names or re.fullmatch(r"u\d+", b) for b in bases)


def check_alpha(hostile: str, neutral: str, hostile_names: set, neutral_names: set):
    """The hostile source is alpha-equivalent to the neutral one: equal token for token, except identifiers
    derived from user names, which are renamed forms (X_ptr, off_X, stride_X_k, stride_X_zk, dim_X, idx_X, of
    a user name or of an opaque u<k>); and the identifier map is a bijection (no capture by a kernel name, no
    two user names merged). A user name never appears bare (except where it equals a kernel name anyway)."""
    th, tn = _tokens(hostile), _tokens(neutral)
    assert len(th) == len(tn), "token counts differ"
    mapping: dict = {}
    for a, b in zip(th, tn):
        assert a.type == b.type, (a, b)
        if b.type == tokenize.NAME:
            if _derived(b.string, neutral_names):
                assert _derived(a.string, hostile_names), f"not a renamed form: {a.string!r} (neutral {b.string})"
            else:   # a kernel name: identical
                assert a.string == b.string, (a.string, b.string)
            assert mapping.setdefault(b.string, a.string) == a.string, (b.string, a.string)
        elif b.type != tokenize.COMMENT:
            assert a.string == b.string, (a.string, b.string)
    inverse: dict = {}
    for src_name, dst_name in mapping.items():
        other = inverse.setdefault(dst_name, src_name)
        assert other == src_name, f"'{dst_name}' names both {other} and {src_name} in the kernel (capture)"


def call_inputs(role: str, name: str, seed=0):
    g = torch.Generator().manual_seed(seed)
    lead = (2,) if role == "lead_index" else ()
    names = [x.replace("{X}", name) for x in TEMPLATES[role][1]]
    return {x: torch.randn(2, *lead, 9, 5, generator=g, dtype=torch.float64) for x in names}


def run_and_compare(k, ins):
    out = k(**ins)
    ref = k.reference(**ins)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    if len(k.output_names) == 1 and k.schedules[k.output_names[0]].has_lse:
        o, lse = k.with_lse(**ins)
        torch.testing.assert_close(o, ref, rtol=1e-10, atol=1e-10)
        assert torch.isfinite(lse).all()


def accepted_case(name, role):
    assert name not in TEMPLATE_NAMES
    k = moa.compile(program(role, name))
    kn = moa.compile(program(role, NEUTRAL))
    for hs, ns in zip(sources(k), sources(kn)):
        check_source(hs)
        check_alpha(hs, ns, user_names(k), user_names(kn))
    run_and_compare(k, call_inputs(role, name))


# ---- tests ----------------------------------------------------------------------------------------------------

def test_corpus_size():
    n = len(ACCEPTED) + len(CODEGEN_COLLISIONS) + len(PAIRS) + len(REJECTED) + len(NUMBERS) + len(COMMENTS)
    assert n >= 50, n


@pytest.mark.parametrize("name,role", ACCEPTED, ids=[f"{r}-{n[:12]}" for n, r in ACCEPTED])
def test_hostile_name_is_renamed(name, role):
    accepted_case(name, role)


@pytest.mark.parametrize("name,role", sorted(CODEGEN_COLLISIONS), ids=[f"{r}-{n}" for n, r in
                                                                      sorted(CODEGEN_COLLISIONS)])
def test_codegen_name_collisions(name, role):
    """Names whose affixed form is a kernel-internal name: renamed apart, the kernel is right."""
    accepted_case(name, role)


@pytest.mark.parametrize("template,a,b", PAIRS, ids=[f"{t}-{a}-{b}" for t, a, b in PAIRS])
def test_colliding_pairs_of_user_names(template, a, b):
    text, ins = PAIR_TEMPLATES[template]
    k = moa.compile(text.replace("{A}", a).replace("{B}", b))
    kn = moa.compile(text.replace("{A}", NEUTRAL).replace("{B}", "Vq8"))
    for hs, ns in zip(sources(k), sources(kn)):
        check_source(hs)
        check_alpha(hs, ns, user_names(k), user_names(kn))
    g = torch.Generator().manual_seed(4)
    lead = (2,) if template == "lead-input" else ()
    call = {x.replace("{A}", a).replace("{B}", b): torch.randn(2, *lead, 9, 5, generator=g, dtype=torch.float64)
            for x in ins}
    run_and_compare(k, call)
    # the cost model reads the renamed schedules with the user's dims and writes formulas in the user's names
    size = {x.name: v for x, v in zip(k.program.dims, (7, 5, 3))}
    got = k.cost(device="cpu", dtype="fp64", **size)
    want = kn.cost(device="cpu", dtype="fp64", **{x.name: v for x, v in zip(kn.program.dims, (7, 5, 3))})
    assert (got.flops, got.dram_bytes, got.tiles_visited) == (want.flops, want.dram_bytes, want.tiles_visited)
    assert {x.name for x in k.cost().flops.free_symbols} & set(k.planner.codegen.dims) <= set(size)


@pytest.mark.parametrize("name,role,cls,fragment", REJECTED,
                         ids=[f"{r}-{ascii(n)[1:13]}" for n, r, _, _ in REJECTED])
def test_hostile_name_is_rejected(name, role, cls, fragment):
    text = program(role, name)
    with pytest.raises(cls) as info:
        moa.compile(text)
    e = info.value
    assert fragment in e.message, e.message
    assert e.line is not None and e.column is not None
    assert len(str(e)) < 1000   # a 10,000-character name is not echoed back


@pytest.mark.parametrize("expr,cls,fragment", NUMBERS, ids=[ascii(x)[1:30] for x, _, _ in NUMBERS])
def test_numbers(expr, cls, fragment):
    text = BODY.replace("{X}", expr)
    if cls is not None:
        with pytest.raises(cls) as info:
            moa.compile(text)
        assert fragment in info.value.message, info.value.message
        assert info.value.line == 3 and info.value.column is not None
        return
    k = moa.compile(text)
    for src in sources(k):
        check_source(src)
    g = torch.Generator().manual_seed(1)
    ins = {x: torch.randn(2, 7, 4, generator=g, dtype=torch.float64) for x in ("Q", "K", "V")}
    out, ref = k(**ins), k.reference(**ins)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10, equal_nan=True)


@pytest.mark.parametrize("comment", COMMENTS, ids=[f"comment{i}" for i in range(len(COMMENTS))])
def test_comments_never_reach_the_source(comment):
    base = program("input", "Qx")
    text = comment.replace("{X}", "Qx") + "\n" + base.replace("\nout", f"  {comment}\nout", 1)
    if "\nimport os" in comment:
        with pytest.raises(moa.ParseError):
            moa.compile(text)
        return
    k = moa.compile(text)
    clean = moa.compile(base)
    for a, b in zip(sources(k), sources(clean)):
        assert a == b   # comments are dropped by the lexer: the generated source is unchanged


def test_crlf_and_continuations_do_not_change_the_source():
    base = program("input", "Qx")
    variant = base.replace("\n", "\r\n").replace("dot(Qx[i], K[j])", "dot(Qx[i], \\\n   K[j])")
    assert sources(moa.compile(variant)) == sources(moa.compile(base))


def test_file_name_cannot_inject_lines(tmp_path):
    """The program name (the file name) goes into the header comment: a newline in it must not escape."""
    evil = tmp_path / "evil\nimport os\nos.system('echo owned')\n#.moa"
    evil.write_text(program("input", "Qx"))
    k = moa.compile(evil)
    for src in sources(k):
        check_source(src)
        tree = ast.parse(src)
        calls = [n.func.attr for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute)]
        assert "system" not in calls
        for line in src.splitlines():
            assert not line.startswith("import os") and not line.startswith("os.")


def test_examples_generate_hygienic_sources():
    for path in sorted((ROOT / "examples").glob("*.moa")):
        k = moa.compile(path)
        for o in k.output_names:
            try:
                srcs = [k.source(o, dtype="float64", nbatch=1, store_lse=True)]
            except moa.UnsupportedError:
                continue   # forms generated by other runners
            for src in srcs:
                check_source(src)


def test_cached_module_is_the_checked_source(tmp_path, monkeypatch):
    """What is executed is exactly the generated text (digest line + source), whatever a name contains."""
    monkeypatch.setenv("MOA_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(cache, "_LOADED", {})
    k = moa.compile(program("input", "lambda"))
    run_and_compare(k, call_inputs("input", "lambda"))
    entries = sorted((tmp_path / "kernels").iterdir())
    assert len(entries) == 2   # O, and O with lse
    for entry in entries:
        text = cache._read_valid(entry)
        check_source(text)
        names = {t.string for t in _tokens(text) if t.type == tokenize.NAME}
        assert "lambda_ptr" in names and "off_lambda" in names and "lambda" not in names
