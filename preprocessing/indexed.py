"""Megatron's indexed dataset (`.bin` + `.idx`): a streaming, atomic writer and a strict reader.

Layout (little-endian), as megatron-core's `IndexedDataset` reads it:
`.idx` = magic `MMIDIDX\\0\\0`, version u64 = 1, dtype code u8, sequence count u64 (S),
document-index count u64 (D + 1 entries for D documents), S int32 lengths, S int64 byte
pointers into `.bin`, D + 1 int64 document indices (0, 1, ..., S: one sequence per document).
`.bin` = all token ids back to back in that dtype.

The writer appends token ids to a temporary `.bin` as batches arrive, keeps only the
per-document lengths (4 bytes each), and writes the `.idx` at the end; both files get their
final names only when `close()` succeeds, `.idx` last, so an interrupted run leaves no pair
that looks complete.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from qwen_pretrain.recipes.errors import UserError

INDEX_MAGIC = b"MMIDIDX\x00\x00"
INDEX_VERSION = 1
_HEADER = struct.Struct("<9sQBQQ")  # magic, version, dtype code, sequence count, doc-index count

DTYPE_CODES: dict[int, type[np.number]] = {
    1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 6: np.float64, 7: np.float32, 8: np.uint16,
}
CODE_OF_DTYPE = {np.dtype(v): k for k, v in DTYPE_CODES.items()}


def dataset_paths(prefix: str | Path) -> tuple[Path, Path]:
    """`prefix` (e.g. `out/web_text_document`) -> its `.bin` and `.idx` paths."""
    prefix = str(prefix)
    return Path(prefix + ".bin"), Path(prefix + ".idx")


def token_dtype(vocab_size: int) -> type[np.number]:
    """Megatron's choice: uint16 when every id fits below 65500, else int32 (Qwen: int32)."""
    return np.uint16 if vocab_size < 65500 else np.int32


class IndexedDatasetWriter:
    """Streams documents into `{prefix}.bin/.idx`; `close()` makes them visible, `abort()` drops them."""

    def __init__(self, prefix: str | Path, dtype: type[np.number] = np.int32) -> None:
        self.prefix = str(prefix)
        self.dtype = np.dtype(dtype)
        if self.dtype not in CODE_OF_DTYPE:
            raise ValueError(f"dtype {self.dtype} has no indexed-dataset code")
        self.bin_path, self.idx_path = dataset_paths(self.prefix)
        self.bin_path.parent.mkdir(parents=True, exist_ok=True)
        suffix = f".tmp-{os.getpid()}"
        self._bin_tmp = self.bin_path.with_name(self.bin_path.name + suffix)
        self._idx_tmp = self.idx_path.with_name(self.idx_path.name + suffix)
        self._bin = open(self._bin_tmp, "wb")  # noqa: SIM115 - closed in close()/abort()
        self._lengths: list[np.ndarray] = []
        self.documents = 0
        self.tokens = 0

    def add_documents(self, ids: np.ndarray, lengths: np.ndarray) -> None:
        """Append documents given as all their ids concatenated plus each one's length."""
        if int(lengths.sum()) != len(ids):
            raise ValueError("lengths do not add up to the number of ids")
        if len(lengths) == 0:
            return
        self._bin.write(memoryview(np.ascontiguousarray(ids, dtype=self.dtype)))  # no copy of the ids
        self._lengths.append(np.asarray(lengths, dtype=np.int32))
        self.documents += len(lengths)
        self.tokens += len(ids)

    def close(self) -> None:
        """Write the `.idx`, then give both files their final names (`.bin` first, `.idx` last)."""
        self._bin.close()
        lengths = np.concatenate(self._lengths) if self._lengths else np.zeros(0, np.int32)
        pointers = np.zeros(len(lengths), dtype=np.int64)
        np.cumsum(lengths[:-1], dtype=np.int64, out=pointers[1:])
        pointers *= self.dtype.itemsize
        doc_index = np.arange(len(lengths) + 1, dtype=np.int64)
        with open(self._idx_tmp, "wb") as f:
            f.write(_HEADER.pack(INDEX_MAGIC, INDEX_VERSION, CODE_OF_DTYPE[self.dtype], len(lengths), len(doc_index)))
            f.write(lengths.tobytes())
            f.write(pointers.tobytes())
            f.write(doc_index.tobytes())
        os.replace(self._bin_tmp, self.bin_path)
        os.replace(self._idx_tmp, self.idx_path)
        self._lengths = []

    def abort(self) -> None:
        """Drop the temporary files; nothing under the final names is created."""
        self._bin.close()
        for path in (self._bin_tmp, self._idx_tmp):
            path.unlink(missing_ok=True)


