"""`preprocess()`: corpora -> Megatron `.bin/.idx`, parallel, streaming, in input order.

The main process plans tasks (pieces of files, see `readers`), keeps a bounded window of them
in flight and takes the results back strictly in order. A task is parsed, tokenized, given its
end-of-document ids and fingerprinted for de-duplication either on threads of this process,
with gigatoken's own thread pool doing the encoding (the default with gigatoken: see
`choose_parallelism`), or in worker processes (`tokenizers`, de-duplication). The main thread
alone decides what is kept (dedup, `max_tokens`), where shards end, and writes. Memory is
bounded by the window (about `2 x workers + 2` tasks of `TASK_BYTES` each), not by the corpus;
the writers keep only 4 bytes per document until they write the index.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import sys
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from qwen_pretrain.preprocessing import readers
from qwen_pretrain.preprocessing.dedup import (
    ExactDeduplicator,
    MinHashLSH,
    MinHashParams,
    exact_fingerprint,
    minhash_signature,
)
from qwen_pretrain.preprocessing.indexed import IndexedDatasetWriter, token_dtype
from qwen_pretrain.preprocessing.tokenizer import Tokenizer, load_tokenizer, start_thread_pool
from qwen_pretrain.recipes.errors import UserError

DEDUP_MODES = ("none", "exact", "minhash")
PARALLELISM = ("auto", "threads", "processes")
MAX_BAD_SHOWN = 5


@dataclass(frozen=True)
class DatasetWritten:
    """One `.bin/.idx` pair: `prefix` is what Megatron's --data-path takes."""

    prefix: str
    key: str
    documents: int
    tokens: int


@dataclass(frozen=True)
class PreprocessResult:
    datasets: tuple[DatasetWritten, ...]
    documents: int  # documents written
    tokens: int  # tokens written, all keys, EOD included
    input_bytes: int  # bytes of records read (uncompressed)
    files: int
    bad_records: int  # skipped (malformed line, missing key) - an error with strict=True
    duplicates: int  # dropped by dedup
    stopped_at_max_tokens: bool
    tokenizer_backend: str
    tokenizer_reason: str
    workers: int
    seconds: float
    reference_documents: int = 0  # documents (x keys) gigatoken handed to `tokenizers`, whole or in part
    bad_examples: tuple[str, ...] = ()
    parallelism: str = "serial"  # "serial", "threads" (one process, gigatoken's pool) or "processes"

    @property
    def mb_per_s(self) -> float:
        return self.input_bytes / 1e6 / max(self.seconds, 1e-9)


@dataclass(frozen=True)
class _Job:
    """What a worker needs besides the task; pickled once into each worker."""

    tokenizer: str
    backend: str
    eod_id: int
    keys: tuple[str, ...]
    append_eod: bool
    dedup: str
    minhash: MinHashParams


@dataclass
class _Encoded:
    ids: dict[str, np.ndarray]  # per key: all documents' ids, EOD appended
    lengths: dict[str, np.ndarray]  # per key: each document's length
    fingerprints: list[int] | np.ndarray | None
    records: int
    bad: list[tuple[int, str]]
    size: int
    reference: int = 0  # documents encoded by `tokenizers` instead of gigatoken
    documents: int = field(init=False)

    def __post_init__(self) -> None:
        self.documents = len(next(iter(self.lengths.values())))


_worker_state: dict[str, object] = {}


def _init_worker(job: _Job, tokenizer: Tokenizer | None = None) -> None:
    _worker_state["job"] = job
    _worker_state["tokenizer"] = tokenizer or load_tokenizer(job.tokenizer, backend=job.backend, eod_id=job.eod_id)
    _worker_state["coefficients"] = job.minhash.coefficients()


def _encode_task(task: readers.Task, parallel: bool | None = None) -> _Encoded:
    """Parse, tokenize (+ EOD) and fingerprint one task: in a worker process, or on a thread."""
    job: _Job = _worker_state["job"]  # type: ignore[assignment]
    tok: Tokenizer = _worker_state["tokenizer"]  # type: ignore[assignment]
    parsed = readers.parse_task(task, job.keys)
    ids, lengths, reference = {}, {}, 0
    for key in job.keys:
        flat, lens, routed = tok.encode_batch_routed(parsed.texts[key], parallel=parallel)
        if job.append_eod:
            flat, lens = _append_eod(flat, lens, job.eod_id)
        ids[key], lengths[key] = flat, lens
        reference += routed
    fingerprints: list[int] | np.ndarray | None = None
    if job.dedup != "none":
        docs = ["\n".join(t) for t in zip(*(parsed.texts[k] for k in job.keys), strict=True)]
        if job.dedup == "exact":
            fingerprints = [exact_fingerprint(d) for d in docs]
        else:
            coeff = _worker_state["coefficients"]
            fingerprints = np.stack([minhash_signature(d, job.minhash, coeff) for d in docs]) if docs else None
    return _Encoded(ids, lengths, fingerprints, parsed.records, parsed.bad, task.size, reference)


