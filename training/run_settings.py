"""Every setting of a run, decided by the target device and what the target has installed.

    from qwen_pretrain.training.run_settings import run_settings
    s = run_settings(recipe, "cuda", transformer_engine=True)   # a GPU node in an NGC image
    s.to_dict()        # what `qwen-pretrain train --recipe R --device cuda --print-config` prints

`run_settings` is a pure function of (recipe, target device, whether the target has Transformer
Engine). It never looks at the machine that runs it: `--print-config` on a laptop prints what a
GPU node will run, and a conversion on a GPU host plans exactly as it does on a CPU one. The
host is probed in one place only (`cuda_visible`, `transformer_engine_importable`): the trainer
passes what it finds there (`settings_for_this_host`) and refuses `cuda` where CUDA is not
visible, rather than falling back to CPU without a word.

GPU targets get what NVIDIA's own recipes use for these models (Megatron-Bridge
`recipes/common._pretrain_common`, `recipes/qwen/qwen3.py` and `qwen3_moe.py`, read on
2026-11-29, and Megatron-LM's argument defaults): the Transformer Engine layer spec, bf16, the
fused kernels (bias-SwiGLU, bias-dropout-add, masked softmax, RoPE, gradient-accumulation fusion
into `main_grad`, fused cross entropy), grouped GEMM and fused token permutation for MoE, the
distributed optimizer with gradient reduce-scatter and parameter all-gather overlapped with
compute, gradients reduced in fp32 and averaged inside the collective, and
`CUDA_DEVICE_MAX_CONNECTIONS=1`. Without TE (`transformer_engine=False`) the kernels that live in
TE are off (RoPE fusion, gradient-accumulation fusion, grouped GEMM, permute fusion) and the local
spec is used; the jit-fused ones stay on.

CPU targets run megatron-core's unfused reference paths: local spec, fp32, gloo, no overlap.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from qwen_pretrain.recipes.errors import UserError
from qwen_pretrain.recipes.schema import Recipe

DEVICES = ("cuda", "cpu")

# The environment of every GPU process (the torchrun launcher, `train --nproc` and the Slurm
# script export it; a value already set by the site wins).
GPU_ENVIRONMENT: dict[str, str] = {
    # Megatron's tensor/sequence-parallel communication relies on kernels being issued in order:
    # one hardware queue. Megatron-LM refuses sequence parallelism without it.
    "CUDA_DEVICE_MAX_CONNECTIONS": "1",
    # NeMo's and Megatron-Bridge's performance launchers: NCCL buffers of asynchronous
    # collectives are freed when the collective ends, not when the caching allocator notices.
    "TORCH_NCCL_AVOID_RECORD_STREAMS": "1",
    # NeMo's launchers: NVLink SHARP reserves GPU memory per communicator; off by default there.
    "NCCL_NVLS_ENABLE": "0",
    # A failed collective aborts the job instead of hanging it.
    "TORCH_NCCL_ASYNC_ERROR_HANDLING": "1",
    # InfiniBand retry timeout 4.096 us x 2^22 (about 17 s): rides out fabric hiccups at scale.
    "NCCL_IB_TIMEOUT": "22",
    "NCCL_DEBUG": "WARN",
}


@dataclass(frozen=True)
class RunSettings:
    """What a run uses besides the recipe's model, layout and hyper-parameters."""

    device: str  # "cuda" | "cpu"
    transformer_engine: bool  # the target has Transformer Engine (its spec and kernels are used)
    layer_spec: str  # "te" | "local"
    precision: str  # "bf16" | "fp32"
    process_group_backend: str  # "nccl" | "gloo"
    transformer_config: dict[str, Any]  # TransformerConfig fields (dtypes by name)
    ddp: dict[str, Any]  # DistributedDataParallelConfig fields
    optimizer: dict[str, Any]  # OptimizerConfig fields
    env: dict[str, str]  # exported to every process (a site's own value wins)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def bf16(self) -> bool:
        return self.precision == "bf16"


