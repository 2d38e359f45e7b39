"""De-duplication (exact, MinHash-LSH) and multi-corpus blending, through the CLI too."""

from __future__ import annotations

import json
import random
import sysconfig
from pathlib import Path

import numpy as np
import pytest
from qwen_pretrain.launch.cli import main as cli_main
from qwen_pretrain.preprocessing.blend import load_blend_config
from qwen_pretrain.preprocessing.dedup import MinHashLSH, MinHashParams, jaccard, minhash_signature
from qwen_pretrain.preprocessing.indexed import read_indexed_dataset
from qwen_pretrain.preprocessing.pipeline import preprocess
from qwen_pretrain.recipes.errors import UserError

STDLIB = Path(sysconfig.get_paths()["stdlib"])


def stdlib_texts(n: int) -> list[str]:
    return [p.read_text(errors="replace")[:6000] for p in sorted(STDLIB.glob("*.py"))[:n]]


def edit(text: str, fraction: float, seed: int) -> str:
    """Replace about `fraction` of the words: a near-duplicate at a known distance."""
    rng = random.Random(seed)
    words = text.split(" ")
    for i in rng.sample(range(len(words)), int(len(words) * fraction)):
        words[i] = f"w{rng.randrange(10**6)}"
    return " ".join(words)


def test_minhash_estimates_jaccard():
    params = MinHashParams(num_perm=256, bands=32)
    coeff = params.coefficients()
    base = stdlib_texts(1)[0]
    for fraction in (0.02, 0.1, 0.3):
        other = edit(base, fraction, seed=1)
        true = jaccard(base, other)
        estimate = np.mean(minhash_signature(base, params, coeff) == minhash_signature(other, params, coeff))
        assert abs(estimate - true) < 0.1, (fraction, true, estimate)
    unrelated = stdlib_texts(2)[1]
    assert np.mean(minhash_signature(base, params, coeff) == minhash_signature(unrelated, params, coeff)) < 0.2


def test_lsh_drops_near_duplicates_keeps_distinct():
    params = MinHashParams()
    coeff = params.coefficients()
    lsh = MinHashLSH(params)
    originals = stdlib_texts(30)
    assert not any(lsh.is_duplicate(minhash_signature(t, params, coeff)) for t in originals)
    near = [edit(t, 0.01, seed=i) for i, t in enumerate(originals[:10])]
    assert all(jaccard(a, b) > 0.85 for a, b in zip(originals, near))
    assert all(lsh.is_duplicate(minhash_signature(t, params, coeff)) for t in near)
    far = [edit(t, 0.5, seed=i) for i, t in enumerate(originals[10:20])]
    assert not any(lsh.is_duplicate(minhash_signature(t, params, coeff)) for t in far)


def test_pipeline_dedup_exact_and_minhash(tmp_path):
    texts = stdlib_texts(20)
    docs = texts + [t.upper().replace("\n", "\n\n") for t in texts[:5]] + [edit(t, 0.01, 7) for t in texts[5:10]]
    src = tmp_path / "d.jsonl"
    src.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    exact = preprocess(src, tmp_path / "e", dedup="exact", workers=1, progress=False)
    assert exact.duplicates == 5 and exact.documents == 25  # case/whitespace variants only
    near = preprocess(src, tmp_path / "n", dedup="minhash", workers=1, progress=False)
    assert near.duplicates == 10 and near.documents == 20
    none = preprocess(src, tmp_path / "x", workers=1, progress=False)
    kept = read_indexed_dataset(near.datasets[0].prefix)
    everything = read_indexed_dataset(none.datasets[0].prefix)
    assert np.array_equal(kept.tokens, everything.tokens[: kept.token_count])  # the first 20 survive


def write_blend(tmp_path: Path) -> Path:
    (tmp_path / "web").mkdir()
    (tmp_path / "web" / "a.jsonl").write_text(
        "".join(json.dumps({"text": t}) + "\n" for t in stdlib_texts(40)))
    code = [p.read_text(errors="replace") for p in sorted((STDLIB / "json").glob("*.py"))]
    (tmp_path / "code.jsonl").write_text("".join(json.dumps({"content": t}) + "\n" for t in code))
    cfg = tmp_path / "blend.yaml"
    cfg.write_text(
        "output_dir: out\nworkers: 1\ntotal_tokens: 30000\ncorpora:\n"
        "  - {name: web, inputs: ['web/*.jsonl'], target_tokens: 20000, shard_tokens: 8000}\n"
        "  - {name: code, inputs: [code.jsonl], json_key: content, weight: 1}\n"
        "  - {name: zh, inputs: [web], weight: 1}\n"
    )
    return cfg


def test_blend_writes_targets_and_prints_weights(tmp_path, capsys):
    cfg = write_blend(tmp_path)
    spec = load_blend_config(cfg)
    assert [c.target_tokens for c in spec.corpora] == [20000, 15000, 15000]
    assert cli_main(["preprocess", "blend", str(cfg), "--no-progress"]) == 0
    out = capsys.readouterr().out
    blend = json.loads((tmp_path / "out" / "blend.json").read_text())
    tokens = {n: c["tokens"] for n, c in blend["corpora"].items()}
    assert 17000 < tokens["web"] <= 20000  # stops before the document that would pass it and tokens["zh"] <= 15000
    shards = blend["corpora"]["web"]["datasets"]
    assert len(shards) >= 2 and shards[0].endswith("web_0000_text_document")
    assert all(read_indexed_dataset(p).token_count >= 8000 for p in shards[:-1])
    data_path = blend["megatron_data_path"].split()
    weights, prefixes = [float(w) for w in data_path[::2]], data_path[1::2]
    written = [read_indexed_dataset(p).token_count for p in prefixes]
    assert sum(weights) == pytest.approx(1, abs=1e-4)
    assert weights == pytest.approx([w / sum(written) for w in written], rel=1e-4)
    assert f'--data-path {blend["megatron_data_path"]}\n' in out  # separate words, as train and launch read them
    assert f"paths={json.dumps(blend['nemo_paths'])}" in out
    assert blend["nemo_paths"][1::2] == prefixes


@pytest.mark.parametrize("body,message", [
    ("corpora: []\n", "non-empty 'corpora'"),
    ("output_dir: o\ncorpora:\n  - {name: a, inputs: [x.jsonl]}\n", "exactly one of target_tokens or weight"),
    ("output_dir: o\ncorpora:\n  - {name: a, inputs: [x.jsonl], weight: 2}\n", "set total_tokens"),
    ("output_dir: o\ncorpora:\n  - {name: a, inputs: [x], target_tokens: -5}\n", "positive integer"),
    ("output_dir: o\ncolour: red\ncorpora:\n  - {name: a, inputs: [x], target_tokens: 5}\n", "unknown key 'colour'"),
])
def test_blend_config_errors(tmp_path, body, message):
    cfg = tmp_path / "b.yaml"
    cfg.write_text(body)
    with pytest.raises(UserError, match=message):
        load_blend_config(cfg)


def test_cli_preprocess_and_bad_usage(tmp_path, capsys):
    src = tmp_path / "c.jsonl"
    src.write_text("".join(json.dumps({"text": t}) + "\n" for t in stdlib_texts(5)))
    assert cli_main(["preprocess", "--input", str(src), "--output-prefix", str(tmp_path / "o"),
                     "--workers", "1", "--max-tokens", "2K", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "tokenizer   gigatoken" in out and "(stopped at --max-tokens)" in out
    assert cli_main(["preprocess", "--output-prefix", "x"]) == 2
    assert "needs --input" in capsys.readouterr().err
