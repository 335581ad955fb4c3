"""Shared by the tests of masks over data (test_data_skip, test_program_summaries, test_pair_summaries) and of
standalone launchers (test_cli): the brute-force count of the tile pairs a mask needs, a backward call's kernels
checked one by one against the backward cost model, and the script that runs written launcher modules."""
from __future__ import annotations

import collections

import numpy as np

from moa.runtime import backward_run
from moa.runtime.measure import instrument


def needed(mask: np.ndarray, bm: int, bn: int) -> int:
    """(row tile, key tile) pairs holding an admissible (i, j), by brute force."""
    n, m = mask.shape
    R, T = -(-n // bm), -(-m // bn)
    pad = np.zeros((R * bm, T * bn), dtype=bool)
    pad[:n, :m] = mask
    return int(pad.reshape(R, bm, T, bn).any(axis=(1, 3)).sum())


def check_backward_prediction(k, x: dict, cot, pred, monkeypatch) -> None:
    """Run k's backward on inputs x and cotangent cot with every kernel launch counted by the instrumented
    interpreter; each kernel's FLOPs and bytes equal its prediction (pred: k.backward.cost(...))."""
    outs, saved = k.backward.forward(x)
    seen = collections.defaultdict(list)
    orig = backward_run.run

    def counted(fn, grid, args, consts, device, what):
        with instrument() as c:
            orig(fn, grid, args, consts, device, what)
        seen[getattr(fn, "__name__", None) or fn.fn.__name__].append(c)

    monkeypatch.setattr(backward_run, "run", counted)
    k.backward.backward(x, outs + saved, [cot])
    for name, w in pred.kernels.items():
        c = seen[name.split("/")[-1]][0]
        assert (w.flops, w.bytes_loaded, w.bytes_stored) == (c.flops, c.dram_bytes_loaded, c.dram_bytes_stored), name


# Runs modules written by `moa compile --launcher` in a fresh process: argv[1] holds {name: (path, [inputs, ...])};
# argv[2] gets {name: [outputs], name + ":bad shape": the error of a call whose K is short of Q's head dim}.
RUNNER = """
import importlib.util, sys, torch
cases = torch.load(sys.argv[1])
outs = {}
for name, (path, calls) in cases.items():
    spec = importlib.util.spec_from_file_location("written_" + name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    outs[name] = [mod.launch(**inputs) for inputs in calls]
    try:
        mod.launch(**{**calls[0], "K": calls[0]["K"][..., :-1]})   # K's head dim short of Q's
        outs[name + ":bad shape"] = "accepted"
    except ValueError as e:
        outs[name + ":bad shape"] = str(e)
assert not [m for m in sys.modules if m == "moa" or m.startswith("moa.")], "a written module imported moa"
torch.save(outs, sys.argv[2])
"""


def run_launchers(tmp_path, cases: dict) -> dict:
    """The outputs of written launcher modules (cases: {name: (path, [inputs, ...])}) run by RUNNER in a fresh
    process with TRITON_INTERPRET=1 (a written module imports no moa, so nothing of moa's sets the interpreter)."""
    import os
    import subprocess
    import sys

    import torch

    torch.save(cases, tmp_path / "in.pt")
    (tmp_path / "run.py").write_text(RUNNER)
    r = subprocess.run([sys.executable, str(tmp_path / "run.py"), str(tmp_path / "in.pt"), str(tmp_path / "out.pt")],
                       env={**os.environ, "TRITON_INTERPRET": "1"}, capture_output=True, text=True, timeout=600,
                       cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    return torch.load(tmp_path / "out.pt")


def launched_tables(tmp_path, programs: dict, inputs, n: int, m: int) -> tuple:
    """Each program (name -> source) written by `moa compile --launcher` and run standalone on a batch of two
    inputs (inputs(name, n, m, seed=...)); returns ({name: its output}, {name: the reference's output})."""
    import torch

    import moa
    from moa.cli import main

    cases, refs = {}, {}
    for name, text in programs.items():
        src, path = tmp_path / f"{name}.moa", tmp_path / f"{name}.py"
        src.write_text(text)
        assert main(["compile", str(src), "--launcher", "--dtype", "float64", "-o", str(path)]) == 0
        parts = [inputs(name, n, m, seed=s) for s in (5, 6)]
        x = {a: torch.stack([p[a] for p in parts]) for a in parts[0]}
        cases[name] = (str(path), [x])
        refs[name] = moa.compile(text).reference(**x)
    outs = run_launchers(tmp_path, cases)
    return {name: outs[name][0] for name in programs}, refs
