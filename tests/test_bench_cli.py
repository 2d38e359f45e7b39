"""`qwen-pretrain bench parse|accept|report|compare` from the command line: exit codes, tables,
JSON, bad input, and the PNG plots opened and checked pixel by pixel."""

from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
from dataclasses import replace
from pathlib import Path

import pytest
from qwen_pretrain.benchmarks.synthetic import megatron_line, nemo_line, run_steps, write_run
from qwen_pretrain.launch.cli import main


def bench(capsys, *argv: str) -> tuple[int, str, str]:
    rc = main(["bench", *map(str, argv)])
    out = capsys.readouterr()
    return rc, out.out, out.err


@pytest.fixture
def run_log(tmp_path) -> Path:
    return write_run(tmp_path / "run.log", "nemo", run_steps(60, seed=3), noise_every=5)


# --- parse --------------------------------------------------------------------------------------

def test_parse_json_has_the_issue_fields(capsys, tmp_path, run_log):
    other = write_run(tmp_path / "m.log", "megatron", run_steps(40))
    rc, out, _ = bench(capsys, "parse", run_log, other, "--json")
    assert rc == 0
    objs = [json.loads(line) for line in out.splitlines()]  # one object per log
    assert [o["format"] for o in objs] == ["nemo", "megatron"]
    for key in ("format", "steps", "first_step", "last_step", "steps_used", "tokens_per_sec_per_gpu_mean",
                "tokens_per_sec_per_gpu_derived", "step_time_mean_s", "final_step", "final_loss", "warnings"):
        assert key in objs[0], key
    assert (objs[0]["steps"], objs[0]["steps_used"], objs[0]["final_step"]) == (60, 40, 60)
    assert objs[1]["tokens_per_sec_per_gpu_derived"] is True  # seq/world size from the argument dump


def test_parse_skip_options_and_derivation_flags(capsys, tmp_path):
    steps = list(run_steps(30))
    path = tmp_path / "m.log"
    path.write_text("\n".join(megatron_line(s) for s in steps))
    rc, out, _ = bench(capsys, "parse", path, "--json", "--skip-first", "5", "--skip-last", "2",
                       "--seq-length", "4096", "--gpus", "8")
    obj = json.loads(out)
    assert rc == 0 and obj["steps_used"] == 23 and obj["tokens_per_sec_per_gpu_derived"] is True
    expected = statistics.mean(s.tokens_per_sec_per_gpu for s in steps[5:28])
    assert obj["tokens_per_sec_per_gpu_mean"] == pytest.approx(expected, rel=1e-3)


def test_parse_short_log_exits_2_unless_allowed(capsys, tmp_path):
    path = write_run(tmp_path / "short.log", "nemo", run_steps(12))
    rc, out, err = bench(capsys, "parse", path)
    assert rc == 2 and "only 12 unique steps" in err and "--allow-short" in err
    rc, out, _ = bench(capsys, "parse", path, "--allow-short", "--json")
    assert rc == 0 and json.loads(out)["steps_used"] == 12


@pytest.mark.parametrize("kind, message", [
    ("binary", "binary data"),
    ("empty", "the file is empty"),
    ("no_steps", "no training step lines found"),
    ("directory", "is a directory"),
    ("missing", "no such file"),
])
def test_bad_input_is_a_clear_error_and_exit_2(capsys, tmp_path, kind, message):
    path = tmp_path / kind
    if kind == "binary":
        path.write_bytes(os.urandom(200_000) + b"\x00" * 5000)
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "no_steps":
        path.write_text("Starting training\nGPU available: True\nvalidation loss at iteration 500 | lm loss value: 3.1\n")
    elif kind == "directory":
        path.mkdir()
        (path / "train.log").write_text("x")
    rc, out, err = bench(capsys, "parse", path, "--json")
    assert rc == 2
    assert message in err
    assert len(err.strip().splitlines()) == 1  # one line
    if out.strip():  # a parsed-but-unusable log still reports, and never with a mean
        obj = json.loads(out)
        assert obj["status"] == "unusable" and obj["tokens_per_sec_per_gpu_mean"] is None and obj["steps"] == 0
    rc, _, err = bench(capsys, "accept", path, "--baseline", "3.0")
    assert rc == 2


# --- accept -------------------------------------------------------------------------------------

def test_accept_against_a_baseline_log_passes(capsys, tmp_path, run_log):
    baseline = write_run(tmp_path / "base.log", "nemo", run_steps(60, seed=4), noise_every=9)
    rc, out, _ = bench(capsys, "accept", run_log, "--baseline", baseline)
    assert rc == 0
    assert "final loss (step 60)" in out and "PASS" in out and "overall: PASS" in out


