"""Accelerator peaks used for MFU and time-to-train estimates (dense BF16, no sparsity)."""

from __future__ import annotations

from dataclasses import dataclass

from qwen_pretrain.recipes.errors import UserError


@dataclass(frozen=True)
class GpuSpec:
    name: str
    peak_bf16_tflops: float  # vendor's dense BF16/FP16 tensor peak per device
    memory_gb: float  # device memory in GB (10^9 bytes)
    gpus_per_node: int = 8


GPUS: dict[str, GpuSpec] = {
    # H100 SXM5 and H200 share the Hopper tensor cores: 989 TFLOP/s dense BF16.
    "h100": GpuSpec("h100", 989.0, 80.0),
    "h200": GpuSpec("h200", 989.0, 141.0),
    # B200 (DGX B200 configuration): 2.25 PFLOP/s dense BF16, 180 GB.
    "b200": GpuSpec("b200", 2250.0, 180.0),
    # A100 SXM 80 GB: 312 TFLOP/s dense BF16.
    "a100": GpuSpec("a100", 312.0, 80.0),
    # Ascend 910B: ~320 TFLOP/s FP16 (vendor figure), 64 GB HBM.
    "910b": GpuSpec("910b", 320.0, 64.0),
}


def get_gpu(name: str) -> GpuSpec:
    key = name.lower()
    if key not in GPUS:
        raise UserError(f"unknown --gpu '{name}': choose one of {', '.join(GPUS)}")
    return GPUS[key]
