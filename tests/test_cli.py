"""The command line: `moa check` on every example and its PyTorch oracle chosen from the DNF, `--dims` errors, and
`moa compile --launcher` modules run standalone (no moa import) against the reference."""
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import moa
from moa.cli import main
from moa.errors import InputError
from moa.runtime.check import SdpaForm, _err, check, random_inputs, sdpa_form

try:
    import data_cases as DC
except ImportError:  # pragma: no cover
    from tests import data_cases as DC

ROOT = Path(__file__).resolve().parents[1]
EX = ROOT / "examples"
EXAMPLES = sorted(p.stem for p in EX.glob("*.moa"))
SMALL = {"n": 40, "m": 48, "d": 8, "e": 12, "h": 4, "g": 2}    # every dim an example declares
SDPA = {"sdpa": "F.scaled_dot_product_attention(Q, K, V)",
        "causal": "F.scaled_dot_product_attention(Q, K, V, is_causal=True)",
        "causal_bottom_right": "F.scaled_dot_product_attention(Q, K, V, attn_mask=causal_lower_right(n, m))",
        "mqa": "F.scaled_dot_product_attention(Q, K.unsqueeze(-3), V.unsqueeze(-3))"}


def small_dims(program) -> str:
    return ",".join(f"{d.name}={SMALL[d.name]}" for d in program.dims)


# ---- moa check ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", EXAMPLES)
def test_moa_check_every_example(name, capsys):
    """Exit 0 on every example; the PyTorch row only where the DNF is SDPA's, "no PyTorch equivalent" elsewhere."""
    path = EX / f"{name}.moa"
    assert main(["check", str(path), "--dims", small_dims(moa.compile(path).program), "--batch", "1"]) == 0
    out = capsys.readouterr().out
    assert out.rstrip().endswith("OK") and "Triton kernel vs IR reference" in out
    if name in SDPA:
        assert "IR reference vs PyTorch SDPA" in out and f"PyTorch oracle for O: {SDPA[name]}" in out
    else:
        assert "vs PyTorch" not in out and "no PyTorch equivalent for O: " in out


def test_examples_have_small_dims():
    for name in EXAMPLES:
        assert {d.name for d in moa.compile(EX / f"{name}.moa").program.dims} <= set(SMALL), name


SCORES = [   # (program body, expected call) — spellings of SDPA the DNF comparison must recognise
    ("in A[n, d], B[m, d], C[m, e]\nout O = softmax(A @ B.T * 0.25, axis=-1) @ C",
     "F.scaled_dot_product_attention(A, B, C, scale=1/4)"),
    ("in Q[n, d], K[n, d], V[n, e]\nS[i, j] = where(i >= j, dot(K[j], Q[i]) / 3, -inf)\n"
     "out O = softmax(S, axis=-1) @ V", "F.scaled_dot_product_attention(Q, K, V, is_causal=True, scale=1/3)"),
    ("in Q[n, d], K[n, d], V[n, e]\nS[i, j] = where(j < i + 1, dot(Q[i], K[j]) * rsqrt(d), -inf)\n"
     "out O = softmax(S, axis=-1) @ V", "F.scaled_dot_product_attention(Q, K, V, is_causal=True, scale=1/sqrt(d))"),
    ("in Q[h, n, d], K[g, m, d], V[g, m, e]\n"
     "out O[a] = softmax(Q[a] @ K[a // (h // g)].T / sqrt(d), axis=-1) @ V[a // (h // g)]",
     "F.scaled_dot_product_attention(Q, K, V, enable_gqa=True)"),
]


@pytest.mark.parametrize("body,call", SCORES)
def test_sdpa_recognised_from_the_dnf(body, call):
    names = ", ".join(x for x in "hgnmde" if f"{x}," in body or f"{x}]" in body)
    k = moa.compile(f"dim {names}\n{body}")
    form = sdpa_form(k.program, k.dnf[0])
    assert isinstance(form, SdpaForm) and form.call() == call
    rep = check(k, {x: v for x, v in {"h": 4, "g": 2, "n": 20, "m": 20, "d": 8, "e": 8}.items() if x in names},
                batch=1)
    assert rep.ok and any(r[0] == "IR reference vs PyTorch SDPA" for r in rep.rows), rep.text()


