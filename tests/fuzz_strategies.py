"""Hypothesis strategies for .moa text: grammar-shaped programs (mostly valid), attention-shaped programs
(valid and compilable to kernels), mutations of both, lark-derived sentences and random text/bytes.

Used by tests/test_fuzz.py; kept apart so that other tests (and ad-hoc fuzz sessions) can import them.
"""
from __future__ import annotations

from pathlib import Path

from hypothesis import strategies as st

EXAMPLES = sorted((Path(__file__).resolve().parent.parent / "examples").glob("*.moa"))
EXAMPLE_TEXTS = [p.read_text() for p in EXAMPLES]

DIM_NAMES = ["n", "m", "d", "e", "h", "g", "r"]
INPUT_NAMES = ["Q", "K", "V", "A", "B", "wg", "doc", "x"]
ARRAY_NAMES = ["S", "C", "P", "T", "W", "Z", "O", "R"]
INDEX_NAMES = ["i", "j", "a", "b", "c", "t", "tau"]
PARAM_NAMES = ["w", "p", "s", "k0", "bg"]
UNARY = ["exp", "log", "sqrt", "rsqrt", "abs", "sign", "tanh", "sigmoid", "relu", "elu", "sin", "cos", "erf"]
KEYWORDS = ["dim", "param", "in", "out", "where", "and", "or", "not", "inf"]
# names a user could write that collide with Python, Triton or the generated kernel's own names
HOSTILE_NAMES = ["__import__", "os", "exec", "eval", "tl", "triton", "Q_ptr", "dim_n", "idx_a", "offs_m", "BLOCK_M",
                 "acc", "m_i", "lambda", "import", "if", "class", "None", "True", "False", "self", "z0", "lse",
                 "float", "range", "p", "alpha", "_mod", "_attn_fwd", "pid_z", "HEAD_DIM", "x" * 70, "_", "__x"]

NUMBERS = ["0", "1", "2", "3", "7", "64", "0.5", "1.5", "2.0", "1e-3", "1e3", ".25", "3.", "1e308", "1e-308",
           "1e999", "999999999999999999", "9999999999999999999", "0.0", "-0.0", "1E+2", "inf", "-inf"]

MUTATION_PIECES = [
    "", " ", "\n", "\r\n", "\r", "\t", "\x0c", "\\\n", "#", "# comment ' \" \\ \n", "(", ")", "[", "]", ",", ":",
    "=", "==", "@", ".", ".T", "^", "//", "%", "-", "+", "*", "/", "<=", "!=", "'", '"', "\\", "\x00", "\x7f",
    "\u2028", "\u0430", "\uff31", "\U0001f600", "\ud800", "é", "dim", "param", "in", "out", "where", "and", "or",
    "not", "inf", "lambda", "None", "__import__", "1e999", "99999999999999999999", "axis=", "axis=-1",
    "softmax(", "sum(", "iota(", "take(", "reshape(", "transpose(", "outer(add, ", "psi([", "x" * 80,
    "(" * 60, ")" * 60, "-" * 40, "Q[i, j]", "K[j]", ": int", ": bool", ": float", ": complex",
]


def _join(xs):
    return ", ".join(xs)


@st.composite
def _index_expr(draw, idx_vars, dims, depth=0):
    """An integer index expression over index variables, dims and small constants."""
    leaves = [*idx_vars, *dims, "0", "1", "2", "3"]
    if depth >= 2 or draw(st.booleans()):
        return draw(st.sampled_from(leaves))
    a = draw(_index_expr(idx_vars, dims, depth + 1))
    b = draw(_index_expr(idx_vars, dims, depth + 1))
    op = draw(st.sampled_from(["+", "-", "*", "//", "%"]))
    return f"({a} {op} {b})" if depth else f"{a} {op} {b}"


