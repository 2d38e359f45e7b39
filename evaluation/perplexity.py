"""Token-level perplexity of a causal LM on held-out text, by the standard sliding window.

    from qwen_pretrain.evaluation.perplexity import perplexity, load_token_stream, hf_scorer
    ids = load_token_stream("heldout.jsonl", tokenizer="tok/")        # or a .bin/.idx prefix
    result = perplexity(hf_scorer("hf_model/"), ids, seq_length=128, stride=64)

The data becomes one token stream: a jsonl's documents are tokenized and each is followed by
the end-of-document token (as `preprocess` writes them), a `.bin/.idx` prefix is read as it is
(its EOD tokens are already there).

Sliding window (the method of Hugging Face's "Perplexity of fixed-length models" guide and of
lm-eval-harness's rolling log-likelihood), for a stream of N tokens, context L, stride S < L:

    windows start at 0, S, 2S, ...; window k covers tokens [kS, min(kS + L, N));
    in each window only the tokens not scored by an earlier window are scored (the last
    min(L, N - kS) - (L - S) ones, all L - 1 predictable ones in the first window), each
    conditioned on everything before it inside the window; the walk stops at the window
    that reaches the end of the stream.

So every token but the first is scored exactly once (N - 1 in all), each with at least L - S
tokens of context (all preceding tokens in the first window). S must stay below L: with S = L
(disjoint windows) the first token of every window would have no context inside it and go
unscored, the off-by-one the HF guide's loop has. A larger S is faster (one forward pass per S
tokens), a smaller one gives every token more context and approaches the model's perplexity
with unlimited context. Perplexity = exp(sum of token negative log-likelihoods / (N - 1)).

A scorer maps a batch of token ids [B, T] to float32 logits [B, T, V] over the model's real
vocabulary; `hf_scorer` runs `transformers`, `mcore_scorer` a megatron-core GPTModel built by
`training/model.py` from a recipe and loaded from a torch_dist checkpoint, so the same weights
can be checked through both (they agree to ~1e-6 relative in fp32). Both run on the device they
are given (default CPU, on any host; the megatron-core model is always the local layer spec).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from qwen_pretrain.recipes.errors import UserError

TEXT_SUFFIXES = (".jsonl", ".jsonl.gz", ".jsonl.zst", ".json", ".json.gz", ".json.zst", ".parquet")


@dataclass(frozen=True)
class Scorer:
    """A model ready to score: `logits(ids [B, T] int64 tensor) -> [B, T, vocab_size] float32`."""

    name: str  # e.g. "hf:out/hf" or "mcore:out/ckpt/iter_0000040"
    vocab_size: int  # rows of the model's embedding the logits cover
    logits: Callable[[Any], Any]
    tokenizer: str  # tokenizer directory (or "qwen") the model goes with, when known


@dataclass(frozen=True)
class PerplexityResult:
    model: str
    data: str
    tokens: int  # tokens scored (stream length - 1)
    stream_tokens: int
    windows: int
    seq_length: int
    stride: int
    mean_loss: float  # nats per token
    perplexity: float
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def sliding_windows(n_tokens: int, seq_length: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, first scored position) of every window; positions are stream indices."""
    if not 1 <= stride < seq_length:
        raise UserError(f"--stride {stride}: must be at least 1 and below --seq-length ({seq_length}), "
                        "so that every window's first new token has context")
    windows = []
    prev_end = 0
    for begin in range(0, n_tokens, stride):
        end = min(begin + seq_length, n_tokens)
        windows.append((begin, end, max(prev_end, begin + 1)))
        prev_end = end
        if end == n_tokens:
            break
    return windows


