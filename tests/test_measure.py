"""Exact-count tests for ``moa.runtime.measure`` on hand-written Triton kernels (interpreter mode)."""

import sys
import threading

import numpy as np
import pytest
import torch
import triton
import triton.language as tl
from moa.runtime.device import interpret_module, interpreter
from moa.runtime.measure import Counters, instrument
from triton.runtime import interpreter as interp
from triton.runtime.errors import InterpreterError


@pytest.fixture(autouse=True)
def _interpreted():
    """The kernels below run in Triton's interpreter without TRITON_INTERPRET: moa's interpreter scope lends them
    Triton's standard library (tl.sum, tl.sigmoid ...) as interpreted functions."""
    with interpreter():
        yield

DTYPES = [torch.float32, torch.float64]


# ---------------------------------------------------------------------------------------------------
# kernels
# ---------------------------------------------------------------------------------------------------


@triton.jit
def _vec_add(x_ptr, y_ptr, o_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    a = tl.load(x_ptr + offs, mask=m, other=0)
    b = tl.load(y_ptr + offs, mask=m, other=0)
    tl.store(o_ptr + offs, a + b, mask=m)


@triton.jit
def _masked_copy(x_ptr, o_ptr, keep_ptr, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    keep = tl.load(keep_ptr + offs) != 0
    a = tl.load(x_ptr + offs, mask=keep, other=0)
    nothing = tl.load(x_ptr + offs, mask=offs < 0, other=0)
    tl.store(o_ptr + offs, a + nothing, mask=keep)


@triton.jit
def _matmul(a_ptr, b_ptr, c_ptr, M: tl.constexpr, N: tl.constexpr, K: tl.constexpr, BK: tl.constexpr):
    rm = tl.arange(0, M)
    rn = tl.arange(0, N)
    rk = tl.arange(0, BK)
    acc = tl.zeros((M, N), dtype=tl.float32)
    for k0 in range(0, K, BK):
        a = tl.load(a_ptr + rm[:, None] * K + (k0 + rk)[None, :])
        b = tl.load(b_ptr + (k0 + rk)[:, None] * N + rn[None, :])
        acc = tl.dot(a, b, acc)
    tl.store(c_ptr + rm[:, None] * N + rn[None, :], acc)


@triton.jit
def _batched_matmul(a_ptr, b_ptr, c_ptr, B: tl.constexpr, M: tl.constexpr, N: tl.constexpr, K: tl.constexpr):
    rb = tl.arange(0, B)[:, None, None]
    rm = tl.arange(0, M)
    rn = tl.arange(0, N)
    rk = tl.arange(0, K)
    a = tl.load(a_ptr + rb * M * K + rm[None, :, None] * K + rk[None, None, :])
    b = tl.load(b_ptr + rb * K * N + rk[None, :, None] * N + rn[None, None, :])
    c = tl.dot(a, b)
    tl.store(c_ptr + rb * M * N + rm[None, :, None] * N + rn[None, None, :], c)


@triton.jit
def _transcendentals(x_ptr, o_ptr, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offs)
    tl.store(o_ptr + 0 * BLOCK + offs, tl.exp(x))
    tl.store(o_ptr + 1 * BLOCK + offs, tl.exp2(x))
    tl.store(o_ptr + 2 * BLOCK + offs, tl.log(x))
    tl.store(o_ptr + 3 * BLOCK + offs, tl.sqrt(x))
    tl.store(o_ptr + 4 * BLOCK + offs, tl.rsqrt(x))


@triton.jit
def _sigmoid(x_ptr, o_ptr, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    tl.store(o_ptr + offs, tl.sigmoid(tl.load(x_ptr + offs)))


@triton.jit
def _no_flops(x_ptr, i_ptr, o_ptr, oi_ptr, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offs)
    i = tl.load(i_ptr + offs)
    j = (i * 3 + offs) // 2 - (i << 1)  # integer arithmetic
    y = tl.where(x > 0.5, x, 0.0)  # comparison + select
    y = tl.abs(y)
    tl.store(o_ptr + offs, y)
    tl.store(oi_ptr + offs, j)


@triton.jit
def _flop_conventions(x_ptr, o_ptr, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offs)
    tl.store(o_ptr + 0 * BLOCK + offs, tl.fma(x, x, x))  # 2
    tl.store(o_ptr + 1 * BLOCK + offs, tl.maximum(x, 0.5))  # 1
    tl.store(o_ptr + 2 * BLOCK + offs, tl.minimum(x, 0.5))  # 1
    tl.store(o_ptr + 3 * BLOCK + offs, tl.clamp(x, 0.25, 0.75))  # 2
    tl.store(o_ptr + 4 * BLOCK + offs, -x)  # 1
    tl.store(o_ptr + 5 * BLOCK + offs, x / 3.0)  # 1
    tl.store(o_ptr + 6 * BLOCK + offs, x * x - x)  # 2


@triton.jit
def _add_combine(a, b):
    return a + b


@triton.jit
def _reductions(x_ptr, o_ptr, R: tl.constexpr, C: tl.constexpr, WHICH: tl.constexpr):
    rr = tl.arange(0, R)
    rc = tl.arange(0, C)
    x = tl.load(x_ptr + rr[:, None] * C + rc[None, :])
    if WHICH == 0:
        tl.store(o_ptr + rr, tl.sum(x, axis=1))
    elif WHICH == 1:
        tl.store(o_ptr + rr, tl.max(x, axis=1))
    elif WHICH == 2:
        tl.store(o_ptr + rr, tl.reduce(x, 1, _add_combine))
    elif WHICH == 3:
        tl.store(o_ptr + rr, tl.argmax(x, axis=1).to(tl.float32))
    elif WHICH == 4:
        tl.store(o_ptr + rr[:, None] * C + rc[None, :], tl.cumsum(x, axis=1))
    else:
        tl.store(o_ptr, tl.sum(x))


@triton.jit
def _kv_loop(q_ptr, k_ptr, v_ptr, o_ptr, n, D: tl.constexpr, BN: tl.constexpr):
    # one query row; streams key/value tiles of BN rows (n need not be a multiple of BN)
    rd = tl.arange(0, D)
    q = tl.load(q_ptr + rd)
    acc = tl.zeros((D,), dtype=tl.float32)
    for start in range(0, n, BN):
        rn = start + tl.arange(0, BN)
        valid = rn < n
        k = tl.load(k_ptr + rn[:, None] * D + rd[None, :], mask=valid[:, None], other=0.0)
        s = tl.sum(k * q[None, :], axis=1)
        v = tl.load(v_ptr + rn[:, None] * D + rd[None, :], mask=valid[:, None], other=0.0)
        acc += tl.sum(s[:, None] * v, axis=0)
    tl.store(o_ptr + rd, acc)


@triton.jit
def _atomic_add(x_ptr, o_ptr, n, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    m = offs < n
    tl.atomic_add(o_ptr + offs, tl.load(x_ptr + offs, mask=m), mask=m)


@triton.jit
def _scalar_copy(x_ptr, o_ptr):
    tl.store(o_ptr + tl.program_id(0), tl.load(x_ptr + tl.program_id(0)) * 2.0)


def _double_plain(x_ptr, o_ptr, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    tl.store(o_ptr + offs, tl.load(x_ptr + offs) * 2.0)


interpret_module(sys.modules[__name__])   # every @triton.jit kernel above becomes an interpreted function


# ---------------------------------------------------------------------------------------------------
# tests
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
def test_masked_vector_add(dtype):
    n, block = 100, 64
    x, y = torch.randn(n, dtype=dtype), torch.randn(n, dtype=dtype)
    o = torch.empty_like(x)
    es = x.element_size()
    with instrument({"x": x, "y": y, "o": o}) as c:
        _vec_add[(triton.cdiv(n, block),)](x, y, o, n, BLOCK=block)
    torch.testing.assert_close(o, x + y)
    assert c.dram_bytes_loaded == 2 * n * es
    assert c.dram_bytes_stored == n * es
    assert c.dram_bytes == 3 * n * es
    # arithmetic runs on every lane of both programs, padding lanes included (2 * 64, not 100)
    assert c.flops == 2 * block
    assert c.transcendentals == 0
    assert c.programs == 2
    assert c.launches == 1
    assert (c.load_calls, c.store_calls) == (4, 2)
    assert c.loads_by_region == {"x": n * es, "y": n * es, "o": 0}
    assert c.load_calls_by_region == {"x": 2, "y": 2, "o": 0}
    assert c.stores_by_region == {"x": 0, "y": 0, "o": n * es}
    assert c.store_calls_by_region == {"x": 0, "y": 0, "o": 2}


@pytest.mark.parametrize("dtype", DTYPES)
def test_masked_off_lanes_are_not_counted(dtype):
    block = 32
    x = torch.randn(block, dtype=dtype)
    o = torch.zeros_like(x)
    keep = torch.tensor([i % 3 == 0 for i in range(block)], dtype=torch.int32)
    kept = int(keep.sum())
    with instrument({"x": x, "keep": keep}) as c:
        _masked_copy[(1,)](x, o, keep, BLOCK=block)
    torch.testing.assert_close(o, torch.where(keep.bool(), x, 0))
    es = x.element_size()
    assert c.loads_by_region["keep"] == block * 4
    assert c.loads_by_region["x"] == kept * es
    # the all-false load executes (a load call) but touches no element of x
    assert c.load_calls == 3
    assert c.load_calls_by_region == {"x": 1, "keep": 1}
    assert c.dram_bytes_loaded == block * 4 + kept * es
    assert c.dram_bytes_stored == kept * es
    assert c.flops == block


def test_dot_flops_and_k_loop():
    m, n, k, bk = 16, 32, 64, 16
    a, b = torch.randn(m, k), torch.randn(k, n)
    out = torch.empty(m, n)
    with instrument({"A": a, "B": b}) as c:
        _matmul[(1,)](a, b, out, M=m, N=n, K=k, BK=bk)
    torch.testing.assert_close(out, a @ b, rtol=1e-4, atol=1e-4)
    assert c.flops == 2 * m * n * k
    assert c.load_calls_by_region == {"A": k // bk, "B": k // bk}
    assert c.loads_by_region == {"A": m * k * 4, "B": k * n * 4}
    assert c.dram_bytes_stored == m * n * 4


def test_batched_dot_flops():
    bt, m, n, k = 2, 16, 16, 32
    a, b = torch.randn(bt, m, k), torch.randn(bt, k, n)
    out = torch.empty(bt, m, n)
    with instrument() as c:
        _batched_matmul[(1,)](a, b, out, B=bt, M=m, N=n, K=k)
    torch.testing.assert_close(out, a @ b, rtol=1e-4, atol=1e-4)
    assert c.flops == 2 * bt * m * n * k


@pytest.mark.parametrize("dtype", DTYPES)
def test_transcendentals(dtype):
    block = 16
    x = torch.rand(block, dtype=dtype) + 0.5
    o = torch.empty(5 * block, dtype=dtype)
    with instrument() as c:
        _transcendentals[(1,)](x, o, BLOCK=block)
    ref = torch.cat([x.exp(), torch.exp2(x), x.log(), x.sqrt(), x.rsqrt()])
    torch.testing.assert_close(o, ref)
    assert c.transcendentals == 5 * block
    assert c.flops == 0


def test_sigmoid_is_counted_through_its_parts():
    block = 8
    x = torch.randn(block)
    o = torch.empty(block)
    with instrument() as c:
        _sigmoid[(1,)](x, o, BLOCK=block)
    torch.testing.assert_close(o, torch.sigmoid(x))
    assert c.transcendentals == block  # exp
    assert c.flops == 3 * block  # neg, add, div


def test_integer_pointer_compare_select_are_not_flops():
    block = 16
    x = torch.rand(block)
    i = torch.arange(block, dtype=torch.int32)
    o, oi = torch.empty(block), torch.empty(block, dtype=torch.int32)
    with instrument() as c:
        _no_flops[(1,)](x, i, o, oi, BLOCK=block)
    torch.testing.assert_close(o, torch.where(x > 0.5, x, 0.0))
    assert c.flops == 0
    assert c.transcendentals == 0
    assert c.dram_bytes_loaded == 2 * block * 4


@pytest.mark.parametrize("dtype", DTYPES)
def test_flop_conventions(dtype):
    block = 8
    x = torch.rand(block, dtype=dtype)
    o = torch.empty(7 * block, dtype=dtype)
    with instrument() as c:
        _flop_conventions[(1,)](x, o, BLOCK=block)
    ref = torch.cat(
        [x * x + x, x.clamp(min=0.5), x.clamp(max=0.5), x.clamp(0.25, 0.75), -x, x / 3, x * x - x]
    )
    torch.testing.assert_close(o, ref)
    assert c.flops == (2 + 1 + 1 + 2 + 1 + 1 + 2) * block


@pytest.mark.parametrize(
    ("which", "expected"),
    [(0, "rows"), (1, "rows"), (2, "rows"), (3, "rows"), (4, "rows"), (5, "all")],
    ids=["sum", "max", "custom_reduce", "argmax", "cumsum", "sum_all"],
)
def test_reductions_and_scans(which, expected):
    r, cols = 4, 8
    x = torch.randn(r, cols)
    o = torch.empty(r, cols)
    with instrument() as c:
        _reductions[(1,)](x, o, R=r, C=cols, WHICH=which)
    want = r * (cols - 1) if expected == "rows" else r * cols - 1
    assert c.flops == want
    ref = {0: x.sum(1), 1: x.amax(1), 2: x.sum(1), 3: x.argmax(1).float()}
    if which in ref:
        torch.testing.assert_close(o.view(-1)[:r], ref[which])
    elif which == 4:
        torch.testing.assert_close(o, x.cumsum(1))


@pytest.mark.parametrize("dtype", DTYPES)
def test_region_attribution_counts_key_tiles(dtype):
    n, d, bn = 37, 8, 16
    tiles = triton.cdiv(n, bn)
    q = torch.randn(d, dtype=dtype)
    kv = torch.randn(2, n, d, dtype=dtype)  # K and V are disjoint views of one buffer
    k, v = kv[0], kv[1]
    o = torch.empty(d, dtype=dtype)
    es = q.element_size()
    with instrument({"Q": q, "K": k, "V": v, "O": o}) as c:
        _kv_loop[(1,)](q, k, v, o, n, D=d, BN=bn)
    torch.testing.assert_close(o, ((k @ q)[:, None] * v).sum(0).to(dtype))
    assert c.load_calls_by_region == {"Q": 1, "K": tiles, "V": tiles, "O": 0}
    assert c.loads_by_region == {"Q": d * es, "K": n * d * es, "V": n * d * es, "O": 0}
    assert c.stores_by_region == {"Q": 0, "K": 0, "V": 0, "O": d * es}
    assert c.dram_bytes_loaded == (d + 2 * n * d) * es
    # per tile: k*q (bn*d) + row sum (bn*(d-1)) + s*v (bn*d) + column sum ((bn-1)*d) + acc add (d)
    per_tile = bn * d + bn * (d - 1) + bn * d + (bn - 1) * d + d
    assert c.flops == tiles * per_tile


def test_load_lines_count_executions_whatever_the_mask():
    """instrument(lines=...) counts the loads a source line issues: loop iterations, all-masked loads included."""
    n, d, bn = 37, 8, 16
    q, k, v, o = torch.randn(d), torch.randn(n, d), torch.randn(n, d), torch.empty(d)
    x, keep = torch.randn(32), torch.zeros(32, dtype=torch.int32)
    lines = {"tile": ("_kv_loop", "v = tl.load("), "none": ("_masked_copy", "nothing = "),
             "absent": ("_kv_loop", "w = ")}
    with instrument({"x": x}, lines=lines) as c:
        _kv_loop[(1,)](q, k, v, o, n, D=d, BN=bn)
        _masked_copy[(1,)](x, torch.empty_like(x), keep, BLOCK=32)
    assert c.load_calls_by_line == {"tile": triton.cdiv(n, bn), "none": 1, "absent": 0}
    assert c.load_calls_by_region["x"] == 0   # no lane of x was read


def test_region_view_span_excludes_rest_of_storage():
    base = torch.randn(10, 8)
    o = torch.empty(32)
    with instrument({"rows_2_to_5": base[2:6], "col_0": base[:, 0]}) as c:
        _scalar_copy[(32,)](base.view(-1)[16:48], o)  # elements 16..47 = rows 2..5
    assert c.loads_by_region["rows_2_to_5"] == 32 * 4
    assert c.load_calls_by_region["rows_2_to_5"] == 32
    # the strided column's span (elements 0..72) contains every lane read here
    assert c.loads_by_region["col_0"] == 32 * 4
    assert c.programs == 32
    assert c.flops == 32


def test_atomic_add_counts_read_modify_write():
    block, n = 16, 10
    x = torch.randn(block)
    o = torch.ones(block)
    with instrument({"o": o}) as c:
        _atomic_add[(1,)](x, o, n, BLOCK=block)
    torch.testing.assert_close(o[:n], 1 + x[:n])
    assert c.loads_by_region["o"] == n * 4
    assert c.stores_by_region["o"] == n * 4
    assert c.dram_bytes_loaded == 2 * n * 4
    assert c.flops == n


def test_counts_accumulate_over_launches_and_nesting():
    x = torch.randn(4)
    o = torch.empty(4)
    _scalar_copy[(4,)](x, o)  # outside: not counted anywhere
    with instrument() as outer:
        _scalar_copy[(4,)](x, o)
        with instrument({"x": x}) as inner:
            _scalar_copy[(2,)](x, o)
    _scalar_copy[(4,)](x, o)
    assert (outer.programs, outer.launches, outer.flops) == (6, 2, 6)
    assert (inner.programs, inner.launches, inner.flops) == (2, 1, 2)
    assert inner.loads_by_region == {"x": 8}
    assert outer.dram_bytes == 6 * 8


def test_other_threads_are_not_counted():
    x = torch.randn(4)
    o = torch.empty(4)
    with instrument() as c:
        t = threading.Thread(target=lambda: _scalar_copy[(4,)](x, o))
        t.start()
        t.join()
        _scalar_copy[(1,)](x, o)
    assert c.programs == 1
    assert c.flops == 1


def _hooked_names():
    builder = interp.interpreter_builder
    return {name for name in vars(builder) if name.startswith(("create_", "set_grid"))}


def test_builder_is_restored_even_on_exceptions():
    before_builder = _hooked_names()
    before_sum = interp.ReduceOps.__dict__["sum"]
    with pytest.raises(RuntimeError, match="boom"), instrument():
        assert "create_masked_load" in vars(interp.interpreter_builder)
        assert interp.ReduceOps.__dict__["sum"] is not before_sum
        raise RuntimeError("boom")
    assert _hooked_names() == before_builder
    assert interp.ReduceOps.__dict__["sum"] is before_sum
    # a kernel failing mid-launch also leaves nothing behind
    with pytest.raises(InterpreterError), instrument():
        _scalar_copy[(1,)](torch.randn(1), "not a tensor")
    assert _hooked_names() == before_builder


def test_direct_interpreted_function_launch():
    kernel = interp.InterpretedFunction(_double_plain)
    x = torch.randn(8, dtype=torch.float64)
    o = torch.empty_like(x)
    with instrument() as c:
        kernel[(1,)](x, o, BLOCK=8)
    torch.testing.assert_close(o, 2 * x)
    assert (c.dram_bytes_loaded, c.dram_bytes_stored, c.flops) == (64, 64, 8)


def test_counts_are_deterministic():
    x, y = torch.randn(100), torch.randn(100)
    o = torch.empty(100)
    results = []
    for _ in range(2):
        with instrument({"x": x}) as c:
            _vec_add[(2,)](x, y, o, 100, BLOCK=64)
        results.append(c)
    assert results[0] == results[1]
    assert isinstance(results[0], Counters)


def test_regions_must_be_cpu_tensors():
    with pytest.raises(TypeError), instrument({"x": np.zeros(3)}):
        pass
    with (
        pytest.raises(ValueError, match="only CPU tensors"),
        instrument({"x": torch.zeros(3, device="meta")}),
    ):
        pass
