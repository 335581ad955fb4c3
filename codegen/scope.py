"""Where emitted statements go: a Scope is a list of lines at one indentation, with the names it defines (for common
sub-expression elimination) and its enclosing scope. A line may carry the cost-model region of the block it opens
(a `Marked` line: a key-tile loop, a hop loop, a skip test ...), which the assembled source maps to line numbers."""
from __future__ import annotations

from dataclasses import dataclass, field


class Marked(str):
    """A line of code that opens a region of the cost model's ledger (codegen/ledger.py): ("visit", k) ..."""

    region: object

    def __new__(cls, text: str, region):
        out = super().__new__(cls, text)
        out.region = region
        return out


@dataclass
class Scope:
    """Lines at one indentation; `cache` maps canonical expressions (and loads) to the names that hold them."""
    lines: list
    indent: str
    cache: dict = field(default_factory=dict)
    parent: Scope | None = None

    def lookup(self, key):
        s = self
        while s is not None:
            if key in s.cache:
                return s.cache[key]
            s = s.parent
        return None

    def add(self, text: str) -> None:
        """Append a statement at this scope's indentation."""
        self.lines.append(f"{self.indent}{text}")

    def open(self, text: str, region=None) -> Scope:
        """Append a block header (`for ...:` / `if ...:`) and return the scope of its body."""
        line = f"{self.indent}{text}"
        self.lines.append(Marked(line, region) if region is not None else line)
        return Scope(self.lines, self.indent + "    ", parent=self)

    def child(self) -> Scope:
        """A scope at this indentation whose lines are collected apart (a loop body, hoisted into `self` later)."""
        return Scope([], self.indent, parent=self)


def regions_by_line(lines: list, first_line: int) -> dict:
    """{line number: region} of the Marked lines of a function body whose first line is `first_line`."""
    return {first_line + k: ln.region for k, ln in enumerate(lines) if isinstance(ln, Marked)}
