"""Our .bin/.idx as users read it: megatron-core's IndexedDataset and GPTDataset (CPU, no CUDA
needed for the datasets; the precompiled helpers are used as shipped), and `preprocess inspect`."""

from __future__ import annotations

import json
import shutil
import sysconfig
from pathlib import Path

import numpy as np
import pytest
from qwen_pretrain.launch.cli import main as cli_main
from qwen_pretrain.preprocessing.inspection import inspect_dataset
from qwen_pretrain.preprocessing.pipeline import preprocess
from qwen_pretrain.recipes.errors import UserError

STDLIB = Path(sysconfig.get_paths()["stdlib"])
EOD = 151643


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> tuple[str, list[str]]:
    root = tmp_path_factory.mktemp("mc")
    texts = [p.read_text(errors="replace") for p in sorted((STDLIB / "email").glob("*.py"))]
    texts += ["短文档。", "", "x"]
    src = root / "corpus.jsonl"
    src.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    result = preprocess(src, root / "ds", workers=1, progress=False)
    return result.datasets[0].prefix, texts


def test_indexed_dataset_reads_our_files(dataset):
    from megatron.core.datasets.indexed_dataset import IndexedDataset
    from qwen_pretrain.preprocessing.tokenizer import load_tokenizer

    prefix, texts = dataset
    ds = IndexedDataset(prefix, mmap=True)
    tok = load_tokenizer("qwen", backend="tokenizers")
    assert len(ds) == len(texts)
    assert ds.index.dtype == np.int32
    for i, text in enumerate(texts):
        assert ds[i].tolist() == tok.encode(text) + [EOD]
    assert ds.document_indices.tolist() == list(range(len(texts) + 1))


def test_gpt_dataset_via_blended_builder(dataset):
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig
    from qwen_pretrain.training.megatron_tokenizer import megatron_tokenizer

    prefix, _ = dataset
    seq = 128
    tokenizer = megatron_tokenizer("qwen")
    assert tokenizer.eod == EOD
    config = GPTDatasetConfig(
        random_seed=1234, sequence_length=seq, blend=([prefix], None), split="80,20,0",
        tokenizer=tokenizer, reset_position_ids=True, reset_attention_mask=True, eod_mask_loss=False,
        path_to_cache=str(Path(prefix).parent / "cache"),
    )
    train, valid, _ = BlendedMegatronDatasetBuilder(GPTDataset, [40, 4, 0], lambda: True, config).build()
    assert len(train) >= 40
    sample = train[0]
    tokens, labels = sample["tokens"].numpy(), sample["labels"].numpy()
    assert tokens.shape == (seq,) and np.array_equal(tokens[1:], labels[:-1])
    assert tokens.max() < tokenizer.vocab_size and (tokens >= 0).all()
    # GPTDataset reset position ids after every EOD: our end-of-document marker is the one it uses
    eods = np.nonzero(tokens[:-1] == EOD)[0]
    seen = [train[i]["tokens"].numpy() for i in range(len(train))]
    assert any((s == EOD).any() for s in seen)
    if len(eods):
        assert sample["position_ids"][eods[0] + 1].item() == 0


def test_inspect_prints_summary(dataset, capsys):
    prefix, texts = dataset
    report = inspect_dataset(prefix)
    assert report.documents == len(texts) and report.dtype == "int32"
    assert report.eod_documents == len(texts)
    assert report.first_document.startswith(texts[0][:100])
    assert sum(c for _, _, c in report.histogram) == len(texts)
    assert cli_main(["preprocess", "inspect", prefix]) == 0
    out = capsys.readouterr().out
    assert f"documents   {len(texts)}" in out and "dtype       int32" in out and "length histogram" in out


def broken_copies(prefix: str, tmp: Path) -> dict[str, str]:
    """Four damaged pairs: truncated .bin, truncated .idx, .bin of another dataset, bad magic."""
    cases = {}
    for name in ("short_bin", "short_idx", "mismatch", "magic"):
        p = str(tmp / name)
        shutil.copy(prefix + ".bin", p + ".bin")
        shutil.copy(prefix + ".idx", p + ".idx")
        cases[name] = p
    Path(cases["short_bin"] + ".bin").write_bytes(Path(prefix + ".bin").read_bytes()[:-8])
    Path(cases["short_idx"] + ".idx").write_bytes(Path(prefix + ".idx").read_bytes()[:-16])
    Path(cases["mismatch"] + ".bin").write_bytes(Path(prefix + ".bin").read_bytes() + b"\x00" * 40)
    data = bytearray(Path(prefix + ".idx").read_bytes())
    data[:7] = b"NOTIDX!"
    Path(cases["magic"] + ".idx").write_bytes(bytes(data))
    return cases


@pytest.mark.parametrize("case,message", [
    ("short_bin", "truncated or mismatched"), ("short_idx", "truncated or corrupt"),
    ("mismatch", "truncated or mismatched"), ("magic", "not a Megatron indexed-dataset"),
])
def test_inspect_fails_clearly_on_damaged_pairs(dataset, tmp_path, capsys, case, message):
    damaged = broken_copies(dataset[0], tmp_path)[case]
    with pytest.raises(UserError, match=message):
        inspect_dataset(damaged)
    assert cli_main(["preprocess", "inspect", damaged]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err
