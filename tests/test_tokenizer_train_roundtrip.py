"""`tokenizer train`: a Qwen-style tokenizer directory that transformers, preprocess and recipes accept.

Real parts throughout: HF `tokenizers` training on real text (CPython's standard library and
Debian's docs), `transformers.AutoTokenizer`, our preprocess CLI and megatron's index reader.
"""

from __future__ import annotations

import json
import sysconfig
from pathlib import Path

import numpy as np
import pytest
from qwen_pretrain.launch.cli import main
from qwen_pretrain.preprocessing.indexed import read_indexed_dataset
from qwen_pretrain.preprocessing.tokenizer import load_tokenizer
from qwen_pretrain.preprocessing.tokenizer_train import (
    EOD_TOKEN,
    QWEN_RESERVED_TOKENS,
    recipe_with_tokenizer,
    tokenizer_eod_id,
    train_tokenizer,
)
from qwen_pretrain.recipes import check_layout, get_recipe, override
from qwen_pretrain.recipes.errors import UserError

# Texts where tokenizers tend to lose information: unseen scripts, emoji/ZWJ, combining marks
# (not NFC-normalised), whitespace runs, control characters, special tokens inside text.
HARD_TEXTS = [
    "Hello world",
    "",
    "a<|endoftext|>b<|im_end|>c<|im_start|><think>x</think>",
    "你好，世界！今天天气很好。预训练一个大模型。",
    "👨‍👩‍👧‍👦 family, 🏳️‍🌈 flag, 😀😀😀",
    "e\u0301 a\u0308 n\u0303 Z\u0351\u0364a\u0310l\u0346g\u0367o",
    "   leading\n\n\n\ttabs\t\t  and   runs    \r\n\r\n",
    "\x00\x01\x7f control \u200b zero width \ufeff bom",
    "Здравствуй, мир! مرحبا بالعالم नमस्ते दुनिया こんにちは 안녕하세요",
    " " * 300 + "x" + "\n" * 50,
    "<0x41> looks like a byte token, \\u0041 an escape",
]


