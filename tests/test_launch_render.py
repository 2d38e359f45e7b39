"""`qwen-pretrain launch --dry-run` for every backend x launcher x acceptance recipe, the
renderers behind it, and the refusals. Nothing here needs Slurm, NeMo or a GPU: the dry run
prints what would run and these tests read it back (shell syntax with `bash -n`, Python with
`compile`, Megatron-LM flags against the parser of a named release). The NeMo script's own checks
for what a NeMo release lacks run against small stand-in `nemo` packages."""

from __future__ import annotations

import argparse
import ast
import importlib.util
import shlex
import subprocess
import sys

import pytest
from qwen_pretrain.launch.cli import main
from qwen_pretrain.launch.megatron_lm_flags import flags_header, read_flags
from qwen_pretrain.launch.render_megatron import DataSpec, megatron_lm_args
from qwen_pretrain.launch.slurm import DEFAULT_IMAGE
from qwen_pretrain.recipes import all_recipes, get_recipe

ACCEPTANCE = [r.name for r in all_recipes() if r.acceptance]
BACKENDS = ("mcore", "nemo", "megatron-lm")
LAUNCHERS = ("torchrun", "slurm", "nemo-run")
NODE_ENV = {"MASTER_ADDR": "node0", "MASTER_PORT": "29400", "NODE_RANK": "0"}


def dry_run(capsys, monkeypatch, tmp_path, *argv: str) -> tuple[int, str, str]:
    monkeypatch.chdir(tmp_path)
    rc = main(["launch", *argv, "--dry-run"])
    out, err = capsys.readouterr()
    return rc, out, err


def written(out: str) -> dict[str, str]:
    """The files a dry run says it would write: {path: text}."""
    files, path, lines = {}, None, []
    for line in out.splitlines():
        if line.startswith("# ---- would write "):
            path, lines = line.removeprefix("# ---- would write "), []
        elif path and line == f"# ---- end of {path}":
            files[path] = "\n".join(lines) + "\n"
            path = None
        elif path:
            lines.append(line)
    return files


def command(out: str) -> list[str]:
    lines = out.rstrip().splitlines()
    assert lines[-2] == "# would run:"
    return shlex.split(lines[-1])


def literal(source: str, name: str):
    """The value of a top-level `NAME = <literal>` in a rendered Python script."""
    for node in ast.parse(source).body:
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", None) == name:
            return ast.literal_eval(node.value)
    raise AssertionError(f"{name} not found")


def check_megatron_flags(args: list[str]) -> None:
    flags = read_flags()
    for i, tok in enumerate(args):
        if not tok.startswith("--"):
            continue
        assert tok in flags, f"{tok} is not a Megatron-LM {flags_header()['tag']} flag"
        takes_value = i + 1 < len(args) and not args[i + 1].startswith("--")
        assert takes_value == (flags[tok] == "value"), f"{tok}: expected a {flags[tok]}"


def train_parser() -> argparse.ArgumentParser | None:
    if importlib.util.find_spec("qwen_pretrain.training.cli") is None:
        return None
    from qwen_pretrain.training.cli import add_train_arguments

    p = argparse.ArgumentParser(exit_on_error=False)
    add_train_arguments(p)
    return p


