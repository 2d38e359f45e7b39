"""`qwen-pretrain launch --backend mindspeed`: MindSpeed-LLM's pretrain_gpt.py on Ascend NPUs.

No NPU, CANN or MindSpeed-LLM here: the dry runs are read back (`bash -n`, the argument array
as bash itself expands it, every flag against the flag list generated from MindSpeed-LLM
v2.3.0's own parser), and one real torchrun runs the rendered script as every rank with a
stand-in `set_env.sh` and a stand-in `pretrain_gpt.py` that records what it was given.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys

import pytest
from qwen_pretrain.launch.cli import main
from qwen_pretrain.launch.mindspeed_llm_flags import Flag, flag_problems, flags_header, read_flags
from qwen_pretrain.launch.render_megatron import DataSpec
from qwen_pretrain.launch.render_mindspeed import MindSpeedRun, mindspeed_args
from qwen_pretrain.recipes import get_recipe, override

NODE_ENV = {"MASTER_ADDR": "node0", "MASTER_PORT": "29400", "NODE_RANK": "0"}
QWEN3_SPEC = ["--spec", "mindspeed_llm.tasks.models.spec.qwen3_spec", "layer_spec"]
FUSED = ["--use-flash-attn", "--use-fused-rmsnorm", "--use-fused-swiglu", "--use-fused-rotary-pos-emb"]
# The Qwen3-1.7B flow of MindSpeed-LLM's tests/0day/qwen3 on one 8-NPU node, one command away.
CASES = {
    "qwen3_1p7b": ["--tp", "8", "--pp", "1", "--seq-length", "4096", "--train-steps", "2000"],
    "qwen3_8b": [],
    "qwen3_30b_a3b": [],
}


def dry_run(capsys, monkeypatch, tmp_path, *argv: str) -> tuple[int, str, str]:
    monkeypatch.chdir(tmp_path)
    for k, v in NODE_ENV.items():
        monkeypatch.setenv(k, v)
    rc = main(["launch", "--backend", "mindspeed", *argv, "--dry-run"])
    out, err = capsys.readouterr()
    return rc, out, err


def written(out: str) -> dict[str, str]:
    """The files a dry run says it would write: {path: text}."""
    files, path, lines = {}, None, []
    for line in out.splitlines():
        if line.startswith("# ---- would write "):
            path, lines = line.removeprefix("# ---- would write "), []
        elif path and line == f"# ---- end of {path}":
            files[path], path = "\n".join(lines) + "\n", None
        elif path:
            lines.append(line)
    return files


def bash_args(script: str) -> list[str]:
    """The script's ARGS array as bash expands it."""
    block = script[script.index("ARGS=("):script.index("\n)\n") + 3]
    out = subprocess.run(["bash", "-c", block + 'printf "%s\\0" "${ARGS[@]}"'], capture_output=True, check=True)
    return out.stdout.decode().split("\0")[:-1]


