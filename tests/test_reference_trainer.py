"""The reference trainer (`benchmarks/reference_trainer.py`) and the verdict against it.

Fast: its learning-rate schedule against megatron-core's `OptimizerParamScheduler`, its weight
decay groups against megatron-core's optimizer, its command-line errors, and the verdict
(`benchmarks/reference_verdict.py`) on logs written by the trainers' own formatter.
Slow: ours at TP=1 (one process, megatron-core) and the reference, from the same weights on the
same batches, for each family (Qwen3, Qwen2.5, Qwen3-MoE): the losses agree to rounding.
Real parts throughout (megatron-core, transformers, the trainer's log writer); no mocks.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from qwen_pretrain.benchmarks import reference_trainer as rt
from qwen_pretrain.benchmarks import reference_verdict as rv
from qwen_pretrain.recipes import get_recipe
from qwen_pretrain.recipes.schema import Training

SCHEDULES = [
    Training(global_batch_size=8, seq_length=128, train_steps=40, lr=1e-3, min_lr=1e-4, warmup_steps=4),
    Training(global_batch_size=8, seq_length=128, train_steps=30, lr=3e-4, min_lr=3e-5, warmup_steps=0),
    Training(global_batch_size=8, seq_length=128, train_steps=25, lr=2e-3, min_lr=0.0, warmup_steps=5,
             lr_decay_style="linear"),
    Training(global_batch_size=8, seq_length=128, train_steps=12, lr=1e-3, warmup_steps=3, lr_decay_style="constant"),
    Training(global_batch_size=8, seq_length=128, train_steps=6, lr=1e-3, min_lr=1e-4, warmup_steps=10),
]


@pytest.mark.parametrize("t", SCHEDULES, ids=lambda t: f"{t.lr_decay_style}-w{t.warmup_steps}-n{t.train_steps}")
def test_learning_rate_is_megatron_cores_schedule(t):
    """Step i runs at lr(i + 1) of megatron-core's scheduler, set up with the recipe's numbers."""
    import torch
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.0)
    sched = OptimizerParamScheduler(
        opt, init_lr=0.0, max_lr=t.lr, min_lr=t.min_lr, lr_warmup_steps=t.warmup_steps,
        lr_decay_steps=max(t.train_steps, t.warmup_steps + 1), lr_decay_style=t.lr_decay_style,
        start_wd=0.1, end_wd=0.1, wd_incr_steps=t.train_steps, wd_incr_style="constant",
    )
    for step in range(t.train_steps):
        sched.step(increment=1)
        assert rt.learning_rate(t, step) == pytest.approx(opt.param_groups[0]["lr"], rel=1e-12, abs=1e-15), step


@pytest.mark.parametrize("name", ["qwen3_tiny", "qwen25_tiny"])
def test_weight_decay_falls_where_megatron_core_puts_it(name):
    """Elements with and without weight decay: the reference's groups (transformers model) and
    megatron-core's optimizer groups (our model, TP=1) hold the same counts."""
    import torch
    import transformers
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from qwen_pretrain.training.model import build_tp1_model
    from qwen_pretrain.training.parallel import init_single_process

    shape = get_recipe(name).model
    hf = transformers.AutoModelForCausalLM.from_config(rt.hf_config(shape), dtype=torch.float32)
    ours_ref = {"decay": 0, "none": 0}
    for group in rt.parameter_groups(hf, 0.1):
        ours_ref["decay" if group["weight_decay"] else "none"] += sum(p.numel() for p in group["params"])

    init_single_process()
    model = build_tp1_model(shape)
    ddp = DistributedDataParallel(config=model.config, ddp_config=DistributedDataParallelConfig(), module=model)
    optimizer = get_megatron_optimizer(OptimizerConfig(optimizer="adam", lr=1e-3, weight_decay=0.1), [ddp])
    megatron = {"decay": 0, "none": 0}
    for group in optimizer.param_groups:
        megatron["decay" if group["wd_mult"] else "none"] += sum(p.numel() for p in group["params"])
    assert shape.padded_vocab_size(1) == shape.vocab_size  # no padding rows to account for
    assert ours_ref == megatron


