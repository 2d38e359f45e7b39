"""The Qwen tokenizer as megatron-core's datasets expect it (`GPTDatasetConfig.tokenizer`).

megatron-core names the abstract class `MegatronLegacyTokenizer` since 0.15 and
`MegatronTokenizer` in 0.14; `mcore_compat.legacy_tokenizer_base` finds whichever is there.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def megatron_tokenizer(tokenizer: str | Path = "qwen", backend: str = "auto") -> Any:
    """megatron-core's abstract tokenizer over our loader: `eod` is `<|endoftext|>` (151643), not
    `<|im_end|>`."""
    import numpy as np
    from qwen_pretrain.preprocessing.tokenizer import load_tokenizer
    from qwen_pretrain.training.mcore_compat import legacy_tokenizer_base

    class QwenMegatronTokenizer(legacy_tokenizer_base()):
        def __init__(self) -> None:
            self._tok = load_tokenizer(tokenizer, backend=backend)
            super().__init__(str(self._tok.path))

        def tokenize(self, text: str) -> np.ndarray:
            return np.asarray(self._tok.encode(text), dtype=np.int64)

        def detokenize(self, ids: np.ndarray) -> str:
            return self._tok.decode(ids)

        @property
        def vocab(self) -> dict[str, int]:
            import tokenizers

            return tokenizers.Tokenizer.from_file(str(self._tok.path)).get_vocab()

        @property
        def inv_vocab(self) -> dict[int, str]:
            return {i: t for t, i in self.vocab.items()}

        @property
        def vocab_size(self) -> int:
            return self._tok.vocab_size

        @property
        def eod(self) -> int:
            return self._tok.eod_id

    return QwenMegatronTokenizer()
