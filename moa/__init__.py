"""moa: attention mechanisms written as Mathematics-of-Arrays expressions, compiled to fused Triton kernels.

    import moa
    k = moa.compile("examples/causal.moa")
    out = k(Q=q, K=kk, V=v)
"""
from .errors import InputError, MoaError, ParseError, ShapeError, UnsupportedError
from .version import __version__


def compile(source_or_path, /, form=None, schedule=None, autotune=None, **params):
    """Compile a .moa program (text or a path) into a Kernel (moa.runtime.kernel); params override the program's
    param defaults, form= / schedule= force what the cost model otherwise picks per call, autotune= switches the
    GPU's timed tuning (default: on unless MOA_AUTOTUNE=0)."""
    from moa.runtime.kernel import compile as _compile   # the facade: the algebra imports without torch/triton

    return _compile(source_or_path, form=form, schedule=schedule, autotune=autotune, **params)


def __getattr__(name):
    """moa.nn (modules such as moa.nn.Attention, defined in moa.runtime.nn) loads torch and the runtime on first
    use: `import moa` alone needs neither, and the algebra package holds no module of the runtime's layer."""
    if name == "nn":
        from moa.runtime import nn   # heavy (torch and the runtime): loaded on first use of moa.nn

        return nn
    raise AttributeError(f"module 'moa' has no attribute {name!r}")


__all__ = ["InputError", "MoaError", "ParseError", "ShapeError", "UnsupportedError", "__version__", "compile"]