def _write_run(directory: Path, losses: list[float], tokens_per_s: float = 1000.0) -> rv.RunFiles:
    """A run's log and metrics.jsonl as a trainer writes them (training.train_log's writer)."""
    from qwen_pretrain.training.train_log import MetricsWriter, StepMetrics

    directory.mkdir(parents=True)
    log = directory / "run.log"
    with log.open("w") as stream:
        writer = MetricsWriter(str(directory / "metrics"), stream=stream)
        for step, loss in enumerate(losses):
            writer.step(StepMetrics(step=step, train_steps=len(losses), lr=1e-3, global_batch_size=8, loss=loss,
                                    step_time_s=1024 / tokens_per_s, tokens_per_sec_per_gpu=tokens_per_s,
                                    consumed_samples=8 * (step + 1)))
        writer.close()
    return rv.RunFiles(log, directory / "metrics" / "metrics.jsonl", 1)


def _curve(n: int, shift_from: int | None = None, shift: float = 0.0) -> list[float]:
    return [11.9 - 0.04 * s + 1e-4 * (s % 3) + (shift if shift_from is not None and s >= shift_from else 0.0)
            for s in range(n)]


def test_verdict_passes_identical_runs_and_fails_a_per_step_gap(tmp_path):
    ref = _write_run(tmp_path / "ref", _curve(30))
    same = _write_run(tmp_path / "same", [x + 2e-6 for x in _curve(30)], tokens_per_s=900.0)
    j = rv.judge_against_reference(same, ref)
    assert (j.status, j.exit_code) == ("passed", 0), rv.judgement_text(j, "a", "b")
    assert j.gap == pytest.approx(2e-6, rel=1e-3) and j.throughput_ratio == pytest.approx(0.9, rel=1e-3)
    # A gap of 0.02 from step 5 on: the final loss is well within 5%, the per-step gap is not.
    drift = _write_run(tmp_path / "drift", _curve(30, shift_from=5, shift=0.02))
    j = rv.judge_against_reference(drift, ref)
    assert j.accept.status == "passed" and j.gap_part.status == "failed" and j.exit_code == 1
    assert j.gap_step == 5 and "FAIL" in j.gap_part.text


def test_verdict_unusable_and_slow_cases(tmp_path):
    ref = _write_run(tmp_path / "ref", _curve(30))
    short = _write_run(tmp_path / "short", _curve(30)[:25])  # stops early: steps differ
    j = rv.judge_against_reference(short, ref)
    assert j.status == "unusable" and j.exit_code == 2 and "different steps" in j.gap_part.text
    tiny = _write_run(tmp_path / "tiny", _curve(20))
    j = rv.judge_against_reference(tiny, _write_run(tmp_path / "ref20", _curve(20)))
    assert j.status == "unusable"  # 20 steps leave no averaging window
    slow = _write_run(tmp_path / "slow", _curve(30), tokens_per_s=100.0)
    j = rv.judge_against_reference(slow, ref)
    assert j.throughput_part.status == "failed" and j.exit_code == 1


def test_loss_plot_is_a_png(tmp_path):
    out = rv.write_loss_plot({0: 11.9, 1: 11.8}, {0: 11.9, 1: 11.81}, tmp_path / "loss.png", "ours", "reference")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "qwen_pretrain.launch.cli", "train-reference", *args],
                          capture_output=True, text=True, timeout=300, cwd=cwd,
                          env=dict(os.environ, PYTHONWARNINGS="ignore"))


