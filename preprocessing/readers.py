"""Input corpora: which files, cut into tasks that workers can read on their own, and parsed.

A task is a piece of one file small enough to hold in memory:
- plain `.jsonl`: a byte range; the worker seeks to it and owns the lines that *start* in it,
  so the main process never reads the text;
- `.jsonl.gz` / `.jsonl.zst`: not seekable, so the main process decompresses as a stream and
  hands batches of raw lines to the workers;
- `.parquet`: one row group, read by the worker (pyarrow) with only the wanted columns.
Each task knows its place (file, first line or row), so a bad record is reported as
`file:line` however the file was split.
"""

from __future__ import annotations

import glob
import gzip
import io
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from qwen_pretrain.recipes.errors import UserError

SUFFIXES = (".jsonl", ".jsonl.gz", ".jsonl.zst", ".parquet", ".json", ".json.gz", ".json.zst")
TASK_BYTES = 8 << 20  # ~8 MB of text per task: large enough to amortize, small enough to bound memory


def supported(path: Path) -> bool:
    return path.name.endswith(SUFFIXES)


def expand_inputs(inputs: list[str | Path]) -> list[Path]:
    """Files, directories (searched recursively) and globs -> a sorted, de-duplicated file list."""
    files: list[Path] = []
    for item in inputs:
        item = str(item)
        if glob.has_magic(item):
            matches = [Path(m) for m in sorted(glob.glob(item, recursive=True))]
            found = [m for m in matches if m.is_file() and supported(m)]
            found += [f for m in matches if m.is_dir() for f in _walk(m)]
            if not found:
                raise UserError(f"--input {item}: the pattern matches no {'/'.join(SUFFIXES[:4])} file")
            files += found
        elif os.path.isdir(item):
            found = _walk(Path(item))
            if not found:
                raise UserError(f"--input {item}: the directory holds no {'/'.join(SUFFIXES[:4])} file")
            files += found
        elif os.path.isfile(item):
            if not supported(Path(item)):
                raise UserError(f"--input {item}: unsupported file type; use .jsonl, .jsonl.gz, .jsonl.zst or .parquet")
            files.append(Path(item))
        else:
            raise UserError(f"--input {item}: no such file or directory")
    seen: set[Path] = set()
    unique = []
    for f in files:
        key = f.resolve()
        if key not in seen:
            seen.add(key)
            unique.append(f)
    return unique


def _walk(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file() and supported(p))


@dataclass(frozen=True)
class Task:
    """One piece of one input file. `kind` is "range", "lines" or "rowgroup"."""

    kind: str
    path: str
    first: int = 0  # byte offset (range), first line number (lines), first row (rowgroup)
    end: int = 0  # end byte (range) or row-group number (rowgroup)
    lines: list[bytes] = field(default_factory=list)
    size: int = 0  # bytes of input this task covers (for progress)


@dataclass
class Parsed:
    """What a worker got out of a task: texts per key, record count and bad records."""

    texts: dict[str, list[str]]
    records: int  # lines / rows whose start lies in the task (for absolute line numbers)
    bad: list[tuple[int, str]]  # (record number within the task, 0-based; reason)
    blank: int = 0


def plan_tasks(files: list[Path], task_bytes: int = TASK_BYTES) -> Iterator[Task]:
    """Tasks in input order; compressed files are decompressed here, lazily, task by task."""
    for path in files:
        name = path.name
        if name.endswith(".parquet"):
            yield from _parquet_tasks(path)
        elif name.endswith((".gz", ".zst")):
            yield from _line_batches(path, task_bytes)
        else:
            size = path.stat().st_size
            for start in range(0, max(size, 1), task_bytes):
                end = min(start + task_bytes, size)
                yield Task("range", str(path), start, end, size=end - start)


def _open_compressed(path: Path) -> io.BufferedIOBase:
    if path.name.endswith(".gz"):
        return gzip.open(path, "rb")
    import zstandard

    raw = open(path, "rb")  # noqa: SIM115 - owned by the returned reader
    return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(raw, closefd=True), 1 << 20)