def _append_eod(flat: np.ndarray, lengths: np.ndarray, eod_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Insert one EOD after every document (vectorized: one copy of the ids)."""
    out = np.empty(len(flat) + len(lengths), dtype=np.int32)
    ends = np.cumsum(lengths + 1) - 1  # where each document's EOD goes in the output
    mask = np.ones(len(out), dtype=bool)
    mask[ends] = False
    out[mask] = flat
    out[ends] = eod_id
    return out, lengths + 1


def choose_parallelism(parallelism: str, job: _Job, workers: int) -> str:
    """"serial" (one worker), "threads" or "processes" for `parallelism` "auto" or a forced choice.

    "auto" takes threads in this process when gigatoken encodes and nothing is de-duplicated:
    gigatoken releases the GIL while it encodes, on a process-wide thread pool with one cache of
    encoded pieces, so parsing the next tasks (JSON, the routing check) overlaps encoding, the
    cache warms once for all, and no ids are pickled between processes. `tokenizers` (the
    fallback) and de-duplication keep worker processes: their per-document Python work (id
    lists, fingerprints) holds the GIL, so threads would leave cores idle.
    """
    if workers <= 1:
        return "serial"
    if parallelism == "auto":
        return "threads" if job.backend == "gigatoken" and job.dedup == "none" else "processes"
    return parallelism


def _ordered_results(tasks: Iterator[readers.Task], job: _Job, workers: int, mode: str) -> Iterator[_Encoded]:
    """Encoded tasks in input order, at most `2 x workers + 2` in flight (bounded memory)."""
    if mode == "serial":
        for task in tasks:
            yield _encode_task(task, parallel=False)
        return
    if mode == "threads":
        yield from _threaded_results(tasks, workers)
        return
    # fork where the platform has it: workers inherit the loaded, warmed-up tokenizer at no
    # cost. A forked child never uses gigatoken's pool (gigatoken sees the fork and encodes on
    # the calling thread: pool threads are not copied by fork). Elsewhere spawn + initializer.
    if "fork" in mp.get_all_start_methods():
        ctx, init, initargs = mp.get_context("fork"), None, ()
    else:
        ctx, init, initargs = mp.get_context("spawn"), _init_worker, (job,)
    with ctx.Pool(workers, initializer=init, initargs=initargs) as pool:
        window: deque = deque()
        for task in tasks:
            window.append(pool.apply_async(_encode_task, (task,)))
            if len(window) >= 2 * workers + 2:
                yield window.popleft().get()
        while window:
            yield window.popleft().get()
        pool.terminate()


def _threaded_results(tasks: Iterator[readers.Task], workers: int) -> Iterator[_Encoded]:
    """`workers` threads each parse a task and hand its texts to gigatoken's pool (`workers`
    threads): while one thread's texts are encoded, another parses, and the caller writes."""
    threads = ThreadPoolExecutor(workers, thread_name_prefix="preprocess")
    window: deque[Future[_Encoded]] = deque()
    try:
        for task in tasks:
            window.append(threads.submit(_encode_task, task, True))
            if len(window) >= 2 * workers + 2:
                yield window.popleft().result()
        while window:
            yield window.popleft().result()
    finally:  # on an error or --max-tokens: drop what has not started, wait for what has
        threads.shutdown(wait=True, cancel_futures=True)


