"""`qwen-pretrain demo`: its parts here; the whole demo, and the demo's judge catching a trainer
with a deliberate error, as slow tests (minutes on 2 cores).

This file is also the torchrun worker of the deliberate-error test (`python -m
torch.distributed.run ... tests/test_train_demo.py skip-batch K ARGS...`): our real trainer,
with the sample order changed so that the global batch of step K is never read.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from qwen_pretrain.launch import demo
from qwen_pretrain.recipes.files import atomic_dir


def test_sample_is_real_text_in_sorted_order(tmp_path):
    out = tmp_path / "s.jsonl"
    docs, size = demo.write_sample(out, max_bytes=200_000)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == docs > 1 and size >= 200_000
    assert all(r["text"].strip() for r in rows)
    again = tmp_path / "again.jsonl"
    demo.write_sample(again, max_bytes=200_000)
    assert again.read_text() == out.read_text()  # deterministic: ours and the reference read the same


def test_demo_output_replaces_an_older_one_whole(tmp_path):
    """The demo's work directory (`atomic_dir(out, replace=True)`) swaps whole directories."""
    final = tmp_path / "demo_output"
    final.mkdir()
    (final / "old.txt").write_text("old")
    with atomic_dir(final, replace=True) as work:
        (work / "report.txt").write_text("new")
    assert sorted(p.name for p in final.iterdir()) == ["report.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["demo_output"]  # no work or old directory left


def test_too_few_steps_is_refused_in_one_line(tmp_path, repo_root):
    proc = subprocess.run([sys.executable, "-m", "qwen_pretrain.launch.cli", "demo", "--out", str(tmp_path / "d"),
                           "--steps", "20"], capture_output=True, text=True, timeout=120, cwd=repo_root)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("\n") == 1 and "--steps 20: give at least 21" in proc.stderr
    assert not (tmp_path / "d").exists()


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_demo_with_30_steps_passes_against_the_reference(tmp_path, repo_root):
    out = tmp_path / "demo"
    proc = subprocess.run([sys.executable, "-m", "qwen_pretrain.launch.cli", "demo", "--out", str(out),
                           "--steps", "30"], capture_output=True, text=True, timeout=1700, cwd=repo_root)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    assert "verdict against the reference: PASS" in proc.stdout and "per-step loss gap" in proc.stdout
    report = json.loads((out / "report.json").read_text())
    assert report["verdict"] == "passed" and report["exit_code"] == 0
    assert report["ours"]["steps"] == report["reference"]["steps"] == 30
    assert report["ours"]["final_step"] == report["reference"]["final_step"] == 29
    assert report["per_step_gap"]["steps"] == 30 and report["per_step_gap"]["max_abs"] < 1e-3
    assert report["throughput"]["ratio"] > 0
    # Every path the report names is the final one, and is there.
    for path in [report["ours"]["path"], report["reference"]["path"], *report["files"].values()]:
        assert Path(path).exists() and Path(path).is_relative_to(out), path
    assert "tmp" not in (out / "report.txt").read_text().replace(str(tmp_path), "")
    assert (out / "loss.png").read_bytes()[:4] == b"\x89PNG"
    assert (out / "checkpoints" / "latest_checkpointed_iteration.txt").read_text().strip() == "30"
    assert [p.name for p in tmp_path.iterdir()] == ["demo"]  # no work directory left beside it


# ---------------------------------------------------------------- a deliberate error must fail

STEPS = 21  # the fewest the acceptance rule judges
SKIPPED_STEP = 6


@pytest.fixture(scope="module")
def reference_setup(tmp_path_factory):
    """Data, the common initial weights and the reference run, shared by the error cases."""
    from qwen_pretrain.preprocessing.pipeline import preprocess

    work = tmp_path_factory.mktemp("reference")
    demo.write_sample(work / "sample.jsonl")  # 237 documents: the 1% validation split holds some
    prefix = preprocess([work / "sample.jsonl"], work / "data" / "sample", workers=1, progress=False,
                        log=lambda msg: None).datasets[0].prefix
    init_hf, init_mcore = demo.initial_weights(work, tp=2)
    demo.run_reference(work, prefix, STEPS, init_hf)
    return work, prefix, init_mcore


def _judge(ours_work: Path, reference_work: Path):
    from qwen_pretrain.benchmarks.reference_verdict import RunFiles, judge_against_reference

    return judge_against_reference(
        RunFiles(ours_work / "train.log", ours_work / "train" / "metrics.jsonl", 2),
        RunFiles(reference_work / "reference.log", reference_work / "reference" / "metrics.jsonl", 1),
    )


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_a_wrong_learning_rate_fails_the_verdict(reference_setup, tmp_path):
    """Ours with a peak LR 20% too high (a wrong schedule): the final loss may still be within
    5%, but the per-step gap is far past its tolerance."""
    work, prefix, init_mcore = reference_setup
    demo.run_training(tmp_path, prefix, STEPS, 2, init_mcore, extra_args=("--lr", "1.2e-3"))
    j = _judge(tmp_path, work)
    print(j.gap_part.text, j.accept.checks[0], sep="\n")
    assert j.gap_part.status == "failed" and j.status == "failed" and j.exit_code == 1, j.gap_part.text
    assert j.gap > 1e-2


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_one_skipped_batch_fails_the_verdict(reference_setup, tmp_path, repo_root, port):
    """Ours never reads the batch of step 6 (the worker below): the per-step gap catches it."""
    work, prefix, init_mcore = reference_setup
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(port),
               str(Path(__file__).resolve()), "skip-batch", str(SKIPPED_STEP), "--recipe", demo.RECIPE,
               "--data-path", prefix, "--train-steps", str(STEPS), "--load", str(init_mcore),
               "--log-dir", str(tmp_path / "train")]
    with (tmp_path / "train.log").open("w") as log:
        proc = subprocess.run(command, stdout=log, stderr=subprocess.PIPE, text=True, timeout=1500,
                              cwd=repo_root, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    j = _judge(tmp_path, work)
    print(j.gap_part.text, j.accept.checks[0], sep="\n")
    assert j.gap_part.status == "failed" and j.exit_code == 1, j.gap_part.text
    assert j.gap_step >= SKIPPED_STEP and j.gap > 1e-2


def _skip_batch_worker(skipped: int, argv: list[str]) -> int:
    """Our trainer, except that training step >= `skipped` reads the batch of the step after it."""
    from qwen_pretrain.training import cli, data

    original = data.micro_batch_indices

    def skipping(recipe, step, dp_rank, dp_size, base=0):
        # Validation asks for its first batches (steps 0, 1): only training steps move on.
        shifted = step + 1 if step >= skipped else step
        return original(recipe, shifted, dp_rank, dp_size, base=base)

    data.micro_batch_indices = skipping
    return cli.main(argv)


if __name__ == "__main__" and len(sys.argv) > 2 and sys.argv[1] == "skip-batch":
    sys.exit(_skip_batch_worker(int(sys.argv[2]), sys.argv[3:]))
