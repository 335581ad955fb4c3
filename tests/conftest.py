"""Test set-up: Triton's interpreter must be on before triton is imported (CPU tensors, float64)."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")