class _ShardedWriters:
    """One writer per key; with `shard_tokens`, a new `{prefix}_NNNN` shard each time one fills."""

    def __init__(self, output_prefix: str, keys: tuple[str, ...], dtype: type[np.number], shard_tokens: int | None):
        self.output_prefix, self.keys, self.dtype, self.shard_tokens = output_prefix, keys, dtype, shard_tokens
        self.done: list[DatasetWritten] = []
        self.open: dict[str, IndexedDatasetWriter] = {}
        self.shard = 0
        self.shard_filled = 0

    def _prefix(self, key: str) -> str:
        base = f"{self.output_prefix}_{self.shard:04d}" if self.shard_tokens else self.output_prefix
        return f"{base}_{key}_document"

    def write(self, enc: _Encoded, keep: np.ndarray, doc_tokens: np.ndarray) -> None:
        """Write the kept documents of `enc`, cutting shards at document boundaries."""
        starts = {k: np.concatenate([[0], np.cumsum(enc.lengths[k])]) for k in self.keys}
        first = 0
        while first < enc.documents:
            last = enc.documents
            if self.shard_tokens:  # the shard closes after the document that fills it
                filled = self.shard_filled + np.cumsum(np.where(keep[first:], doc_tokens[first:], 0))
                full = np.nonzero(filled >= self.shard_tokens)[0]
                if len(full):
                    last = first + int(full[0]) + 1
            self._write_range(enc, keep, starts, first, last)
            self.shard_filled += int(doc_tokens[first:last][keep[first:last]].sum())
            if self.shard_tokens and self.shard_filled >= self.shard_tokens:
                self.close_shard()
            first = last

    def _write_range(self, enc: _Encoded, keep: np.ndarray, starts: dict, first: int, last: int) -> None:
        part = keep[first:last]
        if not part.any():
            return
        for key in self.keys:
            if key not in self.open:
                self.open[key] = IndexedDatasetWriter(self._prefix(key), self.dtype)
            ids = enc.ids[key][starts[key][first]: starts[key][last]]
            lengths = enc.lengths[key][first:last]
            if not part.all():
                ids = ids[np.repeat(part, lengths)]
                lengths = lengths[part]
            self.open[key].add_documents(ids, lengths)

    def close_shard(self) -> None:
        for key, writer in self.open.items():
            writer.close()
            self.done.append(DatasetWritten(writer.prefix, key, writer.documents, writer.tokens))
        if self.open:
            self.shard += 1
        self.open, self.shard_filled = {}, 0

    def abort(self) -> None:
        for writer in self.open.values():
            writer.abort()
        self.open = {}