def _write_corpus(path: Path, max_bytes: int = 400_000) -> Path:
    """English prose and Python code (no CJK: the round trip must cover unseen scripts)."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = sorted((stdlib / "json").glob("*.py")) + sorted((stdlib / "email").glob("*.py"))
    files += sorted(Path("/usr/share/doc").glob("*/copyright"))[:60]
    size = 0
    with open(path, "w") as f:
        for p in files:
            text = p.read_text(errors="replace")
            if "你" in text:
                continue
            f.write(json.dumps({"text": text, "id": p.name}) + "\n")
            size += len(text)
            if size > max_bytes:
                break
    return path


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _write_corpus(tmp_path_factory.mktemp("corpus") / "corpus.jsonl")


@pytest.fixture(scope="module")
def bpe_dir(corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tok") / "bpe"
    assert main(["tokenizer", "train", "--input", str(corpus), "--vocab-size", "1200", "--out", str(out)]) == 0
    return out


def test_bpe_directory_loads_everywhere_and_round_trips(bpe_dir: Path) -> None:
    from transformers import AutoTokenizer

    assert {p.name for p in bpe_dir.iterdir()} == {"tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"}
    hf = AutoTokenizer.from_pretrained(bpe_dir)
    ours = load_tokenizer(bpe_dir)  # what `preprocess --tokenizer DIR` uses
    eod = tokenizer_eod_id(bpe_dir)
    assert hf.eos_token_id == eod == ours.eod_id == hf.convert_tokens_to_ids(EOD_TOKEN)
    assert len(hf) == ours.vocab_size == 1200
    # Qwen's layout: learned vocabulary first, then the reserved tokens in Qwen's order.
    reserved_ids = [hf.convert_tokens_to_ids(t) for t, _ in QWEN_RESERVED_TOKENS]
    assert reserved_ids == list(range(1200 - len(QWEN_RESERVED_TOKENS), 1200))
    for text in HARD_TEXTS:
        ids = hf.encode(text, add_special_tokens=False)
        assert hf.decode(ids, skip_special_tokens=False) == text
        assert ours.encode(text) == ids
        assert ours.decode(ids) == text
    # Special tokens inside text are single ids (as Qwen's tokenizer does), not split.
    assert hf.encode("x<|endoftext|>", add_special_tokens=False)[-1] == eod
    chat = hf.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert chat == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_sentencepiece_kind_round_trips_unseen_scripts_by_byte_fallback(corpus: Path, tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    out = tmp_path / "sp"
    result = train_tokenizer([corpus], out, vocab_size=1000, kind="sentencepiece")
    tok = json.loads((out / "tokenizer.json").read_text())
    assert tok["model"]["byte_fallback"] is True and tok["pre_tokenizer"]["type"] == "Metaspace"
    hf = AutoTokenizer.from_pretrained(out)
    assert hf.eos_token_id == result.eod_id
    for text in HARD_TEXTS:
        ids = hf.encode(text, add_special_tokens=False)
        assert hf.decode(ids, skip_special_tokens=False) == text, text
    # Chinese is absent from the corpus: it must come out as byte tokens, not <unk>.
    pieces = hf.convert_ids_to_tokens(hf.encode("你", add_special_tokens=False))
    assert pieces == ["<0xE4>", "<0xBD>", "<0xA0>"]


def test_preprocess_with_trained_tokenizer_writes_its_eod(bpe_dir: Path, corpus: Path, tmp_path: Path) -> None:
    prefix = tmp_path / "data"
    assert main(["preprocess", "--input", str(corpus), "--output-prefix", str(prefix), "--tokenizer", str(bpe_dir),
                 "--workers", "1", "--no-progress"]) == 0
    ds = read_indexed_dataset(f"{prefix}_text_document")
    assert ds.dtype == np.uint16  # a 1,200-token vocabulary fits Megatron's uint16
    eod = tokenizer_eod_id(bpe_dir)
    tok = load_tokenizer(bpe_dir)
    texts = [json.loads(line)["text"] for line in corpus.read_text().splitlines()]
    assert ds.documents == len(texts)
    for i in (0, len(texts) - 1):
        doc = ds.document(i)
        assert int(doc[-1]) == eod and eod not in doc[:-1].tolist()
        assert tok.decode(doc[:-1]) == texts[i]


def test_recipe_takes_the_trained_vocabulary(bpe_dir: Path) -> None:
    recipe = recipe_with_tokenizer(get_recipe("qwen3_tiny"), bpe_dir)
    assert recipe.model.vocab_size == 1280  # 1,200 rounded up to Megatron's multiple of 128
    assert recipe.model.padded_vocab_size(tp=2) == 1280
    assert recipe.data.eod_token_id == tokenizer_eod_id(bpe_dir) and recipe.data.tokenizer == str(bpe_dir)
    check_layout(recipe)
    check_layout(override(recipe, tp=1, gpus=1))


def test_bad_tokenizer_input_gives_one_line_errors(corpus: Path, tmp_path: Path, capsys: pytest.CaptureFixture,
                                                   no_eod_tokenizer: Path) -> None:
    no_eod = no_eod_tokenizer
    with pytest.raises(UserError, match=r"no_eod/tokenizer.json: no end-of-document token <\|endoftext\|>"):
        tokenizer_eod_id(no_eod)
    with pytest.raises(UserError, match="no end-of-document"):
        recipe_with_tokenizer(get_recipe("qwen3_tiny"), no_eod)
    assert main(["tokenizer", "train", "--input", str(corpus), "--vocab-size", "100", "--out", str(tmp_path / "t")]) == 2
    assert main(["tokenizer", "train", "--input", str(corpus), "--json-keys", "nope", "--vocab-size", "600",
                 "--out", str(tmp_path / "t")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "--vocab-size 100" in err[0] and "no text found under --json-keys nope" in err[1]
    assert not (tmp_path / "t").exists()
