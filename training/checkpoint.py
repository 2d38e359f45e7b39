"""torch_dist checkpoints of a training run (megatron-core `dist_checkpointing`).

Layout (Megatron-LM's, so its tools and our converters find it):

    SAVE_DIR/iter_0000010/            dist_checkpointing torch_dist files (*.distcp, .metadata, ...)
    SAVE_DIR/latest_checkpointed_iteration.txt

A checkpoint holds the model, the optimizer (AdamW moments and step, sharded the
distributed-optimizer way), the LR scheduler, every rank's RNG states (Python, numpy, torch and
megatron's tensor-parallel tracker) and the data position (iteration, consumed samples), so a
resumed run continues bit for bit. It is written to `iter_XXXXXXX.tmp` and renamed once
complete; `latest_checkpointed_iteration.txt` is replaced atomically after that, so an
interrupted save never looks like a checkpoint.
"""

from __future__ import annotations

import os
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qwen_pretrain.recipes.errors import UserError
from qwen_pretrain.recipes.files import atomic_write_text
from qwen_pretrain.training import mcore_compat
from qwen_pretrain.training.checkpoint_dir import (
    TRACKER_FILE,
    check_torch_dist_tp,
    iter_dir,
    latest_iteration,
)
from qwen_pretrain.training.cpu_support import init_torch_adam_state, untie_torch_adam_steps


@dataclass
class TrainState:
    """Where a run stands: the next step to run is `iteration` (0-based)."""

    iteration: int = 0
    consumed_samples: int = 0
    val_loss: float | None = None


def _rng_state() -> dict[str, Any]:
    import numpy as np
    import torch
    from megatron.core import tensor_parallel

    return {
        "random": random.getstate(),
        "np": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
        "tracker": tensor_parallel.get_cuda_rng_tracker().get_states(),
    }