@dataclass(frozen=True)
class IndexedDatasetInfo:
    """A validated `.bin/.idx` pair: sizes and memory-mapped views (no data copied)."""

    prefix: str
    dtype: np.dtype
    lengths: np.ndarray  # int32, one per sequence
    pointers: np.ndarray  # int64 byte offsets into .bin
    document_index: np.ndarray  # int64, documents + 1 entries
    tokens: np.ndarray  # memmap of the whole .bin

    @property
    def documents(self) -> int:
        return len(self.document_index) - 1

    @property
    def token_count(self) -> int:
        return int(self.lengths.sum(dtype=np.int64))

    def document(self, i: int) -> np.ndarray:
        start, end = self.document_index[i], self.document_index[i + 1]
        if end == start:
            return self.tokens[:0]
        first = int(self.pointers[start]) // self.dtype.itemsize
        return self.tokens[first: first + int(self.lengths[start:end].sum())]


def read_indexed_dataset(prefix: str | Path) -> IndexedDatasetInfo:
    """Open and check a `.bin/.idx` pair; any inconsistency is a one-line UserError."""
    bin_path, idx_path = dataset_paths(prefix)
    for path in (idx_path, bin_path):
        if not path.is_file():
            raise UserError(f"{path}: not found; pass the prefix without .bin/.idx (e.g. out/web_text_document)")
    idx_size = idx_path.stat().st_size
    if idx_size < _HEADER.size:
        raise UserError(f"{idx_path}: truncated ({idx_size} bytes, the header alone is {_HEADER.size}); re-run preprocess")
    with open(idx_path, "rb") as f:
        magic, version, code, seq_count, doc_count = _HEADER.unpack(f.read(_HEADER.size))
    if magic != INDEX_MAGIC or version != INDEX_VERSION:
        raise UserError(f"{idx_path}: not a Megatron indexed-dataset index (magic {magic!r}, version {version})")
    if code not in DTYPE_CODES:
        raise UserError(f"{idx_path}: unknown dtype code {code}")
    if doc_count < 1:
        raise UserError(f"{idx_path}: document index is empty (it must start with 0); re-run preprocess")
    expected = _HEADER.size + seq_count * (4 + 8) + doc_count * 8
    if idx_size != expected:
        raise UserError(f"{idx_path}: {idx_size} bytes where its header implies {expected}: truncated or corrupt; re-run preprocess")
    dtype = np.dtype(DTYPE_CODES[code])
    index = np.memmap(idx_path, mode="r", dtype=np.uint8)
    offset = _HEADER.size
    lengths = index[offset: offset + 4 * seq_count].view(np.int32)
    offset += 4 * seq_count
    pointers = index[offset: offset + 8 * seq_count].view(np.int64)
    offset += 8 * seq_count
    document_index = index[offset: offset + 8 * doc_count].view(np.int64)
    total = int(lengths.sum(dtype=np.int64))
    bin_size = bin_path.stat().st_size
    if bin_size != total * dtype.itemsize:
        raise UserError(
            f"{bin_path}: {bin_size} bytes but {idx_path.name} describes {total} {dtype.name} tokens "
            f"({total * dtype.itemsize} bytes): the pair is truncated or mismatched; re-run preprocess"
        )
    expected_pointers = np.concatenate([[0], np.cumsum(lengths[:-1], dtype=np.int64)]) * dtype.itemsize if seq_count else pointers
    if not np.array_equal(pointers, expected_pointers):
        raise UserError(f"{idx_path}: sequence pointers disagree with the lengths: corrupt index; re-run preprocess")
    if document_index[0] != 0 or document_index[-1] != seq_count or np.any(np.diff(document_index) < 0):
        raise UserError(f"{idx_path}: document index must rise from 0 to {seq_count}: corrupt index; re-run preprocess")
    tokens = np.memmap(bin_path, mode="r", dtype=dtype) if bin_size else np.zeros(0, dtype)
    return IndexedDatasetInfo(str(prefix), dtype, lengths, pointers, document_index, tokens)
