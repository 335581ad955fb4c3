"""moa: attention mechanisms written as Mathematics-of-Arrays expressions, compiled to fused Triton kernels.

    import moa
    k = moa.compile("examples/causal.moa")
    out = k(Q=q, K=kk, V=v)
"""
from .errors import InputError, MoaError, ParseError, ShapeError, UnsupportedError

__version__ = "0.1.0"


def compile(source_or_path, form=None, **params):
    """Compile a .moa program (text or a path) into a Kernel; params override the program's param defaults."""
    from moa.runtime.kernel import compile as _compile

    return _compile(source_or_path, form=form, **params)


__all__ = ["InputError", "MoaError", "ParseError", "ShapeError", "UnsupportedError", "__version__", "compile"]
