"""preprocess(): exact ids (HF tokenizers + EOD) from every input format, order, limits, errors.

Real text from the machine: CPython's standard library sources and /usr/share/doc files.
"""

from __future__ import annotations

import gzip
import json
import sysconfig
from pathlib import Path

import numpy as np
import pytest
import tokenizers
import zstandard
from qwen_pretrain.preprocessing.indexed import read_indexed_dataset
from qwen_pretrain.preprocessing.pipeline import preprocess
from qwen_pretrain.recipes.errors import UserError

EOD = 151643
STDLIB = Path(sysconfig.get_paths()["stdlib"])


def real_documents() -> list[str]:
    """English, Chinese, code, emoji, whitespace runs, an empty and a >1 MB document, real files."""
    docs = [
        "Pretraining data is tokenized once and read many times.",
        "大规模预训练需要高质量的中文语料。千问分词器的词表包含十五万个词元，支持多种语言。",
        (STDLIB / "heapq.py").read_text(),
        "🚀🔥 emoji 🧑🏽‍🔬 and flags 🇨🇭🇨🇳 👩‍❤️‍💋‍👨",
        "\n\n\n    \t\t\t     " + " " * 100 + "end",
        "",
        "text with <|endoftext|> inside and <|im_end|> too",
        ((STDLIB / "argparse.py").read_text() + "中文 ") * 11,
    ]
    assert len(docs[-1].encode()) > 1_000_000
    docs += [p.read_text(errors="replace") for p in sorted((STDLIB / "json").glob("*.py"))]
    docs += [p.read_text(errors="replace") for p in sorted(Path("/usr/share/doc").glob("*/copyright"))[:40]]
    return docs


def write_jsonl(path: Path, docs: list[str], key: str = "text") -> Path:
    with open(path, "w") as f:
        for i, d in enumerate(docs):
            f.write(json.dumps({"id": i, key: d}, ensure_ascii=i % 2 == 0) + "\n")
    return path


@pytest.fixture(scope="module")
def docs() -> list[str]:
    return real_documents()


@pytest.fixture(scope="module")
def expected(docs: list[str], qwen_tokenizer_dir: Path) -> list[list[int]]:
    hf = tokenizers.Tokenizer.from_file(str(qwen_tokenizer_dir / "tokenizer.json"))
    return [e.ids + [EOD] for e in hf.encode_batch(docs, add_special_tokens=False)]


def read_docs(prefix: str) -> list[list[int]]:
    info = read_indexed_dataset(prefix)
    return [info.document(i).tolist() for i in range(info.documents)]


def test_ids_are_hf_tokenizers_plus_eod_with_two_workers(tmp_path, docs, expected):
    src = write_jsonl(tmp_path / "corpus.jsonl", docs)
    assert src.stat().st_size > 1_500_000  # two tasks of >= 1 MB: each worker gets a part
    result = preprocess([src], tmp_path / "out" / "c", workers=2, progress=False)
    assert result.workers == 2
    assert result.documents == len(docs) and result.bad_records == 0
    assert result.tokens == sum(map(len, expected))
    (ds,) = result.datasets
    assert ds.prefix == str(tmp_path / "out" / "c_text_document")
    assert read_docs(ds.prefix) == expected
    assert read_indexed_dataset(ds.prefix).dtype == np.int32


def test_tasks_split_mid_file_keep_order_and_line_numbers(tmp_path, docs, expected):
    src = write_jsonl(tmp_path / "corpus.jsonl", docs)
    lines = src.read_bytes().splitlines(keepends=True)
    lines.insert(5, b'{"text": broken\n')
    src.write_bytes(b"".join(lines))
    from qwen_pretrain.preprocessing import pipeline, readers

    plan = readers.plan_tasks
    try:  # 64 KB tasks: dozens of byte ranges, lines straddling every boundary
        pipeline.readers.plan_tasks = lambda files, task_bytes: plan(files, 1 << 16)
        result = preprocess([src], tmp_path / "o", workers=1, progress=False)
    finally:
        pipeline.readers.plan_tasks = plan
    assert read_docs(result.datasets[0].prefix) == expected
    assert result.bad_records == 1
    assert result.bad_examples[0].startswith(f"{src}:6: invalid JSON")