def perplexity(
    scorer: Scorer,
    ids: np.ndarray,
    *,
    seq_length: int,
    stride: int | None = None,
    batch_size: int = 4,
    data_name: str = "",
    progress: bool | None = None,
) -> PerplexityResult:
    """Sliding-window perplexity of `scorer` on the token stream `ids` (see the module doc)."""
    import torch
    import torch.nn.functional as F
    from tqdm import tqdm

    stride = max(1, seq_length // 2) if stride is None else stride
    n = len(ids)
    if n < seq_length:
        raise UserError(f"{data_name or 'data'}: {n} tokens, shorter than one window of --seq-length {seq_length}; "
                        "pass a smaller --seq-length or more held-out text")
    top = int(ids.max())
    if top >= scorer.vocab_size:
        raise UserError(f"{data_name or 'data'}: token id {top} but {scorer.name} has only {scorer.vocab_size} "
                        "vocabulary rows: the data was tokenized with another tokenizer; preprocess it with the "
                        "model's tokenizer (--tokenizer)")
    windows = sliding_windows(n, seq_length, stride)
    stream = torch.from_numpy(np.asarray(ids, dtype=np.int64))
    nll = 0.0
    scored = 0
    start = time.perf_counter()
    # Full-length windows are batched; the last (shorter) one runs alone.
    groups: dict[int, list[tuple[int, int, int]]] = {}
    for w in windows:
        groups.setdefault(w[1] - w[0], []).append(w)
    batches = [ws[i: i + batch_size] for ws in groups.values() for i in range(0, len(ws), batch_size)]
    # tqdm's disable=None: a bar only on a terminal.
    disable = None if progress is None else not progress
    with torch.inference_mode():
        for batch in tqdm(batches, desc="perplexity", unit="batch", disable=disable, leave=False):
            inputs = torch.stack([stream[b:e] for b, e, _ in batch])
            logits = scorer.logits(inputs).float()
            for row, (b, e, first) in enumerate(batch):
                # logits at window position j predict stream token b + j + 1
                lo = first - b - 1
                pred = logits[row, lo: e - b - 1]
                target = stream[first:e].to(logits.device)
                nll += float(F.cross_entropy(pred, target, reduction="sum").double())
                scored += e - first
    assert scored == n - 1, (scored, n)
    mean = nll / scored
    return PerplexityResult(
        model=scorer.name, data=data_name, tokens=scored, stream_tokens=n, windows=len(windows),
        seq_length=seq_length, stride=stride, mean_loss=mean, perplexity=math.exp(mean),
        seconds=time.perf_counter() - start,
    )


# ---------------------------------------------------------------- data


def is_text_file(path: str | Path) -> bool:
    return str(path).endswith(TEXT_SUFFIXES)


def load_token_stream(
    data: str | Path, tokenizer: str | Path = "qwen", json_keys: tuple[str, ...] = ("text",), max_tokens: int | None = None
) -> np.ndarray:
    """One stream of token ids from a jsonl/parquet file (tokenized, EOD after each document) or
    a Megatron `.bin/.idx` prefix (read as written)."""
    data = str(data)
    if is_text_file(data):
        from qwen_pretrain.preprocessing.tokenizer import load_tokenizer
        from qwen_pretrain.preprocessing.tokenizer_train import iter_texts

        if not Path(data).is_file():
            raise UserError(f"--data {data}: no such file")
        tok = load_tokenizer(tokenizer)
        parts: list[np.ndarray] = []
        total = 0
        for text in iter_texts([data], json_keys):
            parts.append(np.asarray(tok.encode(text) + [tok.eod_id], dtype=np.int64))
            total += len(parts[-1])
            if max_tokens is not None and total >= max_tokens:
                break
        ids = np.concatenate(parts) if parts else np.zeros(0, np.int64)
    else:
        from qwen_pretrain.preprocessing.indexed import read_indexed_dataset

        prefix = data[:-4] if data.endswith((".bin", ".idx")) else data
        ds = read_indexed_dataset(prefix)
        ids = np.asarray(ds.tokens[: ds.token_count], dtype=np.int64)
    return ids[:max_tokens] if max_tokens is not None else ids


def check_vocab_match(model_name: str, model_vocab: int, tokenizer: str | Path) -> None:
    """The tokenizer must fit the model's rows, and the rows must be the tokenizer's size padded
    by at most Megatron's rule (a multiple of 128 x TP, TP <= 8): else they were not made together."""
    from qwen_pretrain.preprocessing.tokenizer import resolve_tokenizer_json
    from qwen_pretrain.preprocessing.tokenizer_train import tokenizer_vocab_size

    path = resolve_tokenizer_json(tokenizer)
    size = tokenizer_vocab_size(path)
    ceiling = -(-size // 1024) * 1024
    if not size <= model_vocab <= ceiling:
        raise UserError(
            f"{model_name} has {model_vocab} vocabulary rows but tokenizer {path} has {size} tokens: "
            "they do not belong together; pass the tokenizer the model was trained with (--tokenizer DIR)"
        )


# ---------------------------------------------------------------- scorers


def default_tokenizer(model_dir: str | Path) -> str:
    """A model directory's own tokenizer when it carries one, else the official Qwen files."""
    return str(model_dir) if (Path(model_dir) / "tokenizer.json").is_file() else "qwen"


def load_hf_model(model_dir: str | Path, dtype: str = "float32") -> Any:
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # our output is JSON / one-line errors; no per-tensor bar
    path = Path(model_dir)
    if not (path / "config.json").is_file():
        raise UserError(f"--hf {model_dir}: no config.json there; pass a Hugging Face model directory "
                        "(e.g. the output of `qwen-pretrain convert`)")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype))
    return model.eval()


