"""Launching generated kernels: module loading per device and the launch itself (interpreter or CUDA)."""
from __future__ import annotations

import torch
import triton

from moa import __version__
from moa.errors import MoaError, UnsupportedError

from . import cache
from .device import check_device, interpreter


def module_for(source: str, device: torch.device):
    """The module of a generated source for tensors on `device`: interpreted for CPU, JIT-compiled for CUDA."""
    check_device(device)
    key = cache.key_of(source, __version__, triton.__version__, torch.__version__)
    return cache.load_module(key, source, interpret=device.type == "cpu")


def run(fn, grid, args, consts: dict, device: torch.device, what: str) -> None:
    """fn[grid](*args, **consts) on `device`; a Triton failure is a bug of ours, reported as an UnsupportedError
    that names the kernel and keeps the cause."""
    try:
        if device.type == "cpu":
            with interpreter():
                fn[grid](*args, **consts)
        else:
            fn[grid](*args, **consts)
    except MoaError:
        raise
    except Exception as ex:
        raise UnsupportedError(f"{what} failed to run ({type(ex).__name__}: "
                               f"{str(ex).splitlines()[0][:300] if str(ex) else ''})") from ex
