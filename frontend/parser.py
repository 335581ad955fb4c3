"""The lark parser for .moa text; lark's exceptions become ParseError with line:column and a caret."""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import lark

from moa.errors import Loc, ParseError, source_lines

MAX_SOURCE = 1 << 18  # characters

KEYWORDS = {"dim", "param", "in", "out", "where", "and", "or", "not", "inf"}

_HUMAN = {
    "NAME": "a name", "NUMBER": "a number", "_NL": "end of line", "$END": "end of input", "LPAR": "'('",
    "RPAR": "')'", "LSQB": "'['", "RSQB": "']'", "COMMA": "','", "EQUAL": "'='", "COLON": "':'", "DOT": "'.'",
    "CMP": "a comparison", "ADDOP": "'+' or '-'", "MULOP": "an operator (* / // % @)", "MINUS": "'-'",
    "PLUS": "'+'", "CIRCUMFLEX": "'^'", "OUT": "'out'",
}


@lru_cache(maxsize=1)
def _parser() -> lark.Lark:
    return lark.Lark(Path(__file__).with_name("moa.lark").read_text(), parser="lalr",
                     propagate_positions=True, maybe_placeholders=False)


def _expected(names) -> str:
    shown = sorted({_HUMAN.get(n, f"'{n.lower()}'" if n.isalpha() else n) for n in names})
    return ", ".join(shown[:12]) + (" ..." if len(shown) > 12 else "")


_COMPARE = {"<", "<=", ">", ">=", "==", "!="}


def parse(source: str, filename: str = "<source>") -> lark.Tree:
    """Parse .moa text into a lark tree, or raise ParseError pointing at the offending place."""
    if len(source) > MAX_SOURCE:  # lark reads ~100 KB/s: a bigger text is no attention program, only a stall
        raise ParseError(f"the program is {len(source)} characters long; at most {MAX_SOURCE} are accepted",
                         Loc(1, 1, "", filename))
    text = source if source.endswith("\n") else source + "\n"
    try:
        return _parser().parse(text)
    except lark.exceptions.UnexpectedCharacters as e:
        loc = Loc(e.line, e.column, source, filename)
        ch = text[e.pos_in_stream] if e.pos_in_stream < len(text) else ""
        if ch and not ch.isascii() and ch.isalpha():   # a letter outside ASCII (é, λ) where a name may stand
            raise ParseError(f"unexpected character {ch!r}: names are ASCII letters, digits and _ (a letter or _ "
                             "first)", loc) from None
        raise ParseError(f"unexpected character {ch!r}" + (f"; expected {_expected(e.allowed)}"
                                                           if e.allowed else ""), loc) from None
    except lark.exceptions.UnexpectedToken as e:
        tok = e.token
        if tok.type == "$END":
            lines = source_lines(source.removesuffix("\n"))
            loc = Loc(len(lines), len(lines[-1]) + 1, source, filename)
            raise ParseError(f"unexpected end of input; expected {_expected(e.expected)}", loc) from None
        loc = Loc(tok.line, tok.column, source, filename)
        what = "end of line" if tok.type == "_NL" else repr(str(tok))
        hint = ""
        if str(tok) in KEYWORDS and "NAME" in e.expected:
            hint = f" ('{tok}' is a keyword and cannot be used as a name)"
        prev = (getattr(e, "token_history", None) or [None])[-1]
        if (not hint and prev is not None and str(prev) in KEYWORDS and "NAME" in e.expected
                and tok.type in ("EQUAL", "LSQB", "RSQB", "COMMA", "RPAR", "COLON", "DOT")):
            # `out = Q`: the keyword was read as the statement keyword, so the error is at the '=' after it
            hint = f" ('{prev}' is a keyword and cannot be used as a name)"
        if not hint and str(tok) in _COMPARE:   # 0 <= x <= 8 (Python chains comparisons)
            hint = " (comparisons do not chain: write 0 <= x and x <= 8)"
        elif not hint and str(tok) == "*" and prev is not None and str(prev) == "*":
            hint = " (a power is written x ^ p)"
        raise ParseError(f"unexpected {what}{hint}; expected {_expected(e.expected)}", loc) from None
    except lark.exceptions.UnexpectedEOF as e:
        lines = source_lines(source.removesuffix("\n"))
        loc = Loc(len(lines), len(lines[-1]) + 1, source, filename)
        raise ParseError(f"unexpected end of input; expected {_expected(e.expected)}", loc) from None
    except RecursionError:
        raise ParseError("expression nested too deeply", Loc(1, 1, source, filename)) from None
