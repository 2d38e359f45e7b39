"""The engine that applies the families' tables (`conversion/families.py`) at any layout.

`plan` lists every conversion item of a model (one rule at one layer and expert) in Hugging
Face order; the transforms shard an item's HF tensors for one (expert) TP rank and merge the
shards back; `mcore_state_dict_from_hf` / `iter_stage_tensors` and `hf_tensors_from_mcore` run
the plan tensor by tensor, so a converter never holds more than the tensors of one item.

Usage (the model's shape always comes from the recipe):

    from safetensors import safe_open
    from qwen_pretrain.recipes import get_recipe
    from qwen_pretrain.conversion.layout import McoreLayout
    from qwen_pretrain.conversion.mapping import mcore_state_dict_from_hf, hf_tensors_from_mcore

    shape = get_recipe("qwen3_tiny").model
    with safe_open("hf/model.safetensors", "pt") as f:       # lazy: one tensor at a time
        sd = mcore_state_dict_from_hf(shape, f.get_tensor, tp=2, tp_rank=1)
    model.load_state_dict(sd)           # keys == GPTModel.state_dict() of that rank (chunk)

    # The inverse: per-rank state dicts (or a lazy reader of them) -> HF tensors, streamed.
    layout = McoreLayout(tp=2)
    shards = {rank: sd_of(rank) for rank in layout.ranks()}           # RankCoord -> state dict
    for hf_name, tensor in hf_tensors_from_mcore(shape, lambda r, n: shards[r][n], layout):
        ...

Layouts covered: TP (column/row splits, fused QKV interleaved per query group, gated fc1 split
so every shard holds [gate_i; up_i]), PP and virtual PP (layer offsets; tied embeddings put a
copy of the embedding in the last stage's `output_layer` as megatron-core expects), EP (global
expert E -> local index e on EP rank E // (experts / ep)), vocab padding to
`shape.padded_vocab_size(tp)` (padded rows zero; stripped on the way out), the local layer
spec (`input_layernorm`, `pre_mlp_layernorm`) and the Transformer Engine spec (norms fused into
`linear_qkv.layer_norm_weight` / `linear_fc1.layer_norm_weight`), and the three expert layouts
of `families.EXPERTS`: `sequential` (SequentialMLP, `experts.local_experts.e.linear_fc1.weight`),
`te_grouped` (TEGroupedMLP, `experts.linear_fc1.weight{e}`) and `legacy_grouped` (GroupedMLP,
`experts.weight1` / `experts.weight2`).

`_extra_state` entries (None) are emitted where megatron-core 0.16.1's modules have them, so that
`load_state_dict(strict=True)` accepts the result.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from qwen_pretrain.conversion.families import (
    COLUMN,
    EMBEDDING,
    EXPERTS,
    FINAL_NORM,
    GATED,
    GROUPED_FC1,
    GROUPED_FC2,
    HF_LAYER_PREFIX,
    MCORE_LAYER_PREFIX,
    OUTPUT_LAYER,
    QKV,
    REPLICATED,
    ROW,
    TE_EXTRA_STATE_AFTER,
    TE_RENAMES,
    TE_UNFUSED_IN_MOE,
    TIED_OUTPUT_LAYER,
    VOCAB,
    Rule,
    family_named,
    named_sizes,
)
from qwen_pretrain.conversion.layout import ExpertLayout, LayerSpec, McoreLayout, RankCoord
from qwen_pretrain.recipes.errors import UserError
from qwen_pretrain.recipes.schema import ModelShape

# ---------------------------------------------------------------- items: the plan, in HF order


@dataclass(frozen=True)
class Item:
    """One rule applied at one place: a global layer (or None) and a global expert (or None)."""

    rule: Rule
    layer: int | None = None
    expert: int | None = None
    ep_rank: int | None = None  # legacy_grouped: the EP rank whose local experts the tensor holds
    hf_names: tuple[str, ...] = field(default=())


def layer_rules(shape: ModelShape, layout: McoreLayout) -> tuple[Rule, ...]:
    rules = family_named(shape.family).layer
    if shape.is_moe:
        rules = rules + EXPERTS[layout.expert_layout]
    return rules


def _hf_names(rule: Rule, layer: int | None, experts: list[int] | None) -> tuple[str, ...]:
    names = []
    for e in experts if experts is not None else [None]:
        for pattern in rule.hf:
            name = pattern.format(expert=e) if e is not None else pattern
            names.append((HF_LAYER_PREFIX.format(layer=layer) + name) if layer is not None else name)
    return tuple(names)


def plan(shape: ModelShape, layout: McoreLayout) -> list[Item]:
    """Every conversion item of the model, in HF order (embedding, layers, norm, lm_head)."""
    items = [Item(EMBEDDING, hf_names=EMBEDDING.hf)]
    n_local = layout.local_experts(shape)
    for layer in range(shape.num_layers):
        for rule in layer_rules(shape, layout):
            if rule.kind in (GROUPED_FC1, GROUPED_FC2):
                for ep_rank in range(layout.ep):
                    experts = list(range(ep_rank * n_local, (ep_rank + 1) * n_local))
                    items.append(Item(rule, layer, None, ep_rank, _hf_names(rule, layer, experts)))
            elif "{expert}" in rule.mcore:
                for expert in range(shape.num_experts):
                    items.append(Item(rule, layer, expert, hf_names=_hf_names(rule, layer, [expert])))
            else:
                items.append(Item(rule, layer, hf_names=_hf_names(rule, layer, None)))
    items.append(Item(FINAL_NORM, hf_names=FINAL_NORM.hf))
    if not shape.tie_embeddings:
        items.append(Item(OUTPUT_LAYER, hf_names=OUTPUT_LAYER.hf))
    elif layout.pp > 1:
        items.append(Item(TIED_OUTPUT_LAYER, hf_names=()))  # a copy; nothing of its own in HF
    return items


def expected_hf_shapes(shape: ModelShape) -> dict[str, tuple[int, ...]]:
    """Every tensor a Hugging Face checkpoint of this shape holds, with its shape (from the rules)."""
    sizes = named_sizes(shape)
    shapes = {}
    for item in plan(shape, McoreLayout()):
        for name, dims in zip(item.hf_names, item.rule.hf_shapes, strict=True):
            shapes[name] = tuple(sizes[d] for d in dims)
    return shapes


# ---------------------------------------------------------------- transforms (HF -> one shard)


def _split(t: torch.Tensor, dim: int, parts: int, rank: int) -> torch.Tensor:
    return torch.chunk(t, parts, dim=dim)[rank].clone() if parts > 1 else t


def _cat(tensors: list[torch.Tensor], dim: int = 0) -> torch.Tensor:
    """torch.cat, but shapes only for meta tensors (the writers' planning pass): torch's meta
    `cat` is Python and its first call imports ~800 modules (sympy included), 1.4 s."""
    if not tensors[0].is_meta:
        return torch.cat(tensors, dim)
    first = tensors[0]
    dim %= first.dim()
    size = list(first.shape)
    size[dim] = sum(t.shape[dim] for t in tensors)
    return torch.empty(size, dtype=first.dtype, device="meta")


def interleave_qkv(shape: ModelShape, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """[q; k; v] -> per query group [q heads of the group, k, v] (weights or biases)."""
    g, d = shape.num_query_groups, shape.head_dim
    per = shape.num_attention_heads // g
    rest = q.shape[1:]
    qg = q.reshape(g, per * d, *rest)
    kg = k.reshape(g, d, *rest)
    vg = v.reshape(g, d, *rest)
    return _cat([qg, kg, vg], dim=1).reshape(g * (per + 2) * d, *rest)


def deinterleave_qkv(shape: ModelShape, qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g, d = shape.num_query_groups, shape.head_dim
    per = shape.num_attention_heads // g
    rest = qkv.shape[1:]
    grouped = qkv.reshape(g, (per + 2) * d, *rest)
    q, k, v = torch.split(grouped, [per * d, d, d], dim=1)
    return (
        q.reshape(g * per * d, *rest).contiguous(),
        k.reshape(g * d, *rest).contiguous(),
        v.reshape(g * d, *rest).contiguous(),
    )


def pad_vocab(t: torch.Tensor, padded_rows: int) -> torch.Tensor:
    if t.shape[0] == padded_rows:
        return t
    out = torch.zeros((padded_rows, *t.shape[1:]), dtype=t.dtype, device=t.device)
    out[: t.shape[0]] = t
    return out


def _shard(
    shape: ModelShape, rule: Rule, hf: list[torch.Tensor], parts: int, rank: int, padded_vocab: int
) -> torch.Tensor:
    kind = rule.kind
    if kind == REPLICATED:
        return hf[0]
    if kind == COLUMN:
        return _split(hf[0], 0, parts, rank)
    if kind == ROW:
        return _split(hf[0], 1, parts, rank)
    if kind == VOCAB:
        return _split(pad_vocab(hf[0], padded_vocab), 0, parts, rank)
    if kind == QKV:
        return _split(interleave_qkv(shape, *hf), 0, parts, rank)
    if kind == GATED:
        return _cat([_split(hf[0], 0, parts, rank), _split(hf[1], 0, parts, rank)], dim=0)
    if kind == GROUPED_FC1:  # pairs (gate_e, up_e) per local expert -> [hidden, e * 2F/etp]
        fc1 = [_cat([_split(g, 0, parts, rank), _split(u, 0, parts, rank)]) for g, u in zip(hf[0::2], hf[1::2])]
        return torch.stack([w.t() for w in fc1]).reshape(shape.hidden_size, -1)
    if kind == GROUPED_FC2:  # down_e per local expert -> [e * F/etp, hidden]
        return torch.stack([_split(w, 1, parts, rank).t() for w in hf]).reshape(-1, shape.hidden_size)
    raise ValueError(f"unknown transform kind {kind}")


def _shard_pieces(
    shape: ModelShape, rule: Rule, hf: list[torch.Tensor], parts: int, rank: int, padded_vocab: int
) -> list[torch.Tensor] | None:
    """The shard as views of the HF tensors whose bytes, one after the other, are the shard's bytes.

    A writer puts them in place without building the fused tensor (no copy for QKV or gated
    fc1). None where no such views exist (row splits over TP, grouped experts): use `_shard`.
    """
    kind = rule.kind
    if kind == REPLICATED or (kind in (ROW, COLUMN) and parts == 1):
        return [hf[0]]
    if kind == COLUMN:
        return [torch.chunk(hf[0], parts, dim=0)[rank]]
    if kind == GATED:
        return [torch.chunk(hf[0], parts, dim=0)[rank], torch.chunk(hf[1], parts, dim=0)[rank]]
    if kind == VOCAB:
        rows = padded_vocab // parts
        start, stop = rank * rows, (rank + 1) * rows
        real = hf[0][start : min(stop, hf[0].shape[0])]
        pad = stop - max(start, hf[0].shape[0])
        zeros = [torch.zeros((pad, *hf[0].shape[1:]), dtype=hf[0].dtype, device=hf[0].device)] if pad > 0 else []
        return [real, *zeros] if real.shape[0] else zeros
    if kind == QKV:  # the rank's query groups, each [q heads of the group; k; v]
        q, k, v = hf
        g, d = shape.num_query_groups, shape.head_dim
        per = shape.num_attention_heads // g
        groups = range(rank * g // parts, (rank + 1) * g // parts)
        return [t for j in groups for t in (q[j * per * d : (j + 1) * per * d], k[j * d : (j + 1) * d], v[j * d : (j + 1) * d])]
    return None


# ---------------------------------------------------------------- the engine: HF -> one rank


def _mcore_name(rule: Rule, layout: McoreLayout, local_layer: int | None, local_expert: int | None, moe: bool) -> str:
    name = rule.mcore
    if layout.layer_spec == "te" and name in TE_RENAMES and not (moe and name in TE_UNFUSED_IN_MOE):
        name = TE_RENAMES[name]
    if local_expert is not None:
        name = name.replace("{expert}", str(local_expert))
    return (MCORE_LAYER_PREFIX.format(layer=local_layer) + name) if local_layer is not None else name


def _extra_state_name(rule: Rule, local_layer: int | None, local_expert: int | None) -> str | None:
    if rule.extra_state is None:
        return None
    name = rule.extra_state.replace("{expert}", str(local_expert)) + "._extra_state"
    return (MCORE_LAYER_PREFIX.format(layer=local_layer) + name) if local_layer is not None else name


def _on_rank(shape: ModelShape, layout: McoreLayout, item: Item, rank: RankCoord) -> tuple[int | None, int | None] | None:
    """(local layer, local expert) of `item` on `rank`, or None when the rank does not hold it."""
    rule = item.rule
    if item.layer is None:
        if rule is EMBEDDING:
            ok = layout.is_first_chunk(rank.pp_rank, rank.vpp_rank)
        else:
            ok = layout.is_last_chunk(rank.pp_rank, rank.vpp_rank)
        return (None, None) if ok else None
    pp_rank, vpp_rank, local = layout.stage_of_layer(shape, item.layer)
    if (pp_rank, vpp_rank) != (rank.pp_rank, rank.vpp_rank):
        return None
    if item.ep_rank is not None:
        return (local, None) if item.ep_rank == rank.ep_rank else None
    if item.expert is not None:
        n_local = layout.local_experts(shape)
        ep_rank, local_expert = divmod(item.expert, n_local)
        return (local, local_expert) if ep_rank == rank.ep_rank else None
    return local, None


def _parts_and_rank(layout: McoreLayout, rule: Rule, rank: RankCoord) -> tuple[int, int]:
    if rule.expert_tp:
        return layout.etp, layout.etp_rank(rank.tp_rank)
    return layout.tp, rank.tp_rank


def check_hf_tensor(shape: ModelShape, name: str, tensor: torch.Tensor, expected: dict[str, tuple[int, ...]]) -> None:
    want = expected.get(name)
    if want is not None and tuple(tensor.shape) != want:
        raise UserError(
            f"tensor '{name}' has shape {tuple(tensor.shape)} but the recipe's model shape needs {want}: "
            "pick the recipe of this checkpoint with --recipe"
        )


def mcore_state_dict_from_hf(
    shape: ModelShape,
    get_hf_tensor: Callable[[str], torch.Tensor],
    *,
    tp: int = 1,
    tp_rank: int = 0,
    pp: int = 1,
    pp_rank: int = 0,
    ep: int = 1,
    ep_rank: int = 0,
    vpp: int | None = None,
    vpp_rank: int = 0,
    etp: int = 1,
    layer_spec: LayerSpec = "local",
    expert_layout: ExpertLayout = "sequential",
) -> dict[str, torch.Tensor | None]:
    """The state dict of one rank's model (chunk), keys as `GPTModel.state_dict()`.

    `get_hf_tensor(name)` is called once per HF tensor the rank needs (a safetensors `safe_open`
    handle's `get_tensor` keeps memory at one tensor plus the rank's shards). dtypes are kept.
    """
    layout = McoreLayout(tp, pp, ep, vpp, etp, layer_spec, expert_layout)
    layout.validate(shape)
    rank = RankCoord(tp_rank, pp_rank, ep_rank, vpp_rank)
    return dict(iter_rank_tensors(shape, layout, rank, get_hf_tensor))


def iter_rank_tensors(
    shape: ModelShape,
    layout: McoreLayout,
    rank: RankCoord,
    get_hf_tensor: Callable[[str], torch.Tensor],
) -> Iterator[tuple[str, torch.Tensor | None]]:
    """(megatron name, shard) of one rank, tensor by tensor, with `_extra_state` Nones."""
    for _, name, tensor in iter_stage_tensors(shape, layout, [rank], get_hf_tensor):
        yield name, tensor


def iter_stage_tensors(
    shape: ModelShape,
    layout: McoreLayout,
    ranks: list[RankCoord],
    get_hf_tensor: Callable[[str], torch.Tensor],
    *,
    pieces: bool = False,
    item_done: Callable[[], None] | None = None,
) -> Iterator[tuple[RankCoord, str, Any]]:
    """(rank, megatron name, shard) for several ranks at once, reading each HF tensor once.

    Converters pass the ranks of one pipeline stage, so memory holds that stage's shards only.
    With `pieces`, each shard is a list of contiguous tensors whose bytes in order are the
    shard's (`_shard_pieces`): views of the HF tensors where possible, so nothing is copied.
    `item_done()` is called once the consumer is through with an item's shards (when it asks
    for the next one), so the HF tensors' buffers can be reused.
    """
    expected = expected_hf_shapes(shape)
    padded = shape.padded_vocab_size(layout.tp)
    for item in plan(shape, layout):
        holders = [(r, w) for r in ranks if (w := _on_rank(shape, layout, item, r)) is not None]
        if not holders:
            continue
        tensors = []
        for name in item.hf_names or item.rule.hf:
            t = get_hf_tensor(name)
            check_hf_tensor(shape, name, t, expected)
            tensors.append(t)
        cache: dict[int, torch.Tensor] = {}  # one shard per (expert) TP part, shared by replicas
        for rank, (local_layer, local_expert) in holders:
            parts, part = _parts_and_rank(layout, item.rule, rank)
            if part not in cache:
                views = _shard_pieces(shape, item.rule, tensors, parts, part, padded) if pieces else None
                if views is not None:
                    cache[part] = [v.contiguous() for v in views]
                else:
                    shard = _shard(shape, item.rule, tensors, parts, part, padded).contiguous()
                    cache[part] = [shard] if pieces else shard
            yield rank, _mcore_name(item.rule, layout, local_layer, local_expert, shape.is_moe), cache[part]
            extra = _extra_state_name(item.rule, local_layer, local_expert)
            if extra is not None:
                yield rank, extra, None
            if layout.layer_spec == "te" and item.layer is not None:
                for module in TE_EXTRA_STATE_AFTER.get(item.rule.mcore, ()):
                    yield rank, MCORE_LAYER_PREFIX.format(layer=local_layer) + module + "._extra_state", None
        del tensors, cache
        if item_done is not None:
            item_done()
    if shape.tie_embeddings and layout.pp == 1:
        # megatron-core keeps an output_layer module without weight when embeddings are tied.
        for rank in ranks:
            yield rank, "output_layer._extra_state", None


# ---------------------------------------------------------------- the inverse: ranks -> HF


def _merge(
    shape: ModelShape, rule: Rule, shards: list[torch.Tensor], n_hf: int
) -> list[torch.Tensor]:
    """Shards (over TP or expert TP, in rank order) -> the HF tensor(s) of the rule."""
    kind = rule.kind
    if kind == REPLICATED:
        return [shards[0]]
    if kind == COLUMN:
        return [_cat(shards, 0)]
    if kind == ROW:
        return [_cat(shards, 1)]
    if kind == VOCAB:
        return [_cat(shards, 0)[: shape.vocab_size].contiguous()]
    if kind == QKV:
        return list(deinterleave_qkv(shape, _cat(shards, 0)))
    if kind == GATED:
        halves = [torch.chunk(s, 2, dim=0) for s in shards]
        return [_cat([h[0] for h in halves]), _cat([h[1] for h in halves])]
    if kind == GROUPED_FC1:
        n_experts = n_hf // 2
        # weight1's memory is [e, hidden, 2F/etp] (GroupedMLP views it so): undo that view
        per_rank = [s.reshape(n_experts, shape.hidden_size, -1).transpose(1, 2) for s in shards]
        out = []
        for e in range(n_experts):
            halves = [torch.chunk(r[e], 2, dim=0) for r in per_rank]
            out += [_cat([h[0] for h in halves]).contiguous(), _cat([h[1] for h in halves]).contiguous()]
        return out
    if kind == GROUPED_FC2:
        per_rank = [s.reshape(n_hf, -1, shape.hidden_size) for s in shards]  # [e, F/etp, h]
        return [_cat([r[e].t() for r in per_rank], dim=1).contiguous() for e in range(n_hf)]
    raise ValueError(f"unknown transform kind {kind}")


def hf_tensors_from_mcore(
    shape: ModelShape,
    get_mcore_tensor: Callable[[RankCoord, str], torch.Tensor],
    layout: McoreLayout,
) -> Iterator[tuple[str, torch.Tensor]]:
    """Gather every HF tensor from the ranks' shards, in HF order, one item at a time.

    `get_mcore_tensor(rank, name)` returns the tensor `name` of that rank's state dict.
    Tied embeddings: the last stage's output_layer copy is not read (HF keeps one embedding).
    """
    layout.validate(shape)
    for item in plan(shape, layout):
        if not item.hf_names:
            continue
        parts = layout.etp if item.rule.expert_tp else layout.tp
        holders = [r for r in layout.ranks() if _on_rank(shape, layout, item, r) is not None]
        # one holder per (expert) TP rank: the same shard is replicated over the other dims
        by_part: dict[int, RankCoord] = {}
        for r in holders:
            by_part.setdefault(_parts_and_rank(layout, item.rule, r)[1], r)
        shards = []
        for part in range(parts):
            r = by_part[part]
            local_layer, local_expert = _on_rank(shape, layout, item, r)
            shards.append(get_mcore_tensor(r, _mcore_name(item.rule, layout, local_layer, local_expert, shape.is_moe)))
        yield from zip(item.hf_names, _merge(shape, item.rule, shards, len(item.hf_names)), strict=True)
