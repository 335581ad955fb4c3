"""Train a tiny 2-layer transformer whose attention is a moa program (moa.nn.Attention), on CPU tensors (Triton's
interpreter) or a GPU. The task: predict the token `lag` positions back (a copy task that causal attention can
solve and a model without attention cannot). The loss goes down from ln(vocab) ~ 2.8.

    python examples/train_tiny.py                         # causal.moa, 50 steps, CPU (about 75 s on 2 cores)
    python examples/train_tiny.py --program examples/softcap.moa --steps 100
"""
from __future__ import annotations

import argparse
import os
import time

import torch
import torch.nn.functional as F

import moa

HERE = os.path.dirname(os.path.abspath(__file__))


class Block(torch.nn.Module):
    """Pre-norm attention + MLP; the attention reads (batch, n, heads, head_dim) tensors (layout='bnhd')."""

    def __init__(self, program: str, dim: int, heads: int, **params):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = torch.nn.LayerNorm(dim), torch.nn.LayerNorm(dim)
        self.qkv = torch.nn.Linear(dim, 3 * dim)
        self.proj = torch.nn.Linear(dim, dim)
        self.attn = moa.nn.Attention(program, num_heads=heads, layout="bnhd", **params)
        self.mlp = torch.nn.Sequential(torch.nn.Linear(dim, 2 * dim), torch.nn.GELU(), torch.nn.Linear(2 * dim, dim))

    def forward(self, x):
        b, n, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, n, 3, self.heads, d // self.heads).unbind(2)
        x = x + self.proj(self.attn(q, k, v).reshape(b, n, d))
        return x + self.mlp(self.norm2(x))


class TinyModel(torch.nn.Module):
    def __init__(self, program: str, vocab: int = 16, dim: int = 32, heads: int = 2, layers: int = 2,
                 max_len: int = 64, **params):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, dim)
        self.pos = torch.nn.Parameter(torch.randn(max_len, dim) * 0.1)
        self.blocks = torch.nn.ModuleList(Block(program, dim, heads, **params) for _ in range(layers))
        self.head = torch.nn.Linear(dim, vocab)

    def forward(self, tokens):
        x = self.embed(tokens) + self.pos[:tokens.shape[1]]
        for blk in self.blocks:
            x = blk(x)
        return self.head(x)


def batch(g: torch.Generator, size: int, n: int, vocab: int, lag: int) -> tuple:
    """Random tokens and their targets: the token `lag` positions back (position < lag: ignored, -100)."""
    tokens = torch.randint(0, vocab, (size, n), generator=g)
    target = torch.full_like(tokens, -100)
    target[:, lag:] = tokens[:, :-lag]
    return tokens, target


def train(program: str = os.path.join(HERE, "causal.moa"), steps: int = 50, seed: int = 0, n: int = 24,
          size: int = 8, vocab: int = 16, lag: int = 2, lr: float = 1e-2, device: str = "cpu", log=None,
          **params) -> list:
    """The loss of every step."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    model = TinyModel(program, vocab=vocab, **params).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    losses = []
    for step in range(steps):
        tokens, target = batch(g, size, n, vocab, lag)
        logits = model(tokens.to(device))
        loss = F.cross_entropy(logits.reshape(-1, vocab), target.to(device).reshape(-1), ignore_index=-100)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if log is not None:
            log(step, loss.item())
    return losses


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--program", default=os.path.join(HERE, "causal.moa"))
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    t0 = time.time()

    def log(step, loss):
        if step % 5 == 0 or step == args.steps - 1:
            print(f"step {step:3d}  loss {loss:.4f}  ({time.time() - t0:.1f} s)", flush=True)

    losses = train(args.program, steps=args.steps, seed=args.seed, device=args.device, log=log)
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    print(f"mean loss of the first 5 steps {first:.4f}, of the last 5 {last:.4f}")


if __name__ == "__main__":
    main()
