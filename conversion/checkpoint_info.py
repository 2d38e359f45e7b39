"""What every converted checkpoint carries besides its tensors, and which format a directory holds.

The formats themselves: `conversion/legacy.py` (per-rank `torch.save` files) and
`conversion/torch_dist.py` (`dist_checkpointing`). The directory conventions the trainer shares
(tracker file, `iter_NNNNNNN`, torch_dist vocabulary padding) are `training/checkpoint_dir.py`.

Both formats carry Megatron-LM's `args` (what its loader checks a checkpoint against), and the
converter's own `conversion.json` (shape, layout, format) and `hf/` (the original config.json and
tokenizer files), so that `mcore-to-hf` needs no options.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path
from typing import Any

from qwen_pretrain.conversion.layout import McoreLayout
from qwen_pretrain.recipes.errors import UserError
from qwen_pretrain.recipes.schema import ModelShape

CHECKPOINT_VERSION = 3.0
CONVERSION_INFO = "conversion.json"


def megatron_args(shape: ModelShape, layout: McoreLayout, dtype: str) -> argparse.Namespace:
    """The `args` Megatron-LM's loader reads back (check_checkpoint_args and friends)."""
    return argparse.Namespace(
        num_layers=shape.num_layers,
        hidden_size=shape.hidden_size,
        ffn_hidden_size=shape.ffn_hidden_size,
        num_attention_heads=shape.num_attention_heads,
        group_query_attention=shape.num_query_groups != shape.num_attention_heads,
        num_query_groups=shape.num_query_groups,
        kv_channels=shape.head_dim,
        max_position_embeddings=shape.max_position_embeddings,
        position_embedding_type="rope",
        add_position_embedding=False,
        rotary_base=int(shape.rope_theta),
        normalization="RMSNorm",
        norm_epsilon=shape.rms_norm_eps,
        swiglu=True,
        add_bias_linear=False,
        add_qkv_bias=shape.qkv_bias,
        qk_layernorm=shape.qk_norm,
        untie_embeddings_and_output_weights=not shape.tie_embeddings,
        make_vocab_size_divisible_by=shape.make_vocab_size_divisible_by,
        padded_vocab_size=shape.padded_vocab_size(layout.tp),
        tokenizer_type="HuggingFaceTokenizer",
        num_experts=shape.num_experts,
        moe_ffn_hidden_size=shape.moe_ffn_hidden_size,
        moe_router_topk=shape.moe_router_topk,
        moe_grouped_gemm=layout.expert_layout != "sequential",
        tensor_model_parallel_size=layout.tp,
        pipeline_model_parallel_size=layout.pp,
        virtual_pipeline_model_parallel_size=layout.vpp,
        expert_model_parallel_size=layout.ep,
        expert_tensor_parallel_size=layout.etp,
        bf16=dtype == "bfloat16",
        fp16=dtype == "float16",
        ckpt_format="torch",
        iteration=0,
        consumed_train_samples=0,
        consumed_valid_samples=0,
    )


def write_info(out: Path, fmt: str, shape: ModelShape, layout: McoreLayout, recipe: str | None, dtype: str) -> None:
    """`conversion.json`: what `mcore-to-hf` and `eval --mcore` read back instead of options."""
    info = {
        "format": fmt,
        "recipe": recipe,
        "dtype": dtype,
        "shape": dataclasses.asdict(shape),
        "layout": dataclasses.asdict(layout),
        "iteration": 0,
    }
    (out / CONVERSION_INFO).write_text(json.dumps(info, indent=2) + "\n")


def read_info(mcore_dir: Path) -> dict[str, Any] | None:
    """The checkpoint's `conversion.json`; None for a checkpoint the converter did not write."""
    path = Path(mcore_dir) / CONVERSION_INFO
    return json.loads(path.read_text()) if path.is_file() else None


def detect_format(iter_dir: Path) -> str:
    """"torch_dist" or "legacy", from the files of one iteration directory."""
    if (iter_dir / "metadata.json").is_file() or (iter_dir / ".metadata").is_file():
        return "torch_dist"
    if any(iter_dir.glob("mp_rank_*/model_optim_rng.pt")):
        return "legacy"
    raise UserError(f"{iter_dir}: neither a torch_dist nor a legacy (mp_rank_*) checkpoint")