@st.composite
def _expr(draw, env, depth=0):
    """A scalar-or-array expression over the names in env (dims, params, arrays, index variables)."""
    arrays, idx_vars = env["arrays"], env["index"]
    leaves = [*env["dims"], *env["params"], *arrays, *idx_vars]
    choice = draw(st.integers(0, 13 if depth < 3 else 2))
    if choice == 0:
        return draw(st.sampled_from(NUMBERS))
    if choice == 1 and leaves:
        return draw(st.sampled_from(leaves))
    if choice == 2 and arrays:
        name = draw(st.sampled_from(arrays))
        k = draw(st.integers(1, 3))
        subs = [draw(st.one_of(st.just(":"), _index_expr(idx_vars, env["dims"]))) if idx_vars
                else draw(st.sampled_from(["0", "1", ":"])) for _ in range(k)]
        return f"{name}[{_join(subs)}]"
    sub = lambda: draw(_expr(env, depth + 1))  # noqa: E731
    if choice == 3:
        op = draw(st.sampled_from(["+", "-", "*", "/", "@", "^", "//", "%"]))
        return f"({sub()} {op} {sub()})"
    if choice == 4:
        return f"{draw(st.sampled_from(UNARY))}({sub()})"
    if choice == 5:
        return f"where({draw(_cond(env))}, {sub()}, {draw(st.sampled_from(['-inf', '0', sub()]))})"
    if choice == 6:
        fn = draw(st.sampled_from(["softmax", "normalize", "logsumexp", "sum", "max", "min"]))
        ax = draw(st.sampled_from(["", ", axis=-1", ", axis=0", ", axis=1", ", axis=2", ", axis=-3"]))
        return f"{fn}({sub()}{ax})"
    if choice == 7:
        return f"dot({sub()}, {sub()})"
    if choice == 8:
        return f"{sub()}.T" if draw(st.booleans()) else f"transpose({sub()}, [1, 0])"
    if choice == 9:
        fn = draw(st.sampled_from(["take", "drop", "rotate"]))
        k = draw(st.sampled_from(["1", "-1", "2", "0", *env["dims"][:1]]))
        return f"{fn}({k}, {sub()})"
    if choice == 10:
        fn = draw(st.sampled_from(["cat", "max", "min"]))
        return f"{fn}({sub()}, {sub()})"
    if choice == 11:
        fn = draw(st.sampled_from(["reverse", "shape", "iota"]))
        return f"{fn}({sub()})"
    if choice == 12:
        op = draw(st.sampled_from(["add", "sub", "mul", "div", "min", "max", "pow"]))
        return f"outer({op}, {sub()}, {sub()})"
    dims = env["dims"] or ["1"]
    shape = _join(draw(st.lists(st.sampled_from(dims), min_size=1, max_size=3)))
    return f"reshape({sub()}, [{shape}])" if draw(st.booleans()) else f"-{sub()}"


@st.composite
def _cond(draw, env):
    idx = env["index"] or ["0"]
    a, b = draw(st.sampled_from(idx)), draw(st.sampled_from(idx))
    forms = [f"{b} <= {a}", f"{a} - {b} <= {draw(st.sampled_from(['1', '4', *env['params'], *env['dims']]))}",
             f"({a} - {b}) % 2 == 0", f"{a} != {b}", f"not {a} < {b}", f"{a} >= 0 and {b} < 3",
             f"{a} == {b} or {a} > {b}"]
    return draw(st.sampled_from(forms))


@st.composite
def grammar_programs(draw):
    """Programs drawn from the grammar's statement forms, over declared names: many elaborate, many are shape
    or name errors (which must be MoaErrors with a location)."""
    dims = draw(st.lists(st.sampled_from(DIM_NAMES), min_size=1, max_size=4, unique=True))
    params = draw(st.lists(st.sampled_from(PARAM_NAMES), max_size=2, unique=True))
    lines = [f"dim {_join(dims)}"]
    if params:
        vals = [draw(st.sampled_from(["1", "2", "4", "0.5", "16", "n", "1e999", "-3"])) for _ in params]
        lines.append("param " + _join(f"{p} = {v}" for p, v in zip(params, vals)))
    ninp = draw(st.integers(1, 4))
    inputs = INPUT_NAMES[:ninp] if draw(st.booleans()) else draw(
        st.lists(st.sampled_from(INPUT_NAMES), min_size=1, max_size=4, unique=True))
    items = []
    for name in inputs:
        rank = draw(st.integers(0, 3))
        exts = [draw(st.sampled_from([*dims, *dims, f"2 * {dims[0]}", f"{dims[0]} + 1", "4", *params]))
                for _ in range(rank)]
        typ = draw(st.sampled_from(["", "", "", ": int", ": bool", ": float"]))
        items.append(f"{name}[{_join(exts)}]{typ}" if exts else f"{name}{typ}")
    lines.append("in " + _join(items))
    env = {"dims": dims, "params": params, "arrays": list(inputs), "index": []}
    nstmt = draw(st.integers(1, 4))
    free_arrays = [a for a in ARRAY_NAMES if a not in inputs]
    for k in range(nstmt):
        target = free_arrays[k]
        last = k == nstmt - 1
        if draw(st.booleans()):
            nvars = draw(st.integers(1, 3))
            vars_ = INDEX_NAMES[:nvars]
            binds = [v if draw(st.integers(0, 3)) else f"{v}:{draw(st.sampled_from(dims))}" for v in vars_]
            inner = dict(env, index=vars_)
            body = draw(_expr(inner))
            lines.append(f"{'out ' if last else ''}{target}[{_join(binds)}] = {body}")
        else:
            lines.append(f"{'out ' if last else ''}{target} = {draw(_expr(env))}")
        env["arrays"] = [*env["arrays"], target]
    sep = draw(st.sampled_from(["\n", "\n", "\r\n", "\n\n# c\n"]))
    return sep.join(lines) + draw(st.sampled_from(["", "\n", "  # trailing\n"]))


