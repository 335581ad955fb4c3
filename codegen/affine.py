"""Score modifiers affine in the key index (ALiBi's 2^(-8 (a + 1) / h) * (j - i)), computed mostly outside the key loop.

A softmax score c * qk + rest (codegen/scale.py `affine`) whose rest is, in its DNF, a sum of terms coef * L with
coef free of the key index j (and of score tiles) and L an index expression affine in j (L = alpha j + beta, alpha
and beta integer index expressions free of j), plus terms free of j, is emitted as
- once per program: coef log2 e per term, the slope d rest / d j in log2 units (a number, a scalar or one value
  per row) and the part free of j in log2 units;
- once per key tile: each term's value at the tile's first key, L(start_n) in integers, converted once per row
  and times coef log2 e (the tile bias);
- per score element: offs_nf * slope + tile bias (one FFMA), offs_nf = arange(BLOCK_N) as floats, the key offset
  within the tile.
Relative to the tile's first key: near ALiBi's diagonal the bias comes from the small integer start_n - i, exactly
converted, not from slope * j - slope * i, which in fp32 cancels two terms of size slope * 1e4 when i and j are
large; the rounding left is that of the modifier's value itself, as when slope * (j - i) is evaluated per element.
Any other rest (a read along the keys, a non-linear function of j) keeps the per-element code."""
from __future__ import annotations

from dataclasses import dataclass

import sympy as sp

from moa import dnf as D
from moa import ir
from moa.onf import DotTile

from .monoid import LOG2E
from .printer import float_literal
from .scope import Scope


@dataclass(frozen=True)
class Term:
    """coef * lin: coef a DNF expression free of the key index (None: 1), lin an index expression."""
    coef: object
    lin: sp.Expr


@dataclass(frozen=True)
class KeyAffine:
    """The code of a score modifier affine in the key index: `slope` and `bias` are computed once per program
    ('' where there is none), `tile` ((float code of the index at j = start_n, code of coef log2 e), ...) once per
    key tile into the variable `name`; `offs` holds arange(BLOCK_N) as floats."""
    slope: str
    tile: tuple
    bias: str
    offs: str
    name: str

    def element(self, scope: Scope) -> str:
        """The modifier of a score element in log2 units; the tile bias goes to `scope` (the tile's body)."""
        parts = [f"{code} * {coef}" for code, coef in self.tile]
        scope.add(f"{self.name} = {' + '.join(parts + ([self.bias] if self.bias else []))}"
                  f"  # the modifier at the first key of the tile")
        return f"({self.offs}[None, :] * {self.slope} + {self.name})"


def _free(e, j) -> bool:
    return j not in D.free_vars(e) and not any(isinstance(x, DotTile) for x in D.nodes(e))


def _scaled(f, coef, left: bool):
    """f * coef (coef None: 1), f on the side it had."""
    if coef is None:
        return f
    return D.Op("mul", (f, coef) if left else (coef, f), ir.FLOAT)


def split(e, j):
    """(terms, free): e = sum coef * lin + sum free (free: DNF expressions free of j), or None where e has another
    form along j (a read indexed by j, a non-linear function of it)."""
    if isinstance(e, D.Index):
        return [Term(None, e.expr)], []
    if _free(e, j):
        return [], [e]
    if not isinstance(e, D.Op):
        return None
    fn, args = e.fn, e.args
    if fn in ("add", "sub") and len(args) == 2:
        a, b = split(args[0], j), split(args[1], j)
        if a is None or b is None:
            return None
        if fn == "sub":
            b = _negated(b)
        return a[0] + b[0], a[1] + b[1]
    if fn == "neg":
        a = split(args[0], j)
        return None if a is None else _negated(a)
    if fn == "mul" and len(args) == 2:
        left = _free(args[0], j)
        f, g = args if left else args[::-1]
        part = split(g, j) if _free(f, j) else None
        if part is None:
            return None
        if isinstance(f, D.Index):   # an integer factor: exact in the index arithmetic
            return [Term(t.coef, f.expr * t.lin) for t in part[0]], \
                [D.Op("mul", (f, x) if left else (x, f), ir.FLOAT) for x in part[1]]
        return ([Term(_scaled(f, t.coef, left), t.lin) for t in part[0]],
                [D.Op("mul", (f, x) if left else (x, f), ir.FLOAT) for x in part[1]])
    if fn == "div" and _free(args[1], j):
        part = split(args[0], j)
        if part is None:
            return None
        den = args[1]
        return ([Term(D.Op("div", (D.Const(1.0) if t.coef is None else t.coef, den), ir.FLOAT), t.lin)
                 for t in part[0]], [D.Op("div", (x, den), ir.FLOAT) for x in part[1]])
    return None


def _negated(part):
    terms, free = part
    return [Term(t.coef, -t.lin) for t in terms], [D.Op("neg", (x,), x.dtype) for x in free]


def slope_of(lin, j) -> sp.Expr:
    """d lin / d j (lin = alpha j + beta: alpha)."""
    return sp.expand(sp.diff(lin, j))


