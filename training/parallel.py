"""Process groups and megatron-core parallel state for a recipe (NCCL on GPU, gloo on CPU).

Under torchrun (the env vars RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT are set):

    from qwen_pretrain.training.parallel import init_parallel, build_model_chunks, destroy_parallel
    init_parallel(recipe, settings)      # torch.distributed + parallel_state + seeded RNG
    chunks = build_model_chunks(recipe, settings=settings)  # one GPTModel, or this rank's VPP chunks
    ...
    destroy_parallel()

In one plain Python process (the converters, evaluation, tests), a world of size 1:

    from qwen_pretrain.training.parallel import init_single_process
    init_single_process(seed=1234)                  # every parallel size 1, on CPU
    init_single_process(seed=1234, device="cuda")   # the same on the current GPU (NCCL)

The device is the one asked for (`run_settings`), never guessed from the machine: `cuda` where
CUDA is not visible is refused in one line, and `cpu` runs on CPU even on a GPU host, with
`cpu_support.enable_cpu_support(force=True)` keeping megatron-core's CUDA calls on the CPU.
"""

from __future__ import annotations

import datetime
import os
import random
import socket
from typing import TYPE_CHECKING, Any

from qwen_pretrain.recipes.schema import Parallelism, Recipe

if TYPE_CHECKING:
    from qwen_pretrain.training.run_settings import RunSettings


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (for a one-node rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(timeout_minutes: int = 10, *, device: str = "cpu") -> tuple[int, int]:
    """torch.distributed from torchrun's environment (or a world of one) on `device` ("cuda":
    NCCL, one GPU per local rank; "cpu": gloo); returns (rank, world)."""
    import torch
    import torch.distributed as dist
    from qwen_pretrain.training import mcore_compat
    from qwen_pretrain.training.cpu_support import enable_cpu_support
    from qwen_pretrain.training.run_settings import check_device_visible

    mcore_compat.install_numpy_aliases()
    check_device_visible(device)
    if device == "cpu":
        enable_cpu_support(force=True)
    if not dist.is_initialized():
        backend = "nccl" if device == "cuda" else "gloo"
        if device == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        timeout = datetime.timedelta(minutes=timeout_minutes)
        if "WORLD_SIZE" in os.environ:  # torchrun (or Slurm + torchrun) set the rendezvous
            dist.init_process_group(backend=backend, timeout=timeout)
        else:  # a world of one in this process; leaves the environment untouched
            dist.init_process_group(
                backend=backend, timeout=timeout, rank=0, world_size=1,
                init_method=f"tcp://127.0.0.1:{free_port()}",
            )
    return dist.get_rank(), dist.get_world_size()


def init_parallel(recipe: Recipe, settings: RunSettings | None = None, *, seed: int | None = None) -> None:
    """Process groups, megatron-core parallel state and RNG for `recipe`'s layout on the
    settings' device (default: CPU).

    The world size must be a multiple of TP x PP x CP (the rest is data parallel).
    """
    from megatron.core import parallel_state as ps
    from qwen_pretrain.recipes.errors import UserError

    _, world = init_distributed(device=settings.device if settings else "cpu")
    p = recipe.parallel
    if world % (p.tp * p.pp * p.cp):
        raise UserError(
            f"world size {world} is not a multiple of TP x PP x CP = {p.tp} x {p.pp} x {p.cp}: "
            "start as many processes as the recipe's --gpus (torchrun --nproc-per-node)"
        )
    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    ps.initialize_model_parallel(**megatron_parallel_sizes(p))
    seed_everything(recipe.training.seed if seed is None else seed)


def megatron_parallel_sizes(p: Parallelism) -> dict[str, int | None]:
    """The layout's sizes under the keyword names megatron-core's parallel state and
    `TransformerConfig` both use."""
    return dict(
        tensor_model_parallel_size=p.tp,
        pipeline_model_parallel_size=p.pp,
        virtual_pipeline_model_parallel_size=p.vpp,
        context_parallel_size=p.cp,
        expert_model_parallel_size=p.ep,
        expert_tensor_parallel_size=p.etp,
    )


def seed_everything(seed: int) -> None:
    """Megatron-LM's rule: a different seed per pipeline stage, the TP/EP streams from it."""
    import numpy as np
    import torch
    from megatron.core import parallel_state as ps
    from megatron.core import tensor_parallel

    seed = seed + 100 * ps.get_pipeline_model_parallel_rank()
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)


def init_single_process(*, seed: int = 1234, device: str = "cpu") -> None:
    """A world of one process (gloo on CPU, NCCL on GPU) with megatron-core parallel state, every
    parallel size 1, and seeded RNG: what the converters and evaluation build TP=1 models under."""
    from megatron.core import parallel_state as ps

    init_distributed(device=device)
    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    ps.initialize_model_parallel()
    seed_everything(seed)


def destroy_parallel() -> None:
    """Undo `init_parallel` (parallel state and the default process group)."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


def build_model_chunks(recipe: Recipe, config: Any = None, *, settings: RunSettings | None = None) -> list[Any]:
    """The GPTModel chunk(s) of this rank: one per virtual pipeline stage (one without VPP),
    under `settings` (default: the CPU reference settings)."""
    from megatron.core import parallel_state as ps
    from qwen_pretrain.training.model import build_model, transformer_config

    config = config or transformer_config(recipe, settings)
    vpp = recipe.parallel.vpp
    if vpp is None:
        return [
            build_model(
                recipe,
                settings=settings,
                pre_process=ps.is_pipeline_first_stage(),
                post_process=ps.is_pipeline_last_stage(),
                config=config,
            )
        ]
    chunks = []
    for stage in range(vpp):
        chunks.append(
            build_model(
                recipe,
                settings=settings,
                pre_process=ps.is_pipeline_first_stage(ignore_virtual=False, vp_stage=stage),
                post_process=ps.is_pipeline_last_stage(ignore_virtual=False, vp_stage=stage),
                vp_stage=stage,
                config=config,
            )
        )
    return chunks
