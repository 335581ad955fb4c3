"""Backward rows of the benchmark (`python benchmarks/bench.py --backward`): forward + backward of a training step.

On a CUDA machine each workload times moa's forward and fused backward kernels (the gradients of every float input
for a random cotangent) and, where PyTorch expresses the program, F.scaled_dot_product_attention's and compiled
flex_attention's forward + backward on the same tensors; the row gives the times, the backward cost model's
prediction (Backward.cost, runtime/backward_cost_all.py: FLOPs, bytes and the roofline time they imply on the
device) and the float64 gradient error at a small size. Without a GPU it prints the predicted table at the
requested size.
"""
from __future__ import annotations

import datetime
import json
import time
from pathlib import Path

import torch

import moa
from moa.devices import DEVICES
from moa.runtime.tiling import Config

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
# (example, params, PyTorch comparison); shapes (batch, heads, n, d); gqa_alibi's K/V have heads // 4 heads
WORKLOADS = [
    ("sdpa", {}, "sdpa"),
    ("causal", {}, "causal"),
    ("sliding_window", {"w": 1024}, "sliding"),
    ("softcap", {"c": 30.0}, "softcap"),
    ("gqa_alibi", {}, None),
    ("power", {}, None),
]
ERROR_SHAPE = (1, 4, 100, 16)


def compile_workload(stem: str, params: dict):
    return moa.compile(EXAMPLES / f"{stem}.moa", **params)


def _heads(k) -> bool:
    return any(s.lead for s in k.schedules.values())


