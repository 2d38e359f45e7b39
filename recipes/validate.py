"""The layout validator: every rule megatron-core would enforce later, checked up front.

Each broken rule gives one line: `[rule-name] what is wrong; nearest valid values`. The rules
mirror megatron-core 0.16 (`parallel_state.initialize_model_parallel`, `TransformerConfig`,
the interleaved schedule) so a layout that passes here does not die minutes into a job.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from qwen_pretrain.recipes.errors import LayoutError
from qwen_pretrain.recipes.schema import ModelShape, Recipe

# How a message names a parallel size: ("tp", 3) -> "TP=3", ("tp", None) -> "TP".
SizeName = Callable[[str, int | None], str]


@dataclass(frozen=True)
class BrokenRule:
    rule: str  # e.g. "tp-divides-heads"
    message: str  # what is wrong and the nearest valid values, one line


def recipe_size(size: str, value: int | None) -> str:
    """A recipe's size as the layout report names it (`TP=3`): it may come from the recipe itself."""
    return size.upper() if value is None else f"{size.upper()}={value}"


def option_size(size: str, value: int | None) -> str:
    """A size as the command-line option that set it (`--tp 3`), for commands whose sizes are options."""
    return f"--{size}" if value is None else f"--{size} {value}"


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0] if n > 0 else []


def nearest(value: int, candidates: list[int]) -> str:
    """'2 or 4' for value 3 among [1, 2, 4, 8]; the single closest when one side is empty."""
    below = [c for c in candidates if c < value]
    above = [c for c in candidates if c > value]
    picks = ([max(below)] if below else []) + ([min(above)] if above else [])
    return " or ".join(str(p) for p in picks) if picks else "none"


# Every rule, in the order a report lists the broken ones.
RULES = (
    "positive-sizes", "tp-divides-heads", "tp-divides-ffn", "sp-needs-tp", "layers-divide-pp-vpp",
    "vpp-needs-pp", "world-size", "ep-divides-experts", "expert-world-size", "etp-divides-expert-ffn",
    "ep-tp-needs-sp", "moe-topk", "ep-needs-moe", "etp-needs-moe", "seq-divides-cp", "seq-divides-tp",
    "gbs-divides-mbs-dp", "vpp-microbatches", "gpus-below-baseline",
)  # fmt: skip


def validate_layout(recipe: Recipe) -> list[str]:
    """All broken rules for this recipe on `recipe.gpus` GPUs; empty when the layout is valid."""
    problems = sorted(_broken_rules(recipe), key=lambda broken: RULES.index(broken.rule))
    return [f"[{broken.rule}] {broken.message}" for broken in problems]


