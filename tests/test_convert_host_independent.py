"""Conversion and evaluation do not depend on the host they run on.

This machine has no GPU. A GPU host with Transformer Engine (every NGC image) is stood in for by
monkeypatching `torch.cuda.is_available` to True and the TE probe
(`run_settings.transformer_engine_importable`) to True, and by making megatron-core's TE layer
spec raise if anything builds it: a stand-in, not a GPU. Under it, planning (the meta model),
`convert verify` and `eval ppl --mcore` must build the local spec on the device asked for (cpu)
exactly as on a CPU machine, and nothing may touch CUDA (it is not there to touch).

The checkpoint keys of the local and the TE specs are compared as far as they can be built here:
the local spec for real, the TE spec's names from megatron-core's own TE spec as written in
`conversion/families.py` (TE cannot be imported on CPU, so the TE model itself is not built;
`bench gpu-check` builds it on a GPU and compares the keys of a converted checkpoint with it).
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import pytest
import torch
from qwen_pretrain.launch.cli import main
from qwen_pretrain.recipes import get_recipe
from qwen_pretrain.recipes.errors import UserError
from qwen_pretrain.training import run_settings as rs

FAMILIES = ("qwen3_tiny", "qwen25_tiny", "qwen3_moe_tiny")


@pytest.fixture
def pretend_gpu_host(monkeypatch):
    """Stand-in for a GPU host with Transformer Engine (see the module doc)."""
    from megatron.core.models.gpt import gpt_layer_specs

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(rs, "transformer_engine_importable", lambda: True)

    def te_spec(*args, **kwargs):
        raise AssertionError("the Transformer Engine layer spec was built")

    monkeypatch.setattr(gpt_layer_specs, "get_gpt_layer_with_transformer_engine_spec", te_spec)


def random_hf(path: Path, recipe: str, seed: int = 0) -> Path:
    """A random-weight Hugging Face model of the recipe's shape (fp32 safetensors)."""
    from qwen_pretrain.conversion.hf_io import hf_config_for
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = hf_config_for(get_recipe(recipe).model)
    config = AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    torch.manual_seed(seed)
    AutoModelForCausalLM.from_config(config).save_pretrained(path, safe_serialization=True)
    return path


@pytest.mark.parametrize("name", ["qwen3_tiny", "qwen3_moe_tiny"])
def test_planning_is_the_local_spec_on_meta_on_a_gpu_host(pretend_gpu_host, name):
    from qwen_pretrain.conversion.torch_dist import meta_model

    model = meta_model(get_recipe(name).model)
    assert {p.device.type for p in model.parameters()} == {"meta"}
    classes = {type(m).__module__ + "." + type(m).__name__ for m in model.modules()}
    assert not any("transformer_engine" in c or ".TE" in c for c in classes), classes
    assert isinstance(model.decoder.layers[0].input_layernorm, torch.nn.RMSNorm)


def test_verify_and_eval_plan_the_local_spec_on_the_requested_device(pretend_gpu_host, tmp_path, capsys):
    import torch.distributed as dist

    hf = random_hf(tmp_path / "hf", "qwen3_tiny")
    assert main(["convert", "hf-to-mcore", "--hf", str(hf), "--out", str(tmp_path / "mc"), "--tp", "2",
                 "--quiet"]) == 0
    assert main(["convert", "verify", "--hf", str(hf), "--mcore", str(tmp_path / "mc"), "--device", "cpu"]) == 0
    assert "PASS" in capsys.readouterr().out
    assert dist.get_backend() == "gloo"  # the CPU world, on a host that "has" CUDA
    held = tmp_path / "held.jsonl"
    held.write_text(json.dumps({"text": Path(json.__file__).read_text()}) + "\n")
    ppl = {}
    for kind, src in (("mcore", tmp_path / "mc"), ("hf", hf)):
        assert main(["eval", "ppl", f"--{kind}", str(src), "--data", str(held), "--seq-length", "64",
                     "--max-tokens", "400", "--device", "cpu", "--no-progress"]) == 0
        ppl[kind] = json.loads(capsys.readouterr().out)["perplexity"]
    assert ppl["mcore"] == pytest.approx(ppl["hf"], rel=1e-5)


def test_cuda_is_refused_in_one_line_where_it_is_not_visible(tmp_path, capsys):
    hf = random_hf(tmp_path / "hf", "qwen3_tiny")
    assert main(["convert", "hf-to-mcore", "--hf", str(hf), "--out", str(tmp_path / "mc"), "--quiet"]) == 0
    capsys.readouterr()
    for argv in (["convert", "verify", "--hf", str(hf), "--mcore", str(tmp_path / "mc"), "--device", "cuda"],
                 ["eval", "ppl", "--hf", str(hf), "--data", str(tmp_path), "--device", "cuda"]):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "--device cuda: CUDA is not visible" in err


