"""Benchmark every example: measured time vs the cost model, against PyTorch SDPA and compiled flex_attention.

    python benchmarks/bench.py                      # GPU: time everything; no GPU: counters + AOT tables
    python benchmarks/bench.py --examples causal,sdpa --n 8192 --d 128 --dtype bf16

On a CUDA machine each example runs at (batch, heads, n, d) with triton.testing.do_bench; the table gives the
time, the kernel's TFLOP/s (its exact FLOP count from the cost model divided by the time), the fraction of the
device's dense peak, the model's prediction error (measured / predicted - 1), and the time of
F.scaled_dot_product_attention and of torch.compile(flex_attention) where the variant is expressible there.
Without a GPU it says so and prints what can be checked on a CPU instead: the instrumented interpreter's
counters next to the predictions (small dims), the sm_90 AOT resources of the configs the runtime would launch,
and the predicted H100 table at the requested size.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import moa  # noqa: E402
from moa import ir  # noqa: E402
from moa.devices import DEVICES, canonical_dtype  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"

# params for the benchmark (windows that make masks matter at n = 8192)
PARAMS = {"sliding_window": {"w": 1024}, "dilated_window": {"w": 2048, "r": 2}, "ring_local": {"k": 1024},
          "prefix_lm": {"p": 1024}, "global_window": {"w": 512}, "pi_attention": {"k": 1024, "s": 64}}
COUNTERS = ("flops", "transcendentals", "dram_bytes", "tiles_visited")


def examples(selected: str | None) -> list:
    names = sorted(p.stem for p in EXAMPLES.glob("*.moa"))
    if selected:
        want = [x.strip().removesuffix(".moa") for x in selected.split(",") if x.strip()]
        unknown = sorted(set(want) - set(names))
        if unknown:
            sys.exit(f"unknown example(s): {', '.join(unknown)}")
        names = want
    out = []
    for name in names:
        k = moa.compile(EXAMPLES / f"{name}.moa", form="quadratic", **PARAMS.get(name, {}))
        try:
            k.schedules  # noqa: B018  (builds every ONF: raises for what codegen lacks)
        except moa.UnsupportedError as e:
            print(f"  {name}: not compiled ({e.message[:100]})")
            continue
        out.append((name, k))
    return out


def dims_for(k, n, d, heads=8):
    values = {"n": n, "m": n, "d": d, "e": d, "h": heads, "g": max(1, heads // 4)}
    return {x.name: values[x.name] for x in k.program.dims}


def has_heads(k) -> bool:
    return any(s.lead for s in k.schedules.values())


def make_inputs(k, dims, batch, dtype, device, seed=0):
    from moa.runtime.check import random_inputs

    x = random_inputs(k.program, dims, seed=seed, batch=0, dtype=torch.float32)
    out = {}
    for node in k.program.inputs:
        t = x[node.attrs[0]]
        if node.dtype == ir.FLOAT:
            t = t.to(dtype)
        t = t.expand(*batch, *t.shape).contiguous() if batch else t
        out[node.attrs[0]] = t.to(device)
    return out


# ---- GPU path ---------------------------------------------------------------------------------------------------

def device_key() -> str:
    name = torch.cuda.get_device_name().lower()
    for key in ("h200", "h100", "a100"):
        if key in name:
            return key
    return "h100"


def reference_fn(name, k, inputs, dims, params):
    """(label, callable) of the fastest comparable PyTorch attention, or None."""
    import torch.nn.functional as F

    q, kk, v = inputs["Q"], inputs["K"], inputs["V"]
    if name == "sdpa":
        return "sdpa", lambda: F.scaled_dot_product_attention(q, kk, v)
    if name == "causal":
        return "sdpa(is_causal)", lambda: F.scaled_dot_product_attention(q, kk, v, is_causal=True)
    if name == "mqa":
        k4, v4 = kk.unsqueeze(-3), v.unsqueeze(-3)
        return "sdpa(gqa)", lambda: F.scaled_dot_product_attention(q, k4, v4, enable_gqa=True)
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    except ImportError:
        return None
    n = q.shape[-2]
    m = kk.shape[-2]
    mask_mod, score_mod = None, None
    p = {**params}
    if name == "sliding_window":
        w = p["w"]
        mask_mod = lambda b, h, i, j: (j <= i) & (i - j <= w)
    elif name == "ring_local":
        kw = p["k"]
        mask_mod = lambda b, h, i, j: (j <= i) & (i - j < kw)
    elif name == "dilated_window":
        w, r = p["w"], p["r"]
        mask_mod = lambda b, h, i, j: (j <= i) & (i - j <= w) & ((i - j) % r == 0)
    elif name == "prefix_lm":
        pp = p["p"]
        mask_mod = lambda b, h, i, j: (j < pp) | (j <= i)
    elif name == "causal_bottom_right":
        mask_mod = lambda b, h, i, j: j <= i + m - n
    elif name == "document_mask":
        doc = inputs["doc"].reshape(-1, n)[0]
        mask_mod = lambda b, h, i, j: (doc[i] == doc[j]) & (j <= i)
    elif name == "global_window":
        w = p["w"]
        glob = inputs["glob"].reshape(-1, n)[0]
        mask_mod = lambda b, h, i, j: ((i - j).abs() <= w) | glob[i] | glob[j]
    elif name == "softcap":
        c = float(p.get("c", 50))
        score_mod = lambda s, b, h, i, j: c * torch.tanh(s / c)
    elif name in ("alibi", "gqa_alibi"):
        H = dims["h"]
        slopes = torch.tensor([2.0 ** (-8 * (a + 1) / H) for a in range(H)], device=q.device, dtype=torch.float32)
        score_mod = lambda s, b, h, i, j: s + slopes[h] * (j - i)
        if name == "gqa_alibi":
            mask_mod = lambda b, h, i, j: j <= i
    elif name == "relative_bias":
        bias = inputs["bias"].reshape(-1, *inputs["bias"].shape[-2:])[0]
        score_mod = lambda s, b, h, i, j: s + bias[h, i - j + n - 1]
    else:
        return None
    flex = torch.compile(flex_attention)
    q4, k4, v4 = (t if t.dim() == 4 else t.unsqueeze(1) for t in (q, kk, v))
    bm = create_block_mask(mask_mod, None, None, n, m, device=q.device) if mask_mod else None
    gqa = q4.shape[1] != k4.shape[1]
    return "flex_attention", lambda: flex(q4, k4, v4, score_mod=score_mod, block_mask=bm, enable_gqa=gqa)


def bench_gpu(args):
    import triton

    dev = device_key()
    device = DEVICES[dev]
    dt = canonical_dtype(args.dtype)
    tdt = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32,
           "float64": torch.float64}[dt]
    print(f"GPU: {torch.cuda.get_device_name()} (device table: {device.name}); {dt}, batch {args.batch}, "
          f"n={args.n}, d=e={args.d}")
    head = f"{'example':22s} {'moa ms':>9s} {'pred ms':>9s} {'err':>7s} {'TFLOP/s':>8s} {'%peak':>6s} " \
           f"{'bound':>14s}  reference"
    print(head)
    print("-" * len(head))
    for name, k in examples(args.examples):
        dims = dims_for(k, args.n, args.d, args.heads)
        batch = (args.batch,) if has_heads(k) else (args.batch, args.heads)
        inputs = make_inputs(k, dims, batch, tdt, "cuda")
        try:
            k(**inputs)
            torch.cuda.synchronize()
            ms = triton.testing.do_bench(lambda k=k, inputs=inputs: k(**inputs))
            c = k.cost(dtype=dt, device=dev, batch=batch, fit=True, **dims)
        except moa.MoaError as e:
            print(f"{name:22s} failed: {e.message[:100]}")
            continue
        pred_ms = c.predicted_seconds * 1e3
        tflops = c.flops / (ms * 1e-3) / 1e12
        peak = device.matmul_rate(dt) / 1e12
        ref = ""
        try:
            r = reference_fn(name, k, inputs, dims, {**PARAMS.get(name, {}), **dict(k.program.params)})
            if r is not None:
                label, fn = r
                fn()
                torch.cuda.synchronize()
                rms = triton.testing.do_bench(fn)
                ref = f"{label} {rms:.3f} ms ({ms / rms:.2f}x of its time)"
        except Exception as e:  # noqa: BLE001  (a reference that does not run is reported, not fatal)
            ref = f"reference failed: {type(e).__name__}: {str(e)[:80]}"
        print(f"{name:22s} {ms:9.3f} {pred_ms:9.3f} {ms / pred_ms - 1:+7.0%} {tflops:8.1f} {100 * tflops / peak:5.1f}% "
              f"{c.bound:>14s}  {ref}")


# ---- no-GPU path ------------------------------------------------------------------------------------------------

def bench_cpu(args):
    from moa.runtime import costing as K
    from moa.runtime.check import random_inputs

    print("no CUDA GPU: nothing can be timed here. Printing what a CPU can check instead:\n"
          "  1. the instrumented Triton interpreter's counters next to the cost model's predictions (small dims),\n"
          "  2. the sm_90 AOT resources of the configs the GPU runtime would launch (bf16),\n"
          f"  3. the predicted {args.device.upper()} table at n={args.n}, d=e={args.d} (roofline + launch).\n")
    chosen = examples(args.examples)
    n, d = args.small_n, 16
    print(f"1. measured (interpreter, float32) vs predicted, n={n} (m={n - 9} where separate), d=e={d}, "
          f"h=2 heads where the program has them")
    head = f"{'example':22s} " + " ".join(f"{f:>16s}" for f in COUNTERS) + f" {'tiles needed':>13s} {'s':>5s}  match"
    print(head)
    print("-" * len(head))
    for name, k in chosen:
        dims = {x.name: {"n": n, "m": n - 9, "d": d, "e": d, "h": 2, "g": 1}[x.name] for x in k.program.dims}
        t0 = time.perf_counter()
        inputs = random_inputs(k.program, dims, seed=1, dtype=torch.float32)
        m = K.measure(k, **inputs)
        c = K.cost(k, dtype="float32", device="cpu", **dims)
        ok = all(getattr(m, f) == getattr(c, f) for f in COUNTERS + ("dram_bytes_loaded", "dram_bytes_stored"))
        cells = " ".join(f"{getattr(m, f):>16,d}" for f in COUNTERS)
        print(f"{name:22s} {cells} {c.tiles_needed:>13,d} {time.perf_counter() - t0:5.1f}  "
              f"{'yes' if ok else 'NO: predicted ' + str([getattr(c, f) for f in COUNTERS])}")

    configs = {}
    if not args.no_aot:
        print(f"\n2. AOT for sm_90 without a GPU (bf16, n={args.n}; the default config, else the first candidate "
              "that fits)")
        keys, plans = [], []
        for name, k in chosen:
            if any(getattr(b, "mix", None) is not None for s in k.schedules.values() for b in s.branches):
                print(f"   {name}: window-mixing kernel: AOT covers the tiled-family kernels only (skipped)")
                continue
            for hd in (64, 128):
                dims = dims_for(k, args.n, hd, args.heads)
                for out in k.output_names:
                    keys.append((name, out, hd))
                    plans.append(K.fit_plan(k, out, "bfloat16", dims))
        t0 = time.perf_counter()
        results = K.aot_groups([[r for _, _, r in plan] for plan in plans], first_fit=True)
        print(f"   ({sum(len(r) for r in results)} kernels compiled in {time.perf_counter() - t0:.1f} s)")
        head = f"{'example':22s} {'d':>4s} {'schedule':>12s} {'BLOCK_M x N':>11s} {'warps':>5s} {'stages':>6s} " \
               f"{'regs':>5s} {'spills':>6s} {'shared':>9s} {'wgmma':>5s}  tried"
        print(head)
        print("-" * len(head))
        for (name, out, hd), plan, res in zip(keys, plans, results):
            try:
                i, r = K.choose_plan(plan, res, "sm_90", f"{name} d={hd}")
            except moa.MoaError as e:
                print(f"{name:22s} {hd:4d} does not fit: {e.message[:120]}")
                continue
            cfg = plan[i][1]
            configs[(name, out, hd)] = cfg
            print(f"{name:22s} {hd:4d} {r.schedule:>12s} {cfg.block_m:>5d} x {cfg.block_n:<3d} {cfg.num_warps:5d} "
                  f"{cfg.num_stages:6d} {r.registers:5d} {r.spills:6d} {r.shared_bytes:9,d} "
                  f"{'yes' if r.uses_wgmma else 'no':>5s}  {len(res)}")

    dt = canonical_dtype(args.dtype)
    device = DEVICES[args.device]
    print(f"\n3. predicted on {device.name}: {dt}, batch x heads = {args.batch} x {args.heads}, n={args.n}, "
          f"d=e={args.d}")
    head = f"{'example':22s} {'GFLOP':>9s} {'DRAM MiB':>9s} {'unfused MiB':>11s} {'us':>9s} {'unfused us':>10s} " \
           f"{'TFLOP/s':>8s} {'%peak':>6s} {'bound':>14s} {'tiles vis/need':>15s}"
    print(head)
    print("-" * len(head))
    for name, k in chosen:
        dims = dims_for(k, args.n, args.d, args.heads)
        batch = (args.batch,) if has_heads(k) else (args.batch, args.heads)
        cfg = configs.get((name, k.output_names[0], args.d))
        rep, bd = K.cost_breakdown(k, dt, args.device, config=cfg, batch=batch, **dims)
        tf = rep.flops / rep.predicted_seconds / 1e12
        print(f"{name:22s} {rep.flops / 1e9:9.1f} {rep.dram_bytes / 2 ** 20:9.1f} "
              f"{rep.unfused_dram_bytes / 2 ** 20:11.1f} {rep.predicted_seconds * 1e6:9.1f} "
              f"{bd.unfused_seconds * 1e6:10.1f} {tf:8.1f} {100 * tf * 1e12 / device.matmul_rate(dt):5.1f}% "
              f"{rep.bound:>14s} {rep.tiles_visited:>7d}/{rep.tiles_needed:<7d}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--examples", help="comma-separated example names (default: all)")
    ap.add_argument("--n", type=int, default=8192, help="sequence length (default 8192)")
    ap.add_argument("--d", type=int, default=128, help="head dim d = e (default 128)")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--dtype", default="bf16")
    ap.add_argument("--device", default="h100", choices=sorted(DEVICES), help="device table entry (no GPU)")
    ap.add_argument("--small-n", type=int, default=100, help="n for the interpreter counters (no GPU)")
    ap.add_argument("--no-aot", action="store_true", help="skip the AOT table (no GPU)")
    args = ap.parse_args(argv)
    if torch.cuda.is_available():
        bench_gpu(args)
    else:
        bench_cpu(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
