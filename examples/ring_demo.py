"""Ring attention demo: every rank holds 1/P of the sequence (queries and keys).

GPUs (NCCL), one process per GPU:
    torchrun --nproc_per_node=8 examples/ring_demo.py --seq-len 65536 --head-dim 128 --dtype bf16  # causal.moa
CPU (gloo, Triton interpreter), small sizes, checked against the single-process kernel:
    torchrun --nproc_per_node=3 examples/ring_demo.py --seq-len 96 --head-dim 16 --dtype fp64 --check
"""
from __future__ import annotations

import argparse
import datetime
import os
import time

import torch
import torch.distributed as dist

import moa

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32, "fp64": torch.float64}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--program", default=os.path.join(os.path.dirname(__file__), "causal.moa"))
    ap.add_argument("--seq-len", type=int, default=4096, help="global sequence length")
    ap.add_argument("--head-dim", type=int, default=64, help="head dim (d = e)")
    ap.add_argument("--dtype", default="bf16", choices=DTYPES)
    ap.add_argument("--timeout", type=float, default=120.0, help="seconds before a stuck ring fails")
    ap.add_argument("--check", action="store_true", help="compare with the single-process kernel on rank 0")
    args = ap.parse_args()

    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(seconds=args.timeout))
    rank, world = dist.get_rank(), dist.get_world_size()
    dev = torch.device("cuda") if cuda else torch.device("cpu")
    dt = DTYPES[args.dtype]

    k = moa.compile(args.program)
    n, d = args.seq_len, args.head_dim
    lo, hi = n * rank // world, n * (rank + 1) // world
    g = torch.Generator().manual_seed(0)   # every rank draws the same full tensors (demo only)
    q, kk, v = (torch.randn(n, d, generator=g, dtype=torch.float64) for _ in range(3))
    local = {"Q": q[lo:hi], "K": kk[lo:hi], "V": v[lo:hi]}
    local = {name: t.to(dev, dt).contiguous() for name, t in local.items()}

    t0 = time.perf_counter()
    o, st = k.ring(timeout=args.timeout, stats=True, **local)
    if cuda:
        torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    print(f"rank {rank}/{world}: rows [{lo}, {hi}) computed key shards {st.computed}, skipped {st.skipped}; "
          f"compute {st.compute_seconds:.3f} s, waiting on transfers {st.wait_seconds:.3f} s, "
          f"sent {st.bytes_sent / 1e6:.1f} MB, wall {wall:.3f} s", flush=True)

    if args.check:
        parts = [None] * world
        dist.all_gather_object(parts, o.cpu())   # shards may be uneven (or empty)
        if rank == 0:
            ref = k(Q=q.to(dev, dt), K=kk.to(dev, dt), V=v.to(dev, dt)).cpu()
            err = (torch.cat(parts) - ref).abs().max().item()
            print(f"max |ring - single| = {err:.3g}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