@pytest.mark.parametrize("fmt", ["gz", "zst", "parquet", "dir", "glob"])
def test_every_input_format_gives_the_same_ids(tmp_path, docs, expected, fmt):
    half = len(docs) // 2
    parts = [docs[:half], docs[half:]]
    (tmp_path / "in").mkdir()
    inputs: list[str]
    if fmt == "gz":
        for i, part in enumerate(parts):
            with gzip.open(tmp_path / "in" / f"{i}.jsonl.gz", "wt") as f:
                f.writelines(json.dumps({"text": d}) + "\n" for d in part)
        inputs = [str(tmp_path / "in" / f"{i}.jsonl.gz") for i in range(2)]
    elif fmt == "zst":
        for i, part in enumerate(parts):
            data = "".join(json.dumps({"text": d}) + "\n" for d in part).encode()
            (tmp_path / "in" / f"{i}.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(data))
        inputs = [str(tmp_path / "in" / f"{i}.jsonl.zst") for i in range(2)]
    elif fmt == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        for i, part in enumerate(parts):
            pq.write_table(pa.table({"text": part, "n": list(range(len(part)))}),
                           tmp_path / "in" / f"{i}.parquet", row_group_size=7)
        inputs = [str(tmp_path / "in" / f"{i}.parquet") for i in range(2)]
    else:
        (tmp_path / "in" / "sub").mkdir()
        write_jsonl(tmp_path / "in" / "a.jsonl", parts[0])
        write_jsonl(tmp_path / "in" / "sub" / "b.jsonl", parts[1])
        (tmp_path / "in" / "notes.txt").write_text("ignored: not a corpus file")
        inputs = [str(tmp_path / "in")] if fmt == "dir" else [str(tmp_path / "in" / "**" / "*.jsonl")]
    result = preprocess(inputs, tmp_path / "out", workers=1, progress=False)
    assert result.files == 2
    assert read_docs(result.datasets[0].prefix) == expected


def test_no_eod_multiple_keys_and_max_tokens(tmp_path, qwen_tokenizer_dir):
    hf = tokenizers.Tokenizer.from_file(str(qwen_tokenizer_dir / "tokenizer.json"))
    rows = [{"title": f"Title {i}", "text": f"Body number {i} " * (i + 1)} for i in range(50)]
    src = tmp_path / "two.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = preprocess(src, tmp_path / "k", json_keys=["text", "title"], append_eod=False, workers=1, progress=False)
    by_key = {d.key: d for d in result.datasets}
    assert read_docs(by_key["title"].prefix) == [hf.encode(r["title"]).ids for r in rows]
    assert read_docs(by_key["text"].prefix) == [hf.encode(r["text"]).ids for r in rows]

    lengths = [len(hf.encode(r["text"]).ids) + 1 for r in rows]
    limit = sum(lengths[:20]) + 3  # document 21 would pass the limit: stop before it
    capped = preprocess(src, tmp_path / "m", max_tokens=limit, workers=1, progress=False)
    assert capped.stopped_at_max_tokens and capped.documents == 20
    assert capped.tokens == sum(lengths[:20]) <= limit


def test_shards_cut_at_document_boundaries(tmp_path, docs, expected):
    src = write_jsonl(tmp_path / "c.jsonl", docs)
    shard = 60_000
    result = preprocess(src, tmp_path / "s", shard_tokens=shard, workers=1, progress=False)
    prefixes = [d.prefix for d in result.datasets]
    assert prefixes[0].endswith("s_0000_text_document") and len(prefixes) >= 3
    assert [d.prefix[-19:-14] for d in result.datasets] == [f"_{i:04d}" for i in range(len(prefixes))]
    got = [doc for p in prefixes for doc in read_docs(p)]
    assert got == expected
    for d in result.datasets[:-1]:  # every closed shard reached the size with its last document
        lengths = read_indexed_dataset(d.prefix).lengths
        assert d.tokens >= shard and d.tokens - int(lengths[-1]) < shard


def test_bad_records_strict_and_atomic_outputs(tmp_path):
    src = tmp_path / "bad.jsonl"
    src.write_text('{"text": "fine"}\n\n[1, 2]\n{"other": "no text"}\n{"text": "also fine"}\n{"text": \n')
    result = preprocess(src, tmp_path / "b", workers=1, progress=False)
    assert result.documents == 2 and result.bad_records == 3
    assert [e.split(": ")[0] for e in result.bad_examples] == [f"{src}:3", f"{src}:4", f"{src}:6"]
    with pytest.raises(UserError, match=rf"^{src}:3: expected a JSON object"):
        preprocess(src, tmp_path / "strict", strict=True, workers=1, progress=False)
    # the strict run failed after writing a document: nothing under a final or temporary name
    assert list(tmp_path.glob("strict*")) == []


def test_input_errors_are_one_line(tmp_path):
    with pytest.raises(UserError, match="no such file"):
        preprocess(tmp_path / "missing.jsonl", tmp_path / "o", progress=False)
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(UserError, match="unsupported file type"):
        preprocess(tmp_path / "x.csv", tmp_path / "o", progress=False)
    (tmp_path / "bad.jsonl.gz").write_bytes(b"not gzip at all")
    with pytest.raises(UserError, match="cannot decompress"):
        preprocess(tmp_path / "bad.jsonl.gz", tmp_path / "o", progress=False)
    (tmp_path / "k.jsonl").write_text('{"body": "x"}\n')
    with pytest.raises(UserError, match="no documents to write"):
        preprocess(tmp_path / "k.jsonl", tmp_path / "o", progress=False)
