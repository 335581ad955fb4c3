"""Index arithmetic (sympy) on integers or torch tensors: the torch backend of moa/exprfold.py, floor semantics for
// and %, division by zero the call's error."""
from __future__ import annotations

import torch

from moa import symbolic as sy
from moa.errors import InputError
from moa.exprfold import Backend, fold, lookup


class _Torch(Backend):
    what = "index evaluation"

    def __init__(self, env: dict, expr):
        self.env, self.expr = env, expr

    def symbol(self, s):
        return lookup(self.env, s)

    def _nonzero(self, b):
        """Integer division by zero in index arithmetic (a // (h // g) with h < g) is the call's error."""
        if bool((b == 0).any()) if isinstance(b, torch.Tensor) else b == 0:
            raise InputError(f"division by zero in the index expression {sy.show(self.expr)} for the call's dims")

    def div(self, num, den):
        return num / den

    def power(self, base, k):
        return 1.0 / (base ** -k) if k < 0 else base ** k

    def floordiv(self, a, b):
        self._nonzero(b)
        if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
            return torch.div(torch.as_tensor(a), b, rounding_mode="floor")
        return a // b

    def mod(self, a, b):
        self._nonzero(b)
        if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
            return torch.remainder(torch.as_tensor(a), b)
        return a % b

    def _pick(self, xs, tensor_fn, int_fn):
        if any(isinstance(v, torch.Tensor) for v in xs):
            out = torch.as_tensor(xs[0])
            for v in xs[1:]:
                out = tensor_fn(out, torch.as_tensor(v))
            return out
        return int_fn(xs)

    def minimum(self, xs):
        return self._pick(xs, torch.minimum, min)

    def maximum(self, xs):
        return self._pick(xs, torch.maximum, max)

    def abs(self, x):
        return x.abs() if isinstance(x, torch.Tensor) else abs(x)

    def and_(self, xs):
        return self._pick(xs, torch.logical_and, all)

    def or_(self, xs):
        return self._pick(xs, torch.logical_or, any)

    def not_(self, x):
        return torch.logical_not(x) if isinstance(x, torch.Tensor) else not x

    def compare(self, op, a, b):
        return _COMPARE[op](a, b)

    def piecewise(self, pairs):
        out = None
        for v, c in reversed(pairs):   # the last pair's condition is True
            if out is None:
                out = v
            elif isinstance(c, torch.Tensor) or isinstance(v, torch.Tensor) or isinstance(out, torch.Tensor):
                out = torch.where(torch.as_tensor(c), torch.as_tensor(v), torch.as_tensor(out))
            else:
                out = v if c else out
        return out


_COMPARE = {"<": lambda a, b: a < b, "<=": lambda a, b: a <= b, ">": lambda a, b: a > b, ">=": lambda a, b: a >= b,
            "==": lambda a, b: a == b, "!=": lambda a, b: a != b}


def ieval(e, env: dict):
    """Value of a sympy index expression; env maps symbols (or names) to ints or int64 tensors (broadcasting)."""
    return fold(e, _Torch(env, e))
