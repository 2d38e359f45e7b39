"""The recipe data model: plain frozen dataclasses, nothing else.

A recipe is read by every part of the repository (trainer, renderers, planner, converters),
so each fact appears here exactly once: the model's shape in `ModelShape`, the acceptance
table in `Acceptance`, the parallel layout in `Parallelism`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

# A model family's name ("qwen3", "qwen2", "qwen3_moe"): the key of its entry in
# `conversion/families.py`, which holds how the family's tensors convert. A new family is a
# recipe plus that one entry, so the name is not an enumeration here.
Family = str

# Qwen's end-of-document token. Qwen3's config.json eos (<|im_end|> = 151645) is a chat token
# and must not be used as EOD for pretraining.
QWEN_EOD_TOKEN_ID = 151643


@dataclass(frozen=True)
class ModelShape:
    """The public config.json facts of one architecture (Hugging Face names in comments)."""

    family: Family
    hf_architecture: str  # config.json "architectures"[0]
    hidden_size: int  # hidden_size
    num_layers: int  # num_hidden_layers
    num_attention_heads: int  # num_attention_heads
    num_query_groups: int  # num_key_value_heads
    head_dim: int  # head_dim (Megatron: kv_channels); may differ from hidden/heads
    ffn_hidden_size: int  # intermediate_size (dense MLP)
    vocab_size: int  # vocab_size (the embedding rows of the HF checkpoint)
    tie_embeddings: bool  # tie_word_embeddings
    qkv_bias: bool  # Qwen2/2.5: biases on q/k/v projections only
    qk_norm: bool  # Qwen3: RMSNorm on per-head queries and keys
    max_position_embeddings: int = 32768
    rope_theta: float = 1_000_000.0
    rms_norm_eps: float = 1e-6
    # Mixture of experts (Qwen3-MoE); all None/0 for dense models.
    num_experts: int | None = None  # num_experts
    moe_ffn_hidden_size: int | None = None  # moe_intermediate_size
    moe_router_topk: int = 0  # num_experts_per_tok
    moe_norm_topk_prob: bool = False  # norm_topk_prob
    moe_aux_loss_coeff: float = 0.0  # router_aux_loss_coef
    # Megatron pads the embedding to a multiple of this x TP (see `padded_vocab_size`).
    make_vocab_size_divisible_by: int = 128

    @property
    def is_moe(self) -> bool:
        return self.num_experts is not None

    def padded_vocab_size(self, tp: int = 1) -> int:
        """Megatron's rule: round vocab up to a multiple of make_vocab_size_divisible_by * TP."""
        multiple = self.make_vocab_size_divisible_by * tp
        return -(-self.vocab_size // multiple) * multiple


@dataclass(frozen=True)
class Parallelism:
    tp: int = 1  # tensor parallel
    pp: int = 1  # pipeline parallel
    vpp: int | None = None  # virtual pipeline stages per pipeline rank (interleaved 1F1B)
    cp: int = 1  # context parallel
    ep: int = 1  # expert parallel
    etp: int = 1  # expert tensor parallel
    sequence_parallel: bool = False
    micro_batch_size: int = 1
    use_distributed_optimizer: bool = True
    recompute: Literal["none", "selective", "full"] = "none"


@dataclass(frozen=True)
class Training:
    global_batch_size: int
    seq_length: int
    seed: int = 1234
    train_steps: int = 1000
    lr: float = 3e-4
    min_lr: float = 3e-5
    warmup_steps: int = 500
    lr_decay_style: Literal["cosine", "linear", "constant"] = "cosine"
    weight_decay: float = 0.1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    clip_grad: float = 1.0
    precision: Literal["bf16", "fp32"] = "bf16"
    eval_interval: int = 500
    eval_iters: int = 32


@dataclass(frozen=True)
class Data:
    # ((weight, path-prefix), ...) as Megatron's --data-path "w1 p1 w2 p2"; empty means mock data.
    blend: tuple[tuple[float, str], ...] = ()
    split: str = "99,1,0"  # train, valid, test
    tokenizer: str = "qwen"  # "qwen" (the official files) or a tokenizer directory
    eod_token_id: int = QWEN_EOD_TOKEN_ID
    reset_position_ids: bool = False
    reset_attention_mask: bool = False


@dataclass(frozen=True)
class Acceptance:
    """One row of the acceptance table: what a benchmark run must keep fixed."""

    gpus: int  # the baseline's GPU count; fewer is refused, more is allowed
    global_batch_size: int
    seq_length: int
    seed: int


@dataclass(frozen=True)
class Recipe:
    name: str
    description: str
    hf_name: str  # Hugging Face model id, for documentation and tokenizer choice
    nemo_recipe: str | None  # NeMo 2 `llm.<name>` module, None where NeMo has none
    model: ModelShape
    gpus: int  # GPUs the recipe is laid out for by default
    parallel: Parallelism
    training: Training
    data: Data = field(default_factory=Data)
    acceptance: Acceptance | None = None
    tiny: bool = False  # trains on CPU in seconds
    # Set when a user changed what the acceptance table fixes (global batch, seq length, seed);
    # every output that shows the recipe says so.
    off_benchmark: bool = False

    @property
    def model_parallel_size(self) -> int:
        return self.parallel.tp * self.parallel.pp * self.parallel.cp

    @property
    def data_parallel_size(self) -> int:
        """DP is derived: GPUs / (TP x PP x CP). Zero or fractional layouts fail validation."""
        return self.gpus // self.model_parallel_size

    @property
    def grad_accum_steps(self) -> int:
        dp = max(self.data_parallel_size, 1)
        return self.training.global_batch_size // (self.parallel.micro_batch_size * dp)

    @property
    def tokens_per_step(self) -> int:
        return self.training.global_batch_size * self.training.seq_length
