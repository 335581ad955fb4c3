"""Launching generated kernels: the Triton interpreter for CPU tensors, a normal launch for CUDA tensors."""
from __future__ import annotations

import os
import sys

import torch

from moa.errors import InputError


def triton_module():
    """Import triton; on a machine without CUDA, turn on the interpreter first (it must precede the import)."""
    if "triton" not in sys.modules and not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
    import triton

    return triton


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def check_device(device: torch.device):
    if device.type == "cpu" and not interpreting():
        raise InputError("CPU tensors run in Triton's interpreter, which must be enabled before triton is "
                         "imported: set TRITON_INTERPRET=1 in the environment (moa does so itself when it is "
                         "imported first on a machine without CUDA), or pass CUDA tensors")
    if device.type not in ("cpu", "cuda"):
        raise InputError(f"tensors on {device} are not supported; use CPU (interpreter) or CUDA tensors")


def next_pow2(x: int) -> int:
    return 1 << max(0, int(x) - 1).bit_length()


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def quiet():
    """Silence numpy's floating-point warnings inside interpreter launches: the untaken branch of a where
    (0/0 in a Dirichlet kernel, exp overflow of masked scores) is computed and discarded, as on a GPU."""
    import numpy as np

    return np.errstate(all="ignore")
