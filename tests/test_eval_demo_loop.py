"""The demo's trained tiny model through the evaluation loop (slow: the demo trains for ~2 minutes).

`qwen-pretrain demo` trains qwen3_tiny (Qwen tokenizer, TP=2, two CPU processes, 40 steps) and
saves a torch_dist checkpoint. Here: its perplexity on held-out text (stdlib files the demo's
3 MB sample does not reach) through megatron-core, against the same recipe at initialization
(megatron-core's init with the recipe's seed, saved as a torch_dist checkpoint at TP=1: the
trainer has no save-before-the-first-step option); then the checkpoint converted to Hugging Face
(`conversion.convert.mcore_to_hf`) must give the same perplexity through transformers, and its
seeded generations must repeat exactly.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from qwen_pretrain.launch.cli import main


def _save_init_checkpoint(out: Path) -> None:
    from megatron.core import dist_checkpointing
    from qwen_pretrain.recipes import get_recipe, override
    from qwen_pretrain.training.model import build_model
    from qwen_pretrain.training.parallel import init_single_process

    recipe = override(get_recipe("qwen3_tiny"), tp=1, gpus=1)
    init_single_process(seed=recipe.training.seed)
    model = build_model(recipe)
    (out / "iter_0000000").mkdir(parents=True)
    dist_checkpointing.save({"model": model.sharded_state_dict()}, str(out / "iter_0000000"))
    (out / "latest_checkpointed_iteration.txt").write_text("0\n")


def _ppl(argv: list[str], capsys: pytest.CaptureFixture) -> dict:
    capsys.readouterr()
    assert main(["eval", "ppl", *argv, "--seq-length", "128", "--stride", "64", "--max-tokens", "2000",
                 "--no-progress"]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_demo_model_goes_through_the_loop(tmp_path: Path, repo_root: Path, capsys: pytest.CaptureFixture) -> None:
    from qwen_pretrain.conversion.convert import mcore_to_hf
    from qwen_pretrain.launch import demo

    out = tmp_path / "demo"
    proc = subprocess.run([sys.executable, "-m", "qwen_pretrain.launch.cli", "demo", "--out", str(out)],
                          capture_output=True, text=True, timeout=1500, cwd=repo_root)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    sample = (out / "sample.jsonl").read_text() if (out / "sample.jsonl").is_file() else ""
    held = tmp_path / "held.jsonl"
    stdlib_tail = [p for p in demo.text_sources() if p.suffix == ".py"][-40:]  # sorted: far past 3 MB
    with held.open("w") as f:
        for p in stdlib_tail[:8]:
            text = p.read_text(errors="replace")
            assert json.dumps(text)[1:200] not in sample
            f.write(json.dumps({"text": text}) + "\n")

    init = tmp_path / "init"
    _save_init_checkpoint(init)
    ckpt = out / "checkpoints"
    trained_mc = _ppl(["--mcore", str(ckpt), "--recipe", "qwen3_tiny", "--data", str(held)], capsys)
    init_mc = _ppl(["--mcore", str(init), "--recipe", "qwen3_tiny", "--data", str(held)], capsys)
    assert trained_mc["tokens"] == init_mc["tokens"] == 1999
    assert trained_mc["perplexity"] < 0.5 * init_mc["perplexity"], (trained_mc, init_mc)

    hf = tmp_path / "hf"
    mcore_to_hf(ckpt, hf, recipe="qwen3_tiny", quiet=True)
    trained_hf = _ppl(["--hf", str(hf), "--data", str(held)], capsys)
    assert abs(trained_hf["perplexity"] - trained_mc["perplexity"]) / trained_mc["perplexity"] < 1e-4

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("import os\ndef main():\nclass Config:\n")
    runs = []
    for _ in range(2):
        capsys.readouterr()
        assert main(["eval", "generate", "--hf", str(hf), "--prompts", str(prompts), "--max-new-tokens", "16",
                     "--seed", "0"]) == 0
        runs.append(json.loads(capsys.readouterr().out))
    assert runs[0] == runs[1] and runs[0]["eos_id"] == 151643
    print(json.dumps({"trained_mcore": trained_mc, "init_mcore": init_mc, "trained_hf": trained_hf,
                      "generation": {k: v for k, v in runs[0].items() if k != "generations"}}, indent=1),
          file=sys.stderr)
