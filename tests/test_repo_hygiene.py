"""Repository-wide checks: layout, packaging, lint."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ALLOWED_TOP_LEVEL = {
    "recipes", "preprocessing", "training", "conversion", "evaluation", "benchmarks", "launch",
    "tests", "Dockerfile", "README.md", "CONTRIBUTING.md", "pyproject.toml", ".ci", "docs",
    ".gitignore", ".dockerignore",
}


def _tracked(repo_root: Path) -> list[str]:
    out = subprocess.run(["git", "ls-files"], cwd=repo_root, capture_output=True, text=True)
    return out.stdout.split() if out.returncode == 0 else []


def test_top_level_layout(repo_root: Path) -> None:
    tracked = _tracked(repo_root)
    if not tracked:
        return  # not a git checkout (e.g. an installed copy): nothing to check
    top = {path.split("/")[0] for path in tracked}
    assert top <= ALLOWED_TOP_LEVEL, f"unexpected top-level entries: {sorted(top - ALLOWED_TOP_LEVEL)}"


def test_every_package_folder_is_packaged(repo_root: Path) -> None:
    config = tomllib.loads((repo_root / "pyproject.toml").read_text())
    packaged = set(config["tool"]["setuptools"]["packages"])
    for init in repo_root.glob("*/**/__init__.py"):
        rel = init.parent.relative_to(repo_root)
        if rel.parts[0] in {"tests", ".venv", ".venv-nemo", "docs"} or rel.parts[0].startswith("."):
            continue
        assert "qwen_pretrain." + ".".join(rel.parts) in packaged, f"{rel} missing from pyproject packages"


def test_ruff_clean(repo_root: Path) -> None:
    ruff = Path(sys.executable).parent / "ruff"
    done = subprocess.run([str(ruff), "check", "."], cwd=repo_root, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-3000:]


def test_runs_from_a_checkout_without_installing(repo_root: Path, tmp_path: Path) -> None:
    """Inside the NGC image a checkout named `qwen_pretrain` on PYTHONPATH is enough.

    `python -S` skips site processing, so the `.pth` hook of our editable install never runs;
    site-packages is put back as a plain path entry for the third-party libraries (the image
    has its own), which does not process `.pth` files.
    """
    import sysconfig

    (tmp_path / "qwen_pretrain").symlink_to(repo_root, target_is_directory=True)
    code = (
        "import qwen_pretrain, runpy, sys; print('PKG', list(qwen_pretrain.__path__)); "
        "sys.argv = ['qwen-pretrain', 'recipes', 'show', 'qwen25_72b']; "
        "runpy.run_module('qwen_pretrain.launch.cli', run_name='__main__')"
    )
    done = subprocess.run(
        [sys.executable, "-S", "-c", code],
        cwd=tmp_path,
        env={"PYTHONPATH": f"{tmp_path}:{sysconfig.get_paths()['purelib']}", "PATH": "/usr/bin:/bin"},
        capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 0, done.stderr
    paths = eval(done.stdout.split("PKG ", 1)[1].splitlines()[0])  # the printed list
    assert paths and all(p == str(tmp_path / "qwen_pretrain") for p in paths), paths
    assert "TP=8 PP=4 VPP=5" in done.stdout


def test_package_compiles_under_python_312(repo_root: Path, tmp_path: Path) -> None:
    """The NGC images run Python 3.12: nothing in the package may need 3.11 to compile."""
    python312 = _python312()
    if python312 is None:
        pytest.skip("no working python3.12 (PATH or pyenv)")
    packages = ["recipes", "preprocessing", "training", "conversion", "evaluation", "benchmarks", "launch"]
    done = subprocess.run(
        [python312, "-m", "compileall", "-q", *packages],
        cwd=repo_root, capture_output=True, text=True, timeout=300,
        env={"PATH": "/usr/bin:/bin", "PYTHONPYCACHEPREFIX": str(tmp_path)},  # no .pyc in the tree
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


def _python312() -> str | None:
    """A python3.12 that runs: from PATH, else a pyenv install (pyenv's shim only answers for the
    selected version)."""
    import os
    import shutil

    pyenv_root = Path(os.environ.get("PYENV_ROOT", Path.home() / ".pyenv"))
    candidates = [shutil.which("python3.12"), *sorted(map(str, pyenv_root.glob("versions/3.12*/bin/python3.12")))]
    for candidate in filter(None, candidates):
        probe = subprocess.run([candidate, "-c", "import sys; print(sys.version_info[:2])"],
                               capture_output=True, text=True)
        if probe.returncode == 0 and probe.stdout.strip() == "(3, 12)":
            return candidate
    return None
