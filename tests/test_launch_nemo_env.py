"""The NeMo 2 check (slow stage), once per NeMo release we support, each in its own environment
built by `.ci/nemo-env`: nemo_toolkit 2.7.3 (`.venv-nemo`, the newest NeMo 2) and 2.5.3
(`.venv-nemo-2.5`, the generation of the NGC nemo:25.09 image), both with nemo-run 0.11.1. Every
NeMo-backed recipe's rendered script builds NeMo's real `llm.<model>.pretrain_recipe` object, and
every field we set reads back as our recipe's value. The expected values are written out here from
the recipe, independently of the renderer's mapping. nemo-run's LocalExecutor then dry-runs one
script (the torchrun command it would run), and a recipe NeMo lacks stops with one line.
CPU only: the recipe objects are built, not trained (that needs GPUs and Transformer Engine).
A release whose environment is missing is skipped with the command that builds it."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from qwen_pretrain.launch.nemo_run import ExecutorOptions
from qwen_pretrain.launch.render_megatron import DataSpec
from qwen_pretrain.launch.render_nemo import render_nemo_script
from qwen_pretrain.recipes import Recipe, all_recipes, get_recipe

# An environment whose pins changed is rebuilt (~4 min) by the first test's fixture: allow 40 minutes.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(2400)]

NEMO_RECIPES = [r.name for r in all_recipes() if r.nemo_recipe]
# NeMo release -> the environment `bash .ci/nemo-env RELEASE` builds for it.
NEMO_ENVS = {"2.7.3": ".venv-nemo", "2.5.3": ".venv-nemo-2.5"}


@pytest.fixture(scope="module", params=list(NEMO_ENVS))
def nemo_release(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def nemo_python(repo_root, nemo_release) -> Path:
    python = repo_root / NEMO_ENVS[nemo_release] / "bin" / "python"
    if not python.exists():
        reason = (f"NeMo {nemo_release}: {NEMO_ENVS[nemo_release]} is missing; "
                  f"build it with `bash .ci/nemo-env {nemo_release}`")
        print(reason)
        pytest.skip(reason)
    # Brings the environment up to date with the script's pins; instant when its stamp matches.
    proc = subprocess.run(["bash", str(repo_root / ".ci" / "nemo-env"), nemo_release], capture_output=True,
                          text=True, timeout=1500)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    installed = subprocess.run(
        [str(python), "-c", "from importlib.metadata import version; print(version('nemo_toolkit'))"],
        capture_output=True, text=True, check=True,
    ).stdout.strip()
    assert installed == nemo_release
    return python


def expected_fields(recipe: Recipe, nodes: int, per_node: int) -> dict[str, object]:
    p, t = recipe.parallel, recipe.training
    return {
        "model": recipe.nemo_recipe,
        "trainer.num_nodes": nodes,
        "trainer.devices": per_node,
        "trainer.max_steps": t.train_steps,
        "trainer.log_every_n_steps": 1,  # every step: the acceptance rule reads per-step lines
        "trainer.val_check_interval": t.eval_interval,
        "trainer.limit_val_batches": t.eval_iters,
        "trainer.strategy.tensor_model_parallel_size": p.tp,
        "trainer.strategy.pipeline_model_parallel_size": p.pp,
        "trainer.strategy.virtual_pipeline_model_parallel_size": p.vpp,
        "trainer.strategy.context_parallel_size": p.cp,
        "trainer.strategy.sequence_parallel": p.sequence_parallel,
        "trainer.strategy.expert_model_parallel_size": p.ep,
        "trainer.strategy.expert_tensor_parallel_size": p.etp,
        "data.global_batch_size": t.global_batch_size,
        "data.micro_batch_size": p.micro_batch_size,
        "data.seq_length": t.seq_length,
        "callbacks": [{"class": "TimingCallback", "log_tokens_per_sec": True}],
    }


def layout(recipe: Recipe) -> tuple[int, int]:
    """(nodes, GPUs per node) for the recipe's GPU count, 8 GPUs a node."""
    per_node = min(8, recipe.gpus)
    return recipe.gpus // per_node, per_node


