"""The layout validator (one test per rule), overrides, and the `recipes` CLI's exit codes."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from qwen_pretrain.launch.cli import main
from qwen_pretrain.recipes import (
    LayoutError,
    OffBenchmarkError,
    check_layout,
    get_recipe,
    override,
    validate_layout,
)


def _rules(recipe) -> list[str]:
    return [p.split("]")[0].lstrip("[") for p in validate_layout(recipe)]


OFF = {"off_benchmark": True}


@pytest.mark.parametrize(
    "name,changes,rule,hint",
    [
        ("qwen3_8b", dict(tp=3, gpus=9), "tp-divides-heads", "nearest valid TP: 2 or 4"),
        ("qwen25_7b", dict(tp=8), "tp-divides-heads", "nearest valid TP: 4"),
        ("qwen3_8b", dict(pp=5, gpus=10), "layers-divide-pp-vpp", "nearest valid PP: 4 or 6"),
        ("qwen25_72b", dict(vpp=3), "layers-divide-pp-vpp", "nearest valid VPP for PP=4: 2 or 4"),
        ("qwen3_1p7b", dict(vpp=2), "vpp-needs-pp", "needs PP > 1"),
        ("qwen3_30b_a3b", dict(ep=3, gpus=24, tp=1, pp=1, sequence_parallel=False), "ep-divides-experts", "nearest valid EP: 2 or 4"),
        ("qwen3_30b_a3b", dict(ep=8, tp=1, pp=2, sequence_parallel=False), "expert-world-size", "ETP x EP x PP = 1 x 8 x 2 = 16"),
        ("qwen3_30b_a3b", dict(sequence_parallel=False), "ep-tp-needs-sp", "needs sequence parallel"),
        ("qwen3_8b", dict(gpus=9), "world-size", "nearest valid GPU counts: 8 or 10"),
        ("qwen3_0p6b", dict(mbs=3), "gbs-divides-mbs-dp", "nearest valid micro batch: 2 or 4"),
        ("qwen3_0p6b", dict(sequence_parallel=True), "sp-needs-tp", "needs TP > 1"),
        ("qwen3_1p7b", dict(cp=3, gpus=9), "seq-divides-cp", "nearest valid CP: 2 or 4"),
        ("qwen3_8b", dict(ep=2), "ep-needs-moe", "set EP=1"),
        ("qwen25_72b", dict(mbs=32, gpus=64), "vpp-microbatches", "multiple of PP=4"),
    ],
)
def test_each_rule_is_named_with_nearest_valid_values(name, changes, rule, hint) -> None:
    recipe = override(get_recipe(name), **changes, **OFF)
    problems = validate_layout(recipe)
    assert rule in _rules(recipe), problems
    line = next(p for p in problems if p.startswith(f"[{rule}]"))
    assert hint in line


def test_gpus_below_baseline_is_refused_unless_off_benchmark() -> None:
    with pytest.raises(OffBenchmarkError, match="at least 8 GPUs"):
        override(get_recipe("qwen3_8b"), gpus=4, tp=4)
    recipe = override(get_recipe("qwen3_8b"), gpus=4, tp=4, off_benchmark=True)
    assert recipe.off_benchmark and validate_layout(recipe) == []
    # A recipe built by hand with fewer GPUs than its baseline trips the validator rule itself.
    import dataclasses

    raw = dataclasses.replace(get_recipe("qwen3_8b"), gpus=4, parallel=dataclasses.replace(get_recipe("qwen3_8b").parallel, tp=4))
    assert "gpus-below-baseline" in _rules(raw)


def test_several_broken_rules_give_one_line_each() -> None:
    recipe = override(get_recipe("qwen3_30b_a3b"), tp=3)
    with pytest.raises(LayoutError) as err:
        check_layout(recipe)
    assert len(err.value.problems) == 3
    assert str(err.value).count("\n  - [") == 3


def test_acceptance_fields_need_off_benchmark() -> None:
    r = get_recipe("qwen25_72b")
    for changes in (dict(gbs=128), dict(seq_length=4096), dict(seed=7)):
        with pytest.raises(OffBenchmarkError, match="--off-benchmark"):
            override(r, **changes)
        assert override(r, **changes, off_benchmark=True).off_benchmark
    # Parallelism is free and does not mark the run.
    moved = override(r, tp=4, pp=8, vpp=0, gpus=64)
    assert not moved.off_benchmark and moved.parallel.vpp is None and validate_layout(moved) == []
    # Non-acceptance recipes change freely.
    assert not override(get_recipe("qwen3_0p6b"), gbs=256).off_benchmark


def test_derived_adjustments_keep_simple_overrides_runnable() -> None:
    r = override(get_recipe("qwen3_8b"), tp=1)
    assert not r.parallel.sequence_parallel and validate_layout(r) == []
    r = override(get_recipe("qwen25_72b"), pp=1, tp=8, gpus=32)
    assert r.parallel.vpp is None and validate_layout(r) == []


def test_cli_show_json_and_exit_codes(capsys) -> None:
    assert main(["recipes", "show", "qwen3_8b", "--gpus", "16", "--tp", "4", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["gpus"] == 16 and out["baseline_gpus"] == 8
    assert out["parallel"]["tp"] == 4 and out["parallel"]["dp"] == 4
    assert round(out["params_total"] / 1e9, 1) == 8.2

    assert main(["recipes", "show", "qwen3_8b", "--tp", "3"]) == 2
    err = capsys.readouterr().err
    assert "[tp-divides-heads]" in err and "nearest valid TP: 2 or 4" in err

    assert main(["recipes", "show", "qwen3_8b", "--seq-length", "4096"]) == 2
    assert "--off-benchmark" in capsys.readouterr().err
    assert main(["recipes", "show", "qwen3_8b", "--seq-length", "4096", "--off-benchmark"]) == 0
    assert capsys.readouterr().out.startswith("OFF-BENCHMARK")

    assert main(["recipes", "show", "no_such_model"]) == 2
    assert "unknown recipe 'no_such_model'" in capsys.readouterr().err


def test_cli_suggest_and_list(capsys) -> None:
    assert main(["recipes", "suggest", "qwen3_8b", "--gpus", "8", "--json"]) == 0
    layouts = json.loads(capsys.readouterr().out)
    assert layouts and all(layout["memory_gb"] < 80 for layout in layouts)
    assert main(["recipes", "suggest", "qwen25_72b", "--gpus", "32", "--gpu-mem-gb", "16"]) == 1
    assert main(["recipes", "suggest", "qwen25_72b", "--gpus", "16"]) == 2  # below baseline
    assert main(["recipes", "list"]) == 0
    listing = capsys.readouterr().out
    assert "qwen3_30b_a3b" in listing and "32 GPUs, GBS 64, seq 8192" in listing


def test_console_script_runs(venv_bin) -> None:
    exe = venv_bin / "qwen-pretrain"
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "qwen_pretrain.launch.cli"]
    done = subprocess.run([*cmd, "recipes", "list"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "qwen25_72b" in done.stdout