def _line_batches(path: Path, task_bytes: int) -> Iterator[Task]:
    try:
        with _open_compressed(path) as f:
            batch: list[bytes] = []
            size = 0
            first = 0
            for line in f:
                batch.append(line)
                size += len(line)
                if size >= task_bytes:
                    yield Task("lines", str(path), first, lines=batch, size=size)
                    first += len(batch)
                    batch, size = [], 0
            if batch:
                yield Task("lines", str(path), first, lines=batch, size=size)
    except (OSError, EOFError) as err:  # gzip.BadGzipFile is an OSError; zstd raises ZstdError
        raise UserError(f"{path}: cannot decompress ({err}); check the file or re-download it") from err
    except Exception as err:
        if type(err).__name__ == "ZstdError":
            raise UserError(f"{path}: cannot decompress ({err}); check the file or re-download it") from err
        raise


def _parquet_tasks(path: Path) -> Iterator[Task]:
    import pyarrow.parquet as pq

    try:
        meta = pq.ParquetFile(path).metadata
    except Exception as err:
        raise UserError(f"{path}: not a readable parquet file ({err})") from err
    first = 0
    for i in range(meta.num_row_groups):
        group = meta.row_group(i)
        yield Task("rowgroup", str(path), first, i, size=group.total_byte_size)
        first += group.num_rows


def parse_task(task: Task, keys: tuple[str, ...]) -> Parsed:
    """Read a task's records and pull out the text of each key (worker side)."""
    if task.kind == "rowgroup":
        return _parse_rowgroup(task, keys)
    lines = _read_range(task) if task.kind == "range" else task.lines
    texts: dict[str, list[str]] = {k: [] for k in keys}
    bad: list[tuple[int, str]] = []
    blank = 0
    loads = json.loads
    for n, line in enumerate(lines):
        if not line or line.isspace():  # what strip() would empty, without copying the line
            blank += 1
            continue
        try:
            record = loads(line)
        except ValueError as err:  # JSONDecodeError and UnicodeDecodeError
            bad.append((n, f"invalid JSON ({str(err).split(':')[0]})"))
            continue
        if not isinstance(record, dict):
            bad.append((n, f"expected a JSON object, got {type(record).__name__}"))
            continue
        values = [record.get(k) for k in keys]
        missing = [k for k, v in zip(keys, values, strict=True) if not isinstance(v, str)]
        if missing:
            bad.append((n, f"key '{missing[0]}' missing or not a string (keys present: {', '.join(list(record)[:5])})"))
            continue
        for k, v in zip(keys, values, strict=True):
            texts[k].append(v)
    return Parsed(texts, len(lines), bad, blank)


def _read_range(task: Task) -> list[bytes]:
    """The lines that start inside [first, end) of a plain file (the last may run past `end`),
    without their line feeds: one read of the range, not one call per line."""
    with open(task.path, "rb") as f:
        begin = task.first
        if begin > 0:
            f.seek(begin - 1)
            if f.read(1) != b"\n":
                f.readline()  # the line started in the previous task, which owns it
            begin = f.tell()
        if begin >= task.end:
            return []
        data = f.read(task.end - begin)
        if not data.endswith(b"\n"):
            data += f.readline()  # the last line started here: it is this task's to the end
    lines = data.split(b"\n")
    if not lines[-1]:
        lines.pop()  # the text after the last line feed: nothing
    return lines


def _parse_rowgroup(task: Task, keys: tuple[str, ...]) -> Parsed:
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(task.path)
    names = set(pf.schema_arrow.names)
    absent = [k for k in keys if k not in names]
    if absent:
        raise UserError(f"{task.path}: no column '{absent[0]}' (columns: {', '.join(sorted(names)[:8])}); pass --json-keys")
    table = pf.read_row_group(task.end, columns=list(keys))
    columns = {k: table.column(k).to_pylist() for k in keys}
    rows = table.num_rows
    good = [i for i in range(rows) if all(isinstance(columns[k][i], str) for k in keys)]
    bad = [(i, f"column value of '{keys[0]}' is null or not a string") for i in sorted(set(range(rows)) - set(good))]
    texts = {k: [columns[k][i] for i in good] for k in keys} if len(good) < rows else columns
    return Parsed(texts, rows, bad)
