"""`preprocess inspect PREFIX`: what a `.bin/.idx` pair holds, after checking it is whole."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from qwen_pretrain.preprocessing.indexed import read_indexed_dataset
from qwen_pretrain.recipes.errors import UserError


@dataclass(frozen=True)
class Inspection:
    prefix: str
    documents: int
    tokens: int
    dtype: str
    min_length: int
    mean_length: float
    max_length: int
    histogram: tuple[tuple[int, int, int], ...]  # (low, high exclusive, documents) over powers of two
    eod_documents: int  # documents ending in the tokenizer's end-of-document id
    first_document: str


def resolve_prefix(prefix: str | Path) -> str:
    """Accept `P_text_document`, `P_text_document.bin/.idx`, or `P` when exactly one key was written."""
    prefix = str(prefix)
    for suffix in (".bin", ".idx"):
        if prefix.endswith(suffix):
            return prefix[: -len(suffix)]
    if Path(prefix + ".idx").exists() or Path(prefix + ".bin").exists():
        return prefix
    matches = sorted({str(p)[:-4] for p in Path(prefix).parent.glob(Path(prefix).name + "_*_document.idx")})
    if len(matches) == 1:
        return matches[0]
    if matches:
        raise UserError(f"{prefix}: several datasets match ({', '.join(matches)}); name one")
    raise UserError(f"{prefix}: no {prefix}.idx / {prefix}.bin; pass the prefix as written by preprocess (e.g. out/web_text_document)")


def inspect_dataset(prefix: str | Path, tokenizer: str | Path = "qwen", decode_chars: int = 500) -> Inspection:
    """Check the pair and summarize it; the first document is decoded with `tokenizer`."""
    from qwen_pretrain.preprocessing.tokenizer import load_tokenizer

    info = read_indexed_dataset(resolve_prefix(prefix))
    lengths = np.asarray(info.lengths, dtype=np.int64)
    tok = load_tokenizer(tokenizer)
    if len(info.tokens) and int(info.tokens.max()) >= tok.vocab_size:
        raise UserError(f"{info.prefix}.bin: token id {int(info.tokens.max())} is outside the vocabulary "
                        f"({tok.vocab_size}): written with another tokenizer? pass --tokenizer")
    histogram = []
    if len(lengths):
        top = int(np.ceil(np.log2(max(int(lengths.max()), 1) + 1)))
        edges = [0] + [1 << i for i in range(top + 1)]
        counts, _ = np.histogram(lengths, bins=edges)
        histogram = [(int(lo), int(hi), int(c)) for lo, hi, c in zip(edges[:-1], edges[1:], counts, strict=True) if c]
    ends = info.pointers // info.dtype.itemsize + lengths - 1
    eod = int(np.sum(info.tokens[ends[lengths > 0]] == tok.eod_id)) if len(lengths) else 0
    first = tok.decode(info.document(0)) if info.documents else ""
    return Inspection(
        prefix=info.prefix, documents=info.documents, tokens=info.token_count, dtype=info.dtype.name,
        min_length=int(lengths.min()) if len(lengths) else 0,
        mean_length=float(lengths.mean()) if len(lengths) else 0.0,
        max_length=int(lengths.max()) if len(lengths) else 0,
        histogram=tuple(histogram), eod_documents=eod,
        first_document=first[:decode_chars] + ("..." if len(first) > decode_chars else ""),
    )


def format_inspection(r: Inspection) -> str:
    lines = [
        f"dataset     {r.prefix}",
        f"documents   {r.documents:,}",
        f"tokens      {r.tokens:,}",
        f"dtype       {r.dtype}",
        f"length      min {r.min_length:,}  mean {r.mean_length:,.1f}  max {r.max_length:,}",
        f"ending EOD  {r.eod_documents:,} of {r.documents:,} documents",
        "length histogram (tokens per document):",
    ]
    peak = max((c for _, _, c in r.histogram), default=1)
    for lo, hi, count in r.histogram:
        lines.append(f"  [{lo:>9,}, {hi:>9,})  {count:>10,}  {'#' * max(1, round(40 * count / peak))}")
    lines += ["first document (decoded):", r.first_document]
    return "\n".join(lines)
