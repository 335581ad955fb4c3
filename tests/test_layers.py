"""The layers of the code base: import-linter's contracts (pyproject.toml) hold, no module has a function-level import
of moa's own code, modules stay under 500 lines and functions under 80 without a stated reason, and importing moa
changes no process-wide state."""
import ast
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"moa": "moa", "frontend": "moa/frontend", "codegen": "moa/codegen", "runtime": "moa/runtime",
            "cli": "moa/cli"}
LONG_REASON = "# long:"   # a function over 80 lines carries this comment, with its reason, on or above its def line


def _sources():
    for folder in PACKAGES:
        yield from sorted((ROOT / folder).glob("*.py"))


def test_import_linter_contracts(tmp_path):
    """The installed layout (moa/, frontend/ -> moa.frontend, ...) copied into one tree that import-linter can walk,
    then `lint-imports` over the contracts of pyproject.toml."""
    for folder, target in PACKAGES.items():
        dst = tmp_path / target
        dst.mkdir(parents=True, exist_ok=True)
        for f in (ROOT / folder).glob("*.py"):
            shutil.copy(f, dst / f.name)
    exe = Path(sys.executable).with_name("lint-imports")
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    proc = subprocess.run([str(exe), str(ROOT / "pyproject.toml"), "--no-cache"], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert " 0 broken" in proc.stdout


# function-level imports of moa's own code are not allowed; of these others only with a reason on the line above
HEAVY_OR_OPTIONAL = ("matplotlib", "torch.distributed", "triton.experimental")


def test_no_function_level_imports_of_moa_code():
    found = []
    for f in _sources():
        tree = ast.parse(f.read_text())
        lines = f.read_text().splitlines()
        in_functions = [x for fn in ast.walk(tree) if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef))
                        for x in ast.walk(fn)]
        for node in {id(x): x for x in in_functions}.values():
            if not isinstance(node, (ast.Import, ast.ImportFrom)):
                continue
            names = [node.module or ""] if isinstance(node, ast.ImportFrom) else [a.name for a in node.names]
            if isinstance(node, ast.ImportFrom) and node.level:
                found.append(f"{f.relative_to(ROOT)}:{node.lineno}: relative import inside a function")
                continue
            for name in names:
                if name == "moa" or name.startswith("moa."):
                    if f.name == "__init__.py" and f.parent.name == "moa":
                        continue   # the package facade: moa.compile loads the runtime when first called
                    found.append(f"{f.relative_to(ROOT)}:{node.lineno}: function-level import of {name}")
                elif not name.startswith(HEAVY_OR_OPTIONAL):
                    found.append(f"{f.relative_to(ROOT)}:{node.lineno}: function-level import of {name}")
                else:
                    before = lines[node.lineno - 1] + (lines[node.lineno - 2] if node.lineno > 1 else "")
                    if "#" not in before:
                        found.append(f"{f.relative_to(ROOT)}:{node.lineno}: import of {name} without a reason")
    assert not found, "\n".join(found)


def test_module_and_function_sizes():
    found = []
    for f in _sources():
        text = f.read_text()
        lines = text.splitlines()
        if len(lines) > 500:
            found.append(f"{f.relative_to(ROOT)}: {len(lines)} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                size = node.end_lineno - node.lineno + 1
                if size > 80 and LONG_REASON not in lines[node.lineno - 1] + lines[node.lineno - 2]:
                    found.append(f"{f.relative_to(ROOT)}:{node.lineno} {node.name}: {size} lines, no reason")
    assert not found, "\n".join(found)


@pytest.mark.parametrize("first", ["triton", "moa"])
def test_import_changes_no_global_state(first, tmp_path):
    """`import triton; import moa` (either order) works on a machine without CUDA, sets no environment variable,
    leaves Triton compiling (not interpreting) other kernels, and CPU tensors still run in the interpreter."""
    script = textwrap.dedent(f"""
        import os
        before = dict(os.environ)
        import {first}
        import moa, triton, torch
        import triton.language as tl
        from triton.runtime.jit import JITFunction
        assert dict(os.environ) == before
        k = moa.compile({str(ROOT / 'examples' / 'causal.moa')!r})
        q = torch.randn(2, 37, 16, dtype=torch.float64)
        err = (k(Q=q, K=q, V=q) - k.reference(Q=q, K=q, V=q)).abs().max().item()
        assert err < 1e-12, err
        assert isinstance(tl.sum, JITFunction) and isinstance(tl.standard.cdiv, JITFunction)
        @triton.jit
        def user_kernel(x):
            pass
        assert isinstance(user_kernel, JITFunction)
        assert dict(os.environ) == before
        print("OK")
    """)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    path = tmp_path / "user_script.py"   # a file: @triton.jit reads the source of the user's kernel
    path.write_text(script)
    proc = subprocess.run([sys.executable, str(path)], env=env, capture_output=True, text=True, timeout=300,
                          check=False)
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stderr[-3000:]
