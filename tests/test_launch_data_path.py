"""`--data-path` means the same to `qwen-pretrain train` and `qwen-pretrain launch`: one parser
(`training.data.parse_data_path`), so both commands accept the same values, read the same blend
and refuse the same mistakes with the same one-line error."""

from __future__ import annotations

from pathlib import Path

import pytest
from qwen_pretrain.launch import train_cmd
from qwen_pretrain.launch.cli import main
from qwen_pretrain.training.data import parse_data_path

NODE_ENV = {"MASTER_ADDR": "node0", "MASTER_PORT": "29400", "NODE_RANK": "0"}

ACCEPTED = [
    (["a/x"], [(1.0, "a/x")]),
    (["0.3", "a/x", "0.7", "b/y"], [(0.3, "a/x"), (0.7, "b/y")]),
    (["1", "a", "1", "b", "2", "c"], [(1.0, "a"), (1.0, "b"), (2.0, "c")]),
    (["3e1", "a"], [(30.0, "a")]),
]

REFUSED = [
    (["a", "b"], "2 prefixes without weights; put a weight before each prefix, e.g. --data-path 1 a 1 b"),
    (["a", "b", "c"], "3 prefixes without weights"),
    (["0.5"], "'0.5' is a weight with no PREFIX after it"),
    (["0.3 a 0.7 b"], "pass its weights and prefixes as separate arguments"),
    (["0.3", "a", "b"], "3 values, not WEIGHT PREFIX pairs"),
    (["a", "0.3", "b", "0.7"], "'a' stands where a weight belongs"),
    (["0.3", "0.7", "a", "b"], "'0.7' stands where a PREFIX belongs"),
    (["0", "a", "1", "b"], "weight '0' of a must be a positive number"),
    (["-1", "a"], "weight '-1' of a must be a positive number"),
    (["nan", "a"], "weight 'nan' of a must be a positive number"),
]


def run_train(capsys, monkeypatch, values: list[str]):
    """`qwen-pretrain train --nproc 2 --data-path ...` up to where torchrun would start:
    (exit code, error line, blend the trainer would read)."""
    seen = {}
    build = train_cmd.training_recipe_from_args

    def capture(args, world_size=None):
        seen["recipe"] = build(args, world_size)
        return seen["recipe"]

    monkeypatch.setattr(train_cmd, "training_recipe_from_args", capture)
    monkeypatch.setattr(train_cmd, "spawn", lambda argv, nproc, **kwargs: 0)
    rc = main(["train", "--recipe", "qwen3_tiny", "--nproc", "2", "--data-path", *values])
    err = capsys.readouterr().err
    blend = seen["recipe"].data.blend if rc == 0 else None
    return rc, err, blend


def run_launch(capsys, monkeypatch, tmp_path, values: list[str]):
    """`qwen-pretrain launch --dry-run --data-path ...`: (exit code, error line, `data:` summary)."""
    for key, value in NODE_ENV.items():
        monkeypatch.setenv(key, value)
    monkeypatch.chdir(tmp_path)
    rc = main(["launch", "--recipe", "qwen3_tiny", "--nodes", "1", "--gpus-per-node", "2", "--dry-run",
               "--data-path", *values])
    out, err = capsys.readouterr()
    summary = next((line for line in out.splitlines() if line.startswith("# data: ")), None)
    return rc, err, summary


@pytest.mark.parametrize("values, blend", ACCEPTED)
def test_train_and_launch_accept_the_same_blend(capsys, monkeypatch, tmp_path, values, blend):
    assert list(parse_data_path(values)) == blend
    rc, err, train_blend = run_train(capsys, monkeypatch, values)
    assert (rc, err) == (0, "") and list(train_blend) == blend
    rc, err, summary = run_launch(capsys, monkeypatch, tmp_path, values)
    assert (rc, err) == (0, "")
    # launch hands the nodes absolute prefixes, the same blend otherwise
    expected = " ".join(f"{w:g} {(tmp_path / p).resolve()}" for w, p in blend)
    assert summary == f"# data: {expected}"


@pytest.mark.parametrize("values, message", REFUSED)
def test_train_and_launch_refuse_the_same_values(capsys, monkeypatch, tmp_path, values, message):
    rc_train, err_train, _ = run_train(capsys, monkeypatch, values)
    rc_launch, err_launch, _ = run_launch(capsys, monkeypatch, tmp_path, values)
    assert rc_train == rc_launch == 2
    line = err_train.removeprefix("qwen-pretrain train: error: ")
    assert err_launch.removeprefix("qwen-pretrain launch: error: ") == line  # word for word
    assert line.count("\n") == 1 and line.startswith("--data-path: ") and message in line
    assert not any(Path(tmp_path).iterdir())  # nothing written