NOT_SDPA = [   # (score line, the reason's start)
    ("S[i, j] = where(j < i, dot(Q[i], K[j]) / sqrt(d), -inf)", "the mask (j < i) is not SDPA's"),
    ("S[i, j] = where(j <= i + 1, dot(Q[i], K[j]) / sqrt(d), -inf)", "the mask (j <= (i + 1)) is not SDPA's"),
    ("S[i, j] = dot(Q[i], K[j]) / sqrt(d) + 0.5", "the score"),
    ("S[i, j] = dot(Q[i], K[j]) / sqrt(j + 1)", "the score"),
    ("S[i, j:n] = dot(Q[i], K[n - 1 - j]) / sqrt(d)", "the score"),
]


@pytest.mark.parametrize("score,why", NOT_SDPA)
def test_not_sdpa_has_no_oracle(score, why):
    k = moa.compile(f"dim n, d, e\nin Q[n, d], K[n, d], V[n, e]\n{score}\nout O = softmax(S, axis=-1) @ V")
    form = sdpa_form(k.program, k.dnf[0])
    assert isinstance(form, str) and form.startswith(why), form
    rep = check(k, {"n": 20, "d": 8, "e": 8}, batch=0)
    assert rep.ok and f"no PyTorch equivalent for O: {form}" in rep.notes


def test_a_wrong_oracle_fails():
    """The SDPA row can fail: causal SDPA against the unmasked program's reference is far off."""
    k = moa.compile(EX / "sdpa.moa")
    form = sdpa_form(k.program, k.dnf[0])
    wrong = SdpaForm(form.q, form.k, form.v, form.rows, form.keys, "top-left", None, "same")
    dims = {"n": 20, "m": 20, "d": 8, "e": 8}
    x = random_inputs(k.program, dims, batch=1)
    assert _err(k.reference(**x), wrong.run(x, dims))[1] > 1e-2


def test_bottom_right_with_rows_without_keys_is_not_compared():
    rep = check(moa.compile(EX / "causal_bottom_right.moa"), {"n": 24, "m": 16, "d": 8, "e": 8}, batch=0)
    assert rep.ok and not any("PyTorch" in r[0] for r in rep.rows)
    assert any("8 rows without keys" in n for n in rep.notes), rep.notes


def test_err_treats_matching_nans_as_equal():
    a = torch.tensor([1.0, float("nan"), 2.0])
    assert _err(a, a.clone()) == (0.0, 0.0)
    assert _err(a, torch.tensor([1.0, 0.0, 2.0]))[0] == float("inf")


# ---- --dims -------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dims,words", [
    ("n=-5,d=16,e=16", ["dim n must be a non-negative integer, got -5"]),
    ("n=100,d=16,e=16.5", ["dim e must be a non-negative integer, got 16.5"]),
    ("n=100,d=16,e=16,zz=3", ["unknown dim 'zz'"]),
    ("n=100,d=16", ["missing dim e", "n=100,d=16,e=16"]),
    ("n=4,n=5,d=1,e=1", ["n is given twice"]),
    ("n=abc,d=1,e=1", ["n must be a number, got 'abc'"]),
    ("n,d=1,e=1", ["expected name=value, got 'n'"]),
])
def test_check_dims_errors(dims, words, capsys):
    assert main(["check", str(EX / "causal.moa"), "--dims", dims]) == 2
    err = capsys.readouterr().err
    assert err.startswith("moa: error: --dims: ") and "Traceback" not in err
    for w in words:
        assert w in err, err
    if "declares" in err:
        assert "causal.moa declares dims n, d, e" in err


def test_dims_name_a_param(capsys):
    assert main(["check", str(EX / "sliding_window.moa"), "--dims", "n=8,d=4,e=4,w=2"]) == 2
    assert "unknown dim 'w' (w is a param: set it with --param w=...)" in capsys.readouterr().err


