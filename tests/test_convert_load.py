"""Converted weights in the trainer's model: HF -> torch_dist at the trainer's TP, loaded by
two torchrun processes (gloo, TP=2) into the trainer's GPTModel chunks, same loss as HF.

Real parts: a `transformers` Qwen3 model with the qwen3_tiny shape (real vocabulary 151936),
`hf_to_mcore`, torchrun, megatron-core `dist_checkpointing`, `training.parallel` (the trainer's
process groups and model builder); and `qwen-pretrain train --load` itself on a converted
checkpoint (weights only, step 0, fresh optimizer).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from qwen_pretrain.conversion import hf_io
from qwen_pretrain.conversion.convert import hf_to_mcore
from qwen_pretrain.recipes import get_recipe
from qwen_pretrain.recipes.errors import UserError
from qwen_pretrain.training.checkpoint_dir import check_torch_dist_tp, loadable_tps

RECIPE = "qwen3_tiny"  # TP 2 in the recipe: the layout `qwen-pretrain train` uses

# One torchrun worker: the trainer's parallel state and model chunks, the converted checkpoint
# loaded through dist_checkpointing (resharded from the TP=1 files), the LM loss of one batch.
WORKER = """
import json, sys, torch
from megatron.core import dist_checkpointing
from qwen_pretrain.training.checkpoint_dir import check_torch_dist_tp
from qwen_pretrain.training.parallel import build_model_chunks, destroy_parallel, init_parallel
from qwen_pretrain.recipes import get_recipe

RECIPE, mcore, ids_path, out = sys.argv[1:5]
recipe = get_recipe(RECIPE)
init_parallel(recipe)
[model] = build_model_chunks(recipe)
model.eval()
ids = torch.load(ids_path)
pos = torch.arange(ids.shape[1] - 1).unsqueeze(0).expand(ids.shape[0], -1)

def loss():
    with torch.no_grad():
        return model(ids[:, :-1], pos, None, labels=ids[:, 1:]).float().mean().item()

fresh = loss()
check_torch_dist_tp(mcore, recipe.model, recipe.parallel.tp)
state = dist_checkpointing.load({"model": model.sharded_state_dict()}, mcore + "/iter_0000000")["model"]
model.load_state_dict(state)
result = {"fresh": fresh, "loaded": loss(), "rows": model.embedding.word_embeddings.weight.shape[0]}
if torch.distributed.get_rank() == 0:
    with open(out, "w") as f:
        json.dump(result, f)
destroy_parallel()
"""


def _hf_model(path: Path) -> Path:
    import transformers

    shape = get_recipe(RECIPE).model
    cfg = {k: v for k, v in hf_io.hf_config_for(shape).items() if k != "model_type"}
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(transformers.Qwen3Config(**cfg))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.5)  # peaked logits: the loss is far from a fresh model's
    model.save_pretrained(str(path))
    return path


def test_converted_weights_give_hf_loss_in_trainer_model(tmp_path: Path, port: int) -> None:
    import transformers

    recipe = get_recipe(RECIPE)
    hf = _hf_model(tmp_path / "hf")
    hf_to_mcore(hf, tmp_path / "mcore", tp=recipe.parallel.tp, fmt="torch_dist", quiet=True)
    ids = torch.randint(0, recipe.model.vocab_size, (2, 33), generator=torch.Generator().manual_seed(1))
    torch.save(ids, tmp_path / "ids.pt")
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(str(hf), dtype=torch.float32).eval()
    with torch.no_grad():
        logits = hf_model(ids).logits[:, :-1].float()
    # megatron-core's softmax also runs over the padded vocabulary rows, which the converter
    # fills with zeros: their logits are exactly 0, so the expected loss includes them.
    pad = recipe.model.padded_vocab_size(recipe.parallel.tp) - recipe.model.vocab_size
    padded = torch.cat([logits, torch.zeros(*logits.shape[:2], pad)], dim=-1)
    hf_loss = torch.nn.functional.cross_entropy(padded.reshape(-1, padded.shape[-1]), ids[:, 1:].reshape(-1)).item()

    (tmp_path / "worker.py").write_text(WORKER)
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(recipe.gpus), "--nnodes", "1",
        "--master-addr", "127.0.0.1", "--master-port", str(port),
        str(tmp_path / "worker.py"), RECIPE, str(tmp_path / "mcore"), str(tmp_path / "ids.pt"), str(tmp_path / "out.json"),
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-4000:]
    r = json.loads((tmp_path / "out.json").read_text())
    assert r["rows"] * recipe.parallel.tp == recipe.model.padded_vocab_size(recipe.parallel.tp)
    assert abs(r["loaded"] - hf_loss) < 1e-5 * hf_loss, (r, hf_loss)
    assert abs(r["fresh"] - hf_loss) > 1.0, (r, hf_loss)  # the load changed the weights


def test_torch_dist_of_another_tp_padding_is_refused_by_name(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from qwen_pretrain.launch.cli import main

    shape = get_recipe(RECIPE).model  # 151936 rows at TP 1, 152064 at TP 2 and 4
    hf = tmp_path / "hf"
    hf.mkdir()
    from qwen_pretrain.conversion.mapping import expected_hf_shapes
    from safetensors.torch import save_file

    save_file({k: torch.zeros(s, dtype=torch.bfloat16) for k, s in expected_hf_shapes(shape).items()}, str(hf / "model.safetensors"))
    (hf / "config.json").write_text(json.dumps(hf_io.hf_config_for(shape)))
    assert main(["convert", "hf-to-mcore", "--hf", str(hf), "--out", str(tmp_path / "tp1"), "--quiet"]) == 0
    assert "151936 rows (vocabulary padded for TP 1): load it with --tp 1\n" in capsys.readouterr().out
    check_torch_dist_tp(tmp_path / "tp1", shape, 1)
    with pytest.raises(UserError, match=r"151936 rows .* TP 2 pads it to 152064: convert again with .*--tp 2") as err:
        check_torch_dist_tp(tmp_path / "tp1", shape, 2)
    assert "\n" not in str(err.value)
    assert loadable_tps(shape, 152064)[:2] == [2, 3]


def test_train_load_starts_from_converted_weights(tmp_path: Path, port: int) -> None:
    """`qwen-pretrain train --load` on a converted checkpoint: weights only, step 0, fresh optimizer.

    The HF weights are drawn wide (N(0, 0.5)), so their first-step loss is far above the
    ~ln(vocab) = 11.93 of megatron's small-std initialisation: a run that ignored the loaded
    weights could not log it.
    """
    import math
    import re

    recipe = get_recipe(RECIPE)
    hf = _hf_model(tmp_path / "hf")
    hf_to_mcore(hf, tmp_path / "mcore", tp=recipe.parallel.tp, fmt="torch_dist", quiet=True)
    cmd = [
        sys.executable, "-m", "qwen_pretrain.launch.cli", "train", "--recipe", RECIPE, "--mock-data",
        "--nproc", str(recipe.gpus), "--train-steps", "2", "--eval-interval", "0",
        "--load", str(tmp_path / "mcore"), "--log-dir", str(tmp_path / "logs"),
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_PORT": str(port)}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "Loaded weights from" in out and "starting at step 0" in out
    losses = [float(x) for x in re.findall(r"reduced_train_loss: ([0-9.eE+-]+|nan|inf)", out)]
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses), out[-2000:]
    assert losses[0] > math.log(recipe.model.padded_vocab_size(recipe.parallel.tp)) + 1.0, losses
