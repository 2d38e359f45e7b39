"""What differs between the megatron-core releases this project supports, found by feature detection.

Supported: 0.14.x (the NGC NeMo 25.09 image), 0.15.x (NeMo 2.7) and 0.16.x (the CPU environment).
Every difference the project meets is answered here, by asking the installed megatron-core what
it has, never by comparing version numbers elsewhere in the code.
"""

from __future__ import annotations

import inspect
import re
from typing import Any

from qwen_pretrain.recipes.errors import UserError

# The supported releases, as (major, minor): 0.14 (NeMo 25.09), 0.15 (NeMo 2.7), 0.16.
SUPPORTED_MINORS = ((0, 14), (0, 15), (0, 16))

# Distributed-optimizer checkpoint formats, best first. dp_reshardable (0.15+) saves each rank's
# buckets without communication and reshards across DP; fully_sharded_model_space (every release
# here) saves the state per parameter in model space and reshards across any layout.
DP_RESHARDABLE = "dp_reshardable"
MODEL_SPACE = "fully_sharded_model_space"


def version() -> str:
    import megatron.core

    return str(getattr(megatron.core, "__version__", "unknown"))


def check_release(found: str | None = None) -> str:
    """One line naming the installed megatron-core; a one-line UserError where it is outside the
    supported releases (the Docker build runs this against the image's own)."""
    found = found or version()
    m = re.match(r"(\d+)\.(\d+)", found)
    supported = ", ".join(f"{a}.{b}.x" for a, b in SUPPORTED_MINORS)
    if not m or (int(m.group(1)), int(m.group(2))) not in SUPPORTED_MINORS:
        raise UserError(
            f"megatron-core {found} is not supported (supported: {supported}): use an NGC NeMo image "
            "of that range, e.g. nvcr.io/nvidia/nemo:25.09"
        )
    return f"megatron-core {found} (supported: {supported})"


def install_numpy_aliases() -> None:
    """megatron-core 0.14 and 0.15 call `np.product` in dist_checkpointing (sharding validation,
    flattened tensors), which numpy 2 removed; NGC images of that time ship numpy 1.x. Give numpy 2
    the alias where it lacks it (`np.prod` is the same function). Idempotent."""
    import numpy as np

    if "product" not in np.__dict__:
        np.product = np.prod


def legacy_tokenizer_base() -> type:
    """The abstract tokenizer megatron-core's datasets accept: `MegatronLegacyTokenizer` since
    0.15, `MegatronTokenizer` (same interface) in 0.14."""
    from megatron.core.datasets import megatron_tokenizer as mt

    return getattr(mt, "MegatronLegacyTokenizer", None) or mt.MegatronTokenizer


def optimizer_sharding_type(optimizer: Any) -> str:
    """The best distributed-optimizer checkpoint format this release can write for `optimizer`.

    dp_reshardable needs `sharded_param_state_dp_reshardable` (0.15+). With torch's AdamW (the
    fallback without Apex or Transformer Engine, as on CPU) every parameter's state holds a 0-d
    `step` tensor, which 0.15's dp_reshardable path cannot shard (0.16 skips it explicitly);
    there the per-parameter model-space format is used instead.
    """
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    method = getattr(DistributedOptimizer, _SHARDING_METHODS[DP_RESHARDABLE], None)
    if method is None:
        return MODEL_SPACE
    if _uses_torch_adam(optimizer) and "'step'" not in inspect.getsource(method):
        return MODEL_SPACE
    return DP_RESHARDABLE


# Each optimizer checkpoint format and the DistributedOptimizer method that reads and writes it.
_SHARDING_METHODS = {
    DP_RESHARDABLE: "sharded_param_state_dp_reshardable",
    MODEL_SPACE: "sharded_param_state_fs_model_space",
    "fully_reshardable": "sharded_param_state_fully_reshardable",
    "dp_zero_gather_scatter": "sharded_param_state_dp_zero",
    "fully_sharded_bucket_space": "sharded_param_state_fs_bucket_space",
}


def can_read_sharding_type(sharding_type: str) -> bool:
    """Whether this release's distributed optimizer can load a checkpoint of `sharding_type`."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    method = _SHARDING_METHODS.get(sharding_type)
    if method is None or not hasattr(DistributedOptimizer, method):
        return False
    if sharding_type == MODEL_SPACE:
        # The model-space format stores flattened ranges of parameters; 0.16 keeps the method
        # but refuses flattened ShardedTensors (it dropped `from_rank_offsets_flat` with them).
        from megatron.core.dist_checkpointing.mapping import ShardedTensor

        return hasattr(ShardedTensor, "from_rank_offsets_flat")
    return True


def _uses_torch_adam(optimizer: Any) -> bool:
    import torch

    return any(
        isinstance(getattr(opt, "optimizer", None), torch.optim.Adam | torch.optim.AdamW)
        for opt in getattr(optimizer, "chained_optimizers", [optimizer])
    )


if __name__ == "__main__":  # python -m qwen_pretrain.training.mcore_compat: the Docker build's check
    import sys

    try:
        print(check_release())
    except UserError as err:
        print(f"qwen-pretrain: error: {err}", file=sys.stderr)
        sys.exit(2)