@pytest.mark.parametrize("load", [False, True])
@pytest.mark.parametrize("launcher", ["torchrun", "slurm"])
@pytest.mark.parametrize("name", list(CASES))
def test_dry_run_renders_a_valid_script(capsys, monkeypatch, tmp_path, name, launcher, load):
    extra = CASES[name] + (["--load", "/ckpt/converted"] if load else [])
    extra += ["--no-container"] if launcher == "slurm" else []
    rc, out, err = dry_run(capsys, monkeypatch, tmp_path, "--recipe", name, "--launcher", launcher, "--nodes", "1",
                           "--gpus-per-node", "8", "--data-path", "/data/alpaca_text_document",
                           "--tokenizer-dir", "/models/tok", *extra)
    assert rc == 0, err
    files = written(out)
    script_path = str(tmp_path / "runs" / f"{name}-mindspeed" / f"mindspeed_pretrain_{name}.sh")
    script = files[script_path]
    subprocess.run(["bash", "-n"], input=script, text=True, check=True)
    for line in ("source /usr/local/Ascend/ascend-toolkit/set_env.sh",
                 "export HCCL_CONNECT_TIMEOUT=${HCCL_CONNECT_TIMEOUT:-1800}", "export CUDA_DEVICE_MAX_CONNECTIONS=1",
                 "export PYTORCH_NPU_ALLOC_CONF=${PYTORCH_NPU_ALLOC_CONF:-expandable_segments:True}",
                 "export NPU_ASD_ENABLE=0", "cd /opt/MindSpeed-LLM", 'exec python pretrain_gpt.py "${ARGS[@]}" "$@"'):
        assert line in script.splitlines(), line

    args = bash_args(script)
    assert flag_problems(args) == []
    recipe = override(get_recipe(name), tp=8, pp=1, seq_length=4096, train_steps=2000) if CASES[name] else get_recipe(name)
    data = DataSpec(blend=((1.0, "/data/alpaca_text_document"),), split=recipe.data.split, tokenizer_dir="/models/tok")
    assert args == mindspeed_args(recipe, data, MindSpeedRun("/models/tok", load="/ckpt/converted" if load else None))
    assert args[:4] == ["--use-mcore-models", *QWEN3_SPEC]
    assert all(f in args for f in FUSED)
    assert args[args.index("--tokenizer-type"):args.index("--tokenizer-type") + 4] == [
        "--tokenizer-type", "PretrainedFromHF", "--tokenizer-name-or-path", "/models/tok"]
    assert ("--norm-topk-prob" in args) == recipe.model.is_moe
    assert args[args.index("--kv-channels") + 1] == "128" and "--qk-layernorm" in args
    assert args[args.index("--padded-vocab-size") + 1] == str(recipe.model.padded_vocab_size(recipe.parallel.tp))
    for flag, value in (("--tensor-model-parallel-size", recipe.parallel.tp), ("--seq-length", recipe.training.seq_length),
                        ("--global-batch-size", recipe.training.global_batch_size), ("--seed", recipe.training.seed),
                        ("--train-iters", recipe.training.train_steps)):
        assert args[args.index(flag) + 1] == str(value), flag
    if load:  # converted weights: no optimizer or RNG state
        i = args.index("--load")
        assert args[i:i + 4] == ["--load", "/ckpt/converted", "--no-load-optim", "--no-load-rng"]
    else:
        assert not {"--load", "--no-load-optim", "--no-load-rng"} & set(args)

    lines = out.rstrip().splitlines()
    cmd = shlex.split(lines[-1])
    if launcher == "torchrun":
        assert cmd[1:3] == ["-m", "torch.distributed.run"] and cmd[-2:] == ["--no-python", script_path]
        assert cmd[cmd.index("--nproc-per-node") + 1] == "8"
    else:
        sbatch = files[cmd[2]]
        subprocess.run(["bash", "-n"], input=sbatch, text=True, check=True)
        assert "#SBATCH --gres=npu:8" in sbatch and "--gpus-per-node" not in sbatch
        assert sbatch.rstrip().endswith(f"--no-python {script_path}")


def test_commenting_out_a_line_keeps_the_rest(capsys, monkeypatch, tmp_path):
    """The failure of `\\`-continued commands ("--save: command not found") cannot happen."""
    rc, out, _ = dry_run(capsys, monkeypatch, tmp_path, "--recipe", "qwen3_8b", "--nodes", "1", "--gpus-per-node", "8",
                         "--mock-data", "--tokenizer-dir", "/tok", "--load", "/ckpt/in", "--save", "/ckpt/out")
    assert rc == 0
    (script,) = written(out).values()
    edited = script.replace("    --load /ckpt/in\n", "    # --load /ckpt/in\n")
    assert edited != script
    subprocess.run(["bash", "-n"], input=edited, text=True, check=True)
    args = bash_args(edited)
    assert "--load" not in args and args == [a for a in bash_args(script) if a not in ("--load", "/ckpt/in")]
    assert args[args.index("--save"):args.index("--save") + 4] == ["--save", "/ckpt/out", "--save-interval", "1000"]


def test_torchrun_runs_the_script_as_every_rank(tmp_path, monkeypatch, port):
    """A real torchrun with --no-python: each rank sources the CANN script, exports the Ascend
    environment, enters MindSpeed-LLM's checkout and execs pretrain_gpt.py with the arguments."""
    fake_env = tmp_path / "set_env.sh"
    fake_env.write_text("export FAKE_CANN_SOURCED=yes\n")
    checkout = tmp_path / "MindSpeed-LLM"
    checkout.mkdir()
    (checkout / "pretrain_gpt.py").write_text(
        "import json, os, sys\n"
        "keys = ('FAKE_CANN_SOURCED', 'HCCL_CONNECT_TIMEOUT', 'CUDA_DEVICE_MAX_CONNECTIONS', 'PYTORCH_NPU_ALLOC_CONF',"
        " 'NPU_ASD_ENABLE', 'RANK', 'WORLD_SIZE')\n"
        "record = {'argv': sys.argv[1:], 'cwd': os.getcwd(), 'env': {k: os.environ.get(k) for k in keys}}\n"
        "open(os.path.join(os.environ['OUT'], 'rank%s.json' % os.environ['RANK']), 'w').write(json.dumps(record))\n"
    )
    monkeypatch.chdir(tmp_path)
    for k, v in {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "NODE_RANK": "0", "OUT": str(tmp_path)}.items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("HCCL_CONNECT_TIMEOUT", raising=False)
    rc = main(["launch", "--recipe", "qwen3_tiny", "--backend", "mindspeed", "--nodes", "1", "--gpus-per-node", "2",
               "--mock-data", "--tokenizer-dir", str(tmp_path), "--python", sys.executable,
               "--mindspeed-llm-dir", str(checkout), "--cann-set-env", str(fake_env)])
    assert rc == 0
    script = tmp_path / "runs" / "qwen3_tiny-mindspeed" / "mindspeed_pretrain_qwen3_tiny.sh"
    assert os.access(script, os.X_OK)
    want = mindspeed_args(override(get_recipe("qwen3_tiny"), gpus=2), DataSpec(mock=True, tokenizer_dir=str(tmp_path)),
                          MindSpeedRun(str(tmp_path)))
    for rank in (0, 1):
        record = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert record["argv"] == want and record["cwd"] == str(checkout)
        assert record["env"] == {"FAKE_CANN_SOURCED": "yes", "HCCL_CONNECT_TIMEOUT": "1800", "CUDA_DEVICE_MAX_CONNECTIONS": "1",
                                 "PYTORCH_NPU_ALLOC_CONF": "expandable_segments:True", "NPU_ASD_ENABLE": "0",
                                 "RANK": str(rank), "WORLD_SIZE": "2"}


