"""The planner: parameter counts, training FLOPs, per-GPU memory, time to train, layout search.

Everything here is an estimate computed from the recipe alone (no GPU, no framework), meant to
reject layouts that cannot fit and to rank the ones that can. The formulas and their sources are
written next to the code that applies them.
"""

from __future__ import annotations

import itertools
from dataclasses import asdict, dataclass

from qwen_pretrain.recipes.hardware import GpuSpec
from qwen_pretrain.recipes.overrides import override
from qwen_pretrain.recipes.schema import ModelShape, Recipe
from qwen_pretrain.recipes.validate import divisors, validate_layout

GB = 1e9


@dataclass(frozen=True)
class ParamCounts:
    total: int
    active: int  # parameters touched per token (routed experts: top-k of them); = total when dense
    non_embedding: int  # total minus input embedding and (untied) output layer
    embedding: int  # input embedding + untied output layer
    per_layer_dense: int  # attention + norms (+ dense MLP, or router for MoE) of one layer
    per_layer_experts: int  # all routed experts of one layer (0 when dense)


def param_counts(model: ModelShape, vocab_size: int | None = None) -> ParamCounts:
    """Exact parameter count of the architecture (HF layout; `vocab_size` defaults to unpadded)."""
    h, d = model.hidden_size, model.head_dim
    q_out, kv_out = model.num_attention_heads * d, model.num_query_groups * d
    attention = h * q_out + 2 * h * kv_out + q_out * h
    if model.qkv_bias:
        attention += q_out + 2 * kv_out
    if model.qk_norm:
        attention += 2 * d  # one RMSNorm weight of head_dim each for queries and keys
    norms = 2 * h  # input_layernorm + post_attention_layernorm
    if model.is_moe:
        assert model.num_experts is not None and model.moe_ffn_hidden_size is not None
        one_expert = 3 * h * model.moe_ffn_hidden_size  # gate, up, down (SwiGLU)
        dense = attention + norms + h * model.num_experts  # router
        experts = model.num_experts * one_expert
        active_experts = model.moe_router_topk * one_expert
    else:
        dense = attention + norms + 3 * h * model.ffn_hidden_size
        experts = active_experts = 0
    vocab = model.vocab_size if vocab_size is None else vocab_size
    embedding = vocab * h * (1 if model.tie_embeddings else 2)
    layers = model.num_layers
    final_norm = h
    total = layers * (dense + experts) + embedding + final_norm
    active = layers * (dense + active_experts) + embedding + final_norm
    return ParamCounts(
        total=total,
        active=active,
        non_embedding=total - embedding,
        embedding=embedding,
        per_layer_dense=dense,
        per_layer_experts=experts,
    )


def flops_per_token(model: ModelShape, seq_length: int, vocab_size: int | None = None) -> float:
    """Training FLOPs per token (forward + backward), Megatron-LM's accounting.

    This is `num_floating_point_operations` of Megatron-LM (megatron/training/training.py),
    divided by batch x seq; it follows Narayanan et al. 2021, "Efficient Large-Scale Language
    Model Training on GPU Clusters Using Megatron-LM", appendix "Floating-point operations":
    12 = 3 (forward, backward-data, backward-weight) x 2 (two GEMMs per block) x 2 (multiply-add),
    with GQA key/value projections, SwiGLU (x 3/2), routed experts (x top-k) and the logit layer.
    Attention scores are counted for the full (non-causal) s x s matrix, as Megatron does.
    """
    h, layers = model.hidden_size, model.num_layers
    q_ratio = model.num_attention_heads * model.head_dim / h
    kv_ratio = model.num_query_groups / model.num_attention_heads
    if model.is_moe:
        assert model.moe_ffn_hidden_size is not None
        mlp = model.moe_ffn_hidden_size / h * model.moe_router_topk * 1.5
    else:
        mlp = model.ffn_hidden_size / h * 1.5
    vocab = model.padded_vocab_size() if vocab_size is None else vocab_size
    per_token = (
        12 * layers * h * h
        * ((1 + kv_ratio + seq_length / h) * q_ratio + mlp + vocab / (2 * layers * h))
    )
    return float(per_token)


@dataclass(frozen=True)
class MemoryEstimate:
    """Per-GPU memory of the most loaded pipeline stage, in GB (10^9 bytes)."""

    weights_gb: float
    gradients_gb: float
    optimizer_gb: float
    optimizer_gb_without_distributed: float
    activations_gb: float  # with the recipe's recompute setting
    activations_no_recompute_gb: float
    activations_selective_recompute_gb: float
    activations_full_recompute_gb: float
    overhead_gb: float
    total_gb: float


# CUDA context, NCCL buffers and allocator fragmentation: a fixed allowance.
OVERHEAD_GB = 3.0