def run_settings(recipe: Recipe, device: str, *, transformer_engine: bool = True) -> RunSettings:
    """Every run setting of `recipe` on `device` ("cuda" or "cpu"); `transformer_engine` says
    whether the target has TE (ignored on CPU, where TE cannot run). Pure: reads nothing else."""
    if device not in DEVICES:
        raise UserError(f"--device {device}: choose one of {', '.join(DEVICES)}")
    gpu = device == "cuda"
    te = gpu and transformer_engine
    moe = recipe.model.is_moe
    precision = recipe.training.precision if gpu else "fp32"  # CPU always trains in fp32
    bf16 = precision == "bf16"
    dtype = "bfloat16" if bf16 else "float32"
    distributed_optimizer = recipe.parallel.use_distributed_optimizer
    return RunSettings(
        device=device,
        transformer_engine=te,
        layer_spec="te" if te else "local",
        precision=precision,
        process_group_backend="nccl" if gpu else "gloo",
        transformer_config={
            "bf16": bf16,
            "params_dtype": dtype,
            "pipeline_dtype": dtype,
            # jit-fused in megatron-core itself: any GPU.
            "bias_activation_fusion": gpu,  # SwiGLU (Megatron-LM's --swiglu default)
            "bias_dropout_fusion": gpu,
            "masked_softmax_fusion": gpu,
            "persist_layer_norm": gpu,
            "cross_entropy_loss_fusion": gpu,
            "cross_entropy_fusion_impl": "te" if te else "native",
            # Kernels that live in Transformer Engine (apex is not assumed).
            "apply_rope_fusion": te,
            "gradient_accumulation_fusion": te,
            "moe_grouped_gemm": te and moe,
            "moe_permute_fusion": te and moe,
        },
        ddp={
            "use_distributed_optimizer": distributed_optimizer,
            # Reduce-scatter of gradients during backward, all-gather of parameters during the
            # next forward (the latter exists only with the distributed optimizer).
            "overlap_grad_reduce": gpu,
            "overlap_param_gather": gpu and distributed_optimizer,
            "grad_reduce_in_fp32": bf16,
            "average_in_collective": gpu,  # NCCL's ReduceOp.AVG; gloo has none
            # Off everywhere: the trainer judges non-finite losses itself (`--on-nan stop|skip`);
            # this check would raise inside the gradient reduction before it can.
            "check_for_nan_in_grad": False,
        },
        optimizer={
            "optimizer": "adam",
            "use_distributed_optimizer": distributed_optimizer,
            "bf16": bf16,
            "params_dtype": dtype,
        },
        env=dict(GPU_ENVIRONMENT) if gpu else {},
    )


def default_device(recipe: Recipe, cuda_is_visible: bool) -> str:
    """`--device` when it is not given: cuda where CUDA is visible; otherwise cpu for the tiny
    recipes, and a one-line refusal for the others (a real model would crawl on CPU unnoticed)."""
    if cuda_is_visible:
        return "cuda"
    if recipe.tiny:
        return "cpu"
    raise UserError(
        f"recipe {recipe.name} is not a tiny recipe and CUDA is not visible on this machine: run it "
        "on a GPU node, add --print-config --device cuda to see its GPU settings here, or pass "
        "--device cpu to run it on CPU anyway"
    )


# ---------------------------------------------------------------- the host (impure)


def cuda_visible() -> bool:
    import torch

    return bool(torch.cuda.is_available())


def transformer_engine_importable() -> bool:
    """True where Transformer Engine imports (GPU machines, NGC images); never on CPU."""
    if not cuda_visible():
        return False
    try:
        import transformer_engine  # noqa: F401
    except Exception:  # ImportError, or OSError from a missing CUDA library
        return False
    return True


def check_device_visible(device: str) -> None:
    """A one-line refusal of `cuda` on a machine where CUDA is not visible."""
    if device == "cuda" and not cuda_visible():
        raise UserError(
            "--device cuda: CUDA is not visible on this machine (torch.cuda.is_available() is false): "
            "check the GPUs and driver (nvidia-smi, CUDA_VISIBLE_DEVICES), or pass --device cpu"
        )


def settings_for_this_host(recipe: Recipe, device: str | None = None, *, no_te: bool = False) -> RunSettings:
    """The settings a run on this machine uses: `device` (default: `default_device`), refused
    where it is not there, with Transformer Engine where it imports (unless `no_te`)."""
    device = device or default_device(recipe, cuda_visible())
    check_device_visible(device)
    te = device == "cuda" and not no_te and transformer_engine_importable()
    return run_settings(recipe, device, transformer_engine=te)
