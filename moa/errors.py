"""The errors a user can cause. Every one is a MoaError; source errors carry a location and a caret."""
from __future__ import annotations

from dataclasses import dataclass


def source_lines(source: str) -> list[str]:
    """The lines of a source as the parser counts them: split at '\n' only (a form feed or U+2028 inside a
    line does not start a new one, unlike str.splitlines), a trailing '\r' dropped."""
    return [ln[:-1] if ln.endswith("\r") else ln for ln in source.split("\n")]


@dataclass(frozen=True)
class Loc:
    """A place in a .moa source: 1-based line and column, plus the source text for the caret."""

    line: int
    column: int
    source: str = ""
    filename: str = "<source>"

    def __str__(self) -> str:
        return f"{self.filename}:{self.line}:{self.column}"

    def caret(self) -> str:
        lines = source_lines(self.source)
        if not (1 <= self.line <= len(lines)):
            return ""
        # control characters (escape sequences, NUL, U+2028 ...) are shown as '?': one for one, so the
        # caret stays aligned and an error message cannot drive the terminal
        text = "".join(c if c.isprintable() or c == "\t" else "?" for c in lines[self.line - 1])
        if len(text) > 200:  # keep the caret readable for pathological lines
            lo = max(0, self.column - 100)
            text, col = text[lo:lo + 200], self.column - lo
        else:
            col = self.column
        pad = "".join("\t" if c == "\t" else " " for c in text[:col - 1])  # tabs keep the caret aligned
        return f"    {text}\n    {pad}{' ' * (col - 1 - len(pad))}^"


class MoaError(Exception):
    """Base class of every error moa raises for something the user did."""

    def __init__(self, message: str, loc: Loc | None = None):
        self.message = message
        self.loc = loc
        super().__init__(self._render())

    def _render(self) -> str:
        if self.loc is None:
            return self.message
        caret = self.loc.caret()
        return f"{self.loc}: {self.message}" + (f"\n{caret}" if caret else "")

    @property
    def line(self) -> int | None:
        return self.loc.line if self.loc else None

    @property
    def column(self) -> int | None:
        return self.loc.column if self.loc else None


class ParseError(MoaError):
    """The source does not follow the grammar, or names are misused (unbound, rebound, keywords)."""


class ShapeError(MoaError):
    """Shapes do not conform (elementwise, inner product, indexing, reshape ...)."""


class UnsupportedError(MoaError):
    """A valid program that this version cannot compile (the message names the construct)."""


class InputError(MoaError):
    """Tensors passed at call time do not match the program (names, shapes, dtypes, devices)."""
