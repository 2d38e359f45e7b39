"""Atomic outputs: every file or directory the project writes appears complete or not at all.

    atomic_write_text(path, text)          # temp file beside `path`, then rename
    with atomic_dir(out) as tmp: ...       # fill `tmp`; renamed to `out` when the block succeeds

The temporary name starts with a dot and ends in `.tmp-PID`, so an interrupted run leaves a
hidden leftover that no reader mistakes for output; a failed block removes it.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def atomic_write_bytes(path: str | os.PathLike, data: bytes, *, mode: int | None = None) -> None:
    """Write `data` to `path` through a temp file in the same directory and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".tmp-{os.getpid()}", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        # mkstemp creates 0600; give the file the usual permissions (or the ones asked for)
        os.chmod(tmp, mode if mode is not None else 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def atomic_write_text(path: str | os.PathLike, text: str, *, mode: int | None = None) -> None:
    atomic_write_bytes(path, text.encode(), mode=mode)


@contextmanager
def atomic_dir(out: str | os.PathLike, *, replace: bool = False) -> Iterator[Path]:
    """A fresh temporary directory beside `out`, renamed to `out` when the block succeeds and
    removed when it fails. An existing `out` is replaced only with `replace=True`: it is moved
    aside just before the rename and removed after it."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=f".tmp-{os.getpid()}", dir=out.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_umask())
        if replace and out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current
