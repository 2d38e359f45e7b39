"""`qwen-pretrain bench gpu-check`: the plan on any machine, the refusal without CUDA, and every
part of the check run for real on CPU with a tiny recipe (no torch.compile, no TE): the GPU run
itself needs a GPU and is not made here."""

from __future__ import annotations

import argparse
import json
import shlex

import pytest
import torch
from qwen_pretrain.benchmarks.gpu_check import CheckPlan, run_check
from qwen_pretrain.launch.cli import main


def test_dry_run_prints_the_plan_on_any_machine(capsys, tmp_path):
    from qwen_pretrain.training.cli import add_train_arguments

    assert main(["bench", "gpu-check", "--dry-run", "--out", str(tmp_path / "gc")]) == 0
    out = capsys.readouterr().out
    assert "qwen3_0p6b on one cuda device, seq 4096" in out and "at most 600 s" in out
    (ours,) = [ln for ln in out.splitlines() if ln.startswith("2. ours")]
    cmd = shlex.split(ours.split(": ", 1)[1])
    trainer = argparse.ArgumentParser()
    add_train_arguments(trainer)
    args = trainer.parse_args(cmd[cmd.index("qwen_pretrain.training.cli") + 1:])
    assert (args.recipe, args.device, args.seq_length, args.train_steps, args.no_te) == (
        "qwen3_0p6b", "cuda", 4096, 30, False)
    (settings,) = [ln for ln in out.splitlines() if ln.strip().startswith("run settings:")]
    s = json.loads(settings.split(": ", 1)[1])
    assert s["layer_spec"] == "te" and s["ddp"]["overlap_param_gather"] and s["env"]["CUDA_DEVICE_MAX_CONNECTIONS"] == "1"
    assert not (tmp_path / "gc").exists()


def test_without_cuda_it_exits_2_in_one_line(capsys, monkeypatch, tmp_path):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["bench", "gpu-check", "--out", str(tmp_path / "gc")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "CUDA is not visible" in err and "--dry-run" in err


@pytest.mark.slow
def test_every_part_runs_on_cpu_with_a_tiny_recipe(tmp_path):
    plan = CheckPlan(recipe="qwen3_tiny", device="cpu", transformer_engine=False, steps=6, global_batch_size=4,
                     micro_batch_size=2, seq_length=64, skip_first=2, skip_last=2, compile_baseline=False,
                     logits_tolerance=1e-4,
                     time_limits_s={"versions": 120, "ours": 400, "baseline": 200, "convert": 200, "load": 200})
    results, failures = run_check(plan, tmp_path / "gc")
    assert failures == []
    assert results["ours"]["parsed"]["steps_used"] == 2 and results["ours_throughput"]["tokens_per_sec_per_gpu"] > 0
    assert len(results["baseline"]["step_times_s"]) == 6 and results["ratio_ours_to_baseline"] > 0
    load = results["load"]
    assert load["keys_missing_from_checkpoint"] == [] == load["keys_not_in_model"]
    assert load["max_abs_logit_diff"] < 1e-4 and load["top1_agreement"] == 1.0
    report = (tmp_path / "gc" / "gpu_check.md").read_text()
    assert "status: PASS" in report
    assert sorted(p.name for p in (tmp_path / "gc").iterdir() if not p.is_dir()) == [
        "baseline.log", "convert.log", "gpu_check.json", "gpu_check.md", "load.log", "ours.log", "versions.log"]
