"""The last pass of code generation: dead assignments removed and only the helpers a kernel calls included, so that
a generated kernel is as clean as a hand-written one (ruff's pyflakes rules find nothing in it).

Emitters write every statement on one line (block headers included), so the pass works on the list of body lines:
an assignment whose name no other line reads is dropped, until none is left (a dropped line can make another one
dead). Lines that open a block, store, or assign a name that is read are kept; so are the Marked lines
(codegen/scope.py) that carry the cost model's regions."""
from __future__ import annotations

import ast
import re

HELPERS = {
    "_mod": '''@triton.jit
def _mod(a, b):
    # floor modulo (b > 0), the same on the GPU (truncating %) and in the interpreter (numpy %)
    return ((a % b) + b) % b''',
    "_floordiv": '''@triton.jit
def _floordiv(a, b):
    # floor division (b > 0): exact division of a - _mod(a, b)
    return (a - _mod(a, b)) // b''',
    "_tanh": '''@triton.jit
def _tanh(x):
    e = tl.exp(-2.0 * tl.abs(x))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(x >= 0, t, -t)''',
    "_tanh64": '''@triton.jit
def _tanh64(x):
    # float64 kernels: 1 - e loses digits to cancellation for small |x|, so there tanh's series to x^9
    e = tl.exp(-2.0 * tl.abs(x))
    t = (1.0 - e) / (1.0 + e)
    x2 = x * x
    s = x * (1.0 + x2 * (-1.0 / 3.0 + x2 * (2.0 / 15.0 + x2 * (-17.0 / 315.0 + x2 * (62.0 / 2835.0)))))
    return tl.where(tl.abs(x) < 0.05, s, tl.where(x >= 0, t, -t))''',
    "_elu": '''@triton.jit
def _elu(x):
    return tl.where(x > 0, x, tl.exp(x) - 1.0)''',
    "_elu64": '''@triton.jit
def _elu64(x):
    # float64 kernels: exp(x) - 1 loses digits to cancellation near 0, so there its series to x^6
    s = x * (1.0 + x * (0.5 + x * (1.0 / 6.0 + x * (1.0 / 24.0 + x * (1.0 / 120.0 + x * (1.0 / 720.0))))))
    return tl.where(x > 0, x, tl.where(x > -0.01, s, tl.exp(x) - 1.0))''',
    "_pow": '''@triton.jit
def _pow(b, x):
    # b^x as torch.pow: |b|^x = 2^(x log2 |b|), 1 where x = 0, b = 1 or |b| = 1 with |x| = inf (0 * inf is nan);
    # b < 0: the sign of an odd integer x, nan for other x (b = -inf: |b|^x, as IEEE pow)
    p = tl.exp2(x * tl.log2(tl.abs(b)))
    odd = x - 2.0 * tl.floor(x * 0.5) == 1.0
    frac = tl.where(b == float("-inf"), p, tl.exp2(x * tl.log2(b)))
    neg = tl.where(b == 0, 1.0 / b, b) < 0   # -0.0 too (the sign of 0^-1)
    r = tl.where(neg, tl.where(x == tl.floor(x), tl.where(odd, -p, p), frac), p)
    r = tl.where(tl.abs(b) == 1.0, tl.where(tl.abs(x) == float("inf"), 1.0, r), r)
    return tl.where(x == 0, 1.0, tl.where(b == 1.0, 1.0, r))''',
    "_powi": '''@triton.jit
def _powi(b, k):
    # b^k for an integer k (an index expression such as i - j): |b|^k with the sign of b for odd k, 1 at k = 0
    p = tl.exp2(k * tl.log2(tl.abs(b)))
    neg = tl.where(b == 0, 1.0 / b, b) < 0   # -0.0 too (the sign of 0^-1)
    return tl.where(k == 0, 1.0, tl.where(neg, tl.where(k % 2 != 0, -p, p), p))''',
    "_sign": '''@triton.jit
def _sign(x):
    return tl.where(x > 0, 1, 0) - tl.where(x < 0, 1, 0)''',
}
_NEEDS = {"_floordiv": ("_mod",)}


def helpers_for(code: str) -> str:
    """The helper definitions `code` calls (with the helpers they call), in a fixed order."""
    used = {h for h in HELPERS if re.search(rf"\b{h}\(", code)}
    for h in list(used):
        used.update(_NEEDS.get(h, ()))
    return "\n\n\n".join(HELPERS[h] for h in HELPERS if h in used)


def _parse(line: str):
    """(assigned name or None, names read) of one emitted line (a block header reads its test or range)."""
    text = line.strip()
    if not text or text.startswith("#"):
        return None, set()
    node = None
    for body in (text, text + "\n    pass"):
        try:
            node = ast.parse(body).body[0]
            break
        except SyntaxError:
            continue
    if node is None:   # not a statement of its own: count every name in it as read
        return None, set(re.findall(r"[A-Za-z_]\w*", text.split("#")[0]))
    if isinstance(node, (ast.If, ast.For, ast.While)):
        head = node.test if isinstance(node, (ast.If, ast.While)) else ast.Tuple([node.target, node.iter], ast.Load())
        return None, {n.id for n in ast.walk(head) if isinstance(n, ast.Name)}
    reads = {n.id for n in ast.walk(node) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)}
    if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
        return node.targets[0].id, reads
    if isinstance(node, ast.AugAssign) and isinstance(node.target, ast.Name):
        return node.target.id, reads | {node.target.id}
    return None, reads


def prune(lines: list) -> list:
    """The lines without dead assignments (to a fixpoint). Line objects are kept as they are (Marked lines too)."""
    parsed = [_parse(ln) for ln in lines]
    alive = [True] * len(lines)
    changed = True
    while changed:
        changed = False
        reads: dict = {}
        for k, (name, rd) in enumerate(parsed):
            if alive[k]:
                for r in rd:
                    reads[r] = reads.get(r, 0) + (0 if r == name else 1)
        for k, (name, _) in enumerate(parsed):
            if alive[k] and name is not None and not reads.get(name):
                alive[k] = False
                changed = True
    return [ln for ln, a in zip(lines, alive) if a]
