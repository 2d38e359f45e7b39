"""Train a tokenizer on your own corpus, in Qwen's style, as a directory every tool here accepts.

    from qwen_pretrain.preprocessing.tokenizer_train import train_tokenizer, recipe_with_tokenizer
    result = train_tokenizer(["corpus.jsonl"], "tok/", vocab_size=8192)          # byte-level BPE
    recipe = recipe_with_tokenizer(get_recipe("qwen3_tiny"), "tok/")             # vocab + EOD from it

Two kinds, both built with Hugging Face `tokenizers` (no extra dependency):

- `bpe` (default), Qwen2/Qwen3's own design: byte-level BPE whose pre-tokenizer is Qwen's split
  regex followed by the byte-to-unicode map, so every UTF-8 string is representable and
  `decode(encode(text)) == text` exactly. Qwen's files also NFC-normalise; we do not, because
  normalisation would change text such as "e" + combining acute on the way back.
- `sentencepiece`, the layout SentencePiece/Llama-style tokenizers have in `tokenizer.json`:
  spaces become U+2581 "▁" (Metaspace, no prefix added), BPE over characters, and characters
  never seen in training fall back to `<0xXX>` byte tokens (`byte_fallback`), so unseen scripts
  still round-trip. As in SentencePiece, a literal "▁" in the input decodes as a space.

Special tokens follow Qwen: the learned vocabulary first, then `<|endoftext|>` (the end-of-
document token, EOD), `<|im_start|>`, `<|im_end|>` and the rest of Qwen's reserved tokens, in
Qwen's order. `--vocab-size` counts everything (learned + reserved); a small corpus may give
fewer learned tokens, and the result reports the real size. The directory holds
`tokenizer.json`, `tokenizer_config.json` (loaded by `transformers.AutoTokenizer` as a plain
fast tokenizer, so the file is used exactly as written) and `special_tokens_map.json`.

A recipe takes the trained vocabulary with `recipe_with_tokenizer`: `model.vocab_size` becomes
the tokenizer's size rounded up to Megatron's multiple (`make_vocab_size_divisible_by`, 128), the
way Qwen's own 151,669 tokens sit in a 151,936-row embedding; megatron-core pads further to a
multiple of 128 x TP (`ModelShape.padded_vocab_size`).
"""

from __future__ import annotations

import dataclasses
import json
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from qwen_pretrain.recipes.errors import UserError
from qwen_pretrain.recipes.files import atomic_dir
from qwen_pretrain.recipes.schema import Recipe

KINDS = ("bpe", "sentencepiece")
EOD_TOKEN = "<|endoftext|>"

# Qwen's reserved tokens, in the order of its tokenizer.json; True = special (skipped when
# decoding with skip_special_tokens), as in Qwen's files.
QWEN_RESERVED_TOKENS: tuple[tuple[str, bool], ...] = (
    (EOD_TOKEN, True), ("<|im_start|>", True), ("<|im_end|>", True),
    ("<|object_ref_start|>", True), ("<|object_ref_end|>", True), ("<|box_start|>", True),
    ("<|box_end|>", True), ("<|quad_start|>", True), ("<|quad_end|>", True),
    ("<|vision_start|>", True), ("<|vision_end|>", True), ("<|vision_pad|>", True),
    ("<|image_pad|>", True), ("<|video_pad|>", True),
    ("<tool_call>", False), ("</tool_call>", False), ("<|fim_prefix|>", False), ("<|fim_middle|>", False),
    ("<|fim_suffix|>", False), ("<|fim_pad|>", False), ("<|repo_name|>", False), ("<|file_sep|>", False),
    ("<tool_response>", False), ("</tool_response>", False), ("<think>", False), ("</think>", False),
)

# Qwen2/Qwen3's pre-tokenizer split (contractions, letters, single digits, punctuation, newlines,
# whitespace), as in their tokenizer.json.
QWEN_SPLIT_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# ChatML, the format Qwen's chat models use (without tools), so chat-formatted SFT data works.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


