"""The documentation says what the code does: the README's quickstart runs and prints what it claims, the
tutorial's programs, commands, quoted outputs and Python code are the repository's and run, every variant in
examples/ has its section (definition, verbatim source, tile map) in docs/variants.md, every link resolves,
nothing points outside the repository, and the mkdocs site builds in strict mode."""
import contextlib
import io
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from moa.cli import main

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
EXAMPLES = sorted(p.stem for p in (ROOT / "examples").glob("*.moa"))
PAGES = sorted(p.name for p in DOCS.glob("*.md"))
TUTORIAL = (DOCS / "tutorial.md").read_text()
NUMBER = re.compile(r"-?\d+(\.\d+)?(e[-+]?\d+)?")


def fenced(text: str) -> list[tuple[str, str]]:
    """The fenced blocks of a markdown text, in order: (language, body)."""
    return [(m.group(1), m.group(2)) for m in re.finditer(r"```(\w*)\n(.*?)```", text, re.S)]


def blocks(text: str, lang: str) -> list[str]:
    return [body for la, body in fenced(text) if la == lang]


def shape(line: str) -> str:
    """A line of output with its numbers and runs of blanks reduced, to compare quoted output with real."""
    return " ".join(NUMBER.sub("#", line).split())


def run_python(code: str) -> str:
    out, here = io.StringIO(), os.getcwd()
    os.chdir(ROOT)
    try:
        with contextlib.redirect_stdout(out):
            exec(compile(code, "<doc>", "exec"), {"__name__": "__doc_block__"})
    finally:
        os.chdir(here)
    return out.getvalue()


# ---- README ---------------------------------------------------------------------------------------------------------

def test_readme_quickstart_runs_and_prints_what_it_claims():
    readme = (ROOT / "README.md").read_text()
    code = re.search(r"## Quickstart\n\n```python\n(.*?)```", readme, re.S).group(1)
    assert "# ~1e-15 (float64 rounding)" in code
    out = run_python(code)
    err = float(re.match(r"tensor\(([-0-9.e+]+)", out).group(1))
    assert err < 1e-14                                    # the claim: about 1e-15
    assert "ONF O: grid" in out and "@triton.jit" in out and "dtype: bfloat16" in out


def test_readme_links_every_page_and_holds_the_two_commands():
    readme = (ROOT / "README.md").read_text()
    for page in PAGES:
        assert f"](docs/{page})" in readme, f"README.md's Documentation list should link docs/{page}"
    assert "](examples/README.md)" in readme
    assert re.search(r"^make demo ", readme, re.M) and re.search(r"^make test ", readme, re.M)


def readme_commands() -> list[str]:
    readme = (ROOT / "README.md").read_text()
    lines = [c.split("  #")[0].strip() for b in blocks(readme, "sh") for c in b.splitlines()]
    return [c for c in lines if c.startswith("moa ")]


@pytest.mark.parametrize("cmd", readme_commands())
def test_readme_command_lines_parse(cmd, monkeypatch):
    """Every `moa ...` line of the README names a real file and options the CLI takes (the commands themselves
    are monkeypatched away: the tutorial's tests run the same subcommands and options for real)."""
    import moa.cli
    import moa.cli.cost

    seen = []
    for mod in (moa.cli, moa.cli.cost):
        for name in [n for n in vars(mod) if n.startswith("cmd_")]:
            monkeypatch.setattr(mod, name, lambda args, name=name: seen.append((name, args)) or 0)
    argv = shlex.split(cmd)[1:]
    monkeypatch.chdir(ROOT)
    assert main(argv) == 0 and len(seen) == 1
    assert Path(seen[0][1].file).exists()


def test_readme_commands_are_there():
    cmds = readme_commands()
    assert len(cmds) >= 7 and {c.split()[1] for c in cmds} == {"explain", "check", "compile", "cost", "aot"}


# ---- links and self-containment -------------------------------------------------------------------------------------

def markdown_files() -> list[Path]:
    return [ROOT / "README.md", ROOT / "examples" / "README.md"] + sorted(DOCS.glob("*.md"))