def _set_rng_state(state: dict[str, Any]) -> None:
    import numpy as np
    import torch
    from megatron.core import tensor_parallel

    random.setstate(state["random"])
    np.random.set_state(state["np"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


def _sharded_state_dict(
    models: list[Any], optimizer: Any, scheduler: Any, state: TrainState, *, is_loading: bool,
    sharding_type: str,
) -> dict[str, Any]:
    """`sharding_type`: the distributed optimizer's checkpoint format (see `mcore_compat`)."""
    import torch.distributed as dist
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    metadata = {"distrib_optim_sharding_type": sharding_type, "singleton_local_shards": False}
    sd: dict[str, Any] = {}
    for i, model in enumerate(models):
        key = "model" if len(models) == 1 else f"model{i}"
        sd[key] = model.sharded_state_dict(metadata=metadata)
    # The optimizer walks the model tensors of every chunk. Kept nested per chunk (as Megatron-LM
    # passes them): VPP chunks use the same local key names, so one flat dict would lose all but
    # the last chunk's parameters, which the model-space format needs to find.
    model_sd = {key: sd[key] for key in sd}
    sd["optimizer"] = optimizer.sharded_state_dict(model_sd, is_loading=is_loading, metadata=metadata)
    # Which release wrote it, for a clear refusal where another release cannot read it.
    sd["megatron_core_version"] = mcore_compat.version()
    sd["opt_param_scheduler"] = scheduler.state_dict()
    sd["train_state"] = {
        "iteration": state.iteration,
        "consumed_samples": state.consumed_samples,
        "val_loss": state.val_loss,
    }
    world, rank = dist.get_world_size(), dist.get_rank()
    sd["world_size"] = world
    # One RNG object per rank: tensor-parallel ranks hold different tracker states.
    sd["rng_state"] = ShardedObject("rng_state", _rng_state(), (world,), (rank,), replica_id=0)
    return sd


def save_checkpoint(
    save_dir: str, models: list[Any], optimizer: Any, scheduler: Any, state: TrainState
) -> Path:
    """Write `SAVE_DIR/iter_{state.iteration}` (all ranks call this); returns its path."""
    import torch.distributed as dist
    from megatron.core import dist_checkpointing

    final = iter_dir(save_dir, state.iteration)
    # Not `files.atomic_dir`: every rank writes its shards through dist_checkpointing into one
    # directory that all ranks must name alike, between barriers, while atomic_dir picks a random
    # name on one process. A fixed `.tmp` name renamed by rank 0 gives the same guarantee.
    tmp = final.with_name(final.name + ".tmp")
    if dist.get_rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier()
    sd = _sharded_state_dict(models, optimizer, scheduler, state, is_loading=False,
                             sharding_type=mcore_compat.optimizer_sharding_type(optimizer))
    dist_checkpointing.save(sd, str(tmp))
    dist.barrier()
    if dist.get_rank() == 0:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        atomic_write_text(Path(save_dir) / TRACKER_FILE, f"{state.iteration}\n")
    dist.barrier()
    return final


def load_checkpoint(
    load_dir: str,
    models: list[Any],
    optimizer: Any,
    scheduler: Any,
    *,
    shape: Any = None,
    tp: int | None = None,
) -> TrainState | None:
    """Restore the latest checkpoint under `load_dir` (all ranks); None when there is none.

    A checkpoint of this trainer resumes exactly (model, optimizer, scheduler, data position,
    RNG). RNG states come back only when the world size matches the saving run (a resharded
    resume starts fresh RNG streams, which only matters with dropout). A checkpoint that holds
    only weights (`qwen-pretrain convert hf-to-mcore`, or any torch_dist model without training
    state) starts a new run from them at step 0 with a fresh optimizer, as Megatron-LM's
    `--finetune` does. With `shape` and `tp`, a vocabulary padded for another TP is refused
    first with a one-line error instead of a shape mismatch deep inside dist_checkpointing.
    """
    import torch.distributed as dist
    from megatron.core import dist_checkpointing

    iteration = latest_iteration(load_dir)
    if iteration is None:
        if not Path(load_dir).exists():
            raise UserError(f"--load {load_dir}: no such directory")
        return None
    path = iter_dir(load_dir, iteration)
    if not path.is_dir():
        raise UserError(f"--load {load_dir}: {TRACKER_FILE} names {path.name}, which is missing")
    if shape is not None and tp is not None:
        check_torch_dist_tp(Path(load_dir), shape, tp)
    common = dist_checkpointing.load_common_state_dict(str(path))
    if "train_state" not in common:
        _load_weights_only(path, models, optimizer)
        return TrainState()
    sharding_type = _saved_sharding_type(path, common)
    init_torch_adam_state(optimizer)
    sd = _sharded_state_dict(models, optimizer, scheduler, TrainState(), is_loading=True,
                             sharding_type=sharding_type)
    if int(common.get("world_size", -1)) != dist.get_world_size():
        del sd["rng_state"]
    loaded = dist_checkpointing.load(sd, str(path))
    for i, model in enumerate(models):
        model.load_state_dict(loaded["model" if len(models) == 1 else f"model{i}"])
    import torch

    # fp32 main parameters are views of the model's (leaf) parameters: copy without autograd.
    with torch.no_grad():
        optimizer.load_state_dict(loaded["optimizer"])
    untie_torch_adam_steps(optimizer)
    scheduler.load_state_dict(loaded["opt_param_scheduler"])
    if "rng_state" in loaded:
        _set_rng_state(loaded["rng_state"])
    ts = loaded["train_state"]
    return TrainState(int(ts["iteration"]), int(ts["consumed_samples"]), ts.get("val_loss"))


def _saved_sharding_type(path: Path, common: dict[str, Any]) -> str:
    """The optimizer format the checkpoint was written in; refused in one line where this
    megatron-core release cannot read it."""
    saved = (common.get("optimizer") or {}).get("param_state_sharding_type", mcore_compat.MODEL_SPACE)
    if not mcore_compat.can_read_sharding_type(saved):
        writer = common.get("megatron_core_version", "another release")
        raise UserError(
            f"--load {path}: its optimizer state is in megatron-core {writer}'s '{saved}' format, which "
            f"megatron-core {mcore_compat.version()} cannot read: resume under megatron-core {writer}"
        )
    return saved


def _load_weights_only(path: Path, models: list[Any], optimizer: Any) -> None:
    """Model weights from a checkpoint without training state; the optimizer starts fresh."""
    load_model_weights(path, models)
    # bf16 runs keep fp32 main copies of the weights in the optimizer: refresh them.
    optimizer.reload_model_params()


def load_model_weights(path: Path, models: list[Any]) -> None:
    """The model weights of a torch_dist checkpoint into `models`, whichever layer spec wrote it.

    Tensors are matched by their global names, which the local and the Transformer Engine specs
    share, so the top-level keys need not match the file's either. TE modules may also ask for
    `_extra_state` objects (their FP8 metadata) that a checkpoint written from the local spec
    (a CPU conversion) does not hold: those keep their initial state. A missing tensor is refused
    in one line.
    """
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.validation import StrictHandling

    keys = ["model" if len(models) == 1 else f"model{i}" for i in range(len(models))]
    sd = {key: model.sharded_state_dict() for key, model in zip(keys, models)}
    loaded, _, absent = dist_checkpointing.load(sd, str(path), strict=StrictHandling.RETURN_UNEXPECTED)
    tensors = sorted(k for k in absent if not k.endswith("_extra_state"))
    if tensors:
        raise UserError(f"{path}: tensor '{tensors[0]}' (and {len(tensors) - 1} more) is not in the "
                        "checkpoint: it was written for another model (check --recipe)")
    for key, model in zip(keys, models):
        missing, unexpected = model.load_state_dict(loaded[key], strict=not absent)
        if absent and (unexpected or any(not k.endswith("_extra_state") for k in missing)):
            raise UserError(f"{path}: the checkpoint's weights do not fit the model: missing {missing[:3]}, "
                            f"unexpected {unexpected[:3]}")