@pytest.mark.parametrize("dims", ["n=24 d=8 e=8", "n=24, d = 8,e=8", " n=24\td=8 e=8 "])
def test_dims_separated_by_blanks(dims, capsys):
    assert main(["check", str(EX / "causal.moa"), "--dims", dims, "--batch", "0"]) == 0
    assert capsys.readouterr().out.rstrip().endswith("OK")


def test_other_commands_check_dims(capsys):
    assert main(["cost", str(EX / "causal.moa"), "--dims", "n=1024,zz=3"]) == 2
    assert "unknown dim 'zz'" in capsys.readouterr().err
    assert main(["aot", str(EX / "causal.moa"), "--dims", "n=1024,d=64.5,e=64"]) == 2
    assert "dim d must be a non-negative integer" in capsys.readouterr().err


def test_check_api_validates_dims():
    k = moa.compile(EX / "causal.moa")
    with pytest.raises(InputError, match="dim n must be a non-negative integer, got -5"):
        check(k, {"n": -5, "d": 4, "e": 4})
    with pytest.raises(InputError, match="input Q <n d> has a negative extent"):
        random_inputs(k.program, {"n": -5, "d": 4, "e": 4})


# ---- moa compile -----------------------------------------------------------------------------------------------------

def test_compile_help_shows_the_default_dtype(capsys):
    with pytest.raises(SystemExit):
        main(["compile", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "the kernel's dtype (default: float16)" in out and "--launcher" in out


def test_compile_options(tmp_path, capsys):
    path = tmp_path / "k.py"
    assert main(["compile", str(EX / "causal.moa"), "--dtype", "float32", "--config", "32,16", "-o", str(path)]) == 0
    src = path.read_text()
    assert "dtype: float32" in src and "@triton.jit" in src and "def launch" not in src
    assert main(["compile", str(EX / "causal.moa"), "--config", "48,16"]) == 2
    assert "powers of two >= 16" in capsys.readouterr().err
    assert main(["compile", str(EX / "causal.moa"), "--output-name", "P"]) == 2
    assert "--output-name P: the program's outputs are O" in capsys.readouterr().err


def test_launcher_refuses_the_window_kernel(capsys):
    assert main(["compile", str(EX / "bla.moa"), "--launcher"]) == 2
    assert "window-mixing kernel" in capsys.readouterr().err


LAUNCHED = ["causal", "gqa_alibi", "document_mask", "global_window", "relative_bias", "pi_attention", "mqa", "power"]


def test_launcher_modules_run_standalone(tmp_path, capsys):
    """Modules written by `moa compile --launcher` run in a fresh interpreter process (TRITON_INTERPRET=1, no
    moa import) and match the reference: batch axes, no batch axes, a batch-less input broadcast, int and bool
    inputs, heads, grouped heads, the residue schedule (pi_attention, --schedule residue) and normalize."""
    cases, refs = {}, {}
    for name in LAUNCHED:
        path = tmp_path / f"{name}.py"
        forced = ["--schedule", "residue"] if name == "pi_attention" else []
        assert main(["compile", str(EX / f"{name}.moa"), "--launcher", "--dtype", "float64", "-o", str(path),
                     *forced]) == 0
        k = moa.compile(EX / f"{name}.moa")
        dims = {d.name: SMALL[d.name] for d in k.program.dims}
        batched = random_inputs(k.program, dims, seed=1, batch=2)
        plain = {x: t[0] for x, t in batched.items()}
        calls = [batched, plain]
        if name == "causal":   # K without the batch axis: broadcast over the batch
            calls.append({**batched, "K": plain["K"]})
        cases[str(name)] = (str(path), calls)
        refs[name] = [k.reference(**c) for c in calls]
    assert "pi_attention" in LAUNCHED and "residue lifting" in (tmp_path / "pi_attention.py").read_text()
    capsys.readouterr()
    outs = DC.run_launchers(tmp_path, cases)
    for name in LAUNCHED:
        for got, want in zip(outs[name], refs[name]):
            assert got.shape == want.shape and got.dtype == torch.float64
            assert (got - want).abs().max().item() < 1e-12, name
        assert "expected shape" in outs[name + ":bad shape"], outs[name + ":bad shape"]


# ---- plots ----------------------------------------------------------------------------------------------------------

def blank_bands(png) -> int:
    """The tallest band of pixel rows that are all background (white) between the first and last drawn row."""
    import matplotlib.image as mpimg

    img = mpimg.imread(str(png))[..., :3]
    drawn = ~(img > 0.99).all(axis=(1, 2))
    rows = drawn.nonzero()[0]
    run = best = 0
    for r in range(rows[0], rows[-1] + 1):
        run = 0 if drawn[r] else run + 1
        best = max(best, run)
    return best


def test_cost_plot_ticks_and_units(tmp_path, capsys):
    """The n axis has one plain tick per swept n (256, 512, 1K ...), no 3x10^2 minor labels; axes carry units."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from moa.cli.plots import n_ticks

    fig, ax = plt.subplots()
    ax.loglog([256, 8192], [1, 2])
    ns = [2 ** p for p in range(8, 14)]
    n_ticks(ax, ns)
    fig.canvas.draw()
    assert [t.get_text() for t in ax.get_xticklabels()] == ["256", "512", "1K", "2K", "4K", "8K"]
    assert not [t for t in ax.get_xticklabels(minor=True) if t.get_text()]
    plt.close(fig)
    png = tmp_path / "cost.png"
    assert main(["cost", str(EX / "causal.moa"), "--dims", "n=4096,d=64,e=64", "--no-fit", "--plot", str(png)]) == 0
    assert blank_bands(png) < 40


def test_tile_map_has_no_blank_gap(tmp_path, capsys):
    """The map sits right under its titles (at 110 dpi a band of 40 blank pixel rows is about 0.4 in)."""
    for name, dims in [("sliding_window", "n=2048,d=64,e=64"), ("pi_attention", "n=1024,d=64,e=64"),
                       ("causal", "n=8192,d=64,e=64")]:
        png = tmp_path / f"{name}.png"
        assert main(["explain", str(EX / f"{name}.moa"), "--tiles", str(png), "--dims", dims]) == 0
        assert blank_bands(png) < 40, name


@pytest.mark.parametrize("name,words", [
    ("missing/x.png", "does not exist"), ("x.txt", "cannot write .txt"), ("x", "without an extension"),
    ("dir.png", "cannot write it")])
def test_plot_paths_are_input_errors(name, words, tmp_path, capsys):
    (tmp_path / "dir.png").mkdir()
    path = str(tmp_path / name)
    assert main(["explain", str(EX / "causal.moa"), "--tiles", path, "--dims", "n=256,d=16,e=16"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("moa: error: --tiles ") and words in err and "Traceback" not in err
    assert main(["cost", str(EX / "causal.moa"), "--dims", "n=256,d=16,e=16", "--no-fit", "--plot", path]) == 2
    err = capsys.readouterr().err
    assert err.startswith("moa: error: --plot ") and words in err


def test_plots_without_matplotlib(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)     # `import matplotlib` raises ImportError
    assert main(["explain", str(EX / "causal.moa"), "--tiles", str(tmp_path / "t.png"), "--dims",
                 "n=256,d=16,e=16"]) == 2
    assert "--tiles needs matplotlib (the plot extra" in capsys.readouterr().err


# ---- clean edges: sizes, counts, dtypes, targets, paths (issue 15) --------------------------------------------------

@pytest.mark.parametrize("cmd,dims,words", [
    ("check", "n=99999999999999999999999,d=16,e=16", "n=99999999999999999999999 does not fit in a 64-bit integer"),
    ("cost", "n=99999999999999999999999,d=16,e=16", "does not fit in a 64-bit integer"),
    ("aot", "n=99999999999999999999999,d=16,e=16", "does not fit in a 64-bit integer"),
    ("compile", "n=99999999999999999999999,d=16,e=16", "does not fit in a 64-bit integer"),
    ("check", "n=2147483648,d=16,e=16", "dim n=2147483648 is too large: dims are at most 2^31 - 1"),
    ("aot", "n=1,d=16,e=4294967296", "dim e=4294967296 is too large"),
])
def test_overflowing_dims(cmd, dims, words, capsys):
    assert main([cmd, str(EX / "causal.moa"), "--dims", dims]) == 2
    out, err = capsys.readouterr()
    assert err.startswith("moa: error: --dims") and words in err and len(err.splitlines()) == 1, err
    assert out == ""


def test_overflowing_param(capsys):
    assert main(["check", str(EX / "sliding_window.moa"), "--dims", "n=10,d=4,e=4", "--param",
                 "w=99999999999999999999999"]) == 2
    assert "--param: w=99999999999999999999999 does not fit in a 64-bit integer" in capsys.readouterr().err
    assert main(["check", str(EX / "softcap.moa"), "--dims", "n=10,d=4,e=4", "--param", "c=1e400"]) == 2
    assert "--param: c=1e400 overflows a 64-bit float (write inf for infinity)" in capsys.readouterr().err


def test_check_refuses_dims_over_its_memory_budget(capsys):
    """n=40000 would make the float64 reference allocate [n, n] intermediates (25.6 GB each at batch 2): refused
    before any allocation, with the bytes it would take and smaller dims that fit."""
    from moa.cli import limits

    assert main(["check", str(EX / "causal.moa"), "--dims", "n=40000,d=16,e=16"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and len(err.splitlines()) == 1 and "Traceback" not in err
    assert "moa check would need about " in err and " GiB of memory" in err and "budget of 2 GiB" in err, err
    suggested = err.split("e.g. --dims ")[1].split()[0]
    dims = dict((a, int(b)) for a, b in (x.split("=") for x in suggested.split(",")))
    assert dims["d"] == 16 and dims["e"] == 16 and 1000 < dims["n"] < 40000
    limits.check_budget(moa.compile(EX / "causal.moa"), dims, 2)     # the suggestion fits
    assert main(["check", str(EX / "causal.moa"), "--dims", "n=3000,d=16,e=16", "--grad"]) == 2
    assert "x 3 for --grad" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [
    ["cost", str(EX / "causal.moa"), "--dims", "n=2147483647,d=16,e=16", "--no-fit"],
    ["explain", str(EX / "causal.moa"), "--dims", "n=2147483647,d=16,e=16", "--tiles", "t.png"],
])
def test_cost_and_tiles_refuse_huge_index_grids(argv, capsys):
    """The cost model and the tile map evaluate every (query, key) pair: 2^62 of them was a killed process."""
    assert main(argv) == 2
    out, err = capsys.readouterr()
    assert out == "" and "4.61e+18 pairs here" in err and "e.g. --dims n=262144,d=16,e=16" in err, err


@pytest.mark.parametrize("argv,words", [
    (["check", "--dims", "n=10,d=4,e=4", "--batch", "-1"], "--batch must be a non-negative integer of at most"),
    (["check", "--dims", "n=10,d=4,e=4", "--batch", "two"], "--batch must be a non-negative integer, got 'two'"),
    (["cost", "--dims", "n=256,d=16,e=16", "--batch", "-3"], "--batch must be a non-negative integer"),
    (["check", "--dims", "n=10,d=4,e=4", "--seed", str(2 ** 70)], "--seed must be an integer between"),
    (["check", "--dims", "n=10,d=4,e=4", "--seed", "x"], "--seed must be an integer, got 'x'"),
    (["cost", "--dims", "n=256,d=16,e=16", "--device", "b200"], "unknown device 'b200'"),
])
def test_counts_are_validated(argv, words, capsys):
    assert main([argv[0], str(EX / "causal.moa"), *argv[1:]]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.startswith("moa: error: ") and words in err and len(err.splitlines()) == 1, err


def test_check_api_validates_batch():
    with pytest.raises(InputError, match="batch must be a non-negative integer"):
        check(moa.compile(EX / "causal.moa"), {"n": 4, "d": 4, "e": 4}, batch=-1)


def test_cli_batch_and_seed(capsys):
    assert main(["check", str(EX / "causal.moa"), "--dims", "n=8,d=4,e=4", "--batch", "0", "--seed", "-1",
                 "--no-kernel"]) == 0
    assert capsys.readouterr().out.rstrip().endswith("OK")


@pytest.mark.parametrize("spelling,name", [("bf16", "bfloat16"), ("bfloat16", "bfloat16"), ("fp16", "float16"),
                                           ("half", "float16"), ("fp32", "float32"), ("fp64", "float64")])
def test_dtype_spellings_everywhere(spelling, name, capsys):
    assert main(["compile", str(EX / "causal.moa"), "--dtype", spelling]) == 0
    assert f"dtype: {name}" in capsys.readouterr().out
    assert main(["cost", str(EX / "causal.moa"), "--dims", "n=256,d=16,e=16", "--no-fit", "--dtype", spelling]) == 0
    assert f"{name} on " in capsys.readouterr().out.splitlines()[0]


@pytest.mark.parametrize("cmd", [["compile"], ["cost", "--no-fit"], ["aot"]])
@pytest.mark.parametrize("bad", ["tf32", "int8"])
def test_unknown_dtypes(cmd, bad, capsys):
    assert main([cmd[0], str(EX / "causal.moa"), "--dims", "n=64,d=16,e=16", *cmd[1:], "--dtype", bad]) == 2
    out, err = capsys.readouterr()
    assert out == "" and f"--dtype: unknown dtype {bad!r}; use one of float64, float32" in err, err


def test_aot_unknown_target_once(capsys):
    assert main(["aot", str(EX / "causal.moa"), "--dims", "n=1024,d=64,e=64", "--target", "sm_70"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("sm_70") == 1 and len(err.splitlines()) == 1, err
    assert "supported targets: sm_80, sm_86, sm_89, sm_90, sm_90a" in err
    with pytest.raises(moa.UnsupportedError) as e:    # the API refuses once too, before trying configs
        moa.compile(EX / "causal.moa").aot(target="sm_70", n=1024, d=64, e=64)
    assert str(e.value).count("unknown GPU target") == 1


@pytest.mark.parametrize("arg,words", [
    ("{ex}", "is a directory; name a .moa file (e.g. {ex}/alibi.moa)"),
    ("{tmp}/empty", "is a directory, not a .moa file"),
    ("{ex}/nosuch.moa", "{ex}/nosuch.moa: no such file"),
    ("{ex}/causal", "{ex}/causal: no such file"),
    ("{tmp}/binary.moa", "cannot read"),
    ("  ", "the program argument is empty"),
])
def test_program_paths(arg, words, tmp_path, capsys):
    (tmp_path / "binary.moa").write_bytes(b"\xff\xfe\x00dim n")
    (tmp_path / "empty").mkdir()
    arg, words = (s.format(ex=EX, tmp=tmp_path) for s in (arg, words))
    for cmd in (["explain"], ["cost"], ["check", "--dims", "n=4"]):
        assert main([cmd[0], arg, *cmd[1:]]) == 2
        out, err = capsys.readouterr()
        assert out == "" and err.startswith("moa: error: ") and words in err and "Traceback" not in err, err


@pytest.mark.parametrize("argv,words", [
    (["cost", "--plot", "c.png"], "--plot needs --dims with every dim"),
    (["cost", "--plot", "c.txt", "--dims", "n=256,d=16,e=16", "--no-fit"], "cannot write .txt"),
    (["explain", "--tiles", "t.png"], "--tiles needs --dims with the sequence dims (n)"),
    (["explain", "--tiles", "nodir/t.png", "--dims", "n=256"], "does not exist"),
])
def test_plot_arguments_checked_before_printing(argv, words, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main([argv[0], str(EX / "causal.moa"), *argv[1:]]) == 2
    out, err = capsys.readouterr()
    assert out == "" and words in err and len(err.splitlines()) == 1, err


def test_repository_stands_alone():
    """No tracked file points to design notes outside the repository."""
    names = ["DESIGN", "LANGUAGE", "VARIANTS"]
    outside = [n + ".md" for n in names] + ["../" + "shared"]
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    hits = []
    for f in files:
        p = ROOT / f
        if p.suffix in {".py", ".md", ".moa", ".toml", ".yml", ".cfg", ".txt", ""} and p.is_file():
            text = p.read_text(errors="replace")
            hits += [f"{f}: {o}" for o in outside if o in text]
    assert not hits, hits


@pytest.mark.parametrize("config,words", [
    ("1180591620717411303424,64", "at most 2^20 elements"), ("2048,1024", "got 2048 x 1024"),
    ("64,64,99999999999999999999,3", "WARPS must be a power of two of at most 32"), ("64,64,4,17", "STAGES must")])
def test_config_bounds(config, words, capsys):
    for cmd in (["compile"], ["aot", "--dims", "n=1024,d=64,e=64"]):
        assert main([cmd[0], str(EX / "causal.moa"), *cmd[1:], "--config", config]) == 2
        out, err = capsys.readouterr()
        assert out == "" and err.startswith("moa: error: --config: ") and words in err, err


def test_config_options():
    """--config takes the tiled kernel's Hopper options and the linear form's value tile by name."""
    from moa.cli.args import parse_config
    from moa.runtime.tiling import Config, LinearConfig
    assert parse_config("64,64,4,3,tma,overlap") == Config(64, 64, 4, 3, tma=True, overlap=True)
    assert parse_config("128, 64, 8, 3, BV=64") == LinearConfig(128, 64, 8, 3, block_v=64)
    for bad, words in [("64,64,bv=48", "power of two >= 16, got 48"), ("64,64,tma,bv=64", "does not combine"),
                       ("64,64,fast", "expected BM,BN[,WARPS[,STAGES]][,tma][,overlap][,bv=N]"),
                       ("64,64,bv=32,bv=64", "expected")]:
        with pytest.raises(InputError, match=re.escape(words)):
            parse_config(bad)


def test_config_options_reach_the_compile(capsys):
    """tma reaches the AOT compile (bulk tensor copies in the PTX); bv= the linear scan's value tile; each refused
    where it cannot apply."""
    assert main(["aot", str(EX / "causal.moa"), "--dims", "n=1024,d=64,e=64", "--config", "64,64,4,3,tma"]) == 0
    out = capsys.readouterr().out
    assert "BLOCK_M=64 BLOCK_N=64 num_warps=4 num_stages=3" in out and "TMA loads         yes" in out, out
    assert main(["aot", str(EX / "linear.moa"), "--dims", "n=1024,d=16,e=64", "--form", "linear",
                 "--config", "64,32,4,3,bv=32"]) == 0
    out = capsys.readouterr().out
    assert "CHUNK=64 BLOCK_F=32 BLOCK_V=32 warps=4 stages=3" in out and "fits sm_90" in out, out
    for argv, words in [(["compile", "--config", "64,64,bv=32"], "moa compile writes the tiled kernel"),
                        (["compile", "--launcher", "--config", "64,64,4,3,tma"], "the tma option needs"),
                        (["aot", "--dims", "n=1024,d=64,e=64", "--config", "64,64,bv=32"], "must be a tile Config")]:
        assert main([argv[0], str(EX / "causal.moa"), *argv[1:]]) == 2
        out, err = capsys.readouterr()
        assert out == "" and err.startswith("moa: error: ") and words in err and len(err.splitlines()) == 1, err


def test_cost_at_edges_and_decode_shapes(capsys):
    """moa cost over no rows prints a table (it divided by zero), and at decode shapes says that a CUDA call runs
    the split-KV decode, with that prediction."""
    assert main(["cost", str(EX / "causal.moa"), "--dims", "n=0,d=64,e=64", "--no-fit"]) == 0
    assert "dense causal" not in capsys.readouterr().out
    assert main(["cost", str(EX / "mqa.moa"), "--dims", "h=32,n=1,m=32768,d=128,e=128", "--no-fit"]) == 0
    out = capsys.readouterr().out
    assert "runs as a split-KV decode (128 key splits, 32 query heads per tile)" in out, out
    assert "dense causal" not in out   # queries against another length of keys: no causal comparison
    assert main(["cost", str(EX / "causal_bottom_right.moa"), "--dims", "n=4096,m=4096,d=128,e=128", "--no-fit"]) == 0
    assert "split-KV" not in capsys.readouterr().out   # a prefill: the decode is predicted slower, the call stays plain


def test_check_fails_without_a_kernel(tmp_path, capsys):
    """A program moa emits no kernel for (a softmax over the query axis) does not pass `moa check`: it printed OK."""
    path = tmp_path / "column.moa"
    path.write_text("dim n, d, e\nin Q[n, d], K[n, d], V[n, e]\nS[i, j] = dot(Q[i], K[j]) / sqrt(d)\n"
                    "out O = softmax(S, axis=0) @ V\n")
    assert main(["check", str(path), "--dims", "n=20,d=8,e=8"]) == 1
    out = capsys.readouterr().out
    assert "kernel: not compiled" in out and out.rstrip().splitlines()[-1].startswith("NO KERNEL"), out
    assert main(["check", str(path), "--dims", "n=20,d=8,e=8", "--no-kernel"]) == 0
    assert main(["check", str(path), "--dims", "n=20,d=8,e=8", "--grad"]) == 1   # it stopped with an error (2)
    out = capsys.readouterr().out
    assert "--grad: no gradient rows" in out and out.rstrip().splitlines()[-1].startswith("NO KERNEL"), out


def test_launcher_tiles_and_bfloat16_on_the_cpu(tmp_path, capsys):
    """At given dims the launcher takes the tiles the runtime fits for sm_90 (gated.moa at d = 128: 128 x 32; the
    default 128 x 64 spills), and a bfloat16 module refuses CPU tensors (the interpreter computes bf16 wrongly)."""
    path = tmp_path / "gated.py"
    assert main(["compile", str(ROOT / "docs" / "tutorial" / "gated.moa"), "--launcher", "--dtype", "bfloat16",
                 "--dims", "n=8192,d=128,e=128", "-o", str(path)]) == 0
    text = path.read_text()
    assert "BLOCK_M, BLOCK_N = 128, 32" in text and "computes wrong numbers in Triton's interpreter" in text


@pytest.mark.parametrize("argv,words", [
    (["compile", "{ex}", "-o", "{tmp}/missing/k.py"], "does not exist"),
    (["compile", "{ex}", "-o", "{tmp}"], "is a directory"),
    (["aot", "{ex}", "--dims", "n=1024,d=64,e=64", "--ptx", "{tmp}/missing/x.ptx"], "does not exist"),
])
def test_output_files_that_cannot_be_written_are_errors(argv, words, tmp_path, capsys):
    # a raw FileNotFoundError / IsADirectoryError traceback before (found by a helper); checked before compiling
    args = [a.format(ex=EX / "causal.moa", tmp=tmp_path) for a in argv]
    assert main(args) == 2
    assert words in capsys.readouterr().err


def test_cost_backward_table(capsys):
    """`moa cost --backward`: the backward kernels' work per kernel, totals, and the operand pullback's note; the
    numbers are the backward cost model's (k.backward.cost), printed as BackwardCost.table prints them."""
    assert main(["cost", str(EX / "causal.moa"), "--dims", "n=100,d=16,e=16", "--device", "cpu", "--dtype",
                 "float64", "--backward"]) == 0
    out = capsys.readouterr().out
    k = moa.compile(EX / "causal.moa")
    bc = k.backward.cost({"n": 100, "d": 16, "e": 16}, (), "float64")
    assert bc.table() in out and str(bc) == bc.table()
    rows = {ln.split()[0]: ln.split() for ln in bc.table().splitlines()[2:5]}
    assert rows["_attn_bwd_dq"][3] == "-" and int(rows["total"][2]) == bc.total("iterations")
    assert main(["cost", str(EX / "causal.moa"), "--backward"]) == 2
    assert "--backward needs --dims" in capsys.readouterr().err
