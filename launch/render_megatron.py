"""A recipe as Megatron-LM `pretrain_gpt.py` arguments (also what MindSpeed-LLM's script takes).

Every model fact comes from the recipe: the Qwen specifics are qk-layernorm (Qwen3), explicit
kv-channels (head_dim may differ from hidden/heads), grouped-query attention, SwiGLU, RMSNorm,
RoPE base, untied embeddings, no linear biases except on q/k/v (Qwen2/2.5) and the MoE router.
The embedding rows are set with `--padded-vocab-size` from the recipe's padding rule, because
Megatron-LM would otherwise pad the tokenizer's length (151,669 for Qwen), not the checkpoint's
151,936 rows. Every flag emitted here is checked against the parser of a named Megatron-LM
release (`megatron_lm_flags.txt`, see `megatron_lm_flags.py`).
"""

from __future__ import annotations

from dataclasses import dataclass

from qwen_pretrain.recipes import Recipe

# pretrain_gpt.py's home inside NVIDIA's NeMo / PyTorch images.
DEFAULT_MEGATRON_LM_DIR = "/opt/megatron-lm"
# Every backend logs every step: the acceptance rule averages tokens/s over per-step lines and
# reads the loss at the final step, so a coarser cadence would lose the steps it judges.
LOG_INTERVAL = 1


@dataclass(frozen=True)
class DataSpec:
    """What a run trains on: a weighted blend of Megatron .bin/.idx prefixes, or mock data."""

    blend: tuple[tuple[float, str], ...] = ()
    split: str = "99,1,0"
    mock: bool = False
    tokenizer_dir: str | None = None  # a Hugging Face tokenizer directory

    def data_path_args(self) -> list[str]:
        """Megatron's `--data-path` value list: `W1 P1 W2 P2 ...` (weights in %g form)."""
        out: list[str] = []
        for weight, prefix in self.blend:
            out += [f"{weight:g}", prefix]
        return out


def _fmt(value: float) -> str:
    return f"{value:g}"


def megatron_lm_args(recipe: Recipe, data: DataSpec) -> list[str]:
    """The argument list of `pretrain_gpt.py` for this recipe (without the script itself)."""
    m, p, t = recipe.model, recipe.parallel, recipe.training
    a: list[str] = [
        # model shape
        "--num-layers", str(m.num_layers),
        "--hidden-size", str(m.hidden_size),
        "--ffn-hidden-size", str(m.ffn_hidden_size),
        "--num-attention-heads", str(m.num_attention_heads),
        "--group-query-attention",
        "--num-query-groups", str(m.num_query_groups),
        "--kv-channels", str(m.head_dim),
        "--max-position-embeddings", str(m.max_position_embeddings),
        "--position-embedding-type", "rope",
        "--rotary-base", str(int(m.rope_theta)),
        "--rotary-percent", "1.0",
        "--normalization", "RMSNorm",
        "--norm-epsilon", _fmt(m.rms_norm_eps),
        "--swiglu",
        "--disable-bias-linear",
        "--attention-dropout", "0.0",
        "--hidden-dropout", "0.0",
        "--make-vocab-size-divisible-by", str(m.make_vocab_size_divisible_by),
        "--padded-vocab-size", str(m.padded_vocab_size(p.tp)),
    ]
    if m.qkv_bias:
        a.append("--add-qkv-bias")
    if m.qk_norm:
        a.append("--qk-layernorm")
    if not m.tie_embeddings:
        a.append("--untie-embeddings-and-output-weights")
    if m.is_moe:
        a += [
            "--num-experts", str(m.num_experts),
            "--moe-ffn-hidden-size", str(m.moe_ffn_hidden_size),
            "--moe-router-topk", str(m.moe_router_topk),
            "--moe-router-load-balancing-type", "aux_loss",
            "--moe-aux-loss-coeff", _fmt(m.moe_aux_loss_coeff),
            "--moe-token-dispatcher-type", "alltoall",
            "--moe-grouped-gemm",
        ]
        # Megatron's default (top-k, then softmax over the chosen) is Qwen's norm_topk_prob=True;
        # softmax over all experts first leaves the top-k probabilities unnormalized.
        if not m.moe_norm_topk_prob:
            a.append("--moe-router-pre-softmax")

    # parallel layout
    a += [
        "--tensor-model-parallel-size", str(p.tp),
        "--pipeline-model-parallel-size", str(p.pp),
        "--context-parallel-size", str(p.cp),
    ]
    if p.vpp is not None and p.pp > 1:
        a += ["--num-layers-per-virtual-pipeline-stage", str(m.num_layers // (p.pp * p.vpp))]
    if p.sequence_parallel:
        a.append("--sequence-parallel")
    if m.is_moe:
        a += ["--expert-model-parallel-size", str(p.ep), "--expert-tensor-parallel-size", str(p.etp)]
    if p.use_distributed_optimizer:
        a.append("--use-distributed-optimizer")
    if p.recompute == "selective":
        a += ["--recompute-granularity", "selective"]
    elif p.recompute == "full":
        a += ["--recompute-granularity", "full", "--recompute-method", "uniform", "--recompute-num-layers", "1"]

    # batch, schedule, optimizer
    a += [
        "--micro-batch-size", str(p.micro_batch_size),
        "--global-batch-size", str(t.global_batch_size),
        "--seq-length", str(t.seq_length),
        "--seed", str(t.seed),
        "--train-iters", str(t.train_steps),
        "--lr", _fmt(t.lr),
        "--min-lr", _fmt(t.min_lr),
        "--lr-decay-style", t.lr_decay_style,
        "--lr-warmup-iters", str(t.warmup_steps),
        "--lr-decay-iters", str(t.train_steps),
        "--weight-decay", _fmt(t.weight_decay),
        "--adam-beta1", _fmt(t.adam_beta1),
        "--adam-beta2", _fmt(t.adam_beta2),
        "--adam-eps", _fmt(t.adam_eps),
        "--clip-grad", _fmt(t.clip_grad),
        "--eval-interval", str(t.eval_interval),
        "--eval-iters", str(t.eval_iters),
        "--log-interval", str(LOG_INTERVAL),
        "--log-throughput",
    ]
    if t.precision == "bf16":
        a.append("--bf16")

    # data and tokenizer
    if data.mock:
        a.append("--mock-data")
    else:
        a += ["--data-path", *data.data_path_args(), "--split", data.split]
    if recipe.data.reset_position_ids:
        a.append("--reset-position-ids")
    if recipe.data.reset_attention_mask:
        a.append("--reset-attention-mask")
    if data.tokenizer_dir:
        a += ["--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", data.tokenizer_dir]
    else:
        # Mock data needs no tokenizer files; the vocabulary size still comes from the recipe.
        a += ["--tokenizer-type", "NullTokenizer", "--vocab-size", str(m.vocab_size)]
    return a