def _stage_params(recipe: Recipe) -> tuple[float, float]:
    """(non-expert, expert) parameters held by one GPU of the heaviest pipeline stage."""
    m, p = recipe.model, recipe.parallel
    counts = param_counts(m, vocab_size=m.padded_vocab_size(p.tp))
    layers = m.num_layers / p.pp
    embedding = m.padded_vocab_size(p.tp) * m.hidden_size
    if p.pp == 1:
        stage = layers * counts.per_layer_dense + counts.embedding + m.hidden_size
    else:
        # The last stage holds the output layer (a copy of the embedding when tied) + final norm.
        stage = layers * counts.per_layer_dense + embedding + m.hidden_size
    experts = layers * counts.per_layer_experts / (p.ep * p.etp)
    return stage / p.tp, experts


def _activation_bytes_per_layer(recipe: Recipe, mode: str) -> float:
    """Activation bytes one transformer layer keeps for backward, per micro-batch.

    After Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer
    Models", adapted to GQA, SwiGLU and MoE: count every tensor saved for backward. Sequence
    parallelism splits the norm/residual tensors over TP; selective recompute drops the s x s
    attention tensors; full recompute keeps only the layer input.
    """
    m, p, t = recipe.model, recipe.parallel, recipe.training
    s = t.seq_length / p.cp
    b = p.micro_batch_size
    tp = p.tp
    sp_div = tp if p.sequence_parallel else 1
    elt = 2 if t.precision == "bf16" else 4
    h, d = m.hidden_size, m.head_dim
    q_out, kv_out = m.num_attention_heads * d, m.num_query_groups * d
    if mode == "full":
        return s * b * h / sp_div * elt
    tokens = s * b
    saved = 2 * tokens * h / sp_div  # inputs of the two RMSNorms
    saved += tokens * h / sp_div  # QKV GEMM input
    saved += tokens * (q_out + 2 * kv_out) / tp  # queries, keys, values
    saved += tokens * q_out / tp  # attention context (output-projection input)
    if mode == "none":
        saved += m.num_attention_heads / tp * s * s * b  # softmax probabilities
    if m.is_moe:
        assert m.moe_ffn_hidden_size is not None
        fe = m.moe_ffn_hidden_size / p.etp
        routed = tokens / sp_div * m.moe_router_topk  # token copies this rank computes on average
        saved += tokens * h / sp_div  # router input
        saved += routed * (h + 2 * fe + fe)  # expert fc1 input, fc1 output (gate, up), fc2 input
    else:
        f = m.ffn_hidden_size / tp
        saved += tokens * h / sp_div + tokens * (2 * f + f)  # fc1 input, fc1 out, fc2 input
    return saved * elt


