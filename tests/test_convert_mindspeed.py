"""`convert hf-to-mcore --target mindspeed`: the legacy checkpoint MindSpeed-LLM 2.3.0 loads.

Checked against MindSpeed-LLM's own saver at the pinned release (Ascend/MindSpeed-LLM v2.3.0,
commit 1bdd97003882083da7c951fceedd71f96116be2f):
- mindspeed_llm/tasks/checkpoint/saver.py builds the training model and writes it with
  Megatron-LM's `save_checkpoint` (ckpt format torch): `iter_NNNNNNN/mp_rank_TT[_PPP][_EEE]/
  model_optim_rng.pt` holding "model", "checkpoint_version" 3.0, "iteration", "args";
- mindspeed_llm/tasks/checkpoint/models.py sets the iteration to 1 ("'0', 'release' don't
  work"): MindSpeed-LLM runs Megatron-LM core_v0.12.1, whose `read_metadata` asserts
  `iteration > 0 or release` and whose `check_checkpoint_args` reads num_layers, hidden_size,
  num_attention_heads, tensor/pipeline_model_parallel_size from "args";
- mindspeed_llm/tasks/models/spec/qwen3_spec.py is the model whose names the state holds for
  Qwen3 (rebuilt below from megatron-core's classes; its PTNorm is Megatron-LM's legacy RMSNorm,
  a module with one `weight`), with `--moe-grouped-gemm` experts as Megatron's GroupedMLP.

Real parts: transformers Qwen3 / Qwen3-MoE models, the converter, megatron-core 0.16.1's
GPTModel (local layers, CPU). The only stand-in is grouped_gemm's availability check (a CUDA
kernel package) so that GroupedMLP can be built; its forward is never run.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from qwen_pretrain.conversion import hf_io
from qwen_pretrain.conversion.convert import hf_to_mcore, mcore_to_hf, verify
from qwen_pretrain.launch.cli import main
from qwen_pretrain.recipes import get_recipe
from qwen_pretrain.recipes.schema import ModelShape
from safetensors.torch import load_file


def write_hf(path: Path, shape: ModelShape, seed: int = 0) -> Path:
    """A real `transformers` model of `shape` with random weights, saved with save_pretrained."""
    import transformers

    cfg = hf_io.hf_config_for(shape)
    cls = {"qwen3": transformers.Qwen3Config, "qwen3_moe": transformers.Qwen3MoeConfig}[shape.family]
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(cls(**{k: v for k, v in cfg.items() if k != "model_type"}))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    model.save_pretrained(str(path))
    return path


class LegacyRMSNorm(torch.nn.Module):
    """Megatron-LM core_v0.12.1 megatron/legacy/model/rms_norm.py, what MindSpeed-LLM's PTNorm
    builds for RMSNorm (mindspeed_llm/core/transformer/custom_layers/transformer_engine.py)."""

    def __init__(self, config, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.ones(hidden_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


def mindspeed_qwen3_model(shape: ModelShape):
    """The GPTModel MindSpeed-LLM trains for Qwen3 at TP=1: qwen3_spec's layer, fp32, CPU."""
    from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_mlp_module_spec
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
    from megatron.core.transformer import TransformerLayer, TransformerLayerSubmodules
    from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.spec_utils import ModuleSpec
    from megatron.core.transformer.transformer_config import TransformerConfig
    from qwen_pretrain.training.model import tp1_recipe, transformer_config_kwargs
    from qwen_pretrain.training.parallel import init_single_process

    init_single_process()
    layer = ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=LegacyRMSNorm,
            self_attention=ModuleSpec(
                module=SelfAttention,
                params={"attn_mask_type": AttnMaskType.causal},
                submodules=SelfAttentionSubmodules(
                    linear_qkv=ColumnParallelLinear, core_attention=DotProductAttention,
                    linear_proj=RowParallelLinear, q_layernorm=LegacyRMSNorm, k_layernorm=LegacyRMSNorm,
                ),
            ),
            self_attn_bda=get_bias_dropout_add,
            pre_mlp_layernorm=LegacyRMSNorm,
            mlp=get_mlp_module_spec(use_te=False, num_experts=shape.num_experts, moe_grouped_gemm=shape.is_moe),
            mlp_bda=get_bias_dropout_add,
        ),
    )
    kwargs = transformer_config_kwargs(tp1_recipe(shape))
    if shape.is_moe:
        kwargs["moe_grouped_gemm"] = True  # as MindSpeed-LLM's Qwen3-MoE scripts run it
    return GPTModel(
        config=TransformerConfig(**kwargs), transformer_layer_spec=layer, vocab_size=shape.padded_vocab_size(1),
        max_sequence_length=shape.max_position_embeddings, share_embeddings_and_output_weights=shape.tie_embeddings,
        position_embedding_type="rope", rotary_base=int(shape.rope_theta), parallel_output=True,
    )