def test_accept_loss_outside_tolerance_fails(capsys, run_log):
    steps = list(run_steps(60, seed=3))
    final = float(f"{steps[-1].loss:.4}")
    rc, out, _ = bench(capsys, "accept", run_log, "--baseline", str(final * 1.06))
    assert rc == 1 and "FAIL" in out and "overall: FAIL" in out and "-5.66%" in out
    rc, out, _ = bench(capsys, "accept", run_log, "--baseline", str(final * 1.06), "--loss-tol", "0.07")
    assert rc == 0


def test_accept_perf_baseline(capsys, run_log):
    steps = list(run_steps(60, seed=3))
    mean = statistics.mean(s.tokens_per_sec_per_gpu for s in steps[10:50])
    final = f"{steps[-1].loss:.4}"
    rc, out, _ = bench(capsys, "accept", run_log, "--baseline", final, "--perf-baseline", str(mean * 1.04))
    assert rc == 0 and "tokens/s/GPU mean" in out  # 4% slower: within the default 5%
    rc, out, _ = bench(capsys, "accept", run_log, "--baseline", final, "--perf-baseline", str(mean * 1.10))
    assert rc == 1 and "tokens/s/GPU mean" in out and "FAIL" in out
    rc, out, _ = bench(capsys, "accept", run_log, "--baseline", final, "--perf-baseline", str(mean * 0.5))
    assert rc == 0  # faster than the baseline always passes


def test_accept_json_baseline_from_parse(capsys, tmp_path, run_log):
    rc, out, _ = bench(capsys, "parse", run_log, "--json")
    base = tmp_path / "base.json"
    base.write_text(out)
    rc, out, _ = bench(capsys, "accept", run_log, "--baseline", base, "--perf-baseline", base, "--json")
    verdict = json.loads(out)
    assert rc == 0 and verdict["status"] == "passed"
    assert [c["rel_diff"] for c in verdict["checks"]] == [0.0, 0.0]


def test_accept_unusable_logs_exit_2(capsys, tmp_path):
    steps = list(run_steps(30))
    lines = [nemo_line(s) for s in steps]
    lines[-1] = lines[-1].replace(f"reduced_train_loss: {steps[-1].loss:.4}", "reduced_train_loss: nan")
    nan_log = tmp_path / "nan.log"
    nan_log.write_text("\n".join(lines))
    rc, out, _ = bench(capsys, "accept", nan_log, "--baseline", "3.0")
    assert rc == 2 and "UNUSABLE" in out and "NaN" in out
    short = write_run(tmp_path / "short.log", "nemo", run_steps(10))
    rc, out, _ = bench(capsys, "accept", short, "--baseline", "3.0")
    assert rc == 2 and "only 10 unique steps" in out
    # a run that stopped early is not compared with the baseline's final step
    early = write_run(tmp_path / "early.log", "nemo", run_steps(25))
    full = write_run(tmp_path / "full.log", "nemo", run_steps(30))
    rc, out, _ = bench(capsys, "accept", early, "--baseline", full)
    assert rc == 2 and "run ends at step 25 (nemo), the baseline at step 30 (nemo)" in out


# --- compare ------------------------------------------------------------------------------------

def test_compare_two_runs_of_different_frameworks(capsys, tmp_path):
    # NeMo counts global_step from 0, Megatron-LM its iteration from 1: the same 50 steps
    a_steps = list(run_steps(50, first=0, seed=1))
    b_steps = [replace(s, step=s.step + 1, total=50, loss=s.loss * (1.02 if s.step == 36 else 1.0)) for s in a_steps]
    a = write_run(tmp_path / "a.log", "nemo", a_steps)
    b = write_run(tmp_path / "b.log", "megatron", b_steps)
    rc, out, _ = bench(capsys, "compare", a, b, "--json")
    comp = json.loads(out)["comparison"]
    assert rc == 0
    assert comp["common_steps"] == 50
    assert comp["loss_correlation"] > 0.999
    assert comp["max_rel_loss_diff_step"] == 36  # in A's numbering
    assert comp["max_rel_loss_diff"] == pytest.approx(0.02 / 1.02, rel=2e-3)
    rc, out, _ = bench(capsys, "compare", a, b)
    assert "loss-curve correlation" in out and "at step 36" in out
    # and accept lines the final steps up the same way (NeMo 49 == Megatron-LM 50)
    rc, out, _ = bench(capsys, "accept", a, "--baseline", b, "--gpus", "8")
    assert rc == 0 and "final loss (step 49)" in out


def test_compare_without_common_steps_exits_2(capsys, tmp_path):
    a = write_run(tmp_path / "a.log", "nemo", run_steps(25))
    b = write_run(tmp_path / "b.log", "nemo", run_steps(25, first=100))
    rc, _, err = bench(capsys, "compare", a, b)
    assert rc == 2 and "no common step" in err


