"""`preprocess blend CONFIG.yaml`: several corpora, each to its token target, and their blend.

Config (paths relative to the config file's folder):

    output_dir: data/blend          # each corpus is written to {output_dir}/{name}_text_document...
    tokenizer: qwen                 # optional; also workers, json_key, dedup, strict as defaults
    total_tokens: 3000000           # needed only when a corpus gives a weight
    corpora:
      - name: web
        inputs: [web/*.jsonl.zst]
        target_tokens: 2000000      # stop this corpus here ...
        shard_tokens: 1000000       # optional: _0000, _0001, ... shards
      - name: code
        inputs: [code.parquet]
        weight: 0.33                # ... or a share of total_tokens

The blend weights are the tokens actually written per dataset over all tokens written, so a
corpus that ran out before its target gets the share it really has.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qwen_pretrain.preprocessing.pipeline import PreprocessResult, preprocess
from qwen_pretrain.recipes.errors import UserError
from qwen_pretrain.recipes.files import atomic_write_text

_CORPUS_KEYS = {"name", "inputs", "target_tokens", "weight", "shard_tokens", "json_key", "dedup", "strict"}
_TOP_KEYS = {"output_dir", "tokenizer", "workers", "json_key", "dedup", "strict", "total_tokens", "corpora"}


@dataclass(frozen=True)
class CorpusSpec:
    name: str
    inputs: tuple[str, ...]
    target_tokens: int | None
    shard_tokens: int | None
    json_key: str
    dedup: str
    strict: bool


@dataclass(frozen=True)
class BlendSpec:
    output_dir: Path
    tokenizer: str
    workers: int | None
    corpora: tuple[CorpusSpec, ...]


@dataclass(frozen=True)
class BlendResult:
    entries: tuple[tuple[float, str], ...]  # (weight, dataset prefix), weights sum to 1
    tokens: dict[str, int]  # corpus name -> tokens written
    targets: dict[str, int | None]
    results: dict[str, PreprocessResult]

    @property
    def megatron_data_path(self) -> str:
        return " ".join(f"{w:.6g} {p}" for w, p in self.entries)

    @property
    def nemo_paths(self) -> list[Any]:
        return [x for w, p in self.entries for x in (float(f"{w:.6g}"), p)]


def load_blend_config(path: str | Path) -> BlendSpec:
    import yaml

    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: blend config not found")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise UserError(f"{path}: not valid YAML ({str(err).splitlines()[0]})") from err
    if not isinstance(raw, dict) or not isinstance(raw.get("corpora"), list) or not raw["corpora"]:
        raise UserError(f"{path}: needs a mapping with a non-empty 'corpora' list (see preprocess blend --help)")
    unknown = set(raw) - _TOP_KEYS
    if unknown:
        raise UserError(f"{path}: unknown key '{sorted(unknown)[0]}' (allowed: {', '.join(sorted(_TOP_KEYS))})")
    if "output_dir" not in raw:
        raise UserError(f"{path}: set output_dir (where the corpora's .bin/.idx go)")
    base = path.parent
    total = _positive_int(raw.get("total_tokens"), f"{path}: total_tokens")
    weights = [c.get("weight") for c in raw["corpora"] if isinstance(c, dict)]
    corpora, names = [], set()
    for i, c in enumerate(raw["corpora"]):
        where = f"{path}: corpora[{i}]"
        if not isinstance(c, dict):
            raise UserError(f"{where}: each corpus is a mapping with name, inputs and target_tokens or weight")
        unknown = set(c) - _CORPUS_KEYS
        if unknown:
            raise UserError(f"{where}: unknown key '{sorted(unknown)[0]}' (allowed: {', '.join(sorted(_CORPUS_KEYS))})")
        name = str(c.get("name", ""))
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name) or name in names:
            raise UserError(f"{where}: name '{name}' must be unique, letters/digits/._- only")
        names.add(name)
        inputs = c.get("inputs")
        inputs = [inputs] if isinstance(inputs, str) else inputs
        if not inputs or not all(isinstance(x, str) for x in inputs):
            raise UserError(f"{where} ({name}): inputs must be a path or a list of paths/globs")
        if ("target_tokens" in c) == ("weight" in c):
            raise UserError(f"{where} ({name}): give exactly one of target_tokens or weight")
        if "weight" in c:
            weight = c["weight"]
            if not isinstance(weight, int | float) or weight <= 0:
                raise UserError(f"{where} ({name}): weight must be a positive number")
            if total is None:
                raise UserError(f"{path}: corpus '{name}' has a weight: set total_tokens to turn weights into targets")
            target = int(total * weight / sum(w for w in weights if isinstance(w, int | float)))
        else:
            target = _positive_int(c["target_tokens"], f"{where} ({name}): target_tokens")
        corpora.append(CorpusSpec(
            name=name,
            inputs=tuple(x if os.path.isabs(x) else str(base / x) for x in inputs),
            target_tokens=target,
            shard_tokens=_positive_int(c.get("shard_tokens"), f"{where} ({name}): shard_tokens"),
            json_key=str(c.get("json_key", raw.get("json_key", "text"))),
            dedup=str(c.get("dedup", raw.get("dedup", "none"))),
            strict=bool(c.get("strict", raw.get("strict", False))),
        ))
    out = Path(raw["output_dir"])
    return BlendSpec(
        output_dir=out if out.is_absolute() else base / out,
        tokenizer=str(raw.get("tokenizer", "qwen")),
        workers=_positive_int(raw.get("workers"), f"{path}: workers"),
        corpora=tuple(corpora),
    )


def _positive_int(value: Any, what: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise UserError(f"{what} must be a positive integer, got {value!r}")
    return value


def run_blend(spec: BlendSpec, progress: bool | None = None) -> BlendResult:
    """Write every corpus (each stopped at its target) and derive the weights from what was written."""
    results: dict[str, PreprocessResult] = {}
    for corpus in spec.corpora:
        results[corpus.name] = preprocess(
            list(corpus.inputs), spec.output_dir / corpus.name, json_keys=(corpus.json_key,),
            tokenizer=spec.tokenizer, workers=spec.workers, max_tokens=corpus.target_tokens,
            shard_tokens=corpus.shard_tokens, dedup=corpus.dedup, strict=corpus.strict, progress=progress,
        )
    datasets = [d for r in results.values() for d in r.datasets]
    total = sum(d.tokens for d in datasets)
    entries = tuple((d.tokens / total, str(Path(d.prefix).resolve())) for d in datasets)
    result = BlendResult(
        entries=entries,
        tokens={name: r.tokens for name, r in results.items()},
        targets={c.name: c.target_tokens for c in spec.corpora},
        results=results,
    )
    _write_json(spec.output_dir / "blend.json", {
        "megatron_data_path": result.megatron_data_path,
        "nemo_paths": result.nemo_paths,
        "corpora": {n: {"tokens": result.tokens[n], "target_tokens": result.targets[n],
                        "datasets": [d.prefix for d in results[n].datasets]} for n in results},
    })
    return result


def _write_json(path: Path, data: dict) -> None:
    atomic_write_text(path, json.dumps(data, indent=2) + "\n")


def format_blend(result: BlendResult) -> str:
    lines = ["corpus        tokens written    target"]
    for name, tokens in result.tokens.items():
        target = result.targets[name]
        lines.append(f"{name:<12}  {tokens:>14,}  {target if target is None else f'{target:,}':>8}")
    lines += [
        "",
        "Megatron-LM / megatron-core:",
        f"  --data-path {result.megatron_data_path}",
        "NeMo 2 (PreTrainingDataModule):",
        f"  paths={json.dumps(result.nemo_paths)}",
    ]
    return "\n".join(lines)
