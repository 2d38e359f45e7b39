"""The NeMo 2 check (slow stage): in a separate environment with nemo_toolkit 2.7.3 and
nemo-run 0.11.1 (`.ci/nemo-env`), every NeMo-backed recipe's rendered script builds NeMo's real
`llm.<model>.pretrain_recipe` object, and every field we set reads back as our recipe's value.
The expected values are written out here from the recipe, independently of the renderer's
mapping. nemo-run's LocalExecutor then dry-runs one script (the torchrun command it would run).
CPU only: the recipe objects are built, not trained (that needs GPUs and Transformer Engine)."""

from __future__ import annotations

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

# Building the NeMo venv (~4 min) is part of the first test's fixture: allow 40 minutes.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(2400)]

NEMO_RECIPES = [r.name for r in all_recipes() if r.nemo_recipe]


@pytest.fixture(scope="module")
def nemo_python(repo_root) -> Path:
    proc = subprocess.run(["bash", str(repo_root / ".ci" / "nemo-env")], capture_output=True, text=True,
                          timeout=1500)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return repo_root / ".venv-nemo" / "bin" / "python"


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


def build(nemo_python: Path, tmp: Path, recipe: Recipe, data: DataSpec) -> tuple[dict, int, int]:
    per_node = min(8, recipe.gpus)
    nodes = recipe.gpus // per_node
    opts = ExecutorOptions(kind="direct", nodes=nodes, procs_per_node=per_node, use_gpus=True, job_dir=str(tmp))
    script = tmp / f"nemo_pretrain_{recipe.name}.py"
    script.write_text(render_nemo_script(recipe, data, opts))
    out = tmp / f"{recipe.name}.json"
    proc = subprocess.run([str(nemo_python), str(script), "--dump-json", str(out)], capture_output=True,
                          text=True, cwd=tmp, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(out.read_text()), nodes, per_node


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