def dump_json(nemo_python: Path, tmp: Path, recipe: Recipe, data: DataSpec) -> subprocess.CompletedProcess:
    """Renders the recipe's NeMo script and runs it with `--dump-json TMP/<recipe>.json`."""
    nodes, per_node = layout(recipe)
    opts = ExecutorOptions(kind="direct", nodes=nodes, procs_per_node=per_node, use_gpus=True, job_dir=str(tmp))
    script = tmp / f"nemo_pretrain_{recipe.name}.py"
    script.write_text(render_nemo_script(recipe, data, opts))
    return subprocess.run([str(nemo_python), str(script), "--dump-json", str(tmp / f"{recipe.name}.json")],
                          capture_output=True, text=True, cwd=tmp, timeout=600)


def build(nemo_python: Path, tmp: Path, recipe: Recipe, data: DataSpec) -> tuple[dict, int, int]:
    proc = dump_json(nemo_python, tmp, recipe, data)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads((tmp / f"{recipe.name}.json").read_text()), *layout(recipe)


def test_every_nemo_recipe_object_carries_our_values(nemo_python, tmp_path):
    recipes = [get_recipe(n) for n in NEMO_RECIPES]
    assert len(recipes) == 7
    with ThreadPoolExecutor(max_workers=2) as pool:
        results = list(pool.map(lambda r: build(nemo_python, tmp_path, r, DataSpec(mock=True)), recipes))
    for recipe, (dumped, nodes, per_node) in zip(recipes, results):
        for key, value in expected_fields(recipe, nodes, per_node).items():
            assert dumped[key] == value, f"{recipe.name}: {key} = {dumped[key]!r}, recipe says {value!r}"
        assert dumped["data.class"] == "MockDataModule"  # the acceptance baseline's data


def test_nemo_recipe_on_our_preprocessed_data(nemo_python, tmp_path):
    recipe = get_recipe("qwen3_8b")
    data = DataSpec(blend=((0.25, "/data/a_text_document"), (0.75, "/data/b_text_document")),
                    split="98,2,0", tokenizer_dir="/models/qwen3-8b")
    dumped, nodes, per_node = build(nemo_python, tmp_path, recipe, data)
    for key, value in expected_fields(recipe, nodes, per_node).items():
        assert dumped[key] == value, key
    assert dumped["data.class"] == "PreTrainingDataModule"
    assert dumped["data.paths"] == [0.25, "/data/a_text_document", 0.75, "/data/b_text_document"]
    assert dumped["data.split"] == "98,2,0" and dumped["data.seed"] == recipe.training.seed
    assert dumped["data.tokenizer"] == "/models/qwen3-8b"


def test_nemo_run_local_executor_dry_run(nemo_python, repo_root, tmp_path):
    """`launch --launcher nemo-run --dry-run` prints the script; nemo-run dry-runs it locally."""
    env = dict(os.environ, NEMORUN_HOME=str(tmp_path / "nemo_run_home"))
    rendered = subprocess.run(
        [str(repo_root / ".venv" / "bin" / "qwen-pretrain"), "launch", "--recipe", "qwen3_1p7b", "--backend",
         "nemo", "--launcher", "nemo-run", "--nodes", "1", "--gpus-per-node", "8", "--mock-data",
         "--run-dir", str(tmp_path / "run"), "--dry-run"],
        capture_output=True, text=True, env=env, cwd=tmp_path, check=True,
    ).stdout
    start = rendered.index("# ---- would write ")
    path = rendered[start:].splitlines()[0].removeprefix("# ---- would write ")
    body = rendered[start:].split("\n", 1)[1].split(f"# ---- end of {path}")[0]
    script = tmp_path / "script.py"
    script.write_text(body)
    run = subprocess.run([str(nemo_python), str(script), "--executor", "local", "--dryrun"],
                         capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    assert run.returncode == 0, run.stderr[-4000:]
    flat = re.sub(r"\s+", "", run.stdout + run.stderr)
    assert "'--nproc-per-node','8'" in flat  # nemo-run's torchrun launcher, 8 processes


def test_a_recipe_nemo_lacks_stops_with_one_line(nemo_python, nemo_release, tmp_path):
    """A model this NeMo has no recipe for (as Qwen3 before NeMo 2.4): one line naming the release."""
    recipe = dataclasses.replace(get_recipe("qwen3_8b"), name="qwen9_8b", nemo_recipe="qwen9_8b")
    proc = dump_json(nemo_python, tmp_path, recipe, DataSpec(mock=True))
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: NeMo {nemo_release} has no recipe llm.qwen9_8b ("), last
    assert "nvcr.io/nvidia/nemo:25.09" in last and "--backend mcore" in last