def default_workers() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def preprocess(
    inputs: list[str | Path] | str | Path,
    output_prefix: str | Path,
    *,
    json_keys: tuple[str, ...] | list[str] = ("text",),
    tokenizer: str | Path = "qwen",
    backend: str = "auto",
    workers: int | None = None,
    append_eod: bool = True,
    max_tokens: int | None = None,
    shard_tokens: int | None = None,
    dedup: str = "none",
    strict: bool = False,
    progress: bool | None = None,
    log: Callable[[str], None] | None = None,
    parallelism: str = "auto",
) -> PreprocessResult:
    """Tokenize `inputs` into `{output_prefix}[_NNNN]_{key}_document.bin/.idx`.

    `inputs`: files (.jsonl, .jsonl.gz, .jsonl.zst, .parquet), directories or globs.
    `max_tokens`: stop before the first document that would take the total past it (documents
    are never cut). `shard_tokens`: start a new `_NNNN` shard once one holds that many tokens.
    `dedup`: "exact" drops documents whose normalized text was seen; "minhash" near-duplicates.
    `strict`: a malformed record is an error naming file:line instead of being skipped.
    `progress`: None shows a bar on a TTY only. `log` receives one-line notes (default stderr).
    `parallelism`: "auto" (see `choose_parallelism`), "threads" or "processes"; the output is
    the same whichever runs.
    """
    started = time.perf_counter()
    say = log or (lambda msg: print(msg, file=sys.stderr))
    keys = tuple(json_keys)
    if not keys:
        raise UserError("--json-keys: give at least one key")
    if dedup not in DEDUP_MODES:
        raise UserError(f"--dedup {dedup}: use one of {', '.join(DEDUP_MODES)}")
    if parallelism not in PARALLELISM:
        raise UserError(f"parallelism '{parallelism}': use one of {', '.join(PARALLELISM)}")
    for name, value in (("--max-tokens", max_tokens), ("--shard-tokens", shard_tokens)):
        if value is not None and value <= 0:
            raise UserError(f"{name} {value}: must be a positive number of tokens")
    workers = default_workers() if workers is None else workers
    if workers < 1:
        raise UserError(f"--workers {workers}: must be at least 1")
    files = readers.expand_inputs([inputs] if isinstance(inputs, str | Path) else list(inputs))
    tok = load_tokenizer(tokenizer, backend=backend)
    job = _Job(str(tokenizer), tok.backend, tok.eod_id, keys, append_eod, dedup, MinHashParams())
    tok.encode_batch(["warm-up: 预热 🙂"], parallel=False)  # lazy set-up, done once before workers fork
    _init_worker(job, tok)
    deduplicator = ExactDeduplicator() if dedup == "exact" else MinHashLSH(job.minhash) if dedup == "minhash" else None
    out = _ShardedWriters(str(output_prefix), keys, token_dtype(tok.vocab_size), shard_tokens)

    from tqdm import tqdm

    on_disk = sum(f.stat().st_size for f in files)
    total = None if any(f.name.endswith((".gz", ".zst")) for f in files) else on_disk
    # Small inputs: smaller tasks so every worker gets some, and no more workers than tasks.
    task_bytes = int(min(readers.TASK_BYTES, max(1 << 20, on_disk // (4 * workers) + 1)))
    workers = max(1, min(workers, -(-on_disk // task_bytes)))
    mode = choose_parallelism(parallelism, job, workers)
    if mode == "threads":
        start_thread_pool(tok, workers)  # --workers N: N cores, fixed at the pool's first use
    bar = tqdm(total=total, unit="B", unit_scale=True, desc="preprocess", file=sys.stderr,
               disable=(None if progress is None else not progress), mininterval=1.0)
    records_before: dict[str, int] = {}
    bad_records = duplicates = documents = tokens = input_bytes = reference = 0
    bad_examples: list[str] = []
    stopped = False
    tasks = readers.plan_tasks(files, task_bytes)
    current: deque[readers.Task] = deque()

    def remember(task_iter: Iterator[readers.Task]) -> Iterator[readers.Task]:
        for task in task_iter:  # results come back in this same order
            current.append(task)
            yield task

    try:
        for enc in _ordered_results(remember(tasks), job, workers, mode):
            task = current.popleft()
            base = records_before.get(task.path, 0) + (task.first if task.kind != "range" else 0)
            for n, reason in enc.bad:
                where = f"{task.path}:{'row ' if task.kind == 'rowgroup' else ''}{base + n + 1}"
                if strict:
                    raise UserError(f"{where}: {reason}; fix the record or run without --strict to skip it")
                if len(bad_examples) < MAX_BAD_SHOWN:
                    bad_examples.append(f"{where}: {reason}")
            bad_records += len(enc.bad)
            if task.kind == "range":
                records_before[task.path] = records_before.get(task.path, 0) + enc.records
            input_bytes += enc.size
            reference += enc.reference
            bar.update(enc.size)

            keep = np.ones(enc.documents, dtype=bool)
            if deduplicator is not None and enc.fingerprints is not None:
                keep = np.array([not deduplicator.is_duplicate(f) for f in enc.fingerprints], dtype=bool)
                duplicates += int((~keep).sum())
            doc_tokens = sum(enc.lengths[k] for k in keys)
            if max_tokens is not None:
                running = tokens + np.cumsum(np.where(keep, doc_tokens, 0))
                over = np.nonzero(keep & (running > max_tokens))[0]
                if len(over):
                    keep[over[0]:] = False
                    stopped = True
            out.write(enc, keep, doc_tokens)
            documents += int(keep.sum())
            tokens += int(doc_tokens[keep].sum())
            if stopped:
                break
        out.close_shard()
        if not out.done:
            raise UserError(f"{', '.join(map(str, files[:3]))}: no documents to write ({bad_records} bad record(s)); check --json-keys and the input")
    except BaseException:
        out.abort()
        raise
    finally:
        bar.close()
    if bad_records:
        say(f"preprocess: skipped {bad_records} bad record(s), e.g. {bad_examples[0]} (use --strict to stop at the first)")
    return PreprocessResult(
        datasets=tuple(out.done), documents=documents, tokens=tokens, input_bytes=input_bytes, files=len(files),
        bad_records=bad_records, duplicates=duplicates, stopped_at_max_tokens=stopped,
        tokenizer_backend=tok.backend, tokenizer_reason=tok.reason, workers=workers,
        seconds=time.perf_counter() - started, reference_documents=reference, bad_examples=tuple(bad_examples),
        parallelism=mode,
    )
