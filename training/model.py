"""A recipe becomes a megatron-core `GPTModel` (Qwen3 dense, Qwen2/2.5, Qwen3-MoE).

    from qwen_pretrain.training.parallel import init_single_process
    from qwen_pretrain.training.model import build_model, build_tp1_model
    from qwen_pretrain.training.run_settings import run_settings

    init_single_process()                # world size 1, gloo, parallel_state, seeded RNG
    model = build_model(recipe)          # a recipe whose parallel sizes are all 1 (CPU settings)
    model = build_model(recipe, settings=run_settings(recipe, "cuda"))   # TE spec, bf16, fusions
    model = build_tp1_model(shape)       # or a bare model shape (conversion, evaluation)

What the model is made of besides its shape (layer spec, precision, fusions) comes from
`run_settings.RunSettings`, decided by the target device, never by the machine that builds it;
without settings, the CPU reference settings apply. Conversion and evaluation always build the
local spec (`build_tp1_model`), on the device they are asked for.

Under pipeline parallelism build one model per stage with `pre_process`/`post_process` (and
`vp_stage` for interleaving): `parallel.build_model_chunks(recipe)` does that for you.

How the Hugging Face config maps to megatron-core (one source of truth: `recipe.model`):
- RMSNorm with the recipe's eps, SwiGLU (`gated_linear_unit` + silu), RoPE with `rope_theta`,
  no linear biases except q/k/v for Qwen2/2.5 (`add_qkv_bias`).
- `kv_channels = head_dim`, always explicit: Qwen3's head_dim is not hidden/heads.
- Qwen3 qk-norm: `qk_layernorm` (RMSNorm per head on queries and keys).
- Tied embeddings: `share_embeddings_and_output_weights`.
- Qwen3-MoE routing. HF: softmax over all experts, top-k, then divide by the top-k sum when
  `norm_topk_prob`. megatron-core: with `moe_router_pre_softmax=False` it takes the top-k
  logits and softmaxes them, which is the same renormalised distribution; with `True` it
  softmaxes first and keeps the raw top-k probabilities (HF with `norm_topk_prob=False`).
  So `moe_router_pre_softmax = not norm_topk_prob`, no top-k scaling factor, `aux_loss`
  load balancing with the recipe's coefficient, the alltoall dispatcher, and grouped GEMM where
  the settings say so (GPU with Transformer Engine).
- The embedding and output layer have `recipe.model.padded_vocab_size(tp)` rows (Megatron's
  make-vocab-size-divisible-by x TP rule). Rows past the real vocabulary are extra logits;
  the logits of real tokens are the same dot products as without them.

Checkpoint keys do not depend on the layer spec. megatron-core's local spec maps its norms to
the names TE fuses them under (`input_layernorm.` -> `self_attention.linear_qkv.layer_norm_`,
`pre_mlp_layernorm.` -> `mlp.linear_fc1.layer_norm_`) in its sharded state dict. In MoE layers TE
keeps `pre_mlp_layernorm` as a norm of its own (the experts have no fused norm), yet the local
spec maps it all the same; here the local spec of MoE models keeps only the first mapping, so a
torch_dist checkpoint written by either spec loads into the other.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from qwen_pretrain.recipes.schema import ModelShape, Parallelism, Recipe, Training
from qwen_pretrain.training.parallel import megatron_parallel_sizes
from qwen_pretrain.training.run_settings import RunSettings, run_settings


def cpu_settings(recipe: Recipe) -> RunSettings:
    """The reference settings (local spec, fp32, unfused) used where none are given."""
    return run_settings(recipe, "cpu")


def transformer_config_kwargs(recipe: Recipe, settings: RunSettings | None = None) -> dict[str, Any]:
    """The keyword arguments of `recipe`'s `TransformerConfig`: model shape + parallel layout from
    the recipe, precision and fusions from `settings` (as `--print-config` shows them)."""
    import torch
    import torch.nn.functional as F

    settings = settings or cpu_settings(recipe)
    m, p = recipe.model, recipe.parallel
    chosen = dict(settings.transformer_config)
    for key in ("params_dtype", "pipeline_dtype"):
        chosen[key] = getattr(torch, chosen[key])
    if not m.is_moe:  # MoE-only fields stay at megatron-core's defaults for dense models
        chosen.pop("moe_grouped_gemm")
        chosen.pop("moe_permute_fusion")
    kwargs: dict[str, Any] = dict(
        num_layers=m.num_layers,
        hidden_size=m.hidden_size,
        num_attention_heads=m.num_attention_heads,
        num_query_groups=m.num_query_groups,
        kv_channels=m.head_dim,
        ffn_hidden_size=m.ffn_hidden_size,
        normalization="RMSNorm",
        layernorm_epsilon=m.rms_norm_eps,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=m.qkv_bias,
        qk_layernorm=m.qk_norm,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=0.02,
        **megatron_parallel_sizes(p),
        sequence_parallel=p.sequence_parallel,
        recompute_granularity=None if p.recompute == "none" else p.recompute,
        recompute_method="uniform" if p.recompute == "full" else None,
        recompute_num_layers=1 if p.recompute == "full" else None,
        **chosen,
    )
    if m.is_moe:
        kwargs.update(
            num_moe_experts=m.num_experts,
            moe_ffn_hidden_size=m.moe_ffn_hidden_size,
            moe_router_topk=m.moe_router_topk,
            moe_router_pre_softmax=not m.moe_norm_topk_prob,
            moe_router_score_function="softmax",
            moe_router_load_balancing_type="aux_loss",
            moe_aux_loss_coeff=m.moe_aux_loss_coeff,
            moe_token_dispatcher_type="alltoall",
        )
    return kwargs


def transformer_config(recipe: Recipe, settings: RunSettings | None = None) -> Any:
    """The megatron-core `TransformerConfig` for `recipe` under `settings` (default: CPU)."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    return TransformerConfig(**transformer_config_kwargs(recipe, settings))


