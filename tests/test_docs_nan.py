"""NaN inputs, as docs/robustness.md describes them: the interpreter stays quiet (no numpy "All-NaN slice" warning
from a row tile whose scores are all NaN), and NaN reaches the rows the reference says, except where the docs
name a difference (relu of NaN; a NaN value row in a key tile that a query tile skips)."""
import warnings
from pathlib import Path

import pytest
import torch

import moa
from moa.runtime.check import random_inputs

EX = Path(__file__).resolve().parents[1] / "examples"
EXAMPLES = sorted(p.stem for p in EX.glob("*.moa"))
SMALL = {"n": 40, "m": 48, "d": 8, "e": 12, "h": 4, "g": 2}


def nan_rows(x) -> torch.Tensor:
    return x.isnan().flatten(0, -2).any(-1) if x.dim() > 1 else x.isnan()


@pytest.mark.parametrize("name", EXAMPLES)
def test_nan_inputs_quiet_and_like_the_reference(name):
    k = moa.compile(EX / f"{name}.moa")
    dims = {d.name: SMALL[d.name] for d in k.program.dims}
    ins = random_inputs(k.program, dims)
    for x in [n for n, t in ins.items() if t.is_floating_point()]:
        for where in ("all", "one"):
            bad = ins[x].clone()
            if where == "all":
                bad.fill_(float("nan"))
            else:
                bad.view(-1)[bad.numel() // 2] = float("nan")
            call = {**ins, x: bad}
            with warnings.catch_warnings():
                warnings.simplefilter("error")        # any warning (numpy's All-NaN slice included) fails
                out = k(**call)
            ref = k.reference(**call)
            outs = out.values() if isinstance(out, dict) else [out]
            refs = ref.values() if isinstance(ref, dict) else [ref]
            for o, r in zip(outs, refs):
                if "relu" in name:   # relu(NaN) is 0 in a kernel (a max drops NaN), NaN in the reference
                    assert not (o.isnan() & ~r.isnan()).any(), (name, x, where)
                else:
                    assert torch.equal(o.isnan(), r.isnan()), (name, x, where)
                ok = ~(o.isnan() | r.isnan())
                assert torch.allclose(o[ok], r[ok], rtol=0, atol=1e-9), (name, x, where)


def test_all_nan_tile_is_quiet_in_bla():
    """BLA's per-row window max over all-NaN scores is where numpy's nanmax used to warn."""
    k = moa.compile(EX / "bla.moa")
    q, kk, v = (torch.randn(40, 8, dtype=torch.float64) for _ in range(3))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = k(Q=torch.full_like(q, float("nan")), K=kk, V=v)
    assert out.isnan().all()


def test_nan_in_v_reaches_the_visited_query_tiles_only():
    """causal, n = 300: a NaN in V[250] makes the reference NaN on every row (0 * NaN in P @ V); the kernel has it
    on the rows of every query tile that visits key 250's tile (masked keys there have p = 0, and 0 * NaN is
    NaN) and nowhere else; a NaN in K[250] gives NaN exactly on the rows that see key 250, in both."""
    k = moa.compile(EX / "causal.moa")
    q, kk, v = (torch.randn(300, 16, dtype=torch.float64) for _ in range(3))
    v[250, 0] = float("nan")
    out, ref = k(Q=q, K=kk, V=v), k.reference(Q=q, K=kk, V=v)
    assert nan_rows(ref).all()
    rows = nan_rows(out).nonzero().flatten()
    assert rows.max() == 299 and 0 < rows.min() <= 250 and rows.min() % 16 == 0 and len(rows) == 300 - int(rows.min())
    v[250, 0] = 0.0
    kk[250] = float("nan")
    out, ref = k(Q=q, K=kk, V=v), k.reference(Q=q, K=kk, V=v)
    assert torch.equal(nan_rows(out), nan_rows(ref)) and nan_rows(out).nonzero().flatten().tolist() == list(
        range(250, 300))


def test_threads_leave_the_warning_filters_as_they_were():
    """Interpreted launches from several threads at once: the filter that silences numpy's All-NaN warning is
    set by the outermost scope only, and nothing is left in warnings.filters afterwards."""
    import threading

    k = moa.compile(EX / "bla.moa")
    q, kk, v = (torch.randn(40, 8, dtype=torch.float64) for _ in range(3))
    k(Q=q, K=kk, V=v)                                   # compiled and cached before the threads start
    before = list(warnings.filters)
    errors = []

    def call():
        try:
            assert k(Q=torch.full_like(q, float("nan")), K=kk, V=v).isnan().all()
        except Exception as ex:   # reported below
            errors.append(ex)

    threads = [threading.Thread(target=call) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and warnings.filters == before
