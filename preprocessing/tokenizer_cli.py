"""`qwen-pretrain tokenizer train --input PATH ... --vocab-size N --out DIR [--kind bpe|sentencepiece]`."""

from __future__ import annotations

import argparse


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "tokenizer", help="train a tokenizer (byte-level BPE in Qwen's style, or sentencepiece-style)",
        description="Tokenizer tools. 'train' writes a directory with tokenizer.json that "
        "transformers.AutoTokenizer, `preprocess --tokenizer DIR` and the recipes accept.",
    )
    actions = p.add_subparsers(dest="tokenizer_action", metavar="ACTION", required=True)
    t = actions.add_parser(
        "train", help="train on jsonl / parquet corpora",
        description="Byte-level BPE with Qwen's pre-tokenizer (default) or sentencepiece-style BPE with "
        "byte fallback; <|endoftext|> and Qwen's chat/tool tokens are reserved after the learned vocabulary.",
    )
    t.add_argument("--input", nargs="+", required=True, metavar="PATH", help="files, directories or globs")
    t.add_argument("--json-keys", nargs="+", default=["text"], metavar="KEY", help="record fields to train on (default: text)")
    t.add_argument("--vocab-size", type=int, required=True, metavar="N", help="total tokens, reserved ones included")
    t.add_argument("--out", required=True, metavar="DIR", help="output tokenizer directory (replaced atomically)")
    t.add_argument("--kind", default="bpe", choices=("bpe", "sentencepiece"))
    t.add_argument("--min-frequency", type=int, default=2, help="merges seen fewer times are not learned (default 2)")
    t.set_defaults(func=cmd_train)


def cmd_train(args: argparse.Namespace) -> int:
    from qwen_pretrain.preprocessing.tokenizer_train import print_result, train_tokenizer

    result = train_tokenizer(
        args.input, args.out, vocab_size=args.vocab_size, json_keys=tuple(args.json_keys),
        kind=args.kind, min_frequency=args.min_frequency,
    )
    print_result(result)
    return 0
