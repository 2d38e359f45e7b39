"""Qwen2.5-7B: dense, qkv bias, untied. Acceptance: 8 GPUs, GBS 128, seq 8192."""

from qwen_pretrain.recipes.schema import Acceptance, ModelShape, Parallelism, Recipe, Training

RECIPE = Recipe(
    name="qwen25_7b",
    description="Qwen2.5-7B dense, acceptance benchmark",
    hf_name="Qwen/Qwen2.5-7B",
    nemo_recipe="qwen25_7b",
    model=ModelShape(
        family="qwen2",
        hf_architecture="Qwen2ForCausalLM",
        hidden_size=3584,
        num_layers=28,
        num_attention_heads=28,
        num_query_groups=4,
        head_dim=128,
        ffn_hidden_size=18944,
        vocab_size=152064,
        tie_embeddings=False,
        qkv_bias=True,
        qk_norm=False,
        max_position_embeddings=131072,
    ),
    gpus=8,
    parallel=Parallelism(tp=2, sequence_parallel=True, recompute="selective"),
    training=Training(global_batch_size=128, seq_length=8192, seed=1234),
    acceptance=Acceptance(gpus=8, global_batch_size=128, seq_length=8192, seed=1234),
)