@dataclass(frozen=True)
class TrainedTokenizer:
    out_dir: Path
    kind: str
    vocab_size: int  # learned + reserved tokens (the tokenizer's real size)
    requested_vocab_size: int
    eod_id: int
    documents: int
    bad_records: int
    input_bytes: int


def iter_texts(inputs: list[str | Path], json_keys: tuple[str, ...] = ("text",), stats: dict | None = None) -> Iterator[str]:
    """Texts of every record of jsonl / jsonl.gz / jsonl.zst / parquet inputs (preprocess's readers)."""
    from qwen_pretrain.preprocessing.readers import expand_inputs, parse_task, plan_tasks

    stats = {} if stats is None else stats
    stats.setdefault("documents", 0)
    stats.setdefault("bad", 0)
    stats.setdefault("bytes", 0)
    for task in plan_tasks(expand_inputs(list(inputs))):
        parsed = parse_task(task, tuple(json_keys))
        stats["bad"] += len(parsed.bad)
        for key in json_keys:
            for text in parsed.texts[key]:
                stats["documents"] += 1
                stats["bytes"] += len(text)
                yield text


def _bpe_pipeline(vocab_size: int, min_frequency: int):  # -> (Tokenizer, trainer)
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(ignore_merges=False))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_SPLIT_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes: nothing is unknown
        show_progress=False,
    )
    return tok, trainer


def _sentencepiece_pipeline(vocab_size: int, min_frequency: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(byte_fallback=True, fuse_unk=False))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never", split=True)
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    # 256 rows are kept for the byte-fallback tokens added after training.
    trainer = trainers.BpeTrainer(vocab_size=max(vocab_size - 256, 1), min_frequency=min_frequency, show_progress=False)
    return tok, trainer


def _add_byte_fallback_tokens(tok_json: dict) -> None:
    """Append `<0x00>`..`<0xFF>` to the BPE vocabulary (byte_fallback looks them up by name)."""
    vocab = tok_json["model"]["vocab"]
    next_id = max(vocab.values()) + 1
    for b in range(256):
        name = f"<0x{b:02X}>"
        if name not in vocab:
            vocab[name] = next_id
            next_id += 1


def train_tokenizer(
    inputs: list[str | Path],
    out_dir: str | Path,
    *,
    vocab_size: int,
    json_keys: tuple[str, ...] = ("text",),
    kind: str = "bpe",
    min_frequency: int = 2,
) -> TrainedTokenizer:
    """Train on the inputs' texts and write the tokenizer directory atomically (temp dir, rename)."""
    from tokenizers import AddedToken, Tokenizer

    if kind not in KINDS:
        raise UserError(f"--kind {kind}: unknown; use one of {', '.join(KINDS)}")
    floor = 256 + len(QWEN_RESERVED_TOKENS) + (256 if kind == "sentencepiece" else 0)
    if vocab_size <= floor:
        raise UserError(f"--vocab-size {vocab_size}: too small for {kind}; give more than {floor} "
                        "(256 bytes + the reserved tokens" + (" + 256 byte-fallback tokens)" if kind == "sentencepiece" else ")"))
    learned = vocab_size - len(QWEN_RESERVED_TOKENS)
    tok, trainer = (_bpe_pipeline if kind == "bpe" else _sentencepiece_pipeline)(learned, min_frequency)
    stats: dict = {}
    tok.train_from_iterator(iter_texts(inputs, json_keys, stats), trainer=trainer)
    if stats["documents"] == 0:
        raise UserError(f"--input {' '.join(map(str, inputs))}: no text found under --json-keys {' '.join(json_keys)}")
    if kind == "sentencepiece":
        data = json.loads(tok.to_str())
        _add_byte_fallback_tokens(data)
        tok = Tokenizer.from_str(json.dumps(data))
    # Reserved tokens after the learned vocabulary, as in Qwen's files.
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t, s in QWEN_RESERVED_TOKENS if s])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t, s in QWEN_RESERVED_TOKENS if not s])
    eod_id = tok.token_to_id(EOD_TOKEN)
    out_dir = Path(out_dir)
    _write_dir(tok, out_dir)
    return TrainedTokenizer(
        out_dir=out_dir, kind=kind, vocab_size=tok.get_vocab_size(with_added_tokens=True),
        requested_vocab_size=vocab_size, eod_id=eod_id, documents=stats["documents"],
        bad_records=stats["bad"], input_bytes=stats["bytes"],
    )


