"""The generated kernels' constexprs (BLOCK_M, BLOCK_N, HEAD_DIM*, HEAD_DIM_V ...) as sympy symbols, for the
counters of the emitted code, and the tile indices r, t of their symbolic sums."""
from __future__ import annotations

import sympy as sp


def csym(name: str) -> sp.Symbol:
    """A constexpr of the generated kernel (BLOCK_M, BLOCK_N, HEAD_DIM, HEAD_DIM_V ...) as a sympy symbol."""
    return sp.Symbol(name, integer=True, positive=True)


BLOCK_M, BLOCK_N, HEAD_DIM_V = csym("BLOCK_M"), csym("BLOCK_N"), csym("HEAD_DIM_V")
ROW_TILE, KEY_TILE = sp.Symbol("r", integer=True, nonnegative=True), sp.Symbol("t", integer=True, nonnegative=True)