# --- report and plots ---------------------------------------------------------------------------

def _png_stats(path: Path):
    import matplotlib.image as mpimg
    import numpy as np

    img = mpimg.imread(path)
    rgb = img[..., :3]
    non_white = (rgb < 0.97).any(axis=-1)
    # matplotlib's C0 (#1f77b4) and C1 (#ff7f0e) lines
    c0 = (np.abs(rgb - np.array([0x1F, 0x77, 0xB4]) / 255).max(axis=-1) < 0.05).sum()
    c1 = (np.abs(rgb - np.array([0xFF, 0x7F, 0x0E]) / 255).max(axis=-1) < 0.05).sum()
    # the shaded excluded steps: C0 at alpha 0.12 over white
    shade = np.array([0x1F, 0x77, 0xB4]) / 255 * 0.12 + 0.88
    shaded = (np.abs(rgb - shade).max(axis=-1) < 0.02).sum()
    return img.shape, non_white.mean(), c0, c1, shaded


def test_report_writes_markdown_json_and_plots(capsys, tmp_path, run_log):
    from qwen_pretrain.recipes import get_recipe
    from qwen_pretrain.recipes.planner import flops_per_token

    second = write_run(tmp_path / "second.log", "nemo", run_steps(60, seed=9, base_step_time=2.2))
    out_dir = tmp_path / "report"
    rc, out, _ = bench(capsys, "report", run_log, second, "--out", out_dir, "--recipe", "qwen3_8b", "--gpu", "h100",
                       "--seq-length", "4096")
    assert rc == 0
    for name in ("report.md", "summary.json", "loss.png", "tokens_per_sec.png"):
        assert (out_dir / name).is_file(), name
    assert not [p for p in out_dir.iterdir() if p.name.startswith(".")]  # no temp files left
    summary = json.loads((out_dir / "summary.json").read_text())
    run0 = summary["runs"][0]
    fpt = flops_per_token(get_recipe("qwen3_8b").model, 4096)
    assert run0["mfu"]["flops_per_token"] == fpt
    assert run0["mfu"]["mfu"] == pytest.approx(run0["tokens_per_sec_per_gpu_mean"] * fpt / 989e12)
    md = (out_dir / "report.md").read_text()
    assert "| run.log | nemo | ok | 60 (1..60) | 40 (11..50) |" in md
    assert "![loss](loss.png)" in md and "MFU" in md

    for png in ("loss.png", "tokens_per_sec.png"):
        shape, ink, c0, c1, shaded = _png_stats(out_dir / png)
        assert shape[:2] == (450, 900)
        assert 0.02 < ink < 0.6, f"{png}: {ink:.3f} of the pixels drawn"
        assert c0 > 200 and c1 > 200, f"{png}: both runs drawn ({c0}, {c1})"
        assert shaded > 500, f"{png}: excluded edge steps shaded ({shaded} px)"


def test_report_of_an_unusable_log_exits_2_but_writes(capsys, tmp_path):
    short = write_run(tmp_path / "short.log", "nemo", run_steps(8))
    out_dir = tmp_path / "r"
    rc, _, err = bench(capsys, "report", short, "--out", out_dir)
    assert rc == 2 and "unusable" in err
    assert "unusable: only 8 unique steps" in (out_dir / "report.md").read_text()
    _, ink, *_ = _png_stats(out_dir / "loss.png")
    assert ink > 0.02


def test_report_needs_recipe_and_gpu_together(capsys, run_log, tmp_path):
    rc, _, err = bench(capsys, "report", run_log, "--out", tmp_path / "r", "--recipe", "qwen3_8b")
    assert rc == 2 and "--gpu" in err


def test_console_script_runs_bench(venv_bin, run_log):
    """The installed `qwen-pretrain` entry point has the bench subcommand."""
    exe = venv_bin / "qwen-pretrain"
    if not exe.exists():
        pytest.skip("qwen-pretrain console script not installed in this interpreter's bin/")
    proc = subprocess.run([str(exe), "bench", "parse", str(run_log), "--json"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    obj = json.loads(proc.stdout)
    assert obj["format"] == "nemo" and math.isfinite(obj["tokens_per_sec_per_gpu_mean"])


def test_parse_bench_script_runs_and_agrees_with_the_baseline(capsys):
    """The speed script end to end on small logs (figures are printed, never asserted)."""
    from qwen_pretrain.benchmarks import parse_bench

    assert parse_bench.main(["--sizes-mb", "1", "--kinds", "dense,noisy"]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith(("dense", "noisy"))]
    assert len(rows) == 2
    assert all(row.split()[-1] == "yes" for row in rows), out  # same mean as the naive findall
