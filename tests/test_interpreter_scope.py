"""moa's interpreter scope (runtime/device.py): what it lends Triton's interpreter for a launch is taken back after,
and a loop whose bounds are tensors (every key loop: range(lo, hi, BLOCK_N) with lo, hi from tl.minimum) runs on the
Triton versions moa supports (3.6's interpreter read such a bound with int() of a one-element array, an error from
numpy 2.4 on)."""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.runtime import interpreter as triton_interpreter

from moa.runtime.device import interpreter, run


@triton.jit
def _tensor_bounds(o_ptr, n, BLOCK: tl.constexpr):
    lo = tl.minimum(tl.program_id(0), n)
    hi = tl.maximum(lo, tl.minimum(n, 3 * BLOCK))
    acc = tl.zeros([BLOCK], dtype=tl.float64)
    for start in range(lo, hi, BLOCK):
        acc += (start + tl.arange(0, BLOCK)).to(tl.float64)
    tl.store(o_ptr + tl.arange(0, BLOCK), acc)


def test_the_interpreter_patch_is_lent_and_taken_back():
    before = triton_interpreter._patch_lang_tensor
    with interpreter():
        assert getattr(triton_interpreter._patch_lang_tensor, "moa_index_patch", False)
        with interpreter():   # re-entrant: lent once
            assert triton_interpreter._patch_lang_tensor.moa_index_patch
    assert triton_interpreter._patch_lang_tensor is before


def test_a_loop_with_tensor_bounds_runs():
    from moa.runtime.device import interpret_module
    import types
    mod = types.ModuleType("bounds")
    mod._tensor_bounds = _tensor_bounds
    fn = interpret_module(mod)._tensor_bounds
    out = torch.empty(4, dtype=torch.float64)
    run(fn, (1,), (out, 10), {"BLOCK": 4}, torch.device("cpu"), "the tensor-bounds kernel")
    want = sum(torch.arange(s, s + 4, dtype=torch.float64) for s in range(0, 10, 4))
    assert torch.equal(out, want)
