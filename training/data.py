"""Training data for the trainer: megatron-core GPTDataset (or MockGPTDataset) and batching.

Datasets come from `BlendedMegatronDatasetBuilder` with the recipe's blend, split and seed.
Batches are addressed by position, not by a stateful loader: micro-batch `m` of global step
`s` on data-parallel rank `d` holds samples `s*gbs + m*dp*mbs + d*mbs + [0, mbs)`. Resuming
therefore only needs the step number (the checkpoint stores it with consumed_samples), and a
resumed run reads exactly the samples the uninterrupted run would have read.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qwen_pretrain.recipes.errors import UserError
from qwen_pretrain.recipes.schema import Recipe


@dataclass(frozen=True)
class TokenIds:
    """What megatron-core's datasets ask of a tokenizer: the vocabulary size and EOD id."""

    vocab_size: int
    eod: int

    @property
    def unique_identifiers(self) -> dict[str, Any]:
        # Part of the dataset's cache key (megatron hashes its config into index file names).
        return {"class": type(self).__name__, "vocab_size": self.vocab_size, "eod": self.eod}


def parse_data_path(values: list[str]) -> tuple[tuple[float, str], ...]:
    """`--data-path` values -> ((weight, prefix), ...): the one parser of `train` and `launch`.

    The rule:
      - `PREFIX`: one dataset, weight 1.
      - `W1 PREFIX1 W2 PREFIX2 ...`: a blend; every prefix follows its weight, a positive number
        (weights are relative: megatron-core normalizes them to sum to 1).
      - Several prefixes without weights are refused. megatron-core's `get_blend_from_list` would
        accept them and weigh each dataset by its size; the renderers and the recipe carry explicit
        weights, so the user writes them (`1 A 1 B` for equal shares, or the weights that
        `qwen-pretrain preprocess blend` prints).
      - One quoted argument holding the whole list (`"0.3 A 0.7 B"`) is refused: the shell passes it
        as a single prefix, so the words must be separate arguments.
    Every error is one line naming `--data-path` and the fix. The prefixes are returned as given
    (not resolved, not checked for files: `check_prefixes` does that where the data is read).
    """
    if not values:
        return ()
    usage = "give --data-path PREFIX or --data-path W1 PREFIX1 W2 PREFIX2 ..."
    if len(values) == 1:
        (value,) = values
        if _is_number(value):
            raise UserError(f"--data-path: '{value}' is a weight with no PREFIX after it; {usage}")
        words = value.split()
        if len(words) > 1 and _is_number(words[0]):
            raise UserError(
                f"--data-path: one quoted value '{value}'; pass its weights and prefixes as separate "
                "arguments (drop the quotes)"
            )
        return ((1.0, value),)
    if not any(_is_number(v) for v in values):
        raise UserError(
            f"--data-path: {len(values)} prefixes without weights; put a weight before each prefix, "
            f"e.g. --data-path 1 {values[0]} 1 {values[1]}{' ...' if len(values) > 2 else ''} "
            "(datasets are not weighed by their size)"
        )
    if len(values) % 2:
        raise UserError(f"--data-path: {len(values)} values, not WEIGHT PREFIX pairs; {usage}")
    pairs = []
    for weight, prefix in zip(values[::2], values[1::2], strict=True):
        if not _is_number(weight):
            raise UserError(f"--data-path: '{weight}' stands where a weight belongs; {usage}")
        if _is_number(prefix):
            raise UserError(f"--data-path: '{prefix}' stands where a PREFIX belongs; {usage}")
        w = float(weight)
        if not (math.isfinite(w) and w > 0):
            raise UserError(f"--data-path: weight '{weight}' of {prefix} must be a positive number")
        pairs.append((w, prefix))
    return tuple(pairs)


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def check_prefixes(blend: tuple[tuple[float, str], ...]) -> None:
    """Each prefix must have its .bin and .idx (megatron's own error comes much later)."""
    for _, prefix in blend:
        for suffix in (".bin", ".idx"):
            if not Path(prefix + suffix).is_file():
                raise UserError(
                    f"--data-path: {prefix}{suffix} not found; pass the prefix without "
                    ".bin/.idx (e.g. out/corpus_text_document), made by `qwen-pretrain preprocess`"
                )


def dataset_sizes(recipe: Recipe) -> list[int]:
    """Samples for [train, valid, test], Megatron-LM's rule (valid: every eval, plus one)."""
    t = recipe.training
    train = t.train_steps * t.global_batch_size
    evals = (t.train_steps // t.eval_interval + 1) if t.eval_interval > 0 else 0
    valid = evals * t.eval_iters * t.global_batch_size
    return [train, valid, 0]


def build_datasets(recipe: Recipe, *, cache_dir: str | None = None) -> tuple[Any, Any]:
    """(train, valid) datasets for `recipe`; mock data when the recipe's blend is empty."""
    from megatron.core.datasets.blended_megatron_dataset_builder import (
        BlendedMegatronDatasetBuilder,
    )
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig, MockGPTDataset

    d = recipe.data
    mock = not d.blend
    if not mock:
        check_prefixes(d.blend)
    config = GPTDatasetConfig(
        random_seed=recipe.training.seed,
        sequence_length=recipe.training.seq_length,
        blend=None if mock else ([p for _, p in d.blend], [w for w, _ in d.blend]),
        split=d.split,
        tokenizer=TokenIds(vocab_size=recipe.model.vocab_size, eod=d.eod_token_id),
        reset_position_ids=d.reset_position_ids,
        reset_attention_mask=d.reset_attention_mask,
        eod_mask_loss=False,
        # The full [s, s] mask is built only when documents must not attend to each other;
        # otherwise attention is plain causal and the model builds that mask itself.
        create_attention_mask=d.reset_attention_mask,
        path_to_cache=cache_dir,
        mmap_bin_files=True,
    )
    cls = MockGPTDataset if mock else GPTDataset
    train, valid, _ = BlendedMegatronDatasetBuilder(
        cls, dataset_sizes(recipe), lambda: True, config
    ).build()
    return train, valid


def micro_batch_indices(
    recipe: Recipe, step: int, dp_rank: int, dp_size: int, base: int = 0
) -> list[list[int]]:
    """Sample indices of each micro-batch this DP rank runs at global step `step` (0-based)."""
    mbs = recipe.parallel.micro_batch_size
    gbs = recipe.training.global_batch_size
    num_micro = gbs // (mbs * dp_size)
    start = base + step * gbs
    return [
        [start + m * dp_size * mbs + dp_rank * mbs + j for j in range(mbs)]
        for m in range(num_micro)
    ]


def collate(dataset: Any, indices: list[int]) -> dict[str, Any]:
    """A micro-batch dict of tensors (tokens, labels, loss_mask, position_ids[, attention_mask])."""
    import torch

    samples = [dataset[i % len(dataset)] for i in indices]
    batch = {
        key: torch.stack([torch.as_tensor(s[key]) for s in samples])
        for key in ("tokens", "labels", "loss_mask", "position_ids")
    }
    mask = samples[0].get("attention_mask")
    batch["attention_mask"] = (
        None if mask is None else torch.stack([torch.as_tensor(s["attention_mask"]) for s in samples])
    )
    return batch
