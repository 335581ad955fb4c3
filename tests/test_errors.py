"""Malformed and ill-shaped programs: each raises ParseError or ShapeError at the right line:column, with a
message that says what is wrong and the source line with a caret. Undecidable facts become runtime guards."""
from __future__ import annotations

import pytest
import torch

import moa
from moa import InputError, MoaError, ParseError, ShapeError
from moa.frontend import elaborate
from moa.runtime.reference import reference

H = "dim n, d\nin Q[n, d], K[n, d]\n"  # two header lines: the statement under test is on line 3

# id, source, error class, line, column, a fragment of the message
CASES = [
    # ---- syntax ------------------------------------------------------------------------------------------
    ("syntax-two-ops", H + "out O = Q +* K\n", ParseError, 3, 12, "unexpected '*'"),
    ("syntax-missing-eq", H + "out O Q\n", ParseError, 3, 7, "expected '=', '['"),
    ("syntax-double-eq", H + "out O = = Q\n", ParseError, 3, 9, "unexpected '='"),
    ("syntax-unclosed-paren", H + "out O = (Q + K\n", ParseError, 3, 15, "expected ')'"),
    ("syntax-unclosed-bracket", H + "out O = Q[0\n", ParseError, 3, 12, "expected ',', ']'"),
    ("syntax-end-of-line", H + "out O = Q +", ParseError, 3, 12, "unexpected end of line"),
    ("syntax-end-of-input", H + "out O = Q + \\", ParseError, 3, 14, "unexpected end of input"),
    ("syntax-dim-without-names", "dim", ParseError, 1, 4, "expected a name"),
    ("unknown-character", H + "out O = Q $ K\n", ParseError, 3, 11, "unexpected character '$'"),
    ("unknown-unicode-character", H + "out O = Q \u00d7 K\n", ParseError, 3, 11,
     "unexpected character '\u00d7'"),
    ("non-ascii-name", H + "out O\u00e9 = Q\n", ParseError, 3, 6, "names are ASCII letters, digits and _"),
    ("bare-list", H + "out O = [1, 2]\n", ParseError, 3, 9, "a list [...] is only allowed"),
    # ---- names -------------------------------------------------------------------------------------------
    ("keyword-out-as-name", H + "out = Q\n", ParseError, 3, 5,
     "'out' is a keyword and cannot be used as a name"),
    ("keyword-param-as-name", H + "param = 3\nout O = Q\n", ParseError, 3, 7, "'param' is a keyword"),
    ("keyword-in-as-input", "dim n\nin in[n]\nout O = in\n", ParseError, 2, 4,
     "'in' is a keyword and cannot name an input"),
    ("keyword-in-as-dim", "dim in\n", ParseError, 1, 5, "'in' is a keyword and cannot name a dim"),
    ("keyword-in-as-index", H + "out O[in] = Q[in]\n", ParseError, 3, 7, "'in' is a keyword"),
    ("keyword-where-as-array", H + "where = Q\nout O = Q\n", ParseError, 3, 1, "'where' is a keyword"),
    ("keyword-not-as-array", H + "not = Q\nout O = Q\n", ParseError, 3, 1, "'not' is a keyword"),
    ("undefined-did-you-mean", H + "out O = Qq + K\n", ParseError, 3, 9,
     "name 'Qq' is not defined; did you mean 'Q'?"),
    ("undefined-function-did-you-mean", H + "out O = expp(Q)\n", ParseError, 3, 9, "did you mean 'exp'?"),
    ("undefined-dim-in-shape", "dim n\nin Q[n, d]\nout O = Q\n", ParseError, 2, 9, "name 'd' is not defined"),
    ("rebind-array", H + "S = Q\nS = K\nout O = S\n", ParseError, 4, 1, "'S' is already defined"),
    ("rebind-dim-as-input", H + "in n[n]\nout O = Q\n", ParseError, 3, 4, "'n' is already defined"),
    ("rebind-dim-later", H + "out O = Q\ndim n\n", ParseError, 4, 5, "names are bound once"),
    ("builtin-as-name", H + "exp = Q\nout O = exp\n", ParseError, 3, 1, "'exp' is a builtin function"),
    ("builtin-not-called", H + "out O = exp + Q\n", ParseError, 3, 9, "builtin 'exp' must be called"),
    ("array-called", H + "out O = Q(1)\n", ParseError, 3, 9, "'Q' is an array, not a function"),
    ("name-too-long", H + "out " + "x" * 100 + " = Q\n", ParseError, 3, 5, "100 characters long"),
    ("name-dunder", H + "out __x = Q\n", ParseError, 3, 5, "names starting with '__' are reserved"),
    ("index-variable-twice", H + "out O[i, i] = Q[i, i]\n", ParseError, 3, 10,
     "index variable 'i' appears twice"),
    ("no-output", H + "O = Q\n", ParseError, 1, 1, "the program has no output"),
    ("only-a-comment", "# nothing here\n", ParseError, 1, 1, "the program has no output"),
    # ---- calls -------------------------------------------------------------------------------------------
    ("arity-exp", H + "out O = exp(Q, K)\n", ParseError, 3, 9, "exp() takes 1 argument, got 2"),
    ("arity-where", H + "out O = where(Q > 0, K)\n", ParseError, 3, 9, "where() takes 3 arguments, got 2"),
    ("unknown-keyword", H + "out O = softmax(Q, dim=1)\n", ParseError, 3, 9, "unexpected keyword 'dim'"),
    ("keyword-twice", H + "out O = softmax(Q, axis=0, axis=1)\n", ParseError, 3, 28,
     "keyword 'axis' given twice"),
    ("positional-after-keyword", H + "out O = softmax(axis=0, Q)\n", ParseError, 3, 25,
     "positional argument after a keyword"),
    ("chained-comparison", H + "out O[i:n] = where(0 <= i <= 8, Q[i], Q[i])\n", ParseError, 3, 27,
     "comparisons do not chain"),
    ("python-power", H + "out O = Q ** 2\n", ParseError, 3, 12, "a power is written x ^ p"),
    ("min-three-arguments", H + "out O = min(Q, K, Q)\n", ParseError, 3, 9, "min() takes 1 or 2 arguments, got 3"),
    ("sum-rank2-without-axis", H + "out O = sum(Q)\n", ParseError, 3, 9,
     "sum() of a rank-2 array needs axis=k"),
    ("axis-not-literal", H + "out O = sum(Q, axis=1.0)\n", ParseError, 3, 21,
     "axis must be an integer literal"),
    ("axis-out-of-range", H + "out O = sum(Q, axis=2)\n", ShapeError, 3, 9,
     "axis 2 is out of range for shape <n d>"),
    ("axis-out-of-range-negative", H + "out O = softmax(Q, axis=-3)\n", ShapeError, 3, 9,
     "axis -3 is out of range"),
    ("softmax-of-scalar", H + "out O = softmax(3.0)\n", ShapeError, 3, 9, "needs an array, got a scalar"),
    ("outer-bad-op", H + "out O = outer(foo, Q, K)\n", ParseError, 3, 15, "op must be one of"),
    ("dot-of-matrices", H + "out O = dot(Q, K)\n", ShapeError, 3, 9, "dot(a, b) needs two vectors"),
    ("attribute-unknown", H + "out O = Q.X\n", ParseError, 3, 11, "unknown attribute '.X'"),
    # ---- shapes ------------------------------------------------------------------------------------------
    ("elementwise-d-vs-d+1", "dim n, d\nin Q[n, d], K[n, d + 1]\nout O = Q + K\n", ShapeError, 3, 11,
     "shapes <n d> and <n d + 1> do not conform (d != d + 1)"),
    ("elementwise-constants", "dim n\nin Q[n, 4], K[n, 5]\nout O = Q * K\n", ShapeError, 3, 11, "(4 != 5)"),
    ("elementwise-rank", "dim n, d\nin Q[n, d], K[n]\nout O = Q * K\n", ShapeError, 3, 11,
     "differ in rank (2 vs 1)"),
    ("where-branches", "dim n, d\nin Q[n, d], K[n, d + 1]\nout O = where(Q > 0, Q, K)\n", ShapeError, 3, 9,
     "'where': shapes <n d> and <n d + 1>"),
    ("matmul-contraction", "dim n, d\nin Q[n, d], K[n, d + 1]\nout O = Q @ K.T\n", ShapeError, 3, 11,
     "'@' (contracting <n d> with <d + 1 n>)"),
    ("matmul-contraction-constants", "dim n\nin Q[n, 4], K[5, n]\nout O = Q @ K\n", ShapeError, 3, 11,
     "4 != 5"),
    ("matmul-scalar", H + "out O = Q @ 2\n", ShapeError, 3, 11, "'@' needs arrays"),
    ("too-many-indices", H + "out O[i, j] = Q[i, j, 0]\n", ShapeError, 3, 15,
     "indexing <n d> with 3 indices: the array has rank 2"),
    ("psi-too-many-indices", H + "out O = psi([0, 0, 0], Q)\n", ShapeError, 3, 9, "with 3 indices"),
    ("float-index", H + "out O[i] = Q[i, 1.5]\n", ShapeError, 3, 17,
     "index 1 of <n d> must be an integer scalar"),
    ("index-a-scalar", H + "s = 3\nout O = Q * s[0]\n", ShapeError, 4, 13, "indexing a scalar"),
    ("index-negative-constant", H + "out O = Q[-1]\n", ShapeError, 3, 11,
     "index -1 is out of range for axis 0"),
    ("index-past-the-end", "in Q[3, 4]\nout O = Q[3]\n", ShapeError, 2, 11, "index 3 is out of range"),
    ("extent-not-inferable", H + "out O[i, j] = Q[i, 0] * j\n", ShapeError, 3, 10,
     "cannot infer the extent of index j"),
    ("extent-conflict", "dim n, d\nin Q[n, d], K[n + 1, d]\nout O[i] = dot(Q[i], K[i])\n", ShapeError, 3, 7,
     "index i indexes axes of different extents: n at <source>:3:18 and n + 1 at <source>:3:24"),
    ("extent-conflict-constants", "in Q[3, 4], K[5, 4]\nout O[i] = dot(Q[i], K[i])\n", ShapeError, 2, 7,
     "different extents: 3"),
    ("extent-given-conflict", H + "out O[i:n + 1] = Q[i, 0]\n", ShapeError, 3, 7,
     "index i is given extent n + 1"),
    ("extent-uses-index-variable", H + "out O[i] = iota(i)\n", ShapeError, 3, 17,
     "iota's extent may not depend on index variables"),
    ("transpose-not-permutation", H + "out O = transpose(Q, [0, 0])\n", ShapeError, 3, 9,
     "[0, 0] is not a permutation of the 2 axes"),
    ("transpose-too-long", H + "out O = transpose(Q, [0, 1, 2])\n", ShapeError, 3, 9, "not a permutation"),
    ("reshape-count", "dim n\nin Q[n, 4]\nout O = reshape(Q, [n, 5])\n", ShapeError, 3, 9,
     "reshape: <n 4> has"),
    ("reshape-count-constants", "in Q[3, 4]\nout O = reshape(Q, [5, 2])\n", ShapeError, 2, 9,
     "has 12 elements, <5 2> has 10"),
    ("take-too-many", "dim n\nin Q[n, 4]\nout O = take(n + 1, Q)\n", ShapeError, 3, 9, "n + 1 > n"),
    ("take-too-many-constants", "in Q[3, 4]\nout O = take(5, Q)\n", ShapeError, 2, 9, "5 > 3"),
    ("drop-too-many-negative", "in Q[3, 4]\nout O = drop(-4, Q)\n", ShapeError, 2, 9, "4 > 3"),
    ("take-sign-unknown", "dim n, m\nin Q[n, 4]\nout O = take(n - m, Q)\n", ShapeError, 3, 9,
     "must be known at compile time"),
    ("cat-items", "dim n\nin Q[n, 4], K[n, 5]\nout O = cat(Q, K)\n", ShapeError, 3, 9,
     "cat (items of both arrays)"),
    ("input-extent-zero", "dim n\nin Q[n - n]\nout O = Q\n", ShapeError, 2, 6, "must be positive, got 0"),
    ("input-extent-float", "dim n\nin Q[n, 2.5]\nout O = Q\n", ShapeError, 2, 9,
     "must be an integer expression"),
    # ---- types -------------------------------------------------------------------------------------------
    ("float-floordiv", H + "out O = Q // 2\n", ShapeError, 3, 11, "'//' needs integer operands"),
    ("float-mod", H + "out O = Q % 2.0\n", ShapeError, 3, 11, "'%' needs integer operands"),
    ("and-of-floats", H + "out O = Q and K\n", ShapeError, 3, 9, "'and' needs boolean operands"),
    ("not-of-float", H + "out O = not Q\n", ShapeError, 3, 9, "'not' needs boolean operands"),
    ("where-float-condition", H + "out O = where(Q, Q, K)\n", ShapeError, 3, 9, "cond must be a comparison"),
    ("bool-arithmetic", "dim n\nin Q[n], b[n]: bool\nout O = Q + b\n", ShapeError, 3, 11,
     "'add' is not defined on booleans"),
    ("bool-power", H + "out O = (Q > 0) ^ 2\n", ShapeError, 3, 9, "'pow' is not defined on booleans"),
    ("unknown-element-type", "dim n\nin Q[n]: complex\nout O = Q\n", ParseError, 2, 10,
     "unknown element type 'complex'"),
    # ---- params and numbers ------------------------------------------------------------------------------
    ("param-default-dim", "dim n\nparam w = n\nin Q[n]\nout O = Q * w\n", ParseError, 2, 11,
     "param w's default must be a constant, not n"),
    ("param-default-bool", "dim n\nparam w = 1 < 2\nin Q[n]\nout O = Q\n", ParseError, 2, 11,
     "must be a number"),
    ("param-default-minus-inf", "dim n\nparam w = -inf\nin Q[n]\nout O = Q\n", ParseError, 2, 11,
     "must be a number or inf"),
    ("number-1e999", H + "out O = Q * 1e999\n", ParseError, 3, 13,
     "number 1e999 is out of the float64 range"),
    ("integer-huge", H + "out O = Q * 1234567890123456789012\n", ParseError, 3, 13, "is too large"),
]


