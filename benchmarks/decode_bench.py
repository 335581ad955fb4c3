"""Decoding rows of the benchmark (`python benchmarks/bench.py --decode`): k.decode against a KV cache.

On a CUDA machine each workload runs k.decode (split-KV, GQA packing, paged where the row says) and, where
PyTorch can express it, F.scaled_dot_product_attention and compiled flex_attention on the same call; the table
gives the time, the KV bytes read per second (every key of every K/V head once) as a fraction of the device's DRAM
bandwidth (moa/devices.py), the cost model's prediction (runtime/decode_cost.py) and the float64 error at a small
size. Without a GPU it prints the predicted table (splits, packing, KV bandwidth) at the requested size.
"""
from __future__ import annotations

import datetime
import json
import time
from pathlib import Path

import torch

import moa
from moa.devices import DEVICES
from moa.runtime.decode_cost import decode_cost

GQA = """
dim h, g, n, m, d, e
in Q[h, n, d], K[g, m, d], V[g, m, e]
S[a, i, j] = dot(Q[a, i], K[a // (h // g), j]) / sqrt(d)
out O[a] = softmax(S[a], axis=-1) @ V[a // (h // g)]
"""
BOTTOM_RIGHT = """
dim h, g, n, m, d, e
in Q[h, n, d], K[g, m, d], V[g, m, e]
S[a, i, j] = where(j <= i + m - n, dot(Q[a, i], K[a // (h // g), j]) / sqrt(d), -inf)
out O[a] = softmax(S[a], axis=-1) @ V[a // (h // g)]
"""
# (label, program, params, (batch, query heads, kv heads, n_q, m, d), page size or None, comparison)
WORKLOADS = [
    ("gqa decode 32q/8kv", GQA, {}, (1, 32, 8, 1, 32768, 128), None, "gqa"),
    ("gqa decode, batch 8", GQA, {}, (8, 32, 8, 1, 32768, 128), None, "gqa"),
    ("gqa decode, paged 64", GQA, {}, (1, 32, 8, 1, 32768, 128), 64, "gqa"),
    ("gqa speculative n_q=4", BOTTOM_RIGHT, {}, (1, 32, 8, 4, 32768, 128), None, "bottom_right"),
    ("gqa_alibi decode", "gqa_alibi", {}, (1, 32, 8, 1, 32768, 128), None, None),
    ("sliding_window decode w=4096", "sliding_window", {"w": 4096}, (1, 32, 32, 1, 32768, 128), None, None),
]
ERROR_SHAPE = (1, 4, 2, 3, 300, 16)


EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def compile_workload(program, params):
    if "\n" in program:
        return moa.compile(program, **params)
    return moa.compile(EXAMPLES / f"{program}.moa", **params)


def inputs(k, shape, dtype, device, seed=0):
    """Decode inputs of a workload: Q [batch, (heads,) n_q, d], K/V [batch, (kv heads,) m, d]; a program without
    a head axis takes the heads as a batch axis."""
    b, hq, hk, nq, m, d = shape
    g = torch.Generator().manual_seed(seed)
    heads = any(s.lead for s in k.schedules.values())
    qh, kh = ((hq,), (hk,)) if heads else ((hq,), (hq,))

    def rnd(*s):
        return torch.randn(*s, generator=g, dtype=torch.float32).to(device=device, dtype=dtype)
    return dict(Q=rnd(b, *qh, nq, d), K=rnd(b, *kh, m, d), V=rnd(b, *kh, m, d))


def paged(x: dict, page: int, seed=0):
    """The same cache as a pool of shuffled pages: (inputs with K, V pools, block_table)."""
    k, v = x["K"], x["V"]
    b, m = k.shape[0], k.shape[-2]
    pages = m // page
    perm = torch.randperm(b * pages, generator=torch.Generator().manual_seed(seed)).to(k.device)

    def pool(t):
        src = t.reshape(*t.shape[:-2], pages, page, t.shape[-1]).movedim(0, -4).reshape(*t.shape[1:-2], b * pages,
                                                                                       page, t.shape[-1])
        out = torch.empty_like(src)
        out[..., perm, :, :] = src
        return out.flatten(-3, -2)
    return dict(x, K=pool(k), V=pool(v)), perm.view(b, pages)