def memory_estimate(recipe: Recipe) -> MemoryEstimate:
    """Per-GPU memory of weights, gradients, optimizer state and activations.

    Mixed precision as Megatron runs it: bf16 weights (2 bytes), fp32 main gradients (4 bytes),
    fp32 master weights + Adam moments (12 bytes), the latter sharded over data parallel ranks
    (expert-data-parallel ranks for expert weights) by the distributed optimizer. In fp32: 4 + 4
    + 8 bytes. Activations: the first pipeline stage keeps min(PP, micro-batches) micro-batches
    in flight under 1F1B, times (1 + (PP-1)/(PP x VPP)) with interleaving (Narayanan et al.
    2021); the last stage also keeps the logits (bf16 + fp32 for the loss).
    """
    m, p, t = recipe.model, recipe.parallel, recipe.training
    dense, experts = _stage_params(recipe)
    bf16 = t.precision == "bf16"
    w_bytes, g_bytes, o_bytes = (2, 4, 12) if bf16 else (4, 4, 8)
    dp = max(recipe.data_parallel_size, 1)
    expert_dp = max(recipe.gpus // (p.etp * p.ep * p.pp), 1)
    opt_dense, opt_expert = o_bytes * dense, o_bytes * experts
    optimizer_plain = opt_dense + opt_expert
    optimizer = opt_dense / dp + opt_expert / expert_dp if p.use_distributed_optimizer else optimizer_plain

    layers = m.num_layers / p.pp
    micro_batches = max(recipe.grad_accum_steps, 1)
    in_flight = min(p.pp, micro_batches)
    if p.vpp:
        in_flight *= 1 + (p.pp - 1) / (p.pp * p.vpp)
    logits = (
        p.micro_batch_size * recipe.training.seq_length / p.cp
        * m.padded_vocab_size(p.tp) / p.tp * (6 if bf16 else 4)
    )

    def activations(mode: str) -> float:
        per_layer = _activation_bytes_per_layer(recipe, mode)
        if mode == "full":  # plus one layer's full activations while it is recomputed
            first = layers * per_layer * in_flight + _activation_bytes_per_layer(recipe, "selective")
            last = layers * per_layer + _activation_bytes_per_layer(recipe, "selective") + logits
        else:
            first = layers * per_layer * in_flight
            last = layers * per_layer + logits
        return max(first, last) if p.pp > 1 else first + logits

    acts = {mode: activations(mode) / GB for mode in ("none", "selective", "full")}
    weights = (dense + experts) * w_bytes / GB
    grads = (dense + experts) * g_bytes / GB
    total = weights + grads + optimizer / GB + acts[p.recompute] + OVERHEAD_GB
    return MemoryEstimate(
        weights_gb=weights,
        gradients_gb=grads,
        optimizer_gb=optimizer / GB,
        optimizer_gb_without_distributed=optimizer_plain / GB,
        activations_gb=acts[p.recompute],
        activations_no_recompute_gb=acts["none"],
        activations_selective_recompute_gb=acts["selective"],
        activations_full_recompute_gb=acts["full"],
        overhead_gb=OVERHEAD_GB,
        total_gb=total,
    )


def communication_gb_per_step(recipe: Recipe) -> float:
    """Bytes one GPU sends per optimizer step, in GB: a ranking aid, not a network model.

    TP: 4 all-gather/reduce-scatter (or 2 all-reduce) of s x b x h per layer, forward and
    backward; CP: keys/values to CP-1 peers (x3 for backward); PP: one activation per
    micro-batch and model chunk, each way; DP: reduce-scatter of fp32 gradients + all-gather of
    bf16 weights; EP: all-to-all dispatch and combine of top-k token copies, each way.
    """
    m, p, t = recipe.model, recipe.parallel, recipe.training
    s, b, h = t.seq_length / p.cp, p.micro_batch_size, m.hidden_size
    micro = max(recipe.grad_accum_steps, 1)
    layers = m.num_layers / p.pp
    sp_div = p.tp if p.sequence_parallel else 1
    total = 0.0
    if p.tp > 1:
        total += 8 * s * b * h * 2 * (p.tp - 1) / p.tp * layers * micro
    if p.cp > 1:
        kv = s * b * 2 * m.num_query_groups * m.head_dim / p.tp * 2
        total += 3 * kv * (p.cp - 1) * layers * micro
    if p.pp > 1:
        total += 2 * s * b * h / sp_div * 2 * (p.vpp or 1) * micro
    dense, experts = _stage_params(recipe)
    dp = max(recipe.data_parallel_size, 1)
    expert_dp = max(recipe.gpus // (p.etp * p.ep * p.pp), 1)
    total += 6 * dense * (dp - 1) / dp + 6 * experts * (expert_dp - 1) / expert_dp
    if m.is_moe and p.ep > 1:
        routed = s * b / sp_div * m.moe_router_topk
        total += 4 * routed * h * 2 * (p.ep - 1) / p.ep * layers * micro
    return total / GB


def train_time_hours(recipe: Recipe, gpu: GpuSpec, mfu: float) -> float:
    """Hours to train the recipe's tokens at a given MFU: tokens x FLOPs/token / (GPUs x peak x MFU)."""
    tokens = recipe.training.train_steps * recipe.tokens_per_step
    fpt = flops_per_token(recipe.model, recipe.training.seq_length, recipe.model.padded_vocab_size(recipe.parallel.tp))
    return tokens * fpt / (recipe.gpus * gpu.peak_bf16_tflops * 1e12 * mfu) / 3600


def plan(recipe: Recipe, gpu: GpuSpec, mfu: float) -> dict:
    """The resolved recipe and every estimate, as one JSON-ready object."""
    m, p, t = recipe.model, recipe.parallel, recipe.training
    counts = param_counts(m)
    fpt = flops_per_token(m, t.seq_length, m.padded_vocab_size(p.tp))
    mem = memory_estimate(recipe)
    tokens_per_sec_per_gpu = mfu * gpu.peak_bf16_tflops * 1e12 / fpt
    return {
        "name": recipe.name,
        "description": recipe.description,
        "off_benchmark": recipe.off_benchmark,
        "gpus": recipe.gpus,
        "baseline_gpus": recipe.acceptance.gpus if recipe.acceptance else None,
        "acceptance": asdict(recipe.acceptance) if recipe.acceptance else None,
        "model": asdict(m) | {"padded_vocab_size": m.padded_vocab_size(p.tp)},
        "parallel": {
            "tp": p.tp, "pp": p.pp, "vpp": p.vpp, "cp": p.cp, "ep": p.ep, "etp": p.etp,
            "dp": recipe.data_parallel_size, "sequence_parallel": p.sequence_parallel,
            "mbs": p.micro_batch_size, "grad_accum": recipe.grad_accum_steps,
            "use_distributed_optimizer": p.use_distributed_optimizer, "recompute": p.recompute,
        },
        "training": asdict(t),
        "data": asdict(recipe.data),
        "params_total": counts.total,
        "params_active": counts.active,
        "params_non_embedding": counts.non_embedding,
        "flops_per_token": fpt,
        "memory_gb_per_gpu": round(mem.total_gb, 2),
        "memory": {k: round(v, 2) for k, v in asdict(mem).items()},
        "gpu": asdict(gpu),
        "mfu": mfu,
        "estimated_tokens_per_sec_per_gpu": tokens_per_sec_per_gpu,
        "estimated_step_time_s": recipe.tokens_per_step / (tokens_per_sec_per_gpu * recipe.gpus),
        "estimated_train_hours": train_time_hours(recipe, gpu, mfu),
        "communication_gb_per_step": round(communication_gb_per_step(recipe), 2),
    }


def pipeline_bubble(recipe: Recipe) -> float:
    """Idle fraction of a 1F1B pipeline: (PP - 1) / (VPP x micro-batches) (Narayanan et al. 2021)."""
    p = recipe.parallel
    return (p.pp - 1) / ((p.vpp or 1) * max(recipe.grad_accum_steps, 1))


@dataclass(frozen=True)
class Suggestion:
    recipe: Recipe
    memory_gb: float
    headroom_gb: float
    communication_gb: float
    bubble: float


# Effective per-GPU bandwidth used to turn traffic into time when ranking layouts: between
# NVLink (~450 GB/s) and InfiniBand (~50 GB/s per GPU); only the ranking depends on it.
RANKING_BANDWIDTH_GB_S = 100.0
RANKING_MFU = 0.5


def ranking_cost_s(s: Suggestion, gpu: GpuSpec) -> float:
    """Seconds a step loses to communication plus the pipeline bubble's idle compute."""
    r = s.recipe
    fpt = flops_per_token(r.model, r.training.seq_length, r.model.padded_vocab_size(r.parallel.tp))
    compute_s = r.tokens_per_step / r.gpus * fpt / (gpu.peak_bf16_tflops * 1e12 * RANKING_MFU)
    return s.communication_gb / RANKING_BANDWIDTH_GB_S + compute_s * s.bubble


def suggest(
    recipe: Recipe,
    gpus: int,
    gpu_mem_gb: float,
    gpu: GpuSpec | None = None,
    gpus_per_node: int = 8,
    limit: int = 10,
) -> list[Suggestion]:
    """Valid layouts on `gpus` GPUs that fit in `gpu_mem_gb`, least communication first.

    Searches TP (within a node), PP, VPP, CP, EP and micro batch; sequence parallelism is on
    whenever TP > 1; recompute, global batch, seq length and seed stay the recipe's. Layouts
    that leave under 5% of memory free are left out (the estimate is not that precise). Ranking:
    `ranking_cost_s` (communication volume at an assumed bandwidth plus the pipeline bubble's
    idle compute), then the larger memory headroom.
    """
    m, t = recipe.model, recipe.training
    tps = [d for d in divisors(m.num_query_groups) if d <= gpus_per_node and m.num_attention_heads % d == 0]
    pps = [d for d in divisors(m.num_layers) if d <= gpus]
    cps = [c for c in (1, 2, 4, 8) if t.seq_length % (2 * c) == 0 or c == 1]
    eps = [d for d in divisors(m.num_experts) if d <= gpus] if m.is_moe and m.num_experts else [1]
    found: list[Suggestion] = []
    for tp, pp, cp, ep, mbs in itertools.product(tps, pps, cps, eps, (1, 2, 4)):
        if tp * pp * cp > gpus or gpus % (tp * pp * cp):
            continue
        vpps: list[int | None] = [None]
        if pp > 1:
            vpps += [v for v in divisors(m.num_layers // pp) if 1 < v <= 8]
        for vpp in vpps:
            candidate = override(
                recipe, gpus=gpus, tp=tp, pp=pp, vpp=vpp or 0, cp=cp, ep=ep, mbs=mbs,
                sequence_parallel=tp > 1, off_benchmark=True,
            )
            if validate_layout(candidate):
                continue
            mem = memory_estimate(candidate).total_gb
            headroom = gpu_mem_gb - mem
            if headroom < 0.05 * gpu_mem_gb:
                continue
            found.append(Suggestion(
                candidate, mem, headroom, communication_gb_per_step(candidate), pipeline_bubble(candidate)
            ))
    spec = gpu or GpuSpec("h100", 989.0, gpu_mem_gb)
    found.sort(key=lambda s: (round(ranking_cost_s(s, spec), 2), -s.headroom_gb))
    return found[:limit]
