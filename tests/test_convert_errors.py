"""Bad input to the converters: one-line errors naming the tensor/option; nothing left behind."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from qwen_pretrain.conversion import hf_io
from qwen_pretrain.conversion.convert import hf_to_mcore
from qwen_pretrain.conversion.mapping import expected_hf_shapes
from qwen_pretrain.launch.cli import main
from qwen_pretrain.recipes import get_recipe
from qwen_pretrain.recipes.errors import UserError
from safetensors.torch import load_file, save_file

SHAPE = dataclasses.replace(get_recipe("qwen3_tiny").model, vocab_size=512)


def _hf(path: Path, shape=SHAPE, edit=None) -> Path:
    path.mkdir(parents=True)
    tensors = {k: torch.zeros(s) for k, s in expected_hf_shapes(shape).items()}
    if edit:
        edit(tensors)
    save_file(tensors, str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps(hf_io.hf_config_for(shape)))
    return path


def _fails(tmp_path: Path, hf: Path, match: str, **kw) -> None:
    with pytest.raises(UserError, match=match) as err:
        hf_to_mcore(hf, tmp_path / "out", quiet=True, **kw)
    assert "\n" not in str(err.value)
    assert list(tmp_path.glob("*out*")) == []  # no checkpoint, no temporary directory


def test_missing_tensor(tmp_path: Path) -> None:
    hf = _hf(tmp_path / "hf", edit=lambda t: t.pop("model.layers.2.mlp.up_proj.weight"))
    _fails(tmp_path, hf, "model.layers.2.mlp.up_proj.weight' is missing")


def test_extra_tensor(tmp_path: Path) -> None:
    hf = _hf(tmp_path / "hf", edit=lambda t: t.update({"model.layers.9.mlp.up_proj.weight": torch.zeros(2)}))
    _fails(tmp_path, hf, "unexpected tensor 'model.layers.9.mlp.up_proj.weight'")


def test_shape_mismatch_names_the_tensor(tmp_path: Path) -> None:
    hf = _hf(tmp_path / "hf", edit=lambda t: t.update({"model.layers.1.self_attn.o_proj.weight": torch.zeros(64, 64)}))
    _fails(tmp_path, hf, "model.layers.1.self_attn.o_proj.weight' has shape")


def test_config_against_recipe(tmp_path: Path) -> None:
    hf = _hf(tmp_path / "hf")  # vocab 512, the recipe says 151936
    _fails(tmp_path, hf, "vocab_size is 512 in config.json but 151936", recipe="qwen3_tiny")


def test_tp_not_dividing_heads(tmp_path: Path) -> None:
    hf = _hf(tmp_path / "hf")
    _fails(tmp_path, hf, "--tp 3 must divide", tp=3)
    assert main(["convert", "hf-to-mcore", "--hf", str(hf), "--out", str(tmp_path / "out"), "--tp", "3"]) == 2


@pytest.mark.parametrize(
    "name,sizes,recipe_line,converter_message",
    [
        ("qwen3_8b", dict(tp=3),
         "[tp-divides-heads] TP=3 must divide num_attention_heads=32 and num_query_groups=8; nearest valid TP: 2 or 4",
         "--tp 3 must divide num_attention_heads=32 and num_query_groups=8; nearest valid TP: 2 or 4"),
        ("qwen3_8b", dict(pp=5),
         "[layers-divide-pp-vpp] num_layers=36 is not divisible by PP x VPP = 5 x 1; nearest valid PP: 4 or 6",
         "num_layers=36 is not divisible by --pp x --vpp = 5 x 1; nearest valid PP: 4 or 6"),
        ("qwen3_1p7b", dict(vpp=2),
         "[vpp-needs-pp] VPP=2 needs PP > 1 (interleaved schedule); unset VPP or raise PP",
         "--vpp 2 needs --pp > 1 (interleaved schedule); unset --vpp or raise --pp"),
        ("qwen3_30b_a3b", dict(ep=3),
         "[ep-divides-experts] EP=3 must divide num_experts=128; nearest valid EP: 2 or 4",
         "--ep 3 must divide num_experts=128; nearest valid EP: 2 or 4"),
        ("qwen3_8b", dict(ep=2),
         "[ep-needs-moe] EP=2 needs a mixture-of-experts model; set EP=1",
         "--ep 2 needs a mixture-of-experts model; set --ep 1"),
    ],
)  # fmt: skip
def test_layout_rules_are_the_recipe_validators(name, sizes, recipe_line, converter_message) -> None:
    """The converter's layout checks are the recipe validator's rules and messages, each size
    named by the option that set it."""
    from qwen_pretrain.conversion.layout import McoreLayout
    from qwen_pretrain.recipes import override, validate_layout

    recipe = override(get_recipe(name), **sizes, off_benchmark=True)
    assert recipe_line in validate_layout(recipe)
    with pytest.raises(UserError) as err:
        McoreLayout(**sizes).validate(recipe.model)
    assert str(err.value) == converter_message


def test_other_architecture(tmp_path: Path) -> None:
    hf = _hf(tmp_path / "hf")
    cfg = json.loads((hf / "config.json").read_text()) | {"architectures": ["LlamaForCausalLM"]}
    (hf / "config.json").write_text(json.dumps(cfg))
    _fails(tmp_path, hf, "architecture 'LlamaForCausalLM' is not supported")


def test_failure_midway_leaves_nothing(tmp_path: Path) -> None:
    # the last layer's tensor is truncated on disk: found only after earlier stages were written
    hf = _hf(tmp_path / "hf", edit=lambda t: t.update({"model.layers.3.mlp.down_proj.weight": torch.zeros(64, 7)}))
    _fails(tmp_path, hf, "down_proj.weight' has shape", pp=2, fmt="legacy")


def test_existing_output_is_refused(tmp_path: Path) -> None:
    hf = _hf(tmp_path / "hf")
    (tmp_path / "out").mkdir()
    with pytest.raises(UserError, match="already exists"):
        hf_to_mcore(hf, tmp_path / "out", quiet=True)


def test_unknown_shape_builds_from_config(tmp_path: Path) -> None:
    hf = _hf(tmp_path / "hf")
    shape, recipe = hf_io.resolve_shape(json.loads((hf / "config.json").read_text()), None)
    assert recipe is None and shape.vocab_size == 512 and shape.qk_norm and shape.tie_embeddings
    real = _hf(tmp_path / "real", shape=get_recipe("qwen25_tiny").model)
    assert hf_io.resolve_shape(json.loads((real / "config.json").read_text()), None)[1] == "qwen25_tiny"
    assert load_file(str(real / "model.safetensors"))  # sanity: the helper wrote a readable file


@pytest.mark.parametrize("option", ["--tp", "--pp", "--ep", "--etp", "--vpp"])
def test_zero_parallel_size_is_refused_by_the_parser(tmp_path, option, capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["convert", "hf-to-mcore", "--hf", str(tmp_path), "--out", str(tmp_path / "out"), option, "0"])
    assert exc.value.code == 2
    assert f"argument {option}: must be a positive integer, got 0" in capsys.readouterr().err
