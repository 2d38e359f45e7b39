"""The Qwen families' Hugging Face <-> megatron-core mapping, as tables: the file to edit to add one.

A family is its recipe (`recipes/`, whose `ModelShape.family` names an entry here) plus one
`ModelFamily` in `FAMILIES`: the config.json architecture it converts and the `Rule`s of one
transformer layer. A rule pairs one megatron-core parameter (local layer spec names) with the
Hugging Face tensor(s) it is made of, their shapes in the model's sizes (`named_sizes`) and the
transform between them (`REPLICATED`, `QKV`, ...). The engine that applies the rules at any
TP/PP/EP layout is `conversion/mapping.py`; nothing there knows a family.

The families differ by the rule groups of their layers:

    qwen3       ATTENTION + QK_NORM + DENSE_MLP
    qwen2       ATTENTION + QKV_BIAS + DENSE_MLP     (Qwen2 and Qwen2.5)
    qwen3_moe   ATTENTION + QK_NORM + ROUTER, then EXPERTS[expert layout]

Every family also has `EMBEDDING`, `FINAL_NORM` and, unless embeddings are tied, `OUTPUT_LAYER`.
"""

from __future__ import annotations

from dataclasses import dataclass

from qwen_pretrain.conversion.layout import ExpertLayout
from qwen_pretrain.recipes.errors import UserError
from qwen_pretrain.recipes.schema import ModelShape

# Transform kinds, named by what they do to the HF tensor(s) on the way in.
REPLICATED = "replicated"  # same tensor on every TP rank (norms, router)
COLUMN = "column"  # split dim 0 over TP
ROW = "row"  # split dim 1 over TP
QKV = "qkv"  # [q; k; v] interleaved per query group, then split dim 0 over TP (weights and biases)
GATED = "gated"  # [gate_i; up_i] per TP rank
VOCAB = "vocab"  # padded to padded_vocab_size(tp) with zero rows, then split dim 0
GROUPED_FC1 = "grouped_fc1"  # legacy GroupedMLP weight1 from the local experts' gate/up
GROUPED_FC2 = "grouped_fc2"  # legacy GroupedMLP weight2 from the local experts' down


def named_sizes(shape: ModelShape) -> dict[str, int]:
    """The sizes the rules' `hf_shapes` are written in, for one model."""
    return {
        "hidden": shape.hidden_size,
        "head_dim": shape.head_dim,
        "q": shape.num_attention_heads * shape.head_dim,
        "kv": shape.num_query_groups * shape.head_dim,
        "ffn": shape.ffn_hidden_size,
        "vocab": shape.vocab_size,
        "experts": shape.num_experts or 0,
        "moe_ffn": shape.moe_ffn_hidden_size or 0,
    }


@dataclass(frozen=True)
class Rule:
    """One megatron-core parameter and the Hugging Face tensor(s) it is made of.

    Patterns use `{layer}` (global HF layer / local megatron layer) and `{expert}` (global HF
    expert / local megatron expert); `hf_shapes` gives each HF tensor's shape in `named_sizes`;
    `extra_state` names the module whose `_extra_state` megatron-core stores next to the
    parameter (None if it has none).
    """

    mcore: str
    hf: tuple[str, ...]
    kind: str
    hf_shapes: tuple[tuple[str, ...], ...]
    extra_state: str | None = None
    expert_tp: bool = False  # split over expert TP (etp) instead of TP


# ---------------------------------------------------------------- outside the layers

EMBEDDING = Rule("embedding.word_embeddings.weight", ("model.embed_tokens.weight",), VOCAB, (("vocab", "hidden"),))
FINAL_NORM = Rule("decoder.final_layernorm.weight", ("model.norm.weight",), REPLICATED, (("hidden",),))
OUTPUT_LAYER = Rule(
    "output_layer.weight", ("lm_head.weight",), VOCAB, (("vocab", "hidden"),), extra_state="output_layer"
)
# Tied embeddings under PP: the last stage's output_layer is a copy of the embedding.
TIED_OUTPUT_LAYER = Rule(
    "output_layer.weight", ("model.embed_tokens.weight",), VOCAB, (("vocab", "hidden"),), extra_state="output_layer"
)

# ---------------------------------------------------------------- one transformer layer, by part

ATTENTION = (
    Rule("input_layernorm.weight", ("input_layernorm.weight",), REPLICATED, (("hidden",),)),
    Rule(
        "self_attention.linear_qkv.weight",
        ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"),
        QKV,
        (("q", "hidden"), ("kv", "hidden"), ("kv", "hidden")),
        extra_state="self_attention.linear_qkv",
    ),
    Rule(
        "self_attention.linear_proj.weight",
        ("self_attn.o_proj.weight",),
        ROW,
        (("hidden", "q"),),
        extra_state="self_attention.linear_proj",
    ),
    Rule("pre_mlp_layernorm.weight", ("post_attention_layernorm.weight",), REPLICATED, (("hidden",),)),
)
QK_NORM = (
    Rule("self_attention.q_layernorm.weight", ("self_attn.q_norm.weight",), REPLICATED, (("head_dim",),)),
    Rule("self_attention.k_layernorm.weight", ("self_attn.k_norm.weight",), REPLICATED, (("head_dim",),)),
)
QKV_BIAS = (
    Rule(
        "self_attention.linear_qkv.bias",
        ("self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias"),
        QKV,
        (("q",), ("kv",), ("kv",)),
    ),
)
DENSE_MLP = (
    Rule(
        "mlp.linear_fc1.weight",
        ("mlp.gate_proj.weight", "mlp.up_proj.weight"),
        GATED,
        (("ffn", "hidden"), ("ffn", "hidden")),
        extra_state="mlp.linear_fc1",
    ),
    Rule("mlp.linear_fc2.weight", ("mlp.down_proj.weight",), ROW, (("hidden", "ffn"),), extra_state="mlp.linear_fc2"),
)
ROUTER = (Rule("mlp.router.weight", ("mlp.gate.weight",), REPLICATED, (("experts", "hidden"),)),)