def inputs(k, shape, dtype, device, seed=0) -> dict:
    """Q, K, V of shape (batch, heads, n, d) (K, V with heads // 4 heads for a program that indexes kv heads)."""
    b, h, n, d = shape
    g = torch.Generator().manual_seed(seed)
    kvh = max(1, h // 4) if "g" in {x.name for x in k.program.dims} else h

    def rnd(*s):
        return torch.randn(*s, generator=g, dtype=torch.float32).to(device=device, dtype=dtype).requires_grad_()
    return dict(Q=rnd(b, h, n, d), K=rnd(b, kvh, n, d), V=rnd(b, kvh, n, d))


def step(fn, x: dict, d_out: torch.Tensor):
    """forward + backward: the gradients of every input for the cotangent d_out."""
    return torch.autograd.grad(fn(**x), list(x.values()), d_out)


def comparisons(kind, x: dict, flex: bool = True) -> dict:
    """label -> the same attention in PyTorch (a callable of Q, K, V), where expressible."""
    if kind is None:
        return {}
    import torch.nn.functional as F

    out = {}
    if kind in ("sdpa", "causal"):
        out["sdpa"] = lambda Q, K, V: F.scaled_dot_product_attention(Q, K, V, is_causal=kind == "causal")
    if flex:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        n = x["Q"].shape[-2]
        compiled = torch.compile(flex_attention)
        masks = {"causal": lambda b, h, i, j: j <= i, "sliding": lambda b, h, i, j: (j <= i) & (i - j <= 1024)}
        mask = create_block_mask(masks[kind], None, None, n, n, device=x["Q"].device) if kind in masks else None
        score = (lambda s, b, h, i, j: 30.0 * torch.tanh(s / 30.0)) if kind == "softcap" else None
        out["flex"] = lambda Q, K, V: compiled(Q, K, V, block_mask=mask, score_mod=score)
    return out


def _timer(fn) -> float:
    import triton.testing

    fn()
    torch.cuda.synchronize()
    return triton.testing.do_bench(fn, warmup=10, rep=50, return_mode="median")


def _error(stem, params, where) -> float:
    """max relative error of moa's float32 gradients against autograd through the float64 reference."""
    k = compile_workload(stem, params)
    x = inputs(k, ERROR_SHAPE, torch.float32, where, seed=1)
    x64 = {n: t.detach().double().requires_grad_() for n, t in x.items()}
    d_out = torch.randn_like(k.reference(**x64).detach())
    got = step(k, x, d_out.float())
    want = step(k.reference, x64, d_out)
    return max(float((a.double() - w).abs().max() / w.abs().max().clamp_min(1e-30)) for a, w in zip(got, want))


def predicted(k, shape, dtype: str, device_key: str) -> dict:
    """The backward cost model's work at a shape (64 x 64 tiles, the GPU's dtype; fused, several branches, window or
    the chunked linear form: Backward.cost) and the roofline time it implies. The bytes are
    every access the kernels make (no cache model: K and V re-read per query tile count each time), so the memory
    side of the roofline is an upper bound."""
    b, h, n, d = shape
    names = {x.name for x in k.program.dims}
    dims = {x: v for x, v in {"n": n, "m": n, "d": d, "e": d, "h": h, "g": max(1, h // 4)}.items() if x in names}
    batch = (b,) if _heads(k) else (b, h)
    work = k.backward.cost(dims, batch, dtype, config=Config(64, 64), device="cuda")   # every path's kernels
    dev = DEVICES[device_key]
    flops = work.flops
    nbytes = work.bytes_loaded + work.bytes_stored
    rate = dev.matmul_rate(dtype)
    return {"pred_gflop": flops / 1e9, "pred_mb": nbytes / 2 ** 20,
            "roofline_ms": max(flops / rate, nbytes / dev.hbm_bytes_per_s) * 1e3}


# long: one row, each step on its own (a failure keeps the timing)
def row(stem, params, versus, shape, dtype, device_key, where="cuda", timer=_timer) -> dict:
    """One benchmark row: moa's forward + backward timed, the prediction, the float64 error, PyTorch's kernels."""
    r = {"workload": stem, "shape": shape, "dtype": str(dtype).replace("torch.", "")}
    try:
        k = compile_workload(stem, params)
        x = inputs(k, shape, dtype, where)
        d_out = torch.randn_like(k(**{n: t.detach() for n, t in x.items()}))
        t0 = time.perf_counter()
        step(k, x, d_out)
        r["first_call_s"] = time.perf_counter() - t0
        r["moa_ms"] = timer(lambda: step(k, x, d_out))
        r["fused"] = ", ".join(k.backward.fused_inputs) or "none"
    except Exception as e:  # noqa: BLE001  (a workload that fails is reported, not fatal)
        r["failed"] = f"{type(e).__name__}: {str(e)[:200]}"
        return r
    try:
        r.update(predicted(k, shape, r["dtype"], device_key))
    except Exception as e:  # noqa: BLE001
        r.setdefault("step_failures", {})["cost"] = f"{type(e).__name__}: {str(e)[:200]}"
    try:
        r["error_vs_fp64"] = _error(stem, params, where)
    except Exception as e:  # noqa: BLE001
        r.setdefault("step_failures", {})["error"] = f"{type(e).__name__}: {str(e)[:200]}"
    try:
        for name, fn in comparisons(versus, x, flex=where == "cuda").items():
            r[f"{name}_ms"] = timer(lambda fn=fn: step(fn, x, d_out))
    except Exception as e:  # noqa: BLE001
        r.setdefault("step_failures", {})["versus"] = f"{type(e).__name__}: {str(e)[:200]}"
    return r


def line(r: dict) -> str:
    if "failed" in r:
        return f"{r['workload']:16s} FAILED {r['failed']}"

    def f(field, fmt):
        return "-" if r.get(field) is None else format(r[field], fmt)
    fails = "; ".join(f"{k}: {v[:80]}" for k, v in r.get("step_failures", {}).items())
    return (f"{r['workload']:16s} fwd+bwd {f('moa_ms', '.3f'):>8s} ms  roofline {f('roofline_ms', '.3f')} ms  "
            f"{f('pred_gflop', '.1f')} GFLOP {f('pred_mb', '.0f')} MB accessed  err {f('error_vs_fp64', '.1e')}  "
            f"fused {r.get('fused', '-')}  | sdpa {f('sdpa_ms', '.3f')} ms  flex {f('flex_ms', '.3f')} ms"
            + (f"  step failures: {fails}" if fails else ""))


def shape_of(args) -> tuple:
    return (args.batch, args.heads, args.n, args.d)


def run(args) -> None:
    """`bench.py --backward`: time every workload (those of --examples) on the GPU (results written to args.out),
    or print the predicted table without one."""
    chosen = set(args.examples.split(",")) if getattr(args, "examples", None) else None
    workloads = [w for w in WORKLOADS if chosen is None or w[0] in chosen]
    if not torch.cuda.is_available():
        dt = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}.get(args.dtype, args.dtype)
        print(f"no CUDA GPU: the backward rows cannot be timed here; predicted on the {args.device} table entry "
              f"({args.dtype}, shape {shape_of(args)}, 64 x 64 tiles):")
        for stem, params, _ in workloads:
            try:
                p = predicted(compile_workload(stem, params), shape_of(args), dt, args.device)
                print(f"{stem:16s} {p['pred_gflop']:10.1f} GFLOP {p['pred_mb']:10.0f} MB accessed  roofline "
                      f"{p['roofline_ms']:8.3f} ms (no cache)")
            except Exception as e:  # noqa: BLE001
                print(f"{stem:16s} not predicted: {type(e).__name__}: {str(e)[:120]}")
        return
    gpu = torch.cuda.get_device_name()
    key = next((x for x in ("h200", "h100", "a100") if x in gpu.lower()), "h100")
    dt = {"fp16": torch.float16, "float16": torch.float16}.get(args.dtype, torch.bfloat16)
    rows = []
    for stem, params, versus in workloads:
        rows.append(row(stem, params, versus, shape_of(args), dt, key))
        print(line(rows[-1]), flush=True)
        _save(args.out, gpu, rows)   # after every row: a cut run keeps them


__all__ = ["WORKLOADS", "line", "predicted", "row", "run"]


def _save(out, gpu: str, rows: list) -> None:
    """The rows so far as <gpu>-<date>-backward.md and .json under `out`."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"{''.join(c if c.isalnum() else '-' for c in gpu.lower()).strip('-')}-{datetime.date.today()}-backward"
    (out / f"{stem}.json").write_text(json.dumps({"gpu": gpu, "torch": torch.__version__, "moa": moa.__version__,
                                                  "rows": rows}, indent=1, default=str))
    (out / f"{stem}.md").write_text(f"# moa forward + backward on {gpu}\n\n" +
                                    "\n".join(f"    {line(r)}" for r in rows) + "\n")
    print(f"wrote {out / stem}.md and .json")
