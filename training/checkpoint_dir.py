"""Megatron checkpoint directories: the conventions the trainer and the converters share.

    DIR/latest_checkpointed_iteration.txt     "10" (or "release")
    DIR/iter_0000010/                          one checkpoint (torch_dist or legacy rank folders)

Also what a torch_dist checkpoint's metadata says about the run that may load it: the
embedding's global row count fixes the vocabulary padding, hence the tensor-parallel sizes.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from qwen_pretrain.recipes.errors import UserError
from qwen_pretrain.recipes.schema import ModelShape

TRACKER_FILE = "latest_checkpointed_iteration.txt"


def iter_dir_name(iteration: int) -> str:
    return f"iter_{iteration:07d}"


def iter_dir(checkpoint_dir: str | os.PathLike, iteration: int) -> Path:
    return Path(checkpoint_dir) / iter_dir_name(iteration)


def latest_iteration(load_dir: str | os.PathLike) -> int | None:
    """The iteration the tracker file names; None when there is no tracker file."""
    tracker = Path(load_dir) / TRACKER_FILE
    if not tracker.is_file():
        return None
    text = tracker.read_text().strip()
    if not text.isdigit():
        raise UserError(f"{tracker}: expected an iteration number, found '{text[:40]}'")
    return int(text)


def read_tracker(mcore_dir: Path) -> Path:
    """The iteration directory named by the tracker file (an iteration number or 'release')."""
    tracker = Path(mcore_dir) / TRACKER_FILE
    if not tracker.is_file():
        raise UserError(f"{tracker}: not found; --mcore must be a Megatron checkpoint directory")
    text = tracker.read_text().strip()
    if text == "release":
        return Path(mcore_dir) / "release"
    if not text.isdigit():
        raise UserError(f"{tracker}: expected an iteration number or 'release', got '{text}'")
    return iter_dir(mcore_dir, int(text))


def torch_dist_padded_vocab(iter_path: Path) -> tuple[int, Any]:
    """(embedding rows, dtype) as stored in a torch_dist checkpoint."""
    from megatron.core import dist_checkpointing

    meta = dist_checkpointing.load_tensors_metadata(str(iter_path))
    emb = meta.get("embedding.word_embeddings.weight")
    if emb is None:
        raise UserError(f"{iter_path}: no 'embedding.word_embeddings.weight' in the torch_dist checkpoint")
    return emb.global_shape[0], emb.dtype


def loadable_tps(shape: ModelShape, rows: int, max_tp: int = 64) -> list[int]:
    """The TPs whose vocabulary padding (`padded_vocab_size(tp)`) gives exactly `rows` rows."""
    return [tp for tp in range(1, max_tp + 1) if shape.padded_vocab_size(tp) == rows]


def check_torch_dist_tp(mcore_dir: Path, shape: ModelShape, tp: int) -> None:
    """A one-line UserError when a run at `tp` cannot load this torch_dist checkpoint.

    dist_checkpointing reshards any layout, but the embedding's global shape is part of the
    checkpoint: a converted checkpoint holds `padded_vocab_size(tp)` rows of the TP it was
    converted for, and a run whose TP pads the vocabulary differently cannot load it. Call
    this before `dist_checkpointing.load` (the trainer's `--load`).
    """
    iter_path = read_tracker(mcore_dir)
    rows, _ = torch_dist_padded_vocab(iter_path)
    want = shape.padded_vocab_size(tp)
    if rows != want:
        ok = [t for t in loadable_tps(shape, rows) if shape.num_query_groups % t == 0]
        raise UserError(
            f"{mcore_dir}: its embedding has {rows} rows (vocabulary {shape.vocab_size} padded for "
            f"TP {', '.join(map(str, ok)) or '?'}) but TP {tp} pads it to {want}: convert again with "
            f"`qwen-pretrain convert hf-to-mcore --tp {tp}`, or load with --tp {' or '.join(map(str, ok)) or '?'}"
        )


def legacy_layer_spec(checkpoint_dir: str | os.PathLike) -> str | None:
    """The layer spec ("te" or "local") a legacy checkpoint's state dicts were written for, read
    from its names (TE fuses the norms into `...layer_norm_weight`), as the converter reads it;
    None where the latest iteration is not a legacy (per-rank `torch.save`) checkpoint."""
    iteration = latest_iteration(checkpoint_dir)
    if iteration is None:
        return None
    files = sorted(iter_dir(checkpoint_dir, iteration).glob("mp_rank_*/model_optim_rng.pt"))
    if not files:
        return None
    import torch

    first = torch.load(files[0], map_location="cpu", weights_only=False, mmap=True)
    model = first.get("model") or first.get("model0") or {}
    return "te" if any(k.endswith("layer_norm_weight") for k in model) else "local"
