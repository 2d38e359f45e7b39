"""Qwen3-1.7B: dense, qk-norm, tied embeddings."""

from qwen_pretrain.recipes.schema import ModelShape, Parallelism, Recipe, Training

RECIPE = Recipe(
    name="qwen3_1p7b",
    description="Qwen3-1.7B dense (not in the acceptance table)",
    hf_name="Qwen/Qwen3-1.7B",
    nemo_recipe="qwen3_1p7b",
    model=ModelShape(
        family="qwen3",
        hf_architecture="Qwen3ForCausalLM",
        hidden_size=2048,
        num_layers=28,
        num_attention_heads=16,
        num_query_groups=8,
        head_dim=128,
        ffn_hidden_size=6144,
        vocab_size=151936,
        tie_embeddings=True,
        qkv_bias=False,
        qk_norm=True,
        max_position_embeddings=40960,
    ),
    gpus=8,
    parallel=Parallelism(micro_batch_size=1, recompute="selective"),
    training=Training(global_batch_size=128, seq_length=4096),
)
