"""The tokenizer loader: official files located, backend chosen, ids exactly Hugging Face's."""

from __future__ import annotations

import hashlib
import sysconfig
from pathlib import Path

import numpy as np
import pytest
import tokenizers
from qwen_pretrain.preprocessing import tokenizer as qtok
from qwen_pretrain.preprocessing.tokenizer import load_tokenizer, resolve_tokenizer_json
from qwen_pretrain.recipes.errors import UserError

OFFICIAL_SHA256 = "aeb13307a71acd8fe81861d94ad54ab689df773318809eed3cbe794b4492dae4"


def cases() -> dict[str, str]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    return {
        "english": "The quick brown fox jumps over the lazy dog. It's 3:45pm; they'll arrive at 10.",
        "chinese": "预训练语料需要清洗、去重和分词。通义千问的词表有十五万个词元。",
        "code": (stdlib / "json" / "decoder.py").read_text(),
        "emoji": "👍🏽 🧑‍💻 🇯🇵 ❤️‍🔥 😀" * 20,
        "whitespace": "a" + " " * 257 + "\n" * 9 + "\t\t \r\n" * 33 + "b   ",
        "empty": "",
        "special_in_text": "end<|endoftext|>start<|im_start|>",
        # found in a real corpus (a regex of Unicode ranges): NFC reorders U+07F3 U+07FD
        "combining_marks": "ranges \u0610-\u061a\u064b-\u065f\u07eb-\u07f3\u07fd\u0816-\u0819 cafe\u0301",
        "long_over_1mb": ((stdlib / "typing.py").read_text() + "混合中文 ") * 12,
    }


@pytest.fixture(scope="module")
def hf(qwen_tokenizer_dir: Path) -> tokenizers.Tokenizer:
    return tokenizers.Tokenizer.from_file(str(qwen_tokenizer_dir / "tokenizer.json"))


def test_official_files_are_located_without_import(qwen_tokenizer_dir: Path) -> None:
    assert qtok.qwen_tokenizer_dir() == qwen_tokenizer_dir
    digest = hashlib.sha256((qwen_tokenizer_dir / "tokenizer.json").read_bytes()).hexdigest()
    assert digest == OFFICIAL_SHA256


def test_auto_picks_gigatoken_and_says_why() -> None:
    tok = load_tokenizer("qwen")
    assert tok.backend == "gigatoken", tok.reason
    assert "probe" in tok.reason
    assert tok.eod_id == 151643
    assert tok.vocab_size == 151669
    assert tok.encode("Hello world") == [9707, 1879]


@pytest.mark.parametrize("backend", ["gigatoken", "tokenizers"])
def test_ids_equal_hugging_face(backend: str, hf: tokenizers.Tokenizer) -> None:
    data = cases()
    assert len(data["long_over_1mb"].encode()) > 1_000_000
    tok = load_tokenizer("qwen", backend=backend)
    flat, lengths = tok.encode_batch(list(data.values()))
    assert flat.dtype == np.int32 and lengths.sum() == len(flat)
    pieces = np.split(flat, np.cumsum(lengths)[:-1])
    for (name, text), ids in zip(data.items(), pieces, strict=True):
        assert ids.tolist() == hf.encode(text, add_special_tokens=False).ids, name
    # bytes in, same ids out (the pipeline hands raw UTF-8 to the tokenizer)
    flat_b, lengths_b = tok.encode_batch([t.encode() for t in data.values()])
    assert np.array_equal(flat_b, flat) and np.array_equal(lengths_b, lengths)


def test_documents_nfc_would_change_go_to_the_reference() -> None:
    tok = load_tokenizer("qwen", backend="gigatoken")
    mixed = ["plain ascii", cases()["combining_marks"], "中文 🙂", "new plane-5 code point \U00050000"]
    assert [qtok.needs_reference(t) for t in mixed] == [False, True, False, True]
    before = tok.reference_documents
    tok.encode_batch(mixed)
    assert tok.reference_documents - before == 2


def test_decode_round_trips() -> None:
    tok = load_tokenizer("qwen")
    text = cases()["chinese"] + cases()["emoji"]
    assert tok.decode(tok.encode(text)) == text


def test_bad_tokenizer_option_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="no tokenizer.json"):
        resolve_tokenizer_json(tmp_path)
    with pytest.raises(UserError, match="unknown"):
        load_tokenizer("qwen", backend="sentencepiece")