def comparisons(kind, x, flex: bool = True):
    """label -> callable of PyTorch's kernels on the same call, where expressible (flex: compiled
    flex_attention too; its CPU compile takes long, so CPU rows leave it out)."""
    if kind is None:
        return {}
    import torch.nn.functional as F
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    q, k, v = x["Q"], x["K"], x["V"]
    nq, m = q.shape[-2], k.shape[-2]
    out = {}
    if kind == "gqa":
        out["sdpa"] = lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
        mask = None
    else:
        from torch.nn.attention.bias import causal_lower_right
        bias = causal_lower_right(nq, m)
        out["sdpa"] = lambda: F.scaled_dot_product_attention(q, k.repeat_interleave(q.shape[1] // k.shape[1], 1),
                                                              v.repeat_interleave(q.shape[1] // k.shape[1], 1),
                                                              attn_mask=bias)
        mask = create_block_mask(lambda b, h, i, j: j <= i + m - nq, None, None, nq, m, device=q.device) \
            if flex else None
    if flex:
        compiled = torch.compile(flex_attention)
        out["flex"] = lambda: compiled(q, k, v, block_mask=mask, enable_gqa=True)
    return out


def _timer(fn) -> float:
    import triton.testing

    fn()
    torch.cuda.synchronize()
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def _error(program, params, page, where) -> float:
    """max |moa - reference| / max |reference| of k.decode at ERROR_SHAPE in float32 (reference float64)."""
    k = compile_workload(program, params)
    x = inputs(k, ERROR_SHAPE, torch.float32, where, seed=1)
    out = _decode(k, x, page).double()
    nq, m = x["Q"].shape[-2], x["K"].shape[-2]
    shared = k.planner.program.input_map["Q"].shape[-2] == k.planner.program.input_map["K"].shape[-2]
    xd = {n: t.double() for n, t in x.items()}
    if shared:   # the queries are the last rows: the reference runs the whole sequence
        full = torch.randn(*xd["Q"].shape[:-2], m, xd["Q"].shape[-1], dtype=torch.float64, device=where)
        full[..., m - nq:, :] = xd["Q"]
        ref = k.reference(**dict(xd, Q=full))[..., m - nq:, :]
    else:
        ref = k.reference(**xd)
    return float((out - ref).abs().max() / ref.abs().max().clamp_min(1e-30))


def _decode(k, x, page):
    if page is None:
        return k.decode(**x)
    px, table = paged(x, page)
    return k.decode(**px, block_table=table, page_size=page)


# long: one row, each step on its own (a failure keeps the timing)
def row(label, program, params, shape, page, versus, dtype, device_key, where="cuda", timer=_timer) -> dict:
    """One benchmark row: moa's decode timed, the prediction, the float64 error, PyTorch's kernels."""
    device = DEVICES[device_key]
    r = {"workload": label, "shape": shape, "page": page, "dtype": str(dtype).replace("torch.", "")}
    try:
        k = compile_workload(program, params)
        x = inputs(k, shape, dtype, where)
        call = (lambda: _decode(k, x, page)) if page is None else _paged_call(k, x, page)
        t0 = time.perf_counter()
        call()
        r["first_call_s"] = time.perf_counter() - t0
        r["moa_ms"] = timer(call)
    except Exception as e:  # noqa: BLE001  (a workload that fails is reported, not fatal)
        r["failed"] = f"{type(e).__name__}: {str(e)[:200]}"
        return r
    b, hq, hk, nq, m, d = shape
    heads = any(s.lead for s in k.schedules.values())
    dims = {"d": d, "e": d, **({"h": hq, "g": hk} if heads else {})}
    dims = {n: v for n, v in dims.items() if n in {x.name for x in k.program.dims}}
    try:
        c = decode_cost(k, nq, m, dtype=r["dtype"], device=device_key, batch=(b,) if heads else (b, hq),
                        page_size=page, **dims)
        r.update(splits=c.splits, packed_heads=c.packed_heads, pred_ms=c.predicted_seconds * 1e3,
                 kv_bytes=c.kv_bytes)
        r["kv_gbps"] = c.kv_bytes / (r["moa_ms"] * 1e-3) / 1e9
        r["pct_bandwidth"] = 100 * c.kv_bytes / (r["moa_ms"] * 1e-3) / device.hbm_bytes_per_s
    except Exception as e:  # noqa: BLE001
        r.setdefault("step_failures", {})["cost"] = f"{type(e).__name__}: {str(e)[:200]}"
    try:
        r["error_vs_fp64"] = _error(program, params, page, where)
    except Exception as e:  # noqa: BLE001
        r.setdefault("step_failures", {})["error"] = f"{type(e).__name__}: {str(e)[:200]}"
    try:
        for name, fn in comparisons(versus, x, flex=where == "cuda").items():
            r[f"{name}_ms"] = timer(fn)
    except Exception as e:  # noqa: BLE001
        r.setdefault("step_failures", {})["versus"] = f"{type(e).__name__}: {str(e)[:200]}"
    return r


def _paged_call(k, x, page):
    px, table = paged(x, page)
    return lambda: k.decode(**px, block_table=table, page_size=page)


def line(r: dict) -> str:
    if "failed" in r:
        return f"{r['workload']:30s} FAILED {r['failed']}"

    def f(field, fmt):
        return "-" if r.get(field) is None else format(r[field], fmt)
    fails = "; ".join(f"{k}: {v[:80]}" for k, v in r.get("step_failures", {}).items())
    return (f"{r['workload']:30s} {f('moa_ms', '.4f'):>8s} ms  pred {f('pred_ms', '.4f')} ms  "
            f"KV {f('kv_gbps', '.0f')} GB/s ({f('pct_bandwidth', '.0f')}% of DRAM)  splits {f('splits', 'd')} "
            f"packed {f('packed_heads', 'd')}  err {f('error_vs_fp64', '.1e')}  | sdpa {f('sdpa_ms', '.4f')} ms  "
            f"flex {f('flex_ms', '.4f')} ms" + (f"  step failures: {fails}" if fails else ""))


def predicted_table(device_key: str, dtype: str = "bf16", workloads=None) -> list:
    """(label, DecodeCost) of every workload (default: WORKLOADS) on a device table entry: what a CPU can say."""
    out = []
    for label, program, params, shape, page, _versus in workloads or WORKLOADS:
        k = compile_workload(program, params)
        b, hq, hk, nq, m, d = shape
        heads = any(s.lead for s in k.schedules.values())
        names = {x.name for x in k.program.dims}
        dims = {n: v for n, v in {"d": d, "e": d, "h": hq, "g": hk}.items() if n in names}
        out.append((label, decode_cost(k, nq, m, dtype=dtype, device=device_key, page_size=page,
                                       batch=(b,) if heads else (b, hq), **dims)))
    return out


def run(args) -> None:
    """`bench.py --decode`: time every workload (those whose program --examples names) on the GPU (results written
    to args.out), or print the predicted table without one."""
    chosen = set(args.examples.split(",")) if getattr(args, "examples", None) else None
    workloads = [w for w in WORKLOADS if chosen is None or w[1] in chosen]
    if not torch.cuda.is_available():
        print(f"no CUDA GPU: the decoding rows cannot be timed here; predicted on the {args.device} table entry "
              f"({args.dtype}):")
        print(f"{'workload':30s} {'splits':>6s} {'packed':>6s} {'pred us':>9s} {'KV MB':>8s} {'KV GB/s':>8s} "
              f"{'% DRAM':>6s}")
        for label, c in predicted_table(args.device, args.dtype, workloads):
            bw = c.kv_bytes / c.predicted_seconds
            print(f"{label:30s} {c.splits:6d} {c.packed_heads:6d} {c.predicted_seconds * 1e6:9.1f} "
                  f"{c.kv_bytes / 2 ** 20:8.1f} {bw / 1e9:8.0f} {100 * bw / DEVICES[args.device].hbm_bytes_per_s:6.0f}")
        return
    gpu = torch.cuda.get_device_name()
    key = next((x for x in ("h200", "h100", "a100") if x in gpu.lower()), "h100")
    dt = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}.get(
        args.dtype, torch.bfloat16)
    rows = []
    for w in workloads:
        rows.append(row(*w, dt, key))
        print(line(rows[-1]), flush=True)
        _save(args.out, gpu, rows)   # after every row: a cut run keeps them


def _save(out, gpu: str, rows: list) -> None:
    """The rows so far as <gpu>-<date>-decode.md and .json under `out`."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"{''.join(c if c.isalnum() else '-' for c in gpu.lower()).strip('-')}-{datetime.date.today()}-decode"
    (out / f"{stem}.json").write_text(json.dumps({"gpu": gpu, "torch": torch.__version__, "moa": moa.__version__,
                                                  "rows": rows}, indent=1, default=str))
    (out / f"{stem}.md").write_text(f"# moa decoding on {gpu}\n\n" + "\n".join(f"    {line(r)}" for r in rows) + "\n")
    print(f"wrote {out / stem}.md and .json")