@pytest.mark.parametrize("name", ["qwen3_tiny", "qwen3_moe_tiny"])
def test_mindspeed_model_loads_the_checkpoint_strictly(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    from megatron.core.transformer.moe import grouped_gemm_util

    monkeypatch.setattr(grouped_gemm_util, "assert_grouped_gemm_is_available", lambda: None)  # CUDA kernel edge
    shape = dataclasses.replace(get_recipe(name).model, vocab_size=2048)
    hf = write_hf(tmp_path / "hf", shape)
    assert main(["convert", "hf-to-mcore", "--hf", str(hf), "--out", str(tmp_path / "m"),
                 "--target", "mindspeed", "--dtype", "fp32", "--quiet"]) == 0

    # Megatron-LM core_v0.12.1's tracker and directory names, at iteration 1
    assert (tmp_path / "m" / "latest_checkpointed_iteration.txt").read_text() == "1\n"
    sd = torch.load(tmp_path / "m/iter_0000001/mp_rank_00/model_optim_rng.pt", weights_only=False)
    assert sd["checkpoint_version"] == 3.0 and sd["iteration"] == 1
    args = sd["args"]  # what check_checkpoint_args compares
    assert (args.num_layers, args.hidden_size, args.num_attention_heads) == (
        shape.num_layers, shape.hidden_size, shape.num_attention_heads)
    assert (args.tensor_model_parallel_size, args.pipeline_model_parallel_size) == (1, 1)
    assert args.add_position_embedding is False and args.tokenizer_type == "PretrainedFromHF"

    model = mindspeed_qwen3_model(shape)
    def shapes(state):  # `_extra_state` entries are None in both (ColumnParallelLinear's hook)
        return {k: None if v is None else tuple(v.shape) for k, v in state.items()}

    want = shapes(model.state_dict())
    assert shapes(sd["model"]) == want
    if shape.is_moe:
        assert "decoder.layers.0.mlp.experts.weight1" in want  # GroupedMLP, as --moe-grouped-gemm builds it
    else:
        assert "decoder.layers.0.input_layernorm.weight" in want  # qwen3_spec's names, not TE's
    model.load_state_dict(sd["model"], strict=True)
    if shape.is_moe:
        return
    # dense: the model MindSpeed-LLM builds gives transformers' logits with these weights
    import transformers

    ref = transformers.AutoModelForCausalLM.from_pretrained(str(hf), dtype=torch.float32).eval()
    ids = torch.randint(0, shape.vocab_size, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = model.eval()(ids, torch.arange(12).unsqueeze(0), None)[0, :, : shape.vocab_size]
        assert torch.allclose(out, ref(ids).logits[0], atol=1e-4, rtol=0)


def test_mindspeed_target_layouts_round_trip_and_verify(tmp_path: Path) -> None:
    shape = dataclasses.replace(get_recipe("qwen3_moe_tiny").model, vocab_size=2048)
    hf = write_hf(tmp_path / "hf", shape)
    hf_to_mcore(hf, tmp_path / "m", tp=2, pp=2, ep=2, etp=1, fmt="legacy", layer_spec="local",
                expert_layout="legacy_grouped", target="mindspeed", quiet=True)
    ranks = sorted(p.name for p in (tmp_path / "m" / "iter_0000001").iterdir())
    assert ranks == [f"mp_rank_{t:02d}_{p:03d}_{e:03d}" for t in range(2) for p in range(2) for e in range(2)]
    assert verify(hf, tmp_path / "m").top1_agreement == 1.0
    mcore_to_hf(tmp_path / "m", tmp_path / "back", quiet=True)
    a, b = load_file(str(hf / "model.safetensors")), load_file(str(tmp_path / "back" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((tmp_path / "m" / "conversion.json").read_text())["format"] == "legacy"


def test_mindspeed_target_refuses_other_layouts(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    hf = write_hf(tmp_path / "hf", dataclasses.replace(get_recipe("qwen3_tiny").model, vocab_size=2048))
    for extra in (["--format", "torch_dist"], ["--layer-spec", "te"]):
        out = tmp_path / ("m" + extra[1])
        assert main(["convert", "hf-to-mcore", "--hf", str(hf), "--out", str(out), "--target", "mindspeed", *extra]) == 2
        assert "--format legacy, --layer-spec local, --expert-layout sequential" in capsys.readouterr().err
        assert not out.exists()
