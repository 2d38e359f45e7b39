"""`eval ppl --hf`, `eval generate`, `bench generate` on a tiny Qwen3 from transformers.

Real parts: a tokenizer trained here (HF `tokenizers`), a `transformers` Qwen3ForCausalLM with
random weights in the qwen3_tiny recipe's shape (config.json from conversion's `hf_config_for`),
our preprocess CLI for the .bin/.idx path. The sliding-window tests use a small recording scorer
so they can check exactly which tokens are scored with which context.
"""

from __future__ import annotations

import json
import math
import sysconfig
from pathlib import Path

import numpy as np
import pytest
import torch
from qwen_pretrain.evaluation.generation import decode_loop, distinct_n, repetition_rate, sample_next
from qwen_pretrain.evaluation.perplexity import Scorer, perplexity, sliding_windows
from qwen_pretrain.launch.cli import main
from qwen_pretrain.recipes.errors import UserError

VOCAB = 1000  # trained tokenizer size; the model gets Megatron's padding (1024 rows)


def _corpus(path: Path, files: list[Path]) -> Path:
    with open(path, "w") as f:
        for p in files:
            f.write(json.dumps({"text": p.read_text(errors="replace")}) + "\n")
    return path


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Train a tokenizer on stdlib `json/`, save a random tiny Qwen3 with it; held-out text: `email/`."""
    from qwen_pretrain.conversion.hf_io import hf_config_for
    from qwen_pretrain.preprocessing.tokenizer_train import recipe_with_tokenizer, train_tokenizer
    from qwen_pretrain.recipes import get_recipe
    from transformers import AutoConfig, AutoModelForCausalLM

    root = tmp_path_factory.mktemp("eval")
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    train = _corpus(root / "train.jsonl", sorted((stdlib / "json").glob("*.py")))
    held = _corpus(root / "held.jsonl", sorted((stdlib / "email").glob("*.py"))[:4])
    tok = root / "tok"
    train_tokenizer([train], tok, vocab_size=VOCAB)
    shape = recipe_with_tokenizer(get_recipe("qwen3_tiny"), tok).model
    config = AutoConfig.for_model(**{k: v for k, v in hf_config_for(shape).items() if k != "architectures"})
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    hf = root / "hf"
    model.save_pretrained(hf)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (hf / name).write_bytes((tok / name).read_bytes())
    prompts = root / "prompts.txt"
    prompts.write_text("import json\n\ndef decode(self, s):\nclass Encoder:\n")
    return {"root": root, "tok": tok, "hf": hf, "held": held, "train": train, "prompts": prompts}


def _run_json(argv: list[str], capsys: pytest.CaptureFixture) -> dict:
    capsys.readouterr()
    assert main(argv) == 0
    return json.loads(capsys.readouterr().out)


# ---------------------------------------------------------------- the sliding window


@pytest.mark.parametrize("n,length,stride", [(10, 4, 3), (10, 4, 1), (11, 4, 3), (4, 4, 2), (100, 16, 5), (17, 16, 15)])
def test_windows_score_every_token_but_the_first_once(n: int, length: int, stride: int) -> None:
    windows = sliding_windows(n, length, stride)
    scored = [pos for begin, end, first in windows for pos in range(first, end)]
    assert scored == list(range(1, n))
    for begin, end, first in windows:
        assert end - begin <= length and first > begin
        if begin > 0:  # later windows: each scored token sees at least L - S tokens of context
            assert first - begin >= length - stride


def test_perplexity_scores_each_token_with_its_window_context() -> None:
    """A scorer whose logit for the right token encodes how much context it saw."""
    ids = np.arange(23) % 7
    seen: dict[int, int] = {}

    def logits(batch: torch.Tensor) -> torch.Tensor:
        b, t = batch.shape
        out = torch.zeros(b, t, 7)
        for r in range(b):
            for j in range(t):
                out[r, j, (int(batch[r, j]) + 1) % 7] = float(j + 1)  # right token; context j + 1
        return out

    res = perplexity(Scorer("probe", 7, logits, "qwen"), ids, seq_length=8, stride=3, batch_size=2)
    assert res.tokens == 22 and res.windows == len(sliding_windows(23, 8, 3))
    for begin, end, first in sliding_windows(23, 8, 3):
        for pos in range(first, end):
            seen[pos] = pos - begin  # context of `pos` inside its window
    expected = sum(math.log(6 + math.exp(c)) - c for c in seen.values()) / 22
    assert res.mean_loss == pytest.approx(expected, rel=1e-5)  # fp32 logits
    assert res.perplexity == pytest.approx(math.exp(expected))


def test_short_data_and_bad_stride_are_one_line_errors() -> None:
    scorer = Scorer("m", 10, lambda x: torch.zeros(*x.shape, 10), "qwen")
    with pytest.raises(UserError, match=r"held.jsonl: 5 tokens, shorter than one window of --seq-length 8"):
        perplexity(scorer, np.arange(5), seq_length=8, data_name="held.jsonl")
    for stride in (0, 8, 9):
        with pytest.raises(UserError, match=f"--stride {stride}: must be at least 1 and below --seq-length"):
            perplexity(scorer, np.arange(20) % 10, seq_length=8, stride=stride)


# ---------------------------------------------------------------- eval ppl --hf


def test_ppl_on_jsonl_equals_ppl_on_its_preprocessed_bin_idx(setup: dict, capsys: pytest.CaptureFixture) -> None:
    prefix = setup["root"] / "held"
    assert main(["preprocess", "--input", str(setup["held"]), "--output-prefix", str(prefix),
                 "--tokenizer", str(setup["tok"]), "--workers", "1", "--no-progress"]) == 0
    common = ["--seq-length", "64", "--stride", "48", "--max-tokens", "1200", "--no-progress"]
    a = _run_json(["eval", "ppl", "--hf", str(setup["hf"]), "--data", str(setup["held"]), *common], capsys)
    b = _run_json(["eval", "ppl", "--hf", str(setup["hf"]), "--data", f"{prefix}_text_document", *common,
                   "--out", str(setup["root"] / "ppl.json")], capsys)
    assert a["tokens"] == b["tokens"] == 1199
    assert a["mean_loss"] == pytest.approx(b["mean_loss"], rel=1e-9)
    assert a["perplexity"] == pytest.approx(math.exp(a["mean_loss"]))
    # random weights: close to (not far below) a uniform guess over the 1,024 rows
    assert 0.5 * math.log(1024) < a["mean_loss"] < 3 * math.log(1024)
    assert json.loads((setup["root"] / "ppl.json").read_text()) == b


def test_ppl_bad_input_names_file_and_fix(setup: dict, tmp_path: Path, capsys: pytest.CaptureFixture,
                                          no_eod_tokenizer: Path) -> None:
    capsys.readouterr()
    # data shorter than one window
    short = tmp_path / "short.jsonl"
    short.write_text(json.dumps({"text": "def f(x):\n    return x\n"}) + "\n")
    assert main(["eval", "ppl", "--hf", str(setup["hf"]), "--data", str(short), "--seq-length", "64"]) == 2
    # the official Qwen tokenizer (151,669 tokens) does not fit this model's 1,024 rows
    assert main(["eval", "ppl", "--hf", str(setup["hf"]), "--data", str(setup["held"]), "--tokenizer", "qwen"]) == 2
    # a tokenizer directory without <|endoftext|>
    no_eod = no_eod_tokenizer
    assert main(["eval", "ppl", "--hf", str(setup["hf"]), "--data", str(setup["held"]), "--tokenizer", str(no_eod)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3
    assert "short.jsonl" in err[0] and "shorter than one window of --seq-length 64" in err[0]
    assert "1024 vocabulary rows" in err[1] and "151669 tokens" in err[1] and "--tokenizer" in err[1]
    assert "no_eod/tokenizer.json" in err[2] and "<|endoftext|>" in err[2]


# ---------------------------------------------------------------- generation


def test_generate_is_reproducible_and_reports_sanity_metrics(setup: dict, capsys: pytest.CaptureFixture) -> None:
    args = ["eval", "generate", "--hf", str(setup["hf"]), "--prompts", str(setup["prompts"]), "--max-new-tokens", "12"]
    a = _run_json([*args, "--seed", "7"], capsys)
    b = _run_json([*args, "--seed", "7", "--out", str(setup["root"] / "gen.json")], capsys)
    c = _run_json([*args, "--seed", "8"], capsys)
    assert a == b and json.loads((setup["root"] / "gen.json").read_text()) == b
    assert [g["completion"] for g in a["generations"]] != [g["completion"] for g in c["generations"]]
    assert len(a["generations"]) == 3 and a["eos_id"] == 974  # trained <|endoftext|>: after 974 learned tokens
    for key in ("distinct_1", "distinct_2", "repetition_rate", "eos_share"):
        assert 0.0 <= a[key] <= 1.0
    assert all(g["new_tokens"] == 12 or g["stopped_at_eos"] for g in a["generations"])


def test_greedy_decoding_matches_transformers_generate(setup: dict) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(setup["hf"], dtype=torch.float32).eval()
    prompt = torch.tensor([[5, 17, 300, 42, 7]])
    ours = decode_loop(model, prompt, max_new_tokens=10, temperature=0.0, top_p=1.0, generator=None,
                       vocab_limit=model.config.vocab_size, eos_id=None)
    theirs = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=10, min_new_tokens=10,
                            do_sample=False, pad_token_id=0)[:, 5:]
    assert ours.tolist() == theirs.tolist()


def test_sampling_rules() -> None:
    logits = torch.tensor([[2.0, 1.0, 0.5, -1.0]])
    g = torch.Generator().manual_seed(0)
    # top-p below the top token's probability keeps only that token
    assert {int(sample_next(logits, 1.0, 0.3, g)) for _ in range(50)} == {0}
    # p = 0.9 keeps the three most likely tokens (0.61 + 0.22 + 0.14 >= 0.9), never the last
    drawn = {int(sample_next(logits, 1.0, 0.9, g)) for _ in range(300)}
    assert drawn == {0, 1, 2}
    assert int(sample_next(logits, 0.0, 1.0, None)) == 0


def test_decode_stops_at_eos_per_row() -> None:
    """A stub model (our loop's contract: logits + past_key_values) emitting EOS=3 after k steps."""

    class Out:
        def __init__(self, logits: torch.Tensor, past: int) -> None:
            self.logits, self.past_key_values = logits, past

    def model(input_ids: torch.Tensor, past_key_values: int = 0, use_cache: bool = True) -> Out:
        step = past_key_values + 1
        logits = torch.zeros(input_ids.shape[0], 1, 5)
        logits[0, 0, 3 if step >= 2 else 1] = 10.0  # row 0: EOS on the 2nd token
        logits[1, 0, 3 if step >= 4 else 2] = 10.0  # row 1: EOS on the 4th token
        return Out(logits, step)

    out = decode_loop(model, torch.zeros(2, 3, dtype=torch.long), max_new_tokens=10, temperature=0.0, top_p=1.0,
                      generator=None, vocab_limit=5, eos_id=3)
    assert out.tolist() == [[1, 3, 3, 3], [2, 2, 2, 3]]


def test_metrics_on_known_sequences() -> None:
    assert distinct_n([[1, 2, 3, 4]], 1) == 1.0
    assert distinct_n([[1, 1, 1, 1]], 1) == 0.25
    assert distinct_n([[1, 2, 1, 2], [1, 2]], 2) == pytest.approx(2 / 4)  # (1,2) (2,1) (1,2) | (1,2)
    assert repetition_rate([[1, 2, 3, 4, 5]]) == 0.0
    assert repetition_rate([[7] * 10]) == pytest.approx(1 - 1 / 7)
    assert repetition_rate([[1, 2], [1, 2, 3, 4, 1, 2, 3, 4]]) == pytest.approx(1 - 4 / 5)


def test_bench_generate_prints_table_and_json(setup: dict, capsys: pytest.CaptureFixture) -> None:
    out = setup["root"] / "speed.json"
    capsys.readouterr()
    assert main(["bench", "generate", "--hf", str(setup["hf"]), "--batch", "2", "--prompt-len", "16",
                 "--new-tokens", "8", "--repeats", "1", "--out", str(out)]) == 0
    table = capsys.readouterr().out
    for label in ("time to first token", "decode", "peak memory"):
        assert label in table
    speed = json.loads(out.read_text())
    assert speed["batch"] == 2 and speed["new_tokens"] == 8 and speed["memory_kind"] == "peak_rss"
    assert speed["ttft_ms"] > 0 and speed["decode_tokens_per_s"] > 0
    assert speed["peak_memory_bytes"] >= speed["model_rss_bytes"] > 0
    parsed = _run_json(["bench", "generate", "--hf", str(setup["hf"]), "--new-tokens", "4", "--repeats", "1",
                        "--warmup", "0", "--json"], capsys)
    assert parsed["new_tokens"] == 4 and parsed["baseline_tokens_per_s"] is None