def layer_spec(recipe: Recipe, spec: str = "local") -> Any:
    """megatron-core's Transformer Engine layer spec (`spec="te"`) or its local spec."""
    from megatron.core.models.gpt import gpt_layer_specs as specs

    m = recipe.model
    if spec == "te":
        return specs.get_gpt_layer_with_transformer_engine_spec(
            num_experts=m.num_experts, moe_grouped_gemm=m.is_moe, qk_layernorm=m.qk_norm
        )
    local = specs.get_gpt_layer_local_spec(
        num_experts=m.num_experts,
        moe_grouped_gemm=False,
        qk_layernorm=m.qk_norm,
        normalization="RMSNorm",
    )
    if m.is_moe:
        # TE's MoE layers keep `pre_mlp_layernorm` unfused: keep its name (see the module doc).
        keys_map = {k: v for k, v in local.submodules.sharded_state_dict_keys_map.items()
                    if not k.startswith("pre_mlp_layernorm")}
        local = dataclasses.replace(
            local, submodules=dataclasses.replace(local.submodules, sharded_state_dict_keys_map=keys_map)
        )
    return local


def build_model(
    recipe: Recipe,
    *,
    settings: RunSettings | None = None,
    pre_process: bool = True,
    post_process: bool = True,
    vp_stage: int | None = None,
    config: Any = None,
) -> Any:
    """One `GPTModel` (one pipeline stage / virtual chunk) for `recipe` under `settings`
    (default: the CPU reference settings).

    megatron-core's parallel state must be initialised (see `parallel.py`); on CPU call
    `cpu_support.enable_cpu_support()` first (`parallel.init_parallel` does).
    """
    from megatron.core.models.gpt import GPTModel

    m = recipe.model
    settings = settings or cpu_settings(recipe)
    config = config or transformer_config(recipe, settings)
    return GPTModel(
        config=config,
        transformer_layer_spec=layer_spec(recipe, settings.layer_spec),
        vocab_size=m.padded_vocab_size(recipe.parallel.tp),
        max_sequence_length=max(m.max_position_embeddings, recipe.training.seq_length),
        pre_process=pre_process,
        post_process=post_process,
        share_embeddings_and_output_weights=m.tie_embeddings,
        position_embedding_type="rope",
        rotary_percent=1.0,
        rotary_base=int(m.rope_theta),
        parallel_output=True,
        vp_stage=vp_stage,
    )


def tp1_recipe(shape: ModelShape) -> Recipe:
    """A one-process recipe around `shape`: every parallel size 1, fp32. Conversion and
    evaluation build their models from it; nothing else of it is read."""
    return Recipe(
        name=f"{shape.family}-tp1",
        description="one process, every parallel size 1",
        hf_name="",
        nemo_recipe=None,
        model=shape,
        gpus=1,
        parallel=Parallelism(),
        training=Training(global_batch_size=1, seq_length=1, precision="fp32"),
    )


def build_tp1_model(shape: ModelShape, *, meta: bool = False, device: str = "cpu") -> Any:
    """One TP=1 `GPTModel` of `shape` with every layer: local spec, fp32, on `device` ("cpu" or
    "cuda"), whatever this machine has (call `init_single_process(device=...)` first).

    The local spec on every host: its checkpoint keys are the TE spec's (see the module doc), it
    honours the meta device (TE layers pin their own), and it runs on CPU and GPU alike.
    `meta=True` builds it on the meta device without initialising weights: its sharded state
    dict names every global tensor and its shape without allocating any of them.
    """
    import torch

    recipe = tp1_recipe(shape)
    settings = run_settings(recipe, device, transformer_engine=False)
    if not meta:
        # .to(device): megatron-core allocates its own layers on the current CUDA device, but
        # the local spec's torch.nn.RMSNorm is created wherever torch's default device is.
        return build_model(recipe, settings=settings).to(device)
    config = transformer_config(recipe, settings)
    config.perform_initialization = False
    config.use_cpu_initialization = True
    with torch.device("meta"):
        return build_model(recipe, settings=settings, config=config)