# The experts of a MoE layer, in each of megatron-core's expert layouts.
_EXPERT_FC1_HF = ("mlp.experts.{expert}.gate_proj.weight", "mlp.experts.{expert}.up_proj.weight")
_EXPERT_FC1_SHAPES = (("moe_ffn", "hidden"), ("moe_ffn", "hidden"))
_EXPERT_FC2_HF = ("mlp.experts.{expert}.down_proj.weight",)
_EXPERT_FC2_SHAPES = (("hidden", "moe_ffn"),)
EXPERTS: dict[ExpertLayout, tuple[Rule, ...]] = {
    # SequentialMLP: one module per local expert
    "sequential": (
        Rule(
            "mlp.experts.local_experts.{expert}.linear_fc1.weight", _EXPERT_FC1_HF, GATED, _EXPERT_FC1_SHAPES,
            extra_state="mlp.experts.local_experts.{expert}.linear_fc1", expert_tp=True,
        ),
        Rule(
            "mlp.experts.local_experts.{expert}.linear_fc2.weight", _EXPERT_FC2_HF, ROW, _EXPERT_FC2_SHAPES,
            extra_state="mlp.experts.local_experts.{expert}.linear_fc2", expert_tp=True,
        ),
    ),
    # TEGroupedMLP: one weight per local expert in one module
    "te_grouped": (
        Rule(
            "mlp.experts.linear_fc1.weight{expert}", _EXPERT_FC1_HF, GATED, _EXPERT_FC1_SHAPES,
            extra_state="mlp.experts.linear_fc1", expert_tp=True,
        ),
        Rule(
            "mlp.experts.linear_fc2.weight{expert}", _EXPERT_FC2_HF, ROW, _EXPERT_FC2_SHAPES,
            extra_state="mlp.experts.linear_fc2", expert_tp=True,
        ),
    ),
    # GroupedMLP: one tensor holds every local expert, so the HF patterns are expanded over them
    # (weight1 = per-expert fc1^T stacked as [hidden, e * 2F], weight2 = fc2^T as [e * F, hidden]).
    "legacy_grouped": (
        Rule("mlp.experts.weight1", _EXPERT_FC1_HF, GROUPED_FC1, _EXPERT_FC1_SHAPES, expert_tp=True),
        Rule("mlp.experts.weight2", _EXPERT_FC2_HF, GROUPED_FC2, _EXPERT_FC2_SHAPES, expert_tp=True),
    ),
}  # fmt: skip

# ---------------------------------------------------------------- the families


@dataclass(frozen=True)
class ModelFamily:
    """One model family: the config.json it converts and the rules of one of its layers."""

    name: str  # ModelShape.family
    architecture: str  # config.json "architectures"[0]
    model_type: str  # config.json "model_type"
    layer: tuple[Rule, ...]  # one transformer layer, in Hugging Face order
    moe: bool = False  # each layer adds EXPERTS[expert layout]; config.json has the expert sizes

    @property
    def qkv_bias(self) -> bool:
        return all(rule in self.layer for rule in QKV_BIAS)

    @property
    def qk_norm(self) -> bool:
        return all(rule in self.layer for rule in QK_NORM)


FAMILIES = (
    ModelFamily("qwen3", "Qwen3ForCausalLM", "qwen3", ATTENTION + QK_NORM + DENSE_MLP),
    ModelFamily("qwen2", "Qwen2ForCausalLM", "qwen2", ATTENTION + QKV_BIAS + DENSE_MLP),
    ModelFamily("qwen3_moe", "Qwen3MoeForCausalLM", "qwen3_moe", ATTENTION + QK_NORM + ROUTER, moe=True),
)
ARCHITECTURES = {family.architecture: family for family in FAMILIES}

# Transformer Engine spec: the norms in front of linear_qkv / linear_fc1 are fused into them,
# except in MoE layers, which keep pre_mlp_layernorm (the experts' fc1 cannot fuse a norm).
TE_RENAMES = {
    "input_layernorm.weight": "self_attention.linear_qkv.layer_norm_weight",
    "pre_mlp_layernorm.weight": "mlp.linear_fc1.layer_norm_weight",
}
TE_UNFUSED_IN_MOE = ("pre_mlp_layernorm.weight",)
# TE modules that keep an `_extra_state` without a parameter of their own, after the parameter
# they follow in the state dict.
TE_EXTRA_STATE_AFTER = {"self_attention.linear_qkv.weight": ("self_attention.core_attention",)}

HF_LAYER_PREFIX = "model.layers.{layer}."
MCORE_LAYER_PREFIX = "decoder.layers.{layer}."


def family_named(name: str) -> ModelFamily:
    """The family a recipe's `ModelShape.family` names."""
    for family in FAMILIES:
        if family.name == name:
            return family
    known = ", ".join(family.name for family in FAMILIES)
    raise UserError(f"model family '{name}' has no conversion table: this converter handles {known}")