@st.composite
def attention_programs(draw):
    """Valid attention programs: a random mask and score modifier around softmax/normalize(...) @ V. They
    compile to kernels, so the kernel can be checked against the reference on tiny inputs."""
    masks = ["j <= i", "i - j <= w", "j <= i and i - j <= w", "(i - j) % 2 == 0 and j <= i", "j != i",
             "j < i", "i == j or j == 0", "j >= i", "not j > i", "i - j < w or j < 2"]
    scores = ["dot(Q[i], K[j]) / sqrt(d)", "dot(Q[i], K[j])", "tanh(dot(Q[i], K[j]) / 8) * 8",
              "dot(Q[i], K[j]) / sqrt(d) + 0.5 * (j - i)", "S0[i, j] * 2 ^ -1", "-dot(Q[i], K[j]) / w"]
    kind = draw(st.sampled_from(["softmax", "softmax", "normalize"]))
    mask = draw(st.sampled_from(masks))
    score = draw(st.sampled_from(scores))
    w = draw(st.integers(1, 5))
    lines = ["dim n, d, e", f"param w = {w}", "in Q[n, d], K[n, d], V[n, e]", "S0 = Q @ K.T / sqrt(d)"]
    if kind == "softmax":
        lines.append(f"S[i, j] = where({mask}, {score}, -inf)")
        lines.append("out O = softmax(S, axis=-1) @ V")
    else:
        lines.append(f"A[i, j] = where({mask}, exp({score} / 4), 0)")
        lines.append("out O = normalize(A, axis=-1) @ V")
    return "\n".join(lines) + "\n"


@st.composite
def mutated(draw, base):
    """1-3 edits of a program: insert, delete, replace or duplicate a span, swap lines."""
    text = draw(base)
    for _ in range(draw(st.integers(1, 3))):
        op = draw(st.integers(0, 4))
        pos = draw(st.integers(0, len(text)))
        end = min(len(text), pos + draw(st.integers(0, 12)))
        if op == 0:
            text = text[:pos] + draw(st.sampled_from(MUTATION_PIECES)) + text[pos:]
        elif op == 1:
            text = text[:pos] + text[end:]
        elif op == 2:
            text = text[:pos] + draw(st.sampled_from(MUTATION_PIECES)) + text[end:]
        elif op == 3:
            text = text[:pos] + text[pos:end] * draw(st.integers(2, 4)) + text[end:]
        else:
            lines = text.split("\n")
            if len(lines) > 1:
                a = draw(st.integers(0, len(lines) - 1))
                b = draw(st.integers(0, len(lines) - 1))
                lines[a], lines[b] = lines[b], lines[a]
                text = "\n".join(lines)
    return text


@st.composite
def renamed(draw, base):
    """A program with one declared name replaced everywhere by a hostile, keyword or look-alike name."""
    text = draw(base)
    old = draw(st.sampled_from(["n", "d", "e", "Q", "K", "V", "S", "O", "i", "j", "w"]))
    new = draw(st.sampled_from([*HOSTILE_NAMES, *KEYWORDS, "\u0430", "Q\uff31", "ｎ"]))
    import re

    return re.sub(rf"\b{re.escape(old)}\b", new, text)


examples = st.sampled_from(EXAMPLE_TEXTS)
random_text = st.text(max_size=300)
random_ascii = st.text(alphabet=st.characters(min_codepoint=0, max_codepoint=127), max_size=300)
token_soup = st.lists(st.sampled_from(MUTATION_PIECES + NUMBERS + DIM_NAMES + INPUT_NAMES + INDEX_NAMES + UNARY),
                      max_size=60).map(lambda xs: " ".join(xs))


def _decode(b: bytes) -> str:
    return b.decode("utf-8", errors="surrogateescape")


random_bytes_text = st.binary(max_size=300).map(_decode)


def lark_sentences():
    """Sentences of moa.lark itself (hypothesis.extra.lark), when the extra can handle the grammar."""
    try:
        import lark
        from hypothesis.extra.lark import from_lark

        grammar = (Path(__file__).resolve().parent.parent / "frontend" / "moa.lark").read_text()
        return from_lark(lark.Lark(grammar, parser="lalr", start="start"), start="start")
    except Exception:  # pragma: no cover - the extra's support varies between versions
        return token_soup


def tiny_inputs(kernel, seed: int = 0, dim_values=(1, 2, 3), dtype=None):
    """Random tensors for every input of a compiled program, dims drawn from dim_values (a few elements)."""
    import random

    import torch

    from moa import ir
    from moa import symbolic as sy

    rnd = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    dims = {d.name: rnd.choice(dim_values) for d in kernel.program.dims}
    out = {}
    for node in kernel.program.inputs:
        shape = [int(sy.evaluate(e, dims)) for e in node.shape]
        if node.dtype == ir.INT:
            out[node.attrs[0]] = torch.randint(0, 3, shape, generator=gen)
        elif node.dtype == ir.BOOL:
            out[node.attrs[0]] = torch.randint(0, 2, shape, generator=gen).bool()
        else:
            out[node.attrs[0]] = torch.randn(shape, generator=gen, dtype=dtype or torch.float64)
    return out