def hf_scorer(
    model_dir: str | Path, tokenizer: str | Path | None = None, dtype: str = "float32", device: str = "cpu"
) -> Scorer:
    from qwen_pretrain.training.run_settings import check_device_visible

    check_device_visible(device)
    model = load_hf_model(model_dir, dtype).to(device)
    vocab = int(model.config.vocab_size)
    tokenizer = str(tokenizer) if tokenizer else default_tokenizer(model_dir)
    check_vocab_match(f"--hf {model_dir}", vocab, tokenizer)

    def logits(ids: Any) -> Any:
        return model(input_ids=ids.to(device), use_cache=False).logits[..., :vocab]

    return Scorer(name=f"hf:{model_dir}", vocab_size=vocab, logits=logits, tokenizer=tokenizer)


def mcore_tokenizer(checkpoint: str | Path) -> str:
    """The tokenizer a converted checkpoint carries (`hf/` beside it, from `convert`), else Qwen's."""
    return default_tokenizer(Path(checkpoint) / "hf")


def mcore_scorer(
    checkpoint: str | Path, recipe_name: str | None = None, tokenizer: str | Path | None = None, device: str = "cpu"
) -> Scorer:
    """A megatron-core GPTModel at TP=1 (training/model.py, local spec) with a checkpoint's
    weights, on `device` with its inputs, whatever this host has installed.

    The checkpoint is the trainer's `--save` directory or `convert`'s output (torch_dist, any saved
    TP/PP, resharded by dist_checkpointing on load; or legacy). Its shape comes from the
    conversion record when there is one, else from `--recipe`; a trained tokenizer directory sets
    the vocabulary (`recipe_with_tokenizer`). Loading reuses conversion's TP=1 loader.
    """
    import dataclasses

    import torch
    from qwen_pretrain.conversion.checkpoint_info import CONVERSION_INFO, read_info
    from qwen_pretrain.conversion.convert import load_mcore_model_tp1, open_mcore
    from qwen_pretrain.training.checkpoint_dir import read_tracker, torch_dist_padded_vocab

    checkpoint = Path(checkpoint)
    tokenizer = str(tokenizer) if tokenizer else mcore_tokenizer(checkpoint)
    if read_info(checkpoint) is None and recipe_name is None:
        raise UserError(f"--mcore {checkpoint}: no {CONVERSION_INFO} to tell the model's shape; pass --recipe NAME")
    shape, layout, get, fmt = open_mcore(checkpoint, recipe_name if read_info(checkpoint) is None else None)
    if read_info(checkpoint) is None and tokenizer != "qwen":
        from qwen_pretrain.preprocessing.tokenizer_train import recipe_with_tokenizer
        from qwen_pretrain.recipes import get_recipe

        shape = dataclasses.replace(shape, vocab_size=recipe_with_tokenizer(get_recipe(recipe_name), tokenizer).model.vocab_size)
    name = f"--mcore {checkpoint}"
    check_vocab_match(name, shape.vocab_size, tokenizer)
    iter_dir = read_tracker(checkpoint)
    if fmt == "torch_dist":
        rows, _ = torch_dist_padded_vocab(iter_dir)
        if not shape.vocab_size <= rows <= -(-shape.vocab_size // 1024) * 1024:
            raise UserError(f"{iter_dir}: the checkpoint has {rows} vocabulary rows but tokenizer {tokenizer} needs "
                            f"{shape.vocab_size}: pass the tokenizer (--tokenizer) and recipe the model was trained with")
    model = load_mcore_model_tp1(checkpoint, shape, fmt, get, layout, device=device)
    vocab = shape.vocab_size

    def logits(ids: Any) -> Any:
        ids = ids.to(device)
        positions = torch.arange(ids.shape[1], dtype=torch.long, device=device).unsqueeze(0).expand_as(ids)
        # attention_mask None: the layers' causal mask; the padded-vocabulary rows are dropped.
        return model(ids, positions, None)[..., :vocab]

    return Scorer(name=f"mcore:{iter_dir}", vocab_size=vocab, logits=logits, tokenizer=tokenizer)
