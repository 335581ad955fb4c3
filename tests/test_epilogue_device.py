"""The epilogue of a multi-branch output (PiAttention's gate after the split merge) is evaluated on the merged rows'
device in the accumulation dtype (runtime/epilogue_eval.py), not on the host: float64 on the CPU equals the host
evaluation bit for bit, and the evaluation runs on meta tensors (no value is read back to the host)."""
import torch

import moa
from moa import shard
from moa import symbolic as sy
from moa.runtime import decode, epilogue_eval, ring
from moa.runtime.binding import bind
from moa.runtime.dnf_eval import _DnfEval

D = 16
F64 = torch.float64


def _epilogue_inputs():
    k = moa.compile("examples/pi_attention.moa", k=20, s=7)
    plan, _ = ring.block_kernel(k)
    ep = plan.epilogues[0]
    prog = shard.epilogue_program(plan, ep)
    dims = {d.name: {"d": D, "e": D}.get(d.name, 5) for d in prog.dims}
    g = torch.Generator().manual_seed(0)
    ins = {n: torch.randn(2, *[sy.evaluate(x, dims) for x in node.shape], generator=g, dtype=F64)
           for n, node in prog.input_map.items()}
    return prog, ep, dims, ins


def test_device_epilogue_equals_the_host_float64_evaluation_and_stays_on_the_device():
    prog, ep, dims, ins = _epilogue_inputs()
    assert epilogue_eval.on_device(ep.expr)
    got = epilogue_eval.evaluate(prog, ep, ins, dims, F64, torch.device("cpu"))
    b = bind(prog, ins, dims)
    ev = _DnfEval(prog, b)
    active = tuple((v, sy.evaluate(x, dims), None) for v, x in zip(ep.vars, ep.extents))
    want = ev.full(ev.ev(ep.expr, active), active).expand_as(got)
    assert torch.equal(got, want)
    meta = epilogue_eval.evaluate(prog, ep, {n: t.to("meta") for n, t in ins.items()}, dims, torch.float32,
                                  torch.device("meta"))
    assert meta.device.type == "meta" and meta.dtype == torch.float32 and meta.shape == got.shape


def test_pi_attention_decode_gates_without_the_host_evaluator(monkeypatch):
    """A split decode of PiAttention (float64, and float32) equals the reference with the host DNF evaluator
    disabled in runtime/ring.py."""
    k = moa.compile("examples/pi_attention.moa", k=20, s=7)
    g = torch.Generator().manual_seed(1)
    x = {n: torch.randn(*s, generator=g, dtype=F64) for n, s in (("Q", (2, 90, D)), ("K", (2, 90, D)),
                                                                  ("V", (2, 90, D)), ("wg", (D,)))}
    want = k.reference(**x)[..., -3:, :]

    def refused(*a, **kw):
        raise AssertionError("the epilogue went to the host evaluator")
    monkeypatch.setattr(ring, "_DnfEval", refused)
    q = dict(x, Q=x["Q"][..., -3:, :])
    got = decode.decode(k, q, splits=3)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    f32 = decode.decode(k, {n: t.float() for n, t in q.items()}, splits=3)
    assert f32.dtype == torch.float32
    torch.testing.assert_close(f32.double(), want, rtol=1e-4, atol=1e-5)