@pytest.mark.parametrize("argv, message", [
    (["--launcher", "nemo-run"], "--launcher torchrun or slurm"),
    (["--cpu"], "drop --cpu"),
    (["--no-tokenizer"], "pass --tokenizer-dir"),
    (["--launcher", "slurm", "--container"], "has no CANN or MindSpeed-LLM"),
])
def test_refusals(capsys, monkeypatch, tmp_path, argv, message):
    tok = [] if "--no-tokenizer" in argv else ["--tokenizer-dir", "/tok"]
    argv = [a for a in argv if a != "--no-tokenizer"]
    rc, _, err = dry_run(capsys, monkeypatch, tmp_path, "--recipe", "qwen3_8b", "--nodes", "1", "--gpus-per-node", "8",
                         "--mock-data", *tok, *argv)
    assert rc == 2 and message in err, err


def test_load_and_save_belong_to_mindspeed(capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    for k, v in NODE_ENV.items():
        monkeypatch.setenv(k, v)
    assert main(["launch", "--recipe", "qwen3_8b", "--backend", "megatron-lm", "--nodes", "1", "--gpus-per-node", "8",
                 "--mock-data", "--load", "/ckpt", "--dry-run"]) == 2
    assert "--backend mindspeed only" in capsys.readouterr().err


def test_flag_list_is_pinned_and_checks_values():
    header = flags_header()
    assert header["mindspeed-llm tag"] == "v2.3.0"
    assert header["mindspeed tag"] == "v2.3.0_core_r0.12.1" and header["megatron-lm tag"] == "core_v0.12.1"
    assert all(len(header[f"{k} commit"]) == 40 for k in ("mindspeed-llm", "mindspeed", "megatron-lm"))
    flags = read_flags()
    assert flags["--spec"].kind == "values" and flags["--use-fused-rmsnorm"] == Flag("switch")
    assert "PretrainedFromHF" in flags["--tokenizer-type"].choices
    assert flag_problems(["--no-such-flag", "--bf16", "1", "--seq-length", "--tokenizer-type", "Nope"]) == [
        "--no-such-flag: not a flag of MindSpeed-LLM's pretrain_gpt.py", "--bf16 takes no value, got ['1']",
        "--seq-length takes one value, got []", "--tokenizer-type Nope: not one of " + ", ".join(flags["--tokenizer-type"].choices),
    ]


def test_every_recipe_renders_known_flags():
    from qwen_pretrain.recipes import all_recipes

    for recipe in all_recipes():
        for data in (DataSpec(mock=True), DataSpec(blend=((0.7, "/d/a"), (0.3, "/d/b")))):
            args = mindspeed_args(recipe, data, MindSpeedRun("/tok", load="/in", save="/out"))
            assert flag_problems(args) == [], recipe.name
            assert (args[1:4] == QWEN3_SPEC[:3]) == (recipe.model.family in ("qwen3", "qwen3_moe")), recipe.name


def test_planner_knows_the_910b(capsys):
    assert main(["recipes", "show", "qwen3_1p7b", "--gpus", "8", "--tp", "8", "--pp", "1", "--seq-length", "4096",
                 "--gpu", "910b"]) == 0
    out = capsys.readouterr().out
    assert "TP=8 PP=1" in out and "on 910b" in out and "fits in 64 GB" in out
    assert main(["recipes", "suggest", "qwen3_1p7b", "--gpus", "8", "--gpu", "910b"]) == 0
    assert "64 GB each" in capsys.readouterr().out
