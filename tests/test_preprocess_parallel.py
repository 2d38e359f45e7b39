"""The one-process path (threads + gigatoken's thread pool) against the worker processes: the same
bytes on disk, the same errors, for any number of workers.

Real text from the machine (CPython sources, /usr/share/doc), with documents that take the
reference path (`tokenizers`), a bad line and a blank line; tasks of 64 KB so that many are in
flight at once and lines straddle every task boundary.
"""

from __future__ import annotations

import json
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import tokenizers
from qwen_pretrain.preprocessing import pipeline, readers
from qwen_pretrain.preprocessing.indexed import read_indexed_dataset
from qwen_pretrain.preprocessing.pipeline import preprocess
from qwen_pretrain.recipes.errors import UserError

EOD = 151643
STDLIB = Path(sysconfig.get_paths()["stdlib"])
# NFC reorders U+07F3 U+07FD (gigatoken follows it, tokenizers does not); U+10D70 is a code point
# Python 3.11 does not know: both send their document to the reference
REFERENCE_TEXTS = ["N'Ko \u07eb-\u07f3\u07fd marks", "Garay \U00010d70\U00010d71 letters", "cafe\u0301 decomposed"]


def corpus_records() -> list[dict]:
    texts = [p.read_text(errors="replace") for p in sorted(STDLIB.glob("*.py"))[:60]]
    texts += [p.read_text(errors="replace") for p in sorted(Path("/usr/share/doc").glob("*/copyright"))[:30]]
    texts += ["中文文本，预训练语料。" * 50, "🙂 emoji 🧑🏽‍🔬" * 20, ""]
    for i, extra in enumerate(REFERENCE_TEXTS):  # spread over the corpus, so over several tasks
        texts.insert(20 * i + 5, texts[20 * i + 5] + extra)
    return [{"title": f"document {i}", "text": t} for i, t in enumerate(texts)]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[Path, list[dict]]:
    records = corpus_records()
    lines = [json.dumps(r, ensure_ascii=i % 2 == 0) + "\n" for i, r in enumerate(records)]
    lines.insert(40, '{"text": broken\n')
    lines.insert(70, "\n")
    path = tmp_path_factory.mktemp("parallel") / "corpus.jsonl"
    path.write_text("".join(lines))
    assert path.stat().st_size > 1_000_000
    return path, records


@pytest.fixture
def small_tasks(monkeypatch):
    """64 KB tasks: dozens in flight, lines straddling every boundary."""
    plan = readers.plan_tasks
    monkeypatch.setattr(pipeline.readers, "plan_tasks", lambda files, task_bytes: plan(files, 1 << 16))


def files_of(result) -> dict[str, bytes]:
    return {Path(d.prefix).name + ext: Path(d.prefix + ext).read_bytes() for d in result.datasets for ext in (".bin", ".idx")}


def run(corpus: Path, out: Path, **kwargs):
    return preprocess(corpus, out / "c", json_keys=("text", "title"), progress=False, **kwargs)


def test_threads_and_processes_write_the_same_bytes(tmp_path, corpus, small_tasks, qwen_tokenizer_dir):
    path, records = corpus
    serial = run(path, tmp_path / "serial", workers=1)
    threads = run(path, tmp_path / "threads", workers=2)
    threads3 = run(path, tmp_path / "threads3", workers=3, parallelism="threads")
    processes = run(path, tmp_path / "processes", workers=2, parallelism="processes")
    assert (serial.parallelism, threads.parallelism, threads3.parallelism, processes.parallelism) == (
        "serial", "threads", "threads", "processes")
    assert threads.tokenizer_backend == "gigatoken"
    reference = files_of(serial)
    assert set(reference) == {f"c_{k}_document{e}" for k in ("text", "title") for e in (".bin", ".idx")}
    for result in (threads, threads3, processes):
        assert files_of(result) == reference
        assert (result.documents, result.tokens, result.bad_records, result.bad_examples, result.reference_documents) == (
            serial.documents, serial.tokens, serial.bad_records, serial.bad_examples, serial.reference_documents)
    assert serial.reference_documents == len(REFERENCE_TEXTS)
    assert serial.bad_examples == (f"{path}:41: invalid JSON (Expecting value)",)
    # and the ids are Hugging Face tokenizers' plus the EOD
    hf = tokenizers.Tokenizer.from_file(str(qwen_tokenizer_dir / "tokenizer.json"))
    expected = [e.ids + [EOD] for e in hf.encode_batch([r["text"] for r in records], add_special_tokens=False)]
    info = read_indexed_dataset(tmp_path / "threads" / "c_text_document")
    assert [info.document(i).tolist() for i in range(info.documents)] == expected


def test_threads_stop_cleanly_at_max_tokens_and_on_strict(tmp_path, corpus, small_tasks):
    path, _ = corpus
    limits = {}
    for mode in ("threads", "processes"):
        capped = preprocess(path, tmp_path / mode / "m", workers=2, max_tokens=200_000, parallelism=mode, progress=False)
        assert capped.stopped_at_max_tokens and capped.tokens <= 200_000
        limits[mode] = files_of(capped)
    assert limits["threads"] == limits["processes"]
    with pytest.raises(UserError, match=rf"^{path}:41: invalid JSON"):
        preprocess(path, tmp_path / "strict" / "s", workers=2, strict=True, progress=False)
    assert list((tmp_path / "strict").glob("*")) == []  # nothing under a final or temporary name


def test_bad_parallelism_is_one_line(tmp_path, corpus):
    with pytest.raises(UserError, match="parallelism 'fibers': use one of auto, threads, processes"):
        preprocess(corpus[0], tmp_path / "x", parallelism="fibers", progress=False)


def test_thread_pool_size_follows_workers():
    """gigatoken's pool gets --workers threads at its first use; a fresh process per size."""
    probe = (
        "import os, sys\n"
        "from qwen_pretrain.preprocessing.tokenizer import load_tokenizer, start_thread_pool\n"
        "tok = load_tokenizer('qwen', backend='gigatoken')\n"
        "before = len(os.listdir('/proc/self/task'))\n"
        "start_thread_pool(tok, int(sys.argv[1]))\n"
        "start_thread_pool(tok, 9)  # built once: a second call changes nothing\n"
        "print(len(os.listdir('/proc/self/task')) - before, 'RAYON_NUM_THREADS' in os.environ)\n"
    )
    grown = {}
    for workers in (1, 4):
        out = subprocess.run([sys.executable, "-c", probe, str(workers)], capture_output=True, text=True, check=True)
        threads, leaked = out.stdout.split()
        grown[workers] = int(threads)
        assert leaked == "False"  # the variable is set for the pool's first use only
    assert grown[4] - grown[1] == 3