@pytest.mark.parametrize("source, cls, line, column, fragment",
                         [pytest.param(*c[1:], id=c[0]) for c in CASES])
def test_error(source, cls, line, column, fragment):
    with pytest.raises(cls) as info:
        elaborate(source)
    err = info.value
    assert isinstance(err, MoaError)
    assert (err.line, err.column) == (line, column), str(err)
    assert fragment in err.message, err.message
    text = str(err)
    assert text.startswith(f"<source>:{line}:{column}: "), text
    # the offending source line and a caret under the column
    lines = source.splitlines()
    assert f"\n    {lines[line - 1]}\n" in text + "\n" or len(lines[line - 1]) > 200, text
    caret = text.splitlines()[-1]
    assert caret.rstrip().endswith("^") and set(caret[:-1]) <= {" ", "\t"}, text
    assert len(caret) - 1 == 4 + column - 1, text


def test_at_least_thirty_cases_and_both_classes():
    assert len(CASES) >= 30
    assert {c[2] for c in CASES} == {ParseError, ShapeError}
    assert len({c[0] for c in CASES}) == len(CASES)


def test_error_classes():
    for cls in (ParseError, ShapeError, InputError, moa.UnsupportedError):
        assert issubclass(cls, MoaError)
    assert not issubclass(ParseError, ShapeError) and not issubclass(ShapeError, ParseError)


