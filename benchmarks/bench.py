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
import sys
import time
from pathlib import Path

import torch

import moa
from moa import ir
from moa.devices import DEVICES, canonical_dtype
from moa.runtime import configs as C
from moa.runtime import costing as K
from moa.runtime.check import random_inputs
from moa.runtime.measuring import measure

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"

# params for the benchmark (windows that make masks matter at n = 8192)
PARAMS = {"sliding_window": {"w": 1024}, "dilated_window": {"w": 2048, "r": 2}, "ring_local": {"k": 1024},
          "prefix_lm": {"p": 1024}, "global_window": {"w": 512}, "pi_attention": {"k": 1024, "s": 64}}
# Programs that are not examples (masks from data, docs/variants.md): source and a maker of their integer and
# boolean inputs at (dims, batch axes, seed), as a serving or training user would hold them.
KEY_PADDING = """dim n, m, d, e
in Q[n, d], K[m, d], V[m, e]
in L: int
S[i, j] = where(j < L, dot(Q[i], K[j]) / sqrt(d), -inf)
out O = softmax(S, axis=-1) @ V
"""
BLOCK_MASK = """dim n, m, d, e
in Q[n, d], K[m, d], V[m, e]
param B = 128
in blk[(n + B - 1) // B, (m + B - 1) // B]: bool
S[i, j] = where(blk[i // B, j // B] and j <= i, dot(Q[i], K[j]) / sqrt(d), -inf)
out O = softmax(S, axis=-1) @ V
"""


def _lengths(k, dims, batch, seed):
    """Key lengths of a padded batch: uniform in 1..m per batch entry (the same for every head)."""
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(1, dims["m"] + 1, batch[:1], generator=g)
    return {"L": lens.reshape(batch[:1] + (1,) * (len(batch) - 1)).expand(batch).contiguous()}


