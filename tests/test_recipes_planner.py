"""Recipes and planner: published sizes, acceptance table, FLOPs, memory, suggestions."""

from __future__ import annotations

import dataclasses

import pytest
from qwen_pretrain.recipes import all_recipes, get_recipe, list_recipes, override, validate_layout
from qwen_pretrain.recipes.hardware import GPUS
from qwen_pretrain.recipes.planner import (
    flops_per_token,
    memory_estimate,
    param_counts,
    plan,
    ranking_cost_s,
    suggest,
)

# Published sizes (model cards): total and non-embedding parameters, in billions, with the
# precision the model card gives them.
PUBLISHED = {
    "qwen3_0p6b": (0.6, 0.44),
    "qwen3_1p7b": (1.7, 1.4),
    "qwen3_8b": (8.2, 6.95),
    "qwen25_7b": (7.61, 6.53),
    "qwen25_72b": (72.7, 70.0),
}


def _decimals(x: float) -> int:
    return len(repr(x).split(".")[1]) if "." in repr(x) else 0


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_parameter_counts_round_to_published_sizes(name: str) -> None:
    # Model cards round or truncate (Qwen2.5-7B has 7,615,616,512 parameters, its card says
    # 7.61B): agree within one unit of the card's last digit.
    total, non_embedding = PUBLISHED[name]
    counts = param_counts(get_recipe(name).model)
    assert abs(counts.total / 1e9 - total) < 10 ** -_decimals(total)
    if name == "qwen25_72b":
        # The card says 70.0B; leaving embedding and lm_head out gives 70.2B (0.3% off):
        # agree to the integer, as "70B".
        assert round(counts.non_embedding / 1e9) == 70
    else:
        assert abs(counts.non_embedding / 1e9 - non_embedding) < 10 ** -_decimals(non_embedding)


def test_moe_total_and_active_parameters() -> None:
    counts = param_counts(get_recipe("qwen3_30b_a3b").model)
    assert round(counts.total / 1e9, 1) == 30.5
    assert abs(counts.active / 1e9 - 3.3) < 0.1  # "A3B": the card says 3.3B activated (3.35B)
    assert counts.active < counts.total


def test_qwen2_72b_has_the_qwen25_72b_shape() -> None:
    a, b = get_recipe("qwen2_72b").model, get_recipe("qwen25_72b").model
    assert dataclasses.replace(a, hf_architecture="x") == dataclasses.replace(b, hf_architecture="x")


@pytest.mark.parametrize(
    "name,gpus,gbs,seq",
    [
        ("qwen3_8b", 8, 128, 8192),
        ("qwen25_7b", 8, 128, 8192),
        ("qwen3_30b_a3b", 8, 32, 4096),
        ("qwen25_72b", 32, 64, 8192),
        ("qwen2_72b", 32, 64, 8192),
    ],
)
def test_acceptance_table(name: str, gpus: int, gbs: int, seq: int) -> None:
    r = get_recipe(name)
    assert r.acceptance is not None
    assert (r.acceptance.gpus, r.acceptance.global_batch_size, r.acceptance.seq_length) == (gpus, gbs, seq)
    assert (r.gpus, r.training.global_batch_size, r.training.seq_length) == (gpus, gbs, seq)
    assert r.training.seed == r.acceptance.seed
    assert r.training.train_steps == 1000


@pytest.mark.parametrize("name", list_recipes())
def test_every_default_layout_is_valid(name: str) -> None:
    assert validate_layout(get_recipe(name)) == []


def test_tiny_recipes_keep_their_family_code_paths() -> None:
    q3, q25, moe = (get_recipe(n).model for n in ("qwen3_tiny", "qwen25_tiny", "qwen3_moe_tiny"))
    assert q3.qk_norm and q3.tie_embeddings and q3.num_query_groups < q3.num_attention_heads
    assert q3.head_dim != q3.hidden_size // q3.num_attention_heads
    assert q25.qkv_bias and not q25.tie_embeddings and not q25.qk_norm
    assert moe.is_moe and moe.moe_norm_topk_prob and 0 < moe.moe_router_topk < moe.num_experts
    assert all(get_recipe(n).tiny for n in ("qwen3_tiny", "qwen25_tiny", "qwen3_moe_tiny"))