def test_empty_program():
    with pytest.raises(ParseError, match="the program has no output") as info:
        elaborate("")
    assert (info.value.line, info.value.column) == (1, 1)


def test_filename_in_location():
    with pytest.raises(ShapeError) as info:
        elaborate("dim n\nin Q[n, 4], K[n, 5]\nout O = Q * K\n", filename="prog.moa")
    assert str(info.value).startswith("prog.moa:3:11: ")


def test_caret_follows_tabs():
    with pytest.raises(ParseError) as info:
        elaborate(H + "\tout O = Q +* K\n")
    err = info.value
    assert (err.line, err.column) == (3, 13)
    src_line, caret = str(err).splitlines()[-2:]
    assert src_line == "    \tout O = Q +* K"
    assert caret.index("^") == src_line.index("*") and caret[4] == "\t"


def test_unknown_param_override_is_an_input_error():
    with pytest.raises(InputError, match="unknown param"):
        elaborate("dim n\nparam w = 2\nin Q[n]\nout O = Q * w\n", v=3)


def test_param_override_must_be_a_number_or_inf():
    with pytest.raises(InputError, match="a number or inf"):
        elaborate("dim n\nparam w = 2\nin Q[n]\nout O = Q * w\n", w=float("-inf"))
    with pytest.raises(InputError, match="a number or inf"):
        elaborate("dim n\nparam w = 2\nin Q[n]\nout O = Q * w\n", w=float("nan"))