@pytest.mark.parametrize("md", markdown_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(md):
    prose = re.sub(r"`[^`\n]*`", "", re.sub(r"```.*?```", "", md.read_text(), flags=re.S))   # no code
    for target in re.findall(r"\]\(([^)\s]+)\)", prose):
        if "://" in target or target.startswith("#"):
            continue
        path = (md.parent / target.split("#")[0]).resolve()
        assert path.exists() and ROOT in path.parents, f"{md.name}: {target}"


def test_nothing_points_outside_the_repository():
    """Docs, examples and tests are read by users and run by CI from a clone: they name no file of the machine
    the project was written on (the design notes it started from are not part of it)."""
    words = ["/" + "work/", "LANGUAGE" + ".md", "VARIANTS" + ".md", "DESIGN" + ".md", "../" + "shared"]
    files = markdown_files() + sorted((ROOT / "examples").iterdir()) + sorted((ROOT / "tests").glob("*.py"))
    files += [ROOT / "mkdocs.yml", ROOT / "Makefile", DOCS / "images.py"] + sorted((DOCS / "tutorial").iterdir())
    for f in files:
        if f.is_file():
            text = f.read_text(errors="replace")
            for w in words:
                assert w not in text, f"{f.relative_to(ROOT)} mentions {w}"


def test_named_files_and_functions_exist():
    """Every repository path (runtime/plan.py ...) and every `module.function` / `Class.method` the README and the
    docs name in backticks exists."""
    import importlib

    text = "".join(p.read_text() for p in markdown_files())
    named = r"\b(?:moa|runtime|codegen|frontend|cli|tests|benchmarks|examples|docs)/[\w/]+\.(?:py|md|moa|lark|png)\b"
    for path in set(re.findall(named, text)):
        assert (ROOT / path).exists(), path
    modules = {}
    for folder, pkg in [("moa", "moa"), ("runtime", "moa.runtime"), ("codegen", "moa.codegen"),
                        ("frontend", "moa.frontend"), ("cli", "moa.cli")]:
        for f in (ROOT / folder).glob("*.py"):
            modules.setdefault(f.stem, f"{pkg}.{f.stem}")
    classes = {"Kernel": "moa.runtime.kernel", "Planner": "moa.runtime.plan", "Launcher": "moa.runtime.launch",
               "LinearRunner": "moa.runtime.linear_run", "WindowRunner": "moa.runtime.window_run",
               "ShardPlan": "moa.shard", "HaloPlan": "moa.shard_halo"}
    for owner, attr in sorted(set(re.findall(r"`([A-Za-z_]+)\.([a-z_]+)(?:\(\))?`", text))):
        if owner in classes:
            cls = getattr(importlib.import_module(classes[owner]), owner)
            assert hasattr(cls, attr) or attr in getattr(cls, "__dataclass_fields__", {}), f"{owner}.{attr}"
        elif owner in modules and attr not in ("py", "md", "lark", "moa"):
            assert hasattr(importlib.import_module(modules[owner]), attr), f"{owner}.{attr}"


# ---- docs/variants.md -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", EXAMPLES)
def test_every_variant_has_definition_source_and_tile_map(name):
    text = (DOCS / "variants.md").read_text()
    src = (ROOT / "examples" / f"{name}.moa").read_text().rstrip("\n")
    assert f"`examples/{name}.moa`:\n\n```\n{src}\n```" in text, (
        f"docs/variants.md needs a section for examples/{name}.moa that quotes its current source verbatim")
    assert f"](images/tiles/{name}.png)" in text, f"docs/variants.md should show images/tiles/{name}.png"
    png = DOCS / "images" / "tiles" / f"{name}.png"
    assert png.exists() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", f"{png}: run make docs-images"


# ---- docs/tutorial.md -----------------------------------------------------------------------------------------------

def test_tutorial_programs_are_the_files():
    progs = {p.name: p.read_text().rstrip("\n") for p in (DOCS / "tutorial").glob("*.moa")}
    shown = [b.rstrip("\n") for b in blocks(TUTORIAL, "") if b.startswith("# ") and ".moa" in b.split("\n")[0]]
    assert sorted(shown) == sorted(progs.values())
    for name in progs:
        assert f"`docs/tutorial/{name}`" in TUTORIAL
    for name in ("mask", "modifier", "gated", "cost"):
        assert (DOCS / "images" / f"tutorial_{name}.png").exists()


def tutorial_commands():
    """(command, the plain blocks quoted after it, up to the next shell block) for every `moa <subcommand>` of the
    tutorial (blocks holding a .moa program are not output)."""
    blocks_ = fenced(TUTORIAL)
    out = []
    for k, (lang, body) in enumerate(blocks_):
        if lang != "sh":
            continue
        cmds = [c.split("#")[0].strip() for c in body.splitlines()]
        cmds = [c for c in cmds if re.match(r"moa (check|explain|cost|aot|compile) ", c)]
        quoted = []
        for lang2, body2 in blocks_[k + 1:]:
            if lang2:
                break
            if not (body2.startswith("# ") and ".moa" in body2.split("\n")[0]):
                quoted.append(body2)
        for c in cmds:
            out.append((c, "\n".join(quoted) if len(cmds) == 1 else None))
    return out


def test_tutorial_has_its_commands():
    cmds = [c for c, _ in tutorial_commands()]
    assert len(cmds) == 9 and sum(c.startswith("moa check") for c in cmds) == 3
    assert any("--tiles" in c for c in cmds) and any("--plot" in c for c in cmds)
    assert any(c.startswith("moa aot") for c in cmds) and any("--launcher" in c for c in cmds)


@pytest.mark.parametrize("cmd,quoted", tutorial_commands(), ids=lambda x: x[:60] if isinstance(x, str) else "")
def test_tutorial_command_runs_and_prints_what_is_quoted(cmd, quoted, tmp_path, monkeypatch, capsys):
    argv = shlex.split(cmd)[1:]
    for flag in ("--tiles", "--plot", "-o"):
        if flag in argv:
            i = argv.index(flag) + 1
            argv[i] = str(tmp_path / argv[i])
    monkeypatch.chdir(ROOT)
    assert main(argv) == 0
    out = capsys.readouterr().out
    for flag in ("--tiles", "--plot", "-o"):
        if flag in argv:
            assert Path(argv[argv.index(flag) + 1]).stat().st_size > 1000
    if quoted:   # every quoted line (numbers aside; '...' marks an elision) is a line of the output
        real = [shape(x) for x in out.splitlines()]
        for line in quoted.splitlines():
            if line.strip() and "..." not in line:
                assert any(shape(line) in r for r in real), line


def test_tutorial_python_runs():
    (code,) = blocks(TUTORIAL, "python")
    out = run_python(code)
    m = re.match(r"cpu \(1, 2, 256, 32\) torch\.float64 max error ([0-9.e+-]+)", out)
    assert m and float(m.group(1)) < 1e-14, out


# ---- the site -------------------------------------------------------------------------------------------------------

def test_home_page_lists_every_page():
    home = (DOCS / "index.md").read_text()
    for page in PAGES:
        assert page == "index.md" or f"]({page})" in home, f"docs/index.md's list of pages should link {page}"


def test_mkdocs_nav_has_every_page():
    nav = re.findall(r"^  - [^:]+: (\S+\.md)$", (ROOT / "mkdocs.yml").read_text(), re.M)
    assert not set(PAGES) - set(nav), f"add {sorted(set(PAGES) - set(nav))} to the nav of mkdocs.yml"
    assert not set(nav) - set(PAGES), f"mkdocs.yml's nav names missing pages {sorted(set(nav) - set(PAGES))}"


@pytest.mark.skipif(shutil.which("mkdocs", path=str(Path(sys.executable).parent)) is None,
                    reason="mkdocs is not installed (the docs extra: make setup)")
def test_mkdocs_build_strict(tmp_path):
    mk = shutil.which("mkdocs", path=str(Path(sys.executable).parent))
    r = subprocess.run([mk, "build", "--strict", "--quiet", "--site-dir", str(tmp_path / "site")], cwd=ROOT,
                       capture_output=True, text=True, env={"NO_MKDOCS_2_WARNING": "1", "PATH": "/usr/bin:/bin"})
    assert r.returncode == 0, r.stdout + r.stderr
    assert (tmp_path / "site" / "tutorial" / "index.html").exists()


def test_readme_api_table_names_what_exists():
    import inspect

    import moa
    from moa.runtime.kernel import Kernel

    readme = (ROOT / "README.md").read_text()
    api = readme[readme.index("## API"):readme.index("Errors are")]
    for name in sorted(set(re.findall(r"`k\.(\w+)", api))):
        assert hasattr(Kernel, name), name
    sig = re.search(r"`moa\.compile\((.*?)\)`", api).group(1)
    shown = [p.split("=")[0].strip("* ") for p in sig.split(",")]
    assert [p for p in shown if p != "/"] == list(inspect.signature(moa.compile).parameters)
    assert shown[1] == "/"   # the source is positional-only (a param may be named source_or_path)