def test_padded_vocab_follows_megatron_rule() -> None:
    m = get_recipe("qwen3_8b").model
    assert m.padded_vocab_size(1) == 151936  # already a multiple of 128
    assert m.padded_vocab_size(2) == 152064  # next multiple of 128 x 2
    assert m.padded_vocab_size(8) == 152576  # next multiple of 128 x 8
    assert get_recipe("qwen25_7b").model.padded_vocab_size(1) == 152064


def test_flops_per_token_matches_six_n_plus_attention() -> None:
    # Dense: Megatron's accounting equals 6 x (matmul params incl. logits) + 12 x layers x seq x q_dim.
    r = get_recipe("qwen3_8b")
    m, seq = r.model, 4096
    counts = param_counts(m, vocab_size=m.padded_vocab_size())
    matmul_params = counts.total - m.padded_vocab_size() * m.hidden_size  # input embedding is a lookup
    norms = m.num_layers * (2 * m.hidden_size + 2 * m.head_dim) + m.hidden_size
    expected = 6 * (matmul_params - norms) + 12 * m.num_layers * seq * m.num_attention_heads * m.head_dim
    assert flops_per_token(m, seq) == pytest.approx(expected, rel=1e-9)


def test_moe_flops_count_active_experts_only() -> None:
    m = get_recipe("qwen3_30b_a3b").model
    dense_equiv = 6 * param_counts(m).total
    assert flops_per_token(m, 4096) < dense_equiv / 4


def test_memory_estimate_responds_to_layout() -> None:
    r = get_recipe("qwen3_8b")
    base = memory_estimate(r)
    assert base.total_gb < GPUS["h100"].memory_gb  # the default layout fits an H100
    no_distopt = memory_estimate(override(r, use_distributed_optimizer=False))
    assert no_distopt.optimizer_gb == pytest.approx(base.optimizer_gb_without_distributed)
    assert no_distopt.optimizer_gb > base.optimizer_gb * 3
    assert base.activations_no_recompute_gb > base.activations_selective_recompute_gb > base.activations_full_recompute_gb
    tp4 = memory_estimate(override(r, tp=4))
    assert tp4.weights_gb == pytest.approx(base.weights_gb / 2, rel=0.01)


def test_plan_has_required_json_keys() -> None:
    result = plan(get_recipe("qwen3_30b_a3b"), GPUS["h100"], 0.4)
    for key in ("name", "gpus", "baseline_gpus", "parallel", "training", "params_total",
                "params_active", "params_non_embedding", "flops_per_token", "memory_gb_per_gpu"):
        assert key in result
    assert set(result["parallel"]) >= {"tp", "pp", "vpp", "cp", "ep", "dp", "mbs", "grad_accum"}
    assert set(result["training"]) >= {"global_batch_size", "seq_length", "seed", "train_steps"}
    assert result["parallel"]["dp"] * 4 * 2 == 8
    assert result["parallel"]["grad_accum"] == 32
    assert result["estimated_train_hours"] > 0


def test_suggest_returns_valid_fitting_layouts_ranked() -> None:
    found = suggest(get_recipe("qwen3_8b"), 16, 80.0)
    assert found
    for s in found:
        assert validate_layout(s.recipe) == []
        assert s.memory_gb <= 80.0 * 0.95
        assert s.recipe.gpus == 16 and not s.recipe.off_benchmark
    keys = [round(ranking_cost_s(s, GPUS["h100"]), 2) for s in found]
    assert keys == sorted(keys)
    # A 16-stage pipeline with 32 micro-batches idles ~47% of the time: it must not rank first.
    moe = suggest(get_recipe("qwen3_30b_a3b"), 16, 80.0, gpu=GPUS["h100"])
    assert moe and moe[0].bubble < 0.2


def test_suggest_finds_nothing_when_memory_is_too_small() -> None:
    assert suggest(get_recipe("qwen25_72b"), 32, 16.0) == []


def test_all_recipes_registered_once() -> None:
    names = [r.name for r in all_recipes()]
    assert names == list_recipes() and len(set(names)) == len(names) == 10
