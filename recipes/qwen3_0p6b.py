"""Qwen3-0.6B: dense, qk-norm, tied embeddings, head_dim 128 != hidden/heads (64)."""

from qwen_pretrain.recipes.schema import ModelShape, Parallelism, Recipe, Training

RECIPE = Recipe(
    name="qwen3_0p6b",
    description="Qwen3-0.6B dense (not in the acceptance table)",
    hf_name="Qwen/Qwen3-0.6B",
    nemo_recipe="qwen3_600m",
    model=ModelShape(
        family="qwen3",
        hf_architecture="Qwen3ForCausalLM",
        hidden_size=1024,
        num_layers=28,
        num_attention_heads=16,
        num_query_groups=8,
        head_dim=128,
        ffn_hidden_size=3072,
        vocab_size=151936,
        tie_embeddings=True,
        qkv_bias=False,
        qk_norm=True,
        max_position_embeddings=40960,
    ),
    gpus=8,
    parallel=Parallelism(micro_batch_size=2, recompute="selective"),
    training=Training(global_batch_size=128, seq_length=4096),
)