def _blocks(k, dims, batch, seed):
    """A block table with a quarter of its (query block, key block) pairs on, and its diagonal blocks."""
    g = torch.Generator().manual_seed(seed)
    B = int(dict(k.program.params)["B"])
    rows, cols = -(-dims["n"] // B), -(-dims["m"] // B)
    blk = (torch.rand(rows, cols, generator=g) < 0.25) | torch.eye(rows, cols, dtype=torch.bool)
    return {"blk": blk.expand(*batch, rows, cols).contiguous()}


PROGRAMS = {"key_padding": (KEY_PADDING, _lengths), "block_mask": (BLOCK_MASK, _blocks)}
COUNTERS = ("flops", "transcendentals", "dram_bytes", "tiles_visited")
ERROR_SHAPE = (1, 2, 512, 64)   # (batch, heads, n, d) of the float64 error check


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
    elif name == "key_padding":
        lens = inputs["L"].reshape(q.shape[0], -1)[:, 0]
        mask_mod = lambda b, h, i, j: j < lens[b]
    elif name == "block_mask":
        B = int(p["B"])
        blk = inputs["blk"].reshape(-1, *inputs["blk"].shape[-2:])[0]
        mask_mod = lambda b, h, i, j: blk[i // B, j // B] & (j <= i)
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


# The workloads of the speed issue: (label, example, params, (batch, heads, n, d), form, what it is compared with)
WORKLOADS = [
    ("non-causal 1x16x16384 d=128", "sdpa", {}, (1, 16, 16384, 128), None, "ref"),
    ("non-causal 8x32x2048 d=64", "sdpa", {}, (8, 32, 2048, 64), None, "ref"),
    ("causal 1x16x16384 d=128", "causal", {}, (1, 16, 16384, 128), None, "ref"),
    ("causal 8x16x2048 d=128", "causal", {}, (8, 16, 2048, 128), None, "ref"),
    ("mqa 2x16x8192 d=128", "mqa", {}, (2, 16, 8192, 128), None, "ref"),
    ("sliding_window w=1024 2x16x8192", "sliding_window", {"w": 1024}, (2, 16, 8192, 128), None, "ref"),
    ("dilated_window w=2048 r=2", "dilated_window", {"w": 2048, "r": 2}, (2, 16, 8192, 128), None, "ref"),
    ("document_mask", "document_mask", {}, (2, 16, 8192, 128), None, "ref"),
    ("alibi", "alibi", {}, (2, 16, 8192, 128), None, "ref"),
    ("relative_bias", "relative_bias", {}, (2, 16, 8192, 128), None, "ref"),
    ("gqa_alibi", "gqa_alibi", {}, (2, 16, 8192, 128), None, "ref"),
    ("prefix_lm p=1024", "prefix_lm", {"p": 1024}, (2, 16, 8192, 128), None, "ref"),
    ("global_window w=512", "global_window", {"w": 512}, (2, 16, 8192, 128), None, "ref"),
    ("key padding 8x16x4096 (lengths 1..n)", "key_padding", {}, (8, 16, 4096, 128), None, "ref"),
    ("block mask B=128 causal, 1/4 on", "block_mask", {}, (2, 16, 8192, 128), None, "ref"),
    ("pi_attention k=1024 s=64", "pi_attention", {"k": 1024, "s": 64}, (2, 16, 8192, 128), None, "causal"),
    ("linear (elu+1), linear form", "linear", {}, (2, 16, 8192, 128), "linear", "power"),
    # plain sums A @ V (no normaliser): nothing in PyTorch fuses them; moa's causal softmax has the same FLOPs
    ("sigmoid attention, causal", "sigmoid", {}, (2, 16, 8192, 128), None, "causal"),
    ("retention (RetNet)", "retention", {}, (2, 16, 8192, 128), None, "causal"),
]


def _setup(name, params, shape, form, dt, device, seed=0):
    """(kernel, inputs, dims, batch axes) of a workload."""
    b, h, n, d = shape
    source, data = PROGRAMS.get(name, (EXAMPLES / f"{name}.moa", None))
    k = moa.compile(source, form=form, **params)
    dims = dims_for(k, n, d, h)
    batch = (b,) if has_heads(k) else (b, h)
    x = make_inputs(k, dims, batch, dt, device, seed)
    if data is not None:
        x.update({name: t.to(device) for name, t in data(k, dims, batch, seed).items()})
    return k, x, dims, batch


def _sync(where: str) -> None:
    if where == "cuda":
        torch.cuda.synchronize()


def _time(fn) -> float:
    import triton.testing

    fn()
    torch.cuda.synchronize()
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def _error(name, params, form, dt, where="cuda") -> float:
    """max |moa - reference| / max |reference| at a small size (the float64 reference runs on the CPU)."""
    k, x, dims, batch = _setup(name, params, ERROR_SHAPE, form, dt, where, seed=1)
    out = k(**x).double()
    ref = k.reference(**{n: (t.double() if t.is_floating_point() else t) for n, t in x.items()})
    return float((out - ref).abs().max() / ref.abs().max().clamp_min(1e-30))


def _step(row: dict, field: str, fn, keep: bool = True):
    """fn() (kept as row[field]), or None with the failure noted in row["step_failures"] (the other fields stay)."""
    try:
        value = fn()
    except Exception as e:  # noqa: BLE001
        row.setdefault("step_failures", {})[field] = f"{type(e).__name__}: {str(e)[:200]}"
        return None
    if keep:
        row[field] = value
    return value


def _versus(row: dict, versus: str, name, k, x, dims, shape, tdt, where):
    """Time the comparison of a workload: PyTorch's kernel ("ref"), or moa's own dense causal (PiAttention) or
    quadratic power p = 2 (the linear form). Returns milliseconds, or None where PyTorch has no equivalent."""
    if versus == "ref":
        r = reference_fn(name, k, x, dims, {**PARAMS.get(name, {}), **dict(k.program.params)})
        if r is None:
            return None
        row["reference"], fn = r
        return _time(fn)
    other = "causal" if versus == "causal" else "power"
    k2, x2, _, _ = _setup(other, {}, shape, "quadratic" if other == "power" else None, tdt, where)
    row["reference"] = f"moa {other}" + (" (quadratic)" if other == "power" else "")
    return _time(lambda: k2(**x2))


def _plan(row: dict, k, x) -> str:
    """The plan's key; with the tuning's cost of the first call (compile seconds, timing seconds) where it tuned."""
    p = k.plan(**x)[k.output_names[0]]
    if p.compile_seconds is not None:
        row["compile_s"], row["tune_s"] = p.compile_seconds, p.tune_seconds
    return p.key


def _workload(label, name, params, shape, form, versus, dt, tdt, dev, device, where="cuda") -> dict:
    """One row of the table: moa timed (with the first call, tuning included), then plan, cost, error and the
    comparison each on its own."""
    row = {"workload": label, "example": name, "params": params, "shape": shape, "dtype": dt}
    try:
        k, x, dims, batch = _setup(name, params, shape, form, tdt, where)
        _sync(where)
        t0 = time.perf_counter()
        k(**x)                                   # compile + tuning (first call of the bucket)
        _sync(where)
        row["first_call_s"] = time.perf_counter() - t0
        row["moa_ms"] = _time(lambda k=k, x=x: k(**x))
    except Exception as e:  # noqa: BLE001  (a workload that fails is reported, not fatal)
        row["failed"] = f"{type(e).__name__}: {str(e)[:200]}"
    if "moa_ms" in row:   # each later step on its own: a failure there keeps the timing
        _step(row, "plan", lambda: _plan(row, k, x))
        data = {n: t for n, t in x.items() if not t.is_floating_point()} or None   # ids, flags: tiles skipped
        c = _step(row, "cost", lambda: k.cost(dtype=dt, device=dev, batch=batch, inputs=data, **dims), keep=False)
        if c is not None:
            row["pred_ms"] = c.predicted_seconds * 1e3
            row["tflops"] = c.flops / (row["moa_ms"] * 1e-3) / 1e12
            row["pct_peak"] = 100 * row["tflops"] * 1e12 / device.matmul_rate(dt)
        _step(row, "error_vs_fp64", lambda: _error(name, params, form, tdt, where))
        _step(row, "ref_ms", lambda: _versus(row, versus, name, k, x, dims, shape, tdt, where))
        if row.get("ref_ms"):
            row["ratio"] = row["moa_ms"] / row["ref_ms"]
    return row


def bench_gpu(args):
    import datetime
    import json

    dev = device_key()
    device = DEVICES[dev]
    dt = canonical_dtype(args.dtype)
    tdt = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32,
           "float64": torch.float64}[dt]
    gpu = torch.cuda.get_device_name()
    print(f"GPU: {gpu} (device table: {device.name}); {dt}; torch {torch.__version__}, moa {moa.__version__}")
    rows = []
    for label, name, params, shape, form, versus in WORKLOADS:
        if args.examples and name not in args.examples.split(","):
            continue
        row = _workload(label, name, params, shape, form, versus, dt, tdt, dev, device)
        rows.append(row)
        print(_line(row), flush=True)
        _write(args.out, gpu, rows, datetime.date.today().isoformat(), json)   # after every row: a cut run keeps them


def _f(r: dict, field: str, fmt: str) -> str:
    """A row's field formatted, or '-' where its step failed or does not apply."""
    v = r.get(field)
    return "-" if v is None else format(v, fmt)


def _cells(r: dict) -> dict:
    pred_err = r["moa_ms"] / r["pred_ms"] - 1 if r.get("pred_ms") else None
    return {"moa": _f(r, "moa_ms", ".3f"), "ref": r.get("reference", "-"), "ref_ms": _f(r, "ref_ms", ".3f"),
            "ratio": _f(r, "ratio", ".2f"), "pred": _f(r, "pred_ms", ".3f"),
            "pred_err": "-" if pred_err is None else f"{pred_err:+.0%}", "tflops": _f(r, "tflops", ".1f"),
            "peak": _f(r, "pct_peak", ".1f"), "first": _f(r, "first_call_s", ".1f") + _split(r),
            "err": _f(r, "error_vs_fp64", ".1e"), "plan": r.get("plan", "-"),
            "fails": "; ".join(f"{k}: {v[:80]}" for k, v in r.get("step_failures", {}).items())}


def _split(r: dict) -> str:
    """' (compile C + timing T)' of a tuned first call, else ''."""
    if r.get("compile_s") is None:
        return ""
    return f" ({r['compile_s']:.1f} compile + {r.get('tune_s') or 0.0:.1f} timing)"


def _line(r) -> str:
    if "failed" in r:
        return f"{r['workload']:34s} FAILED {r['failed']}"
    c = _cells(r)
    return (f"{r['workload']:34s} {c['moa']:>8s} ms  pred {c['pred']:>8s} ({c['pred_err']})  {c['tflops']:>6s} TF/s "
            f"{c['peak']:>5s}%  err {c['err']}  first {c['first']} s  | {c['ref']} {c['ref_ms']} ms x{c['ratio']}  "
            f"[{c['plan']}]" + (f"  step failures: {c['fails']}" if c["fails"] else ""))


def _write(out_dir, gpu, rows, date, json):
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"{''.join(c if c.isalnum() else '-' for c in gpu.lower()).strip('-')}-{date}"
    (out / f"{stem}.json").write_text(json.dumps({"gpu": gpu, "date": date, "torch": torch.__version__,
                                                  "moa": moa.__version__, "rows": rows}, indent=1))
    lines = [f"# moa on {gpu}, {date}", "", f"torch {torch.__version__}; forward; times are medians of "
             "triton.testing.do_bench; `first call` is compile plus timed tuning of the bucket (in parentheses: the "
             "candidates' concurrent compiles and their timing, runtime/tune.py).", "",
             "| workload | moa ms | reference | ref ms | moa / ref | predicted ms | error | TFLOP/s | % peak | "
             "first call s | max rel err vs fp64 | plan | notes |", "|---" * 13 + "|"]
    for r in rows:
        if "failed" in r:
            lines.append(f"| {r['workload']} | failed: {r['failed'][:80]} |" + " |" * 11)
            continue
        c = _cells(r)
        lines.append(f"| {r['workload']} | {c['moa']} | {c['ref']} | {c['ref_ms']} | {c['ratio']} | {c['pred']} | "
                     f"{c['pred_err']} | {c['tflops']} | {c['peak']} | {c['first']} | {c['err']} | {c['plan']} | "
                     f"{c['fails']} |")
    (out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {out / stem}.md and .json")


# ---- no-GPU path ------------------------------------------------------------------------------------------------

def bench_cpu(args):
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
        m = measure(k, **inputs)
        c = K.cost(k, dtype="float32", device="cpu", inputs={x: t for x, t in inputs.items()
                                                             if not t.is_floating_point()} or None, **dims)
        ok = all(getattr(m, f) == getattr(c, f) for f in COUNTERS + ("dram_bytes_loaded", "dram_bytes_stored"))
        cells = " ".join(f"{getattr(m, f):>16,d}" for f in COUNTERS)
        print(f"{name:22s} {cells} {c.tiles_needed:>13,d} {time.perf_counter() - t0:5.1f}  "
              f"{'yes' if ok else 'NO: predicted ' + str([getattr(c, f) for f in COUNTERS])}")

    configs = {}
    if not args.no_aot:
        print(f"\n2. AOT for sm_90 without a GPU (bf16, n={args.n}; the default config, else the first candidate "
              "that fits)")
        keys, plans, windows = [], [], []
        for name, k in chosen:
            if any(getattr(b, "mix", None) is not None for s in k.schedules.values() for b in s.branches):
                windows.append((name, k))   # its own kernel family: k.aot's FormAotReport, below the table
                continue
            for hd in (64, 128):
                dims = dims_for(k, args.n, hd, args.heads)
                for out in k.output_names:
                    keys.append((name, out, hd))
                    plans.append(C.fit_plan(k.planner, out, "bfloat16", dims))
        t0 = time.perf_counter()
        results = C.aot_groups([[r for _, _, r in plan] for plan in plans], first_fit=True)
        print(f"   ({sum(len(r) for r in results)} kernels compiled in {time.perf_counter() - t0:.1f} s)")
        head = f"{'example':22s} {'d':>4s} {'schedule':>12s} {'BLOCK_M x N':>11s} {'warps':>5s} {'stages':>6s} " \
               f"{'regs':>5s} {'spills':>6s} {'shared':>9s} {'wgmma':>5s}  tried"
        print(head)
        print("-" * len(head))
        for (name, out, hd), plan, res in zip(keys, plans, results):
            try:
                i, r = C.choose_plan(plan, res, "sm_90", f"{name} d={hd}")
            except moa.MoaError as e:
                print(f"{name:22s} {hd:4d} does not fit: {e.message[:120]}")
                continue
            cfg = plan[i][1]
            configs[(name, out, hd)] = cfg
            print(f"{name:22s} {hd:4d} {r.schedule:>12s} {cfg.block_m:>5d} x {cfg.block_n:<3d} {cfg.num_warps:5d} "
                  f"{cfg.num_stages:6d} {r.registers:5d} {r.spills:6d} {r.shared_bytes:9,d} "
                  f"{'yes' if r.uses_wgmma else 'no':>5s}  {len(res)}")
        for name, k in windows:
            for hd in (64, 128):
                try:
                    rep = k.aot(target="sm_90", dtype="bfloat16", **dims_for(k, args.n, hd, args.heads))
                except moa.MoaError as e:
                    print(f"{name:22s} {hd:4d} does not fit: {e.message[:120]}")
                    continue
                r = rep.kernels[0]
                print(f"{name:22s} {hd:4d} {'window':>12s} {rep.config.block_m:>5d} x {'-':<3s} "
                      f"{rep.config.num_warps:5d} {rep.config.num_stages:6d} {r.registers:5d} {r.spills:6d} "
                      f"{r.shared_bytes:9,d} {'yes' if r.uses_wgmma else 'no':>5s}")

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
        ints = {x: t.expand(*batch, *t.shape) for x, t in random_inputs(k.program, dims, seed=1).items()
                if not t.is_floating_point()}   # ids and flags as the GPU rows make them: the tiles they skip
        rep, bd = K.cost_breakdown(k, dt, args.device, config=cfg, batch=batch, inputs=ints or None, **dims)
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
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"), help="where the GPU results are written")
    ap.add_argument("--decode", action="store_true", help="the decoding rows (benchmarks/decode_bench.py) instead")
    ap.add_argument("--backward", action="store_true", help="forward + backward rows (benchmarks/backward_bench.py)")
    args = ap.parse_args(argv)
    if args.decode:
        sys.path.insert(0, str(ROOT / "benchmarks"))
        import decode_bench

        decode_bench.run(args)
        return 0
    if args.backward:
        sys.path.insert(0, str(ROOT / "benchmarks"))
        import backward_bench

        backward_bench.run(args)
        return 0
    if torch.cuda.is_available():
        bench_gpu(args)
    else:
        bench_cpu(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