def key_affine(e, j):
    """(terms along j, terms free of j, free DNF terms) of a score modifier affine in the key index j, or None:
    terms with the same coefficient merged (their index expressions added exactly, in integers), each term's
    index expression alpha j + beta with alpha, beta integer and free of j. None also when nothing depends on j."""
    part = split(e, j)
    if part is None:
        return None
    merged: dict = {}
    for t in part[0]:
        merged[t.coef] = merged.get(t.coef, sp.Integer(0)) + t.lin
    along, fixed = [], []
    for coef, lin in merged.items():
        alpha = slope_of(lin, j)
        beta = sp.expand(lin - alpha * j)
        if j in alpha.free_symbols or j in beta.free_symbols or not (alpha.is_integer and beta.is_integer):
            return None
        if alpha != 0:
            along.append(Term(coef, lin))
        elif sp.expand(lin) != 0:
            fixed.append(Term(coef, lin))
    if not along:
        return None
    return along, fixed, part[1]


def _constant(e) -> bool:
    """No read and no index variable or dim: the value is a Python number in the kernel (typed with tl.full)."""
    return not any(isinstance(x, D.Read) or isinstance(x, D.Index) and not x.expr.is_number for x in D.nodes(e))


def _code(v) -> str:
    return float_literal(v) if isinstance(v, float) else v


def _times(a, b):
    """a * b of values that are Python numbers (folded) or code."""
    return a * b if isinstance(a, float) and isinstance(b, float) else f"{_code(a)} * {_code(b)}"


def emit_key_affine(x, e, j, rowmap: dict, body: Scope, sfx: str) -> KeyAffine | None:
    """The once-per-program part of a score modifier `e` affine in the key index `j` (see the module's doc), into
    `body` (before the key loop); None where `e` is not of that form. rowmap: the tile code of the row variables.
    Values are Python numbers where they are numbers (folded into literals), else code."""
    form = key_affine(e, j)
    if form is None:
        return None
    along, fixed, free = form
    log2e = float(LOG2E)

    def index(ix):
        return float(ix) if ix.is_number else f"({x.idx(ix, rowmap)}).to({x.acc})"

    def log2_units(coef, what: str):
        """coef log2 e: a number, or a variable assigned once."""
        if coef is None:
            return log2e
        if isinstance(coef, D.Const) or isinstance(coef, D.Index) and coef.expr.is_number:
            return float(coef.value if isinstance(coef, D.Const) else coef.expr) * log2e
        code = f"{x._float(x.emit(coef, rowmap, body, role=f'coef{sfx}'), coef)} * {LOG2E}"
        if _constant(coef):   # a bare Python float would be fp32 in the interpreter
            code = f"tl.full([1], {code}, dtype={x.acc})"
        return _named(x, body, what, code, "a coefficient in log2 units, once")

    alphas = [slope_of(t.lin, j) for t in along]
    one = len(along) == 1 and alphas[0] == 1   # the coefficient is the slope
    coefs = [log2_units(t.coef, f"slope{sfx}" if one else f"key_coef{sfx}") for t in along]
    slopes = [c if alpha == 1 else _times(c, index(alpha)) for c, alpha in zip(coefs, alphas)]
    slope = _sum(slopes)
    if isinstance(slope, str) and slope not in coefs:
        slope = _named(x, body, f"slope{sfx}", slope, "d score / d key, log2 units, once")
    parts = [_times(index(t.lin), log2_units(t.coef, f"bias_coef{sfx}")) for t in fixed]
    parts += [f"{x._float(x.emit(f, rowmap, body, role=f'bias{sfx}'), f)} * {LOG2E}" for f in free]
    bias = _sum(parts) if parts else ""
    if isinstance(bias, str) and bias:
        bias = _named(x, body, f"score_bias{sfx}", bias, "the part free of the key, log2 units, once")
    offs = "offs_nf"
    if offs not in x.taken:
        x.taken.add(offs)
        body.add(f"{offs} = tl.arange(0, BLOCK_N).to({x.acc})  # key offsets within a tile")
    tile = tuple((_at_first_key(x, t.lin, j, rowmap), _code(c)) for t, c in zip(along, coefs))
    return KeyAffine(_code(slope), tile, _code(bias), offs, x.fresh(f"tile_bias{sfx}"))


def _at_first_key(x, lin, j, rowmap: dict) -> str:
    """lin at j = start_n, in the accumulator's float type: one conversion of the exact integer. start_n alone (and
    numbers) is a Python int in the interpreter: typed with tl.full, which casts a scalar tensor too."""
    code = x.idx(lin, {**rowmap, j: "start_n"})
    if lin.free_symbols <= {j}:
        return f"tl.full([1], {code}, dtype={x.acc})"
    return f"({code}).to({x.acc})"


def _sum(values):
    """The sum of values (numbers folded, code joined); values is not empty."""
    nums = [v for v in values if isinstance(v, float)]
    codes = [v for v in values if not isinstance(v, float)]
    if not codes:
        return sum(nums)
    return " + ".join(codes + ([float_literal(sum(nums))] if nums else []))


def _named(x, body: Scope, base: str, code: str, note: str) -> str:
    name = x.fresh(base)
    body.add(f"{name} = {code}  # {note}")
    return name
