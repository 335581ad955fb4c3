"""The one emitter of a branch's monoid reduction, used by every schedule (key tiles, hops, the window tile).

softmax: the online-softmax state (m_i, l_i, acc) in log2 units, merged per tile or hop as
    m_ij = max(m_i, rowmax(s) log2 e);  p = 2^(s log2 e - m_ij);  alpha = 2^(m_i - m_ij)
    l_i = l_i alpha + rowsum(p);        acc = acc alpha + p V;     m_i = m_ij
  (m_safe = 0 in place of -inf keeps fully masked rows at p = alpha = 0), finished as acc / l_i, 0 where l_i = 0,
  with lse = (m_i + log2 l_i) ln 2 (-inf where l_i = 0) when the kernel stores it.
norm: the sum state (z_i, acc): z_i += rowsum(w); acc += w V; finished as acc / z_i, 0 where z_i = 0 (the kernel
  stores z_i as its total).
sum: acc alone: acc += w V, finished as acc (no normaliser: sigmoid attention, retention).
A step is either a tile (scores [BLOCK_M, cols], reduced over axis 1) or a row (scores [BLOCK_M], one key per row,
as in a hop loop)."""
from __future__ import annotations

from dataclasses import dataclass

from .scope import Scope

LOG2E = "1.4426950408889634"
LN2 = "0.6931471805599453"


@dataclass(frozen=True)
class Monoid:
    """The state names of one branch's reduction ('softmax', 'norm' or 'sum'); `sfx` tells branches apart."""
    kind: str
    sfx: str
    acc_dtype: str      # tl.float32 or tl.float64

    @property
    def m_i(self) -> str:
        return f"m_i{self.sfx}"

    @property
    def l_i(self) -> str:
        return f"l_i{self.sfx}"

    @property
    def z_i(self) -> str:
        return f"z_i{self.sfx}"

    @property
    def acc(self) -> str:
        return f"acc{self.sfx}"

    def init(self, scope: Scope, cols: str = "HEAD_DIM_V") -> None:
        """The identity: (-inf, 0, 0) for softmax, (0, 0) for norm, 0 for sum; acc is [BLOCK_M, cols]."""
        if self.kind == "softmax":
            scope.add(f'{self.m_i} = tl.full([BLOCK_M], float("-inf"), dtype={self.acc_dtype})')
            scope.add(f"{self.l_i} = tl.zeros([BLOCK_M], dtype={self.acc_dtype})")
        elif self.kind == "norm":
            scope.add(f"{self.z_i} = tl.zeros([BLOCK_M], dtype={self.acc_dtype})")
        scope.add(f"{self.acc} = tl.zeros([BLOCK_M, {cols}], dtype={self.acc_dtype})")

    def update(self, scope: Scope, s: str, weighted, tile: bool = True, to_log2: str = LOG2E) -> None:
        """Merge one step's scores `s` (natural units times `to_log2` gives log2 units; '' when `s` already is
        in log2 units). weighted(p) is the code of p times the step's values (a tl.dot for a tile)."""
        red = (lambda x, op: f"tl.{op}({x}, 1)") if tile else (lambda x, op: x)
        col = (lambda x: f"{x}[:, None]") if tile else (lambda x: x)
        if self.kind != "softmax":
            if self.kind == "norm":
                scope.add(f"{self.z_i} = {self.z_i} + {red(s, 'sum')}")
            scope.add(f"{self.acc} = {self.acc} + {weighted(s)}")
            return
        s2 = f"{s} * {to_log2}" if to_log2 else s
        top = f"{red(s, 'max')} * {to_log2}" if to_log2 else red(s, "max")   # the row max, then the scale
        scope.add(f"m_ij = tl.maximum({self.m_i}, {top})")
        scope.add('m_safe = tl.where(m_ij == float("-inf"), 0.0, m_ij)')
        scope.add(f"p = tl.exp2({s2} - {col('m_safe')})")
        scope.add(f"alpha = tl.exp2({self.m_i} - m_safe)")
        scope.add(f"{self.l_i} = {self.l_i} * alpha + {red('p', 'sum')}")
        scope.add(f"{self.acc} = {self.acc} * alpha[:, None] + {weighted('p')}")
        scope.add(f"{self.m_i} = m_ij")

    def finish(self, scope: Scope, out: str) -> None:
        """out = the branch's value: acc over the normaliser, 0 for rows with no admissible key (sum: acc)."""
        if self.kind == "sum":
            scope.add(f"{out} = {self.acc}")
            return
        den = self.l_i if self.kind == "softmax" else self.z_i
        scope.add(f"{out} = {self.acc} / tl.where({den} == 0, 1.0, {den})[:, None]")

    def total(self) -> str:
        """The per-row total a kernel stores with its output: lse (natural log), the normaliser z, or for a plain
        sum 1 (each partial counts once: split-KV and ring partials of a sum merge by adding them)."""
        if self.kind == "sum":
            return f"tl.full([BLOCK_M], 1.0, dtype={self.acc_dtype})"
        if self.kind != "softmax":
            return self.z_i
        return (f'tl.where({self.l_i} == 0, float("-inf"), ({self.m_i} + tl.log2(tl.where({self.l_i} == 0, 1.0, '
                f"{self.l_i}))) * {LN2})")
