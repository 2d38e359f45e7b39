"""Qwen2-72B: dense, qkv bias, untied. Acceptance: 32 GPUs, GBS 64, seq 8192."""

from qwen_pretrain.recipes.schema import Acceptance, ModelShape, Parallelism, Recipe, Training

RECIPE = Recipe(
    name="qwen2_72b",
    description="Qwen2-72B dense, acceptance benchmark",
    hf_name="Qwen/Qwen2-72B",
    nemo_recipe="qwen2_72b",
    model=ModelShape(
        family="qwen2",
        hf_architecture="Qwen2ForCausalLM",
        hidden_size=8192,
        num_layers=80,
        num_attention_heads=64,
        num_query_groups=8,
        head_dim=128,
        ffn_hidden_size=29568,
        vocab_size=152064,
        tie_embeddings=False,
        qkv_bias=True,
        qk_norm=False,
        max_position_embeddings=131072,
        rms_norm_eps=1e-5,  # base checkpoint config.json; the -Instruct one says 1e-6
    ),
    gpus=32,
    # NeMo 2's default TP8/PP4; VPP 5 (4 layers per virtual stage) shrinks the pipeline bubble.
    parallel=Parallelism(tp=8, pp=4, vpp=5, sequence_parallel=True, recompute="selective"),
    training=Training(global_batch_size=64, seq_length=8192, seed=1234),
    acceptance=Acceptance(gpus=32, global_batch_size=64, seq_length=8192, seed=1234),
)
