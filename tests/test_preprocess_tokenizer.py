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


def line_cut_texts() -> list[str]:
    """Real files, and line starts next to what could join across them: combining marks, special
    tokens, contractions, CRLF, digits, whitespace runs."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    texts = [p.read_text(errors="replace") for p in sorted((stdlib / "email").glob("*.py"))]
    texts += [p.read_text(errors="replace") for p in sorted(Path("/usr/share/doc").glob("*/copyright"))[:20]]
    texts += [
        "end<|endoftext|>\nAfter<|im_end|>\r\nNext\n\n\nSpaced   \n  Indented\nA\u0301 composed\ne\u0301\nB",
        "x\n's\n'S\nThey'll\n1st\n\t\nTab\n \nSpace\n\u00a0\nNbsp\n\u3000\nIdeographic\n中文\nZh",
        "\n\n\nA" * 50 + "mark\n\u0301\nZ\u0323\u0301\n" + "\u07eb\u07f3\u07fd\nN'Ko\n",
        "def f():\n    return 1\n\n  \n    x = (1,\n\t\t2)\n  \t# c\n    \n}\n)\n'q'\n  's\n \n\n \r\n  <|endoftext|>\n",
        "  \n\n   \n\t\n   y\n\u00a0 z\n \u2028 w\n\x0c v\n\x1c u\n\x85 t\n  \u0301s\n  'll\n  1\n  !!\n",
    ]
    return texts


@pytest.mark.parametrize("backend", ["gigatoken", "tokenizers"])
def test_texts_cut_at_line_starts_keep_their_ids(backend: str, hf: tokenizers.Tokenizer) -> None:
    """The cut the reference routing relies on: a text's ids are its lines' ids put together."""
    texts = line_cut_texts()
    cuts = [qtok.line_cuts(t) for t in texts]
    assert all("".join(parts) == t for parts, t in zip(cuts, texts, strict=True))
    assert sum(len(parts) for parts in cuts) > 20 * len(texts)
    if backend == "tokenizers":
        whole = [e.ids for e in hf.encode_batch(texts, add_special_tokens=False)]
        by_part = [e.ids for e in hf.encode_batch([p for parts in cuts for p in parts], add_special_tokens=False)]
    else:
        tok = load_tokenizer("qwen", backend="gigatoken")
        safe = [i for i, t in enumerate(texts) if not qtok.needs_reference(t)]  # gigatoken's own domain
        texts, cuts = [texts[i] for i in safe], [cuts[i] for i in safe]
        whole = tok._impl.encode_batch_list(texts, parallel=False)
        by_part = tok._impl.encode_batch_list([p for parts in cuts for p in parts], parallel=False)
    joined, pieces = [], iter(by_part)
    for parts in cuts:
        joined.append([i for _ in parts for i in next(pieces)])
    assert joined == whole


def test_only_the_lines_that_need_it_go_to_the_reference(hf: tokenizers.Tokenizer) -> None:
    code = (Path(sysconfig.get_paths()["stdlib"]) / "json" / "encoder.py").read_text()
    doc = code + "\nnko = '\u07eb\u07f3\u07fd'\ngaray = '\U00010d70'\n" + code
    runs = qtok._route_lines(doc)
    assert [ref for _, ref in runs] == [False, True, False]
    assert sum(len(t) for t, ref in runs if ref) < 200  # a few lines, not the whole document
    tok = load_tokenizer("qwen", backend="gigatoken")
    flat, lengths, routed = tok.encode_batch_routed([doc, "plain", doc.replace("\u07fd", "")])
    assert routed == 2
    pieces = np.split(flat, np.cumsum(lengths)[:-1])
    expected = hf.encode_batch([doc, "plain", doc.replace("\u07fd", "")], add_special_tokens=False)
    assert [p.tolist() for p in pieces] == [e.ids for e in expected]


# What could join across a line start or set the two libraries apart: line feeds, spaces, tabs,
# CR, other whitespace, combining marks (U+07F3 U+07FD among them), Hangul jamo, special tokens,
# characters NFC changes (Kelvin sign, Greek question mark, > + U+0338), a code point Python 3.11
# does not know (U+10D70), contractions, digits, CJK, emoji with ZWJ.
FUZZ_PIECES = (
    "\n", "\n", "\n", " ", " ", "  ", "\t", "\r", "\r\n", "a", "Z", "x", "1", "42", "'", "'s", "'ll", "(", ")",
    "#", "!", "-", "\u0301", "\u0323", "\u07f3", "\u07fd", "中", "文", "\u3000", "\u00a0", "\u2028", "\u0085",
    "\x0c", "\x0b", "\x1c", "<|endoftext|>", "<|im_end|>", "<think>", "🙂", "\u200d", "é", "e\u0301", "K",
    "\u212a", "\u037e", ">", "\u0338", "=", "<", "\U00010d70", "\uac00", "\u1100", "\u1161", "\u11a8",
)


def test_random_texts_cut_and_routed_keep_hugging_face_ids(hf: tokenizers.Tokenizer) -> None:
    import random

    rng = random.Random(18)
    texts = ["".join(rng.choice(FUZZ_PIECES) for _ in range(rng.randint(1, 60))) for _ in range(5000)]
    expected = [e.ids for e in hf.encode_batch(texts, add_special_tokens=False)]
    cuts = [qtok.line_cuts(t) for t in texts]
    by_part = iter(hf.encode_batch([p for parts in cuts for p in parts], add_special_tokens=False))
    assert [[i for _ in parts for i in next(by_part).ids] for parts in cuts] == expected
    assert sum(len(parts) - 1 for parts in cuts) > 4000
    tok = load_tokenizer("qwen", backend="gigatoken")
    flat, lengths, routed = tok.encode_batch_routed(texts, parallel=False)
    assert 0 < routed < len(texts)
    assert [p.tolist() for p in np.split(flat, np.cumsum(lengths)[:-1])] == expected
