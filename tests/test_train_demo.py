"""`qwen-pretrain demo`: its parts here, the whole demo (about 2 minutes on 2 cores) as slow."""

from __future__ import annotations

import json
import subprocess
import sys

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
    assert again.read_text() == out.read_text()  # deterministic: the baseline depends on it


def test_demo_output_replaces_an_older_one_whole(tmp_path):
    """The demo's work directory (`atomic_dir(out, replace=True)`) swaps whole directories."""
    final = tmp_path / "demo_output"
    final.mkdir()
    (final / "old.txt").write_text("old")
    with atomic_dir(final, replace=True) as work:
        (work / "report.txt").write_text("new")
    assert sorted(p.name for p in final.iterdir()) == ["report.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["demo_output"]  # no work or old directory left


@pytest.mark.slow
def test_demo_end_to_end_passes(tmp_path, repo_root):
    out = tmp_path / "demo"
    proc = subprocess.run([sys.executable, "-m", "qwen_pretrain.launch.cli", "demo", "--out", str(out)],
                          capture_output=True, text=True, timeout=900, cwd=repo_root)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    assert "overall: PASS" in proc.stdout
    report = json.loads((out / "report.json").read_text())
    assert report["verdict"] == "passed" and report["run"]["steps"] == demo.STEPS
    assert (out / "checkpoints" / "latest_checkpointed_iteration.txt").read_text().strip() == str(demo.STEPS)
    assert [p.name for p in tmp_path.iterdir()] == ["demo"]  # no work directory left beside it
