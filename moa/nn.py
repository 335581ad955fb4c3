"""moa.nn: compiled programs as torch.nn modules (runtime/nn.py). `moa.nn.Attention(source, num_heads=H, **params)`
takes (batch, heads, n, d) tensors like F.scaled_dot_product_attention, or (batch, n, heads, d) with layout="bnhd"."""
from moa.runtime.nn import Attention

__all__ = ["Attention"]
