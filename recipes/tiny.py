"""Tiny models that train on CPU in seconds and keep every code path of their family.

They use the real Qwen vocabulary so that the real tokenizer and preprocessed data work
unchanged; everything else is shrunk.
"""

from qwen_pretrain.recipes.schema import ModelShape, Parallelism, Recipe, Training

_TINY_TRAINING = Training(
    global_batch_size=8,
    seq_length=128,
    seed=1234,
    train_steps=40,
    lr=1e-3,
    min_lr=1e-4,
    warmup_steps=4,
    precision="fp32",
    eval_interval=20,
    eval_iters=2,
)

QWEN3_TINY = Recipe(
    name="qwen3_tiny",
    description="tiny Qwen3 dense: qk-norm, GQA, head_dim != hidden/heads, tied embeddings",
    hf_name="Qwen/Qwen3-0.6B",
    nemo_recipe=None,
    model=ModelShape(
        family="qwen3",
        hf_architecture="Qwen3ForCausalLM",
        hidden_size=64,
        num_layers=4,
        num_attention_heads=4,
        num_query_groups=2,
        head_dim=32,  # != 64 / 4: exercises explicit kv_channels
        ffn_hidden_size=160,
        vocab_size=151936,
        tie_embeddings=True,
        qkv_bias=False,
        qk_norm=True,
        max_position_embeddings=1024,
    ),
    gpus=2,
    parallel=Parallelism(tp=2, micro_batch_size=2),
    training=_TINY_TRAINING,
    tiny=True,
)

QWEN25_TINY = Recipe(
    name="qwen25_tiny",
    description="tiny Qwen2.5 dense: qkv bias, GQA, untied embeddings",
    hf_name="Qwen/Qwen2.5-7B",
    nemo_recipe=None,
    model=ModelShape(
        family="qwen2",
        hf_architecture="Qwen2ForCausalLM",
        hidden_size=64,
        num_layers=4,
        num_attention_heads=4,
        num_query_groups=2,
        head_dim=16,
        ffn_hidden_size=160,
        vocab_size=151936,
        tie_embeddings=False,
        qkv_bias=True,
        qk_norm=False,
        max_position_embeddings=1024,
    ),
    gpus=2,
    parallel=Parallelism(tp=2, micro_batch_size=2),
    training=_TINY_TRAINING,
    tiny=True,
)

QWEN3_MOE_TINY = Recipe(
    name="qwen3_moe_tiny",
    description="tiny Qwen3-MoE: router, top-k, norm_topk_prob, aux loss, qk-norm",
    hf_name="Qwen/Qwen3-30B-A3B",
    nemo_recipe=None,
    model=ModelShape(
        family="qwen3_moe",
        hf_architecture="Qwen3MoeForCausalLM",
        hidden_size=64,
        num_layers=4,
        num_attention_heads=4,
        num_query_groups=2,
        head_dim=32,
        ffn_hidden_size=160,
        vocab_size=151936,
        tie_embeddings=False,
        qkv_bias=False,
        qk_norm=True,
        max_position_embeddings=1024,
        num_experts=8,
        moe_ffn_hidden_size=32,
        moe_router_topk=2,
        moe_norm_topk_prob=True,
        moe_aux_loss_coeff=1e-3,
    ),
    gpus=2,
    parallel=Parallelism(ep=2, micro_batch_size=2),
    training=_TINY_TRAINING,
    tiny=True,
)