def _broken_rules(recipe: Recipe) -> list[BrokenRule]:
    m, p, t = recipe.model, recipe.parallel, recipe.training
    gpus = recipe.gpus
    problems: list[BrokenRule] = []

    def bad(rule: str, message: str) -> None:
        problems.append(BrokenRule(rule, message))

    sizes = {
        "gpus": gpus, "tp": p.tp, "pp": p.pp, "cp": p.cp, "ep": p.ep, "etp": p.etp,
        "mbs": p.micro_batch_size, "global_batch_size": t.global_batch_size,
        "seq_length": t.seq_length,
    }
    for name, value in sizes.items():
        if value < 1:
            bad("positive-sizes", f"{name}={value} must be at least 1")
    if p.vpp is not None and p.vpp < 1:
        bad("positive-sizes", f"vpp={p.vpp} must be at least 1 (or unset)")
    if problems:
        return problems

    # How the model splits over TP, PP x VPP and EP/ETP ranks: the rules the converters share.
    problems += model_split_problems(m, tp=p.tp, pp=p.pp, vpp=p.vpp, ep=p.ep, etp=p.etp)
    if p.sequence_parallel and p.tp == 1:
        bad("sp-needs-tp", "sequence parallel needs TP > 1; set TP >= 2 or turn SP off (--no-sp)")

    # World size: GPUs = TP x PP x CP x DP.
    model_parallel = p.tp * p.pp * p.cp
    if gpus % model_parallel:
        ok = [model_parallel * k for k in range(1, 1 + max(1, 2 * gpus // model_parallel + 1))]
        bad(
            "world-size",
            f"GPUs={gpus} is not divisible by TP x PP x CP = {p.tp} x {p.pp} x {p.cp} = "
            f"{model_parallel}; nearest valid GPU counts: {nearest(gpus, ok)}",
        )
        dp = 0
    else:
        dp = gpus // model_parallel

    # Experts (megatron-core: world % (ETP x EP x PP) == 0).
    if m.is_moe:
        assert m.num_experts is not None
        expert_group = p.etp * p.ep * p.pp
        if gpus % expert_group:
            ok = [d for d in divisors(gpus // p.pp) if m.num_experts % d == 0] if gpus % p.pp == 0 else []
            bad(
                "expert-world-size",
                f"GPUs={gpus} is not divisible by ETP x EP x PP = {p.etp} x {p.ep} x {p.pp} = "
                f"{expert_group}; nearest valid EP (ETP={p.etp}): {nearest(p.ep, ok)}",
            )
        if p.ep > 1 and p.tp > 1 and not p.sequence_parallel:
            bad("ep-tp-needs-sp", f"EP={p.ep} with TP={p.tp} needs sequence parallel (--sp)")
        if not 0 < m.moe_router_topk <= m.num_experts:
            bad("moe-topk", f"top-k={m.moe_router_topk} must be in 1..num_experts={m.num_experts}")
    elif p.etp > 1:
        bad("etp-needs-moe", f"ETP={p.etp} needs a mixture-of-experts model; set ETP=1")

    # Sequence: context parallel splits it in 2 x CP chunks (load-balanced causal attention),
    # sequence parallel splits each CP chunk over TP.
    if p.cp > 1 and t.seq_length % (2 * p.cp):
        ok = [c for c in divisors(t.seq_length // 2)]
        bad(
            "seq-divides-cp",
            f"seq_length={t.seq_length} must be divisible by 2 x CP = {2 * p.cp}; "
            f"nearest valid CP: {nearest(p.cp, ok)}",
        )
    elif p.sequence_parallel and (t.seq_length // p.cp) % p.tp:
        bad(
            "seq-divides-tp",
            f"with sequence parallel, seq_length / CP = {t.seq_length // p.cp} must be divisible "
            f"by TP={p.tp}",
        )

    # Batch: GBS = MBS x DP x grad-accum steps.
    if dp:
        per_step = p.micro_batch_size * dp
        if t.global_batch_size % per_step:
            ok_mbs = [b for b in divisors(t.global_batch_size // dp)] if t.global_batch_size % dp == 0 else []
            hint = (
                f"nearest valid micro batch: {nearest(p.micro_batch_size, ok_mbs)}"
                if ok_mbs
                else f"nearest valid global batch: {nearest(t.global_batch_size, [per_step * k for k in range(1, t.global_batch_size // per_step + 2)])}"
            )
            bad(
                "gbs-divides-mbs-dp",
                f"global_batch_size={t.global_batch_size} is not divisible by micro batch x DP = "
                f"{p.micro_batch_size} x {dp} = {per_step}; {hint}",
            )
        elif p.vpp is not None and p.pp > 1:
            # megatron-core's interleaved schedule groups PP micro-batches per virtual stage.
            micro_batches = t.global_batch_size // per_step
            remainder = micro_batches % p.pp
            if micro_batches < p.pp or 0 < remainder < p.pp:
                bad(
                    "vpp-microbatches",
                    f"with VPP the number of micro-batches ({micro_batches}) must be a multiple "
                    f"of PP={p.pp}; lower the micro batch or unset VPP",
                )

    if recipe.acceptance and gpus < recipe.acceptance.gpus and not recipe.off_benchmark:
        bad(
            "gpus-below-baseline",
            f"GPUs={gpus} is below the acceptance baseline of {recipe.acceptance.gpus} GPUs for "
            f"'{recipe.name}'; use at least {recipe.acceptance.gpus} (or --off-benchmark)",
        )
    return problems


def model_split_problems(
    shape: ModelShape, *, tp: int, pp: int, vpp: int | None, ep: int, etp: int, name: SizeName = recipe_size
) -> list[BrokenRule]:
    """The broken rules of splitting `shape` over TP, PP x VPP chunks and EP/ETP ranks.

    The layout validator and the converters (`conversion/layout.py`) both ask this, so each rule
    and its message exist once; `name` says how a size is named: `recipe_size` (`TP=3`) in the
    layout report, `option_size` (`--tp 3`) where every size is a command-line option. Sizes are
    at least 1 (the validator checks that first).
    """
    problems: list[BrokenRule] = []

    def bad(rule: str, message: str) -> None:
        problems.append(BrokenRule(rule, message))

    # Tensor parallel: attention heads, key/value groups and MLP columns split across TP ranks.
    tp_ok = [d for d in divisors(shape.num_attention_heads) if shape.num_query_groups % d == 0]
    if shape.num_attention_heads % tp or shape.num_query_groups % tp:
        bad(
            "tp-divides-heads",
            f"{name('tp', tp)} must divide num_attention_heads={shape.num_attention_heads} and "
            f"num_query_groups={shape.num_query_groups}; nearest valid TP: {nearest(tp, tp_ok)}",
        )
    if not shape.is_moe and shape.ffn_hidden_size % tp:
        ok = [d for d in divisors(shape.ffn_hidden_size) if d <= 64]
        bad(
            "tp-divides-ffn",
            f"{name('tp', tp)} must divide ffn_hidden_size={shape.ffn_hidden_size}; "
            f"nearest valid TP: {nearest(tp, ok)}",
        )

    # Pipeline: layers split evenly over PP x VPP model chunks.
    layers = shape.num_layers
    if layers % (pp * (vpp or 1)):
        if vpp:
            ok = [v for v in divisors(layers // pp)] if layers % pp == 0 else []
            hint = (
                f"nearest valid VPP for PP={pp}: {nearest(vpp, ok)}"
                if ok
                else f"nearest valid PP: {nearest(pp, divisors(layers))}"
            )
        else:
            hint = f"nearest valid PP: {nearest(pp, divisors(layers))}"
        bad(
            "layers-divide-pp-vpp",
            f"num_layers={layers} is not divisible by {name('pp', None)} x {name('vpp', None)} = "
            f"{pp} x {vpp or 1}; " + hint,
        )
    if vpp is not None and pp == 1:
        bad(
            "vpp-needs-pp",
            f"{name('vpp', vpp)} needs {name('pp', None)} > 1 (interleaved schedule); "
            f"unset {name('vpp', None)} or raise {name('pp', None)}",
        )

    # Experts split over EP ranks, each expert's MLP columns over ETP ranks.
    if shape.is_moe:
        assert shape.num_experts is not None and shape.moe_ffn_hidden_size is not None
        if shape.num_experts % ep:
            bad(
                "ep-divides-experts",
                f"{name('ep', ep)} must divide num_experts={shape.num_experts}; "
                f"nearest valid EP: {nearest(ep, divisors(shape.num_experts))}",
            )
        if shape.moe_ffn_hidden_size % etp:
            bad(
                "etp-divides-expert-ffn",
                f"{name('etp', etp)} must divide moe_ffn_hidden_size={shape.moe_ffn_hidden_size}; "
                f"nearest valid ETP: {nearest(etp, divisors(shape.moe_ffn_hidden_size))}",
            )
    elif ep > 1:
        bad("ep-needs-moe", f"{name('ep', ep)} needs a mixture-of-experts model; set {name('ep', 1)}")
    return problems


def check_layout(recipe: Recipe) -> None:
    """Raise `LayoutError` listing every broken rule; return quietly when the layout is valid."""
    problems = validate_layout(recipe)
    if problems:
        raise LayoutError(recipe.name, problems)
