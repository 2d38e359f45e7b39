"""Qwen3-30B-A3B: MoE, 128 experts, top-8, norm_topk_prob. Acceptance: 8 GPUs, GBS 32, seq 4096."""

from qwen_pretrain.recipes.schema import Acceptance, ModelShape, Parallelism, Recipe, Training

RECIPE = Recipe(
    name="qwen3_30b_a3b",
    description="Qwen3-30B-A3B mixture of experts, acceptance benchmark",
    hf_name="Qwen/Qwen3-30B-A3B",
    nemo_recipe="qwen3_30b_a3b",
    model=ModelShape(
        family="qwen3_moe",
        hf_architecture="Qwen3MoeForCausalLM",
        hidden_size=2048,
        num_layers=48,
        num_attention_heads=32,
        num_query_groups=4,
        head_dim=128,
        ffn_hidden_size=6144,  # config.json intermediate_size; unused (every layer is MoE)
        vocab_size=151936,
        tie_embeddings=False,
        qkv_bias=False,
        qk_norm=True,
        max_position_embeddings=40960,
        num_experts=128,
        moe_ffn_hidden_size=768,
        moe_router_topk=8,
        moe_norm_topk_prob=True,
        moe_aux_loss_coeff=1e-3,
    ),
    gpus=8,
    # NeMo 2's default layout (TP4/PP2/EP4); EP with TP needs sequence parallelism.
    parallel=Parallelism(tp=4, pp=2, ep=4, etp=1, sequence_parallel=True, recompute="selective"),
    training=Training(global_batch_size=32, seq_length=4096, seed=1234),
    acceptance=Acceptance(gpus=8, global_batch_size=32, seq_length=4096, seed=1234),
)
