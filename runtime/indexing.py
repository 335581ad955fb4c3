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


def ieval(e, env: dict):
    """Value of a sympy index expression; env maps symbols (or names) to ints or int64 tensors (broadcasting)."""
    return fold(e, _Torch(env, e))
