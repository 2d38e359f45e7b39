"""Document de-duplication: exact (hash of normalized text) and near-duplicate (MinHash-LSH).

Workers compute a fingerprint per document (a 64-bit hash, or a MinHash signature); the main
process decides, in input order, which documents are duplicates of one already kept, so the
output is the same for any number of workers.

Normalization for both: Unicode NFKC, lower case, every whitespace run collapsed to one space,
trimmed. So two web pages that differ only in case or line wrapping count as duplicates.

MinHash: the shingles are the hashed 5-character windows of the normalized text (characters,
not words, so Chinese and code work too). Each of `num_perm` hash functions
`h_i(x) = splitmix64(x XOR seed_i)` maps every shingle; the signature is the minimum per
function, and two signatures agree in a position with probability equal to the Jaccard
similarity of the shingle sets. (The textbook linear family `(a x + b) mod p` with 32-bit
coefficients underestimated Jaccard by about 0.1 on real text in our test; a full 64-bit
mixer does not.) LSH cuts the signature into `bands` bands of `rows` rows: two
documents become candidates when any band is identical, and a candidate is a duplicate only
when the fraction of equal signature positions (the Jaccard estimate) reaches `threshold`.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from dataclasses import dataclass

import numpy as np

_WHITESPACE = re.compile(r"\s+")
_BLOCK = 1 << 14  # shingles hashed at once: bounds memory to _BLOCK x num_perm x 8 bytes


def normalize(text: str) -> str:
    return _WHITESPACE.sub(" ", unicodedata.normalize("NFKC", text).lower()).strip()


def exact_fingerprint(text: str) -> int:
    """64-bit hash of the normalized text (blake2b: stable across processes and runs)."""
    digest = hashlib.blake2b(normalize(text).encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little")


@dataclass(frozen=True)
class MinHashParams:
    num_perm: int = 128
    bands: int = 16
    shingle: int = 5
    threshold: float = 0.8
    seed: int = 1234

    @property
    def rows(self) -> int:
        return self.num_perm // self.bands

    def coefficients(self) -> np.ndarray:
        """One 64-bit seed per hash function."""
        return np.random.default_rng(self.seed).integers(0, 1 << 63, size=self.num_perm, dtype=np.uint64)


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finalizer: every input bit affects every output bit (in place)."""
    x ^= x >> np.uint64(30)
    x *= np.uint64(0xBF58476D1CE4E5B9)
    x ^= x >> np.uint64(27)
    x *= np.uint64(0x94D049BB133111EB)
    x ^= x >> np.uint64(31)
    return x


def shingle_hashes(text: str, width: int) -> np.ndarray:
    """Unique 32-bit hashes of all `width`-character windows of the normalized text."""
    codes = np.frombuffer(normalize(text).encode("utf-32-le"), dtype=np.uint32).astype(np.uint64)
    if len(codes) < width:
        codes = np.concatenate([codes, np.zeros(width - len(codes), np.uint64)])
    n = len(codes) - width + 1
    h = np.zeros(n, dtype=np.uint64)
    for k in range(width):  # polynomial hash, wrapping mod 2^64, then folded to 32 bits
        h = h * np.uint64(1_000_003) + codes[k: k + n]
    return np.unique(_mix64(h) & np.uint64(0xFFFFFFFF))


def minhash_signature(text: str, params: MinHashParams, seeds: np.ndarray) -> np.ndarray:
    """The document's MinHash signature: `num_perm` uint32 values (low bits of the minima)."""
    shingles = shingle_hashes(text, params.shingle)
    signature = np.full(params.num_perm, np.iinfo(np.uint64).max, dtype=np.uint64)
    for start in range(0, len(shingles), _BLOCK):
        values = _mix64(shingles[start: start + _BLOCK, None] ^ seeds[None, :])
        np.minimum(signature, values.min(axis=0), out=signature)
    return (signature & np.uint64(0xFFFFFFFF)).astype(np.uint32)


class ExactDeduplicator:
    """Remembers the fingerprints of kept documents (one 64-bit int each)."""

    def __init__(self) -> None:
        self._seen: set[int] = set()

    def is_duplicate(self, fingerprint: int) -> bool:
        if fingerprint in self._seen:
            return True
        self._seen.add(fingerprint)
        return False


class MinHashLSH:
    """Near-duplicate index: band tables for candidates, stored signatures to confirm them."""

    def __init__(self, params: MinHashParams) -> None:
        if params.num_perm % params.bands:
            raise ValueError("num_perm must be a multiple of bands")
        self.params = params
        self._tables: list[dict[bytes, list[int]]] = [{} for _ in range(params.bands)]
        self._signatures: list[np.ndarray] = []

    def is_duplicate(self, signature: np.ndarray) -> bool:
        """True if a kept document is similar enough; otherwise keep this one and index it."""
        rows = self.params.rows
        keys = [signature[i * rows: (i + 1) * rows].tobytes() for i in range(self.params.bands)]
        checked: set[int] = set()
        for table, key in zip(self._tables, keys, strict=True):
            for doc in table.get(key, ()):
                if doc in checked:
                    continue
                checked.add(doc)
                if np.mean(self._signatures[doc] == signature) >= self.params.threshold:
                    return True
        doc = len(self._signatures)
        self._signatures.append(signature)
        for table, key in zip(self._tables, keys, strict=True):
            table.setdefault(key, []).append(doc)
        return False


def jaccard(a: str, b: str, width: int = 5) -> float:
    """Exact Jaccard similarity of two texts' shingle sets (for tests and reports)."""
    sa, sb = shingle_hashes(a, width), shingle_hashes(b, width)
    inter = len(np.intersect1d(sa, sb, assume_unique=True))
    return inter / (len(sa) + len(sb) - inter)
