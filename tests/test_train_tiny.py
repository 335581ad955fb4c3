"""examples/train_tiny.py, short: a 2-layer model with moa.nn.Attention trains on CPU (interpreter) and its loss goes
down; every parameter, those before the attention included, gets a finite gradient."""
import importlib.util
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def _example():
    spec = importlib.util.spec_from_file_location("train_tiny", ROOT / "examples" / "train_tiny.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_train_tiny_loss_goes_down():
    mod = _example()
    losses = mod.train(steps=8, n=16, size=4, seed=0)
    assert all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-3:]) / 3 < losses[0] - 0.1, losses


def test_train_tiny_gradients_reach_every_parameter():
    mod = _example()
    torch.manual_seed(0)
    model = mod.TinyModel(str(ROOT / "examples" / "softcap.moa"), vocab=8, dim=16)
    tokens, target = mod.batch(torch.Generator().manual_seed(0), 2, 12, 8, 2)
    loss = torch.nn.functional.cross_entropy(model(tokens).reshape(-1, 8), target.reshape(-1), ignore_index=-100)
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name
