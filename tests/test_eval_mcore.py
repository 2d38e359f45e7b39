"""The from-scratch loop through megatron-core: same weights, same perplexity as transformers.

Real parts: a tokenizer trained here, a tiny Qwen3 (qwen3_tiny's shape, trained vocabulary) in
`transformers`, trained for a few dozen AdamW steps on real text (CPython's `json` package
sources); conversion's `hf_to_mcore` writes a torch_dist checkpoint at TP=2, which `eval ppl
--mcore` loads into training/model.py's GPTModel at TP=1 (dist_checkpointing reshards).
"""

from __future__ import annotations

import json
import sysconfig
from pathlib import Path

import pytest
import torch
from qwen_pretrain.launch.cli import main

VOCAB = 1000


def _corpus(path: Path, files: list[Path]) -> Path:
    with open(path, "w") as f:
        for p in files:
            f.write(json.dumps({"text": p.read_text(errors="replace")}) + "\n")
    return path


def _train_briefly(model, ids: torch.Tensor, steps: int, seq: int = 64, batch: int = 8) -> list[float]:
    """Plain next-token training on random windows of `ids` (fixed seed)."""
    g = torch.Generator().manual_seed(0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.train()
    losses = []
    threads = torch.get_num_threads()
    # One thread: this model is tiny, and on a loaded 2-core machine two OpenMP threads per
    # step are 10x slower than one.
    torch.set_num_threads(1)
    try:
        for _ in range(steps):
            starts = torch.randint(0, len(ids) - seq - 1, (batch,), generator=g)
            x = torch.stack([ids[s: s + seq] for s in starts])
            loss = model(input_ids=x, labels=x).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
    finally:
        torch.set_num_threads(threads)
    model.eval()
    return losses


@pytest.fixture(scope="module")
def loop(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """tokenizer -> preprocess -> random init (saved) -> brief training (saved) -> HF dirs."""
    from qwen_pretrain.conversion.hf_io import hf_config_for
    from qwen_pretrain.preprocessing.indexed import read_indexed_dataset
    from qwen_pretrain.preprocessing.tokenizer_train import recipe_with_tokenizer
    from qwen_pretrain.recipes import get_recipe
    from transformers import AutoConfig, AutoModelForCausalLM

    root = tmp_path_factory.mktemp("loop")
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    sources = sorted((stdlib / "json").glob("*.py")) + sorted((stdlib / "email").glob("*.py"))[:6]
    train = _corpus(root / "train.jsonl", sources[:-1])
    held = _corpus(root / "held.jsonl", sources[-1:])  # a file the model never trains on
    tok = root / "tok"
    assert main(["tokenizer", "train", "--input", str(train), "--vocab-size", str(VOCAB), "--out", str(tok)]) == 0
    assert main(["preprocess", "--input", str(train), "--output-prefix", str(root / "train"), "--tokenizer", str(tok),
                 "--workers", "1", "--no-progress"]) == 0
    ds = read_indexed_dataset(root / "train_text_document")
    ids = torch.from_numpy(ds.tokens[: ds.token_count].astype("int64"))

    shape = recipe_with_tokenizer(get_recipe("qwen3_tiny"), tok).model
    config = AutoConfig.for_model(**{k: v for k, v in hf_config_for(shape).items() if k != "architectures"})
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    dirs = {"root": root, "tok": tok, "held": held, "train_prefix": root / "train_text_document"}
    for name, steps in (("init", 0), ("trained", 80)):
        losses = _train_briefly(model, ids, steps)
        if steps:
            assert sum(losses[-5:]) / 5 < losses[0] - 1.0, losses  # it did learn
        out = root / name
        model.save_pretrained(out)
        for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
            (out / f).write_bytes((tok / f).read_bytes())
        dirs[name] = out
    return dirs


def _ppl(argv: list[str], capsys: pytest.CaptureFixture) -> dict:
    capsys.readouterr()
    assert main(["eval", "ppl", *argv, "--seq-length", "64", "--stride", "32", "--max-tokens", "1500",
                 "--no-progress"]) == 0
    return json.loads(capsys.readouterr().out)


def test_mcore_and_transformers_give_the_same_perplexity(loop: dict, capsys: pytest.CaptureFixture) -> None:
    from qwen_pretrain.conversion.convert import hf_to_mcore

    mcore = loop["root"] / "trained_mcore_tp2"
    hf_to_mcore(loop["trained"], mcore, tp=2, quiet=True)  # saved at TP=2, evaluated at TP=1
    for data in (loop["held"], loop["train_prefix"]):
        hf = _ppl(["--hf", str(loop["trained"]), "--data", str(data)], capsys)
        mc = _ppl(["--mcore", str(mcore), "--data", str(data)], capsys)
        assert mc["model"].startswith("mcore:") and mc["tokens"] == hf["tokens"] > 1000
        assert abs(mc["perplexity"] - hf["perplexity"]) / hf["perplexity"] < 1e-4, (mc, hf)


def test_trained_model_beats_its_initialization_and_generates_reproducibly(
    loop: dict, capsys: pytest.CaptureFixture
) -> None:
    init = _ppl(["--hf", str(loop["init"]), "--data", str(loop["held"])], capsys)
    trained = _ppl(["--hf", str(loop["trained"]), "--data", str(loop["held"])], capsys)
    assert trained["perplexity"] < 0.5 * init["perplexity"], (trained, init)

    prompts = loop["root"] / "prompts.jsonl"
    prompts.write_text("\n".join(json.dumps({"prompt": p}) for p in ("import json\n", "def ", "class Decoder:")) + "\n")
    args = ["eval", "generate", "--hf", str(loop["trained"]), "--prompts", str(prompts), "--max-new-tokens", "16",
            "--seed", "1"]
    runs = []
    for _ in range(2):
        capsys.readouterr()
        assert main(args) == 0
        runs.append(json.loads(capsys.readouterr().out))
    assert runs[0] == runs[1]
    assert all(g["completion"] for g in runs[0]["generations"])