def test_cli_refuses_a_directory_without_weights_and_another_shape(tmp_path, repo_root):
    proc = _cli("--recipe", "qwen3_tiny", "--init", str(tmp_path), "--mock-data", cwd=repo_root)
    assert proc.returncode == 2 and "no config.json" in proc.stderr, proc.stderr[-2000:]
    other = tmp_path / "qwen25"
    other.mkdir()
    from qwen_pretrain.conversion.hf_io import hf_config_for

    (other / "config.json").write_text(json.dumps(hf_config_for(get_recipe("qwen25_tiny").model)))
    proc = _cli("--recipe", "qwen3_tiny", "--init", str(other), "--mock-data", cwd=repo_root)
    assert proc.returncode == 2 and "does not match recipe 'qwen3_tiny'" in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr


# ---------------------------------------------------------------- slow: ours vs the reference


def _ours_and_reference(name: str, tmp_path: Path, repo_root: Path, port: int) -> tuple[dict, dict]:
    from qwen_pretrain.conversion.convert import hf_to_mcore

    recipe = get_recipe(name)
    init_hf = rt.write_initial_weights(recipe.model, tmp_path / "init_hf", recipe.training.seed)
    init_mcore = hf_to_mcore(init_hf, tmp_path / "init_mcore", recipe=name, tp=1, quiet=True)
    small = ["--train-steps", "5", "--gbs", "4", "--seq-length", "64", "--eval-interval", "0", "--mock-data"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    ours = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "1", "--master-port", str(port),
         "-m", "qwen_pretrain.training.cli", "--recipe", name, "--tp", "1", "--ep", "1", *small,
         "--load", str(init_mcore), "--log-dir", str(tmp_path / "ours")],
        capture_output=True, text=True, timeout=600, cwd=repo_root, env=env)  # fmt: skip
    assert ours.returncode == 0, ours.stderr[-3000:]
    ref = subprocess.run(
        [sys.executable, "-m", "qwen_pretrain.launch.cli", "train-reference", "--recipe", name, *small,
         "--init", str(init_hf), "--pad-vocab-as-tp", "1", "--log-dir", str(tmp_path / "ref")],
        capture_output=True, text=True, timeout=600, cwd=repo_root, env=env)  # fmt: skip
    assert ref.returncode == 0, ref.stderr[-3000:]
    assert "reduced_train_loss" in ref.stdout  # the NeMo line, for `bench`
    return rt.read_losses(tmp_path / "ours" / "metrics.jsonl"), rt.read_losses(tmp_path / "ref" / "metrics.jsonl")


@pytest.mark.slow
@pytest.mark.parametrize("name", ["qwen3_tiny", "qwen25_tiny", "qwen3_moe_tiny"])
def test_reference_agrees_with_ours_step_by_step(name, tmp_path, repo_root, port):
    ours, ref = _ours_and_reference(name, tmp_path, repo_root, port)
    assert sorted(ours) == sorted(ref) == list(range(5))
    gap, step, problem = rv.loss_gap(ours, ref)
    print(f"{name}: largest per-step gap {gap:.2e} at step {step}")
    assert problem == "" and gap is not None and gap < 1e-5, (gap, step, ours, ref)
    assert ours[4] < ours[0] - 0.01  # it trained (5 steps, 4 of them warm-up)


def test_recipe_overrides_and_data_as_train_reads_them():
    import argparse

    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers()
    rt.add_parser(sub)
    args = parser.parse_args(["train-reference", "--recipe", "qwen3_tiny", "--init", "x", "--data-path", "1", "a",
                              "3", "b", "--train-steps", "7", "--lr", "2e-3", "--mbs", "4"])
    recipe = rt.reference_recipe_from_args(args)
    assert recipe.data.blend == ((1.0, "a"), (3.0, "b"))
    assert (recipe.training.train_steps, recipe.training.lr, recipe.parallel.micro_batch_size) == (7, 2e-3, 4)
    assert dataclasses.replace(recipe, data=get_recipe("qwen3_tiny").data, training=get_recipe("qwen3_tiny").training,
                               parallel=get_recipe("qwen3_tiny").parallel) == get_recipe("qwen3_tiny")
