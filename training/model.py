"""A recipe becomes a megatron-core `GPTModel` (Qwen3 dense, Qwen2/2.5, Qwen3-MoE).

    from qwen_pretrain.training.parallel import init_single_process
    from qwen_pretrain.training.model import build_model, build_tp1_model

    init_single_process()                # world size 1, gloo, parallel_state, seeded RNG
    model = build_model(recipe)          # a recipe whose parallel sizes are all 1
    model = build_tp1_model(shape)       # or a bare model shape (conversion, evaluation)

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
  load balancing with the recipe's coefficient, the alltoall dispatcher, and grouped GEMM only
  where Transformer Engine runs (GPU).
- The embedding and output layer have `recipe.model.padded_vocab_size(tp)` rows (Megatron's
  make-vocab-size-divisible-by x TP rule). Rows past the real vocabulary are extra logits;
  the logits of real tokens are the same dot products as without them.
"""

from __future__ import annotations

from typing import Any

from qwen_pretrain.recipes.schema import ModelShape, Parallelism, Recipe, Training
from qwen_pretrain.training.parallel import megatron_parallel_sizes


def transformer_engine_available() -> bool:
    """True where Transformer Engine imports (GPU machines, NGC images); never on CPU."""
    import torch

    if not torch.cuda.is_available():
        return False
    try:
        import transformer_engine  # noqa: F401
    except Exception:  # ImportError, or OSError from a missing CUDA library
        return False
    return True


def use_bf16(recipe: Recipe) -> bool:
    """bf16 on GPU when the recipe asks for it; CPU always trains in fp32."""
    import torch

    return recipe.training.precision == "bf16" and torch.cuda.is_available()


def transformer_config(recipe: Recipe) -> Any:
    """The megatron-core `TransformerConfig` for `recipe` (model shape + parallel layout)."""
    import torch
    import torch.nn.functional as F
    from megatron.core.transformer.transformer_config import TransformerConfig

    m, p = recipe.model, recipe.parallel
    bf16 = use_bf16(recipe)
    on_gpu = torch.cuda.is_available()
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
        bf16=bf16,
        params_dtype=torch.bfloat16 if bf16 else torch.float32,
        pipeline_dtype=torch.bfloat16 if bf16 else torch.float32,
        # Fusions need CUDA kernels; on CPU the unfused paths are the reference ones.
        apply_rope_fusion=False,
        bias_activation_fusion=False,
        masked_softmax_fusion=on_gpu,
        gradient_accumulation_fusion=False,
        persist_layer_norm=False,
        recompute_granularity=None if p.recompute == "none" else p.recompute,
        recompute_method="uniform" if p.recompute == "full" else None,
        recompute_num_layers=1 if p.recompute == "full" else None,
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
            moe_grouped_gemm=transformer_engine_available(),
        )
    return TransformerConfig(**kwargs)


def layer_spec(recipe: Recipe) -> Any:
    """Transformer Engine layer spec where TE imports, megatron-core's local spec otherwise."""
    from megatron.core.models.gpt import gpt_layer_specs as specs

    m = recipe.model
    if transformer_engine_available():
        return specs.get_gpt_layer_with_transformer_engine_spec(
            num_experts=m.num_experts, moe_grouped_gemm=m.is_moe, qk_layernorm=m.qk_norm
        )
    return specs.get_gpt_layer_local_spec(
        num_experts=m.num_experts,
        moe_grouped_gemm=False,
        qk_layernorm=m.qk_norm,
        normalization="RMSNorm",
    )


def build_model(
    recipe: Recipe,
    *,
    pre_process: bool = True,
    post_process: bool = True,
    vp_stage: int | None = None,
    config: Any = None,
) -> Any:
    """One `GPTModel` (one pipeline stage / virtual chunk) for `recipe`.

    megatron-core's parallel state must be initialised (see `parallel.py`); on CPU call
    `cpu_support.enable_cpu_support()` first (`parallel.init_parallel` does).
    """
    from megatron.core.models.gpt import GPTModel

    m = recipe.model
    config = config or transformer_config(recipe)
    return GPTModel(
        config=config,
        transformer_layer_spec=layer_spec(recipe),
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


def build_tp1_model(shape: ModelShape, *, meta: bool = False) -> Any:
    """One TP=1 `GPTModel` of `shape` with every layer (fp32; call `init_single_process` first).

    `meta=True` builds it on the meta device without initialising weights: its sharded state
    dict names every global tensor and its shape without allocating any of them.
    """
    recipe = tp1_recipe(shape)
    if not meta:
        return build_model(recipe)
    import torch

    config = transformer_config(recipe)
    config.perform_initialization = False
    config.use_cpu_initialization = True
    with torch.device("meta"):
        return build_model(recipe, config=config)