# ---- undecidable at compile time: a runtime guard ----------------------------------------------------------

UNDECIDABLE = [
    ("elementwise", "dim n, m, d\nin Q[n, d], K[m, d]\nout O = Q + K\n", lambda q, k: q + k),
    ("contraction", "dim n, m, d\nin Q[n, d], K[m, d]\nout O = Q.T @ K\n", lambda q, k: q.T @ k),
    ("comprehension", "dim n, m, d\nin Q[n, d], K[m, d]\nout O[i] = dot(Q[i], K[i])\n",
     lambda q, k: (q * k).sum(-1)),
    ("given-extent", "dim n, m, d\nin Q[n, d], K[m, d]\nout O[i:n, c:d] = Q[i, c] - K[i, c]\n",
     lambda q, k: q - k),
]


@pytest.mark.parametrize("source, expected", [pytest.param(s, f, id=i) for i, s, f in UNDECIDABLE])
def test_undecidable_equality_becomes_runtime_guard(source, expected):
    p = elaborate(source)  # no error at compile time
    guards = p.guards()
    assert guards and all(g.message for g in guards)
    f64 = torch.float64
    q, k = torch.randn(3, 4, dtype=f64), torch.randn(5, 4, dtype=f64)
    with pytest.raises(InputError) as info:
        reference(p, {"Q": q, "K": k})
    msg = str(info.value)
    assert "n == m" in msg and "n=3" in msg and "m=5" in msg, msg
    k = torch.randn(3, 4, dtype=f64)
    out = reference(p, {"Q": q, "K": k})["O"]
    torch.testing.assert_close(out, expected(q, k), rtol=1e-12, atol=1e-12)


