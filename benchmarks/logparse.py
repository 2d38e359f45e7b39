"""Streaming parsers for training logs: each format's fields as data, one engine to read them.

`parse_line(line, fmt)` parses one line; `iter_records(path, fmt)` streams a whole log.

A log is read in 4 MiB blocks of whole lines, so memory stays flat however big the log is, and
non-UTF-8 bytes never stop the parser (keys and numbers are ASCII). In each block:

  1. one regex scan finds every step record, `iteration N/M ...` up to the end of its line or a
     `\r` (progress bars); lines without a record cost no Python at all; ANSI colours are removed;
  2. a line holding a second `iteration N/M` is cut there (two records glued on one line);
  3. each record is parsed BY KEY (`| key: value`), never by position, so fields may come in
     any order or be missing; values may use scientific notation (`6.706e+03`,
     `global_step: 3.1e+4`), K/M/B/T suffixes (`12.9K`, nanotron's human format) or `nan`;
     a line with exactly the keys of an earlier line, in the same places, takes a compiled
     shortcut (`Layout`) that gives the same values faster;
  4. anything before the record start (`[rank3]:`, `[default0]:`, timestamps) is ignored;
     lines before the first step are read for format markers and Megatron's argument dump.

Once the log's first layout is learned, the rest of it goes column-wise (`ColumnScan`): one regex
pass per block splits every line of that layout into its values, all of which one C-level
`map(float, ...)` converts; lines of other layouts are parsed by key in place, and a block with
something odd in it (records glued on one line, a value that is not a number) goes back to the
record-by-record loop. Both give the same records, line numbers and printed `nan` against absent
included: tests compare them on written and on random logs.

The formats themselves (keys, families, detection) live in `logformats.py`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from itertools import chain
from operator import attrgetter, itemgetter, methodcaller
from pathlib import Path

import numpy as np
from qwen_pretrain.benchmarks.logformats import (  # noqa: F401  (re-exported: the parser's public names)
    FAMILY_OF_FORMAT,
    FORMATS,
    INT_FIELDS,
    MEGATRON_FAMILY,
    NANOTRON_FAMILY,
    NEMO_FAMILY,
    NUMBER,
    OURS_LOG_MARKER,
    STEP_COLUMN,
    VALUE_FIELDS,
    LineFamily,
    StepRecord,
    family_of_record,
    parse_number,
)
from qwen_pretrain.recipes.errors import UserError

BLOCK_BYTES = 1 << 22  # read size; lines are split out of each block
MAX_LINE_BYTES = 1 << 20  # a "line" longer than this is not a step line (binary data): dropped

# Start of a step record in all three line families: `iteration 528/999` (NeMo),
# `iteration      528/     999` (Megatron-LM), `iteration: 528 / 999` (nanotron).
RECORD_PREFIX = rb"iteration(:?)[ \t]*(\d+)[ \t]*/[ \t]*(\d+)"
RECORD_START = re.compile(RECORD_PREFIX)
# A step record and the rest of its line, up to the line end or a `\r` (progress bars).
RECORD_LINE = re.compile(RECORD_PREFIX + rb"([^\n\r]*)")
ANSI_ESCAPE = re.compile(rb"\x1b\[[0-9;?]*[ -/]*[@-~]")
# Megatron-LM's argument dump at start-up (`  seq_length ..... 4096`): used, when the user does not
# pass them, to derive tokens/s for logs that do not print it.
ARG_DUMP = re.compile(rb"^\s*(seq_length|world_size|global_batch_size)\s+\.{3,}\s+(\d+)\s*$")


RawRecord = tuple[int, int, list]  # (step, line number, values in VALUE_FIELDS order, ABSENT)


# A raw record's values start as this very object: `value is ABSENT` tells "not printed" from a
# printed `nan` (a different float object), so the hot loop needs no None -> NaN pass.
ABSENT = float("nan")
_ALL_COLUMNS = range(len(VALUE_FIELDS) + 1)
_ABSENT_ROW = (ABSENT,) * (len(VALUE_FIELDS) + 1)


def _slow_columns(family: LineFamily, keys: tuple[bytes, ...], raws: tuple[bytes, ...]) -> dict[int, float]:
    """The per-field path for values plain float() rejects: `12.9K`, `3.624[rank0]: ...`."""
    out = {}
    for key, raw in zip(keys, raws):
        value = parse_number(raw)
        if value is not None:
            out[family.column_of[key]] = value
    return out


def _parse_values(family: LineFamily, segment: bytes, iteration: bytes, line_no: int) -> RawRecord | None:
    """The record's fields by key; None when none of the family's keys is there (not a step line).

    The common case runs as a chain of C-level calls (findall, map(float), dict, map(dict.get)):
    a few microseconds a record, which is what makes 1 GB logs quick.
    """
    pairs = family.pattern.findall(segment)
    if not pairs:
        return None
    keys, raws = zip(*pairs)
    try:
        by_column = dict(zip(map(family.column_of.__getitem__, keys), map(float, raws)))
    except ValueError:  # K/M suffixes, a glued record right after a number
        by_column = _slow_columns(family, keys, raws)
    if len(by_column) - (STEP_COLUMN in by_column) == 0:
        return None
    values = list(map(by_column.get, _ALL_COLUMNS, _ABSENT_ROW))
    step = values.pop()  # the STEP_COLUMN slot
    step = int(round(step)) if step is not ABSENT and math.isfinite(step) else int(iteration)  # `3.1e+4`
    for column, scale in family.scaled:
        if values[column] is not ABSENT:
            values[column] *= scale
    return step, line_no, values


@dataclass(frozen=True)
class Layout:
    """The exact field sequence of a step line already parsed, compiled for the fast path.

    A record takes it only if it has the same keys in the same places (a full match), so values
    are still taken by key; any other record goes through `_parse_values`. A log has one or two
    layouts (e.g. with and without `val_loss`); learning them makes big logs twice as fast.
    """

    fullmatch: Callable[[bytes], re.Match[bytes] | None]
    fields: bytes  # the pattern of the fields, for the block scanner
    n_groups: int
    columns: tuple[int, ...]  # the VALUE_FIELDS column (or STEP_COLUMN) of each group
    step_pos: int | None  # group holding the global step; None: use the iteration number
    getter: Callable[[list[float]], tuple[float, ...]]  # groups + [ABSENT] -> VALUE_FIELDS order
    scaled: tuple[tuple[int, float], ...]  # (group, scale)


MAX_LAYOUTS = 4


def learn_layout(family: LineFamily, segment: bytes) -> Layout | None:
    """The layout of `segment` (the text after `iteration N/M`), or None if it has none usable."""
    fields = segment.split(b"|")
    if fields[0].strip():
        return None
    if fields[-1].strip() == b"":
        fields.pop()  # Megatron-LM ends its line with `|`
    parts, columns = [rb"[ \t]*"], []
    for f in fields[1:]:
        key, sep, _ = f.partition(b":")
        key = key.strip()
        if not sep or not key:
            return None
        part = rb"\|[ \t]*" + re.escape(key) + rb"[ \t]*:"
        if key in family.column_of:
            # The value as one token: a value with spaces inside is not a layout line (by key then).
            parts.append(part + rb"[ \t]*([^ \t|\n\r]*)[ \t]*")
            columns.append(family.column_of[key])
        else:
            parts.append(part + rb"[^|\n\r]*")
    if len(set(columns)) != len(columns) or not set(columns) - {STEP_COLUMN}:
        return None
    fields_pattern = b"".join(parts) + rb"(?:\|[ \t]*)?"
    pattern = re.compile(fields_pattern)
    if pattern.fullmatch(segment) is None:  # e.g. a value with a space in it
        return None
    absent = len(columns)  # index of the ABSENT appended after the groups
    getter = itemgetter(*(columns.index(c) if c in columns else absent for c in range(len(VALUE_FIELDS))))
    scale = dict(family.scaled)
    scaled = tuple((i, scale[c]) for i, c in enumerate(columns) if c in scale)
    step_pos = columns.index(STEP_COLUMN) if STEP_COLUMN in columns else None
    return Layout(pattern.fullmatch, fields_pattern, len(columns), tuple(columns), step_pos, getter, scaled)


def _record(raw: RawRecord) -> StepRecord:
    step, line_no, values = raw
    fields = {}
    for name, value in zip(VALUE_FIELDS, values):
        if value is ABSENT:
            value = None
        elif name in INT_FIELDS:
            value = int(round(value)) if math.isfinite(value) else None
        fields[name] = value
    return StepRecord(step, line_no, **fields)


def parse_line(line: str | bytes, fmt: str = "auto") -> list[StepRecord]:
    """The step records on one log line (none, one, or several glued together), by format.

    The formats are data (the LineFamily key tables above) read by one engine; a format's
    "parse function" is this one with its name. `iter_records` does the same for a whole file.
    """
    if isinstance(line, str):
        line = line.encode("utf-8", errors="replace")
    line = ANSI_ESCAPE.sub(b"", line)
    out = []
    for piece in line.split(b"\r"):
        for m in RECORD_LINE.finditer(piece):
            for colon, iteration, segment in _segments(m, m.group(4)):
                family = FAMILY_OF_FORMAT[fmt] if fmt != "auto" else family_of_record(segment, bool(colon))
                raw = _parse_values(family, segment, iteration, 1) if family is not None else None
                if raw is not None:
                    out.append(_record(raw))
    return out


@dataclass
class LogScan:
    """What a streaming pass learned besides the records: markers, header hints, counters."""

    path: Path
    requested_format: str
    family: LineFamily | None = None
    markers: set[str] = field(default_factory=set)
    hints: dict[str, int] = field(default_factory=dict)  # from Megatron-LM's argument dump
    lines: int = 0
    bytes_read: int = 0
    head: bytes = b""  # the first 64 KiB, to tell binary data from text when no step is found
    dropped_long_lines: int = 0

    @property
    def format(self) -> str:
        """The format name to report: the requested one, or what auto-detection found."""
        if self.requested_format != "auto":
            return self.requested_format
        if self.family is None:
            return "unknown"
        if self.family is NEMO_FAMILY:
            return "ours" if "ours" in self.markers else "nemo"
        if self.family is MEGATRON_FAMILY:
            if "mindspeed" in self.markers:
                return "mindspeed"
            return "bridge" if "bridge" in self.markers else "megatron"
        return self.family.name

    @property
    def looks_binary(self) -> bool:
        """NUL bytes, or over 5% of the text not UTF-8: logs have a few bad bytes at most."""
        if not self.head:
            return False
        text = self.head.decode("utf-8", errors="replace")
        return b"\x00" in self.head or text.count("\ufffd") > 0.05 * len(text)


def _note_header_line(scan: LogScan, line: bytes) -> None:
    """Markers and hints printed before the first step line (cheap: header lines only)."""
    if OURS_LOG_MARKER.encode() in line:
        scan.markers.add("ours")
    low = line.lower()
    if b"megatron.bridge" in low or b"megatron-bridge" in low or b"megatron bridge" in low:
        scan.markers.add("bridge")
    if b"mindspeed" in low or b"modellink" in low or b"ascendspeed" in low:
        scan.markers.add("mindspeed")
    m = ARG_DUMP.match(line)
    if m:
        scan.hints[m.group(1).decode()] = int(m.group(2))


def _iter_blocks(scan: LogScan, progress: Callable[[int], None] | None) -> Iterator[bytes]:
    """The log in blocks of whole lines (a block ends where a line ends): memory is one block."""
    with open(scan.path, "rb") as f:
        carry = b""
        while True:
            block = f.read(BLOCK_BYTES)
            if not block:
                break
            if scan.bytes_read == 0:
                scan.head = block[:65536]
            scan.bytes_read += len(block)
            if progress is not None:
                progress(len(block))
            cut = block.rfind(b"\n") + 1
            if cut:
                yield carry + block[:cut]
                carry = block[cut:]
            else:
                carry += block
            if len(carry) > MAX_LINE_BYTES:  # no step line is that long: binary data
                scan.dropped_long_lines += 1
                carry = b""
        if carry:
            yield carry


def _note_header(scan: LogScan, text: bytes) -> None:
    for line in text.replace(b"\r", b"\n").split(b"\n"):
        _note_header_line(scan, line)


def iter_records(
    path: str | Path, fmt: str = "auto", progress: Callable[[int], None] | None = None
) -> tuple[LogScan, Iterator[StepRecord]]:
    """Stream the step records of a log. Returns the scan (filled while iterating) and the records.

    `fmt` is one of FORMATS or "auto": auto takes the family of the first step line it meets
    (and the markers printed before it) and keeps it for the whole log.
    """
    scan, batches = iter_raw_records(path, fmt, progress)
    return scan, (_record(r) for batch in batches for r in batch.records())


def iter_raw_records(
    path: str | Path, fmt: str = "auto", progress: Callable[[int], None] | None = None
) -> tuple[LogScan, Iterator[Batch]]:
    """iter_records for the hot path: one Batch of raw records per block read."""
    if fmt != "auto" and fmt not in FAMILY_OF_FORMAT:
        raise UserError(f"unknown log format '{fmt}': choose auto or one of {', '.join(FORMATS)}")
    scan = LogScan(Path(path), fmt)
    if fmt != "auto":
        scan.family = FAMILY_OF_FORMAT[fmt]
    return scan, _records(scan, progress)


def _segments(m: re.Match[bytes], rest: bytes) -> list[tuple[bytes, bytes, bytes]]:
    """(colon, iteration, fields) of each record on the matched line: usually one; more when
    records were glued together on one line (cut at each further `iteration N/M`)."""
    colon, iteration = m.group(1), m.group(2)
    subs = list(RECORD_START.finditer(rest)) if b"iteration" in rest else ()
    if not subs:
        return [(colon, iteration, rest)]
    out = [(colon, iteration, rest[:subs[0].start()])]
    for i, sub in enumerate(subs):
        end = subs[i + 1].start() if i + 1 < len(subs) else len(rest)
        out.append((sub.group(1), sub.group(2), rest[sub.end():end]))
    return out


def _detect(scan: LogScan, colon: bytes, segment: bytes) -> LineFamily | None:
    """auto: the first step line decides the family (and the markers it carries) for the whole log."""
    family = family_of_record(segment, bool(colon))
    if family is None:
        return None
    scan.family = family
    if b"gloabl" in segment:
        scan.markers.add("mindspeed")
    if family is NEMO_FAMILY and (b"| tflops_per_gpu:" in segment or b"| mfu:" in segment):
        scan.markers.add("ours")  # fields our trainer adds after NeMo's
    return family


def _parse_with_layouts(family: LineFamily, layouts: list[Layout], rest: bytes, iteration: bytes,
                        line_no: int) -> RawRecord | None:
    """The record through a learned layout if one fits exactly, else by key (then its layout is
    learned, up to MAX_LAYOUTS)."""
    for layout in layouts:
        fm = layout.fullmatch(rest)
        if fm is None:
            continue
        numbers = list(map(parse_number, fm.groups()))
        if None in numbers:
            break
        for i, scale in layout.scaled:
            numbers[i] *= scale
        step = ABSENT if layout.step_pos is None else numbers[layout.step_pos]
        numbers.append(ABSENT)
        step = int(round(step)) if math.isfinite(step) else int(iteration)
        return step, line_no, list(layout.getter(numbers))
    record = _parse_values(family, rest, iteration, line_no)
    if record is None or len(layouts) >= MAX_LAYOUTS or any(lay.fullmatch(rest) for lay in layouts):
        return record
    layout = learn_layout(family, rest)
    if layout is not None:
        layouts.append(layout)
    return record


@dataclass
class Batch:
    """The records of one block, column-wise (numpy): steps, line numbers, values row by row."""

    steps: np.ndarray  # int64 (N,)
    line_nos: np.ndarray  # int64 (N,)
    values: np.ndarray  # float64 (N, len(VALUE_FIELDS)); NaN where absent or printed `nan`
    absent: np.ndarray  # bool, broadcastable to values: True where the line did not print the field

    @classmethod
    def from_rows(cls, steps: list[int], line_nos: list[int], flat_values: list[float]) -> Batch:
        """From row-major Python values in which ABSENT marks a field the line did not print."""
        width = len(VALUE_FIELDS)
        absent = np.fromiter((v is ABSENT for v in flat_values), bool, len(flat_values)).reshape(-1, width)
        return cls(np.array(steps, np.int64), np.array(line_nos, np.int64),
                   np.array(flat_values, np.float64).reshape(-1, width), absent)

    def __len__(self) -> int:
        return len(self.steps)

    def records(self) -> Iterator[RawRecord]:
        absent = np.broadcast_to(self.absent, self.values.shape).tolist()
        for step, line_no, row, gone in zip(self.steps.tolist(), self.line_nos.tolist(), self.values.tolist(), absent):
            yield step, line_no, [ABSENT if g else v for v, g in zip(row, gone)]


def _concat(batches: list[Batch]) -> Batch:
    if len(batches) == 1:
        return batches[0]
    width = len(VALUE_FIELDS)
    return Batch(np.concatenate([b.steps for b in batches]), np.concatenate([b.line_nos for b in batches]),
                 np.concatenate([b.values for b in batches]),
                 np.concatenate([np.broadcast_to(b.absent, (len(b), width)) for b in batches]))


@dataclass(frozen=True)
class ColumnScan:
    """A log's main layout as one regex over a whole block, converted column-wise.

    Nearly every step line of a log has the same fields in the same places. One `finditer` per
    block finds them with their values already split into groups, and the values of all of them
    go through a single `map(float, ...)`: the per-line Python work of the general loop is gone,
    which is what makes every-line-a-step logs fast. A step line in any other layout matches the
    pattern's second branch and is parsed by key, in place.
    """

    layout: Layout
    finditer: Callable[[bytes, int], Iterator[re.Match[bytes]]]
    groups: Callable[[re.Match[bytes]], tuple[bytes, ...]]  # iteration, then the layout's values
    last_group: int  # Match.lastindex of a line in the main layout
    value_groups: list[int]  # layout groups that hold a VALUE_FIELDS column (not the step)
    value_columns: list[int]  # ... and those columns
    absent: np.ndarray  # bool (len(VALUE_FIELDS),): columns this layout does not print

    @classmethod
    def of(cls, layout: Layout) -> ColumnScan:
        n = layout.n_groups
        pattern = re.compile(
            rb"iteration:?[ \t]*(\d+)[ \t]*/[ \t]*\d+(?:" + layout.fields + rb"(?=[\r\n]|\Z)|()[^\n\r]*)")
        value_groups = [g for g, c in enumerate(layout.columns) if c != STEP_COLUMN]
        value_columns = [layout.columns[g] for g in value_groups]
        absent = np.ones(len(VALUE_FIELDS), bool)
        absent[value_columns] = False
        return cls(layout, pattern.finditer, methodcaller("group", *range(1, n + 2)), n + 1,
                   value_groups, value_columns, absent)

    def numbers(self, matches: list[re.Match[bytes]]) -> np.ndarray | None:
        """(N, 1 + n_groups) floats: the iteration, then the layout's values, scaled; None when a
        value is not a number (a glued record, say): the general loop takes the block then."""
        try:
            flat = list(map(float, chain.from_iterable(map(self.groups, matches))))
        except ValueError:  # `12.9K` somewhere: parse column by column, the slow way where needed
            flat = []
            for column in zip(*map(self.groups, matches)):
                try:
                    flat.append(list(map(float, column)))
                except ValueError:
                    values = list(map(parse_number, column))
                    if None in values:
                        return None
                    flat.append(values)
            numbers = np.array(flat, np.float64).T
        else:
            numbers = np.array(flat, np.float64).reshape(len(matches), self.last_group)
        for g, scale in self.layout.scaled:
            numbers[:, 1 + g] *= scale
        return numbers

    def block(self, scan: LogScan, layouts: list[Layout], block: bytes, pos: int, first_line: int) -> Batch | None:
        """The records of `block[pos:]` (`first_line`: the line number at the start of `block`),
        or None when a line needs the general loop (records glued on one line, non-numbers)."""
        matches = list(self.finditer(block, pos))
        width = len(VALUE_FIELDS)
        if not matches:
            return Batch(np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros((0, width)), self.absent)
        newlines = np.flatnonzero(np.frombuffer(block, np.uint8) == 10)
        starts = np.fromiter(map(re.Match.start, matches), np.int64, len(matches))
        line_nos = first_line + np.searchsorted(newlines, starts)
        in_layout = np.fromiter(map(LASTINDEX, matches), np.int64, len(matches)) == self.last_group
        if in_layout.all():
            numbers = self.numbers(matches)
            if numbers is None:
                return None
            return Batch(self._steps(numbers), line_nos, self._values(numbers), self.absent)

        # Some lines in another layout (validation lines, say): those by key, the rest column-wise.
        n = len(matches)
        steps, keep = np.zeros(n, np.int64), np.ones(n, bool)
        values, absent = np.full((n, width), np.nan), np.zeros((n, width), bool)
        main = np.flatnonzero(in_layout)
        if len(main):
            numbers = self.numbers([matches[i] for i in main])
            if numbers is None:
                return None
            steps[main], values[main], absent[main] = self._steps(numbers), self._values(numbers), self.absent
        for i in np.flatnonzero(~in_layout).tolist():
            m = RECORD_LINE.match(block, matches[i].start())
            rest = m.group(4)
            if b"iteration" in rest and RECORD_START.search(rest):
                return None  # records glued on one line
            record = _parse_with_layouts(scan.family, layouts, rest, m.group(2), int(line_nos[i]))
            if record is None:
                keep[i] = False
                continue
            steps[i] = record[0]
            values[i] = record[2]
            absent[i] = [v is ABSENT for v in record[2]]
        return Batch(steps[keep], line_nos[keep], values[keep], absent[keep])

    def _steps(self, numbers: np.ndarray) -> np.ndarray:
        iteration = numbers[:, 0]
        if self.layout.step_pos is None:
            return iteration.astype(np.int64)
        printed = numbers[:, 1 + self.layout.step_pos]
        return np.where(np.isfinite(printed), np.rint(printed), iteration).astype(np.int64)  # `3.1e+4`

    def _values(self, numbers: np.ndarray) -> np.ndarray:
        values = np.full((len(numbers), len(VALUE_FIELDS)), np.nan)
        values[:, self.value_columns] = numbers[:, [1 + g for g in self.value_groups]]
        return values


LASTINDEX = attrgetter("lastindex")


def _general_block(scan: LogScan, layouts: list[Layout], block: bytes, pos: int, first_line: int,
                   seen_step: bool, stop_at_layout: bool) -> tuple[Batch, int, bool]:
    """Records of `block[pos:]` one match at a time: the first lines of a log (format detection,
    markers, header hints), and blocks the column path hands back. With `stop_at_layout` it stops
    after the line that taught the first layout. Returns (batch, where it stopped, seen_step)."""
    steps: list[int] = []
    line_nos: list[int] = []
    flat: list[float] = []
    line_no, counted_to, header_from = first_line + block.count(b"\n", 0, pos), pos, pos
    stop = len(block)

    def add(record: RawRecord) -> None:
        steps.append(record[0])
        line_nos.append(record[1])
        flat.extend(record[2])

    for m in RECORD_LINE.finditer(block, pos):
        start = m.start()
        line_no += block.count(b"\n", counted_to, start)
        counted_to = start
        rest = m.group(4)
        # (Megatron-LM's fields say "iteration" too: only a second `iteration N/M` is a glued record.)
        if seen_step and not (b"iteration" in rest and RECORD_START.search(rest)):
            record = _parse_with_layouts(scan.family, layouts, rest, m.group(2), line_no)
            if record is not None:
                add(record)
        else:
            if not seen_step:
                _note_header(scan, block[header_from:start])
                header_from = m.end()
            for colon, iteration, segment in _segments(m, rest):
                family = scan.family or _detect(scan, colon, segment)
                if family is not None and (record := _parse_values(family, segment, iteration, line_no)) is not None:
                    seen_step = True
                    add(record)
        if stop_at_layout and layouts:
            stop = m.end()
            break
    if not seen_step:
        _note_header(scan, block[header_from:])
    return Batch.from_rows(steps, line_nos, flat), stop, seen_step


def _records(scan: LogScan, progress: Callable[[int], None] | None) -> Iterator[Batch]:
    """Step records, a Batch per block: by the general loop until the log's main layout is
    learned (on its first step lines), then column-wise (`ColumnScan`)."""
    seen_step = False
    layouts: list[Layout] = []
    columns: ColumnScan | None = None
    first_line = 1
    for block in _iter_blocks(scan, progress):
        if b"\x1b" in block:
            block = ANSI_ESCAPE.sub(b"", block)  # colours may sit between key and value
        parts, pos = [], 0
        if columns is None:
            batch, pos, seen_step = _general_block(scan, layouts, block, 0, first_line, seen_step, stop_at_layout=True)
            parts.append(batch)
            if layouts:
                columns = ColumnScan.of(layouts[0])
        if columns is not None and pos < len(block):
            batch = columns.block(scan, layouts, block, pos, first_line)
            if batch is None:
                batch = _general_block(scan, layouts, block, pos, first_line, seen_step, stop_at_layout=False)[0]
            parts.append(batch)
        first_line += block.count(b"\n")
        yield _concat(parts)
    scan.lines = first_line - 1
