"""The epilogue part of a several-branch backward (PiAttention's gate) is evaluated where the tensors are: on the
meta device (a stand-in for a GPU: it refuses host copies and mixing with CPU tensors that are not scalars) the
gradient DNF evaluation runs through and every gradient stays on that device."""
from __future__ import annotations

import torch

import moa
from moa.runtime import dnf_eval


def test_epilogue_gradients_stay_on_the_device(monkeypatch):
    k = moa.compile("examples/pi_attention.moa")
    mb = k.backward.multi
    assert mb is not None
    # the range check reads data (a bool of the meta tensor has none); the CPU tests exercise it
    monkeypatch.setattr(dnf_eval._DnfEval, "check_range", staticmethod(lambda *args: None))
    n, d, dev = 37, 8, torch.device("meta")
    x = {name: torch.empty(2, n, d, device=dev) for name in ("Q", "K", "V")}
    x["wg"] = torch.empty(d, device=dev)
    b = k.planner.cg_binding(k.bind(x))
    values = [(torch.empty(2, n, d, device=dev), torch.empty(2, n, device=dev)) for _ in mb.subs]
    got = mb._epilogue(b, values, torch.empty(2, n, d, device=dev))
    assert set(got) >= {"Q", "wg", *mb.value_names}
    for name, g in got.items():
        assert g.device == dev and g.dtype == torch.float64, name
    assert got["wg"].shape == (2, d) and got[mb.value_names[0]].shape == (2, n, d)