def te_spec_key(local_name: str, moe: bool) -> str:
    """The checkpoint key a TE-spec model gives the tensor the local spec names `local_name`:
    TE fuses the norms into the linear layers after them (`families.TE_RENAMES`), except the MoE
    pre-MLP norm (`TE_UNFUSED_IN_MOE`); layers are stacked; TE's grouped experts save under the
    sequential experts' key (megatron-core: "interchangeable with SequentialMLP's")."""
    from qwen_pretrain.conversion.families import TE_RENAMES, TE_UNFUSED_IN_MOE

    m = re.match(r"^decoder\.layers\.\d+\.(.*)$", local_name)
    if m is None:
        return local_name
    name = m.group(1)
    if name in TE_RENAMES and not (moe and name in TE_UNFUSED_IN_MOE):
        name = TE_RENAMES[name]
    name = re.sub(r"^mlp\.experts\.local_experts\.\d+\.", "mlp.experts.experts.", name)
    return "decoder.layers." + name


@pytest.mark.parametrize("name", FAMILIES)
def test_torch_dist_keys_of_the_local_spec_are_the_te_specs(name):
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory
    from qwen_pretrain.conversion.torch_dist import meta_model
    from qwen_pretrain.training.model import layer_spec

    recipe = get_recipe(name)
    moe = recipe.model.is_moe
    model = meta_model(recipe.model)
    saved = {e.key for e in model.sharded_state_dict().values() if isinstance(e, ShardedTensor | ShardedTensorFactory)}
    te = {te_spec_key(n, moe) for n, _ in model.named_parameters()}
    assert saved == te
    # The mapping is megatron-core's own (`sharded_state_dict_keys_map` of its local spec),
    # less the MoE pre-MLP norm that TE does not fuse.
    keys_map = layer_spec(recipe, "local").submodules.sharded_state_dict_keys_map
    assert keys_map["input_layernorm."] == "self_attention.linear_qkv.layer_norm_"
    assert ("pre_mlp_layernorm." in keys_map) is not moe
    if moe:
        assert "decoder.layers.pre_mlp_layernorm.weight" in saved


def test_trainer_loader_skips_te_extra_state_and_refuses_missing_tensors(tmp_path):
    """The trainer's weights loader on a CPU-converted checkpoint, with the model asking for one
    more `_extra_state` object as TE's norms may (kept as initialised) or one more tensor (refused)."""
    from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor
    from qwen_pretrain.training.checkpoint import load_model_weights
    from qwen_pretrain.training.checkpoint_dir import read_tracker
    from qwen_pretrain.training.model import build_tp1_model
    from qwen_pretrain.training.parallel import init_single_process
    from transformers import AutoModelForCausalLM

    hf = random_hf(tmp_path / "hf", "qwen3_tiny", seed=3)
    assert main(["convert", "hf-to-mcore", "--hf", str(hf), "--out", str(tmp_path / "mc"), "--quiet"]) == 0
    iter_dir = read_tracker(tmp_path / "mc")
    shape = get_recipe("qwen3_tiny").model
    init_single_process()

    def model_asking_for(extra):
        model = build_tp1_model(shape)
        plain = model.sharded_state_dict
        model.sharded_state_dict = lambda *a, **k: {**plain(*a, **k), **extra}
        return model

    te_norm_state = "decoder.layers.self_attention.q_layernorm._extra_state"
    model = model_asking_for({te_norm_state: ShardedObject(te_norm_state, None, (1,), (0,), replica_id=0)})
    load_model_weights(iter_dir, [model])
    ref = AutoModelForCausalLM.from_pretrained(hf).model.embed_tokens.weight
    assert torch.equal(model.embedding.word_embeddings.weight[: shape.vocab_size], ref)

    bogus = ShardedTensor.from_rank_offsets("decoder.layers.bogus.weight", torch.zeros(2), replica_id=0)
    with pytest.raises(UserError, match="decoder.layers.bogus.weight"):
        load_model_weights(iter_dir, [model_asking_for({"bogus": bogus})])


def test_legacy_checkpoint_of_another_spec_is_refused_before_any_work(tmp_path):
    from qwen_pretrain.training.train import TrainOptions, train

    hf = random_hf(tmp_path / "hf", "qwen3_tiny")
    legacy = tmp_path / "legacy"
    assert main(["convert", "hf-to-mcore", "--hf", str(hf), "--out", str(legacy), "--format", "legacy",
                 "--layer-spec", "local", "--quiet"]) == 0
    recipe = dataclasses.replace(get_recipe("qwen3_tiny"))
    gpu_te = rs.run_settings(recipe, "cuda", transformer_engine=True)
    with pytest.raises(UserError, match="written for the local layer spec.*builds the te spec.*--layer-spec te") as e:
        train(recipe, TrainOptions(load=str(legacy)), gpu_te)  # refused before any process group exists
    assert "\n" not in str(e.value)
    with pytest.raises(UserError, match="loads torch_dist"):
        train(recipe, TrainOptions(load=str(legacy)), rs.run_settings(recipe, "cpu"))
