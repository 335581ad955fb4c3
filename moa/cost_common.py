"""Shared pieces of the cost model: the generated kernels' constexprs as sympy symbols, and sympy -> numpy
evaluation with the kernels' integer semantics (moa/exprfold.py)."""
from __future__ import annotations

import sympy as sp

from .exprfold import np_eval

__all__ = ["BLOCK_M", "BLOCK_N", "HEAD_DIM_V", "KEY_TILE", "ROW_TILE", "csym", "np_eval"]


def csym(name: str) -> sp.Symbol:
    """A constexpr of the generated kernel (BLOCK_M, BLOCK_N, HEAD_DIM, HEAD_DIM_V ...) as a sympy symbol."""
    return sp.Symbol(name, integer=True, positive=True)


BLOCK_M, BLOCK_N, HEAD_DIM_V = csym("BLOCK_M"), csym("BLOCK_N"), csym("HEAD_DIM_V")
ROW_TILE, KEY_TILE = sp.Symbol("r", integer=True, nonnegative=True), sp.Symbol("t", integer=True, nonnegative=True)
