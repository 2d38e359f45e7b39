"""Megatron-core layouts: which rank (TP, PP, virtual PP chunk, EP) holds which layer and expert.

`McoreLayout.validate` refuses a layout the model cannot be split into. The rules it shares with
the recipe validator (TP divides heads, groups and ffn; PP x VPP divides layers; VPP needs PP;
EP needs experts and divides them; ETP divides the expert ffn) come from
`recipes.validate.model_split_problems`, named by their options (`--tp 3`); only what this
converter itself cannot write is checked here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

from qwen_pretrain.recipes.errors import UserError
from qwen_pretrain.recipes.schema import ModelShape
from qwen_pretrain.recipes.validate import model_split_problems, option_size

LayerSpec = Literal["local", "te"]
ExpertLayout = Literal["sequential", "te_grouped", "legacy_grouped"]


@dataclass(frozen=True, order=True)
class RankCoord:
    """One model-parallel rank (and virtual-pipeline chunk) of a megatron-core layout."""

    tp_rank: int = 0
    pp_rank: int = 0
    ep_rank: int = 0
    vpp_rank: int = 0


@dataclass(frozen=True)
class McoreLayout:
    tp: int = 1
    pp: int = 1
    ep: int = 1
    vpp: int | None = None
    etp: int = 1
    layer_spec: LayerSpec = "local"
    expert_layout: ExpertLayout = "sequential"

    @property
    def chunks(self) -> int:
        return self.vpp or 1

    def ranks(self) -> list[RankCoord]:
        return [
            RankCoord(t, p, e, v)
            for p in range(self.pp)
            for v in range(self.chunks)
            for t in range(self.tp)
            for e in range(self.ep)
        ]

    def etp_rank(self, tp_rank: int) -> int:
        return tp_rank if self.etp == self.tp else 0

    def layers_per_chunk(self, shape: ModelShape) -> int:
        return shape.num_layers // (self.pp * self.chunks)

    def stage_of_layer(self, shape: ModelShape, layer: int) -> tuple[int, int, int]:
        """(pp_rank, vpp_rank, local layer index) holding global layer `layer` (megatron-core's
        default even split)."""
        n = self.layers_per_chunk(shape)
        chunk, local = divmod(layer, n)
        vpp_rank, pp_rank = divmod(chunk, self.pp)
        return pp_rank, vpp_rank, local

    def is_first_chunk(self, pp_rank: int, vpp_rank: int) -> bool:
        return pp_rank == 0 and vpp_rank == 0

    def is_last_chunk(self, pp_rank: int, vpp_rank: int) -> bool:
        return pp_rank == self.pp - 1 and vpp_rank == self.chunks - 1

    def local_experts(self, shape: ModelShape) -> int:
        return (shape.num_experts or 0) // self.ep

    def validate(self, shape: ModelShape) -> None:
        """A one-line UserError naming the option that does not fit the model, and the fix."""
        broken = model_split_problems(
            shape, tp=self.tp, pp=self.pp, vpp=self.vpp, ep=self.ep, etp=self.etp, name=option_size
        )
        if broken:
            raise UserError(broken[0].message)
        # The converter puts expert TP rank r on TP rank r, or keeps experts whole (`etp_rank`):
        # other expert TP sizes it can neither write nor read.
        if shape.is_moe and self.etp not in (1, self.tp):
            raise UserError(f"--etp {self.etp} must be 1 or equal to --tp ({self.tp})")
        if self.layer_spec not in get_args(LayerSpec):
            raise UserError(f"layer spec '{self.layer_spec}' is unknown: choose local or te")
        if self.expert_layout not in get_args(ExpertLayout):
            choices = ", ".join(get_args(ExpertLayout))
            raise UserError(f"expert layout '{self.expert_layout}' is unknown: choose one of {choices}")