def _write_dir(tok, out_dir: Path) -> None:
    config = {
        # The generic fast tokenizer loads tokenizer.json as written (a model-specific class may
        # rebuild the pipeline, e.g. add Qwen's NFC normaliser).
        "tokenizer_class": "PreTrainedTokenizerFast",
        "eos_token": EOD_TOKEN,
        "pad_token": EOD_TOKEN,
        "bos_token": None,
        "unk_token": None,
        "add_bos_token": False,
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,
        "split_special_tokens": False,
        "model_max_length": 131072,
        "additional_special_tokens": [t for t, s in QWEN_RESERVED_TOKENS[1:] if s],
        "chat_template": CHAT_TEMPLATE,
    }
    special_map = {k: config[k] for k in ("eos_token", "pad_token", "additional_special_tokens")}
    with atomic_dir(out_dir, replace=True) as tmp:
        tok.save(str(tmp / "tokenizer.json"))
        (tmp / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
        (tmp / "special_tokens_map.json").write_text(json.dumps(special_map, indent=2) + "\n")


def tokenizer_eod_id(tokenizer_dir: str | Path) -> int:
    """The `<|endoftext|>` id of a tokenizer directory; a one-line error naming the file if absent."""
    path = Path(tokenizer_dir)
    path = path / "tokenizer.json" if path.is_dir() else path
    if not path.is_file():
        raise UserError(f"{path}: not found; pass a tokenizer directory holding tokenizer.json "
                        "(train one with `qwen-pretrain tokenizer train`)")
    from tokenizers import Tokenizer

    found = Tokenizer.from_file(str(path)).token_to_id(EOD_TOKEN)
    if found is None:
        raise UserError(f"{path}: no end-of-document token {EOD_TOKEN}; retrain with `qwen-pretrain tokenizer train` "
                        f"(it reserves {EOD_TOKEN}) or add it as a special token")
    return int(found)


def tokenizer_vocab_size(tokenizer_dir: str | Path) -> int:
    """Rows a model needs for this tokenizer: its largest id + 1 (added tokens included)."""
    from tokenizers import Tokenizer

    path = Path(tokenizer_dir)
    tok = Tokenizer.from_file(str(path / "tokenizer.json" if path.is_dir() else path))
    return max(tok.get_vocab(with_added_tokens=True).values()) + 1


def recipe_with_tokenizer(recipe: Recipe, tokenizer_dir: str | Path) -> Recipe:
    """`recipe` with a trained tokenizer: data.tokenizer / eod_token_id and model.vocab_size.

    vocab_size = the tokenizer's size rounded up to `make_vocab_size_divisible_by` (Megatron's
    rule at TP=1; megatron-core pads to that multiple x TP itself).
    """
    eod = tokenizer_eod_id(tokenizer_dir)
    multiple = recipe.model.make_vocab_size_divisible_by
    padded = -(-tokenizer_vocab_size(tokenizer_dir) // multiple) * multiple
    model = dataclasses.replace(recipe.model, vocab_size=padded)
    data = dataclasses.replace(recipe.data, tokenizer=str(Path(tokenizer_dir)), eod_token_id=eod)
    return dataclasses.replace(recipe, model=model, data=data)


def print_result(result: TrainedTokenizer, file=sys.stdout) -> None:
    print(f"trained     {result.kind} tokenizer on {result.documents:,} document(s), "
          f"{result.input_bytes / 1e6:,.2f} M characters ({result.bad_records} bad record(s) skipped)", file=file)
    print(f"vocabulary  {result.vocab_size:,} tokens (asked {result.requested_vocab_size:,}); "
          f"{EOD_TOKEN} = {result.eod_id}", file=file)
    print(f"written     {result.out_dir}/tokenizer.json, tokenizer_config.json, special_tokens_map.json", file=file)
