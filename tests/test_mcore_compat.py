"""What differs between the supported megatron-core releases (0.14.x, 0.15.x, 0.16.x).

The default stage runs these against `.venv`'s megatron-core; CI's version-matrix stage runs this
file and the other megatron-touching tests again with an older release first on PYTHONPATH
(`.ci/mcore-matrix`). The cross-release test only runs there: it saves a checkpoint under the
older release and resumes it under `.venv`'s (the newest), in real torchrun jobs.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
from qwen_pretrain.launch.train_cmd import local_torchrun_command
from qwen_pretrain.recipes.errors import UserError
from qwen_pretrain.training import mcore_compat
from qwen_pretrain.training.checkpoint import _saved_sharding_type

ARGS = ["--recipe", "qwen3_tiny", "--mock-data", "--gbs", "4", "--mbs", "1", "--seq-length", "64",
        "--train-steps", "14", "--eval-interval", "0"]


def _venv_megatron_version() -> str:
    """The megatron-core of `.venv` itself, without any PYTHONPATH in front of it."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    code = "import megatron.core; print(megatron.core.__version__)"
    done = subprocess.run([_python(), "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def _python() -> str:
    import sys

    return sys.executable


def test_installed_release_is_in_the_supported_range() -> None:
    major, minor = (int(x) for x in mcore_compat.version().split(".")[:2])
    assert (0, 14) <= (major, minor) < (0, 17), mcore_compat.version()


@pytest.mark.parametrize("found,ok", [("0.14.0rc3", True), ("0.15.3", True), ("0.16.1", True),
                                      ("0.13.1", False), ("0.17.0", False), ("unknown", False)])
def test_release_check(found: str, ok: bool) -> None:
    if ok:
        assert mcore_compat.check_release(found).startswith(f"megatron-core {found} ")
    else:
        with pytest.raises(UserError, match=f"megatron-core {found} is not supported .*nemo:25.09"):
            mcore_compat.check_release(found)


def test_tokenizer_base_is_the_abstract_class_datasets_accept() -> None:
    base = mcore_compat.legacy_tokenizer_base()
    assert {"tokenize", "detokenize", "vocab_size", "eod"} <= set(dir(base))


def test_optimizer_format_is_one_this_release_reads_back() -> None:
    import torch

    class Fake:  # what optimizer_sharding_type inspects: the wrapped torch optimizer
        optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))])

    chosen = mcore_compat.optimizer_sharding_type(Fake())
    assert chosen in (mcore_compat.DP_RESHARDABLE, mcore_compat.MODEL_SPACE)
    assert mcore_compat.can_read_sharding_type(chosen), chosen


def test_numpy_alias_for_old_dist_checkpointing() -> None:
    import numpy as np

    mcore_compat.install_numpy_aliases()
    assert np.product((2, 3, 4)) == 24


def test_unreadable_optimizer_format_is_refused_in_one_line(tmp_path: Path) -> None:
    common = {"optimizer": {"param_state_sharding_type": "a_future_format"}, "megatron_core_version": "9.9.0"}
    with pytest.raises(UserError) as err:
        _saved_sharding_type(tmp_path, common)
    message = str(err.value)
    assert "\n" not in message
    assert "9.9.0" in message and mcore_compat.version() in message and "a_future_format" in message


def test_readable_optimizer_format_is_used_as_saved(tmp_path: Path) -> None:
    saved = mcore_compat.optimizer_sharding_type(None)  # no torch AdamW: this release's best format
    common = {"optimizer": {"param_state_sharding_type": saved}, "megatron_core_version": "x"}
    assert _saved_sharding_type(tmp_path, common) == saved


def _torchrun(args: list[str], *, newest: bool) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    if newest:
        env.pop("PYTHONPATH", None)
    cmd = local_torchrun_command(args, 2)
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600,
                          cwd=Path(__file__).resolve().parents[1])


def _losses(log_dir: Path) -> dict[int, float]:
    records = (json.loads(line) for line in (log_dir / "metrics.jsonl").read_text().splitlines())
    return {r["step"]: r["loss"] for r in records if r["kind"] == "train"}


@pytest.mark.slow
def test_checkpoint_of_this_release_resumes_under_the_newest_or_is_refused(tmp_path: Path) -> None:
    newest = _venv_megatron_version()
    if mcore_compat.version() == newest:
        pytest.skip(f"megatron-core {newest} is .venv's own: runs in the version-matrix stage only")
    saved = _torchrun([*ARGS, "--save", str(tmp_path / "ckpt"), "--stop-after", "7",
                       "--log-dir", str(tmp_path / "first")], newest=False)
    assert saved.returncode == 0, saved.stderr[-3000:]
    resumed = _torchrun([*ARGS, "--load", str(tmp_path / "ckpt"), "--log-dir", str(tmp_path / "second")],
                        newest=True)
    if resumed.returncode == 0:
        full = _torchrun([*ARGS, "--log-dir", str(tmp_path / "full")], newest=True)
        assert full.returncode == 0, full.stderr[-3000:]
        want, got = _losses(tmp_path / "full"), _losses(tmp_path / "second")
        assert sorted(got) == list(range(7, 14))
        assert max(abs(got[s] - want[s]) for s in got) <= 1e-6
        return
    errors = [ln for ln in resumed.stderr.splitlines() if ln.startswith("qwen-pretrain train: error:")]
    assert len(errors) == 1, resumed.stderr[-3000:]
    assert mcore_compat.version() in errors[0] and newest in errors[0] and "resume under" in errors[0]