@pytest.mark.parametrize("launcher", LAUNCHERS)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ACCEPTANCE)
def test_dry_run_every_backend_launcher_recipe(capsys, monkeypatch, tmp_path, name, backend, launcher):
    recipe = get_recipe(name)
    per_node = 8
    nodes = recipe.gpus // per_node
    for k, v in NODE_ENV.items():
        monkeypatch.setenv(k, v)
    extra = ["--container"] if launcher == "slurm" else []
    executor = "slurm" if launcher == "nemo-run" and nodes > 1 else "local"  # local: one node only
    if executor == "slurm":
        extra = ["--executor", "slurm", "--account", "acct", "--container"]
    rc, out, _ = dry_run(capsys, monkeypatch, tmp_path, "--recipe", name, "--backend", backend,
                         "--launcher", launcher, "--nodes", str(nodes), "--gpus-per-node", "8",
                         "--mock-data", *extra)
    assert rc == 0
    assert f"GBS {recipe.training.global_batch_size}, seq {recipe.training.seq_length}" in out
    files, cmd = written(out), command(out)

    # What each process runs, wherever it appears.
    if backend == "megatron-lm":
        text = out
        i = text.index("pretrain_gpt.py")
        assert "/opt/megatron-lm/pretrain_gpt.py" in text[i - 30:i + 20]
        mlm_args = megatron_lm_args(recipe, DataSpec(mock=True))
        check_megatron_flags(mlm_args)
        if launcher == "torchrun":
            assert cmd[cmd.index("/opt/megatron-lm/pretrain_gpt.py") + 1:] == mlm_args
    if backend == "nemo":
        (script,) = [t for p, t in files.items() if p.endswith(f"nemo_pretrain_{name}.py")]
        compile(script, "nemo_script", "exec")
        assert literal(script, "MODEL") == recipe.nemo_recipe
        s = literal(script, "SETTINGS")
        assert s["data.global_batch_size"] == recipe.training.global_batch_size
        assert s["data.seq_length"] == recipe.training.seq_length
        assert s["trainer.strategy.tensor_model_parallel_size"] == recipe.parallel.tp
        assert s["trainer.num_nodes"] == nodes and s["trainer.devices"] == per_node
        assert "TimingCallback, log_tokens_per_sec=True" in script
    if backend == "mcore" and launcher == "torchrun":
        i = cmd.index("-m", 3)
        assert cmd[i + 1] == "qwen_pretrain.training.cli"
        parser = train_parser()
        if parser is not None:  # every flag we pass exists in the trainer's parser
            ns = parser.parse_args(cmd[i + 2:])
            assert ns.recipe == name and ns.mock_data

    # How the processes start.
    if launcher == "torchrun":
        assert cmd[1:3] == ["-m", "torch.distributed.run"]
        for flag, value in (("--nnodes", str(nodes)), ("--nproc-per-node", "8"), ("--node-rank", "0"),
                            ("--master-addr", "node0"), ("--master-port", "29400")):
            assert cmd[cmd.index(flag) + 1] == value
    elif launcher == "slurm":
        assert cmd[:2] == ["sbatch", "--parsable"]
        sbatch = files[cmd[2]]
        for line in (f"#SBATCH --nodes={nodes}", "#SBATCH --gpus-per-node=8", "#SBATCH --exclusive",
                     "#SBATCH --time=04:00:00", 'MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)',
                     f"--container-image={DEFAULT_IMAGE}", "export NCCL_DEBUG=${NCCL_DEBUG:-WARN}"):
            assert line in sbatch, line
        tasks = 8 if backend == "nemo" else 1
        assert f"#SBATCH --ntasks-per-node={tasks}" in sbatch
        subprocess.run(["bash", "-n"], input=sbatch, text=True, check=True)
    else:
        script = files[cmd[1]]
        compile(script, "nemo_run_script", "exec")
        ex = literal(script, "EXECUTOR")
        assert (ex["nodes"], ex["procs_per_node"], ex["kind"]) == (nodes, 8, executor)
        assert cmd[2:] == ["--executor", executor]
        if executor == "slurm":
            assert ex["container_image"] == DEFAULT_IMAGE and ex["account"] == "acct"


def test_every_megatron_flag_exists_for_every_recipe():
    header = flags_header()
    assert header["tag"] == "core_v0.16.1" and len(header["commit"]) == 40
    for recipe in all_recipes():
        for data in (DataSpec(mock=True), DataSpec(blend=((0.7, "/d/a"), (0.3, "/d/b")), tokenizer_dir="/tok")):
            check_megatron_flags(megatron_lm_args(recipe, data))


def test_megatron_args_carry_the_qwen_specifics():
    def flagset(name):
        return megatron_lm_args(get_recipe(name), DataSpec(blend=((1.0, "/d/x"),), tokenizer_dir="/tok"))

    q3, q25, moe = flagset("qwen3_tiny"), flagset("qwen25_7b"), flagset("qwen3_30b_a3b")
    assert "--qk-layernorm" in q3 and "--qk-layernorm" not in q25
    assert q3[q3.index("--kv-channels") + 1] == "32"  # head_dim != hidden / heads
    assert "--untie-embeddings-and-output-weights" not in q3  # tied
    assert "--add-qkv-bias" in q25 and "--disable-bias-linear" in q25
    assert "--untie-embeddings-and-output-weights" in q25
    assert q25[q25.index("--padded-vocab-size") + 1] == str(get_recipe("qwen25_7b").model.padded_vocab_size(2))
    assert q25[q25.index("--rotary-base") + 1] == "1000000"
    assert q25[q25.index("--data-path") + 1:q25.index("--data-path") + 3] == ["1", "/d/x"]
    assert moe[moe.index("--num-experts") + 1] == "128" and moe[moe.index("--moe-router-topk") + 1] == "8"
    assert "--moe-router-pre-softmax" not in moe  # norm_topk_prob: softmax over the chosen experts
    assert moe[moe.index("--expert-model-parallel-size") + 1] == "4"
    vpp = flagset("qwen25_72b")
    assert vpp[vpp.index("--num-layers-per-virtual-pipeline-stage") + 1] == "4"  # 80 / (4 x 5)


