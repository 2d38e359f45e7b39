"""`qwen-pretrain preprocess` against what MindSpeed-LLM's `preprocess_data.py --handler-name
GeneralPretrainHandler --tokenizer-type PretrainedFromHF --json-keys text` writes for the same
parquet and tokenizer directory.

The reference below is MindSpeed-LLM v2.3.0's pretraining path (Ascend/MindSpeed-LLM, commit
1bdd97003882083da7c951fceedd71f96116be2f), written out with real parts:
- mindspeed_llm/tasks/preprocess/data_handler.py, `GeneralPretrainHandler._filter`: each record's
  text through the Hugging Face tokenizer's `__call__` (`AutoTokenizer.from_pretrained(DIR)`,
  mindspeed_llm/training/tokenizer/tokenizer.py), an empty text giving no ids; with
  `--append-eod` the tokenizer's `eos_token_id` after the document;
- `BaseDatasetHandler._serialize_to_disk`: records with no ids are dropped, every other one is
  one sequence and one document of an int32 `IndexedDatasetBuilder` (megatron-core's builder,
  whose format is unchanged since Megatron-LM core_v0.12.1; MindSpeed-LLM only buffers writes).
MindSpeed-LLM's Qwen3 data script (tests/0day/qwen3/) passes no `--append-eod`: no EOD at all,
which `--no-append-eod` reproduces byte for byte. The differences, documented in
docs/launch.md (MindSpeed-LLM): with `--append-eod` MindSpeed-LLM appends the directory's eos (151645
`<|im_end|>` for Qwen3's post-trained tokenizer files; we always append 151643), and it drops
empty records where we write an empty document.
"""

from __future__ import annotations

import json
import shutil
import sysconfig
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from qwen_pretrain.launch.cli import main

STDLIB = Path(sysconfig.get_paths()["stdlib"])
SPECIAL = ["Hello world", "混合中文 text with emoji 👩‍👩‍👧 and tabs\t\tend", "a literal <|endoftext|> inside",
           "line1\nline2\n\n", "   ", "Ünïcödé café naïve"]


def alpaca_parquet(path: Path, texts: list[str]) -> Path:
    """An Alpaca-shaped parquet (instruction, input, output, text)."""
    n = len(texts)
    pq.write_table(pa.table({"instruction": ["Explain."] * n, "input": [""] * n, "output": ["..."] * n,
                             "text": texts}), path)
    return path


def mindspeed_reference(texts: list[str], tokenizer_dir: Path, prefix: Path, append_eod: bool) -> Path:
    """GeneralPretrainHandler + _serialize_to_disk, as the module docstring cites them."""
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True)
    builder = IndexedDatasetBuilder(f"{prefix}_text_document.bin", dtype=np.int32)
    for text in texts:
        if not text:
            continue
        ids = tok(text=text)["input_ids"] + ([tok.eos_token_id] if append_eod else [])
        builder.add_item(torch.tensor(ids, dtype=torch.int32))
        builder.end_document()
    builder.finalize(f"{prefix}_text_document.idx")
    return prefix


def ours(parquet: Path, tokenizer_dir: Path, prefix: Path, *extra: str) -> Path:
    assert main(["preprocess", "--input", str(parquet), "--output-prefix", str(prefix), "--tokenizer",
                 str(tokenizer_dir), "--workers", "2", "--no-progress", *extra]) == 0
    return prefix


def same_files(a: Path, b: Path) -> bool:
    return all((Path(f"{a}_text_document{s}").read_bytes() == Path(f"{b}_text_document{s}").read_bytes())
               for s in (".bin", ".idx"))


@pytest.fixture(scope="module")
def texts() -> list[str]:
    code = [p.read_text(errors="replace")[:6000] for p in sorted((STDLIB / "json").glob("*.py"))]
    return SPECIAL + code + ["x" * 5000]


def test_no_append_eod_is_mindspeeds_qwen3_data_script_byte_for_byte(tmp_path, texts, qwen_tokenizer_dir):
    parquet = alpaca_parquet(tmp_path / "alpaca.parquet", texts)
    ref = mindspeed_reference(texts, qwen_tokenizer_dir, tmp_path / "ref", append_eod=False)
    assert same_files(ours(parquet, qwen_tokenizer_dir, tmp_path / "ours", "--no-append-eod"), ref)


def test_append_eod_matches_where_the_tokenizer_eos_is_endoftext(tmp_path, texts, qwen_tokenizer_dir):
    # A tokenizer directory whose eos is <|endoftext|>: MindSpeed-LLM's --append-eod is our default.
    tok_dir = tmp_path / "tok"
    shutil.copytree(qwen_tokenizer_dir, tok_dir)
    config = json.loads((tok_dir / "tokenizer_config.json").read_text())
    (tok_dir / "tokenizer_config.json").write_text(json.dumps({**config, "eos_token": "<|endoftext|>"}))
    parquet = alpaca_parquet(tmp_path / "alpaca.parquet", texts)
    ref = mindspeed_reference(texts, tok_dir, tmp_path / "ref", append_eod=True)
    assert same_files(ours(parquet, tok_dir, tmp_path / "ours"), ref)


def test_documented_differences(tmp_path, qwen_tokenizer_dir):
    """Qwen3's own files (eos <|im_end|>) and an empty record: the two documented differences."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    texts = ["first", "", "third"]
    parquet = alpaca_parquet(tmp_path / "alpaca.parquet", texts)
    ref = IndexedDataset(str(mindspeed_reference(texts, qwen_tokenizer_dir, tmp_path / "ref", True)) + "_text_document")
    got = IndexedDataset(str(ours(parquet, qwen_tokenizer_dir, tmp_path / "ours")) + "_text_document")
    assert [ref[i][-1] for i in range(len(ref))] == [151645, 151645]  # the tokenizer's eos, <|im_end|>
    assert [got[i].tolist() for i in range(len(got))][1] == [151643]  # the empty record: a lone EOD
    mine = [got[i].tolist() for i in (0, 2)]
    assert [s[:-1] for s in mine] == [ref[i].tolist()[:-1] for i in range(2)] and [s[-1] for s in mine] == [151643] * 2
