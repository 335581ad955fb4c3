"""The moa language: lark grammar, parser and elaboration into the MoA IR."""
from .elaborate import elaborate
from .parser import parse

__all__ = ["elaborate", "parse"]
