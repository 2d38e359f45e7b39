"""Run settings decided by the target device, not by the machine running the command.

`qwen-pretrain train --print-config` for every acceptance recipe on cuda and on cpu, read back as
JSON and checked against what NVIDIA's recipes use on GPUs; the refusal of a real recipe where
CUDA is not visible; the environment the torchrun launcher, `train --nproc` and the Slurm script
export. This machine has no GPU: where a test needs "CUDA visible", `torch.cuda.is_available` is
monkeypatched, a stand-in, and nothing that would touch a GPU runs (the process spawn is
replaced too).
"""

from __future__ import annotations

import json

import pytest
import torch
from qwen_pretrain.launch.cli import main
from qwen_pretrain.recipes import all_recipes, get_recipe
from qwen_pretrain.training import run_settings as rs

ACCEPTANCE = [r.name for r in all_recipes() if r.acceptance]
FUSIONS = ("bias_activation_fusion", "bias_dropout_fusion", "masked_softmax_fusion", "apply_rope_fusion",
           "gradient_accumulation_fusion", "cross_entropy_loss_fusion")


def print_config(capsys, *argv: str) -> dict:
    assert main(["train", *argv, "--print-config"]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.fixture
def probes_forbidden(monkeypatch):
    """Any look at this machine fails the test: the settings must come from the arguments alone."""
    def forbidden(*args, **kwargs):
        raise AssertionError("the machine running the command was probed")

    monkeypatch.setattr(torch.cuda, "is_available", forbidden)
    monkeypatch.setattr(rs, "transformer_engine_importable", forbidden)


@pytest.mark.parametrize("name", ACCEPTANCE)
def test_cuda_settings_are_nvidias_for_every_acceptance_recipe(capsys, probes_forbidden, name):
    recipe = get_recipe(name)
    c = print_config(capsys, "--recipe", name, "--device", "cuda")
    assert (c["recipe"], c["device"], c["layer_spec"], c["precision"], c["process_group_backend"]) == (
        name, "cuda", "te", "bf16", "nccl")
    tc = c["transformer_config"]
    assert tc["bf16"] is True and tc["params_dtype"] == "bfloat16"
    assert all(tc[f] is True for f in FUSIONS), tc
    assert tc["moe_grouped_gemm"] is recipe.model.is_moe and tc["moe_permute_fusion"] is recipe.model.is_moe
    assert c["ddp"] | {"check_for_nan_in_grad": None} == {
        "use_distributed_optimizer": True, "overlap_grad_reduce": True, "overlap_param_gather": True,
        "grad_reduce_in_fp32": True, "average_in_collective": True, "check_for_nan_in_grad": None}
    assert c["optimizer"]["use_distributed_optimizer"] is True and c["optimizer"]["bf16"] is True
    assert c["env"]["CUDA_DEVICE_MAX_CONNECTIONS"] == "1" and c["env"] == rs.GPU_ENVIRONMENT


@pytest.mark.parametrize("name", ACCEPTANCE)
def test_cpu_settings_are_the_unfused_reference(capsys, probes_forbidden, name):
    c = print_config(capsys, "--recipe", name, "--device", "cpu")
    assert (c["layer_spec"], c["precision"], c["process_group_backend"], c["transformer_engine"]) == (
        "local", "fp32", "gloo", False)
    tc = c["transformer_config"]
    assert not any(tc[f] for f in (*FUSIONS, "moe_grouped_gemm", "moe_permute_fusion", "bf16"))
    assert not c["ddp"]["overlap_grad_reduce"] and not c["ddp"]["overlap_param_gather"]
    assert c["env"] == {}


def test_no_te_describes_a_gpu_host_without_transformer_engine(capsys, probes_forbidden):
    c = print_config(capsys, "--recipe", "qwen3_30b_a3b", "--device", "cuda", "--no-te")
    tc = c["transformer_config"]
    assert (c["layer_spec"], c["precision"], c["process_group_backend"]) == ("local", "bf16", "nccl")
    # TE's kernels are off; megatron-core's own jit-fused ones stay on.
    assert not any(tc[f] for f in ("apply_rope_fusion", "gradient_accumulation_fusion", "moe_grouped_gemm",
                                   "moe_permute_fusion"))
    assert tc["bias_activation_fusion"] and tc["masked_softmax_fusion"] and tc["cross_entropy_fusion_impl"] == "native"
    assert c["ddp"]["overlap_grad_reduce"] and c["env"]["CUDA_DEVICE_MAX_CONNECTIONS"] == "1"


def test_the_model_is_built_from_the_printed_settings():
    """What `--print-config` prints is what TransformerConfig gets (TE kernels cannot be built
    on CPU, so the cuda keyword arguments are compared, the cpu ones also built)."""
    from qwen_pretrain.training.model import transformer_config, transformer_config_kwargs

    recipe = get_recipe("qwen3_30b_a3b")
    cuda = rs.run_settings(recipe, "cuda")
    kwargs = transformer_config_kwargs(recipe, cuda)
    for key, value in cuda.transformer_config.items():
        assert kwargs[key] == (getattr(torch, value) if key.endswith("_dtype") else value), key
    tiny = get_recipe("qwen3_tiny")
    config = transformer_config(tiny, rs.run_settings(tiny, "cpu"))
    assert config.params_dtype == torch.float32 and not config.apply_rope_fusion and not config.bf16
    # Dense models leave the MoE-only fields at megatron-core's defaults.
    assert "moe_grouped_gemm" not in transformer_config_kwargs(tiny, rs.run_settings(tiny, "cuda"))


def test_without_cuda_a_real_recipe_is_refused_and_a_tiny_one_defaults_to_cpu(capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["train", "--recipe", "qwen3_8b", "--print-config"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--device cpu" in err and "CUDA is not visible" in err
    assert print_config(capsys, "--recipe", "qwen3_tiny")["device"] == "cpu"


def test_with_cuda_visible_the_default_device_is_cuda(capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # stand-in for a GPU node
    monkeypatch.setattr(rs, "transformer_engine_importable", lambda: pytest.fail("TE probed for --print-config"))
    c = print_config(capsys, "--recipe", "qwen3_tiny")
    assert (c["device"], c["layer_spec"]) == ("cuda", "te")  # TE assumed, as in the NGC images


def test_nothing_starts_when_the_device_is_missing(capsys, monkeypatch):
    import qwen_pretrain.launch.train_cmd as train_cmd

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(train_cmd.subprocess, "run", lambda *a, **k: pytest.fail("torchrun was started"))
    assert main(["train", "--recipe", "qwen3_8b", "--mock-data", "--nproc", "8"]) == 2
    assert "--device cpu" in capsys.readouterr().err
    assert main(["train", "--recipe", "qwen3_tiny", "--mock-data", "--nproc", "2", "--device", "cuda"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--device cuda: CUDA is not visible" in err


def test_train_nproc_exports_the_gpu_environment_where_unset(capsys, monkeypatch):
    import qwen_pretrain.launch.train_cmd as train_cmd

    seen = {}

    class Done:
        returncode = 0

    def fake_run(cmd, env):
        seen.update(cmd=cmd, env=env)
        return Done()

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # stand-in; torchrun is not started
    monkeypatch.setattr(train_cmd.subprocess, "run", fake_run)
    monkeypatch.setenv("NCCL_DEBUG", "INFO")  # the site's own value wins
    monkeypatch.delenv("CUDA_DEVICE_MAX_CONNECTIONS", raising=False)
    assert main(["train", "--recipe", "qwen3_tiny", "--mock-data", "--nproc", "2"]) == 0
    env = seen["env"]
    assert env["CUDA_DEVICE_MAX_CONNECTIONS"] == "1" and env["NCCL_DEBUG"] == "INFO"
    assert all(k in env for k in rs.GPU_ENVIRONMENT)


def test_torchrun_launcher_and_slurm_export_the_same_environment(capsys, monkeypatch, tmp_path):
    import qwen_pretrain.launch.launcher as launcher

    monkeypatch.chdir(tmp_path)
    for k, v in {"MASTER_ADDR": "node0", "MASTER_PORT": "29400", "NODE_RANK": "0"}.items():
        monkeypatch.setenv(k, v)
    common = ["launch", "--recipe", "qwen3_8b", "--backend", "mcore", "--nodes", "1", "--gpus-per-node", "8",
              "--mock-data"]
    assert main([*common, "--launcher", "torchrun", "--dry-run"]) == 0
    out = capsys.readouterr().out
    (env_line,) = [ln for ln in out.splitlines() if ln.startswith("# with the environment")]
    exported = dict(kv.split("=", 1) for kv in env_line.split(": ", 1)[1].split())
    assert exported == rs.GPU_ENVIRONMENT
    assert "--device cuda" in out.splitlines()[-1]

    assert main([*common, "--launcher", "slurm", "--container", "--dry-run"]) == 0
    sbatch = capsys.readouterr().out
    for k, v in rs.GPU_ENVIRONMENT.items():
        assert f"export {k}=${{{k}:-{v}}}" in sbatch

    # Not a dry run: the command gets the environment, the node's own values first.
    seen = {}

    class Done:
        returncode = 0

    monkeypatch.setattr(launcher.subprocess, "run", lambda cmd, env: seen.update(env=env) or Done())
    monkeypatch.setenv("NCCL_IB_TIMEOUT", "18")
    assert main([*common, "--launcher", "torchrun"]) == 0
    assert seen["env"]["CUDA_DEVICE_MAX_CONNECTIONS"] == "1" and seen["env"]["NCCL_IB_TIMEOUT"] == "18"


def test_cpu_launch_passes_device_cpu_and_no_gpu_environment(capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    for k, v in {"MASTER_ADDR": "node0", "MASTER_PORT": "29400", "NODE_RANK": "0"}.items():
        monkeypatch.setenv(k, v)
    assert main(["launch", "--recipe", "qwen3_tiny", "--cpu", "--nodes", "1", "--gpus-per-node", "2",
                 "--mock-data", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "--device cpu" in out.splitlines()[-1] and "# with the environment" not in out