def test_torchrun_env_missing_listed_in_one_error(capsys, monkeypatch, tmp_path):
    for k in ("MASTER_ADDR", "MASTER_PORT", "NNODES", "NODE_RANK", "GPUS_PER_NODE"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("MASTER_PORT", "x1")
    rc, _, err = dry_run(capsys, monkeypatch, tmp_path, "--recipe", "qwen3_tiny", "--mock-data")
    assert rc == 2
    assert err.count("\n") == 1
    assert "MASTER_ADDR, NNODES, NODE_RANK, GPUS_PER_NODE" in err and "MASTER_PORT='x1'" in err


@pytest.mark.parametrize("argv, message", [
    (["--recipe", "qwen25_72b", "--launcher", "slurm", "--nodes", "2", "--container"],
     "needs at least 32 GPUs"),
    (["--recipe", "qwen3_8b", "--launcher", "slurm", "--tp", "3", "--container"], "tp-divides-heads"),
    (["--recipe", "qwen3_8b", "--launcher", "slurm"], "Slurm GPU jobs run in a container"),
    (["--recipe", "qwen3_8b", "--launcher", "slurm", "--container", "/nonexistent/img.sqsh"], "no such file"),
    (["--recipe", "qwen3_8b", "--launcher", "slurm", "--container", "--no-container"], "contradict"),
    (["--recipe", "qwen3_tiny", "--backend", "nemo", "--launcher", "slurm", "--cpu"], "no NeMo 2 counterpart"),
    (["--recipe", "qwen3_8b", "--backend", "nemo", "--launcher", "slurm", "--container", "--seed", "7",
      "--off-benchmark"], "seeds model-parallel RNGs with 1234"),
    (["--recipe", "qwen3_8b", "--launcher", "nemo-run", "--executor", "slurm", "--container"], "needs --account"),
])
def test_refusals_before_submission(capsys, monkeypatch, tmp_path, argv, message):
    rc, out, err = dry_run(capsys, monkeypatch, tmp_path, *argv, "--mock-data")
    assert rc == 2 and message in err and out == ""
    assert not any(tmp_path.iterdir())  # nothing written


def test_data_decision_required(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("MASTER_ADDR", "h"), monkeypatch.setenv("MASTER_PORT", "1"), monkeypatch.setenv("NODE_RANK", "0")
    monkeypatch.chdir(tmp_path)
    rc = main(["launch", "--recipe", "qwen3_tiny", "--nodes", "1", "--gpus-per-node", "2", "--dry-run"])
    assert rc == 2 and "--mock-data" in capsys.readouterr().err


def test_off_benchmark_is_allowed_and_marked(capsys, monkeypatch, tmp_path):
    rc, out, _ = dry_run(capsys, monkeypatch, tmp_path, "--recipe", "qwen25_72b", "--launcher", "slurm",
                         "--nodes", "1", "--tp", "8", "--pp", "1", "--container", "--off-benchmark",
                         "--mock-data", "--backend", "megatron-lm")
    assert rc == 0
    (sbatch,) = written(out).values()
    assert "# OFF-BENCHMARK: qwen25_72b runs with GPUs=8" in sbatch


def test_data_blend_and_cpu_job(capsys, monkeypatch, tmp_path):
    rc, out, _ = dry_run(capsys, monkeypatch, tmp_path, "--recipe", "qwen3_tiny", "--launcher", "slurm",
                         "--cpu", "--nodes", "1", "--gpus-per-node", "2", "--data-path", "0.3", "a/x", "0.7", "b/y",
                         "--run-dir", str(tmp_path / "r"))
    assert rc == 0
    (sbatch,) = written(out).values()
    assert "--gpus-per-node" not in sbatch.split("srun")[0] and "--container-image" not in sbatch
    assert "#SBATCH --cpus-per-task=2" in sbatch and "NCCL" not in sbatch
    assert f"--data-path 0.3 {tmp_path}/a/x 0.7 {tmp_path}/b/y" in sbatch
    assert f"#SBATCH --output={tmp_path}/r/%x-%j.log" in sbatch


def test_container_mounts_for_data_and_source(capsys, monkeypatch, tmp_path):
    rc, out, _ = dry_run(capsys, monkeypatch, tmp_path, "--recipe", "qwen3_8b", "--launcher", "slurm",
                         "--container", "my/img:1", "--data-path", "/data/c4/text", "--container-mounts", "/scratch:/scratch")
    assert rc == 0
    (sbatch,) = written(out).values()
    mounts = sbatch.split("--container-mounts=")[1].split()[0].split(",")
    assert "/scratch:/scratch" in mounts and "/data/c4:/data/c4" in mounts
    assert any(m.endswith(":/opt/qwen-pretrain-src/qwen_pretrain") for m in mounts)
    assert "export PYTHONPATH=/opt/qwen-pretrain-src" in sbatch and "--container-image=my/img:1" in sbatch


# Stand-ins for what an older or newer NeMo lacks, so that the rendered script's own checks run
# here without NeMo: case -> (the release the stand-in claims to be, {file under a PYTHONPATH
# folder: source}, how the one line must start).
_NEMO_RUN_STUB = {"nemo_run/__init__.py": "class Config:\n    def __init__(self, fn, **kwargs):\n        pass\n"}
_NEMO_2_STUB = {
    "nemo/collections/__init__.py": "",
    "nemo/utils/__init__.py": "",
    "nemo/utils/exp_manager.py": "class TimingCallback:\n    def __init__(self, log_tokens_per_sec=False):\n"
                                 "        pass\n",
}
_QWEN3_8B_STUB = {  # a recipe object with just the attributes the script sets
    "nemo/collections/llm/__init__.py": "from . import qwen3_8b\n",
    "nemo/collections/llm/qwen3_8b.py": "from types import SimpleNamespace as NS\n\n\ndef pretrain_recipe(**kwargs):\n"
    "    return NS(data=NS(tokenizer=None), trainer=NS(strategy=NS(pipeline_dtype=None), callbacks=[]))\n",
}
NEMO_LACKS = {
    "no nemo.collections.llm (NeMo 3)": (
        "3.0.0", {"nemo/collections/__init__.py": ""},
        "error: NeMo 3.0.0: cannot import nemo.collections.llm (cannot import name 'llm' from"),
    "no Qwen3 recipe (NeMo 2.3)": (
        "2.3.0", {**_NEMO_2_STUB, "nemo/collections/llm/__init__.py": "",
                  "nemo/collections/llm/recipes/__init__.py": ""},
        "error: NeMo 2.3.0 has no recipe llm.qwen3_8b (NeMo added its Qwen3 recipes in 2.4)"),
    "recipes failed to import": (  # NeMo only warns, e.g. when a module they import is broken
        "2.5.3", {**_NEMO_2_STUB, "nemo/collections/llm/__init__.py": "",
                  "nemo/collections/llm/recipes/__init__.py": "", "nemo/collections/llm/recipes/qwen3_8b.py": ""},
        "error: NeMo 2.5.3 has no recipe llm.qwen3_8b (its recipes failed to import (NeMo's warning above"),
    "no log_tokens_per_sec": (
        "2.0.0", {**_NEMO_2_STUB, **_QWEN3_8B_STUB,
                  "nemo/utils/exp_manager.py": "class TimingCallback:\n    def __init__(self, timer_kwargs=None):\n"
                                               "        pass\n"},
        "error: NeMo 2.0.0's TimingCallback has no log_tokens_per_sec option"),
}


@pytest.mark.parametrize("case", list(NEMO_LACKS))
def test_nemo_script_stops_in_one_line_where_nemo_lacks_a_feature(tmp_path, case):
    """Feature checks, not version checks: what is missing is named with the release and what to do."""
    from qwen_pretrain.launch.nemo_run import ExecutorOptions
    from qwen_pretrain.launch.render_nemo import render_nemo_script

    release, files, message = NEMO_LACKS[case]
    for rel, text in {**_NEMO_RUN_STUB, "nemo/__init__.py": f"__version__ = {release!r}\n", **files}.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    opts = ExecutorOptions(kind="direct", nodes=1, procs_per_node=8, use_gpus=True, job_dir=str(tmp_path))
    script = tmp_path / "nemo_pretrain_qwen3_8b.py"
    script.write_text(render_nemo_script(get_recipe("qwen3_8b"), DataSpec(mock=True), opts))
    proc = subprocess.run([sys.executable, str(script), "--dump-json", str(tmp_path / "out.json")],
                          capture_output=True, text=True, cwd=tmp_path, env={"PYTHONPATH": str(tmp_path)})
    assert proc.returncode == 1 and proc.stdout == ""
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith(message), proc.stderr
    assert proc.stderr.rstrip().endswith(f"use NeMo 2.5 to 2.7 ({DEFAULT_IMAGE} has 2.5) or "
                                         "`qwen-pretrain launch --backend mcore`")
    assert not (tmp_path / "out.json").exists()
