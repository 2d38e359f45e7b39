"""Qwen3-8B: dense, qk-norm, untied embeddings. Acceptance: 8 GPUs, GBS 128, seq 8192."""

from qwen_pretrain.recipes.schema import Acceptance, ModelShape, Parallelism, Recipe, Training

RECIPE = Recipe(
    name="qwen3_8b",
    description="Qwen3-8B dense, acceptance benchmark",
    hf_name="Qwen/Qwen3-8B",
    nemo_recipe="qwen3_8b",
    model=ModelShape(
        family="qwen3",
        hf_architecture="Qwen3ForCausalLM",
        hidden_size=4096,
        num_layers=36,
        num_attention_heads=32,
        num_query_groups=8,
        head_dim=128,
        ffn_hidden_size=12288,
        vocab_size=151936,
        tie_embeddings=False,
        qkv_bias=False,
        qk_norm=True,
        max_position_embeddings=40960,
    ),
    gpus=8,
    # TP2 + SP with selective recompute keeps seq 8192 inside 80 GB (see `recipes show`).
    parallel=Parallelism(tp=2, sequence_parallel=True, recompute="selective"),
    training=Training(global_batch_size=128, seq_length=8192, seed=1234),
    acceptance=Acceptance(gpus=8, global_batch_size=128, seq_length=8192, seed=1234),
)