def test_guard_message_names_the_place():
    p = elaborate("dim n, m, d\nin Q[n, d], K[m, d]\nout O = Q + K\n")
    (g,) = p.guards()
    assert "<source>:3:11" in g.message and (g.loc.line, g.loc.column) == (3, 11)


def test_unsupported_messages_use_the_users_names():
    # an input named like a kernel buffer (S) renames the code-generation program (u0, u1 ...): messages map back
    k = moa.compile("dim n, m\nin S[n, m]\nout O = softmax(S, axis=0)")
    with pytest.raises(moa.UnsupportedError) as info:
        k(S=torch.randn(10, 4, dtype=torch.float64))
    assert "output O" in str(info.value) and "S[j, c]" in str(info.value) and "u2" not in str(info.value)


@pytest.mark.parametrize("src, where, says", [
    ("dim n, d\nin Q[n, d], K[n, d]\nout O = Q[K]", (3, 9), "must be an integer scalar"),   # the use, not the decl
    ("dim n, d\nin Q[n, d]\nout O = n(0) + Q", (3, 9), "'n' is a dim, not a function"),
])
def test_errors_point_at_the_use(src, where, says):
    with pytest.raises(moa.MoaError) as info:
        moa.compile(src)
    assert says in str(info.value) and f":{where[0]}:{where[1]}:" in str(info.value)
